//! What the policy driver tells users, beside the table itself: the model's diagnostics as
//! a Warning Event on the policy (published by the lease leader only, since every node
//! computes the same diagnostics from the same objects: N nodes must not make N Events),
//! a log line on every node, and metrics with Felix's names where Felix has one.
//! Diagnostics are reported once per change: a diagnostic is new when the previous pass
//! did not have it (`DiagnosticLedger`, pure).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, ResourceExt};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts};
use tokio::sync::watch;

use crate::calc::policy::PolicySnapshot;
use crate::dataplane::nft::Outcome;
use crate::desired::nft::Table;
use crate::metrics::{Metrics, MetricsError};
use crate::policy::{Diagnostic, PolicyId, PolicyKind, Severity};

/// Event reasons, by diagnostic severity.
pub fn reason(s: Severity) -> &'static str {
    match s {
        Severity::NotApplied => "PolicyFieldNotApplied",
        Severity::FailClosed => "PolicyFailsClosed",
        Severity::SelectsNothing => "PolicySelectsNothing",
    }
}
const CONTROLLER: &str = "tortie-policy";

/// Remembers the previous pass's diagnostics so each is reported once per change.
#[derive(Debug, Default)]
pub struct DiagnosticLedger {
    last: BTreeSet<(PolicyId, String, String)>,
}

impl DiagnosticLedger {
    /// The diagnostics of this pass that the previous one did not have. One that goes away
    /// and comes back is new again (the policy changed twice).
    pub fn fresh<'a>(&mut self, now: &'a [Diagnostic]) -> Vec<&'a Diagnostic> {
        let key = |d: &Diagnostic| (d.policy.clone(), d.field.clone(), d.message.clone());
        let out = now
            .iter()
            .filter(|d| !self.last.contains(&key(d)))
            .collect();
        self.last = now.iter().map(key).collect();
        out
    }
}

/// Counts the compiled table shows, as Felix's gauges count them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub endpoints: usize,
    pub policies: usize,
    pub selectors: usize,
    pub sets: usize,
    pub set_elements: usize,
}

pub fn table_stats(t: &Table) -> TableStats {
    let mut policies = BTreeSet::new();
    for name in t.chains.keys() {
        if let Some(rest) = name
            .strip_prefix("pi-")
            .or_else(|| name.strip_prefix("po-"))
            && let Some((kind, _)) = rest.split_once('.')
            && !kind.starts_with('s')
        {
            policies.insert(rest);
        }
    }
    // A selector has one set per family (`s4-<hash>`, `s6-<hash>`).
    let selectors: BTreeSet<&str> = t
        .sets
        .keys()
        .filter_map(|k| k.strip_prefix("s4-").or_else(|| k.strip_prefix("s6-")))
        .collect();
    TableStats {
        endpoints: t.chains.keys().filter(|k| k.starts_with("fw-")).count(),
        policies: policies.len(),
        selectors: selectors.len(),
        sets: t.sets.len(),
        set_elements: t.sets.values().map(|s| s.elements.len()).sum(),
    }
}

/// Enforced policy objects in the cluster (Felix's `felix_cluster_num_policies`).
pub fn cluster_policies(o: &PolicySnapshot) -> usize {
    o.enforced_policies()
}

/// The object a diagnostic is about, with its uid so `kubectl describe` shows the Event.
pub fn reference(o: &PolicySnapshot, id: &PolicyId) -> ObjectReference {
    fn uid<K: ResourceExt>(list: &[Arc<K>], id: &PolicyId) -> Option<String> {
        list.iter()
            .find(|p| p.namespace().unwrap_or_default() == id.namespace && p.name_any() == id.name)
            .and_then(|p| p.uid())
    }
    let (api_version, uid) = match id.kind {
        PolicyKind::KubernetesNetworkPolicy => ("networking.k8s.io/v1", uid(&o.k8s_policies, id)),
        PolicyKind::NetworkPolicy => ("crd.projectcalico.org/v1", uid(&o.network_policies, id)),
        PolicyKind::GlobalNetworkPolicy => (
            "crd.projectcalico.org/v1",
            uid(&o.global_network_policies, id),
        ),
        PolicyKind::StagedNetworkPolicy => (
            "crd.projectcalico.org/v1",
            uid(&o.staged_network_policies, id),
        ),
        PolicyKind::StagedGlobalNetworkPolicy => (
            "crd.projectcalico.org/v1",
            uid(&o.staged_global_network_policies, id),
        ),
        PolicyKind::StagedKubernetesNetworkPolicy => {
            ("crd.projectcalico.org/v1", uid(&o.staged_k8s_policies, id))
        }
    };
    let kind = match id.kind {
        PolicyKind::KubernetesNetworkPolicy => "NetworkPolicy",
        k => k.as_str(),
    };
    ObjectReference {
        api_version: Some(api_version.to_string()),
        kind: Some(kind.to_string()),
        namespace: (!id.namespace.is_empty()).then(|| id.namespace.clone()),
        name: Some(id.name.clone()),
        uid,
        ..ObjectReference::default()
    }
}

fn severity_label(s: Severity) -> &'static str {
    match s {
        Severity::NotApplied => "not-applied",
        Severity::FailClosed => "fail-closed",
        Severity::SelectsNothing => "selects-nothing",
    }
}

#[derive(Clone)]
pub struct ReportMetrics {
    active_policies: IntGauge,
    active_endpoints: IntGauge,
    active_selectors: IntGauge,
    cluster_policies: IntGauge,
    diagnostics: IntGaugeVec,
    invalid_policies: IntGauge,
    sets: IntGauge,
    set_elements: IntGauge,
    transaction_seconds: Histogram,
    transaction_statements: Histogram,
    apply_failures: IntCounter,
    /// Felix's `felix_int_dataplane_apply_time_seconds`, shared with the overlay.
    apply_seconds: Histogram,
}

impl ReportMetrics {
    pub fn register(metrics: &Metrics, apply_seconds: Histogram) -> Result<Self, MetricsError> {
        let err = |name| move |source| MetricsError::Register { name, source };
        let gauge = |name: &'static str, help: &str| {
            let g = IntGauge::new(name, help).map_err(err(name))?;
            metrics.register(name, g.clone())?;
            Ok::<_, MetricsError>(g)
        };
        let hist = |name: &'static str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .map_err(err(name))?;
            metrics.register(name, h.clone())?;
            Ok::<_, MetricsError>(h)
        };
        let name = "tortie_policy_diagnostics";
        let diagnostics = IntGaugeVec::new(
            Opts::new(name, "Policy diagnostics in the current model, by kind."),
            &["kind"],
        )
        .map_err(err(name))?;
        metrics.register(name, diagnostics.clone())?;
        let name = "tortie_policy_apply_failures_total";
        let apply_failures = IntCounter::new(
            name,
            "Policy table transactions that failed (retried at the next change or resync).",
        )
        .map_err(err(name))?;
        metrics.register(name, apply_failures.clone())?;
        Ok(ReportMetrics {
            active_policies: gauge(
                "felix_active_local_policies",
                "Number of active policies on this host.",
            )?,
            active_endpoints: gauge(
                "felix_active_local_endpoints",
                "Number of active endpoints on this host.",
            )?,
            active_selectors: gauge(
                "felix_active_local_selectors",
                "Number of active selectors on this host.",
            )?,
            cluster_policies: gauge(
                "felix_cluster_num_policies",
                "Total number of policies cluster-wide.",
            )?,
            diagnostics,
            invalid_policies: gauge(
                "tortie_policy_invalid_policies",
                "Policies tortie cannot fully understand (they fail closed or select nothing).",
            )?,
            sets: gauge("tortie_policy_nft_sets", "Named sets in the policy table.")?,
            set_elements: gauge(
                "tortie_policy_nft_set_elements",
                "Elements in all named sets of the policy table.",
            )?,
            transaction_seconds: hist(
                "tortie_policy_nft_transaction_seconds",
                "Time to reconcile the policy table (one nft transaction when it changed).",
                prometheus::exponential_buckets(0.001, 2.5, 11).map_err(err("buckets"))?,
            )?,
            transaction_statements: hist(
                "tortie_policy_nft_transaction_statements",
                "Lines (statements) of each policy table transaction written.",
                prometheus::exponential_buckets(1.0, 4.0, 10).map_err(err("buckets"))?,
            )?,
            apply_failures,
            apply_seconds,
        })
    }
}

/// A diagnostic on its way to an Event.
#[derive(Debug, Clone, PartialEq)]
struct Pending {
    object: ObjectReference,
    reason: &'static str,
    /// The field: part of the Event's action, since the recorder folds Events with the same
    /// object, reason and action into one series whatever their notes.
    field: String,
    note: String,
}

/// The policy driver's reporter: call `planned` with each pass's plan and `applied` with the
/// reconcile's result.
pub struct PolicyReport {
    metrics: ReportMetrics,
    ledger: DiagnosticLedger,
    /// The current diagnostics, for the Event publisher.
    events: Option<watch::Sender<Vec<Pending>>>,
}

impl PolicyReport {
    /// `events`: the client and the leadership to publish Events with (None: no Events).
    pub fn new(
        metrics: ReportMetrics,
        events: Option<(Client, watch::Receiver<bool>, String)>,
    ) -> PolicyReport {
        let events =
            events.map(|(client, is_leader, node)| spawn_publisher(client, is_leader, node));
        PolicyReport {
            metrics,
            ledger: DiagnosticLedger::default(),
            events,
        }
    }

    /// Gauges from the desired table and the objects; new diagnostics logged and queued.
    /// `table` is None when it did not change since the last call: its gauges stand (they
    /// cost a walk of the whole table, which a pass that changed nothing need not pay).
    pub fn planned(
        &mut self,
        objects: &PolicySnapshot,
        table: Option<&Table>,
        diagnostics: &[Diagnostic],
    ) {
        let m = &self.metrics;
        if let Some(table) = table {
            let s = table_stats(table);
            m.active_policies.set(s.policies as i64);
            m.active_endpoints.set(s.endpoints as i64);
            m.active_selectors.set(s.selectors as i64);
            m.sets.set(s.sets as i64);
            m.set_elements.set(s.set_elements as i64);
        }
        m.cluster_policies.set(cluster_policies(objects) as i64);
        for sev in [
            Severity::NotApplied,
            Severity::FailClosed,
            Severity::SelectsNothing,
        ] {
            let n = diagnostics.iter().filter(|d| d.severity == sev).count();
            m.diagnostics
                .with_label_values(&[severity_label(sev)])
                .set(n as i64);
        }
        let invalid: BTreeSet<&PolicyId> = diagnostics
            .iter()
            .filter(|d| d.severity != Severity::NotApplied)
            .map(|d| &d.policy)
            .collect();
        m.invalid_policies.set(invalid.len() as i64);
        let fresh = self.ledger.fresh(diagnostics);
        for d in &fresh {
            tracing::warn!(policy = %d.policy, field = %d.field,
                kind = severity_label(d.severity), "{d}");
        }
        if let Some(tx) = &self.events {
            let now: Vec<Pending> = diagnostics
                .iter()
                .map(|d| Pending {
                    object: reference(objects, &d.policy),
                    reason: reason(d.severity),
                    field: d.field.clone(),
                    note: d.to_string(),
                })
                .collect();
            tx.send_if_modified(|cur| {
                let changed = *cur != now;
                if changed {
                    *cur = now;
                }
                changed
            });
        }
    }

    /// Records one reconcile: its duration, the size of what it wrote, or its failure.
    pub fn applied<E>(&self, elapsed: Duration, result: &Result<Outcome, E>, script: Option<&str>) {
        let m = &self.metrics;
        m.transaction_seconds.observe(elapsed.as_secs_f64());
        match result {
            Ok(outcome) if outcome.wrote() => {
                m.apply_seconds.observe(elapsed.as_secs_f64());
                if let Some(s) = script {
                    m.transaction_statements.observe(s.lines().count() as f64);
                }
            }
            Ok(_) => {}
            Err(_) => m.apply_failures.inc(),
        }
    }
}

/// Publishes the current diagnostics as Warning Events while this node leads, each once:
/// every node computes the same ones, so only the lease holder speaks. A node that becomes
/// leader publishes what is current once (its predecessor may have died before it did).
fn spawn_publisher(
    client: Client,
    mut is_leader: watch::Receiver<bool>,
    node: String,
) -> watch::Sender<Vec<Pending>> {
    let (tx, mut current) = watch::channel(Vec::<Pending>::new());
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: CONTROLLER.to_string(),
            instance: Some(node),
        },
    );
    tokio::spawn(async move {
        let mut published: Vec<Pending> = Vec::new();
        loop {
            let now = current.borrow_and_update().clone();
            if *is_leader.borrow_and_update() {
                for p in now.iter().filter(|p| !published.contains(p)) {
                    publish(&recorder, p).await;
                }
                // Forget the ones gone, so one that comes back is published again.
                published = now;
            } else {
                published.clear();
            }
            tokio::select! {
                r = current.changed() => if r.is_err() { return },
                r = is_leader.changed() => if r.is_err() { return },
            }
        }
    });
    tx
}

async fn publish(recorder: &Recorder, p: &Pending) {
    let event = Event {
        type_: EventType::Warning,
        reason: p.reason.to_string(),
        note: Some(p.note.chars().take(1024).collect()),
        action: format!("Enforce {}", p.field).chars().take(128).collect(),
        secondary: None,
    };
    match recorder.publish(&event, &p.object).await {
        Ok(()) => tracing::debug!(object = ?p.object.name, "published a policy diagnostic event"),
        Err(e) => tracing::warn!(object = ?p.object.name, error = %e,
            "cannot publish the policy diagnostic event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::cluster::ClusterObjects;
    use crate::policy::cluster::build_model;
    use crate::policy::compile::{CompileOptions, compile};

    fn diag(name: &str, field: &str) -> Diagnostic {
        Diagnostic {
            policy: PolicyId {
                kind: PolicyKind::NetworkPolicy,
                namespace: "prod".into(),
                name: name.into(),
            },
            severity: Severity::NotApplied,
            field: field.into(),
            message: "doNotTrack does not apply to pods".into(),
        }
    }

    #[test]
    fn a_diagnostic_is_fresh_once_per_change() {
        let mut l = DiagnosticLedger::default();
        let a = diag("a", "spec.doNotTrack");
        let b = diag("b", "spec.preDNAT");
        assert_eq!(l.fresh(std::slice::from_ref(&a)).len(), 1);
        assert!(
            l.fresh(std::slice::from_ref(&a)).is_empty(),
            "same pass again"
        );
        let both = [a.clone(), b.clone()];
        assert_eq!(l.fresh(&both), vec![&b]);
        assert!(l.fresh(&[]).is_empty());
        assert_eq!(l.fresh(&both).len(), 2, "came back: a new change");
    }

    #[test]
    fn table_stats_count_like_felix() {
        let mut c = ClusterObjects::default();
        for (name, ip) in [("web", "10.0.0.1"), ("db", "10.0.0.2")] {
            c.pods.push(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"namespace": "prod", "name": name, "labels": {"app": name}},
                    "spec": {"containers": [{"name": "c"}]},
                    "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
                }))
                .unwrap(),
            );
        }
        for (name, sel) in [("a", "app == 'web'"), ("b", "app == 'db'")] {
            c.network_policies.push(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"namespace": "prod", "name": name, "uid": format!("uid-{name}")},
                    "spec": {"selector": sel, "ingress": [
                        {"action": "Allow", "source": {"selector": "app == 'db'"}}]}
                }))
                .unwrap(),
            );
        }
        let mut m = build_model(&c);
        for ep in &mut m.endpoints {
            ep.interface = Some(format!("cali{}", ep.name()));
        }
        let s = table_stats(&compile(&m, &CompileOptions::default()));
        assert_eq!((s.endpoints, s.policies, s.selectors), (2, 2, 1));
        assert_eq!(s.set_elements, 1, "db's address");
        let c = PolicySnapshot::from_objects(&c);
        assert_eq!(cluster_policies(&c), 2);
        let r = reference(&c, &diag("b", "x").policy);
        assert_eq!(r.uid.as_deref(), Some("uid-b"));
        assert_eq!(r.kind.as_deref(), Some("NetworkPolicy"));
        assert_eq!(r.api_version.as_deref(), Some("crd.projectcalico.org/v1"));
    }
}
