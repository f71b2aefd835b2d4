//! This node's policy table: the cluster's policy objects → the model, this node's pods
//! given their host-side `cali*` interface, compiled to the desired `inet tortie-policy`
//! table. Pure; the daemon feeds it a snapshot of the cluster view on every change.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Pod, PodIP, PodStatus};
use kube::ResourceExt;

use crate::api::vocab::{ANNOTATION_POD_IP, ANNOTATION_POD_IPS};
use crate::cni::handlers::endpoints::LocalEndpoint;
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

/// The addresses policy gives a pod, as Calico's pod conversion does: its
/// `cni.projectcalico.org/podIPs` (else `podIP`) annotation first, written right after the
/// CNI ADD, long before kubelet fills the status. None: keep the status.
fn annotated_ips(pod: &Pod) -> Option<Vec<IpAddr>> {
    let ann = pod.metadata.annotations.as_ref()?;
    let value = ann
        .get(ANNOTATION_POD_IPS)
        .filter(|v| !v.is_empty())
        .or_else(|| ann.get(ANNOTATION_POD_IP).filter(|v| !v.is_empty()))?;
    let ips: Vec<IpAddr> = value
        .split(',')
        .filter_map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .map(|n| n.addr())
                .or_else(|_| s.parse::<IpAddr>())
                .ok()
        })
        .collect();
    (!ips.is_empty()).then_some(ips)
}

fn set_ips(pod: &mut Pod, ips: &[IpAddr]) {
    let status = pod.status.get_or_insert_with(PodStatus::default);
    status.pod_ip = ips.first().map(ToString::to_string);
    status.pod_ips = Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
}

/// The pods as policy must see them. Pods this node's CNI registered carry the addresses
/// IPAM gave them (ADD waits for policy before kubelet could write a status); one the Pod
/// store has not delivered yet stands in with the copy ADD read. Other pods take their
/// Calico annotation over their status.
pub fn with_local_endpoints(pods: &mut Vec<Pod>, local: &[LocalEndpoint]) {
    for pod in pods.iter_mut() {
        if let Some(ips) = annotated_ips(pod) {
            set_ips(pod, &ips);
        }
    }
    let mut index: std::collections::BTreeMap<(String, String), usize> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| ((p.namespace().unwrap_or_default(), p.name_any()), i))
        .collect();
    for ep in local {
        let key = (ep.namespace.clone(), ep.pod.clone());
        let i = match index.get(&key) {
            Some(&i) => i,
            None => {
                let Some(object) = ep.object.as_ref() else {
                    continue;
                };
                pods.push(Pod::clone(Arc::as_ref(object)));
                index.insert(key, pods.len() - 1);
                pods.len() - 1
            }
        };
        set_ips(&mut pods[i], &ep.ips);
    }
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

    fn local(name: &str, ip: &str, object: Option<Pod>) -> LocalEndpoint {
        LocalEndpoint {
            namespace: "default".into(),
            pod: name.into(),
            container: format!("c-{name}"),
            interface: host_veth_name("default", name),
            ips: vec![ip.parse().expect("ip")],
            object: object.map(Arc::new),
        }
    }

    fn ips_of(m: &Model, name: &str) -> Option<Vec<IpAddr>> {
        m.endpoints
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.ips.clone())
    }

    #[test]
    fn registered_pods_get_their_ipam_addresses_before_any_status() {
        let mut fresh = pod("default", "new", "n1", "10.0.0.9");
        fresh.status = None;
        let mut unseen = pod("default", "unseen", "n1", "10.0.0.9");
        unseen.status = None;
        let mut annotated = pod("default", "remote", "n2", "10.0.0.7");
        annotated.status = None;
        annotated.metadata.annotations = Some(
            [(ANNOTATION_POD_IPS.to_string(), "10.0.1.7/32".to_string())]
                .into_iter()
                .collect(),
        );
        let mut objects = ClusterObjects {
            pods: vec![fresh, annotated],
            ..ClusterObjects::default()
        };
        let m = local_model(&objects, "n1");
        assert_eq!(ips_of(&m, "new"), None, "no status, no endpoint");
        with_local_endpoints(
            &mut objects.pods,
            &[
                local("new", "10.0.0.3", None),
                local("unseen", "10.0.0.4", Some(unseen)),
                // Registered but neither in the store nor read: nothing to stand in.
                local("ghost", "10.0.0.5", None),
            ],
        );
        let m = local_model(&objects, "n1");
        let ip = |s: &str| vec![s.parse::<IpAddr>().expect("ip")];
        assert_eq!(ips_of(&m, "new"), Some(ip("10.0.0.3")));
        assert_eq!(ips_of(&m, "unseen"), Some(ip("10.0.0.4")));
        assert_eq!(ips_of(&m, "remote"), Some(ip("10.0.1.7")));
        assert_eq!(ips_of(&m, "ghost"), None);
        let iface = m
            .endpoints
            .iter()
            .find(|e| e.name == "unseen")
            .and_then(|e| e.interface.clone());
        assert_eq!(iface, Some(host_veth_name("default", "unseen")));
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
