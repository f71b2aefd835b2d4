// The pod side of ADD and DEL against the real API server: the daemon reads pods from its
// watch cache but never trusts a cached pod whose UID differs from the runtime's K8S_POD_UID,
// and DEL blanks Calico's podIP annotations only when its own container wrote them.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use support::NetNs;
use support::cni::{Harness, Outcome, create_pod, harness};

const POD_IP: &str = "cni.projectcalico.org/podIP";
const POD_IPS: &str = "cni.projectcalico.org/podIPs";
const CONTAINER_ID: &str = "cni.projectcalico.org/containerID";
const IP_ADDRS: &str = "cni.projectcalico.org/ipAddrs";

async fn cnitool(
    h: &Harness,
    verb: &str,
    pod: &str,
    uid: Option<&str>,
    netns: &Path,
) -> anyhow::Result<Outcome> {
    support::cni::cnitool_as(h, verb, "default", pod, uid, netns).await
}

fn first_ip(add: &Outcome) -> String {
    let r = add.json();
    r["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The pod's annotations once ADD's background patch has named `container`.
async fn annotations(
    h: &Harness,
    pod: &str,
    container: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    support::cni::annotations_when(&h.cp.client(), pod, |a| {
        a.get(CONTAINER_ID).map(String::as_str) == Some(container)
    })
    .await
}

#[tokio::test]
async fn del_blanks_the_pod_ip_annotations_only_for_the_container_that_wrote_them()
-> anyhow::Result<()> {
    let h = harness("10.244.0.0/24", 26).await?;
    let pod = create_pod(&h.cp.client(), "web-0", &[]).await?;
    let uid = pod.metadata.uid.clone();
    let (old, new) = (NetNs::new("pod")?, NetNs::new("pod")?);
    let old_id = support::cni::cnitool_container_id(&old.path());
    let new_id = support::cni::cnitool_container_id(&new.path());

    let add = cnitool(&h, "add", "web-0", uid.as_deref(), &old.path()).await?;
    assert!(add.ok, "ADD failed: {} {}", add.stdout, add.stderr);
    let ip = first_ip(&add);
    let a = annotations(&h, "web-0", &old_id).await?;
    assert_eq!(a[POD_IPS], ip);
    assert_eq!(a[POD_IP], ip);
    assert_eq!(a[CONTAINER_ID], old_id);

    let del = cnitool(&h, "del", "web-0", uid.as_deref(), &old.path()).await?;
    assert!(del.ok, "DEL failed: {} {}", del.stdout, del.stderr);
    let a = annotations(&h, "web-0", &old_id).await?;
    assert_eq!(a[POD_IP], "", "DEL blanks podIP: {a:?}");
    assert_eq!(a[POD_IPS], "", "DEL blanks podIPs: {a:?}");
    assert_eq!(
        a[CONTAINER_ID], old_id,
        "the container ID stays for repeated DELs"
    );

    // A new sandbox of the same pod, then a late repeated DEL of the old one: the new
    // sandbox's annotations (and its veth) stay.
    let add = cnitool(&h, "add", "web-0", uid.as_deref(), &new.path()).await?;
    assert!(add.ok, "ADD failed: {} {}", add.stdout, add.stderr);
    let new_ip = first_ip(&add);
    let del = cnitool(&h, "del", "web-0", uid.as_deref(), &old.path()).await?;
    assert!(del.ok, "repeated DEL failed: {} {}", del.stdout, del.stderr);
    let a = annotations(&h, "web-0", &new_id).await?;
    assert_eq!(a[POD_IPS], new_ip, "{a:?}");
    assert_eq!(a[CONTAINER_ID], new_id, "{a:?}");
    let routes = h.node.exec_ok(&["ip", "route", "show", "proto", "80"])?;
    assert!(
        routes.contains(new_ip.trim_end_matches("/32")),
        "the new sandbox's host route survived the old DEL: {routes}"
    );
    let del = cnitool(&h, "del", "web-0", uid.as_deref(), &new.path()).await?;
    assert!(del.ok, "DEL failed: {} {}", del.stdout, del.stderr);
    Ok(())
}

#[tokio::test]
async fn add_for_a_pod_recreated_under_the_same_name_uses_the_new_pod() -> anyhow::Result<()> {
    let h = harness("10.244.0.0/24", 26).await?;
    let client = h.cp.client();
    let first = create_pod(&client, "db-0", &[(IP_ADDRS, r#"["10.244.0.10"]"#)]).await?;
    let ns = NetNs::new("pod")?;
    // Without K8S_POD_UID (older runtimes) the cache is used as it is.
    let add = cnitool(&h, "add", "db-0", None, &ns.path()).await?;
    assert!(add.ok, "ADD failed: {} {}", add.stdout, add.stderr);
    assert_eq!(first_ip(&add), "10.244.0.10/32");
    let del = cnitool(&h, "del", "db-0", None, &ns.path()).await?;
    assert!(del.ok, "DEL failed: {} {}", del.stdout, del.stderr);

    // A StatefulSet-style replacement: same name, new UID, another fixed IP. The ADD comes
    // at once, before the daemon's watch may have seen the new pod.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.delete("db-0", &DeleteParams::default().grace_period(0))
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while pods.get_opt("db-0").await?.is_some() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "pod not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = create_pod(&client, "db-0", &[(IP_ADDRS, r#"["10.244.0.20"]"#)]).await?;
    assert_ne!(first.metadata.uid, second.metadata.uid);
    let uid = second.metadata.uid.clone();
    let add = cnitool(&h, "add", "db-0", uid.as_deref(), &ns.path()).await?;
    assert!(add.ok, "ADD failed: {} {}", add.stdout, add.stderr);
    assert_eq!(first_ip(&add), "10.244.0.20/32", "the new pod's annotation");
    let container = support::cni::cnitool_container_id(&ns.path());
    let a = annotations(&h, "db-0", &container).await?;
    assert_eq!(a[POD_IP], "10.244.0.20/32");
    // The allocation records the new pod's UID (the GC judges leaks by it).
    let held = h.daemon.ipam().with_view(|v| {
        v.blocks
            .values()
            .flat_map(|b| b.block.attributes.clone())
            .filter_map(|a| a.secondary.get("pod-uid").cloned())
            .collect::<Vec<_>>()
    });
    assert!(
        held.iter().any(|u| Some(u) == uid.as_ref()),
        "allocation attributes {held:?} lack the new UID {uid:?}"
    );
    let del = cnitool(&h, "del", "db-0", uid.as_deref(), &ns.path()).await?;
    assert!(del.ok, "DEL failed: {} {}", del.stdout, del.stderr);
    Ok(())
}
