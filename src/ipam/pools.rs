//! Which pools an allocation may use: the pool set (parsed IPPools, overlapping newer pools
//! excluded and reported), Calico's choice precedence (pod annotation, namespace annotation,
//! CNI config, node selectors) and the `ipAddrs` fixed-address annotation.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use super::IpamError;
use super::cidr::validate_block_size;
use super::convert::time_to_chrono;
use crate::api::{AllowedUse, AssignmentMode, IPPool};
use crate::selector::{Selector, parse_node_selector};

pub use crate::api::vocab::{ANNOTATION_IP_ADDRS, ANNOTATION_IPV4_POOLS, ANNOTATION_IPV6_POOLS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of_net(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    pub fn of_addr(addr: &IpAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn pools_annotation(self) -> &'static str {
        match self {
            Family::V4 => ANNOTATION_IPV4_POOLS,
            Family::V6 => ANNOTATION_IPV6_POOLS,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An IPPool as the allocator needs it: parsed once when the pool set changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub cidr: IpNet,
    pub block_size: u8,
    pub disabled: bool,
    pub node_selector: Selector,
    pub namespace_selector: Option<Selector>,
    pub allowed_uses: Vec<AllowedUse>,
    pub automatic: bool,
    pub created: Option<DateTime<Utc>>,
}

impl Pool {
    pub fn from_ippool(p: &IPPool) -> Result<Pool, IpamError> {
        let name = p.metadata.name.clone().unwrap_or_default();
        let invalid = |reason: String| IpamError::InvalidPool {
            pool: name.clone(),
            reason,
        };
        let cidr = p.cidr_net().map_err(|e| invalid(e.to_string()))?;
        let block_size = p
            .spec
            .effective_block_size()
            .map_err(|e| invalid(e.to_string()))?;
        validate_block_size(&cidr, block_size).map_err(|e| invalid(e.to_string()))?;
        let node_selector = parse_node_selector(p.spec.effective_node_selector())
            .map_err(|e| invalid(e.to_string()))?;
        let namespace_selector = match p.spec.namespace_selector.as_deref() {
            None | Some("") => None,
            Some(s) => Some(Selector::parse(s).map_err(|e| invalid(e.to_string()))?),
        };
        Ok(Pool {
            name: name.clone(),
            cidr,
            block_size,
            disabled: p.spec.disabled,
            node_selector,
            namespace_selector,
            allowed_uses: p.spec.effective_allowed_uses(),
            automatic: p.spec.effective_assignment_mode() == AssignmentMode::Automatic,
            created: p
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(time_to_chrono),
        })
    }

    pub fn family(&self) -> Family {
        Family::of_net(&self.cidr)
    }

    pub fn describe(&self) -> String {
        format!("{:?} ({})", self.name, self.cidr)
    }
}

/// Two pools whose CIDRs overlap: `excluded` (the newer) hands out nothing while `kept` exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub kept: String,
    pub excluded: String,
}

/// Every pool, sorted by name (the order Calico tries them in), with the ones that must not be
/// used set aside and reported so the caller can log them and emit events.
#[derive(Debug, Clone, Default)]
pub struct PoolSet {
    pools: Vec<Pool>,
    excluded: Vec<Pool>,
    overlaps: Vec<Overlap>,
    invalid: Vec<(String, String)>,
}

impl PoolSet {
    /// Builds the set from parsed pools. Of two overlapping pools the newer one (later
    /// creationTimestamp, then greater name) is excluded; disabled pools still count, since
    /// their blocks may still hold addresses.
    pub fn new(mut pools: Vec<Pool>) -> PoolSet {
        pools.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        let mut kept: Vec<Pool> = Vec::new();
        let mut excluded = Vec::new();
        let mut overlaps = Vec::new();
        for p in pools {
            match kept.iter().find(|k| nets_overlap(&k.cidr, &p.cidr)) {
                Some(older) => {
                    overlaps.push(Overlap {
                        kept: older.name.clone(),
                        excluded: p.name.clone(),
                    });
                    excluded.push(p);
                }
                None => kept.push(p),
            }
        }
        kept.sort_by(|a, b| a.name.cmp(&b.name));
        PoolSet {
            pools: kept,
            excluded,
            overlaps,
            invalid: Vec::new(),
        }
    }

    /// Builds the set from IPPool objects; pools that do not parse are reported, not used.
    pub fn from_ippools<'a>(objs: impl IntoIterator<Item = &'a IPPool>) -> PoolSet {
        let mut invalid = Vec::new();
        let pools = objs
            .into_iter()
            .filter_map(|o| match Pool::from_ippool(o) {
                Ok(p) => Some(p),
                Err(e) => {
                    invalid.push((o.metadata.name.clone().unwrap_or_default(), e.to_string()));
                    None
                }
            })
            .collect();
        let mut set = PoolSet::new(pools);
        set.invalid = invalid;
        set
    }

    /// Usable (not overlap-excluded) pools, sorted by name.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    pub fn overlaps(&self) -> &[Overlap] {
        &self.overlaps
    }

    /// Pools that could not be parsed, with the reason.
    pub fn invalid(&self) -> &[(String, String)] {
        &self.invalid
    }

    pub fn by_name(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The usable pool whose CIDR contains `addr`.
    pub fn containing(&self, addr: IpAddr) -> Option<&Pool> {
        self.pools.iter().find(|p| p.cidr.contains(&addr))
    }

    /// The usable pool that contains `block` (a block lies wholly inside one pool).
    pub fn containing_net(&self, net: &IpNet) -> Option<&Pool> {
        self.pools.iter().find(|p| p.cidr.contains(net))
    }

    fn excluded_by(&self, name: &str) -> Option<&Overlap> {
        self.overlaps.iter().find(|o| o.excluded == name)
    }
}

fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Where the chosen pools came from, most specific first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSource {
    PodAnnotation,
    NamespaceAnnotation,
    CniConfig,
    NodeSelector,
}

/// What a pool choice is made from. Label and annotation maps are those of the objects.
#[derive(Debug, Clone, Copy)]
pub struct PoolRequest<'a> {
    pub family: Family,
    pub use_: AllowedUse,
    pub node: &'a str,
    pub node_labels: &'a BTreeMap<String, String>,
    pub pod_annotations: Option<&'a BTreeMap<String, String>>,
    pub namespace_annotations: Option<&'a BTreeMap<String, String>>,
    /// None for allocations with no namespace (tunnel addresses).
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    /// `ipam.ipv4_pools` / `ipam.ipv6_pools` of the CNI config for this family.
    pub cni_pools: &'a [String],
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolChoice<'p> {
    pub pools: Vec<&'p Pool>,
    pub source: PoolSource,
}

/// Chooses the pools for one address family. An explicit list (annotation or CNI config) is
/// used as given, bypassing selectors as Calico does; each entry must exist and be enabled.
/// Otherwise every enabled, Automatic pool allowing the use whose selectors match.
pub fn choose_pools<'p>(
    set: &'p PoolSet,
    req: &PoolRequest<'_>,
) -> Result<PoolChoice<'p>, IpamError> {
    let key = req.family.pools_annotation();
    let explicit = [
        (req.pod_annotations, PoolSource::PodAnnotation, "pod"),
        (
            req.namespace_annotations,
            PoolSource::NamespaceAnnotation,
            "namespace",
        ),
    ]
    .into_iter()
    .find_map(|(ann, source, whose)| Some((ann?.get(key)?, source, whose)));
    if let Some((value, source, whose)) = explicit {
        let names = parse_json_list(value).map_err(|reason| IpamError::BadAnnotation {
            whose,
            key,
            value: value.clone(),
            reason,
        })?;
        return resolve_named(set, &names, req, source);
    }
    if !req.cni_pools.is_empty() {
        return resolve_named(set, req.cni_pools, req, PoolSource::CniConfig);
    }
    let pools: Vec<&Pool> = set
        .pools()
        .iter()
        .filter(|p| p.family() == req.family && !p.disabled && p.automatic)
        .filter(|p| p.allowed_uses.contains(&req.use_))
        .filter(|p| p.node_selector.matches(req.node_labels))
        .filter(|p| match (&p.namespace_selector, req.namespace_labels) {
            (None, _) => true,
            (Some(sel), Some(labels)) => sel.matches(labels),
            (Some(sel), None) => sel.is_all(),
        })
        .collect();
    if pools.is_empty() {
        return Err(IpamError::NoPoolForNode {
            family: req.family,
            node: req.node.to_string(),
            use_: format!("{:?}", req.use_),
        });
    }
    Ok(PoolChoice {
        pools,
        source: PoolSource::NodeSelector,
    })
}

fn resolve_named<'p>(
    set: &'p PoolSet,
    names: &[String],
    req: &PoolRequest<'_>,
    source: PoolSource,
) -> Result<PoolChoice<'p>, IpamError> {
    let mut pools: Vec<&Pool> = Vec::new();
    for entry in names {
        let found = match entry.parse::<IpNet>() {
            Ok(net) => set.pools().iter().find(|p| p.cidr == net),
            Err(_) => set.by_name(entry),
        };
        let pool = match found {
            Some(p) => p,
            None => {
                let reason = match set.excluded_by(entry) {
                    Some(o) => format!("overlaps the older pool {:?} and is not used", o.kept),
                    None => "does not exist".to_string(),
                };
                return Err(IpamError::RequestedPoolUnusable {
                    pool: entry.clone(),
                    reason,
                });
            }
        };
        let reason = if pool.disabled {
            Some("is disabled".to_string())
        } else if pool.family() != req.family {
            Some(format!("is not an {} pool", req.family))
        } else if !pool.allowed_uses.contains(&req.use_) {
            Some(format!("does not allow use {:?}", req.use_))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(IpamError::RequestedPoolUnusable {
                pool: entry.clone(),
                reason,
            });
        }
        if !pools.contains(&pool) {
            pools.push(pool);
        }
    }
    Ok(PoolChoice { pools, source })
}

fn parse_json_list(value: &str) -> Result<Vec<String>, String> {
    serde_json::from_str::<Vec<String>>(value).map_err(|e| e.to_string())
}

/// Parses the `ipAddrs` annotation: a JSON list with at most one IPv4 and one IPv6 address.
pub fn parse_ip_addrs(value: &str) -> Result<Vec<IpAddr>, IpamError> {
    let bad = |reason: String| IpamError::BadAnnotation {
        whose: "pod",
        key: ANNOTATION_IP_ADDRS,
        value: value.to_string(),
        reason,
    };
    let list = parse_json_list(value).map_err(bad)?;
    let mut out: Vec<IpAddr> = Vec::new();
    for s in &list {
        let addr: IpAddr = s
            .trim()
            .parse()
            .map_err(|_| bad(format!("{s:?} is not an IP address")))?;
        if out.iter().any(|a| a.is_ipv4() == addr.is_ipv4()) {
            return Err(bad(format!(
                "more than one {} address",
                Family::of_addr(&addr)
            )));
        }
        out.push(addr);
    }
    if out.is_empty() {
        return Err(bad("the list is empty".to_string()));
    }
    Ok(out)
}

/// The pool a fixed address must come from; fails saying why the address cannot be used.
pub fn pool_for_fixed_ip(
    set: &PoolSet,
    addr: IpAddr,
    use_: AllowedUse,
) -> Result<&Pool, IpamError> {
    let Some(pool) = set.containing(addr) else {
        let reason = match set.excluded.iter().find(|p| p.cidr.contains(&addr)) {
            Some(p) => format!(
                "its pool {} overlaps the older pool {:?} and is not used",
                p.describe(),
                set.excluded_by(&p.name)
                    .map(|o| o.kept.as_str())
                    .unwrap_or_default()
            ),
            None => "it is outside every IP pool".to_string(),
        };
        return Err(IpamError::FixedIpUnusable { addr, reason });
    };
    if pool.disabled {
        return Err(IpamError::FixedIpUnusable {
            addr,
            reason: format!("its pool {} is disabled", pool.describe()),
        });
    }
    if !pool.allowed_uses.contains(&use_) {
        return Err(IpamError::FixedIpUnusable {
            addr,
            reason: format!("its pool {} does not allow use {use_:?}", pool.describe()),
        });
    }
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IPPoolSpec;

    fn ippool(name: &str, cidr: &str, created: i64) -> IPPool {
        let mut p = IPPool::new(
            name,
            IPPoolSpec {
                cidr: cidr.into(),
                ..Default::default()
            },
        );
        p.metadata.creation_timestamp =
            DateTime::from_timestamp(created, 0).and_then(super::super::convert::chrono_to_time);
        p
    }
    fn set(pools: Vec<IPPool>) -> PoolSet {
        let s = PoolSet::from_ippools(pools.iter());
        assert!(s.invalid().is_empty(), "{:?}", s.invalid());
        s
    }
    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
    fn names(c: &PoolChoice<'_>) -> Vec<String> {
        c.pools.iter().map(|p| p.name.clone()).collect()
    }
    fn request<'a>(labels: &'a BTreeMap<String, String>) -> PoolRequest<'a> {
        PoolRequest {
            family: Family::V4,
            use_: AllowedUse::Workload,
            node: "n1",
            node_labels: labels,
            pod_annotations: None,
            namespace_annotations: None,
            namespace_labels: None,
            cni_pools: &[],
        }
    }

    #[test]
    fn pod_annotation_beats_namespace_annotation_beats_cni_config_beats_selectors() {
        let s = set(vec![
            ippool("a", "10.1.0.0/16", 1),
            ippool("b", "10.2.0.0/16", 2),
            ippool("c", "10.3.0.0/16", 3),
            ippool("d", "10.4.0.0/16", 4),
        ]);
        let labels = map(&[]);
        let pod = map(&[(ANNOTATION_IPV4_POOLS, r#"["a"]"#)]);
        let ns = map(&[(ANNOTATION_IPV4_POOLS, r#"["10.2.0.0/16"]"#)]);
        let cni = vec!["c".to_string()];
        let mut req = request(&labels);
        req.pod_annotations = Some(&pod);
        req.namespace_annotations = Some(&ns);
        req.cni_pools = &cni;
        let c = choose_pools(&s, &req).unwrap();
        assert_eq!(
            (names(&c), c.source),
            (vec!["a".into()], PoolSource::PodAnnotation)
        );
        req.pod_annotations = None;
        let c = choose_pools(&s, &req).unwrap();
        assert_eq!(
            (names(&c), c.source),
            (vec!["b".into()], PoolSource::NamespaceAnnotation)
        );
        req.namespace_annotations = None;
        let c = choose_pools(&s, &req).unwrap();
        assert_eq!(
            (names(&c), c.source),
            (vec!["c".into()], PoolSource::CniConfig)
        );
        req.cni_pools = &[];
        let c = choose_pools(&s, &req).unwrap();
        assert_eq!(names(&c), vec!["a", "b", "c", "d"]);
        assert_eq!(c.source, PoolSource::NodeSelector);
    }

    #[test]
    fn v6_annotation_does_not_steer_v4() {
        let s = set(vec![
            ippool("a", "10.1.0.0/16", 1),
            ippool("b", "10.2.0.0/16", 2),
        ]);
        let labels = map(&[]);
        let pod = map(&[(ANNOTATION_IPV6_POOLS, r#"["v6"]"#)]);
        let mut req = request(&labels);
        req.pod_annotations = Some(&pod);
        assert_eq!(names(&choose_pools(&s, &req).unwrap()), vec!["a", "b"]);
    }

    #[test]
    fn missing_or_disabled_named_pool_is_an_error_naming_it() {
        let mut off = ippool("off", "10.9.0.0/16", 1);
        off.spec.disabled = true;
        let s = set(vec![ippool("a", "10.1.0.0/16", 1), off]);
        let labels = map(&[]);
        let mut req = request(&labels);
        let cni = vec!["a".to_string(), "nope".to_string()];
        req.cni_pools = &cni;
        let err = choose_pools(&s, &req).unwrap_err().to_string();
        assert_eq!(err, "the given pool (nope) does not exist");
        let cni = vec!["off".to_string()];
        req.cni_pools = &cni;
        let err = choose_pools(&s, &req).unwrap_err().to_string();
        assert_eq!(err, "the given pool (off) is disabled");
    }

    #[test]
    fn malformed_annotation_is_quoted_in_the_error() {
        let s = set(vec![ippool("a", "10.1.0.0/16", 1)]);
        let labels = map(&[]);
        let ns = map(&[(ANNOTATION_IPV4_POOLS, "[external-pool]")]);
        let mut req = request(&labels);
        req.namespace_annotations = Some(&ns);
        let err = choose_pools(&s, &req).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "namespace annotation cni.projectcalico.org/ipv4pools=\"[external-pool]\" is not a valid JSON list"
            ),
            "{err}"
        );
    }

    #[test]
    fn selectors_assignment_mode_uses_and_disabled_filter_automatic_pools() {
        let mut zone = ippool("zone-a", "10.1.0.0/16", 1);
        zone.spec.node_selector = Some("zone == 'a'".into());
        let mut manual = ippool("manual", "10.2.0.0/16", 1);
        manual.spec.assignment_mode = Some(AssignmentMode::Manual);
        let mut tunnel = ippool("tunnel-only", "10.3.0.0/16", 1);
        tunnel.spec.allowed_uses = vec![AllowedUse::Tunnel];
        let mut off = ippool("off", "10.4.0.0/16", 1);
        off.spec.disabled = true;
        let v6 = ippool("v6", "fd00::/48", 1);
        let s = set(vec![
            zone,
            manual,
            tunnel,
            off,
            v6,
            ippool("z-all", "10.5.0.0/16", 1),
        ]);
        let a = map(&[("zone", "a")]);
        let b = map(&[("zone", "b")]);
        assert_eq!(
            names(&choose_pools(&s, &request(&a)).unwrap()),
            vec!["z-all", "zone-a"]
        );
        assert_eq!(
            names(&choose_pools(&s, &request(&b)).unwrap()),
            vec!["z-all"]
        );
        let mut t = request(&b);
        t.use_ = AllowedUse::Tunnel;
        assert_eq!(
            names(&choose_pools(&s, &t).unwrap()),
            vec!["tunnel-only", "z-all"]
        );
        t.family = Family::V6;
        assert_eq!(names(&choose_pools(&s, &t).unwrap()), vec!["v6"]);
    }

    #[test]
    fn no_matching_pool_names_the_node() {
        let mut zone = ippool("zone-a", "10.1.0.0/16", 1);
        zone.spec.node_selector = Some("zone == 'a'".into());
        let s = set(vec![zone]);
        let labels = map(&[]);
        let err = choose_pools(&s, &request(&labels)).unwrap_err().to_string();
        assert_eq!(
            err,
            "no enabled IPv4 pool allows use Workload and selects node \"n1\""
        );
    }

    #[test]
    fn newer_of_two_overlapping_pools_is_excluded_and_reported() {
        let s = set(vec![
            ippool("new", "10.1.0.0/24", 20),
            ippool("old", "10.1.0.0/16", 10),
            ippool("same-time-b", "10.7.0.0/16", 5),
            ippool("same-time-a", "10.7.0.0/20", 5),
        ]);
        let kept: Vec<_> = s.pools().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(kept, vec!["old", "same-time-a"]);
        assert_eq!(
            s.overlaps(),
            &[
                Overlap {
                    kept: "same-time-a".into(),
                    excluded: "same-time-b".into()
                },
                Overlap {
                    kept: "old".into(),
                    excluded: "new".into()
                },
            ]
        );
        let labels = map(&[]);
        let mut req = request(&labels);
        let cni = vec!["new".to_string()];
        req.cni_pools = &cni;
        let err = choose_pools(&s, &req).unwrap_err().to_string();
        assert_eq!(
            err,
            "the given pool (new) overlaps the older pool \"old\" and is not used"
        );
    }

    #[test]
    fn ip_addrs_annotation_is_parsed_and_checked() {
        assert_eq!(
            parse_ip_addrs(r#"["10.0.0.7", "fd00::7"]"#).unwrap(),
            vec![
                "10.0.0.7".parse::<IpAddr>().unwrap(),
                "fd00::7".parse().unwrap()
            ]
        );
        let err = parse_ip_addrs(r#"["10.0.0.7","10.0.0.8"]"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than one IPv4 address"), "{err}");
        let err = parse_ip_addrs("10.0.0.7").unwrap_err().to_string();
        assert!(err.contains("ipAddrs=\"10.0.0.7\""), "{err}");
        assert!(
            parse_ip_addrs(r#"["banana"]"#)
                .unwrap_err()
                .to_string()
                .contains("\"banana\" is not an IP address")
        );

        let mut off = ippool("off", "10.9.0.0/16", 1);
        off.spec.disabled = true;
        let s = set(vec![ippool("a", "10.1.0.0/16", 1), off]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            pool_for_fixed_ip(&s, ip("10.1.2.3"), AllowedUse::Workload)
                .unwrap()
                .name,
            "a"
        );
        assert_eq!(
            pool_for_fixed_ip(&s, ip("10.0.0.7"), AllowedUse::Workload)
                .unwrap_err()
                .to_string(),
            "cannot assign fixed address 10.0.0.7: it is outside every IP pool"
        );
        assert_eq!(
            pool_for_fixed_ip(&s, ip("10.9.0.7"), AllowedUse::Workload)
                .unwrap_err()
                .to_string(),
            "cannot assign fixed address 10.9.0.7: its pool \"off\" (10.9.0.0/16) is disabled"
        );
    }

    #[test]
    fn unparsable_pools_are_reported_not_used() {
        let mut bad = ippool("bad", "10.1.0.0/16", 1);
        bad.spec.node_selector = Some("zone ==".into());
        let s = PoolSet::from_ippools([bad, ippool("good", "10.2.0.0/16", 1)].iter());
        assert_eq!(s.pools().len(), 1);
        assert_eq!(s.invalid()[0].0, "bad");
    }
}
