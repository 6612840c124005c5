//! Backups between real nodes on loopback: an owner and six suppliers (4 + 2). Where fragments
//! land, that no supplier holds plaintext, that an unchanged tree uploads nothing new, and that a
//! backup killed midway resumes and uploads each block under one id only.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bitdust::actors::backup_job::RECOVERY_BLOCK;
use bitdust::store::catalog;
use common::*;

const MARKER: &[u8] = b"PLAINTEXT-MARKER-7f3a9c-do-not-leak";
const NAME_MARKER: &str = "secret-name-marker-51c2";

/// Deterministic pseudo-random bytes (xorshift): incompressible, no two files alike.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A mixed tree: text holding the marker, a file whose name is a marker, a big random file and
/// its duplicate, an empty file, a symlink, nested directories.
fn mixed_tree(root: &Path) {
    std::fs::create_dir_all(root.join("docs/deep/er")).expect("mkdir");
    for i in 0..20 {
        let mut text = Vec::new();
        for line in 0..200 {
            text.extend_from_slice(format!("line {line} of note {i}: ").as_bytes());
            text.extend_from_slice(MARKER);
            text.push(b'\n');
        }
        std::fs::write(root.join(format!("docs/note-{i}.txt")), text).expect("write");
    }
    std::fs::write(root.join(format!("docs/deep/{NAME_MARKER}.txt")), b"x").expect("write");
    let big = noise(1, 3 << 20);
    std::fs::write(root.join("big.bin"), &big).expect("write");
    std::fs::write(root.join("docs/deep/er/big-copy.bin"), &big).expect("write");
    std::fs::write(root.join("empty"), b"").expect("write");
    std::os::unix::fs::symlink("docs/note-1.txt", root.join("link")).expect("symlink");
}

/// `bitdust backup PATH --wait --json`, asserted to succeed; its result.
fn backup(home: &Path, path: &Path) -> serde_json::Value {
    let out = bitdust(
        home,
        &["backup", path.to_str().expect("utf-8"), "--wait", "--json"],
    );
    assert!(
        out.status.success(),
        "backup failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON result")
}

/// Every fragment file a supplier holds for `customer`: (block hex, position).
fn held(supplier: &Path, customer: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let root = supplier.join("store").join(customer);
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return out;
    };
    for dir in dirs.flatten() {
        for file in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = file.file_name().to_string_lossy().to_string();
            if let Some((block, position)) = name.split_once('.')
                && let Ok(position) = position.parse::<u32>()
            {
                out.push((block.to_string(), position));
            }
        }
    }
    out
}

/// Data and catalog fragments across all suppliers: block -> position -> suppliers holding it.
fn placement(c: &Cluster) -> BTreeMap<String, BTreeMap<u32, Vec<usize>>> {
    let recovery = hex::encode(RECOVERY_BLOCK);
    let mut blocks: BTreeMap<String, BTreeMap<u32, Vec<usize>>> = BTreeMap::new();
    for (s, home) in c.homes.iter().enumerate().skip(1) {
        for (block, position) in held(home, &c.ids[0]) {
            if block != recovery {
                blocks
                    .entry(block)
                    .or_default()
                    .entry(position)
                    .or_default()
                    .push(s);
            }
        }
    }
    blocks
}

/// Each block's six fragments are on six different suppliers, one per position.
fn assert_spread(blocks: &BTreeMap<String, BTreeMap<u32, Vec<usize>>>) {
    for (block, positions) in blocks {
        assert_eq!(
            positions.keys().copied().collect::<Vec<_>>(),
            (0..6).collect::<Vec<u32>>(),
            "block {block}: positions {positions:?}"
        );
        let suppliers: BTreeSet<usize> = positions.values().flatten().copied().collect();
        assert_eq!(
            suppliers.len(),
            6,
            "block {block}: fragments on {suppliers:?}"
        );
    }
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The block ids in the owner's block index (the owner must be stopped).
fn catalog_blocks(owner: &Path) -> BTreeSet<String> {
    let store = bitdust::store::RocksStore::open(&owner.join("db")).expect("open the owner's db");
    catalog::blocks(&store)
        .map(|b| hex::encode(b.expect("readable block").id.0))
        .collect()
}

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
        new_blocks + 1,
        "data blocks plus one catalog block"
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
    assert_eq!(
        after_second.len(),
        after_first.len() + 1,
        "only the new catalog was uploaded"
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
    assert_eq!(result.outcome, "committed", "{result:?}");
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
    assert_eq!(result.outcome, "committed", "{result:?}");
    let job = node_status(&c.homes[0])
        .and_then(|s| s.backup.running)
        .expect("the job still sends what waits");
    assert_eq!(job.state, "Draining");
    assert_eq!(job.worst_redundancy, 1, "5 of 6 fragments placed: {job:?}");
    assert!(job.queued_fragments > 0, "{job:?}");
    let waiting = placement(&c);
    assert!(
        waiting.values().all(|p| p.len() == 5),
        "5 positions per block while one supplier is away: {waiting:?}"
    );

    // The last one returns: its fragments are sent, the outbox empties.
    nodes[away[2]] = Node::start(&c.homes[away[2]]);
    wait_for("the outbox drained", 60, || {
        let s = node_status(&c.homes[0])?;
        s.backup.running.is_none().then_some(())
    });
    let after = placement(&c);
    assert_spread(&after);
    assert!(files_under(&c.homes[0].join("outbox")).is_empty());
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
    assert_eq!(result.outcome, "committed", "{result:?}");
    assert_eq!(result.files, 1, "the *.tmp file is excluded: {result:?}");
    assert_eq!(result.source, source.path().display().to_string());
    // Not again within the hour.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let status = node_status(&c.homes[0]).expect("status");
    assert_eq!(status.backup.finished.len(), 1, "{:?}", status.backup);
    assert!(status.backup.running.is_none());
}
