//! Errors of the kernel drivers. Each names the object and the value it was acting on, so a
//! log line says what failed without the caller adding context.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{action}: {source}")]
    Netlink {
        action: String,
        #[source]
        source: rtnetlink::Error,
    },

    /// The kernel cannot create this kind of device (EOPNOTSUPP / "Unknown device type").
    /// The daemon logs it once and keeps converging everything else.
    #[error(
        "kernel lacks {feature} (module `{module}` not available): cannot create device {device}"
    )]
    MissingKernelFeature {
        feature: &'static str,
        module: &'static str,
        device: String,
    },

    #[error("no interface holds the node IP {ip}: cannot choose the parent device for {device}")]
    ParentNotFound {
        ip: std::net::Ipv4Addr,
        device: String,
    },

    #[error("device {device} is missing: cannot program {what}")]
    DeviceMissing { device: String, what: String },

    #[error("{action} on {device}: {source}")]
    Ethtool {
        device: String,
        action: String,
        #[source]
        source: std::io::Error,
    },

    #[error("network namespace {}: {action}: {source}", path.display())]
    Netns {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("{failed} of {total} {object} changes failed; first: {first}")]
    Batch {
        object: &'static str,
        failed: usize,
        total: usize,
        first: Box<DataplaneError>,
    },
}

impl DataplaneError {
    pub(crate) fn netlink(action: impl Into<String>, source: rtnetlink::Error) -> Self {
        DataplaneError::Netlink {
            action: action.into(),
            source,
        }
    }
}

/// The errno a netlink request failed with (positive, as in libc), if it was a kernel error.
pub(crate) fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().abs()),
        _ => None,
    }
}
