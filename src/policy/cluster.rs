//! The cluster's objects → the policy model: pods (with their namespace's and service
//! account's labels), every policy kind, network sets. Pure; the CLI and the daemon read the
//! objects and hand them in.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use kube::ResourceExt;

use crate::api;

use super::endpoint::{Endpoint, NamedPort, NetworkSetEntry};
use super::model::{Model, PolicyId, PolicyKind};
use super::protocol::Protocol;

/// Everything policy evaluation reads from the API server.
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub service_accounts: Vec<ServiceAccount>,
    pub k8s_policies: Vec<K8sNetworkPolicy>,
    pub network_policies: Vec<api::NetworkPolicy>,
    pub global_network_policies: Vec<api::GlobalNetworkPolicy>,
    pub staged_network_policies: Vec<api::StagedNetworkPolicy>,
    pub staged_global_network_policies: Vec<api::StagedGlobalNetworkPolicy>,
    pub staged_k8s_policies: Vec<api::StagedKubernetesNetworkPolicy>,
    pub network_sets: Vec<api::NetworkSet>,
    pub global_network_sets: Vec<api::GlobalNetworkSet>,
}

pub fn build_model(c: &ClusterObjects) -> Model {
    let mut m = Model::default();
    let empty = BTreeMap::new();
    let ns_labels = |ns: &str| {
        c.namespaces
            .iter()
            .find(|n| n.name_any() == ns)
            .map(|n| n.labels())
            .unwrap_or(&empty)
    };
    for pod in &c.pods {
        if let Some(ep) = pod_endpoint(
            pod,
            ns_labels(&pod.namespace().unwrap_or_default()),
            &c.service_accounts,
        ) {
            m.endpoints.push(ep);
        }
    }
    for s in &c.network_sets {
        let ns = s.namespace().unwrap_or_default();
        m.network_sets.push(NetworkSetEntry::namespaced(
            &ns,
            &s.name_any(),
            s.labels(),
            ns_labels(&ns),
            s.spec.networks(),
        ));
    }
    for s in &c.global_network_sets {
        m.network_sets.push(NetworkSetEntry::global(
            &s.name_any(),
            s.labels(),
            s.spec.networks(),
        ));
    }
    let add = |m: &mut Model, (p, d): (super::model::Policy, Vec<super::Diagnostic>)| {
        m.diagnostics.extend(d);
        m.add_policy(p);
    };
    let id = |kind, ns: Option<String>, name: String| PolicyId {
        kind,
        namespace: ns.unwrap_or_default(),
        name,
    };
    for p in &c.k8s_policies {
        let ns = p.namespace().unwrap_or_default();
        let spec = p.spec.clone().unwrap_or_default();
        let r = super::k8s::convert(
            PolicyKind::KubernetesNetworkPolicy,
            &ns,
            &p.name_any(),
            &(&spec).into(),
            None,
        );
        add(&mut m, r);
    }
    for p in &c.staged_k8s_policies {
        let ns = p.namespace().unwrap_or_default();
        let r = super::k8s::convert(
            PolicyKind::StagedKubernetesNetworkPolicy,
            &ns,
            &p.name_any(),
            &(&p.spec).into(),
            Some(p.spec.staged_action),
        );
        add(&mut m, r);
    }
    for p in &c.network_policies {
        let r = super::calico::convert(
            id(PolicyKind::NetworkPolicy, p.namespace(), p.name_any()),
            &(&p.spec).into(),
        );
        add(&mut m, r);
    }
    for p in &c.global_network_policies {
        let r = super::calico::convert(
            id(PolicyKind::GlobalNetworkPolicy, None, p.name_any()),
            &(&p.spec).into(),
        );
        add(&mut m, r);
    }
    for p in &c.staged_network_policies {
        let r = super::calico::convert(
            id(PolicyKind::StagedNetworkPolicy, p.namespace(), p.name_any()),
            &(&p.spec).into(),
        );
        add(&mut m, r);
    }
    for p in &c.staged_global_network_policies {
        let r = super::calico::convert(
            id(PolicyKind::StagedGlobalNetworkPolicy, None, p.name_any()),
            &(&p.spec).into(),
        );
        add(&mut m, r);
    }
    m
}

/// A pod as Calico makes a WorkloadEndpoint of it: not host-networked, not finished, with
/// an IP. Named ports come from its containers' ports (protocol defaults to TCP).
pub fn pod_endpoint(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    service_accounts: &[ServiceAccount],
) -> Option<Endpoint> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|s| s.parse::<IpAddr>().ok()),
        );
    }
    if ips.is_empty() {
        return None;
    }
    let ns = pod.namespace().unwrap_or_default();
    let sa_name = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let empty = BTreeMap::new();
    let sa_labels = service_accounts
        .iter()
        .find(|s| s.namespace().as_deref() == Some(ns.as_str()) && s.name_any() == sa_name)
        .map(|s| s.labels())
        .unwrap_or(&empty);
    let named_ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone()?,
                protocol: Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?,
                port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect();
    Some(Endpoint::pod(
        &ns,
        &pod.name_any(),
        ips,
        pod.labels(),
        namespace_labels,
        Some((&sa_name, sa_labels)),
        named_ports,
    ))
}
