//! The policy driver as the daemon runs it (opt-in for now: `TORTIE_POLICY=1`): on every
//! change of the cluster view a snapshot of the policy stores and pods (shared `Arc`s) is
//! handed to the incremental calculation, and the sets and chains it changed are written
//! through the shared nft driver; each resync checks the whole table against the kernel. Registered with the health registry; failed passes count in
//! `felix_int_dataplane_failures`. Not yet done: the CNI ADD does not wait for its pod's
//! chains, and the shared Pod store does not bump the view's change counter, so a new pod
//! is picked up on the next change of another kind or the next resync.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use prometheus::IntCounter;
use tokio::task::AbortHandle;

use crate::calc::policy::{PolicyCalc, PolicySnapshot};
use crate::dataplane::nft::{Driver, Runner};
use crate::datastore::ClusterView;
use crate::health::{self, Expect, Registry};
use crate::policy::compile::CompileOptions;

/// Whether the daemon enforces policy (env `TORTIE_POLICY`: `1`/`true`).
pub fn enabled() -> bool {
    std::env::var("TORTIE_POLICY").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

pub fn start(
    view: ClusterView,
    pods: Store<Pod>,
    node: String,
    interval: Duration,
    failures: IntCounter,
    health: &Registry,
) -> AbortHandle {
    let expect = Expect {
        stall_after: Some(health::grace()),
        fail_after: health::grace(),
        ..Expect::default()
    };
    let pulse = health.register("dataplane/policy", expect);
    let task = tokio::spawn(async move {
        let mut changes = view.changes.clone();
        let mut driver = Driver::new(Runner::default());
        let mut calc = PolicyCalc::new(node.clone(), &CompileOptions::default());
        // A timer wake-up is a resync: the whole table is checked against the kernel.
        let mut resync = true;
        loop {
            pulse.busy();
            changes.borrow_and_update();
            let snapshot = PolicySnapshot::of(&view.policy, &pods);
            let joined = tokio::task::spawn_blocking(move || {
                calc.sync(&snapshot);
                for d in calc.diagnostics() {
                    tracing::debug!(diagnostic = ?d, "policy diagnostic");
                }
                let touched = calc.take_touched();
                let r = if resync {
                    driver.reconcile(calc.table())
                } else {
                    driver.reconcile_changed(calc.table(), &touched.sets, &touched.chains)
                };
                (calc, driver, r)
            })
            .await;
            let result = match joined {
                Ok((c, d, r)) => {
                    calc = c;
                    driver = d;
                    r.map(|_| ()).map_err(|e| e.to_string())
                }
                Err(e) => {
                    calc = PolicyCalc::new(node.clone(), &CompileOptions::default());
                    driver = Driver::new(Runner::default());
                    Err(format!("policy reconcile task failed: {e}"))
                }
            };
            pulse.idle();
            match result {
                Ok(()) => pulse.recovered(),
                Err(e) => {
                    tracing::warn!(error = %e, "policy table reconcile failed; retrying at the next change or resync");
                    failures.inc();
                    pulse.failing(e);
                }
            }
            resync = tokio::select! {
                changed = changes.changed() => if changed.is_err() { return } else { false },
                _ = tokio::time::sleep(interval) => true,
            };
        }
    });
    health.supervise("dataplane/policy", Expect::default(), task)
}
