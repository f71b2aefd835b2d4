//! Rendering of a verdict for `tortie policy explain`: a human table and a JSON document;
//! and, for `--counters`, which of the node table's named counters stand for the rules on
//! the evaluated path (sans-IO: the CLI reads their values).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::compile::{
    Compiler, CounterName, END_OF_TIER, WOULD_DENY, endpoint_chain_name, policy_chain_name,
    staged_chain_name,
};
use super::diagnostic::Diagnostic;
use super::eval::{Decision, DirectionVerdict, Verdict};
use super::model::{Action, Model, Policy};

/// One counter on the path a flow takes through the table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PathCounter {
    pub direction: String,
    /// `namespace/pod` whose chains hold it.
    pub endpoint: String,
    /// What it counts, in the words of the verdict (`prod/x rule 0 (Allow)`, `end of tier`).
    pub what: String,
    /// The named counter object in `inet tortie-policy`; for Allow, Pass and Log rules,
    /// which count in anonymous counters, `<chain> rule <n>`.
    pub counter: String,
    /// None when this node's table does not have it (the endpoint is on another node).
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
    #[serde(skip)]
    pub source: CounterSource,
}

/// Where a path counter's values are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterSource {
    /// A named counter object.
    Named(String),
    /// The anonymous counters of these rules (by rule id) of one chain, summed.
    Rules { chain: String, ids: Vec<String> },
}

/// Counter values as read from a node's table: named objects by name, and the anonymous
/// counters of listed chains by chain and rule id.
#[derive(Debug, Default)]
pub struct CounterValues {
    pub named: BTreeMap<String, (u64, u64)>,
    pub chains: BTreeMap<String, BTreeMap<String, (u64, u64)>>,
}

/// The counters of the rules that decided each direction, the Log rules the flow hit, the
/// end of tier that dropped it and the staged audits that would deny it. `iface` gives an
/// endpoint's host interface (`cali…`) from its `namespace/pod`.
pub fn path_counters(
    model: &Model,
    v: &Verdict,
    iface: impl Fn(&str) -> String,
) -> Vec<PathCounter> {
    let mut out = Vec::new();
    for d in [&v.egress, &v.ingress].into_iter().flatten() {
        let dir = d.direction;
        let mut push = |what: String, counter: String, source: CounterSource| {
            out.push(PathCounter {
                direction: dir.to_string(),
                endpoint: d.endpoint.clone(),
                what,
                counter,
                packets: None,
                bytes: None,
                source,
            })
        };
        let find = |name: &str| model.policies.iter().find(|p| p.id.display_name() == name);
        let mut rule_counter = |p: &Policy, rule: usize, action: Action| {
            let chain = policy_chain_name(&p.id, dir);
            let what = format!("{} rule {rule} ({action:?})", p.id.display_name());
            if action == Action::Deny {
                let name = CounterName::rule(&chain, rule, action);
                push(what, name.clone(), CounterSource::Named(name));
                return;
            }
            let ids = Compiler::policy_rules(p, dir)
                .get(rule)
                .map(|rules| rules.iter().map(|r| r.id()).collect())
                .unwrap_or_default();
            let counter = format!("{chain} rule {rule}");
            push(what, counter, CounterSource::Rules { chain, ids });
        };
        for (policy, rule) in &d.logged {
            if let Some(p) = find(policy) {
                rule_counter(p, *rule, Action::Log);
            }
        }
        let decided = match &d.decision {
            Decision::Rule {
                policy,
                rule,
                action,
            } => Some((policy, *rule, *action)),
            Decision::Pass { policy, rule } => Some((policy, *rule, Action::Pass)),
            _ => None,
        };
        if let Some((policy, rule, action)) = decided
            && let Some(p) = find(policy)
        {
            rule_counter(p, rule, action);
        }
        let iface = iface(&d.endpoint);
        if matches!(d.decision, Decision::EndOfTier { .. }) {
            let chain = endpoint_chain_name(&iface, dir);
            let name = CounterName::fixed(&chain, END_OF_TIER);
            push(
                "end of tier".into(),
                name.clone(),
                CounterSource::Named(name),
            );
        }
        for staged in &d.staged_would_deny {
            if let Some(p) = model.staged.iter().find(|p| &p.id.display_name() == staged) {
                let chain = staged_chain_name(&iface, &p.id, dir);
                let what = format!("staged {staged} would deny (new flows)");
                let name = CounterName::fixed(&chain, WOULD_DENY);
                push(what, name.clone(), CounterSource::Named(name));
            }
        }
    }
    out
}

/// The chains whose rule listings `fill` needs.
pub fn chains_to_list(counters: &[PathCounter]) -> Vec<String> {
    let mut out: Vec<String> = counters
        .iter()
        .filter_map(|c| match &c.source {
            CounterSource::Rules { chain, .. } => Some(chain.clone()),
            CounterSource::Named(_) => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Fills in the values read from the node's table.
pub fn fill(counters: &mut [PathCounter], values: &CounterValues) {
    for c in counters {
        let got = match &c.source {
            CounterSource::Named(name) => values.named.get(name).copied(),
            CounterSource::Rules { chain, ids } => values.chains.get(chain).map(|rules| {
                ids.iter()
                    .filter_map(|id| rules.get(id))
                    .fold((0, 0), |(p, b), (rp, rb)| (p + rp, b + rb))
            }),
        };
        if let Some((p, b)) = got {
            c.packets = Some(p);
            c.bytes = Some(b);
        }
    }
}

/// The counters as a table below the verdict's.
pub fn counters_table(counters: &[PathCounter]) -> String {
    let mut out = String::from("counters on this path (this node's inet tortie-policy):\n");
    let _ = writeln!(
        out,
        "{:<8} {:>10} {:>12}  {:<40} COUNTER",
        "DIR", "PACKETS", "BYTES", "COUNTS"
    );
    if counters.is_empty() {
        out.push_str("(none: no rule decided and nothing dropped on this path)\n");
    }
    for c in counters {
        let num = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{:<8} {:>10} {:>12}  {:<40} {}",
            c.direction,
            num(c.packets),
            num(c.bytes),
            c.what,
            c.counter
        );
    }
    if counters.iter().any(|c| c.packets.is_none()) {
        out.push_str("(-: not in this node's table; the endpoint's chains are on its own node)\n");
    }
    out
}

fn decision_text(d: &Decision) -> String {
    match d {
        Decision::NoPolicy => "no policy selects the pod: namespace profile allows".into(),
        Decision::Rule {
            policy,
            rule,
            action,
        } => format!("{policy} rule {rule} ({action:?})"),
        Decision::Pass { policy, rule } => {
            format!("{policy} rule {rule} (Pass): namespace profile allows")
        }
        Decision::EndOfTier { policies } => format!(
            "no rule matched in {}: end of tier denies",
            policies.join(", ")
        ),
    }
}

fn row(out: &mut String, v: &DirectionVerdict) {
    let verdict = if v.allowed { "allow" } else { "deny" };
    let _ = writeln!(
        out,
        "{:<8} {:<30} {:<6} {}",
        v.direction.to_string(),
        v.endpoint,
        verdict,
        decision_text(&v.decision)
    );
    for (p, r) in &v.logged {
        let _ = writeln!(out, "{:<8} {:<30} {:<6} logged by {p} rule {r}", "", "", "");
    }
    for s in &v.staged_would_deny {
        let _ = writeln!(out, "{:<8} {:<30} {:<6} staged {s} would deny", "", "", "");
    }
}

/// The table: one line per direction that applies, then the overall answer.
pub fn table(v: &Verdict, diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flow: {} -> {} {}/{}",
        v.flow.src, v.flow.dst, v.flow.dst_port, v.flow.protocol
    );
    let _ = writeln!(
        out,
        "{:<8} {:<30} {:<6} DECIDED BY",
        "DIR", "ENDPOINT", "VERDICT"
    );
    for d in [&v.egress, &v.ingress].into_iter().flatten() {
        row(&mut out, d);
    }
    let _ = writeln!(
        out,
        "result: {}",
        if v.allowed { "allowed" } else { "denied" }
    );
    for d in diagnostics {
        let _ = writeln!(out, "warning: {d}");
    }
    out
}

/// The JSON document (`-o json`).
pub fn json(v: &Verdict, diagnostics: &[Diagnostic]) -> serde_json::Value {
    serde_json::json!({
        "allowed": v.allowed,
        "flow": v.flow,
        "egress": v.egress,
        "ingress": v.ingress,
        "diagnostics": diagnostics,
    })
}
