//! IPAM's background jobs as the daemon runs them: the leader's leaked-address GC (idle
//! unless this node holds the Lease), every node's own empty-block hygiene, and the
//! `ipam_*` / `tortie_ipam_*` metrics.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::runtime::reflector::Store;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::datastore::pods::CachedPod;
use crate::health::{Expect, Registry};

use crate::ipam::Ipam;
use crate::ipam::default_pool::{self, DefaultPool};
use crate::ipam::gc::cooldown;
use crate::ipam::gc::local::{self, LocalConfig};
use crate::ipam::gc::{self, Cluster, GcConfig, GcStatus};
use crate::metrics::{Metrics, MetricsError};

pub struct IpamJobs {
    tasks: Vec<AbortHandle>,
}

/// What every IPAM job shares: the API, the cluster's nodes, leadership, shutdown and the
/// health registry the jobs report to.
#[derive(Clone)]
pub struct JobContext {
    pub client: Client,
    pub nodes: Store<Node>,
    pub is_leader: watch::Receiver<bool>,
    pub stopped: watch::Receiver<bool>,
    pub health: Registry,
}

impl IpamJobs {
    /// `grace`: how long a leaked address or an empty block is left alone.
    pub fn start(
        ctx: &JobContext,
        metrics: &Metrics,
        ipam: Arc<Ipam>,
        grace: Duration,
        (pods, pods_watch): (Store<CachedPod>, tokio::task::JoinHandle<()>),
    ) -> Result<IpamJobs, MetricsError> {
        let JobContext {
            client,
            nodes,
            is_leader,
            stopped,
            health,
        } = ctx.clone();
        let status = GcStatus::default();
        crate::ipam::metrics::register(
            metrics,
            ipam.clone(),
            nodes.clone(),
            status.clone(),
            is_leader.clone(),
        )?;
        let (client_for_defaults, is_leader_for_defaults) = (client.clone(), is_leader.clone());
        let cluster = Cluster {
            client,
            pods,
            nodes,
        };
        // Expired cooldown holds: this node's blocks always, every block while leading.
        let own_cold = tokio::spawn(cooldown::run(
            ipam.clone(),
            cooldown::Scope::Node(ipam.node().to_string()),
            None,
            stopped.clone(),
        ));
        let all_cold = tokio::spawn(cooldown::run(
            ipam.clone(),
            cooldown::Scope::All,
            Some(is_leader.clone()),
            stopped.clone(),
        ));
        let leader_gc = tokio::spawn(gc::run(
            ipam.clone(),
            cluster,
            is_leader,
            GcConfig::with_grace(grace),
            status,
            stopped.clone(),
        ));
        let hygiene = LocalConfig {
            grace,
            ..LocalConfig::default()
        };
        let own_blocks = tokio::spawn(local::run(ipam, hygiene, stopped.clone()));
        // The `default` objects Calico's tools expect (ClusterInformation, IPAMConfig, ...).
        let defaults = tokio::spawn(crate::calico_defaults::run(
            client_for_defaults,
            is_leader_for_defaults,
            grace.as_secs(),
            stopped,
        ));
        // Each job ends only at shutdown: an earlier end (or a panic) is reported by name.
        let jobs = [
            ("ipam/pods-watch", pods_watch),
            ("leader/ipam-gc", leader_gc),
            ("ipam/own-blocks", own_blocks),
            ("ipam/cooldown-own", own_cold),
            ("leader/cooldown-all", all_cold),
            ("leader/calico-defaults", defaults),
        ];
        let unbounded = Expect {
            stall_after: None,
            ..Expect::default()
        };
        Ok(IpamJobs {
            tasks: jobs
                .into_iter()
                .map(|(name, task)| health.supervise(name, unbounded, task))
                .collect(),
        })
    }

    /// The leader's default pool (`CALICO_IPV4POOL_CIDR`), created when no IPPool exists.
    pub fn start_default_pool(&mut self, ctx: &JobContext, pool: DefaultPool, node: &str) {
        let task = tokio::spawn(default_pool::run(
            ctx.client.clone(),
            pool,
            node.to_string(),
            ctx.nodes.clone(),
            ctx.is_leader.clone(),
            ctx.stopped.clone(),
        ));
        let once = Expect {
            stall_after: None,
            finishes: true,
            ..Expect::default()
        };
        self.tasks
            .push(ctx.health.supervise("leader/default-pool", once, task));
    }

    pub fn stop(&self) {
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}
