//! IPAMBlock: one node's (or nobody's) slice of a pool and who holds each address in it.
//! Field names follow Calico's stored JSON exactly, including the snake-case `handle_id`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{ApiError, parse_masked_cidr};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "IPAMBlock",
    doc = "A block of a pool: its owner and who holds each address in it (Calico IPAMBlock)",
    plural = "ipamblocks",
    singular = "ipamblock",
    derive = "PartialEq",
    printcolumn = r#"{"name":"CIDR","type":"string","jsonPath":".spec.cidr"}"#,
    printcolumn = r#"{"name":"Affinity","type":"string","jsonPath":".spec.affinity"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPAMBlockSpec {
    /// The block's CIDR.
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a CIDR such as 10.244.1.0/26"))]
    #[schemars(length(max = 64))]
    pub cidr: String,

    /// `host:<node>` or `virtual:<name>`; absent (null) for a block no node owns.
    #[serde(default)]
    #[schemars(regex(pattern = r"^(host|virtual):[a-zA-Z0-9\.\-_]+$"))]
    pub affinity: Option<String>,

    /// When the affinity was claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_claim_time: Option<Time>,

    /// One entry per address (index = ordinal): index into `attributes`, or null when free.
    pub allocations: Vec<Option<i64>>,

    /// Free ordinals in the order they will be handed out.
    pub unallocated: Vec<i64>,

    /// Metadata of the allocations, shared by identical allocations.
    pub attributes: Vec<AllocationAttribute>,

    /// Bumped on every write; an allocation remembers the value at its creation.
    #[serde(default)]
    #[schemars(schema_with = "int64_schema")]
    pub sequence_number: u64,

    /// Ordinal (as a string) -> sequenceNumber when that address was allocated.
    #[serde(default)]
    pub sequence_number_for_allocation: Option<BTreeMap<String, i64>>,

    /// Soft-delete marker: readers treat a deleted block as absent.
    #[serde(default)]
    pub deleted: bool,

    /// Deprecated and unused, but required by Calico's v1 schema.
    pub strict_affinity: bool,
}

/// What an allocation is for (pod, tunnel address, ...).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct AllocationAttribute {
    /// The handle the allocation was made under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle_id: Option<String>,
    /// Attributes of the owner: pod, namespace, node, timestamp, type, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<BTreeMap<String, String>>,
    /// Attributes of the other owner during a KubeVirt live migration.
    #[serde(
        rename = "alternateOwnerAttrs",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub alternate: Option<BTreeMap<String, String>>,
    /// Set on a released address still in its cooldown (ipCooldownSeconds).
    #[serde(
        rename = "releasedAt",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub released_at: Option<Time>,
}

fn int64_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "integer", "format": "int64"})
}

impl IPAMBlockSpec {
    pub fn cidr_net(&self) -> Result<ipnet::IpNet, ApiError> {
        parse_masked_cidr("IPAMBlock", "cidr", &self.cidr)
    }

    /// The node in a `host:<node>` affinity.
    pub fn host_affinity(&self) -> Option<&str> {
        self.affinity.as_deref()?.strip_prefix("host:")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_calico_block_json_with_nulls() {
        let json = serde_json::json!({
            "cidr": "10.244.1.0/30",
            "affinity": "host:node-a",
            "allocations": [0, null, null, 0],
            "unallocated": [1, 2],
            "attributes": [{"handle_id": "k8s-pod-network.abc", "secondary": {"pod": "p"}}],
            "sequenceNumber": 1700000000000000000u64,
            "sequenceNumberForAllocation": null,
            "deleted": false,
            "strictAffinity": false
        });
        let b: IPAMBlockSpec = serde_json::from_value(json).unwrap();
        assert_eq!(b.allocations, vec![Some(0), None, None, Some(0)]);
        assert_eq!(b.host_affinity(), Some("node-a"));
        assert_eq!(
            b.attributes[0].handle_id.as_deref(),
            Some("k8s-pod-network.abc")
        );
        let back = serde_json::to_value(&b).unwrap();
        assert_eq!(back["attributes"][0]["handle_id"], "k8s-pod-network.abc");
        assert_eq!(back["strictAffinity"], false);
        assert!(back["allocations"][1].is_null());
    }
}
