// The default pool job against a real kube-apiserver: the Lease holder creates
// `default-ipv4-ippool` from Calico's variables when no IPPool exists (VXLAN Always and
// natOutgoing by default), does nothing while another pool exists or while it does not lead,
// and refuses a pool over a node subnet or the service network with a Warning Event naming
// both CIDRs. (tests/rbac.rs runs the whole daemon with the manifest's settings, which
// creates the pool the same way.)

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::watcher;
use support::ControlPlane;
use tokio::sync::watch;
use tortie::api::{EncapMode, IPPool, IPPoolSpec};
use tortie::ipam::default_pool::{
    self, DEFAULT_POOL_NAME, DefaultPool, DefaultPoolArgs, REASON_OVERLAP,
};

async fn node_with_subnet(cp: &ControlPlane, name: &str, addr: &str) {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                [(
                    "projectcalico.org/IPv4Address".to_string(),
                    addr.to_string(),
                )]
                .into_iter()
                .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Node>::all(cp.client())
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
}

fn plan(cidr: &str, service: &str) -> DefaultPool {
    DefaultPool::from_args(&DefaultPoolArgs {
        cidr: Some(cidr.into()),
        service_cidr: vec![service.into()],
        ..DefaultPoolArgs::default()
    })
    .expect("valid settings")
    .expect("a pool is asked for")
}

/// Runs the job as node `aks-0` until dropped; `leader` says whether it holds the Lease.
struct Job {
    stop: watch::Sender<bool>,
    _leader: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Job {
    async fn start(cp: &ControlPlane, pool: DefaultPool, leader: bool) -> Job {
        let client = cp.client();
        // Dropping the reflector's JoinHandle detaches it: it runs as long as the test.
        let (nodes, _reflector) = tortie::datastore::reflect(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            |_| {},
            "nodes",
        );
        nodes.wait_until_ready().await.expect("node store");
        let (stop, stopped) = watch::channel(false);
        let (leader_tx, is_leader) = watch::channel(leader);
        let task = tokio::spawn(default_pool::run(
            client,
            pool,
            "aks-0".into(),
            nodes,
            is_leader,
            stopped,
        ));
        Job {
            stop,
            _leader: leader_tx,
            task,
        }
    }

    async fn finished_within(self, limit: Duration) -> bool {
        let done = tokio::time::timeout(limit, async {
            while !self.task.is_finished() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .is_ok();
        let _ = self.stop.send(true);
        done
    }
}

async fn pools(cp: &ControlPlane) -> Vec<IPPool> {
    Api::<IPPool>::all(cp.client())
        .list(&Default::default())
        .await
        .expect("list pools")
        .items
}

#[tokio::test]
async fn leader_creates_the_default_pool_with_azure_safe_defaults() {
    let cp = ControlPlane::start().await.expect("control plane");
    node_with_subnet(&cp, "aks-0", "10.224.0.4/16").await;
    let job = Job::start(&cp, plan("192.168.0.0/16", "10.0.0.0/16"), true).await;
    assert!(
        job.finished_within(Duration::from_secs(20)).await,
        "the job ends once the pool exists"
    );
    let all = pools(&cp).await;
    assert_eq!(all.len(), 1);
    let pool = &all[0];
    assert_eq!(pool.metadata.name.as_deref(), Some(DEFAULT_POOL_NAME));
    assert_eq!(pool.spec.cidr, "192.168.0.0/16");
    assert_eq!(pool.spec.vxlan_mode, EncapMode::Always);
    assert_eq!(pool.spec.ipip_mode, EncapMode::Never);
    assert!(pool.spec.nat_outgoing);
    assert_eq!(pool.spec.effective_block_size().expect("block size"), 26);
}

#[tokio::test]
async fn an_existing_pool_or_another_leader_means_no_default_pool() {
    let cp = ControlPlane::start().await.expect("control plane");
    node_with_subnet(&cp, "aks-0", "10.224.0.4/16").await;
    // Not the leader: nothing happens, the job keeps waiting.
    let job = Job::start(&cp, plan("192.168.0.0/16", "10.0.0.0/16"), false).await;
    assert!(!job.finished_within(Duration::from_secs(3)).await);
    assert!(pools(&cp).await.is_empty());
    // A pool exists: the leader leaves it as the only one.
    support::pools::create_pool_spec(
        &cp.client(),
        "mine",
        IPPoolSpec {
            cidr: "172.16.0.0/24".into(),
            ..IPPoolSpec::default()
        },
    )
    .await
    .expect("pool");
    let job = Job::start(&cp, plan("192.168.0.0/16", "10.0.0.0/16"), true).await;
    assert!(job.finished_within(Duration::from_secs(20)).await);
    let names: Vec<_> = pools(&cp)
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(names, vec!["mine".to_string()]);
}

#[tokio::test]
async fn a_pool_over_the_node_or_service_network_is_refused_naming_both() {
    let cp = ControlPlane::start().await.expect("control plane");
    node_with_subnet(&cp, "aks-0", "10.224.0.4/16").await;
    let events = Api::<Event>::all(cp.client());
    for (pool, service, other) in [
        ("10.224.0.0/12", "10.0.0.0/16", "10.224.0.0/16"),
        ("10.0.0.0/8", "10.0.0.0/16", "10.0.0.0/16"),
    ] {
        let job = Job::start(&cp, plan(pool, service), true).await;
        let mut note = None;
        for _ in 0..100 {
            let list = events.list(&Default::default()).await.expect("events");
            note = list
                .items
                .iter()
                .filter(|e| e.reason.as_deref() == Some(REASON_OVERLAP))
                .filter_map(|e| e.note.clone())
                .find(|n| n.contains(pool));
            if note.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let note = note.unwrap_or_else(|| panic!("no {REASON_OVERLAP} Event for {pool}"));
        assert!(note.contains(other), "{note}");
        assert!(
            !job.finished_within(Duration::from_millis(500)).await,
            "a refused pool is checked again later"
        );
        assert!(pools(&cp).await.is_empty(), "{pool} must not be created");
    }
}
