// The daemon side of the CNI against real namespaces: pod plumbing (veth, addresses, routes,
// host route) into a node namespace the test creates, and the socket server with the real
// IPAM and control plane driven by the real `cnitool` through the installed plugin.

mod support;

use std::fs::File;

use ipnet::IpNet;
use support::NetNs;
use support::cni::{
    Outcome, allocations, cnitool, cnitool_in, create_pod, create_pod_in, create_pool, handles,
    harness, node_ns, plugin, plugin_config,
};
use support::netns::{ping, tcp_both_ways};
use tortie::cni::plumbing::{Plumber, PlumbingError, PodNetwork, host_veth_name};

fn net(pod: &str, addrs: &[&str], mtu: u32) -> PodNetwork {
    PodNetwork {
        host_ifname: host_veth_name("default", pod),
        pod_ifname: "eth0".into(),
        addrs: addrs.iter().map(|a| a.parse::<IpNet>().unwrap()).collect(),
        mtu,
    }
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
    // DEL answers once the blocks are written; the handle objects (bookkeeping) follow.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = handles(&client).await?;
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "handle objects left 10 s after DEL: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
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
fn assert_cni_error(out: &Outcome, code: u64, needle: &str) {
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
    let keep_id = support::cni::cnitool_container_id(&keep_ns.path());
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
