//! Block maths over IPv4 and IPv6 as u128: which block holds an address, ordinals inside a
//! block, Calico's object names for blocks and affinities, and the seeded walk over a pool's
//! block CIDRs that spreads nodes out without materialising huge IPv6 ranges.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

use super::IpamError;

/// Largest block we accept: 4096 addresses (v4 /20, v6 /116), Calico's limits. A bigger block
/// from the datastore would make `allocations` huge, so it is rejected rather than allocated.
pub const MAX_BLOCK_ADDRESSES: u128 = 4096;

/// Kubernetes object names are DNS subdomains, at most 253 characters.
const MAX_NAME_LEN: usize = 253;

pub fn addr_to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address with value `v` in the family of `like`; v4 values are truncated to 32 bits.
pub fn u128_to_addr(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

fn max_prefix(v4: bool) -> u8 {
    if v4 { 32 } else { 128 }
}

/// Number of addresses in `net` (saturates at u128::MAX for ::/0).
pub fn num_addresses(net: &IpNet) -> u128 {
    let host_bits = u32::from(max_prefix(is_v4(net)) - net.prefix_len());
    1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
}

pub fn is_v4(net: &IpNet) -> bool {
    matches!(net, IpNet::V4(_))
}

fn make_net(base: u128, prefix: u8, v4: bool) -> IpNet {
    match u128_to_addr(base, v4) {
        // Prefixes are checked by callers; trunc() keeps the result strictly masked.
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, prefix.min(32)).unwrap_or_default().trunc()),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, prefix.min(128)).unwrap_or_default().trunc()),
    }
}

/// The block of prefix `block_size` that contains `addr`.
pub fn block_containing(addr: IpAddr, block_size: u8) -> Result<IpNet, IpamError> {
    let v4 = addr.is_ipv4();
    if block_size > max_prefix(v4) {
        return Err(IpamError::InvalidBlockSize {
            block_size,
            reason: format!("longer than an address of {addr}"),
        });
    }
    Ok(make_net(addr_to_u128(addr), block_size, v4))
}

/// Checks a pool's blockSize against its CIDR: same family, not shorter than the pool, and a
/// block small enough to hold its allocation array in memory.
pub fn validate_block_size(pool: &IpNet, block_size: u8) -> Result<(), IpamError> {
    let v4 = is_v4(pool);
    let bad = |reason: String| IpamError::InvalidBlockSize { block_size, reason };
    if block_size > max_prefix(v4) {
        return Err(bad(format!("longer than the address family of {pool}")));
    }
    if block_size < pool.prefix_len() {
        return Err(bad(format!("shorter than the pool prefix {pool}")));
    }
    let n = 1u128 << (max_prefix(v4) - block_size);
    if n > MAX_BLOCK_ADDRESSES {
        return Err(bad(format!(
            "blocks of {n} addresses exceed {MAX_BLOCK_ADDRESSES}"
        )));
    }
    Ok(())
}

/// Number of addresses in a block, checked against MAX_BLOCK_ADDRESSES.
pub fn block_len(block: &IpNet) -> Result<usize, IpamError> {
    let n = num_addresses(block);
    if n > MAX_BLOCK_ADDRESSES {
        return Err(IpamError::InvalidBlockSize {
            block_size: block.prefix_len(),
            reason: format!("block {block} has {n} addresses, more than {MAX_BLOCK_ADDRESSES}"),
        });
    }
    Ok(n as usize)
}

/// Position of `addr` inside `block`, or None when it lies outside.
pub fn ordinal_of(block: &IpNet, addr: IpAddr) -> Option<usize> {
    if !block.contains(&addr) {
        return None;
    }
    let off = addr_to_u128(addr) - addr_to_u128(block.network());
    usize::try_from(off).ok()
}

/// The address at `ordinal` inside `block`, or None past its end.
pub fn addr_at(block: &IpNet, ordinal: usize) -> Option<IpAddr> {
    let ord = ordinal as u128;
    if ord >= num_addresses(block) {
        return None;
    }
    Some(u128_to_addr(
        addr_to_u128(block.network()) + ord,
        is_v4(block),
    ))
}

/// Calico's IPAMBlock name: the CIDR with `.`, `:` and `/` replaced by `-`.
pub fn block_name(block: &IpNet) -> String {
    block.to_string().replace(['.', ':', '/'], "-")
}

/// Calico's BlockAffinity name `<node>-<blockname>`; a name of 253 characters or more keeps a
/// prefix of the node name and appends 11 hex digits of sha256("<node>+<blockname>") so that
/// long node names still give distinct, valid names.
pub fn affinity_name(node: &str, block: &IpNet) -> String {
    let cidr_name = block_name(block);
    let name = format!("{node}-{cidr_name}");
    if name.len() < MAX_NAME_LEN {
        return name;
    }
    let keep = (MAX_NAME_LEN - 1).saturating_sub(cidr_name.len() + 13);
    let mut cut = keep.min(node.len());
    while !node.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = Sha256::digest(format!("{node}+{cidr_name}").as_bytes());
    let hash = hex::encode(digest);
    format!("{}-{cidr_name}-{}", &node[..cut], &hash[..11])
}

/// 32-bit FNV-1 (multiply, then xor), the hash Calico seeds a node's block walk with.
pub fn fnv1_32(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h = h.wrapping_mul(0x0100_0193);
        h ^= u32::from(*b);
    }
    h
}

/// splitmix64: spreads a 32-bit seed over 64 bits so start indices cover large v6 pools too.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Walks a pool's block CIDRs once, starting at an index derived from a seed and wrapping
/// around; computes each CIDR on the fly, so a /64 pool of /122 blocks costs nothing up front.
#[derive(Debug, Clone)]
pub struct BlockWalk {
    base: u128,
    step_bits: u32,
    block_size: u8,
    v4: bool,
    count: u128,
    start: u128,
    taken: u128,
}

impl BlockWalk {
    /// Walk of `pool` in blocks of `block_size`, starting at an index chosen by `seed`.
    pub fn new(pool: &IpNet, block_size: u8, seed: u32) -> Result<BlockWalk, IpamError> {
        validate_block_size(pool, block_size)?;
        let v4 = is_v4(pool);
        let count_bits = u32::from(block_size - pool.prefix_len());
        let count = 1u128.checked_shl(count_bits).unwrap_or(u128::MAX);
        let wide = (u128::from(splitmix64(u64::from(seed))) << 64)
            | u128::from(splitmix64(u64::from(seed) ^ 0x5555_5555));
        let start = wide % count;
        Ok(BlockWalk {
            base: addr_to_u128(pool.network()),
            step_bits: u32::from(max_prefix(v4) - block_size),
            block_size,
            v4,
            count,
            start,
            taken: 0,
        })
    }

    /// Walk seeded by FNV-1 of the node name, as Calico seeds it.
    pub fn for_node(pool: &IpNet, block_size: u8, node: &str) -> Result<BlockWalk, IpamError> {
        BlockWalk::new(pool, block_size, fnv1_32(node.as_bytes()))
    }

    /// Total number of blocks in the pool.
    pub fn block_count(&self) -> u128 {
        self.count
    }
}

impl Iterator for BlockWalk {
    type Item = IpNet;

    fn next(&mut self) -> Option<IpNet> {
        if self.taken >= self.count {
            return None;
        }
        // (start + taken) mod count without overflowing for a ::/0 pool of /128 blocks.
        let rest = self.count - self.taken;
        let idx = if self.start >= rest {
            self.start - rest
        } else {
            self.start + self.taken
        };
        self.taken += 1;
        let offset = idx.checked_shl(self.step_bits).unwrap_or(0);
        Some(make_net(
            self.base.wrapping_add(offset),
            self.block_size,
            self.v4,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_address_maps_to_its_block_and_ordinal_and_back() {
        let b = block_containing(ip("10.244.1.77"), 26).unwrap();
        assert_eq!(b, net("10.244.1.64/26"));
        assert_eq!(ordinal_of(&b, ip("10.244.1.77")), Some(13));
        assert_eq!(addr_at(&b, 13), Some(ip("10.244.1.77")));
        assert_eq!(addr_at(&b, 64), None);
        assert_eq!(ordinal_of(&b, ip("10.244.1.128")), None);
        assert_eq!(num_addresses(&b), 64);
    }

    #[test]
    fn v6_address_maps_to_its_block_and_ordinal_and_back() {
        let b = block_containing(ip("fd00:10:244::1:2c5"), 122).unwrap();
        assert_eq!(b, net("fd00:10:244::1:2c0/122"));
        assert_eq!(ordinal_of(&b, ip("fd00:10:244::1:2c5")), Some(5));
        assert_eq!(addr_at(&b, 63), Some(ip("fd00:10:244::1:2ff")));
        assert_eq!(block_len(&b).unwrap(), 64);
        assert_eq!(num_addresses(&net("::/0")), u128::MAX);
    }

    #[test]
    fn block_names_replace_dots_colons_and_slash() {
        assert_eq!(block_name(&net("10.244.1.0/26")), "10-244-1-0-26");
        assert_eq!(block_name(&net("fd00:10:244::/122")), "fd00-10-244---122");
        assert_eq!(
            affinity_name("node1", &net("10.244.1.0/26")),
            "node1-10-244-1-0-26"
        );
    }

    #[test]
    fn long_affinity_names_are_truncated_with_a_hash() {
        let node = "n".repeat(300);
        let block = net("10.244.1.0/26");
        let name = affinity_name(&node, &block);
        assert_eq!(name.len(), 252);
        assert!(name.contains("-10-244-1-0-26-"));
        let other = affinity_name(&format!("{}x", "n".repeat(299)), &block);
        assert_ne!(name, other, "the hash keeps truncated names distinct");
        // 253 characters exactly is already too long.
        let node = "a".repeat(253 - "-10-244-1-0-26".len());
        assert_eq!(affinity_name(&node, &block).len(), 252);
    }

    #[test]
    fn fnv1_matches_the_reference_vectors() {
        // FNV-1 32-bit reference values (not FNV-1a).
        assert_eq!(fnv1_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1_32(b"a"), 0x050c_5d7e);
        assert_eq!(fnv1_32(b"foobar"), 0x31f0_b262);
    }

    #[test]
    fn walk_visits_every_block_once_starting_at_the_seed() {
        let pool = net("192.168.0.0/24");
        let walk = BlockWalk::new(&pool, 26, 7).unwrap();
        assert_eq!(walk.block_count(), 4);
        let blocks: Vec<_> = walk.collect();
        let mut sorted = blocks.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "192.168.0.0/26",
                "192.168.0.64/26",
                "192.168.0.128/26",
                "192.168.0.192/26"
            ]
            .map(net)
            .to_vec()
        );
        // Sequential with wrap-around from the start.
        let first = ordinal_of(&pool, blocks[0].network()).unwrap() / 64;
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(
                ordinal_of(&pool, b.network()).unwrap() / 64,
                (first + i) % 4
            );
        }
    }

    #[test]
    fn walks_of_different_nodes_start_at_different_blocks() {
        let pool = net("10.0.0.0/16");
        let starts: std::collections::BTreeSet<_> = (0..20)
            .map(|i| {
                BlockWalk::for_node(&pool, 26, &format!("node-{i}"))
                    .unwrap()
                    .next()
                    .unwrap()
            })
            .collect();
        assert!(starts.len() >= 15, "starts should spread: {starts:?}");
    }

    #[test]
    fn walk_over_a_huge_v6_pool_is_lazy() {
        let pool = net("fd00::/48");
        let mut walk = BlockWalk::for_node(&pool, 122, "node-a").unwrap();
        assert_eq!(walk.block_count(), 1u128 << 74);
        let a = walk.next().unwrap();
        let b = walk.next().unwrap();
        assert!(pool.contains(&a) && pool.contains(&b));
        assert_eq!(a.prefix_len(), 122);
        assert_ne!(a, b);
    }

    #[test]
    fn block_size_is_checked_against_the_pool() {
        assert!(validate_block_size(&net("10.0.0.0/16"), 26).is_ok());
        assert!(validate_block_size(&net("10.0.0.0/26"), 24).is_err());
        assert!(validate_block_size(&net("10.0.0.0/8"), 33).is_err());
        assert!(validate_block_size(&net("10.0.0.0/8"), 16).is_err());
        assert!(validate_block_size(&net("fd00::/64"), 122).is_ok());
    }
}
