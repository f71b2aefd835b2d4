//! Network policy, sans-IO: Kubernetes NetworkPolicy and Calico (Global)NetworkPolicy (and
//! their staged forms) converted into one model with Calico's semantics, the endpoints they
//! apply to (with Calico's implied labels), and an evaluator that answers "is this flow
//! allowed, and which policy and rule decided it" — the reference the nft compiler and
//! `tortie policy explain` share. No I/O here; the CLI and the daemon feed it objects.

pub mod by_name;
pub mod calico;
pub mod cli;
pub mod cluster;
pub mod compile;
pub mod cut;
pub mod diagnostic;
pub mod endpoint;
pub mod eval;
pub mod explain;
pub mod incremental;
pub mod k8s;
pub mod model;
pub mod ports;
pub mod protocol;
mod rewrite;

pub use diagnostic::{Diagnostic, Severity};
pub use endpoint::{Endpoint, NamedPort, NetworkSetEntry, Profile};
pub use eval::{Decision, DirectionVerdict, Flow, Verdict, evaluate};
pub use model::{
    Action, Direction, EntityMatch, IcmpMatch, Model, Policy, PolicyId, PolicyKind, Rule, RuleMatch,
};
pub use ports::PortMatch;
pub use protocol::Protocol;
