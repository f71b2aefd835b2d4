// tortie's policy evaluator against an oracle no one here wrote: cyclonus v0.5.6's
// NetworkPolicy engine (scripts/oracle, built from the Go module proxy and cached). Hundreds
// of seeded random Kubernetes NetworkPolicy sets over a fixed cluster of 3 namespaces × 3
// pods; every (source pod, destination pod, port, protocol) cell must get the same ingress,
// egress and overall verdict from both. A failure prints the seed, the policies and the diff.
//
// Known cyclonus bug, kept out of the generator: cyclonus treats `NotIn` on a label the
// object does not have as no match (pkg/kube/labelselector.go, "even for NotIn -- if the key
// isn't there, it's not a match"), while Kubernetes (and Calico's `not in`) match it. So
// `NotIn` is only generated on keys every pod and namespace carries (`pod`, `ns`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tortie::policy::cluster::{ClusterObjects, build_model};
use tortie::policy::{Flow, Protocol, evaluate};

const CASES: u64 = 300;
const NAMESPACES: [(&str, &[(&str, &str)]); 3] = [
    ("x", &[("ns", "x"), ("env", "prod")]),
    ("y", &[("ns", "y"), ("env", "dev")]),
    ("z", &[("ns", "z")]),
];
const PODS: [(&str, &[(&str, &str)]); 3] = [
    ("a", &[("pod", "a"), ("tier", "fe")]),
    ("b", &[("pod", "b"), ("tier", "be")]),
    ("c", &[("pod", "c")]),
];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
const PORTS: [u16; 2] = [80, 81];

fn oracle() -> PathBuf {
    if let Some(p) = std::env::var_os("TORTIE_POLICY_ORACLE") {
        return PathBuf::from(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/oracle/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/oracle/build.sh");
    assert!(out.status.success(), "scripts/oracle/build.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn pod_ip(ns: usize, pod: usize) -> String {
    format!("10.1.{ns}.{}", pod + 1)
}

/// Container ports: every pod serves 80 and 81 on each protocol, named
/// `serve-<port>-<proto>`; the named port `web` is 80/TCP on pod a and 81/TCP on pod b, so
/// it resolves differently per destination.
fn container_ports(pod: &str) -> Vec<(String, u16, &'static str)> {
    let mut out = Vec::new();
    for proto in PROTOCOLS {
        for port in PORTS {
            let web = proto == "TCP" && ((pod == "a" && port == 80) || (pod == "b" && port == 81));
            let name = if web {
                "web".to_string()
            } else {
                format!("serve-{port}-{}", proto.to_lowercase())
            };
            out.push((name, port, proto));
        }
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn cluster() -> ClusterObjects {
    let mut c = ClusterObjects::default();
    for (ni, (ns, ns_labels)) in NAMESPACES.iter().enumerate() {
        let mut l = labels(ns_labels);
        l.insert("kubernetes.io/metadata.name".into(), ns.to_string());
        c.namespaces.push(
            serde_json::from_value::<Namespace>(json!({"metadata": {"name": ns, "labels": l}}))
                .unwrap(),
        );
        for (pi, (pod, pod_labels)) in PODS.iter().enumerate() {
            let ports: Vec<Value> = container_ports(pod)
                .into_iter()
                .map(|(name, port, proto)| json!({"name": name, "containerPort": port, "protocol": proto}))
                .collect();
            let ip = pod_ip(ni, pi);
            c.pods.push(
                serde_json::from_value::<Pod>(json!({
                    "metadata": {"namespace": ns, "name": pod, "labels": labels(pod_labels)},
                    "spec": {"containers": [{"name": "serve", "ports": ports}]},
                    "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
                }))
                .unwrap(),
            );
        }
    }
    c
}

fn pick<'a, T>(rng: &mut StdRng, xs: &'a [T]) -> &'a T {
    &xs[rng.random_range(0..xs.len())]
}

fn pod_selector(rng: &mut StdRng) -> Value {
    pick(rng, &[
        json!({}),
        json!({"matchLabels": {"pod": "a"}}),
        json!({"matchLabels": {"tier": "fe"}}),
        json!({"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]}),
        json!({"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]}),
        json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
        json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
        json!({"matchLabels": {"pod": "c"}, "matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
    ])
    .clone()
}

fn namespace_selector(rng: &mut StdRng) -> Value {
    pick(
        rng,
        &[
            json!({}),
            json!({"matchLabels": {"ns": "x"}}),
            json!({"matchLabels": {"env": "prod"}}),
            json!({"matchLabels": {"kubernetes.io/metadata.name": "y"}}),
            json!({"matchExpressions": [{"key": "ns", "operator": "In", "values": ["x", "y"]}]}),
            json!({"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["z"]}]}),
            json!({"matchExpressions": [{"key": "env", "operator": "Exists"}]}),
            json!({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}),
        ],
    )
    .clone()
}

fn ip_block(rng: &mut StdRng) -> Value {
    let cidrs = [
        "10.1.0.0/16",
        "10.1.0.0/24",
        "10.1.1.0/24",
        "10.1.0.0/23",
        "10.1.2.2/32",
        "0.0.0.0/0",
    ];
    let excepts = [
        "10.1.0.1/32",
        "10.1.1.0/25",
        "10.1.0.0/24",
        "10.1.2.0/30",
        "10.1.1.3/32",
    ];
    let cidr: ipnet::IpNet = pick(rng, &cidrs).parse().unwrap();
    let except: Vec<String> = excepts
        .iter()
        .map(|e| e.parse::<ipnet::IpNet>().unwrap())
        .filter(|e| cidr.contains(e) && e.prefix_len() > cidr.prefix_len() && rng.random_bool(0.4))
        .map(|e| e.to_string())
        .collect();
    if except.is_empty() {
        json!({"cidr": cidr.to_string()})
    } else {
        json!({"cidr": cidr.to_string(), "except": except})
    }
}

fn peer(rng: &mut StdRng) -> Value {
    match rng.random_range(0..4) {
        0 => json!({"podSelector": pod_selector(rng)}),
        1 => json!({"namespaceSelector": namespace_selector(rng)}),
        2 => {
            json!({"podSelector": pod_selector(rng), "namespaceSelector": namespace_selector(rng)})
        }
        _ => json!({"ipBlock": ip_block(rng)}),
    }
}

fn port(rng: &mut StdRng) -> Value {
    pick(
        rng,
        &[
            json!({"port": 80}),
            json!({"port": 81, "protocol": "UDP"}),
            json!({"protocol": "SCTP"}),
            json!({"protocol": "UDP"}),
            json!({"port": "web"}),
            json!({"port": "serve-80-udp", "protocol": "UDP"}),
            json!({"port": "serve-81-sctp", "protocol": "SCTP"}),
            json!({"port": 80, "endPort": 81, "protocol": "TCP"}),
            json!({"port": 81, "protocol": "TCP"}),
        ],
    )
    .clone()
}

fn rule(rng: &mut StdRng, peers_key: &str) -> Value {
    let mut r = serde_json::Map::new();
    let n_peers = rng.random_range(0..3);
    if n_peers > 0 {
        r.insert(
            peers_key.into(),
            Value::Array((0..n_peers).map(|_| peer(rng)).collect()),
        );
    }
    let n_ports = rng.random_range(0..3);
    if n_ports > 0 {
        r.insert(
            "ports".into(),
            Value::Array((0..n_ports).map(|_| port(rng)).collect()),
        );
    }
    Value::Object(r)
}

fn policy(rng: &mut StdRng, i: usize) -> Value {
    let ns = NAMESPACES[rng.random_range(0..3)].0;
    let types = pick(
        rng,
        &[vec!["Ingress"], vec!["Egress"], vec!["Ingress", "Egress"]],
    )
    .clone();
    let mut spec = serde_json::Map::new();
    spec.insert("podSelector".into(), pod_selector(rng));
    spec.insert("policyTypes".into(), json!(types));
    for (dir, key) in [("Ingress", "from"), ("Egress", "to")] {
        if types.contains(&dir) {
            let n = rng.random_range(0..3);
            let rules: Vec<Value> = (0..n).map(|_| rule(rng, key)).collect();
            spec.insert(dir.to_lowercase(), Value::Array(rules));
        }
    }
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": format!("p{i}")},
        "spec": spec
    })
}

#[derive(serde::Deserialize, Debug, PartialEq)]
struct Cell {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    ingress: bool,
    egress: bool,
    allowed: bool,
}

fn oracle_cells(oracle: &Path, dir: &Path, policies: &[Value]) -> Vec<Cell> {
    let pol_dir = dir.join("policies");
    let _ = std::fs::remove_dir_all(&pol_dir);
    std::fs::create_dir_all(&pol_dir).unwrap();
    for (i, p) in policies.iter().enumerate() {
        std::fs::write(pol_dir.join(format!("{i}.json")), p.to_string()).unwrap();
    }
    let mut namespaces = serde_json::Map::new();
    for (ns, l) in NAMESPACES {
        namespaces.insert(ns.into(), json!(labels(l)));
    }
    let mut pods = Vec::new();
    for (ni, (ns, _)) in NAMESPACES.iter().enumerate() {
        for (pi, (pod, l)) in PODS.iter().enumerate() {
            let ports: Vec<Value> = container_ports(pod)
                .into_iter()
                .map(|(name, port, proto)| json!({"name": name, "port": port, "protocol": proto}))
                .collect();
            pods.push(json!({"namespace": ns, "name": pod, "ip": pod_ip(ni, pi), "labels": labels(l), "ports": ports}));
        }
    }
    let probes: Vec<Value> = PROTOCOLS
        .iter()
        .flat_map(|proto| {
            PORTS
                .iter()
                .map(move |port| json!({"port": port, "protocol": proto}))
        })
        .collect();
    let input =
        json!({"policiesDir": pol_dir, "namespaces": namespaces, "pods": pods, "probes": probes});
    let input_path = dir.join("input.json");
    std::fs::write(&input_path, input.to_string()).unwrap();
    let out = Command::new(oracle)
        .arg(&input_path)
        .output()
        .expect("run oracle");
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("oracle output line"))
        .collect()
}

fn tortie_cells(policies: &[Value]) -> Vec<Cell> {
    let mut c = cluster();
    c.k8s_policies = policies
        .iter()
        .map(|p| serde_json::from_value::<NetworkPolicy>(p.clone()).unwrap())
        .collect();
    let model = build_model(&c);
    assert!(model.diagnostics.is_empty(), "{:?}", model.diagnostics);
    let mut out = Vec::new();
    let pods: Vec<(String, IpAddr)> = NAMESPACES
        .iter()
        .enumerate()
        .flat_map(|(ni, (ns, _))| {
            PODS.iter()
                .enumerate()
                .map(move |(pi, (pod, _))| (format!("{ns}/{pod}"), pod_ip(ni, pi).parse().unwrap()))
        })
        .collect();
    for (from, src) in &pods {
        for (to, dst) in &pods {
            for proto in PROTOCOLS {
                for port in PORTS {
                    let flow = Flow::new(*src, *dst, Protocol::parse(proto).unwrap(), port);
                    let v = evaluate(&model, &flow);
                    out.push(Cell {
                        from: from.clone(),
                        to: to.clone(),
                        port,
                        protocol: proto.into(),
                        ingress: v.ingress.as_ref().is_none_or(|d| d.allowed),
                        egress: v.egress.as_ref().is_none_or(|d| d.allowed),
                        allowed: v.allowed,
                    });
                }
            }
        }
    }
    out
}

#[test]
fn evaluator_matches_cyclonus_on_random_kubernetes_policies() {
    let oracle = oracle();
    let dir = tempfile::tempdir().unwrap();
    let seed0: u64 = std::env::var("TORTIE_ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261202);
    let (mut cells, mut allowed, mut failures) = (0usize, 0usize, Vec::new());
    for case in 0..CASES {
        let seed = seed0 + case;
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(1..=3);
        let policies: Vec<Value> = (0..n).map(|i| policy(&mut rng, i)).collect();
        let want = oracle_cells(&oracle, dir.path(), &policies);
        let mut got: BTreeMap<(String, String, u16, String), Cell> = tortie_cells(&policies)
            .into_iter()
            .map(|c| {
                (
                    (c.from.clone(), c.to.clone(), c.port, c.protocol.clone()),
                    c,
                )
            })
            .collect();
        assert_eq!(want.len(), got.len(), "cell count");
        let mut diff = Vec::new();
        for w in want {
            // Same-pod traffic is undefined in cyclonus.
            if w.from == w.to {
                continue;
            }
            cells += 1;
            allowed += usize::from(w.allowed);
            let g = got
                .remove(&(w.from.clone(), w.to.clone(), w.port, w.protocol.clone()))
                .unwrap();
            if g != w {
                diff.push(format!(
                    "  {} -> {} {}/{}: oracle ingress={} egress={} allowed={}; tortie ingress={} egress={} allowed={}",
                    w.from, w.to, w.port, w.protocol, w.ingress, w.egress, w.allowed, g.ingress, g.egress, g.allowed
                ));
            }
        }
        if !diff.is_empty() {
            failures.push(format!(
                "seed {seed}: {} cells differ\npolicies: {}\n{}",
                diff.len(),
                serde_json::to_string_pretty(&policies).unwrap(),
                diff.join("\n")
            ));
        }
    }
    eprintln!("{CASES} policy sets, {cells} cells compared, {allowed} allowed");
    assert!(
        allowed > cells / 10 && allowed < cells * 9 / 10,
        "generator is lopsided"
    );
    assert!(
        failures.is_empty(),
        "{} of {CASES} cases differ:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
