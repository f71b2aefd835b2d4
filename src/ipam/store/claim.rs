//! Claiming a block for this node with Calico's protocol: BlockAffinity `pending`, then the
//! IPAMBlock created with `affinity: host:<node>`, then the affinity `confirmed`. The block's
//! create is the decision: whoever creates it owns it, and addresses exist only inside it, so a
//! crash at any step leaves at worst a stray affinity (garbage), never a shared address.

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::{Resource, ResourceExt};

use super::view::{self, CachedBlock, View};
use super::writer::api_err;
use super::{MAX_CAS_RETRIES, is_already_exists, is_conflict, is_not_found};
use crate::api::blockaffinity::{AffinityState, AffinityType, BlockAffinity, BlockAffinitySpec};
use crate::api::ipamblock::IPAMBlock;
use crate::ipam::IpamError;
use crate::ipam::block::{Block, host_affinity};
use crate::ipam::cidr::{affinity_name, block_name};
use crate::ipam::convert::{block_from_spec, block_to_spec};

pub struct Claimer<'a> {
    pub blocks: &'a Api<IPAMBlock>,
    pub affinities: &'a Api<BlockAffinity>,
    pub view: &'a std::sync::RwLock<View>,
    pub node: &'a str,
}

/// What became of a claim attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The block is ours (newly created, or found already ours after a crash).
    Ours,
    /// Another node got there first; pick another block.
    Lost,
}

impl Claimer<'_> {
    pub async fn claim(&self, cidr: IpNet, now: DateTime<Utc>) -> Result<Claim, IpamError> {
        let aff_name = affinity_name(self.node, &cidr);
        self.write_affinity(&aff_name, cidr, AffinityState::Pending)
            .await?;

        let name = block_name(&cidr);
        // The claim time in ns seeds the sequence number, so a recreated block never reuses
        // its predecessor's numbers (ABA on sequence-checked releases).
        let seq = now.timestamp_nanos_opt().unwrap_or_default().max(0) as u64;
        let block = Block::new(cidr, Some(host_affinity(self.node)), Some(now), seq)?;
        let obj = IPAMBlock::new(&name, block_to_spec(&block));
        let created = match self.blocks.create(&PostParams::default(), &obj).await {
            Ok(o) => o,
            Err(e) if is_already_exists(&e) => {
                let existing = self
                    .blocks
                    .get(&name)
                    .await
                    .map_err(|e| api_err(&name, "read", e))?;
                let mine =
                    existing.spec.host_affinity() == Some(self.node) && !existing.spec.deleted;
                if !mine {
                    tracing::debug!(block = %cidr, "another node claimed the block first");
                    self.drop_affinity(&aff_name).await;
                    remember(self.view, existing);
                    return Ok(Claim::Lost);
                }
                existing
            }
            Err(e) => return Err(api_err(&name, "create", e)),
        };
        remember(self.view, created);
        self.write_affinity(&aff_name, cidr, AffinityState::Confirmed)
            .await?;
        tracing::info!(block = %cidr, node = self.node, "claimed IPAM block");
        Ok(Claim::Ours)
    }

    /// After a restart: confirms the affinity of every block that is ours, finishing claims a
    /// crash interrupted between the block create and the confirm. Failures are logged; the
    /// block's own `affinity` already makes it ours, the affinity object is for Calico's tools.
    pub async fn confirm_own_blocks(&self) {
        let ours: Vec<IpNet> = view::read(self.view)
            .blocks
            .values()
            .filter(|b| b.block.is_affine_to(self.node))
            .map(|b| b.block.cidr)
            .collect();
        for cidr in ours {
            let name = affinity_name(self.node, &cidr);
            if let Err(e) = self
                .write_affinity(&name, cidr, AffinityState::Confirmed)
                .await
            {
                tracing::warn!(block = %cidr, error = %e, "could not confirm block affinity");
            }
        }
    }

    /// Takes over an empty block another node (or nobody) holds: delete it only if it is still
    /// exactly the empty version the search saw (resourceVersion precondition), then claim it
    /// afresh. Anything else means someone is using it: Lost.
    pub async fn reclaim(
        &self,
        cidr: IpNet,
        from: Option<&str>,
        sequence_number: u64,
        now: DateTime<Utc>,
    ) -> Result<Claim, IpamError> {
        let name = block_name(&cidr);
        let Some(current) = self
            .blocks
            .get_opt(&name)
            .await
            .map_err(|e| api_err(&name, "read", e))?
        else {
            return self.claim(cidr, now).await;
        };
        let mut block = block_from_spec(&current.spec)?;
        if block.sequence_number != sequence_number || block.host() != from {
            return Ok(Claim::Lost);
        }
        let cooldown = view::read(self.view).limits.cooldown;
        block.garbage_collect(now, cooldown);
        if !block.is_empty() {
            return Ok(Claim::Lost);
        }
        let dp = DeleteParams::default().preconditions(Preconditions {
            resource_version: current.resource_version(),
            uid: current.uid(),
        });
        match self.blocks.delete(&name, &dp).await {
            Ok(_) => {}
            Err(e) if is_conflict(&e) || is_not_found(&e) => return Ok(Claim::Lost),
            Err(e) => return Err(api_err(&name, "delete", e)),
        }
        view::write(self.view).remove_block(&cidr);
        if let Some(other) = from {
            self.drop_affinity(&affinity_name(other, &cidr)).await;
        }
        tracing::info!(block = %cidr, from = ?from, "reclaimed empty IPAM block");
        self.claim(cidr, now).await
    }

    /// Creates or moves our affinity to `state` with compare-and-swap.
    async fn write_affinity(
        &self,
        name: &str,
        cidr: IpNet,
        state: AffinityState,
    ) -> Result<(), IpamError> {
        for _ in 0..MAX_CAS_RETRIES {
            match self
                .affinities
                .get_opt(name)
                .await
                .map_err(|e| api_err(name, "read", e))?
            {
                None => {
                    let mut spec = BlockAffinitySpec {
                        state,
                        node: self.node.to_string(),
                        type_: Some(AffinityType::Host),
                        cidr: cidr.to_string(),
                        deleted: String::new(),
                    };
                    spec.set_deleted(false);
                    match self
                        .affinities
                        .create(&PostParams::default(), &BlockAffinity::new(name, spec))
                        .await
                    {
                        Ok(_) => return Ok(()),
                        Err(e) if is_already_exists(&e) => continue,
                        Err(e) => return Err(api_err(name, "create", e)),
                    }
                }
                Some(mut a) => {
                    // Pending never demotes a confirmed claim (crash recovery re-runs pending).
                    let already = a.spec.state == state
                        || (state == AffinityState::Pending
                            && a.spec.state == AffinityState::Confirmed);
                    if already && !a.spec.is_deleted() {
                        return Ok(());
                    }
                    a.spec.state = state;
                    a.spec.set_deleted(false);
                    match self
                        .affinities
                        .replace(name, &PostParams::default(), &a)
                        .await
                    {
                        Ok(_) => return Ok(()),
                        Err(e) if is_conflict(&e) => continue,
                        Err(e) => return Err(api_err(name, "update", e)),
                    }
                }
            }
        }
        Err(IpamError::TooManyConflicts {
            object: format!("BlockAffinity {name}"),
        })
    }

    /// Best effort: a stray affinity is harmless garbage (readers go by the block's own
    /// `affinity`), so failures are logged, not returned.
    async fn drop_affinity(&self, name: &str) {
        match self.affinities.delete(name, &DeleteParams::default()).await {
            Err(e) if !is_not_found(&e) => {
                tracing::warn!(affinity = name, error = %e, "could not delete block affinity");
            }
            _ => {}
        }
    }
}

fn remember(view: &std::sync::RwLock<View>, obj: IPAMBlock) {
    let rv = obj.meta().resource_version.clone().unwrap_or_default();
    if let Ok(block) = block_from_spec(&obj.spec) {
        view::write(view).put_block(CachedBlock {
            block,
            resource_version: rv,
        });
    }
}
