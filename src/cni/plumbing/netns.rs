//! Network namespaces as the plumbing sees them: an open namespace file, its identity
//! (device + inode), closures run on a dedicated std::thread that joined it, and rtnetlink
//! connections whose socket was born inside it. Tokio's workers never change namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use nix::sched::{CloneFlags, setns};

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

/// An rtnetlink handle bound to one namespace. Its connection runs on a thread of its own
/// inside the namespace: the kernel handles a netlink request inside the sender's
/// `sendmsg`, and a link delete waits there for an RCU grace period, so on a tokio worker
/// a burst of DELs would queue behind each other (two workers, ~25 ms each) while on
/// their own threads they overlap as separate processes' do. Dropping it stops the thread.
pub struct NsNetlink {
    pub handle: rtnetlink::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl NsNetlink {
    /// Opens the socket on a thread inside `ns`, which then drives the connection until
    /// this value is dropped.
    pub async fn open(ns: &File) -> io::Result<NsNetlink> {
        let ns = ns.try_clone()?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("cni-netlink".into())
            .spawn(move || {
                let opened = setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_io()
                            .build()
                    })
                    .and_then(|rt| {
                        let _enter = rt.enter();
                        let (conn, handle, _) = rtnetlink::new_connection()?;
                        Ok((rt, conn, handle))
                    });
                match opened {
                    Ok((rt, conn, handle)) => {
                        if ready_tx.send(Ok(handle)).is_ok() {
                            rt.block_on(async {
                                tokio::select! {
                                    _ = conn => {}
                                    _ = stopped => {}
                                }
                            });
                        }
                    }
                    Err(e) => drop(ready_tx.send(Err(e))),
                }
            })?;
        let handle = ready_rx
            .await
            .map_err(|_| io::Error::other("netlink thread ended without an answer"))??;
        Ok(NsNetlink {
            handle,
            _stop: stop,
        })
    }
}

/// Writes one sysctl below /proc/sys. Only meaningful on a thread inside the target
/// namespace: /proc/sys/net follows the calling thread's namespace.
pub fn write_sysctl(path: &str, value: &str) -> io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("write {value} to {path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of this process named `name`.
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .map(|tasks| {
                tasks
                    .filter_map(Result::ok)
                    .filter(|t| {
                        std::fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|c| c.trim_end() == name)
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn netlink_thread_serves_requests_and_ends_on_drop() {
        let Ok(ns) = File::open("/proc/thread-self/ns/net") else {
            return;
        };
        let nl = match NsNetlink::open(&ns).await {
            Ok(nl) => nl,
            // setns needs CAP_SYS_ADMIN; the root-only tests cover the rest.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return,
            Err(e) => panic!("open: {e}"),
        };
        let before = threads_named("cni-netlink");
        assert!(before >= 1, "the connection runs on its own thread");
        let mut links = nl.handle.link().get().match_name("lo").execute();
        use futures::TryStreamExt;
        let lo = links.try_next().await.expect("netlink answers");
        assert!(lo.is_some(), "lo is listed through the thread's socket");
        drop(links);
        drop(nl);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while threads_named("cni-netlink") >= before {
            assert!(
                std::time::Instant::now() < deadline,
                "the netlink thread outlived its handle"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
