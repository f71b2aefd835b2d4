// Benchmark (not a test): the heap the policy calculator keeps for a big cluster's pods,
// beside the pod store it reads, in the same run. The pods are shaped like
// benches/node_footprint.rs's (10,000 remote pods in `default`, no labels, their address in
// Calico's annotations), decoded into `CachedPod` as the daemon's store does; the namespace
// carries the label the API server gives it. A counting allocator gives the live bytes
// asked for, glibc's `mallinfo2` the bytes in use with malloc's own overhead.
//
// Figures: the store's bytes per pod (the peer: what policy-off keeps), the calculator's
// bytes per pod after its first pass and after a malloc_trim, the first pass's time beside
// a full compile of the same objects (`policy_plan`, the reference), and an unchanged pass.
//
//   cargo bench --bench policy_memory -- --bench
//   POLICY_MEMORY_PODS=10000 POLICY_MEMORY_POLICIES=0 cargo bench --bench policy_memory -- --bench
// Without `--bench` it does a small smoke run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use tortie::calc::policy::{PolicyCalc, PolicySnapshot, policy_plan};
use tortie::datastore::pods::CachedPod;
use tortie::policy::compile::CompileOptions;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Bytes malloc has handed out, with its per-chunk overhead (heap and mmapped chunks).
fn in_use() -> isize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as isize
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A pod as node_footprint.rs makes them, decoded the way the store decodes the API's JSON.
fn pod(i: usize) -> CachedPod {
    let node = format!("sim-{:04}", i / 20);
    let ip = format!("10.{}.{}.{}", 244 + i / 65536, (i / 256) % 256, i % 256);
    serde_json::from_value(json!({
        "metadata": {"name": format!("{node}-p{}", i % 20), "namespace": "default",
            "uid": format!("0000{i:08}-0000-0000-0000-000000000000"),
            "resourceVersion": format!("{}", 1000 + i),
            "creationTimestamp": "2026-12-01T00:00:00Z",
            "annotations": {"cni.projectcalico.org/podIP": format!("{ip}/32"),
                "cni.projectcalico.org/podIPs": format!("{ip}/32")}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]},
        "status": {"phase": "Pending"}
    }))
    .expect("pod")
}

/// A policy selecting nothing on this node, with one peer selector (sets are built for
/// local endpoints only, so remote pods are evaluated only when a set exists).
fn policy(i: usize) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": format!("np{i}")},
        "spec": {"podSelector": {"matchLabels": {"app": format!("a{i}")}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("b{i}")}}}]}]}
    }))
    .expect("policy")
}

fn mib(b: isize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = env_usize("POLICY_MEMORY_PODS", if full { 10_000 } else { 200 });
    let policies = env_usize("POLICY_MEMORY_POLICIES", 0);
    let opts = CompileOptions::default();
    tortie::memory::tune_allocator();

    let (l0, u0) = (live(), in_use());
    let pods: Vec<Arc<CachedPod>> = (0..n).map(|i| Arc::new(pod(i))).collect();
    let (l1, u1) = (live(), in_use());
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}
    }))
    .expect("namespace");
    let snap = PolicySnapshot {
        namespaces: vec![Arc::new(namespace)],
        pods,
        k8s_policies: (0..policies).map(|i| Arc::new(policy(i))).collect(),
        ..PolicySnapshot::default()
    };

    let (l2, u2) = (live(), in_use());
    let mut calc = PolicyCalc::new("fp-local", &opts);
    let t = Instant::now();
    calc.sync(&snap);
    let first = t.elapsed();
    let (l3, u3) = (live(), in_use());
    tortie::memory::trim();
    let u4 = in_use();
    let t = Instant::now();
    calc.sync(&snap);
    let again = t.elapsed();

    let t = Instant::now();
    let plan = policy_plan(&snap.to_objects(), "fp-local", &opts);
    let reference = t.elapsed();
    assert_eq!(
        calc.table(),
        &plan.table,
        "the calculator equals a full compile"
    );
    drop(plan);

    let per = |b: isize| b as f64 / n as f64;
    println!(
        "policy_memory: {n} pods, {policies} policies; store {:.1} MiB live ({:.0} B/pod), {:.1} MiB in use ({:.0} B/pod)",
        mib(l1 - l0),
        per(l1 - l0),
        mib(u1 - u0),
        per(u1 - u0)
    );
    println!(
        "policy_memory: calculator {:.2} MiB live ({:.0} B/pod), {:.2} MiB in use ({:.0} B/pod), {:.0} B/pod after trim; {:.2}x the store",
        mib(l3 - l2),
        per(l3 - l2),
        mib(u3 - u2),
        per(u3 - u2),
        per(u4 - u2),
        (u3 - u2) as f64 / (u1 - u0) as f64
    );
    println!(
        "policy_memory: first pass {:.1} ms vs full compile {:.1} ms ({:.2}x); unchanged pass {:.2} ms",
        first.as_secs_f64() * 1e3,
        reference.as_secs_f64() * 1e3,
        first.as_secs_f64() / reference.as_secs_f64(),
        again.as_secs_f64() * 1e3
    );
}
