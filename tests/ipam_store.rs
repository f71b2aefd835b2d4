// IPAM against the real API server: claims, allocation, release, group commit, and two
// allocators (separate clients, separate node names) racing over one small pool.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use support::ControlPlane;
use tortie::api::blockaffinity::{AffinityState, BlockAffinity};
use tortie::api::ipamblock::IPAMBlock;
use tortie::api::ipamconfig::{IPAMConfig, IPAMConfigSpec};
use tortie::api::ipamhandle::IPAMHandle;
use tortie::api::{IPPool, IPPoolSpec};
use tortie::ipam::cidr::addr_at;
use tortie::ipam::pools::Family;
use tortie::ipam::{AssignRequest, Ipam, IpamError, TunnelKind, pod_handle};

const SYNC: Duration = Duration::from_secs(30);

use support::pools::create_pool;

/// Polls `cond` (a view catching up with a watch) for up to 30 s.
async fn wait_until(what: &str, cond: impl Fn() -> bool) -> anyhow::Result<()> {
    for _ in 0..300 {
        if cond() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out waiting until {what}")
}

fn attrs(node: &str, pod: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("node".to_string(), node.to_string()),
        ("namespace".to_string(), "default".to_string()),
        ("pod".to_string(), pod.to_string()),
    ])
}

/// Every (address, handle) recorded in the API server's blocks, and the handles' counts.
async fn recorded(
    client: &Client,
) -> anyhow::Result<(Vec<(IpAddr, String)>, BTreeMap<String, i64>)> {
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut held = Vec::new();
    for b in &blocks.items {
        let cidr: IpNet = b.spec.cidr.parse()?;
        for (ord, a) in b.spec.allocations.iter().enumerate() {
            if let Some(idx) = a {
                let attr = &b.spec.attributes[*idx as usize];
                if let Some(h) = &attr.handle_id {
                    let addr = addr_at(&cidr, ord).context("ordinal inside the block")?;
                    held.push((addr, h.clone()));
                }
            }
        }
    }
    let handles = Api::<IPAMHandle>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let counts = handles
        .items
        .iter()
        .map(|h| (h.spec.handle_id.clone(), h.spec.block.values().sum::<i64>()))
        .collect();
    Ok((held, counts))
}

#[tokio::test]
async fn allocation_claims_a_block_records_the_handle_and_release_is_idempotent()
-> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node("node-1", &[]).await?;
    create_pool(&client, "default-pool", "10.10.0.0/24", 29).await?;
    let ipam = Ipam::start(client.clone(), "node-1", SYNC).await?;

    let handle = pod_handle("c0ffee");
    let got = ipam
        .auto_assign(&AssignRequest::workload(&handle, attrs("node-1", "p1")))
        .await?;
    assert_eq!(got.len(), 1);
    let addr = got[0];
    assert_eq!(addr.prefix_len(), 32);
    let block_cidr = IpNet::new(addr.addr(), 29)?.trunc();
    assert!("10.10.0.0/24".parse::<IpNet>()?.contains(&block_cidr));

    let block_name = block_cidr.to_string().replace(['.', '/'], "-");
    let block = Api::<IPAMBlock>::all(client.clone())
        .get(&block_name)
        .await?;
    assert_eq!(block.spec.affinity.as_deref(), Some("host:node-1"));
    let aff = Api::<BlockAffinity>::all(client.clone())
        .get(&format!("node-1-{block_name}"))
        .await?;
    assert_eq!(aff.spec.state, AffinityState::Confirmed);
    assert_eq!(aff.spec.deleted, "false");
    let h = Api::<IPAMHandle>::all(client.clone()).get(&handle).await?;
    assert_eq!(h.spec.block, BTreeMap::from([(block_cidr.to_string(), 1)]));

    let (held, _) = recorded(&client).await?;
    assert_eq!(held, vec![(addr.addr(), handle.clone())]);

    let released = ipam.release_by_handle(&handle).await?;
    assert_eq!(released, vec![addr.addr()]);
    assert!(
        Api::<IPAMHandle>::all(client.clone())
            .get_opt(&handle)
            .await?
            .is_none()
    );
    assert!(recorded(&client).await?.0.is_empty());
    assert!(
        ipam.release_by_handle(&handle).await?.is_empty(),
        "second release is a no-op"
    );

    // Cooldown: the next allocation does not reuse the address just released.
    let again = ipam
        .auto_assign(&AssignRequest::workload(
            pod_handle("next"),
            attrs("node-1", "p2"),
        ))
        .await?;
    assert_ne!(again[0], addr);
    Ok(())
}

#[tokio::test]
async fn concurrent_requests_get_distinct_addresses_in_few_writes() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node("node-1", &[]).await?;
    create_pool(&client, "pool", "10.20.0.0/22", 26).await?;
    let ipam = Arc::new(Ipam::start(client.clone(), "node-1", SYNC).await?);

    const N: usize = 100;
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let ipam = ipam.clone();
            tokio::spawn(async move {
                let req = AssignRequest::workload(
                    pod_handle(&format!("c{i}")),
                    attrs("node-1", &format!("p{i}")),
                );
                ipam.auto_assign(&req).await
            })
        })
        .collect();
    let mut addrs = BTreeSet::new();
    for t in tasks {
        let got = t.await??;
        assert!(addrs.insert(got[0].addr()), "duplicate address {}", got[0]);
    }
    assert_eq!(addrs.len(), N);
    let elapsed = started.elapsed();

    let (held, counts) = recorded(&client).await?;
    assert_eq!(
        held.len(),
        N,
        "every address is recorded once in the blocks"
    );
    let recorded_addrs: BTreeSet<IpAddr> = held.iter().map(|(a, _)| *a).collect();
    assert_eq!(recorded_addrs, addrs);
    for (addr, handle) in &held {
        assert_eq!(
            counts.get(handle),
            Some(&1),
            "handle object of {addr} ({handle})"
        );
    }
    assert_eq!(counts.len(), N);

    let writes = ipam.stats().block_writes.load(Ordering::Relaxed);
    let ops = ipam.stats().ops_committed.load(Ordering::Relaxed);
    eprintln!(
        "{N} concurrent allocations in {elapsed:?} (incl. first block claim): \
         {writes} block writes, {ops} operations committed"
    );
    // Warm, one at a time: the latency one CNI ADD sees from IPAM (block PUT + handle create).
    let mut lat = Vec::new();
    for i in 0..30 {
        let req = AssignRequest::workload(pod_handle(&format!("seq{i}")), attrs("node-1", "s"));
        let t = std::time::Instant::now();
        ipam.auto_assign(&req).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    eprintln!(
        "sequential warm allocation: p50 {:?}, max {:?}",
        lat[15], lat[29]
    );
    assert!(
        writes < N as u64,
        "group commit should merge writes: {writes} writes for {N} allocations"
    );
    Ok(())
}

#[tokio::test]
async fn two_nodes_racing_over_a_small_pool_never_share_an_address() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.client();
    cp.create_node("node-a", &[]).await?;
    cp.create_node("node-b", &[]).await?;
    create_pool(&admin, "external-pool", "172.16.0.0/26", 29).await?;
    let a = Arc::new(
        Ipam::start(
            cp.client_for("node-a", &["system:masters"]).await?,
            "node-a",
            SYNC,
        )
        .await?,
    );
    let b = Arc::new(
        Ipam::start(
            cp.client_for("node-b", &["system:masters"]).await?,
            "node-b",
            SYNC,
        )
        .await?,
    );

    let mut tasks = Vec::new();
    for i in 0..64 {
        let ipam = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let node = ipam.node().to_string();
            let req = AssignRequest::workload(
                pod_handle(&format!("race{i}")),
                attrs(&node, &format!("p{i}")),
            );
            ipam.auto_assign(&req).await
        }));
    }
    let mut addrs = BTreeSet::new();
    for t in tasks {
        let got = t
            .await?
            .context("all 64 addresses of the pool are handed out")?;
        assert!(addrs.insert(got[0].addr()), "duplicate address {}", got[0]);
    }
    assert_eq!(addrs.len(), 64);
    let (held, counts) = recorded(&admin).await?;
    assert_eq!(held.len(), 64);
    assert_eq!(counts.len(), 64);
    assert!(counts.values().all(|c| *c == 1));

    // Let node-a's view catch up with node-b's writes, then the 65th address must fail.
    wait_until("node-a sees all 64 addresses in use", || {
        a.with_view(|v| v.infos.values().map(|i| i.in_use).sum::<usize>()) == 64
    })
    .await?;
    let err = a
        .auto_assign(&AssignRequest::workload(
            pod_handle("one-too-many"),
            attrs("node-a", "p65"),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pool \"external-pool\" (172.16.0.0/26) has no free address: 64 of 64 in use"
    );
    assert!(matches!(err, IpamError::Exhausted { .. }));
    Ok(())
}

#[tokio::test]
async fn strict_affinity_and_block_limit_fail_with_clear_errors() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node("node-a", &[]).await?;
    cp.create_node("node-b", &[]).await?;
    create_pool(&client, "tiny", "10.30.0.0/29", 30).await?;
    let spec = IPAMConfigSpec {
        strict_affinity: true,
        max_blocks_per_host: Some(1),
        ..Default::default()
    };
    Api::<IPAMConfig>::all(client.clone())
        .create(&PostParams::default(), &IPAMConfig::new("default", spec))
        .await?;
    let a = Ipam::start(client.clone(), "node-a", SYNC).await?;
    for i in 0..4 {
        a.auto_assign(&AssignRequest::workload(
            pod_handle(&format!("a{i}")),
            attrs("node-a", "p"),
        ))
        .await?;
    }
    let err = a
        .auto_assign(&AssignRequest::workload(
            pod_handle("a-extra"),
            attrs("node-a", "p"),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "node \"node-a\" holds 1 blocks, the maxBlocksPerHost limit (1), and none has a free address"
    );

    let b = Ipam::start(client.clone(), "node-b", SYNC).await?;
    b.auto_assign(&AssignRequest::workload(
        pod_handle("b0"),
        attrs("node-b", "p"),
    ))
    .await?;
    // node-b's block has room left, but node-a may not borrow under strict affinity.
    let mut cfg = Api::<IPAMConfig>::all(client.clone())
        .get("default")
        .await?;
    cfg.spec.max_blocks_per_host = Some(2);
    Api::<IPAMConfig>::all(client.clone())
        .replace("default", &PostParams::default(), &cfg)
        .await?;
    wait_until("node-a sees the new limit and node-b's block", || {
        a.with_view(|v| v.limits.max_blocks_per_host == 2 && v.infos.len() == 2)
    })
    .await?;
    let err = a
        .auto_assign(&AssignRequest::workload(
            pod_handle("a-borrow"),
            attrs("node-a", "p"),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "node \"node-a\" has no free address in its own blocks and no block left to claim in \
         pools [\"tiny\"]; other nodes' blocks have room but strictAffinity is true"
    );
    Ok(())
}

#[tokio::test]
async fn fixed_ip_and_tunnel_address_are_assigned_and_checked() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node("node-1", &[]).await?;
    create_pool(&client, "pool", "10.40.0.0/24", 28).await?;
    let mut off = IPPool::new(
        "off",
        IPPoolSpec {
            cidr: "10.41.0.0/24".into(),
            ..Default::default()
        },
    );
    off.spec.disabled = true;
    Api::<IPPool>::all(client.clone())
        .create(&PostParams::default(), &off)
        .await?;
    let ipam = Ipam::start(client.clone(), "node-1", SYNC).await?;

    let ip: IpAddr = "10.40.0.7".parse()?;
    let workload = tortie::api::AllowedUse::Workload;
    let got = ipam
        .assign_ip(ip, &pod_handle("fixed"), attrs("node-1", "f"), workload)
        .await?;
    assert_eq!(got.addr(), ip);
    let err = ipam
        .assign_ip(ip, &pod_handle("fixed2"), attrs("node-1", "g"), workload)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "address 10.40.0.7 is already in use by handle \"k8s-pod-network.fixed\""
    );
    let err = ipam
        .assign_ip(
            "10.99.0.1".parse()?,
            &pod_handle("x"),
            attrs("node-1", "x"),
            workload,
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot assign fixed address 10.99.0.1: it is outside every IP pool"
    );
    let err = ipam
        .assign_ip(
            "10.41.0.1".parse()?,
            &pod_handle("x"),
            attrs("node-1", "x"),
            workload,
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot assign fixed address 10.41.0.1: its pool \"off\" (10.41.0.0/24) is disabled"
    );

    let tunnel = ipam
        .assign_tunnel_addr(TunnelKind::Vxlan, Family::V4)
        .await?;
    assert_eq!(
        ipam.assign_tunnel_addr(TunnelKind::Vxlan, Family::V4)
            .await?,
        tunnel,
        "stable"
    );
    let h = Api::<IPAMHandle>::all(client.clone())
        .get("vxlan-tunnel-addr-node-1")
        .await?;
    assert_eq!(h.spec.handle_id, "vxlan-tunnel-addr-node-1");
    let (held, _) = recorded(&client).await?;
    assert!(held.contains(&(tunnel.addr(), "vxlan-tunnel-addr-node-1".to_string())));
    assert_eq!(
        ipam.release_tunnel_addr(TunnelKind::Vxlan).await?,
        vec![tunnel.addr()]
    );
    Ok(())
}

#[tokio::test]
async fn borrowing_and_reclaiming_when_a_pool_has_no_unclaimed_block() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node("node-a", &[]).await?;
    cp.create_node("node-b", &[]).await?;
    create_pool(&client, "pair", "10.50.0.0/28", 29).await?;
    let a = Ipam::start(client.clone(), "node-a", SYNC).await?;
    for i in 0..9 {
        a.auto_assign(&AssignRequest::workload(
            pod_handle(&format!("a{i}")),
            attrs("node-a", "p"),
        ))
        .await?;
    }
    // Both /29 blocks are node-a's; node-b borrows from the one with room.
    let b = Ipam::start(client.clone(), "node-b", SYNC).await?;
    let borrowed = b
        .auto_assign(&AssignRequest::workload(
            pod_handle("b0"),
            attrs("node-b", "p"),
        ))
        .await?;
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    assert_eq!(blocks.items.len(), 2);
    let holder = blocks
        .items
        .iter()
        .find(|blk| {
            blk.spec
                .cidr
                .parse::<IpNet>()
                .is_ok_and(|c| c.contains(&borrowed[0].addr()))
        })
        .context("block of the borrowed address")?;
    assert_eq!(
        holder.spec.affinity.as_deref(),
        Some("host:node-a"),
        "borrowed, not claimed"
    );

    // A pool whose only block belongs to a node that left long ago, with nothing in it:
    // node-b takes the block over.
    create_pool(&client, "stale", "10.60.0.0/29", 29).await?;
    let old = chrono::Utc::now() - chrono::TimeDelta::minutes(5);
    let stale = tortie::ipam::block::Block::new(
        "10.60.0.0/29".parse()?,
        Some("host:node-gone".into()),
        Some(old),
        7,
    )?;
    let spec = tortie::ipam::convert::block_to_spec(&stale);
    Api::<IPAMBlock>::all(client.clone())
        .create(
            &PostParams::default(),
            &IPAMBlock::new("10-60-0-0-29", spec),
        )
        .await?;
    wait_until("node-b sees the stale block", || {
        b.with_view(|v| v.infos.keys().any(|c| c.to_string() == "10.60.0.0/29"))
    })
    .await?;
    let mut req = AssignRequest::workload(pod_handle("b1"), attrs("node-b", "p"));
    req.cni_v4_pools = vec!["stale".into()];
    let got = b.auto_assign(&req).await?;
    assert_eq!(got[0].to_string(), "10.60.0.0/32");
    let blk = Api::<IPAMBlock>::all(client.clone())
        .get("10-60-0-0-29")
        .await?;
    assert_eq!(blk.spec.affinity.as_deref(), Some("host:node-b"));
    Ok(())
}

#[tokio::test]
async fn namespace_annotation_and_dual_stack_choose_the_right_pools() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node("node-1", &[]).await?;
    create_pool(&client, "external-pool", "172.16.0.0/26", 29).await?;
    create_pool(&client, "internal-pool", "192.169.0.0/24", 29).await?;
    create_pool(&client, "v6-pool", "fd00:10::/64", 122).await?;
    let ipam = Ipam::start(client.clone(), "node-1", SYNC).await?;

    for (ns_pool, cidr) in [
        ("external-pool", "172.16.0.0/26"),
        ("internal-pool", "192.169.0.0/24"),
    ] {
        let net: IpNet = cidr.parse()?;
        for i in 0..3 {
            let mut req = AssignRequest::workload(
                pod_handle(&format!("{ns_pool}-{i}")),
                attrs("node-1", "p"),
            );
            req.namespace_annotations = Some(BTreeMap::from([(
                "cni.projectcalico.org/ipv4pools".to_string(),
                format!("[\"{ns_pool}\"]"),
            )]));
            let got = ipam.auto_assign(&req).await?;
            assert!(
                net.contains(&got[0].addr()),
                "{} not from {ns_pool}",
                got[0]
            );
        }
    }

    let mut req = AssignRequest::workload(pod_handle("dual"), attrs("node-1", "d"));
    req.v6 = true;
    req.namespace_annotations = Some(BTreeMap::from([(
        "cni.projectcalico.org/ipv4pools".to_string(),
        "[\"internal-pool\"]".to_string(),
    )]));
    let got = ipam.auto_assign(&req).await?;
    assert_eq!(got.len(), 2);
    assert!(got[0].addr().is_ipv4() && got[1].addr().is_ipv6());
    assert_eq!(got[1].prefix_len(), 128);
    assert!("fd00:10::/64".parse::<IpNet>()?.contains(&got[1].addr()));
    let h = Api::<IPAMHandle>::all(client.clone())
        .get(&pod_handle("dual"))
        .await?;
    assert_eq!(
        h.spec.block.len(),
        2,
        "one handle records both families: {:?}",
        h.spec.block
    );
    assert_eq!(ipam.release_by_handle(&pod_handle("dual")).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn two_nodes_writing_one_block_resolve_conflicts_without_sharing() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let admin = cp.client();
    cp.create_node("node-a", &[]).await?;
    cp.create_node("node-b", &[]).await?;
    create_pool(&admin, "one-block", "10.70.0.0/29", 29).await?;
    let spec = IPAMConfigSpec {
        ip_cooldown_seconds: Some(0),
        ..Default::default()
    };
    Api::<IPAMConfig>::all(admin.clone())
        .create(&PostParams::default(), &IPAMConfig::new("default", spec))
        .await?;
    let a = Arc::new(
        Ipam::start(
            cp.client_for("node-a", &["system:masters"]).await?,
            "node-a",
            SYNC,
        )
        .await?,
    );
    let b = Arc::new(
        Ipam::start(
            cp.client_for("node-b", &["system:masters"]).await?,
            "node-b",
            SYNC,
        )
        .await?,
    );
    a.auto_assign(&AssignRequest::workload(
        pod_handle("seed"),
        attrs("node-a", "s"),
    ))
    .await?;
    wait_until("node-b sees node-a's block", || {
        b.with_view(|v| v.infos.len() == 1)
    })
    .await?;

    // Each round the two nodes fill the rest of the one block at the same time (node-b by
    // borrowing), so their compare-and-swap writes collide; then everything is released.
    for round in 0..8 {
        let mut tasks = Vec::new();
        for i in 0..7 {
            let ipam = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let node = ipam.node().to_string();
                let handle = pod_handle(&format!("r{round}-{i}"));
                let got = ipam
                    .auto_assign(&AssignRequest::workload(&handle, attrs(&node, "p")))
                    .await;
                (ipam, handle, got)
            }));
        }
        let mut addrs = BTreeSet::new();
        let mut owners = Vec::new();
        for t in tasks {
            let (ipam, handle, got) = t.await?;
            let got = got.with_context(|| format!("round {round}"))?;
            assert!(
                addrs.insert(got[0].addr()),
                "round {round}: duplicate {}",
                got[0]
            );
            owners.push((ipam, handle));
        }
        let (held, _) = recorded(&admin).await?;
        assert_eq!(
            held.len(),
            8,
            "round {round}: every address recorded once: {held:?}"
        );
        for (ipam, handle) in owners {
            ipam.release_by_handle(&handle).await?;
        }
    }
    let conflicts = a.stats().cas_conflicts.load(Ordering::Relaxed)
        + b.stats().cas_conflicts.load(Ordering::Relaxed);
    eprintln!("8 contended rounds: {conflicts} compare-and-swap conflicts resolved");
    Ok(())
}

#[tokio::test]
async fn restart_after_a_claim_interrupted_before_confirm_finishes_it() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node("node-1", &[]).await?;
    create_pool(&client, "pool", "10.80.0.0/24", 29).await?;
    // What a crash between "block created" and "affinity confirmed" leaves behind.
    let mut aff = tortie::api::blockaffinity::BlockAffinitySpec {
        state: AffinityState::Pending,
        node: "node-1".into(),
        type_: Some(tortie::api::blockaffinity::AffinityType::Host),
        cidr: "10.80.0.8/29".into(),
        deleted: String::new(),
    };
    aff.set_deleted(false);
    Api::<BlockAffinity>::all(client.clone())
        .create(
            &PostParams::default(),
            &BlockAffinity::new("node-1-10-80-0-8-29", aff),
        )
        .await?;
    let block = tortie::ipam::block::Block::new(
        "10.80.0.8/29".parse()?,
        Some("host:node-1".into()),
        Some(chrono::Utc::now()),
        1,
    )?;
    Api::<IPAMBlock>::all(client.clone())
        .create(
            &PostParams::default(),
            &IPAMBlock::new("10-80-0-8-29", tortie::ipam::convert::block_to_spec(&block)),
        )
        .await?;

    let ipam = Ipam::start(client.clone(), "node-1", SYNC).await?;
    let aff = Api::<BlockAffinity>::all(client.clone())
        .get("node-1-10-80-0-8-29")
        .await?;
    assert_eq!(aff.spec.state, AffinityState::Confirmed);
    let got = ipam
        .auto_assign(&AssignRequest::workload(
            pod_handle("after-restart"),
            attrs("node-1", "p"),
        ))
        .await?;
    assert_eq!(
        got[0].to_string(),
        "10.80.0.8/32",
        "the half-claimed block is used, no new claim"
    );
    assert_eq!(
        Api::<IPAMBlock>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .len(),
        1
    );
    Ok(())
}
