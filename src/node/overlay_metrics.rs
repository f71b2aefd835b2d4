//! The overlay's metrics, with Felix's names where Felix has one: hosts in the cluster,
//! routes by kind, apply duration, drift repairs, host and pod MTU.

use std::collections::BTreeMap;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts};

use crate::calc::RouteKind;
use crate::metrics::{Metrics, MetricsError};

#[derive(Clone)]
pub struct OverlayMetrics {
    pub hosts: IntGauge,
    routes: IntGaugeVec,
    pub apply_seconds: Histogram,
    /// Felix's `felix_int_dataplane_failures`: passes (overlay or NAT) that failed and will
    /// be retried.
    pub failures: IntCounter,
    pub drift_repairs: IntCounter,
    pub host_mtu: IntGauge,
    pub pod_mtu: IntGauge,
}

const KINDS: [RouteKind; 5] = [
    RouteKind::Borrowed,
    RouteKind::RemoteBlockDirect,
    RouteKind::RemoteBlockVxlan,
    RouteKind::RemoteBlockIpip,
    RouteKind::LocalBlackhole,
];

impl OverlayMetrics {
    pub fn register(metrics: &Metrics) -> Result<OverlayMetrics, MetricsError> {
        let register_err = |name| move |source| MetricsError::Register { name, source };
        let hosts = IntGauge::new(
            "felix_cluster_num_hosts",
            "Nodes in the cluster, as this node's view has them.",
        )
        .map_err(register_err("felix_cluster_num_hosts"))?;
        let routes = IntGaugeVec::new(
            Opts::new(
                "tortie_dataplane_routes",
                "Routes tortie wants in the kernel, by kind.",
            ),
            &["kind"],
        )
        .map_err(register_err("tortie_dataplane_routes"))?;
        // Felix's buckets are for a much bigger apply; these span 1 ms to 10 s.
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "felix_int_dataplane_apply_time_seconds",
                "Time to apply one full pass of the overlay dataplane.",
            )
            .buckets(
                prometheus::exponential_buckets(0.001, 2.5, 11)
                    .map_err(register_err("felix_int_dataplane_apply_time_seconds"))?,
            ),
        )
        .map_err(register_err("felix_int_dataplane_apply_time_seconds"))?;
        let failures = IntCounter::new(
            "felix_int_dataplane_failures",
            "Dataplane passes (overlay or NAT table) that failed and will be retried.",
        )
        .map_err(register_err("felix_int_dataplane_failures"))?;
        let drift_repairs = IntCounter::new(
            "tortie_dataplane_drift_repairs_total",
            "Kernel objects re-added, replaced or removed because something outside tortie changed them.",
        )
        .map_err(register_err("tortie_dataplane_drift_repairs_total"))?;
        let host_mtu = IntGauge::new("tortie_host_mtu_bytes", "Detected host MTU.")
            .map_err(register_err("tortie_host_mtu_bytes"))?;
        let pod_mtu = IntGauge::new(
            "tortie_pod_mtu_bytes",
            "MTU new pods get: configured, or host MTU minus the overlay's overhead.",
        )
        .map_err(register_err("tortie_pod_mtu_bytes"))?;
        metrics.register("felix_cluster_num_hosts", hosts.clone())?;
        metrics.register("tortie_dataplane_routes", routes.clone())?;
        metrics.register(
            "felix_int_dataplane_apply_time_seconds",
            apply_seconds.clone(),
        )?;
        metrics.register("felix_int_dataplane_failures", failures.clone())?;
        metrics.register(
            "tortie_dataplane_drift_repairs_total",
            drift_repairs.clone(),
        )?;
        metrics.register("tortie_host_mtu_bytes", host_mtu.clone())?;
        metrics.register("tortie_pod_mtu_bytes", pod_mtu.clone())?;
        Ok(OverlayMetrics {
            hosts,
            routes,
            apply_seconds,
            failures,
            drift_repairs,
            host_mtu,
            pod_mtu,
        })
    }

    /// Every kind is exported, zero included, so a dashboard sees a kind drop to none.
    pub fn set_routes(&self, by_kind: &BTreeMap<RouteKind, usize>) {
        for kind in KINDS {
            let n = by_kind.get(&kind).copied().unwrap_or(0);
            self.routes
                .with_label_values(&[kind.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}
