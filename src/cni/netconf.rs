//! The network configuration a runtime pipes to the plugin (one plugin's entry of a conflist,
//! with `name`, `cniVersion`, `prevResult`, `runtimeConfig`, GC's valid attachments injected),
//! the conflist itself, and tortie's own client keys (`socket`, `timeout_seconds`).
//! Decoding is separate from validation so the two map to different CNI error codes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::version::{self, CniVersion, VersionError};
use super::{Command, PluginKind};

/// Where the daemon listens unless the config says otherwise (`"socket"`).
pub const DEFAULT_SOCKET: &str = "/var/run/tortie/cni.sock";

#[derive(Debug, thiserror::Error)]
pub enum NetConfError {
    #[error("network configuration on stdin is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("network configuration is not a JSON object (got {kind})")]
    NotAnObject { kind: &'static str },
    #[error("network configuration has a field of the wrong type: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("network configuration is invalid: {field} {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

/// One GC attachment the runtime still considers valid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GcAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The spec's plugin configuration fields plus tortie's client keys. Everything else the
/// daemon may need (Calico keys such as `ipam.ipv4_pools`, `mtu`) stays in the raw JSON that
/// travels alongside.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConf {
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_version: Option<String>,
    #[serde(
        rename = "cniVersions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_versions: Option<Vec<String>>,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<BTreeMap<String, bool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
    #[serde(
        rename = "runtimeConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub runtime_config: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(
        rename = "prevResult",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prev_result: Option<Value>,
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<GcAttachment>>,
    /// libcni also injects the name an earlier draft of the spec used (libcni issue #1101).
    #[serde(
        rename = "cni.dev/attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub legacy_attachments: Option<Vec<GcAttachment>>,
    /// tortie: path of the daemon's unix socket (default [`DEFAULT_SOCKET`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// tortie: overall budget for one request to the daemon, in seconds (default per command,
    /// see [`default_timeout`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// The client keys tortie reads, either at the top level or (for `tortie-ipam`, which
/// receives the main plugin's config) inside the `ipam` object, which wins.
#[derive(Debug, Default, Deserialize)]
struct ClientKeys {
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

/// Where and how long to talk to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    pub socket: PathBuf,
    pub timeout: Duration,
}

/// Budgets chosen so the plugin answers before the kubelet's runtime request timeout
/// (2 min): ADD and DEL get Calico's 90 s IPAM budget, STATUS must be quick because
/// runtimes poll it, GC may walk every allocation of the node.
pub fn default_timeout(command: Command) -> Duration {
    match command {
        Command::Add | Command::Del => Duration::from_secs(90),
        Command::Check => Duration::from_secs(30),
        Command::Gc => Duration::from_secs(60),
        Command::Status | Command::Version => Duration::from_secs(5),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Container IDs and network names share the spec's character rule.
pub fn is_valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl NetConf {
    /// Decodes stdin. Returns the typed view and the raw object (passed to the daemon as-is).
    pub fn decode(bytes: &[u8]) -> Result<(NetConf, Value), NetConfError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(NetConfError::NotJson)?;
        if !raw.is_object() {
            return Err(NetConfError::NotAnObject {
                kind: json_kind(&raw),
            });
        }
        let conf: NetConf = serde_json::from_value(raw.clone()).map_err(NetConfError::Decode)?;
        Ok((conf, raw))
    }

    pub fn version(&self) -> Result<CniVersion, VersionError> {
        version::select(self.cni_version.as_deref(), self.cni_versions.as_deref())
    }

    /// Checks what the spec requires of every plugin config.
    pub fn validate(&self) -> Result<(), NetConfError> {
        if self.name.is_empty() {
            return Err(NetConfError::Invalid {
                field: "name",
                problem: "is missing".into(),
            });
        }
        if !is_valid_identifier(&self.name) {
            return Err(NetConfError::Invalid {
                field: "name",
                problem: format!(
                    "{:?} must start with a letter or digit and contain only letters, digits, '_', '.', '-'",
                    self.name
                ),
            });
        }
        if self.plugin_type.is_empty() {
            return Err(NetConfError::Invalid {
                field: "type",
                problem: "is missing".into(),
            });
        }
        if self.timeout_seconds == Some(0) {
            return Err(NetConfError::Invalid {
                field: "timeout_seconds",
                problem: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// GC's valid attachments under either key; none given means "nothing is valid".
    pub fn gc_attachments(&self) -> Vec<GcAttachment> {
        self.valid_attachments
            .clone()
            .or_else(|| self.legacy_attachments.clone())
            .unwrap_or_default()
    }

    pub fn client_settings(
        &self,
        kind: PluginKind,
        command: Command,
    ) -> Result<ClientSettings, NetConfError> {
        let nested = match (kind, &self.ipam) {
            (PluginKind::Ipam, Some(ipam)) => serde_json::from_value::<ClientKeys>(ipam.clone())
                .map_err(|e| NetConfError::Invalid {
                    field: "ipam",
                    problem: format!("has a socket or timeout_seconds of the wrong type: {e}"),
                })?,
            _ => ClientKeys::default(),
        };
        if nested.timeout_seconds == Some(0) {
            return Err(NetConfError::Invalid {
                field: "ipam.timeout_seconds",
                problem: "must be at least 1".into(),
            });
        }
        let socket = nested
            .socket
            .or_else(|| self.socket.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        if !socket.is_absolute() {
            return Err(NetConfError::Invalid {
                field: "socket",
                problem: format!("{} must be an absolute path", socket.display()),
            });
        }
        let timeout = nested
            .timeout_seconds
            .or(self.timeout_seconds)
            .map(Duration::from_secs)
            .unwrap_or_else(|| default_timeout(command));
        Ok(ClientSettings { socket, timeout })
    }
}

/// A network configuration list (`*.conflist`), for code that writes or checks them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConfList {
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_version: Option<String>,
    /// 1.1.0: every version this list is valid for.
    #[serde(
        rename = "cniVersions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_versions: Option<Vec<String>>,
    pub name: String,
    #[serde(
        rename = "disableCheck",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub disable_check: bool,
    /// 1.1.0
    #[serde(
        rename = "disableGC",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub disable_gc: bool,
    pub plugins: Vec<Value>,
}

impl NetConfList {
    /// The version a runtime that knows every version tortie knows would pick: the highest
    /// common entry of `cniVersions` if given (1.1.0 runtimes prefer it), else `cniVersion`.
    pub fn negotiated_version(&self) -> Result<CniVersion, VersionError> {
        match &self.cni_versions {
            Some(list) if !list.is_empty() => version::select(None, Some(list)),
            _ => version::select(self.cni_version.as_deref(), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(v: Value) -> NetConf {
        NetConf::decode(v.to_string().as_bytes()).unwrap().0
    }

    #[test]
    fn decodes_calico_style_conf_and_keeps_raw_keys() {
        let v = json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tortie",
            "mtu": 1450, "ipam": {"type": "tortie-ipam", "ipv4_pools": ["default-ipv4-ippool"]},
            "socket": "/run/x.sock"
        });
        let (conf, raw) = NetConf::decode(v.to_string().as_bytes()).unwrap();
        assert_eq!(conf.version(), Ok(CniVersion::V1_0_0));
        assert_eq!(conf.name, "k8s-pod-network");
        assert_eq!(raw["mtu"], 1450);
        conf.validate().unwrap();
    }

    #[test]
    fn not_json_and_not_object_are_decode_failures() {
        assert!(matches!(
            NetConf::decode(b"{not json"),
            Err(NetConfError::NotJson(_))
        ));
        assert!(matches!(
            NetConf::decode(b"[1,2]"),
            Err(NetConfError::NotAnObject { kind: "an array" })
        ));
        assert!(matches!(
            NetConf::decode(br#"{"name": 5}"#),
            Err(NetConfError::Decode(_))
        ));
    }

    #[test]
    fn missing_or_bad_name_is_invalid_config() {
        let err = decode(json!({"cniVersion": "1.0.0", "type": "tortie"}))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("name is missing"), "{err}");
        let err = decode(json!({"cniVersion": "1.0.0", "type": "tortie", "name": "-x"}))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("\"-x\""), "{err}");
    }

    #[test]
    fn missing_type_is_invalid_config() {
        let err = decode(json!({"cniVersion": "1.0.0", "name": "n"}))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("type is missing"), "{err}");
    }

    #[test]
    fn identifiers_follow_the_spec_rule() {
        for ok in ["a", "0abc", "k8s-pod-network", "a_b.c-d"] {
            assert!(is_valid_identifier(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", "a b", "a/b", "ä"] {
            assert!(!is_valid_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn client_settings_default_to_the_standard_socket_and_command_budget() {
        let conf = decode(json!({"cniVersion": "1.0.0", "name": "n", "type": "tortie"}));
        let s = conf
            .client_settings(PluginKind::Main, Command::Add)
            .unwrap();
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(s.timeout, Duration::from_secs(90));
        let s = conf
            .client_settings(PluginKind::Main, Command::Status)
            .unwrap();
        assert_eq!(s.timeout, Duration::from_secs(5));
    }

    #[test]
    fn ipam_plugin_reads_socket_from_ipam_section_first() {
        let conf = decode(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "bridge", "socket": "/top.sock",
            "ipam": {"type": "tortie-ipam", "socket": "/ipam.sock", "timeout_seconds": 7}
        }));
        let s = conf
            .client_settings(PluginKind::Ipam, Command::Add)
            .unwrap();
        assert_eq!(s.socket, PathBuf::from("/ipam.sock"));
        assert_eq!(s.timeout, Duration::from_secs(7));
        let s = conf
            .client_settings(PluginKind::Main, Command::Add)
            .unwrap();
        assert_eq!(s.socket, PathBuf::from("/top.sock"));
    }

    #[test]
    fn relative_socket_path_is_invalid() {
        let conf =
            decode(json!({"cniVersion": "1.0.0", "name": "n", "type": "t", "socket": "x.sock"}));
        assert!(
            conf.client_settings(PluginKind::Main, Command::Add)
                .is_err()
        );
    }

    #[test]
    fn gc_attachments_accept_both_keys() {
        let conf = decode(json!({
            "cniVersion": "1.1.0", "name": "n", "type": "t",
            "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}],
            "cni.dev/attachments": [{"containerID": "c1", "ifname": "eth0"}]
        }));
        assert_eq!(
            conf.gc_attachments(),
            vec![GcAttachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }]
        );
        let conf = decode(json!({
            "cniVersion": "1.1.0", "name": "n", "type": "t",
            "cni.dev/attachments": [{"containerID": "c2", "ifname": "eth0"}]
        }));
        assert_eq!(conf.gc_attachments()[0].container_id, "c2");
    }

    #[test]
    fn conflist_prefers_cni_versions() {
        let list: NetConfList = serde_json::from_value(json!({
            "cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"],
            "name": "k8s-pod-network", "plugins": [{"type": "tortie"}]
        }))
        .unwrap();
        assert_eq!(list.negotiated_version(), Ok(CniVersion::V1_1_0));
        let list: NetConfList = serde_json::from_value(json!({
            "cniVersion": "0.3.1", "name": "k8s-pod-network", "plugins": []
        }))
        .unwrap();
        assert_eq!(list.negotiated_version(), Ok(CniVersion::V0_3_1));
    }
}
