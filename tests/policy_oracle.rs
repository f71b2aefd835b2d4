// tortie's policy evaluator against an oracle no one here wrote: cyclonus v0.5.6's
// NetworkPolicy engine (scripts/oracle, built from the Go module proxy and cached). Hundreds
// of seeded random Kubernetes NetworkPolicy sets over a fixed cluster of 3 namespaces × 3
// pods; every (source pod, destination pod, port, protocol) cell must get the same ingress,
// egress and overall verdict from both. A failure prints the seed, the policies and the diff.
// The generator (tests/policy_gen) leaves out one known cyclonus bug; see there.

#[path = "policy_gen/mod.rs"]
mod policy_gen;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_gen::{NAMESPACES, PODS, PORTS, PROTOCOLS, cluster, container_ports, labels, pod_ip};
use serde_json::{Value, json};
use tortie::policy::cluster::build_model;
use tortie::policy::{Flow, Protocol, evaluate};

const CASES: u64 = 300;
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
