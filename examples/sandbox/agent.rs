// The per-node agent: kubelet's network role and nothing else. It watches the Pods bound to
// its node, gives each a network namespace and runs the node's CNI chain (ADD), writes
// status.podIP(s), and on deletion runs DEL, removes the namespace and confirms the deletion.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use super::runtime::{Attachment, Runtime, result_ips};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: String,
    pub node_ip: IpAddr,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// Pod namespaces are `<netns_prefix>-<namespace>-<name>`.
    pub netns_prefix: String,
}

struct Attached {
    att: Attachment,
    result: Value,
}

pub struct Agent {
    cfg: AgentConfig,
    client: Client,
    runtime: Runtime,
    pods: HashMap<String, Pod>,
    attached: HashMap<String, Attached>,
}

impl Agent {
    pub fn new(cfg: AgentConfig, client: Client) -> Agent {
        let runtime = Runtime {
            bin_dir: cfg.bin_dir.clone(),
            conf_dir: cfg.conf_dir.clone(),
        };
        Agent {
            cfg,
            client,
            runtime,
            pods: HashMap::new(),
            attached: HashMap::new(),
        }
    }

    /// Runs until `stop` completes. Failed ADDs are retried every 2 s.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let fields = format!("spec.nodeName={}", self.cfg.node);
        let mut events = watcher(api, watcher::Config::default().fields(&fields)).boxed();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut init: Option<HashMap<String, Pod>> = None;
        tokio::pin!(stop);
        tracing::info!(node = %self.cfg.node, "agent watching pods");
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tick.tick() => {}
                ev = events.next() => match ev {
                    None => anyhow::bail!("pod watch of node {} ended", self.cfg.node),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "pod watch error (retrying)");
                        continue;
                    }
                    Some(Ok(ev)) => match ev {
                        watcher::Event::Init => init = Some(HashMap::new()),
                        watcher::Event::InitApply(p) => {
                            if let Some(m) = init.as_mut() {
                                m.insert(uid(&p), p);
                            }
                        }
                        watcher::Event::InitDone => {
                            if let Some(m) = init.take() {
                                self.pods = m;
                            }
                        }
                        watcher::Event::Apply(p) => {
                            self.pods.insert(uid(&p), p);
                        }
                        watcher::Event::Delete(p) => {
                            self.pods.remove(&uid(&p));
                        }
                    },
                },
            }
            if init.is_none() {
                self.reconcile().await;
            }
        }
    }

    async fn reconcile(&mut self) {
        let gone: Vec<String> = self
            .attached
            .keys()
            .filter(|u| !self.pods.contains_key(*u))
            .cloned()
            .collect();
        for u in gone {
            self.detach(&u);
        }
        let pods: Vec<Pod> = self.pods.values().cloned().collect();
        for pod in pods {
            let u = uid(&pod);
            if pod.metadata.deletion_timestamp.is_some() {
                self.detach(&u);
                self.confirm_deletion(&pod).await;
            } else if !self.attached.contains_key(&u)
                && let Err(e) = self.attach(&pod).await
            {
                tracing::warn!(pod = %pod.name_any(), error = %format!("{e:#}"), "pod network setup failed (retrying)");
            }
        }
    }

    async fn attach(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let att = self.attachment(pod);
        let netns_name = att
            .netns
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if !att.netns.exists() {
            run_ip(&["netns", "add", &netns_name])?;
            run_ip(&["-n", &netns_name, "link", "set", "lo", "up"])?;
        }
        let result = self.runtime.add(&att)?;
        let ips = result_ips(&result);
        let first = ips
            .first()
            .with_context(|| format!("CNI result for {} has no address: {result}", att.pod_name))?;
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": self.cfg.node_ip.to_string(),
            "hostIPs": [{"ip": self.cfg.node_ip.to_string()}],
            "podIP": first.to_string(),
            "podIPs": ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
        }});
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &att.pod_namespace);
        api.patch_status(
            &att.pod_name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .with_context(|| format!("patch status of pod {}", att.pod_name))?;
        tracing::info!(pod = %att.pod_name, ip = %first, netns = %netns_name, "pod attached");
        self.attached.insert(uid(pod), Attached { att, result });
        Ok(())
    }

    fn detach(&mut self, uid: &str) {
        let Some(a) = self.attached.remove(uid) else {
            return;
        };
        if let Err(e) = self.runtime.del(&a.att, Some(&a.result)) {
            tracing::warn!(pod = %a.att.pod_name, error = %format!("{e:#}"), "CNI DEL failed");
        }
        if let Some(name) = a.att.netns.file_name().and_then(|n| n.to_str())
            && let Err(e) = run_ip(&["netns", "del", name])
        {
            tracing::warn!(netns = name, error = %format!("{e:#}"), "netns removal failed");
        }
        tracing::info!(pod = %a.att.pod_name, "pod detached");
    }

    /// kubelet's last word on a deleted pod: delete with grace 0, for this uid only.
    async fn confirm_deletion(&self, pod: &Pod) {
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        if let Err(e) = api.delete(&pod.name_any(), &dp).await {
            tracing::debug!(pod = %pod.name_any(), error = %e, "final delete");
        }
    }

    fn attachment(&self, pod: &Pod) -> Attachment {
        let ns = pod.namespace().unwrap_or_else(|| "default".into());
        let name = pod.name_any();
        Attachment {
            container_id: uid(pod).replace('-', ""),
            netns: PathBuf::from("/run/netns")
                .join(format!("{}-{ns}-{name}", self.cfg.netns_prefix)),
            ifname: "eth0".into(),
            pod_namespace: ns,
            pod_name: name,
            pod_uid: uid(pod),
        }
    }
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("run ip")?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
