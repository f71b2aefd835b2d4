//! Start-up in DESIGN's order: CNI binaries into the host → API client → node IP → watches
//! synced (then IPAM and the tunnel addresses, which need the pools) → CNI socket serving →
//! first full dataplane apply → conflist written → ready. Each wait is reported on its
//! readiness condition; start-up never touches existing routes or pods' plumbing.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;

use super::dataplane::{Drivers, FirstOutcome, IpipFeedback, Wanted};
use super::ipam_jobs::{IpamJobs, JobContext};
use super::overlay::Overlay;
use super::overlay_metrics::OverlayMetrics;
use super::tunnel::Publisher;
use super::{NodeError, identity};
use crate::cni::service::{self, CniService};
use crate::config::NodeConfig;
use crate::dataplane::monitor::Monitor;
use crate::dataplane::{Kernel, mtu};
use crate::datastore::lease::{Election, LeaderElector, LeaseConfig};
use crate::datastore::{self, Datastore, DatastoreStatus};
use crate::felix_config::{follow, live};
use crate::health::{Expect, Registry, grace};
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
    /// The loops' health (readiness and liveness read it on every probe).
    pub health: Registry,
}

impl Conditions {
    pub fn new(readiness: &Readiness) -> Conditions {
        Conditions {
            datastore: readiness.condition("datastore", "datastore not synced: not started"),
            cni: readiness.condition("cni", "CNI socket not serving yet"),
            dataplane: readiness.condition("dataplane", "node identity not established yet"),
            health: readiness.health.clone(),
        }
    }
}

/// Everything start-up started, for the main loop and the shutdown path.
pub struct Running {
    pub datastore: Datastore,
    pub election: Election,
    pub cni: CniService,
    pub drivers: Drivers,
    /// The policy driver, unless turned off (`TORTIE_POLICY=false`).
    pub policy: Option<tokio::task::AbortHandle>,
    pub ipam_jobs: IpamJobs,
    /// FelixConfiguration follower and the live values derived from it.
    pub settings: Vec<tokio::task::AbortHandle>,
}

impl Running {
    /// Stops every loop (after the caller signalled `stopped`) and waits for the Lease to be
    /// released. The kernel is left as it is: a restart must not cut pods off.
    pub async fn stop(self) {
        self.drivers.stop();
        if let Some(p) = &self.policy {
            p.abort();
        }
        self.ipam_jobs.stop();
        self.settings
            .iter()
            .for_each(tokio::task::AbortHandle::abort);
        self.cni.task.abort();
        self.datastore.stop().await;
        self.election.stopped().await;
    }
}

/// Where the health and metrics servers should listen; start-up keeps them at the merged
/// FelixConfiguration value.
pub struct Listeners {
    pub health: watch::Sender<std::net::SocketAddr>,
    pub metrics: watch::Sender<std::net::SocketAddr>,
}

pub async fn start(
    cfg: &NodeConfig,
    metrics: &Metrics,
    ready: &Conditions,
    stopped: watch::Receiver<bool>,
    listeners: Listeners,
) -> Result<Running, NodeError> {
    let node = cfg.node_name.as_str();
    service::install_binaries(&cfg.cni)?;
    let conn = datastore::connect(&cfg.kube).await?;
    tracing::info!(api_server = %conn.url, "API client ready");
    let client = conn.client.clone();
    // Watches start now so that their progress (or the API server's absence) shows on
    // readiness while the node IP is found; start-up waits for their sync after that.
    let mut datastore = Datastore::start(&conn);
    datastore.supervise(&ready.health);
    let mirror = tokio::spawn(mirror_status(
        datastore.status.clone(),
        ready.datastore.clone(),
        metrics.clone(),
        None,
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
    let shared = crate::ipam::store::view::Shared {
        pools: datastore.view.ip_pools.clone(),
        nodes: datastore.view.nodes.clone(),
        changes: datastore.view.changes.clone(),
    };
    let ipam = Arc::new(start_ipam(&client, node, shared).await);
    // One Pod watch for the daemon: the GC and the CNI read the same store.
    // Its changes wake the calculations as the view's own stores do (policy reads pods).
    let (pods, pods_watch) =
        crate::ipam::gc::watch_pods_notifying(client.clone(), datastore.notifier());
    // Its initial list (the biggest of all) may still be under way when start-up ends.
    let listed = pods.clone();
    tokio::spawn(async move {
        if crate::datastore::ready::listed(&listed).await.is_ok() {
            crate::memory::trim();
        }
    });
    let jobs = JobContext {
        client: client.clone(),
        nodes: datastore.view.nodes.clone(),
        is_leader: election.is_leader.clone(),
        stopped: stopped.clone(),
        health: ready.health.clone(),
    };
    let mut ipam_jobs = IpamJobs::start(
        &jobs,
        metrics,
        ipam.clone(),
        cfg.ipam_gc_grace,
        (pods.clone(), pods_watch),
    )?;
    watch_ipam_health(&ready.health, ipam.clone());
    if let Some(pool) = cfg.default_pool.clone() {
        ipam_jobs.start_default_pool(&jobs, pool, node);
    }
    ipam.supervise(&ready.health);
    // From here `tortie_datastore_synced` also covers the IPAM view's watches.
    mirror.abort();
    tokio::spawn(mirror_status(
        datastore.status.clone(),
        ready.datastore.clone(),
        metrics.clone(),
        Some(ipam.clone()),
    ));

    // FelixConfiguration merged with the explicit flags (Felix's precedence), live from here;
    // the datastore synced, so start-up already uses the cluster's settings.
    let (effective, follow_task) = follow::spawn(follow::Inputs {
        node: node.to_string(),
        local: cfg.felix_local.clone(),
        configs: datastore.view.felix_configs.clone(),
        nodes: datastore.view.nodes.clone(),
        client: client.clone(),
        is_leader: election.is_leader.clone(),
        changes: Some(datastore.view.changes.clone()),
    });
    let log_task = tokio::spawn(follow_log_filter(effective.clone()));
    let listen_task = tokio::spawn(follow_listeners(effective.clone(), listeners));

    let kernel = Kernel::host()?;
    let host_mtu = mtu::host_mtu(&kernel.handle).await?;
    let (host_mtu_tx, host_mtu_rx) = watch::channel(host_mtu);
    let host_mtu_task = tokio::spawn(follow_host_mtu(Kernel::host()?, host_mtu_tx));
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let (derived, live_task) = live::spawn(live::Inputs {
        effective: effective.clone(),
        host_mtu: host_mtu_rx.clone(),
        pools: datastore.view.ip_pools.clone(),
        cni_mtu: cfg.cni.cni_mtu,
        kernel_release: release,
        changes: Some(datastore.view.changes.clone()),
    });
    let config = derived.overlay.borrow().clone();
    let overlay_metrics = OverlayMetrics::register(metrics)?;
    let mut overlay = Overlay::new(
        datastore.view.clone(),
        ipam.clone(),
        Publisher::new(client.clone(), node),
        Some(address.address),
        config,
        overlay_metrics.clone(),
    );
    overlay.config_updates = Some(derived.overlay.clone());
    // The first pass allocates and publishes the tunnel addresses before any pod exists.
    let first = overlay
        .recalculate()
        .await
        .ok_or(NodeError::NoFirstCalculation)?;
    let pod_mtu = derived.pod_mtu.clone();
    let mtu_metrics_task = tokio::spawn(mirror_mtus(
        host_mtu_rx,
        pod_mtu.clone(),
        overlay_metrics.clone(),
    ));
    let resync_interval = effective.borrow().route_refresh;

    let policy_pods = pods.clone();
    let policy_client = client.clone();
    // The registry of pods the CNI plumbs, read by the policy driver: ADD waits on it.
    let endpoints = cfg
        .policy
        .then(|| Arc::new(crate::cni::handlers::endpoints::LocalEndpoints::default()));
    let cni = CniService::start(
        &cfg.cni,
        node,
        pod_mtu,
        client,
        ipam,
        stopped.clone(),
        &ready.health,
        Some(crate::cni::handlers::SharedStores {
            pods,
            namespaces: datastore.view.policy.namespaces.clone(),
            endpoints: endpoints.clone(),
        }),
    )
    .await?;
    metrics.register("tortie_cni_*", cni.daemon.metrics().clone())?;
    ready
        .cni
        .set_not_ready("CNI socket serving; conflist not written until the first dataplane apply");

    let (dataplane_tx, dataplane_rx) = watch::channel(first.dataplane);
    let (nat_tx, nat_rx) = watch::channel(first.nat);
    let policy_failures = overlay_metrics.failures.clone();
    let policy_apply = overlay_metrics.apply_seconds.clone();
    let drivers = Drivers::start(
        kernel,
        Wanted {
            dataplane: dataplane_rx,
            nat: nat_rx,
        },
        resync_interval,
        overlay_metrics,
        IpipFeedback {
            missing: overlay.ipip_missing.clone(),
            recheck: overlay.recheck.clone(),
        },
        &ready.health,
    );
    // The calculation is vital: if it is stuck nothing else converges, so kubelet must
    // restart the daemon (liveness), not only stop sending it traffic.
    let calc_expect = Expect {
        stall_after: Some(grace()),
        fail_after: grace(),
        vital: true,
        finishes: false,
    };
    let calc_pulse = ready.health.register("calculation", calc_expect);
    ready.health.supervise(
        "calculation",
        calc_expect,
        tokio::spawn(overlay.run(dataplane_tx, nat_tx, stopped, calc_pulse)),
    );
    ready
        .dataplane
        .set_not_ready("first dataplane apply not done yet");
    if !cfg.policy {
        super::policy::remove_table().await;
    }
    let policy = match endpoints {
        Some(endpoints) => Some(super::policy::start(
            super::policy::Inputs {
                view: datastore.view.clone(),
                pods: policy_pods,
                endpoints,
                node: node.to_string(),
                interval: resync_interval,
                failures: policy_failures,
                obs: super::policy_obs::PolicyObs::start(
                    metrics,
                    policy_apply,
                    policy_client,
                    election.is_leader.clone(),
                    node,
                    cfg.policy_cut_denied_connections,
                )?,
            },
            &ready.health,
        )),
        None => None,
    };
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
        policy,
        ipam_jobs,
        settings: supervise_settings(
            &ready.health,
            vec![
                ("settings/felixconfiguration", follow_task),
                ("settings/log-filter", log_task),
                ("settings/listeners", listen_task),
                ("settings/host-mtu", host_mtu_task),
                ("settings/live", live_task),
                ("settings/mtu-metrics", mtu_metrics_task),
            ],
        ),
    })
}

/// The settings followers wait on their inputs with no bound on the work, so only their end
/// (a return or a panic) is news: it revokes readiness by name, since the node would go on
/// with stale settings.
fn supervise_settings(
    health: &Registry,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
) -> Vec<tokio::task::AbortHandle> {
    let expect = Expect {
        stall_after: None,
        ..Expect::default()
    };
    tasks
        .into_iter()
        .map(|(name, task)| health.supervise(name, expect, task))
        .collect()
}

/// The IPAM view's watches on the health registry: a kind that keeps failing past the grace
/// time revokes readiness (evaluated when probed; no timer).
fn watch_ipam_health(health: &Registry, ipam: Arc<Ipam>) {
    health.probe("ipam/watches", grace(), move || ipam.watch_failures());
}

/// Keeps `tx` at the detected host MTU, so new pods follow a host MTU change: measured
/// again when the kernel reports a link change (a burst of pod veths costs one measurement
/// per debounce window), never on a timer.
async fn follow_host_mtu(kernel: Kernel, tx: watch::Sender<u32>) {
    const DEBOUNCE: Duration = Duration::from_millis(100);
    let mut monitor = match Monitor::links() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch links; the host MTU stays as detected at start");
            return;
        }
    };
    while monitor.next().await.is_some() {
        // Coalesce the rest of a burst before measuring.
        while let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, monitor.next()).await {}
        match mtu::host_mtu(&kernel.handle).await {
            Ok(m) => {
                tx.send_if_modified(|cur| {
                    let changed = *cur != m;
                    if changed {
                        tracing::info!(old = *cur, new = m, "host MTU changed");
                        *cur = m;
                    }
                    changed
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot measure the host MTU; keeping the last"),
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// `logSeverityScreen` applied live (unless the log filter was given explicitly).
async fn follow_log_filter(mut effective: watch::Receiver<crate::felix_config::Effective>) {
    let mut current: Option<String> = None;
    loop {
        let want = effective.borrow_and_update().log_filter.clone();
        if want != current {
            let filter = want
                .clone()
                .unwrap_or_else(|| crate::telemetry::DEFAULT_FILTER.to_string());
            match crate::telemetry::set_filter(&filter) {
                Ok(()) => tracing::info!(%filter, "log filter set"),
                Err(e) => tracing::warn!(error = %e, "cannot change the log filter"),
            }
            current = want;
        }
        if effective.changed().await.is_err() {
            return;
        }
    }
}

/// The HTTP servers' addresses follow the merged settings.
async fn follow_listeners(
    mut effective: watch::Receiver<crate::felix_config::Effective>,
    to: Listeners,
) {
    loop {
        let (health, metrics) = {
            let e = effective.borrow_and_update();
            (e.health, e.metrics)
        };
        to.health
            .send_if_modified(|a| std::mem::replace(a, health) != health);
        to.metrics
            .send_if_modified(|a| std::mem::replace(a, metrics) != metrics);
        if effective.changed().await.is_err() {
            return;
        }
    }
}

/// `tortie_host_mtu_bytes` and `tortie_pod_mtu_bytes` follow the live values.
async fn mirror_mtus(
    mut host: watch::Receiver<u32>,
    mut pod: watch::Receiver<u32>,
    metrics: OverlayMetrics,
) {
    loop {
        metrics.host_mtu.set(i64::from(*host.borrow_and_update()));
        metrics.pod_mtu.set(i64::from(*pod.borrow_and_update()));
        tokio::select! {
            r = host.changed() => if r.is_err() { return },
            r = pod.changed() => if r.is_err() { return },
        }
    }
}

async fn wait_synced(datastore: &Datastore) -> Result<(), NodeError> {
    let mut status = datastore.status.clone();
    status
        .wait_for(|s| s.synced)
        .await
        .map_err(|_| NodeError::WatchesEnded)?;
    Ok(())
}

/// For the daemon's life: the datastore's sync state on readiness and in the metrics;
/// with `ipam`, the metric is synced only while no IPAM watch fails either (readiness
/// learns of those through the `ipam/watches` probe, after the grace time).
async fn mirror_status(
    mut status: watch::Receiver<DatastoreStatus>,
    ready: Condition,
    metrics: Metrics,
    ipam: Option<Arc<Ipam>>,
) {
    let mut ipam_failures = ipam.as_ref().map(|i| i.watch_failures_changed());
    loop {
        let current = status.borrow_and_update().clone();
        if let Some(rx) = ipam_failures.as_mut() {
            rx.borrow_and_update();
        }
        let ipam_ok = ipam.as_ref().is_none_or(|i| i.watch_failures().is_empty());
        report_datastore(&current, ipam_ok, &ready, &metrics);
        let ipam_changed = async {
            match ipam_failures.as_mut() {
                Some(rx) => rx.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = status.changed() => if r.is_err() { return },
            r = ipam_changed => if r.is_err() { return },
        }
    }
}

fn report_datastore(status: &DatastoreStatus, ipam_ok: bool, ready: &Condition, metrics: &Metrics) {
    metrics.apiserver_connected.set(i64::from(status.connected));
    // A lost API server fails every watch: that shows as `tortie_apiserver_connected`, and
    // the stores keep their data, so they stay synced. A watch failing while the API server
    // answers (a CRD removed, RBAC revoked) is out of sync.
    let ipam_ok = ipam_ok || !status.connected;
    metrics
        .datastore_synced
        .set(i64::from(status.synced && ipam_ok));
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

async fn start_ipam(client: &Client, node: &str, shared: crate::ipam::store::view::Shared) -> Ipam {
    loop {
        match Ipam::start_with(
            client.clone(),
            node,
            IPAM_SYNC_TIMEOUT,
            Some(shared.clone()),
        )
        .await
        {
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
