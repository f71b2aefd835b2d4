// Leader election over a coordination.k8s.io Lease against the real API server: one leader
// among several electors, fail-over after a crash within the lease duration, immediate
// hand-over on graceful release, and never two leaders when writes race.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use support::ControlPlane;
use tokio::sync::watch;
use tortie::datastore::lease::{DEFAULT_NAMESPACE, Election, LeaderElector, LeaseConfig};

const LEASE: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_millis(200);

fn config(lease: &str, identity: &str) -> LeaseConfig {
    LeaseConfig {
        name: lease.to_owned(),
        lease_duration: LEASE,
        renew_deadline: Duration::from_secs(2),
        renew_period: Duration::from_millis(500),
        retry_period: RETRY,
        ..LeaseConfig::new(identity)
    }
}

struct Member {
    identity: String,
    election: Election,
    stop: watch::Sender<bool>,
}

impl Member {
    fn start(client: Client, cfg: LeaseConfig) -> Member {
        let (stop, shutdown) = watch::channel(false);
        let identity = cfg.identity.clone();
        let election = LeaderElector::new(client, cfg)
            .expect("valid config")
            .run(shutdown);
        Member {
            identity,
            election,
            stop,
        }
    }

    fn is_leader(&self) -> bool {
        *self.election.is_leader.borrow()
    }

    /// Graceful: steps down and releases the lease.
    async fn shut_down(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.election.stopped())
            .await
            .expect("elector stops within 5 s");
    }
}

/// Each elector gets its own client (own connection), as separate daemons would.
async fn members(cp: &ControlPlane, lease: &str, ids: &[&str]) -> anyhow::Result<Vec<Member>> {
    let mut out = Vec::new();
    for id in ids {
        let client = cp
            .client_for(&format!("elector-{id}"), &["system:masters"])
            .await?;
        out.push((client, config(lease, id)));
    }
    // Started together, so their first reads and writes race.
    Ok(out
        .into_iter()
        .map(|(c, cfg)| Member::start(c, cfg))
        .collect())
}

fn leaders(members: &[Member]) -> Vec<usize> {
    (0..members.len())
        .filter(|i| members[*i].is_leader())
        .collect()
}

/// Waits for exactly one leader, failing on any (persistent) double leadership meanwhile.
async fn sole_leader(members: &[Member], within: Duration) -> usize {
    let start = Instant::now();
    loop {
        assert_no_double_leader(members);
        if let [one] = leaders(members)[..] {
            return one;
        }
        assert!(
            start.elapsed() < within,
            "no single leader within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Two snapshots microseconds apart both showing the same two leaders: a real overlap
/// (a hand-over in between would show in the second snapshot).
fn assert_no_double_leader(members: &[Member]) {
    let first = leaders(members);
    if first.len() > 1 {
        let again = leaders(members);
        let both: Vec<&str> = again
            .iter()
            .filter(|i| first.contains(i))
            .map(|i| members[*i].identity.as_str())
            .collect();
        assert!(both.len() < 2, "two leaders at once: {both:?}");
    }
}

/// Watches the channels for `period`, asserting there is never more than one leader.
async fn observe(members: &[Member], period: Duration) {
    let start = Instant::now();
    while start.elapsed() < period {
        assert_no_double_leader(members);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn lease_spec(cp: &ControlPlane, name: &str) -> LeaseSpec {
    let api: Api<Lease> = Api::namespaced(cp.client(), DEFAULT_NAMESPACE);
    api.get(name).await.unwrap().spec.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_fails_over_after_a_crash_and_hands_over_on_release() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let lease = "tortie-ipam-leader";
    let mut group = members(&cp, lease, &["node-a", "node-b", "node-c"]).await?;

    let first = sole_leader(&group, Duration::from_secs(5)).await;
    observe(&group, Duration::from_secs(2)).await;
    assert_eq!(
        leaders(&group),
        [first],
        "leadership must be stable while renewed"
    );
    let spec = lease_spec(&cp, lease).await;
    assert_eq!(
        spec.holder_identity.as_deref(),
        Some(group[first].identity.as_str())
    );
    assert_eq!(spec.lease_transitions, Some(0));
    assert_eq!(spec.lease_duration_seconds, Some(3));

    // Crash: no release. The others must wait for expiry, then one takes over.
    let crashed = group.remove(first);
    crashed.election.abort();
    let crash = Instant::now();
    let second = sole_leader(&group, LEASE + RETRY + Duration::from_secs(2)).await;
    let takeover = crash.elapsed();
    eprintln!("takeover after crash: {takeover:?}");
    // The last renewal was at most one renew period (0.5 s) before the crash.
    assert!(
        takeover >= Duration::from_millis(2400),
        "took over before expiry: {takeover:?}"
    );
    let spec = lease_spec(&cp, lease).await;
    assert_eq!(
        spec.holder_identity.as_deref(),
        Some(group[second].identity.as_str())
    );
    assert_eq!(spec.lease_transitions, Some(1));

    // Graceful shutdown: released, so the last one takes over long before expiry.
    let leaving = group.remove(second);
    let release = Instant::now();
    leaving.shut_down().await;
    let third = sole_leader(&group, LEASE).await;
    let handover = release.elapsed();
    eprintln!("hand-over after release: {handover:?}");
    assert!(
        handover < Duration::from_millis(1500),
        "release not used: {handover:?}"
    );
    let spec = lease_spec(&cp, lease).await;
    assert_eq!(
        spec.holder_identity.as_deref(),
        Some(group[third].identity.as_str())
    );
    assert_eq!(spec.lease_transitions, Some(2));

    group.remove(third).shut_down().await;
    let spec = lease_spec(&cp, lease).await;
    assert_eq!(spec.holder_identity, None, "released lease has no holder");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writes_never_make_two_leaders() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let api: Api<Lease> = Api::namespaced(cp.client(), DEFAULT_NAMESPACE);
    let ids = ["n1", "n2", "n3", "n4", "n5"];
    for round in 0..4 {
        // An expired lease of a departed holder: every elector reads it as free and writes
        // with the same resourceVersion, so all but one of the writes must conflict.
        let lease = format!("race-{round}");
        let expired = Lease {
            metadata: ObjectMeta {
                name: Some(lease.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("ghost".into()),
                lease_duration_seconds: Some(1),
                renew_time: Some(MicroTime(Timestamp::from_second(1_700_000_000)?)),
                lease_transitions: Some(7),
                ..Default::default()
            }),
        };
        api.create(&PostParams::default(), &expired).await?;
        let mut group = members(&cp, &lease, &ids).await?;
        let winner = sole_leader(&group, Duration::from_secs(5)).await;
        observe(&group, Duration::from_secs(1)).await;
        let spec = lease_spec(&cp, &lease).await;
        assert_eq!(
            spec.holder_identity.as_deref(),
            Some(group[winner].identity.as_str())
        );
        assert_eq!(
            spec.lease_transitions,
            Some(8),
            "exactly one takeover from the ghost"
        );

        // The others poll in step (started together), so they race for the released lease.
        let leaving = group.remove(winner);
        leaving.shut_down().await;
        let next = sole_leader(&group, Duration::from_secs(2)).await;
        observe(&group, Duration::from_secs(1)).await;
        let spec = lease_spec(&cp, &lease).await;
        assert_eq!(
            spec.holder_identity.as_deref(),
            Some(group[next].identity.as_str())
        );
        assert_eq!(
            spec.lease_transitions,
            Some(9),
            "exactly one takeover after release"
        );
        for m in group {
            m.shut_down().await;
        }
    }
    Ok(())
}

/// Resumes the stopped API server even when the test fails.
struct Resume(nix::unistd::Pid);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_cut_off_from_the_api_server_steps_down_before_expiry() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let lease = "tortie-ipam-leader";
    let group = members(&cp, lease, &["node-a", "node-b"]).await?;
    let leader = sole_leader(&group, Duration::from_secs(5)).await;
    // Let a renewal land, then freeze the API server: every call now hangs.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let renewed = lease_spec(&cp, lease).await.renew_time.unwrap().0;
    let apiserver = nix::unistd::Pid::from_raw(i32::try_from(cp.pids()[1])?);
    nix::sys::signal::kill(apiserver, nix::sys::signal::Signal::SIGSTOP)?;
    let resume = Resume(apiserver);
    let start = Instant::now();
    while group[leader].is_leader() {
        assert!(
            start.elapsed() < LEASE,
            "still leader after the lease could expire"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A renewal may have landed after `renewed` was read, so the true last renewal is no
    // earlier: stepping down within one lease duration of `renewed` is the safe bound.
    let term = Timestamp::now().duration_since(renewed);
    eprintln!("stepped down {term:?} after the last renewal read");
    assert!(
        term < k8s_openapi::jiff::SignedDuration::try_from(LEASE)?,
        "{term:?}"
    );
    assert!(
        leaders(&group).is_empty(),
        "nobody can renew while the server is frozen"
    );
    drop(resume);
    let again = sole_leader(&group, LEASE + Duration::from_secs(3)).await;
    eprintln!(
        "leader after the API server resumed: {}",
        group[again].identity
    );
    for m in group {
        m.shut_down().await;
    }
    Ok(())
}
