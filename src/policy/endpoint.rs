//! What policy applies to and matches against: pod endpoints with Calico's implied labels,
//! and network sets. The labels are exactly those Felix evaluates selectors over: the pod's
//! own, `projectcalico.org/{namespace,orchestrator,serviceaccount}`, and the labels inherited
//! from the namespace (`pcns.*`) and service-account (`pcsa.*`) profiles.
//!
//! A pod endpoint stores none of them: it holds the cached pod (its own labels), and the
//! namespace's and service account's profiles, shared by every pod that has them, and
//! derives the implied and inherited labels when a selector asks. A 10,000-pod cluster
//! thereby costs the calculator about a hundred bytes per pod rather than a map of a dozen
//! strings each.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::datastore::pods::CachedPod;
use crate::selector::Labels;

use super::protocol::Protocol;
pub const LABEL_NAMESPACE: &str = "projectcalico.org/namespace";
pub const LABEL_ORCHESTRATOR: &str = "projectcalico.org/orchestrator";
pub const LABEL_SERVICE_ACCOUNT: &str = "projectcalico.org/serviceaccount";
/// Profile label carrying the namespace or service-account name (`pcns.projectcalico.org/name`).
pub const LABEL_NAME: &str = "projectcalico.org/name";
pub const NAMESPACE_PREFIX: &str = "pcns.";
pub const SERVICE_ACCOUNT_PREFIX: &str = "pcsa.";

/// A container port with a name, which named-port rules resolve against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A namespace's or service account's profile (`kns.<ns>`, `ksa.<ns>.<sa>`): its name and
/// labels, one per object, shared by the endpoints of its pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Profile {
    pub fn new(name: &str, labels: &BTreeMap<String, String>) -> Arc<Profile> {
        Arc::new(Profile {
            name: name.into(),
            labels: labels.clone(),
        })
    }

    /// An inherited label, the part after the profile prefix: the profile's name under
    /// `projectcalico.org/name`, else its object's label.
    fn get(&self, key: &str) -> Option<&str> {
        if key == LABEL_NAME {
            return Some(&self.name);
        }
        self.labels.get(key).map(String::as_str)
    }
}

/// What selectors see of a pod endpoint, computed on lookup: Calico's implied labels win,
/// then the `pcns.`/`pcsa.` keys come from the profiles (the pod's own labels under those
/// prefixes are dropped, as Calico drops them), then the pod's own labels.
#[derive(Debug, Clone)]
pub struct EndpointLabels {
    pod: Arc<CachedPod>,
    namespace: Arc<Profile>,
    service_account: Option<Arc<Profile>>,
}

impl Labels for EndpointLabels {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            LABEL_NAMESPACE => return Some(&self.namespace.name),
            LABEL_ORCHESTRATOR => return Some("k8s"),
            LABEL_SERVICE_ACCOUNT => {
                if let Some(sa) = &self.service_account {
                    return Some(&sa.name);
                }
            }
            _ => {}
        }
        if let Some(k) = key.strip_prefix(NAMESPACE_PREFIX) {
            return self.namespace.get(k);
        }
        if let Some(k) = key.strip_prefix(SERVICE_ACCOUNT_PREFIX) {
            return self.service_account.as_ref().and_then(|sa| sa.get(k));
        }
        self.own().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

impl EndpointLabels {
    /// The pod's own labels selectors see (those under the profile prefixes are not).
    fn own(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pod
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .filter(|(k, _)| !is_inherited(k))
    }

    /// Every label, as a map (what `get` answers for each key).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        let profiles = std::iter::once((NAMESPACE_PREFIX, &self.namespace)).chain(
            self.service_account
                .iter()
                .map(|sa| (SERVICE_ACCOUNT_PREFIX, sa)),
        );
        for (prefix, p) in profiles {
            for k in p.labels.keys().map(String::as_str).chain([LABEL_NAME]) {
                if let Some(v) = p.get(k) {
                    out.insert(format!("{prefix}{k}"), v.into());
                }
            }
        }
        let implied = [LABEL_NAMESPACE, LABEL_ORCHESTRATOR, LABEL_SERVICE_ACCOUNT];
        let keys: Vec<&str> = self.own().map(|(k, _)| k).chain(implied).collect();
        for k in keys {
            if let Some(v) = self.get(k) {
                out.insert(k.into(), v.into());
            }
        }
        out
    }
}

impl PartialEq for EndpointLabels {
    fn eq(&self, other: &Self) -> bool {
        self.own().eq(other.own())
            && self.namespace == other.namespace
            && self.service_account == other.service_account
    }
}

fn is_inherited(key: &str) -> bool {
    key.starts_with(NAMESPACE_PREFIX) || key.starts_with(SERVICE_ACCOUNT_PREFIX)
}

/// A pod as policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// All labels selectors see (own plus implied plus inherited).
    pub labels: EndpointLabels,
    pub ips: Box<[IpAddr]>,
    pub named_ports: Box<[NamedPort]>,
    /// Host-side interface (`cali…`), when known.
    pub interface: Option<String>,
}

impl Endpoint {
    /// A pod endpoint the way Calico's pod → WorkloadEndpoint conversion and profile
    /// inheritance make it; `namespace` is the profile of the pod's namespace.
    pub fn pod(
        pod: Arc<CachedPod>,
        namespace: Arc<Profile>,
        service_account: Option<Arc<Profile>>,
        ips: Vec<IpAddr>,
        named_ports: Vec<NamedPort>,
    ) -> Endpoint {
        Endpoint {
            labels: EndpointLabels {
                pod,
                namespace,
                service_account,
            },
            ips: ips.into(),
            named_ports: named_ports.into(),
            interface: None,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.labels.namespace.name
    }

    pub fn name(&self) -> &str {
        self.labels.pod.metadata.name.as_deref().unwrap_or_default()
    }

    /// The cached pod this endpoint is made of.
    pub fn pod_object(&self) -> &Arc<CachedPod> {
        &self.labels.pod
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }
}

/// The labels of Calico's `kns.<ns>` profile: `pcns.<label>` per namespace label and
/// `pcns.projectcalico.org/name`.
pub fn namespace_profile_labels(
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = namespace_labels
        .iter()
        .map(|(k, v)| (format!("{NAMESPACE_PREFIX}{k}"), v.clone()))
        .collect();
    out.insert(format!("{NAMESPACE_PREFIX}{LABEL_NAME}"), namespace.into());
    out
}

/// A NetworkSet (namespaced) or GlobalNetworkSet: its nets are members of every selector
/// its labels match, exactly like endpoint addresses.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NetworkSetEntry {
    /// Empty for a GlobalNetworkSet.
    pub namespace: String,
    pub name: String,
    pub nets: Vec<IpNet>,
    pub labels: BTreeMap<String, String>,
}

impl NetworkSetEntry {
    /// A GlobalNetworkSet: its own labels only.
    pub fn global(name: &str, labels: &BTreeMap<String, String>, nets: Vec<IpNet>) -> Self {
        NetworkSetEntry {
            namespace: String::new(),
            name: name.into(),
            nets,
            labels: labels.clone(),
        }
    }

    /// A NetworkSet: its labels plus `projectcalico.org/namespace` and the namespace
    /// profile's `pcns.*` labels, as Calico's network-set processor adds them.
    pub fn namespaced(
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
        nets: Vec<IpNet>,
    ) -> Self {
        let mut all = namespace_profile_labels(namespace, namespace_labels);
        all.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        all.insert(LABEL_NAMESPACE.into(), namespace.into());
        NetworkSetEntry {
            namespace: namespace.into(),
            name: name.into(),
            nets,
            labels: all,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cached(labels: &[(&str, &str)]) -> Arc<CachedPod> {
        let mut pod = CachedPod::default();
        pod.metadata.name = Some("web-1".into());
        pod.metadata.namespace = Some("prod".into());
        pod.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Arc::new(pod)
    }

    #[test]
    fn pod_endpoint_carries_calicos_implied_and_inherited_labels() {
        let ep = Endpoint::pod(
            cached(&[
                ("app", "web"),
                ("pcns.team", "forged"),
                ("projectcalico.org/namespace", "forged"),
            ]),
            Profile::new("prod", &m(&[("team", "blue")])),
            Some(Profile::new(
                "frontend",
                &m(&[("tier", "fe"), ("projectcalico.org/name", "shadowed")]),
            )),
            vec!["10.0.0.5".parse().unwrap()],
            vec![],
        );
        let want = m(&[
            ("app", "web"),
            ("pcns.projectcalico.org/name", "prod"),
            ("pcns.team", "blue"),
            ("pcsa.projectcalico.org/name", "frontend"),
            ("pcsa.tier", "fe"),
            ("projectcalico.org/namespace", "prod"),
            ("projectcalico.org/orchestrator", "k8s"),
            ("projectcalico.org/serviceaccount", "frontend"),
        ]);
        assert_eq!(ep.labels.to_map(), want);
        for (k, v) in &want {
            assert_eq!(ep.labels.get(k), Some(v.as_str()), "{k}");
        }
        assert_eq!(ep.labels.get("pcns.absent"), None);
        assert_eq!(ep.labels.get("absent"), None);
        assert_eq!((ep.namespace(), ep.name()), ("prod", "web-1"));
    }

    #[test]
    fn without_a_service_account_no_pcsa_labels_and_the_pods_own_stands() {
        let ep = Endpoint::pod(
            cached(&[("projectcalico.org/serviceaccount", "own"), ("pcsa.x", "y")]),
            Profile::new("prod", &BTreeMap::new()),
            None,
            vec![],
            vec![],
        );
        assert_eq!(
            ep.labels.get("projectcalico.org/serviceaccount"),
            Some("own")
        );
        assert_eq!(ep.labels.get("pcsa.x"), None);
        assert_eq!(ep.labels.get("pcsa.projectcalico.org/name"), None);
    }

    #[test]
    fn namespaced_network_set_is_labelled_with_its_namespace() {
        let s = NetworkSetEntry::namespaced(
            "prod",
            "dbs",
            &m(&[("role", "db")]),
            &m(&[("team", "blue")]),
            vec!["192.0.2.0/24".parse().unwrap()],
        );
        assert_eq!(s.labels["projectcalico.org/namespace"], "prod");
        assert_eq!(s.labels["pcns.team"], "blue");
        assert_eq!(s.labels["role"], "db");
    }
}
