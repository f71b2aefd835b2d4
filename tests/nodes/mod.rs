// `tortie node` as a real process inside its own node namespace: the namespace gets a veth to
// the root namespace (198.19.128.0/17 /30s, one per node) through which it reaches the test's
// API server and the test reaches its health and metrics ports. The daemon's CNI directories
// and socket live in a temp dir; nothing of it touches the root namespace's network.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::support::{NetNs, veth_to_root};

pub mod cluster;

pub const HEALTH_PORT: u16 = 9099;
pub const METRICS_PORT: u16 = 9091;

/// A node namespace with `api0` linked to the root namespace.
pub struct Host {
    pub ns: NetNs,
    /// The root end's address: where a control plane started with `start_on` listens.
    pub root_ip: Ipv4Addr,
    /// The namespace end's address: where the test reaches the daemon's HTTP ports.
    pub ns_ip: Ipv4Addr,
}

impl Host {
    pub fn new(label: &str) -> anyhow::Result<Host> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // One /30 per host: 198.19.(128 + pid % 120).(4n) — distinct across parallel tests
        // of this binary, and clear of the sandbox's 198.18.255.0/24 root links.
        let third = 128 + (pid % 120) as u8;
        let fourth = ((n % 63) * 4) as u8;
        let root_ip = Ipv4Addr::new(198, 19, third, fourth + 1);
        let ns_ip = Ipv4Addr::new(198, 19, third, fourth + 2);
        let ns = NetNs::new(label)?;
        let root_if = format!("tn{}x{n}", pid % 100_000);
        veth_to_root(&ns, "api0", &root_if)?;
        let out = std::process::Command::new("ip")
            .args(["addr", "add", &format!("{root_ip}/30"), "dev", &root_if])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "address on {root_if}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns.exec_ok(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", "api0"])?;
        Ok(Host { ns, root_ip, ns_ip })
    }

    /// Reaches `other`'s root-side address (another host's control plane) through our link:
    /// the root namespace delivers it locally, no forwarding involved.
    pub fn route_to(&self, other: Ipv4Addr) -> anyhow::Result<()> {
        self.ns.exec_ok(&[
            "ip",
            "route",
            "add",
            &format!("{other}/32"),
            "via",
            &self.root_ip.to_string(),
            "dev",
            "api0",
        ])?;
        Ok(())
    }
}

/// Settings a test may change; the rest are fixed.
pub struct DaemonOpts<'a> {
    pub kubeconfig: &'a Path,
    pub node_name: &'a str,
    pub env: Vec<(&'a str, String)>,
}

/// A running `tortie node` in a host namespace; killed and reaped on Drop.
pub struct Daemon {
    child: Child,
    pub http_ip: Ipv4Addr,
    pub dir: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon with its CNI directories under `dir` (kept across restarts).
    pub fn start(host: &Host, dir: &Path, opts: DaemonOpts<'_>) -> Daemon {
        Daemon::start_binary(host, dir, opts, Path::new(env!("CARGO_BIN_EXE_tortie")))
    }

    /// `start` with another `tortie` binary (benchmarks compare builds in one run).
    pub fn start_binary(host: &Host, dir: &Path, opts: DaemonOpts<'_>, binary: &Path) -> Daemon {
        std::fs::create_dir_all(dir).expect("daemon dir");
        let log = dir.join("tortie.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let binary = binary.display().to_string();
        let mut cmd = host.ns.command(&[binary.as_str(), "node"]);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("KUBECONFIG", opts.kubeconfig)
            .env("NODENAME", opts.node_name)
            .env("TORTIE_HEALTH_ADDR", "0.0.0.0")
            .env("TORTIE_METRICS_ADDR", "0.0.0.0")
            .env("TORTIE_LOG_LEVEL", "info,tortie=debug")
            .env("TORTIE_CNI_BIN_DIR", dir.join("bin"))
            .env("TORTIE_CNI_CONF_DIR", dir.join("net.d"))
            .env("TORTIE_CNI_SOCKET", dir.join("run/cni.sock"))
            .env("TORTIE_LEASE_NAMESPACE", "default")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe; it makes the daemon die with this test thread.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn tortie node");
        Daemon {
            child,
            http_ip: host.ns_ip,
            dir: dir.to_path_buf(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn health(&self, path: &str) -> Result<(u16, String), String> {
        http_get(self.http_ip, HEALTH_PORT, path)
    }

    pub fn readiness(&self) -> Result<(u16, String), String> {
        self.health("/readiness")
    }

    pub fn metrics_text(&self) -> String {
        let (status, body) =
            http_get(self.http_ip, METRICS_PORT, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// Polls /readiness until `want(status, body)` holds, returning the last answer.
    pub fn wait_readiness(
        &mut self,
        timeout: Duration,
        want: impl Fn(u16, &str) -> bool,
    ) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        let mut last = Err("no answer yet".to_owned());
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tortie node exited early ({status}):\n{}", self.log());
            }
            last = self.readiness();
            if let Ok((code, body)) = &last
                && want(*code, body)
            {
                return (*code, body.clone());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "readiness never reached the wanted state in {timeout:?}; last answer {last:?}\n{}",
            self.log()
        );
    }

    /// SIGTERM, then waits (up to 10 s) for the exit; returns the status and how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let t0 = Instant::now();
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
        while t0.elapsed() < Duration::from_secs(10) {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("tortie node ignored SIGTERM for 10 s:\n{}", self.log());
    }

    pub fn resident_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line");
        kib * 1024
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET (status code and body); Err while nothing listens.
pub fn http_get(ip: Ipv4Addr, port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = (IpAddr::V4(ip), port).into();
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no end of headers")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((code, body.to_owned()))
}
