//! IPv4 routes tagged with tortie's protocol (80) in the tables tortie programs. Routes with
//! any other protocol are never changed, even when they sit on a prefix tortie wants: that
//! is reported as a conflict instead.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use futures::future::Either;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::warn;

use super::error::errno;
use super::links::{self, Devices};
use super::{DataplaneError, Stats, batch};
use crate::desired::diff;
use crate::desired::{
    DesiredDataplane, DeviceRef, MAIN_TABLE, ROUTE_PROTOCOL, RouteKey, RouteTarget,
};

/// What the kernel holds in the tables of interest.
struct KernelRoutes {
    /// tortie's routes, one per key, in the canonical shape (tos 0, metric 0).
    owned: BTreeMap<RouteKey, (RouteTarget, RouteMessage)>,
    /// tortie's routes that duplicate a key or carry a tos/metric tortie never writes.
    extras: Vec<RouteMessage>,
    /// Keys held by routes of other protocols.
    foreign: BTreeSet<RouteKey>,
}

pub async fn reconcile(
    handle: &Handle,
    desired: &DesiredDataplane,
) -> Result<Stats, DataplaneError> {
    let devices = links::resolve_devices(handle, desired.parent_ip).await?;
    let mut tables: BTreeSet<u32> = desired.routes.keys().map(|k| k.table).collect();
    tables.insert(MAIN_TABLE);
    let kernel = dump(handle, &tables, &devices).await?;

    let mut stats = Stats::default();
    let mut wanted = BTreeMap::new();
    for (key, route) in &desired.routes {
        if let RouteTarget::Via { device, .. } = route.target
            && resolve(&devices, device).is_none()
        {
            stats.skipped += 1;
            continue;
        }
        if kernel.foreign.contains(key) {
            stats.conflicts += 1;
            warn!(route = %key, wanted = %route.target, "prefix held by a route of another protocol: left alone");
            continue;
        }
        wanted.insert(*key, route.target.clone());
    }
    let actual: BTreeMap<RouteKey, RouteTarget> = kernel
        .owned
        .iter()
        .map(|(k, (t, _))| (*k, t.clone()))
        .collect();
    let changes = diff(&wanted, &actual);

    let mut requests = Vec::new();
    for (key, target) in &changes.add {
        let msg = build(key, target, &devices);
        let req = handle.route().add(msg);
        let (key, target) = (*key, target.clone());
        requests.push(Either::Left(Either::Left(async move {
            match req.execute().await {
                Ok(()) => Ok(true),
                // Someone else's route appeared since the dump: theirs stays.
                Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
                Err(e) => Err(DataplaneError::netlink(
                    format!("add route {key} {target}"),
                    e,
                )),
            }
        })));
    }
    for (key, target) in &changes.replace {
        let req = handle.route().add(build(key, target, &devices)).replace();
        let (key, target) = (*key, target.clone());
        requests.push(Either::Left(Either::Right(async move {
            req.execute()
                .await
                .map(|()| true)
                .map_err(|e| DataplaneError::netlink(format!("replace route {key} {target}"), e))
        })));
    }
    let deletes = changes
        .delete
        .iter()
        .filter_map(|k| kernel.owned.get(k).map(|(_, m)| m.clone()))
        .chain(kernel.extras.iter().cloned());
    for msg in deletes {
        let what = describe(&msg);
        let req = handle.route().del(msg);
        requests.push(Either::Right(async move {
            req.execute()
                .await
                .map(|()| true)
                .map_err(|e| DataplaneError::netlink(format!("delete route {what}"), e))
        }));
    }
    let added_conflicts = run_counting(requests).await?;
    stats.added = changes.add.len() - added_conflicts;
    stats.conflicts += added_conflicts;
    stats.replaced = changes.replace.len();
    stats.deleted = changes.delete.len() + kernel.extras.len();
    Ok(stats)
}

/// Runs the batch; returns how many adds lost to a foreign route (returned `false`).
async fn run_counting<F>(requests: Vec<F>) -> Result<usize, DataplaneError>
where
    F: Future<Output = Result<bool, DataplaneError>>,
{
    let lost = std::sync::atomic::AtomicUsize::new(0);
    let wrapped = requests
        .into_iter()
        .map(|f| async {
            if !f.await? {
                lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        })
        .collect();
    batch::run("route", wrapped).await?;
    Ok(lost.into_inner())
}

fn resolve(devices: &Devices, device: DeviceRef) -> Option<u32> {
    match device {
        DeviceRef::Vxlan => devices.vxlan,
        DeviceRef::Ipip => devices.ipip,
        DeviceRef::Parent => devices.parent,
    }
}

fn build(key: &RouteKey, target: &RouteTarget, devices: &Devices) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(key.dst.addr(), key.dst.prefix_len())
        .table_id(key.table)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
    match target {
        RouteTarget::Blackhole => b = b.kind(RouteType::BlackHole),
        RouteTarget::Via {
            gateway,
            device,
            onlink,
        } => {
            b = b.gateway(*gateway);
            if let Some(index) = resolve(devices, *device) {
                b = b.output_interface(index);
            }
            if *onlink {
                b = b.onlink();
            }
        }
        // Never wanted, so never built; a plain message keeps this total.
        RouteTarget::Unrecognised(_) => {}
    }
    b.build()
}

async fn dump(
    handle: &Handle,
    tables: &BTreeSet<u32>,
    devices: &Devices,
) -> Result<KernelRoutes, DataplaneError> {
    let msgs: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| DataplaneError::netlink("dump IPv4 routes", e))?;
    let mut kernel = KernelRoutes {
        owned: BTreeMap::new(),
        extras: Vec::new(),
        foreign: BTreeSet::new(),
    };
    for msg in msgs {
        if msg.header.address_family != AddressFamily::Inet {
            continue;
        }
        let table = table_of(&msg);
        if !tables.contains(&table) {
            continue;
        }
        let Some(dst) = destination(&msg) else {
            continue;
        };
        if is_workload_route(&msg) {
            continue;
        }
        let key = RouteKey { dst, table };
        let canonical = msg.header.tos == 0 && priority(&msg) == 0;
        if msg.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
            if canonical && !kernel.owned.contains_key(&key) {
                let target = parse_target(&msg, devices);
                kernel.owned.insert(key, (target, msg));
            } else {
                kernel.extras.push(msg);
            }
        } else if canonical {
            kernel.foreign.insert(key);
        }
    }
    Ok(kernel)
}

/// A pod's host route (`<ip>/32 dev cali… proto 80`, no gateway) belongs to the CNI's
/// plumbing, which adds and removes it with the pod. The overlay never makes a gateway-less
/// unicast route, so it neither wants nor removes these.
fn is_workload_route(msg: &RouteMessage) -> bool {
    msg.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
        && msg.header.kind == RouteType::Unicast
        && !msg
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Gateway(_)))
        && msg
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Oif(_)))
}

fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn priority(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

fn destination(msg: &RouteMessage) -> Option<Ipv4Net> {
    let addr = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Ipv4Net::new(addr, msg.header.destination_prefix_length).ok()
}

fn parse_target(msg: &RouteMessage, devices: &Devices) -> RouteTarget {
    let mut gateway = None;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::MultiPath(_) => return RouteTarget::Unrecognised("multipath".into()),
            _ => {}
        }
    }
    match (msg.header.kind, gateway, oif) {
        (RouteType::BlackHole, None, None) => RouteTarget::Blackhole,
        (RouteType::Unicast, Some(gateway), Some(index)) => {
            let device = [
                (devices.vxlan, DeviceRef::Vxlan),
                (devices.ipip, DeviceRef::Ipip),
                (devices.parent, DeviceRef::Parent),
            ]
            .into_iter()
            .find(|(i, _)| *i == Some(index))
            .map(|(_, d)| d);
            match device {
                Some(device) => RouteTarget::Via {
                    gateway,
                    device,
                    onlink: msg.header.flags.contains(RouteFlags::Onlink),
                },
                None => RouteTarget::Unrecognised(format!("via {gateway} dev #{index}")),
            }
        }
        (kind, gateway, oif) => {
            RouteTarget::Unrecognised(format!("{kind:?} gw {gateway:?} oif {oif:?}"))
        }
    }
}

fn describe(msg: &RouteMessage) -> String {
    let dst = destination(msg).map_or_else(|| "?".to_string(), |d| d.to_string());
    format!(
        "{dst} table {} ({})",
        table_of(msg),
        parse_target(msg, &Devices::default())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Devices {
        Devices {
            vxlan: Some(7),
            ipip: None,
            parent: Some(2),
        }
    }

    fn key(dst: &str, table: u32) -> RouteKey {
        RouteKey {
            dst: dst.parse().unwrap(),
            table,
        }
    }

    #[test]
    fn built_messages_read_back_as_the_target_they_were_built_from() {
        let targets = [
            RouteTarget::Blackhole,
            RouteTarget::Via {
                gateway: "10.244.2.0".parse().unwrap(),
                device: DeviceRef::Vxlan,
                onlink: true,
            },
            RouteTarget::Via {
                gateway: "198.18.0.2".parse().unwrap(),
                device: DeviceRef::Parent,
                onlink: true,
            },
        ];
        for table in [MAIN_TABLE, 1000] {
            for target in &targets {
                let k = key("10.244.2.0/26", table);
                let msg = build(&k, target, &devices());
                assert_eq!(msg.header.protocol, RouteProtocol::Other(80));
                assert_eq!(destination(&msg), Some(k.dst));
                assert_eq!(table_of(&msg), table);
                assert_eq!(&parse_target(&msg, &devices()), target);
            }
        }
    }

    #[test]
    fn a_route_on_a_device_tortie_does_not_know_is_unrecognised() {
        let via = RouteTarget::Via {
            gateway: "10.244.2.0".parse().unwrap(),
            device: DeviceRef::Vxlan,
            onlink: true,
        };
        let msg = build(&key("10.244.2.0/26", MAIN_TABLE), &via, &devices());
        let other = Devices {
            vxlan: Some(99),
            ..devices()
        };
        assert!(matches!(
            parse_target(&msg, &other),
            RouteTarget::Unrecognised(_)
        ));
    }

    #[test]
    fn a_route_without_onlink_differs_from_the_wanted_onlink_route() {
        let via = |onlink| RouteTarget::Via {
            gateway: "10.244.2.0".parse().unwrap(),
            device: DeviceRef::Vxlan,
            onlink,
        };
        let msg = build(&key("10.244.2.0/26", MAIN_TABLE), &via(false), &devices());
        assert_ne!(parse_target(&msg, &devices()), via(true));
    }

    #[test]
    fn pod_host_routes_are_left_to_the_cni() {
        let pod_route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::new(10, 244, 0, 5), 32)
            .output_interface(9)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build();
        assert!(is_workload_route(&pod_route));
        let tunnel_route = build(
            &key("10.244.1.0/26", 254),
            &RouteTarget::Via {
                gateway: Ipv4Addr::new(10, 244, 1, 0),
                device: DeviceRef::Vxlan,
                onlink: true,
            },
            &devices(),
        );
        assert!(!is_workload_route(&tunnel_route));
        let blackhole = build(
            &key("10.244.0.0/26", 254),
            &RouteTarget::Blackhole,
            &devices(),
        );
        assert!(!is_workload_route(&blackhole));
    }

    #[test]
    fn default_route_has_a_zero_destination() {
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        msg.header.destination_prefix_length = 0;
        assert_eq!(destination(&msg), Some("0.0.0.0/0".parse().unwrap()));
    }
}
