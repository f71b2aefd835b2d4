//! The `Log` action's reader: packets that policy's `log group` rules hand to nflog
//! (netlink `NFNL_SUBSYS_ULOG`) become one structured `tracing` line each, naming the policy
//! and rule from the log prefix the compiler wrote. The decoder is sans-IO; `Reader` is the
//! thin blocking driver (one thread, in the namespace it was opened in).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::nfnetlink::{self as nl, NfnlError, Request, Socket};

/// The nflog group policy's Log rules send to (Felix uses 1 and 2 for flow logs).
pub const GROUP: u16 = 30;
/// Enough of each packet for the IP and transport headers (IPv6 40 + 8).
const COPY_RANGE: u32 = 64;

const SUBSYS_ULOG: u16 = 4;
const MSG_PACKET: u16 = 0;
const MSG_CONFIG: u16 = 1;
const CFG_CMD: u16 = 1;
const CFG_MODE: u16 = 2;
const CFG_TIMEOUT: u16 = 4;
const CFG_QTHRESH: u16 = 5;
const CMD_BIND: u8 = 1;
const COPY_PACKET: u8 = 2;
const ATTR_PACKET_HDR: u16 = 1;
const ATTR_INDEV: u16 = 4;
const ATTR_OUTDEV: u16 = 5;
const ATTR_PAYLOAD: u16 = 9;
const ATTR_PREFIX: u16 = 10;

/// One logged packet, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedPacket {
    pub group: u16,
    /// The rule's log prefix.
    pub prefix: String,
    pub in_ifindex: Option<u32>,
    pub out_ifindex: Option<u32>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub protocol: Option<u8>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

/// Which policy rule a log prefix names: the compiler writes
/// `<policy display name> <direction> rule <index>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: String,
    pub direction: String,
    pub rule: usize,
}

pub fn parse_prefix(prefix: &str) -> Option<RuleRef> {
    let (head, index) = prefix.trim_end().rsplit_once(" rule ")?;
    let (policy, direction) = head.rsplit_once(' ')?;
    if direction != "ingress" && direction != "egress" {
        return None;
    }
    Some(RuleRef {
        policy: policy.to_string(),
        direction: direction.to_string(),
        rule: index.parse().ok()?,
    })
}

/// The configuration messages that bind `group` with packet copies of the headers, sent
/// at once (no batching: a log line should appear when its packet passes).
pub fn bind_requests(group: u16, seq: u32) -> Vec<Vec<u8>> {
    let kind = (SUBSYS_ULOG << 8) | MSG_CONFIG;
    let flags = nl::NLM_F_REQUEST | nl::NLM_F_ACK;
    let mut mode = COPY_RANGE.to_be_bytes().to_vec();
    mode.extend_from_slice(&[COPY_PACKET, 0]);
    vec![
        Request::new(kind, flags, seq, 0, group)
            .attr(CFG_CMD, &[CMD_BIND])
            .finish(),
        Request::new(kind, flags, seq.wrapping_add(1), 0, group)
            .attr(CFG_MODE, &mode)
            .attr(CFG_QTHRESH, &1u32.to_be_bytes())
            .attr(CFG_TIMEOUT, &1u32.to_be_bytes())
            .finish(),
    ]
}

/// The packets in one datagram from the nflog socket (other messages are skipped).
pub fn decode(datagram: &[u8]) -> Result<Vec<LoggedPacket>, NfnlError> {
    let mut out = Vec::new();
    for m in nl::messages(datagram)? {
        if m.kind != ((SUBSYS_ULOG << 8) | MSG_PACKET) {
            continue;
        }
        let a = nl::attrs(m.body)?;
        let prefix = nl::find(&a, ATTR_PREFIX)
            .map(|p| {
                let end = p.iter().position(|&b| b == 0).unwrap_or(p.len());
                String::from_utf8_lossy(&p[..end]).into_owned()
            })
            .unwrap_or_default();
        let hw_protocol = nl::find(&a, ATTR_PACKET_HDR).and_then(nl::be16);
        let mut p = LoggedPacket {
            group: m.res_id,
            prefix,
            in_ifindex: nl::find(&a, ATTR_INDEV).and_then(nl::be32),
            out_ifindex: nl::find(&a, ATTR_OUTDEV).and_then(nl::be32),
            src: None,
            dst: None,
            protocol: None,
            src_port: None,
            dst_port: None,
        };
        if let Some(payload) = nl::find(&a, ATTR_PAYLOAD) {
            headers(payload, hw_protocol, &mut p);
        }
        out.push(p);
    }
    Ok(out)
}

/// Addresses, protocol and ports from the packet's network header (no IPv6 extension
/// headers: their transport ports are left out).
fn headers(ip: &[u8], _hw_protocol: Option<u16>, p: &mut LoggedPacket) {
    let Some(&first) = ip.first() else { return };
    let transport = match first >> 4 {
        4 if ip.len() >= 20 => {
            let ihl = usize::from(first & 0x0f) * 4;
            p.protocol = Some(ip[9]);
            p.src = Some(IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])));
            p.dst = Some(IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])));
            ip.get(ihl..)
        }
        6 if ip.len() >= 40 => {
            p.protocol = Some(ip[6]);
            let a = |r: std::ops::Range<usize>| -> Option<IpAddr> {
                let b: [u8; 16] = ip.get(r)?.try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(b)))
            };
            p.src = a(8..24);
            p.dst = a(24..40);
            ip.get(40..)
        }
        _ => None,
    };
    // TCP, UDP, SCTP, UDP-Lite: ports are the first four bytes.
    if let (Some(t), Some(6 | 17 | 132 | 136)) = (transport, p.protocol)
        && t.len() >= 4
    {
        p.src_port = Some(u16::from_be_bytes([t[0], t[1]]));
        p.dst_port = Some(u16::from_be_bytes([t[2], t[3]]));
    }
}

/// Writes one packet as a structured log line.
pub fn emit(p: &LoggedPacket) {
    let rule = parse_prefix(&p.prefix);
    let src = p.src.map(|a| a.to_string()).unwrap_or_default();
    let dst = p.dst.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        target: "tortie::policy::log",
        policy = rule.as_ref().map_or(p.prefix.as_str(), |r| r.policy.as_str()),
        direction = rule.as_ref().map_or("", |r| r.direction.as_str()),
        rule = rule.as_ref().map(|r| r.rule),
        src = %src,
        dst = %dst,
        protocol = p.protocol,
        src_port = p.src_port,
        dst_port = p.dst_port,
        in_ifindex = p.in_ifindex,
        out_ifindex = p.out_ifindex,
        "policy log"
    );
}

/// The driver: a socket bound to one nflog group.
pub struct Reader {
    socket: Socket,
    buf: Vec<u8>,
}

impl Reader {
    /// Binds `group` in the calling thread's network namespace.
    pub fn open(group: u16) -> Result<Reader, NfnlError> {
        let mut socket = Socket::open(0)?;
        socket.set_timeout(Duration::from_secs(1))?;
        socket.set_buffer(1 << 20);
        let seq = socket.next_seq();
        socket.next_seq();
        for (i, req) in bind_requests(group, seq).into_iter().enumerate() {
            let what = if i == 0 {
                "bind the nflog group"
            } else {
                "configure the nflog group"
            };
            socket.request(what, req)?;
        }
        Ok(Reader {
            socket,
            buf: vec![0u8; 1 << 16],
        })
    }

    /// The packets of the next datagram; empty after a one-second timeout.
    pub fn read(&mut self) -> Result<Vec<LoggedPacket>, NfnlError> {
        match self.socket.recv(&mut self.buf) {
            Ok(Some(data)) => decode(data),
            Ok(None) => Ok(Vec::new()),
            // Overrun: packets were lost (the rules are rate-limited, so rare); keep reading.
            Err(NfnlError::Io {
                source: nix::Error::ENOBUFS,
                ..
            }) => {
                tracing::warn!("policy log: the kernel dropped log packets (socket overrun)");
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads and logs until `stop` says so (checked at least once a second).
    pub fn run(mut self, stop: impl Fn() -> bool) -> Result<(), NfnlError> {
        while !stop() {
            for p in self.read()? {
                emit(&p);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet message as the kernel sends it: header attr, indev, prefix, payload.
    fn packet(prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut pre = prefix.as_bytes().to_vec();
        pre.push(0);
        Request::new(SUBSYS_ULOG << 8, 0, 0, 2, GROUP)
            .attr(ATTR_PACKET_HDR, &[0x08, 0x00, 2, 0])
            .attr(ATTR_INDEV, &7u32.to_be_bytes())
            .attr(ATTR_PREFIX, &pre)
            .attr(ATTR_PAYLOAD, payload)
            .finish()
    }

    fn ipv4_tcp() -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        ip.extend_from_slice(&40000u16.to_be_bytes());
        ip.extend_from_slice(&8080u16.to_be_bytes());
        ip.extend_from_slice(&[0; 16]);
        ip
    }

    #[test]
    fn a_logged_tcp_packet_decodes_with_its_rule() {
        let mut two = packet("prod/web ingress rule 0", &ipv4_tcp());
        two.extend(packet("prod/web egress rule 3", &ipv4_tcp()[..20]));
        let got = decode(&two).unwrap();
        assert_eq!(got.len(), 2);
        let p = &got[0];
        assert_eq!(p.group, GROUP);
        assert_eq!(p.in_ifindex, Some(7));
        assert_eq!(p.src, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(p.dst, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(
            (p.protocol, p.src_port, p.dst_port),
            (Some(6), Some(40000), Some(8080))
        );
        // A payload cut after the IP header still names the addresses, without ports.
        assert_eq!((got[1].protocol, got[1].dst_port), (Some(6), None));
        assert_eq!(
            parse_prefix(&p.prefix),
            Some(RuleRef {
                policy: "prod/web".into(),
                direction: "ingress".into(),
                rule: 0
            })
        );
    }

    #[test]
    fn an_ipv6_udp_packet_decodes() {
        let mut ip = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        ip.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&[0x13, 0x88, 0, 53, 0, 8, 0, 0]);
        let got = decode(&packet("x", &ip)).unwrap();
        assert_eq!(got[0].dst, Some("fd00::1".parse().unwrap()));
        assert_eq!((got[0].src_port, got[0].dst_port), (Some(5000), Some(53)));
        assert_eq!(parse_prefix("x"), None);
    }

    #[test]
    fn prefixes_with_spaces_in_names_and_odd_input() {
        let r = parse_prefix("staged:knp.default.a b egress rule 12").unwrap();
        assert_eq!((r.policy.as_str(), r.rule), ("staged:knp.default.a b", 12));
        assert_eq!(parse_prefix("p sideways rule 1"), None);
        assert_eq!(parse_prefix("p ingress rule x"), None);
        // Garbage payloads never panic.
        for n in 0..48 {
            let _ = decode(&packet("p ingress rule 0", &vec![0x4f; n]));
            let _ = decode(&packet("p ingress rule 0", &vec![0x6f; n]));
        }
    }

    #[test]
    fn bind_requests_name_the_group_and_copy_mode() {
        let reqs = bind_requests(GROUP, 5);
        let m = nl::messages(&reqs[1]).unwrap();
        assert_eq!(m[0].res_id, GROUP);
        assert_eq!(m[0].flags, nl::NLM_F_REQUEST | nl::NLM_F_ACK);
        let a = nl::attrs(m[0].body).unwrap();
        assert_eq!(nl::find(&a, CFG_MODE), Some(&[0, 0, 0, 64, 2, 0][..]));
    }
}
