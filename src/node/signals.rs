//! Process signals, caught from the first instruction of `main` to the last of the process.
//!
//! Why not tokio's `signal()`: it can only be installed once a runtime runs, ~20–50 ms into
//! start-up, and a signal before that kills the node (SIGHUP outright, SIGTERM without the graceful
//! stop); and it is gone once the runtime stops, so a second signal during the final flush did
//! nothing. Here a plain `sigaction` handler records the signal and writes its number to a pipe:
//! - SIGHUP / SIGTERM / SIGINT received during start-up wait in the pipe and are honoured once the
//!   node runs (reload; graceful stop).
//! - The first SIGTERM/SIGINT starts the shutdown watchdog: a thread of its own that, when
//!   `node.shutdown_timeout` has passed and the process is still alive, logs what had not
//!   finished and exits with status 2. It does not depend on the event loop, which a stalled
//!   disk may have frozen.
//! - A second SIGTERM/SIGINT exits at once (status 1) from inside the handler itself, whatever
//!   the rest of the process is doing. The handler is never uninstalled.
//!
//! Commands other than `run` call [`restore_default`] right after parsing their arguments, so
//! `bitdust status` still dies of SIGTERM like any command-line tool.
//!
//! The binary installs the handlers from its ELF initialiser, ~1–2 ms after `execve` (the
//! kernel's exec and the dynamic loader run first; no program can act before that). A signal
//! sent inside that window kills any process, unless the spawner blocks it across the exec: then
//! it stays pending, and `install` unblocks it into the handler.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

/// Exit status when a second stop signal cuts the shutdown short.
pub const EXIT_SECOND_SIGNAL: i32 = 1;
/// Exit status when the shutdown did not finish within `node.shutdown_timeout`.
pub const EXIT_SHUTDOWN_TIMEOUT: i32 = 2;

static PIPE_READ: AtomicI32 = AtomicI32::new(-1);
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
static STOPS: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Milliseconds the shutdown may take; read by the watchdog when the first stop arrives.
static TIMEOUT_MS: AtomicU64 = AtomicU64::new(5_000);

const CAUGHT: [libc::c_int; 3] = [libc::SIGHUP, libc::SIGTERM, libc::SIGINT];

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("installing the signal handlers: {0}")]
    Install(std::io::Error),
    #[error("starting the signal thread: {0}")]
    Thread(std::io::Error),
    #[error("the signal handlers were not installed (call signals::install first)")]
    NotInstalled,
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls here: atomics, write(2), _exit(2).
    // SAFETY: errno is thread-local; saving and restoring it keeps the interrupted code's value.
    let saved = unsafe { *libc::__errno_location() };
    if sig == libc::SIGTERM || sig == libc::SIGINT {
        let before = STOPS.fetch_add(1, Ordering::SeqCst);
        if before >= 1 {
            let msg = b"bitdust: second signal, exiting without waiting\n";
            // SAFETY: write(2) and _exit(2) are async-signal-safe.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(EXIT_SECOND_SIGNAL);
            }
        }
    }
    let fd = PIPE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        // The signal numbers we catch fit a byte. A full pipe (thousands of unread SIGHUPs)
        // drops the byte: one reload covers them all, and the stop count is in STOPS anyway.
        let byte = sig as u8;
        // SAFETY: writing one byte from a live local to a non-blocking pipe we own.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// Installs the handlers (once; later calls do nothing). Call before anything else: the binary
/// does it from its ELF initialiser, before `main`.
pub fn install() -> Result<(), SignalError> {
    if INSTALLED.load(Ordering::SeqCst) {
        return Ok(());
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two descriptors; non-blocking so the handler never waits.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(SignalError::Install(std::io::Error::last_os_error()));
    }
    PIPE_READ.store(fds[0], Ordering::SeqCst);
    PIPE_WRITE.store(fds[1], Ordering::SeqCst);
    for sig in CAUGHT {
        // SAFETY: a zeroed sigaction with our handler and an empty mask is a valid argument.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(SignalError::Install(std::io::Error::last_os_error()));
        }
    }
    INSTALLED.store(true, Ordering::SeqCst);
    // A spawner may hand us these signals blocked (the only way to keep one sent during
    // execve itself, before any code of ours can run, from killing us). Unblocking delivers
    // any that are pending to the handler above.
    set_blocked(false).map_err(SignalError::Install)
}

/// Blocks or unblocks the caught signals in the calling thread (inherited by threads it starts).
fn set_blocked(blocked: bool) -> std::io::Result<()> {
    let how = if blocked {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: building a signal set on the stack and changing this thread's mask.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in CAUGHT {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// For commands that are not the node: default dispositions again, and a signal that arrived
/// meanwhile is re-raised so it has its usual effect.
pub fn restore_default() {
    for sig in CAUGHT {
        // SAFETY: restoring the default disposition.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    INSTALLED.store(false, Ordering::SeqCst);
    let fd = PIPE_READ.load(Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    let mut byte = 0u8;
    // SAFETY: reading one byte into a local from our non-blocking pipe.
    while unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) } == 1 {
        // SAFETY: raising a signal whose default action is now in place.
        unsafe { libc::raise(libc::c_int::from(byte)) };
    }
}

/// What a signal asks of the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: re-read the config.
    Reload,
    /// SIGTERM or SIGINT: stop gracefully.
    Stop(&'static str),
}

/// The node's end of the signal pipe, and the shutdown watchdog.
pub struct Signals {
    rx: mpsc::UnboundedReceiver<Signal>,
    shutdown: Arc<Shutdown>,
}

impl Signals {
    /// Starts the thread that turns caught signals into [`Signal`]s (those caught since
    /// [`install`] first). Call at the very start of `run`.
    pub fn start() -> Result<Signals, SignalError> {
        if !INSTALLED.load(Ordering::SeqCst) {
            return Err(SignalError::NotInstalled);
        }
        let fd = PIPE_READ.load(Ordering::SeqCst);
        let (tx, rx) = mpsc::unbounded_channel();
        let shutdown = Arc::new(Shutdown::default());
        shutdown.begin("start-up");
        let watch = shutdown.clone();
        // Spawned while this thread still takes the signals, so it inherits that.
        std::thread::Builder::new()
            .name("bitdust-signals".into())
            .spawn(move || pump(fd, &tx, &watch))
            .map_err(SignalError::Thread)?;
        // From here on only that thread (and the watchdog it starts) takes them: the kernel
        // hands a process signal to a thread that does not block it, and one stuck in a frozen
        // filesystem (uninterruptible) would sit on it. Every thread started later from here
        // (runtime, RocksDB, writer) inherits the block.
        set_blocked(true).map_err(SignalError::Install)?;
        Ok(Signals { rx, shutdown })
    }

    /// The next signal; `None` never happens while the process lives.
    pub async fn next(&mut self) -> Option<Signal> {
        self.rx.recv().await
    }

    /// The shutdown progress the watchdog reports from.
    pub fn shutdown(&self) -> Arc<Shutdown> {
        self.shutdown.clone()
    }
}

/// Sets how long a graceful stop may take (`node.shutdown_timeout`; again after a reload).
pub fn set_shutdown_timeout(timeout: Duration) {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    TIMEOUT_MS.store(ms.max(1), Ordering::SeqCst);
}

/// Exits now without running destructors: for when something may be stuck on a dead disk, and
/// waiting for it (as `std::process::exit`'s atexit handlers and RocksDB's close would) means
/// hanging. Acknowledged writes are safe: the WAL was synced before each acknowledgement.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}

fn pump(fd: libc::c_int, tx: &mpsc::UnboundedSender<Signal>, shutdown: &Arc<Shutdown>) {
    let mut watchdog_started = false;
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one descriptor we own, without a timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue; // one of our own signals landed on this thread
            }
            tracing::error!(error = %std::io::Error::last_os_error(), "the signal pipe failed");
            return;
        }
        let mut byte = 0u8;
        // SAFETY: reading one byte into a local.
        while unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) } == 1 {
            let signal = match libc::c_int::from(byte) {
                libc::SIGHUP => Signal::Reload,
                libc::SIGTERM => Signal::Stop("SIGTERM"),
                _ => Signal::Stop("SIGINT"),
            };
            if matches!(signal, Signal::Stop(_)) && !watchdog_started {
                watchdog_started = true;
                let shutdown = shutdown.clone();
                let spawned = std::thread::Builder::new()
                    .name("bitdust-shutdown-watchdog".into())
                    .spawn(move || shutdown.watch());
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start the shutdown watchdog");
                }
            }
            let _ = tx.send(signal);
        }
    }
}

/// Stages of start-up and shutdown still running, for the watchdog's last words.
#[derive(Default)]
pub struct Shutdown {
    pending: Mutex<Vec<&'static str>>,
}

impl Shutdown {
    /// Marks a stage as running (e.g. "final flush").
    pub fn begin(&self, stage: &'static str) {
        self.lock().push(stage);
    }

    /// Marks a stage as finished.
    pub fn end(&self, stage: &'static str) {
        self.lock().retain(|s| *s != stage);
    }

    /// Stages still running.
    pub fn pending(&self) -> Vec<&'static str> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<&'static str>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watchdog: waits out `node.shutdown_timeout` from the first stop signal; if the
    /// process is still here, names what did not finish and exits non-zero.
    fn watch(&self) {
        let timeout = Duration::from_millis(TIMEOUT_MS.load(Ordering::SeqCst));
        // A normal stop ends the process before this wakes; only a stuck one meets it.
        std::thread::sleep(timeout);
        let mut unfinished = self.pending();
        if unfinished.is_empty() {
            unfinished.push("process exit");
        }
        if tracing::dispatcher::has_been_set() {
            tracing::error!(timeout_ms = timeout.as_millis() as u64, unfinished = ?unfinished,
                "shutdown did not finish within node.shutdown_timeout; exiting anyway");
        } else {
            eprintln!(
                "bitdust: shutdown did not finish within {} ms (unfinished: {}); exiting",
                timeout.as_millis(),
                unfinished.join(", ")
            );
        }
        exit_now(EXIT_SHUTDOWN_TIMEOUT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_tracked_until_they_end() {
        let s = Shutdown::default();
        s.begin("actors");
        s.begin("final flush");
        s.end("actors");
        assert_eq!(s.pending(), vec!["final flush"]);
        s.end("final flush");
        assert!(s.pending().is_empty());
    }
}
