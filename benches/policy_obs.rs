// Benchmark (not a test): what policy observability costs at scale. A table compiled from
// N pods (L of them local) and P policies is loaded into a private node namespace, then:
//   - reading the per-policy counters (the table's named counter objects, one nfnetlink
//     dump) against `nft -j list counters table` (the same objects through nft) and against
//     `nft -j -t list table` (terse rule listing: how the counters were read before they
//     were named objects), and the drift check's full listing (`nft -j list table`);
//   - deciding which of F conntrack flows a change cuts, with the local-address prefilter
//     (`policy::cut::Cutter`) against evaluating every flow (the naive peer).
//
//   cargo build --bench policy_obs && target/debug/deps/policy_obs-<hash>
//   POLICY_BENCH_PODS=5000 POLICY_BENCH_LOCAL=100 POLICY_BENCH_POLICIES=1000
//   POLICY_BENCH_FLOWS=100000 POLICY_BENCH_ROUNDS=5 to change the size

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use support::NetNs;
use tortie::dataplane::nft::{Runner, counters, read};
use tortie::policy::cluster::{ClusterObjects, build_model};
use tortie::policy::compile::{CompileOptions, FAMILY, TABLE, compile};
use tortie::policy::cut::Cutter;
use tortie::policy::{Flow, Model, Protocol, evaluate};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i as u32 + 1)
}

fn model(pods: usize, local: usize, policies: usize) -> Model {
    let mut c = ClusterObjects::default();
    for i in 0..pods {
        c.pods.push(
            serde_json::from_value(json!({
                "metadata": {"namespace": "prod", "name": format!("p{i}"),
                             "labels": {"app": format!("a{}", i % 50)}},
                "spec": {"containers": [{"name": "c"}]},
                "status": {"podIP": pod_ip(i).to_string(), "podIPs": [{"ip": pod_ip(i).to_string()}]}
            }))
            .expect("pod"),
        );
    }
    for j in 0..policies {
        c.network_policies.push(
            serde_json::from_value(json!({
                "metadata": {"namespace": "prod", "name": format!("pol{j}")},
                "spec": {"selector": format!("app == 'a{}'", j % 50), "types": ["Ingress"],
                         "ingress": [
                    {"action": "Deny", "protocol": "TCP", "destination": {"ports": [9000 + (j % 100) as u16]}},
                    {"action": "Allow", "protocol": "TCP",
                     "source": {"selector": format!("app == 'a{}'", (j + 1) % 50)},
                     "destination": {"ports": [8080]}}]}
            }))
            .expect("policy"),
        );
    }
    let mut m = build_model(&c);
    for ep in &mut m.endpoints {
        let i: usize = ep.name()[1..].parse().expect("index");
        if i < local {
            ep.interface = Some(format!("cali{i:011}"));
        }
    }
    m
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let pods = env_usize("POLICY_BENCH_PODS", 5000);
    let local = env_usize("POLICY_BENCH_LOCAL", 100);
    let policies = env_usize("POLICY_BENCH_POLICIES", 1000);
    let flows = env_usize("POLICY_BENCH_FLOWS", 100_000);
    let rounds = env_usize("POLICY_BENCH_ROUNDS", 5);
    let m = model(pods, local, policies);
    let table = compile(&m, &CompileOptions::default());
    let script = tortie::dataplane::nft::render::full(&table);
    let node = NetNs::new("polbench")?;
    let mut child = node
        .command(&["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "table did not load");
    let elements: usize = table.sets.values().map(|s| s.elements.len()).sum();
    println!(
        "{pods} pods ({local} local), {policies} policies: {} chains, {} sets, {elements} set elements",
        table.chains.len(),
        table.sets.len()
    );

    let runner = Runner::default();
    let (mut named, mut via_nft, mut terse, mut full, mut n) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..rounds {
        let t = Instant::now();
        n = node.run(|| counters::read(FAMILY, TABLE))??.len();
        named.push(t.elapsed());
        let t = Instant::now();
        let args = ["-j", "list", "counters", "table", "inet", TABLE];
        node.run(|| runner.run("list", &args, None))??;
        via_nft.push(t.elapsed());
        let t = Instant::now();
        node.run(|| runner.run("list", &["-j", "-t", "list", "table", "inet", TABLE], None))??;
        terse.push(t.elapsed());
        let t = Instant::now();
        node.run(|| read::read(&runner, FAMILY, TABLE))??;
        full.push(t.elapsed());
    }
    let (named, via_nft, terse, full) =
        (median(named), median(via_nft), median(terse), median(full));
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "counter read ({n} named counters, medians of {rounds}): nfnetlink dump {named:?}; \
         nft list counters {via_nft:?}; terse rule listing (the read before named counters) \
         {terse:?}; full listing {full:?}. Ratios: dump/terse {:.3}, dump/nft-counters {:.3}, \
         nft-counters/terse {:.2}",
        ratio(named, terse),
        ratio(named, via_nft),
        ratio(via_nft, terse)
    );

    // Flows: 1 in 20 touches a local pod, the rest are other pods' or the outside world's.
    let flow = |k: usize| {
        let src = if k.is_multiple_of(20) {
            pod_ip(k % local.max(1))
        } else {
            pod_ip(local + k % (pods - local).max(1))
        };
        Flow::new(
            IpAddr::V4(src),
            IpAddr::V4(pod_ip((k * 7) % pods)),
            Protocol::TCP,
            9000 + (k % 200) as u16,
        )
    };
    let all: Vec<Flow> = (0..flows).map(flow).collect();
    let host = [IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))];
    let t = Instant::now();
    let cutter = Cutter::new(&m, &host);
    let cut = all.iter().filter(|f| cutter.cut(f)).count();
    let fast = t.elapsed();
    let sample = flows.min(2000);
    let t = Instant::now();
    let denied = all[..sample]
        .iter()
        .filter(|f| !evaluate(&m, f).allowed)
        .count();
    let naive = t.elapsed().mul_f64(flows as f64 / sample as f64);
    println!(
        "cut decision over {flows} flows: {fast:?} ({cut} cut) vs evaluating every flow ~{naive:?} (extrapolated from {sample}, {denied} denied): ratio {:.4}",
        fast.as_secs_f64() / naive.as_secs_f64()
    );
    Ok(())
}
