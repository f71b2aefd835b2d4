// Benchmark (not a test): how long one node takes to converge its overlay when N remote
// nodes, each with one block, appear at once; a no-op resync; repairing hand-made drift;
// and removing them all. Runs in a private node namespace (root needed).
//
//   cargo bench --bench overlay_converge            # optimised
//   cargo build --bench overlay_converge && target/debug/deps/overlay_converge-<hash>
//   OVERLAY_BENCH_NODES=1000 OVERLAY_BENCH_ROUNDS=5 ... to change the size
// (libtest passes `--bench`; it is ignored.)

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use support::{NetNs, veth_pair};
use tortie::calc::{
    BlockInfo, ClusterView, EncapMode, NodeInfo, OverlayConfig, PoolInfo, desired_dataplane,
};
use tortie::dataplane::{self, Kernel, Stats};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Local node n0 on 198.18.0.1/16; remote node i on 198.18.x.y with block 10.0.0.0/10's
/// i-th /26 and its first address as the tunnel address.
fn cluster(remotes: usize) -> ClusterView {
    let block = |i: usize| {
        let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i as u32) * 64;
        ipnet::Ipv4Net::new(Ipv4Addr::from(base), 26).expect("valid /26")
    };
    let mut nodes = vec![NodeInfo {
        name: "n0".into(),
        ip: Some("198.18.0.1/16".parse().expect("cidr")),
        vxlan_tunnel_addr: Some(block(0).addr()),
        ipip_tunnel_addr: None,
    }];
    let mut blocks = vec![BlockInfo {
        cidr: block(0),
        affinity: Some("n0".into()),
    }];
    for i in 1..=remotes {
        let host = u32::from(Ipv4Addr::new(198, 18, 1, 0)) + i as u32;
        nodes.push(NodeInfo {
            name: format!("node-{i}"),
            ip: Some(ipnet::Ipv4Net::new(Ipv4Addr::from(host), 16).expect("cidr")),
            vxlan_tunnel_addr: Some(block(i).addr()),
            ipip_tunnel_addr: None,
        });
        blocks.push(BlockInfo {
            cidr: block(i),
            affinity: Some(format!("node-{i}")),
        });
    }
    ClusterView {
        local_node: "n0".into(),
        nodes,
        blocks,
        borrowed: vec![],
        pools: vec![PoolInfo {
            cidr: "10.0.0.0/10".parse().expect("cidr"),
            vxlan_mode: EncapMode::Always,
            ipip_mode: EncapMode::Never,
            nat_outgoing: true,
        }],
    }
}

struct Series {
    name: &'static str,
    samples: Vec<Duration>,
    stats: Stats,
}

impl Series {
    fn print(&self) {
        let mut s = self.samples.clone();
        s.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<34} median {:>8.2} ms  min {:>8.2} ms  max {:>8.2} ms  ({} rounds; last: +{} ~{} -{})",
            self.name,
            ms(s[s.len() / 2]),
            ms(s[0]),
            ms(s[s.len() - 1]),
            s.len(),
            self.stats.added,
            self.stats.replaced,
            self.stats.deleted,
        );
    }
}

async fn timed_apply(kernel: &Kernel, view: &ClusterView) -> Result<(Duration, Stats)> {
    let start = Instant::now();
    let desired = desired_dataplane(
        view,
        &OverlayConfig {
            host_mtu: 1500,
            ..OverlayConfig::default()
        },
    );
    let report = dataplane::apply(kernel, &desired).await?;
    Ok((start.elapsed(), report.total()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let remotes = env_usize("OVERLAY_BENCH_NODES", 500);
    let rounds = env_usize("OVERLAY_BENCH_ROUNDS", 5).max(1);
    let node = NetNs::new("bench-node")?;
    let vnet = NetNs::new("bench-vnet")?;
    veth_pair(&node, "eth0", &vnet, "eth0")?;
    node.exec_ok(&["ip", "addr", "add", "198.18.0.1/16", "dev", "eth0"])?;
    let kernel = Kernel::in_netns(&node.path())?;

    let empty = cluster(0);
    let full = cluster(remotes);
    let t = Instant::now();
    let desired = desired_dataplane(&full, &OverlayConfig::default());
    let calc = t.elapsed();
    println!(
        "overlay converge, {remotes} remote nodes x 1 block ({} routes, {} neighbours, {} fdb entries)",
        desired.routes.len(),
        desired.neighbours.len(),
        desired.fdb.len()
    );
    println!(
        "{:<34} {:>8.2} ms",
        "calculation only (pure)",
        calc.as_secs_f64() * 1000.0
    );

    let mut appear = Series {
        name: "all remote blocks appear at once",
        samples: vec![],
        stats: Stats::default(),
    };
    let mut noop = Series {
        name: "resync, nothing changed",
        samples: vec![],
        stats: Stats::default(),
    };
    let mut drift = Series {
        name: "repair 10% routes deleted by hand",
        samples: vec![],
        stats: Stats::default(),
    };
    let mut vanish = Series {
        name: "all remote nodes removed",
        samples: vec![],
        stats: Stats::default(),
    };
    timed_apply(&kernel, &empty).await?; // the device and the local blackhole
    for _ in 0..rounds {
        let (d, s) = timed_apply(&kernel, &full).await?;
        appear.samples.push(d);
        appear.stats = s;
        let (d, s) = timed_apply(&kernel, &full).await?;
        if s.changes() != 0 {
            bail!("resync after a full apply changed {s:?}");
        }
        noop.samples.push(d);
        noop.stats = s;

        let batch: String = desired
            .routes
            .keys()
            .step_by(10)
            .map(|k| format!("route del {}\n", k.dst))
            .collect();
        let script =
            std::env::temp_dir().join(format!("overlay-bench-{}.batch", std::process::id()));
        std::fs::write(&script, batch)?;
        let path = script.to_string_lossy().into_owned();
        node.exec_ok(&["ip", "-batch", &path])?;
        let _ = std::fs::remove_file(&script);
        let (d, s) = timed_apply(&kernel, &full).await?;
        drift.samples.push(d);
        drift.stats = s;

        let (d, s) = timed_apply(&kernel, &empty).await?;
        vanish.samples.push(d);
        vanish.stats = s;
    }
    for s in [&appear, &noop, &drift, &vanish] {
        s.print();
    }
    Ok(())
}
