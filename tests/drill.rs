//! Restore drills between real nodes on loopback (issue 10 §6): an owner and six suppliers
//! (4 + 2). `bitdust drill --json` restores a sample of the latest snapshot in memory and checks
//! it byte for byte: it passes on a sound backup, still passes (from parity) with two positions
//! bad, and names the files it cannot restore once more than `m` positions are bad.

mod common;

use std::path::Path;

use bitdust::actors::backup_job::RECOVERY_BLOCK;
use bitdust::actors::drill::DrillReport;
use common::*;

/// Small blocks, so the 3 MiB file alone spans several.
const SMALL_BLOCKS: [(&str, &str); 1] = [("BITDUST_BACKUP__BLOCK_SIZE", "1 MiB")];
const K: u64 = 4;

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

/// Six non-empty files (fewer than a drill samples, far under its byte bound, so every drill
/// checks all of them and touches every data block), an empty file and a symlink.
fn small_tree(root: &Path) {
    std::fs::create_dir_all(root.join("docs/deep")).expect("mkdir");
    for i in 0..3 {
        let text = format!("note {i}\n").repeat(2000);
        std::fs::write(root.join(format!("docs/note-{i}.txt")), text).expect("write");
    }
    std::fs::write(root.join("big.bin"), noise(1, 3 << 20)).expect("write");
    std::fs::write(root.join("docs/deep/mid.bin"), noise(2, 300_000)).expect("write");
    std::fs::write(root.join("docs/deep/one"), b"x").expect("write");
    std::fs::write(root.join("empty"), b"").expect("write");
    std::os::unix::fs::symlink("docs/note-1.txt", root.join("link")).expect("symlink");
}

/// `bitdust backup PATH --wait --json`, asserted committed; its result.
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
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON result");
    assert_eq!(result["outcome"], "committed", "{result:#}");
    result
}

/// `bitdust drill --json`: (exit success, the report, its `passed`).
fn drill(home: &Path) -> (bool, DrillReport, bool) {
    let out = bitdust(home, &["drill", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON report: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let report: DrillReport = serde_json::from_value(json.clone()).expect("a drill report");
    let passed = json["passed"].as_bool().expect("passed is a bool");
    (out.status.success(), report, passed)
}

/// The fragment files `supplier` holds for `customer` at `position` (the recovery record,
/// stored whole at its own position, is never one of them).
fn fragment_files(supplier: &Path, customer: &str, position: u32) -> Vec<std::path::PathBuf> {
    let suffix = format!(".{position}");
    let recovery = hex::encode(RECOVERY_BLOCK);
    let mut out = Vec::new();
    let root = supplier.join("store").join(customer);
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = file.file_name().to_string_lossy().to_string();
            if name.ends_with(&suffix) && !name.starts_with(&recovery) {
                out.push(file.path());
            }
        }
    }
    out.sort();
    out
}

/// Overwrites a fragment file with garbage of the same length. The supplier's index still has
/// the old hash, so it refuses to serve it (as it would after bit rot).
fn garble(file: &Path) {
    let len = std::fs::metadata(file).expect("fragment").len() as usize;
    std::fs::write(file, noise(len as u64 ^ 0xbad, len)).expect("overwrite");
}

/// Garbles the fragment bytes of a fragment file (its envelope and manifest stay well formed)
/// and makes the (stopped) supplier's index agree, so it serves the garbage as good bytes: only
/// the owner's manifest can catch it.
fn forge(supplier: &Path, customer: &str, file: &Path) {
    use bitdust::store::codec::{self, records::FragmentEntry};
    use bitdust::store::{Cf, KvStore};
    let mut bytes = std::fs::read(file).expect("fragment");
    let fragment = bitdust::data::stored::unwrap(&bytes)
        .expect("an envelope")
        .1
        .len();
    let start = bytes.len() - fragment;
    bytes[start..].copy_from_slice(&noise(fragment as u64, fragment));
    std::fs::write(file, &bytes).expect("overwrite");
    let name = file
        .file_name()
        .expect("a name")
        .to_string_lossy()
        .to_string();
    let (block, position) = name.split_once('.').expect("<block>.<position>");
    let position: u32 = position.parse().expect("a position");
    let mut key = b"f/".to_vec();
    key.extend_from_slice(&hex::decode(customer).expect("hex"));
    key.extend_from_slice(&hex::decode(block).expect("hex"));
    key.extend_from_slice(&position.to_be_bytes());
    let entry = FragmentEntry {
        size: bytes.len() as u64,
        blake3: blake3::hash(&bytes).as_bytes().to_vec(),
    };
    let store = bitdust::store::RocksStore::open(&supplier.join("db")).expect("supplier db");
    store
        .put(Cf::SupplierIndex, &key, &codec::encode(&entry))
        .expect("rewrite the index");
}

#[test]
fn a_drill_passes_uses_parity_for_m_bad_positions_and_names_the_files_past_m() {
    let c = star(6);
    let mut nodes: Vec<Node> = c
        .homes
        .iter()
        .map(|h| Node::start_with(h, &SMALL_BLOCKS))
        .collect();
    let hired = wait_all_connected(&c.homes[0], 60);
    let home_of = |id: &String| c.ids.iter().position(|x| x == id).expect("a friend");
    let source = tempfile::tempdir().expect("tempdir");
    small_tree(source.path());
    let result = backup(&c.homes[0], source.path());
    let blocks = result["new_blocks"].as_u64().expect("new_blocks");
    assert!(blocks >= 3, "the big file spans blocks: {result:#}");

    // (1) A sound backup: every file checked whole, each block decoded from exactly k fragments.
    let (ok, sound, passed) = drill(&c.homes[0]);
    assert!(ok && passed && sound.passed(), "{sound:?}");
    assert_eq!(sound.files, 6, "every non-empty file: {sound:?}");
    assert_eq!(sound.bytes, result["bytes"].as_u64().expect("bytes"));
    assert_eq!(sound.source, source.path().display().to_string());
    assert_eq!(
        sound.snapshot,
        result["snapshot"].as_u64().expect("snapshot")
    );
    assert_eq!(sound.fragments_fetched, K * blocks, "{sound:?}");

    // (2) Positions 0 and 1 bad on every block: position 0's supplier serves forged bytes as
    // good ones, position 1's refuses its garbled files. Parity stands in for both.
    let liar = home_of(&hired[0]);
    nodes[liar].signal(libc::SIGTERM);
    assert!(nodes[liar].wait_exit().success());
    let forged = fragment_files(&c.homes[liar], &c.ids[0], 0);
    assert!(forged.len() as u64 > blocks, "data and catalog blocks");
    for file in &forged {
        forge(&c.homes[liar], &c.ids[0], file);
    }
    nodes[liar] = Node::start_with(&c.homes[liar], &SMALL_BLOCKS);
    for file in fragment_files(&c.homes[home_of(&hired[1])], &c.ids[0], 1) {
        garble(&file);
    }
    wait_all_connected(&c.homes[0], 60);
    let (ok, degraded, passed) = drill(&c.homes[0]);
    assert!(ok && passed && degraded.passed(), "{degraded:?}");
    assert_eq!(degraded.bytes, sound.bytes, "{degraded:?}");
    // Per block: 0 (forged, rejected), 2, 3 came back and 1 was refused; then 4 and 5.
    assert_eq!(degraded.fragments_fetched, 5 * blocks, "{degraded:?}");
    assert!(degraded.fragments_fetched > sound.fragments_fetched);

    // (3) A third position bad: fewer than k good fragments for every block.
    for file in fragment_files(&c.homes[home_of(&hired[2])], &c.ids[0], 2) {
        garble(&file);
    }
    let (ok, lost, passed) = drill(&c.homes[0]);
    assert!(!ok && !passed && !lost.passed(), "{lost:?}");
    assert_eq!(lost.files, 6, "{lost:?}");
    assert_eq!(lost.bytes, 0, "{lost:?}");
    let mut failed: Vec<&str> = lost.failures.iter().map(|f| f.path.as_str()).collect();
    failed.sort();
    assert_eq!(
        failed,
        [
            "big.bin",
            "docs/deep/mid.bin",
            "docs/deep/one",
            "docs/note-0.txt",
            "docs/note-1.txt",
            "docs/note-2.txt"
        ],
        "{lost:?}"
    );
    for failure in &lost.failures {
        let r = &failure.reason;
        assert!(
            r.contains("3 of the 4 fragments needed")
                && r.contains("position 0: fragment 0 does not match its hash")
                && r.contains("position 2: refused (STORAGE_ERROR)"),
            "{failure:?}"
        );
    }
}

#[test]
fn a_drill_before_any_backup_says_there_is_nothing_to_drill() {
    let (_dir, home) = temp_home();
    init(&home, "lonely");
    let mut node = Node::start(&home);
    node.wait_running();
    let out = bitdust(&home, &["drill", "--json"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no committed snapshot"), "{stderr}");
}
