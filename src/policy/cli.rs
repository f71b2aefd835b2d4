//! `tortie policy explain`: reads the cluster's pods, namespaces, service accounts, policies
//! and network sets with one LIST each, builds the same model the dataplane compiles, and
//! says whether a flow is allowed and which policy and rule decided it in each direction.
//! With `--counters` it also reads the live counters of the rules on that path from this
//! node's `inet tortie-policy` table (so it runs on the node, in the host network namespace).
//!
//! Exit codes: 0 allowed; 1 denied; 2 cannot answer (kubeconfig, API error, unknown pod).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use kube::api::ListParams;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::cluster::{ClusterObjects, build_model};
use super::eval::{Flow, evaluate};
use super::model::Model;
use super::protocol::Protocol;
use crate::config::KubeSource;

#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    /// Kubeconfig file; without it (and without KUBECONFIG) the in-cluster service account.
    #[arg(long, env = "KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Allow or deny for one flow, and the policy and rule that decided each direction.
    Explain {
        /// Source: `<namespace>/<pod>` or an IP address.
        #[arg(long)]
        from: String,
        /// Destination: `<namespace>/<pod>` or an IP address.
        #[arg(long)]
        to: String,
        /// Destination port, optionally with the protocol (`80`, `53/udp`).
        #[arg(long, default_value = "0")]
        port: String,
        /// Protocol name or number (tcp, udp, sctp, icmp, …) unless given with --port.
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// ICMP type and code (`8` or `8/0`) for ICMP flows.
        #[arg(long)]
        icmp: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Format,
        /// Also show the live nft counters (packets, bytes) of the rules on the flow's path,
        /// read from this node's policy table: run it on the node.
        #[arg(long)]
        counters: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("connecting to the API server: {0}")]
    Connect(#[from] crate::datastore::DatastoreError),
    #[error("listing {kind}: {source}")]
    List { kind: String, source: kube::Error },
    #[error("{0}")]
    Usage(String),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(
        "--counters reads the policy table of the node it runs on: {0} (run it on the node, in the host network namespace, with policy enforcement on)"
    )]
    Counters(crate::dataplane::nft::counters::CounterError),
}

/// Entry point of `tortie policy`.
pub fn run(args: PolicyArgs) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
        .and_then(|rt| rt.block_on(run_async(args)));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tortie policy: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_async(args: PolicyArgs) -> Result<ExitCode, CliError> {
    let source = match args.kubeconfig {
        Some(p) if !p.as_os_str().is_empty() => KubeSource::Kubeconfig(p),
        _ => KubeSource::InCluster,
    };
    let client = crate::datastore::connect(&source).await?.client;
    match args.command {
        PolicyCommand::Explain {
            from,
            to,
            port,
            protocol,
            icmp,
            output,
            counters,
        } => {
            let model = build_model(&load(&client).await?);
            let flow = parse_flow(&model, &from, &to, &port, &protocol, icmp.as_deref())
                .map_err(CliError::Usage)?;
            let v = evaluate(&model, &flow);
            let path = if counters {
                Some(read_path_counters(&model, &v)?)
            } else {
                None
            };
            match output {
                Format::Table => {
                    print!("{}", super::explain::table(&v, &model.diagnostics));
                    if let Some(c) = &path {
                        print!("{}", super::explain::counters_table(c));
                    }
                }
                Format::Json => {
                    let mut doc = super::explain::json(&v, &model.diagnostics);
                    if let Some(c) = &path {
                        doc["counters"] = serde_json::json!(c);
                    }
                    println!("{doc:#}");
                }
            }
            Ok(if v.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// The path's counters with their values from this namespace's policy table.
fn read_path_counters(
    model: &Model,
    v: &super::eval::Verdict,
) -> Result<Vec<super::explain::PathCounter>, CliError> {
    use super::compile::{FAMILY, TABLE};
    use crate::dataplane::nft::counters;
    let mut values = super::explain::CounterValues {
        named: counters::read(FAMILY, TABLE)
            .map_err(CliError::Counters)?
            .into_iter()
            .map(|c| (c.name, (c.packets, c.bytes)))
            .collect(),
        ..Default::default()
    };
    let iface = |endpoint: &str| {
        let (ns, pod) = endpoint.split_once('/').unwrap_or(("", endpoint));
        crate::cni::plumbing::host_veth_name(ns, pod)
    };
    let mut path = super::explain::path_counters(model, v, iface);
    let runner = crate::dataplane::nft::Runner::default();
    for chain in super::explain::chains_to_list(&path) {
        let rules = counters::chain_counters(&runner, FAMILY, TABLE, &chain)
            .map_err(|e| CliError::Usage(format!("reading chain {chain}: {e}")))?;
        if !rules.is_empty() {
            let by_id = rules
                .into_iter()
                .map(|r| (r.id, (r.packets, r.bytes)))
                .collect();
            values.chains.insert(chain, by_id);
        }
    }
    super::explain::fill(&mut path, &values);
    Ok(path)
}

/// Builds the flow from the command line; pods are looked up in the model.
pub fn parse_flow(
    model: &Model,
    from: &str,
    to: &str,
    port: &str,
    protocol: &str,
    icmp: Option<&str>,
) -> Result<Flow, String> {
    let addr = |s: &str| -> Result<IpAddr, String> {
        if let Ok(ip) = s.parse() {
            return Ok(ip);
        }
        let (ns, pod) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is neither <namespace>/<pod> nor an IP address"))?;
        let ep = model
            .endpoint(ns, pod)
            .ok_or_else(|| format!("pod {s} not found (or has no IP, or is host-networked)"))?;
        ep.ips
            .first()
            .copied()
            .ok_or_else(|| format!("pod {s} has no IP"))
    };
    let (port, proto) = match port.split_once('/') {
        Some((p, proto)) => (p, proto),
        None => (port, protocol),
    };
    let proto = Protocol::parse(proto)
        .or_else(|| Protocol::parse(&proto.to_ascii_lowercase()))
        .ok_or_else(|| format!("unknown protocol {proto:?}"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not 0-65535"))?;
    let mut flow = Flow::new(addr(from)?, addr(to)?, proto, port);
    if let Some(icmp) = icmp {
        let (t, c) = match icmp.split_once('/') {
            Some((t, c)) => (t, Some(c)),
            None => (icmp, None),
        };
        flow.icmp_type = Some(t.parse().map_err(|_| format!("ICMP type {t:?}"))?);
        flow.icmp_code = c
            .map(|c| c.parse().map_err(|_| format!("ICMP code {c:?}")))
            .transpose()?;
    }
    Ok(flow)
}

async fn list<K>(client: &Client, optional: bool) -> Result<Vec<K>, CliError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    match Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(l) => Ok(l.items),
        // A kind whose CRD is not installed (e.g. the staged kinds on an older cluster).
        Err(kube::Error::Api(s)) if optional && s.code == 404 => Ok(Vec::new()),
        Err(source) => Err(CliError::List {
            kind: K::kind(&()).to_string(),
            source,
        }),
    }
}

async fn load(client: &Client) -> Result<ClusterObjects, CliError> {
    let mut c = ClusterObjects {
        namespaces: list(client, false).await?,
        pods: list(client, false).await?,
        service_accounts: list(client, false).await?,
        k8s_policies: list(client, false).await?,
        network_policies: list(client, true).await?,
        global_network_policies: list(client, true).await?,
        staged_network_policies: list(client, true).await?,
        staged_global_network_policies: list(client, true).await?,
        staged_k8s_policies: list(client, true).await?,
        network_sets: list(client, true).await?,
        global_network_sets: list(client, true).await?,
    };
    c.pods.retain(|p| p.name_any() != "");
    Ok(c)
}
