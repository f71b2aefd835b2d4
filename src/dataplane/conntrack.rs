//! Conntrack entries over ctnetlink (`NFNL_SUBSYS_CTNETLINK`): list the original-direction
//! tuples and delete chosen entries, so flows a policy change now denies stop at once (the
//! next packet is new to conntrack and meets the policy). Encoding and decoding are sans-IO;
//! `Conntrack` is the thin blocking driver in the namespace it was opened in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::nfnetlink::{self as nl, NfnlError, Request, Socket};

const SUBSYS_CTNETLINK: u16 = 1;
const MSG_GET: u16 = 1;
const MSG_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The original direction of one conntrack entry: enough to evaluate and to delete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// Ports for TCP/UDP/SCTP; the ICMP id in `src_port` for ICMP.
    pub src_port: u16,
    pub dst_port: u16,
    pub icmp: Option<(u8, u8)>,
    pub zone: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error(transparent)]
    Netlink(#[from] NfnlError),
    #[error("conntrack dump did not finish within {0:?}")]
    Timeout(Duration),
}

/// The dump request for every entry of both families.
pub fn dump_request(seq: u32) -> Vec<u8> {
    Request::new(
        (SUBSYS_CTNETLINK << 8) | MSG_GET,
        nl::NLM_F_REQUEST | nl::NLM_F_DUMP,
        seq,
        0,
        0,
    )
    .finish()
}

/// The delete request for one entry, by its original tuple.
pub fn delete_request(t: &Tuple, seq: u32) -> Vec<u8> {
    let family = if t.src.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut r = Request::new(
        (SUBSYS_CTNETLINK << 8) | MSG_DELETE,
        nl::NLM_F_REQUEST | nl::NLM_F_ACK,
        seq,
        family,
        0,
    )
    .nest(CTA_TUPLE_ORIG)
    .nest(CTA_TUPLE_IP);
    r = match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => r
            .attr(CTA_IP_V4_SRC, &s.octets())
            .attr(CTA_IP_V4_DST, &d.octets()),
        (s, d) => r
            .attr(CTA_IP_V6_SRC, &v6(s).octets())
            .attr(CTA_IP_V6_DST, &v6(d).octets()),
    };
    r = r
        .end()
        .nest(CTA_TUPLE_PROTO)
        .attr(CTA_PROTO_NUM, &[t.protocol]);
    r = match (t.protocol, t.icmp) {
        (1, Some((ty, code))) => r
            .attr(CTA_PROTO_ICMP_ID, &t.src_port.to_be_bytes())
            .attr(CTA_PROTO_ICMP_TYPE, &[ty])
            .attr(CTA_PROTO_ICMP_CODE, &[code]),
        (58, Some((ty, code))) => r
            .attr(CTA_PROTO_ICMPV6_ID, &t.src_port.to_be_bytes())
            .attr(CTA_PROTO_ICMPV6_TYPE, &[ty])
            .attr(CTA_PROTO_ICMPV6_CODE, &[code]),
        _ => r
            .attr(CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes())
            .attr(CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes()),
    };
    r = r.end().end();
    if t.zone != 0 {
        r = r.attr(CTA_ZONE, &t.zone.to_be_bytes());
    }
    r.finish()
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

/// What one datagram of a dump holds: entries, and whether the dump is done.
pub fn decode_dump(datagram: &[u8]) -> Result<(Vec<Tuple>, bool), NfnlError> {
    let mut out = Vec::new();
    let mut done = false;
    for m in nl::messages(datagram)? {
        match m.kind {
            nl::NLMSG_DONE => done = true,
            nl::NLMSG_ERROR => {
                if let Some(e) = nl::error_code(m.body).filter(|e| *e != 0) {
                    return Err(NfnlError::Refused {
                        what: "dump conntrack".into(),
                        source: std::io::Error::from_raw_os_error(-e),
                    });
                }
                done = true;
            }
            k if k >> 8 == SUBSYS_CTNETLINK => {
                if let Some(t) = entry(m.body)? {
                    out.push(t);
                }
            }
            _ => {}
        }
    }
    Ok((out, done))
}

/// One entry's original tuple; None for protocols or families this does not handle.
fn entry(body: &[u8]) -> Result<Option<Tuple>, NfnlError> {
    let top = nl::attrs(body)?;
    let zone = nl::find(&top, CTA_ZONE).and_then(nl::be16).unwrap_or(0);
    let Some(orig) = nl::find(&top, CTA_TUPLE_ORIG) else {
        return Ok(None);
    };
    let orig = nl::attrs(orig)?;
    let (Some(ip), Some(proto)) = (
        nl::find(&orig, CTA_TUPLE_IP),
        nl::find(&orig, CTA_TUPLE_PROTO),
    ) else {
        return Ok(None);
    };
    let ip = nl::attrs(ip)?;
    let proto = nl::attrs(proto)?;
    let addr4 = |k| {
        nl::find(&ip, k)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(|b| IpAddr::V4(Ipv4Addr::from(b)))
    };
    let addr6 = |k| {
        nl::find(&ip, k)
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
            .map(|b| IpAddr::V6(Ipv6Addr::from(b)))
    };
    let (Some(src), Some(dst)) = (
        addr4(CTA_IP_V4_SRC).or_else(|| addr6(CTA_IP_V6_SRC)),
        addr4(CTA_IP_V4_DST).or_else(|| addr6(CTA_IP_V6_DST)),
    ) else {
        return Ok(None);
    };
    let Some(&protocol) = nl::find(&proto, CTA_PROTO_NUM).and_then(|v| v.first()) else {
        return Ok(None);
    };
    let byte = |k| nl::find(&proto, k).and_then(|v| v.first().copied());
    let port = |k| nl::find(&proto, k).and_then(nl::be16).unwrap_or(0);
    let (src_port, dst_port, icmp) = match protocol {
        1 => (
            port(CTA_PROTO_ICMP_ID),
            0,
            byte(CTA_PROTO_ICMP_TYPE).zip(byte(CTA_PROTO_ICMP_CODE)),
        ),
        58 => (
            port(CTA_PROTO_ICMPV6_ID),
            0,
            byte(CTA_PROTO_ICMPV6_TYPE).zip(byte(CTA_PROTO_ICMPV6_CODE)),
        ),
        _ => (port(CTA_PROTO_SRC_PORT), port(CTA_PROTO_DST_PORT), None),
    };
    Ok(Some(Tuple {
        src,
        dst,
        protocol,
        src_port,
        dst_port,
        icmp,
        zone,
    }))
}

/// The driver: a ctnetlink socket in the namespace of the thread that opened it.
pub struct Conntrack {
    socket: Socket,
}

const DUMP_TIMEOUT: Duration = Duration::from_secs(5);

impl Conntrack {
    pub fn open() -> Result<Conntrack, ConntrackError> {
        let socket = Socket::open(0)?;
        socket.set_timeout(DUMP_TIMEOUT)?;
        socket.set_buffer(4 << 20);
        Ok(Conntrack { socket })
    }

    /// Every entry's original tuple.
    pub fn list(&mut self) -> Result<Vec<Tuple>, ConntrackError> {
        let seq = self.socket.next_seq();
        self.socket.send(&dump_request(seq))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut out = Vec::new();
        loop {
            let Some(data) = self.socket.recv(&mut buf)? else {
                return Err(ConntrackError::Timeout(DUMP_TIMEOUT));
            };
            let (entries, done) = decode_dump(data)?;
            out.extend(entries);
            if done {
                return Ok(out);
            }
        }
    }

    /// Deletes one entry; an entry already gone (ENOENT) is not an error.
    pub fn delete(&mut self, t: &Tuple) -> Result<bool, ConntrackError> {
        let seq = self.socket.next_seq();
        match self
            .socket
            .request("delete a conntrack entry", delete_request(t, seq))
        {
            Ok(()) => Ok(true),
            Err(NfnlError::Refused { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as the kernel dumps it: the original tuple plus a reply tuple and a zone.
    fn dumped(t: &Tuple) -> Vec<u8> {
        let del = delete_request(t, 1);
        let m = nl::messages(&del).unwrap();
        let orig = nl::attrs(m[0].body).unwrap();
        let orig = nl::find(&orig, CTA_TUPLE_ORIG).unwrap();
        Request::new(SUBSYS_CTNETLINK << 8, nl::NLM_F_MULTI, 1, 2, 0)
            .attr(CTA_TUPLE_ORIG | nl::NLA_F_NESTED, orig)
            .attr(2 | nl::NLA_F_NESTED, orig)
            .attr(3, &0x8u32.to_be_bytes())
            .finish()
    }

    fn done() -> Vec<u8> {
        let mut d = Request::new(nl::NLMSG_DONE, nl::NLM_F_MULTI, 1, 0, 0).finish();
        d.truncate(20);
        d[..4].copy_from_slice(&20u32.to_ne_bytes());
        d
    }

    #[test]
    fn a_dump_of_tcp_icmp_and_v6_entries_reads_back_their_tuples() {
        let tcp = Tuple {
            src: "10.0.0.2".parse().unwrap(),
            dst: "10.0.0.1".parse().unwrap(),
            protocol: 6,
            src_port: 40000,
            dst_port: 8080,
            icmp: None,
            zone: 0,
        };
        let icmp = Tuple {
            protocol: 1,
            src_port: 77,
            dst_port: 0,
            icmp: Some((8, 0)),
            ..tcp
        };
        let udp6 = Tuple {
            src: "fd00::2".parse().unwrap(),
            dst: "fd00::1".parse().unwrap(),
            protocol: 17,
            src_port: 5353,
            dst_port: 53,
            icmp: None,
            zone: 0,
        };
        let mut datagram = dumped(&tcp);
        datagram.extend(dumped(&icmp));
        datagram.extend(dumped(&udp6));
        let (got, fin) = decode_dump(&datagram).unwrap();
        assert_eq!(got, vec![tcp, icmp, udp6]);
        assert!(!fin);
        let (none, fin) = decode_dump(&done()).unwrap();
        assert!(none.is_empty() && fin);
    }

    #[test]
    fn a_delete_request_carries_a_nested_original_tuple_and_the_zone() {
        let t = Tuple {
            src: "10.0.0.2".parse().unwrap(),
            dst: "10.0.0.1".parse().unwrap(),
            protocol: 17,
            src_port: 1,
            dst_port: 2,
            icmp: None,
            zone: 3,
        };
        let req = delete_request(&t, 9);
        let m = nl::messages(&req).unwrap();
        assert_eq!(m[0].kind, (SUBSYS_CTNETLINK << 8) | MSG_DELETE);
        assert_eq!(m[0].family, AF_INET);
        // The nested flag is on the wire.
        assert_eq!(
            u16::from_ne_bytes([req[22], req[23]]),
            CTA_TUPLE_ORIG | nl::NLA_F_NESTED
        );
        let top = nl::attrs(m[0].body).unwrap();
        assert_eq!(nl::find(&top, CTA_ZONE).and_then(nl::be16), Some(3));
        let (got, _) = decode_dump(&req).unwrap();
        assert_eq!(got, vec![Tuple { zone: 3, ..t }]);
    }
}
