//! FelixConfiguration: the Calico settings tortie applies, taken from the cluster's
//! FelixConfiguration objects with Felix's precedence and fed to the daemon live.
//!
//! - `merge` (pure): which object wins for which field, tortie's defaults, the fields tortie
//!   does not apply, Felix's pod MTU rule.
//! - `follow`: reads the datastore's FelixConfiguration store and the node's labels,
//!   publishes the merged `Effective` settings on a watch channel, reports unsupported
//!   fields (log and Warning Event).
//! - `live`: turns the settings, the host MTU and the pools' encapsulations into the values
//!   the daemon reads per use: the next pod's MTU and the overlay's device settings.

pub mod follow;
pub mod live;
pub mod merge;

pub use merge::{Effective, Local, Source, Sources, merge, pod_mtu, unsupported};
