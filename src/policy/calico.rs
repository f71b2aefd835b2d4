//! Calico NetworkPolicy / GlobalNetworkPolicy (and the staged kinds) → the policy model, with
//! Calico's defaulting, selector rewriting and validation. Whatever tortie cannot fully
//! understand makes the policy fail closed; what does not apply to pods is reported.

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::{self, PolicyType, StagedAction};
use crate::selector::Selector;

use super::diagnostic::{Diagnostic, Severity};
use super::endpoint::{LABEL_NAMESPACE, LABEL_SERVICE_ACCOUNT, SERVICE_ACCOUNT_PREFIX};
use super::model::{Action, EntityMatch, IcmpMatch, Policy, PolicyId, Rule, RuleMatch};
use super::ports::PortMatch;
use super::protocol::Protocol;
use super::rewrite;

/// The fields every Calico policy kind shares, borrowed from whichever spec it came in.
#[derive(Debug, Default, Clone)]
pub struct SpecView<'a> {
    pub tier: Option<&'a str>,
    pub order: Option<f64>,
    pub selector: Option<&'a str>,
    /// As stored; empty is defaulted from the rule lists here.
    pub types: &'a [PolicyType],
    pub ingress: &'a [api::Rule],
    pub egress: &'a [api::Rule],
    pub service_account_selector: Option<&'a str>,
    /// GlobalNetworkPolicy only.
    pub namespace_selector: Option<&'a str>,
    pub do_not_track: bool,
    pub pre_dnat: bool,
    pub apply_on_forward: bool,
    pub staged_action: Option<StagedAction>,
}

impl<'a> From<&'a api::NetworkPolicySpec> for SpecView<'a> {
    fn from(s: &'a api::NetworkPolicySpec) -> Self {
        SpecView {
            tier: s.tier.as_deref(),
            order: s.order,
            selector: s.selector.as_deref(),
            types: &s.types,
            ingress: &s.ingress,
            egress: &s.egress,
            service_account_selector: s.service_account_selector.as_deref(),
            ..Default::default()
        }
    }
}

impl<'a> From<&'a api::GlobalNetworkPolicySpec> for SpecView<'a> {
    fn from(s: &'a api::GlobalNetworkPolicySpec) -> Self {
        SpecView {
            tier: s.tier.as_deref(),
            order: s.order,
            selector: s.selector.as_deref(),
            types: &s.types,
            ingress: &s.ingress,
            egress: &s.egress,
            service_account_selector: s.service_account_selector.as_deref(),
            namespace_selector: s.namespace_selector.as_deref(),
            do_not_track: s.do_not_track,
            pre_dnat: s.pre_dnat,
            apply_on_forward: s.apply_on_forward,
            staged_action: None,
        }
    }
}

impl<'a> From<&'a api::StagedNetworkPolicySpec> for SpecView<'a> {
    fn from(s: &'a api::StagedNetworkPolicySpec) -> Self {
        SpecView {
            tier: s.tier.as_deref(),
            order: s.order,
            selector: s.selector.as_deref(),
            types: &s.types,
            ingress: &s.ingress,
            egress: &s.egress,
            service_account_selector: s.service_account_selector.as_deref(),
            staged_action: Some(s.staged_action),
            ..Default::default()
        }
    }
}

impl<'a> From<&'a api::StagedGlobalNetworkPolicySpec> for SpecView<'a> {
    fn from(s: &'a api::StagedGlobalNetworkPolicySpec) -> Self {
        SpecView {
            tier: s.tier.as_deref(),
            order: s.order,
            selector: s.selector.as_deref(),
            types: &s.types,
            ingress: &s.ingress,
            egress: &s.egress,
            service_account_selector: s.service_account_selector.as_deref(),
            namespace_selector: s.namespace_selector.as_deref(),
            do_not_track: s.do_not_track,
            pre_dnat: s.pre_dnat,
            apply_on_forward: s.apply_on_forward,
            staged_action: Some(s.staged_action),
        }
    }
}

/// Collects problems while converting one policy.
struct Ctx<'a> {
    id: &'a PolicyId,
    diags: Vec<Diagnostic>,
    fail_closed: bool,
}

impl Ctx<'_> {
    fn report(&mut self, severity: Severity, field: impl Into<String>, message: impl Into<String>) {
        if severity == Severity::FailClosed {
            self.fail_closed = true;
        }
        self.diags.push(Diagnostic {
            policy: self.id.clone(),
            severity,
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Converts one Calico policy. `id.namespace` empty means a global kind.
pub fn convert(id: PolicyId, spec: &SpecView<'_>) -> (Policy, Vec<Diagnostic>) {
    let mut cx = Ctx {
        id: &id,
        diags: Vec::new(),
        fail_closed: false,
    };
    let ns = id.namespace.as_str();
    let types = if spec.types.is_empty() {
        api::networkpolicy::default_types(!spec.ingress.is_empty(), !spec.egress.is_empty())
    } else {
        spec.types.to_vec()
    };
    let mut selector = own_selector(spec, ns, &mut cx);

    // Fields whose policies never reach a pod's tiers in Felix.
    if let Some(tier) = spec.tier.filter(|t| !t.is_empty() && *t != "default") {
        cx.report(
            Severity::NotApplied,
            "spec.tier",
            format!("tier {tier:?}: tortie enforces only the default tier"),
        );
        selector = None;
    }
    for (on, field) in [
        (spec.do_not_track, "spec.doNotTrack"),
        (spec.pre_dnat, "spec.preDNAT"),
    ] {
        if on {
            cx.report(
                Severity::NotApplied,
                field,
                "applies only to host endpoints; the policy does not apply to pods",
            );
            selector = None;
        }
    }
    if spec.apply_on_forward {
        cx.report(
            Severity::NotApplied,
            "spec.applyOnForward",
            "matters only for host endpoints; ignored for pods",
        );
    }

    let mut ingress = convert_rules(spec.ingress, "spec.ingress", ns, &mut cx);
    let mut egress = convert_rules(spec.egress, "spec.egress", ns, &mut cx);
    let ingress_applies = types.contains(&PolicyType::Ingress);
    let egress_applies = types.contains(&PolicyType::Egress);
    let fail_closed = cx.fail_closed;
    if fail_closed {
        // tortie cannot know what the policy would have allowed or denied, so everything
        // that reaches it in its directions is denied; policies before it still decide.
        let deny = || Rule {
            action: Action::Deny,
            matches: RuleMatch::default(),
        };
        ingress = vec![deny()];
        egress = vec![deny()];
    }
    let policy = Policy {
        order: spec.order,
        selector,
        ingress_applies,
        egress_applies,
        ingress,
        egress,
        staged_action: spec.staged_action,
        fail_closed,
        id: id.clone(),
    };
    (policy, cx.diags)
}

/// The policy's own selector, rewritten as Calico's policy processors do; `None` (selects
/// nothing) when any part of it cannot be parsed.
fn own_selector(spec: &SpecView<'_>, ns: &str, cx: &mut Ctx<'_>) -> Option<Selector> {
    let base = spec.selector.unwrap_or("");
    if let Err(e) = Selector::parse(base) {
        cx.report(Severity::SelectsNothing, "spec.selector", e.to_string());
        return None;
    }
    let mut text = base.to_string();
    if !ns.is_empty() {
        let scope = format!("{LABEL_NAMESPACE} == '{ns}'");
        text = if text.is_empty() {
            scope
        } else {
            format!("({text}) && {scope}")
        };
    }
    let steps: [(Option<&str>, &str, &str, &str); 2] = [
        (
            spec.namespace_selector,
            super::endpoint::NAMESPACE_PREFIX,
            LABEL_NAMESPACE,
            "spec.namespaceSelector",
        ),
        (
            spec.service_account_selector,
            SERVICE_ACCOUNT_PREFIX,
            LABEL_SERVICE_ACCOUNT,
            "spec.serviceAccountSelector",
        ),
    ];
    for (extra, prefix, has_key, field) in steps {
        let Some(extra) = extra.filter(|s| !s.is_empty()) else {
            continue;
        };
        let step = rewrite::prefix_and_append(&text, extra, prefix).and_then(|t| {
            // Global policies turn `all()` into "has the label" (the whole text, as Calico's
            // string replace does); namespaced ones keep it.
            if ns.is_empty() {
                rewrite::replace_all(&t, has_key)
            } else {
                Ok(t)
            }
        });
        match step {
            Ok(t) => text = t,
            Err(e) => {
                cx.report(Severity::SelectsNothing, field, e.to_string());
                return None;
            }
        }
    }
    match Selector::parse(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            cx.report(Severity::SelectsNothing, "spec.selector", e.to_string());
            None
        }
    }
}

fn convert_rules(rules: &[api::Rule], path: &str, ns: &str, cx: &mut Ctx<'_>) -> Vec<Rule> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| convert_rule(r, &format!("{path}[{i}]"), ns, cx))
        .collect()
}

fn convert_rule(r: &api::Rule, path: &str, ns: &str, cx: &mut Ctx<'_>) -> Rule {
    let mut m = RuleMatch::default();
    if let Some(v) = r.ip_version {
        match v {
            4 | 6 => m.ip_version = Some(v as u8),
            _ => cx.report(
                Severity::FailClosed,
                format!("{path}.ipVersion"),
                format!("{v} is not 4 or 6"),
            ),
        }
    }
    m.protocol = protocol(r.protocol.as_ref(), &format!("{path}.protocol"), cx);
    m.not_protocol = protocol(r.not_protocol.as_ref(), &format!("{path}.notProtocol"), cx);
    m.icmp = icmp(r.icmp.as_ref(), m.protocol, &format!("{path}.icmp"), cx);
    m.not_icmp = icmp(
        r.not_icmp.as_ref(),
        m.protocol,
        &format!("{path}.notICMP"),
        cx,
    );
    m.source = entity(&r.source, &format!("{path}.source"), ns, cx);
    m.destination = entity(&r.destination, &format!("{path}.destination"), ns, cx);
    let has_ports = [&m.source, &m.destination]
        .iter()
        .any(|e| !e.ports.is_empty() || !e.not_ports.is_empty());
    if has_ports && !m.protocol.is_some_and(Protocol::has_ports) {
        cx.report(
            Severity::FailClosed,
            format!("{path}.protocol"),
            "ports need protocol TCP, UDP or SCTP",
        );
    }
    for (side, e) in [("source", &r.source), ("destination", &r.destination)] {
        if e.services.is_some() {
            m.unmatchable = true;
            cx.report(
                Severity::NotApplied,
                format!("{path}.{side}.services"),
                "service matches are not supported; this rule never matches",
            );
        }
    }
    if r.http.is_some() {
        cx.report(
            Severity::NotApplied,
            format!("{path}.http"),
            "HTTP matches need an application-layer proxy; only the rule's L3/L4 part is enforced",
        );
    }
    Rule {
        action: r.action.into(),
        matches: m,
    }
}

fn protocol(v: Option<&IntOrString>, field: &str, cx: &mut Ctx<'_>) -> Option<Protocol> {
    let v = v?;
    let p = Protocol::from_int_or_string(v);
    if p.is_none() {
        cx.report(
            Severity::FailClosed,
            field,
            format!("{v:?} is not a protocol name or 1-255"),
        );
    }
    p
}

fn icmp(
    v: Option<&api::ICMPFields>,
    proto: Option<Protocol>,
    field: &str,
    cx: &mut Ctx<'_>,
) -> Option<IcmpMatch> {
    let v = v?;
    if !proto.is_some_and(Protocol::is_icmp) {
        cx.report(
            Severity::FailClosed,
            field,
            "ICMP matches need protocol ICMP or ICMPv6",
        );
        return None;
    }
    let ty = match v.type_ {
        Some(t) => u8::try_from(t).ok().filter(|t| *t < 255),
        None if v.code.is_some() => {
            cx.report(Severity::FailClosed, field, "an ICMP code needs a type");
            return None;
        }
        None => return None,
    };
    let code = v.code.map(u8::try_from);
    match (ty, code) {
        (Some(type_), None) => Some(IcmpMatch { type_, code: None }),
        (Some(type_), Some(Ok(c))) => Some(IcmpMatch {
            type_,
            code: Some(c),
        }),
        _ => {
            cx.report(
                Severity::FailClosed,
                field,
                "ICMP type or code out of range",
            );
            None
        }
    }
}

fn entity(e: &api::EntityRule, path: &str, ns: &str, cx: &mut Ctx<'_>) -> EntityMatch {
    let mut out = EntityMatch {
        nets: nets(&e.nets, &format!("{path}.nets"), cx),
        not_nets: nets(&e.not_nets, &format!("{path}.notNets"), cx),
        ..Default::default()
    };
    let sa = match &e.service_accounts {
        Some(sa) => match rewrite::service_accounts(sa.selector.as_deref(), &sa.names) {
            Ok(s) => s,
            Err(err) => {
                cx.report(
                    Severity::FailClosed,
                    format!("{path}.serviceAccounts"),
                    err.to_string(),
                );
                String::new()
            }
        },
        None => String::new(),
    };
    let not_sel = e.not_selector.as_deref().filter(|s| !s.is_empty());
    match rewrite::entity_selector(
        e.namespace_selector.as_deref(),
        e.selector.as_deref(),
        &sa,
        not_sel.is_some(),
        ns,
    ) {
        Ok(text) if text.is_empty() => {}
        Ok(text) => match Selector::parse(&text) {
            Ok(s) => out.selector = Some(s),
            Err(err) => cx.report(
                Severity::FailClosed,
                format!("{path}.selector"),
                err.to_string(),
            ),
        },
        Err(err) => {
            let which = if e
                .namespace_selector
                .as_deref()
                .is_some_and(|s| Selector::parse(s).is_err())
            {
                "namespaceSelector"
            } else {
                "selector"
            };
            cx.report(
                Severity::FailClosed,
                format!("{path}.{which}"),
                err.to_string(),
            );
        }
    }
    // The notSelector passes through unscoped (Calico's `NotSrcSelector`).
    if let Some(s) = not_sel {
        match Selector::parse(s) {
            Ok(s) => out.not_selector = Some(s),
            Err(err) => cx.report(
                Severity::FailClosed,
                format!("{path}.notSelector"),
                err.to_string(),
            ),
        }
    }
    out.ports = ports(&e.ports, &format!("{path}.ports"), cx);
    out.not_ports = ports(&e.not_ports, &format!("{path}.notPorts"), cx);
    out
}

/// Rule nets: a CIDR or a bare address, masked to the network (`ParseCIDROrIP`).
fn nets(v: &[String], field: &str, cx: &mut Ctx<'_>) -> Vec<IpNet> {
    let mut out = Vec::new();
    for s in v {
        let parsed = s
            .parse::<IpNet>()
            .ok()
            .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from));
        match parsed {
            Some(n) => out.push(n.trunc()),
            None => cx.report(
                Severity::FailClosed,
                field,
                format!("{s:?} is not a CIDR or address"),
            ),
        }
    }
    out
}

fn ports(v: &[IntOrString], field: &str, cx: &mut Ctx<'_>) -> Vec<PortMatch> {
    let mut out = Vec::new();
    for p in v {
        match PortMatch::parse(p) {
            Ok(p) => out.push(p),
            Err(e) => cx.report(Severity::FailClosed, field, e),
        }
    }
    out
}
