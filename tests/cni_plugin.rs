//! The real `tortie` binary run as a CNI plugin: exit status, error JSON (`code`, `msg`) for
//! bad invocations, and forwarding to a daemon socket served in-test by the protocol's own
//! server helpers, with the result converted to the runtime's cniVersion.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tortie::cni::protocol::{self, ReceivedRequest, Response};
use tortie::cni::{CniError, CniResult, PluginKind};

const HOST_NETNS: &str = "/proc/self/ns/net";

struct Run {
    success: bool,
    stdout: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }
}

/// Runs the plugin binary under `argv0` with exactly `env` (nothing inherited) and `stdin`.
fn run_plugin(argv0: &str, env: &[(&str, &str)], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tortie"))
        .arg0(argv0)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn plugin");
    // A plugin that exits before reading stdin (VERSION) closes the pipe: ignore EPIPE.
    let _ = child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(stdin.as_bytes());
    let out = child.wait_with_output().expect("plugin runs");
    Run {
        success: out.status.success(),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
    }
}

fn add_env(netns: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "0123456789abcdef"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=0123456789abcdef;K8S_POD_UID=9f1c",
        ),
    ]
}

fn conf(version: &str, socket: &Path) -> String {
    json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "tortie",
        "mtu": 1450,
        "ipam": {"type": "tortie-ipam"},
        "socket": socket,
    })
    .to_string()
}

fn assert_error(run: &Run, code: u64, msg_part: &str) -> Value {
    assert!(!run.success, "plugin succeeded: {}", run.stdout);
    let v = run.json();
    assert_eq!(v["code"], code, "{v}");
    let msg = v["msg"].as_str().expect("msg is a string");
    assert!(msg.contains(msg_part), "msg {msg:?} lacks {msg_part:?}");
    assert!(v["cniVersion"].is_string(), "{v}");
    v
}

/// The daemon's canned ADD result, in the current shape.
fn canned_result() -> CniResult {
    serde_json::from_value(json!({
        "interfaces": [
            {"name": "cali0123456789a", "mac": "ee:ee:ee:ee:ee:ee", "mtu": 1450},
            {"name": "eth0", "mac": "5a:0b:7e:00:00:01", "mtu": 1450, "sandbox": HOST_NETNS}
        ],
        "ips": [
            {"address": "10.244.1.5/32", "interface": 1},
            {"address": "fd00:10:244::5/128", "interface": 1}
        ],
        "routes": [
            {"dst": "0.0.0.0/0", "gw": "169.254.1.1", "mtu": 1450},
            {"dst": "::/0"}
        ]
    }))
    .expect("canned result")
}

/// A one-shot daemon on a socket in a temp dir, answering with the protocol's server helpers.
struct FakeDaemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    thread: JoinHandle<ReceivedRequest>,
}

impl FakeDaemon {
    fn start(answer: impl FnOnce(&ReceivedRequest) -> Option<Response> + Send + 'static) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("cni.sock");
        let listener = UnixListener::bind(&socket).expect("bind socket");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "plugin never connected");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            stream.set_nonblocking(false).expect("blocking stream");
            let received = protocol::read_request(&stream).expect("read request");
            match answer(&received) {
                Some(response) => protocol::write_response(&stream, &response).expect("answer"),
                // Stay silent past the plugin's timeout, then hang up.
                None => std::thread::sleep(Duration::from_millis(2500)),
            }
            received
        });
        FakeDaemon {
            _dir: dir,
            socket,
            thread,
        }
    }

    fn request(self) -> ReceivedRequest {
        self.thread.join().expect("fake daemon thread")
    }
}

fn same_namespace(fd: &File, path: &str) -> bool {
    let (a, b) = (fd.metadata().unwrap(), std::fs::metadata(path).unwrap());
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[test]
fn version_reports_supported_versions() {
    let run = run_plugin("tortie", &[("CNI_COMMAND", "VERSION")], "");
    assert!(run.success);
    assert_eq!(
        run.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[test]
fn stdin_that_is_not_json_is_a_decoding_failure() {
    let run = run_plugin("tortie", &add_env(HOST_NETNS), "this is not json");
    assert_error(&run, 6, "not JSON");
}

#[test]
fn add_without_cni_netns_is_invalid_environment() {
    let env: Vec<_> = add_env(HOST_NETNS)
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let run = run_plugin("tortie", &env, &conf("1.0.0", Path::new("/run/x.sock")));
    let v = assert_error(&run, 4, "CNI_NETNS");
    assert_eq!(v["cniVersion"], "1.0.0");
}

#[test]
fn unknown_cni_version_is_incompatible() {
    let run = run_plugin(
        "tortie",
        &add_env(HOST_NETNS),
        &conf("9.9.9", Path::new("/run/x.sock")),
    );
    assert_error(&run, 1, "9.9.9");
}

#[test]
fn gc_with_1_0_0_config_is_incompatible() {
    let run = run_plugin(
        "tortie",
        &[("CNI_COMMAND", "GC")],
        &conf("1.0.0", Path::new("/run/x.sock")),
    );
    assert_error(&run, 1, "GC");
}

#[test]
fn add_into_a_netns_path_that_does_not_exist_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let netns = dir.path().join("cni-gone");
    let netns = netns.to_str().unwrap();
    let run = run_plugin(
        "tortie",
        &add_env(netns),
        &conf("1.0.0", &dir.path().join("cni.sock")),
    );
    let v = assert_error(&run, 4, netns);
    assert!(v["msg"].as_str().unwrap().contains("CNI_NETNS"), "{v}");
}

#[test]
fn absent_daemon_socket_is_try_again_later_and_names_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let run = run_plugin("tortie", &add_env(HOST_NETNS), &conf("1.0.0", &socket));
    assert_error(&run, 11, socket.to_str().unwrap());
}

#[test]
fn add_result_is_forwarded_and_printed_as_1_1_0() {
    let daemon = FakeDaemon::start(|_| {
        Some(Response::Ok {
            result: Some(canned_result()),
        })
    });
    let run = run_plugin(
        "tortie",
        &add_env(HOST_NETNS),
        &conf("1.1.0", &daemon.socket),
    );
    let received = daemon.request();
    assert!(run.success, "{}", run.stdout);

    let req = &received.request;
    assert_eq!(req.command, tortie::cni::Command::Add);
    assert_eq!(req.kind, PluginKind::Main);
    assert_eq!(req.container_id.as_deref(), Some("0123456789abcdef"));
    assert_eq!(req.ifname.as_deref(), Some("eth0"));
    assert_eq!(req.args.k8s_pod_namespace.as_deref(), Some("shop"));
    assert_eq!(req.args.k8s_pod_name.as_deref(), Some("web-0"));
    assert_eq!(req.args.k8s_pod_uid.as_deref(), Some("9f1c"));
    assert_eq!(req.raw_config["mtu"], 1450);
    assert!(req.netns_fd);
    let fd = File::from(received.netns.expect("netns descriptor passed"));
    assert!(same_namespace(&fd, HOST_NETNS));

    let out = run.json();
    assert_eq!(out["cniVersion"], "1.1.0");
    assert_eq!(out["interfaces"][1]["mtu"], 1450);
    assert_eq!(out["ips"][0]["address"], "10.244.1.5/32");
    assert!(out["ips"][0].get("version").is_none());
    assert_eq!(out["routes"][0]["mtu"], 1450);
}

#[test]
fn add_result_is_converted_to_0_3_1() {
    let daemon = FakeDaemon::start(|_| {
        Some(Response::Ok {
            result: Some(canned_result()),
        })
    });
    let run = run_plugin(
        "tortie",
        &add_env(HOST_NETNS),
        &conf("0.3.1", &daemon.socket),
    );
    let received = daemon.request();
    assert!(run.success, "{}", run.stdout);
    assert_eq!(received.request.cni_version.as_str(), "0.3.1");

    let out = run.json();
    assert_eq!(out["cniVersion"], "0.3.1");
    assert_eq!(out["ips"][0]["version"], "4");
    assert_eq!(out["ips"][1]["version"], "6");
    assert_eq!(out["ips"][1]["interface"], 1);
    assert!(out["interfaces"][1].get("mtu").is_none(), "{out}");
    assert!(out["routes"][0].get("mtu").is_none(), "{out}");
    assert_eq!(out["routes"][0]["gw"], "169.254.1.1");
}

#[test]
fn ipam_plugin_forwards_as_ipam_and_prints_no_interfaces() {
    let daemon = FakeDaemon::start(|_| {
        Some(Response::Ok {
            result: Some(canned_result()),
        })
    });
    let run = run_plugin(
        "tortie-ipam",
        &add_env(HOST_NETNS),
        &conf("1.0.0", &daemon.socket),
    );
    let received = daemon.request();
    assert!(run.success, "{}", run.stdout);
    assert_eq!(received.request.kind, PluginKind::Ipam);
    assert!(!received.request.netns_fd);
    let out = run.json();
    assert!(out.get("interfaces").is_none(), "{out}");
    assert!(out["ips"][0].get("interface").is_none(), "{out}");
    assert_eq!(out["routes"][1]["dst"], "::/0");
}

#[test]
fn daemon_error_reaches_the_runtime_unchanged() {
    let daemon = FakeDaemon::start(|_| {
        Some(Response::Error {
            error: CniError::new(
                107,
                "pool \"external-pool\" (172.16.0.0/26) has no free address",
            ),
        })
    });
    let run = run_plugin(
        "tortie",
        &add_env(HOST_NETNS),
        &conf("0.4.0", &daemon.socket),
    );
    daemon.request();
    let v = assert_error(&run, 107, "external-pool");
    assert_eq!(v["cniVersion"], "0.4.0");
}

#[test]
fn del_with_vanished_netns_is_forwarded_without_descriptor() {
    let daemon = FakeDaemon::start(|_| Some(Response::Ok { result: None }));
    let mut env = add_env("/var/run/netns/tortie-test-vanished");
    env[0] = ("CNI_COMMAND", "DEL");
    let mut config: Value = serde_json::from_str(&conf("1.0.0", &daemon.socket)).unwrap();
    config["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "ips": [{"address": "10.244.1.5/32"}]
    });
    let run = run_plugin("tortie", &env, &config.to_string());
    let received = daemon.request();
    assert!(run.success, "{}", run.stdout);
    assert!(run.stdout.trim().is_empty(), "DEL printed {:?}", run.stdout);
    assert!(!received.request.netns_fd);
    assert!(received.netns.is_none());
    let prev = received.request.prev_result.expect("prevResult forwarded");
    assert_eq!(prev.ips[0].address.to_string(), "10.244.1.5/32");
}

#[test]
fn gc_forwards_valid_attachments() {
    let daemon = FakeDaemon::start(|_| Some(Response::Ok { result: None }));
    let mut config: Value = serde_json::from_str(&conf("1.1.0", &daemon.socket)).unwrap();
    config["cni.dev/valid-attachments"] = json!([{"containerID": "keep-me", "ifname": "eth0"}]);
    let run = run_plugin(
        "tortie",
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &config.to_string(),
    );
    let received = daemon.request();
    assert!(run.success, "{}", run.stdout);
    assert!(run.stdout.trim().is_empty());
    assert_eq!(received.request.valid_attachments.len(), 1);
    assert_eq!(
        received.request.valid_attachments[0].container_id,
        "keep-me"
    );
}

#[test]
fn silent_daemon_times_out_as_try_again_later() {
    let daemon = FakeDaemon::start(|_| None);
    let mut config: Value = serde_json::from_str(&conf("1.0.0", &daemon.socket)).unwrap();
    config["timeout_seconds"] = json!(1);
    let start = Instant::now();
    let run = run_plugin("tortie", &add_env(HOST_NETNS), &config.to_string());
    let took = start.elapsed();
    daemon.request();
    assert_error(&run, 11, "did not answer ADD");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "took {took:?}"
    );
}
