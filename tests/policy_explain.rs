// `tortie policy explain` against a real kube-apiserver: it reads pods, namespaces and every
// policy kind through the API, answers allow/deny with the deciding policy and rule per
// direction, and signals the answer in its exit code (0 allowed, 1 denied, 2 error). With
// `--counters`, run in a node namespace holding the real compiled table with `cali*`-plumbed
// pods, it shows the live counters of the rules on the path, which grow with real packets.

#[path = "nodes/mod.rs"]
mod nodes;
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::netns::plumb_pod;
use support::{ControlPlane, NetNs};
use tortie::cni::plumbing::host_veth_name;
use tortie::policy::cluster::ClusterObjects;

async fn pod(cp: &ControlPlane, ns: &str, name: &str, ip: &str, app: &str) {
    let api: Api<Pod> = Api::namespaced(cp.client(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "pause",
            "ports": [{"name": "http", "containerPort": 8080}]}]}
    }))
    .unwrap();
    api.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
}

fn explain(cp: &ControlPlane, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tortie"))
        .args(["policy", "explain", "--kubeconfig"])
        .arg(cp.kubeconfig_path())
        .args(args)
        .output()
        .expect("run tortie");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn explain_names_the_deciding_policy_and_exits_by_verdict() {
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    for (ns, team) in [("prod", "blue"), ("dev", "red")] {
        let n: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns, "labels": {"team": team}}}))
                .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &n)
            .await
            .expect("namespace");
    }
    pod(&cp, "prod", "web", "10.0.0.1", "web").await;
    pod(&cp, "prod", "db", "10.0.0.2", "db").await;
    pod(&cp, "dev", "tool", "10.0.1.2", "tool").await;
    let knp: K8sNetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "db-from-web"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                              "ports": [{"port": "http"}]}]}
    }))
    .unwrap();
    Api::<K8sNetworkPolicy>::namespaced(client.clone(), "prod")
        .create(&PostParams::default(), &knp)
        .await
        .expect("k8s policy");
    let deny: tortie::api::GlobalNetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "no-red-egress"},
        "spec": {"order": 10, "namespaceSelector": "team == 'red'",
                 "egress": [{"action": "Deny", "destination": {"namespaceSelector": "team == 'blue'"}}]}
    }))
    .unwrap();
    Api::<tortie::api::GlobalNetworkPolicy>::all(client.clone())
        .create(&PostParams::default(), &deny)
        .await
        .expect("calico policy");

    let (code, out) = explain(
        &cp,
        &[
            "--from", "prod/web", "--to", "prod/db", "--port", "8080/tcp",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("prod/knp.default.db-from-web rule 0 (Allow)"),
        "{out}"
    );

    let (code, out) = explain(
        &cp,
        &[
            "--from", "prod/web", "--to", "prod/db", "--port", "9090", "-o", "json",
        ],
    );
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["allowed"], false);
    assert_eq!(v["ingress"]["decision"]["by"], "end-of-tier");
    assert_eq!(v["egress"]["decision"]["by"], "no-policy");

    let (code, out) = explain(
        &cp,
        &[
            "--from", "dev/tool", "--to", "prod/web", "--port", "80", "-o", "json",
        ],
    );
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["egress"]["decision"]["policy"], "no-red-egress");
    assert_eq!(v["egress"]["decision"]["action"], "Deny");

    let (code, out) = explain(
        &cp,
        &["--from", "prod/nope", "--to", "prod/web", "--port", "80"],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("pod prod/nope not found"), "{out}");
}

/// A TCP server in `ns` answering each connection with "ok".
fn serve(ns: &NetNs, ip: &str, port: u16) {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let l = ns.run(move || TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"ok");
        }
    });
}

/// One TCP connection attempt from `ns` (500 ms, one SYN): whether "ok" came back.
fn connect(ns: &NetNs, ip: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    ns.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).is_ok()
    })
    .unwrap()
}

/// `explain --counters -o json` run inside the node namespace: (exit code, document).
fn explain_on_node(node: &NetNs, cp: &ControlPlane, port: &str) -> (i32, Value, String) {
    let kubeconfig = cp.kubeconfig_path().display().to_string();
    let out = node
        .command(&[
            env!("CARGO_BIN_EXE_tortie"),
            "policy",
            "explain",
            "--kubeconfig",
            &kubeconfig,
            "--from",
            "prod/web",
            "--to",
            "prod/db",
            "--port",
            port,
            "--counters",
            "-o",
            "json",
        ])
        .output()
        .expect("run tortie");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), doc, text)
}

/// The packets of the path counter named `counter` in an explain document.
fn packets(doc: &Value, counter: &str) -> Option<u64> {
    doc["counters"]
        .as_array()?
        .iter()
        .find(|c| c["counter"] == counter)?["packets"]
        .as_u64()
}

#[tokio::test]
async fn explain_counters_show_the_live_counters_of_the_rules_on_the_path() {
    let host = nodes::Host::new("pexcnt").expect("node namespace");
    let cp = ControlPlane::start_on(host.root_ip.into())
        .await
        .expect("control plane");
    let client = cp.client();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "prod"}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    pod(&cp, "prod", "web", "10.0.0.1", "web").await;
    pod(&cp, "prod", "db", "10.0.0.2", "db").await;
    let knp = json!({
        "metadata": {"namespace": "prod", "name": "db-from-web"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                              "ports": [{"port": 8080}]}]}
    });
    let knp: K8sNetworkPolicy = serde_json::from_value(knp).unwrap();
    Api::<K8sNetworkPolicy>::namespaced(client.clone(), "prod")
        .create(&PostParams::default(), &knp)
        .await
        .expect("k8s policy");

    // Without the table (policy off, or not on a node) --counters says so and answers 2.
    let (code, _, out) = explain_on_node(&host.ns, &cp, "8080/tcp");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("does not exist in this network namespace"),
        "{out}"
    );

    // The node: the table the daemon computes for node-1 from the API's objects, and the
    // pods on veths named as tortie's CNI names them.
    let objects = ClusterObjects {
        namespaces: Api::<Namespace>::all(client.clone())
            .list(&Default::default())
            .await
            .unwrap()
            .items,
        pods: Api::<Pod>::all(client.clone())
            .list(&Default::default())
            .await
            .unwrap()
            .items,
        k8s_policies: Api::<K8sNetworkPolicy>::all(client.clone())
            .list(&Default::default())
            .await
            .unwrap()
            .items,
        ..ClusterObjects::default()
    };
    let plan = tortie::calc::policy::policy_plan(&objects, "node-1", &Default::default());
    host.ns
        .exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    // Proxy ARP answers for the pods' gateway 169.254.1.1 only with a route to it through
    // another link: an uplink namespace's (the node has only its API link otherwise).
    let uplink = NetNs::new("pexcntup").unwrap();
    support::veth_pair(&host.ns, "up0", &uplink, "eth0").unwrap();
    host.ns
        .exec_ok(&["ip", "route", "add", "169.254.1.1/32", "dev", "up0"])
        .unwrap();
    let mut pods = Vec::new();
    for (name, ip) in [("web", "10.0.0.1"), ("db", "10.0.0.2")] {
        let p = NetNs::new(&format!("pexcnt{name}")).unwrap();
        plumb_pod(&host.ns, &p, &host_veth_name("prod", name), ip, None).unwrap();
        pods.push(p);
    }
    let mut driver = tortie::dataplane::nft::Driver::new(Default::default());
    host.ns
        .run(|| driver.reconcile(&plan.table))
        .unwrap()
        .expect("table written");
    serve(&pods[1], "10.0.0.2", 8080);
    serve(&pods[1], "10.0.0.2", 9090);

    // Allow rules count in anonymous counters, read from their chain.
    let allow = "pi-knp.prod.db-from-web rule 0";
    let eot = format!("tw-{}/end-of-tier", host_veth_name("prod", "db"));
    let (code, doc, out) = explain_on_node(&host.ns, &cp, "8080/tcp");
    assert_eq!(code, 0, "{out}");
    let before = packets(&doc, allow).unwrap_or_else(|| panic!("no {allow}: {out}"));
    assert_eq!(before, 0, "{out}");
    for _ in 0..3 {
        assert!(
            connect(&pods[0], "10.0.0.2", 8080),
            "allowed flow failed:\n{}",
            host.ns
                .exec_ok(&["nft", "list", "ruleset"])
                .unwrap_or_default()
        );
    }
    let (_, doc, out) = explain_on_node(&host.ns, &cp, "8080/tcp");
    // Each connection's first packet (the SYN) is decided by the rule; the rest of the
    // flow is established and accepted before it.
    assert_eq!(packets(&doc, allow), Some(3), "{out}");
    assert_eq!(doc["counters"][0]["direction"], "ingress", "{out}");

    let (code, doc, out) = explain_on_node(&host.ns, &cp, "9090/tcp");
    assert_eq!(code, 1, "{out}");
    assert_eq!(packets(&doc, &eot), Some(0), "{out}");
    for _ in 0..2 {
        assert!(!connect(&pods[0], "10.0.0.2", 9090), "denied flow passed");
    }
    let (_, doc, out) = explain_on_node(&host.ns, &cp, "9090/tcp");
    assert_eq!(packets(&doc, &eot), Some(2), "{out}");

    // The table form names the counter and its values.
    let kubeconfig = cp.kubeconfig_path().display().to_string();
    let table = host.ns.exec(&[
        env!("CARGO_BIN_EXE_tortie"),
        "policy",
        "explain",
        "--kubeconfig",
        &kubeconfig,
        "--from",
        "prod/web",
        "--to",
        "prod/db",
        "--port",
        "9090",
        "--counters",
    ]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let line = table
        .lines()
        .find(|l| l.contains(&eot))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.split_whitespace().nth(1) == Some("2"), "{table}");
}
