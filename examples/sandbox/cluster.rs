// `up`: the control plane (loopback) with a forwarder on the root end of the VNet link so the
// node namespaces reach it, Node objects, the default IPPool, a `tortie node` and an agent per
// node namespace. Dropping `Sandbox` stops it all and removes what the state file records.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Node;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::agent::{Agent, AgentConfig};
use super::layout::{Layout, NodeSpec, POOL_CIDR, POOL_NAME};
use super::net;
use super::state::{self, Recorder};
use crate::support::ControlPlane;
use crate::support::process::Guarded;

/// How the per-node agents run.
#[derive(Clone, Debug)]
pub enum AgentMode {
    /// `nsenter --net=<node> <exe> agent ...`: the example binary's `agent` subcommand.
    Process { exe: PathBuf },
    /// A thread joined to the node namespace in this process (tests: no second binary).
    Thread,
}

pub struct Sandbox {
    pub layout: Layout,
    pub cp: Option<ControlPlane>,
    pub nodes: Vec<Guarded>,
    pub agents: Vec<Guarded>,
    agent_threads: Vec<(
        tokio::sync::watch::Sender<bool>,
        std::thread::JoinHandle<()>,
    )>,
    proxy: Option<tokio::task::JoinHandle<()>>,
    rec: Recorder,
    /// The `tortie` binary, to restart a node daemon that exited.
    tortie: PathBuf,
    /// Node daemons restarted so far (kubelet's restart count).
    pub restarts: usize,
}

impl Sandbox {
    /// Builds everything; on error, what was made so far is removed before returning.
    pub async fn up(
        mut layout: Layout,
        tortie: &Path,
        agents: AgentMode,
    ) -> anyhow::Result<Sandbox> {
        let _ = std::fs::create_dir_all(&layout.base_dir);
        let mut rec = Recorder::new(&layout.state_file(), &layout)?;
        let cp = match ControlPlane::start().await {
            Ok(cp) => cp,
            Err(e) => {
                state::teardown(&rec.state, &layout.state_file());
                return Err(e);
            }
        };
        rec.dir(cp.dir())?;
        rec.pid(cp.pids()[0])?;
        rec.pid(cp.pids()[1])?;
        let mut sb = Sandbox {
            layout: layout.clone(),
            cp: Some(cp),
            nodes: Vec::new(),
            agents: Vec::new(),
            agent_threads: Vec::new(),
            proxy: None,
            rec,
            tortie: tortie.to_path_buf(),
            restarts: 0,
        };
        // From here on Drop tears down whatever exists.
        net::build(&layout, &mut sb.rec)?;
        let port = sb.start_proxy().await?;
        layout.api_port = port;
        sb.layout.api_port = port;
        sb.rec.state.layout = Some(layout.clone());
        sb.write_kubeconfig()?;
        let client = sb.client().await?;
        wait_reachable_from(&layout.nodes[0].netns, &layout.root_ip.to_string(), port).await?;
        create_pool(&client).await?;
        for node in &layout.nodes {
            create_node(&client, node).await?;
            std::fs::create_dir_all(&node.dir)
                .with_context(|| format!("create {}", node.dir.display()))?;
            let daemon = sb.spawn_tortie(tortie, node)?;
            sb.rec.pid(daemon.pid())?;
            sb.nodes.push(daemon);
            match &agents {
                AgentMode::Process { exe } => {
                    let a = sb.spawn_agent_process(exe, node)?;
                    sb.rec.pid(a.pid())?;
                    sb.agents.push(a);
                }
                AgentMode::Thread => sb.spawn_agent_thread(node)?,
            }
        }
        Ok(sb)
    }

    /// Admin client through the VNet address (the same path the nodes use).
    pub async fn client(&self) -> anyhow::Result<Client> {
        client_from(&self.layout.kubeconfig()).await
    }

    /// Fails with the process's log tail when a `tortie node` or agent has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for (g, node) in self.nodes.iter_mut().zip(&self.layout.nodes) {
            g.check_running().with_context(|| {
                format!(
                    "tortie node on {}; log tail:\n{}",
                    node.name,
                    tail(&node.dir.join("tortie.log"))
                )
            })?;
        }
        for (g, node) in self.agents.iter_mut().zip(&self.layout.nodes) {
            g.check_running()
                .with_context(|| format!("agent on {}", node.name))?;
        }
        Ok(())
    }

    /// What kubelet does for a DaemonSet pod: a `tortie node` that exited (crashed, killed)
    /// is started again with the same settings; names the nodes restarted. Agents that exited
    /// are still an error (they stand in for kubelet itself).
    pub fn supervise(&mut self) -> anyhow::Result<Vec<String>> {
        let mut restarted = Vec::new();
        for i in 0..self.nodes.len() {
            let Err(e) = self.nodes[i].check_running() else {
                continue;
            };
            let node = self.layout.nodes[i].clone();
            eprintln!(
                "{e:#}; restarting it as kubelet restarts a DaemonSet pod; log tail:\n{}",
                tail(&node.dir.join("tortie.log"))
            );
            let daemon = self.spawn_tortie(&self.tortie, &node)?;
            self.rec.pid(daemon.pid())?;
            self.nodes[i] = daemon;
            self.restarts += 1;
            restarted.push(node.name.clone());
        }
        for (g, node) in self.agents.iter_mut().zip(&self.layout.nodes) {
            g.check_running()
                .with_context(|| format!("agent on {}", node.name))?;
        }
        Ok(restarted)
    }

    async fn start_proxy(&mut self) -> anyhow::Result<u16> {
        let cp = self.cp.as_ref().context("control plane")?;
        let target: SocketAddr = cp
            .url()
            .trim_start_matches("https://")
            .parse()
            .with_context(|| format!("API server url {}", cp.url()))?;
        let listen = SocketAddr::new(IpAddr::V4(self.layout.root_ip), self.layout.api_port);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen on {listen} for the API server"))?;
        let port = listener.local_addr().context("proxy address")?.port();
        // A byte forwarder: TLS ends at kube-apiserver, whose certificate names `localhost`
        // (the kubeconfig says so with tls-server-name).
        self.proxy = Some(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        }));
        Ok(port)
    }

    fn write_kubeconfig(&self) -> anyhow::Result<()> {
        let cp = self.cp.as_ref().context("control plane")?;
        let src = cp.kubeconfig_path();
        let text =
            std::fs::read_to_string(src).with_context(|| format!("read {}", src.display()))?;
        let mut kc: serde_yaml::Value =
            serde_yaml::from_str(&text).with_context(|| format!("parse {}", src.display()))?;
        let clusters = kc
            .get_mut("clusters")
            .and_then(|c| c.as_sequence_mut())
            .context("admin kubeconfig has no clusters")?;
        for c in clusters {
            if let Some(cluster) = c.get_mut("cluster").and_then(|c| c.as_mapping_mut()) {
                cluster.insert("server".into(), self.layout.api_url().into());
                cluster.insert("tls-server-name".into(), "localhost".into());
            }
        }
        let path = self.layout.kubeconfig();
        std::fs::write(
            &path,
            serde_yaml::to_string(&kc).context("encode kubeconfig")?,
        )
        .with_context(|| format!("write {}", path.display()))
    }

    fn spawn_tortie(&self, tortie: &Path, node: &NodeSpec) -> anyhow::Result<Guarded> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.netns])
            .arg(tortie)
            .arg("node")
            .env("NODENAME", &node.name)
            .env("KUBECONFIG", self.layout.kubeconfig())
            .env("TORTIE_HEALTH_ADDR", "0.0.0.0")
            .env("TORTIE_METRICS_ADDR", "0.0.0.0")
            .env("TORTIE_CNI_BIN_DIR", node.cni_bin_dir())
            .env("TORTIE_CNI_CONF_DIR", node.cni_conf_dir())
            .env("TORTIE_CNI_SOCKET", node.cni_socket())
            .env("IP_AUTODETECTION_METHOD", "interface=eth0");
        logged(&mut cmd, &node.dir.join("tortie.log"))?;
        Ok(
            Guarded::spawn(&format!("tortie node ({})", node.name), cmd)?
                .with_grace(Duration::from_secs(3)),
        )
    }

    fn spawn_agent_process(&self, exe: &Path, node: &NodeSpec) -> anyhow::Result<Guarded> {
        // nsenter joins the network namespace only: `ip netns exec` would also give the agent
        // a private mount namespace, and the pod namespaces it mounts under /run/netns would
        // then be invisible to everyone else.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", node.netns))
            .arg("--")
            .arg(exe)
            .arg("agent")
            .arg("--node")
            .arg(&node.name)
            .arg("--node-ip")
            .arg(node.ip.to_string())
            .arg("--kubeconfig")
            .arg(self.layout.kubeconfig())
            .arg("--cni-bin-dir")
            .arg(node.cni_bin_dir())
            .arg("--cni-conf-dir")
            .arg(node.cni_conf_dir())
            .arg("--netns-prefix")
            .arg(self.layout.pod_netns_prefix());
        logged(&mut cmd, &node.dir.join("agent.log"))?;
        Guarded::spawn(&format!("agent ({})", node.name), cmd)
    }

    fn spawn_agent_thread(&mut self, node: &NodeSpec) -> anyhow::Result<()> {
        let cfg = agent_config(&self.layout, node);
        let kubeconfig = self.layout.kubeconfig();
        let netns = PathBuf::from("/run/netns").join(&node.netns);
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let name = node.name.clone();
        let handle = std::thread::Builder::new()
            .name(format!("agent-{name}"))
            .spawn(move || {
                let run = || -> anyhow::Result<()> {
                    let file = std::fs::File::open(&netns)
                        .with_context(|| format!("open {}", netns.display()))?;
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("setns {}", netns.display()))?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("agent runtime")?;
                    rt.block_on(async move {
                        let client = client_from(&kubeconfig).await?;
                        Agent::new(cfg, client)
                            .run(async move {
                                let _ = stop_rx.wait_for(|s| *s).await;
                            })
                            .await
                    })
                };
                if let Err(e) = run() {
                    eprintln!("agent {name}: {e:#}");
                }
            })
            .context("spawn agent thread")?;
        self.agent_threads.push((stop_tx, handle));
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for (stop, _) in &self.agent_threads {
            let _ = stop.send(true);
        }
        for (_, h) in self.agent_threads.drain(..) {
            let _ = h.join();
        }
        for g in self.agents.iter_mut().chain(self.nodes.iter_mut()) {
            g.stop();
        }
        if let Some(p) = self.proxy.take() {
            p.abort();
        }
        drop(self.cp.take());
        state::teardown(&self.rec.state, &self.layout.state_file());
    }
}

pub fn agent_config(layout: &Layout, node: &NodeSpec) -> AgentConfig {
    AgentConfig {
        node: node.name.clone(),
        node_ip: IpAddr::V4(node.ip),
        bin_dir: node.cni_bin_dir(),
        conf_dir: node.cni_conf_dir(),
        netns_prefix: layout.pod_netns_prefix(),
    }
}

pub async fn client_from(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("read {}", kubeconfig.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .with_context(|| format!("load {}", kubeconfig.display()))?;
    Client::try_from(cfg).context("build a client")
}

/// The default pool: VXLAN Always, natOutgoing (what the demo and the tests start from).
async fn create_pool(client: &Client) -> anyhow::Result<()> {
    let api = ippools(client);
    let pool: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1",
        "kind": "IPPool",
        "metadata": {"name": POOL_NAME},
        "spec": {
            "cidr": POOL_CIDR,
            "blockSize": 26,
            "vxlanMode": "Always",
            "ipipMode": "Never",
            "natOutgoing": true,
            "nodeSelector": "all()",
        },
    }))
    .context("IPPool object")?;
    api.create(&PostParams::default(), &pool)
        .await
        .with_context(|| format!("create IPPool {POOL_NAME}"))?;
    Ok(())
}

pub fn ippools(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("crd.projectcalico.org", "v1", "IPPool");
    Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk))
}

/// Sets the default pool's `vxlanMode` (`Always`, `CrossSubnet`, `Never`).
pub async fn set_vxlan_mode(client: &Client, mode: &str) -> anyhow::Result<()> {
    ippools(client)
        .patch(
            POOL_NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"vxlanMode": mode}})),
        )
        .await
        .with_context(|| format!("set vxlanMode {mode} on IPPool {POOL_NAME}"))?;
    Ok(())
}

async fn create_node(client: &Client, node: &NodeSpec) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let obj: Node = serde_json::from_value(json!({
        "metadata": {"name": node.name, "labels": {
            "kubernetes.io/os": "linux",
            "kubernetes.io/hostname": node.name,
        }},
    }))
    .context("Node object")?;
    api.create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("create node {}", node.name))?;
    let status = json!({"status": {"addresses": [
        {"type": "InternalIP", "address": node.ip.to_string()},
        {"type": "Hostname", "address": node.name},
    ]}});
    api.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("set addresses of node {}", node.name))?;
    Ok(())
}

/// The API server must be reachable from inside a node namespace before daemons start.
async fn wait_reachable_from(netns: &str, ip: &str, port: u16) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let probe = format!("exec 3<>/dev/tcp/{ip}/{port}");
    loop {
        let ok = Command::new("ip")
            .args(["netns", "exec", netns, "bash", "-c", &probe])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{ip}:{port} not reachable from netns {netns} after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn logged(cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = file.try_clone().context("dup log fd")?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(err);
    Ok(())
}

pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
