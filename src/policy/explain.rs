//! Rendering of a verdict for `tortie policy explain`: a human table and a JSON document.

use std::fmt::Write as _;

use super::diagnostic::Diagnostic;
use super::eval::{Decision, DirectionVerdict, Verdict};

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
