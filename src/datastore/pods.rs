//! The daemon's one Pod cache, holding only what tortie reads of a pod: a full `Pod` is
//! some 4 KB of mostly empty fields before its strings (its spec, containers and status
//! are large structs even when unset), which on a 10,000-pod cluster was most of the
//! daemon's memory. `CachedPod` deserialises straight from the API's Pod JSON, skipping
//! everything else without allocating it, and gives back a `Pod` with exactly the kept
//! fields where code wants the Kubernetes type (policy, the leak verdict).
//!
//! Kept: name, namespace, uid, resourceVersion, labels, creation and deletion time; the
//! annotations tortie reads (Calico's `cni.projectcalico.org/*`); spec.nodeName,
//! spec.serviceAccountName, spec.hostNetwork, each container's name and ports; status.phase,
//! podIP, podIPs.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;

use crate::api::vocab::CNI_ANNOTATION_PREFIX;

/// A pod as the daemon caches it (see the module comment for what is kept). `metadata`
/// holds the identity (name, namespace, uid, resourceVersion, times); labels and the kept
/// annotations sit beside it in sorted vectors, a tenth of a map's footprint for the few
/// entries a pod has, and are put back in the metadata by `to_pod`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CachedPod {
    pub metadata: ObjectMeta,
    pub labels: Pairs,
    pub annotations: Pairs,
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
    /// `spec.hostNetwork`: such a pod is no workload endpoint (its address is the node's).
    pub host_network: bool,
    pub containers: Vec<CachedContainer>,
    pub phase: Option<String>,
    pub pod_ip: Option<String>,
    pub pod_ips: Vec<String>,
}

/// A container's name and its ports (named ports are policy targets).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CachedContainer {
    pub name: String,
    pub ports: Option<Vec<ContainerPort>>,
}

/// Key-value pairs sorted by key (labels, annotations): a map's entries without its nodes.
pub type Pairs = Box<[(String, String)]>;

fn pairs(map: Option<BTreeMap<String, String>>) -> Pairs {
    map.map(|m| m.into_iter().collect()).unwrap_or_default()
}

fn map(pairs: &Pairs) -> Option<BTreeMap<String, String>> {
    (!pairs.is_empty()).then(|| pairs.iter().cloned().collect())
}

/// Whether tortie reads this pod annotation (the rest are not kept).
pub fn annotation_kept(key: &str) -> bool {
    key.starts_with(CNI_ANNOTATION_PREFIX)
}

impl CachedPod {
    /// The pod with what was kept, as a Kubernetes `Pod` (every other field empty).
    pub fn to_pod(&self) -> Pod {
        Pod {
            metadata: ObjectMeta {
                labels: map(&self.labels),
                annotations: map(&self.annotations),
                ..self.metadata.clone()
            },
            spec: Some(PodSpec {
                node_name: self.node_name.clone(),
                service_account_name: self.service_account_name.clone(),
                host_network: self.host_network.then_some(true),
                containers: self
                    .containers
                    .iter()
                    .map(|c| Container {
                        name: c.name.clone(),
                        ports: c.ports.clone(),
                        ..Container::default()
                    })
                    .collect(),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: self.phase.clone(),
                pod_ip: self.pod_ip.clone(),
                pod_ips: (!self.pod_ips.is_empty()).then(|| {
                    self.pod_ips
                        .iter()
                        .map(|ip| PodIP { ip: ip.clone() })
                        .collect()
                }),
                ..PodStatus::default()
            }),
        }
    }

    /// What the cache keeps of `pod`.
    pub fn from_pod(pod: &Pod) -> CachedPod {
        let m = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let (metadata, labels, annotations) = slim_meta(WireMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            uid: m.uid.clone(),
            resource_version: m.resource_version.clone(),
            labels: m.labels.clone(),
            annotations: m.annotations.clone(),
            creation_timestamp: m.creation_timestamp.clone(),
            deletion_timestamp: m.deletion_timestamp.clone(),
            deletion_grace_period_seconds: m.deletion_grace_period_seconds,
        });
        CachedPod {
            metadata,
            labels,
            annotations,
            node_name: spec.and_then(|s| s.node_name.clone()),
            service_account_name: spec.and_then(|s| s.service_account_name.clone()),
            host_network: spec.and_then(|s| s.host_network) == Some(true),
            containers: spec
                .map(|s| {
                    s.containers
                        .iter()
                        .map(|c| CachedContainer {
                            name: c.name.clone(),
                            ports: c.ports.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            phase: status.and_then(|s| s.phase.clone()),
            pod_ip: status.and_then(|s| s.pod_ip.clone()),
            pod_ips: status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|ips| ips.iter().map(|p| p.ip.clone()).collect())
                .unwrap_or_default(),
        }
    }
}

impl kube::Resource for CachedPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Pod")
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("pods")
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

// The wire shapes: only the kept fields are named; serde skips the others (ignored values
// are parsed but never allocated).

#[derive(Deserialize)]
struct WirePod {
    #[serde(default)]
    metadata: WireMeta,
    spec: Option<WireSpec>,
    status: Option<WireStatus>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WireMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    host_network: Option<bool>,
    #[serde(default)]
    containers: Vec<WireContainer>,
}

#[derive(Deserialize)]
struct WireContainer {
    #[serde(default)]
    name: String,
    ports: Option<Vec<ContainerPort>>,
}

#[derive(Deserialize)]
struct WireStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<WirePodIp>>,
}

#[derive(Deserialize)]
struct WirePodIp {
    #[serde(default)]
    ip: String,
}

/// The identity as metadata, then the labels and the kept annotations.
fn slim_meta(m: WireMeta) -> (ObjectMeta, Pairs, Pairs) {
    let annotations = m.annotations.map(|mut a| {
        a.retain(|k, _| annotation_kept(k));
        a
    });
    let meta = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        deletion_grace_period_seconds: m.deletion_grace_period_seconds,
        ..ObjectMeta::default()
    };
    (meta, pairs(m.labels), pairs(annotations))
}

impl<'de> Deserialize<'de> for CachedPod {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CachedPod, D::Error> {
        let w = WirePod::deserialize(d)?;
        let (node_name, service_account_name, host_network, containers) = match w.spec {
            Some(s) => (
                s.node_name,
                s.service_account_name,
                s.host_network == Some(true),
                s.containers
                    .into_iter()
                    .map(|c| CachedContainer {
                        name: c.name,
                        ports: c.ports,
                    })
                    .collect(),
            ),
            None => (None, None, false, Vec::new()),
        };
        let (phase, pod_ip, pod_ips) = match w.status {
            Some(s) => (
                s.phase,
                s.pod_ip,
                s.pod_ips
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| p.ip)
                    .collect(),
            ),
            None => (None, None, Vec::new()),
        };
        let (metadata, labels, annotations) = slim_meta(w.metadata);
        Ok(CachedPod {
            metadata,
            labels,
            annotations,
            node_name,
            service_account_name,
            host_network,
            containers,
            phase,
            pod_ip,
            pod_ips,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_pod() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-0",
                "namespace": "shop",
                "uid": "u-1",
                "resourceVersion": "42",
                "creationTimestamp": "2026-12-01T00:00:00Z",
                "labels": {"app": "web"},
                "annotations": {
                    "cni.projectcalico.org/podIP": "10.244.0.5/32",
                    "cni.projectcalico.org/podIPs": "10.244.0.5/32",
                    "cni.projectcalico.org/containerID": "abc",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"huge\": true}"
                },
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                    "name": "web", "uid": "o-1"}],
                "managedFields": [{"manager": "kubelet", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]
            },
            "spec": {
                "nodeName": "n1",
                "serviceAccountName": "web-sa",
                "hostNetwork": false,
                "containers": [{
                    "name": "app",
                    "image": "nginx",
                    "env": [{"name": "A", "value": "b"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "livenessProbe": {"httpGet": {"path": "/", "port": 8080}}
                }],
                "volumes": [{"name": "v", "emptyDir": {}}],
                "tolerations": [{"key": "k", "operator": "Exists"}]
            },
            "status": {
                "phase": "Running",
                "podIP": "10.244.0.5",
                "podIPs": [{"ip": "10.244.0.5"}],
                "hostIP": "172.30.0.1",
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        })
    }

    #[test]
    fn keeps_exactly_what_tortie_reads() {
        let cached: CachedPod = serde_json::from_value(full_pod()).unwrap();
        let m = &cached.metadata;
        assert_eq!(m.name.as_deref(), Some("web-0"));
        assert_eq!(m.namespace.as_deref(), Some("shop"));
        assert_eq!(m.uid.as_deref(), Some("u-1"));
        assert_eq!(m.resource_version.as_deref(), Some("42"));
        assert_eq!(&*cached.labels, [("app".to_string(), "web".to_string())]);
        let ann: Vec<&str> = cached.annotations.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            ann,
            [
                "cni.projectcalico.org/containerID",
                "cni.projectcalico.org/podIP",
                "cni.projectcalico.org/podIPs"
            ]
        );
        assert!(m.managed_fields.is_none() && m.owner_references.is_none());
        let pod = cached.to_pod();
        let kept = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(kept["cni.projectcalico.org/podIPs"], "10.244.0.5/32");
        assert_eq!(kept.len(), 3);
        assert_eq!(cached.node_name.as_deref(), Some("n1"));
        assert_eq!(cached.service_account_name.as_deref(), Some("web-sa"));
        assert_eq!(cached.containers.len(), 1);
        let port = &cached.containers[0].ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 8080)
        );
        assert_eq!(cached.phase.as_deref(), Some("Running"));
        assert_eq!(cached.pod_ip.as_deref(), Some("10.244.0.5"));
        assert_eq!(cached.pod_ips, ["10.244.0.5"]);
    }

    #[test]
    fn the_pod_it_gives_back_is_the_pod_trimmed_to_the_kept_fields() {
        let full: Pod = serde_json::from_value(full_pod()).unwrap();
        let cached: CachedPod = serde_json::from_value(full_pod()).unwrap();
        assert_eq!(
            CachedPod::from_pod(&full),
            cached,
            "both ways keep the same fields"
        );
        let pod = cached.to_pod();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.service_account_name.as_deref(), Some("web-sa"));
        assert_eq!(spec.containers[0].name, "app");
        assert_eq!(
            spec.containers[0].ports,
            full.spec.as_ref().unwrap().containers[0].ports
        );
        assert!(spec.containers[0].image.is_none() && spec.volumes.is_none());
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.pod_ips, full.status.as_ref().unwrap().pod_ips);
        assert!(status.host_ip.is_none());
        assert_eq!(pod.metadata.labels, full.metadata.labels);
        assert_eq!(
            CachedPod::from_pod(&pod),
            cached,
            "a round trip loses nothing kept"
        );
    }

    #[test]
    fn a_pod_without_spec_or_status_still_reads() {
        let cached: CachedPod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}})).unwrap();
        assert_eq!(cached.metadata.name.as_deref(), Some("p"));
        assert!(cached.containers.is_empty() && cached.pod_ips.is_empty());
    }
}
