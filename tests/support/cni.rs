// The node side of the CNI for tests and benches: a real control plane, the CniDaemon with the
// real IPAM serving its socket in this process, its host side in a node namespace, and the
// tortie plugin + conflist installed into a temp dir, driven by the real `cnitool`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};
use serde_json::Value;
use tokio::sync::watch;
use tortie::api::ipamblock::IPAMBlock;
use tortie::api::ipamhandle::IPAMHandle;
use tortie::cni::handlers::{CniDaemon, CniSettings};
use tortie::cni::install::{self, InstallSettings, OtherConfigs};
use tortie::cni::plumbing::Plumber;
use tortie::cni::server;
use tortie::ipam::Ipam;

use super::{ControlPlane, NetNs, binaries};

pub const NODE: &str = "node-1";

/// A node namespace with an uplink holding the "host" address pods ping.
pub fn node_ns() -> anyhow::Result<NetNs> {
    let node = NetNs::new("node")?;
    node.exec_ok(&[
        "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1",
    ])?;
    node.exec_ok(&["ip", "addr", "add", "10.99.0.1/24", "dev", "up0"])?;
    node.exec_ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd99::1/64",
        "dev",
        "up0",
        "nodad",
    ])?;
    node.exec_ok(&["ip", "link", "set", "up0", "up"])?;
    node.exec_ok(&["ip", "link", "set", "up1", "up"])?;
    Ok(node)
}

/// Everything a node runs for CNI, in this process, with the host side in `node`.
pub struct Harness {
    pub daemon: Arc<CniDaemon>,
    pub ipam: Arc<Ipam>,
    pub settings: InstallSettings,
    pub node: NetNs,
    stop: watch::Sender<bool>,
    pub dir: tempfile::TempDir,
    pub cp: ControlPlane,
    /// (network name, netns) of every attachment cnitool made, for the cache cleanup.
    used: std::sync::Mutex<Vec<(String, PathBuf)>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // libcni keeps a result per attachment under /var/lib/cni until DEL; drop the
        // ones of attachments this test left behind.
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        for (net, netns) in used {
            let _ = std::fs::remove_file(cnitool_cache_file(&net, &netns));
        }
    }
}

impl Harness {
    /// Records that cnitool attached `netns` to `net`, so Drop removes libcni's cached result
    /// if the attachment is never deleted.
    pub fn remember(&self, net: &str, netns: &Path) {
        if let Ok(mut used) = self.used.lock() {
            used.push((net.to_string(), netns.to_path_buf()));
        }
    }
}

/// The container ID cnitool sends for `netns`: `cnitool-<first 20 hex of sha512(netns path)>`.
pub fn cnitool_container_id(netns: &Path) -> String {
    use sha2::{Digest, Sha512};
    let digest = hex::encode(Sha512::digest(netns.as_os_str().as_encoded_bytes()));
    format!("cnitool-{}", &digest[..20])
}

/// Where libcni caches cnitool's result for `netns` attached to `net`.
pub fn cnitool_cache_file(net: &str, netns: &Path) -> PathBuf {
    PathBuf::from(format!(
        "/var/lib/cni/results/{net}-{}-eth0",
        cnitool_container_id(netns)
    ))
}

pub use super::pools::create_pool;

/// Node `NODE` with one IP pool `pool` cut into /`block` blocks, its daemon ready and serving,
/// the plugin and conflist installed.
pub async fn harness(pool: &str, block: i32) -> anyhow::Result<Harness> {
    harness_with(pool, block, None).await
}

/// As `harness`; with `live_mtu`, the conflist names no MTU and the daemon gives each new
/// pod the channel's current value (as `tortie node` does with `--cni-mtu 0`).
pub async fn harness_with(
    pool: &str,
    block: i32,
    live_mtu: Option<watch::Receiver<u32>>,
) -> anyhow::Result<Harness> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node(NODE, &[]).await?;
    create_pool(&client, "default-pool", pool, block).await?;
    let ipam = Arc::new(Ipam::start(client.clone(), NODE, Duration::from_secs(30)).await?);
    let node = node_ns()?;
    let plumber = Plumber::open(&node.path()).await?;
    let conflist_mtu = if live_mtu.is_some() { 0 } else { 1400 };
    let settings = match live_mtu {
        Some(rx) => CniSettings {
            node: NODE.into(),
            default_mtu: rx,
        },
        None => CniSettings::fixed_mtu(NODE, 1410),
    };
    let daemon = Arc::new(CniDaemon::new(settings, client, ipam.clone(), plumber));
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("run/tortie/cni.sock");
    let listener = server::bind(&socket)?;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(server::serve(listener, daemon.clone(), stopped));
    daemon.set_ready(true);
    let settings = InstallSettings {
        bin_dir: dir.path().join("bin"),
        conf_dir: dir.path().join("net.d"),
        socket,
        mtu: conflist_mtu,
        other_configs: OtherConfigs::Leave,
    };
    // Cargo sets this for tests and benches only; examples also compile this module.
    let tortie = option_env!("CARGO_BIN_EXE_tortie")
        .context("CARGO_BIN_EXE_tortie is not set: the harness runs from tests and benches")?;
    install::install_binaries(Path::new(tortie), &settings.bin_dir)?;
    install::write_conflist(&settings)?;
    Ok(Harness {
        daemon,
        ipam,
        settings,
        node,
        stop,
        dir,
        cp,
        used: Default::default(),
    })
}

pub async fn create_pod(
    client: &Client,
    name: &str,
    annotations: &[(&str, &str)],
) -> anyhow::Result<Pod> {
    create_pod_in(client, "default", name, annotations).await
}

pub async fn create_pod_in(
    client: &Client,
    namespace: &str,
    name: &str,
    annotations: &[(&str, &str)],
) -> anyhow::Result<Pod> {
    super::pods::create_pod_on(client, namespace, name, NODE, annotations).await
}

pub struct Outcome {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or(Value::Null)
    }
}

/// `cnitool <verb> k8s-pod-network <netns>` with the installed plugin and conflist.
pub async fn cnitool(h: &Harness, verb: &str, pod: &str, netns: &Path) -> anyhow::Result<Outcome> {
    cnitool_in(h, verb, "default", pod, netns).await
}

pub async fn cnitool_in(
    h: &Harness,
    verb: &str,
    namespace: &str,
    pod: &str,
    netns: &Path,
) -> anyhow::Result<Outcome> {
    cnitool_as(h, verb, namespace, pod, None, netns).await
}

/// cnitool with CNI_ARGS as containerd sends them: K8S_POD_UID too when `uid` is given.
pub async fn cnitool_as(
    h: &Harness,
    verb: &str,
    namespace: &str,
    pod: &str,
    uid: Option<&str>,
    netns: &Path,
) -> anyhow::Result<Outcome> {
    h.remember(install::NETWORK_NAME, netns);
    let mut args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}");
    if let Some(uid) = uid {
        args.push_str(&format!(";K8S_POD_UID={uid}"));
    }
    run_cnitool(
        &h.settings.bin_dir,
        &h.settings.conf_dir,
        verb,
        &args,
        netns,
    )
    .await
}

/// `cnitool <verb> k8s-pod-network <netns>` with the plugin in `bin_dir` and the conflist in
/// `conf_dir`, as a runtime would call it with `cni_args`.
pub async fn run_cnitool(
    bin_dir: &Path,
    conf_dir: &Path,
    verb: &str,
    cni_args: &str,
    netns: &Path,
) -> anyhow::Result<Outcome> {
    let out = tokio::process::Command::new(binaries::cnitool()?)
        .args([verb, install::NETWORK_NAME])
        .arg(netns)
        .env("CNI_PATH", bin_dir)
        .env("NETCONFPATH", conf_dir)
        .env("CNI_ARGS", cni_args)
        .output()
        .await?;
    Ok(Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// ADD of `default/<pod>` through the plugin and conflist a `tortie node` installed under
/// `dir` (bin/, net.d/); the pod's IPv4 address.
pub async fn cnitool_add_v4(dir: &Path, pod: &str, netns: &Path) -> anyhow::Result<String> {
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}");
    let out = run_cnitool(&dir.join("bin"), &dir.join("net.d"), "add", &args, netns).await?;
    anyhow::ensure!(out.ok, "cnitool add {pod}: {} {}", out.stdout, out.stderr);
    let result = out.json();
    let addr = result["ips"][0]["address"]
        .as_str()
        .with_context(|| format!("no address in the CNI result for {pod}: {}", out.stdout))?;
    Ok(addr.trim_end_matches("/32").to_string())
}

/// The plugin binary run directly (as a runtime would), for inputs cnitool never sends.
pub async fn plugin(h: &Harness, env: &[(&str, &str)], stdin: &str) -> anyhow::Result<Outcome> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(h.settings.bin_dir.join("tortie"));
    cmd.env_clear().envs(env.iter().copied());
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let mut input = child.stdin.take().context("stdin")?;
    input.write_all(stdin.as_bytes()).await?;
    drop(input);
    let out = child.wait_with_output().await?;
    Ok(Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Addresses held in the API server's blocks, by handle.
pub async fn allocations(client: &Client) -> anyhow::Result<BTreeMap<String, usize>> {
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut out = BTreeMap::new();
    for b in &blocks.items {
        for idx in b.spec.allocations.iter().flatten() {
            if let Some(h) = &b.spec.attributes[*idx as usize].handle_id {
                *out.entry(h.clone()).or_insert(0) += 1;
            }
        }
    }
    Ok(out)
}

pub async fn handles(client: &Client) -> anyhow::Result<Vec<String>> {
    let list = Api::<IPAMHandle>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    Ok(list
        .items
        .iter()
        .map(|h| h.spec.handle_id.clone())
        .collect())
}

/// The plugin config a runtime would pass for the installed conflist's first plugin.
pub fn plugin_config(h: &Harness) -> anyhow::Result<Value> {
    let path: PathBuf = h.settings.conf_dir.join(install::CONFLIST_NAME);
    let list: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    Ok(conf)
}

/// The pod's annotations once `done` holds for them (ADD writes Calico's annotations just
/// after it answers); the last ones seen after 10 s.
pub async fn annotations_when(
    client: &Client,
    pod: &str,
    done: impl Fn(&BTreeMap<String, String>) -> bool,
) -> anyhow::Result<BTreeMap<String, String>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = Api::<Pod>::namespaced(client.clone(), "default")
            .get(pod)
            .await?;
        let ann = p.metadata.annotations.unwrap_or_default();
        if done(&ann) || std::time::Instant::now() > deadline {
            return Ok(ann);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
