// Benchmarks (not tests) of the overlay through the real daemon and the real API server:
// A) how long one `tortie node` takes to program 500 remote blocks that appear at once as
//    Node + IPAMBlock objects in the API; B) pod-to-pod TCP throughput across two nodes through
//    tortie's VXLAN against a hand-built VXLAN pair with the same MTU, in the same run.
//
//   scripts/bench/overlay.sh                         # builds everything, runs it (root)
//   OVERLAY_API_NODES=500 OVERLAY_API_IPERF_RUNS=3 OVERLAY_API_IPERF_SECS=5 to change the size
// Without `--bench` (as `cargo test --all-targets` runs it) it only prints that it skipped.

#[path = "../tests/nodes/mod.rs"]
mod nodes;
#[path = "../tests/support/mod.rs"]
mod support;

mod overlay_api {
    pub mod cluster;
    pub mod converge;
    pub mod throughput;
}

use anyhow::Result;
use overlay_api::{cluster::Cluster, converge, throughput};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("overlay_api: skipped outside cargo bench (pass --bench to run it)");
        return Ok(());
    }
    let remotes = env_usize("OVERLAY_API_NODES", 500);
    let runs = env_usize("OVERLAY_API_IPERF_RUNS", 3).max(1);
    let secs = env_usize("OVERLAY_API_IPERF_SECS", 5).max(1);

    let mut cluster = Cluster::start().await?;
    let result = async {
        throughput::run(&cluster, runs, secs).await?;
        // Benchmark A measures one daemon: the second would only compete for the CPU.
        cluster.stop_daemon(1);
        converge::run(&cluster, remotes).await
    }
    .await;
    if result.is_err() {
        eprintln!("{}", cluster.logs());
    }
    result
}
