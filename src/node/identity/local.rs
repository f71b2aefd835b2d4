//! The I/O side of autodetection, always in the network namespace of the calling thread:
//! interfaces and addresses over rtnetlink, and the kernel's source-address choice for
//! `can-reach` (a UDP connect sends no packet).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use futures::TryStreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

use super::{Family, IdentityError, Interface, Method, NodeAddress, choose};

/// Calico dials port 80; any port gives the same route lookup.
const REACH_PORT: u16 = 80;

/// Runs `method` for `family`. `node` is needed only by `kubernetes-internal-ip`.
pub async fn detect(
    method: &Method,
    family: Family,
    node: Option<&Node>,
) -> Result<NodeAddress, IdentityError> {
    let anchor = match method {
        Method::CanReach(target) => Some(source_address_towards(target, family).await?),
        Method::KubernetesInternalIp => Some(internal_ip(node, family)?),
        _ => None,
    };
    let interfaces = list_interfaces().await?;
    choose(method, family, &interfaces, anchor)
}

/// Every interface with its addresses, read over a fresh rtnetlink socket.
pub async fn list_interfaces() -> Result<Vec<Interface>, IdentityError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| IdentityError::Netlink {
        action: "open rtnetlink socket",
        reason: e.to_string(),
    })?;
    let task = tokio::spawn(conn);
    let links: Result<Vec<LinkMessage>, _> = handle.link().get().execute().try_collect().await;
    let addrs: Result<Vec<AddressMessage>, _> =
        handle.address().get().execute().try_collect().await;
    drop(handle);
    task.abort();
    let netlink = |action| {
        move |e: rtnetlink::Error| IdentityError::Netlink {
            action,
            reason: e.to_string(),
        }
    };
    let links = links.map_err(netlink("dump links"))?;
    let addrs = addrs.map_err(netlink("dump addresses"))?;

    let mut by_index: BTreeMap<u32, Interface> = BTreeMap::new();
    for link in &links {
        let name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        by_index.insert(
            link.header.index,
            Interface {
                index: link.header.index,
                name: name.unwrap_or_default(),
                up: link.header.flags.contains(LinkFlags::Up),
                addresses: Vec::new(),
            },
        );
    }
    for msg in &addrs {
        if let (Some(iface), Some(ip)) = (by_index.get_mut(&msg.header.index), own_address(msg))
            && let Ok(net) = IpNet::new(ip, msg.header.prefix_len)
        {
            iface.addresses.push(net);
        }
    }
    Ok(by_index.into_values().collect())
}

/// IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on point-to-point
/// links); IPv6 carries only IFA_ADDRESS.
fn own_address(msg: &AddressMessage) -> Option<IpAddr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

/// The source address the kernel would use towards `target` (an IP, `[v6]`, or a host
/// name resolved to `family`).
pub async fn source_address_towards(target: &str, family: Family) -> Result<IpAddr, IdentityError> {
    let unreachable = |reason: String| IdentityError::Unreachable {
        target: target.to_owned(),
        reason,
    };
    let bare = target.trim_start_matches('[').trim_end_matches(']');
    let dest = match bare.parse::<IpAddr>() {
        Ok(ip) if Family::of(&ip) == family => ip,
        Ok(ip) => return Err(unreachable(format!("{ip} is not an {family} address"))),
        Err(_) => tokio::net::lookup_host((bare, REACH_PORT))
            .await
            .map_err(|e| unreachable(format!("resolving host name: {e}")))?
            .map(|sa| sa.ip())
            .find(|ip| Family::of(ip) == family)
            .ok_or_else(|| unreachable(format!("host name has no {family} address")))?,
    };
    let any: IpAddr = match family {
        Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
        Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0))
        .map_err(|e| unreachable(format!("opening a UDP socket: {e}")))?;
    socket
        .connect(SocketAddr::new(dest, REACH_PORT))
        .map_err(|e| unreachable(format!("no route to {dest}: {e}")))?;
    let local = socket
        .local_addr()
        .map_err(|e| unreachable(format!("reading the local address: {e}")))?;
    Ok(local.ip())
}

/// The first InternalIP of `family` in the Node's status.addresses.
fn internal_ip(node: Option<&Node>, family: Family) -> Result<IpAddr, IdentityError> {
    let name = node
        .and_then(|n| n.metadata.name.clone())
        .unwrap_or_else(|| "<not read>".to_owned());
    node.and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .find(|ip| Family::of(ip) == family)
        .ok_or(IdentityError::NoInternalIp { node: name, family })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress as K8sAddress, NodeStatus};

    use super::*;

    fn node(addresses: &[(&str, &str)]) -> Node {
        Node {
            metadata: kube::api::ObjectMeta {
                name: Some("node-a".into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| K8sAddress {
                            type_: (*t).into(),
                            address: (*a).into(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn internal_ip_is_the_first_of_the_family() {
        let n = node(&[
            ("Hostname", "node-a"),
            ("ExternalIP", "1.2.3.4"),
            ("InternalIP", "fd00::7"),
            ("InternalIP", "10.0.0.7"),
        ]);
        assert_eq!(
            internal_ip(Some(&n), Family::V4).unwrap().to_string(),
            "10.0.0.7"
        );
        assert_eq!(
            internal_ip(Some(&n), Family::V6).unwrap().to_string(),
            "fd00::7"
        );
        let err = internal_ip(Some(&node(&[("ExternalIP", "1.2.3.4")])), Family::V4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"node-a\" has no IPv4 InternalIP"), "{err}");
    }
}
