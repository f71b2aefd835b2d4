//! Network namespaces as the plumbing sees them: an open namespace file, its identity
//! (device + inode), closures run on a dedicated std::thread that joined it, and rtnetlink
//! connections whose socket was born inside it. Tokio's workers never change namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use nix::sched::{CloneFlags, setns};
use tokio::task::JoinHandle;

/// Device and inode of a namespace file: equal pairs are the same namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl NsId {
    pub fn of(file: &File) -> io::Result<NsId> {
        let meta = file.metadata()?;
        Ok(NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Runs `f` on a fresh thread inside `ns` and awaits it without blocking a tokio worker.
/// The thread exits afterwards, so nothing else ever runs in the namespace by accident.
pub async fn run_in<T, F>(ns: &File, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = ns.try_clone()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cni-netns".into())
        .spawn(move || {
            let result = setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)
                .and_then(|()| f());
            let _ = tx.send(result);
        })?;
    rx.await
        .map_err(|_| io::Error::other("namespace thread ended without an answer"))?
}

/// An rtnetlink handle bound to one namespace; its connection task stops on drop.
pub struct NsNetlink {
    pub handle: rtnetlink::Handle,
    task: JoinHandle<()>,
}

impl Drop for NsNetlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NsNetlink {
    /// Opens the socket on a thread inside `ns`; must be called inside a tokio runtime.
    pub async fn open(ns: &File) -> io::Result<NsNetlink> {
        let runtime = tokio::runtime::Handle::current();
        let (conn, handle, _) = run_in(ns, move || {
            let _enter = runtime.enter();
            rtnetlink::new_connection()
        })
        .await?;
        Ok(NsNetlink {
            handle,
            task: tokio::spawn(conn),
        })
    }
}

/// Writes one sysctl below /proc/sys. Only meaningful on a thread inside the target
/// namespace: /proc/sys/net follows the calling thread's namespace.
pub fn write_sysctl(path: &str, value: &str) -> io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("write {value} to {path}: {e}")))
}
