//! The plugin's side of the daemon socket: connect (bounded), send one request with the
//! netns descriptor, wait (bounded) for the answer. Blocking std I/O on purpose: the plugin
//! is a short-lived process and a runtime would cost more than the whole exchange.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

use super::netconf::ClientSettings;
use super::protocol::{self, ProtocolError, Request, Response};

/// A live daemon accepts at once; waiting longer only hides a wedged one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("tortie daemon socket {} is not reachable: {source}", socket.display())]
    Connect { socket: PathBuf, source: io::Error },
    #[error("tortie daemon at {} did not answer {command} within {}s", socket.display(), timeout.as_secs_f64())]
    Timeout {
        socket: PathBuf,
        command: &'static str,
        timeout: Duration,
    },
    #[error("exchange with the tortie daemon at {} failed: {source}", socket.display())]
    Exchange {
        socket: PathBuf,
        source: ProtocolError,
    },
}

/// Connects with a bound: on a unix socket a blocking connect waits (for a full accept
/// backlog) only as long as SO_SNDTIMEO, which std cannot set before connecting.
pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let fail = |source: io::Error| ClientError::Connect {
        socket: path.to_path_buf(),
        source,
    };
    let addr = UnixAddr::new(path).map_err(|e| fail(e.into()))?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| fail(e.into()))?;
    let stream = UnixStream::from(fd);
    stream.set_write_timeout(Some(timeout)).map_err(fail)?;
    loop {
        match connect(stream.as_raw_fd(), &addr) {
            Ok(()) => return Ok(stream),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                return Err(fail(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect did not complete within {}s", timeout.as_secs_f64()),
                )));
            }
            Err(e) => return Err(fail(e.into())),
        }
    }
}

/// One request/response exchange within `settings.timeout` overall.
pub fn call(
    settings: &ClientSettings,
    request: &Request,
    netns: Option<BorrowedFd<'_>>,
) -> Result<Response, ClientError> {
    let start = Instant::now();
    let deadline = start + settings.timeout;
    let socket = settings.socket.clone();
    let timed_out = || ClientError::Timeout {
        socket: settings.socket.clone(),
        command: request.command.as_str(),
        timeout: settings.timeout,
    };
    let stream = connect_with_timeout(&socket, CONNECT_TIMEOUT.min(settings.timeout))?;
    let exchange = |source: ProtocolError| match source {
        ProtocolError::TimedOut => timed_out(),
        ProtocolError::Io(ref e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            timed_out()
        }
        source => ClientError::Exchange {
            socket: socket.clone(),
            source,
        },
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timed_out());
    }
    stream
        .set_write_timeout(Some(left))
        .map_err(|e| exchange(e.into()))?;
    protocol::send_request(&stream, request, netns).map_err(exchange)?;
    let response = protocol::read_response(&stream, Some(deadline)).map_err(exchange)?;
    tracing::debug!(
        command = request.command.as_str(),
        socket = %socket.display(),
        elapsed_ms = start.elapsed().as_millis() as u64,
        "daemon answered"
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn absent_socket_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let err = connect_with_timeout(&path, Duration::from_secs(1)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            matches!(err, ClientError::Connect { ref source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn socket_file_without_listener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        drop(UnixListener::bind(&path).unwrap());
        let err = connect_with_timeout(&path, Duration::from_secs(1)).unwrap_err();
        assert!(
            matches!(err, ClientError::Connect { ref source, .. } if source.kind() == io::ErrorKind::ConnectionRefused),
            "{err:?}"
        );
    }

    #[test]
    fn connects_to_a_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ok.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        connect_with_timeout(&path, Duration::from_secs(1)).unwrap();
    }
}
