//! Sync state of the datastore's watches, sans-IO: which watches have listed their objects,
//! which are failing and why, and the retry delay after a failure. The watch tasks feed
//! observations in; the daemon turns the summary into readiness and metrics.

use std::time::Duration;

/// What a watch task saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The API server answered with objects or changes.
    Data,
    /// A full list finished: the watch's store holds every object.
    ListDone,
    /// The watch failed; the text says why.
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Health {
    Connecting,
    Up,
    Down(String),
}

#[derive(Clone, Debug)]
struct WatchState {
    name: &'static str,
    listed_once: bool,
    health: Health,
}

/// Summary of all watches, as the daemon reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatastoreStatus {
    /// No watch is failing and each has heard from the API server.
    pub connected: bool,
    /// Every watch has listed its objects at least once.
    pub synced: bool,
    /// Why the datastore is not usable (None when connected and synced).
    pub problem: Option<String>,
}

impl DatastoreStatus {
    pub fn is_ready(&self) -> bool {
        self.problem.is_none()
    }
}

/// Tracks every watch of the datastore. `seal` once all watches are registered, so that
/// the first watch to finish its list does not count as "all synced".
#[derive(Clone, Debug)]
pub struct SyncTracker {
    api_url: String,
    watches: Vec<WatchState>,
    sealed: bool,
}

impl SyncTracker {
    /// `api_url` names the API server in the reasons.
    pub fn new(api_url: &str) -> SyncTracker {
        SyncTracker {
            api_url: api_url.to_owned(),
            watches: Vec::new(),
            sealed: false,
        }
    }

    pub fn register(&mut self, name: &'static str) {
        self.watches.push(WatchState {
            name,
            listed_once: false,
            health: Health::Connecting,
        });
    }

    pub fn seal(&mut self) {
        self.sealed = true;
    }

    pub fn observe(&mut self, name: &str, observation: Observation) {
        let Some(w) = self.watches.iter_mut().find(|w| w.name == name) else {
            return;
        };
        match observation {
            Observation::Data => w.health = Health::Up,
            Observation::ListDone => {
                w.health = Health::Up;
                w.listed_once = true;
            }
            Observation::Failed(reason) => w.health = Health::Down(reason),
        }
    }

    pub fn status(&self) -> DatastoreStatus {
        let failures = self.failures();
        let connected =
            !self.watches.is_empty() && self.watches.iter().all(|w| w.health == Health::Up);
        let synced =
            self.sealed && !self.watches.is_empty() && self.watches.iter().all(|w| w.listed_once);
        let problem = if !synced {
            let detail = failures.unwrap_or_else(|| {
                let waiting: Vec<&str> = self
                    .watches
                    .iter()
                    .filter(|w| !w.listed_once)
                    .map(|w| w.name)
                    .collect();
                format!(
                    "waiting for the first full list of {} from {}",
                    waiting.join(", "),
                    self.api_url
                )
            });
            Some(format!("datastore not synced: {detail}"))
        } else {
            failures.map(|f| format!("datastore disconnected: {f}"))
        };
        DatastoreStatus {
            connected,
            synced,
            problem,
        }
    }

    /// Failing watches, those with the same error named together (they usually share a cause).
    fn failures(&self) -> Option<String> {
        let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
        for w in &self.watches {
            if let Health::Down(error) = &w.health {
                match groups.iter_mut().find(|(e, _)| *e == error.as_str()) {
                    Some((_, names)) => names.push(w.name),
                    None => groups.push((error, vec![w.name])),
                }
            }
        }
        if groups.is_empty() {
            return None;
        }
        let parts: Vec<String> = groups
            .iter()
            .map(|(error, names)| {
                format!("watching {} on {}: {error}", names.join(", "), self.api_url)
            })
            .collect();
        Some(parts.join("; "))
    }
}

/// Exponential retry delay with jitter, reset once a watch has listed again.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next delay; `jitter` in [0, 1) spreads retries of many nodes by ±20 %.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> SyncTracker {
        let mut t = SyncTracker::new("https://127.0.0.1:1");
        t.register("nodes");
        t.register("ippools");
        t.seal();
        t
    }

    #[test]
    fn synced_only_after_every_watch_listed() {
        let mut t = tracker();
        let s = t.status();
        assert!(!s.synced && !s.connected);
        assert_eq!(
            s.problem.as_deref(),
            Some(
                "datastore not synced: waiting for the first full list of nodes, ippools \
                 from https://127.0.0.1:1"
            )
        );
        t.observe("nodes", Observation::ListDone);
        assert!(!t.status().synced);
        t.observe("ippools", Observation::Data);
        assert!(!t.status().synced, "objects alone are not a full list");
        t.observe("ippools", Observation::ListDone);
        assert_eq!(
            t.status(),
            DatastoreStatus {
                connected: true,
                synced: true,
                problem: None
            }
        );
    }

    #[test]
    fn failure_before_sync_explains_itself() {
        let mut t = tracker();
        t.observe("nodes", Observation::Failed("connection refused".into()));
        t.observe("ippools", Observation::Failed("connection refused".into()));
        let s = t.status();
        assert!(!s.connected && !s.synced);
        assert_eq!(
            s.problem.as_deref(),
            Some(
                "datastore not synced: watching nodes, ippools on https://127.0.0.1:1: \
                 connection refused"
            )
        );
        t.observe("ippools", Observation::Failed("403 forbidden".into()));
        assert_eq!(
            t.status().problem.as_deref(),
            Some(
                "datastore not synced: watching nodes on https://127.0.0.1:1: connection \
                 refused; watching ippools on https://127.0.0.1:1: 403 forbidden"
            )
        );
    }

    #[test]
    fn failure_after_sync_disconnects_until_data_flows_again() {
        let mut t = tracker();
        t.observe("nodes", Observation::ListDone);
        t.observe("ippools", Observation::ListDone);
        t.observe("ippools", Observation::Failed("reset".into()));
        let s = t.status();
        assert!(s.synced && !s.connected);
        assert_eq!(
            s.problem.as_deref(),
            Some("datastore disconnected: watching ippools on https://127.0.0.1:1: reset")
        );
        t.observe("ippools", Observation::Data);
        assert!(t.status().is_ready());
    }

    #[test]
    fn unsealed_tracker_is_never_synced() {
        let mut t = SyncTracker::new("https://api");
        t.register("nodes");
        t.observe("nodes", Observation::ListDone);
        assert!(!t.status().synced);
        t.seal();
        assert!(t.status().synced);
    }

    #[test]
    fn unknown_watch_names_are_ignored() {
        let mut t = tracker();
        t.observe("pods", Observation::ListDone);
        assert!(!t.status().synced);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
        let delays: Vec<u128> = (0..6).map(|_| b.next_delay(0.5).as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_delay(0.5), Duration::from_millis(250));
    }

    #[test]
    fn backoff_jitter_stays_within_twenty_percent() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(800));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(1200));
        assert_eq!(b.next_delay(7.0), Duration::from_millis(1200));
    }
}
