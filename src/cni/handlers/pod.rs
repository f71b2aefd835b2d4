//! The API side of ADD: the pod's annotations and UID and its namespace's annotations and
//! labels (pool choice), and the Calico annotations written back once the pod has its IPs.

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::HandlerError;

pub const ANNOTATION_POD_IP: &str = "cni.projectcalico.org/podIP";
pub const ANNOTATION_POD_IPS: &str = "cni.projectcalico.org/podIPs";
pub const ANNOTATION_CONTAINER_ID: &str = "cni.projectcalico.org/containerID";

#[derive(Debug, Clone, Default)]
pub(super) struct PodInfo {
    pub uid: Option<String>,
    pub annotations: BTreeMap<String, String>,
    pub namespace_annotations: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
}

fn api_err(action: &'static str, object: String) -> impl FnOnce(kube::Error) -> HandlerError {
    move |e| HandlerError::Api {
        action,
        object,
        source: Box::new(e),
    }
}

/// One GET for the pod and one for its namespace, in parallel.
pub(super) async fn lookup(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<PodInfo, HandlerError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let (pod, ns) = tokio::join!(pods.get_opt(name), namespaces.get_opt(namespace));
    let pod = pod
        .map_err(api_err("read pod", format!("{namespace}/{name}")))?
        .ok_or_else(|| HandlerError::PodNotFound {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })?;
    let ns = ns.map_err(api_err("read namespace", namespace.to_string()))?;
    let (namespace_annotations, namespace_labels) = ns
        .map(|n| {
            (
                n.metadata.annotations.unwrap_or_default(),
                n.metadata.labels.unwrap_or_default(),
            )
        })
        .unwrap_or_default();
    Ok(PodInfo {
        uid: pod.metadata.uid,
        annotations: pod.metadata.annotations.unwrap_or_default(),
        namespace_annotations,
        namespace_labels,
    })
}

/// Calico's annotations, through the status subresource as Calico does (RBAC pods/status).
pub(super) async fn annotate(
    client: &Client,
    namespace: &str,
    name: &str,
    container_id: &str,
    addrs: &[IpNet],
) -> Result<(), HandlerError> {
    let ips: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let patch = json!({"metadata": {"annotations": {
        ANNOTATION_POD_IP: ips.first().cloned().unwrap_or_default(),
        ANNOTATION_POD_IPS: ips.join(","),
        ANNOTATION_CONTAINER_ID: container_id,
    }}});
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(api_err("annotate pod", format!("{namespace}/{name}")))?;
    Ok(())
}
