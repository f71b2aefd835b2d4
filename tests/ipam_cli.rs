// `tortie ipam show | check | release` run as the real binary against the real control plane,
// over a state three allocators (separate clients and node names) built: one node fills most
// of a small pool, a second claims the last block, a third has to borrow.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;
use support::pods::create_pod_uid as create_pod;

use anyhow::Context;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::Value;
use support::ControlPlane;
use tortie::api::blockaffinity::{AffinityState, BlockAffinity, BlockAffinitySpec};
use tortie::api::ipamhandle::{IPAMHandle, handle_object_name};
use tortie::ipam::{AssignRequest, Ipam, pod_handle};

const SYNC: Duration = Duration::from_secs(30);
const V4_POOL: &str = "10.30.0.0/26";
const V6_POOL: &str = "fd30::/120";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn tortie(cp: &ControlPlane, args: &[&str]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_tortie"))
        .arg("ipam")
        .args(args)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .output()
        .expect("run tortie");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "$ tortie ipam {}\n{}{}[exit {}]",
        args.join(" "),
        run.stdout,
        run.stderr,
        run.code
    );
    run
}

use support::pools::create_pool;

async fn delete_pod(client: &Client, name: &str) -> anyhow::Result<()> {
    Api::<Pod>::namespaced(client.clone(), "default")
        .delete(name, &DeleteParams::default().grace_period(0))
        .await
        .with_context(|| format!("delete pod {name}"))?;
    Ok(())
}

/// Allocates for `pods` on `node` (pod objects created first, UIDs recorded), `parallel` at a
/// time; the first `dual` pods also get an IPv6 address. Returns pod → addresses.
async fn allocate(
    client: &Client,
    ipam: &Arc<Ipam>,
    pods: &[String],
    dual: usize,
    parallel: usize,
) -> anyhow::Result<BTreeMap<String, Vec<IpAddr>>> {
    let mut out = BTreeMap::new();
    for (chunk_no, chunk) in pods.chunks(parallel).enumerate() {
        let mut tasks = Vec::new();
        for (i, pod) in chunk.iter().enumerate() {
            let uid = create_pod(client, pod, ipam.node()).await?;
            let attrs = BTreeMap::from([
                ("node".to_string(), ipam.node().to_string()),
                ("namespace".to_string(), "default".to_string()),
                ("pod".to_string(), pod.clone()),
                ("pod-uid".to_string(), uid),
            ]);
            let req = AssignRequest {
                v6: chunk_no * parallel + i < dual,
                ..AssignRequest::workload(pod_handle(&format!("c-{pod}")), attrs)
            };
            let ipam = ipam.clone();
            let pod = pod.clone();
            tasks.push(tokio::spawn(
                async move { (pod, ipam.auto_assign(&req).await) },
            ));
        }
        for t in tasks {
            let (pod, got) = t.await?;
            let got = got.with_context(|| format!("allocate for {pod}"))?;
            report_ips(client, &pod, &got).await?;
            out.insert(pod, got.iter().map(IpNet::addr).collect());
        }
    }
    Ok(out)
}

/// Writes the pod's addresses into Calico's podIP annotations, as the CNI does after ADD
/// (calicoctl's and tortie's `ipam check` count an address in use when its pod reports it).
async fn report_ips(client: &Client, pod: &str, ips: &[IpNet]) -> anyhow::Result<()> {
    let all: Vec<String> = ips.iter().map(ToString::to_string).collect();
    let patch = serde_json::json!({"metadata": {"annotations": {
        "cni.projectcalico.org/podIP": all.first().cloned().unwrap_or_default(),
        "cni.projectcalico.org/podIPs": all.join(","),
    }}});
    Api::<Pod>::namespaced(client.clone(), "default")
        .patch(
            pod,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("annotate pod {pod}"))?;
    Ok(())
}

/// Cells of the first table row whose CIDR column is `cidr`.
fn row<'a>(table: &'a str, cidr: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
        .find(|cells| cells.get(2) == Some(&cidr))
        .unwrap_or_else(|| panic!("no row for {cidr} in\n{table}"))
}

fn names(pods: std::ops::Range<usize>, prefix: &str) -> Vec<String> {
    pods.map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test]
async fn show_check_and_release_tell_the_truth_about_a_multi_node_state() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client();
    for n in ["node-1", "node-2", "node-3"] {
        cp.create_node(n, &[]).await?;
    }
    // 4 blocks of 16: node-1 fills 2.5 blocks, node-2 claims the last, node-3 must borrow.
    create_pool(&client, "pool-v4", V4_POOL, 28).await?;
    create_pool(&client, "pool-v6", V6_POOL, 124).await?;

    let ipam1 = Arc::new(Ipam::start(client.clone(), "node-1", SYNC).await?);
    let mut held = allocate(&client, &ipam1, &names(0..40, "web"), 2, 8).await?;
    let ipam2 = Arc::new(Ipam::start(cp.client(), "node-2", SYNC).await?);
    held.extend(allocate(&cp.client(), &ipam2, &names(0..3, "db"), 0, 3).await?);
    let ipam3 = Arc::new(Ipam::start(cp.client(), "node-3", SYNC).await?);
    held.extend(allocate(&cp.client(), &ipam3, &names(0..2, "late"), 0, 2).await?);
    assert_eq!(held.values().map(Vec::len).sum::<usize>(), 47);

    // ---- show: exact totals for both families --------------------------------------------
    let show = tortie(&cp, &["show"]);
    assert_eq!(show.code, 0, "{}", show.stderr);
    assert!(show.stdout.contains("| GROUPING "), "{}", show.stdout);
    assert_eq!(
        row(&show.stdout, V4_POOL)[1..6],
        ["IP Pool", V4_POOL, "64", "45 (70%)", "19 (30%)"]
    );
    assert_eq!(
        row(&show.stdout, V6_POOL)[1..6],
        ["IP Pool", V6_POOL, "256", "2 (1%)", "254 (99%)"]
    );

    let json: Value =
        serde_json::from_str(&tortie(&cp, &["show", "--show-blocks", "-o", "json"]).stdout)?;
    let v4 = &json["pools"][0];
    assert_eq!(
        (
            v4["name"].as_str(),
            v4["total"].as_u64(),
            v4["inUse"].as_u64()
        ),
        (Some("pool-v4"), Some(64), Some(45))
    );
    let blocks = v4["blocks"].as_array().context("blocks")?;
    assert_eq!(blocks.len(), 4, "{blocks:?}");
    let per_node = |n: &str| -> u64 {
        blocks
            .iter()
            .filter(|b| b["node"] == n)
            .map(|b| b["inUse"].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(blocks.iter().filter(|b| b["node"] == "node-1").count(), 3);
    assert_eq!(blocks.iter().filter(|b| b["node"] == "node-2").count(), 1);
    assert_eq!(per_node("node-1") + per_node("node-2"), 45);

    let text_blocks = tortie(&cp, &["show", "--show-blocks"]);
    assert_eq!(
        text_blocks.stdout.matches("Block (node-1)").count(),
        4,
        "three IPv4 blocks and one IPv6 block:\n{}",
        text_blocks.stdout
    );
    assert_eq!(text_blocks.stdout.matches("Block (node-2)").count(), 1);

    let borrowed = tortie(&cp, &["show", "--show-borrowed"]);
    assert!(borrowed.stdout.contains("BORROWING-NODE"));
    for late in ["late-0", "late-1"] {
        let ip = held[late][0].to_string();
        let line = borrowed
            .stdout
            .lines()
            .find(|l| l.contains(&format!(" {ip} ")))
            .unwrap_or_else(|| panic!("{ip} not listed as borrowed:\n{}", borrowed.stdout));
        assert!(
            line.contains("node-3") && line.contains(&format!("default/{late}")),
            "{line}"
        );
    }
    assert_eq!(
        borrowed.stdout.matches("node-3").count(),
        2,
        "{}",
        borrowed.stdout
    );

    // ---- show --ip: held, free, outside every pool ------------------------------------------
    let web5 = held["web-5"][0];
    let info = tortie(&cp, &["show", "--ip", &web5.to_string()]);
    assert!(
        info.stdout.contains(&format!("IP {web5} is in use")),
        "{}",
        info.stdout
    );
    assert!(info.stdout.contains("Handle ID: k8s-pod-network.c-web-5"));
    assert!(info.stdout.contains("Pod: default/web-5"));
    assert!(info.stdout.contains("Node: node-1"));
    let v6 = held["web-0"][1];
    let v6_block: IpNet = IpNet::new(v6, 124)?.trunc();
    let free_v6: IpAddr = v6_block.hosts().nth(10).context("address in block")?;
    let info = tortie(&cp, &["show", "--ip", &free_v6.to_string()]);
    assert!(
        info.stdout.contains(&format!(
            "IP {free_v6} is not allocated (pool pool-v6, block {v6_block})"
        )),
        "{}",
        info.stdout
    );
    let info = tortie(&cp, &["show", "--ip", "192.0.2.1"]);
    assert!(
        info.stdout.contains("IP 192.0.2.1 is not in any pool"),
        "{}",
        info.stdout
    );
    let info: Value = serde_json::from_str(
        &tortie(&cp, &["show", "--ip", &web5.to_string(), "-o", "json"]).stdout,
    )?;
    assert_eq!(info["status"], "inUse");
    assert_eq!(info["pod"], "web-5");

    // ---- check: a consistent state -------------------------------------------------------
    let check = tortie(&cp, &["check"]);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    assert!(check.stdout.contains("IPAM blocks record 47 allocations."));
    assert!(check.stdout.contains("Check complete; found 0 problems."));

    // ---- release ---------------------------------------------------------------------------
    let refused = tortie(&cp, &["release", "--ip", &web5.to_string()]);
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains("pod default/web-5 still exists"),
        "{}",
        refused.stderr
    );
    assert!(
        tortie(&cp, &["show", "--ip", &web5.to_string()])
            .stdout
            .contains("is in use")
    );
    let forced = tortie(&cp, &["release", "--ip", &web5.to_string(), "--force"]);
    assert_eq!(forced.code, 0, "{}", forced.stderr);
    assert!(forced.stdout.contains(&format!(
        "Released IP {web5} (handle k8s-pod-network.c-web-5"
    )));
    assert!(
        tortie(&cp, &["show", "--ip", &web5.to_string()])
            .stdout
            .contains("is not allocated")
    );
    let handles = Api::<IPAMHandle>::all(client.clone());
    assert!(
        handles
            .get_opt(&handle_object_name(&pod_handle("c-web-5")))
            .await?
            .is_none(),
        "last address gone: handle deleted"
    );
    // The pod still reports the address it no longer holds: both checks name that.
    let check = tortie(&cp, &["check"]);
    assert!(
        check.stdout.contains(&format!(
            "IP {web5} is used by pod default/web-5 but IPAM has no allocation for it"
        )),
        "{}",
        check.stdout
    );
    delete_pod(&client, "web-5").await?;

    // A dual-stack pod whose pod is gone: releasing its IPv4 address keeps the handle for IPv6.
    delete_pod(&client, "web-0").await?;
    let web0_v4 = held["web-0"][0];
    let released = tortie(&cp, &["release", "--ip", &web0_v4.to_string()]);
    assert_eq!(released.code, 0, "{}", released.stderr);
    let h = handles
        .get(&handle_object_name(&pod_handle("c-web-0")))
        .await?;
    assert_eq!(h.spec.block, BTreeMap::from([(v6_block.to_string(), 1)]));
    let again = tortie(&cp, &["release", "--ip", &web0_v4.to_string()]);
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.contains("is not allocated"),
        "{}",
        again.stderr
    );
    // web-0 still holds its IPv6 address with no pod: the one problem left, then released.
    let check = tortie(&cp, &["check"]);
    assert_eq!(check.code, 1);
    assert!(check.stdout.contains(&format!("IP {v6} (handle k8s-pod-network.c-web-0, node node-1) is allocated to pod default/web-0, which does not exist")), "{}", check.stdout);
    assert!(check.stdout.contains("found 1 problems"));
    assert_eq!(tortie(&cp, &["release", "--ip", &v6.to_string()]).code, 0);
    assert!(
        handles
            .get_opt(&handle_object_name(&pod_handle("c-web-0")))
            .await?
            .is_none()
    );
    let check = tortie(&cp, &["check"]);
    assert_eq!(check.code, 0, "{}", check.stdout);
    assert!(check.stdout.contains("IPAM blocks record 44 allocations."));

    // Two addresses of one handle in one block: releasing one leaves the other and a count of 1.
    let multi = pod_handle("c-multi");
    let gone_pod = BTreeMap::from([
        ("node".to_string(), "node-2".to_string()),
        ("namespace".to_string(), "default".to_string()),
        ("pod".to_string(), "never-created".to_string()),
    ]);
    let (m1, m2): (IpAddr, IpAddr) = ("10.30.0.60".parse()?, "10.30.0.61".parse()?);
    for a in [m1, m2] {
        ipam2
            .assign_ip(
                a,
                &multi,
                gone_pod.clone(),
                tortie::api::AllowedUse::Workload,
            )
            .await?;
    }
    let block_of_m = "10.30.0.48/28".to_string();
    let h = handles.get(&handle_object_name(&multi)).await?;
    assert_eq!(h.spec.block, BTreeMap::from([(block_of_m.clone(), 2)]));
    assert_eq!(tortie(&cp, &["release", "--ip", &m1.to_string()]).code, 0);
    let h = handles.get(&handle_object_name(&multi)).await?;
    assert_eq!(h.spec.block, BTreeMap::from([(block_of_m, 1)]));
    assert!(
        tortie(&cp, &["show", "--ip", &m2.to_string()])
            .stdout
            .contains("Handle ID: k8s-pod-network.c-multi")
    );
    let check = tortie(&cp, &["check"]);
    assert!(
        check.stdout.contains("found 1 problems"),
        "{}",
        check.stdout
    );
    assert!(
        check
            .stdout
            .contains("default/never-created, which does not exist")
    );
    assert_eq!(tortie(&cp, &["release", "--ip", &m2.to_string()]).code, 0);
    assert!(
        handles
            .get_opt(&handle_object_name(&multi))
            .await?
            .is_none()
    );
    assert_eq!(tortie(&cp, &["check"]).code, 0);

    // ---- check: deliberate corruption, each problem named ------------------------------------
    handles
        .delete(
            &handle_object_name(&pod_handle("c-web-7")),
            &DeleteParams::default(),
        )
        .await?;
    let mut h9 = handles
        .get(&handle_object_name(&pod_handle("c-web-9")))
        .await?;
    for n in h9.spec.block.values_mut() {
        *n = 5;
    }
    handles
        .replace(&h9.name_any(), &PostParams::default(), &h9)
        .await?;
    let mut orphan = BlockAffinitySpec {
        state: AffinityState::Confirmed,
        node: "node-9".into(),
        cidr: "10.30.0.0/28".into(),
        ..Default::default()
    };
    orphan.set_deleted(false);
    Api::<BlockAffinity>::all(client.clone())
        .create(
            &PostParams::default(),
            &BlockAffinity::new("node-9-10-30-0-0-28", orphan),
        )
        .await?;
    delete_pod(&client, "web-8").await?;

    let dir = tempfile::tempdir()?;
    let report_path = dir.path().join("report.json");
    let check = tortie(
        &cp,
        &["check", "-o", report_path.to_str().context("utf-8 path")?],
    );
    assert_eq!(check.code, 1);
    let web7 = held["web-7"][0];
    let web8 = held["web-8"][0];
    for want in [
        format!("handle k8s-pod-network.c-web-7 holds [{web7}] in blocks but has no IPAMHandle object"),
        "IPAMHandle k8s-pod-network.c-web-9 records 5 address(es) in block".to_string(),
        "BlockAffinity node-9-10-30-0-0-28 (node node-9, 10.30.0.0/28, state confirmed) has no matching IPAM block".to_string(),
        format!("IP {web8} (handle k8s-pod-network.c-web-8, node node-1) is allocated to pod default/web-8, which does not exist"),
        "Check complete; found 4 problems.".to_string(),
    ] {
        assert!(check.stdout.contains(&want), "missing {want:?} in\n{}", check.stdout);
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path)?)?;
    let kinds: Vec<&str> = report["problems"]
        .as_array()
        .context("problems")?
        .iter()
        .filter_map(|p| p["kind"].as_str())
        .collect();
    assert_eq!(
        kinds
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        [
            "affinityWithoutBlock",
            "allocationWithoutHandle",
            "allocationWithoutPod",
            "handleCountMismatch"
        ]
        .into()
    );
    assert_eq!(report["allocations"], 44);

    // The pod-less web-8 allocation is released without --force; the problem goes with it.
    assert_eq!(tortie(&cp, &["release", "--ip", &web8.to_string()]).code, 0);
    let check = tortie(&cp, &["check"]);
    assert!(
        check.stdout.contains("found 3 problems"),
        "{}",
        check.stdout
    );
    assert!(!check.stdout.contains("web-8"), "{}", check.stdout);
    Ok(())
}

#[tokio::test]
async fn unreachable_api_server_is_exit_code_2_with_a_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("missing-kubeconfig");
    let out = Command::new(env!("CARGO_BIN_EXE_tortie"))
        .args(["ipam", "check", "--kubeconfig"])
        .arg(&path)
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing-kubeconfig"), "{stderr}");
    Ok(())
}

const CHILD_ENV: &str = "TORTIE_IPAM_CLI_CHILD_NODE";
const CHILD_COUNT: usize = 40;

/// In a child process: allocate CHILD_COUNT addresses concurrently as node
/// `$TORTIE_IPAM_CLI_CHILD_NODE` (no pod attributes, like a tunnel or a bare allocation).
/// In the parent run: nothing.
#[tokio::test]
#[ignore = "helper process, run by the CLI tests in this file with --ignored"]
async fn child_allocator() -> anyhow::Result<()> {
    let Ok(node) = std::env::var(CHILD_ENV) else {
        anyhow::bail!("a helper process: the tests in this file run it with {CHILD_ENV} set");
    };
    let path = std::env::var("KUBECONFIG").context("KUBECONFIG")?;
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&path)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let ipam = Arc::new(Ipam::start(Client::try_from(config)?, &node, SYNC).await?);
    let tasks: Vec<_> = (0..CHILD_COUNT)
        .map(|i| {
            let ipam = ipam.clone();
            let attrs = BTreeMap::from([("node".to_string(), node.clone())]);
            let handle = pod_handle(&format!("{node}-{i}"));
            tokio::spawn(async move {
                ipam.auto_assign(&AssignRequest::workload(handle, attrs))
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::test]
async fn check_is_clean_and_show_exact_after_concurrent_allocator_processes() -> anyhow::Result<()>
{
    if std::env::var(CHILD_ENV).is_ok() {
        return Ok(());
    }
    const NODES: usize = 6;
    let cp = ControlPlane::start().await?;
    // 16 blocks of 16 for 6 × 40 = 240 addresses: blocks run out, late nodes borrow.
    create_pool(&cp.client(), "shared", "10.40.0.0/24", 28).await?;
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..NODES)
        .map(|n| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "--ignored",
                    "child_allocator",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("node-{n}"))
                .env("KUBECONFIG", cp.kubeconfig_path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("spawn allocator process")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut outputs = Vec::new();
    for child in children {
        outputs.push(tokio::task::spawn_blocking(move || child.wait_with_output()).await??);
    }
    for out in &outputs {
        anyhow::ensure!(
            out.status.success(),
            "allocator failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let show = tortie(&cp, &["show"]);
    assert_eq!(
        row(&show.stdout, "10.40.0.0/24")[3..6],
        ["256", "240 (94%)", "16 (6%)"]
    );
    // 16 blocks for 6 nodes: some node owns at most 2 (32 addresses) and had to borrow.
    let json: Value =
        serde_json::from_str(&tortie(&cp, &["show", "--show-borrowed", "-o", "json"]).stdout)?;
    let borrowed = json["borrowed"].as_array().context("borrowed")?;
    assert!(!borrowed.is_empty(), "{json}");
    // Consistent: every allocation has its handle object and its own address. No pod or
    // node uses these bare allocations, which calicoctl's check (and so tortie's) reports
    // as "allocated but not in use", and nothing else.
    let dir = tempfile::tempdir()?;
    let report_path = dir.path().join("report.json");
    let check = tortie(
        &cp,
        &["check", "-o", report_path.to_str().context("utf-8 path")?],
    );
    assert!(check.stdout.contains("IPAM blocks record 240 allocations."));
    assert!(
        check.stdout.contains("Found 240 IPAM handles"),
        "{}",
        check.stdout
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path)?)?;
    let problems = report["problems"].as_array().context("problems")?;
    assert_eq!(problems.len(), 240, "{}", check.stdout);
    assert!(
        problems.iter().all(|p| p["kind"] == "allocationNotInUse"),
        "{}",
        check.stdout
    );
    Ok(())
}
