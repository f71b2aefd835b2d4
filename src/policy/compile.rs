//! Sans-IO compiler: the policy model and this node's endpoints → the `inet tortie-policy`
//! table on the shared nft model (`desired::nft`), laid out as Felix's nftables mode does it:
//! interface dispatch (named verdict maps, so a new pod adds elements, not a rewritten
//! rule) → per-endpoint chains (conntrack first, then the endpoint's policy group, end-of-tier
//! drop, namespace-profile allow) → policy group chains (the ordered policies that select an
//! endpoint; shared by every endpoint with the same list, as Felix's policy groups are, so a
//! new pod's chains stay a few rules long whatever the number of policies) → per-policy
//! chains. Verdicts between
//! chains travel in Felix's mark bits (Accept `0x10000`, Pass `0x20000`), so an allowed
//! egress returns and the destination's ingress is still checked.
//!
//! Per-packet cost does not grow with the number of policies: a policy's own selector is
//! resolved here (only the policies that select an endpoint are in its chain), rule
//! selectors are named address sets shared by every rule with the same selector, named
//! ports are `addr . proto . port` sets, multi-valued nets and ports are named sets, and no
//! rule carries an anonymous set.
//!
//! Every Deny rule, end of tier, staged audit and fixed drop counts into a named counter
//! object named after its chain (`<chain>/<rule>/deny`, `<chain>/end-of-tier`, …; see
//! `CounterName`): what the per-policy metrics read, without listing rules, and what survives
//! chain rewrites. Allow, Pass and Log rules count in anonymous counters (read by `tortie
//! policy explain --counters` from their chain): every named object is in the cache each
//! `nft` run fills before it adds a rule, so they are kept to what is read often.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha224};

use crate::desired::nft::{Chain, Element, Family, Hook, Map, Rule as NftRule, Set, Table};
use crate::desired::{MARK_ACCEPT, MARK_PASS, MARK_SCRATCH0};
use crate::selector::Selector;

use super::endpoint::{Endpoint, NetworkSetEntry};
use super::model::{Action, Direction, EntityMatch, IcmpMatch, Model, Policy, PolicyId, Rule};
use super::ports::PortMatch;
use super::protocol::Protocol;

pub const TABLE: &str = "tortie-policy";
pub const FAMILY: Family = Family::Inet;
pub const FORWARD_CHAIN: &str = "forward";
pub const INPUT_CHAIN: &str = "input";
pub const RAW_PREROUTING_CHAIN: &str = "raw-prerouting";
pub const FROM_DISPATCH: &str = "from-wl-dispatch";
pub const TO_DISPATCH: &str = "to-wl-dispatch";
/// The dispatch verdict maps: local interface → `goto fw-<iface>` / `goto tw-<iface>`.
pub const FROM_MAP: &str = "from-wl";
pub const TO_MAP: &str = "to-wl";
/// What the fixed drop counters count (`<chain>/<reason>`).
pub const UNKNOWN_INTERFACE: &str = "unknown-interface";
pub const ANTI_SPOOFING: &str = "anti-spoofing";
pub const ENDPOINT_TO_HOST: &str = "endpoint-to-host";
pub const END_OF_TIER: &str = "end-of-tier";
pub const WOULD_DENY: &str = "would-deny";
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
    let mut c = Compiler::new(&model.policies, &model.staged);
    c.table.chains.extend(base_chains(opts));
    let mut ifaces = BTreeSet::new();
    for ep in &model.endpoints {
        let Some(iface) = ep.interface.as_deref() else {
            continue;
        };
        c.endpoint_chains(ep, iface);
        ifaces.insert(iface);
    }
    c.table.chains.extend(dispatch_chains());
    c.table.maps.extend(dispatch_maps(ifaces));
    let Compiler {
        mut table, specs, ..
    } = c;
    for (name, spec) in specs {
        let set = spec.materialize(&model.endpoints, &model.network_sets);
        table.sets.insert(name, set);
    }
    table
}

/// What a named set holds, before its elements are resolved: the full compile resolves
/// membership by scanning the model, the incremental calculation keeps it up to date.
#[derive(Debug, Clone, PartialEq)]
pub enum SetSpec {
    /// Addresses of endpoints and nets of network sets whose labels match.
    Selector { selector: Selector, fam: u8 },
    /// `addr . proto . port` of endpoints (matching the selector, or all) with the port.
    NamedPort {
        selector: Option<Selector>,
        port: String,
        proto: Protocol,
        fam: u8,
    },
    /// Contents known from the rule alone (nets, port ranges).
    Fixed(Set),
}

impl SetSpec {
    /// The set over these endpoints and network sets.
    pub fn materialize(&self, endpoints: &[Endpoint], network_sets: &[NetworkSetEntry]) -> Set {
        match self {
            SetSpec::Fixed(set) => set.clone(),
            SetSpec::Selector { selector, fam } => {
                let mut nets: Vec<IpNet> = Vec::new();
                for ep in endpoints.iter().filter(|e| selector.matches(&e.labels)) {
                    nets.extend(selector_members(ep, *fam));
                }
                for ns in network_sets.iter().filter(|n| selector.matches(&n.labels)) {
                    nets.extend(ns.nets.iter().filter(|n| family(n) == *fam));
                }
                selector_set(*fam, &nets)
            }
            SetSpec::NamedPort {
                selector,
                port,
                proto,
                fam,
            } => {
                let mut elements = BTreeSet::new();
                for ep in endpoints {
                    if selector.as_ref().is_none_or(|s| s.matches(&ep.labels)) {
                        elements.extend(named_port_elements(ep, port, *proto, *fam));
                    }
                }
                named_port_set(*fam, elements)
            }
        }
    }
}

/// The nets an endpoint contributes to a selector set of one family.
pub fn selector_members(ep: &Endpoint, fam: u8) -> impl Iterator<Item = IpNet> + '_ {
    ep.ips
        .iter()
        .filter(move |ip| ip_family(ip) == fam)
        .map(|ip| IpNet::from(*ip))
}

/// A selector set of these member nets. Pod addresses alone make a plain hash set; only
/// network-set prefixes make it an interval set (of disjoint prefixes, as nft requires).
/// nft 1.0.6 reads every interval set's elements back before any element change in the
/// table: with 100,000 addresses in interval sets one `add element` took 1.5 s, with hash
/// sets 0.1 s (measured here).
pub fn selector_set(fam: u8, nets: &[IpNet]) -> Set {
    if nets.iter().all(|n| n.prefix_len() == n.max_prefix_len()) {
        return Set {
            kind: addr_type(fam).to_string(),
            flags: Vec::new(),
            elements: nets.iter().map(|n| Element::net(*n)).collect(),
        };
    }
    Set::prefixes(addr_type(fam), disjoint(nets).into_iter().map(Element::net))
}

/// The elements an endpoint contributes to a named-port set.
pub fn named_port_elements(ep: &Endpoint, port: &str, proto: Protocol, fam: u8) -> Vec<Element> {
    let mut out = Vec::new();
    for np in ep
        .named_ports
        .iter()
        .filter(|n| n.name == port && n.protocol == proto)
    {
        for ip in ep.ips.iter().filter(|ip| ip_family(ip) == fam) {
            // Named ports exist only for TCP, UDP and SCTP; written as nft lists them, so
            // a drift check compares like with like.
            let p = proto.name().to_ascii_lowercase();
            out.push(Element::Text(format!("{ip} . {p} . {}", np.port)));
        }
    }
    out
}

/// A named-port set holding these elements.
pub fn named_port_set(fam: u8, elements: BTreeSet<Element>) -> Set {
    Set {
        kind: format!("{} . inet_proto . inet_service", addr_type(fam)),
        flags: Vec::new(),
        elements,
    }
}

/// The two dispatch chains: one lookup in a named verdict map per packet (the maps'
/// elements are the local interfaces, `dispatch_maps`). Unknown workload interfaces drop: a
/// pod's chains exist before its CNI ADD returns, so nothing legitimate is unknown.
pub fn dispatch_chains() -> Vec<(String, Chain)> {
    let mut out = Vec::new();
    for (name, key, map) in [
        (FROM_DISPATCH, "iifname", FROM_MAP),
        (TO_DISPATCH, "oifname", TO_MAP),
    ] {
        let rules = vec![
            format!("{key} vmap @{map}"),
            counted(&CounterName::fixed(name, UNKNOWN_INTERFACE), "drop"),
        ];
        out.push((name.to_string(), regular_chain(rules)));
    }
    out
}

/// The dispatch maps holding these interfaces.
pub fn dispatch_maps<'a>(ifaces: impl IntoIterator<Item = &'a str>) -> Vec<(String, Map)> {
    let mut from = Map::verdicts("ifname");
    let mut to = Map::verdicts("ifname");
    for iface in ifaces {
        for (map, (key, verdict)) in [&mut from, &mut to].into_iter().zip(dispatch_entry(iface)) {
            map.elements.insert(key, verdict);
        }
    }
    vec![(FROM_MAP.to_string(), from), (TO_MAP.to_string(), to)]
}

/// An interface's element in `FROM_MAP` and in `TO_MAP`, in that order.
pub fn dispatch_entry(iface: &str) -> [(String, String); 2] {
    [
        (iface.to_string(), format!("goto fw-{iface}")),
        (iface.to_string(), format!("goto tw-{iface}")),
    ]
}

/// The names of the table's counter objects. A counter belongs to one chain and its name
/// starts with the chain's (what the nft driver relies on to add and delete it with the
/// chain's rules); `parse` reads one back for metrics and `tortie policy explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterName {
    /// Rule `rule` of a policy chain (`pi-`/`po-<kind>.<ns>.<name>/<rule>/<action>`).
    Rule {
        chain: String,
        rule: usize,
        action: Action,
    },
    /// A drop or audit that belongs to its chain (`<chain>/<what>`): end of tier in an
    /// endpoint chain, a staged audit's would-deny, the fixed drops.
    Fixed { chain: String, what: String },
}

impl CounterName {
    pub fn rule(chain: &str, rule: usize, action: Action) -> String {
        format!("{chain}/{rule}/{}", action_name(action))
    }

    pub fn fixed(chain: &str, what: &str) -> String {
        format!("{chain}/{what}")
    }

    /// A counter name as `rule` and `fixed` make them.
    pub fn parse(name: &str) -> Option<CounterName> {
        let (head, last) = name.rsplit_once('/')?;
        if let Some((chain, rule)) = head.rsplit_once('/')
            && let Ok(rule) = rule.parse::<usize>()
        {
            let action = [Action::Allow, Action::Deny, Action::Pass, Action::Log]
                .into_iter()
                .find(|a| action_name(*a) == last)?;
            return Some(CounterName::Rule {
                chain: chain.to_string(),
                rule,
                action,
            });
        }
        Some(CounterName::Fixed {
            chain: head.to_string(),
            what: last.to_string(),
        })
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::Pass => "pass",
        Action::Log => "log",
    }
}

/// A rule counting into `counter` and then doing `rest`.
fn counted(counter: &str, rest: &str) -> String {
    NftRule::counted(counter, rest).text
}

/// The chain of a policy in one direction (`pi-`/`po-<kind>.<ns>.<name>`).
pub fn policy_chain_name(id: &PolicyId, dir: Direction) -> String {
    let prefix = match dir {
        Direction::Ingress => "pi",
        Direction::Egress => "po",
    };
    format!(
        "{prefix}-{}.{}.{}",
        id.kind.short(),
        if id.namespace.is_empty() {
            "_"
        } else {
            &id.namespace
        },
        id.name
    )
}

/// An endpoint's chain in one direction: `tw-<iface>` (ingress, to the workload) or
/// `fw-<iface>` (egress, from it).
pub fn endpoint_chain_name(iface: &str, dir: Direction) -> String {
    match dir {
        Direction::Ingress => format!("tw-{iface}"),
        Direction::Egress => format!("fw-{iface}"),
    }
}

/// A staged policy's audit chain at an endpoint.
pub fn staged_chain_name(iface: &str, id: &PolicyId, dir: Direction) -> String {
    let d = match dir {
        Direction::Ingress => "i",
        Direction::Egress => "o",
    };
    let ns = if id.namespace.is_empty() {
        "_"
    } else {
        &id.namespace
    };
    format!("st{d}-{iface}-{}.{ns}.{}", id.kind.short(), id.name)
}

fn regular_chain(rules: Vec<String>) -> Chain {
    Chain {
        hook: None,
        rules: rules.into_iter().map(NftRule::new).collect(),
    }
}

/// Compiles endpoint and policy chains and records the sets their rules name. The full
/// compile runs one over the whole model; the incremental calculation runs one per change,
/// telling it which policy chains it already holds (`known`), so only new ones are built.
pub struct Compiler<'a> {
    policies: &'a [Policy],
    staged: &'a [Policy],
    /// The chains built so far (endpoint, staged-audit and policy chains).
    pub table: Table,
    /// Every set a built policy chain names, by set name.
    pub specs: BTreeMap<String, SetSpec>,
    /// Shared chain (policy or group) → the sets its rules name (for each built here).
    pub chain_sets: BTreeMap<String, BTreeSet<String>>,
    /// Group chain → the policy chains it jumps to (for each group built here).
    pub chain_children: BTreeMap<String, BTreeSet<String>>,
    /// Shared chains (policy groups, and policy chains of staged audits) jumped to by the
    /// endpoint chains built here.
    pub referenced: BTreeSet<String>,
    policy_chains: BTreeSet<String>,
    /// Sets named by the policy chain being built.
    naming: BTreeSet<String>,
    known: Option<&'a dyn Fn(&str) -> bool>,
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

/// The hooked chains: forward and input into dispatch, and anti-spoofing.
pub fn base_chains(opts: &CompileOptions) -> Vec<(String, Chain)> {
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
        EndpointToHost::Drop => input.push(format!(
            "iifname {wl} {}",
            counted(&CounterName::fixed(INPUT_CHAIN, ENDPOINT_TO_HOST), "drop")
        )),
        EndpointToHost::Return => {}
    }
    let mut out = Vec::new();
    for (name, h, rules) in [
        (FORWARD_CHAIN, "forward", forward),
        (INPUT_CHAIN, "input", input),
    ] {
        out.push((
            name.to_string(),
            Chain {
                hook: Some(hook(h)),
                rules: rules.into_iter().map(NftRule::new).collect(),
            },
        ));
    }
    // Anti-spoofing in one rule, not one per pod: every pod has a /32 route through its
    // own interface, so a source address without a reverse route via the interface the
    // packet came in on is not the pod's.
    out.push((
        RAW_PREROUTING_CHAIN.to_string(),
        Chain {
            hook: Some(Hook {
                priority: -300,
                ..hook("prerouting")
            }),
            rules: vec![NftRule::new(format!(
                "iifname {wl} fib saddr . iif oif missing {}",
                counted(
                    &CounterName::fixed(RAW_PREROUTING_CHAIN, ANTI_SPOOFING),
                    "drop"
                )
            ))],
        },
    ));
    out
}

impl<'a> Compiler<'a> {
    /// A compiler over these enforced and staged policies (each in evaluation order).
    pub fn new(policies: &'a [Policy], staged: &'a [Policy]) -> Compiler<'a> {
        Compiler {
            policies,
            staged,
            table: Table::new(FAMILY, TABLE),
            specs: BTreeMap::new(),
            chain_sets: BTreeMap::new(),
            chain_children: BTreeMap::new(),
            referenced: BTreeSet::new(),
            policy_chains: BTreeSet::new(),
            naming: BTreeSet::new(),
            known: None,
        }
    }

    /// Policy chains for which `known` is true are not built again (the caller has them).
    pub fn with_known(mut self, known: &'a dyn Fn(&str) -> bool) -> Compiler<'a> {
        self.known = Some(known);
        self
    }

    fn chain(&mut self, name: &str, rules: Vec<String>) {
        self.table
            .chains
            .insert(name.to_string(), regular_chain(rules));
    }

    /// An endpoint's chains: `fw-<iface>` (egress), `tw-<iface>` (ingress) and its
    /// staged-audit chains, plus the policy chains they jump to that are not known yet.
    pub fn endpoint_chains(&mut self, ep: &Endpoint, iface: &str) {
        for dir in [Direction::Egress, Direction::Ingress] {
            let rules = self.endpoint_chain(ep, iface, dir);
            self.chain(&endpoint_chain_name(iface, dir), rules);
        }
    }

    fn endpoint_chain(&mut self, ep: &Endpoint, iface: &str, dir: Direction) -> Vec<String> {
        let mut rules = vec![
            "ct state established,related accept".to_string(),
            "ct state invalid drop".to_string(),
            clear_marks(),
        ];
        let policies: Vec<&'a Policy> = self
            .policies
            .iter()
            .filter(|p| p.applies(dir) && p.selects(ep))
            .collect();
        rules.extend(self.staged_audits(ep, iface, dir, &policies));
        if !policies.is_empty() {
            let group = self.group_chain(&policies, dir);
            rules.push(format!("jump {group}"));
            rules.push(format!("meta mark & {MARK_ACCEPT:#010x} != 0 return"));
            // End of the default tier: nothing allowed and nothing passed.
            let counter = CounterName::fixed(&endpoint_chain_name(iface, dir), END_OF_TIER);
            rules.push(format!(
                "meta mark & {MARK_PASS:#010x} == 0 {}",
                counted(&counter, "drop")
            ));
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
        iface: &str,
        dir: Direction,
        enforced: &[&'a Policy],
    ) -> Vec<String> {
        let staged: Vec<&'a Policy> = self
            .staged
            .iter()
            .filter(|s| s.applies(dir) && s.selects(ep))
            .filter(|s| {
                s.staged_action
                    .is_none_or(|a| a == crate::api::StagedAction::Set)
            })
            .filter(|s| {
                !self.policies.iter().any(|p| {
                    p.id.kind == s.id.kind.enforced()
                        && p.id.namespace == s.id.namespace
                        && p.id.name == s.id.name
                })
            })
            .collect();
        let decided = MARK_ACCEPT | MARK_PASS | MARK_SCRATCH0;
        let mut jumps = Vec::new();
        for st in &staged {
            let mut tier: Vec<&'a Policy> = enforced.to_vec();
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
            let name = staged_chain_name(iface, &st.id, dir);
            rules.push(format!(
                "meta mark & {:#010x} == 0 {}",
                MARK_ACCEPT | MARK_PASS,
                counted(&CounterName::fixed(&name, WOULD_DENY), "")
            ));
            rules.push(format!(
                "meta mark set meta mark & {:#010x} return",
                !decided
            ));
            self.chain(&name, rules);
            jumps.push(format!("jump {name}"));
        }
        jumps
    }

    /// The group chain of these policies (in order) in one direction: each policy's chain
    /// until one allows or passes. Shared by every endpoint the same policies select.
    fn group_chain(&mut self, policies: &[&'a Policy], dir: Direction) -> String {
        let chains: Vec<String> = policies
            .iter()
            .map(|p| policy_chain_name(&p.id, dir))
            .collect();
        let prefix = match dir {
            Direction::Ingress => "gi",
            Direction::Egress => "go",
        };
        let name = format!("{prefix}-{}", short_hash(&chains.join(" ")));
        self.referenced.insert(name.clone());
        let known = self.known.is_some_and(|k| k(&name));
        if !known && self.policy_chains.insert(name.clone()) {
            // The group's policy chains are its references, not the endpoint's.
            let outer = std::mem::take(&mut self.referenced);
            let mut rules = Vec::new();
            for p in policies {
                let chain = self.policy_chain(p, dir);
                rules.push(format!("meta mark & {MARK_PASS:#010x} == 0 jump {chain}"));
                rules.push(format!("meta mark & {MARK_ACCEPT:#010x} != 0 return"));
            }
            let children = std::mem::replace(&mut self.referenced, outer);
            self.chain(&name, rules);
            self.chain_sets.insert(name.clone(), BTreeSet::new());
            self.chain_children.insert(name.clone(), children);
        }
        name
    }

    /// The nft rules of each model rule of a policy in one direction, in chain order (an
    /// empty list for a rule that cannot match): how a listing of the chain maps back to
    /// model rules.
    pub fn policy_rules(p: &Policy, dir: Direction) -> Vec<Vec<NftRule>> {
        let mut c = Compiler::new(&[], &[]);
        let chain = policy_chain_name(&p.id, dir);
        p.rules(dir)
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let comment = format!("{} {dir} rule {i}", p.id.display_name());
                let counter = CounterName::rule(&chain, i, r.action);
                c.rule(r, &comment, &counter, p.id.kind.is_staged())
                    .into_iter()
                    .map(NftRule::new)
                    .collect()
            })
            .collect()
    }

    /// The chain of one policy in one direction (shared by every group that holds it).
    pub fn policy_chain(&mut self, p: &Policy, dir: Direction) -> String {
        let name = policy_chain_name(&p.id, dir);
        self.referenced.insert(name.clone());
        let known = self.known.is_some_and(|k| k(&name));
        if !known && self.policy_chains.insert(name.clone()) {
            let mut rules = Vec::new();
            for (i, r) in p.rules(dir).iter().enumerate() {
                let comment = format!("{} {dir} rule {i}", p.id.display_name());
                let counter = CounterName::rule(&name, i, r.action);
                rules.extend(self.rule(r, &comment, &counter, p.id.kind.is_staged()));
            }
            self.chain(&name, rules);
            let sets = std::mem::take(&mut self.naming);
            self.chain_sets.insert(name.clone(), sets);
        }
        name
    }

    /// One model rule → nft rules (one per family and per alternative; alternatives are
    /// ORed by being separate rules with the same verdict).
    fn rule(&mut self, r: &Rule, comment: &str, counter: &str, staged: bool) -> Vec<String> {
        let m = &r.matches;
        if m.unmatchable {
            return Vec::new();
        }
        let verdict = match r.action {
            Action::Allow => set_mark_and_return(MARK_ACCEPT),
            Action::Pass => set_mark_and_return(MARK_PASS),
            // A staged policy's Deny only tells its audit chain.
            Action::Deny if staged => set_mark_and_return(MARK_SCRATCH0),
            Action::Deny => "drop".to_string(),
            // To nflog, read by `dataplane::nflog` into one structured line per packet;
            // rate-limited so a flood cannot flood the logs.
            Action::Log => format!(
                "limit rate 10/second burst 20 packets log prefix \"{}\" group {}",
                truncate(comment, 127),
                crate::dataplane::nflog::GROUP
            ),
        };
        // Every nft rule of a Deny model rule (per family, per alternative) counts into one
        // named counter: the model rule's.
        let verdict = match r.action {
            Action::Deny => counted(counter, &verdict),
            _ => format!("counter {verdict}"),
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

    /// Records that the policy chain being built names this set.
    fn name_set(&mut self, name: String, spec: impl FnOnce() -> SetSpec) -> String {
        if !self.specs.contains_key(&name) {
            self.specs.insert(name.clone(), spec());
        }
        self.naming.insert(name.clone());
        name
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
        let name = self.name_set(name, || {
            SetSpec::Fixed(Set::prefixes(
                addr_type(fam),
                nets.iter().map(|n| Element::net(*n)),
            ))
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
        let name = self.name_set(name, || {
            SetSpec::Fixed(Set {
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
            })
        });
        format!("@{name}")
    }

    /// The address set of a rule selector: endpoint addresses and network-set nets whose
    /// labels match, as disjoint prefixes. Shared by every rule using the same selector.
    fn selector_set(&mut self, s: &Selector, fam: u8) -> String {
        let name = format!("s{fam}-{}", short_hash(s.canonical()));
        self.name_set(name, || SetSpec::Selector {
            selector: s.clone(),
            fam,
        })
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
        self.name_set(name, || SetSpec::NamedPort {
            selector: sel.cloned(),
            port: port.to_string(),
            proto,
            fam,
        })
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
/// (nft rejects overlapping elements and fails the whole transaction). Each prefix is
/// checked against its own supernets only, so thousands of pod addresses stay cheap.
pub fn disjoint(nets: &[IpNet]) -> Vec<IpNet> {
    let sorted: BTreeSet<IpNet> = nets.iter().map(|n| n.trunc()).collect();
    let lengths: BTreeSet<u8> = sorted.iter().map(IpNet::prefix_len).collect();
    let covered = |n: &IpNet| {
        lengths
            .iter()
            .take_while(|&&l| l < n.prefix_len())
            .filter_map(|&l| n.supernet_at(l))
            .any(|sup| sorted.contains(&sup))
    };
    sorted.iter().filter(|n| !covered(n)).copied().collect()
}

trait SupernetAt {
    fn supernet_at(&self, len: u8) -> Option<IpNet>;
}

impl SupernetAt for IpNet {
    fn supernet_at(&self, len: u8) -> Option<IpNet> {
        IpNet::new(self.addr(), len).ok().map(|n| n.trunc())
    }
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
            ep.interface = Some(format!("cali{}", ep.name()));
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
        assert_eq!(changed, ["fw-caliclient", "tw-caliclient"]);
        for (map, verdict) in [
            (FROM_MAP, "goto fw-caliclient"),
            (TO_MAP, "goto tw-caliclient"),
        ] {
            let (b, a) = (&before.maps[map].elements, &after.maps[map].elements);
            assert_eq!(a.len(), b.len() + 1);
            assert_eq!(a.get("caliclient").map(String::as_str), Some(verdict));
        }
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
        let group = tw_web
            .iter()
            .find_map(|r| r.strip_prefix("jump gi-"))
            .unwrap_or_else(|| panic!("no group jump: {tw_web:?}"));
        let group: Vec<&str> = t.chains[&format!("gi-{group}")]
            .rules
            .iter()
            .map(|r| r.text.as_str())
            .collect();
        assert!(group.contains(&"meta mark & 0x00020000 == 0 jump pi-np.prod.web-in"));
        assert!(
            tw_web.contains(
                &"meta mark & 0x00020000 == 0 counter name \"tw-caliweb/end-of-tier\" drop"
            ),
            "{tw_web:?}"
        );
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
        // Allow rules count in anonymous counters; the chain's rules are what
        // `policy_rules` says model rule 0 gives.
        assert!(
            pi.iter().all(|r| r.contains(" counter meta mark set")),
            "{pi:?}"
        );
        let m = model("db", false);
        let web_in = m.policies.iter().find(|p| p.id.name == "web-in").unwrap();
        let groups = Compiler::policy_rules(web_in, Direction::Ingress);
        assert_eq!(groups.len(), 1);
        let texts: Vec<&str> = groups[0].iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, pi);
    }

    #[test]
    fn endpoints_selected_by_the_same_policies_share_one_group_chain() {
        let t = compile(&model("db", true), &CompileOptions::default());
        let group_of = |iface: &str| -> Option<String> {
            t.chains[&format!("tw-{iface}")]
                .rules
                .iter()
                .find_map(|r| r.text.strip_prefix("jump ").map(String::from))
        };
        // web-in selects web only; db and client have no ingress policy, so no group.
        assert!(group_of("caliweb").is_some());
        assert_eq!(group_of("calidb"), None);
        assert_eq!(group_of("caliclient"), None);
        let groups = t.chains.keys().filter(|k| k.starts_with("gi-")).count();
        assert_eq!(groups, 1);
    }

    #[test]
    fn counter_names_parse_back() {
        let name = CounterName::rule("pi-knp.prod.a.b", 3, Action::Deny);
        assert_eq!(name, "pi-knp.prod.a.b/3/deny");
        assert_eq!(
            CounterName::parse(&name),
            Some(CounterName::Rule {
                chain: "pi-knp.prod.a.b".into(),
                rule: 3,
                action: Action::Deny
            })
        );
        assert_eq!(
            CounterName::parse("tw-cali0/end-of-tier"),
            Some(CounterName::Fixed {
                chain: "tw-cali0".into(),
                what: "end-of-tier".into()
            })
        );
        assert_eq!(CounterName::parse("nope"), None);
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
