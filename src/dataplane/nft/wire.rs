//! What every nf_tables message over nfnetlink shares: the subsystem, the family codes and
//! NUL-terminated names (used by `counters` and `elements`).

use crate::desired::nft::Family;

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// The `nfgenmsg` family of a table family.
pub fn family_code(f: Family) -> u8 {
    match f {
        Family::Inet => NFPROTO_INET,
        Family::Ip => NFPROTO_IPV4,
        Family::Ip6 => NFPROTO_IPV6,
    }
}

/// A name as the kernel reads string attributes.
pub fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}
