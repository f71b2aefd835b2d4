//! Parsing of an autodetection method string (`first-found`, `interface=eth.*`, …) into
//! `Method`, and Calico's default interface exclusions. Pure.

use std::fmt;
use std::sync::LazyLock;

use ipnet::IpNet;
use regex::Regex;

use super::IdentityError;

/// Calico's `DEFAULT_INTERFACES_TO_EXCLUDE` (calico-node's autodetection, current master):
/// container, bridge, tunnel and CNI devices that never carry the node address.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "^docker.*",
    "^cbr.*",
    "^dummy.*",
    "^podman.*",
    "^virbr.*",
    "^lxcbr.*",
    "^veth.*",
    "^lo",
    "^br-.*",
    "^cali.*",
    "^tunl.*",
    "^flannel.*",
    "^kube-ipvs.*",
    "^cni.*",
    r"^vxlan\.calico.*",
    r"^vxlan-v6\.calico.*",
    r"^wireguard\.cali.*",
    r"^wg-v6\.cali.*",
    "^nodelocaldns.*",
];

/// A comma-separated list of interface-name regexes. Like Go's `MatchString`, a pattern
/// matches anywhere in the name unless anchored.
#[derive(Clone)]
pub struct NamePatterns {
    sources: Vec<String>,
    any: Regex,
}

impl NamePatterns {
    fn compile(method: &str, sources: Vec<String>) -> Result<NamePatterns, IdentityError> {
        for pattern in &sources {
            if let Err(e) = Regex::new(pattern) {
                return Err(IdentityError::BadRegex {
                    method: method.to_owned(),
                    pattern: pattern.clone(),
                    reason: e.to_string(),
                });
            }
        }
        let joined = format!("({})", sources.join(")|("));
        let any = Regex::new(&joined).map_err(|e| IdentityError::BadRegex {
            method: method.to_owned(),
            pattern: joined.clone(),
            reason: e.to_string(),
        })?;
        Ok(NamePatterns { sources, any })
    }

    /// Calico's default exclusions.
    pub fn defaults() -> NamePatterns {
        static DEFAULTS: LazyLock<NamePatterns> = LazyLock::new(|| {
            let sources = DEFAULT_EXCLUDES.iter().map(|s| (*s).to_owned()).collect();
            NamePatterns::compile("first-found", sources)
                .expect("the default exclusions are valid regexes")
        });
        DEFAULTS.clone()
    }

    /// Calico's default exclusions plus `extra`.
    fn defaults_and(method: &str, extra: &[String]) -> Result<NamePatterns, IdentityError> {
        let mut sources: Vec<String> = DEFAULT_EXCLUDES.iter().map(|s| (*s).to_owned()).collect();
        sources.extend(extra.iter().cloned());
        NamePatterns::compile(method, sources)
    }

    pub fn matches(&self, name: &str) -> bool {
        self.any.is_match(name)
    }

    pub fn sources(&self) -> &[String] {
        &self.sources
    }
}

impl fmt::Debug for NamePatterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.sources).finish()
    }
}

impl PartialEq for NamePatterns {
    fn eq(&self, other: &NamePatterns) -> bool {
        self.sources == other.sources
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// First global-unicast address on an interface outside the default exclusions.
    FirstFound,
    /// Only interfaces whose name matches one of the patterns (no default exclusions).
    Interface(NamePatterns),
    /// The default exclusions plus these patterns (`skip` holds both).
    SkipInterface {
        given: Vec<String>,
        skip: NamePatterns,
    },
    /// The first address inside one of the CIDRs, on any interface.
    Cidr(Vec<IpNet>),
    /// The source address the kernel picks towards this IP or host name.
    CanReach(String),
    /// The Node's InternalIP from status.addresses, with the prefix of the local interface.
    KubernetesInternalIp,
}

impl Method {
    /// Parses Calico's syntax; an empty string means `first-found`, as in Calico.
    pub fn parse(text: &str) -> Result<Method, IdentityError> {
        let method = text.trim();
        if method.is_empty() || method == "first-found" {
            return Ok(Method::FirstFound);
        }
        if method == "kubernetes-internal-ip" {
            return Ok(Method::KubernetesInternalIp);
        }
        let Some((kind, arg)) = method.split_once('=') else {
            return Err(IdentityError::UnknownMethod {
                method: method.to_owned(),
            });
        };
        let arg = arg.trim();
        let known = ["interface", "skip-interface", "cidr", "can-reach"];
        if !known.contains(&kind) {
            return Err(IdentityError::UnknownMethod {
                method: method.to_owned(),
            });
        }
        let items: Vec<String> = arg
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            return Err(IdentityError::EmptyArgument {
                method: method.to_owned(),
            });
        }
        match kind {
            "interface" => Ok(Method::Interface(NamePatterns::compile(method, items)?)),
            "skip-interface" => Ok(Method::SkipInterface {
                skip: NamePatterns::defaults_and(method, &items)?,
                given: items,
            }),
            "cidr" => items
                .iter()
                .map(|c| {
                    c.parse::<IpNet>()
                        .map(|n| n.trunc())
                        .map_err(|_| IdentityError::BadCidr {
                            method: method.to_owned(),
                            cidr: c.clone(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Method::Cidr),
            _ => Ok(Method::CanReach(arg.to_owned())),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::FirstFound => f.write_str("first-found"),
            Method::Interface(p) => write!(f, "interface={}", p.sources().join(",")),
            Method::SkipInterface { given, .. } => write!(f, "skip-interface={}", given.join(",")),
            Method::Cidr(c) => {
                let list: Vec<String> = c.iter().map(ToString::to_string).collect();
                write!(f, "cidr={}", list.join(","))
            }
            Method::CanReach(t) => write!(f, "can-reach={t}"),
            Method::KubernetesInternalIp => f.write_str("kubernetes-internal-ip"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_first_found_mean_first_found() {
        assert_eq!(Method::parse("").unwrap(), Method::FirstFound);
        assert_eq!(Method::parse(" first-found ").unwrap(), Method::FirstFound);
    }

    #[test]
    fn interface_list_is_split_on_commas_with_spaces() {
        let Method::Interface(p) = Method::parse("interface=eth0 , ens.*").unwrap() else {
            panic!("not interface=");
        };
        assert_eq!(p.sources(), ["eth0", "ens.*"]);
        assert!(p.matches("eth0"));
        assert!(p.matches("ens5"));
        // Unanchored, as Go's MatchString.
        assert!(p.matches("xeth0"));
        assert!(!p.matches("wlan0"));
    }

    #[test]
    fn skip_interface_adds_to_the_default_exclusions() {
        let Method::SkipInterface { given, skip } = Method::parse("skip-interface=^ens.*").unwrap()
        else {
            panic!("not skip-interface=");
        };
        assert_eq!(given, ["^ens.*"]);
        assert!(skip.matches("ens5"));
        assert!(skip.matches("cali123"));
        assert!(!skip.matches("eth0"));
    }

    #[test]
    fn default_exclusions_cover_calicos_devices() {
        let d = NamePatterns::defaults();
        assert_eq!(d.sources().len(), DEFAULT_EXCLUDES.len());
        for name in [
            "docker0",
            "cbr0",
            "dummy0",
            "podman0",
            "virbr0",
            "lxcbr0",
            "veth12",
            "lo",
            "br-1a2b",
            "cali1234",
            "tunl0",
            "flannel.1",
            "kube-ipvs0",
            "cni0",
            "vxlan.calico",
            "vxlan-v6.calico",
            "wireguard.cali",
            "wg-v6.cali",
            "nodelocaldns",
        ] {
            assert!(d.matches(name), "{name} must be excluded");
        }
        for name in ["eth0", "ens5", "enp0s3", "bond0", "vxlan0", "br0"] {
            assert!(!d.matches(name), "{name} must not be excluded");
        }
    }

    #[test]
    fn cidr_list_is_parsed_and_truncated() {
        assert_eq!(
            Method::parse("cidr=10.0.0.7/8, fd00::/64").unwrap(),
            Method::Cidr(vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/64".parse().unwrap()
            ])
        );
        let err = Method::parse("cidr=10.0.0.0/8,nonsense")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"nonsense\""), "{err}");
    }

    #[test]
    fn can_reach_keeps_its_target() {
        assert_eq!(
            Method::parse("can-reach=8.8.8.8").unwrap(),
            Method::CanReach("8.8.8.8".into())
        );
        assert_eq!(
            Method::parse("can-reach=www.example.com").unwrap(),
            Method::CanReach("www.example.com".into())
        );
    }

    #[test]
    fn unknown_method_error_names_it_and_lists_valid_ones() {
        for bad in [
            "first",
            "interfaces=eth0",
            "kubernetes-internal-ips",
            "magic",
        ] {
            let err = Method::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
            assert!(
                err.contains("first-found") && err.contains("can-reach="),
                "{err}"
            );
        }
    }

    #[test]
    fn bad_regex_and_empty_argument_are_errors() {
        let err = Method::parse("interface=eth(").unwrap_err().to_string();
        assert!(err.contains("\"eth(\""), "{err}");
        assert!(matches!(
            Method::parse("interface= , "),
            Err(IdentityError::EmptyArgument { .. })
        ));
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "first-found",
            "interface=eth0,ens.*",
            "skip-interface=ens.*",
            "cidr=10.0.0.0/8",
            "can-reach=1.2.3.4",
            "kubernetes-internal-ip",
        ] {
            assert_eq!(Method::parse(text).unwrap().to_string(), text);
        }
    }
}
