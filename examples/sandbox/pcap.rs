// A reader for what `tcpdump -w` writes on the VNet (classic pcap, Ethernet): the outer IPv4
// addresses of each frame and, for VXLAN (UDP 4789), the inner ones. Pure: bytes in, packets out.

use std::net::Ipv4Addr;

pub const VXLAN_PORT: u16 = 4789;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub udp_dst: Option<u16>,
    /// Inner IPv4 source and destination when this is VXLAN carrying IPv4.
    pub inner: Option<(Ipv4Addr, Ipv4Addr)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcapError {
    #[error("pcap file is {0} bytes: too short for a header")]
    Short(usize),
    #[error("pcap magic {0:#010x} is not a classic pcap file")]
    Magic(u32),
    #[error("pcap link type {0} is not Ethernet (1)")]
    LinkType(u32),
}

/// IPv4 packets of a pcap file, in order; other frames (ARP, IPv6) are skipped. A record cut
/// short at the end (tcpdump killed mid-write) ends the list.
pub fn ipv4_packets(bytes: &[u8]) -> Result<Vec<Packet>, PcapError> {
    if bytes.len() < 24 {
        return Err(PcapError::Short(bytes.len()));
    }
    let magic_le = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let le = match magic_le {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        other => return Err(PcapError::Magic(other)),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let link = u32_at(bytes, 20);
    if link != 1 {
        return Err(PcapError::LinkType(link));
    }
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32_at(bytes, at + 8) as usize;
        let start = at + 16;
        let Some(frame) = bytes.get(start..start + caplen) else {
            break;
        };
        if let Some(p) = ethernet_ipv4(frame) {
            out.push(p);
        }
        at = start + caplen;
    }
    Ok(out)
}

fn ethernet_ipv4(frame: &[u8]) -> Option<Packet> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype != 0x0800 {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let proto = *ip.get(9)?;
    let src = Ipv4Addr::new(*ip.get(12)?, ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(*ip.get(16)?, ip[17], ip[18], ip[19]);
    let mut udp_dst = None;
    let mut inner = None;
    if proto == 17 {
        let udp = ip.get(ihl..)?;
        let port = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
        udp_dst = Some(port);
        if port == VXLAN_PORT {
            // UDP header 8 bytes, VXLAN header 8 bytes, then the inner Ethernet frame.
            inner = udp
                .get(16..)
                .and_then(ethernet_ipv4)
                .map(|p| (p.src, p.dst));
        }
    }
    Some(Packet {
        src,
        dst,
        proto,
        udp_dst,
        inner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth_ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        f.extend_from_slice(&ip);
        f.extend_from_slice(payload);
        f
    }

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        b.extend_from_slice(&[2, 0, 4, 0]);
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&262_144u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        for f in frames {
            b.extend_from_slice(&[0; 8]);
            b.extend_from_slice(&(f.len() as u32).to_le_bytes());
            b.extend_from_slice(&(f.len() as u32).to_le_bytes());
            b.extend_from_slice(f);
        }
        b
    }

    #[test]
    fn vxlan_frames_expose_outer_and_inner_addresses() {
        let inner = eth_ipv4([10, 244, 0, 1], [10, 244, 1, 1], 1, &[8, 0, 0, 0]);
        let mut udp = vec![0x12, 0x34, 0x12, 0xb5, 0, 0, 0, 0];
        udp.extend_from_slice(&[0x08, 0, 0, 0, 0, 0x10, 0, 0]);
        udp.extend_from_slice(&inner);
        let outer = eth_ipv4([198, 18, 0, 11], [198, 18, 0, 12], 17, &udp);
        let arp = {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&[0x08, 0x06]);
            f.extend_from_slice(&[0; 28]);
            f
        };
        let pkts = ipv4_packets(&pcap(&[arp, outer])).expect("parse");
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].src, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(pkts[0].udp_dst, Some(VXLAN_PORT));
        assert_eq!(
            pkts[0].inner,
            Some((Ipv4Addr::new(10, 244, 0, 1), Ipv4Addr::new(10, 244, 1, 1)))
        );
    }

    #[test]
    fn a_truncated_last_record_ends_the_list() {
        let f = eth_ipv4([1, 1, 1, 1], [2, 2, 2, 2], 6, &[0; 20]);
        let mut b = pcap(&[f.clone(), f]);
        b.truncate(b.len() - 10);
        assert_eq!(ipv4_packets(&b).expect("parse").len(), 1);
    }

    #[test]
    fn other_files_are_refused_by_magic() {
        assert_eq!(
            ipv4_packets(&[0u8; 24]).expect_err("not pcap"),
            PcapError::Magic(0)
        );
    }
}
