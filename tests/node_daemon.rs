// `tortie node` as a process against a real kube-apiserver: readiness follows the watches
// (503 with the reason, then 200), /metrics is valid Prometheus text, SIGTERM ends it with
// exit 0 within 2 s, and an unreachable or lost API server is reported, not hidden.

mod nodes;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use nodes::{Daemon, DaemonOpts, Host};
use support::ControlPlane;

/// A DaemonSet rollout gives the old pod this long; the daemon must be gone by then.
const EXIT_BUDGET: Duration = Duration::from_secs(2);

/// `tortie node` in its own node namespace (see tests/nodes), with a metrics parser on top.
struct Node {
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(host: &Host, kubeconfig: &Path, node_name: &str) -> Node {
        let dir = tempfile::tempdir().expect("daemon dir");
        let daemon = Daemon::start(
            host,
            dir.path(),
            DaemonOpts {
                kubeconfig,
                node_name,
                env: vec![("IP_AUTODETECTION_METHOD", "interface=api0".into())],
            },
        );
        Node { daemon, _dir: dir }
    }

    fn metrics(&self) -> Exposition {
        let body = self.daemon.metrics_text();
        parse_exposition(&body).unwrap_or_else(|e| panic!("/metrics is not valid: {e}\n{body}"))
    }
}

impl std::ops::Deref for Node {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

/// One sample line: full name (with any _total/_bucket suffix), labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Samples by metric family: family name -> (type, samples).
#[derive(Debug, Default)]
struct Exposition {
    families: BTreeMap<String, (String, Vec<Sample>)>,
}

impl Exposition {
    fn value(&self, name: &str) -> f64 {
        let (_, samples) = self
            .families
            .get(name)
            .unwrap_or_else(|| panic!("metric {name} missing: {:?}", self.families.keys()));
        assert_eq!(samples.len(), 1, "{name} should have one sample");
        samples[0].2
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `{a="x",b="y\"z"}`; returns the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest.split_once("=\"").ok_or("label without =\"")?;
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad sample value {s:?}")),
    }
}

/// A strict reader of the Prometheus text format 0.0.4: every line is a HELP, a TYPE or a
/// sample; each family has one TYPE, given before its samples; names and labels well formed.
fn parse_exposition(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    if !text.ends_with('\n') {
        return Err("exposition must end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(help) = line.strip_prefix("# HELP ") {
            let (name, _) = help.split_once(' ').unwrap_or((help, ""));
            if !is_metric_name(name) {
                return Err(at("bad metric name in HELP".into()));
            }
        } else if let Some(ty) = line.strip_prefix("# TYPE ") {
            let (name, kind) = ty
                .split_once(' ')
                .ok_or_else(|| at("TYPE without kind".into()))?;
            if !is_metric_name(name) {
                return Err(at("bad metric name in TYPE".into()));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type {kind}")));
            }
            if out
                .families
                .insert(name.to_owned(), (kind.to_owned(), Vec::new()))
                .is_some()
            {
                return Err(at("family typed twice".into()));
            }
        } else if line.starts_with('#') {
            continue; // other comments are allowed
        } else {
            let name_end = line
                .find(['{', ' '])
                .ok_or_else(|| at("sample without value".into()))?;
            let name = &line[..name_end];
            if !is_metric_name(name) {
                return Err(at("bad metric name".into()));
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..]).map_err(at)?
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if !rest.starts_with(' ') || fields.is_empty() || fields.len() > 2 {
                return Err(at("expected ' value [timestamp]'".into()));
            }
            let value = parse_value(fields[0]).map_err(at)?;
            if let Some(ts) = fields.get(1) {
                ts.parse::<i64>().map_err(|_| at("bad timestamp".into()))?;
            }
            let family = ["_bucket", "_sum", "_count", "_total"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .find(|base| out.families.contains_key(*base))
                .unwrap_or(name);
            let (_, samples) = out
                .families
                .get_mut(family)
                .ok_or_else(|| at("sample before its TYPE line".into()))?;
            samples.push((name.to_owned(), labels, value));
        }
    }
    Ok(out)
}

#[test]
fn exposition_parser_rejects_malformed_text() {
    let good = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"w\"} 1.5\n";
    let parsed = parse_exposition(good).expect("good text");
    assert_eq!(parsed.families["a_total"].1[0].1["k"], "v\"w");
    for bad in [
        "a 1\n",                                 // no TYPE
        "# TYPE a gauge\na{k=\"v} 1\n",          // unterminated label
        "# TYPE a gauge\na{1k=\"v\"} 1\n",       // bad label name
        "# TYPE a gauge\na one\n",               // bad value
        "# TYPE a gauge\n# TYPE a gauge\na 1\n", // typed twice
        "# TYPE a gauge\na 1",                   // no final newline
        "# TYPE a widget\na 1\n",                // unknown type
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

#[tokio::test]
async fn node_becomes_ready_after_sync_and_exits_zero_on_sigterm() {
    let host = Host::new("nd-a").expect("host");
    let cp = ControlPlane::start_on(host.root_ip.into())
        .await
        .expect("control plane");
    cp.create_node("node-a", &[]).await.expect("node");
    let mut daemon = Node::start(&host, cp.kubeconfig_path(), "node-a");

    let (_, body) = daemon.wait_readiness(Duration::from_secs(30), |code, _| code == 200);
    assert_eq!(body, "ok\n");
    assert_eq!(daemon.health("/liveness"), Ok((200, "ok\n".to_owned())));
    assert_eq!(daemon.health("/nope").map(|r| r.0), Ok(404));

    let m = daemon.metrics();
    let (kind, build) = &m.families["tortie_build_info"];
    assert_eq!(kind, "gauge");
    assert_eq!(build[0].2, 1.0);
    assert_eq!(build[0].1["version"], env!("CARGO_PKG_VERSION"));
    assert!(build[0].1.contains_key("git_commit") && build[0].1.contains_key("rustc"));
    assert_eq!(m.value("tortie_datastore_synced"), 1.0);
    assert_eq!(m.value("tortie_apiserver_connected"), 1.0);
    assert_eq!(m.families["process_cpu_seconds_total"].0, "counter");
    assert!(m.value("process_cpu_seconds_total") > 0.0);
    // The start-up steps left their marks: address published, CNI installed, MTU chosen.
    assert_eq!(m.value("felix_cluster_num_hosts"), 1.0);
    assert_eq!(
        m.value("tortie_pod_mtu_bytes"),
        m.value("tortie_host_mtu_bytes")
    );
    let node = Api::<k8s_openapi::api::core::v1::Node>::all(cp.client())
        .get("node-a")
        .await
        .expect("node");
    assert_eq!(
        node.metadata.annotations.expect("annotations")["projectcalico.org/IPv4Address"],
        format!("{}/30", host.ns_ip)
    );
    for file in ["bin/tortie", "bin/tortie-ipam", "net.d/10-tortie.conflist"] {
        assert!(daemon.dir.join(file).exists(), "{file} not installed");
    }
    let scraped_rss = m.value("process_resident_memory_bytes");

    // Idle footprint once connected, after start-up allocations have settled.
    std::thread::sleep(Duration::from_secs(2));
    let rss = daemon.resident_bytes();
    eprintln!(
        "tortie node idle RSS connected to the API server: {:.1} MiB (scraped {:.1} MiB)",
        rss as f64 / 1048576.0,
        scraped_rss / 1048576.0
    );
    assert!(
        (scraped_rss - rss as f64).abs() < 16.0 * 1048576.0,
        "scraped RSS {scraped_rss} far from /proc {rss}"
    );
    assert!(
        rss < 50_000_000,
        "idle RSS {rss} B exceeds the 50 MB budget"
    );

    let (status, took) = daemon.terminate();
    let log = daemon.log();
    assert_eq!(status.code(), Some(0), "exit status {status}:\n{log}");
    assert!(took < EXIT_BUDGET, "took {took:?} to exit:\n{log}");
    eprintln!(
        "tortie node exited 0 in {} ms after SIGTERM",
        took.as_millis()
    );
    assert!(log.contains("datastore synced"), "{log}");
    assert!(!log.contains("does not exist (check NODENAME)"), "{log}");
}

#[tokio::test]
async fn node_waits_for_rbac_then_reports_a_lost_api_server() {
    let host = Host::new("nd-b").expect("host");
    let cp = ControlPlane::start_on(host.root_ip.into())
        .await
        .expect("control plane");
    let user = "system:serviceaccount:kube-system:tortie-test";
    let kubeconfig = cp.kubeconfig_for(user, &[]).expect("kubeconfig");
    let mut daemon = Node::start(&host, &kubeconfig, "node-b");

    // Without permissions the daemon is up (alive) but not ready, and says why.
    // Each watch reports its own failure when its first list is refused: wait for both.
    let forbidden = [
        "list failed: 403 Forbidden: nodes is forbidden",
        "list failed: 403 Forbidden: ippools.crd.projectcalico.org is forbidden",
    ];
    let (_, reason) = daemon.wait_readiness(Duration::from_secs(30), |code, body| {
        code == 503 && forbidden.iter().all(|f| body.contains(f))
    });
    assert!(
        reason.starts_with("datastore not synced: watching "),
        "{reason}"
    );
    for line in forbidden.into_iter().chain([cp.url()]) {
        assert!(reason.contains(line), "{line:?} missing from {reason}");
    }
    assert_eq!(daemon.health("/liveness").map(|r| r.0), Ok(200));
    assert_eq!(daemon.metrics().value("tortie_datastore_synced"), 0.0);
    assert_eq!(daemon.metrics().value("tortie_apiserver_connected"), 0.0);
    // The plugin binaries are installed first thing, but kubelet must not see a network
    // config (and call the plugin) while the daemon cannot serve ADDs.
    let conflist = daemon.dir.join("net.d/10-tortie.conflist");
    assert!(
        daemon.dir.join("bin/tortie").exists(),
        "plugin not installed early"
    );
    assert!(
        !conflist.exists(),
        "conflist written before the daemon is ready"
    );

    grant_access(&cp, user).await;
    // Synced now, but a wrong NODENAME keeps the node from establishing its identity.
    let (_, reason) = daemon.wait_readiness(Duration::from_secs(40), |code, body| {
        code == 503 && !body.contains("datastore") && body.contains("node identity")
    });
    assert!(reason.contains("node-b"), "{reason}");
    assert_eq!(daemon.metrics().value("tortie_apiserver_connected"), 1.0);
    assert!(
        !conflist.exists(),
        "conflist written before the daemon is ready"
    );
    cp.create_node("node-b", &[]).await.expect("node");
    daemon.wait_readiness(Duration::from_secs(40), |code, _| code == 200);
    assert!(
        conflist.exists(),
        "conflist missing once the daemon is ready"
    );

    // The API server goes away: still synced (stores keep their data), but not connected.
    drop(cp);
    let (_, reason) = daemon.wait_readiness(Duration::from_secs(30), |code, body| {
        code == 503 && body.contains("datastore disconnected")
    });
    assert!(reason.contains("onnect"), "{reason}");
    eprintln!("readiness after losing the API server: {reason}");
    let m = daemon.metrics();
    assert_eq!(m.value("tortie_apiserver_connected"), 0.0);
    assert_eq!(m.value("tortie_datastore_synced"), 1.0);

    let (status, took) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{status}:\n{}", daemon.log());
    assert!(took < EXIT_BUDGET, "took {took:?}");
}

/// What the daemon needs: read the cluster, annotate its Node and pods, write IPAM objects,
/// hold the leader Lease.
async fn grant_access(cp: &ControlPlane, user: &str) {
    let name = "tortie-node-test";
    let rule = |group: &str, resource: &str, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    };
    let read = ["get", "list", "watch"];
    let write = [
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        rules: Some(vec![
            rule("", "nodes", &["get", "list", "watch", "patch"]),
            rule("", "pods", &["get", "list", "watch", "patch"]),
            rule("", "namespaces", &read),
            rule("crd.projectcalico.org", "*", &write),
            rule("coordination.k8s.io", "leases", &write),
        ]),
        ..Default::default()
    };
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: name.into(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: user.into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        }]),
    };
    let pp = PostParams::default();
    Api::<ClusterRole>::all(cp.client())
        .create(&pp, &role)
        .await
        .expect("create ClusterRole");
    Api::<ClusterRoleBinding>::all(cp.client())
        .create(&pp, &binding)
        .await
        .expect("create ClusterRoleBinding");
}

#[test]
fn unreachable_api_server_keeps_readiness_503_with_the_reason() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    \
             server: https://127.0.0.1:{closed}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    \
             cluster: c\n    user: u\ncurrent-context: x\n"
        ),
    )
    .expect("write kubeconfig");
    let host = Host::new("nd-c").expect("host");
    let mut daemon = Node::start(&host, &kubeconfig, "node-c");

    let (_, reason) = daemon.wait_readiness(Duration::from_secs(20), |code, body| {
        code == 503 && body.contains("onnect")
    });
    assert!(reason.contains(&format!("127.0.0.1:{closed}")), "{reason}");
    assert!(reason.contains("Connection refused"), "{reason}");
    // Retries go on, readiness never turns 200, liveness stays 200.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(daemon.readiness().map(|r| r.0), Ok(503));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(daemon.health("/liveness").map(|r| r.0), Ok(200));
    assert!(
        daemon.log().matches("watch failed").count() >= 4,
        "{}",
        daemon.log()
    );
    assert_eq!(daemon.metrics().value("tortie_apiserver_connected"), 0.0);

    let (status, took) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(took < EXIT_BUDGET, "took {took:?}");
}

#[test]
fn missing_node_name_fails_fast_naming_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_tortie"))
        .arg("node")
        .env_clear()
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .expect("run tortie node");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NODENAME"), "{stderr}");
}

#[test]
fn version_names_build_and_json_logs_are_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_tortie"))
        .arg("version")
        .output()
        .expect("run tortie version");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("tortie {}\n", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(
        text.contains("rustc: 1.") && text.contains("target: "),
        "{text}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_tortie"))
        .args(["--log-format", "json", "node"])
        .env_clear()
        .env("NODENAME", "UPPER")
        .output()
        .expect("run tortie node");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value = serde_json::from_str(stderr.lines().next().expect("a log line"))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!(line["level"], "ERROR");
    assert!(
        line["error"].as_str().is_some_and(|e| e.contains("UPPER")),
        "{line}"
    );
}
