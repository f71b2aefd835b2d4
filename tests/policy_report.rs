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

/// Sends a line every 50 ms on `s` for `dur`; how many echoes came back after `from`.
fn echoes_after(s: &mut std::net::TcpStream, dur: Duration, from: Duration) -> usize {
    use std::io::{BufRead, BufReader, Write};
    s.set_read_timeout(Some(Duration::from_millis(150)))
        .expect("timeout");
    let start = Instant::now();
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut late = 0;
    while start.elapsed() < dur {
        if s.write_all(b"ping\n").is_err() {
            break;
        }
        let mut line = String::new();
        if reader.read_line(&mut line).is_ok_and(|n| n > 0) && start.elapsed() >= from {
            late += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    late
}

/// `--policy-cut-denied-connections` through the daemon: two local pods (API objects plus
/// `cali*` veths named as the CNI names them); an open connection between them stops within
/// a second of the daemon committing a policy that denies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_cuts_an_open_connection_a_new_policy_denies() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Patch, PatchParams};
    use std::io::{Read, Write};
    use support::NetNs;
    use support::netns::plumb_pod;
    use tortie::cni::plumbing::host_veth_name;

    let host = Host::new("pcut")?;
    // Proxy ARP answers the pods' gateway only with a route to it: a veth pair inside the
    // host namespace (no dummy module here), so no pod packet heads for the root namespace.
    host.ns.exec_ok(&[
        "ip", "link", "add", "gw0", "type", "veth", "peer", "name", "gw1",
    ])?;
    host.ns.exec_ok(&["ip", "link", "set", "gw0", "up"])?;
    host.ns.exec_ok(&["ip", "link", "set", "gw1", "up"])?;
    host.ns
        .exec_ok(&["ip", "route", "add", "169.254.1.1/32", "dev", "gw0"])?;
    host.ns
        .exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    let cp = ControlPlane::start_on(host.root_ip.into()).await?;
    cp.create_node("node-c", &[]).await?;
    let pods_api: Api<Pod> = Api::namespaced(cp.client(), "default");
    let mut netns = Vec::new();
    for (name, ip) in [("web", "10.0.0.1"), ("db", "10.0.0.2")] {
        support::pods::create_pod_on(&cp.client(), "default", name, "node-c", &[]).await?;
        pods_api
            .patch_metadata(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": {"app": name}}})),
            )
            .await?;
        pods_api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"phase": "Running",
                    "podIP": ip, "podIPs": [{"ip": ip}]}})),
            )
            .await?;
        let ns = NetNs::new(&format!("pcut{name}"))?;
        plumb_pod(&host.ns, &ns, &host_veth_name("default", name), ip, None)?;
        netns.push(ns);
    }
    // web echoes lines on 7000.
    let l = netns[0].run(|| std::net::TcpListener::bind("10.0.0.1:7000"))??;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().expect("clone");
                let mut r = s;
                let mut buf = [0u8; 64];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 || w.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });

    let dir = tempfile::tempdir()?;
    let mut d = Daemon::start(
        &host,
        dir.path(),
        DaemonOpts {
            kubeconfig: cp.kubeconfig_path(),
            node_name: "node-c",
            env: vec![
                ("IP_AUTODETECTION_METHOD", "interface=api0".into()),
                ("TORTIE_POLICY", "1".into()),
                ("TORTIE_POLICY_CUT_DENIED_CONNECTIONS", "true".into()),
                ("TORTIE_RESYNC_INTERVAL", "1".into()),
            ],
        },
    );
    d.wait_readiness(READY, |code, _| code == 200);
    let chain = |name: &str| {
        host.ns
            .exec(&["nft", "list", "chain", "inet", "tortie-policy", name])
            .status
            .success()
    };
    let web_if = host_veth_name("default", "web");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !chain(&format!("tw-{web_if}")) {
        assert!(
            Instant::now() < deadline,
            "web's chains never appeared\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut s = netns[1]
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &"10.0.0.1:7000".parse().expect("addr"),
                Duration::from_secs(1),
            )
        })?
        .map_err(|e| anyhow::anyhow!("db → web before the policy: {e}\n{}", d.log()))?;
    assert!(echoes_after(&mut s, Duration::from_millis(300), Duration::ZERO) > 0);

    let policies: Api<tortie::api::NetworkPolicy> = Api::namespaced(cp.client(), "default");
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "crd.projectcalico.org/v1", "kind": "NetworkPolicy",
                "metadata": {"namespace": "default", "name": "web-in"},
                "spec": {"selector": "app == 'web'", "types": ["Ingress"], "ingress": [
                    {"action": "Allow", "protocol": "TCP", "destination": {"ports": [8080]}}]}
            }))?,
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !chain("pi-np.default.web-in") {
        assert!(
            Instant::now() < deadline,
            "the policy never reached the table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Committed: from a second on, no echo.
    let late = tokio::task::spawn_blocking(move || {
        echoes_after(&mut s, Duration::from_secs(2), Duration::from_secs(1))
    })
    .await?;
    assert_eq!(late, 0, "the connection outlived the deny\n{}", d.log());
    Ok(())
}
