// Benchmark (not a test) of one `tortie node` in a big simulated cluster, each build beside
// the others in the same run: the API holds N remote nodes (Node with IPv4Address and VXLAN
// tunnel address), one IPAMBlock each with its share of P pods' allocations, and the P Pod
// objects. Per build: resident memory once converged, CPU used while idle over S seconds,
// and the latency from writing a new remote block to its route in the kernel (p50/p99).
//
//   scripts/bench/core.sh      # builds this tree and main (release) and runs both
//   FOOTPRINT_BINS=this=target/release/tortie,main=/path/to/tortie
//   FOOTPRINT_NODES=500 FOOTPRINT_PODS=10000 FOOTPRINT_IDLE_SECS=60 FOOTPRINT_ROUTE_SAMPLES=50
//   FOOTPRINT_LEADER=1         # measure the Lease holder (default: an ordinary node, the
//                              # Lease held by a simulated node, as on 499 of 500 nodes)
// Without `--bench` (as `cargo test --all-targets` runs it) it only prints that it skipped.

#[path = "../tests/nodes/mod.rs"]
mod nodes;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec};
use kube::api::{Api, ObjectMeta, PostParams};
use nodes::{Daemon, DaemonOpts, Host};
use support::{ControlPlane, NetNs};
use tortie::api::ippool::EncapMode;
use tortie::api::{AllocationAttribute, IPAMBlock, IPAMBlockSpec, IPPool, IPPoolSpec};
use tortie::ipam::cidr::block_name;

const IN_FLIGHT: usize = 32;
const RSS_TARGET_BYTES: f64 = 50e6;
const LOCAL: &str = "fp-local";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sim(i: usize, pods: usize) -> (Node, IPAMBlock, Vec<Pod>) {
    let name = format!("sim-{i:04}");
    let ip = Ipv4Addr::new(172, 30, 1 + (i / 250) as u8, 1 + (i % 250) as u8);
    // Blocks from 10.244.64.0 up: /26s, one per node.
    let base = u32::from(Ipv4Addr::new(10, 244, 64, 0)) + (i as u32) * 64;
    let block = Ipv4Net::new(Ipv4Addr::from(base), 26).expect("block");
    let annotations = [
        ("projectcalico.org/IPv4Address", format!("{ip}/16")),
        (
            "projectcalico.org/IPv4VXLANTunnelAddr",
            block.addr().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some(annotations),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut allocations = vec![None; 64];
    let mut attributes = Vec::new();
    let mut pod_objs = Vec::new();
    for p in 0..pods.min(63) {
        let pod = format!("{name}-p{p}");
        let ord = p + 1; // ordinal 0 is the tunnel address
        allocations[ord] = Some(attributes.len() as i64);
        attributes.push(AllocationAttribute {
            handle_id: Some(format!("k8s-pod-network.{pod}")),
            secondary: Some(
                [
                    ("namespace", "default".to_string()),
                    ("pod", pod.clone()),
                    ("node", name.clone()),
                    ("timestamp", "2026-12-01T00:00:00Z".to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ),
            ..Default::default()
        });
        let addr = Ipv4Addr::from(base + ord as u32);
        pod_objs.push(Pod {
            metadata: ObjectMeta {
                name: Some(pod),
                namespace: Some("default".into()),
                annotations: Some(
                    [
                        ("cni.projectcalico.org/podIP", format!("{addr}/32")),
                        ("cni.projectcalico.org/podIPs", format!("{addr}/32")),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(name.clone()),
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("pause".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let unallocated = (0..64i64)
        .filter(|o| allocations[*o as usize].is_none())
        .collect();
    let ipam = IPAMBlock::new(
        &block_name(&ipnet::IpNet::V4(block)),
        IPAMBlockSpec {
            cidr: block.to_string(),
            affinity: Some(format!("host:{name}")),
            allocations,
            unallocated,
            attributes,
            ..Default::default()
        },
    );
    (node, ipam, pod_objs)
}

async fn populate(cp: &ControlPlane, from: usize, n: usize, pods_per_node: usize) -> Result<()> {
    let client = cp.client();
    let nodes = Api::<Node>::all(client.clone());
    let blocks = Api::<IPAMBlock>::all(client.clone());
    let pods = Api::<Pod>::namespaced(client, "default");
    futures::stream::iter(from..from + n)
        .map(|i| {
            let (nodes, blocks, pods) = (nodes.clone(), blocks.clone(), pods.clone());
            async move {
                let (node, block, pod_objs) = sim(i, pods_per_node);
                let pp = PostParams::default();
                nodes.create(&pp, &node).await.context("create node")?;
                blocks.create(&pp, &block).await.context("create block")?;
                for p in pod_objs {
                    pods.create(&pp, &p).await.context("create pod")?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The IPAM leader Lease held by `holder` for an hour, so the daemon under test does not lead.
async fn hold_lease(cp: &ControlPlane, holder: &str) -> Result<()> {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(tortie::datastore::lease::DEFAULT_NAME.into()),
            namespace: Some(tortie::datastore::lease::DEFAULT_NAMESPACE.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(3600),
            acquire_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }),
    };
    Api::<Lease>::namespaced(cp.client(), tortie::datastore::lease::DEFAULT_NAMESPACE)
        .create(&PostParams::default(), &lease)
        .await
        .context("create the IPAM Lease")?;
    Ok(())
}

fn routes(ns: &NetNs) -> usize {
    ns.exec(&["ip", "-4", "route", "show", "proto", "80"])
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th, stime 15th.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

struct Figures {
    converge: Duration,
    rss_mib: f64,
    idle_cpu_ms: f64,
    p50: Duration,
    p99: Duration,
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    label: &str,
    binary: &Path,
    host: &Host,
    cp: &ControlPlane,
    remotes: usize,
    idle: Duration,
    samples: usize,
    next_sim: &mut usize,
) -> Result<Figures> {
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let mut d = Daemon::start_binary(
        host,
        dir.path(),
        DaemonOpts {
            kubeconfig: cp.kubeconfig_path(),
            node_name: LOCAL,
            env: vec![
                ("IP_AUTODETECTION_METHOD", "interface=eth0".into()),
                ("TORTIE_LOG_LEVEL", "warn".into()),
            ],
        },
        binary,
    );
    d.wait_readiness(Duration::from_secs(300), |code, _| code == 200);
    while routes(&host.ns) < remotes {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "{label}: {} of {remotes} routes after 300 s",
            routes(&host.ns)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converge = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_mib = d.resident_bytes() as f64 / (1024.0 * 1024.0);
    let t0 = cpu_ticks(d.pid());
    tokio::time::sleep(idle).await;
    let ticks = cpu_ticks(d.pid()) - t0;
    let clk = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let idle_cpu_ms = ticks as f64 * 1000.0 / clk;

    let mut lat = Vec::new();
    while lat.len() < samples {
        let i = *next_sim;
        *next_sim += 1;
        let (node, block, _) = sim(i, 0);
        Api::<Node>::all(cp.client())
            .create(&PostParams::default(), &node)
            .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cidr = block.spec.cidr.clone();
        match Api::<IPAMBlock>::all(cp.client())
            .create(&PostParams::default(), &block)
            .await
        {
            Ok(_) => {}
            // The daemon claimed that block for itself (its tunnel address): the next one.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
        let t = Instant::now();
        loop {
            let out = host
                .ns
                .exec(&["ip", "-4", "route", "show", &cidr, "proto", "80"]);
            if out.stdout.iter().any(|b| !b.is_ascii_whitespace()) {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "{label}: no route to {cidr}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let pick = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    let figures = Figures {
        converge,
        rss_mib,
        idle_cpu_ms,
        p50: pick(0.5),
        p99: pick(0.99),
    };
    d.terminate();
    Ok(figures)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("node_footprint: skipped outside cargo bench (pass --bench to run it)");
        return Ok(());
    }
    let remotes = env_usize("FOOTPRINT_NODES", 500);
    let pods = env_usize("FOOTPRINT_PODS", 10_000);
    let idle = Duration::from_secs(env_usize("FOOTPRINT_IDLE_SECS", 60) as u64);
    let samples = env_usize("FOOTPRINT_ROUTE_SAMPLES", 50).max(1);
    let bins: Vec<(String, PathBuf)> = std::env::var("FOOTPRINT_BINS")
        .unwrap_or_else(|_| format!("this={}", env!("CARGO_BIN_EXE_tortie")))
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
        .collect();

    let host = Host::new("fp")?;
    host.ns.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])?;
    host.ns.exec_ok(&["ip", "link", "set", "eth0p", "up"])?;
    host.ns
        .exec_ok(&["ip", "addr", "add", "172.30.0.1/16", "dev", "eth0"])?;
    host.ns.exec_ok(&["ip", "link", "set", "eth0", "up"])?;
    let cp = ControlPlane::start_on(host.root_ip.into()).await?;
    cp.create_node(LOCAL, &[]).await?;
    Api::<IPPool>::all(cp.client())
        .create(
            &PostParams::default(),
            &IPPool::new(
                "default-pool",
                IPPoolSpec {
                    cidr: "10.244.0.0/16".into(),
                    block_size: Some(26),
                    vxlan_mode: EncapMode::Always,
                    nat_outgoing: true,
                    ..Default::default()
                },
            ),
        )
        .await?;
    let t = Instant::now();
    populate(&cp, 0, remotes, pods.div_ceil(remotes.max(1))).await?;
    println!(
        "API populated in {:.1} s: {remotes} nodes, {remotes} blocks, {pods} pods",
        t.elapsed().as_secs_f64()
    );

    let leader = std::env::var("FOOTPRINT_LEADER").is_ok_and(|v| v == "1");
    if !leader {
        hold_lease(&cp, "sim-0000").await?;
    }
    println!(
        "measuring {}",
        if leader {
            "the IPAM leader (it caches every pod for the leak GC)"
        } else {
            "an ordinary node (the IPAM Lease held by sim-0000 for an hour)"
        }
    );
    let mut next_sim = remotes;
    let mut rows: BTreeMap<String, Figures> = BTreeMap::new();
    for (label, bin) in &bins {
        let f = measure(
            label,
            bin,
            &host,
            &cp,
            remotes,
            idle,
            samples,
            &mut next_sim,
        )
        .await?;
        println!(
            "{label:>6}: converge {:.1} s, RSS {:.1} MiB, idle CPU {:.0} ms over {} s, new block route p50 {:.1} ms p99 {:.1} ms ({})",
            f.converge.as_secs_f64(),
            f.rss_mib,
            f.idle_cpu_ms,
            idle.as_secs(),
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3,
            bin.display()
        );
        rows.insert(label.clone(), f);
    }
    // The target: RSS <= 50 MB (decimal megabytes, the stricter reading).
    let target_mib = RSS_TARGET_BYTES / (1024.0 * 1024.0);
    for (label, f) in &rows {
        let others: Vec<String> = rows
            .iter()
            .filter(|(l, _)| *l != label)
            .map(|(l, o)| format!("{:.2}x {l}'s {:.1} MiB", f.rss_mib / o.rss_mib, o.rss_mib))
            .collect();
        println!(
            "{} {label}: RSS {:.1} MiB ({:.1} MB) <= 50 MB ({target_mib:.1} MiB){}",
            if f.rss_mib <= target_mib {
                "PASS"
            } else {
                "MISS"
            },
            f.rss_mib,
            f.rss_mib * 1024.0 * 1024.0 / 1e6,
            if others.is_empty() {
                String::new()
            } else {
                format!("; {}", others.join(", "))
            }
        );
    }
    Ok(())
}
