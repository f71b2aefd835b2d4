// `tortie policy explain` against a real kube-apiserver: it reads pods, namespaces and every
// policy kind through the API, answers allow/deny with the deciding policy and rule per
// direction, and signals the answer in its exit code (0 allowed, 1 denied, 2 error).

mod support;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::ControlPlane;

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
