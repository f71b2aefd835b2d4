// The incremental policy calculation (`PolicyCalc`) against the full compile: random
// sequences of changes (pods, labels, namespaces, service accounts, network sets, every
// policy kind, local endpoint overrides) applied to a snapshot of shared `Arc`s, as the
// stores hand them out. After every step the calculator's table must equal a compile from
// scratch, and a copy of the previous table patched with only the names the calculator
// reported as touched must equal it too (what the nft driver relies on). Pure: no root.

#[path = "policy_gen/mod.rs"]
mod policy_gen;

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::ResourceExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tortie::api;
use tortie::calc::policy::{
    LocalOverride, LocalOverrides, PolicyCalc, PolicySnapshot, local_model,
};
use tortie::datastore::pods::CachedPod;
use tortie::desired::nft::Table;
use tortie::policy::cluster::ClusterObjects;
use tortie::policy::compile::{CompileOptions, compile};

const NODE: &str = "n1";

fn objects(s: &PolicySnapshot) -> ClusterObjects {
    s.to_objects()
}

/// Replaces the object with the same namespace/name (or adds it); a new `Arc` as a store
/// would hold after an update.
fn upsert<K: kube::Resource>(v: &mut Vec<Arc<K>>, obj: K) {
    let key = (obj.namespace(), obj.name_any());
    match v.iter().position(|o| (o.namespace(), o.name_any()) == key) {
        Some(i) => v[i] = Arc::new(obj),
        None => v.push(Arc::new(obj)),
    }
}

fn remove_random<K>(rng: &mut StdRng, v: &mut Vec<Arc<K>>) {
    if !v.is_empty() {
        let i = rng.random_range(0..v.len());
        v.remove(i);
    }
}

fn pick<'a, T>(rng: &mut StdRng, xs: &'a [T]) -> &'a T {
    &xs[rng.random_range(0..xs.len())]
}

const SELECTORS: [&str; 8] = [
    "",
    "pod == 'a'",
    "tier == 'fe'",
    "has(tier)",
    "!has(tier)",
    "pod in {'a', 'b'}",
    "role == 'db'",
    "all()",
];

fn calico_rule(rng: &mut StdRng) -> Value {
    let mut side = serde_json::Map::new();
    match rng.random_range(0..6) {
        0 => {
            side.insert("selector".into(), json!(pick(rng, &SELECTORS[1..])));
        }
        1 => {
            side.insert("notSelector".into(), json!(pick(rng, &SELECTORS[1..])));
        }
        2 => {
            side.insert(
                "nets".into(),
                json!(["10.1.0.0/16", "10.1.1.0/24", "10.9.0.0/16"]),
            );
        }
        3 => {
            side.insert("namespaceSelector".into(), json!("env == 'prod'"));
        }
        4 => {
            side.insert("selector".into(), json!("role == 'db'"));
            side.insert("notNets".into(), json!(["10.1.2.0/24"]));
        }
        _ => {}
    }
    let mut dst = serde_json::Map::new();
    if rng.random_bool(0.5) {
        dst.insert(
            "ports".into(),
            json!(
                pick(
                    rng,
                    &[json!([80]), json!(["web", 81]), json!(["80:90", 443])]
                )
                .clone()
            ),
        );
    }
    let action = pick(rng, &["Allow", "Deny", "Pass", "Log"]);
    json!({"action": action, "protocol": "TCP", "source": side, "destination": dst})
}

fn calico_spec(rng: &mut StdRng, global: bool) -> Value {
    let mut spec = serde_json::Map::new();
    spec.insert("selector".into(), json!(pick(rng, &SELECTORS)));
    if rng.random_bool(0.7) {
        spec.insert("order".into(), json!(rng.random_range(0..5) * 10));
    }
    if global && rng.random_bool(0.3) {
        spec.insert("namespaceSelector".into(), json!("env == 'dev'"));
    }
    let n = rng.random_range(0..3);
    spec.insert(
        "ingress".into(),
        Value::Array((0..n).map(|_| calico_rule(rng)).collect()),
    );
    let n = rng.random_range(0..2);
    spec.insert(
        "egress".into(),
        Value::Array((0..n).map(|_| calico_rule(rng)).collect()),
    );
    Value::Object(spec)
}

fn pod(rng: &mut StdRng, ns: &str, name: &str, ip: &str) -> Pod {
    let mut labels = serde_json::Map::new();
    labels.insert("pod".into(), json!(pick(rng, &["a", "b", "c"])));
    if rng.random_bool(0.5) {
        labels.insert("tier".into(), json!(pick(rng, &["fe", "be"])));
    }
    if rng.random_bool(0.2) {
        labels.insert("role".into(), json!("db"));
    }
    let node = pick(rng, &[NODE, NODE, "n2", "n3"]);
    let sa = pick(rng, &["", "default", "robot"]);
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "ports": [
            {"name": "web", "containerPort": pick(rng, &[80, 81]), "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .expect("pod")
}

/// One random change to the snapshot (and maybe the calculator's local overrides).
fn step(
    rng: &mut StdRng,
    s: &mut PolicySnapshot,
    overrides: &mut LocalOverrides,
    calc: &mut PolicyCalc,
    i: usize,
) -> String {
    let ns = policy_gen::NAMESPACES[rng.random_range(0..3)].0;
    match rng.random_range(0..14) {
        0 | 1 => {
            let mut p = policy_gen::policy(rng, i % 6);
            p["metadata"]["namespace"] = json!(ns);
            upsert(&mut s.k8s_policies, serde_json::from_value(p).unwrap());
            "k8s policy".into()
        }
        2 => {
            remove_random(rng, &mut s.k8s_policies);
            "k8s policy removed".into()
        }
        3 => {
            let name = format!("cnp{}", rng.random_range(0..4));
            let p = json!({"metadata": {"namespace": ns, "name": name}, "spec": calico_spec(rng, false)});
            upsert(&mut s.network_policies, serde_json::from_value(p).unwrap());
            "calico policy".into()
        }
        4 => {
            let name = format!("gnp{}", rng.random_range(0..3));
            let p = json!({"metadata": {"name": name}, "spec": calico_spec(rng, true)});
            upsert(
                &mut s.global_network_policies,
                serde_json::from_value(p).unwrap(),
            );
            if rng.random_bool(0.3) {
                remove_random(rng, &mut s.network_policies);
            }
            "global policy".into()
        }
        5 => {
            // Staged ones, sometimes sharing a name with an enforced one.
            let name = format!("cnp{}", rng.random_range(0..4));
            let p = json!({"metadata": {"namespace": ns, "name": name}, "spec": calico_spec(rng, false)});
            upsert(
                &mut s.staged_network_policies,
                serde_json::from_value::<api::StagedNetworkPolicy>(p).unwrap(),
            );
            if rng.random_bool(0.3) {
                remove_random(rng, &mut s.staged_network_policies);
            }
            "staged policy".into()
        }
        6..=8 => {
            let name = format!("p{}", rng.random_range(0..5));
            let ip = format!(
                "10.1.{}.{}",
                rng.random_range(0..3),
                rng.random_range(10..14)
            );
            if rng.random_bool(0.15) {
                let key = (ns.to_string(), name.clone());
                s.pods
                    .retain(|p| (p.namespace().unwrap_or_default(), p.name_any()) != key);
                format!("pod {ns}/{name} removed")
            } else {
                upsert(&mut s.pods, CachedPod::from_pod(&pod(rng, ns, &name, &ip)));
                format!("pod {ns}/{name} {ip}")
            }
        }
        9 => {
            let env = pick(rng, &["prod", "dev", "test"]);
            let n: Namespace = serde_json::from_value(json!({"metadata": {"name": ns,
                "labels": {"ns": ns, "env": env, "kubernetes.io/metadata.name": ns}}}))
            .unwrap();
            upsert(&mut s.namespaces, n);
            format!("namespace {ns} env={env}")
        }
        10 => {
            let team = pick(rng, &["a", "b"]);
            let sa: ServiceAccount = serde_json::from_value(
                json!({"metadata": {"namespace": ns, "name": "robot", "labels": {"team": team}}}),
            )
            .unwrap();
            upsert(&mut s.service_accounts, sa);
            "service account".into()
        }
        11 => {
            let nets = pick(
                rng,
                &[
                    json!(["192.0.2.0/24", "192.0.2.7/32"]),
                    json!(["10.1.0.0/16"]),
                    json!(["10.1.1.11/32", "2001:db8::/64"]),
                ],
            )
            .clone();
            let name = format!("ns{}", rng.random_range(0..2));
            let set = json!({"metadata": {"namespace": ns, "name": name, "labels": {"role": "db"}}, "spec": {"nets": nets}});
            upsert(
                &mut s.network_sets,
                serde_json::from_value::<api::NetworkSet>(set).unwrap(),
            );
            let gset = json!({"metadata": {"name": "g", "labels": {"role": pick(rng, &["db", "web"])}}, "spec": {"nets": ["198.51.100.0/24"]}});
            upsert(
                &mut s.global_network_sets,
                serde_json::from_value::<api::GlobalNetworkSet>(gset).unwrap(),
            );
            "network sets".into()
        }
        12 => {
            let name = format!("p{}", rng.random_range(0..5));
            let key = (ns.to_string(), name.clone());
            if rng.random_bool(0.5) {
                let l = LocalOverride {
                    interface: format!("calitest{}", rng.random_range(0..100)),
                    ips: vec![
                        format!("10.7.0.{}", rng.random_range(1..9))
                            .parse()
                            .unwrap(),
                    ],
                };
                overrides.insert(key, l.clone());
                calc.set_local(ns, &name, Some(l));
            } else {
                overrides.remove(&key);
                calc.set_local(ns, &name, None);
            }
            format!("override {ns}/{name}")
        }
        _ => {
            // A pod waiting for its address: only an override can make it an endpoint.
            let name = format!("p{}", rng.random_range(0..5));
            let mut p = pod(rng, ns, &name, "10.1.0.99");
            p.status = None;
            upsert(&mut s.pods, CachedPod::from_pod(&p));
            format!("pod {ns}/{name} without address")
        }
    }
}

fn patch(known: &mut Table, want: &Table, touched: &tortie::policy::incremental::Touched) {
    // `sets` names maps too (one namespace in nft), as the driver reads it.
    for n in &touched.sets {
        match want.sets.get(n) {
            Some(s) => known.sets.insert(n.clone(), s.clone()),
            None => known.sets.remove(n),
        };
        match want.maps.get(n) {
            Some(m) => known.maps.insert(n.clone(), m.clone()),
            None => known.maps.remove(n),
        };
    }
    for n in &touched.chains {
        match want.chains.get(n) {
            Some(c) => known.chains.insert(n.clone(), c.clone()),
            None => known.chains.remove(n),
        };
    }
}

fn diff(a: &Table, b: &Table) -> String {
    let mut out = Vec::new();
    for (n, s) in &a.sets {
        if b.sets.get(n) != Some(s) {
            out.push(format!(
                "set {n}: {:?} vs {:?}",
                s.elements,
                b.sets.get(n).map(|s| &s.elements)
            ));
        }
    }
    for n in b.sets.keys().filter(|n| !a.sets.contains_key(*n)) {
        out.push(format!("set {n} only in the second"));
    }
    for (n, c) in &a.chains {
        if b.chains.get(n) != Some(c) {
            out.push(format!(
                "chain {n}: {:?} vs {:?}",
                c.rules,
                b.chains.get(n).map(|c| &c.rules)
            ));
        }
    }
    for n in b.chains.keys().filter(|n| !a.chains.contains_key(*n)) {
        out.push(format!("chain {n} only in the second"));
    }
    if a.maps != b.maps {
        out.push(format!("maps: {:?} vs {:?}", a.maps, b.maps));
    }
    out.join("\n")
}

#[test]
fn incremental_calculation_equals_a_full_compile_after_every_change() {
    let opts = CompileOptions::default();
    for seed in 0..60u64 {
        let mut rng = StdRng::seed_from_u64(0x5ca1e + seed);
        let mut s = PolicySnapshot::from_objects(&policy_gen::cluster());
        // Half the generator's pods run here.
        for (i, p) in s.pods.iter_mut().enumerate() {
            let mut pod = (**p).clone();
            pod.node_name = Some(if i % 2 == 0 { NODE } else { "n2" }.into());
            *p = Arc::new(pod);
        }
        let mut overrides = LocalOverrides::new();
        let mut calc = PolicyCalc::new(NODE, &opts);
        let mut known = calc.table().clone();
        let mut log = Vec::new();
        for i in 0..40 {
            // Some passes carry several changes (one batch: chains rebuilt once, at its end).
            for _ in 0..rng.random_range(1..4) {
                log.push(step(&mut rng, &mut s, &mut overrides, &mut calc, i));
            }
            calc.sync(&s);
            let touched = calc.take_touched();
            patch(&mut known, calc.table(), &touched);
            let want = compile(&local_model(&objects(&s), NODE, &overrides), &opts);
            assert!(
                calc.table() == &want,
                "seed {seed} after {log:?}:\n{}",
                diff(calc.table(), &want)
            );
            assert!(
                known == want,
                "seed {seed}: touched names missed a change after {log:?}:\n{}",
                diff(&known, &want)
            );
        }
    }
}
