//! BlockAffinity: a node's claim on a block, written before the block itself so a crash
//! mid-claim can be finished or undone. `deleted` is a string in v1, as in Calico.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "BlockAffinity",
    doc = "A node's claim on a block (Calico BlockAffinity)",
    plural = "blockaffinities",
    singular = "blockaffinity",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"CIDR","type":"string","jsonPath":".spec.cidr"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".spec.state"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BlockAffinitySpec {
    /// Claim progress: pending -> confirmed -> pendingDeletion.
    pub state: AffinityState,
    /// The node (or virtual owner) holding the claim.
    pub node: String,
    /// host or virtual; absent in old data means host.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<AffinityType>,
    /// The claimed block's CIDR.
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a CIDR such as 10.244.1.0/26"))]
    #[schemars(length(max = 64))]
    pub cidr: String,
    /// "true" or "false": a string for compatibility with old Calico releases.
    #[x_kube(validation = Rule::new("self == 'true' || self == 'false'").message("deleted must be the string \"true\" or \"false\""))]
    #[schemars(length(max = 5))]
    pub deleted: String,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "camelCase")]
pub enum AffinityState {
    /// Written by Calico releases before claim states existed; read as confirmed.
    #[serde(rename = "")]
    Unset,
    #[default]
    Pending,
    Confirmed,
    PendingDeletion,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AffinityType {
    Host,
    Virtual,
}

impl BlockAffinitySpec {
    pub fn is_deleted(&self) -> bool {
        self.deleted == "true"
    }

    pub fn set_deleted(&mut self, deleted: bool) {
        self.deleted = deleted.to_string();
    }

    /// Readers treat pending claims as absent and an empty state as confirmed.
    pub fn is_confirmed(&self) -> bool {
        matches!(self.state, AffinityState::Confirmed | AffinityState::Unset) && !self.is_deleted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_is_written_as_a_string() {
        let mut a = BlockAffinitySpec {
            node: "n1".into(),
            cidr: "10.0.0.0/26".into(),
            ..Default::default()
        };
        a.set_deleted(false);
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["deleted"], "false");
        assert_eq!(v["state"], "pending");
    }

    #[test]
    fn empty_state_from_old_calico_counts_as_confirmed() {
        let a: BlockAffinitySpec = serde_json::from_value(serde_json::json!({
            "state": "", "node": "n1", "cidr": "10.0.0.0/26", "deleted": "false"
        }))
        .unwrap();
        assert!(a.is_confirmed());
    }
}
