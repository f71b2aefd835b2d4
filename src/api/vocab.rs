//! One vocabulary for the names Calico's tools read: IPAM allocation attribute keys, pod and
//! namespace annotations, Node annotations. The CNI writes them, GC and the CLI judge leaks by
//! them, the snapshot reads them back; one spelling keeps them from drifting apart.

/// Allocation attribute keys (`attributes[].secondary` of an IPAMBlock), as Calico's CNI
/// plugin records them.
pub const ATTR_NAMESPACE: &str = "namespace";
pub const ATTR_POD: &str = "pod";
pub const ATTR_NODE: &str = "node";
pub const ATTR_TIMESTAMP: &str = "timestamp";
/// Set on tunnel addresses (`vxlanTunnelAddress`, `ipipTunnelAddress`).
pub const ATTR_TYPE: &str = "type";
/// tortie's addition: lets GC tell a pod from a same-named successor.
pub const ATTR_POD_UID: &str = "pod-uid";

/// Pod annotations written after ADD (`podIPs` is comma-joined CIDRs).
/// Every Calico CNI annotation (pod and namespace) starts with this.
pub const CNI_ANNOTATION_PREFIX: &str = "cni.projectcalico.org/";
pub const ANNOTATION_POD_IP: &str = "cni.projectcalico.org/podIP";
pub const ANNOTATION_POD_IPS: &str = "cni.projectcalico.org/podIPs";
pub const ANNOTATION_CONTAINER_ID: &str = "cni.projectcalico.org/containerID";
/// Pool choice and fixed addresses, on pods and namespaces.
pub const ANNOTATION_IPV4_POOLS: &str = "cni.projectcalico.org/ipv4pools";
pub const ANNOTATION_IPV6_POOLS: &str = "cni.projectcalico.org/ipv6pools";
pub const ANNOTATION_IP_ADDRS: &str = "cni.projectcalico.org/ipAddrs";

/// Node annotations: the node's own addresses and its tunnel addresses.
pub const NODE_IPV4_ADDRESS: &str = "projectcalico.org/IPv4Address";
pub const NODE_IPV6_ADDRESS: &str = "projectcalico.org/IPv6Address";
pub const NODE_IPV4_VXLAN_TUNNEL_ADDR: &str = "projectcalico.org/IPv4VXLANTunnelAddr";
pub const NODE_IPV4_IPIP_TUNNEL_ADDR: &str = "projectcalico.org/IPv4IPIPTunnelAddr";
pub const NODE_IPV4_WIREGUARD_ADDR: &str = "projectcalico.org/IPv4WireguardInterfaceAddr";
pub const NODE_IPV6_VXLAN_TUNNEL_ADDR: &str = "projectcalico.org/IPv6VXLANTunnelAddr";
pub const NODE_IPV6_WIREGUARD_ADDR: &str = "projectcalico.org/IPv6WireguardInterfaceAddr";

/// Node annotations holding tunnel addresses allocated from IPAM.
pub const NODE_TUNNEL_ANNOTATIONS: &[&str] = &[
    NODE_IPV4_VXLAN_TUNNEL_ADDR,
    NODE_IPV4_IPIP_TUNNEL_ADDR,
    NODE_IPV4_WIREGUARD_ADDR,
    NODE_IPV6_VXLAN_TUNNEL_ADDR,
    NODE_IPV6_WIREGUARD_ADDR,
];
