//! ClusterInformation: one object named `default` describing the cluster to Calico's tools.
//! calicoctl reads it before most commands (version check, `ipam check`, datastore lock) and
//! Calico's CNI plugin refuses to work while `datastoreReady` is false.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Name of the singleton.
pub const CLUSTER_INFORMATION_NAME: &str = "default";

/// `clusterType` tortie records: the installer's name first, then Calico's `kdd` (the
/// Kubernetes datastore), as calico-node appends it.
pub const CLUSTER_TYPE: &str = "tortie,kdd";

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "ClusterInformation",
    doc = "Cluster-wide facts Calico's tools read, singleton named default (Calico ClusterInformation)",
    plural = "clusterinformations",
    singular = "clusterinformation",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInformationSpec {
    /// Version of Calico running; empty makes calicoctl skip its client/cluster version check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calico_version: Option<String>,
    /// Random identifier of the cluster (32 hex digits, as Calico writes it).
    #[serde(
        rename = "clusterGUID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster_guid: Option<String>,
    /// Comma-separated list of what installed the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_type: Option<String>,
    /// False locks the datastore (upgrades, migrations): Calico's CNI and IPAM GC stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore_ready: Option<bool>,
    /// Calico product variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl ClusterInformationSpec {
    /// What the leader writes when the object is absent: ready, a fresh GUID, tortie named
    /// as the cluster type and no Calico version (calicoctl then skips its version check).
    pub fn for_tortie(guid: String) -> ClusterInformationSpec {
        ClusterInformationSpec {
            calico_version: None,
            cluster_guid: Some(guid),
            cluster_type: Some(CLUSTER_TYPE.to_string()),
            datastore_ready: Some(true),
            variant: None,
        }
    }

    /// Calico's reading: only an explicit false locks the datastore.
    pub fn datastore_locked(&self) -> bool {
        self.datastore_ready == Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_calico_field_names() {
        let v = serde_json::to_value(ClusterInformationSpec::for_tortie("ab".repeat(16))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "clusterGUID": "abababababababababababababababab",
                "clusterType": "tortie,kdd",
                "datastoreReady": true
            })
        );
        assert!(v.get("calicoVersion").is_none());
    }

    #[test]
    fn only_an_explicit_false_locks_the_datastore() {
        let mut s = ClusterInformationSpec::default();
        assert!(!s.datastore_locked());
        s.datastore_ready = Some(false);
        assert!(s.datastore_locked());
    }
}
