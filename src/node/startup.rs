//! Start-up in DESIGN's order: CNI binaries into the host → API client → node IP → watches
//! synced (then IPAM and the tunnel addresses, which need the pools) → CNI socket serving →
//! first full dataplane apply → conflist written → ready. Each wait is reported on its
//! readiness condition; start-up never touches existing routes or pods' plumbing.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;

use super::dataplane::{Drivers, FirstOutcome};
use super::ipam_jobs::IpamJobs;
use super::overlay::Overlay;
use super::overlay_metrics::OverlayMetrics;
use super::tunnel::Publisher;
use super::{NodeError, identity};
use crate::calc::mtu::pod_mtu;
use crate::calc::offload::vxlan_tx_checksum_offload;
use crate::calc::{ClusterView as CalcView, OverlayConfig};
use crate::cni::service::{self, CniService};
use crate::config::NodeConfig;
use crate::dataplane::{Kernel, mtu};
use crate::datastore::lease::{Election, LeaderElector, LeaseConfig};
use crate::datastore::{self, Datastore, DatastoreStatus};
use crate::http::{Condition, Readiness};
use crate::ipam::Ipam;
use crate::metrics::Metrics;

const RETRY: Duration = Duration::from_secs(2);
const IPAM_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's readiness, one condition per start-up stage.
pub struct Conditions {
    pub datastore: Condition,
    pub cni: Condition,
    pub dataplane: Condition,
}

impl Conditions {
    pub fn new(readiness: &Readiness) -> Conditions {
        Conditions {
            datastore: readiness.condition("datastore", "datastore not synced: not started"),
            cni: readiness.condition("cni", "CNI socket not serving yet"),
            dataplane: readiness.condition("dataplane", "node identity not established yet"),
        }
    }
}

/// Everything start-up started, for the main loop and the shutdown path.
pub struct Running {
    pub datastore: Datastore,
    pub election: Election,
    pub cni: CniService,
    pub drivers: Drivers,
    pub ipam_jobs: IpamJobs,
}

impl Running {
    /// Stops every loop (after the caller signalled `stopped`) and waits for the Lease to be
    /// released. The kernel is left as it is: a restart must not cut pods off.
    pub async fn stop(self) {
        self.drivers.stop();
        self.ipam_jobs.stop();
        self.cni.task.abort();
        self.datastore.stop().await;
        self.election.stopped().await;
    }
}

pub async fn start(
    cfg: &NodeConfig,
    metrics: &Metrics,
    ready: &Conditions,
    stopped: watch::Receiver<bool>,
) -> Result<Running, NodeError> {
    let node = cfg.node_name.as_str();
    service::install_binaries(&cfg.cni)?;
    let conn = datastore::connect(&cfg.kube).await?;
    tracing::info!(api_server = %conn.url, "API client ready");
    let client = conn.client.clone();
    // Watches start now so that their progress (or the API server's absence) shows on
    // readiness while the node IP is found; start-up waits for their sync after that.
    let datastore = Datastore::start(&conn);
    tokio::spawn(mirror_status(
        datastore.status.clone(),
        ready.datastore.clone(),
        metrics.clone(),
    ));

    let address = loop {
        match identity::establish(&client, node, identity::Family::V4, &cfg.autodetection).await {
            Ok(a) => break a,
            Err(e) => {
                // A missing Node is most often a wrong NODENAME.
                tracing::warn!(error = %e, node, "node identity not established (check NODENAME if the Node is not found); retrying");
                ready.dataplane.set_not_ready(format!("node identity: {e}"));
                tokio::time::sleep(RETRY).await;
            }
        }
    };

    wait_synced(&datastore).await?;
    let election = start_election(&client, cfg, stopped.clone())?;
    let ipam = Arc::new(start_ipam(&client, node).await);
    let ipam_jobs = IpamJobs::start(
        metrics,
        ipam.clone(),
        client.clone(),
        datastore.view.nodes.clone(),
        election.is_leader.clone(),
        cfg.ipam_gc_grace,
        stopped.clone(),
    )?;

    let kernel = Kernel::host()?;
    let host_mtu = mtu::host_mtu(&kernel.handle).await?;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let config = OverlayConfig {
        host_mtu,
        vxlan_tx_checksum_offload: vxlan_tx_checksum_offload(cfg.checksum_offload_broken, &release),
        ..OverlayConfig::default()
    };
    let overlay_metrics = OverlayMetrics::register(metrics)?;
    let mut overlay = Overlay::new(
        datastore.view.clone(),
        ipam.clone(),
        Publisher::new(client.clone(), node),
        Some(address.address),
        config,
        overlay_metrics.clone(),
    );
    // The first pass allocates and publishes the tunnel addresses before any pod exists.
    let first = overlay
        .recalculate()
        .await
        .ok_or(NodeError::NoFirstCalculation)?;
    let view = overlay.last_view().cloned().unwrap_or_default();
    let pod_mtu = chosen_pod_mtu(cfg.cni.cni_mtu, host_mtu, &view);
    overlay_metrics.host_mtu.set(i64::from(host_mtu));
    overlay_metrics.pod_mtu.set(i64::from(pod_mtu));
    tracing::info!(host_mtu, pod_mtu, "MTU chosen");

    let cni = CniService::start(&cfg.cni, node, pod_mtu, client, ipam, stopped.clone()).await?;
    ready
        .cni
        .set_not_ready("CNI socket serving; conflist not written until the first dataplane apply");

    let (dataplane_tx, dataplane_rx) = watch::channel(first.dataplane);
    let (nat_tx, nat_rx) = watch::channel(first.nat);
    let drivers = Drivers::start(
        kernel,
        dataplane_rx,
        nat_rx,
        cfg.resync_interval,
        overlay_metrics,
        overlay.ipip_missing.clone(),
        overlay.recheck.clone(),
    );
    tokio::spawn(overlay.run(dataplane_tx, nat_tx, stopped));
    ready
        .dataplane
        .set_not_ready("first dataplane apply not done yet");
    wait_first(drivers.overlay_outcome.clone(), &ready.dataplane, "overlay").await;
    wait_first(drivers.nat_outcome.clone(), &ready.dataplane, "NAT table").await;
    ready.dataplane.set_ready();

    let written = cni.write_conflist()?;
    tracing::info!(outcome = ?written, "CNI conflist in place; kubelet may call the plugin");
    ready.cni.set_ready();
    Ok(Running {
        datastore,
        election,
        cni,
        drivers,
        ipam_jobs,
    })
}

/// Configured, or the host MTU less the overhead of the encapsulations the pools use.
fn chosen_pod_mtu(configured: u32, host_mtu: u32, view: &CalcView) -> u32 {
    if configured != 0 {
        return configured;
    }
    pod_mtu(host_mtu, view.vxlan_enabled(), view.ipip_enabled())
}

async fn wait_synced(datastore: &Datastore) -> Result<(), NodeError> {
    let mut status = datastore.status.clone();
    status
        .wait_for(|s| s.synced)
        .await
        .map_err(|_| NodeError::WatchesEnded)?;
    Ok(())
}

/// For the daemon's life: the datastore's sync state on readiness and in the metrics.
async fn mirror_status(
    mut status: watch::Receiver<DatastoreStatus>,
    ready: Condition,
    metrics: Metrics,
) {
    loop {
        let current = status.borrow_and_update().clone();
        report_datastore(&current, &ready, &metrics);
        if status.changed().await.is_err() {
            return;
        }
    }
}

fn report_datastore(status: &DatastoreStatus, ready: &Condition, metrics: &Metrics) {
    metrics.apiserver_connected.set(i64::from(status.connected));
    metrics.datastore_synced.set(i64::from(status.synced));
    match &status.problem {
        None => {
            tracing::info!("datastore synced");
            ready.set_ready();
        }
        Some(problem) => {
            tracing::info!(reason = %problem, "not ready");
            ready.set_not_ready(problem.clone());
        }
    }
}

fn start_election(
    client: &Client,
    cfg: &NodeConfig,
    stopped: watch::Receiver<bool>,
) -> Result<Election, NodeError> {
    let lease = LeaseConfig {
        namespace: cfg.lease_namespace.clone(),
        ..LeaseConfig::new(cfg.node_name.clone())
    };
    let election = LeaderElector::new(client.clone(), lease)?.run(stopped);
    let mut leader = election.is_leader.clone();
    tokio::spawn(async move {
        while leader.changed().await.is_ok() {
            tracing::info!(
                leader = *leader.borrow(),
                "cluster-wide job leadership changed"
            );
        }
    });
    Ok(election)
}

async fn start_ipam(client: &Client, node: &str) -> Ipam {
    loop {
        match Ipam::start(client.clone(), node, IPAM_SYNC_TIMEOUT).await {
            Ok(ipam) => return ipam,
            Err(e) => {
                tracing::warn!(error = %e, "IPAM not synced; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Waits until a driver's pass succeeded, showing its latest failure as the reason.
async fn wait_first(mut outcome: FirstOutcome, ready: &Condition, what: &str) {
    loop {
        if let Some(result) = outcome.borrow_and_update().clone() {
            match result {
                Ok(()) => return,
                Err(e) => ready.set_not_ready(format!("{what} apply failed: {e}")),
            }
        }
        if outcome.changed().await.is_err() {
            // The driver ended (only at shutdown): the caller's select ends start-up.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calc::{EncapMode, PoolInfo};

    fn view(vxlan: EncapMode, ipip: EncapMode) -> CalcView {
        CalcView {
            pools: vec![PoolInfo {
                cidr: "10.244.0.0/16".parse().expect("cidr"),
                vxlan_mode: vxlan,
                ipip_mode: ipip,
                nat_outgoing: true,
            }],
            ..CalcView::default()
        }
    }

    #[test]
    fn pod_mtu_is_configured_or_host_minus_the_encapsulation() {
        let never = EncapMode::Never;
        assert_eq!(
            chosen_pod_mtu(0, 1500, &view(EncapMode::Always, never)),
            1450
        );
        assert_eq!(
            chosen_pod_mtu(0, 1500, &view(never, EncapMode::CrossSubnet)),
            1480
        );
        assert_eq!(chosen_pod_mtu(0, 1500, &view(never, never)), 1500);
        assert_eq!(
            chosen_pod_mtu(1400, 1500, &view(EncapMode::Always, never)),
            1400
        );
    }
}
