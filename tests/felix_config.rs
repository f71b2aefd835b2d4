// FelixConfiguration through a real `tortie node` in a node namespace: the Lease holder
// creates the `default` objects Calico's tools expect, and a change of `default` or of the
// node's own `node.<name>` (which wins) reaches the VXLAN device, the pod MTU metric and the
// next pod's MTU without a restart, as does a host MTU change; the health and metrics
// servers move to the configured ports; a field tortie does not apply is logged.

mod nodes;
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use kube::api::{Api, Patch, PatchParams, PostParams};
use nodes::{Daemon, DaemonOpts, Host};
use support::{ControlPlane, NetNs};
use tortie::api::ippool::EncapMode;
use tortie::api::{
    ClusterInformation, FelixConfiguration, FelixConfigurationSpec, IPAMConfig, IPPool, IPPoolSpec,
    KubeControllersConfiguration,
};

const NODE: &str = "fc-node";

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !f() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn vxlan(host: &Host) -> String {
    host.ns
        .exec_ok(&["ip", "-d", "link", "show", "vxlan.calico"])
        .unwrap_or_default()
}

#[tokio::test]
async fn felix_configuration_changes_reach_the_vxlan_device_and_the_next_pod_live()
-> anyhow::Result<()> {
    let host = Host::new("fc")?;
    // The node's NIC: one end of a veth pair inside the node namespace (MTU 1500).
    host.ns.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])?;
    host.ns.exec_ok(&["ip", "link", "set", "eth0p", "up"])?;
    host.ns
        .exec_ok(&["ip", "addr", "add", "172.31.88.1/24", "dev", "eth0"])?;
    host.ns.exec_ok(&["ip", "link", "set", "eth0", "up"])?;
    let cp = ControlPlane::start_on(host.root_ip.into()).await?;
    let client = cp.client();
    cp.create_node(NODE, &[]).await?;
    Api::<IPPool>::all(client.clone())
        .create(
            &PostParams::default(),
            &IPPool::new(
                "default-pool",
                IPPoolSpec {
                    cidr: "10.246.0.0/16".into(),
                    block_size: Some(26),
                    vxlan_mode: EncapMode::Always,
                    ..Default::default()
                },
            ),
        )
        .await?;
    let dir = tempfile::tempdir()?;
    let mut daemon = Daemon::start(
        &host,
        dir.path(),
        DaemonOpts {
            kubeconfig: cp.kubeconfig_path(),
            node_name: NODE,
            env: vec![("IP_AUTODETECTION_METHOD", "interface=eth0".into())],
        },
    );
    daemon.wait_readiness(Duration::from_secs(90), |code, _| code == 200);
    let metric = |d: &Daemon| {
        let text = d.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix("tortie_pod_mtu_bytes "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    assert_eq!(metric(&daemon), Some(1450.0), "{}", daemon.log());
    assert!(vxlan(&host).contains("mtu 1450"), "{}", vxlan(&host));

    // A host MTU change (measured again every 10 s) reaches the device and new pods.
    for nic in ["eth0", "eth0p"] {
        host.ns
            .exec_ok(&["ip", "link", "set", nic, "mtu", "1480"])?;
    }
    wait(
        Duration::from_secs(25),
        "host MTU 1480 -> pod MTU 1430",
        || metric(&daemon) == Some(1430.0) && vxlan(&host).contains("mtu 1430"),
    )
    .with_context(|| daemon.log())?;

    // The leader (the only daemon) created Calico's default objects.
    let felix: Api<FelixConfiguration> = Api::all(client.clone());
    for _ in 0..50 {
        if felix.get_opt("default").await?.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        felix.get_opt("default").await?.is_some(),
        "no FelixConfiguration default:\n{}",
        daemon.log()
    );
    assert!(
        Api::<ClusterInformation>::all(client.clone())
            .get_opt("default")
            .await?
            .is_some()
    );
    assert!(
        Api::<KubeControllersConfiguration>::all(client.clone())
            .get_opt("default")
            .await?
            .is_some()
    );
    assert!(
        Api::<IPAMConfig>::all(client.clone())
            .get_opt("default")
            .await?
            .is_some()
    );

    // `default`: VXLAN MTU and port, applied without a restart.
    let patch = serde_json::json!({"spec": {"vxlanMTU": 1400, "vxlanPort": 4790,
        "natOutgoingAddress": "192.0.2.1"}});
    felix
        .patch("default", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait(
        Duration::from_secs(15),
        "vxlanMTU 1400 and port 4790",
        || {
            let l = vxlan(&host);
            l.contains("mtu 1400") && l.contains("dstport 4790")
        },
    )
    .with_context(|| format!("{}\n{}", vxlan(&host), daemon.log()))?;
    wait(Duration::from_secs(5), "pod MTU metric 1400", || {
        metric(&daemon) == Some(1400.0)
    })?;

    // `node.<name>` beats `default`.
    felix
        .create(
            &PostParams::default(),
            &FelixConfiguration::new(
                &format!("node.{NODE}"),
                FelixConfigurationSpec {
                    vxlan_mtu: Some(1350),
                    ..Default::default()
                },
            ),
        )
        .await?;
    wait(Duration::from_secs(15), "node.<name> vxlanMTU 1350", || {
        metric(&daemon) == Some(1350.0) && vxlan(&host).contains("mtu 1350")
    })
    .with_context(|| daemon.log())?;

    // The next pod, through the conflist and plugin the daemon installed, gets it.
    support::pods::create_pod_on(&client, "default", "after", NODE, &[]).await?;
    let pod = NetNs::new("pod")?;
    support::cni::cnitool_add_v4(dir.path(), "after", &pod.path()).await?;
    let link = pod.exec_ok(&["ip", "link", "show", "eth0"])?;
    assert!(link.contains("mtu 1350"), "{link}");
    let log = daemon.log();
    assert!(log.contains("natOutgoingAddress"), "{log}");
    let _ = support::cni::run_cnitool(
        &dir.path().join("bin"),
        &dir.path().join("net.d"),
        "del",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=after",
        &pod.path(),
    )
    .await;

    // Ports: the servers move to FelixConfiguration's healthPort and prometheusMetricsPort
    // (no flag set them here), the new one bound before the old one closes.
    let ports = serde_json::json!({"spec": {"healthPort": 9199, "prometheusMetricsPort": 9191}});
    felix
        .patch("default", &PatchParams::default(), &Patch::Merge(&ports))
        .await?;
    let ip = daemon.http_ip;
    wait(
        Duration::from_secs(15),
        "health on 9199 and metrics on 9191",
        || {
            nodes::http_get(ip, 9199, "/liveness").map(|r| r.0) == Ok(200)
                && nodes::http_get(ip, 9191, "/metrics").map(|r| r.0) == Ok(200)
        },
    )
    .with_context(|| daemon.log())?;
    wait(Duration::from_secs(5), "the old ports to close", || {
        nodes::http_get(ip, nodes::HEALTH_PORT, "/liveness").is_err()
            && nodes::http_get(ip, nodes::METRICS_PORT, "/metrics").is_err()
    })?;
    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0));
    Ok(())
}
