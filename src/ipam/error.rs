//! The IPAM error type: every message names the object (pool, block, handle, annotation)
//! and the value that was wrong, so an operator can act on a failed pod event alone.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use super::pools::Family;
use super::search::PoolUsage;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "node {node:?} has been deleted: no address is assigned on it (its blocks are being released)"
    )]
    NodeDeleted { node: String },
    #[error("invalid blockSize {block_size}: {reason}")]
    InvalidBlockSize { block_size: u8, reason: String },
    #[error("IPAM block {block} is inconsistent ({reason}); refusing to allocate from it")]
    CorruptBlock { block: IpNet, reason: String },
    #[error("IPAMBlock with cidr {cidr:?} cannot be read: {reason}")]
    InvalidBlockObject { cidr: String, reason: String },
    #[error("address {addr} is outside block {block}")]
    AddressOutsideBlock { addr: IpAddr, block: IpNet },
    #[error("address {addr} is already in use by handle {handle:?}")]
    AddressInUse { addr: IpAddr, handle: String },
    #[error("address {addr} was released recently and is cooling down until {until}")]
    AddressCoolingDown { addr: IpAddr, until: DateTime<Utc> },
    #[error("IPPool {pool:?} cannot be used: {reason}")]
    InvalidPool { pool: String, reason: String },
    #[error("{whose} annotation {key}={value:?} is not a valid JSON list of strings: {reason}")]
    BadAnnotation {
        whose: &'static str,
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("the given pool ({pool}) {reason}")]
    RequestedPoolUnusable { pool: String, reason: String },
    #[error("no enabled {family} pool allows use {use_} and selects node {node:?}")]
    NoPoolForNode {
        family: Family,
        node: String,
        use_: String,
    },
    #[error("cannot assign fixed address {addr}: {reason}")]
    FixedIpUnusable { addr: IpAddr, reason: String },
    #[error(
        "node {node:?} holds {owned} blocks, the maxBlocksPerHost limit ({max}), and none has a free address"
    )]
    BlockLimit {
        node: String,
        owned: usize,
        max: u32,
    },
    #[error(
        "node {node:?} has no free address in its own blocks and no block left to claim in pools {pools:?}; other nodes' blocks have room but strictAffinity is true"
    )]
    StrictAffinity { node: String, pools: Vec<String> },
    #[error("{}", join_usage(pools))]
    Exhausted { pools: Vec<PoolUsage> },
    #[error("IPAM block {block} has no free address")]
    BlockFull { block: IpNet },
    #[error("IPAM block {block} is not affine to node {node:?}")]
    NotAffine { block: IpNet, node: String },
    #[error("IPAM block {block} no longer exists")]
    BlockGone { block: IpNet },
    #[error("the writer of IPAM block {block} stopped")]
    WriterGone { block: IpNet },
    #[error("writing the IPAM block failed: {reason}")]
    WriteFailed { reason: String },
    #[error("{object}: gave up after too many compare-and-swap conflicts")]
    TooManyConflicts { object: String },
    #[error("cannot {action} {object}: {source}")]
    Api {
        object: String,
        action: &'static str,
        source: Box<kube::Error>,
    },
    #[error("IPAM watches did not sync within {after:?}")]
    NotSynced { after: std::time::Duration },
}

fn join_usage(pools: &[PoolUsage]) -> String {
    if pools.is_empty() {
        return "no pool to allocate from".to_string();
    }
    pools
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
