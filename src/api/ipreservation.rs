//! IPReservation: addresses IPAM must never hand out (existing allocations are left alone).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "IPReservation",
    doc = "Addresses IPAM never hands out (Calico IPReservation)",
    plural = "ipreservations",
    singular = "ipreservation",
    derive = "PartialEq"
)]
pub struct IPReservationSpec {
    /// CIDRs and single addresses excluded from new allocations.
    #[serde(
        rename = "reservedCIDRs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 1024), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c) || isIP(c))").message("reservedCIDRs entries must be CIDRs or IP addresses"))]
    pub reserved_cidrs: Vec<String>,
}

impl IPReservationSpec {
    /// The reserved ranges; a bare address counts as a /32 or /128. Unparsable entries
    /// (which the API server rejects) are skipped rather than failing every allocation.
    pub fn nets(&self) -> Vec<ipnet::IpNet> {
        self.reserved_cidrs
            .iter()
            .filter_map(|s| {
                s.parse::<ipnet::IpNet>()
                    .ok()
                    .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
            })
            .map(|n| n.trunc())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_addresses_become_host_routes() {
        let r = IPReservationSpec {
            reserved_cidrs: vec!["10.0.0.0/30".into(), "10.0.1.7".into(), "fd00::1".into()],
        };
        let nets: Vec<String> = r.nets().iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/30", "10.0.1.7/32", "fd00::1/128"]);
    }
}
