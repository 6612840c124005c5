//! Backups between real nodes on loopback: an owner and six suppliers (4 + 2). Where fragments
//! land, that no supplier holds plaintext, that an unchanged tree uploads nothing new, and that a
//! backup killed midway resumes and uploads each block under one id only.

mod common;

use std::path::{Path, PathBuf};

use bitdust::actors::backup_job::RECOVERY_BLOCK;
use common::tree::*;
use common::*;

#[test]
fn backup_spreads_fragments_leaks_no_plaintext_and_an_unchanged_tree_uploads_nothing() {
    let c = star(6);
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());

    let first = backup(&c.homes[0], source.path());
    assert_eq!(first["outcome"], "committed", "{first:#}");
    assert_eq!(first["files"], 24, "{first:#}");
    assert_eq!(first["symlinks"], 1, "{first:#}");
    assert!(
        first["catalog_stored"].as_bool().expect("bool"),
        "{first:#}"
    );
    assert!(first["skipped"].as_array().expect("list").is_empty());
    let new_blocks = first["new_blocks"].as_u64().expect("count");
    assert!(new_blocks >= 1, "{first:#}");
    // The duplicate 3 MiB file is stored once: new bytes stay well under the total.
    let (bytes, new_bytes) = (
        first["bytes"].as_u64().expect("bytes"),
        first["new_bytes"].as_u64().expect("bytes"),
    );
    assert!(
        new_bytes < bytes - (2 << 20),
        "dedup: {new_bytes} of {bytes}"
    );

    let after_first = placement(&c);
    assert_eq!(
        after_first.len() as u64,
        new_blocks + 2,
        "data blocks plus the catalog: the snapshot's tree segment and the head"
    );
    assert_spread(&after_first);
    // The recovery record is on every supplier.
    for home in &c.homes[1..] {
        assert!(
            held(home, &c.ids[0])
                .iter()
                .any(|(b, p)| *b == hex::encode(RECOVERY_BLOCK) && *p == u32::MAX),
            "no recovery record on {}",
            home.display()
        );
    }
    // No supplier holds the marker text or the marker file name, anywhere under its home.
    for home in &c.homes[1..] {
        for file in files_under(home) {
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
            assert!(!contains(&bytes, MARKER), "plaintext in {}", file.display());
            assert!(
                !contains(&bytes, NAME_MARKER.as_bytes()),
                "a file name in {}",
                file.display()
            );
        }
    }

    let second = backup(&c.homes[0], source.path());
    assert_eq!(second["outcome"], "committed", "{second:#}");
    assert_eq!(second["new_blocks"], 0, "{second:#}");
    assert_eq!(
        second["bytes_read"], 0,
        "unchanged files are not read again"
    );
    let after_second = placement(&c);
    let uploaded: Vec<&String> = after_second
        .keys()
        .filter(|b| !after_first.contains_key(*b))
        .collect();
    // (Retention may already have deleted the first head, which nothing references now.) The
    // first tree segment is kept; the second snapshot's is its (no) changes.
    assert_eq!(
        uploaded.len(),
        2,
        "only the new tree segment and the new head were uploaded"
    );

    let out = bitdust(&c.homes[0], &["list", "--json"]);
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let versions = list["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 2, "{list:#}");
    assert!(versions[1]["snapshot"].as_u64() > versions[0]["snapshot"].as_u64());

    nodes[0].signal(libc::SIGTERM);
    assert!(nodes[0].wait_exit().success());
    let known = catalog_blocks(&c.homes[0]);
    for block in after_second.keys() {
        assert!(
            known.contains(block),
            "a supplier holds unknown block {block}"
        );
    }
}

#[test]
fn a_backup_killed_midway_resumes_and_uploads_each_block_under_one_id() {
    let c = star(6);
    let small_blocks = [("BITDUST_BACKUP__BLOCK_SIZE", "1 MiB")];
    let mut nodes: Vec<Node> = c
        .homes
        .iter()
        .map(|h| Node::start_with(h, &small_blocks))
        .collect();
    wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    for i in 0..16 {
        std::fs::write(
            source.path().join(format!("f{i}.bin")),
            noise(100 + i, 3 << 20),
        )
        .expect("write");
    }
    // One supplier frozen: its fragments stay unanswered, so the job fills its bound of unplaced
    // blocks and stalls midway (deterministically, until the request timeout).
    nodes[1].signal(libc::SIGSTOP);
    let out = bitdust(
        &c.homes[0],
        &["backup", source.path().to_str().expect("utf-8")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the job stalled midway", 60, || {
        let job = node_status(&c.homes[0])?.backup.running?;
        (job.blocks >= 8).then_some(())
    });
    nodes[0].signal(libc::SIGKILL);
    nodes[0].wait_exit();
    nodes[1].signal(libc::SIGCONT);
    let before_restart = placement(&c);
    assert!(
        !before_restart.is_empty(),
        "fragments were placed before the kill"
    );

    let mut owner = Node::start_with(&c.homes[0], &small_blocks);
    owner.wait_log("the unfinished backup resumed", |v| {
        v["message"] == "resuming an unfinished backup"
    });
    let result = wait_for("the resumed backup finished", 120, || {
        node_status(&c.homes[0])?.backup.finished.first().cloned()
    });
    assert_eq!(result.outcome.as_str(), "committed", "{result:?}");
    assert_eq!(result.files, 16);
    assert!(result.catalog_stored);

    let after = placement(&c);
    assert_spread(&after);
    for block in before_restart.keys() {
        assert!(after.contains_key(block), "block {block} lost");
    }
    owner.signal(libc::SIGTERM);
    assert!(owner.wait_exit().success());
    let known = catalog_blocks(&c.homes[0]);
    for block in after.keys() {
        assert!(
            known.contains(block),
            "block {block} on suppliers is not in the catalog: uploaded under a second id"
        );
    }
    let outbox: Vec<PathBuf> = files_under(&c.homes[0].join("outbox"));
    assert!(outbox.is_empty(), "staged fragments left: {outbox:?}");
    let out = bitdust(&c.homes[0], &["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let versions = list["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 1, "{list:#}");
    assert_eq!(versions[0]["bytes"], 16 * (3 << 20), "{list:#}");
}

#[test]
fn with_suppliers_away_the_job_waits_then_commits_and_sends_the_rest_when_they_return() {
    let c = star(6);
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    let hired = wait_all_connected(&c.homes[0], 60);
    let home_of = |id: &String| c.ids.iter().position(|x| x == id).expect("a friend");
    // The suppliers of positions 3, 4 and 5 stop: only 3 of the k = 4 needed remain.
    let away: Vec<usize> = hired[3..].iter().map(home_of).collect();
    for &i in &away {
        nodes[i].signal(libc::SIGTERM);
        assert!(nodes[i].wait_exit().success());
    }
    wait_for("three positions down", 30, || {
        let p = positions(&c.homes[0])?;
        (p.iter().filter(|(_, state)| state == "Connected").count() == 3).then_some(())
    });
    let source = tempfile::tempdir().expect("tempdir");
    for i in 0..6 {
        std::fs::write(
            source.path().join(format!("f{i}.bin")),
            noise(200 + i, 2 << 20),
        )
        .expect("write");
    }
    let out = bitdust(
        &c.homes[0],
        &["backup", source.path().to_str().expect("utf-8")],
    );
    assert!(out.status.success());
    wait_for("the job waiting for suppliers", 30, || {
        let job = node_status(&c.homes[0])?.backup.running?;
        (job.state == "WaitingForSuppliers").then_some(())
    });

    // Two come back (5 of 6 up): the job commits, one fragment per block waits in the outbox.
    for &i in &away[..2] {
        nodes[i] = Node::start(&c.homes[i]);
    }
    let result = wait_for("the backup committed", 60, || {
        node_status(&c.homes[0])?.backup.finished.first().cloned()
    });
    assert_eq!(result.outcome.as_str(), "committed", "{result:?}");
    // Committed; the sixth fragments wait (a returning supplier may still be reconnecting).
    let job = wait_for("redundancy 1 while one supplier is away", 30, || {
        let job = node_status(&c.homes[0])?.backup.running?;
        (job.state == "Draining" && job.worst_redundancy == 1).then_some(job)
    });
    assert!(job.queued_fragments > 0, "{job:?}");
    let waiting = placement(&c);
    assert!(
        waiting.values().all(|p| p.len() == 5),
        "5 positions per block while one supplier is away: {waiting:?}"
    );

    // The last one returns: its fragments are sent, the outbox empties.
    nodes[away[2]] = Node::start(&c.homes[away[2]]);
    // The job ends when the last fragment is acknowledged; its staged file is removed just
    // after its record is written, so the outbox is awaited too, not read at that instant.
    wait_for("the outbox drained", 60, || {
        let s = node_status(&c.homes[0])?;
        (s.backup.running.is_none() && files_under(&c.homes[0].join("outbox")).is_empty())
            .then_some(())
    });
    let after = placement(&c);
    assert_spread(&after);
}

#[test]
fn a_configured_source_is_backed_up_on_schedule_with_its_excludes() {
    let c = star(6);
    let source = tempfile::tempdir().expect("tempdir");
    std::fs::write(source.path().join("keep.txt"), b"kept").expect("write");
    std::fs::write(source.path().join("scratch.tmp"), b"left out").expect("write");
    let config = c.homes[0].join("config.toml");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        "\n[[backup.sources]]\npath = \"{}\"\nschedule = \"1h\"\nexclude = [\"*.tmp\"]\n",
        source.path().display()
    ));
    std::fs::write(&config, text).expect("write config");
    let _nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    // Never backed up: due at once; it runs as soon as the suppliers are there.
    let result = wait_for("the scheduled backup", 90, || {
        node_status(&c.homes[0])?.backup.finished.first().cloned()
    });
    assert_eq!(result.outcome.as_str(), "committed", "{result:?}");
    assert_eq!(result.files, 1, "the *.tmp file is excluded: {result:?}");
    assert_eq!(result.source, source.path().display().to_string());
    // Not again within the hour.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let status = node_status(&c.homes[0]).expect("status");
    assert_eq!(status.backup.finished.len(), 1, "{:?}", status.backup);
    assert!(status.backup.running.is_none());
}

// ------------------------------------------------------------------ restore

/// `bitdust restore ARGS --wait --json`: (exit success, the result).

#[test]
fn restore_is_byte_identical_for_the_latest_an_older_version_and_a_sub_path_and_with_m_suppliers_away()
 {
    let c = star(6);
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    let hired = wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());
    let v1_copy = tempfile::tempdir().expect("tempdir");
    let cp = std::process::Command::new("cp")
        .args(["-a", &format!("{}/.", source.path().display())])
        .arg(v1_copy.path())
        .status()
        .expect("cp");
    assert!(cp.success());
    let first = backup(&c.homes[0], source.path());
    let v1 = first["snapshot"].as_u64().expect("snapshot");
    std::fs::write(source.path().join("docs/note-0.txt"), b"changed in v2").expect("write");
    std::fs::write(source.path().join("new-in-v2"), noise(7, 100_000)).expect("write");
    backup(&c.homes[0], source.path());
    let out = tempfile::tempdir().expect("tempdir");

    // The latest version.
    let latest = out.path().join("latest");
    let (ok, r) = restore(&c.homes[0], &["--to", latest.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    assert_eq!(r["outcome"], "complete");
    assert_same_tree(source.path(), &latest);
    // Just k fragments per block were fetched: at most (k + m) / k of what was stored.
    let stored: u64 = placement(&c).len() as u64; // blocks, for the message
    assert_eq!(r["extra_fragments"], 0, "{r:#} ({stored} blocks)");

    // The older version, by SOURCE@VERSION.
    let older = out.path().join("older");
    let spec = format!("{}@{v1}", source.path().display());
    let (ok, r) = restore(
        &c.homes[0],
        &[&spec, "--to", older.to_str().expect("utf-8")],
    );
    assert!(ok, "{r:#}");
    assert_same_tree(v1_copy.path(), &older);

    // A sub-path: that directory and its ancestors only.
    let sub = out.path().join("sub");
    let (ok, r) = restore(
        &c.homes[0],
        &["--to", sub.to_str().expect("utf-8"), "--path", "docs/deep"],
    );
    assert!(ok, "{r:#}");
    assert!(sub.join("docs/deep/er/big-copy.bin").exists());
    assert!(!sub.join("big.bin").exists() && !sub.join("docs/note-1.txt").exists());

    // An existing different file is not overwritten without --overwrite.
    let (ok, r) = restore(&c.homes[0], &["--to", latest.to_str().expect("utf-8")]);
    assert!(ok, "an identical tree is left as it is: {r:#}");
    std::fs::write(latest.join("empty"), b"mine").expect("write");
    let (ok, r) = restore(&c.homes[0], &["--to", latest.to_str().expect("utf-8")]);
    assert!(!ok && r["outcome"] == "partial", "{r:#}");
    assert_eq!(std::fs::read(latest.join("empty")).expect("read"), b"mine");

    // m = 2 suppliers away: still byte-identical.
    let home_of = |id: &String| c.ids.iter().position(|x| x == id).expect("a friend");
    let away: Vec<usize> = hired[..3].iter().map(home_of).collect();
    for &i in &away[..2] {
        nodes[i].signal(libc::SIGTERM);
        assert!(nodes[i].wait_exit().success());
    }
    let degraded = out.path().join("degraded");
    let (ok, r) = restore(&c.homes[0], &["--to", degraded.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    assert_same_tree(source.path(), &degraded);

    // m + 1 away: what can be restored is, the rest is named, the exit status says so.
    nodes[away[2]].signal(libc::SIGTERM);
    assert!(nodes[away[2]].wait_exit().success());
    let partial = out.path().join("partial");
    let (ok, r) = restore(&c.homes[0], &["--to", partial.to_str().expect("utf-8")]);
    assert!(!ok, "{r:#}");
    assert_eq!(r["outcome"], "partial", "{r:#}");
    let failed = r["failed"].as_array().expect("failed");
    assert!(
        failed.iter().any(|f| f["path"].as_str() == Some("big.bin")),
        "{r:#}"
    );
    assert!(
        partial.join("empty").exists(),
        "files needing no block are restored"
    );
    assert!(partial.join("link").symlink_metadata().is_ok());
}

#[test]
fn a_supplier_serving_forged_bytes_is_caught_and_another_fragment_used() {
    let c = star(6);
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    let hired = wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    std::fs::write(source.path().join("data.bin"), noise(9, 3 << 20)).expect("write");
    backup(&c.homes[0], source.path());
    // The supplier of position 0 (a data position, always asked first) is stopped, made to lie
    // about everything it holds, and started again.
    let liar = c
        .ids
        .iter()
        .position(|id| *id == hired[0])
        .expect("a friend");
    nodes[liar].signal(libc::SIGTERM);
    assert!(nodes[liar].wait_exit().success());
    assert!(make_supplier_lie(&c.homes[liar], &c.ids[0]) >= 2);
    nodes[liar] = Node::start(&c.homes[liar]);
    wait_all_connected(&c.homes[0], 60);
    let to = tempfile::tempdir().expect("tempdir");
    let target = to.path().join("r");
    let (ok, r) = restore(&c.homes[0], &["--to", target.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    assert_same_tree(source.path(), &target);
    assert_eq!(
        r["extra_fragments"], 1,
        "one parity fragment replaced the forged one: {r:#}"
    );
    assert_eq!(
        r["corrupt_fragments"][0][0], hired[0],
        "the forging supplier is named: {r:#}"
    );
}

// ------------------------------------------------------------------ recovery

/// The binary with `$BITDUST_PASSPHRASE` set (stdin not a terminal: it never prompts).
fn bitdust_with_passphrase(home: &Path, args: &[&str], passphrase: &str) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("RUST_LOG")
        .env("BITDUST_PASSPHRASE", passphrase)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("bitdust runs")
}

#[test]
fn a_new_machine_with_the_key_file_and_one_friend_recovers_the_catalog_and_restores() {
    let c = star(6);
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());
    backup(&c.homes[0], source.path());
    let keys = tempfile::tempdir().expect("tempdir");
    let key_file = keys.path().join("owner.key");
    let out = bitdust_with_passphrase(
        &c.homes[0],
        &["export-key", "--out", key_file.to_str().expect("utf-8")],
        "correct horse",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The old machine is gone.
    nodes[0].signal(libc::SIGKILL);
    nodes[0].wait_exit();
    let fresh = tempfile::tempdir().expect("tempdir");
    let new_home = fresh.path().join("owner-again");
    let listen = format!("127.0.0.1:{}", free_port());
    let friend = card(&c.homes[1]);
    let out = bitdust_with_passphrase(
        &new_home,
        &[
            "recover",
            "--key",
            key_file.to_str().expect("utf-8"),
            "--peer",
            &friend,
            "--listen",
            &listen,
        ],
        "correct horse",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut owner = Node::start(&new_home);
    owner.wait_log("the catalog recovered", |v| {
        v["message"] == "recovered the catalog; resuming the suppliers"
    });
    wait_all_connected(&new_home, 60);
    let list = bitdust(&new_home, &["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(
        list["versions"].as_array().map(Vec::len),
        Some(1),
        "{list:#}"
    );
    let to = fresh.path().join("restored");
    let (ok, r) = restore(&new_home, &["--to", to.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    assert_same_tree(source.path(), &to);
}

#[test]
fn a_restore_killed_midway_completes_when_run_again_and_writes_nothing_outside_its_target() {
    let c = star(6);
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    // Many small files: each is written, fsynced and renamed, so the restore takes seconds.
    for i in 0..1000u64 {
        let dir = source.path().join(format!("d{}", i % 10));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("f{i}")), noise(1000 + i, 8192)).expect("write");
    }
    backup(&c.homes[0], source.path());
    let out = tempfile::tempdir().expect("tempdir");
    let to = out.path().join("to");
    let asked = bitdust(
        &c.homes[0],
        &["restore", "--to", to.to_str().expect("utf-8")],
    );
    assert!(asked.status.success());
    let midway = wait_for("the restore under way", 60, || {
        let s = node_status(&c.homes[0])?;
        if let Some(job) = s.restore.running {
            return (job.files_done > 0).then_some(true);
        }
        (!s.restore.finished.is_empty()).then_some(false)
    });
    nodes[0].signal(libc::SIGKILL);
    nodes[0].wait_exit();
    let mut owner = Node::start(&c.homes[0]);
    owner.wait_running();
    wait_all_connected(&c.homes[0], 60);
    let (ok, r) = restore(&c.homes[0], &["--to", to.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    // Files made durable before the kill (renames come in synced batches) are skipped, the
    // rest written: every file is accounted for once.
    let (written, skipped) = (
        r["files"].as_u64().expect("count"),
        r["skipped_existing"].as_u64().expect("count"),
    );
    assert_eq!(written + skipped, 1000, "killed midway: {midway}; {r:#}");
    assert_same_tree(source.path(), &to);
    // Only the target was written to: the scratch directory holds it and nothing else.
    let entries: Vec<_> = std::fs::read_dir(out.path())
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("to")]);
}

/// The exit status scripts rely on: a socket is left out by design (status 0); a file that
/// changes while it is read is named and the backup, committed all the same, exits 3 with a
/// one-line summary on stderr.
#[test]
fn a_backup_that_could_not_read_everything_exits_3_and_a_socket_leaves_the_status_alone() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let c = star(6);
    let _nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    std::fs::write(source.path().join("kept"), b"kept").expect("write");
    let _socket =
        std::os::unix::net::UnixListener::bind(source.path().join("sock")).expect("socket");

    let first = backup(&c.homes[0], source.path());
    assert_eq!(first["outcome"], "committed", "{first:#}");
    let skipped = first["skipped"].as_array().expect("list");
    assert_eq!(skipped.len(), 1, "{first:#}");
    assert_eq!(skipped[0]["path"], "sock");
    assert_eq!(skipped[0]["by_design"], true);

    // A file appended to while the backup reads it (a busy log).
    let growing = source.path().join("growing");
    let mut log = std::fs::File::create(&growing).expect("create");
    log.write_all(&noise(7, 32 << 20)).expect("write");
    let stop = Arc::new(AtomicBool::new(false));
    let appender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = log.write_all(&[b'x'; 4096]);
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let out = bitdust(
        &c.homes[0],
        &[
            "backup",
            source.path().to_str().expect("utf-8"),
            "--wait",
            "--json",
        ],
    );
    stop.store(true, Ordering::Relaxed);
    appender.join().expect("appender");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("could not be read"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON result");
    assert_eq!(second["outcome"], "committed", "{second:#}");
    let named: Vec<(&str, bool)> = second["skipped"]
        .as_array()
        .expect("list")
        .iter()
        .map(|s| (s["path"].as_str().unwrap_or(""), s["by_design"] == true))
        .collect();
    assert!(named.contains(&("growing", false)), "{second:#}");
    assert!(named.contains(&("sock", true)), "{second:#}");
}
