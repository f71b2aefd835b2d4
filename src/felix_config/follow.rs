//! The daemon side of FelixConfiguration: follows the objects in the datastore's store and
//! this node's labels, publishes the merged settings on a watch channel whenever they
//! change (logging each changed field and where it came from), and names every field it
//! does not apply once in the log and once in a Warning Event on the object (a node's own
//! `node.<name>` object by that node, the others by the Lease holder).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::merge::{Effective, Local, Object, Sources, merge, unsupported};
use crate::api::felixconfiguration::{FelixConfiguration, node_of};
use crate::ipam::convert::time_to_chrono;

/// How often the stores are read: the daemon applies a change within this (Felix restarts
/// itself for most changes, which takes longer).
pub const POLL: Duration = Duration::from_millis(500);
pub const REASON_UNSUPPORTED: &str = "UnsupportedField";
const CONTROLLER: &str = "tortie-felix-config";

/// Inputs of the follower.
pub struct Inputs {
    pub node: String,
    pub local: Local,
    pub configs: Store<FelixConfiguration>,
    pub nodes: Store<Node>,
    pub client: Client,
    pub is_leader: watch::Receiver<bool>,
    /// The datastore's change signal: recompute when it fires (the daemon). None: poll the
    /// stores every `POLL` (callers without a datastore).
    pub changes: Option<watch::Receiver<u64>>,
}

/// The objects as the merge reads them, from the store.
pub fn objects(configs: &Store<FelixConfiguration>) -> Vec<Object> {
    let mut out: Vec<Object> = configs
        .state()
        .iter()
        .map(|c| Object {
            name: c.name_any(),
            created: c.creation_timestamp().as_ref().and_then(time_to_chrono),
            spec: c.spec.clone(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn current(inputs: &Inputs) -> (Effective, Sources) {
    let labels: BTreeMap<String, String> = inputs
        .nodes
        .get(&ObjectRef::new(&inputs.node))
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    let sources = Sources::select(&objects(&inputs.configs), &inputs.node, &labels);
    (merge(&inputs.local, &sources), sources)
}

/// Starts following. The first value is computed now, from the stores as they are (call
/// after the datastore synced so start-up already uses the cluster's settings).
pub fn spawn(inputs: Inputs) -> (watch::Receiver<Effective>, JoinHandle<()>) {
    let (first, sources) = current(&inputs);
    log_effective(&Effective::default(), &first);
    let (tx, rx) = watch::channel(first);
    let task = tokio::spawn(async move {
        let mut inputs = inputs;
        let mut reported = Reported::new(&inputs);
        reported.check(&inputs, &sources).await;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = inputs.changes.take();
        let mut leader = Some(inputs.is_leader.clone());
        loop {
            match changes.as_mut() {
                // Leadership decides who reports Events: its change wakes the check too.
                Some(rx) => tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    r = changed_or_never(&mut leader) => if r.is_err() { leader = None },
                },
                None => {
                    tick.tick().await;
                }
            }
            let (next, sources) = current(&inputs);
            reported.check(&inputs, &sources).await;
            tx.send_if_modified(|cur| {
                if *cur == next {
                    return false;
                }
                log_effective(cur, &next);
                *cur = next;
                true
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    (rx, task)
}

async fn changed_or_never(
    rx: &mut Option<watch::Receiver<bool>>,
) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

fn log_effective(old: &Effective, new: &Effective) {
    let show = |e: &Effective| {
        [
            ("vxlanMTU", format!("{:?}", e.vxlan_mtu)),
            ("ipipMTU", format!("{:?}", e.ipip_mtu)),
            ("vxlanPort", e.vxlan_port.to_string()),
            ("vxlanVNI", e.vxlan_vni.to_string()),
            ("routeRefreshInterval", format!("{:?}", e.route_refresh)),
            (
                "featureDetectOverride",
                format!("{:?}", e.checksum_offload_broken),
            ),
            ("logSeverityScreen", format!("{:?}", e.log_filter)),
            ("health", e.health.to_string()),
            ("prometheusMetrics", e.metrics.to_string()),
        ]
    };
    for ((field, was), (_, now)) in show(old).into_iter().zip(show(new)) {
        if was != now {
            let source = new
                .sources
                .iter()
                .find(|(k, _)| field.starts_with(*k) || k.starts_with(field))
                .map_or("default".to_string(), |(_, s)| s.to_string());
            tracing::info!(field, old = %was, new = %now, %source, "Felix setting changed");
        }
    }
}

/// Unsupported fields already logged and already published as Events, by (object, field).
struct Reported {
    logged: BTreeSet<(String, String)>,
    published: BTreeSet<(String, String)>,
    recorder: Recorder,
}

impl Reported {
    fn new(inputs: &Inputs) -> Reported {
        Reported {
            logged: BTreeSet::new(),
            published: BTreeSet::new(),
            recorder: Recorder::new(
                inputs.client.clone(),
                Reporter {
                    controller: CONTROLLER.to_string(),
                    instance: Some(inputs.node.clone()),
                },
            ),
        }
    }

    async fn check(&mut self, inputs: &Inputs, sources: &Sources) {
        let leading = *inputs.is_leader.borrow();
        let applying = [&sources.global, &sources.selector, &sources.node];
        for o in applying.into_iter().flatten() {
            // A node's own object is this node's to report; shared objects the leader's.
            let ours = node_of(&o.name) == Some(inputs.node.as_str()) || leading;
            for (field, why) in unsupported(&o.spec) {
                let key = (o.name.clone(), field.clone());
                if self.logged.insert(key.clone()) {
                    tracing::warn!(object = %o.name, %field, reason = why,
                        "FelixConfiguration field is not applied");
                }
                if ours && !self.published.contains(&key) {
                    let note = format!(
                        "FelixConfiguration {} sets {field}, which is not applied: {why}",
                        o.name
                    );
                    if self.publish(inputs, &o.name, &field, note).await {
                        self.published.insert(key);
                    }
                }
            }
        }
    }

    async fn publish(&self, inputs: &Inputs, name: &str, field: &str, note: String) -> bool {
        let Some(obj) = inputs.configs.get(&ObjectRef::new(name)) else {
            return false;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: REASON_UNSUPPORTED.to_string(),
            note: Some(note),
            // The recorder folds events of one action and reason into a series with the
            // first note; one action per field keeps each field's own Event.
            action: format!("Ignore {field}").chars().take(128).collect(),
            secondary: None,
        };
        match self.recorder.publish(&event, &obj.object_ref(&())).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(object = name, error = %e, "cannot publish FelixConfiguration event; retrying");
                false
            }
        }
    }
}
