// The record of what `up` made (namespaces, the root link, processes, directories), written
// before each thing is created, so `down` can remove all of it even after `up` crashed.
// `teardown` is that removal; it is also what `up` runs on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::layout::Layout;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub layout: Option<Layout>,
    /// Pid of the `up` process that owns everything below.
    pub owner: u32,
    pub namespaces: Vec<String>,
    /// Root-namespace links (only the root end of the VNet link).
    pub root_links: Vec<String>,
    pub pids: Vec<u32>,
    pub dirs: Vec<PathBuf>,
}

/// Keeps `State` on disk in step with what exists.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    pub state: State,
}

impl Recorder {
    pub fn new(path: &Path, layout: &Layout) -> anyhow::Result<Recorder> {
        let mut r = Recorder {
            path: path.to_owned(),
            state: State {
                layout: Some(layout.clone()),
                owner: std::process::id(),
                ..State::default()
            },
        };
        r.state.dirs.push(layout.base_dir.clone());
        r.save()?;
        Ok(r)
    }

    pub fn namespace(&mut self, name: &str) -> anyhow::Result<()> {
        self.state.namespaces.push(name.to_owned());
        self.save()
    }

    pub fn root_link(&mut self, name: &str) -> anyhow::Result<()> {
        self.state.root_links.push(name.to_owned());
        self.save()
    }

    pub fn pid(&mut self, pid: u32) -> anyhow::Result<()> {
        self.state.pids.push(pid);
        self.save()
    }

    pub fn dir(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.state.dirs.push(dir.to_owned());
        self.save()
    }

    fn save(&self) -> anyhow::Result<()> {
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&self.state).context("encode sandbox state")?;
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("rename {} into place", tmp.display()))
    }
}

pub fn load(path: &Path) -> anyhow::Result<Option<State>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Removes everything `state` names, plus any namespace carrying the layout's prefix (pod
/// namespaces the agents made). Returns what it removed, for the report.
pub fn teardown(state: &State, state_file: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let me = std::process::id();
    for &pid in &state.pids {
        // A pid from a crashed run may have been reused: only stop what is visibly ours.
        if pid != me && is_sandbox_process(pid) && stop_pid(pid) {
            removed.push(format!("process {pid}"));
        }
    }
    let mut namespaces = state.namespaces.clone();
    if let Some(layout) = &state.layout {
        let prefix = format!("{}-", layout.prefix);
        for ns in list_netns() {
            if ns.starts_with(&prefix) && !namespaces.contains(&ns) {
                namespaces.push(ns);
            }
        }
    }
    // Pod namespaces first (their veths hang off node namespaces), then nodes, then the VNet.
    namespaces.sort_by_key(|n| std::cmp::Reverse(n.contains("-pod-")));
    for ns in &namespaces {
        if delete_netns(ns) {
            removed.push(format!("netns {ns}"));
        }
    }
    for link in &state.root_links {
        if quiet(Command::new("ip").args(["link", "del", link])) {
            removed.push(format!("root link {link}"));
        }
    }
    for dir in &state.dirs {
        if std::fs::remove_dir_all(dir).is_ok() {
            removed.push(format!("dir {}", dir.display()));
        }
    }
    if std::fs::remove_file(state_file).is_ok() {
        removed.push(format!("state {}", state_file.display()));
    }
    removed
}

fn list_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills what runs inside (so nothing keeps it alive), deletes its links, then the namespace.
pub fn delete_netns(ns: &str) -> bool {
    if !Path::new("/run/netns").join(ns).exists() {
        return false;
    }
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            stop_pid(pid);
        }
    }
    if let Ok(out) = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name != "lo" {
                quiet(Command::new("ip").args(["-n", ns, "link", "del", name]));
            }
        }
    }
    quiet(Command::new("ip").args(["netns", "del", ns]))
}

/// SIGTERM, up to 3 s, then SIGKILL. False when the process was already gone.
fn stop_pid(pid: u32) -> bool {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let p = Pid::from_raw(pid as i32);
    if !alive(pid) {
        return false;
    }
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(p, Signal::SIGKILL);
    true
}

fn is_sandbox_process(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    ["tortie", "sandbox", "etcd", "kube-apiserver"]
        .iter()
        .any(|w| cmdline.contains(w))
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
