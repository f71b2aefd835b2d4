//! The overlay calculation's input, read from the datastore's stores and the IPAM view:
//! Nodes (address and tunnel annotations), IPPools, IPAMBlocks (affinity) and borrowed
//! addresses. Pure: the caller hands in the objects, nothing here does I/O.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;

use crate::api::IPPool;
use crate::api::ippool::EncapMode as ApiEncap;
use crate::calc::nat::NatPool;
use crate::calc::{BlockInfo, BorrowedAddr, ClusterView, EncapMode, NodeInfo, PoolInfo};
use crate::ipam::block::Block;
use crate::ipam::cidr::addr_at;

use crate::api::vocab;
pub use crate::api::vocab::{
    NODE_IPV4_ADDRESS as IPV4_ADDRESS, NODE_IPV4_IPIP_TUNNEL_ADDR as IPIP_TUNNEL_ADDR,
    NODE_IPV4_VXLAN_TUNNEL_ADDR as VXLAN_TUNNEL_ADDR,
};

/// What this node knows about itself before its Node object shows it: the detected address
/// and the tunnel addresses IPAM holds for it. These win over the (possibly lagging) store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    pub ip: Option<Ipv4Net>,
    pub vxlan_tunnel_addr: Option<Ipv4Addr>,
    pub ipip_tunnel_addr: Option<Ipv4Addr>,
}

pub fn cluster_view(
    local: &LocalNode,
    nodes: &[Arc<Node>],
    pools: &[Arc<IPPool>],
    blocks: &[&Block],
) -> ClusterView {
    let mut infos: Vec<NodeInfo> = nodes
        .iter()
        .filter_map(|n| node_info(n))
        .filter(|n| n.name != local.name)
        .collect();
    infos.push(NodeInfo {
        name: local.name.clone(),
        ip: local.ip,
        vxlan_tunnel_addr: local.vxlan_tunnel_addr,
        ipip_tunnel_addr: local.ipip_tunnel_addr,
    });
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    let mut view = ClusterView {
        local_node: local.name.clone(),
        nodes: infos,
        pools: pools.iter().filter_map(|p| pool_info(p)).collect(),
        ..ClusterView::default()
    };
    view.pools.sort_by_key(|p| p.cidr);
    for block in blocks {
        let IpNet::V4(cidr) = block.cidr else {
            continue;
        };
        let affinity = block.host().map(str::to_owned);
        view.borrowed
            .extend(borrowed_in(block, affinity.as_deref()));
        view.blocks.push(BlockInfo { cidr, affinity });
    }
    view.blocks.sort_by_key(|b| b.cidr);
    view.borrowed.sort_by_key(|b| b.ip);
    view
}

/// Allocations recorded for a node other than the block's: those pods live elsewhere.
fn borrowed_in<'b>(
    block: &'b Block,
    affinity: Option<&'b str>,
) -> impl Iterator<Item = BorrowedAddr> + 'b {
    block
        .allocations
        .iter()
        .enumerate()
        .filter_map(move |(ordinal, attr)| {
            let attr = block.attributes.get((*attr)?)?;
            let node = attr.secondary.get(vocab::ATTR_NODE)?;
            if Some(node.as_str()) == affinity {
                return None;
            }
            match addr_at(&block.cidr, ordinal)? {
                IpAddr::V4(ip) => Some(BorrowedAddr {
                    ip,
                    node: node.clone(),
                }),
                IpAddr::V6(_) => None,
            }
        })
}

fn node_info(node: &Node) -> Option<NodeInfo> {
    let name = node.metadata.name.clone()?;
    let annotations = node.metadata.annotations.as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    Some(NodeInfo {
        name,
        ip: get(IPV4_ADDRESS).and_then(|v| v.parse::<Ipv4Net>().ok()),
        vxlan_tunnel_addr: get(VXLAN_TUNNEL_ADDR).and_then(parse_tunnel_addr),
        ipip_tunnel_addr: get(IPIP_TUNNEL_ADDR).and_then(parse_tunnel_addr),
    })
}

/// Calico writes a bare IP; tolerate `<ip>/<len>` too.
pub fn parse_tunnel_addr(value: &str) -> Option<Ipv4Addr> {
    let ip = value.split('/').next()?;
    ip.parse().ok()
}

fn encap(mode: &ApiEncap) -> EncapMode {
    match mode {
        ApiEncap::Never => EncapMode::Never,
        ApiEncap::Always => EncapMode::Always,
        ApiEncap::CrossSubnet => EncapMode::CrossSubnet,
    }
}

fn pool_info(pool: &IPPool) -> Option<PoolInfo> {
    let IpNet::V4(cidr) = pool.spec.cidr_net().ok()? else {
        return None;
    };
    Some(PoolInfo {
        cidr,
        vxlan_mode: encap(&pool.spec.vxlan_mode),
        ipip_mode: encap(&pool.spec.ipip_mode),
        nat_outgoing: pool.spec.nat_outgoing,
    })
}

/// Both families: NAT outgoing covers IPv6 pools too.
pub fn nat_pools(pools: &[Arc<IPPool>]) -> Vec<NatPool> {
    let mut out: Vec<NatPool> = pools
        .iter()
        .filter_map(|p| {
            Some(NatPool {
                cidr: p.spec.cidr_net().ok()?,
                nat_outgoing: p.spec.nat_outgoing,
                disabled: p.spec.disabled,
            })
        })
        .collect();
    out.sort_by_key(|p| p.cidr);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::api::ObjectMeta;

    use super::*;
    use crate::api::IPPoolSpec;
    use crate::ipam::block::Owner;

    fn node(name: &str, annotations: &[(&str, &str)]) -> Arc<Node> {
        Arc::new(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    fn block_with(cidr: &str, affinity: &str, holders: &[(&str, &str)]) -> Block {
        let cidr: IpNet = cidr.parse().expect("cidr");
        let mut b = Block::new(cidr, Some(format!("host:{affinity}")), None, 1).expect("block");
        for (handle, node) in holders {
            let owner = Owner {
                handle_id: handle.to_string(),
                attrs: BTreeMap::from([("node".to_string(), node.to_string())]),
            };
            let got = b.auto_assign(
                1,
                &owner,
                &Default::default(),
                chrono::Utc::now(),
                chrono::TimeDelta::zero(),
            );
            assert_eq!(got.len(), 1);
        }
        b
    }

    #[test]
    fn remote_annotations_are_read_and_local_knowledge_wins() {
        let local = LocalNode {
            name: "a".into(),
            ip: Some("10.0.0.1/24".parse().expect("net")),
            vxlan_tunnel_addr: Some(Ipv4Addr::new(192, 168, 0, 1)),
            ipip_tunnel_addr: None,
        };
        let nodes = [
            node("a", &[(IPV4_ADDRESS, "10.9.9.9/24")]),
            node(
                "b",
                &[
                    (IPV4_ADDRESS, "10.0.0.2/24"),
                    (VXLAN_TUNNEL_ADDR, "192.168.1.0"),
                    (IPIP_TUNNEL_ADDR, "192.168.1.1/32"),
                ],
            ),
            node("c", &[(IPV4_ADDRESS, "garbage")]),
        ];
        let v = cluster_view(&local, &nodes, &[], &[]);
        assert_eq!(v.node("a").and_then(|n| n.ip), local.ip);
        let b = v.node("b").expect("b");
        assert_eq!(b.ip, Some("10.0.0.2/24".parse().expect("net")));
        assert_eq!(b.vxlan_tunnel_addr, Some(Ipv4Addr::new(192, 168, 1, 0)));
        assert_eq!(b.ipip_tunnel_addr, Some(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(v.node("c").and_then(|n| n.ip), None);
    }

    #[test]
    fn allocations_for_another_node_are_borrowed() {
        let own = block_with("192.168.0.0/30", "a", &[("h1", "a"), ("h2", "b")]);
        let v = cluster_view(
            &LocalNode {
                name: "a".into(),
                ..Default::default()
            },
            &[],
            &[],
            &[&own],
        );
        assert_eq!(
            v.blocks,
            vec![BlockInfo {
                cidr: "192.168.0.0/30".parse().expect("net"),
                affinity: Some("a".into())
            }]
        );
        assert_eq!(
            v.borrowed,
            vec![BorrowedAddr {
                ip: Ipv4Addr::new(192, 168, 0, 1),
                node: "b".into()
            }]
        );
    }

    #[test]
    fn pools_keep_modes_and_nat_covers_both_families() {
        let pool = |name: &str, cidr: &str, nat: bool| {
            Arc::new(IPPool::new(
                name,
                IPPoolSpec {
                    cidr: cidr.into(),
                    vxlan_mode: ApiEncap::Always,
                    nat_outgoing: nat,
                    ..Default::default()
                },
            ))
        };
        let pools = [
            pool("v4", "10.244.0.0/16", true),
            pool("v6", "fd00::/48", false),
        ];
        let v = cluster_view(&LocalNode::default(), &[], &pools, &[]);
        assert_eq!(v.pools.len(), 1);
        assert!(v.vxlan_enabled() && !v.ipip_enabled());
        assert!(v.pools[0].nat_outgoing);
        let nat = nat_pools(&pools);
        assert_eq!(nat.len(), 2);
        assert_eq!(nat.iter().filter(|p| p.nat_outgoing).count(), 1);
    }
}
