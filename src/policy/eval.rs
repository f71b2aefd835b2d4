//! The reference evaluator: given the model and a flow between two addresses, walk each
//! endpoint's default tier as Felix does (policies in order; Allow and Deny decide, Pass
//! goes to the namespace profile which allows, Log continues; a tier with policies that
//! decided nothing drops; no policy at all falls through to the profile and allows) and say
//! who decided. Selectors match addresses through endpoints and network sets, as IP sets do.

use std::net::IpAddr;

use super::endpoint::Endpoint;
use super::model::{Action, Direction, EntityMatch, Model, Policy, Rule};
use super::ports::PortMatch;
use super::protocol::Protocol;
use crate::selector::Selector;

/// One packet's 5-tuple (plus ICMP type/code for ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub src_port: u16,
    pub dst_port: u16,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
}

impl Flow {
    pub fn tcp(src: IpAddr, dst: IpAddr, dst_port: u16) -> Flow {
        Flow::new(src, dst, Protocol::TCP, dst_port)
    }

    pub fn new(src: IpAddr, dst: IpAddr, protocol: Protocol, dst_port: u16) -> Flow {
        Flow {
            src,
            dst,
            protocol,
            src_port: 40000,
            dst_port,
            icmp_type: None,
            icmp_code: None,
        }
    }
}

/// Why a direction was allowed or denied.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "by", rename_all = "kebab-case")]
pub enum Decision {
    /// No policy selects the endpoint in this direction: the namespace profile allows.
    NoPolicy,
    /// A rule with Allow or Deny decided.
    Rule {
        policy: String,
        rule: usize,
        action: Action,
    },
    /// A Pass rule skipped the rest of the tier; the namespace profile allows.
    Pass { policy: String, rule: usize },
    /// Policies selected the endpoint but none decided: the end of tier drops.
    EndOfTier { policies: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DirectionVerdict {
    pub direction: Direction,
    /// `namespace/pod` of the endpoint whose policy this is.
    pub endpoint: String,
    pub allowed: bool,
    pub decision: Decision,
    /// Log rules the packet hit on the way, as `(policy, rule)`.
    pub logged: Vec<(String, usize)>,
    /// Staged policies that would deny this packet if they were enforced.
    pub staged_would_deny: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verdict {
    pub flow: Flow,
    /// The source endpoint's egress, when the source is a pod.
    pub egress: Option<DirectionVerdict>,
    /// The destination endpoint's ingress, when the destination is a pod.
    pub ingress: Option<DirectionVerdict>,
    pub allowed: bool,
}

/// Evaluates a flow: egress at the source pod (if any), ingress at the destination pod
/// (if any). Allowed when every direction that applies allows.
pub fn evaluate(model: &Model, flow: &Flow) -> Verdict {
    let egress = model
        .endpoint_by_ip(flow.src)
        .map(|ep| direction(model, ep, Direction::Egress, flow));
    let ingress = model
        .endpoint_by_ip(flow.dst)
        .map(|ep| direction(model, ep, Direction::Ingress, flow));
    let allowed =
        egress.as_ref().is_none_or(|v| v.allowed) && ingress.as_ref().is_none_or(|v| v.allowed);
    Verdict {
        flow: *flow,
        egress,
        ingress,
        allowed,
    }
}

/// One endpoint's tier in one direction.
pub fn direction(model: &Model, ep: &Endpoint, dir: Direction, flow: &Flow) -> DirectionVerdict {
    let (allowed, decision, logged) = walk_tier(model, model.policies.iter(), ep, dir, flow);
    let staged_would_deny = model
        .staged
        .iter()
        .filter(|s| would_deny(model, s, ep, dir, flow))
        .map(|s| s.id.display_name())
        .collect();
    DirectionVerdict {
        direction: dir,
        endpoint: ep.key(),
        allowed,
        decision,
        logged,
        staged_would_deny,
    }
}

fn walk_tier<'a>(
    model: &Model,
    policies: impl Iterator<Item = &'a Policy>,
    ep: &Endpoint,
    dir: Direction,
    flow: &Flow,
) -> (bool, Decision, Vec<(String, usize)>) {
    let mut logged = Vec::new();
    let mut seen = Vec::new();
    for p in policies.filter(|p| p.applies(dir) && p.selects(ep)) {
        seen.push(p.id.display_name());
        for (i, r) in p.rules(dir).iter().enumerate() {
            if !rule_matches(model, r, flow) {
                continue;
            }
            let name = p.id.display_name();
            match r.action {
                Action::Log => logged.push((name, i)),
                Action::Allow | Action::Deny => {
                    let decision = Decision::Rule {
                        policy: name,
                        rule: i,
                        action: r.action,
                    };
                    return (r.action == Action::Allow, decision, logged);
                }
                Action::Pass => {
                    return (
                        true,
                        Decision::Pass {
                            policy: name,
                            rule: i,
                        },
                        logged,
                    );
                }
            }
        }
    }
    if seen.is_empty() {
        (true, Decision::NoPolicy, logged)
    } else {
        (false, Decision::EndOfTier { policies: seen }, logged)
    }
}

/// Whether enforcing staged policy `s` (in place of the enforced policy it stages) would
/// deny the flow.
fn would_deny(model: &Model, s: &Policy, ep: &Endpoint, dir: Direction, flow: &Flow) -> bool {
    if !(s.applies(dir) && s.selects(ep)) {
        return false;
    }
    let replaced = |p: &&Policy| {
        p.id.kind == s.id.kind.enforced()
            && p.id.namespace == s.id.namespace
            && p.id.name == s.id.name
    };
    let mut list: Vec<&Policy> = model.policies.iter().filter(|p| !replaced(p)).collect();
    if s.staged_action
        .is_none_or(|a| a == crate::api::StagedAction::Set)
    {
        let at = list
            .binary_search_by(|q| super::model::policy_order(q, s))
            .unwrap_or_else(|i| i);
        list.insert(at, s);
    }
    !walk_tier(model, list.into_iter(), ep, dir, flow).0
}

pub fn rule_matches(model: &Model, r: &Rule, flow: &Flow) -> bool {
    let m = &r.matches;
    if m.unmatchable {
        return false;
    }
    if let Some(v) = m.ip_version {
        let fam = if flow.src.is_ipv4() { 4 } else { 6 };
        if v != fam {
            return false;
        }
    }
    if m.protocol.is_some_and(|p| p != flow.protocol) {
        return false;
    }
    if m.not_protocol.is_some_and(|p| p == flow.protocol) {
        return false;
    }
    let icmp_hit = |t: &super::model::IcmpMatch| {
        flow.protocol.is_icmp()
            && flow.icmp_type == Some(t.type_)
            && t.code.is_none_or(|c| flow.icmp_code == Some(c))
    };
    if m.icmp.as_ref().is_some_and(|t| !icmp_hit(t)) {
        return false;
    }
    // NOT(type AND code): a packet with the type but another code matches.
    if m.not_icmp.as_ref().is_some_and(icmp_hit) {
        return false;
    }
    entity_matches(model, &m.source, flow.src, flow.src_port, flow.protocol)
        && entity_matches(
            model,
            &m.destination,
            flow.dst,
            flow.dst_port,
            flow.protocol,
        )
}

fn entity_matches(model: &Model, e: &EntityMatch, ip: IpAddr, port: u16, proto: Protocol) -> bool {
    if !e.nets.is_empty() && !e.nets.iter().any(|n| n.contains(&ip)) {
        return false;
    }
    if e.not_nets.iter().any(|n| n.contains(&ip)) {
        return false;
    }
    if e.selector
        .as_ref()
        .is_some_and(|s| !ip_in_selector(model, s, ip))
    {
        return false;
    }
    if e.not_selector
        .as_ref()
        .is_some_and(|s| ip_in_selector(model, s, ip))
    {
        return false;
    }
    let port_hit = |p: &PortMatch| match p {
        PortMatch::Range(lo, hi) => (*lo..=*hi).contains(&port),
        PortMatch::Named(name) => {
            named_port_member(model, e.selector.as_ref(), name, ip, proto, port)
        }
    };
    if !e.ports.is_empty() && !e.ports.iter().any(port_hit) {
        return false;
    }
    !e.not_ports.iter().any(port_hit)
}

/// Membership of an address in a selector's IP set: addresses of endpoints and nets of
/// network sets whose labels match.
pub fn ip_in_selector(model: &Model, s: &Selector, ip: IpAddr) -> bool {
    model
        .endpoints
        .iter()
        .any(|ep| ep.ips.contains(&ip) && s.matches(&ep.labels))
        || model
            .network_sets
            .iter()
            .any(|ns| ns.nets.iter().any(|n| n.contains(&ip)) && s.matches(&ns.labels))
}

/// Membership of `ip . proto . port` in a named-port set: the endpoints the side's selector
/// matches (all endpoints without one) that have a container port of that name and protocol.
fn named_port_member(
    model: &Model,
    sel: Option<&Selector>,
    name: &str,
    ip: IpAddr,
    proto: Protocol,
    port: u16,
) -> bool {
    model.endpoints.iter().any(|ep| {
        ep.ips.contains(&ip)
            && sel.is_none_or(|s| s.matches(&ep.labels))
            && ep
                .named_ports
                .iter()
                .any(|np| np.name == name && np.protocol == proto && np.port == port)
    })
}
