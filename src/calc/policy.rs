//! This node's policy table: the cluster's policy objects → the model, this node's pods
//! given their host-side `cali*` interface, compiled to the desired `inet tortie-policy`
//! table. Pure; the daemon feeds it a snapshot of the cluster view on every change.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::cni::plumbing::host_veth_name;
use crate::desired::nft::Table;
use crate::policy::cluster::{ClusterObjects, build_model};
use crate::policy::compile::{CompileOptions, compile};
use crate::policy::{Diagnostic, Model};

/// The desired table and the diagnostics the model raised (for Events, logs, metrics).
pub struct PolicyPlan {
    pub table: Table,
    pub diagnostics: Vec<Diagnostic>,
}

/// Whether `pod` runs on `node`: only those get dispatch entries and endpoint chains.
fn on_node(pod: &Pod, node: &str) -> bool {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
}

/// The model with this node's endpoints marked by their interface.
pub fn local_model(objects: &ClusterObjects, node: &str) -> Model {
    let mut model = build_model(objects);
    let local: std::collections::BTreeSet<(String, String)> = objects
        .pods
        .iter()
        .filter(|p| on_node(p, node))
        .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
        .collect();
    for ep in &mut model.endpoints {
        if local.contains(&(ep.namespace.clone(), ep.name.clone())) {
            ep.interface = Some(host_veth_name(&ep.namespace, &ep.name));
        }
    }
    model
}

pub fn policy_plan(objects: &ClusterObjects, node: &str, opts: &CompileOptions) -> PolicyPlan {
    let model = local_model(objects, node);
    PolicyPlan {
        table: compile(&model, opts),
        diagnostics: model.diagnostics.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .expect("pod")
    }

    #[test]
    fn only_this_nodes_pods_get_an_interface() {
        let objects = ClusterObjects {
            pods: vec![
                pod("default", "a", "n1", "10.0.0.1"),
                pod("default", "b", "n2", "10.0.0.2"),
            ],
            ..ClusterObjects::default()
        };
        let m = local_model(&objects, "n1");
        let ifaces: Vec<_> = m
            .endpoints
            .iter()
            .map(|e| (e.name.as_str(), e.interface.clone()))
            .collect();
        assert_eq!(
            ifaces,
            vec![("a", Some(host_veth_name("default", "a"))), ("b", None)]
        );
        let plan = policy_plan(&objects, "n1", &CompileOptions::default());
        let text = format!("{:?}", plan.table);
        assert!(text.contains(&host_veth_name("default", "a")));
        assert!(!text.contains(&host_veth_name("default", "b")));
    }
}
