//! The neutral home of desired state: what the calculation (and the policy compiler) writes
//! and the drivers and the CNI plumbing read. Types, their diff and Calico's constants only;
//! nothing here does I/O, and nothing here imports the calculation or a driver.

pub mod dataplane;
pub mod diff;
pub mod mtu;
pub mod nat;
pub mod nft;

pub use dataplane::{
    DesiredDataplane, DeviceRef, IpipDevice, Mac, RouteKey, RouteKind, RouteTarget, VxlanDevice,
    WantedRoute,
};
pub use diff::{Changes, diff};

/// Calico's device names (felix dataplane_defs): operators and calicoctl look for these.
pub const VXLAN_DEVICE: &str = "vxlan.calico";
pub const IPIP_DEVICE: &str = "tunl0";
/// The route protocol Calico marks its routes with; tortie owns exactly the routes with it.
pub const ROUTE_PROTOCOL: u8 = 80;
pub const MAIN_TABLE: u32 = 254;

/// Felix's packet mark bits, allocated from its default mark mask `0xffff0000` in this order;
/// policy uses the same bits so that a node moved between Calico and tortie means the same.
pub const MARK_MASK: u32 = 0xffff_0000;
pub const MARK_ACCEPT: u32 = 0x0001_0000;
pub const MARK_PASS: u32 = 0x0002_0000;
pub const MARK_SCRATCH0: u32 = 0x0004_0000;
pub const MARK_SCRATCH1: u32 = 0x0008_0000;
