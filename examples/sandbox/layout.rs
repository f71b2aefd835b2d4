// The sandbox's addressing plan and names, decided once from a few settings (pure data).
// VNet: a bridge in its own namespace carrying 198.18.0.0/24 and 198.18.1.0/24 (every third
// node sits in the second subnet, for CrossSubnet); "internet" on 198.19.0.0/24 behind it.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The bridge inside the VNet namespace.
pub const BRIDGE: &str = "vnet0";
/// The VNet end of the root link (its root end is `Layout::root_if`).
pub const VNET_ROOT_IF: &str = "to-root";
/// The VNet end of the link to the internet namespace.
pub const VNET_INET_IF: &str = "to-inet";
/// Every node's VNet interface (first-found picks it: `eth*` is not excluded).
pub const NODE_IF: &str = "eth0";
/// The pod CIDR of the default pool; nothing outside the node namespaces routes it.
pub const POOL_CIDR: &str = "10.244.0.0/16";
pub const POOL_NAME: &str = "default-ipv4-ippool";
/// The internet namespace's address and a TCP port the demo and tests listen on there.
pub const INET_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
pub const INET_GW: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const VNET_MTU: u32 = 1500;

/// One node: its namespace, VNet address and the directories `tortie node` installs into.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub netns: String,
    /// The node's bridge port in the VNet namespace (where captures are taken).
    pub port: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dir: PathBuf,
}

impl NodeSpec {
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("opt/cni/bin")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("etc/cni/net.d")
    }
    pub fn cni_socket(&self) -> PathBuf {
        self.dir.join("cni.sock")
    }
    /// `/24` subnet index inside 198.18.0.0/16 (0 or 1).
    pub fn subnet(&self) -> u8 {
        self.ip.octets()[2]
    }
}

/// Everything `up` creates, by name and address.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layout {
    /// Prefix of every namespace name (pods' included), so `down` can find leftovers.
    pub prefix: String,
    pub base_dir: PathBuf,
    pub vnet_ns: String,
    pub inet_ns: String,
    /// Root end of the root <-> VNet link: the only thing the sandbox adds to the root namespace.
    pub root_if: String,
    pub root_ip: Ipv4Addr,
    pub vnet_root_ip: Ipv4Addr,
    /// Port the API server is reachable on at `root_ip`.
    pub api_port: u16,
    pub nodes: Vec<NodeSpec>,
}

impl Layout {
    /// `slot` picks the root /30 (198.18.255.4*slot+1), so a test sandbox and the user's can
    /// coexist; `node_prefix` names the Node objects (`<node_prefix>-<i>`).
    pub fn new(
        prefix: &str,
        base_dir: PathBuf,
        slot: u8,
        api_port: u16,
        node_prefix: &str,
        nodes: u8,
    ) -> Layout {
        let slot = slot % 63;
        let nodes = (1..=nodes)
            .map(|i| {
                // Every third node in the second subnet: routed through the VNet's router.
                let subnet = u8::from(i % 3 == 0);
                NodeSpec {
                    name: format!("{node_prefix}-{i}"),
                    netns: format!("{prefix}-node-{i}"),
                    port: format!("port-{i}"),
                    ip: Ipv4Addr::new(198, 18, subnet, 10 + i),
                    prefix_len: 24,
                    gateway: Ipv4Addr::new(198, 18, subnet, 1),
                    dir: base_dir.join(format!("{node_prefix}-{i}")),
                }
            })
            .collect();
        Layout {
            prefix: prefix.to_owned(),
            vnet_ns: format!("{prefix}-vnet"),
            inet_ns: format!("{prefix}-internet"),
            root_if: format!("{prefix}-root"),
            root_ip: Ipv4Addr::new(198, 18, 255, 4 * slot + 1),
            vnet_root_ip: Ipv4Addr::new(198, 18, 255, 4 * slot + 2),
            api_port,
            nodes,
            base_dir,
        }
    }

    /// Namespace name prefix of pod namespaces (the agent creates them).
    pub fn pod_netns_prefix(&self) -> String {
        format!("{}-pod", self.prefix)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.base_dir.join("kubeconfig")
    }

    pub fn state_file(&self) -> PathBuf {
        self.base_dir.join("state.json")
    }

    pub fn api_url(&self) -> String {
        format!("https://{}:{}", self.root_ip, self.api_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_third_node_lands_in_the_second_subnet() {
        let l = Layout::new("tsb", "/run/x".into(), 0, 6443, "node", 4);
        let ips: Vec<String> = l.nodes.iter().map(|n| n.ip.to_string()).collect();
        assert_eq!(
            ips,
            ["198.18.0.11", "198.18.0.12", "198.18.1.13", "198.18.0.14"]
        );
        assert_eq!(l.nodes[2].gateway, Ipv4Addr::new(198, 18, 1, 1));
    }

    #[test]
    fn slots_give_disjoint_root_links_inside_the_test_range() {
        let a = Layout::new("a", "/a".into(), 0, 1, "n", 1);
        let b = Layout::new("b", "/b".into(), 5, 1, "n", 1);
        assert_eq!(a.root_ip, Ipv4Addr::new(198, 18, 255, 1));
        assert_eq!(b.root_ip, Ipv4Addr::new(198, 18, 255, 21));
        assert_eq!(b.vnet_root_ip, Ipv4Addr::new(198, 18, 255, 22));
        assert!(a.root_if.len() <= 15);
    }
}
