//! Install into the host: the plugin binary (`tortie`, `tortie-ipam`) into the CNI bin dir
//! and `10-tortie.conflist` into the CNI config dir. Every file is written atomically (temp
//! file in the same directory, fsync, rename, fsync of the directory) and left alone when its
//! content is already right, so kubelet and runtimes never read a partial file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::netconf::DEFAULT_SOCKET;

pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
pub const CONFLIST_NAME: &str = "10-tortie.conflist";
/// Calico's network name: pod handles are `<network>.<containerID>`.
pub const NETWORK_NAME: &str = "k8s-pod-network";
pub const PLUGIN_NAMES: [&str; 2] = ["tortie", "tortie-ipam"];
/// What tortie speaks; the conflist offers the ones every chained plugin speaks too.
const OUR_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// What to do with other CNI configs in the config dir.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OtherConfigs {
    /// Leave every other file alone.
    #[default]
    Leave,
    /// Remove these file names (e.g. a previous CNI's `10-calico.conflist`).
    Remove(Vec<String>),
    /// Remove every other `*.conf`, `*.conflist` and `*.json`, so tortie's is the one used.
    RemoveAll,
}

/// Where and what to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallSettings {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub socket: PathBuf,
    pub mtu: u32,
    pub other_configs: OtherConfigs,
}

impl Default for InstallSettings {
    fn default() -> InstallSettings {
        InstallSettings {
            bin_dir: PathBuf::from(DEFAULT_BIN_DIR),
            conf_dir: PathBuf::from(DEFAULT_CONF_DIR),
            socket: PathBuf::from(DEFAULT_SOCKET),
            mtu: 1500,
            other_configs: OtherConfigs::Leave,
        }
    }
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Written,
    Unchanged,
}

/// Copies `source` (normally /proc/self/exe) to `<bin_dir>/tortie`; `tortie-ipam` is a hard
/// link to it (one binary's worth of disk, and the two can never differ).
pub fn install_binaries(
    source: &Path,
    bin_dir: &Path,
) -> Result<Vec<(PathBuf, Outcome)>, InstallError> {
    fs::create_dir_all(bin_dir).map_err(io_err("create", bin_dir))?;
    let mut out = Vec::new();
    for name in PLUGIN_NAMES {
        let target = bin_dir.join(name);
        let first = bin_dir.join(PLUGIN_NAMES[0]);
        if target != first {
            let outcome = hard_link_over(&first, &target)?;
            tracing::info!(path = %target.display(), ?outcome, "CNI plugin binary (hard link)");
            out.push((target, outcome));
            continue;
        }
        let outcome = if same_content(source, &target)? {
            Outcome::Unchanged
        } else {
            let mut src = File::open(source).map_err(io_err("open", source))?;
            write_atomic(&target, 0o755, |f| io::copy(&mut src, f).map(|_| ()))?;
            Outcome::Written
        };
        tracing::info!(path = %target.display(), ?outcome, "CNI plugin binary");
        out.push((target, outcome));
    }
    Ok(out)
}

/// Makes `target` a hard link to `original`, atomically (link to a temporary name, rename
/// over); Unchanged when it already is one. Falls back to a copy where links cannot be made.
fn hard_link_over(original: &Path, target: &Path) -> Result<Outcome, InstallError> {
    use std::os::unix::fs::MetadataExt;
    let orig = fs::metadata(original).map_err(io_err("stat", original))?;
    if let Ok(t) = fs::metadata(target)
        && t.ino() == orig.ino()
        && t.dev() == orig.dev()
    {
        return Ok(Outcome::Unchanged);
    }
    let tmp = target.with_extension("tortie-link");
    let _ = fs::remove_file(&tmp);
    match fs::hard_link(original, &tmp) {
        Ok(()) => fs::rename(&tmp, target).map_err(io_err("rename", target))?,
        Err(_) => {
            let mut src = File::open(original).map_err(io_err("open", original))?;
            write_atomic(target, 0o755, |f| io::copy(&mut src, f).map(|_| ()))?;
        }
    }
    Ok(Outcome::Written)
}

/// The versions `plugin` says it supports (CNI_COMMAND=VERSION), if it answers.
fn plugin_versions(plugin: &Path) -> Option<Vec<String>> {
    let out = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let list = v.get("supportedVersions")?.as_array()?;
    Some(
        list.iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
    )
}

/// tortie's conflist; `portmap` is chained when it exists in the bin dir (hostPort support).
/// `cniVersions` lists only versions every plugin of the list speaks.
pub fn conflist(settings: &InstallSettings) -> Value {
    let mut plugins = vec![json!({
        "type": "tortie",
        "mtu": settings.mtu,
        "socket": settings.socket,
        "ipam": {"type": "tortie-ipam"},
    })];
    let mut versions: Vec<String> = OUR_VERSIONS.iter().map(|s| s.to_string()).collect();
    let portmap = settings.bin_dir.join("portmap");
    if portmap.is_file() {
        // Unknown versions: assume only the oldest one tortie offers.
        let theirs = plugin_versions(&portmap).unwrap_or_else(|| vec![OUR_VERSIONS[0].into()]);
        versions.retain(|v| theirs.contains(v));
        plugins
            .push(json!({"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}));
    }
    let mut list = json!({
        "name": NETWORK_NAME,
        "cniVersion": OUR_VERSIONS[0],
        "plugins": plugins,
    });
    if versions.len() > 1 {
        list["cniVersions"] = json!(versions);
    }
    list
}

/// Writes the conflist (only when it differs) and applies `other_configs`. The caller calls
/// this once the daemon can serve ADDs: from then on kubelet may run the plugin.
pub fn write_conflist(settings: &InstallSettings) -> Result<(Outcome, Vec<PathBuf>), InstallError> {
    let dir = &settings.conf_dir;
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let mut text =
        serde_json::to_string_pretty(&conflist(settings)).unwrap_or_else(|_| String::from("{}"));
    text.push('\n');
    let target = dir.join(CONFLIST_NAME);
    let outcome = match fs::read(&target) {
        Ok(old) if old == text.as_bytes() => Outcome::Unchanged,
        _ => {
            write_atomic(&target, 0o644, |f| f.write_all(text.as_bytes()))?;
            Outcome::Written
        }
    };
    tracing::info!(path = %target.display(), ?outcome, "CNI network config");
    let removed = remove_other_configs(dir, &settings.other_configs)?;
    Ok((outcome, removed))
}

fn is_cni_config(name: &str) -> bool {
    [".conf", ".conflist", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

fn remove_other_configs(dir: &Path, policy: &OtherConfigs) -> Result<Vec<PathBuf>, InstallError> {
    let names: Vec<String> = match policy {
        OtherConfigs::Leave => return Ok(Vec::new()),
        OtherConfigs::Remove(names) => names.clone(),
        OtherConfigs::RemoveAll => fs::read_dir(dir)
            .map_err(io_err("list", dir))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_cni_config(n))
            .collect(),
    };
    let mut removed = Vec::new();
    for name in names {
        // Never ours, and never a path outside the directory.
        if name == CONFLIST_NAME || name.contains('/') || name.is_empty() {
            continue;
        }
        let path = dir.join(&name);
        match fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed another CNI config");
                removed.push(path);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
    }
    Ok(removed)
}

/// True when `target` exists with exactly the bytes of `source` (streamed, not loaded).
fn same_content(source: &Path, target: &Path) -> Result<bool, InstallError> {
    let Ok(mut b) = File::open(target) else {
        return Ok(false);
    };
    let mut a = File::open(source).map_err(io_err("open", source))?;
    let len_a = a.metadata().map_err(io_err("stat", source))?.len();
    match b.metadata() {
        Ok(m) if m.len() == len_a => {}
        _ => return Ok(false),
    }
    let (mut buf_a, mut buf_b) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut a, &mut buf_a).map_err(io_err("read", source))?;
        let m = read_full(&mut b, &mut buf_b).map_err(io_err("read", target))?;
        if n != m || buf_a[..n] != buf_b[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Temp file in the target's directory, filled by `fill`, fsynced, renamed over the target;
/// then the directory is fsynced so the rename survives a crash.
fn write_atomic(
    target: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), InstallError> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tortie-tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        fill(&mut f).map_err(io_err("write", &tmp))?;
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        // Closed before it takes the real name: a binary still open for writing cannot be
        // executed (ETXTBSY), and kubelet may run the plugin the moment it appears.
        drop(f);
        fs::rename(&tmp, target).map_err(io_err("rename into place", target))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_without_portmap_offers_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let s = InstallSettings {
            bin_dir: dir.path().to_path_buf(),
            mtu: 1450,
            ..Default::default()
        };
        let c = conflist(&s);
        assert_eq!(c["name"], "k8s-pod-network");
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["cniVersions"], json!(["1.0.0", "1.1.0"]));
        assert_eq!(c["plugins"].as_array().unwrap().len(), 1);
        assert_eq!(c["plugins"][0]["type"], "tortie");
        assert_eq!(c["plugins"][0]["mtu"], 1450);
        assert_eq!(c["plugins"][0]["socket"], DEFAULT_SOCKET);
        let list: super::super::NetConfList = serde_json::from_value(c).unwrap();
        assert_eq!(
            list.negotiated_version().unwrap(),
            super::super::CniVersion::V1_1_0
        );
    }

    #[test]
    fn config_file_names() {
        assert!(is_cni_config("10-calico.conflist"));
        assert!(is_cni_config("87-podman.conf"));
        assert!(!is_cni_config("calico-kubeconfig"));
    }
}
