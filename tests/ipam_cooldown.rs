// IPAMConfig `ipCooldownSeconds` against the real API server: a full pool whose only free
// addresses are expired holds serves the next CNI ADD (the read for allocation collects
// them; no scan involved), blocks an older tortie wrote with `releasedAt` while the cooldown
// is 0 are converted at start-up, and addresses allocated to no handle (`{}`) are released
// by the leader's GC after the grace period unless a pod uses them.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use chrono::{TimeDelta, Utc};
use kube::Client;
use kube::api::{Api, PostParams};
use support::cni::{Harness, NODE, cnitool, create_pod, harness};
use support::{ControlPlane, NetNs};
use tokio::sync::watch;
use tortie::api::ipamblock::IPAMBlock;
use tortie::api::ipamconfig::{IPAMConfig, IPAMConfigSpec};
use tortie::ipam::Ipam;
use tortie::ipam::block::{Attribute, Block, Owner, Slot, host_affinity};
use tortie::ipam::cidr::block_name;
use tortie::ipam::convert::{block_from_spec, block_to_spec};
use tortie::ipam::gc::{self, Cluster, GcConfig, GcStatus, cooldown};
use tortie::ipam::reservations::Reservations;

async fn set_cooldown(client: &Client, secs: i32) -> anyhow::Result<()> {
    let api: Api<IPAMConfig> = Api::all(client.clone());
    let spec = IPAMConfigSpec {
        ip_cooldown_seconds: Some(secs),
        ..IPAMConfigSpec::default()
    };
    match api.get_opt("default").await? {
        Some(mut c) => {
            c.spec = spec;
            api.replace("default", &PostParams::default(), &c).await?;
        }
        None => {
            api.create(&PostParams::default(), &IPAMConfig::new("default", spec))
                .await?;
        }
    }
    Ok(())
}

async fn wait_cooldown(ipam: &Ipam, secs: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ipam.with_view(|v| v.limits.cooldown) != TimeDelta::seconds(secs) {
        ensure!(Instant::now() < deadline, "IPAM never saw the cooldown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn block_of(client: &Client, cidr: &str) -> anyhow::Result<Block> {
    let b = Api::<IPAMBlock>::all(client.clone())
        .get(&block_name(&cidr.parse()?))
        .await?;
    Ok(block_from_spec(&b.spec)?)
}

async fn add_ok(h: &Harness, pod: &str, netns: &NetNs) -> anyhow::Result<String> {
    let o = cnitool(h, "add", pod, &netns.path()).await?;
    ensure!(o.ok, "ADD {pod}: {} {}", o.stdout, o.stderr);
    h.remember(tortie::cni::install::NETWORK_NAME, &netns.path());
    Ok(o.json()["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .trim_end_matches("/32")
        .to_string())
}

#[tokio::test]
async fn an_exhausted_pool_whose_only_free_addresses_are_expired_holds_serves_the_next_add()
-> anyhow::Result<()> {
    const COOLDOWN: i32 = 4;
    let h = harness("10.251.0.0/29", 29).await?;
    let client = h.cp.client();
    set_cooldown(&client, COOLDOWN).await?;
    wait_cooldown(&h.ipam, i64::from(COOLDOWN)).await?;

    let mut sandboxes = Vec::new();
    let mut ips = Vec::new();
    for i in 0..8 {
        let name = format!("full-{i}");
        create_pod(&client, &name, &[]).await?;
        let ns = NetNs::new("pod")?;
        ips.push(add_ok(&h, &name, &ns).await?);
        sandboxes.push((name, ns));
    }
    let mut released = Vec::new();
    for (i, (name, ns)) in sandboxes.iter().enumerate().take(3) {
        let o = cnitool(&h, "del", name, &ns.path()).await?;
        ensure!(o.ok, "DEL {name}: {}", o.stderr);
        released.push(ips[i].clone());
    }
    let b = block_of(&client, "10.251.0.0/29").await?;
    assert_eq!(
        (b.cooling_count(), b.in_use_count(), b.unallocated.len()),
        (3, 5, 0)
    );

    create_pod(&client, "next", &[]).await?;
    let next = NetNs::new("pod")?;
    let refused = cnitool(&h, "add", "next", &next.path()).await?;
    assert!(!refused.ok, "{}", refused.stdout);
    let said = format!("{} {}", refused.stdout, refused.stderr);
    assert!(
        said.contains("5 of 8 in use, 3 released and cooling down"),
        "{said}"
    );

    // No scan runs in this test: the ADD's own read of the full block collects the holds.
    tokio::time::sleep(Duration::from_secs(u64::try_from(COOLDOWN)? + 2)).await;
    let ip = add_ok(&h, "next", &next).await?;
    assert!(
        released.contains(&ip),
        "{ip} is one of the released {released:?}"
    );
    let b = block_of(&client, "10.251.0.0/29").await?;
    assert_eq!(
        (b.cooling_count(), b.in_use_count(), b.unallocated.len()),
        (0, 6, 2),
        "the write collected every expired hold"
    );
    assert!(b.attributes.iter().all(|a| a.released_at.is_none()));
    Ok(())
}

/// A block as an older tortie left it: two addresses held, two released with `releasedAt`
/// (it always held released addresses for 30 s), one `{}` entry.
fn old_block(cidr: &str, node: &str) -> anyhow::Result<IPAMBlock> {
    let t0 = Utc::now() - TimeDelta::seconds(5);
    let mut b = Block::new(cidr.parse()?, Some(host_affinity(node)), Some(t0), 1)?;
    for h in ["keep", "gone", "gone", "lost"] {
        let owner = Owner {
            handle_id: h.into(),
            attrs: BTreeMap::from([("node".into(), node.into())]),
        };
        b.auto_assign(1, &owner, &Reservations::EMPTY, t0, TimeDelta::seconds(30));
    }
    b.release_by_handle("gone", t0, TimeDelta::seconds(30));
    let lost = b.allocations[3].context("lost is allocated")?;
    b.attributes[lost] = Attribute::default();
    Ok(IPAMBlock::new(&block_name(&b.cidr), block_to_spec(&b)))
}

#[tokio::test]
async fn released_at_entries_are_converted_at_start_up_and_ownerless_ones_collected_after_the_grace()
-> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node(NODE, &[]).await?;
    support::pools::create_pool(&client, "p", "10.252.0.0/24", 29).await?;
    let blocks: Api<IPAMBlock> = Api::all(client.clone());
    blocks
        .create(&PostParams::default(), &old_block("10.252.0.0/29", NODE)?)
        .await?;
    // A second `{}` entry whose address a pod reports: never released by the GC.
    blocks
        .create(&PostParams::default(), &old_block("10.252.0.8/29", NODE)?)
        .await?;
    support::pods::create_pod_on(
        &client,
        "default",
        "uses-it",
        NODE,
        &[("cni.projectcalico.org/podIP", "10.252.0.11/32")],
    )
    .await?;

    let ipam = Arc::new(Ipam::start(client.clone(), NODE, Duration::from_secs(30)).await?);
    let (stop, stopped) = watch::channel(false);
    // What every daemon runs for its own blocks: the first scan converts at start-up.
    tokio::spawn(cooldown::run(
        ipam.clone(),
        cooldown::Scope::Node(NODE.into()),
        None,
        stopped.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = block_of(&client, "10.252.0.0/29").await?;
        if b.cooling_count() == 0 {
            assert_eq!(b.in_use_count(), 1, "{b:?}");
            assert_eq!(b.ownerless_count(), 1);
            assert!(b.attributes.iter().all(|a| a.released_at.is_none()));
            assert_eq!(
                &b.unallocated[4..],
                &[1, 2],
                "freed in ordinal order at the tail"
            );
            break;
        }
        ensure!(Instant::now() < deadline, "never converted: {b:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The leader's GC: the `{}` entry nobody uses goes after the grace period.
    let (pods, _) = gc::watch_pods(client.clone());
    let (nodes, _) = gc::watch_nodes(client.clone());
    let (_leader, is_leader) = watch::channel(true);
    let status = GcStatus::default();
    tokio::spawn(gc::run(
        ipam.clone(),
        Cluster {
            client: client.clone(),
            pods,
            nodes,
        },
        is_leader,
        GcConfig::with_grace(Duration::from_secs(2)),
        status.clone(),
        stopped,
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b = block_of(&client, "10.252.0.0/29").await?;
        if b.ownerless_count() == 0 {
            assert_eq!(b.slot(3), Slot::Free);
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "ownerless entry never released: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts = status.snapshot();
    assert!(
        counts
            .reclamations
            .get(&("p".to_string(), "unknown_node".to_string()))
            .is_some_and(|n| *n >= 1),
        "{counts:?}"
    );
    let kept = block_of(&client, "10.252.0.8/29").await?;
    assert_eq!(
        kept.slot(3),
        Slot::Ownerless,
        "the `{{}}` address a pod reports stays"
    );
    let _ = stop.send(true);
    Ok(())
}
