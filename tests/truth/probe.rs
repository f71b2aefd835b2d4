// What one pod serves and how one cell is probed with a real connection: TCP and SCTP
// (one-to-one sockets) echo a byte, UDP echoes a datagram, ICMP is seen arriving by a raw
// socket in the destination. Each probe uses a fresh UDP source port or ICMP id, so no
// conntrack entry left by an earlier probe (kept as established) decides a later one.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::NetNs;

/// A denied probe is given this long: less than TCP's first SYN retransmit (1 s).
pub const TIMEOUT: Duration = Duration::from_millis(600);
/// How often servers look at their stop flag.
const TICK: Duration = Duration::from_millis(200);

/// One kind of traffic probed between every pair of pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Probe {
    Tcp(u16),
    Udp(u16),
    Sctp(u16),
    /// Type and code.
    Icmp(u8, u8),
}

impl Probe {
    /// (port, protocol) as the Kubernetes oracle names it; None for ICMP.
    pub fn port_protocol(self) -> Option<(u16, &'static str)> {
        match self {
            Probe::Tcp(p) => Some((p, "TCP")),
            Probe::Udp(p) => Some((p, "UDP")),
            Probe::Sctp(p) => Some((p, "SCTP")),
            Probe::Icmp(..) => None,
        }
    }

    pub fn from_port_protocol(port: u16, protocol: &str) -> Option<Probe> {
        match protocol {
            "TCP" => Some(Probe::Tcp(port)),
            "UDP" => Some(Probe::Udp(port)),
            "SCTP" => Some(Probe::Sctp(port)),
            _ => None,
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp(p) => write!(f, "{p}/TCP"),
            Probe::Udp(p) => write!(f, "{p}/UDP"),
            Probe::Sctp(p) => write!(f, "{p}/SCTP"),
            Probe::Icmp(t, c) => write!(f, "ICMP type {t} code {c}"),
        }
    }
}

/// ICMP messages a pod received: (source, type, code, identifier).
#[derive(Default)]
pub struct IcmpSeen(Mutex<HashSet<(Ipv4Addr, u8, u8, u16)>>);

impl IcmpSeen {
    fn record(&self, m: (Ipv4Addr, u8, u8, u16)) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(m);
    }

    fn saw(&self, m: &(Ipv4Addr, u8, u8, u16)) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).contains(m)
    }
}

/// The servers of one pod (sockets made in its namespace, served from this process's
/// threads); stopped and joined on Drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub icmp: Arc<IcmpSeen>,
}

impl Servers {
    pub fn start(netns: &NetNs, tcp: &[u16], udp: &[u16], sctp: &[u16]) -> anyhow::Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let icmp = Arc::new(IcmpSeen::default());
        let mut s = Servers {
            stop,
            threads: Vec::new(),
            icmp,
        };
        for (ports, proto) in [(tcp, libc::IPPROTO_TCP), (sctp, libc::IPPROTO_SCTP)] {
            for &port in ports {
                let l = netns.run(move || stream_listener(proto, port))??;
                let stop = s.stop.clone();
                s.threads
                    .push(std::thread::spawn(move || serve_stream(l, &stop)));
            }
        }
        for &port in udp {
            let u = netns.run(move || UdpSocket::bind(("0.0.0.0", port)))??;
            u.set_read_timeout(Some(TICK))?;
            let stop = s.stop.clone();
            s.threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        let raw = netns.run(|| raw_icmp_socket(Some(TICK)))??;
        let (stop, seen) = (s.stop.clone(), s.icmp.clone());
        s.threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: buf is valid for its length; the fd is owned by `raw`.
                let n =
                    unsafe { libc::recv(raw.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if let Ok(n) = usize::try_from(n)
                    && let Some(m) = parse_icmp(&buf[..n])
                {
                    seen.record(m);
                }
            }
        }));
        Ok(s)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Accepts until stopped; each connection echoes on its own thread until EOF or stop.
fn serve_stream(l: TcpListener, stop: &Arc<AtomicBool>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if !matches!(wait_fd(l.as_raw_fd(), libc::POLLIN, TICK), Ok(true)) {
            continue;
        }
        let Ok((mut s, _)) = l.accept() else { continue };
        let stop = stop.clone();
        conns.retain(|c| !c.is_finished());
        conns.push(std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(TICK));
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
        }));
    }
    for c in conns {
        let _ = c.join();
    }
}

/// One probe from the calling thread's namespace (the source pod's) to `to`; true when the
/// traffic got through. `from` is the source pod's address (what the destination sees) and
/// `seen` the destination's ICMP record.
pub fn probe(p: Probe, from: Ipv4Addr, to: Ipv4Addr, seen: &IcmpSeen) -> bool {
    match p {
        Probe::Tcp(port) => stream_echo(libc::IPPROTO_TCP, SocketAddrV4::new(to, port)),
        Probe::Sctp(port) => stream_echo(libc::IPPROTO_SCTP, SocketAddrV4::new(to, port)),
        Probe::Udp(port) => udp_echo(SocketAddrV4::new(to, port)),
        Probe::Icmp(ty, code) => icmp_arrives(from, to, ty, code, seen),
    }
}

fn stream_echo(proto: libc::c_int, to: SocketAddrV4) -> bool {
    let t0 = Instant::now();
    let Ok(mut s) = stream_connect(proto, to, TIMEOUT) else {
        return false;
    };
    let left = TIMEOUT
        .saturating_sub(t0.elapsed())
        .max(Duration::from_millis(50));
    let mut b = [0u8; 1];
    s.set_read_timeout(Some(left)).is_ok()
        && s.write_all(b"t").is_ok()
        && s.read_exact(&mut b).is_ok()
        && &b == b"t"
}

/// A source port no earlier probe of this run used (the range is far larger than the number
/// of UDP probes of a run).
fn fresh_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    20_000 + (NEXT.fetch_add(1, Ordering::Relaxed) % 40_000) as u16
}

fn udp_echo(to: SocketAddrV4) -> bool {
    let Some(s) = (0..8).find_map(|_| UdpSocket::bind(("0.0.0.0", fresh_port())).ok()) else {
        return false;
    };
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    // Twice, in case the first datagram waited on a neighbour lookup and was lost.
    for _ in 0..2 {
        if s.send_to(b"truth", to).is_err() {
            return false;
        }
        let until = (t0.elapsed() + TIMEOUT / 2).min(TIMEOUT);
        while t0.elapsed() < until {
            let _ = s.set_read_timeout(Some(until - t0.elapsed()));
            match s.recv_from(&mut buf) {
                Ok((n, src)) if src == to.into() && &buf[..n] == b"truth" => return true,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    false
}

fn icmp_arrives(from: Ipv4Addr, to: Ipv4Addr, ty: u8, code: u8, seen: &IcmpSeen) -> bool {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let id = (NEXT.fetch_add(1, Ordering::Relaxed) % 65_535) as u16 + 1;
    let Ok(sock) = raw_icmp_socket(None) else {
        return false;
    };
    // 8-byte header and 12 bytes of zeros: the size of a timestamp request.
    let mut msg = [0u8; 20];
    msg[0] = ty;
    msg[1] = code;
    msg[4..6].copy_from_slice(&id.to_be_bytes());
    msg[6..8].copy_from_slice(&1u16.to_be_bytes());
    let sum = checksum(&msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    let want = (from, ty, code, id);
    let t0 = Instant::now();
    for _ in 0..2 {
        let sa = sockaddr(SocketAddrV4::new(to, 0));
        // SAFETY: msg and sa are valid for the lengths passed.
        unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let until = (t0.elapsed() + TIMEOUT / 2).min(TIMEOUT);
        while t0.elapsed() < until {
            if seen.saw(&want) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    seen.saw(&want)
}

/// (source, type, code, identifier) of an IPv4 packet carrying ICMP.
fn parse_icmp(pkt: &[u8]) -> Option<(Ipv4Addr, u8, u8, u16)> {
    let ihl = usize::from(*pkt.first()? & 0x0f) * 4;
    let src = Ipv4Addr::new(*pkt.get(12)?, *pkt.get(13)?, *pkt.get(14)?, *pkt.get(15)?);
    let icmp = pkt.get(ihl..ihl + 8)?;
    Some((
        src,
        icmp[0],
        icmp[1],
        u16::from_be_bytes([icmp[4], icmp[5]]),
    ))
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether this kernel can make SCTP sockets (the module may be missing).
pub fn sctp_available() -> bool {
    socket(libc::SOCK_STREAM, libc::IPPROTO_SCTP).is_ok()
}

fn socket(ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn raw_icmp_socket(timeout: Option<Duration>) -> io::Result<OwnedFd> {
    let fd = socket(libc::SOCK_RAW, libc::IPPROTO_ICMP)?;
    if let Some(t) = timeout {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        setsockopt(&fd, libc::SO_RCVTIMEO, &tv)?;
    }
    Ok(fd)
}

fn setsockopt<T>(fd: &OwnedFd, opt: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: val points to a live T of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (val as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A listening stream socket of `proto` (TCP or SCTP) on 0.0.0.0:`port`, as a std listener
/// (accept, read and write are the same calls for both).
fn stream_listener(proto: libc::c_int, port: u16) -> io::Result<TcpListener> {
    let fd = socket(libc::SOCK_STREAM, proto)?;
    setsockopt(&fd, libc::SO_REUSEADDR, &1 as &libc::c_int)?;
    let sa = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    // SAFETY: sa is a valid sockaddr_in of the size passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    // SAFETY: plain syscall on an owned fd.
    if r != 0 || unsafe { libc::listen(fd.as_raw_fd(), 256) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

/// A connected stream socket of `proto` to `to` within `timeout`.
pub fn stream_connect(
    proto: libc::c_int,
    to: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let fd = socket(libc::SOCK_STREAM | libc::SOCK_NONBLOCK, proto)?;
    let sa = sockaddr(to);
    // SAFETY: sa is a valid sockaddr_in of the size passed.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        if !wait_fd(fd.as_raw_fd(), libc::POLLOUT, timeout)? {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut err: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: err and len are valid for getsockopt's writes.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    let s = TcpStream::from(fd);
    s.set_nonblocking(false)?;
    Ok(s)
}

/// Waits until `fd` is ready for `events`; false on timeout.
fn wait_fd(fd: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let t0 = Instant::now();
    loop {
        let left = timeout.saturating_sub(t0.elapsed());
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis() as libc::c_int) };
        if r > 0 {
            return Ok(true);
        }
        if r == 0 {
            return Ok(false);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
