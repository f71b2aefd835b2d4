// Many allocators as separate OS processes (each its own API client and node name) filling
// one pool whose blocks run out, so claims race and late nodes must borrow: no address may be
// handed out twice, and blocks and handles must record each address exactly once.
// The child processes are this test binary re-run with `child_allocator` selected.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::IpNet;
use kube::api::{Api, ListParams, PostParams};
use support::ControlPlane;
use tortie::api::ipamblock::IPAMBlock;
use tortie::api::ipamhandle::IPAMHandle;
use tortie::api::{IPPool, IPPoolSpec};
use tortie::ipam::cidr::addr_at;
use tortie::ipam::{AssignRequest, Ipam, pod_handle};

const NODES: usize = 20;
const PER_NODE: usize = 50;
const CHILD_ENV: &str = "TORTIE_IPAM_STRESS_NODE";
/// Optional: addresses per child (default PER_NODE) and a tag that keeps a restarted
/// child's handles distinct from those of the process it replaces.
const COUNT_ENV: &str = "TORTIE_IPAM_STRESS_COUNT";
const TAG_ENV: &str = "TORTIE_IPAM_STRESS_TAG";

/// In a child: allocate PER_NODE addresses concurrently as node `$TORTIE_IPAM_STRESS_NODE`
/// and print one `ALLOC <addr> <handle>` line each. In the parent run: nothing.
#[tokio::test]
async fn child_allocator() -> anyhow::Result<()> {
    let Ok(node) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    let path = std::env::var("KUBECONFIG").context("KUBECONFIG")?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(config)?;
    let count: usize = std::env::var(COUNT_ENV).map_or(Ok(PER_NODE), |c| c.parse())?;
    let tag = std::env::var(TAG_ENV).unwrap_or_default();
    let ipam = std::sync::Arc::new(Ipam::start(client, &node, Duration::from_secs(60)).await?);
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let ipam = ipam.clone();
            let node = node.clone();
            let tag = tag.clone();
            tokio::spawn(async move {
                let handle = pod_handle(&format!("{node}{tag}-{i}"));
                let attrs = BTreeMap::from([("node".to_string(), node.clone())]);
                let got = ipam
                    .auto_assign(&AssignRequest::workload(&handle, attrs))
                    .await;
                (handle, got)
            })
        })
        .collect();
    for t in tasks {
        let (handle, got) = t.await?;
        let got = got.with_context(|| format!("{node}: {handle}"))?;
        println!("ALLOC {} {handle}", got[0].addr());
    }
    let s = ipam.stats();
    println!(
        "STATS {} {} {}",
        s.block_writes.load(std::sync::atomic::Ordering::Relaxed),
        s.cas_conflicts.load(std::sync::atomic::Ordering::Relaxed),
        s.ops_committed.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

#[tokio::test]
async fn twenty_allocator_processes_never_hand_out_an_address_twice() -> anyhow::Result<()> {
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    // 16 blocks of 64 for 20 nodes: at least 4 nodes can claim nothing and must borrow.
    let spec = IPPoolSpec {
        cidr: "10.90.0.0/22".into(),
        block_size: Some(26),
        ..Default::default()
    };
    Api::<IPPool>::all(client.clone())
        .create(&PostParams::default(), &IPPool::new("stress", spec))
        .await?;
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let children: Vec<_> = (0..NODES)
        .map(|n| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "child_allocator",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("stress-node-{n}"))
                .env("KUBECONFIG", cp.kubeconfig_path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("spawn allocator process")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut addrs: BTreeMap<IpAddr, String> = BTreeMap::new();
    let (mut writes, mut conflicts, mut ops) = (0u64, 0u64, 0u64);
    for child in children {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "allocator failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in stdout.lines() {
            // The test harness may print its "test child_allocator ..." on the same line.
            let start = line
                .find("ALLOC ")
                .or_else(|| line.find("STATS "))
                .unwrap_or(0);
            let f: Vec<&str> = line[start..].split_whitespace().collect();
            match f.as_slice() {
                ["ALLOC", addr, handle] => {
                    if let Some(prev) = addrs.insert(addr.parse()?, handle.to_string()) {
                        anyhow::bail!("{addr} handed to both {prev} and {handle}");
                    }
                }
                ["STATS", w, c, o] => {
                    writes += w.parse::<u64>()?;
                    conflicts += c.parse::<u64>()?;
                    ops += o.parse::<u64>()?;
                }
                _ => {}
            }
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(addrs.len(), NODES * PER_NODE);

    // The API server's records agree: each address once in a block, under its handle, and
    // each handle object counts one address.
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut recorded: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut borrowed = 0;
    for b in &blocks.items {
        let cidr: IpNet = b.spec.cidr.parse()?;
        for (ord, a) in b.spec.allocations.iter().enumerate() {
            let Some(idx) = a else { continue };
            let attr = &b.spec.attributes[*idx as usize];
            let handle = attr
                .handle_id
                .clone()
                .context("allocation without handle")?;
            let addr = addr_at(&cidr, ord).context("ordinal")?;
            anyhow::ensure!(
                recorded.insert(addr, handle).is_none(),
                "{addr} recorded twice"
            );
            let node = attr.secondary.as_ref().and_then(|s| s.get("node")).cloned();
            if node.map(|n| format!("host:{n}")) != b.spec.affinity {
                borrowed += 1;
            }
        }
    }
    assert_eq!(
        recorded, addrs,
        "blocks record exactly the addresses handed out"
    );
    let handles = Api::<IPAMHandle>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    assert_eq!(handles.items.len(), NODES * PER_NODE);
    assert!(
        handles
            .items
            .iter()
            .all(|h| h.spec.block.values().sum::<i64>() == 1)
    );
    assert!(
        borrowed > 0,
        "with more nodes than blocks some allocations must be borrowed"
    );
    let distinct: BTreeSet<_> = blocks.items.iter().map(|b| b.spec.cidr.clone()).collect();
    eprintln!(
        "{} addresses by {NODES} processes in {elapsed:?}: {} blocks, {borrowed} borrowed, \
         {writes} block writes for {ops} committed operations, {conflicts} CAS conflicts",
        addrs.len(),
        distinct.len()
    );
    Ok(())
}

fn spawn_child(
    cp: &ControlPlane,
    node: &str,
    count: usize,
    tag: &str,
) -> anyhow::Result<std::process::Child> {
    Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "child_allocator",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, node)
        .env(COUNT_ENV, count.to_string())
        .env(TAG_ENV, tag)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("spawn allocator process")
}

/// `ALLOC` lines a (possibly killed) child printed before it ended.
fn allocations_of(out: &std::process::Output) -> anyhow::Result<Vec<(IpAddr, String)>> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut got = Vec::new();
    for line in stdout.lines() {
        let Some(start) = line.find("ALLOC ") else {
            continue;
        };
        if let [_, addr, handle] = line[start..].split_whitespace().collect::<Vec<_>>()[..] {
            got.push((addr.parse()?, handle.to_string()));
        }
    }
    Ok(got)
}

#[tokio::test]
async fn allocators_killed_mid_allocation_and_restarted_never_duplicate() -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    const COUNT: usize = 30;
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    let spec = IPPoolSpec {
        cidr: "10.91.0.0/22".into(),
        block_size: Some(26),
        ..Default::default()
    };
    Api::<IPPool>::all(client.clone())
        .create(&PostParams::default(), &IPPool::new("crash", spec))
        .await?;
    let seed: u64 = rand::rng().random();
    eprintln!("kill schedule seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut first = Vec::new();
    for n in 0..NODES {
        first.push((
            format!("crash-node-{n}"),
            spawn_child(&cp, &format!("crash-node-{n}"), COUNT, "")?,
        ));
    }
    // Kill every other allocator with SIGKILL at a random moment between its start-up and
    // the end of its run.
    let started = Instant::now();
    let mut schedule: Vec<(Duration, usize)> = (0..NODES)
        .step_by(2)
        .map(|i| (Duration::from_millis(rng.random_range(300..4000)), i))
        .collect();
    schedule.sort();
    let mut killed = Vec::new();
    for (at, i) in schedule {
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        first[i].1.kill().ok();
        killed.push(first[i].0.clone());
    }
    let mut outputs = Vec::new();
    for (_, child) in first {
        outputs.push(tokio::task::spawn_blocking(move || {
            child.wait_with_output()
        }));
    }
    let mut handed: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut record = |out: &std::process::Output| -> anyhow::Result<usize> {
        let got = allocations_of(out)?;
        for (addr, handle) in &got {
            if let Some(prev) = handed.insert(*addr, handle.clone()) {
                anyhow::bail!("{addr} handed to both {prev} and {handle}");
            }
        }
        Ok(got.len())
    };
    let mut before_restart = 0;
    for o in outputs {
        before_restart += record(&o.await??)?;
    }
    // The killed nodes come back (same node names) and allocate again.
    let restarted: Vec<_> = killed
        .iter()
        .map(|node| spawn_child(&cp, node, COUNT, "-again"))
        .collect::<anyhow::Result<_>>()?;
    for child in restarted {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
        anyhow::ensure!(out.status.success(), "restarted allocator failed");
        assert_eq!(record(&out)?, COUNT);
    }

    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut recorded: BTreeMap<IpAddr, String> = BTreeMap::new();
    for b in &blocks.items {
        let cidr: IpNet = b.spec.cidr.parse()?;
        for (ord, a) in b.spec.allocations.iter().enumerate() {
            let Some(idx) = a else { continue };
            let handle = b.spec.attributes[*idx as usize]
                .handle_id
                .clone()
                .context("handle")?;
            let addr = addr_at(&cidr, ord).context("ordinal")?;
            anyhow::ensure!(
                recorded.insert(addr, handle).is_none(),
                "{addr} recorded twice"
            );
        }
    }
    for (addr, handle) in &handed {
        assert_eq!(
            recorded.get(addr),
            Some(handle),
            "{addr} handed out under {handle} but not recorded so"
        );
    }
    let leaked = recorded.len() - handed.len();
    eprintln!(
        "{} killed, {before_restart} addresses handed out before restart, {} in total, \
         {leaked} recorded but never handed out (left for GC), 0 duplicates",
        killed.len(),
        handed.len()
    );
    Ok(())
}
