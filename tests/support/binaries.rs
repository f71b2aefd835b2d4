// Where the upstream test binaries (etcd, kube-apiserver, cnitool) are: a folder named by
// TORTIE_CONTROLPLANE_BIN, else the one scripts/controlplane/build.sh builds and prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The folder with etcd and kube-apiserver: `TORTIE_CONTROLPLANE_BIN`, else what
/// scripts/controlplane/build.sh prints (it builds once per machine and caches).
pub fn bin_dir() -> anyhow::Result<&'static Path> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| locate_bins().map_err(|e| format!("{e:#}")));
    match found {
        Ok(p) => Ok(p.as_path()),
        Err(e) => bail!("{e}"),
    }
}

fn locate_bins() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("TORTIE_CONTROLPLANE_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/controlplane/build.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .with_context(|| format!("run {}", script.display()))?;
            if !out.status.success() {
                bail!("{} failed: {}", script.display(), out.status);
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
            PathBuf::from(
                last.with_context(|| format!("{} printed no folder", script.display()))?
                    .trim(),
            )
        }
    };
    for bin in ["etcd", "kube-apiserver"] {
        if !dir.join(bin).is_file() {
            bail!("{} has no {bin}", dir.display());
        }
    }
    Ok(dir)
}

/// cnitool from the same build as etcd and kube-apiserver.
pub fn cnitool() -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join("cnitool");
    if !path.is_file() {
        bail!("{} does not exist", path.display());
    }
    Ok(path)
}
