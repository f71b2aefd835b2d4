//! IPAM: Calico-compatible address management. Sans-IO core (block maths, the in-block
//! allocator, pool choice, free-block search) with the API-server store on top of it.

pub mod attrs;
pub mod block;
pub mod cidr;
pub mod cli;
pub mod convert;
pub mod default_pool;
mod error;
pub mod gc;
pub mod metrics;
pub mod pools;
pub mod reservations;
pub mod search;
pub mod store;

pub use error::IpamError;
pub use store::{AssignRequest, Ipam, TunnelKind, pod_handle};
