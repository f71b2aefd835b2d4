//! TX checksum offload of a device through the legacy ethtool ioctls (what `ethtool -K
//! <dev> tx off` does); the vxlan driver uses it for Calico's `ChecksumOffloadBroken`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

fn ethtool(sock: &OwnedFd, device: &str, cmd: u32, data: u32) -> io::Result<u32> {
    let name = device.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {device:?}"),
        ));
    }
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: ifr is a valid ifreq whose data pointer refers to `value`, which outlives the
    // call; SIOCETHTOOL reads and writes only that ethtool_value.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut ifr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

pub(crate) fn tx_checksum(sock: &OwnedFd, device: &str) -> io::Result<bool> {
    ethtool(sock, device, ETHTOOL_GTXCSUM, 0).map(|v| v != 0)
}

pub(crate) fn set_tx_checksum(sock: &OwnedFd, device: &str, on: bool) -> io::Result<()> {
    ethtool(sock, device, ETHTOOL_STXCSUM, u32::from(on)).map(|_| ())
}
