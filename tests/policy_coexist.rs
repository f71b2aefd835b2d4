// tortie's policy table beside kube-proxy and AKS's own rules, in the kernel: a test node
// namespace gets kube-proxy's Service rules (iptables mode on Debian's iptables-nft backend,
// chains as kube-proxy writes them; then kube-proxy's nftables mode table), AKS's FORWARD
// drop of the wireserver (168.63.129.16, TCP 80 and 32526) and the compiled
// `inet tortie-policy` table. Real TCP connections through ClusterIPs must be decided by
// policy on the post-DNAT pod and port, kube-proxy's masquerade mark must survive tortie's
// chains, kube-proxy's own accepts must not bypass tortie's drops, and no tortie allow may
// reopen the wireserver.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use serde_json::json;
use support::NetNs;
use support::netns::plumb_pod;
use tortie::policy::cluster::{ClusterObjects, build_model};
use tortie::policy::compile::{CompileOptions, compile};
use tortie::policy::{Flow, Model, evaluate};

const PODS: [(&str, &str, &str, &str); 3] = [
    // namespace, name, ip, host interface
    ("prod", "web", "10.0.0.1", "caliweb0"),
    ("prod", "db", "10.0.0.2", "calidb00"),
    ("dev", "tool", "10.0.1.2", "calitool"),
];
const CLUSTER_CIDR: &str = "10.0.0.0/16";
const NODE_IP: &str = "198.18.0.1";
const OUTSIDE_IP: &str = "198.18.0.2";
const WIRESERVER: &str = "168.63.129.16";
/// ClusterIP port 80 → db:8080 (allowed from web and from outside), and → db:9090 (allowed
/// from nowhere).
const SVC_HTTP: (&str, &str) = ("10.96.0.10", "10.0.0.2:8080");
const SVC_ADMIN: (&str, &str) = ("10.96.0.11", "10.0.0.2:9090");
const TIMEOUT: Duration = Duration::from_millis(700);

fn cluster() -> ClusterObjects {
    let mut c = ClusterObjects::default();
    for ns in ["prod", "dev"] {
        c.namespaces
            .push(serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap());
    }
    for (ns, name, ip, _) in PODS {
        c.pods.push(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
            }))
            .unwrap(),
        );
    }
    // db admits web and the world outside the cluster, on its http port only.
    let db = json!({
        "metadata": {"namespace": "prod", "name": "db-in"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}},
                                       {"ipBlock": {"cidr": "198.18.0.0/15"}}],
                              "ports": [{"port": "http"}]}]}
    });
    // web may send anything anywhere: the wireserver drop must hold regardless.
    let web = json!({
        "metadata": {"namespace": "prod", "name": "web-out"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                 "egress": [{}]}
    });
    for p in [db, web] {
        c.k8s_policies.push(serde_json::from_value(p).unwrap());
    }
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

/// TCP listeners in `ns` that answer each connection with the peer address they saw.
fn serve(ns: &NetNs, ip: &str, ports: &[u16]) {
    for &port in ports {
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let l = ns.run(move || TcpListener::bind(addr)).unwrap().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let peer = s
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let _ = s.write_all(format!("{peer}\n").as_bytes());
            }
        });
    }
}

/// Connects from `src` to `dst` and returns the peer address the server saw, or None when
/// the connection did not complete.
fn connect(src: &NetNs, dst: &str) -> Option<String> {
    let addr: SocketAddr = dst.parse().unwrap();
    src.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).ok()?;
        s.set_read_timeout(Some(TIMEOUT)).ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        buf.lines().next().map(str::to_string)
    })
    .unwrap()
}

fn load(node: &NetNs, script: &str) {
    node.nft_load(script);
}

fn iptables(node: &NetNs, args: &str) {
    let mut argv = vec!["iptables-nft", "-w"];
    argv.extend(args.split_whitespace());
    node.exec_ok(&argv)
        .unwrap_or_else(|e| panic!("iptables-nft {args}: {e:#}"));
}

/// AKS node bootstrap's rules (AgentBaker): pods never reach the wireserver on TCP 80 or 32526.
fn aks_wireserver_drop(node: &NetNs) {
    for port in [80, 32526] {
        iptables(
            node,
            &format!("-I FORWARD -d {WIRESERVER}/32 -p tcp --dport {port} -j DROP"),
        );
    }
}

/// kube-proxy's iptables mode for the two ClusterIPs, one endpoint each: nat PREROUTING and
/// OUTPUT → KUBE-SERVICES → KUBE-SVC-* (mark for masquerade when the source is outside the
/// cluster CIDR) → KUBE-SEP-* (DNAT); KUBE-POSTROUTING masquerades marked packets; filter
/// FORWARD → KUBE-FORWARD accepts marked packets.
fn kube_proxy_iptables(node: &NetNs) {
    let comment = "-m comment --comment";
    for chain in [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-SVC-HTTP",
        "KUBE-SEP-HTTP",
        "KUBE-SVC-ADMIN",
        "KUBE-SEP-ADMIN",
    ] {
        iptables(node, &format!("-t nat -N {chain}"));
    }
    iptables(
        node,
        &format!("-t nat -A PREROUTING {comment} kubernetes-service-portals -j KUBE-SERVICES"),
    );
    iptables(
        node,
        &format!("-t nat -A OUTPUT {comment} kubernetes-service-portals -j KUBE-SERVICES"),
    );
    iptables(
        node,
        &format!(
            "-t nat -A POSTROUTING {comment} kubernetes-postrouting-rules -j KUBE-POSTROUTING"
        ),
    );
    iptables(node, "-t nat -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000");
    iptables(
        node,
        "-t nat -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    );
    iptables(node, "-t nat -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000");
    iptables(
        node,
        "-t nat -A KUBE-POSTROUTING -j MASQUERADE --random-fully",
    );
    for (name, (vip, ep)) in [("HTTP", SVC_HTTP), ("ADMIN", SVC_ADMIN)] {
        let ep_ip = ep.split(':').next().unwrap();
        iptables(
            node,
            &format!(
                "-t nat -A KUBE-SERVICES -d {vip}/32 -p tcp {comment} prod/db:{name} -m tcp --dport 80 -j KUBE-SVC-{name}"
            ),
        );
        iptables(
            node,
            &format!(
                "-t nat -A KUBE-SVC-{name} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ"
            ),
        );
        iptables(
            node,
            &format!("-t nat -A KUBE-SVC-{name} {comment} prod/db:{name}->{ep} -j KUBE-SEP-{name}"),
        );
        iptables(
            node,
            &format!("-t nat -A KUBE-SEP-{name} -s {ep_ip}/32 -j KUBE-MARK-MASQ"),
        );
        iptables(
            node,
            &format!("-t nat -A KUBE-SEP-{name} -p tcp -m tcp -j DNAT --to-destination {ep}"),
        );
    }
    iptables(node, "-N KUBE-FORWARD");
    iptables(
        node,
        &format!("-A FORWARD {comment} kubernetes-forwarding-rules -j KUBE-FORWARD"),
    );
    iptables(
        node,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
    );
    iptables(
        node,
        "-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT",
    );
    iptables(
        node,
        "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    );
}

/// kube-proxy's nftables mode for the same two ClusterIPs: its `ip kube-proxy` table with
/// the service-ips verdict map, per-service and per-endpoint chains, the masquerade mark,
/// and its filter chains at priority -110 (before tortie's at 0).
fn kube_proxy_nftables(node: &NetNs) {
    let mut services = Vec::new();
    let mut chains = String::new();
    for (name, (vip, ep)) in [("http", SVC_HTTP), ("admin", SVC_ADMIN)] {
        let ep_ip = ep.split(':').next().unwrap();
        services.push(format!("{vip} . tcp . 80 : goto service-{name}"));
        chains.push_str(&format!(
            "chain service-{name} {{
  ip daddr {vip} tcp dport 80 ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade
  numgen random mod 1 vmap {{ 0 : goto endpoint-{name} }}
}}
chain endpoint-{name} {{
  ip saddr {ep_ip} jump mark-for-masquerade
  meta l4proto tcp dnat to {ep}
}}
"
        ));
    }
    let script = format!(
        "table ip kube-proxy {{
comment \"rules for kube-proxy\"
map service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; elements = {{ {services} }} }}
map no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict; }}
set cluster-ips {{ type ipv4_addr; elements = {{ {http}, {admin} }} }}
chain mark-for-masquerade {{ meta mark set meta mark | 0x4000; }}
chain masquerading {{
  meta mark & 0x4000 == 0 return
  meta mark set meta mark ^ 0x4000
  masquerade fully-random
}}
chain services {{ ip daddr . meta l4proto . th dport vmap @service-ips; }}
chain service-endpoints-check {{ ip daddr . meta l4proto . th dport vmap @no-endpoint-services; }}
chain cluster-ips-check {{
  ip daddr @cluster-ips reject
  ip daddr 10.96.0.0/16 drop
}}
{chains}
chain nat-prerouting {{ type nat hook prerouting priority -100; policy accept; jump services; }}
chain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}
chain nat-postrouting {{ type nat hook postrouting priority 100; policy accept; jump masquerading; }}
chain filter-forward {{
  type filter hook forward priority -110; policy accept;
  ct state new jump service-endpoints-check
  ct state new jump cluster-ips-check
}}
chain filter-output {{
  type filter hook output priority -110; policy accept;
  ct state new jump service-endpoints-check
}}
chain filter-output-post-dnat {{
  type filter hook output priority -90; policy accept;
  ct state new jump cluster-ips-check
}}
}}
",
        services = services.join(", "),
        http = SVC_HTTP.0,
        admin = SVC_ADMIN.0,
    );
    load(node, &script);
}

struct Bed {
    node: NetNs,
    outside: NetNs,
    pods: Vec<NetNs>,
}

/// A node namespace, an "outside" namespace behind its uplink that also holds the wireserver
/// address, and the three pods (each serving TCP 8080 and 9090).
fn bed(label: &str) -> Bed {
    let node = NetNs::new(label).unwrap();
    node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let outside = NetNs::new(&format!("{label}out")).unwrap();
    support::veth_pair(&node, "up0", &outside, "eth0").unwrap();
    node.exec_ok(&["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "up0"])
        .unwrap();
    node.exec_ok(&["ip", "route", "add", "default", "via", OUTSIDE_IP])
        .unwrap();
    for cmd in [
        format!("ip addr add {OUTSIDE_IP}/24 dev eth0"),
        format!("ip addr add {WIRESERVER}/32 dev lo"),
        format!("ip route add {CLUSTER_CIDR} via {NODE_IP}"),
        format!("ip route add 10.96.0.0/16 via {NODE_IP}"),
    ] {
        outside
            .exec_ok(&cmd.split_whitespace().collect::<Vec<_>>())
            .unwrap();
    }
    serve(&outside, WIRESERVER, &[80, 32526, 8080]);
    let pods = PODS
        .iter()
        .map(|(_, name, ip, iface)| {
            let ns = NetNs::new(&format!("{label}{name}")).unwrap();
            plumb_pod(&node, &ns, iface, ip, None).unwrap();
            serve(&ns, ip, &[8080, 9090]);
            ns
        })
        .collect();
    Bed {
        node,
        outside,
        pods,
    }
}

/// Loads tortie's table and checks every path. `proxy` names kube-proxy's mode in messages.
fn check(bed: &Bed, proxy: &str) {
    let m = model();
    let script = tortie::dataplane::nft::render::full(&compile(&m, &CompileOptions::default()));
    load(&bed.node, &script);
    let [web, _db, tool] = [&bed.pods[0], &bed.pods[1], &bed.pods[2]];
    let vip = |svc: (&str, &str)| format!("{}:80", svc.0);
    let at = |svc: (&str, &str)| svc.1.to_string();
    // (who, client, client ip, to, the pod address:port behind it, the peer address db must
    // see when allowed: the client's own, or the node's after kube-proxy's masquerade).
    let cases = [
        (
            "web",
            web,
            "10.0.0.1",
            vip(SVC_HTTP),
            at(SVC_HTTP),
            "10.0.0.1",
        ),
        ("tool", tool, "10.0.1.2", vip(SVC_HTTP), at(SVC_HTTP), ""),
        ("web", web, "10.0.0.1", vip(SVC_ADMIN), at(SVC_ADMIN), ""),
        (
            "web",
            web,
            "10.0.0.1",
            at(SVC_HTTP),
            at(SVC_HTTP),
            "10.0.0.1",
        ),
        ("tool", tool, "10.0.1.2", at(SVC_HTTP), at(SVC_HTTP), ""),
        (
            "outside",
            &bed.outside,
            OUTSIDE_IP,
            vip(SVC_HTTP),
            at(SVC_HTTP),
            NODE_IP,
        ),
        // Marked for masquerade, so kube-proxy's own FORWARD accepts it (iptables mode):
        // tortie's drop must still win.
        (
            "outside",
            &bed.outside,
            OUTSIDE_IP,
            vip(SVC_ADMIN),
            at(SVC_ADMIN),
            "",
        ),
    ];
    let mut diff = Vec::new();
    let (mut allowed, mut denied) = (0, 0);
    for (who, client, client_ip, to, real, seen_as) in &cases {
        let (real_ip, real_port) = real.split_once(':').unwrap();
        // The evaluator on the post-DNAT flow is what the kernel must do.
        let want = evaluate(
            &m,
            &Flow::tcp(
                client_ip.parse().unwrap(),
                real_ip.parse().unwrap(),
                real_port.parse().unwrap(),
            ),
        )
        .allowed;
        assert_eq!(
            want,
            !seen_as.is_empty(),
            "evaluator on {who} -> {real} disagrees with this test's table"
        );
        let got = connect(client, to);
        match (&got, want) {
            (Some(peer), true) if peer == seen_as => allowed += 1,
            (None, false) => denied += 1,
            _ => diff.push(format!(
                "{who} -> {to} (pod {real}): want {}, got {got:?}",
                if want {
                    format!("allowed, seen as {seen_as}")
                } else {
                    "denied".into()
                }
            )),
        }
    }
    // The wireserver: web's egress policy allows everything, tool has none; both must still
    // be dropped on TCP 80 and 32526 by AKS's rule, while other ports of it pass.
    for (who, client) in [("web", web), ("tool", tool)] {
        for (port, open) in [(80, false), (32526, false), (8080, true)] {
            let got = connect(client, &format!("{WIRESERVER}:{port}"));
            if got.is_some() != open {
                diff.push(format!(
                    "{who} -> wireserver:{port}: want {}, got {got:?}",
                    if open { "open" } else { "dropped" }
                ));
            }
        }
    }
    let ruleset = bed.node.exec_ok(&["nft", "list", "ruleset"]).unwrap();
    assert!(
        diff.is_empty(),
        "with kube-proxy in {proxy} mode:\n{}\n\nruleset:\n{ruleset}",
        diff.join("\n")
    );
    assert!(
        allowed >= 3 && denied >= 3,
        "{allowed} allowed, {denied} denied"
    );
    // The drops came from the rules named: AKS's for the wireserver, tortie's for policy.
    let forward = bed
        .node
        .exec_ok(&["iptables-nft", "-w", "-L", "FORWARD", "-v", "-n", "-x"])
        .unwrap();
    let wire_drops: u64 = forward
        .lines()
        .filter(|l| l.contains(WIRESERVER) && l.contains("DROP"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(
        wire_drops >= 4,
        "AKS wireserver rule dropped {wire_drops}:\n{forward}"
    );
    let db_chain = bed
        .node
        .exec_ok(&[
            "nft",
            "list",
            "counter",
            "inet",
            "tortie-policy",
            "tw-calidb00/end-of-tier",
        ])
        .unwrap();
    let policy_drops: u64 = db_chain
        .split("packets ")
        .nth(1)
        .and_then(|l| l.split(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        policy_drops >= 3,
        "tortie's end-of-tier drop for db counted {policy_drops}:\n{db_chain}"
    );
}

#[test]
fn policy_with_kube_proxy_iptables_nft_and_the_aks_wireserver_rule() {
    let bed = bed("pcipt");
    aks_wireserver_drop(&bed.node);
    kube_proxy_iptables(&bed.node);
    check(&bed, "iptables (iptables-nft)");
    // kube-proxy's tables are the iptables-nft ones; tortie's stays its own.
    let tables = bed.node.exec_ok(&["nft", "list", "tables"]).unwrap();
    assert!(
        tables.contains("table ip nat") && tables.contains("table inet tortie-policy"),
        "{tables}"
    );
}

#[test]
fn policy_with_kube_proxy_nftables_and_the_aks_wireserver_rule() {
    let bed = bed("pcnft");
    aks_wireserver_drop(&bed.node);
    kube_proxy_nftables(&bed.node);
    check(&bed, "nftables");
}
