//! IPAMHandle: how many addresses one owner (a pod's container, a tunnel) holds in each block,
//! so release-by-owner knows which blocks to visit. Object name = lower-cased handle ID.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "IPAMHandle",
    doc = "Addresses one owner holds, per block (Calico IPAMHandle)",
    plural = "ipamhandles",
    singular = "ipamhandle",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Handle","type":"string","jsonPath":".spec.handleID"}"#
)]
pub struct IPAMHandleSpec {
    /// The handle ID as given by the allocator (e.g. `k8s-pod-network.<containerID>`).
    #[serde(rename = "handleID")]
    #[schemars(length(min = 1, max = 512))]
    pub handle_id: String,
    /// Block CIDR -> number of addresses this handle holds in that block.
    pub block: BTreeMap<String, i64>,
    /// Soft-delete marker: readers treat a deleted handle as absent.
    #[serde(default, skip_serializing_if = "super::is_false")]
    pub deleted: bool,
}

/// The object name Calico stores a handle under.
pub fn handle_object_name(handle_id: &str) -> String {
    handle_id.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_calico_field_names() {
        let h = IPAMHandleSpec {
            handle_id: "k8s-pod-network.ABC".into(),
            block: BTreeMap::from([("10.0.0.0/26".to_string(), 2)]),
            deleted: false,
        };
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["handleID"], "k8s-pod-network.ABC");
        assert_eq!(v["block"]["10.0.0.0/26"], 2);
        assert_eq!(handle_object_name(&h.handle_id), "k8s-pod-network.abc");
    }
}
