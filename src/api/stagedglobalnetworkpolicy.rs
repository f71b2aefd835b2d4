//! StagedGlobalNetworkPolicy: a cluster-wide Calico policy that is never enforced; tortie
//! counts the packets it would deny (Calico 3.30+). Same fields as GlobalNetworkPolicy plus
//! `stagedAction`. Types only; evaluation lives in policy.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::is_false;
use super::networkpolicy::{PerformanceHint, PolicyType, default_types};
use super::stagednetworkpolicy::StagedAction;

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "StagedGlobalNetworkPolicy",
    doc = "A Calico GlobalNetworkPolicy that is evaluated but never enforced (Calico StagedGlobalNetworkPolicy)",
    plural = "stagedglobalnetworkpolicies",
    singular = "stagedglobalnetworkpolicy",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Order","type":"number","jsonPath":".spec.order"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.selector"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StagedGlobalNetworkPolicySpec {
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
    #[serde(default, skip_serializing_if = "is_false")]
    pub do_not_track: bool,
    #[serde(rename = "preDNAT", default, skip_serializing_if = "is_false")]
    pub pre_dnat: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub apply_on_forward: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1))]
    pub performance_hints: Vec<PerformanceHint>,
}

impl StagedGlobalNetworkPolicySpec {
    /// `types`, or what Calico's API derives when it is absent.
    pub fn effective_types(&self) -> Vec<PolicyType> {
        if self.types.is_empty() {
            default_types(!self.ingress.is_empty(), !self.egress.is_empty())
        } else {
            self.types.clone()
        }
    }
}
