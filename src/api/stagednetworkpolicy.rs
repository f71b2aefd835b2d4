//! StagedNetworkPolicy: a namespaced Calico policy that is never enforced; tortie counts the
//! packets it would deny so users can audit a policy before enforcing it (Calico 3.30+).
//! Same fields as NetworkPolicy plus `stagedAction`. Types only; evaluation lives in policy.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::networkpolicy::{PerformanceHint, PolicyType, default_types};

/// What enforcing a staged policy would do to the enforced policy of the same name.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum StagedAction {
    /// Create or replace the enforced policy with this one.
    #[default]
    Set,
    /// Delete the enforced policy of this name.
    Delete,
    Learn,
    Ignore,
}

impl StagedAction {
    /// serde helper: the API server fills in `Set`, so an absent field reads as `Set`.
    pub fn is_set(&self) -> bool {
        *self == StagedAction::Set
    }
}

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "StagedNetworkPolicy",
    doc = "A Calico NetworkPolicy that is evaluated but never enforced (Calico StagedNetworkPolicy)",
    plural = "stagednetworkpolicies",
    singular = "stagednetworkpolicy",
    namespaced,
    derive = "PartialEq",
    printcolumn = r#"{"name":"Order","type":"number","jsonPath":".spec.order"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.selector"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StagedNetworkPolicySpec {
    #[serde(default, skip_serializing_if = "StagedAction::is_set")]
    pub staged_action: StagedAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub types: Vec<PolicyType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<super::rule::Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<super::rule::Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1))]
    pub performance_hints: Vec<PerformanceHint>,
}

impl StagedNetworkPolicySpec {
    /// `types`, or what Calico's API derives when it is absent.
    pub fn effective_types(&self) -> Vec<PolicyType> {
        if self.types.is_empty() {
            default_types(!self.ingress.is_empty(), !self.egress.is_empty())
        } else {
            self.types.clone()
        }
    }
}
