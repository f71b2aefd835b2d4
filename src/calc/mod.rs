//! The overlay calculation: a pure function from a snapshot of the cluster (nodes, pools,
//! blocks, borrowed addresses) to the dataplane the local node should have (VXLAN/IPIP devices,
//! neighbours, FDB entries, routes), plus the set diff the drivers apply. No I/O here.

pub mod mtu;
pub mod nat;
pub mod offload;
pub mod overlay;
pub mod policy;
pub mod view;
pub mod vtep;

pub use crate::desired::{Changes, diff};
pub use crate::desired::{
    DesiredDataplane, DeviceRef, IpipDevice, Mac, RouteKey, RouteKind, RouteTarget, VxlanDevice,
    WantedRoute,
};
pub use overlay::{OverlayConfig, desired_dataplane};
pub use view::{BlockInfo, BorrowedAddr, ClusterView, EncapMode, NodeInfo, PoolInfo};
