// The generated CRDs against a real kube-apiserver: they are accepted and Established, every
// kind round-trips through the typed client unchanged, and invalid IPPools are rejected with
// a message that names the offending field.

mod support;

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::core::Status;
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use support::ControlPlane;
use tortie::api::*;

/// Creates `obj`, reads it back, and checks both the create response and the read match.
async fn round_trip<K>(api: &Api<K>, obj: K) -> K
where
    K: Resource + Clone + std::fmt::Debug + Serialize + DeserializeOwned + HasSpec,
    K::Spec: PartialEq + std::fmt::Debug,
{
    let name = obj.meta().name.clone().expect("test objects are named");
    let created = api
        .create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    let read = api
        .get(&name)
        .await
        .unwrap_or_else(|e| panic!("get {name}: {e}"));
    assert_eq!(
        created.spec(),
        obj.spec(),
        "{name}: create response differs"
    );
    assert_eq!(read.spec(), obj.spec(), "{name}: stored object differs");
    read
}

/// The spec of a typed custom resource (the derive gives each kind a `spec` field).
trait HasSpec {
    type Spec;
    fn spec(&self) -> &Self::Spec;
}

macro_rules! has_spec {
    ($($kind:ty => $spec:ty),* $(,)?) => {$(
        impl HasSpec for $kind {
            type Spec = $spec;
            fn spec(&self) -> &$spec { &self.spec }
        }
    )*};
}

has_spec!(
    IPPool => IPPoolSpec,
    IPAMBlock => IPAMBlockSpec,
    BlockAffinity => BlockAffinitySpec,
    IPAMHandle => IPAMHandleSpec,
    IPAMConfig => IPAMConfigSpec,
    IPReservation => IPReservationSpec,
    NetworkPolicy => NetworkPolicySpec,
    GlobalNetworkPolicy => GlobalNetworkPolicySpec,
    ClusterInformation => ClusterInformationSpec,
    FelixConfiguration => FelixConfigurationSpec,
    KubeControllersConfiguration => KubeControllersConfigurationSpec,
    NetworkSet => NetworkSetSpec,
    GlobalNetworkSet => GlobalNetworkSetSpec,
    StagedNetworkPolicy => StagedNetworkPolicySpec,
    StagedGlobalNetworkPolicy => StagedGlobalNetworkPolicySpec,
    StagedKubernetesNetworkPolicy => StagedKubernetesNetworkPolicySpec,
);

fn time(s: &str) -> Time {
    Time(s.parse().expect("test timestamp"))
}

#[tokio::test]
async fn every_crd_is_established_with_its_names_accepted() {
    let cp = ControlPlane::start().await.expect("control plane");
    let api: Api<CustomResourceDefinition> = Api::all(cp.client());
    for want in tortie::api::crdgen::all() {
        let name = want
            .metadata
            .name
            .clone()
            .expect("generated CRDs are named");
        let crd = api
            .get(&name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        for ty in ["Established", "NamesAccepted"] {
            let c = conditions.iter().find(|c| c.type_ == ty);
            assert_eq!(
                c.map(|c| c.status.as_str()),
                Some("True"),
                "{name}: condition {ty} is {c:?}"
            );
        }
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.versions.len(), 1);
        assert_eq!(crd.spec.versions[0].name, VERSION);
        assert!(crd.spec.versions[0].served && crd.spec.versions[0].storage);
    }
}

fn full_pool() -> IPPool {
    IPPool::new(
        "everything",
        IPPoolSpec {
            cidr: "10.250.0.0/16".into(),
            block_size: Some(28),
            ipip_mode: EncapMode::Never,
            vxlan_mode: EncapMode::CrossSubnet,
            nat_outgoing: true,
            disabled: true,
            disable_bgp_export: true,
            node_selector: Some("kubernetes.io/os == 'linux'".into()),
            namespace_selector: Some("team == 'blue'".into()),
            allowed_uses: vec![AllowedUse::Workload, AllowedUse::Tunnel],
            assignment_mode: Some(AssignmentMode::Manual),
        },
    )
}

#[tokio::test]
async fn ippool_round_trips_with_every_field_set() {
    let cp = ControlPlane::start().await.expect("control plane");
    let api: Api<IPPool> = Api::all(cp.client());
    let pool = full_pool();
    round_trip(&api, pool.clone()).await;

    // Field by field in the stored JSON, so a serde rename slip cannot hide behind the
    // typed comparison above.
    let raw = dynamic(&cp.client(), &ApiResource::erase::<IPPool>(&()))
        .get("everything")
        .await
        .expect("get raw pool");
    let spec = &raw.data["spec"];
    for (field, want) in [
        ("cidr", serde_json::json!("10.250.0.0/16")),
        ("blockSize", 28.into()),
        ("ipipMode", "Never".into()),
        ("vxlanMode", "CrossSubnet".into()),
        ("natOutgoing", true.into()),
        ("disabled", true.into()),
        ("disableBGPExport", true.into()),
        ("nodeSelector", "kubernetes.io/os == 'linux'".into()),
        ("namespaceSelector", "team == 'blue'".into()),
        ("allowedUses", serde_json::json!(["Workload", "Tunnel"])),
        ("assignmentMode", "Manual".into()),
    ] {
        assert_eq!(spec[field], want, "spec.{field} in {spec}");
    }

    // Defaults the schema applies match Calico's: encapsulation Never when unset.
    let minimal = api
        .create(
            &PostParams::default(),
            &IPPool::new(
                "minimal",
                IPPoolSpec {
                    cidr: "fd00:10::/48".into(),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect("create minimal IPv6 pool");
    assert_eq!(minimal.spec.vxlan_mode, EncapMode::Never);
    assert_eq!(minimal.spec.ipip_mode, EncapMode::Never);
    assert_eq!(minimal.spec.effective_block_size().unwrap(), 122);
}

fn dynamic(client: &Client, ar: &ApiResource) -> Api<DynamicObject> {
    Api::all_with(client.clone(), ar)
}

/// Creates an IPPool from raw JSON (so invalid enum values can be sent) and returns the
/// API server's rejection.
async fn reject_pool(api: &Api<DynamicObject>, name: &str, spec: serde_json::Value) -> Status {
    let ar = ApiResource::erase::<IPPool>(&());
    let mut obj = DynamicObject::new(name, &ar);
    obj.data = serde_json::json!({ "spec": spec });
    match api.create(&PostParams::default(), &obj).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{name}: {status:?}");
            *status
        }
        other => panic!("{name}: expected 422 Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_ippools_are_rejected_with_the_field_named() {
    let cp = ControlPlane::start().await.expect("control plane");
    let api = dynamic(&cp.client(), &ApiResource::erase::<IPPool>(&()));
    // (name, spec, field path the error must name, words the message must contain)
    let cases: [(&str, serde_json::Value, &str, &str); 9] = [
        (
            "block-33",
            serde_json::json!({"cidr": "10.0.0.0/16", "blockSize": 33}),
            "spec.blockSize",
            "20-32 for an IPv4 pool",
        ),
        (
            "banana",
            serde_json::json!({"cidr": "banana"}),
            "spec.cidr",
            "must be a CIDR",
        ),
        (
            "sometimes",
            serde_json::json!({"cidr": "10.0.0.0/16", "vxlanMode": "Sometimes"}),
            "spec.vxlanMode",
            "\"Sometimes\"",
        ),
        (
            "v6-block-100",
            serde_json::json!({"cidr": "fd00::/48", "blockSize": 100}),
            "spec.blockSize",
            "116-128 for an IPv6 pool",
        ),
        (
            "block-bigger-than-pool",
            serde_json::json!({"cidr": "10.0.0.0/24", "blockSize": 22}),
            "spec.blockSize",
            "shorter than the prefix of cidr",
        ),
        // The default block size (26) does not fit in a /27 either, as in Calico.
        (
            "default-block-bigger-than-pool",
            serde_json::json!({"cidr": "10.0.0.0/27"}),
            "spec.blockSize",
            "shorter than the prefix of cidr",
        ),
        (
            "host-bits",
            serde_json::json!({"cidr": "10.0.0.1/16"}),
            "spec.cidr",
            "no host bits",
        ),
        (
            "ipip-v6",
            serde_json::json!({"cidr": "fd00::/48", "ipipMode": "Always"}),
            "spec.ipipMode",
            "IPv6",
        ),
        (
            "link-local",
            serde_json::json!({"cidr": "169.254.0.0/24"}),
            "spec.cidr",
            "link-local",
        ),
    ];
    for (name, spec, field, words) in cases {
        let status = reject_pool(&api, name, spec).await;
        eprintln!("{name}: {}", status.message);
        assert!(
            status.message.contains(&format!("{field}:")) && status.message.contains(words),
            "{name}: message should name {field} and say {words:?}: {}",
            status.message
        );
    }

    // The rules must not reject what Calico accepts.
    let ok = [
        (
            "v4-32",
            serde_json::json!({"cidr": "10.1.0.0/24", "blockSize": 32}),
        ),
        (
            "v6-128",
            serde_json::json!({"cidr": "fd00:1::/64", "blockSize": 128}),
        ),
        (
            "disabled-small",
            serde_json::json!({"cidr": "10.2.0.0/28", "disabled": true}),
        ),
        (
            "lb",
            serde_json::json!({"cidr": "10.3.0.0/24", "allowedUses": ["LoadBalancer"]}),
        ),
    ];
    for (name, spec) in ok {
        let mut obj = DynamicObject::new(name, &ApiResource::erase::<IPPool>(&()));
        obj.data = serde_json::json!({ "spec": spec });
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("{name} should be accepted: {e}"));
    }

    // cidr is immutable once created.
    let typed: Api<IPPool> = Api::all(cp.client());
    let mut pool = typed.get("v4-32").await.expect("get v4-32");
    pool.spec.cidr = "10.9.0.0/24".into();
    match typed.replace("v4-32", &PostParams::default(), &pool).await {
        Err(kube::Error::Api(s)) => assert!(
            s.message.contains("spec.cidr:") && s.message.contains("immutable"),
            "{}",
            s.message
        ),
        other => panic!("changing cidr should fail, got {other:?}"),
    }
}

fn rule_with_everything() -> tortie::api::Rule {
    tortie::api::Rule {
        action: Action::Allow,
        ip_version: Some(4),
        protocol: Some(IntOrString::String("TCP".into())),
        icmp: None,
        not_protocol: Some(IntOrString::Int(17)),
        not_icmp: Some(ICMPFields {
            type_: Some(8),
            code: Some(0),
        }),
        source: EntityRule {
            nets: vec!["10.0.0.0/8".into()],
            selector: Some("app == 'web'".into()),
            namespace_selector: Some("team == 'blue'".into()),
            not_nets: vec!["10.1.0.0/16".into()],
            not_selector: Some("has(canary)".into()),
            service_accounts: Some(ServiceAccountMatch {
                names: vec!["frontend".into()],
                selector: Some("tier == 'edge'".into()),
            }),
            ..Default::default()
        },
        destination: EntityRule {
            ports: vec![
                IntOrString::Int(80),
                IntOrString::String("8000:8080".into()),
                IntOrString::String("http-alt".into()),
            ],
            not_ports: vec![IntOrString::Int(22)],
            services: Some(ServiceMatch {
                name: Some("api".into()),
                namespace: Some("prod".into()),
            }),
            ..Default::default()
        },
        http: Some(HTTPMatch {
            methods: vec!["GET".into()],
            paths: vec![HTTPPath {
                exact: None,
                prefix: Some("/api".into()),
            }],
        }),
        metadata: Some(RuleMetadata {
            annotations: BTreeMap::from([("owner".to_string(), "net-team".to_string())]),
        }),
    }
}

#[tokio::test]
async fn policies_and_ipam_objects_round_trip_unchanged() {
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    cp.create_namespace("shop").await.expect("namespace");

    let icmp_rule = tortie::api::Rule {
        action: Action::Deny,
        protocol: Some(IntOrString::String("ICMP".into())),
        icmp: Some(ICMPFields {
            type_: Some(8),
            code: None,
        }),
        ..Default::default()
    };
    let np = NetworkPolicy::new(
        "allow-web",
        NetworkPolicySpec {
            tier: Some("default".into()),
            order: Some(100.5),
            selector: Some("app == 'shop'".into()),
            types: vec![PolicyType::Ingress, PolicyType::Egress],
            ingress: vec![rule_with_everything(), icmp_rule.clone()],
            egress: vec![tortie::api::Rule {
                action: Action::Pass,
                ..Default::default()
            }],
            service_account_selector: Some("role == 'shop'".into()),
            performance_hints: vec![PerformanceHint::AssumeNeededOnEveryNode],
        },
    );
    round_trip(&Api::namespaced(client.clone(), "shop"), np).await;

    let gnp = GlobalNetworkPolicy::new(
        "host-protect",
        GlobalNetworkPolicySpec {
            tier: Some("default".into()),
            order: Some(10.0),
            selector: Some("has(host-endpoint)".into()),
            types: vec![PolicyType::Ingress],
            ingress: vec![rule_with_everything(), icmp_rule],
            egress: vec![],
            do_not_track: false,
            pre_dnat: true,
            apply_on_forward: true,
            service_account_selector: Some("all()".into()),
            namespace_selector: Some("global()".into()),
            performance_hints: vec![],
        },
    );
    round_trip(&Api::all(client.clone()), gnp).await;

    let block = IPAMBlock::new(
        "10-244-1-0-30",
        IPAMBlockSpec {
            cidr: "10.244.1.0/30".into(),
            affinity: Some("host:node-a".into()),
            affinity_claim_time: Some(time("2026-11-23T01:02:03Z")),
            allocations: vec![Some(0), None, Some(1), None],
            unallocated: vec![3, 1],
            attributes: vec![
                AllocationAttribute {
                    handle_id: Some("k8s-pod-network.abc".into()),
                    secondary: Some(BTreeMap::from([
                        ("namespace".to_string(), "shop".to_string()),
                        ("node".to_string(), "node-a".to_string()),
                        ("pod".to_string(), "web-0".to_string()),
                    ])),
                    alternate: Some(BTreeMap::from([(
                        "pod".to_string(),
                        "web-0-target".to_string(),
                    )])),
                    released_at: None,
                },
                AllocationAttribute {
                    released_at: Some(time("2026-11-23T01:05:00Z")),
                    ..Default::default()
                },
            ],
            sequence_number: 1_763_859_723_000_000_000,
            sequence_number_for_allocation: Some(BTreeMap::from([
                ("0".to_string(), 1_763_859_723_000_000_000),
                ("2".to_string(), 1_763_859_723_000_000_001),
            ])),
            deleted: false,
            strict_affinity: false,
        },
    );
    round_trip(&Api::all(client.clone()), block).await;

    // An orphan block stores `affinity: null`, which Calico writes and reads.
    let orphan = IPAMBlock::new(
        "10-244-2-0-31",
        IPAMBlockSpec {
            cidr: "10.244.2.0/31".into(),
            affinity: None,
            allocations: vec![None, None],
            unallocated: vec![0, 1],
            deleted: true,
            ..Default::default()
        },
    );
    round_trip(&Api::all(client.clone()), orphan).await;

    let mut affinity = BlockAffinity::new(
        "node-a-10-244-1-0-30",
        BlockAffinitySpec {
            state: AffinityState::Confirmed,
            node: "node-a".into(),
            type_: Some(AffinityType::Host),
            cidr: "10.244.1.0/30".into(),
            deleted: String::new(),
        },
    );
    affinity.spec.set_deleted(false);
    let stored = round_trip(&Api::all(client.clone()), affinity).await;
    assert!(stored.spec.is_confirmed());

    let handle = IPAMHandle::new(
        "k8s-pod-network.abc",
        IPAMHandleSpec {
            handle_id: "k8s-pod-network.abc".into(),
            block: BTreeMap::from([("10.244.1.0/30".to_string(), 1)]),
            deleted: false,
        },
    );
    round_trip(&Api::all(client.clone()), handle).await;

    let config = IPAMConfig::new(
        "default",
        IPAMConfigSpec {
            strict_affinity: true,
            auto_allocate_blocks: true,
            max_blocks_per_host: Some(4),
            kube_virt_vm_address_persistence: Some(VMAddressPersistence::Disabled),
            ip_cooldown_seconds: Some(60),
        },
    );
    let configs: Api<IPAMConfig> = Api::all(client.clone());
    round_trip(&configs, config).await;
    let not_default = IPAMConfig::new("other", IPAMConfigSpec::default());
    match configs.create(&PostParams::default(), &not_default).await {
        Err(kube::Error::Api(s)) => assert!(
            s.message.contains("metadata.name must be default"),
            "{}",
            s.message
        ),
        other => panic!("a second IPAMConfig should be rejected, got {other:?}"),
    }

    let reservation = IPReservation::new(
        "keep-out",
        IPReservationSpec {
            reserved_cidrs: vec!["10.244.1.0/31".into(), "10.244.3.7".into()],
        },
    );
    round_trip(&Api::all(client.clone()), reservation).await;
}

#[tokio::test]
async fn calico_config_kinds_and_network_sets_round_trip_unchanged() {
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    cp.create_namespace("shop").await.expect("namespace");

    let info = ClusterInformation::new(
        "default",
        tortie::api::ClusterInformationSpec::for_tortie("0123456789abcdef0123456789abcdef".into()),
    );
    round_trip(&Api::all(client.clone()), info).await;

    // Typed fields and Calico fields tortie does not implement both survive the API server
    // (the schema preserves unknown fields, as calicoctl's full updates need).
    let felix: FelixConfigurationSpec = serde_json::from_value(serde_json::json!({
        "vxlanMTU": 1400,
        "ipipMTU": 1480,
        "vxlanPort": 4790,
        "vxlanVNI": 4097,
        "routeRefreshInterval": "1m30s",
        "featureDetectOverride": "ChecksumOffloadBroken=true",
        "logSeverityScreen": "Debug",
        "prometheusMetricsPort": 9091,
        "healthPort": 9099,
        "reportingInterval": "0s",
        "bpfEnabled": false,
        "failsafeInboundHostPorts": [{"protocol": "TCP", "port": 22}]
    }))
    .expect("felix spec");
    round_trip(
        &Api::all(client.clone()),
        FelixConfiguration::new("default", felix),
    )
    .await;
    let scoped = FelixConfigurationSpec {
        node_selector: Some("zone == 'a'".into()),
        vxlan_mtu: Some(1350),
        ..Default::default()
    };
    round_trip(
        &Api::all(client.clone()),
        FelixConfiguration::new("zone-a", scoped),
    )
    .await;

    let kcc = KubeControllersConfiguration::new(
        "default",
        tortie::api::KubeControllersConfigurationSpec::for_tortie(900),
    );
    round_trip(&Api::all(client.clone()), kcc).await;

    let set = NetworkSet::new(
        "partners",
        NetworkSetSpec {
            nets: vec!["198.51.100.0/24".into(), "203.0.113.7".into()],
        },
    );
    round_trip(&Api::namespaced(client.clone(), "shop"), set).await;
    let global = GlobalNetworkSet::new(
        "blocked",
        GlobalNetworkSetSpec {
            nets: vec!["192.0.2.0/24".into(), "2001:db8::/32".into()],
        },
    );
    round_trip(&Api::all(client.clone()), global).await;

    let bad = serde_json::json!({
        "apiVersion": "crd.projectcalico.org/v1",
        "kind": "GlobalNetworkSet",
        "metadata": {"name": "bad"},
        "spec": {"nets": ["not-a-net"]}
    });
    let ar = ApiResource::erase::<GlobalNetworkSet>(&());
    let err = dynamic(&client, &ar)
        .create(
            &PostParams::default(),
            &serde_json::from_value(bad).expect("object"),
        )
        .await
        .expect_err("an invalid net is rejected");
    assert!(
        err.to_string().contains("nets entries must be CIDRs"),
        "{err}"
    );
}

#[tokio::test]
async fn staged_policies_round_trip_and_keep_their_staged_action() {
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client();
    let snp: StagedNetworkPolicySpec = serde_json::from_value(serde_json::json!({
        "stagedAction": "Delete",
        "order": 10,
        "selector": "app == 'web'",
        "types": ["Ingress"],
        "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [80, "http"]}}]
    }))
    .expect("staged spec");
    let read = round_trip(
        &Api::namespaced(client.clone(), "default"),
        StagedNetworkPolicy::new("audit-web", snp),
    )
    .await;
    assert_eq!(read.spec.staged_action, StagedAction::Delete);
    let sgnp: StagedGlobalNetworkPolicySpec = serde_json::from_value(serde_json::json!({
        "namespaceSelector": "team == 'blue'",
        "egress": [{"action": "Deny", "destination": {"nets": ["192.0.2.0/24"]}}]
    }))
    .expect("staged global spec");
    round_trip(
        &Api::all(client.clone()),
        StagedGlobalNetworkPolicy::new("audit-egress", sgnp),
    )
    .await;
    let sknp: StagedKubernetesNetworkPolicySpec = serde_json::from_value(serde_json::json!({
        "podSelector": {"matchLabels": {"app": "db"}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}],
                     "ports": [{"port": 5432, "endPort": 5433}]}]
    }))
    .expect("staged k8s spec");
    round_trip(
        &Api::namespaced(client.clone(), "default"),
        StagedKubernetesNetworkPolicy::new("audit-db", sknp),
    )
    .await;
}
