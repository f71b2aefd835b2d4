// tortie's policy evaluator against an oracle no one here wrote: cyclonus v0.5.6's
// NetworkPolicy engine (scripts/oracle, built from the Go module proxy and cached). Hundreds
// of seeded random Kubernetes NetworkPolicy sets over a fixed cluster of 3 namespaces × 3
// pods; every (source pod, destination pod, port, protocol) cell must get the same ingress,
// egress and overall verdict from both. A failure prints the seed, the policies and the diff.
// The generator (tests/policy_gen) leaves out one known cyclonus bug; see there.

#[path = "policy_gen/mod.rs"]
mod policy_gen;
mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_gen::{NAMESPACES, PODS, PORTS, PROTOCOLS, cluster, container_ports, labels, pod_ip};
use serde_json::Value;
use support::oracle::{self, Cell};
use tortie::policy::cluster::build_model;
use tortie::policy::{Flow, Protocol, evaluate};

const CASES: u64 = 300;

fn oracle_cells(oracle: &Path, dir: &Path, policies: &[Value]) -> Vec<Cell> {
    let namespaces: BTreeMap<String, BTreeMap<String, String>> = NAMESPACES
        .iter()
        .map(|(ns, l)| (ns.to_string(), labels(l)))
        .collect();
    let mut pods = Vec::new();
    for (ni, (ns, _)) in NAMESPACES.iter().enumerate() {
        for (pi, (pod, l)) in PODS.iter().enumerate() {
            pods.push(oracle::Pod {
                namespace: ns.to_string(),
                name: pod.to_string(),
                ip: pod_ip(ni, pi),
                labels: labels(l),
                ports: container_ports(pod)
                    .into_iter()
                    .map(|(name, port, proto)| (name, port, proto.to_string()))
                    .collect(),
            });
        }
    }
    let probes: Vec<(u16, &str)> = PROTOCOLS
        .iter()
        .flat_map(|proto| PORTS.iter().map(move |port| (*port, *proto)))
        .collect();
    let world = oracle::World {
        namespaces: &namespaces,
        pods: &pods,
        probes: &probes,
    };
    oracle::cells(oracle, dir, policies, &world).expect("oracle")
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
    let oracle = oracle::binary();
    let dir = tempfile::tempdir().unwrap();
    let seed0: u64 = std::env::var("TORTIE_ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261202);
    let (mut cells, mut allowed, mut failures) = (0usize, 0usize, Vec::new());
    for case in 0..CASES {
        let seed = seed0 + case;
        let policies = policy_gen::policies(seed);
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
