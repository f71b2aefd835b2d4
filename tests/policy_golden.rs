// Calico-only policy semantics that the Kubernetes oracle (cyclonus) does not model, as
// golden tables: each test builds a small cluster from API objects, evaluates flows with the
// same evaluator `tortie policy explain` and the nft compiler use, and checks the verdict
// and who decided it.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use serde_json::{Value, json};
use tortie::api;
use tortie::policy::cluster::{ClusterObjects, build_model};
use tortie::policy::{Decision, Flow, Model, Protocol, Severity, evaluate};

/// Namespaces `prod` (team=blue) and `dev` (team=red); pods:
/// prod/web 10.0.0.1 (app=web, sa=frontend), prod/db 10.0.0.2 (app=db, sa=backend),
/// dev/web 10.0.1.1 (app=web, sa=default), dev/tool 10.0.1.2 (app=tool).
fn cluster() -> ClusterObjects {
    let ns = |name: &str, team: &str| -> Namespace {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"team": team, "kubernetes.io/metadata.name": name}}
        }))
        .unwrap()
    };
    let pod = |ns: &str, name: &str, ip: &str, app: &str, sa: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": {"app": app}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .unwrap()
    };
    let sa = |ns: &str, name: &str, role: &str| -> ServiceAccount {
        serde_json::from_value(
            json!({"metadata": {"namespace": ns, "name": name, "labels": {"role": role}}}),
        )
        .unwrap()
    };
    ClusterObjects {
        namespaces: vec![ns("prod", "blue"), ns("dev", "red")],
        pods: vec![
            pod("prod", "web", "10.0.0.1", "web", "frontend"),
            pod("prod", "db", "10.0.0.2", "db", "backend"),
            pod("dev", "web", "10.0.1.1", "web", "default"),
            pod("dev", "tool", "10.0.1.2", "tool", "default"),
        ],
        service_accounts: vec![sa("prod", "frontend", "fe"), sa("prod", "backend", "be")],
        ..Default::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const WEB: &str = "10.0.0.1";
const DB: &str = "10.0.0.2";
const DEV_WEB: &str = "10.0.1.1";
const DEV_TOOL: &str = "10.0.1.2";
const OUTSIDE: &str = "192.0.2.9";

fn np(ns: &str, name: &str, spec: Value) -> api::NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
        .unwrap()
}

fn gnp(name: &str, spec: Value) -> api::GlobalNetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

fn knp(ns: &str, name: &str, spec: Value) -> K8sNetworkPolicy {
    serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
        .unwrap()
}

fn tcp(m: &Model, from: &str, to: &str, port: u16) -> bool {
    evaluate(m, &Flow::tcp(ip(from), ip(to), port)).allowed
}

fn icmp(m: &Model, from: &str, to: &str, ty: u8, code: u8) -> bool {
    let mut f = Flow::new(ip(from), ip(to), Protocol::ICMP, 0);
    f.icmp_type = Some(ty);
    f.icmp_code = Some(code);
    evaluate(m, &f).allowed
}

#[test]
fn calico_deny_at_order_10_beats_a_kubernetes_allow() {
    let mut c = cluster();
    c.k8s_policies.push(knp(
        "prod",
        "allow-all-in",
        json!({
            "podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{}]
        }),
    ));
    c.network_policies.push(np(
        "prod",
        "deny-dev",
        json!({
            "order": 10, "selector": "all()",
            "ingress": [{"action": "Deny", "source": {"namespaceSelector": "team == 'red'"}}]
        }),
    ));
    let m = build_model(&c);
    assert!(!tcp(&m, DEV_WEB, WEB, 80));
    assert!(tcp(&m, DB, WEB, 80));
    let v = evaluate(&m, &Flow::tcp(ip(DEV_WEB), ip(WEB), 80));
    assert_eq!(
        v.ingress.unwrap().decision,
        Decision::Rule {
            policy: "prod/deny-dev".into(),
            rule: 0,
            action: tortie::policy::Action::Deny
        }
    );
    let v = evaluate(&m, &Flow::tcp(ip(DB), ip(WEB), 80));
    assert!(matches!(v.ingress.unwrap().decision,
        Decision::Rule { ref policy, .. } if policy == "prod/knp.default.allow-all-in"));
}

#[test]
fn pass_skips_later_policies_and_reaches_the_namespace_profile() {
    let mut c = cluster();
    c.network_policies.push(np(
        "prod",
        "pass-web",
        json!({
            "order": 1, "selector": "app == 'web'",
            "ingress": [{"action": "Pass", "source": {"selector": "app == 'db'"}}]
        }),
    ));
    c.network_policies.push(np(
        "prod",
        "deny-rest",
        json!({
            "order": 2, "selector": "all()", "types": ["Ingress"]
        }),
    ));
    let m = build_model(&c);
    assert!(tcp(&m, DB, WEB, 80), "Pass → profile allows");
    let v = evaluate(&m, &Flow::tcp(ip(DB), ip(WEB), 80));
    assert_eq!(
        v.ingress.unwrap().decision,
        Decision::Pass {
            policy: "prod/pass-web".into(),
            rule: 0
        }
    );
    assert!(
        !tcp(&m, DEV_WEB, WEB, 80),
        "no Pass → deny-rest's end of tier"
    );
}

#[test]
fn global_policy_applies_across_namespaces_and_selects_by_namespace_labels() {
    let mut c = cluster();
    c.global_network_policies.push(gnp(
        "web-only-from-blue",
        json!({
            "selector": "app == 'web'",
            "ingress": [{"action": "Allow", "source": {"namespaceSelector": "team == 'blue'"}}]
        }),
    ));
    let m = build_model(&c);
    // Both web pods are selected, whatever their namespace.
    assert!(tcp(&m, DB, WEB, 80));
    assert!(tcp(&m, DB, DEV_WEB, 80));
    assert!(!tcp(&m, DEV_TOOL, WEB, 80));
    assert!(!tcp(&m, DEV_TOOL, DEV_WEB, 80));
    // Not selected: untouched.
    assert!(tcp(&m, DEV_WEB, DEV_TOOL, 80));
}

#[test]
fn selectors_see_pcns_profile_labels_and_the_namespace_label() {
    let mut c = cluster();
    c.global_network_policies.push(gnp("red-tools", json!({
        "selector": "pcns.team == 'red' && projectcalico.org/orchestrator == 'k8s'",
        "types": ["Egress"],
        "egress": [{"action": "Allow", "destination": {"selector": "projectcalico.org/namespace == 'dev'"}}]
    })));
    let m = build_model(&c);
    assert!(tcp(&m, DEV_TOOL, DEV_WEB, 80));
    assert!(!tcp(&m, DEV_TOOL, WEB, 80));
    assert!(tcp(&m, WEB, DEV_TOOL, 80), "prod pods are not selected");
}

#[test]
fn global_namespace_selector_on_the_policy_selects_by_namespace() {
    let mut c = cluster();
    c.global_network_policies.push(gnp(
        "isolate-blue",
        json!({
            "namespaceSelector": "team == 'blue'", "types": ["Ingress"]
        }),
    ));
    let m = build_model(&c);
    assert!(!tcp(&m, DEV_WEB, WEB, 80));
    assert!(!tcp(&m, WEB, DB, 80));
    assert!(tcp(&m, WEB, DEV_WEB, 80));
}

#[test]
fn service_account_selector_and_rule_service_accounts() {
    let mut c = cluster();
    c.network_policies.push(np(
        "prod",
        "db-from-frontend",
        json!({
            "serviceAccountSelector": "role == 'be'",
            "ingress": [{"action": "Allow", "source": {"serviceAccounts": {"names": ["frontend"]}}}]
        }),
    ));
    let m = build_model(&c);
    assert!(tcp(&m, WEB, DB, 5432));
    assert!(!tcp(&m, DEV_WEB, DB, 5432));
    // prod/web (sa frontend, role fe) is not selected.
    assert!(tcp(&m, DB, WEB, 80));
}

#[test]
fn not_nets_and_nets_only_rules_are_not_scoped_to_the_namespace() {
    let mut c = cluster();
    c.network_policies.push(np("prod", "web-in", json!({
        "selector": "app == 'web'",
        "ingress": [{"action": "Allow", "source": {"nets": ["10.0.0.0/16"], "notNets": ["10.0.1.2/32"]}}]
    })));
    let m = build_model(&c);
    assert!(
        tcp(&m, DEV_WEB, WEB, 80),
        "nets-only: other namespaces' pods match"
    );
    assert!(!tcp(&m, DEV_TOOL, WEB, 80), "notNets excludes");
    assert!(!tcp(&m, OUTSIDE, WEB, 80), "outside nets");
}

#[test]
fn not_selector_excludes_and_scopes_the_rule_to_the_namespace() {
    let mut c = cluster();
    c.network_policies.push(np(
        "prod",
        "web-in",
        json!({
            "selector": "app == 'web'",
            "ingress": [{"action": "Allow", "source": {"notSelector": "app == 'db'"}}]
        }),
    ));
    let m = build_model(&c);
    assert!(!tcp(&m, DB, WEB, 80), "notSelector excludes db");
    // Calico adds the namespace test when a notSelector is present: other namespaces and
    // outside addresses do not match.
    assert!(!tcp(&m, DEV_TOOL, WEB, 80));
    assert!(!tcp(&m, OUTSIDE, WEB, 80));
}

#[test]
fn icmp_type_and_code_and_not_icmp_is_not_of_type_and_code() {
    let mut c = cluster();
    c.network_policies.push(np(
        "prod",
        "ping",
        json!({
            "selector": "app == 'web'",
            "ingress": [
                {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}},
                {"action": "Allow", "protocol": "ICMP", "notICMP": {"type": 3, "code": 4}}
            ]
        }),
    ));
    let m = build_model(&c);
    assert!(icmp(&m, DB, WEB, 8, 0));
    // Type 3 code 4 is the only thing the second rule excludes; type 3 code 1 matches it:
    // NOT(type AND code), not (type != T AND code != C) as Felix renders it.
    assert!(!icmp(&m, DB, WEB, 3, 4));
    assert!(icmp(&m, DB, WEB, 3, 1));
    assert!(icmp(&m, DB, WEB, 0, 4));
    assert!(!tcp(&m, DB, WEB, 80));
}

#[test]
fn log_rules_record_and_continue() {
    let mut c = cluster();
    c.network_policies.push(np("prod", "log-then-allow", json!({
        "selector": "app == 'web'",
        "ingress": [{"action": "Log"}, {"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}]
    })));
    let m = build_model(&c);
    let v = evaluate(&m, &Flow::tcp(ip(DB), ip(WEB), 80));
    assert!(v.allowed);
    let ing = v.ingress.unwrap();
    assert_eq!(ing.logged, vec![("prod/log-then-allow".to_string(), 0)]);
    assert!(!tcp(&m, DB, WEB, 81));
}

#[test]
fn staged_policy_counts_would_be_denies_but_never_drops() {
    let mut c = cluster();
    c.staged_network_policies.push(
        serde_json::from_value(json!({
            "metadata": {"namespace": "prod", "name": "lockdown"},
            "spec": {"selector": "app == 'web'", "types": ["Ingress"],
                     "ingress": [{"action": "Allow", "source": {"selector": "app == 'db'"}}]}
        }))
        .unwrap(),
    );
    let m = build_model(&c);
    let v = evaluate(&m, &Flow::tcp(ip(DEV_WEB), ip(WEB), 80));
    assert!(v.allowed, "staged policies are not enforced");
    assert_eq!(
        v.ingress.unwrap().staged_would_deny,
        vec!["prod/staged:lockdown".to_string()]
    );
    let v = evaluate(&m, &Flow::tcp(ip(DB), ip(WEB), 80));
    assert!(v.ingress.unwrap().staged_would_deny.is_empty());
}

#[test]
fn unparseable_rule_selector_fails_closed_and_names_the_field() {
    let mut c = cluster();
    c.network_policies.push(np(
        "prod",
        "broken",
        json!({
            "selector": "app == 'web'",
            "ingress": [{"action": "Allow", "source": {"selector": "app == "}}]
        }),
    ));
    c.network_policies.push(np(
        "prod",
        "fine",
        json!({
            "selector": "app == 'db'",
            "ingress": [{"action": "Allow"}]
        }),
    ));
    let m = build_model(&c);
    assert!(!tcp(&m, DB, WEB, 80), "broken policy's endpoints deny");
    assert!(tcp(&m, WEB, DB, 80), "other policies are unaffected");
    let d = m
        .diagnostics
        .iter()
        .find(|d| d.policy.name == "broken")
        .unwrap();
    assert_eq!(d.severity, Severity::FailClosed);
    assert_eq!(d.field, "spec.ingress[0].source.selector");
}

#[test]
fn unparseable_own_selector_selects_nothing() {
    let mut c = cluster();
    c.network_policies.push(np(
        "prod",
        "bad-sel",
        json!({
            "selector": "app ==", "types": ["Ingress"]
        }),
    ));
    let m = build_model(&c);
    assert!(tcp(&m, DB, WEB, 80));
    assert!(
        m.diagnostics
            .iter()
            .any(|d| d.severity == Severity::SelectsNothing)
    );
}

#[test]
fn order_lower_first_missing_last_ties_by_name() {
    let mut c = cluster();
    let deny = json!([{"action": "Deny"}]);
    let allow = json!([{"action": "Allow"}]);
    c.network_policies.push(np(
        "prod",
        "a-no-order",
        json!({"selector": "app == 'web'", "ingress": deny}),
    ));
    c.network_policies.push(np(
        "prod",
        "z-order-5",
        json!({"order": 5, "selector": "app == 'web'", "ingress": allow}),
    ));
    let m = build_model(&c);
    assert!(tcp(&m, DB, WEB, 80), "ordered policy before unordered one");
    let mut c = cluster();
    c.network_policies.push(np(
        "prod",
        "b",
        json!({"order": 5, "selector": "app == 'web'", "ingress": allow}),
    ));
    c.network_policies.push(np(
        "prod",
        "a",
        json!({"order": 5, "selector": "app == 'web'", "ingress": deny}),
    ));
    let m = build_model(&c);
    assert!(!tcp(&m, DB, WEB, 80), "same order: name a first");
}

#[test]
fn types_default_to_egress_when_only_egress_rules_exist() {
    let mut c = cluster();
    c.network_policies.push(np(
        "prod",
        "egress-only",
        json!({
            "selector": "app == 'web'",
            "egress": [{"action": "Allow", "destination": {"selector": "app == 'db'"}}]
        }),
    ));
    let m = build_model(&c);
    assert!(tcp(&m, WEB, DB, 80));
    assert!(!tcp(&m, WEB, DEV_WEB, 80));
    // Ingress is not governed by it (Felix's empty-types reading would deny this).
    assert!(tcp(&m, DEV_WEB, WEB, 80));
}

#[test]
fn network_sets_are_matched_by_rule_selectors() {
    let mut c = cluster();
    c.global_network_sets.push(
        serde_json::from_value(json!({
            "metadata": {"name": "partners", "labels": {"kind": "partner"}},
            "spec": {"nets": ["192.0.2.0/24"]}
        }))
        .unwrap(),
    );
    c.network_sets.push(
        serde_json::from_value(json!({
            "metadata": {"namespace": "prod", "name": "office", "labels": {"kind": "office"}},
            "spec": {"nets": ["198.51.100.0/24"]}
        }))
        .unwrap(),
    );
    c.network_policies.push(np("prod", "web-in", json!({
        "selector": "app == 'web'",
        "ingress": [
            {"action": "Allow", "source": {"selector": "kind == 'office'"}},
            {"action": "Allow", "source": {"namespaceSelector": "global()", "selector": "kind == 'partner'"}}
        ]
    })));
    let m = build_model(&c);
    assert!(
        tcp(&m, "198.51.100.7", WEB, 80),
        "namespaced set in the policy's namespace"
    );
    assert!(tcp(&m, OUTSIDE, WEB, 80), "global set through global()");
    assert!(!tcp(&m, "203.0.113.1", WEB, 80));
}

#[test]
fn named_ports_resolve_per_destination_pod_also_on_calico_rules() {
    let mut c = cluster();
    c.network_policies.push(np("prod", "http-only", json!({
        "selector": "app == 'db'",
        "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["http", "9000:9010"]}}]
    })));
    let m = build_model(&c);
    assert!(tcp(&m, WEB, DB, 8080));
    assert!(tcp(&m, WEB, DB, 9005));
    assert!(!tcp(&m, WEB, DB, 8081));
}

#[test]
fn do_not_track_pre_dnat_and_other_tiers_are_reported_not_applied() {
    let mut c = cluster();
    c.global_network_policies.push(gnp("untracked", json!({
        "doNotTrack": true, "applyOnForward": true, "selector": "all()", "ingress": [{"action": "Deny"}]
    })));
    c.global_network_policies.push(gnp(
        "security-tier",
        json!({
            "tier": "security", "selector": "all()", "ingress": [{"action": "Deny"}]
        }),
    ));
    let m = build_model(&c);
    assert!(tcp(&m, DB, WEB, 80));
    let fields: Vec<&str> = m
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::NotApplied)
        .map(|d| d.field.as_str())
        .collect();
    assert_eq!(
        fields,
        ["spec.doNotTrack", "spec.applyOnForward", "spec.tier"]
    );
}

#[test]
fn kubernetes_policy_named_port_end_port_and_and_or_peers() {
    let mut c = cluster();
    c.k8s_policies.push(knp("prod", "db", json!({
        "podSelector": {"matchLabels": {"app": "db"}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}, "podSelector": {"matchLabels": {"app": "tool"}}}],
             "ports": [{"port": "http"}]},
            {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
             "ports": [{"port": 9000, "endPort": 9002, "protocol": "TCP"}]}
        ]
    })));
    let m = build_model(&c);
    assert!(tcp(&m, DEV_TOOL, DB, 8080), "AND peer, named port");
    assert!(!tcp(&m, DEV_WEB, DB, 8080), "AND peer: wrong pod");
    assert!(
        !tcp(&m, DEV_TOOL, DB, 9001),
        "port belongs to the other rule"
    );
    assert!(tcp(&m, WEB, DB, 9002));
    assert!(
        !tcp(&m, DEV_WEB, DB, 9001),
        "podSelector alone is the policy's namespace"
    );
    let p = &m.policies[0];
    assert_eq!(p.order, Some(1000.0));
    assert_eq!(p.id.display_name(), "prod/knp.default.db");
}
