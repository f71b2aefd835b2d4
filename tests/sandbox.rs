// The multi-node sandbox end to end, with real packets: three node namespaces on a VNet bridge
// running `tortie node` against a real control plane, pods networked by the sandbox agent via
// the installed CNI plugin, captures on the bridge ports, egress to an "internet" namespace.

mod support;

#[allow(dead_code)]
#[path = "../examples/sandbox/mod.rs"]
mod sandbox;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sandbox::cluster::{AgentMode, Sandbox, set_vxlan_mode};
use sandbox::layout::{INET_IP, Layout, NodeSpec};
use sandbox::{pcap, pods};
use support::process::{Guarded, pid_alive};

const POD_NS: &str = "default";
const CONVERGE: Duration = Duration::from_secs(60);

/// A unique short prefix and root-link slot per sandbox (tests of one binary run in parallel).
fn new_layout(nodes: u8) -> Layout {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let prefix = format!("ts{}{n}", pid % 100_000);
    let slot = (1 + (pid * 4 + n) % 62) as u8;
    let dir = PathBuf::from(format!("/run/tortie-sandbox-test-{pid}-{n}"));
    Layout::new(&prefix, dir, slot, 0, "node", nodes)
}

async fn start(nodes: u8) -> Sandbox {
    Sandbox::up(
        new_layout(nodes),
        Path::new(env!("CARGO_BIN_EXE_tortie")),
        AgentMode::Thread,
    )
    .await
    .expect("sandbox up")
}

/// Everything `up` made is gone once the sandbox is dropped.
fn assert_nothing_left(layout: &Layout, pids: &[u32]) {
    let prefix = format!("{}-", layout.prefix);
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let link = Command::new("ip")
        .args(["link", "show", &layout.root_if])
        .output()
        .expect("ip link");
    assert!(
        !link.status.success(),
        "root link {} left behind",
        layout.root_if
    );
    assert!(
        !layout.base_dir.exists(),
        "{} left behind",
        layout.base_dir.display()
    );
    for &pid in pids {
        assert!(!pid_alive(pid), "process {pid} still running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_reach_the_api_server_and_the_internet_and_down_leaves_nothing() {
    let mut sb = start(3).await;
    let client = sb.client().await.expect("client over the VNet address");
    let nodes: Vec<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone())
        .list(&Default::default())
        .await
        .expect("list nodes")
        .items;
    for spec in &sb.layout.nodes {
        let node = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(&spec.name))
            .unwrap_or_else(|| panic!("no Node {}", spec.name));
        let addrs = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.clone())
            .unwrap_or_default();
        assert!(
            addrs
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == spec.ip.to_string()),
            "Node {} lacks InternalIP {}: {addrs:?}",
            spec.name,
            spec.ip
        );
        // The node reaches the internet through its default route, and the API server over
        // the VNet (what its daemon and agent use).
        assert!(
            pods::ping_until(
                &spec.netns,
                IpAddr::V4(INET_IP),
                &[],
                Duration::from_secs(5)
            )
            .await,
            "{} cannot ping the internet namespace",
            spec.name
        );
        let api = format!("{}:{}", sb.layout.root_ip, sb.layout.api_port);
        let reached = pods::in_netns(&spec.netns, || {
            std::net::TcpStream::connect_timeout(
                &api.parse().expect("addr"),
                Duration::from_secs(3),
            )
        })
        .expect("netns thread");
        assert!(
            reached.is_ok(),
            "{} cannot reach the API server at {api}",
            spec.name
        );
    }
    // The internet namespace has no way back to pod addresses.
    let routes = sandbox::net::exec(&sb.layout.inet_ns, &["ip", "route", "get", "10.244.0.1"]);
    assert!(
        routes.is_err(),
        "internet namespace routes pod addresses: {routes:?}"
    );
    let pools = sandbox::cluster::ippools(&client)
        .get(sandbox::layout::POOL_NAME)
        .await
        .expect("default pool");
    assert_eq!(pools.data["spec"]["vxlanMode"], "Always");
    assert_eq!(pools.data["spec"]["natOutgoing"], true);
    sb.check_running()
        .expect("tortie node processes are running");

    let layout = sb.layout.clone();
    let pids: Vec<u32> = sb.nodes.iter().map(Guarded::pid).collect();
    drop(sb);
    assert_nothing_left(&layout, &pids);
}

/// Captures frames on bridge ports of the VNet namespace into files while alive.
struct Capture {
    procs: Vec<Guarded>,
    files: Vec<PathBuf>,
}

impl Capture {
    async fn start(layout: &Layout, nodes: &[&NodeSpec], tag: &str) -> Capture {
        let mut procs = Vec::new();
        let mut files = Vec::new();
        for n in nodes {
            let file = layout.base_dir.join(format!("{tag}-{}.pcap", n.port));
            let mut cmd = Command::new("ip");
            cmd.args([
                "netns",
                "exec",
                &layout.vnet_ns,
                "tcpdump",
                "-n",
                "-U",
                "--immediate-mode",
                "-i",
                &n.port,
                "-w",
            ])
            .arg(&file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(file.with_extension("log")).expect("tcpdump log"));
            procs.push(Guarded::spawn("tcpdump", cmd).expect("tcpdump"));
            files.push(file);
        }
        // tcpdump opens the file once it is capturing.
        for f in &files {
            for _ in 0..50 {
                if f.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Capture { procs, files }
    }

    fn finish(mut self) -> Vec<pcap::Packet> {
        tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(300)));
        for p in &mut self.procs {
            p.stop();
        }
        let mut all = Vec::new();
        for f in &self.files {
            let bytes = std::fs::read(f).expect("read capture");
            eprintln!(
                "capture {}: {} bytes; tcpdump: {}",
                f.display(),
                bytes.len(),
                std::fs::read_to_string(f.with_extension("log"))
                    .unwrap_or_default()
                    .trim()
            );
            all.extend(pcap::ipv4_packets(&bytes).expect("parse capture"));
        }
        all
    }
}

fn in_pool(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 10 && o[1] == 244
}

struct TestPod {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    node: NodeSpec,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_on_three_nodes_talk_over_vxlan_egress_is_natted_and_cross_subnet_skips_the_tunnel() {
    let mut sb = start(3).await;
    let client = sb.client().await.expect("client");
    let layout = sb.layout.clone();

    let mut pods_ = Vec::new();
    for (i, node) in layout.nodes.iter().enumerate() {
        let name = format!("p{}", i + 1);
        pods::create_pod(&client, POD_NS, &name, &node.name)
            .await
            .expect("create pod");
        pods_.push((name, node.clone()));
    }
    let mut tp = Vec::new();
    for (name, node) in pods_ {
        let ip = match pods::wait_pod_ip(&client, POD_NS, &name, CONVERGE).await {
            Ok(ip) => ip,
            Err(e) => {
                let _ = sb.check_running();
                panic!(
                    "{e:#}\n--- tortie node log ({}) ---\n{}",
                    node.name,
                    sandbox::cluster::tail(&node.dir.join("tortie.log"))
                );
            }
        };
        assert!(in_pool(ip), "pod {name} got {ip}, outside the pool");
        tp.push(TestPod {
            netns: pods::pod_netns(&layout, POD_NS, &name),
            name,
            ip,
            node,
        });
    }

    // ---- VXLAN Always: ICMP and TCP both ways between all three nodes, on a capture ----
    let node_refs: Vec<&NodeSpec> = layout.nodes.iter().collect();
    let cap = Capture::start(&layout, &node_refs, "always").await;
    for a in &tp {
        for b in &tp {
            if a.name == b.name {
                continue;
            }
            assert!(
                pods::ping_until(&a.netns, IpAddr::V4(b.ip), &[], CONVERGE).await,
                "{} ({}, {}) cannot ping {} ({}, {})",
                a.name,
                a.ip,
                a.node.name,
                b.name,
                b.ip,
                b.node.name
            );
            let seen = tokio::task::block_in_place(|| {
                pods::tcp_exchange(&b.netns, IpAddr::V4(b.ip), &a.netns)
            })
            .unwrap_or_else(|e| panic!("TCP {} -> {}: {e:#}", a.name, b.name));
            assert_eq!(
                seen,
                IpAddr::V4(a.ip),
                "pod-to-pod TCP {} -> {} was masqueraded",
                a.name,
                b.name
            );
        }
    }
    let packets = cap.finish();
    let node_ips: Vec<Ipv4Addr> = layout.nodes.iter().map(|n| n.ip).collect();
    let on_wire: Vec<_> = packets
        .iter()
        .filter(|p| in_pool(p.src) || in_pool(p.dst))
        .collect();
    assert!(
        on_wire.is_empty(),
        "pod addresses outside the tunnel: {:?}",
        &on_wire[..on_wire.len().min(5)]
    );
    for (i, x) in node_ips.iter().enumerate() {
        for y in &node_ips[i + 1..] {
            let n = packets
                .iter()
                .filter(|p| p.udp_dst == Some(pcap::VXLAN_PORT))
                .filter(|p| (p.src == *x && p.dst == *y) || (p.src == *y && p.dst == *x))
                .filter(|p| p.inner.is_some_and(|(s, d)| in_pool(s) && in_pool(d)))
                .count();
            let vxlan: Vec<_> = packets
                .iter()
                .filter(|p| p.udp_dst == Some(pcap::VXLAN_PORT))
                .take(4)
                .collect();
            assert!(
                n > 0,
                "no VXLAN (UDP 4789) packets carrying pod traffic between {x} and {y}; {} IPv4 packets captured, VXLAN ones: {vxlan:?}",
                packets.len()
            );
        }
    }

    // ---- MTU: 1450 in the pod, and a full-size don't-fragment packet crosses nodes ----
    for p in &tp {
        assert_eq!(
            pods::mtu(&p.netns, "eth0").expect("mtu"),
            1450,
            "pod {} MTU",
            p.name
        );
    }
    let (a, b) = (&tp[0], &tp[2]);
    assert!(
        pods::ping_until(
            &a.netns,
            IpAddr::V4(b.ip),
            &["-M", "do", "-s", "1422"],
            Duration::from_secs(5)
        )
        .await,
        "a 1450-byte DF ping from {} to {} did not cross",
        a.name,
        b.name
    );
    assert!(
        !pods::ping(&a.netns, IpAddr::V4(b.ip), &["-M", "do", "-s", "1423"]),
        "a 1451-byte DF ping left the pod: its MTU is not enforced"
    );

    // ---- Egress: the internet sees the node IP; it has no route back to pods ----
    for p in &tp {
        assert!(
            pods::ping_until(&p.netns, IpAddr::V4(INET_IP), &[], CONVERGE).await,
            "pod {} cannot ping the internet namespace",
            p.name
        );
        let seen = tokio::task::block_in_place(|| {
            pods::tcp_exchange(&layout.inet_ns, IpAddr::V4(INET_IP), &p.netns)
        })
        .unwrap_or_else(|e| panic!("TCP {} -> internet: {e:#}", p.name));
        assert_eq!(
            seen,
            IpAddr::V4(p.node.ip),
            "internet saw {} from pod {}",
            seen,
            p.name
        );
    }

    // ---- CrossSubnet: node-1 and node-2 share 198.18.0.0/24, node-3 is in 198.18.1.0/24 ----
    set_vxlan_mode(&client, "CrossSubnet")
        .await
        .expect("CrossSubnet");
    let (p1, p2, p3) = (&tp[0], &tp[1], &tp[2]);
    assert_eq!(p1.node.subnet(), p2.node.subnet());
    assert_ne!(p1.node.subnet(), p3.node.subnet());
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let r = sandbox::net::exec(&p1.node.netns, &["ip", "route", "get", &p2.ip.to_string()])
            .unwrap_or_default();
        if r.contains("dev eth0") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-1 still routes pod {} through {r:?} {CONVERGE:?} after CrossSubnet",
            p2.ip
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cap = Capture::start(&layout, &[&p1.node], "crosssubnet").await;
    for (a, b) in [(p1, p2), (p2, p1), (p1, p3), (p3, p1)] {
        assert!(
            pods::ping_until(&a.netns, IpAddr::V4(b.ip), &[], CONVERGE).await,
            "CrossSubnet: {} cannot ping {}",
            a.name,
            b.name
        );
    }
    let packets = cap.finish();
    let direct = packets
        .iter()
        .filter(|p| (p.src == p1.ip && p.dst == p2.ip) || (p.src == p2.ip && p.dst == p1.ip))
        .count();
    assert!(
        direct > 0,
        "CrossSubnet: no unencapsulated pod traffic between same-subnet nodes"
    );
    let same_subnet_tunnel = packets
        .iter()
        .filter(|p| p.udp_dst == Some(pcap::VXLAN_PORT))
        .filter(|p| {
            (p.src == p1.node.ip && p.dst == p2.node.ip)
                || (p.src == p2.node.ip && p.dst == p1.node.ip)
        })
        .count();
    assert_eq!(
        same_subnet_tunnel, 0,
        "CrossSubnet still encapsulates between same-subnet nodes"
    );
    let tunneled = packets
        .iter()
        .filter(|p| p.udp_dst == Some(pcap::VXLAN_PORT))
        .filter(|p| {
            (p.src == p1.node.ip && p.dst == p3.node.ip)
                || (p.src == p3.node.ip && p.dst == p1.node.ip)
        })
        .count();
    assert!(
        tunneled > 0,
        "CrossSubnet: no VXLAN between {} and {}",
        p1.node.ip,
        p3.node.ip
    );
    assert!(
        !packets.iter().any(|p| p.src == p3.ip || p.dst == p3.ip),
        "CrossSubnet: pod {} on the other subnet appeared outside the tunnel",
        p3.ip
    );

    // ---- Pod deletion: DEL runs, the namespace goes, the object is confirmed gone ----
    pods::delete_pod(&client, POD_NS, &p3.name, Duration::from_secs(30))
        .await
        .expect("delete pod");
    assert!(
        !Path::new("/run/netns").join(&p3.netns).exists(),
        "pod namespace {} left after delete",
        p3.netns
    );

    let pids: Vec<u32> = sb.nodes.iter().map(Guarded::pid).collect();
    drop(sb);
    assert_nothing_left(&layout, &pids);
}

/// `down` after a crashed `up`: the state file alone leads to every namespace, the root link,
/// recorded processes and directories, with nothing of the crashed run's cleanup code running.
#[test]
fn down_removes_what_a_crashed_up_recorded() {
    let layout = new_layout(2);
    std::fs::create_dir_all(&layout.base_dir).expect("base dir");
    let _backstop = TeardownOnDrop(layout.clone());
    let mut rec = sandbox::state::Recorder::new(&layout.state_file(), &layout).expect("recorder");
    sandbox::net::build(&layout, &mut rec).expect("topology");
    // An orphaned daemon in the root namespace (recorded) and one inside a node (found there).
    let mut orphan = Command::new("bash")
        .args(["-c", "exec -a tortie-sandbox-orphan sleep 600"])
        .spawn()
        .expect("orphan");
    rec.pid(orphan.id()).expect("record pid");
    let mut in_node = Command::new("ip")
        .args(["netns", "exec", &layout.nodes[0].netns, "sleep", "600"])
        .spawn()
        .expect("process in node netns");
    // A pod namespace the agent would have made (not in the state file: found by prefix).
    let pod_ns = format!("{}-default-p1", layout.pod_netns_prefix());
    sandbox::net::ip(&["netns", "add", &pod_ns]).expect("pod netns");
    drop(rec); // the crash: nothing is cleaned up here

    let state = sandbox::state::load(&layout.state_file())
        .expect("read state")
        .expect("state file exists");
    let removed = sandbox::state::teardown(&state, &layout.state_file());
    assert!(removed.iter().any(|r| r.contains(&pod_ns)), "{removed:?}");
    // Reap the two children (teardown killed them) so their pids are really gone.
    let _ = orphan.wait();
    let _ = in_node.wait();
    assert_nothing_left(&layout, &[orphan.id(), in_node.id()]);
}

/// If an assertion fails before `down` ran, the namespaces must still go.
struct TeardownOnDrop(Layout);

impl Drop for TeardownOnDrop {
    fn drop(&mut self) {
        let file = self.0.state_file();
        if let Ok(Some(state)) = sandbox::state::load(&file) {
            sandbox::state::teardown(&state, &file);
        }
    }
}

/// As kubelet restarts a DaemonSet pod, the sandbox restarts a `tortie node` that died: one
/// SIGKILLed in the middle of a burst of pod creations comes back, and every pod ends up
/// with an address of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_daemon_killed_during_a_pod_burst_is_restarted_and_no_address_is_shared() {
    const PODS: usize = 24;
    let mut sb = start(2).await;
    let client = sb.client().await.expect("client");
    let layout = sb.layout.clone();
    let names: Vec<(String, String)> = (0..PODS)
        .map(|i| (format!("burst-{i}"), layout.nodes[i % 2].name.clone()))
        .collect();
    let creator = {
        let (client, names) = (client.clone(), names.clone());
        tokio::spawn(async move {
            for (name, node) in &names {
                pods::create_pod(&client, POD_NS, name, node)
                    .await
                    .expect("create pod");
            }
        })
    };
    // Mid-burst: the first node's daemon is killed without a chance to clean up.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let victim = sb.nodes[0].pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL tortie node");
    creator.await.expect("pod creation");

    let mut ips = std::collections::BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while ips.len() < PODS {
        sb.supervise().expect("supervise");
        for (name, _) in &names {
            if ips.contains_key(name) {
                continue;
            }
            if let Ok(ip) = pods::wait_pod_ip(&client, POD_NS, name, Duration::from_millis(1)).await
            {
                ips.insert(name.clone(), ip);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {PODS} pods got an address; node-1 log:\n{}",
            ips.len(),
            sandbox::cluster::tail(&layout.nodes[0].dir.join("tortie.log"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sb.restarts >= 1, "the killed daemon was not restarted");
    assert!(pid_alive(sb.nodes[0].pid()), "the restarted daemon runs");
    let unique: std::collections::BTreeSet<Ipv4Addr> = ips.values().copied().collect();
    assert_eq!(
        unique.len(),
        PODS,
        "an address was handed out twice: {ips:?}"
    );
    assert!(ips.values().all(|ip| in_pool(*ip)), "{ips:?}");
}
