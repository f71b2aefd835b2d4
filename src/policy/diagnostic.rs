//! What tortie found wrong or unsupported in a policy. The daemon turns these into a Warning
//! Event on the policy, a log line and a metric; `policy explain` prints them.

use std::fmt;

use super::model::PolicyId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// A field that does not apply to pods (doNotTrack, preDNAT, applyOnForward, services,
    /// http, non-default tiers); the rest of the policy is enforced.
    NotApplied,
    /// tortie could not fully understand the policy: its selected endpoints deny in its
    /// directions.
    FailClosed,
    /// The policy's own selector could not be parsed: it selects nothing.
    SelectsNothing,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub policy: PolicyId,
    pub severity: Severity,
    /// The field, as a path (`spec.ingress[0].source.selector`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.severity {
            Severity::NotApplied => "not applied to pods",
            Severity::FailClosed => "fails closed",
            Severity::SelectsNothing => "selects nothing",
        };
        write!(
            f,
            "policy {} {}: {}: {}",
            self.policy, what, self.field, self.message
        )
    }
}
