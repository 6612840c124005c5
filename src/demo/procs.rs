//! The demo's processes and files: the temporary directory, the `bitdust` commands it runs (each a
//! child process of this same binary, bounded by a deadline), and the long-running nodes, which
//! are stopped on every way out of the demo.
//!
//! Every child runs in a process group of its own, so a Ctrl-C at the terminal reaches only the
//! demo, which then stops its nodes with one SIGTERM each (a node that saw the Ctrl-C and then our
//! SIGTERM would take it as a second signal and skip its clean stop). Every child also asks the
//! kernel for a SIGTERM when the demo dies (`PR_SET_PDEATHSIG`), so even a SIGKILLed demo leaves
//! no node behind. The kernel sends that signal when the *thread* that spawned the child ends:
//! the demo spawns from the thread that calls `demo::run` and keeps it until the end.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by SIGINT, SIGTERM or SIGHUP: every wait of the demo checks it and gives up, so the
/// guards stop the nodes and remove the homes.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT, SIGTERM and SIGHUP once each (`SA_RESETHAND`): the first asks the demo to
/// clean up and stop, a second one of the same kind ends it at once (the nodes then get their
/// SIGTERM from the kernel, see the module doc).
pub fn catch_interrupts() -> io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with our handler (which only stores an atomic) and an
        // empty mask is a valid argument.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

// ------------------------------------------------------------------ the temporary directory

/// The demo's directory under the system's temp dir; removed when dropped unless kept.
pub struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    pub fn create(keep: bool) -> io::Result<WorkDir> {
        let base = std::env::temp_dir();
        for _ in 0..64 {
            let path = base.join(format!("bitdust-demo.{:08x}", rand::random::<u32>()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(WorkDir { path, keep }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no unused name for a directory in {}", base.display()),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kept(&self) -> bool {
        self.keep
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if std::fs::remove_dir_all(&self.path).is_err() {
            // A restored read-only directory refuses its entries' removal: allow writing
            // everywhere, then try once more.
            make_writable(&self.path);
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!(
                    "bitdust demo: could not remove {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(meta) = std::fs::symlink_metadata(&dir)
            && meta.is_dir()
        {
            let mode = meta.permissions().mode() | 0o700;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode));
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                dirs.push(entry.path());
            }
        }
    }
}

// ------------------------------------------------------------------ running `bitdust` commands

/// How a command ended: its exit status and its output.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }

    /// "status 1" or "signal 9".
    pub fn describe(&self) -> String {
        describe_status(Some(self.status))
    }
}

pub fn describe_status(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("status {code}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => s.to_string(),
        },
        None => "an unknown status".into(),
    }
}

/// Why a command did not finish by itself.
#[derive(Debug)]
pub enum WaitError {
    Spawn(io::Error),
    Timeout(Duration),
    Interrupted,
}

/// Runs this same binary as `bitdust --home HOME ARGS...` (the user's view of the product).
#[derive(Clone, Debug)]
pub struct Bitdust {
    exe: PathBuf,
}

impl Bitdust {
    pub fn new(exe: PathBuf) -> Bitdust {
        Bitdust { exe }
    }

    /// The command as a user would type it, for the demo's output and its errors.
    pub fn shown(home: &Path, args: &[&OsStr]) -> String {
        let mut parts = vec![
            "bitdust".to_string(),
            "--home".into(),
            home.display().to_string(),
        ];
        parts.extend(args.iter().map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a.to_string()
            }
        }));
        parts.join(" ")
    }

    pub fn command(&self, home: &Path, args: &[&OsStr]) -> Command {
        let mut command = Command::new(&self.exe);
        command.arg("--home").arg(home).args(args);
        // The user's own overrides (BITDUST_NODE__LISTEN, say) must not reach the demo's nodes,
        // nor a BITDUST_HOME that would name the user's real home.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BITDUST_") {
                command.env_remove(key);
            }
        }
        command.stdin(Stdio::null());
        command.process_group(0);
        let parent = std::process::id();
        // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The demo died before the prctl: nobody will send that signal.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::other("the demo exited"));
                }
                Ok(())
            });
        }
        command
    }

    /// Runs a command to its end within `limit`; `tick` is called about once a second while it
    /// runs (for progress lines).
    pub fn run(
        &self,
        home: &Path,
        args: &[&OsStr],
        limit: Duration,
        mut tick: impl FnMut(Duration),
    ) -> Result<Finished, WaitError> {
        let mut command = self.command(home, args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().map_err(WaitError::Spawn)?;
        // Drained on threads of their own, so a chatty child never blocks on a full pipe.
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let started = Instant::now();
        let mut next_tick = started + Duration::from_secs(1);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => {}
                Err(e) => break Err(WaitError::Spawn(e)),
            }
            if interrupted() {
                break Err(WaitError::Interrupted);
            }
            if started.elapsed() >= limit {
                break Err(WaitError::Timeout(limit));
            }
            if Instant::now() >= next_tick {
                tick(started.elapsed());
                // From now, not from the last tick: a slow tick (a busy node answering
                // `status`) must not be followed by a burst of catch-up ticks.
                next_tick = Instant::now() + Duration::from_secs(1);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if status.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        let status = status?;
        Ok(Finished {
            status,
            stdout,
            stderr,
        })
    }
}

fn drain(pipe: Option<impl io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut out);
        }
        out
    })
}

// ------------------------------------------------------------------ the nodes

/// One running `bitdust run`.
pub struct NodeProc {
    child: Child,
    /// Set once it exited (by itself or stopped).
    exit: Option<ExitStatus>,
}

impl NodeProc {
    pub fn log_path(home: &Path) -> PathBuf {
        home.join("node.log")
    }

    /// Starts `bitdust --home HOME run --log-format json`, its output into HOME/node.log.
    pub fn start(bin: &Bitdust, home: &Path) -> io::Result<NodeProc> {
        let log = File::create(Self::log_path(home))?;
        let mut command = bin.command(
            home,
            &[
                OsStr::new("run"),
                OsStr::new("--log-format"),
                OsStr::new("json"),
            ],
        );
        command.stdout(log.try_clone()?).stderr(log);
        let child = command.spawn()?;
        Ok(NodeProc { child, exit: None })
    }

    /// The exit status once the node has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    fn signal(&self, sig: libc::c_int) {
        if self.exit.is_none() {
            // SAFETY: sending a signal to our own child, which is not reaped yet (so its pid
            // cannot have been reused).
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited by `deadline`; its exit status.
    fn finish_by(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                self.exit = self.child.wait().ok();
                return self.exit;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A graceful stop (SIGTERM), bounded by `limit`; its exit status.
    pub fn stop(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.finish_by(Instant::now() + limit)
    }
}

/// How long a node may take to stop after SIGTERM: its own `node.shutdown_timeout` (5 s by
/// default) plus slack.
pub const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Every node the demo started; all are stopped when this is dropped, on every way out.
#[derive(Default)]
pub struct Nodes {
    pub all: Vec<NodeProc>,
}

impl Nodes {
    /// Stops every node still running: one SIGTERM each at once, then waits.
    pub fn stop_all(&mut self) {
        for node in &self.all {
            node.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_LIMIT;
        for node in &mut self.all {
            node.finish_by(deadline);
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop_all();
    }
}

// ------------------------------------------------------------------ ports and logs

/// `n` distinct free TCP ports on 127.0.0.1, below the kernel's ephemeral range (so no outgoing
/// connection takes one before its node binds it), as the tests and benches pick them.
pub fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let start = rand::random::<u16>() % 12_000;
    let mut found = Vec::with_capacity(n);
    for offset in 0..12_000u16 {
        let port = 20_000 + (start + offset) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            found.push(port);
            if found.len() == n {
                return Ok(found);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "found only {} free ports between 20000 and 32000",
            found.len()
        ),
    ))
}

/// The last `lines` lines of a node's log (JSON lines shortened to their level, message and
/// fields), for error messages.
pub fn log_tail(home: &Path, lines: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(NodeProc::log_path(home)) else {
        return Vec::new();
    };
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| shorten(line))
        .collect()
}

/// One log line as "LEVEL message key=value ...", at most 300 characters.
fn shorten(line: &str) -> String {
    let text = match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(map)) => {
            let field = |k: &str| map.get(k).and_then(|v| v.as_str()).unwrap_or("");
            let mut out = format!("{} {}", field("level"), field("message"));
            let nested = map.get("fields").and_then(|f| f.as_object());
            for (k, v) in nested.into_iter().flatten().chain(map.iter()) {
                if matches!(
                    k.as_str(),
                    "level" | "message" | "timestamp" | "target" | "fields" | "span" | "spans"
                ) {
                    continue;
                }
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                out.push_str(&format!(" {k}={v}"));
            }
            out
        }
        _ => line.to_string(),
    };
    if text.chars().count() > 300 {
        let cut: String = text.chars().take(300).collect();
        format!("{cut}…")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_log_line_is_shortened_to_level_message_and_fields() {
        let line = r#"{"timestamp":"t","level":"WARN","fields":{"message":"x","peer":"ab"},"target":"bitdust","message":"disk stalled","secs":7}"#;
        let short = shorten(line);
        assert!(short.starts_with("WARN disk stalled"), "{short}");
        assert!(short.contains("secs=7"), "{short}");
        assert!(short.contains("peer=ab"), "{short}");
        assert!(!short.contains("timestamp"), "{short}");
        assert_eq!(shorten("plain text"), "plain text");
        assert!(shorten(&"x".repeat(1000)).chars().count() <= 301);
    }

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let ports = free_ports(8).expect("ports");
        assert_eq!(ports.len(), 8);
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 8, "{ports:?}");
        assert!(ports.iter().all(|p| (20_000..32_000).contains(p)));
    }

    #[test]
    fn the_work_dir_is_removed_unless_kept() {
        let removed = WorkDir::create(false).expect("dir");
        let path = removed.path().to_path_buf();
        std::fs::create_dir(path.join("ro")).expect("mkdir");
        std::fs::write(path.join("ro/f"), b"x").expect("write");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path.join("ro"), std::fs::Permissions::from_mode(0o555))
            .expect("chmod");
        drop(removed);
        assert!(!path.exists(), "{} left behind", path.display());

        let kept = WorkDir::create(true).expect("dir");
        let path = kept.path().to_path_buf();
        drop(kept);
        assert!(path.is_dir());
        std::fs::remove_dir(&path).expect("cleanup");
    }
}
