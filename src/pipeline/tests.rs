use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::{RngCore, SeedableRng};
use tokio::sync::mpsc;

use super::*;
use crate::crypto::derive::MasterSecret;
use crate::data::{BlockManifest, PackedBlock, decode_block, stored};
use crate::store::catalog::FileKind;

pub(super) const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(120);

pub(super) fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

pub(super) fn keys() -> PipelineKeys {
    PipelineKeys {
        data: Arc::new(MasterSecret::from_bytes([3; 32]).data_keys()),
        owner: SigningKey::from_bytes(&[5; 32]),
    }
}

pub(super) fn settings(root: &Path, outbox: &Path) -> PipelineSettings {
    PipelineSettings {
        root: root.to_path_buf(),
        excludes: Vec::new(),
        block_size: MIB,
        layout: Layout::new(3, 2).expect("valid layout"),
        zstd_level: 3,
        workers: 2,
        outbox: outbox.to_path_buf(),
    }
}

/// A catalog built from earlier runs' events.
#[derive(Default)]
pub(super) struct MemLookup {
    files: HashMap<Vec<u8>, FileEntry>,
    chunks: HashSet<ChunkId>,
}

impl MemLookup {
    fn from_events(events: &[PipelineEvent]) -> Self {
        let mut lookup = MemLookup::default();
        for event in events {
            match event {
                PipelineEvent::Block(b) => lookup.chunks.extend(b.chunks.iter().map(|(c, _)| *c)),
                PipelineEvent::File(f) => {
                    lookup.files.insert(f.path.clone(), f.clone());
                }
                _ => {}
            }
        }
        lookup
    }
}

impl Lookup for MemLookup {
    fn previous(&self, path: &[u8]) -> Option<FileEntry> {
        self.files.get(path).cloned()
    }
    fn chunk_known(&self, id: &ChunkId) -> bool {
        self.chunks.contains(id)
    }
}

/// Next event, waiting up to the deadline; `None` when the channel is closed.
fn next(rx: &mut mpsc::Receiver<PipelineEvent>, deadline: Instant) -> Option<PipelineEvent> {
    loop {
        match rx.try_recv() {
            Ok(e) => return Some(e),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {
                assert!(
                    Instant::now() < deadline,
                    "no pipeline event before the deadline"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Runs to the end with unlimited credit; checks the ordering guarantee on the way (every chunk
/// of a file is known before or staged in a block sent before the file).
pub(super) fn run(settings: PipelineSettings, lookup: MemLookup) -> (Vec<PipelineEvent>, Totals) {
    let known = lookup.chunks.clone();
    let (tx, mut rx) = mpsc::channel(8);
    let pipeline = Pipeline::start(settings, keys(), Arc::new(lookup), tx).expect("starts");
    pipeline.grant(usize::MAX);
    let deadline = Instant::now() + WAIT;
    let mut seen = known;
    let mut events = Vec::new();
    while let Some(event) = next(&mut rx, deadline) {
        match &event {
            PipelineEvent::Block(b) => seen.extend(b.chunks.iter().map(|(c, _)| *c)),
            PipelineEvent::File(f) => {
                for c in &f.chunks {
                    assert!(
                        seen.contains(c),
                        "{:?} sent before its chunk's block",
                        f.path
                    );
                }
            }
            PipelineEvent::Done(totals) => {
                let totals = *totals;
                assert!(next(&mut rx, deadline).is_none(), "an event after Done");
                return (events, totals);
            }
            PipelineEvent::Failed(e) => panic!("pipeline failed: {e:?}"),
            PipelineEvent::Skipped(_) => {}
        }
        events.push(event);
    }
    panic!("events ended without Done");
}

pub(super) fn files(events: &[PipelineEvent]) -> HashMap<Vec<u8>, FileEntry> {
    events
        .iter()
        .filter_map(|e| match e {
            PipelineEvent::File(f) => Some((f.path.clone(), f.clone())),
            _ => None,
        })
        .collect()
}

pub(super) fn blocks(events: &[PipelineEvent]) -> Vec<&StagedBlock> {
    events
        .iter()
        .filter_map(|e| match e {
            PipelineEvent::Block(b) => Some(b),
            _ => None,
        })
        .collect()
}

fn skipped(events: &[PipelineEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            PipelineEvent::Skipped(s) => Some((
                String::from_utf8_lossy(&s.path).into_owned(),
                s.reason.clone(),
            )),
            _ => None,
        })
        .collect()
}

/// Reads every staged block back as a restore would: envelope, owner's signature, entry's
/// size and hash, then decodes from the last `k` fragments only (the first `m` dropped).
fn restore_chunks(outbox: &Path, blocks: &[&StagedBlock]) -> HashMap<ChunkId, Vec<u8>> {
    let public = keys().owner.verifying_key();
    let data_keys = keys().data;
    let mut out = HashMap::new();
    for block in blocks {
        let entry = &block.entry;
        let total = (entry.data_shards + entry.parity_shards) as usize;
        assert_eq!(entry.fragments.len(), total);
        let mut fragments = Vec::new();
        let mut manifest = None;
        for position in 0..total {
            let bytes = std::fs::read(staged_path(outbox, &entry.id, position as u32))
                .expect("staged fragment exists");
            let place = &entry.fragments[position];
            assert_eq!(place.supplier, None);
            assert_eq!(place.size, bytes.len() as u64);
            assert_eq!(place.blake3, *blake3::hash(&bytes).as_bytes());
            let (signed, fragment) = stored::unwrap(&bytes).expect("envelope");
            assert_eq!(signed, &entry.signed_manifest[..]);
            let m = BlockManifest::verify(signed, &public).expect("owner's signature");
            assert_eq!(m.block_id(), entry.id);
            manifest = Some(m);
            fragments.push(fragment.to_vec());
        }
        let manifest = manifest.expect("at least one fragment");
        let given: Vec<Option<&[u8]>> = fragments
            .iter()
            .enumerate()
            .map(|(i, f)| (i >= entry.parity_shards as usize).then_some(&f[..]))
            .collect();
        let plain = decode_block(&given, &manifest, &data_keys.block)
            .expect("decodes from k fragments")
            .plain;
        assert_eq!(plain.len() as u64, entry.plain_len);
        let parsed = PackedBlock::parse(&plain).expect("parses");
        let listed: Vec<(ChunkId, u32)> = parsed
            .chunks()
            .iter()
            .map(|(c, d)| (*c, d.len() as u32))
            .collect();
        assert_eq!(listed, block.chunks, "the event lists the block's chunks");
        for (id, data) in parsed.chunks() {
            assert!(
                out.insert(*id, data.to_vec()).is_none(),
                "a chunk stored twice"
            );
        }
    }
    out
}

pub(super) fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

/// Mixed tree: empty, small, big random, duplicates (whole files and a shared big prefix),
/// nested dirs, a symlink.
pub(super) fn mixed_tree(root: &Path) -> HashMap<String, Vec<u8>> {
    let big = random_bytes(1, 6 * MIB + 12345);
    let mut prefixed = big[..3 * MIB].to_vec();
    prefixed.extend_from_slice(&random_bytes(2, MIB));
    let text: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("line {i} of a text file\n").into_bytes())
        .collect();
    let files: HashMap<String, Vec<u8>> = [
        ("empty", Vec::new()),
        ("small.txt", b"hello, backup".to_vec()),
        ("big.bin", big.clone()),
        ("a/b/c/copy-of-big.bin", big),
        ("a/prefixed.bin", prefixed),
        ("a/text.log", text),
        ("a/b/small-dup.txt", b"hello, backup".to_vec()),
        ("z/2", random_bytes(3, 5000)),
        ("z/1", random_bytes(4, 70_000)),
    ]
    .into_iter()
    .map(|(p, b)| (p.to_string(), b))
    .collect();
    for (p, b) in &files {
        write(root, p, b);
    }
    std::fs::create_dir_all(root.join("a/empty-dir")).expect("mkdir");
    std::os::unix::fs::symlink("../big.bin", root.join("a/link")).expect("symlink");
    files
}

#[test]
fn round_trip_a_mixed_tree_from_any_k_fragments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    let expected = mixed_tree(&root);
    let (events, totals) = run(settings(&root, &outbox), MemLookup::default());
    let entries = files(&events);
    let chunks = restore_chunks(&outbox, &blocks(&events));

    for (path, bytes) in &expected {
        let e = &entries[path.as_bytes()];
        assert_eq!(e.kind, FileKind::File);
        assert_eq!(e.size, bytes.len() as u64);
        let back: Vec<u8> = e.chunks.iter().flat_map(|c| chunks[c].clone()).collect();
        assert!(back == *bytes, "{path} came back different");
    }
    let link = &entries[&b"a/link"[..]];
    assert_eq!(
        (link.kind, &link.target[..]),
        (FileKind::Symlink, &b"../big.bin"[..])
    );
    for dir in ["", "a", "a/b", "a/b/c", "a/empty-dir", "z"] {
        assert_eq!(entries[dir.as_bytes()].kind, FileKind::Dir, "{dir:?}");
    }
    assert_eq!(entries.len(), expected.len() + 1 + 6);
    let meta = std::fs::symlink_metadata(root.join("big.bin")).expect("stat");
    let big = &entries[&b"big.bin"[..]];
    use std::os::unix::fs::MetadataExt;
    assert_eq!((big.inode, big.mode), (meta.ino(), meta.mode() & 0o7777));
    assert_eq!(
        big.mtime_ns,
        meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
    );

    // Duplicates were stored once: new bytes are about the distinct content only.
    let all: u64 = expected.values().map(|b| b.len() as u64).sum();
    let distinct = all - (6 * MIB + 12345) as u64 - 13;
    assert_eq!((totals.files, totals.dirs, totals.symlinks), (9, 6, 1));
    assert_eq!(totals.bytes, all);
    assert_eq!(totals.bytes_read, all);
    assert_eq!(totals.new_blocks, blocks(&events).len() as u64);
    assert!(
        totals.new_bytes <= distinct && totals.new_bytes > distinct - 3 * MIB as u64,
        "new bytes {} for {distinct} distinct",
        totals.new_bytes
    );
    assert_eq!(
        chunks.values().map(|c| c.len() as u64).sum::<u64>(),
        totals.new_bytes
    );
    assert!(skipped(&events).is_empty(), "{:?}", skipped(&events));
}

#[test]
fn excluded_paths_and_special_files_are_left_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    for p in [
        "keep.txt",
        "x.tmp",
        "deep/er/y.tmp",
        "cache/big",
        "cache/sub/z",
        "deep/cache/kept",
    ] {
        write(&root, p, p.as_bytes());
    }
    let _socket = std::os::unix::net::UnixListener::bind(root.join("sock")).expect("socket");
    let mut s = settings(&root, &outbox);
    s.excludes = vec!["*.tmp".into(), "cache/**".into()];
    let (events, totals) = run(s, MemLookup::default());
    let mut paths: Vec<String> = files(&events)
        .keys()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "",
            "cache",
            "deep",
            "deep/cache",
            "deep/cache/kept",
            "deep/er",
            "keep.txt"
        ]
    );
    let skips: Vec<(String, bool)> = events
        .iter()
        .filter_map(|e| match e {
            PipelineEvent::Skipped(s) => {
                Some((String::from_utf8_lossy(&s.path).into_owned(), s.by_design))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        skips,
        [("sock".to_string(), true)],
        "a socket is skipped by design"
    );
    assert_eq!(totals.files, 2);
}

/// A `system.posix_acl_access` value: user::rwx, user:1234:r--, group::r-x, mask::r-x,
/// other::r-- (version 2, then tag u16, perm u16, id u32 per entry, little-endian).
pub(super) fn acl_bytes() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 7u16, u32::MAX),
        (0x02, 4, 1234),
        (0x04, 5, u32::MAX),
        (0x10, 5, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

#[test]
fn the_walk_records_owners_links_attributes_special_files_holes_and_deep_paths() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    write(&root, "owned", b"owned by 1234:5678");
    std::os::unix::fs::chown(root.join("owned"), Some(1234), Some(5678)).expect("chown (root)");
    write(&root, "links/a", b"one file, three names");
    std::fs::hard_link(root.join("links/a"), root.join("links/b")).expect("link");
    std::fs::hard_link(root.join("links/a"), root.join("links/c")).expect("link");
    write(&root, "attrs", b"with attributes");
    rustix::fs::setxattr(
        root.join("attrs"),
        "user.comment",
        b"hello",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("user xattr (tmpfs or ext4 with user_xattr)");
    rustix::fs::setxattr(
        root.join("attrs"),
        "system.posix_acl_access",
        &acl_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .expect("ACL");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::Mode::from_raw_mode(0o640),
    )
    .expect("mkfifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .expect("mknod (root)");
    // A 64 MiB file holding 1 MiB in its middle.
    let sparse = std::fs::File::create(root.join("sparse")).expect("create");
    sparse.set_len(64 << 20).expect("set_len");
    std::os::unix::fs::FileExt::write_all_at(&sparse, &random_bytes(7, MIB), 32 << 20)
        .expect("write");
    drop(sparse);
    // A path over 4096 bytes: 20 directories of 250-byte names.
    let mut deep = String::new();
    for i in 0..20 {
        deep.push_str(&format!("{}{i:02}/", "d".repeat(248)));
    }
    let mut fd = rustix::fs::open(
        &root,
        rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .expect("root");
    for part in deep.trim_end_matches('/').split('/') {
        rustix::fs::mkdirat(&fd, part, rustix::fs::Mode::from_raw_mode(0o755)).expect("mkdirat");
        fd = rustix::fs::openat(
            &fd,
            part,
            rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .expect("openat");
    }
    let leaf = rustix::fs::openat(
        &fd,
        "leaf",
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CREATE,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .expect("leaf");
    rustix::io::write(&leaf, b"deep").expect("write");
    let deep_leaf = format!("{deep}leaf");
    assert!(deep_leaf.len() > 4096);

    let (events, _) = run(settings(&root, &outbox), MemLookup::default());
    assert!(skipped(&events).is_empty(), "{:?}", skipped(&events));
    let all = files(&events);
    let get = |p: &str| {
        all.get(p.as_bytes())
            .unwrap_or_else(|| panic!("{p} backed up"))
    };

    let owner = get("owned").owner.clone().expect("owner recorded");
    assert_eq!((owner.uid, owner.gid), (1234, 5678));
    assert_eq!(
        get("").owner.as_ref().map(|o| o.user.clone()),
        Some(b"root".to_vec())
    );

    let names = ["links/a", "links/b", "links/c"].map(get);
    assert!(
        names
            .iter()
            .all(|e| e.links == 3 && e.link_identity() == names[0].link_identity())
    );
    assert!(
        names
            .iter()
            .all(|e| e.chunks == names[0].chunks && e.size == 21)
    );
    assert_eq!(get("owned").link_identity(), None);
    // The device is half the identity: the same inode number on another file system is another
    // file.
    let on_disk = std::fs::symlink_metadata(root.join("links/a")).expect("stat");
    assert_eq!(
        names[0].link_identity(),
        Some((on_disk.dev(), on_disk.ino()))
    );

    let attrs = &get("attrs").xattrs;
    assert!(
        attrs.contains(&(b"user.comment".to_vec(), b"hello".to_vec())),
        "{attrs:?}"
    );
    assert!(
        attrs.iter().any(|(n, _)| n == b"system.posix_acl_access"),
        "the ACL is recorded: {attrs:?}"
    );

    assert_eq!(get("fifo").kind, FileKind::Fifo);
    assert_eq!(get("fifo").mode, 0o640);
    let null = get("null");
    assert_eq!(null.kind, FileKind::CharDevice);
    assert_eq!(
        null.rdev,
        std::fs::symlink_metadata(root.join("null"))
            .expect("stat")
            .rdev()
    );

    let sparse = get("sparse");
    assert_eq!(sparse.size, 64 << 20);
    let held: u64 = sparse.holes.iter().map(|(_, len)| len).sum();
    assert!(
        held >= 62 << 20,
        "holes cover the 63 MiB of zeros: {:?}",
        sparse.holes
    );
    assert!(
        sparse
            .holes
            .iter()
            .all(|&(at, len)| at + len <= 32 << 20 || at >= 33 << 20)
    );

    assert_eq!(get(&deep_leaf).size, 4);
}

#[test]
fn an_unchanged_tree_is_not_read_again_and_stores_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    mixed_tree(&root);
    let (first, _) = run(settings(&root, &outbox), MemLookup::default());
    let (second, totals) = run(settings(&root, &outbox), MemLookup::from_events(&first));
    assert_eq!(totals.bytes_read, 0);
    assert_eq!((totals.new_blocks, totals.new_bytes), (0, 0));
    assert!(blocks(&second).is_empty());
    assert_eq!(files(&second), files(&first), "same entries, same chunks");
    assert!(totals.bytes > 0);
}

#[test]
fn a_one_byte_edit_in_a_big_file_stores_few_new_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    let mut big = random_bytes(7, 16 * MIB);
    write(&root, "big", &big);
    write(&root, "other", b"unchanged");
    let (first, t1) = run(settings(&root, &outbox), MemLookup::default());
    assert!(t1.new_blocks >= 10, "{} blocks", t1.new_blocks);
    big[9 * MIB] ^= 0xff;
    write(&root, "big", &big);
    let (second, t2) = run(settings(&root, &outbox), MemLookup::from_events(&first));
    assert_eq!(
        t2.bytes_read,
        big.len() as u64,
        "only the edited file is read"
    );
    // One chunk changes (at most 4 MiB); in 1 MiB blocks that is a block or two of new data.
    assert!(
        (1..=2).contains(&t2.new_blocks) && t2.new_bytes <= 4 * MIB as u64,
        "{t2:?}"
    );
    // The edited file restores from old and new blocks together.
    let mut all_blocks = blocks(&first);
    all_blocks.extend(blocks(&second));
    let chunks = restore_chunks(&outbox, &all_blocks);
    let entry = &files(&second)[&b"big"[..]];
    let back: Vec<u8> = entry
        .chunks
        .iter()
        .flat_map(|c| chunks[c].clone())
        .collect();
    assert!(back == big);
}

#[test]
fn without_credit_nothing_is_sealed_and_a_grant_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    write(&root, "big", &random_bytes(8, 24 * MIB));
    let (tx, mut rx) = mpsc::channel(64);
    let lookup = Arc::new(MemLookup::default());
    let pipeline = Pipeline::start(settings(&root, &outbox), keys(), lookup, tx).expect("starts");
    let deadline = Instant::now() + WAIT;
    let wait_for_credit_wait = |pipeline: &Pipeline| {
        while !pipeline.waiting_for_credit() {
            assert!(Instant::now() < deadline, "never waited for credit");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    wait_for_credit_wait(&pipeline);
    // Stopped reading well before the end of the file, and sealed nothing.
    let read = pipeline.totals().bytes_read;
    assert!(read <= 12 * MIB as u64, "read {read} bytes without credit");
    assert_eq!(pipeline.totals().new_blocks, 0);
    assert_eq!(std::fs::read_dir(&outbox).expect("outbox").count(), 0);
    while let Ok(event) = rx.try_recv() {
        assert!(matches!(event, PipelineEvent::File(_)), "{event:?}");
    }
    pipeline.grant(1);
    let block = loop {
        match next(&mut rx, deadline).expect("open") {
            PipelineEvent::Block(b) => break b,
            PipelineEvent::File(f) => assert!(f.path.is_empty()),
            other => panic!("{other:?}"),
        }
    };
    assert!(!block.chunks.is_empty());
    wait_for_credit_wait(&pipeline);
    assert_eq!(pipeline.totals().new_blocks, 1, "one credit, one block");
    pipeline.grant(usize::MAX);
    let mut count = 1;
    loop {
        match next(&mut rx, deadline).expect("open") {
            PipelineEvent::Block(_) => count += 1,
            PipelineEvent::Done(t) => {
                assert_eq!((t.new_blocks, t.bytes_read), (count, 24 * MIB as u64));
                break;
            }
            PipelineEvent::File(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(count > 10);
}

#[test]
fn cancel_stops_and_sends_nothing_more() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    for n in 0..4 {
        write(&root, &format!("f{n}"), &random_bytes(20 + n, 4 * MIB));
    }
    // Capacity 1: at most one event can already be queued when cancel returns.
    let (tx, mut rx) = mpsc::channel(1);
    let lookup = Arc::new(MemLookup::default());
    let pipeline = Pipeline::start(settings(&root, &outbox), keys(), lookup, tx).expect("starts");
    pipeline.grant(usize::MAX);
    let deadline = Instant::now() + WAIT;
    while !matches!(next(&mut rx, deadline), Some(PipelineEvent::Block(_))) {}
    pipeline.cancel();
    let mut after = Vec::new();
    while let Some(event) = next(&mut rx, deadline) {
        after.push(event);
    }
    assert!(after.len() <= 1, "events after cancel: {after:?}");
    assert!(
        !after
            .iter()
            .any(|e| matches!(e, PipelineEvent::Done(_) | PipelineEvent::Failed(_))),
        "{after:?}"
    );
    assert!(
        pipeline.totals().bytes_read < 16 * MIB as u64,
        "it went on reading"
    );
}

#[test]
fn an_outbox_that_cannot_be_written_fails_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    write(&root, "f", &random_bytes(30, 3 * MIB));
    let (tx, mut rx) = mpsc::channel(8);
    let lookup = Arc::new(MemLookup::default());
    let pipeline = Pipeline::start(settings(&root, &outbox), keys(), lookup, tx).expect("starts");
    // Replace the outbox by a plain file before the first block is sealed (root ignores
    // permission bits, so a read-only directory would not do).
    std::fs::remove_dir(&outbox).expect("empty outbox");
    std::fs::write(&outbox, b"not a directory").expect("write");
    pipeline.grant(usize::MAX);
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while let Some(event) = next(&mut rx, deadline) {
        assert!(!matches!(
            event,
            PipelineEvent::Block(_) | PipelineEvent::Done(_)
        ));
        last = Some(event);
    }
    assert!(
        matches!(
            last,
            Some(PipelineEvent::Failed(PipelineError::Stage { .. }))
        ),
        "{last:?}"
    );

    // At start: an outbox that cannot be created, a bad glob, a root that is not a directory.
    let (tx, _rx) = mpsc::channel(8);
    let lookup = Arc::new(MemLookup::default());
    let mut s = settings(&root, &outbox.join("sub"));
    assert!(matches!(
        Pipeline::start(s.clone(), keys(), lookup.clone(), tx.clone()),
        Err(PipelineError::Outbox { .. })
    ));
    s.outbox = dir.path().join("outbox2");
    s.excludes = vec!["a[".into()];
    assert!(matches!(
        Pipeline::start(s.clone(), keys(), lookup.clone(), tx.clone()),
        Err(PipelineError::Exclude(_))
    ));
    s.excludes.clear();
    s.root = root.join("f");
    let (tx, mut rx) = mpsc::channel(8);
    let _p = Pipeline::start(s, keys(), lookup, tx).expect("the root is checked by the walker");
    assert!(matches!(
        next(&mut rx, Instant::now() + WAIT),
        Some(PipelineEvent::Failed(PipelineError::RootNotDir(_)))
    ));
    assert!(next(&mut rx, Instant::now() + WAIT).is_none());
}

/// A lookup that changes the tree at the moment the walker asks about a file: "vanishing" is
/// removed just before it is opened, "growing" grows by 2 MiB when its first chunk is named
/// (mid-read: a chunk is cut only with 4 MiB at hand).
struct Meddling {
    root: std::path::PathBuf,
    grown: std::sync::atomic::AtomicBool,
}

impl Lookup for Meddling {
    fn previous(&self, path: &[u8]) -> Option<FileEntry> {
        if path == b"vanishing" {
            std::fs::remove_file(self.root.join("vanishing")).expect("remove");
        }
        None
    }
    fn chunk_known(&self, _: &ChunkId) -> bool {
        if !self.grown.swap(true, std::sync::atomic::Ordering::SeqCst) {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(self.root.join("growing"))
                .expect("open");
            f.write_all(&random_bytes(41, 2 * MIB)).expect("append");
        }
        false
    }
}

#[test]
fn unreadable_and_changing_files_are_named_and_the_run_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    let growing = random_bytes(40, 6 * MIB);
    write(&root, "growing", &growing);
    write(&root, "ok", b"fine");
    write(&root, "vanishing", b"soon gone");
    let lookup = Meddling {
        root: root.clone(),
        grown: false.into(),
    };
    let (tx, mut rx) = mpsc::channel(8);
    let pipeline =
        Pipeline::start(settings(&root, &outbox), keys(), Arc::new(lookup), tx).expect("starts");
    pipeline.grant(usize::MAX);
    let deadline = Instant::now() + WAIT;
    let mut events = Vec::new();
    let totals = loop {
        match next(&mut rx, deadline).expect("ends with Done") {
            PipelineEvent::Done(t) => break t,
            PipelineEvent::Failed(e) => panic!("{e:?}"),
            e => events.push(e),
        }
    };
    let mut named = skipped(&events);
    named.sort();
    assert_eq!(named.len(), 2, "{named:?}");
    assert_eq!(
        named[0],
        ("growing".into(), "changed while being read".into())
    );
    assert_eq!(named[1].0, "vanishing");
    assert!(named[1].1.starts_with("cannot open"), "{named:?}");
    let entries = files(&events);
    // Read up to the size at open, no further: the entry is what was read.
    assert_eq!(entries[&b"growing"[..]].size, growing.len() as u64);
    assert_eq!(totals.bytes_read, (growing.len() + b"fine".len()) as u64);
    assert!(entries.contains_key(&b"ok"[..]) && !entries.contains_key(&b"vanishing"[..]));
    assert_eq!(totals.files, 2);
}

#[test]
fn files_waiting_for_the_open_block_are_capped() {
    // HOLD_MAX + 4 identical tiny files wait for the block holding their one chunk: at HOLD_MAX
    // that block is closed early, so the last, different file's chunk gets a second block
    // although all the data would fit in one.
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, outbox) = (dir.path().join("src"), dir.path().join("outbox"));
    for n in 0..HOLD_MAX + 4 {
        write(&root, &format!("same/{n:05}"), b"same bytes");
    }
    write(&root, "zz/last", b"other bytes");
    let (events, totals) = run(settings(&root, &outbox), MemLookup::default());
    assert_eq!(totals.files, HOLD_MAX as u64 + 5);
    assert_eq!(totals.new_blocks, 2);
    let blocks = blocks(&events);
    assert_eq!(
        blocks[0].chunks.len(),
        1,
        "the first block was closed early"
    );
    assert_eq!(blocks[0].chunks[0].1 as usize, b"same bytes".len());
}
