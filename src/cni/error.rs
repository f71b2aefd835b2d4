//! The CNI error object (`code`, `msg`, `details`) and the well-known codes of spec 1.1.0,
//! plus the few codes tortie adds (100 and up are plugin-defined by the spec).
//! Every failure of the plugin ends up as one of these on stdout.

use serde::{Deserialize, Serialize};

use super::version::CniVersion;

/// Well-known error codes (spec 1.1.0, "Error" section). 0–99 belong to the spec.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration (message names key and value).
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist; the runtime need not clean up.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (message names the variables).
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// I/O failure, e.g. reading stdin.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content, e.g. stdin is not JSON.
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Transient condition: the runtime should retry later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: not available, and existing containers may have limited connectivity.
    pub const PLUGIN_NOT_AVAILABLE_LIMITED: u32 = 51;
    /// tortie: the daemon answered, but not in a form the plugin understands
    /// (version skew between the plugin binary on the host and the daemon).
    pub const DAEMON_PROTOCOL: u32 = 100;
}

/// A CNI error as the spec defines it. The daemon answers with these too, so its codes
/// reach the runtime unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The JSON printed on stdout: the error object plus the `cniVersion` of the invocation.
    pub fn to_output(&self, version: CniVersion) -> serde_json::Value {
        let mut out = serde_json::json!({
            "cniVersion": version.as_str(),
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            out["details"] = serde_json::Value::String(self.details.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_carries_version_code_msg_and_details() {
        let e = CniError::new(code::INVALID_CONFIG, "bad").with_details("why");
        let out = e.to_output(CniVersion::V0_4_0);
        assert_eq!(
            out,
            serde_json::json!({"cniVersion": "0.4.0", "code": 7, "msg": "bad", "details": "why"})
        );
    }

    #[test]
    fn empty_details_are_left_out() {
        let out = CniError::new(code::IO_FAILURE, "x").to_output(CniVersion::V1_1_0);
        assert!(out.get("details").is_none());
    }

    #[test]
    fn decodes_error_without_details() {
        let e: CniError = serde_json::from_str(r#"{"code":11,"msg":"later"}"#).unwrap();
        assert_eq!(e, CniError::new(code::TRY_AGAIN_LATER, "later"));
    }
}
