// Pods in the sandbox and probes between namespaces: create a Pod bound to a node, wait for
// the agent to write its IP, ping from inside its namespace, and a TCP exchange whose server
// reports the source address it saw (to tell masqueraded from direct traffic).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::layout::Layout;

pub async fn create_pod(client: &Client, ns: &str, name: &str, node: &str) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "sandbox"}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
        },
    }))
    .context("Pod object")?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {ns}/{name} on {node}"))?;
    Ok(())
}

/// Waits until the agent has written `status.podIP`.
pub async fn wait_pod_ip(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<Ipv4Addr> {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        let pod = api
            .get(name)
            .await
            .with_context(|| format!("get pod {ns}/{name}"))?;
        if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
            return ip
                .parse()
                .with_context(|| format!("pod {ns}/{name} has podIP {ip:?}"));
        }
        if Instant::now() > deadline {
            bail!("pod {ns}/{name} has no podIP after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes the pod and waits until the agent confirmed it (the object is gone).
pub async fn delete_pod(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    api.delete(name, &DeleteParams::default())
        .await
        .with_context(|| format!("delete pod {ns}/{name}"))?;
    let deadline = Instant::now() + timeout;
    while api.get_opt(name).await?.is_some() {
        if Instant::now() > deadline {
            bail!("pod {ns}/{name} still exists {timeout:?} after delete (agent did not confirm)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The namespace the agent made for a pod.
pub fn pod_netns(layout: &Layout, ns: &str, name: &str) -> String {
    format!("{}-{ns}-{name}", layout.pod_netns_prefix())
}

/// One ping from inside `netns`; `extra` e.g. `["-M", "do", "-s", "1422"]`.
pub fn ping(netns: &str, dst: IpAddr, extra: &[&str]) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", netns, "ping", "-n", "-q", "-c", "1", "-W", "1",
        ])
        .args(extra)
        .arg(dst.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pings until one answer or `timeout` (routes converge asynchronously).
pub async fn ping_until(netns: &str, dst: IpAddr, extra: &[&str], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ping(netns, dst, extra) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Runs `f` on a thread joined to the named network namespace (sockets it creates stay there).
pub fn in_netns<R: Send>(netns: &str, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
    let path = std::path::Path::new("/run/netns").join(netns);
    let file = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || -> anyhow::Result<R> {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {netns}"))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A TCP exchange from `client_ns` to `server_ip` (a listener in `server_ns`): returns the
/// source address the server saw.
pub fn tcp_exchange(server_ns: &str, server_ip: IpAddr, client_ns: &str) -> anyhow::Result<IpAddr> {
    let listener = in_netns(server_ns, || TcpListener::bind("0.0.0.0:0"))?
        .with_context(|| format!("listen in {server_ns}"))?;
    let port = listener.local_addr().context("listener address")?.port();
    listener
        .set_nonblocking(true)
        .context("nonblocking listener")?;
    let server = std::thread::spawn(move || -> anyhow::Result<IpAddr> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut conn, peer) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!("no connection within 5 s");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("accept"),
            }
        };
        conn.set_nonblocking(false).context("blocking conn")?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .context("timeout")?;
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).context("read hello")?;
        conn.write_all(b"olleh").context("write reply")?;
        Ok(peer.ip())
    });
    let dst = SocketAddr::new(server_ip, port);
    let client = in_netns(client_ns, || -> anyhow::Result<()> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .with_context(|| format!("connect to {dst}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .context("timeout")?;
        s.write_all(b"hello").context("write hello")?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).context("read reply")?;
        if &buf != b"olleh" {
            bail!("unexpected reply {buf:?}");
        }
        Ok(())
    })?;
    let seen = server
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    client.with_context(|| format!("TCP from {client_ns} to {dst}"))?;
    seen.with_context(|| format!("TCP server in {server_ns} on {dst}"))
}

/// The MTU of `ifname` inside `netns`.
pub fn mtu(netns: &str, ifname: &str) -> anyhow::Result<u32> {
    let path = format!("/sys/class/net/{ifname}/mtu");
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "cat", &path])
        .stdin(Stdio::null())
        .output()
        .context("read mtu")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("mtu of {ifname} in {netns}"))
}
