//! Publishing the detected address on the Node (`projectcalico.org/IPv4Address` or
//! `IPv6Address`), with a merge patch sent only when the value differs.

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use super::{Family, IdentityError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Annotation {
    Written,
    Unchanged,
}

pub fn annotation_key(family: Family) -> &'static str {
    match family {
        Family::V4 => crate::api::vocab::NODE_IPV4_ADDRESS,
        Family::V6 => crate::api::vocab::NODE_IPV6_ADDRESS,
    }
}

/// Sets the annotation to `<ip>/<prefix>` unless it already holds exactly that.
pub async fn write_address(
    client: &Client,
    node_name: &str,
    family: Family,
    address: &IpNet,
) -> Result<Annotation, IdentityError> {
    let api: Api<Node> = Api::all(client.clone());
    let api_error = |action| {
        move |source| IdentityError::Api {
            action,
            node: node_name.to_owned(),
            source: Box::new(source),
        }
    };
    let node = api.get(node_name).await.map_err(api_error("reading"))?;
    let key = annotation_key(family);
    let value = address.to_string();
    let current = node.metadata.annotations.as_ref().and_then(|a| a.get(key));
    if current == Some(&value) {
        return Ok(Annotation::Unchanged);
    }
    // A merge patch of one key: other annotations and concurrent writers are left alone.
    let patch = serde_json::json!({ "metadata": { "annotations": { key: value } } });
    api.patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(api_error("annotating"))?;
    Ok(Annotation::Written)
}
