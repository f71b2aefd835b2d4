//! IPAMHandle objects, kept so Calico's tools find each handle's blocks. They are written
//! after the block (the block is the record of who holds an address): a crash in between
//! leaves an allocation without a handle object, found by release via the block cache and
//! by `ipam check`/GC, never an address held twice.

use std::collections::BTreeMap;

use ipnet::IpNet;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};

use super::writer::api_err;
use super::{MAX_CAS_RETRIES, is_already_exists, is_conflict, is_not_found};
use crate::api::ipamhandle::{IPAMHandle, IPAMHandleSpec, handle_object_name};
use crate::ipam::IpamError;

/// Adds `counts` (block → addresses) to the handle, creating it when missing.
pub async fn add(
    api: &Api<IPAMHandle>,
    handle: &str,
    counts: &BTreeMap<IpNet, usize>,
) -> Result<(), IpamError> {
    let name = handle_object_name(handle);
    let fresh = IPAMHandle::new(
        &name,
        IPAMHandleSpec {
            handle_id: handle.to_string(),
            block: counts
                .iter()
                .map(|(c, n)| (c.to_string(), *n as i64))
                .collect(),
            deleted: false,
        },
    );
    for attempt in 0..MAX_CAS_RETRIES {
        // Almost every handle is new (one per container), so the first try is a blind create.
        let existing = if attempt == 0 {
            None
        } else {
            api.get_opt(&name)
                .await
                .map_err(|e| api_err(&name, "read", e))?
        };
        match existing {
            None => match api.create(&PostParams::default(), &fresh).await {
                Ok(_) => return Ok(()),
                Err(e) if is_already_exists(&e) => continue,
                Err(e) => return Err(api_err(&name, "create", e)),
            },
            Some(mut h) => {
                if h.spec.deleted {
                    // A half-finished delete: its counts are void.
                    h.spec.block.clear();
                    h.spec.deleted = false;
                }
                for (c, n) in counts {
                    *h.spec.block.entry(c.to_string()).or_insert(0) += *n as i64;
                }
                match api.replace(&name, &PostParams::default(), &h).await {
                    Ok(_) => return Ok(()),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(api_err(&name, "update", e)),
                }
            }
        }
    }
    Err(IpamError::TooManyConflicts {
        object: format!("IPAMHandle {name}"),
    })
}

/// The blocks the handle object says it holds addresses in (empty when it does not exist).
pub async fn blocks_of(api: &Api<IPAMHandle>, handle: &str) -> Result<Vec<IpNet>, IpamError> {
    let name = handle_object_name(handle);
    let h = api
        .get_opt(&name)
        .await
        .map_err(|e| api_err(&name, "read", e))?;
    Ok(
        h.map(|h| h.spec.block.keys().filter_map(|k| k.parse().ok()).collect())
            .unwrap_or_default(),
    )
}

/// Deletes the handle object once all its addresses are released. The delete carries the
/// resourceVersion and UID just read, so it removes exactly that object (a conflict re-reads).
pub async fn delete(api: &Api<IPAMHandle>, handle: &str) -> Result<(), IpamError> {
    let name = handle_object_name(handle);
    for _ in 0..MAX_CAS_RETRIES {
        let Some(h) = api
            .get_opt(&name)
            .await
            .map_err(|e| api_err(&name, "read", e))?
        else {
            return Ok(());
        };
        let dp = DeleteParams::default().preconditions(Preconditions {
            resource_version: h.resource_version(),
            uid: h.uid(),
        });
        match api.delete(&name, &dp).await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(api_err(&name, "delete", e)),
        }
    }
    Err(IpamError::TooManyConflicts {
        object: format!("IPAMHandle {name}"),
    })
}
