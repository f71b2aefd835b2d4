//! The default IPPool from Calico's start-up variables (`CALICO_IPV4POOL_CIDR` and its
//! companions): the Lease holder creates `default-ipv4-ippool` when no IPPool exists, as
//! calico-node does, but with tortie's AKS-safe defaults (VXLAN Always, IPIP Never,
//! natOutgoing) and never over the node or service network: such a pool would capture the
//! traffic to nodes or Services, so it is refused with an error naming both CIDRs.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use tokio::sync::watch;

use crate::api::{EncapMode, IPPool, IPPoolSpec};

/// Calico's name for the pool it creates from `CALICO_IPV4POOL_CIDR`.
pub const DEFAULT_POOL_NAME: &str = "default-ipv4-ippool";
/// Reason of the Warning Event when the pool is refused.
pub const REASON_OVERLAP: &str = "DefaultPoolOverlap";
const CONTROLLER: &str = "tortie-ipam";
const NODE_ADDRESS_ANNOTATION: &str = "projectcalico.org/IPv4Address";
/// How long the leader waits before trying again after a refusal or an API error.
const RETRY: Duration = Duration::from_secs(30);

/// The variables as `tortie node` reads them (flags exist for tests and the sandbox).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DefaultPoolArgs {
    /// CIDR of the IPv4 pool the Lease holder creates (`default-ipv4-ippool`) when no IPPool
    /// exists; unset: no default pool.
    #[arg(long = "ipv4-pool-cidr", env = "CALICO_IPV4POOL_CIDR")]
    pub cidr: Option<String>,
    /// Block size of the default pool, 20-32 [default: 26].
    #[arg(long = "ipv4-pool-block-size", env = "CALICO_IPV4POOL_BLOCK_SIZE")]
    pub block_size: Option<String>,
    /// vxlanMode of the default pool: Always, CrossSubnet or Never [default: Always].
    #[arg(long = "ipv4-pool-vxlan", env = "CALICO_IPV4POOL_VXLAN")]
    pub vxlan: Option<String>,
    /// ipipMode of the default pool: Always, CrossSubnet or Never [default: Never].
    #[arg(long = "ipv4-pool-ipip", env = "CALICO_IPV4POOL_IPIP")]
    pub ipip: Option<String>,
    /// natOutgoing of the default pool [default: true].
    #[arg(long = "ipv4-pool-nat-outgoing", env = "CALICO_IPV4POOL_NAT_OUTGOING")]
    pub nat_outgoing: Option<String>,
    /// nodeSelector of the default pool [default: all()].
    #[arg(
        long = "ipv4-pool-node-selector",
        env = "CALICO_IPV4POOL_NODE_SELECTOR"
    )]
    pub node_selector: Option<String>,
    /// true: never create a default pool, whatever CALICO_IPV4POOL_CIDR says.
    #[arg(long = "no-default-pools", env = "NO_DEFAULT_POOLS")]
    pub no_default_pools: Option<String>,
    /// The cluster's service CIDRs (kube-apiserver's --service-cluster-ip-range), comma
    /// separated: a default pool overlapping one is refused.
    #[arg(
        long = "service-cidr",
        env = "TORTIE_SERVICE_CIDR",
        value_delimiter = ','
    )]
    pub service_cidr: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefaultPoolError {
    #[error("{var}={value:?} is not {expected}")]
    Invalid {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "CALICO_IPV4POOL_IPIP and CALICO_IPV4POOL_VXLAN are both enabled; a pool uses one encapsulation"
    )]
    BothEncapsulations,
    #[error(
        "default pool {pool} (CALICO_IPV4POOL_CIDR) overlaps the {what} {other}: refusing to create it; choose a pod CIDR outside the node and service networks"
    )]
    Overlap {
        pool: Ipv4Net,
        what: String,
        other: IpNet,
    },
}

/// What the leader creates, validated once at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultPool {
    pub cidr: Ipv4Net,
    pub spec: IPPoolSpec,
    /// Service networks a pool must not overlap.
    pub service_cidrs: Vec<IpNet>,
}

/// Service CIDRs alone (they are read even when no default pool is asked for).
fn parse_service_cidrs(values: &[String]) -> Result<Vec<IpNet>, DefaultPoolError> {
    values
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| DefaultPoolError::Invalid {
                    var: "TORTIE_SERVICE_CIDR",
                    value: s.to_string(),
                    expected: "a comma-separated list of CIDRs",
                })
        })
        .collect()
}

/// Go's strconv.ParseBool, which Calico uses for its boolean variables.
fn parse_bool(var: &'static str, value: &str) -> Result<bool, DefaultPoolError> {
    match value.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(DefaultPoolError::Invalid {
            var,
            value: other.to_string(),
            expected: "true or false",
        }),
    }
}

/// Calico compares the modes case-insensitively and takes `Off` for `Never`.
fn parse_mode(var: &'static str, value: &str) -> Result<EncapMode, DefaultPoolError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "always" => Ok(EncapMode::Always),
        "crosssubnet" => Ok(EncapMode::CrossSubnet),
        "never" | "off" => Ok(EncapMode::Never),
        _ => Err(DefaultPoolError::Invalid {
            var,
            value: value.to_string(),
            expected: "Always, CrossSubnet or Never",
        }),
    }
}

/// Unset or empty means "use the default", as Calico's `os.Getenv(...) == ""` does.
fn set(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl DefaultPool {
    /// `None` when no pool is asked for (`CALICO_IPV4POOL_CIDR` unset or `NO_DEFAULT_POOLS`).
    pub fn from_args(args: &DefaultPoolArgs) -> Result<Option<DefaultPool>, DefaultPoolError> {
        let service_cidrs = parse_service_cidrs(&args.service_cidr)?;
        if let Some(v) = set(&args.no_default_pools)
            && parse_bool("NO_DEFAULT_POOLS", v)?
        {
            return Ok(None);
        }
        let Some(cidr_text) = set(&args.cidr) else {
            return Ok(None);
        };
        // Calico masks the value (192.168.1.0/16 → 192.168.0.0/16).
        let cidr = cidr_text
            .parse::<Ipv4Net>()
            .map_err(|_| DefaultPoolError::Invalid {
                var: "CALICO_IPV4POOL_CIDR",
                value: cidr_text.to_string(),
                expected: "an IPv4 CIDR such as 192.168.0.0/16",
            })?
            .trunc();
        let link_local: Ipv4Net = Ipv4Net::new(Ipv4Addr::new(169, 254, 0, 0), 16).expect("valid");
        if overlaps(&IpNet::V4(cidr), &IpNet::V4(link_local)) {
            return Err(DefaultPoolError::Invalid {
                var: "CALICO_IPV4POOL_CIDR",
                value: cidr_text.to_string(),
                expected: "outside the link-local range 169.254.0.0/16",
            });
        }
        let block_size = match set(&args.block_size) {
            None => None,
            Some(v) => {
                let size = v.parse::<u8>().ok().filter(|s| (20..=32).contains(s));
                match size {
                    Some(s) if s >= cidr.prefix_len() => Some(i32::from(s)),
                    _ => {
                        return Err(DefaultPoolError::Invalid {
                            var: "CALICO_IPV4POOL_BLOCK_SIZE",
                            value: v.to_string(),
                            expected: "20-32 and not shorter than the pool's prefix",
                        });
                    }
                }
            }
        };
        let vxlan = set(&args.vxlan).map_or(Ok(EncapMode::Always), |v| {
            parse_mode("CALICO_IPV4POOL_VXLAN", v)
        })?;
        let ipip = set(&args.ipip).map_or(Ok(EncapMode::Never), |v| {
            parse_mode("CALICO_IPV4POOL_IPIP", v)
        })?;
        if vxlan != EncapMode::Never && ipip != EncapMode::Never {
            return Err(DefaultPoolError::BothEncapsulations);
        }
        let nat_outgoing = set(&args.nat_outgoing)
            .map_or(Ok(true), |v| parse_bool("CALICO_IPV4POOL_NAT_OUTGOING", v))?;
        let node_selector = match set(&args.node_selector) {
            None => None,
            Some(v) => {
                crate::selector::parse_node_selector(v).map_err(|_| DefaultPoolError::Invalid {
                    var: "CALICO_IPV4POOL_NODE_SELECTOR",
                    value: v.to_string(),
                    expected: "a Calico selector such as all() or role == 'worker'",
                })?;
                Some(v.to_string())
            }
        };
        Ok(Some(DefaultPool {
            cidr,
            spec: IPPoolSpec {
                cidr: cidr.to_string(),
                block_size,
                ipip_mode: ipip,
                vxlan_mode: vxlan,
                nat_outgoing,
                node_selector,
                ..IPPoolSpec::default()
            },
            service_cidrs,
        }))
    }

    /// The pool object to create.
    pub fn object(&self) -> IPPool {
        IPPool::new(DEFAULT_POOL_NAME, self.spec.clone())
    }

    /// Refuses the pool when it overlaps a service CIDR or a node network (each node's
    /// `projectcalico.org/IPv4Address` subnet, else its InternalIP).
    pub fn check(&self, nodes: &[NodeNetwork]) -> Result<(), DefaultPoolError> {
        let pool = IpNet::V4(self.cidr);
        let overlap = |what: String, other: IpNet| DefaultPoolError::Overlap {
            pool: self.cidr,
            what,
            other,
        };
        if let Some(s) = self.service_cidrs.iter().find(|s| overlaps(&pool, s)) {
            return Err(overlap("service network".into(), *s));
        }
        if let Some(n) = nodes.iter().find(|n| overlaps(&pool, &n.network)) {
            return Err(overlap(format!("network of node {:?}", n.node), n.network));
        }
        Ok(())
    }
}

/// Two CIDRs overlap when one contains the other's network address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A network a node is on, as far as the API server tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNetwork {
    pub node: String,
    pub network: IpNet,
}

/// The node's subnet from its `projectcalico.org/IPv4Address` (address/prefix, written by
/// tortie and calico-node); without it, each InternalIP as a host address.
pub fn node_networks(node: &Node) -> Vec<NodeNetwork> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let annotated = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(NODE_ADDRESS_ANNOTATION))
        .and_then(|v| v.parse::<IpNet>().ok())
        .map(|n| n.trunc());
    if let Some(network) = annotated {
        return vec![NodeNetwork {
            node: name,
            network,
        }];
    }
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .map(|ip| NodeNetwork {
            node: name.clone(),
            network: IpNet::from(ip),
        })
        .collect()
}

/// What one attempt did.
#[derive(Debug)]
enum Attempt {
    Created,
    PoolsExist,
    Refused(DefaultPoolError),
}

async fn attempt(
    client: &Client,
    pool: &DefaultPool,
    nodes: &Store<Node>,
) -> Result<Attempt, kube::Error> {
    let api: Api<IPPool> = Api::all(client.clone());
    if !api
        .list(&ListParams::default().limit(1))
        .await?
        .items
        .is_empty()
    {
        return Ok(Attempt::PoolsExist);
    }
    let networks: Vec<NodeNetwork> = nodes
        .state()
        .iter()
        .flat_map(|n| node_networks(n))
        .collect();
    if let Err(e) = pool.check(&networks) {
        return Ok(Attempt::Refused(e));
    }
    match api.create(&PostParams::default(), &pool.object()).await {
        Ok(_) => Ok(Attempt::Created),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(Attempt::PoolsExist),
        Err(e) => Err(e),
    }
}

/// While this daemon holds the Lease: creates the pool unless one exists, once. A refusal is
/// logged and published as a Warning Event on this node's Node object, then checked again
/// every `RETRY` (the nodes, or the pools, may change).
pub async fn run(
    client: Client,
    pool: DefaultPool,
    node: String,
    nodes: Store<Node>,
    mut is_leader: watch::Receiver<bool>,
    mut stopped: watch::Receiver<bool>,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER.to_string(),
            instance: Some(node.clone()),
        },
    );
    let mut reported: Option<DefaultPoolError> = None;
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            r = is_leader.wait_for(|l| *l) => if r.is_err() { return },
        }
        match attempt(&client, &pool, &nodes).await {
            Ok(Attempt::Created) => {
                tracing::info!(name = DEFAULT_POOL_NAME, cidr = %pool.cidr,
                    vxlan = ?pool.spec.vxlan_mode, ipip = ?pool.spec.ipip_mode,
                    nat_outgoing = pool.spec.nat_outgoing, "created the default IP pool");
                return;
            }
            Ok(Attempt::PoolsExist) => {
                tracing::debug!("IP pools exist; no default pool created");
                return;
            }
            Ok(Attempt::Refused(e)) => {
                if reported.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "default IP pool refused");
                    publish(&recorder, &node, &e).await;
                    reported = Some(e);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot create the default IP pool; retrying"),
        }
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn publish(recorder: &Recorder, node: &str, e: &DefaultPoolError) {
    let reference = ObjectReference {
        api_version: Some(<Node as k8s_openapi::Resource>::API_VERSION.to_string()),
        kind: Some(<Node as k8s_openapi::Resource>::KIND.to_string()),
        name: Some(node.to_string()),
        ..ObjectReference::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: REASON_OVERLAP.to_string(),
        note: Some(e.to_string()),
        action: "CreateDefaultPool".to_string(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&event, &reference).await {
        tracing::warn!(error = %err, "cannot publish the default pool event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn args(cidr: &str) -> DefaultPoolArgs {
        DefaultPoolArgs {
            cidr: Some(cidr.into()),
            ..DefaultPoolArgs::default()
        }
    }

    fn pool(a: &DefaultPoolArgs) -> DefaultPool {
        DefaultPool::from_args(a).expect("valid").expect("a pool")
    }

    #[test]
    fn defaults_are_safe_on_azure() {
        let p = pool(&args("192.168.0.0/16"));
        assert_eq!(p.spec.vxlan_mode, EncapMode::Always);
        assert_eq!(p.spec.ipip_mode, EncapMode::Never);
        assert!(p.spec.nat_outgoing);
        assert_eq!(p.spec.block_size, None, "Calico's default 26 applies");
        assert_eq!(p.spec.node_selector, None);
        assert_eq!(p.object().metadata.name.as_deref(), Some(DEFAULT_POOL_NAME));
    }

    #[test]
    fn no_cidr_or_no_default_pools_means_no_pool() {
        assert_eq!(
            DefaultPool::from_args(&DefaultPoolArgs::default()),
            Ok(None)
        );
        let mut a = args("10.1.0.0/16");
        a.no_default_pools = Some("true".into());
        assert_eq!(DefaultPool::from_args(&a), Ok(None));
        a.no_default_pools = Some("false".into());
        assert!(DefaultPool::from_args(&a).expect("valid").is_some());
    }

    #[test]
    fn companions_follow_calicos_spelling() {
        let mut a = args("10.1.0.0/16");
        a.block_size = Some("24".into());
        a.vxlan = Some("never".into());
        a.ipip = Some("CrossSubnet".into());
        a.nat_outgoing = Some("false".into());
        a.node_selector = Some("role == 'worker'".into());
        let p = pool(&a);
        assert_eq!(p.spec.block_size, Some(24));
        assert_eq!(p.spec.vxlan_mode, EncapMode::Never);
        assert_eq!(p.spec.ipip_mode, EncapMode::CrossSubnet);
        assert!(!p.spec.nat_outgoing);
        assert_eq!(p.spec.node_selector.as_deref(), Some("role == 'worker'"));
    }

    #[test]
    fn the_cidr_is_masked_as_calico_does() {
        assert_eq!(pool(&args("192.168.7.9/16")).spec.cidr, "192.168.0.0/16");
    }

    #[test]
    fn invalid_values_name_the_variable() {
        type Edit = fn(&mut DefaultPoolArgs);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |a| a.cidr = Some("fd00::/64".into()),
                "CALICO_IPV4POOL_CIDR",
            ),
            (
                |a| a.cidr = Some("169.254.0.0/20".into()),
                "CALICO_IPV4POOL_CIDR",
            ),
            (
                |a| a.block_size = Some("33".into()),
                "CALICO_IPV4POOL_BLOCK_SIZE",
            ),
            (
                |a| a.block_size = Some("12".into()),
                "CALICO_IPV4POOL_BLOCK_SIZE",
            ),
            (
                |a| a.vxlan = Some("sometimes".into()),
                "CALICO_IPV4POOL_VXLAN",
            ),
            (
                |a| a.nat_outgoing = Some("yes".into()),
                "CALICO_IPV4POOL_NAT_OUTGOING",
            ),
            (
                |a| a.node_selector = Some("((".into()),
                "CALICO_IPV4POOL_NODE_SELECTOR",
            ),
            (|a| a.service_cidr = vec!["x".into()], "TORTIE_SERVICE_CIDR"),
            (|a| a.ipip = Some("Always".into()), "both enabled"),
        ];
        for (edit, want) in cases {
            let mut a = args("10.1.0.0/16");
            edit(&mut a);
            let err = DefaultPool::from_args(&a).expect_err(want).to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn a_block_larger_than_the_pool_is_refused() {
        let mut a = args("10.1.0.0/24");
        a.block_size = Some("22".into());
        assert!(DefaultPool::from_args(&a).is_err());
    }

    fn node(name: &str, annotation: Option<&str>, internal: &[&str]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        if let Some(a) = annotation {
            n.metadata.annotations = Some(
                [(NODE_ADDRESS_ANNOTATION.to_string(), a.to_string())]
                    .into_iter()
                    .collect(),
            );
        }
        n.status = Some(NodeStatus {
            addresses: Some(
                internal
                    .iter()
                    .map(|ip| NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.to_string(),
                    })
                    .collect(),
            ),
            ..NodeStatus::default()
        });
        n
    }

    #[test]
    fn node_networks_prefer_the_annotated_subnet() {
        let n = node("aks-1", Some("10.224.0.4/16"), &["10.224.0.4"]);
        assert_eq!(
            node_networks(&n),
            vec![NodeNetwork {
                node: "aks-1".into(),
                network: "10.224.0.0/16".parse().expect("net"),
            }]
        );
        let bare = node("k", None, &["192.168.5.6"]);
        assert_eq!(
            node_networks(&bare)[0].network,
            "192.168.5.6/32".parse::<IpNet>().expect("net")
        );
    }

    #[test]
    fn overlaps_with_node_or_service_network_name_both_cidrs() {
        let mut a = args("10.0.0.0/8");
        a.service_cidr = vec!["10.0.0.0/16".into()];
        let err = pool(&a)
            .check(&[])
            .expect_err("service overlap")
            .to_string();
        assert!(
            err.contains("10.0.0.0/8") && err.contains("10.0.0.0/16"),
            "{err}"
        );
        assert!(err.contains("service network"), "{err}");

        let p = pool(&args("10.224.0.0/12"));
        let nets = node_networks(&node("aks-1", Some("10.224.0.4/16"), &[]));
        let err = p.check(&nets).expect_err("node overlap").to_string();
        assert!(
            err.contains("10.224.0.0/12") && err.contains("10.224.0.0/16"),
            "{err}"
        );
        assert!(err.contains("aks-1"), "{err}");
        // A node network inside a larger pool and a pool inside a node network both count.
        let inner = pool(&args("10.224.1.0/24"));
        assert!(inner.check(&nets).is_err());
    }

    #[test]
    fn disjoint_networks_pass() {
        let mut a = args("192.168.0.0/16");
        a.service_cidr = vec!["10.0.0.0/16".into(), "fd00:10::/108".into()];
        let nets = node_networks(&node("aks-1", Some("10.224.0.4/16"), &[]));
        assert_eq!(pool(&a).check(&nets), Ok(()));
        assert!(!overlaps(
            &"192.168.0.0/16".parse().expect("a"),
            &"192.169.0.0/16".parse().expect("b")
        ));
    }
}
