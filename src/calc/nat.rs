//! NAT outgoing, computed: from the IP pools (and whether VXLAN is on) to the contents of
//! tortie's nftables NAT table — which CIDRs are masqueraded, which count as "inside the
//! cluster", the UDP port range masquerade may use, and whether VXLAN is exempt from conntrack.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Calico's `VXLANPort` default.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

/// The lowest port the kernel hands out when it masquerades an unprivileged source port.
const FIRST_NAT_PORT: u16 = 1024;

/// What NAT outgoing needs to know about one IPPool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatPool {
    pub cidr: IpNet,
    pub nat_outgoing: bool,
    /// Disabled pools hand out no new addresses but their pods live on, so they keep their
    /// NAT behaviour and still count as cluster destinations (as with Calico).
    pub disabled: bool,
}

pub use crate::desired::nat::{NatModel, PortRange};

/// Settings NAT outgoing takes from outside the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatSettings {
    pub vxlan_port: u16,
    /// Some pool has `vxlanMode` other than Never.
    pub vxlan_enabled: bool,
}

impl Default for NatSettings {
    fn default() -> Self {
        NatSettings {
            vxlan_port: DEFAULT_VXLAN_PORT,
            vxlan_enabled: false,
        }
    }
}

/// The desired NAT table for these pools.
///
/// The UDP range excludes the VXLAN port even while VXLAN is off: a mapping made then would
/// outlive the moment a VXLAN pool appears and the NOTRACK rule starts eating its replies.
pub fn desired_nat(pools: &[NatPool], settings: NatSettings) -> NatModel {
    let masq: Vec<IpNet> = pools
        .iter()
        .filter(|p| p.nat_outgoing)
        .map(|p| p.cidr)
        .collect();
    let all: Vec<IpNet> = pools.iter().map(|p| p.cidr).collect();
    let (masq_pools_v4, masq_pools_v6) = split_families(&masq);
    let (all_pools_v4, all_pools_v6) = split_families(&all);
    NatModel {
        masq_pools_v4,
        all_pools_v4,
        masq_pools_v6,
        all_pools_v6,
        udp_masq_ports: masquerade_ports_excluding(settings.vxlan_port),
        notrack_udp_port: settings.vxlan_enabled.then_some(settings.vxlan_port),
    }
}

/// The larger of the two ranges on either side of `port` within 1024–65535. One range, not
/// two rules split at random: a small side (1024–4788 for VXLAN's port) would run out of
/// ports for busy destinations such as a DNS resolver long before the whole space does, and
/// a NAT with no free port drops the packet. The cost is 3,765 of 64,512 ports (5.8 %).
pub fn masquerade_ports_excluding(port: u16) -> PortRange {
    if port < FIRST_NAT_PORT {
        return PortRange {
            first: FIRST_NAT_PORT,
            last: u16::MAX,
        };
    }
    let below = port - FIRST_NAT_PORT; // ports FIRST..port-1
    let above = u16::MAX - port; // ports port+1..MAX
    if above >= below {
        PortRange {
            first: port + 1,
            last: u16::MAX,
        }
    } else {
        PortRange {
            first: FIRST_NAT_PORT,
            last: port - 1,
        }
    }
}

/// Sorted, merged prefixes per family: nft rejects overlapping elements in an interval set
/// (pools should not overlap, but one bad pool must not stop NAT for all the others).
fn split_families(nets: &[IpNet]) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let v4: Vec<Ipv4Net> = nets
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(n.trunc()),
            IpNet::V6(_) => None,
        })
        .collect();
    let v6: Vec<Ipv6Net> = nets
        .iter()
        .filter_map(|n| match n {
            IpNet::V6(n) => Some(n.trunc()),
            IpNet::V4(_) => None,
        })
        .collect();
    (Ipv4Net::aggregate(&v4), Ipv6Net::aggregate(&v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, nat_outgoing: bool) -> NatPool {
        NatPool {
            cidr: cidr.parse().unwrap(),
            nat_outgoing,
            disabled: false,
        }
    }

    fn v4(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn only_nat_outgoing_pools_are_masqueraded_but_all_pools_are_cluster_destinations() {
        let m = desired_nat(
            &[pool("10.244.0.0/16", true), pool("10.250.0.0/16", false)],
            NatSettings::default(),
        );
        assert_eq!(m.masq_pools_v4, v4(&["10.244.0.0/16"]));
        assert_eq!(m.all_pools_v4, v4(&["10.244.0.0/16", "10.250.0.0/16"]));
        assert!(m.masq_pools_v6.is_empty() && m.all_pools_v6.is_empty());
    }

    #[test]
    fn disabled_pool_keeps_masquerading_its_existing_pods() {
        let mut p = pool("172.16.0.0/24", true);
        p.disabled = true;
        let m = desired_nat(&[p], NatSettings::default());
        assert_eq!(m.masq_pools_v4, v4(&["172.16.0.0/24"]));
        assert_eq!(m.all_pools_v4, v4(&["172.16.0.0/24"]));
    }

    #[test]
    fn families_are_split_and_v6_pools_get_their_own_sets() {
        let m = desired_nat(
            &[pool("fd00:10:244::/48", true), pool("10.1.0.0/16", true)],
            NatSettings::default(),
        );
        assert_eq!(m.masq_pools_v4, v4(&["10.1.0.0/16"]));
        let v6: Ipv6Net = "fd00:10:244::/48".parse().unwrap();
        assert_eq!(m.masq_pools_v6, vec![v6]);
        assert_eq!(m.all_pools_v6, vec![v6]);
    }

    #[test]
    fn overlapping_or_unaligned_pools_become_disjoint_sorted_prefixes() {
        let m = desired_nat(
            &[
                pool("10.2.0.0/16", true),
                pool("10.1.0.0/16", true),
                pool("10.1.3.7/24", true), // host bits set, inside 10.1.0.0/16
                pool("10.3.0.0/16", true), // adjacent to 10.2.0.0/16: merged
            ],
            NatSettings::default(),
        );
        assert_eq!(
            m.masq_pools_v4,
            v4(&["10.1.0.0/16", "10.2.0.0/15"]),
            "sorted, merged, truncated"
        );
    }

    #[test]
    fn no_pools_gives_empty_sets() {
        let m = desired_nat(&[], NatSettings::default());
        assert!(m.masq_pools_v4.is_empty() && m.all_pools_v4.is_empty());
    }

    #[test]
    fn udp_masquerade_range_never_contains_the_vxlan_port() {
        let r = masquerade_ports_excluding(4789);
        assert_eq!(
            r,
            PortRange {
                first: 4790,
                last: 65535
            }
        );
        for port in [1024, 1025, 4789, 30000, 40000, 65534, 65535] {
            let r = masquerade_ports_excluding(port);
            assert!(!(r.first..=r.last).contains(&port), "{port} in {r:?}");
            assert!(r.first >= 1024 && r.first <= r.last, "{r:?}");
        }
        // A port below the NAT range costs nothing.
        assert_eq!(
            masquerade_ports_excluding(789),
            PortRange {
                first: 1024,
                last: 65535
            }
        );
        // The larger side wins.
        assert_eq!(
            masquerade_ports_excluding(60000),
            PortRange {
                first: 1024,
                last: 59999
            }
        );
    }

    #[test]
    fn vxlan_is_exempt_from_conntrack_only_when_enabled() {
        let off = desired_nat(&[], NatSettings::default());
        assert_eq!(off.notrack_udp_port, None);
        assert_eq!(
            off.udp_masq_ports.first, 4790,
            "range excludes 4789 even when off"
        );
        let on = desired_nat(
            &[],
            NatSettings {
                vxlan_port: 8472,
                vxlan_enabled: true,
            },
        );
        assert_eq!(on.notrack_udp_port, Some(8472));
        assert!(!(on.udp_masq_ports.first..=on.udp_masq_ports.last).contains(&8472));
    }
}
