//! Cluster view → desired overlay dataplane for the local node: the VXLAN device and one
//! neighbour + FDB entry per remote VTEP, tunl0 when a pool wants IPIP, and a route per
//! remote block, local block (blackhole) and remotely held borrowed address.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::mtu::{FALLBACK_HOST_MTU, ipip_mtu, vxlan_mtu};
use super::view::{ClusterView, EncapMode, NodeInfo};
use super::vtep::vtep_mac;
use crate::desired::{
    DesiredDataplane, DeviceRef, IPIP_DEVICE, IpipDevice, MAIN_TABLE, RouteKey, RouteKind,
    RouteTarget, VXLAN_DEVICE, VxlanDevice, WantedRoute,
};

/// Felix's defaults: VXLANVNI 4096, VXLANPort 4789, the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    /// Detected by the driver (see `calc::mtu::detect_host_mtu`).
    pub host_mtu: u32,
    pub vxlan_vni: u32,
    pub vxlan_port: u16,
    /// FelixConfiguration `vxlanMTU` / `ipipMTU`; None: host MTU less the overhead.
    pub vxlan_mtu: Option<u32>,
    pub ipip_mtu: Option<u32>,
    pub route_table: u32,
    /// From `calc::offload::vxlan_tx_checksum_offload`.
    pub vxlan_tx_checksum_offload: bool,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            host_mtu: FALLBACK_HOST_MTU,
            vxlan_vni: 4096,
            vxlan_port: 4789,
            vxlan_mtu: None,
            ipip_mtu: None,
            route_table: MAIN_TABLE,
            vxlan_tx_checksum_offload: true,
        }
    }
}

pub fn desired_dataplane(view: &ClusterView, cfg: &OverlayConfig) -> DesiredDataplane {
    // Indexed once: with thousands of nodes a per-block scan would dominate.
    let nodes: HashMap<&str, &NodeInfo> = view.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let local = nodes.get(view.local_node.as_str()).copied();
    let local_net = local.and_then(|n| n.ip);
    let mut d = DesiredDataplane {
        parent_ip: local_net.map(|n| n.addr()),
        ..DesiredDataplane::default()
    };

    // The VTEP needs both a source address and a tunnel address; until IPAM has given the
    // node one, there is no device and no VXLAN route (Felix waits the same way).
    if view.vxlan_enabled()
        && let Some(node) = local
        && let (Some(ip), Some(tunnel_addr)) = (node.ip, node.vxlan_tunnel_addr)
    {
        d.vxlan = Some(VxlanDevice {
            name: VXLAN_DEVICE.to_string(),
            vni: cfg.vxlan_vni,
            port: cfg.vxlan_port,
            mac: vtep_mac(&node.name),
            mtu: cfg.vxlan_mtu.unwrap_or_else(|| vxlan_mtu(cfg.host_mtu)),
            local_ip: ip.addr(),
            tunnel_addr,
            tx_checksum_offload: cfg.vxlan_tx_checksum_offload,
        });
    }
    if view.ipip_enabled() {
        d.ipip = Some(IpipDevice {
            name: IPIP_DEVICE.to_string(),
            mtu: cfg.ipip_mtu.unwrap_or_else(|| ipip_mtu(cfg.host_mtu)),
            tunnel_addr: local.and_then(|n| n.ipip_tunnel_addr),
        });
    }

    if d.vxlan.is_some() {
        for node in remote_nodes(view) {
            if let (Some(ip), Some(tunnel)) = (node.ip, node.vxlan_tunnel_addr) {
                let mac = vtep_mac(&node.name);
                d.neighbours.insert(tunnel, mac);
                d.fdb.insert(mac, ip.addr());
            }
        }
    }

    for block in &view.blocks {
        let Some(owner) = block.affinity.as_deref() else {
            continue;
        };
        if owner == view.local_node {
            // A /32 block is a single workload's address; its route belongs to the CNI.
            if block.cidr.prefix_len() < 32 {
                let wanted = WantedRoute {
                    target: RouteTarget::Blackhole,
                    kind: RouteKind::LocalBlackhole,
                };
                insert_route(&mut d, cfg, block.cidr, wanted);
            }
        } else if let Some(wanted) = route_toward(view, &nodes, &d, local_net, owner, &block.cidr) {
            insert_route(&mut d, cfg, block.cidr, wanted);
        }
    }

    for b in &view.borrowed {
        if b.node == view.local_node {
            continue; // the local workload's own route (CNI) covers it
        }
        let dst = Ipv4Net::from(b.ip);
        if let Some(mut wanted) = route_toward(view, &nodes, &d, local_net, &b.node, &dst) {
            wanted.kind = RouteKind::Borrowed;
            insert_route(&mut d, cfg, dst, wanted);
        }
    }
    d
}

fn remote_nodes(view: &ClusterView) -> impl Iterator<Item = &NodeInfo> {
    view.nodes.iter().filter(|n| n.name != view.local_node)
}

/// How to reach `dst` on node `owner`, following the mode of the pool containing `dst`.
/// None when the pool, the node or its tunnel is unknown, or when nothing can carry it.
fn route_toward(
    view: &ClusterView,
    nodes: &HashMap<&str, &NodeInfo>,
    d: &DesiredDataplane,
    local_net: Option<Ipv4Net>,
    owner: &str,
    dst: &Ipv4Net,
) -> Option<WantedRoute> {
    let remote = *nodes.get(owner)?;
    let remote_ip = remote.ip?.addr();
    let pool = view.pool_for(dst)?;
    let same_subnet = local_net.is_some_and(|l| l.contains(&remote_ip));
    let via = |gateway: Ipv4Addr, device: DeviceRef, kind: RouteKind| WantedRoute {
        target: RouteTarget::Via {
            gateway,
            device,
            onlink: true,
        },
        kind,
    };
    let direct =
        || same_subnet.then(|| via(remote_ip, DeviceRef::Parent, RouteKind::RemoteBlockDirect));
    let vxlan = || {
        d.vxlan.as_ref()?;
        let tunnel = remote.vxlan_tunnel_addr?;
        Some(via(tunnel, DeviceRef::Vxlan, RouteKind::RemoteBlockVxlan))
    };
    let ipip = || {
        d.ipip.as_ref()?;
        Some(via(remote_ip, DeviceRef::Ipip, RouteKind::RemoteBlockIpip))
    };
    // Calico refuses pools with both encapsulations on; if one slips through, VXLAN wins.
    match (pool.vxlan_mode, pool.ipip_mode) {
        (EncapMode::Always, _) => vxlan(),
        (EncapMode::CrossSubnet, _) => direct().or_else(vxlan),
        (EncapMode::Never, EncapMode::Always) => ipip(),
        (EncapMode::Never, EncapMode::CrossSubnet) => direct().or_else(ipip),
        (EncapMode::Never, EncapMode::Never) => direct(),
    }
}

/// When two sources want one prefix (inconsistent blocks), the lower kind wins, then the
/// lower target: the result never depends on input order.
fn insert_route(d: &mut DesiredDataplane, cfg: &OverlayConfig, dst: Ipv4Net, wanted: WantedRoute) {
    let key = RouteKey {
        dst: dst.trunc(),
        table: cfg.route_table,
    };
    match d.routes.get(&key) {
        Some(existing) if rank(existing) <= rank(&wanted) => {}
        _ => {
            d.routes.insert(key, wanted);
        }
    }
}

fn rank(r: &WantedRoute) -> (RouteKind, String) {
    (r.kind, r.target.to_string())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::calc::view::{BlockInfo, BorrowedAddr, PoolInfo};

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn node(name: &str, node_ip: &str, vxlan: Option<&str>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ip: Some(net(node_ip)),
            vxlan_tunnel_addr: vxlan.map(ip),
            ipip_tunnel_addr: None,
        }
    }
    fn block(cidr: &str, owner: &str) -> BlockInfo {
        BlockInfo {
            cidr: net(cidr),
            affinity: Some(owner.into()),
        }
    }
    fn pool(vxlan: EncapMode, ipip: EncapMode) -> PoolInfo {
        PoolInfo {
            cidr: net("10.244.0.0/16"),
            vxlan_mode: vxlan,
            ipip_mode: ipip,
            nat_outgoing: true,
        }
    }
    fn key(dst: &str) -> RouteKey {
        RouteKey {
            dst: net(dst),
            table: MAIN_TABLE,
        }
    }
    fn via(gw: &str, device: DeviceRef) -> RouteTarget {
        RouteTarget::Via {
            gateway: ip(gw),
            device,
            onlink: true,
        }
    }

    /// n1 (local) and n2 share 198.18.0.0/24; n3 sits in another subnet.
    fn three_nodes(vxlan: EncapMode, ipip: EncapMode) -> ClusterView {
        ClusterView {
            local_node: "n1".into(),
            nodes: vec![
                node("n1", "198.18.0.1/24", Some("10.244.1.0")),
                node("n2", "198.18.0.2/24", Some("10.244.2.0")),
                node("n3", "198.19.0.3/24", Some("10.244.3.0")),
            ],
            blocks: vec![
                block("10.244.1.0/26", "n1"),
                block("10.244.2.0/26", "n2"),
                block("10.244.3.0/26", "n3"),
            ],
            borrowed: vec![],
            pools: vec![pool(vxlan, ipip)],
        }
    }

    fn calc(view: &ClusterView) -> DesiredDataplane {
        desired_dataplane(
            view,
            &OverlayConfig {
                host_mtu: 1500,
                ..OverlayConfig::default()
            },
        )
    }

    #[test]
    fn vxlan_device_follows_calico_defaults() {
        let d = calc(&three_nodes(EncapMode::Always, EncapMode::Never));
        let dev = d.vxlan.expect("vxlan device wanted");
        assert_eq!(dev.name, "vxlan.calico");
        assert_eq!((dev.vni, dev.port, dev.mtu), (4096, 4789, 1450));
        assert_eq!(dev.local_ip, ip("198.18.0.1"));
        assert_eq!(dev.tunnel_addr, ip("10.244.1.0"));
        assert_eq!(dev.mac, vtep_mac("n1"));
        assert_eq!(d.parent_ip, Some(ip("198.18.0.1")));
        assert!(d.ipip.is_none());
    }

    #[test]
    fn vxlan_always_routes_every_remote_block_through_the_peer_vtep() {
        let d = calc(&three_nodes(EncapMode::Always, EncapMode::Never));
        let t = d.route_targets();
        assert_eq!(
            t[&key("10.244.2.0/26")],
            via("10.244.2.0", DeviceRef::Vxlan)
        );
        assert_eq!(
            t[&key("10.244.3.0/26")],
            via("10.244.3.0", DeviceRef::Vxlan)
        );
        assert_eq!(t[&key("10.244.1.0/26")], RouteTarget::Blackhole);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn every_remote_vtep_gets_a_neighbour_and_an_fdb_entry() {
        let d = calc(&three_nodes(EncapMode::Always, EncapMode::Never));
        assert_eq!(d.neighbours.len(), 2);
        assert_eq!(d.neighbours[&ip("10.244.2.0")], vtep_mac("n2"));
        assert_eq!(d.fdb[&vtep_mac("n2")], ip("198.18.0.2"));
        assert_eq!(d.fdb[&vtep_mac("n3")], ip("198.19.0.3"));
        assert!(
            !d.fdb.contains_key(&vtep_mac("n1")),
            "no entry for ourselves"
        );
    }

    #[test]
    fn cross_subnet_goes_direct_inside_the_subnet_and_encapsulates_outside() {
        let d = calc(&three_nodes(EncapMode::CrossSubnet, EncapMode::Never));
        let t = d.route_targets();
        assert_eq!(
            t[&key("10.244.2.0/26")],
            via("198.18.0.2", DeviceRef::Parent)
        );
        assert_eq!(
            t[&key("10.244.3.0/26")],
            via("10.244.3.0", DeviceRef::Vxlan)
        );
        assert_eq!(
            d.routes[&key("10.244.2.0/26")].kind,
            RouteKind::RemoteBlockDirect
        );
    }

    #[test]
    fn ipip_routes_via_the_node_ip_on_tunl0() {
        let d = calc(&three_nodes(EncapMode::Never, EncapMode::Always));
        assert!(d.vxlan.is_none());
        assert!(d.neighbours.is_empty() && d.fdb.is_empty());
        let dev = d.ipip.as_ref().expect("tunl0 wanted");
        assert_eq!((dev.name.as_str(), dev.mtu), ("tunl0", 1480));
        let t = d.route_targets();
        assert_eq!(t[&key("10.244.2.0/26")], via("198.18.0.2", DeviceRef::Ipip));
        assert_eq!(t[&key("10.244.3.0/26")], via("198.19.0.3", DeviceRef::Ipip));
    }

    #[test]
    fn ipip_cross_subnet_goes_direct_inside_the_subnet() {
        let d = calc(&three_nodes(EncapMode::Never, EncapMode::CrossSubnet));
        let t = d.route_targets();
        assert_eq!(
            t[&key("10.244.2.0/26")],
            via("198.18.0.2", DeviceRef::Parent)
        );
        assert_eq!(t[&key("10.244.3.0/26")], via("198.19.0.3", DeviceRef::Ipip));
    }

    #[test]
    fn without_encapsulation_only_same_subnet_blocks_are_reachable() {
        let d = calc(&three_nodes(EncapMode::Never, EncapMode::Never));
        assert!(d.vxlan.is_none() && d.ipip.is_none());
        let t = d.route_targets();
        assert_eq!(
            t[&key("10.244.2.0/26")],
            via("198.18.0.2", DeviceRef::Parent)
        );
        assert!(!t.contains_key(&key("10.244.3.0/26")));
        assert_eq!(t[&key("10.244.1.0/26")], RouteTarget::Blackhole);
    }

    #[test]
    fn no_vxlan_device_or_vxlan_route_until_the_local_tunnel_address_exists() {
        let mut view = three_nodes(EncapMode::Always, EncapMode::Never);
        view.nodes[0].vxlan_tunnel_addr = None;
        let d = calc(&view);
        assert!(d.vxlan.is_none());
        assert!(d.neighbours.is_empty() && d.fdb.is_empty());
        assert_eq!(
            d.route_targets().len(),
            1,
            "only the local blackhole: {:?}",
            d.routes
        );
    }

    #[test]
    fn a_peer_without_a_tunnel_address_gets_no_vtep_and_no_route() {
        let mut view = three_nodes(EncapMode::Always, EncapMode::Never);
        view.nodes[2].vxlan_tunnel_addr = None;
        let d = calc(&view);
        assert!(!d.fdb.contains_key(&vtep_mac("n3")));
        assert!(!d.routes.contains_key(&key("10.244.3.0/26")));
        assert!(d.routes.contains_key(&key("10.244.2.0/26")));
    }

    #[test]
    fn removing_a_node_removes_its_routes_neighbour_and_fdb_entry() {
        let mut view = three_nodes(EncapMode::Always, EncapMode::Never);
        let before = calc(&view);
        view.nodes.retain(|n| n.name != "n3");
        let after = calc(&view);
        assert!(before.fdb.contains_key(&vtep_mac("n3")));
        assert!(!after.fdb.contains_key(&vtep_mac("n3")));
        assert!(!after.neighbours.contains_key(&ip("10.244.3.0")));
        assert!(!after.routes.contains_key(&key("10.244.3.0/26")));
        assert_eq!(after.routes.len(), 2);
    }

    #[test]
    fn local_single_address_blocks_get_no_blackhole() {
        let mut view = three_nodes(EncapMode::Always, EncapMode::Never);
        view.blocks.push(block("10.244.9.9/32", "n1"));
        let d = calc(&view);
        assert!(!d.routes.contains_key(&key("10.244.9.9/32")));
    }

    #[test]
    fn borrowed_addresses_get_a_host_route_toward_the_holder() {
        let mut view = three_nodes(EncapMode::Always, EncapMode::Never);
        view.borrowed = vec![
            // held by n3 inside n1's block: must not fall into our blackhole
            BorrowedAddr {
                ip: ip("10.244.1.7"),
                node: "n3".into(),
            },
            // held by n2 inside n3's block
            BorrowedAddr {
                ip: ip("10.244.3.9"),
                node: "n2".into(),
            },
            // held by us: the CNI's route covers it
            BorrowedAddr {
                ip: ip("10.244.2.5"),
                node: "n1".into(),
            },
        ];
        let d = calc(&view);
        assert_eq!(
            d.routes[&key("10.244.1.7/32")].target,
            via("10.244.3.0", DeviceRef::Vxlan)
        );
        assert_eq!(d.routes[&key("10.244.1.7/32")].kind, RouteKind::Borrowed);
        assert_eq!(
            d.routes[&key("10.244.3.9/32")].target,
            via("10.244.2.0", DeviceRef::Vxlan)
        );
        assert!(!d.routes.contains_key(&key("10.244.2.5/32")));
    }

    #[test]
    fn blocks_outside_every_pool_or_without_affinity_get_no_route() {
        let mut view = three_nodes(EncapMode::Always, EncapMode::Never);
        view.blocks.push(block("172.16.0.0/26", "n2"));
        view.blocks.push(BlockInfo {
            cidr: net("10.244.50.0/26"),
            affinity: None,
        });
        let d = calc(&view);
        assert!(!d.routes.contains_key(&key("172.16.0.0/26")));
        assert!(!d.routes.contains_key(&key("10.244.50.0/26")));
    }

    #[test]
    fn conflicting_claims_on_one_prefix_resolve_the_same_whatever_the_order() {
        let mut view = three_nodes(EncapMode::Always, EncapMode::Never);
        view.blocks.push(block("10.244.1.0/26", "n2")); // n1's block also claimed by n2
        let a = calc(&view);
        view.blocks.reverse();
        let b = calc(&view);
        assert_eq!(a, b);
        assert_eq!(
            a.routes[&key("10.244.1.0/26")].kind,
            RouteKind::RemoteBlockVxlan
        );
    }

    #[test]
    fn routes_go_to_the_configured_table() {
        let view = three_nodes(EncapMode::Always, EncapMode::Never);
        let cfg = OverlayConfig {
            route_table: 100,
            ..OverlayConfig::default()
        };
        let d = desired_dataplane(&view, &cfg);
        assert!(d.routes.keys().all(|k| k.table == 100));
    }

    #[test]
    fn routes_by_kind_counts_each_kind() {
        let d = calc(&three_nodes(EncapMode::CrossSubnet, EncapMode::Never));
        let counts = d.routes_by_kind();
        assert_eq!(counts[&RouteKind::RemoteBlockDirect], 1);
        assert_eq!(counts[&RouteKind::RemoteBlockVxlan], 1);
        assert_eq!(counts[&RouteKind::LocalBlackhole], 1);
    }
}
