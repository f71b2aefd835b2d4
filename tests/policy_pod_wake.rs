// The daemon's one Pod watch wakes the policy driver: its change counter moves on a pod's
// creation and on a label change, and the store already holds the change when it does
// (the driver reads the store right after waking). Without it a pod's new labels reached
// the policy table only at the next resync (upstream Netpol "updated pod" specs failed).

mod support;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use support::ControlPlane;
use support::pods::create_pod_on;
use tortie::ipam::gc;

#[tokio::test]
async fn pod_changes_bump_the_counter_after_the_store_has_them() {
    let cp = ControlPlane::start().await.unwrap();
    let client = cp.client();
    let (pods, task, mut changes) = gc::watch_pods_notify(client.clone());
    // The first list completes: one bump.
    tokio::time::timeout(Duration::from_secs(20), changes.changed())
        .await
        .expect("no bump after the list")
        .unwrap();
    let key = ObjectRef::new("web").within("default");
    let label = |pods: &kube::runtime::reflector::Store<_>| {
        pods.get(&key)
            .and_then(|p: std::sync::Arc<k8s_openapi::api::core::v1::Pod>| {
                p.metadata.labels.as_ref()?.get("app").cloned()
            })
    };
    create_pod_on(&client, "default", "web", "node-a", &[])
        .await
        .unwrap();
    let woke = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            changes.changed().await.unwrap();
            changes.borrow_and_update();
            if pods.get(&key).is_some() {
                break;
            }
        }
    })
    .await;
    assert!(woke.is_ok(), "no bump with the new pod in the store");
    assert_eq!(label(&pods), None);
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "default");
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), changes.changed())
        .await
        .expect("no bump after the label change")
        .unwrap();
    assert_eq!(label(&pods).as_deref(), Some("web"));
    task.abort();
}
