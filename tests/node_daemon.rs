// `tortie node` as a process against a real kube-apiserver: readiness follows the watches
// (503 with the reason, then 200), /metrics is valid Prometheus text, SIGTERM ends it with
// exit 0 within 2 s, and an unreachable or lost API server is reported, not hidden.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::ControlPlane;

/// A DaemonSet rollout gives the old pod this long; the daemon must be gone by then.
const EXIT_BUDGET: Duration = Duration::from_secs(2);

/// `tortie node` on loopback ports; killed and reaped on Drop.
struct Daemon {
    child: Child,
    health: u16,
    metrics: u16,
    log: tempfile::NamedTempFile,
}

impl Daemon {
    fn start(kubeconfig: &Path, node_name: &str) -> Daemon {
        let [health, metrics] = free_ports();
        let log = tempfile::NamedTempFile::new().expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tortie"));
        cmd.arg("node")
            .env_clear()
            .env("KUBECONFIG", kubeconfig)
            .env("NODENAME", node_name)
            .env("TORTIE_HEALTH_ADDR", "127.0.0.1")
            .env("TORTIE_HEALTH_PORT", health.to_string())
            .env("TORTIE_METRICS_ADDR", "127.0.0.1")
            .env("TORTIE_METRICS_PORT", metrics.to_string())
            .env("TORTIE_LOG_LEVEL", "info,tortie=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log handle"));
        // SAFETY: prctl is async-signal-safe; it makes the daemon die with this test thread.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn tortie node");
        Daemon {
            child,
            health,
            metrics,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn readiness(&self) -> Result<(u16, String), String> {
        http_get(self.health, "/readiness")
    }

    fn metrics(&self) -> Exposition {
        let (status, body) = http_get(self.metrics, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        parse_exposition(&body).unwrap_or_else(|e| panic!("/metrics is not valid: {e}\n{body}"))
    }

    /// Polls /readiness until `want(status, body)` holds, returning the last answer.
    fn wait_readiness(
        &mut self,
        timeout: Duration,
        want: impl Fn(u16, &str) -> bool,
    ) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        let mut last = Err("no answer yet".to_owned());
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tortie node exited early ({status}):\n{}", self.log());
            }
            last = self.readiness();
            if let Ok((code, body)) = &last
                && want(*code, body)
            {
                return (*code, body.clone());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "readiness never reached the wanted state in {timeout:?}; last answer {last:?}\n{}",
            self.log()
        );
    }

    /// SIGTERM, then waits (up to 10 s) for the exit; returns the status and how long it took.
    fn terminate(&mut self) -> (ExitStatus, Duration) {
        let t0 = Instant::now();
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
        while t0.elapsed() < Duration::from_secs(10) {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("tortie node ignored SIGTERM for 10 s:\n{}", self.log());
    }

    fn resident_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line");
        kib * 1024
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_ports() -> [u16; 2] {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    [
        a.local_addr().expect("addr").port(),
        b.local_addr().expect("addr").port(),
    ]
}

/// A minimal HTTP/1.1 GET on loopback (status code and body); Err while nothing listens.
fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no end of headers")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((code, body.to_owned()))
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
    let cp = ControlPlane::start().await.expect("control plane");
    cp.create_node("node-a", &[]).await.expect("node");
    let mut daemon = Daemon::start(cp.kubeconfig_path(), "node-a");

    let (_, body) = daemon.wait_readiness(Duration::from_secs(30), |code, _| code == 200);
    assert_eq!(body, "ok\n");
    assert_eq!(
        http_get(daemon.health, "/liveness"),
        Ok((200, "ok\n".to_owned()))
    );
    assert_eq!(http_get(daemon.health, "/nope").map(|r| r.0), Ok(404));

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
    let cp = ControlPlane::start().await.expect("control plane");
    let user = "system:serviceaccount:kube-system:tortie-test";
    let kubeconfig = cp.kubeconfig_for(user, &[]).expect("kubeconfig");
    let mut daemon = Daemon::start(&kubeconfig, "node-b");

    // Without permissions the daemon is up (alive) but not ready, and says why.
    let (_, reason) = daemon.wait_readiness(Duration::from_secs(30), |code, body| {
        code == 503 && body.contains("forbidden")
    });
    assert!(
        reason.starts_with("datastore not synced: watching nodes on "),
        "{reason}"
    );
    for line in [
        "list failed: 403 Forbidden: nodes is forbidden",
        "list failed: 403 Forbidden: ippools.crd.projectcalico.org is forbidden",
        cp.url(),
    ] {
        assert!(reason.contains(line), "{line:?} missing from {reason}");
    }
    assert_eq!(http_get(daemon.health, "/liveness").map(|r| r.0), Ok(200));
    assert_eq!(daemon.metrics().value("tortie_datastore_synced"), 0.0);
    assert_eq!(daemon.metrics().value("tortie_apiserver_connected"), 0.0);

    grant_read_access(&cp, user).await;
    daemon.wait_readiness(Duration::from_secs(40), |code, _| code == 200);
    assert_eq!(daemon.metrics().value("tortie_apiserver_connected"), 1.0);
    assert!(daemon.log().contains("does not exist (check NODENAME)"));

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

async fn grant_read_access(cp: &ControlPlane, user: &str) {
    let name = "tortie-node-test";
    let rule = |group: &str, resource: &str| PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: ["get", "list", "watch"].map(String::from).to_vec(),
        ..Default::default()
    };
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        rules: Some(vec![
            rule("", "nodes"),
            rule("crd.projectcalico.org", "ippools"),
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
    let mut daemon = Daemon::start(&kubeconfig, "node-c");

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
    assert_eq!(http_get(daemon.health, "/liveness").map(|r| r.0), Ok(200));
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
