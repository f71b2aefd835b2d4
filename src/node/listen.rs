//! The health and metrics servers follow their address: FelixConfiguration `healthPort`,
//! `healthHost`, `prometheusMetricsPort` and `prometheusMetricsHost` (unless a flag set them)
//! move a server live. The new address is bound before the old listener closes, so probes
//! never find nothing; an address that cannot be bound is logged and the old one kept.

use std::net::SocketAddr;

use tokio::sync::{oneshot, watch};

use super::NodeError;
use crate::http;

/// One HTTP server until `stopped` turns true, moving to each new address `addrs` names;
/// an early end is an error for the main loop.
pub async fn serve_following(
    server: &'static str,
    mut listener: tokio::net::TcpListener,
    mut addrs: watch::Receiver<SocketAddr>,
    router: axum::Router,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let mut following = true;
    loop {
        let (close_tx, close_rx) = oneshot::channel::<()>();
        let mut stop = stopped.clone();
        let shutdown = async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = close_rx => {}
            }
        };
        let mut serving = tokio::spawn(http::serve(server, listener, router.clone(), shutdown));
        let next = loop {
            let wake = tokio::select! {
                _ = stopped.wait_for(|s| *s) => Wake::Stop,
                done = &mut serving => Wake::Ended(done),
                changed = addrs.changed(), if following => Wake::Moved(changed.is_ok()),
            };
            match wake {
                Wake::Stop => {
                    let _ = close_tx.send(());
                    return finish(server, serving.await);
                }
                Wake::Ended(done) => {
                    finish(server, done)?;
                    return Err(NodeError::ServerExited { server });
                }
                Wake::Moved(false) => following = false,
                Wake::Moved(true) => {
                    let want = *addrs.borrow_and_update();
                    match http::bind(server, want).await {
                        Ok(l) => break l,
                        Err(e) => tracing::warn!(server, error = %e,
                            "cannot move the server; it stays where it is"),
                    }
                }
            }
        };
        let _ = close_tx.send(());
        finish(server, serving.await)?;
        tracing::info!(server, addr = ?next.local_addr().ok(), "HTTP server moved");
        listener = next;
    }
}

enum Wake {
    Stop,
    Ended(Result<Result<(), http::HttpError>, tokio::task::JoinError>),
    Moved(bool),
}

fn finish(
    server: &'static str,
    joined: Result<Result<(), http::HttpError>, tokio::task::JoinError>,
) -> Result<(), NodeError> {
    match joined {
        Ok(r) => r.map_err(NodeError::from),
        Err(_) => Err(NodeError::ServerExited { server }),
    }
}
