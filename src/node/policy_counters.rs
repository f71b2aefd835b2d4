//! Per-policy packet counters from the kernel: the `counter` of every drop and audit rule in
//! `inet tortie-policy`, attributed to a policy by the chain it sits in (the compiler names
//! chains after policies: `pi-`/`po-<kind>.<ns>.<name>`, staged audits
//! `sti-`/`sto-<iface>-<kind>.<ns>.<name>`), turned into monotonic Prometheus counters.
//! Read on a slow interval, terse (no set elements), so the cost does not grow with pods.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts};

use crate::dataplane::nft::Runner;
use crate::dataplane::nft::counters::{self, RuleCounter};
use crate::metrics::{Metrics, MetricsError};
use crate::policy::compile::{
    FAMILY, FROM_DISPATCH, INPUT_CHAIN, RAW_PREROUTING_CHAIN, TABLE, TO_DISPATCH,
};
use crate::policy::{PolicyId, PolicyKind};

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

/// `<kind>.<ns>.<name>` (ns `_` for global kinds) → the name users see.
fn policy_name(s: &str) -> Option<String> {
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
    let id = PolicyId {
        kind,
        namespace: if ns == "_" {
            String::new()
        } else {
            ns.to_string()
        },
        name: name.to_string(),
    };
    Some(id.display_name())
}

/// What the counter of a rule in `chain` counts; None for chains that count nothing known.
pub fn attribute(chain: &str) -> Option<Counted> {
    let direction = |c: char| if c == 'i' { "ingress" } else { "egress" };
    if let Some(rest) = chain
        .strip_prefix("pi-")
        .or_else(|| chain.strip_prefix("po-"))
    {
        return Some(Counted::Denied {
            policy: policy_name(rest)?,
            direction: direction(chain.as_bytes()[1] as char),
        });
    }
    if let Some(rest) = chain
        .strip_prefix("sti-")
        .or_else(|| chain.strip_prefix("sto-"))
    {
        let (_iface, policy) = rest.split_once('-')?;
        return Some(Counted::StagedWouldDeny {
            policy: policy_name(policy)?,
        });
    }
    let reason = match chain {
        c if c.starts_with("tw-") => "end-of-tier-ingress",
        c if c.starts_with("fw-") => "end-of-tier-egress",
        FROM_DISPATCH | TO_DISPATCH => "unknown-interface",
        RAW_PREROUTING_CHAIN => "anti-spoofing",
        INPUT_CHAIN => "endpoint-to-host",
        _ => return None,
    };
    Some(Counted::Dropped { reason })
}

/// Turns successive readings of kernel counters (which restart when a rule is rewritten)
/// into increments.
#[derive(Debug, Default)]
pub struct Ledger {
    last: BTreeMap<(String, u64), u64>,
}

impl Ledger {
    /// The packets counted since the previous reading, per attribution (zero increments
    /// included, so every live policy has a series).
    pub fn update(&mut self, readings: &[RuleCounter]) -> BTreeMap<Counted, u64> {
        let mut out = BTreeMap::new();
        let mut seen = BTreeMap::new();
        for r in readings {
            let Some(what) = attribute(&r.chain) else {
                continue;
            };
            let key = (r.chain.clone(), r.handle);
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
pub fn poll(runner: &Runner, ledger: &mut Ledger, metrics: &CounterMetrics) {
    match counters::read(runner, FAMILY, TABLE) {
        Ok(readings) => metrics.record(&ledger.update(&readings)),
        Err(e) => tracing::debug!(error = %e, "cannot read the policy table's counters"),
    }
}

/// Reads the counters every `interval` until the task is aborted.
pub fn start(metrics: CounterMetrics, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ledger = Ledger::default();
        let runner = Runner::default();
        loop {
            tokio::time::sleep(interval).await;
            let (r, m) = (runner.clone(), metrics.clone());
            let joined = tokio::task::spawn_blocking(move || {
                poll(&r, &mut ledger, &m);
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

    fn rc(chain: &str, handle: u64, packets: u64) -> RuleCounter {
        RuleCounter {
            chain: chain.into(),
            handle,
            packets,
            bytes: packets * 60,
        }
    }

    #[test]
    fn chains_map_back_to_their_policies() {
        assert_eq!(
            attribute("pi-knp.prod.db-from-web"),
            Some(Counted::Denied {
                policy: "prod/knp.default.db-from-web".into(),
                direction: "ingress"
            })
        );
        assert_eq!(
            attribute("po-gnp._.red.not.to-db"),
            Some(Counted::Denied {
                policy: "red.not.to-db".into(),
                direction: "egress"
            })
        );
        assert_eq!(
            attribute("sti-calidb00-snp.prod.db-lockdown"),
            Some(Counted::StagedWouldDeny {
                policy: "prod/staged:db-lockdown".into()
            })
        );
        assert_eq!(
            attribute("tw-calidb00"),
            Some(Counted::Dropped {
                reason: "end-of-tier-ingress"
            })
        );
        assert_eq!(attribute("forward"), None);
        assert_eq!(attribute("pi-zz.prod.x"), None);
    }

    #[test]
    fn readings_become_increments_across_rule_rewrites() {
        let mut l = Ledger::default();
        let deny = Counted::Denied {
            policy: "prod/w".into(),
            direction: "ingress",
        };
        let first = l.update(&[rc("pi-np.prod.w", 5, 3), rc("pi-np.prod.w", 6, 1)]);
        assert_eq!(first[&deny], 4);
        let second = l.update(&[rc("pi-np.prod.w", 5, 10), rc("pi-np.prod.w", 6, 1)]);
        assert_eq!(second[&deny], 7);
        // The chain was rewritten: new handles count from zero again.
        let third = l.update(&[rc("pi-np.prod.w", 9, 2)]);
        assert_eq!(third[&deny], 2);
        // Same handle reused with a smaller value: a restart, not a negative increment.
        let fourth = l.update(&[rc("pi-np.prod.w", 9, 1)]);
        assert_eq!(fourth[&deny], 1);
    }
}
