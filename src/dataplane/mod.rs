//! Kernel drivers: each owns one class of kernel object (links, neighbours/FDB, routes),
//! reads it back, diffs it against the calculation's desired state and applies the
//! difference. They touch only what tortie owns: its devices and route protocol 80.

mod batch;
pub mod conntrack;
pub mod converge;
mod error;
pub mod kernel;
pub mod links;
pub mod monitor;
pub mod mtu;
pub mod neighbours;
pub mod netns;
pub mod nflog;
pub mod nfnetlink;
pub mod nft;
mod offload;
pub mod resync;
pub mod routes;

pub use converge::{ApplyReport, apply};
pub use error::DataplaneError;
pub use kernel::Kernel;

/// What one reconcile did. `changes()` is zero when the kernel already matched.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub added: usize,
    pub replaced: usize,
    pub deleted: usize,
    /// Wanted objects held by someone else (e.g. a foreign route on the same prefix): left alone.
    pub conflicts: usize,
    /// Wanted objects that cannot be programmed yet (their device is missing).
    pub skipped: usize,
}

impl Stats {
    pub fn changes(&self) -> usize {
        self.added + self.replaced + self.deleted
    }
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.added += o.added;
        self.replaced += o.replaced;
        self.deleted += o.deleted;
        self.conflicts += o.conflicts;
        self.skipped += o.skipped;
    }
}
