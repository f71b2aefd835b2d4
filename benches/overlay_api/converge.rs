// Benchmark A: N simulated remote nodes appear in the API at once, each a Node (IPv4Address,
// IPv4VXLANTunnelAddr) with one empty IPAMBlock affine to it; measures the time from the first
// create until node A's kernel holds all N routes, neighbours and FDB entries, and the time
// the API writes alone took.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use tortie::api::{IPAMBlock, IPAMBlockSpec};
use tortie::ipam::cidr::block_name;

use super::cluster::{Cluster, POOL};
use crate::support::NetNs;

/// Parallel API writes in flight (the API server and etcd share the machine's two cores).
const IN_FLIGHT: usize = 32;
const DEADLINE: Duration = Duration::from_secs(300);

/// Counts of tortie's routes, neighbours and FDB entries on vxlan.calico in `ns`.
fn kernel_counts(ns: &NetNs) -> anyhow::Result<[usize; 3]> {
    let lines = |argv: &[&str]| -> anyhow::Result<usize> {
        Ok(ns.exec_ok(argv)?.lines().filter(|l| !l.is_empty()).count())
    };
    Ok([
        lines(&["ip", "-4", "route", "show", "proto", "80"])?,
        lines(&["ip", "-4", "neigh", "show", "dev", "vxlan.calico"])?,
        lines(&["bridge", "fdb", "show", "dev", "vxlan.calico"])?,
    ])
}

/// `n` free /26 blocks of the pool, from its upper half, skipping blocks that already exist.
fn free_blocks(n: usize, taken: &BTreeSet<String>) -> anyhow::Result<Vec<Ipv4Net>> {
    let pool: Ipv4Net = POOL.parse()?;
    let blocks: Vec<Ipv4Net> = pool
        .subnets(26)?
        .skip(512)
        .filter(|b| !taken.contains(&b.to_string()))
        .take(n)
        .collect();
    if blocks.len() < n {
        bail!(
            "pool {POOL} has only {} free blocks, {n} wanted",
            blocks.len()
        );
    }
    Ok(blocks)
}

fn sim_node(i: usize, block: Ipv4Net) -> (Node, IPAMBlock) {
    let name = format!("sim-{i:04}");
    let ip = Ipv4Addr::new(172, 31, 1 + (i / 250) as u8, 1 + (i % 250) as u8);
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
    let size = 1usize << (32 - block.prefix_len());
    let ipam = IPAMBlock::new(
        &block_name(&ipnet::IpNet::V4(block)),
        IPAMBlockSpec {
            cidr: block.to_string(),
            affinity: Some(format!("host:{name}")),
            allocations: vec![None; size],
            unallocated: (0..size as i64).collect(),
            attributes: vec![],
            strict_affinity: false,
            ..Default::default()
        },
    );
    (node, ipam)
}

pub async fn run(c: &Cluster, remotes: usize) -> anyhow::Result<()> {
    let client = c.cp.client();
    let nodes = Api::<Node>::all(client.clone());
    let blocks = Api::<IPAMBlock>::all(client);
    let taken: BTreeSet<String> = blocks
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|b| b.spec.cidr)
        .collect();
    let sims: Vec<(Node, IPAMBlock)> = free_blocks(remotes, &taken)?
        .into_iter()
        .enumerate()
        .map(|(i, b)| sim_node(i, b))
        .collect();
    let ns = c.ns(0);
    let base = kernel_counts(ns)?;
    let want = base.map(|n| n + remotes);
    println!(
        "converge from the API: {remotes} simulated nodes x 1 block, one real daemon (before: {} routes, {} neighbours, {} fdb)",
        base[0], base[1], base[2]
    );

    let start = Instant::now();
    let writer = {
        let (nodes, blocks) = (nodes.clone(), blocks.clone());
        tokio::spawn(async move {
            futures::stream::iter(sims)
                .map(|(node, block)| {
                    let (nodes, blocks) = (nodes.clone(), blocks.clone());
                    async move {
                        let pp = PostParams::default();
                        nodes
                            .create(&pp, &node)
                            .await
                            .with_context(|| format!("create node {:?}", node.metadata.name))?;
                        blocks
                            .create(&pp, &block)
                            .await
                            .with_context(|| format!("create block {}", block.spec.cidr))?;
                        anyhow::Ok(())
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await?;
            anyhow::Ok(start.elapsed())
        })
    };
    let mut writer = writer;
    let mut writes = None;
    let mut last;
    let converged = loop {
        if writes.is_none() && writer.is_finished() {
            // A failed write ends the run now instead of at the deadline.
            writes = Some((&mut writer).await??);
        }
        last = kernel_counts(ns)?;
        if last.iter().zip(want).all(|(have, want)| *have >= want) {
            break start.elapsed();
        }
        if start.elapsed() > DEADLINE {
            bail!("not converged after {DEADLINE:?}: have {last:?} of {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let writes = match writes {
        Some(w) => w,
        None => writer.await??,
    };
    println!(
        "{:<34} {:>9.1} ms  ({} Node + {} IPAMBlock creates, {IN_FLIGHT} in flight)",
        "API writes alone",
        writes.as_secs_f64() * 1000.0,
        remotes,
        remotes
    );
    println!(
        "{:<34} {:>9.1} ms  (from the first create; kernel now {} routes, {} neighbours, {} fdb)",
        "kernel converged",
        converged.as_secs_f64() * 1000.0,
        last[0],
        last[1],
        last[2]
    );
    println!(
        "{:<34} {:>9.1} ms",
        "converged after the last write",
        (converged.saturating_sub(writes)).as_secs_f64() * 1000.0
    );
    Ok(())
}
