//! CHECK: compares the kernel with what attach makes for a `PodNetwork` and names the first
//! difference (missing interface, address, route, wrong MTU or MAC).

use std::fs::File;
use std::net::IpAddr;

use netlink_packet_route::route::RouteProtocol;

use super::links;
use super::netns::NsNetlink;
use super::{GATEWAY_V4, HOST_MAC, Plumber, PlumbingError, PodNetwork, format_mac};
use crate::desired::ROUTE_PROTOCOL;

fn mismatch(msg: String) -> PlumbingError {
    PlumbingError::Mismatch(msg)
}

impl Plumber {
    pub async fn check(&self, pod_ns: &File, net: &PodNetwork) -> Result<(), PlumbingError> {
        let host = self.host_handle();
        let Some(host_link) = links::link_by_name(host, &net.host_ifname).await? else {
            return Err(mismatch(format!(
                "host veth {} does not exist",
                net.host_ifname
            )));
        };
        if !links::is_up(&host_link) {
            return Err(mismatch(format!("host veth {} is down", net.host_ifname)));
        }
        let mac = links::mac_of(&host_link).unwrap_or_default();
        if mac != HOST_MAC {
            return Err(mismatch(format!(
                "host veth {} has MAC {}, expected {}",
                net.host_ifname,
                format_mac(&mac),
                format_mac(&HOST_MAC)
            )));
        }
        let host_index = host_link.header.index;
        for addr in &net.addrs {
            let routes = links::routes_to(host, *addr).await?;
            let ok = routes.iter().any(|r| {
                r.oif == Some(host_index) && r.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
            });
            if !ok {
                return Err(mismatch(format!(
                    "host route {addr} dev {} proto {ROUTE_PROTOCOL} is missing",
                    net.host_ifname
                )));
            }
        }

        let pod = NsNetlink::open(pod_ns)
            .await
            .map_err(|e| PlumbingError::io("open netlink in the pod namespace", e))?;
        let pod = &pod.handle;
        let Some(link) = links::link_by_name(pod, &net.pod_ifname).await? else {
            return Err(mismatch(format!(
                "interface {} does not exist in the pod's network namespace",
                net.pod_ifname
            )));
        };
        let index = link.header.index;
        if !links::is_up(&link) {
            return Err(mismatch(format!(
                "pod interface {} is down",
                net.pod_ifname
            )));
        }
        let mtu = links::mtu_of(&link);
        // 0: no MTU expected (the daemon's pod MTU is live; a pod keeps the one it got).
        if net.mtu != 0 && mtu != Some(net.mtu) {
            return Err(mismatch(format!(
                "pod interface {} has MTU {}, expected {}",
                net.pod_ifname,
                mtu.map_or("unknown".to_string(), |m| m.to_string()),
                net.mtu
            )));
        }
        let have = links::addresses_of(pod, index).await?;
        for addr in &net.addrs {
            if !have.contains(addr) {
                let list: Vec<String> = have.iter().map(ToString::to_string).collect();
                return Err(mismatch(format!(
                    "address {addr} is missing on pod interface {} (has: {})",
                    net.pod_ifname,
                    list.join(", ")
                )));
            }
        }
        for v6 in [false, true] {
            let wanted = net.addrs.iter().any(|a| a.addr().is_ipv6() == v6);
            if !wanted {
                continue;
            }
            let routes = links::routes(pod, v6).await?;
            let main = u32::from(netlink_packet_route::route::RouteHeader::RT_TABLE_MAIN);
            let gateway = if v6 {
                PodNetwork::gateway_for(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
            } else {
                IpAddr::V4(GATEWAY_V4)
            };
            let default_ok = routes.iter().any(|r| {
                r.table == main
                    && r.dst.prefix_len() == 0
                    && r.gateway == Some(gateway)
                    && r.oif == Some(index)
            });
            if !default_ok {
                return Err(mismatch(format!(
                    "default route via {gateway} dev {} is missing in the pod",
                    net.pod_ifname
                )));
            }
            if !v6 {
                let gw_ok = routes.iter().any(|r| {
                    r.table == main
                        && r.dst.addr() == IpAddr::V4(GATEWAY_V4)
                        && r.dst.prefix_len() == 32
                        && r.oif == Some(index)
                });
                if !gw_ok {
                    return Err(mismatch(format!(
                        "route {GATEWAY_V4}/32 dev {} scope link is missing in the pod",
                        net.pod_ifname
                    )));
                }
            }
        }
        Ok(())
    }
}

impl Plumber {
    /// What an existing attachment looks like, for answering a repeated ADD.
    pub async fn attached(
        &self,
        pod_ns: &File,
        net: &PodNetwork,
    ) -> Result<super::Attached, PlumbingError> {
        let host = self.host_handle();
        let Some(host_link) = links::link_by_name(host, &net.host_ifname).await? else {
            return Err(mismatch(format!(
                "host veth {} does not exist",
                net.host_ifname
            )));
        };
        let pod = NsNetlink::open(pod_ns)
            .await
            .map_err(|e| PlumbingError::io("open netlink in the pod namespace", e))?;
        let Some(link) = links::link_by_name(&pod.handle, &net.pod_ifname).await? else {
            return Err(mismatch(format!(
                "interface {} does not exist in the pod's network namespace",
                net.pod_ifname
            )));
        };
        Ok(super::Attached {
            host_mac: format_mac(&links::mac_of(&host_link).unwrap_or_default()),
            pod_mac: format_mac(&links::mac_of(&link).unwrap_or_default()),
            host_index: host_link.header.index,
            pod_index: link.header.index,
        })
    }
}
