//! MTU rules live with Calico's other constants in `desired::mtu` (the host MTU detector in
//! the dataplane reads them too); re-exported here for the calculation's readers.

pub use crate::desired::mtu::*;
