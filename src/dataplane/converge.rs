//! One full apply of the desired overlay, in dependency order: devices first (routes and
//! neighbours refer to them), then neighbours/FDB, then routes. A missing kernel feature
//! (IPIP) degrades the apply instead of failing it.

use std::time::{Duration, Instant};

use tracing::{debug, error};

use super::{DataplaneError, Kernel, Stats, links, neighbours, routes};
use crate::desired::DesiredDataplane;

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub links: Stats,
    pub neighbours: Stats,
    pub routes: Stats,
    /// Parts the kernel cannot do (e.g. IPIP); everything else was applied.
    pub degraded: Vec<DataplaneError>,
    pub duration: Duration,
}

impl ApplyReport {
    pub fn total(&self) -> Stats {
        let mut t = self.links;
        t += self.neighbours;
        t += self.routes;
        t
    }
}

pub async fn apply(
    kernel: &Kernel,
    desired: &DesiredDataplane,
) -> Result<ApplyReport, DataplaneError> {
    let handle = &kernel.handle;
    let start = Instant::now();
    let mut report = ApplyReport {
        links: links::reconcile_vxlan(kernel, desired.vxlan.as_ref()).await?,
        ..ApplyReport::default()
    };
    match links::reconcile_ipip(handle, desired.ipip.as_ref()).await {
        Ok(s) => report.links += s,
        Err(e @ DataplaneError::MissingKernelFeature { .. }) => {
            error!(error = %e, "IPIP overlay unavailable; continuing without it");
            report.degraded.push(e);
        }
        Err(e) => return Err(e),
    }
    report.neighbours = neighbours::reconcile(handle, desired).await?;
    report.routes = routes::reconcile(handle, desired).await?;
    report.duration = start.elapsed();
    debug!(links = ?report.links, neighbours = ?report.neighbours, routes = ?report.routes, duration_ms = report.duration.as_millis() as u64, "dataplane applied");
    Ok(report)
}
