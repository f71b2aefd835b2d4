//! Settings of `tortie node`, from flags and environment variables, validated once at start-up
//! into a `NodeConfig`. Only settings that change behaviour today live here; the reference
//! table in README ("Configuration") lists each flag, its variable and its default.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::cni::service::CniNodeArgs;
use crate::datastore::lease;
use crate::ipam::default_pool::{DefaultPool, DefaultPoolArgs, DefaultPoolError};
use crate::node::identity::{self, IdentityError};

/// Raw flags of `tortie node` as clap parses them.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeArgs {
    /// Name of this node's Node object (the DaemonSet sets it from `spec.nodeName`).
    #[arg(long, env = "NODENAME")]
    pub node_name: Option<String>,

    /// Kubeconfig file to reach the API server; without it the in-cluster service account is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Address the health server (`/liveness`, `/readiness`) listens on [default: 0.0.0.0].
    /// Set explicitly, it wins over FelixConfiguration `healthHost`.
    #[arg(long, env = "TORTIE_HEALTH_ADDR")]
    pub health_addr: Option<IpAddr>,

    /// Port of the health server [default: 9099]; set, it wins over `healthPort`.
    #[arg(long, env = "TORTIE_HEALTH_PORT")]
    pub health_port: Option<u16>,

    /// Address the Prometheus metrics server (`/metrics`) listens on [default: 0.0.0.0];
    /// set, it wins over FelixConfiguration `prometheusMetricsHost`.
    #[arg(long, env = "TORTIE_METRICS_ADDR")]
    pub metrics_addr: Option<IpAddr>,

    /// Port of the metrics server [default: 9091]; set, it wins over `prometheusMetricsPort`.
    #[arg(long, env = "TORTIE_METRICS_PORT")]
    pub metrics_port: Option<u16>,

    /// How the node IP is found, as in Calico: first-found, interface=<regex>,
    /// skip-interface=<regex>, cidr=<cidr>, can-reach=<ip>, kubernetes-internal-ip.
    #[arg(long, env = "IP_AUTODETECTION_METHOD", default_value = "first-found")]
    pub ip_autodetection_method: String,

    /// Seconds between full dataplane resyncs that repair drift the kernel monitor missed
    /// [default: 90]; set, it wins over FelixConfiguration `routeRefreshInterval`.
    #[arg(long, env = "TORTIE_RESYNC_INTERVAL")]
    pub resync_interval: Option<u64>,

    /// TX checksum offload on `vxlan.calico` is broken here (Calico's ChecksumOffloadBroken):
    /// true turns it off, false keeps it on; unset decides from the kernel version.
    #[arg(long, env = "TORTIE_CHECKSUM_OFFLOAD_BROKEN")]
    pub checksum_offload_broken: Option<bool>,

    /// Namespace of the Lease that elects the node running cluster-wide jobs.
    #[arg(long, env = "TORTIE_LEASE_NAMESPACE", default_value = lease::DEFAULT_NAMESPACE)]
    pub lease_namespace: String,

    /// Seconds an address must stay leaked (no pod holds it) before the leader's GC releases
    /// it; also how long an empty block stays with its node (Calico's leakGracePeriod, 15 min).
    #[arg(long, env = "TORTIE_IPAM_GC_GRACE", default_value_t = 900)]
    pub ipam_gc_grace: u64,

    /// After a policy change is committed, delete the conntrack entries of this node's flows
    /// that the new policy denies, so they stop at once (off by default, as in Calico, where
    /// live connections outlive the policy that now denies them).
    #[arg(long, env = "TORTIE_POLICY_CUT_DENIED_CONNECTIONS")]
    pub policy_cut_denied_connections: bool,

    /// Enforce Kubernetes and Calico network policy in this node's `inet tortie-policy`
    /// table, with each CNI ADD answering only once its pod's policy is in the kernel;
    /// false (or 0) turns enforcement off.
    #[arg(long, env = "TORTIE_POLICY", default_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub policy: bool,

    #[command(flatten)]
    pub cni: CniNodeArgs,

    #[command(flatten)]
    pub default_pool: DefaultPoolArgs,
}

/// Where the API server credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubeSource {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account token and `KUBERNETES_SERVICE_HOST`/`_PORT`.
    InCluster,
}

/// Validated settings of the node daemon.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_name: String,
    pub kube: KubeSource,
    pub health_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub autodetection: identity::Method,
    pub resync_interval: Duration,
    pub checksum_offload_broken: Option<bool>,
    pub lease_namespace: String,
    pub ipam_gc_grace: Duration,
    pub policy_cut_denied_connections: bool,
    /// Network policy enforced (`TORTIE_POLICY`).
    pub policy: bool,
    pub cni: CniNodeArgs,
    /// The settings above that were given explicitly: they win over FelixConfiguration.
    pub felix_local: crate::felix_config::Local,
    /// The pool the Lease holder creates when none exists (`CALICO_IPV4POOL_CIDR`).
    pub default_pool: Option<DefaultPool>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("node name is not set: set NODENAME (or --node-name) to this node's Node object name")]
    MissingNodeName,
    #[error("node name {name:?} is not a valid Kubernetes node name: {why}")]
    InvalidNodeName { name: String, why: &'static str },
    #[error("{what} port must not be 0 (kubelet probes and Prometheus need a fixed port)")]
    ZeroPort { what: &'static str },
    #[error("health and metrics servers would both listen on {addr}: give them different ports")]
    SameListenAddress { addr: SocketAddr },
    #[error("kubeconfig path is empty: unset KUBECONFIG to use the in-cluster service account")]
    EmptyKubeconfig,
    #[error("IP_AUTODETECTION_METHOD: {0}")]
    Autodetection(String),
    #[error("TORTIE_RESYNC_INTERVAL must be at least 1 second")]
    ZeroResync,
    #[error("TORTIE_LEASE_NAMESPACE must not be empty")]
    EmptyLeaseNamespace,
    #[error("default pool: {0}")]
    DefaultPool(#[from] DefaultPoolError),
}

impl From<IdentityError> for ConfigError {
    fn from(e: IdentityError) -> Self {
        ConfigError::Autodetection(e.to_string())
    }
}

impl NodeConfig {
    pub fn from_args(args: NodeArgs) -> Result<NodeConfig, ConfigError> {
        let node_name = args.node_name.ok_or(ConfigError::MissingNodeName)?;
        validate_node_name(&node_name)?;
        let kube = match args.kubeconfig {
            Some(p) if p.as_os_str().is_empty() => return Err(ConfigError::EmptyKubeconfig),
            Some(p) => KubeSource::Kubeconfig(p),
            None => KubeSource::InCluster,
        };
        use crate::felix_config::merge::{
            DEFAULT_HEALTH_PORT, DEFAULT_LISTEN_HOST, DEFAULT_METRICS_PORT, DEFAULT_ROUTE_REFRESH,
        };
        let felix_local = crate::felix_config::Local {
            health_host: args.health_addr,
            health_port: args.health_port,
            metrics_host: args.metrics_addr,
            metrics_port: args.metrics_port,
            route_refresh: args.resync_interval.map(Duration::from_secs),
            checksum_offload_broken: args.checksum_offload_broken,
            log_level_set: crate::telemetry::filter_was_explicit(),
        };
        let health_port = args.health_port.unwrap_or(DEFAULT_HEALTH_PORT);
        let metrics_port = args.metrics_port.unwrap_or(DEFAULT_METRICS_PORT);
        if health_port == 0 {
            return Err(ConfigError::ZeroPort { what: "health" });
        }
        if metrics_port == 0 {
            return Err(ConfigError::ZeroPort { what: "metrics" });
        }
        let health_addr = args.health_addr.unwrap_or(DEFAULT_LISTEN_HOST);
        let metrics_addr = args.metrics_addr.unwrap_or(DEFAULT_LISTEN_HOST);
        let health_listen = SocketAddr::new(health_addr, health_port);
        let metrics_listen = SocketAddr::new(metrics_addr, metrics_port);
        // 0.0.0.0:P and 127.0.0.1:P also collide, so compare ports when either side is unspecified.
        let overlap = health_listen == metrics_listen
            || (health_port == metrics_port
                && (health_addr.is_unspecified() || metrics_addr.is_unspecified()));
        if overlap {
            return Err(ConfigError::SameListenAddress {
                addr: health_listen,
            });
        }
        let autodetection = identity::Method::parse(&args.ip_autodetection_method)?;
        let resync_interval = args
            .resync_interval
            .map_or(DEFAULT_ROUTE_REFRESH, Duration::from_secs);
        if resync_interval.is_zero() {
            return Err(ConfigError::ZeroResync);
        }
        if args.lease_namespace.is_empty() {
            return Err(ConfigError::EmptyLeaseNamespace);
        }
        let default_pool = DefaultPool::from_args(&args.default_pool)?;
        Ok(NodeConfig {
            node_name,
            kube,
            health_listen,
            metrics_listen,
            autodetection,
            resync_interval,
            checksum_offload_broken: args.checksum_offload_broken,
            lease_namespace: args.lease_namespace,
            ipam_gc_grace: Duration::from_secs(args.ipam_gc_grace),
            policy_cut_denied_connections: args.policy_cut_denied_connections,
            policy: args.policy,
            cni: args.cni,
            felix_local,
            default_pool,
        })
    }
}

/// Node names are DNS subdomains (RFC 1123): what the API server accepts for a Node.
fn validate_node_name(name: &str) -> Result<(), ConfigError> {
    let invalid = |why| {
        Err(ConfigError::InvalidNodeName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > 253 {
        return invalid("it is longer than 253 characters");
    }
    for label in name.split('.') {
        let bytes = label.as_bytes();
        let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
            return invalid("it has an empty label between dots");
        };
        if !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        {
            return invalid("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
            return invalid("each label must start and end with a letter or digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Harness {
        #[command(flatten)]
        args: NodeArgs,
    }

    fn parse(argv: &[&str]) -> NodeArgs {
        let mut full = vec!["tortie"];
        full.extend_from_slice(argv);
        Harness::try_parse_from(full).expect("flags parse").args
    }

    #[test]
    fn defaults_match_calico_ports() {
        let cfg = NodeConfig::from_args(parse(&["--node-name", "worker-1", "--kubeconfig", "/k"]))
            .expect("valid");
        assert_eq!(cfg.health_listen, "0.0.0.0:9099".parse().expect("addr"));
        assert_eq!(cfg.metrics_listen, "0.0.0.0:9091".parse().expect("addr"));
        assert_eq!(cfg.kube, KubeSource::Kubeconfig("/k".into()));
        assert_eq!(cfg.node_name, "worker-1");
        assert_eq!(
            cfg.felix_local,
            crate::felix_config::Local::default(),
            "nothing explicit: FelixConfiguration may set every one"
        );
    }

    #[test]
    fn cutting_denied_connections_is_off_unless_asked_for() {
        let base = ["--node-name", "w", "--kubeconfig", "/k"];
        let off = NodeConfig::from_args(parse(&base)).expect("valid");
        assert!(!off.policy_cut_denied_connections, "Calico keeps them");
        let mut argv = base.to_vec();
        argv.push("--policy-cut-denied-connections");
        let on = NodeConfig::from_args(parse(&argv)).expect("valid");
        assert!(on.policy_cut_denied_connections);
    }

    #[test]
    fn explicit_flags_are_remembered_so_they_win_over_felix_configuration() {
        let cfg = NodeConfig::from_args(parse(&[
            "--node-name",
            "n1",
            "--health-port",
            "9100",
            "--resync-interval",
            "30",
        ]))
        .expect("valid");
        assert_eq!(cfg.felix_local.health_port, Some(9100));
        assert_eq!(cfg.felix_local.route_refresh, Some(Duration::from_secs(30)));
        assert_eq!(cfg.felix_local.metrics_port, None);
        assert_eq!(cfg.health_listen.port(), 9100);
    }

    #[test]
    fn policy_is_enforced_unless_turned_off() {
        let on = |argv: &[&str]| {
            let mut full = vec!["--node-name", "n1"];
            full.extend_from_slice(argv);
            NodeConfig::from_args(parse(&full)).expect("valid").policy
        };
        assert!(on(&[]), "on by default");
        assert!(on(&["--policy", "true"]));
        assert!(!on(&["--policy", "false"]));
        assert!(!on(&["--policy", "0"]));
    }

    #[test]
    fn missing_node_name_names_the_variable() {
        let mut args = parse(&[]);
        args.node_name = None;
        let err = NodeConfig::from_args(args).expect_err("must fail");
        assert_eq!(err, ConfigError::MissingNodeName);
        assert!(err.to_string().contains("NODENAME"));
    }

    #[test]
    fn no_kubeconfig_means_in_cluster() {
        let mut args = parse(&["--node-name", "n1"]);
        args.kubeconfig = None;
        assert_eq!(
            NodeConfig::from_args(args).expect("valid").kube,
            KubeSource::InCluster
        );
    }

    #[test]
    fn node_names_follow_dns_subdomain_rules() {
        for ok in ["a", "aks-nodepool1-123.vmss", "n-0", "0n"] {
            assert!(validate_node_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Upper",
            "-lead",
            "trail-",
            "a..b",
            "under_score",
            &"x".repeat(254),
        ] {
            let err = validate_node_name(bad).expect_err(bad);
            assert!(matches!(err, ConfigError::InvalidNodeName { .. }), "{bad}");
        }
    }

    #[test]
    fn health_and_metrics_may_not_share_a_socket() {
        let err = NodeConfig::from_args(parse(&[
            "--node-name",
            "n1",
            "--health-port",
            "9000",
            "--metrics-port",
            "9000",
            "--metrics-addr",
            "127.0.0.1",
        ]))
        .expect_err("overlap");
        assert!(matches!(err, ConfigError::SameListenAddress { .. }));
        let ok = NodeConfig::from_args(parse(&[
            "--node-name",
            "n1",
            "--health-addr",
            "127.0.0.1",
            "--metrics-addr",
            "127.0.0.2",
            "--health-port",
            "9000",
            "--metrics-port",
            "9000",
        ]));
        assert!(ok.is_ok());
    }

    #[test]
    fn overlay_defaults_follow_calico() {
        let cfg = NodeConfig::from_args(parse(&["--node-name", "n1"])).expect("valid");
        assert_eq!(
            cfg.autodetection,
            identity::Method::parse("first-found").expect("m")
        );
        assert_eq!(cfg.resync_interval, Duration::from_secs(90));
        assert_eq!(cfg.checksum_offload_broken, None);
        assert_eq!(cfg.lease_namespace, lease::DEFAULT_NAMESPACE);
        assert_eq!(cfg.ipam_gc_grace, Duration::from_secs(15 * 60));
        assert_eq!(
            cfg.cni.cni_socket,
            PathBuf::from("/var/run/tortie/cni.sock")
        );
        assert_eq!(cfg.cni.cni_mtu, 0);
    }

    #[test]
    fn unknown_autodetection_method_stops_start_up() {
        let err = NodeConfig::from_args(parse(&[
            "--node-name",
            "n1",
            "--ip-autodetection-method",
            "magic",
        ]))
        .expect_err("unknown method");
        assert!(err.to_string().contains("magic"), "{err}");
    }

    #[test]
    fn port_zero_is_rejected() {
        let err = NodeConfig::from_args(parse(&["--node-name", "n1", "--health-port", "0"]))
            .expect_err("zero");
        assert_eq!(err, ConfigError::ZeroPort { what: "health" });
    }
}
