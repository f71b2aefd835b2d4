// The policy compiler against the real kernel: the compiled `inet tortie-policy` table is
// loaded into a test node namespace whose pods hang off `cali*` veths (Calico's plumbing),
// and real TCP, UDP and ICMP flows between every pair of pods must be allowed or dropped
// exactly as the evaluator (the reference `tortie policy explain` uses) says.

mod support;

#[path = "policy_gen/mod.rs"]
mod policy_gen;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use serde_json::{Value, json};
use support::NetNs;
use support::netns::plumb_pod;
use tortie::policy::cluster::{ClusterObjects, build_model};
use tortie::policy::compile::{CompileOptions, compile};
use tortie::policy::{Flow, Model, Protocol, evaluate};

const PODS: [(&str, &str, &str, &str, &str); 3] = [
    // namespace, name, ip, app label, host interface
    ("prod", "web", "10.0.0.1", "web", "caliweb0"),
    ("prod", "db", "10.0.0.2", "db", "calidb00"),
    ("dev", "tool", "10.0.1.2", "tool", "calitool"),
];
const TIMEOUT: Duration = Duration::from_millis(700);

fn cluster() -> ClusterObjects {
    let mut c = ClusterObjects::default();
    for (ns, team) in [("prod", "blue"), ("dev", "red")] {
        c.namespaces.push(
            serde_json::from_value(json!({"metadata": {"name": ns, "labels": {"team": team}}}))
                .unwrap(),
        );
    }
    for (ns, name, ip, app, _) in PODS {
        c.pods.push(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name, "labels": {"app": app}},
                "spec": {"containers": [{"name": "c", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
            }))
            .unwrap(),
        );
    }
    let knp = json!({
        "metadata": {"namespace": "prod", "name": "db-from-web"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                              "ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}]}
    });
    c.k8s_policies.push(serde_json::from_value(knp).unwrap());
    let gnp = json!({
        "metadata": {"name": "red-not-to-db"},
        "spec": {"order": 10, "namespaceSelector": "team == 'red'",
                 "egress": [{"action": "Deny", "destination": {"selector": "app == 'db'"}},
                            {"action": "Allow"}]}
    });
    c.global_network_policies
        .push(serde_json::from_value(gnp).unwrap());
    let np: Value = json!({
        "metadata": {"namespace": "prod", "name": "web-in"},
        "spec": {"selector": "app == 'web'",
                 "ingress": [
                    {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}},
                    {"action": "Allow", "protocol": "TCP",
                     "source": {"namespaceSelector": "team == 'red'"}, "destination": {"ports": ["8080:8081"]}},
                    {"action": "Allow", "protocol": "UDP", "source": {"nets": ["10.0.0.0/24"]},
                     "destination": {"ports": [53, 5353]}}
                 ]}
    });
    c.network_policies.push(serde_json::from_value(np).unwrap());
    c
}

fn model() -> Model {
    let mut m = build_model(&cluster());
    assert!(m.diagnostics.is_empty(), "{:?}", m.diagnostics);
    for ep in &mut m.endpoints {
        let (.., iface) = PODS.iter().find(|p| p.1 == ep.name()).unwrap();
        ep.interface = Some(iface.to_string());
    }
    m
}

/// A TCP listener on 8080, 8081 and 9090 and a UDP echo on 53, each created inside `ns` (sockets
/// keep their namespace) and served from plain threads.
fn serve(ns: &NetNs, ip: &str) {
    for port in [8080u16, 8081, 9090] {
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let l = ns.run(move || TcpListener::bind(addr)).unwrap().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let _ = s.write_all(b"ok");
            }
        });
    }
    let addr: SocketAddr = format!("{ip}:53").parse().unwrap();
    let u = ns.run(move || UdpSocket::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = u.recv_from(&mut buf) {
            let _ = u.send_to(&buf[..n], from);
        }
    });
}

fn probe(src: &NetNs, dst_ip: &str, proto: Protocol, port: u16) -> bool {
    let dst = dst_ip.to_string();
    match proto {
        Protocol::TCP => src
            .run(move || {
                let addr: SocketAddr = format!("{dst}:{port}").parse().unwrap();
                match TcpStream::connect_timeout(&addr, TIMEOUT) {
                    Ok(mut s) => {
                        s.set_read_timeout(Some(TIMEOUT)).unwrap();
                        let mut b = [0u8; 2];
                        s.read_exact(&mut b).is_ok()
                    }
                    Err(_) => false,
                }
            })
            .unwrap(),
        Protocol::UDP => src
            .run(move || {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s.send_to(b"hi", format!("{dst}:{port}")).unwrap();
                let mut b = [0u8; 8];
                s.recv_from(&mut b).is_ok()
            })
            .unwrap(),
        _ => src
            .exec(&["ping", "-c", "1", "-W", "1", dst_ip])
            .status
            .success(),
    }
}

#[test]
fn compiled_table_in_the_kernel_decides_every_flow_like_the_evaluator() {
    let (node, _uplink, pods) = bed("polnode");

    let m = model();
    let table = compile(&m, &CompileOptions::default());
    let script = tortie::dataplane::nft::render::full(&table);
    load(&node, &script);

    let cells: [(Protocol, u16); 5] = [
        (Protocol::TCP, 8080),
        (Protocol::TCP, 9090),
        (Protocol::UDP, 53),
        (Protocol::ICMP, 0),
        (Protocol::TCP, 8081),
    ];
    let (mut diff, mut allowed, mut total) = (Vec::new(), 0, 0);
    for (si, src) in PODS.iter().enumerate() {
        for dst in PODS.iter() {
            if src.1 == dst.1 {
                continue;
            }
            for (proto, port) in cells {
                let mut flow =
                    Flow::new(src.2.parse().unwrap(), dst.2.parse().unwrap(), proto, port);
                if proto == Protocol::ICMP {
                    flow.icmp_type = Some(8);
                    flow.icmp_code = Some(0);
                }
                let want = evaluate(&m, &flow).allowed;
                let got = probe(&pods[si], dst.2, proto, port);
                total += 1;
                allowed += usize::from(want);
                if want != got {
                    diff.push(format!(
                        "{}/{} -> {}/{} {port}/{proto}: evaluator {want}, kernel {got}",
                        src.0, src.1, dst.0, dst.1
                    ));
                }
            }
        }
    }
    eprintln!("{total} flows probed, {allowed} allowed");
    // A workload interface the table does not know is dropped (fail closed)...
    let stray = NetNs::new("polstray").unwrap();
    plumb_pod(&node, &stray, "calistray", "10.0.2.9", None).unwrap();
    assert!(
        !probe(&stray, "10.0.0.1", Protocol::ICMP, 0),
        "unknown cali interface passed"
    );
    assert!(!probe(&stray, "10.0.0.1", Protocol::TCP, 8080));
    // ...while the host reaches its pods without their ingress policy (kubelet probes):
    // db only admits web, on http and dns.
    assert!(
        probe(&node, "10.0.0.2", Protocol::TCP, 9090),
        "host → pod was policed"
    );
    // A pod sending from an address that is not its own is dropped on the way in.
    let web = &pods[0];
    web.exec_ok(&["ip", "addr", "add", "10.0.0.77/32", "dev", "eth0"])
        .unwrap();
    let spoofed = web
        .run(|| {
            let s = UdpSocket::bind("10.0.0.77:0").unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            for _ in 0..3 {
                s.send_to(b"spoof", "10.0.1.2:53").unwrap();
            }
            let mut b = [0u8; 8];
            s.recv_from(&mut b).is_ok()
        })
        .unwrap();
    assert!(!spoofed, "a spoofed datagram got an answer");
    let raw = node
        .exec_ok(&[
            "nft",
            "list",
            "counter",
            "inet",
            "tortie-policy",
            "raw-prerouting/anti-spoofing",
        ])
        .unwrap();
    assert!(raw.contains("packets 3 bytes"), "{raw}");
    assert!(
        probe(web, "10.0.1.2", Protocol::UDP, 53),
        "web's own address still works"
    );
    assert!(
        allowed > 0 && allowed < total,
        "{allowed} of {total} allowed: the table proves nothing"
    );
    assert!(
        diff.is_empty(),
        "kernel differs from the evaluator:\n{}\n\ntable:\n{script}",
        diff.join("\n")
    );
}

/// Loads `script` into `node` as one transaction (replacing the table when present).
fn load(node: &NetNs, script: &str) {
    node.nft_load(script);
}

/// Random Kubernetes policy sets (the oracle test's generator) compiled and loaded into the
/// kernel: every TCP and UDP flow between 9 pods on ports 80 and 81 is probed at once and
/// must match the evaluator (which itself matches cyclonus). SCTP is left to the oracle
/// test: std has no SCTP sockets.
#[test]
fn random_kubernetes_policies_in_the_kernel_match_the_evaluator() {
    use policy_gen::{NAMESPACES, PODS as GEN_PODS, pod_ip};
    let node = NetNs::new("polrnode").unwrap();
    node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let uplink = NetNs::new("polrup").unwrap();
    support::veth_pair(&node, "up0", &uplink, "eth0").unwrap();
    node.exec_ok(&["ip", "addr", "add", "198.18.0.1/24", "dev", "up0"])
        .unwrap();
    node.exec_ok(&["ip", "route", "add", "default", "via", "198.18.0.2"])
        .unwrap();
    let mut pods = Vec::new();
    for (ni, (ns, _)) in NAMESPACES.iter().enumerate() {
        for (pi, (pod, _)) in GEN_PODS.iter().enumerate() {
            let netns = NetNs::new(&format!("polr{ns}{pod}")).unwrap();
            let ip = pod_ip(ni, pi);
            plumb_pod(&node, &netns, &format!("cali{ni}{pi}"), &ip, None).unwrap();
            for port in [80u16, 81] {
                let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
                let l = netns.run(move || TcpListener::bind(addr)).unwrap().unwrap();
                std::thread::spawn(move || {
                    for mut s in l.incoming().flatten() {
                        let _ = s.write_all(b"ok");
                    }
                });
                let u = netns.run(move || UdpSocket::bind(addr)).unwrap().unwrap();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok((n, from)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(&buf[..n], from);
                    }
                });
            }
            pods.push((format!("{ns}/{pod}"), ip, format!("cali{ni}{pi}"), netns));
        }
    }
    let seeds: Vec<u64> = (0..16).map(|i| 20261202 + i * 7).collect();
    let mut failures = Vec::new();
    let (mut total, mut allowed) = (0, 0);
    for seed in seeds {
        let policies = policy_gen::policies(seed);
        let mut c = policy_gen::cluster();
        c.k8s_policies = policies
            .iter()
            .map(|p| serde_json::from_value(p.clone()).unwrap())
            .collect();
        let mut m = build_model(&c);
        for ep in &mut m.endpoints {
            let key = ep.key();
            ep.interface = pods.iter().find(|p| p.0 == key).map(|p| p.2.clone());
        }
        let script = tortie::dataplane::nft::render::full(&compile(&m, &CompileOptions::default()));
        load(&node, &script);
        // Flows of the previous set are established in conntrack and would be accepted as
        // such (live connections are kept, as in Calico): start each set from none.
        node.exec_ok(&["conntrack", "-F"]).unwrap();
        // Every cell at once: a denied probe costs a full timeout.
        let mut cells = Vec::new();
        for src in &pods {
            for dst in &pods {
                if src.0 == dst.0 {
                    continue;
                }
                for proto in [Protocol::TCP, Protocol::UDP] {
                    for port in [80u16, 81] {
                        cells.push((src, dst, proto, port));
                    }
                }
            }
        }
        let results: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = cells
                .iter()
                .map(|(src, dst, proto, port)| {
                    s.spawn(move || probe(&src.3, &dst.1, *proto, *port))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut diff = Vec::new();
        for ((src, dst, proto, port), got) in cells.iter().zip(results) {
            let flow = Flow::new(
                src.1.parse().unwrap(),
                dst.1.parse().unwrap(),
                *proto,
                *port,
            );
            let want = evaluate(&m, &flow).allowed;
            total += 1;
            allowed += usize::from(want);
            if want != got {
                diff.push(format!(
                    "  {} -> {} {port}/{proto}: evaluator {want}, kernel {got}",
                    src.0, dst.0
                ));
            }
        }
        if !diff.is_empty() {
            failures.push(format!(
                "seed {seed}: {} flows differ\n{}\npolicies: {}",
                diff.len(),
                diff.join("\n"),
                serde_json::to_string_pretty(&policies).unwrap()
            ));
        }
    }
    eprintln!("{total} kernel flows probed, {allowed} allowed");
    assert!(allowed > 0 && allowed < total);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A node namespace with an uplink (so proxy ARP answers for 169.254.1.1: the node needs a
/// route toward it) and the three pods of `PODS`, each serving TCP and UDP.
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
    let pods: Vec<NetNs> = PODS
        .iter()
        .map(|(_, name, ip, _, iface)| {
            let ns = NetNs::new(&format!("{label}{name}")).unwrap();
            plumb_pod(&node, &ns, iface, ip, None).unwrap();
            serve(&ns, ip);
            ns
        })
        .collect();
    (node, uplink, pods)
}

/// A probe: protocol, port, and the ICMP (type, code) for ICMP.
type Cell = (Protocol, u16, Option<(u8, u8)>);

/// Probes every (src, dst, cell) between the bed's pods at once; the flows where the kernel
/// and the evaluator disagree, and how many the evaluator allows of how many.
fn compare(m: &Model, pods: &[NetNs], cells: &[Cell]) -> (Vec<String>, usize, usize) {
    let mut work = Vec::new();
    for (si, src) in PODS.iter().enumerate() {
        for dst in PODS.iter() {
            if src.1 != dst.1 {
                for cell in cells {
                    work.push((si, src, dst, *cell));
                }
            }
        }
    }
    let got: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = work
            .iter()
            .map(|(si, _, dst, (proto, port, icmp))| {
                s.spawn(move || match icmp {
                    Some((t, c)) => {
                        // ping sends echo requests only; other types are left to the
                        // evaluator tests.
                        assert_eq!((*t, *c), (8, 0));
                        probe(&pods[*si], dst.2, Protocol::ICMP, 0)
                    }
                    None => probe(&pods[*si], dst.2, *proto, *port),
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (mut diff, mut allowed) = (Vec::new(), 0);
    for ((_, src, dst, (proto, port, icmp)), got) in work.iter().zip(got) {
        let mut flow = Flow::new(
            src.2.parse().unwrap(),
            dst.2.parse().unwrap(),
            *proto,
            *port,
        );
        if let Some((t, c)) = icmp {
            flow.icmp_type = Some(*t);
            flow.icmp_code = Some(*c);
        }
        let want = evaluate(m, &flow).allowed;
        allowed += usize::from(want);
        if want != got {
            diff.push(format!(
                "{}/{} -> {}/{} {port}/{proto}: evaluator {want}, kernel {got}",
                src.0, src.1, dst.0, dst.1
            ));
        }
    }
    (diff, allowed, work.len())
}

/// Calico-only constructs in the kernel: Pass to the profile, notSelector, notNets, Log,
/// notICMP (two rules: NOT(type AND code)), a NetworkSet matched by a selector, and a
/// global Deny ordered before a namespaced Allow.
#[test]
fn calico_only_rules_in_the_kernel_match_the_evaluator() {
    let (node, _uplink, pods) = bed("polc");
    let mut c = cluster();
    c.k8s_policies.clear();
    c.global_network_policies.clear();
    c.network_policies.clear();
    let np = |ns: &str, name: &str, spec: Value| -> tortie::api::NetworkPolicy {
        serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
            .unwrap()
    };
    c.network_sets.push(
        serde_json::from_value(json!({
            "metadata": {"namespace": "prod", "name": "tools", "labels": {"role": "trusted"}},
            "spec": {"nets": ["10.0.1.0/24"]}
        }))
        .unwrap(),
    );
    // web: Log everything, Pass from db (→ profile allows), ICMP except echo/0 type 8 code 1,
    // TCP 8080 from the trusted network set, everything else ends the tier.
    c.network_policies.push(np(
        "prod",
        "web",
        json!({
            "order": 100, "selector": "app == 'web'", "types": ["Ingress"],
            "ingress": [
                {"action": "Log"},
                {"action": "Pass", "source": {"selector": "app == 'db'"}},
                {"action": "Allow", "protocol": "ICMP", "notICMP": {"type": 8, "code": 1}},
                {"action": "Allow", "protocol": "TCP", "source": {"selector": "role == 'trusted'"},
                 "destination": {"ports": [8080]}}
            ]
        }),
    ));
    // db: egress anywhere but the tools net, UDP not to web.
    c.network_policies.push(np(
        "prod",
        "db-out",
        json!({
            "order": 100, "selector": "app == 'db'", "types": ["Egress"],
            "egress": [
                {"action": "Deny", "protocol": "UDP", "destination": {"selector": "app == 'web'"}},
                {"action": "Allow", "destination": {"notNets": ["10.0.1.0/24"]}}
            ]
        }),
    ));
    // tool: ingress from anything in prod but web (notSelector scopes to the namespace).
    c.network_policies.push(np("dev", "tool-in", json!({
        "selector": "app == 'tool'", "types": ["Ingress"],
        "ingress": [{"action": "Allow", "source": {"namespaceSelector": "team == 'blue'", "notSelector": "app == 'web'"}}]
    })));
    // A global Deny at order 1 beats everything: nothing reaches tool on 9090.
    c.global_network_policies.push(serde_json::from_value(json!({
        "metadata": {"name": "no-9090-to-tool"},
        "spec": {"order": 1, "selector": "app == 'tool'", "types": ["Ingress"],
                 "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [9090]}}]}
    })).unwrap());
    // Staged: db would only admit web on TCP 8080. Never enforced; counted.
    c.staged_network_policies.push(
        serde_json::from_value(json!({
            "metadata": {"namespace": "prod", "name": "db-lockdown"},
            "spec": {"selector": "app == 'db'", "types": ["Ingress"],
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "source": {"selector": "app == 'web'"}, "destination": {"ports": [8080]}}]}
        }))
        .unwrap(),
    );
    let mut m = build_model(&c);
    assert!(m.diagnostics.is_empty(), "{:?}", m.diagnostics);
    for ep in &mut m.endpoints {
        let (.., iface) = PODS.iter().find(|p| p.1 == ep.name()).unwrap();
        ep.interface = Some(iface.to_string());
    }
    let script = tortie::dataplane::nft::render::full(&compile(&m, &CompileOptions::default()));
    load(&node, &script);
    let cells = [
        (Protocol::TCP, 8080, None),
        (Protocol::TCP, 9090, None),
        (Protocol::UDP, 53, None),
        (Protocol::ICMP, 0, Some((8, 0))),
    ];
    let (diff, allowed, total) = compare(&m, &pods, &cells);
    eprintln!("{total} flows probed, {allowed} allowed");
    assert!(allowed > 0 && allowed < total);
    assert!(
        diff.is_empty(),
        "kernel differs from the evaluator:\n{}\n\ntable:\n{script}",
        diff.join("\n")
    );
    // The staged policy dropped nothing (the comparison above) but counted, once per new
    // flow, every flow to db the evaluator says it would deny.
    let mut would_deny = 0;
    for src in PODS.iter().filter(|p| p.1 != "db") {
        for (proto, port, icmp) in cells {
            let mut flow = Flow::new(
                src.2.parse().unwrap(),
                "10.0.0.2".parse().unwrap(),
                proto,
                port,
            );
            if let Some((t, c)) = icmp {
                flow.icmp_type = Some(t);
                flow.icmp_code = Some(c);
            }
            let v = evaluate(&m, &flow);
            let ing = v.ingress.unwrap();
            assert!(ing.allowed, "db's ingress is not enforced here");
            would_deny += ing.staged_would_deny.len();
        }
    }
    assert!(would_deny > 0);
    let audit = node
        .exec_ok(&[
            "nft",
            "list",
            "counter",
            "inet",
            "tortie-policy",
            "sti-calidb00-snp.prod.db-lockdown/would-deny",
        ])
        .unwrap();
    assert!(
        audit.contains(&format!("packets {would_deny} bytes")),
        "want {would_deny} would-deny packets:\n{audit}"
    );
    // The Log rule logged (the kernel counts what the log statement saw).
    let web = node
        .exec_ok(&[
            "nft",
            "list",
            "chain",
            "inet",
            "tortie-policy",
            "pi-np.prod.web",
        ])
        .unwrap();
    assert!(
        web.contains("log prefix \"prod/web ingress rule 0\" group 30"),
        "{web}"
    );
}

/// Every rule shape the compiler emits, for both families, is accepted by the kernel: a
/// dual-stack cluster with IPv6 nets, ICMPv6 and notICMP, ipVersion, source and named ports,
/// notPorts (numeric and named), notProtocol, Log, Pass, and a policy that fails closed.
#[test]
fn every_rule_shape_loads_for_both_families() {
    let node = NetNs::new("polshape").unwrap();
    let mut c = cluster();
    for (i, p) in c.pods.iter_mut().enumerate() {
        let status = p.status.as_mut().unwrap();
        let v4 = status.pod_ip.clone().unwrap();
        status.pod_ips = Some(vec![
            serde_json::from_value(json!({"ip": v4})).unwrap(),
            serde_json::from_value(json!({"ip": format!("fd00::{}", i + 1)})).unwrap(),
        ]);
    }
    c.global_network_sets.push(
        serde_json::from_value(json!({
            "metadata": {"name": "mixed", "labels": {"set": "mixed"}},
            "spec": {"nets": ["192.0.2.0/24", "192.0.2.7/32", "2001:db8::/32", "2001:db8:1::/48"]}
        }))
        .unwrap(),
    );
    let np: tortie::api::NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"namespace": "prod", "name": "shapes"},
        "spec": {"selector": "all()", "ingress": [
            {"action": "Log", "ipVersion": 6},
            {"action": "Allow", "protocol": "ICMPv6", "icmp": {"type": 128, "code": 0}},
            {"action": "Deny", "protocol": "ICMPv6", "notICMP": {"type": 1, "code": 4}},
            {"action": "Allow", "protocol": "ICMP", "notICMP": {"type": 8}},
            {"action": "Pass", "notProtocol": "UDP", "source": {"selector": "set == 'mixed'", "namespaceSelector": "global()"}},
            {"action": "Allow", "protocol": "TCP",
             "source": {"nets": ["10.0.0.0/8", "fd00::/8", "10.1.0.0/16"], "ports": ["1000:2000", 3000, "http"]},
             "destination": {"notPorts": ["http", 22, "9000:9100"], "notNets": ["fd00::1/128"]}},
            {"action": "Allow", "protocol": "UDP", "destination": {"ports": ["dns"], "selector": "app == 'db'"}},
            {"action": "Deny", "protocol": 132, "source": {"notSelector": "app == 'web'", "namespaceSelector": "all()"}}
        ]}
    }))
    .unwrap();
    c.network_policies.push(np);
    let broken: tortie::api::NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"namespace": "prod", "name": "broken"},
        "spec": {"selector": "app == 'db'", "egress": [{"action": "Allow", "destination": {"selector": "(("}}]}
    }))
    .unwrap();
    c.network_policies.push(broken);
    let mut m = build_model(&c);
    assert_eq!(m.diagnostics.len(), 1, "{:?}", m.diagnostics);
    for ep in &mut m.endpoints {
        let (.., iface) = PODS.iter().find(|p| p.1 == ep.name()).unwrap();
        ep.interface = Some(iface.to_string());
    }
    let table = compile(&m, &CompileOptions::default());
    assert!(table.sets.keys().any(|k| k.starts_with("s6-")));
    // Through the shared nft driver: written once, then its drift check (a JSON listing
    // compared with the model) must find it in sync, or every resync would rewrite it.
    let mut driver = tortie::dataplane::nft::Driver::new(Default::default());
    let first = node.run(|| driver.reconcile(&table)).unwrap().unwrap();
    assert_eq!(first, tortie::dataplane::nft::Outcome::Created);
    let again = node.run(|| driver.reconcile(&table)).unwrap().unwrap();
    assert_eq!(again, tortie::dataplane::nft::Outcome::InSync);
    // A pod's label change is applied in place: elements, its chains, unused policy
    // chains and sets removed; never a rewrite of the table.
    let mut changed = c.clone();
    let db = changed
        .pods
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("db"))
        .unwrap();
    db.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("app".into(), "cache".into());
    let mut m2 = build_model(&changed);
    for ep in &mut m2.endpoints {
        let (.., iface) = PODS.iter().find(|p| p.1 == ep.name()).unwrap();
        ep.interface = Some(iface.to_string());
    }
    let table2 = compile(&m2, &CompileOptions::default());
    let updated = node.run(|| driver.reconcile(&table2)).unwrap().unwrap();
    assert_eq!(updated, tortie::dataplane::nft::Outcome::Updated);
    let script = driver.transactions().last().unwrap().to_string();
    assert!(
        !script
            .lines()
            .any(|l| l.contains("add table") || l.contains("delete table")),
        "{script}"
    );
    assert!(script.contains("delete element"), "{script}");
    let again = node.run(|| driver.reconcile(&table2)).unwrap().unwrap();
    assert_eq!(again, tortie::dataplane::nft::Outcome::InSync);
    let listed = node
        .exec_ok(&["nft", "list", "table", "inet", "tortie-policy"])
        .unwrap();
    assert!(listed.contains("2001:db8::/32"), "{listed}");
    assert!(listed.contains("fd00::1 . tcp . 8080"), "{listed}");
}
