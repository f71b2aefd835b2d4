//! Node identity: the node's IP found with Calico's autodetection methods
//! (`IP_AUTODETECTION_METHOD` / `IP6_AUTODETECTION_METHOD`) and published on the Node as
//! `projectcalico.org/IPv4Address` / `IPv6Address` ("<ip>/<prefix>").

mod annotate;
mod choose;
mod local;
mod method;

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::Api;

pub use annotate::{Annotation, annotation_key, write_address};
pub use choose::{Interface, choose, find_local, is_global_unicast};
pub use local::{detect, list_interfaces, source_address_towards};
pub use method::{DEFAULT_EXCLUDES, Method, NamePatterns};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "unknown IP autodetection method {method:?}; valid methods: first-found, \
         interface=<regex>[,<regex>…], skip-interface=<regex>[,<regex>…], \
         cidr=<cidr>[,<cidr>…], can-reach=<ip or hostname>, kubernetes-internal-ip"
    )]
    UnknownMethod { method: String },
    #[error("IP autodetection method {method:?} needs a value after '='")]
    EmptyArgument { method: String },
    #[error("IP autodetection method {method:?}: invalid interface regex {pattern:?}: {reason}")]
    BadRegex {
        method: String,
        pattern: String,
        reason: String,
    },
    #[error("IP autodetection method {method:?}: invalid CIDR {cidr:?}")]
    BadCidr { method: String, cidr: String },
    #[error(
        "IP autodetection ({method}): no {family} address found on the host interfaces{detail}"
    )]
    NotFound {
        method: String,
        family: Family,
        detail: String,
    },
    #[error("IP autodetection ({method}): {address} is on no local interface")]
    NotLocal { method: String, address: IpAddr },
    #[error("IP autodetection (can-reach={target}): {reason}")]
    Unreachable { target: String, reason: String },
    #[error(
        "IP autodetection (kubernetes-internal-ip): Node {node:?} has no {family} InternalIP in status.addresses"
    )]
    NoInternalIp { node: String, family: Family },
    #[error("netlink: {action}: {reason}")]
    Netlink {
        action: &'static str,
        reason: String,
    },
    #[error("{action} Node {node:?}: {source}")]
    Api {
        action: &'static str,
        node: String,
        source: Box<kube::Error>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The detected address: interface, IP and prefix (host bits kept: `10.0.0.5/24`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    pub interface: String,
    pub address: IpNet,
}

/// The whole start-up step: detects the address per family with its method, and writes the
/// annotation when it differs. The Node is read only for `kubernetes-internal-ip`.
/// Runs in the network namespace of the calling thread (rtnetlink and the UDP socket are
/// opened there).
pub async fn establish(
    client: &Client,
    node_name: &str,
    family: Family,
    method: &Method,
) -> Result<NodeAddress, IdentityError> {
    let node = match method {
        Method::KubernetesInternalIp => {
            let api: Api<Node> = Api::all(client.clone());
            let node = api
                .get(node_name)
                .await
                .map_err(|source| IdentityError::Api {
                    action: "reading",
                    node: node_name.to_owned(),
                    source: Box::new(source),
                })?;
            Some(node)
        }
        _ => None,
    };
    let found = detect(method, family, node.as_ref()).await?;
    let annotation = write_address(client, node_name, family, &found.address).await?;
    tracing::info!(
        node = node_name,
        %family,
        method = %method,
        interface = %found.interface,
        address = %found.address,
        ?annotation,
        "node address detected"
    );
    Ok(found)
}
