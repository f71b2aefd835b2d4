//! DEL and GC: release by handle and remove the plumbing. DEL succeeds when anything is
//! already gone (namespace, veth, container, address); GC releases this node's pod
//! attachments the runtime no longer lists as valid.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{CniDaemon, HandlerError, require};
use crate::cni::install::NETWORK_NAME;
use crate::cni::invocation::{Command, PluginKind};
use crate::cni::plumbing::host_veth_name;
use crate::cni::protocol::Request;
use crate::ipam::pod_handle;

impl CniDaemon {
    pub(super) async fn del(
        &self,
        request: &Request,
        netns: Option<File>,
    ) -> Result<(), HandlerError> {
        let container = require(
            Command::Del,
            "CNI_CONTAINERID",
            request.container_id.as_deref(),
        )?;
        let ifname = request.ifname.as_deref().unwrap_or("eth0");
        // Never act on the host's own namespace, even to delete.
        let netns = self.pod_netns(container, request.netns.as_deref(), netns)?;
        let _serial = self.locks.lock(container).await;
        let handle = pod_handle(container);
        let mut addrs: BTreeSet<IpNet> = self
            .ipam
            .addresses_of(&handle)
            .into_iter()
            .map(IpNet::from)
            .collect();
        if let Some(prev) = &request.prev_result {
            addrs.extend(prev.ips.iter().map(|ip| IpNet::from(ip.address.addr())));
        }
        let addrs: Vec<IpNet> = addrs.into_iter().collect();
        let pod = request
            .args
            .k8s_pod_namespace
            .as_deref()
            .zip(request.args.k8s_pod_name.as_deref());
        // Without the pod's name only the pod side (and so the pair) can go.
        let host_ifname = pod
            .map(|(ns, name)| host_veth_name(ns, name))
            .unwrap_or_default();
        let main = request.kind == PluginKind::Main;
        if let (Some(registry), Some((ns, name))) = (&self.endpoints, pod) {
            registry.remove(ns, name, container);
        }
        // Routes first: once nothing routes to the addresses they may be released while the
        // kernel takes its time removing the veth pair.
        let started = std::time::Instant::now();
        let ms = |since: std::time::Instant| since.elapsed().as_secs_f64() * 1000.0;
        let unrouted = if main {
            Some(self.plumber.unroute(&host_ifname, &addrs).await?)
        } else {
            None
        };
        let links = async {
            match unrouted {
                Some(u) => {
                    let done = self
                        .plumber
                        .remove_links(u, netns.as_ref(), ifname, &host_ifname)
                        .await?;
                    tracing::debug!(container, ?done, links_ms = ms(started), "plumbing removed");
                    Ok::<(), HandlerError>(())
                }
                None => Ok(()),
            }
        };
        let clear = async {
            let r = match pod {
                Some((ns, name)) => self.pods.clear_ips(ns, name, container).await,
                None => Ok(false),
            };
            tracing::debug!(container, clear_ms = ms(started), "annotations handled");
            r
        };
        let release = async {
            let r = self.ipam.release_by_handle_deferred(&handle).await;
            tracing::debug!(container, release_ms = ms(started), "IPAM release done");
            r
        };
        let (removed, cleared, released) = tokio::join!(links, clear, release);
        removed?;
        let released = released?;
        // The addresses are what matters; stale annotations only mislead readers until
        // the next ADD, so an API hiccup here does not fail the DEL.
        if let Err(e) = cleared {
            tracing::warn!(container, error = %e, "could not blank the pod's IP annotations");
        }
        tracing::debug!(container, released = released.len(), "addresses released");
        Ok(())
    }

    pub(super) async fn gc(&self, request: &Request) -> Result<(), HandlerError> {
        let valid: BTreeSet<&str> = request
            .valid_attachments
            .iter()
            .map(|a| a.container_id.as_str())
            .collect();
        let prefix = format!("{NETWORK_NAME}.");
        let node = self.settings.node.as_str();
        // Handles of pod addresses recorded for this node, with their addresses.
        let candidates: Vec<(String, Vec<IpAddr>)> = self.ipam.with_view(|v| {
            let mut out: std::collections::BTreeMap<String, Vec<IpAddr>> = Default::default();
            for cached in v.blocks.values() {
                let b = &cached.block;
                for (ord, a) in b.allocations.iter().enumerate() {
                    let Some(attr) = a.and_then(|i| b.attributes.get(i)) else {
                        continue;
                    };
                    let Some(h) = attr.handle_id.as_deref() else {
                        continue;
                    };
                    let Some(container) = h.strip_prefix(&prefix) else {
                        continue;
                    };
                    if attr
                        .secondary
                        .get(crate::api::vocab::ATTR_NODE)
                        .map(String::as_str)
                        != Some(node)
                        || valid.contains(container)
                    {
                        continue;
                    }
                    if let Some(addr) = crate::ipam::cidr::addr_at(&b.cidr, ord) {
                        out.entry(h.to_string()).or_default().push(addr);
                    }
                }
            }
            out.into_iter().collect()
        });
        for (handle, addrs) in candidates {
            let container = handle.strip_prefix(&prefix).unwrap_or(&handle).to_string();
            let _serial = self.locks.lock(&container).await;
            let nets: Vec<IpNet> = addrs.iter().copied().map(IpNet::from).collect();
            let removed = self.plumber.remove_host_side(&nets).await?;
            if let Some(registry) = &self.endpoints {
                registry.forget_container(&container);
            }
            let released = self.ipam.release_by_handle(&handle).await?;
            tracing::info!(handle, released = ?released, veths = removed, "GC released a stale attachment");
        }
        Ok(())
    }
}
