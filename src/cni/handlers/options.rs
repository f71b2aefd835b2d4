//! What the network config and the request say about one allocation: families, CNI-config
//! pools (Calico's `ipam.assign_ipv4`/`assign_ipv6`/`ipv4_pools`/`ipv6_pools`), the MTU,
//! and the attributes recorded with the address. Sans-IO.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

use super::HandlerError;

/// Allocation attribute holding the pod's UID, so leak GC can tell a recreated pod of the
/// same name from the one that got the address.
pub use crate::api::vocab::ATTR_POD_UID;
use crate::api::vocab::{ATTR_NAMESPACE, ATTR_NODE, ATTR_POD, ATTR_TIMESTAMP};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IpamOptions {
    pub v4: bool,
    pub v6: bool,
    pub v4_pools: Vec<String>,
    pub v6_pools: Vec<String>,
}

/// Calico writes these flags as strings ("true"); booleans are accepted too.
fn flag(ipam: &Value, key: &'static str, default: bool) -> Result<bool, HandlerError> {
    match ipam.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => match s.as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(HandlerError::Config {
                key,
                problem: format!("{other:?} is neither \"true\" nor \"false\""),
            }),
        },
        Some(other) => Err(HandlerError::Config {
            key,
            problem: format!("{other} is not a boolean"),
        }),
    }
}

fn pools(ipam: &Value, key: &'static str) -> Result<Vec<String>, HandlerError> {
    match ipam.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| HandlerError::Config {
            key,
            problem: format!("must be a list of pool names or CIDRs: {e}"),
        }),
    }
}

pub(super) fn ipam_options(raw: &Value) -> Result<IpamOptions, HandlerError> {
    let empty = Value::Null;
    let ipam = raw.get("ipam").unwrap_or(&empty);
    let opts = IpamOptions {
        v4: flag(ipam, "assign_ipv4", true)?,
        v6: flag(ipam, "assign_ipv6", false)?,
        v4_pools: pools(ipam, "ipv4_pools")?,
        v6_pools: pools(ipam, "ipv6_pools")?,
    };
    if !opts.v4 && !opts.v6 {
        return Err(HandlerError::Config {
            key: "ipam.assign_ipv4",
            problem: "and ipam.assign_ipv6 are both false: nothing to assign".into(),
        });
    }
    Ok(opts)
}

/// The config's `mtu` if set and non-zero, else the daemon's.
pub(super) fn mtu(raw: &Value, default: u32) -> Result<u32, HandlerError> {
    match raw.get("mtu") {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(0) => Ok(default),
            Some(m) if (68..=65535).contains(&m) => Ok(m as u32),
            _ => Err(HandlerError::Config {
                key: "mtu",
                problem: format!("{v} is not an MTU between 68 and 65535"),
            }),
        },
    }
}

pub(super) fn attributes(
    node: &str,
    namespace: &str,
    pod: &str,
    uid: Option<&str>,
    now: DateTime<Utc>,
) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::from([
        (ATTR_NODE.to_string(), node.to_string()),
        (ATTR_NAMESPACE.to_string(), namespace.to_string()),
        (ATTR_POD.to_string(), pod.to_string()),
        (
            ATTR_TIMESTAMP.to_string(),
            now.to_rfc3339_opts(SecondsFormat::Secs, true),
        ),
    ]);
    if let Some(uid) = uid {
        attrs.insert(ATTR_POD_UID.to_string(), uid.to_string());
    }
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_ipv4_only_with_no_pools() {
        let o = ipam_options(&json!({"type": "tortie"})).unwrap();
        assert_eq!(
            o,
            IpamOptions {
                v4: true,
                v6: false,
                v4_pools: vec![],
                v6_pools: vec![]
            }
        );
    }

    #[test]
    fn calico_string_flags_and_pools_are_read() {
        let raw = json!({"ipam": {"type": "tortie-ipam", "assign_ipv4": "false", "assign_ipv6": "true",
            "ipv6_pools": ["v6-pool"], "ipv4_pools": ["10.0.0.0/24"]}});
        let o = ipam_options(&raw).unwrap();
        assert!(!o.v4 && o.v6);
        assert_eq!(o.v6_pools, vec!["v6-pool"]);
        assert_eq!(o.v4_pools, vec!["10.0.0.0/24"]);
    }

    #[test]
    fn bad_flags_and_no_family_are_config_errors() {
        let err = ipam_options(&json!({"ipam": {"assign_ipv4": "yes"}})).unwrap_err();
        assert!(err.to_string().contains("assign_ipv4"), "{err}");
        let err = ipam_options(&json!({"ipam": {"assign_ipv4": false, "assign_ipv6": false}}))
            .unwrap_err();
        assert!(err.to_string().contains("nothing to assign"), "{err}");
        let err = ipam_options(&json!({"ipam": {"ipv4_pools": "p"}})).unwrap_err();
        assert!(err.to_string().contains("ipv4_pools"), "{err}");
    }

    #[test]
    fn mtu_falls_back_to_the_daemon_default() {
        assert_eq!(mtu(&json!({}), 1450).unwrap(), 1450);
        assert_eq!(mtu(&json!({"mtu": 0}), 1450).unwrap(), 1450);
        assert_eq!(mtu(&json!({"mtu": 1400}), 1450).unwrap(), 1400);
        assert!(mtu(&json!({"mtu": 10}), 1450).is_err());
        assert!(mtu(&json!({"mtu": "x"}), 1450).is_err());
    }

    #[test]
    fn attributes_carry_calico_keys_and_the_uid() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T02:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let a = attributes("node-1", "default", "web-0", Some("u-1"), now);
        assert_eq!(a["node"], "node-1");
        assert_eq!(a["namespace"], "default");
        assert_eq!(a["pod"], "web-0");
        assert_eq!(a["timestamp"], "2026-11-23T02:00:00Z");
        assert_eq!(a[ATTR_POD_UID], "u-1");
    }
}
