// Health that tells the truth, against a real control plane and a real `tortie node` in its
// own namespace: the daemon opens exactly one API watch per kind it reads; each loop stalled
// by the test-only fault hook (TORTIE_TEST_FAULTS) turns /readiness 503 naming it within the
// grace time (a stalled calculation fails /liveness too), a watch that cannot list does the
// same, and recovery turns both green again; a panicking loop is named with its message.

mod nodes;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nodes::{Daemon, DaemonOpts, Host};
use support::ControlPlane;
use tortie::api::ippool::EncapMode;
use tortie::api::{IPPool, IPPoolSpec};

const READY: Duration = Duration::from_secs(90);
/// TORTIE_HEALTH_GRACE_SECONDS for the daemon: stalls and failures count after this.
const GRACE_SECS: u64 = 2;
/// How long the test waits for health to change: the grace time plus slack for a busy CI.
const NOTICE: Duration = Duration::from_secs(GRACE_SECS + 10);

async fn pool(cp: &ControlPlane, name: &str, cidr: &str, vxlan: EncapMode) -> anyhow::Result<()> {
    let pool = IPPool::new(
        name,
        IPPoolSpec {
            cidr: cidr.into(),
            block_size: Some(26),
            vxlan_mode: vxlan,
            nat_outgoing: true,
            ..Default::default()
        },
    );
    Api::<IPPool>::all(cp.client())
        .create(&PostParams::default(), &pool)
        .await
        .with_context(|| format!("create pool {name}"))?;
    Ok(())
}

async fn set_nat_outgoing(cp: &ControlPlane, name: &str, on: bool) -> anyhow::Result<()> {
    let patch = serde_json::json!({"spec": {"natOutgoing": on}});
    Api::<IPPool>::all(cp.client())
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Polls `path` until `want(status, body)`; returns how long it took.
async fn wait_health(
    d: &Daemon,
    path: &str,
    timeout: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> Duration {
    let t0 = Instant::now();
    let mut last = Err(String::new());
    while t0.elapsed() < timeout {
        last = d.health(path);
        if let Ok((code, body)) = &last
            && want(*code, body)
        {
            return t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{path} never reached the wanted state in {timeout:?}; last {last:?}\n{}",
        tail(&d.log(), 40)
    );
}

/// The `tortie_datastore_synced` gauge from the daemon's /metrics.
fn synced_metric(d: &Daemon) -> Option<i64> {
    d.metrics_text()
        .lines()
        .find(|l| l.starts_with("tortie_datastore_synced "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn fault(dir: &Path, health_loop: &str, what: Option<&str>) {
    let path = dir.join(health_loop.replace('/', "_"));
    match what {
        Some(w) => std::fs::write(path, w).expect("write fault file"),
        None => {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Open WATCH requests per resource, from the API server's own metrics.
async fn watches(cp: &ControlPlane) -> anyhow::Result<BTreeMap<String, u64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = cp.client().request_text(req).await?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| {
        l.starts_with("apiserver_longrunning_requests{") && l.contains("verb=\"WATCH\"")
    }) {
        // Keyed by group and resource: `networkpolicies` is a kind of two groups
        // (networking.k8s.io and crd.projectcalico.org).
        let label = |name: &str| {
            line.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_default()
                .to_string()
        };
        let (group, resource) = (label("group"), label("resource"));
        let resource = if group.is_empty() {
            resource
        } else {
            format!("{resource}.{group}")
        };
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        *out.entry(resource).or_default() += n as u64;
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_watch_per_kind_and_every_loop_fault_shows_on_health_by_name() -> anyhow::Result<()> {
    let host = Host::new("hl")?;
    host.ns.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])?;
    host.ns.exec_ok(&["ip", "link", "set", "eth0p", "up"])?;
    host.ns
        .exec_ok(&["ip", "addr", "add", "172.31.79.1/24", "dev", "eth0"])?;
    host.ns.exec_ok(&["ip", "link", "set", "eth0", "up"])?;
    let cp = ControlPlane::start_on(host.root_ip.into()).await?;
    cp.create_node("node-h", &[]).await?;
    pool(&cp, "default-pool", "10.244.0.0/16", EncapMode::Always).await?;
    let before = watches(&cp).await?;

    let faults = tempfile::tempdir()?;
    let dir = tempfile::tempdir()?;
    let mut d = Daemon::start(
        &host,
        dir.path(),
        DaemonOpts {
            kubeconfig: cp.kubeconfig_path(),
            node_name: "node-h",
            env: vec![
                ("IP_AUTODETECTION_METHOD", "interface=eth0".into()),
                ("TORTIE_TEST_FAULTS", faults.path().display().to_string()),
                ("TORTIE_HEALTH_GRACE_SECONDS", GRACE_SECS.to_string()),
            ],
        },
    );
    d.wait_readiness(READY, |code, _| code == 200);

    // One watch per kind the daemon reads.
    let after = watches(&cp).await?;
    let opened: BTreeMap<&String, u64> = after
        .iter()
        .map(|(r, n)| (r, n - before.get(r).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    eprintln!("watches opened by tortie node: {opened:?}");
    for (resource, n) in &opened {
        assert_eq!(*n, 1, "{resource}: {n} watches ({opened:?})");
    }
    for kind in [
        "nodes",
        "pods",
        "namespaces",
        "ippools.crd.projectcalico.org",
        "ipamblocks.crd.projectcalico.org",
        "networkpolicies.networking.k8s.io",
        "networkpolicies.crd.projectcalico.org",
    ] {
        assert!(
            opened.contains_key(&kind.to_string()),
            "no {kind} watch: {opened:?}"
        );
    }

    // A stalled calculation: readiness and liveness name it; recovery turns both green.
    fault(faults.path(), "calculation", Some("stall"));
    pool(&cp, "second-pool", "10.245.0.0/16", EncapMode::Never).await?;
    let took = wait_health(&d, "/readiness", NOTICE, |c, b| {
        c == 503 && b.contains("loop calculation stalled")
    })
    .await;
    eprintln!("calculation stall on /readiness after {took:?}");
    wait_health(&d, "/liveness", NOTICE, |c, b| {
        c == 503 && b.contains("calculation")
    })
    .await;
    fault(faults.path(), "calculation", None);
    wait_health(&d, "/readiness", NOTICE, |c, _| c == 200).await;
    wait_health(&d, "/liveness", NOTICE, |c, _| c == 200).await;

    // A stalled NAT driver: readiness names it, liveness stays green (not vital).
    fault(faults.path(), "dataplane/nat", Some("stall"));
    set_nat_outgoing(&cp, "second-pool", false).await?;
    wait_health(&d, "/readiness", NOTICE, |c, b| {
        c == 503 && b.contains("loop dataplane/nat stalled")
    })
    .await;
    assert_eq!(d.health("/liveness").map(|r| r.0), Ok(200));
    fault(faults.path(), "dataplane/nat", None);
    wait_health(&d, "/readiness", NOTICE, |c, _| c == 200).await;

    // A stalled overlay driver, woken by a hand-deleted vxlan.calico.
    fault(faults.path(), "dataplane/overlay", Some("stall"));
    host.ns.exec_ok(&["ip", "link", "del", "vxlan.calico"])?;
    wait_health(&d, "/readiness", NOTICE, |c, b| {
        c == 503 && b.contains("loop dataplane/overlay stalled")
    })
    .await;
    fault(faults.path(), "dataplane/overlay", None);
    wait_health(&d, "/readiness", NOTICE, |c, _| c == 200).await;
    assert!(
        host.ns
            .exec(&["ip", "link", "show", "vxlan.calico"])
            .status
            .success(),
        "the resumed pass recreated the device"
    );

    // A stalled IPAM block writer (as if stuck in one API write): readiness names the
    // block; the ADD queued behind it completes once the writer moves again.
    fault(faults.path(), "ipam/writer", Some("stall"));
    support::pods::create_pod_on(&cp.client(), "default", "hp", "node-h", &[]).await?;
    let pod_ns = support::NetNs::new("hl-p")?;
    let add = {
        let (dir, netns) = (d.dir.clone(), pod_ns.path());
        tokio::spawn(async move { support::cni::cnitool_add_v4(&dir, "hp", &netns).await })
    };
    wait_health(&d, "/readiness", NOTICE, |c, b| {
        c == 503 && b.contains("loop ipam/writer/10.244.") && b.contains("stalled")
    })
    .await;
    fault(faults.path(), "ipam/writer", None);
    let ip = add.await??;
    anyhow::ensure!(ip.starts_with("10.244."), "pod address {ip}");
    wait_health(&d, "/readiness", NOTICE, |c, _| c == 200).await;

    // A watch that cannot list (its CRD deleted) past the grace time; restored, green again.
    // IPReservation is a kind only the IPAM view watches: its failure reaches readiness
    // (named, after the grace time) and `tortie_datastore_synced` (at once) like the
    // datastore's own watches.
    assert_eq!(synced_metric(&d), Some(1), "synced before the fault");
    let crds: Api<CustomResourceDefinition> = Api::all(cp.client());
    let name = "ipreservations.crd.projectcalico.org";
    let mut crd = crds.get(name).await?;
    crds.delete(name, &DeleteParams::default()).await?;
    wait_health(
        &d,
        "/readiness",
        NOTICE + Duration::from_secs(30),
        |c, b| c == 503 && b.contains("ipam/watches IPReservation failing"),
    )
    .await;
    assert_eq!(
        synced_metric(&d),
        Some(0),
        "tortie_datastore_synced while the IPAM watch fails"
    );
    crd.metadata.resource_version = None;
    crd.metadata.uid = None;
    crd.metadata.creation_timestamp = None;
    crd.metadata.managed_fields = None;
    crd.status = None;
    // The old object may still be terminating for a moment.
    let t0 = Instant::now();
    while let Err(e) = crds.create(&PostParams::default(), &crd).await {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "recreate {name}: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_health(&d, "/readiness", Duration::from_secs(60), |c, _| c == 200).await;
    let t0 = Instant::now();
    while synced_metric(&d) != Some(1) {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "tortie_datastore_synced stays {:?} after recovery",
            synced_metric(&d)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A panicking loop: named with its message on both probes (kubelet restarts the pod).
    fault(faults.path(), "dataplane/nat", Some("panic"));
    set_nat_outgoing(&cp, "second-pool", true).await?;
    wait_health(&d, "/readiness", NOTICE, |c, b| {
        c == 503 && b.contains("loop dataplane/nat ended: panicked: injected fault")
    })
    .await;
    wait_health(&d, "/liveness", NOTICE, |c, b| {
        c == 503 && b.contains("dataplane/nat")
    })
    .await;
    assert!(d.log().contains("injected fault in loop dataplane/nat"));
    Ok(())
}
