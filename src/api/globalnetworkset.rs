//! GlobalNetworkSet: a cluster-wide, labelled list of networks that policy selectors can
//! match like endpoints (Calico GlobalNetworkSet). Types only; policy evaluation reads them.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "GlobalNetworkSet",
    doc = "Labelled networks, cluster-wide, that policy can select (Calico GlobalNetworkSet)",
    plural = "globalnetworksets",
    singular = "globalnetworkset",
    derive = "PartialEq"
)]
pub struct GlobalNetworkSetSpec {
    /// CIDRs (or single addresses) in the set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[schemars(length(max = 10000), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(n, isCIDR(n) || isIP(n))").message("nets entries must be CIDRs or IP addresses"))]
    pub nets: Vec<String>,
}

impl GlobalNetworkSetSpec {
    /// The networks; a bare address counts as a /32 or /128.
    pub fn networks(&self) -> Vec<ipnet::IpNet> {
        super::networkset::parse_nets(&self.nets)
    }
}
