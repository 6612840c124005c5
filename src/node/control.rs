//! The control socket (`control.sock`, mode 0600): the CLI's way into a running node.
//! One request per connection: a JSON line in, a JSON line out.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted (a contact card fits many times over).
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    PeerAdd {
        card: String,
        #[serde(default)]
        name: Option<String>,
    },
    PeerPing {
        node_id: String,
    },
    PeerRemove {
        node_id: String,
    },
    CustomerDrop {
        node_id: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Response {
            ok: true,
            data: Some(data),
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            data: None,
            error: Some(message.into()),
        }
    }
}

pub type Handler = Rc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response>>>>;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("no node is running on this home ({path}: {cause})")]
    NotRunning {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the node sent an invalid reply: {0}")]
    BadReply(String),
    #[error("the node did not answer in time")]
    Timeout,
}

/// Binds the socket (replacing a stale one: the caller holds the home lock) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        cause: source,
    };
    if path.exists() {
        std::fs::remove_file(path).map_err(io)?;
    }
    // Create the socket private from the start, not chmod-ed after a window of exposure.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves requests until the task is dropped. Runs on the node's (single-threaded) event loop.
pub async fn serve(listener: UnixListener, handler: Handler) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                actix::spawn(async move {
                    if let Err(e) = serve_one(stream, handler).await {
                        tracing::debug!(error = %e, "control connection failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_one(stream: UnixStream, handler: Handler) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => handler(request).await,
        Err(e) => Response::error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Sends one request to the node running on `path` (CLI side).
pub async fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let work = async {
        let mut stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| ControlError::NotRunning {
                    path: path.to_path_buf(),
                    cause: source,
                })?;
        let io = |source| ControlError::Io {
            path: path.to_path_buf(),
            cause: source,
        };
        let mut line =
            serde_json::to_vec(request).map_err(|e| ControlError::BadReply(e.to_string()))?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(io)?;
        let mut reply = String::new();
        BufReader::new(stream)
            .take(16 * 1024 * 1024)
            .read_line(&mut reply)
            .await
            .map_err(io)?;
        serde_json::from_str::<Response>(reply.trim())
            .map_err(|e| ControlError::BadReply(e.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| ControlError::Timeout)?
}
