//! The owner's catalog, in `Cf::Catalog`: snapshots (versions) with their file trees, the chunk
//! index and the block index; and the running backup jobs, in `Cf::Jobs`.
//!
//! These types are the catalog's in-memory shape, shared by the pipeline (which makes file and
//! block entries), the backup job (which records them) and restore (which reads them). The key
//! layout and the record encodings are below the types; running jobs are in [`super::jobs`].
//!
//! | key | value |
//! |---|---|
//! | `n` | `records::SnapshotCounter`: the last snapshot id handed out |
//! | `t<snapshot u64 BE><path bytes>` | `records::FileRecord`: one entry of a snapshot's tree |
//! | `c<chunk id 32>` | `records::ChunkRecord`: the block holding that chunk |
//! | `b<block id 32>` | `records::BlockRecord`: the block's manifest, layout and placements |
//! | `s<snapshot u64 BE>` | `records::SnapshotRecord`: a committed snapshot |
//!
//! Invariants:
//! - A snapshot is visible (in [`snapshots`], [`latest`]) only once its `s` record is written,
//!   and [`commit_snapshot`] is meant to go in the same batch as the tree's last entries, so a
//!   crash never leaves a visible snapshot with half a tree.
//! - Snapshot ids are never reused: [`allocate_snapshot`] writes the counter before it returns.
//! - Readers skip an unreadable record with a WARN rather than failing the whole catalog; a
//!   missing chunk or block then costs a re-upload, never a wrong restore.

use std::sync::Mutex;

use super::codec::{self, Key, KeyReader, KvPages, Pages, records};
use super::{Batch, Cf, KeyValue, KvStore, StoreError, jobs};
use crate::crypto::identity::NodeId;
use crate::data::{BlockId, ChunkId};

/// A snapshot's number: allocated in increasing order, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
}

/// One entry of a snapshot's tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Relative to the source's root, `/`-separated, no leading `/`, never `.` or `..`
    /// components; the root itself is the empty path. Raw bytes: Unix names need not be UTF-8.
    pub path: Vec<u8>,
    pub kind: FileKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification and status-change times, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
    /// Bytes of a regular file (0 otherwise).
    pub size: u64,
    /// A regular file's chunks, in order.
    pub chunks: Vec<ChunkId>,
    /// A symlink's target, as stored in the link.
    pub target: Vec<u8>,
}

/// Where one fragment of a block went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FragmentPlace {
    /// The supplier that acknowledged it (`None`: not placed yet, waiting in the outbox).
    pub supplier: Option<NodeId>,
    /// Bytes as stored on the supplier (the stored-fragment envelope, manifest included).
    pub size: u64,
    /// BLAKE3 of those bytes (what the supplier checked before acknowledging).
    pub blake3: [u8; 32],
}

/// One block of the block index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    pub id: BlockId,
    /// The owner-signed manifest (see `data::manifest`).
    pub signed_manifest: Vec<u8>,
    pub data_shards: u32,
    pub parity_shards: u32,
    /// Length of the plain block (before compression).
    pub plain_len: u64,
    /// One per position, `k + m` of them.
    pub fragments: Vec<FragmentPlace>,
}

impl BlockEntry {
    pub fn placed(&self) -> usize {
        self.fragments
            .iter()
            .filter(|f| f.supplier.is_some())
            .count()
    }
}

/// A file the job could not back up, and why (named in the job's result).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: Vec<u8>,
    pub reason: String,
}

/// One committed version of one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: SnapshotId,
    /// The source's name (its configured name, else its root path).
    pub source: String,
    /// The source's root directory as given (absolute).
    pub root: Vec<u8>,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub finished_at: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sum of the regular files' sizes.
    pub bytes: u64,
    /// Bytes of chunks this snapshot stored for the first time (after dedup).
    pub new_bytes: u64,
    pub new_blocks: u64,
    pub skipped: Vec<Skipped>,
}

const CF: Cf = Cf::Catalog;
const TAG_FILE: &[u8] = b"t";
const TAG_CHUNK: &[u8] = b"c";
const TAG_BLOCK: &[u8] = b"b";
const TAG_SNAPSHOT: &[u8] = b"s";
const COUNTER_KEY: &[u8] = b"n";
/// Entries read per scan: a file record is ~100 bytes plus 32 per chunk, so a page stays small.
const PAGE: usize = 512;
/// Bytes of a chunk id inside a file record's concatenated chunk list.
const CHUNK_ID_LEN: usize = 32;

/// A catalog record or export that is not what it should be, or a store failure underneath.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Record(#[from] codec::CodecError),
    #[error("a catalog key has the wrong shape")]
    Key,
    #[error("a file entry's chunk list has {0} bytes, not a multiple of 32")]
    ChunkList(usize),
    #[error("a file entry has an unknown kind ({0})")]
    FileKind(i32),
    #[error("a catalog record has an invalid `{0}`")]
    Invalid(&'static str),
}

impl SnapshotId {
    /// The next id (`None` once every id was used, which no real node reaches).
    pub fn next(self) -> Option<SnapshotId> {
        self.0.checked_add(1).map(SnapshotId)
    }
}

fn kind_to_record(kind: FileKind) -> records::FileKind {
    match kind {
        FileKind::File => records::FileKind::File,
        FileKind::Dir => records::FileKind::Dir,
        FileKind::Symlink => records::FileKind::Symlink,
    }
}

fn kind_from_record(kind: i32) -> Result<FileKind, CatalogError> {
    match records::FileKind::try_from(kind) {
        Ok(records::FileKind::File) => Ok(FileKind::File),
        Ok(records::FileKind::Dir) => Ok(FileKind::Dir),
        Ok(records::FileKind::Symlink) => Ok(FileKind::Symlink),
        Ok(records::FileKind::Unspecified) | Err(_) => Err(CatalogError::FileKind(kind)),
    }
}

fn snapshot_prefix(snapshot: SnapshotId) -> Vec<u8> {
    Key::new(TAG_FILE).u64(snapshot.0).into_vec()
}

fn file_key(snapshot: SnapshotId, path: &[u8]) -> Vec<u8> {
    // The path is variable-length, so it goes last: keys of one snapshot sort by path.
    let mut k = snapshot_prefix(snapshot);
    k.extend_from_slice(path);
    k
}

fn encode_file(entry: &FileEntry) -> Vec<u8> {
    let mut chunks = Vec::with_capacity(entry.chunks.len() * CHUNK_ID_LEN);
    for c in &entry.chunks {
        chunks.extend_from_slice(&c.0);
    }
    codec::encode(&records::FileRecord {
        kind: kind_to_record(entry.kind) as i32,
        mode: entry.mode,
        mtime_ns: entry.mtime_ns,
        ctime_ns: entry.ctime_ns,
        inode: entry.inode,
        size: entry.size,
        chunks,
        target: entry.target.clone(),
    })
}

/// A file record read back under its path.
fn decode_file(path: &[u8], value: &[u8]) -> Result<FileEntry, CatalogError> {
    let r: records::FileRecord = codec::decode(value)?;
    if !r.chunks.len().is_multiple_of(CHUNK_ID_LEN) {
        return Err(CatalogError::ChunkList(r.chunks.len()));
    }
    let chunks = r
        .chunks
        .chunks_exact(CHUNK_ID_LEN)
        .map(|c| {
            let mut id = [0; CHUNK_ID_LEN];
            id.copy_from_slice(c);
            ChunkId(id)
        })
        .collect();
    Ok(FileEntry {
        path: path.to_vec(),
        kind: kind_from_record(r.kind)?,
        mode: r.mode,
        mtime_ns: r.mtime_ns,
        ctime_ns: r.ctime_ns,
        inode: r.inode,
        size: r.size,
        chunks,
        target: r.target,
    })
}

/// A file entry's key-value pair: the path is everything after the tag and the snapshot.
fn parse_file(k: &[u8], v: &[u8]) -> Result<FileEntry, CatalogError> {
    let path = k.get(TAG_FILE.len() + 8..).ok_or(CatalogError::Key)?;
    decode_file(path, v)
}

fn fixed<const N: usize>(bytes: &[u8], field: &'static str) -> Result<[u8; N], CatalogError> {
    bytes.try_into().map_err(|_| CatalogError::Invalid(field))
}

fn encode_block(block: &BlockEntry) -> Vec<u8> {
    codec::encode(&records::BlockRecord {
        signed_manifest: block.signed_manifest.clone(),
        data_shards: block.data_shards,
        parity_shards: block.parity_shards,
        plain_len: block.plain_len,
        fragments: block
            .fragments
            .iter()
            .map(|f| records::FragmentPlaceRecord {
                supplier: f
                    .supplier
                    .map(|s| s.as_bytes().to_vec())
                    .unwrap_or_default(),
                size: f.size,
                blake3: f.blake3.to_vec(),
            })
            .collect(),
    })
}

fn decode_block(id: BlockId, value: &[u8]) -> Result<BlockEntry, CatalogError> {
    let r: records::BlockRecord = codec::decode(value)?;
    let fragments = r
        .fragments
        .into_iter()
        .map(|f| {
            Ok(FragmentPlace {
                supplier: if f.supplier.is_empty() {
                    None
                } else {
                    Some(codec::node_id_field(&f.supplier, "supplier")?)
                },
                size: f.size,
                blake3: fixed(&f.blake3, "blake3")?,
            })
        })
        .collect::<Result<Vec<_>, CatalogError>>()?;
    Ok(BlockEntry {
        id,
        signed_manifest: r.signed_manifest,
        data_shards: r.data_shards,
        parity_shards: r.parity_shards,
        plain_len: r.plain_len,
        fragments,
    })
}

fn parse_block(k: &[u8], v: &[u8]) -> Result<BlockEntry, CatalogError> {
    let mut r = KeyReader::new(k, TAG_BLOCK).ok_or(CatalogError::Key)?;
    let id = BlockId(r.bytes().ok_or(CatalogError::Key)?);
    r.end().ok_or(CatalogError::Key)?;
    decode_block(id, v)
}

fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    codec::encode(&records::SnapshotRecord {
        source: s.source.clone(),
        root: s.root.clone(),
        started_at: s.started_at,
        finished_at: s.finished_at,
        files: s.files,
        dirs: s.dirs,
        symlinks: s.symlinks,
        bytes: s.bytes,
        new_bytes: s.new_bytes,
        new_blocks: s.new_blocks,
        skipped: s
            .skipped
            .iter()
            .map(|k| records::SkippedRecord {
                path: k.path.clone(),
                reason: k.reason.clone(),
            })
            .collect(),
    })
}

fn parse_snapshot(k: &[u8], v: &[u8]) -> Result<Snapshot, CatalogError> {
    let mut r = KeyReader::new(k, TAG_SNAPSHOT).ok_or(CatalogError::Key)?;
    let id = SnapshotId(r.u64().ok_or(CatalogError::Key)?);
    r.end().ok_or(CatalogError::Key)?;
    let r: records::SnapshotRecord = codec::decode(v)?;
    Ok(Snapshot {
        id,
        source: r.source,
        root: r.root,
        started_at: r.started_at,
        finished_at: r.finished_at,
        files: r.files,
        dirs: r.dirs,
        symlinks: r.symlinks,
        bytes: r.bytes,
        new_bytes: r.new_bytes,
        new_blocks: r.new_blocks,
        skipped: r
            .skipped
            .into_iter()
            .map(|k| Skipped {
                path: k.path,
                reason: k.reason,
            })
            .collect(),
    })
}

/// Logs a record a reader skips. Never the key or value: a file entry's key is its path.
fn warn_skipped(what: &'static str, error: &CatalogError) {
    tracing::warn!(record = what, error = %error, "skipping an unreadable catalog record");
}

/// Every readable record under a prefix, a page at a time, unreadable ones skipped with a WARN.
struct Records<'a, T> {
    pages: Pages<'a, dyn KvStore + 'a>,
    rows: std::vec::IntoIter<KeyValue>,
    parse: fn(&[u8], &[u8]) -> Result<T, CatalogError>,
    what: &'static str,
}

impl<'a, T> Records<'a, T> {
    fn new(
        kv: &'a dyn KvStore,
        prefix: &[u8],
        parse: fn(&[u8], &[u8]) -> Result<T, CatalogError>,
        what: &'static str,
    ) -> Self {
        Records {
            pages: kv.pages(CF, prefix, PAGE),
            rows: Vec::new().into_iter(),
            parse,
            what,
        }
    }
}

impl<T> Iterator for Records<'_, T> {
    type Item = Result<T, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((k, v)) = self.rows.next() {
                match (self.parse)(&k, &v) {
                    Ok(item) => return Some(Ok(item)),
                    Err(e) => {
                        warn_skipped(self.what, &e);
                        continue;
                    }
                }
            }
            match self.pages.next()? {
                Ok(page) => self.rows = page.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Serialises allocations within the process: the read-increment-write below is not atomic in
/// the store, and two jobs starting at once must not get one id.
static ALLOCATE: Mutex<()> = Mutex::new(());

/// A new snapshot id, higher than any handed out before. The counter is written (and flushed)
/// before the id is returned, so a crash right after cannot hand the same id out again. If the
/// counter is missing or unreadable, the next id is found from what the catalog holds (committed
/// snapshots, trees, running jobs), so it still never collides with an id in use.
pub fn allocate_snapshot(kv: &dyn KvStore) -> Result<SnapshotId, StoreError> {
    let _one_at_a_time = ALLOCATE.lock().unwrap_or_else(|e| e.into_inner());
    let counted = match kv.get(CF, COUNTER_KEY)? {
        Some(v) => match codec::decode::<records::SnapshotCounter>(&v) {
            Ok(c) => Some(c.last),
            Err(e) => {
                warn_skipped("snapshot counter", &e.into());
                None
            }
        },
        None => None,
    };
    let last = match counted {
        Some(last) => last,
        None => highest_used(kv)?,
    };
    let id = SnapshotId(last)
        .next()
        .ok_or_else(|| StoreError::Db("every snapshot id is used".into()))?;
    kv.put(
        CF,
        COUNTER_KEY,
        &codec::encode(&records::SnapshotCounter { last: id.0 }),
    )?;
    kv.flush()?;
    Ok(id)
}

/// The highest snapshot id the catalog mentions anywhere (0 when none).
fn highest_used(kv: &dyn KvStore) -> Result<u64, StoreError> {
    let mut highest = 0;
    for page in kv.pages(CF, TAG_SNAPSHOT, PAGE) {
        for (k, _) in page? {
            if let Some(id) = KeyReader::new(&k, TAG_SNAPSHOT).and_then(|mut r| r.u64()) {
                highest = highest.max(id);
            }
        }
    }
    for job in jobs::jobs(kv)? {
        highest = highest.max(job.snapshot.0);
    }
    // Trees: one scan per distinct snapshot, jumping past each one's entries.
    let mut from = snapshot_prefix(SnapshotId(0));
    loop {
        let rows = kv.scan(CF, TAG_FILE, Some(&from), 1)?;
        let Some((k, _)) = rows.first() else { break };
        match KeyReader::new(k, TAG_FILE).and_then(|mut r| r.u64()) {
            Some(id) => {
                highest = highest.max(id);
                match id.checked_add(1) {
                    Some(next) => from = snapshot_prefix(SnapshotId(next)),
                    None => break,
                }
            }
            // A key too short to hold a snapshot id: step over it.
            None => from = codec::successor(k),
        }
    }
    Ok(highest)
}

/// Adds (or replaces) an entry of a snapshot's tree.
pub fn put_file(batch: &mut Batch, snapshot: SnapshotId, entry: &FileEntry) {
    batch.put(CF, file_key(snapshot, &entry.path), encode_file(entry));
}

/// One entry of a snapshot's tree (`None` if absent or unreadable).
pub fn file(
    kv: &dyn KvStore,
    snapshot: SnapshotId,
    path: &[u8],
) -> Result<Option<FileEntry>, StoreError> {
    let Some(v) = kv.get(CF, &file_key(snapshot, path))? else {
        return Ok(None);
    };
    Ok(decode_file(path, &v)
        .inspect_err(|e| warn_skipped("file", e))
        .ok())
}

/// A snapshot's tree in path (byte) order, read a page at a time.
pub fn files(
    kv: &dyn KvStore,
    snapshot: SnapshotId,
) -> impl Iterator<Item = Result<FileEntry, StoreError>> + '_ {
    Records::new(kv, &snapshot_prefix(snapshot), parse_file, "file")
}

/// Records that `chunk` is stored in `block` (the dedup index).
pub fn put_chunk(batch: &mut Batch, chunk: &ChunkId, block: &BlockId) {
    let record = records::ChunkRecord {
        block: block.0.to_vec(),
    };
    batch.put(
        CF,
        Key::new(TAG_CHUNK).bytes(&chunk.0),
        codec::encode(&record),
    );
}

/// The block holding `chunk` (`None` if the chunk was never stored, or its record is unreadable:
/// then it is stored again).
pub fn chunk_block(kv: &dyn KvStore, chunk: &ChunkId) -> Result<Option<BlockId>, StoreError> {
    let Some(v) = kv.get(CF, Key::new(TAG_CHUNK).bytes(&chunk.0).as_bytes())? else {
        return Ok(None);
    };
    let parsed = codec::decode::<records::ChunkRecord>(&v)
        .map_err(CatalogError::from)
        .and_then(|r| fixed(&r.block, "block").map(BlockId));
    Ok(parsed.inspect_err(|e| warn_skipped("chunk", e)).ok())
}

/// Adds (or replaces, e.g. once more fragments are placed) a block of the block index.
pub fn put_block(batch: &mut Batch, block: &BlockEntry) {
    batch.put(
        CF,
        Key::new(TAG_BLOCK).bytes(&block.id.0),
        encode_block(block),
    );
}

/// One block of the block index (`None` if absent or unreadable).
pub fn block(kv: &dyn KvStore, id: &BlockId) -> Result<Option<BlockEntry>, StoreError> {
    let Some(v) = kv.get(CF, Key::new(TAG_BLOCK).bytes(&id.0).as_bytes())? else {
        return Ok(None);
    };
    Ok(decode_block(*id, &v)
        .inspect_err(|e| warn_skipped("block", e))
        .ok())
}

/// Every readable block, in block id order, read a page at a time.
pub fn blocks(kv: &dyn KvStore) -> impl Iterator<Item = Result<BlockEntry, StoreError>> + '_ {
    Records::new(kv, TAG_BLOCK, parse_block, "block")
}

/// Makes a snapshot visible. Put it in the batch with the tree's last entries (and the job's
/// deletion), so the version appears whole or not at all.
pub fn commit_snapshot(batch: &mut Batch, snapshot: &Snapshot) {
    batch.put(
        CF,
        Key::new(TAG_SNAPSHOT).u64(snapshot.id.0),
        encode_snapshot(snapshot),
    );
}

/// Every committed, readable snapshot, in id order.
pub fn snapshots(kv: &dyn KvStore) -> Result<Vec<Snapshot>, StoreError> {
    Records::new(kv, TAG_SNAPSHOT, parse_snapshot, "snapshot").collect()
}

/// The newest committed snapshot of `source`.
pub fn latest(kv: &dyn KvStore, source: &str) -> Result<Option<Snapshot>, StoreError> {
    let mut newest = None;
    for s in Records::new(kv, TAG_SNAPSHOT, parse_snapshot, "snapshot") {
        let s = s?;
        if s.source == source {
            newest = Some(s);
        }
    }
    Ok(newest)
}

/// Deletes the tree of a snapshot that was never committed (an abandoned job), one page per
/// batch so memory stays bounded. A committed snapshot's tree is left alone (with a WARN):
/// deleting it would leave a visible version with no files.
pub fn drop_files(kv: &dyn KvStore, snapshot: SnapshotId) -> Result<(), StoreError> {
    if kv
        .get(CF, Key::new(TAG_SNAPSHOT).u64(snapshot.0).as_bytes())?
        .is_some()
    {
        tracing::warn!(
            snapshot = snapshot.0,
            "not dropping the tree of a committed snapshot"
        );
        return Ok(());
    }
    for page in kv.pages(CF, &snapshot_prefix(snapshot), PAGE) {
        let mut batch = Batch::new();
        for (k, _) in page? {
            batch.delete(CF, k);
        }
        kv.write(batch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemStore, RocksStore};

    fn chunk(n: u32) -> ChunkId {
        let mut id = [0; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        id[31] = 0xc4;
        ChunkId(id)
    }

    fn block_id(n: u32) -> BlockId {
        let mut id = [0xb1; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        BlockId(id)
    }

    fn node(i: u8) -> NodeId {
        NodeId::from_bytes([i; 16])
    }

    fn regular(path: &str, n_chunks: u32) -> FileEntry {
        FileEntry {
            path: path.as_bytes().to_vec(),
            kind: FileKind::File,
            mode: 0o644,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: -5,
            inode: 42 + u64::from(n_chunks),
            size: u64::from(n_chunks) * 1_000_000 + 7,
            chunks: (0..n_chunks).map(chunk).collect(),
            target: Vec::new(),
        }
    }

    fn entries() -> Vec<FileEntry> {
        vec![
            FileEntry {
                path: Vec::new(),
                kind: FileKind::Dir,
                mode: 0o755,
                mtime_ns: 1,
                ctime_ns: 2,
                inode: 3,
                size: 0,
                chunks: Vec::new(),
                target: Vec::new(),
            },
            regular("a/big.bin", 5),
            regular("a/empty", 0),
            FileEntry {
                path: b"a/link\xff".to_vec(),
                kind: FileKind::Symlink,
                mode: 0o777,
                mtime_ns: 9,
                ctime_ns: 9,
                inode: 10,
                size: 0,
                chunks: Vec::new(),
                target: b"../elsewhere".to_vec(),
            },
        ]
    }

    fn block_entry(n: u32) -> BlockEntry {
        BlockEntry {
            id: block_id(n),
            signed_manifest: vec![n as u8; 150],
            data_shards: 4,
            parity_shards: 2,
            plain_len: 4_000_000 + u64::from(n),
            fragments: (0..6u8)
                .map(|i| FragmentPlace {
                    supplier: (i != 3).then(|| node(i)),
                    size: 1_000_100,
                    blake3: [i ^ n as u8; 32],
                })
                .collect(),
        }
    }

    fn snapshot(id: u64, source: &str) -> Snapshot {
        Snapshot {
            id: SnapshotId(id),
            source: source.to_string(),
            root: format!("/home/u/{source}").into_bytes(),
            started_at: 1_700_000_000 + id,
            finished_at: 1_700_000_100 + id,
            files: 10 + id,
            dirs: 2,
            symlinks: 1,
            bytes: 12_345,
            new_bytes: 678,
            new_blocks: 1,
            skipped: vec![Skipped {
                path: b"a/locked".to_vec(),
                reason: "permission denied".into(),
            }],
        }
    }

    fn all_files(kv: &dyn KvStore, s: SnapshotId) -> Vec<FileEntry> {
        files(kv, s).collect::<Result<_, _>>().expect("files read")
    }

    #[test]
    fn file_entries_round_trip_per_snapshot() {
        let kv = MemStore::new();
        let mut b = Batch::new();
        for e in entries() {
            put_file(&mut b, SnapshotId(1), &e);
        }
        // A neighbour snapshot whose entries must not show up under snapshot 1.
        put_file(&mut b, SnapshotId(2), &regular("a/big.bin", 1));
        put_file(&mut b, SnapshotId(256), &regular("z", 1));
        kv.write(b).expect("write");
        for e in entries() {
            assert_eq!(
                file(&kv, SnapshotId(1), &e.path).expect("file"),
                Some(e.clone())
            );
        }
        assert_eq!(
            file(&kv, SnapshotId(2), b"a/big.bin").expect("file"),
            Some(regular("a/big.bin", 1))
        );
        assert_eq!(file(&kv, SnapshotId(1), b"nope").expect("file"), None);
        assert_eq!(file(&kv, SnapshotId(3), b"a/big.bin").expect("file"), None);
        assert_eq!(all_files(&kv, SnapshotId(1)), entries());
        assert_eq!(all_files(&kv, SnapshotId(2)), vec![regular("a/big.bin", 1)]);
        assert!(all_files(&kv, SnapshotId(3)).is_empty());
    }

    #[test]
    fn files_page_in_path_order() {
        let kv = MemStore::new();
        let n = PAGE * 2 + 17;
        let mut b = Batch::new();
        // Written in reverse; read back in byte order of the path.
        for i in (0..n).rev() {
            put_file(&mut b, SnapshotId(7), &regular(&format!("d/{i:05}"), 2));
        }
        put_file(&mut b, SnapshotId(8), &regular("d/00000", 1));
        kv.write(b).expect("write");
        let got = all_files(&kv, SnapshotId(7));
        assert_eq!(got.len(), n);
        for (i, e) in got.iter().enumerate() {
            assert_eq!(e, &regular(&format!("d/{i:05}"), 2));
        }
    }

    #[test]
    fn a_chunk_list_not_a_multiple_of_32_is_refused() {
        let mut record = records::FileRecord {
            kind: records::FileKind::File as i32,
            chunks: vec![7; 64],
            ..Default::default()
        };
        let ok = decode_file(b"f", &codec::encode(&record)).expect("64 bytes: 2 chunks");
        assert_eq!(ok.chunks, vec![ChunkId([7; 32]); 2]);
        for len in [1, 31, 33, 65] {
            record.chunks = vec![7; len];
            assert!(matches!(
                decode_file(b"f", &codec::encode(&record)),
                Err(CatalogError::ChunkList(l)) if l == len
            ));
        }
        record.chunks.clear();
        for kind in [0, 4, -1] {
            record.kind = kind;
            assert!(matches!(
                decode_file(b"f", &codec::encode(&record)),
                Err(CatalogError::FileKind(k)) if k == kind
            ));
        }
    }

    #[test]
    fn unreadable_entries_are_skipped_not_fatal() {
        let kv = MemStore::new();
        let mut b = Batch::new();
        for e in entries() {
            put_file(&mut b, SnapshotId(1), &e);
        }
        kv.write(b).expect("write");
        let bad = records::FileRecord {
            kind: records::FileKind::File as i32,
            chunks: vec![1; 40],
            ..Default::default()
        };
        kv.put(CF, &file_key(SnapshotId(1), b"a/bad"), &codec::encode(&bad))
            .expect("put");
        kv.put(CF, &file_key(SnapshotId(1), b"a/garbage"), b"\x02garbage")
            .expect("put");
        assert_eq!(all_files(&kv, SnapshotId(1)), entries());
        assert_eq!(file(&kv, SnapshotId(1), b"a/bad").expect("file"), None);
        // A block with a malformed supplier id, and a key of the wrong shape.
        let mut b = Batch::new();
        put_block(&mut b, &block_entry(1));
        put_block(&mut b, &block_entry(2));
        kv.write(b).expect("write");
        let mut broken = records::BlockRecord::default();
        broken.fragments.push(records::FragmentPlaceRecord {
            supplier: vec![1; 15],
            size: 1,
            blake3: vec![0; 32],
        });
        kv.put(
            CF,
            Key::new(TAG_BLOCK).bytes(&block_id(2).0).as_bytes(),
            &codec::encode(&broken),
        )
        .expect("put");
        kv.put(CF, b"b-short", &encode_block(&block_entry(3)))
            .expect("put");
        let got: Vec<_> = blocks(&kv).collect::<Result<_, _>>().expect("blocks");
        assert_eq!(got, vec![block_entry(1)]);
        assert_eq!(block(&kv, &block_id(2)).expect("block"), None);
        kv.put(
            CF,
            Key::new(TAG_CHUNK).bytes(&chunk(1).0).as_bytes(),
            &codec::encode(&records::ChunkRecord { block: vec![1; 31] }),
        )
        .expect("put");
        assert_eq!(chunk_block(&kv, &chunk(1)).expect("chunk"), None);
    }

    #[test]
    fn chunks_and_blocks_round_trip() {
        let kv = MemStore::new();
        assert_eq!(chunk_block(&kv, &chunk(1)).expect("chunk"), None);
        assert_eq!(block(&kv, &block_id(1)).expect("block"), None);
        let mut b = Batch::new();
        put_chunk(&mut b, &chunk(1), &block_id(9));
        put_chunk(&mut b, &chunk(2), &block_id(9));
        put_chunk(&mut b, &chunk(3), &block_id(10));
        for n in [300, 1, 2] {
            put_block(&mut b, &block_entry(n));
        }
        kv.write(b).expect("write");
        assert_eq!(
            chunk_block(&kv, &chunk(1)).expect("chunk"),
            Some(block_id(9))
        );
        assert_eq!(
            chunk_block(&kv, &chunk(3)).expect("chunk"),
            Some(block_id(10))
        );
        assert_eq!(chunk_block(&kv, &chunk(4)).expect("chunk"), None);
        let b1 = block(&kv, &block_id(1)).expect("block").expect("present");
        assert_eq!(b1, block_entry(1));
        assert_eq!(b1.placed(), 5, "position 3 waits in the outbox");
        assert_eq!(b1.fragments[3].supplier, None);
        let all: Vec<_> = blocks(&kv).collect::<Result<_, _>>().expect("blocks");
        assert_eq!(all, vec![block_entry(1), block_entry(2), block_entry(300)]);
        // Replacing a block records a fragment placed later.
        let mut placed = block_entry(1);
        placed.fragments[3].supplier = Some(node(30));
        let mut b = Batch::new();
        put_block(&mut b, &placed);
        kv.write(b).expect("write");
        assert_eq!(block(&kv, &block_id(1)).expect("block"), Some(placed));
    }

    #[test]
    fn many_blocks_page() {
        let kv = MemStore::new();
        let n = PAGE as u32 + 3;
        let mut b = Batch::new();
        for i in 0..n {
            put_block(&mut b, &block_entry(i));
        }
        kv.write(b).expect("write");
        let ids: Vec<BlockId> = blocks(&kv).map(|b| b.expect("block").id).collect();
        assert_eq!(ids, (0..n).map(block_id).collect::<Vec<_>>());
    }

    #[test]
    fn snapshots_are_invisible_until_committed_and_latest_is_per_source() {
        let kv = MemStore::new();
        assert!(snapshots(&kv).expect("snapshots").is_empty());
        assert_eq!(latest(&kv, "docs").expect("latest"), None);
        let mut b = Batch::new();
        put_file(&mut b, SnapshotId(1), &regular("x", 1));
        kv.write(b).expect("write");
        assert!(
            snapshots(&kv).expect("snapshots").is_empty(),
            "a tree alone is not a snapshot"
        );
        assert_eq!(latest(&kv, "docs").expect("latest"), None);

        let mut b = Batch::new();
        commit_snapshot(&mut b, &snapshot(1, "docs"));
        kv.write(b).expect("write");
        assert_eq!(
            snapshots(&kv).expect("snapshots"),
            vec![snapshot(1, "docs")]
        );
        // Committed out of order, ids past one byte: listed in numeric id order.
        let mut b = Batch::new();
        for (id, source) in [(300, "docs"), (2, "photos"), (5, "docs"), (400, "photos")] {
            commit_snapshot(&mut b, &snapshot(id, source));
        }
        kv.write(b).expect("write");
        let ids: Vec<u64> = snapshots(&kv)
            .expect("snapshots")
            .iter()
            .map(|s| s.id.0)
            .collect();
        assert_eq!(ids, vec![1, 2, 5, 300, 400]);
        assert_eq!(
            latest(&kv, "docs").expect("latest"),
            Some(snapshot(300, "docs"))
        );
        assert_eq!(
            latest(&kv, "photos").expect("latest"),
            Some(snapshot(400, "photos"))
        );
        assert_eq!(latest(&kv, "doc").expect("latest"), None);
    }

    #[test]
    fn allocate_counts_up_and_recovers_without_its_counter() {
        let kv = MemStore::new();
        assert_eq!(allocate_snapshot(&kv).expect("id"), SnapshotId(1));
        assert_eq!(allocate_snapshot(&kv).expect("id"), SnapshotId(2));
        // An id allocated and abandoned is not handed out again.
        assert_eq!(allocate_snapshot(&kv).expect("id"), SnapshotId(3));

        // Lost counter: the next id is above every id the catalog mentions.
        let mut b = Batch::new();
        commit_snapshot(&mut b, &snapshot(10, "docs"));
        put_file(&mut b, SnapshotId(700), &regular("x", 1));
        put_file(&mut b, SnapshotId(12), &regular("x", 1));
        kv.write(b).expect("write");
        kv.delete(CF, COUNTER_KEY).expect("delete");
        assert_eq!(allocate_snapshot(&kv).expect("id"), SnapshotId(701));
        // Unreadable counter, a running job highest of all.
        let mut b = Batch::new();
        jobs::put_job(
            &mut b,
            &jobs::JobRecord {
                snapshot: SnapshotId(900),
                source: "docs".into(),
                root: b"/r".to_vec(),
                started_at: 1,
            },
        );
        kv.write(b).expect("write");
        kv.put(CF, COUNTER_KEY, b"\x02garbage").expect("put");
        assert_eq!(allocate_snapshot(&kv).expect("id"), SnapshotId(901));
        assert_eq!(allocate_snapshot(&kv).expect("id"), SnapshotId(902));
    }

    #[test]
    fn drop_files_removes_only_an_uncommitted_tree() {
        let kv = MemStore::new();
        let mut b = Batch::new();
        for i in 0..(PAGE + 5) {
            put_file(&mut b, SnapshotId(4), &regular(&format!("{i}"), 1));
        }
        for e in entries() {
            put_file(&mut b, SnapshotId(3), &e);
            put_file(&mut b, SnapshotId(5), &e);
        }
        commit_snapshot(&mut b, &snapshot(5, "docs"));
        kv.write(b).expect("write");
        drop_files(&kv, SnapshotId(4)).expect("drop");
        assert!(all_files(&kv, SnapshotId(4)).is_empty());
        assert_eq!(all_files(&kv, SnapshotId(3)), entries());
        drop_files(&kv, SnapshotId(5)).expect("drop");
        assert_eq!(
            all_files(&kv, SnapshotId(5)),
            entries(),
            "a committed tree stays"
        );
    }

    #[test]
    fn on_rocksdb_ids_are_never_reused_after_reopen_and_everything_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = {
            let kv = RocksStore::open(dir.path()).expect("open");
            let a = allocate_snapshot(&kv).expect("id");
            let b = allocate_snapshot(&kv).expect("id");
            assert!(b > a);
            let mut batch = Batch::new();
            for e in entries() {
                put_file(&mut batch, a, &e);
            }
            put_chunk(&mut batch, &chunk(1), &block_id(1));
            put_block(&mut batch, &block_entry(1));
            commit_snapshot(&mut batch, &snapshot(a.0, "docs"));
            kv.write(batch).expect("write");
            // `b` is abandoned without a trace but the counter.
            b
        };
        let kv = RocksStore::open(dir.path()).expect("reopen");
        let c = allocate_snapshot(&kv).expect("id");
        assert!(c > first, "{c:?} reuses an id up to {first:?}");
        let committed = snapshots(&kv).expect("snapshots");
        assert_eq!(committed.len(), 1);
        assert_eq!(all_files(&kv, committed[0].id), entries());
        assert_eq!(
            chunk_block(&kv, &chunk(1)).expect("chunk"),
            Some(block_id(1))
        );
        assert_eq!(
            block(&kv, &block_id(1)).expect("block"),
            Some(block_entry(1))
        );
    }
}
