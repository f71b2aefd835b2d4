//! The nft driver: keeps tables tortie owns (NAT and policy) at their desired model
//! (`desired::nft::Table`) and touches no other table. A change of the model is applied as
//! one incremental transaction (`render::changes`); an unchanged model is checked against
//! the kernel (`read`) and the table is rewritten whole only when it drifted. A change that
//! is only elements of existing plain sets and maps goes over nfnetlink (`elements`), not
//! through `nft`. Blocking (it waits for the kernel or `nft`): call it from `spawn_blocking`
//! inside tokio.

pub mod counters;
pub mod elements;
pub mod read;
pub mod render;
pub mod run;
mod wire;

use std::collections::{BTreeSet, VecDeque};
use std::time::Instant;

pub use run::{NftError, Runner};

use crate::desired::nat::{self as nat, NatModel};
pub use crate::desired::nat::{
    ALL_POOLS_V4, ALL_POOLS_V6, MASQ_POOLS_V4, MASQ_POOLS_V6, NAT_CHAIN, RAW_OUTPUT_CHAIN,
    RAW_PREROUTING_CHAIN, TABLE,
};
use crate::desired::nft::Table;

/// How many applied transactions a driver remembers (for tests and debugging).
const HISTORY: usize = 32;

/// What a reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel already held the desired table; nothing was written.
    InSync,
    /// The table did not exist and was written whole.
    Created,
    /// The desired contents changed and the difference was applied.
    Updated,
    /// The desired contents had not changed but the kernel's had (someone edited or deleted
    /// the table): it was rewritten whole. Counts as a drift repair.
    Repaired,
}

impl Outcome {
    pub fn wrote(self) -> bool {
        self != Outcome::InSync
    }
}

/// One table's driver.
#[derive(Debug, Default)]
pub struct Driver {
    runner: Runner,
    /// What this driver last wrote (or found in sync); None until then and after a failure,
    /// so the next pass reads the kernel and rewrites the table whole if needed.
    known: Option<Table>,
    history: VecDeque<String>,
    netlink_writes: u64,
}

impl Driver {
    pub fn new(runner: Runner) -> Driver {
        Driver {
            runner,
            known: None,
            history: VecDeque::new(),
            netlink_writes: 0,
        }
    }

    /// The scripts this driver applied, oldest first (the last few dozen).
    pub fn transactions(&self) -> impl Iterator<Item = &str> {
        self.history.iter().map(String::as_str)
    }

    /// Makes the kernel's table match `want`: the difference from what was last applied when
    /// the model changed; otherwise a drift check that rewrites the table if it drifted.
    pub fn reconcile(&mut self, want: &Table) -> Result<Outcome, NftError> {
        let started = Instant::now();
        let result = self.reconcile_inner(want);
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        match &result {
            Ok(Outcome::InSync) => {
                tracing::debug!(table = %want.name, elapsed_ms, "nft table in sync")
            }
            Ok(Outcome::Repaired) => tracing::warn!(
                table = %want.name,
                elapsed_ms,
                "nft table drifted from the desired state; rewrote it"
            ),
            Ok(outcome) => {
                tracing::info!(table = %want.name, ?outcome, elapsed_ms, "nft table written")
            }
            Err(_) => self.known = None,
        }
        result
    }

    fn reconcile_inner(&mut self, want: &Table) -> Result<Outcome, NftError> {
        if let Some(known) = &self.known
            && known != want
            && let Some(script) = render::changes(want, known)
        {
            self.apply("update the table", script)?;
            self.known = Some(want.clone());
            return Ok(Outcome::Updated);
        }
        let have = read::read(&self.runner, want.family, &want.name)?;
        let outcome = match have {
            Some(h) if h == want.fingerprint() => Outcome::InSync,
            None if self.known.is_none() => Outcome::Created,
            _ if self.known.as_ref() == Some(want) => Outcome::Repaired,
            _ => Outcome::Updated,
        };
        if outcome.wrote() {
            self.apply("rewrite the table", render::full(want))?;
        }
        self.known = Some(want.clone());
        Ok(outcome)
    }

    /// `reconcile` for a caller that knows which sets (and maps: `sets` names both) and
    /// chains changed since its last
    /// call (the incremental policy calculation): only those are compared and written, and
    /// only those are copied into what the driver remembers. Without a known table (start,
    /// after a failure) this is a full `reconcile`.
    pub fn reconcile_changed(
        &mut self,
        want: &Table,
        sets: &BTreeSet<String>,
        chains: &BTreeSet<String>,
    ) -> Result<Outcome, NftError> {
        let Some(known) = &mut self.known else {
            return self.reconcile(want);
        };
        let Some(script) = render::changes_of(want, known, sets, chains) else {
            return Ok(Outcome::InSync);
        };
        let fast = elements::plan(want, known, sets, chains).filter(elements::fits);
        for name in sets {
            match want.sets.get(name) {
                Some(s) => known.sets.insert(name.clone(), s.clone()),
                None => known.sets.remove(name),
            };
            match want.maps.get(name) {
                Some(m) => known.maps.insert(name.clone(), m.clone()),
                None => known.maps.remove(name),
            };
        }
        for name in chains {
            match want.chains.get(name) {
                Some(c) => known.chains.insert(name.clone(), c.clone()),
                None => known.chains.remove(name),
            };
        }
        let started = Instant::now();
        let (result, via) = match fast {
            Some(plan) => match elements::write(&plan) {
                Ok(()) => {
                    self.netlink_writes += 1;
                    self.remember(script);
                    (Ok(()), "netlink")
                }
                Err(e) => {
                    // nft says the same in its own words if the kernel refuses it too.
                    tracing::warn!(error = %e, "element change over netlink failed; using nft");
                    (self.apply("update the table", script), "nft")
                }
            },
            None => (self.apply("update the table", script), "nft"),
        };
        tracing::debug!(
            table = %want.name,
            sets = sets.len(),
            chains = chains.len(),
            via,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "nft table changes applied"
        );
        if result.is_err() {
            self.known = None;
        }
        result.map(|()| Outcome::Updated)
    }

    /// Deletes the table if it exists; true if it did. Nothing else is touched.
    pub fn remove(&mut self, want: &Table) -> Result<bool, NftError> {
        let existed = read::read(&self.runner, want.family, &want.name)?.is_some();
        let (family, name) = (want.family, &want.name);
        self.apply(
            "delete the table",
            format!("add table {family} {name}\ndelete table {family} {name}\n"),
        )?;
        self.known = None;
        Ok(existed)
    }

    fn apply(&mut self, action: &'static str, script: String) -> Result<(), NftError> {
        tracing::debug!(action, %script, "nft transaction");
        let result = self.runner.apply(action, &script);
        self.remember(script);
        result
    }

    /// Keeps a transaction in the history (element changes written over netlink too, in
    /// the nft syntax `nft` would have been given).
    fn remember(&mut self, script: String) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(script);
    }

    /// How many element-only changes went over netlink instead of through `nft`.
    pub fn netlink_writes(&self) -> u64 {
        self.netlink_writes
    }
}

/// The NAT table (`inet tortie-nat`) through the generic driver.
#[derive(Debug, Default)]
pub struct NatTable {
    pub driver: Driver,
}

impl NatTable {
    /// Uses `nft` from PATH.
    pub fn new() -> NatTable {
        NatTable::default()
    }

    pub fn reconcile(&mut self, model: &NatModel) -> Result<Outcome, NftError> {
        self.driver.reconcile(&nat::table(model))
    }

    pub fn remove(&mut self) -> Result<bool, NftError> {
        let empty = nat::table(&NatModel {
            masq_pools_v4: Vec::new(),
            all_pools_v4: Vec::new(),
            masq_pools_v6: Vec::new(),
            all_pools_v6: Vec::new(),
            udp_masq_ports: nat::PortRange {
                first: 1024,
                last: 65535,
            },
            notrack_udp_port: None,
        });
        self.driver.remove(&empty)
    }
}
