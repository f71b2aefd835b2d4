//! Kubernetes Events about IP pools the allocator will not use: of two pools whose CIDRs
//! overlap, the newer is set aside and an Event on it names both. Published from a task so
//! the view's watch handlers never wait on the API server.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub const REASON_CIDR_OVERLAP: &str = "CIDROverlap";
const CONTROLLER: &str = "tortie-ipam";

/// An overlap to report: the newer (unused) pool the Event is about, and the older one kept.
#[derive(Debug, Clone)]
pub struct OverlapEvent {
    pub excluded: ObjectReference,
    pub kept: ObjectReference,
}

impl OverlapEvent {
    fn note(&self) -> String {
        format!(
            "IPPool {:?} overlaps the older IPPool {:?}; {:?} is not used for allocation",
            self.excluded.name.as_deref().unwrap_or_default(),
            self.kept.name.as_deref().unwrap_or_default(),
            self.excluded.name.as_deref().unwrap_or_default(),
        )
    }
}

/// Starts the publisher; every message sent on the returned channel becomes one Event.
pub fn spawn(client: Client, node: &str) -> (mpsc::UnboundedSender<OverlapEvent>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<OverlapEvent>();
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: CONTROLLER.to_string(),
            instance: Some(node.to_string()),
        },
    );
    let task = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let event = Event {
                type_: EventType::Warning,
                reason: REASON_CIDR_OVERLAP.to_string(),
                note: Some(ev.note()),
                action: "ExcludePool".to_string(),
                secondary: Some(ev.kept.clone()),
            };
            if let Err(e) = recorder.publish(&event, &ev.excluded).await {
                tracing::warn!(pool = ?ev.excluded.name, error = %e,
                    "cannot publish the IP pool overlap event");
            }
        }
    });
    (tx, task)
}
