//! The local sandbox behind the README's run command: a real control plane (etcd +
//! kube-apiserver built from upstream), the Node object and one `tortie node` against it,
//! in the foreground until Ctrl-C, then everything it started is stopped and removed.
//! The multi-node overlay sandbox grows from here (network namespaces per node).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use support::ControlPlane;
use support::process::Guarded;

#[derive(Parser)]
#[command(about = "Run a local control plane and a tortie node against it")]
struct Args {
    /// The tortie binary to run (scripts/run.sh passes the one it just built).
    #[arg(long)]
    tortie: PathBuf,
    /// Node name (also the Node object created in the API).
    #[arg(long, default_value = "sandbox-node-1")]
    node: String,
    /// Health port of the daemon (loopback).
    #[arg(long, default_value_t = 9099)]
    health_port: u16,
    /// Metrics port of the daemon (loopback).
    #[arg(long, default_value_t = 9091)]
    metrics_port: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cp = ControlPlane::start().await?;
    cp.create_node(&args.node, &[("kubernetes.io/os", "linux")])
        .await?;

    let mut cmd = Command::new(&args.tortie);
    cmd.arg("node")
        .env("NODENAME", &args.node)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("TORTIE_HEALTH_ADDR", "127.0.0.1")
        .env("TORTIE_HEALTH_PORT", args.health_port.to_string())
        .env("TORTIE_METRICS_ADDR", "127.0.0.1")
        .env("TORTIE_METRICS_PORT", args.metrics_port.to_string());
    let mut node = Guarded::spawn("tortie node", cmd)?.with_grace(Duration::from_secs(5));

    println!(
        "\ntortie sandbox is up\n  \
         API server:  {url}\n  \
         kubectl:     KUBECONFIG={kc} kubectl get nodes,ippools\n  \
         tortie node: pid {pid} (node {name}), logs on this terminal\n  \
         health:      curl -s http://127.0.0.1:{hp}/readiness\n  \
         metrics:     curl -s http://127.0.0.1:{mp}/metrics\n  \
         stop:        Ctrl-C (stops every process and removes {dir})\n",
        url = cp.url(),
        kc = cp.kubeconfig_path().display(),
        pid = node.pid(),
        name = args.node,
        hp = args.health_port,
        mp = args.metrics_port,
        dir = cp.dir().display(),
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = poll.tick() => node.check_running()?,
        }
    }
    println!("stopping: tortie node, kube-apiserver, etcd");
    node.stop();
    drop(cp);
    Ok(())
}
