// `tortie node` as a process against a real kube-apiserver: readiness follows the watches
// (503 with the reason, then 200), /metrics is valid Prometheus text, SIGTERM ends it with
// exit 0 within 2 s, an unreachable or lost API server is reported, not hidden, and the
// CNI conflist never exists while STATUS through the plugin would fail.

mod nodes;
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
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

    // The host MTU follows a NIC change through link events (no timer): a NIC-named link
    // appears at 1500, then drops to 1400; new pods would get the new value at once.
    for cmd in [
        "ip link add eth9 mtu 1500 type veth peer name eth9p mtu 1500",
        "ip link set eth9p up",
        "ip link set eth9 up",
    ] {
        host.ns
            .exec_ok(&cmd.split(' ').collect::<Vec<_>>())
            .expect(cmd);
    }
    let host_mtu_becomes = |want: f64| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if daemon.metrics().value("tortie_host_mtu_bytes") == want {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "host MTU metric not {want} after 3 s: {}",
            daemon.metrics().value("tortie_host_mtu_bytes")
        );
    };
    let took = host_mtu_becomes(1500.0);
    host.ns
        .exec_ok(&["ip", "link", "set", "eth9", "mtu", "1400"])
        .expect("set mtu");
    let took2 = host_mtu_becomes(1400.0);
    eprintln!("host MTU change seen in {took:?} (new NIC) and {took2:?} (MTU lowered)");
    assert_eq!(daemon.metrics().value("tortie_pod_mtu_bytes"), 1400.0);

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

/// Kubelet finds the network through the conflist and then calls the plugin, so the conflist
/// must never exist while STATUS through the plugin would fail. A watcher polls the config
/// dir every millisecond and checks the file the moment it appears; a prober runs STATUS
/// while it is absent, to show the not-ready window is real and not merely assumed.
#[tokio::test]
async fn conflist_appears_only_when_status_says_ready() {
    let host = Host::new("nd-d").expect("host");
    let cp = ControlPlane::start_on(host.root_ip.into())
        .await
        .expect("control plane");
    // No RBAC and no Node yet: the datastore cannot sync, so the socket cannot serve.
    let user = "system:serviceaccount:kube-system:tortie-test";
    let kubeconfig = cp.kubeconfig_for(user, &[]).expect("kubeconfig");
    let mut daemon = Node::start(&host, &kubeconfig, "node-d");
    let mut watch = ConflistWatch::start(&daemon.dir);

    let forbidden = "list failed: 403 Forbidden: nodes is forbidden";
    daemon.wait_readiness(Duration::from_secs(30), |code, body| {
        code == 503 && body.contains(forbidden)
    });
    // Let the prober see the blocked daemon a few times before it may become ready.
    let until = Instant::now() + Duration::from_secs(20);
    while watch.blocked_answers() < 3 {
        assert!(Instant::now() < until, "no STATUS answer while blocked");
        std::thread::sleep(Duration::from_millis(20));
    }

    watch.unblock();
    let unblocked_at = Instant::now();
    cp.create_node("node-d", &[]).await.expect("node");
    grant_access(&cp, user).await;
    let sighting = watch
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no conflist within 60 s:\n{}", daemon.log()));
    let (ready, _) = daemon.wait_readiness(Duration::from_secs(5), |code, _| code == 200);
    assert_eq!(ready, 200);
    let readiness_after = sighting.seen.elapsed();
    let polls = sighting.polls;
    let ProbeLog { probes, text_busy } = watch.finish();

    // The file was complete the first time it could be read, and names our socket.
    let list = sighting
        .parsed
        .unwrap_or_else(|e| panic!("conflist not complete JSON when first seen: {e}"));
    assert_eq!(list["name"], "k8s-pod-network", "{list}");
    assert_eq!(list["plugins"][0]["type"], "tortie", "{list}");
    assert_eq!(
        list["plugins"][0]["socket"],
        daemon.dir.join("run/cni.sock").display().to_string(),
        "{list}"
    );
    // No fixed MTU in the conflist: the daemon gives each new pod the live pod MTU
    // (FelixConfiguration, host MTU, pools), which the metric shows.
    assert_eq!(list["plugins"][0]["mtu"].as_u64(), Some(0), "{list}");
    assert!(daemon.metrics().value("tortie_pod_mtu_bytes") >= 1280.0);
    // ... and STATUS with exactly that configuration succeeded at once.
    if let Err((code, msg)) = &sighting.status {
        panic!(
            "conflist present but STATUS failed with {code}: {msg}\n{}",
            daemon.log()
        );
    }

    // Every STATUS while blocked: the spec's "plugin not available", naming the socket.
    let blocked: Vec<&Probe> = probes.iter().filter(|p| p.blocked).collect();
    for p in &blocked {
        match &p.answer {
            Err((50, msg)) => assert!(msg.contains("cni.sock"), "{msg}"),
            other => panic!("STATUS while the daemon was blocked answered {other:?}"),
        }
    }
    // After unblocking and before the conflist, STATUS may turn ready (the socket serves
    // before the first dataplane apply) but any failure is still "not available".
    let waiting: Vec<&Probe> = probes.iter().filter(|p| !p.blocked).collect();
    for p in &waiting {
        assert!(
            matches!(p.answer, Ok(()) | Err((50, _))),
            "STATUS before the conflist answered {:?}",
            p.answer
        );
    }
    let ok_early = waiting.iter().filter(|p| p.answer.is_ok()).count();
    eprintln!(
        "conflist: {} not-ready STATUS answers while blocked, {} after unblocking ({} ok) \
         before it appeared; appeared {} ms after unblocking; watcher polled {polls} times; \
         STATUS ok {} ms after it was seen; readiness 200 within {} ms; temp file seen: {}; \
         plugin busy (ETXTBSY) {text_busy} times before the conflist",
        blocked.len(),
        waiting.len(),
        ok_early,
        sighting.seen.duration_since(unblocked_at).as_millis(),
        sighting.status_took.as_millis(),
        readiness_after.as_millis(),
        sighting.saw_temp,
    );
    assert_eq!(
        text_busy, 0,
        "the installed plugin could not be executed (ETXTBSY): still open for writing"
    );

    let (status, took) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "{status}:\n{}", daemon.log());
    assert!(took < EXIT_BUDGET, "took {took:?}");
}

/// The watcher above must be able to fail: a conflist naming a socket nobody serves, and one
/// written in two steps, are both caught (plugin linked in, no daemon, no control plane).
#[test]
fn conflist_watch_catches_an_unserved_or_partial_config() {
    let conflist = serde_json::json!({
        "name": "k8s-pod-network",
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "plugins": [{"type": "tortie", "mtu": 1450, "socket": "/nonexistent/tortie/cni.sock",
                     "ipam": {"type": "tortie-ipam"}}],
    })
    .to_string();
    let prepared = || {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("bin")).expect("bin dir");
        std::fs::create_dir_all(dir.path().join("net.d")).expect("conf dir");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tortie"), dir.path().join("bin/tortie"))
            .expect("plugin link");
        dir
    };

    let dir = prepared();
    let mut watch = ConflistWatch::start(dir.path());
    // Atomically, so only the missing daemon can be what is caught.
    let temp = dir.path().join("net.d/.conflist-being-written");
    std::fs::write(&temp, &conflist).expect("write");
    std::fs::rename(&temp, dir.path().join("net.d/10-tortie.conflist")).expect("rename");
    let s = watch.wait(Duration::from_secs(10)).expect("sighting");
    assert!(s.parsed.is_ok(), "{:?}", s.parsed);
    match s.status {
        Err((50, msg)) => assert!(msg.contains("/nonexistent/tortie/cni.sock"), "{msg}"),
        other => panic!("STATUS without a daemon answered {other:?}"),
    }
    drop(watch);

    let dir = prepared();
    let mut watch = ConflistWatch::start(dir.path());
    let mut file =
        std::fs::File::create(dir.path().join("net.d/10-tortie.conflist")).expect("create");
    let (head, tail) = conflist.split_at(conflist.len() / 2);
    file.write_all(head.as_bytes()).expect("head");
    std::thread::sleep(Duration::from_millis(50));
    file.write_all(tail.as_bytes()).expect("tail");
    let s = watch.wait(Duration::from_secs(10)).expect("sighting");
    assert!(
        s.parsed.is_err(),
        "a half-written conflist was read as complete"
    );
}

/// The watcher stops looking after this long even if nobody stops it.
const WATCH_BACKSTOP: Duration = Duration::from_secs(180);

/// One STATUS run while the conflist was absent.
#[derive(Debug)]
struct Probe {
    /// Answered before the test let the daemon become ready.
    blocked: bool,
    answer: Result<(), (u64, String)>,
}

/// The prober's record: its answers, and how often the fresh binary was still busy.
#[derive(Debug, Default)]
struct ProbeLog {
    probes: Vec<Probe>,
    text_busy: usize,
}

/// What the watcher found the moment the conflist appeared.
struct Sighting {
    seen: Instant,
    polls: u64,
    parsed: Result<serde_json::Value, String>,
    status: Result<(), (u64, String)>,
    status_took: Duration,
    /// Whether a poll caught the writer's temp file (atomic write in progress).
    saw_temp: bool,
}

/// The watcher and prober threads; stopped and joined on Drop, so a failing test leaves none.
struct ConflistWatch {
    stop: Arc<AtomicBool>,
    unblocked: Arc<AtomicBool>,
    blocked_answers: Arc<AtomicUsize>,
    sighting: mpsc::Receiver<Sighting>,
    watcher: Option<JoinHandle<()>>,
    prober: Option<JoinHandle<ProbeLog>>,
    probe_log: Option<ProbeLog>,
}

impl ConflistWatch {
    fn start(dir: &Path) -> ConflistWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let unblocked = Arc::new(AtomicBool::new(false));
        let blocked_answers = Arc::new(AtomicUsize::new(0));
        let (tx, sighting) = mpsc::channel();
        let watcher = {
            let (dir, stop) = (dir.to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                if let Some(s) = watch_conflist(&dir, &stop) {
                    let _ = tx.send(s);
                }
            })
        };
        let prober = {
            let (dir, stop) = (dir.to_path_buf(), stop.clone());
            let (unblocked, count) = (unblocked.clone(), blocked_answers.clone());
            std::thread::spawn(move || probe_status(&dir, &stop, &unblocked, &count))
        };
        ConflistWatch {
            stop,
            unblocked,
            blocked_answers,
            sighting,
            watcher: Some(watcher),
            prober: Some(prober),
            probe_log: None,
        }
    }

    /// STATUS answers given while blocked so far; a panic in the prober is re-raised here.
    fn blocked_answers(&mut self) -> usize {
        if self.prober.as_ref().is_some_and(JoinHandle::is_finished) {
            self.join_prober();
        }
        self.blocked_answers.load(Ordering::SeqCst)
    }

    /// From now on probes count as "after unblocking".
    fn unblock(&self) {
        self.unblocked.store(true, Ordering::SeqCst);
    }

    /// The watcher's sighting; a panic in the watcher is re-raised here.
    fn wait(&mut self, timeout: Duration) -> Option<Sighting> {
        match self.sighting.recv_timeout(timeout) {
            Ok(s) => Some(s),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(Err(panic)) = self.watcher.take().map(JoinHandle::join) {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }

    /// Stops both threads and returns the prober's record.
    fn finish(mut self) -> ProbeLog {
        self.stop.store(true, Ordering::SeqCst);
        self.join_prober();
        self.probe_log.take().expect("prober joined")
    }

    fn join_prober(&mut self) {
        if let Some(prober) = self.prober.take() {
            let log = prober
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            self.probe_log = Some(log);
        }
    }
}

impl Drop for ConflistWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A thread's panic was re-raised already, or the test is failing for another reason.
        if let Some(h) = self.watcher.take() {
            let _ = h.join();
        }
        if let Some(h) = self.prober.take() {
            let _ = h.join();
        }
    }
}

/// Polls `<dir>/net.d` every millisecond; the first successful read of the conflist is
/// checked at once: complete JSON, then STATUS with exactly its plugin configuration.
fn watch_conflist(dir: &Path, stop: &AtomicBool) -> Option<Sighting> {
    let conf_dir = dir.join("net.d");
    let conflist = conf_dir.join("10-tortie.conflist");
    let started = Instant::now();
    let (mut polls, mut saw_temp) = (0u64, false);
    loop {
        if stop.load(Ordering::SeqCst) || started.elapsed() > WATCH_BACKSTOP {
            return None;
        }
        polls += 1;
        // Open-and-read, not exists-then-read: whatever is first readable is what is judged.
        match std::fs::read(&conflist) {
            Ok(bytes) => {
                let seen = Instant::now();
                let parsed = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .map_err(|e| format!("{e}: {:?}", String::from_utf8_lossy(&bytes)));
                let status = match &parsed {
                    // Kubelet would run the plugin now: failing to start it counts too.
                    Ok(list) => plugin_status(&dir.join("bin/tortie"), &netconf_of(list))
                        .unwrap_or_else(|e| Err((0, format!("plugin did not start: {e}")))),
                    Err(e) => Err((0, format!("not run: {e}"))),
                };
                return Some(Sighting {
                    seen,
                    polls,
                    parsed,
                    status,
                    status_took: seen.elapsed(),
                    saw_temp,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("reading {}: {e}", conflist.display()),
        }
        if let Ok(entries) = std::fs::read_dir(&conf_dir) {
            saw_temp |= entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains("tortie-tmp"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs STATUS every 20 ms with the netconf the conflist will hold, until the conflist exists.
fn probe_status(
    dir: &Path,
    stop: &AtomicBool,
    unblocked: &AtomicBool,
    blocked_answers: &AtomicUsize,
) -> ProbeLog {
    let plugin = dir.join("bin/tortie");
    let conflist = dir.join("net.d/10-tortie.conflist");
    let netconf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "k8s-pod-network",
        "type": "tortie",
        "mtu": 1500,
        "socket": dir.join("run/cni.sock"),
        "ipam": {"type": "tortie-ipam"},
    });
    let started = Instant::now();
    let mut log = ProbeLog::default();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < WATCH_BACKSTOP {
        // The binaries are installed first thing; before that there is nothing to run.
        if !plugin.exists() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if conflist.exists() {
            break;
        }
        let answer = match plugin_status(&plugin, &netconf) {
            Ok(answer) => answer,
            // Counted, then failed below: the installer must close the new binary before it
            // takes its name, or kubelet's first exec of it fails.
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                log.text_busy += 1;
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => panic!("run {}: {e}", plugin.display()),
        };
        // Read after the answer: "blocked" then means the whole exchange preceded unblocking.
        let blocked = !unblocked.load(Ordering::SeqCst);
        if blocked {
            blocked_answers.fetch_add(1, Ordering::SeqCst);
        }
        log.probes.push(Probe { blocked, answer });
        std::thread::sleep(Duration::from_millis(20));
    }
    log
}

/// A plugin's configuration as a runtime passes it: the list's first plugin with the list's
/// name and the highest version the list offers (libcni's negotiation).
fn netconf_of(list: &serde_json::Value) -> serde_json::Value {
    let parse = |v: &serde_json::Value| -> Option<(u32, u32, u32)> {
        let mut parts = v.as_str()?.split('.').map(|p| p.parse().ok());
        Some((parts.next()??, parts.next()??, parts.next()??))
    };
    let version = list["cniVersions"]
        .as_array()
        .and_then(|vs| vs.iter().max_by_key(|v| parse(v)))
        .unwrap_or(&list["cniVersion"])
        .clone();
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = version;
    conf["name"] = list["name"].clone();
    conf
}

/// CNI_COMMAND=STATUS through the installed plugin: Ok, or the CNI error's code and msg.
/// Err only when the plugin could not be started at all.
fn plugin_status(
    plugin: &Path,
    netconf: &serde_json::Value,
) -> std::io::Result<Result<(), (u64, String)>> {
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", "STATUS")
        .env("CNI_PATH", plugin.parent().expect("bin dir"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(netconf.to_string().as_bytes())
        .expect("netconf to the plugin");
    let out = child.wait_with_output().expect("plugin exit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        assert!(stdout.trim().is_empty(), "STATUS ok printed {stdout:?}");
        return Ok(Ok(()));
    }
    let error: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "STATUS failed ({}) without a CNI error ({e}): {stdout:?}",
            out.status
        )
    });
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let code = error["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no code: {stdout}"));
    Ok(Err((
        code,
        error["msg"].as_str().unwrap_or_default().to_owned(),
    )))
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
            rule("", "serviceaccounts", &read),
            rule("networking.k8s.io", "networkpolicies", &read),
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
