// Two real `tortie node` daemons (policy on, the default), each in its own node namespace,
// linked by one veth (the VXLAN underlay) and sharing one real control plane with a VXLAN
// pool; pods are Pod objects bound to a node and ADDed through the real CNI plugin
// (cnitool) with the daemon's own configuration. Used by the policy tests that need
// same-node and cross-node traffic.

use std::path::Path;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, PostParams};
use tortie::api::ippool::EncapMode;
use tortie::api::{IPPool, IPPoolSpec};

use super::{Daemon, DaemonOpts, Host};
use crate::support::{self, ControlPlane, NetNs, veth_pair};

pub const READY: std::time::Duration = std::time::Duration::from_secs(90);
pub const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];
const VNET: [&str; 2] = ["172.31.79.1/24", "172.31.79.2/24"];
pub const POOL_CIDR: &str = "10.245.0.0/16";

pub struct Cluster {
    pub cp: ControlPlane,
    pub hosts: [Host; 2],
    pub dirs: [tempfile::TempDir; 2],
    pub daemons: [Option<Daemon>; 2],
    /// Each node's resync interval in seconds.
    resync_secs: [u64; 2],
}

impl Cluster {
    /// Node namespaces `<label>-a` / `<label>-b`, the control plane on node a's root link,
    /// both Node objects, the pool, and both daemons ready.
    pub async fn start(label: &str, resync_secs: [u64; 2]) -> anyhow::Result<Cluster> {
        let hosts = [
            Host::new(&format!("{label}-a"))?,
            Host::new(&format!("{label}-b"))?,
        ];
        veth_pair(&hosts[0].ns, "eth0", &hosts[1].ns, "eth0")?;
        for (h, ip) in hosts.iter().zip(VNET) {
            h.ns.exec_ok(&["ip", "addr", "add", ip, "dev", "eth0"])?;
            h.ns.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        hosts[1].route_to(hosts[0].root_ip)?;
        let cp = ControlPlane::start_on(hosts[0].root_ip.into()).await?;
        for name in NODE_NAMES {
            cp.create_node(name, &[]).await?;
        }
        let pool = IPPool::new(
            "default-pool",
            IPPoolSpec {
                cidr: POOL_CIDR.into(),
                block_size: Some(26),
                vxlan_mode: EncapMode::Always,
                ..Default::default()
            },
        );
        Api::<IPPool>::all(cp.client())
            .create(&PostParams::default(), &pool)
            .await
            .context("create pool")?;
        let mut c = Cluster {
            cp,
            hosts,
            dirs: [tempfile::tempdir()?, tempfile::tempdir()?],
            daemons: [None, None],
            resync_secs,
        };
        c.start_daemon(0);
        c.start_daemon(1);
        for i in 0..2 {
            c.daemon(i).wait_readiness(READY, |code, _| code == 200);
        }
        Ok(c)
    }

    /// Policy is not switched on here: it is the default.
    pub fn start_daemon(&mut self, i: usize) {
        self.start_daemon_with(i, &[]);
    }

    pub fn start_daemon_with(&mut self, i: usize, extra: &[(&'static str, &str)]) {
        let mut env = vec![
            ("IP_AUTODETECTION_METHOD", "interface=eth0".into()),
            ("TORTIE_RESYNC_INTERVAL", self.resync_secs[i].to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let d = Daemon::start(
            &self.hosts[i],
            self.dirs[i].path(),
            DaemonOpts {
                kubeconfig: self.cp.kubeconfig_path(),
                node_name: NODE_NAMES[i],
                env,
            },
        );
        self.daemons[i] = Some(d);
    }

    pub fn daemon(&mut self, i: usize) -> &mut Daemon {
        self.daemons[i].as_mut().expect("daemon running")
    }

    pub fn ns(&self, i: usize) -> &NetNs {
        &self.hosts[i].ns
    }

    /// The last lines of each running daemon's log, for failure messages.
    pub fn logs(&self) -> String {
        self.daemons
            .iter()
            .flatten()
            .zip(NODE_NAMES)
            .map(|(d, n)| format!("--- {n} ---\n{}", tail(&d.log(), 40)))
            .collect()
    }

    /// A CNI ADD of `namespace/pod` into `netns` on node `i` through cnitool; the pod's
    /// IPv4 address.
    pub async fn add(
        &self,
        i: usize,
        namespace: &str,
        pod: &str,
        netns: &Path,
    ) -> anyhow::Result<String> {
        let dir = self.dirs[i].path();
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}");
        let out =
            support::cni::run_cnitool(&dir.join("bin"), &dir.join("net.d"), "add", &args, netns)
                .await?;
        anyhow::ensure!(out.ok, "cnitool add {pod}: {} {}", out.stdout, out.stderr);
        let addr = out.json()["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("no address for {pod}: {}", out.stdout))?
            .trim_end_matches("/32")
            .to_string();
        Ok(addr)
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Creates `namespace/name` bound to `node` with `labels` and one container.
pub async fn create_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    node: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<()> {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    create_pod_json(
        client,
        namespace,
        serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]}
        }),
    )
    .await
}

/// Creates the Pod `body` (metadata and spec as JSON) in `namespace`.
pub async fn create_pod_json(
    client: &Client,
    namespace: &str,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(body)?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {namespace}/{name}"))?;
    Ok(())
}
