//! The API side of ADD and DEL: the pod's annotations and UID and its namespace's annotations
//! and labels (pool choice), read from watch caches with one GET as the fallback, and the
//! Calico annotations written back once the pod has its IPs (and blanked on DEL).

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

use super::HandlerError;
use crate::datastore::pods::CachedPod;
use crate::datastore::reflect;

pub use crate::api::vocab::{ANNOTATION_CONTAINER_ID, ANNOTATION_POD_IP, ANNOTATION_POD_IPS};

#[derive(Debug, Clone, Default)]
pub(super) struct PodInfo {
    pub uid: Option<String>,
    pub annotations: BTreeMap<String, String>,
    pub namespace_annotations: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
    /// The pod itself, for the policy calculation while the Pod store has not seen it.
    pub object: Option<Arc<Pod>>,
}

fn api_err(action: &'static str, object: String) -> impl FnOnce(kube::Error) -> HandlerError {
    move |e| HandlerError::Api {
        action,
        object,
        source: Box::new(e),
    }
}

/// Watch caches of this node's pods and of every namespace, kept to metadata. ADD reads
/// them instead of two GETs; a pod the watch has not delivered yet, or whose UID differs
/// from the runtime's `K8S_POD_UID` (deleted and re-created under the same name), is read
/// from the API server.
/// The daemon's one Pod and one Namespace store (the cluster view's), read by the CNI too.
/// The Namespace store must keep Calico's `cni.projectcalico.org/*` annotations.
#[derive(Clone)]
pub struct SharedStores {
    pub pods: Store<CachedPod>,
    pub namespaces: Store<Namespace>,
    /// The policy driver's registry of local pods, when the daemon enforces policy.
    pub endpoints: Option<Arc<super::endpoints::LocalEndpoints>>,
}

pub struct PodView {
    client: Client,
    annotations: Annotations,
    pods: Store<CachedPod>,
    namespaces: Store<Namespace>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PodView {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl PodView {
    /// Uses the daemon's shared Pod and Namespace stores when given (`shared`), else starts
    /// its own watches (a Pod watch of this node, every namespace); must be called inside a
    /// tokio runtime. Lookups work at once (through the API server until the caches fill).
    pub fn with_pods(client: Client, node: &str, shared: Option<SharedStores>) -> PodView {
        let mut tasks = Vec::new();
        let (pods, namespaces) = match shared {
            Some(s) => (s.pods, s.namespaces),
            None => {
                let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
                let (pods, task) = reflect(Api::all(client.clone()), on_node, |_| {}, "CNI pods");
                let (namespaces, ns_task) = reflect(
                    Api::all(client.clone()),
                    watcher::Config::default(),
                    trim_namespace,
                    "CNI namespaces",
                );
                tasks.extend([task, ns_task]);
                (pods, namespaces)
            }
        };
        PodView {
            annotations: Annotations {
                client: client.clone(),
            },
            client,
            pods,
            namespaces,
            tasks,
        }
    }

    /// The pod and its namespace, from the caches where they are current.
    pub(super) async fn lookup(
        &self,
        namespace: &str,
        name: &str,
        expected_uid: Option<&str>,
    ) -> Result<PodInfo, HandlerError> {
        let cached = self
            .pods
            .get(&ObjectRef::new(name).within(namespace))
            .filter(|p| expected_uid.is_none_or(|uid| p.meta().uid.as_deref() == Some(uid)));
        let cached_ns = self.namespaces.get(&ObjectRef::new(namespace));
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let pod_read = async {
            match &cached {
                Some(p) => Ok(Some(Arc::new(p.to_pod()))),
                None => pods.get_opt(name).await.map(|p| p.map(Arc::new)),
            }
        };
        let ns_read = async {
            match &cached_ns {
                Some(n) => Ok(Some(Arc::clone(n))),
                None => namespaces.get_opt(namespace).await.map(|n| n.map(Arc::new)),
            }
        };
        let (pod, ns) = tokio::join!(pod_read, ns_read);
        let pod = pod
            .map_err(api_err("read pod", format!("{namespace}/{name}")))?
            .ok_or_else(|| HandlerError::PodNotFound {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })?;
        let ns = ns.map_err(api_err("read namespace", namespace.to_string()))?;
        tracing::debug!(
            namespace,
            name,
            pod_cached = cached.is_some(),
            namespace_cached = cached_ns.is_some(),
            "pod looked up"
        );
        let (namespace_annotations, namespace_labels) = ns
            .map(|n| (n.annotations().clone(), n.labels().clone()))
            .unwrap_or_default();
        Ok(PodInfo {
            uid: pod.meta().uid.clone(),
            annotations: pod.annotations().clone(),
            namespace_annotations,
            namespace_labels,
            object: Some(pod),
        })
    }

    /// The writer of Calico's annotations (cheap to clone into a background task).
    pub(super) fn annotations(&self) -> &Annotations {
        &self.annotations
    }

    /// DEL's half of the annotations: the IPs are blanked (as Calico does) when this
    /// container wrote them; the container ID stays so a repeated DEL can tell. The blank
    /// carries the resourceVersion it was decided on, so a newer sandbox's annotations
    /// landing in between are never blanked (409: decide again on a fresh read). The
    /// cache may not show our own ADD's patch yet, so a "not ours" from it is confirmed.
    pub(super) async fn clear_ips(
        &self,
        namespace: &str,
        name: &str,
        container_id: &str,
    ) -> Result<bool, HandlerError> {
        let ours = |p: &Pod| {
            let ann = p.annotations();
            ann.get(ANNOTATION_CONTAINER_ID).map(String::as_str) == Some(container_id)
                && ann.get(ANNOTATION_POD_IPS).is_some_and(|v| !v.is_empty())
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let mut known = self
            .pods
            .get(&ObjectRef::new(name).within(namespace))
            .map(|p| Arc::new(p.to_pod()))
            .filter(|p| ours(p));
        for _ in 0..MAX_BLANK_ATTEMPTS {
            let pod = match known.take() {
                Some(p) => p,
                None => match pods
                    .get_opt(name)
                    .await
                    .map_err(api_err("read pod", format!("{namespace}/{name}")))?
                {
                    Some(p) if ours(&p) => Arc::new(p),
                    _ => return Ok(false),
                },
            };
            let at = Precondition {
                uid: pod.meta().uid.as_deref(),
                resource_version: pod.meta().resource_version.as_deref(),
            };
            let blank = json!({ANNOTATION_POD_IP: "", ANNOTATION_POD_IPS: ""});
            match self
                .annotations
                .patch_annotations(namespace, name, at, blank)
                .await
            {
                Ok(()) => return Ok(true),
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => {
                    return Err(api_err(
                        "clear pod IP annotations",
                        format!("{namespace}/{name}"),
                    )(e));
                }
            }
        }
        Ok(false)
    }
}

/// Attempts of DEL's blank, each after a fresh read that says the IPs are still ours.
const MAX_BLANK_ATTEMPTS: usize = 5;

/// What a patch requires of the pod it changes (the API server answers 409 otherwise).
#[derive(Clone, Copy, Default)]
pub(super) struct Precondition<'a> {
    pub uid: Option<&'a str>,
    pub resource_version: Option<&'a str>,
}

/// Writes Calico's annotations through the status subresource, as Calico does (RBAC
/// pods/status). The pod's UID, when known, makes a patch fail on a re-created pod.
#[derive(Clone)]
pub(super) struct Annotations {
    client: Client,
}

/// How long the background patch of an ADD keeps trying.
const ANNOTATE_ATTEMPTS: u32 = 8;

impl Annotations {
    /// The pod's IPs and the container that holds them.
    pub(super) async fn annotate(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        container_id: &str,
        addrs: &[IpNet],
    ) -> Result<(), HandlerError> {
        let ips: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let annotations = json!({
            ANNOTATION_POD_IP: ips.first().cloned().unwrap_or_default(),
            ANNOTATION_POD_IPS: ips.join(","),
            ANNOTATION_CONTAINER_ID: container_id,
        });
        let at = Precondition {
            uid,
            resource_version: None,
        };
        self.patch_annotations(namespace, name, at, annotations)
            .await
            .map_err(api_err("annotate pod", format!("{namespace}/{name}")))
    }

    /// `annotate` for the moments after an ADD replied: transient errors are retried with
    /// backoff; a pod that is gone or was re-created is left alone.
    pub(super) async fn annotate_until_done(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        container_id: &str,
        addrs: &[IpNet],
    ) {
        let mut delay = std::time::Duration::from_millis(100);
        for attempt in 1..=ANNOTATE_ATTEMPTS {
            let e = match self
                .annotate(namespace, name, uid, container_id, addrs)
                .await
            {
                Ok(()) => return,
                Err(e) => e,
            };
            let permanent = matches!(&e, HandlerError::Api { source, .. }
                if matches!(source.as_ref(), kube::Error::Api(s) if matches!(s.code, 403 | 404 | 409 | 422)));
            if permanent || attempt == ANNOTATE_ATTEMPTS {
                tracing::warn!(pod = %format!("{namespace}/{name}"), container = container_id, error = %e, attempt, "pod IP annotations not written");
                return;
            }
            tracing::debug!(pod = %format!("{namespace}/{name}"), error = %e, attempt, "pod IP annotations: retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_secs(5));
        }
    }

    async fn patch_annotations(
        &self,
        namespace: &str,
        name: &str,
        at: Precondition<'_>,
        annotations: Value,
    ) -> Result<(), kube::Error> {
        let mut metadata = Map::new();
        metadata.insert("annotations".into(), annotations);
        if let Some(uid) = at.uid {
            metadata.insert("uid".into(), Value::String(uid.to_string()));
        }
        if let Some(rv) = at.resource_version {
            metadata.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let patch = json!({ "metadata": metadata });
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

fn trim_namespace(n: &mut Namespace) {
    n.metadata.managed_fields = None;
    n.spec = None;
    n.status = None;
}
