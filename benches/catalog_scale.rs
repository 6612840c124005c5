//! The owner's catalog at scale, without a network (issue 20): a generated catalog of
//! `BENCH_FILES` files (default 1,000,000) of one chunk each, in blocks of ~900 chunks, in a
//! RocksDB store; a first version, then a second with `BENCH_CHANGED` per mille of the files
//! changed (default 10 = 1 %), each changed file in a new block.
//!
//! Run: `cargo bench --profile dev --bench catalog_scale` (harness = false; prints figures).
//! Env: `BENCH_FILES`, `BENCH_CHANGED`, `BENCH_TMPDIR` (where the stores go, default the system's
//! temporary directory; ~0.5 GB at a million files).
//!
//! For each step: seconds, peak RSS of the step (the kernel's high-water mark, reset before it
//! through /proc/self/clear_refs: the process's RSS before the step is included), and sizes: the whole tree segment (what a first upload stores),
//! the second version's segment (its changes), the head, each raw and zstd-compressed (what is
//! sealed); the monitor's load of the blocks to follow; `list` (every version); and an import
//! of the three segments into an empty store (a recovery).

mod common;
use common::env_or;
use std::path::PathBuf;
use std::time::Instant;

use bitdust::crypto::identity::NodeId;
use bitdust::data::{BlockId, ChunkId, DEFAULT_ZSTD_LEVEL, compress::compress};
use bitdust::pipeline::restore;
use bitdust::store::catalog::segments::{write_head, write_tree};
use bitdust::store::catalog::{
    self, BlockEntry, FileEntry, FileKind, FragmentPlace, Owner, Snapshot, SnapshotId,
};
use bitdust::store::{Batch, KvStore, RocksStore};

fn hwm_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb * 1024.0 / 1e6)
}

/// Resets the peak RSS to the current RSS (Linux ≥ 4.0), so the next reading is the step's.
fn reset_hwm() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn step<T>(name: &str, f: impl FnOnce() -> T) -> T {
    reset_hwm();
    let t = Instant::now();
    let out = f();
    println!(
        "{name:<44} {:>8.2} s   peak RSS {:>7.1} MB",
        t.elapsed().as_secs_f64(),
        hwm_mb()
    );
    out
}

fn chunk(n: u64) -> ChunkId {
    let mut id = *blake3::hash(&n.to_le_bytes()).as_bytes();
    id[0] ^= 0x5a;
    ChunkId(id)
}

fn block(n: u64) -> BlockId {
    BlockId(*blake3::hash(&(n | 1 << 63).to_le_bytes()).as_bytes())
}

fn entry(i: u64, version: u64) -> FileEntry {
    FileEntry {
        path: format!("d{:03}/e{:02}/f{i:07}.bin", i / 10_000, (i / 100) % 100).into_bytes(),
        kind: FileKind::File,
        mode: 0o644,
        mtime_ns: 1_700_000_000_000_000_000 + (i as i64) * 1_000 + version as i64,
        ctime_ns: 1_700_000_000_000_000_000 + (i as i64) * 1_000,
        inode: 1_000_000 + i,
        size: 1024 + (i * 7919) % 7168,
        chunks: vec![chunk(i + version * (1 << 40))],
        owner: Some(Owner {
            uid: 1000,
            gid: 1000,
            user: b"user".to_vec(),
            group: b"user".to_vec(),
        }),
        dev: 2049,
        links: 1,
        ..FileEntry::default()
    }
}

fn block_entry(n: u64) -> BlockEntry {
    BlockEntry {
        id: block(n),
        signed_manifest: vec![7; 170 + 6 * 32],
        data_shards: 4,
        parity_shards: 2,
        plain_len: 4 << 20,
        fragments: (0..6u8)
            .map(|p| FragmentPlace {
                supplier: Some(NodeId::from_bytes([p + 1; 16])),
                size: (1 << 20) + 300,
                blake3: [p; 32],
            })
            .collect(),
    }
}

fn snapshot(id: u64, files: u64) -> Snapshot {
    Snapshot {
        id: SnapshotId(id),
        source: "tree".into(),
        root: b"/srv/tree".to_vec(),
        started_at: 1_700_000_000 + id,
        finished_at: 1_700_000_100 + id,
        files,
        dirs: files / 100,
        symlinks: 0,
        bytes: files * 4600,
        new_bytes: files * 4600,
        new_blocks: files / 900,
        skipped: Vec::new(),
    }
}

/// Writes one version: `files` entries, the changed ones (every `1000 / changed`-th, for
/// version 2) with a new chunk in a new block; chunk and block entries for what is new.
fn write_version(kv: &RocksStore, version: u64, files: u64, changed: u64) {
    let every = 1000u64.checked_div(changed).unwrap_or(u64::MAX).max(1);
    let mut batch = Batch::new();
    let mut new_chunks = 0u64;
    let dir = |path: String| FileEntry {
        path: path.into_bytes(),
        kind: FileKind::Dir,
        mode: 0o755,
        ..FileEntry::default()
    };
    catalog::put_file(&mut batch, SnapshotId(version), &dir(String::new()));
    for i in 0..files {
        // The directories `entry` puts the files in, each before its first file.
        if i % 10_000 == 0 {
            let top = format!("d{:03}", i / 10_000);
            catalog::put_file(&mut batch, SnapshotId(version), &dir(top));
        }
        if i % 100 == 0 {
            let sub = format!("d{:03}/e{:02}", i / 10_000, (i / 100) % 100);
            catalog::put_file(&mut batch, SnapshotId(version), &dir(sub));
        }
        let is_new = version == 1 || i % every == 0;
        let e = entry(i, if is_new { version } else { 1 });
        catalog::put_file(&mut batch, SnapshotId(version), &e);
        if is_new {
            let b = version * (1 << 32) + new_chunks / 900;
            catalog::put_chunk(&mut batch, &e.chunks[0], &block(b));
            if new_chunks.is_multiple_of(900) {
                catalog::put_block(&mut batch, &block_entry(b));
            }
            new_chunks += 1;
        }
        if batch.ops().len() >= 20_000 {
            kv.write(std::mem::take(&mut batch)).expect("write");
        }
    }
    catalog::commit_snapshot(&mut batch, &snapshot(version, files));
    kv.write(batch).expect("write");
}

fn dir_mb(path: &std::path::Path) -> f64 {
    let mut total = 0u64;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total as f64 / 1e6
}

/// Raw and compressed as the upload seals it (block by block, 4 MiB each).
fn sizes(name: &str, bytes: &[u8]) {
    let packed: usize = bytes
        .chunks(4 << 20)
        .map(|piece| compress(piece, DEFAULT_ZSTD_LEVEL).map_or(piece.len(), |c| c.len()))
        .sum();
    println!(
        "{name:<44} {:>8.2} MB raw, {:>8.2} MB compressed",
        bytes.len() as f64 / 1e6,
        packed as f64 / 1e6
    );
}

fn main() {
    let files = env_or::<usize>("BENCH_FILES", 1_000_000) as u64;
    let changed = env_or::<usize>("BENCH_CHANGED", 10) as u64;
    let parent = std::env::var_os("BENCH_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = tempfile::tempdir_in(parent).expect("tempdir");
    println!(
        "catalog_scale: {files} files, {changed} per mille changed in version 2 (store in {})",
        dir.path().display()
    );
    let db = dir.path().join("owner");
    let kv = std::sync::Arc::new(RocksStore::open(&db).expect("open"));
    step("write version 1", || write_version(&kv, 1, files, changed));
    step("write version 2", || write_version(&kv, 2, files, changed));
    kv.flush().expect("flush");
    println!("{:<44} {:>8.1} MB", "owner's database", dir_mb(&db));

    // Written to files, as an upload codes them as they come: the steps hold no segment.
    let to_file = |name: &str| {
        let path = dir.path().join(name);
        (
            std::io::BufWriter::new(std::fs::File::create(&path).expect("create")),
            path,
        )
    };
    let (mut out, whole) = to_file("whole");
    step("tree segment of version 1 (whole)", || {
        write_tree(&*kv, SnapshotId(1), None, &mut out).expect("export")
    });
    drop(out);
    let (mut out, diff) = to_file("diff");
    step("tree segment of version 2 (changes)", || {
        write_tree(&*kv, SnapshotId(2), Some(SnapshotId(1)), &mut out).expect("export")
    });
    drop(out);
    let (mut out, head) = to_file("head");
    step("head", || write_head(&*kv, None, &mut out).expect("export"));
    drop(out);
    let read = |path: &PathBuf| std::fs::read(path).expect("read");
    sizes("  whole tree", &read(&whole));
    sizes("  changes", &read(&diff));
    sizes("  head", &read(&head));
    let followed = step("monitor: load the blocks to follow", || {
        bitdust::actors::monitor::followed_blocks(&*kv).expect("load")
    });
    println!("{:<44} {followed:>8}", "  blocks followed");
    let versions = step("list (every version)", || {
        catalog::snapshots(&*kv).expect("list").len()
    });
    println!("{:<44} {versions:>8}", "  versions");
    let plan = step("restore plan of version 2", || {
        restore::plan(kv.clone(), SnapshotId(2), None).expect("plan")
    });
    println!(
        "{:<44} {:>8} entries, {} blocks",
        "",
        plan.entries_total(),
        plan.blocks.len()
    );
    let walked = step("restore: entries read in walk order", || {
        plan.entries().filter(|e| e.is_ok()).count()
    });
    println!("{:<44} {walked:>8}", "  entries");
    let looked_up = step("restore: entries with their chunks' blocks", || {
        plan.entries_with_blocks()
            .filter_map(Result::ok)
            .map(|(_, blocks)| blocks.len())
            .sum::<usize>()
    });
    println!("{:<44} {looked_up:>8}", "  chunks");
    drop(plan);
    // As a recovery has it: the fetched catalog in a file, read twice, never held.
    let stored = dir.path().join("stored");
    std::fs::write(&stored, [read(&whole), read(&diff), read(&head)].concat()).expect("write");
    let again = dir.path().join("recovered");
    let target = RocksStore::open(&again).expect("open");
    let entries = step("import the three segments (a recovery)", || {
        let file = std::fs::File::open(&stored).expect("open");
        let reader = std::io::BufReader::with_capacity(1 << 16, file);
        catalog::import_stored_from(&target, reader)
            .expect("import")
            .0
    });
    println!("{:<44} {entries:>8}", "  entries written");
}
