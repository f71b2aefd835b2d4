// The daemon side of the CNI against real namespaces: pod plumbing (veth, addresses, routes,
// host route) into a node namespace the test creates, and the socket server with the real
// IPAM and control plane driven by the real `cnitool` through the installed plugin.

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use ipnet::IpNet;
use support::NetNs;
use tortie::cni::install;
use tortie::cni::plumbing::{Plumber, PlumbingError, PodNetwork, host_veth_name};

/// A node namespace with an uplink holding the "host" address pods ping.
fn node_ns() -> anyhow::Result<NetNs> {
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

fn net(pod: &str, addrs: &[&str], mtu: u32) -> PodNetwork {
    PodNetwork {
        host_ifname: host_veth_name("default", pod),
        pod_ifname: "eth0".into(),
        addrs: addrs.iter().map(|a| a.parse::<IpNet>().unwrap()).collect(),
        mtu,
    }
}

fn ping(from: &NetNs, to: &str) -> bool {
    from.exec(&["ping", "-c", "1", "-W", "2", to])
        .status
        .success()
}

/// One TCP connection from `client` to `server_addr` in `server`, data checked both ways.
fn tcp_both_ways(client: &NetNs, server: &NetNs, server_addr: &str) -> anyhow::Result<()> {
    let addr = server_addr.to_string();
    let listener = server.run(move || TcpListener::bind((addr.as_str(), 0)))??;
    let port = listener.local_addr()?.port();
    let accept = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut s, _) = listener.accept()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(b"pong!")?;
        Ok(buf.to_vec())
    });
    let target = format!("{server_addr}:{port}");
    let mut stream = client.run(move || TcpStream::connect(target))??;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    stream.write_all(b"ping!")?;
    let mut back = [0u8; 5];
    stream.read_exact(&mut back)?;
    assert_eq!(&back, b"pong!");
    let got = accept.join().expect("server thread")?;
    assert_eq!(got, b"ping!");
    Ok(())
}

fn ns_file(ns: &NetNs) -> File {
    File::open(ns.path()).unwrap()
}

#[tokio::test]
async fn attach_plumbs_a_pod_that_reaches_the_host_and_its_neighbour() -> anyhow::Result<()> {
    let node = node_ns()?;
    let (pod1, pod2) = (NetNs::new("pod")?, NetNs::new("pod")?);
    let plumber = Plumber::open(&node.path()).await?;
    assert!(plumber.is_host_namespace(&ns_file(&node))?);
    assert!(!plumber.is_host_namespace(&ns_file(&pod1))?);

    let n1 = net("web-0", &["10.244.0.5/32"], 1410);
    let n2 = net("web-1", &["10.244.0.6/32"], 1410);
    let a1 = plumber.attach(&ns_file(&pod1), &n1).await?;
    plumber.attach(&ns_file(&pod2), &n2).await?;
    assert_eq!(a1.host_mac, "ee:ee:ee:ee:ee:ee");

    let link = pod1.exec_ok(&["ip", "-o", "link", "show", "eth0"])?;
    assert!(link.contains("mtu 1410"), "{link}");
    assert!(link.contains(&a1.pod_mac), "{link}");
    let addrs = pod1.exec_ok(&["ip", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(addrs.contains("inet 10.244.0.5/32"), "{addrs}");
    let routes = pod1.exec_ok(&["ip", "route"])?;
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0 onlink"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.1.1 dev eth0 scope link"),
        "{routes}"
    );
    let host = node.exec_ok(&["ip", "-o", "link", "show", &n1.host_ifname])?;
    assert!(
        host.contains("ee:ee:ee:ee:ee:ee") && host.contains("mtu 1410"),
        "{host}"
    );
    let host_routes = node.exec_ok(&["ip", "route", "show", "proto", "80"])?;
    assert!(
        host_routes.contains(&format!("10.244.0.5 dev {} scope link", n1.host_ifname)),
        "{host_routes}"
    );
    let proxy_arp = node.exec_ok(&[
        "cat",
        &format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", n1.host_ifname),
    ])?;
    assert_eq!(proxy_arp.trim(), "1");

    assert!(ping(&pod1, "10.99.0.1"), "pod -> host");
    assert!(ping(&pod1, "10.244.0.6"), "pod -> pod on the same node");
    assert!(ping(&pod2, "10.244.0.5"), "pod -> pod, other direction");
    tcp_both_ways(&pod1, &pod2, "10.244.0.6")?;

    plumber.check(&ns_file(&pod1), &n1).await?;
    Ok(())
}

#[tokio::test]
async fn check_names_what_is_missing() -> anyhow::Result<()> {
    let node = node_ns()?;
    let pod = NetNs::new("pod")?;
    let plumber = Plumber::open(&node.path()).await?;
    let n = net("check-0", &["10.244.1.5/32"], 1500);
    plumber.attach(&ns_file(&pod), &n).await?;
    plumber.check(&ns_file(&pod), &n).await?;

    let mut wrong_mtu = n.clone();
    wrong_mtu.mtu = 1400;
    let err = plumber.check(&ns_file(&pod), &wrong_mtu).await.unwrap_err();
    assert!(
        err.to_string().contains("has MTU 1500, expected 1400"),
        "{err}"
    );

    pod.exec_ok(&["ip", "route", "del", "default"])?;
    let err = plumber.check(&ns_file(&pod), &n).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("default route via 169.254.1.1 dev eth0 is missing"),
        "{err}"
    );

    pod.exec_ok(&["ip", "addr", "del", "10.244.1.5/32", "dev", "eth0"])?;
    let err = plumber.check(&ns_file(&pod), &n).await.unwrap_err();
    assert!(
        err.to_string().contains("address 10.244.1.5/32 is missing"),
        "{err}"
    );

    node.exec_ok(&["ip", "link", "del", &n.host_ifname])?;
    let err = plumber.check(&ns_file(&pod), &n).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("host veth {} does not exist", n.host_ifname)),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn detach_is_idempotent_and_leaves_nothing() -> anyhow::Result<()> {
    let node = node_ns()?;
    let (pod1, pod2) = (NetNs::new("pod")?, NetNs::new("pod")?);
    let plumber = Plumber::open(&node.path()).await?;
    let n1 = net("del-0", &["10.244.2.5/32"], 1500);
    let n2 = net("del-1", &["10.244.2.6/32"], 1500);
    plumber.attach(&ns_file(&pod1), &n1).await?;
    plumber.attach(&ns_file(&pod2), &n2).await?;

    // With the pod namespace: the pod side goes, and the pair with it.
    let d = plumber
        .detach(Some(&ns_file(&pod1)), "eth0", &n1.host_ifname, &n1.addrs)
        .await?;
    assert!(
        d.pod_interface && d.host_interface && d.host_routes == 1,
        "{d:?}"
    );
    let again = plumber
        .detach(Some(&ns_file(&pod1)), "eth0", &n1.host_ifname, &n1.addrs)
        .await?;
    assert_eq!(again, Default::default());

    // Without it (namespace gone): the host veth goes because its route proves ownership.
    let d = plumber
        .detach(None, "eth0", &n2.host_ifname, &n2.addrs)
        .await?;
    assert!(d.host_interface && d.host_routes == 1, "{d:?}");
    assert_eq!(
        plumber
            .detach(None, "eth0", &n2.host_ifname, &n2.addrs)
            .await?,
        Default::default()
    );

    let links = node.exec_ok(&["ip", "-o", "link", "show"])?;
    assert!(!links.contains("cali"), "{links}");
    let routes = node.exec_ok(&["ip", "route", "show", "proto", "80"])?;
    assert!(routes.trim().is_empty(), "{routes}");
    assert!(
        !pod2
            .exec_ok(&["ip", "-o", "link", "show"])?
            .contains("eth0")
    );
    Ok(())
}

#[tokio::test]
async fn detach_without_netns_spares_the_veth_of_another_sandbox() -> anyhow::Result<()> {
    let node = node_ns()?;
    let pod = NetNs::new("pod")?;
    let plumber = Plumber::open(&node.path()).await?;
    // The pod's current sandbox holds the name; a late DEL of an old sandbox (other address)
    // must not cut it.
    let current = net("same-0", &["10.244.3.7/32"], 1500);
    plumber.attach(&ns_file(&pod), &current).await?;
    let old: Vec<IpNet> = vec!["10.244.3.9/32".parse()?];
    let d = plumber
        .detach(None, "eth0", &current.host_ifname, &old)
        .await?;
    assert!(!d.host_interface, "{d:?}");
    plumber.check(&ns_file(&pod), &current).await?;
    Ok(())
}

#[tokio::test]
async fn failed_attach_leaves_no_veth() -> anyhow::Result<()> {
    let node = node_ns()?;
    let (pod1, pod2) = (NetNs::new("pod")?, NetNs::new("pod")?);
    let plumber = Plumber::open(&node.path()).await?;
    let n1 = net("dup-0", &["10.244.4.5/32"], 1500);
    plumber.attach(&ns_file(&pod1), &n1).await?;
    // Same address for another pod: its host route is held by the first pod's veth.
    let n2 = net("dup-1", &["10.244.4.5/32"], 1500);
    let err = plumber.attach(&ns_file(&pod2), &n2).await.unwrap_err();
    assert!(matches!(err, PlumbingError::RouteHeld { .. }), "{err}");
    assert!(err.to_string().contains(&n1.host_ifname), "{err}");
    let links = node.exec_ok(&["ip", "-o", "link", "show"])?;
    assert!(!links.contains(&n2.host_ifname), "{links}");
    assert!(
        !pod2
            .exec_ok(&["ip", "-o", "link", "show"])?
            .contains("eth0")
    );
    // The first pod is untouched.
    plumber.check(&ns_file(&pod1), &n1).await?;
    Ok(())
}

#[tokio::test]
async fn dual_stack_pod_reaches_the_host_over_ipv6() -> anyhow::Result<()> {
    let node = node_ns()?;
    let pod = NetNs::new("pod")?;
    let plumber = Plumber::open(&node.path()).await?;
    let n = net("v6-0", &["10.244.5.5/32", "fd00:244::5/128"], 1500);
    plumber.attach(&ns_file(&pod), &n).await?;
    let routes = pod.exec_ok(&["ip", "-6", "route"])?;
    assert!(
        routes.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{routes}"
    );
    let host_routes = node.exec_ok(&["ip", "-6", "route", "show", "proto", "80"])?;
    assert!(
        host_routes.contains("fd00:244::5 dev cali"),
        "{host_routes}"
    );
    plumber.check(&ns_file(&pod), &n).await?;
    assert!(ping(&pod, "10.99.0.1"), "v4");
    assert!(ping(&pod, "fd99::1"), "v6");
    Ok(())
}

// ---- the daemon: socket server + real IPAM + real control plane, driven by cnitool ----------

mod daemon {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::Context;
    use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
    use kube::Client;
    use kube::api::{Api, ListParams, ObjectMeta, PostParams};
    use serde_json::Value;
    use tokio::sync::watch;
    use tortie::api::ipamblock::IPAMBlock;
    use tortie::api::ipamhandle::IPAMHandle;
    use tortie::cni::handlers::{CniDaemon, CniSettings};
    use tortie::cni::install::{self, InstallSettings, OtherConfigs};
    use tortie::cni::plumbing::Plumber;
    use tortie::cni::server;
    use tortie::ipam::Ipam;

    use super::support::{ControlPlane, NetNs, binaries};

    pub const NODE: &str = "node-1";

    /// Everything a node runs for CNI, in this process, with the host side in `node`.
    pub struct Harness {
        pub daemon: Arc<CniDaemon>,
        pub settings: InstallSettings,
        pub node: NetNs,
        stop: watch::Sender<bool>,
        pub dir: tempfile::TempDir,
        pub cp: ControlPlane,
        used: std::sync::Mutex<Vec<PathBuf>>,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            let _ = self.stop.send(true);
            // libcni keeps a result per attachment under /var/lib/cni until DEL; drop the
            // ones of attachments this test left behind.
            let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
            for netns in used {
                let _ = std::fs::remove_file(cnitool_cache_file(install::NETWORK_NAME, &netns));
            }
        }
    }

    /// Where libcni caches cnitool's result: cnitool names the container
    /// `cnitool-<first 20 hex of sha512(netns path)>`.
    pub fn cnitool_cache_file(net: &str, netns: &Path) -> PathBuf {
        use sha2::{Digest, Sha512};
        let digest = hex::encode(Sha512::digest(netns.as_os_str().as_encoded_bytes()));
        PathBuf::from(format!(
            "/var/lib/cni/results/{net}-cnitool-{}-eth0",
            &digest[..20]
        ))
    }

    pub use super::support::pools::create_pool;

    pub async fn harness(pool: &str, block: i32) -> anyhow::Result<Harness> {
        let cp = ControlPlane::start().await?;
        let client = cp.client();
        cp.create_node(NODE, &[]).await?;
        create_pool(&client, "default-pool", pool, block).await?;
        let ipam = Arc::new(Ipam::start(client.clone(), NODE, Duration::from_secs(30)).await?);
        let node = super::node_ns()?;
        let plumber = Plumber::open(&node.path()).await?;
        let daemon = Arc::new(CniDaemon::new(
            CniSettings {
                node: NODE.into(),
                default_mtu: 1410,
            },
            client,
            ipam,
            plumber,
        ));
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
            mtu: 1400,
            other_configs: OtherConfigs::Leave,
        };
        install::install_binaries(Path::new(env!("CARGO_BIN_EXE_tortie")), &settings.bin_dir)?;
        install::write_conflist(&settings)?;
        Ok(Harness {
            daemon,
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
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(NODE.into()),
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("pause".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        Api::<Pod>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("create pod {name}"))
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
    pub async fn cnitool(
        h: &Harness,
        verb: &str,
        pod: &str,
        netns: &Path,
    ) -> anyhow::Result<Outcome> {
        cnitool_in(h, verb, "default", pod, netns).await
    }

    pub async fn cnitool_in(
        h: &Harness,
        verb: &str,
        namespace: &str,
        pod: &str,
        netns: &Path,
    ) -> anyhow::Result<Outcome> {
        if let Ok(mut used) = h.used.lock() {
            used.push(netns.to_path_buf());
        }
        let out = tokio::process::Command::new(binaries::cnitool()?)
            .args([verb, install::NETWORK_NAME])
            .arg(netns)
            .env("CNI_PATH", &h.settings.bin_dir)
            .env("NETCONFPATH", &h.settings.conf_dir)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"),
            )
            .output()
            .await?;
        Ok(Outcome {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
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
}

use daemon::{
    allocations, cnitool, cnitool_in, create_pod, create_pod_in, create_pool, handles, harness,
    plugin, plugin_config,
};

fn pod_addr(result: &serde_json::Value) -> String {
    result["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cnitool_add_plumbs_pods_that_talk_and_del_leaves_nothing() -> anyhow::Result<()> {
    let h = harness("10.244.0.0/24", 26).await?;
    let client = h.cp.client();
    let (pod1, pod2) = (NetNs::new("pod")?, NetNs::new("pod")?);
    create_pod(&client, "web-0", &[]).await?;
    create_pod(&client, "web-1", &[]).await?;

    let add1 = cnitool(&h, "add", "web-0", &pod1.path()).await?;
    assert!(add1.ok, "ADD failed: {} {}", add1.stdout, add1.stderr);
    let add2 = cnitool(&h, "add", "web-1", &pod2.path()).await?;
    assert!(add2.ok, "ADD failed: {} {}", add2.stdout, add2.stderr);
    let (r1, r2) = (add1.json(), add2.json());
    let (a1, a2) = (pod_addr(&r1), pod_addr(&r2));
    let pool: IpNet = "10.244.0.0/24".parse()?;
    for a in [&a1, &a2] {
        let net: IpNet = a.parse()?;
        assert!(pool.contains(&net.addr()) && net.prefix_len() == 32, "{a}");
    }
    assert_ne!(a1, a2);
    assert_eq!(r1["interfaces"][1]["name"], "eth0");
    assert_eq!(
        r1["interfaces"][0]["name"],
        host_veth_name("default", "web-0")
    );
    assert_eq!(r1["ips"][0]["interface"], 1);

    let ip1 = a1.trim_end_matches("/32").to_string();
    let ip2 = a2.trim_end_matches("/32").to_string();
    let link = pod1.exec_ok(&["ip", "-o", "link", "show", "eth0"])?;
    assert!(
        link.contains("mtu 1400"),
        "MTU from the installed conflist: {link}"
    );
    let addrs = pod1.exec_ok(&["ip", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(addrs.contains(&format!("inet {a1}")), "{addrs}");
    let routes = pod1.exec_ok(&["ip", "route"])?;
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0 onlink"),
        "{routes}"
    );

    assert!(ping(&pod1, "10.99.0.1"), "pod -> host");
    assert!(ping(&pod1, &ip2), "pod -> second pod");
    assert!(ping(&pod2, &ip1), "second pod -> pod");
    tcp_both_ways(&pod1, &pod2, &ip2)?;
    tcp_both_ways(&pod2, &pod1, &ip1)?;

    let pod = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), "default")
        .get("web-0")
        .await?;
    let ann = pod.metadata.annotations.unwrap_or_default();
    assert_eq!(ann.get("cni.projectcalico.org/podIP"), Some(&a1));
    assert_eq!(ann.get("cni.projectcalico.org/podIPs"), Some(&a1));
    assert!(ann.contains_key("cni.projectcalico.org/containerID"));

    let check = cnitool(&h, "check", "web-0", &pod1.path()).await?;
    assert!(check.ok, "CHECK failed: {} {}", check.stdout, check.stderr);
    assert_eq!(allocations(&client).await?.len(), 2);

    for (pod, ns) in [("web-0", &pod1), ("web-1", &pod2)] {
        let del = cnitool(&h, "del", pod, &ns.path()).await?;
        assert!(del.ok, "DEL failed: {} {}", del.stdout, del.stderr);
        let again = cnitool(&h, "del", pod, &ns.path()).await?;
        assert!(
            again.ok,
            "second DEL failed: {} {}",
            again.stdout, again.stderr
        );
    }
    let links = h.node.exec_ok(&["ip", "-o", "link", "show"])?;
    assert!(!links.contains("cali"), "{links}");
    let host_routes = h.node.exec_ok(&["ip", "route", "show", "proto", "80"])?;
    assert!(host_routes.trim().is_empty(), "{host_routes}");
    assert!(allocations(&client).await?.is_empty());
    assert!(handles(&client).await?.is_empty());
    assert!(
        !pod1
            .exec_ok(&["ip", "-o", "link", "show"])?
            .contains("eth0")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_twice_is_idempotent_and_pools_follow_annotations_and_fixed_ips() -> anyhow::Result<()>
{
    let h = harness("10.244.0.0/24", 26).await?;
    let client = h.cp.client();

    // ADD twice for one container answers with the same attachment, not a second address.
    let pod = NetNs::new("pod")?;
    create_pod(&client, "twice", &[]).await?;
    let first = cnitool(&h, "add", "twice", &pod.path()).await?;
    assert!(first.ok, "{} {}", first.stdout, first.stderr);
    let second = cnitool(&h, "add", "twice", &pod.path()).await?;
    assert!(second.ok, "{} {}", second.stdout, second.stderr);
    assert_eq!(pod_addr(&first.json()), pod_addr(&second.json()));
    assert_eq!(allocations(&client).await?.values().sum::<usize>(), 1);
    assert!(cnitool(&h, "del", "twice", &pod.path()).await?.ok);
    assert!(cnitool(&h, "del", "twice", &pod.path()).await?.ok);
    assert!(allocations(&client).await?.is_empty());

    // A namespace annotation selects another pool.
    create_pool(&client, "external-pool", "172.16.0.0/26", 28).await?;
    let ns = k8s_openapi::api::core::v1::Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some("ext".into()),
            annotations: Some(
                [(
                    "cni.projectcalico.org/ipv4pools".to_string(),
                    r#"["external-pool"]"#.to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(&Default::default(), &ns)
        .await?;
    create_pod_in(&client, "ext", "api-0", &[]).await?;
    let ext_pod = NetNs::new("pod")?;
    // The IPAM view learns the new pool from its watch.
    let mut add = cnitool_in(&h, "add", "ext", "api-0", &ext_pod.path()).await?;
    for _ in 0..20 {
        if add.ok {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        add = cnitool_in(&h, "add", "ext", "api-0", &ext_pod.path()).await?;
    }
    assert!(add.ok, "{} {}", add.stdout, add.stderr);
    let addr: IpNet = pod_addr(&add.json()).parse()?;
    assert!(
        "172.16.0.0/26".parse::<IpNet>()?.contains(&addr.addr()),
        "{addr}"
    );

    // A fixed-IP pod gets exactly its address.
    create_pod(
        &client,
        "fixed",
        &[("cni.projectcalico.org/ipAddrs", r#"["10.244.0.77"]"#)],
    )
    .await?;
    let fixed_pod = NetNs::new("pod")?;
    let add = cnitool(&h, "add", "fixed", &fixed_pod.path()).await?;
    assert!(add.ok, "{} {}", add.stdout, add.stderr);
    assert_eq!(pod_addr(&add.json()), "10.244.0.77/32");
    let addrs = fixed_pod.exec_ok(&["ip", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(addrs.contains("inet 10.244.0.77/32"), "{addrs}");
    Ok(())
}

/// Asserts a failed invocation: non-zero exit, the code, and a message containing `needle`.
fn assert_cni_error(out: &daemon::Outcome, code: u64, needle: &str) {
    assert!(!out.ok, "expected failure, got {}", out.stdout);
    let v = out.json();
    assert_eq!(v["code"], code, "{}", out.stdout);
    let msg = v["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_the_spec_code_and_leaves_nothing() -> anyhow::Result<()> {
    // A /30 pool: four addresses, so exhaustion is cheap to reach.
    let h = harness("10.246.0.0/30", 30).await?;
    let client = h.cp.client();
    let conf = plugin_config(&h)?.to_string();
    let pod = NetNs::new("pod")?;
    let netns = pod.path().display().to_string();
    let bin = h.settings.bin_dir.display().to_string();
    let args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=bad";
    create_pod(&client, "bad", &[]).await?;
    let env = |netns: &str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", "bad0".into()),
            ("CNI_NETNS", netns.into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_ARGS", args.into()),
            ("CNI_PATH", bin.clone()),
        ]
    };
    let run = |env: Vec<(&'static str, String)>, stdin: String| {
        let h = &h;
        async move {
            let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            plugin(h, &pairs, &stdin).await
        }
    };
    let nothing_left = || async {
        assert!(allocations(&client).await.unwrap().is_empty());
        let links = h.node.exec_ok(&["ip", "-o", "link", "show"]).unwrap();
        assert!(!links.contains("cali"), "{links}");
        assert!(
            !pod.exec_ok(&["ip", "-o", "link", "show"])
                .unwrap()
                .contains("eth0")
        );
    };

    let out = run(env(&netns), "{not json".into()).await?;
    assert_cni_error(&out, 6, "not JSON");
    nothing_left().await;

    let no_netns: Vec<_> = env(&netns)
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let out = run(no_netns, conf.clone()).await?;
    assert_cni_error(&out, 4, "CNI_NETNS");
    nothing_left().await;

    let out = run(env(&netns), conf.replace("\"1.0.0\"", "\"9.9.9\"")).await?;
    assert_cni_error(&out, 1, "9.9.9");
    nothing_left().await;

    let out = run(env("/run/netns/tt-does-not-exist"), conf.clone()).await?;
    assert_cni_error(&out, 4, "/run/netns/tt-does-not-exist");
    nothing_left().await;

    let absent = h.dir.path().join("absent/cni.sock");
    let mut moved: serde_json::Value = serde_json::from_str(&conf)?;
    moved["socket"] = absent.display().to_string().into();
    let out = run(env(&netns), moved.to_string()).await?;
    assert_cni_error(&out, 11, &absent.display().to_string());
    nothing_left().await;

    // The daemon's own namespace is never a pod's.
    let host_ns = h.node.path().display().to_string();
    let out = run(env(&host_ns), conf.clone()).await?;
    assert_cni_error(&out, 4, "own (host) network namespace");
    nothing_left().await;

    // Exhaustion: four pods fill the /30, the fifth gets 11 with the pool and counts.
    let mut fillers = Vec::new();
    for i in 0..4 {
        let name = format!("fill-{i}");
        create_pod(&client, &name, &[]).await?;
        let ns = NetNs::new("pod")?;
        let add = cnitool(&h, "add", &name, &ns.path()).await?;
        assert!(add.ok, "{} {}", add.stdout, add.stderr);
        fillers.push((name, ns));
    }
    let held = allocations(&client).await?;
    assert_eq!(held.values().sum::<usize>(), 4);
    let out = run(env(&netns), conf.clone()).await?;
    assert_cni_error(
        &out,
        11,
        "\"default-pool\" (10.246.0.0/30) has no free address: 4 of 4 in use",
    );
    assert_eq!(
        allocations(&client).await?,
        held,
        "the failed ADD took nothing"
    );
    let links = h.node.exec_ok(&["ip", "-o", "link", "show"])?;
    assert!(
        !links.contains(&host_veth_name("default", "bad")),
        "{links}"
    );
    assert!(!pod.exec_ok(&["ip", "-o", "link", "show"])?.contains("eth0"));
    for (name, ns) in &fillers {
        assert!(cnitool(&h, "del", name, &ns.path()).await?.ok);
    }
    nothing_left().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_adds_get_distinct_addresses() -> anyhow::Result<()> {
    let h = harness("10.244.0.0/24", 26).await?;
    let client = h.cp.client();
    let mut pods = Vec::new();
    for i in 0..50 {
        let name = format!("burst-{i}");
        create_pod(&client, &name, &[]).await?;
        pods.push((name, NetNs::new("pod")?));
    }
    let started = std::time::Instant::now();
    let paths: Vec<std::path::PathBuf> = pods.iter().map(|(_, ns)| ns.path()).collect();
    let adds = futures::future::join_all(
        pods.iter()
            .zip(&paths)
            .map(|((name, _), path)| cnitool(&h, "add", name, path)),
    )
    .await;
    let wall = started.elapsed();
    let mut addrs = std::collections::BTreeSet::new();
    for (out, (name, _)) in adds.into_iter().zip(&pods) {
        let out = out?;
        assert!(out.ok, "ADD {name}: {} {}", out.stdout, out.stderr);
        assert!(
            addrs.insert(pod_addr(&out.json())),
            "duplicate address for {name}"
        );
    }
    assert_eq!(addrs.len(), 50);
    assert_eq!(allocations(&client).await?.len(), 50);
    eprintln!("50 concurrent cnitool ADDs took {} ms", wall.as_millis());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_readiness_and_gc_releases_what_is_not_valid() -> anyhow::Result<()> {
    let h = harness("10.244.0.0/24", 26).await?;
    let client = h.cp.client();
    let mut conf = plugin_config(&h)?;
    conf["cniVersion"] = "1.1.0".into();
    let bin = h.settings.bin_dir.display().to_string();
    let status_conf = conf.to_string();
    let status_env = [("CNI_COMMAND", "STATUS"), ("CNI_PATH", bin.as_str())];
    let status = || plugin(&h, &status_env, &status_conf);

    assert!(status().await?.ok, "ready daemon answers STATUS");
    h.daemon.set_ready(false);
    assert_cni_error(&status().await?, 50, "not ready");
    let pod = NetNs::new("pod")?;
    create_pod(&client, "early", &[]).await?;
    let add = cnitool(&h, "add", "early", &pod.path()).await?;
    // cnitool prints libcni's error text, not the plugin's JSON.
    assert!(
        !add.ok && add.stderr.contains("not ready"),
        "{}",
        add.stderr
    );
    assert!(allocations(&client).await?.is_empty());
    h.daemon.set_ready(true);
    assert!(status().await?.ok);

    // Two attachments; GC that lists only the first releases the second and its veth.
    let (keep_ns, drop_ns) = (NetNs::new("pod")?, NetNs::new("pod")?);
    create_pod(&client, "keep", &[]).await?;
    create_pod(&client, "gone", &[]).await?;
    assert!(cnitool(&h, "add", "keep", &keep_ns.path()).await?.ok);
    assert!(cnitool(&h, "add", "gone", &drop_ns.path()).await?.ok);
    let pods = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), "default");
    let keep_id = pods
        .get("keep")
        .await?
        .metadata
        .annotations
        .unwrap_or_default()["cni.projectcalico.org/containerID"]
        .clone();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] =
        serde_json::json!([{"containerID": keep_id, "ifname": "eth0"}]);
    let out = plugin(
        &h,
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", &bin)],
        &gc.to_string(),
    )
    .await?;
    assert!(out.ok, "GC failed: {}", out.stdout);
    let held = allocations(&client).await?;
    assert_eq!(
        held.keys().cloned().collect::<Vec<_>>(),
        vec![format!("k8s-pod-network.{keep_id}")]
    );
    let links = h.node.exec_ok(&["ip", "-o", "link", "show"])?;
    assert!(
        links.contains(&host_veth_name("default", "keep")),
        "{links}"
    );
    assert!(
        !links.contains(&host_veth_name("default", "gone")),
        "{links}"
    );
    let check = cnitool(&h, "check", "keep", &keep_ns.path()).await?;
    assert!(check.ok, "{} {}", check.stdout, check.stderr);
    Ok(())
}

// ---- benchmark (not a test): cargo test --test cni_daemon -- --ignored --nocapture bench_ ----

/// cnitool run inside `node` (so `bridge` builds its bridge there, never in the root
/// namespace); returns success and the wall time of the whole invocation.
async fn timed_cnitool(
    node: &NetNs,
    verb: &str,
    net: &str,
    conf_dir: &std::path::Path,
    cni_path: &str,
    pod: &str,
    netns: &std::path::Path,
) -> anyhow::Result<(bool, std::time::Duration)> {
    use std::os::fd::AsFd;
    let node_ns = std::fs::File::open(node.path())?;
    let mut cmd = tokio::process::Command::new(support::binaries::cnitool()?);
    cmd.args([verb, net])
        .arg(netns)
        .env("CNI_PATH", cni_path)
        .env("NETCONFPATH", conf_dir)
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setns is async-signal-safe; the child joins the node namespace before exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(node_ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    let started = std::time::Instant::now();
    let status = cmd.status().await?;
    Ok((status.success(), started.elapsed()))
}

fn percentiles(mut v: Vec<std::time::Duration>) -> String {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0;
    format!(
        "p50 {:.1} ms, p99 {:.1} ms (n={})",
        at(0.5),
        at(0.99),
        v.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_add_del_tortie_vs_bridge_host_local() -> anyhow::Result<()> {
    const SEQ: usize = 40;
    const BURST: usize = 100;
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let h = harness("10.244.0.0/20", 26).await?;
    let client = h.cp.client();
    let bridge_dir = tempfile::tempdir()?;
    let bridge_conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench-bridge",
        "plugins": [{"type": "bridge", "bridge": "cnibr0", "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
                     "dataDir": bridge_dir.path().join("host-local")}}]
    });
    let conf_dir = bridge_dir.path().join("net.d");
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::write(conf_dir.join("10-bridge.conflist"), bridge_conf.to_string())?;
    let tortie_path = h.settings.bin_dir.display().to_string();

    let mut pods = Vec::new();
    for i in 0..SEQ + BURST {
        let name = format!("bench-{i}");
        create_pod(&client, &name, &[]).await?;
        pods.push((name, NetNs::new("bench")?));
    }
    // One warm-up each, so neither pays first-use costs in the figures.
    for (net, dir, path) in [
        (
            install::NETWORK_NAME,
            h.settings.conf_dir.as_path(),
            tortie_path.as_str(),
        ),
        ("bench-bridge", conf_dir.as_path(), "/usr/lib/cni"),
    ] {
        let (name, ns) = &pods[0];
        assert!(
            timed_cnitool(&h.node, "add", net, dir, path, name, &ns.path())
                .await?
                .0
        );
        assert!(
            timed_cnitool(&h.node, "del", net, dir, path, name, &ns.path())
                .await?
                .0
        );
    }
    let mut report = Vec::new();
    for (label, net, dir, path) in [
        (
            "tortie",
            install::NETWORK_NAME,
            h.settings.conf_dir.as_path(),
            tortie_path.as_str(),
        ),
        (
            "bridge+host-local",
            "bench-bridge",
            conf_dir.as_path(),
            "/usr/lib/cni",
        ),
    ] {
        let (mut adds, mut dels) = (Vec::new(), Vec::new());
        for (name, ns) in &pods[..SEQ] {
            let (ok, t) = timed_cnitool(&h.node, "add", net, dir, path, name, &ns.path()).await?;
            assert!(ok, "{label} ADD {name}");
            adds.push(t);
        }
        for (name, ns) in &pods[..SEQ] {
            let (ok, t) = timed_cnitool(&h.node, "del", net, dir, path, name, &ns.path()).await?;
            assert!(ok, "{label} DEL {name}");
            dels.push(t);
        }
        let paths: Vec<std::path::PathBuf> = pods[SEQ..].iter().map(|(_, ns)| ns.path()).collect();
        let started = std::time::Instant::now();
        let burst = futures::future::join_all(
            pods[SEQ..]
                .iter()
                .zip(&paths)
                .map(|((name, _), p)| timed_cnitool(&h.node, "add", net, dir, path, name, p)),
        )
        .await;
        let wall = started.elapsed();
        let ok = burst.iter().filter(|r| matches!(r, Ok((true, _)))).count();
        for ((name, _), p) in pods[SEQ..].iter().zip(&paths) {
            timed_cnitool(&h.node, "del", net, dir, path, name, p).await?;
        }
        report.push(format!(
            "{label}: ADD {} | DEL {} | {BURST} concurrent ADDs: {} ms wall, {ok} ok",
            percentiles(adds),
            percentiles(dels),
            wall.as_millis()
        ));
    }
    let stats = h.daemon.ipam().stats();
    for line in &report {
        eprintln!("{line}");
    }
    eprintln!("ipam write stats: {stats:?}");
    Ok(())
}
