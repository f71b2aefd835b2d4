//! What the daemon reads live from the merged settings: the MTU the next pod gets (read by
//! the CNI server per ADD) and the overlay's device settings (VXLAN MTU, port, VNI, checksum
//! offload; read by the overlay loop). Both are recomputed whenever the settings, the host
//! MTU or the pools' encapsulations change.

use std::time::Duration;

use kube::runtime::reflector::Store;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::merge::{Effective, pod_mtu};
use crate::api::{EncapMode, IPPool};
use crate::calc::OverlayConfig;
use crate::calc::offload::vxlan_tx_checksum_offload;

const POLL: Duration = Duration::from_millis(500);

/// Inputs that do not come from FelixConfiguration.
pub struct Inputs {
    pub effective: watch::Receiver<Effective>,
    pub host_mtu: watch::Receiver<u32>,
    pub pools: Store<IPPool>,
    /// `--cni-mtu`; 0 = computed.
    pub cni_mtu: u32,
    pub kernel_release: String,
    /// The datastore's change signal (pools); None: poll the pools every `POLL`.
    pub changes: Option<watch::Receiver<u64>>,
}

/// Values the daemon reads.
pub struct Outputs {
    pub pod_mtu: watch::Receiver<u32>,
    pub overlay: watch::Receiver<OverlayConfig>,
}

/// Whether any IPv4 pool uses VXLAN, IPIP (Felix's encapsulation detection from pools).
pub fn encapsulations(pools: &Store<IPPool>) -> (bool, bool) {
    let pools = pools.state();
    let v4 = || {
        pools
            .iter()
            .filter(|p| p.spec.cidr_net().is_ok_and(|c| c.addr().is_ipv4()))
    };
    (
        v4().any(|p| p.spec.vxlan_mode != EncapMode::Never),
        v4().any(|p| p.spec.ipip_mode != EncapMode::Never),
    )
}

/// The overlay settings for `e` on a host with `host_mtu`.
pub fn overlay_config(e: &Effective, host_mtu: u32, kernel_release: &str) -> OverlayConfig {
    OverlayConfig {
        host_mtu,
        vxlan_vni: e.vxlan_vni,
        vxlan_port: e.vxlan_port,
        vxlan_mtu: e.vxlan_mtu,
        ipip_mtu: e.ipip_mtu,
        vxlan_tx_checksum_offload: vxlan_tx_checksum_offload(
            e.checksum_offload_broken,
            kernel_release,
        ),
        ..OverlayConfig::default()
    }
}

fn compute(i: &Inputs) -> (u32, OverlayConfig) {
    let e = i.effective.borrow().clone();
    let host = *i.host_mtu.borrow();
    let (vxlan, ipip) = encapsulations(&i.pools);
    (
        pod_mtu(i.cni_mtu, host, vxlan, ipip, &e),
        overlay_config(&e, host, &i.kernel_release),
    )
}

/// Starts recomputing; the first values are ready on return.
pub fn spawn(mut i: Inputs) -> (Outputs, JoinHandle<()>) {
    let (mtu, overlay) = compute(&i);
    tracing::info!(
        pod_mtu = mtu,
        host_mtu = *i.host_mtu.borrow(),
        "pod MTU chosen"
    );
    let (mtu_tx, mtu_rx) = watch::channel(mtu);
    let (ov_tx, ov_rx) = watch::channel(overlay);
    let task = tokio::spawn(async move {
        loop {
            // Settings wake it; pools through the datastore's change signal, or by polling
            // without one.
            let pools_changed = async {
                match i.changes.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => {
                        tokio::time::sleep(POLL).await;
                        true
                    }
                }
            };
            tokio::select! {
                r = i.effective.changed() => if r.is_err() { return },
                r = i.host_mtu.changed() => if r.is_err() { return },
                ok = pools_changed => if !ok { return },
            }
            let (mtu, overlay) = compute(&i);
            mtu_tx.send_if_modified(|cur| {
                let changed = *cur != mtu;
                if changed {
                    tracing::info!(old = *cur, new = mtu, "pod MTU changed; new pods get it");
                    *cur = mtu;
                }
                changed
            });
            ov_tx.send_if_modified(|cur| {
                let changed = *cur != overlay;
                if changed {
                    *cur = overlay.clone();
                }
                changed
            });
            if mtu_tx.is_closed() && ov_tx.is_closed() {
                return;
            }
        }
    });
    (
        Outputs {
            pod_mtu: mtu_rx,
            overlay: ov_rx,
        },
        task,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_settings_carry_the_felix_values() {
        let e = Effective {
            vxlan_mtu: Some(1400),
            vxlan_port: 4790,
            vxlan_vni: 5000,
            checksum_offload_broken: Some(true),
            ..Effective::default()
        };
        let c = overlay_config(&e, 1500, "6.1.0");
        assert_eq!(
            (c.host_mtu, c.vxlan_mtu, c.vxlan_port, c.vxlan_vni),
            (1500, Some(1400), 4790, 5000)
        );
        assert!(!c.vxlan_tx_checksum_offload);
        let d = overlay_config(&Effective::default(), 1500, "6.1.0");
        assert!(d.vxlan_tx_checksum_offload);
        assert_eq!(d.vxlan_mtu, None);
    }
}
