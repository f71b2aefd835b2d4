//! The policy model every source converts into: Calico's backend view of a policy (selectors
//! already rewritten with the namespace and `pcns.`/`pcsa.` prefixes, types defaulted, rules
//! parsed), plus how policies sort within the default tier.

use std::cmp::Ordering;
use std::fmt;

use ipnet::IpNet;

use crate::api::StagedAction;
use crate::selector::Selector;

use super::diagnostic::Diagnostic;
use super::endpoint::{Endpoint, NetworkSetEntry};
use super::ports::PortMatch;
use super::protocol::Protocol;

/// Which API object a policy came from; also the last tie-breaker of Calico's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum PolicyKind {
    KubernetesNetworkPolicy,
    NetworkPolicy,
    GlobalNetworkPolicy,
    StagedKubernetesNetworkPolicy,
    StagedNetworkPolicy,
    StagedGlobalNetworkPolicy,
}

impl PolicyKind {
    /// Calico's kind string (`model.PolicyKey.Kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::KubernetesNetworkPolicy => "KubernetesNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            PolicyKind::StagedKubernetesNetworkPolicy => "StagedKubernetesNetworkPolicy",
            PolicyKind::StagedNetworkPolicy => "StagedNetworkPolicy",
            PolicyKind::StagedGlobalNetworkPolicy => "StagedGlobalNetworkPolicy",
        }
    }

    /// The short kind Felix uses in chain names (`felix/types/policy_id.go`).
    pub fn short(self) -> &'static str {
        match self {
            PolicyKind::KubernetesNetworkPolicy => "knp",
            PolicyKind::NetworkPolicy => "np",
            PolicyKind::GlobalNetworkPolicy => "gnp",
            PolicyKind::StagedKubernetesNetworkPolicy => "sknp",
            PolicyKind::StagedNetworkPolicy => "snp",
            PolicyKind::StagedGlobalNetworkPolicy => "sgnp",
        }
    }

    pub fn is_staged(self) -> bool {
        matches!(
            self,
            PolicyKind::StagedKubernetesNetworkPolicy
                | PolicyKind::StagedNetworkPolicy
                | PolicyKind::StagedGlobalNetworkPolicy
        )
    }

    /// The kind a staged policy would become when enforced.
    pub fn enforced(self) -> PolicyKind {
        match self {
            PolicyKind::StagedKubernetesNetworkPolicy => PolicyKind::KubernetesNetworkPolicy,
            PolicyKind::StagedNetworkPolicy => PolicyKind::NetworkPolicy,
            PolicyKind::StagedGlobalNetworkPolicy => PolicyKind::GlobalNetworkPolicy,
            k => k,
        }
    }
}

/// A policy's identity: kind, namespace (empty for global kinds) and object name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PolicyId {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
}

impl PolicyId {
    /// The name users see, as Calico shows it: `knp.default.<name>` for Kubernetes
    /// policies, `staged:` in front of staged ones, `<ns>/` in front of namespaced ones.
    pub fn display_name(&self) -> String {
        let name = match self.kind {
            PolicyKind::KubernetesNetworkPolicy => format!("knp.default.{}", self.name),
            PolicyKind::StagedKubernetesNetworkPolicy => {
                format!("staged:knp.default.{}", self.name)
            }
            PolicyKind::StagedNetworkPolicy | PolicyKind::StagedGlobalNetworkPolicy => {
                format!("staged:{}", self.name)
            }
            _ => self.name.clone(),
        };
        if self.namespace.is_empty() {
            name
        } else {
            format!("{}/{}", self.namespace, name)
        }
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display_name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Action {
    Allow,
    Deny,
    /// Skip the rest of the tier; in the default tier that reaches the namespace profile.
    Pass,
    /// Log the packet and continue with the next rule.
    Log,
}

impl From<crate::api::Action> for Action {
    fn from(a: crate::api::Action) -> Self {
        match a {
            crate::api::Action::Allow => Action::Allow,
            crate::api::Action::Deny => Action::Deny,
            crate::api::Action::Pass => Action::Pass,
            crate::api::Action::Log => Action::Log,
        }
    }
}

/// ICMP type and optional code (a code always comes with a type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct IcmpMatch {
    pub type_: u8,
    pub code: Option<u8>,
}

/// One side (source or destination) of a rule. All present criteria must hold.
/// `selector` is the rewritten selector (namespace scoping and service accounts folded in);
/// it and `not_selector` match addresses of endpoints and network sets, as Felix's IP sets do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntityMatch {
    pub nets: Vec<IpNet>,
    pub not_nets: Vec<IpNet>,
    pub selector: Option<Selector>,
    pub not_selector: Option<Selector>,
    pub ports: Vec<PortMatch>,
    pub not_ports: Vec<PortMatch>,
}

/// The match part of a rule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleMatch {
    pub ip_version: Option<u8>,
    pub protocol: Option<Protocol>,
    pub not_protocol: Option<Protocol>,
    pub icmp: Option<IcmpMatch>,
    pub not_icmp: Option<IcmpMatch>,
    pub source: EntityMatch,
    pub destination: EntityMatch,
    /// Set when the rule uses something tortie cannot match for pods (`services`): the rule
    /// never matches, and a diagnostic says so.
    pub unmatchable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub action: Action,
    pub matches: RuleMatch,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub id: PolicyId,
    /// Absent sorts after every ordered policy (+Inf in Felix).
    pub order: Option<f64>,
    /// The rewritten selector over endpoints; `None` when it could not be parsed (the policy
    /// then selects nothing) or when the policy never applies to pods (doNotTrack, preDNAT,
    /// other tiers).
    pub selector: Option<Selector>,
    pub ingress_applies: bool,
    pub egress_applies: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// For staged kinds: what enforcing them would do.
    pub staged_action: Option<StagedAction>,
    /// The policy could not be fully understood: its rules were replaced by one Deny per
    /// direction so its endpoints fail closed.
    pub fail_closed: bool,
}

impl Policy {
    pub fn applies(&self, dir: Direction) -> bool {
        match dir {
            Direction::Ingress => self.ingress_applies,
            Direction::Egress => self.egress_applies,
        }
    }

    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub fn selects(&self, ep: &Endpoint) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|s| s.matches(&ep.labels))
    }
}

/// Calico's `PolKVLess`: lower order first, absent order last, ties by the string
/// `name/namespace/kind` (the object name, not the display name).
pub fn policy_order(a: &Policy, b: &Policy) -> Ordering {
    let ord = |p: &Policy| p.order.unwrap_or(f64::INFINITY);
    match ord(a).partial_cmp(&ord(b)) {
        Some(Ordering::Equal) | None => {
            let key =
                |p: &Policy| format!("{}/{}/{}", p.id.name, p.id.namespace, p.id.kind.as_str());
            key(a).cmp(&key(b))
        }
        Some(o) => o,
    }
}

/// Everything the evaluator and the compiler read: policies (sorted), endpoints, network
/// sets, and what was found wrong while building them.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// Enforced policies in evaluation order.
    pub policies: Vec<Policy>,
    /// Staged policies, in evaluation order; never enforced.
    pub staged: Vec<Policy>,
    pub endpoints: Vec<Endpoint>,
    pub network_sets: Vec<NetworkSetEntry>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Model {
    /// Adds a policy in its place (enforced or staged by kind).
    pub fn add_policy(&mut self, p: Policy) {
        let list = if p.id.kind.is_staged() {
            &mut self.staged
        } else {
            &mut self.policies
        };
        let at = list
            .binary_search_by(|q| policy_order(q, &p))
            .unwrap_or_else(|i| i);
        list.insert(at, p);
    }

    pub fn endpoint(&self, namespace: &str, name: &str) -> Option<&Endpoint> {
        self.endpoints
            .iter()
            .find(|e| e.namespace() == namespace && e.name() == name)
    }

    pub fn endpoint_by_ip(&self, ip: std::net::IpAddr) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.ips.contains(&ip))
    }
}
