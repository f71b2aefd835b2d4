//! Leak decisions, sans-IO: whether an allocation still belongs to something (its pod, by UID
//! and address; its node, for tunnel addresses), and which leaked handles have stayed leaked
//! for the grace period. The pod's node is never a reason: a stale node name on an allocation
//! must not free a live pod's address (Calico issue #12257). Time comes in as an argument.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;

use crate::api::vocab::ATTR_POD_UID;
use crate::datastore::pods::CachedPod;
use crate::ipam::attrs::Attrs;
use crate::ipam::block::Slot;
use crate::ipam::cidr::addr_at;
use crate::ipam::store::View;

pub use crate::api::vocab::{
    ANNOTATION_POD_IP, ANNOTATION_POD_IPS, ATTR_NAMESPACE, ATTR_NODE, ATTR_POD,
};

/// Handle prefixes of node tunnel addresses, as Calico names them.
const TUNNEL_HANDLE_PREFIXES: &[&str] = &[
    "vxlan-tunnel-addr-",
    "vxlan-v6-tunnel-addr-",
    "ipip-tunnel-addr-",
    "wireguard-tunnel-addr-",
    "wireguard-v6-tunnel-addr-",
];

/// One held address as recorded in a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub addr: IpAddr,
    pub block: IpNet,
    /// Node of the block's `host:` affinity.
    pub block_host: Option<String>,
    pub handle: String,
    pub attrs: Attrs,
}

impl Allocation {
    /// The node the allocation says it was made for.
    pub fn node(&self) -> Option<&str> {
        self.attrs
            .get(ATTR_NODE)
            .map(String::as_str)
            .filter(|n| !n.is_empty())
    }
}

/// Every address held by a handle in the view (cooling-down and ownerless ordinals are
/// skipped).
pub fn allocations(view: &View) -> Vec<Allocation> {
    let mut out = Vec::new();
    for cached in view.blocks.values() {
        let b = &cached.block;
        for ord in 0..b.allocations.len() {
            let Slot::Held(attr) = b.slot(ord) else {
                continue;
            };
            let (Some(handle), Some(addr)) = (&attr.handle_id, addr_at(&b.cidr, ord)) else {
                continue;
            };
            out.push(Allocation {
                addr,
                block: b.cidr,
                block_host: b.host().map(str::to_string),
                handle: handle.clone(),
                attrs: attr.secondary.clone(),
            });
        }
    }
    out
}

/// Every address allocated to no handle (a `{}` attribute, as calicoctl before 3.34 leaves
/// a rewritten cooldown entry): (block, address).
pub fn ownerless(view: &View) -> Vec<(IpNet, IpAddr)> {
    let mut out = Vec::new();
    for cached in view.blocks.values() {
        let b = &cached.block;
        for ord in 0..b.allocations.len() {
            if b.slot(ord) == Slot::Ownerless
                && let Some(addr) = addr_at(&b.cidr, ord)
            {
                out.push((b.cidr, addr));
            }
        }
    }
    out
}

/// Whom an allocation belongs to, from its handle and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Pod {
        namespace: String,
        name: String,
        uid: Option<String>,
    },
    Tunnel {
        node: String,
    },
    /// Neither: never collected (someone else's allocation, or older than the attributes).
    Other,
}

pub fn holder_of(a: &Allocation) -> Holder {
    if let Some(node) = TUNNEL_HANDLE_PREFIXES
        .iter()
        .find_map(|p| a.handle.strip_prefix(p))
        .filter(|n| !n.is_empty())
    {
        return Holder::Tunnel {
            node: node.to_string(),
        };
    }
    let get = |k: &str| a.attrs.get(k).filter(|v| !v.is_empty()).cloned();
    match (get(ATTR_NAMESPACE), get(ATTR_POD)) {
        (Some(namespace), Some(name)) => Holder::Pod {
            namespace,
            name,
            uid: get(ATTR_POD_UID),
        },
        _ => Holder::Other,
    }
}

/// What the cluster says about a pod, as far as its addresses go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: Option<String>,
    /// Addresses from `status.podIPs`/`podIP` and Calico's podIP(s) annotations.
    pub ips: Vec<IpAddr>,
    /// Succeeded or Failed: its sandbox is gone and needs no address.
    pub finished: bool,
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<IpNet>().ok().map(|n| n.addr()))
}

pub fn pod_facts(pod: &Pod) -> PodFacts {
    let status = pod.status.as_ref();
    let ann = pod.metadata.annotations.as_ref();
    facts(
        pod.metadata.uid.clone(),
        status.and_then(|s| s.pod_ip.as_deref()),
        status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|p| p.ip.as_str()),
        |k| ann.and_then(|a| a.get(k)).map(String::as_str),
        status.and_then(|s| s.phase.as_deref()),
    )
}

/// `pod_facts` of a cached pod, read in place (the GC judges every pod each pass).
pub fn cached_pod_facts(pod: &CachedPod) -> PodFacts {
    let annotation = |k: &str| {
        pod.annotations
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    facts(
        pod.metadata.uid.clone(),
        pod.pod_ip.as_deref(),
        pod.pod_ips.iter().map(String::as_str),
        annotation,
        pod.phase.as_deref(),
    )
}

fn facts<'a>(
    uid: Option<String>,
    pod_ip: Option<&str>,
    pod_ips: impl Iterator<Item = &'a str>,
    annotation: impl Fn(&str) -> Option<&'a str>,
    phase: Option<&str>,
) -> PodFacts {
    let mut ips: Vec<IpAddr> = Vec::new();
    ips.extend(pod_ip.and_then(parse_ip));
    ips.extend(pod_ips.filter_map(parse_ip));
    ips.extend(annotation(ANNOTATION_POD_IP).and_then(parse_ip));
    if let Some(v) = annotation(ANNOTATION_POD_IPS) {
        ips.extend(v.split(',').filter_map(parse_ip));
    }
    ips.sort();
    ips.dedup();
    PodFacts {
        uid,
        ips,
        finished: matches!(phase, Some("Succeeded" | "Failed")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    InUse,
    Leaked(&'static str),
    /// Not ours to judge (no pod attributes, not a tunnel).
    Unknown,
}

/// Judges one allocation. `pod` looks a pod up by namespace and name; `node_exists` a node.
pub fn verdict(
    a: &Allocation,
    pod: impl Fn(&str, &str) -> Option<PodFacts>,
    node_exists: impl Fn(&str) -> bool,
) -> Verdict {
    match holder_of(a) {
        Holder::Other => Verdict::Unknown,
        Holder::Tunnel { node } => {
            if node_exists(&node) {
                Verdict::InUse
            } else {
                Verdict::Leaked("its node no longer exists")
            }
        }
        Holder::Pod {
            namespace,
            name,
            uid,
        } => {
            let Some(facts) = pod(&namespace, &name) else {
                return Verdict::Leaked("its pod no longer exists");
            };
            if let (Some(want), Some(have)) = (&uid, &facts.uid)
                && want != have
            {
                return Verdict::Leaked("its pod was deleted and recreated under the same name");
            }
            if facts.finished {
                return Verdict::Leaked("its pod has finished");
            }
            // No address reported yet: the CNI ADD may still be running.
            if facts.ips.is_empty() || facts.ips.contains(&a.addr) {
                Verdict::InUse
            } else {
                Verdict::Leaked("its pod has other addresses")
            }
        }
    }
}

/// One judged allocation of a pass.
#[derive(Debug, Clone)]
pub struct Judged {
    pub alloc: Allocation,
    pub verdict: Verdict,
    /// Skip the grace period: the node it was made for is gone as well (checked live).
    pub immediate: bool,
}

/// Remembers since when each leaked allocation has been a candidate. A candidate that is
/// not one in a later pass (pod came back, address reported) starts over.
#[derive(Debug, Default)]
pub struct LeakTracker {
    since: HashMap<(String, IpAddr), Instant>,
}

impl LeakTracker {
    /// Records a pass and returns the handles to release now: every address of the handle
    /// is leaked, and each has been for `grace` (or is immediate). All-or-none per handle,
    /// so one address still in use keeps the whole handle (Calico issue #5044).
    pub fn observe(&mut self, pass: &[Judged], now: Instant, grace: Duration) -> Vec<String> {
        let mut seen = HashMap::new();
        for j in pass {
            if matches!(j.verdict, Verdict::Leaked(_)) {
                let key = (j.alloc.handle.clone(), j.alloc.addr);
                let at = self.since.get(&key).copied().unwrap_or(now);
                seen.insert(key, at);
            }
        }
        self.since = seen;
        let mut ready: BTreeMap<&str, bool> = BTreeMap::new();
        for j in pass {
            let ok = match j.verdict {
                Verdict::Leaked(_) => {
                    j.immediate
                        || self
                            .since
                            .get(&(j.alloc.handle.clone(), j.alloc.addr))
                            .is_some_and(|at| now.saturating_duration_since(*at) >= grace)
                }
                Verdict::InUse | Verdict::Unknown => false,
            };
            let e = ready.entry(j.alloc.handle.as_str()).or_insert(true);
            *e &= ok;
        }
        ready
            .into_iter()
            .filter(|(_, ok)| *ok)
            .map(|(h, _)| h.to_string())
            .collect()
    }

    /// Forgets every candidate (leadership lost: the next leader starts its own clock).
    pub fn reset(&mut self) {
        self.since.clear();
    }

    pub fn candidates(&self) -> usize {
        self.since.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodIP, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn alloc(addr: &str, handle: &str, attrs: &[(&str, &str)]) -> Allocation {
        Allocation {
            addr: addr.parse().unwrap(),
            block: "10.0.0.0/26".parse().unwrap(),
            block_host: Some("n1".into()),
            handle: handle.into(),
            attrs: Attrs::from(
                attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
        }
    }

    fn pod_alloc(addr: &str, handle: &str, uid: &str) -> Allocation {
        alloc(
            addr,
            handle,
            &[
                ("namespace", "ns"),
                ("pod", "web"),
                ("node", "n1"),
                ("pod-uid", uid),
            ],
        )
    }

    fn facts(uid: &str, ips: &[&str]) -> PodFacts {
        PodFacts {
            uid: Some(uid.into()),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            finished: false,
        }
    }

    fn judge(a: &Allocation, f: Option<PodFacts>) -> Verdict {
        verdict(a, |_, _| f.clone(), |_| true)
    }

    #[test]
    fn a_pod_that_is_gone_leaks_its_address() {
        let a = pod_alloc("10.0.0.1", "k8s-pod-network.c1", "u1");
        assert!(matches!(judge(&a, None), Verdict::Leaked(_)));
        assert_eq!(judge(&a, Some(facts("u1", &["10.0.0.1"]))), Verdict::InUse);
    }

    #[test]
    fn a_recreated_pod_with_the_same_name_does_not_keep_the_old_address() {
        let a = pod_alloc("10.0.0.1", "k8s-pod-network.c1", "u1");
        assert!(matches!(
            judge(&a, Some(facts("u2", &[]))),
            Verdict::Leaked(_)
        ));
    }

    #[test]
    fn a_pod_without_reported_addresses_keeps_its_allocation() {
        let a = pod_alloc("10.0.0.1", "k8s-pod-network.c1", "u1");
        assert_eq!(judge(&a, Some(facts("u1", &[]))), Verdict::InUse);
        assert!(matches!(
            judge(&a, Some(facts("u1", &["10.0.0.9"]))),
            Verdict::Leaked(_)
        ));
        let finished = PodFacts {
            finished: true,
            ..facts("u1", &["10.0.0.1"])
        };
        assert!(matches!(judge(&a, Some(finished)), Verdict::Leaked(_)));
    }

    #[test]
    fn the_node_attribute_alone_never_leaks_a_pod_address() {
        let a = pod_alloc("10.0.0.1", "k8s-pod-network.c1", "u1");
        let v = verdict(&a, |_, _| Some(facts("u1", &["10.0.0.1"])), |_| false);
        assert_eq!(v, Verdict::InUse);
    }

    #[test]
    fn tunnel_addresses_leak_only_with_their_node_and_others_are_left_alone() {
        let t = alloc("10.0.0.2", "vxlan-tunnel-addr-n7", &[("node", "n7")]);
        assert_eq!(holder_of(&t), Holder::Tunnel { node: "n7".into() });
        assert_eq!(verdict(&t, |_, _| None, |n| n == "n7"), Verdict::InUse);
        assert!(matches!(
            verdict(&t, |_, _| None, |_| false),
            Verdict::Leaked(_)
        ));
        let other = alloc("10.0.0.3", "k8s-pod-network.c9", &[("node", "n1")]);
        assert_eq!(verdict(&other, |_, _| None, |_| false), Verdict::Unknown);
    }

    #[test]
    fn pod_facts_read_status_and_calico_annotations() {
        let pod = Pod {
            metadata: ObjectMeta {
                uid: Some("u1".into()),
                annotations: Some(
                    [(
                        ANNOTATION_POD_IPS.to_string(),
                        "10.0.0.5/32,fd00::5/128".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            status: Some(PodStatus {
                pod_ips: Some(vec![PodIP {
                    ip: "10.0.0.4".into(),
                }]),
                phase: Some("Running".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let f = pod_facts(&pod);
        let want: Vec<IpAddr> = ["10.0.0.4", "10.0.0.5", "fd00::5"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(f.ips, want);
        assert!(!f.finished);
        assert_eq!(
            cached_pod_facts(&CachedPod::from_pod(&pod)),
            f,
            "the cached pod says the same"
        );
    }

    fn judged(a: &Allocation, v: Verdict) -> Judged {
        Judged {
            alloc: a.clone(),
            verdict: v,
            immediate: false,
        }
    }

    #[test]
    fn a_candidate_is_released_only_after_the_grace_period_and_resets_when_it_recovers() {
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let a = pod_alloc("10.0.0.1", "h1", "u1");
        let leak = Verdict::Leaked("gone");
        let mut t = LeakTracker::default();
        assert!(t.observe(&[judged(&a, leak)], t0, grace).is_empty());
        assert!(
            t.observe(&[judged(&a, leak)], t0 + Duration::from_secs(59), grace)
                .is_empty()
        );
        // Back in use for one pass: the clock starts over.
        t.observe(
            &[judged(&a, Verdict::InUse)],
            t0 + Duration::from_secs(59),
            grace,
        );
        assert!(
            t.observe(&[judged(&a, leak)], t0 + Duration::from_secs(61), grace)
                .is_empty()
        );
        assert_eq!(
            t.observe(&[judged(&a, leak)], t0 + Duration::from_secs(121), grace),
            vec!["h1".to_string()]
        );
    }

    #[test]
    fn a_handle_is_released_all_or_none() {
        let grace = Duration::from_secs(1);
        let t0 = Instant::now();
        let v4 = pod_alloc("10.0.0.1", "h1", "u1");
        let v6 = pod_alloc("fd00::1", "h1", "u1");
        let leak = Verdict::Leaked("other addresses");
        let mut t = LeakTracker::default();
        let pass = [judged(&v4, Verdict::InUse), judged(&v6, leak)];
        t.observe(&pass, t0, grace);
        assert!(t.observe(&pass, t0 + grace * 5, grace).is_empty());
        assert_eq!(t.candidates(), 1);
        let both = [judged(&v4, leak), judged(&v6, leak)];
        t.observe(&both, t0 + grace * 6, grace);
        assert_eq!(t.observe(&both, t0 + grace * 8, grace), vec!["h1"]);
    }

    #[test]
    fn immediate_candidates_skip_the_grace_period() {
        let a = alloc("10.0.0.2", "vxlan-tunnel-addr-n7", &[]);
        let j = Judged {
            alloc: a,
            verdict: Verdict::Leaked("node gone"),
            immediate: true,
        };
        let mut t = LeakTracker::default();
        assert_eq!(
            t.observe(&[j], Instant::now(), Duration::from_secs(900)),
            vec!["vxlan-tunnel-addr-n7"]
        );
    }
}
