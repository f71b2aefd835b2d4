//! Choosing the node address from the host's interfaces, with Calico's rules: interfaces
//! in reverse kernel order (as calico-node walks them), addresses in kernel order, the
//! first global-unicast address of the family that passes the method's filters. Pure.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Family, IdentityError, Method, NamePatterns, NodeAddress};

/// One interface as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Addresses with their prefix, host bits kept (`10.0.0.5/24`).
    pub addresses: Vec<IpNet>,
}

/// Applies `method` to `interfaces`. `anchor` is the address found outside the interface
/// list for `can-reach` (the kernel's source address) and `kubernetes-internal-ip` (the
/// Node's InternalIP); the other methods ignore it.
pub fn choose(
    method: &Method,
    family: Family,
    interfaces: &[Interface],
    anchor: Option<IpAddr>,
) -> Result<NodeAddress, IdentityError> {
    let found = match method {
        Method::FirstFound => enumerate(
            interfaces,
            family,
            None,
            Some(&NamePatterns::defaults()),
            &[],
        ),
        Method::Interface(include) => enumerate(interfaces, family, Some(include), None, &[]),
        Method::SkipInterface { skip, .. } => enumerate(interfaces, family, None, Some(skip), &[]),
        Method::Cidr(cidrs) => enumerate(interfaces, family, None, None, cidrs),
        Method::CanReach(_) | Method::KubernetesInternalIp => {
            let Some(address) = anchor else {
                return Err(IdentityError::NotFound {
                    method: method.to_string(),
                    family,
                    detail: String::new(),
                });
            };
            return find_local(interfaces, address).ok_or_else(|| IdentityError::NotLocal {
                method: method.to_string(),
                address,
            });
        }
    };
    found.ok_or_else(|| IdentityError::NotFound {
        method: method.to_string(),
        family,
        detail: describe(interfaces),
    })
}

/// The interface and prefix holding exactly `address`, on any interface.
pub fn find_local(interfaces: &[Interface], address: IpAddr) -> Option<NodeAddress> {
    in_calico_order(interfaces).find_map(|iface| {
        iface
            .addresses
            .iter()
            .find(|net| net.addr() == address)
            .map(|net| NodeAddress {
                interface: iface.name.clone(),
                address: *net,
            })
    })
}

/// Go's `net.IP.IsGlobalUnicast`: not unspecified, loopback, multicast, link-local or the
/// IPv4 limited broadcast. Private ranges count as global.
pub fn is_global_unicast(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_link_local()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

/// Calico walks `net.Interfaces()` (kernel index order) backwards, "to maintain behaviour
/// with older versions"; doing the same picks the same address on multi-NIC hosts.
fn in_calico_order(interfaces: &[Interface]) -> impl Iterator<Item = &Interface> {
    let mut sorted: Vec<&Interface> = interfaces.iter().collect();
    sorted.sort_by_key(|i| std::cmp::Reverse(i.index));
    sorted.into_iter()
}

/// Down interfaces are skipped (Calico does not check; an address on a down interface
/// carries no traffic, so choosing it only produces a broken node).
fn enumerate(
    interfaces: &[Interface],
    family: Family,
    include: Option<&NamePatterns>,
    exclude: Option<&NamePatterns>,
    cidrs: &[IpNet],
) -> Option<NodeAddress> {
    in_calico_order(interfaces)
        .filter(|i| i.up)
        .filter(|i| include.is_none_or(|p| p.matches(&i.name)))
        .filter(|i| !exclude.is_some_and(|p| p.matches(&i.name)))
        .find_map(|iface| {
            iface
                .addresses
                .iter()
                .filter(|net| Family::of(&net.addr()) == family)
                .filter(|net| is_global_unicast(&net.addr()))
                .find(|net| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(&net.addr())))
                .map(|net| NodeAddress {
                    interface: iface.name.clone(),
                    address: *net,
                })
        })
}

/// What was seen, for the error message: `; interfaces: eth0 (up) 10.0.0.5/24, …`.
fn describe(interfaces: &[Interface]) -> String {
    let seen: Vec<String> = in_calico_order(interfaces)
        .map(|i| {
            let addrs: Vec<String> = i.addresses.iter().map(ToString::to_string).collect();
            let state = if i.up { "up" } else { "down" };
            format!("{} ({state}) [{}]", i.name, addrs.join(" "))
        })
        .collect();
    format!("; interfaces seen: {}", seen.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(index: u32, name: &str, up: bool, addrs: &[&str]) -> Interface {
        Interface {
            index,
            name: name.into(),
            up,
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn host() -> Vec<Interface> {
        vec![
            iface(1, "lo", true, &["127.0.0.1/8", "::1/128"]),
            iface(
                2,
                "eth0",
                true,
                &["fe80::1/64", "10.0.0.5/24", "fd00::5/64"],
            ),
            iface(3, "eth1", true, &["169.254.3.3/16", "192.168.7.7/16"]),
            iface(4, "docker0", true, &["172.17.0.1/16"]),
            iface(5, "cali0123456789a", true, &["198.18.0.1/32"]),
            iface(6, "vxlan.calico", true, &["192.168.100.0/32"]),
            iface(7, "ens9", false, &["10.9.9.9/24"]),
        ]
    }

    fn pick(method: &str, family: Family) -> Result<NodeAddress, IdentityError> {
        choose(&Method::parse(method).unwrap(), family, &host(), None)
    }

    fn picked(method: &str, family: Family) -> String {
        let a = pick(method, family).unwrap();
        format!("{} {}", a.interface, a.address)
    }

    #[test]
    fn first_found_skips_excluded_down_and_non_global_and_walks_backwards() {
        // eth1 has the higher index, so Calico's reverse walk meets it first; its
        // link-local address is skipped and the prefix is kept with the host bits.
        assert_eq!(picked("first-found", Family::V4), "eth1 192.168.7.7/16");
        assert_eq!(picked("first-found", Family::V6), "eth0 fd00::5/64");
    }

    #[test]
    fn interface_method_ignores_default_exclusions() {
        assert_eq!(picked("interface=eth0", Family::V4), "eth0 10.0.0.5/24");
        assert_eq!(
            picked("interface=docker.*", Family::V4),
            "docker0 172.17.0.1/16"
        );
        assert_eq!(
            picked("interface=nomatch,eth0", Family::V4),
            "eth0 10.0.0.5/24"
        );
    }

    #[test]
    fn skip_interface_keeps_default_exclusions() {
        assert_eq!(
            picked("skip-interface=eth1", Family::V4),
            "eth0 10.0.0.5/24"
        );
        let err = pick("skip-interface=eth.*", Family::V4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no IPv4 address") && err.contains("eth0 (up)"),
            "{err}"
        );
    }

    #[test]
    fn cidr_method_looks_at_every_up_interface() {
        assert_eq!(
            picked("cidr=172.16.0.0/12", Family::V4),
            "docker0 172.17.0.1/16"
        );
        assert_eq!(picked("cidr=10.0.0.0/8", Family::V4), "eth0 10.0.0.5/24");
        assert!(
            pick("cidr=10.9.0.0/16", Family::V4).is_err(),
            "ens9 is down"
        );
    }

    #[test]
    fn anchored_methods_take_the_prefix_of_the_matching_interface() {
        let m = Method::CanReach("8.8.8.8".into());
        let a = choose(&m, Family::V4, &host(), Some("10.0.0.5".parse().unwrap())).unwrap();
        assert_eq!(a.address.to_string(), "10.0.0.5/24");
        let err = choose(&m, Family::V4, &host(), Some("10.1.1.1".parse().unwrap()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("10.1.1.1 is on no local interface"), "{err}");
        let k = Method::KubernetesInternalIp;
        let a = choose(&k, Family::V4, &host(), Some("10.9.9.9".parse().unwrap())).unwrap();
        assert_eq!(a.interface, "ens9");
    }

    #[test]
    fn global_unicast_follows_go() {
        for ip in [
            "10.0.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "fd00::1",
            "2001:db8::1",
        ] {
            assert!(is_global_unicast(&ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(!is_global_unicast(&ip.parse().unwrap()), "{ip}");
        }
    }
}
