//! The cluster's objects → the policy model: pods (with their namespace's and service
//! account's labels), every policy kind, network sets. Pure; the CLI and the daemon read the
//! objects and hand them in.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use kube::ResourceExt;

use crate::api;

use super::diagnostic::Diagnostic;
use super::endpoint::{Endpoint, NamedPort, NetworkSetEntry};
use super::model::{Model, Policy, PolicyId, PolicyKind};
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
    let policies = c
        .k8s_policies
        .iter()
        .map(ToPolicy::to_policy)
        .chain(c.staged_k8s_policies.iter().map(ToPolicy::to_policy))
        .chain(c.network_policies.iter().map(ToPolicy::to_policy))
        .chain(c.global_network_policies.iter().map(ToPolicy::to_policy))
        .chain(c.staged_network_policies.iter().map(ToPolicy::to_policy))
        .chain(
            c.staged_global_network_policies
                .iter()
                .map(ToPolicy::to_policy),
        );
    for (p, d) in policies {
        m.diagnostics.extend(d);
        m.add_policy(p);
    }
    m
}

/// One policy object of any kind → the model's policy and what was wrong with it.
pub trait ToPolicy {
    const KIND: PolicyKind;
    fn to_policy(&self) -> (Policy, Vec<Diagnostic>);
}

fn id(kind: PolicyKind, ns: Option<String>, name: String) -> PolicyId {
    PolicyId {
        kind,
        namespace: ns.unwrap_or_default(),
        name,
    }
}

impl ToPolicy for K8sNetworkPolicy {
    const KIND: PolicyKind = PolicyKind::KubernetesNetworkPolicy;
    fn to_policy(&self) -> (Policy, Vec<Diagnostic>) {
        let ns = self.namespace().unwrap_or_default();
        let spec = self.spec.clone().unwrap_or_default();
        super::k8s::convert(Self::KIND, &ns, &self.name_any(), &(&spec).into(), None)
    }
}

impl ToPolicy for api::StagedKubernetesNetworkPolicy {
    const KIND: PolicyKind = PolicyKind::StagedKubernetesNetworkPolicy;
    fn to_policy(&self) -> (Policy, Vec<Diagnostic>) {
        let ns = self.namespace().unwrap_or_default();
        super::k8s::convert(
            Self::KIND,
            &ns,
            &self.name_any(),
            &(&self.spec).into(),
            Some(self.spec.staged_action),
        )
    }
}

macro_rules! calico_policy {
    ($ty:ty, $kind:expr) => {
        impl ToPolicy for $ty {
            const KIND: PolicyKind = $kind;
            fn to_policy(&self) -> (Policy, Vec<Diagnostic>) {
                super::calico::convert(
                    id(Self::KIND, self.namespace(), self.name_any()),
                    &(&self.spec).into(),
                )
            }
        }
    };
}

calico_policy!(api::NetworkPolicy, PolicyKind::NetworkPolicy);
calico_policy!(api::GlobalNetworkPolicy, PolicyKind::GlobalNetworkPolicy);
calico_policy!(api::StagedNetworkPolicy, PolicyKind::StagedNetworkPolicy);
calico_policy!(
    api::StagedGlobalNetworkPolicy,
    PolicyKind::StagedGlobalNetworkPolicy
);

/// A pod as Calico makes a WorkloadEndpoint of it: not host-networked, not finished, with
/// an IP. Named ports come from its containers' ports (protocol defaults to TCP).
pub fn pod_endpoint(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    service_accounts: &[ServiceAccount],
) -> Option<Endpoint> {
    let ns = pod.namespace().unwrap_or_default();
    let sa = service_account_name(pod);
    let sa_labels = service_accounts
        .iter()
        .find(|s| s.namespace().as_deref() == Some(ns.as_str()) && s.name_any() == sa)
        .map(|s| s.labels());
    pod_endpoint_with(pod, namespace_labels, sa_labels, &[])
}

/// The service account a pod runs as (`default` when unset).
pub fn service_account_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// `pod_endpoint` with the service account's labels looked up already, and addresses the
/// caller knows before the Pod's status has them (the CNI's, for a pod being added): used
/// when the Pod lists none.
pub fn pod_endpoint_with(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    sa_labels: Option<&BTreeMap<String, String>>,
    known_ips: &[IpAddr],
) -> Option<Endpoint> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    ) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|s| s.parse::<IpAddr>().ok()),
        );
    }
    if ips.is_empty() {
        ips.extend_from_slice(known_ips);
    }
    if ips.is_empty() {
        return None;
    }
    let ns = pod.namespace().unwrap_or_default();
    let sa_name = service_account_name(pod);
    let empty = BTreeMap::new();
    let sa_labels = sa_labels.unwrap_or(&empty);
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
