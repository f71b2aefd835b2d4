// Benchmark B: iperf3 TCP throughput pod-to-pod across the two tortie nodes, against the same
// topology built by hand (VXLAN VNI 4096, port 4789, MTU 1450, learning off, static FDB, veth
// underlay), once bare and once with a NAT table like tortie's (which makes every pod flow
// conntracked). Runs alternate between the three so that load from other work on the shared
// machine hits all alike.

use std::time::Duration;

use anyhow::{Context, bail};

use super::cluster::Cluster;
use crate::support::{NetNs, veth_pair};

/// One iperf3 client run of `secs` seconds from `client` to `server_ip`; bits per second
/// received by the server side.
fn iperf(client: &NetNs, server: &NetNs, server_ip: &str, secs: usize) -> anyhow::Result<f64> {
    let mut srv = server.spawn(&[
        "iperf3",
        "-s",
        "-1",
        "-B",
        server_ip,
        "--logfile",
        "/dev/null",
    ])?;
    // The server needs a moment to bind; retry the client until it connects.
    let mut last = String::new();
    for _ in 0..50 {
        let out = client.exec(&["iperf3", "-c", server_ip, "-t", &secs.to_string(), "-J"]);
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() {
            srv.stop();
            return Ok(bps);
        }
        last = format!(
            "{} {}",
            json["error"],
            String::from_utf8_lossy(&out.stderr).trim()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    srv.stop();
    bail!("iperf3 to {server_ip} never ran: {last}")
}

/// The notes' hand-built test bed: node namespaces joined by a veth underlay (MTU 1500,
/// 172.30.0.0/16) with a VXLAN device as Calico configures it (VNI 4096, port 4789, learning
/// off, MTU 1450, static neighbour + FDB, block route via the peer's tunnel address onlink),
/// and a pod namespace per node behind a veth with proxy ARP, as tortie's CNI plumbs pods.
struct HandBuilt {
    nodes: [NetNs; 2],
    pods: [NetNs; 2],
}

const HAND_UNDERLAY: [&str; 2] = ["172.30.0.1", "172.30.0.2"];
const HAND_BLOCK: [&str; 2] = ["10.99.0.0/26", "10.99.1.0/26"];
const HAND_TUNNEL: [&str; 2] = ["10.99.0.1", "10.99.1.1"];
const HAND_POD: [&str; 2] = ["10.99.0.2", "10.99.1.2"];
const NAT_TABLE: [&[&str]; 7] = [
    &["nft", "add", "table", "ip", "handnat"],
    &[
        "nft",
        "add",
        "chain",
        "ip",
        "handnat",
        "post",
        "{",
        "type",
        "nat",
        "hook",
        "postrouting",
        "priority",
        "110",
        ";",
        "policy",
        "accept",
        ";",
        "}",
    ],
    &[
        "nft",
        "add",
        "rule",
        "ip",
        "handnat",
        "post",
        "ip",
        "saddr",
        "10.99.0.0/16",
        "ip",
        "daddr",
        "!=",
        "10.99.0.0/16",
        "masquerade",
        "fully-random",
    ],
    &[
        "nft",
        "add",
        "chain",
        "ip",
        "handnat",
        "rawpre",
        "{",
        "type",
        "filter",
        "hook",
        "prerouting",
        "priority",
        "-300",
        ";",
        "}",
    ],
    &[
        "nft", "add", "rule", "ip", "handnat", "rawpre", "udp", "dport", "4789", "notrack",
    ],
    &[
        "nft", "add", "chain", "ip", "handnat", "rawout", "{", "type", "filter", "hook", "output",
        "priority", "-300", ";", "}",
    ],
    &[
        "nft", "add", "rule", "ip", "handnat", "rawout", "udp", "dport", "4789", "notrack",
    ],
];
const HAND_MACS: [&str; 2] = ["66:00:00:00:00:01", "66:00:00:00:00:02"];

impl HandBuilt {
    /// `nat`: add tortie's NAT shape (masquerade out of the pool, VXLAN port not tracked).
    fn new(nat: bool) -> anyhow::Result<HandBuilt> {
        let hb = HandBuilt {
            nodes: [NetNs::new("oab-hand-n1")?, NetNs::new("oab-hand-n2")?],
            pods: [NetNs::new("oab-hand-p1")?, NetNs::new("oab-hand-p2")?],
        };
        if nat {
            for node in &hb.nodes {
                for argv in NAT_TABLE {
                    node.exec_ok(argv)?;
                }
            }
        }
        veth_pair(&hb.nodes[0], "eth0", &hb.nodes[1], "eth0")?;
        for i in 0..2 {
            let (node, pod, peer) = (&hb.nodes[i], &hb.pods[i], 1 - i);
            let local = HAND_UNDERLAY[i];
            let batch = [
                format!("ip addr add {local}/16 dev eth0"),
                // Proxy ARP for 169.254.1.1 needs a route toward it on the node.
                format!("ip route add default via {} dev eth0", HAND_UNDERLAY[peer]),
                format!(
                    "ip link add vx0 address {} mtu 1450 type vxlan id 4096 dstport 4789 local {local} dev eth0 nolearning",
                    HAND_MACS[i]
                ),
                format!("ip addr add {}/32 dev vx0", HAND_TUNNEL[i]),
                "ip link set vx0 up".to_owned(),
                format!(
                    "ip neigh replace {} lladdr {} dev vx0 nud permanent",
                    HAND_TUNNEL[peer], HAND_MACS[peer]
                ),
                format!(
                    "bridge fdb append {} dev vx0 dst {} self permanent",
                    HAND_MACS[peer], HAND_UNDERLAY[peer]
                ),
                format!(
                    "ip route add {} via {} dev vx0 onlink",
                    HAND_BLOCK[peer], HAND_TUNNEL[peer]
                ),
                "sysctl -qw net.ipv4.ip_forward=1".to_owned(),
            ];
            for cmd in &batch {
                let argv: Vec<&str> = cmd.split_whitespace().collect();
                node.exec_ok(&argv)?;
            }
            veth_pair(node, "hpod0", pod, "eth0")?;
            for cmd in [
                "ip link set hpod0 mtu 1450".to_owned(),
                "sysctl -qw net.ipv4.conf.hpod0.proxy_arp=1".to_owned(),
                "sysctl -qw net.ipv4.neigh.hpod0.proxy_delay=0".to_owned(),
                format!("ip route add {}/32 dev hpod0 scope link", HAND_POD[i]),
            ] {
                let argv: Vec<&str> = cmd.split_whitespace().collect();
                node.exec_ok(&argv)?;
            }
            for cmd in [
                "ip link set eth0 mtu 1450".to_owned(),
                format!("ip addr add {}/32 dev eth0", HAND_POD[i]),
                "ip route add 169.254.1.1 dev eth0 scope link".to_owned(),
                "ip route add default via 169.254.1.1 dev eth0".to_owned(),
            ] {
                let argv: Vec<&str> = cmd.split_whitespace().collect();
                pod.exec_ok(&argv)?;
            }
        }
        Ok(hb)
    }
}

/// Mean, median, min and max in Gbit/s (the median resists one run hit by outside load).
fn gbits(samples: &[f64]) -> [f64; 4] {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    let mean = sorted.iter().sum::<f64>() / n as f64;
    [mean, median, sorted[0], sorted[n - 1]].map(|v| v / 1e9)
}

pub async fn run(c: &Cluster, runs: usize, secs: usize) -> anyhow::Result<()> {
    let pods = [NetNs::new("oab-pa")?, NetNs::new("oab-pb")?];
    let ip_a = c.cni_add(0, "iperf-client", &pods[0].path()).await?;
    let ip_b = c.cni_add(1, "iperf-server", &pods[1].path()).await?;
    let mtu = pods[0].exec_ok(&["cat", "/sys/class/net/eth0/mtu"])?;
    // The route to the other node's block comes with the pod's block; wait for it.
    let mut reachable = false;
    for _ in 0..300 {
        if pods[0]
            .exec(&["ping", "-c", "1", "-W", "1", &ip_b])
            .status
            .success()
        {
            reachable = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !reachable {
        bail!("pod {ip_a} on {} never reached pod {ip_b}", c.ns(0).name());
    }
    let beds = [HandBuilt::new(false)?, HandBuilt::new(true)?];
    for bed in &beds {
        bed.pods[0]
            .exec_ok(&["ping", "-c", "1", "-W", "2", HAND_POD[1]])
            .context("hand-built bed: pod to pod ping")?;
    }
    println!(
        "pod-to-pod TCP throughput, iperf3 {runs} x {secs} s each, pod MTU {}, hand-built vxlan and pod MTU 1450",
        mtu.trim()
    );
    let mut series = [vec![], vec![], vec![]];
    for round in 0..runs {
        let t = iperf(&pods[0], &pods[1], &ip_b, secs)?;
        let h = iperf(&beds[0].pods[0], &beds[0].pods[1], HAND_POD[1], secs)?;
        let n = iperf(&beds[1].pods[0], &beds[1].pods[1], HAND_POD[1], secs)?;
        println!(
            "  run {}: tortie {:.2}   hand-built {:.2}   hand-built+nat {:.2} Gbit/s",
            round + 1,
            t / 1e9,
            h / 1e9,
            n / 1e9
        );
        for (s, v) in series.iter_mut().zip([t, h, n]) {
            s.push(v);
        }
    }
    let names = [
        "tortie VXLAN (pod to pod)",
        "hand-built VXLAN (pod to pod)",
        "hand-built + NAT table (conntrack)",
    ];
    let means = series.each_ref().map(|s| gbits(s));
    for (name, [mean, median, min, max]) in names.iter().zip(means) {
        println!(
            "{name:<36} mean {mean:>6.2} Gbit/s  median {median:.2}  min {min:.2}  max {max:.2}"
        );
    }
    let pct = |a: f64, b: f64| a / b * 100.0;
    println!(
        "{:<36} mean {:.1} %, median {:.1} % (target >= 97 %); vs hand-built + NAT: mean {:.1} %, median {:.1} %",
        "ratio tortie / hand-built",
        pct(means[0][0], means[1][0]),
        pct(means[0][1], means[1][1]),
        pct(means[0][0], means[2][0]),
        pct(means[0][1], means[2][1]),
    );
    Ok(())
}
