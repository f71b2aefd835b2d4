//! Sans-IO compiler: the policy model and this node's endpoints → the `inet tortie-policy`
//! table on the shared nft model (`desired::nft`), laid out as Felix's nftables mode does it:
//! interface dispatch → per-endpoint chains (conntrack first, then the endpoint's policies
//! in order, end-of-tier drop, namespace-profile allow) → per-policy chains. Verdicts between
//! chains travel in Felix's mark bits (Accept `0x10000`, Pass `0x20000`), so an allowed
//! egress returns and the destination's ingress is still checked.
//!
//! Per-packet cost does not grow with the number of policies: a policy's own selector is
//! resolved here (only the policies that select an endpoint are in its chain), rule
//! selectors are named address sets shared by every rule with the same selector, named
//! ports are `addr . proto . port` sets, multi-valued nets and ports are named sets, and no
//! rule carries an anonymous set.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha224};

use crate::desired::nft::{Chain, Element, Family, Hook, Rule as NftRule, Set, Table};
use crate::desired::{MARK_ACCEPT, MARK_PASS, MARK_SCRATCH0};
use crate::selector::Selector;

use super::endpoint::Endpoint;
use super::model::{Action, Direction, EntityMatch, IcmpMatch, Model, Policy, Rule};
use super::ports::PortMatch;
use super::protocol::Protocol;

pub const TABLE: &str = "tortie-policy";
pub const FAMILY: Family = Family::Inet;
pub const FORWARD_CHAIN: &str = "forward";
pub const INPUT_CHAIN: &str = "input";
pub const RAW_PREROUTING_CHAIN: &str = "raw-prerouting";
pub const FROM_DISPATCH: &str = "from-wl-dispatch";
pub const TO_DISPATCH: &str = "to-wl-dispatch";
/// Felix's workload interface prefix.
pub const WORKLOAD_PREFIX: &str = "cali";

/// What a pod may do to its own host (Calico's `DefaultEndpointToHostAction`), after its
/// egress policy allowed the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointToHost {
    #[default]
    Accept,
    Drop,
    /// Leave the decision to the host's other rules.
    Return,
}

#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    pub endpoint_to_host: EndpointToHost,
}

/// Compiles the table for the endpoints of this node (those with an `interface`).
pub fn compile(model: &Model, opts: &CompileOptions) -> Table {
    let mut c = Compiler {
        model,
        table: Table::new(FAMILY, TABLE),
        policy_chains: BTreeSet::new(),
    };
    c.base_chains(opts);
    let mut from = Vec::new();
    let mut to = Vec::new();
    for ep in model.endpoints.iter().filter(|e| e.interface.is_some()) {
        let Some(iface) = ep.interface.as_deref() else {
            continue;
        };
        let fw = format!("fw-{iface}");
        let tw = format!("tw-{iface}");
        let rules = c.endpoint_chain(ep, Direction::Egress);
        c.chain(&fw, rules);
        let rules = c.endpoint_chain(ep, Direction::Ingress);
        c.chain(&tw, rules);
        from.push(format!("\"{iface}\" : goto {fw}"));
        to.push(format!("\"{iface}\" : goto {tw}"));
    }
    // One verdict-map lookup per packet. Unknown workload interfaces drop: a pod's chains
    // exist before its CNI ADD returns, so nothing legitimate is unknown.
    for (name, key, entries) in [
        (FROM_DISPATCH, "iifname", from),
        (TO_DISPATCH, "oifname", to),
    ] {
        let mut rules = Vec::new();
        if !entries.is_empty() {
            rules.push(format!("{key} vmap {{ {} }}", entries.join(", ")));
        }
        rules.push("counter drop".to_string());
        c.chain(name, rules);
    }
    c.table
}

struct Compiler<'a> {
    model: &'a Model,
    table: Table,
    policy_chains: BTreeSet<String>,
}

fn clear_marks() -> String {
    format!(
        "meta mark set meta mark & {:#010x}",
        !(MARK_ACCEPT | MARK_PASS)
    )
}

fn set_mark_and_return(mark: u32) -> String {
    format!("meta mark set meta mark | {mark:#010x} return")
}

impl Compiler<'_> {
    fn chain(&mut self, name: &str, rules: Vec<String>) {
        self.table.chains.insert(
            name.to_string(),
            Chain {
                hook: None,
                rules: rules.into_iter().map(NftRule::new).collect(),
            },
        );
    }

    fn base_chains(&mut self, opts: &CompileOptions) {
        let hook = |h: &str| Hook {
            kind: "filter".into(),
            hook: h.into(),
            priority: 0,
            policy: "accept".into(),
        };
        let wl = format!("\"{WORKLOAD_PREFIX}*\"");
        // Host → pod (OUTPUT) is never checked against the pod's ingress, as in Felix:
        // kubelet probes must reach their pod.
        let forward = vec![
            clear_marks(),
            format!("iifname {wl} jump {FROM_DISPATCH}"),
            format!("oifname {wl} jump {TO_DISPATCH}"),
        ];
        let mut input = vec![clear_marks(), format!("iifname {wl} jump {FROM_DISPATCH}")];
        match opts.endpoint_to_host {
            EndpointToHost::Accept => input.push(format!("iifname {wl} accept")),
            EndpointToHost::Drop => input.push(format!("iifname {wl} counter drop")),
            EndpointToHost::Return => {}
        }
        for (name, h, rules) in [
            (FORWARD_CHAIN, "forward", forward),
            (INPUT_CHAIN, "input", input),
        ] {
            self.table.chains.insert(
                name.into(),
                Chain {
                    hook: Some(hook(h)),
                    rules: rules.into_iter().map(NftRule::new).collect(),
                },
            );
        }

        // Anti-spoofing in one rule, not one per pod: every pod has a /32 route through its
        // own interface, so a source address without a reverse route via the interface the
        // packet came in on is not the pod's.
        self.table.chains.insert(
            RAW_PREROUTING_CHAIN.into(),
            Chain {
                hook: Some(Hook {
                    priority: -300,
                    ..hook("prerouting")
                }),
                rules: vec![NftRule::new(format!(
                    "iifname {wl} fib saddr . iif oif missing counter drop"
                ))],
            },
        );
    }

    fn endpoint_chain(&mut self, ep: &Endpoint, dir: Direction) -> Vec<String> {
        let mut rules = vec![
            "ct state established,related accept".to_string(),
            "ct state invalid drop".to_string(),
            clear_marks(),
        ];
        let policies: Vec<&Policy> = self
            .model
            .policies
            .iter()
            .filter(|p| p.applies(dir) && p.selects(ep))
            .collect();
        rules.extend(self.staged_audits(ep, dir, &policies));
        for p in &policies {
            let chain = self.policy_chain(p, dir);
            rules.push(format!("meta mark & {MARK_PASS:#010x} == 0 jump {chain}"));
            rules.push(format!("meta mark & {MARK_ACCEPT:#010x} != 0 return"));
        }
        if !policies.is_empty() {
            // End of the default tier: nothing allowed and nothing passed.
            rules.push(format!("meta mark & {MARK_PASS:#010x} == 0 counter drop"));
        }
        // The namespace profile (`kns.<ns>`) allows.
        rules.push(set_mark_and_return(MARK_ACCEPT));
        rules
    }

    /// Staged policies never decide; each one selecting the endpoint gets an audit chain
    /// that walks the tier as it would be with the staged policy enforced (the enforced
    /// policies' own chains plus the staged one's, whose Deny only sets a scratch mark) and
    /// counts the packets that tier would deny, then clears the marks. Reusing the enforced
    /// chains is exact for a staged policy that adds to the tier: any enforced Deny reached
    /// there is reached by enforcement as well. Staged policies that replace or delete an
    /// enforced one are not counted (they need copies of the enforced chains).
    fn staged_audits(
        &mut self,
        ep: &Endpoint,
        dir: Direction,
        enforced: &[&Policy],
    ) -> Vec<String> {
        let Some(iface) = ep.interface.clone() else {
            return Vec::new();
        };
        let staged: Vec<&Policy> = self
            .model
            .staged
            .iter()
            .filter(|s| s.applies(dir) && s.selects(ep))
            .filter(|s| {
                s.staged_action
                    .is_none_or(|a| a == crate::api::StagedAction::Set)
            })
            .filter(|s| {
                !self.model.policies.iter().any(|p| {
                    p.id.kind == s.id.kind.enforced()
                        && p.id.namespace == s.id.namespace
                        && p.id.name == s.id.name
                })
            })
            .collect();
        let decided = MARK_ACCEPT | MARK_PASS | MARK_SCRATCH0;
        let mut jumps = Vec::new();
        for st in &staged {
            let mut tier: Vec<&Policy> = enforced.to_vec();
            let at = tier
                .binary_search_by(|q| super::model::policy_order(q, st))
                .unwrap_or_else(|i| i);
            tier.insert(at, st);
            let mut rules = Vec::new();
            for p in tier {
                let chain = self.policy_chain(p, dir);
                rules.push(format!("meta mark & {decided:#010x} == 0 jump {chain}"));
            }
            // Neither allowed nor passed: the tier would deny (a staged Deny or its end).
            // (The driver owns rule comments; the chain's name says which policy counts.)
            rules.push(format!(
                "meta mark & {:#010x} == 0 counter",
                MARK_ACCEPT | MARK_PASS
            ));
            rules.push(format!(
                "meta mark set meta mark & {:#010x} return",
                !decided
            ));
            let d = match dir {
                Direction::Ingress => "i",
                Direction::Egress => "o",
            };
            let ns = if st.id.namespace.is_empty() {
                "_"
            } else {
                &st.id.namespace
            };
            let name = format!("st{d}-{iface}-{}.{ns}.{}", st.id.kind.short(), st.id.name);
            self.chain(&name, rules);
            jumps.push(format!("jump {name}"));
        }
        jumps
    }

    /// The chain of one policy in one direction (shared by every endpoint it selects).
    fn policy_chain(&mut self, p: &Policy, dir: Direction) -> String {
        let prefix = match dir {
            Direction::Ingress => "pi",
            Direction::Egress => "po",
        };
        let name = format!(
            "{prefix}-{}.{}.{}",
            p.id.kind.short(),
            if p.id.namespace.is_empty() {
                "_"
            } else {
                &p.id.namespace
            },
            p.id.name
        );
        if self.policy_chains.insert(name.clone()) {
            let mut rules = Vec::new();
            for (i, r) in p.rules(dir).iter().enumerate() {
                let comment = format!("{} {dir} rule {i}", p.id.display_name());
                rules.extend(self.rule(r, &comment, p.id.kind.is_staged()));
            }
            self.chain(&name, rules);
        }
        name
    }

    /// One model rule → nft rules (one per family and per alternative; alternatives are
    /// ORed by being separate rules with the same verdict).
    fn rule(&mut self, r: &Rule, comment: &str, staged: bool) -> Vec<String> {
        let m = &r.matches;
        if m.unmatchable {
            return Vec::new();
        }
        let verdict = match r.action {
            Action::Allow => set_mark_and_return(MARK_ACCEPT),
            Action::Pass => set_mark_and_return(MARK_PASS),
            // A staged policy's Deny only tells its audit chain.
            Action::Deny if staged => set_mark_and_return(MARK_SCRATCH0),
            Action::Deny => "counter drop".to_string(),
            // To nflog, read by `dataplane::nflog` into one structured line per packet;
            // rate-limited so a flood cannot flood the logs.
            Action::Log => format!(
                "limit rate 10/second burst 20 packets log prefix \"{}\" group {}",
                truncate(comment, 127),
                crate::dataplane::nflog::GROUP
            ),
        };
        let mut per_family: Vec<(u8, Vec<String>)> = Vec::new();
        for fam in [4u8, 6] {
            if m.ip_version.is_some_and(|v| v != fam) {
                continue;
            }
            // A rule with nets of only the other family cannot match this one (Felix).
            let fam_nets = |nets: &[IpNet]| nets.iter().filter(|n| family(n) == fam).count();
            if (!m.source.nets.is_empty() && fam_nets(&m.source.nets) == 0)
                || (!m.destination.nets.is_empty() && fam_nets(&m.destination.nets) == 0)
            {
                continue;
            }
            if m.protocol
                == Some(if fam == 4 {
                    Protocol::ICMPV6
                } else {
                    Protocol::ICMP
                })
            {
                continue;
            }
            let mut base = Vec::new();
            if let Some(p) = m.protocol {
                base.push(format!("meta l4proto {}", p.0));
            }
            if let Some(p) = m.not_protocol {
                base.push(format!("meta l4proto != {}", p.0));
            }
            let icmp_kw = if fam == 4 { "icmp" } else { "icmpv6" };
            if let Some(IcmpMatch { type_, code }) = m.icmp {
                base.push(format!("{icmp_kw} type {type_}"));
                if let Some(c) = code {
                    base.push(format!("{icmp_kw} code {c}"));
                }
            }
            let src = self.entity(&m.source, fam, "saddr", "sport", m.protocol);
            let dst = self.entity(&m.destination, fam, "daddr", "dport", m.protocol);
            // notICMP = NOT(type AND code) = (type != T) OR (type == T AND code != C).
            let not_icmp: Vec<Vec<String>> = match m.not_icmp {
                None => vec![vec![]],
                Some(IcmpMatch { type_, code: None }) => {
                    vec![vec![format!("{icmp_kw} type != {type_}")]]
                }
                Some(IcmpMatch {
                    type_,
                    code: Some(c),
                }) => vec![
                    vec![format!("{icmp_kw} type != {type_}")],
                    vec![
                        format!("{icmp_kw} type {type_}"),
                        format!("{icmp_kw} code != {c}"),
                    ],
                ],
            };
            for s in &src {
                for d in &dst {
                    for n in &not_icmp {
                        let mut parts = base.clone();
                        parts.extend(s.iter().cloned());
                        parts.extend(d.iter().cloned());
                        parts.extend(n.iter().cloned());
                        per_family.push((fam, parts));
                    }
                }
            }
        }
        // In an `inet` table a rule without an address match sees both families, while the
        // model's rule is per family (Felix has one table per family): such a rule gets
        // `meta nfproto`, unless both families ask for exactly the same rule.
        let specific = |parts: &[String]| {
            parts
                .iter()
                .any(|p| p.starts_with("ip ") || p.starts_with("ip6 "))
        };
        let mut out = Vec::new();
        let mut shared_done: Vec<&Vec<String>> = Vec::new();
        for (fam, parts) in &per_family {
            let mut line = parts.clone();
            if !specific(parts) {
                let both = per_family.iter().filter(|(_, q)| q == parts).count() == 2;
                if both {
                    if shared_done.contains(&parts) {
                        continue;
                    }
                    shared_done.push(parts);
                } else {
                    line.insert(0, format!("meta nfproto ipv{fam}"));
                }
            }
            line.push(verdict.clone());
            out.push(line.join(" "));
        }
        out
    }

    /// Match expressions for one side, as alternatives (an empty side is one empty
    /// alternative; numeric and named ports are two).
    fn entity(
        &mut self,
        e: &EntityMatch,
        fam: u8,
        addr: &str,
        port: &str,
        proto: Option<Protocol>,
    ) -> Vec<Vec<String>> {
        let ip = if fam == 4 { "ip" } else { "ip6" };
        let mut base = Vec::new();
        let nets: Vec<IpNet> = e
            .nets
            .iter()
            .filter(|n| family(n) == fam)
            .copied()
            .collect();
        if !nets.is_empty() {
            base.push(format!("{ip} {addr} {}", self.nets_ref(&nets, fam)));
        }
        let not_nets: Vec<IpNet> = e
            .not_nets
            .iter()
            .filter(|n| family(n) == fam)
            .copied()
            .collect();
        if !not_nets.is_empty() {
            base.push(format!("{ip} {addr} != {}", self.nets_ref(&not_nets, fam)));
        }
        if let Some(s) = &e.selector {
            base.push(format!("{ip} {addr} @{}", self.selector_set(s, fam)));
        }
        if let Some(s) = &e.not_selector {
            base.push(format!("{ip} {addr} != @{}", self.selector_set(s, fam)));
        }
        let numeric = |ps: &[PortMatch]| -> Vec<(u16, u16)> {
            ps.iter()
                .filter_map(|p| match p {
                    PortMatch::Range(a, b) => Some((*a, *b)),
                    PortMatch::Named(_) => None,
                })
                .collect()
        };
        let named = |ps: &[PortMatch]| -> Vec<String> {
            ps.iter()
                .filter_map(|p| match p {
                    PortMatch::Named(n) => Some(n.clone()),
                    PortMatch::Range(..) => None,
                })
                .collect()
        };
        let proto = proto.unwrap_or(Protocol::TCP);
        let named_key = format!("{ip} {addr} . meta l4proto . th {port}");
        for n in named(&e.not_ports) {
            let set = self.named_port_set(e.selector.as_ref(), &n, proto, fam);
            base.push(format!("{named_key} != @{set}"));
        }
        let not_num = numeric(&e.not_ports);
        if !not_num.is_empty() {
            base.push(format!("th {port} != {}", self.ports_ref(&not_num)));
        }
        if e.ports.is_empty() {
            return vec![base];
        }
        let mut alts = Vec::new();
        let num = numeric(&e.ports);
        if !num.is_empty() {
            let mut a = base.clone();
            a.push(format!("th {port} {}", self.ports_ref(&num)));
            alts.push(a);
        }
        for n in named(&e.ports) {
            let set = self.named_port_set(e.selector.as_ref(), &n, proto, fam);
            let mut a = base.clone();
            a.push(format!("{named_key} @{set}"));
            alts.push(a);
        }
        alts
    }

    /// A single prefix inline, several through a named interval set of disjoint prefixes.
    fn nets_ref(&mut self, nets: &[IpNet], fam: u8) -> String {
        let nets = disjoint(nets);
        if nets.len() == 1 {
            return nets[0].to_string();
        }
        let key = nets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let name = format!("n{fam}-{}", short_hash(&key));
        self.table.sets.entry(name.clone()).or_insert_with(|| {
            Set::prefixes(addr_type(fam), nets.iter().map(|n| Element::net(*n)))
        });
        format!("@{name}")
    }

    fn ports_ref(&mut self, ports: &[(u16, u16)]) -> String {
        let text = |(a, b): (u16, u16)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        };
        if ports.len() == 1 {
            return text(ports[0]);
        }
        let merged = merge_ranges(ports);
        let key = merged
            .iter()
            .map(|p| text(*p))
            .collect::<Vec<_>>()
            .join(",");
        let name = format!("p-{}", short_hash(&key));
        self.table.sets.entry(name.clone()).or_insert_with(|| Set {
            kind: "inet_service".into(),
            flags: vec!["interval".into()],
            elements: merged
                .iter()
                .map(|&(a, b)| {
                    if a == b {
                        Element::Port(a)
                    } else {
                        Element::Text(text((a, b)))
                    }
                })
                .collect(),
        });
        format!("@{name}")
    }

    /// The address set of a rule selector: endpoint addresses and network-set nets whose
    /// labels match, as disjoint prefixes. Shared by every rule using the same selector.
    fn selector_set(&mut self, s: &Selector, fam: u8) -> String {
        let name = format!("s{fam}-{}", short_hash(s.canonical()));
        if !self.table.sets.contains_key(&name) {
            let mut nets: Vec<IpNet> = Vec::new();
            for ep in &self.model.endpoints {
                if s.matches(&ep.labels) {
                    nets.extend(
                        ep.ips
                            .iter()
                            .filter(|ip| ip_family(ip) == fam)
                            .map(|ip| IpNet::from(*ip)),
                    );
                }
            }
            for ns in &self.model.network_sets {
                if s.matches(&ns.labels) {
                    nets.extend(ns.nets.iter().filter(|n| family(n) == fam));
                }
            }
            let set = Set::prefixes(
                addr_type(fam),
                disjoint(&nets).into_iter().map(Element::net),
            );
            self.table.sets.insert(name.clone(), set);
        }
        name
    }

    /// `addr . proto . port` of the endpoints (matching the side's selector, or all) that
    /// have a container port `name` with that protocol.
    fn named_port_set(
        &mut self,
        sel: Option<&Selector>,
        port: &str,
        proto: Protocol,
        fam: u8,
    ) -> String {
        let key = format!(
            "{}|{port}|{}",
            sel.map(Selector::canonical).unwrap_or("all()"),
            proto.0
        );
        let name = format!("np{fam}-{}", short_hash(&key));
        if !self.table.sets.contains_key(&name) {
            let mut elements = BTreeSet::new();
            for ep in &self.model.endpoints {
                if !sel.is_none_or(|s| s.matches(&ep.labels)) {
                    continue;
                }
                for np in ep
                    .named_ports
                    .iter()
                    .filter(|n| n.name == port && n.protocol == proto)
                {
                    for ip in ep.ips.iter().filter(|ip| ip_family(ip) == fam) {
                        // Named ports exist only for TCP, UDP and SCTP; written as nft
                        // lists them, so a drift check compares like with like.
                        let p = proto.name().to_ascii_lowercase();
                        elements.insert(Element::Text(format!("{ip} . {p} . {}", np.port)));
                    }
                }
            }
            self.table.sets.insert(
                name.clone(),
                Set {
                    kind: format!("{} . inet_proto . inet_service", addr_type(fam)),
                    flags: Vec::new(),
                    elements,
                },
            );
        }
        name
    }
}

fn family(n: &IpNet) -> u8 {
    match n {
        IpNet::V4(_) => 4,
        IpNet::V6(_) => 6,
    }
}

fn ip_family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 4 } else { 6 }
}

fn addr_type(fam: u8) -> &'static str {
    if fam == 4 { "ipv4_addr" } else { "ipv6_addr" }
}

/// Prefixes with every one contained in another dropped: what an interval set accepts
/// (nft rejects overlapping elements and fails the whole transaction).
pub fn disjoint(nets: &[IpNet]) -> Vec<IpNet> {
    let mut sorted: Vec<IpNet> = nets.iter().map(|n| n.trunc()).collect();
    sorted.sort_by_key(|n| (n.prefix_len(), *n));
    sorted.dedup();
    let mut out: Vec<IpNet> = Vec::new();
    for n in sorted {
        if !out.iter().any(|o| o.contains(&n)) {
            out.push(n);
        }
    }
    out.sort();
    out
}

fn merge_ranges(ports: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut v = ports.to_vec();
    v.sort();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn short_hash(s: &str) -> String {
    let d = Sha224::digest(s.as_bytes());
    let mut out = String::new();
    for b in &d[..8] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Which policies' chains an endpoint jumps to, per direction (for explain and metrics).
pub fn endpoint_policies<'a>(
    model: &'a Model,
    ep: &Endpoint,
) -> BTreeMap<&'static str, Vec<&'a Policy>> {
    let mut out = BTreeMap::new();
    for (key, dir) in [
        ("ingress", Direction::Ingress),
        ("egress", Direction::Egress),
    ] {
        out.insert(
            key,
            model
                .policies
                .iter()
                .filter(|p| p.applies(dir) && p.selects(ep))
                .collect(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::cluster::{ClusterObjects, build_model};

    fn model(db_app: &str, extra_pod: bool) -> Model {
        let pod = |name: &str, ip: &str, app: &str| -> k8s_openapi::api::core::v1::Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "prod", "name": name, "labels": {"app": app}},
                "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
            }))
            .unwrap()
        };
        let mut c = ClusterObjects::default();
        c.pods.push(pod("web", "10.0.0.1", "web"));
        c.pods.push(pod("db", "10.0.0.2", db_app));
        if extra_pod {
            c.pods.push(pod("client", "10.0.0.3", "client"));
        }
        c.network_policies.push(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "prod", "name": "web-in"},
                "spec": {"selector": "app == 'web'", "ingress": [
                    {"action": "Allow", "protocol": "TCP",
                     "source": {"selector": "app == 'db'"}, "destination": {"ports": ["http", 80, 443]}}]}
            }))
            .unwrap(),
        );
        let mut m = build_model(&c);
        for ep in &mut m.endpoints {
            ep.interface = Some(format!("cali{}", ep.name));
        }
        m
    }

    #[test]
    fn a_label_change_of_a_peer_changes_set_elements_only() {
        let before = compile(&model("db", false), &CompileOptions::default());
        let after = compile(&model("cache", false), &CompileOptions::default());
        assert_eq!(before.chains, after.chains, "no chain may change");
        let changed: Vec<&String> = before
            .sets
            .keys()
            .filter(|k| before.sets.get(*k) != after.sets.get(*k))
            .collect();
        assert_eq!(changed.len(), 1, "only the app == 'db' set: {changed:?}");
        assert!(changed[0].starts_with("s4-"));
        assert_eq!(
            before.sets.keys().collect::<Vec<_>>(),
            after.sets.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_new_pod_adds_its_chains_and_dispatch_entries_only() {
        let before = compile(&model("db", false), &CompileOptions::default());
        let after = compile(&model("db", true), &CompileOptions::default());
        let changed: Vec<&String> = after
            .chains
            .keys()
            .filter(|k| before.chains.get(*k) != after.chains.get(*k))
            .collect();
        assert_eq!(
            changed,
            [FROM_DISPATCH, "fw-caliclient", TO_DISPATCH, "tw-caliclient"]
        );
        // Its named port joins the named-port set: elements only.
        assert_eq!(
            before.sets.keys().collect::<Vec<_>>(),
            after.sets.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn selected_policies_only_and_rules_share_sets() {
        let t = compile(&model("db", false), &CompileOptions::default());
        let tw_db = &t.chains["tw-calidb"].rules;
        assert!(
            tw_db.iter().all(|r| !r.text.contains("pi-")),
            "db is not selected"
        );
        let tw_web: Vec<&str> = t.chains["tw-caliweb"]
            .rules
            .iter()
            .map(|r| r.text.as_str())
            .collect();
        assert!(tw_web.contains(&"meta mark & 0x00020000 == 0 jump pi-np.prod.web-in"));
        let pi: Vec<&str> = t.chains["pi-np.prod.web-in"]
            .rules
            .iter()
            .map(|r| r.text.as_str())
            .collect();
        // Per family: numeric ports in one named interval set, the named port in an
        // addr.proto.port set, both rules on the same selector set. Both families are always
        // present so that a pod of the other family later changes elements, not chains.
        assert_eq!(pi.len(), 4, "{pi:?}");
        assert!(
            pi[..2].iter().all(|r| r.contains("ip saddr @s4-")),
            "{pi:?}"
        );
        assert!(
            pi[2..].iter().all(|r| r.contains("ip6 saddr @s6-")),
            "{pi:?}"
        );
        assert!(pi[0].contains("th dport @p-"), "{pi:?}");
        assert!(
            pi[1].contains("ip daddr . meta l4proto . th dport @np4-"),
            "{pi:?}"
        );
        assert!(
            !pi.iter().any(|r| r.contains('{')),
            "no anonymous sets: {pi:?}"
        );
    }

    #[test]
    fn nets_become_disjoint_and_port_ranges_merge() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            disjoint(&[
                n("10.0.0.0/8"),
                n("10.1.2.3/32"),
                n("192.0.2.0/24"),
                n("10.0.0.0/8")
            ]),
            vec![n("10.0.0.0/8"), n("192.0.2.0/24")]
        );
        assert_eq!(
            merge_ranges(&[(80, 80), (81, 90), (95, 95), (85, 86)]),
            vec![(80, 90), (95, 95)]
        );
    }
}
