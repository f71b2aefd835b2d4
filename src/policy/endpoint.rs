//! What policy applies to and matches against: pod endpoints with Calico's implied labels,
//! and network sets. The labels are exactly those Felix evaluates selectors over: the pod's
//! own, `projectcalico.org/{namespace,orchestrator,serviceaccount}`, and the labels inherited
//! from the namespace (`pcns.*`) and service-account (`pcsa.*`) profiles.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

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

/// A pod as policy sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Endpoint {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// All labels selectors see (own plus implied plus inherited).
    pub labels: BTreeMap<String, String>,
    pub named_ports: Vec<NamedPort>,
    /// Host-side interface (`cali…`), when known.
    pub interface: Option<String>,
}

impl Endpoint {
    /// Builds a pod endpoint the way Calico's pod → WorkloadEndpoint conversion and profile
    /// inheritance do. Pod labels under the profile prefixes are dropped (they would shadow
    /// inherited ones); explicit labels win over inherited ones.
    pub fn pod(
        namespace: &str,
        name: &str,
        ips: Vec<IpAddr>,
        pod_labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
        service_account: Option<(&str, &BTreeMap<String, String>)>,
        named_ports: Vec<NamedPort>,
    ) -> Endpoint {
        let mut labels = BTreeMap::new();
        // Inherited first, so the endpoint's own labels overwrite them.
        labels.extend(namespace_profile_labels(namespace, namespace_labels));
        if let Some((sa, sa_labels)) = service_account {
            for (k, v) in sa_labels {
                labels.insert(format!("{SERVICE_ACCOUNT_PREFIX}{k}"), v.clone());
            }
            labels.insert(
                format!("{SERVICE_ACCOUNT_PREFIX}{LABEL_NAME}"),
                sa.to_string(),
            );
        }
        for (k, v) in pod_labels {
            if k.starts_with(NAMESPACE_PREFIX) || k.starts_with(SERVICE_ACCOUNT_PREFIX) {
                continue;
            }
            labels.insert(k.clone(), v.clone());
        }
        labels.insert(LABEL_NAMESPACE.into(), namespace.into());
        labels.insert(LABEL_ORCHESTRATOR.into(), "k8s".into());
        if let Some((sa, _)) = service_account {
            labels.insert(LABEL_SERVICE_ACCOUNT.into(), sa.into());
        }
        Endpoint {
            namespace: namespace.into(),
            name: name.into(),
            ips,
            labels,
            named_ports,
            interface: None,
        }
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
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

    #[test]
    fn pod_endpoint_carries_calicos_implied_and_inherited_labels() {
        let ep = Endpoint::pod(
            "prod",
            "web-1",
            vec!["10.0.0.5".parse().unwrap()],
            &m(&[("app", "web"), ("pcns.team", "forged")]),
            &m(&[("team", "blue")]),
            Some(("frontend", &m(&[("tier", "fe")]))),
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
        assert_eq!(ep.labels, want);
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
