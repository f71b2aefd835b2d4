//! The policy driver's companions, started with it: the reporter (Events, logs, gauges),
//! the per-policy counter reader, the nflog reader for Log rules, and the optional cut of
//! denied connections after each committed change. The driver loop calls `planned`,
//! `applied` and `committed`; everything else runs on its own.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use prometheus::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::policy_counters::{self, CounterMetrics};
use super::policy_report::{PolicyReport, ReportMetrics};
use crate::calc::policy::{LocalOverrides, PolicySnapshot, local_model};
use crate::dataplane::nflog;
use crate::dataplane::nft::Outcome;
use crate::metrics::{Metrics, MetricsError};

pub struct PolicyObs {
    pub report: PolicyReport,
    /// The latest committed objects, for the cut task (None: the cut is off).
    cut: Option<watch::Sender<Option<Arc<Committed>>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PolicyObs {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl PolicyObs {
    pub fn start(
        metrics: &Metrics,
        apply_seconds: Histogram,
        client: Client,
        is_leader: watch::Receiver<bool>,
        node: &str,
        cut: bool,
    ) -> Result<PolicyObs, MetricsError> {
        let report = PolicyReport::new(
            ReportMetrics::register(metrics, apply_seconds)?,
            Some((client, is_leader, node.to_string())),
        );
        let counters = policy_counters::start(
            CounterMetrics::register(metrics)?,
            policy_counters::INTERVAL,
        );
        start_log_reader();
        let mut tasks = vec![counters];
        let cut = cut.then(|| {
            let (tx, rx) = watch::channel(None);
            tasks.push(tokio::spawn(cut_loop(rx, node.to_string())));
            tx
        });
        Ok(PolicyObs { report, cut, tasks })
    }

    /// After a reconcile: metrics, and when the table changed and the cut is on, the cut
    /// of what the new model denies (in its own task: a long conntrack table must not hold
    /// up the next policy pass; a newer change supersedes one not yet started).
    pub fn committed<E>(
        &self,
        elapsed: Duration,
        result: &Result<Outcome, E>,
        script: Option<&str>,
        snapshot: &PolicySnapshot,
        overrides: &LocalOverrides,
    ) {
        self.report.applied(elapsed, result, script);
        if let Some(tx) = &self.cut
            && result.as_ref().is_ok_and(|o| o.wrote())
        {
            tx.send_replace(Some(Arc::new((snapshot.clone(), overrides.clone()))));
        }
    }
}

/// What a committed table was computed from: the stores' objects and the CNI's overrides.
type Committed = (PolicySnapshot, LocalOverrides);

async fn cut_loop(mut rx: watch::Receiver<Option<Arc<Committed>>>, node: String) {
    while rx.changed().await.is_ok() {
        let Some(committed) = rx.borrow_and_update().clone() else {
            continue;
        };
        let node = node.clone();
        let started = std::time::Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let (snapshot, overrides) = committed.as_ref();
            let objects = snapshot.to_objects();
            super::policy_cut::cut_denied(&local_model(&objects, &node, overrides))
        })
        .await;
        match joined {
            Ok(Ok(r)) => tracing::debug!(
                entries = r.entries,
                cut = r.cut,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "conntrack checked after a policy change"
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot cut the connections the policy now denies")
            }
            Err(e) => tracing::warn!(error = %e, "the conntrack cut task failed"),
        }
    }
}

/// One thread reading the Log rules' nflog group for the daemon's lifetime; if the group
/// cannot be bound, Log rules still count but write no lines (said once).
fn start_log_reader() {
    let spawned = std::thread::Builder::new()
        .name("policy-nflog".into())
        .spawn(|| match nflog::Reader::open(nflog::GROUP) {
            Ok(reader) => {
                if let Err(e) = reader.run(|| false) {
                    tracing::warn!(error = %e, "policy log reader stopped");
                }
            }
            Err(e) => tracing::warn!(error = %e, group = nflog::GROUP,
                "cannot read policy Log packets over nflog; Log rules write no lines"),
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the policy log reader");
    }
}
