//! The objects named `default` that Calico's own components create and its tools expect:
//! ClusterInformation (calico-node; calicoctl reads it before `version`, `ipam check` and its
//! version check), FelixConfiguration (calico-node; `calicoctl patch felixconfiguration
//! default` needs it), KubeControllersConfiguration (kube-controllers; `ipam check` reads
//! it) and IPAMConfig (libcalico-go's IPAM). The Lease holder creates each one that is
//! absent and never changes one that exists; it looks again every `RECHECK`, so a deleted
//! object comes back.

use std::time::Duration;

use kube::api::{Api, PostParams};
use kube::{Client, CustomResourceExt, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::api::clusterinformation::CLUSTER_INFORMATION_NAME;
use crate::api::felixconfiguration::GLOBAL_NAME;
use crate::api::ipamconfig::IPAM_CONFIG_NAME;
use crate::api::kubecontrollersconfiguration::KUBE_CONTROLLERS_CONFIGURATION_NAME;
use crate::api::{
    ClusterInformation, ClusterInformationSpec, FelixConfiguration, FelixConfigurationSpec,
    IPAMConfig, IPAMConfigSpec, KubeControllersConfiguration, KubeControllersConfigurationSpec,
};

/// How often the leader looks for a missing object again.
pub const RECHECK: Duration = Duration::from_secs(60);
const RETRY: Duration = Duration::from_secs(5);

/// A random cluster GUID as Calico writes it: 16 random bytes in hex (`uuid.New()`).
pub fn new_cluster_guid() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// Creates `obj` unless an object of that name exists. Returns whether it was created.
async fn ensure<K>(api: &Api<K>, obj: K) -> Result<bool, kube::Error>
where
    K: Resource + CustomResourceExt + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    if api.get_opt(&name).await?.is_some() {
        return Ok(false);
    }
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
        Err(e) => Err(e),
    }
}

/// One pass: every absent object created. `leak_grace_secs` goes into the
/// KubeControllersConfiguration the way tortie's GC uses it.
pub async fn ensure_all(client: &Client, leak_grace_secs: u64) -> Result<(), kube::Error> {
    let created = [
        (
            "ClusterInformation",
            ensure(
                &Api::all(client.clone()),
                ClusterInformation::new(
                    CLUSTER_INFORMATION_NAME,
                    ClusterInformationSpec::for_tortie(new_cluster_guid()),
                ),
            )
            .await?,
        ),
        (
            "KubeControllersConfiguration",
            ensure(
                &Api::all(client.clone()),
                KubeControllersConfiguration::new(
                    KUBE_CONTROLLERS_CONFIGURATION_NAME,
                    KubeControllersConfigurationSpec::for_tortie(leak_grace_secs),
                ),
            )
            .await?,
        ),
        (
            "IPAMConfig",
            ensure(
                &Api::all(client.clone()),
                IPAMConfig::new(IPAM_CONFIG_NAME, IPAMConfigSpec::default()),
            )
            .await?,
        ),
        (
            "FelixConfiguration",
            ensure(
                &Api::all(client.clone()),
                FelixConfiguration::new(GLOBAL_NAME, FelixConfigurationSpec::default()),
            )
            .await?,
        ),
    ];
    for (kind, made) in created {
        if made {
            tracing::info!(kind, name = "default", "created Calico's default object");
        }
    }
    Ok(())
}

/// While this daemon holds the Lease, keeps the objects present; until `stopped`.
pub async fn run(
    client: Client,
    mut is_leader: watch::Receiver<bool>,
    leak_grace_secs: u64,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            r = is_leader.wait_for(|l| *l) => if r.is_err() { return },
        }
        let pause = match ensure_all(&client, leak_grace_secs).await {
            Ok(()) => RECHECK,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create Calico's default objects; retrying");
                RETRY
            }
        };
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_32_hex_digits_and_differ() {
        let a = new_cluster_guid();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_cluster_guid());
    }
}
