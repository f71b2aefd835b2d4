//! Runs the `nft` binary: one transaction script on stdin, or one listing, each bounded by a
//! timeout (a wedged nft must not wedge the driver's loop) and failing with nft's own words.
//! The child inherits the calling thread's network namespace.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Long enough for a policy-sized transaction on a loaded node (research/dataplane_notes.md
/// measured about a second for 100k elements), short enough to notice a wedged nft.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("run {program} to {action}: {source}")]
    Spawn {
        program: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed to {action} ({status}): {stderr}")]
    Failed {
        program: String,
        action: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{program} did not {action} within {timeout:?}; killed it")]
    Timeout {
        program: String,
        action: &'static str,
        timeout: Duration,
    },
    #[error("{action}: nft printed JSON this driver cannot read: {source}")]
    Parse {
        action: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl NftError {
    /// The kernel has no such table (or chain, set): a listing of nothing, not a failure.
    pub fn is_missing(&self) -> bool {
        matches!(self, NftError::Failed { stderr, .. } if stderr.contains("No such file or directory"))
    }
}

#[derive(Debug, Clone)]
pub struct Runner {
    pub program: PathBuf,
    pub timeout: Duration,
}

impl Default for Runner {
    fn default() -> Self {
        Runner {
            program: PathBuf::from("nft"),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl Runner {
    /// Applies one script (`nft -f -`) as one transaction.
    pub fn apply(&self, action: &'static str, script: &str) -> Result<(), NftError> {
        self.run(action, &["-f", "-"], Some(script.as_bytes()))
            .map(drop)
    }

    /// `nft <args>` and its stdout.
    pub fn run(
        &self,
        action: &'static str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<Vec<u8>, NftError> {
        let program = self.program.display().to_string();
        let spawn_err = |source| NftError::Spawn {
            program: program.clone(),
            action,
            source,
        };
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        // Input and output through threads: a large script or listing must not fill a pipe
        // while this thread waits on the other one.
        let writer = match (stdin, child.stdin.take()) {
            (Some(input), Some(mut pipe)) => {
                let input = input.to_vec();
                Some(std::thread::spawn(move || pipe.write_all(&input)))
            }
            _ => None,
        };
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let status = match wait_for(&mut child, self.timeout).map_err(spawn_err)? {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NftError::Timeout {
                    program,
                    action,
                    timeout: self.timeout,
                });
            }
        };
        if let Some(w) = writer {
            // A write error with a successful exit cannot happen; with a failed exit the
            // stderr says more than a broken pipe.
            let _ = w.join();
        }
        let out = stdout.join().unwrap_or_default();
        let err = stderr.join().unwrap_or_default();
        if !status.success() {
            return Err(NftError::Failed {
                program,
                action,
                status,
                stderr: String::from_utf8_lossy(&err).trim().to_string(),
            });
        }
        Ok(out)
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// The exit status, or None when `timeout` passed first.
fn wait_for(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(200);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_hangs_is_killed_at_the_timeout() {
        let runner = Runner {
            program: "sleep".into(),
            timeout: Duration::from_millis(100),
        };
        let started = Instant::now();
        let err = runner.run("sleep", &["5"], None).unwrap_err();
        assert!(matches!(err, NftError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_failure_carries_stderr_and_input_reaches_stdin() {
        let runner = Runner {
            program: "sh".into(),
            timeout: Duration::from_secs(5),
        };
        let out = runner.run("cat", &["-c", "cat"], Some(b"hello")).unwrap();
        assert_eq!(out, b"hello");
        let err = runner
            .run("fail", &["-c", "echo 'Error: bad' >&2; exit 1"], None)
            .unwrap_err();
        assert!(err.to_string().contains("Error: bad"), "{err}");
    }
}
