//! The disk as it really fails, where the machine allows it (CI runs as root): a small tmpfs
//! that fills, and a loop-mounted ext4 frozen with `fsfreeze`. Each test skips with a printed
//! reason when it is not root or cannot mount. The same faults are injected without root
//! through `FaultyStore` in the unit tests (store::writer, node::health).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A filesystem mounted for one test; unmounted (thawed first) when dropped.
struct Mounted {
    dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let dir = self.dir.to_string_lossy().to_string();
        let _ = run("fsfreeze", &["-u", &dir]);
        let _ = run("umount", &["-l", &dir]);
    }
}

/// Mounts a tmpfs of `size` under `parent`, or says why not.
fn tmpfs(parent: &Path, size: &str) -> Result<Mounted, String> {
    if !is_root() {
        return Err("not root".into());
    }
    let dir = parent.join("mnt");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            &dir.to_string_lossy(),
        ],
    )?;
    Ok(Mounted { dir })
}

/// Mounts a fresh ext4 image of `mib` MiB through a loop device under `parent`.
fn loop_ext4(parent: &Path, mib: u64) -> Result<Mounted, String> {
    if !is_root() {
        return Err("not root".into());
    }
    let image = parent.join("disk.img");
    let file = std::fs::File::create(&image).map_err(|e| e.to_string())?;
    file.set_len(mib * 1024 * 1024).map_err(|e| e.to_string())?;
    drop(file);
    run("mkfs.ext4", &["-q", "-F", &image.to_string_lossy()])?;
    let dir = parent.join("mnt");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    run(
        "mount",
        &[
            "-o",
            "loop",
            &image.to_string_lossy(),
            &dir.to_string_lossy(),
        ],
    )?;
    Ok(Mounted { dir })
}

/// A frozen filesystem, thawed when dropped (declare it after the node, so it thaws first).
struct Frozen(PathBuf);

impl Frozen {
    fn new(dir: &Path) -> Result<Frozen, String> {
        run("fsfreeze", &["-f", &dir.to_string_lossy()])?;
        Ok(Frozen(dir.to_path_buf()))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = run("fsfreeze", &["-u", &self.0.to_string_lossy()]);
    }
}

macro_rules! or_skip {
    ($setup:expr, $what:expr) => {
        match $setup {
            Ok(v) => v,
            Err(reason) => {
                eprintln!("skipping {}: {reason}", $what);
                return;
            }
        }
    };
}

fn edit_config(home: &Path, from: &str, to: &str) {
    let path = home.join("config.toml");
    let config = std::fs::read_to_string(&path).expect("config");
    let changed = config.replace(from, to);
    assert_ne!(changed, config, "{from} is in the default file");
    std::fs::write(&path, changed).expect("write config");
}

/// Whether the process has ended from its own side: gone, or every thread left is a zombie or
/// in uninterruptible sleep (stuck in the frozen filesystem: after `_exit` the kernel ends
/// those threads, and reaps the process, only when the disk thaws). While the node lives, its
/// signal and health threads sleep interruptibly, so this is false.
fn ended(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        match std::fs::read_to_string(task.path().join("stat")) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X', 'D'])),
            Err(_) => true,
        }
    })
}

fn message_contains(v: &serde_json::Value, text: &str) -> bool {
    v["message"].as_str().is_some_and(|m| m.contains(text))
}

/// Fills the filesystem holding `dir` to the last byte (big writes, then small ones).
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("create filler");
    for chunk in [1024 * 1024, 4096, 1] {
        let bytes = vec![0u8; chunk];
        while file.write_all(&bytes).is_ok() {}
    }
    let _ = file.sync_all();
    path
}

#[test]
fn a_full_disk_refuses_writes_then_resumes_without_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mounted = or_skip!(tmpfs(dir.path(), "24m"), "the full-disk test");
    let home = mounted.dir.join("n1");
    // 1 GiB is far more than this disk has: accepted, with a warning.
    let listen = format!("127.0.0.1:{}", free_port());
    let out = bitdust(
        &home,
        &[
            "init", "--listen", &listen, "--name", "full", "--donate", "1 GiB",
        ],
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: supplier.donated (1 GiB) exceeds"),
        "{err}"
    );
    edit_config(&home, "keep_free = \"16 MiB\"", "keep_free = \"1 MiB\"");
    let (_friend_dir, friend) = temp_home();
    init(&friend, "friend");
    let friend_card = card(&friend);
    // A would-be customer, to see the supplier side refuse while the disk is full.
    let (customer_keys, customer) = stranger();
    add_peer(&home, &customer.card());

    let mut node = Node::start(&home);
    node.wait_log("ready", |v| transition(v, "identity", "Loading", "Ready"));
    node.wait_running();
    let warning = node.wait_log("donation warning", |v| {
        message_contains(v, "supplier.donated")
    });
    eprintln!("start-up warning: {}", warning["message"]);
    add_peer(&home, &friend_card);

    let filler = fill(&mounted.dir);
    // Every `peer add` is a synced write; the one that needs a new page on the disk fails.
    let refused = wait_for("a write refused for lack of space", 60, || {
        let out = bitdust(&home, &["peer", "add", &friend_card]);
        (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).to_string())
    });
    assert!(refused.contains("no space left"), "{refused}");
    eprintln!("refused write: {}", refused.trim());
    // `status` answers and says why.
    let status = status_json(&home);
    assert_eq!(status["disk"]["state"], "full", "{:#}", status["disk"]);
    let line = status["disk"]["line"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("writes refused until space is freed"),
        "{line}"
    );
    eprintln!("status while full: {line}");
    // The supplier takes no new contract while it cannot write, and says why.
    let mut client = RawClient::login(&listen_addr(&home), &customer_keys, &customer);
    let reply = client.request(
        2,
        bitdust::proto::envelope::Body::ServiceRequest(bitdust::proto::ServiceRequest {
            space: 1 << 20,
            position: 0,
            data_shards: 4,
            parity_shards: 2,
        }),
    );
    match reply.body {
        Some(bitdust::proto::envelope::Body::ServiceRefuse(r)) => {
            assert_eq!(r.reason, bitdust::proto::FailReason::NoSpace as i32);
            assert!(r.detail.contains("disk cannot take writes"), "{}", r.detail);
        }
        other => panic!("a refusal, got {other:?}"),
    }
    drop(client);
    // Still refused, clearly, while the space lacks.
    let again = bitdust(&home, &["peer", "add", &friend_card]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no space left"));

    // Space comes back: the node notices by itself (no write needed), no restart.
    std::fs::remove_file(&filler).expect("free the space");
    let freed = Instant::now();
    let status = wait_for("status to say the disk is ok", 20, || {
        let status = status_json(&home);
        (status["disk"]["state"] == "ok").then_some(status)
    });
    let noticed_after = freed.elapsed();
    node.wait_log("resumed", |v| message_contains(v, "writes resumed"));
    let began = Instant::now();
    add_peer(&home, &friend_card);
    eprintln!(
        "space freed -> status ok after {:.0} ms (database reopens: {}); next write took {:.0} ms (CLI included); status: {}",
        noticed_after.as_secs_f64() * 1000.0,
        status["disk"]["database_resumes"],
        began.elapsed().as_secs_f64() * 1000.0,
        status["disk"]["line"]
    );
    node.signal(libc::SIGTERM);
    assert!(node.wait_exit().success());
    let friend_id = id_json(&friend)["node_id"]
        .as_str()
        .expect("node id")
        .to_string();
    let removed = bitdust(&home, &["peer", "remove", &friend_id]);
    assert!(
        removed.status.success(),
        "the acknowledged peer survived the full disk and the reopen: {}",
        String::from_utf8_lossy(&removed.stderr)
    );
}

/// Starts a node on a loop-mounted ext4 with `timeout` as node.shutdown_timeout, with one peer
/// written (so the final flush has a memtable to write), and freezes its filesystem.
fn frozen_node(dir: &Path, timeout: &str) -> Result<(Mounted, PathBuf, Node), String> {
    let mounted = loop_ext4(dir, 64)?;
    let home = mounted.dir.join("n1");
    init(&home, "frozen");
    edit_config(
        &home,
        "shutdown_timeout = \"5s\"",
        &format!("shutdown_timeout = \"{timeout}\""),
    );
    let (_friend_dir, friend) = temp_home();
    init(&friend, "friend");
    let mut node = Node::start(&home);
    node.wait_log("ready", |v| transition(v, "identity", "Loading", "Ready"));
    node.wait_running();
    add_peer(&home, &card(&friend));
    Ok((mounted, home, node))
}

#[test]
fn shutdown_with_a_frozen_disk_is_bounded_and_names_what_did_not_finish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_mounted, home, mut node) = or_skip!(
        frozen_node(dir.path(), "2s"),
        "the frozen-disk shutdown test"
    );
    let frozen = or_skip!(Frozen::new(&_mounted.dir), "the frozen-disk shutdown test");
    // Nothing writes while idle: status still answers with the disk frozen.
    let line = status_json(&home)["disk"]["line"].clone();
    eprintln!("status while frozen and idle: {line}");

    let signalled = Instant::now();
    node.signal(libc::SIGTERM);
    let gave_up = node.wait_log("the watchdog", |v| {
        message_contains(v, "shutdown did not finish within node.shutdown_timeout")
    });
    let logged_after = signalled.elapsed();
    let unfinished = gave_up["unfinished"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(unfinished.contains("final flush"), "{gave_up}");
    let pid = node.pid();
    wait_for("the process to end", 10, || ended(pid).then_some(()));
    let ended_after = signalled.elapsed();
    eprintln!(
        "frozen disk: SIGTERM -> watchdog log after {:.0} ms, process ended after {:.0} ms (timeout 2 s); unfinished: {unfinished}",
        logged_after.as_secs_f64() * 1000.0,
        ended_after.as_secs_f64() * 1000.0
    );
    // The kernel reaps it once the disk thaws; the status says it did not stop cleanly.
    drop(frozen);
    let status = node.wait_exit();
    assert_eq!(status.code(), Some(2), "{status:?}");
}

#[test]
fn a_second_signal_exits_at_once_even_with_a_frozen_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A long timeout: only the second signal can end the process quickly.
    let (_mounted, _home, mut node) =
        or_skip!(frozen_node(dir.path(), "60s"), "the second-signal test");
    let frozen = or_skip!(Frozen::new(&_mounted.dir), "the second-signal test");
    node.signal(libc::SIGTERM);
    node.wait_log("shutting down", |v| v["message"] == "shutting down");
    let second = Instant::now();
    node.signal(libc::SIGTERM);
    let pid = node.pid();
    wait_for("the process to end", 20, || ended(pid).then_some(()));
    eprintln!(
        "second SIGTERM -> process ended after {:.0} ms",
        second.elapsed().as_secs_f64() * 1000.0
    );
    drop(frozen);
    // Status 1: the second signal, not the watchdog's 2.
    assert_eq!(node.wait_exit().code(), Some(1));
}

#[test]
fn a_stop_during_a_start_stuck_on_a_frozen_disk_is_bounded_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mounted = or_skip!(loop_ext4(dir.path(), 64), "the frozen start-up test");
    let home = mounted.dir.join("n1");
    init(&home, "stuck");
    edit_config(
        &home,
        "shutdown_timeout = \"5s\"",
        "shutdown_timeout = \"2s\"",
    );
    // Frozen before the start: taking the home lock (it writes the pid) hangs.
    let mut node = Node::start(&home);
    let frozen = or_skip!(Frozen::new(&mounted.dir), "the frozen start-up test");
    node.signal(libc::SIGTERM);
    let gave_up = node.wait_log("the watchdog", |v| {
        message_contains(v, "shutdown did not finish within node.shutdown_timeout")
    });
    let unfinished = gave_up["unfinished"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(unfinished.contains("start-up"), "{gave_up}");
    eprintln!("stuck start-up: unfinished {unfinished}");
    let pid = node.pid();
    wait_for("the process to end", 10, || ended(pid).then_some(()));
    drop(frozen);
    assert_eq!(node.wait_exit().code(), Some(2));
}

#[test]
fn a_write_stuck_on_a_frozen_disk_shows_as_stalled_and_status_still_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mounted, home, mut node) =
        or_skip!(frozen_node(dir.path(), "4s"), "the stalled-disk test");
    let (_other_dir, other) = temp_home();
    init(&other, "other");
    let other_card = card(&other);
    let frozen = or_skip!(Frozen::new(&mounted.dir), "the stalled-disk test");
    // `peer add` goes through the writer thread, which the frozen disk holds: the node's event
    // loop stays free, the CLI waits for the write.
    let adding = std::process::Command::new(BIN)
        .arg("--home")
        .arg(&home)
        .args(["peer", "add", &other_card])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("peer add runs");
    let frozen_at = Instant::now();
    let line = wait_for("status to say the disk is stalled", 30, || {
        let status = node_status(&home)?;
        let disk = status.disk?;
        (disk.state == "stalled").then_some(disk.line)
    });
    assert!(line.starts_with("disk stalled for"), "{line}");
    eprintln!(
        "frozen disk, a write waiting: after {:.1} s status says: {line}",
        frozen_at.elapsed().as_secs_f64()
    );
    // Thawed: the write completes, the CLI succeeds, status is ok again.
    drop(frozen);
    let mut adding = adding;
    let added = wait_for("peer add to finish", 30, || {
        adding.try_wait().ok().flatten()
    });
    assert!(added.success(), "{added:?}");
    wait_for("status ok again", 30, || {
        (node_status(&home)?.disk?.state == "ok").then_some(())
    });
    node.signal(libc::SIGTERM);
    assert!(node.wait_exit().success());
}
