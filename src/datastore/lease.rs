//! Leader election for the cluster-wide jobs (leaked-address GC, releasing deleted nodes'
//! blocks, the `ipam_*` metrics) through a `coordination.k8s.io/v1` Lease. The decision
//! (acquire, renew, wait) is pure and takes the time as input; `LeaderElector` does the I/O.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Where the Lease lives by default: every cluster has `kube-system`, and the DaemonSet's
/// service account needs `get`, `create` and `update` on this one Lease there.
pub const DEFAULT_NAMESPACE: &str = "kube-system";
pub const DEFAULT_NAME: &str = "tortie-ipam-leader";

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "lease timings for {namespace}/{name} must satisfy 0 < retry ({retry:?}) and \
         0 < renew ({renew:?}) < renew deadline ({deadline:?}) < lease duration ({duration:?}); \
         the duration is whole seconds ≥ 1"
    )]
    Timings {
        namespace: String,
        name: String,
        retry: Duration,
        renew: Duration,
        deadline: Duration,
        duration: Duration,
    },
    #[error("lease holder identity must not be empty")]
    EmptyIdentity,
    #[error("{action} lease {namespace}/{name}: {source}")]
    Api {
        action: &'static str,
        namespace: String,
        name: String,
        source: Box<kube::Error>,
    },
    #[error("{action} lease {namespace}/{name}: no answer within {timeout:?}")]
    Timeout {
        action: &'static str,
        namespace: String,
        name: String,
        timeout: Duration,
    },
}

/// Settings of one election. Defaults follow client-go: 15 s lease, 10 s renew deadline,
/// 2 s retry; the holder renews every 5 s so two renewals can fail before it steps down.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// The holder identity written to the Lease: the node name.
    pub identity: String,
    /// How long a Lease stays valid after its last renewal (`leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// The holder steps down when it has not renewed for this long. Being shorter than
    /// `lease_duration` is what keeps two leaders from overlapping.
    pub renew_deadline: Duration,
    /// How often the holder renews.
    pub renew_period: Duration,
    /// How often a non-holder (or a holder whose renewal failed) tries again.
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(identity: impl Into<String>) -> LeaseConfig {
        LeaseConfig {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            name: DEFAULT_NAME.to_owned(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_period: Duration::from_secs(5),
            retry_period: Duration::from_secs(2),
        }
    }

    pub fn validate(&self) -> Result<(), LeaseError> {
        if self.identity.is_empty() {
            return Err(LeaseError::EmptyIdentity);
        }
        let whole_seconds = self.lease_duration.subsec_nanos() == 0;
        let ordered = !self.retry_period.is_zero()
            && !self.renew_period.is_zero()
            && self.renew_period < self.renew_deadline
            && self.renew_deadline < self.lease_duration;
        if whole_seconds && ordered && self.lease_duration >= Duration::from_secs(1) {
            return Ok(());
        }
        Err(LeaseError::Timings {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            retry: self.retry_period,
            renew: self.renew_period,
            deadline: self.renew_deadline,
            duration: self.lease_duration,
        })
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// What to do with the Lease as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease object exists: create it with us as holder.
    Create,
    /// Nobody holds a valid lease: take it over (a new term, `leaseTransitions` + 1).
    Acquire,
    /// We hold it: extend it.
    Renew,
    /// Someone else holds a valid lease.
    Wait { holder: String },
}

/// Decides from the Lease's spec (None: no object) and the current time. A lease is expired
/// when `renewTime + leaseDurationSeconds` lies in the past; a missing holder (released)
/// or missing times count as expired. This trusts the clocks of the nodes to agree within
/// `lease_duration - renew_deadline`, as client-go's Lease lock does with its renewTime.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == identity {
        return Decision::Renew;
    }
    let valid = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(MicroTime(renewed)), Some(secs)) => {
            now.duration_since(*renewed) <= SignedDuration::from_secs(i64::from(secs))
        }
        _ => false,
    };
    if valid {
        Decision::Wait {
            holder: holder.to_owned(),
        }
    } else {
        Decision::Acquire
    }
}

/// The spec to write for a Create, Acquire or Renew decision; None for Wait.
pub fn next_spec(
    decision: &Decision,
    current: Option<&LeaseSpec>,
    cfg: &LeaseConfig,
    now: Timestamp,
) -> Option<LeaseSpec> {
    let mut spec = current.cloned().unwrap_or_default();
    match decision {
        Decision::Wait { .. } => return None,
        Decision::Create => {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(0);
        }
        Decision::Acquire => {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        Decision::Renew => {}
    }
    spec.holder_identity = Some(cfg.identity.clone());
    spec.lease_duration_seconds = Some(cfg.duration_seconds());
    spec.renew_time = Some(MicroTime(now));
    Some(spec)
}

/// The spec that gives the lease up: no holder, so the next reader acquires at once.
pub fn released_spec(current: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(MicroTime(now)),
        ..current.clone()
    }
}

/// A running election: `is_leader` follows our leadership; `stopped()` waits for the
/// voluntary release after shutdown.
pub struct Election {
    pub is_leader: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Election {
    /// Waits until the election loop has ended (after shutdown, the lease is released).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }

    /// Ends the loop without releasing the lease, as a crash would (tests, fast exit).
    /// `is_leader` then keeps its last value: stop reading it.
    pub fn abort(&self) {
        self.task.abort();
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Result<LeaderElector, LeaseError> {
        cfg.validate()?;
        Ok(LeaderElector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        })
    }

    /// Starts the election loop. It runs until `shutdown` turns true (or its sender goes),
    /// then steps down and releases the lease if it held it.
    pub fn run(self, shutdown: watch::Receiver<bool>) -> Election {
        let (tx, is_leader) = watch::channel(false);
        let task = tokio::spawn(self.run_loop(tx, shutdown));
        Election { is_leader, task }
    }

    async fn run_loop(self, leader: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let cfg = &self.cfg;
        // While we lead: the instant by which the next successful renewal must have started.
        let mut valid_until: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let started = Instant::now();
            let attempt = self.attempt(Timestamp::now());
            // A slow API server must not stretch a term: the attempt ends at the deadline.
            let outcome = match valid_until {
                Some(deadline) => tokio::time::timeout_at(deadline, attempt)
                    .await
                    .unwrap_or_else(|_| Err(self.timeout("renewing", cfg.renew_deadline))),
                None => attempt.await,
            };
            let holding = matches!(outcome, Ok(true));
            match outcome {
                Ok(true) => {
                    valid_until = Some(started + cfg.renew_deadline);
                    set(&leader, true, cfg);
                }
                Ok(false) => {
                    valid_until = None;
                    set(&leader, false, cfg);
                }
                Err(e) => {
                    tracing::warn!(error = %e, identity = %cfg.identity, "lease attempt failed");
                }
            }
            step_down_if_late(&mut valid_until, &leader, cfg);
            let period = if holding {
                cfg.renew_period
            } else {
                cfg.retry_period
            };
            let mut wake = started + period;
            if let Some(deadline) = valid_until {
                wake = wake.min(deadline);
            }
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                () = tokio::time::sleep_until(wake) => {}
            }
            step_down_if_late(&mut valid_until, &leader, cfg);
        }
        let held = *leader.borrow() && valid_until.is_some();
        // Stop acting as leader before the lease is given up, never after.
        set(&leader, false, cfg);
        if held && let Err(e) = self.release().await {
            tracing::warn!(error = %e, identity = %cfg.identity, "releasing lease failed; it expires on its own");
        }
    }

    /// One read-decide-write round; true when we hold the lease afterwards. A lost
    /// compare-and-swap (409) is re-read once within the same round.
    async fn attempt(&self, now: Timestamp) -> Result<bool, LeaseError> {
        for _ in 0..2 {
            let current = self
                .call("reading", self.api.get_opt(&self.cfg.name))
                .await?;
            let spec = current.as_ref().map(|l| l.spec.clone().unwrap_or_default());
            let decision = decide(spec.as_ref(), &self.cfg.identity, now);
            let Some(next) = next_spec(&decision, spec.as_ref(), &self.cfg, now) else {
                return Ok(false);
            };
            let written = match current {
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(self.cfg.name.clone()),
                            namespace: Some(self.cfg.namespace.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(next),
                    };
                    let pp = PostParams::default();
                    self.call("creating", self.api.create(&pp, &lease)).await
                }
                Some(mut lease) => {
                    lease.spec = Some(next);
                    let pp = PostParams::default();
                    self.call("updating", self.api.replace(&self.cfg.name, &pp, &lease))
                        .await
                }
            };
            match written {
                Ok(_) => {
                    if decision != Decision::Renew {
                        tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.name, ?decision, "acquired lease");
                    }
                    return Ok(true);
                }
                Err(LeaseError::Api { ref source, .. }) if lost_race(source) => {
                    tracing::debug!(identity = %self.cfg.identity, "lease changed under us; re-reading");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    async fn release(&self) -> Result<(), LeaseError> {
        let Some(mut lease) = self
            .call("reading", self.api.get_opt(&self.cfg.name))
            .await?
        else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(()); // someone else took it meanwhile: nothing of ours to give up
        }
        lease.spec = Some(released_spec(&spec, Timestamp::now()));
        let pp = PostParams::default();
        match self
            .call("releasing", self.api.replace(&self.cfg.name, &pp, &lease))
            .await
        {
            Ok(_) => {
                tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.name, "released lease");
                Ok(())
            }
            // Changed since we read it: it is no longer ours to release.
            Err(LeaseError::Api { ref source, .. }) if lost_race(source) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn timeout(&self, action: &'static str, timeout: Duration) -> LeaseError {
        LeaseError::Timeout {
            action,
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.name.clone(),
            timeout,
        }
    }

    /// One API call bounded by the retry period, so a hanging server cannot stretch a term.
    async fn call<T>(
        &self,
        action: &'static str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, LeaseError> {
        let timeout = self.cfg.retry_period.max(Duration::from_secs(1));
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(LeaseError::Api {
                action,
                namespace: self.cfg.namespace.clone(),
                name: self.cfg.name.clone(),
                source: Box::new(source),
            }),
            Err(_) => Err(self.timeout(action, timeout)),
        }
    }
}

/// 409: another writer changed the Lease (Conflict) or created it first (AlreadyExists).
fn lost_race(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Steps down once the renew deadline has passed, before anyone else may take over.
fn step_down_if_late(
    valid_until: &mut Option<Instant>,
    leader: &watch::Sender<bool>,
    cfg: &LeaseConfig,
) {
    if valid_until.is_some_and(|deadline| Instant::now() >= deadline) {
        tracing::warn!(
            identity = %cfg.identity,
            deadline_ms = cfg.renew_deadline.as_millis() as u64,
            "lease not renewed within the renew deadline; stepping down"
        );
        *valid_until = None;
        set(leader, false, cfg);
    }
}

fn set(leader: &watch::Sender<bool>, value: bool, cfg: &LeaseConfig) {
    let changed = leader.send_if_modified(|current| {
        let changed = *current != value;
        *current = value;
        changed
    });
    if changed {
        tracing::info!(identity = %cfg.identity, lease = %cfg.name, is_leader = value, "leadership changed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn held_by(holder: &str, renewed: i64, duration: i32, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            renew_time: Some(MicroTime(at(renewed))),
            acquire_time: Some(MicroTime(at(0))),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn missing_lease_is_created_with_zero_transitions() {
        let cfg = LeaseConfig::new("node-a");
        let d = decide(None, "node-a", at(5));
        assert_eq!(d, Decision::Create);
        let spec = next_spec(&d, None, &cfg, at(5)).unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("node-a"));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.renew_time, Some(MicroTime(at(5))));
    }

    #[test]
    fn valid_lease_of_another_holder_means_wait() {
        let spec = held_by("node-b", 0, 15, 3);
        assert_eq!(
            decide(Some(&spec), "node-a", at(15)),
            Decision::Wait {
                holder: "node-b".into()
            }
        );
    }

    #[test]
    fn expired_lease_is_taken_over_and_counts_a_transition() {
        let cfg = LeaseConfig::new("node-a");
        let spec = held_by("node-b", 0, 15, 3);
        let d = decide(Some(&spec), "node-a", at(16));
        assert_eq!(d, Decision::Acquire);
        let next = next_spec(&d, Some(&spec), &cfg, at(16)).unwrap();
        assert_eq!(next.holder_identity.as_deref(), Some("node-a"));
        assert_eq!(next.lease_transitions, Some(4));
        assert_eq!(next.acquire_time, Some(MicroTime(at(16))));
    }

    #[test]
    fn own_lease_is_renewed_without_a_transition() {
        let cfg = LeaseConfig::new("node-a");
        let spec = held_by("node-a", 0, 15, 3);
        // Even when late: the holder renewing its own expired lease is not a new term
        // unless someone else took it, which the write's compare-and-swap detects.
        for now in [at(1), at(30)] {
            let d = decide(Some(&spec), "node-a", now);
            assert_eq!(d, Decision::Renew);
            let next = next_spec(&d, Some(&spec), &cfg, now).unwrap();
            assert_eq!(next.lease_transitions, Some(3));
            assert_eq!(next.acquire_time, Some(MicroTime(at(0))));
            assert_eq!(next.renew_time, Some(MicroTime(now)));
        }
    }

    #[test]
    fn released_lease_is_acquired_at_once() {
        let spec = released_spec(&held_by("node-b", 0, 15, 2), at(1));
        assert_eq!(spec.holder_identity, None);
        assert_eq!(decide(Some(&spec), "node-a", at(1)), Decision::Acquire);
    }

    #[test]
    fn lease_without_times_counts_as_expired() {
        let spec = LeaseSpec {
            holder_identity: Some("node-b".into()),
            ..LeaseSpec::default()
        };
        assert_eq!(decide(Some(&spec), "node-a", at(0)), Decision::Acquire);
    }

    #[test]
    fn timings_that_allow_overlap_are_rejected() {
        let mut cfg = LeaseConfig::new("node-a");
        assert!(cfg.validate().is_ok());
        cfg.renew_deadline = cfg.lease_duration;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("kube-system/tortie-ipam-leader"), "{err}");
        let mut cfg = LeaseConfig::new("");
        cfg.lease_duration = Duration::from_secs(15);
        assert!(matches!(cfg.validate(), Err(LeaseError::EmptyIdentity)));
    }
}
