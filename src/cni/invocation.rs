//! What the runtime tells the plugin through the environment: the command, container ID,
//! netns path, interface name, and `CNI_ARGS` (with the kubelet's K8S_POD_* keys pulled out).
//! Sans-IO: the environment comes in as a lookup function, so every rule is unit-tested.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::netconf::is_valid_identifier;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Version,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
            Command::Gc => "GC",
        }
    }

    /// Commands that act on one attachment (container ID + interface).
    pub fn is_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which binary the runtime ran: `tortie` (full plugin: interface, addresses, routes) or
/// `tortie-ipam` (addresses only, for chaining behind another main plugin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    Main,
    Ipam,
}

impl PluginKind {
    /// Decided by the basename of argv[0], as Calico does for `calico`/`calico-ipam`.
    pub fn from_argv0(argv0: Option<&std::ffi::OsStr>) -> PluginKind {
        let base = argv0
            .and_then(|a| Path::new(a).file_name())
            .and_then(|b| b.to_str())
            .unwrap_or("");
        if base.ends_with("-ipam") {
            PluginKind::Ipam
        } else {
            PluginKind::Main
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvocationError {
    #[error("CNI_COMMAND is not set")]
    MissingCommand,
    #[error("CNI_COMMAND {value:?} is not one of ADD, DEL, CHECK, STATUS, VERSION, GC")]
    UnknownCommand { value: String },
    #[error("required environment variables missing for {command}: {}", names.join(", "))]
    Missing {
        command: Command,
        names: Vec<&'static str>,
    },
    #[error("{name}={value:?} is invalid: {problem}")]
    Invalid {
        name: &'static str,
        value: String,
        problem: &'static str,
    },
}

/// Keys of `CNI_ARGS`, with the ones the kubelet (dockershim/CRI runtimes) sets pulled out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_infra_container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_uid: Option<String>,
    /// Every pair as given (including the ones above), e.g. Calico's `IP=` request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub all: BTreeMap<String, String>,
}

impl CniArgs {
    /// `KEY=VALUE` pairs separated by `;`. Empty segments are skipped; a value may contain
    /// `=`; a later duplicate wins.
    pub fn parse(s: &str) -> Result<CniArgs, InvocationError> {
        let mut args = CniArgs::default();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(InvocationError::Invalid {
                    name: "CNI_ARGS",
                    value: s.to_string(),
                    problem: "every ';'-separated item must be KEY=VALUE",
                });
            };
            if key.is_empty() {
                return Err(InvocationError::Invalid {
                    name: "CNI_ARGS",
                    value: s.to_string(),
                    problem: "an item has an empty key",
                });
            }
            args.all.insert(key.to_string(), value.to_string());
        }
        let get = |k: &str| args.all.get(k).filter(|v| !v.is_empty()).cloned();
        args.k8s_pod_namespace = get("K8S_POD_NAMESPACE");
        args.k8s_pod_name = get("K8S_POD_NAME");
        args.k8s_pod_infra_container_id = get("K8S_POD_INFRA_CONTAINER_ID");
        args.k8s_pod_uid = get("K8S_POD_UID");
        Ok(args)
    }
}

/// The environment of one invocation, validated for its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: Option<String>,
    /// CNI_NETNS as given; `None` when unset or empty (allowed for DEL).
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: CniArgs,
    pub cni_path: Option<String>,
}

/// Linux interface name rules as the spec states them (IFNAMSIZ is 16 with the NUL).
fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.len() > 15 {
        return Err("must be at most 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("must not be '.' or '..'");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err("must not contain '/', ':' or whitespace");
    }
    Ok(())
}

impl Invocation {
    /// Reads only CNI_COMMAND (VERSION needs nothing else, and errors need the command).
    pub fn command(env: &dyn Fn(&str) -> Option<String>) -> Result<Command, InvocationError> {
        let value = env("CNI_COMMAND")
            .filter(|v| !v.is_empty())
            .ok_or(InvocationError::MissingCommand)?;
        Command::parse(&value).ok_or(InvocationError::UnknownCommand { value })
    }

    /// Reads and validates the variables `command` needs. CNI_PATH is never required: the
    /// plugin delegates to no other plugin.
    pub fn from_env(
        command: Command,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Invocation, InvocationError> {
        let get = |name: &str| env(name).filter(|v| !v.is_empty());
        let container_id = get("CNI_CONTAINERID");
        let netns = get("CNI_NETNS");
        let ifname = get("CNI_IFNAME");

        let mut missing = Vec::new();
        if command.is_attachment() {
            if container_id.is_none() {
                missing.push("CNI_CONTAINERID");
            }
            // DEL must work after the netns is gone, so the runtime may omit it.
            if netns.is_none() && command != Command::Del {
                missing.push("CNI_NETNS");
            }
            if ifname.is_none() {
                missing.push("CNI_IFNAME");
            }
        }
        if !missing.is_empty() {
            return Err(InvocationError::Missing {
                command,
                names: missing,
            });
        }
        if let Some(id) = &container_id
            && !is_valid_identifier(id)
        {
            return Err(InvocationError::Invalid {
                name: "CNI_CONTAINERID",
                value: id.clone(),
                problem: "must start with a letter or digit and contain only letters, digits, '_', '.', '-'",
            });
        }
        if let Some(name) = &ifname {
            check_ifname(name).map_err(|problem| InvocationError::Invalid {
                name: "CNI_IFNAME",
                value: name.clone(),
                problem,
            })?;
        }
        let args = match get("CNI_ARGS") {
            Some(s) => CniArgs::parse(&s)?,
            None => CniArgs::default(),
        };
        Ok(Invocation {
            command,
            container_id,
            netns,
            ifname,
            args,
            cni_path: get("CNI_PATH"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const ADD_ENV: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1",
        ),
    ];

    #[test]
    fn parses_kubelet_cni_args() {
        let inv = Invocation::from_env(Command::Add, &env_of(&ADD_ENV)).unwrap();
        assert_eq!(inv.args.k8s_pod_namespace.as_deref(), Some("default"));
        assert_eq!(inv.args.k8s_pod_name.as_deref(), Some("web-0"));
        assert_eq!(
            inv.args.k8s_pod_infra_container_id.as_deref(),
            Some("abc123")
        );
        assert_eq!(inv.args.k8s_pod_uid.as_deref(), Some("u-1"));
        assert_eq!(inv.args.all["IgnoreUnknown"], "1");
    }

    #[test]
    fn cni_args_edge_cases() {
        let a = CniArgs::parse(";A=1;;B=x=y;A=2;").unwrap();
        assert_eq!(a.all["A"], "2");
        assert_eq!(a.all["B"], "x=y");
        assert!(CniArgs::parse("").unwrap().all.is_empty());
        let a = CniArgs::parse("K8S_POD_NAME=").unwrap();
        assert_eq!(a.k8s_pod_name, None);
        assert!(CniArgs::parse("A=1;garbage").is_err());
        assert!(CniArgs::parse("=1").is_err());
    }

    #[test]
    fn add_without_netns_names_the_missing_variable() {
        let env: Vec<_> = ADD_ENV
            .iter()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .copied()
            .collect();
        let err = Invocation::from_env(Command::Add, &env_of(&env)).unwrap_err();
        assert_eq!(
            err,
            InvocationError::Missing {
                command: Command::Add,
                names: vec!["CNI_NETNS"]
            }
        );
        assert!(err.to_string().contains("CNI_NETNS"));
    }

    #[test]
    fn del_without_netns_is_fine() {
        let env: Vec<_> = ADD_ENV
            .iter()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .copied()
            .collect();
        let inv = Invocation::from_env(Command::Del, &env_of(&env)).unwrap();
        assert_eq!(inv.netns, None);
    }

    #[test]
    fn gc_and_status_need_no_attachment_variables() {
        let env = env_of(&[("CNI_COMMAND", "GC")]);
        assert!(Invocation::from_env(Command::Gc, &env).is_ok());
        assert!(Invocation::from_env(Command::Status, &env).is_ok());
    }

    #[test]
    fn empty_variable_counts_as_missing() {
        let mut env = ADD_ENV.to_vec();
        env[1] = ("CNI_CONTAINERID", "");
        env[3] = ("CNI_IFNAME", "");
        let err = Invocation::from_env(Command::Check, &env_of(&env)).unwrap_err();
        assert!(
            matches!(err, InvocationError::Missing { ref names, .. } if names == &vec!["CNI_CONTAINERID", "CNI_IFNAME"])
        );
    }

    #[test]
    fn bad_container_id_and_ifname_are_rejected() {
        let mut env = ADD_ENV.to_vec();
        env[1] = ("CNI_CONTAINERID", "-bad id");
        let err = Invocation::from_env(Command::Add, &env_of(&env)).unwrap_err();
        assert!(
            err.to_string().starts_with("CNI_CONTAINERID=\"-bad id\""),
            "{err}"
        );
        for bad in ["a/b", "eth 0", "0123456789abcdef", "..", "a:b"] {
            let mut env = ADD_ENV.to_vec();
            env[3] = ("CNI_IFNAME", bad);
            let err = Invocation::from_env(Command::Add, &env_of(&env)).unwrap_err();
            assert!(
                matches!(
                    err,
                    InvocationError::Invalid {
                        name: "CNI_IFNAME",
                        ..
                    }
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn command_parsing() {
        assert_eq!(
            Invocation::command(&env_of(&[("CNI_COMMAND", "GC")])),
            Ok(Command::Gc)
        );
        assert_eq!(
            Invocation::command(&env_of(&[])),
            Err(InvocationError::MissingCommand)
        );
        assert!(matches!(
            Invocation::command(&env_of(&[("CNI_COMMAND", "add")])),
            Err(InvocationError::UnknownCommand { .. })
        ));
    }

    #[test]
    fn kind_comes_from_argv0_basename() {
        use std::ffi::OsStr;
        assert_eq!(
            PluginKind::from_argv0(Some(OsStr::new("/opt/cni/bin/tortie-ipam"))),
            PluginKind::Ipam
        );
        assert_eq!(
            PluginKind::from_argv0(Some(OsStr::new("/opt/cni/bin/tortie"))),
            PluginKind::Main
        );
        assert_eq!(PluginKind::from_argv0(None), PluginKind::Main);
    }
}
