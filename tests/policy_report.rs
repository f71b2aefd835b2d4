// The policy driver's reports from a real `tortie node` (TORTIE_POLICY=1) against a real
// control plane: a Calico policy with a field that does not apply to pods becomes exactly
// one Warning Event on that policy (from the lease leader, not on every pass), and /metrics
// shows Felix's policy gauges and the diagnostic.

mod nodes;
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use nodes::{Daemon, DaemonOpts, Host};
use support::ControlPlane;

const READY: Duration = Duration::from_secs(90);

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_field_that_does_not_apply_becomes_one_event_and_a_metric() -> anyhow::Result<()> {
    let host = Host::new("prep")?;
    let cp = ControlPlane::start_on(host.root_ip.into()).await?;
    cp.create_node("node-p", &[]).await?;
    let dir = tempfile::tempdir()?;
    let mut d = Daemon::start(
        &host,
        dir.path(),
        DaemonOpts {
            kubeconfig: cp.kubeconfig_path(),
            node_name: "node-p",
            env: vec![
                ("IP_AUTODETECTION_METHOD", "interface=api0".into()),
                ("TORTIE_POLICY", "1".into()),
                ("TORTIE_RESYNC_INTERVAL", "1".into()),
            ],
        },
    );
    d.wait_readiness(READY, |code, _| code == 200);

    // Those fields exist on GlobalNetworkPolicy only (host endpoints are cluster-wide).
    let policies: Api<tortie::api::GlobalNetworkPolicy> = Api::all(cp.client());
    let policy: tortie::api::GlobalNetworkPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy",
        "metadata": {"name": "untracked"},
        "spec": {"selector": "app == 'web'", "doNotTrack": true, "applyOnForward": true,
                 "ingress": [{"action": "Allow"}]}
    }))?;
    let created = policies.create(&PostParams::default(), &policy).await?;
    let uid = created.metadata.uid.clone().unwrap_or_default();

    // The metric first: every node reports it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = d.metrics_text();
        // doNotTrack and applyOnForward: two fields, two diagnostics.
        if metric(&text, "tortie_policy_diagnostics{kind=\"not-applied\"}") == Some(2.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "no diagnostic metric:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(metric(&text, "felix_cluster_num_policies"), Some(1.0));
    assert_eq!(metric(&text, "felix_active_local_endpoints"), Some(0.0));
    assert_eq!(metric(&text, "tortie_policy_invalid_policies"), Some(0.0));
    assert!(
        text.contains("tortie_policy_nft_transaction_seconds_count"),
        "{text}"
    );

    // The Event, from the leader (the only node here), about that object (cluster-scoped:
    // its Events live in `default`).
    let events: Api<Event> = Api::all(cp.client());
    let ours = || async {
        let list = events.list(&ListParams::default()).await?;
        Ok::<_, kube::Error>(
            list.items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("PolicyFieldNotApplied"))
                .collect::<Vec<_>>(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        let found = ours().await?;
        if found.len() >= 2 {
            break found;
        }
        if Instant::now() >= deadline {
            let all = events.list(&ListParams::default()).await?;
            panic!("no Event; all Events: {:#?}", all.items);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let e = &found[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    let regarding = e.regarding.as_ref().expect("regarding");
    assert_eq!(regarding.name.as_deref(), Some("untracked"));
    assert_eq!(regarding.kind.as_deref(), Some("GlobalNetworkPolicy"));
    assert_eq!(regarding.uid.as_deref(), Some(uid.as_str()));
    let notes: Vec<String> = found.iter().filter_map(|e| e.note.clone()).collect();
    assert_eq!(found.len(), 2, "{notes:?}");
    assert!(
        notes.iter().any(|n| n.contains("spec.doNotTrack")),
        "{notes:?}"
    );
    assert!(
        notes.iter().any(|n| n.contains("spec.applyOnForward")),
        "{notes:?}"
    );

    // Several resyncs later: no more Events and no repeats of the same ones.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = ours().await?;
    assert_eq!(later.len(), found.len(), "{later:?}");
    assert!(
        later.iter().all(|e| e.series.is_none()),
        "an Event was repeated on a pass without a change: {later:?}"
    );
    Ok(())
}
