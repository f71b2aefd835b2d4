//! The calculation's output: what the local node's kernel should hold. Devices are named by
//! role (`DeviceRef`), not ifindex, so desired and actual compare without kernel state; the
//! drivers resolve roles to interfaces.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

pub use super::{IPIP_DEVICE, MAIN_TABLE, ROUTE_PROTOCOL, VXLAN_DEVICE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// A MAC from netlink bytes; None unless exactly six bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(bytes).ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub mac: Mac,
    pub mtu: u32,
    /// The local node IP: the VTEP's source address; its interface is the parent device.
    pub local_ip: Ipv4Addr,
    /// Configured on the device as a /32.
    pub tunnel_addr: Ipv4Addr,
    /// TX checksum offload (see `calc::offload`).
    pub tx_checksum_offload: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpipDevice {
    pub name: String,
    pub mtu: u32,
    /// Configured on the device as a /32 when known.
    pub tunnel_addr: Option<Ipv4Addr>,
}

/// A device by the role it plays; the driver maps roles to ifindexes and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceRef {
    Vxlan,
    Ipip,
    /// The interface holding the local node IP (VXLAN's parent, CrossSubnet's way out).
    Parent,
}

/// Routes are identified the way the kernel identifies an IPv4 route tortie writes (tos 0,
/// metric 0): destination and table. Two routes with the same key cannot coexist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub dst: Ipv4Net,
    pub table: u32,
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.table == MAIN_TABLE {
            write!(f, "{}", self.dst)
        } else {
            write!(f, "{} table {}", self.dst, self.table)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    Blackhole,
    Via {
        gateway: Ipv4Addr,
        device: DeviceRef,
        onlink: bool,
    },
    /// Only ever read from the kernel: a tortie-protocol route in a shape tortie never
    /// writes (unknown device, other type). It never equals a wanted target, so it is
    /// replaced or removed.
    Unrecognised(String),
}

impl fmt::Display for RouteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteTarget::Blackhole => write!(f, "blackhole"),
            RouteTarget::Via {
                gateway,
                device,
                onlink,
            } => {
                let dev = match device {
                    DeviceRef::Vxlan => VXLAN_DEVICE,
                    DeviceRef::Ipip => IPIP_DEVICE,
                    DeviceRef::Parent => "<parent>",
                };
                write!(
                    f,
                    "via {gateway} dev {dev}{}",
                    if *onlink { " onlink" } else { "" }
                )
            }
            RouteTarget::Unrecognised(s) => write!(f, "unrecognised ({s})"),
        }
    }
}

/// Why a route exists; drives precedence when two sources want the same prefix, and the
/// "routes by kind" metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// A borrowed address (/32) held by a remote node.
    Borrowed,
    /// A remote block reached without encapsulation (CrossSubnet, same subnet, or no encap).
    RemoteBlockDirect,
    RemoteBlockVxlan,
    RemoteBlockIpip,
    /// A block affine to this node: its unused addresses must not leak to the default route.
    LocalBlackhole,
}

impl RouteKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            RouteKind::Borrowed => "borrowed",
            RouteKind::RemoteBlockDirect => "remote_block_direct",
            RouteKind::RemoteBlockVxlan => "remote_block_vxlan",
            RouteKind::RemoteBlockIpip => "remote_block_ipip",
            RouteKind::LocalBlackhole => "local_blackhole",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedRoute {
    pub target: RouteTarget,
    pub kind: RouteKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredDataplane {
    /// `None`: no `vxlan.calico` should exist.
    pub vxlan: Option<VxlanDevice>,
    /// `None`: tortie does not want `tunl0` (it is never deleted: the kernel owns it).
    pub ipip: Option<IpipDevice>,
    /// The local node IP, which picks the parent interface.
    pub parent_ip: Option<Ipv4Addr>,
    /// Permanent neighbours on `vxlan.calico`: remote tunnel IP → remote VTEP MAC.
    pub neighbours: BTreeMap<Ipv4Addr, Mac>,
    /// `self permanent` FDB entries on `vxlan.calico`: remote VTEP MAC → remote node IP.
    pub fdb: BTreeMap<Mac, Ipv4Addr>,
    pub routes: BTreeMap<RouteKey, WantedRoute>,
}

impl DesiredDataplane {
    /// Wanted routes reduced to what the kernel can show, for diffing against a dump.
    pub fn route_targets(&self) -> BTreeMap<RouteKey, RouteTarget> {
        self.routes
            .iter()
            .map(|(k, r)| (*k, r.target.clone()))
            .collect()
    }

    pub fn routes_by_kind(&self) -> BTreeMap<RouteKind, usize> {
        let mut counts = BTreeMap::new();
        for r in self.routes.values() {
            *counts.entry(r.kind).or_insert(0) += 1;
        }
        counts
    }
}
