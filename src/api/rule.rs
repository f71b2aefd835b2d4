//! Calico policy rules shared by NetworkPolicy and GlobalNetworkPolicy: an action plus
//! match criteria on protocol, ICMP, IP version and the source/destination entities.
//! Every positive match has a `not*` twin; all criteria in one rule must hold.
//! No CEL rules in here: Calico bounds none of these lists, and nested in unbounded rule lists
//! any per-item rule exceeds the API server's cost budget; the policy compiler validates.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub action: Action,

    /// Only match this IP version (4 or 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = [4, 6]))]
    pub ip_version: Option<i32>,

    /// TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite, or a protocol number 1-255.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<IntOrString>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<ICMPFields>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<IntOrString>,

    #[serde(rename = "notICMP", default, skip_serializing_if = "Option::is_none")]
    pub not_icmp: Option<ICMPFields>,

    /// Match criteria on the packet's source.
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub source: EntityRule,

    /// Match criteria on the packet's destination.
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub destination: EntityRule,

    /// HTTP match (only enforced by an application-layer proxy; kept for compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HTTPMatch>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<RuleMetadata>,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Log the packet and continue with the next rule.
    Log,
    /// Skip the rest of this tier.
    Pass,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub struct ICMPFields {
    /// ICMP type, e.g. 8 for echo request.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 254))]
    pub type_: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 255))]
    pub code: Option<i32>,
}

/// Match criteria on one end of a connection.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EntityRule {
    /// Addresses in any of these CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,

    /// Calico selector over endpoint labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Calico selector over namespace labels (`global()` for non-namespaced entities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,

    /// Endpoints of a Kubernetes Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<ServiceMatch>,

    /// Ports: a number, a range "80:90", or a named port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<IntOrString>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_nets: Vec<String>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_selector: Option<String>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<IntOrString>,

    /// Pods running as these service accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<ServiceAccountMatch>,
}

impl EntityRule {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Defaults to the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceAccountMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Calico selector over service account labels (ANDed with names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HTTPMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<HTTPPath>,
}

/// Exactly one of exact or prefix.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HTTPPath {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RuleMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_calico_rule_with_int_and_string_ports() {
        let r: Rule = serde_json::from_value(serde_json::json!({
            "action": "Allow",
            "protocol": "TCP",
            "notICMP": {"type": 8},
            "destination": {"ports": [80, "8000:8080", "http"], "notNets": ["10.0.0.0/8"]}
        }))
        .unwrap();
        assert_eq!(r.protocol, Some(IntOrString::String("TCP".into())));
        assert_eq!(r.destination.ports[0], IntOrString::Int(80));
        assert_eq!(
            r.destination.ports[1],
            IntOrString::String("8000:8080".into())
        );
        assert_eq!(r.not_icmp.unwrap().type_, Some(8));
        assert!(r.source.is_empty());
        let back = serde_json::to_value(&r).unwrap();
        assert!(back.get("source").is_none());
        assert_eq!(back["destination"]["notNets"][0], "10.0.0.0/8");
    }
}
