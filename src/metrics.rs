//! The daemon's Prometheus registry: build identity, process figures refreshed at each scrape,
//! and the API connection state. Other modules register their own metrics into the same
//! registry through `Metrics::registry()`; `/metrics` (src/http.rs) renders it.

use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::{Counter, Encoder, Gauge, IntGauge, Opts, Registry, TextEncoder, proto};

/// What this binary is: shown by `tortie version` and exported as `tortie_build_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    pub version: &'static str,
    pub git_commit: &'static str,
    pub rustc: &'static str,
    pub target: &'static str,
}

impl BuildInfo {
    pub const CURRENT: BuildInfo = BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        git_commit: match option_env!("TORTIE_GIT_COMMIT") {
            Some(c) if !c.is_empty() => c,
            _ => "unknown",
        },
        rustc: env!("TORTIE_RUSTC_VERSION"),
        target: env!("TORTIE_TARGET"),
    };

    /// The text of `tortie version`.
    pub fn render(&self) -> String {
        format!(
            "tortie {}\ngit commit: {}\nrustc: {}\ntarget: {}\n",
            self.version, self.git_commit, self.rustc, self.target
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metric {name}: {source}")]
    Register {
        name: &'static str,
        source: prometheus::Error,
    },
    #[error("encoding metrics as Prometheus text: {0}")]
    Encode(prometheus::Error),
}

/// Shared handle to the registry and the daemon-level gauges. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// 1 while every watch on the API server works, 0 while any of them fails.
    pub apiserver_connected: IntGauge,
    /// 1 once every watch has listed its objects, 0 before.
    pub datastore_synced: IntGauge,
}

impl Metrics {
    pub fn new(build: &BuildInfo) -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let build_info = IntGauge::with_opts(
            Opts::new(
                "tortie_build_info",
                "Build of the running tortie binary; the value is always 1.",
            )
            .const_label("version", build.version)
            .const_label("git_commit", build.git_commit)
            .const_label("rustc", build.rustc),
        )
        .map_err(|source| MetricsError::Register {
            name: "tortie_build_info",
            source,
        })?;
        build_info.set(1);
        let apiserver_connected = IntGauge::new(
            "tortie_apiserver_connected",
            "1 while all watches on the Kubernetes API server succeed, 0 while any fails.",
        )
        .map_err(|source| MetricsError::Register {
            name: "tortie_apiserver_connected",
            source,
        })?;
        let datastore_synced = IntGauge::new(
            "tortie_datastore_synced",
            "1 once every watched resource has been listed in full, 0 before.",
        )
        .map_err(|source| MetricsError::Register {
            name: "tortie_datastore_synced",
            source,
        })?;
        let metrics = Metrics {
            registry,
            apiserver_connected,
            datastore_synced,
        };
        metrics.register("tortie_build_info", build_info)?;
        metrics.register(
            "tortie_apiserver_connected",
            metrics.apiserver_connected.clone(),
        )?;
        metrics.register("tortie_datastore_synced", metrics.datastore_synced.clone())?;
        metrics.register("process_*", ProcessCollector::new()?)?;
        Ok(metrics)
    }

    /// The registry other modules add their metrics to.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers a collector, naming it in the error (duplicate names are programming errors
    /// that should fail start-up loudly).
    pub fn register<C: Collector + 'static>(
        &self,
        name: &'static str,
        collector: C,
    ) -> Result<(), MetricsError> {
        self.registry
            .register(Box::new(collector))
            .map_err(|source| MetricsError::Register { name, source })
    }

    /// Everything in the registry, in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(MetricsError::Encode)?;
        String::from_utf8(buf)
            .map_err(|e| MetricsError::Encode(prometheus::Error::Msg(format!("not UTF-8: {e}"))))
    }
}

/// Figures of one process as read from procfs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessStat {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    /// Seconds after boot.
    pub start_after_boot_seconds: f64,
}

/// Parses `/proc/<pid>/stat`; `ticks_per_second` and `page_size` come from sysconf.
pub fn parse_proc_stat(text: &str, ticks_per_second: f64, page_size: u64) -> Option<ProcessStat> {
    // The command name (field 2) may hold spaces and parentheses: fields restart after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state) of proc(5), so field n is fields[n - 3].
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(ProcessStat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks_per_second,
        threads: field(20)?,
        start_after_boot_seconds: field(22)? as f64 / ticks_per_second,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page_size),
    })
}

/// Parses the boot time (`btime`, Unix seconds) out of `/proc/stat`.
pub fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The standard `process_*` metrics, read from procfs whenever the registry is gathered.
struct ProcessCollector {
    cpu: Counter,
    resident: IntGauge,
    virtual_mem: IntGauge,
    threads: IntGauge,
    open_fds: IntGauge,
    start_time: Gauge,
    descs: Vec<Desc>,
    // Serialises concurrent scrapes so the CPU counter is advanced once per reading.
    refresh: Mutex<()>,
    ticks_per_second: f64,
    page_size: u64,
}

impl ProcessCollector {
    fn new() -> Result<ProcessCollector, MetricsError> {
        let reg = |name: &'static str| move |source| MetricsError::Register { name, source };
        let cpu = Counter::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        )
        .map_err(reg("process_cpu_seconds_total"))?;
        let resident = IntGauge::new(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        )
        .map_err(reg("process_resident_memory_bytes"))?;
        let virtual_mem = IntGauge::new(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        )
        .map_err(reg("process_virtual_memory_bytes"))?;
        let threads = IntGauge::new("process_threads", "Number of OS threads in the process.")
            .map_err(reg("process_threads"))?;
        let open_fds = IntGauge::new("process_open_fds", "Number of open file descriptors.")
            .map_err(reg("process_open_fds"))?;
        let start_time = Gauge::new(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
        )
        .map_err(reg("process_start_time_seconds"))?;
        let descs = [
            cpu.desc(),
            resident.desc(),
            virtual_mem.desc(),
            threads.desc(),
            open_fds.desc(),
            start_time.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        // SAFETY: sysconf only reads a system constant.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        Ok(ProcessCollector {
            cpu,
            resident,
            virtual_mem,
            threads,
            open_fds,
            start_time,
            descs,
            refresh: Mutex::new(()),
            ticks_per_second: if ticks > 0 { ticks as f64 } else { 100.0 },
            page_size: u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096),
        })
    }

    fn refresh(&self) {
        let _guard = self.refresh.lock().unwrap_or_else(|p| p.into_inner());
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_proc_stat(&t, self.ticks_per_second, self.page_size));
        if let Some(s) = stat {
            // A counter only moves forward; procfs CPU time never goes back either.
            let delta = s.cpu_seconds - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
            self.resident.set(clamp_i64(s.resident_bytes));
            self.virtual_mem.set(clamp_i64(s.virtual_bytes));
            self.threads.set(clamp_i64(s.threads));
            if let Some(btime) = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|t| parse_boot_time(&t))
            {
                self.start_time
                    .set(btime as f64 + s.start_after_boot_seconds);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(clamp_i64(dir.count() as u64));
        }
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        self.refresh();
        [
            self.cpu.collect(),
            self.resident.collect(),
            self.virtual_mem.collect(),
            self.threads.collect(),
            self.open_fds.collect(),
            self.start_time.collect(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (tortie (node) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
        250 150 0 0 20 0 7 0 123456 104857600 5120 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn proc_stat_fields_survive_parentheses_in_the_command_name() {
        let s = parse_proc_stat(STAT, 100.0, 4096).expect("parses");
        assert_eq!(s.cpu_seconds, 4.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_after_boot_seconds, 1234.56);
        assert_eq!(s.virtual_bytes, 104_857_600);
        assert_eq!(s.resident_bytes, 5120 * 4096);
    }

    #[test]
    fn truncated_proc_stat_is_rejected() {
        assert_eq!(parse_proc_stat("4242 (tortie) S 1 2 3", 100.0, 4096), None);
        assert_eq!(parse_proc_stat("garbage", 100.0, 4096), None);
    }

    #[test]
    fn boot_time_is_read_from_btime_line() {
        let text = "cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n";
        assert_eq!(parse_boot_time(text), Some(1_700_000_000));
        assert_eq!(parse_boot_time("cpu 1\n"), None);
    }

    #[test]
    fn exposition_has_build_info_and_live_process_figures() {
        let m = Metrics::new(&BuildInfo::CURRENT).expect("registry");
        m.apiserver_connected.set(1);
        let text = m.encode().expect("encodes");
        assert!(text.contains("tortie_build_info{"), "{text}");
        assert!(text.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))));
        assert!(text.contains("tortie_apiserver_connected 1"));
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
        let rss_line = text
            .lines()
            .find(|l| l.starts_with("process_resident_memory_bytes "))
            .expect("rss line");
        let rss: f64 = rss_line
            .split_whitespace()
            .nth(1)
            .expect("value")
            .parse()
            .expect("number");
        assert!(
            rss > 1_000_000.0,
            "a running test process uses more than 1 MB: {rss}"
        );
    }

    #[test]
    fn other_modules_can_add_metrics_but_not_twice() {
        let m = Metrics::new(&BuildInfo::CURRENT).expect("registry");
        let g = IntGauge::new("felix_cluster_num_hosts", "hosts").expect("gauge");
        m.register("felix_cluster_num_hosts", g.clone())
            .expect("first");
        let err = m
            .register("felix_cluster_num_hosts", g)
            .expect_err("duplicate");
        assert!(err.to_string().contains("felix_cluster_num_hosts"));
    }
}
