//! One consistent-enough read of the cluster's IPAM state for the operator commands: a LIST of
//! each kind, parsed once. `show`, `check` and `release` are pure functions over a Snapshot.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::CliError;
use crate::api::IPPool;
use crate::api::blockaffinity::{BlockAffinity, BlockAffinitySpec};
use crate::api::ipamblock::IPAMBlock;
use crate::api::ipamconfig::{IPAM_CONFIG_NAME, IPAMConfig};
use crate::api::ipamhandle::IPAMHandle;
use crate::ipam::block::{Attribute, Block, DEFAULT_COOLDOWN, Slot};
use crate::ipam::cidr::ordinal_of;
use crate::ipam::convert::{block_from_spec, time_to_chrono};
use crate::ipam::pools::Pool;

pub use crate::api::vocab::{
    ANNOTATION_POD_IP, ANNOTATION_POD_IPS, ATTR_NAMESPACE, ATTR_NODE, ATTR_POD, ATTR_POD_UID,
    ATTR_TYPE,
};

/// A block as read: parsed when it is consistent, the reason when it is not.
#[derive(Debug, Clone)]
pub struct SnapBlock {
    pub cidr: IpNet,
    pub affinity: Option<String>,
    pub parsed: Result<Block, String>,
}

impl SnapBlock {
    pub fn host(&self) -> Option<&str> {
        self.affinity.as_deref()?.strip_prefix("host:")
    }
}

/// A handle object: its ID and per-block counts (CIDR strings as stored).
#[derive(Debug, Clone)]
pub struct SnapHandle {
    pub handle_id: String,
    pub block: BTreeMap<String, i64>,
}

#[derive(Debug, Clone)]
pub struct SnapAffinity {
    pub name: String,
    pub spec: BlockAffinitySpec,
    pub created: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub pools: Vec<Pool>,
    /// IPPools that cannot be parsed: (name, reason).
    pub invalid_pools: Vec<(String, String)>,
    pub blocks: Vec<SnapBlock>,
    pub handles: Vec<SnapHandle>,
    pub affinities: Vec<SnapAffinity>,
    /// (namespace, name) → pod UID; None when pods were not read.
    pub pods: Option<BTreeMap<(String, String), String>>,
    /// What Calico counts as workload endpoints (pods); None when pods were not read.
    pub workloads: Option<Vec<Workload>>,
    /// Tunnel addresses the nodes publish: (address, node). Read with the pods.
    pub node_tunnels: Vec<(IpAddr, String)>,
    pub cooldown: chrono::TimeDelta,
}

/// A pod as Calico's workload-endpoint conversion sees it (libcalico-go
/// `k8s/conversion`): only pods that are scheduled and not host-networked are endpoints;
/// their addresses come from `status.podIPs`, else `status.podIP`, else Calico's
/// `podIPs`/`podIP` annotations, and a finished pod has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub finished: bool,
}

/// Node annotations holding tunnel addresses allocated from IPAM.
pub const TUNNEL_ANNOTATIONS: &[&str] = crate::api::vocab::NODE_TUNNEL_ANNOTATIONS;

fn parse_ip_or_cidr(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<IpNet>().ok().map(|n| n.addr()))
}

/// The workload endpoint of `pod`, or None when Calico would not make one.
pub fn workload_of(pod: &Pod) -> Option<Workload> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) || spec.node_name.as_deref().unwrap_or("").is_empty() {
        return None;
    }
    let ann = pod.metadata.annotations.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let listed: Vec<String> = if let Some(ips) = status.pod_ips.filter(|v| !v.is_empty()) {
        ips.into_iter().map(|p| p.ip).collect()
    } else if let Some(ip) = status.pod_ip.filter(|s| !s.is_empty()) {
        vec![ip]
    } else if let Some(ips) = ann.get(ANNOTATION_POD_IPS).filter(|s| !s.is_empty()) {
        ips.split(',').map(str::to_string).collect()
    } else if let Some(ip) = ann.get(ANNOTATION_POD_IP).filter(|s| !s.is_empty()) {
        vec![ip.clone()]
    } else {
        Vec::new()
    };
    let deleting_without_ip = pod.metadata.deletion_timestamp.is_some()
        && ann.get(ANNOTATION_POD_IP).is_some_and(|v| v.is_empty());
    let phase = status.phase.as_deref();
    let finished =
        deleting_without_ip || matches!(phase, Some("Failed" | "Succeeded" | "Completed"));
    Some(Workload {
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        ips: if finished {
            Vec::new()
        } else {
            listed.iter().filter_map(|s| parse_ip_or_cidr(s)).collect()
        },
        finished,
    })
}

/// The tunnel addresses `node` publishes in its annotations.
pub fn node_tunnels(node: &Node) -> Vec<(IpAddr, String)> {
    let ann = node.metadata.annotations.clone().unwrap_or_default();
    TUNNEL_ANNOTATIONS
        .iter()
        .filter_map(|k| ann.get(*k).and_then(|v| parse_ip_or_cidr(v)))
        .map(|ip| (ip, node.name_any()))
        .collect()
}

/// Who holds one address.
#[derive(Debug, Clone)]
pub struct Holding<'a> {
    pub block: &'a SnapBlock,
    pub attr: &'a Attribute,
}

impl Snapshot {
    /// Lists every kind once; pods only when `with_pods` (check and release need them).
    pub async fn load(client: &Client, with_pods: bool) -> Result<Snapshot, CliError> {
        let lp = ListParams::default();
        let list_err = |kind: &'static str| move |source| CliError::List { kind, source };
        let pools = Api::<IPPool>::all(client.clone())
            .list(&lp)
            .await
            .map_err(list_err("ippools"))?;
        let blocks = Api::<IPAMBlock>::all(client.clone())
            .list(&lp)
            .await
            .map_err(list_err("ipamblocks"))?;
        let handles = Api::<IPAMHandle>::all(client.clone())
            .list(&lp)
            .await
            .map_err(list_err("ipamhandles"))?;
        let affinities = Api::<BlockAffinity>::all(client.clone())
            .list(&lp)
            .await
            .map_err(list_err("blockaffinities"))?;
        let config = Api::<IPAMConfig>::all(client.clone())
            .get_opt(IPAM_CONFIG_NAME)
            .await
            .map_err(list_err("ipamconfigs"))?;
        let pods = if with_pods {
            let pods = Api::<Pod>::all(client.clone())
                .list(&lp)
                .await
                .map_err(list_err("pods"))?;
            let nodes = Api::<Node>::all(client.clone())
                .list(&lp)
                .await
                .map_err(list_err("nodes"))?;
            Some((pods.items, nodes.items))
        } else {
            None
        };
        let mut snap = Snapshot::from_objects(
            &pools.items,
            &blocks.items,
            &handles.items,
            &affinities.items,
        );
        if let Some((pods, nodes)) = pods {
            snap.set_pods(&pods);
            snap.node_tunnels = nodes.iter().flat_map(node_tunnels).collect();
        }
        if let Some(s) = config.and_then(|c| c.spec.ip_cooldown_seconds) {
            snap.cooldown = chrono::TimeDelta::seconds(i64::from(s.max(0)));
        }
        Ok(snap)
    }

    /// Parses listed objects; soft-deleted blocks, handles and affinities count as absent.
    pub fn from_objects(
        pools: &[IPPool],
        blocks: &[IPAMBlock],
        handles: &[IPAMHandle],
        affinities: &[BlockAffinity],
    ) -> Snapshot {
        let mut snap = Snapshot {
            cooldown: DEFAULT_COOLDOWN,
            ..Snapshot::default()
        };
        for p in pools {
            match Pool::from_ippool(p) {
                Ok(pool) => snap.pools.push(pool),
                Err(e) => snap.invalid_pools.push((p.name_any(), e.to_string())),
            }
        }
        snap.pools
            .sort_by(|a, b| (a.family(), &a.name).cmp(&(b.family(), &b.name)));
        for b in blocks.iter().filter(|b| !b.spec.deleted) {
            let parsed = block_from_spec(&b.spec).map_err(|e| e.to_string());
            let cidr = match (&parsed, b.spec.cidr_net()) {
                (Ok(blk), _) => blk.cidr,
                (Err(_), Ok(c)) => c,
                // Unreadable CIDR: `check` reports it via the name; nothing else can use it.
                (Err(reason), Err(_)) => {
                    snap.blocks.push(SnapBlock {
                        cidr: IpNet::default(),
                        affinity: b.spec.affinity.clone(),
                        parsed: Err(format!("{} ({reason})", b.name_any())),
                    });
                    continue;
                }
            };
            snap.blocks.push(SnapBlock {
                cidr,
                affinity: b.spec.affinity.clone(),
                parsed,
            });
        }
        snap.blocks.sort_by_key(|b| b.cidr);
        snap.handles = handles
            .iter()
            .filter(|h| !h.spec.deleted)
            .map(|h| SnapHandle {
                handle_id: h.spec.handle_id.clone(),
                block: h.spec.block.clone(),
            })
            .collect();
        snap.affinities = affinities
            .iter()
            .filter(|a| !a.spec.is_deleted())
            .map(|a| SnapAffinity {
                name: a.name_any(),
                spec: a.spec.clone(),
                created: a
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .and_then(time_to_chrono),
            })
            .collect();
        snap
    }

    /// Records the pods (for `check` and `release`).
    pub fn set_pods(&mut self, pods: &[Pod]) {
        self.pods = Some(
            pods.iter()
                .map(|p| {
                    let key = (p.namespace().unwrap_or_default(), p.name_any());
                    (key, p.uid().unwrap_or_default())
                })
                .collect(),
        );
        self.workloads = Some(pods.iter().filter_map(workload_of).collect());
    }

    pub fn pool_of(&self, net: &IpNet) -> Option<&Pool> {
        self.pools.iter().find(|p| p.cidr.contains(net))
    }

    pub fn pool_of_addr(&self, addr: IpAddr) -> Option<&Pool> {
        self.pools.iter().find(|p| p.cidr.contains(&addr))
    }

    /// The block where `addr` is allocated to no handle (a `{}` attribute), if any.
    pub fn ownerless_at(&self, addr: IpAddr) -> Option<IpNet> {
        self.blocks.iter().find_map(|b| {
            let blk = b.parsed.as_ref().ok()?;
            let ord = ordinal_of(&blk.cidr, addr)?;
            (blk.slot(ord) == Slot::Ownerless).then_some(b.cidr)
        })
    }

    /// Every block holding `addr` (more than one only when blocks overlap, itself a problem).
    pub fn holders(&self, addr: IpAddr) -> Vec<Holding<'_>> {
        self.blocks
            .iter()
            .filter(|b| b.cidr.contains(&addr))
            .filter_map(|b| {
                let blk = b.parsed.as_ref().ok()?;
                ordinal_of(&blk.cidr, addr)?;
                Some(Holding {
                    block: b,
                    attr: blk.holder(addr)?,
                })
            })
            .collect()
    }
}

/// Test helper shared by the pure modules' unit tests: IPPool objects from (name, cidr, size).
#[cfg(test)]
pub fn test_pool(name: &str, cidr: &str, block_size: i32) -> IPPool {
    IPPool::new(
        name,
        crate::api::IPPoolSpec {
            cidr: cidr.into(),
            block_size: Some(block_size),
            ..Default::default()
        },
    )
}
