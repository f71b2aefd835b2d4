//! A desired nftables table, generic enough for every user (NAT now, policy next): named sets
//! with typed elements, and chains holding rules written in nft's own syntax. The nft driver
//! (`dataplane::nft`) renders the difference between two of these into one transaction.
//!
//! Named verdict maps (`type ifname : verdict`) let a lookup grow by elements instead of by
//! rewriting the rule that holds it. Named counter objects are not declared on their own:
//! a rule's `counter name "…"` statement is the declaration, so a counter exists exactly
//! while a rule counts into it, and rewriting a chain keeps the counts of the counters its
//! new rules still name.
//!
//! Rules are text, not a typed AST: nft's syntax is the stable, documented interface, and a
//! rule is only ever compared whole. Each rule carries an id (a hash of its text) that the
//! driver writes as the rule's comment, so a listing of the kernel's table can be compared
//! with the desired one without parsing rule expressions back (Felix does the same).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha1::{Digest, Sha1};

/// The prefix of every rule comment tortie writes; the rest is the rule id.
pub const RULE_COMMENT_PREFIX: &str = "tortie:";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Inet,
    Ip,
    Ip6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Inet => "inet",
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        }
    }

    pub fn parse(s: &str) -> Option<Family> {
        match s {
            "inet" => Some(Family::Inet),
            "ip" => Some(Family::Ip),
            "ip6" => Some(Family::Ip6),
            _ => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One element of a set. Prefixes are stored truncated, so equal networks compare equal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    Net(IpNet),
    Port(u16),
    /// Anything else in nft's syntax (interface names, concatenations): compared as text.
    Text(String),
}

impl Element {
    pub fn net(net: IpNet) -> Element {
        Element::Net(net.trunc())
    }

    pub fn v4(net: Ipv4Net) -> Element {
        Element::net(IpNet::V4(net))
    }

    pub fn v6(net: Ipv6Net) -> Element {
        Element::net(IpNet::V6(net))
    }
}

impl fmt::Display for Element {
    /// nft's syntax: a full-length prefix is written (and listed) as a bare address.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Element::Net(n) if n.prefix_len() == n.max_prefix_len() => write!(f, "{}", n.addr()),
            Element::Net(n) => write!(f, "{n}"),
            Element::Port(p) => write!(f, "{p}"),
            Element::Text(t) => f.write_str(t),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    /// nft's type name: `ipv4_addr`, `ipv6_addr`, `inet_service`, `ifname`, …
    pub kind: String,
    /// `interval`, `timeout`, … in nft's spelling.
    pub flags: Vec<String>,
    pub elements: BTreeSet<Element>,
}

impl Set {
    /// An interval set of prefixes (the shape of pool and CIDR sets).
    pub fn prefixes(kind: &str, elements: impl IntoIterator<Item = Element>) -> Set {
        Set {
            kind: kind.to_string(),
            flags: vec!["interval".to_string()],
            elements: elements.into_iter().collect(),
        }
    }

    /// Same type and flags: only elements differ, so the set can be updated in place.
    pub fn same_shape(&self, other: &Set) -> bool {
        self.kind == other.kind && self.flags == other.flags
    }
}

/// A base chain's hook; None for a regular chain reached by jump/goto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `filter`, `nat`, `route`.
    pub kind: String,
    /// `prerouting`, `input`, `forward`, `output`, `postrouting`.
    pub hook: String,
    pub priority: i32,
    /// `accept` or `drop`.
    pub policy: String,
}

/// One rule in nft syntax, without a comment (the driver adds the id as the comment).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub text: String,
}

impl Rule {
    pub fn new(text: impl Into<String>) -> Rule {
        Rule { text: text.into() }
    }

    /// A short, stable id of the rule's text: what the driver writes as its comment.
    pub fn id(&self) -> String {
        let digest = Sha1::digest(self.text.as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A rule counting into the named counter object `name` (nft's identifier syntax:
    /// letters, digits, `/ - _ .`, starting with a letter), then doing `rest`.
    pub fn counted(name: &str, rest: &str) -> Rule {
        Rule::new(
            format!("counter name \"{name}\" {rest}")
                .trim_end()
                .to_string(),
        )
    }

    /// The named counter this rule counts into, if any.
    pub fn counter(&self) -> Option<&str> {
        let (_, rest) = self.text.split_once(COUNTER_NAME)?;
        rest.split_once('"').map(|(name, _)| name)
    }
}

const COUNTER_NAME: &str = "counter name \"";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub hook: Option<Hook>,
    pub rules: Vec<Rule>,
}

impl Chain {
    /// The named counters this chain's rules count into.
    pub fn counters(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().filter_map(Rule::counter)
    }
}

/// A named map from keys to verdicts (`type ifname : verdict`). Keys are written as nft
/// lists them (interface names without quotes); values are verdicts in nft's syntax
/// (`goto fw-cali0123456789a`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map {
    /// The key's nft type: `ifname`, `ipv4_addr`, …
    pub key: String,
    pub elements: BTreeMap<String, String>,
}

impl Map {
    pub fn verdicts(key: &str) -> Map {
        Map {
            key: key.to_string(),
            elements: BTreeMap::new(),
        }
    }

    /// A key as nft's input syntax wants it (interface names are strings).
    pub fn key_text(&self, k: &str) -> String {
        if self.key == "ifname" {
            format!("\"{k}\"")
        } else {
            k.to_string()
        }
    }
}

/// A whole table as tortie wants it. Sets and maps come before chains when rendered (rules
/// refer to them by name); map elements name chains, so they are written after them.
/// Set and map names share one namespace in nft (a map is a set with values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub sets: BTreeMap<String, Set>,
    pub maps: BTreeMap<String, Map>,
    pub chains: BTreeMap<String, Chain>,
}

impl Table {
    pub fn new(family: Family, name: impl Into<String>) -> Table {
        Table {
            family,
            name: name.into(),
            sets: BTreeMap::new(),
            maps: BTreeMap::new(),
            chains: BTreeMap::new(),
        }
    }

    /// Every named counter the table's rules count into.
    pub fn counters(&self) -> BTreeSet<String> {
        self.chains
            .values()
            .flat_map(Chain::counters)
            .map(String::from)
            .collect()
    }

    /// What a listing of the kernel's table can be compared with: sets in full, chains by
    /// their hook and the ids of their rules in order.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            sets: self.sets.clone(),
            maps: self.maps.clone(),
            counters: self.counters(),
            chains: self
                .chains
                .iter()
                .map(|(name, c)| {
                    let ids = c.rules.iter().map(Rule::id).collect();
                    (name.clone(), (c.hook.clone(), ids))
                })
                .collect(),
            foreign: Vec::new(),
        }
    }
}

/// A table reduced to what both the desired model and a kernel listing can say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint {
    pub sets: BTreeMap<String, Set>,
    pub maps: BTreeMap<String, Map>,
    /// Named counter objects (their values are not part of the comparison).
    pub counters: BTreeSet<String>,
    /// Chain name → (hook, rule ids in order).
    pub chains: BTreeMap<String, (Option<Hook>, Vec<String>)>,
    /// Objects the model never holds (flowtables, quotas, rules without tortie's comment, …),
    /// described in a line each: any of them is drift.
    pub foreign: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ids_are_stable_and_differ_by_text() {
        let a = Rule::new("udp dport 4789 counter notrack");
        assert_eq!(a.id(), Rule::new("udp dport 4789 counter notrack").id());
        assert_ne!(a.id(), Rule::new("udp dport 4790 counter notrack").id());
        assert_eq!(a.id().len(), 16);
    }

    #[test]
    fn counted_rules_name_their_counter() {
        let r = Rule::counted("pi-knp.ns.x/0/deny", "drop");
        assert_eq!(r.text, "counter name \"pi-knp.ns.x/0/deny\" drop");
        assert_eq!(r.counter(), Some("pi-knp.ns.x/0/deny"));
        assert_eq!(Rule::new("counter drop").counter(), None);
        let mut t = Table::new(Family::Inet, "t");
        t.chains.insert(
            "c".into(),
            Chain {
                hook: None,
                rules: vec![r, Rule::counted("c/1", "")],
            },
        );
        assert_eq!(
            t.counters().into_iter().collect::<Vec<_>>(),
            ["c/1", "pi-knp.ns.x/0/deny"]
        );
        assert_eq!(t.chains["c"].rules[1].text, "counter name \"c/1\"");
    }

    #[test]
    fn elements_are_truncated_and_host_prefixes_print_bare() {
        let e = Element::net("10.1.3.7/16".parse().unwrap());
        assert_eq!(e.to_string(), "10.1.0.0/16");
        assert_eq!(
            Element::net("10.9.9.9/32".parse().unwrap()).to_string(),
            "10.9.9.9"
        );
        assert_eq!(
            Element::net("fd00::1/128".parse().unwrap()).to_string(),
            "fd00::1"
        );
    }
}
