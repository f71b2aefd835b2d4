//! The policy driver as the daemon runs it (on unless `TORTIE_POLICY=false`): on every
//! change of the cluster view, every pod the CNI registers or removes, and each resync, a
//! snapshot of the policy stores and pods (shared `Arc`s) with this node's registered
//! endpoints laid over it is handed to the incremental calculation, and the sets and chains
//! it changed are written through the shared nft driver; a resync (or the pass after a
//! failure) checks the whole table against the kernel. A successful pass tells the registry
//! which generation is in the kernel, which releases the CNI ADDs waiting for their pod's
//! policy. Registered with the health registry; failed passes count in
//! `felix_int_dataplane_failures`.

use std::sync::Arc;
use std::time::Duration;

use crate::datastore::pods::CachedPod;
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus::IntCounter;
use tokio::task::AbortHandle;

use crate::calc::policy::{PolicyCalc, PolicySnapshot, overrides_of};
use crate::cni::handlers::endpoints::LocalEndpoints;
use crate::dataplane::nft::{Driver, Runner};
use crate::datastore::ClusterView;
use crate::health::{self, Expect, Registry};
use crate::policy::compile::{CompileOptions, FAMILY, TABLE};

/// How soon a failed pass is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// What the driver reads.
pub struct Inputs {
    pub view: ClusterView,
    pub pods: Store<CachedPod>,
    pub endpoints: Arc<LocalEndpoints>,
    pub node: String,
    pub interval: Duration,
    pub failures: IntCounter,
    /// Events, metrics, counters and the optional cut of denied connections.
    pub obs: super::policy_obs::PolicyObs,
}

fn ms(since: std::time::Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
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
        if crate::datastore::ready::listed(&inputs.pods).await.is_err() {
            return;
        }
        let mut changes = inputs.view.changes.clone();
        let mut registered = inputs.endpoints.subscribe();
        let mut driver = Driver::new(Runner::default());
        let mut calc = PolicyCalc::new(inputs.node.clone(), &CompileOptions::default());
        // A timer wake-up is a resync: the whole table is checked against the kernel. So is
        // the first pass, and the one after a failure (what was touched is not known).
        let mut full = true;
        // The first pass builds an endpoint per pod of the cluster; what it needed on the
        // way (pod keys, candidate endpoints) is given back to the kernel once.
        let mut first = true;
        loop {
            pulse.busy();
            crate::health::faults::check(pulse.name()).await;
            changes.borrow_and_update();
            registered.borrow_and_update();
            let (generation, mut local) = inputs.endpoints.snapshot();
            // ADD's copy of a Pod only stands in while the store lacks the pod: dropped here
            // with one index lookup each, so the snapshot needs no scan of every pod.
            for ep in local.iter_mut().filter(|ep| ep.object.is_some()) {
                let key = ObjectRef::new(&ep.pod).within(&ep.namespace);
                if inputs.pods.get(&key).is_some() {
                    ep.object = None;
                }
            }
            let started = std::time::Instant::now();
            let snapshot =
                PolicySnapshot::of(&inputs.view.policy, &inputs.pods).with_registered(&local);
            let overrides = overrides_of(&local);
            let snapshot_ms = ms(started);
            let joined = tokio::task::spawn_blocking(move || {
                let t = std::time::Instant::now();
                calc.set_overrides(&overrides);
                calc.sync(&snapshot);
                if first {
                    crate::memory::trim();
                }
                let touched = calc.take_touched();
                let changed = full || !touched.is_empty();
                let calc_ms = ms(t);
                let t = std::time::Instant::now();
                let r = if full {
                    driver.reconcile(calc.table())
                } else {
                    driver.reconcile_changed(calc.table(), &touched.sets, &touched.chains)
                };
                (calc, driver, r, snapshot, changed, (calc_ms, ms(t)))
            })
            .await;
            first = false;
            let result = match joined {
                Ok((c, d, r, snapshot, changed, (calc_ms, nft_ms))) => {
                    // Waiting ADDs are answered first: the metrics below walk the table.
                    if r.is_ok() {
                        inputs.endpoints.committed(generation);
                    }
                    let obs = std::time::Instant::now();
                    calc = c;
                    driver = d;
                    let diagnostics: Vec<_> = calc.diagnostics().cloned().collect();
                    inputs.obs.report.planned(
                        &snapshot,
                        changed.then(|| calc.table()),
                        &diagnostics,
                    );
                    let script = driver.transactions().last();
                    inputs.obs.committed(
                        started.elapsed(),
                        &r,
                        script,
                        &snapshot,
                        calc.overrides(),
                    );
                    tracing::debug!(
                        full,
                        generation,
                        snapshot_ms,
                        calc_ms,
                        nft_ms,
                        obs_ms = ms(obs),
                        total_ms = ms(started),
                        "policy pass"
                    );
                    r.map(|_| ()).map_err(|e| e.to_string())
                }
                Err(e) => {
                    calc = PolicyCalc::new(inputs.node.clone(), &CompileOptions::default());
                    driver = Driver::new(Runner::default());
                    Err(format!("policy reconcile task failed: {e}"))
                }
            };
            pulse.idle();
            // A failure is retried soon: CNI ADDs may be waiting for this table.
            let mut wait = inputs.interval;
            let failed = result.is_err();
            match result {
                Ok(()) => {
                    pulse.recovered();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "policy table reconcile failed; retrying");
                    inputs.endpoints.failed(e.clone());
                    inputs.failures.inc();
                    pulse.failing(e);
                    wait = wait.min(RETRY);
                }
            }
            full = tokio::select! {
                changed = changes.changed() => if changed.is_err() { return } else { failed },
                changed = registered.changed() => if changed.is_err() { return } else { failed },
                _ = tokio::time::sleep(wait) => true,
            };
        }
    });
    health.supervise("dataplane/policy", Expect::default(), task)
}
