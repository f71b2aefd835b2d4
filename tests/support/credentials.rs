// Throwaway credentials for a test control plane: a CA, serving and client certificates,
// bearer tokens, and kubeconfig files (plus kube clients) built from them.

use std::path::Path;

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

pub fn new_ca() -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "tortie-test-ca");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// A certificate signed by `ca` as (cert PEM, key PEM). Kubernetes reads the user from CN
/// and the groups from O.
pub fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    cn: &str,
    orgs: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> anyhow::Result<(String, String)> {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    for org in orgs {
        params
            .distinguished_name
            .push(DnType::OrganizationName, *org);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

pub fn random_token() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

pub fn write_kubeconfig(
    path: &Path,
    url: &str,
    ca_pem: &str,
    user: &str,
    auth: serde_json::Value,
) -> anyhow::Result<()> {
    let ca_b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ca_pem);
    let kc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "tortie-test", "cluster": { "server": url, "certificate-authority-data": ca_b64 } }],
        "users": [{ "name": user, "user": auth }],
        "contexts": [{ "name": "tortie-test", "context": { "cluster": "tortie-test", "user": user } }],
        "current-context": "tortie-test",
    });
    let yaml = serde_yaml::to_string(&kc).context("serialise kubeconfig")?;
    std::fs::write(path, yaml).with_context(|| format!("write {}", path.display()))
}

pub async fn client_from(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("read {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("load {}", kubeconfig.display()))?;
    Client::try_from(config).context("build kube client")
}
