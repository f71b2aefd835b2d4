//! KubeControllersConfiguration: Calico kube-controllers' settings, one object named
//! `default`. tortie runs the IPAM part of kube-controllers itself (leader's GC); calicoctl
//! reads this object in `ipam check` (the load-balancer controller decides whether service
//! IPs count as in use), so the leader creates it when absent.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Name of the singleton.
pub const KUBE_CONTROLLERS_CONFIGURATION_NAME: &str = "default";

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "KubeControllersConfiguration",
    doc = "Settings of Calico's controllers, singleton named default (Calico KubeControllersConfiguration)",
    plural = "kubecontrollersconfigurations",
    singular = "kubecontrollersconfiguration",
    derive = "PartialEq",
    status = "KubeControllersConfigurationStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct KubeControllersConfigurationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(None|Debug|Info|Warning|Error|Fatal|Panic)$"))]
    pub log_severity_screen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_checks: Option<EnabledState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_v3_compaction_period: Option<String>,
    /// 0 disables the metrics server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub prometheus_metrics_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub debug_profile_port: Option<i32>,
    /// Which controllers run, and their settings.
    #[serde(default)]
    pub controllers: ControllersConfig,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnabledState {
    Enabled,
    Disabled,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ControllersConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeControllerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ReconcilerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_endpoint: Option<ReconcilerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ReconcilerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<ReconcilerConfig>,
    /// Present: Calico assigns LoadBalancer service IPs (calicoctl then counts them in use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerControllerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_migration: Option<PolicyMigrationConfig>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReconcilerConfig {
    /// Go duration, e.g. `5m0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconciler_period: Option<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeControllerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconciler_period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_labels: Option<EnabledState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_endpoint: Option<AutoHostEndpointConfig>,
    /// How long an address must stay leaked before it is released (Go duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leak_grace_period: Option<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoHostEndpointConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_create: Option<EnabledState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_default_host_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<AutoHostEndpointTemplate>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoHostEndpointTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub generate_name: Option<String>,
    #[serde(
        rename = "interfaceCIDRs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub interface_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_pattern: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerControllerConfig {
    #[serde(rename = "assignIPs", default, skip_serializing_if = "Option::is_none")]
    pub assign_ips: Option<AssignIPs>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssignIPs {
    AllServices,
    RequestedServicesOnly,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct PolicyMigrationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<EnabledState>,
}

/// What kube-controllers reports it runs with.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KubeControllersConfigurationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_config: Option<KubeControllersConfigurationSpec>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment_vars: BTreeMap<String, String>,
}

/// Go's `time.Duration` text for whole seconds, as Calico stores durations (`15m0s`).
pub fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

impl KubeControllersConfigurationSpec {
    /// What the leader writes when the object is absent: the node controller's leak grace
    /// period (tortie's `--ipam-gc-grace`, which is what tortie's GC uses), and no
    /// load-balancer controller, since tortie assigns no service IPs.
    pub fn for_tortie(leak_grace_secs: u64) -> KubeControllersConfigurationSpec {
        KubeControllersConfigurationSpec {
            log_severity_screen: Some("Info".into()),
            health_checks: Some(EnabledState::Enabled),
            controllers: ControllersConfig {
                node: Some(NodeControllerConfig {
                    leak_grace_period: Some(go_duration(leak_grace_secs)),
                    ..NodeControllerConfig::default()
                }),
                ..ControllersConfig::default()
            },
            ..KubeControllersConfigurationSpec::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_the_go_way() {
        assert_eq!(go_duration(900), "15m0s");
        assert_eq!(go_duration(45), "45s");
        assert_eq!(go_duration(3725), "1h2m5s");
    }

    #[test]
    fn uses_calico_field_names() {
        let mut s = KubeControllersConfigurationSpec::for_tortie(900);
        s.controllers.load_balancer = Some(LoadBalancerControllerConfig {
            assign_ips: Some(AssignIPs::AllServices),
        });
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["controllers"]["node"]["leakGracePeriod"], "15m0s");
        assert_eq!(v["controllers"]["loadBalancer"]["assignIPs"], "AllServices");
        assert_eq!(v["healthChecks"], "Enabled");
        assert_eq!(v["logSeverityScreen"], "Info");
    }
}
