//! nfnetlink framing, sans-IO, shared by the nflog reader and the conntrack cutter: netlink
//! message headers with the netfilter generic header, and attributes (flat and nested).
//! Plus one thin blocking socket on `NETLINK_NETFILTER` in the calling thread's namespace.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const HEADER: usize = 16;
/// `struct nfgenmsg`: family, version, resource id (big-endian).
const NFGEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum NfnlError {
    #[error("netfilter netlink socket: {0}")]
    Socket(nix::Error),
    #[error("netfilter netlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("the kernel refused netfilter netlink request {what}: {source}")]
    Refused {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed netfilter netlink message: {0}")]
    Malformed(&'static str),
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds one request: header, nfgenmsg, attributes. Nesting through `nest`/`end`.
#[derive(Debug, Default)]
pub struct Request {
    buf: Vec<u8>,
    open: Vec<usize>,
}

impl Request {
    /// `kind` is `(subsystem << 8) | message`; `res_id` is the group (nflog) or 0.
    pub fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Request {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&[family, 0]);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Request {
            buf,
            open: Vec::new(),
        }
    }

    pub fn attr(mut self, kind: u16, value: &[u8]) -> Request {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    pub fn nest(mut self, kind: u16) -> Request {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end(mut self) -> Request {
        if let Some(at) = self.open.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        while !self.open.is_empty() {
            self = self.end();
        }
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One received netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// The nfgenmsg family (netfilter messages only).
    pub family: u8,
    pub res_id: u16,
    /// The attributes (netfilter messages) or the raw payload (NLMSG_ERROR).
    pub body: &'a [u8],
}

/// Splits a datagram into messages.
pub fn messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, NfnlError> {
    let mut out = Vec::new();
    while buf.len() >= HEADER {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < HEADER || len > buf.len() {
            return Err(NfnlError::Malformed("message length"));
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let flags = u16::from_ne_bytes([buf[6], buf[7]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let payload = &buf[HEADER..len];
        let msg = if kind == NLMSG_ERROR || kind == NLMSG_DONE || payload.len() < NFGEN {
            Message {
                kind,
                flags,
                seq,
                family: 0,
                res_id: 0,
                body: payload,
            }
        } else {
            Message {
                kind,
                flags,
                seq,
                family: payload[0],
                res_id: u16::from_be_bytes([payload[2], payload[3]]),
                body: &payload[NFGEN..],
            }
        };
        out.push(msg);
        buf = &buf[align(len).min(buf.len())..];
    }
    Ok(out)
}

/// The errno of an NLMSG_ERROR body (0 is an acknowledgement).
pub fn error_code(body: &[u8]) -> Option<i32> {
    body.get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Attributes as `(type, value)`, flags stripped.
pub fn attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, NfnlError> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return Err(NfnlError::Malformed("attribute length"));
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[align(len).min(buf.len())..];
    }
    Ok(out)
}

pub fn find<'a>(attrs: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

pub fn be16(v: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?))
}

pub fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

/// A blocking `NETLINK_NETFILTER` socket, bound in the namespace of the thread that opened it.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open(groups: u32) -> Result<Socket, NfnlError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(NfnlError::Socket)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))
            .map_err(|source| NfnlError::Io { op: "bind", source })?;
        Ok(Socket { fd, seq: 0 })
    }

    /// Bounds each `recv` (so a reader can notice it should stop).
    pub fn set_timeout(&self, t: Duration) -> Result<(), NfnlError> {
        let tv = nix::sys::time::TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv).map_err(|source| NfnlError::Io {
            op: "set the receive timeout",
            source,
        })
    }

    /// A larger receive buffer: bursts of log packets or a big conntrack dump.
    pub fn set_buffer(&self, bytes: usize) {
        if setsockopt(&self.fd, sockopt::RcvBufForce, &bytes).is_err() {
            let _ = setsockopt(&self.fd, sockopt::RcvBuf, &bytes);
        }
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub fn send(&self, msg: &[u8]) -> Result<(), NfnlError> {
        send(self.fd.as_raw_fd(), msg, MsgFlags::empty())
            .map(drop)
            .map_err(|source| NfnlError::Io { op: "send", source })
    }

    /// One datagram into `buf`; None on timeout.
    pub fn recv<'b>(&self, buf: &'b mut [u8]) -> Result<Option<&'b [u8]>, NfnlError> {
        match recv(self.fd.as_raw_fd(), buf, MsgFlags::empty()) {
            Ok(n) => Ok(Some(&buf[..n])),
            Err(nix::Error::EAGAIN) => Ok(None),
            Err(source) => Err(NfnlError::Io {
                op: "receive",
                source,
            }),
        }
    }

    /// Sends a request with NLM_F_ACK set and waits for its acknowledgement.
    pub fn request(&mut self, what: &str, msg: Vec<u8>) -> Result<(), NfnlError> {
        let seq = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
        self.send(&msg)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let Some(data) = self.recv(&mut buf)? else {
                return Err(NfnlError::Malformed("no acknowledgement"));
            };
            for m in messages(data)? {
                if m.kind == NLMSG_ERROR && m.seq == seq {
                    return match error_code(m.body) {
                        Some(0) => Ok(()),
                        Some(e) => Err(NfnlError::Refused {
                            what: what.to_string(),
                            source: std::io::Error::from_raw_os_error(-e),
                        }),
                        None => Err(NfnlError::Malformed("error message")),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_with_a_nested_attribute_parses_back() {
        let msg = Request::new(0x0102, NLM_F_REQUEST | NLM_F_ACK, 7, 2, 0)
            .nest(1)
            .attr(1, &[10, 0, 0, 1])
            .attr(2, &[6])
            .end()
            .attr(3, &42u16.to_be_bytes())
            .finish();
        assert_eq!(msg.len() % 4, 0);
        let ms = messages(&msg).unwrap();
        assert_eq!(ms.len(), 1);
        let m = &ms[0];
        assert_eq!((m.kind, m.seq, m.family), (0x0102, 7, 2));
        let top = attrs(m.body).unwrap();
        assert_eq!(top.len(), 2);
        let inner = attrs(find(&top, 1).unwrap()).unwrap();
        assert_eq!(inner, vec![(1, &[10, 0, 0, 1][..]), (2, &[6][..])]);
        assert_eq!(be16(find(&top, 3).unwrap()), Some(42));
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let msg = Request::new(1, 0, 1, 0, 0).attr(1, &[1, 2, 3]).finish();
        for cut in 0..msg.len() {
            let _ = messages(&msg[..cut]);
            let _ = attrs(&msg[20..cut.max(20)]);
        }
        let mut bad = msg.clone();
        bad[16 + 4] = 200; // attribute longer than the message
        let ms = messages(&bad).unwrap();
        assert!(attrs(ms[0].body).is_err());
    }
}
