//! Shared helpers for tests that run the real binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_bitdust");

pub fn bitdust(home: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("bitdust runs")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn init(home: &Path, name: &str) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let out = bitdust(
        home,
        &[
            "init", "--listen", &listen, "--name", name, "--donate", "1 GiB",
        ],
    );
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(node_id.len(), 32, "node id: {node_id}");
    assert!(node_id.chars().all(|c| c.is_ascii_hexdigit()));
    node_id
}

/// A running node whose JSON log lines arrive on a channel.
pub struct Node {
    child: Child,
    logs: Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Node {
    pub fn start(home: &Path) -> Node {
        let mut child = Command::new(BIN)
            .arg("--home")
            .arg(home)
            .args(["run", "--log-format", "json"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Node {
            child,
            logs,
            seen: Vec::new(),
        }
    }

    /// Waits (with a deadline) for a log line matching `pred`; returns it.
    pub fn wait_log(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.logs.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no log line for {what}; saw:\n{:#?}", self.seen);
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "node did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn transition(v: &serde_json::Value, actor: &str, from: &str, to: &str) -> bool {
    v["message"] == "transition" && v["actor"] == actor && v["from"] == from && v["to"] == to
}

pub fn status_json(home: &Path) -> serde_json::Value {
    let out = bitdust(home, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status prints JSON")
}

pub fn id_json(home: &Path) -> serde_json::Value {
    let out = bitdust(home, &["id", "--json"]);
    assert!(
        out.status.success(),
        "id failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("id prints JSON")
}

pub fn temp_home() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("n1");
    (dir, home)
}

/// Polls `check` until it returns `Some`, or panics after `secs` seconds naming `what`.
pub fn wait_for<T>(what: &str, secs: u64, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The node's status, or None while it is not answering.
pub fn try_status(home: &Path) -> Option<serde_json::Value> {
    let out = bitdust(home, &["status", "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The entry for `peer` in the node's status.
pub fn peer_status(status: &serde_json::Value, peer: &str) -> Option<serde_json::Value> {
    status["network"]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"] == peer)
        .cloned()
}

/// The count of sessions closed for `reason`.
pub fn closed_count(status: &serde_json::Value, reason: &str) -> u64 {
    status["network"]["closed_sessions"][reason]
        .as_u64()
        .unwrap_or(0)
}
