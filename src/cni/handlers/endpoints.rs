//! The pods this node's CNI is creating or has created (namespace, name, host interface,
//! allocated IPs), and the handshake that lets an ADD answer only once the policy driver
//! committed a table that includes its pod. Pod status has no IP while ADD runs, so the
//! policy calculation takes local pods' addresses from here.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

/// One pod this node plumbed.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalEndpoint {
    pub namespace: String,
    pub pod: String,
    /// The sandbox that holds it: a DEL of an older sandbox leaves the entry alone.
    pub container: String,
    /// Host-side interface (`cali…`).
    pub interface: String,
    pub ips: Vec<IpAddr>,
    /// The Pod as ADD read it (API or cache): stands in while the daemon's Pod store has
    /// not seen the pod yet; the store's copy wins once it has (labels may change).
    pub object: Option<Arc<Pod>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyWaitError {
    #[error(
        "network policy for pod {pod} was not in the kernel within {waited_ms} ms (last policy apply: {last})"
    )]
    Timeout {
        pod: String,
        waited_ms: u128,
        last: String,
    },
    #[error("network policy for pod {pod}: the policy driver stopped")]
    Stopped { pod: String },
}

/// How long ADD's copy of a pod may stand in for the Pod store's: the watch delivers a new
/// pod within moments, and a pod deleted without a DEL (runtime gone) must not linger.
const STAND_IN: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Entries {
    generation: u64,
    /// Each entry with when it was registered.
    by_pod: BTreeMap<(String, String), (LocalEndpoint, Instant)>,
}

/// What the driver last did: the registry generation its last committed table included,
/// and its last failure (for the ADD's error message).
#[derive(Debug, Clone, Default, PartialEq)]
struct Committed {
    generation: u64,
    last_error: Option<String>,
}

/// Shared by the CNI handlers (writers) and the policy driver (reader and committer).
pub struct LocalEndpoints {
    entries: Mutex<Entries>,
    /// Bumped with every register/remove: the driver wakes on it.
    changed: watch::Sender<u64>,
    committed: watch::Sender<Committed>,
}

impl Default for LocalEndpoints {
    fn default() -> Self {
        LocalEndpoints {
            entries: Mutex::new(Entries::default()),
            changed: watch::channel(0).0,
            committed: watch::channel(Committed::default()).0,
        }
    }
}

impl LocalEndpoints {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds or replaces the pod's entry; returns the generation a table must include.
    pub fn register(&self, ep: LocalEndpoint) -> u64 {
        let mut e = self.lock();
        e.generation += 1;
        e.by_pod
            .insert((ep.namespace.clone(), ep.pod.clone()), (ep, Instant::now()));
        let g = e.generation;
        self.changed.send_replace(g);
        g
    }

    /// Forgets the pod if `container` holds it (DEL, or a failed ADD).
    pub fn remove(&self, namespace: &str, pod: &str, container: &str) {
        let mut e = self.lock();
        let key = (namespace.to_string(), pod.to_string());
        if e.by_pod
            .get(&key)
            .is_some_and(|(ep, _)| ep.container == container)
        {
            e.by_pod.remove(&key);
            e.generation += 1;
            self.changed.send_replace(e.generation);
        }
    }

    /// Forgets whatever pod `container` holds (GC of an attachment the runtime no longer
    /// lists: no DEL will come for it).
    pub fn forget_container(&self, container: &str) {
        let mut e = self.lock();
        let before = e.by_pod.len();
        e.by_pod.retain(|_, (ep, _)| ep.container != container);
        if e.by_pod.len() != before {
            e.generation += 1;
            self.changed.send_replace(e.generation);
        }
    }

    /// The entries and the generation they make up.
    pub fn snapshot(&self) -> (u64, Vec<LocalEndpoint>) {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> (u64, Vec<LocalEndpoint>) {
        let e = self.lock();
        let entries = e
            .by_pod
            .values()
            .map(|(ep, at)| {
                let mut ep = ep.clone();
                if now.saturating_duration_since(*at) > STAND_IN {
                    ep.object = None;
                }
                ep
            })
            .collect();
        (e.generation, entries)
    }

    /// Wakes on every register/remove.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The driver committed a table built from the snapshot of `generation`.
    pub fn committed(&self, generation: u64) {
        self.committed.send_modify(|c| {
            c.generation = c.generation.max(generation);
            c.last_error = None;
        });
    }

    /// The driver's pass failed; waiting ADDs keep waiting (the next pass may succeed)
    /// and name this error if they time out.
    pub fn failed(&self, error: String) {
        self.committed.send_modify(|c| c.last_error = Some(error));
    }

    /// Waits until a table including `generation` is in the kernel, at most `timeout`.
    pub async fn wait_committed(
        &self,
        generation: u64,
        pod: &str,
        timeout: Duration,
    ) -> Result<(), PolicyWaitError> {
        let mut rx = self.committed.subscribe();
        let started = std::time::Instant::now();
        let waited = tokio::time::timeout(timeout, async {
            rx.wait_for(|c| c.generation >= generation).await.is_ok()
        })
        .await;
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(PolicyWaitError::Stopped {
                pod: pod.to_string(),
            }),
            Err(_) => Err(PolicyWaitError::Timeout {
                pod: pod.to_string(),
                waited_ms: started.elapsed().as_millis(),
                last: rx
                    .borrow()
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no failure reported; still computing".into()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(pod: &str, ip: &str) -> LocalEndpoint {
        LocalEndpoint {
            namespace: "default".into(),
            pod: pod.into(),
            container: format!("c-{pod}"),
            interface: format!("cali{pod}"),
            ips: vec![ip.parse().expect("ip")],
            object: None,
        }
    }

    #[tokio::test]
    async fn an_add_waits_for_a_commit_that_includes_its_generation() {
        let r = Arc::new(LocalEndpoints::default());
        let g1 = r.register(ep("a", "10.0.0.1"));
        let g2 = r.register(ep("b", "10.0.0.2"));
        assert!(g2 > g1);
        let (g, eps) = r.snapshot();
        assert_eq!((g, eps.len()), (g2, 2));
        // A commit of the older snapshot does not release the newer ADD.
        r.committed(g1);
        let short = Duration::from_millis(50);
        r.failed("nft said no".into());
        let e = r.wait_committed(g2, "default/b", short).await;
        assert!(
            matches!(&e, Err(PolicyWaitError::Timeout { last, .. }) if last == "nft said no"),
            "{e:?}"
        );
        assert!(r.wait_committed(g1, "default/a", short).await.is_ok());
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move {
                r.wait_committed(g2, "default/b", Duration::from_secs(5))
                    .await
            })
        };
        r.committed(g2);
        assert!(waiter.await.expect("join").is_ok());
    }

    #[test]
    fn remove_bumps_the_generation_only_when_something_went() {
        let r = LocalEndpoints::default();
        let mut wake = r.subscribe();
        let g = r.register(ep("a", "10.0.0.1"));
        assert!(wake.has_changed().expect("open"));
        wake.borrow_and_update();
        r.remove("default", "nope", "c-nope");
        // An older sandbox of the same pod.
        r.remove("default", "a", "c-old");
        assert!(!wake.has_changed().expect("open"));
        r.remove("default", "a", "c-a");
        assert!(wake.has_changed().expect("open"));
        let (after, eps) = r.snapshot();
        assert!(after > g && eps.is_empty());
        r.register(ep("b", "10.0.0.2"));
        r.forget_container("c-b");
        assert!(r.snapshot().1.is_empty(), "GC forgets by container");
    }

    #[test]
    fn adds_copy_of_the_pod_stands_in_only_for_a_while() {
        let r = LocalEndpoints::default();
        let mut e = ep("a", "10.0.0.1");
        e.object = Some(Arc::new(Pod::default()));
        r.register(e);
        assert!(r.snapshot().1[0].object.is_some());
        let later = Instant::now() + STAND_IN + Duration::from_secs(1);
        let (_, eps) = r.snapshot_at(later);
        assert!(eps[0].object.is_none());
        assert_eq!(eps[0].ips, vec!["10.0.0.1".parse::<IpAddr>().expect("ip")]);
    }
}
