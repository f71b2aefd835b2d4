//! The allocator inside one block, over Calico's IPAMBlock representation: `allocations`
//! (ordinal → attribute index), the `unallocated` FIFO, de-duplicated `attributes`, the reuse
//! cooldown (`releasedAt`, IPAMConfig `ipCooldownSeconds`) and the sequence numbers that
//! guard releases against ABA.
//!
//! Cooldown follows Calico (libcalico-go `ipam_block.go`, PR #12638): a release points the
//! ordinals at a new attribute holding only `releasedAt`; `garbage_collect`, run whenever a
//! block is read for a change, moves every ordinal whose cooldown has passed to the tail of
//! `unallocated` (in ordinal order) and drops attributes nobody points at. With a cooldown of
//! 0 (Calico's default) a release frees at once, so no `releasedAt` is ever stored.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;

use super::IpamError;
use super::attrs::Attrs;
use super::cidr::{addr_at, block_len, ordinal_of};
use super::reservations::Reservations;

/// Calico's default `ipCooldownSeconds`: a released address is free at once (the FIFO order
/// of `unallocated` already keeps it from being reused soon).
pub const DEFAULT_COOLDOWN: TimeDelta = TimeDelta::seconds(0);

/// One entry of a block's `attributes`: who holds the ordinals that point at it. An entry
/// with `released_at` marks ordinals cooling down after release; one with neither a handle
/// nor `released_at` (`{}`) is an allocation nobody owns, which another writer can leave
/// behind (calicoctl before 3.34 drops `releasedAt` when it rewrites a block).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribute {
    pub handle_id: Option<String>,
    pub secondary: Attrs,
    /// `alternateOwnerAttrs` (KubeVirt live migration), kept as found.
    pub alternate: BTreeMap<String, String>,
    pub released_at: Option<DateTime<Utc>>,
}

impl Attribute {
    /// Calico frees an ordinal whose attribute has `releasedAt`, whatever else it holds.
    fn is_cooling(&self) -> bool {
        self.released_at.is_some()
    }

    fn is_held(&self) -> bool {
        self.handle_id.is_some() && self.released_at.is_none()
    }

    fn is_ownerless(&self) -> bool {
        self.handle_id.is_none() && self.released_at.is_none()
    }
}

/// What one ordinal of a block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot<'a> {
    /// Not allocated (whether or not it is listed in `unallocated`).
    Free,
    /// Held by a handle.
    Held(&'a Attribute),
    /// Released at this time, waiting for the cooldown to pass.
    Cooling(DateTime<Utc>),
    /// Allocated to an attribute with no handle and no `releasedAt`.
    Ownerless,
}

/// A block as the allocator sees it; field for field Calico's IPAMBlock spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub cidr: IpNet,
    /// `host:<node>` or `virtual:<name>`; None for a block nobody is affine to.
    pub affinity: Option<String>,
    pub affinity_claim_time: Option<DateTime<Utc>>,
    pub allocations: Vec<Option<usize>>,
    pub unallocated: Vec<usize>,
    pub attributes: Vec<Attribute>,
    pub sequence_number: u64,
    pub sequence_number_for_allocation: BTreeMap<String, u64>,
    pub deleted: bool,
}

/// What a caller asks to be recorded with an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub handle_id: String,
    pub attrs: BTreeMap<String, String>,
}

pub fn host_affinity(node: &str) -> String {
    format!("host:{node}")
}

/// `releasedAt` as stored: a metav1.Time, whole seconds.
fn stored_time(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// Calico's test: deallocate when released before `now - cooldown`; a cooldown of 0 (or
/// less) frees every cooling ordinal.
pub fn cooled(released_at: DateTime<Utc>, now: DateTime<Utc>, cooldown: TimeDelta) -> bool {
    cooldown <= TimeDelta::zero() || released_at + cooldown < now
}

impl Block {
    /// A freshly claimed block: every ordinal free in order, so `.0` goes first as in Calico.
    /// `sequence_number` should be the claim time in ns so a recreated block never repeats
    /// the numbers of its predecessor.
    pub fn new(
        cidr: IpNet,
        affinity: Option<String>,
        claim_time: Option<DateTime<Utc>>,
        sequence_number: u64,
    ) -> Result<Block, IpamError> {
        let n = block_len(&cidr)?;
        Ok(Block {
            cidr: cidr.trunc(),
            affinity,
            affinity_claim_time: claim_time,
            allocations: vec![None; n],
            unallocated: (0..n).collect(),
            attributes: Vec::new(),
            sequence_number,
            sequence_number_for_allocation: BTreeMap::new(),
            deleted: false,
        })
    }

    /// Rejects a block whose arrays disagree with its CIDR or with each other; handing out
    /// addresses from such a block could duplicate an address, so it is never used.
    pub fn validate(&self) -> Result<(), IpamError> {
        let bad = |reason: String| IpamError::CorruptBlock {
            block: self.cidr,
            reason,
        };
        let n = block_len(&self.cidr)?;
        if self.allocations.len() != n {
            return Err(bad(format!(
                "{} allocations for {n} addresses",
                self.allocations.len()
            )));
        }
        if let Some((ord, idx)) = self
            .allocations
            .iter()
            .enumerate()
            .find_map(|(o, a)| a.filter(|i| *i >= self.attributes.len()).map(|i| (o, i)))
        {
            return Err(bad(format!(
                "ordinal {ord} points at missing attribute {idx}"
            )));
        }
        let mut seen = vec![false; n];
        for &ord in &self.unallocated {
            if ord >= n {
                return Err(bad(format!(
                    "unallocated ordinal {ord} is outside the block"
                )));
            }
            if seen[ord] {
                return Err(bad(format!("unallocated ordinal {ord} is listed twice")));
            }
            if self.allocations[ord].is_some() {
                return Err(bad(format!(
                    "ordinal {ord} is both allocated and unallocated"
                )));
            }
            seen[ord] = true;
        }
        Ok(())
    }

    /// Flaws that do not make allocating unsafe but that Calico's `ipam check` (master)
    /// reports: an attribute no ordinal points at, an ordinal neither allocated nor listed
    /// as free (an address lost for good), a `releasedAt` in the future (clock skew).
    pub fn lint(&self, now: DateTime<Utc>) -> Vec<String> {
        let mut out = Vec::new();
        let mut used = vec![false; self.attributes.len()];
        for i in self.allocations.iter().flatten() {
            if let Some(u) = used.get_mut(*i) {
                *u = true;
            }
        }
        if let Some(i) = used.iter().position(|u| !u) {
            out.push(format!(
                "attribute index {i} exists but is not indexed by an allocation"
            ));
        }
        if let Some(i) = self
            .attributes
            .iter()
            .position(|a| a.released_at.is_some_and(|t| t > now))
        {
            out.push(format!(
                "attribute index {i} has releasedAt in the future, suggesting clock skew"
            ));
        }
        let allocated = self.allocations.iter().filter(|a| a.is_some()).count();
        if allocated + self.unallocated.len() != self.allocations.len() {
            out.push(format!(
                "expected {} addresses in this block, but Unallocated ({}) + Allocated ({}) = {}",
                self.allocations.len(),
                self.unallocated.len(),
                allocated,
                self.unallocated.len() + allocated
            ));
        }
        out
    }

    pub fn host(&self) -> Option<&str> {
        self.affinity
            .as_deref()
            .and_then(|a| a.strip_prefix("host:"))
    }

    pub fn is_affine_to(&self, node: &str) -> bool {
        self.host() == Some(node)
    }

    /// Called before each write: a changed block always carries a new sequence number.
    pub fn bump_sequence(&mut self) {
        self.sequence_number = self.sequence_number.wrapping_add(1);
    }

    /// What ordinal `ord` is.
    pub fn slot(&self, ord: usize) -> Slot<'_> {
        let Some(attr) = self
            .allocations
            .get(ord)
            .copied()
            .flatten()
            .and_then(|i| self.attributes.get(i))
        else {
            return Slot::Free;
        };
        match attr.released_at {
            Some(t) => Slot::Cooling(t),
            None if attr.handle_id.is_some() => Slot::Held(attr),
            None => Slot::Ownerless,
        }
    }

    /// Calico's `garbageCollect`: frees every ordinal whose cooldown has passed (to the tail
    /// of `unallocated`, in ordinal order, its sequence number cleared) and drops attributes
    /// nobody points at. Returns whether the block changed.
    pub fn garbage_collect(&mut self, now: DateTime<Utc>, cooldown: TimeDelta) -> bool {
        let mut changed = false;
        for ord in 0..self.allocations.len() {
            if let Slot::Cooling(at) = self.slot(ord)
                && cooled(at, now, cooldown)
            {
                self.allocations[ord] = None;
                self.unallocated.push(ord);
                self.sequence_number_for_allocation.remove(&ord.to_string());
                changed = true;
            }
        }
        self.compact_attributes() || changed
    }

    /// Assigns up to `n` free addresses to `owner`, taking ordinals from the head of the FIFO
    /// and skipping reserved ones (they keep their place). Returns fewer than `n` when the
    /// block runs out. Expired holds are collected first.
    pub fn auto_assign(
        &mut self,
        n: usize,
        owner: &Owner,
        reservations: &Reservations,
        now: DateTime<Utc>,
        cooldown: TimeDelta,
    ) -> Vec<IpAddr> {
        self.garbage_collect(now, cooldown);
        let mut picked = Vec::new();
        let mut kept = Vec::with_capacity(self.unallocated.len());
        for &ord in &self.unallocated {
            let addr = addr_at(&self.cidr, ord);
            let usable = picked.len() < n
                && self.allocations.get(ord) == Some(&None)
                && addr.is_some_and(|a| !reservations.contains(a));
            match (usable, addr) {
                (true, Some(a)) => picked.push((ord, a)),
                _ => kept.push(ord),
            }
        }
        if picked.is_empty() {
            return Vec::new();
        }
        self.unallocated = kept;
        let idx = self.find_or_add_attribute(owner);
        for &(ord, _) in &picked {
            self.allocations[ord] = Some(idx);
            self.sequence_number_for_allocation
                .insert(ord.to_string(), self.sequence_number);
        }
        picked.into_iter().map(|(_, a)| a).collect()
    }

    /// Assigns exactly `addr` to `owner`; fails naming the holder when it is taken.
    pub fn assign_addr(
        &mut self,
        addr: IpAddr,
        owner: &Owner,
        now: DateTime<Utc>,
        cooldown: TimeDelta,
    ) -> Result<(), IpamError> {
        let ord = ordinal_of(&self.cidr, addr).ok_or(IpamError::AddressOutsideBlock {
            addr,
            block: self.cidr,
        })?;
        self.garbage_collect(now, cooldown);
        match self.slot(ord) {
            Slot::Free => {}
            Slot::Held(attr) => {
                return Err(IpamError::AddressInUse {
                    addr,
                    handle: attr.handle_id.clone().unwrap_or_default(),
                });
            }
            Slot::Cooling(at) => {
                return Err(IpamError::AddressCoolingDown {
                    addr,
                    until: at + cooldown,
                });
            }
            Slot::Ownerless => {
                return Err(IpamError::AddressInUse {
                    addr,
                    handle: String::new(),
                });
            }
        }
        self.unallocated.retain(|&o| o != ord);
        let idx = self.find_or_add_attribute(owner);
        self.allocations[ord] = Some(idx);
        self.sequence_number_for_allocation
            .insert(ord.to_string(), self.sequence_number);
        Ok(())
    }

    /// Calico's `releaseByHandle`: every address `handle` holds in this block points at a new
    /// `releasedAt` attribute, then the block is garbage-collected (so with no cooldown they
    /// are free at once). None held: nothing changes.
    pub fn release_by_handle(
        &mut self,
        handle: &str,
        now: DateTime<Utc>,
        cooldown: TimeDelta,
    ) -> Vec<IpAddr> {
        let ords: Vec<usize> = (0..self.allocations.len())
            .filter(|&o| {
                matches!(self.slot(o), Slot::Held(a) if a.handle_id.as_deref() == Some(handle))
            })
            .collect();
        if ords.is_empty() {
            return Vec::new();
        }
        let marker = self.add_cooldown_attribute(now);
        for &ord in &ords {
            self.allocations[ord] = Some(marker);
        }
        self.garbage_collect(now, cooldown);
        ords.iter()
            .filter_map(|&o| addr_at(&self.cidr, o))
            .collect()
    }

    /// Calico's `release` of one address: an allocated ordinal that is not already cooling
    /// (held or ownerless) gets a fresh sequence number and a `releasedAt` attribute, then
    /// the block is garbage-collected. Returns Some(the handle it had, None when ownerless),
    /// or None when there was nothing to release.
    pub fn release_ordinal(
        &mut self,
        ord: usize,
        now: DateTime<Utc>,
        cooldown: TimeDelta,
    ) -> Option<Option<String>> {
        let had = match self.slot(ord) {
            Slot::Held(a) => a.handle_id.clone(),
            Slot::Ownerless => None,
            Slot::Free | Slot::Cooling(_) => return None,
        };
        let marker = self.add_cooldown_attribute(now);
        self.allocations[ord] = Some(marker);
        self.sequence_number_for_allocation
            .insert(ord.to_string(), self.sequence_number);
        self.garbage_collect(now, cooldown);
        Some(had)
    }

    fn add_cooldown_attribute(&mut self, now: DateTime<Utc>) -> usize {
        self.attributes.push(Attribute {
            released_at: Some(stored_time(now)),
            ..Attribute::default()
        });
        self.attributes.len() - 1
    }

    /// Addresses that can be handed out now (reserved ones excluded), not counting holds
    /// whose cooldown has passed but that are not collected yet (see `expired_holds`).
    pub fn free_count(&self, reservations: &Reservations) -> usize {
        self.unallocated
            .iter()
            .filter(|&&o| self.allocations.get(o) == Some(&None))
            .filter(|&&o| addr_at(&self.cidr, o).is_some_and(|a| !reservations.contains(a)))
            .count()
    }

    /// Addresses held by a handle.
    pub fn in_use_count(&self) -> usize {
        self.count(|a| a.is_held())
    }

    /// Addresses released but not collected yet (cooling down, or cooled and waiting for the
    /// next read of the block).
    pub fn cooling_count(&self) -> usize {
        self.count(Attribute::is_cooling)
    }

    /// Addresses allocated to an attribute with neither a handle nor `releasedAt`.
    pub fn ownerless_count(&self) -> usize {
        self.count(Attribute::is_ownerless)
    }

    fn count(&self, f: impl Fn(&Attribute) -> bool) -> usize {
        self.allocations
            .iter()
            .filter(|a| a.and_then(|i| self.attributes.get(i)).is_some_and(&f))
            .count()
    }

    /// The release time of each cooling ordinal whose address is not reserved (those are
    /// the ones a collection would make assignable).
    pub fn cooling_releases(&self, reservations: &Reservations) -> Vec<DateTime<Utc>> {
        let mut out: Vec<DateTime<Utc>> = (0..self.allocations.len())
            .filter_map(|o| match self.slot(o) {
                Slot::Cooling(t) => addr_at(&self.cidr, o)
                    .filter(|a| !reservations.contains(*a))
                    .map(|_| t),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    /// Holds whose cooldown has passed at `now` (a read for allocation frees them).
    pub fn expired_holds(&self, now: DateTime<Utc>, cooldown: TimeDelta) -> usize {
        (0..self.allocations.len())
            .filter(|&o| matches!(self.slot(o), Slot::Cooling(t) if cooled(t, now, cooldown)))
            .count()
    }

    /// Earliest release among the cooling ordinals.
    pub fn earliest_release(&self) -> Option<DateTime<Utc>> {
        self.attributes
            .iter()
            .enumerate()
            .filter(|(i, _)| self.allocations.contains(&Some(*i)))
            .filter_map(|(_, a)| a.released_at)
            .min()
    }

    /// No ordinal points at anything: neither held, cooling down nor ownerless.
    pub fn is_empty(&self) -> bool {
        self.allocations.iter().all(Option::is_none)
    }

    /// Count of addresses per handle, the view an IPAMHandle's `block` map must agree with.
    pub fn handle_counts(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for o in 0..self.allocations.len() {
            if let Slot::Held(a) = self.slot(o)
                && let Some(h) = &a.handle_id
            {
                *out.entry(h.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// The handle and attributes holding `addr`, if a handle holds it.
    pub fn holder(&self, addr: IpAddr) -> Option<&Attribute> {
        match self.slot(ordinal_of(&self.cidr, addr)?) {
            Slot::Held(a) => Some(a),
            _ => None,
        }
    }

    fn find_or_add_attribute(&mut self, owner: &Owner) -> usize {
        let wanted = Attribute {
            handle_id: Some(owner.handle_id.clone()),
            secondary: Attrs::from(&owner.attrs),
            ..Attribute::default()
        };
        if let Some(i) = self.attributes.iter().position(|a| *a == wanted) {
            return i;
        }
        self.attributes.push(wanted);
        self.attributes.len() - 1
    }

    /// Drops attributes no ordinal points at and renumbers the rest, keeping their order.
    /// Returns whether any was dropped.
    pub fn compact_attributes(&mut self) -> bool {
        let mut used = vec![false; self.attributes.len()];
        for i in self.allocations.iter().flatten() {
            if let Some(u) = used.get_mut(*i) {
                *u = true;
            }
        }
        let mut remap = vec![None; self.attributes.len()];
        let mut next = 0;
        for (i, u) in used.iter().enumerate() {
            if *u {
                remap[i] = Some(next);
                next += 1;
            }
        }
        if next == self.attributes.len() {
            return false;
        }
        let mut i = 0;
        self.attributes.retain(|_| {
            let keep = used[i];
            i += 1;
            keep
        });
        for a in self.allocations.iter_mut() {
            *a = a.and_then(|i| remap.get(i).copied().flatten());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 30 s cooldown, as an operator might set `ipCooldownSeconds`.
    const COOL: TimeDelta = TimeDelta::seconds(30);
    const NO_COOL: TimeDelta = TimeDelta::seconds(0);

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }
    fn owner(h: &str) -> Owner {
        Owner {
            handle_id: h.to_string(),
            attrs: [("node".to_string(), "n1".to_string())].into(),
        }
    }
    fn block(cidr: &str) -> Block {
        Block::new(
            cidr.parse().unwrap(),
            Some(host_affinity("n1")),
            Some(t(0)),
            7,
        )
        .unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    const NONE: Reservations = Reservations::EMPTY;

    #[test]
    fn new_block_hands_out_addresses_in_order_from_dot_zero() {
        let mut b = block("10.0.0.0/29");
        let got = b.auto_assign(3, &owner("h1"), &NONE, t(0), COOL);
        assert_eq!(got, vec![ip("10.0.0.0"), ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(b.free_count(&NONE), 5);
        assert_eq!(b.in_use_count(), 3);
        assert_eq!(
            b.attributes.len(),
            1,
            "one attribute shared by the three ordinals"
        );
        assert_eq!(b.sequence_number_for_allocation.get("2"), Some(&7));
        b.validate().unwrap();
    }

    #[test]
    fn without_cooldown_a_release_frees_at_once_and_writes_no_released_at() {
        let mut b = block("10.0.0.0/30");
        for h in ["a", "b", "c", "d"] {
            b.auto_assign(1, &owner(h), &NONE, t(0), NO_COOL);
        }
        b.release_by_handle("c", t(1), NO_COOL);
        b.release_by_handle("a", t(2), NO_COOL);
        assert_eq!(b.unallocated, vec![2, 0]);
        assert!(b.attributes.iter().all(|a| a.released_at.is_none()));
        assert_eq!(b.attributes.len(), 2);
        assert!(!b.sequence_number_for_allocation.contains_key("2"));
        let got = b.auto_assign(1, &owner("e"), &NONE, t(3), NO_COOL);
        assert_eq!(
            got,
            vec![ip("10.0.0.2")],
            "c was freed first, so it is reused first"
        );
    }

    #[test]
    fn a_release_with_cooldown_writes_calicos_released_at_attribute() {
        let mut b = block("10.0.0.0/30");
        b.auto_assign(2, &owner("a"), &NONE, t(0), COOL);
        let at = t(10) + TimeDelta::milliseconds(700);
        assert_eq!(b.release_by_handle("a", at, COOL).len(), 2);
        // Calico points the ordinals at a new attribute with only releasedAt (whole seconds,
        // as a metav1.Time is stored) and keeps them out of `unallocated`.
        assert_eq!(
            b.attributes,
            vec![Attribute {
                released_at: Some(t(10)),
                ..Attribute::default()
            }]
        );
        assert_eq!(b.allocations, vec![Some(0), Some(0), None, None]);
        assert_eq!(b.unallocated, vec![2, 3]);
        assert_eq!(
            b.sequence_number_for_allocation.get("0"),
            Some(&7),
            "kept until collected"
        );
        assert_eq!(b.cooling_count(), 2);
        assert_eq!(b.in_use_count(), 0);
        assert!(
            !b.is_empty(),
            "cooling addresses keep the block from being released"
        );
        // A second release gets its own attribute, as in Calico.
        b.auto_assign(1, &owner("b"), &NONE, t(11), COOL);
        b.release_by_handle("b", t(12), COOL);
        assert_eq!(b.attributes.len(), 2);
        b.validate().unwrap();
        assert!(b.lint(t(12)).is_empty(), "{:?}", b.lint(t(12)));
    }

    #[test]
    fn cooling_addresses_are_collected_only_after_the_cooldown() {
        let mut b = block("10.0.0.0/31");
        b.auto_assign(2, &owner("a"), &NONE, t(0), COOL);
        b.release_by_handle("a", t(10), COOL);
        assert!(b.auto_assign(1, &owner("b"), &NONE, t(40), COOL).is_empty());
        assert!(matches!(
            b.assign_addr(ip("10.0.0.1"), &owner("b"), t(40), COOL),
            Err(IpamError::AddressCoolingDown { .. })
        ));
        assert_eq!(b.expired_holds(t(40), COOL), 0, "Calico: strictly before");
        assert_eq!(b.expired_holds(t(41), COOL), 2);
        let got = b.auto_assign(1, &owner("b"), &NONE, t(41), COOL);
        assert_eq!(got, vec![ip("10.0.0.0")]);
        assert_eq!(b.cooling_count(), 0);
        assert_eq!(
            b.attributes.len(),
            1,
            "the releasedAt marker is compacted away"
        );
        assert!(!b.sequence_number_for_allocation.contains_key("1"));
        b.validate().unwrap();
    }

    #[test]
    fn collected_ordinals_join_the_fifo_in_ordinal_order() {
        let mut b = block("10.0.0.0/30");
        for h in ["a", "b", "c", "d"] {
            b.auto_assign(1, &owner(h), &NONE, t(0), COOL);
        }
        b.release_by_handle("d", t(1), COOL);
        b.release_by_handle("b", t(2), COOL);
        assert!(b.garbage_collect(t(100), COOL));
        assert_eq!(b.unallocated, vec![1, 3], "Calico walks ordinals in order");
        assert!(!b.garbage_collect(t(100), COOL), "nothing left to collect");
    }

    #[test]
    fn entries_left_with_released_at_are_converted_when_the_cooldown_is_zero() {
        let mut b = block("10.0.0.0/30");
        b.auto_assign(3, &owner("a"), &NONE, t(0), COOL);
        b.release_by_handle("a", t(1), COOL);
        assert_eq!(b.cooling_count(), 3);
        assert_eq!(b.expired_holds(t(1), NO_COOL), 3);
        assert!(b.garbage_collect(t(1), NO_COOL));
        assert!(b.is_empty() && b.attributes.is_empty());
        assert_eq!(b.unallocated, vec![3, 0, 1, 2]);
    }

    #[test]
    fn ownerless_entries_are_neither_free_nor_held_and_release_by_address() {
        let mut b = block("10.0.0.0/30");
        b.auto_assign(2, &owner("a"), &NONE, t(0), NO_COOL);
        // What calicoctl 3.32 leaves when it rewrites a cooling entry: `{}`.
        b.attributes[0] = Attribute::default();
        assert_eq!(b.slot(0), Slot::Ownerless);
        assert_eq!(
            (b.ownerless_count(), b.in_use_count(), b.cooling_count()),
            (2, 0, 0)
        );
        assert!(!b.garbage_collect(t(50), NO_COOL), "GC leaves `{{}}` alone");
        assert!(b.handle_counts().is_empty());
        assert!(b.holder(ip("10.0.0.0")).is_none());
        assert_eq!(b.release_ordinal(0, t(60), NO_COOL), Some(None));
        assert_eq!(b.release_ordinal(0, t(60), NO_COOL), None);
        assert_eq!(b.unallocated, vec![2, 3, 0]);
        assert_eq!(b.ownerless_count(), 1);
    }

    #[test]
    fn lint_finds_lost_ordinals_stray_attributes_and_future_releases() {
        let mut b = block("10.0.0.0/30");
        b.auto_assign(1, &owner("a"), &NONE, t(0), COOL);
        b.unallocated.retain(|&o| o != 3);
        b.attributes.push(Attribute {
            released_at: Some(t(100)),
            ..Attribute::default()
        });
        let lint = b.lint(t(0));
        assert_eq!(lint.len(), 3, "{lint:?}");
        b.validate().unwrap();
    }

    #[test]
    fn reserved_ordinals_are_skipped_and_keep_their_place() {
        let mut b = block("10.0.0.0/29");
        let r = Reservations::new(["10.0.0.0/31".parse().unwrap()]);
        assert_eq!(b.free_count(&r), 6);
        let got = b.auto_assign(2, &owner("a"), &r, t(0), COOL);
        assert_eq!(got, vec![ip("10.0.0.2"), ip("10.0.0.3")]);
        assert_eq!(&b.unallocated[..2], &[0, 1]);
        assert_eq!(b.free_count(&r), 4);
    }

    #[test]
    fn release_by_handle_is_idempotent_and_takes_all_of_the_handle() {
        let mut b = block("10.0.0.0/29");
        b.auto_assign(2, &owner("a"), &NONE, t(0), NO_COOL);
        b.auto_assign(1, &owner("b"), &NONE, t(0), NO_COOL);
        assert_eq!(b.release_by_handle("a", t(1), NO_COOL).len(), 2);
        let before = b.clone();
        assert!(b.release_by_handle("a", t(2), NO_COOL).is_empty());
        assert_eq!(b, before);
        assert_eq!(b.handle_counts(), [("b".to_string(), 1)].into());
        assert_eq!(b.attributes.len(), 1);
        assert_eq!(
            b.allocations[2],
            Some(0),
            "b's ordinal is renumbered to the kept attribute"
        );
    }

    #[test]
    fn assigning_a_taken_address_names_its_handle() {
        let mut b = block("10.0.0.0/29");
        b.assign_addr(ip("10.0.0.5"), &owner("a"), t(0), COOL)
            .unwrap();
        let err = b
            .assign_addr(ip("10.0.0.5"), &owner("b"), t(0), COOL)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "address 10.0.0.5 is already in use by handle \"a\""
        );
        assert!(!b.unallocated.contains(&5));
        assert_eq!(
            b.holder(ip("10.0.0.5")).unwrap().handle_id.as_deref(),
            Some("a")
        );
        let got = b.auto_assign(8, &owner("c"), &NONE, t(0), COOL);
        assert_eq!(got.len(), 7);
        assert!(!got.contains(&ip("10.0.0.5")));
    }

    #[test]
    fn corrupt_blocks_are_refused() {
        let mut b = block("10.0.0.0/29");
        b.auto_assign(1, &owner("a"), &NONE, t(0), COOL);
        let mut dup = b.clone();
        dup.unallocated.push(0);
        assert!(dup.validate().is_err());
        let mut short = b.clone();
        short.allocations.pop();
        assert!(short.validate().is_err());
        let mut dangling = b;
        dangling.allocations[3] = Some(9);
        assert!(dangling.validate().is_err());
    }

    #[test]
    fn v6_block_assigns_from_its_first_address() {
        let mut b = block("fd00::40/122");
        let got = b.auto_assign(2, &owner("a"), &NONE, t(0), COOL);
        assert_eq!(got, vec![ip("fd00::40"), ip("fd00::41")]);
        assert_eq!(b.free_count(&NONE), 62);
    }
}
