//! Whether `vxlan.calico` keeps TX checksum offload. Calico's `ChecksumOffloadBroken`: on
//! kernels up to 5.7 (and on some clouds) offloaded VXLAN checksums lose the first SYN
//! across nodes or delay connections, so offload goes off there or when the operator says so.

/// `setting`: Some(true) = offload is broken here (turn it off), Some(false) = keep it on,
/// None = decide from the kernel release (`uname -r`).
pub fn vxlan_tx_checksum_offload(setting: Option<bool>, kernel_release: &str) -> bool {
    match setting {
        Some(broken) => !broken,
        None => !kernel_known_broken(kernel_release),
    }
}

/// Kernels 5.7.0 and older; an unparsable release counts as modern (offload stays on, the
/// default everywhere else).
pub fn kernel_known_broken(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) <= (5, 7),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_up_to_5_7_are_known_broken() {
        for r in [
            "4.19.0-25-amd64",
            "5.4.0-1109-azure",
            "5.7.0",
            "3.10.0-1160.el7.x86_64",
        ] {
            assert!(kernel_known_broken(r), "{r}");
        }
        for r in ["5.8.0", "5.15.0-1057-azure", "6.18.44-fc-v782", "10.0"] {
            assert!(!kernel_known_broken(r), "{r}");
        }
    }

    #[test]
    fn unparsable_releases_keep_offload_on() {
        assert!(!kernel_known_broken(""));
        assert!(!kernel_known_broken("custom"));
        assert!(vxlan_tx_checksum_offload(None, "custom"));
    }

    #[test]
    fn the_setting_overrides_the_kernel_check() {
        assert!(!vxlan_tx_checksum_offload(Some(true), "6.1.0"));
        assert!(vxlan_tx_checksum_offload(Some(false), "5.4.0"));
        assert!(!vxlan_tx_checksum_offload(None, "5.4.0"));
        assert!(vxlan_tx_checksum_offload(None, "6.1.0"));
    }
}
