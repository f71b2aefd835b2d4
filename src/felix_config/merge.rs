//! Pure: the settings tortie applies, merged from FelixConfiguration objects and tortie's own
//! flags with Felix's precedence (felix/config/config_params.go `SourcesInDescendingOrder`):
//! a flag or environment variable set explicitly beats `node.<nodename>`, which beats the
//! oldest matching `nodeSelector` object, which beats `default`, which beats tortie's
//! defaults. Fields tortie does not apply are listed for a warning, never silently dropped.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::api::felixconfiguration::{FelixConfigurationSpec, GLOBAL_NAME, node_object_name};
use crate::calc::mtu::{IPIP_OVERHEAD, VXLAN_OVERHEAD};
use crate::selector::Selector;

pub const DEFAULT_VXLAN_PORT: u16 = 4789;
pub const DEFAULT_VXLAN_VNI: u32 = 4096;
pub const DEFAULT_ROUTE_REFRESH: Duration = Duration::from_secs(90);
pub const DEFAULT_HEALTH_PORT: u16 = 9099;
pub const DEFAULT_METRICS_PORT: u16 = 9091;
/// tortie listens on every address by default (kubelet probes the pod IP, which is the
/// node's with hostNetwork); Felix's own default health host is `localhost`.
pub const DEFAULT_LISTEN_HOST: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// Suffix tortie's log filters carry (kube's per-request errors are logged with context by
/// the callers; see `telemetry::DEFAULT_FILTER`).
const LOG_FILTER_SUFFIX: &str = ",kube_client::client::builder=off";

/// Settings given to tortie explicitly by flag or environment variable: Felix's
/// "environment variable" source, which wins over every FelixConfiguration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Local {
    pub health_host: Option<IpAddr>,
    pub health_port: Option<u16>,
    pub metrics_host: Option<IpAddr>,
    pub metrics_port: Option<u16>,
    pub route_refresh: Option<Duration>,
    pub checksum_offload_broken: Option<bool>,
    /// `--log-level`/`TORTIE_LOG_LEVEL` or `RUST_LOG` was set.
    pub log_level_set: bool,
}

/// Where a value came from, for the log line that reports a change.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Default,
    Global,
    Selector(String),
    Node(String),
    Local,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::Global => write!(f, "FelixConfiguration {GLOBAL_NAME}"),
            Source::Selector(n) | Source::Node(n) => write!(f, "FelixConfiguration {n}"),
            Source::Local => write!(f, "flag or environment variable"),
        }
    }
}

/// The settings in force. `None` MTUs mean "the host MTU less the encapsulation's
/// overhead", Felix's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub vxlan_mtu: Option<u32>,
    pub ipip_mtu: Option<u32>,
    pub vxlan_port: u16,
    pub vxlan_vni: u32,
    pub route_refresh: Duration,
    pub checksum_offload_broken: Option<bool>,
    /// A log filter from `logSeverityScreen`; None leaves the one tortie started with.
    pub log_filter: Option<String>,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    /// Field name → source of every value not at its default.
    pub sources: BTreeMap<&'static str, Source>,
}

impl Default for Effective {
    fn default() -> Effective {
        merge(&Local::default(), &Sources::default())
    }
}

/// One FelixConfiguration object as the merge reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub name: String,
    pub created: Option<DateTime<Utc>>,
    pub spec: FelixConfigurationSpec,
}

/// The objects that apply to one node, already chosen by `Sources::select`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sources {
    pub global: Option<Object>,
    pub selector: Option<Object>,
    pub node: Option<Object>,
}

impl Sources {
    /// Picks `default`, `node.<node>` and the selector-scoped object that applies to a
    /// node with `labels`: of several matching, the oldest (then the lowest name), as
    /// Felix's config batcher does. An unparsable selector matches nothing.
    pub fn select(objects: &[Object], node: &str, labels: &BTreeMap<String, String>) -> Sources {
        let own = node_object_name(node);
        let mut out = Sources::default();
        let mut matching: Vec<&Object> = Vec::new();
        for o in objects {
            if o.name == GLOBAL_NAME {
                out.global = Some(o.clone());
            } else if o.name == own {
                out.node = Some(o.clone());
            } else if let Some(sel) = o.spec.node_selector.as_deref().filter(|s| !s.is_empty())
                && let Ok(sel) = sel.parse::<Selector>()
                && sel.matches(labels)
            {
                matching.push(o);
            }
        }
        out.selector = matching
            .into_iter()
            .min_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)))
            .cloned();
        out
    }

    /// Highest FelixConfiguration source first.
    fn in_precedence(&self) -> Vec<(Source, &FelixConfigurationSpec)> {
        let mut out = Vec::new();
        if let Some(o) = &self.node {
            out.push((Source::Node(o.name.clone()), &o.spec));
        }
        if let Some(o) = &self.selector {
            out.push((Source::Selector(o.name.clone()), &o.spec));
        }
        if let Some(o) = &self.global {
            out.push((Source::Global, &o.spec));
        }
        out
    }
}

/// Picks each field's highest-precedence usable value, remembering where it came from.
struct Picker<'a> {
    sources: Vec<(Source, &'a FelixConfigurationSpec)>,
    noted: BTreeMap<&'static str, Source>,
}

impl<'a> Picker<'a> {
    fn pick<T>(
        &mut self,
        field: &'static str,
        local: Option<T>,
        get: impl Fn(&'a FelixConfigurationSpec) -> Option<T>,
    ) -> Option<T> {
        let found = match local {
            Some(v) => Some((v, Source::Local)),
            None => self
                .sources
                .iter()
                .find_map(|(src, spec)| get(spec).map(|v| (v, src.clone()))),
        };
        found.map(|(v, src)| {
            self.noted.insert(field, src);
            v
        })
    }
}

fn positive(v: Option<i32>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0)
}

/// A host setting: an address, `localhost`, or empty (unset).
fn parse_host(s: &str) -> Option<IpAddr> {
    match s.trim() {
        "" => None,
        "localhost" => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        other => other.parse().ok(),
    }
}

/// Go's `time.ParseDuration` for the units Calico's schema allows (ms, s, m, h; also us/ns).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let (scale, unit_len) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .iter()
        .find(|(u, _)| rest.starts_with(u))
        .map(|(u, f)| (*f, u.len()))?;
        total += n * scale;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

/// `featureDetectOverride` entries (`Name=true|false|`), an empty value meaning "detect".
pub fn feature_overrides(s: &str) -> BTreeMap<String, Option<bool>> {
    s.split(',')
        .filter(|e| !e.trim().is_empty())
        .filter_map(|e| {
            let (k, v) = e.split_once('=')?;
            let v = match v.trim() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            };
            Some((k.trim().to_string(), v))
        })
        .collect()
}

/// The feature of `featureDetectOverride` tortie reads.
pub const CHECKSUM_OFFLOAD_BROKEN: &str = "ChecksumOffloadBroken";

/// Felix's `logSeverityScreen` as a tracing filter.
pub fn log_filter(severity: &str) -> Option<String> {
    let level = match severity.trim().to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" => "warn",
        "error" | "fatal" => "error",
        _ => return None,
    };
    Some(format!("{level}{LOG_FILTER_SUFFIX}"))
}

/// Merges `local` and the FelixConfiguration `sources` into the settings in force.
pub fn merge(local: &Local, sources: &Sources) -> Effective {
    let mut p = Picker {
        sources: sources.in_precedence(),
        noted: BTreeMap::new(),
    };
    let vxlan_mtu = p.pick("vxlanMTU", None, |c| positive(c.vxlan_mtu));
    let ipip_mtu = p.pick("ipipMTU", None, |c| positive(c.ipip_mtu));
    let vxlan_port = p
        .pick("vxlanPort", None, |c| {
            positive(c.vxlan_port).and_then(|v| u16::try_from(v).ok())
        })
        .unwrap_or(DEFAULT_VXLAN_PORT);
    let vxlan_vni = p
        .pick("vxlanVNI", None, |c| positive(c.vxlan_vni))
        .unwrap_or(DEFAULT_VXLAN_VNI);
    let route_refresh = p
        .pick("routeRefreshInterval", local.route_refresh, |c| {
            c.route_refresh_interval
                .as_deref()
                .and_then(parse_go_duration)
                .filter(|d| !d.is_zero())
        })
        .unwrap_or(DEFAULT_ROUTE_REFRESH);
    let checksum_offload_broken = p.pick(
        "featureDetectOverride",
        local.checksum_offload_broken,
        |c| {
            c.feature_detect_override
                .as_deref()
                .and_then(|f| feature_overrides(f).get(CHECKSUM_OFFLOAD_BROKEN).copied())
                .flatten()
        },
    );
    let log_filter = if local.log_level_set {
        None
    } else {
        p.pick("logSeverityScreen", None, |c| {
            c.log_severity_screen.as_deref().and_then(log_filter)
        })
    };
    let port = |v: Option<i32>| positive(v).and_then(|p| u16::try_from(p).ok());
    let host = |v: &Option<String>| v.as_deref().and_then(parse_host);
    let health = SocketAddr::new(
        p.pick("healthHost", local.health_host, |c| host(&c.health_host))
            .unwrap_or(DEFAULT_LISTEN_HOST),
        p.pick("healthPort", local.health_port, |c| port(c.health_port))
            .unwrap_or(DEFAULT_HEALTH_PORT),
    );
    let metrics = SocketAddr::new(
        p.pick("prometheusMetricsHost", local.metrics_host, |c| {
            host(&c.prometheus_metrics_host)
        })
        .unwrap_or(DEFAULT_LISTEN_HOST),
        p.pick("prometheusMetricsPort", local.metrics_port, |c| {
            port(c.prometheus_metrics_port)
        })
        .unwrap_or(DEFAULT_METRICS_PORT),
    );
    Effective {
        vxlan_mtu,
        ipip_mtu,
        vxlan_port,
        vxlan_vni,
        route_refresh,
        checksum_offload_broken,
        log_filter,
        health,
        metrics,
        sources: p.noted,
    }
}

/// Felix's `determinePodMTU`: the smallest MTU of the encapsulations in use (each its
/// FelixConfiguration value or the host MTU less its overhead), else the host MTU. A
/// non-zero `--cni-mtu` (Calico's `veth_mtu`) overrides it.
pub fn pod_mtu(cni_mtu: u32, host_mtu: u32, vxlan: bool, ipip: bool, e: &Effective) -> u32 {
    if cni_mtu != 0 {
        return cni_mtu;
    }
    let mut mtu: Option<u32> = None;
    let encaps = [
        (
            vxlan,
            e.vxlan_mtu
                .unwrap_or(host_mtu.saturating_sub(VXLAN_OVERHEAD)),
        ),
        (
            ipip,
            e.ipip_mtu.unwrap_or(host_mtu.saturating_sub(IPIP_OVERHEAD)),
        ),
    ];
    for (enabled, m) in encaps {
        if enabled && m > 0 {
            mtu = Some(mtu.map_or(m, |cur| cur.min(m)));
        }
    }
    mtu.unwrap_or(host_mtu)
}

/// Values of Calico fields tortie leaves alone that are nevertheless what tortie does, so
/// they are not reported: empty values, calico-node's `reportingInterval: 0s`, the defaults
/// calicoctl writes back on every update (`floatingIPs: Disabled`, BPF settings), and BPF
/// or WireGuard settings while that feature is off (Felix ignores them then too).
fn harmless(spec: &FelixConfigurationSpec, field: &str, value: &serde_json::Value) -> bool {
    let on = |f: &str| spec.other.get(f).and_then(serde_json::Value::as_bool) == Some(true);
    match (field, value) {
        (_, serde_json::Value::String(s)) if s.is_empty() => true,
        ("reportingInterval", v) => v
            .as_str()
            .and_then(parse_go_duration)
            .is_some_and(|d| d.is_zero()),
        ("floatingIPs", v) => v.as_str() == Some("Disabled"),
        ("bpfEnabled" | "wireguardEnabled" | "wireguardEnabledV6", v) => v.as_bool() == Some(false),
        (f, _) if f.starts_with("bpf") => !on("bpfEnabled"),
        (f, _) if f.starts_with("wireguard") => {
            !on("wireguardEnabled") && !on("wireguardEnabledV6")
        }
        _ => false,
    }
}

/// Fields of one object that tortie does not apply, each with why (sorted by field).
pub fn unsupported(spec: &FelixConfigurationSpec) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = spec
        .other
        .iter()
        .filter(|(k, v)| !v.is_null() && !harmless(spec, k, v))
        .map(|(k, _)| (k.clone(), "tortie does not implement it"))
        .collect();
    if spec.health_enabled == Some(false) {
        out.push((
            "healthEnabled".into(),
            "tortie always serves /liveness and /readiness (kubelet probes them)",
        ));
    }
    if spec.prometheus_metrics_enabled == Some(false) {
        out.push((
            "prometheusMetricsEnabled".into(),
            "tortie always serves /metrics",
        ));
    }
    if spec
        .route_refresh_interval
        .as_deref()
        .and_then(parse_go_duration)
        .is_some_and(|d| d.is_zero())
    {
        out.push((
            "routeRefreshInterval".into(),
            "0 (no periodic resync) is not supported; tortie keeps its interval",
        ));
    }
    if let Some(f) = &spec.feature_detect_override {
        for k in feature_overrides(f).into_keys() {
            if k != CHECKSUM_OFFLOAD_BROKEN {
                out.push((
                    format!("featureDetectOverride[{k}]"),
                    "tortie reads only ChecksumOffloadBroken",
                ));
            }
        }
    }
    if let Some(h) = [&spec.health_host, &spec.prometheus_metrics_host]
        .into_iter()
        .flatten()
        .find(|h| !h.trim().is_empty() && parse_host(h).is_none())
    {
        let field = if spec.health_host.as_ref() == Some(h) {
            "healthHost"
        } else {
            "prometheusMetricsHost"
        };
        out.push((field.into(), "tortie needs an IP address or localhost here"));
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> FelixConfigurationSpec {
        serde_json::from_value(json).unwrap()
    }
    fn obj(name: &str, json: serde_json::Value) -> Object {
        Object {
            name: name.into(),
            created: None,
            spec: spec(json),
        }
    }
    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_without_any_object() {
        let e = Effective::default();
        assert_eq!((e.vxlan_mtu, e.ipip_mtu), (None, None));
        assert_eq!((e.vxlan_port, e.vxlan_vni), (4789, 4096));
        assert_eq!(e.route_refresh, Duration::from_secs(90));
        assert_eq!(e.health, "0.0.0.0:9099".parse().unwrap());
        assert_eq!(e.metrics, "0.0.0.0:9091".parse().unwrap());
        assert_eq!(e.log_filter, None);
        assert!(e.sources.is_empty());
    }

    #[test]
    fn node_beats_selector_beats_global_and_local_beats_all() {
        let objects = [
            obj(
                "default",
                serde_json::json!({"vxlanMTU": 1400, "ipipMTU": 1440, "vxlanPort": 4790,
                    "healthPort": 9100, "routeRefreshInterval": "30s"}),
            ),
            obj(
                "zone-a",
                serde_json::json!({"nodeSelector": "zone == 'a'", "vxlanMTU": 1350, "vxlanVNI": 5000}),
            ),
            obj("node.n1", serde_json::json!({"vxlanMTU": 1300})),
            obj("node.n2", serde_json::json!({"vxlanMTU": 1200})),
        ];
        let s = Sources::select(&objects, "n1", &labels(&[("zone", "a")]));
        let e = merge(&Local::default(), &s);
        assert_eq!(e.vxlan_mtu, Some(1300));
        assert_eq!(e.sources["vxlanMTU"], Source::Node("node.n1".into()));
        assert_eq!(e.vxlan_vni, 5000);
        assert_eq!(e.sources["vxlanVNI"], Source::Selector("zone-a".into()));
        assert_eq!((e.ipip_mtu, e.vxlan_port), (Some(1440), 4790));
        assert_eq!(e.sources["ipipMTU"], Source::Global);
        assert_eq!(e.health.port(), 9100);
        assert_eq!(e.route_refresh, Duration::from_secs(30));
        // A node outside the zone gets the global value.
        let other = merge(
            &Local::default(),
            &Sources::select(&objects, "n3", &labels(&[])),
        );
        assert_eq!((other.vxlan_mtu, other.vxlan_vni), (Some(1400), 4096));
        // Explicit flags win, as Felix's environment variables do.
        let local = Local {
            health_port: Some(9200),
            route_refresh: Some(Duration::from_secs(5)),
            ..Local::default()
        };
        let e = merge(&local, &s);
        assert_eq!(e.health.port(), 9200);
        assert_eq!(e.sources["healthPort"], Source::Local);
        assert_eq!(e.route_refresh, Duration::from_secs(5));
    }

    #[test]
    fn the_oldest_matching_selector_object_wins() {
        let t = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0);
        let mut a = obj(
            "b-young",
            serde_json::json!({"nodeSelector": "all()", "vxlanMTU": 1000}),
        );
        a.created = t(10);
        let mut b = obj(
            "a-old",
            serde_json::json!({"nodeSelector": "all()", "vxlanMTU": 1100}),
        );
        b.created = t(0);
        let broken = obj(
            "c",
            serde_json::json!({"nodeSelector": "((", "vxlanMTU": 900}),
        );
        let s = Sources::select(&[a, b, broken], "n1", &labels(&[]));
        assert_eq!(s.selector.map(|o| o.name), Some("a-old".into()));
    }

    #[test]
    fn values_are_read_the_felix_way() {
        let s = Sources {
            global: Some(obj(
                "default",
                serde_json::json!({
                    "vxlanMTU": 0,
                    "routeRefreshInterval": "1m30s",
                    "featureDetectOverride": "SNATFullyRandom=false,ChecksumOffloadBroken=true",
                    "logSeverityScreen": "Warning",
                    "healthHost": "localhost",
                    "prometheusMetricsHost": "10.0.0.1"
                }),
            )),
            ..Sources::default()
        };
        let e = merge(&Local::default(), &s);
        assert_eq!(e.vxlan_mtu, None, "0 means the host-derived default");
        assert_eq!(e.route_refresh, Duration::from_secs(90));
        assert_eq!(e.checksum_offload_broken, Some(true));
        assert_eq!(
            e.log_filter.as_deref(),
            Some("warn,kube_client::client::builder=off")
        );
        assert_eq!(e.health, "127.0.0.1:9099".parse().unwrap());
        assert_eq!(e.metrics, "10.0.0.1:9091".parse().unwrap());
        let set_by_flag = Local {
            log_level_set: true,
            ..Local::default()
        };
        assert_eq!(merge(&set_by_flag, &s).log_filter, None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("x"), None);
    }

    #[test]
    fn pod_mtu_follows_felix() {
        let mut e = Effective::default();
        assert_eq!(pod_mtu(0, 1500, true, false, &e), 1450);
        assert_eq!(pod_mtu(0, 1500, false, true, &e), 1480);
        assert_eq!(pod_mtu(0, 1500, true, true, &e), 1450);
        assert_eq!(pod_mtu(0, 1500, false, false, &e), 1500);
        e.vxlan_mtu = Some(1400);
        assert_eq!(pod_mtu(0, 1500, true, false, &e), 1400);
        assert_eq!(
            pod_mtu(0, 1500, false, true, &e),
            1480,
            "vxlanMTU matters only while VXLAN is in use"
        );
        assert_eq!(pod_mtu(1300, 1500, true, false, &e), 1300, "--cni-mtu wins");
    }

    #[test]
    fn unsupported_fields_are_named_and_harmless_ones_are_not() {
        let s = spec(serde_json::json!({
            "vxlanMTU": 1400,
            "reportingInterval": "0s",
            "bpfEnabled": true,
            "natOutgoingAddress": "192.0.2.1",
            "prometheusMetricsEnabled": false,
            "featureDetectOverride": "ChecksumOffloadBroken=true,SNATFullyRandom=false"
        }));
        let names: Vec<String> = unsupported(&s).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            names,
            [
                "bpfEnabled",
                "featureDetectOverride[SNATFullyRandom]",
                "natOutgoingAddress",
                "prometheusMetricsEnabled"
            ]
        );
        let calico_default =
            spec(serde_json::json!({"reportingInterval": "0s", "logSeverityScreen": "Info"}));
        assert!(unsupported(&calico_default).is_empty());
        // What calicoctl 3.32 writes back on any update, BPF off.
        let after_calicoctl = spec(serde_json::json!({
            "bpfConnectTimeLoadBalancing": "TCP",
            "bpfHostNetworkedNATWithoutCTLB": "Enabled",
            "bpfLogLevel": "",
            "floatingIPs": "Disabled"
        }));
        assert!(unsupported(&after_calicoctl).is_empty());
        let bpf_on = spec(serde_json::json!({"bpfEnabled": true, "bpfLogLevel": "Debug"}));
        let names: Vec<String> = unsupported(&bpf_on).into_iter().map(|(f, _)| f).collect();
        assert_eq!(names, ["bpfEnabled", "bpfLogLevel"]);
    }
}
