//! Giving blocks back: an empty block is deleted only if it is still exactly the empty, affine
//! version just read (resourceVersion and UID preconditions, as `claim.rs` reclaims), then its
//! BlockAffinity goes. The block delete is the decision; a crash before the affinity delete
//! leaves a stray affinity, which readers ignore and the leader's sweep removes.

use chrono::Utc;
use ipnet::IpNet;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Preconditions};

use super::writer::api_err;
use super::{Ipam, MAX_CAS_RETRIES, is_conflict, is_not_found, view};
use crate::api::blockaffinity::BlockAffinity;
use crate::ipam::IpamError;
use crate::ipam::cidr::{affinity_name, block_name};
use crate::ipam::convert::block_from_spec;

/// Why a block was not released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// It holds (or is cooling down) at least one address.
    NotEmpty,
    /// It is no longer affine to the node (reclaimed, or released by someone else).
    NotAffine,
    /// It changed between the read and the delete; the next pass looks again.
    Changed,
}

impl Ipam {
    /// Deletes block `cidr` if it is affine to `host` and empty, then the affinity object.
    /// Ok(None) when released (or already gone), Ok(Some(why)) when kept.
    pub async fn release_empty_block(
        &self,
        cidr: IpNet,
        host: &str,
    ) -> Result<Option<Kept>, IpamError> {
        let name = block_name(&cidr);
        let Some(current) = self
            .blocks
            .get_opt(&name)
            .await
            .map_err(|e| api_err(&name, "read", e))?
        else {
            view::write(&self.view.view).remove_block(&cidr);
            self.delete_affinity(&affinity_name(host, &cidr)).await?;
            return Ok(None);
        };
        let mut block = block_from_spec(&current.spec)?;
        if current.spec.deleted || !block.is_affine_to(host) {
            return Ok(Some(Kept::NotAffine));
        }
        let cooldown = self.with_view(|v| v.limits.cooldown);
        block.garbage_collect(Utc::now(), cooldown);
        if !block.is_empty() {
            return Ok(Some(Kept::NotEmpty));
        }
        let dp = DeleteParams::default().preconditions(Preconditions {
            resource_version: current.resource_version(),
            uid: current.uid(),
        });
        match self.blocks.delete(&name, &dp).await {
            Ok(_) => {}
            Err(e) if is_conflict(&e) => return Ok(Some(Kept::Changed)),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err(&name, "delete", e)),
        }
        view::write(&self.view.view).remove_block(&cidr);
        self.delete_affinity(&affinity_name(host, &cidr)).await?;
        tracing::info!(block = %cidr, node = host, "released empty IPAM block");
        Ok(None)
    }

    /// Deletes one BlockAffinity object, exactly the version read (a conflict re-reads).
    /// A missing object is a success.
    pub async fn delete_affinity(&self, name: &str) -> Result<(), IpamError> {
        for _ in 0..MAX_CAS_RETRIES {
            let Some(a) = self
                .affinities
                .get_opt(name)
                .await
                .map_err(|e| api_err(name, "read", e))?
            else {
                return Ok(());
            };
            let dp = DeleteParams::default().preconditions(Preconditions {
                resource_version: a.resource_version(),
                uid: a.uid(),
            });
            match self.affinities.delete(name, &dp).await {
                Ok(_) => return Ok(()),
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(api_err(name, "delete", e)),
            }
        }
        Err(IpamError::TooManyConflicts {
            object: format!("BlockAffinity {name}"),
        })
    }

    /// Every BlockAffinity (small objects; the leader reads them once per GC pass to find
    /// affinities of deleted nodes that no block backs).
    pub async fn list_affinities(&self) -> Result<Vec<BlockAffinity>, IpamError> {
        self.affinities
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .map_err(|e| api_err("BlockAffinity", "list", e))
    }
}
