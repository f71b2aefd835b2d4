//! Kernel change notifications (like `ip monitor`), reduced to which driver should look
//! again. tortie's own writes come back here too; reconciling is idempotent, so the echo
//! costs one no-op pass, which the caller can debounce.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::sys::SocketAddr;

use super::DataplaneError;
use super::netns::in_netns;
use crate::desired::ROUTE_PROTOCOL;

/// Which kind of kernel object changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Changed {
    /// A link, or an IPv4 address on it (the parent's node IP, the tunnel address). The
    /// name is known for link messages only; the resync loop ignores links that are not
    /// tortie's devices or the parent (a pod's veth appearing costs no dataplane pass).
    Links { ifindex: u32, name: Option<String> },
    /// A neighbour or FDB entry on the interface with this index.
    Neighbours { ifindex: u32 },
    /// An IPv4 route; `owned` when it carries tortie's protocol.
    Routes { owned: bool },
}

pub struct Monitor {
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

const GROUPS: [MulticastGroup; 4] = [
    MulticastGroup::Link,
    MulticastGroup::Ipv4Ifaddr,
    MulticastGroup::Neigh,
    MulticastGroup::Ipv4Route,
];

impl Monitor {
    /// Watches the caller's own namespace.
    pub fn new() -> Result<Monitor, DataplaneError> {
        Self::with_groups(&GROUPS)
    }

    /// Watches only links in the caller's own namespace (the host MTU follows NIC changes).
    pub fn links() -> Result<Monitor, DataplaneError> {
        Self::with_groups(&[MulticastGroup::Link])
    }

    fn with_groups(groups: &[MulticastGroup]) -> Result<Monitor, DataplaneError> {
        let (conn, _, messages) =
            rtnetlink::new_multicast_connection(groups).map_err(|source| {
                DataplaneError::Netns {
                    path: PathBuf::from("/proc/self/ns/net"),
                    action: "open rtnetlink monitor socket",
                    source,
                }
            })?;
        tokio::spawn(conn);
        Ok(Monitor { messages })
    }

    /// Watches the namespace at `path`.
    pub fn new_in(path: &Path) -> Result<Monitor, DataplaneError> {
        let (conn, _, messages) = in_netns(path, "open rtnetlink monitor socket", || {
            rtnetlink::new_multicast_connection(&GROUPS)
        })?;
        tokio::spawn(conn);
        Ok(Monitor { messages })
    }

    /// The next relevant change; None when the socket closed.
    pub async fn next(&mut self) -> Option<Changed> {
        while let Some((msg, _)) = self.messages.next().await {
            if let Some(changed) = classify(&msg.payload) {
                return Some(changed);
            }
        }
        None
    }
}

fn classify(payload: &NetlinkPayload<RouteNetlinkMessage>) -> Option<Changed> {
    let NetlinkPayload::InnerMessage(msg) = payload else {
        return None;
    };
    use RouteNetlinkMessage as M;
    match msg {
        M::NewLink(l) | M::DelLink(l) => Some(Changed::Links {
            ifindex: l.header.index,
            name: l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }),
        }),
        M::NewAddress(a) | M::DelAddress(a) => Some(Changed::Links {
            ifindex: a.header.index,
            name: None,
        }),
        M::NewNeighbour(n) | M::DelNeighbour(n) => Some(Changed::Neighbours {
            ifindex: n.header.ifindex,
        }),
        M::NewRoute(r) | M::DelRoute(r) => Some(Changed::Routes {
            owned: r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL),
        }),
        _ => None,
    }
}
