//! IPAM's background jobs as the daemon runs them: the leader's leaked-address GC (idle
//! unless this node holds the Lease), every node's own empty-block hygiene, and the
//! `ipam_*` / `tortie_ipam_*` metrics.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::runtime::reflector::Store;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ipam::Ipam;
use crate::ipam::default_pool::{self, DefaultPool};
use crate::ipam::gc::cooldown;
use crate::ipam::gc::local::{self, LocalConfig};
use crate::ipam::gc::{self, Cluster, GcConfig, GcStatus};
use crate::metrics::{Metrics, MetricsError};

pub struct IpamJobs {
    tasks: Vec<JoinHandle<()>>,
}

impl IpamJobs {
    pub fn start(
        metrics: &Metrics,
        ipam: Arc<Ipam>,
        client: Client,
        nodes: Store<Node>,
        is_leader: watch::Receiver<bool>,
        grace: Duration,
        stopped: watch::Receiver<bool>,
    ) -> Result<IpamJobs, MetricsError> {
        let status = GcStatus::default();
        crate::ipam::metrics::register(
            metrics,
            ipam.clone(),
            nodes.clone(),
            status.clone(),
            is_leader.clone(),
        )?;
        let (client_for_defaults, is_leader_for_defaults) = (client.clone(), is_leader.clone());
        let (pods, pods_watch) = gc::watch_pods(client.clone());
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
        Ok(IpamJobs {
            tasks: vec![
                pods_watch, leader_gc, own_blocks, own_cold, all_cold, defaults,
            ],
        })
    }

    /// The leader's default pool (`CALICO_IPV4POOL_CIDR`), created when no IPPool exists.
    pub fn start_default_pool(
        &mut self,
        client: Client,
        pool: DefaultPool,
        node: &str,
        nodes: Store<Node>,
        is_leader: watch::Receiver<bool>,
        stopped: watch::Receiver<bool>,
    ) {
        self.tasks.push(tokio::spawn(default_pool::run(
            client,
            pool,
            node.to_string(),
            nodes,
            is_leader,
            stopped,
        )));
    }

    pub fn stop(&self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}
