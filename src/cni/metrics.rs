//! The CNI service's metrics: requests by command and outcome, and how long the daemon took
//! to answer each (frame received to answer ready), so alerts see a rising error rate and
//! dashboards the ADD latency per node.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

pub const REQUESTS: &str = "tortie_cni_requests_total";
pub const DURATION: &str = "tortie_cni_request_duration_seconds";

#[derive(Clone)]
pub struct CniMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl Default for CniMetrics {
    fn default() -> CniMetrics {
        // Constant names and buckets: these constructors fail only on a programming error.
        let requests = IntCounterVec::new(
            Opts::new(
                REQUESTS,
                "CNI requests the daemon answered, by command and result (ok, error).",
            ),
            &["command", "result"],
        )
        .expect("constant metric options are valid");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                DURATION,
                "Time the daemon took to answer one CNI request, by command.",
            )
            .buckets(vec![
                0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["command"],
        )
        .expect("constant metric options are valid");
        // Exported at zero from the start, so rate() and alerts see a series before the first
        // request (and a node that never ADDs still shows up).
        for command in ["ADD", "DEL", "CHECK"] {
            for result in ["ok", "error"] {
                requests.with_label_values(&[command, result]);
            }
            duration.with_label_values(&[command]);
        }
        CniMetrics { requests, duration }
    }
}

impl CniMetrics {
    pub fn observe(&self, command: &str, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.requests.with_label_values(&[command, result]).inc();
        self.duration.with_label_values(&[command]).observe(seconds);
    }
}

impl Collector for CniMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.requests.desc();
        d.extend(self.duration.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut m = self.requests.collect();
        m.extend(self.duration.collect());
        m
    }
}
