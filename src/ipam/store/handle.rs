//! IPAMHandle objects, kept so Calico's tools find each handle's blocks. The block is the
//! record of who holds an address; the handle is written beside it (see `Ipam::auto_assign`),
//! so a crash in between leaves a handle without allocations or an allocation without a
//! handle object: found by release via the block cache and by `ipam check`/GC, never an
//! address held twice.

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
    let delta = counts.iter().map(|(c, n)| (*c, *n as i64)).collect();
    change(api, handle, &delta).await
}

/// Applies `delta` (block → change in addresses) to the handle: created when missing (with
/// the positive counts), blocks whose count drops to zero are dropped, and a handle left
/// with none is deleted (with preconditions, so only the object just read goes).
pub async fn change(
    api: &Api<IPAMHandle>,
    handle: &str,
    delta: &BTreeMap<IpNet, i64>,
) -> Result<(), IpamError> {
    if delta.is_empty() {
        return Ok(());
    }
    let name = handle_object_name(handle);
    let fresh_counts: BTreeMap<String, i64> = delta
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| (c.to_string(), *n))
        .collect();
    for attempt in 0..MAX_CAS_RETRIES {
        // Almost every handle is new (one per container), so the first try is a blind create.
        let existing = if attempt == 0 && !fresh_counts.is_empty() {
            None
        } else {
            api.get_opt(&name)
                .await
                .map_err(|e| api_err(&name, "read", e))?
        };
        let result = match existing {
            None if fresh_counts.is_empty() => return Ok(()),
            None => {
                let fresh = IPAMHandle::new(
                    &name,
                    IPAMHandleSpec {
                        handle_id: handle.to_string(),
                        block: fresh_counts.clone(),
                        deleted: false,
                    },
                );
                let started = std::time::Instant::now();
                let created = api.create(&PostParams::default(), &fresh).await;
                tracing::debug!(
                    handle,
                    create_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "handle object create"
                );
                match created {
                    Err(e) if is_already_exists(&e) => continue,
                    r => r.map(|_| ()).map_err(|e| api_err(&name, "create", e)),
                }
            }
            Some(mut h) => {
                if h.spec.deleted {
                    // A half-finished delete: its counts are void.
                    h.spec.block.clear();
                    h.spec.deleted = false;
                }
                for (c, n) in delta {
                    *h.spec.block.entry(c.to_string()).or_insert(0) += *n;
                }
                h.spec.block.retain(|_, n| *n > 0);
                let written = if h.spec.block.is_empty() {
                    let dp = DeleteParams::default().preconditions(Preconditions {
                        resource_version: h.resource_version(),
                        uid: h.uid(),
                    });
                    api.delete(&name, &dp).await.map(|_| ())
                } else {
                    api.replace(&name, &PostParams::default(), &h)
                        .await
                        .map(|_| ())
                };
                match written {
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) if is_not_found(&e) => continue,
                    r => r.map_err(|e| api_err(&name, "update", e)),
                }
            }
        };
        return result;
    }
    Err(IpamError::TooManyConflicts {
        object: format!("IPAMHandle {name}"),
    })
}

/// The handle object, if it exists.
pub async fn read(api: &Api<IPAMHandle>, handle: &str) -> Result<Option<IPAMHandle>, IpamError> {
    let name = handle_object_name(handle);
    api.get_opt(&name)
        .await
        .map_err(|e| api_err(&name, "read", e))
}

/// The blocks a handle object says it holds addresses in.
pub fn blocks_in(h: &IPAMHandle) -> Vec<IpNet> {
    h.spec.block.keys().filter_map(|k| k.parse().ok()).collect()
}

/// The blocks the handle object names beyond those already `known` (released from the view).
pub fn blocks_beyond(h: Option<&IPAMHandle>, known: &[IpNet]) -> Vec<IpNet> {
    h.map(blocks_in)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| !known.contains(c))
        .collect()
}

/// Deletes the handle object exactly as `read` (resourceVersion and uid preconditions); a
/// changed or missing object is left alone.
pub async fn delete_as_read(
    api: &Api<IPAMHandle>,
    handle: &str,
    read: Option<IPAMHandle>,
) -> Result<(), IpamError> {
    let Some(h) = read else {
        return Ok(());
    };
    let name = handle_object_name(handle);
    let dp = DeleteParams::default().preconditions(Preconditions {
        resource_version: h.resource_version(),
        uid: h.uid(),
    });
    match api.delete(&name, &dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) || is_conflict(&e) => Ok(()),
        Err(e) => Err(api_err(&name, "delete", e)),
    }
}

pub async fn delete(
    api: &Api<IPAMHandle>,
    handle: &str,
    first: Option<IPAMHandle>,
) -> Result<(), IpamError> {
    let name = handle_object_name(handle);
    let mut known = first;
    for attempt in 0..MAX_CAS_RETRIES {
        let current = match known.take() {
            Some(h) if attempt == 0 => Some(h),
            _ => read(api, handle).await?,
        };
        let Some(h) = current else {
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
