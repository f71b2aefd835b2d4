//! VTEP identity: every node derives every peer's VXLAN MAC from the peer's name, as Felix
//! does, so no MAC needs to be published in the datastore.

use sha1::{Digest, Sha1};

use crate::desired::Mac;

/// `66:` followed by the first five bytes of sha1(node name). 0x66 has the locally
/// administered bit set and the multicast bit clear, so it is a valid unicast MAC.
pub fn vtep_mac(node_name: &str) -> Mac {
    let digest = Sha1::digest(node_name.as_bytes());
    let mut mac = [0u8; 6];
    mac[0] = 0x66;
    mac[1..].copy_from_slice(&digest[..5]);
    Mac(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_0x66_then_sha1_prefix_of_the_node_name() {
        // `printf node-1 | sha1sum` = b36828398e51...
        assert_eq!(vtep_mac("node-1").to_string(), "66:b3:68:28:39:8e");
    }

    #[test]
    fn different_nodes_get_different_macs() {
        assert_ne!(vtep_mac("node-1"), vtep_mac("node-2"));
        assert_eq!(vtep_mac("node-1"), vtep_mac("node-1"));
    }
}
