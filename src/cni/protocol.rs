//! Wire protocol between the CNI plugin and the daemon on the node's unix socket, with the
//! framing both sides use. One connection carries one exchange: the plugin sends a
//! [`Request`], the daemon answers with a [`Response`], both closing afterwards.
//!
//! Frame: a 4-byte big-endian length, then that many bytes of UTF-8 JSON (at most
//! [`MAX_FRAME`]). When `Request::netns_fd` is true the plugin's open netns descriptor rides
//! along as SCM_RIGHTS on the frame's first bytes, so the daemon acts on the namespace the
//! runtime named even if its path is unmounted meanwhile. The daemon must still refuse a
//! descriptor that is its own (host) network namespace.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::CniError;
use super::invocation::{CniArgs, Command, PluginKind};
use super::netconf::{GcAttachment, NetConf};
use super::result::CniResult;
use super::version::CniVersion;

/// Bumped on any change a peer of the previous version would misread.
pub const PROTOCOL_VERSION: u32 = 1;
/// Frames are a few KiB; the cap bounds what a confused peer can make the other allocate.
pub const MAX_FRAME: usize = 4 << 20;

/// What the plugin forwards: the validated invocation and config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub protocol: u32,
    pub command: Command,
    pub kind: PluginKind,
    /// The version the runtime asked for. The daemon answers in the current (1.1.0) shape
    /// and the plugin converts; the daemon needs this only for logging.
    pub cni_version: CniVersion,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// CNI_NETNS as the runtime gave it (for logs and results' `sandbox`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// True when the plugin opened the netns and its descriptor travels with this frame.
    /// False on DEL when the namespace is already gone, on STATUS/GC, and for `tortie-ipam`.
    pub netns_fd: bool,
    #[serde(default)]
    pub args: CniArgs,
    /// Typed view of the spec fields of the config.
    pub config: NetConf,
    /// The config exactly as the runtime sent it (Calico keys such as `ipam.ipv4_pools`).
    pub raw_config: Value,
    /// `prevResult` normalised to the current shape (DEL, CHECK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<CniResult>,
    /// GC: the attachments the runtime still considers valid; all others may be released.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid_attachments: Vec<GcAttachment>,
}

/// The daemon's answer. `result` is required for ADD and absent otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Response {
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<CniResult>,
    },
    Error {
        error: CniError,
    },
}

/// A request as the daemon receives it, with the netns descriptor if one came along.
#[derive(Debug)]
pub struct ReceivedRequest {
    pub request: Request,
    pub netns: Option<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("socket I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("peer closed the connection after {got} of {expected} bytes")]
    Closed { got: usize, expected: usize },
    #[error("timed out waiting for the peer")]
    TimedOut,
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge { len: usize },
    #[error("frame is not the expected JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("peer speaks protocol version {got:?}, this side speaks {PROTOCOL_VERSION}")]
    UnsupportedProtocol { got: Option<u64> },
    #[error("request announces netns_fd={announced} but {received} descriptors arrived")]
    DescriptorMismatch { announced: bool, received: usize },
    #[error("control message was truncated (more descriptors sent than expected)")]
    ControlTruncated,
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge { len: body.len() });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    // Bounded by MAX_FRAME just above, so the length fits in u32.
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

fn header_len(header: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge { len });
    }
    Ok(len)
}

/// One recvmsg that also collects SCM_RIGHTS descriptors (close-on-exec, so none leak
/// into processes the daemon spawns).
fn recv_with_fds(fd: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other.map_err(io::Error::from)?,
        }
    };
    let bytes = msg.bytes;
    let cmsgs = msg.cmsgs().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            ProtocolError::ControlTruncated.to_string(),
        )
    })?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel just installed `r` in our descriptor table for this
                // message; nothing else knows it, so taking ownership is sound.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    Ok(bytes)
}

/// Writes a whole frame; `fd` (if any) is attached to the first sendmsg, i.e. to the
/// frame's first bytes, where the reader's header recvmsg picks it up.
fn send_frame(stream: &UnixStream, frame: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let raw_fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw_fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw_fds)]
    };
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(frame)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other.map_err(io::Error::from)?,
        }
    };
    let mut rest = stream;
    rest.write_all(&frame[sent..])
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads one frame (blocking). With a deadline every read is bounded by the time left.
fn read_frame(
    stream: &UnixStream,
    deadline: Option<Instant>,
) -> Result<(Vec<u8>, Vec<OwnedFd>), ProtocolError> {
    let arm = |stream: &UnixStream| -> Result<(), ProtocolError> {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ProtocolError::TimedOut);
            }
            stream.set_read_timeout(Some(left))?;
        }
        Ok(())
    };
    let map_io = |e: io::Error| {
        if deadline.is_some() && is_timeout(&e) {
            ProtocolError::TimedOut
        } else {
            ProtocolError::Io(e)
        }
    };
    let mut fds = Vec::new();
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        arm(stream)?;
        let n = recv_with_fds(stream.as_fd(), &mut header[got..], &mut fds).map_err(map_io)?;
        if n == 0 {
            return Err(ProtocolError::Closed { got, expected: 4 });
        }
        got += n;
    }
    let len = header_len(header)?;
    let mut body = vec![0u8; len];
    let mut got = 0;
    let mut reader = stream;
    while got < len {
        arm(stream)?;
        let n = match reader.read(&mut body[got..]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other.map_err(map_io)?,
        };
        if n == 0 {
            return Err(ProtocolError::Closed {
                got: 4 + got,
                expected: 4 + len,
            });
        }
        got += n;
    }
    Ok((body, fds))
}

fn decode_request(body: &[u8], fds: Vec<OwnedFd>) -> Result<ReceivedRequest, ProtocolError> {
    let value: Value = serde_json::from_slice(body)?;
    let got = value.get("protocol").and_then(Value::as_u64);
    if got != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(ProtocolError::UnsupportedProtocol { got });
    }
    let request: Request = serde_json::from_value(value)?;
    if usize::from(request.netns_fd) != fds.len() {
        return Err(ProtocolError::DescriptorMismatch {
            announced: request.netns_fd,
            received: fds.len(),
        });
    }
    let netns = fds.into_iter().next();
    Ok(ReceivedRequest { request, netns })
}

// ---- plugin side ---------------------------------------------------------------------

/// Sends the request; `netns` must be given exactly when `request.netns_fd` is true.
pub fn send_request(
    stream: &UnixStream,
    request: &Request,
    netns: Option<BorrowedFd<'_>>,
) -> Result<(), ProtocolError> {
    if request.netns_fd != netns.is_some() {
        return Err(ProtocolError::DescriptorMismatch {
            announced: request.netns_fd,
            received: usize::from(netns.is_some()),
        });
    }
    send_frame(stream, &encode(request)?, netns)?;
    Ok(())
}

pub fn read_response(
    stream: &UnixStream,
    deadline: Option<Instant>,
) -> Result<Response, ProtocolError> {
    let (body, fds) = read_frame(stream, deadline)?;
    if !fds.is_empty() {
        return Err(ProtocolError::DescriptorMismatch {
            announced: false,
            received: fds.len(),
        });
    }
    Ok(serde_json::from_slice(&body)?)
}

// ---- daemon side (blocking) ----------------------------------------------------------

pub fn read_request(stream: &UnixStream) -> Result<ReceivedRequest, ProtocolError> {
    let (body, fds) = read_frame(stream, None)?;
    decode_request(&body, fds)
}

pub fn write_response(stream: &UnixStream, response: &Response) -> Result<(), ProtocolError> {
    let frame = encode(response)?;
    let mut w = stream;
    w.write_all(&frame)?;
    Ok(())
}

// ---- daemon side (tokio) -------------------------------------------------------------

pub async fn read_request_async(
    stream: &mut tokio::net::UnixStream,
) -> Result<ReceivedRequest, ProtocolError> {
    use tokio::io::{AsyncReadExt, Interest};
    let mut fds = Vec::new();
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let s: &tokio::net::UnixStream = stream;
        let n = s
            .async_io(Interest::READABLE, || {
                recv_with_fds(s.as_fd(), &mut header[got..], &mut fds)
            })
            .await?;
        if n == 0 {
            return Err(ProtocolError::Closed { got, expected: 4 });
        }
        got += n;
    }
    let len = header_len(header)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed {
                got: 4,
                expected: 4 + len,
            }
        } else {
            ProtocolError::Io(e)
        }
    })?;
    decode_request(&body, fds)
}

pub async fn write_response_async(
    stream: &mut tokio::net::UnixStream,
    response: &Response,
) -> Result<(), ProtocolError> {
    use tokio::io::AsyncWriteExt;
    let frame = encode(response)?;
    stream.write_all(&frame).await?;
    stream.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::error::code;
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    fn request(netns_fd: bool) -> Request {
        let raw = serde_json::json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tortie", "mtu": 1450});
        Request {
            protocol: PROTOCOL_VERSION,
            command: Command::Add,
            kind: PluginKind::Main,
            cni_version: CniVersion::V1_0_0,
            container_id: Some("abc".into()),
            ifname: Some("eth0".into()),
            netns: Some("/proc/self/ns/net".into()),
            netns_fd,
            args: CniArgs::parse("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0").unwrap(),
            config: serde_json::from_value(raw.clone()).unwrap(),
            raw_config: raw,
            prev_result: None,
            valid_attachments: vec![],
        }
    }

    fn same_file(a: &File, b: &File) -> bool {
        let (ma, mb) = (a.metadata().unwrap(), b.metadata().unwrap());
        ma.dev() == mb.dev() && ma.ino() == mb.ino()
    }

    #[test]
    fn request_with_netns_fd_arrives_with_the_same_namespace() {
        let (plugin, daemon) = UnixStream::pair().unwrap();
        let netns = File::open("/proc/self/ns/net").unwrap();
        let sent = request(true);
        send_request(&plugin, &sent, Some(netns.as_fd())).unwrap();
        let got = read_request(&daemon).unwrap();
        assert_eq!(got.request, sent);
        let received = File::from(got.netns.expect("descriptor passed"));
        assert!(same_file(&received, &netns));
    }

    #[test]
    fn request_without_fd_and_response_round_trip() {
        let (plugin, daemon) = UnixStream::pair().unwrap();
        let mut sent = request(false);
        sent.command = Command::Del;
        send_request(&plugin, &sent, None).unwrap();
        let got = read_request(&daemon).unwrap();
        assert_eq!(got.request, sent);
        assert!(got.netns.is_none());

        let answer = Response::Error {
            error: CniError::new(code::TRY_AGAIN_LATER, "busy"),
        };
        write_response(&daemon, &answer).unwrap();
        assert_eq!(read_response(&plugin, None).unwrap(), answer);
    }

    #[test]
    fn announced_fd_must_be_present() {
        let (plugin, daemon) = UnixStream::pair().unwrap();
        // Forge a frame announcing a descriptor without sending one.
        send_frame(&plugin, &encode(&request(true)).unwrap(), None).unwrap();
        assert!(matches!(
            read_request(&daemon),
            Err(ProtocolError::DescriptorMismatch {
                announced: true,
                received: 0
            })
        ));
        assert!(send_request(&plugin, &request(true), None).is_err());
    }

    #[test]
    fn other_protocol_version_is_refused() {
        let (plugin, daemon) = UnixStream::pair().unwrap();
        let mut v = serde_json::to_value(request(false)).unwrap();
        v["protocol"] = 2.into();
        send_frame(&plugin, &encode(&v).unwrap(), None).unwrap();
        assert!(matches!(
            read_request(&daemon),
            Err(ProtocolError::UnsupportedProtocol { got: Some(2) })
        ));
    }

    #[test]
    fn truncated_frame_reports_how_much_arrived() {
        let (plugin, daemon) = UnixStream::pair().unwrap();
        let frame = encode(&request(false)).unwrap();
        (&plugin).write_all(&frame[..10]).unwrap();
        drop(plugin);
        match read_request(&daemon) {
            Err(ProtocolError::Closed { got: 10, expected }) => assert_eq!(expected, frame.len()),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversized_header_is_refused_before_allocating() {
        let (plugin, daemon) = UnixStream::pair().unwrap();
        (&plugin).write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert!(matches!(
            read_request(&daemon),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn silent_daemon_times_out_at_the_deadline() {
        let (plugin, _daemon) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let err = read_response(&plugin, Some(start + Duration::from_millis(200))).unwrap_err();
        assert!(matches!(err, ProtocolError::TimedOut), "{err:?}");
        assert!(start.elapsed() >= Duration::from_millis(190));
    }

    #[test]
    fn ok_response_serialises_with_status_tag() {
        let r = Response::Ok { result: None };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"status": "ok"})
        );
    }

    #[tokio::test]
    async fn async_server_receives_fd_and_answers() {
        let (plugin, daemon) = UnixStream::pair().unwrap();
        daemon.set_nonblocking(true).unwrap();
        let mut daemon = tokio::net::UnixStream::from_std(daemon).unwrap();
        let netns = File::open("/proc/self/ns/net").unwrap();
        let sent = request(true);
        let client = std::thread::spawn({
            let sent = sent.clone();
            let netns = netns.try_clone().unwrap();
            move || {
                send_request(&plugin, &sent, Some(netns.as_fd())).unwrap();
                read_response(&plugin, Some(Instant::now() + Duration::from_secs(10))).unwrap()
            }
        });
        let got = read_request_async(&mut daemon).await.unwrap();
        assert_eq!(got.request, sent);
        assert!(same_file(&File::from(got.netns.unwrap()), &netns));
        let answer = Response::Ok {
            result: Some(CniResult::default()),
        };
        write_response_async(&mut daemon, &answer).await.unwrap();
        assert_eq!(client.join().unwrap(), answer);
    }
}
