//! `tortie ipam check`: every way blocks, handles, affinities, pools and pods can disagree,
//! found from one Snapshot (pure, `now` passed in) and summarised for people and as JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;
use serde::Serialize;

use super::snapshot::{ATTR_NAMESPACE, ATTR_NODE, ATTR_POD, ATTR_POD_UID, Snapshot};
use crate::api::AffinityState;
use crate::ipam::block::Slot;
use crate::ipam::cidr::{addr_at, ordinal_of};

/// Handle of the addresses Calico reserves in blocks for Windows nodes: in use by design.
const WINDOWS_RESERVED_HANDLE: &str = "windows-reserved-ipam-handle";
/// Handle prefixes of node tunnel addresses, as Calico names them.
const TUNNEL_HANDLE_PREFIXES: &[&str] = &[
    "vxlan-tunnel-addr-",
    "vxlan-v6-tunnel-addr-",
    "ipip-tunnel-addr-",
    "wireguard-tunnel-addr-",
    "wireguard-v6-tunnel-addr-",
];

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
    /// Allocated, but no pod and no node uses the address (and no pod attributes say whose
    /// it is), as calicoctl's "allocated in IPAM but not actually in use".
    AllocationNotInUse {
        ip: IpAddr,
        handle: String,
        reason: String,
    },
    /// Allocated to no handle (a `{}` attribute): nothing can release it by handle.
    AllocationWithoutOwner {
        ip: IpAddr,
        block: IpNet,
        in_use_by: Vec<String>,
    },
    /// A pod or node uses the address, but IPAM does not hold it for anyone.
    InUseNotAllocated {
        ip: IpAddr,
        users: Vec<String>,
        reason: String,
    },
    /// A pod or node uses an address outside every enabled pool.
    InUseOutsidePools {
        ip: IpAddr,
        users: Vec<String>,
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
            Problem::AllocationNotInUse { ip, handle, reason } => write!(
                f,
                "IP {ip} (handle {handle}) is allocated but not in use: {reason}"
            ),
            Problem::AllocationWithoutOwner {
                ip,
                block,
                in_use_by,
            } => {
                write!(
                    f,
                    "IP {ip} in block {block} is allocated to no handle (nothing can release it by handle; the leader's GC releases it after the grace period"
                )?;
                if in_use_by.is_empty() {
                    write!(f, ")")
                } else {
                    write!(f, " once {} no longer uses it)", in_use_by.join(", "))
                }
            }
            Problem::InUseNotAllocated { ip, users, reason } => {
                write!(f, "IP {ip} is used by {} but {reason}", users.join(", "))
            }
            Problem::InUseOutsidePools { ip, users } => write!(
                f,
                "IP {ip} is used by {} and is not in any enabled IPPool",
                users.join(", ")
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
    /// Released addresses still held for their cooldown: not problems (Calico master agrees;
    /// calicoctl before v3.34 does not know the cooldown and counts them as leaked).
    pub cooling: usize,
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
    check_blocks(snap, now, &mut problems);
    check_affinities(snap, now, &mut problems);
    let (allocations, cooling) = check_allocations(snap, &mut problems);
    check_in_use(snap, &mut problems);
    check_handles(snap, &mut problems);
    Report {
        blocks: snap.blocks.len(),
        allocations,
        handles: snap.handles.len(),
        affinities: snap.affinities.len(),
        pods: snap.pods.as_ref().map(BTreeMap::len),
        cooling,
        problems,
    }
}

fn check_blocks(snap: &Snapshot, now: DateTime<Utc>, problems: &mut Vec<Problem>) {
    for (i, b) in snap.blocks.iter().enumerate() {
        match &b.parsed {
            Err(reason) => problems.push(Problem::InvalidBlock {
                block: b.cidr.to_string(),
                reason: reason.clone(),
            }),
            Ok(blk) => {
                problems.extend(
                    blk.lint(now)
                        .into_iter()
                        .map(|reason| Problem::InvalidBlock {
                            block: b.cidr.to_string(),
                            reason,
                        }),
                )
            }
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

/// Every address a pod (workload endpoint) or node (tunnel address) uses, with its users,
/// as calicoctl collects them; None when pods were not read.
fn users(snap: &Snapshot) -> Option<BTreeMap<IpAddr, Vec<String>>> {
    let workloads = snap.workloads.as_ref()?;
    let mut out: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for w in workloads {
        for ip in &w.ips {
            out.entry(*ip)
                .or_default()
                .push(format!("pod {}/{}", w.namespace, w.name));
        }
    }
    for (ip, node) in &snap.node_tunnels {
        out.entry(*ip).or_default().push(format!("node {node}"));
    }
    Some(out)
}

/// Why an allocation recorded for a pod is not used by it.
fn pod_reason(snap: &Snapshot, ns: &str, pod: &str, uid: Option<&String>, ip: IpAddr) -> String {
    let w = snap
        .workloads
        .iter()
        .flatten()
        .find(|w| w.namespace == ns && w.name == pod);
    let exists = snap
        .pods
        .as_ref()
        .is_some_and(|p| p.contains_key(&(ns.to_string(), pod.to_string())));
    match w {
        _ if !exists => "does not exist".to_string(),
        Some(w) if uid.is_some_and(|u| *u != w.uid) => format!(
            "exists with UID {}, not the recorded {} (a new pod of that name)",
            w.uid,
            uid.map_or("", String::as_str)
        ),
        Some(w) if w.finished => "has finished".to_string(),
        Some(w) if w.ips.is_empty() => "reports no address (yet)".to_string(),
        Some(w) => format!(
            "uses {} instead of {ip}",
            w.ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "is not a workload endpoint (host network or not scheduled)".to_string(),
    }
}

/// Every held and ownerless address: duplicates, and (with pods read) those no pod or node
/// uses. Returns (allocations, cooling addresses).
fn check_allocations(snap: &Snapshot, problems: &mut Vec<Problem>) -> (usize, usize) {
    let users = users(snap);
    let mut by_ip: BTreeMap<IpAddr, Vec<(IpNet, String)>> = BTreeMap::new();
    let (mut count, mut cooling) = (0, 0);
    for b in &snap.blocks {
        let Ok(blk) = &b.parsed else { continue };
        for ord in 0..blk.allocations.len() {
            let Some(ip) = addr_at(&blk.cidr, ord) else {
                continue;
            };
            let attr = match blk.slot(ord) {
                Slot::Free => continue,
                Slot::Cooling(_) => {
                    cooling += 1;
                    continue;
                }
                Slot::Ownerless => {
                    count += 1;
                    by_ip.entry(ip).or_default().push((b.cidr, String::new()));
                    problems.push(Problem::AllocationWithoutOwner {
                        ip,
                        block: b.cidr,
                        in_use_by: users
                            .as_ref()
                            .and_then(|u| u.get(&ip).cloned())
                            .unwrap_or_default(),
                    });
                    continue;
                }
                Slot::Held(attr) => attr,
            };
            count += 1;
            let handle = attr.handle_id.clone().unwrap_or_default();
            by_ip.entry(ip).or_default().push((b.cidr, handle.clone()));
            let Some(users) = &users else { continue };
            if users.contains_key(&ip) || handle.eq_ignore_ascii_case(WINDOWS_RESERVED_HANDLE) {
                continue;
            }
            let a = &attr.secondary;
            match (a.get(ATTR_NAMESPACE), a.get(ATTR_POD)) {
                (Some(ns), Some(pod)) => problems.push(Problem::AllocationWithoutPod {
                    ip,
                    handle,
                    namespace: ns.clone(),
                    pod: pod.clone(),
                    node: a.get(ATTR_NODE).cloned(),
                    reason: pod_reason(snap, ns, pod, a.get(ATTR_POD_UID), ip),
                }),
                _ => {
                    let reason = if TUNNEL_HANDLE_PREFIXES.iter().any(|p| handle.starts_with(p)) {
                        "no node publishes it as its tunnel address".to_string()
                    } else {
                        "no pod or node uses it".to_string()
                    };
                    problems.push(Problem::AllocationNotInUse { ip, handle, reason });
                }
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
    (count, cooling)
}

/// Addresses pods and nodes use that IPAM does not hold for anyone (calicoctl: "in use but
/// not allocated", split by whether an enabled pool contains them).
fn check_in_use(snap: &Snapshot, problems: &mut Vec<Problem>) {
    let Some(users) = users(snap) else { return };
    for (ip, who) in users {
        let mut slots = snap.blocks.iter().filter_map(|b| {
            let blk = b.parsed.as_ref().ok()?;
            Some(blk.slot(ordinal_of(&blk.cidr, ip)?))
        });
        let slot = slots.find(|s| *s != Slot::Free);
        match slot {
            Some(Slot::Held(_) | Slot::Ownerless) => {}
            Some(Slot::Cooling(_)) => problems.push(Problem::InUseNotAllocated {
                ip,
                users: who,
                reason: "it was released and is cooling down (it will be handed out again)"
                    .to_string(),
            }),
            _ => {
                let pooled = snap
                    .pools
                    .iter()
                    .any(|p| !p.disabled && p.cidr.contains(&ip));
                problems.push(if pooled {
                    Problem::InUseNotAllocated {
                        ip,
                        users: who,
                        reason: "IPAM has no allocation for it".to_string(),
                    }
                } else {
                    Problem::InUseOutsidePools { ip, users: who }
                });
            }
        }
    }
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
    if report.cooling > 0 {
        s.push_str(&format!(
            "{} released addresses are cooling down (ipCooldownSeconds); not leaks, though calicoctl before v3.34 counts them as leaked.\n",
            report.cooling
        ));
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

    use k8s_openapi::api::core::v1::{Pod, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

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

    /// Pods of namespace `default` on n1: (name, uid, address reported).
    fn pods(list: &[(&str, &str, &str)]) -> Vec<Pod> {
        list.iter()
            .map(|(name, uid, ip)| Pod {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some("default".into()),
                    uid: Some(uid.to_string()),
                    annotations: Some(BTreeMap::from([(
                        "cni.projectcalico.org/podIP".to_string(),
                        format!("{ip}/32"),
                    )])),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    node_name: Some("n1".into()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn a_consistent_state_has_no_problem() {
        let (p, b, h, a) = consistent();
        let mut s = Snapshot::from_objects(&p, &b, &h, &a);
        s.set_pods(&pods(&[("a", "u1", "10.1.0.0"), ("b", "u2", "10.1.0.1")]));
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
        s.set_pods(&pods(&[
            ("a", "u1", "10.1.0.0"),
            ("c", "other-uid", "10.1.0.9"),
            ("x", "u9", "10.1.0.77"),
            ("y", "u8", "192.0.2.1"),
        ]));
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
            "inUseNotAllocated",
            "inUseOutsidePools",
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
        assert!(
            !text.contains("10.1.0.128/26"),
            "a young pending affinity is a claim in progress: {text}"
        );
        let later = check(&s, t(3600));
        assert!(render(&later).contains("10.1.0.128/26"));
        assert!(
            text.contains("IP 10.1.0.77 is used by pod default/x but IPAM has no allocation"),
            "{text}"
        );
        assert!(
            text.contains("IP 192.0.2.1 is used by pod default/y and is not in any enabled IPPool"),
            "{text}"
        );
    }

    #[test]
    fn ownerless_cooling_and_unused_allocations_are_told_apart() {
        let (p, _, mut h, a) = consistent();
        let cool = TimeDelta::seconds(30);
        let mut blk = Block::new(
            "10.1.0.0/26".parse().unwrap(),
            Some(host_affinity("n1")),
            None,
            1,
        )
        .unwrap();
        for o in [
            owner("h1", "a", "u1"),
            owner("h2", "b", "u2"),
            owner("h3", "c", "u3"),
            owner("h4", "d", "u4"),
        ] {
            blk.auto_assign(1, &o, &Reservations::EMPTY, t(0), cool);
        }
        let tunnel = Owner {
            handle_id: "vxlan-tunnel-addr-n9".into(),
            attrs: BTreeMap::from([("node".into(), "n9".into())]),
        };
        blk.auto_assign(1, &tunnel, &Reservations::EMPTY, t(0), cool); // 10.1.0.4
        blk.release_by_handle("h2", t(10), cool); // 10.1.0.1 cooling: not a problem
        let idx = blk.allocations[2].unwrap();
        blk.attributes[idx] = crate::ipam::block::Attribute::default(); // 10.1.0.2 -> {}
        h.retain(|x| x.spec.handle_id == "h1");
        h.push(handle("vxlan-tunnel-addr-n9", "10.1.0.0/26", 1));
        h.push(handle("h4", "10.1.0.0/26", 1));
        let b = vec![IPAMBlock::new(&block_name(&blk.cidr), block_to_spec(&blk))];
        let mut s = Snapshot::from_objects(&p, &b, &h, &a);
        s.set_pods(&pods(&[
            ("a", "u1", "10.1.0.0"),
            ("c", "u3", "10.1.0.2"),
            ("d", "u5", "10.1.0.60"),
        ]));
        let r = check(&s, t(20));
        assert_eq!(r.cooling, 1);
        assert_eq!(
            r.allocations, 4,
            "held and ownerless count, cooling does not"
        );
        let text = render(&r);
        assert!(
            text.contains("1 released addresses are cooling down"),
            "{text}"
        );
        assert!(
            text.contains("IP 10.1.0.2 in block 10.1.0.0/26 is allocated to no handle"),
            "{text}"
        );
        assert!(
            text.contains("once pod default/c no longer uses it"),
            "{text}"
        );
        assert!(
            text.contains("IP 10.1.0.4 (handle vxlan-tunnel-addr-n9) is allocated but not in use: no node publishes it"),
            "{text}"
        );
        assert!(
            text.contains("exists with UID u5, not the recorded u4"),
            "{text}"
        );
        // And pod d's own address is used without an allocation.
        assert!(
            text.contains("IP 10.1.0.60 is used by pod default/d but IPAM has no allocation"),
            "{text}"
        );
        assert_eq!(r.problems.len(), 4, "{text}");
    }
}
