// Seeded random Kubernetes NetworkPolicy sets over a fixed cluster of 3 namespaces × 3
// pods, shared by the oracle test (cyclonus vs the evaluator) and the kernel test (the
// compiled nft table vs the evaluator). Included with `#[path]`, not through support.
//
// Known cyclonus bug, kept out of the generator: cyclonus treats `NotIn` on a label the
// object does not have as no match (pkg/kube/labelselector.go, "even for NotIn -- if the key
// isn't there, it's not a match"), while Kubernetes (and Calico's `not in`) match it. So
// `NotIn` is only generated on keys every pod and namespace carries (`pod`, `ns`).
#![allow(dead_code)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tortie::policy::cluster::ClusterObjects;

pub const NAMESPACES: [(&str, &[(&str, &str)]); 3] = [
    ("x", &[("ns", "x"), ("env", "prod")]),
    ("y", &[("ns", "y"), ("env", "dev")]),
    ("z", &[("ns", "z")]),
];
pub const PODS: [(&str, &[(&str, &str)]); 3] = [
    ("a", &[("pod", "a"), ("tier", "fe")]),
    ("b", &[("pod", "b"), ("tier", "be")]),
    ("c", &[("pod", "c")]),
];
pub const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
pub const PORTS: [u16; 2] = [80, 81];

pub fn pod_ip(ns: usize, pod: usize) -> String {
    format!("10.1.{ns}.{}", pod + 1)
}

/// Container ports: every pod serves 80 and 81 on each protocol, named
/// `serve-<port>-<proto>`; the named port `web` is 80/TCP on pod a and 81/TCP on pod b, so
/// it resolves differently per destination.
pub fn container_ports(pod: &str) -> Vec<(String, u16, &'static str)> {
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

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn cluster() -> ClusterObjects {
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

pub fn policy(rng: &mut StdRng, i: usize) -> Value {
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

/// The policy set of one seed: one to three policies.
pub fn policies(seed: u64) -> Vec<Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = rng.random_range(1..=3);
    (0..n).map(|i| policy(&mut rng, i)).collect()
}
