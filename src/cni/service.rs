//! The CNI side of `tortie node` in three calls for the daemon's wiring: the flags,
//! `install_binaries` (first act at start-up), `CniService::start` (after the datastore
//! synced: socket serving) and `CniService::write_conflist` (once ADDs can be served).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kube::Client;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::handlers::{CniDaemon, CniSettings};
use super::install::{
    self, DEFAULT_BIN_DIR, DEFAULT_CONF_DIR, InstallError, InstallSettings, OtherConfigs, Outcome,
};
use super::netconf::DEFAULT_SOCKET;
use super::plumbing::{Plumber, PlumbingError};
use super::server::{self, ServerError};
use crate::ipam::Ipam;

/// The daemon's own namespace as seen by the calling thread (never a setns'd helper).
const OWN_NETNS: &str = "/proc/thread-self/ns/net";

/// Flags of the CNI side; `#[command(flatten)]` them into the node's flags.
#[derive(Clone, Debug, clap::Args)]
pub struct CniNodeArgs {
    /// Host CNI bin dir (mounted from the host) where `tortie` and `tortie-ipam` go.
    #[arg(long, env = "TORTIE_CNI_BIN_DIR", default_value = DEFAULT_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    /// Host CNI config dir where `10-tortie.conflist` goes.
    #[arg(long, env = "TORTIE_CNI_CONF_DIR", default_value = DEFAULT_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// The daemon's unix socket for the plugin.
    #[arg(long, env = "TORTIE_CNI_SOCKET", default_value = DEFAULT_SOCKET)]
    pub cni_socket: PathBuf,
    /// Pod MTU; 0 means host MTU minus the overlay's overhead.
    #[arg(long, env = "TORTIE_CNI_MTU", default_value_t = 0)]
    pub cni_mtu: u32,
    /// Other CNI configs to remove from the config dir (comma list; `*` = every other one).
    #[arg(long, env = "TORTIE_CNI_REMOVE_CONFIGS", value_delimiter = ',')]
    pub cni_remove_configs: Vec<String>,
}

impl CniNodeArgs {
    /// The install settings for a pod MTU already resolved by the caller.
    pub fn install_settings(&self, mtu: u32) -> InstallSettings {
        let other_configs = if self.cni_remove_configs.iter().any(|c| c == "*") {
            OtherConfigs::RemoveAll
        } else if self.cni_remove_configs.is_empty() {
            OtherConfigs::Leave
        } else {
            OtherConfigs::Remove(self.cni_remove_configs.clone())
        };
        InstallSettings {
            bin_dir: self.cni_bin_dir.clone(),
            conf_dir: self.cni_conf_dir.clone(),
            socket: self.cni_socket.clone(),
            mtu,
            other_configs,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Plumbing(#[from] PlumbingError),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Start-up step 2: the running binary into the host's CNI bin dir.
pub fn install_binaries(args: &CniNodeArgs) -> Result<(), ServiceError> {
    install::install_binaries(Path::new("/proc/self/exe"), &args.cni_bin_dir)?;
    Ok(())
}

/// The socket server and the daemon behind it.
pub struct CniService {
    pub daemon: Arc<CniDaemon>,
    settings: InstallSettings,
    pub task: AbortHandle,
}

impl CniService {
    /// After the datastore and IPAM synced: serves the socket and reports ready for ADDs.
    /// `mtu` is the live pod MTU; the conflist carries `--cni-mtu` (0: the daemon decides
    /// per ADD, so a FelixConfiguration change reaches the next pod).
    // Start-up wiring: each argument is a distinct handle the daemon already holds.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        args: &CniNodeArgs,
        node: &str,
        mtu: watch::Receiver<u32>,
        client: Client,
        ipam: Arc<Ipam>,
        stop: watch::Receiver<bool>,
        health: &crate::health::Registry,
        pods: Option<crate::cni::handlers::SharedStores>,
    ) -> Result<CniService, ServiceError> {
        let plumber = Plumber::open(Path::new(OWN_NETNS)).await?;
        let settings = CniSettings {
            node: node.to_string(),
            default_mtu: mtu,
        };
        let daemon = Arc::new(CniDaemon::with_pods(settings, client, ipam, plumber, pods));
        let listener = server::bind(&args.cni_socket)?;
        let task = health.supervise(
            "cni/server",
            crate::health::Expect {
                stall_after: None,
                ..Default::default()
            },
            tokio::spawn(server::serve(listener, daemon.clone(), stop)),
        );
        daemon.set_ready(true);
        Ok(CniService {
            daemon,
            settings: args.install_settings(args.cni_mtu),
            task,
        })
    }

    /// Start-up step after the first dataplane apply: from now on kubelet may call the plugin.
    pub fn write_conflist(&self) -> Result<Outcome, ServiceError> {
        Ok(install::write_conflist(&self.settings)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Harness {
        #[command(flatten)]
        args: CniNodeArgs,
    }

    #[test]
    fn defaults_are_the_standard_host_paths() {
        let a = Harness::try_parse_from(["t"]).unwrap().args;
        let s = a.install_settings(1450);
        assert_eq!(s.bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(s.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(s.socket, PathBuf::from("/var/run/tortie/cni.sock"));
        assert_eq!(s.other_configs, OtherConfigs::Leave);
        assert_eq!(s.mtu, 1450);
    }

    #[test]
    fn remove_configs_list_and_star() {
        let a = Harness::try_parse_from([
            "t",
            "--cni-remove-configs",
            "10-calico.conflist,10-flannel.conflist",
        ])
        .unwrap()
        .args;
        assert_eq!(
            a.install_settings(1500).other_configs,
            OtherConfigs::Remove(vec![
                "10-calico.conflist".into(),
                "10-flannel.conflist".into()
            ])
        );
        let a = Harness::try_parse_from(["t", "--cni-remove-configs", "*"])
            .unwrap()
            .args;
        assert_eq!(
            a.install_settings(1500).other_configs,
            OtherConfigs::RemoveAll
        );
    }
}
