//! The cluster's objects → the policy model: pods (with their namespace's and service
//! account's labels), every policy kind, network sets. Pure; the CLI and the daemon read the
//! objects and hand them in.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use kube::ResourceExt;

use crate::api;
use crate::datastore::pods::CachedPod;

use super::diagnostic::Diagnostic;
use super::endpoint::{Endpoint, NamedPort, NetworkSetEntry, Profile};
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
    let profiles = Profiles::of(c);
    for pod in &c.pods {
        let pod = Arc::new(CachedPod::from_pod(pod));
        if let Some(ep) = profiles.endpoint(&pod, &[]) {
            m.endpoints.push(ep);
        }
    }
    let empty = BTreeMap::new();
    let ns_labels = |ns: &str| {
        c.namespaces
            .iter()
            .find(|n| n.name_any() == ns)
            .map(|n| n.labels())
            .unwrap_or(&empty)
    };
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

/// The namespace and service-account profiles of a set of objects, one shared `Profile`
/// each (a namespace or account that has no object gets one without labels).
#[derive(Default)]
pub struct Profiles {
    namespaces: HashMap<String, Arc<Profile>>,
    service_accounts: HashMap<(String, String), Arc<Profile>>,
}

impl Profiles {
    pub fn of(c: &ClusterObjects) -> Profiles {
        let mut p = Profiles::default();
        for n in &c.namespaces {
            let name = n.name_any();
            p.namespaces
                .insert(name.clone(), Profile::new(&name, n.labels()));
        }
        for s in &c.service_accounts {
            let (ns, name) = (s.namespace().unwrap_or_default(), s.name_any());
            p.service_accounts
                .insert((ns, name.clone()), Profile::new(&name, s.labels()));
        }
        p
    }

    /// The profile of a namespace.
    pub fn namespace(&self, ns: &str) -> Arc<Profile> {
        self.namespaces
            .get(ns)
            .cloned()
            .unwrap_or_else(|| Profile::new(ns, &BTreeMap::new()))
    }

    /// The profile of a service account.
    pub fn service_account(&self, ns: &str, sa: &str) -> Arc<Profile> {
        self.service_accounts
            .get(&(ns.to_string(), sa.to_string()))
            .cloned()
            .unwrap_or_else(|| Profile::new(sa, &BTreeMap::new()))
    }

    /// The endpoint of a pod (see `pod_endpoint`), with these profiles.
    pub fn endpoint(&self, pod: &Arc<CachedPod>, known_ips: &[IpAddr]) -> Option<Endpoint> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let sa = self.service_account(ns, service_account_name(pod));
        pod_endpoint(pod, self.namespace(ns), Some(sa), known_ips)
    }
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

/// The service account a pod runs as (`default` when unset).
pub fn service_account_name(pod: &CachedPod) -> &str {
    pod.service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// A pod as Calico makes a WorkloadEndpoint of it: not host-networked, not finished, with
/// an IP (its status's, else `known_ips`: addresses the caller knows before the status has
/// them, the CNI's for a pod being added). Named ports come from its containers' ports
/// (protocol defaults to TCP).
pub fn pod_endpoint(
    pod: &Arc<CachedPod>,
    namespace: Arc<Profile>,
    service_account: Option<Arc<Profile>>,
    known_ips: &[IpAddr],
) -> Option<Endpoint> {
    endpoint_of_pod(pod, namespace, service_account, known_ips, false)
}

/// `pod_endpoint` for a pod scheduled to this node: one without an address yet is an
/// endpoint too (with none), so its chains and dispatch entries are in the kernel before its
/// CNI ADD, which then only adds its addresses to sets (elements, no chain).
pub fn local_pod_endpoint(
    pod: &Arc<CachedPod>,
    namespace: Arc<Profile>,
    service_account: Option<Arc<Profile>>,
    known_ips: &[IpAddr],
) -> Option<Endpoint> {
    endpoint_of_pod(pod, namespace, service_account, known_ips, true)
}

fn endpoint_of_pod(
    pod: &Arc<CachedPod>,
    namespace: Arc<Profile>,
    service_account: Option<Arc<Profile>>,
    known_ips: &[IpAddr],
    addressless: bool,
) -> Option<Endpoint> {
    if pod.host_network {
        return None;
    }
    if matches!(pod.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
        return None;
    }
    let mut ips: Vec<IpAddr> = pod.pod_ips.iter().filter_map(|p| p.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(pod.pod_ip.as_deref().and_then(|s| s.parse::<IpAddr>().ok()));
    }
    if ips.is_empty() {
        ips.extend_from_slice(known_ips);
    }
    if ips.is_empty() && !addressless {
        return None;
    }
    let named_ports = pod
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
        pod.clone(),
        namespace,
        service_account,
        ips,
        named_ports,
    ))
}
