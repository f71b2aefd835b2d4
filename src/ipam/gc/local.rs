//! Node-local block hygiene, run by every daemon for its own node: a block that has stayed
//! empty for the grace period is given back, except the one the node allocated from last
//! (so the next pod does not pay for a claim); a block of a pool whose nodeSelector no
//! longer selects the node is given back as soon as it is empty.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use ipnet::IpNet;
use tokio::sync::watch;

use crate::ipam::Ipam;

#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// How long a block must stay empty before it is released.
    pub grace: Duration,
    pub interval: Duration,
}

impl Default for LocalConfig {
    fn default() -> LocalConfig {
        LocalConfig {
            grace: super::DEFAULT_GRACE,
            interval: Duration::from_secs(30),
        }
    }
}

/// One of the node's blocks as a pass sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnBlock {
    pub cidr: IpNet,
    /// Nothing held and nothing cooling down.
    pub empty: bool,
    /// The block's pool exists and its nodeSelector matches this node.
    pub selected: bool,
}

/// Since when each block has been empty.
#[derive(Debug, Default)]
pub struct EmptyBlocks {
    since: HashMap<IpNet, Instant>,
}

impl EmptyBlocks {
    /// Records a pass; returns the blocks to release now. `last_used` is kept when it is
    /// one of the node's selected blocks; otherwise the lowest selected block is kept (the
    /// one the free-block search would use next), so a node never gives up its last block
    /// for being idle.
    pub fn observe(
        &mut self,
        own: &[OwnBlock],
        last_used: Option<IpNet>,
        now: Instant,
        grace: Duration,
    ) -> Vec<IpNet> {
        self.since = own
            .iter()
            .filter(|b| b.empty)
            .map(|b| (b.cidr, self.since.get(&b.cidr).copied().unwrap_or(now)))
            .collect();
        let selected = || own.iter().filter(|b| b.selected).map(|b| b.cidr);
        let keep = last_used
            .filter(|c| selected().any(|s| s == *c))
            .or_else(|| selected().min());
        own.iter()
            .filter(|b| b.empty)
            .filter(|b| {
                !b.selected
                    || (Some(b.cidr) != keep
                        && self
                            .since
                            .get(&b.cidr)
                            .is_some_and(|t| now.saturating_duration_since(*t) >= grace))
            })
            .map(|b| b.cidr)
            .collect()
    }
}

fn own_blocks(ipam: &Ipam) -> Vec<OwnBlock> {
    let now = Utc::now();
    ipam.with_view(|v| {
        v.blocks
            .values()
            .filter(|b| b.block.is_affine_to(ipam.node()))
            .map(|b| {
                let mut block = b.block.clone();
                block.garbage_collect(now, v.limits.cooldown);
                let selected = v
                    .pools
                    .containing_net(&block.cidr)
                    .is_some_and(|p| p.node_selector.matches(&v.node_labels));
                OwnBlock {
                    cidr: block.cidr,
                    empty: block.is_empty(),
                    selected,
                }
            })
            .collect()
    })
}

/// Runs the node's hygiene every `cfg.interval` until `shutdown` turns true.
pub async fn run(ipam: Arc<Ipam>, cfg: LocalConfig, mut shutdown: watch::Receiver<bool>) {
    let mut tracker = EmptyBlocks::default();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let own = own_blocks(&ipam);
        let last = ipam.activity().last_used();
        for cidr in tracker.observe(&own, last, Instant::now(), cfg.grace) {
            match ipam.release_empty_block(cidr, ipam.node()).await {
                Ok(None) => {
                    tracing::info!(block = %cidr, node = ipam.node(), "gave back idle IPAM block")
                }
                Ok(Some(why)) => tracing::debug!(block = %cidr, ?why, "idle block kept"),
                Err(e) => {
                    tracing::warn!(block = %cidr, error = %e, "could not release idle IPAM block")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(cidr: &str, empty: bool, selected: bool) -> OwnBlock {
        OwnBlock {
            cidr: cidr.parse().unwrap(),
            empty,
            selected,
        }
    }
    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    const G: Duration = Duration::from_secs(60);

    #[test]
    fn empty_blocks_go_after_the_grace_period_except_the_last_used() {
        let t0 = Instant::now();
        let own = [
            b("10.0.0.0/26", true, true),
            b("10.0.0.64/26", true, true),
            b("10.0.0.128/26", false, true),
        ];
        let mut t = EmptyBlocks::default();
        let last = Some(net("10.0.0.64/26"));
        assert!(t.observe(&own, last, t0, G).is_empty());
        assert!(t.observe(&own, last, t0 + G / 2, G).is_empty());
        assert_eq!(t.observe(&own, last, t0 + G, G), vec![net("10.0.0.0/26")]);
    }

    #[test]
    fn a_block_used_again_starts_its_grace_period_over() {
        let t0 = Instant::now();
        let mut t = EmptyBlocks::default();
        let keep = Some(net("10.0.0.64/26"));
        let empty = [b("10.0.0.0/26", true, true), b("10.0.0.64/26", false, true)];
        let used = [
            b("10.0.0.0/26", false, true),
            b("10.0.0.64/26", false, true),
        ];
        t.observe(&empty, keep, t0, G);
        t.observe(&used, keep, t0 + G / 2, G);
        assert!(t.observe(&empty, keep, t0 + G, G).is_empty());
        assert_eq!(
            t.observe(&empty, keep, t0 + G * 2, G),
            vec![net("10.0.0.0/26")]
        );
    }

    #[test]
    fn without_a_known_last_block_the_lowest_is_kept() {
        let t0 = Instant::now();
        let own = [b("10.0.0.64/26", true, true), b("10.0.0.0/26", true, true)];
        let mut t = EmptyBlocks::default();
        t.observe(&own, None, t0, G);
        assert_eq!(t.observe(&own, None, t0 + G, G), vec![net("10.0.0.64/26")]);
        // A last-used block that is gone does not count either.
        let gone = Some(net("10.9.0.0/26"));
        assert_eq!(t.observe(&own, gone, t0 + G, G), vec![net("10.0.0.64/26")]);
    }

    #[test]
    fn blocks_of_pools_that_no_longer_select_the_node_go_once_empty() {
        let t0 = Instant::now();
        let own = [
            b("10.1.0.0/26", true, false),
            b("10.1.0.64/26", false, false),
        ];
        let mut t = EmptyBlocks::default();
        let last = Some(net("10.1.0.0/26"));
        assert_eq!(t.observe(&own, last, t0, G), vec![net("10.1.0.0/26")]);
    }
}
