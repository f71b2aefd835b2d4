//! The kernel the drivers act on: a netlink connection plus the network namespace it lives
//! in, for the few settings netlink cannot reach (ethtool ioctls need a socket in that
//! namespace). Every driver call names its namespace through this.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rtnetlink::Handle;

use super::DataplaneError;
use super::netns::{connect, connect_in, in_netns};

pub struct Kernel {
    pub handle: Handle,
    netns: Option<PathBuf>,
}

impl Kernel {
    /// The caller's own namespace (the daemon runs with hostNetwork).
    pub fn host() -> Result<Kernel, DataplaneError> {
        Ok(Kernel {
            handle: connect()?,
            netns: None,
        })
    }

    /// The namespace at `path`; must be called inside a tokio runtime.
    pub fn in_netns(path: &Path) -> Result<Kernel, DataplaneError> {
        Ok(Kernel {
            handle: connect_in(path)?,
            netns: Some(path.to_path_buf()),
        })
    }

    /// A datagram socket in this kernel's namespace, for interface ioctls.
    pub(crate) fn ioctl_socket(&self) -> Result<OwnedFd, DataplaneError> {
        match &self.netns {
            Some(path) => in_netns(path, "open ioctl socket", udp_socket),
            None => udp_socket().map_err(|source| DataplaneError::Netns {
                path: PathBuf::from("/proc/self/ns/net"),
                action: "open ioctl socket",
                source,
            }),
        }
    }
}

fn udp_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory preconditions; the fd is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
