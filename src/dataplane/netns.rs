//! rtnetlink connections bound to a chosen network namespace. A netlink socket stays in the
//! namespace it was created in, so the socket is made on a short-lived std::thread that
//! joined the namespace; tokio's workers never change namespace.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

use super::DataplaneError;

/// A connection in the caller's own namespace (the daemon runs with hostNetwork).
pub fn connect() -> Result<rtnetlink::Handle, DataplaneError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|source| DataplaneError::Netns {
            path: PathBuf::from("/proc/self/ns/net"),
            action: "open rtnetlink socket",
            source,
        })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A connection whose socket lives in the namespace at `path` (`/run/netns/<name>` or
/// `/proc/<pid>/ns/net`). Must be called from inside a tokio runtime: the connection task is
/// spawned on it.
pub fn connect_in(path: &Path) -> Result<rtnetlink::Handle, DataplaneError> {
    let (conn, handle, _) = in_netns(path, "open rtnetlink socket", rtnetlink::new_connection)?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Runs `open` (which creates sockets) on a fresh thread inside the namespace at `path`, with
/// the caller's tokio runtime entered so the sockets register with its reactor.
pub(crate) fn in_netns<T: Send + 'static>(
    path: &Path,
    action: &'static str,
    open: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, DataplaneError> {
    let err = |action: &'static str, source: std::io::Error| DataplaneError::Netns {
        path: path.to_path_buf(),
        action,
        source,
    };
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| err("find the tokio runtime", std::io::Error::other(e)))?;
    let file = std::fs::File::open(path).map_err(|e| err("open", e))?;
    let spawned = std::thread::Builder::new()
        .name("netns-netlink".into())
        .spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| ("setns", std::io::Error::from(e)))?;
            let _guard = runtime.enter();
            open().map_err(|e| (action, e))
        })
        .map_err(|e| err("spawn the namespace thread", e))?;
    spawned
        .join()
        .map_err(|_| err("namespace thread", std::io::Error::other("panicked")))?
        .map_err(|(action, e)| err(action, e))
}
