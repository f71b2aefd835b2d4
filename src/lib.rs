//! tortie: a Kubernetes node networking daemon with Calico's observable contract.
//! README.md ("Architecture") maps each module to what it owns.

pub mod api;
pub mod calc;
pub mod calico_defaults;
pub mod cni;
pub mod config;
pub mod dataplane;
pub mod datastore;
pub mod desired;
pub mod felix_config;
pub mod health;
pub mod http;
pub mod ipam;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod selector;
pub mod telemetry;
