//! The drivers as the daemon runs them: the overlay converge loop (kernel monitor plus
//! periodic resync) and the NAT table on the same interval, each reporting its first
//! outcome for readiness, every outcome to the metrics, and each pass to the health registry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;

use super::overlay_metrics::OverlayMetrics;
use crate::calc::nat::NatModel;
use crate::dataplane::monitor::Monitor;
use crate::dataplane::nft::{NatTable, Outcome};
use crate::dataplane::resync::{self, ResyncConfig, Trigger};
use crate::dataplane::{ApplyReport, DataplaneError, Kernel};
use crate::desired::DesiredDataplane;
use crate::health::{self, Expect, Pulse, Registry};

/// None until the first pass; then whether the latest pass worked, and why not.
pub type FirstOutcome = watch::Receiver<Option<Result<(), String>>>;

pub struct Drivers {
    overlay: AbortHandle,
    nat: AbortHandle,
    pub overlay_outcome: FirstOutcome,
    pub nat_outcome: FirstOutcome,
}

/// What the calculation wants of the kernel: the overlay's routes and devices, and NAT.
pub struct Wanted {
    pub dataplane: watch::Receiver<Arc<DesiredDataplane>>,
    pub nat: watch::Receiver<NatModel>,
}

/// The overlay driver's word back to the calculation: the kernel lacks IPIP, recompute.
pub struct IpipFeedback {
    pub missing: Arc<AtomicBool>,
    pub recheck: Arc<Notify>,
}

impl Drivers {
    pub fn start(
        kernel: Kernel,
        wanted: Wanted,
        interval: Duration,
        metrics: OverlayMetrics,
        feedback: IpipFeedback,
        health: &Registry,
    ) -> Drivers {
        let Wanted {
            dataplane: desired,
            nat,
        } = wanted;
        let IpipFeedback {
            missing: ipip_missing,
            recheck,
        } = feedback;
        let monitor = match Monitor::new() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "no kernel monitor; drift is repaired by the periodic resync only");
                None
            }
        };
        let (overlay_tx, overlay_outcome) = watch::channel(None);
        let cfg = ResyncConfig {
            interval,
            ..ResyncConfig::default()
        };
        let nat_repairs = metrics.drift_repairs.clone();
        let nat_failures = metrics.failures.clone();
        let pulse = health.register("dataplane/overlay", driver_expect(interval));
        let start_pulse = pulse.clone();
        let start = move |_trigger: Trigger| {
            let p = start_pulse.clone();
            async move {
                p.busy();
                health::faults::check(p.name()).await;
            }
        };
        let report = move |trigger: Trigger, outcome: &Result<ApplyReport, DataplaneError>| {
            pulse.idle();
            match outcome {
                Ok(_) => pulse.recovered(),
                Err(e) => pulse.failing(e.to_string()),
            }
            let result = match outcome {
                Ok(r) => {
                    metrics.apply_seconds.observe(r.duration.as_secs_f64());
                    let changes = r.total().changes();
                    if trigger != Trigger::Desired && changes > 0 {
                        metrics.drift_repairs.inc_by(changes as u64);
                    }
                    if r.degraded
                        .iter()
                        .any(|e| matches!(e, DataplaneError::MissingKernelFeature { .. }))
                    {
                        // Recalculate now, before the echo of this pass triggers another.
                        if !ipip_missing.swap(true, Ordering::Relaxed) {
                            recheck.notify_one();
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    metrics.failures.inc();
                    Err(e.to_string())
                }
            };
            overlay_tx.send_replace(Some(result));
        };
        let overlay = tokio::spawn(resync::run_observed(
            kernel, monitor, desired, cfg, start, report,
        ));
        let overlay = health.supervise("dataplane/overlay", Expect::default(), overlay);
        let (nat_tx, nat_outcome) = watch::channel(None);
        let nat_pulse = health.register("dataplane/nat", driver_expect(interval));
        let nat = tokio::spawn(run_nat(
            nat,
            interval,
            nat_tx,
            nat_repairs,
            nat_pulse,
            nat_failures,
        ));
        let nat = health.supervise("dataplane/nat", Expect::default(), nat);
        Drivers {
            overlay,
            nat,
            overlay_outcome,
            nat_outcome,
        }
    }

    /// Stops the loops and leaves the kernel as it is: a restart must not cut pods off.
    pub fn stop(&self) {
        self.overlay.abort();
        self.nat.abort();
    }
}

/// A pass may take a while on a loaded node (nft's own timeout is 10 s); failures are
/// retried at the next trigger, so they count once they outlast the grace time.
fn driver_expect(_interval: Duration) -> Expect {
    Expect {
        stall_after: Some(health::grace()),
        fail_after: health::grace(),
        vital: false,
        finishes: false,
    }
}

/// Reconciles tortie's NAT table when the model changes and on every resync.
async fn run_nat(
    mut model: watch::Receiver<NatModel>,
    interval: Duration,
    outcome: watch::Sender<Option<Result<(), String>>>,
    repairs: IntCounter,
    pulse: Pulse,
    failures: IntCounter,
) {
    let mut table = NatTable::new();
    loop {
        pulse.busy();
        health::faults::check(pulse.name()).await;
        let want = model.borrow_and_update().clone();
        let joined = tokio::task::spawn_blocking(move || {
            let r = table.reconcile(&want);
            (table, r)
        })
        .await;
        let result = match joined {
            Ok((t, r)) => {
                table = t;
                match r {
                    Ok(Outcome::Repaired) => {
                        tracing::info!("repaired drift in the NAT table");
                        repairs.inc();
                        Ok(())
                    }
                    Ok(_) => Ok(()),
                    Err(e) => {
                        tracing::warn!(error = %e, "NAT table reconcile failed; retrying at the next resync");
                        Err(e.to_string())
                    }
                }
            }
            // The blocking task panicked: start over with a fresh driver state.
            Err(e) => {
                table = NatTable::new();
                Err(format!("NAT reconcile task failed: {e}"))
            }
        };
        if result.is_err() {
            failures.inc();
        }
        pulse.idle();
        match &result {
            Ok(()) => pulse.recovered(),
            Err(e) => pulse.failing(e.clone()),
        }
        outcome.send_replace(Some(result));
        tokio::select! {
            changed = model.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
