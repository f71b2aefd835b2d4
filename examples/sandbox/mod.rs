// The multi-node sandbox, shared by examples/sandbox.rs (the README's run command) and
// tests/sandbox.rs: layout, namespaces and links, the control plane reachable from the
// nodes, `tortie node` per node, the kubelet-like agent, pod helpers and a pcap reader.

pub mod agent;
pub mod cluster;
pub mod daemon_env;
pub mod layout;
pub mod net;
pub mod pcap;
pub mod pods;
pub mod runtime;
pub mod state;
