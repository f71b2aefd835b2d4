//! `tortie ipam check`: every way blocks, handles, affinities, pools and pods can disagree,
//! found from one Snapshot (pure, `now` passed in) and summarised for people and as JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;
use serde::Serialize;

use super::snapshot::{ATTR_NAMESPACE, ATTR_NODE, ATTR_POD, ATTR_POD_UID, Snapshot};
use crate::api::AffinityState;
use crate::ipam::cidr::addr_at;

/// A pending affinity younger than this may be a claim in progress, not a leftover.
pub const PENDING_AFFINITY_GRACE: TimeDelta = TimeDelta::minutes(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Problem {
    InvalidPool {
        pool: String,
        reason: String,
    },
    InvalidBlock {
        block: String,
        reason: String,
    },
    BlockOutsidePools {
        block: IpNet,
        node: Option<String>,
    },
    OverlappingBlocks {
        block: IpNet,
        other: IpNet,
    },
    /// One address recorded as held in two blocks.
    DuplicateAllocation {
        ip: IpAddr,
        blocks: Vec<IpNet>,
        handles: Vec<String>,
    },
    BlockWithoutAffinity {
        block: IpNet,
        node: String,
    },
    AffinityWithoutBlock {
        affinity: String,
        node: String,
        cidr: String,
        state: String,
    },
    AllocationWithoutPod {
        ip: IpAddr,
        handle: String,
        namespace: String,
        pod: String,
        node: Option<String>,
        reason: String,
    },
    AllocationWithoutHandle {
        handle: String,
        ips: Vec<IpAddr>,
    },
    HandleCountMismatch {
        handle: String,
        block: String,
        recorded: i64,
        actual: i64,
    },
    HandleWithoutAllocations {
        handle: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::InvalidPool { pool, reason } => {
                write!(f, "IPPool {pool} cannot be read: {reason}")
            }
            Problem::InvalidBlock { block, reason } => {
                write!(f, "IPAM block {block} is inconsistent: {reason}")
            }
            Problem::BlockOutsidePools { block, node } => write!(
                f,
                "IPAM block {block} (affinity {}) is outside every IPPool",
                node.as_deref().unwrap_or("none")
            ),
            Problem::OverlappingBlocks { block, other } => {
                write!(f, "IPAM blocks {block} and {other} overlap")
            }
            Problem::DuplicateAllocation {
                ip,
                blocks,
                handles,
            } => write!(
                f,
                "IP {ip} is allocated more than once: blocks {blocks:?}, handles {handles:?}"
            ),
            Problem::BlockWithoutAffinity { block, node } => write!(
                f,
                "IPAM block {block} is affine to node {node} but that node has no BlockAffinity for it"
            ),
            Problem::AffinityWithoutBlock {
                affinity,
                node,
                cidr,
                state,
            } => write!(
                f,
                "BlockAffinity {affinity} (node {node}, {cidr}, state {state}) has no matching IPAM block"
            ),
            Problem::AllocationWithoutPod {
                ip,
                handle,
                namespace,
                pod,
                node,
                reason,
            } => write!(
                f,
                "IP {ip} (handle {handle}, node {}) is allocated to pod {namespace}/{pod}, which {reason}",
                node.as_deref().unwrap_or("unknown")
            ),
            Problem::AllocationWithoutHandle { handle, ips } => write!(
                f,
                "handle {handle} holds {ips:?} in blocks but has no IPAMHandle object"
            ),
            Problem::HandleCountMismatch {
                handle,
                block,
                recorded,
                actual,
            } => write!(
                f,
                "IPAMHandle {handle} records {recorded} address(es) in block {block}, the block holds {actual}"
            ),
            Problem::HandleWithoutAllocations { handle } => {
                write!(f, "IPAMHandle {handle} holds no address in any block")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub blocks: usize,
    pub allocations: usize,
    pub handles: usize,
    pub affinities: usize,
    /// None when pods were not read (allocations were then not checked against pods).
    pub pods: Option<usize>,
    pub problems: Vec<Problem>,
}

pub fn check(snap: &Snapshot, now: DateTime<Utc>) -> Report {
    let mut problems = Vec::new();
    for (pool, reason) in &snap.invalid_pools {
        problems.push(Problem::InvalidPool {
            pool: pool.clone(),
            reason: reason.clone(),
        });
    }
    check_blocks(snap, &mut problems);
    check_affinities(snap, now, &mut problems);
    let allocations = check_allocations(snap, &mut problems);
    check_handles(snap, &mut problems);
    Report {
        blocks: snap.blocks.len(),
        allocations,
        handles: snap.handles.len(),
        affinities: snap.affinities.len(),
        pods: snap.pods.as_ref().map(BTreeMap::len),
        problems,
    }
}

fn check_blocks(snap: &Snapshot, problems: &mut Vec<Problem>) {
    for (i, b) in snap.blocks.iter().enumerate() {
        if let Err(reason) = &b.parsed {
            problems.push(Problem::InvalidBlock {
                block: b.cidr.to_string(),
                reason: reason.clone(),
            });
        }
        if snap.pool_of(&b.cidr).is_none() {
            problems.push(Problem::BlockOutsidePools {
                block: b.cidr,
                node: b.host().map(str::to_string),
            });
        }
        for other in &snap.blocks[i + 1..] {
            if b.cidr.contains(&other.cidr) || other.cidr.contains(&b.cidr) {
                problems.push(Problem::OverlappingBlocks {
                    block: b.cidr,
                    other: other.cidr,
                });
            }
        }
    }
}

fn check_affinities(snap: &Snapshot, now: DateTime<Utc>, problems: &mut Vec<Problem>) {
    let affine: BTreeSet<(&str, String)> = snap
        .affinities
        .iter()
        .map(|a| (a.spec.node.as_str(), normal_cidr(&a.spec.cidr)))
        .collect();
    for b in &snap.blocks {
        if let Some(node) = b.host()
            && !affine.contains(&(node, b.cidr.to_string()))
        {
            problems.push(Problem::BlockWithoutAffinity {
                block: b.cidr,
                node: node.to_string(),
            });
        }
    }
    let blocks: BTreeSet<(Option<&str>, String)> = snap
        .blocks
        .iter()
        .map(|b| (b.host(), b.cidr.to_string()))
        .collect();
    for a in &snap.affinities {
        let in_progress = a.spec.state == AffinityState::Pending
            && a.created.is_some_and(|c| c + PENDING_AFFINITY_GRACE > now);
        let cidr = normal_cidr(&a.spec.cidr);
        if !in_progress && !blocks.contains(&(Some(a.spec.node.as_str()), cidr)) {
            problems.push(Problem::AffinityWithoutBlock {
                affinity: a.name.clone(),
                node: a.spec.node.clone(),
                cidr: a.spec.cidr.clone(),
                state: serde_json::to_value(a.spec.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
            });
        }
    }
}

/// Handle → block CIDR → addresses, as the blocks record them; also finds allocations that
/// appear twice and allocations whose pod is gone. Returns the number of allocations.
fn check_allocations(snap: &Snapshot, problems: &mut Vec<Problem>) -> usize {
    let mut by_ip: BTreeMap<IpAddr, Vec<(IpNet, String)>> = BTreeMap::new();
    let mut count = 0;
    for b in &snap.blocks {
        let Ok(blk) = &b.parsed else { continue };
        for (ord, a) in blk.allocations.iter().enumerate() {
            let Some(attr) = a.and_then(|i| blk.attributes.get(i)) else {
                continue;
            };
            let (Some(handle), Some(ip)) = (&attr.handle_id, addr_at(&blk.cidr, ord)) else {
                continue;
            };
            count += 1;
            by_ip.entry(ip).or_default().push((b.cidr, handle.clone()));
            let Some(pods) = &snap.pods else { continue };
            // Calico's rule: an allocation without pod attributes (tunnel, other owners) is
            // not judged by pods.
            let (Some(ns), Some(pod)) = (
                attr.secondary.get(ATTR_NAMESPACE),
                attr.secondary.get(ATTR_POD),
            ) else {
                continue;
            };
            let reason = match (
                pods.get(&(ns.clone(), pod.clone())),
                attr.secondary.get(ATTR_POD_UID),
            ) {
                (None, _) => Some("does not exist".to_string()),
                (Some(uid), Some(want)) if uid != want => Some(format!(
                    "exists with UID {uid}, not the recorded {want} (a new pod of that name)"
                )),
                _ => None,
            };
            if let Some(reason) = reason {
                problems.push(Problem::AllocationWithoutPod {
                    ip,
                    handle: handle.clone(),
                    namespace: ns.clone(),
                    pod: pod.clone(),
                    node: attr.secondary.get(ATTR_NODE).cloned(),
                    reason,
                });
            }
        }
    }
    for (ip, holders) in by_ip.into_iter().filter(|(_, h)| h.len() > 1) {
        problems.push(Problem::DuplicateAllocation {
            ip,
            blocks: holders.iter().map(|(c, _)| *c).collect(),
            handles: holders.into_iter().map(|(_, h)| h).collect(),
        });
    }
    count
}

fn check_handles(snap: &Snapshot, problems: &mut Vec<Problem>) {
    // handle → block → count, from the blocks.
    let mut actual: BTreeMap<&str, BTreeMap<String, i64>> = BTreeMap::new();
    let mut ips: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for b in &snap.blocks {
        let Ok(blk) = &b.parsed else { continue };
        for (ord, a) in blk.allocations.iter().enumerate() {
            let Some(handle) = a
                .and_then(|i| blk.attributes.get(i))
                .and_then(|x| x.handle_id.as_deref())
            else {
                continue;
            };
            *actual
                .entry(handle)
                .or_default()
                .entry(b.cidr.to_string())
                .or_insert(0) += 1;
            ips.entry(handle)
                .or_default()
                .extend(addr_at(&blk.cidr, ord));
        }
    }
    let objects: BTreeMap<&str, BTreeMap<String, i64>> = snap
        .handles
        .iter()
        .map(|h| {
            let counts = h
                .block
                .iter()
                .filter(|(_, n)| **n != 0)
                .map(|(c, n)| (normal_cidr(c), *n))
                .collect();
            (h.handle_id.as_str(), counts)
        })
        .collect();
    for (handle, counts) in &objects {
        let held = actual.get(handle).cloned().unwrap_or_default();
        if held.is_empty() {
            problems.push(Problem::HandleWithoutAllocations {
                handle: handle.to_string(),
            });
            continue;
        }
        let cidrs: BTreeSet<&String> = counts.keys().chain(held.keys()).collect();
        for c in cidrs {
            let (recorded, real) = (
                counts.get(c).copied().unwrap_or(0),
                held.get(c).copied().unwrap_or(0),
            );
            if recorded != real {
                problems.push(Problem::HandleCountMismatch {
                    handle: handle.to_string(),
                    block: c.clone(),
                    recorded,
                    actual: real,
                });
            }
        }
    }
    for (handle, addrs) in ips {
        if !objects.contains_key(handle) {
            problems.push(Problem::AllocationWithoutHandle {
                handle: handle.to_string(),
                ips: addrs,
            });
        }
    }
}

/// CIDR strings as stored may differ in spelling (IPv6 zeros); compare them parsed.
fn normal_cidr(s: &str) -> String {
    s.parse::<IpNet>()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| s.to_string())
}

/// What `check` prints: counts, each problem on its own line, then the verdict.
pub fn render(report: &Report) -> String {
    let mut s = format!(
        "Found {} IPAM blocks.\nIPAM blocks record {} allocations.\nFound {} IPAM handles and {} block affinities.\n",
        report.blocks, report.allocations, report.handles, report.affinities
    );
    if let Some(pods) = report.pods {
        s.push_str(&format!("Checked allocations against {pods} pods.\n"));
    }
    for p in &report.problems {
        s.push_str(&format!("problem: {p}\n"));
    }
    s.push_str(&format!(
        "Check complete; found {} problems.\n",
        report.problems.len()
    ));
    s
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;
    use crate::api::blockaffinity::{BlockAffinity, BlockAffinitySpec};
    use crate::api::ipamblock::IPAMBlock;
    use crate::api::ipamhandle::{IPAMHandle, IPAMHandleSpec};
    use crate::ipam::block::{Block, DEFAULT_COOLDOWN, Owner, host_affinity};
    use crate::ipam::cidr::block_name;
    use crate::ipam::cli::snapshot::test_pool;
    use crate::ipam::convert::block_to_spec;
    use crate::ipam::reservations::Reservations;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn owner(handle: &str, pod: &str, uid: &str) -> Owner {
        Owner {
            handle_id: handle.into(),
            attrs: BTreeMap::from([
                ("node".into(), "n1".into()),
                ("namespace".into(), "default".into()),
                ("pod".into(), pod.into()),
                (ATTR_POD_UID.into(), uid.into()),
            ]),
        }
    }

    fn block(cidr: &str, owners: &[Owner]) -> IPAMBlock {
        let mut b = Block::new(cidr.parse().unwrap(), Some(host_affinity("n1")), None, 1).unwrap();
        for o in owners {
            b.auto_assign(1, o, &Reservations::EMPTY, t(0), DEFAULT_COOLDOWN);
        }
        IPAMBlock::new(&block_name(&b.cidr), block_to_spec(&b))
    }

    fn handle(id: &str, cidr: &str, n: i64) -> IPAMHandle {
        IPAMHandle::new(
            id,
            IPAMHandleSpec {
                handle_id: id.into(),
                block: BTreeMap::from([(cidr.to_string(), n)]),
                deleted: false,
            },
        )
    }

    fn affinity(cidr: &str, state: AffinityState) -> BlockAffinity {
        let mut a = BlockAffinitySpec {
            state,
            node: "n1".into(),
            cidr: cidr.into(),
            ..Default::default()
        };
        a.set_deleted(false);
        BlockAffinity::new(&format!("n1-{}", cidr.replace(['.', '/'], "-")), a)
    }

    fn consistent() -> (
        Vec<crate::api::IPPool>,
        Vec<IPAMBlock>,
        Vec<IPAMHandle>,
        Vec<BlockAffinity>,
    ) {
        (
            vec![test_pool("p", "10.1.0.0/24", 26)],
            vec![block(
                "10.1.0.0/26",
                &[owner("h1", "a", "u1"), owner("h2", "b", "u2")],
            )],
            vec![
                handle("h1", "10.1.0.0/26", 1),
                handle("h2", "10.1.0.0/26", 1),
            ],
            vec![affinity("10.1.0.0/26", AffinityState::Confirmed)],
        )
    }

    fn pods(names: &[(&str, &str)]) -> Option<BTreeMap<(String, String), String>> {
        Some(
            names
                .iter()
                .map(|(n, uid)| (("default".to_string(), n.to_string()), uid.to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_consistent_state_has_no_problem() {
        let (p, b, h, a) = consistent();
        let mut s = Snapshot::from_objects(&p, &b, &h, &a);
        s.pods = pods(&[("a", "u1"), ("b", "u2")]);
        let r = check(&s, t(0));
        assert_eq!(r.problems, vec![]);
        assert_eq!((r.blocks, r.allocations, r.handles), (1, 2, 2));
        assert!(render(&r).contains("found 0 problems"));
    }

    #[test]
    fn each_inconsistency_is_named() {
        let (p, mut b, mut h, mut a) = consistent();
        h.remove(1); // h2's object is gone
        h.push(handle("h9", "10.1.0.0/26", 1)); // holds nothing
        h[0].spec.block.insert("10.1.0.0/26".into(), 3); // h1 says 3, block holds 1
        a.push(affinity("10.1.0.64/26", AffinityState::Confirmed)); // no block
        a.push(affinity("10.1.0.128/26", AffinityState::Pending)); // recent pending: fine
        a[2].metadata.creation_timestamp = crate::ipam::convert::chrono_to_time(t(0));
        b.push(block("10.9.0.0/26", &[])); // outside the pool, no affinity
        b.push(block("10.1.0.0/27", &[owner("h3", "c", "u3")])); // overlaps, dup 10.1.0.0
        let mut s = Snapshot::from_objects(&p, &b, &h, &a);
        s.pods = pods(&[("a", "u1"), ("c", "other-uid")]);
        let r = check(&s, t(60));
        let kinds: Vec<String> = r
            .problems
            .iter()
            .map(|p| {
                serde_json::to_value(p).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        for want in [
            "blockOutsidePools",
            "overlappingBlocks",
            "duplicateAllocation",
            "blockWithoutAffinity",
            "affinityWithoutBlock",
            "allocationWithoutPod",
            "allocationWithoutHandle",
            "handleCountMismatch",
            "handleWithoutAllocations",
        ] {
            assert!(
                kinds.iter().any(|k| k == want),
                "{want} missing from {kinds:?}"
            );
        }
        let text = render(&r);
        assert!(
            text.contains("pod default/b, which does not exist"),
            "{text}"
        );
        assert!(text.contains("not the recorded u3"), "{text}");
        assert!(
            !text.contains("10.1.0.128/26"),
            "a young pending affinity is a claim in progress: {text}"
        );
        let later = check(&s, t(3600));
        assert!(render(&later).contains("10.1.0.128/26"));
    }
}
