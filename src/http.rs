//! The daemon's HTTP surface: `/liveness` and `/readiness` on the health port (what kubelet
//! probes) and `/metrics` on the metrics port (what Prometheus scrapes). Readiness is a set of
//! named conditions; each part of the daemon owns one and reports why it is not ready.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{server} server cannot listen on {addr}: {source}")]
    Bind {
        server: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{server} server on {addr} stopped: {source}")]
    Serve {
        server: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Readiness of the whole daemon: ready when every registered condition is.
#[derive(Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<Vec<ConditionState>>>,
    /// The long-running loops: each one's stall, failure or end revokes readiness, and a
    /// vital loop's stall or any loop's end fails liveness.
    pub health: crate::health::Registry,
}

/// A condition's name, and `None` when ready or `Some(reason)` when not.
type ConditionState = (String, Option<String>);

/// One condition of `Readiness`, held by the part of the daemon it describes.
#[derive(Clone)]
pub struct Condition {
    readiness: Readiness,
    index: usize,
}

impl Readiness {
    /// Adds a condition that starts not ready with `reason` (e.g. "datastore not synced: ...").
    pub fn condition(&self, name: &str, reason: impl Into<String>) -> Condition {
        let mut conditions = self.lock();
        conditions.push((name.to_owned(), Some(reason.into())));
        Condition {
            readiness: self.clone(),
            index: conditions.len() - 1,
        }
    }

    /// `Ok` when every condition is ready, else the reasons of those that are not, one a line.
    pub fn report(&self) -> Result<(), String> {
        let mut reasons: Vec<String> = self
            .lock()
            .iter()
            .filter_map(|(_, reason)| reason.clone())
            .collect();
        reasons.extend(self.health.readiness());
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("\n"))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ConditionState>> {
        // A panic elsewhere while holding the lock leaves plain data behind: keep serving it.
        self.conditions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Condition {
    pub fn set_ready(&self) {
        self.set(None);
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.set(Some(reason.into()));
    }

    /// The condition's name as registered.
    pub fn name(&self) -> String {
        self.readiness
            .lock()
            .get(self.index)
            .map(|(name, _)| name.clone())
            .unwrap_or_default()
    }

    fn set(&self, reason: Option<String>) {
        if let Some(slot) = self.readiness.lock().get_mut(self.index) {
            slot.1 = reason;
        }
    }
}

/// Routes of the health port.
pub fn health_router(readiness: Readiness) -> Router {
    Router::new()
        // Answering proves the runtime and the listener work; the loops say the rest.
        .route("/liveness", get(liveness_handler))
        .route("/readiness", get(readiness_handler))
        .with_state(readiness)
}

async fn liveness_handler(State(readiness): State<Readiness>) -> Response {
    let problems = readiness.health.liveness();
    if problems.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let text = problems.join("\n");
        (StatusCode::SERVICE_UNAVAILABLE, format!("{text}\n")).into_response()
    }
}

async fn readiness_handler(State(readiness): State<Readiness>) -> Response {
    match readiness.report() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reasons) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reasons}\n")).into_response(),
    }
}

/// Routes of the metrics port.
pub fn metrics_router(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(metrics)
}

async fn metrics_handler(State(metrics): State<Metrics>) -> Response {
    match metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render /metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

/// Binds early so that a port clash stops start-up with a clear error.
pub async fn bind(server: &'static str, addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind {
            server,
            addr,
            source,
        })
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    server: &'static str,
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tracing::info!(server, %addr, "HTTP server listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| HttpError::Serve {
            server,
            addr,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lists_every_condition_that_is_not_ready() {
        let readiness = Readiness::default();
        let ds = readiness.condition("datastore", "datastore not synced: connecting");
        let dp = readiness.condition("dataplane", "dataplane not applied yet");
        let report = readiness.report().expect_err("nothing ready yet");
        assert_eq!(
            report,
            "datastore not synced: connecting\ndataplane not applied yet"
        );
        ds.set_ready();
        assert_eq!(
            readiness.report(),
            Err("dataplane not applied yet".to_owned())
        );
        dp.set_ready();
        assert_eq!(readiness.report(), Ok(()));
        ds.set_not_ready("datastore disconnected: watch nodes: connection refused");
        assert_eq!(
            readiness.report(),
            Err("datastore disconnected: watch nodes: connection refused".to_owned())
        );
        assert_eq!(ds.name(), "datastore");
    }

    #[test]
    fn no_conditions_means_ready() {
        assert_eq!(Readiness::default().report(), Ok(()));
    }
}
