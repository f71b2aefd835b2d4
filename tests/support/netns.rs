// Network namespaces for tests: uniquely named (`tt-<label>-<pid>-<n>`), removed with their
// links and processes on Drop (also on panic), and leftovers of crashed runs reaped at first use.
// Code runs inside a namespace via `ip netns exec` or on a dedicated setns'd std::thread.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns};

use super::process::{Guarded, pid_alive};

const PREFIX: &str = "tt-";

/// A network namespace owned by this test; deleted on Drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `tt-<label>-<pid>-<n>` with `lo` up.
    pub fn new(label: &str) -> anyhow::Result<NetNs> {
        static REAP: Once = Once::new();
        REAP.call_once(|| {
            if let Err(e) = reap_stale() {
                eprintln!("netns reaper: {e:#}");
            }
        });
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("netns label {label:?} must be non-empty ASCII letters, digits or '-'");
        }
        let name = format!("{PREFIX}{label}-{}-{n}", std::process::id());
        // The first `ip netns add` on a machine sets up the /run/netns mount; parallel test
        // threads racing through that can stack mounts, so adds are serialised.
        static ADD: Mutex<()> = Mutex::new(());
        {
            let _one_at_a_time = ADD.lock().unwrap_or_else(|e| e.into_inner());
            run_ok(Command::new("ip").args(["netns", "add", &name]))
                .with_context(|| format!("create netns {name}"))?;
        }
        // From here on Drop cleans up, even if bringing lo up fails.
        let ns = NetNs { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what CNI_NETNS and setns expect.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs `argv` inside the namespace (via `ip netns exec`).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs `argv` inside the namespace and returns its output, whatever the exit status.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.command(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {argv:?} in netns {}: {e}", self.name))
    }

    /// Runs `argv` inside the namespace; its stdout, or an error holding its stderr.
    pub fn exec_ok(&self, argv: &[&str]) -> anyhow::Result<String> {
        run_ok(self.command(argv).stdin(Stdio::null()))
            .with_context(|| format!("in netns {}", self.name))
    }

    /// Feeds `script` to `nft -f -` inside the namespace: one atomic transaction. Panics
    /// with nft's complaint and the script when nft rejects it.
    pub fn nft_load(&self, script: &str) {
        let mut child = self
            .command(&["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run nft in netns {}: {e}", self.name));
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .expect("write the nft script");
        }
        let out = child.wait_with_output().expect("wait for nft");
        assert!(
            out.status.success(),
            "nft rejected the script in netns {}: {}\n{script}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `f` on a fresh std::thread that has joined this namespace; the thread exits
    /// afterwards, so no other code ever runs in the namespace by accident. Panics in `f`
    /// propagate to the caller.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
        let file = std::fs::File::open(self.path())
            .with_context(|| format!("open {}", self.path().display()))?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> anyhow::Result<R> {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into {}", self.name))?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// An rtnetlink handle whose socket lives in this namespace (the socket is created on a
    /// setns'd thread; the connection task runs on the caller's tokio runtime).
    pub async fn netlink(&self) -> anyhow::Result<rtnetlink::Handle> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = self.run(move || {
            let _enter = rt.enter();
            rtnetlink::new_connection()
        })??;
        tokio::spawn(conn);
        Ok(handle)
    }

    /// Starts a long-running process inside the namespace; it is killed when the guard drops
    /// (and, as a backstop, when the namespace drops or the test process dies).
    pub fn spawn(&self, argv: &[&str]) -> anyhow::Result<Guarded> {
        let mut cmd = self.command(argv);
        cmd.stdin(Stdio::null());
        Guarded::spawn(&format!("{argv:?} in netns {}", self.name), cmd)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.name) {
            eprintln!("netns cleanup: {e:#}");
        }
    }
}

/// Creates a veth pair with `a_if` in `a` and `b_if` in `b`, both up. The kernel creates each
/// end directly in its namespace, so the names never touch the root namespace.
pub fn veth_pair(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> anyhow::Result<()> {
    for name in [a_if, b_if] {
        if name.is_empty() || name.len() > 15 {
            bail!("interface name {name:?} must be 1..=15 bytes");
        }
    }
    run_ok(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]))
    .with_context(|| format!("veth {}:{a_if} <-> {}:{b_if}", a.name, b.name))?;
    a.exec_ok(&["ip", "link", "set", a_if, "up"])?;
    b.exec_ok(&["ip", "link", "set", b_if, "up"])?;
    Ok(())
}

/// Creates a veth pair with `root_if` in the root namespace and `ns_if` in `ns`, both up.
/// Deleting `ns` destroys the pair, root end included. Give the root end an address only
/// from 198.18.0.0/15, and never routes.
pub fn veth_to_root(ns: &NetNs, ns_if: &str, root_if: &str) -> anyhow::Result<()> {
    for name in [ns_if, root_if] {
        if name.is_empty() || name.len() > 15 {
            bail!("interface name {name:?} must be 1..=15 bytes");
        }
    }
    run_ok(Command::new("ip").args([
        "link", "add", root_if, "type", "veth", "peer", "name", ns_if, "netns", &ns.name,
    ]))
    .with_context(|| format!("veth root:{root_if} <-> {}:{ns_if}", ns.name))?;
    let up = run_ok(Command::new("ip").args(["link", "set", root_if, "up"]));
    if let Err(e) = up {
        // Not yet owned by a Drop guard's namespace alone: remove the root end now.
        let _ = run_ok(Command::new("ip").args(["link", "del", root_if]));
        return Err(e);
    }
    ns.exec_ok(&["ip", "link", "set", ns_if, "up"])?;
    Ok(())
}

/// Names of all namespaces in /run/netns.
pub fn list() -> anyhow::Result<Vec<String>> {
    match std::fs::read_dir("/run/netns") {
        Ok(dir) => Ok(dir
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).context("read /run/netns"),
    }
}

/// Deletes `tt-*` namespaces whose creating process is gone (from crashed or killed runs).
pub fn reap_stale() -> anyhow::Result<Vec<String>> {
    let mut reaped = Vec::new();
    for name in list()? {
        if let Some(pid) = owner_pid(&name)
            && !pid_alive(pid)
        {
            delete(&name)?;
            reaped.push(name);
        }
    }
    Ok(reaped)
}

/// The pid in `tt-<label>-<pid>-<n>`; the label may itself contain '-'.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let _counter: u32 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next().filter(|label| !label.is_empty())?;
    Some(pid)
}

/// Kills what still runs in the namespace (so it cannot keep it alive), then deletes it.
fn delete(name: &str) -> anyhow::Result<()> {
    if let Ok(pids) = run_ok(Command::new("ip").args(["netns", "pids", name])) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    // Namespace teardown is asynchronous in the kernel: a veth whose peer is in the root
    // namespace would linger there for a moment. Deleting the links first is synchronous.
    if let Ok(links) = run_ok(Command::new("ip").args(["-n", name, "-o", "link", "show"])) {
        for link in links.lines().filter_map(link_name).filter(|l| *l != "lo") {
            let _ = run_ok(Command::new("ip").args(["-n", name, "link", "del", link]));
        }
    }
    run_ok(Command::new("ip").args(["netns", "del", name]))
        .with_context(|| format!("delete netns {name}"))?;
    Ok(())
}

/// The name in a line of `ip -o link show`: `2: eth0@if5: <...`.
fn link_name(line: &str) -> Option<&str> {
    let name = line.split(": ").nth(1)?;
    Some(name.split('@').next().unwrap_or(name))
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim(),
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod's plumbing as Calico's CNI makes it, for dataplane tests that run without the CNI:
/// veth, /32 address, the 169.254.1.1 gateway trick (proxy ARP), host route.
pub fn plumb_pod(
    node: &NetNs,
    pod: &NetNs,
    host_if: &str,
    pod_ip: &str,
    mtu: Option<u32>,
) -> anyhow::Result<()> {
    veth_pair(node, host_if, pod, "eth0")?;
    pod.exec_ok(&["ip", "addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
    if let Some(mtu) = mtu {
        pod.exec_ok(&["ip", "link", "set", "eth0", "mtu", &mtu.to_string()])?;
    }
    pod.exec_ok(&[
        "ip",
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    pod.exec_ok(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    node.exec_ok(&[
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.{host_if}.proxy_arp=1"),
    ])?;
    node.exec_ok(&[
        "sysctl",
        "-qw",
        &format!("net.ipv4.neigh.{host_if}.proxy_delay=0"),
    ])?;
    node.exec_ok(&[
        "ip",
        "route",
        "add",
        &format!("{pod_ip}/32"),
        "dev",
        host_if,
        "scope",
        "link",
    ])?;
    Ok(())
}

/// One ping from `from` to `to` answered within 2 s.
pub fn ping(from: &NetNs, to: &str) -> bool {
    from.exec(&["ping", "-c", "1", "-W", "2", to])
        .status
        .success()
}

/// One TCP connection from `client` to `server_addr` in `server`, data checked both ways.
pub fn tcp_both_ways(client: &NetNs, server: &NetNs, server_addr: &str) -> anyhow::Result<()> {
    let addr = server_addr.to_string();
    let listener = server.run(move || TcpListener::bind((addr.as_str(), 0)))??;
    let port = listener.local_addr()?.port();
    let accept = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut s, _) = listener.accept()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(b"pong!")?;
        Ok(buf.to_vec())
    });
    let target = format!("{server_addr}:{port}");
    let mut stream = client.run(move || TcpStream::connect(target))??;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    stream.write_all(b"ping!")?;
    let mut back = [0u8; 5];
    stream.read_exact(&mut back)?;
    assert_eq!(&back, b"pong!");
    let got = accept.join().expect("server thread")?;
    assert_eq!(got, b"ping!");
    Ok(())
}
