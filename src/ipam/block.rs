//! The allocator inside one block, over Calico's IPAMBlock representation: `allocations`
//! (ordinal → attribute index), the `unallocated` FIFO, de-duplicated `attributes`, the reuse
//! cooldown (`releasedAt`) and the sequence numbers that guard releases against ABA.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;

use super::IpamError;
use super::cidr::{addr_at, block_len, ordinal_of};
use super::reservations::Reservations;

/// Default time a released address stays out of circulation (conntrack entries may live on).
pub const DEFAULT_COOLDOWN: TimeDelta = TimeDelta::seconds(30);

/// One entry of a block's `attributes`: who holds the ordinals that point at it. An entry with
/// no handle and a `released_at` marks ordinals that are cooling down after release.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribute {
    pub handle_id: Option<String>,
    pub secondary: BTreeMap<String, String>,
    pub released_at: Option<DateTime<Utc>>,
}

impl Attribute {
    fn is_cooling(&self) -> bool {
        self.handle_id.is_none() && self.released_at.is_some()
    }
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

    /// Moves ordinals whose cooldown has passed to the tail of `unallocated`, oldest release
    /// first, and drops attributes nobody points at. Returns how many ordinals became free.
    pub fn reclaim_cooled(&mut self, now: DateTime<Utc>, cooldown: TimeDelta) -> usize {
        let mut cooled: Vec<(DateTime<Utc>, usize)> = self
            .allocations
            .iter()
            .enumerate()
            .filter_map(|(ord, a)| {
                let attr = self.attributes.get((*a)?)?;
                let at = attr.released_at.filter(|_| attr.is_cooling())?;
                (at + cooldown <= now).then_some((at, ord))
            })
            .collect();
        cooled.sort();
        for &(_, ord) in &cooled {
            self.allocations[ord] = None;
            self.unallocated.push(ord);
        }
        if !cooled.is_empty() {
            self.compact_attributes();
        }
        cooled.len()
    }

    /// Assigns up to `n` free addresses to `owner`, taking ordinals from the head of the FIFO
    /// and skipping reserved ones (they keep their place). Returns fewer than `n` when the
    /// block runs out.
    pub fn auto_assign(
        &mut self,
        n: usize,
        owner: &Owner,
        reservations: &Reservations,
        now: DateTime<Utc>,
        cooldown: TimeDelta,
    ) -> Vec<IpAddr> {
        self.reclaim_cooled(now, cooldown);
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
        self.reclaim_cooled(now, cooldown);
        if let Some(Some(idx)) = self.allocations.get(ord) {
            let attr = self.attributes.get(*idx);
            return Err(match attr.and_then(|a| a.handle_id.clone()) {
                Some(handle) => IpamError::AddressInUse { addr, handle },
                None => IpamError::AddressCoolingDown {
                    addr,
                    until: attr.and_then(|a| a.released_at).unwrap_or(now) + cooldown,
                },
            });
        }
        self.unallocated.retain(|&o| o != ord);
        let idx = self.find_or_add_attribute(owner);
        self.allocations[ord] = Some(idx);
        self.sequence_number_for_allocation
            .insert(ord.to_string(), self.sequence_number);
        Ok(())
    }

    /// Releases every address held by `handle` in this block (none held: nothing changes).
    /// With a cooldown the ordinals point at a `releasedAt` attribute until it passes;
    /// without one they go straight to the tail of the FIFO.
    pub fn release_by_handle(
        &mut self,
        handle: &str,
        now: DateTime<Utc>,
        cooldown: TimeDelta,
    ) -> Vec<IpAddr> {
        let ords: Vec<usize> = self
            .allocations
            .iter()
            .enumerate()
            .filter(|(_, a)| {
                a.and_then(|i| self.attributes.get(i))
                    .is_some_and(|attr| attr.handle_id.as_deref() == Some(handle))
            })
            .map(|(o, _)| o)
            .collect();
        if ords.is_empty() {
            return Vec::new();
        }
        let cooling = (cooldown > TimeDelta::zero()).then(|| {
            let marker = Attribute {
                handle_id: None,
                secondary: BTreeMap::new(),
                released_at: Some(now),
            };
            match self.attributes.iter().position(|a| *a == marker) {
                Some(i) => i,
                None => {
                    self.attributes.push(marker);
                    self.attributes.len() - 1
                }
            }
        });
        for &ord in &ords {
            self.allocations[ord] = cooling;
            self.sequence_number_for_allocation.remove(&ord.to_string());
            if cooling.is_none() {
                self.unallocated.push(ord);
            }
        }
        self.compact_attributes();
        ords.iter()
            .filter_map(|&o| addr_at(&self.cidr, o))
            .collect()
    }

    /// Addresses that can be handed out now (reserved ones excluded).
    pub fn free_count(&self, reservations: &Reservations) -> usize {
        self.unallocated
            .iter()
            .filter(|&&o| self.allocations.get(o) == Some(&None))
            .filter(|&&o| addr_at(&self.cidr, o).is_some_and(|a| !reservations.contains(a)))
            .count()
    }

    /// Addresses held by a handle.
    pub fn in_use_count(&self) -> usize {
        self.allocations
            .iter()
            .filter(|a| {
                a.and_then(|i| self.attributes.get(i))
                    .is_some_and(|x| x.handle_id.is_some())
            })
            .count()
    }

    /// Addresses released but still inside their cooldown.
    pub fn cooling_count(&self) -> usize {
        self.allocations
            .iter()
            .filter(|a| {
                a.and_then(|i| self.attributes.get(i))
                    .is_some_and(Attribute::is_cooling)
            })
            .count()
    }

    /// Latest release among the addresses still cooling down.
    pub fn last_release(&self) -> Option<DateTime<Utc>> {
        self.allocations
            .iter()
            .filter_map(|a| self.attributes.get((*a)?))
            .filter(|a| a.is_cooling())
            .filter_map(|a| a.released_at)
            .max()
    }

    /// No ordinal points at anything: neither held nor cooling down.
    pub fn is_empty(&self) -> bool {
        self.allocations.iter().all(Option::is_none)
    }

    /// Count of addresses per handle, the view an IPAMHandle's `block` map must agree with.
    pub fn handle_counts(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for a in self.allocations.iter().flatten() {
            if let Some(h) = self.attributes.get(*a).and_then(|x| x.handle_id.clone()) {
                *out.entry(h).or_insert(0) += 1;
            }
        }
        out
    }

    /// The handle and attributes holding `addr`, if it is held.
    pub fn holder(&self, addr: IpAddr) -> Option<&Attribute> {
        let ord = ordinal_of(&self.cidr, addr)?;
        let attr = self.attributes.get((*self.allocations.get(ord)?)?)?;
        attr.handle_id.is_some().then_some(attr)
    }

    fn find_or_add_attribute(&mut self, owner: &Owner) -> usize {
        let wanted = Attribute {
            handle_id: Some(owner.handle_id.clone()),
            secondary: owner.attrs.clone(),
            released_at: None,
        };
        if let Some(i) = self.attributes.iter().position(|a| *a == wanted) {
            return i;
        }
        self.attributes.push(wanted);
        self.attributes.len() - 1
    }

    /// Drops attributes no ordinal points at and renumbers the rest, keeping their order.
    pub fn compact_attributes(&mut self) {
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
            return;
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let got = b.auto_assign(3, &owner("h1"), &NONE, t(0), DEFAULT_COOLDOWN);
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
    fn released_addresses_are_reused_longest_free_first() {
        let mut b = block("10.0.0.0/30");
        let none = TimeDelta::zero();
        for h in ["a", "b", "c", "d"] {
            b.auto_assign(1, &owner(h), &NONE, t(0), none);
        }
        b.release_by_handle("c", t(1), none);
        b.release_by_handle("a", t(2), none);
        assert_eq!(b.unallocated, vec![2, 0]);
        let got = b.auto_assign(1, &owner("e"), &NONE, t(3), none);
        assert_eq!(
            got,
            vec![ip("10.0.0.2")],
            "c was freed first, so it is reused first"
        );
    }

    #[test]
    fn released_address_is_not_reused_during_cooldown() {
        let mut b = block("10.0.0.0/31");
        b.auto_assign(2, &owner("a"), &NONE, t(0), DEFAULT_COOLDOWN);
        assert_eq!(b.release_by_handle("a", t(10), DEFAULT_COOLDOWN).len(), 2);
        assert_eq!(b.cooling_count(), 2);
        assert!(
            !b.is_empty(),
            "cooling addresses keep the block from being released"
        );
        assert!(
            b.auto_assign(1, &owner("b"), &NONE, t(39), DEFAULT_COOLDOWN)
                .is_empty()
        );
        assert!(matches!(
            b.assign_addr(ip("10.0.0.1"), &owner("b"), t(39), DEFAULT_COOLDOWN),
            Err(IpamError::AddressCoolingDown { .. })
        ));
        let got = b.auto_assign(1, &owner("b"), &NONE, t(40), DEFAULT_COOLDOWN);
        assert_eq!(got, vec![ip("10.0.0.0")]);
        assert_eq!(b.cooling_count(), 0);
        assert_eq!(
            b.attributes.len(),
            1,
            "the releasedAt marker is compacted away"
        );
        b.validate().unwrap();
    }

    #[test]
    fn cooled_ordinals_join_the_fifo_in_release_order() {
        let mut b = block("10.0.0.0/30");
        for h in ["a", "b", "c", "d"] {
            b.auto_assign(1, &owner(h), &NONE, t(0), DEFAULT_COOLDOWN);
        }
        b.release_by_handle("d", t(1), DEFAULT_COOLDOWN);
        b.release_by_handle("b", t(2), DEFAULT_COOLDOWN);
        assert_eq!(b.reclaim_cooled(t(100), DEFAULT_COOLDOWN), 2);
        assert_eq!(b.unallocated, vec![3, 1]);
    }

    #[test]
    fn reserved_ordinals_are_skipped_and_keep_their_place() {
        let mut b = block("10.0.0.0/29");
        let r = Reservations::new(["10.0.0.0/31".parse().unwrap()]);
        assert_eq!(b.free_count(&r), 6);
        let got = b.auto_assign(2, &owner("a"), &r, t(0), DEFAULT_COOLDOWN);
        assert_eq!(got, vec![ip("10.0.0.2"), ip("10.0.0.3")]);
        assert_eq!(&b.unallocated[..2], &[0, 1]);
        assert_eq!(b.free_count(&r), 4);
    }

    #[test]
    fn release_by_handle_is_idempotent_and_takes_all_of_the_handle() {
        let mut b = block("10.0.0.0/29");
        b.auto_assign(2, &owner("a"), &NONE, t(0), TimeDelta::zero());
        b.auto_assign(1, &owner("b"), &NONE, t(0), TimeDelta::zero());
        assert_eq!(b.release_by_handle("a", t(1), TimeDelta::zero()).len(), 2);
        let before = b.clone();
        assert!(b.release_by_handle("a", t(2), TimeDelta::zero()).is_empty());
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
        b.assign_addr(ip("10.0.0.5"), &owner("a"), t(0), DEFAULT_COOLDOWN)
            .unwrap();
        let err = b
            .assign_addr(ip("10.0.0.5"), &owner("b"), t(0), DEFAULT_COOLDOWN)
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
        let got = b.auto_assign(8, &owner("c"), &NONE, t(0), DEFAULT_COOLDOWN);
        assert_eq!(got.len(), 7);
        assert!(!got.contains(&ip("10.0.0.5")));
    }

    #[test]
    fn corrupt_blocks_are_refused() {
        let mut b = block("10.0.0.0/29");
        b.auto_assign(1, &owner("a"), &NONE, t(0), DEFAULT_COOLDOWN);
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
        let got = b.auto_assign(2, &owner("a"), &NONE, t(0), DEFAULT_COOLDOWN);
        assert_eq!(got, vec![ip("fd00::40"), ip("fd00::41")]);
        assert_eq!(b.free_count(&NONE), 62);
    }
}
