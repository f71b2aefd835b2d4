//! This node's policy table: the cluster's policy objects → the model, this node's pods
//! given their host-side `cali*` interface, compiled to the desired `inet tortie-policy`
//! table.
//!
//! `PolicyCalc` is what the daemon runs: it keeps the compiled table (`policy::incremental`)
//! and, given a snapshot of the stores (`Arc`s, so nothing is cloned), finds what changed
//! by pointer and applies only that: a pod label change costs one evaluation of each
//! distinct selector and edits set elements. `policy_plan` is the whole computation from
//! scratch, kept as the reference the calculator is tested against.
//!
//! Addresses, as Calico's pod conversion takes them: a pod this node's CNI registered has
//! the addresses IPAM gave it (its ADD waits for this table, long before kubelet writes a
//! status); other pods take their `cni.projectcalico.org/podIPs` (else `podIP`) annotation,
//! written right after their ADD, over their status.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use crate::api;
use crate::api::vocab::{ANNOTATION_POD_IP, ANNOTATION_POD_IPS};
use crate::cni::handlers::endpoints::LocalEndpoint as Registered;
use crate::cni::plumbing::host_veth_name;
use crate::datastore::PolicyStores;
use crate::datastore::pods::CachedPod;
use crate::desired::nft::Table;
use crate::policy::by_name::{ByName, Named};
use crate::policy::cluster::{
    ClusterObjects, Profiles, ToPolicy, build_model, local_pod_endpoint, pod_endpoint,
    service_account_name,
};
use crate::policy::compile::{CompileOptions, compile};
use crate::policy::incremental::{Incremental, Key, Touched};
use crate::policy::{Diagnostic, Endpoint, Model, NetworkSetEntry, PolicyId, Profile};

/// The desired table and the diagnostics the model raised (for Events, logs, metrics).
pub struct PolicyPlan {
    pub table: Table,
    pub diagnostics: Vec<Diagnostic>,
}

/// A pod of this node that the CNI is adding: its host-side interface and the addresses
/// it was given, known before the Pod's status lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOverride {
    pub interface: String,
    pub ips: Vec<IpAddr>,
}

/// Local endpoint overrides by (namespace, pod name).
pub type LocalOverrides = BTreeMap<Key, LocalOverride>;

/// The overrides the CNI's registry stands for.
pub fn overrides_of(registered: &[Registered]) -> LocalOverrides {
    registered
        .iter()
        .map(|r| {
            let o = LocalOverride {
                interface: r.interface.clone(),
                ips: r.ips.clone(),
            };
            ((r.namespace.clone(), r.pod.clone()), o)
        })
        .collect()
}

/// A pod's `cni.projectcalico.org/podIPs` (else `podIP`) annotation; None when absent.
fn annotated_ips(pod: &CachedPod) -> Option<Vec<IpAddr>> {
    let ann = |key: &str| {
        pod.annotations
            .iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.as_str())
    };
    let value = ann(ANNOTATION_POD_IPS).or_else(|| ann(ANNOTATION_POD_IP))?;
    let ips: Vec<IpAddr> = value
        .split(',')
        .filter_map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .map(|n| n.addr())
                .or_else(|_| s.parse::<IpAddr>())
                .ok()
        })
        .collect();
    (!ips.is_empty()).then_some(ips)
}

/// Whether `pod` runs on `node`: only those get dispatch entries and endpoint chains.
fn on_node(pod: &CachedPod, node: &str) -> bool {
    pod.node_name.as_deref() == Some(node)
}

/// A pod's endpoint as this node sees it: local (with its interface) when it runs here or
/// the CNI named it, with the CNI's addresses when the Pod has none yet.
fn endpoint_of(
    pod: &Arc<CachedPod>,
    node: &str,
    namespace: Arc<Profile>,
    service_account: Arc<Profile>,
    local: Option<&LocalOverride>,
) -> Option<Endpoint> {
    let preferred: Vec<IpAddr> = match local {
        Some(l) => l.ips.clone(),
        None => annotated_ips(pod).unwrap_or_default(),
    };
    let here = local.is_some() || on_node(pod, node);
    let mut ep = if here {
        local_pod_endpoint(pod, namespace, Some(service_account), &preferred)?
    } else {
        pod_endpoint(pod, namespace, Some(service_account), &preferred)?
    };
    if !preferred.is_empty() {
        ep.ips = preferred.into();
    }
    ep.interface = match local {
        Some(l) => Some(l.interface.clone()),
        None if here => Some(host_veth_name(ep.namespace(), ep.name())),
        None => None,
    };
    Some(ep)
}

/// The model with this node's endpoints marked by their interface (from scratch).
pub fn local_model(objects: &ClusterObjects, node: &str, local: &LocalOverrides) -> Model {
    let mut model = build_model(objects);
    let profiles = Profiles::of(objects);
    model.endpoints = objects
        .pods
        .iter()
        .filter_map(|pod| {
            let pod = Arc::new(CachedPod::from_pod(pod));
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let sa = profiles.service_account(&ns, service_account_name(&pod));
            let l = local.get(&(ns.clone(), pod.name_any()));
            endpoint_of(&pod, node, profiles.namespace(&ns), sa, l)
        })
        .collect();
    model
}

/// The whole table from scratch (the reference for `PolicyCalc`).
pub fn policy_plan(objects: &ClusterObjects, node: &str, opts: &CompileOptions) -> PolicyPlan {
    let model = local_model(objects, node, &LocalOverrides::new());
    PolicyPlan {
        table: compile(&model, opts),
        diagnostics: model.diagnostics.clone(),
    }
}

/// Everything policy reads, as the stores hold it (shared, not copied).
#[derive(Debug, Clone, Default)]
pub struct PolicySnapshot {
    pub namespaces: Vec<Arc<Namespace>>,
    /// As the daemon caches them (endpoints are made of these, shared, not copied).
    pub pods: Vec<Arc<CachedPod>>,
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    pub k8s_policies: Vec<Arc<K8sNetworkPolicy>>,
    pub network_policies: Vec<Arc<api::NetworkPolicy>>,
    pub global_network_policies: Vec<Arc<api::GlobalNetworkPolicy>>,
    pub staged_network_policies: Vec<Arc<api::StagedNetworkPolicy>>,
    pub staged_global_network_policies: Vec<Arc<api::StagedGlobalNetworkPolicy>>,
    pub staged_k8s_policies: Vec<Arc<api::StagedKubernetesNetworkPolicy>>,
    pub network_sets: Vec<Arc<api::NetworkSet>>,
    pub global_network_sets: Vec<Arc<api::GlobalNetworkSet>>,
}

impl PolicySnapshot {
    /// The stores' current contents; `pods` is the daemon's one Pod store.
    pub fn of(stores: &PolicyStores, pods: &Store<CachedPod>) -> PolicySnapshot {
        PolicySnapshot {
            namespaces: stores.namespaces.state(),
            pods: pods.state(),
            service_accounts: stores.service_accounts.state(),
            k8s_policies: stores.k8s_policies.state(),
            network_policies: stores.network_policies.state(),
            global_network_policies: stores.global_network_policies.state(),
            staged_network_policies: stores.staged_network_policies.state(),
            staged_global_network_policies: stores.staged_global_network_policies.state(),
            staged_k8s_policies: stores.staged_k8s_policies.state(),
            network_sets: stores.network_sets.state(),
            global_network_sets: stores.global_network_sets.state(),
        }
    }

    /// Lays the CNI's registered pods over the store's: a pod the store has not delivered
    /// yet stands in with the copy its ADD read (the same `Arc` every pass, so unchanged).
    pub fn with_registered(mut self, registered: &[Registered]) -> PolicySnapshot {
        let missing: Vec<&Registered> = registered.iter().filter(|r| r.object.is_some()).collect();
        if missing.is_empty() {
            return self;
        }
        let known: HashSet<(&str, String)> = self
            .pods
            .iter()
            .map(|p| {
                (
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.name_any(),
                )
            })
            .collect();
        let add: Vec<Arc<CachedPod>> = missing
            .into_iter()
            .filter(|r| !known.contains(&(r.namespace.as_str(), r.pod.clone())))
            .filter_map(|r| r.object.as_deref().map(CachedPod::from_pod).map(Arc::new))
            .collect();
        self.pods.extend(add);
        self
    }

    /// Plain copies of every object (the reference computation, the conntrack cut).
    pub fn to_objects(&self) -> ClusterObjects {
        fn plain<T: Clone>(v: &[Arc<T>]) -> Vec<T> {
            v.iter().map(|a| (**a).clone()).collect()
        }
        ClusterObjects {
            namespaces: plain(&self.namespaces),
            pods: self.pods.iter().map(|p| p.to_pod()).collect(),
            service_accounts: plain(&self.service_accounts),
            k8s_policies: plain(&self.k8s_policies),
            network_policies: plain(&self.network_policies),
            global_network_policies: plain(&self.global_network_policies),
            staged_network_policies: plain(&self.staged_network_policies),
            staged_global_network_policies: plain(&self.staged_global_network_policies),
            staged_k8s_policies: plain(&self.staged_k8s_policies),
            network_sets: plain(&self.network_sets),
            global_network_sets: plain(&self.global_network_sets),
        }
    }

    /// Enforced policy objects in the cluster (Felix's `felix_cluster_num_policies`).
    pub fn enforced_policies(&self) -> usize {
        self.k8s_policies.len() + self.network_policies.len() + self.global_network_policies.len()
    }

    /// A snapshot of plain objects (tests, benches, the CLI).
    pub fn from_objects(c: &ClusterObjects) -> PolicySnapshot {
        fn arcs<T: Clone>(v: &[T]) -> Vec<Arc<T>> {
            v.iter().cloned().map(Arc::new).collect()
        }
        PolicySnapshot {
            namespaces: arcs(&c.namespaces),
            pods: c
                .pods
                .iter()
                .map(|p| Arc::new(CachedPod::from_pod(p)))
                .collect(),
            service_accounts: arcs(&c.service_accounts),
            k8s_policies: arcs(&c.k8s_policies),
            network_policies: arcs(&c.network_policies),
            global_network_policies: arcs(&c.global_network_policies),
            staged_network_policies: arcs(&c.staged_network_policies),
            staged_global_network_policies: arcs(&c.staged_global_network_policies),
            staged_k8s_policies: arcs(&c.staged_k8s_policies),
            network_sets: arcs(&c.network_sets),
            global_network_sets: arcs(&c.global_network_sets),
        }
    }
}

/// Objects of one kind as last seen, keyed by (namespace, name) and by pointer: a store
/// hands out the same `Arc` until the object changes, so an unchanged object costs one
/// hash lookup per pass.
struct Seen<K> {
    by_key: HashMap<Key, Arc<K>>,
    by_ptr: HashMap<usize, Key>,
}

impl<K> Default for Seen<K> {
    fn default() -> Self {
        Seen {
            by_key: HashMap::new(),
            by_ptr: HashMap::new(),
        }
    }
}

fn ptr<K>(a: &Arc<K>) -> usize {
    Arc::as_ptr(a) as usize
}

impl<K: kube::Resource> Seen<K> {
    /// The keys added, changed (`Some`) or removed (`None`) since the last call.
    fn update(&mut self, now: &[Arc<K>]) -> Vec<(Key, Option<Arc<K>>)> {
        let mut out = Vec::new();
        let mut kept: HashSet<usize> = HashSet::with_capacity(now.len());
        for obj in now {
            let p = ptr(obj);
            if self.by_ptr.contains_key(&p) {
                kept.insert(p);
                continue;
            }
            let key = (obj.namespace().unwrap_or_default(), obj.name_any());
            out.push((key, Some(obj.clone())));
        }
        let gone: Vec<usize> = self
            .by_ptr
            .keys()
            .filter(|p| !kept.contains(p))
            .copied()
            .collect();
        let changed: HashSet<&Key> = out.iter().map(|(k, _)| k).collect();
        let mut removed = Vec::new();
        for p in gone {
            if let Some(key) = self.by_ptr.remove(&p)
                && !changed.contains(&key)
            {
                removed.push(key);
            }
        }
        for key in removed {
            self.by_key.remove(&key);
            out.push((key, None));
        }
        for (key, obj) in &out {
            if let Some(obj) = obj {
                if let Some(old) = self.by_key.insert(key.clone(), obj.clone()) {
                    self.by_ptr.remove(&ptr(&old));
                }
                self.by_ptr.insert(ptr(obj), key.clone());
            }
        }
        out
    }

    fn get(&self, key: &Key) -> Option<&Arc<K>> {
        self.by_key.get(key)
    }
}

/// The stateful policy calculation of one node (see the module comment).
pub struct PolicyCalc {
    node: String,
    table: Incremental,
    namespaces: Seen<Namespace>,
    /// Every pod as last seen (the store's own `Arc`s), by the name it carries.
    pods: ByName<Arc<CachedPod>>,
    service_accounts: Seen<ServiceAccount>,
    /// The profiles endpoints share, made when a pod first needs one and dropped when
    /// their object changes.
    namespace_profiles: HashMap<String, Arc<Profile>>,
    account_profiles: HashMap<Key, Arc<Profile>>,
    k8s_policies: Seen<K8sNetworkPolicy>,
    network_policies: Seen<api::NetworkPolicy>,
    global_network_policies: Seen<api::GlobalNetworkPolicy>,
    staged_network_policies: Seen<api::StagedNetworkPolicy>,
    staged_global_network_policies: Seen<api::StagedGlobalNetworkPolicy>,
    staged_k8s_policies: Seen<api::StagedKubernetesNetworkPolicy>,
    network_sets: Seen<api::NetworkSet>,
    global_network_sets: Seen<api::GlobalNetworkSet>,
    local: LocalOverrides,
    diagnostics: BTreeMap<PolicyId, Vec<Diagnostic>>,
}

impl PolicyCalc {
    pub fn new(node: impl Into<String>, opts: &CompileOptions) -> PolicyCalc {
        PolicyCalc {
            node: node.into(),
            table: Incremental::new(opts),
            namespaces: Seen::default(),
            pods: ByName::default(),
            service_accounts: Seen::default(),
            namespace_profiles: HashMap::new(),
            account_profiles: HashMap::new(),
            k8s_policies: Seen::default(),
            network_policies: Seen::default(),
            global_network_policies: Seen::default(),
            staged_network_policies: Seen::default(),
            staged_global_network_policies: Seen::default(),
            staged_k8s_policies: Seen::default(),
            network_sets: Seen::default(),
            global_network_sets: Seen::default(),
            local: LocalOverrides::new(),
            diagnostics: BTreeMap::new(),
        }
    }

    /// The desired table.
    pub fn table(&self) -> &Table {
        self.table.table()
    }

    /// Set and chain names changed since the last call: what the driver must write.
    pub fn take_touched(&mut self) -> Touched {
        self.table.take_touched()
    }

    /// What the policies raised (for Events, logs, metrics).
    pub fn diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.values().flatten()
    }

    /// The incremental table's own view (counts for metrics).
    pub fn state(&self) -> &Incremental {
        &self.table
    }

    /// The local overrides in force.
    pub fn overrides(&self) -> &LocalOverrides {
        &self.local
    }

    /// Makes the overrides equal `want` (the CNI registry's), touching only what differs.
    pub fn set_overrides(&mut self, want: &LocalOverrides) {
        self.table.begin_batch();
        let gone: Vec<Key> = self
            .local
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for (ns, pod) in gone {
            self.set_local(&ns, &pod, None);
        }
        for ((ns, pod), o) in want {
            if self.local.get(&(ns.clone(), pod.clone())) != Some(o) {
                self.set_local(ns, pod, Some(o.clone()));
            }
        }
        self.table.end_batch();
    }

    /// Marks a pod local with this interface and these addresses (`Some`), or drops the
    /// override (`None`), before the Pod object says so; applied at once if the Pod is known.
    pub fn set_local(&mut self, namespace: &str, pod: &str, local: Option<LocalOverride>) {
        let key = (namespace.to_string(), pod.to_string());
        let changed = match local {
            Some(l) => self.local.insert(key.clone(), l.clone()) != Some(l),
            None => self.local.remove(&key).is_some(),
        };
        if changed {
            self.refresh_pod(&key);
        }
    }

    /// Brings the table to this snapshot, applying only what changed since the last one.
    pub fn sync(&mut self, snap: &PolicySnapshot) {
        self.table.begin_batch();
        let mut namespaces: Vec<String> = Vec::new();
        for (key, _) in self.namespaces.update(&snap.namespaces) {
            self.namespace_profiles.remove(&key.1);
            namespaces.push(key.1);
        }
        let mut accounts: Vec<Key> = Vec::new();
        for (key, _) in self.service_accounts.update(&snap.service_accounts) {
            self.account_profiles.remove(&key);
            accounts.push(key);
        }
        let mut pods = self.update_pods(&snap.pods);
        if !namespaces.is_empty() || !accounts.is_empty() {
            let ns: HashSet<&str> = namespaces.iter().map(String::as_str).collect();
            let sa: HashSet<(&str, &str)> = accounts
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            for pod in self.pods.iter() {
                let (pod_ns, name) = pod.key();
                if ns.contains(pod_ns) || sa.contains(&(pod_ns, service_account_name(pod))) {
                    pods.push((pod_ns.to_string(), name.to_string()));
                }
            }
        }
        for key in &pods {
            self.refresh_pod(key);
        }
        let mut sets: Vec<Key> = self
            .network_sets
            .update(&snap.network_sets)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        if !namespaces.is_empty() {
            let ns: HashSet<&str> = namespaces.iter().map(String::as_str).collect();
            sets.extend(
                self.network_sets
                    .by_key
                    .keys()
                    .filter(|k| ns.contains(k.0.as_str()))
                    .cloned(),
            );
        }
        for key in sets {
            let entry = self.network_sets.get(&key).map(|s| {
                let ns_labels = self.namespace_labels(&key.0);
                NetworkSetEntry::namespaced(
                    &key.0,
                    &key.1,
                    s.labels(),
                    &ns_labels,
                    s.spec.networks(),
                )
            });
            self.table.set_network_set(key, entry);
        }
        for (key, s) in self.global_network_sets.update(&snap.global_network_sets) {
            let entry = s.map(|s| NetworkSetEntry::global(&key.1, s.labels(), s.spec.networks()));
            // Global sets have no namespace; keep them apart from namespaced ones.
            self.table
                .set_network_set((String::from("/global"), key.1), entry);
        }
        let changes = [
            policy_changes(&mut self.k8s_policies, &snap.k8s_policies),
            policy_changes(&mut self.staged_k8s_policies, &snap.staged_k8s_policies),
            policy_changes(&mut self.network_policies, &snap.network_policies),
            policy_changes(
                &mut self.global_network_policies,
                &snap.global_network_policies,
            ),
            policy_changes(
                &mut self.staged_network_policies,
                &snap.staged_network_policies,
            ),
            policy_changes(
                &mut self.staged_global_network_policies,
                &snap.staged_global_network_policies,
            ),
        ];
        for (id, converted) in changes.into_iter().flatten() {
            match converted {
                Some((p, d)) => {
                    self.diagnostics.insert(id.clone(), d);
                    self.table.set_policy(&id, Some(p));
                }
                None => {
                    self.diagnostics.remove(&id);
                    self.table.set_policy(&id, None);
                }
            }
        }
        self.table.end_batch();
    }

    fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(&(String::new(), ns.to_string()))
            .map(|n| n.labels().clone())
            .unwrap_or_default()
    }

    /// The pods added, changed or removed since the last snapshot, found by pointer: a
    /// store hands out the same `Arc` until the pod changes. A snapshot's names are unique
    /// (a store's are), so the table has more pods than the snapshot only if some went.
    fn update_pods(&mut self, now: &[Arc<CachedPod>]) -> Vec<Key> {
        let mut changed = Vec::new();
        for pod in now {
            let (ns, name) = pod.key();
            if self.pods.get(ns, name).is_some_and(|p| Arc::ptr_eq(p, pod)) {
                continue;
            }
            changed.push((ns.to_string(), name.to_string()));
            self.pods.insert(pod.clone());
        }
        if self.pods.len() > now.len() {
            let present: HashSet<(&str, &str)> = now.iter().map(|p| p.key()).collect();
            let gone: Vec<Key> = self
                .pods
                .iter()
                .map(|p| p.key())
                .filter(|k| !present.contains(k))
                .map(|(ns, name)| (ns.to_string(), name.to_string()))
                .collect();
            for (ns, name) in &gone {
                self.pods.remove(ns, name);
            }
            changed.extend(gone);
        }
        changed
    }

    fn refresh_pod(&mut self, key: &Key) {
        let ep = self.pods.get(&key.0, &key.1).and_then(|pod| {
            let namespace = self
                .namespace_profiles
                .entry(key.0.clone())
                .or_insert_with(|| {
                    let ns = self.namespaces.get(&(String::new(), key.0.clone()));
                    Profile::new(&key.0, ns.map(|n| n.labels()).unwrap_or(&BTreeMap::new()))
                })
                .clone();
            let sa = service_account_name(pod);
            let account = self
                .account_profiles
                .entry((key.0.clone(), sa.to_string()))
                .or_insert_with_key(|k| {
                    let obj = self.service_accounts.get(k);
                    Profile::new(sa, obj.map(|s| s.labels()).unwrap_or(&BTreeMap::new()))
                })
                .clone();
            endpoint_of(pod, &self.node, namespace, account, self.local.get(key))
        });
        self.table.set_endpoint(key.clone(), ep);
    }
}

impl Named for Arc<CachedPod> {
    fn key(&self) -> (&str, &str) {
        (
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default(),
        )
    }
}

type Converted = Option<(crate::policy::Policy, Vec<Diagnostic>)>;

fn policy_changes<K: kube::Resource + ToPolicy>(
    seen: &mut Seen<K>,
    now: &[Arc<K>],
) -> Vec<(PolicyId, Converted)> {
    seen.update(now)
        .into_iter()
        .map(|((ns, name), obj)| {
            let id = PolicyId {
                kind: K::KIND,
                namespace: ns,
                name,
            };
            (id, obj.map(|o| o.to_policy()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .expect("pod")
    }

    #[test]
    fn only_this_nodes_pods_get_an_interface() {
        let objects = ClusterObjects {
            pods: vec![
                pod("default", "a", "n1", "10.0.0.1"),
                pod("default", "b", "n2", "10.0.0.2"),
            ],
            ..ClusterObjects::default()
        };
        let m = local_model(&objects, "n1", &LocalOverrides::new());
        let ifaces: Vec<_> = m
            .endpoints
            .iter()
            .map(|e| (e.name(), e.interface.clone()))
            .collect();
        assert_eq!(
            ifaces,
            vec![("a", Some(host_veth_name("default", "a"))), ("b", None)]
        );
        let plan = policy_plan(&objects, "n1", &CompileOptions::default());
        let text = format!("{:?}", plan.table);
        assert!(text.contains(&host_veth_name("default", "a")));
        assert!(!text.contains(&host_veth_name("default", "b")));
    }

    #[test]
    fn a_host_network_pod_is_no_endpoint() {
        let mut host = pod("default", "h", "n2", "172.30.0.2");
        if let Some(spec) = host.spec.as_mut() {
            spec.host_network = Some(true);
        }
        let objects = ClusterObjects {
            pods: vec![host, pod("default", "a", "n2", "10.0.0.1")],
            ..ClusterObjects::default()
        };
        let mut calc = PolicyCalc::new("n1", &CompileOptions::default());
        calc.sync(&PolicySnapshot::from_objects(&objects));
        assert_eq!(calc.state().endpoint_count(), 1);
        let m = local_model(&objects, "n1", &LocalOverrides::new());
        let names: Vec<&str> = m.endpoints.iter().map(|e| e.name()).collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn a_local_override_makes_a_pod_without_an_address_local() {
        let mut p = pod("default", "c", "", "10.0.0.3");
        p.status = None;
        let objects = ClusterObjects {
            pods: vec![p],
            ..ClusterObjects::default()
        };
        let mut calc = PolicyCalc::new("n1", &CompileOptions::default());
        calc.sync(&PolicySnapshot::from_objects(&objects));
        assert!(!format!("{:?}", calc.table()).contains("calitest0"));
        let local = LocalOverride {
            interface: "calitest0".into(),
            ips: vec!["10.0.0.3".parse().unwrap()],
        };
        calc.set_local("default", "c", Some(local.clone()));
        let touched = calc.take_touched();
        assert!(touched.chains.contains("fw-calitest0"), "{touched:?}");
        let overrides = LocalOverrides::from([(("default".into(), "c".into()), local)]);
        let want = compile(
            &local_model(&objects, "n1", &overrides),
            &CompileOptions::default(),
        );
        assert_eq!(calc.table(), &want);
    }

    #[test]
    fn a_scheduled_pod_has_its_chains_before_its_add_which_then_adds_elements_only() {
        let mut scheduled = pod("default", "s", "n1", "10.0.0.3");
        scheduled.status = None;
        let np = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "default", "name": "from-ns"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {}}]}]}
        }))
        .expect("policy");
        let objects = ClusterObjects {
            pods: vec![scheduled, pod("default", "a", "n2", "10.0.0.1")],
            k8s_policies: vec![np],
            ..ClusterObjects::default()
        };
        let mut calc = PolicyCalc::new("n1", &CompileOptions::default());
        calc.sync(&PolicySnapshot::from_objects(&objects));
        let iface = host_veth_name("default", "s");
        let table = calc.table();
        assert!(table.chains.contains_key(&format!("tw-{iface}")));
        assert!(table.maps.values().all(|m| m.elements.contains_key(&iface)));
        assert_eq!(
            table,
            &compile(
                &local_model(&objects, "n1", &LocalOverrides::new()),
                &CompileOptions::default()
            )
        );
        calc.take_touched();
        // The ADD: the pod's address joins the sets that select it; no chain changes.
        let local = LocalOverride {
            interface: iface.clone(),
            ips: vec!["10.0.0.3".parse().expect("ip")],
        };
        calc.set_local("default", "s", Some(local));
        let touched = calc.take_touched();
        assert!(touched.chains.is_empty(), "{touched:?}");
        assert!(!touched.sets.is_empty());
        let member = crate::desired::nft::Element::net("10.0.0.3/32".parse().expect("net"));
        assert!(
            touched
                .sets
                .iter()
                .all(|s| calc.table().sets[s].elements.contains(&member)),
            "{touched:?}"
        );
    }

    fn registered(name: &str, ip: &str, object: Option<Pod>) -> Registered {
        Registered {
            namespace: "default".into(),
            pod: name.into(),
            container: format!("c-{name}"),
            interface: host_veth_name("default", name),
            ips: vec![ip.parse().expect("ip")],
            object: object.map(Arc::new),
        }
    }

    #[test]
    fn registered_pods_get_their_ipam_addresses_before_any_status() {
        let mut fresh = pod("default", "new", "n1", "10.0.0.9");
        fresh.status = None;
        let mut unseen = pod("default", "unseen", "n1", "10.0.0.9");
        unseen.status = None;
        let mut annotated = pod("default", "remote", "n2", "10.0.0.7");
        annotated.metadata.annotations = Some(
            [(ANNOTATION_POD_IPS.to_string(), "10.0.1.7/32".to_string())]
                .into_iter()
                .collect(),
        );
        let objects = ClusterObjects {
            pods: vec![fresh, annotated],
            ..ClusterObjects::default()
        };
        let regs = [
            registered("new", "10.0.0.3", None),
            registered("unseen", "10.0.0.4", Some(unseen)),
            // Registered but neither in the store nor read: nothing to stand in.
            registered("ghost", "10.0.0.5", None),
        ];
        let snap = PolicySnapshot::from_objects(&objects).with_registered(&regs);
        let overrides = overrides_of(&regs);
        let m = local_model(&snap.to_objects(), "n1", &overrides);
        let ips_of = |name: &str| {
            m.endpoints
                .iter()
                .find(|e| e.name() == name)
                .map(|e| e.ips.to_vec())
        };
        let ip = |s: &str| vec![s.parse::<IpAddr>().expect("ip")];
        assert_eq!(ips_of("new"), Some(ip("10.0.0.3")));
        assert_eq!(ips_of("unseen"), Some(ip("10.0.0.4")));
        assert_eq!(
            ips_of("remote"),
            Some(ip("10.0.1.7")),
            "annotation over status"
        );
        assert_eq!(ips_of("ghost"), None);
        // The incremental calculator agrees with the reference.
        let mut calc = PolicyCalc::new("n1", &CompileOptions::default());
        calc.set_overrides(&overrides);
        calc.sync(&snap);
        let want = compile(&m, &CompileOptions::default());
        assert_eq!(calc.table(), &want);
        // A pod leaving the registry drops back to what its object says.
        calc.set_overrides(&overrides_of(&regs[1..2]));
        calc.sync(&PolicySnapshot::from_objects(&objects).with_registered(&regs[1..2]));
        let snap = PolicySnapshot::from_objects(&objects).with_registered(&regs[1..2]);
        let m = local_model(&snap.to_objects(), "n1", &overrides_of(&regs[1..2]));
        assert_eq!(calc.table(), &compile(&m, &CompileOptions::default()));
    }
}
