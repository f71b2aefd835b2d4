// `tortie node` as manifests/tortie.yaml runs it: the DaemonSet container's args and its
// environment (the ConfigMap it reads with envFrom, then its own `env`), so the sandbox tests
// what users install. The only differences are HOST_SPECIFIC: paths that are hostPath mounts
// and the in-cluster service account in a real pod, and differ per simulated node here.

use anyhow::{Context, bail};
use serde_yaml::Value;

/// The manifest, compiled in: the sandbox binary runs the install it was built with.
const MANIFEST: &str = include_str!("../../manifests/tortie.yaml");

/// Variables the sandbox sets because its nodes share one filesystem and have no service
/// account: the kubeconfig, and the three host paths the DaemonSet mounts.
pub const HOST_SPECIFIC: [&str; 4] = [
    "KUBECONFIG",
    "TORTIE_CNI_BIN_DIR",
    "TORTIE_CNI_CONF_DIR",
    "TORTIE_CNI_SOCKET",
];

/// PATH of the image (scripts/image.sh and the Dockerfile's Debian base).
pub const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSettings {
    /// The container's `args` (the image's entrypoint is the tortie binary).
    pub args: Vec<String>,
    /// Literal values, ConfigMap first, then the container's `env` overriding it.
    pub env: Vec<(String, String)>,
    /// The variable filled from `spec.nodeName` (the downward API).
    pub node_name_var: String,
}

fn s(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

pub fn daemon_settings() -> anyhow::Result<DaemonSettings> {
    daemon_settings_from(MANIFEST)
}

pub fn daemon_settings_from(manifest: &str) -> anyhow::Result<DaemonSettings> {
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(manifest)
        .map(|d| serde::Deserialize::deserialize(d).context("manifest YAML"))
        .collect::<anyhow::Result<_>>()?;
    let ds = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .context("no DaemonSet in the manifest")?;
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let args = c["args"]
        .as_sequence()
        .context("the container has args")?
        .iter()
        .map(|a| s(a).context("string arg"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: String, v: String| {
        env.retain(|(e, _)| *e != k);
        env.push((k, v));
    };
    for from in c["envFrom"].as_sequence().into_iter().flatten() {
        let name = s(&from["configMapRef"]["name"]).context("envFrom is a configMapRef")?;
        let cm = docs
            .iter()
            .find(|d| {
                d["kind"].as_str() == Some("ConfigMap")
                    && d["metadata"]["name"].as_str() == Some(&name)
            })
            .with_context(|| format!("ConfigMap {name} is not in the manifest"))?;
        for (k, v) in cm["data"].as_mapping().into_iter().flatten() {
            set(
                s(k).context("ConfigMap key")?,
                s(v).context("ConfigMap value")?,
            );
        }
    }
    let mut node_name_var = None;
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = s(&e["name"]).context("env name")?;
        if let Some(v) = s(&e["value"]) {
            set(name, v);
        } else if e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("spec.nodeName") {
            node_name_var = Some(name);
        } else {
            bail!("env {name}: only literal values and spec.nodeName are supported");
        }
    }
    Ok(DaemonSettings {
        args,
        env,
        node_name_var: node_name_var.context("no env from spec.nodeName")?,
    })
}
