//! Calico NetworkPolicy (namespaced) and GlobalNetworkPolicy (cluster-wide): ordered rule
//! lists applied to the endpoints a selector picks. Types only; evaluation lives in policy.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::is_false;

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "NetworkPolicy",
    doc = "Calico policy for the endpoints of one namespace (Calico NetworkPolicy)",
    plural = "networkpolicies",
    singular = "networkpolicy",
    namespaced,
    derive = "PartialEq",
    printcolumn = r#"{"name":"Order","type":"number","jsonPath":".spec.order"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.selector"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Tier the policy belongs to; absent means `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Lower orders apply first; absent sorts after every ordered policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    /// Calico selector over the endpoints this policy applies to; absent means `all()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Directions this policy governs; absent derives from which rule lists are present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub types: Vec<PolicyType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<super::rule::Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<super::rule::Rule>,
    /// Calico selector over the service account of the endpoints this policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1))]
    pub performance_hints: Vec<PerformanceHint>,
}

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "GlobalNetworkPolicy",
    doc = "Calico policy for endpoints across the cluster (Calico GlobalNetworkPolicy)",
    plural = "globalnetworkpolicies",
    singular = "globalnetworkpolicy",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Order","type":"number","jsonPath":".spec.order"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.selector"}"#
)]
#[x_kube(validation = Rule::new("!(has(self.doNotTrack) && self.doNotTrack && has(self.preDNAT) && self.preDNAT)").message("preDNAT and doNotTrack cannot both be true").field_path(".preDNAT"))]
#[x_kube(validation = Rule::new("!((has(self.doNotTrack) && self.doNotTrack) || (has(self.preDNAT) && self.preDNAT)) || (has(self.applyOnForward) && self.applyOnForward)").message("applyOnForward must be true when doNotTrack or preDNAT is true").field_path(".applyOnForward"))]
#[x_kube(validation = Rule::new("!(has(self.preDNAT) && self.preDNAT) || !has(self.egress) || size(self.egress) == 0").message("a preDNAT policy cannot have egress rules").field_path(".egress"))]
#[serde(rename_all = "camelCase")]
pub struct GlobalNetworkPolicySpec {
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
    /// Apply before connection tracking; the rules then see both directions' packets.
    #[serde(default, skip_serializing_if = "is_false")]
    pub do_not_track: bool,
    /// Apply to host endpoints before DNAT (ingress only).
    #[serde(rename = "preDNAT", default, skip_serializing_if = "is_false")]
    pub pre_dnat: bool,
    /// Also apply to traffic forwarded through host endpoints.
    #[serde(default, skip_serializing_if = "is_false")]
    pub apply_on_forward: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    /// Calico selector over the namespaces of the endpoints this policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1))]
    pub performance_hints: Vec<PerformanceHint>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyType {
    Ingress,
    Egress,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerformanceHint {
    /// Program the policy on every node up front instead of on demand.
    AssumeNeededOnEveryNode,
}

/// What Calico's API server writes into an absent `types` (`api/pkg/defaults`): no egress
/// rules → Ingress (also when there are no rules at all); egress rules only → Egress; both →
/// both. CRDs applied with kubectl skip that defaulting, so readers call this instead.
pub fn default_types(has_ingress: bool, has_egress: bool) -> Vec<PolicyType> {
    match (has_ingress, has_egress) {
        (_, false) => vec![PolicyType::Ingress],
        (false, true) => vec![PolicyType::Egress],
        (true, true) => vec![PolicyType::Ingress, PolicyType::Egress],
    }
}

impl NetworkPolicySpec {
    /// `types`, or what Calico derives when it is absent.
    pub fn effective_types(&self) -> Vec<PolicyType> {
        if self.types.is_empty() {
            default_types(!self.ingress.is_empty(), !self.egress.is_empty())
        } else {
            self.types.clone()
        }
    }
}

impl GlobalNetworkPolicySpec {
    /// `types`, or what Calico derives when it is absent.
    pub fn effective_types(&self) -> Vec<PolicyType> {
        if self.types.is_empty() {
            default_types(!self.ingress.is_empty(), !self.egress.is_empty())
        } else {
            self.types.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::rule::Action;

    #[test]
    fn missing_types_follow_the_rule_lists_as_calicos_api_defaults_them() {
        let rule = || super::super::rule::Rule {
            action: Action::Deny,
            ..Default::default()
        };
        let mut p = NetworkPolicySpec::default();
        assert_eq!(p.effective_types(), [PolicyType::Ingress]);
        p.egress.push(rule());
        assert_eq!(p.effective_types(), [PolicyType::Egress]);
        p.ingress.push(rule());
        assert_eq!(
            p.effective_types(),
            [PolicyType::Ingress, PolicyType::Egress]
        );
        p.egress.clear();
        assert_eq!(p.effective_types(), [PolicyType::Ingress]);
        p.types = vec![PolicyType::Egress];
        assert_eq!(p.effective_types(), [PolicyType::Egress]);
    }

    #[test]
    fn gnp_uses_calico_field_names() {
        let p = GlobalNetworkPolicySpec {
            pre_dnat: true,
            apply_on_forward: true,
            do_not_track: false,
            namespace_selector: Some("all()".into()),
            ..Default::default()
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["preDNAT"], true);
        assert_eq!(v["applyOnForward"], true);
        assert_eq!(v["namespaceSelector"], "all()");
        assert!(v.get("doNotTrack").is_none());
    }
}
