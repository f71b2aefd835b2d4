//! Free-block search over a snapshot of the block cache: where the next address for a node
//! should come from (its own block, a new claim, a reclaimed empty block, or a borrow), or an
//! error that says exactly why there is none. No API calls: the cache is the input.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;

use super::IpamError;
use super::block::{Block, DEFAULT_COOLDOWN, cooled};
use super::cidr::{BlockWalk, fnv1_32, num_addresses};
use super::pools::Pool;
use super::reservations::Reservations;

/// Calico's minimum age before an empty block affine to another node may be taken over.
pub const EMPTY_BLOCK_MIN_RECLAIM_AGE: TimeDelta = TimeDelta::minutes(1);

/// A block as the search sees it, computed once per cache update. Whether an address is
/// free depends on the time (a cooling address becomes assignable once its cooldown has
/// passed, and the writer collects it as it reads the block), so the search asks `free_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    pub cidr: IpNet,
    /// Node of a `host:` affinity; None for no affinity or a `virtual:` one.
    pub host: Option<String>,
    /// True when the block has an affinity of any kind.
    pub affine: bool,
    pub claim_time: Option<DateTime<Utc>>,
    /// Assignable now, not counting expired holds.
    pub free: usize,
    /// Held by a handle.
    pub in_use: usize,
    /// Released, not collected yet.
    pub cooling: usize,
    /// Allocated to nobody (`{}` attribute): not free, and keeps the block from being idle.
    pub ownerless: usize,
    /// `releasedAt` of each cooling address that is not reserved, sorted.
    pub cooling_releases: Vec<DateTime<Utc>>,
    pub sequence_number: u64,
}

impl BlockInfo {
    pub fn of(b: &Block, reservations: &Reservations) -> BlockInfo {
        BlockInfo {
            cidr: b.cidr,
            host: b.host().map(str::to_string),
            affine: b.affinity.is_some(),
            claim_time: b.affinity_claim_time,
            free: b.free_count(reservations),
            in_use: b.in_use_count(),
            cooling: b.cooling_count(),
            ownerless: b.ownerless_count(),
            cooling_releases: b.cooling_releases(reservations),
            sequence_number: b.sequence_number,
        }
    }

    /// Addresses an allocation reading the block at `now` could hand out: the free ones and
    /// the holds whose cooldown has passed (the read collects them, full block or not).
    pub fn free_at(&self, now: DateTime<Utc>, cooldown: TimeDelta) -> usize {
        self.free + self.expired_at(now, cooldown)
    }

    /// Cooling addresses whose cooldown has passed at `now`.
    pub fn expired_at(&self, now: DateTime<Utc>, cooldown: TimeDelta) -> usize {
        self.cooling_releases
            .partition_point(|t| cooled(*t, now, cooldown))
    }

    /// Nothing held or ownerless, and every release cooled down.
    pub fn idle_at(&self, now: DateTime<Utc>, cooldown: TimeDelta) -> bool {
        self.in_use == 0
            && self.ownerless == 0
            && self.cooling == self.cooling_releases.len()
            && self.expired_at(now, cooldown) == self.cooling
    }
}

/// IPAMConfig knobs that shape the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// 0 means no cap (Calico silently caps at 20; we do not).
    pub max_blocks_per_host: u32,
    pub strict_affinity: bool,
    pub auto_allocate_blocks: bool,
    pub reclaim_min_age: TimeDelta,
    /// ipCooldownSeconds: how long a released address stays out of use.
    pub cooldown: TimeDelta,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_blocks_per_host: 0,
            strict_affinity: false,
            auto_allocate_blocks: true,
            reclaim_min_age: EMPTY_BLOCK_MIN_RECLAIM_AGE,
            cooldown: DEFAULT_COOLDOWN,
        }
    }
}

/// Where the next address should come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A block affine to this node with a free address.
    Affine(IpNet),
    /// A block CIDR with no block object yet: claim it for this node.
    Claim { pool: String, cidr: IpNet },
    /// An empty block another node (or nobody) holds: take it over if it is still empty and
    /// still at `sequence_number`.
    Reclaim {
        cidr: IpNet,
        from: Option<String>,
        sequence_number: u64,
    },
    /// Another node's block with a free address.
    Borrow(IpNet),
}

impl Step {
    /// The block this step would allocate from.
    pub fn cidr(&self) -> IpNet {
        match self {
            Step::Affine(c) | Step::Borrow(c) => *c,
            Step::Claim { cidr, .. } | Step::Reclaim { cidr, .. } => *cidr,
        }
    }
}

pub struct Search<'a> {
    pub node: &'a str,
    pub pools: Vec<&'a Pool>,
    pub blocks: &'a BTreeMap<IpNet, BlockInfo>,
    pub reservations: &'a Reservations,
    pub limits: Limits,
    pub now: DateTime<Utc>,
    /// Candidates the caller already failed on (lost a race) during this request.
    pub skip: &'a [IpNet],
}

impl Search<'_> {
    fn in_pools<'b>(&'b self) -> impl Iterator<Item = (&'b Pool, &'b BlockInfo)> + 'b {
        self.pools.iter().flat_map(move |p| {
            self.blocks
                .range(p.cidr..)
                .take_while(move |(c, _)| p.cidr.contains(*c))
                .map(move |(_, b)| (*p, b))
        })
    }

    fn usable(&self, b: &BlockInfo) -> bool {
        !self.skip.contains(&b.cidr)
    }

    fn has_room(&self, b: &BlockInfo) -> bool {
        b.free_at(self.now, self.limits.cooldown) > 0 && self.usable(b)
    }

    /// The next place to allocate from, in Calico's order: own blocks with room, a new
    /// claim, an old empty block of another node, then a borrow (unless strict affinity).
    pub fn next_step(&self) -> Result<Step, IpamError> {
        if let Some((_, b)) = self
            .in_pools()
            .find(|(_, b)| b.host.as_deref() == Some(self.node) && self.has_room(b))
        {
            return Ok(Step::Affine(b.cidr));
        }
        let owned = self.owned_blocks();
        let capped = self.limits.max_blocks_per_host > 0
            && owned >= self.limits.max_blocks_per_host as usize;
        if capped {
            return Err(IpamError::BlockLimit {
                node: self.node.to_string(),
                owned,
                max: self.limits.max_blocks_per_host,
            });
        }
        if self.limits.auto_allocate_blocks {
            if let Some(step) = self.unclaimed() {
                return Ok(step);
            }
            if let Some(step) = self.reclaimable() {
                return Ok(step);
            }
        }
        if !self.limits.strict_affinity {
            if let Some(cidr) = self.borrowable() {
                return Ok(Step::Borrow(cidr));
            }
        } else if self.in_pools().any(|(_, b)| self.has_room(b)) {
            return Err(IpamError::StrictAffinity {
                node: self.node.to_string(),
                pools: self.pool_names(),
            });
        }
        Err(IpamError::Exhausted {
            pools: self.usage(),
        })
    }

    fn owned_blocks(&self) -> usize {
        let v4 = self.pools.first().is_none_or(|p| p.cidr.addr().is_ipv4());
        self.blocks
            .values()
            .filter(|b| b.host.as_deref() == Some(self.node) && b.cidr.addr().is_ipv4() == v4)
            .count()
    }

    fn unclaimed(&self) -> Option<Step> {
        for p in &self.pools {
            let existing = self.in_pools().filter(|(q, _)| q.name == p.name).count() as u128;
            let walk = BlockWalk::for_node(&p.cidr, p.block_size, self.node).ok()?;
            if existing >= walk.block_count() {
                continue;
            }
            // A free CIDR is found within existing+skip+reserved steps, so this terminates
            // quickly even for huge pools.
            let found = walk.into_iter().find(|c| {
                !self.blocks.contains_key(c)
                    && !self.skip.contains(c)
                    && !self.reservations.covers(c)
            });
            if let Some(cidr) = found {
                return Some(Step::Claim {
                    pool: p.name.clone(),
                    cidr,
                });
            }
        }
        None
    }

    fn reclaimable(&self) -> Option<Step> {
        let old_enough = |b: &BlockInfo| {
            b.claim_time
                .is_none_or(|t| self.now.signed_duration_since(t) >= self.limits.reclaim_min_age)
        };
        // Cooling addresses whose cooldown has passed no longer keep a block in use.
        let idle = |b: &BlockInfo| b.idle_at(self.now, self.limits.cooldown);
        self.in_pools()
            .map(|(_, b)| b)
            .filter(|b| idle(b) && b.host.as_deref() != Some(self.node) && self.usable(b))
            // virtual affinities (load balancers) are never taken over
            .filter(|b| b.host.is_some() || !b.affine)
            .filter(|b| !self.reservations.covers(&b.cidr) && old_enough(b))
            .min_by_key(|b| (b.claim_time, b.cidr))
            .map(|b| Step::Reclaim {
                cidr: b.cidr,
                from: b.host.clone(),
                sequence_number: b.sequence_number,
            })
    }

    /// A block of another node with room, starting at a node-seeded offset so concurrent
    /// borrowers spread over blocks instead of fighting over one.
    fn borrowable(&self) -> Option<IpNet> {
        let candidates: Vec<IpNet> = self
            .in_pools()
            .map(|(_, b)| b)
            .filter(|b| b.host.as_deref() != Some(self.node) && self.has_room(b))
            .map(|b| b.cidr)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let start = fnv1_32(self.node.as_bytes()) as usize % candidates.len();
        Some(candidates[start])
    }

    fn pool_names(&self) -> Vec<String> {
        self.pools.iter().map(|p| p.name.clone()).collect()
    }

    fn usage(&self) -> Vec<PoolUsage> {
        self.pools
            .iter()
            .map(|p| {
                let blocks: Vec<&BlockInfo> = self
                    .in_pools()
                    .filter(|(q, _)| q.name == p.name)
                    .map(|(_, b)| b)
                    .collect();
                PoolUsage {
                    name: p.name.clone(),
                    cidr: p.cidr,
                    total: num_addresses(&p.cidr),
                    in_use: blocks.iter().map(|b| b.in_use as u128).sum(),
                    cooling: blocks
                        .iter()
                        .map(|b| (b.cooling - b.expired_at(self.now, self.limits.cooldown)) as u128)
                        .sum(),
                    ownerless: blocks.iter().map(|b| b.ownerless as u128).sum(),
                    reserved: self.reservations.reserved_in(&p.cidr),
                }
            })
            .collect()
    }
}

/// Utilisation of one pool, for the exhaustion error (and later the metrics and CLI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    pub cidr: IpNet,
    pub total: u128,
    pub in_use: u128,
    /// Released and still inside the cooldown.
    pub cooling: u128,
    /// Allocated to no handle (see `tortie ipam check`; the leader's GC frees them).
    pub ownerless: u128,
    pub reserved: u128,
}

impl std::fmt::Display for PoolUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pool {:?} ({}) has no free address: {} of {} in use",
            self.name, self.cidr, self.in_use, self.total
        )?;
        if self.cooling > 0 {
            write!(f, ", {} released and cooling down", self.cooling)?;
        }
        if self.ownerless > 0 {
            write!(f, ", {} allocated with no owner", self.ownerless)?;
        }
        if self.reserved > 0 {
            write!(f, ", {} reserved", self.reserved)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AllowedUse;
    use crate::ipam::block::{DEFAULT_COOLDOWN, Owner, host_affinity};
    use crate::selector::Selector;

    static NO_RESERVATIONS: Reservations = Reservations::EMPTY;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }
    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn pool(name: &str, cidr: &str, block_size: u8) -> Pool {
        Pool {
            name: name.into(),
            cidr: net(cidr),
            block_size,
            disabled: false,
            node_selector: Selector::all(),
            namespace_selector: None,
            allowed_uses: vec![AllowedUse::Workload, AllowedUse::Tunnel],
            automatic: true,
            created: None,
        }
    }
    /// A block of `cidr` affine to `node` with `used` addresses held, claimed at t(claimed).
    fn block(cidr: &str, node: Option<&str>, used: usize, claimed: i64) -> BlockInfo {
        let mut b = Block::new(net(cidr), node.map(host_affinity), Some(t(claimed)), 1).unwrap();
        let owner = Owner {
            handle_id: "h".into(),
            attrs: BTreeMap::new(),
        };
        b.auto_assign(
            used,
            &owner,
            &Reservations::EMPTY,
            t(claimed),
            DEFAULT_COOLDOWN,
        );
        BlockInfo::of(&b, &Reservations::EMPTY)
    }
    fn cache(blocks: Vec<BlockInfo>) -> BTreeMap<IpNet, BlockInfo> {
        blocks.into_iter().map(|b| (b.cidr, b)).collect()
    }
    fn search<'a>(
        node: &'a str,
        pools: Vec<&'a Pool>,
        blocks: &'a BTreeMap<IpNet, BlockInfo>,
        limits: Limits,
    ) -> Search<'a> {
        Search {
            node,
            pools,
            blocks,
            reservations: &NO_RESERVATIONS,
            limits,
            now: t(1000),
            skip: &[],
        }
    }

    #[test]
    fn own_block_with_room_comes_first() {
        let p = pool("p", "10.0.0.0/24", 26);
        let blocks = cache(vec![
            block("10.0.0.0/26", Some("n1"), 64, 0),
            block("10.0.0.64/26", Some("n1"), 3, 0),
            block("10.0.0.128/26", Some("n2"), 0, 0),
        ]);
        let s = search("n1", vec![&p], &blocks, Limits::default());
        assert_eq!(s.next_step().unwrap(), Step::Affine(net("10.0.0.64/26")));
    }

    #[test]
    fn full_own_blocks_lead_to_a_claim_of_an_unclaimed_cidr() {
        let p = pool("p", "10.0.0.0/24", 26);
        let blocks = cache(vec![
            block("10.0.0.0/26", Some("n1"), 64, 0),
            block("10.0.0.64/26", Some("n2"), 1, 0),
        ]);
        let s = search("n1", vec![&p], &blocks, Limits::default());
        match s.next_step().unwrap() {
            Step::Claim { pool, cidr } => {
                assert_eq!(pool, "p");
                assert!(cidr == net("10.0.0.128/26") || cidr == net("10.0.0.192/26"));
            }
            other => panic!("expected a claim, got {other:?}"),
        }
        // A block lost in a race is skipped on the retry.
        let first = match s.next_step().unwrap() {
            Step::Claim { cidr, .. } => cidr,
            _ => unreachable!(),
        };
        let skip = [first];
        let s = Search { skip: &skip, ..s };
        assert!(matches!(s.next_step().unwrap(), Step::Claim { cidr, .. } if cidr != first));
    }

    #[test]
    fn old_empty_block_of_another_node_is_reclaimed_when_nothing_is_unclaimed() {
        let p = pool("p", "10.0.0.0/25", 26);
        let young = cache(vec![
            block("10.0.0.0/26", Some("n1"), 64, 0),
            block("10.0.0.64/26", Some("n2"), 0, 990),
        ]);
        let s = search(
            "n1",
            vec![&p],
            &young,
            Limits {
                strict_affinity: true,
                ..Limits::default()
            },
        );
        assert!(matches!(
            s.next_step(),
            Err(IpamError::StrictAffinity { .. })
        ));
        let old = cache(vec![
            block("10.0.0.0/26", Some("n1"), 64, 0),
            block("10.0.0.64/26", Some("n2"), 0, 100),
        ]);
        let s = search("n1", vec![&p], &old, Limits::default());
        assert_eq!(
            s.next_step().unwrap(),
            Step::Reclaim {
                cidr: net("10.0.0.64/26"),
                from: Some("n2".into()),
                sequence_number: 1
            }
        );
    }

    const COOL: TimeDelta = TimeDelta::seconds(30);

    fn cool_limits() -> Limits {
        Limits {
            cooldown: COOL,
            ..Limits::default()
        }
    }

    /// A block of `cidr` affine to `node`: every address allocated, then `released` of them
    /// released at t(`at`) with a 30 s cooldown.
    fn full_with_releases(cidr: &str, node: &str, released: usize, at: i64) -> Block {
        let mut b = Block::new(net(cidr), Some(host_affinity(node)), Some(t(0)), 1).unwrap();
        let n = b.allocations.len();
        for i in 0..n {
            let owner = Owner {
                handle_id: if i < released {
                    "gone".into()
                } else {
                    format!("h{i}")
                },
                attrs: BTreeMap::new(),
            };
            b.auto_assign(1, &owner, &Reservations::EMPTY, t(0), COOL);
        }
        b.release_by_handle("gone", t(at), COOL);
        b
    }

    #[test]
    fn block_whose_releases_have_cooled_down_counts_as_empty_for_reclaim() {
        let p = pool("p", "10.0.0.0/25", 26);
        let mut other = Block::new(
            net("10.0.0.64/26"),
            Some(host_affinity("n2")),
            Some(t(0)),
            1,
        )
        .unwrap();
        let owner = Owner {
            handle_id: "h".into(),
            attrs: BTreeMap::new(),
        };
        other.auto_assign(1, &owner, &Reservations::EMPTY, t(0), COOL);
        other.release_by_handle("h", t(980), COOL);
        let blocks = cache(vec![
            block("10.0.0.0/26", Some("n1"), 64, 0),
            BlockInfo::of(&other, &Reservations::EMPTY),
        ]);
        let s = search("n1", vec![&p], &blocks, cool_limits());
        assert!(
            matches!(s.next_step().unwrap(), Step::Borrow(_)),
            "released 20 s ago: still cooling"
        );
        let s = Search {
            now: t(1011),
            ..search("n1", vec![&p], &blocks, cool_limits())
        };
        assert!(
            matches!(s.next_step().unwrap(), Step::Reclaim { .. }),
            "cooldown over"
        );
    }

    #[test]
    fn a_full_block_whose_only_free_addresses_are_expired_holds_is_used() {
        // The pool's only block is full: 5 held, 3 released at t(900). Until the cooldown
        // has passed the pool is exhausted; after it, the node's own block serves.
        let p = pool("small", "10.251.0.0/29", 29);
        let b = full_with_releases("10.251.0.0/29", "n1", 3, 900);
        assert_eq!(b.free_count(&Reservations::EMPTY), 0);
        let blocks = cache(vec![BlockInfo::of(&b, &Reservations::EMPTY)]);
        let early = Search {
            now: t(920),
            ..search("n1", vec![&p], &blocks, cool_limits())
        };
        assert_eq!(
            early.next_step().unwrap_err().to_string(),
            "pool \"small\" (10.251.0.0/29) has no free address: 5 of 8 in use, 3 released and cooling down"
        );
        let later = Search {
            now: t(931),
            ..search("n1", vec![&p], &blocks, cool_limits())
        };
        assert_eq!(
            later.next_step().unwrap(),
            Step::Affine(net("10.251.0.0/29"))
        );
        // Another node borrows from it the same way.
        let other = Search {
            now: t(931),
            ..search("n2", vec![&p], &blocks, cool_limits())
        };
        assert_eq!(
            other.next_step().unwrap(),
            Step::Borrow(net("10.251.0.0/29"))
        );
    }

    #[test]
    fn ownerless_addresses_keep_a_block_from_being_reclaimed() {
        let p = pool("p", "10.0.0.0/25", 26);
        let mut other = Block::new(
            net("10.0.0.64/26"),
            Some(host_affinity("n2")),
            Some(t(0)),
            1,
        )
        .unwrap();
        let owner = Owner {
            handle_id: "h".into(),
            attrs: BTreeMap::new(),
        };
        other.auto_assign(1, &owner, &Reservations::EMPTY, t(0), COOL);
        other.attributes[0] = crate::ipam::block::Attribute::default();
        let info = BlockInfo::of(&other, &Reservations::EMPTY);
        assert_eq!((info.in_use, info.ownerless), (0, 1));
        assert!(!info.idle_at(t(5000), COOL));
        let blocks = cache(vec![block("10.0.0.0/26", Some("n1"), 64, 0), info]);
        let s = search("n1", vec![&p], &blocks, cool_limits());
        assert!(matches!(s.next_step().unwrap(), Step::Borrow(_)));
    }

    #[test]
    fn borrowing_happens_without_strict_affinity_and_fails_clearly_with_it() {
        let p = pool("p", "10.0.0.0/25", 26);
        let blocks = cache(vec![
            block("10.0.0.0/26", Some("n1"), 64, 0),
            block("10.0.0.64/26", Some("n2"), 10, 0),
        ]);
        let s = search("n1", vec![&p], &blocks, Limits::default());
        assert_eq!(s.next_step().unwrap(), Step::Borrow(net("10.0.0.64/26")));
        let s = search(
            "n1",
            vec![&p],
            &blocks,
            Limits {
                strict_affinity: true,
                ..Limits::default()
            },
        );
        assert_eq!(
            s.next_step().unwrap_err().to_string(),
            "node \"n1\" has no free address in its own blocks and no block left to claim in \
             pools [\"p\"]; other nodes' blocks have room but strictAffinity is true"
        );
    }

    #[test]
    fn block_limit_is_enforced_only_when_set() {
        let p = pool("p", "10.0.0.0/24", 26);
        let blocks = cache(vec![
            block("10.0.0.0/26", Some("n1"), 64, 0),
            block("10.0.0.64/26", Some("n1"), 64, 0),
        ]);
        let s = search("n1", vec![&p], &blocks, Limits::default());
        assert!(
            matches!(s.next_step().unwrap(), Step::Claim { .. }),
            "0 means no cap"
        );
        let s = search(
            "n1",
            vec![&p],
            &blocks,
            Limits {
                max_blocks_per_host: 2,
                ..Limits::default()
            },
        );
        assert_eq!(
            s.next_step().unwrap_err().to_string(),
            "node \"n1\" holds 2 blocks, the maxBlocksPerHost limit (2), and none has a free address"
        );
    }

    #[test]
    fn exhausted_pool_error_names_the_pool_and_counts() {
        let p = pool("external-pool", "172.16.0.0/26", 29);
        let blocks = cache(
            (0..8)
                .map(|i| {
                    block(
                        &format!("172.16.0.{}/29", i * 8),
                        Some(&format!("n{}", i % 3)),
                        8,
                        0,
                    )
                })
                .collect(),
        );
        let s = search("n1", vec![&p], &blocks, Limits::default());
        assert_eq!(
            s.next_step().unwrap_err().to_string(),
            "pool \"external-pool\" (172.16.0.0/26) has no free address: 64 of 64 in use"
        );
    }

    #[test]
    fn fully_reserved_cidrs_are_not_claimed() {
        let p = pool("p", "10.0.0.0/25", 26);
        let blocks = cache(vec![block("10.0.0.0/26", Some("n1"), 64, 0)]);
        let r = Reservations::new([net("10.0.0.64/26")]);
        let s = Search {
            reservations: &r,
            ..search("n1", vec![&p], &blocks, Limits::default())
        };
        let err = s.next_step().unwrap_err().to_string();
        assert_eq!(
            err,
            "pool \"p\" (10.0.0.0/25) has no free address: 64 of 128 in use, 64 reserved"
        );
    }

    #[test]
    fn claims_in_a_huge_v6_pool_are_found_without_enumerating_it() {
        let p = pool("v6", "fd00::/48", 122);
        let blocks = BTreeMap::new();
        let s = search("n1", vec![&p], &blocks, Limits::default());
        assert!(
            matches!(s.next_step().unwrap(), Step::Claim { cidr, .. } if p.cidr.contains(&cidr))
        );
    }

    #[test]
    fn blocks_outside_the_chosen_pools_are_ignored() {
        let a = pool("a", "10.0.0.0/26", 26);
        let b = pool("b", "10.1.0.0/26", 26);
        let blocks = cache(vec![block("10.1.0.0/26", Some("n1"), 0, 0)]);
        let s = search("n1", vec![&a], &blocks, Limits::default());
        assert_eq!(
            s.next_step().unwrap(),
            Step::Claim {
                pool: "a".into(),
                cidr: net("10.0.0.0/26")
            }
        );
        let s = search("n1", vec![&b], &blocks, Limits::default());
        assert_eq!(s.next_step().unwrap(), Step::Affine(net("10.1.0.0/26")));
    }
}
