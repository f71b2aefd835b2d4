// Child processes that cannot outlive the test process: spawned with PR_SET_PDEATHSIG(SIGKILL)
// from one long-lived thread, and stopped (SIGTERM, grace, SIGKILL, reap) by a Drop guard.
// Also: a test for "is this pid alive", used by the reapers of leftovers from crashed runs.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// The kernel sends PR_SET_PDEATHSIG when the *thread* that forked the child exits, not the
/// process. Test threads and tokio workers come and go, so every child is forked by this one
/// thread, which lives until the process dies: the signal then fires exactly on process death
/// (panic=abort, SIGKILL of the test binary, ...).
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("tt-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the child-spawner thread");
        Mutex::new(tx)
    })
}

/// A child process killed and reaped on Drop.
#[derive(Debug)]
pub struct Guarded {
    child: Child,
    what: String,
    grace: Duration,
}

impl Guarded {
    /// Spawns `cmd` so that it dies with the test process; `what` names it in errors.
    pub fn spawn(what: &str, mut cmd: Command) -> anyhow::Result<Guarded> {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody would signal us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let (tx, rx) = mpsc::channel();
        spawner()
            .lock()
            .expect("spawner lock")
            .send((cmd, tx))
            .context("spawner thread is gone")?;
        let child = rx
            .recv()
            .context("spawner thread dropped the request")?
            .with_context(|| format!("spawn {what}"))?;
        Ok(Guarded {
            child,
            what: what.to_owned(),
            grace: Duration::from_secs(3),
        })
    }

    /// How long Drop waits after SIGTERM before SIGKILL.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err` with the exit status if the process has already exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => anyhow::bail!("{} exited early: {status}", self.what),
            Err(e) => Err(e).with_context(|| format!("wait for {}", self.what)),
        }
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL; always reaps the child.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True if a process with this pid exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name, which may hold spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}
