//! The local multi-node sandbox behind the README's run command (`scripts/run.sh`):
//! `up` starts a real control plane, N node namespaces on a VNet bridge with `tortie node` and
//! a kubelet-like agent in each, and an "internet" namespace; `demo` networks pods across the
//! nodes and shows them talking; `down` removes what a crashed `up` left behind.

#[path = "../tests/support/mod.rs"]
mod support;

// Shared with tests/sandbox.rs, which uses the parts `up`, `demo` and `agent` do not.
#[allow(dead_code)]
#[path = "sandbox/mod.rs"]
mod sandbox;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use sandbox::cluster::{AgentMode, Sandbox, client_from};
use sandbox::layout::{INET_IP, Layout};
use sandbox::{agent, pods, state};

const DEFAULT_DIR: &str = "/run/tortie-sandbox";

#[derive(Parser)]
#[command(about = "A multi-node tortie sandbox in network namespaces")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start everything and stay in the foreground until Ctrl-C (then remove it all).
    Up {
        /// The tortie binary to run (scripts/run.sh passes the one it just built).
        #[arg(long)]
        tortie: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Port of the API server on the VNet side of the root namespace.
        #[arg(long, default_value_t = 6443)]
        api_port: u16,
    },
    /// Remove every namespace, process and file a previous `up` recorded.
    Down {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Pods on every node reaching each other and the internet namespace, as a short report.
    Demo {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Leave the demo pods in place afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// The per-node agent (started by `up` inside a node namespace).
    Agent {
        #[arg(long)]
        node: String,
        #[arg(long)]
        node_ip: IpAddr,
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long)]
        cni_bin_dir: PathBuf,
        #[arg(long)]
        cni_conf_dir: PathBuf,
        #[arg(long)]
        netns_prefix: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The harness polls /readyz while the API server starts; kube logs each 500.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Up {
            tortie,
            nodes,
            dir,
            api_port,
        } => up(tortie, nodes, dir, api_port).await,
        Cmd::Down { dir } => {
            down(&dir)?;
            Ok(())
        }
        Cmd::Demo { dir, keep } => demo(&dir, keep).await,
        Cmd::Agent {
            node,
            node_ip,
            kubeconfig,
            cni_bin_dir,
            cni_conf_dir,
            netns_prefix,
        } => {
            let client = client_from(&kubeconfig).await?;
            let cfg = agent::AgentConfig {
                node,
                node_ip,
                bin_dir: cni_bin_dir,
                conf_dir: cni_conf_dir,
                netns_prefix,
            };
            agent::Agent::new(cfg, client).run(stop_signal()).await
        }
    }
}

async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Removes a previous sandbox's leftovers; refuses while its `up` still runs.
fn down(dir: &std::path::Path) -> anyhow::Result<bool> {
    let file = dir.join("state.json");
    let Some(st) = state::load(&file)? else {
        println!("no sandbox state in {}: nothing to remove", file.display());
        return Ok(false);
    };
    if st.owner != std::process::id()
        && std::path::Path::new(&format!("/proc/{}", st.owner)).exists()
    {
        bail!(
            "the sandbox's `up` (pid {}) is still running: stop it with Ctrl-C (or kill {})",
            st.owner,
            st.owner
        );
    }
    for what in state::teardown(&st, &file) {
        println!("removed {what}");
    }
    Ok(true)
}

async fn up(tortie: PathBuf, nodes: u8, dir: PathBuf, api_port: u16) -> anyhow::Result<()> {
    if !(1..=200).contains(&nodes) {
        bail!("--nodes {nodes}: give 1 to 200 (node IPs are 198.18.x.11 and up)");
    }
    if down(&dir)? {
        println!("(removed the leftovers of an earlier sandbox above)");
    }
    let layout = Layout::new("tsb", dir.clone(), 0, api_port, "sandbox-node", nodes);
    let exe = std::env::current_exe().context("path of this binary")?;
    let mut sb = Sandbox::up(layout, &tortie, AgentMode::Process { exe }).await?;
    let l = &sb.layout;
    println!("\ntortie sandbox is up");
    println!(
        "  API server:  {} (etcd + kube-apiserver on loopback, forwarded from the VNet link {})",
        l.api_url(),
        l.root_if
    );
    println!(
        "  kubectl:     KUBECONFIG={} kubectl get pods -A -o wide",
        l.kubeconfig().display()
    );
    for (i, n) in l.nodes.iter().enumerate() {
        let pid = |g: Option<&support::process::Guarded>| g.map_or(0, |g| g.pid());
        println!(
            "  node {:<15} netns {:<11} ip {:<12} tortie node pid {:<7} agent pid {:<7} logs {}/{{tortie,agent}}.log",
            n.name,
            n.netns,
            n.ip,
            pid(sb.nodes.get(i)),
            pid(sb.agents.get(i)),
            n.dir.display()
        );
    }
    println!(
        "  VNet:        bridge in netns {} (198.18.0.0/24, 198.18.1.0/24); internet netns {} ({INET_IP})",
        l.vnet_ns, l.inet_ns
    );
    println!("  demo:        scripts/run.sh demo   (pods across nodes, ping/TCP, egress)");
    println!("  stop:        Ctrl-C here; leftovers after a crash: scripts/run.sh down\n");

    let mut poll = tokio::time::interval(Duration::from_secs(1));
    let stop = stop_signal();
    tokio::pin!(stop);
    let outcome = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = poll.tick() => if let Err(e) = sb.supervise() { break Err(e) },
        }
    };
    println!("stopping: agents, tortie nodes, kube-apiserver, etcd; removing namespaces and files");
    drop(sb);
    outcome
}

/// The demo's tools, each with its Debian package: a missing one is named up front instead of
/// showing up as a FAIL of every ping.
const DEMO_TOOLS: [(&str, &str); 3] = [
    ("ping", "iputils-ping"),
    ("ip", "iproute2"),
    ("nft", "nftables"),
];

fn missing_tools() -> Vec<(&'static str, &'static str)> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    DEMO_TOOLS
        .into_iter()
        .filter(|(tool, _)| !std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
        .collect()
}

async fn demo(dir: &std::path::Path, keep: bool) -> anyhow::Result<()> {
    let missing = missing_tools();
    if !missing.is_empty() {
        let tools: Vec<&str> = missing.iter().map(|(t, _)| *t).collect();
        let packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        anyhow::bail!(
            "the demo needs {} (not on PATH); install with: apt-get install -y {}",
            tools.join(", "),
            packages.join(" ")
        );
    }
    let st = state::load(&dir.join("state.json"))?.with_context(|| {
        format!(
            "no sandbox in {}: run `scripts/run.sh` first",
            dir.display()
        )
    })?;
    let layout = st.layout.context("the state file has no layout")?;
    let client = client_from(&layout.kubeconfig()).await?;
    let ns = "default";
    let mut pods_up = Vec::new();
    for (i, node) in layout.nodes.iter().enumerate() {
        let name = format!("demo-{}", i + 1);
        pods::create_pod(&client, ns, &name, &node.name).await?;
        pods_up.push((name, node.clone()));
    }
    let mut ips = Vec::new();
    for (name, node) in &pods_up {
        let ip = pods::wait_pod_ip(&client, ns, name, Duration::from_secs(60)).await?;
        println!("pod {name:<8} on {:<15} ip {ip}", node.name);
        ips.push(IpAddr::V4(ip));
    }
    println!(
        "\n{:<8} {:<8} {:>5} {:>12}",
        "from", "to", "ping", "tcp (src)"
    );
    for (i, (from, _)) in pods_up.iter().enumerate() {
        let from_ns = pods::pod_netns(&layout, ns, from);
        for (j, (to, _)) in pods_up.iter().enumerate() {
            if i == j {
                continue;
            }
            let to_ns = pods::pod_netns(&layout, ns, to);
            let ping = pods::ping_until(&from_ns, ips[j], &[], Duration::from_secs(20)).await;
            let tcp = pods::tcp_exchange(&to_ns, ips[j], &from_ns)
                .map_or_else(|e| format!("fail: {e:#}"), |src| src.to_string());
            println!(
                "{from:<8} {to:<8} {:>5} {tcp:>12}",
                if ping { "ok" } else { "FAIL" }
            );
        }
        let ping =
            pods::ping_until(&from_ns, IpAddr::V4(INET_IP), &[], Duration::from_secs(10)).await;
        let tcp = pods::tcp_exchange(&layout.inet_ns, IpAddr::V4(INET_IP), &from_ns)
            .map_or_else(|e| format!("fail: {e:#}"), |src| src.to_string());
        println!(
            "{from:<8} {:<8} {:>5} {tcp:>12}  (internet; expect the node IP as source)",
            "internet",
            if ping { "ok" } else { "FAIL" }
        );
    }
    if !keep {
        for (name, _) in &pods_up {
            pods::delete_pod(&client, ns, name, Duration::from_secs(30)).await?;
        }
        println!("\ndemo pods deleted (use --keep to leave them)");
    }
    Ok(())
}
