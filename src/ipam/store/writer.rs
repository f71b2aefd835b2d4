//! Group commit: one writer task per block serialises every change this daemon makes to that
//! block. Requests that queue up while a write is in flight are applied together and saved in
//! one compare-and-swap PUT; each caller hears back only after the PUT holding its change
//! succeeded, so a crash before it hands no address to anyone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::Utc;
use ipnet::IpNet;
use kube::api::{Api, PostParams};
use kube::{Resource, ResourceExt};
use tokio::sync::{mpsc, oneshot};

use super::view::{self, CachedBlock, View};
use super::{MAX_CAS_RETRIES, is_conflict, is_not_found};
use crate::api::ipamblock::IPAMBlock;
use crate::ipam::IpamError;
use crate::ipam::block::{Block, Owner, Slot};
use crate::ipam::cidr::block_name;
use crate::ipam::convert::{block_from_spec, block_to_spec};

/// Most requests folded into one write; bounds the time the first caller of a burst waits.
const MAX_BATCH: usize = 512;

pub enum Op {
    /// Up to `n` free addresses for `owner`; `require_host` refuses blocks not affine to it.
    Assign {
        n: usize,
        owner: Owner,
        require_host: Option<String>,
        reply: oneshot::Sender<Result<Vec<IpAddr>, IpamError>>,
    },
    /// Exactly `addr` for `owner`.
    AssignAddr {
        addr: IpAddr,
        owner: Owner,
        reply: oneshot::Sender<Result<(), IpamError>>,
    },
    /// Every address of `handle` in this block (none: nothing to do).
    Release {
        handle: String,
        reply: oneshot::Sender<Result<Vec<IpAddr>, IpamError>>,
    },
    /// `addr` if it is still allocated to no handle (a `{}` attribute); replies with it when
    /// released, nothing when it changed meanwhile.
    ReleaseOwnerless {
        addr: IpAddr,
        reply: oneshot::Sender<Result<Vec<IpAddr>, IpamError>>,
    },
    /// Nothing but the garbage collection every write starts with: frees holds whose
    /// cooldown has passed, written only if that changed the block.
    Collect {
        reply: oneshot::Sender<Result<Vec<IpAddr>, IpamError>>,
    },
}

/// Counters a benchmark or test reads to see group commit at work.
#[derive(Debug, Default)]
pub struct WriteStats {
    pub block_writes: AtomicU64,
    pub cas_conflicts: AtomicU64,
    /// Operations (assignments, releases) that succeeded inside a committed write.
    pub ops_committed: AtomicU64,
}

pub struct Writers {
    api: Api<IPAMBlock>,
    view: Arc<RwLock<View>>,
    stats: Arc<WriteStats>,
    senders: Mutex<HashMap<IpNet, mpsc::UnboundedSender<Op>>>,
    /// Set once the daemon supervises the writers; until then their tasks wait here.
    health: std::sync::OnceLock<crate::health::Registry>,
    unsupervised: Mutex<Vec<Unsupervised>>,
}

/// A writer started before the health registry was handed over, and its pulse cell.
type Unsupervised = (IpNet, tokio::task::JoinHandle<()>, PulseCell);
/// Filled when the writer is put on the health registry; until then it reports nothing.
type PulseCell = Arc<std::sync::OnceLock<crate::health::Pulse>>;

impl Writers {
    pub fn new(api: Api<IPAMBlock>, view: Arc<RwLock<View>>, stats: Arc<WriteStats>) -> Writers {
        Writers {
            api,
            view,
            stats,
            senders: Mutex::new(HashMap::new()),
            health: std::sync::OnceLock::new(),
            unsupervised: Mutex::new(Vec::new()),
        }
    }

    /// Puts every block writer, present and future, on `health` as `ipam/writer/<block>`:
    /// a writer that panics or ends revokes readiness by name.
    pub fn supervise(&self, health: &crate::health::Registry) {
        let _ = self.health.set(health.clone());
        let waiting =
            std::mem::take(&mut *self.unsupervised.lock().unwrap_or_else(|p| p.into_inner()));
        for (cidr, task, pulse) in waiting {
            self.hand_over(cidr, task, pulse);
        }
    }

    /// A writer stuck in one write (an API server that accepts the connection and never
    /// answers) revokes readiness after the grace time: this node cannot hand out addresses.
    fn hand_over(&self, cidr: IpNet, task: tokio::task::JoinHandle<()>, cell: PulseCell) {
        match self.health.get() {
            Some(h) => {
                let expect = crate::health::Expect {
                    stall_after: Some(crate::health::grace()),
                    ..crate::health::Expect::default()
                };
                let name = format!("ipam/writer/{cidr}");
                let _ = cell.set(h.register(name.clone(), expect));
                h.supervise(name, expect, task);
            }
            None => self
                .unsupervised
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((cidr, task, cell)),
        }
    }

    /// Queues `op` on the block's writer, starting the writer on first use. Writers live as
    /// long as the daemon: one small task per block this node ever wrote to.
    pub fn submit(&self, cidr: IpNet, op: Op) {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        let mut spawned = None;
        let tx = senders.entry(cidr).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let pulse = PulseCell::default();
            let w = Writer {
                cidr,
                api: self.api.clone(),
                view: self.view.clone(),
                stats: self.stats.clone(),
                current: None,
                pulse: pulse.clone(),
            };
            spawned = Some((tokio::spawn(w.run(rx)), pulse));
            tx
        });
        // The writer only stops when the runtime does; a failed send drops the reply
        // channel, which the caller sees as an error.
        let _ = tx.send(op);
        drop(senders);
        if let Some((task, pulse)) = spawned {
            self.hand_over(cidr, task, pulse);
        }
    }

    pub async fn assign(
        &self,
        cidr: IpNet,
        n: usize,
        owner: Owner,
        require_host: Option<String>,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let (reply, rx) = oneshot::channel();
        self.submit(
            cidr,
            Op::Assign {
                n,
                owner,
                require_host,
                reply,
            },
        );
        rx.await
            .map_err(|_| IpamError::WriterGone { block: cidr })?
    }

    pub async fn assign_addr(
        &self,
        cidr: IpNet,
        addr: IpAddr,
        owner: Owner,
    ) -> Result<(), IpamError> {
        let (reply, rx) = oneshot::channel();
        self.submit(cidr, Op::AssignAddr { addr, owner, reply });
        rx.await
            .map_err(|_| IpamError::WriterGone { block: cidr })?
    }

    /// Releases `addr` if it is still allocated with no handle.
    pub async fn release_ownerless(
        &self,
        cidr: IpNet,
        addr: IpAddr,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let (reply, rx) = oneshot::channel();
        self.submit(cidr, Op::ReleaseOwnerless { addr, reply });
        rx.await
            .map_err(|_| IpamError::WriterGone { block: cidr })?
    }

    /// Collects the block's expired holds (a write only when there are some).
    pub async fn collect(&self, cidr: IpNet) -> Result<(), IpamError> {
        let (reply, rx) = oneshot::channel();
        self.submit(cidr, Op::Collect { reply });
        rx.await
            .map_err(|_| IpamError::WriterGone { block: cidr })?
            .map(|_| ())
    }

    pub async fn release(&self, cidr: IpNet, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        let (reply, rx) = oneshot::channel();
        self.submit(
            cidr,
            Op::Release {
                handle: handle.to_string(),
                reply,
            },
        );
        rx.await
            .map_err(|_| IpamError::WriterGone { block: cidr })?
    }
}

enum Outcome {
    Addrs(Vec<IpAddr>),
    Done,
    Failed(IpamError),
}

struct Writer {
    cidr: IpNet,
    api: Api<IPAMBlock>,
    view: Arc<RwLock<View>>,
    stats: Arc<WriteStats>,
    /// The block as our last successful write left it; newer than the watch until the
    /// watch catches up.
    current: Option<CachedBlock>,
    pulse: PulseCell,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if let Some(p) = self.pulse.get() {
                p.busy();
            }
            crate::health::faults::check("ipam/writer").await;
            let outcomes = self.commit(&batch).await;
            for (op, outcome) in batch.into_iter().zip(outcomes) {
                reply(op, outcome);
            }
            if let Some(p) = self.pulse.get() {
                p.idle();
            }
        }
    }

    /// The freshest copy we know: ours or the watch's, whichever is newer.
    fn base(&self) -> Option<CachedBlock> {
        let seen = view::read(&self.view).blocks.get(&self.cidr).cloned();
        match (&self.current, seen) {
            (Some(mine), Some(seen)) => {
                let newer = match (
                    seen.resource_version.parse::<u64>(),
                    mine.resource_version.parse::<u64>(),
                ) {
                    (Ok(s), Ok(m)) => s > m,
                    _ => false,
                };
                Some(if newer { seen } else { mine.clone() })
            }
            (Some(mine), None) => Some(mine.clone()),
            (None, seen) => seen,
        }
    }

    async fn fetch(&self) -> Result<Option<CachedBlock>, IpamError> {
        let name = block_name(&self.cidr);
        let obj = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| api_err(&name, "read", e))?;
        obj.filter(|o| !o.spec.deleted).map(to_cached).transpose()
    }

    async fn commit(&mut self, batch: &[Op]) -> Vec<Outcome> {
        let name = block_name(&self.cidr);
        let mut base = self.base();
        if base.is_none() {
            base = match self.fetch().await {
                Ok(b) => b,
                Err(e) => return fail_all(batch, &e),
            };
        }
        for _ in 0..MAX_CAS_RETRIES {
            let Some(cached) = base.take() else {
                return batch.iter().map(|op| gone(op, self.cidr)).collect();
            };
            let (cooldown, reservations) = {
                let v = view::read(&self.view);
                (v.limits.cooldown, v.reservations.clone())
            };
            let now = Utc::now();
            let mut block = cached.block.clone();
            // Calico collects expired holds whenever it reads a block; the write carries it.
            block.garbage_collect(now, cooldown);
            let outcomes: Vec<Outcome> = batch
                .iter()
                .map(|op| apply(&mut block, op, &reservations, now, cooldown))
                .collect();
            if block == cached.block {
                self.current = Some(cached);
                return outcomes;
            }
            block.bump_sequence();
            let mut obj = IPAMBlock::new(&name, block_to_spec(&block));
            obj.meta_mut().resource_version = Some(cached.resource_version.clone());
            self.stats.block_writes.fetch_add(1, Ordering::Relaxed);
            let put_started = std::time::Instant::now();
            match self.api.replace(&name, &PostParams::default(), &obj).await {
                Ok(saved) => {
                    let saved = match to_cached(saved) {
                        Ok(s) => s,
                        Err(e) => return fail_all(batch, &e),
                    };
                    view::write(&self.view).put_block(saved.clone());
                    self.current = Some(saved);
                    let done = outcomes
                        .iter()
                        .filter(|o| !matches!(o, Outcome::Failed(_)))
                        .count();
                    self.stats
                        .ops_committed
                        .fetch_add(done as u64, Ordering::Relaxed);
                    tracing::debug!(
                        block = %self.cidr,
                        ops = batch.len(),
                        put_ms = put_started.elapsed().as_secs_f64() * 1000.0,
                        "block written"
                    );
                    return outcomes;
                }
                Err(e) if is_conflict(&e) => {
                    self.stats.cas_conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(block = %self.cidr, "block changed under us; re-reading");
                    self.current = None;
                    base = match self.fetch().await {
                        Ok(b) => b,
                        Err(e) => return fail_all(batch, &e),
                    };
                    if let Some(b) = &base {
                        view::write(&self.view).put_block(b.clone());
                    }
                }
                Err(e) if is_not_found(&e) => {
                    self.current = None;
                    view::write(&self.view).remove_block(&self.cidr);
                    return batch.iter().map(|op| gone(op, self.cidr)).collect();
                }
                Err(e) => {
                    self.current = None;
                    return fail_all(batch, &api_err(&name, "write", e));
                }
            }
        }
        fail_all(
            batch,
            &IpamError::TooManyConflicts {
                object: format!("IPAMBlock {name}"),
            },
        )
    }
}

fn to_cached(o: IPAMBlock) -> Result<CachedBlock, IpamError> {
    let resource_version = o.resource_version().unwrap_or_default();
    Ok(CachedBlock {
        block: block_from_spec(&o.spec)?,
        resource_version,
    })
}

fn apply(
    block: &mut Block,
    op: &Op,
    reservations: &crate::ipam::reservations::Reservations,
    now: chrono::DateTime<Utc>,
    cooldown: chrono::TimeDelta,
) -> Outcome {
    match op {
        Op::Assign {
            n,
            owner,
            require_host,
            ..
        } => {
            if let Some(node) = require_host
                && !block.is_affine_to(node)
            {
                return Outcome::Failed(IpamError::NotAffine {
                    block: block.cidr,
                    node: node.clone(),
                });
            }
            let got = block.auto_assign(*n, owner, reservations, now, cooldown);
            if got.is_empty() {
                Outcome::Failed(IpamError::BlockFull { block: block.cidr })
            } else {
                Outcome::Addrs(got)
            }
        }
        Op::AssignAddr { addr, owner, .. } => {
            match block.assign_addr(*addr, owner, now, cooldown) {
                Ok(()) => Outcome::Done,
                Err(e) => Outcome::Failed(e),
            }
        }
        Op::Release { handle, .. } => {
            Outcome::Addrs(block.release_by_handle(handle, now, cooldown))
        }
        Op::ReleaseOwnerless { addr, .. } => {
            let ownerless = crate::ipam::cidr::ordinal_of(&block.cidr, *addr)
                .filter(|o| block.slot(*o) == Slot::Ownerless);
            match ownerless.map(|o| block.release_ordinal(o, now, cooldown)) {
                Some(Some(_)) => Outcome::Addrs(vec![*addr]),
                _ => Outcome::Addrs(Vec::new()),
            }
        }
        Op::Collect { .. } => Outcome::Done,
    }
}

fn gone(op: &Op, cidr: IpNet) -> Outcome {
    match op {
        // Nothing of anyone's can be in a block that does not exist.
        Op::Release { .. } | Op::ReleaseOwnerless { .. } | Op::Collect { .. } => {
            Outcome::Addrs(Vec::new())
        }
        _ => Outcome::Failed(IpamError::BlockGone { block: cidr }),
    }
}

fn fail_all(batch: &[Op], e: &IpamError) -> Vec<Outcome> {
    batch
        .iter()
        .map(|_| {
            Outcome::Failed(IpamError::WriteFailed {
                reason: e.to_string(),
            })
        })
        .collect()
}

fn reply(op: Op, outcome: Outcome) {
    // A caller that gave up (timeout, cancelled request) no longer listens; that is fine.
    match (op, outcome) {
        (Op::Assign { reply, .. }, Outcome::Addrs(a)) => drop(reply.send(Ok(a))),
        (Op::Assign { reply, .. }, Outcome::Failed(e)) => drop(reply.send(Err(e))),
        (Op::AssignAddr { reply, .. }, Outcome::Failed(e)) => drop(reply.send(Err(e))),
        (Op::AssignAddr { reply, .. }, _) => drop(reply.send(Ok(()))),
        (Op::Release { reply, .. }, Outcome::Addrs(a)) => drop(reply.send(Ok(a))),
        (Op::Release { reply, .. }, Outcome::Failed(e)) => drop(reply.send(Err(e))),
        (Op::Assign { reply, .. }, Outcome::Done) => drop(reply.send(Ok(Vec::new()))),
        (Op::Release { reply, .. }, Outcome::Done) => drop(reply.send(Ok(Vec::new()))),
        (Op::ReleaseOwnerless { reply, .. } | Op::Collect { reply }, Outcome::Addrs(a)) => {
            drop(reply.send(Ok(a)))
        }
        (Op::ReleaseOwnerless { reply, .. } | Op::Collect { reply }, Outcome::Failed(e)) => {
            drop(reply.send(Err(e)))
        }
        (Op::ReleaseOwnerless { reply, .. } | Op::Collect { reply }, Outcome::Done) => {
            drop(reply.send(Ok(Vec::new())))
        }
    }
}

pub fn api_err(name: &str, action: &'static str, source: kube::Error) -> IpamError {
    IpamError::Api {
        object: name.to_string(),
        action,
        source: Box::new(source),
    }
}
