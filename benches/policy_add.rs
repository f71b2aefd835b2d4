// Benchmark (not a test): CNI ADD latency through a real `tortie node` (cnitool -> plugin ->
// daemon) with policy off, on with no policies, and on with POLICY_BENCH_POLICIES Kubernetes
// NetworkPolicies selecting the pod's namespace, in one run; ADD waits for its pod's policy
// to be committed, so this is the cost of that wait. Each ADD is followed by its DEL; each
// pod is selected by one policy's peer, so with policies its ADD changes set elements.
//
//   cargo bench --bench policy_add                     # optimised
//   cargo test --bench policy_add -- --bench           # debug build
//   POLICY_BENCH_ADDS=30 POLICY_BENCH_POLICIES=1000    # sizes
//   POLICY_BENCH_LOG=<dir>                             # keep each daemon's log there, with
//                                                      # the policy driver's per-pass timings
//   POLICY_BENCH_LOG_LEVEL=<filter>                    # the daemons' log filter instead
// Without `--bench` it does a smoke run (3 ADDs, 20 policies). Root needed.

#[path = "../tests/nodes/mod.rs"]
mod nodes;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use nodes::{Daemon, DaemonOpts, Host};
use support::{ControlPlane, NetNs};
use tortie::api::ippool::EncapMode;
use tortie::api::{IPPool, IPPoolSpec};

const NODE: &str = "node-bench";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Phase {
    label: String,
    p50: Duration,
    p99: Duration,
}

async fn adds(dir: &std::path::Path, label: &str, n: usize) -> anyhow::Result<Phase> {
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    let mut times = Vec::with_capacity(n + 1);
    // Pod 0 warms up (the first ADD after a phase starts also meets the tail of the work
    // that set the phase up); it is not counted.
    for i in 0..=n {
        let pod = format!("p{i}");
        let ns = NetNs::new(&format!("pb-{i}"))?;
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}");
        let t0 = Instant::now();
        let out = support::cni::run_cnitool(&bin, &conf, "add", &args, &ns.path()).await?;
        times.push(t0.elapsed());
        anyhow::ensure!(out.ok, "{label}: ADD {pod}: {} {}", out.stdout, out.stderr);
        let out = support::cni::run_cnitool(&bin, &conf, "del", &args, &ns.path()).await?;
        anyhow::ensure!(out.ok, "{label}: DEL {pod}: {} {}", out.stdout, out.stderr);
    }
    times.remove(0);
    times.sort();
    Ok(Phase {
        label: label.to_string(),
        p50: percentile(&times, 0.5),
        p99: percentile(&times, 0.99),
    })
}

fn start(host: &Host, cp: &ControlPlane, dir: &std::path::Path, policy: &str) -> Daemon {
    let mut d = Daemon::start(
        host,
        dir,
        DaemonOpts {
            kubeconfig: cp.kubeconfig_path(),
            node_name: NODE,
            env: vec![
                ("IP_AUTODETECTION_METHOD", "interface=eth0".into()),
                ("TORTIE_POLICY", policy.into()),
                ("TORTIE_LOG_LEVEL", log_level()),
            ],
        },
    );
    d.wait_readiness(Duration::from_secs(90), |code, _| code == 200);
    d
}

fn log_level() -> String {
    if let Ok(level) = std::env::var("POLICY_BENCH_LOG_LEVEL") {
        return level;
    }
    match std::env::var_os("POLICY_BENCH_LOG") {
        Some(_) => "info,tortie::node::policy=debug".into(),
        None => "info".into(),
    }
}

/// Keeps the daemon's log under POLICY_BENCH_LOG (if set) before it goes with the temp dir.
fn keep_log(d: &Daemon, name: &str) -> anyhow::Result<()> {
    if let Some(dir) = std::env::var_os("POLICY_BENCH_LOG") {
        let path = std::path::Path::new(&dir).join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(&path, d.log())?;
        eprintln!("daemon log: {}", path.display());
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full {
        env_or("POLICY_BENCH_ADDS", 30)
    } else {
        3
    };
    let policies = if full {
        env_or("POLICY_BENCH_POLICIES", 1000)
    } else {
        20
    };
    let host = Host::new("pbench")?;
    host.ns.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])?;
    host.ns.exec_ok(&["ip", "link", "set", "eth0p", "up"])?;
    host.ns
        .exec_ok(&["ip", "addr", "add", "172.31.81.1/24", "dev", "eth0"])?;
    host.ns.exec_ok(&["ip", "link", "set", "eth0", "up"])?;
    let cp = ControlPlane::start_on(host.root_ip.into()).await?;
    cp.create_node(NODE, &[]).await?;
    let pool = IPPool::new(
        "bench-pool",
        IPPoolSpec {
            cidr: "10.247.0.0/16".into(),
            vxlan_mode: EncapMode::Always,
            ..Default::default()
        },
    );
    Api::<IPPool>::all(cp.client())
        .create(&PostParams::default(), &pool)
        .await?;
    // Pod i carries the label policy i's peer selects: with policies, its ADD adds its
    // address to that selector's set (elements, as a real pod's ADD does).
    let pods: Api<Pod> = Api::namespaced(cp.client(), "default");
    for i in 0..=n {
        let name = format!("p{i}");
        support::pods::create_pod_on(&cp.client(), "default", &name, NODE, &[]).await?;
        let labels = serde_json::json!({"metadata": {"labels": {"app": format!("a{i}")}}});
        pods.patch(&name, &PatchParams::default(), &Patch::Merge(&labels))
            .await?;
    }
    let dir = tempfile::tempdir()?;
    let mut phases = Vec::new();

    let mut d = start(&host, &cp, dir.path(), "false");
    phases.push(adds(dir.path(), "policy off", n).await?);
    d.terminate();
    let mut d = start(&host, &cp, dir.path(), "true");
    phases.push(adds(dir.path(), "policy on, 0 policies", n).await?);
    keep_log(&d, "policy-on-0.log")?;

    // A pod that stays: policy chains exist only for policies selecting a local pod.
    support::pods::create_pod_on(&cp.client(), "default", "anchor", NODE, &[]).await?;
    let anchor = NetNs::new("pb-anchor")?;
    let out = support::cni::run_cnitool(
        &dir.path().join("bin"),
        &dir.path().join("net.d"),
        "add",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=anchor",
        &anchor.path(),
    )
    .await?;
    anyhow::ensure!(out.ok, "ADD anchor: {} {}", out.stdout, out.stderr);
    let api: Api<NetworkPolicy> = Api::namespaced(cp.client(), "default");
    for i in 0..policies {
        let p: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("np-{i}")},
            "spec": {
                "podSelector": {},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": format!("a{i}")}}}],
                    "ports": [{"port": 1000 + i as i32, "protocol": "TCP"}]
                }]
            }
        }))?;
        api.create(&PostParams::default(), &p)
            .await
            .with_context(|| format!("policy {i}"))?;
    }
    // Until the node's table carries the last policy's chain.
    let t0 = Instant::now();
    let last = format!("pi-knp.default.np-{} ", policies - 1);
    loop {
        let table = host
            .ns
            .exec_ok(&["nft", "list", "table", "inet", "tortie-policy"])
            .unwrap_or_default();
        if table.contains(&last) {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "{policies} policies not in the table after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{policies} policies created and in the table {} ms after the last write",
        t0.elapsed().as_millis()
    );
    phases.push(adds(dir.path(), &format!("policy on, {policies} policies"), n).await?);
    let rss = d.resident_bytes();
    keep_log(&d, &format!("policy-on-{policies}.log"))?;
    d.terminate();

    let base = phases[0].p99.as_secs_f64();
    println!("CNI ADD through tortie node, {n} ADDs each (ratios to policy off, same run):");
    for p in &phases {
        println!(
            "  {:<32} p50 {:>8.1} ms  p99 {:>8.1} ms  p99 ratio {:.2}",
            p.label,
            p.p50.as_secs_f64() * 1e3,
            p.p99.as_secs_f64() * 1e3,
            p.p99.as_secs_f64() / base
        );
    }
    // The target compares policies with none, both with policy on.
    let (none, many) = (&phases[1], &phases[2]);
    println!(
        "  {policies} policies vs none: p50 {:.2}x, p99 {:.2}x (target <= 1.2)",
        many.p50.as_secs_f64() / none.p50.as_secs_f64(),
        many.p99.as_secs_f64() / none.p99.as_secs_f64()
    );
    println!(
        "daemon RSS with {policies} policies: {:.1} MiB",
        rss as f64 / 1048576.0
    );
    Ok(())
}
