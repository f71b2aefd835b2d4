//! Health of the daemon's long-running loops, so `/readiness` and `/liveness` tell the truth:
//! every loop registers, says when it starts a unit of work and when it waits again, and
//! reports failures it keeps retrying. Readiness is revoked, naming the loop, when one ended
//! (returned or panicked), stayed busy past its stall limit, or kept failing past its grace
//! time; liveness fails when a loop marked vital stalled or any loop ended, so kubelet
//! restarts the pod. A waiting loop costs nothing: there is no heartbeat timer.
//!
//! Time comes in as an argument (`report_at`), so the rules are tested without clocks.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// How long a loop may stay busy, or a watch fail, before health says so: 30 s, or
/// `TORTIE_HEALTH_GRACE_SECONDS` (fault-injection tests shorten it).
pub fn grace() -> Duration {
    std::env::var("TORTIE_HEALTH_GRACE_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Duration::from_secs(30), Duration::from_secs)
}

/// Failures a part of the daemon reports when asked: what, since when, why.
pub type Failures = Vec<(&'static str, Instant, String)>;
type Probe = (String, Duration, Box<dyn Fn() -> Failures + Send + Sync>);

/// What a loop promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// Longest one unit of work may take; None for loops whose work has no bound.
    pub stall_after: Option<Duration>,
    /// How long a failure may last (while being retried) before readiness is revoked.
    pub fail_after: Duration,
    /// A stall of this loop fails liveness too (the calculation: nothing else can fix it).
    pub vital: bool,
    /// A one-shot job (the default pool): returning means done, and it leaves the registry;
    /// a panic is still reported.
    pub finishes: bool,
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            stall_after: Some(Duration::from_secs(30)),
            fail_after: Duration::from_secs(30),
            vital: false,
            finishes: false,
        }
    }
}

#[derive(Debug, Clone)]
struct LoopState {
    expect: Expect,
    busy_since: Option<Instant>,
    failing: Option<(Instant, String)>,
    ended: Option<String>,
    passes: u64,
}

/// All registered loops. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    loops: Arc<Mutex<BTreeMap<String, LoopState>>>,
    probes: Arc<Mutex<Vec<Probe>>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// A loop's handle on its own entry.
#[derive(Clone)]
pub struct Pulse {
    registry: Registry,
    name: String,
}

impl Registry {
    pub fn register(&self, name: impl Into<String>, expect: Expect) -> Pulse {
        let name = name.into();
        self.lock().insert(
            name.clone(),
            LoopState {
                expect,
                busy_since: None,
                failing: None,
                ended: None,
                passes: 0,
            },
        );
        Pulse {
            registry: self.clone(),
            name,
        }
    }

    /// Adds a part whose failures are asked for at each readiness probe (watches that keep
    /// their own state); one failing longer than `fail_after` revokes readiness.
    pub fn probe(
        &self,
        name: impl Into<String>,
        fail_after: Duration,
        failures: impl Fn() -> Failures + Send + Sync + 'static,
    ) {
        self.probes.lock().unwrap_or_else(|p| p.into_inner()).push((
            name.into(),
            fail_after,
            Box::new(failures),
        ));
    }

    /// Spawns `body` as the loop `name` and supervises it (see `supervise`); the returned
    /// handle ends when the supervisor has seen the loop end.
    pub fn spawn<F>(
        &self,
        name: impl Into<String>,
        expect: Expect,
        body: impl FnOnce(Pulse) -> F,
    ) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let pulse = self.register(name, expect);
        let task = tokio::spawn(body(pulse.clone()));
        self.watch(pulse, task)
    }

    /// Watches a running task as loop `name` (registered with `expect` unless it already
    /// is): a panic is logged with its message and reported, as is a return before
    /// shutdown; an abort is deliberate and reported as nothing. The handle aborts the task.
    pub fn supervise(
        &self,
        name: impl Into<String>,
        expect: Expect,
        task: JoinHandle<()>,
    ) -> tokio::task::AbortHandle {
        let name = name.into();
        let known = self.lock().contains_key(&name);
        let pulse = if known {
            Pulse {
                registry: self.clone(),
                name,
            }
        } else {
            self.register(name, expect)
        };
        let abort = task.abort_handle();
        self.watch(pulse, task);
        abort
    }

    fn watch(&self, pulse: Pulse, task: JoinHandle<()>) -> JoinHandle<()> {
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let why = match task.await {
                Ok(()) if pulse.finishes() => {
                    pulse.registry.lock().remove(&pulse.name);
                    return;
                }
                Ok(()) => "returned".to_string(),
                Err(e) if e.is_cancelled() => return,
                Err(e) => format!("panicked: {}", panic_message(e.into_panic())),
            };
            if stopping.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            tracing::error!(health_loop = %pulse.name, reason = %why, "loop ended");
            pulse.ended(why);
        })
    }

    /// From now on loops ending is expected (shutdown), not a failure.
    pub fn stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Why the daemon is not ready, one line per loop; empty when it is.
    pub fn readiness_at(&self, now: Instant) -> Vec<String> {
        self.problems(now, false)
    }

    /// Why the daemon should be restarted; empty when it should not.
    pub fn liveness_at(&self, now: Instant) -> Vec<String> {
        self.problems(now, true)
    }

    pub fn readiness(&self) -> Vec<String> {
        self.readiness_at(Instant::now())
    }

    pub fn liveness(&self) -> Vec<String> {
        self.liveness_at(Instant::now())
    }

    /// Completed passes of `name` (tests and debugging).
    pub fn passes(&self, name: &str) -> u64 {
        self.lock().get(name).map_or(0, |l| l.passes)
    }

    fn problems(&self, now: Instant, liveness: bool) -> Vec<String> {
        let mut out = Vec::new();
        for (name, l) in self.lock().iter() {
            if let Some(why) = &l.ended {
                out.push(format!("loop {name} ended: {why}"));
                continue;
            }
            if let (Some(since), Some(limit)) = (l.busy_since, l.expect.stall_after) {
                let busy = now.saturating_duration_since(since);
                if busy > limit && (!liveness || l.expect.vital) {
                    out.push(format!(
                        "loop {name} stalled: busy for {}s (limit {}s)",
                        busy.as_secs(),
                        limit.as_secs()
                    ));
                }
            }
            if let Some((since, why)) = &l.failing {
                let failing = now.saturating_duration_since(*since);
                if !liveness && failing > l.expect.fail_after {
                    out.push(format!(
                        "loop {name} failing for {}s: {why}",
                        failing.as_secs()
                    ));
                }
            }
        }
        if !liveness {
            for (name, fail_after, failures) in
                self.probes.lock().unwrap_or_else(|p| p.into_inner()).iter()
            {
                for (what, since, why) in failures() {
                    let failing = now.saturating_duration_since(since);
                    if failing > *fail_after {
                        out.push(format!(
                            "{name} {what} failing for {}s: {why}",
                            failing.as_secs()
                        ));
                    }
                }
            }
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LoopState>> {
        self.loops.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut LoopState)) {
        if let Some(l) = self.lock().get_mut(name) {
            f(l);
        }
    }
}

impl Pulse {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A unit of work starts.
    pub fn busy(&self) {
        self.busy_at(Instant::now());
    }

    pub fn busy_at(&self, now: Instant) {
        self.registry.update(&self.name, |l| {
            l.busy_since.get_or_insert(now);
        });
    }

    /// The unit of work is done; the loop waits for the next.
    pub fn idle(&self) {
        self.registry.update(&self.name, |l| {
            l.busy_since = None;
            l.passes += 1;
        });
    }

    /// The loop's work fails (and is being retried); the first failure's time is kept.
    pub fn failing(&self, why: impl Into<String>) {
        self.failing_at(Instant::now(), why);
    }

    pub fn failing_at(&self, now: Instant, why: impl Into<String>) {
        let why = why.into();
        self.registry.update(&self.name, |l| match &mut l.failing {
            Some((_, reason)) => *reason = why,
            None => l.failing = Some((now, why)),
        });
    }

    pub fn recovered(&self) {
        self.registry.update(&self.name, |l| l.failing = None);
    }

    fn finishes(&self) -> bool {
        self.registry
            .lock()
            .get(&self.name)
            .is_some_and(|l| l.expect.finishes)
    }

    pub fn ended(&self, why: impl Into<String>) {
        let why = why.into();
        self.registry.update(&self.name, |l| l.ended = Some(why));
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Test-only fault injection: with `TORTIE_TEST_FAULTS=<dir>` set, a loop calling `check`
/// at the start of a unit of work panics when `<dir>/<loop>` reads `panic`, and stays busy
/// while it reads `stall`. Without the variable `check` does nothing.
pub mod faults {
    use std::path::PathBuf;
    use std::sync::OnceLock;
    use std::time::Duration;

    pub const ENV: &str = "TORTIE_TEST_FAULTS";

    fn dir() -> Option<&'static PathBuf> {
        static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
        DIR.get_or_init(|| std::env::var_os(ENV).map(PathBuf::from))
            .as_ref()
    }

    fn fault(name: &str) -> Option<String> {
        let path = dir()?.join(name.replace('/', "_"));
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
    }

    pub async fn check(name: &str) {
        if dir().is_none() {
            return;
        }
        loop {
            match fault(name).as_deref() {
                Some("panic") => panic!("injected fault in loop {name}"),
                Some("stall") => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect(stall: u64, fail: u64, vital: bool) -> Expect {
        Expect {
            stall_after: Some(Duration::from_secs(stall)),
            fail_after: Duration::from_secs(fail),
            vital,
            finishes: false,
        }
    }

    #[test]
    fn a_stalled_loop_revokes_readiness_and_a_vital_one_liveness() {
        let r = Registry::default();
        let t0 = Instant::now();
        let calc = r.register("calculation", expect(10, 30, true));
        let nat = r.register("nat", expect(10, 30, false));
        calc.busy_at(t0);
        nat.busy_at(t0);
        assert!(r.readiness_at(t0 + Duration::from_secs(5)).is_empty());
        let later = t0 + Duration::from_secs(11);
        let ready = r.readiness_at(later);
        assert_eq!(ready.len(), 2, "{ready:?}");
        assert!(ready[0].starts_with("loop calculation stalled"));
        let live = r.liveness_at(later);
        assert_eq!(live.len(), 1, "only the vital loop: {live:?}");
        calc.idle();
        nat.idle();
        assert!(r.readiness_at(later).is_empty());
        assert_eq!(r.passes("nat"), 1);
    }

    #[test]
    fn a_failure_counts_only_after_its_grace_time_and_clears_on_recovery() {
        let r = Registry::default();
        let t0 = Instant::now();
        let w = r.register("watch/ippools", expect(10, 20, false));
        w.failing_at(t0, "list failed: 403");
        w.failing_at(t0 + Duration::from_secs(15), "list failed: 404");
        assert!(r.readiness_at(t0 + Duration::from_secs(19)).is_empty());
        let reasons = r.readiness_at(t0 + Duration::from_secs(21));
        assert_eq!(
            reasons,
            ["loop watch/ippools failing for 21s: list failed: 404"]
        );
        assert!(r.liveness_at(t0 + Duration::from_secs(21)).is_empty());
        w.recovered();
        assert!(r.readiness_at(t0 + Duration::from_secs(21)).is_empty());
    }

    #[tokio::test]
    async fn a_panicking_loop_is_reported_with_its_message() {
        let r = Registry::default();
        let watcher = r.spawn("resync", Expect::default(), |_pulse| async {
            panic!("boom");
        });
        watcher.await.unwrap();
        assert_eq!(r.readiness(), ["loop resync ended: panicked: boom"]);
        assert_eq!(r.liveness(), ["loop resync ended: panicked: boom"]);
    }

    #[tokio::test]
    async fn loops_ending_at_shutdown_are_not_failures() {
        let r = Registry::default();
        r.stopping();
        r.spawn("cni", Expect::default(), |_| async {})
            .await
            .unwrap();
        assert!(r.readiness().is_empty());
    }

    #[tokio::test]
    async fn a_one_shot_job_that_returns_is_done_but_its_panic_is_reported() {
        let r = Registry::default();
        let once = Expect {
            finishes: true,
            ..Expect::default()
        };
        r.spawn("default-pool", once, |_| async {}).await.unwrap();
        assert!(r.readiness().is_empty());
        r.spawn("default-pool", once, |_| async { panic!("no pool") })
            .await
            .unwrap();
        assert_eq!(
            r.readiness(),
            ["loop default-pool ended: panicked: no pool"]
        );
    }
}
