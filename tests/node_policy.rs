// Network policy enforced by two real `tortie node` daemons (policy on by default), each in
// its own node namespace, against one real control plane; pods plumbed through the real
// CNI plugin (cnitool). Kubernetes NetworkPolicies decide real TCP connections on one node
// and across nodes; an egress-denied pod never gets a packet out, even its first one right
// after ADD returns; an allowed pod's first connection succeeds; a spoofed source is dropped;
// a label change moves a pod in and out of a selector; a daemon killed and restarted while
// probes run never lets a denied connection through; hand-made drift is repaired.

mod nodes;
mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use nodes::cluster::{Cluster, NODE_NAMES, READY, create_pod};
use nodes::{Daemon, DaemonOpts, Host};
use support::process::Guarded;
use support::{ControlPlane, NetNs};
use tortie::api::ippool::EncapMode;
use tortie::api::{IPPool, IPPoolSpec};
use tortie::cni::plumbing::host_veth_name;

/// The resync interval node-a runs with (90 s in production): drift is repaired within it.
const RESYNC_SECS: u64 = 2;
/// node-b's: far longer than any wait below, so whatever node-b learns about pods (new
/// ones, relabels) it learns from the Pod watch waking its calculation, not from a resync.
const SLOW_RESYNC_SECS: u64 = 600;
/// Every pod serves TCP here.
const PORT: u16 = 8080;
/// A denied connection is given this long (no SYN retransmit happens within it).
const DENIED_WAIT: Duration = Duration::from_millis(800);

/// A pod plumbed by the CNI: its namespace, address, and the server it runs on PORT.
struct TestPod {
    name: String,
    netns: NetNs,
    ip: String,
    _server: Server,
}

async fn start_cluster() -> anyhow::Result<Cluster> {
    let c = Cluster::start("np", [RESYNC_SECS, SLOW_RESYNC_SECS]).await?;
    c.cp.create_namespace("open").await?;
    Ok(c)
}

/// Creates the Pod (bound to node `i`, with `labels`), then its ADD through cnitool;
/// returns once ADD answered, with the pod serving TCP on PORT.
async fn pod(
    c: &Cluster,
    i: usize,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<TestPod> {
    create_pod(&c.cp.client(), namespace, name, NODE_NAMES[i], labels).await?;
    let netns = NetNs::new(&format!("np-{name}"))?;
    let ip = c.add(i, namespace, name, &netns.path()).await?;
    let server = Server::start(&netns)?;
    Ok(TestPod {
        name: format!("{namespace}/{name}"),
        netns,
        ip,
        _server: server,
    })
}

async fn relabel(client: &Client, name: &str, role: &str) -> anyhow::Result<()> {
    let patch = serde_json::json!({"metadata": {"labels": {"role": role}}});
    Api::<Pod>::namespaced(client.clone(), "default")
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("relabel {name}"))?;
    Ok(())
}

async fn apply_policy(client: &Client, body: serde_json::Value) -> anyhow::Result<()> {
    let p: NetworkPolicy = serde_json::from_value(body)?;
    Api::<NetworkPolicy>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &p)
        .await
        .context("create NetworkPolicy")?;
    Ok(())
}

/// A TCP server inside a pod: accepts and closes until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(netns: &NetNs) -> anyhow::Result<Server> {
        let listener = netns.run(|| TcpListener::bind(("0.0.0.0", PORT)))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Server {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TCP connect from `from` to `to`:PORT within `timeout`.
fn connects(from: &NetNs, to: &str, timeout: Duration) -> bool {
    let addr: SocketAddr = format!("{to}:{PORT}").parse().expect("address");
    from.run(move || TcpStream::connect_timeout(&addr, timeout).is_ok())
        .unwrap_or(false)
}

/// Polls `check` every 100 ms until it holds or `timeout` passes; how long it took.
async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if check() {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// tcpdump on `eth0` of a pod, into a file read back by `packets`.
struct Capture {
    proc: Guarded,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    fn start(netns: &NetNs) -> anyhow::Result<Capture> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("cap.pcap");
        let path = file.display().to_string();
        let proc = netns.spawn(&[
            "tcpdump",
            "--immediate-mode",
            "-i",
            "eth0",
            "-n",
            "-U",
            "-w",
            &path,
        ])?;
        // tcpdump writes the file header once it is capturing.
        let t0 = Instant::now();
        while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) == 0 {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(5),
                "tcpdump did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Capture {
            proc,
            file,
            _dir: dir,
        })
    }

    /// Stops the capture; the packets as tcpdump prints them.
    fn packets(mut self) -> anyhow::Result<Vec<String>> {
        // tcpdump takes a moment to hand over what the kernel captured.
        std::thread::sleep(Duration::from_millis(300));
        self.proc.stop();
        let out = std::process::Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }
}

fn from_ip<'a>(packets: &'a [String], ip: &str) -> Vec<&'a String> {
    // "IP 10.0.0.1.43210 > …" (with a port) or "IP 10.0.0.1 > …" (ICMP).
    let (bare, with_port) = (format!(" {ip}"), format!(" {ip}."));
    packets
        .iter()
        .filter(|l| {
            l.split_once(" > ")
                .is_some_and(|(src, _)| src.ends_with(&bare) || src.contains(&with_port))
        })
        .collect()
}

/// The packets counted by the anti-spoofing rule of node `ns`.
fn antispoof_drops(ns: &NetNs) -> u64 {
    let counter = ns
        .exec_ok(&[
            "nft",
            "list",
            "counter",
            "inet",
            "tortie-policy",
            "raw-prerouting/anti-spoofing",
        ])
        .unwrap_or_default();
    counter
        .split("packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_holds_across_nodes_from_the_first_packet_and_through_restarts() -> anyhow::Result<()>
{
    let mut c = start_cluster().await?;
    let client = c.cp.client();
    // Policies first: every pod below is created under them.
    apply_policy(
        &client,
        serde_json::json!({
            "metadata": {"name": "default-deny-ingress"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }),
    )
    .await?;
    apply_policy(
        &client,
        serde_json::json!({
            "metadata": {"name": "servers-from-clients"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]
            }
        }),
    )
    .await?;
    apply_policy(
        &client,
        serde_json::json!({
            "metadata": {"name": "silent-egress"},
            "spec": {"podSelector": {"matchLabels": {"role": "silent"}}, "policyTypes": ["Egress"]}
        }),
    )
    .await?;

    // ---- (a) same-node and cross-node decisions ------------------------------------------
    let server_a = pod(&c, 0, "default", "server-a", &[("app", "server")]).await?;
    let server_b = pod(&c, 1, "default", "server-b", &[("app", "server")]).await?;
    let client_a = pod(&c, 0, "default", "client-a", &[("role", "client")]).await?;
    let client_b = pod(&c, 1, "default", "client-b", &[("role", "client")]).await?;
    let other_a = pod(&c, 0, "default", "other-a", &[("role", "other")]).await?;
    let other_b = pod(&c, 1, "default", "other-b", &[("role", "other")]).await?;
    let sink_a = pod(&c, 0, "open", "sink-a", &[]).await?;
    let sink_b = pod(&c, 1, "open", "sink-b", &[]).await?;

    // Remote pods' addresses reach the other node through the Pod watch (Calico's pod IP
    // annotations, written right after ADD): cross-node allows converge within seconds.
    for (from, to) in [(&client_b, &server_a), (&client_a, &server_b)] {
        let took = eventually(Duration::from_secs(15), || {
            connects(&from.netns, &to.ip, DENIED_WAIT)
        })
        .await;
        assert!(
            took.is_some(),
            "{} -> {} never allowed\n{}",
            from.name,
            to.name,
            c.logs()
        );
        eprintln!(
            "{} -> {}: allowed {} ms after the ADDs",
            from.name,
            to.name,
            took.unwrap_or_default().as_millis()
        );
    }
    let matrix: [(&TestPod, &TestPod, bool); 10] = [
        (&client_a, &server_a, true),
        (&client_b, &server_a, true),
        (&client_a, &server_b, true),
        (&client_b, &server_b, true),
        (&other_a, &server_a, false),
        (&other_b, &server_a, false),
        (&other_a, &server_b, false),
        (&server_a, &client_b, false),
        (&client_a, &other_a, false),
        (&other_a, &sink_b, true),
    ];
    let mut wrong = Vec::new();
    for (from, to, want) in matrix {
        let got = connects(&from.netns, &to.ip, DENIED_WAIT);
        if got != want {
            wrong.push(format!(
                "{} -> {}: want {want}, got {got}",
                from.name, to.name
            ));
        }
    }
    assert!(wrong.is_empty(), "{}\n{}", wrong.join("\n"), c.logs());

    // ---- (b) the first packet after ADD meets the final policy ----------------------------
    let caps = [
        Capture::start(&sink_a.netns)?,
        Capture::start(&sink_b.netns)?,
    ];
    let silent = pod(&c, 0, "default", "silent-a", &[("role", "silent")]).await?;
    // Right after ADD returned: TCP to both sinks, and a ping.
    let escaped_tcp = [&sink_a, &sink_b]
        .iter()
        .filter(|s| connects(&silent.netns, &s.ip, DENIED_WAIT))
        .count();
    let pinged = support::netns::ping(&silent.netns, &sink_a.ip);
    // The control: an unrestricted pod's packets are seen by the same captures.
    assert!(connects(&other_a.netns, &sink_a.ip, DENIED_WAIT));
    assert!(connects(&other_a.netns, &sink_b.ip, DENIED_WAIT));
    let [cap_a, cap_b] = caps;
    for (sink, cap) in [(&sink_a, cap_a), (&sink_b, cap_b)] {
        let packets = cap.packets()?;
        let leaked = from_ip(&packets, &silent.ip);
        assert!(
            leaked.is_empty(),
            "egress-denied {} reached {}: {leaked:?}",
            silent.name,
            sink.name
        );
        assert!(
            !from_ip(&packets, &other_a.ip).is_empty(),
            "the capture on {} saw nothing at all: {packets:?}",
            sink.name
        );
    }
    assert_eq!(escaped_tcp, 0, "egress-denied pod connected");
    assert!(!pinged, "egress-denied pod pinged");

    // An allowed pod's very first connection, right after ADD: same node without any
    // retransmission; across nodes once the other node has its address.
    let fresh = pod(&c, 0, "default", "client-a2", &[("role", "client")]).await?;
    let t0 = Instant::now();
    let first_local = connects(&fresh.netns, &server_a.ip, Duration::from_millis(900));
    let local_ms = t0.elapsed().as_millis();
    let t0 = Instant::now();
    let first_remote = connects(&fresh.netns, &server_b.ip, Duration::from_secs(10));
    let remote_ms = t0.elapsed().as_millis();
    eprintln!(
        "first connection right after ADD: same node {local_ms} ms, across nodes {remote_ms} ms"
    );
    assert!(
        first_local,
        "first same-node connection failed\n{}",
        c.logs()
    );
    assert!(
        first_remote,
        "first cross-node connection failed\n{}",
        c.logs()
    );

    // ---- (c) anti-spoofing ---------------------------------------------------------------
    // other-a claims client-b's address (which server-a allows) and pings server-a.
    let cap = Capture::start(&server_a.netns)?;
    let before = antispoof_drops(c.ns(0));
    other_a.netns.exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{}/32", client_b.ip),
        "dev",
        "eth0",
    ])?;
    let spoofed = other_a.netns.exec(&[
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        &client_b.ip,
        &server_a.ip,
    ]);
    other_a.netns.exec_ok(&[
        "ip",
        "addr",
        "del",
        &format!("{}/32", client_b.ip),
        "dev",
        "eth0",
    ])?;
    assert!(
        support::netns::ping(&client_a.netns, &server_a.ip),
        "control ping"
    );
    let packets = cap.packets()?;
    let after = antispoof_drops(c.ns(0));
    assert!(!spoofed.status.success(), "spoofed ping answered");
    let arrived = from_ip(&packets, &client_b.ip);
    assert!(
        arrived.is_empty(),
        "spoofed packets reached server-a: {arrived:?}"
    );
    assert!(
        !from_ip(&packets, &client_a.ip).is_empty(),
        "capture empty: {packets:?}"
    );
    assert!(
        after >= before + 3,
        "the anti-spoofing rule counted {before} -> {after}"
    );

    // ---- (d) a label change moves a pod in and out of the selector ------------------------
    relabel(&client, "other-a", "client").await?;
    let t0 = Instant::now();
    let (na, oa) = (&server_a, &other_a);
    let local = eventually(Duration::from_secs(10), || {
        connects(&oa.netns, &na.ip, DENIED_WAIT)
    })
    .await;
    let remote = eventually(Duration::from_secs(10), || {
        connects(&oa.netns, &server_b.ip, DENIED_WAIT)
    })
    .await;
    eprintln!(
        "relabel in: same node after {:?}, other node after {:?} (total {:?})",
        local,
        remote,
        t0.elapsed()
    );
    assert!(local.is_some() && remote.is_some(), "{}", c.logs());
    relabel(&client, "other-a", "other").await?;
    let t0 = Instant::now();
    let out_local = eventually(Duration::from_secs(10), || {
        !connects(&oa.netns, &na.ip, DENIED_WAIT)
    })
    .await;
    let out_remote = eventually(Duration::from_secs(10), || {
        !connects(&oa.netns, &server_b.ip, DENIED_WAIT)
    })
    .await;
    eprintln!(
        "relabel out: same node after {out_local:?}, other node after {out_remote:?} (total {:?})",
        t0.elapsed()
    );
    assert!(out_local.is_some() && out_remote.is_some(), "{}", c.logs());

    // ---- (e) restart: policy enforced throughout; drift repaired --------------------------
    let stop = Arc::new(AtomicBool::new(false));
    let denied_passed = Arc::new(AtomicU32::new(0));
    let allowed_failed = Arc::new(AtomicU32::new(0));
    let probes = Arc::new(AtomicU32::new(0));
    let probe_paths: [(PathBuf, String, bool); 2] = [
        (other_a.netns.path(), server_a.ip.clone(), false),
        (client_a.netns.path(), server_a.ip.clone(), true),
    ];
    let mut probers = Vec::new();
    for (path, to, allowed) in probe_paths {
        let (stop, denied_passed, allowed_failed, probes) = (
            stop.clone(),
            denied_passed.clone(),
            allowed_failed.clone(),
            probes.clone(),
        );
        probers.push(std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("netns file");
            nix::sched::setns(
                std::os::fd::AsFd::as_fd(&file),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )
            .expect("setns");
            let addr: SocketAddr = format!("{to}:{PORT}").parse().expect("addr");
            while !stop.load(Ordering::Relaxed) {
                let ok = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok();
                probes.fetch_add(1, Ordering::Relaxed);
                match (allowed, ok) {
                    (false, true) => {
                        denied_passed.fetch_add(1, Ordering::Relaxed);
                    }
                    (true, false) => {
                        allowed_failed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Killed outright: no orderly shutdown.
    c.daemons[0] = None;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    c.start_daemon(0);
    c.daemon(0).wait_readiness(READY, |code, _| code == 200);
    let ready_ms = t0.elapsed().as_millis();
    // Past the new daemon's first policy pass and a resync.
    tokio::time::sleep(Duration::from_secs(RESYNC_SECS + 1)).await;
    stop.store(true, Ordering::Relaxed);
    for p in probers {
        p.join().expect("prober");
    }
    let (n, passed, failed) = (
        probes.load(Ordering::Relaxed),
        denied_passed.load(Ordering::Relaxed),
        allowed_failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "restart: ready again after {ready_ms} ms; {n} probes, {passed} denied connections passed, {failed} allowed ones failed"
    );
    assert_eq!(
        passed,
        0,
        "a denied connection passed during the restart\n{}",
        c.logs()
    );
    assert_eq!(
        failed,
        0,
        "the restart cut an allowed connection\n{}",
        c.logs()
    );

    // Drift: a set element and a dispatch map element deleted by hand come back within a resync.
    let node = c.ns(0);
    let listing: serde_json::Value = serde_json::from_str(&node.exec_ok(&[
        "nft",
        "-j",
        "list",
        "table",
        "inet",
        "tortie-policy",
    ])?)?;
    let (set, elem) = listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("set"))
        .find_map(|s| {
            let elems = s.get("elem")?.as_array()?;
            elems
                .iter()
                .find(|e| e.as_str() == Some(client_a.ip.as_str()))
                .map(|_| {
                    (
                        s["name"].as_str().unwrap_or_default().to_string(),
                        client_a.ip.clone(),
                    )
                })
        })
        .with_context(|| format!("no set holds {} alone: {listing}", client_a.ip))?;
    let deleted = Instant::now();
    node.exec_ok(&[
        "nft",
        "delete",
        "element",
        "inet",
        "tortie-policy",
        &set,
        &format!("{{ {elem} }}"),
    ])?;
    let server_iface = host_veth_name("default", "server-a");
    node.exec_ok(&[
        "nft",
        "delete",
        "element",
        "inet",
        "tortie-policy",
        "to-wl",
        &format!("{{ \"{server_iface}\" }}"),
    ])?;
    assert!(
        !connects(&client_a.netns, &server_a.ip, DENIED_WAIT),
        "without its dispatch entry server-a is unreachable"
    );
    let repaired = eventually(Duration::from_secs(RESYNC_SECS + 3), || {
        let listed = node
            .exec_ok(&["nft", "-j", "list", "set", "inet", "tortie-policy", &set])
            .unwrap_or_default();
        let set_back = serde_json::from_str::<serde_json::Value>(&listed)
            .ok()
            .and_then(|v| {
                v["nftables"].as_array()?.iter().find_map(|o| {
                    let elems = o.get("set")?.get("elem")?.as_array()?;
                    Some(
                        elems
                            .iter()
                            .any(|e| e.as_str() == Some(client_a.ip.as_str())),
                    )
                })
            })
            .unwrap_or(false);
        let rule_back = node
            .exec_ok(&["nft", "list", "map", "inet", "tortie-policy", "to-wl"])
            .unwrap_or_default()
            .contains(&server_iface);
        set_back && rule_back
    })
    .await;
    anyhow::ensure!(repaired.is_some(), "drift not repaired\n{}", c.logs());
    eprintln!(
        "hand-deleted set element and dispatch map element restored {} ms after the deletion (resync {RESYNC_SECS} s)",
        deleted.elapsed().as_millis()
    );
    assert!(connects(&client_a.netns, &server_a.ip, DENIED_WAIT));
    assert!(!connects(&other_a.netns, &server_a.ip, DENIED_WAIT));

    // ---- turned off: node-b removes its table, so nothing there is denied any more -------
    let (status, _) = c.daemon(1).terminate();
    assert_eq!(status.code(), Some(0));
    c.start_daemon_with(1, &[("TORTIE_POLICY", "false")]);
    c.daemon(1).wait_readiness(READY, |code, _| code == 200);
    let gone = !c
        .ns(1)
        .exec(&["nft", "list", "table", "inet", "tortie-policy"])
        .status
        .success();
    assert!(gone, "policy table left on node-b with TORTIE_POLICY=false");
    assert!(connects(&other_a.netns, &server_b.ip, DENIED_WAIT));
    assert!(!connects(&other_a.netns, &server_a.ip, DENIED_WAIT));

    drop(fresh);
    drop(silent);
    Ok(())
}

/// A pass that never commits (the test-only fault hook stalls the policy loop): the ADD
/// fails after its bounded wait with an error naming policy and leaves nothing behind (no
/// veth, no address held); once the loop runs again the same ADD succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_whose_policy_never_arrives_fails_naming_policy_and_leaves_nothing()
-> anyhow::Result<()> {
    let host = Host::new("np-stall")?;
    host.ns.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])?;
    host.ns.exec_ok(&["ip", "link", "set", "eth0p", "up"])?;
    host.ns
        .exec_ok(&["ip", "addr", "add", "172.31.80.1/24", "dev", "eth0"])?;
    host.ns.exec_ok(&["ip", "link", "set", "eth0", "up"])?;
    let cp = ControlPlane::start_on(host.root_ip.into()).await?;
    cp.create_node("node-s", &[]).await?;
    let pool = IPPool::new(
        "stall-pool",
        IPPoolSpec {
            cidr: "10.246.0.0/16".into(),
            vxlan_mode: EncapMode::Always,
            ..Default::default()
        },
    );
    Api::<IPPool>::all(cp.client())
        .create(&PostParams::default(), &pool)
        .await?;
    let faults = tempfile::tempdir()?;
    let dir = tempfile::tempdir()?;
    let mut d = Daemon::start(
        &host,
        dir.path(),
        DaemonOpts {
            kubeconfig: cp.kubeconfig_path(),
            node_name: "node-s",
            env: vec![
                ("IP_AUTODETECTION_METHOD", "interface=eth0".into()),
                ("TORTIE_TEST_FAULTS", faults.path().display().to_string()),
            ],
        },
    );
    d.wait_readiness(READY, |code, _| code == 200);
    let stall = faults.path().join("dataplane_policy");
    std::fs::write(&stall, "stall")?;
    // A pass already under way when the fault appeared may still commit: let it end.
    tokio::time::sleep(Duration::from_millis(500)).await;

    create_pod(&cp.client(), "default", "late", "node-s", &[]).await?;
    let pod_ns = NetNs::new("np-late")?;
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=late";
    let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
    let t0 = Instant::now();
    let out = support::cni::run_cnitool(&bin, &conf, "add", args, &pod_ns.path()).await?;
    let waited = t0.elapsed();
    eprintln!(
        "ADD with the policy loop stalled failed after {waited:?}: {}",
        out.stdout
    );
    assert!(
        !out.ok,
        "ADD answered success without policy: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("policy") || out.stderr.contains("policy"),
        "the error names policy: {} {}",
        out.stdout,
        out.stderr
    );
    assert!(
        waited >= Duration::from_secs(9),
        "bounded wait of 10 s: {waited:?}"
    );
    let veth = host_veth_name("default", "late");
    assert!(
        !host
            .ns
            .exec(&["ip", "link", "show", &veth])
            .status
            .success(),
        "the failed ADD left {veth}"
    );
    let handle = tortie::ipam::pod_handle(&support::cni::cnitool_container_id(&pod_ns.path()));
    let held = support::cni::allocations(&cp.client()).await?;
    assert!(!held.contains_key(&handle), "{handle} still holds {held:?}");

    std::fs::remove_file(&stall)?;
    let ip = {
        let out = support::cni::run_cnitool(&bin, &conf, "add", args, &pod_ns.path()).await?;
        anyhow::ensure!(
            out.ok,
            "ADD after the loop recovered: {} {}",
            out.stdout,
            out.stderr
        );
        out.json()["ips"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let dispatch = host
        .ns
        .exec_ok(&["nft", "list", "map", "inet", "tortie-policy", "to-wl"])?;
    assert!(dispatch.contains(&veth), "{ip}: {dispatch}");
    let (status, _) = d.terminate();
    assert_eq!(status.code(), Some(0));
    Ok(())
}
