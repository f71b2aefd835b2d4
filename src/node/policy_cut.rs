//! `--policy-cut-denied-connections` (env `TORTIE_POLICY_CUT_DENIED_CONNECTIONS`; off by
//! default, as in Calico, where live connections outlive a policy change): after a changed
//! policy table is committed, the conntrack entries of flows involving this node's
//! endpoints that the new model denies are deleted, so their next packet meets the policy.
//! The decision is `policy::cut::cut` (the evaluator `policy explain` uses).

use std::net::IpAddr;

use crate::dataplane::conntrack::{Conntrack, ConntrackError, Tuple};
use crate::policy::cut::Cutter;
use crate::policy::{Flow, Model, Protocol};

/// The flow a conntrack entry's original direction is.
pub fn flow(t: &Tuple) -> Flow {
    Flow {
        src: t.src,
        dst: t.dst,
        protocol: Protocol(t.protocol),
        src_port: t.src_port,
        dst_port: t.dst_port,
        icmp_type: t.icmp.map(|(ty, _)| ty),
        icmp_code: t.icmp.map(|(_, c)| c),
    }
}

/// The addresses of this namespace's interfaces (flows from them are the host's own).
pub fn host_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .collect()
}

/// What one cut did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CutReport {
    pub entries: usize,
    pub cut: usize,
}

/// Lists conntrack in the calling thread's namespace and deletes the entries `model` now
/// denies. Blocking.
pub fn cut_denied(model: &Model) -> Result<CutReport, ConntrackError> {
    let cutter = Cutter::new(model, &host_addrs());
    let mut ct = Conntrack::open()?;
    let entries = ct.list()?;
    let mut report = CutReport {
        entries: entries.len(),
        cut: 0,
    };
    for t in entries.iter().filter(|t| cutter.cut(&flow(t))) {
        if ct.delete(t)? {
            report.cut += 1;
            tracing::info!(src = %t.src, dst = %t.dst, protocol = t.protocol,
                src_port = t.src_port, dst_port = t.dst_port,
                "cut a connection the policy now denies");
        }
    }
    Ok(report)
}
