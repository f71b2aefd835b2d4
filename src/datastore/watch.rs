//! One watch on the API server feeding one reflector store: lists, watches, and after any
//! failure reports it, waits (with backoff) and lists again. Never gives up; stops when its
//! task is aborted.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use tokio::sync::watch as status_channel;

use super::sync::{Backoff, DatastoreStatus, Observation, SyncTracker};

/// Shares the tracker between watch tasks and publishes each change of the summary.
#[derive(Clone)]
pub(crate) struct SyncReporter {
    tracker: Arc<Mutex<SyncTracker>>,
    publish: Arc<status_channel::Sender<DatastoreStatus>>,
}

impl SyncReporter {
    pub(crate) fn new(api_url: &str) -> (SyncReporter, status_channel::Receiver<DatastoreStatus>) {
        let tracker = SyncTracker::new(api_url);
        let (tx, rx) = status_channel::channel(tracker.status());
        let reporter = SyncReporter {
            tracker: Arc::new(Mutex::new(tracker)),
            publish: Arc::new(tx),
        };
        (reporter, rx)
    }

    pub(crate) fn register(&self, name: &'static str) {
        self.update(|t| t.register(name));
    }

    pub(crate) fn seal(&self) {
        self.update(SyncTracker::seal);
    }

    fn observe(&self, name: &'static str, observation: Observation) {
        self.update(|t| t.observe(name, observation));
    }

    fn update(&self, f: impl FnOnce(&mut SyncTracker)) {
        let mut tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut tracker);
        let status = tracker.status();
        self.publish.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

/// Runs the watch of `name` forever, applying events to `writer` after `trim` has dropped
/// fields nobody reads (to keep the daemon's memory small on big clusters).
pub(crate) async fn run<K>(
    name: &'static str,
    api: Api<K>,
    mut writer: Writer<K>,
    trim: fn(&mut K),
    reporter: SyncReporter,
    changes: Arc<status_channel::Sender<u64>>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        let mut stream = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
        let failure = loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    let event = event.modify(trim);
                    writer.apply_watcher_event(&event);
                    match event {
                        Event::Init => {}
                        Event::InitDone => {
                            backoff.reset();
                            tracing::info!(
                                watch = name,
                                objects = writer.as_reader().len(),
                                "listed"
                            );
                            reporter.observe(name, Observation::ListDone);
                            changes.send_modify(|g| *g += 1);
                        }
                        Event::InitApply(_) => reporter.observe(name, Observation::Data),
                        Event::Apply(_) | Event::Delete(_) => {
                            reporter.observe(name, Observation::Data);
                            // Readers (the calculation) wake on this; a list wakes them once.
                            changes.send_modify(|g| *g += 1);
                        }
                    }
                }
                // 410 Gone: our resource version was compacted away. Routine on long watches,
                // the server is fine: relist at once without reporting a failure.
                Some(Err(watcher::Error::WatchError(status))) if status.code == 410 => {
                    tracing::info!(watch = name, "resource version expired; relisting");
                    break None;
                }
                Some(Err(e)) => break Some(describe(&e)),
                None => break Some("watch stream ended".to_owned()),
            }
        };
        // Relisting from scratch after any failure gives a clear signal (InitDone) that the
        // watch works again; the store keeps serving the old objects meanwhile.
        drop(stream);
        let Some(failure) = failure else {
            continue;
        };
        let delay = backoff.next_delay(rand::random::<f64>());
        tracing::warn!(watch = name, error = %failure, retry_in_ms = delay.as_millis() as u64, "watch failed");
        reporter.observe(name, Observation::Failed(failure));
        tokio::time::sleep(delay).await;
    }
}

/// A watch failure in one line: what failed, and the API server's own words when it answered.
fn describe(e: &watcher::Error) -> String {
    let (what, source) = match e {
        watcher::Error::InitialListFailed(source) => ("list failed", source),
        watcher::Error::WatchStartFailed(source) => ("starting the watch failed", source),
        watcher::Error::WatchFailed(source) => ("watch stream failed", source),
        watcher::Error::WatchError(status) => {
            return format!("watch ended: {}", status_text(status));
        }
        watcher::Error::NoResourceVersion => return e.to_string(),
    };
    match source {
        kube::Error::Api(status) => format!("{what}: {}", status_text(status)),
        other => format!("{what}: {}", error_chain(other)),
    }
}

fn status_text(status: &kube::core::Status) -> String {
    format!("{} {}: {}", status.code, status.reason, status.message)
}

/// An error with all its sources, skipping a source whose text the message already holds.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn error_chain_names_every_cause_once() {
        let e = Outer(Middle(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        assert_eq!(error_chain(&e), "outer: middle: connection refused");
    }
}
