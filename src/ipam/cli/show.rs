//! `tortie ipam show`: utilisation per pool (and per block), borrowed addresses and who holds
//! one address, computed from a Snapshot (pure) and rendered as tables or JSON.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::snapshot::{ATTR_NAMESPACE, ATTR_NODE, ATTR_POD, ATTR_TYPE, SnapBlock, Snapshot};
use super::table::{render, with_percent};
use crate::ipam::cidr::num_addresses;

/// Utilisation of one pool. "In use" is every address not free to hand out, as calicoctl
/// counts it (block size minus `unallocated`): held by a handle, cooling down after release,
/// or allocated to no handle; the three are also given apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolUsage {
    pub name: String,
    pub cidr: IpNet,
    pub disabled: bool,
    pub total: u128,
    pub in_use: u128,
    /// Of `in_use`: held by a handle.
    pub held: u128,
    /// Of `in_use`: released addresses still in their reuse cooldown.
    pub cooling: u128,
    /// Of `in_use`: allocated to no handle (`tortie ipam check` reports them).
    pub ownerless: u128,
    pub free: u128,
    pub blocks: Vec<BlockUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockUsage {
    pub cidr: IpNet,
    /// Node the block is affine to; None for a block without host affinity.
    pub node: Option<String>,
    pub total: u128,
    pub in_use: u128,
    pub held: u128,
    pub cooling: u128,
    pub ownerless: u128,
    pub free: u128,
}

/// The whole picture: pools (IPv4 first, then IPv6, by name) and the blocks outside every
/// pool (left by a deleted pool; calicoctl lists them as "orphaned allocation blocks").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub pools: Vec<PoolUsage>,
    pub orphan_blocks: Vec<BlockUsage>,
}

fn block_usage(b: &SnapBlock) -> BlockUsage {
    let total = num_addresses(&b.cidr);
    match &b.parsed {
        Ok(blk) => {
            let free = blk.unallocated.len() as u128;
            BlockUsage {
                cidr: b.cidr,
                node: b.host().map(str::to_string),
                total,
                in_use: total.saturating_sub(free),
                held: blk.in_use_count() as u128,
                cooling: blk.cooling_count() as u128,
                ownerless: blk.ownerless_count() as u128,
                free,
            }
        }
        // A corrupt block is reported by `check`; here it counts as full so the free
        // figure is never optimistic.
        Err(_) => BlockUsage {
            cidr: b.cidr,
            node: b.host().map(str::to_string),
            total,
            in_use: total,
            held: 0,
            cooling: 0,
            ownerless: 0,
            free: 0,
        },
    }
}

pub fn usage(snap: &Snapshot) -> Usage {
    let mut orphan_blocks = Vec::new();
    let mut per_pool: Vec<Vec<BlockUsage>> = vec![Vec::new(); snap.pools.len()];
    for b in &snap.blocks {
        match snap.pools.iter().position(|p| p.cidr.contains(&b.cidr)) {
            Some(i) => per_pool[i].push(block_usage(b)),
            None => orphan_blocks.push(block_usage(b)),
        }
    }
    let pools = snap
        .pools
        .iter()
        .zip(per_pool)
        .map(|(p, blocks)| {
            let total = num_addresses(&p.cidr);
            let sum = |f: fn(&BlockUsage) -> u128| blocks.iter().map(f).sum::<u128>();
            let in_use = sum(|b| b.in_use);
            PoolUsage {
                name: p.name.clone(),
                cidr: p.cidr,
                disabled: p.disabled,
                total,
                in_use,
                held: sum(|b| b.held),
                cooling: sum(|b| b.cooling),
                ownerless: sum(|b| b.ownerless),
                free: total.saturating_sub(in_use),
                blocks,
            }
        })
        .collect();
    Usage {
        pools,
        orphan_blocks,
    }
}

fn block_row(b: &BlockUsage) -> Vec<String> {
    vec![
        format!("Block ({})", b.node.as_deref().unwrap_or("no affinity")),
        b.cidr.to_string(),
        b.total.to_string(),
        with_percent(b.in_use, b.total),
        with_percent(b.free, b.total),
    ]
}

pub fn render_usage(usage: &Usage, show_blocks: bool) -> String {
    let mut rows = Vec::new();
    for p in &usage.pools {
        rows.push(vec![
            "IP Pool".to_string(),
            p.cidr.to_string(),
            p.total.to_string(),
            with_percent(p.in_use, p.total),
            with_percent(p.free, p.total),
        ]);
        if show_blocks {
            rows.extend(p.blocks.iter().map(block_row));
        }
    }
    if !usage.orphan_blocks.is_empty() {
        // Never hidden: addresses in them are used, and no pool accounts for them.
        let total: u128 = usage.orphan_blocks.iter().map(|b| b.total).sum();
        let in_use: u128 = usage.orphan_blocks.iter().map(|b| b.in_use).sum();
        rows.push(vec![
            format!("Outside pools ({} blocks)", usage.orphan_blocks.len()),
            "-".to_string(),
            total.to_string(),
            with_percent(in_use, total),
            with_percent(total - in_use, total),
        ]);
        if show_blocks {
            rows.extend(usage.orphan_blocks.iter().map(block_row));
        }
    }
    render(
        &["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"],
        &rows,
    )
}

/// An address held for a node in a block affine to another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Borrowed {
    pub ip: IpAddr,
    pub borrowing_node: String,
    pub block: IpNet,
    pub block_owner: String,
    /// `pod` or the allocation's `type` attribute (vxlanTunnelAddress, ...).
    pub kind: String,
    /// `namespace/pod` when recorded, else the handle.
    pub allocated_to: String,
}

pub fn borrowed(snap: &Snapshot) -> Vec<Borrowed> {
    let mut out = Vec::new();
    for b in &snap.blocks {
        let (Some(owner), Ok(blk)) = (b.host(), &b.parsed) else {
            continue;
        };
        for (ord, a) in blk.allocations.iter().enumerate() {
            let Some(attr) = a.and_then(|i| blk.attributes.get(i)) else {
                continue;
            };
            let (Some(handle), Some(node)) = (&attr.handle_id, attr.secondary.get(ATTR_NODE))
            else {
                continue;
            };
            let Some(ip) = crate::ipam::cidr::addr_at(&blk.cidr, ord) else {
                continue;
            };
            if node != owner {
                out.push(Borrowed {
                    ip,
                    borrowing_node: node.clone(),
                    block: b.cidr,
                    block_owner: owner.to_string(),
                    kind: attr
                        .secondary
                        .get(ATTR_TYPE)
                        .cloned()
                        .unwrap_or_else(|| "pod".to_string()),
                    allocated_to: allocated_to(&attr.secondary.to_map(), handle),
                });
            }
        }
    }
    out
}

fn allocated_to(attrs: &std::collections::BTreeMap<String, String>, handle: &str) -> String {
    match (attrs.get(ATTR_NAMESPACE), attrs.get(ATTR_POD)) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => handle.to_string(),
    }
}

pub fn render_borrowed(rows: &[Borrowed]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.ip.to_string(),
                r.borrowing_node.clone(),
                r.block.to_string(),
                r.block_owner.clone(),
                r.kind.clone(),
                r.allocated_to.clone(),
            ]
        })
        .collect();
    render(
        &[
            "IP",
            "BORROWING-NODE",
            "BLOCK",
            "BLOCK OWNER",
            "TYPE",
            "ALLOCATED-TO",
        ],
        &rows,
    )
}

/// What is known about one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum IpInfo {
    InUse {
        ip: IpAddr,
        pool: Option<String>,
        block: IpNet,
        handle: String,
        namespace: Option<String>,
        pod: Option<String>,
        node: Option<String>,
        attributes: std::collections::BTreeMap<String, String>,
    },
    NotAllocated {
        ip: IpAddr,
        pool: String,
        block: Option<IpNet>,
    },
    NotInAnyPool {
        ip: IpAddr,
    },
}

pub fn ip_info(snap: &Snapshot, ip: IpAddr) -> IpInfo {
    let pool = snap.pool_of_addr(ip).map(|p| p.name.clone());
    if let Some(h) = snap.holders(ip).first() {
        let attrs = &h.attr.secondary;
        return IpInfo::InUse {
            ip,
            pool,
            block: h.block.cidr,
            handle: h.attr.handle_id.clone().unwrap_or_default(),
            namespace: attrs.get(ATTR_NAMESPACE).cloned(),
            pod: attrs.get(ATTR_POD).cloned(),
            node: attrs.get(ATTR_NODE).cloned(),
            attributes: attrs.to_map(),
        };
    }
    match pool {
        Some(pool) => IpInfo::NotAllocated {
            ip,
            pool,
            block: snap
                .blocks
                .iter()
                .find(|b| b.cidr.contains(&ip))
                .map(|b| b.cidr),
        },
        None => IpInfo::NotInAnyPool { ip },
    }
}

pub fn render_ip_info(info: &IpInfo) -> String {
    match info {
        IpInfo::InUse {
            ip,
            pool,
            block,
            handle,
            namespace,
            pod,
            node,
            attributes,
        } => {
            let mut s = format!("IP {ip} is in use\nHandle ID: {handle}\n");
            if let (Some(ns), Some(pod)) = (namespace, pod) {
                s.push_str(&format!("Pod: {ns}/{pod}\n"));
            }
            if let Some(node) = node {
                s.push_str(&format!("Node: {node}\n"));
            }
            s.push_str(&format!(
                "Block: {block} (pool {})\nAttributes:\n",
                pool.as_deref().unwrap_or("none")
            ));
            for (k, v) in attributes {
                s.push_str(&format!("  {k}: {v}\n"));
            }
            s
        }
        IpInfo::NotAllocated { ip, pool, block } => match block {
            Some(b) => format!("IP {ip} is not allocated (pool {pool}, block {b})\n"),
            None => format!("IP {ip} is not allocated (pool {pool}, no block claimed yet)\n"),
        },
        IpInfo::NotInAnyPool { ip } => format!("IP {ip} is not in any pool\n"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::DateTime;

    use super::*;
    use crate::api::ipamblock::IPAMBlock;
    use crate::ipam::block::{Block, DEFAULT_COOLDOWN, Owner, host_affinity};
    use crate::ipam::cidr::block_name;
    use crate::ipam::cli::snapshot::test_pool;
    use crate::ipam::convert::block_to_spec;
    use crate::ipam::reservations::Reservations;

    fn owner(handle: &str, node: &str, pod: &str) -> Owner {
        Owner {
            handle_id: handle.into(),
            attrs: BTreeMap::from([
                ("node".into(), node.into()),
                ("namespace".into(), "default".into()),
                ("pod".into(), pod.into()),
            ]),
        }
    }

    fn block(cidr: &str, node: &str, owners: &[Owner]) -> IPAMBlock {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut b = Block::new(cidr.parse().unwrap(), Some(host_affinity(node)), None, 1).unwrap();
        for o in owners {
            b.auto_assign(1, o, &Reservations::EMPTY, t0, DEFAULT_COOLDOWN);
        }
        IPAMBlock::new(&block_name(&b.cidr), block_to_spec(&b))
    }

    fn snap() -> Snapshot {
        let pools = [
            test_pool("v4", "10.1.0.0/24", 26),
            test_pool("v6", "fd00::/120", 122),
        ];
        let blocks = [
            block(
                "10.1.0.0/26",
                "n1",
                &[owner("h1", "n1", "a"), owner("h2", "n2", "b")],
            ),
            block("fd00::/122", "n1", &[owner("h3", "n1", "c")]),
        ];
        Snapshot::from_objects(&pools, &blocks, &[], &[])
    }

    #[test]
    fn pool_totals_count_addresses_held_in_its_blocks() {
        let u = usage(&snap()).pools;
        assert_eq!(u.len(), 2);
        assert_eq!(
            (u[0].name.as_str(), u[0].total, u[0].in_use, u[0].free),
            ("v4", 256, 2, 254)
        );
        assert_eq!(u[0].blocks.len(), 1);
        assert_eq!(u[0].blocks[0].node.as_deref(), Some("n1"));
        assert_eq!((u[0].blocks[0].in_use, u[0].blocks[0].free), (2, 62));
        assert_eq!(
            (u[1].name.as_str(), u[1].total, u[1].in_use),
            ("v6", 256, 1)
        );
        let text = render_usage(
            &Usage {
                pools: u,
                orphan_blocks: Vec::new(),
            },
            true,
        );
        assert!(text.contains("| IP Pool "), "{text}");
        assert!(text.contains("2 (1%)"), "{text}");
        assert!(text.contains("Block (n1)"), "{text}");
    }

    #[test]
    fn cooling_and_ownerless_addresses_are_in_use_like_calicoctl_counts_them() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let cool = chrono::TimeDelta::seconds(30);
        let mut b = Block::new(
            "10.1.0.0/29".parse().unwrap(),
            Some(host_affinity("n1")),
            None,
            1,
        )
        .unwrap();
        for h in ["a", "b", "c"] {
            b.auto_assign(1, &owner(h, "n1", h), &Reservations::EMPTY, t0, cool);
        }
        b.release_by_handle("a", t0, cool);
        b.attributes[1] = crate::ipam::block::Attribute::default(); // b's entry -> {}
        let blocks = [
            IPAMBlock::new(&block_name(&b.cidr), block_to_spec(&b)),
            block("10.9.0.0/30", "n2", &[owner("h9", "n2", "z")]),
        ];
        let s = Snapshot::from_objects(&[test_pool("p", "10.1.0.0/24", 29)], &blocks, &[], &[]);
        let u = usage(&s);
        let p = &u.pools[0];
        assert_eq!((p.in_use, p.held, p.cooling, p.ownerless), (3, 1, 1, 1));
        assert_eq!((p.blocks[0].in_use, p.blocks[0].free), (3, 5));
        assert_eq!(p.free, 253);
        assert_eq!(u.orphan_blocks.len(), 1);
        assert_eq!(u.orphan_blocks[0].cidr.to_string(), "10.9.0.0/30");
        let text = render_usage(&u, false);
        assert!(text.contains("Outside pools (1 blocks)"), "{text}");
        let text = render_usage(&u, true);
        let orphan_row = text
            .lines()
            .find(|l| l.contains("10.9.0.0/30"))
            .unwrap_or("");
        assert!(orphan_row.contains("Block (n2)"), "{text}");
    }

    #[test]
    fn an_address_held_for_another_node_is_borrowed() {
        let b = borrowed(&snap());
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].ip, "10.1.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            (b[0].borrowing_node.as_str(), b[0].block_owner.as_str()),
            ("n2", "n1")
        );
        assert_eq!(b[0].allocated_to, "default/b");
    }

    #[test]
    fn ip_info_tells_holder_free_and_outside() {
        let s = snap();
        match ip_info(&s, "10.1.0.0".parse().unwrap()) {
            IpInfo::InUse { handle, pod, .. } => {
                assert_eq!(handle, "h1");
                assert_eq!(pod.as_deref(), Some("a"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ip_info(&s, "10.1.0.5".parse().unwrap()),
            IpInfo::NotAllocated { block: Some(_), .. }
        ));
        assert!(matches!(
            ip_info(&s, "10.1.0.200".parse().unwrap()),
            IpInfo::NotAllocated { block: None, .. }
        ));
        assert_eq!(
            ip_info(&s, "192.0.2.1".parse().unwrap()),
            IpInfo::NotInAnyPool {
                ip: "192.0.2.1".parse().unwrap()
            }
        );
    }
}
