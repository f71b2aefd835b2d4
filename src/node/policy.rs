//! The policy driver as the daemon runs it (opt-in for now: `TORTIE_POLICY=1`): on every
//! change of the cluster view (and each resync) a snapshot of the policy stores and pods is
//! compiled to this node's `inet tortie-policy` table and reconciled through the shared nft
//! driver. Registered with the health registry; failed passes count in
//! `felix_int_dataplane_failures`. Not yet done: the CNI ADD does not wait for its pod's
//! chains, and the shared Pod store does not bump the view's change counter, so a new pod
//! is picked up on the next change of another kind or the next resync.

use std::time::Duration;

use crate::datastore::pods::CachedPod;
use kube::runtime::reflector::Store;
use prometheus::IntCounter;
use tokio::task::AbortHandle;

use crate::calc::policy::policy_plan;
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
    pods: Store<CachedPod>,
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
        loop {
            pulse.busy();
            changes.borrow_and_update();
            let objects = view.policy.objects(&pods);
            let plan = policy_plan(&objects, &node, &CompileOptions::default());
            for d in &plan.diagnostics {
                tracing::debug!(diagnostic = ?d, "policy diagnostic");
            }
            let joined = tokio::task::spawn_blocking(move || {
                let r = driver.reconcile(&plan.table);
                (driver, r)
            })
            .await;
            let result = match joined {
                Ok((d, r)) => {
                    driver = d;
                    r.map(|_| ()).map_err(|e| e.to_string())
                }
                Err(e) => {
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
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
    health.supervise("dataplane/policy", Expect::default(), task)
}
