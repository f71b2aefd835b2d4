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

/// In a child: allocate PER_NODE addresses concurrently as node `$TORTIE_IPAM_STRESS_NODE`
/// and print one `ALLOC <addr> <handle>` line each. In the parent run: nothing.
#[tokio::test]
async fn child_allocator() -> anyhow::Result<()> {
    let Ok(node) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    let path = std::env::var("KUBECONFIG").context("KUBECONFIG")?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await?;
    let client = kube::Client::try_from(config)?;
    let ipam = std::sync::Arc::new(Ipam::start(client, &node, Duration::from_secs(60)).await?);
    let tasks: Vec<_> = (0..PER_NODE)
        .map(|i| {
            let ipam = ipam.clone();
            let node = node.clone();
            tokio::spawn(async move {
                let handle = pod_handle(&format!("{node}-{i}"));
                let attrs = BTreeMap::from([("node".to_string(), node.clone())]);
                let got = ipam.auto_assign(&AssignRequest::workload(&handle, attrs)).await;
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
    let spec = IPPoolSpec { cidr: "10.90.0.0/22".into(), block_size: Some(26), ..Default::default() };
    Api::<IPPool>::all(client.clone())
        .create(&PostParams::default(), &IPPool::new("stress", spec))
        .await?;
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let children: Vec<_> = (0..NODES)
        .map(|n| {
            Command::new(&exe)
                .args(["--exact", "child_allocator", "--nocapture", "--test-threads=1"])
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
            let f: Vec<&str> = line.split_whitespace().collect();
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
    let blocks = Api::<IPAMBlock>::all(client.clone()).list(&ListParams::default()).await?;
    let mut recorded: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut borrowed = 0;
    for b in &blocks.items {
        let cidr: IpNet = b.spec.cidr.parse()?;
        for (ord, a) in b.spec.allocations.iter().enumerate() {
            let Some(idx) = a else { continue };
            let attr = &b.spec.attributes[*idx as usize];
            let handle = attr.handle_id.clone().context("allocation without handle")?;
            let addr = addr_at(&cidr, ord).context("ordinal")?;
            anyhow::ensure!(recorded.insert(addr, handle).is_none(), "{addr} recorded twice");
            let node = attr.secondary.as_ref().and_then(|s| s.get("node")).cloned();
            if node.map(|n| format!("host:{n}")) != b.spec.affinity {
                borrowed += 1;
            }
        }
    }
    assert_eq!(recorded, addrs, "blocks record exactly the addresses handed out");
    let handles = Api::<IPAMHandle>::all(client.clone()).list(&ListParams::default()).await?;
    assert_eq!(handles.items.len(), NODES * PER_NODE);
    assert!(handles.items.iter().all(|h| h.spec.block.values().sum::<i64>() == 1));
    assert!(borrowed > 0, "with more nodes than blocks some allocations must be borrowed");
    let distinct: BTreeSet<_> = blocks.items.iter().map(|b| b.spec.cidr.clone()).collect();
    eprintln!(
        "{} addresses by {NODES} processes in {elapsed:?}: {} blocks, {borrowed} borrowed, \
         {writes} block writes for {ops} committed operations, {conflicts} CAS conflicts",
        addrs.len(),
        distinct.len()
    );
    Ok(())
}
