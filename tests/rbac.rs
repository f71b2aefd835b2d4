// The install's RBAC against what the code really does: `tortie node` runs as the manifest's
// service account (a client certificate for `system:serviceaccount:kube-system:tortie-node`,
// bound by the manifest's own ClusterRole/Role bindings) with the manifest's settings against a
// real kube-apiserver that audits that user. The test drives every API path the daemon has:
// start-up, leader election, the default pool, Calico's default objects, CNI ADD and DEL,
// leaked-address GC, a deleted node's blocks, overlapping-pool and FelixConfiguration Events,
// shutdown. The (API group, resource, verb) triples in the audit log must equal the rules of
// the manifest both ways: nothing refused, nothing granted that is never used (except the
// few listed in RARE, each with its reason). The same daemon's live /metrics must hold every
// metric the monitoring manifests read.

mod nodes;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use nodes::{Daemon, DaemonOpts, Host};
use serde_json::{Value, json};
use support::controlplane::AUDITED_USER;
use support::manifest::{Manifest, apply, monitoring_expressions, promql_metric_names};
use support::{ControlPlane, NetNs};
use tortie::api::{IPPool, IPPoolSpec};
use tortie::ipam::{AssignRequest, Ipam, pod_handle};

/// (API group, resource[/subresource], verb) as RBAC and the audit log name them.
type Access = (String, String, String);

/// Granted but legitimately absent from one run, each with the reason.
const RARE: &[(&str, &str, &str, &str)] = &[
    (
        "events.k8s.io",
        "events",
        "patch",
        "the event recorder patches an Event only when the same one repeats within its series window",
    ),
    (
        "",
        "namespaces",
        "get",
        "CNI ADD reads a namespace from the API only when its watch has not seen it yet",
    ),
    (
        "crd.projectcalico.org",
        "ipamhandles",
        "update",
        "a handle is updated only when some but not all of its addresses are released",
    ),
    (
        "crd.projectcalico.org",
        "ipamconfigs",
        "create",
        "the leader creates IPAMConfig `default` when absent; this test creates it first (no cooldown)",
    ),
];

/// The manifest's rules, expanded: ClusterRole everywhere, Role in its namespace.
fn granted(m: &Manifest) -> BTreeSet<Access> {
    let mut out = BTreeSet::new();
    for kind in ["ClusterRole", "Role"] {
        for rule in m.one(kind)["rules"].as_array().expect("rules") {
            assert!(
                rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null(),
                "rule shapes the test does not expand: {rule}"
            );
            for g in rule["apiGroups"].as_array().expect("apiGroups") {
                for r in rule["resources"].as_array().expect("resources") {
                    for v in rule["verbs"].as_array().expect("verbs") {
                        let s = |x: &Value| x.as_str().expect("string").to_string();
                        assert_ne!(s(v), "*", "no wildcards in a least-privilege role");
                        assert_ne!(s(r), "*", "no wildcards in a least-privilege role");
                        out.insert((s(g), s(r), s(v)));
                    }
                }
            }
        }
    }
    out
}

/// Resource requests of the audited user, with the status codes seen for each.
fn audited(path: &std::path::Path) -> BTreeMap<Access, BTreeSet<i64>> {
    let text = std::fs::read_to_string(path).expect("audit log");
    let mut out: BTreeMap<Access, BTreeSet<i64>> = BTreeMap::new();
    for line in text.lines() {
        let ev: Value = serde_json::from_str(line).expect("audit event JSON");
        if ev["user"]["username"] != AUDITED_USER {
            continue;
        }
        let Some(obj) = ev["objectRef"].as_object() else {
            continue; // discovery and /version: granted to every authenticated user
        };
        let group = obj.get("apiGroup").and_then(Value::as_str).unwrap_or("");
        let mut resource = obj
            .get("resource")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(sub) = obj.get("subresource").and_then(Value::as_str) {
            resource = format!("{resource}/{sub}");
        }
        let verb = ev["verb"].as_str().unwrap_or("").to_string();
        let code = ev["responseStatus"]["code"].as_i64().unwrap_or(0);
        out.entry((group.to_string(), resource, verb))
            .or_default()
            .insert(code);
    }
    out
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, cond: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await? {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Addresses for a node that is then deleted: the leader must release them and its blocks.
async fn leave_a_deleted_node_behind(cp: &ControlPlane, client: &Client) -> anyhow::Result<()> {
    cp.create_node("rbac-gone", &[]).await?;
    let ipam = Ipam::start(client.clone(), "rbac-gone", Duration::from_secs(30)).await?;
    let attrs = BTreeMap::from([
        ("node".to_string(), "rbac-gone".to_string()),
        ("namespace".to_string(), "default".to_string()),
        ("pod".to_string(), "ghost".to_string()),
    ]);
    ipam.auto_assign(&AssignRequest::workload(pod_handle("ghost"), attrs))
        .await?;
    Api::<Node>::all(client.clone())
        .delete("rbac-gone", &DeleteParams::default())
        .await?;
    Ok(())
}

async fn blocks_of(client: &Client, node: &str) -> anyhow::Result<usize> {
    let blocks = Api::<tortie::api::ipamblock::IPAMBlock>::all(client.clone())
        .list(&Default::default())
        .await?;
    Ok(blocks
        .items
        .iter()
        .filter(|b| b.spec.affinity.as_deref() == Some(&format!("host:{node}")))
        .count())
}

#[tokio::test]
async fn the_daemon_uses_exactly_the_rbac_the_manifest_grants() -> anyhow::Result<()> {
    let host = Host::new("rbac").context("host")?;
    let cp = ControlPlane::start_on(host.root_ip.into()).await?;
    let admin = cp.client();
    let m = Manifest::load();
    for doc in &m.docs {
        let kind = doc["kind"].as_str().unwrap_or("");
        if matches!(
            kind,
            "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
        ) {
            apply(&admin, doc, false).await?;
        }
    }
    cp.create_node("rbac-a", &[]).await?;
    // A policy of each family exists, so the policy watches list real objects.
    let k8s_policy: k8s_openapi::api::networking::v1::NetworkPolicy = serde_json::from_value(
        json!({"metadata": {"name": "deny-all", "namespace": "default"},
               "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
    )?;
    Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &k8s_policy)
        .await?;
    let gnp: tortie::api::GlobalNetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy",
        "metadata": {"name": "deny-blocked"},
        "spec": {"order": 10, "selector": "blocked == 'true'", "ingress": [{"action": "Deny"}]}}))?;
    Api::<tortie::api::GlobalNetworkPolicy>::all(admin.clone())
        .create(&PostParams::default(), &gnp)
        .await?;
    // No cooldown, so the GC's releases are immediate and visible within the test.
    let no_cooldown = tortie::api::ipamconfig::IPAMConfigSpec {
        ip_cooldown_seconds: Some(0),
        ..Default::default()
    };
    Api::<tortie::api::ipamconfig::IPAMConfig>::all(admin.clone())
        .create(
            &PostParams::default(),
            &tortie::api::ipamconfig::IPAMConfig::new("default", no_cooldown),
        )
        .await?;

    // The daemon as the manifest runs it: its settings, the service account's identity.
    let kubeconfig = cp.kubeconfig_for(
        AUDITED_USER,
        &[
            "system:serviceaccounts",
            "system:serviceaccounts:kube-system",
        ],
    )?;
    let mut env: Vec<(&str, String)> = Vec::new();
    let manifest_env = m.daemon_env();
    for (k, v) in &manifest_env {
        if let Some(v) = v {
            env.push((k.as_str(), v.clone()));
        }
    }
    // Test-only: the node's one link, the manifest's Lease namespace (the harness defaults to
    // `default`), a short GC grace so leaks are collected within the test.
    env.push(("IP_AUTODETECTION_METHOD", "interface=api0".into()));
    env.push(("TORTIE_LEASE_NAMESPACE", "kube-system".into()));
    env.push(("TORTIE_IPAM_GC_GRACE", "2".into()));
    let dir = tempfile::tempdir()?;
    let mut daemon = Daemon::start(
        &host,
        dir.path(),
        DaemonOpts {
            kubeconfig: &kubeconfig,
            node_name: "rbac-a",
            env,
        },
    );
    daemon.wait_readiness(Duration::from_secs(90), |code, _| code == 200);

    // The default pool came from the manifest's CALICO_IPV4POOL_* settings: the Lease
    // holder creates it, which readiness does not wait for.
    let pools = Api::<IPPool>::all(admin.clone());
    wait_until(
        "the leader created the default pool",
        Duration::from_secs(30),
        || {
            let pools = pools.clone();
            async move { Ok(pools.get_opt("default-ipv4-ippool").await?.is_some()) }
        },
    )
    .await
    .with_context(|| daemon.log())?;
    // ...and the daemon's IPAM view has it before a pod asks for an address.
    wait_until(
        "the daemon's IPAM view has the default pool",
        Duration::from_secs(30),
        || {
            let text = daemon.metrics_text();
            async move { Ok(text.contains(r#"ipam_ippool_size{ippool="default-ipv4-ippool"}"#)) }
        },
    )
    .await
    .with_context(|| daemon.log())?;
    let pool = pools.get("default-ipv4-ippool").await?;
    assert_eq!(pool.spec.cidr, "192.168.0.0/16");

    // CNI ADD and DEL of a real pod through the installed plugin.
    let pod_ns = NetNs::new("rbac-pod")?;
    support::pods::create_pod_on(&admin, "default", "web", "rbac-a", &[]).await?;
    let ip = support::cni::cnitool_add_v4(dir.path(), "web", &pod_ns.path())
        .await
        .with_context(|| daemon.log())?;
    assert!(ip.starts_with("192.168."), "{ip}");
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web";
    let del = support::cni::run_cnitool(
        &dir.path().join("bin"),
        &dir.path().join("net.d"),
        "del",
        args,
        &pod_ns.path(),
    )
    .await?;
    assert!(del.ok, "DEL: {} {}", del.stdout, del.stderr);
    // A leak: ADD, then the pod object goes without a DEL; the leader's GC collects it.
    support::pods::create_pod_on(&admin, "default", "leaky", "rbac-a", &[]).await?;
    let leak_ns = NetNs::new("rbac-leak")?;
    support::cni::cnitool_add_v4(dir.path(), "leaky", &leak_ns.path()).await?;
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(admin.clone(), "default")
        .delete("leaky", &DeleteParams::default().grace_period(0))
        .await?;
    // A deleted node's blocks, and an overlapping pool and an unsupported FelixConfiguration
    // field (each an Event).
    leave_a_deleted_node_behind(&cp, &admin).await?;
    support::pools::create_pool_spec(
        &admin,
        "overlapping",
        IPPoolSpec {
            cidr: "192.168.0.0/24".into(),
            ..IPPoolSpec::default()
        },
    )
    .await?;
    Api::<tortie::api::FelixConfiguration>::all(admin.clone())
        .patch(
            "default",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"spec": {"bpfLogLevel": "Debug", "interfacePrefix": "eni"}}),
            ),
        )
        .await
        .context("patch FelixConfiguration default (the leader created it)")?;
    wait_until(
        "the deleted node's blocks are released",
        Duration::from_secs(60),
        || {
            let admin = admin.clone();
            async move { Ok(blocks_of(&admin, "rbac-gone").await? == 0) }
        },
    )
    .await
    .with_context(|| daemon.log())?;
    wait_until(
        "the leaked address is collected",
        Duration::from_secs(60),
        || {
            let admin = admin.clone();
            async move {
                let h = support::cni::handles(&admin).await?;
                Ok(!h.iter().any(|h| h.contains("leaky")))
            }
        },
    )
    .await
    .with_context(|| daemon.log())?;
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(admin.clone());
    wait_until(
        "the Warning Events are published",
        Duration::from_secs(30),
        || {
            let events = events.clone();
            async move {
                let list = events.list(&Default::default()).await?;
                let reasons: BTreeSet<String> =
                    list.items.iter().filter_map(|e| e.reason.clone()).collect();
                Ok(reasons.contains("CIDROverlap") && reasons.contains("UnsupportedField"))
            }
        },
    )
    .await?;

    // Every metric an alert or a panel reads exists in this node's live /metrics (it holds
    // the Lease, so the cluster-wide ipam_* series are there too).
    let body = daemon.metrics_text();
    let exported: BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut missing = Vec::new();
    for (what, expr) in monitoring_expressions() {
        for name in promql_metric_names(&expr) {
            // `up` is the one series Prometheus makes itself (per scrape target).
            if name != "up" && !exported.contains(name.as_str()) {
                missing.push(format!("{name} ({what})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "read by the monitoring manifests but not in /metrics: {missing:?}"
    );

    let (status, _) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{}", daemon.log());

    // The audit log against the rules, both ways.
    let used = audited(&cp.audit_log());
    let grants = granted(&m);
    let refused: Vec<_> = used
        .iter()
        .filter(|(_, codes)| codes.contains(&403))
        .map(|(a, _)| a.clone())
        .collect();
    let missing: Vec<_> = used.keys().filter(|a| !grants.contains(*a)).collect();
    assert!(
        refused.is_empty() && missing.is_empty(),
        "the code needs rights the manifest lacks: refused {refused:?}, not granted {missing:?}\n{}",
        daemon.log()
    );
    let rare: BTreeSet<Access> = RARE
        .iter()
        .map(|(g, r, v, _)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    let unused: Vec<_> = grants
        .iter()
        .filter(|a| !used.contains_key(*a) && !rare.contains(*a))
        .collect();
    assert!(
        unused.is_empty(),
        "granted but never used (remove from the ClusterRole/Role, or list in RARE with a reason): {unused:?}\nused: {:?}",
        used.keys().collect::<Vec<_>>()
    );
    for r in &rare {
        assert!(grants.contains(r), "RARE lists {r:?}, which is not granted");
    }
    eprintln!(
        "audited {} distinct (group, resource, verb) of {AUDITED_USER}",
        used.len()
    );
    drop((pod_ns, leak_ns));
    Ok(())
}
