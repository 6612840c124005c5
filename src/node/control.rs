//! The control socket (`control.sock`, mode 0600): the CLI's way into a running node.
//! One request per connection: a JSON line in, a JSON line out.
//!
//! Bounded so that no client can take the node down: each client has `Limits::read_timeout` to
//! send its request (and to take the reply); at most `Limits::max_clients` are served at once,
//! and when a new one arrives past that, the client that has been silent longest is dropped (a
//! thousand silent clients cannot lock out `status`). Accept errors (EMFILE when descriptors run
//! out) are logged once a minute with a count, not twenty times a second.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted (a contact card fits many times over).
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Back up these absolute paths (none: the configured sources); answers the run numbers.
    Backup {
        #[serde(default)]
        paths: Vec<String>,
    },
    /// The catalog's versions.
    List,
    /// Restore a version (default: the latest of `source`, or of every source) under `to`
    /// (absolute); answers the run numbers.
    Restore {
        #[serde(default)]
        source: Option<String>,
        #[serde(default)]
        version: Option<u64>,
        to: String,
        #[serde(default)]
        path: Option<String>,
        #[serde(default)]
        overwrite: bool,
    },
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
    /// Run one restore drill now; answers its `DrillReport` (with `passed`).
    Drill,
}

/// The run numbers a backup or restore request was given (`status` reports each by its run).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Runs {
    pub runs: Vec<u64>,
}

/// A peer added (`new`: it was not in the peer book before).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerAdded {
    pub node_id: String,
    pub new: bool,
}

/// The node a request was about (peer removed, customer dropped).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Done {
    pub node_id: String,
}

/// A peer's round trip.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pong {
    pub node_id: String,
    pub rtt_ms: f64,
}

/// The catalog's versions (`bitdust list --json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Versions {
    pub versions: Vec<Version>,
}

/// One backed-up version of a source.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Version {
    pub snapshot: u64,
    pub source: String,
    pub started_at: u64,
    pub finished_at: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub new_bytes: u64,
    pub new_blocks: u64,
    /// Files not backed up.
    pub skipped: usize,
}

impl Versions {
    pub fn of(snapshots: &[crate::store::catalog::Snapshot]) -> Versions {
        let versions = snapshots
            .iter()
            .map(|s| Version {
                snapshot: s.id.0,
                source: s.source.clone(),
                started_at: s.started_at,
                finished_at: s.finished_at,
                files: s.files,
                dirs: s.dirs,
                symlinks: s.symlinks,
                bytes: s.bytes,
                new_bytes: s.new_bytes,
                new_blocks: s.new_blocks,
                skipped: s.skipped.len(),
            })
            .collect();
        Versions { versions }
    }
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

    /// A handler's answer: its data as JSON, or its error's message.
    pub fn of<T: Serialize, E: std::fmt::Display>(answer: Result<T, E>) -> Self {
        match answer.map(|data| serde_json::to_value(data)) {
            Ok(Ok(data)) => Response::ok(data),
            Ok(Err(e)) => Response::error(e.to_string()),
            Err(e) => Response::error(e.to_string()),
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

/// How the control socket bounds its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time a client has to send its request line, and again to take the reply.
    pub read_timeout: Duration,
    /// Clients connected at once.
    pub max_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            read_timeout: Duration::from_secs(5),
            max_clients: 64,
        }
    }
}

/// A connected client, as the accept loop sees it.
struct Client {
    since: Instant,
    /// Still waiting for its request line (so it may be dropped to make room).
    reading: Rc<std::cell::Cell<bool>>,
    abort: tokio::task::AbortHandle,
}

type Clients = Rc<RefCell<HashMap<u64, Client>>>;

/// Removes a client from the table however its task ends (finished, failed or aborted).
struct Leave(Clients, u64);

impl Drop for Leave {
    fn drop(&mut self) {
        if let Ok(mut clients) = self.0.try_borrow_mut() {
            clients.remove(&self.1);
        }
    }
}

/// At most one warning a minute about failing accepts, with how many were not logged.
struct AcceptWarnings {
    last: Option<Instant>,
    suppressed: u64,
}

const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(60);

impl AcceptWarnings {
    /// Records a failed accept; logs it unless one was logged within the minute. Returns
    /// whether it logged.
    fn failed(&mut self, e: &std::io::Error) -> bool {
        if self
            .last
            .is_some_and(|t| t.elapsed() < ACCEPT_WARNING_EVERY)
        {
            self.suppressed += 1;
            return false;
        }
        tracing::warn!(error = %e, suppressed = self.suppressed,
            "control socket accept failed (further failures logged once a minute)");
        self.last = Some(Instant::now());
        self.suppressed = 0;
        true
    }
}

/// Serves requests until the task is dropped. Runs on the node's (single-threaded) event loop.
pub async fn serve(listener: UnixListener, handler: Handler, limits: Limits) {
    let clients: Clients = Rc::default();
    let mut next_id = 0u64;
    let mut warnings = AcceptWarnings {
        last: None,
        suppressed: 0,
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warnings.failed(&e);
                // EMFILE and the like persist for a while: do not spin on them.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !make_room(&clients, limits.max_clients) {
            // Every slot is busy answering a request: say so rather than leave the client hanging.
            let _ = stream.try_write(b"{\"ok\":false,\"error\":\"the node is busy; try again\"}\n");
            continue;
        }
        next_id += 1;
        let id = next_id;
        let reading = Rc::new(std::cell::Cell::new(true));
        let task = {
            let handler = handler.clone();
            let reading = reading.clone();
            let leave = Leave(clients.clone(), id);
            actix::spawn(async move {
                let _leave = leave;
                if let Err(e) = serve_one(stream, handler, limits.read_timeout, &reading).await {
                    tracing::debug!(error = %e, "control connection failed");
                }
            })
        };
        if !task.is_finished() {
            clients.borrow_mut().insert(
                id,
                Client {
                    since: Instant::now(),
                    reading,
                    abort: task.abort_handle(),
                },
            );
        }
    }
}

/// Ensures a free client slot, dropping the client silent longest if need be. False when every
/// client is past its request (being answered) and none can be dropped.
fn make_room(clients: &Clients, max: usize) -> bool {
    let victim = {
        let mut table = clients.borrow_mut();
        if table.len() < max.max(1) {
            return true;
        }
        let oldest = table
            .iter()
            .filter(|(_, c)| c.reading.get())
            .min_by_key(|(_, c)| c.since)
            .map(|(id, _)| *id);
        match oldest.and_then(|id| table.remove(&id)) {
            Some(client) => client,
            None => return false,
        }
    };
    tracing::debug!("control socket full: dropping the client silent longest");
    victim.abort.abort();
    true
}

async fn serve_one(
    stream: UnixStream,
    handler: Handler,
    deadline: Duration,
    reading: &std::cell::Cell<bool>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    let mut line = String::new();
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "client too slow");
    if tokio::time::timeout(deadline, reader.read_line(&mut line))
        .await
        .is_err()
    {
        let reply = format!(
            "{{\"ok\":false,\"error\":\"no request within {} ms\"}}\n",
            deadline.as_millis()
        );
        let _ = write.try_write(reply.as_bytes());
        return Err(timed_out());
    }
    reading.set(false);
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => handler(request).await,
        Err(e) => Response::error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    // A client that does not read its reply must not hold the slot (and descriptor) forever.
    tokio::time::timeout(deadline, async {
        write.write_all(&out).await?;
        write.shutdown().await
    })
    .await
    .map_err(|_| timed_out())?
}

/// Raises this process's open-file limit to the hard limit: every peer session, control client
/// and RocksDB file takes a descriptor, and the usual soft default (1024) is far below what the
/// system allows. Returns the (old, new) soft limits.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    // SAFETY: getrlimit/setrlimit only read and write the struct we own.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let old = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
    Ok((old as u64, limit.rlim_cur as u64))
}

/// No core dumps from this process: one would hold the keys in the clear (the master secret,
/// the Noise and signing keys) wherever the system writes them.
pub fn disable_core_dumps() -> std::io::Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit only reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_are_turned_off() {
        disable_core_dumps().expect("setrlimit");
        // SAFETY: getrlimit writes only the struct we own.
        let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) }, 0);
        assert_eq!((limit.rlim_cur, limit.rlim_max), (0, 0));
    }

    #[test]
    fn accept_failures_warn_once_a_minute_with_a_count() {
        let mut w = AcceptWarnings {
            last: None,
            suppressed: 0,
        };
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(w.failed(&emfile));
        for _ in 0..200 {
            assert!(!w.failed(&emfile), "a storm logs once");
        }
        assert_eq!(w.suppressed, 200);
        // A minute on, the next one is logged (carrying the count) and the count restarts.
        w.last = Instant::now().checked_sub(ACCEPT_WARNING_EVERY);
        assert!(w.failed(&emfile));
        assert_eq!(w.suppressed, 0);
    }
}
