//! The calculation's input: a plain snapshot of what the datastore says about the cluster.
//! Whoever owns the watches fills it in; nothing here knows about Kubernetes objects.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// An IPPool's `vxlanMode` / `ipipMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncapMode {
    #[default]
    Never,
    Always,
    CrossSubnet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `projectcalico.org/IPv4Address`: the node IP with its subnet's prefix length.
    pub ip: Option<Ipv4Net>,
    /// `projectcalico.org/IPv4VXLANTunnelAddr`.
    pub vxlan_tunnel_addr: Option<Ipv4Addr>,
    /// `projectcalico.org/IPv4IPIPTunnelAddr`.
    pub ipip_tunnel_addr: Option<Ipv4Addr>,
}

/// An IPAMBlock: its CIDR and the node it is affine to (`host:<node>` already stripped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    pub cidr: Ipv4Net,
    pub affinity: Option<String>,
}

/// An address held by a workload on `node`, inside a block affine to some other node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BorrowedAddr {
    pub ip: Ipv4Addr,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    pub cidr: Ipv4Net,
    pub vxlan_mode: EncapMode,
    pub ipip_mode: EncapMode,
    pub nat_outgoing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    pub local_node: String,
    pub nodes: Vec<NodeInfo>,
    pub blocks: Vec<BlockInfo>,
    pub borrowed: Vec<BorrowedAddr>,
    pub pools: Vec<PoolInfo>,
}

impl ClusterView {
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The most specific pool containing `net` (pools should not overlap, but be exact anyway).
    pub fn pool_for(&self, net: &Ipv4Net) -> Option<&PoolInfo> {
        self.pools
            .iter()
            .filter(|p| p.cidr.contains(net))
            .max_by_key(|p| p.cidr.prefix_len())
    }

    pub fn vxlan_enabled(&self) -> bool {
        self.pools.iter().any(|p| p.vxlan_mode != EncapMode::Never)
    }

    pub fn ipip_enabled(&self) -> bool {
        self.pools.iter().any(|p| p.ipip_mode != EncapMode::Never)
    }
}
