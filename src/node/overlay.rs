//! The overlay's reaction to the cluster: reads the datastore's stores and the IPAM view,
//! keeps this node's tunnel addresses allocated and published, recalculates the desired
//! dataplane and NAT model, and hands them to the drivers when they change.
//!
//! Event-driven: a change applied by any watch (datastore or IPAM view), a live setting, or
//! the dataplane's recheck wakes it; changes arriving during a pass cost one more pass, not
//! one each, and an unchanged snapshot costs no driver work. No polling: an idle daemon
//! sleeps here until something changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use tokio::sync::{Notify, watch};

use super::overlay_metrics::OverlayMetrics;
use super::snapshot::{self, LocalNode};
use super::tunnel::{self, Publisher, TunnelError};
use crate::calc::nat::{NatModel, NatSettings, desired_nat};
use crate::calc::{ClusterView as CalcView, DesiredDataplane, OverlayConfig, desired_dataplane};
use crate::datastore::ClusterView;
use crate::ipam::{Ipam, TunnelKind};

/// Retry interval for a tunnel address that could not be allocated or published.
const TUNNEL_RETRY: Duration = Duration::from_secs(2);
/// The most one pass waits on the API for a tunnel address: a pass blocked on an
/// unreachable API server must not look like a stuck calculation to the watchdog.
const TUNNEL_API_BUDGET: Duration = Duration::from_secs(10);

/// What the drivers are asked to converge to.
#[derive(Clone, Debug, PartialEq)]
pub struct Wanted {
    pub dataplane: Arc<DesiredDataplane>,
    pub nat: NatModel,
}

pub struct Overlay {
    pub view: ClusterView,
    pub ipam: Arc<Ipam>,
    pub publisher: Publisher,
    pub local_ip: Option<Ipv4Net>,
    pub config: OverlayConfig,
    pub metrics: OverlayMetrics,
    /// Set (and `recheck` notified) by the dataplane once the kernel turned IPIP down:
    /// tunl0 is no longer asked for, so the missing module is reported once, not per pass.
    pub ipip_missing: Arc<AtomicBool>,
    pub recheck: Arc<Notify>,
    /// Live overlay settings (FelixConfiguration); each change recalculates.
    pub config_updates: Option<watch::Receiver<OverlayConfig>>,
    last: Option<(CalcView, bool)>,
    /// A tunnel address was not ready on the last pass: retry after `TUNNEL_RETRY`.
    tunnel_pending: bool,
}

impl Overlay {
    pub fn new(
        view: ClusterView,
        ipam: Arc<Ipam>,
        publisher: Publisher,
        local_ip: Option<IpNet>,
        config: OverlayConfig,
        metrics: OverlayMetrics,
    ) -> Overlay {
        let local_ip = match local_ip {
            Some(IpNet::V4(n)) => Some(n),
            _ => None,
        };
        Overlay {
            view,
            ipam,
            publisher,
            local_ip,
            config,
            metrics,
            ipip_missing: Arc::new(AtomicBool::new(false)),
            recheck: Arc::new(Notify::new()),
            config_updates: None,
            last: None,
            tunnel_pending: false,
        }
    }

    /// The current snapshot; allocates and publishes tunnel addresses the pools call for.
    /// A failed allocation is logged and retried on the next pass.
    pub async fn snapshot(&mut self) -> CalcView {
        let node = self.ipam.node().to_owned();
        let nodes = self.view.nodes.state();
        let pools = self.view.ip_pools.state();
        let mut local = LocalNode {
            name: node.clone(),
            ip: self.local_ip,
            ..LocalNode::default()
        };
        let probe = snapshot::cluster_view(&local, &nodes, &pools, &[]);
        let published = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node.as_str()))
            .and_then(|n| n.metadata.annotations.clone())
            .unwrap_or_default();
        self.tunnel_pending = false;
        let wants = [
            (TunnelKind::Vxlan, probe.vxlan_enabled()),
            (TunnelKind::Ipip, probe.ipip_enabled()),
        ];
        for (kind, wanted) in wants {
            let addr = if wanted {
                let current = published
                    .get(tunnel::annotation_key(kind))
                    .and_then(|v| snapshot::parse_tunnel_addr(v));
                let ensured = tokio::time::timeout(
                    TUNNEL_API_BUDGET,
                    self.publisher.ensure(&self.ipam, kind, current),
                )
                .await
                .unwrap_or_else(|_| Err(TunnelError::TimedOut { kind }));
                match ensured {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!(error = %e, "tunnel address not ready; retrying");
                        self.tunnel_pending = true;
                        tunnel::held(&self.ipam, kind)
                    }
                }
            } else {
                let published = published.contains_key(tunnel::annotation_key(kind));
                if (published || tunnel::held(&self.ipam, kind).is_some())
                    && let Err(e) = tokio::time::timeout(
                        TUNNEL_API_BUDGET,
                        self.publisher.retire(&self.ipam, kind, published),
                    )
                    .await
                    .unwrap_or_else(|_| Err(TunnelError::TimedOut { kind }))
                {
                    tracing::warn!(error = %e, "unused tunnel address not released; retrying");
                    self.tunnel_pending = true;
                }
                None
            };
            match kind {
                TunnelKind::Vxlan => local.vxlan_tunnel_addr = addr,
                TunnelKind::Ipip => local.ipip_tunnel_addr = addr,
            }
        }
        self.ipam.with_view(|v| {
            let blocks: Vec<_> = v.blocks.values().map(|c| &c.block).collect();
            snapshot::cluster_view(&local, &nodes, &pools, &blocks)
        })
    }

    /// Recalculates from the snapshot; None when nothing the calculation reads changed.
    pub async fn recalculate(&mut self) -> Option<Wanted> {
        let view = self.snapshot().await;
        let ipip_missing = self.ipip_missing.load(Ordering::Relaxed);
        let config_changed = match self.config_updates.as_mut() {
            Some(rx) if rx.has_changed().unwrap_or(false) => {
                self.config = rx.borrow_and_update().clone();
                true
            }
            _ => false,
        };
        if !config_changed
            && self
                .last
                .as_ref()
                .is_some_and(|(v, m)| *v == view && *m == ipip_missing)
        {
            return None;
        }
        let mut dataplane = desired_dataplane(&view, &self.config);
        if ipip_missing {
            dataplane.ipip = None;
        }
        let nat = desired_nat(
            &snapshot::nat_pools(&self.view.ip_pools.state()),
            NatSettings {
                vxlan_port: self.config.vxlan_port,
                vxlan_enabled: view.vxlan_enabled(),
            },
        );
        self.metrics
            .hosts
            .set(i64::try_from(view.nodes.len()).unwrap_or(i64::MAX));
        self.metrics.set_routes(&dataplane.routes_by_kind());
        tracing::debug!(
            nodes = view.nodes.len(),
            blocks = view.blocks.len(),
            borrowed = view.borrowed.len(),
            routes = dataplane.routes.len(),
            "overlay recalculated"
        );
        self.last = Some((view, ipip_missing));
        Some(Wanted {
            dataplane: Arc::new(dataplane),
            nat,
        })
    }

    /// Runs until `stopped` turns true, handing each changed part to its driver. `pulse`
    /// reports each pass to the health registry (the watchdog sees a pass that never ends).
    pub async fn run(
        mut self,
        dataplane: watch::Sender<Arc<DesiredDataplane>>,
        nat: watch::Sender<NatModel>,
        mut stopped: watch::Receiver<bool>,
        pulse: crate::health::Pulse,
    ) {
        let mut view_changes = self.view.changes.clone();
        let mut ipam_changes = self.ipam.changes();
        let mut config = self.config_updates.clone();
        // A pass at once: changes between start-up's first pass and these subscriptions
        // would otherwise wait for the next change.
        let mut first = true;
        loop {
            if !std::mem::take(&mut first)
                && self
                    .wait_for_change(
                        &mut view_changes,
                        &mut ipam_changes,
                        &mut config,
                        &mut stopped,
                    )
                    .await
                    .is_none()
            {
                return;
            }
            view_changes.borrow_and_update();
            ipam_changes.borrow_and_update();
            pulse.busy();
            crate::health::faults::check(pulse.name()).await;
            if let Some(w) = self.recalculate().await {
                publish(&dataplane, w.dataplane);
                publish(&nat, w.nat);
            }
            pulse.idle();
        }
    }

    /// Until something the calculation reads changed (Err: stop).
    async fn wait_for_change(
        &self,
        view_changes: &mut watch::Receiver<u64>,
        ipam_changes: &mut watch::Receiver<u64>,
        config: &mut Option<watch::Receiver<OverlayConfig>>,
        stopped: &mut watch::Receiver<bool>,
    ) -> Option<()> {
        {
            let retry = async {
                if self.tunnel_pending {
                    tokio::time::sleep(TUNNEL_RETRY).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                r = view_changes.changed() => r.ok(),
                r = ipam_changes.changed() => r.ok(),
                r = changed(config) => r.ok(),
                _ = self.recheck.notified() => Some(()),
                _ = retry => Some(()),
                _ = stopped.wait_for(|s| *s) => None,
            }
        }
    }
}

/// A settings channel's next change; never, without one.
async fn changed<T>(rx: &mut Option<watch::Receiver<T>>) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// Sends only a value that differs, so one driver is not woken by the other's change.
fn publish<T: PartialEq>(tx: &watch::Sender<T>, value: T) {
    tx.send_if_modified(|current| {
        let changed = *current != value;
        if changed {
            *current = value;
        }
        changed
    });
}
