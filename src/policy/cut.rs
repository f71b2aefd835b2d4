//! Which live flows a policy change cuts (`--policy-cut-denied-connections`): a flow that
//! involves one of this node's endpoints and that the model now denies, decided by the same
//! evaluator `tortie policy explain` uses. Pure: the driver lists conntrack and deletes.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use super::eval::{Flow, evaluate};
use super::model::Model;

/// Decides, for one model, which flows a change cuts. Built once per change: the set of
/// local endpoint addresses makes the common case (a conntrack entry of no local pod) one
/// hash lookup, whatever the size of the conntrack table.
type FlowKey = (IpAddr, IpAddr, u8, u16, u16, Option<u8>, Option<u8>);

pub struct Cutter<'a> {
    model: &'a Model,
    host: HashSet<IpAddr>,
    local: HashSet<IpAddr>,
    /// Whether any rule matches source ports: if none does, flows that differ only in their
    /// source port (connections of one client to one service) share one evaluation.
    source_ports: bool,
    memo: RefCell<HashMap<FlowKey, bool>>,
}

impl<'a> Cutter<'a> {
    pub fn new(model: &'a Model, host_addrs: &[IpAddr]) -> Cutter<'a> {
        Cutter {
            model,
            host: host_addrs.iter().copied().collect(),
            local: model
                .endpoints
                .iter()
                .filter(|e| e.interface.is_some())
                .flat_map(|e| e.ips.iter().copied())
                .collect(),
            source_ports: model
                .policies
                .iter()
                .flat_map(|p| p.ingress.iter().chain(&p.egress))
                .any(|r| {
                    !r.matches.source.ports.is_empty() || !r.matches.source.not_ports.is_empty()
                }),
            memo: RefCell::new(HashMap::new()),
        }
    }

    /// True when `flow` (a conntrack entry's original direction) should be cut. Flows from
    /// the host's own addresses are never cut: the host reaches its pods without their
    /// ingress policy (kubelet probes), as the dataplane does.
    pub fn cut(&self, flow: &Flow) -> bool {
        if self.host.contains(&flow.src) {
            return false;
        }
        if !self.local.contains(&flow.src) && !self.local.contains(&flow.dst) {
            return false;
        }
        let key = (
            flow.src,
            flow.dst,
            flow.protocol.0,
            if self.source_ports { flow.src_port } else { 0 },
            flow.dst_port,
            flow.icmp_type,
            flow.icmp_code,
        );
        if let Some(&cut) = self.memo.borrow().get(&key) {
            return cut;
        }
        let cut = !evaluate(self.model, flow).allowed;
        self.memo.borrow_mut().insert(key, cut);
        cut
    }
}

/// One flow, without building a `Cutter` (tests, `policy explain`-style single answers).
pub fn cut(model: &Model, host_addrs: &[IpAddr], flow: &Flow) -> bool {
    Cutter::new(model, host_addrs).cut(flow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Protocol;
    use crate::policy::cluster::{ClusterObjects, build_model};

    fn model(deny: bool) -> Model {
        let mut c = ClusterObjects::default();
        for (name, ip) in [("web", "10.0.0.1"), ("db", "10.0.0.2"), ("far", "10.0.9.9")] {
            c.pods.push(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"namespace": "prod", "name": name, "labels": {"app": name}},
                    "spec": {"containers": [{"name": "c"}]},
                    "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
                }))
                .unwrap(),
            );
        }
        if deny {
            c.network_policies.push(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"namespace": "prod", "name": "db-in"},
                    "spec": {"selector": "app == 'db'", "types": ["Ingress"],
                             "ingress": [{"action": "Allow", "protocol": "TCP",
                                          "destination": {"ports": [5432]}}]}
                }))
                .unwrap(),
            );
        }
        let mut m = build_model(&c);
        for ep in &mut m.endpoints {
            if ep.name() != "far" {
                ep.interface = Some(format!("cali{}", ep.name()));
            }
        }
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_flow_the_new_model_denies_is_cut_and_an_allowed_one_is_kept() {
        let host = [ip("198.18.0.1")];
        let to_db = |port| Flow::tcp(ip("10.0.0.1"), ip("10.0.0.2"), port);
        assert!(
            !cut(&model(false), &host, &to_db(9090)),
            "no policy: allowed"
        );
        assert!(cut(&model(true), &host, &to_db(9090)));
        assert!(!cut(&model(true), &host, &to_db(5432)), "allowed port");
        let udp = Flow::new(ip("10.0.0.1"), ip("10.0.0.2"), Protocol::UDP, 5432);
        assert!(cut(&model(true), &host, &udp));
    }

    #[test]
    fn flows_differing_in_source_port_share_a_decision_unless_a_rule_matches_source_ports() {
        let m = model(true);
        let c = Cutter::new(&m, &[]);
        assert!(!c.source_ports);
        let mut f = Flow::tcp(ip("10.0.0.1"), ip("10.0.0.2"), 9090);
        assert!(c.cut(&f));
        f.src_port = 1234;
        assert!(c.cut(&f));
        assert_eq!(c.memo.borrow().len(), 1);
        let mut m = model(true);
        m.policies[0].ingress[0].matches.source.ports = vec![crate::policy::PortMatch::Range(1, 2)];
        assert!(Cutter::new(&m, &[]).source_ports);
    }

    #[test]
    fn host_flows_and_flows_without_a_local_endpoint_are_never_cut() {
        let host = [ip("198.18.0.1")];
        let m = model(true);
        assert!(!cut(&m, &host, &Flow::tcp(host[0], ip("10.0.0.2"), 9090)));
        // Remote pod to an outside address: not this node's business.
        assert!(!cut(
            &m,
            &host,
            &Flow::tcp(ip("10.0.9.9"), ip("192.0.2.1"), 9090)
        ));
        // A remote pod into a local one: the local ingress decides.
        assert!(cut(
            &m,
            &host,
            &Flow::tcp(ip("10.0.9.9"), ip("10.0.0.2"), 9090)
        ));
    }
}
