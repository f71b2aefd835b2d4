// What the policy table tells and does beyond allow/deny, against the real kernel: the
// compiled `inet tortie-policy` table is loaded into a test node namespace whose two pods
// hang off `cali*` veths; Log rules reach tortie over nflog, drop and staged-audit counters
// read back per policy, and the conntrack cut stops a live connection a new policy denies.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::NetNs;
use support::netns::plumb_pod;
use tortie::dataplane::nflog::{self, LoggedPacket};
use tortie::dataplane::nft::{Driver, Outcome, Runner, counters};
use tortie::metrics::{BuildInfo, Metrics};
use tortie::node::policy_counters::{Counted, CounterMetrics, Ledger};
use tortie::node::policy_cut::cut_denied;
use tortie::policy::Model;
use tortie::policy::cluster::{ClusterObjects, build_model};
use tortie::policy::compile::{CompileOptions, FAMILY, TABLE, compile};

const PODS: [(&str, &str, &str); 2] = [
    // name, ip, host interface (namespace "prod", label app=<name>)
    ("web", "10.0.0.1", "caliweb0"),
    ("db", "10.0.0.2", "calidb00"),
];
const TIMEOUT: Duration = Duration::from_millis(500);

/// The node, its uplink namespace (the node's default route: proxy ARP answers the pods'
/// gateway only with a route to it) and the pods.
fn bed(label: &str) -> (NetNs, NetNs, Vec<NetNs>) {
    let node = NetNs::new(label).unwrap();
    node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let uplink = NetNs::new(&format!("{label}up")).unwrap();
    support::veth_pair(&node, "up0", &uplink, "eth0").unwrap();
    node.exec_ok(&["ip", "addr", "add", "198.18.0.1/24", "dev", "up0"])
        .unwrap();
    node.exec_ok(&["ip", "route", "add", "default", "via", "198.18.0.2"])
        .unwrap();
    let pods = PODS
        .iter()
        .map(|(name, ip, iface)| {
            let ns = NetNs::new(&format!("{label}{name}")).unwrap();
            plumb_pod(&node, &ns, iface, ip, None).unwrap();
            ns
        })
        .collect();
    (node, uplink, pods)
}

fn objects(policies: &[Value], staged: &[Value]) -> ClusterObjects {
    let mut c = ClusterObjects::default();
    c.namespaces
        .push(serde_json::from_value(json!({"metadata": {"name": "prod"}})).unwrap());
    for (name, ip, _) in PODS {
        c.pods.push(
            serde_json::from_value(json!({
                "metadata": {"namespace": "prod", "name": name, "labels": {"app": name}},
                "spec": {"containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
            }))
            .unwrap(),
        );
    }
    for p in policies {
        c.network_policies
            .push(serde_json::from_value(p.clone()).unwrap());
    }
    for p in staged {
        c.staged_network_policies
            .push(serde_json::from_value(p.clone()).unwrap());
    }
    c
}

fn model(c: &ClusterObjects) -> Model {
    let mut m = build_model(c);
    assert!(m.diagnostics.is_empty(), "{:?}", m.diagnostics);
    for ep in &mut m.endpoints {
        let (.., iface) = PODS.iter().find(|p| p.0 == ep.name()).unwrap();
        ep.interface = Some(iface.to_string());
    }
    m
}

/// Loads the compiled table into `node` as one transaction (replacing it when present).
fn load(node: &NetNs, m: &Model) {
    let script = tortie::dataplane::nft::render::full(&compile(m, &CompileOptions::default()));
    node.nft_load(&script);
}

/// A TCP server in `ns` answering each connection with "ok" and echoing lines after that.
fn serve(ns: &NetNs, ip: &str, port: u16) {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let l = ns.run(move || TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let _ = w.write_all(b"ok");
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { return };
                    if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn connect(src: &NetNs, dst_ip: &str, port: u16) -> Option<TcpStream> {
    let addr: SocketAddr = format!("{dst_ip}:{port}").parse().unwrap();
    src.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).ok()?;
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).ok()?;
        Some(s)
    })
    .unwrap()
}

fn np(name: &str, spec: Value) -> Value {
    json!({"metadata": {"namespace": "prod", "name": name}, "spec": spec})
}

#[test]
fn a_log_rule_writes_one_structured_line_per_packet_read_over_nflog() {
    let (node, _uplink, pods) = bed("pobslog");
    serve(&pods[0], "10.0.0.1", 8080);
    let c = objects(
        &[np(
            "web-in",
            json!({"selector": "app == 'web'", "types": ["Ingress"], "ingress": [
                {"action": "Log", "protocol": "TCP"},
                {"action": "Allow", "protocol": "TCP", "destination": {"ports": [8080]}}]}),
        )],
        &[],
    );
    load(&node, &model(&c));
    let mut reader = node
        .run(|| nflog::Reader::open(nflog::GROUP))
        .unwrap()
        .unwrap();
    assert!(connect(&pods[1], "10.0.0.1", 8080).is_some(), "db → web");
    // The connection's first packet (established ones are accepted before the policy).
    let mut got: Vec<LoggedPacket> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while got.is_empty() && Instant::now() < deadline {
        got = reader.read().unwrap();
    }
    let p = got.first().expect("a logged packet within 3 s");
    assert_eq!(p.group, nflog::GROUP);
    assert_eq!(p.src, Some("10.0.0.2".parse().unwrap()));
    assert_eq!(p.dst, Some("10.0.0.1".parse().unwrap()));
    assert_eq!((p.protocol, p.dst_port), (Some(6), Some(8080)));

    // The line it becomes names the policy and the rule.
    let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || SinkWriter(sink.clone()))
        .finish();
    tracing::subscriber::with_default(subscriber, || nflog::emit(p));
    let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line: Value = serde_json::from_str(lines[0]).unwrap();
    let f = &line["fields"];
    assert_eq!(f["policy"], "prod/web-in", "{line}");
    assert_eq!(f["direction"], "ingress");
    assert_eq!(f["rule"], 0);
    assert_eq!(f["src"], "10.0.0.2");
    assert_eq!(f["dst_port"], 8080);
}

struct SinkWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SinkWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn denied_packets_count_per_policy_and_a_staged_policy_counts_without_dropping() {
    let (node, _uplink, pods) = bed("pobscnt");
    serve(&pods[0], "10.0.0.1", 8080);
    serve(&pods[1], "10.0.0.2", 9090);
    serve(&pods[1], "10.0.0.2", 5432);
    let c = objects(
        &[np(
            "db-in",
            json!({"selector": "app == 'db'", "types": ["Ingress"], "ingress": [
                {"action": "Deny", "protocol": "TCP", "destination": {"ports": [9090]}},
                {"action": "Allow"}]}),
        )],
        // Staged: web would admit nothing on TCP but port 1.
        &[np(
            "web-lock",
            json!({"selector": "app == 'web'", "types": ["Ingress"], "ingress": [
                {"action": "Allow", "protocol": "TCP", "destination": {"ports": [1]}}]}),
        )],
    );
    // Through the driver, as the daemon writes it: later changes are incremental.
    let mut driver = Driver::new(Runner::default());
    let written = node
        .run(|| driver.reconcile(&compile(&model(&c), &CompileOptions::default())))
        .unwrap()
        .unwrap();
    assert_eq!(written, Outcome::Created);
    let metrics = Metrics::new(&BuildInfo::CURRENT).unwrap();
    let counter_metrics = CounterMetrics::register(&metrics).unwrap();
    let mut ledger = Ledger::default();
    let raw = || node.run(|| counters::read(FAMILY, TABLE)).unwrap().unwrap();
    let read = |ledger: &mut Ledger| ledger.update(&raw());
    let first = read(&mut ledger);
    let denied = Counted::Denied {
        policy: "prod/db-in".into(),
        direction: "ingress",
    };
    let staged = Counted::StagedWouldDeny {
        policy: "prod/staged:web-lock".into(),
    };
    assert_eq!((first[&denied], first[&staged]), (0, 0), "{first:?}");

    for _ in 0..3 {
        assert!(connect(&pods[0], "10.0.0.2", 9090).is_none(), "denied");
    }
    assert!(connect(&pods[0], "10.0.0.2", 5432).is_some(), "allowed");
    for _ in 0..2 {
        assert!(
            connect(&pods[1], "10.0.0.1", 8080).is_some(),
            "staged must not drop"
        );
    }
    let second = read(&mut ledger);
    // One SYN per attempt within the 500 ms connect timeout (the first retransmit is at 1 s).
    assert_eq!(second[&denied], 3, "{second:?}");
    // Once per new flow: established packets are accepted before the audit.
    assert_eq!(second[&staged], 2, "{second:?}");
    // A change to the policy rewrites its chain in place; its Deny rule's counter keeps
    // its count (named counters outlive the rules that count into them).
    let deny_rule = "pi-np.prod.db-in/0/deny";
    let before: Vec<_> = raw().into_iter().filter(|c| c.name == deny_rule).collect();
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].packets, 3);
    let mut changed = c.clone();
    let spec = &mut changed.network_policies[0].spec;
    let mut more: tortie::api::NetworkPolicy = serde_json::from_value(np(
        "db-in",
        json!({"selector": "app == 'db'", "types": ["Ingress"], "ingress": [
            {"action": "Deny", "protocol": "TCP", "destination": {"ports": [9090]}},
            {"action": "Deny", "protocol": "UDP", "destination": {"ports": [9090]}},
            {"action": "Allow"}]}),
    ))
    .unwrap();
    std::mem::swap(spec, &mut more.spec);
    let updated = node
        .run(|| driver.reconcile(&compile(&model(&changed), &CompileOptions::default())))
        .unwrap()
        .unwrap();
    assert_eq!(updated, Outcome::Updated);
    let script = driver.transactions().last().unwrap().to_string();
    assert!(
        script.contains("flush chain inet tortie-policy pi-np.prod.db-in"),
        "{script}"
    );
    assert!(!script.contains("delete table"), "{script}");
    let after: Vec<_> = raw().into_iter().filter(|c| c.name == deny_rule).collect();
    assert_eq!(
        (after[0].packets, after[0].handle),
        (3, before[0].handle),
        "the counter was reset by an incremental change"
    );
    assert!(connect(&pods[0], "10.0.0.2", 9090).is_none(), "denied");
    let third = read(&mut ledger);
    assert_eq!(third[&denied], 1, "{third:?}");
    counter_metrics.record(&first);
    counter_metrics.record(&second);
    let text = metrics.encode().unwrap();
    assert!(
        text.contains(
            "tortie_policy_denied_packets_total{direction=\"ingress\",policy=\"prod/db-in\"} 3"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "tortie_policy_staged_would_deny_packets_total{policy=\"prod/staged:web-lock\"} 2"
        ),
        "{text}"
    );
}

/// Sends a line every 50 ms on `s` for `dur`; how many echoes came back after `from`.
fn echoes_after(s: &mut TcpStream, dur: Duration, from: Duration) -> usize {
    s.set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let start = Instant::now();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut late = 0;
    while start.elapsed() < dur {
        if s.write_all(b"ping\n").is_err() {
            break;
        }
        let mut line = String::new();
        if reader.read_line(&mut line).is_ok_and(|n| n > 0) && start.elapsed() >= from {
            late += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    late
}

#[test]
fn with_the_cut_an_open_connection_stops_within_a_second_of_a_deny_and_without_it_continues() {
    let (node, _uplink, pods) = bed("pobscut");
    serve(&pods[0], "10.0.0.1", 7000);
    let open = objects(&[], &[]);
    let deny = objects(
        &[np(
            "web-in",
            json!({"selector": "app == 'web'", "types": ["Ingress"], "ingress": [
                {"action": "Allow", "protocol": "TCP", "destination": {"ports": [8080]}}]}),
        )],
        &[],
    );
    for with_cut in [false, true] {
        load(&node, &model(&open));
        let mut s = connect(&pods[1], "10.0.0.1", 7000).expect("open before the policy");
        assert!(echoes_after(&mut s, Duration::from_millis(300), Duration::ZERO) > 0);
        let m = model(&deny);
        load(&node, &m);
        if with_cut {
            let report = node.run(|| cut_denied(&m)).unwrap().unwrap();
            assert!(report.cut >= 1, "{report:?}");
        }
        // Echoes in the second after the first one: none with the cut, all without.
        let late = echoes_after(&mut s, Duration::from_secs(2), Duration::from_secs(1));
        if with_cut {
            assert_eq!(late, 0, "the connection still works with the cut");
        } else {
            assert!(late >= 10, "only {late} echoes without the cut");
        }
        // New connections are denied either way.
        assert!(connect(&pods[1], "10.0.0.1", 7000).is_none());
    }
}
