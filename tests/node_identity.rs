// Node IP autodetection in a real network namespace (veth interfaces with known addresses,
// one with an excluded-looking name, one down), each of Calico's methods, and the Node
// annotation written through the real API server.

mod support;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeAddress as K8sAddress, NodeStatus};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use support::{ControlPlane, NetNs, veth_pair};
use tortie::node::identity::{
    Annotation, Family, IdentityError, Method, NodeAddress, annotation_key, detect, establish,
    write_address,
};

/// A "node" namespace with, in creation (= ifindex) order:
///   eth0    198.18.1.2/24, fdaa::2/64
///   ens5    198.18.3.2/24
///   cali123 198.18.2.2/24   (matches Calico's default exclusions)
///   ens6    198.18.4.2/24   (down)
/// Peers live in a second namespace, so nothing touches the root namespace.
struct Host {
    node: NetNs,
    _peer: NetNs,
}

fn host() -> anyhow::Result<Host> {
    let node = NetNs::new("ident-node")?;
    let peer = NetNs::new("ident-peer")?;
    for (name, peer_name, addr) in [
        ("eth0", "p0", "198.18.1.2/24"),
        ("ens5", "p1", "198.18.3.2/24"),
        ("cali123", "p2", "198.18.2.2/24"),
        ("ens6", "p3", "198.18.4.2/24"),
    ] {
        veth_pair(&node, name, &peer, peer_name)?;
        node.exec_ok(&["ip", "addr", "add", addr, "dev", name])?;
    }
    node.exec_ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fdaa::2/64",
        "dev",
        "eth0",
        "nodad",
    ])?;
    node.exec_ok(&["ip", "link", "set", "ens6", "down"])?;
    Ok(Host { node, _peer: peer })
}

/// Runs detection on a thread inside the namespace (rtnetlink and UDP sockets open there).
fn detect_in(
    ns: &NetNs,
    method: &str,
    family: Family,
    node: Option<Node>,
) -> Result<NodeAddress, IdentityError> {
    let method = Method::parse(method)?;
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(detect(&method, family, node.as_ref()))
    })
    .unwrap()
}

fn picked(ns: &NetNs, method: &str, family: Family) -> String {
    let a = detect_in(ns, method, family, None).unwrap_or_else(|e| panic!("{method}: {e}"));
    format!("{} {}", a.interface, a.address)
}

#[test]
fn interface_methods_pick_calicos_choice_in_a_real_namespace() -> anyhow::Result<()> {
    let h = host()?;
    let ns = &h.node;
    // Reverse index order: ens6 is down, cali123 excluded, so ens5.
    assert_eq!(picked(ns, "first-found", Family::V4), "ens5 198.18.3.2/24");
    // Only eth0 has a global IPv6 address (the others have link-local ones only).
    assert_eq!(picked(ns, "first-found", Family::V6), "eth0 fdaa::2/64");
    assert_eq!(
        picked(ns, "interface=eth0", Family::V4),
        "eth0 198.18.1.2/24"
    );
    assert_eq!(
        picked(ns, "interface=nope,cali.*", Family::V4),
        "cali123 198.18.2.2/24"
    );
    assert_eq!(
        picked(ns, "skip-interface=ens.*", Family::V4),
        "eth0 198.18.1.2/24"
    );
    assert_eq!(
        picked(ns, "cidr=198.18.2.0/24", Family::V4),
        "cali123 198.18.2.2/24"
    );
    assert_eq!(
        picked(ns, "cidr=10.0.0.0/8, 198.18.1.0/24", Family::V4),
        "eth0 198.18.1.2/24"
    );

    let err = detect_in(ns, "interface=ens6", Family::V4, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no IPv4 address") && err.contains("ens6 (down)"),
        "{err}"
    );
    Ok(())
}

#[test]
fn can_reach_uses_the_kernels_route_choice() -> anyhow::Result<()> {
    let h = host()?;
    let ns = &h.node;
    assert_eq!(
        picked(ns, "can-reach=198.18.1.77", Family::V4),
        "eth0 198.18.1.2/24"
    );
    // No route yet: the UDP connect fails and the error names the target.
    let err = detect_in(ns, "can-reach=198.19.5.9", Family::V4, None).unwrap_err();
    assert!(
        matches!(&err, IdentityError::Unreachable { target, .. } if target == "198.19.5.9"),
        "{err}"
    );
    ns.exec_ok(&[
        "ip",
        "route",
        "add",
        "198.19.5.0/24",
        "via",
        "198.18.3.1",
        "dev",
        "ens5",
    ])?;
    assert_eq!(
        picked(ns, "can-reach=198.19.5.9", Family::V4),
        "ens5 198.18.3.2/24"
    );
    ns.exec_ok(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "198.18.2.1",
        "dev",
        "cali123",
    ])?;
    assert_eq!(
        picked(ns, "can-reach=203.0.113.1", Family::V4),
        "cali123 198.18.2.2/24"
    );
    Ok(())
}

#[test]
fn unknown_method_is_an_error_naming_it() {
    let err = Method::parse("first-found-please").unwrap_err().to_string();
    assert!(err.contains("\"first-found-please\""), "{err}");
    assert!(err.contains("kubernetes-internal-ip"), "{err}");
}

async fn set_internal_ip(client: &Client, node: &str, ip: &str) -> anyhow::Result<Node> {
    let status = NodeStatus {
        addresses: Some(vec![
            K8sAddress {
                type_: "Hostname".into(),
                address: node.into(),
            },
            K8sAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            },
        ]),
        ..Default::default()
    };
    let patch = serde_json::json!({ "status": status });
    Ok(Api::<Node>::all(client.clone())
        .patch_status(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}

fn annotations(node: &Node) -> BTreeMap<String, String> {
    node.metadata.annotations.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_internal_ip_and_the_node_annotation() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let name = "node-x";
    cp.create_node(name, &[]).await?;
    let h = host()?;

    // The InternalIP gets the prefix of the local interface holding it.
    let node = set_internal_ip(&client, name, "198.18.1.2").await?;
    let found = tokio::task::block_in_place(|| {
        detect_in(&h.node, "kubernetes-internal-ip", Family::V4, Some(node))
    })?;
    assert_eq!(
        format!("{} {}", found.interface, found.address),
        "eth0 198.18.1.2/24"
    );

    let node = set_internal_ip(&client, name, "10.1.2.3").await?;
    let err = tokio::task::block_in_place(|| {
        detect_in(&h.node, "kubernetes-internal-ip", Family::V4, Some(node))
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("10.1.2.3 is on no local interface"), "{err}");

    // The annotation: written once, then left alone when unchanged; other annotations kept.
    let keep = serde_json::json!({ "metadata": { "annotations": { "example.com/keep": "yes" } } });
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&keep))
        .await?;
    let address = "198.18.3.2/24".parse()?;
    assert_eq!(
        write_address(&client, name, Family::V4, &address).await?,
        Annotation::Written
    );
    let rv = nodes.get(name).await?.metadata.resource_version;
    assert_eq!(
        write_address(&client, name, Family::V4, &address).await?,
        Annotation::Unchanged
    );
    let node = nodes.get(name).await?;
    assert_eq!(
        node.metadata.resource_version, rv,
        "no write when unchanged"
    );
    let a = annotations(&node);
    assert_eq!(
        a.get("projectcalico.org/IPv4Address").map(String::as_str),
        Some("198.18.3.2/24")
    );
    assert_eq!(a.get("example.com/keep").map(String::as_str), Some("yes"));

    // The whole start-up step, detection inside the node namespace, with the internal IP
    // moved to eth0 again: detect, then overwrite the stale annotation. The kube client's
    // connections belong to the test runtime (root namespace), so the API stays reachable.
    set_internal_ip(&client, name, "198.18.1.2").await?;
    let ns = &h.node;
    let method = Method::parse("kubernetes-internal-ip")?;
    let c = client.clone();
    let found = tokio::task::block_in_place(|| {
        ns_run_async(ns, async move {
            establish(&c, "node-x", Family::V4, &method).await
        })
    })?;
    assert_eq!(found.address.to_string(), "198.18.1.2/24");
    let a = annotations(&nodes.get(name).await?);
    assert_eq!(
        a.get(annotation_key(Family::V4)).map(String::as_str),
        Some("198.18.1.2/24")
    );
    drop(h);
    Ok(())
}

/// Runs a future to completion on a thread inside `ns`.
fn ns_run_async<T: Send>(
    ns: &NetNs,
    fut: impl Future<Output = Result<T, IdentityError>> + Send,
) -> anyhow::Result<T> {
    let out = ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(fut)
    })??;
    Ok(out)
}
