//! `bitdust demo` as a newcomer runs it (issues 9 §5 and 10 §7), on a small tree: its report
//! (two suppliers stopped for good, fired, replaced by the spares and their fragments rebuilt,
//! then a byte-identical restore without them), its exit status, and that it leaves no node
//! running and no directory behind on any way out — success, failure, Ctrl-C, or being killed.

use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bitdust");
/// Generous: the demo takes a few seconds here; a hang must fail, not stall the suite.
const LIMIT: Duration = Duration::from_secs(90);

/// A few small files: text, a binary and its duplicate, an empty file, a private file, a symlink,
/// a nested directory.
fn small_tree(root: &Path) -> u64 {
    std::fs::create_dir_all(root.join("sub/deeper")).expect("mkdir");
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(
        root.join("notes.txt"),
        "hello from the demo test\n".repeat(40),
    )
    .expect("write");
    std::fs::write(root.join("sub/blob.bin"), &blob).expect("write");
    std::fs::write(root.join("sub/deeper/blob-copy.bin"), &blob).expect("write");
    std::fs::write(root.join("empty"), b"").expect("write");
    std::fs::write(root.join("sub/private.txt"), b"mine").expect("write");
    std::fs::set_permissions(
        root.join("sub/private.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    symlink("notes.txt", root.join("link")).expect("symlink");
    40 * 25 + 2 * 100_000 + 4
}

/// A running `bitdust demo` whose stderr lines arrive on a channel.
struct DemoRun {
    child: Child,
    lines: Receiver<String>,
    stderr: Vec<String>,
    stdout: std::thread::JoinHandle<String>,
}

impl DemoRun {
    fn start(args: &[&str]) -> DemoRun {
        let mut child = Command::new(BIN)
            .arg("demo")
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bitdust demo starts");
        let mut out = child.stdout.take().expect("stdout");
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        });
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        DemoRun {
            child,
            lines,
            stderr: Vec::new(),
            stdout,
        }
    }

    /// Waits for a stderr line containing `text`.
    fn wait_line(&mut self, text: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stderr.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no line with {text:?}; stderr:\n{}", self.stderr.join("\n"));
    }

    /// The temporary directory, from the first line.
    fn dir(&mut self) -> PathBuf {
        let line = self.wait_line("everything under ");
        PathBuf::from(line.rsplit("everything under ").next().expect("a path"))
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child, not reaped yet.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the exit (killing it past the limit); (status, stdout, stderr).
    fn finish(mut self) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "bitdust demo did not end within {LIMIT:?}; stderr:\n{}",
                    self.stderr.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.stderr.extend(self.lines.try_iter());
        let stdout = self.stdout.join().expect("stdout");
        // The stderr pipe closes with the process; pick up what arrived meanwhile.
        let until = Instant::now() + Duration::from_secs(5);
        while let Ok(line) = self
            .lines
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            self.stderr.push(line);
        }
        (status, stdout, self.stderr.join("\n"))
    }
}

/// Processes whose command line mentions `dir` (the demo's nodes and commands).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            // A zombie has an empty cmdline, so this is a live process.
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// Waits until no process mentions `dir` (nodes stopping after a signal take a moment).
fn assert_no_process_under(dir: &Path, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = processes_under(dir);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes still running under {}: {left:#?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_demo_backs_up_loses_two_suppliers_for_good_rebuilds_on_the_spares_and_restores() {
    let data = tempfile::tempdir().expect("tempdir");
    let bytes = small_tree(data.path());
    let mut run = DemoRun::start(&["--data", data.path().to_str().expect("utf-8"), "--json"]);
    let dir = run.dir();
    let (status, stdout, stderr) = run.finish();
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("one JSON report ({e}):\n{stdout}\nstderr:\n{stderr}"));
    let context = format!("{report:#}\nstderr:\n{stderr}");

    // The data and the backup, whatever happens after.
    assert_eq!(report["data"]["files"], 5, "{context}");
    assert_eq!(report["data"]["symlinks"], 1, "{context}");
    assert_eq!(report["data"]["bytes"], bytes, "{context}");
    assert_eq!(report["data"]["generated"], false, "{context}");
    assert_eq!(report["backup"]["outcome"], "committed", "{context}");
    let new_bytes = report["backup"]["new_bytes"].as_u64().expect("new_bytes");
    assert!(
        new_bytes + 90_000 < bytes,
        "the copy is deduplicated: {new_bytes} new of {bytes}\n{context}"
    );
    assert_eq!(report["network"]["data_shards"], 4, "{context}");
    assert_eq!(report["network"]["parity_shards"], 2, "{context}");

    // Eight friends: six hold one position each, with fragments; two are spares; two stopped.
    let suppliers = report["suppliers"].as_array().expect("suppliers");
    assert_eq!(suppliers.len(), 8, "{context}");
    let mut positions: Vec<u64> = suppliers
        .iter()
        .filter_map(|s| s["position"].as_u64())
        .collect();
    positions.sort_unstable();
    assert_eq!(positions, [0, 1, 2, 3, 4, 5], "{context}");
    let name = |s: &serde_json::Value| s["name"].as_str().expect("name").to_string();
    let mut stopped = Vec::new();
    let mut took = Vec::new();
    for s in suppliers {
        // A data block's fragment, the catalog's, and the recovery record: on every friend
        // that held a position at the backup, and on each spare once the rebuild put them there.
        let fragments = s["fragments"].as_u64().expect("count");
        assert!(fragments >= 3, "{s}\n{context}");
        if s["stopped"] == true {
            let position = s["position"]
                .as_u64()
                .expect("a stopped supplier held a position");
            stopped.push((position, name(s)));
        }
        match (s["position"].as_u64(), s["took_position"].as_u64()) {
            (None, Some(position)) => took.push((position, name(s))),
            (Some(_), None) => {}
            other => {
                panic!("{other:?}: each spare took a position, no supplier took another\n{context}")
            }
        }
    }
    stopped.sort();
    took.sort();
    // The suppliers of two data positions: the restore has to decode from parity or from the
    // rebuilt fragments.
    assert_eq!(
        stopped.iter().map(|s| s.0).collect::<Vec<_>>(),
        [0, 1],
        "{context}"
    );
    assert_eq!(
        took.iter().map(|s| s.0).collect::<Vec<_>>(),
        [0, 1],
        "the spares took the stopped suppliers' positions\n{context}"
    );

    // The rebuild: both fired for being unreachable, replaced by the spares, every block whole.
    let rebuild = &report["rebuild"];
    let seconds = rebuild["seconds"].as_f64().expect("rebuild seconds");
    // None is fired before monitor.fire_after (5 s in the demo).
    assert!(seconds >= 5.0, "{seconds}\n{context}");
    let fired = rebuild["fired"].as_array().expect("fired");
    assert_eq!(fired.len(), 2, "{context}");
    for f in fired {
        let position = f["position"].as_u64().expect("position");
        let was = stopped
            .iter()
            .find(|s| s.0 == position)
            .map(|s| s.1.as_str());
        let now = took.iter().find(|s| s.0 == position).map(|s| s.1.as_str());
        assert_eq!(f["was"].as_str(), was, "{f}\n{context}");
        assert_eq!(f["now"].as_str(), now, "{f}\n{context}");
        assert!(
            f["reason"]
                .as_str()
                .is_some_and(|r| r.contains("unreachable")),
            "{f}\n{context}"
        );
    }
    let placed = rebuild["fragments_placed"]
        .as_u64()
        .expect("fragments placed");
    assert!(placed >= 2, "a fragment per position at least\n{context}");
    let bytes_placed = rebuild["bytes_placed"].as_u64().expect("bytes placed");
    let bytes_fetched = rebuild["bytes_fetched"].as_u64().expect("bytes fetched");
    assert!(bytes_placed > 0, "{context}");
    // Each rebuilt fragment is decoded from k = 4 fetched ones (fewer only when two positions
    // of a block are rebuilt together).
    assert!(bytes_fetched >= 2 * bytes_placed, "{context}");
    // At the end every position is held, connected, by a friend that still runs.
    let held = report["positions"].as_array().expect("positions");
    assert_eq!(held.len(), 6, "{context}");
    for p in held {
        assert_eq!(p["contract"], "Connected", "{p}\n{context}");
        let id = p["supplier"].as_str().expect("a supplier");
        assert!(
            !suppliers
                .iter()
                .any(|s| s["node_id"] == id && s["stopped"] == true),
            "{p}\n{context}"
        );
    }
    assert_eq!(report["drill"]["passed"], true, "{context}");
    assert!(report["drill"]["files"].as_u64() > Some(0), "{context}");
    assert!(
        report["machines"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["actor"] == "fire_hire")),
        "the owner's machines are reported\n{context}"
    );

    assert!(status.success(), "{context}");
    assert_eq!(report["ok"], true, "{context}");
    assert_eq!(report["restore"]["outcome"], "complete", "{context}");
    assert_eq!(report["restore"]["bytes"], bytes, "{context}");
    assert_eq!(report["verify"]["matched"], true, "{context}");
    assert_eq!(report["verify"]["mismatch_count"], 0, "{context}");
    // k data fragments per block suffice: at most (k + m) / k, whatever the padding.
    let fetched = report["restore"]["fetched_per_byte"]
        .as_f64()
        .expect("ratio");
    assert!(fetched <= 1.5 * 1.15, "{fetched}\n{context}");
    assert_eq!(report["kept"], false, "{context}");
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert_no_process_under(&dir, 1);
}

#[test]
fn with_keep_the_homes_stay_with_their_logs_and_every_node_is_stopped() {
    let data = tempfile::tempdir().expect("tempdir");
    small_tree(data.path());
    let mut run = DemoRun::start(&["--data", data.path().to_str().expect("utf-8"), "--keep"]);
    let dir = run.dir();
    let (_, stdout, stderr) = run.finish();
    let cleanup = scopeguard(&dir);
    assert!(
        stdout.contains(&format!("kept       {}", dir.display())),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("backup     committed"), "{stdout}");
    assert!(stdout.contains("fragments  held for the owner"), "{stdout}");
    assert!(
        stdout.contains("rebuild    full redundancy again"),
        "{stdout}"
    );
    for home in ["owner", "friend1", "friend8"] {
        let log = std::fs::read_to_string(dir.join(home).join("node.log")).expect("node.log");
        assert!(log.contains("\"node running\""), "{home}: {log}");
    }
    assert_no_process_under(&dir, 1);
    // The owner's catalog holds the backup, readable with the node stopped.
    let out = Command::new(BIN)
        .arg("--home")
        .arg(dir.join("owner"))
        .args(["list", "--json"])
        .output()
        .expect("list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: bitdust::node::control::Versions =
        serde_json::from_slice(&out.stdout).expect("list --json reads as Versions");
    assert_eq!(list.versions.len(), 1, "{list:?}");
    drop(cleanup);
}

#[test]
fn a_bad_data_path_fails_clearly_at_the_data_step() {
    let data = tempfile::tempdir().expect("tempdir");
    let file = data.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let mut run = DemoRun::start(&["--data", file.to_str().expect("utf-8"), "--json"]);
    let dir = run.dir();
    let (status, stdout, stderr) = run.finish();
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "bitdust: data: {} is not a directory",
            file.display()
        )),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(report["failed_step"], "data", "{report}");
    assert_eq!(report["ok"], false);
    assert!(!dir.exists());
}

#[test]
fn ctrl_c_stops_the_nodes_and_removes_the_homes() {
    let data = tempfile::tempdir().expect("tempdir");
    small_tree(data.path());
    let mut run = DemoRun::start(&["--data", data.path().to_str().expect("utf-8"), "--json"]);
    let dir = run.dir();
    run.wait_line("[4/10]");
    assert!(
        !processes_under(&dir).is_empty(),
        "the nodes run before the signal"
    );
    run.signal(libc::SIGINT);
    let (status, stdout, stderr) = run.finish();
    assert!(!status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.ends_with("interrupted")),
        "{report}\n{stderr}"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert_no_process_under(&dir, 1);
}

#[test]
fn a_killed_demo_takes_its_nodes_with_it() {
    let data = tempfile::tempdir().expect("tempdir");
    small_tree(data.path());
    let mut run = DemoRun::start(&["--data", data.path().to_str().expect("utf-8")]);
    let dir = run.dir();
    let cleanup = scopeguard(&dir);
    run.wait_line("[4/10]");
    assert!(!processes_under(&dir).is_empty());
    run.signal(libc::SIGKILL);
    let _ = run.finish();
    // The kernel sends each node SIGTERM (PR_SET_PDEATHSIG); they stop within their
    // shutdown_timeout (5 s).
    assert_no_process_under(&dir, 15);
    drop(cleanup);
}

/// Removes `dir` when dropped (a kept or abandoned demo directory).
fn scopeguard(dir: &Path) -> impl Drop {
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Remove(dir.to_path_buf())
}
