// manifests/monitoring/ against real tools: promtool accepts the PrometheusRule's groups, the
// PodMonitor and PrometheusRule pass a server-side dry run on a real kube-apiserver with the
// Prometheus Operator's official CRDs installed (tests/fixtures/prometheus-operator), and the
// dashboard's panels all carry a query. That every metric they read exists in a live
// /metrics is checked in tests/rbac.rs, which runs the daemon as the manifest installs it.

mod support;

use std::process::Command;

use support::manifest::{apply, load_docs, monitoring_expressions, promql_metric_names};

#[test]
fn promtool_accepts_the_rules() {
    let docs = load_docs("manifests/monitoring/prometheusrule.yaml");
    assert_eq!(docs.len(), 1);
    let groups = serde_json::json!({ "groups": docs[0]["spec"]["groups"] });
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, serde_yaml::to_string(&groups).expect("yaml")).expect("write");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("run promtool (Debian package prometheus; .ci/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules:\n{text}");
    assert!(text.contains("SUCCESS: 8 rules found"), "{text}");
}

#[test]
fn promtool_rejects_a_broken_rule() {
    // The check above can fail: promtool refuses a bad expression.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "groups:\n- name: x\n  rules:\n  - alert: X\n    expr: sum by (a (ipam_blocks)\n",
    )
    .expect("write");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool");
    assert!(!out.status.success());
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        promql_metric_names(
            r#"histogram_quantile(0.99, sum by (le, instance) (rate(tortie_cni_request_duration_seconds_bucket{command="ADD"}[5m])))"#
        ),
        vec!["tortie_cni_request_duration_seconds_bucket"]
    );
    assert_eq!(
        promql_metric_names(
            "sum by (ippool) (max by (ippool, node) (ipam_allocations_in_use)) / on (ippool) max by (ippool) (ipam_ippool_size) > 0.8"
        ),
        vec!["ipam_allocations_in_use", "ipam_ippool_size"]
    );
    assert_eq!(
        promql_metric_names("tortie:ippool_utilisation:ratio > 0.95"),
        Vec::<String>::new()
    );
    let all = monitoring_expressions();
    assert!(all.len() >= 15, "{all:?}");
    for (what, expr) in &all {
        assert!(!expr.trim().is_empty(), "{what} has no query");
    }
}

#[test]
fn the_dashboard_shows_utilisation_cni_latency_and_apply_time() {
    let names: Vec<String> = monitoring_expressions()
        .into_iter()
        .filter(|(what, _)| what.starts_with("panel"))
        .flat_map(|(_, e)| promql_metric_names(&e))
        .collect();
    for want in [
        "ipam_allocations_in_use",
        "ipam_ippool_size",
        "tortie_ipam_node_free_addresses",
        "tortie_cni_request_duration_seconds_bucket",
        "felix_int_dataplane_apply_time_seconds_bucket",
    ] {
        assert!(names.iter().any(|n| n == want), "no panel reads {want}");
    }
}

#[tokio::test]
async fn monitoring_manifests_pass_a_server_side_dry_run_with_the_operator_crds() {
    let cp = support::ControlPlane::start_bare()
        .await
        .expect("control plane");
    let client = cp.client();
    for crd in [
        "tests/fixtures/prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
        "tests/fixtures/prometheus-operator/monitoring.coreos.com_prometheusrules.yaml",
    ] {
        for doc in load_docs(crd) {
            apply(&client, &doc, false)
                .await
                .unwrap_or_else(|e| panic!("{crd}: {e:#}"));
        }
    }
    for file in [
        "manifests/monitoring/podmonitor.yaml",
        "manifests/monitoring/prometheusrule.yaml",
    ] {
        for doc in load_docs(file) {
            apply(&client, &doc, true)
                .await
                .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        }
    }
    support::manifest::kubectl_dry_run(
        cp.kubeconfig_path(),
        &[
            "manifests/monitoring/podmonitor.yaml",
            "manifests/monitoring/prometheusrule.yaml",
        ],
    );
    // The schema is enforced: a scheme other than http(s) is refused.
    let mut bad = load_docs("manifests/monitoring/podmonitor.yaml").remove(0);
    bad["spec"]["podMetricsEndpoints"][0]["scheme"] = serde_json::json!("gopher");
    let err = apply(&client, &bad, true).await.expect_err("bad scheme");
    assert!(format!("{err:#}").contains("scheme"), "{err:#}");
}
