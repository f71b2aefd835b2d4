//! StagedKubernetesNetworkPolicy: a Kubernetes NetworkPolicy that is evaluated but never
//! enforced; tortie counts the packets it would deny (Calico 3.30+). The Kubernetes
//! NetworkPolicy spec plus `stagedAction`. Types only; evaluation lives in policy.

use k8s_openapi::api::networking::v1::{NetworkPolicyEgressRule, NetworkPolicyIngressRule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::stagednetworkpolicy::StagedAction;

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "StagedKubernetesNetworkPolicy",
    doc = "A Kubernetes NetworkPolicy that is evaluated but never enforced (Calico StagedKubernetesNetworkPolicy)",
    plural = "stagedkubernetesnetworkpolicies",
    singular = "stagedkubernetesnetworkpolicy",
    namespaced,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct StagedKubernetesNetworkPolicySpec {
    #[serde(default, skip_serializing_if = "StagedAction::is_set")]
    pub staged_action: StagedAction,
    /// Pods of the namespace the policy applies to; empty selects all of them.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<NetworkPolicyIngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<NetworkPolicyEgressRule>,
    /// `Ingress`, `Egress` or both; absent follows Kubernetes' defaulting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub policy_types: Vec<String>,
}
