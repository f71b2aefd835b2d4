//! `tortie node`: the daemon's wiring. Start-up order and the shutdown path, nothing else;
//! each step lives in the module that owns it.
//! Order: signals → metrics and health servers (not ready) → API client → watches → ready.

pub mod identity;
mod signals;

use std::process::ExitCode;
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch as stop_channel;
use tokio::task::JoinSet;

use crate::config::{NodeArgs, NodeConfig};
use crate::datastore::{self, ClusterView, Datastore, DatastoreError, DatastoreStatus};
use crate::http::{self, Condition, HttpError, Readiness};
use crate::metrics::{BuildInfo, Metrics, MetricsError};

/// Shutdown must finish well within the 2 s a DaemonSet rollout should wait for us.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(1500);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error("{server} server stopped unexpectedly")]
    ServerExited { server: &'static str },
}

/// Entry point of `tortie node`: validates the settings, then runs the daemon to completion.
pub fn main(args: NodeArgs) -> ExitCode {
    let cfg = match NodeConfig::from_args(args) {
        Ok(cfg) => cfg,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            return ExitCode::from(2);
        }
    };
    match run_to_completion(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tortie node failed");
            ExitCode::FAILURE
        }
    }
}

fn run_to_completion(cfg: NodeConfig) -> Result<(), NodeError> {
    // The daemon waits on the network, not on the CPU: a few workers suffice on big hosts.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(NodeError::Runtime)?;
    let result = runtime.block_on(run(cfg));
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn run(cfg: NodeConfig) -> Result<(), NodeError> {
    // First, so that a SIGTERM during start-up still ends in an orderly exit.
    let mut signals = signals::Signals::install().map_err(NodeError::Signals)?;
    tracing::info!(node = %cfg.node_name, version = BuildInfo::CURRENT.version, "tortie node starting");

    let metrics = Metrics::new(&BuildInfo::CURRENT)?;
    let readiness = Readiness::default();
    let datastore_ready = readiness.condition("datastore", "datastore not synced: not started");
    let (stop, stopped) = stop_channel::channel(false);
    let mut servers = JoinSet::new();
    let health = http::bind("health", cfg.health_listen).await?;
    let metrics_listener = http::bind("metrics", cfg.metrics_listen).await?;
    servers.spawn(serve(
        "health",
        health,
        http::health_router(readiness),
        stopped.clone(),
    ));
    servers.spawn(serve(
        "metrics",
        metrics_listener,
        http::metrics_router(metrics.clone()),
        stopped,
    ));

    let conn = datastore::connect(&cfg.kube).await?;
    tracing::info!(api_server = %conn.url, "watching the API server");
    let datastore = Datastore::start(&conn);
    let mut status = datastore.status.clone();
    let mut checked_own_node = false;

    let outcome = loop {
        let current = status.borrow_and_update().clone();
        report(&current, &datastore_ready, &metrics);
        if current.synced && !checked_own_node {
            checked_own_node = true;
            warn_if_node_missing(&datastore.view, &cfg.node_name);
        }
        tokio::select! {
            signal = signals.recv() => {
                tracing::info!(signal, "shutting down");
                break Ok(());
            }
            changed = status.changed() => {
                if changed.is_err() {
                    break Ok(()); // the watches are gone: only happens during shutdown
                }
            }
            Some(exited) = servers.join_next() => {
                break Err(match exited {
                    Ok(Err(e)) => e,
                    _ => NodeError::ServerExited { server: "HTTP" },
                });
            }
        }
    };

    let _ = stop.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_BUDGET, async {
        datastore.stop().await;
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            budget_ms = SHUTDOWN_BUDGET.as_millis() as u64,
            "shutdown budget spent; exiting anyway"
        );
    }
    tracing::info!("tortie node stopped");
    outcome
}

/// One HTTP server until `stopped` turns true; an early end is an error for the main loop.
async fn serve(
    server: &'static str,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut stopped: stop_channel::Receiver<bool>,
) -> Result<(), NodeError> {
    let shutdown = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    http::serve(server, listener, router, shutdown).await?;
    Ok(())
}

fn report(status: &DatastoreStatus, ready: &Condition, metrics: &Metrics) {
    metrics.apiserver_connected.set(i64::from(status.connected));
    metrics.datastore_synced.set(i64::from(status.synced));
    match &status.problem {
        None => {
            tracing::info!("datastore synced");
            ready.set_ready();
        }
        Some(problem) => {
            tracing::info!(reason = %problem, "not ready");
            ready.set_not_ready(problem.clone());
        }
    }
}

/// A wrong NODENAME is a common mistake; say so early instead of failing later in IPAM.
fn warn_if_node_missing(view: &ClusterView, node_name: &str) {
    if view.nodes.get(&ObjectRef::new(node_name)).is_none() {
        tracing::warn!(
            node = node_name,
            nodes = view.nodes.len(),
            "this node's Node object does not exist (check NODENAME)"
        );
    }
}
