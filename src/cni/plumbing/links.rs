//! Small netlink reads and idempotent deletes the plumbing shares: find a link, read its MAC,
//! MTU and state, list its addresses, find routes to one prefix. Absence is `None`, never an
//! error, so DEL and CHECK can tell "missing" from "failed".

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteVia,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::PlumbingError;

pub(crate) fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().abs()),
        _ => None,
    }
}

pub(crate) async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, PlumbingError> {
    match handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(PlumbingError::netlink(format!("look up link {name}"), e)),
    }
}

pub(crate) async fn link_by_index(
    handle: &Handle,
    index: u32,
) -> Result<Option<LinkMessage>, PlumbingError> {
    match handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(PlumbingError::netlink(format!("look up link #{index}"), e)),
    }
}

/// Deletes a link by index; true if it was there.
pub(crate) async fn delete_link(
    handle: &Handle,
    index: u32,
    name: &str,
) -> Result<bool, PlumbingError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(PlumbingError::netlink(format!("delete link {name}"), e)),
    }
}

pub(crate) fn mac_of(link: &LinkMessage) -> Option<Vec<u8>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.clone()),
        _ => None,
    })
}

pub(crate) fn mtu_of(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

pub(crate) fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

pub(crate) fn name_of(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// Addresses (with prefix length) on link `index`.
pub(crate) async fn addresses_of(handle: &Handle, index: u32) -> Result<Vec<IpNet>, PlumbingError> {
    let _turn = DUMPS.lock().await;
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| PlumbingError::netlink(format!("list addresses of link #{index}"), e))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.index == index)
        .filter_map(|m| {
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })?;
            IpNet::new(addr, m.header.prefix_len).ok()
        })
        .collect())
}

/// A route as the plumbing compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteView {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub protocol: RouteProtocol,
    pub table: u32,
    pub message: RouteMessage,
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn view(msg: RouteMessage) -> Option<RouteView> {
    let family = msg.header.address_family;
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    let mut table = u32::from(msg.header.table);
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_addr(d),
            RouteAttribute::Gateway(g) => gateway = route_addr(g),
            RouteAttribute::Via(RouteVia::Inet6(v6)) => gateway = Some(IpAddr::V6(*v6)),
            RouteAttribute::Via(RouteVia::Inet(v4)) => gateway = Some(IpAddr::V4(*v4)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let dst = match (dst, family) {
        (Some(d), _) => d,
        (None, AddressFamily::Inet) => IpAddr::from([0u8; 4]),
        (None, AddressFamily::Inet6) => IpAddr::from([0u16; 8]),
        _ => return None,
    };
    let dst = IpNet::new(dst, msg.header.destination_prefix_length).ok()?;
    Some(RouteView {
        dst,
        gateway,
        oif,
        protocol: msg.header.protocol,
        table,
        message: msg,
    })
}

/// The kernel runs one dump at a time per netlink socket and answers a second with EBUSY;
/// concurrent CNI requests share the host socket, so dumps take turns.
static DUMPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every route of `family` in the namespace of `handle` (all tables).
pub(crate) async fn routes(handle: &Handle, v6: bool) -> Result<Vec<RouteView>, PlumbingError> {
    let _turn = DUMPS.lock().await;
    let query = if v6 {
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
    };
    let msgs: Vec<RouteMessage> = handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(|e| {
            PlumbingError::netlink(format!("dump IPv{} routes", if v6 { 6 } else { 4 }), e)
        })?;
    Ok(msgs.into_iter().filter_map(view).collect())
}

/// Routes in the main table whose destination is exactly `dst`.
pub(crate) async fn routes_to(
    handle: &Handle,
    dst: IpNet,
) -> Result<Vec<RouteView>, PlumbingError> {
    Ok(routes(handle, dst.addr().is_ipv6())
        .await?
        .into_iter()
        .filter(|r| {
            r.dst == dst
                && r.table == u32::from(netlink_packet_route::route::RouteHeader::RT_TABLE_MAIN)
        })
        .collect())
}
