//! The policy driver's companions, started with it: the reporter (Events, logs, gauges),
//! the per-policy counter reader, the nflog reader for Log rules, and the optional cut of
//! denied connections after each committed change. The driver loop calls `planned`,
//! `applied` and `committed`; everything else runs on its own.

use std::time::Duration;

use kube::Client;
use prometheus::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::policy_counters::{self, CounterMetrics};
use super::policy_report::{PolicyReport, ReportMetrics};
use crate::calc::policy::local_model;
use crate::dataplane::nflog;
use crate::dataplane::nft::Outcome;
use crate::metrics::{Metrics, MetricsError};
use crate::policy::cluster::ClusterObjects;

pub struct PolicyObs {
    pub report: PolicyReport,
    cut: bool,
    counters: JoinHandle<()>,
}

impl Drop for PolicyObs {
    fn drop(&mut self) {
        self.counters.abort();
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
        Ok(PolicyObs {
            report,
            cut,
            counters,
        })
    }

    /// After a reconcile: metrics, and when the table changed and the cut is on, the cut.
    pub async fn committed<E>(
        &self,
        elapsed: Duration,
        result: &Result<Outcome, E>,
        script: Option<&str>,
        objects: &ClusterObjects,
        node: &str,
    ) {
        self.report.applied(elapsed, result, script);
        if !self.cut || !result.as_ref().is_ok_and(|o| o.wrote()) {
            return;
        }
        let model = local_model(objects, node);
        match tokio::task::spawn_blocking(move || super::policy_cut::cut_denied(&model)).await {
            Ok(Ok(r)) => tracing::debug!(
                entries = r.entries,
                cut = r.cut,
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
