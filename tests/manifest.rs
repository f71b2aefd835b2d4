// manifests/tortie.yaml read as data: its CRDs are exactly manifests/crds/ (so the install never
// drifts from the generated schemas), and the DaemonSet has the shape the install needs
// (privileged, hostNetwork, tolerations, probes, metrics port, host mounts of exactly the
// paths the code uses, no setting that would freeze a FelixConfiguration field).

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use support::manifest::{self as manifest_support, Manifest, repo};

#[test]
fn crds_at_the_end_are_manifests_crds_verbatim() {
    let text = std::fs::read_to_string(repo().join("manifests/tortie.yaml")).expect("manifest");
    let marker = manifest_support::CRD_MARKER;
    let at = text
        .find(marker)
        .expect("manifests/tortie.yaml keeps its CRD marker line");
    let tail = &text[at..];
    let tail = &tail[tail.find('\n').map_or(tail.len(), |i| i + 1)..];
    let mut files: Vec<_> = std::fs::read_dir(repo().join("manifests/crds"))
        .expect("manifests/crds")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut expected = String::new();
    for f in &files {
        expected.push_str("---\n");
        expected.push_str(&std::fs::read_to_string(f).expect("crd file"));
    }
    assert!(
        tail == expected,
        "the CRDs in manifests/tortie.yaml differ from manifests/crds/: run scripts/manifest.sh"
    );
}

#[test]
fn every_crd_and_nothing_else_cluster_wide_is_created() {
    let m = Manifest::load();
    let kinds: Vec<_> = m
        .docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or(""))
        .collect();
    for want in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "DaemonSet",
    ] {
        assert_eq!(
            kinds.iter().filter(|k| **k == want).count(),
            1,
            "one {want}"
        );
    }
    let crds = kinds
        .iter()
        .filter(|k| **k == "CustomResourceDefinition")
        .count();
    assert_eq!(
        crds,
        std::fs::read_dir(repo().join("manifests/crds"))
            .expect("dir")
            .count()
    );
    for d in &m.docs {
        let kind = d["kind"].as_str().unwrap_or("");
        if !matches!(
            kind,
            "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
        ) {
            assert_eq!(
                d["metadata"]["namespace"], "kube-system",
                "{kind} lives in kube-system"
            );
        }
    }
}

#[test]
fn daemonset_runs_privileged_on_every_node_before_it_is_ready() {
    let m = Manifest::load();
    let ds = m.one("DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(
        ds["spec"]["updateStrategy"],
        serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}})
    );
    let tolerations: BTreeSet<String> = spec["tolerations"]
        .as_array()
        .expect("tolerations")
        .iter()
        .map(|t| t.to_string())
        .collect();
    let want: BTreeSet<String> = [
        serde_json::json!({"operator": "Exists", "effect": "NoSchedule"}),
        serde_json::json!({"operator": "Exists", "effect": "NoExecute"}),
    ]
    .iter()
    .map(|t| t.to_string())
    .collect();
    assert_eq!(tolerations, want);
    assert_eq!(spec["serviceAccountName"], "tortie-node");
    assert_eq!(m.one("ServiceAccount")["metadata"]["name"], "tortie-node");
    let c = m.container();
    assert_eq!(c["securityContext"]["privileged"], true);
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(
        c["resources"]["limits"].is_null(),
        "no limits: an OOM kill of the node's network daemon is worse than its memory use"
    );
}

#[test]
fn nodename_comes_from_the_downward_api() {
    let m = Manifest::load();
    let env = m.container()["env"].as_array().expect("env").clone();
    let nodename = env
        .iter()
        .find(|e| e["name"] == "NODENAME")
        .expect("NODENAME");
    assert_eq!(
        nodename["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
        "{nodename}"
    );
}

#[test]
fn probes_and_metrics_use_calicos_ports() {
    let m = Manifest::load();
    let c = m.container();
    for (probe, path) in [
        ("livenessProbe", "/liveness"),
        ("readinessProbe", "/readiness"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path);
        assert_eq!(c[probe]["httpGet"]["port"], 9099);
    }
    let metrics = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics")
        .clone();
    assert_eq!(metrics["containerPort"], 9091);
    let ann = &m.one("DaemonSet")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "9091");
    assert_eq!(ann["prometheus.io/path"], "/metrics");
}

#[test]
fn host_mounts_are_exactly_the_paths_the_code_uses() {
    use tortie::cni::install::{DEFAULT_BIN_DIR, DEFAULT_CONF_DIR};
    use tortie::cni::netconf::DEFAULT_SOCKET;
    let m = Manifest::load();
    let spec = &m.one("DaemonSet")["spec"]["template"]["spec"];
    let volumes = spec["volumes"].as_array().expect("volumes");
    let mut host = BTreeSet::new();
    for v in volumes {
        assert!(v["flexVolume"].is_null(), "no flexvol: {v}");
        let path = v["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("every volume is a hostPath: {v}"));
        host.insert(path.to_string());
    }
    let socket_dir = Path::new(DEFAULT_SOCKET)
        .parent()
        .expect("socket dir")
        .to_str()
        .expect("utf-8");
    let want: BTreeSet<String> = [DEFAULT_BIN_DIR, DEFAULT_CONF_DIR, socket_dir]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(host, want);
    // Mounted at the host's own paths: the defaults of --cni-bin-dir, --cni-conf-dir and
    // --cni-socket then name the host's files, and the conflist's socket path is right there.
    for mount in m.container()["volumeMounts"].as_array().expect("mounts") {
        let vol = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("volume of mount");
        assert_eq!(mount["mountPath"], vol["hostPath"]["path"], "{mount}");
    }
}

#[test]
fn settings_felix_configuration_may_change_are_not_frozen() {
    let env = Manifest::load().daemon_env();
    // Felix's precedence: an explicitly set variable beats FelixConfiguration.
    for frozen in [
        "TORTIE_CNI_MTU",
        "TORTIE_HEALTH_PORT",
        "TORTIE_HEALTH_ADDR",
        "TORTIE_METRICS_PORT",
        "TORTIE_METRICS_ADDR",
        "TORTIE_RESYNC_INTERVAL",
        "TORTIE_CHECKSUM_OFFLOAD_BROKEN",
        "TORTIE_LOG_LEVEL",
    ] {
        assert!(!env.contains_key(frozen), "{frozen} is set in the manifest");
    }
}

#[test]
fn default_pool_is_vxlan_always_with_nat_on_the_aks_pod_cidr() {
    let env = Manifest::load().daemon_env();
    let get = |k: &str| env.get(k).and_then(|v| v.clone());
    assert_eq!(
        get("CALICO_IPV4POOL_CIDR").as_deref(),
        Some("192.168.0.0/16")
    );
    assert_eq!(get("CALICO_IPV4POOL_VXLAN").as_deref(), Some("Always"));
    assert_eq!(get("CALICO_IPV4POOL_IPIP").as_deref(), Some("Never"));
    assert_eq!(get("CALICO_IPV4POOL_NAT_OUTGOING").as_deref(), Some("true"));
}

#[test]
fn the_manifest_enforces_network_policy() {
    let env = Manifest::load().daemon_env();
    let policy = env.get("TORTIE_POLICY").and_then(|v| v.clone());
    assert_eq!(policy.as_deref(), Some("true"));
}

#[test]
fn every_variable_the_manifest_sets_is_one_tortie_node_reads() {
    let env = Manifest::load().daemon_env();
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_tortie"))
        .args(["node", "--help"])
        .output()
        .expect("tortie node --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for name in env.keys() {
        assert!(
            help.contains(&format!("[env: {name}=")),
            "{name} is set by the manifest but `tortie node` does not read it"
        );
    }
}

#[test]
fn image_tag_is_the_crate_version() {
    let m = Manifest::load();
    let image = m.container()["image"].as_str().expect("image").to_string();
    assert_eq!(
        image,
        format!("ghcr.io/tortie/tortie:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(m.container()["args"], serde_json::json!(["node"]));
}

/// `kubectl apply --dry-run=server` of every document against a real kube-apiserver with no
/// CRDs installed (a fresh cluster): schemas, admission (the priority class exists) and RBAC
/// escalation checks pass. A broken copy of the DaemonSet is rejected, so the dry run does
/// validate.
#[tokio::test]
async fn every_document_passes_a_server_side_dry_run() {
    let cp = support::ControlPlane::start_bare()
        .await
        .expect("control plane");
    let client = cp.client();
    let m = Manifest::load();
    for doc in &m.docs {
        support::manifest::apply(&client, doc, true)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    let mut broken = m.one("DaemonSet").clone();
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
        serde_json::json!(70000);
    let err = support::manifest::apply(&client, &broken, true)
        .await
        .expect_err("port 70000 must be rejected");
    assert!(format!("{err:#}").contains("containerPort"), "{err:#}");
    support::manifest::kubectl_dry_run(cp.kubeconfig_path(), &["manifests/tortie.yaml"]);
    // Dry run stored nothing.
    let ds: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
        kube::Api::namespaced(client, "kube-system");
    assert!(ds.get_opt("tortie-node").await.expect("get").is_none());
}

/// `kubectl apply` (client side) stores each object as JSON in the
/// `kubectl.kubernetes.io/last-applied-configuration` annotation, and annotations are limited
/// to 256 KiB in total: a larger object (Calico's CRDs are) would need `--server-side`.
#[test]
fn every_document_fits_kubectl_apply_s_last_applied_annotation() {
    for doc in &Manifest::load().docs {
        let size = serde_json::to_vec(doc).expect("JSON").len();
        assert!(
            size < 256 * 1024,
            "{} {} is {size} bytes as JSON",
            doc["kind"],
            doc["metadata"]["name"]
        );
    }
}
