// IPAM pool rules against the real API server: a disabled pool is refused by name (by
// annotation and for a fixed address), a nodeSelector pool follows the node's labels, and of
// two overlapping pools the newer is not used and a Kubernetes Event names both.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use support::ControlPlane;
use tortie::api::{AllowedUse, IPPoolSpec};
use tortie::ipam::pools::ANNOTATION_IPV4_POOLS;
use tortie::ipam::store::events::REASON_CIDR_OVERLAP;
use tortie::ipam::{AssignRequest, Ipam, pod_handle};

const SYNC: Duration = Duration::from_secs(30);

use support::pools::create_pool_spec as create_pool;

fn spec(cidr: &str) -> IPPoolSpec {
    IPPoolSpec {
        cidr: cidr.into(),
        block_size: Some(29),
        ..Default::default()
    }
}

/// Polls `cond` for up to 30 s.
async fn wait_until(what: &str, cond: impl Fn() -> bool) -> anyhow::Result<()> {
    for _ in 0..300 {
        if cond() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out waiting until {what}")
}

fn attrs(node: &str, pod: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("node".to_string(), node.to_string()),
        ("namespace".to_string(), "default".to_string()),
        ("pod".to_string(), pod.to_string()),
    ])
}

async fn assign(ipam: &Ipam, pod: &str) -> anyhow::Result<IpAddr> {
    let req = AssignRequest::workload(pod_handle(pod), attrs(ipam.node(), pod));
    let got = ipam.auto_assign(&req).await?;
    Ok(got.first().context("no address")?.addr())
}

#[tokio::test]
async fn disabled_pool_is_refused_by_name_for_annotations_and_fixed_ips() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node("node-1", &[]).await?;
    create_pool(&client, "on-pool", spec("10.30.0.0/24")).await?;
    create_pool(
        &client,
        "off-pool",
        IPPoolSpec {
            disabled: true,
            ..spec("10.31.0.0/24")
        },
    )
    .await?;
    let ipam = Ipam::start(client.clone(), "node-1", SYNC).await?;

    // Without annotations only the enabled pool hands out addresses.
    let on: IpNet = "10.30.0.0/24".parse()?;
    for i in 0..3 {
        let a = assign(&ipam, &format!("plain{i}")).await?;
        assert!(on.contains(&a), "{a} is not from on-pool");
    }

    let mut req = AssignRequest::workload(pod_handle("annotated"), attrs("node-1", "annotated"));
    req.pod_annotations = Some(BTreeMap::from([(
        ANNOTATION_IPV4_POOLS.to_string(),
        r#"["off-pool"]"#.to_string(),
    )]));
    let err = ipam
        .auto_assign(&req)
        .await
        .expect_err("a disabled pool named in the annotation must be refused");
    assert_eq!(err.to_string(), "the given pool (off-pool) is disabled");

    let fixed: IpAddr = "10.31.0.5".parse()?;
    let err = ipam
        .assign_ip(
            fixed,
            &pod_handle("fixed"),
            attrs("node-1", "fixed"),
            AllowedUse::Workload,
        )
        .await
        .expect_err("a fixed address in a disabled pool must be refused");
    assert_eq!(
        err.to_string(),
        "cannot assign fixed address 10.31.0.5: its pool \"off-pool\" (10.31.0.0/24) is disabled"
    );
    Ok(())
}

/// Sets node-1's `rack` label and waits until the allocator's view has it.
async fn relabel(client: &Client, ipam: &Ipam, rack: &str) -> anyhow::Result<()> {
    let patch = serde_json::json!({ "metadata": { "labels": { "rack": rack } } });
    Api::<Node>::all(client.clone())
        .patch("node-1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .context("relabel node-1")?;
    wait_until(&format!("the view sees rack={rack}"), || {
        ipam.with_view(|v| v.node_labels.get("rack").map(String::as_str) == Some(rack))
    })
    .await
}

#[tokio::test]
async fn node_selector_pool_is_used_only_while_it_matches_the_node() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node("node-1", &[("rack", "b")]).await?;
    create_pool(
        &client,
        "rack-a",
        IPPoolSpec {
            node_selector: Some("rack == 'a'".into()),
            ..spec("10.40.0.0/24")
        },
    )
    .await?;
    create_pool(
        &client,
        "rack-b",
        IPPoolSpec {
            node_selector: Some("rack == 'b'".into()),
            ..spec("10.41.0.0/24")
        },
    )
    .await?;
    let ipam = Ipam::start(client.clone(), "node-1", SYNC).await?;
    let rack_a: IpNet = "10.40.0.0/24".parse()?;
    let rack_b: IpNet = "10.41.0.0/24".parse()?;

    // rack-a does not select the node: never used.
    for i in 0..5 {
        let a = assign(&ipam, &format!("b{i}")).await?;
        assert!(rack_b.contains(&a), "{a} is not from rack-b");
    }

    // Now rack-a matches and rack-b no longer does: new addresses come from rack-a only,
    // although node-1 still has a rack-b block with free room.
    relabel(&client, &ipam, "a").await?;
    for i in 0..5 {
        let a = assign(&ipam, &format!("a{i}")).await?;
        assert!(rack_a.contains(&a), "{a} is not from rack-a");
    }

    // Neither pool matches: allocation fails rather than fall back to a non-matching pool.
    relabel(&client, &ipam, "c").await?;
    let err = assign(&ipam, "nowhere")
        .await
        .expect_err("no pool selects the node");
    assert_eq!(
        err.to_string(),
        "no enabled IPv4 pool allows use Workload and selects node \"node-1\""
    );
    Ok(())
}

#[tokio::test]
async fn newer_overlapping_pool_is_not_used_and_an_event_names_both() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_node("node-1", &[]).await?;
    create_pool(&client, "old-pool", spec("10.50.0.0/24")).await?;
    // creationTimestamp has one-second resolution: make "newer" unambiguous.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    create_pool(&client, "a-new-pool", spec("10.50.0.0/16")).await?;
    let ipam = Ipam::start(client.clone(), "node-1", SYNC).await?;

    // The newer pool sorts first by name but is excluded: everything comes from old-pool.
    let old: IpNet = "10.50.0.0/24".parse()?;
    for i in 0..10 {
        let a = assign(&ipam, &format!("p{i}")).await?;
        assert!(old.contains(&a), "{a} is not from old-pool");
    }
    let mut req = AssignRequest::workload(pod_handle("named"), attrs("node-1", "named"));
    req.pod_annotations = Some(BTreeMap::from([(
        ANNOTATION_IPV4_POOLS.to_string(),
        r#"["a-new-pool"]"#.to_string(),
    )]));
    let err = ipam
        .auto_assign(&req)
        .await
        .expect_err("the excluded pool must not be used even when named");
    assert_eq!(
        err.to_string(),
        "the given pool (a-new-pool) overlaps the older pool \"old-pool\" and is not used"
    );

    let events = Api::<Event>::namespaced(client.clone(), "default");
    let mut found = None;
    for _ in 0..100 {
        let list = events.list(&ListParams::default()).await?;
        found = list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(REASON_CIDR_OVERLAP));
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ev = found.context("no CIDROverlap event in namespace default")?;
    let regarding = ev.regarding.context("event without regarding")?;
    assert_eq!(regarding.kind.as_deref(), Some("IPPool"));
    assert_eq!(regarding.name.as_deref(), Some("a-new-pool"));
    assert_eq!(ev.related.and_then(|r| r.name).as_deref(), Some("old-pool"));
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(
        ev.note.as_deref(),
        Some(
            "IPPool \"a-new-pool\" overlaps the older IPPool \"old-pool\"; \
             \"a-new-pool\" is not used for allocation"
        )
    );
    Ok(())
}
