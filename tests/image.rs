// The node image and the version it carries: `tortie version`, the Dockerfile's default
// VERSION, the manifest's image tag and the OCI label org.opencontainers.image.version of the
// archive scripts/image.sh builds all say the same; the archive holds the binary, `nft` and
// `ip`, and runs what the manifest's DaemonSet runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The version `tortie version` prints on its first line (`tortie <version>`).
fn reported_version(binary: &Path) -> String {
    let out = Command::new(binary)
        .arg("version")
        .output()
        .expect("tortie version");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let first = text.lines().next().unwrap_or_default();
    first
        .strip_prefix("tortie ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_string()
}

#[test]
fn the_version_agrees_in_binary_dockerfile_and_manifest() {
    let version = reported_version(Path::new(env!("CARGO_BIN_EXE_tortie")));
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let default = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("ARG VERSION="))
        .expect("ARG VERSION=<default> in the Dockerfile");
    assert_eq!(default, version, "the Dockerfile's default VERSION");
    let manifest = std::fs::read_to_string(repo().join("manifests/tortie.yaml")).expect("manifest");
    assert!(
        manifest.contains(&format!("image: ghcr.io/tortie/tortie:{version}")),
        "the manifest's image tag"
    );
}

/// The OCI layout unpacked (with the system's tar) into `dir`.
fn unpack(archive: &Path, dir: &Path) {
    let out = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(dir)
        .output()
        .expect("tar -xf");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn blob(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read JSON")).expect("JSON")
}

#[test]
#[ignore = "builds the release binary and a Debian rootfs with mmdebstrap, imports into a private containerd (minutes; root, mmdebstrap, umoci, containerd; the Debian mirror the first time): cargo test --test image -- --ignored"]
fn scripts_image_sh_builds_an_oci_archive_labelled_with_tortie_version() {
    let out = Command::new("bash")
        .arg(repo().join("scripts/image.sh"))
        .env_remove("TORTIE_IMAGE")
        .output()
        .expect("run scripts/image.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scripts/image.sh failed:\n{stderr}");
    let archive = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("the archive path")
            .trim(),
    );
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from);
    let version = reported_version(&target.join("release/tortie"));

    let dir = tempfile::tempdir().expect("tempdir");
    unpack(&archive, dir.path());
    assert!(dir.path().join("oci-layout").is_file());
    let index = json(&dir.path().join("index.json"));
    let desc = &index["manifests"][0];
    assert_eq!(
        desc["annotations"]["io.containerd.image.name"],
        format!("ghcr.io/tortie/tortie:{version}")
    );
    let manifest = json(&blob(dir.path(), desc["digest"].as_str().expect("digest")));
    let config = json(&blob(
        dir.path(),
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    ));
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], version.as_str());
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/tortie"])
    );
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["node"]));

    // The layers hold the binary and the tools the daemon runs.
    let mut names = String::new();
    for layer in manifest["layers"].as_array().expect("layers") {
        let out = Command::new("tar")
            .arg("-tzf")
            .arg(blob(
                dir.path(),
                layer["digest"].as_str().expect("layer digest"),
            ))
            .output()
            .expect("tar -tzf");
        assert!(out.status.success());
        names.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let names: Vec<&str> = names.lines().map(|n| n.trim_start_matches("./")).collect();
    for want in ["usr/local/bin/tortie", "usr/sbin/nft", "usr/bin/ip"] {
        assert!(names.contains(&want), "{want} not in the image");
    }
    // containerd accepts it as the local cluster imports it (`ctr -n k8s.io images import`):
    // a private containerd in a private mount namespace (its /run/containerd on a tmpfs),
    // gone when the script ends.
    let script = r#"set -eu
d=$(mktemp -d)
mkdir -p /run/containerd && mount -t tmpfs tmpfs /run/containerd
printf 'version = 2\nroot = "%s/root"\nstate = "%s/state"\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "%s/sock"\n' "$d" "$d" "$d" >"$d/config.toml"
containerd --config "$d/config.toml" >"$d/log" 2>&1 &
pid=$!
trap 'kill $pid; wait $pid || true; rm -rf "$d"' EXIT
for _ in $(seq 100); do [ -S "$d/sock" ] && break; sleep 0.1; done
ctr -a "$d/sock" -n k8s.io images import "$1" >&2
ctr -a "$d/sock" -n k8s.io images ls -q
"#;
    let out = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "bash",
            "-c",
            script,
            "import",
        ])
        .arg(&archive)
        .output()
        .expect("run containerd and ctr");
    assert!(
        out.status.success(),
        "ctr import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.trim() == format!("ghcr.io/tortie/tortie:{version}")),
        "imported images: {listed}"
    );

    let size = std::fs::metadata(&archive).expect("archive").len();
    eprintln!(
        "image {} ({version}): {:.1} MB archive",
        archive.display(),
        size as f64 / 1e6
    );
}
