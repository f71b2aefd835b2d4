//! Per-policy packet counters from the kernel: the named counter objects of `inet
//! tortie-policy` (one per policy rule, end of tier, staged audit and fixed drop), attributed
//! by their names (`compile::CounterName`: `pi-`/`po-<kind>.<ns>.<name>/<rule>/deny`, staged
//! audits `sti-`/`sto-<iface>-<kind>.<ns>.<name>/would-deny`), turned into monotonic
//! Prometheus counters. Read over nfnetlink on a slow interval: counter objects only, no
//! rules or set elements, so the cost follows the number of counters and nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts};

use crate::dataplane::nft::counters::{self, NamedCounter};
use crate::metrics::{Metrics, MetricsError};
use crate::policy::compile::{
    ANTI_SPOOFING, CounterName, END_OF_TIER, ENDPOINT_TO_HOST, FAMILY, TABLE, UNKNOWN_INTERFACE,
    WOULD_DENY,
};
use crate::policy::{Action, PolicyId, PolicyKind};

/// What a counting rule counts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counted {
    /// A Deny rule of an enforced policy.
    Denied {
        policy: String,
        direction: &'static str,
    },
    /// A staged policy's audit: packets its tier would have denied.
    StagedWouldDeny { policy: String },
    /// Drops that no single policy owns: the end of an endpoint's tier, an unknown workload
    /// interface, a spoofed source, pod → host when that is dropped.
    Dropped { reason: &'static str },
}

/// `<kind>.<ns>.<name>` (ns `_` for global kinds) → the policy.
fn policy_id(s: &str) -> Option<PolicyId> {
    let (kind, rest) = s.split_once('.')?;
    let (ns, name) = rest.split_once('.')?;
    let kind = [
        PolicyKind::KubernetesNetworkPolicy,
        PolicyKind::NetworkPolicy,
        PolicyKind::GlobalNetworkPolicy,
        PolicyKind::StagedKubernetesNetworkPolicy,
        PolicyKind::StagedNetworkPolicy,
        PolicyKind::StagedGlobalNetworkPolicy,
    ]
    .into_iter()
    .find(|k| k.short() == kind)?;
    Some(PolicyId {
        kind,
        namespace: if ns == "_" {
            String::new()
        } else {
            ns.to_string()
        },
        name: name.to_string(),
    })
}

/// What a named counter counts for the metrics; None for counters they do not report
/// (Allow, Pass and Log rules, staged policies' own rules: `tortie policy explain
/// --counters` shows those).
pub fn attribute(counter: &str) -> Option<Counted> {
    match CounterName::parse(counter)? {
        CounterName::Rule {
            chain,
            action: Action::Deny,
            ..
        } => {
            let (direction, rest) = match chain.split_once('-')? {
                ("pi", rest) => ("ingress", rest),
                ("po", rest) => ("egress", rest),
                _ => return None,
            };
            let id = policy_id(rest).filter(|id| !id.kind.is_staged())?;
            Some(Counted::Denied {
                policy: id.display_name(),
                direction,
            })
        }
        CounterName::Rule { .. } => None,
        CounterName::Fixed { chain, what } => {
            let reason = match what.as_str() {
                WOULD_DENY => {
                    let rest = chain
                        .strip_prefix("sti-")
                        .or_else(|| chain.strip_prefix("sto-"))?;
                    let (_iface, policy) = rest.split_once('-')?;
                    return Some(Counted::StagedWouldDeny {
                        policy: policy_id(policy)?.display_name(),
                    });
                }
                END_OF_TIER if chain.starts_with("tw-") => "end-of-tier-ingress",
                END_OF_TIER if chain.starts_with("fw-") => "end-of-tier-egress",
                UNKNOWN_INTERFACE => "unknown-interface",
                ANTI_SPOOFING => "anti-spoofing",
                ENDPOINT_TO_HOST => "endpoint-to-host",
                _ => return None,
            };
            Some(Counted::Dropped { reason })
        }
    }
}

/// Turns successive readings of kernel counters (which restart when a counter is made
/// again) into increments.
#[derive(Debug, Default)]
pub struct Ledger {
    last: BTreeMap<(String, u64), u64>,
}

impl Ledger {
    /// The packets counted since the previous reading, per attribution (zero increments
    /// included, so every live policy has a series).
    pub fn update(&mut self, readings: &[NamedCounter]) -> BTreeMap<Counted, u64> {
        let mut out = BTreeMap::new();
        let mut seen = BTreeMap::new();
        for r in readings {
            let Some(what) = attribute(&r.name) else {
                continue;
            };
            let key = (r.name.clone(), r.handle);
            let delta = match self.last.get(&key) {
                Some(&prev) if r.packets >= prev => r.packets - prev,
                _ => r.packets,
            };
            *out.entry(what).or_insert(0) += delta;
            seen.insert(key, r.packets);
        }
        self.last = seen;
        out
    }
}

#[derive(Clone)]
pub struct CounterMetrics {
    denied: IntCounterVec,
    staged: IntCounterVec,
    dropped: IntCounterVec,
}

impl CounterMetrics {
    pub fn register(metrics: &Metrics) -> Result<CounterMetrics, MetricsError> {
        let vec = |name: &'static str, help: &str, labels: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), labels)
                .map_err(|source| MetricsError::Register { name, source })?;
            metrics.register(name, v.clone())?;
            Ok::<_, MetricsError>(v)
        };
        Ok(CounterMetrics {
            denied: vec(
                "tortie_policy_denied_packets_total",
                "Packets dropped by a Deny rule of the policy, on this node.",
                &["policy", "direction"],
            )?,
            staged: vec(
                "tortie_policy_staged_would_deny_packets_total",
                "New flows on this node the staged policy would have denied if enforced.",
                &["policy"],
            )?,
            dropped: vec(
                "tortie_policy_dropped_packets_total",
                "Packets the policy table dropped for a reason no single policy owns.",
                &["reason"],
            )?,
        })
    }

    /// Adds increments; series of policies no longer in the table are removed.
    pub fn record(&self, increments: &BTreeMap<Counted, u64>) {
        let mut live: BTreeSet<Vec<String>> = BTreeSet::new();
        for (what, n) in increments {
            match what {
                Counted::Denied { policy, direction } => {
                    self.denied
                        .with_label_values(&[policy.as_str(), direction])
                        .inc_by(*n);
                    live.insert(vec![policy.clone(), direction.to_string()]);
                }
                Counted::StagedWouldDeny { policy } => {
                    self.staged.with_label_values(&[policy.as_str()]).inc_by(*n);
                    live.insert(vec![policy.clone()]);
                }
                Counted::Dropped { reason } => {
                    self.dropped.with_label_values(&[*reason]).inc_by(*n);
                }
            }
        }
        for vec in [&self.denied, &self.staged] {
            for family in prometheus::core::Collector::collect(vec) {
                for m in family.get_metric() {
                    let labels: Vec<String> = m
                        .get_label()
                        .iter()
                        .map(|l| l.value().to_string())
                        .collect();
                    if !live.contains(&labels) {
                        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                        let _ = vec.remove_label_values(&refs);
                    }
                }
            }
        }
    }
}

/// How often the counters are read (Prometheus scrapes every 15-60 s).
pub const INTERVAL: Duration = Duration::from_secs(10);

/// One reading: counters of the policy table → increments recorded.
pub fn poll(ledger: &mut Ledger, metrics: &CounterMetrics) {
    match counters::read(FAMILY, TABLE) {
        Ok(readings) => metrics.record(&ledger.update(&readings)),
        Err(e) => tracing::debug!(error = %e, "cannot read the policy table's counters"),
    }
}

/// Reads the counters every `interval` until the task is aborted.
pub fn start(metrics: CounterMetrics, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ledger = Ledger::default();
        loop {
            tokio::time::sleep(interval).await;
            let m = metrics.clone();
            let joined = tokio::task::spawn_blocking(move || {
                poll(&mut ledger, &m);
                ledger
            })
            .await;
            ledger = joined.unwrap_or_default();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(name: &str, handle: u64, packets: u64) -> NamedCounter {
        NamedCounter {
            name: name.into(),
            handle,
            packets,
            bytes: packets * 60,
        }
    }

    #[test]
    fn chains_map_back_to_their_policies() {
        assert_eq!(
            attribute("pi-knp.prod.db-from-web/0/deny"),
            Some(Counted::Denied {
                policy: "prod/knp.default.db-from-web".into(),
                direction: "ingress"
            })
        );
        assert_eq!(
            attribute("po-gnp._.red.not.to-db/12/deny"),
            Some(Counted::Denied {
                policy: "red.not.to-db".into(),
                direction: "egress"
            })
        );
        assert_eq!(attribute("pi-knp.prod.db-from-web/0/allow"), None);
        assert_eq!(attribute("pi-snp.prod.db-lockdown/0/deny"), None, "staged");
        assert_eq!(
            attribute("sti-calidb00-snp.prod.db-lockdown/would-deny"),
            Some(Counted::StagedWouldDeny {
                policy: "prod/staged:db-lockdown".into()
            })
        );
        assert_eq!(
            attribute("tw-calidb00/end-of-tier"),
            Some(Counted::Dropped {
                reason: "end-of-tier-ingress"
            })
        );
        assert_eq!(
            attribute("from-wl-dispatch/unknown-interface"),
            Some(Counted::Dropped {
                reason: "unknown-interface"
            })
        );
        assert_eq!(attribute("forward"), None);
        assert_eq!(attribute("pi-zz.prod.x/0/deny"), None);
    }

    #[test]
    fn readings_become_increments_across_rule_rewrites() {
        let mut l = Ledger::default();
        let deny = Counted::Denied {
            policy: "prod/w".into(),
            direction: "ingress",
        };
        let first = l.update(&[
            rc("pi-np.prod.w/0/deny", 5, 3),
            rc("pi-np.prod.w/1/deny", 6, 1),
        ]);
        assert_eq!(first[&deny], 4);
        let second = l.update(&[
            rc("pi-np.prod.w/0/deny", 5, 10),
            rc("pi-np.prod.w/1/deny", 6, 1),
        ]);
        assert_eq!(second[&deny], 7);
        // The counter was made again: a new handle counts from zero again.
        let third = l.update(&[rc("pi-np.prod.w/0/deny", 9, 2)]);
        assert_eq!(third[&deny], 2);
        // Same handle with a smaller value: a restart, not a negative increment.
        let fourth = l.update(&[rc("pi-np.prod.w/0/deny", 9, 1)]);
        assert_eq!(fourth[&deny], 1);
    }
}
