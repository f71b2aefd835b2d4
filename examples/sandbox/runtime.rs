// The container runtime's side of CNI, as the agent needs it: read the node's conflist, run
// each plugin binary in order with CNI_* in the environment and its config (plus the previous
// result) on stdin; DEL in reverse order. The config building and result parsing are pure.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde_json::{Value, json};

pub const CONFLIST: &str = "10-tortie.conflist";

/// One pod's attachment, as the runtime describes it to the plugins.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

impl Attachment {
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.pod_namespace, self.pod_name, self.container_id, self.pod_uid
        )
    }
}

#[derive(Clone, Debug)]
pub struct Runtime {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
}

impl Runtime {
    pub fn load_conflist(&self) -> anyhow::Result<Value> {
        let path = self.conf_dir.join(CONFLIST);
        let text = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parse {}", path.display()))
    }

    /// ADD through the whole chain; the last plugin's result is the attachment's result.
    pub fn add(&self, att: &Attachment) -> anyhow::Result<Value> {
        let list = self.load_conflist()?;
        let version = chosen_version(&list);
        let mut prev: Option<Value> = None;
        for i in 0..plugin_count(&list) {
            let conf = plugin_config(&list, i, &version, prev.as_ref())?;
            prev = Some(self.exec("ADD", att, &conf)?);
        }
        prev.context("the conflist has no plugins")
    }

    /// DEL through the chain in reverse; every plugin runs even if an earlier one fails.
    pub fn del(&self, att: &Attachment, prev: Option<&Value>) -> anyhow::Result<()> {
        let list = self.load_conflist()?;
        let version = chosen_version(&list);
        let mut errors = Vec::new();
        for i in (0..plugin_count(&list)).rev() {
            let conf = plugin_config(&list, i, &version, prev)?;
            if let Err(e) = self.exec("DEL", att, &conf) {
                errors.push(format!("{e:#}"));
            }
        }
        if !errors.is_empty() {
            bail!("CNI DEL of {}: {}", att.container_id, errors.join("; "));
        }
        Ok(())
    }

    fn exec(&self, command: &str, att: &Attachment, conf: &Value) -> anyhow::Result<Value> {
        let kind = conf["type"]
            .as_str()
            .context("a plugin in the conflist has no \"type\"")?;
        let binary = self.bin_dir.join(kind);
        let mut child = Command::new(&binary)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", att.cni_args())
            .env("CNI_PATH", &self.bin_dir)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run CNI plugin {}", binary.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(conf.to_string().as_bytes())
                .with_context(|| format!("write config to {}", binary.display()))?;
        }
        let out = child
            .wait_with_output()
            .with_context(|| format!("wait for {}", binary.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{kind} {command} for {}/{} failed ({}): {} {}",
                att.pod_namespace,
                att.pod_name,
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout)
            .with_context(|| format!("{kind} {command} printed no JSON result: {stdout}"))
    }
}

fn plugin_count(list: &Value) -> usize {
    list["plugins"].as_array().map_or(0, Vec::len)
}

/// The highest version in `cniVersions` when present (what libcni does), else `cniVersion`.
pub fn chosen_version(list: &Value) -> String {
    let parse = |v: &str| -> Vec<u32> { v.split('.').filter_map(|p| p.parse().ok()).collect() };
    list["cniVersions"]
        .as_array()
        .and_then(|vs| {
            vs.iter()
                .filter_map(Value::as_str)
                .max_by_key(|v| parse(v))
                .map(str::to_owned)
        })
        .or_else(|| list["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "0.3.1".to_owned())
}

/// Plugin `i`'s stdin: its own keys plus the list's name and version and the previous result.
pub fn plugin_config(
    list: &Value,
    i: usize,
    version: &str,
    prev: Option<&Value>,
) -> anyhow::Result<Value> {
    let mut conf = list["plugins"][i].clone();
    let obj = conf
        .as_object_mut()
        .with_context(|| format!("plugin {i} of the conflist is not an object"))?;
    obj.insert("name".into(), list["name"].clone());
    obj.insert("cniVersion".into(), json!(version));
    if let Some(prev) = prev.filter(|p| !p.is_null()) {
        obj.insert("prevResult".into(), prev.clone());
    }
    Ok(conf)
}

/// The addresses of a CNI result (`ips[].address`, prefix dropped).
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str())
                .filter_map(|a| a.split('/').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Value {
        json!({
            "name": "k8s-pod-network",
            "cniVersion": "1.0.0",
            "cniVersions": ["1.0.0", "1.1.0"],
            "plugins": [
                {"type": "tortie", "mtu": 1450, "ipam": {"type": "tortie-ipam"}},
                {"type": "portmap", "snat": true}
            ]
        })
    }

    #[test]
    fn highest_listed_version_wins_over_the_single_field() {
        assert_eq!(chosen_version(&list()), "1.1.0");
        assert_eq!(chosen_version(&json!({"cniVersion": "0.4.0"})), "0.4.0");
    }

    #[test]
    fn chained_plugin_sees_name_version_and_previous_result() {
        let prev = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.244.1.2/32"}]});
        let conf = plugin_config(&list(), 1, "1.1.0", Some(&prev)).expect("conf");
        assert_eq!(conf["type"], "portmap");
        assert_eq!(conf["name"], "k8s-pod-network");
        assert_eq!(conf["cniVersion"], "1.1.0");
        assert_eq!(conf["prevResult"], prev);
        let first = plugin_config(&list(), 0, "1.1.0", None).expect("conf");
        assert!(first.get("prevResult").is_none());
        assert_eq!(first["ipam"]["type"], "tortie-ipam");
    }

    #[test]
    fn result_addresses_lose_their_prefix() {
        let r = json!({"ips": [{"address": "10.244.1.2/32"}, {"address": "fd00::2/128"}]});
        let ips: Vec<String> = result_ips(&r).iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.244.1.2", "fd00::2"]);
    }

    #[test]
    fn cni_args_carry_the_kubelet_keys() {
        let att = Attachment {
            container_id: "abc".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "p".into(),
            pod_uid: "u-1".into(),
        };
        assert_eq!(
            att.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
        );
    }
}
