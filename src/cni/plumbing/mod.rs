//! Pod plumbing: the veth pair between the host (the daemon's network namespace) and a pod,
//! the pod's addresses, gateway and default routes, and the host route to the pod, the way
//! Calico's CNI lays them out. Attach, detach and check; nothing here talks to the API.
//!
//! The host side lives in the namespace the [`Plumber`] was opened on; every pod namespace is
//! reached through its own fd on a dedicated thread (see `netns`).

mod attach;
mod check;
mod links;
pub mod netns;

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;
use sha1::{Digest, Sha1};

pub use self::attach::{Prepared, Unrouted};
pub use self::netns::{NsId, NsNetlink};

/// Host-side MAC of every pod veth: pods resolve their gateway to it (Calico's value).
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The pod's IPv4 gateway: answered by proxy ARP (and a permanent neighbour) on the host side.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 gateway: the host veth's EUI-64 link-local address from [`HOST_MAC`].
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// Calico's prefix of host-side workload interfaces (FELIX_INTERFACEPREFIX default).
pub const HOST_IF_PREFIX: &str = "cali";

#[derive(Debug, thiserror::Error)]
pub enum PlumbingError {
    #[error("{action}: {source}")]
    Netlink {
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "host route {dst} already exists on interface {holder}, not {wanted}: another workload holds this address"
    )]
    RouteHeld {
        dst: IpNet,
        holder: String,
        wanted: String,
    },
    #[error("interface {ifname} already exists in the pod's network namespace")]
    PodInterfaceExists { ifname: String },
    #[error("pod interface {ifname} did not appear in the pod's network namespace")]
    PodInterfaceMissing { ifname: String },
    /// CHECK found the kernel differing from what ADD made; the message says what.
    #[error("{0}")]
    Mismatch(String),
}

impl PlumbingError {
    pub(crate) fn netlink(action: impl Into<String>, source: rtnetlink::Error) -> PlumbingError {
        PlumbingError::Netlink {
            action: action.into(),
            source,
        }
    }

    pub(crate) fn io(action: impl Into<String>, source: io::Error) -> PlumbingError {
        PlumbingError::Io {
            action: action.into(),
            source,
        }
    }
}

/// Calico's host-side name: `cali` + the first 11 hex digits of sha1("<namespace>.<pod>"),
/// 15 bytes, the most a Linux interface name holds.
pub fn host_veth_name(namespace: &str, pod: &str) -> String {
    let digest = Sha1::digest(format!("{namespace}.{pod}").as_bytes());
    let hex = hex::encode(digest);
    format!("{HOST_IF_PREFIX}{}", &hex[..11])
}

/// What one pod attachment should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    /// `cali…` in the host namespace.
    pub host_ifname: String,
    /// CNI_IFNAME in the pod namespace.
    pub pod_ifname: String,
    /// Host prefixes (/32, /128) the pod gets.
    pub addrs: Vec<IpNet>,
    pub mtu: u32,
}

impl PodNetwork {
    pub fn has_v6(&self) -> bool {
        self.addrs.iter().any(|a| a.addr().is_ipv6())
    }

    pub fn has_v4(&self) -> bool {
        self.addrs.iter().any(|a| a.addr().is_ipv4())
    }

    /// The gateway the pod routes through for an address of `addr`'s family.
    pub fn gateway_for(addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => IpAddr::V4(GATEWAY_V4),
            IpAddr::V6(_) => IpAddr::V6(GATEWAY_V6),
        }
    }
}

/// What attach made, for the CNI result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub host_mac: String,
    pub pod_mac: String,
    pub host_index: u32,
    pub pod_index: u32,
}

/// What detach removed (for logs and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detached {
    pub pod_interface: bool,
    pub host_interface: bool,
    pub host_routes: usize,
}

/// The host side: the namespace the daemon plumbs pods into, with a netlink socket in it.
pub struct Plumber {
    host_ns: File,
    host_id: NsId,
    host: NsNetlink,
}

impl Plumber {
    /// Opens the host namespace at `host_ns` (in production `/proc/thread-self/ns/net` of the
    /// daemon; in tests a node namespace). Must run inside a tokio runtime.
    pub async fn open(host_ns: &Path) -> Result<Plumber, PlumbingError> {
        let action = || format!("open host network namespace {}", host_ns.display());
        let file = File::open(host_ns).map_err(|e| PlumbingError::io(action(), e))?;
        let host_id = NsId::of(&file).map_err(|e| PlumbingError::io(action(), e))?;
        let host = NsNetlink::open(&file)
            .await
            .map_err(|e| PlumbingError::io(action(), e))?;
        Ok(Plumber {
            host_ns: file,
            host_id,
            host,
        })
    }

    /// True when `ns` is the host namespace itself: a pod must never be plumbed there.
    pub fn is_host_namespace(&self, ns: &File) -> io::Result<bool> {
        Ok(NsId::of(ns)? == self.host_id)
    }

    pub fn host_namespace(&self) -> &File {
        &self.host_ns
    }

    pub fn host_handle(&self) -> &rtnetlink::Handle {
        &self.host.handle
    }
}

/// `aa:bb:…` as the CNI result prints MACs.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_name_matches_calico() {
        // Calico keeps the first 11 hex digits of the digest.
        let name = host_veth_name("default", "web-0");
        assert_eq!(name.len(), 15);
        assert!(name.starts_with("cali"));
        let full = hex::encode(Sha1::digest(b"default.web-0"));
        assert_eq!(&name[4..], &full[..11]);
        assert_ne!(name, host_veth_name("default", "web-1"));
        assert_ne!(host_veth_name("a.b", "c"), host_veth_name("a", "b.c.d"));
    }

    #[test]
    fn v6_gateway_is_the_eui64_link_local_of_the_host_mac() {
        // EUI-64: flip the U/L bit of the first byte (ee -> ec), insert ff:fe in the middle.
        let mut eui = [0u8; 8];
        eui[..3].copy_from_slice(&HOST_MAC[..3]);
        eui[3] = 0xff;
        eui[4] = 0xfe;
        eui[5..].copy_from_slice(&HOST_MAC[3..]);
        eui[0] ^= 0x02;
        let mut octets = [0u8; 16];
        octets[0] = 0xfe;
        octets[1] = 0x80;
        octets[8..].copy_from_slice(&eui);
        assert_eq!(Ipv6Addr::from(octets), GATEWAY_V6);
    }

    #[test]
    fn mac_formatting() {
        assert_eq!(format_mac(&HOST_MAC), "ee:ee:ee:ee:ee:ee");
        assert_eq!(format_mac(&[0x0a, 0, 1, 2, 3, 0xff]), "0a:00:01:02:03:ff");
    }
}
