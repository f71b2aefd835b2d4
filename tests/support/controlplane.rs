// A real control plane per test: etcd + kube-apiserver on loopback with free ports, throwaway
// certificates, RBAC, static tokens and client-cert users; manifests/crds installed. Drop stops
// both processes and removes the temp dir; leftovers of killed test processes are reaped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use rcgen::{CertifiedIssuer, ExtendedKeyUsagePurpose, KeyPair};

use super::binaries::bin_dir;
use super::credentials::{client_from, leaf, new_ca, random_token, write_kubeconfig};
use super::process::{Guarded, pid_alive};

const DIR_PREFIX: &str = "tortie-cp-";
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const CRD_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 3;
const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// etcd + kube-apiserver for one test; both are stopped and their files removed on Drop.
/// The user whose requests kube-apiserver audits: the manifest's service account.
pub const AUDITED_USER: &str = "system:serviceaccount:kube-system:tortie-node";
const AUDIT_LOG: &str = "audit.log";
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    users: ["system:serviceaccount:kube-system:tortie-node"]
  - level: None
"#;

pub struct ControlPlane {
    apiserver: Guarded,
    etcd: Guarded,
    client: Client,
    url: String,
    etcd_url: String,
    kubeconfig: PathBuf,
    nobody_token: String,
    ca: CertifiedIssuer<'static, KeyPair>,
    startup: Duration,
    // Declared last: removed only after the processes above are gone.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver, waits for /readyz, installs the CRDs in manifests/crds.
    pub async fn start() -> anyhow::Result<ControlPlane> {
        Self::start_with(true, LOOPBACK).await
    }

    /// Like `start`, with kube-apiserver listening on `bind` (in its serving certificate's
    /// SANs) instead of loopback, so that processes in test namespaces can reach it through a
    /// veth to the root namespace. `bind` must already be assigned (a 198.18.0.0/15 address).
    pub async fn start_on(bind: std::net::IpAddr) -> anyhow::Result<ControlPlane> {
        Self::start_with(true, bind).await
    }

    /// Like `start`, without installing the repo's CRDs (for tests of the harness itself or
    /// of built-in resources only).
    pub async fn start_bare() -> anyhow::Result<ControlPlane> {
        Self::start_with(false, LOOPBACK).await
    }

    async fn start_with(crds: bool, bind: std::net::IpAddr) -> anyhow::Result<ControlPlane> {
        let t0 = Instant::now();
        static REAP: Once = Once::new();
        REAP.call_once(|| {
            if let Err(e) = reap_stale_dirs() {
                eprintln!("control-plane reaper: {e:#}");
            }
        });
        let bin = tokio::task::spawn_blocking(bin_dir)
            .await
            .context("bin_dir task")??;
        let mut attempt = 1;
        let mut cp = loop {
            match Self::start_once(bin, t0, bind).await {
                Ok(cp) => break cp,
                // Free ports are picked then released: another process may grab one first.
                Err(e)
                    if attempt < START_ATTEMPTS
                        && format!("{e:#}").contains("address already in use") =>
                {
                    eprintln!("control plane: port taken, retrying: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let serving = t0.elapsed();
        let crds = if crds { cp.install_crds().await? } else { 0 };
        cp.startup = t0.elapsed();
        eprintln!(
            "control plane {} ready in {} ms (/readyz ok after {} ms, then {crds} CRDs; etcd pid {}, kube-apiserver pid {})",
            cp.url,
            cp.startup.as_millis(),
            serving.as_millis(),
            cp.etcd.pid(),
            cp.apiserver.pid()
        );
        Ok(cp)
    }

    async fn start_once(
        bin: &Path,
        t0: Instant,
        bind: std::net::IpAddr,
    ) -> anyhow::Result<ControlPlane> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("create control-plane temp dir")?;
        let d = dir.path();
        let [etcd_port, peer_port, api_port] = free_ports()?;
        let url = format!("https://{bind}:{api_port}");
        let bind_text = bind.to_string();
        let mut sans = vec!["127.0.0.1", "localhost"];
        if !bind.is_loopback() {
            sans.push(&bind_text);
        }
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");

        let ca = new_ca()?;
        let ca_pem = ca.pem();
        let (serving_cert, serving_key) = leaf(
            &ca,
            &sans,
            "kube-apiserver",
            &[],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let sa_key = KeyPair::generate().context("generate service-account key")?;
        let admin_token = random_token();
        let nobody_token = random_token();
        write(d, "ca.crt", &ca_pem)?;
        write(d, "serving.crt", &serving_cert)?;
        write(d, "serving.key", &serving_key)?;
        write(d, "sa.key", &sa_key.serialize_pem())?;
        write(d, "sa.pub", &sa_key.public_key_pem())?;
        write(
            d,
            "tokens.csv",
            &format!(
                "{admin_token},admin,admin-uid,\"system:masters\"\n{nobody_token},nobody,nobody-uid\n"
            ),
        )?;

        write(d, "audit-policy.yaml", AUDIT_POLICY)?;

        let mut etcd_cmd = Command::new(bin.join("etcd"));
        etcd_cmd
            .arg("--name=tortie-test")
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=tortie-test=http://127.0.0.1:{peer_port}"
            ))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let mut etcd = Guarded::spawn("etcd", logged(etcd_cmd, &d.join("etcd.log"))?)?;
        // kube-apiserver would retry, but its log would fill with dial errors that bury the
        // real cause when something fails; etcd listens within ~100 ms.
        wait_listening(&mut etcd, etcd_port, &d.join("etcd.log")).await?;

        let p = |f: &str| d.join(f).display().to_string();
        let mut api_cmd = Command::new(bin.join("kube-apiserver"));
        api_cmd
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg(format!("--bind-address={bind}"))
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--cert-dir={}", p("certs")))
            .arg(format!("--tls-cert-file={}", p("serving.crt")))
            .arg(format!("--tls-private-key-file={}", p("serving.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg(format!("--token-auth-file={}", p("tokens.csv")))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-issuer={url}"))
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p("sa.key")
            ))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--allow-privileged=true")
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--profiling=false")
            .arg("--enable-priority-and-fairness=false")
            // Requests of the manifest's service account only (tests/rbac.rs reads them); every
            // other user is not audited, so other tests pay nothing for it.
            .arg(format!("--audit-policy-file={}", p("audit-policy.yaml")))
            .arg(format!("--audit-log-path={}", p(AUDIT_LOG)))
            .arg("--audit-log-format=json")
            .arg("--audit-log-mode=blocking");
        let apiserver = Guarded::spawn(
            "kube-apiserver",
            logged(api_cmd, &d.join("kube-apiserver.log"))?,
        )?
        // Its graceful shutdown takes ~1.5 s (controllers winding down) and nothing of a
        // test's data matters afterwards: a short grace, then SIGKILL.
        .with_grace(Duration::from_millis(500));

        let kubeconfig = d.join("admin.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &url,
            &ca_pem,
            "admin",
            serde_json::json!({ "token": admin_token }),
        )?;
        let client = client_from(&kubeconfig).await?;

        let mut cp = ControlPlane {
            apiserver,
            etcd,
            client,
            url,
            etcd_url,
            kubeconfig,
            nobody_token,
            ca,
            startup: t0.elapsed(),
            dir,
        };
        cp.wait_ready().await?;
        Ok(cp)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last: String;
        loop {
            for (proc, log) in [
                (&mut self.etcd, "etcd.log"),
                (&mut self.apiserver, "kube-apiserver.log"),
            ] {
                if let Err(e) = proc.check_running() {
                    bail!(
                        "{e:#}\n--- {log} (tail) ---\n{}",
                        tail(&self.dir.path().join(log))
                    );
                }
            }
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .context("build /readyz request")?;
            match self.client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = format!("{e}"),
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver {} not ready after {READY_TIMEOUT:?}; last /readyz: {last}\n{}",
                    self.url,
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn install_crds(&self) -> anyhow::Result<usize> {
        let crds = read_crds(&Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/crds"))?;
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for crd in &crds {
            let name = crd.metadata.name.as_deref().unwrap_or_default();
            // The API server's Status says which field is invalid; Display may drop it.
            if let Err(e) = api.create(&PostParams::default(), crd).await {
                bail!("create CRD {name} from manifests/crds: {e:?}");
            }
        }
        let waits = crds.iter().map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let api = api.clone();
            async move {
                tokio::time::timeout(
                    CRD_TIMEOUT,
                    await_condition(api, &name, conditions::is_crd_established()),
                )
                .await
                .with_context(|| format!("CRD {name} not Established after {CRD_TIMEOUT:?}"))?
                .with_context(|| format!("watch CRD {name}"))?;
                anyhow::Ok(())
            }
        });
        futures::future::try_join_all(waits).await?;
        Ok(crds.len())
    }

    /// Admin client (user `admin`, group `system:masters`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Admin kubeconfig for subprocesses (`KUBECONFIG=...`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The temp dir holding certificates, kubeconfigs, logs and etcd's data.
    /// kube-apiserver's audit log (JSON lines): requests of `AUDITED_USER` only.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join(AUDIT_LOG)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Pids of etcd and kube-apiserver.
    pub fn pids(&self) -> [u32; 2] {
        [self.etcd.pid(), self.apiserver.pid()]
    }

    /// Time from `start()` until ready with CRDs installed.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Bearer token of the static user `nobody`: authenticated, in no group, granted nothing.
    pub fn nobody_token(&self) -> &str {
        &self.nobody_token
    }

    /// A kubeconfig (written into the temp dir) for a bearer token.
    pub fn kubeconfig_for_token(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let file = name.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let path = self.dir.path().join(format!("token-{file}.kubeconfig"));
        write_kubeconfig(
            &path,
            &self.url,
            &self.ca.pem(),
            name,
            serde_json::json!({ "token": token }),
        )?;
        Ok(path)
    }

    /// A client that authenticates with a bearer token (e.g. `nobody_token()`).
    pub async fn client_for_token(&self, name: &str, token: &str) -> anyhow::Result<Client> {
        client_from(&self.kubeconfig_for_token(name, token)?).await
    }

    /// A kubeconfig with a client certificate for `user` in `groups` (real authentication,
    /// not impersonation), e.g. `system:serviceaccount:kube-system:tortie`.
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let (cert, key) = leaf(
            &self.ca,
            &[],
            user,
            groups,
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let file = user.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let path = self.dir.path().join(format!("cert-{file}.kubeconfig"));
        let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
        let auth = serde_json::json!({
            "client-certificate-data": b64(&cert),
            "client-key-data": b64(&key),
        });
        write_kubeconfig(&path, &self.url, &self.ca.pem(), user, auth)?;
        Ok(path)
    }

    /// A client authenticated as `user` in `groups` by client certificate.
    pub async fn client_for(&self, user: &str, groups: &[&str]) -> anyhow::Result<Client> {
        client_from(&self.kubeconfig_for(user, groups)?).await
    }

    pub async fn create_namespace(&self, name: &str) -> anyhow::Result<Namespace> {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("create namespace {name}"))
    }

    /// A plain Node object (no kubelet behind it).
    pub async fn create_node(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<Node> {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Node>::all(self.client())
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("create node {name}"))
    }

    /// The last lines of both logs, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for log in ["etcd.log", "kube-apiserver.log"] {
            let _ = write!(
                out,
                "--- {log} (tail) ---\n{}\n",
                tail(&self.dir.path().join(log))
            );
        }
        out
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The API server first, so it does not log a storm of etcd connection errors.
        self.apiserver.stop();
        self.etcd.stop();
    }
}

/// Removes temp dirs of test processes that died without running Drop (SIGKILL, abort).
/// Their etcd/kube-apiserver already died with them (PR_SET_PDEATHSIG).
pub fn reap_stale_dirs() -> anyhow::Result<Vec<PathBuf>> {
    let tmp = std::env::temp_dir();
    let mut reaped = Vec::new();
    for entry in std::fs::read_dir(&tmp).with_context(|| format!("read {}", tmp.display()))? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !pid_alive(pid) {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("remove {}", entry.path().display()))?;
            reaped.push(entry.path());
        }
    }
    Ok(reaped)
}

/// Waits until `port` on loopback accepts connections, failing early if `proc` exits.
async fn wait_listening(proc: &mut Guarded, port: u16, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Err(e) = proc.check_running() {
            bail!("{e:#}\n--- {} (tail) ---\n{}", log.display(), tail(log));
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on 127.0.0.1:{port} after 20 s\n{}",
                tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Three distinct free loopback ports (held together while choosing so they differ).
fn free_ports() -> anyhow::Result<[u16; 3]> {
    let listeners = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("bind a free loopback port")?;
    let mut ports = [0; 3];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr().context("local addr")?.port();
    }
    Ok(ports)
}

fn write(dir: &Path, name: &str, content: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))
}

/// `cmd` with stdout and stderr appended to `log`.
fn logged(mut cmd: Command, log: &Path) -> anyhow::Result<Command> {
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = file.try_clone().context("dup log fd")?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(err);
    Ok(cmd)
}

/// Every CustomResourceDefinition in the *.yaml / *.yml files of `dir` (multi-document files
/// allowed), in file-name order.
pub fn read_crds(dir: &Path) -> anyhow::Result<Vec<CustomResourceDefinition>> {
    use serde::Deserialize as _;
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    files.sort();
    let mut crds = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc)
                .with_context(|| format!("parse {}", file.display()))?;
            if value.is_null() {
                continue;
            }
            let crd: CustomResourceDefinition =
                serde_yaml::from_value(value).with_context(|| {
                    format!("{} holds a document that is not a CRD", file.display())
                })?;
            crds.push(crd);
        }
    }
    Ok(crds)
}

/// The last 40 lines of a log file, without kube-apiserver's gRPC dial chatter (its storage
/// clients cancel dials routinely, and those lines would bury the real cause).
fn tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("addrConn.createTransport failed"))
                .collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
