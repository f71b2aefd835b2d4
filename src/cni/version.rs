//! CNI spec versions this plugin speaks, how one is chosen from a config (`cniVersion`, or
//! the 1.1.0 `cniVersions` list), and which commands each version allows.
//! Sans-IO: plain values in, plain values out.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::Command;

/// A CNI spec version with a result format this plugin can produce.
/// 0.1.0 and 0.2.0 (the `ip4`/`ip6` result format) are not supported: no runtime still in
/// support sends them, and Kubernetes' runtimes need 0.3.1 or later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// The version this plugin prefers and reports in VERSION output.
pub const CURRENT: CniVersion = CniVersion::V1_1_0;

/// Every version this plugin accepts, oldest first (the order VERSION prints them in).
pub const SUPPORTED: [CniVersion; 5] = [
    CniVersion::V0_3_0,
    CniVersion::V0_3_1,
    CniVersion::V0_4_0,
    CniVersion::V1_0_0,
    CniVersion::V1_1_0,
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    #[error(
        "CNI version {version:?} is not supported by tortie (supported: {})",
        supported_list()
    )]
    Unsupported { version: String },
    #[error(
        "cniVersion is missing (read as 0.1.0, which tortie does not support; supported: {})",
        supported_list()
    )]
    Missing,
    #[error(
        "cniVersions {offered:?} share no version with tortie (supported: {})",
        supported_list()
    )]
    NoCommonVersion { offered: Vec<String> },
    #[error(
        "config version {version} does not allow {command}: it needs cniVersion {minimum} or later"
    )]
    CommandNotAllowed {
        command: Command,
        version: CniVersion,
        minimum: CniVersion,
    },
}

fn supported_list() -> String {
    SUPPORTED
        .iter()
        .map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl CniVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Exact match on the version string, as libcni's reconciler does: "1.0" is not "1.0.0".
    pub fn parse(s: &str) -> Result<CniVersion, VersionError> {
        SUPPORTED
            .iter()
            .copied()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| VersionError::Unsupported {
                version: s.to_string(),
            })
    }

    /// Results in 0.3.x and 0.4.0 carry `"version": "4"|"6"` on each IP; 1.x dropped it.
    pub fn has_ip_version_field(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// The oldest version that defines `command` (CHECK came in 0.4.0, GC and STATUS in 1.1.0).
    pub fn minimum_for(command: Command) -> CniVersion {
        match command {
            Command::Check => CniVersion::V0_4_0,
            Command::Gc | Command::Status => CniVersion::V1_1_0,
            Command::Add | Command::Del | Command::Version => CniVersion::V0_3_0,
        }
    }

    pub fn allows(self, command: Command) -> Result<(), VersionError> {
        let minimum = CniVersion::minimum_for(command);
        if self < minimum {
            return Err(VersionError::CommandNotAllowed {
                command,
                version: self,
                minimum,
            });
        }
        Ok(())
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CniVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CniVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CniVersion::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Chooses the version of one invocation. A runtime injects the negotiated `cniVersion`
/// into each plugin's config, so when present it is authoritative; `cniVersions` (spec 1.1.0,
/// conflist level) is used only when `cniVersion` is absent, picking the highest common one.
pub fn select(
    cni_version: Option<&str>,
    cni_versions: Option<&[String]>,
) -> Result<CniVersion, VersionError> {
    if let Some(v) = cni_version {
        return CniVersion::parse(v);
    }
    match cni_versions {
        Some(list) if !list.is_empty() => list
            .iter()
            .filter_map(|v| CniVersion::parse(v).ok())
            .max()
            .ok_or_else(|| VersionError::NoCommonVersion {
                offered: list.to_vec(),
            }),
        _ => Err(VersionError::Missing),
    }
}

/// The VERSION command's answer.
pub fn version_output() -> serde_json::Value {
    serde_json::json!({
        "cniVersion": CURRENT.as_str(),
        "supportedVersions": SUPPORTED.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version_and_nothing_else() {
        for v in SUPPORTED {
            assert_eq!(CniVersion::parse(v.as_str()), Ok(v));
        }
        for bad in ["0.1.0", "0.2.0", "1.0", "9.9.9", "", "v1.0.0"] {
            assert!(CniVersion::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn cni_version_wins_over_cni_versions() {
        let list = vec!["1.1.0".to_string()];
        assert_eq!(select(Some("1.0.0"), Some(&list)), Ok(CniVersion::V1_0_0));
    }

    #[test]
    fn cni_versions_picks_highest_common_version() {
        let list: Vec<String> = ["0.4.0", "1.1.0", "2.0.0", "1.0.0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(select(None, Some(&list)), Ok(CniVersion::V1_1_0));
    }

    #[test]
    fn cni_versions_without_common_version_is_rejected() {
        let list = vec!["2.0.0".to_string(), "0.2.0".to_string()];
        assert!(matches!(
            select(None, Some(&list)),
            Err(VersionError::NoCommonVersion { .. })
        ));
    }

    #[test]
    fn missing_version_is_rejected_like_0_1_0() {
        assert_eq!(select(None, None), Err(VersionError::Missing));
        assert_eq!(select(None, Some(&[])), Err(VersionError::Missing));
    }

    #[test]
    fn check_needs_0_4_0_and_gc_status_need_1_1_0() {
        assert!(CniVersion::V0_3_1.allows(Command::Check).is_err());
        assert!(CniVersion::V0_4_0.allows(Command::Check).is_ok());
        assert!(CniVersion::V1_0_0.allows(Command::Gc).is_err());
        assert!(CniVersion::V1_0_0.allows(Command::Status).is_err());
        assert!(CniVersion::V1_1_0.allows(Command::Gc).is_ok());
        assert!(CniVersion::V0_3_0.allows(Command::Add).is_ok());
    }

    #[test]
    fn version_output_lists_supported_versions() {
        let out = version_output();
        assert_eq!(out["cniVersion"], "1.1.0");
        assert_eq!(
            out["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
}
