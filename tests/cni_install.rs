// Installing the plugin into the host: binaries and conflist appear atomically (a reader
// polling meanwhile never sees a partial file), unchanged files are not rewritten, portmap
// is chained when present, other CNIs' configs are removed or left alone as configured.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tortie::cni::install::{
    self, CONFLIST_NAME, InstallSettings, OtherConfigs, Outcome, write_conflist,
};

/// Debian's containernetworking-plugins puts the reference plugins here.
const SYSTEM_PORTMAP: &str = "/usr/lib/cni/portmap";

fn settings(dir: &Path) -> InstallSettings {
    InstallSettings {
        bin_dir: dir.join("bin"),
        conf_dir: dir.join("net.d"),
        socket: dir.join("cni.sock"),
        mtu: 1450,
        other_configs: OtherConfigs::Leave,
    }
}

/// A "binary" of `len` bytes whose every byte depends on `version`.
fn payload(version: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(version))
        .collect()
}

/// Polls `path` until `stop`; every read must be absent or one of `allowed` exactly.
fn poll_reader(
    path: PathBuf,
    allowed: Vec<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let (mut reads, mut seen) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            match fs::read(&path) {
                Ok(bytes) => {
                    assert!(
                        allowed.contains(&bytes),
                        "reader saw a partial or foreign file of {} bytes at {}",
                        bytes.len(),
                        path.display()
                    );
                    seen += 1;
                }
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
            }
            reads += 1;
        }
        (reads, seen)
    })
}

#[test]
fn binaries_appear_atomically_while_a_reader_polls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = settings(dir.path());
    let src = dir.path().join("tortie-src");
    let versions: Vec<Vec<u8>> = (1..=4).map(|v| payload(v, 8 << 20)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = install::PLUGIN_NAMES
        .iter()
        .map(|n| poll_reader(s.bin_dir.join(n), versions.clone(), stop.clone()))
        .collect();
    for v in &versions {
        fs::write(&src, v)?;
        let done = install::install_binaries(&src, &s.bin_dir)?;
        assert!(done.iter().all(|(_, o)| *o == Outcome::Written));
        for name in install::PLUGIN_NAMES {
            assert_eq!(&fs::read(s.bin_dir.join(name))?, v);
            let mode = fs::metadata(s.bin_dir.join(name))?.mode() & 0o777;
            assert_eq!(mode, 0o755);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let (reads, seen) = r.join().expect("reader");
        assert!(
            reads > 0 && seen > 0,
            "reader never saw the file ({reads} reads)"
        );
    }
    // No temp files left behind.
    let names: Vec<_> = fs::read_dir(&s.bin_dir)?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    Ok(())
}

#[test]
fn conflist_appears_atomically_while_a_reader_polls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path());
    let mtus = [1400u32, 1410, 1420, 1430, 1440, 1450];
    let expected: Vec<Vec<u8>> = mtus
        .iter()
        .map(|m| {
            s.mtu = *m;
            let mut text = serde_json::to_string_pretty(&install::conflist(&s)).unwrap();
            text.push('\n');
            text.into_bytes()
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = poll_reader(s.conf_dir.join(CONFLIST_NAME), expected, stop.clone());
    for _ in 0..20 {
        for m in mtus {
            s.mtu = m;
            assert_eq!(write_conflist(&s)?.0, Outcome::Written);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, seen) = reader.join().expect("reader");
    assert!(seen > 0, "reader never saw the file ({reads} reads)");
    let written: serde_json::Value =
        serde_json::from_slice(&fs::read(s.conf_dir.join(CONFLIST_NAME))?)?;
    assert_eq!(written["plugins"][0]["mtu"], 1450);
    assert_eq!(written["plugins"][0]["socket"], s.socket.to_str().unwrap());
    Ok(())
}

#[test]
fn unchanged_files_are_not_rewritten() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = settings(dir.path());
    let src = dir.path().join("tortie-src");
    fs::write(&src, payload(7, 1 << 20))?;
    install::install_binaries(&src, &s.bin_dir)?;
    write_conflist(&s)?;
    let files: Vec<PathBuf> = install::PLUGIN_NAMES
        .iter()
        .map(|n| s.bin_dir.join(n))
        .chain([s.conf_dir.join(CONFLIST_NAME)])
        .collect();
    let before: Vec<(u64, i64, i64)> = files
        .iter()
        .map(|f| fs::metadata(f).map(|m| (m.ino(), m.mtime(), m.mtime_nsec())))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = install::install_binaries(&src, &s.bin_dir)?;
    assert!(
        again.iter().all(|(_, o)| *o == Outcome::Unchanged),
        "{again:?}"
    );
    assert_eq!(write_conflist(&s)?.0, Outcome::Unchanged);
    let after: Vec<(u64, i64, i64)> = files
        .iter()
        .map(|f| fs::metadata(f).map(|m| (m.ino(), m.mtime(), m.mtime_nsec())))
        .collect::<Result<_, _>>()?;
    assert_eq!(before, after);

    // A changed source of the same length is still noticed.
    let mut changed = payload(7, 1 << 20);
    changed[12345] ^= 0xff;
    fs::write(&src, &changed)?;
    let third = install::install_binaries(&src, &s.bin_dir)?;
    assert!(third.iter().all(|(_, o)| *o == Outcome::Written));
    assert_eq!(fs::read(s.bin_dir.join("tortie"))?, changed);
    Ok(())
}

#[test]
fn portmap_is_chained_when_present() -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new(SYSTEM_PORTMAP).is_file(),
        "{SYSTEM_PORTMAP} is missing: install Debian's containernetworking-plugins"
    );
    let dir = tempfile::tempdir()?;
    let s = settings(dir.path());
    fs::create_dir_all(&s.bin_dir)?;
    let without = install::conflist(&s);
    assert_eq!(without["plugins"].as_array().unwrap().len(), 1);

    fs::copy(SYSTEM_PORTMAP, s.bin_dir.join("portmap"))?;
    write_conflist(&s)?;
    let with: serde_json::Value =
        serde_json::from_slice(&fs::read(s.conf_dir.join(CONFLIST_NAME))?)?;
    let plugins = with["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 2);
    assert_eq!(plugins[1]["type"], "portmap");
    assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
    // Debian's portmap (1.1.x) stops at 1.0.0, so the list must not offer 1.1.0.
    assert_eq!(with["cniVersion"], "1.0.0");
    assert!(with.get("cniVersions").is_none(), "{with}");
    Ok(())
}

#[test]
fn other_configs_are_left_or_removed_as_configured() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut s = settings(dir.path());
    fs::create_dir_all(&s.conf_dir)?;
    let calico = s.conf_dir.join("10-calico.conflist");
    let podman = s.conf_dir.join("87-podman.conflist");
    let kubeconfig = s.conf_dir.join("calico-kubeconfig");
    for f in [&calico, &podman, &kubeconfig] {
        fs::write(f, "{}")?;
    }
    assert!(write_conflist(&s)?.1.is_empty());
    assert!(calico.exists() && podman.exists());

    s.other_configs = OtherConfigs::Remove(vec!["10-calico.conflist".into(), CONFLIST_NAME.into()]);
    assert_eq!(write_conflist(&s)?.1, vec![calico.clone()]);
    assert!(!calico.exists() && podman.exists());
    assert!(s.conf_dir.join(CONFLIST_NAME).exists());

    s.other_configs = OtherConfigs::RemoveAll;
    assert_eq!(write_conflist(&s)?.1, vec![podman.clone()]);
    assert!(kubeconfig.exists(), "not a CNI config: left alone");
    assert!(s.conf_dir.join(CONFLIST_NAME).exists());
    Ok(())
}
