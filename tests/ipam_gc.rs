// IPAM's cleanup jobs against the real API server: leaked-address GC by pod UID and address
// after a grace period (never before), GC continuing after the Lease holder dies, release of
// deleted nodes' blocks and affinities, node-local release of idle blocks, and deletion of
// IPAMHandle objects no allocation references (after the grace period, per object version).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::pods::create_pod_uid as create_pod;

use anyhow::Context;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::ControlPlane;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tortie::api::IPPoolSpec;
use tortie::api::blockaffinity::{AffinityState, AffinityType, BlockAffinity, BlockAffinitySpec};
use tortie::api::ipamblock::IPAMBlock;
use tortie::api::ipamconfig::{IPAMConfig, IPAMConfigSpec};
use tortie::api::ipamhandle::{IPAMHandle, IPAMHandleSpec, handle_object_name};
use tortie::cni::handlers::ATTR_POD_UID;
use tortie::datastore::lease::{Election, LeaderElector, LeaseConfig};
use tortie::ipam::cidr::addr_at;
use tortie::ipam::gc::local::{self, LocalConfig};
use tortie::ipam::gc::{self, Cluster, GcConfig, GcStatus};
use tortie::ipam::pools::Family;
use tortie::ipam::{AssignRequest, Ipam, IpamError, TunnelKind, pod_handle};

const SYNC: Duration = Duration::from_secs(30);

async fn create_pool(client: &Client, name: &str, cidr: &str, bs: i32) -> anyhow::Result<()> {
    create_pool_with(client, name, cidr, bs, None).await
}

async fn create_pool_with(
    client: &Client,
    name: &str,
    cidr: &str,
    block_size: i32,
    node_selector: Option<&str>,
) -> anyhow::Result<()> {
    let spec = IPPoolSpec {
        cidr: cidr.into(),
        block_size: Some(block_size),
        node_selector: node_selector.map(str::to_string),
        ..Default::default()
    };
    support::pools::create_pool_spec(client, name, spec).await
}

/// No reuse cooldown, so a released block is empty at once.
async fn no_cooldown(client: &Client) -> anyhow::Result<()> {
    let spec = IPAMConfigSpec {
        ip_cooldown_seconds: Some(0),
        ..Default::default()
    };
    Api::<IPAMConfig>::all(client.clone())
        .create(&PostParams::default(), &IPAMConfig::new("default", spec))
        .await?;
    Ok(())
}

async fn delete_pod(client: &Client, name: &str) -> anyhow::Result<()> {
    let api = Api::<Pod>::namespaced(client.clone(), "default");
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    api.delete(name, &dp).await?;
    wait_until(&format!("pod {name} is gone"), || async {
        Ok(api.get_opt(name).await?.is_none())
    })
    .await
}

fn pod_attrs(node: &str, pod: &str, uid: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("node".to_string(), node.to_string()),
        ("namespace".to_string(), "default".to_string()),
        ("pod".to_string(), pod.to_string()),
        (ATTR_POD_UID.to_string(), uid.to_string()),
    ])
}

async fn assign(
    ipam: &Ipam,
    handle: &str,
    attrs: BTreeMap<String, String>,
    pools: &[&str],
) -> anyhow::Result<IpAddr> {
    let req = AssignRequest {
        cni_v4_pools: pools.iter().map(|p| p.to_string()).collect(),
        ..AssignRequest::workload(handle, attrs)
    };
    let got = ipam.auto_assign(&req).await?;
    Ok(got[0].addr())
}

/// handle → addresses, as the API server's blocks record them.
async fn held(client: &Client) -> anyhow::Result<BTreeMap<String, BTreeSet<IpAddr>>> {
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut out: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for b in &blocks.items {
        let cidr: IpNet = b.spec.cidr.parse()?;
        for (ord, a) in b.spec.allocations.iter().enumerate() {
            let Some(idx) = a else { continue };
            if let Some(h) = &b.spec.attributes[*idx as usize].handle_id {
                let addr = addr_at(&cidr, ord).context("ordinal")?;
                out.entry(h.clone()).or_default().insert(addr);
            }
        }
    }
    Ok(out)
}

/// CIDRs of the blocks whose affinity is `host:<node>`.
async fn blocks_of(client: &Client, node: &str) -> anyhow::Result<BTreeSet<String>> {
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let want = format!("host:{node}");
    Ok(blocks
        .items
        .into_iter()
        .filter(|b| b.spec.affinity.as_deref() == Some(want.as_str()))
        .map(|b| b.spec.cidr)
        .collect())
}

async fn affinities_of(client: &Client, node: &str) -> anyhow::Result<BTreeSet<String>> {
    let list = Api::<BlockAffinity>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|a| a.spec.node == node)
        .map(|a| a.spec.cidr)
        .collect())
}

async fn wait_until<F, Fut>(what: &str, cond: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if cond().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out waiting until {what}")
}

fn lease(name: &str, identity: &str) -> LeaseConfig {
    LeaseConfig {
        name: name.into(),
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        renew_period: Duration::from_millis(500),
        retry_period: Duration::from_millis(200),
        ..LeaseConfig::new(identity)
    }
}

/// One simulated daemon: its allocator, its election and the leader's GC loop.
struct Daemon {
    ipam: Arc<Ipam>,
    election: Election,
    status: GcStatus,
    tasks: Vec<JoinHandle<()>>,
    _stop: watch::Sender<bool>,
}

impl Daemon {
    async fn start(
        client: &Client,
        node: &str,
        lease_name: &str,
        cfg: GcConfig,
    ) -> anyhow::Result<Daemon> {
        let ipam = Arc::new(Ipam::start(client.clone(), node, SYNC).await?);
        let (pods, pod_watch) = gc::watch_pods(client.clone());
        let (nodes, node_watch) = gc::watch_nodes(client.clone());
        let (stop, shutdown) = watch::channel(false);
        let election =
            LeaderElector::new(client.clone(), lease(lease_name, node))?.run(shutdown.clone());
        let status = GcStatus::default();
        let cluster = Cluster {
            client: client.clone(),
            pods,
            nodes,
        };
        let job = tokio::spawn(gc::run(
            ipam.clone(),
            cluster,
            election.is_leader.clone(),
            cfg,
            status.clone(),
            shutdown,
        ));
        Ok(Daemon {
            ipam,
            election,
            status,
            tasks: vec![pod_watch, node_watch, job],
            _stop: stop,
        })
    }

    fn is_leader(&self) -> bool {
        *self.election.is_leader.borrow()
    }

    async fn wait_leader(&self) -> anyhow::Result<()> {
        let mut rx = self.election.is_leader.clone();
        tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|l| *l))
            .await
            .context("no leadership within 15 s")??;
        Ok(())
    }

    /// As a crash would: the election stops without releasing the Lease, the GC dies.
    fn kill(self) {
        self.election.abort();
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn short(grace_ms: u64) -> GcConfig {
    GcConfig {
        grace: Duration::from_millis(grace_ms),
        interval: Duration::from_millis(200),
    }
}

#[tokio::test]
async fn gc_releases_only_leaked_addresses_after_the_grace_period() -> anyhow::Result<()> {
    const GRACE: Duration = Duration::from_secs(5);
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    create_pool(&client, "gc-pool", "10.80.0.0/24", 26).await?;
    cp.create_node("gc-node", &[]).await?;
    let d = Daemon::start(&client, "gc-node", "gc-a", short(GRACE.as_millis() as u64)).await?;
    d.wait_leader().await?;
    let ipam = &d.ipam;

    let alive_uid = create_pod(&client, "alive", "gc-node").await?;
    let renum_uid = create_pod(&client, "renumbered", "gc-node").await?;
    let old_uid = create_pod(&client, "phoenix", "gc-node").await?;
    let keep: BTreeMap<&str, IpAddr> = BTreeMap::from([
        (
            "k8s-pod-network.alive",
            assign(
                ipam,
                "k8s-pod-network.alive",
                pod_attrs("gc-node", "alive", &alive_uid),
                &[],
            )
            .await?,
        ),
        (
            "k8s-pod-network.other",
            assign(
                ipam,
                "k8s-pod-network.other",
                BTreeMap::from([("node".to_string(), "gc-node".to_string())]),
                &[],
            )
            .await?,
        ),
    ]);
    let tunnel = ipam
        .assign_tunnel_addr(TunnelKind::Vxlan, Family::V4)
        .await?;
    let renum = assign(
        ipam,
        "k8s-pod-network.renum",
        pod_attrs("gc-node", "renumbered", &renum_uid),
        &[],
    )
    .await?;
    let old = assign(
        ipam,
        "k8s-pod-network.phoenix-1",
        pod_attrs("gc-node", "phoenix", &old_uid),
        &[],
    )
    .await?;

    // Three leaks: a pod that never existed, a pod recreated under the same name (new UID),
    // and a pod that now reports another address.
    let leaks_from = Instant::now();
    let ghost = assign(
        ipam,
        "k8s-pod-network.ghost",
        pod_attrs("gc-node", "ghost", "0000-gone"),
        &[],
    )
    .await?;
    delete_pod(&client, "phoenix").await?;
    let new_uid = create_pod(&client, "phoenix", "gc-node").await?;
    assert_ne!(new_uid, old_uid);
    let fresh = assign(
        ipam,
        "k8s-pod-network.phoenix-2",
        pod_attrs("gc-node", "phoenix", &new_uid),
        &[],
    )
    .await?;
    let status = json!({"status": {"podIP": "10.99.0.1", "podIPs": [{"ip": "10.99.0.1"}]}});
    Api::<Pod>::namespaced(client.clone(), "default")
        .patch_status(
            "renumbered",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    let leaks_done = Instant::now();
    eprintln!(
        "leaks set up in {:?}",
        leaks_done.duration_since(leaks_from)
    );
    let leaked = [
        ("k8s-pod-network.ghost", ghost),
        ("k8s-pod-network.phoenix-1", old),
        ("k8s-pod-network.renum", renum),
    ];

    // Never before the grace period: the last leak began at `leaks_done`.
    tokio::time::sleep(
        (leaks_from + GRACE - Duration::from_millis(700)).saturating_duration_since(Instant::now()),
    )
    .await;
    let h = held(&client).await?;
    for (handle, addr) in &leaked {
        assert_eq!(
            h.get(*handle),
            Some(&BTreeSet::from([*addr])),
            "{handle} released before its grace period"
        );
    }
    assert!(
        d.status.snapshot().candidates.values().sum::<u64>() >= 1,
        "candidates are reported while they wait"
    );

    wait_until("the three leaks are released", || async {
        let h = held(&client).await?;
        let counted = d.status.snapshot().reclamations.values().sum::<u64>() == 3;
        Ok(counted && leaked.iter().all(|(handle, _)| !h.contains_key(*handle)))
    })
    .await?;
    assert!(
        leaks_done.elapsed() >= GRACE - Duration::from_millis(700),
        "released too early"
    );
    let h = held(&client).await?;
    for (handle, addr) in keep.iter().chain(
        [("k8s-pod-network.phoenix-2", &fresh)]
            .iter()
            .map(|(h, a)| (h, *a)),
    ) {
        assert_eq!(
            h.get(*handle),
            Some(&BTreeSet::from([*addr])),
            "{handle} kept"
        );
    }
    let tunnel_handle = TunnelKind::Vxlan.handle("gc-node");
    assert_eq!(
        h.get(&tunnel_handle),
        Some(&BTreeSet::from([tunnel.addr()])),
        "tunnel address of a live node kept"
    );
    let handles = Api::<IPAMHandle>::all(client.clone());
    for (handle, _) in &leaked {
        assert!(
            handles.get_opt(handle).await?.is_none(),
            "handle object {handle} deleted"
        );
    }
    let counts = d.status.snapshot();
    assert_eq!(
        counts.reclamations,
        BTreeMap::from([(("gc-pool".to_string(), "gc-node".to_string()), 3)])
    );
    assert_eq!(counts.candidates.values().sum::<u64>(), 0);
    Ok(())
}

#[tokio::test]
async fn gc_continues_on_the_next_lease_holder_after_the_leader_dies() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    create_pool(&client, "fo-pool", "10.84.0.0/24", 26).await?;
    cp.create_node("fo-a", &[]).await?;
    cp.create_node("fo-b", &[]).await?;
    let a = Daemon::start(&client, "fo-a", "gc-fo", short(1000)).await?;
    a.wait_leader().await?;
    let other = cp.client_for("fo-b", &["system:masters"]).await?;
    let b = Daemon::start(&other, "fo-b", "gc-fo", short(1000)).await?;
    assert!(!b.is_leader());

    assign(
        &a.ipam,
        "k8s-pod-network.leak-1",
        pod_attrs("fo-a", "gone-1", "u-1"),
        &[],
    )
    .await?;
    wait_until("the first leader releases a leak", || async {
        Ok(!held(&client).await?.contains_key("k8s-pod-network.leak-1")
            && a.status.snapshot().reclamations.values().sum::<u64>() == 1)
    })
    .await?;
    assert_eq!(b.status.snapshot().reclamations.len(), 0);

    let killed = Instant::now();
    a.kill();
    b.wait_leader().await?;
    eprintln!("fail-over took {:?}", killed.elapsed());
    // A leak made after the fail-over is collected by the new leader.
    assign(
        &b.ipam,
        "k8s-pod-network.leak-2",
        pod_attrs("fo-b", "gone-2", "u-2"),
        &[],
    )
    .await?;
    // The block write lands before the GC counts it: wait for both.
    wait_until("the new leader releases a leak", || async {
        Ok(!held(&client).await?.contains_key("k8s-pod-network.leak-2")
            && b.status.snapshot().reclamations.values().sum::<u64>() == 1)
    })
    .await?;
    assert!(b.is_leader());
    Ok(())
}

#[tokio::test]
async fn leader_releases_blocks_and_affinities_of_deleted_nodes() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    no_cooldown(&client).await?;
    create_pool(&client, "dn-pool", "10.81.0.0/24", 28).await?;
    cp.create_node("keeper", &[]).await?;
    cp.create_node("doomed", &[]).await?;
    let survivor_uid = create_pod(&client, "survivor", "doomed").await?;
    {
        let doomed = Ipam::start(client.clone(), "doomed", SYNC).await?;
        for i in 0..17 {
            let handle = pod_handle(&format!("ghost-{i}"));
            let attrs = pod_attrs("doomed", &format!("ghost-{i}"), &format!("u-{i}"));
            assign(&doomed, &handle, attrs, &[]).await?;
        }
        let attrs = pod_attrs("doomed", "survivor", &survivor_uid);
        assign(&doomed, "k8s-pod-network.survivor", attrs, &[]).await?;
        doomed
            .assign_tunnel_addr(TunnelKind::Vxlan, Family::V4)
            .await?;
    }
    let claimed = blocks_of(&client, "doomed").await?;
    assert_eq!(claimed.len(), 2);
    // A claim that crashed before its block was created.
    let stray = (0..16)
        .map(|i| format!("10.81.0.{}/28", i * 16))
        .find(|c| !claimed.contains(c))
        .context("a free block")?;
    let mut spec = BlockAffinitySpec {
        state: AffinityState::Pending,
        node: "doomed".into(),
        type_: Some(AffinityType::Host),
        cidr: stray.clone(),
        deleted: String::new(),
    };
    spec.set_deleted(false);
    Api::<BlockAffinity>::all(client.clone())
        .create(
            &PostParams::default(),
            &BlockAffinity::new(&format!("doomed-{}", stray.replace(['.', '/'], "-")), spec),
        )
        .await?;
    Api::<Node>::all(client.clone())
        .delete("doomed", &DeleteParams::default())
        .await?;

    // A long grace period: leaks on a deleted node do not wait for it.
    let keeper = Daemon::start(&client, "keeper", "gc-dn", short(3_600_000)).await?;
    keeper.wait_leader().await?;
    wait_until(
        "the deleted node keeps only the block its live pod uses",
        || async {
            let h = held(&client).await?;
            let ghosts_gone = (0..17).all(|i| !h.contains_key(&pod_handle(&format!("ghost-{i}"))));
            let tunnel_gone = !h.contains_key(&TunnelKind::Vxlan.handle("doomed"));
            Ok(ghosts_gone
                && tunnel_gone
                && blocks_of(&client, "doomed").await?.len() == 1
                && affinities_of(&client, "doomed").await?.len() == 1)
        },
    )
    .await?;
    let h = held(&client).await?;
    assert_eq!(
        h["k8s-pod-network.survivor"].len(),
        1,
        "a live pod keeps its address"
    );
    assert_eq!(
        blocks_of(&client, "doomed").await?,
        affinities_of(&client, "doomed").await?,
        "the kept block keeps its affinity; the stray pending one is gone"
    );

    delete_pod(&client, "survivor").await?;
    wait_until(
        "every block and affinity of the deleted node is gone",
        || async {
            Ok(blocks_of(&client, "doomed").await?.is_empty()
                && affinities_of(&client, "doomed").await?.is_empty())
        },
    )
    .await?;
    assert!(held(&client).await?.is_empty());
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    assert!(blocks.items.is_empty(), "the pool's space is free again");
    Ok(())
}

#[tokio::test]
async fn a_node_deleted_while_leading_frees_its_blocks_before_the_next_timed_pass()
-> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    no_cooldown(&client).await?;
    create_pool(&client, "dl-pool", "10.82.0.0/24", 28).await?;
    cp.create_node("stays", &[]).await?;
    cp.create_node("goes", &[]).await?;
    // The deleted node's IPAM lives on, as its daemon does until its pod is collected.
    let goes = Arc::new(Ipam::start(client.clone(), "goes", SYNC).await?);
    let attrs = pod_attrs("goes", "ghost", "u-ghost");
    assign(&goes, &pod_handle("ghost"), attrs, &[]).await?;
    goes.assign_tunnel_addr(TunnelKind::Vxlan, Family::V4)
        .await?;
    assert_eq!(blocks_of(&client, "goes").await?.len(), 1);
    // Passes an hour apart: only the first, at leadership, runs within the test.
    let cfg = GcConfig {
        grace: Duration::from_secs(3_600),
        interval: Duration::from_secs(3_600),
    };
    let stays = Daemon::start(&client, "stays", "gc-dl", cfg).await?;
    stays.wait_leader().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        blocks_of(&client, "goes").await?.len(),
        1,
        "a live node keeps its block"
    );
    let deleted_at = Instant::now();
    Api::<Node>::all(client.clone())
        .delete("goes", &DeleteParams::default())
        .await?;
    // Its overlay keeps asking for the tunnel address the leader releases.
    let asking = {
        let goes = goes.clone();
        tokio::spawn(async move {
            loop {
                let got = goes.assign_tunnel_addr(TunnelKind::Vxlan, Family::V4).await;
                if let Err(IpamError::NodeDeleted { .. }) = got {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    wait_until("the deleted node's block and affinity are gone", || async {
        Ok(blocks_of(&client, "goes").await?.is_empty()
            && affinities_of(&client, "goes").await?.is_empty())
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(10), asking).await??;
    let err = assign(
        &goes,
        &pod_handle("late"),
        pod_attrs("goes", "late", "u-late"),
        &[],
    )
    .await
    .expect_err("nothing is assigned on a deleted node");
    assert!(err.to_string().contains("has been deleted"), "{err:#}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        blocks_of(&client, "goes").await?.is_empty()
            && affinities_of(&client, "goes").await?.is_empty(),
        "the deleted node's daemon claimed a block again"
    );
    assert!(held(&client).await?.is_empty());
    eprintln!(
        "blocks of a deleted node freed {:?} after its deletion",
        deleted_at.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn idle_blocks_are_given_back_except_the_last_used() -> anyhow::Result<()> {
    const GRACE: Duration = Duration::from_secs(3);
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    no_cooldown(&client).await?;
    create_pool(&client, "tidy-pool", "10.82.0.0/24", 29).await?;
    create_pool_with(&client, "zoned", "10.83.0.0/24", 29, Some("zone == 'a'")).await?;
    cp.create_node("tidy", &[("zone", "a")]).await?;
    let ipam = Arc::new(Ipam::start(client.clone(), "tidy", SYNC).await?);
    let attrs = || BTreeMap::from([("node".to_string(), "tidy".to_string())]);

    let zoned = assign(&ipam, "z", attrs(), &["zoned"]).await?;
    let mut last = None;
    for i in 0..9 {
        last = Some(assign(&ipam, &format!("t{i}"), attrs(), &["tidy-pool"]).await?);
    }
    let all = blocks_of(&client, "tidy").await?;
    assert_eq!(all.len(), 3);
    let last_block = ipam.activity().last_used().context("last used block")?;
    assert!(last_block.contains(&last.context("addr")?));
    let zoned_block = all
        .iter()
        .find(|c| c.parse::<IpNet>().is_ok_and(|n| n.contains(&zoned)))
        .cloned()
        .context("zoned block")?;
    let idle_block = all
        .iter()
        .find(|c| **c != zoned_block && **c != last_block.to_string())
        .cloned()
        .context("idle block")?;
    for h in ["z", "t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8"] {
        ipam.release_by_handle(h).await?;
    }
    let relabel = json!({"metadata": {"labels": {"zone": "b"}}});
    Api::<Node>::all(client.clone())
        .patch("tidy", &PatchParams::default(), &Patch::Merge(&relabel))
        .await?;
    wait_until("the view sees the new label", || async {
        Ok(ipam.with_view(|v| v.node_labels.get("zone").map(String::as_str) == Some("b")))
    })
    .await?;

    let (stop, shutdown) = watch::channel(false);
    let started = Instant::now();
    let job = tokio::spawn(local::run(
        ipam.clone(),
        LocalConfig {
            grace: GRACE,
            interval: Duration::from_millis(200),
        },
        shutdown,
    ));
    wait_until(
        "the block of the pool that no longer selects the node goes",
        || async { Ok(!blocks_of(&client, "tidy").await?.contains(&zoned_block)) },
    )
    .await?;
    assert!(
        started.elapsed() < GRACE,
        "a deselected pool's empty block goes without waiting for the grace period"
    );
    assert!(blocks_of(&client, "tidy").await?.contains(&idle_block));
    wait_until("the idle block goes", || async {
        Ok(!blocks_of(&client, "tidy").await?.contains(&idle_block))
    })
    .await?;
    assert!(
        started.elapsed() >= GRACE,
        "idle block released before its grace period"
    );
    assert!(affinities_of(&client, "tidy").await?.len() == 1);
    tokio::time::sleep(GRACE).await;
    assert_eq!(
        blocks_of(&client, "tidy").await?,
        BTreeSet::from([last_block.to_string()]),
        "the last used block stays"
    );
    stop.send(true)?;
    job.await?;
    Ok(())
}

#[tokio::test]
async fn allocations_cut_off_mid_request_are_collected_and_live_ones_kept() -> anyhow::Result<()> {
    use rand::Rng;
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    create_pool(&client, "cut-pool", "10.85.0.0/24", 26).await?;
    cp.create_node("cut-node", &[]).await?;
    let ipam = Arc::new(Ipam::start(client.clone(), "cut-node", SYNC).await?);
    let mut live = BTreeSet::new();
    for i in 0..5 {
        let name = format!("live-{i}");
        let uid = create_pod(&client, &name, "cut-node").await?;
        let handle = pod_handle(&name);
        assign(&ipam, &handle, pod_attrs("cut-node", &name, &uid), &[]).await?;
        live.insert(handle);
    }
    // Requests for pods that are gone, abandoned at random moments (as a crashed CNI caller
    // would). The block writer finishes what was queued, so addresses land that nobody was
    // told about, some without their handle object.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let ipam = ipam.clone();
            tokio::spawn(async move {
                let name = format!("lost-{i}");
                let attrs = pod_attrs("cut-node", &name, &format!("u-{i}"));
                let _ = assign(&ipam, &pod_handle(&name), attrs, &[]).await;
            })
        })
        .collect();
    let mut rng = rand::rng();
    for t in &tasks {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
        t.abort();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = held(&client).await?;
    let stray = before.keys().filter(|h| !live.contains(*h)).count();
    eprintln!("{stray} addresses left by abandoned requests");

    let d = Daemon::start(&client, "cut-node", "gc-cut", short(1000)).await?;
    d.wait_leader().await?;
    wait_until("only live pods hold addresses", || async {
        let h = held(&client).await?;
        Ok(h.keys().cloned().collect::<BTreeSet<_>>() == live)
    })
    .await?;
    // A request cut off after its handle write but before its block PUT leaves a handle
    // without allocations; the GC deletes it one grace period after first seeing it.
    wait_until("no handle object outlives its addresses", || async {
        let handles = Api::<IPAMHandle>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        let names: BTreeSet<String> = handles
            .items
            .into_iter()
            .map(|h| h.spec.handle_id)
            .collect();
        Ok(names == live)
    })
    .await?;
    Ok(())
}

/// Writes a handle object as a daemon that died before (or instead of) its block write
/// would leave it: counts for blocks that hold nothing under the handle.
async fn create_handle(
    client: &Client,
    handle: &str,
    blocks: &[(&str, i64)],
) -> anyhow::Result<()> {
    let spec = IPAMHandleSpec {
        handle_id: handle.into(),
        block: blocks.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
        deleted: false,
    };
    Api::<IPAMHandle>::all(client.clone())
        .create(
            &PostParams::default(),
            &IPAMHandle::new(&handle_object_name(handle), spec),
        )
        .await
        .with_context(|| format!("create IPAMHandle {handle}"))?;
    Ok(())
}

async fn handle_exists(client: &Client, handle: &str) -> anyhow::Result<bool> {
    Ok(Api::<IPAMHandle>::all(client.clone())
        .get_opt(&handle_object_name(handle))
        .await?
        .is_some())
}

/// The handles `tortie ipam check` reports as IPAMHandles without allocations.
async fn checked_orphans(cp: &ControlPlane) -> anyhow::Result<BTreeSet<String>> {
    let dir = tempfile::tempdir()?;
    let report = dir.path().join("report.json");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tortie"))
        .args(["ipam", "check", "-o"])
        .arg(&report)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .output()
        .await?;
    anyhow::ensure!(
        matches!(out.status.code(), Some(0 | 1)),
        "tortie ipam check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    Ok(v["problems"]
        .as_array()
        .context("problems")?
        .iter()
        .filter(|p| p["kind"] == "handleWithoutAllocations")
        .filter_map(|p| p["handle"].as_str().map(str::to_string))
        .collect())
}

#[tokio::test]
async fn handle_objects_without_allocations_go_after_the_grace_period_and_held_ones_stay()
-> anyhow::Result<()> {
    const GRACE: Duration = Duration::from_secs(2);
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    create_pool(&client, "ho-pool", "10.86.0.0/24", 26).await?;
    cp.create_node("ho-node", &[]).await?;
    let d = Daemon::start(&client, "ho-node", "gc-ho", short(GRACE.as_millis() as u64)).await?;
    d.wait_leader().await?;

    let uid = create_pod(&client, "web", "ho-node").await?;
    let live = pod_handle("web");
    let addr = assign(&d.ipam, &live, pod_attrs("ho-node", "web", &uid), &[]).await?;
    let used = blocks_of(&client, "ho-node").await?;
    let block = used.first().context("the node's block")?.clone();
    let absent = (0..4)
        .map(|i| format!("10.86.0.{}/26", i * 64))
        .find(|c| !used.contains(c))
        .context("a block nobody claimed")?;

    // Left by crashes: between the handle write and the block PUT (naming a block that exists,
    // and one never created), and between a release and the handle's delete (names nothing).
    let crashed = pod_handle("crashed");
    let unclaimed = pod_handle("unclaimed");
    let released = pod_handle("released");
    let created = Instant::now();
    create_handle(&client, &crashed, &[(&block, 1)]).await?;
    create_handle(&client, &unclaimed, &[(&absent, 1)]).await?;
    create_handle(&client, &released, &[]).await?;
    let orphans = BTreeSet::from([crashed.clone(), unclaimed.clone(), released.clone()]);

    // Several passes run before the grace period is over: nothing goes yet.
    tokio::time::sleep(
        (created + GRACE - Duration::from_millis(600)).saturating_duration_since(Instant::now()),
    )
    .await;
    for h in &orphans {
        assert!(
            handle_exists(&client, h).await?,
            "{h} deleted before its grace period"
        );
    }
    assert_eq!(
        checked_orphans(&cp).await?,
        orphans,
        "ipam check sees the orphans"
    );

    wait_until("the orphaned handle objects are deleted", || async {
        for h in &orphans {
            if handle_exists(&client, h).await? {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    assert!(
        created.elapsed() >= GRACE,
        "deleted before the grace period"
    );
    assert!(
        checked_orphans(&cp).await?.is_empty(),
        "ipam check finds none left"
    );

    // A handle an ADD reusing its ID updates mid-way (its block PUT still in flight) waits
    // a full grace period from the update, not from its creation.
    let retried = TunnelKind::Vxlan.handle("ho-node-2");
    let born = Instant::now();
    create_handle(&client, &retried, &[(&block, 1)]).await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let handles = Api::<IPAMHandle>::all(client.clone());
    let mut h = handles.get(&handle_object_name(&retried)).await?;
    h.spec.block.insert(absent.clone(), 1);
    let updated = Instant::now();
    handles
        .replace(&handle_object_name(&retried), &PostParams::default(), &h)
        .await?;
    tokio::time::sleep(
        (updated + GRACE - Duration::from_millis(400)).saturating_duration_since(Instant::now()),
    )
    .await;
    assert!(born.elapsed() > GRACE + Duration::from_millis(700));
    assert!(
        handle_exists(&client, &retried).await?,
        "an updated handle is judged by its new version"
    );
    wait_until("the updated orphan is deleted", || async {
        Ok(!handle_exists(&client, &retried).await?)
    })
    .await?;
    assert!(
        updated.elapsed() >= GRACE,
        "deleted before the grace period of its update"
    );

    // The live pod's handle and address were never touched.
    assert!(handle_exists(&client, &live).await?);
    assert_eq!(
        held(&client).await?,
        BTreeMap::from([(live, BTreeSet::from([addr]))])
    );
    Ok(())
}
