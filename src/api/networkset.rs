//! NetworkSet: a namespaced, labelled list of networks that policy selectors can match like
//! endpoints (Calico NetworkSet). Types only; policy evaluation reads them.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "NetworkSet",
    doc = "Labelled networks of one namespace that policy can select (Calico NetworkSet)",
    plural = "networksets",
    singular = "networkset",
    namespaced,
    derive = "PartialEq"
)]
pub struct NetworkSetSpec {
    /// CIDRs (or single addresses) in the set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[schemars(length(max = 10000), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(n, isCIDR(n) || isIP(n))").message("nets entries must be CIDRs or IP addresses"))]
    pub nets: Vec<String>,
}

impl NetworkSetSpec {
    /// The networks; a bare address counts as a /32 or /128. Entries the API server would
    /// have rejected are skipped.
    pub fn networks(&self) -> Vec<ipnet::IpNet> {
        parse_nets(&self.nets)
    }
}

/// Parses `nets` entries of a (Global)NetworkSet, masked to their prefix.
pub fn parse_nets(nets: &[String]) -> Vec<ipnet::IpNet> {
    nets.iter()
        .filter_map(|s| {
            s.parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
        })
        .map(|n| n.trunc())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_parse_cidrs_and_addresses() {
        let s = NetworkSetSpec {
            nets: vec!["10.0.0.1/24".into(), "192.0.2.7".into(), "fd00::/64".into()],
        };
        let got: Vec<String> = s.networks().iter().map(|n| n.to_string()).collect();
        assert_eq!(got, ["10.0.0.0/24", "192.0.2.7/32", "fd00::/64"]);
        assert_eq!(serde_json::to_value(&s).unwrap()["nets"][1], "192.0.2.7");
    }
}
