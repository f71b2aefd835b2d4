//! What this node's allocator did, for the `tortie_ipam_*` metrics: blocks claimed, addresses
//! borrowed and released, how long each allocation took, and the block it allocated from
//! last (the one node-local hygiene keeps even when it is empty).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;
use prometheus::{Histogram, HistogramOpts};

pub const ALLOCATION_SECONDS: &str = "tortie_ipam_allocation_duration_seconds";

/// Allocation latency buckets: a warm allocation is one block PUT (a few ms); a claim adds
/// three writes; conflicts and a slow API server make the tail.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug)]
pub struct Activity {
    /// Blocks this node claimed (including empty blocks taken over from other nodes).
    pub claims: AtomicU64,
    /// Addresses allocated from another node's block.
    pub borrows: AtomicU64,
    /// Addresses released by handle through this allocator (CNI DEL, tunnels, GC).
    pub releases: AtomicU64,
    /// Seconds per `auto_assign` call, successful or not.
    pub assign_seconds: Histogram,
    last_used: Mutex<Option<IpNet>>,
}

impl Default for Activity {
    fn default() -> Activity {
        let opts = HistogramOpts::new(
            ALLOCATION_SECONDS,
            "Time to allocate the addresses of one request (all families), in seconds.",
        )
        .buckets(BUCKETS.to_vec());
        Activity {
            claims: AtomicU64::new(0),
            borrows: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            // The name, help and buckets are constants checked by the tests below.
            assign_seconds: Histogram::with_opts(opts).expect("constant histogram options"),
            last_used: Mutex::new(None),
        }
    }
}

impl Activity {
    pub(crate) fn used(&self, block: IpNet) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Some(block);
    }

    /// The block the last successful allocation of this process came from.
    pub fn last_used(&self) -> Option<IpNet> {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_starts_empty_and_remembers_the_last_block() {
        let a = Activity::default();
        assert_eq!(a.last_used(), None);
        assert_eq!(a.assign_seconds.get_sample_count(), 0);
        a.used("10.0.0.0/26".parse().unwrap());
        a.used("10.0.0.64/26".parse().unwrap());
        assert_eq!(a.last_used(), Some("10.0.0.64/26".parse().unwrap()));
        Activity::add(&a.releases, 3);
        assert_eq!(a.releases.load(Ordering::Relaxed), 3);
    }
}
