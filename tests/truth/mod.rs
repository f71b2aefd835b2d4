// The truth-table world: two real `tortie node` daemons (tests/nodes/cluster.rs), three
// labelled namespaces with three pods each spread over both nodes (Pod objects with named
// container ports, ADDed through the real CNI), servers in every pod, and the verbs the
// scenarios need: apply and delete policy objects through the API, relabel pods, probe every
// cell in parallel with real packets, ask the cyclonus oracle, and poll until the kernel's
// table equals the expected one — or fail at a deadline printing both tables.

pub mod probe;
pub mod table;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ObjectMeta, Patch,
    PatchParams, PostParams,
};
use serde_json::{Value, json};

use crate::nodes::cluster::{Cluster, NODE_NAMES, create_pod_json};
use crate::support::{NetNs, oracle};
use probe::{IcmpSeen, Probe, Servers};
use table::Table;

/// Namespaces and pods (the same three in every namespace) with their labels: the model the
/// random policy sets are generated for.
pub use crate::policy_gen::{NAMESPACES, PODS};
/// Ports every pod serves.
pub const TCP_PORTS: [u16; 3] = [80, 81, 82];
pub const UDP_PORTS: [u16; 2] = [80, 81];
pub const SCTP_PORTS: [u16; 2] = [80, 81];
/// Both nodes' resync interval: longer than the whole test.
const RESYNC_SECS: u64 = 900;
/// How long a scenario may take to be enforced (or lifted) before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub struct TestPod {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    /// (name, port, protocol).
    pub ports: Vec<(String, u16, String)>,
    pub servers: Servers,
    // Declared after the servers: their sockets are closed before the namespace goes.
    pub netns: NetNs,
}

impl TestPod {
    /// `xa` for x/a: the tables' names.
    pub fn short(&self) -> String {
        format!("{}{}", self.namespace, self.name)
    }
}

/// Container ports: `web` is 80/TCP on pods a and 81/TCP on pods b (a named port resolving
/// differently per destination); the rest are `serve-<port>-<protocol>`.
fn container_ports(pod: &str, sctp: bool) -> Vec<(String, u16, String)> {
    let mut out = Vec::new();
    let sctp_ports: &[u16] = if sctp { &SCTP_PORTS } else { &[] };
    for (proto, ports) in [
        ("TCP", &TCP_PORTS[..]),
        ("UDP", &UDP_PORTS[..]),
        ("SCTP", sctp_ports),
    ] {
        for &port in ports {
            let web = proto == "TCP" && ((pod == "a" && port == 80) || (pod == "b" && port == 81));
            let name = if web {
                "web".to_string()
            } else {
                format!("serve-{port}-{}", proto.to_lowercase())
            };
            out.push((name, port, proto.to_string()));
        }
    }
    out
}

/// The service account of a pod: x/a runs as `frontend` (role=fe), x/b as `backend`
/// (role=be), every other pod as `default`.
fn service_account(ns: &str, pod: &str) -> &'static str {
    match (ns, pod) {
        ("x", "a") => "frontend",
        ("x", "b") => "backend",
        _ => "default",
    }
}

pub struct World {
    pub cluster: Cluster,
    pub pods: Vec<TestPod>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    oracle: PathBuf,
    scratch: tempfile::TempDir,
    /// Cells probed over the whole run.
    pub probed: usize,
}

impl World {
    /// The cluster, namespaces, service accounts and pods; pod i of namespace n runs on node
    /// (n + i) % 2, so every namespace and every pod name has pods on both nodes. With
    /// `sctp`, pods also serve SCTP.
    pub async fn start(label: &str, sctp: bool) -> anyhow::Result<World> {
        let t0 = Instant::now();
        let oracle = tokio::task::spawn_blocking(oracle::binary).await?;
        // Resyncs far apart: every table must follow from the watches waking the
        // calculation, none from a periodic full pass papering over a missed change.
        let cluster = Cluster::start(label, [RESYNC_SECS, RESYNC_SECS]).await?;
        let client = cluster.cp.client();
        let mut namespaces = BTreeMap::new();
        for (ns, labels) in NAMESPACES {
            let labels = pairs(labels);
            let body: Namespace =
                serde_json::from_value(json!({"metadata": {"name": ns, "labels": labels}}))?;
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &body)
                .await
                .with_context(|| format!("create namespace {ns}"))?;
            namespaces.insert(ns.to_string(), labels);
        }
        for (name, role) in [("frontend", "fe"), ("backend", "be")] {
            let sa: ServiceAccount = serde_json::from_value(
                json!({"metadata": {"name": name, "labels": {"role": role}}}),
            )?;
            Api::<ServiceAccount>::namespaced(client.clone(), "x")
                .create(&PostParams::default(), &sa)
                .await
                .with_context(|| format!("create service account x/{name}"))?;
        }
        let mut adds = Vec::new();
        for (ni, (ns, _)) in NAMESPACES.iter().enumerate() {
            for (pi, (pod, labels)) in PODS.iter().enumerate() {
                let node = (ni + pi) % 2;
                adds.push(add_pod(&cluster, ns, pod, node, pairs(labels), sctp));
            }
        }
        let pods = futures::future::try_join_all(adds).await?;
        eprintln!(
            "truth world: 2 nodes, {} pods ready in {} ms",
            pods.len(),
            t0.elapsed().as_millis()
        );
        Ok(World {
            cluster,
            pods,
            namespaces,
            oracle,
            scratch: tempfile::tempdir()?,
            probed: 0,
        })
    }

    pub fn pod(&self, short: &str) -> &TestPod {
        self.pods
            .iter()
            .find(|p| p.short() == short)
            .unwrap_or_else(|| panic!("no pod {short}"))
    }

    pub fn index(&self, short: &str) -> usize {
        self.pods
            .iter()
            .position(|p| p.short() == short)
            .unwrap_or_else(|| panic!("no pod {short}"))
    }

    pub fn ip(&self, short: &str) -> Ipv4Addr {
        self.pod(short).ip
    }

    /// Creates each object (any policy kind, as JSON with apiVersion and kind).
    pub async fn apply(&self, objects: &[Value]) -> anyhow::Result<()> {
        for o in objects {
            let (api, name) = self.dynamic(o)?;
            let obj: DynamicObject = serde_json::from_value(o.clone())?;
            api.create(&PostParams::default(), &obj)
                .await
                .with_context(|| format!("create {} {name}", o["kind"]))?;
        }
        Ok(())
    }

    pub async fn delete(&self, objects: &[Value]) -> anyhow::Result<()> {
        for o in objects {
            let (api, name) = self.dynamic(o)?;
            api.delete(&name, &DeleteParams::default())
                .await
                .with_context(|| format!("delete {} {name}", o["kind"]))?;
        }
        Ok(())
    }

    fn dynamic(&self, o: &Value) -> anyhow::Result<(Api<DynamicObject>, String)> {
        let (group, version) = o["apiVersion"]
            .as_str()
            .and_then(|v| v.split_once('/'))
            .context("apiVersion group/version")?;
        let kind = o["kind"].as_str().context("kind")?;
        let plural = match kind.strip_suffix('y') {
            Some(stem) => format!("{}ies", stem.to_lowercase()),
            None => format!("{}s", kind.to_lowercase()),
        };
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            &plural,
        );
        let name = o["metadata"]["name"].as_str().context("name")?.to_string();
        let client = self.cluster.cp.client();
        let api = match o["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(client, ns, &ar),
            None => Api::all_with(client, &ar),
        };
        Ok((api, name))
    }

    /// Sets (Some) or removes (None) one label of a pod, in the API and in the oracle's view.
    pub async fn relabel(
        &mut self,
        short: &str,
        key: &str,
        value: Option<&str>,
    ) -> anyhow::Result<()> {
        let i = self.index(short);
        let p = &mut self.pods[i];
        let mut labels = serde_json::Map::new();
        labels.insert(key.into(), json!(value));
        let patch = json!({"metadata": {"labels": labels}});
        Api::<Pod>::namespaced(self.cluster.cp.client(), &p.namespace)
            .patch(&p.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("relabel {short}"))?;
        match value {
            Some(v) => p.labels.insert(key.into(), v.into()),
            None => p.labels.remove(key),
        };
        Ok(())
    }

    /// What cyclonus says of every cell under the Kubernetes `policies`.
    pub fn oracle(&self, policies: &[Value], probes: &[Probe]) -> anyhow::Result<Table> {
        let pods: Vec<oracle::Pod> = self
            .pods
            .iter()
            .map(|p| oracle::Pod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                ip: p.ip.to_string(),
                labels: p.labels.clone(),
                ports: p.ports.clone(),
            })
            .collect();
        let asked: Vec<(u16, &str)> = probes.iter().filter_map(|p| p.port_protocol()).collect();
        anyhow::ensure!(asked.len() == probes.len(), "the oracle knows no ICMP");
        let world = oracle::World {
            namespaces: &self.namespaces,
            pods: &pods,
            probes: &asked,
        };
        let mut t = Table::new();
        for c in oracle::cells(&self.oracle, self.scratch.path(), policies, &world)? {
            if c.from == c.to {
                continue; // undefined in cyclonus; never a cell here
            }
            let find = |k: &str| {
                self.pods
                    .iter()
                    .position(|p| format!("{}/{}", p.namespace, p.name) == k)
            };
            let (s, d) = (
                find(&c.from).context("oracle pod")?,
                find(&c.to).context("oracle pod")?,
            );
            let p = Probe::from_port_protocol(c.port, &c.protocol).context("oracle protocol")?;
            t.insert((s, d, p), c.allowed);
        }
        Ok(t)
    }

    /// Probes every cell of `probes` at once, each on its own thread in the source pod's
    /// namespace.
    pub fn measure(&mut self, probes: &[Probe]) -> Table {
        struct End {
            path: PathBuf,
            ip: Ipv4Addr,
            icmp: Arc<IcmpSeen>,
        }
        let ends: Vec<End> = self
            .pods
            .iter()
            .map(|p| End {
                path: p.netns.path(),
                ip: p.ip,
                icmp: p.servers.icmp.clone(),
            })
            .collect();
        let cells: Vec<(usize, usize, Probe)> = table::uniform(ends.len(), probes, true)
            .into_keys()
            .collect();
        self.probed += cells.len();
        std::thread::scope(|s| {
            let handles: Vec<_> = cells
                .into_iter()
                .map(|(si, di, p)| {
                    let (src, dst) = (&ends[si], &ends[di]);
                    s.spawn(move || {
                        let file = std::fs::File::open(&src.path).expect("pod netns");
                        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                            .expect("setns into the source pod");
                        // Hundreds of probes run at once: hold no descriptor longer than needed.
                        drop(file);
                        ((si, di, p), probe::probe(p, src.ip, dst.ip, &dst.icmp))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("probe thread"))
                .collect()
        })
    }

    /// Probes until the observed table equals `want` (how long that took and how many
    /// rounds), or fails at the deadline printing both tables and the daemons' logs.
    pub async fn converge(
        &mut self,
        what: &str,
        want: &Table,
    ) -> anyhow::Result<(Duration, usize)> {
        let probes = table::probes(want);
        let t0 = Instant::now();
        let mut rounds = 0;
        loop {
            rounds += 1;
            let got = tokio::task::block_in_place(|| self.measure(&probes));
            if &got == want {
                return Ok((t0.elapsed(), rounds));
            }
            if t0.elapsed() > DEADLINE {
                let names: Vec<String> = self.pods.iter().map(TestPod::short).collect();
                let nodes: Vec<usize> = self.pods.iter().map(|p| p.node).collect();
                anyhow::bail!(
                    "{what}: the kernel's table still differs from the expected one after {:?} ({rounds} rounds)\n{}\n{}",
                    DEADLINE,
                    table::render(want, &got, &names, &nodes),
                    self.cluster.logs()
                );
            }
        }
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }
}

async fn add_pod(
    c: &Cluster,
    ns: &str,
    pod: &str,
    node: usize,
    labels: BTreeMap<String, String>,
    sctp: bool,
) -> anyhow::Result<TestPod> {
    let ports = container_ports(pod, sctp);
    let container_ports: Vec<Value> = ports
        .iter()
        .map(|(name, port, proto)| json!({"name": name, "containerPort": port, "protocol": proto}))
        .collect();
    let meta = ObjectMeta {
        name: Some(pod.into()),
        labels: Some(labels.clone()),
        ..Default::default()
    };
    create_pod_json(
        &c.cp.client(),
        ns,
        json!({
            "metadata": meta,
            "spec": {
                "nodeName": NODE_NAMES[node],
                "serviceAccountName": service_account(ns, pod),
                "containers": [{"name": "serve", "image": "pause", "ports": container_ports}]
            }
        }),
    )
    .await?;
    let netns = NetNs::new(&format!("truth-{ns}{pod}"))?;
    let ip: Ipv4Addr = c.add(node, ns, pod, &netns.path()).await?.parse()?;
    let sctp_ports: &[u16] = if sctp { &SCTP_PORTS } else { &[] };
    let servers = Servers::start(&netns, &TCP_PORTS, &UDP_PORTS, sctp_ports)?;
    Ok(TestPod {
        namespace: ns.into(),
        name: pod.into(),
        node,
        ip,
        labels,
        ports,
        servers,
        netns,
    })
}

fn pairs(l: &[(&str, &str)]) -> BTreeMap<String, String> {
    l.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
