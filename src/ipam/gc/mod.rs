//! IPAM's cluster-wide jobs, run by the Lease holder only: leaked-address GC (an allocation
//! whose pod is gone or is another pod now, after a grace period) and giving back the blocks
//! and affinities of deleted nodes. `local` holds the job every daemon runs for its own node.
//!
//! Entry points: `watch_pods` (the Pod reflector the GC reads; no LIST per pass), `run` (the
//! leader loop, idle while `is_leader` is false) and `local::run` (node-local hygiene).

pub mod cooldown;
mod handles;
pub mod local;
pub mod verdict;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::verdict::{
    Allocation, Holder, Judged, LeakTracker, PodFacts, Verdict, allocations, cached_pod_facts,
    holder_of, ownerless, pod_facts, verdict,
};
use super::Ipam;
use super::IpamError;
use super::metrics::{UNKNOWN_NODE, pool_label};
use crate::datastore::pods::CachedPod;
use crate::datastore::reflect;

/// First delay of the extra passes that follow a node's deletion; it doubles while the
/// node's blocks stay (its pods wait for the pod GC, about a minute), up to the cap or the
/// pass interval if that is shorter.
const DELETED_NODE_RETRY: Duration = Duration::from_secs(5);
const DELETED_NODE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Calico's default `leakGracePeriod`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone)]
pub struct GcConfig {
    /// How long an allocation must stay leaked before it is released.
    pub grace: Duration,
    /// Time between passes (Calico: half the grace period).
    pub interval: Duration,
}

impl Default for GcConfig {
    fn default() -> GcConfig {
        GcConfig::with_grace(DEFAULT_GRACE)
    }
}

impl GcConfig {
    pub fn with_grace(grace: Duration) -> GcConfig {
        GcConfig {
            grace,
            interval: (grace / 2).max(Duration::from_millis(100)),
        }
    }
}

/// (pool, node) label pair of the `ipam_allocations_gc_*` series.
pub type PoolNode = (String, String);

/// What the GC reports to the metrics: candidates of the last pass and releases so far.
#[derive(Clone, Default)]
pub struct GcStatus(Arc<Mutex<GcCounts>>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcCounts {
    pub candidates: BTreeMap<PoolNode, u64>,
    pub reclamations: BTreeMap<PoolNode, u64>,
}

impl GcStatus {
    pub fn snapshot(&self) -> GcCounts {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut GcCounts)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// The cluster objects the GC judges by, and a client for the live re-checks it makes
/// before releasing anything (a cache may lag behind a pod that was just created).
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub pods: Store<CachedPod>,
    pub nodes: Store<Node>,
}

/// A reflector of every Pod, cached as `CachedPod` (what leak decisions, the CNI and policy
/// read: uid, labels, Calico's annotations, node, ports, phase, addresses) so a large
/// cluster's pods cost little memory. The daemon opens one and shares it (GC, CNI, policy).
pub fn watch_pods(client: Client) -> (Store<CachedPod>, JoinHandle<()>) {
    reflect(
        Api::all(client),
        watcher::Config::default(),
        |_| {},
        "IPAM GC pods",
    )
}

/// `watch_pods`, bumping the cluster view's change counter on every pod change (the
/// daemon's policy calculation reads this store).
pub fn watch_pods_notifying(
    client: Client,
    changes: crate::datastore::ChangeNotifier,
) -> (Store<CachedPod>, JoinHandle<()>) {
    crate::datastore::reflect_notifying(
        Api::all(client),
        watcher::Config::default(),
        |_| {},
        "IPAM GC pods",
        changes,
    )
}

/// A reflector of every Node (names only matter here). The daemon's `Datastore` already
/// has one; this is for callers without it.
pub fn watch_nodes(client: Client) -> (Store<Node>, JoinHandle<()>) {
    reflect(
        Api::all(client),
        watcher::Config::default(),
        |n: &mut Node| {
            n.managed_fields_mut().clear();
            n.status = None;
        },
        "IPAM GC nodes",
    )
}

/// Leadership as the GC must read it: an election whose task ended (crashed, aborted) leaves
/// its last value behind, so a closed channel counts as not leading.
fn leading(rx: &watch::Receiver<bool>) -> bool {
    rx.has_changed().is_ok() && *rx.borrow()
}

/// Runs the leader's jobs whenever `is_leader` is true, until `shutdown` turns true. On
/// losing the lease it stops at once (mid-pass too: every write is a CAS) and forgets its
/// candidates; the next leader starts the grace period afresh.
pub async fn run(
    ipam: Arc<Ipam>,
    cluster: Cluster,
    mut is_leader: watch::Receiver<bool>,
    cfg: GcConfig,
    status: GcStatus,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut gc = LeaderGc {
        ipam,
        pods_api: Api::all(cluster.client.clone()),
        handles: handles::HandleGc::new(cluster.client.clone()),
        nodes_api: Api::all(cluster.client),
        pods: cluster.pods,
        nodes: cluster.nodes,
        cfg,
        status,
        tracker: LeakTracker::default(),
        ownerless: HashMap::new(),
        ownerless_candidates: BTreeMap::new(),
    };
    loop {
        if is_leader.has_changed().is_err() {
            tracing::info!("leader election ended; IPAM GC stops");
            return;
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = is_leader.wait_for(|l| *l) => {}
        }
        if !leading(&is_leader) {
            continue;
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = is_leader.wait_for(|l| !*l) => continue,
            _ = async {
                let _ = crate::datastore::ready::listed(&gc.pods).await;
                let _ = crate::datastore::ready::listed(&gc.nodes).await;
            } => {}
        }
        tracing::info!(grace = ?gc.cfg.grace, "leading IPAM garbage collection");
        let mut tick = tokio::time::interval(gc.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = DELETED_NODE_RETRY;
        loop {
            let woke = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => Wake::Shutdown,
                _ = is_leader.wait_for(|l| !*l) => Wake::Lost,
                _ = tick.tick() => Wake::Tick,
                () = gc.deleted_node_with_blocks(retry) => Wake::Tick,
            };
            // Backs off while a deleted node's block stays (its pods not yet gone, cooldown).
            retry = if gc.deleted_nodes_hold_blocks() {
                (retry * 2).min(DELETED_NODE_RETRY_MAX).min(gc.cfg.interval)
            } else {
                DELETED_NODE_RETRY
            };
            match woke {
                Wake::Shutdown => return,
                Wake::Lost => break,
                Wake::Tick if !leading(&is_leader) => break,
                Wake::Tick => {}
            }
            let ended = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => Wake::Shutdown,
                _ = is_leader.wait_for(|l| !*l) => Wake::Lost,
                () = gc.pass() => Wake::Tick,
            };
            // A pass judges every allocation against every pod: megabytes that are free
            // again now, given back rather than left in the heap until the next trim.
            crate::memory::trim();
            match ended {
                Wake::Shutdown => return,
                Wake::Lost => break,
                Wake::Tick => {}
            }
        }
        tracing::info!("no longer leading IPAM garbage collection");
        gc.tracker.reset();
        gc.ownerless.clear();
        gc.ownerless_candidates.clear();
        gc.handles.reset();
        gc.status.update(|c| c.candidates.clear());
    }
}

enum Wake {
    Shutdown,
    Lost,
    Tick,
}

struct LeaderGc {
    ipam: Arc<Ipam>,
    pods_api: Api<Pod>,
    nodes_api: Api<Node>,
    pods: Store<CachedPod>,
    nodes: Store<Node>,
    cfg: GcConfig,
    status: GcStatus,
    tracker: LeakTracker,
    /// Since when each address allocated to no handle has been seen.
    ownerless: HashMap<(ipnet::IpNet, IpAddr), Instant>,
    ownerless_candidates: BTreeMap<PoolNode, u64>,
    handles: handles::HandleGc,
}

/// Answers of live GETs within one pass, so each pod and node is asked at most once.
#[derive(Default)]
struct Live {
    pods: HashMap<(String, String), Option<PodFacts>>,
    nodes: HashMap<String, bool>,
}

impl LeaderGc {
    fn node_cached(&self, name: &str) -> bool {
        self.nodes.get(&ObjectRef::new(name)).is_some()
    }

    /// Whether a block is affine to a node the node cache no longer has.
    fn deleted_nodes_hold_blocks(&self) -> bool {
        let hosts: BTreeSet<String> = self.ipam.with_view(|v| {
            v.blocks
                .values()
                .filter_map(|b| Some(b.block.host()?.to_string()))
                .collect()
        });
        hosts.iter().any(|h| !h.is_empty() && !self.node_cached(h))
    }

    /// Completes once a block belongs to a deleted node, checked every `every`: Calico's node
    /// controller frees a deleted node's blocks on the event, not at the next timed pass
    /// (half the grace period, 7.5 minutes by default).
    async fn deleted_node_with_blocks(&self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if self.deleted_nodes_hold_blocks() {
                return;
            }
        }
    }

    async fn pass(&mut self) {
        // First, so an orphan handle seen in the same pass as a leak goes no later than it.
        if let Err(e) = self.handles.pass(&self.ipam, self.cfg.grace).await {
            tracing::warn!(error = %e, "collecting IPAMHandles without allocations failed; retrying next pass");
        }
        if let Err(e) = self.collect_ownerless().await {
            tracing::warn!(error = %e, "releasing addresses allocated to no handle failed; retrying next pass");
        }
        if let Err(e) = self.collect_leaks().await {
            tracing::warn!(error = %e, "IPAM leak collection failed; retrying next pass");
        }
        if let Err(e) = self.release_deleted_nodes().await {
            tracing::warn!(error = %e, "releasing deleted nodes' IPAM blocks failed; retrying next pass");
        }
    }

    async fn collect_leaks(&mut self) -> Result<(), IpamError> {
        let now = Instant::now();
        let (allocs, labels): (Vec<Allocation>, Vec<PoolNode>) = self.ipam.with_view(|v| {
            let a = allocations(v);
            let l = a
                .iter()
                .map(|x| (pool_label(v, &x.block), label_node(x)))
                .collect();
            (a, l)
        });
        let judged: Vec<Judged> = allocs
            .into_iter()
            .map(|alloc| {
                let verdict = verdict(
                    &alloc,
                    |ns, name| {
                        self.pods
                            .get(&ObjectRef::new(name).within(ns))
                            .map(|p| cached_pod_facts(&p))
                    },
                    |n| self.node_cached(n),
                );
                // With its node gone too there is nothing left to wait for; the live checks
                // before release still guard against a stale cache.
                let immediate = matches!(verdict, Verdict::Leaked(_))
                    && match holder_of(&alloc) {
                        Holder::Tunnel { .. } => true,
                        Holder::Pod { .. } => alloc.node().is_some_and(|n| !self.node_cached(n)),
                        Holder::Other => false,
                    };
                Judged {
                    alloc,
                    verdict,
                    immediate,
                }
            })
            .collect();
        let confirmed = self.tracker.observe(&judged, now, self.cfg.grace);

        let mut live = Live::default();
        let mut released: BTreeSet<(String, IpAddr)> = BTreeSet::new();
        let mut reclaimed: BTreeMap<PoolNode, u64> = BTreeMap::new();
        for handle in confirmed {
            let mine: Vec<(&Judged, &PoolNode)> = judged
                .iter()
                .zip(&labels)
                .filter(|(j, _)| j.alloc.handle == handle)
                .collect();
            if !self.still_leaked(&mine, &mut live).await {
                tracing::info!(handle, "leak candidate is in use after all; keeping it");
                continue;
            }
            let reason = mine
                .iter()
                .find_map(|(j, _)| match j.verdict {
                    Verdict::Leaked(r) => Some(r),
                    _ => None,
                })
                .unwrap_or("leaked");
            let addrs = self.ipam.release_by_handle(&handle).await?;
            tracing::info!(handle, addresses = ?addrs, reason, "released leaked IPAM addresses");
            for (j, label) in &mine {
                if addrs.contains(&j.alloc.addr) {
                    released.insert((handle.clone(), j.alloc.addr));
                    *reclaimed.entry((*label).clone()).or_insert(0) += 1;
                }
            }
        }
        let mut candidates: BTreeMap<PoolNode, u64> = BTreeMap::new();
        for (j, label) in judged.iter().zip(&labels) {
            let key = (j.alloc.handle.clone(), j.alloc.addr);
            if matches!(j.verdict, Verdict::Leaked(_)) && !released.contains(&key) {
                *candidates.entry(label.clone()).or_insert(0) += 1;
            }
        }
        self.status.update(|c| {
            for (k, n) in &self.ownerless_candidates {
                *candidates.entry(k.clone()).or_insert(0) += n;
            }
            c.candidates = candidates;
            for (k, n) in reclaimed {
                *c.reclamations.entry(k).or_insert(0) += n;
            }
        });
        Ok(())
    }

    /// Addresses allocated to no handle (nothing can ever release them by handle): released
    /// once they have been seen for the grace period, unless a pod reports the address as
    /// its own. They count as GC candidates of `unknown_node`, as kube-controllers counts
    /// allocations without a node attribute.
    async fn collect_ownerless(&mut self) -> Result<(), IpamError> {
        let now = Instant::now();
        let used: std::collections::HashSet<IpAddr> = self
            .pods
            .state()
            .iter()
            .flat_map(|p| cached_pod_facts(p).ips)
            .collect();
        let seen: Vec<((ipnet::IpNet, IpAddr), String)> = self.ipam.with_view(|v| {
            ownerless(v)
                .into_iter()
                .filter(|(_, a)| !used.contains(a))
                .map(|(b, a)| ((b, a), pool_label(v, &b)))
                .collect()
        });
        let previous = std::mem::take(&mut self.ownerless);
        self.ownerless = seen
            .iter()
            .map(|(k, _)| (*k, previous.get(k).copied().unwrap_or(now)))
            .collect();
        let mut candidates: BTreeMap<PoolNode, u64> = BTreeMap::new();
        let mut reclaimed: BTreeMap<PoolNode, u64> = BTreeMap::new();
        for ((block, addr), pool) in seen {
            let label = (pool, UNKNOWN_NODE.to_string());
            let aged = self
                .ownerless
                .get(&(block, addr))
                .is_some_and(|t| now.saturating_duration_since(*t) >= self.cfg.grace);
            if aged && self.ipam.release_ownerless(block, addr).await? {
                self.ownerless.remove(&(block, addr));
                *reclaimed.entry(label).or_insert(0) += 1;
            } else {
                *candidates.entry(label).or_insert(0) += 1;
            }
        }
        self.ownerless_candidates = candidates;
        self.status.update(|c| {
            for (k, n) in reclaimed {
                *c.reclamations.entry(k).or_insert(0) += n;
            }
        });
        Ok(())
    }

    /// Re-judges a handle's allocations with live reads: the pod (by namespace and name) and,
    /// where the decision skipped the grace period, the node.
    async fn still_leaked(&self, mine: &[(&Judged, &PoolNode)], live: &mut Live) -> bool {
        for (j, _) in mine {
            match holder_of(&j.alloc) {
                Holder::Other => return false,
                Holder::Tunnel { node } => {
                    if self.node_live(&node, live).await != Some(false) {
                        return false;
                    }
                }
                Holder::Pod {
                    namespace, name, ..
                } => {
                    let Some(facts) = self.pod_live(&namespace, &name, live).await else {
                        return false;
                    };
                    let v = verdict(&j.alloc, |_, _| facts.clone(), |_| true);
                    if !matches!(v, Verdict::Leaked(_)) {
                        return false;
                    }
                    let aged = !j.immediate;
                    if !aged {
                        let node = j.alloc.node().unwrap_or_default().to_string();
                        if self.node_live(&node, live).await != Some(false) {
                            return false;
                        }
                    }
                }
            }
        }
        true
    }

    /// Some(exists) from a live GET; None when the API could not say.
    async fn node_live(&self, name: &str, live: &mut Live) -> Option<bool> {
        if let Some(e) = live.nodes.get(name) {
            return Some(*e);
        }
        match self.nodes_api.get_opt(name).await {
            Ok(n) => {
                live.nodes.insert(name.to_string(), n.is_some());
                Some(n.is_some())
            }
            Err(e) => {
                tracing::warn!(node = name, error = %e, "could not read node; assuming it exists");
                None
            }
        }
    }

    /// Some(facts) where facts is None for a pod that does not exist; None when unknown.
    async fn pod_live(
        &self,
        namespace: &str,
        name: &str,
        live: &mut Live,
    ) -> Option<Option<PodFacts>> {
        let key = (namespace.to_string(), name.to_string());
        if let Some(f) = live.pods.get(&key) {
            return Some(f.clone());
        }
        let api: Api<Pod> = Api::namespaced(self.pods_api.clone().into_client(), namespace);
        match api.get_opt(name).await {
            Ok(p) => {
                let facts = p.as_ref().map(pod_facts);
                live.pods.insert(key, facts.clone());
                Some(facts)
            }
            Err(e) => {
                tracing::warn!(namespace, pod = name, error = %e, "could not read pod; assuming it exists");
                None
            }
        }
    }

    /// Blocks and affinities of nodes that no longer exist: empty blocks are deleted with
    /// their affinity; blocks still holding addresses wait until the leak pass (which skips
    /// the grace period for them) and the cooldown have emptied them.
    async fn release_deleted_nodes(&mut self) -> Result<(), IpamError> {
        let affinities = self.ipam.list_affinities().await?;
        let blocks: Vec<(ipnet::IpNet, String)> = self.ipam.with_view(|v| {
            v.blocks
                .values()
                .filter_map(|b| Some((b.block.cidr, b.block.host()?.to_string())))
                .collect()
        });
        let mut hosts: BTreeSet<String> = blocks.iter().map(|(_, h)| h.clone()).collect();
        hosts.extend(affinities.iter().map(|a| a.spec.node.clone()));
        hosts.retain(|h| !h.is_empty() && !self.node_cached(h));
        let mut live = Live::default();
        for host in hosts {
            if self.node_live(&host, &mut live).await != Some(false) {
                continue;
            }
            for (cidr, _) in blocks.iter().filter(|(_, h)| *h == host) {
                match self.ipam.release_empty_block(*cidr, &host).await? {
                    None => {
                        tracing::info!(node = host, block = %cidr, "released block of deleted node")
                    }
                    Some(why) => {
                        tracing::debug!(node = host, block = %cidr, ?why, "block of deleted node kept for now")
                    }
                }
            }
            let backed: BTreeSet<String> = self.ipam.with_view(|v| {
                v.blocks
                    .values()
                    .filter(|b| b.block.is_affine_to(&host))
                    .map(|b| b.block.cidr.to_string())
                    .collect()
            });
            for a in affinities.iter().filter(|a| a.spec.node == host) {
                let cidr_backed = a
                    .spec
                    .cidr
                    .parse::<ipnet::IpNet>()
                    .is_ok_and(|c| backed.contains(&c.to_string()));
                if !cidr_backed {
                    self.ipam.delete_affinity(&a.name_any()).await?;
                    tracing::info!(node = host, affinity = %a.name_any(), "deleted affinity of deleted node");
                }
            }
        }
        Ok(())
    }
}

fn label_node(a: &Allocation) -> String {
    a.node().unwrap_or(UNKNOWN_NODE).to_string()
}
