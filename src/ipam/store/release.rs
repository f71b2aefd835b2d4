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
use crate::ipam::block::Attribute;
use crate::ipam::cidr::{block_name, ordinal_of};
use crate::ipam::convert::{block_from_spec, block_to_spec};

/// What happened to the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrRelease {
    /// It was held by `handle` and is now free (or cooling down).
    Released { handle: String },
    /// Nobody held it (or its block does not exist).
    NotAllocated,
    /// Another handle than the expected one holds it now: left alone.
    HeldByOther { handle: String },
}

/// Releases `addr` in block `cidr` if `expect_handle` (when given) still holds it. The caller
/// decided from an earlier read that the address may go; the expectation keeps a release from
/// hitting an address that was freed and handed to someone else in between.
pub async fn release_addr(
    blocks: &Api<IPAMBlock>,
    handles: &Api<IPAMHandle>,
    cidr: IpNet,
    addr: IpAddr,
    expect_handle: Option<&str>,
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
        let Some(holder) = block.holder(addr).and_then(|a| a.handle_id.clone()) else {
            return Ok(AddrRelease::NotAllocated);
        };
        if expect_handle.is_some_and(|h| h != holder) {
            return Ok(AddrRelease::HeldByOther { handle: holder });
        }
        // Point the one ordinal at a private owner and release that owner, so the block's own
        // release path (cooldown marker, sequence numbers, attribute compaction) applies to
        // exactly this address even when the handle holds others in the block.
        let private = format!("tortie-ipam-release/{addr}");
        block.attributes.push(Attribute {
            handle_id: Some(private.clone()),
            secondary: Default::default(),
            released_at: None,
        });
        block.allocations[ord] = Some(block.attributes.len() - 1);
        block.release_by_handle(&private, now, cooldown);
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
    tracing::info!(%addr, block = %cidr, %handle, "released address");
    lower_handle_count(handles, &handle, &cidr).await?;
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
