//! The CNI Result in its current (1.1.0) shape, and its conversion to the shape of the
//! version the runtime asked for. Reading accepts 0.3.x/0.4.0/1.x results alike (the old
//! per-IP `version` field is ignored), so `prevResult` is normalised on the way in.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::version::CniVersion;

#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("CNI result is not valid: {0}")]
    Decode(#[from] serde_json::Error),
    #[error(
        "CNI result ip {address} names interface index {index}, but the result has {count} interfaces"
    )]
    InterfaceIndex {
        address: IpNet,
        index: usize,
        count: usize,
    },
}

/// A result as ADD returns it (spec 1.1.0 field names). IPAM-only results leave
/// `interfaces` empty and `ips[].interface` unset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 1.1.0
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Netns path for container-side interfaces; absent for host-side ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// 1.1.0
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// 1.1.0
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix, host bits kept (e.g. `10.244.1.5/32`).
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// 1.1.0 route attributes from here on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// Keys that exist only from spec 1.1.0 on; older formats must not carry them.
const INTERFACE_KEYS_1_1: [&str; 3] = ["mtu", "socketPath", "pciID"];
const ROUTE_KEYS_1_1: [&str; 5] = ["mtu", "advmss", "priority", "table", "scope"];

impl CniResult {
    /// Reads a result of any supported version (e.g. a `prevResult`).
    pub fn from_value(value: Value) -> Result<CniResult, ResultError> {
        let result: CniResult = serde_json::from_value(value)?;
        result.validate()?;
        Ok(result)
    }

    /// Interface indexes must point into `interfaces`, or a runtime reading the result
    /// attributes an address to the wrong (or no) interface.
    pub fn validate(&self) -> Result<(), ResultError> {
        for ip in &self.ips {
            if let Some(index) = ip.interface
                && index >= self.interfaces.len()
            {
                return Err(ResultError::InterfaceIndex {
                    address: ip.address,
                    index,
                    count: self.interfaces.len(),
                });
            }
        }
        Ok(())
    }

    /// An IPAM plugin's result: addresses, routes and DNS, unaware of interfaces.
    pub fn into_ipam_only(mut self) -> CniResult {
        self.interfaces.clear();
        for ip in &mut self.ips {
            ip.interface = None;
        }
        self
    }

    /// The JSON to print for a runtime that asked for `version`.
    pub fn to_version(&self, version: CniVersion) -> Value {
        let mut out = self.clone();
        out.cni_version = Some(version.as_str().to_string());
        // Serialising plain structs of strings, numbers and addresses cannot fail.
        let mut value = serde_json::to_value(&out).unwrap_or(Value::Null);
        if version < CniVersion::V1_1_0 {
            strip_keys(&mut value, "interfaces", &INTERFACE_KEYS_1_1);
            strip_keys(&mut value, "routes", &ROUTE_KEYS_1_1);
        }
        if version.has_ip_version_field()
            && let Some(ips) = value.get_mut("ips").and_then(Value::as_array_mut)
        {
            for (ip, typed) in ips.iter_mut().zip(&self.ips) {
                let family = if typed.address.addr().is_ipv4() {
                    "4"
                } else {
                    "6"
                };
                if let Some(obj) = ip.as_object_mut() {
                    obj.insert("version".to_string(), Value::String(family.to_string()));
                }
            }
        }
        value
    }
}

fn strip_keys(value: &mut Value, list: &str, keys: &[&str]) {
    if let Some(items) = value.get_mut(list).and_then(Value::as_array_mut) {
        for item in items {
            if let Some(obj) = item.as_object_mut() {
                for key in keys {
                    obj.remove(*key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            cni_version: None,
            interfaces: vec![
                Interface {
                    name: "cali1234567890a".into(),
                    mac: Some("ee:ee:ee:ee:ee:ee".into()),
                    mtu: Some(1450),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("0a:58:0a:f4:01:05".into()),
                    mtu: Some(1450),
                    sandbox: Some("/var/run/netns/cni-1".into()),
                    ..Default::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/32".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00::5/128".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
                mtu: Some(1450),
                advmss: None,
                priority: None,
                table: None,
                scope: Some(0),
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn v1_1_0_output_keeps_new_fields_and_has_no_ip_version() {
        let out = sample().to_version(CniVersion::V1_1_0);
        assert_eq!(out["cniVersion"], "1.1.0");
        assert_eq!(out["interfaces"][1]["mtu"], 1450);
        assert_eq!(out["routes"][0]["scope"], 0);
        assert!(out["ips"][0].get("version").is_none());
        assert!(out.get("dns").is_none());
    }

    #[test]
    fn v1_0_0_output_drops_1_1_fields() {
        let out = sample().to_version(CniVersion::V1_0_0);
        assert_eq!(out["cniVersion"], "1.0.0");
        assert!(out["interfaces"][1].get("mtu").is_none());
        assert!(out["routes"][0].get("mtu").is_none());
        assert!(out["routes"][0].get("scope").is_none());
        assert_eq!(out["routes"][0]["gw"], "169.254.1.1");
        assert!(out["ips"][0].get("version").is_none());
    }

    #[test]
    fn v0_3_1_and_v0_4_0_output_carry_ip_family_version() {
        for v in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let out = sample().to_version(v);
            assert_eq!(out["cniVersion"], v.as_str());
            assert_eq!(out["ips"][0]["version"], "4");
            assert_eq!(out["ips"][1]["version"], "6");
            assert_eq!(out["ips"][0]["interface"], 1);
            assert_eq!(out["ips"][0]["address"], "10.244.1.5/32");
            assert_eq!(out["interfaces"][1]["sandbox"], "/var/run/netns/cni-1");
            assert!(out["interfaces"][1].get("mtu").is_none());
        }
    }

    #[test]
    fn reads_a_0_4_0_prev_result() {
        let prev = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "sandbox": "/proc/1/ns/net"}],
            "ips": [{"version": "4", "address": "10.0.0.7/32", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
            "dns": {}
        });
        let r = CniResult::from_value(prev).unwrap();
        assert_eq!(r.ips[0].address, "10.0.0.7/32".parse::<IpNet>().unwrap());
        assert_eq!(r.ips[0].interface, Some(0));
        assert!(r.dns.is_empty());
    }

    #[test]
    fn round_trip_through_1_1_0_is_lossless() {
        let value = sample().to_version(CniVersion::V1_1_0);
        let back = CniResult::from_value(value).unwrap();
        let mut expected = sample();
        expected.cni_version = Some("1.1.0".into());
        assert_eq!(back, expected);
    }

    #[test]
    fn interface_index_out_of_range_is_rejected() {
        let prev = json!({"ips": [{"address": "10.0.0.7/32", "interface": 2}]});
        let err = CniResult::from_value(prev).unwrap_err();
        assert!(err.to_string().contains("interface index 2"), "{err}");
    }

    #[test]
    fn bad_address_is_a_decode_error() {
        let prev = json!({"ips": [{"address": "10.0.0.300/32"}]});
        assert!(matches!(
            CniResult::from_value(prev),
            Err(ResultError::Decode(_))
        ));
    }

    #[test]
    fn ipam_only_result_has_no_interfaces() {
        let r = sample().into_ipam_only();
        let out = r.to_version(CniVersion::V1_0_0);
        assert!(out.get("interfaces").is_none());
        assert!(out["ips"][0].get("interface").is_none());
        assert_eq!(out["routes"][0]["dst"], "0.0.0.0/0");
    }
}
