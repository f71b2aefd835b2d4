// The Kubernetes NetworkPolicy oracle no one here wrote: cyclonus v0.5.6's engine
// (scripts/oracle/main.go, built from the Go module proxy by scripts/oracle/build.sh and
// cached), asked for every (source pod, destination pod, port, protocol) cell of a described
// cluster. Shared by the evaluator property test and the real-packet truth tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use serde_json::{Value, json};

/// The oracle binary: `TORTIE_POLICY_ORACLE`, else what scripts/oracle/build.sh prints
/// (building it once per machine).
pub fn binary() -> PathBuf {
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

/// One cell's verdicts as the oracle prints them (`from`/`to` are `namespace/name`).
#[derive(serde::Deserialize, Debug, Clone, PartialEq)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub ingress: bool,
    pub egress: bool,
    pub allowed: bool,
}

/// A pod as the oracle sees it.
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub labels: BTreeMap<String, String>,
    /// Container ports: (name, port, protocol).
    pub ports: Vec<(String, u16, String)>,
}

/// The cluster the oracle evaluates: namespaces with their labels (the oracle adds
/// `kubernetes.io/metadata.name`), pods, and the probes asked for each pod pair.
pub struct World<'a> {
    pub namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    pub pods: &'a [Pod],
    /// (port, protocol name as in the API: TCP, UDP, SCTP).
    pub probes: &'a [(u16, &'a str)],
}

/// The oracle's verdict on every cell of `world` under `policies` (NetworkPolicy objects as
/// JSON, `apiVersion`/`kind` included); `dir` is scratch space.
pub fn cells(
    oracle: &Path,
    dir: &Path,
    policies: &[Value],
    world: &World<'_>,
) -> anyhow::Result<Vec<Cell>> {
    let pol_dir = dir.join("policies");
    let _ = std::fs::remove_dir_all(&pol_dir);
    std::fs::create_dir_all(&pol_dir)?;
    for (i, p) in policies.iter().enumerate() {
        std::fs::write(pol_dir.join(format!("{i}.json")), p.to_string())?;
    }
    let pods: Vec<Value> = world
        .pods
        .iter()
        .map(|p| {
            let ports: Vec<Value> = p
                .ports
                .iter()
                .map(|(name, port, proto)| json!({"name": name, "port": port, "protocol": proto}))
                .collect();
            json!({"namespace": p.namespace, "name": p.name, "ip": p.ip, "labels": p.labels, "ports": ports})
        })
        .collect();
    let probes: Vec<Value> = world
        .probes
        .iter()
        .map(|(port, proto)| json!({"port": port, "protocol": proto}))
        .collect();
    let input = json!({
        "policiesDir": pol_dir, "namespaces": world.namespaces, "pods": pods, "probes": probes
    });
    let input_path = dir.join("input.json");
    std::fs::write(&input_path, input.to_string())?;
    let out = Command::new(oracle)
        .arg(&input_path)
        .output()
        .with_context(|| format!("run {}", oracle.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("oracle output line {l:?}")))
        .collect()
}
