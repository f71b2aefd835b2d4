//! `tortie node`: the daemon's wiring. Start-up order (startup.rs), the main loop and the
//! shutdown path, nothing else; each step lives in the module that owns it.
//! Shutdown stops the loops but leaves routes, devices and pods' plumbing in place.

mod dataplane;
pub mod identity;
mod ipam_jobs;
mod listen;
mod overlay;
mod overlay_metrics;
mod policy;
pub mod policy_counters;
pub mod policy_cut;
mod policy_obs;
mod policy_report;
mod signals;
pub mod snapshot;
mod startup;
mod tunnel;

use std::process::ExitCode;
use std::time::Duration;

use tokio::sync::watch as stop_channel;
use tokio::task::JoinSet;

use crate::cni::service::ServiceError;
use crate::config::{NodeArgs, NodeConfig};
use crate::dataplane::DataplaneError;
use crate::datastore::DatastoreError;
use crate::datastore::lease::LeaseError;
use crate::http::{self, HttpError, Readiness};
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
    #[error("CNI: {0}")]
    Cni(#[from] ServiceError),
    #[error("dataplane: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("leader election: {0}")]
    Lease(#[from] LeaseError),
    #[error("the datastore's watches ended during start-up")]
    WatchesEnded,
    #[error("the overlay calculation produced nothing on its first pass")]
    NoFirstCalculation,
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
    crate::memory::tune_allocator();
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
    let readiness_health = readiness.health.clone();
    let ready_gauge = http::ReadyGauge::new(readiness.clone()).map_err(|source| {
        crate::metrics::MetricsError::Register {
            name: "tortie_ready",
            source,
        }
    })?;
    metrics.register("tortie_ready", ready_gauge)?;
    let ready = startup::Conditions::new(&readiness);
    let (stop, stopped) = stop_channel::channel(false);
    let mut servers = JoinSet::new();
    let health = http::bind("health", cfg.health_listen).await?;
    let metrics_listener = http::bind("metrics", cfg.metrics_listen).await?;
    // Start-up feeds these from FelixConfiguration (flags, when set, win).
    let (health_addr, health_addrs) = stop_channel::channel(cfg.health_listen);
    let (metrics_addr, metrics_addrs) = stop_channel::channel(cfg.metrics_listen);
    servers.spawn(listen::serve_following(
        "health",
        health,
        health_addrs,
        http::health_router(readiness),
        stopped.clone(),
    ));
    servers.spawn(listen::serve_following(
        "metrics",
        metrics_listener,
        metrics_addrs,
        http::metrics_router(metrics.clone()),
        stopped.clone(),
    ));
    let listeners = startup::Listeners {
        health: health_addr,
        metrics: metrics_addr,
    };

    let trim_stopped = stopped.clone();
    let started = tokio::select! {
        started = startup::start(&cfg, &metrics, &ready, stopped, listeners) => started.map(Some),
        signal = signals.recv() => {
            tracing::info!(signal, "shutting down during start-up");
            Ok(None)
        }
        Some(exited) = servers.join_next() => Err(server_error(exited)),
    };
    let outcome = match started {
        Ok(Some(running)) => {
            tracing::info!("tortie node ready");
            // The initial lists are parsed and cached: what they needed on the way is free.
            crate::memory::trim();
            tokio::spawn(crate::memory::trim_periodically(trim_stopped));
            let outcome = main_loop(&mut signals, &mut servers).await;
            readiness_health.stopping();
            let _ = stop.send(true);
            let drained = tokio::time::timeout(SHUTDOWN_BUDGET, async {
                running.stop().await;
                while servers.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    budget_ms = SHUTDOWN_BUDGET.as_millis() as u64,
                    "shutdown budget spent; exiting anyway"
                );
            }
            outcome
        }
        other => {
            readiness_health.stopping();
            let _ = stop.send(true);
            other.map(|_| ())
        }
    };
    tracing::info!("tortie node stopped");
    outcome
}

/// Until a signal or a server failure.
async fn main_loop(
    signals: &mut signals::Signals,
    servers: &mut JoinSet<Result<(), NodeError>>,
) -> Result<(), NodeError> {
    tokio::select! {
        signal = signals.recv() => {
            tracing::info!(signal, "shutting down");
            Ok(())
        }
        Some(exited) = servers.join_next() => Err(server_error(exited)),
    }
}

fn server_error(exited: Result<Result<(), NodeError>, tokio::task::JoinError>) -> NodeError {
    match exited {
        Ok(Err(e)) => e,
        _ => NodeError::ServerExited { server: "HTTP" },
    }
}
