//! IPReservation as a filter: the reserved CIDRs of every IPReservation object, consulted when
//! handing out addresses and when counting free ones. Existing allocations are never revoked.

use std::net::IpAddr;

use ipnet::IpNet;

use super::cidr::{addr_to_u128, num_addresses};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservations {
    cidrs: Vec<IpNet>,
}

impl Reservations {
    pub const EMPTY: Reservations = Reservations { cidrs: Vec::new() };

    pub fn new(cidrs: impl IntoIterator<Item = IpNet>) -> Reservations {
        Reservations {
            cidrs: cidrs.into_iter().map(|c| c.trunc()).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cidrs.is_empty()
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.cidrs.iter().any(|c| c.contains(&addr))
    }

    /// True when every address of `block` is reserved, so the block is not worth claiming.
    pub fn covers(&self, block: &IpNet) -> bool {
        self.reserved_in(block) >= num_addresses(block)
    }

    /// Number of distinct reserved addresses inside `net` (overlapping reservations counted once).
    pub fn reserved_in(&self, net: &IpNet) -> u128 {
        let lo = addr_to_u128(net.network());
        let hi = addr_to_u128(net.broadcast());
        let mut ranges: Vec<(u128, u128)> = self
            .cidrs
            .iter()
            .filter(|c| same_family(c, net))
            .filter_map(|c| {
                let (a, b) = (addr_to_u128(c.network()), addr_to_u128(c.broadcast()));
                (b >= lo && a <= hi).then(|| (a.max(lo), b.min(hi)))
            })
            .collect();
        ranges.sort();
        let mut total: u128 = 0;
        let mut cur: Option<(u128, u128)> = None;
        for (a, b) in ranges {
            cur = match cur {
                Some((ca, cb)) if a <= cb.saturating_add(1) => Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    total = total.saturating_add(cb - ca).saturating_add(1);
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((ca, cb)) = cur {
            total = total.saturating_add(cb - ca).saturating_add(1);
        }
        total
    }
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn overlapping_reservations_are_counted_once() {
        let r = Reservations::new([net("10.0.0.0/30"), net("10.0.0.2/31"), net("10.0.0.8/29")]);
        assert_eq!(r.reserved_in(&net("10.0.0.0/28")), 4 + 8);
        assert_eq!(r.reserved_in(&net("10.0.0.0/29")), 4);
        assert!(r.covers(&net("10.0.0.8/29")));
        assert!(!r.covers(&net("10.0.0.0/29")));
        assert!(r.contains("10.0.0.3".parse().unwrap()));
        assert!(!r.contains("10.0.0.4".parse().unwrap()));
    }

    #[test]
    fn reservations_of_the_other_family_do_not_count() {
        let r = Reservations::new([net("fd00::/64")]);
        assert_eq!(r.reserved_in(&net("10.0.0.0/24")), 0);
        assert!(r.covers(&net("fd00::/122")));
    }
}
