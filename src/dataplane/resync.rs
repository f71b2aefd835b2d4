//! Keeps the kernel converged over time: applies the latest desired state when it changes,
//! when the kernel reports a change to something tortie owns (debounced), and on a periodic
//! resync (Felix's RouteRefreshInterval, 90 s) that catches anything the monitor missed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{info, warn};

use super::monitor::{Changed, Monitor};
use super::{ApplyReport, DataplaneError, Kernel, apply, links};
use crate::desired::{DesiredDataplane, IPIP_DEVICE, VXLAN_DEVICE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncConfig {
    pub interval: Duration,
    /// Quiet time after a kernel event before applying, so a burst costs one pass.
    pub debounce: Duration,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        ResyncConfig {
            interval: Duration::from_secs(90),
            debounce: Duration::from_millis(100),
        }
    }
}

/// Why an apply ran; reported with its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Desired,
    Kernel,
    Resync,
}

/// Runs until the sender of `desired` is dropped. `report` sees every apply's outcome (for
/// readiness, metrics and drift counters). Applies start at once with the current value.
pub async fn run(
    kernel: Kernel,
    monitor: Option<Monitor>,
    desired: watch::Receiver<Arc<DesiredDataplane>>,
    cfg: ResyncConfig,
    report: impl FnMut(Trigger, &Result<ApplyReport, DataplaneError>),
) {
    run_observed(kernel, monitor, desired, cfg, |_| async {}, report).await
}

/// `run`, with `start` awaited before each pass (the daemon marks the pass busy for its
/// health watchdog there, and tests inject faults).
pub async fn run_observed<F: std::future::Future<Output = ()>>(
    kernel: Kernel,
    mut monitor: Option<Monitor>,
    mut desired: watch::Receiver<Arc<DesiredDataplane>>,
    cfg: ResyncConfig,
    mut start: impl FnMut(Trigger) -> F,
    mut report: impl FnMut(Trigger, &Result<ApplyReport, DataplaneError>),
) {
    let mut trigger = Trigger::Desired;
    let mut devices = links::Devices::default();
    let mut had_conflicts = false;
    loop {
        start(trigger).await;
        let want = desired.borrow_and_update().clone();
        let outcome = apply(&kernel, &want).await;
        match &outcome {
            Ok(r) => {
                had_conflicts = r.routes.conflicts > 0;
                if trigger != Trigger::Desired && r.total().changes() > 0 {
                    info!(?trigger, links = ?r.links, neighbours = ?r.neighbours, routes = ?r.routes, "repaired dataplane drift");
                }
            }
            Err(e) => {
                warn!(?trigger, error = %e, "dataplane apply failed; retrying at the next trigger")
            }
        }
        report(trigger, &outcome);
        // Neighbour events on other devices (pods' ARP) are none of this loop's business.
        if let Ok(d) = links::resolve_devices(&kernel.handle, want.parent_ip).await {
            devices = d;
        }

        let next_resync = Instant::now() + cfg.interval;
        trigger = loop {
            tokio::select! {
                changed = desired.changed() => match changed {
                    Ok(()) => break Trigger::Desired,
                    Err(_) => return,
                },
                event = next_event(&mut monitor) => {
                    let relevant = match event {
                        Some(Changed::Links { ifindex, name }) => ours(&devices, ifindex, name.as_deref()),
                        Some(Changed::Routes { owned }) => owned || had_conflicts,
                        Some(Changed::Neighbours { ifindex }) => Some(ifindex) == devices.vxlan,
                        None => {
                            warn!("kernel monitor closed; relying on the periodic resync");
                            monitor = None;
                            false
                        }
                    };
                    if relevant {
                        drain_for(&mut monitor, cfg.debounce).await;
                        break Trigger::Kernel;
                    }
                }
                _ = sleep_until(next_resync) => break Trigger::Resync,
            }
        };
    }
}

/// A link or address event about tortie's devices or the parent interface.
fn ours(devices: &links::Devices, ifindex: u32, name: Option<&str>) -> bool {
    matches!(name, Some(VXLAN_DEVICE | IPIP_DEVICE))
        || [devices.vxlan, devices.ipip, devices.parent].contains(&Some(ifindex))
}

async fn next_event(monitor: &mut Option<Monitor>) -> Option<Changed> {
    match monitor {
        Some(m) => m.next().await,
        None => std::future::pending().await,
    }
}

/// Swallows events for `quiet`, so one apply covers a burst (including this loop's echo).
async fn drain_for(monitor: &mut Option<Monitor>, quiet: Duration) {
    let deadline = sleep(quiet);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            event = next_event(monitor) => if event.is_none() { *monitor = None; return },
        }
    }
}
