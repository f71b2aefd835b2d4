//! The tunnel devices: `vxlan.calico` (created, repaired, recreated when an immutable
//! attribute drifted, deleted when unwanted) and `tunl0` (configured where the kernel has
//! IPIP). Also the link/address reads the other drivers use to resolve devices.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State,
};
use rtnetlink::{Handle, LinkIpIp, LinkUnspec, LinkVxlan};
use tracing::{info, warn};

use super::error::errno;
use super::{DataplaneError, Kernel, Stats, offload};
use crate::desired::{DesiredDataplane, IPIP_DEVICE, IpipDevice, Mac, VXLAN_DEVICE, VxlanDevice};

/// One link as read from the kernel, with the VXLAN attributes tortie cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLink {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub admin_up: bool,
    /// Operationally up (or "unknown" while admin up, as for tunnels without carrier).
    pub oper_up: bool,
    pub kind: Option<InfoKind>,
    pub mac: Option<Mac>,
    pub vxlan: Option<VxlanAttrs>,
}

/// The attributes that cannot change on a live VXLAN device (Felix's `vxlanLinksIncompat`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanAttrs {
    pub vni: Option<u32>,
    pub parent: Option<u32>,
    pub local: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub learning: Option<bool>,
}

/// Interfaces resolved for the roles routes refer to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Devices {
    pub vxlan: Option<u32>,
    pub ipip: Option<u32>,
    pub parent: Option<u32>,
}

pub async fn dump_links(handle: &Handle) -> Result<Vec<KernelLink>, DataplaneError> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| DataplaneError::netlink("dump links", e))?;
    Ok(msgs.iter().map(parse_link).collect())
}

fn parse_link(msg: &LinkMessage) -> KernelLink {
    let admin_up = msg.header.flags.contains(LinkFlags::Up);
    let mut link = KernelLink {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
        admin_up,
        oper_up: false,
        kind: None,
        mac: None,
        vxlan: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Address(a) => link.mac = Mac::from_slice(a),
            LinkAttribute::OperState(s) => {
                link.oper_up = *s == State::Up || (*s == State::Unknown && admin_up)
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => link.vxlan = Some(parse_vxlan(v)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn parse_vxlan(infos: &[InfoVxlan]) -> VxlanAttrs {
    let mut a = VxlanAttrs::default();
    for info in infos {
        match info {
            InfoVxlan::Id(v) => a.vni = Some(*v),
            InfoVxlan::Link(v) => a.parent = Some(*v),
            InfoVxlan::Local(v) => a.local = Some(*v),
            InfoVxlan::Port(v) => a.port = Some(*v),
            InfoVxlan::Learning(v) => a.learning = Some(*v),
            _ => {}
        }
    }
    a
}

async fn dump_v4_addresses(
    handle: &Handle,
) -> Result<Vec<(u32, Ipv4Addr, u8, AddressMessage)>, DataplaneError> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| DataplaneError::netlink("dump addresses", e))?;
    let mut out = Vec::new();
    for msg in msgs {
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p links).
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let addr = local.or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })
        });
        if let Some(ip) = addr {
            out.push((msg.header.index, ip, msg.header.prefix_len, msg));
        }
    }
    Ok(out)
}

/// The interface holding `ip`: VXLAN's parent and the way out for same-subnet routes.
pub async fn find_parent(handle: &Handle, ip: Ipv4Addr) -> Result<Option<u32>, DataplaneError> {
    Ok(dump_v4_addresses(handle)
        .await?
        .into_iter()
        .find(|(_, a, _, _)| *a == ip)
        .map(|(index, ..)| index))
}

pub async fn resolve_devices(
    handle: &Handle,
    parent_ip: Option<Ipv4Addr>,
) -> Result<Devices, DataplaneError> {
    let links = dump_links(handle).await?;
    let by_name = |n: &str| links.iter().find(|l| l.name == n).map(|l| l.index);
    let parent = match parent_ip {
        Some(ip) => find_parent(handle, ip).await?,
        None => None,
    };
    Ok(Devices {
        vxlan: by_name(VXLAN_DEVICE),
        ipip: by_name(IPIP_DEVICE),
        parent,
    })
}

/// Converges both tunnel devices. The VXLAN device is handled first, so a kernel without
/// IPIP still gets a working VXLAN overlay before the IPIP error is returned.
pub async fn reconcile(
    kernel: &Kernel,
    desired: &DesiredDataplane,
) -> Result<Stats, DataplaneError> {
    let mut stats = reconcile_vxlan(kernel, desired.vxlan.as_ref()).await?;
    stats += reconcile_ipip(&kernel.handle, desired.ipip.as_ref()).await?;
    Ok(stats)
}

pub async fn reconcile_vxlan(
    kernel: &Kernel,
    want: Option<&VxlanDevice>,
) -> Result<Stats, DataplaneError> {
    let handle = &kernel.handle;
    let mut stats = Stats::default();
    let links = dump_links(handle).await?;
    let existing = links.iter().find(|l| l.name == VXLAN_DEVICE);
    let Some(want) = want else {
        if let Some(link) = existing {
            delete_link(handle, link).await?;
            info!(device = VXLAN_DEVICE, "removed unwanted vxlan device");
            stats.deleted += 1;
        }
        return Ok(stats);
    };
    let parent = find_parent(handle, want.local_ip).await?.ok_or_else(|| {
        DataplaneError::ParentNotFound {
            ip: want.local_ip,
            device: want.name.clone(),
        }
    })?;

    let index = match existing {
        Some(link) if vxlan_compatible(link, want, parent) => {
            if link.mtu != want.mtu || !link.admin_up {
                let msg = LinkUnspec::new_with_index(link.index)
                    .mtu(want.mtu)
                    .up()
                    .build();
                handle.link().set(msg).execute().await.map_err(|e| {
                    DataplaneError::netlink(format!("set {} mtu {} up", want.name, want.mtu), e)
                })?;
                stats.replaced += 1;
            }
            link.index
        }
        Some(link) => {
            warn!(device = VXLAN_DEVICE, actual = ?link.vxlan, mac = ?link.mac, "vxlan device drifted in an immutable attribute: recreating");
            delete_link(handle, link).await?;
            stats.replaced += 1;
            create_vxlan(handle, want, parent).await?
        }
        None => {
            stats.added += 1;
            create_vxlan(handle, want, parent).await?
        }
    };
    stats += sync_addresses(handle, index, &want.name, Some(want.tunnel_addr)).await?;
    if sync_tx_checksum(kernel, want)? {
        stats.replaced += 1;
    }
    Ok(stats)
}

/// Returns whether it had to change the setting.
fn sync_tx_checksum(kernel: &Kernel, want: &VxlanDevice) -> Result<bool, DataplaneError> {
    let err = |action: &str, source| DataplaneError::Ethtool {
        device: want.name.clone(),
        action: action.to_string(),
        source,
    };
    let sock = kernel.ioctl_socket()?;
    let on =
        offload::tx_checksum(&sock, &want.name).map_err(|e| err("read tx checksum offload", e))?;
    if on == want.tx_checksum_offload {
        return Ok(false);
    }
    let action = if want.tx_checksum_offload {
        "turn tx checksum offload on"
    } else {
        "turn tx checksum offload off"
    };
    offload::set_tx_checksum(&sock, &want.name, want.tx_checksum_offload)
        .map_err(|e| err(action, e))?;
    info!(device = %want.name, offload = want.tx_checksum_offload, "set tx checksum offload");
    Ok(true)
}

fn vxlan_compatible(link: &KernelLink, want: &VxlanDevice, parent: u32) -> bool {
    let Some(v) = &link.vxlan else {
        return false; // not a vxlan device at all
    };
    link.kind == Some(InfoKind::Vxlan)
        && v.vni == Some(want.vni)
        && v.parent == Some(parent)
        && v.local == Some(want.local_ip)
        && v.port == Some(want.port)
        && v.learning == Some(false)
        && link.mac == Some(want.mac)
}

async fn create_vxlan(
    handle: &Handle,
    want: &VxlanDevice,
    parent: u32,
) -> Result<u32, DataplaneError> {
    let msg = LinkVxlan::new(&want.name, want.vni)
        .port(want.port)
        .local(want.local_ip)
        // `.dev()` sets IFLA_VXLAN_LINK; the generic `.link()` does not work for VXLAN.
        .dev(parent)
        .learning(false)
        .mtu(want.mtu)
        .address(want.mac.0.to_vec())
        .up()
        .build();
    handle.link().add(msg).execute().await.map_err(|e| {
        DataplaneError::netlink(
            format!(
                "create {} (vni {} port {} local {} mac {})",
                want.name, want.vni, want.port, want.local_ip, want.mac
            ),
            e,
        )
    })?;
    info!(device = %want.name, vni = want.vni, local = %want.local_ip, mac = %want.mac, mtu = want.mtu, "created vxlan device");
    link_index(handle, &want.name).await
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, DataplaneError> {
    dump_links(handle)
        .await?
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| l.index)
        .ok_or_else(|| DataplaneError::DeviceMissing {
            device: name.to_string(),
            what: "its addresses (it vanished right after creation)".into(),
        })
}

async fn delete_link(handle: &Handle, link: &KernelLink) -> Result<(), DataplaneError> {
    handle.link().del(link.index).execute().await.map_err(|e| {
        DataplaneError::netlink(format!("delete {} (index {})", link.name, link.index), e)
    })
}

/// Keeps exactly one IPv4 address on a tunnel device: the tunnel address as a /32.
async fn sync_addresses(
    handle: &Handle,
    index: u32,
    name: &str,
    want: Option<Ipv4Addr>,
) -> Result<Stats, DataplaneError> {
    let mut stats = Stats::default();
    let mut have_wanted = false;
    for (_, ip, prefix, msg) in dump_v4_addresses(handle)
        .await?
        .into_iter()
        .filter(|(i, ..)| *i == index)
    {
        if Some(ip) == want && prefix == 32 {
            have_wanted = true;
            continue;
        }
        handle.address().del(msg).execute().await.map_err(|e| {
            DataplaneError::netlink(format!("remove address {ip}/{prefix} from {name}"), e)
        })?;
        stats.deleted += 1;
    }
    if let Some(ip) = want
        && !have_wanted
    {
        handle
            .address()
            .add(index, IpAddr::V4(ip), 32)
            .execute()
            .await
            .map_err(|e| DataplaneError::netlink(format!("add address {ip}/32 to {name}"), e))?;
        stats.added += 1;
    }
    Ok(stats)
}

/// `tunl0` is the kernel's fallback IPIP device: it appears when the `ipip` module loads and
/// cannot be deleted, so an unwanted tunl0 is left alone.
pub async fn reconcile_ipip(
    handle: &Handle,
    want: Option<&IpipDevice>,
) -> Result<Stats, DataplaneError> {
    let mut stats = Stats::default();
    let Some(want) = want else {
        return Ok(stats);
    };
    let links = dump_links(handle).await?;
    let link = match links.into_iter().find(|l| l.name == want.name) {
        Some(link) => link,
        None => {
            let msg = LinkIpIp::new(&want.name).mtu(want.mtu).up().build();
            match handle.link().add(msg).execute().await {
                Ok(()) => stats.added += 1,
                // EEXIST: adding probed the module, which created the fallback tunl0 itself.
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => {
                    return Err(DataplaneError::MissingKernelFeature {
                        feature: "IP-in-IP tunnels",
                        module: "ipip",
                        device: want.name.clone(),
                    });
                }
                Err(e) => return Err(DataplaneError::netlink(format!("create {}", want.name), e)),
            }
            dump_links(handle)
                .await?
                .into_iter()
                .find(|l| l.name == want.name)
                .ok_or_else(|| DataplaneError::DeviceMissing {
                    device: want.name.clone(),
                    what: "its MTU and address (absent after creation)".into(),
                })?
        }
    };
    if link.mtu != want.mtu || !link.admin_up {
        let msg = LinkUnspec::new_with_index(link.index)
            .mtu(want.mtu)
            .up()
            .build();
        handle.link().set(msg).execute().await.map_err(|e| {
            DataplaneError::netlink(format!("set {} mtu {} up", want.name, want.mtu), e)
        })?;
        stats.replaced += 1;
    }
    if want.tunnel_addr.is_some() {
        stats += sync_addresses(handle, link.index, &want.name, want.tunnel_addr).await?;
    }
    Ok(stats)
}
