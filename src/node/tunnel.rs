//! This node's tunnel addresses: allocated through IPAM (`vxlan-tunnel-addr-<node>`,
//! `ipip-tunnel-addr-<node>`) when some pool wants the encapsulation, and published on the
//! Node (`projectcalico.org/IPv4VXLANTunnelAddr` / `IPv4IPIPTunnelAddr`) for the other nodes.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use super::snapshot::{IPIP_TUNNEL_ADDR, VXLAN_TUNNEL_ADDR};
use crate::ipam::pools::Family;
use crate::ipam::{Ipam, IpamError, TunnelKind};

/// A failed or unconfirmed annotation is written again after this long.
const REWRITE_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("allocating the {kind:?} tunnel address of node {node}: {source}")]
    Allocate {
        kind: TunnelKind,
        node: String,
        source: IpamError,
    },
    #[error("the API did not answer in time for the {kind:?} tunnel address")]
    TimedOut { kind: TunnelKind },
    #[error("releasing the unused {kind:?} tunnel address of node {node}: {source}")]
    Release {
        kind: TunnelKind,
        node: String,
        source: IpamError,
    },
    #[error("annotating Node {node} with {key}={value}: {source}")]
    Annotate {
        node: String,
        key: &'static str,
        value: String,
        source: Box<kube::Error>,
    },
}

pub fn annotation_key(kind: TunnelKind) -> &'static str {
    match kind {
        TunnelKind::Vxlan => VXLAN_TUNNEL_ADDR,
        TunnelKind::Ipip => IPIP_TUNNEL_ADDR,
    }
}

/// The address IPAM's view holds for this node's tunnel of `kind`, if any.
pub fn held(ipam: &Ipam, kind: TunnelKind) -> Option<Ipv4Addr> {
    ipam.addresses_of(&kind.handle(ipam.node()))
        .into_iter()
        .find_map(|a| match a {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
}

/// Remembers what was last written so the annotation is not patched on every pass while
/// the Node watch catches up.
pub struct Publisher {
    client: Client,
    node: String,
    last: [Option<(Ipv4Addr, Instant)>; 2],
}

impl Publisher {
    pub fn new(client: Client, node: &str) -> Publisher {
        Publisher {
            client,
            node: node.to_owned(),
            last: [None, None],
        }
    }

    /// Allocates the address when IPAM holds none yet, and annotates the Node when the
    /// `published` value (from the Node store) differs. Returns the address.
    pub async fn ensure(
        &mut self,
        ipam: &Ipam,
        kind: TunnelKind,
        published: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, TunnelError> {
        let addr = match held(ipam, kind) {
            Some(a) => a,
            None => {
                let net = ipam
                    .assign_tunnel_addr(kind, Family::V4)
                    .await
                    .map_err(|source| TunnelError::Allocate {
                        kind,
                        node: self.node.clone(),
                        source,
                    })?;
                tracing::info!(node = %self.node, ?kind, address = %net.addr(), "tunnel address allocated");
                match net.addr() {
                    IpAddr::V4(a) => a,
                    IpAddr::V6(_) => {
                        return Err(TunnelError::Allocate {
                            kind,
                            node: self.node.clone(),
                            source: IpamError::TooManyConflicts {
                                object: kind.handle(&self.node),
                            },
                        });
                    }
                }
            }
        };
        let slot = match kind {
            TunnelKind::Vxlan => 0,
            TunnelKind::Ipip => 1,
        };
        let recent =
            self.last[slot].is_some_and(|(a, at)| a == addr && at.elapsed() < REWRITE_AFTER);
        if published != Some(addr) && !recent {
            self.last[slot] = Some((addr, Instant::now()));
            self.annotate(annotation_key(kind), addr.to_string())
                .await?;
            tracing::info!(node = %self.node, key = annotation_key(kind), address = %addr, "tunnel address published");
        }
        Ok(addr)
    }

    /// No pool needs `kind` any more: releases the node's address of that kind and removes
    /// its Node annotation (`published`: the annotation is there now). True if it did either.
    pub async fn retire(
        &mut self,
        ipam: &Ipam,
        kind: TunnelKind,
        published: bool,
    ) -> Result<bool, TunnelError> {
        let mut did = false;
        if held(ipam, kind).is_some() {
            let released =
                ipam.release_tunnel_addr(kind)
                    .await
                    .map_err(|source| TunnelError::Release {
                        kind,
                        node: self.node.clone(),
                        source,
                    })?;
            tracing::info!(node = %self.node, ?kind, addresses = ?released, "tunnel address released: no pool needs it");
            did = true;
        }
        if published {
            self.patch_annotation(annotation_key(kind), serde_json::Value::Null, "(removed)")
                .await?;
            tracing::info!(node = %self.node, key = annotation_key(kind), "tunnel address annotation removed");
            did = true;
        }
        self.last[match kind {
            TunnelKind::Vxlan => 0,
            TunnelKind::Ipip => 1,
        }] = None;
        Ok(did)
    }

    async fn annotate(&self, key: &'static str, value: String) -> Result<(), TunnelError> {
        self.patch_annotation(key, serde_json::Value::String(value.clone()), &value)
            .await
    }

    /// A merge patch of one key (null removes it) leaves other annotations and writers alone.
    async fn patch_annotation(
        &self,
        key: &'static str,
        json_value: serde_json::Value,
        value: &str,
    ) -> Result<(), TunnelError> {
        let value = value.to_string();
        let api: Api<Node> = Api::all(self.client.clone());
        let patch = serde_json::json!({ "metadata": { "annotations": { key: json_value } } });
        api.patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| TunnelError::Annotate {
                node: self.node.clone(),
                key,
                value,
                source: Box::new(source),
            })?;
        Ok(())
    }
}
