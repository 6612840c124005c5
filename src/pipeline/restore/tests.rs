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
use crate::pipeline::tests::random_bytes;
use crate::pipeline::tests::{MemLookup, blocks, files, keys, mixed_tree, run, settings, write};
use crate::store::catalog::{BlockEntry, put_block, put_chunk, put_file};
use crate::store::{Batch, MemStore};

const SNAP: SnapshotId = SnapshotId(1);

/// The plan's entries, in the order a restore takes them.
fn listed(plan: &RestorePlan) -> Vec<FileEntry> {
    plan.entries().collect::<Result<_, _>>().expect("entries")
}

/// The block holding `chunk`, as the plan finds it.
fn block_of(plan: &RestorePlan, chunk: &ChunkId) -> BlockId {
    let file = FileEntry {
        kind: FileKind::File,
        chunks: vec![*chunk],
        ..FileEntry::default()
    };
    plan.blocks_of(&file).expect("lookup")[chunk]
}
/// 2020-09-13T12:26:40.123456789Z and a few more, with nanoseconds.
const T0: i64 = 1_600_000_000_123_456_789;

/// A source tree backed up into an outbox, and its catalog.
struct Backed {
    dir: tempfile::TempDir,
    src: PathBuf,
    outbox: PathBuf,
    kv: Arc<MemStore>,
    blocks: HashMap<BlockId, BlockEntry>,
}

impl Backed {
    fn target(&self, name: &str, overwrite: bool) -> RestoreTarget {
        RestoreTarget::new(self.dir.path().join(name), overwrite)
    }

    /// A target restored with root's privileges (owners and devices).
    fn root_target(&self, name: &str) -> RestoreTarget {
        RestoreTarget {
            privileges: Privileges {
                root: true,
                ..Privileges::detect()
            },
            ..self.target(name, false)
        }
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
    let kv = Arc::new(MemStore::new());
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

/// How many temporary names are under `root` now: names only (the writer threads rename
/// files while this looks, so nothing is opened or stat'ed but directories).
fn staged_names(root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => staged_names(&e.path()),
            _ => usize::from(e.file_name().as_bytes().starts_with(TEMP_PREFIX.as_bytes())),
        })
        .sum()
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
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
    // Parents before children, every block once, in order of first need.
    let files = listed(&plan);
    for (i, e) in files.iter().enumerate() {
        if let Some(slash) = e.path.iter().rposition(|c| *c == b'/') {
            let parent = &e.path[..slash];
            assert!(files[..i].iter().any(|p| p.path == parent));
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
            files_done: plan.entries_total(),
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
    let plan_dir = plan(b.kv.clone(), SNAP, Some(b"a/b/")).expect("plan");
    let paths: Vec<String> = listed(&plan_dir).iter().map(|f| lossy(&f.path)).collect();
    assert_eq!(
        paths,
        [
            "",
            "a",
            "a/b",
            "a/b/also-empty",
            "a/b/small-dup.txt",
            "a/b/c",
            "a/b/c/copy-of-big.bin"
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
    let plan_file = plan(b.kv.clone(), SNAP, Some(b"z/1")).expect("plan");
    let paths: Vec<String> = listed(&plan_file).iter().map(|f| lossy(&f.path)).collect();
    assert_eq!(paths, ["", "z", "z/1"]);
    let target = b.target("file", false);
    let (report, _) = restore(&plan_file, &target, &mut Blocks::new(&b), 8);
    assert_eq!(counts(&report), (1, 2, 0, 0));
    assert_eq!(tree(&target.root)["z/1"], tree(&b.src)["z/1"]);

    assert!(matches!(
        plan(b.kv.clone(), SNAP, Some(b"nope")),
        Err(RestoreError::NotFound(_))
    ));
    // A name that only shares a prefix is not the directory.
    assert!(matches!(
        plan(b.kv.clone(), SNAP, Some(b"a/b/c/copy")),
        Err(RestoreError::NotFound(_))
    ));
    for bad in [&b"../x"[..], b"/etc", b"a//b", b"a/./b"] {
        assert!(
            matches!(
                plan(b.kv.clone(), SNAP, Some(bad)),
                Err(RestoreError::InvalidSubPath(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn a_missing_block_fails_only_the_files_that_need_it() {
    let b = backed();
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
    // The block holding z/1's chunk.
    let files = listed(&plan);
    let z1 = files.iter().find(|f| f.path == b"z/1").expect("z/1");
    let lost = block_of(&plan, &z1.chunks[0]);
    let needs: Vec<String> = files
        .iter()
        .filter(|f| f.chunks.iter().any(|c| block_of(&plan, c) == lost))
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
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
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
fn catalog_of(entries: &[FileEntry]) -> Arc<MemStore> {
    let kv = Arc::new(MemStore::new());
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
    let plan = plan(kv.clone(), SNAP, None).expect("plan");
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
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
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
    let files = listed(&plan);
    let z1 = files.iter().find(|f| f.path == b"z/1").expect("z/1");
    let mut wanted: Vec<BlockId> = z1.chunks.iter().map(|c| block_of(&plan, c)).collect();
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
    assert_eq!(pruned.skip_complete(&target).expect("catalog"), 9);
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
    assert_eq!(pruned.skip_complete(&target).expect("catalog"), 10);
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
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
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
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
    let target = b.target("out", false);
    let mut blocks = Blocks::new(&b);
    let counters = RestoreCounters::default();
    // Tiny flush batches too: files renamed a few at a time along the way.
    let mut most_staged = 0;
    let report = restore_batched(
        &plan,
        &target,
        &mut |id| {
            most_staged = most_staged.max(staged_names(&target.root));
            blocks.get(id)
        },
        1,
        &counters,
        (2, 100_000),
    )
    .expect("target usable");
    // At most a full batch and the files with the writer threads wait under temporary names
    // (how many are seen at a block request depends on the threads' timing: no lower bound).
    let in_flight = (writer_threads() * (QUEUE_PER_WRITER + 1) + 1) * GROUP_FILES;
    assert!(most_staged <= 2 + in_flight, "{most_staged} staged at once");
    let progress = counters.snapshot();
    assert_eq!(report.failed, vec![]);
    assert_eq!((report.files, report.bytes), (10, plan.bytes()));
    assert_eq!(
        blocks.calls, plan.blocks,
        "each block asked for once: evicted blocks with uses left are read back from the spill"
    );
    // The cache's one, and what the files queued for the writers keep alive.
    assert!(
        blocks.max_held <= 1 + FLIGHT_BLOCKS,
        "{} blocks held",
        blocks.max_held
    );
    assert_eq!(progress.blocks_used, plan.blocks.len() as u64);
    assert_same_tree(&b.src, &target.root);
}

#[test]
fn a_file_whose_chunks_do_not_add_up_to_its_size_fails() {
    let b = backed();
    let mut f = catalog::file(&*b.kv, SNAP, b"small.txt")
        .expect("catalog")
        .expect("small.txt");
    f.size += 1;
    let mut batch = Batch::new();
    put_file(&mut batch, SNAP, &f);
    b.kv.write(batch).expect("write");
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
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
    match plan(kv.clone(), SNAP, None) {
        Err(RestoreError::UnknownChunk { path }) => assert_eq!(path, "docs/x"),
        other => panic!("{other:?}"),
    }
    // A chunk whose block record is missing.
    let mut batch = Batch::new();
    put_chunk(&mut batch, &ChunkId([7; 32]), &BlockId([9; 32]));
    kv.write(batch).expect("write");
    match plan(kv.clone(), SNAP, None) {
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
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
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
            // a/2's block: `a/` was made and is held (a/1, empty, is with a writer thread).
            if !swapped {
                assert!(target.root.join("a").is_dir(), "a/ made first");
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

const MIB: u64 = 1 << 20;

/// An entry as a format-2 walker records it: the backed-up entry (chunks, mode, mtime) with
/// owner, link identity, device number, extended attributes and holes from `lstat` and friends.
/// (Test-only: the walker that fills these is being changed in parallel.)
fn described(src: &Path, base: FileEntry) -> FileEntry {
    let path = src.join(os(&base.path));
    let meta = std::fs::symlink_metadata(&path).expect("lstat");
    let name = |id: u32| {
        if id == 0 {
            b"root".to_vec()
        } else {
            Vec::new()
        }
    };
    let kind = match meta.mode() & libc::S_IFMT {
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFCHR => FileKind::CharDevice,
        libc::S_IFBLK => FileKind::BlockDevice,
        _ => base.kind,
    };
    FileEntry {
        kind,
        mode: meta.mode() & 0o7777,
        mtime_ns: mtime_ns(&meta),
        inode: meta.ino(),
        owner: Some(catalog::Owner {
            uid: meta.uid(),
            gid: meta.gid(),
            user: name(meta.uid()),
            group: name(meta.gid()),
        }),
        dev: meta.dev(),
        links: meta.nlink(),
        rdev: meta.rdev(),
        xattrs: xattrs_of(&path),
        holes: if kind == FileKind::File {
            holes_of(&path, meta.len())
        } else {
            Vec::new()
        },
        ..base
    }
}

fn xattrs_of(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut names[..]).expect("listxattr");
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = names[..n]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| {
            let mut value = vec![0u8; 4096];
            let len = rustix::fs::lgetxattr(path, name, &mut value[..]).expect("getxattr");
            (name.to_vec(), value[..len].to_vec())
        })
        .collect();
    out.sort();
    out
}

/// `(offset, len)` of every hole, by SEEK_DATA/SEEK_HOLE.
fn holes_of(path: &Path, size: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{SeekFrom, seek};
    let f = File::open(path).expect("open");
    let mut holes = Vec::new();
    let mut at = 0;
    while at < size {
        let data = match seek(&f, SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        if data > at {
            holes.push((at, data - at));
        }
        if data >= size {
            break;
        }
        at = seek(&f, SeekFrom::Hole(data)).expect("SEEK_HOLE");
    }
    holes
}

/// A POSIX ACL as `system.posix_acl_access` holds it: owner rw, user 1234 rw, group r, mask
/// rw, other r.
fn acl_bytes() -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 6, 1234),
        (0x04, 4, u32::MAX),
        (0x10, 6, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("chown");
}

/// Every kind the writer restores, with owners (uid/gid 1234:5678, which this host has no name
/// for), modes 0000 and 4755, three names of one file, a 64 MiB sparse file, a user xattr and an
/// ACL, a FIFO and a character device. Regular files, directories and links go through the
/// backup pipeline; the rest is described from the source tree (the walker skips them today).
fn every_kind(src: &Path) {
    write(src, "dir/owned", b"owned by 1234:5678");
    chmod(&src.join("dir"), 0o750);
    write(src, "zero", b"mode 0000");
    write(src, "suid", b"#!/bin/sh\necho setuid\n");
    write(src, "named", b"recorded as root by name");
    write(src, "links/one", b"one file, three names");
    std::fs::hard_link(src.join("links/one"), src.join("links/two")).expect("link");
    std::fs::hard_link(src.join("links/one"), src.join("three")).expect("link");
    write(src, "acl", b"with an ACL and a user xattr");
    let f = File::options()
        .write(true)
        .create_new(true)
        .open(src.join("sparse"))
        .expect("create");
    // 64 MiB holding 2 MiB: one at the start, one in the middle, a trailing hole.
    f.write_all_at(&random_bytes(9, MIB as usize), 0)
        .expect("write");
    f.write_all_at(&random_bytes(10, MIB as usize), 32 * MIB)
        .expect("write");
    f.set_len(64 * MIB).expect("set_len");
    drop(f);
    std::os::unix::fs::symlink("dir/owned", src.join("link")).expect("symlink");
    let acl = src.join("acl");
    rustix::fs::setxattr(
        &acl,
        "user.bitdust",
        b"a value",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("user xattr");
    rustix::fs::setxattr(
        &acl,
        "system.posix_acl_access",
        &acl_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .expect("ACL");
    rustix::fs::setxattr(
        src.join("dir"),
        "user.dir",
        b"on a directory",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("dir xattr");
    for p in ["dir/owned", "dir", "suid", "link"] {
        chown(&src.join(p), 1234, 5678);
    }
    chmod(&src.join("zero"), 0o000);
    chmod(&src.join("suid"), 0o4755);
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        src.join("fifo"),
        rustix::fs::Mode::from_raw_mode(0o640),
    )
    .expect("mkfifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .expect("mknod c 1 3");
    chown(&src.join("null"), 1234, 5678);
    let mut n = 0;
    for rel in [
        "dir/owned",
        "zero",
        "suid",
        "named",
        "links/one",
        "acl",
        "sparse",
        "link",
        "fifo",
        "null",
        "links",
        "dir",
    ] {
        n += 1;
        let t = T0 + n * 1_000_000_007;
        let times = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: t / 1_000_000_000,
                tv_nsec: t % 1_000_000_000,
            },
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            src.join(rel),
            &times,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .expect("utimensat");
    }
}

/// The long path's components: 20 × 250 bytes, over PATH_MAX (4096).
fn long_parts() -> Vec<Vec<u8>> {
    (0..20u8).map(|i| vec![b'a' + i; 250]).collect()
}

/// Backs up [`every_kind`] and rewrites the catalog's entries as format 2 records them, plus a
/// FIFO, a device, an entry recorded under the name `root` with other numbers, and a file at a
/// path over 4096 bytes.
fn backed_every_kind() -> Backed {
    let b = backed_with(every_kind);
    let mut entries: Vec<FileEntry> = catalog::files(&*b.kv, SNAP)
        .map(|e| e.expect("entry"))
        .map(|e| described(&b.src, e))
        .collect();
    for p in ["fifo", "null"] {
        entries.push(described(
            &b.src,
            FileEntry {
                path: p.as_bytes().to_vec(),
                ..FileEntry::default()
            },
        ));
    }
    for e in &mut entries {
        if e.path == b"named" {
            // Another host's numbers for root: the name wins.
            e.owner = Some(catalog::Owner {
                uid: 4321,
                gid: 4321,
                user: b"root".to_vec(),
                group: b"root".to_vec(),
            });
        }
    }
    let owned = entries
        .iter()
        .find(|e| e.path == b"dir/owned")
        .expect("dir/owned")
        .clone();
    entries.push(FileEntry {
        path: long_parts().join(&b'/'),
        ..owned
    });
    let mut batch = Batch::new();
    for e in &entries {
        put_file(&mut batch, SNAP, e);
    }
    b.kv.write(batch).expect("write");
    b
}

/// What one restored entry is, attribute by attribute.
#[derive(Debug, PartialEq, Eq)]
struct Attributes {
    file_type: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    rdev: u64,
    size: u64,
    nlink: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn attributes(path: &Path) -> Attributes {
    let meta = std::fs::symlink_metadata(path).expect("lstat");
    Attributes {
        file_type: meta.mode() & libc::S_IFMT,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: mtime_ns(&meta),
        rdev: meta.rdev(),
        size: meta.len(),
        // A directory's count follows its subdirectories (the long path's is extra here).
        nlink: if meta.is_dir() { 0 } else { meta.nlink() },
        xattrs: xattrs_of(path),
    }
}

/// Reads the file at the long path through a chain of directory descriptors.
fn read_long(root: &Path) -> Vec<u8> {
    let parts = long_parts();
    let mut dir = rustix::fs::open(
        root,
        rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .expect("open root");
    let (last, parents) = parts.split_last().expect("parts");
    for p in parents {
        dir = open_dir(dir.as_fd(), p).expect("a component of the long path");
    }
    let fd = rustix::fs::openat(
        &dir,
        last.as_slice(),
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .expect("open the long path's file");
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut File::from(fd), &mut out).expect("read");
    out
}

#[test]
fn every_kind_is_restored_as_root_attribute_by_attribute() {
    let b = backed_every_kind();
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
    let target = b.root_target("out");
    let (report, _) = restore(&plan, &target, &mut Blocks::new(&b), 64);
    assert_eq!(report.failed, vec![]);
    assert_eq!(report.not_restored, vec![], "root restores everything here");
    assert_eq!(report.hardlinks, 2, "two later names linked");
    assert_eq!(report.specials, 2, "the FIFO and the device");
    let src = tree_paths(&b.src);
    assert_eq!(src, tree_paths(&target.root));
    for rel in &src {
        let (a, r) = (b.src.join(rel), target.root.join(rel));
        let (want, got) = (attributes(&a), attributes(&r));
        if rel == "named" {
            // Recorded as root (by name) with numbers this host does not use for root.
            assert_eq!((got.uid, got.gid), (0, 0), "{rel}: the name wins");
        }
        assert_eq!(want, got, "{rel}");
        if want.file_type == libc::S_IFREG {
            assert!(std::fs::read(&a).expect("read") == std::fs::read(&r).expect("read"));
        }
    }
    let got = attributes(&target.root.join("dir/owned"));
    assert_eq!((got.uid, got.gid), (1234, 5678));
    assert_eq!(attributes(&target.root.join("suid")).mode, 0o4755);
    let ino = |p: &str| {
        std::fs::symlink_metadata(target.root.join(p))
            .expect("lstat")
            .ino()
    };
    assert_eq!(ino("links/one"), ino("links/two"));
    assert_eq!(ino("links/one"), ino("three"));
    let sparse = std::fs::metadata(target.root.join("sparse")).expect("stat");
    assert_eq!(sparse.len(), 64 * MIB);
    assert!(
        sparse.blocks() * 512 <= 3 * MIB,
        "{} bytes allocated for 2 MiB of data",
        sparse.blocks() * 512
    );
    assert_eq!(
        read_long(&target.root),
        b"owned by 1234:5678",
        "a path over PATH_MAX"
    );
}

/// Relative paths of everything under `root`, sorted, walked by lstat (FIFOs and devices are
/// listed, never opened).
fn tree_paths(root: &Path) -> Vec<String> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>) {
        let path = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        out.push(rel.to_string());
        if std::fs::symlink_metadata(&path).expect("lstat").is_dir() {
            for e in std::fs::read_dir(&path).expect("readdir") {
                let name = e.expect("entry").file_name().into_string().expect("utf-8");
                if name.len() == 250 {
                    continue; // the long path: checked by descriptors
                }
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                walk(root, &child, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, "", &mut out);
    out.sort();
    out
}

/// What the report says was not restored: kind and count.
fn lost_kinds(report: &RestoreReport) -> Vec<(Unrestorable, u64)> {
    report
        .not_restored
        .iter()
        .map(|n| (n.what, n.count))
        .collect()
}

#[test]
fn as_an_ordinary_user_owners_are_not_applied_setuid_is_dropped_and_devices_are_said_once() {
    let b = backed_every_kind();
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
    let me = Privileges::detect();
    let target = RestoreTarget {
        privileges: Privileges { root: false, ..me },
        ..b.target("out", false)
    };
    let (report, _) = restore(&plan, &target, &mut Blocks::new(&b), 64);
    assert_eq!(report.failed, vec![]);
    let lost = lost_kinds(&report);
    // Owned by 1234:5678 or recorded as 4321 (named root): dir, dir/owned, suid, link, null's
    // owner is never reached (not made), named, the long path.
    assert_eq!(
        lost,
        [
            (Unrestorable::Ownership, 6),
            (Unrestorable::SetIdBits, 1),
            (Unrestorable::CharDevices, 1),
        ],
        "{:?}",
        report.not_restored
    );
    assert!(report.not_restored.iter().all(|n| !n.why.is_empty()));
    assert_eq!(report.specials, 1, "the FIFO only");
    assert!(!target.root.join("null").exists(), "no device made");
    for rel in ["dir", "dir/owned", "suid", "link", "named"] {
        let got = attributes(&target.root.join(rel));
        assert_eq!((got.uid, got.gid), (me.uid, me.gid), "{rel}");
    }
    assert_eq!(attributes(&target.root.join("suid")).mode, 0o755);
    assert_eq!(
        attributes(&target.root.join("fifo")).file_type,
        libc::S_IFIFO
    );
    assert_eq!(attributes(&target.root.join("dir")).mode, 0o750);
}

/// Runs `f` on a thread of its own whose credentials are the unprivileged `nobody` (65534):
/// raw `setgroups`/`setresgid`/`setresuid` change the calling thread only (glibc's wrappers
/// would change every thread of the test process). Threads it starts inherit them.
fn as_nobody<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    const NOBODY: libc::c_long = 65534;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: plain syscalls on this thread's credentials, no memory passed but a
                // null list of zero groups.
                unsafe {
                    assert_eq!(
                        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                        0
                    );
                    assert_eq!(
                        libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY),
                        0
                    );
                    assert_eq!(
                        libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY),
                        0
                    );
                }
                f()
            })
            .join()
            .expect("the nobody thread")
    })
}

#[test]
fn a_real_ordinary_user_gets_everything_but_owners_setuid_and_devices() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to become an ordinary user");
        return;
    }
    let b = backed_every_kind();
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
    // The blocks, decoded as root (the fragments are root's); the restore runs as nobody.
    let mut blocks = Blocks::new(&b);
    let decoded: HashMap<BlockId, Arc<Vec<u8>>> = plan
        .blocks
        .iter()
        .map(|id| (*id, blocks.get(*id).expect("block")))
        .collect();
    // A target nobody may write: its own directory under a path it may cross.
    let home = b.dir.path().join("home");
    std::fs::create_dir(&home).expect("mkdir");
    rustix::fs::chown(
        &home,
        Some(rustix::fs::Uid::from_raw(65534)),
        Some(rustix::fs::Gid::from_raw(65534)),
    )
    .expect("chown");
    chmod(b.dir.path(), 0o755);
    let root = home.join("out");
    let (report, privileges) = as_nobody(|| {
        let target = RestoreTarget::new(root.clone(), false);
        let mut get = |id: BlockId| decoded.get(&id).cloned().ok_or(BlockError::TooFewFragments);
        let counters = RestoreCounters::default();
        let report = restore_files(&plan, &target, &mut get, 64, &counters).expect("target usable");
        (report, target.privileges)
    });
    assert!(!privileges.root, "{privileges:?}");
    assert_eq!((privileges.uid, privileges.gid), (65534, 65534));
    assert_eq!(report.failed, vec![]);
    let lost = lost_kinds(&report);
    // Every entry made that was not nobody's (root's too) is said; the device is not made. The
    // ACL and the user attribute are the owner's to set: nothing else is lost.
    // (A hard link's later names share the first's inode: linked, not given an owner.)
    let mut inodes = std::collections::HashSet::new();
    let not_nobodys = listed(&plan)
        .iter()
        .filter(|e| !matches!(e.kind, FileKind::CharDevice | FileKind::BlockDevice))
        .filter(|e| e.link_identity().is_none_or(|id| inodes.insert(id)))
        .filter(|e| {
            e.owner
                .as_ref()
                .is_some_and(|o| (o.uid, o.gid) != (65534, 65534))
        })
        .count() as u64;
    assert!(not_nobodys > 6, "root's entries and the 6 others");
    assert_eq!(
        lost,
        [
            (Unrestorable::Ownership, not_nobodys),
            (Unrestorable::SetIdBits, 1),
            (Unrestorable::CharDevices, 1),
        ],
        "{:?}",
        report.not_restored
    );
    assert!(!root.join("null").exists(), "no device made");
    for rel in ["dir", "dir/owned", "suid", "acl", "fifo"] {
        let got = attributes(&root.join(rel));
        assert_eq!((got.uid, got.gid), (65534, 65534), "{rel}");
    }
    assert_eq!(attributes(&root.join("suid")).mode, 0o755, "setuid dropped");
    assert_eq!(
        attributes(&root.join("acl")).xattrs,
        attributes(&b.src.join("acl")).xattrs,
        "the ACL and the user attribute"
    );
    assert_eq!(
        std::fs::read(root.join("acl")).expect("read"),
        std::fs::read(b.src.join("acl")).expect("read")
    );
    assert_eq!(
        read_long(&root),
        b"owned by 1234:5678",
        "a path over PATH_MAX"
    );
}

#[test]
fn overwrite_rewrites_a_tampered_file_with_the_same_size_and_mtime() {
    let b = backed();
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
    let target = b.target("out", false);
    let (first, _) = restore(&plan, &target, &mut Blocks::new(&b), 64);
    assert_eq!(first.failed, vec![]);
    // Tampering that keeps size and mtime (`touch -r`).
    let small = target.root.join("small.txt");
    let mtime = mtime_ns(&std::fs::symlink_metadata(&small).expect("stat"));
    std::fs::write(&small, b"HELLO, BACKUP").expect("tamper");
    chmod(&small, 0o640);
    set_mtime(&small, mtime);
    // A resumed run (no overwrite) trusts size and mtime: kept, and not even planned.
    let mut pruned = plan.clone();
    assert_eq!(pruned.skip_complete(&target).expect("catalog"), 10);
    let (again, _) = restore(&pruned, &target, &mut Blocks::new(&b), 64);
    assert_eq!((again.files, again.skipped_existing), (0, 11));
    assert_eq!(std::fs::read(&small).expect("read"), b"HELLO, BACKUP");
    // With overwrite nothing is trusted: every file rewritten, the content is the backup's.
    let target = b.target("out", true);
    let mut pruned = plan.clone();
    assert_eq!(
        pruned.skip_complete(&target).expect("catalog"),
        0,
        "nothing skipped with overwrite"
    );
    assert_eq!(pruned.blocks, plan.blocks);
    let (repair, _) = restore(&pruned, &target, &mut Blocks::new(&b), 64);
    assert_eq!(repair.failed, vec![]);
    assert_eq!(
        (repair.files, repair.skipped_existing),
        (10, 1),
        "the link kept"
    );
    assert_eq!(std::fs::read(&small).expect("read"), b"hello, backup");
    assert_same_tree(&b.src, &target.root);
}

#[test]
fn when_the_first_name_of_a_hard_link_fails_the_next_is_written_and_linked_to() {
    let b = backed_with(|src| {
        write(src, "links/one", b"one file, three names");
        std::fs::hard_link(src.join("links/one"), src.join("links/two")).expect("link");
        std::fs::hard_link(src.join("links/one"), src.join("three")).expect("link");
    });
    let entries: Vec<FileEntry> = catalog::files(&*b.kv, SNAP)
        .map(|e| described(&b.src, e.expect("entry")))
        .collect();
    let mut batch = Batch::new();
    for e in &entries {
        put_file(&mut batch, SNAP, e);
    }
    b.kv.write(batch).expect("write");
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
    let target = b.target("out", false);
    // A directory where the first name goes: that name fails.
    std::fs::create_dir_all(target.root.join("links/one")).expect("mkdir");
    let (report, _) = restore(&plan, &target, &mut Blocks::new(&b), 64);
    assert_eq!(failed_paths(&report), ["links/one"]);
    assert_eq!((report.files, report.hardlinks), (1, 1));
    let two = std::fs::symlink_metadata(target.root.join("links/two")).expect("two");
    let three = std::fs::symlink_metadata(target.root.join("three")).expect("three");
    assert_eq!((two.ino(), two.nlink()), (three.ino(), 2));
    assert_eq!(
        std::fs::read(target.root.join("three")).expect("read"),
        b"one file, three names"
    );
}

/// Writer speed on many small files (run by hand: `--ignored --nocapture`).
#[test]
#[ignore]
fn measure_writer_on_small_files() {
    let b = backed_with(|src| {
        for d in 0..40 {
            for f in 0..100 {
                let bytes = random_bytes(d * 1000 + f, 1000 + (f as usize % 7) * 500);
                write(src, &format!("d{d:02}/sub/f{f:03}"), &bytes);
            }
        }
    });
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
    let mut decoded: HashMap<BlockId, Arc<Vec<u8>>> = HashMap::new();
    let mut blocks = Blocks::new(&b);
    for id in &plan.blocks {
        decoded.insert(*id, blocks.get(*id).expect("block"));
    }
    let mut times = Vec::new();
    for run in 0..5 {
        let target = b.target(&format!("m{run}"), false);
        let start = std::time::Instant::now();
        let report = restore_files(
            &plan,
            &target,
            &mut |id| Ok(decoded[&id].clone()),
            64,
            &RestoreCounters::default(),
        )
        .expect("restore");
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(report.files, 4000);
    }
    times.sort_by(|a, b| a.partial_cmp(b).expect("number"));
    println!("MEASURE 4000 files in 80 dirs: restore_files ms {times:?}");
}

/// [`every_kind`] plus a real path over PATH_MAX and mtimes in 1969 and 2100.
fn every_kind_end_to_end(src: &Path) {
    every_kind(src);
    let mut dir = rustix::fs::open(
        src,
        rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .expect("open the source");
    let parts = long_parts();
    let (last, parents) = parts.split_last().expect("parts");
    for p in parents {
        rustix::fs::mkdirat(&dir, p.as_slice(), rustix::fs::Mode::from_raw_mode(0o755))
            .expect("mkdirat");
        dir = open_dir(dir.as_fd(), p).expect("open a component");
    }
    let fd = rustix::fs::openat(
        &dir,
        last.as_slice(),
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CREATE,
        rustix::fs::Mode::from_raw_mode(0o640),
    )
    .expect("create the long path's file");
    rustix::io::write(&fd, b"owned by 1234:5678").expect("write");
    for (rel, ns) in [
        ("1969", -86_400 * 180 * 1_000_000_000 + 123),
        ("2100", 4_102_444_800 * 1_000_000_000 + 999_999_999),
    ] {
        write(src, rel, rel.as_bytes());
        set_mtime(&src.join(rel), ns);
    }
}

/// The walker and the writer together: what the backup recorded of every kind comes back as
/// root attribute by attribute (the test above builds its entries by hand).
#[test]
fn every_kind_backed_up_by_the_walker_comes_back_attribute_by_attribute() {
    let b = backed_with(every_kind_end_to_end);
    let plan = plan(b.kv.clone(), SNAP, None).expect("plan");
    let target = b.root_target("out");
    let (report, _) = restore(&plan, &target, &mut Blocks::new(&b), 64);
    assert_eq!(report.failed, vec![]);
    assert_eq!(report.not_restored, vec![]);
    assert_eq!(report.hardlinks, 2);
    assert_eq!(report.specials, 2);
    let src = tree_paths(&b.src);
    assert_eq!(src, tree_paths(&target.root));
    for rel in &src {
        let (a, r) = (b.src.join(rel), target.root.join(rel));
        assert_eq!(attributes(&a), attributes(&r), "{rel}");
        if attributes(&a).file_type == libc::S_IFREG {
            assert!(std::fs::read(&a).expect("read") == std::fs::read(&r).expect("read"));
        }
    }
    let sparse = std::fs::metadata(target.root.join("sparse")).expect("stat");
    assert!(sparse.blocks() * 512 <= 3 * MIB, "holes come back as holes");
    assert_eq!(read_long(&target.root), b"owned by 1234:5678");
}
