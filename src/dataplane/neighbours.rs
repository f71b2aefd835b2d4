//! Per-remote-VTEP entries on `vxlan.calico`: the permanent neighbour (tunnel IP → VTEP MAC)
//! and the `self permanent` FDB entry (VTEP MAC → node IP). Every entry on that device is
//! tortie's; entries on other devices are never read for changes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};

use super::{DataplaneError, Stats, batch, links};
use crate::desired::diff;
use crate::desired::{DesiredDataplane, Mac, VXLAN_DEVICE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Neigh {
    mac: Option<Mac>,
    permanent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fdb {
    dst: Option<Ipv4Addr>,
    self_permanent: bool,
    /// More than one remote for this MAC: only a delete and re-add makes it exact.
    multiple: bool,
}

pub async fn reconcile(
    handle: &Handle,
    desired: &DesiredDataplane,
) -> Result<Stats, DataplaneError> {
    let mut stats = Stats::default();
    let vx = links::dump_links(handle)
        .await?
        .into_iter()
        .find(|l| l.name == VXLAN_DEVICE)
        .map(|l| l.index);
    let Some(vx) = vx else {
        // Entries die with the device; the links driver reports why it is missing.
        stats.skipped = desired.neighbours.len() + desired.fdb.len();
        return Ok(stats);
    };
    stats += reconcile_neighbours(handle, vx, &desired.neighbours).await?;
    stats += reconcile_fdb(handle, vx, &desired.fdb).await?;
    Ok(stats)
}

async fn reconcile_neighbours(
    handle: &Handle,
    vx: u32,
    wanted: &BTreeMap<Ipv4Addr, Mac>,
) -> Result<Stats, DataplaneError> {
    let msgs: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .map_err(|e| DataplaneError::netlink(format!("dump neighbours of {VXLAN_DEVICE}"), e))?;
    let mut actual = BTreeMap::new();
    for msg in msgs.iter().filter(|m| m.header.ifindex == vx) {
        // NOARP entries (multicast/broadcast) are the kernel's own bookkeeping.
        if msg.header.state == NeighbourState::Noarp {
            continue;
        }
        let mut ip = None;
        let mut mac = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
                NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_slice(b),
                _ => {}
            }
        }
        if let Some(ip) = ip {
            let permanent = msg.header.state == NeighbourState::Permanent;
            actual.insert(ip, Neigh { mac, permanent });
        }
    }
    let desired: BTreeMap<Ipv4Addr, Neigh> = wanted
        .iter()
        .map(|(ip, mac)| {
            (
                *ip,
                Neigh {
                    mac: Some(*mac),
                    permanent: true,
                },
            )
        })
        .collect();
    let changes = diff(&desired, &actual);
    let stats = Stats {
        added: changes.add.len(),
        replaced: changes.replace.len(),
        deleted: changes.delete.len(),
        ..Stats::default()
    };
    if changes.is_empty() {
        return Ok(stats);
    }
    let mut requests = Vec::new();
    for (ip, n) in changes.add.iter().chain(&changes.replace) {
        let (ip, mac) = (*ip, n.mac.unwrap_or(Mac([0; 6])));
        let req = handle
            .neighbours()
            .add(vx, IpAddr::V4(ip))
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace();
        requests.push(futures::future::Either::Left(async move {
            req.execute().await.map_err(|e| {
                DataplaneError::netlink(
                    format!("set neighbour {ip} lladdr {mac} dev {VXLAN_DEVICE}"),
                    e,
                )
            })
        }));
    }
    for ip in changes.delete {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = vx;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        let req = handle.neighbours().del(msg);
        requests.push(futures::future::Either::Right(async move {
            req.execute().await.map_err(|e| {
                DataplaneError::netlink(format!("delete neighbour {ip} dev {VXLAN_DEVICE}"), e)
            })
        }));
    }
    batch::run("neighbour", requests).await?;
    Ok(stats)
}

async fn reconcile_fdb(
    handle: &Handle,
    vx: u32,
    wanted: &BTreeMap<Mac, Ipv4Addr>,
) -> Result<Stats, DataplaneError> {
    let msgs: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(|e| DataplaneError::netlink(format!("dump fdb of {VXLAN_DEVICE}"), e))?;
    let mut actual: BTreeMap<Mac, Fdb> = BTreeMap::new();
    for msg in msgs.iter().filter(|m| m.header.ifindex == vx) {
        let mut mac = None;
        let mut dst = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_slice(b),
                // AF_BRIDGE dumps carry NDA_DST as raw bytes.
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(*a),
                _ => {}
            }
        }
        let Some(mac) = mac else { continue };
        let entry = Fdb {
            dst,
            self_permanent: msg.header.flags.contains(NeighbourFlags::Own)
                && msg.header.state == NeighbourState::Permanent,
            multiple: false,
        };
        actual
            .entry(mac)
            .and_modify(|e| e.multiple = true)
            .or_insert(entry);
    }
    let desired: BTreeMap<Mac, Fdb> = wanted
        .iter()
        .map(|(mac, ip)| {
            let entry = Fdb {
                dst: Some(*ip),
                self_permanent: true,
                multiple: false,
            };
            (*mac, entry)
        })
        .collect();
    let changes = diff(&desired, &actual);
    let stats = Stats {
        added: changes.add.len(),
        replaced: changes.replace.len(),
        deleted: changes.delete.len(),
        ..Stats::default()
    };
    if changes.is_empty() {
        return Ok(stats);
    }
    // Deleting without NDA_DST removes the whole entry, every remote included; entries with
    // several remotes are cleared this way before the wanted one is written.
    let mut deletes: Vec<Mac> = changes.delete.clone();
    deletes.extend(
        changes
            .replace
            .iter()
            .filter(|(m, _)| actual[m].multiple)
            .map(|(m, _)| *m),
    );
    let requests = deletes
        .into_iter()
        .map(|mac| {
            let mut msg = NeighbourMessage::default();
            msg.header.family = AddressFamily::Bridge;
            msg.header.ifindex = vx;
            msg.header.flags = NeighbourFlags::Own;
            msg.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
            let req = handle.neighbours().del(msg);
            async move {
                req.execute().await.map_err(|e| {
                    DataplaneError::netlink(format!("delete fdb {mac} dev {VXLAN_DEVICE}"), e)
                })
            }
        })
        .collect();
    batch::run("fdb", requests).await?;
    let requests = changes
        .add
        .iter()
        .chain(&changes.replace)
        .map(|(mac, want)| {
            let (mac, dst) = (*mac, want.dst.unwrap_or(Ipv4Addr::UNSPECIFIED));
            let req = handle
                .neighbours()
                .add_bridge(vx, &mac.0)
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .destination(IpAddr::V4(dst))
                .replace();
            async move {
                req.execute().await.map_err(|e| {
                    DataplaneError::netlink(
                        format!("set fdb {mac} dst {dst} dev {VXLAN_DEVICE} self permanent"),
                        e,
                    )
                })
            }
        })
        .collect();
    batch::run("fdb", requests).await?;
    Ok(stats)
}
