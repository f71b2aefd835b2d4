//! The daemon's view of the cluster: the API server connection, one watch per resource kind
//! feeding a reflector store, and the sync state (every watch listed, none failing) that
//! readiness and `tortie_datastore_synced` report.

pub mod lease;
pub mod pods;
pub mod ready;
mod sync;
mod watch;

pub use sync::{Backoff, DatastoreStatus, Observation, SyncTracker};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch as status_channel;
use tokio::task::{AbortHandle, JoinHandle};

use crate::api::{
    FelixConfiguration, GlobalNetworkPolicy, GlobalNetworkSet, IPPool, NetworkPolicy, NetworkSet,
    StagedGlobalNetworkPolicy, StagedKubernetesNetworkPolicy, StagedNetworkPolicy,
};
use crate::config::KubeSource;
use crate::policy::cluster::ClusterObjects;

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster configuration (service account, KUBERNETES_SERVICE_HOST): {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("building API client for {url}: {source}")]
    Client { url: String, source: kube::Error },
}

/// A client for the API server, and its URL for messages.
#[derive(Clone)]
pub struct Connection {
    pub client: Client,
    pub url: String,
}

/// Builds the API client. Makes no request: an unreachable server shows up in the watches.
pub async fn connect(source: &KubeSource) -> Result<Connection, DatastoreError> {
    let config = match source {
        KubeSource::Kubeconfig(path) => {
            let kubeconfig_error = |source| DatastoreError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
        KubeSource::InCluster => Config::incluster()?,
    };
    let url = config.cluster_url.to_string();
    let url = url.trim_end_matches('/').to_owned();
    let client = Client::try_from(config).map_err(|source| DatastoreError::Client {
        url: url.clone(),
        source,
    })?;
    Ok(Connection { client, url })
}

/// Read-only stores of the watched resources; cheap to clone.
#[derive(Clone)]
pub struct ClusterView {
    pub nodes: Store<Node>,
    pub ip_pools: Store<IPPool>,
    pub felix_configs: Store<FelixConfiguration>,
    /// What network policy reads besides pods (the daemon's one Pod watch lives with IPAM):
    /// namespace and service-account labels, every policy kind, network sets.
    pub policy: PolicyStores,
    /// Bumped after every change applied to any store: readers wait on it instead of polling.
    pub changes: status_channel::Receiver<u64>,
}

/// The stores network policy reads, one watch per kind.
#[derive(Clone)]
pub struct PolicyStores {
    pub namespaces: Store<Namespace>,
    pub service_accounts: Store<ServiceAccount>,
    pub k8s_policies: Store<K8sNetworkPolicy>,
    pub network_policies: Store<NetworkPolicy>,
    pub global_network_policies: Store<GlobalNetworkPolicy>,
    pub staged_network_policies: Store<StagedNetworkPolicy>,
    pub staged_global_network_policies: Store<StagedGlobalNetworkPolicy>,
    pub staged_k8s_policies: Store<StagedKubernetesNetworkPolicy>,
    pub network_sets: Store<NetworkSet>,
    pub global_network_sets: Store<GlobalNetworkSet>,
}

impl PolicyStores {
    /// A snapshot of everything policy evaluation reads; `pods` is the daemon's one Pod store.
    pub fn objects(&self, pods: &Store<pods::CachedPod>) -> ClusterObjects {
        fn all<K>(s: &Store<K>) -> Vec<K>
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            s.state().iter().map(|o| (**o).clone()).collect()
        }
        ClusterObjects {
            namespaces: all(&self.namespaces),
            pods: pods.state().iter().map(|p| p.to_pod()).collect(),
            service_accounts: all(&self.service_accounts),
            k8s_policies: all(&self.k8s_policies),
            network_policies: all(&self.network_policies),
            global_network_policies: all(&self.global_network_policies),
            staged_network_policies: all(&self.staged_network_policies),
            staged_global_network_policies: all(&self.staged_global_network_policies),
            staged_k8s_policies: all(&self.staged_k8s_policies),
            network_sets: all(&self.network_sets),
            global_network_sets: all(&self.global_network_sets),
        }
    }
}

/// Running watches: the view they fill, their sync status, and the tasks to stop.
pub struct Datastore {
    pub view: ClusterView,
    pub status: status_channel::Receiver<DatastoreStatus>,
    /// Watch tasks not yet handed to a health registry (see `supervise`).
    unsupervised: Vec<(&'static str, JoinHandle<()>)>,
    aborts: Vec<AbortHandle>,
    changes_tx: std::sync::Arc<status_channel::Sender<u64>>,
}

/// Bumps the view's change counter: for a store kept outside the view (the daemon's one
/// Pod watch), so its changes wake the calculations as the view's own stores do.
#[derive(Clone)]
pub struct ChangeNotifier(std::sync::Arc<status_channel::Sender<u64>>);

impl ChangeNotifier {
    pub fn bump(&self) {
        self.0.send_modify(|g| *g += 1);
    }
}

impl Datastore {
    /// Starts one watch per resource kind. To watch another kind, add a store to
    /// `ClusterView` and one `spawn` line here.
    pub fn start(conn: &Connection) -> Datastore {
        let (reporter, status) = watch::SyncReporter::new(&conn.url);
        let mut tasks = Vec::new();
        let client = &conn.client;
        let (changes_tx, changes) = status_channel::channel(0);
        let changes_tx = std::sync::Arc::new(changes_tx);
        let mut watch = Watches {
            tasks: &mut tasks,
            reporter: &reporter,
            changes: changes_tx.clone(),
        };
        let nodes = watch.spawn("nodes", Api::all(client.clone()), trim_node);
        let ip_pools = watch.spawn("ippools", Api::all(client.clone()), trim_common::<IPPool>);
        let felix_configs = watch.spawn(
            "felixconfigurations",
            Api::all(client.clone()),
            trim_common::<FelixConfiguration>,
        );
        let policy = PolicyStores {
            namespaces: watch.spawn("namespaces", Api::all(client.clone()), trim_namespace),
            service_accounts: watch.spawn(
                "serviceaccounts",
                Api::all(client.clone()),
                trim_labels_only,
            ),
            k8s_policies: watch.spawn(
                "networkpolicies.networking.k8s.io",
                Api::all(client.clone()),
                trim_common::<K8sNetworkPolicy>,
            ),
            network_policies: watch.spawn(
                "networkpolicies",
                Api::all(client.clone()),
                trim_common::<NetworkPolicy>,
            ),
            global_network_policies: watch.spawn(
                "globalnetworkpolicies",
                Api::all(client.clone()),
                trim_common::<GlobalNetworkPolicy>,
            ),
            staged_network_policies: watch.spawn(
                "stagednetworkpolicies",
                Api::all(client.clone()),
                trim_common::<StagedNetworkPolicy>,
            ),
            staged_global_network_policies: watch.spawn(
                "stagedglobalnetworkpolicies",
                Api::all(client.clone()),
                trim_common::<StagedGlobalNetworkPolicy>,
            ),
            staged_k8s_policies: watch.spawn(
                "stagedkubernetesnetworkpolicies",
                Api::all(client.clone()),
                trim_common::<StagedKubernetesNetworkPolicy>,
            ),
            network_sets: watch.spawn(
                "networksets",
                Api::all(client.clone()),
                trim_common::<NetworkSet>,
            ),
            global_network_sets: watch.spawn(
                "globalnetworksets",
                Api::all(client.clone()),
                trim_common::<GlobalNetworkSet>,
            ),
        };
        reporter.seal();
        Datastore {
            view: ClusterView {
                nodes,
                ip_pools,
                felix_configs,
                policy,
                changes,
            },
            status,
            aborts: tasks.iter().map(|(_, t)| t.abort_handle()).collect(),
            unsupervised: tasks,
            changes_tx,
        }
    }

    /// What a store outside the view bumps on each change (`reflect_notifying`).
    pub fn notifier(&self) -> ChangeNotifier {
        ChangeNotifier(self.changes_tx.clone())
    }

    /// Puts each watch task on `health` as `datastore/watch/<kind>`: one that ends or
    /// panics revokes readiness by name (its list/watch failures are in the sync status).
    pub fn supervise(&mut self, health: &crate::health::Registry) {
        let expect = crate::health::Expect {
            stall_after: None,
            ..crate::health::Expect::default()
        };
        for (name, task) in self.unsupervised.drain(..) {
            health.supervise(format!("datastore/watch/{name}"), expect, task);
        }
    }

    /// Stops every watch; the stores keep their last contents.
    pub async fn stop(self) {
        for a in &self.aborts {
            a.abort();
        }
        for (_, t) in self.unsupervised {
            let _ = t.await;
        }
    }
}

/// Start-up helper: registers each watch with the tracker before any can report.
struct Watches<'a> {
    tasks: &'a mut Vec<(&'static str, JoinHandle<()>)>,
    reporter: &'a watch::SyncReporter,
    changes: std::sync::Arc<status_channel::Sender<u64>>,
}

impl Watches<'_> {
    fn spawn<K>(&mut self, name: &'static str, api: Api<K>, trim: fn(&mut K)) -> Store<K>
    where
        K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let (store, writer) = reflector::store();
        self.reporter.register(name);
        let task = watch::run(
            name,
            api,
            writer,
            trim,
            self.reporter.clone(),
            self.changes.clone(),
        );
        self.tasks.push((name, tokio::spawn(task)));
        store
    }
}

/// Managed fields are large and never read by the daemon.
fn trim_common<K: ResourceExt>(obj: &mut K) {
    obj.managed_fields_mut().clear();
}

/// Namespaces and service accounts matter to policy only through their labels (selectors
/// match `pcns.*` / `pcsa.*`); everything else (annotations, secrets, status) is dropped.
fn trim_labels_only<K: ResourceExt>(obj: &mut K) {
    trim_common(obj);
    obj.annotations_mut().clear();
}

/// Namespaces: labels for policy, and Calico's `cni.projectcalico.org/*` annotations (pool
/// choice) for the CNI, which reads this store too.
fn trim_namespace(ns: &mut Namespace) {
    trim_common(ns);
    ns.spec = None;
    ns.status = None;
    ns.annotations_mut()
        .retain(|k, _| k.starts_with(crate::api::vocab::CNI_ANNOTATION_PREFIX));
}

/// Container image lists dominate a Node's size and play no part in networking.
fn trim_node(node: &mut Node) {
    trim_common(node);
    if let Some(status) = node.status.as_mut() {
        status.images = None;
    }
}

/// A watch feeding a store outside the sync tracker, for readers that cope with a cache
/// that is not filled yet (they fall back to a GET, or wait for it themselves). `what`
/// names the watch in logs; errors are retried with backoff for as long as the task runs.
pub fn reflect<K>(
    api: Api<K>,
    cfg: watcher::Config,
    trim: fn(&mut K),
    what: &'static str,
) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let task = tokio::spawn(async move {
        let stream = watcher::watcher(api, cfg)
            .default_backoff()
            .modify(trim)
            .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!(watch = what, error = %e, "watch failed; retrying");
            }
        }
    });
    (store, task)
}

/// `reflect`, bumping `changes` after each list and after each change of an object's
/// trimmed contents: an update that only moves its resourceVersion (a pod's status
/// conditions, trimmed away) wakes nobody.
pub fn reflect_notifying<K>(
    api: Api<K>,
    cfg: watcher::Config,
    trim: fn(&mut K),
    what: &'static str,
    changes: ChangeNotifier,
) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource
        + Clone
        + PartialEq
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, mut writer) = reflector::store();
    let reader = writer.as_reader();
    let task = tokio::spawn(async move {
        let stream = watcher::watcher(api, cfg).default_backoff().modify(trim);
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!(watch = what, error = %e, "watch failed; retrying");
                    continue;
                }
            };
            let changed = match &ev {
                watcher::Event::Apply(obj) => reader
                    .get(&reflector::ObjectRef::from_obj(obj))
                    .is_none_or(|old| !same_contents(old.as_ref(), obj)),
                watcher::Event::Delete(_) | watcher::Event::InitDone => true,
                watcher::Event::Init | watcher::Event::InitApply(_) => false,
            };
            writer.apply_watcher_event(&ev);
            if changed {
                changes.bump();
            }
        }
    });
    (store, task)
}

/// Equal but for the resourceVersion.
fn same_contents<K: kube::Resource + Clone + PartialEq>(a: &K, b: &K) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    a.meta_mut().resource_version = None;
    b.meta_mut().resource_version = None;
    a == b
}
