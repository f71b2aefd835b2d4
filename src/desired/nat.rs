//! NAT outgoing as desired state: which pool CIDRs are masqueraded and which count as inside
//! the cluster, the UDP source ports masquerade may use, and whether VXLAN skips conntrack;
//! and the nft table (`inet tortie-nat`) that expresses it. The calculation fills `NatModel`
//! (`calc::nat`); the nft driver applies the table.

use ipnet::{Ipv4Net, Ipv6Net};

use super::nft::{Chain, Element, Family, Hook, Rule, Set, Table};

/// One table for both families (`inet`), apart from any policy table.
pub const TABLE: &str = "tortie-nat";
pub const FAMILY: Family = Family::Inet;
pub const NAT_CHAIN: &str = "postrouting";
pub const RAW_PREROUTING_CHAIN: &str = "raw-prerouting";
pub const RAW_OUTPUT_CHAIN: &str = "raw-output";
/// Calico's sets are `masq-ipam-pools` and `all-ipam-pools`; nft set names keep the words.
pub const MASQ_POOLS_V4: &str = "masq_ipam_pools_v4";
pub const ALL_POOLS_V4: &str = "all_ipam_pools_v4";
pub const MASQ_POOLS_V6: &str = "masq_ipam_pools_v6";
pub const ALL_POOLS_V6: &str = "all_ipam_pools_v6";

/// srcnat + 10, as Calico's nftables mode: kube-proxy's masquerade (priority 100) decides
/// first, and the kernel runs no further NAT chain once a mapping exists.
const NAT_PRIORITY: i32 = 110;
/// The raw priority: before conntrack (-200) looks at the packet.
const RAW_PRIORITY: i32 = -300;

/// An inclusive port range, as `masquerade to :first-last` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// The NAT table's desired contents. Prefix lists are sorted and free of overlaps, so they
/// load into interval sets as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatModel {
    pub masq_pools_v4: Vec<Ipv4Net>,
    pub all_pools_v4: Vec<Ipv4Net>,
    pub masq_pools_v6: Vec<Ipv6Net>,
    pub all_pools_v6: Vec<Ipv6Net>,
    /// Where masqueraded UDP may take its source port: never the VXLAN port (Calico bug
    /// #12244: a reply to that port would hit the VXLAN NOTRACK rule and be lost).
    pub udp_masq_ports: PortRange,
    /// The UDP destination port exempt from conntrack (VXLAN's), when VXLAN is on.
    pub notrack_udp_port: Option<u16>,
}

/// The nft table for `model`. Its shape (sets, chains) never depends on the pools, so a
/// pool change is a set-element change, and a VXLAN toggle refills the two raw chains.
pub fn table(model: &NatModel) -> Table {
    let mut t = Table::new(FAMILY, TABLE);
    let v4 = |nets: &[Ipv4Net]| Set::prefixes("ipv4_addr", nets.iter().map(|n| Element::v4(*n)));
    let v6 = |nets: &[Ipv6Net]| Set::prefixes("ipv6_addr", nets.iter().map(|n| Element::v6(*n)));
    t.sets
        .insert(MASQ_POOLS_V4.into(), v4(&model.masq_pools_v4));
    t.sets.insert(ALL_POOLS_V4.into(), v4(&model.all_pools_v4));
    t.sets
        .insert(MASQ_POOLS_V6.into(), v6(&model.masq_pools_v6));
    t.sets.insert(ALL_POOLS_V6.into(), v6(&model.all_pools_v6));

    let ports = model.udp_masq_ports;
    let ports = if ports.first == ports.last {
        ports.first.to_string()
    } else {
        format!("{}-{}", ports.first, ports.last)
    };
    let mut nat = Vec::new();
    for (proto, masq, all) in [
        ("ip", MASQ_POOLS_V4, ALL_POOLS_V4),
        ("ip6", MASQ_POOLS_V6, ALL_POOLS_V6),
    ] {
        // UDP first, with a port range that leaves out the VXLAN port; everything else
        // (TCP, ICMP, …) keeps the kernel's full range. NAT statements end evaluation.
        let from_pool_to_outside = format!("{proto} saddr @{masq} {proto} daddr != @{all}");
        nat.push(Rule::new(format!(
            "{from_pool_to_outside} meta l4proto udp counter masquerade to :{ports} fully-random"
        )));
        nat.push(Rule::new(format!(
            "{from_pool_to_outside} counter masquerade fully-random"
        )));
    }
    t.chains.insert(
        NAT_CHAIN.into(),
        Chain {
            hook: Some(hook("nat", "postrouting", NAT_PRIORITY)),
            rules: nat,
        },
    );
    // Destination port only: both directions of VXLAN traffic go to the VXLAN port, while a
    // source-port match would also exempt (and so stop masquerading) any pod flow that
    // happens to start from that port. The chains stay when VXLAN is off, so the table's
    // shape does not depend on the pools.
    let notrack: Vec<Rule> = model
        .notrack_udp_port
        .map(|port| Rule::new(format!("udp dport {port} counter notrack")))
        .into_iter()
        .collect();
    for (name, hook_name) in [
        (RAW_PREROUTING_CHAIN, "prerouting"),
        (RAW_OUTPUT_CHAIN, "output"),
    ] {
        t.chains.insert(
            name.into(),
            Chain {
                hook: Some(hook("filter", hook_name, RAW_PRIORITY)),
                rules: notrack.clone(),
            },
        );
    }
    t
}

fn hook(kind: &str, hook: &str, priority: i32) -> Hook {
    Hook {
        kind: kind.into(),
        hook: hook.into(),
        priority,
        policy: "accept".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(notrack: Option<u16>) -> NatModel {
        NatModel {
            masq_pools_v4: vec!["10.244.0.0/16".parse().unwrap()],
            all_pools_v4: vec![
                "10.9.9.9/32".parse().unwrap(),
                "10.244.0.0/16".parse().unwrap(),
            ],
            masq_pools_v6: vec!["fd00:1::/64".parse().unwrap()],
            all_pools_v6: vec!["fd00:1::/64".parse().unwrap()],
            udp_masq_ports: PortRange {
                first: 4790,
                last: 65535,
            },
            notrack_udp_port: notrack,
        }
    }

    #[test]
    fn udp_masquerade_is_fully_random_and_skips_the_vxlan_port() {
        let t = table(&model(Some(4789)));
        let nat = &t.chains[NAT_CHAIN].rules;
        assert_eq!(nat.len(), 4, "udp + rest, for v4 and v6");
        assert_eq!(
            nat[0].text,
            "ip saddr @masq_ipam_pools_v4 ip daddr != @all_ipam_pools_v4 meta l4proto udp \
             counter masquerade to :4790-65535 fully-random"
        );
        assert!(nat[1].text.ends_with("counter masquerade fully-random"));
        assert!(nat[2].text.starts_with("ip6 saddr @masq_ipam_pools_v6"));
    }

    #[test]
    fn notrack_only_when_vxlan_is_on_and_the_shape_never_changes() {
        let on = table(&model(Some(4789)));
        for chain in [RAW_PREROUTING_CHAIN, RAW_OUTPUT_CHAIN] {
            assert_eq!(
                on.chains[chain].rules,
                vec![Rule::new("udp dport 4789 counter notrack")]
            );
        }
        let off = table(&model(None));
        assert!(off.chains[RAW_OUTPUT_CHAIN].rules.is_empty());
        assert_eq!(off.chains.len(), 3);
        assert_eq!(off.sets.len(), 4);
    }

    #[test]
    fn set_elements_are_the_pool_prefixes() {
        let t = table(&model(None));
        let all: Vec<String> = t.sets[ALL_POOLS_V4]
            .elements
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(all, ["10.9.9.9", "10.244.0.0/16"]);
        assert_eq!(t.sets[ALL_POOLS_V6].kind, "ipv6_addr");
    }
}
