// Shared integration-test support: a real control plane (etcd + kube-apiserver), network
// namespaces, and child processes that never outlive the test process.
// Each tests/*.rs uses a subset, hence the dead_code allowance.
#![allow(dead_code, unused_imports)]

pub mod binaries;
pub mod cni;
pub mod controlplane;
pub mod credentials;
pub mod manifest;
pub mod netns;
pub mod oracle;
pub mod pods;
pub mod pools;
pub mod process;

pub use controlplane::ControlPlane;
pub use netns::{NetNs, veth_pair, veth_to_root};
