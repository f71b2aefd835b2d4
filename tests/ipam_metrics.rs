// IPAM metrics over real /metrics endpoints: the Lease holder exports Calico kube-controllers'
// `ipam_*` series with exact values for a known allocation state (own blocks, a borrowed
// address, a leak candidate), a non-leader exports none of them, and every daemon exports
// its own node's `tortie_ipam_*` view.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kube::Client;
use kube::api::{Api, PostParams};
use support::ControlPlane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tortie::api::{IPPool, IPPoolSpec};
use tortie::cni::handlers::ATTR_POD_UID;
use tortie::datastore::lease::{Election, LeaderElector, LeaseConfig};
use tortie::ipam::gc::{self, Cluster, GcConfig, GcStatus};
use tortie::ipam::{AssignRequest, Ipam, metrics as ipam_metrics};
use tortie::metrics::{BuildInfo, Metrics};

const SYNC: Duration = Duration::from_secs(30);

/// A daemon's IPAM with its election, GC and a /metrics server on loopback.
struct Daemon {
    ipam: Arc<Ipam>,
    election: Election,
    url: std::net::SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    _stop: watch::Sender<bool>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Daemon {
    async fn start(client: &Client, node: &str) -> anyhow::Result<Daemon> {
        let ipam = Arc::new(Ipam::start(client.clone(), node, SYNC).await?);
        let (pods, pod_watch) = gc::watch_pods(client.clone());
        let (nodes, node_watch) = gc::watch_nodes(client.clone());
        let (stop, shutdown) = watch::channel(false);
        let lease = LeaseConfig {
            name: "ipam-metrics".into(),
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            renew_period: Duration::from_millis(500),
            retry_period: Duration::from_millis(200),
            ..LeaseConfig::new(node)
        };
        let election = LeaderElector::new(client.clone(), lease)?.run(shutdown.clone());
        let status = GcStatus::default();
        let metrics = Metrics::new(&BuildInfo::CURRENT)?;
        ipam_metrics::register(
            &metrics,
            ipam.clone(),
            nodes.clone(),
            status.clone(),
            election.is_leader.clone(),
        )?;
        // A grace period far beyond the test: leaks stay candidates.
        let cfg = GcConfig {
            grace: Duration::from_secs(3600),
            interval: Duration::from_millis(200),
        };
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
            status,
            shutdown,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = listener.local_addr()?;
        let router = tortie::http::metrics_router(metrics);
        let server = tokio::spawn(async move {
            let _ = tortie::http::serve("metrics", listener, router, std::future::pending()).await;
        });
        Ok(Daemon {
            ipam,
            election,
            url,
            tasks: vec![pod_watch, node_watch, job, server],
            _stop: stop,
        })
    }

    async fn wait_leader(&self) -> anyhow::Result<()> {
        let mut rx = self.election.is_leader.clone();
        tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|l| *l))
            .await
            .context("no leadership")??;
        Ok(())
    }

    /// GET /metrics over plain HTTP/1.1.
    async fn scrape(&self) -> anyhow::Result<String> {
        let mut s = tokio::net::TcpStream::connect(self.url).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8(buf)?;
        let (head, body) = text.split_once("\r\n\r\n").context("HTTP response")?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        Ok(body.to_string())
    }
}

/// `name{labels}` → value, for every sample line (the text exposition format).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn workload(handle: &str, node: &str, pod: Option<&str>) -> AssignRequest {
    let mut attrs = BTreeMap::from([("node".to_string(), node.to_string())]);
    if let Some(p) = pod {
        attrs.insert("namespace".into(), "default".into());
        attrs.insert("pod".into(), p.into());
        attrs.insert(ATTR_POD_UID.into(), format!("uid-{p}"));
    }
    AssignRequest::workload(handle, attrs)
}

#[tokio::test]
async fn leader_exports_calico_ipam_series_with_exact_values() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    // Two blocks of 8: each node claims one, and m-1's ninth address must be borrowed.
    let spec = IPPoolSpec {
        cidr: "10.70.0.0/28".into(),
        block_size: Some(29),
        ..Default::default()
    };
    Api::<IPPool>::all(client.clone())
        .create(&PostParams::default(), &IPPool::new("metrics-pool", spec))
        .await?;
    cp.create_node("m-1", &[]).await?;
    cp.create_node("m-2", &[]).await?;
    let leader = Daemon::start(&client, "m-1").await?;
    leader.wait_leader().await?;
    let other = cp.client_for("m-2", &["system:masters"]).await?;
    let follower = Daemon::start(&other, "m-2").await?;

    follower
        .ipam
        .auto_assign(&workload("k8s-pod-network.f0", "m-2", None))
        .await?;
    for i in 0..8 {
        let h = format!("k8s-pod-network.l{i}");
        leader.ipam.auto_assign(&workload(&h, "m-1", None)).await?;
    }
    // The ninth: borrowed from m-2's block, and its pod does not exist (a GC candidate).
    leader
        .ipam
        .auto_assign(&workload("k8s-pod-network.ghost", "m-1", Some("ghost")))
        .await?;

    let want: BTreeMap<String, f64> = [
        (r#"ipam_ippool_size{ippool="metrics-pool"}"#, 16.0),
        (
            r#"ipam_allocations_in_use{ippool="metrics-pool",node="m-1"}"#,
            9.0,
        ),
        (
            r#"ipam_allocations_in_use{ippool="metrics-pool",node="m-2"}"#,
            1.0,
        ),
        (
            r#"ipam_allocations_borrowed{ippool="metrics-pool",node="m-1"}"#,
            1.0,
        ),
        (
            r#"ipam_allocations_borrowed{ippool="metrics-pool",node="m-2"}"#,
            0.0,
        ),
        (r#"ipam_blocks{ippool="metrics-pool",node="m-1"}"#, 1.0),
        (r#"ipam_blocks{ippool="metrics-pool",node="m-2"}"#, 1.0),
        (
            r#"ipam_allocations_gc_candidates{ippool="metrics-pool",node="m-1"}"#,
            1.0,
        ),
        (
            r#"ipam_allocations_gc_candidates{ippool="metrics-pool",node="m-2"}"#,
            0.0,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let text = leader.scrape().await?;
        let got: BTreeMap<String, f64> = samples(&text)
            .into_iter()
            .filter(|(k, _)| k.starts_with("ipam_"))
            .collect();
        if got == want || Instant::now() > deadline {
            break (got, text);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(got.0, want, "leader's ipam_* series:\n{}", got.1);
    let text = got.1;
    assert!(text.contains("# TYPE ipam_allocations_in_use gauge"));
    assert!(text.contains(
        "# HELP ipam_allocations_in_use IPs currently allocated in IPAM to a workload or tunnel endpoint."
    ));
    let s = samples(&text);
    assert_eq!(s[r#"tortie_ipam_node_blocks{ippool="metrics-pool"}"#], 1.0);
    assert_eq!(
        s[r#"tortie_ipam_node_free_addresses{ippool="metrics-pool"}"#],
        0.0
    );
    assert_eq!(s["tortie_ipam_borrows_total"], 1.0);
    assert_eq!(s["tortie_ipam_block_claims_total"], 1.0);
    assert_eq!(s["tortie_ipam_allocation_duration_seconds_count"], 9.0);
    assert!(s["tortie_ipam_block_writes_total"] >= 9.0);

    let text = follower.scrape().await?;
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("ipam_") || l.contains(" ipam_")),
        "a non-leader exports no ipam_* series:\n{text}"
    );
    let s = samples(&text);
    // m-2's block: its own address and the one lent to m-1 are in use, 6 are free.
    assert_eq!(
        s[r#"tortie_ipam_node_addresses_in_use{ippool="metrics-pool"}"#],
        2.0
    );
    assert_eq!(
        s[r#"tortie_ipam_node_free_addresses{ippool="metrics-pool"}"#],
        6.0
    );
    assert_eq!(s["tortie_ipam_borrows_total"], 0.0);
    assert_eq!(s["tortie_ipam_allocation_duration_seconds_count"], 1.0);

    // Leadership moves: the old leader's ipam_* series disappear, the new leader's appear.
    leader.election.abort();
    follower.wait_leader().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let old = leader.scrape().await?;
        let new = samples(&follower.scrape().await?);
        let old_silent = !old.lines().any(|l| l.starts_with("ipam_"));
        let new_in_use = new
            .get(r#"ipam_allocations_in_use{ippool="metrics-pool",node="m-1"}"#)
            .copied();
        if old_silent && new_in_use == Some(9.0) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "series did not move:\n{old}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
