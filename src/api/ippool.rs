//! IPPool: a range pods (and tunnel addresses) get IPs from, carved into per-node blocks.
//! The CEL rules reproduce Calico's validation so `kubectl apply` rejects what calicoctl would,
//! each message naming the field it is about.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{ApiError, is_false, parse_masked_cidr};

/// Block size when an IPv4 pool does not set `blockSize`.
pub const DEFAULT_BLOCK_SIZE_V4: u8 = 26;
/// Block size when an IPv6 pool does not set `blockSize`.
pub const DEFAULT_BLOCK_SIZE_V6: u8 = 122;

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "IPPool",
    doc = "A range of pod addresses, handed to nodes in blocks (Calico IPPool)",
    plural = "ippools",
    singular = "ippool",
    derive = "PartialEq",
    printcolumn = r#"{"name":"CIDR","type":"string","jsonPath":".spec.cidr"}"#,
    printcolumn = r#"{"name":"BlockSize","type":"integer","jsonPath":".spec.blockSize"}"#,
    printcolumn = r#"{"name":"VXLAN","type":"string","jsonPath":".spec.vxlanMode"}"#,
    printcolumn = r#"{"name":"NAT","type":"boolean","jsonPath":".spec.natOutgoing"}"#,
    printcolumn = r#"{"name":"Disabled","type":"boolean","jsonPath":".spec.disabled"}"#
)]
#[x_kube(validation = Rule::new(
    "!isCIDR(self.cidr) || !has(self.blockSize) || (cidr(self.cidr).ip().family() == 4 \
     ? (self.blockSize >= 20 && self.blockSize <= 32) \
     : (self.blockSize >= 116 && self.blockSize <= 128))"
).message("blockSize must be 20-32 for an IPv4 pool and 116-128 for an IPv6 pool").field_path(".blockSize"))]
#[x_kube(validation = Rule::new(
    "!isCIDR(self.cidr) || (has(self.disabled) && self.disabled) || \
     cidr(self.cidr).prefixLength() <= (has(self.blockSize) ? self.blockSize \
     : (cidr(self.cidr).ip().family() == 4 ? 26 : 122))"
).message("blockSize must not be shorter than the prefix of cidr (a block cannot be larger than its pool) unless the pool is disabled").field_path(".blockSize"))]
#[x_kube(validation = Rule::new(
    "!isCIDR(self.cidr) || cidr(self.cidr).ip().family() == 4 || \
     !has(self.ipipMode) || self.ipipMode == 'Never'"
).message("ipipMode must be Never for an IPv6 pool (IP-in-IP carries IPv4 only)").field_path(".ipipMode"))]
#[x_kube(validation = Rule::new(
    "!has(self.ipipMode) || self.ipipMode == 'Never' || \
     !has(self.vxlanMode) || self.vxlanMode == 'Never'"
).message("vxlanMode and ipipMode cannot both be enabled on one pool").field_path(".vxlanMode"))]
#[x_kube(validation = Rule::new(
    "!has(self.allowedUses) || !('LoadBalancer' in self.allowedUses) || \
     ((!has(self.ipipMode) || self.ipipMode == 'Never') && \
      (!has(self.vxlanMode) || self.vxlanMode == 'Never') && \
      !(has(self.disableBGPExport) && self.disableBGPExport))"
).message("allowedUses LoadBalancer cannot be combined with ipipMode, vxlanMode or disableBGPExport").field_path(".allowedUses"))]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// The pool CIDR, masked to its prefix (e.g. 10.244.0.0/16). Immutable.
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a CIDR such as 10.244.0.0/16"))]
    #[x_kube(validation = Rule::new("!isCIDR(self) || cidr(self).masked() == cidr(self)").message("cidr must have no host bits set (use the network address)"))]
    #[x_kube(validation = Rule::new(
        "!isCIDR(self) || !(cidr(self).containsCIDR(cidr('169.254.0.0/16')) || \
         cidr('169.254.0.0/16').containsCIDR(cidr(self)) || \
         cidr(self).containsCIDR(cidr('fe80::/10')) || cidr('fe80::/10').containsCIDR(cidr(self)))"
    ).message("cidr must not overlap the link-local range 169.254.0.0/16 or fe80::/10"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("cidr is immutable"))]
    #[schemars(length(max = 64))]
    pub cidr: String,

    /// Prefix length of the blocks handed to nodes. Default 26 (IPv4) or 122 (IPv6). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("blockSize is immutable"))]
    pub block_size: Option<i32>,

    /// IP-in-IP encapsulation between nodes.
    #[serde(default)]
    pub ipip_mode: EncapMode,

    /// VXLAN encapsulation between nodes.
    #[serde(default)]
    pub vxlan_mode: EncapMode,

    /// Masquerade traffic from this pool to destinations outside all pools.
    #[serde(default, skip_serializing_if = "is_false")]
    pub nat_outgoing: bool,

    /// A disabled pool keeps its existing allocations but hands out no new addresses.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,

    /// Do not advertise this pool's routes over BGP.
    #[serde(rename = "disableBGPExport", default, skip_serializing_if = "is_false")]
    pub disable_bgp_export: bool,

    /// Calico selector over node labels; absent means `all()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub node_selector: Option<String>,

    /// Calico selector over namespace labels; when set, both it and nodeSelector must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub namespace_selector: Option<String>,

    /// What addresses from this pool may be used for; empty means Tunnel and Workload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("!('LoadBalancer' in self) || self.size() == 1").message("allowedUses LoadBalancer cannot be combined with Workload or Tunnel"))]
    pub allowed_uses: Vec<AllowedUse>,

    /// Automatic pools are chosen by selectors; Manual pools only when asked for by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_mode: Option<AssignmentMode>,
}

/// Encapsulation mode for IPIP and VXLAN.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum EncapMode {
    #[default]
    Never,
    Always,
    /// Encapsulate only towards nodes in another subnet.
    CrossSubnet,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowedUse {
    Workload,
    Tunnel,
    LoadBalancer,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum AssignmentMode {
    #[default]
    Automatic,
    Manual,
}

impl IPPoolSpec {
    /// The pool CIDR, parsed; fails on unmasked or malformed values.
    pub fn cidr_net(&self) -> Result<ipnet::IpNet, ApiError> {
        parse_masked_cidr("IPPool", "cidr", &self.cidr)
    }

    /// `blockSize`, or Calico's default for the pool's address family.
    pub fn effective_block_size(&self) -> Result<u8, ApiError> {
        let net = self.cidr_net()?;
        let (size, range) = match (self.block_size, net) {
            (None, ipnet::IpNet::V4(_)) => return Ok(DEFAULT_BLOCK_SIZE_V4),
            (None, ipnet::IpNet::V6(_)) => return Ok(DEFAULT_BLOCK_SIZE_V6),
            (Some(size), ipnet::IpNet::V4(_)) => (size, 20..=32),
            (Some(size), ipnet::IpNet::V6(_)) => (size, 116..=128),
        };
        match u8::try_from(size) {
            Ok(s) if range.contains(&s) => Ok(s),
            _ => Err(ApiError::BlockSize {
                object: format!("IPPool {}", self.cidr),
                value: size,
            }),
        }
    }

    /// `allowedUses` with Calico's default (Tunnel and Workload) when empty.
    pub fn effective_allowed_uses(&self) -> Vec<AllowedUse> {
        if self.allowed_uses.is_empty() {
            vec![AllowedUse::Tunnel, AllowedUse::Workload]
        } else {
            self.allowed_uses.clone()
        }
    }

    pub fn allows(&self, use_: AllowedUse) -> bool {
        self.effective_allowed_uses().contains(&use_)
    }

    /// Calico selector over node labels, `all()` when unset.
    pub fn effective_node_selector(&self) -> &str {
        self.node_selector.as_deref().unwrap_or("all()")
    }

    pub fn effective_assignment_mode(&self) -> AssignmentMode {
        self.assignment_mode.unwrap_or_default()
    }
}

impl IPPool {
    /// The pool CIDR, parsed; errors name the pool.
    pub fn cidr_net(&self) -> Result<ipnet::IpNet, ApiError> {
        let object = format!(
            "IPPool {:?}",
            self.metadata.name.as_deref().unwrap_or_default()
        );
        parse_masked_cidr(&object, "cidr", &self.spec.cidr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, block_size: Option<i32>) -> IPPoolSpec {
        IPPoolSpec {
            cidr: cidr.into(),
            block_size,
            ..Default::default()
        }
    }

    #[test]
    fn block_size_defaults_per_family() {
        assert_eq!(
            pool("10.0.0.0/16", None).effective_block_size().unwrap(),
            26
        );
        assert_eq!(pool("fd00::/48", None).effective_block_size().unwrap(), 122);
        assert_eq!(
            pool("10.0.0.0/16", Some(29))
                .effective_block_size()
                .unwrap(),
            29
        );
    }

    #[test]
    fn unmasked_cidr_is_an_error_naming_the_pool() {
        let mut p = IPPool::new("blue", pool("10.0.0.1/16", None));
        let err = p.cidr_net().unwrap_err().to_string();
        assert!(
            err.contains("\"blue\"") && err.contains("10.0.0.0/16"),
            "{err}"
        );
        p.spec.cidr = "banana".into();
        assert!(p.cidr_net().unwrap_err().to_string().contains("banana"));
    }

    #[test]
    fn empty_allowed_uses_means_tunnel_and_workload() {
        let p = pool("10.0.0.0/16", None);
        assert!(p.allows(AllowedUse::Workload) && p.allows(AllowedUse::Tunnel));
        assert!(!p.allows(AllowedUse::LoadBalancer));
    }

    #[test]
    fn serializes_with_calico_field_names() {
        let mut p = pool("10.0.0.0/16", Some(26));
        p.disable_bgp_export = true;
        p.nat_outgoing = true;
        p.vxlan_mode = EncapMode::Always;
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["disableBGPExport"], true);
        assert_eq!(v["natOutgoing"], true);
        assert_eq!(v["vxlanMode"], "Always");
        assert_eq!(v["ipipMode"], "Never");
        assert_eq!(v["blockSize"], 26);
        assert!(
            v.get("disabled").is_none(),
            "false booleans are omitted like Calico"
        );
    }
}
