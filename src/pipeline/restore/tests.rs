//! The restore writer's tests: real trees backed up through the pipeline, restored and compared.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, FileTimes, Permissions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use super::*;
use crate::data::{BlockManifest, decode_block, stored};
use crate::pipeline::staged_path;
use crate::pipeline::tests::{MemLookup, blocks, files, keys, mixed_tree, run, settings, write};
use crate::store::catalog::{BlockEntry, put_block, put_chunk, put_file};
use crate::store::{Batch, MemStore};

const SNAP: SnapshotId = SnapshotId(1);
/// 2020-09-13T12:26:40.123456789Z and a few more, with nanoseconds.
const T0: i64 = 1_600_000_000_123_456_789;

/// A source tree backed up into an outbox, and its catalog.
struct Backed {
    dir: tempfile::TempDir,
    src: PathBuf,
    outbox: PathBuf,
    kv: MemStore,
    blocks: HashMap<BlockId, BlockEntry>,
}

impl Backed {
    fn target(&self, name: &str, overwrite: bool) -> RestoreTarget {
        RestoreTarget::new(self.dir.path().join(name), overwrite)
    }
}

fn set_mtime(path: &Path, ns: i64) {
    let f = File::open(path).expect("open");
    f.set_times(FileTimes::new().set_modified(system_time(ns)))
        .expect("set mtime");
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, Permissions::from_mode(mode)).expect("chmod");
}

/// The pipeline's mixed tree plus modes, nanosecond mtimes (directories last) and a second
/// empty file, backed up through the real pipeline.
fn backed() -> Backed {
    backed_with(mixed)
}

fn mixed(src: &Path) {
    mixed_tree(src);
    write(src, "a/b/also-empty", b"");
    chmod(&src.join("small.txt"), 0o640);
    chmod(&src.join("z/2"), 0o755);
    chmod(&src.join("a/b"), 0o700);
    let mut n = 0;
    // Files, then directories deepest first: writing in a directory changes its mtime.
    for rel in [
        "small.txt",
        "big.bin",
        "empty",
        "a/b/also-empty",
        "z/1",
        "z/2",
        "a/text.log",
        "a/empty-dir",
        "a/b/c",
        "a/b",
        "z",
        "a",
    ] {
        n += 1;
        set_mtime(&src.join(rel), T0 + n * 1_000_000_007);
    }
}

fn backed_with(tree: fn(&Path)) -> Backed {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    tree(&src);
    let (events, _) = run(settings(&src, &outbox), MemLookup::default());
    let kv = MemStore::new();
    let mut batch = Batch::new();
    let mut block_entries = HashMap::new();
    for b in blocks(&events) {
        put_block(&mut batch, &b.entry);
        for (c, _) in &b.chunks {
            put_chunk(&mut batch, c, &b.entry.id);
        }
        block_entries.insert(b.entry.id, b.entry.clone());
    }
    for f in files(&events).values() {
        put_file(&mut batch, SNAP, f);
    }
    kv.write(batch).expect("write");
    Backed {
        dir,
        src,
        outbox,
        kv,
        blocks: block_entries,
    }
}

/// Decodes staged blocks as the network side would (envelope, owner's signature, decode);
/// records every request and can refuse some blocks.
struct Blocks<'a> {
    backed: &'a Backed,
    refuse: HashSet<BlockId>,
    calls: Vec<BlockId>,
    /// Every block handed out, to see which the cache still holds.
    given: Vec<Weak<Vec<u8>>>,
    /// Most blocks held (by the cache) at any request.
    max_held: usize,
}

impl<'a> Blocks<'a> {
    fn new(backed: &'a Backed) -> Self {
        Blocks {
            backed,
            refuse: HashSet::new(),
            calls: Vec::new(),
            given: Vec::new(),
            max_held: 0,
        }
    }

    fn get(&mut self, id: BlockId) -> Result<Arc<Vec<u8>>, BlockError> {
        self.calls.push(id);
        let held = self.given.iter().filter(|w| w.strong_count() > 0).count();
        self.max_held = self.max_held.max(held);
        if self.refuse.contains(&id) {
            return Err(BlockError::TooFewFragments);
        }
        let entry = &self.backed.blocks[&id];
        let public = keys().owner.verifying_key();
        let total = (entry.data_shards + entry.parity_shards) as usize;
        let stored: Vec<Vec<u8>> = (0..total)
            .map(|p| {
                std::fs::read(staged_path(&self.backed.outbox, &id, p as u32)).expect("staged")
            })
            .collect();
        let mut fragments = Vec::new();
        for s in &stored {
            let (signed, fragment) = stored::unwrap(s).expect("envelope");
            let manifest = BlockManifest::verify(signed, &public).expect("signature");
            assert_eq!(manifest.block_id(), id);
            fragments.push(fragment);
        }
        let (signed, _) = stored::unwrap(&stored[0]).expect("envelope");
        let manifest = BlockManifest::verify(signed, &public).expect("signature");
        let given: Vec<Option<&[u8]>> = fragments.iter().map(|f| Some(*f)).collect();
        let plain = Arc::new(
            decode_block(&given, &manifest, &keys().data.block)
                .expect("decodes")
                .plain,
        );
        self.given.push(Arc::downgrade(&plain));
        Ok(plain)
    }
}

fn restore(
    plan: &RestorePlan,
    target: &RestoreTarget,
    blocks: &mut Blocks<'_>,
    cache: usize,
) -> (RestoreReport, RestoreProgress) {
    let counters = RestoreCounters::default();
    let report = restore_files(plan, target, &mut |id| blocks.get(id), cache, &counters)
        .expect("target usable");
    (report, counters.snapshot())
}

/// What a tree holds, by relative path: kind, mode, mtime (not for links), bytes or target.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    mtime: i64,
    data: Vec<u8>,
}

fn tree(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, Node>) {
        let path = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        let ft = meta.file_type();
        let (kind, data, mtime) = if ft.is_symlink() {
            let t = std::fs::read_link(&path).expect("readlink");
            ("link", t.as_os_str().as_bytes().to_vec(), mtime_ns(&meta))
        } else if ft.is_dir() {
            ("dir", Vec::new(), mtime_ns(&meta))
        } else {
            ("file", std::fs::read(&path).expect("read"), mtime_ns(&meta))
        };
        let mode = if ft.is_symlink() {
            0
        } else {
            meta.mode() & 0o7777
        };
        out.insert(
            rel.to_string(),
            Node {
                kind,
                mode,
                mtime,
                data,
            },
        );
        if ft.is_dir() {
            for e in std::fs::read_dir(&path).expect("readdir") {
                let name = e.expect("entry").file_name().into_string().expect("utf-8");
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                walk(root, &child, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

fn assert_same_tree(src: &Path, dst: &Path) {
    let (a, b) = (tree(src), tree(dst));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same paths (no temporary file left)"
    );
    for (path, node) in &a {
        // Compare without dumping megabytes on failure.
        let other = &b[path];
        assert_eq!(
            (node.kind, node.mode, node.mtime, node.data.len()),
            (other.kind, other.mode, other.mtime, other.data.len()),
            "{path:?}"
        );
        assert!(node.data == other.data, "{path:?} differs");
    }
}

fn failed_paths(report: &RestoreReport) -> Vec<String> {
    let mut v: Vec<String> = report.failed.iter().map(|(p, _)| lossy(p)).collect();
    v.sort();
    v
}

fn counts(report: &RestoreReport) -> (u64, u64, u64, u64) {
    (
        report.files,
        report.dirs,
        report.symlinks,
        report.skipped_existing,
    )
}

#[test]
fn a_full_restore_is_byte_identical_with_modes_mtimes_links_and_empty_entries() {
    let b = backed();
    let plan = plan(&b.kv, SNAP, None).expect("plan");
    // Parents before children, every block once, in order of first need.
    for (i, e) in plan.files.iter().enumerate() {
        if let Some(slash) = e.path.iter().rposition(|c| *c == b'/') {
            let parent = &e.path[..slash];
            assert!(plan.files[..i].iter().any(|p| p.path == parent));
        }
    }
    assert_eq!(plan.blocks.len(), b.blocks.len());
    let target = b.target("out", false);
    let mut blocks = Blocks::new(&b);
    let (report, progress) = restore(&plan, &target, &mut blocks, 64);
    assert_eq!(report.failed, vec![]);
    assert_eq!(counts(&report), (10, 6, 1, 0), "the root + 5 dirs");
    assert_eq!(report.bytes, plan.bytes());
    assert_eq!(
        progress,
        RestoreProgress {
            files_done: plan.files.len() as u64,
            bytes_written: plan.bytes(),
            blocks_used: plan.blocks.len() as u64,
        }
    );
    assert_eq!(blocks.calls, plan.blocks, "each block once, in plan order");
    assert!(
        blocks.given.iter().all(|w| w.strong_count() == 0),
        "no block kept after the restore"
    );
    assert_same_tree(&b.src, &target.root);
}

#[test]
fn a_sub_path_restores_that_file_or_directory_only() {
    let b = backed();
    // A directory: its tree, and its ancestors' directories.
    let plan_dir = plan(&b.kv, SNAP, Some(b"a/b/")).expect("plan");
    let paths: Vec<String> = plan_dir.files.iter().map(|f| lossy(&f.path)).collect();
    assert_eq!(
        paths,
        [
            "",
            "a",
            "a/b",
            "a/b/also-empty",
            "a/b/c",
            "a/b/c/copy-of-big.bin",
            "a/b/small-dup.txt"
        ]
    );
    let target = b.target("dir", false);
    let (report, _) = restore(&plan_dir, &target, &mut Blocks::new(&b), 8);
    assert_eq!(report.failed, vec![]);
    let got = tree(&target.root);
    let want = tree(&b.src);
    for (path, node) in &got {
        if path.starts_with("a/b") {
            assert_eq!(node, &want[path], "{path}");
        }
    }
    assert!(!got.contains_key("z") && !got.contains_key("a/text.log"));

    // A file.
    let plan_file = plan(&b.kv, SNAP, Some(b"z/1")).expect("plan");
    let paths: Vec<String> = plan_file.files.iter().map(|f| lossy(&f.path)).collect();
    assert_eq!(paths, ["", "z", "z/1"]);
    let target = b.target("file", false);
    let (report, _) = restore(&plan_file, &target, &mut Blocks::new(&b), 8);
    assert_eq!(counts(&report), (1, 2, 0, 0));
    assert_eq!(tree(&target.root)["z/1"], tree(&b.src)["z/1"]);

    assert!(matches!(
        plan(&b.kv, SNAP, Some(b"nope")),
        Err(RestoreError::NotFound(_))
    ));
    // A name that only shares a prefix is not the directory.
    assert!(matches!(
        plan(&b.kv, SNAP, Some(b"a/b/c/copy")),
        Err(RestoreError::NotFound(_))
    ));
    for bad in [&b"../x"[..], b"/etc", b"a//b", b"a/./b"] {
        assert!(
            matches!(
                plan(&b.kv, SNAP, Some(bad)),
                Err(RestoreError::InvalidSubPath(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn a_missing_block_fails_only_the_files_that_need_it() {
    let b = backed();
    let plan = plan(&b.kv, SNAP, None).expect("plan");
    // The block holding z/1's chunk.
    let z1 = plan.files.iter().find(|f| f.path == b"z/1").expect("z/1");
    let lost = plan.chunk_blocks[&z1.chunks[0]];
    let needs: Vec<String> = plan
        .files
        .iter()
        .filter(|f| f.chunks.iter().any(|c| plan.chunk_blocks[c] == lost))
        .map(|f| lossy(&f.path))
        .collect();
    assert!(needs.contains(&"z/1".to_string()));
    let target = b.target("out", false);
    let mut blocks = Blocks::new(&b);
    blocks.refuse.insert(lost);
    let (report, progress) = restore(&plan, &target, &mut blocks, 64);
    let mut needs_sorted = needs.clone();
    needs_sorted.sort();
    assert_eq!(failed_paths(&report), needs_sorted);
    assert!(
        report
            .failed
            .iter()
            .all(|(_, why)| why.contains("unavailable")),
        "{:?}",
        report.failed
    );
    assert_eq!(
        blocks.calls.iter().filter(|c| **c == lost).count(),
        1,
        "a refused block is not asked for again"
    );
    assert_eq!(progress.blocks_used, plan.blocks.len() as u64);
    // Everything else is there and identical; the failed files are absent, no temp left.
    let (mut src, dst) = (tree(&b.src), tree(&target.root));
    for p in &needs {
        assert!(src.remove(p).is_some());
    }
    assert_eq!(
        src.keys().collect::<Vec<_>>(),
        dst.keys().collect::<Vec<_>>()
    );
    for (path, node) in &src {
        // Directories' mtimes hold too: set after their contents.
        assert!(*node == dst[path], "{path}");
    }
}

#[test]
fn an_existing_different_file_is_refused_and_replaced_only_with_overwrite() {
    let b = backed();
    let plan = plan(&b.kv, SNAP, None).expect("plan");
    let target = b.target("out", false);
    write(&target.root, "small.txt", b"mine, keep it");
    std::fs::create_dir_all(target.root.join("z")).expect("mkdir");
    std::fs::create_dir_all(target.root.join("a")).expect("mkdir");
    std::os::unix::fs::symlink("elsewhere", target.root.join("a/link")).expect("symlink");
    let (report, _) = restore(&plan, &target, &mut Blocks::new(&b), 64);
    assert_eq!(failed_paths(&report), ["a/link", "small.txt"]);
    assert!(
        report
            .failed
            .iter()
            .all(|(_, why)| why.contains("not overwritten"))
    );
    assert_eq!(
        std::fs::read(target.root.join("small.txt")).expect("read"),
        b"mine, keep it"
    );
    assert_eq!(
        std::fs::read_link(target.root.join("a/link")).expect("link"),
        Path::new("elsewhere")
    );
    // Everything else restored (an existing directory is merged into, not a conflict).
    assert_eq!(report.files, 9);

    let target = RestoreTarget {
        overwrite: true,
        ..target
    };
    let (report, _) = restore(&plan, &target, &mut Blocks::new(&b), 64);
    assert_eq!(report.failed, vec![]);
    // With overwrite every file is rewritten, even those whose size and mtime match (M5); the
    // identical link is kept (its target is its whole content).
    assert_eq!(
        (report.files, report.symlinks, report.skipped_existing),
        (10, 1, 0)
    );
    assert_same_tree(&b.src, &target.root);
}

fn entry(path: &[u8], kind: FileKind) -> FileEntry {
    FileEntry {
        path: path.to_vec(),
        kind,
        mode: if kind == FileKind::Dir { 0o755 } else { 0o644 },
        mtime_ns: T0,
        ctime_ns: T0,
        inode: 1,
        size: 0,
        chunks: Vec::new(),
        target: Vec::new(),
        ..FileEntry::default()
    }
}

fn link(path: &[u8], to: &Path) -> FileEntry {
    FileEntry {
        target: to.as_os_str().as_bytes().to_vec(),
        ..entry(path, FileKind::Symlink)
    }
}

/// A tampered catalog: its entries as given.
fn catalog_of(entries: &[FileEntry]) -> MemStore {
    let kv = MemStore::new();
    let mut batch = Batch::new();
    for e in entries {
        put_file(&mut batch, SNAP, e);
    }
    kv.write(batch).expect("write");
    kv
}

fn no_blocks(id: BlockId) -> Result<Arc<Vec<u8>>, BlockError> {
    panic!("no block should be asked for ({id})")
}

fn restore_unchecked(entries: &[FileEntry], root: &Path) -> RestoreReport {
    let kv = catalog_of(entries);
    let plan = plan(&kv, SNAP, None).expect("plan");
    let target = RestoreTarget::new(root.to_path_buf(), true);
    restore_files(
        &plan,
        &target,
        &mut no_blocks,
        4,
        &RestoreCounters::default(),
    )
    .expect("target usable")
}

#[test]
fn paths_that_leave_the_target_are_refused_and_nothing_is_written_outside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("one/two/root");
    let absolute = dir.path().join("abs-x");
    let entries = [
        entry(b"", FileKind::Dir),
        entry(b"a", FileKind::Dir),
        entry(b"ok", FileKind::File),
        entry(b"../x", FileKind::File),
        entry(b"../../y", FileKind::Dir),
        entry(b"a/../../x", FileKind::File),
        entry(absolute.as_os_str().as_bytes(), FileKind::File),
        entry(b"a//b", FileKind::File),
        entry(b"a/./b", FileKind::File),
        entry(b"a/", FileKind::File),
        entry(b"nul\0x", FileKind::File),
        link(b"../l", Path::new("/")),
    ];
    let report = restore_unchecked(&entries, &root);
    let mut want: Vec<String> = entries[3..].iter().map(|e| lossy(&e.path)).collect();
    want.sort();
    assert_eq!(failed_paths(&report), want);
    assert!(
        report
            .failed
            .iter()
            .all(|(_, why)| why.contains("unsafe path"))
    );
    assert_eq!((report.files, report.dirs), (1, 2));
    // Only the target's own tree exists under the temp dir.
    let all = tree(dir.path());
    let paths: Vec<&str> = all.keys().map(|s| s.as_str()).collect();
    assert_eq!(
        paths,
        [
            "",
            "one",
            "one/two",
            "one/two/root",
            "one/two/root/a",
            "one/two/root/ok"
        ]
    );
}

#[test]
fn a_symlink_never_redirects_a_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    // A link this run restores, then entries through it; a link already on disk where the
    // catalog has a directory.
    std::fs::create_dir_all(&root).expect("mkdir");
    std::os::unix::fs::symlink(&outside, root.join("c")).expect("symlink");
    // A stale temporary name that is a link to outside (a killed run's, or planted).
    std::os::unix::fs::symlink(outside.join("planted"), root.join(os(&temp_name(b"f"))))
        .expect("symlink");
    let entries = [
        entry(b"", FileKind::Dir),
        entry(b"f", FileKind::File),
        link(b"a", &outside),
        entry(b"a/evil", FileKind::File),
        entry(b"a/d", FileKind::Dir),
        link(b"a/l", Path::new("x")),
        link(b"b", Path::new(".")),
        entry(b"b/evil", FileKind::File),
        entry(b"c", FileKind::Dir),
        entry(b"c/evil", FileKind::File),
        entry(b"c/d/evil", FileKind::File),
    ];
    let report = restore_unchecked(&entries, &root);
    assert_eq!(
        failed_paths(&report),
        ["a/d", "a/evil", "a/l", "b/evil", "c", "c/d/evil", "c/evil"]
    );
    assert_eq!((report.symlinks, report.files), (2, 1));
    assert!(root.join("f").is_file());
    assert_eq!(
        std::fs::read_dir(&outside).expect("readdir").count(),
        0,
        "nothing written through a link"
    );
    assert!(!root.join("evil").exists());
    // The links are restored as stored; a directory entry never replaces what is there.
    assert_eq!(std::fs::read_link(root.join("a")).expect("link"), outside);
    assert_eq!(std::fs::read_link(root.join("c")).expect("link"), outside);
}

#[test]
fn a_second_run_rewrites_only_what_is_missing() {
    let b = backed();
    let plan = plan(&b.kv, SNAP, None).expect("plan");
    let target = b.target("out", false);
    let (first, _) = restore(&plan, &target, &mut Blocks::new(&b), 64);
    assert_eq!(first.failed, vec![]);
    let inode = |rel: &str| {
        std::fs::symlink_metadata(target.root.join(rel))
            .expect("stat")
            .ino()
    };
    let before: Vec<u64> = ["big.bin", "a/text.log", "small.txt", "a/link"]
        .iter()
        .map(|p| inode(p))
        .collect();
    // A killed run: one file missing, a stale temporary file beside where it goes.
    std::fs::remove_file(target.root.join("z/1")).expect("rm");
    let stale = target.root.join("z").join(os(&temp_name(b"1")));
    std::fs::write(&stale, b"half written").expect("stale");
    let mut blocks = Blocks::new(&b);
    let (again, progress) = restore(&plan, &target, &mut blocks, 64);
    assert_eq!(again.failed, vec![]);
    assert_eq!(counts(&again), (1, 6, 0, 10), "9 files + 1 link skipped");
    assert_eq!(again.bytes, 70_000);
    assert_eq!(progress.bytes_written, 70_000);
    let z1 = plan.files.iter().find(|f| f.path == b"z/1").expect("z/1");
    let mut wanted: Vec<BlockId> = z1.chunks.iter().map(|c| plan.chunk_blocks[c]).collect();
    wanted.dedup();
    assert_eq!(blocks.calls, wanted, "only z/1's blocks fetched");
    let after: Vec<u64> = ["big.bin", "a/text.log", "small.txt", "a/link"]
        .iter()
        .map(|p| inode(p))
        .collect();
    assert_eq!(before, after, "the others were not rewritten");
    assert!(!stale.exists());
    assert_same_tree(&b.src, &target.root);

    // The same with the plan pruned first: only z/1's blocks are left to prefetch.
    std::fs::remove_file(target.root.join("z/1")).expect("rm");
    let mut pruned = plan.clone();
    assert_eq!(pruned.skip_complete(&target), 9);
    assert_eq!(pruned.blocks, wanted);
    let mut blocks = Blocks::new(&b);
    let (again, progress) = restore(&pruned, &target, &mut blocks, 64);
    assert_eq!(again.failed, vec![]);
    assert_eq!(counts(&again), (1, 6, 0, 10));
    assert_eq!(blocks.calls, wanted);
    assert_eq!(progress.blocks_used, wanted.len() as u64);
    assert!(blocks.given.iter().all(|w| w.strong_count() == 0));
    assert_same_tree(&b.src, &target.root);

    // A file found complete, then lost before the run: written after all, its blocks asked
    // for on demand.
    let mut pruned = plan.clone();
    assert_eq!(pruned.skip_complete(&target), 10);
    assert_eq!(pruned.blocks, vec![]);
    std::fs::remove_file(target.root.join("big.bin")).expect("rm");
    let (again, _) = restore(&pruned, &target, &mut Blocks::new(&b), 64);
    assert_eq!(again.failed, vec![]);
    assert_eq!(counts(&again), (1, 6, 0, 10));
    assert_same_tree(&b.src, &target.root);
}

#[test]
fn a_resumed_run_writes_into_a_directory_the_first_run_made_read_only() {
    let b = backed_with(|src| {
        write(src, "ro/f", b"inside a read-only directory");
        chmod(&src.join("ro"), 0o555);
        set_mtime(&src.join("ro"), T0);
    });
    let plan = plan(&b.kv, SNAP, None).expect("plan");
    let target = b.target("out", false);
    let (first, _) = restore(&plan, &target, &mut Blocks::new(&b), 8);
    assert_eq!(first.failed, vec![]);
    assert_same_tree(&b.src, &target.root);
    let ro = target.root.join("ro");
    // Root could write anyway: watch the mode instead, when the file's block is asked for.
    chmod(&ro, 0o755);
    std::fs::remove_file(ro.join("f")).expect("rm");
    chmod(&ro, 0o555);
    set_mtime(&ro, T0);
    let mut blocks = Blocks::new(&b);
    let mut modes = Vec::new();
    let counters = RestoreCounters::default();
    let again = restore_files(
        &plan,
        &target,
        &mut |id| {
            modes.push(std::fs::metadata(&ro).expect("stat").mode() & 0o7777);
            blocks.get(id)
        },
        8,
        &counters,
    )
    .expect("target usable");
    assert_eq!(again.failed, vec![]);
    assert_eq!(again.files, 1);
    assert_eq!(modes, [0o755], "owner-writable while the file is written");
    assert_same_tree(&b.src, &target.root);
}

#[test]
fn a_one_block_cache_still_restores_everything() {
    let b = backed();
    let plan = plan(&b.kv, SNAP, None).expect("plan");
    let target = b.target("out", false);
    let mut blocks = Blocks::new(&b);
    let counters = RestoreCounters::default();
    // Tiny flush batches too: files renamed a few at a time along the way.
    let mut most_staged = 0;
    let report = restore_batched(
        &plan,
        &target,
        &mut |id| {
            let staged = tree(&target.root)
                .keys()
                .filter(|p| {
                    p.rsplit('/')
                        .next()
                        .is_some_and(|n| n.starts_with(TEMP_PREFIX))
                })
                .count();
            most_staged = most_staged.max(staged);
            blocks.get(id)
        },
        1,
        &counters,
        (2, 100_000),
    )
    .expect("target usable");
    // At most a full batch and the file being written wait under temporary names.
    assert!(
        (1..=3).contains(&most_staged),
        "{most_staged} staged at once"
    );
    let progress = counters.snapshot();
    assert_eq!(report.failed, vec![]);
    assert_eq!((report.files, report.bytes), (10, plan.bytes()));
    assert!(
        blocks.calls.len() > plan.blocks.len(),
        "evicted blocks are asked for again ({} calls for {} blocks)",
        blocks.calls.len(),
        plan.blocks.len()
    );
    assert!(blocks.max_held <= 1, "the cache held {}", blocks.max_held);
    assert_eq!(progress.blocks_used, plan.blocks.len() as u64);
    assert_same_tree(&b.src, &target.root);
}

#[test]
fn a_file_whose_chunks_do_not_add_up_to_its_size_fails() {
    let b = backed();
    let mut plan = plan(&b.kv, SNAP, None).expect("plan");
    let f = plan
        .files
        .iter_mut()
        .find(|f| f.path == b"small.txt")
        .expect("small.txt");
    f.size += 1;
    let target = b.target("out", false);
    let (report, _) = restore(&plan, &target, &mut Blocks::new(&b), 64);
    assert_eq!(failed_paths(&report), ["small.txt"]);
    assert!(report.failed[0].1.contains("assembled 13 bytes"));
    assert!(!target.root.join("small.txt").exists());
    assert_eq!(report.files, 9);
}

#[test]
fn a_chunk_unknown_to_the_catalog_names_its_file() {
    let kv = catalog_of(&[FileEntry {
        size: 3,
        chunks: vec![ChunkId([7; 32])],
        ..entry(b"docs/x", FileKind::File)
    }]);
    match plan(&kv, SNAP, None) {
        Err(RestoreError::UnknownChunk { path }) => assert_eq!(path, "docs/x"),
        other => panic!("{other:?}"),
    }
    // A chunk whose block record is missing.
    let mut batch = Batch::new();
    put_chunk(&mut batch, &ChunkId([7; 32]), &BlockId([9; 32]));
    kv.write(batch).expect("write");
    match plan(&kv, SNAP, None) {
        Err(RestoreError::UnknownBlock { path }) => assert_eq!(path, "docs/x"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_directory_swapped_for_a_symlink_mid_restore_redirects_nothing() {
    let b = backed_with(|src| {
        write(src, "a/1", b"");
        write(src, "a/2", b"written after the swap");
        write(src, "a/3", b"created after the swap");
    });
    let plan = plan(&b.kv, SNAP, None).expect("plan");
    let target = b.target("out", false);
    let outside = b.dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let moved = b.dir.path().join("moved");
    let mut blocks = Blocks::new(&b);
    let mut swapped = false;
    let report = restore_batched(
        &plan,
        &target,
        &mut |id| {
            // a/2's block: `a/` was made and a/1 written (and renamed: batches of one).
            if !swapped {
                assert!(target.root.join("a/1").is_file(), "a/1 written first");
                std::fs::rename(target.root.join("a"), &moved).expect("move a");
                std::os::unix::fs::symlink(&outside, target.root.join("a")).expect("symlink");
                swapped = true;
            }
            blocks.get(id)
        },
        8,
        &RestoreCounters::default(),
        (1, 1 << 20),
    )
    .expect("target usable");
    assert!(swapped);
    let written: Vec<_> = std::fs::read_dir(&outside)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(written, Vec::<std::ffi::OsString>::new(), "nothing outside");
    // The file landed in the directory the writer held, wherever it moved.
    assert_eq!(
        std::fs::read(moved.join("2")).expect("a/2 in the moved dir"),
        b"written after the swap"
    );
    assert_eq!(
        std::fs::read(moved.join("3")).expect("a/3 in the moved dir"),
        b"created after the swap"
    );
    assert!(moved.join("1").is_file());
    assert_eq!(report.files, 3, "{:?}", report.failed);
    assert_eq!(
        std::fs::read_link(target.root.join("a")).expect("link"),
        outside
    );
}
