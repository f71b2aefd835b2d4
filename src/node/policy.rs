//! The policy driver as the daemon runs it (on unless `TORTIE_POLICY=false`): on every
//! change of the cluster view, every pod the CNI registers or removes, and each resync, a
//! snapshot of the policy stores, the pods and this node's registered endpoints is compiled
//! to the node's `inet tortie-policy` table and reconciled through the shared nft driver.
//! A successful pass tells the registry which generation is in the kernel, which releases
//! the CNI ADDs waiting for their pod's policy. Registered with the health registry; failed
//! passes count in `felix_int_dataplane_failures`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use prometheus::IntCounter;
use tokio::task::AbortHandle;

use crate::calc::policy::{PolicyPlan, policy_plan, with_local_endpoints};
use crate::cni::handlers::endpoints::{LocalEndpoint, LocalEndpoints};
use crate::dataplane::nft::{Driver, Runner};
use crate::datastore::ClusterView;
use crate::policy::cluster::ClusterObjects;
use crate::health::{self, Expect, Registry};
use crate::policy::compile::{CompileOptions, FAMILY, TABLE};

/// How soon a failed pass is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// What the driver reads.
pub struct Inputs {
    pub view: ClusterView,
    pub pods: Store<Pod>,
    pub endpoints: Arc<LocalEndpoints>,
    pub node: String,
    pub interval: Duration,
    pub failures: IntCounter,
    /// Events, metrics, counters and the optional cut of denied connections.
    pub obs: super::policy_obs::PolicyObs,
}

/// The one place the calculation is called: the view's snapshot with this node's
/// registered endpoints laid over its pods.
fn plan(inputs: &Inputs, local: &[LocalEndpoint]) -> (ClusterObjects, PolicyPlan) {
    let mut objects = inputs.view.policy.objects(&inputs.pods);
    with_local_endpoints(&mut objects.pods, local);
    let plan = policy_plan(&objects, &inputs.node, &CompileOptions::default());
    (objects, plan)
}

/// With enforcement off, a table an earlier run left would drop every new pod's traffic
/// (unknown interface): it goes. Failures are logged; nothing else depends on it.
pub async fn remove_table() {
    let removed = tokio::task::spawn_blocking(|| {
        let table = crate::desired::nft::Table::new(FAMILY, TABLE);
        Driver::new(Runner::default()).remove(&table)
    })
    .await;
    match removed {
        Ok(Ok(true)) => tracing::info!("policy enforcement is off: removed the policy table"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not remove the policy table"),
        Err(e) => tracing::warn!(error = %e, "policy table removal task failed"),
    }
}

pub fn start(mut inputs: Inputs, health: &Registry) -> AbortHandle {
    let expect = Expect {
        stall_after: Some(health::grace()),
        fail_after: health::grace(),
        ..Expect::default()
    };
    let pulse = health.register("dataplane/policy", expect);
    let task = tokio::spawn(async move {
        // A first pass over a Pod store still listing would drop every local pod's
        // dispatch entry (a restart must not cut pods off): wait for its list.
        if inputs.pods.wait_until_ready().await.is_err() {
            return;
        }
        let mut changes = inputs.view.changes.clone();
        let mut registered = inputs.endpoints.subscribe();
        let mut driver = Driver::new(Runner::default());
        loop {
            pulse.busy();
            crate::health::faults::check(pulse.name()).await;
            changes.borrow_and_update();
            registered.borrow_and_update();
            let (generation, local) = inputs.endpoints.snapshot();
            let (objects, plan) = plan(&inputs, &local);
            inputs
                .obs
                .report
                .planned(&objects, &plan.table, &plan.diagnostics);
            let started = std::time::Instant::now();
            let joined = tokio::task::spawn_blocking(move || {
                let r = driver.reconcile(&plan.table);
                (driver, r)
            })
            .await;
            let result = match joined {
                Ok((d, r)) => {
                    driver = d;
                    let script = driver.transactions().last();
                    inputs
                        .obs
                        .committed(started.elapsed(), &r, script, &objects);
                    r.map(|_| ()).map_err(|e| e.to_string())
                }
                Err(e) => {
                    driver = Driver::new(Runner::default());
                    Err(format!("policy reconcile task failed: {e}"))
                }
            };
            pulse.idle();
            // A failure is retried soon: CNI ADDs may be waiting for this table.
            let mut wait = inputs.interval;
            match result {
                Ok(()) => {
                    inputs.endpoints.committed(generation);
                    pulse.recovered();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "policy table reconcile failed; retrying at the next change or resync");
                    inputs.endpoints.failed(e.clone());
                    inputs.failures.inc();
                    pulse.failing(e);
                    wait = wait.min(RETRY);
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                changed = registered.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
    health.supervise("dataplane/policy", Expect::default(), task)
}
