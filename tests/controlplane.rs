// The control-plane harness itself: it starts, serves the admin, enforces RBAC for everyone
// else, installs the repo's CRDs, and leaves no process or file behind (Drop or SIGKILL).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use support::ControlPlane;
use support::controlplane::{read_crds, reap_stale_dirs};
use support::process::pid_alive;

async fn namespace_names(client: Client) -> Result<Vec<String>, kube::Error> {
    let list = Api::<Namespace>::all(client)
        .list(&ListParams::default())
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect())
}

fn assert_forbidden(result: Result<Vec<String>, kube::Error>, who: &str) {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{who}: expected 403, got {status:?}")
        }
        other => panic!("{who}: expected 403 Forbidden, got {other:?}"),
    }
}

/// Any live process whose command line mentions `dir` (ours would, via --data-dir etc.).
fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) && pid_alive(pid) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

#[tokio::test]
async fn admin_lists_namespaces_and_every_repo_crd_is_established() {
    let cp = ControlPlane::start().await.unwrap();
    eprintln!("startup: {:?}", cp.startup_time());
    let names = namespace_names(cp.client()).await.unwrap();
    for ns in ["default", "kube-system", "kube-public"] {
        assert!(names.iter().any(|n| n == ns), "{ns} missing from {names:?}");
    }

    cp.create_namespace("tortie-test").await.unwrap();
    let node = cp.create_node("node-a", &[("zone", "z1")]).await.unwrap();
    assert_eq!(node.metadata.labels.unwrap()["zone"], "z1");
    assert!(
        namespace_names(cp.client())
            .await
            .unwrap()
            .contains(&"tortie-test".to_owned())
    );

    let crds = read_crds(&Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/crds")).unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(cp.client());
    for crd in crds {
        let name = crd.metadata.name.unwrap();
        let installed = api.get(&name).await.unwrap();
        let established = installed
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "CRD {name} is not Established");
    }

    // The admin kubeconfig file is what subprocesses get; it must carry the same rights.
    let kc = kube::config::Kubeconfig::read_from(cp.kubeconfig_path()).unwrap();
    assert_eq!(
        kc.clusters[0].cluster.as_ref().unwrap().server.as_deref(),
        Some(cp.url())
    );
}

#[tokio::test]
async fn rbac_forbids_users_without_rights_until_a_binding_grants_them() {
    let cp = ControlPlane::start_bare().await.unwrap();

    let nobody = cp
        .client_for_token("nobody", cp.nobody_token())
        .await
        .unwrap();
    assert_forbidden(namespace_names(nobody).await, "static token user nobody");

    let alice = cp.client_for("alice", &["devs"]).await.unwrap();
    assert_forbidden(
        namespace_names(alice.clone()).await,
        "client-cert user alice",
    );

    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some("devs-cluster-admin".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "cluster-admin".into(),
        },
        subjects: Some(vec![Subject {
            kind: "Group".into(),
            name: "devs".into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(cp.client())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    // RBAC reads bindings from an informer: give it a moment to see the new one.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match namespace_names(alice.clone()).await {
            Ok(names) => {
                assert!(names.iter().any(|n| n == "default"));
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("alice not yet allowed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("alice still denied after the binding: {e}"),
        }
    }
}

#[tokio::test]
async fn drop_leaves_no_process_and_no_temp_dir() {
    let cp = ControlPlane::start_bare().await.unwrap();
    let pids = cp.pids();
    let dir = cp.dir().to_owned();
    assert!(pids.iter().all(|p| pid_alive(*p)));
    assert_eq!(
        processes_mentioning(&dir).len(),
        2,
        "{:?}",
        processes_mentioning(&dir)
    );
    let t = Instant::now();
    drop(cp);
    eprintln!("stop: {:?}", t.elapsed());
    for pid in pids {
        assert!(!pid_alive(pid), "pid {pid} outlived the ControlPlane");
    }
    assert_eq!(processes_mentioning(&dir), Vec::<String>::new());
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test]
async fn two_control_planes_run_side_by_side() {
    let (a, b) = tokio::join!(ControlPlane::start_bare(), ControlPlane::start_bare());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.url(), b.url());
    a.create_namespace("only-in-a").await.unwrap();
    assert!(
        namespace_names(a.client())
            .await
            .unwrap()
            .contains(&"only-in-a".to_owned())
    );
    assert!(
        !namespace_names(b.client())
            .await
            .unwrap()
            .contains(&"only-in-a".to_owned())
    );
}

const CHILD_ENV: &str = "TT_CONTROLPLANE_HELPER_CHILD";

/// Run only as a child of `processes_die_with_a_killed_test_process`.
#[tokio::test]
#[ignore = "helper process for processes_die_with_a_killed_test_process"]
async fn helper_holds_a_control_plane_until_killed() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let cp = ControlPlane::start_bare().await.unwrap();
    let [etcd, api] = cp.pids();
    println!("CP={} {etcd} {api}", cp.dir().display());
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[test]
fn processes_die_with_a_killed_test_process() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_holds_a_control_plane_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = BufReader::new(stdout)
        .lines()
        .map(|l| l.unwrap())
        .find_map(|l| l.strip_prefix("CP=").map(str::to_owned))
        .expect("child printed no control plane");
    let mut parts = line.split(' ');
    let dir = PathBuf::from(parts.next().unwrap());
    let pids: Vec<u32> = parts.map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| pid_alive(*p)));

    child.kill().unwrap(); // SIGKILL: no Drop runs in the child
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| pid_alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "etcd/kube-apiserver {pids:?} outlived their test process"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        dir.exists(),
        "the temp dir should outlive a SIGKILLed owner"
    );
    let reaped = reap_stale_dirs().unwrap();
    assert!(
        reaped.contains(&dir),
        "reaper missed {}: {reaped:?}",
        dir.display()
    );
    assert!(!dir.exists());
}
