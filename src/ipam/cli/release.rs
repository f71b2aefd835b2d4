//! `tortie ipam release --ip X`: decides from a Snapshot whether the address may go (pure:
//! its pod must be gone, or `--force`), then releases exactly that address with CAS.

use std::net::IpAddr;

use ipnet::IpNet;

use super::snapshot::{ATTR_NAMESPACE, ATTR_POD, ATTR_POD_UID, ATTR_TYPE, Snapshot};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Release the address from `block`, expected to be held by `handle` (None: allocated
    /// to no handle, a `{}` attribute nobody can own).
    Release {
        block: IpNet,
        handle: Option<String>,
    },
    /// Its owner is alive; `--force` overrides.
    Refuse {
        reason: String,
    },
    NotAllocated,
    NotInAnyPool,
}

pub fn decide(snap: &Snapshot, ip: IpAddr, force: bool) -> Decision {
    let holders = snap.holders(ip);
    let Some(h) = holders.first() else {
        if let Some(block) = snap.ownerless_at(ip) {
            return Decision::Release {
                block,
                handle: None,
            };
        }
        return if snap.pool_of_addr(ip).is_some() {
            Decision::NotAllocated
        } else {
            Decision::NotInAnyPool
        };
    };
    let handle = h.attr.handle_id.clone().unwrap_or_default();
    let attrs = &h.attr.secondary;
    let alive = match (attrs.get(ATTR_NAMESPACE), attrs.get(ATTR_POD)) {
        (Some(ns), Some(pod)) => {
            let uid = snap
                .pods
                .as_ref()
                .and_then(|p| p.get(&(ns.clone(), pod.clone())));
            match (uid, attrs.get(ATTR_POD_UID)) {
                (Some(uid), Some(want)) if uid != want => None,
                (Some(_), _) => Some(format!("pod {ns}/{pod} still exists")),
                (None, _) => None,
            }
        }
        // Not a pod's address (tunnel, other owners): nothing tells us it is unused.
        _ => Some(format!(
            "it is a {} address, not a pod's",
            attrs.get(ATTR_TYPE).map_or("non-pod", String::as_str)
        )),
    };
    match alive {
        Some(reason) if !force => Decision::Refuse {
            reason: format!(
                "IP {ip} is held by handle {handle}: {reason}; use --force to release it anyway"
            ),
        },
        _ => Decision::Release {
            block: h.block.cidr,
            handle: Some(handle),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::DateTime;

    use super::*;
    use crate::api::ipamblock::IPAMBlock;
    use crate::ipam::block::{Attribute, Block, DEFAULT_COOLDOWN, Owner, host_affinity};
    use crate::ipam::cidr::block_name;
    use crate::ipam::cli::snapshot::test_pool;
    use crate::ipam::convert::block_to_spec;
    use crate::ipam::reservations::Reservations;

    fn snap(pods: &[(&str, &str)]) -> Snapshot {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut b = Block::new(
            "10.1.0.0/26".parse().unwrap(),
            Some(host_affinity("n1")),
            None,
            1,
        )
        .unwrap();
        let pod = Owner {
            handle_id: "h1".into(),
            attrs: BTreeMap::from([
                ("namespace".into(), "default".into()),
                ("pod".into(), "a".into()),
                (ATTR_POD_UID.into(), "u1".into()),
            ]),
        };
        let tunnel = Owner {
            handle_id: "vxlan-tunnel-addr-n1".into(),
            attrs: BTreeMap::from([("type".into(), "vxlanTunnelAddress".into())]),
        };
        b.auto_assign(1, &pod, &Reservations::EMPTY, t0, DEFAULT_COOLDOWN);
        b.auto_assign(1, &tunnel, &Reservations::EMPTY, t0, DEFAULT_COOLDOWN);
        // 10.1.0.2: allocated to nobody, as calicoctl 3.32 leaves a rewritten cooldown entry.
        b.auto_assign(1, &pod, &Reservations::EMPTY, t0, DEFAULT_COOLDOWN);
        b.attributes.push(Attribute::default());
        b.allocations[2] = Some(b.attributes.len() - 1);
        let obj = IPAMBlock::new(&block_name(&b.cidr), block_to_spec(&b));
        let mut s = Snapshot::from_objects(&[test_pool("p", "10.1.0.0/24", 26)], &[obj], &[], &[]);
        s.pods = Some(
            pods.iter()
                .map(|(n, u)| (("default".to_string(), n.to_string()), u.to_string()))
                .collect(),
        );
        s
    }

    #[test]
    fn a_live_pods_address_needs_force() {
        let s = snap(&[("a", "u1")]);
        let ip = "10.1.0.0".parse().unwrap();
        assert!(
            matches!(decide(&s, ip, false), Decision::Refuse { reason } if reason.contains("pod default/a still exists"))
        );
        assert_eq!(
            decide(&s, ip, true),
            Decision::Release {
                block: "10.1.0.0/26".parse().unwrap(),
                handle: Some("h1".into())
            }
        );
    }

    #[test]
    fn a_gone_or_replaced_pods_address_is_released() {
        let ip = "10.1.0.0".parse().unwrap();
        assert!(matches!(
            decide(&snap(&[]), ip, false),
            Decision::Release { .. }
        ));
        assert!(matches!(
            decide(&snap(&[("a", "new-uid")]), ip, false),
            Decision::Release { .. }
        ));
    }

    #[test]
    fn tunnel_free_and_foreign_addresses() {
        let s = snap(&[]);
        assert!(matches!(
            decide(&s, "10.1.0.1".parse().unwrap(), false),
            Decision::Refuse { .. }
        ));
        assert_eq!(
            decide(&s, "10.1.0.9".parse().unwrap(), false),
            Decision::NotAllocated
        );
        assert_eq!(
            decide(&s, "10.1.0.2".parse().unwrap(), false),
            Decision::Release {
                block: "10.1.0.0/26".parse().unwrap(),
                handle: None
            },
            "nobody owns it: no --force needed"
        );
        assert_eq!(
            decide(&s, "192.0.2.1".parse().unwrap(), true),
            Decision::NotInAnyPool
        );
    }
}
