//! Expired cooldown holds in blocks nobody allocates from. An allocation collects a block's
//! expired holds as it reads it, but an idle block is never read that way, so a scan writes
//! them back (Calico's kube-controllers `garbageCollectColdIPs`). Every daemon scans its own
//! blocks and the leader scans all of them, each waking when the earliest hold in its scope
//! expires (at most `MAX_SCAN_INTERVAL` apart): no hold lingers more than that past its
//! cooldown. The first pass runs at start-up, which also converts blocks an older tortie
//! wrote with `releasedAt` entries while the cooldown is 0.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::ipam::Ipam;
use crate::ipam::block::cooled;
use crate::ipam::store::View;

/// Longest sleep between scans; also the bound on how long an expired hold can linger.
pub const MAX_SCAN_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest sleep, so a block that cannot be written (API down) is not retried in a loop.
const MIN_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Which blocks a scanner looks after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every block (the leader).
    All,
    /// Blocks affine to this node (every daemon).
    Node(String),
}

/// One scan's decision: blocks to collect now, and the next time a hold in scope expires.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub collect: Vec<IpNet>,
    pub next_expiry: Option<DateTime<Utc>>,
}

/// Pure: what to collect at `now` with cooldown `cooldown`.
pub fn plan(view: &View, scope: &Scope, now: DateTime<Utc>, cooldown: TimeDelta) -> Plan {
    let mut out = Plan::default();
    for cached in view.blocks.values() {
        let b = &cached.block;
        if let Scope::Node(n) = scope
            && !b.is_affine_to(n)
        {
            continue;
        }
        if b.expired_holds(now, cooldown) > 0 {
            out.collect.push(b.cidr);
        }
        // Not yet expired: the first moment `cooled` turns true is one second after
        // release + cooldown (Calico's test is strict and times are whole seconds).
        let pending = b
            .cooling_releases(&crate::ipam::reservations::Reservations::EMPTY)
            .into_iter()
            .filter(|t| !cooled(*t, now, cooldown))
            .map(|t| t + cooldown + TimeDelta::seconds(1))
            .min();
        out.next_expiry = match (out.next_expiry, pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    out
}

/// How long to sleep before the next scan.
pub fn sleep_for(next_expiry: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Duration {
    next_expiry
        .map(|t| (t - now).to_std().unwrap_or(Duration::ZERO))
        .unwrap_or(MAX_SCAN_INTERVAL)
        .clamp(MIN_SCAN_INTERVAL, MAX_SCAN_INTERVAL)
}

/// Scans until `shutdown` turns true. With `leading`, only while it is true (the leader's
/// scan of every block); without, always (a node's own blocks).
pub async fn run(
    ipam: Arc<Ipam>,
    scope: Scope,
    mut leading: Option<watch::Receiver<bool>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if let Some(rx) = leading.as_mut() {
            if rx.has_changed().is_err() {
                return;
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                r = rx.wait_for(|l| *l) => if r.is_err() { return },
            }
        }
        let now = Utc::now();
        let p = ipam.with_view(|v| plan(v, &scope, now, v.limits.cooldown));
        for cidr in &p.collect {
            match ipam.collect_block(*cidr).await {
                Ok(()) => tracing::debug!(block = %cidr, "collected expired cooldown holds"),
                Err(e) => {
                    tracing::warn!(block = %cidr, error = %e, "could not collect expired cooldown holds; retrying")
                }
            }
        }
        let pause = sleep_for(p.next_expiry, Utc::now());
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ipam::block::{Block, Owner, host_affinity};
    use crate::ipam::reservations::Reservations;
    use crate::ipam::store::CachedBlock;

    const COOL: TimeDelta = TimeDelta::seconds(30);

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn view() -> View {
        let mut v = View::new();
        for (cidr, node, released) in [
            ("10.0.0.0/30", "n1", Some(0)),
            ("10.0.0.4/30", "n2", Some(20)),
            ("10.0.0.8/30", "n1", None),
        ] {
            let mut b =
                Block::new(cidr.parse().unwrap(), Some(host_affinity(node)), None, 1).unwrap();
            let owner = Owner {
                handle_id: "h".into(),
                attrs: BTreeMap::new(),
            };
            b.auto_assign(2, &owner, &Reservations::EMPTY, t(0), COOL);
            if let Some(at) = released {
                b.release_by_handle("h", t(at), COOL);
            }
            v.put_block(CachedBlock {
                block: b,
                resource_version: "1".into(),
            });
        }
        v
    }

    #[test]
    fn collects_expired_blocks_in_scope_and_wakes_at_the_next_expiry() {
        let v = view();
        let p = plan(&v, &Scope::All, t(31), COOL);
        assert_eq!(p.collect, vec!["10.0.0.0/30".parse::<IpNet>().unwrap()]);
        assert_eq!(p.next_expiry, Some(t(51)));
        let mine = plan(&v, &Scope::Node("n2".into()), t(31), COOL);
        assert!(mine.collect.is_empty());
        assert_eq!(mine.next_expiry, Some(t(51)));
        let none = plan(&v, &Scope::Node("n3".into()), t(31), COOL);
        assert_eq!(none, Plan::default());
    }

    #[test]
    fn with_no_cooldown_every_released_at_entry_is_converted_at_once() {
        let p = plan(&view(), &Scope::All, t(21), TimeDelta::zero());
        assert_eq!(p.collect.len(), 2);
        assert_eq!(p.next_expiry, None);
    }

    #[test]
    fn sleeps_are_bounded() {
        assert_eq!(sleep_for(None, t(0)), MAX_SCAN_INTERVAL);
        assert_eq!(sleep_for(Some(t(3)), t(0)), Duration::from_secs(3));
        assert_eq!(sleep_for(Some(t(-5)), t(0)), MIN_SCAN_INTERVAL);
        assert_eq!(sleep_for(Some(t(600)), t(0)), MAX_SCAN_INTERVAL);
    }
}
