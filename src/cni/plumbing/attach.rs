//! Attach and detach one pod: the veth pair (host side `cali…` with the fixed MAC, pod side
//! born directly in the pod namespace), host sysctls, pod addresses and routes, and the host
//! route tagged with tortie's protocol. A failed attach removes what it made.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use ipnet::IpNet;
use netlink_packet_route::address::AddressHeaderFlags;
use netlink_packet_route::link::{InfoData, InfoVeth};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::links::{self, errno};
use super::netns::{self, NsNetlink};
use super::{
    Attached, Detached, GATEWAY_V4, HOST_MAC, Plumber, PlumbingError, PodNetwork, format_mac,
};
use crate::desired::ROUTE_PROTOCOL;

/// A pod's veth pair made and up, before it has addresses: what ADD builds while IPAM is
/// still writing. `address` finishes it, `abandon` removes it.
pub struct Prepared {
    host_ifname: String,
    pod_ifname: String,
    host_index: u32,
    pod_index: u32,
    pod_mac: String,
    v4: bool,
    v6: bool,
    pod: NsNetlink,
}

impl Plumber {
    /// Builds the attachment described by `net` into the pod namespace `pod_ns`. On error
    /// the veth pair is gone again (and with it the host routes that used it).
    pub async fn attach(&self, pod_ns: &File, net: &PodNetwork) -> Result<Attached, PlumbingError> {
        let prepared = self
            .prepare(
                pod_ns,
                &net.host_ifname,
                &net.pod_ifname,
                net.mtu,
                net.has_v4(),
                net.has_v6(),
            )
            .await?;
        self.address(prepared, &net.addrs).await
    }

    /// First half of attach, which needs no address: the veth pair (pod side born in the
    /// pod namespace), host sysctls for the families `v4`/`v6`, both sides up. On error the
    /// pair is gone again.
    pub async fn prepare(
        &self,
        pod_ns: &File,
        host_ifname: &str,
        pod_ifname: &str,
        mtu: u32,
        v4: bool,
        v6: bool,
    ) -> Result<Prepared, PlumbingError> {
        let host = self.host_handle();
        // A leftover of an earlier sandbox of the same pod holds the name (Calico does the same).
        if let Some(stale) = links::link_by_name(host, host_ifname).await? {
            tracing::info!(interface = %host_ifname, "removing a stale host veth");
            links::delete_link(host, stale.header.index, host_ifname).await?;
        }
        let peer = LinkUnspec::new_with_name(pod_ifname)
            .setns_by_fd(pod_ns.as_raw_fd())
            .mtu(mtu)
            .build();
        let veth = LinkVeth::new(host_ifname, pod_ifname)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .address(HOST_MAC.to_vec())
            .mtu(mtu)
            .build();
        match host.link().add(veth).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                // The host name was free a moment ago, so the pod side is what exists.
                return Err(PlumbingError::PodInterfaceExists {
                    ifname: pod_ifname.to_string(),
                });
            }
            Err(e) => {
                return Err(PlumbingError::netlink(
                    format!("create veth {host_ifname} <-> {pod_ifname}"),
                    e,
                ));
            }
        }
        let Some(link) = links::link_by_name(host, host_ifname).await? else {
            return Err(PlumbingError::Mismatch(format!(
                "host veth {host_ifname} vanished right after it was created"
            )));
        };
        let host_index = link.header.index;
        match self
            .bring_up(pod_ns, host_ifname, pod_ifname, host_index, v4, v6)
            .await
        {
            Ok(prepared) => Ok(prepared),
            Err(e) => {
                self.remove_pair(host_index, host_ifname).await;
                Err(e)
            }
        }
    }

    async fn bring_up(
        &self,
        pod_ns: &File,
        host_ifname: &str,
        pod_ifname: &str,
        host_index: u32,
        v4: bool,
        v6: bool,
    ) -> Result<Prepared, PlumbingError> {
        let host = self.host_handle();
        self.host_sysctls(host_ifname, v4, v6).await?;
        host.link()
            .set(LinkUnspec::new_with_index(host_index).up().build())
            .execute()
            .await
            .map_err(|e| PlumbingError::netlink(format!("set {host_ifname} up"), e))?;
        let pod = NsNetlink::open(pod_ns)
            .await
            .map_err(|e| PlumbingError::io("open netlink in the pod namespace", e))?;
        let (pod_index, pod_mac) = pod_link_up(&pod.handle, pod_ifname).await?;
        Ok(Prepared {
            host_ifname: host_ifname.to_string(),
            pod_ifname: pod_ifname.to_string(),
            host_index,
            pod_index,
            pod_mac,
            v4,
            v6,
            pod,
        })
    }

    async fn host_sysctls(
        &self,
        host_ifname: &str,
        v4: bool,
        v6: bool,
    ) -> Result<(), PlumbingError> {
        if !v4 && !v6 {
            return Ok(());
        }
        let sysctls = host_sysctls(host_ifname, v4, v6);
        netns::run_in(self.host_namespace(), move || {
            for (path, value) in &sysctls {
                netns::write_sysctl(path, value)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| PlumbingError::io(format!("host sysctls of {host_ifname}"), e))
    }

    /// Second half of attach: the pod's addresses, gateway and routes, and the host routes.
    /// On error the pair is gone again.
    pub async fn address(
        &self,
        prepared: Prepared,
        addrs: &[IpNet],
    ) -> Result<Attached, PlumbingError> {
        let (host_index, host_ifname) = (prepared.host_index, prepared.host_ifname.clone());
        match self.finish(prepared, addrs).await {
            Ok(attached) => Ok(attached),
            Err(e) => {
                self.remove_pair(host_index, &host_ifname).await;
                Err(e)
            }
        }
    }

    async fn finish(&self, p: Prepared, addrs: &[IpNet]) -> Result<Attached, PlumbingError> {
        let net = PodNetwork {
            host_ifname: p.host_ifname.clone(),
            pod_ifname: p.pod_ifname.clone(),
            addrs: addrs.to_vec(),
            mtu: 0,
        };
        // A family IPAM gave that the preparation did not expect still gets its settings.
        let (late_v4, late_v6) = (net.has_v4() && !p.v4, net.has_v6() && !p.v6);
        self.host_sysctls(&p.host_ifname, late_v4, late_v6).await?;
        configure_pod(&p.pod.handle, &net, p.pod_index).await?;
        let host = self.host_handle();
        for addr in addrs {
            add_host_route(host, *addr, p.host_index, &p.host_ifname).await?;
        }
        Ok(Attached {
            host_mac: format_mac(&HOST_MAC),
            pod_mac: p.pod_mac,
            host_index: p.host_index,
            pod_index: p.pod_index,
        })
    }

    /// Undoes `prepare` when the ADD fails before addressing (IPAM refused).
    pub async fn abandon(&self, prepared: Prepared) {
        self.remove_pair(prepared.host_index, &prepared.host_ifname)
            .await;
    }

    /// The pair goes as one; the kernel drops the routes that used it.
    async fn remove_pair(&self, host_index: u32, host_ifname: &str) {
        if let Err(undo) = links::delete_link(self.host_handle(), host_index, host_ifname).await {
            tracing::warn!(interface = %host_ifname, error = %undo, "could not remove the veth of a failed attach");
        }
    }

    /// Removes an attachment; every part may already be gone. With the pod namespace the
    /// pod-side interface is deleted there (which takes the pair). Without it, the host veth
    /// named `host_ifname` is deleted only if a host route of `addrs` points at it, so a DEL
    /// for an old sandbox never cuts the veth of the pod's current one.
    pub async fn detach(
        &self,
        pod_ns: Option<&File>,
        pod_ifname: &str,
        host_ifname: &str,
        addrs: &[IpNet],
    ) -> Result<Detached, PlumbingError> {
        let unrouted = self.unroute(host_ifname, addrs).await?;
        self.remove_links(unrouted, pod_ns, pod_ifname, host_ifname)
            .await
    }

    /// Detach, first half: the host routes of `addrs` on `host_ifname` go, so nothing
    /// reaches the pod by its addresses any more (they may be released from here on).
    pub async fn unroute(
        &self,
        host_ifname: &str,
        addrs: &[IpNet],
    ) -> Result<Unrouted, PlumbingError> {
        let host = self.host_handle();
        // Routes die with their device, so only routes on this veth can exist; checking the
        // device also keeps a repeated DEL off an address that went to another pod since.
        // The delete names destination, device and protocol, so the kernel removes exactly
        // tortie's route on this veth (no dump: concurrent DELs share the host socket).
        let mut out = Unrouted {
            host_link: links::link_by_name(host, host_ifname).await?,
            ..Unrouted::default()
        };
        if let Some(link) = &out.host_link {
            for addr in addrs {
                let msg = host_route(*addr, link.header.index)?;
                match host.route().del(msg).execute().await {
                    Ok(()) => {
                        out.host_routes += 1;
                        out.owns_host_link = true;
                    }
                    Err(e) if errno(&e) == Some(libc::ESRCH) => {}
                    Err(e) => {
                        return Err(PlumbingError::netlink(
                            format!("delete host route {addr} dev {host_ifname}"),
                            e,
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Detach, second half: the veth pair. Slow (the kernel waits for an RCU grace period
    /// per device), which is why DEL runs it beside the address release.
    pub async fn remove_links(
        &self,
        unrouted: Unrouted,
        pod_ns: Option<&File>,
        pod_ifname: &str,
        host_ifname: &str,
    ) -> Result<Detached, PlumbingError> {
        let host = self.host_handle();
        let mut done = Detached {
            host_routes: unrouted.host_routes,
            ..Detached::default()
        };
        if let Some(ns) = pod_ns {
            let pod = NsNetlink::open(ns)
                .await
                .map_err(|e| PlumbingError::io("open netlink in the pod namespace", e))?;
            if let Some(link) = links::link_by_name(&pod.handle, pod_ifname).await? {
                done.pod_interface =
                    links::delete_link(&pod.handle, link.header.index, pod_ifname).await?;
            }
        }
        // Deleting the pod side took the pair already; otherwise the host side goes alone.
        let mut host_deleted = done.pod_interface;
        if unrouted.owns_host_link
            && !host_deleted
            && let Some(link) = unrouted.host_link
        {
            host_deleted = links::delete_link(host, link.header.index, host_ifname).await?;
        }
        done.host_interface = host_deleted;
        Ok(done)
    }
}

/// What the first half of a detach found and did.
#[derive(Debug, Default)]
pub struct Unrouted {
    host_link: Option<netlink_packet_route::link::LinkMessage>,
    /// A host route of the pod's addresses pointed at the host veth: it is this pod's.
    owns_host_link: bool,
    host_routes: usize,
}

/// Calico's host-side settings: answer ARP for the gateway, forward, no ARP delay; for IPv6
/// a link-local address usable at once (no DAD) and no router advertisements.
fn host_sysctls(ifname: &str, v4: bool, v6: bool) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    if v4 {
        let conf = format!("/proc/sys/net/ipv4/conf/{ifname}");
        out.push((format!("{conf}/proxy_arp"), "1"));
        out.push((format!("{conf}/forwarding"), "1"));
        out.push((format!("{conf}/route_localnet"), "1"));
        out.push((
            format!("/proc/sys/net/ipv4/neigh/{ifname}/proxy_delay"),
            "0",
        ));
    }
    if v6 {
        let conf = format!("/proc/sys/net/ipv6/conf/{ifname}");
        out.push((format!("{conf}/disable_ipv6"), "0"));
        out.push((format!("{conf}/accept_dad"), "0"));
        out.push((format!("{conf}/accept_ra"), "0"));
        out.push((format!("{conf}/forwarding"), "1"));
    }
    out
}

/// Pod side: up, addresses, the gateway neighbour and routes. Returns (index, MAC).
/// The pod side found and up: its index and MAC.
async fn pod_link_up(pod: &Handle, pod_ifname: &str) -> Result<(u32, String), PlumbingError> {
    let Some(link) = links::link_by_name(pod, pod_ifname).await? else {
        return Err(PlumbingError::PodInterfaceMissing {
            ifname: pod_ifname.to_string(),
        });
    };
    let index = link.header.index;
    let mac = links::mac_of(&link)
        .map(|m| format_mac(&m))
        .unwrap_or_default();
    pod.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| PlumbingError::netlink(format!("set pod {pod_ifname} up"), e))?;
    Ok((index, mac))
}

/// Addresses, the gateway neighbour and the routes inside the pod.
async fn configure_pod(pod: &Handle, net: &PodNetwork, index: u32) -> Result<(), PlumbingError> {
    for addr in &net.addrs {
        let mut req = pod.address().add(index, addr.addr(), addr.prefix_len());
        if addr.addr().is_ipv6() {
            // Usable at once: the /128 is unique by IPAM, DAD would only delay the pod.
            req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        req.execute().await.map_err(|e| {
            PlumbingError::netlink(format!("add address {addr} to pod {}", net.pod_ifname), e)
        })?;
    }
    if net.has_v4() {
        // The gateway never holds an address: proxy ARP answers for it, and a permanent
        // neighbour spares the pod that first ARP round trip.
        pod.neighbours()
            .add(index, IpAddr::V4(GATEWAY_V4))
            .link_layer_address(&HOST_MAC)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| PlumbingError::netlink("add the gateway neighbour in the pod", e))?;
        let scope_link = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(GATEWAY_V4, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Boot)
            .build();
        pod.route()
            .add(scope_link)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                PlumbingError::netlink(format!("add route {GATEWAY_V4}/32 in the pod"), e)
            })?;
    }
    for gateway in gateways(net) {
        let msg = default_route(gateway, index)?;
        pod.route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                PlumbingError::netlink(format!("add default route via {gateway} in the pod"), e)
            })?;
    }
    Ok(())
}

fn gateways(net: &PodNetwork) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = net
        .addrs
        .iter()
        .map(|a| PodNetwork::gateway_for(a.addr()))
        .collect();
    out.dedup();
    out
}

fn default_route(
    gateway: IpAddr,
    index: u32,
) -> Result<netlink_packet_route::route::RouteMessage, PlumbingError> {
    let any = match gateway {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u16; 8]),
    };
    let builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(any, 0)
        .and_then(|b| b.gateway(gateway))
        .map_err(|e| PlumbingError::Mismatch(format!("default route via {gateway}: {e}")))?;
    Ok(builder
        .output_interface(index)
        .onlink()
        .protocol(RouteProtocol::Boot)
        .build())
}

/// tortie's host route to a pod address: `<addr> dev cali… scope link proto 80`.
fn host_route(
    addr: IpNet,
    host_index: u32,
) -> Result<netlink_packet_route::route::RouteMessage, PlumbingError> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(addr.addr(), addr.prefix_len())
        .map_err(|e| PlumbingError::Mismatch(format!("host route {addr}: {e}")))?
        .output_interface(host_index)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build())
}

async fn add_host_route(
    host: &Handle,
    addr: IpNet,
    host_index: u32,
    host_ifname: &str,
) -> Result<(), PlumbingError> {
    let msg = host_route(addr, host_index)?;
    match host.route().add(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => {
            let holders = links::routes_to(host, addr).await?;
            if holders.iter().any(|r| r.oif == Some(host_index)) {
                return Ok(());
            }
            let mut holder = String::from("unknown");
            if let Some(oif) = holders.iter().find_map(|r| r.oif)
                && let Some(link) = links::link_by_index(host, oif).await?
            {
                holder = links::name_of(&link).unwrap_or_else(|| format!("#{oif}"));
            }
            Err(PlumbingError::RouteHeld {
                dst: addr,
                holder,
                wanted: host_ifname.to_string(),
            })
        }
        Err(e) => Err(PlumbingError::netlink(
            format!("add host route {addr} dev {host_ifname}"),
            e,
        )),
    }
}

impl Plumber {
    /// GC: removes tortie's host routes to `addrs` and the `cali…` veths they point at,
    /// without knowing the pod. Returns how many veths went.
    pub async fn remove_host_side(&self, addrs: &[IpNet]) -> Result<usize, PlumbingError> {
        let host = self.host_handle();
        let mut removed = 0;
        for addr in addrs {
            for route in links::routes_to(host, *addr).await? {
                if route.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                    continue;
                }
                let Some(oif) = route.oif else { continue };
                let Some(link) = links::link_by_index(host, oif).await? else {
                    continue;
                };
                let name = links::name_of(&link).unwrap_or_default();
                if name.starts_with(super::HOST_IF_PREFIX)
                    && links::delete_link(host, oif, &name).await?
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}
