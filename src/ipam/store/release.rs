//! Release of one given address (the operator's `tortie ipam release --ip`), outside any
//! daemon: compare-and-swap on the block that holds it, then the handle's count is lowered
//! (or the handle deleted at zero). Same write order as the allocator: block first.

use std::net::IpAddr;

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};

use super::writer::api_err;
use super::{MAX_CAS_RETRIES, is_conflict, is_not_found};
use crate::api::ipamblock::IPAMBlock;
use crate::api::ipamhandle::{IPAMHandle, handle_object_name};
use crate::ipam::IpamError;
use crate::ipam::block::Slot;
use crate::ipam::cidr::{block_name, ordinal_of};
use crate::ipam::convert::{block_from_spec, block_to_spec};

/// What happened to the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrRelease {
    /// It was held by `handle` (None: allocated to no handle) and is now free (or cooling
    /// down).
    Released { handle: Option<String> },
    /// Nobody held it (or its block does not exist, or it is cooling down already).
    NotAllocated,
    /// Another holder than the expected one has it now: left alone.
    HeldByOther { handle: Option<String> },
}

/// Releases `addr` in block `cidr` if it is still held as `expect_handle` says (Some(h): by
/// handle h; Some(None): by no handle, a `{}` attribute; None: by anyone). The caller decided
/// from an earlier read that the address may go; the expectation keeps a release from
/// hitting an address that was freed and handed to someone else in between.
pub async fn release_addr(
    blocks: &Api<IPAMBlock>,
    handles: &Api<IPAMHandle>,
    cidr: IpNet,
    addr: IpAddr,
    expect_handle: Option<Option<&str>>,
    now: DateTime<Utc>,
    cooldown: TimeDelta,
) -> Result<AddrRelease, IpamError> {
    let name = block_name(&cidr);
    let ord =
        ordinal_of(&cidr, addr).ok_or(IpamError::AddressOutsideBlock { addr, block: cidr })?;
    let mut released = None;
    for _ in 0..MAX_CAS_RETRIES {
        let Some(obj) = blocks
            .get_opt(&name)
            .await
            .map_err(|e| api_err(&name, "read", e))?
        else {
            return Ok(AddrRelease::NotAllocated);
        };
        let mut block = block_from_spec(&obj.spec)?;
        block.garbage_collect(now, cooldown);
        let holder = match block.slot(ord) {
            Slot::Held(a) => a.handle_id.clone(),
            Slot::Ownerless => None,
            Slot::Free | Slot::Cooling(_) => return Ok(AddrRelease::NotAllocated),
        };
        if expect_handle.is_some_and(|h| h != holder.as_deref()) {
            return Ok(AddrRelease::HeldByOther { handle: holder });
        }
        // Calico's release of one address: a fresh sequence number, a `releasedAt`
        // attribute, then the collection that frees it at once when there is no cooldown.
        if block.release_ordinal(ord, now, cooldown).is_none() {
            return Ok(AddrRelease::NotAllocated);
        }
        block.bump_sequence();
        let mut next = IPAMBlock::new(&name, block_to_spec(&block));
        next.metadata.resource_version = obj.resource_version();
        match blocks.replace(&name, &PostParams::default(), &next).await {
            Ok(_) => {
                released = Some(holder);
                break;
            }
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(api_err(&name, "update", e)),
        }
    }
    let Some(handle) = released else {
        return Err(IpamError::TooManyConflicts {
            object: format!("IPAMBlock {name}"),
        });
    };
    tracing::info!(%addr, block = %cidr, handle = ?handle, "released address");
    if let Some(h) = &handle {
        lower_handle_count(handles, h, &cidr).await?;
    }
    Ok(AddrRelease::Released { handle })
}

/// Takes one address of `cidr` off the handle's count; a handle left with nothing is deleted
/// (with preconditions, so only the object just read goes). A missing handle is fine.
async fn lower_handle_count(
    handles: &Api<IPAMHandle>,
    handle: &str,
    cidr: &IpNet,
) -> Result<(), IpamError> {
    let name = handle_object_name(handle);
    let key = cidr.to_string();
    for _ in 0..MAX_CAS_RETRIES {
        let Some(mut h) = handles
            .get_opt(&name)
            .await
            .map_err(|e| api_err(&name, "read", e))?
        else {
            return Ok(());
        };
        match h.spec.block.get_mut(&key) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                h.spec.block.remove(&key);
            }
        }
        let result = if h.spec.block.is_empty() {
            let dp = DeleteParams::default().preconditions(Preconditions {
                resource_version: h.resource_version(),
                uid: h.uid(),
            });
            handles.delete(&name, &dp).await.map(|_| ())
        } else {
            handles
                .replace(&name, &PostParams::default(), &h)
                .await
                .map(|_| ())
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(api_err(&name, "write", e)),
        }
    }
    Err(IpamError::TooManyConflicts {
        object: format!("IPAMHandle {name}"),
    })
}
