//! The allocator against the API server: `Ipam` answers assign/release calls from the CNI
//! server and the overlay using the watch-fed view, claims blocks with Calico's protocol and
//! commits every block change with compare-and-swap through one writer per block.
//!
//! Crash safety. The IPAMBlock is the only record of who holds an address, and it changes only
//! by a PUT carrying the resourceVersion that was read (409 → re-read, retry, at most
//! `MAX_CAS_RETRIES`), or by a create that fails if the block exists. An address reaches a
//! caller only after the PUT recording it and the IPAMHandle write both succeeded; the two
//! run in parallel (as Calico writes the handle before the block). Per release: block
//! first, then the handle is deleted. So a crash:
//! - after the BlockAffinity `pending` create: a stray pending affinity, ignored by readers;
//! - after the block create: the block is ours (its `affinity` says so), found on restart;
//! - with only the block PUT landed: an allocation with no handle object (the caller got no
//!   answer, so no pod uses it): a leak for GC and `ipam check`, not a duplicate;
//! - with only the handle written: a handle without allocations, deleted by the leader's GC
//!   after the grace period;
//! - after a release PUT, before the handle delete: a handle object with no addresses.
//!
//! A PUT that fails for another reason (timeout) may still have landed: the callers get an
//! error, the writer re-reads, and at worst the addresses leak under the callers' handles.

mod claim;
mod cleanup;
pub mod events;
mod handle;
pub mod release;
mod stats;
pub mod view;
mod writer;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::api::vocab;
use chrono::Utc;
use ipnet::IpNet;
use kube::{Api, Client};

pub use stats::Activity;
pub use view::{CachedBlock, View};
pub use writer::WriteStats;

use self::claim::{Claim, Claimer};
use self::view::ViewHandle;
use self::writer::Writers;
use super::IpamError;
use super::block::Owner;
use super::cidr::block_containing;
use super::pools::{Family, PoolRequest, choose_pools, pool_for_fixed_ip};
use super::search::{Search, Step};
use crate::api::AllowedUse;
use crate::api::blockaffinity::BlockAffinity;
use crate::api::ipamblock::IPAMBlock;
use crate::api::ipamhandle::IPAMHandle;

/// Calico's bound on every compare-and-swap loop.
pub const MAX_CAS_RETRIES: usize = 100;

pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && !s.is_already_exists())
}

pub(crate) fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_already_exists())
}

pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

/// Handle of a pod's addresses, as Calico's CNI plugin names it.
pub fn pod_handle(container_id: &str) -> String {
    format!("k8s-pod-network.{container_id}")
}

/// Tunnel devices that get an address from IPAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    Vxlan,
    Ipip,
}

impl TunnelKind {
    pub fn handle(self, node: &str) -> String {
        match self {
            TunnelKind::Vxlan => format!("vxlan-tunnel-addr-{node}"),
            TunnelKind::Ipip => format!("ipip-tunnel-addr-{node}"),
        }
    }

    fn attr_type(self) -> &'static str {
        match self {
            TunnelKind::Vxlan => "vxlanTunnelAddress",
            TunnelKind::Ipip => "ipipTunnelAddress",
        }
    }
}

/// One allocation request: which families, for whom, and the inputs of the pool choice.
#[derive(Debug, Clone)]
pub struct AssignRequest {
    pub handle: String,
    /// Recorded with the allocation: namespace, pod, node, timestamp, pod UID, type, ...
    pub attrs: BTreeMap<String, String>,
    pub use_: AllowedUse,
    pub v4: bool,
    pub v6: bool,
    pub pod_annotations: Option<BTreeMap<String, String>>,
    pub namespace_annotations: Option<BTreeMap<String, String>>,
    pub namespace_labels: Option<BTreeMap<String, String>>,
    pub cni_v4_pools: Vec<String>,
    pub cni_v6_pools: Vec<String>,
}

impl AssignRequest {
    /// A workload request with no annotations or CNI pools: only node selectors decide.
    pub fn workload(handle: impl Into<String>, attrs: BTreeMap<String, String>) -> AssignRequest {
        AssignRequest {
            handle: handle.into(),
            attrs,
            use_: AllowedUse::Workload,
            v4: true,
            v6: false,
            pod_annotations: None,
            namespace_annotations: None,
            namespace_labels: None,
            cni_v4_pools: Vec::new(),
            cni_v6_pools: Vec::new(),
        }
    }
}

pub struct Ipam {
    node: String,
    view: ViewHandle,
    writers: Arc<Writers>,
    blocks: Api<IPAMBlock>,
    affinities: Api<BlockAffinity>,
    handles: Api<IPAMHandle>,
    stats: Arc<WriteStats>,
    activity: Activity,
    claim_lock: tokio::sync::Mutex<()>,
    /// Handles a DEL released from the blocks the view knows: their object is read (for
    /// blocks only it names) and deleted in the background, a few at a time, so a burst of
    /// DELs does not queue its block writes behind a read and a delete per pod.
    deferred: tokio::sync::mpsc::UnboundedSender<(String, Vec<IpNet>)>,
}

/// Handle objects being cleaned up at once, at most, by the deferred queue.
const DEFERRED_IN_FLIGHT: usize = 4;

/// The deferred half of a DEL's release: for each handle, the object is read, any block it
/// names that the view did not know is released (logged: the view normally knows every
/// block this daemon wrote), and the object is deleted exactly as read.
async fn drain_deferred(
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<IpNet>)>,
    api: Api<IPAMHandle>,
    writers: Arc<Writers>,
) {
    use futures::StreamExt;
    receiver_stream(rx)
        .for_each_concurrent(DEFERRED_IN_FLIGHT, |(name, known)| {
            let (api, writers) = (api.clone(), writers.clone());
            async move {
                let object = match handle::read(&api, &name).await {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::warn!(handle = %name, error = %e, "handle object not read; GC will delete it");
                        return;
                    }
                };
                for cidr in handle::blocks_beyond(object.as_ref(), &known) {
                    match writers.release(cidr, &name).await {
                        Ok(a) if !a.is_empty() => {
                            tracing::warn!(handle = %name, block = %cidr, addresses = ?a, "released addresses in a block the view did not know")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(handle = %name, block = %cidr, error = %e, "could not release; GC will")
                        }
                    }
                }
                // Deleted only as read: if an ADD re-created it meanwhile, it is that ADD's.
                if let Err(e) = handle::delete_as_read(&api, &name, object).await {
                    tracing::warn!(handle = %name, error = %e, "handle object not deleted; GC will");
                }
            }
        })
        .await;
}

/// The receiver as a stream (tokio's channel has no Stream impl without tokio-stream).
fn receiver_stream<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl Ipam {
    /// Starts the watches for `node` and waits until each has listed once.
    pub async fn start(
        client: Client,
        node: &str,
        sync_timeout: Duration,
    ) -> Result<Ipam, IpamError> {
        Ipam::start_with(client, node, sync_timeout, None).await
    }

    /// `start`, following the datastore's IPPool and Node stores when `shared` is given
    /// (the daemon: one watch per kind), else watching them itself (tests, the CLI).
    pub async fn start_with(
        client: Client,
        node: &str,
        sync_timeout: Duration,
        shared: Option<view::Shared>,
    ) -> Result<Ipam, IpamError> {
        let view = ViewHandle::start_with(client.clone(), node, shared);
        let mut synced = view.synced.clone();
        let waited = tokio::time::timeout(sync_timeout, synced.wait_for(|s| *s)).await;
        if !matches!(waited, Ok(Ok(_))) {
            return Err(IpamError::NotSynced {
                after: sync_timeout,
            });
        }
        let blocks = Api::<IPAMBlock>::all(client.clone());
        let stats = Arc::new(WriteStats::default());
        let writers = Arc::new(Writers::new(
            blocks.clone(),
            view.view.clone(),
            stats.clone(),
        ));
        let handles: Api<IPAMHandle> = Api::all(client.clone());
        let (deferred, deferred_rx) = tokio::sync::mpsc::unbounded_channel();
        // Ends when the Ipam (the only sender) is dropped and the queue is drained.
        tokio::spawn(drain_deferred(
            deferred_rx,
            handles.clone(),
            writers.clone(),
        ));
        let ipam = Ipam {
            node: node.to_string(),
            writers,
            view,
            blocks,
            affinities: Api::all(client),
            handles,
            stats,
            activity: Activity::default(),
            claim_lock: tokio::sync::Mutex::new(()),
            deferred,
        };
        ipam.claimer().confirm_own_blocks().await;
        Ok(ipam)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Block writes, conflicts and committed operations so far (group commit shows as
    /// fewer writes than operations).
    pub fn stats(&self) -> &WriteStats {
        &self.stats
    }

    /// Claims, borrows, releases and allocation latency of this allocator.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Changes as the view's watches apply them: the calculation waits on this.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.view.changes.subscribe()
    }

    /// Puts the view's watch tasks and the block writers on `health` (see their
    /// `supervise`): one that ends or panics revokes readiness by name.
    pub fn supervise(&self, health: &crate::health::Registry) {
        self.view.supervise(health);
        self.writers.supervise(health);
    }

    /// Bumped whenever an IPAM watch starts or stops failing.
    pub fn watch_failures_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.view.failures_changed.subscribe()
    }

    /// The IPAM watches failing now: kind, since when, why.
    pub fn watch_failures(&self) -> Vec<(&'static str, std::time::Instant, String)> {
        self.view
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, (t, w))| (*k, *t, w.clone()))
            .collect()
    }

    /// Runs `f` over the current view (blocks, pools, config) without holding it across I/O.
    pub fn with_view<R>(&self, f: impl FnOnce(&View) -> R) -> R {
        f(&view::read(&self.view.view))
    }

    fn claimer(&self) -> Claimer<'_> {
        Claimer {
            blocks: &self.blocks,
            affinities: &self.affinities,
            view: &self.view.view,
            node: &self.node,
        }
    }

    /// Allocates one address per requested family. Returns host prefixes (/32, /128). On any
    /// failure nothing stays allocated under the handle for this call.
    ///
    /// The handle object is written while the block PUTs are in flight, with the blocks the
    /// plan expects (one round trip instead of two on the CNI's critical path); when a block
    /// turned out full or lost, the handle is corrected afterwards. The caller hears of the
    /// addresses only once both are written.
    pub async fn auto_assign(&self, req: &AssignRequest) -> Result<Vec<IpNet>, IpamError> {
        let _timer = self.activity.assign_seconds.start_timer();
        self.node_exists()?;
        let owner = Owner {
            handle_id: req.handle.clone(),
            attrs: req.attrs.clone(),
        };
        let families: Vec<Family> = [(req.v4, Family::V4), (req.v6, Family::V6)]
            .into_iter()
            .filter(|(want, _)| *want)
            .map(|(_, f)| f)
            .collect();
        // The first plan of each family also names the block its handle record expects.
        let plans: Vec<(Family, Option<Step>)> = families
            .iter()
            .map(|f| (*f, self.next_step(*f, req, &[]).ok()))
            .collect();
        let expected: BTreeMap<IpNet, i64> =
            counts(plans.iter().filter_map(|(_, s)| s.as_ref().map(Step::cidr)));
        let record = handle::change(&self.handles, &req.handle, &expected);
        let assign = async {
            let mut got: Vec<(IpNet, IpAddr)> = Vec::new();
            for (family, first) in plans.iter().cloned() {
                match self.assign_one(family, req, &owner, first).await {
                    Ok(pair) => got.push(pair),
                    Err(e) => return Err((got, e)),
                }
            }
            Ok(got)
        };
        let (recorded, assigned) = tokio::join!(record, assign);
        let addrs = |got: Vec<(IpNet, IpAddr)>| got.into_iter().map(|(_, a)| IpNet::from(a));
        let (got, e, wrote_handle) = match assigned {
            Err((got, e)) => (got, e, recorded.is_ok()),
            Ok(got) => {
                let actual = counts(got.iter().map(|(c, _)| *c));
                match recorded {
                    Ok(()) if actual == expected => return Ok(addrs(got).collect()),
                    Ok(()) => {
                        let fix = diff(&actual, &expected);
                        match handle::change(&self.handles, &req.handle, &fix).await {
                            Ok(()) => return Ok(addrs(got).collect()),
                            Err(e) => (got, e, true),
                        }
                    }
                    Err(e) => (got, e, false),
                }
            }
        };
        self.undo(&req.handle, &got).await;
        if wrote_handle {
            let back: BTreeMap<IpNet, i64> = expected.iter().map(|(c, n)| (*c, -n)).collect();
            if let Err(undo) = handle::change(&self.handles, &req.handle, &back).await {
                tracing::warn!(handle = %req.handle, error = %undo, "could not undo the handle record of a failed allocation");
            }
        }
        Err(e)
    }

    async fn assign_one(
        &self,
        family: Family,
        req: &AssignRequest,
        owner: &Owner,
        mut first: Option<Step>,
    ) -> Result<(IpNet, IpAddr), IpamError> {
        let mut skip: Vec<IpNet> = Vec::new();
        for _ in 0..MAX_CAS_RETRIES {
            let mut step = match first.take() {
                Some(planned) => planned,
                None => self.next_step(family, req, &skip)?,
            };
            // Claims are serialised per node: a burst of requests that all find the node's
            // blocks full claims one block, not one each. Re-plan under the lock, since the
            // request ahead may have just claimed a block with room.
            let is_claim = |s: &Step| matches!(s, Step::Claim { .. } | Step::Reclaim { .. });
            let mut _claiming = None;
            if is_claim(&step) {
                let guard = self.claim_lock.lock().await;
                step = self.next_step(family, req, &skip)?;
                if is_claim(&step) {
                    _claiming = Some(guard);
                }
            }
            match step {
                Step::Affine(cidr) | Step::Borrow(cidr) => {
                    let require = matches!(step, Step::Affine(_)).then(|| self.node.clone());
                    if require.is_none() {
                        tracing::info!(block = %cidr, handle = %req.handle, "borrowing an address from another node's block");
                    }
                    let borrowing = require.is_none();
                    match self.writers.assign(cidr, 1, owner.clone(), require).await {
                        Ok(addrs) => {
                            if let Some(a) = addrs.first() {
                                self.activity.used(cidr);
                                if borrowing {
                                    Activity::add(&self.activity.borrows, 1);
                                }
                                return Ok((cidr, *a));
                            }
                            skip.push(cidr);
                        }
                        Err(
                            IpamError::BlockFull { .. }
                            | IpamError::NotAffine { .. }
                            | IpamError::BlockGone { .. },
                        ) => skip.push(cidr),
                        Err(e) => return Err(e),
                    }
                }
                Step::Claim { cidr, .. } => match self.claimer().claim(cidr, Utc::now()).await? {
                    Claim::Lost => skip.push(cidr),
                    Claim::Ours => Activity::add(&self.activity.claims, 1),
                },
                Step::Reclaim {
                    cidr,
                    from,
                    sequence_number,
                } => {
                    let claimed = self
                        .claimer()
                        .reclaim(cidr, from.as_deref(), sequence_number, Utc::now())
                        .await?;
                    match claimed {
                        Claim::Lost => skip.push(cidr),
                        Claim::Ours => Activity::add(&self.activity.claims, 1),
                    }
                }
            }
        }
        Err(IpamError::TooManyConflicts {
            object: format!("{family} allocation for handle {:?}", req.handle),
        })
    }

    /// Calico's IPAM reads the Node before assigning; here the view knows whether it was
    /// deleted.
    fn node_exists(&self) -> Result<(), IpamError> {
        if self.with_view(|v| v.node_deleted) {
            return Err(IpamError::NodeDeleted {
                node: self.node.clone(),
            });
        }
        Ok(())
    }

    /// Plans the next step for one family from the current view (no I/O).
    fn next_step(
        &self,
        family: Family,
        req: &AssignRequest,
        skip: &[IpNet],
    ) -> Result<Step, IpamError> {
        self.with_view(|v| {
            let cni_pools = match family {
                Family::V4 => &req.cni_v4_pools,
                Family::V6 => &req.cni_v6_pools,
            };
            let preq = PoolRequest {
                family,
                use_: req.use_,
                node: &self.node,
                node_labels: &v.node_labels,
                pod_annotations: req.pod_annotations.as_ref(),
                namespace_annotations: req.namespace_annotations.as_ref(),
                namespace_labels: req.namespace_labels.as_ref(),
                cni_pools,
            };
            let choice = choose_pools(&v.pools, &preq)?;
            Search {
                node: &self.node,
                pools: choice.pools,
                blocks: &v.infos,
                reservations: &v.reservations,
                limits: v.limits,
                now: Utc::now(),
                skip,
            }
            .next_step()
        })
    }

    /// Assigns exactly `addr` (the `ipAddrs` annotation), claiming its block if nobody has.
    pub async fn assign_ip(
        &self,
        addr: IpAddr,
        handle: &str,
        attrs: BTreeMap<String, String>,
        use_: AllowedUse,
    ) -> Result<IpNet, IpamError> {
        self.node_exists()?;
        let owner = Owner {
            handle_id: handle.to_string(),
            attrs,
        };
        for _ in 0..MAX_CAS_RETRIES {
            let (cidr, holder, strict) = self.with_view(|v| {
                let pool = pool_for_fixed_ip(&v.pools, addr, use_)?;
                let cidr = block_containing(addr, pool.block_size)?;
                let holder = v.infos.get(&cidr).map(|b| (b.host.clone(), b.affine));
                Ok::<_, IpamError>((cidr, holder, v.limits.strict_affinity))
            })?;
            match holder {
                None => {
                    if self.claimer().claim(cidr, Utc::now()).await? == Claim::Ours {
                        Activity::add(&self.activity.claims, 1);
                    }
                    continue;
                }
                Some((host, affine))
                    if strict && affine && host.as_deref() != Some(self.node.as_str()) =>
                {
                    return Err(IpamError::FixedIpUnusable {
                        addr,
                        reason: format!(
                            "its block {cidr} is affine to {} and strictAffinity is true",
                            host.map_or("another owner".to_string(), |h| format!("node {h:?}"))
                        ),
                    });
                }
                Some(_) => {}
            }
            match self.writers.assign_addr(cidr, addr, owner.clone()).await {
                Ok(()) => {
                    self.record_handle(handle, &[(cidr, addr)]).await?;
                    return Ok(IpNet::from(addr));
                }
                Err(IpamError::BlockGone { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(IpamError::TooManyConflicts {
            object: format!("assignment of {addr}"),
        })
    }

    /// The node's tunnel address for `kind`, allocated from a Tunnel-allowed pool on first
    /// call and returned unchanged afterwards.
    pub async fn assign_tunnel_addr(
        &self,
        kind: TunnelKind,
        family: Family,
    ) -> Result<IpNet, IpamError> {
        let handle = kind.handle(&self.node);
        if let Some(a) = self
            .addresses_of(&handle)
            .into_iter()
            .find(|a| Family::of_addr(a) == family)
        {
            return Ok(IpNet::from(a));
        }
        let attrs = BTreeMap::from([
            (vocab::ATTR_NODE.to_string(), self.node.clone()),
            (vocab::ATTR_TYPE.to_string(), kind.attr_type().to_string()),
        ]);
        let req = AssignRequest {
            use_: AllowedUse::Tunnel,
            v4: family == Family::V4,
            v6: family == Family::V6,
            ..AssignRequest::workload(handle, attrs)
        };
        let got = self.auto_assign(&req).await?;
        got.into_iter()
            .next()
            .ok_or(IpamError::TooManyConflicts { object: req.handle })
    }

    pub async fn release_tunnel_addr(&self, kind: TunnelKind) -> Result<Vec<IpAddr>, IpamError> {
        self.release_by_handle(&kind.handle(&self.node)).await
    }

    /// Addresses the view says `handle` holds.
    pub fn addresses_of(&self, handle: &str) -> Vec<IpAddr> {
        self.with_view(|v| {
            let Some(cidrs) = v.handles.get(handle) else {
                return Vec::new();
            };
            cidrs
                .iter()
                .filter_map(|c| v.blocks.get(c))
                .flat_map(|b| {
                    let blk = &b.block;
                    blk.allocations
                        .iter()
                        .enumerate()
                        .filter_map(move |(ord, a)| {
                            let attr = blk.attributes.get((*a)?)?;
                            (attr.handle_id.as_deref() == Some(handle))
                                .then(|| super::cidr::addr_at(&blk.cidr, ord))
                                .flatten()
                        })
                })
                .collect()
        })
    }

    /// Releases every address of `handle`, wherever it is; releasing an unknown handle is a
    /// success. The handle object goes only after every block released its addresses.
    /// The blocks the view knows are released while the handle object is read; blocks only
    /// the object names (the view not caught up yet) follow.
    pub async fn release_by_handle(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        self.release_handle(handle, false).await
    }

    /// `release_by_handle` for CNI DEL: answers once the blocks are written and deletes the
    /// handle object afterwards (the addresses are free already; only the bookkeeping
    /// object is left, and the handle GC collects it if the delete never happens). When the
    /// view knows blocks of the handle, the object is not read first: the view holds every
    /// block this daemon wrote (its writes update the view before they answer) and was
    /// listed before the CNI served, so the blocks it knows are all the handle's; the
    /// object's own list is still checked in the background.
    pub async fn release_by_handle_deferred(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        self.release_handle(handle, true).await
    }

    async fn release_handle(&self, handle: &str, defer: bool) -> Result<Vec<IpAddr>, IpamError> {
        let known: Vec<IpNet> = self.with_view(|v| {
            v.handles
                .get(handle)
                .map(|c| c.to_vec())
                .unwrap_or_default()
        });
        if defer && !known.is_empty() {
            let written =
                futures::future::join_all(known.iter().map(|c| self.writers.release(*c, handle)))
                    .await;
            let mut released = Vec::new();
            for r in written {
                released.extend(r?);
            }
            // A closed queue means the daemon is stopping; GC deletes the object then.
            let _ = self.deferred.send((handle.to_string(), known));
            Activity::add(&self.activity.releases, released.len());
            if !released.is_empty() {
                tracing::info!(handle, addresses = ?released, "released addresses");
            }
            return Ok(released);
        }
        let release_all = |cidrs: Vec<IpNet>| {
            futures::future::join_all(
                cidrs
                    .into_iter()
                    .map(|c| self.writers.release(c, handle))
                    .collect::<Vec<_>>(),
            )
        };
        let (object, first) = tokio::join!(
            handle::read(&self.handles, handle),
            release_all(known.clone())
        );
        let object = object?;
        let second = release_all(handle::blocks_beyond(object.as_ref(), &known)).await;
        let mut released = Vec::new();
        for r in first.into_iter().chain(second) {
            released.extend(r?);
        }
        if defer {
            // Deleted only as read: if an ADD re-created it meanwhile, it is that ADD's.
            let (api, name) = (self.handles.clone(), handle.to_string());
            tokio::spawn(async move {
                if let Err(e) = handle::delete_as_read(&api, &name, object).await {
                    tracing::warn!(handle = %name, error = %e, "handle object not deleted; GC will");
                }
            });
        } else {
            handle::delete(&self.handles, handle, object).await?;
        }
        Activity::add(&self.activity.releases, released.len());
        if !released.is_empty() {
            tracing::info!(handle, addresses = ?released, "released addresses");
        }
        Ok(released)
    }

    /// Frees the holds of block `cidr` whose cooldown has passed (written only when there
    /// are some): the scan that keeps an idle block's expired holds from lingering.
    pub async fn collect_block(&self, cidr: IpNet) -> Result<(), IpamError> {
        self.writers.collect(cidr).await
    }

    /// Releases `addr` in `cidr` if it is still allocated to no handle. Returns whether it
    /// was released.
    pub async fn release_ownerless(&self, cidr: IpNet, addr: IpAddr) -> Result<bool, IpamError> {
        let released = self.writers.release_ownerless(cidr, addr).await?;
        if !released.is_empty() {
            Activity::add(&self.activity.releases, released.len());
            tracing::info!(%addr, block = %cidr, "released address allocated to no handle");
        }
        Ok(!released.is_empty())
    }

    async fn record_handle(&self, handle: &str, got: &[(IpNet, IpAddr)]) -> Result<(), IpamError> {
        let mut counts: BTreeMap<IpNet, usize> = BTreeMap::new();
        for (cidr, _) in got {
            *counts.entry(*cidr).or_insert(0) += 1;
        }
        if let Err(e) = handle::add(&self.handles, handle, &counts).await {
            self.undo(handle, got).await;
            return Err(e);
        }
        Ok(())
    }

    /// Gives back what a failed request took; a failure here leaves a leak for GC, logged.
    async fn undo(&self, handle: &str, got: &[(IpNet, IpAddr)]) {
        for (cidr, _) in got {
            if let Err(e) = self.writers.release(*cidr, handle).await {
                tracing::warn!(handle, block = %cidr, error = %e, "could not undo a partial allocation");
            }
        }
    }
}

/// Addresses per block.
fn counts(cidrs: impl Iterator<Item = IpNet>) -> BTreeMap<IpNet, i64> {
    let mut out = BTreeMap::new();
    for c in cidrs {
        *out.entry(c).or_insert(0) += 1;
    }
    out
}

/// What turns `from` into `to`, block by block.
fn diff(to: &BTreeMap<IpNet, i64>, from: &BTreeMap<IpNet, i64>) -> BTreeMap<IpNet, i64> {
    let mut out = to.clone();
    for (c, n) in from {
        *out.entry(*c).or_insert(0) -= n;
    }
    out.retain(|_, n| *n != 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn counts_group_addresses_by_block() {
        let c = counts([net("10.0.0.0/26"), net("fd00::/122"), net("10.0.0.0/26")].into_iter());
        assert_eq!(c[&net("10.0.0.0/26")], 2);
        assert_eq!(c[&net("fd00::/122")], 1);
    }

    #[test]
    fn diff_moves_a_missed_prediction_to_the_real_block() {
        let expected = counts([net("10.0.0.0/26")].into_iter());
        let actual = counts([net("10.0.0.64/26")].into_iter());
        let fix = diff(&actual, &expected);
        assert_eq!(fix[&net("10.0.0.0/26")], -1);
        assert_eq!(fix[&net("10.0.0.64/26")], 1);
        assert!(diff(&actual, &actual).is_empty());
    }
}
