//! The CNI plugin entry point (`tortie` / `tortie-ipam` run with CNI_COMMAND set): validate
//! the invocation, forward it with the netns descriptor to the node daemon, print the answer
//! in the runtime's cniVersion. It holds no credentials and makes no API call.
//!
//! Error codes chosen where the spec leaves room:
//! - CNI_NETNS that cannot be opened or is not a namespace on ADD/CHECK: 4 (invalid necessary
//!   environment variable; the message names CNI_NETNS and the path). Not 3, which would
//!   tell the runtime it may skip DEL, and not libcni's 8, which the spec does not define.
//! - daemon socket absent, refusing, or silent past the timeout: 11 (try again later), or 50
//!   (plugin not available) for STATUS; the message names the socket path.
//! - daemon answered something unreadable (version skew): 100.
//!
//! Exit status is 1 on every error, as libcni's skeleton does; the code is in the JSON.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;

use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use serde_json::Value;

use super::client::{self, ClientError};
use super::error::{CniError, code};
use super::invocation::{Command, Invocation, InvocationError, PluginKind};
use super::netconf::{NetConf, NetConfError};
use super::protocol::{PROTOCOL_VERSION, ProtocolError, Request, Response};
use super::result::{CniResult, ResultError};
use super::version::{self, CniVersion, VersionError};

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Invocation(#[from] InvocationError),
    #[error("reading the network configuration from stdin failed: {0}")]
    Stdin(#[source] io::Error),
    #[error(transparent)]
    Config(#[from] NetConfError),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("prevResult is not a usable CNI result: {0}")]
    PrevResult(#[source] ResultError),
    #[error("CNI_NETNS={path:?} cannot be opened: {source}")]
    NetnsOpen { path: String, source: io::Error },
    #[error("CNI_NETNS={path:?} is not a network namespace (file system type {fs_type:#x})")]
    NotANamespace { path: String, fs_type: i64 },
    #[error(transparent)]
    Daemon(#[from] ClientError),
    #[error("tortie daemon answered {command} without a result")]
    MissingResult { command: Command },
    #[error("tortie daemon returned an invalid result: {0}")]
    BadResult(#[source] ResultError),
}

impl PluginError {
    /// The spec's code for this failure (see the module comment for the judgement calls).
    pub fn code(&self, command: Command) -> u32 {
        match self {
            PluginError::Invocation(_) => code::INVALID_ENVIRONMENT,
            PluginError::Stdin(_) => code::IO_FAILURE,
            PluginError::Config(NetConfError::Invalid { .. }) => code::INVALID_CONFIG,
            PluginError::Config(_) => code::DECODING_FAILURE,
            PluginError::Version(_) => code::INCOMPATIBLE_VERSION,
            PluginError::PrevResult(ResultError::Decode(_)) => code::DECODING_FAILURE,
            PluginError::PrevResult(_) => code::INVALID_CONFIG,
            PluginError::NetnsOpen { .. } | PluginError::NotANamespace { .. } => {
                code::INVALID_ENVIRONMENT
            }
            PluginError::Daemon(ClientError::Exchange {
                source:
                    ProtocolError::Json(_)
                    | ProtocolError::UnsupportedProtocol { .. }
                    | ProtocolError::TooLarge { .. }
                    | ProtocolError::DescriptorMismatch { .. },
                ..
            }) => code::DAEMON_PROTOCOL,
            PluginError::Daemon(_) if command == Command::Status => code::PLUGIN_NOT_AVAILABLE,
            PluginError::Daemon(_) => code::TRY_AGAIN_LATER,
            PluginError::MissingResult { .. } | PluginError::BadResult(_) => code::DAEMON_PROTOCOL,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            PluginError::Daemon(_) => {
                "the tortie node daemon (DaemonSet pod on this node) serves this socket once it is ready; check that it is running"
            }
            PluginError::MissingResult { .. } | PluginError::BadResult(_) => {
                "the plugin binary on the host and the daemon may be of different versions"
            }
            _ => "",
        }
    }

    pub fn to_cni(&self, command: Command) -> CniError {
        CniError::new(self.code(command), self.to_string()).with_details(self.hint())
    }
}

/// What an invocation ends in: JSON to print (ADD, VERSION), nothing (DEL, CHECK, GC,
/// STATUS), or a CNI error printed in the invocation's version.
#[derive(Debug)]
pub enum Outcome {
    Print(Value),
    Silent,
    Failed {
        version: CniVersion,
        error: CniError,
    },
}

/// Entry point used by `main` when CNI_COMMAND is set.
pub fn run() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .try_init();
    let argv0 = std::env::args_os().next();
    let kind = PluginKind::from_argv0(argv0.as_deref());
    let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let outcome = execute(kind, &env, &mut io::stdin().lock());
    let (text, status) = match &outcome {
        Outcome::Print(v) => (Some(v.to_string()), ExitCode::SUCCESS),
        Outcome::Silent => (None, ExitCode::SUCCESS),
        Outcome::Failed { version, error } => {
            tracing::warn!(
                command = env("CNI_COMMAND").unwrap_or_default(),
                container_id = env("CNI_CONTAINERID").unwrap_or_default(),
                code = error.code,
                msg = %error.msg,
                "CNI request failed"
            );
            (
                Some(error.to_output(*version).to_string()),
                ExitCode::from(1),
            )
        }
    };
    if let Some(text) = text {
        let mut out = io::stdout().lock();
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            // Nobody can read the answer; the exit status is all that is left.
            return ExitCode::from(1);
        }
    }
    status
}

/// One invocation, with the environment and stdin passed in.
pub fn execute(
    kind: PluginKind,
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
) -> Outcome {
    let command = match Invocation::command(env) {
        Ok(c) => c,
        Err(e) => {
            // No command: report as ADD would (4, invalid environment).
            return Outcome::Failed {
                version: version::CURRENT,
                error: PluginError::from(e).to_cni(Command::Add),
            };
        }
    };
    if command == Command::Version {
        return Outcome::Print(version::version_output());
    }
    let mut reported_version = version::CURRENT;
    match forward(kind, command, env, stdin, &mut reported_version) {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Failed {
            version: reported_version,
            error: e,
        },
    }
}

fn forward(
    kind: PluginKind,
    command: Command,
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    reported_version: &mut CniVersion,
) -> Result<Outcome, CniError> {
    let fail = |e: PluginError| e.to_cni(command);
    let mut bytes = Vec::new();
    stdin
        .read_to_end(&mut bytes)
        .map_err(|e| fail(PluginError::Stdin(e)))?;
    let (conf, raw) = NetConf::decode(&bytes).map_err(|e| fail(e.into()))?;
    let version = conf.version().map_err(|e| fail(e.into()))?;
    *reported_version = version;
    version.allows(command).map_err(|e| fail(e.into()))?;
    let inv = Invocation::from_env(command, env).map_err(|e| fail(e.into()))?;
    conf.validate().map_err(|e| fail(e.into()))?;
    let settings = conf
        .client_settings(kind, command)
        .map_err(|e| fail(e.into()))?;
    let prev_result = conf
        .prev_result
        .clone()
        .map(CniResult::from_value)
        .transpose()
        .map_err(|e| fail(PluginError::PrevResult(e)))?;

    let netns = open_netns(kind, command, inv.netns.as_deref()).map_err(fail)?;
    let request = Request {
        protocol: PROTOCOL_VERSION,
        command,
        kind,
        cni_version: version,
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        netns: inv.netns.clone(),
        netns_fd: netns.is_some(),
        args: inv.args.clone(),
        valid_attachments: if command == Command::Gc {
            conf.gc_attachments()
        } else {
            Vec::new()
        },
        config: conf,
        raw_config: raw,
        prev_result,
    };
    let response = client::call(&settings, &request, netns.as_ref().map(|f| f.as_fd()))
        .map_err(|e| fail(e.into()))?;
    match response {
        Response::Error { error } => Err(error),
        Response::Ok { result } if command == Command::Add => {
            let result = result.ok_or_else(|| fail(PluginError::MissingResult { command }))?;
            result
                .validate()
                .map_err(|e| fail(PluginError::BadResult(e)))?;
            let result = match kind {
                PluginKind::Ipam => result.into_ipam_only(),
                PluginKind::Main => result,
            };
            Ok(Outcome::Print(result.to_version(version)))
        }
        Response::Ok { .. } => Ok(Outcome::Silent),
    }
}

/// Opens CNI_NETNS for the commands that act inside it. DEL goes on without a descriptor
/// when the namespace is gone (the daemon must still release the addresses); the IPAM-only
/// plugin never touches the namespace.
fn open_netns(
    kind: PluginKind,
    command: Command,
    path: Option<&str>,
) -> Result<Option<File>, PluginError> {
    if kind == PluginKind::Ipam || !command.is_attachment() {
        return Ok(None);
    }
    let Some(path) = path else {
        return Ok(None);
    };
    let opened = File::open(path)
        .map_err(|source| PluginError::NetnsOpen {
            path: path.to_string(),
            source,
        })
        .and_then(|file| {
            let fs_type = fstatfs(&file)
                .map_err(|e| PluginError::NetnsOpen {
                    path: path.to_string(),
                    source: e.into(),
                })?
                .filesystem_type();
            if fs_type != NSFS_MAGIC {
                return Err(PluginError::NotANamespace {
                    path: path.to_string(),
                    fs_type: fs_type.0 as i64,
                });
            }
            Ok(file)
        });
    match opened {
        Ok(file) => Ok(Some(file)),
        Err(e) if command == Command::Del => {
            tracing::info!(error = %e, "DEL without netns descriptor");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn failed(outcome: Outcome) -> (CniVersion, CniError) {
        match outcome {
            Outcome::Failed { version, error } => (version, error),
            other => panic!("expected failure, got {other:?}"),
        }
    }

    const CONF: &str = r#"{"cniVersion":"0.4.0","name":"k8s-pod-network","type":"tortie","socket":"/nonexistent/tortie.sock"}"#;

    #[test]
    fn version_needs_no_stdin() {
        let env = env_of(&[("CNI_COMMAND", "VERSION")]);
        match execute(PluginKind::Main, &env, &mut io::empty()) {
            Outcome::Print(v) => assert_eq!(v["cniVersion"], "1.1.0"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_command_is_invalid_environment() {
        let env = env_of(&[("CNI_COMMAND", "FROB")]);
        let (_, e) = failed(execute(PluginKind::Main, &env, &mut io::empty()));
        assert_eq!(e.code, code::INVALID_ENVIRONMENT);
        assert!(e.msg.contains("FROB"));
    }

    #[test]
    fn errors_are_reported_in_the_config_version() {
        let env = env_of(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        let (v, e) = failed(execute(PluginKind::Main, &env, &mut CONF.as_bytes()));
        assert_eq!(v, CniVersion::V0_4_0);
        assert_eq!(e.code, code::INVALID_ENVIRONMENT);
        assert!(e.msg.contains("CNI_NETNS"), "{}", e.msg);
    }

    #[test]
    fn gc_below_1_1_0_is_incompatible_version() {
        let env = env_of(&[("CNI_COMMAND", "GC")]);
        let (_, e) = failed(execute(PluginKind::Main, &env, &mut CONF.as_bytes()));
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("GC"), "{}", e.msg);
    }

    #[test]
    fn status_with_absent_daemon_is_not_available() {
        let env = env_of(&[("CNI_COMMAND", "STATUS")]);
        let conf = CONF.replace("0.4.0", "1.1.0");
        let (_, e) = failed(execute(PluginKind::Main, &env, &mut conf.as_bytes()));
        assert_eq!(e.code, code::PLUGIN_NOT_AVAILABLE);
        assert!(e.msg.contains("/nonexistent/tortie.sock"), "{}", e.msg);
    }

    #[test]
    fn regular_file_as_netns_is_rejected_on_add() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_str().unwrap();
        let env = env_of(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", path),
        ]);
        let (_, e) = failed(execute(PluginKind::Main, &env, &mut CONF.as_bytes()));
        assert_eq!(e.code, code::INVALID_ENVIRONMENT);
        assert!(e.msg.contains("not a network namespace"), "{}", e.msg);
    }

    #[test]
    fn del_with_missing_netns_still_goes_to_the_daemon() {
        let env = env_of(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent/netns"),
        ]);
        // The daemon is absent, so reaching it is what fails: proof DEL got that far.
        let (_, e) = failed(execute(PluginKind::Main, &env, &mut CONF.as_bytes()));
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
    }

    #[test]
    fn proc_self_netns_is_a_namespace() {
        let f = open_netns(PluginKind::Main, Command::Add, Some("/proc/self/ns/net")).unwrap();
        assert!(f.is_some());
        let none = open_netns(PluginKind::Ipam, Command::Add, Some("/nonexistent")).unwrap();
        assert!(none.is_none());
    }
}
