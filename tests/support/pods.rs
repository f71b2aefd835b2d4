// Pod objects as tests need them: bound to a node (as the scheduler would leave them), with
// the annotations under test, so IPAM, CNI and GC see a real Pod in the API server.

use anyhow::Context;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

/// Creates `namespace/name` bound to `node` with `annotations`; returns it as stored.
pub async fn create_pod_on(
    client: &Client,
    namespace: &str,
    name: &str,
    node: &str,
    annotations: &[(&str, &str)],
) -> anyhow::Result<Pod> {
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "c".into(),
                image: Some("pause".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {namespace}/{name}"))
}

/// `create_pod_on` in `default` without annotations; returns the pod's UID.
pub async fn create_pod_uid(client: &Client, name: &str, node: &str) -> anyhow::Result<String> {
    let pod = create_pod_on(client, "default", name, node, &[]).await?;
    pod.metadata.uid.context("pod uid")
}
