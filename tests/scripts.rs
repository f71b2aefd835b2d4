// Static checks of what is not Rust: every shell script in scripts/ and e2e/ passes `bash -n`
// and shellcheck, and every YAML file in manifests/, e2e/ and .github/ parses (each document).
// The kind path (e2e/kind/) cannot run here (no Docker daemon); this is what is checked of it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Files under `dirs` (recursively) whose name ends with one of `exts`, sorted.
fn files(dirs: &[&str], exts: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, exts, out);
            } else if exts.iter().any(|x| p.to_string_lossy().ends_with(x)) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        walk(&repo().join(d), exts, &mut out);
    }
    out.sort();
    out
}

/// Shell scripts: `*.sh`, plus extension-less files starting with a bash shebang.
fn scripts() -> Vec<PathBuf> {
    let mut all = files(&["scripts", "e2e", ".ci"], &[".sh"]);
    for p in files(&["scripts", "e2e", ".ci"], &[""]) {
        if p.extension().is_none()
            && std::fs::read_to_string(&p).is_ok_and(|t| t.starts_with("#!/usr/bin/env bash"))
        {
            all.push(p);
        }
    }
    all.sort();
    all.dedup();
    all
}

#[test]
fn every_script_parses_with_bash_n() {
    let scripts = scripts();
    assert!(
        scripts.iter().any(|p| p.ends_with("scripts/image.sh")),
        "{scripts:?}"
    );
    assert!(
        scripts.iter().any(|p| p.ends_with("e2e/kind/run.sh")),
        "{scripts:?}"
    );
    for s in &scripts {
        let out = Command::new("bash")
            .arg("-n")
            .arg(s)
            .output()
            .expect("run bash -n");
        assert!(
            out.status.success(),
            "bash -n {}: {}",
            s.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// shellcheck is in .ci/run's package list; a machine without it fails here, by design.
#[test]
fn every_script_passes_shellcheck() {
    shellcheck_all();
}

fn shellcheck_all() {
    let scripts = scripts();
    let out = Command::new("shellcheck")
        .args(["--shell=bash", "--severity=warning", "-x"])
        .args(&scripts)
        .current_dir(repo())
        .output()
        .expect("run shellcheck (apt-get install shellcheck; .ci/run installs it)");
    assert!(
        out.status.success(),
        "shellcheck:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_yaml_file_parses() {
    let yamls = files(&["manifests", "e2e", ".github"], &[".yaml", ".yml"]);
    for must in [
        "manifests/tortie.yaml",
        "manifests/monitoring/prometheusrule.yaml",
        "e2e/kind/kind-iptables.yaml",
        "e2e/kind/kind-nftables.yaml",
        ".github/workflows/e2e-kind.yml",
    ] {
        assert!(
            yamls.iter().any(|p| p.ends_with(must)),
            "{must} missing from {yamls:?}"
        );
    }
    for y in &yamls {
        let text = std::fs::read_to_string(y).expect("read yaml");
        let mut docs = 0;
        for de in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(de)
                .unwrap_or_else(|e| panic!("{}: {e}", y.display()));
            if !v.is_null() {
                docs += 1;
            }
        }
        assert!(docs > 0, "{} has no document", y.display());
    }
}

#[test]
fn kind_configs_disable_the_default_cni_and_use_the_pools_subnet() {
    for mode in ["iptables", "nftables"] {
        let path = repo().join(format!("e2e/kind/kind-{mode}.yaml"));
        let v: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("parse");
        let net = &v["networking"];
        assert_eq!(net["disableDefaultCNI"], serde_yaml::Value::Bool(true));
        assert_eq!(net["podSubnet"].as_str(), Some("192.168.0.0/16"));
        assert_eq!(net["kubeProxyMode"].as_str(), Some(mode));
    }
    let workflow =
        std::fs::read_to_string(repo().join(".github/workflows/e2e-kind.yml")).expect("workflow");
    assert!(workflow.contains("e2e/kind/run.sh"));
    assert!(workflow.contains("pull_request"));
}
