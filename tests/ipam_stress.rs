// Many allocators as separate OS processes (each its own API client and node name) filling
// one pool whose blocks run out, so claims race and late nodes must borrow: no address may be
// handed out twice, and blocks and handles must record each address exactly once.
// The child processes are this test binary re-run with `child_allocator` selected.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use support::ControlPlane;
use tortie::api::ipamblock::IPAMBlock;
use tortie::api::ipamhandle::IPAMHandle;
use tortie::api::{IPPool, IPPoolSpec};
use tortie::cni::handlers::ATTR_POD_UID;
use tortie::ipam::cidr::addr_at;
use tortie::ipam::gc::{self, Cluster, GcConfig, GcStatus};
use tortie::ipam::{AssignRequest, Ipam, pod_handle};

const NODES: usize = 20;
const PER_NODE: usize = 50;
const CHILD_ENV: &str = "TORTIE_IPAM_STRESS_NODE";
/// Optional: addresses per child (default PER_NODE) and a tag that keeps a restarted
/// child's handles distinct from those of the process it replaces.
const COUNT_ENV: &str = "TORTIE_IPAM_STRESS_COUNT";
const TAG_ENV: &str = "TORTIE_IPAM_STRESS_TAG";
/// Optional: a namespace in which the child creates one Pod per allocation first and records
/// its namespace, name and UID in the allocation, as the CNI does (what GC decides on).
const PODS_ENV: &str = "TORTIE_IPAM_STRESS_PODS";
const PODS_NS: &str = "stress";
const SYNC: Duration = Duration::from_secs(60);

/// In a child: allocate PER_NODE addresses concurrently as node `$TORTIE_IPAM_STRESS_NODE`
/// and print one `ALLOC <addr> <handle>` line each. In the parent run: nothing.
#[tokio::test]
#[ignore = "helper process, run by the stress tests in this file with --ignored"]
async fn child_allocator() -> anyhow::Result<()> {
    let Ok(node) = std::env::var(CHILD_ENV) else {
        anyhow::bail!("a helper process: the tests in this file run it with {CHILD_ENV} set");
    };
    let path = std::env::var("KUBECONFIG").context("KUBECONFIG")?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(config)?;
    let count: usize = std::env::var(COUNT_ENV).map_or(Ok(PER_NODE), |c| c.parse())?;
    let tag = std::env::var(TAG_ENV).unwrap_or_default();
    let pods_ns = std::env::var(PODS_ENV).ok();
    let ipam =
        std::sync::Arc::new(Ipam::start(client.clone(), &node, Duration::from_secs(60)).await?);
    println!("READY");
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let ipam = ipam.clone();
            let node = node.clone();
            let tag = tag.clone();
            let client = client.clone();
            let pods_ns = pods_ns.clone();
            tokio::spawn(async move {
                let name = format!("{node}{tag}-{i}");
                let handle = pod_handle(&name);
                let mut attrs = BTreeMap::from([("node".to_string(), node.clone())]);
                if let Some(ns) = &pods_ns {
                    let uid = match create_pod(&client, ns, &name, &node).await {
                        Ok(uid) => uid,
                        Err(e) => return (handle, Err(e)),
                    };
                    attrs.insert("namespace".into(), ns.clone());
                    attrs.insert("pod".into(), name.clone());
                    attrs.insert(ATTR_POD_UID.into(), uid);
                }
                let got = ipam
                    .auto_assign(&AssignRequest::workload(&handle, attrs))
                    .await
                    .map_err(anyhow::Error::from);
                (handle, got)
            })
        })
        .collect();
    for t in tasks {
        let (handle, got) = t.await?;
        let got = got.with_context(|| format!("{node}: {handle}"))?;
        println!("ALLOC {} {handle}", got[0].addr());
    }
    let s = ipam.stats();
    println!(
        "STATS {} {} {}",
        s.block_writes.load(std::sync::atomic::Ordering::Relaxed),
        s.cas_conflicts.load(std::sync::atomic::Ordering::Relaxed),
        s.ops_committed.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

/// Creates the Pod an allocation is for (bound to `node`) and returns its UID.
async fn create_pod(
    client: &kube::Client,
    ns: &str,
    name: &str,
    node: &str,
) -> anyhow::Result<String> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]},
    }))
    .expect("static pod manifest");
    let created = Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {ns}/{name}"))?;
    created.metadata.uid.context("created pod has no uid")
}

#[tokio::test]
async fn twenty_allocator_processes_never_hand_out_an_address_twice() -> anyhow::Result<()> {
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    // 16 blocks of 64 for 20 nodes: at least 4 nodes can claim nothing and must borrow.
    let spec = IPPoolSpec {
        cidr: "10.90.0.0/22".into(),
        block_size: Some(26),
        ..Default::default()
    };
    Api::<IPPool>::all(client.clone())
        .create(&PostParams::default(), &IPPool::new("stress", spec))
        .await?;
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let children: Vec<_> = (0..NODES)
        .map(|n| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "--ignored",
                    "child_allocator",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("stress-node-{n}"))
                .env("KUBECONFIG", cp.kubeconfig_path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("spawn allocator process")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut addrs: BTreeMap<IpAddr, String> = BTreeMap::new();
    let (mut writes, mut conflicts, mut ops) = (0u64, 0u64, 0u64);
    for child in children {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "allocator failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in stdout.lines() {
            // The test harness may print its "test child_allocator ..." on the same line.
            let start = line
                .find("ALLOC ")
                .or_else(|| line.find("STATS "))
                .unwrap_or(0);
            let f: Vec<&str> = line[start..].split_whitespace().collect();
            match f.as_slice() {
                ["ALLOC", addr, handle] => {
                    if let Some(prev) = addrs.insert(addr.parse()?, handle.to_string()) {
                        anyhow::bail!("{addr} handed to both {prev} and {handle}");
                    }
                }
                ["STATS", w, c, o] => {
                    writes += w.parse::<u64>()?;
                    conflicts += c.parse::<u64>()?;
                    ops += o.parse::<u64>()?;
                }
                _ => {}
            }
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(addrs.len(), NODES * PER_NODE);

    // The API server's records agree: each address once in a block, under its handle, and
    // each handle object counts one address.
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut recorded: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut borrowed = 0;
    for b in &blocks.items {
        let cidr: IpNet = b.spec.cidr.parse()?;
        for (ord, a) in b.spec.allocations.iter().enumerate() {
            let Some(idx) = a else { continue };
            let attr = &b.spec.attributes[*idx as usize];
            let handle = attr
                .handle_id
                .clone()
                .context("allocation without handle")?;
            let addr = addr_at(&cidr, ord).context("ordinal")?;
            anyhow::ensure!(
                recorded.insert(addr, handle).is_none(),
                "{addr} recorded twice"
            );
            let node = attr.secondary.as_ref().and_then(|s| s.get("node")).cloned();
            if node.map(|n| format!("host:{n}")) != b.spec.affinity {
                borrowed += 1;
            }
        }
    }
    assert_eq!(
        recorded, addrs,
        "blocks record exactly the addresses handed out"
    );
    let handles = Api::<IPAMHandle>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    assert_eq!(handles.items.len(), NODES * PER_NODE);
    assert!(
        handles
            .items
            .iter()
            .all(|h| h.spec.block.values().sum::<i64>() == 1)
    );
    assert!(
        borrowed > 0,
        "with more nodes than blocks some allocations must be borrowed"
    );
    let distinct: BTreeSet<_> = blocks.items.iter().map(|b| b.spec.cidr.clone()).collect();
    eprintln!(
        "{} addresses by {NODES} processes in {elapsed:?}: {} blocks, {borrowed} borrowed, \
         {writes} block writes for {ops} committed operations, {conflicts} CAS conflicts",
        addrs.len(),
        distinct.len()
    );

    // The operator's own consistency check agrees: no orphan, no count mismatch.
    let (structural, report) = structural_problems(&cp)?;
    assert_eq!(
        structural, 0,
        "tortie ipam check found problems after the stress run:\n{report}"
    );
    Ok(())
}

/// `tortie ipam check`: the number of problems other than "no pod or node uses the address"
/// (these allocators run without a CNI, so no pod reports its address, which calicoctl's
/// check and tortie's both report), and the text.
fn structural_problems(cp: &ControlPlane) -> anyhow::Result<(usize, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("report.json");
    let check = Command::new(env!("CARGO_BIN_EXE_tortie"))
        .args(["ipam", "check", "-o"])
        .arg(&path)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).with_context(|| text.clone())?)?;
    let n = report["problems"]
        .as_array()
        .context("problems")?
        .iter()
        .filter(|p| {
            let unused = p["kind"] == "allocationNotInUse"
                || (p["kind"] == "allocationWithoutPod"
                    && p["reason"] == "reports no address (yet)");
            !unused
        })
        .count();
    Ok((n, text))
}

fn spawn_child(
    cp: &ControlPlane,
    node: &str,
    count: usize,
    tag: &str,
    pods_ns: Option<&str>,
) -> anyhow::Result<std::process::Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    if let Some(ns) = pods_ns {
        cmd.env(PODS_ENV, ns);
    }
    cmd.args([
        "--exact",
        "--ignored",
        "child_allocator",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, node)
    .env(COUNT_ENV, count.to_string())
    .env(TAG_ENV, tag)
    .env("KUBECONFIG", cp.kubeconfig_path())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .context("spawn allocator process")
}

/// `ALLOC` lines a (possibly killed) child printed before it ended.
fn allocations_in(stdout: &str) -> anyhow::Result<Vec<(IpAddr, String)>> {
    let mut got = Vec::new();
    for line in stdout.lines() {
        let Some(start) = line.find("ALLOC ") else {
            continue;
        };
        if let [_, addr, handle] = line[start..].split_whitespace().collect::<Vec<_>>()[..] {
            got.push((addr.parse()?, handle.to_string()));
        }
    }
    Ok(got)
}

#[tokio::test]
async fn allocators_killed_mid_allocation_and_restarted_never_duplicate() -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    const COUNT: usize = 30;
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    cp.create_namespace(PODS_NS).await?;
    let spec = IPPoolSpec {
        cidr: "10.91.0.0/22".into(),
        block_size: Some(26),
        ..Default::default()
    };
    Api::<IPPool>::all(client.clone())
        .create(&PostParams::default(), &IPPool::new("crash", spec))
        .await?;
    let seed: u64 = rand::rng().random();
    eprintln!("kill schedule seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut first = Vec::new();
    for n in 0..NODES {
        first.push((
            format!("crash-node-{n}"),
            spawn_child(&cp, &format!("crash-node-{n}"), COUNT, "", Some(PODS_NS))?,
        ));
    }
    // Kill every other allocator with SIGKILL at a random moment after its IPAM has started,
    // i.e. while its allocations are in flight.
    let mut running: Vec<(String, Running)> = first
        .into_iter()
        .map(|(node, child)| (node, Running::new(child)))
        .collect();
    let mut killed = Vec::new();
    for i in (0..NODES).step_by(2) {
        let delay = Duration::from_millis(rng.random_range(0..600));
        let (node, child) = &mut running[i];
        child.wait_ready(Duration::from_secs(120))?;
        tokio::time::sleep(delay).await;
        child.child.kill().ok();
        killed.push(node.clone());
    }
    let mut outputs = Vec::new();
    for (_, child) in running {
        outputs.push(tokio::task::spawn_blocking(move || child.finish()));
    }
    let mut handed: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut record = |stdout: &str| -> anyhow::Result<usize> {
        let got = allocations_in(stdout)?;
        for (addr, handle) in &got {
            if let Some(prev) = handed.insert(*addr, handle.clone()) {
                anyhow::bail!("{addr} handed to both {prev} and {handle}");
            }
        }
        Ok(got.len())
    };
    let mut before_restart = 0;
    for o in outputs {
        before_restart += record(&o.await??)?;
    }
    // The killed nodes come back (same node names) and allocate again.
    let restarted: Vec<_> = killed
        .iter()
        .map(|node| spawn_child(&cp, node, COUNT, "-again", Some(PODS_NS)))
        .collect::<anyhow::Result<_>>()?;
    for child in restarted {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
        anyhow::ensure!(out.status.success(), "restarted allocator failed");
        assert_eq!(record(&String::from_utf8_lossy(&out.stdout))?, COUNT);
    }

    let recorded = recorded_allocations(&client).await?;
    for (addr, handle) in &handed {
        assert_eq!(
            recorded.get(addr),
            Some(handle),
            "{addr} handed out under {handle} but not recorded so"
        );
    }
    let leaked = recorded.len() - handed.len();
    eprintln!(
        "{} killed, {before_restart} addresses handed out before restart, {} in total, \
         {leaked} recorded but never handed out (left for GC), 0 duplicates",
        killed.len(),
        handed.len()
    );

    // The runtime gives up on the killed requests: their pods go away. With a short grace
    // the leader's GC must then release exactly the leaked addresses and nothing handed out.
    let handed_handles: BTreeSet<&String> = handed.values().collect();
    let pods_api = Api::<Pod>::namespaced(client.clone(), PODS_NS);
    for pod in pods_api.list(&ListParams::default()).await? {
        let name = pod.metadata.name.clone().context("pod name")?;
        if !handed_handles.contains(&pod_handle(&name)) {
            // No kubelet confirms a graceful deletion here: remove it at once.
            let now = kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            };
            pods_api.delete(&name, &now).await?;
        }
    }
    let (pods, pod_watch) = gc::watch_pods(client.clone());
    let (nodes, node_watch) = gc::watch_nodes(client.clone());
    let ipam = std::sync::Arc::new(Ipam::start(client.clone(), "gc-node", SYNC).await?);
    let (_leader, is_leader) = tokio::sync::watch::channel(true);
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let job = tokio::spawn(gc::run(
        ipam,
        Cluster {
            client: client.clone(),
            pods,
            nodes,
        },
        is_leader,
        GcConfig::with_grace(Duration::from_secs(2)),
        GcStatus::default(),
        shutdown,
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    let remaining = loop {
        let now = recorded_allocations(&client).await?;
        if now.len() == handed.len() || Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        remaining, handed,
        "after GC every recorded address is one that was handed out (zero leaked)"
    );
    // A kill between the handle write and the block PUT leaves a handle without
    // allocations; the GC deletes those a grace period after first seeing them, and then
    // the operator's check finds nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (structural, report) = loop {
        let (n, report) = structural_problems(&cp)?;
        if n == 0 || Instant::now() > deadline {
            break (n, report);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    job.abort();
    pod_watch.abort();
    node_watch.abort();
    assert_eq!(structural, 0, "{report}");
    eprintln!("GC released all {leaked} leaked addresses; 0 remain");
    Ok(())
}

/// A child allocator whose stdout is read while it runs, so a kill can be timed after its
/// start-up (the `READY` line) instead of guessed.
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn new(mut child: std::process::Child) -> Running {
        use std::io::BufRead;
        let (tx, lines) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .context("allocator never reported READY")?;
            let ready = line.contains("READY");
            self.seen.push(line);
            if ready {
                return Ok(());
            }
        }
    }

    /// Waits for the exit and returns everything it printed.
    fn finish(mut self) -> anyhow::Result<String> {
        self.child.wait()?;
        self.seen.extend(self.lines.iter());
        Ok(self.seen.join("\n"))
    }
}

/// Every allocation recorded in any block: address → handle.
async fn recorded_allocations(client: &kube::Client) -> anyhow::Result<BTreeMap<IpAddr, String>> {
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut recorded = BTreeMap::new();
    for b in &blocks.items {
        let cidr: IpNet = b.spec.cidr.parse()?;
        for (ord, a) in b.spec.allocations.iter().enumerate() {
            let Some(idx) = a else { continue };
            let attr = &b.spec.attributes[*idx as usize];
            if attr.released_at.is_some() {
                continue; // released, cooling down before reuse
            }
            let handle = attr
                .handle_id
                .clone()
                .context("allocation without handle")?;
            let addr = addr_at(&cidr, ord).context("ordinal")?;
            anyhow::ensure!(
                recorded.insert(addr, handle).is_none(),
                "{addr} recorded twice"
            );
        }
    }
    Ok(recorded)
}
