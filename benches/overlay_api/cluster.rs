// The benchmark's cluster: the real control plane bound to a root-side test address, two
// node namespaces joined by a veth underlay (172.31.0.0/16), a VXLAN Always pool, and a real
// `tortie node` in each; pods are plumbed by the real cnitool with the daemon's own conflist.
// Everything is torn down by Drop guards (daemons, namespaces, the control plane).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use kube::api::{Api, PostParams};
use tortie::api::ippool::EncapMode;
use tortie::api::{IPPool, IPPoolSpec};

use crate::nodes::{Daemon, DaemonOpts, Host};
use crate::support::{ControlPlane, NetNs, veth_pair};

pub const NAMES: [&str; 2] = ["bench-a", "bench-b"];
pub const UNDERLAY: [&str; 2] = ["172.31.0.1/16", "172.31.0.2/16"];
pub const POOL: &str = "10.244.0.0/16";

pub struct Cluster {
    pub daemons: [Option<Daemon>; 2],
    pub dirs: [tempfile::TempDir; 2],
    pub hosts: [Host; 2],
    pub cp: ControlPlane,
}

impl Cluster {
    pub async fn start() -> anyhow::Result<Cluster> {
        let hosts = [Host::new("oab-a")?, Host::new("oab-b")?];
        veth_pair(&hosts[0].ns, "eth0", &hosts[1].ns, "eth0")?;
        for (h, ip) in hosts.iter().zip(UNDERLAY) {
            h.ns.exec_ok(&["ip", "addr", "add", ip, "dev", "eth0"])?;
            h.ns.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        hosts[1].route_to(hosts[0].root_ip)?;
        let cp = ControlPlane::start_on(hosts[0].root_ip.into()).await?;
        for name in NAMES {
            cp.create_node(name, &[]).await?;
        }
        let pool = IPPool::new(
            "default-pool",
            IPPoolSpec {
                cidr: POOL.into(),
                block_size: Some(26),
                vxlan_mode: EncapMode::Always,
                nat_outgoing: true,
                ..Default::default()
            },
        );
        Api::<IPPool>::all(cp.client())
            .create(&PostParams::default(), &pool)
            .await
            .context("create pool")?;
        let mut c = Cluster {
            daemons: [None, None],
            dirs: [tempfile::tempdir()?, tempfile::tempdir()?],
            hosts,
            cp,
        };
        for (i, name) in NAMES.into_iter().enumerate() {
            let d = Daemon::start(
                &c.hosts[i],
                c.dirs[i].path(),
                DaemonOpts {
                    kubeconfig: c.cp.kubeconfig_path(),
                    node_name: name,
                    env: vec![
                        ("IP_AUTODETECTION_METHOD", "interface=eth0".into()),
                        ("TORTIE_LOG_LEVEL", "info".into()),
                    ],
                },
            );
            c.daemons[i] = Some(d);
        }
        for d in c.daemons.iter_mut().flatten() {
            d.wait_readiness(Duration::from_secs(120), |code, _| code == 200);
        }
        Ok(c)
    }

    pub fn ns(&self, i: usize) -> &NetNs {
        &self.hosts[i].ns
    }

    pub fn stop_daemon(&mut self, i: usize) {
        self.daemons[i] = None;
    }

    pub fn logs(&self) -> String {
        self.daemons
            .iter()
            .zip(NAMES)
            .filter_map(|(d, n)| d.as_ref().map(|d| (d, n)))
            .map(|(d, n)| {
                let log = d.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {n} ---\n{}\n", tail.join("\n"))
            })
            .collect()
    }

    /// Creates Pod `pod` bound to node `i` and runs `cnitool add` for it into `netns`;
    /// returns the pod's IPv4 address.
    pub async fn cni_add(&self, i: usize, pod: &str, netns: &Path) -> anyhow::Result<String> {
        crate::support::pods::create_pod_on(&self.cp.client(), "default", pod, NAMES[i], &[])
            .await?;
        crate::support::cni::cnitool_add_v4(self.dirs[i].path(), pod, netns).await
    }
}
