//! MTU rules (Calico's, sans-IO): the host MTU is the smallest among up interfaces whose
//! names look like real NICs (Felix's default `mtuIfacePattern`), and each encapsulation
//! subtracts its overhead.

/// Felix's fallback when no interface matches: "the smallest among common cloud providers".
pub const FALLBACK_HOST_MTU: u32 = 1460;
pub const VXLAN_OVERHEAD: u32 = 50;
pub const IPIP_OVERHEAD: u32 = 20;

/// One interface as the MTU detection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkMtu {
    pub name: String,
    pub mtu: u32,
    pub up: bool,
}

/// Felix's default pattern `^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)`, written out
/// by hand (the crate has no regex dependency and the pattern is fixed).
pub fn matches_host_interface(name: &str) -> bool {
    const FAMILY: [&str; 5] = ["en", "wl", "ww", "sl", "ib"];
    const KIND: &str = "Pcopsvx";
    if name.starts_with("eth") || name.starts_with("wlan") || name.starts_with("wwan") {
        return true;
    }
    FAMILY.iter().any(|f| {
        name.strip_prefix(f)
            .and_then(|rest| rest.chars().next())
            .is_some_and(|c| KIND.contains(c))
    })
}

/// The smallest MTU among up, NIC-like interfaces; the fallback when there is none.
pub fn detect_host_mtu(links: &[LinkMtu]) -> u32 {
    links
        .iter()
        .filter(|l| l.up && l.mtu > 0 && matches_host_interface(&l.name))
        .map(|l| l.mtu)
        .min()
        .unwrap_or(FALLBACK_HOST_MTU)
}

pub fn vxlan_mtu(host_mtu: u32) -> u32 {
    host_mtu.saturating_sub(VXLAN_OVERHEAD)
}

pub fn ipip_mtu(host_mtu: u32) -> u32 {
    host_mtu.saturating_sub(IPIP_OVERHEAD)
}

/// The MTU new pods get: the smallest of the enabled encapsulations, else the host MTU.
pub fn pod_mtu(host_mtu: u32, vxlan: bool, ipip: bool) -> u32 {
    let mut mtu = host_mtu;
    if vxlan {
        mtu = mtu.min(vxlan_mtu(host_mtu));
    }
    if ipip {
        mtu = mtu.min(ipip_mtu(host_mtu));
    }
    mtu
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, mtu: u32, up: bool) -> LinkMtu {
        LinkMtu {
            name: name.into(),
            mtu,
            up,
        }
    }

    #[test]
    fn nic_names_match_and_virtual_devices_do_not() {
        for name in [
            "eth0",
            "ens5",
            "enp0s3",
            "eno1",
            "enx00e04c",
            "enP1p2s0",
            "wlan0",
            "wlp2s0",
            "wwan0",
            "ibp1s0",
        ] {
            assert!(matches_host_interface(name), "{name} should match");
        }
        for name in [
            "lo",
            "cali1234",
            "vxlan.calico",
            "tunl0",
            "docker0",
            "veth9",
            "en",
            "enb1",
            "br-1",
            "e",
        ] {
            assert!(!matches_host_interface(name), "{name} should not match");
        }
    }

    #[test]
    fn smallest_mtu_among_up_nics_wins() {
        let links = [
            link("lo", 65536, true),
            link("eth0", 1500, true),
            link("ens6", 9001, true),
            link("eth1", 1400, false), // down: ignored
            link("cali1", 1200, true), // not a NIC: ignored
        ];
        assert_eq!(detect_host_mtu(&links), 1500);
    }

    #[test]
    fn no_matching_interface_falls_back_to_1460() {
        assert_eq!(
            detect_host_mtu(&[link("lo", 65536, true), link("veth0", 1500, true)]),
            1460
        );
        assert_eq!(detect_host_mtu(&[]), 1460);
    }

    #[test]
    fn encapsulation_overheads_match_calico() {
        assert_eq!(vxlan_mtu(1500), 1450);
        assert_eq!(ipip_mtu(1500), 1480);
        assert_eq!(pod_mtu(1500, true, false), 1450);
        assert_eq!(pod_mtu(1500, false, true), 1480);
        assert_eq!(pod_mtu(1500, true, true), 1450);
        assert_eq!(pod_mtu(1500, false, false), 1500);
    }
}
