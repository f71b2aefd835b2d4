//! The allocator's view of the cluster: IPAMBlocks, IPPools, IPAMConfig, IPReservations and
//! this node's labels, fed by watches and by the allocator's own successful writes, so the
//! free-block search reads memory and never lists blocks per request.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use chrono::TimeDelta;
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::IPPool;
use crate::api::ipamblock::IPAMBlock;
use crate::api::ipamconfig::{IPAM_CONFIG_NAME, IPAMConfig};
use crate::api::ipreservation::IPReservation;
use crate::ipam::block::{Block, DEFAULT_COOLDOWN};
use crate::ipam::convert::block_from_spec;
use crate::ipam::pools::PoolSet;
use crate::ipam::reservations::Reservations;
use crate::ipam::search::{BlockInfo, Limits};

use super::events::{self, OverlapEvent};

/// A block as last seen, with the resourceVersion a compare-and-swap write must carry.
#[derive(Debug, Clone)]
pub struct CachedBlock {
    pub block: Block,
    pub resource_version: String,
}

#[derive(Debug, Default)]
pub struct View {
    pub blocks: BTreeMap<IpNet, CachedBlock>,
    pub infos: BTreeMap<IpNet, BlockInfo>,
    pub pools: PoolSet,
    pub limits: Limits,
    pub reservations: Reservations,
    pub node_labels: BTreeMap<String, String>,
    /// This node's Node object was seen and is gone: nothing is assigned on a deleted node
    /// (its daemon may live on until its pod is collected, and must not re-claim the blocks
    /// the leader is freeing).
    pub node_deleted: bool,
    node_seen: bool,
    /// handle id → blocks holding at least one of its addresses (almost always one: a
    /// short vector, not a set, as there is one entry per pod).
    pub handles: BTreeMap<String, Vec<IpNet>>,
    reservation_objs: BTreeMap<String, Vec<IpNet>>,
    pool_objs: BTreeMap<String, IPPool>,
    /// Where overlaps become Kubernetes Events, and the (kept, excluded) pairs already sent.
    overlap_events: Option<mpsc::UnboundedSender<OverlapEvent>>,
    reported_overlaps: BTreeSet<(String, String)>,
}

/// resourceVersions are opaque, but the API server hands out etcd revisions; comparing
/// them only keeps a late watch event from rolling the view back (a stale view costs a
/// retried compare-and-swap, never correctness).
fn newer_or_equal(new: &str, old: &str) -> bool {
    match (new.parse::<u64>(), old.parse::<u64>()) {
        (Ok(n), Ok(o)) => n >= o,
        _ => true,
    }
}

impl View {
    pub fn new() -> View {
        View::default()
    }

    /// This node's Node object now: its labels, or None when there is none. A node never
    /// seen (a CLI or test without a Node object) is not a deleted one.
    pub fn set_node(&mut self, labels: Option<BTreeMap<String, String>>) {
        match labels {
            Some(l) => {
                self.node_labels = l;
                self.node_seen = true;
                self.node_deleted = false;
            }
            None => {
                self.node_labels.clear();
                self.node_deleted = self.node_seen;
            }
        }
    }

    /// Records a block seen on a watch or returned by a write.
    pub fn put_block(&mut self, cached: CachedBlock) {
        let cidr = cached.block.cidr;
        if let Some(old) = self.blocks.get(&cidr)
            && !newer_or_equal(&cached.resource_version, &old.resource_version)
        {
            return;
        }
        if cached.block.deleted {
            self.remove_block(&cidr);
            return;
        }
        self.unindex(&cidr);
        for h in cached.block.handle_counts().into_keys() {
            let blocks = self.handles.entry(h).or_default();
            if !blocks.contains(&cidr) {
                blocks.push(cidr);
                blocks.shrink_to_fit();
            }
        }
        self.infos
            .insert(cidr, BlockInfo::of(&cached.block, &self.reservations));
        self.blocks.insert(cidr, cached);
    }

    pub fn remove_block(&mut self, cidr: &IpNet) {
        self.unindex(cidr);
        self.blocks.remove(cidr);
        self.infos.remove(cidr);
    }

    fn unindex(&mut self, cidr: &IpNet) {
        if let Some(old) = self.blocks.get(cidr) {
            for h in old.block.handle_counts().into_keys() {
                if let Some(set) = self.handles.get_mut(&h) {
                    set.retain(|c| c != cidr);
                    if set.is_empty() {
                        self.handles.remove(&h);
                    }
                }
            }
        }
    }

    fn refresh_infos(&mut self) {
        for (cidr, b) in &self.blocks {
            self.infos
                .insert(*cidr, BlockInfo::of(&b.block, &self.reservations));
        }
    }

    fn rebuild_pools(&mut self) {
        self.pools = PoolSet::from_ippools(self.pool_objs.values());
        let mut current = BTreeSet::new();
        for o in self.pools.overlaps() {
            let key = (o.kept.clone(), o.excluded.clone());
            current.insert(key.clone());
            if self.reported_overlaps.contains(&key) {
                continue;
            }
            tracing::warn!(kept = %o.kept, excluded = %o.excluded,
                "IP pools overlap; the newer pool is not used for allocation");
            if let (Some(tx), Some(kept), Some(excluded)) = (
                &self.overlap_events,
                self.pool_objs.get(&o.kept),
                self.pool_objs.get(&o.excluded),
            ) {
                let _ = tx.send(OverlapEvent {
                    excluded: excluded.object_ref(&()),
                    kept: kept.object_ref(&()),
                });
            }
        }
        self.reported_overlaps = current;
        for (pool, reason) in self.pools.invalid() {
            tracing::warn!(%pool, %reason, "IP pool is not usable");
        }
    }

    fn set_config(&mut self, cfg: Option<&IPAMConfig>) {
        let spec = cfg.map(|c| c.spec.clone()).unwrap_or_default();
        self.limits = Limits {
            // Unset or 0 means no cap: we deliberately do not copy Calico's hidden 20.
            max_blocks_per_host: spec.max_blocks_per_host.unwrap_or(0).max(0).unsigned_abs(),
            strict_affinity: spec.strict_affinity,
            auto_allocate_blocks: spec.auto_allocate_blocks,
            cooldown: spec.ip_cooldown_seconds.map_or(DEFAULT_COOLDOWN, |s| {
                TimeDelta::seconds(i64::from(s.max(0)))
            }),
            ..Limits::default()
        };
    }

    fn set_reservations(&mut self) {
        self.reservations = Reservations::new(self.reservation_objs.values().flatten().copied());
        self.refresh_infos();
    }
}

/// The shared view plus the watch tasks feeding it; `synced` turns true once every watch
/// has delivered its initial list.
pub struct ViewHandle {
    pub view: Arc<RwLock<View>>,
    pub synced: watch::Receiver<bool>,
    /// Bumped after every change a watch applied (readers wait on it instead of polling).
    pub changes: Arc<watch::Sender<u64>>,
    /// Per kind, since when and why its watch fails (cleared by its next event).
    pub failures: Arc<std::sync::Mutex<BTreeMap<&'static str, (std::time::Instant, String)>>>,
    /// Bumped whenever `failures` gains or loses a kind (the sync metric follows it).
    pub failures_changed: Arc<watch::Sender<u64>>,
    /// Watch tasks not yet handed to a health registry (see `supervise`).
    unsupervised: std::sync::Mutex<Vec<(&'static str, JoinHandle<()>)>>,
    aborts: Vec<tokio::task::AbortHandle>,
}

impl Drop for ViewHandle {
    fn drop(&mut self) {
        for t in &self.aborts {
            t.abort();
        }
    }
}

impl ViewHandle {
    /// Puts each watch task on `health` as `ipam/watch/<kind>`: one that ends or panics
    /// revokes readiness by name (failures while it runs are in `failures`).
    pub fn supervise(&self, health: &crate::health::Registry) {
        let expect = crate::health::Expect {
            stall_after: None,
            ..crate::health::Expect::default()
        };
        let tasks =
            std::mem::take(&mut *self.unsupervised.lock().unwrap_or_else(|p| p.into_inner()));
        for (name, task) in tasks {
            health.supervise(format!("ipam/watch/{name}"), expect, task);
        }
    }
}

pub fn read(view: &RwLock<View>) -> std::sync::RwLockReadGuard<'_, View> {
    view.read().unwrap_or_else(|p| p.into_inner())
}

pub fn write(view: &RwLock<View>) -> std::sync::RwLockWriteGuard<'_, View> {
    view.write().unwrap_or_else(|p| p.into_inner())
}

const KINDS: usize = 5;

/// Kinds the daemon's datastore already watches and caches: the IPAM view follows its
/// stores instead of opening its own watches (one watch and one cache per kind).
#[derive(Clone)]
pub struct Shared {
    pub pools: kube::runtime::reflector::Store<IPPool>,
    pub nodes: kube::runtime::reflector::Store<Node>,
    /// Bumped by the datastore after every change it applied.
    pub changes: watch::Receiver<u64>,
}

impl ViewHandle {
    pub fn start(client: Client, node: &str) -> ViewHandle {
        ViewHandle::start_with(client, node, None)
    }

    /// With `shared`, IPPools and this node's labels come from the datastore's stores.
    pub fn start_with(client: Client, node: &str, shared: Option<Shared>) -> ViewHandle {
        let view = Arc::new(RwLock::new(View::new()));
        let (tx, synced) = watch::channel(false);
        let ready = Arc::new(Ready {
            done: std::sync::Mutex::new(BTreeSet::new()),
            tx,
        });
        let mut tasks = Vec::new();
        let changes = Arc::new(watch::channel(0u64).0);
        let failures = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let failures_changed = Arc::new(watch::channel(0u64).0);
        let signals = Signals {
            changes: changes.clone(),
            failures: failures.clone(),
            failures_changed: failures_changed.clone(),
        };
        let (overlap_tx, overlap_task) = events::spawn(client.clone(), node);
        write(&view).overlap_events = Some(overlap_tx);
        tasks.push(("overlap-events", overlap_task));

        tasks.push((
            "IPAMBlock",
            spawn_watch(
                "IPAMBlock",
                Api::<IPAMBlock>::all(client.clone()),
                watcher::Config::default(),
                (view.clone(), ready.clone(), signals.clone()),
                |v, objs| {
                    v.blocks.clear();
                    v.infos.clear();
                    v.handles.clear();
                    for o in objs {
                        apply_block(v, o);
                    }
                },
                apply_block,
                |v, o| {
                    if let Ok(cidr) = o.spec.cidr_net() {
                        v.remove_block(&cidr);
                    }
                },
            ),
        ));
        let shared_kinds = shared.map(|s| {
            tasks.push((
                "shared-stores",
                spawn_follower(
                    s,
                    node.to_string(),
                    (view.clone(), ready.clone(), signals.clone()),
                ),
            ))
        });
        if shared_kinds.is_none() {
            tasks.push((
                "IPPool",
                spawn_watch(
                    "IPPool",
                    Api::<IPPool>::all(client.clone()),
                    watcher::Config::default(),
                    (view.clone(), ready.clone(), signals.clone()),
                    |v, objs| {
                        v.pool_objs = objs.into_iter().map(|p| (p.name_any(), p)).collect();
                        v.rebuild_pools();
                    },
                    |v, p| {
                        v.pool_objs.insert(p.name_any(), p);
                        v.rebuild_pools();
                    },
                    |v, p| {
                        v.pool_objs.remove(&p.name_any());
                        v.rebuild_pools();
                    },
                ),
            ));
        }
        tasks.push((
            "IPAMConfig",
            spawn_watch(
                "IPAMConfig",
                Api::<IPAMConfig>::all(client.clone()),
                watcher::Config::default().fields(&format!("metadata.name={IPAM_CONFIG_NAME}")),
                (view.clone(), ready.clone(), signals.clone()),
                |v, objs| v.set_config(objs.first()),
                |v, c| v.set_config(Some(&c)),
                |v, _| v.set_config(None),
            ),
        ));
        tasks.push((
            "IPReservation",
            spawn_watch(
                "IPReservation",
                Api::<IPReservation>::all(client.clone()),
                watcher::Config::default(),
                (view.clone(), ready.clone(), signals.clone()),
                |v, objs| {
                    v.reservation_objs = objs
                        .into_iter()
                        .map(|r| (r.name_any(), r.spec.nets()))
                        .collect();
                    v.set_reservations();
                },
                |v, r| {
                    v.reservation_objs.insert(r.name_any(), r.spec.nets());
                    v.set_reservations();
                },
                |v, r| {
                    v.reservation_objs.remove(&r.name_any());
                    v.set_reservations();
                },
            ),
        ));
        if shared_kinds.is_none() {
            tasks.push((
                "Node",
                spawn_watch(
                    "Node",
                    Api::<Node>::all(client),
                    watcher::Config::default().fields(&format!("metadata.name={node}")),
                    (view.clone(), ready, signals),
                    |v, objs| v.set_node(objs.first().map(|n| n.labels().clone())),
                    |v, n| v.set_node(Some(n.labels().clone())),
                    |v, _| v.set_node(None),
                ),
            ));
        }
        ViewHandle {
            view,
            synced,
            changes,
            failures,
            failures_changed,
            aborts: tasks.iter().map(|(_, t)| t.abort_handle()).collect(),
            unsupervised: std::sync::Mutex::new(tasks),
        }
    }
}

fn apply_block(v: &mut View, o: IPAMBlock) {
    let rv = o.resource_version().unwrap_or_default();
    match block_from_spec(&o.spec) {
        Ok(block) => v.put_block(CachedBlock {
            block,
            resource_version: rv,
        }),
        Err(e) => {
            tracing::error!(block = %o.name_any(), error = %e, "ignoring unreadable IPAM block");
            // Keep it out of the view so nothing is allocated from it, but remember that its
            // CIDR is taken so the search never tries to claim it.
            if let Ok(cidr) = o.spec.cidr_net() {
                v.remove_block(&cidr);
                v.infos.insert(
                    cidr,
                    BlockInfo {
                        cidr,
                        host: None,
                        affine: true,
                        claim_time: None,
                        free: 0,
                        in_use: 0,
                        cooling: 0,
                        ownerless: 0,
                        cooling_releases: Vec::new(),
                        sequence_number: 0,
                    },
                );
            }
        }
    }
}

struct Ready {
    done: std::sync::Mutex<BTreeSet<&'static str>>,
    tx: watch::Sender<bool>,
}

impl Ready {
    fn mark(&self, kind: &'static str) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        done.insert(kind);
        if done.len() == KINDS {
            self.tx.send_replace(true);
        }
    }
}

/// What the watches tell the rest of the daemon besides the view itself.
#[derive(Clone)]
struct Signals {
    changes: Arc<watch::Sender<u64>>,
    failures: Arc<std::sync::Mutex<BTreeMap<&'static str, (std::time::Instant, String)>>>,
    failures_changed: Arc<watch::Sender<u64>>,
}

impl Signals {
    fn changed(&self, kind: &'static str) {
        self.changes.send_modify(|g| *g += 1);
        let cleared = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(kind)
            .is_some();
        if cleared {
            self.failures_changed.send_modify(|g| *g += 1);
        }
    }

    fn failed(&self, kind: &'static str, why: String) {
        let new = {
            let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            let new = !f.contains_key(kind);
            f.entry(kind)
                .and_modify(|(_, w)| *w = why.clone())
                .or_insert((std::time::Instant::now(), why));
            new
        };
        if new {
            self.failures_changed.send_modify(|g| *g += 1);
        }
    }
}

/// Follows the datastore's IPPool and Node stores: on each change it rebuilds the pools
/// when their versions changed and takes this node's labels. Counts as the IPPool and Node
/// "watches" for the view's sync (the datastore synced before IPAM starts).
fn spawn_follower(
    shared: Shared,
    node: String,
    (view, ready, signals): (Arc<RwLock<View>>, Arc<Ready>, Signals),
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = shared.changes;
        let mut seen_pools: Vec<(String, Option<String>)> = Vec::new();
        let mut seen_labels = None;
        loop {
            changes.borrow_and_update();
            let pools = shared.pools.state();
            let mut versions: Vec<(String, Option<String>)> = pools
                .iter()
                .map(|p| (p.name_any(), p.resource_version()))
                .collect();
            versions.sort();
            if versions != seen_pools {
                let mut v = write(&view);
                v.pool_objs = pools
                    .iter()
                    .map(|p| (p.name_any(), (**p).clone()))
                    .collect();
                v.rebuild_pools();
                drop(v);
                seen_pools = versions;
                signals.changed("IPPool");
            }
            let labels = shared
                .nodes
                .state()
                .iter()
                .find(|n| n.name_any() == node)
                .map(|n| n.labels().clone());
            if seen_labels.as_ref() != Some(&labels) {
                write(&view).set_node(labels.clone());
                seen_labels = Some(labels);
                signals.changed("Node");
            }
            ready.mark("IPPool");
            ready.mark("Node");
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
}

/// One watch: relists replace the kind's state atomically (Init…InitDone), events patch it.
fn spawn_watch<K>(
    kind: &'static str,
    api: Api<K>,
    cfg: watcher::Config,
    (view, ready, signals): (Arc<RwLock<View>>, Arc<Ready>, Signals),
    on_list: impl Fn(&mut View, Vec<K>) + Send + 'static,
    on_apply: impl Fn(&mut View, K) + Send + 'static,
    on_delete: impl Fn(&mut View, K) + Send + 'static,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
        let mut pending: Vec<K> = Vec::new();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => pending.clear(),
                Ok(Event::InitApply(o)) => pending.push(o),
                Ok(Event::InitDone) => {
                    on_list(&mut write(&view), std::mem::take(&mut pending));
                    ready.mark(kind);
                    signals.changed(kind);
                }
                Ok(Event::Apply(o)) => {
                    on_apply(&mut write(&view), o);
                    signals.changed(kind);
                }
                Ok(Event::Delete(o)) => {
                    on_delete(&mut write(&view), o);
                    signals.changed(kind);
                }
                Err(e) => {
                    tracing::warn!(kind, error = %e, "IPAM watch failed; retrying");
                    signals.failed(kind, e.to_string());
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::block::{Owner, host_affinity};

    fn cached(rv: &str, used: usize) -> CachedBlock {
        let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut block = Block::new(
            "10.0.0.0/29".parse().unwrap(),
            Some(host_affinity("n1")),
            Some(now),
            1,
        )
        .unwrap();
        let owner = Owner {
            handle_id: format!("h{used}"),
            attrs: BTreeMap::new(),
        };
        block.auto_assign(used, &owner, &Reservations::EMPTY, now, DEFAULT_COOLDOWN);
        CachedBlock {
            block,
            resource_version: rv.to_string(),
        }
    }

    #[test]
    fn only_a_node_once_seen_counts_as_deleted() {
        let mut v = View::new();
        v.set_node(None);
        assert!(
            !v.node_deleted,
            "no Node yet (CLI, tests) is not a deleted node"
        );
        v.set_node(Some(BTreeMap::from([("zone".into(), "a".into())])));
        assert!(!v.node_deleted);
        v.set_node(None);
        assert!(v.node_deleted && v.node_labels.is_empty());
        v.set_node(Some(BTreeMap::new()));
        assert!(!v.node_deleted, "a re-created Node assigns again");
    }

    #[test]
    fn a_late_watch_event_does_not_roll_the_view_back() {
        let mut v = View::new();
        v.put_block(cached("20", 3));
        v.put_block(cached("19", 1));
        let cidr: IpNet = "10.0.0.0/29".parse().unwrap();
        assert_eq!(v.infos[&cidr].in_use, 3);
        assert_eq!(v.handles.keys().collect::<Vec<_>>(), vec!["h3"]);
        v.put_block(cached("21", 2));
        assert_eq!(v.infos[&cidr].in_use, 2);
        assert_eq!(
            v.handles.keys().collect::<Vec<_>>(),
            vec!["h2"],
            "handle index follows the block"
        );
        v.remove_block(&cidr);
        assert!(v.handles.is_empty() && v.infos.is_empty());
    }

    #[test]
    fn unset_max_blocks_per_host_means_no_cap() {
        let mut v = View::new();
        v.set_config(None);
        assert_eq!(v.limits.max_blocks_per_host, 0);
        assert_eq!(v.limits.cooldown, TimeDelta::zero(), "Calico's default");
        let spec = crate::api::ipamconfig::IPAMConfigSpec {
            ip_cooldown_seconds: Some(30),
            ..Default::default()
        };
        v.set_config(Some(&IPAMConfig::new("default", spec)));
        assert_eq!(v.limits.cooldown, TimeDelta::seconds(30));
    }
}
