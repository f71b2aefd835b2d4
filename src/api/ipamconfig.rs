//! IPAMConfig: the cluster-wide IPAM switches, one object named `default`.
//! Calico enforces the cross-field rules only in its client library; the CRD does too here.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Name of the singleton.
pub const IPAM_CONFIG_NAME: &str = "default";

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "IPAMConfig",
    doc = "Cluster-wide IPAM settings, singleton named default (Calico IPAMConfig)",
    plural = "ipamconfigs",
    singular = "ipamconfig",
    derive = "PartialEq",
    validation = Rule::new("self.metadata.name == 'default'").message("IPAMConfig is a singleton: metadata.name must be default")
)]
#[x_kube(validation = Rule::new("self.strictAffinity || self.autoAllocateBlocks").message("autoAllocateBlocks cannot be false while strictAffinity is false (no address could ever be allocated)").field_path(".autoAllocateBlocks"))]
#[x_kube(validation = Rule::new("!has(self.maxBlocksPerHost) || self.maxBlocksPerHost == 0 || self.strictAffinity").message("maxBlocksPerHost above 0 requires strictAffinity true").field_path(".maxBlocksPerHost"))]
#[serde(rename_all = "camelCase")]
pub struct IPAMConfigSpec {
    /// No borrowing of addresses from blocks other nodes own.
    pub strict_affinity: bool,
    /// Nodes may claim new blocks.
    pub auto_allocate_blocks: bool,
    /// Cap on blocks per node; unset or 0 means no cap (Calico silently caps at 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub max_blocks_per_host: Option<i32>,
    /// Whether KubeVirt VM addresses survive VM restarts and migrations.
    #[serde(
        rename = "kubeVirtVMAddressPersistence",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub kube_virt_vm_address_persistence: Option<VMAddressPersistence>,
    /// Seconds a released address rests before it is handed out again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1200))]
    pub ip_cooldown_seconds: Option<i32>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VMAddressPersistence {
    Enabled,
    Disabled,
}

impl Default for IPAMConfigSpec {
    /// What Calico assumes when the object does not exist.
    fn default() -> Self {
        Self {
            strict_affinity: false,
            auto_allocate_blocks: true,
            max_blocks_per_host: None,
            kube_virt_vm_address_persistence: None,
            ip_cooldown_seconds: None,
        }
    }
}

impl IPAMConfigSpec {
    /// The cap on blocks per node; None (no cap) when unset or 0, unlike Calico's hidden 20.
    pub fn effective_max_blocks_per_host(&self) -> Option<u32> {
        match self.max_blocks_per_host {
            Some(n) if n > 0 => Some(n.unsigned_abs()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_or_zero_max_blocks_means_no_cap() {
        let mut c = IPAMConfigSpec::default();
        assert_eq!(c.effective_max_blocks_per_host(), None);
        c.max_blocks_per_host = Some(0);
        assert_eq!(c.effective_max_blocks_per_host(), None);
        c.max_blocks_per_host = Some(-3);
        assert_eq!(c.effective_max_blocks_per_host(), None);
        c.max_blocks_per_host = Some(4);
        assert_eq!(c.effective_max_blocks_per_host(), Some(4));
    }

    #[test]
    fn uses_calico_field_names() {
        let c = IPAMConfigSpec {
            kube_virt_vm_address_persistence: Some(VMAddressPersistence::Enabled),
            ip_cooldown_seconds: Some(30),
            ..Default::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["kubeVirtVMAddressPersistence"], "Enabled");
        assert_eq!(v["ipCooldownSeconds"], 30);
        assert_eq!(v["autoAllocateBlocks"], true);
        assert_eq!(v["strictAffinity"], false);
    }
}
