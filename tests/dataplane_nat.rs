// NAT outgoing and the VXLAN NOTRACK rule against real kernels: a node namespace running the
// nft driver, pod namespaces behind it (natOutgoing pool 10.244.0.0/16, plain pool
// 10.245.0.0/16) and an "internet" namespace on 198.18.10.0/24 with no route back to pods.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use support::netns::plumb_pod;
use support::{NetNs, veth_pair};
use tortie::calc::nat::{NatModel, NatPool, NatSettings, desired_nat};
use tortie::dataplane::nft::{self, NatTable, Outcome};

const NODE_IP: &str = "198.18.10.1";
const INET_IP: &str = "198.18.10.2";
const POD_A: &str = "10.244.0.5";
const POD_B: &str = "10.244.0.6";
/// In the pool without natOutgoing.
const POD_C: &str = "10.245.0.7";

fn pools(extra: &[(&str, bool)]) -> Vec<NatPool> {
    let mut list = vec![("10.244.0.0/16", true), ("10.245.0.0/16", false)];
    list.extend_from_slice(extra);
    list.iter()
        .map(|(cidr, nat_outgoing)| NatPool {
            cidr: cidr.parse().unwrap(),
            nat_outgoing: *nat_outgoing,
            disabled: false,
        })
        .collect()
}

fn model(vxlan_enabled: bool) -> NatModel {
    desired_nat(
        &pools(&[]),
        NatSettings {
            vxlan_port: 4789,
            vxlan_enabled,
        },
    )
}

/// A node with pods behind it (Calico-style /32 + 169.254.1.1 plumbing) and an internet
/// namespace behind it. The namespaces (and so every link) go away on Drop.
struct Bed {
    node: NetNs,
    inet: NetNs,
    pods: Vec<NetNs>,
}

impl Bed {
    fn new(pod_ips: &[&str]) -> Result<Bed> {
        let node = NetNs::new("nat-node")?;
        let inet = NetNs::new("nat-inet")?;
        veth_pair(&node, "inet0", &inet, "eth0")?;
        node.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "inet0",
        ])?;
        // A default route also lets proxy ARP answer for 169.254.1.1.
        node.exec_ok(&["ip", "route", "add", "default", "via", INET_IP])?;
        node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        inet.exec_ok(&["ip", "addr", "add", &format!("{INET_IP}/24"), "dev", "eth0"])?;
        let mut pods = Vec::new();
        for (i, ip) in pod_ips.iter().enumerate() {
            let pod = NetNs::new("nat-pod")?;
            let host_if = format!("cali{i}");
            plumb_pod(&node, &pod, &host_if, ip, None)?;
            pods.push(pod);
        }
        Ok(Bed { node, inet, pods })
    }

    fn reconcile(&self, table: &mut NatTable, model: &NatModel) -> Result<(Outcome, Duration)> {
        let started = Instant::now();
        let outcome = self.node.run(|| table.reconcile(model))??;
        Ok((outcome, started.elapsed()))
    }

    fn nft_list(&self, ns: &NetNs) -> String {
        String::from_utf8_lossy(
            &ns.exec(&["nft", "list", "table", "inet", nft::TABLE])
                .stdout,
        )
        .into_owned()
    }
}

/// A TCP server that answers every line with the peer address it sees.
struct PeerServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PeerServer {
    fn start(ns: &NetNs, ip: &str) -> Result<PeerServer> {
        let bind: SocketAddr = format!("{ip}:0").parse()?;
        // The socket belongs to the namespace it was made in, whichever thread uses it later.
        let listener = ns.run(|| TcpListener::bind(bind))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        std::thread::spawn(move || answer_peer(stream, peer));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(PeerServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

fn answer_peer(stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        if line.is_err() || writeln!(writer, "{peer}").is_err() {
            return;
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection from `ns` to a PeerServer; `ask` sends data and returns the peer address
/// the server saw.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(ns: &NetNs, to: SocketAddr, timeout: Duration) -> Result<Client> {
        let stream = ns.run(|| TcpStream::connect_timeout(&to, timeout))??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Client {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    fn ask(&mut self) -> Result<SocketAddr> {
        writeln!(self.writer, "who am I")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        line.trim()
            .parse()
            .with_context(|| format!("server answered {line:?}"))
    }
}

fn seen_ip(ns: &NetNs, server: &PeerServer) -> Result<String> {
    let mut c = Client::connect(ns, server.addr, Duration::from_secs(3))?;
    Ok(c.ask()?.ip().to_string())
}

#[test]
fn pod_egress_is_masqueraded_to_the_node_ip_but_pod_to_pod_and_plain_pools_are_not() -> Result<()> {
    let bed = Bed::new(&[POD_A, POD_B, POD_C])?;
    let (pod_a, pod_b, pod_c) = (&bed.pods[0], &bed.pods[1], &bed.pods[2]);
    let internet = PeerServer::start(&bed.inet, INET_IP)?;
    let at_pod_b = PeerServer::start(pod_b, POD_B)?;

    // Without the table the internet cannot answer a pod: the check below can fail.
    let before = Client::connect(pod_a, internet.addr, Duration::from_millis(800));
    assert!(before.is_err(), "pod reached the internet without NAT");

    let mut table = NatTable::new();
    let (outcome, took) = bed.reconcile(&mut table, &model(true))?;
    assert_eq!(outcome, Outcome::Created);
    eprintln!("first reconcile (create): {took:?}");

    assert_eq!(
        seen_ip(pod_a, &internet)?,
        NODE_IP,
        "internet sees the node IP"
    );
    assert_eq!(
        seen_ip(pod_a, &at_pod_b)?,
        POD_A,
        "pod to pod keeps the pod IP"
    );
    assert!(
        Client::connect(pod_c, internet.addr, Duration::from_millis(800)).is_err(),
        "a pool without natOutgoing must not be masqueraded (the internet has no route back)"
    );

    // The child `nft` inherited the setns'd thread's namespace: the table exists in the
    // node namespace and nowhere else.
    assert!(
        bed.nft_list(&bed.node).contains("masquerade"),
        "{}",
        bed.nft_list(&bed.node)
    );
    for other in [&bed.inet, pod_a] {
        assert!(
            bed.nft_list(other).is_empty(),
            "table leaked into {}",
            other.name()
        );
    }
    let root = std::process::Command::new("nft")
        .args(["list", "table", "inet", nft::TABLE])
        .output()?;
    assert!(
        !root.status.success(),
        "table leaked into the root namespace"
    );
    eprintln!("rules:\n{}", bed.nft_list(&bed.node));
    Ok(())
}

#[test]
fn masquerade_never_gives_udp_the_vxlan_source_port() -> Result<()> {
    const EPHEMERAL_FLOWS: usize = 500;
    const FIXED_PORT_FLOWS: usize = 40;
    let bed = Bed::new(&[POD_A])?;
    let pod = &bed.pods[0];
    let mut table = NatTable::new();
    bed.reconcile(&mut table, &model(true))?;

    let inet_sockets: Vec<UdpSocket> = bed.inet.run(|| {
        (0..=FIXED_PORT_FLOWS)
            .map(|_| UdpSocket::bind((INET_IP, 0)))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    for s in &inet_sockets {
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
    }
    let recv = |s: &UdpSocket| -> Option<SocketAddr> {
        let mut buf = [0u8; 64];
        s.recv_from(&mut buf).ok().map(|(_, from)| from)
    };

    // (a) Many flows from the pod's own port 4789, one per destination port: without a
    // port range or random mapping the kernel would keep 4789.
    let from_4789 = pod.run(|| UdpSocket::bind((POD_A, 4789)))??;
    let mut mapped_4789 = Vec::new();
    for s in &inet_sockets[1..] {
        from_4789.send_to(b"x", s.local_addr()?)?;
        if let Some(from) = recv(s) {
            mapped_4789.push(from);
        }
    }
    // (b) Many flows from distinct ephemeral ports to one destination.
    let senders: Vec<UdpSocket> = pod.run(|| {
        (0..EPHEMERAL_FLOWS)
            .map(|_| UdpSocket::bind((POD_A, 0)))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    let target = inet_sockets[0].local_addr()?;
    let mut mapped = Vec::new();
    for s in &senders {
        s.send_to(b"x", target)?;
        if let Some(from) = recv(&inet_sockets[0]) {
            mapped.push((s.local_addr()?.port(), from));
        }
    }
    assert!(
        mapped_4789.len() >= FIXED_PORT_FLOWS * 9 / 10,
        "{mapped_4789:?}"
    );
    assert!(
        mapped.len() >= EPHEMERAL_FLOWS * 9 / 10,
        "only {} arrived",
        mapped.len()
    );

    let all: Vec<SocketAddr> = mapped_4789
        .iter()
        .chain(mapped.iter().map(|(_, a)| a))
        .copied()
        .collect();
    assert!(all.iter().all(|a| a.ip().to_string() == NODE_IP), "{all:?}");
    assert!(
        all.iter().all(|a| a.port() != 4789),
        "masquerade used port 4789"
    );
    // The range is in force: over 1024–65535, 500+ random ports would put ~30 below 4790
    // (chance of none ≈ e^-30).
    let lowest = all.iter().map(|a| a.port()).min().unwrap();
    assert!(
        lowest >= 4790,
        "port {lowest} is outside the masquerade range"
    );
    // Fully random: ports are not kept, and flows from 4789 spread out.
    let kept = mapped.iter().filter(|(orig, a)| *orig == a.port()).count();
    assert!(
        kept <= 2,
        "{kept} flows kept their source port: not fully random"
    );
    let distinct: HashSet<u16> = mapped_4789.iter().map(|a| a.port()).collect();
    assert!(distinct.len() >= mapped_4789.len() - 2, "{mapped_4789:?}");
    eprintln!(
        "udp flows: {} masqueraded, lowest port {lowest}, highest {}",
        all.len(),
        all.iter().map(|a| a.port()).max().unwrap()
    );
    Ok(())
}

/// Sends one UDP datagram from `ns` (bound to `from`) to `to`.
fn send_udp(ns: &NetNs, from: &str, to: SocketAddr) -> Result<()> {
    let s = ns.run(|| UdpSocket::bind((from, 0)))??;
    s.send_to(b"vxlan-ish", to)?;
    Ok(())
}

fn conntrack_udp_dport(node: &NetNs, port: u16) -> Vec<String> {
    let out = node.exec(&["conntrack", "-L", "-p", "udp", "--dport", &port.to_string()]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn vxlan_udp_is_not_conntracked() -> Result<()> {
    let bed = Bed::new(&[])?;
    let mut table = NatTable::new();
    bed.reconcile(&mut table, &model(true))?;
    let listing = bed.nft_list(&bed.node);
    assert_eq!(
        listing.matches("udp dport 4789 counter packets").count(),
        2,
        "{listing}"
    );

    let traffic = |port: u16| -> Result<()> {
        // Into the node (raw prerouting) and out of it (raw output).
        send_udp(&bed.inet, INET_IP, format!("{NODE_IP}:{port}").parse()?)?;
        send_udp(&bed.node, NODE_IP, format!("{INET_IP}:{port}").parse()?)?;
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    };
    traffic(4789)?;
    traffic(4790)?;
    // Conntrack is on in this namespace (the NAT chain needs it): the neighbouring port is
    // tracked both ways, the VXLAN port not at all.
    assert_eq!(
        conntrack_udp_dport(&bed.node, 4790).len(),
        2,
        "tracking is on"
    );
    assert!(
        conntrack_udp_dport(&bed.node, 4789).is_empty(),
        "{:?}",
        conntrack_udp_dport(&bed.node, 4789)
    );
    let listing = bed.nft_list(&bed.node);
    assert!(
        !listing.contains("udp dport 4789 counter packets 0 "),
        "rules saw the packets: {listing}"
    );

    // The rule, not luck, is what keeps them out: without VXLAN the port is tracked.
    assert_eq!(
        bed.reconcile(&mut table, &model(false))?.0,
        Outcome::Updated
    );
    assert!(!bed.nft_list(&bed.node).contains("notrack"));
    traffic(4789)?;
    assert_eq!(conntrack_udp_dport(&bed.node, 4789).len(), 2);
    Ok(())
}

fn rule_handle(node: &NetNs, chain: &str, needle: &str) -> Result<String> {
    let listing = node.exec_ok(&["nft", "-a", "list", "chain", "inet", nft::TABLE, chain])?;
    for line in listing.lines().filter(|l| l.contains(needle)) {
        if let Some(handle) = line.rsplit("# handle ").next() {
            return Ok(handle.trim().to_string());
        }
    }
    bail!("no rule with {needle:?} in {listing}")
}

#[test]
fn drift_is_repaired_by_one_reconcile_and_nothing_else_is_touched() -> Result<()> {
    let bed = Bed::new(&[POD_A])?;
    let pod = &bed.pods[0];
    let internet = PeerServer::start(&bed.inet, INET_IP)?;
    // Someone else's nft state in the node: a table of another name and one whose name is
    // close to tortie's.
    let foreign = "table ip foreign {
  set blocked { type ipv4_addr; elements = { 203.0.113.9 }; }
  chain fwd_in { type filter hook forward priority 0; policy accept; ip daddr @blocked drop; }
}
table inet tortie {
  chain c { ip saddr 192.0.2.1 drop; }
}
";
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), foreign)?;
    bed.node
        .exec_ok(&["nft", "-f", &file.path().display().to_string()])?;
    let foreign_state = || {
        bed.node
            .exec_ok(&["nft", "-a", "list", "ruleset"])
            .map(|all| {
                all.split("table ")
                    .filter(|t| !t.starts_with(&format!("inet {} ", nft::TABLE)))
                    .collect::<Vec<_>>()
                    .join("table ")
            })
    };
    let before = foreign_state()?;
    assert!(before.contains("203.0.113.9") && before.contains("table inet tortie "));

    let mut table = NatTable::new();
    let desired = model(true);
    let mut timings = Vec::new();
    let (o, t) = bed.reconcile(&mut table, &desired)?;
    assert_eq!(o, Outcome::Created);
    timings.push(("create", t));
    for _ in 0..5 {
        let (o, t) = bed.reconcile(&mut table, &desired)?;
        assert_eq!(o, Outcome::InSync, "a second reconcile writes nothing");
        timings.push(("in sync", t));
    }
    // A restarted daemon (fresh driver) sees the table as it should be and leaves it.
    assert_eq!(
        bed.reconcile(&mut NatTable::new(), &desired)?.0,
        Outcome::InSync
    );

    // The whole table deleted by hand.
    bed.node
        .exec_ok(&["nft", "delete", "table", "inet", nft::TABLE])?;
    assert!(Client::connect(pod, internet.addr, Duration::from_millis(800)).is_err());
    let (o, t) = bed.reconcile(&mut table, &desired)?;
    assert_eq!(o, Outcome::Repaired);
    timings.push(("repair deleted table", t));
    assert_eq!(seen_ip(pod, &internet)?, NODE_IP);

    // One rule deleted by hand.
    let handle = rule_handle(&bed.node, nft::RAW_OUTPUT_CHAIN, "notrack")?;
    bed.node.exec_ok(&[
        "nft",
        "delete",
        "rule",
        "inet",
        nft::TABLE,
        nft::RAW_OUTPUT_CHAIN,
        "handle",
        &handle,
    ])?;
    let (o, t) = bed.reconcile(&mut table, &desired)?;
    assert_eq!(o, Outcome::Repaired);
    timings.push(("repair deleted rule", t));
    assert_eq!(bed.nft_list(&bed.node).matches("notrack").count(), 2);

    // An element added by hand, and a rule inserted by hand.
    bed.node.exec_ok(&[
        "nft",
        "add",
        "element",
        "inet",
        nft::TABLE,
        nft::ALL_POOLS_V4,
        "{ 8.8.8.0/24 }",
    ])?;
    assert_eq!(bed.reconcile(&mut table, &desired)?.0, Outcome::Repaired);
    assert!(!bed.nft_list(&bed.node).contains("8.8.8.0"));
    bed.node.exec_ok(&[
        "nft",
        "insert",
        "rule",
        "inet",
        nft::TABLE,
        nft::NAT_CHAIN,
        "accept",
    ])?;
    assert_eq!(bed.reconcile(&mut table, &desired)?.0, Outcome::Repaired);
    // An object of a kind tortie never makes.
    let map = format!(
        "add map inet {} stray {{ type ipv4_addr : ipv4_addr; }}",
        nft::TABLE
    );
    bed.node.exec_ok(&["nft", &map])?;
    assert_eq!(bed.reconcile(&mut table, &desired)?.0, Outcome::Repaired);
    assert!(!bed.nft_list(&bed.node).contains("stray"));
    assert_eq!(bed.reconcile(&mut table, &desired)?.0, Outcome::InSync);
    assert_eq!(seen_ip(pod, &internet)?, NODE_IP);

    // A pool change rewrites the sets.
    let grown = desired_nat(
        &pools(&[("172.20.0.0/16", true)]),
        NatSettings {
            vxlan_port: 4789,
            vxlan_enabled: true,
        },
    );
    let (o, t) = bed.reconcile(&mut table, &grown)?;
    assert_eq!(o, Outcome::Updated);
    timings.push(("update pools", t));
    assert!(bed.nft_list(&bed.node).contains("172.20.0.0/16"));

    assert_eq!(foreign_state()?, before, "foreign nft state changed");

    // Removal takes exactly tortie's table.
    assert!(bed.node.run(|| table.remove())??);
    assert!(bed.nft_list(&bed.node).is_empty());
    assert!(
        !bed.node.run(|| table.remove())??,
        "second remove finds nothing"
    );
    assert_eq!(
        foreign_state()?,
        before,
        "foreign nft state changed by remove"
    );
    for (what, t) in timings {
        eprintln!("reconcile {what}: {:.1} ms", t.as_secs_f64() * 1e3);
    }
    Ok(())
}

#[test]
fn pool_change_replaces_the_table_without_cutting_open_connections() -> Result<()> {
    let bed = Bed::new(&[POD_A])?;
    let pod = &bed.pods[0];
    let internet = PeerServer::start(&bed.inet, INET_IP)?;
    let mut table = NatTable::new();
    bed.reconcile(&mut table, &model(true))?;
    let mut open = Client::connect(pod, internet.addr, Duration::from_secs(3))?;
    let first = open.ask()?;
    assert_eq!(first.ip().to_string(), NODE_IP);

    for extra in ["172.20.0.0/16", "172.21.0.0/16", "172.22.0.0/16"] {
        let m = desired_nat(
            &pools(&[(extra, true)]),
            NatSettings {
                vxlan_port: 4789,
                vxlan_enabled: true,
            },
        );
        assert_eq!(bed.reconcile(&mut table, &m)?.0, Outcome::Updated);
        let again = open
            .ask()
            .context("the open connection after a table replace")?;
        assert_eq!(
            again, first,
            "same mapping: the conntrack entry survived the replace"
        );
    }
    Ok(())
}

#[test]
fn a_pools_nat_outgoing_toggle_changes_one_set_element_not_the_table() -> Result<()> {
    const POD_D: &str = "10.250.0.9";
    let bed = Bed::new(&[POD_D])?;
    let pod = &bed.pods[0];
    let internet = PeerServer::start(&bed.inet, INET_IP)?;
    let with = |nat_outgoing| {
        desired_nat(
            &pools(&[("10.250.0.0/16", nat_outgoing)]),
            NatSettings {
                vxlan_port: 4789,
                vxlan_enabled: true,
            },
        )
    };
    let mut table = NatTable::new();
    assert_eq!(bed.reconcile(&mut table, &with(false))?.0, Outcome::Created);
    assert!(
        Client::connect(pod, internet.addr, Duration::from_millis(800)).is_err(),
        "not masqueraded yet: the internet has no route back"
    );
    let before = table.driver.transactions().count();

    assert_eq!(bed.reconcile(&mut table, &with(true))?.0, Outcome::Updated);
    let applied: Vec<String> = table
        .driver
        .transactions()
        .skip(before)
        .map(String::from)
        .collect();
    assert_eq!(
        applied,
        [format!(
            "add element inet {} {} {{ 10.250.0.0/16 }}\n",
            nft::TABLE,
            nft::MASQ_POOLS_V4
        )],
        "one transaction, one element"
    );
    assert_eq!(seen_ip(pod, &internet)?, NODE_IP, "masqueraded now");

    assert_eq!(bed.reconcile(&mut table, &with(false))?.0, Outcome::Updated);
    let last = table.driver.transactions().last().unwrap_or_default();
    assert_eq!(
        last,
        format!(
            "delete element inet {} {} {{ 10.250.0.0/16 }}\n",
            nft::TABLE,
            nft::MASQ_POOLS_V4
        )
    );
    // The kernel agrees with what the driver believes: a drift check finds nothing.
    assert_eq!(bed.reconcile(&mut table, &with(false))?.0, Outcome::InSync);
    Ok(())
}
