//! CNI: the spec's types (config, result, errors, versions), the thin plugin binary mode
//! (`tortie` / `tortie-ipam` with CNI_COMMAND set) and the wire protocol to the node daemon.
//! The plugin validates and forwards; the daemon does the work.
//!
//! Network config keys tortie's plugin reads besides the spec's (top level, or inside `ipam`
//! for `tortie-ipam`, which wins there):
//! - `socket`: absolute path of the daemon's unix socket, default `/var/run/tortie/cni.sock`.
//! - `timeout_seconds`: overall budget of one request to the daemon; defaults ADD/DEL 90,
//!   CHECK 30, GC 60, STATUS 5 (connecting is capped at 5 s within that budget).

pub mod client;
pub mod error;
pub mod handlers;
pub mod install;
pub mod invocation;
pub mod metrics;
pub mod netconf;
pub mod plugin;
pub mod plumbing;
pub mod protocol;
pub mod result;
pub mod server;
pub mod service;
pub mod version;

pub use error::CniError;
pub use invocation::{CniArgs, Command, PluginKind};
pub use netconf::{GcAttachment, NetConf, NetConfList};
pub use protocol::{ReceivedRequest, Request, Response};
pub use result::CniResult;
pub use version::CniVersion;
