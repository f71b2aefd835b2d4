//! FelixConfiguration: Calico's dataplane settings, cluster-wide in `default`, per node in
//! `node.<nodename>`, per group of nodes in any other object with a `nodeSelector`. The
//! fields tortie applies are typed here with Calico's names and validation; Calico's many
//! others are kept as written (the schema preserves unknown fields, so a calicoctl update
//! never loses them) and tortie names them in a Warning Event (see `crate::felix_config`).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The cluster-wide object.
pub const GLOBAL_NAME: &str = "default";
/// Prefix of a node's own object: `node.<nodename>`.
pub const NODE_PREFIX: &str = "node.";

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "FelixConfiguration",
    doc = "Dataplane settings: default (cluster), node.<name> (one node) or nodeSelector-scoped (Calico FelixConfiguration)",
    plural = "felixconfigurations",
    singular = "felixconfiguration",
    derive = "PartialEq"
)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct FelixConfigurationSpec {
    /// MTU of the IPv4 VXLAN device and of pods while VXLAN is in use; 0/unset: host MTU - 50.
    #[serde(rename = "vxlanMTU", default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub vxlan_mtu: Option<i32>,
    /// MTU of the IPv4 IP-in-IP device and of pods while IPIP is in use; 0/unset: host - 20.
    #[serde(rename = "ipipMTU", default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub ipip_mtu: Option<i32>,
    /// UDP port of VXLAN (default 4789).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub vxlan_port: Option<i32>,
    /// VXLAN network identifier (default 4096).
    #[serde(rename = "vxlanVNI", default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16777215))]
    pub vxlan_vni: Option<i32>,
    /// How often routes (and tortie's other kernel state) are fully resynced, a Go duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))*$"))]
    pub route_refresh_interval: Option<String>,
    /// `feature=true|false` overrides of detected kernel features, comma-separated (tortie
    /// reads `ChecksumOffloadBroken`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^([a-zA-Z0-9-_]+=(true|false|),)*([a-zA-Z0-9-_]+=(true|false|))?$"
    ))]
    pub feature_detect_override: Option<String>,
    /// Log level: Trace, Debug, Info, Warning, Error, Fatal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(?i)(Trace|Debug|Info|Warning|Error|Fatal)?$"))]
    pub log_severity_screen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_metrics_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_metrics_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub prometheus_metrics_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub health_port: Option<i32>,
    /// Calico selector of the nodes this (non-default, non-node) object applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub node_selector: Option<String>,
    /// Every other Calico field, kept as written.
    #[serde(flatten)]
    #[schemars(skip)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// The node a `node.<name>` object is for.
pub fn node_of(name: &str) -> Option<&str> {
    name.strip_prefix(NODE_PREFIX).filter(|n| !n.is_empty())
}

/// Name of a node's own object.
pub fn node_object_name(node: &str) -> String {
    format!("{NODE_PREFIX}{node}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calico_field_names_and_unknown_fields_round_trip() {
        let json = serde_json::json!({
            "vxlanMTU": 1400,
            "ipipMTU": 1440,
            "vxlanVNI": 4097,
            "vxlanPort": 4790,
            "routeRefreshInterval": "1m30s",
            "logSeverityScreen": "Debug",
            "bpfEnabled": false,
            "natOutgoingAddress": "192.0.2.1"
        });
        let s: FelixConfigurationSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(s.vxlan_mtu, Some(1400));
        assert_eq!(s.vxlan_vni, Some(4097));
        assert_eq!(s.other.len(), 2);
        assert_eq!(serde_json::to_value(&s).unwrap(), json);
    }

    #[test]
    fn node_objects_are_named_after_their_node() {
        assert_eq!(node_of("node.worker-1"), Some("worker-1"));
        assert_eq!(node_of("default"), None);
        assert_eq!(node_of("node."), None);
        assert_eq!(node_object_name("a"), "node.a");
    }
}
