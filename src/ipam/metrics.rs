//! IPAM metrics, computed from the allocator's view at scrape time. The Lease holder exports
//! Calico kube-controllers' `ipam_*` series (names, help and labels as Calico has them);
//! other daemons export none of them. Every daemon exports its own node's `tortie_ipam_*`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus::core::{Collector, Desc};
use prometheus::{CounterVec, GaugeVec, IntCounter, Opts, proto};
use tokio::sync::watch;

use super::Ipam;
use super::gc::GcStatus;
use super::gc::verdict::allocations;
use super::store::View;
use crate::metrics::{Metrics, MetricsError};

/// Calico's label for allocations without a `node` attribute.
pub const UNKNOWN_NODE: &str = "unknown_node";
/// Calico's label for blocks outside every pool.
pub const NO_POOL: &str = "no_ippool";
/// Calico's label for blocks without a host affinity.
pub const NO_AFFINITY: &str = "no_affinity";

const POOL_SIZE: (&str, &str) = (
    "ipam_ippool_size",
    "Total number of addresses in the IP Pool",
);
const IN_USE: (&str, &str) = (
    "ipam_allocations_in_use",
    "IPs currently allocated in IPAM to a workload or tunnel endpoint.",
);
const BORROWED: (&str, &str) = (
    "ipam_allocations_borrowed",
    "IPs currently allocated in IPAM to a workload or tunnel endpoint, where the allocation was \
     borrowed from a block affine to another node.",
);
const BLOCKS: (&str, &str) = (
    "ipam_blocks",
    "IPAM blocks currently allocated for the IP pool.",
);
const GC_CANDIDATES: (&str, &str) = (
    "ipam_allocations_gc_candidates",
    "Allocations that are currently marked by the garbage collector as potential candidates to \
     reclaim. Under normal operation, this metric should return to zero after the garbage \
     collector confirms that this allocation can be reclaimed and reclaims it, or the \
     allocation is confirmed as valid.",
);
const GC_RECLAMATIONS: (&str, &str) = (
    "ipam_allocations_gc_reclamations",
    "The total allocations that have been reclaimed by the garbage collector over time. Under \
     normal operation, this counter should increase, and increases of this counter should \
     align to a return to zero for the candidate gauge.",
);

const NODE_FREE: (&str, &str) = (
    "tortie_ipam_node_free_addresses",
    "Addresses that can be handed out now from the blocks affine to this node.",
);
const NODE_IN_USE: (&str, &str) = (
    "tortie_ipam_node_addresses_in_use",
    "Addresses held in the blocks affine to this node (by any node).",
);
const NODE_BLOCKS: (&str, &str) = ("tortie_ipam_node_blocks", "Blocks affine to this node.");
const COUNTERS: [(&str, &str); 6] = [
    (
        "tortie_ipam_block_claims_total",
        "Blocks this node claimed (including empty blocks taken over from other nodes).",
    ),
    (
        "tortie_ipam_borrows_total",
        "Addresses this node allocated from blocks affine to other nodes.",
    ),
    (
        "tortie_ipam_releases_total",
        "Addresses this daemon released by handle.",
    ),
    (
        "tortie_ipam_cas_conflicts_total",
        "Block writes that lost a compare-and-swap (409) and were re-read.",
    ),
    (
        "tortie_ipam_block_writes_total",
        "Block PUTs attempted by this daemon's writers.",
    ),
    (
        "tortie_ipam_operations_committed_total",
        "Assignments and releases that succeeded inside a committed block write (fewer writes \
         than operations shows group commit at work).",
    ),
];

/// The pool a block belongs to, for labels: the usable pool containing it, else `no_ippool`.
pub fn pool_label(view: &View, block: &IpNet) -> String {
    view.pools
        .containing_net(block)
        .map_or_else(|| NO_POOL.to_string(), |p| p.name.clone())
}

/// Registers both collectors. `nodes` seeds zero-valued series for every node, as Calico
/// does; `gc` carries the candidates and reclamations of the GC pass; `is_leader` gates the
/// `ipam_*` series.
pub fn register(
    metrics: &Metrics,
    ipam: Arc<Ipam>,
    nodes: Store<Node>,
    gc: GcStatus,
    is_leader: watch::Receiver<bool>,
) -> Result<(), MetricsError> {
    metrics.register(
        "ipam_*",
        ClusterCollector::new(ipam.clone(), nodes, gc, is_leader),
    )?;
    metrics.register("tortie_ipam_*", NodeCollector::new(ipam))
}

fn desc(name: &str, help: &str, labels: &[&str]) -> Option<Desc> {
    let labels = labels.iter().map(|l| l.to_string()).collect();
    Desc::new(name.to_string(), help.to_string(), labels, HashMap::new()).ok()
}

/// Builds a labelled gauge family from `values`; None only if the constant options were
/// invalid, which the unit tests rule out.
fn gauge_family(
    (name, help): (&str, &str),
    labels: &[&str],
    values: impl IntoIterator<Item = (Vec<String>, f64)>,
) -> Option<proto::MetricFamily> {
    let g = GaugeVec::new(Opts::new(name, help), labels).ok()?;
    for (lv, v) in values {
        let lv: Vec<&str> = lv.iter().map(String::as_str).collect();
        g.get_metric_with_label_values(&lv).ok()?.set(v);
    }
    g.collect().into_iter().next()
}

/// The `ipam_*` series: what Calico's kube-controllers exports, from the leader only.
struct ClusterCollector {
    ipam: Arc<Ipam>,
    nodes: Store<Node>,
    gc: GcStatus,
    is_leader: watch::Receiver<bool>,
    descs: Vec<Desc>,
}

impl ClusterCollector {
    fn new(
        ipam: Arc<Ipam>,
        nodes: Store<Node>,
        gc: GcStatus,
        is_leader: watch::Receiver<bool>,
    ) -> ClusterCollector {
        let descs = [IN_USE, BORROWED, BLOCKS, GC_CANDIDATES, GC_RECLAMATIONS]
            .iter()
            .filter_map(|(n, h)| desc(n, h, &["ippool", "node"]))
            .chain(desc(POOL_SIZE.0, POOL_SIZE.1, &["ippool"]))
            .collect();
        ClusterCollector {
            ipam,
            nodes,
            gc,
            is_leader,
            descs,
        }
    }
}

/// Per (pool, node) values of one scrape.
#[derive(Debug, Default, PartialEq)]
pub struct ClusterFigures {
    pub pool_size: BTreeMap<String, f64>,
    pub in_use: BTreeMap<(String, String), u64>,
    pub borrowed: BTreeMap<(String, String), u64>,
    pub blocks: BTreeMap<(String, String), u64>,
}

/// Counts the view the way kube-controllers does: an allocation is in use under its `node`
/// attribute (or `unknown_node`), borrowed when that node is not the block's affine host,
/// and a block counts under its host (or `no_affinity`). `nodes` get zero-valued in-use and
/// borrowed series in every pool so utilisation queries see zeros, not gaps.
pub fn cluster_figures(view: &View, nodes: &[String]) -> ClusterFigures {
    let mut f = ClusterFigures::default();
    for p in view.pools.pools() {
        let size = 2f64.powi(i32::from(p.cidr.max_prefix_len() - p.cidr.prefix_len()));
        f.pool_size.insert(p.name.clone(), size);
        for n in nodes {
            f.in_use.insert((p.name.clone(), n.clone()), 0);
            f.borrowed.insert((p.name.clone(), n.clone()), 0);
        }
    }
    for b in view.blocks.values() {
        let host = b.block.host().unwrap_or(NO_AFFINITY).to_string();
        *f.blocks
            .entry((pool_label(view, &b.block.cidr), host))
            .or_insert(0) += 1;
    }
    for a in allocations(view) {
        let pool = pool_label(view, &a.block);
        let node = a.node().unwrap_or(UNKNOWN_NODE).to_string();
        let borrowed = node != UNKNOWN_NODE && a.block_host.as_deref() != Some(node.as_str());
        *f.in_use.entry((pool.clone(), node.clone())).or_insert(0) += 1;
        if borrowed {
            *f.borrowed.entry((pool, node)).or_insert(0) += 1;
        }
    }
    f
}

fn pair_values<'a>(
    m: impl IntoIterator<Item = (&'a (String, String), &'a u64)>,
) -> Vec<(Vec<String>, f64)> {
    m.into_iter()
        .map(|((p, n), v)| (vec![p.clone(), n.clone()], *v as f64))
        .collect()
}

impl Collector for ClusterCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        // A finished election keeps its last value; only a live one counts.
        if self.is_leader.has_changed().is_err() || !*self.is_leader.borrow() {
            return Vec::new();
        }
        let nodes: Vec<String> = self.nodes.state().iter().map(|n| n.name_any()).collect();
        let f = self.ipam.with_view(|v| cluster_figures(v, &nodes));
        let gc = self.gc.snapshot();
        let mut candidates = gc.candidates.clone();
        for pool in f.pool_size.keys() {
            for n in &nodes {
                candidates.entry((pool.clone(), n.clone())).or_insert(0);
            }
        }
        let pair = &["ippool", "node"];
        let mut out: Vec<proto::MetricFamily> = [
            gauge_family(
                POOL_SIZE,
                &["ippool"],
                f.pool_size.iter().map(|(p, s)| (vec![p.clone()], *s)),
            ),
            gauge_family(IN_USE, pair, pair_values(&f.in_use)),
            gauge_family(BORROWED, pair, pair_values(&f.borrowed)),
            gauge_family(BLOCKS, pair, pair_values(&f.blocks)),
            gauge_family(GC_CANDIDATES, pair, pair_values(&candidates)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if let Ok(c) = CounterVec::new(Opts::new(GC_RECLAMATIONS.0, GC_RECLAMATIONS.1), pair) {
            for ((p, n), v) in &gc.reclamations {
                if let Ok(m) = c.get_metric_with_label_values(&[p, n]) {
                    m.inc_by(*v as f64);
                }
            }
            out.extend(c.collect());
        }
        out
    }
}

/// The `tortie_ipam_*` series of this daemon's node.
struct NodeCollector {
    ipam: Arc<Ipam>,
    descs: Vec<Desc>,
}

impl NodeCollector {
    fn new(ipam: Arc<Ipam>) -> NodeCollector {
        let descs = [NODE_FREE, NODE_IN_USE, NODE_BLOCKS]
            .iter()
            .filter_map(|(n, h)| desc(n, h, &["ippool"]))
            .chain(COUNTERS.iter().filter_map(|(n, h)| desc(n, h, &[])))
            .chain(ipam.activity().assign_seconds.desc().into_iter().cloned())
            .collect();
        NodeCollector { ipam, descs }
    }
}

/// Per pool: free addresses, addresses in use and blocks of `node`'s affine blocks.
pub fn node_figures(view: &View, node: &str) -> BTreeMap<String, (u64, u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for info in view.infos.values() {
        if info.host.as_deref() != Some(node) {
            continue;
        }
        let e = out.entry(pool_label(view, &info.cidr)).or_default();
        e.0 += info.free as u64;
        e.1 += info.in_use as u64;
        e.2 += 1;
    }
    out
}

impl Collector for NodeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let figures = self.ipam.with_view(|v| node_figures(v, self.ipam.node()));
        let per_pool = |pick: fn(&(u64, u64, u64)) -> u64| {
            figures
                .iter()
                .map(move |(p, t)| (vec![p.clone()], pick(t) as f64))
                .collect::<Vec<_>>()
        };
        let mut out: Vec<proto::MetricFamily> = [
            gauge_family(NODE_FREE, &["ippool"], per_pool(|t| t.0)),
            gauge_family(NODE_IN_USE, &["ippool"], per_pool(|t| t.1)),
            gauge_family(NODE_BLOCKS, &["ippool"], per_pool(|t| t.2)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let a = self.ipam.activity();
        let s = self.ipam.stats();
        let values = [
            a.claims.load(Ordering::Relaxed),
            a.borrows.load(Ordering::Relaxed),
            a.releases.load(Ordering::Relaxed),
            s.cas_conflicts.load(Ordering::Relaxed),
            s.block_writes.load(Ordering::Relaxed),
            s.ops_committed.load(Ordering::Relaxed),
        ];
        for ((name, help), v) in COUNTERS.iter().zip(values) {
            if let Ok(c) = IntCounter::new(*name, *help) {
                c.inc_by(v);
                out.extend(c.collect());
            }
        }
        out.extend(a.assign_seconds.collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::block::{Block, Owner, host_affinity};
    use crate::ipam::pools::{Pool, PoolSet};
    use crate::ipam::reservations::Reservations;
    use crate::ipam::store::CachedBlock;
    use crate::selector::Selector;

    fn pool(name: &str, cidr: &str) -> Pool {
        Pool {
            name: name.into(),
            cidr: cidr.parse().unwrap(),
            block_size: 29,
            disabled: false,
            node_selector: Selector::all(),
            namespace_selector: None,
            allowed_uses: vec![crate::api::AllowedUse::Workload],
            automatic: true,
            created: None,
        }
    }

    fn block(cidr: &str, host: Option<&str>, owners: &[(&str, Option<&str>)]) -> CachedBlock {
        let now = chrono::Utc::now();
        let mut b =
            Block::new(cidr.parse().unwrap(), host.map(host_affinity), Some(now), 1).unwrap();
        for (h, node) in owners {
            let attrs = node
                .map(|n| [("node".to_string(), n.to_string())].into())
                .unwrap_or_default();
            let owner = Owner {
                handle_id: h.to_string(),
                attrs,
            };
            b.auto_assign(
                1,
                &owner,
                &Reservations::EMPTY,
                now,
                chrono::TimeDelta::zero(),
            );
        }
        CachedBlock {
            block: b,
            resource_version: "1".into(),
        }
    }

    fn view() -> View {
        let mut v = View::new();
        v.pools = PoolSet::new(vec![pool("a", "10.0.0.0/24"), pool("b", "10.1.0.0/28")]);
        v.put_block(block(
            "10.0.0.0/29",
            Some("n1"),
            &[("h1", Some("n1")), ("h2", Some("n2")), ("h3", None)],
        ));
        v.put_block(block("10.0.0.8/29", Some("n2"), &[]));
        v.put_block(block("10.9.0.0/29", None, &[("h4", Some("n1"))]));
        v
    }

    fn k(p: &str, n: &str) -> (String, String) {
        (p.into(), n.into())
    }

    #[test]
    fn cluster_figures_count_like_kube_controllers() {
        let f = cluster_figures(&view(), &["n1".into(), "n2".into(), "n3".into()]);
        assert_eq!(f.pool_size[&"a".to_string()], 256.0);
        assert_eq!(f.pool_size[&"b".to_string()], 16.0);
        assert_eq!(f.in_use[&k("a", "n1")], 1);
        assert_eq!(f.in_use[&k("a", "n2")], 1);
        assert_eq!(f.in_use[&k("a", UNKNOWN_NODE)], 1);
        assert_eq!(
            f.in_use[&k("a", "n3")],
            0,
            "known nodes are seeded with zero"
        );
        assert_eq!(f.in_use[&k("b", "n1")], 0);
        assert_eq!(f.in_use[&k(NO_POOL, "n1")], 1);
        assert_eq!(
            f.borrowed[&k("a", "n2")],
            1,
            "n2's address is in n1's block"
        );
        assert_eq!(f.borrowed[&k("a", "n1")], 0);
        assert_eq!(
            f.borrowed[&k(NO_POOL, "n1")],
            1,
            "a block without affinity lends"
        );
        assert!(!f.borrowed.contains_key(&k("a", UNKNOWN_NODE)));
        assert_eq!(f.blocks[&k("a", "n1")], 1);
        assert_eq!(f.blocks[&k("a", "n2")], 1);
        assert_eq!(f.blocks[&k(NO_POOL, NO_AFFINITY)], 1);
    }

    #[test]
    fn node_figures_cover_only_the_nodes_own_blocks() {
        let f = node_figures(&view(), "n1");
        assert_eq!(f.len(), 1);
        assert_eq!(f["a"], (5, 3, 1));
    }

    #[test]
    fn metric_options_are_valid() {
        for (n, h) in [
            POOL_SIZE,
            IN_USE,
            BORROWED,
            BLOCKS,
            GC_CANDIDATES,
            NODE_FREE,
            NODE_IN_USE,
            NODE_BLOCKS,
        ] {
            let fam = gauge_family((n, h), &["ippool"], [(vec!["p".to_string()], 1.0)]);
            assert_eq!(fam.map(|f| f.name().to_string()), Some(n.to_string()));
        }
        for (n, h) in COUNTERS.iter().chain([&GC_RECLAMATIONS]) {
            assert!(IntCounter::new(*n, *h).is_ok(), "{n}");
        }
    }
}
