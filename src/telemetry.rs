//! Process-wide logging: one `tracing` subscriber, text or JSON lines on stderr, filtered by
//! `--log-level` / `TORTIE_LOG_LEVEL`, else `RUST_LOG`, else `info`. Set up once in `main`.
//! Logs go to stderr so that commands printing results on stdout stay machine-readable.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Shape of one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, event fields at the top level (for log collectors).
    Json,
}

/// Logging flags, shared by every subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "TORTIE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log filter in `tracing` EnvFilter syntax, e.g. `info` or `tortie=debug,kube=warn`.
    /// When absent, `RUST_LOG` is used, else `info` (with kube's per-request errors muted).
    #[arg(long, env = "TORTIE_LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log filter {filter:?} is invalid: {source}")]
    InvalidFilter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Used when neither `--log-level` nor `RUST_LOG` is set. kube's client logs every failed
/// request at ERROR without context; callers log the same failure with context, so mute it.
pub const DEFAULT_FILTER: &str = "info,kube_client::client::builder=off";

/// The filter text in force: the explicit setting wins over `RUST_LOG`, else `DEFAULT_FILTER`.
pub fn filter_text(explicit: Option<&str>, rust_log: Option<&str>) -> String {
    [explicit, rust_log]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|s| !s.is_empty())
        .unwrap_or(DEFAULT_FILTER)
        .to_owned()
}

type Reloader = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the installed subscriber's filter (FelixConfiguration `logSeverityScreen`).
static RELOAD: std::sync::OnceLock<Reloader> = std::sync::OnceLock::new();

/// Set by `init`: the log filter was given explicitly.
static EXPLICIT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Whether the log filter was given explicitly (`--log-level`, `TORTIE_LOG_LEVEL` or
/// `RUST_LOG`): then it wins over FelixConfiguration, as Felix's environment does.
pub fn filter_was_explicit() -> bool {
    EXPLICIT.get().copied().unwrap_or(false)
}

/// Replaces the filter of the subscriber `init` installed; a no-op without one.
pub fn set_filter(filter: &str) -> Result<(), TelemetryError> {
    let env_filter =
        EnvFilter::try_new(filter).map_err(|source| TelemetryError::InvalidFilter {
            filter: filter.to_string(),
            source,
        })?;
    match RELOAD.get() {
        Some(reload) => reload(env_filter).map_err(TelemetryError::AlreadyInstalled),
        None => Ok(()),
    }
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(args: &LogArgs) -> Result<(), TelemetryError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter_text(args.log_level.as_deref(), rust_log.as_deref());
    let _ = EXPLICIT.set(filter != DEFAULT_FILTER);
    let env_filter =
        EnvFilter::try_new(&filter).map_err(|source| TelemetryError::InvalidFilter {
            filter: filter.clone(),
            source,
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a person at a terminal; in pod logs they are noise.
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match args.log_format {
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let handle = b.reload_handle();
            let _ = RELOAD.set(Box::new(move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            }));
            b.try_init()
        }
        LogFormat::Json => {
            let b = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_filter_reloading();
            let handle = b.reload_handle();
            let _ = RELOAD.set(Box::new(move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            }));
            b.try_init()
        }
    };
    installed.map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_level_wins_over_rust_log() {
        assert_eq!(filter_text(Some("debug"), Some("warn")), "debug");
    }

    #[test]
    fn rust_log_is_used_when_no_explicit_level() {
        assert_eq!(filter_text(None, Some("tortie=trace")), "tortie=trace");
    }

    #[test]
    fn blank_settings_fall_back_to_the_default() {
        assert_eq!(filter_text(Some("  "), Some("")), DEFAULT_FILTER);
        assert_eq!(filter_text(None, None), DEFAULT_FILTER);
        assert!(EnvFilter::try_new(DEFAULT_FILTER).is_ok());
    }

    #[test]
    fn invalid_filter_is_reported_with_its_text() {
        let args = LogArgs {
            log_format: LogFormat::Text,
            log_level: Some("tortie=notalevel".into()),
        };
        let err = init(&args).expect_err("bad filter must fail");
        assert!(err.to_string().contains("tortie=notalevel"), "{err}");
    }
}
