// Benchmark (not a test): IPAM allocation rate, latency and API block writes per allocation
// against the real kube-apiserver + etcd: one node (sequential, then a concurrent burst, to
// make group commit visible) and N nodes allocating at once (each its own client and node).
//
//   cargo bench --bench ipam_alloc                    # optimised, full size
//   cargo test --bench ipam_alloc -- --bench           # debug build, full size
//   IPAM_BENCH_NODES=20 IPAM_BENCH_PER_NODE=100 IPAM_BENCH_SEQ=200 IPAM_BENCH_BURST=100
// Without `--bench` (cargo test --all-targets) it does a smoke run of a few seconds.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use support::ControlPlane;
use tortie::ipam::{AssignRequest, Ipam, pod_handle};

const SYNC: Duration = Duration::from_secs(60);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Sizes {
    seq: usize,
    burst: usize,
    nodes: usize,
    per_node: usize,
    /// Concurrent allocations in flight per node in the many-node run (CNI ADDs of a node).
    node_concurrency: usize,
}

impl Sizes {
    fn from_env(full: bool) -> Sizes {
        let (seq, burst, nodes, per_node) = if full {
            (200, 100, 20, 100)
        } else {
            (10, 20, 3, 10)
        };
        Sizes {
            seq: env_usize("IPAM_BENCH_SEQ", seq),
            burst: env_usize("IPAM_BENCH_BURST", burst),
            nodes: env_usize("IPAM_BENCH_NODES", nodes).max(1),
            per_node: env_usize("IPAM_BENCH_PER_NODE", per_node),
            node_concurrency: env_usize("IPAM_BENCH_NODE_CONCURRENCY", 10).max(1),
        }
    }
}

/// One row of the results table.
struct Row {
    name: String,
    allocs: usize,
    wall: Duration,
    latencies: Vec<Duration>,
    writes: u64,
    conflicts: u64,
}

impl Row {
    fn header() {
        println!(
            "{:<40} {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>11} {:>9}",
            "scenario",
            "allocs",
            "wall ms",
            "allocs/s",
            "p50 ms",
            "p99 ms",
            "writes",
            "writes/alloc",
            "CAS confl"
        );
    }

    fn print(&self) {
        let mut l = self.latencies.clone();
        l.sort();
        let pct = |p: f64| {
            if l.is_empty() {
                return 0.0;
            }
            let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
            l[i].as_secs_f64() * 1000.0
        };
        let secs = self.wall.as_secs_f64().max(f64::EPSILON);
        println!(
            "{:<40} {:>6} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>8} {:>11.3} {:>9}",
            self.name,
            self.allocs,
            secs * 1000.0,
            self.allocs as f64 / secs,
            pct(0.50),
            pct(0.99),
            self.writes,
            self.writes as f64 / self.allocs.max(1) as f64,
            self.conflicts
        );
    }
}

fn attrs(node: &str, pod: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("node".to_string(), node.to_string()),
        ("namespace".to_string(), "default".to_string()),
        ("pod".to_string(), pod.to_string()),
    ])
}

use support::pools::create_pool;

/// (block writes, CAS conflicts) so far, summed over `ipams`.
fn counters(ipams: &[Arc<Ipam>]) -> (u64, u64) {
    ipams.iter().fold((0, 0), |(w, c), i| {
        (
            w + i.stats().block_writes.load(Ordering::Relaxed),
            c + i.stats().cas_conflicts.load(Ordering::Relaxed),
        )
    })
}

/// One allocation, timed; the address it got.
async fn timed_alloc(ipam: &Ipam, tag: &str) -> Result<(IpAddr, Duration)> {
    let req = AssignRequest::workload(pod_handle(tag), attrs(ipam.node(), tag));
    let t = Instant::now();
    let got = ipam.auto_assign(&req).await?;
    let d = t.elapsed();
    let addr = got.first().context("no address returned")?.addr();
    Ok((addr, d))
}

fn check_unique(all: &mut BTreeSet<IpAddr>, got: impl IntoIterator<Item = IpAddr>) -> Result<()> {
    for a in got {
        if !all.insert(a) {
            bail!("address {a} handed out twice");
        }
    }
    Ok(())
}

async fn one_node(cp: &ControlPlane, s: &Sizes, all: &mut BTreeSet<IpAddr>) -> Result<Vec<Row>> {
    cp.create_node("bench-solo", &[]).await?;
    let ipam = Arc::new(Ipam::start(cp.client(), "bench-solo", SYNC).await?);
    let one = [ipam.clone()];
    let mut rows = Vec::new();

    // Warm-up: the first allocation claims a block (affinity, block, confirm).
    let (w0, c0) = counters(&one);
    let t = Instant::now();
    let (a, d) = timed_alloc(&ipam, "warm").await?;
    check_unique(all, [a])?;
    let (w1, c1) = counters(&one);
    rows.push(Row {
        name: "1 node: first allocation (block claim)".into(),
        allocs: 1,
        wall: t.elapsed(),
        latencies: vec![d],
        writes: w1 - w0,
        conflicts: c1 - c0,
    });

    let t = Instant::now();
    let mut lat = Vec::with_capacity(s.seq);
    for i in 0..s.seq {
        let (a, d) = timed_alloc(&ipam, &format!("seq{i}")).await?;
        check_unique(all, [a])?;
        lat.push(d);
    }
    let (w2, c2) = counters(&one);
    rows.push(Row {
        name: "1 node: sequential".into(),
        allocs: s.seq,
        wall: t.elapsed(),
        latencies: lat,
        writes: w2 - w1,
        conflicts: c2 - c1,
    });

    let t = Instant::now();
    let tasks: Vec<_> = (0..s.burst)
        .map(|i| {
            let ipam = ipam.clone();
            tokio::spawn(async move { timed_alloc(&ipam, &format!("burst{i}")).await })
        })
        .collect();
    let mut lat = Vec::with_capacity(s.burst);
    for task in tasks {
        let (a, d) = task.await??;
        check_unique(all, [a])?;
        lat.push(d);
    }
    let (w3, c3) = counters(&one);
    rows.push(Row {
        name: format!("1 node: burst of {} concurrent", s.burst),
        allocs: s.burst,
        wall: t.elapsed(),
        latencies: lat,
        writes: w3 - w2,
        conflicts: c3 - c2,
    });
    Ok(rows)
}

async fn many_nodes(cp: &ControlPlane, s: &Sizes, all: &mut BTreeSet<IpAddr>) -> Result<Row> {
    let mut ipams = Vec::with_capacity(s.nodes);
    for n in 0..s.nodes {
        let node = format!("bench-node-{n:02}");
        cp.create_node(&node, &[]).await?;
        let client = cp.client_for(&node, &["system:masters"]).await?;
        ipams.push(Arc::new(Ipam::start(client, &node, SYNC).await?));
    }
    let (w0, c0) = counters(&ipams);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for ipam in &ipams {
        for worker in 0..s.node_concurrency {
            let ipam = ipam.clone();
            let count = s.per_node / s.node_concurrency
                + usize::from(worker < s.per_node % s.node_concurrency);
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::with_capacity(count);
                for i in 0..count {
                    let tag = format!("{}-w{worker}-{i}", ipam.node());
                    out.push(timed_alloc(&ipam, &tag).await?);
                }
                Ok::<_, anyhow::Error>(out)
            }));
        }
    }
    let mut lat = Vec::new();
    for task in tasks {
        for (a, d) in task.await?? {
            check_unique(all, [a])?;
            lat.push(d);
        }
    }
    let wall = t.elapsed();
    let (w1, c1) = counters(&ipams);
    Ok(Row {
        name: format!(
            "{} nodes x {} ({} in flight per node)",
            s.nodes, s.per_node, s.node_concurrency
        ),
        allocs: lat.len(),
        wall,
        latencies: lat,
        writes: w1 - w0,
        conflicts: c1 - c0,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = Sizes::from_env(full);
    let cp = ControlPlane::start().await?;
    // One /14 of /26 blocks: 4096 blocks, so no run here exhausts it or needs to borrow.
    create_pool(&cp.client(), "bench-pool", "10.0.0.0/14", 26).await?;
    let mut all = BTreeSet::new();
    let mut rows = one_node(&cp, &sizes, &mut all).await?;
    rows.push(many_nodes(&cp, &sizes, &mut all).await?);

    println!(
        "IPAM allocation against the real API server ({}; {} distinct addresses, no duplicates)",
        if full { "full run" } else { "smoke run" },
        all.len()
    );
    println!(
        "(writes = IPAMBlock compare-and-swap PUTs of the group-commit writers; block claims \
         and IPAMHandle writes come on top; latency = one auto_assign call)"
    );
    Row::header();
    for r in &rows {
        r.print();
    }
    let per = |r: &Row| r.writes as f64 / r.allocs.max(1) as f64;
    if let [_, seq, burst, ..] = rows.as_slice() {
        println!(
            "group commit: {:.3} block writes/allocation sequential vs {:.3} in a burst of {} \
             ({} writes for {} allocations)",
            per(seq),
            per(burst),
            burst.allocs,
            burst.writes,
            burst.allocs
        );
    }
    Ok(())
}
