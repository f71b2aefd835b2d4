//! Calico's storage CRDs (`crd.projectcalico.org/v1`) as Rust types: one file per kind, with
//! the exact JSON field names calicoctl and Calico's KDD backend read and write.
//! `crdgen` turns the types into the CRD manifests committed under `manifests/crds/`.

pub mod blockaffinity;
pub mod clusterinformation;
pub mod crdgen;
pub mod felixconfiguration;
pub mod globalnetworkset;
pub mod ipamblock;
pub mod ipamconfig;
pub mod ipamhandle;
pub mod ippool;
pub mod ipreservation;
pub mod kubecontrollersconfiguration;
pub mod networkpolicy;
pub mod networkset;
pub mod rule;
pub mod stagedglobalnetworkpolicy;
pub mod stagedkubernetesnetworkpolicy;
pub mod stagednetworkpolicy;
pub mod vocab;

pub use blockaffinity::{AffinityState, AffinityType, BlockAffinity, BlockAffinitySpec};
pub use clusterinformation::{ClusterInformation, ClusterInformationSpec};
pub use felixconfiguration::{FelixConfiguration, FelixConfigurationSpec};
pub use globalnetworkset::{GlobalNetworkSet, GlobalNetworkSetSpec};
pub use ipamblock::{AllocationAttribute, IPAMBlock, IPAMBlockSpec};
pub use ipamconfig::{IPAMConfig, IPAMConfigSpec, VMAddressPersistence};
pub use ipamhandle::{IPAMHandle, IPAMHandleSpec};
pub use ippool::{AllowedUse, AssignmentMode, EncapMode, IPPool, IPPoolSpec};
pub use ipreservation::{IPReservation, IPReservationSpec};
pub use kubecontrollersconfiguration::{
    KubeControllersConfiguration, KubeControllersConfigurationSpec,
};
pub use networkpolicy::{
    GlobalNetworkPolicy, GlobalNetworkPolicySpec, NetworkPolicy, NetworkPolicySpec,
    PerformanceHint, PolicyType,
};
pub use networkset::{NetworkSet, NetworkSetSpec};
pub use rule::{
    Action, EntityRule, HTTPMatch, HTTPPath, ICMPFields, Rule, RuleMetadata, ServiceAccountMatch,
    ServiceMatch,
};
pub use stagedglobalnetworkpolicy::{StagedGlobalNetworkPolicy, StagedGlobalNetworkPolicySpec};
pub use stagedkubernetesnetworkpolicy::{
    StagedKubernetesNetworkPolicy, StagedKubernetesNetworkPolicySpec,
};
pub use stagednetworkpolicy::{StagedAction, StagedNetworkPolicy, StagedNetworkPolicySpec};

/// API group of Calico's storage CRDs.
pub const GROUP: &str = "crd.projectcalico.org";
/// The only served and stored version.
pub const VERSION: &str = "v1";

/// Errors from reading values out of the CRD types (the API server validated the shape,
/// these are the semantic checks callers still need).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{object}: {field} {value:?} is not a valid CIDR: {source}")]
    InvalidCidr {
        object: String,
        field: &'static str,
        value: String,
        source: ipnet::AddrParseError,
    },
    #[error("{object}: {field} {value:?} is not masked to its prefix (expected {masked})")]
    UnmaskedCidr {
        object: String,
        field: &'static str,
        value: String,
        masked: String,
    },
    #[error("{object}: blockSize {value} is outside 20-32 (IPv4) / 116-128 (IPv6)")]
    BlockSize { object: String, value: i32 },
    #[error("writing CRD manifest {path}: {source}")]
    WriteManifest {
        path: String,
        source: std::io::Error,
    },
    #[error("rendering CRD {name} as YAML: {source}")]
    RenderManifest {
        name: String,
        source: serde_yaml::Error,
    },
}

/// Parses a CIDR field that Calico requires to be strictly masked (`10.0.0.0/16`, not
/// `10.0.0.1/16`); `object` names the resource in the error.
pub(crate) fn parse_masked_cidr(
    object: &str,
    field: &'static str,
    value: &str,
) -> Result<ipnet::IpNet, ApiError> {
    let net: ipnet::IpNet = value.parse().map_err(|source| ApiError::InvalidCidr {
        object: object.to_string(),
        field,
        value: value.to_string(),
        source,
    })?;
    if net.trunc() != net {
        return Err(ApiError::UnmaskedCidr {
            object: object.to_string(),
            field,
            value: value.to_string(),
            masked: net.trunc().to_string(),
        });
    }
    Ok(net)
}

/// serde helper: Calico omits `false` booleans (`omitempty`), so do we.
pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}
