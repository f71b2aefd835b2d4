//! The daemon's unix socket for the plugin: bound root-only (directory 0700, socket 0600,
//! a stale socket file replaced), one task per connection, one request per connection.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::error::{CniError, code};
use super::handlers::CniDaemon;
use super::protocol::{self, Response};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ServerError {
    let path = path.to_path_buf();
    move |source| ServerError::Io {
        action,
        path,
        source,
    }
}

/// Binds the socket at `path`: parent directory created 0700, a leftover socket file of an
/// earlier daemon removed, the new socket chmod 0600 before anyone can use it meaningfully.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", dir))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).map_err(io_err("remove stale socket", path))?;
        }
        Ok(_) => {
            return Err(ServerError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("stat", path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err("bind", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", path))?;
    tracing::info!(socket = %path.display(), "CNI socket listening");
    Ok(listener)
}

/// Serves until `stop` turns true. Requests in flight finish on their own tasks.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<CniDaemon>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, daemon.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a CNI connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn connection(mut stream: UnixStream, daemon: Arc<CniDaemon>) {
    // The socket's mode already keeps others out; this also covers a loosened mode.
    let euid = nix::unistd::geteuid().as_raw();
    if let Ok(cred) = stream.peer_cred()
        && cred.uid() != 0
        && cred.uid() != euid
    {
        tracing::warn!(
            uid = cred.uid(),
            "refusing a CNI connection from a non-root peer"
        );
        let refusal = Response::Error {
            error: CniError::new(
                code::INVALID_ENVIRONMENT,
                "only root may use the tortie CNI socket",
            ),
        };
        let _ = protocol::write_response_async(&mut stream, &refusal).await;
        return;
    }
    let response = match protocol::read_request_async(&mut stream).await {
        Ok(received) => daemon.handle(received).await,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable CNI request");
            Response::Error {
                error: CniError::new(
                    code::DAEMON_PROTOCOL,
                    format!("tortie daemon could not read the request: {e}"),
                ),
            }
        }
    };
    if let Err(e) = protocol::write_response_async(&mut stream, &response).await {
        // The plugin gave up (timeout): the runtime retries or DELs; nothing to undo here.
        tracing::warn!(error = %e, "could not answer the CNI plugin");
    }
}
