//! IPAMHandle objects that no block allocation references ("handle without allocations"),
//! left by a daemon that died between writing a handle object and its block, or between a
//! release and the handle's delete. The leader deletes them after the grace period.
//!
//! The decision is sans-IO (`judge`, `OrphanTracker`, `block_holds`, `confirmed`); `HandleGc`
//! does one LIST per pass, a live GET of each block a candidate names and a delete that
//! carries the version it judged, so a handle that changed in between is kept.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::{Client, ResourceExt};

use crate::api::ipamblock::{IPAMBlock, IPAMBlockSpec};
use crate::api::ipamhandle::IPAMHandle;
use crate::ipam::Ipam;
use crate::ipam::IpamError;
use crate::ipam::cidr::block_name;
use crate::ipam::convert::time_to_chrono;
use crate::ipam::store::{is_conflict, is_not_found};

/// One handle object as a LIST returned it, reduced to what the decision reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandleObject {
    pub version: Version,
    pub handle_id: String,
    pub created: Option<DateTime<Utc>>,
    /// The keys of `spec.block`: the block CIDRs the object says it holds addresses in.
    pub blocks: Vec<String>,
}

/// Exactly one state of one object: a delete carrying it fails once the object changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version {
    pub name: String,
    pub uid: String,
    pub resource_version: String,
}

impl HandleObject {
    /// None for an object without uid or resourceVersion (never the case for one read from
    /// the API server): it could not be deleted with preconditions.
    pub fn of(h: &IPAMHandle) -> Option<HandleObject> {
        Some(HandleObject {
            version: Version {
                name: h.name_any(),
                uid: h.uid()?,
                resource_version: h.resource_version()?,
            },
            handle_id: h.spec.handle_id.clone(),
            created: h.creation_timestamp().as_ref().and_then(time_to_chrono),
            blocks: h.spec.block.keys().cloned().collect(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    /// A block in the view holds an address under this handle.
    InUse,
    /// Names a block key that is not a CIDR: nothing could confirm it, so it is left alone.
    Unreadable { key: String },
    /// No block in the view holds it. `old_enough` when it was created a grace period ago;
    /// `confirm` are the blocks it names, each to be read live before a delete, because the
    /// view may lag behind a block write that just landed.
    Orphan {
        old_enough: bool,
        confirm: BTreeSet<IpNet>,
    },
}

/// Judges one handle object against the view. `held_in_view` says whether a block in the
/// allocator's view holds an address under `h.handle_id`; the view watches every IPAMBlock
/// of the cluster, and the blocks the object names are read live anyway (`confirm`).
pub fn judge(
    h: &HandleObject,
    held_in_view: bool,
    now: DateTime<Utc>,
    grace: Duration,
) -> Judgement {
    if held_in_view {
        return Judgement::InUse;
    }
    let mut confirm = BTreeSet::new();
    for key in &h.blocks {
        match key.parse::<IpNet>() {
            Ok(c) => {
                confirm.insert(c.trunc());
            }
            Err(_) => return Judgement::Unreadable { key: key.clone() },
        }
    }
    // An object without a creation time is treated as just created: it never qualifies.
    let old_enough = h
        .created
        .is_some_and(|c| chrono::TimeDelta::from_std(grace).is_ok_and(|g| c + g <= now));
    Judgement::Orphan {
        old_enough,
        confirm,
    }
}

/// Whether the block records an allocation under `handle_id`. A block whose allocation
/// points at a missing attribute cannot say, and counts as holding (the handle is kept).
pub fn block_holds(spec: &IPAMBlockSpec, handle_id: &str) -> bool {
    spec.allocations.iter().flatten().any(|i| {
        let attr = usize::try_from(*i)
            .ok()
            .and_then(|i| spec.attributes.get(i));
        match attr {
            Some(a) => a.handle_id.as_deref() == Some(handle_id),
            None => true,
        }
    })
}

/// A block as a live GET found it, for one handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveBlock {
    Gone,
    Holds(bool),
    /// The GET failed: nothing is known.
    Unknown,
}

/// A candidate is deleted only when every block it names was read and none holds it.
pub fn confirmed<'a>(live: impl IntoIterator<Item = &'a LiveBlock>) -> bool {
    live.into_iter()
        .all(|b| matches!(b, LiveBlock::Gone | LiveBlock::Holds(false)))
}

/// Since when each object version has been an orphan in this leader's eyes.
///
/// A delete needs both clocks: the object's creationTimestamp (the API server's clock) is a
/// grace period old, and the leader has seen this very version (uid + resourceVersion)
/// orphaned for a grace period by its own monotonic clock. The creation time alone would
/// miss an old orphan that an ADD reusing its handle ID (a node's tunnel handle after a long
/// outage) has just updated while that ADD's block PUT is in flight: the update's new
/// resourceVersion restarts the tracker. The tracker alone trusts only this process's clock
/// and restarts on a leader change; the creation time costs no extra wait, as the tracker
/// starts on the first pass that sees the object.
#[derive(Debug, Default)]
pub struct OrphanTracker {
    since: HashMap<Version, Instant>,
}

impl OrphanTracker {
    /// Records the versions that are orphans in this pass (any other is forgotten) and
    /// returns those that have been for at least `grace`.
    pub fn observe<'a>(
        &mut self,
        orphans: impl IntoIterator<Item = &'a Version>,
        now: Instant,
        grace: Duration,
    ) -> BTreeSet<Version> {
        let mut seen = HashMap::new();
        for v in orphans {
            let at = self.since.get(v).copied().unwrap_or(now);
            seen.insert(v.clone(), at);
        }
        self.since = seen;
        self.since
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= grace)
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// Forgets every candidate (leadership lost: the next leader starts its own clock).
    pub fn reset(&mut self) {
        self.since.clear();
    }
}

/// The leader's handle-object collector: its own clients and its tracker.
pub struct HandleGc {
    handles: Api<IPAMHandle>,
    blocks: Api<IPAMBlock>,
    tracker: OrphanTracker,
}

fn api_err(object: &str, action: &'static str, source: kube::Error) -> IpamError {
    IpamError::Api {
        object: object.to_string(),
        action,
        source: Box::new(source),
    }
}

impl HandleGc {
    pub fn new(client: Client) -> HandleGc {
        HandleGc {
            handles: Api::all(client.clone()),
            blocks: Api::all(client),
            tracker: OrphanTracker::default(),
        }
    }

    pub fn reset(&mut self) {
        self.tracker.reset();
    }

    /// One pass: returns how many handle objects were deleted. A failure on one handle is
    /// logged and the others still go; only a failed LIST fails the pass.
    pub async fn pass(&mut self, ipam: &Ipam, grace: Duration) -> Result<usize, IpamError> {
        // From the API server's watch cache: a stale entry only costs a failed precondition.
        let list = self
            .handles
            .list(&ListParams::default().match_any())
            .await
            .map_err(|e| api_err("IPAMHandle", "list", e))?;
        // Taken once the objects are seen, so a slow LIST never ages them: an orphan handle
        // and a leak first seen in the same pass come due in the same pass.
        let (now, wall) = (Instant::now(), Utc::now());
        let objects: Vec<HandleObject> = list.items.iter().filter_map(HandleObject::of).collect();
        let judged: Vec<(HandleObject, Judgement)> = ipam.with_view(|v| {
            objects
                .into_iter()
                .map(|h| {
                    let j = judge(&h, v.handles.contains_key(&h.handle_id), wall, grace);
                    (h, j)
                })
                .collect()
        });
        let orphans = judged
            .iter()
            .filter(|(_, j)| matches!(j, Judgement::Orphan { .. }))
            .map(|(h, _)| &h.version);
        let aged = self.tracker.observe(orphans, now, grace);

        let mut live: BTreeMap<IpNet, Option<IPAMBlockSpec>> = BTreeMap::new();
        let mut unreadable: BTreeSet<IpNet> = BTreeSet::new();
        let mut deleted = 0;
        for (h, j) in &judged {
            let confirm = match j {
                Judgement::Orphan {
                    old_enough: true,
                    confirm,
                } if aged.contains(&h.version) => confirm,
                Judgement::Unreadable { key } => {
                    tracing::debug!(
                        handle = h.handle_id,
                        block = key,
                        "handle object names an unreadable block; kept"
                    );
                    continue;
                }
                _ => continue,
            };
            let mut states = Vec::with_capacity(confirm.len());
            for cidr in confirm {
                if !live.contains_key(cidr) && !unreadable.contains(cidr) {
                    let name = block_name(cidr);
                    match self.blocks.get_opt(&name).await {
                        Ok(b) => {
                            live.insert(*cidr, b.map(|b| b.spec));
                        }
                        Err(e) => {
                            tracing::warn!(block = name, error = %e, "could not read block; keeping the handles that name it");
                            unreadable.insert(*cidr);
                        }
                    }
                }
                states.push(match live.get(cidr) {
                    Some(Some(spec)) => LiveBlock::Holds(block_holds(spec, &h.handle_id)),
                    Some(None) => LiveBlock::Gone,
                    None => LiveBlock::Unknown,
                });
            }
            if !confirmed(&states) {
                tracing::info!(
                    handle = h.handle_id,
                    "a block named by the handle object holds it or could not be read; keeping it"
                );
                continue;
            }
            if self.delete(h).await {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes exactly the version judged; true when this call deleted it.
    async fn delete(&self, h: &HandleObject) -> bool {
        let dp = DeleteParams::default().preconditions(Preconditions {
            resource_version: Some(h.version.resource_version.clone()),
            uid: Some(h.version.uid.clone()),
        });
        match self.handles.delete(&h.version.name, &dp).await {
            Ok(_) => {
                tracing::info!(handle = h.handle_id, object = h.version.name, blocks = ?h.blocks,
                    "deleted IPAMHandle that no block allocation references");
                true
            }
            Err(e) if is_not_found(&e) => false,
            Err(e) if is_conflict(&e) => {
                tracing::info!(
                    handle = h.handle_id,
                    "IPAMHandle changed since it was read; keeping it"
                );
                false
            }
            Err(e) => {
                tracing::warn!(handle = h.handle_id, error = %api_err(&h.version.name, "delete", e),
                    "could not delete IPAMHandle without allocations; retrying next pass");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ipamblock::AllocationAttribute;

    const GRACE: Duration = Duration::from_secs(900);

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn obj(rv: &str, created: Option<DateTime<Utc>>, blocks: &[&str]) -> HandleObject {
        HandleObject {
            version: Version {
                name: "k8s-pod-network.c1".into(),
                uid: "u1".into(),
                resource_version: rv.into(),
            },
            handle_id: "k8s-pod-network.c1".into(),
            created,
            blocks: blocks.iter().map(|b| b.to_string()).collect(),
        }
    }

    fn orphan(old_enough: bool, confirm: &[&str]) -> Judgement {
        Judgement::Orphan {
            old_enough,
            confirm: confirm.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn a_handle_held_by_a_block_in_the_view_is_in_use_at_any_age() {
        let h = obj("1", Some(at(0)), &["10.0.0.0/26"]);
        assert_eq!(judge(&h, true, at(100_000), GRACE), Judgement::InUse);
    }

    #[test]
    fn an_orphan_qualifies_only_a_grace_period_after_its_creation() {
        let h = obj("1", Some(at(0)), &["10.0.0.0/26"]);
        assert_eq!(
            judge(&h, false, at(899), GRACE),
            orphan(false, &["10.0.0.0/26"])
        );
        assert_eq!(
            judge(&h, false, at(900), GRACE),
            orphan(true, &["10.0.0.0/26"])
        );
        let no_time = obj("1", None, &[]);
        assert_eq!(
            judge(&no_time, false, at(100_000), GRACE),
            orphan(false, &[])
        );
    }

    #[test]
    fn every_named_block_is_confirmed_live_including_ones_missing_from_the_view() {
        // The view has no allocation of the handle; the block it names (absent from the
        // view, or not yet showing a PUT that just landed) must be read before a delete.
        let h = obj(
            "1",
            Some(at(0)),
            &["10.0.0.64/26", "fd00::/122", "10.0.0.1/26"],
        );
        assert_eq!(
            judge(&h, false, at(1000), GRACE),
            orphan(true, &["10.0.0.0/26", "10.0.0.64/26", "fd00::/122"])
        );
    }

    #[test]
    fn a_handle_naming_an_unreadable_block_is_left_alone() {
        let h = obj("1", Some(at(0)), &["10.0.0.0/26", "not-a-cidr"]);
        assert_eq!(
            judge(&h, false, at(100_000), GRACE),
            Judgement::Unreadable {
                key: "not-a-cidr".into()
            }
        );
    }

    fn block(allocs: &[Option<i64>], handles: &[Option<&str>]) -> IPAMBlockSpec {
        IPAMBlockSpec {
            cidr: "10.0.0.0/30".into(),
            allocations: allocs.to_vec(),
            attributes: handles
                .iter()
                .map(|h| AllocationAttribute {
                    handle_id: h.map(str::to_string),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_block_holds_a_handle_only_through_an_allocation() {
        let h = "k8s-pod-network.c1";
        assert!(block_holds(
            &block(&[None, Some(1)], &[Some("x"), Some(h)]),
            h
        ));
        // An attribute nobody allocates under, and a cooling address without a handle.
        assert!(!block_holds(
            &block(&[Some(0), None], &[Some("x"), Some(h)]),
            h
        ));
        assert!(!block_holds(&block(&[Some(0)], &[None]), h));
        // A dangling index cannot say whose address it is.
        assert!(block_holds(&block(&[Some(5)], &[Some("x")]), h));
    }

    #[test]
    fn a_delete_needs_every_named_block_read_and_none_holding() {
        use LiveBlock::*;
        assert!(confirmed(&[]));
        assert!(confirmed(&[Gone, Holds(false)]));
        assert!(!confirmed(&[Gone, Holds(true)]));
        assert!(!confirmed(&[Holds(false), Unknown]));
    }

    #[test]
    fn the_tracker_waits_a_grace_period_per_version_and_forgets_what_recovers() {
        let mut t = OrphanTracker::default();
        let t0 = Instant::now();
        let g = Duration::from_secs(10);
        let v1 = obj("1", None, &[]).version;
        let v2 = obj("2", None, &[]).version;
        assert!(t.observe([&v1], t0, g).is_empty());
        assert!(t.observe([&v1], t0 + Duration::from_secs(9), g).is_empty());
        assert_eq!(t.observe([&v1], t0 + g, g), BTreeSet::from([v1.clone()]));
        // Updated (new resourceVersion): its clock starts over.
        assert!(t.observe([&v2], t0 + g, g).is_empty());
        // Held by a block for one pass: forgotten, so it waits again afterwards.
        assert!(t.observe([], t0 + 2 * g, g).is_empty());
        assert!(t.observe([&v2], t0 + 2 * g, g).is_empty());
        assert_eq!(
            t.observe([&v2], t0 + 3 * g, g),
            BTreeSet::from([v2.clone()])
        );
        t.reset();
        assert!(t.observe([&v2], t0 + 4 * g, g).is_empty());
    }
}
