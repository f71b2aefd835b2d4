//! Kubernetes NetworkPolicy → Calico NetworkPolicy, as libcalico-go's converter does it
//! (`K8sNetworkPolicyToCalico`): order 1000, default tier, the pod selector prefixed with
//! `projectcalico.org/orchestrator == 'k8s'`, one Allow rule per (protocol × peer) with the
//! protocol's ports coalesced, TCP as the default protocol, `endPort` as a range, `ipBlock`
//! as nets and notNets. The result then goes through the Calico path like any policy.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec as K8sSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::{self, EntityRule, PolicyType};

use super::diagnostic::{Diagnostic, Severity};
use super::endpoint::LABEL_ORCHESTRATOR;
use super::model::{Policy, PolicyId, PolicyKind};

/// Order Calico gives every Kubernetes NetworkPolicy.
pub const KNP_ORDER: f64 = 1000.0;

/// A Kubernetes NetworkPolicy spec's parts (shared with StagedKubernetesNetworkPolicy).
pub struct K8sView<'a> {
    pub pod_selector: &'a LabelSelector,
    pub ingress: Vec<(&'a [NetworkPolicyPeer], &'a [NetworkPolicyPort])>,
    pub egress: Vec<(&'a [NetworkPolicyPeer], &'a [NetworkPolicyPort])>,
    pub policy_types: Vec<&'a str>,
}

impl<'a> From<&'a K8sSpec> for K8sView<'a> {
    fn from(s: &'a K8sSpec) -> Self {
        let empty_sel: &'static LabelSelector = &EMPTY_SELECTOR;
        K8sView {
            pod_selector: s.pod_selector.as_ref().unwrap_or(empty_sel),
            ingress: s
                .ingress
                .iter()
                .flatten()
                .map(|r| {
                    (
                        r.from.as_deref().unwrap_or(&[]),
                        r.ports.as_deref().unwrap_or(&[]),
                    )
                })
                .collect(),
            egress: s
                .egress
                .iter()
                .flatten()
                .map(|r| {
                    (
                        r.to.as_deref().unwrap_or(&[]),
                        r.ports.as_deref().unwrap_or(&[]),
                    )
                })
                .collect(),
            policy_types: s
                .policy_types
                .iter()
                .flatten()
                .map(String::as_str)
                .collect(),
        }
    }
}

impl<'a> From<&'a api::StagedKubernetesNetworkPolicySpec> for K8sView<'a> {
    fn from(s: &'a api::StagedKubernetesNetworkPolicySpec) -> Self {
        K8sView {
            pod_selector: &s.pod_selector,
            ingress: s
                .ingress
                .iter()
                .map(|r| {
                    (
                        r.from.as_deref().unwrap_or(&[]),
                        r.ports.as_deref().unwrap_or(&[]),
                    )
                })
                .collect(),
            egress: s
                .egress
                .iter()
                .map(|r| {
                    (
                        r.to.as_deref().unwrap_or(&[]),
                        r.ports.as_deref().unwrap_or(&[]),
                    )
                })
                .collect(),
            policy_types: s.policy_types.iter().map(String::as_str).collect(),
        }
    }
}

static EMPTY_SELECTOR: LabelSelector = LabelSelector {
    match_expressions: None,
    match_labels: None,
};

/// Converts a Kubernetes NetworkPolicy (kind KubernetesNetworkPolicy, or the staged kind)
/// in `namespace` into the model, with the diagnostics of the conversion.
pub fn convert(
    kind: PolicyKind,
    namespace: &str,
    name: &str,
    view: &K8sView<'_>,
    staged_action: Option<api::StagedAction>,
) -> (Policy, Vec<Diagnostic>) {
    let id = PolicyId {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    };
    let mut diags = Vec::new();
    let mut bad = |field: String, message: String| {
        diags.push(Diagnostic {
            policy: id.clone(),
            severity: Severity::FailClosed,
            field,
            message,
        })
    };
    let ingress: Vec<api::Rule> = view
        .ingress
        .iter()
        .enumerate()
        .flat_map(|(i, (peers, ports))| {
            rules(peers, ports, true, &mut |f, m| {
                bad(format!("spec.ingress[{i}].{f}"), m)
            })
        })
        .collect();
    let egress: Vec<api::Rule> = view
        .egress
        .iter()
        .enumerate()
        .flat_map(|(i, (peers, ports))| {
            rules(peers, ports, false, &mut |f, m| {
                bad(format!("spec.egress[{i}].{f}"), m)
            })
        })
        .collect();
    let mut types = Vec::new();
    if view.policy_types.contains(&"Ingress") {
        types.push(PolicyType::Ingress);
    }
    if view.policy_types.contains(&"Egress") {
        types.push(PolicyType::Egress);
    }
    // No policyTypes: a cluster from before the field existed, so ingress only.
    if types.is_empty() {
        types.push(PolicyType::Ingress);
    }
    let selector = label_selector(view.pod_selector, true);
    let spec = super::calico::SpecView {
        order: Some(KNP_ORDER),
        selector: Some(&selector),
        types: &types,
        ingress: &ingress,
        egress: &egress,
        staged_action,
        ..Default::default()
    };
    let (mut policy, more) = super::calico::convert(id, &spec);
    diags.extend(more);
    if diags.iter().any(|d| d.severity == Severity::FailClosed) && !policy.fail_closed {
        policy = fail_closed(policy);
    }
    (policy, diags)
}

fn fail_closed(mut p: Policy) -> Policy {
    let deny = || super::model::Rule {
        action: super::model::Action::Deny,
        matches: Default::default(),
    };
    p.ingress = vec![deny()];
    p.egress = vec![deny()];
    p.fail_closed = true;
    p
}

/// `k8sSelectorToCalico`. Pod selectors get the orchestrator test; an empty namespace
/// selector is `all()`.
pub fn label_selector(s: &LabelSelector, pod: bool) -> String {
    let mut parts = Vec::new();
    if pod {
        parts.push(format!("{LABEL_ORCHESTRATOR} == 'k8s'"));
    }
    let labels: BTreeMap<&String, &String> = s.match_labels.iter().flatten().collect();
    let exprs = s.match_expressions.as_deref().unwrap_or(&[]);
    if !pod && labels.is_empty() && exprs.is_empty() {
        return "all()".into();
    }
    for (k, v) in labels {
        parts.push(format!("{k} == '{v}'"));
    }
    for e in exprs {
        let values = e.values.as_deref().unwrap_or(&[]).join("', '");
        match e.operator.as_str() {
            "In" => parts.push(format!("{} in {{ '{values}' }}", e.key)),
            "NotIn" => parts.push(format!("{} not in {{ '{values}' }}", e.key)),
            "Exists" => parts.push(format!("has({})", e.key)),
            "DoesNotExist" => parts.push(format!("! has({})", e.key)),
            // The API server rejects other operators; one that slips through matches nothing.
            _ => parts.push("has(projectcalico.org/invalid-operator) && !all()".into()),
        }
    }
    parts.join(" && ")
}

/// `k8sRuleToCalico`: one rule per (protocol × peer).
fn rules(
    peers: &[NetworkPolicyPeer],
    ports: &[NetworkPolicyPort],
    ingress: bool,
    bad: &mut dyn FnMut(String, String),
) -> Vec<api::Rule> {
    // protocol ("" = any) → ports (None = all ports of that protocol).
    let mut by_proto: BTreeMap<String, Option<Vec<IntOrString>>> = BTreeMap::new();
    if ports.is_empty() {
        by_proto.insert(String::new(), None);
    }
    for (i, p) in ports.iter().enumerate() {
        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        let port = match (&p.port, p.end_port) {
            (None, _) => None,
            (Some(IntOrString::Int(n)), Some(end)) => {
                Some(IntOrString::String(format!("{n}:{end}")))
            }
            (Some(IntOrString::String(s)), Some(end)) => {
                bad(
                    format!("ports[{i}].endPort"),
                    format!("endPort {end} with named port {s:?}"),
                );
                continue;
            }
            (Some(IntOrString::Int(n)), None) => Some(IntOrString::Int(*n)),
            (Some(IntOrString::String(s)), None) => Some(IntOrString::String(s.clone())),
        };
        match port {
            // All ports of this protocol; wins over any listed ones.
            None => {
                by_proto.insert(proto, None);
            }
            Some(port) => {
                if let Some(list) = by_proto.entry(proto).or_insert_with(|| Some(Vec::new())) {
                    list.push(port);
                }
            }
        }
    }
    let peers: Vec<Option<&NetworkPolicyPeer>> = if peers.is_empty() {
        vec![None]
    } else {
        peers.iter().map(Some).collect()
    };
    let mut out = Vec::new();
    for (proto, ports) in by_proto {
        let protocol = (!proto.is_empty()).then(|| IntOrString::String(proto.clone()));
        for (i, peer) in peers.iter().enumerate() {
            let mut e = match peer {
                Some(peer) => match peer_entity(peer) {
                    Ok(e) => e,
                    Err(m) => {
                        let side = if ingress { "from" } else { "to" };
                        bad(format!("{side}[{i}].ipBlock"), m);
                        continue;
                    }
                },
                None => EntityRule::default(),
            };
            let ports = ports.clone().unwrap_or_default();
            let mut rule = api::Rule {
                action: api::Action::Allow,
                protocol: protocol.clone(),
                ..Default::default()
            };
            if ingress {
                rule.source = e;
                rule.destination.ports = ports;
            } else {
                e.ports = ports;
                rule.destination = e;
            }
            out.push(rule);
        }
    }
    out
}

/// `k8sPeerToCalicoFields`.
fn peer_entity(peer: &NetworkPolicyPeer) -> Result<EntityRule, String> {
    if let Some(b) = &peer.ip_block {
        let cidr = |s: &str| -> Result<String, String> {
            s.parse::<ipnet::IpNet>()
                .map(|n| n.trunc().to_string())
                .map_err(|_| format!("{s:?} is not a CIDR"))
        };
        let mut not_nets = Vec::new();
        for e in b.except.iter().flatten() {
            not_nets.push(cidr(e)?);
        }
        return Ok(EntityRule {
            nets: vec![cidr(&b.cidr)?],
            not_nets,
            ..Default::default()
        });
    }
    let empty = LabelSelector::default();
    Ok(EntityRule {
        selector: Some(label_selector(
            peer.pod_selector.as_ref().unwrap_or(&empty),
            true,
        )),
        namespace_selector: peer
            .namespace_selector
            .as_ref()
            .map(|s| label_selector(s, false)),
        ..Default::default()
    })
}
