// Benchmark (not a test): network policy at scale. 5,000 endpoints (pods of 100 namespaces
// on 50 simulated nodes, 100 of them on this node) and 1,000 Kubernetes NetworkPolicies
// (10 per namespace, about 1,000 distinct rule selectors), as objects in memory.
//
// Part 1 (no root): the incremental `PolicyCalc` beside the full rebuild it replaces (model +
// compile from scratch on every change, the previous daemon path) in the same run: cold
// start, one pod label change (time, touched sets and chains), one policy change, one new
// local pod.
// Part 2 (root, real nft in a test netns; skipped without root): the table loaded into a
// node namespace with two plumbed local pods; the pod label change's nft transaction (size,
// apply time); policy write → a real TCP probe between the two pods flips (p50/p99, the
// calculation and nft only: no API server or watch in the path); a new local pod's chains
// committed (what a CNI ADD waits for) with 1,000 policies vs none; new TCP connections per
// second and iperf3 throughput between the two pods with the policy table vs none.
//
//   scripts/bench/policy.sh                 # release build, full size, prints ratios
//   POLICY_BENCH_FLIPS=40 POLICY_BENCH_LABELS=400   # sizes
// Without `--bench` (cargo test --all-targets) it does a small smoke run.

#[path = "../tests/nodes/mod.rs"]
mod nodes;
#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use support::NetNs;
use support::netns::plumb_pod;
use tortie::calc::policy::{LocalOverride, PolicyCalc, PolicySnapshot, policy_plan};
use tortie::cni::plumbing::host_veth_name;
use tortie::dataplane::nft::{Driver, Outcome, Runner};
use tortie::desired::nft::Table;
use tortie::policy::cluster::ClusterObjects;
use tortie::policy::compile::CompileOptions;

const NODE: &str = "n0";

struct Size {
    namespaces: usize,
    pods_per_ns: usize,
    nodes: usize,
    policies_per_ns: usize,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ns_name(i: usize) -> String {
    format!("ns{i}")
}

fn pod_ip(ns: usize, j: usize) -> String {
    format!("10.{}.{}.{}", 64 + ns / 200, ns % 200, j + 1)
}

fn pod(ns: usize, j: usize, app: usize, nodes: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"namespace": ns_name(ns), "name": format!("p{j}"),
            "labels": {"app": format!("a{app}"), "ver": format!("v{}", j % 3)}},
        "spec": {"nodeName": format!("n{}", j % nodes), "containers": [{"name": "c", "image": "pause",
            "ports": [{"name": "web", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": pod_ip(ns, j), "podIPs": [{"ip": pod_ip(ns, j)}]}
    }))
    .expect("pod")
}

/// Policy `pol{k}` of a namespace: selects app a{k}; allows TCP 80 and the named port `web`
/// from app a{k+1} of the namespace or from namespaces of team `team`; every third one also
/// limits egress.
fn policy(ns: usize, k: usize, team: &str) -> NetworkPolicy {
    let mut spec = json!({
        "podSelector": {"matchLabels": {"app": format!("a{}", k % 10)}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"app": format!("a{}", (k + 1) % 10)}}},
            {"namespaceSelector": {"matchLabels": {"team": team}}}],
            "ports": [{"port": 80, "protocol": "TCP"}, {"port": "web"}]}]
    });
    if k % 3 == 1 {
        spec["policyTypes"] = json!(["Ingress", "Egress"]);
        spec["egress"] = json!([{"to": [{"podSelector": {"matchLabels": {"app": format!("a{}", (k + 2) % 10)}}}],
            "ports": [{"port": 53, "protocol": "UDP"}]}]);
    }
    serde_json::from_value(json!({
        "metadata": {"namespace": ns_name(ns), "name": format!("pol{k}")},
        "spec": spec
    }))
    .expect("policy")
}

fn cluster(s: &Size) -> ClusterObjects {
    let mut c = ClusterObjects::default();
    for i in 0..s.namespaces {
        c.namespaces.push(
            serde_json::from_value::<Namespace>(json!({"metadata": {"name": ns_name(i),
                "labels": {"team": format!("t{}", i % 10)}}}))
            .expect("namespace"),
        );
        for j in 0..s.pods_per_ns {
            c.pods.push(pod(i, j, j % 10, s.nodes));
        }
        for k in 0..s.policies_per_ns {
            c.k8s_policies
                .push(policy(i, k, &format!("t{}", (i + k) % 10)));
        }
    }
    c
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rules(t: &Table) -> usize {
    t.chains.values().map(|c| c.rules.len()).sum()
}

fn elements(t: &Table) -> usize {
    t.sets.values().map(|s| s.elements.len()).sum()
}

/// Counts the statements and elements of an nft transaction script.
fn script_size(script: &str) -> (usize, usize, usize) {
    let mut element_stmts = 0;
    let mut elements = 0;
    let mut chain_stmts = 0;
    for line in script.lines() {
        if line.starts_with("add element") || line.starts_with("delete element") {
            element_stmts += 1;
            elements += line.matches(',').count() + 1;
        } else if !line.trim().is_empty() {
            chain_stmts += 1;
        }
    }
    (element_stmts, elements, chain_stmts)
}

fn replace_pod(snap: &mut PolicySnapshot, ns: usize, j: usize, app: usize, nodes: usize) {
    let name = (ns_name(ns), format!("p{j}"));
    for p in &mut snap.pods {
        if p.metadata.namespace.as_deref() == Some(name.0.as_str())
            && p.metadata.name.as_deref() == Some(name.1.as_str())
        {
            *p = Arc::new(tortie::datastore::pods::CachedPod::from_pod(&pod(
                ns, j, app, nodes,
            )));
        }
    }
}

fn replace_policy(snap: &mut PolicySnapshot, ns: usize, k: usize, team: &str) {
    let want = (ns_name(ns), format!("pol{k}"));
    for p in &mut snap.k8s_policies {
        if p.metadata.namespace.as_deref() == Some(want.0.as_str())
            && p.metadata.name.as_deref() == Some(want.1.as_str())
        {
            *p = Arc::new(policy(ns, k, team));
        }
    }
}

struct Calculated {
    calc: PolicyCalc,
    snap: PolicySnapshot,
}

/// Part 1: the calculation alone.
fn part1(size: &Size, label_iters: usize, full_iters: usize) -> Calculated {
    let opts = CompileOptions::default();
    let objects = cluster(size);
    println!(
        "view: {} endpoints ({} namespaces × {} pods on {} nodes), {} policies",
        objects.pods.len(),
        size.namespaces,
        size.pods_per_ns,
        size.nodes,
        objects.k8s_policies.len()
    );
    let snap = PolicySnapshot::from_objects(&objects);

    let rss0 = rss_kib();
    let t = Instant::now();
    let mut calc = PolicyCalc::new(NODE, &opts);
    calc.sync(&snap);
    let cold = t.elapsed();
    let rss1 = rss_kib();
    calc.take_touched();
    let table = calc.table().clone();
    println!(
        "table: {} chains, {} rules, {} sets, {} elements; {} local endpoints",
        table.chains.len(),
        rules(&table),
        table.sets.len(),
        elements(&table),
        calc.state().local_count()
    );

    // The peer: the whole model and table from scratch, as every change did before.
    let mut full = Vec::new();
    for _ in 0..full_iters {
        let t = Instant::now();
        let plan = policy_plan(&objects, NODE, &opts);
        full.push(t.elapsed());
        assert!(
            plan.table == table,
            "the full compile and the calculator differ"
        );
    }
    let (full_p50, _) = summary(full);
    println!(
        "cold start (calculation): PolicyCalc {:.0} ms, full compile {:.0} ms; calculator RSS +{} MiB",
        ms(cold),
        ms(full_p50),
        rss1.saturating_sub(rss0) / 1024
    );

    // One remote pod's label changes back and forth (app a3 <-> a5), then a local one.
    let mut snap = snap;
    let mut times = Vec::new();
    let mut worst_chains = 0;
    let mut sets_touched = 0;
    for i in 0..label_iters {
        // p1 (app a1, remote) is in the rule selector of its namespace's pol0, which selects
        // the local p0: it leaves that set (a2) and comes back. Every fourth change is the
        // local p0's own (its chains change: it leaves pol0).
        let (ns, j) = (
            2 + i % (size.namespaces - 2),
            if i % 4 == 3 { 0 } else { 1 },
        );
        let app = if (i / (size.namespaces - 2)).is_multiple_of(2) {
            2
        } else {
            j
        };
        replace_pod(&mut snap, ns, j, app, size.nodes);
        let t = Instant::now();
        calc.sync(&snap);
        let touched = calc.take_touched();
        times.push(t.elapsed());
        if j != 0 {
            worst_chains = worst_chains.max(touched.chains.len());
            sets_touched = sets_touched.max(touched.sets.len());
        }
    }
    let (p50, p99) = summary(times);
    println!(
        "pod label change: p50 {:.3} ms p99 {:.3} ms (full rebuild {:.0} ms: ×{:.0}); remote pod: \
         ≤{} sets, {} chains touched",
        ms(p50),
        ms(p99),
        ms(full_p50),
        ms(full_p50) / ms(p50).max(1e-6),
        sets_touched,
        worst_chains
    );

    // One policy's peer namespace changes.
    let mut times = Vec::new();
    let mut chains = Vec::new();
    for i in 0..label_iters.min(100) {
        let team = format!("t{}", i % 10);
        replace_policy(&mut snap, 2 + i % (size.namespaces - 2), 0, &team);
        let t = Instant::now();
        calc.sync(&snap);
        let touched = calc.take_touched();
        times.push(t.elapsed());
        chains.push(touched.chains.len());
    }
    let (p50, p99) = summary(times);
    println!(
        "policy change: p50 {:.3} ms p99 {:.3} ms; chains touched per change: max {}",
        ms(p50),
        ms(p99),
        chains.iter().max().copied().unwrap_or(0)
    );
    Calculated { calc, snap }
}

/// A TCP server in a netns answering every connection with one byte.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &NetNs, ip: &str, port: u16) -> Result<Server> {
        let bind = format!("{ip}:{port}");
        let listener = ns.run(move || TcpListener::bind(bind))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let _ = std::io::Write::write_all(&mut c, b"!");
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        Ok(Server {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection from the client namespace; true if the server answered in `timeout`.
fn probe(client: &NetNs, to: SocketAddr, timeout: Duration) -> bool {
    client
        .run(move || {
            TcpStream::connect_timeout(&to, timeout)
                .and_then(|mut s| {
                    s.set_read_timeout(Some(timeout))?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b)
                })
                .is_ok()
        })
        .unwrap_or(false)
}

/// New connections per second from `client` to `to` for `dur`.
fn connection_rate(client: &NetNs, to: SocketAddr, dur: Duration) -> Result<f64> {
    client.run(move || {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < dur {
            if let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() {
                    n += 1;
                }
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

fn iperf(client: &NetNs, server: &NetNs, ip: &str, secs: u32) -> Result<f64> {
    // Port 8080 is the server's named port `web`, which its policy admits.
    let _srv = server.spawn(&[
        "iperf3",
        "-s",
        "-1",
        "-p",
        "8080",
        "-B",
        ip,
        "--logfile",
        "/dev/null",
    ])?;
    std::thread::sleep(Duration::from_millis(300));
    let out = client.exec_ok(&[
        "iperf3",
        "-c",
        ip,
        "-p",
        "8080",
        "-t",
        &secs.to_string(),
        "-J",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 printed no received rate")
}

/// Loads `table` through a fresh driver inside `node`.
fn load(node: &NetNs, driver: Driver, table: Table) -> Result<Driver> {
    node.run(move || {
        let mut d = driver;
        d.reconcile(&table).map(|_| d)
    })?
    .context("load the policy table")
}

/// Part 2: real nft and real packets in test namespaces.
fn part2(size: &Size, mut c: Calculated, flips: usize, smoke: bool) -> Result<()> {
    let node = NetNs::new("polscale-node")?;
    node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    // Proxy ARP answers for the pods' 169.254.1.1 gateway only with a route to it: a
    // default route into a second test namespace (nothing leaves the sandbox).
    let uplink = NetNs::new("polscale-up")?;
    support::veth_pair(&node, "up0", &uplink, "eth0")?;
    node.exec_ok(&["ip", "addr", "add", "198.18.0.1/24", "dev", "up0"])?;
    node.exec_ok(&["ip", "route", "add", "default", "via", "198.18.0.2"])?;
    // The probe pods: ns0/p0 (client, app a0) and ns1/p0 (server, app a0); both run here.
    // ns1/pol0 selects the server and admits ns0 while ns0's team is its peer team.
    let client = NetNs::new("polscale-a")?;
    let server = NetNs::new("polscale-b")?;
    let (client_ip, server_ip) = (pod_ip(0, 0), pod_ip(1, 0));
    plumb_pod(
        &node,
        &client,
        &host_veth_name("ns0", "p0"),
        &client_ip,
        None,
    )?;
    plumb_pod(
        &node,
        &server,
        &host_veth_name("ns1", "p0"),
        &server_ip,
        None,
    )?;
    let srv = Server::start(&server, &server_ip, 80)?;
    let quick = Duration::from_millis(15);
    if !probe(&client, srv.addr, Duration::from_secs(1)) {
        bail!("no connection between the probe pods without policy");
    }

    // No policy (the same pods, each with its endpoint chains) vs the full table.
    let mut pods_only = c.snap.clone();
    pods_only.k8s_policies.clear();
    let mut empty = PolicyCalc::new(NODE, &CompileOptions::default());
    empty.sync(&pods_only);
    empty.take_touched();
    let none = empty.table().clone();
    let mut driver = load(&node, Driver::new(Runner::default()), none.clone())?;
    let dur = Duration::from_millis(if smoke { 300 } else { 3000 });
    let iperf_secs = if smoke { 1 } else { 3 };
    let mut conn = [Vec::new(), Vec::new()];
    let mut tput = [Vec::new(), Vec::new()];
    let t = Instant::now();
    driver = load(&node, driver, c.calc.table().clone())?;
    let full_load = t.elapsed();
    println!(
        "full table load into nft: {:.0} ms ({} rules, {} elements)",
        ms(full_load),
        rules(c.calc.table()),
        elements(c.calc.table())
    );
    // ns1/pol0 starts with team t1 (ns0 is t0): set it to admit ns0.
    replace_policy(&mut c.snap, 1, 0, "t0");
    c.calc.sync(&c.snap);
    c.calc.take_touched();
    driver = load(&node, driver, c.calc.table().clone())?;
    if !probe(&client, srv.addr, Duration::from_secs(1)) {
        bail!("the probe pods cannot talk although ns1/pol0 admits ns0");
    }
    // Alternating short rounds, so a noisy neighbour on this shared machine weighs on both
    // sides alike; the median of the per-round ratios is the figure.
    let rounds = if smoke {
        1
    } else {
        env_usize("POLICY_BENCH_ROUNDS", 5)
    };
    for _ in 0..rounds {
        for (i, table) in [&none, c.calc.table()].into_iter().enumerate() {
            driver = load(&node, driver, table.clone())?;
            node.exec_ok(&["conntrack", "-F"]).ok();
            conn[i].push(connection_rate(&client, srv.addr, dur)?);
            tput[i].push(iperf(&client, &server, &server_ip, iperf_secs)?);
        }
    }
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let median_ratio = |v: &[Vec<f64>; 2]| {
        let mut r: Vec<f64> = v[0].iter().zip(&v[1]).map(|(a, b)| b / a).collect();
        r.sort_by(f64::total_cmp);
        100.0 * r[r.len() / 2]
    };
    println!(
        "new TCP connections/s ({rounds} alternating rounds): no policy {:.0}, {} rules {:.0}: median ratio {:.1} %",
        avg(&conn[0]),
        rules(c.calc.table()),
        avg(&conn[1]),
        median_ratio(&conn)
    );
    println!(
        "iperf3 TCP throughput ({rounds} alternating rounds of {iperf_secs} s): no policy {:.2} Gbit/s, with the table {:.2} Gbit/s: median ratio {:.1} %",
        avg(&tput[0]) / 1e9,
        avg(&tput[1]) / 1e9,
        median_ratio(&tput)
    );

    // A pod label change: the transaction and its time. ns9/p0 (local, app a0) is selected
    // by ns9/pol0, whose rule selector (app a1 in ns9) holds p1.
    replace_pod(&mut c.snap, 9, 0, 0, size.nodes);
    c.calc.sync(&c.snap);
    let touched = c.calc.take_touched();
    let want = c.calc.table().clone();
    driver = node
        .run(move || {
            let mut d = driver;
            d.reconcile_changed(&want, &touched.sets, &touched.chains)
                .map(|_| d)
        })?
        .context("reset ns9/p0")?;
    let mut tx_times = Vec::new();
    let mut sizes = (0, 0, 0);
    let mut written = 0;
    for i in 0..flips.max(4) {
        replace_pod(
            &mut c.snap,
            9,
            1,
            if i % 2 == 0 { 2 } else { 1 },
            size.nodes,
        );
        let t = Instant::now();
        c.calc.sync(&c.snap);
        let touched = c.calc.take_touched();
        let calc_t = t.elapsed();
        let want = c.calc.table().clone();
        let (d, r) = node.run(move || {
            let mut d = driver;
            let r = d.reconcile_changed(&want, &touched.sets, &touched.chains);
            (d, r)
        })?;
        driver = d;
        let wrote = r? == Outcome::Updated;
        tx_times.push((calc_t, t.elapsed()));
        if wrote && let Some(script) = driver.transactions().last() {
            let s = script_size(script);
            sizes = (sizes.0.max(s.0), sizes.1.max(s.1), sizes.2.max(s.2));
            written += 1;
        }
    }
    let (calc_p50, calc_p99) = summary(tx_times.iter().map(|t| t.0).collect());
    let (all_p50, all_p99) = summary(tx_times.iter().map(|t| t.1).collect());
    println!(
        "pod label change in nft ({written} of {} written): at most {} element statements ({} elements), \
         {} other statements; calculation p50 {:.3} / p99 {:.3} ms, calculation + nft p50 {:.1} / p99 {:.1} ms",
        tx_times.len(),
        sizes.0,
        sizes.1,
        sizes.2,
        ms(calc_p50),
        ms(calc_p99),
        ms(all_p50),
        ms(all_p99)
    );

    // Policy write → enforced: ns1/pol0 stops (t9) and starts (t0) admitting ns0.
    let mut flip_times = Vec::new();
    let mut applied = Vec::new();
    for i in 0..flips {
        let admit = i % 2 == 1;
        replace_policy(&mut c.snap, 1, 0, if admit { "t0" } else { "t9" });
        let t = Instant::now();
        c.calc.sync(&c.snap);
        let touched = c.calc.take_touched();
        let want = c.calc.table().clone();
        let (d, r) = node.run(move || {
            let mut d = driver;
            let r = d.reconcile_changed(&want, &touched.sets, &touched.chains);
            (d, r)
        })?;
        driver = d;
        r?;
        applied.push(t.elapsed());
        loop {
            let at = t.elapsed();
            if probe(&client, srv.addr, quick) == admit {
                flip_times.push(at);
                break;
            }
            if t.elapsed() > Duration::from_secs(5) {
                bail!("the probe did not flip within 5 s (admit: {admit})");
            }
        }
    }
    let (p50, p99) = summary(flip_times);
    let (a50, a99) = summary(applied);
    println!(
        "policy write → enforced (probe flipped; calculation + nft alone p50 {:.1} / p99 {:.1} ms): \
         p50 {:.1} ms p99 {:.1} ms over {flips}",
        ms(a50),
        ms(a99),
        ms(p50),
        ms(p99)
    );

    // A new local pod's chains committed (what CNI ADD waits for): 1,000 policies vs none.
    let mut add = [Vec::new(), Vec::new()];
    let mut empty_driver = load(&node, Driver::new(Runner::default()), empty.table().clone())?;
    let mut with_driver = load(
        &node,
        Driver::new(Runner::default()),
        c.calc.table().clone(),
    )?;
    for i in 0..flips.max(4) {
        let j = 2 + (i % 40);
        for (arm, (calc, drv)) in [
            (&mut empty, &mut empty_driver),
            (&mut c.calc, &mut with_driver),
        ]
        .into_iter()
        .enumerate()
        {
            let local = LocalOverride {
                interface: format!("calibench{j}"),
                ips: vec![pod_ip(0, j).parse()?],
            };
            let t = Instant::now();
            calc.set_local("ns0", &format!("p{j}"), Some(local));
            let touched = calc.take_touched();
            let want = calc.table().clone();
            let d = std::mem::take(drv);
            let (d, r) = node.run(move || {
                let mut d = d;
                let r = d.reconcile_changed(&want, &touched.sets, &touched.chains);
                (d, r)
            })?;
            *drv = d;
            r?;
            add[arm].push(t.elapsed());
            calc.set_local("ns0", &format!("p{j}"), None);
            let touched = calc.take_touched();
            let want = calc.table().clone();
            let d = std::mem::take(drv);
            let (d, r) = node.run(move || {
                let mut d = d;
                let r = d.reconcile_changed(&want, &touched.sets, &touched.chains);
                (d, r)
            })?;
            *drv = d;
            r?;
        }
    }
    let (n50, n99) = summary(add[0].clone());
    let (w50, w99) = summary(add[1].clone());
    println!(
        "new local pod committed (calculation + nft): no policy p50 {:.1} / p99 {:.1} ms, \
         1,000 policies p50 {:.1} / p99 {:.1} ms: ratio p50 {:.2} p99 {:.2}",
        ms(n50),
        ms(n99),
        ms(w50),
        ms(w99),
        ms(w50) / ms(n50).max(1e-6),
        ms(w99) / ms(n99).max(1e-6)
    );
    drop(driver);
    drop(srv);
    Ok(())
}

/// Part 3: a real `tortie node` (TORTIE_POLICY=1) in a test namespace and the view in a
/// real kube-apiserver: cold start to enforcement, its RSS, policy write (API) → probe flips.
async fn part3(size: &Size, flips: usize) -> Result<()> {
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{Api, Patch, PatchParams, PostParams};

    let host = nodes::Host::new("polapi")?;
    host.ns
        .exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    // Proxy ARP answers for the pods' gateway only with a route to it (one host route; the
    // probes' own traffic stays between the pods' /32 routes).
    host.ns.exec_ok(&[
        "ip",
        "route",
        "add",
        "169.254.1.1/32",
        "via",
        &host.root_ip.to_string(),
        "dev",
        "api0",
    ])?;
    let cp = support::ControlPlane::start_on(host.root_ip.into()).await?;
    cp.create_node(NODE, &[]).await?;
    let objects = cluster(size);
    let client = cp.client();
    let t = Instant::now();
    let pp = PostParams::default();
    for n in &objects.namespaces {
        Api::<Namespace>::all(client.clone()).create(&pp, n).await?;
    }
    futures::stream::iter(objects.pods.iter())
        .map(|p| {
            let client = client.clone();
            async move {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let name = p.metadata.name.clone().unwrap_or_default();
                let api = Api::<Pod>::namespaced(client, &ns);
                let mut bare = p.clone();
                bare.status = None;
                api.create(&PostParams::default(), &bare).await?;
                let status = json!({"status": p.status});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    futures::stream::iter(objects.k8s_policies.iter())
        .map(|p| {
            let client = client.clone();
            async move {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                Api::<NetworkPolicy>::namespaced(client, &ns)
                    .create(&PostParams::default(), p)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    println!(
        "API populated in {:.0} s: {} namespaces, {} pods, {} policies",
        t.elapsed().as_secs_f64(),
        objects.namespaces.len(),
        objects.pods.len(),
        objects.k8s_policies.len()
    );

    let client_ns = NetNs::new("polapi-a")?;
    let server_ns = NetNs::new("polapi-b")?;
    let (client_ip, server_ip) = (pod_ip(0, 0), pod_ip(1, 0));
    plumb_pod(
        &host.ns,
        &client_ns,
        &host_veth_name("ns0", "p0"),
        &client_ip,
        None,
    )?;
    plumb_pod(
        &host.ns,
        &server_ns,
        &host_veth_name("ns1", "p0"),
        &server_ip,
        None,
    )?;
    let srv = Server::start(&server_ns, &server_ip, 80)?;
    let quick = Duration::from_millis(15);
    if !probe(&client_ns, srv.addr, Duration::from_secs(1)) {
        bail!("no connection between the probe pods before the daemon");
    }

    // ns1/pol0 admits team t1; ns0 is t0: once enforced, the probe is denied.
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let daemon = nodes::Daemon::start(
        &host,
        dir.path(),
        nodes::DaemonOpts {
            kubeconfig: cp.kubeconfig_path(),
            node_name: NODE,
            env: vec![
                ("TORTIE_POLICY", "1".into()),
                ("IP_AUTODETECTION_METHOD", "interface=api0".into()),
                ("TORTIE_LOG_LEVEL", "info".into()),
            ],
        },
    );
    // Full enforcement: the kernel's table equals the one the calculator makes of the same
    // objects (compared as the driver's drift check does), and the probe is denied.
    let mut reference = PolicyCalc::new(NODE, &CompileOptions::default());
    reference.sync(&PolicySnapshot::from_objects(&objects));
    let expected = reference.table().fingerprint();
    let cold = loop {
        let have = host.ns.run(|| {
            tortie::dataplane::nft::read::read(
                &Runner::default(),
                tortie::policy::compile::FAMILY,
                tortie::policy::compile::TABLE,
            )
        })?;
        if matches!(&have, Ok(Some(h)) if *h == expected) {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("not enforced within 600 s:\n{}", daemon.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if probe(&client_ns, srv.addr, quick) {
        bail!("the table is in place but ns0 still reaches ns1/p0");
    }
    // Steady state before measuring memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "real daemon: cold start to enforcement {:.1} s; RSS {:.1} MiB with {} endpoints and {} policies in view",
        cold.as_secs_f64(),
        daemon.resident_bytes() as f64 / (1024.0 * 1024.0),
        objects.pods.len(),
        objects.k8s_policies.len()
    );

    let api = Api::<NetworkPolicy>::namespaced(client.clone(), "ns1");
    let mut times = Vec::new();
    for i in 0..flips {
        let admit = i % 2 == 0;
        let want = policy(1, 0, if admit { "t0" } else { "t9" });
        let patch = json!({"spec": want.spec});
        let t = Instant::now();
        api.patch("pol0", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        loop {
            let at = t.elapsed();
            if probe(&client_ns, srv.addr, quick) == admit {
                times.push(at);
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!(
                    "the probe did not flip within 10 s (admit: {admit}):\n{}",
                    daemon.log()
                );
            }
        }
    }
    let (p50, p99) = summary(times);
    println!(
        "real daemon: policy write (API) → enforced: p50 {:.1} ms p99 {:.1} ms over {flips} (target p99 ≤ 100 ms)",
        ms(p50),
        ms(p99)
    );
    drop(daemon);
    drop(srv);
    Ok(())
}

fn main() -> Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let size = if bench {
        Size {
            namespaces: env_usize("POLICY_BENCH_NAMESPACES", 100),
            pods_per_ns: env_usize("POLICY_BENCH_PODS_PER_NS", 50),
            nodes: env_usize("POLICY_BENCH_NODES", 50),
            policies_per_ns: env_usize("POLICY_BENCH_POLICIES_PER_NS", 10),
        }
    } else {
        Size {
            namespaces: 20,
            pods_per_ns: 10,
            nodes: 5,
            policies_per_ns: 3,
        }
    };
    let labels = if bench {
        env_usize("POLICY_BENCH_LABELS", 400)
    } else {
        8
    };
    let flips = if bench {
        env_usize("POLICY_BENCH_FLIPS", 40)
    } else {
        4
    };
    let full_iters = if bench { 3 } else { 1 };
    let c = part1(&size, labels, full_iters);
    if !nix::unistd::Uid::effective().is_root() {
        println!("part 2 skipped: needs root (netns, nft)");
        return Ok(());
    }
    part2(&size, c, flips, !bench)?;
    if bench && std::env::var("POLICY_BENCH_API").is_ok_and(|v| v == "0") {
        return Ok(());
    }
    tokio::runtime::Runtime::new()?.block_on(part3(&size, flips))
}
