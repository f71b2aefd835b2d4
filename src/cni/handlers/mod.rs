//! The daemon's answers to CNI requests: ADD (pod lookup, IPAM, plumbing, annotations),
//! DEL, CHECK, STATUS and GC. One `CniDaemon` serves every connection; requests for the same
//! container run one at a time, different containers in parallel.

mod add;
pub mod endpoints;
mod locks;
pub mod options;
mod pod;
mod teardown;

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Client;

use self::endpoints::{LocalEndpoints, PolicyWaitError};
use self::locks::ContainerLocks;
use self::pod::PodView;
pub use self::pod::SharedStores;
use super::error::{CniError, code};
use super::invocation::Command;
use super::plumbing::{Plumber, PlumbingError};
use super::protocol::{ReceivedRequest, Response};
use crate::ipam::{Ipam, IpamError};

pub use self::options::ATTR_POD_UID;

/// tortie's code for a CHECK that found the attachment differing from what ADD made.
pub const CHECK_MISMATCH: u32 = 101;

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("{what} is required for {command}")]
    Missing {
        command: Command,
        what: &'static str,
    },
    #[error(
        "CNI_NETNS {netns:?} of container {container} is the daemon's own (host) network namespace; refusing to plumb it"
    )]
    HostNetns { container: String, netns: String },
    #[error(
        "the plugin sent no network namespace descriptor for {command} of container {container}"
    )]
    NoNetns { command: Command, container: String },
    #[error("pod {namespace}/{name} does not exist")]
    PodNotFound { namespace: String, name: String },
    #[error("{action} {object}: {source}")]
    Api {
        action: &'static str,
        object: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Plumbing(#[from] PlumbingError),
    #[error("network configuration key {key} is invalid: {problem}")]
    Config { key: &'static str, problem: String },
    #[error("container {container} already has {addrs} but its attachment differs: {problem}")]
    ExistingDiffers {
        container: String,
        addrs: String,
        problem: String,
    },
    #[error("CHECK of container {container}: {problem}")]
    Check { container: String, problem: String },
    #[error("tortie daemon is not ready to serve ADD: {reason}")]
    NotReady { reason: String },
    #[error(transparent)]
    Policy(#[from] PolicyWaitError),
}

impl HandlerError {
    pub fn code(&self, command: Command) -> u32 {
        match self {
            HandlerError::Missing { .. }
            | HandlerError::HostNetns { .. }
            | HandlerError::NoNetns { .. } => code::INVALID_ENVIRONMENT,
            HandlerError::PodNotFound { .. } => code::UNKNOWN_CONTAINER,
            HandlerError::Config { .. } => code::INVALID_CONFIG,
            HandlerError::Ipam(
                IpamError::BadAnnotation { .. }
                | IpamError::RequestedPoolUnusable { .. }
                | IpamError::InvalidPool { .. }
                | IpamError::NoPoolForNode { .. }
                | IpamError::FixedIpUnusable { .. },
            ) => code::INVALID_CONFIG,
            HandlerError::Plumbing(PlumbingError::PodInterfaceExists { .. }) => {
                code::INVALID_ENVIRONMENT
            }
            HandlerError::ExistingDiffers { .. } => code::INVALID_ENVIRONMENT,
            HandlerError::Check { .. } => CHECK_MISMATCH,
            HandlerError::NotReady { .. } if command == Command::Status => {
                code::PLUGIN_NOT_AVAILABLE
            }
            _ => code::TRY_AGAIN_LATER,
        }
    }

    pub fn to_cni(&self, command: Command) -> CniError {
        CniError::new(self.code(command), self.to_string())
    }
}

/// Settings of the CNI side of the daemon.
#[derive(Debug, Clone)]
pub struct CniSettings {
    pub node: String,
    /// Pod MTU when the network config gives none, read per ADD: the daemon recomputes it
    /// from FelixConfiguration, the host MTU and the pools (`felix_config::live`).
    pub default_mtu: tokio::sync::watch::Receiver<u32>,
}

impl CniSettings {
    /// Settings with a pod MTU that never changes.
    pub fn fixed_mtu(node: impl Into<String>, mtu: u32) -> CniSettings {
        CniSettings {
            node: node.into(),
            default_mtu: tokio::sync::watch::channel(mtu).1,
        }
    }

    /// The MTU a pod created now gets when its network config sets none.
    pub fn pod_mtu(&self) -> u32 {
        *self.default_mtu.borrow()
    }
}

pub struct CniDaemon {
    settings: CniSettings,
    pods: PodView,
    ipam: Arc<Ipam>,
    plumber: Plumber,
    locks: ContainerLocks,
    ready: AtomicBool,
    metrics: crate::cni::metrics::CniMetrics,
    /// Set when the daemon enforces policy: ADD registers its pod and answers only once
    /// the pod's policy is in the kernel.
    endpoints: Option<Arc<LocalEndpoints>>,
}

impl CniDaemon {
    /// Starts the pod and namespace watches ADD reads from: call inside a tokio runtime.
    pub fn new(
        settings: CniSettings,
        client: Client,
        ipam: Arc<Ipam>,
        plumber: Plumber,
    ) -> CniDaemon {
        CniDaemon::with_pods(settings, client, ipam, plumber, None)
    }

    /// `new`, reading the daemon's shared Pod and Namespace stores when given.
    pub fn with_pods(
        settings: CniSettings,
        client: Client,
        ipam: Arc<Ipam>,
        plumber: Plumber,
        pods: Option<SharedStores>,
    ) -> CniDaemon {
        let endpoints = pods.as_ref().and_then(|s| s.endpoints.clone());
        CniDaemon {
            pods: PodView::with_pods(client, &settings.node, pods),
            endpoints,
            settings,
            ipam,
            plumber,
            locks: ContainerLocks::default(),
            ready: AtomicBool::new(false),
            metrics: crate::cni::metrics::CniMetrics::default(),
        }
    }

    /// Requests and their durations; the node registers them with its metrics.
    pub fn metrics(&self) -> &crate::cni::metrics::CniMetrics {
        &self.metrics
    }

    /// STATUS and ADD answer "not ready" until this is set (IPAM synced, socket serving).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// Answers one request.
    pub async fn handle(&self, received: ReceivedRequest) -> Response {
        let ReceivedRequest { request, netns } = received;
        let command = request.command;
        let netns = netns.map(File::from);
        let started = std::time::Instant::now();
        let outcome = match command {
            Command::Add => self.add(&request, netns).await.map(Some),
            Command::Del => self.del(&request, netns).await.map(|()| None),
            Command::Check => self.check(&request, netns).await.map(|()| None),
            Command::Status => self.status().map(|()| None),
            Command::Gc => self.gc(&request).await.map(|()| None),
            // The plugin answers VERSION itself; a daemon asked anyway has nothing to add.
            Command::Version => Ok(None),
        };
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics
            .observe(command.as_str(), outcome.is_ok(), elapsed);
        let elapsed_ms = elapsed * 1000.0;
        let container = request.container_id.as_deref().unwrap_or("");
        match outcome {
            Ok(result) => {
                tracing::info!(%command, container, elapsed_ms, "CNI request done");
                Response::Ok { result }
            }
            Err(e) => {
                tracing::warn!(%command, container, elapsed_ms, error = %e, "CNI request failed");
                Response::Error {
                    error: e.to_cni(command),
                }
            }
        }
    }

    fn status(&self) -> Result<(), HandlerError> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(HandlerError::NotReady {
                reason: "IPAM has not synced with the API server yet".into(),
            })
        }
    }

    /// The namespace descriptor of an attachment command, refused if it is the host's own.
    fn pod_netns(
        &self,
        container: &str,
        netns_path: Option<&str>,
        netns: Option<File>,
    ) -> Result<Option<File>, HandlerError> {
        let Some(file) = netns else {
            return Ok(None);
        };
        let host = self.plumber.is_host_namespace(&file).map_err(|e| {
            HandlerError::Plumbing(PlumbingError::io("stat the pod network namespace", e))
        })?;
        if host {
            return Err(HandlerError::HostNetns {
                container: container.to_string(),
                netns: netns_path.unwrap_or("").to_string(),
            });
        }
        Ok(Some(file))
    }
}

fn require<'a>(
    command: Command,
    what: &'static str,
    value: Option<&'a str>,
) -> Result<&'a str, HandlerError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or(HandlerError::Missing { command, what })
}
