//! ADD and CHECK. ADD: pod lookup (watch cache) → IPAM (fixed IPs from `ipAddrs`, else the
//! pool choice) while the veth pair is built → addresses and routes → result, then Calico's
//! pod annotations in the background with the container still locked. Any failure undoes
//! the plumbing and releases the handle, so a failed ADD leaves nothing behind.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use chrono::Utc;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::endpoints::LocalEndpoint;
use super::options::{self, IpamOptions};
use super::pod::PodInfo;
use super::{CniDaemon, HandlerError, require};
use crate::api::AllowedUse;
use crate::cni::invocation::{Command, PluginKind};
use crate::cni::plumbing::{Attached, PodNetwork, host_veth_name};
use crate::cni::protocol::Request;
use crate::cni::result::{CniResult, Interface, IpConfig, Route};
use crate::ipam::pools::{ANNOTATION_IP_ADDRS, parse_ip_addrs};
use crate::ipam::{AssignRequest, pod_handle};

/// Who the request is for.
struct Target<'a> {
    container: &'a str,
    ifname: &'a str,
    namespace: &'a str,
    pod: &'a str,
}

fn target(request: &Request) -> Result<Target<'_>, HandlerError> {
    let command = request.command;
    Ok(Target {
        container: require(command, "CNI_CONTAINERID", request.container_id.as_deref())?,
        ifname: require(command, "CNI_IFNAME", request.ifname.as_deref())?,
        namespace: require(
            command,
            "K8S_POD_NAMESPACE in CNI_ARGS",
            request.args.k8s_pod_namespace.as_deref(),
        )?,
        pod: require(
            command,
            "K8S_POD_NAME in CNI_ARGS",
            request.args.k8s_pod_name.as_deref(),
        )?,
    })
}

/// The address families the pod will get: its fixed IPs when it names some, else the
/// families the network config asks for.
fn families(info: &PodInfo, opts: &IpamOptions) -> (bool, bool) {
    match info
        .annotations
        .get(ANNOTATION_IP_ADDRS)
        .and_then(|v| parse_ip_addrs(v).ok())
    {
        Some(fixed) if !fixed.is_empty() => (
            fixed.iter().any(IpAddr::is_ipv4),
            fixed.iter().any(IpAddr::is_ipv6),
        ),
        _ => (opts.v4, opts.v6),
    }
}

/// How long an ADD waits for its pod's policy to reach the kernel (one policy pass, or a
/// few when the driver is retrying a failure).
const POLICY_WAIT: Duration = Duration::from_secs(10);

fn host_prefix(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

impl CniDaemon {
    pub(super) async fn add(
        &self,
        request: &Request,
        netns: Option<File>,
    ) -> Result<CniResult, HandlerError> {
        if !self.is_ready() {
            return Err(HandlerError::NotReady {
                reason: "IPAM has not synced with the API server yet".into(),
            });
        }
        let t = target(request)?;
        let netns = self.pod_netns(t.container, request.netns.as_deref(), netns)?;
        let main = request.kind == PluginKind::Main;
        let netns = match (main, netns) {
            (true, None) => {
                return Err(HandlerError::NoNetns {
                    command: Command::Add,
                    container: t.container.to_string(),
                });
            }
            (_, ns) => ns,
        };
        let mtu = options::mtu(&request.raw_config, self.settings.pod_mtu())?;
        // A live attachment keeps the MTU it was made with; only a fixed one is compared.
        let fixed_mtu = options::mtu(&request.raw_config, 0)?;
        let opts = options::ipam_options(&request.raw_config)?;
        let serial = self.locks.lock(t.container).await;
        let handle = pod_handle(t.container);

        // A repeated ADD of a live attachment answers with what exists; anything else
        // would release or duplicate the first ADD's address.
        let existing: Vec<IpNet> = self
            .ipam
            .addresses_of(&handle)
            .into_iter()
            .map(host_prefix)
            .collect();
        if !existing.is_empty() {
            return self
                .repeat_add(request, &t, netns.as_ref(), existing, fixed_mtu)
                .await;
        }

        let t0 = std::time::Instant::now();
        let info = self
            .pods
            .lookup(t.namespace, t.pod, request.args.k8s_pod_uid.as_deref())
            .await?;
        let t1 = std::time::Instant::now();
        // The veth pair needs no address: it is built while IPAM writes the block.
        let host_ifname = host_veth_name(t.namespace, t.pod);
        let (v4, v6) = families(&info, &opts);
        let prepare = async {
            match netns.as_ref() {
                Some(ns) => self
                    .plumber
                    .prepare(ns, &host_ifname, t.ifname, mtu, v4, v6)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        let (prepared, allocated) = tokio::join!(prepare, self.allocate(&handle, &t, &info, &opts));
        let (prepared, addrs) = match (prepared, allocated) {
            (Ok(p), Ok(a)) => (p, a),
            (prepared, Err(e)) => {
                // IPAM undid its own part; the pair goes too.
                if let Ok(Some(p)) = prepared {
                    self.plumber.abandon(p).await;
                }
                return Err(e);
            }
            (Err(e), Ok(_)) => {
                self.release_failed(&handle).await;
                return Err(e.into());
            }
        };
        let t2 = std::time::Instant::now();
        // The pod's policy (dispatch entry, chains, set members) is computed and committed
        // while its addresses go on: the answer waits for both, so the pod's first packet
        // meets its final policy.
        let policy = prepared
            .as_ref()
            .and_then(|_| self.register_endpoint(&t, &host_ifname, &addrs, &info));
        // Addressing always runs to its end (a half-made attachment would be left behind);
        // the wait is given up as soon as addressing failed.
        let (attached, waited) = {
            let addressing = async {
                match prepared {
                    Some(p) => self.plumber.address(p, &addrs).await.map(Some),
                    None => Ok(None),
                }
            };
            let wait = self.wait_policy(policy, &t);
            tokio::pin!(addressing, wait);
            let mut waited = None;
            let attached = loop {
                tokio::select! {
                    a = &mut addressing => break a,
                    w = &mut wait, if waited.is_none() => waited = Some(w),
                }
            };
            let waited = match (&attached, waited) {
                (Err(_), _) => Ok(()),
                (Ok(_), Some(w)) => w,
                (Ok(_), None) => wait.await,
            };
            (attached, waited)
        };
        let attached = match (attached, waited) {
            (Ok(a), Ok(())) => a,
            (Err(e), _) => {
                self.forget_endpoint(&t);
                self.release_failed(&handle).await;
                return Err(e.into());
            }
            (Ok(a), Err(e)) => {
                self.forget_endpoint(&t);
                if a.is_some()
                    && let Err(undo) = self
                        .plumber
                        .detach(netns.as_ref(), t.ifname, &host_ifname, &addrs)
                        .await
                {
                    tracing::warn!(container = t.container, error = %undo, "could not remove the plumbing of an ADD whose policy never arrived");
                }
                self.release_failed(&handle).await;
                return Err(e);
            }
        };
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1000.0;
        tracing::debug!(
            container = t.container,
            lookup_ms = ms(t0, t1),
            ipam_and_veth_ms = ms(t1, t2),
            addressing_and_policy_ms = ms(t2, std::time::Instant::now()),
            "ADD phases"
        );
        // Calico's annotations follow the answer; the container stays locked until they are
        // written, so a DEL of it can never be overtaken by them.
        let annotations = self.pods.annotations().clone();
        let (namespace, pod, container) = (
            t.namespace.to_string(),
            t.pod.to_string(),
            t.container.to_string(),
        );
        let (uid, written) = (info.uid.clone(), addrs.clone());
        tokio::spawn(async move {
            annotations
                .annotate_until_done(&namespace, &pod, uid.as_deref(), &container, &written)
                .await;
            drop(serial);
        });
        let net = PodNetwork {
            host_ifname,
            pod_ifname: t.ifname.to_string(),
            addrs,
            mtu,
        };
        Ok(result(request, &net, attached.as_ref()))
    }

    /// Puts the pod in the policy driver's registry; the generation to wait for, when the
    /// daemon enforces policy.
    fn register_endpoint(
        &self,
        t: &Target<'_>,
        host_ifname: &str,
        addrs: &[IpNet],
        info: &PodInfo,
    ) -> Option<u64> {
        let registry = self.endpoints.as_ref()?;
        Some(registry.register(LocalEndpoint {
            namespace: t.namespace.to_string(),
            pod: t.pod.to_string(),
            container: t.container.to_string(),
            interface: host_ifname.to_string(),
            ips: addrs.iter().map(IpNet::addr).collect(),
            object: info.object.clone(),
        }))
    }

    fn forget_endpoint(&self, t: &Target<'_>) {
        if let Some(registry) = &self.endpoints {
            registry.remove(t.namespace, t.pod, t.container);
        }
    }

    /// Bounded: an ADD never answers success before its pod's policy exists, and a
    /// driver that cannot commit fails the ADD with an error naming policy.
    async fn wait_policy(
        &self,
        generation: Option<u64>,
        t: &Target<'_>,
    ) -> Result<(), HandlerError> {
        let (Some(registry), Some(generation)) = (&self.endpoints, generation) else {
            return Ok(());
        };
        let pod = format!("{}/{}", t.namespace, t.pod);
        registry
            .wait_committed(generation, &pod, POLICY_WAIT)
            .await
            .map_err(HandlerError::from)
    }

    async fn release_failed(&self, handle: &str) {
        if let Err(undo) = self.ipam.release_by_handle(handle).await {
            tracing::warn!(handle, error = %undo, "could not release the addresses of a failed ADD");
        }
    }

    async fn allocate(
        &self,
        handle: &str,
        t: &Target<'_>,
        info: &PodInfo,
        opts: &IpamOptions,
    ) -> Result<Vec<IpNet>, HandlerError> {
        let attrs = options::attributes(
            &self.settings.node,
            t.namespace,
            t.pod,
            info.uid.as_deref(),
            Utc::now(),
        );
        if let Some(value) = info.annotations.get(ANNOTATION_IP_ADDRS) {
            let wanted = parse_ip_addrs(value)?;
            let mut got = Vec::new();
            for addr in wanted {
                match self
                    .ipam
                    .assign_ip(addr, handle, attrs.clone(), AllowedUse::Workload)
                    .await
                {
                    Ok(net) => got.push(net),
                    Err(e) => {
                        if !got.is_empty() {
                            let _ = self.ipam.release_by_handle(handle).await;
                        }
                        return Err(e.into());
                    }
                }
            }
            return Ok(got);
        }
        let req = AssignRequest {
            v4: opts.v4,
            v6: opts.v6,
            pod_annotations: Some(info.annotations.clone()),
            namespace_annotations: Some(info.namespace_annotations.clone()),
            namespace_labels: Some(info.namespace_labels.clone()),
            cni_v4_pools: opts.v4_pools.clone(),
            cni_v6_pools: opts.v6_pools.clone(),
            ..AssignRequest::workload(handle, attrs)
        };
        Ok(self.ipam.auto_assign(&req).await?)
    }

    async fn repeat_add(
        &self,
        request: &Request,
        t: &Target<'_>,
        netns: Option<&File>,
        existing: Vec<IpNet>,
        mtu: u32,
    ) -> Result<CniResult, HandlerError> {
        let net = PodNetwork {
            host_ifname: host_veth_name(t.namespace, t.pod),
            pod_ifname: t.ifname.to_string(),
            addrs: existing,
            mtu,
        };
        let differs = |problem: String| HandlerError::ExistingDiffers {
            container: t.container.to_string(),
            addrs: net
                .addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            problem,
        };
        let attached = match netns {
            Some(ns) => {
                self.plumber
                    .check(ns, &net)
                    .await
                    .map_err(|e| differs(e.to_string()))?;
                Some(self.plumber.attached(ns, &net).await?)
            }
            None => None,
        };
        // After a daemon restart the registry no longer knows the pod: its policy is
        // confirmed again before the answer.
        if attached.is_some() {
            let info = PodInfo::default();
            let policy = self.register_endpoint(t, &net.host_ifname, &net.addrs, &info);
            self.wait_policy(policy, t).await?;
        }
        tracing::info!(
            container = t.container,
            "ADD repeated for a live attachment: answering with it"
        );
        Ok(result(request, &net, attached.as_ref()))
    }

    pub(super) async fn check(
        &self,
        request: &Request,
        netns: Option<File>,
    ) -> Result<(), HandlerError> {
        let t = target(request)?;
        let netns = self.pod_netns(t.container, request.netns.as_deref(), netns)?;
        let _serial = self.locks.lock(t.container).await;
        let handle = pod_handle(t.container);
        let fail = |problem: String| HandlerError::Check {
            container: t.container.to_string(),
            problem,
        };
        let mut held: Vec<IpNet> = self
            .ipam
            .addresses_of(&handle)
            .into_iter()
            .map(host_prefix)
            .collect();
        held.sort();
        if held.is_empty() {
            return Err(fail(format!("IPAM holds no address for handle {handle}")));
        }
        if let Some(prev) = &request.prev_result {
            let mut wanted: Vec<IpNet> = prev.ips.iter().map(|ip| ip.address).collect();
            wanted.sort();
            if wanted != held {
                return Err(fail(format!(
                    "prevResult lists {} but IPAM holds {} for handle {handle}",
                    list(&wanted),
                    list(&held)
                )));
            }
        }
        if request.kind == PluginKind::Ipam {
            return Ok(());
        }
        let Some(ns) = netns else {
            return Err(HandlerError::NoNetns {
                command: Command::Check,
                container: t.container.to_string(),
            });
        };
        // The pod MTU is live (FelixConfiguration); only one the network config fixes is
        // compared, since a pod keeps the MTU it was created with.
        let mtu = options::mtu(&request.raw_config, 0)?;
        let net = PodNetwork {
            host_ifname: host_veth_name(t.namespace, t.pod),
            pod_ifname: t.ifname.to_string(),
            addrs: held,
            mtu,
        };
        self.plumber
            .check(&ns, &net)
            .await
            .map_err(|e| fail(e.to_string()))
    }
}

fn list(addrs: &[IpNet]) -> String {
    if addrs.is_empty() {
        return "nothing".into();
    }
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The spec's result: host and pod interfaces, each IP on the pod interface, default routes.
fn result(request: &Request, net: &PodNetwork, attached: Option<&Attached>) -> CniResult {
    let mut out = CniResult::default();
    let pod_index = attached.map(|a| {
        let mtu = (net.mtu != 0).then_some(net.mtu);
        out.interfaces.push(Interface {
            name: net.host_ifname.clone(),
            mac: Some(a.host_mac.clone()),
            mtu,
            ..Default::default()
        });
        out.interfaces.push(Interface {
            name: net.pod_ifname.clone(),
            mac: Some(a.pod_mac.clone()),
            mtu,
            sandbox: request.netns.clone(),
            ..Default::default()
        });
        1
    });
    for addr in &net.addrs {
        out.ips.push(IpConfig {
            address: *addr,
            gateway: pod_index.map(|_| PodNetwork::gateway_for(addr.addr())),
            interface: pod_index,
        });
    }
    let mut families: Vec<bool> = net.addrs.iter().map(|a| a.addr().is_ipv6()).collect();
    families.dedup();
    for v6 in families {
        let (dst, probe) = if v6 {
            (
                IpNet::V6(Ipv6Net::default()),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            )
        } else {
            (
                IpNet::V4(Ipv4Net::default()),
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            )
        };
        out.routes.push(Route {
            dst,
            gw: pod_index.map(|_| PodNetwork::gateway_for(probe)),
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        });
    }
    out
}
