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
//! | `r<chunk id 32>` | empty: the chunk was stored again in another block (the stored catalog's head carries its entry, see [`segments`]) |
//!
//! Invariants:
//! - A snapshot is visible (in [`snapshots`], [`latest`]) only once its `s` record is written,
//!   and [`commit_snapshot`] is meant to go in the same batch as the tree's last entries, so a
//!   crash never leaves a visible snapshot with half a tree.
//! - Snapshot ids are never reused: [`allocate_snapshot`] writes the counter before it returns.
//! - Readers skip an unreadable record with a WARN rather than failing the whole catalog; a
//!   missing chunk or block then costs a re-upload, never a wrong restore.
//! - Retention ([`apply_prune`]) removes a snapshot's record before its tree, and the chunk
//!   entries naming a block before the block: no chunk entry ever names a missing block, and
//!   what a crash leaves half-removed is found again by [`plan_prune`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::codec::{self, Key, KeyReader, KvPages, Pages, records};
use super::{Batch, Cf, KeyValue, KvStore, StoreError, jobs, retention};
use crate::crypto::derive::BlockKey;
use crate::crypto::identity::NodeId;
use crate::data::{BlockId, ChunkId};
use chacha20poly1305::{AeadInPlace, Tag, XNonce};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

pub mod segments;
pub mod tree;

/// A snapshot's number: allocated in increasing order, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(pub u64);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FileKind {
    #[default]
    File,
    Dir,
    Symlink,
    Fifo,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    /// What a person calls it, for messages.
    pub fn name(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Dir => "directory",
            FileKind::Symlink => "symlink",
            FileKind::Fifo => "FIFO",
            FileKind::CharDevice => "character device",
            FileKind::BlockDevice => "block device",
        }
    }
}

/// Extended attributes: name (with its namespace) → value, in name order.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Who owned an entry on the backed-up host: the numbers always, the names where that host had
/// them (a restore as root prefers the name when the target host knows it, as tar does).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// Empty: the host had no user for `uid`.
    pub user: Vec<u8>,
    /// Empty: the host had no group for `gid`.
    pub group: Vec<u8>,
}

/// One entry of a snapshot's tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// `None` in entries recorded before catalog format 2: ownership was not recorded then.
    pub owner: Option<Owner>,
    /// `st_dev` and `st_nlink`: a file with `links > 1` is the same file as every other entry of
    /// the snapshot with its `(dev, inode)` (a hard link), restored as a link.
    pub dev: u64,
    pub links: u64,
    /// A character or block device's `st_rdev`.
    pub rdev: u64,
    /// Extended attributes, name (with its namespace) → value, in name order. POSIX ACLs are the
    /// `system.posix_acl_access` and `system.posix_acl_default` attributes.
    pub xattrs: Xattrs,
    /// A sparse file's holes, `(offset, length)`, in offset order. `chunks` still cover the whole
    /// content (a hole reads as zeros); a restore leaves these ranges unwritten.
    pub holes: Vec<(u64, u64)>,
}

impl FileEntry {
    /// The hard-link identity: `Some` for a regular file with more than one name.
    pub fn link_identity(&self) -> Option<(u64, u64)> {
        (self.kind == FileKind::File && self.links > 1).then_some((self.dev, self.inode))
    }
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
    /// The layout the block was made with: reading or rebuilding it needs its `k`, whatever
    /// the node's layout for new snapshots is now.
    pub fn layout(&self) -> Result<crate::data::Layout, crate::data::DataError> {
        let (Ok(k), Ok(m)) = (
            u8::try_from(self.data_shards),
            u8::try_from(self.parity_shards),
        ) else {
            return Err(crate::data::DataError::Params(
                "a block's layout over 255 fragments",
            ));
        };
        crate::data::Layout::new(k, m)
    }

    pub fn placed(&self) -> usize {
        self.fragments
            .iter()
            .filter(|f| f.supplier.is_some())
            .count()
    }
}

/// A file the job could not back up, and why (named in the job's result).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    pub path: Vec<u8>,
    pub reason: String,
    /// Not backed up by design (a socket): listed, but not an error of the backup.
    pub by_design: bool,
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
const TAG_REMAPPED: &[u8] = b"r";
const COUNTER_KEY: &[u8] = b"n";
const FORMAT_KEY: &[u8] = b"v";
/// The catalog format this code writes. 1 (no `v` record): before issue 19. 2: ownership, hard
/// links, extended attributes, FIFOs and devices, holes; socket skips marked by design.
pub const FORMAT: u32 = 2;
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
    #[error(
        "the catalog is in format {0}, newer than this bitdust reads ({FORMAT}): upgrade bitdust"
    )]
    NewerFormat(u32),
    #[error("not a catalog export (bad magic)")]
    ExportMagic,
    #[error("catalog export format version {0} is not supported")]
    ExportVersion(u8),
    #[error("catalog export is truncated")]
    ExportTruncated,
    #[error("catalog export is corrupt or truncated (checksum mismatch)")]
    ExportChecksum,
    #[error("catalog export is malformed: {0}")]
    ExportFraming(&'static str),
    #[error("reading the stored catalog: {0}")]
    Read(#[from] std::io::Error),
    #[error("recovery record is truncated")]
    RecoveryTruncated,
    #[error("not a recovery record (bad magic)")]
    RecoveryMagic,
    #[error("recovery record format version {0} is not supported")]
    RecoveryVersion(u8),
    #[error("recovery record is not signed by this owner (or was altered)")]
    RecoverySignature,
    #[error("recovery record was sealed with another key")]
    RecoveryWrongKey,
    #[error("recovery record failed authentication (corrupted bytes)")]
    RecoveryCorrupt,
    #[error("recovery record content is malformed: {0}")]
    RecoveryMalformed(&'static str),
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
        FileKind::Fifo => records::FileKind::Fifo,
        FileKind::CharDevice => records::FileKind::CharDevice,
        FileKind::BlockDevice => records::FileKind::BlockDevice,
    }
}

fn kind_from_record(kind: i32) -> Result<FileKind, CatalogError> {
    match records::FileKind::try_from(kind) {
        Ok(records::FileKind::File) => Ok(FileKind::File),
        Ok(records::FileKind::Dir) => Ok(FileKind::Dir),
        Ok(records::FileKind::Symlink) => Ok(FileKind::Symlink),
        Ok(records::FileKind::Fifo) => Ok(FileKind::Fifo),
        Ok(records::FileKind::CharDevice) => Ok(FileKind::CharDevice),
        Ok(records::FileKind::BlockDevice) => Ok(FileKind::BlockDevice),
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
        owner: entry.owner.as_ref().map(|o| records::Owner {
            uid: o.uid,
            gid: o.gid,
            user: o.user.clone(),
            group: o.group.clone(),
        }),
        dev: entry.dev,
        links: entry.links,
        rdev: entry.rdev,
        xattrs: entry
            .xattrs
            .iter()
            .map(|(name, value)| records::Xattr {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        holes: entry
            .holes
            .iter()
            .flat_map(|&(at, len)| [at, len])
            .collect(),
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
    if !r.holes.len().is_multiple_of(2) {
        return Err(CatalogError::Invalid("holes"));
    }
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
        owner: r.owner.map(|o| Owner {
            uid: o.uid,
            gid: o.gid,
            user: o.user,
            group: o.group,
        }),
        dev: r.dev,
        links: r.links,
        rdev: r.rdev,
        xattrs: r.xattrs.into_iter().map(|x| (x.name, x.value)).collect(),
        holes: r.holes.chunks_exact(2).map(|p| (p[0], p[1])).collect(),
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
                by_design: k.by_design,
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
                by_design: k.by_design,
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

/// The versions restores are reading, with how many restores each: retention keeps them (and
/// so their blocks) meanwhile, as a restore reads the tree from the catalog as it goes. One per
/// node, shared by its restores and its retention.
#[derive(Clone, Debug, Default)]
pub struct ReadPins(std::sync::Arc<Mutex<BTreeMap<SnapshotId, usize>>>);

impl ReadPins {
    /// Keeps `snapshot` from retention until the pin is dropped.
    pub fn pin(&self, snapshot: SnapshotId) -> ReadPin {
        let mut reading = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *reading.entry(snapshot).or_default() += 1;
        ReadPin {
            pins: self.clone(),
            snapshot,
        }
    }

    /// The versions pinned now.
    pub fn pinned(&self) -> BTreeSet<SnapshotId> {
        let reading = self.0.lock().unwrap_or_else(|p| p.into_inner());
        reading.keys().copied().collect()
    }
}

/// A version kept from retention while this is held (see [`ReadPins::pin`]).
#[derive(Debug)]
pub struct ReadPin {
    pins: ReadPins,
    snapshot: SnapshotId,
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        let mut reading = self.pins.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = reading.get_mut(&self.snapshot) {
            *n -= 1;
            if *n == 0 {
                reading.remove(&self.snapshot);
            }
        }
    }
}

/// A new snapshot id, higher than any handed out before. The counter is written (synced) before
/// the id is returned, so a crash right after cannot hand the same id out again. If the counter
/// is missing or unreadable, the next id is found from what the catalog holds (committed
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
    // A store's write is durable when it returns (RocksStore syncs every write), so no flush.
    kv.put(
        CF,
        COUNTER_KEY,
        &codec::encode(&records::SnapshotCounter { last: id.0 }),
    )?;
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
    for id in tree_ids(kv)? {
        highest = highest.max(id.0);
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

/// Marks `chunk`, whose entry names a block that is not stored, as about to be stored again in
/// another block: the tree segments already uploaded name the old block for it, so the stored
/// catalog's head carries its current entry (see [`segments`]). Removed with the chunk's entry.
pub fn mark_remapped(kv: &dyn KvStore, chunk: &ChunkId) -> Result<(), StoreError> {
    kv.put(CF, Key::new(TAG_REMAPPED).bytes(&chunk.0).as_bytes(), b"")
}

/// The block holding `chunk` (`None` if the chunk was never stored, or its record is unreadable:
/// then it is stored again).
pub fn chunk_block(kv: &dyn KvStore, chunk: &ChunkId) -> Result<Option<BlockId>, StoreError> {
    let Some(v) = kv.get(CF, &chunk_key(chunk))? else {
        return Ok(None);
    };
    Ok(parse_chunk(&v))
}

fn chunk_key(chunk: &ChunkId) -> Vec<u8> {
    Key::new(TAG_CHUNK).bytes(&chunk.0).as_bytes().to_vec()
}

fn parse_chunk(v: &[u8]) -> Option<BlockId> {
    let parsed = codec::decode::<records::ChunkRecord>(v)
        .map_err(CatalogError::from)
        .and_then(|r| fixed(&r.block, "block").map(BlockId));
    parsed.inspect_err(|e| warn_skipped("chunk", e)).ok()
}

/// The block of each of `chunks` (sorted by id, distinct; `None` where the index has none),
/// looked up a batch at a time in one sorted multi-get: a whole snapshot's chunks, or a sparse
/// few among millions, cost one pass over the index's blocks they touch, where one lookup per
/// chunk cost most of a 200,000-file restore's plan (and scans of neighbouring runs cost more
/// still on sparse sets).
pub fn chunk_blocks_sorted(
    kv: &dyn KvStore,
    chunks: &[ChunkId],
) -> Result<Vec<Option<BlockId>>, StoreError> {
    // Keys per call: bounds the keys and values held at once.
    const BATCH: usize = 4096;
    let mut out = Vec::with_capacity(chunks.len());
    for batch in chunks.chunks(BATCH) {
        let keys: Vec<Vec<u8>> = batch.iter().map(chunk_key).collect();
        for value in kv.get_sorted(CF, &keys)? {
            out.push(value.and_then(|v| parse_chunk(&v)));
        }
    }
    Ok(out)
}

/// `chunks` sorted and made distinct, each with its block from [`chunk_blocks_sorted`] (`None`
/// where the index has none).
pub fn chunk_blocks_of(
    kv: &dyn KvStore,
    mut chunks: Vec<ChunkId>,
) -> Result<Vec<(ChunkId, Option<BlockId>)>, StoreError> {
    chunks.sort_unstable();
    chunks.dedup();
    let found = chunk_blocks_sorted(kv, &chunks)?;
    Ok(chunks.into_iter().zip(found).collect())
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

// ---- The catalog's format, and its upgrade in place.

/// The format of the catalog in `kv` (1 when it has no format record).
pub fn format(kv: &dyn KvStore) -> Result<u32, CatalogError> {
    match kv.get(CF, FORMAT_KEY)? {
        None => Ok(1),
        Some(v) => Ok(codec::decode::<records::CatalogFormat>(&v)?.version),
    }
}

/// Brings the catalog in `kv` to [`FORMAT`], in place; returns the format it found. Format 1
/// records read as format 2 records whose ownership is unknown (`owner: None`) and that hold no
/// attributes, links or holes, which is what they recorded, so the upgrade writes the format
/// record only. A catalog of a newer format is refused, untouched: this code would drop what it
/// does not know on the next snapshot's export.
pub fn upgrade(kv: &dyn KvStore) -> Result<u32, CatalogError> {
    let found = format(kv)?;
    if found > FORMAT {
        return Err(CatalogError::NewerFormat(found));
    }
    if found < FORMAT {
        let mut batch = Batch::new();
        batch.put(
            CF,
            FORMAT_KEY,
            codec::encode(&records::CatalogFormat { version: FORMAT }),
        );
        kv.write(batch)?;
        tracing::info!(from = found, to = FORMAT, "catalog format upgraded");
    }
    Ok(found)
}

// ---- Export and import: the whole catalog as one byte string (what is sealed and placed on the
// suppliers after each snapshot, and what a recovering node imports).
//
// Format v1:
//   magic "BDCATLG\0" | version u8 = 1
//   entries, in key order: key length u32 BE | key | value length u32 BE | value
//   entry count u64 BE | BLAKE3 of every byte before it (32)
// The checksum makes a cut at an entry boundary, or any flipped byte, visible before a single
// entry is written; the count is a second check on the framing.

const EXPORT_MAGIC: &[u8; 8] = b"BDCATLG\0";
const EXPORT_VERSION: u8 = 1;
const EXPORT_HEADER: usize = EXPORT_MAGIC.len() + 1;
const EXPORT_TRAILER: usize = 8 + 32;
/// Entries per batch while importing, and a byte bound, so a large catalog is never one huge
/// write.
const IMPORT_BATCH_ENTRIES: usize = 1024;
const IMPORT_BATCH_BYTES: usize = 4 << 20;

/// Every entry of `Cf::Catalog`, framed (see above). Read a page at a time.
pub fn export(kv: &dyn KvStore) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(EXPORT_HEADER + EXPORT_TRAILER);
    out.extend_from_slice(EXPORT_MAGIC);
    out.push(EXPORT_VERSION);
    let mut count: u64 = 0;
    for page in kv.pages(CF, b"", PAGE) {
        for (k, v) in page? {
            for field in [&k, &v] {
                let len = u32::try_from(field.len())
                    .map_err(|_| StoreError::Db("a catalog entry is over 4 GiB".into()))?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(field);
            }
            count += 1;
        }
    }
    out.extend_from_slice(&count.to_be_bytes());
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    Ok(out)
}

/// One length-prefixed field off the front of `rest`.
fn take_field<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], CatalogError> {
    let (len, tail) = rest
        .split_first_chunk::<4>()
        .ok_or(CatalogError::ExportFraming("a length runs past the end"))?;
    let len = u32::from_be_bytes(*len) as usize;
    if tail.len() < len {
        return Err(CatalogError::ExportFraming("an entry runs past the end"));
    }
    let (field, tail) = tail.split_at(len);
    *rest = tail;
    Ok(field)
}

/// An export's entry, borrowed from the export.
type Entry<'a> = (&'a [u8], &'a [u8]);

/// Checks the whole framing and returns the entries, borrowed from `bytes`.
fn parse_export(bytes: &[u8]) -> Result<Vec<Entry<'_>>, CatalogError> {
    if bytes.len() < EXPORT_HEADER {
        return Err(if EXPORT_MAGIC.starts_with(bytes) {
            CatalogError::ExportTruncated
        } else {
            CatalogError::ExportMagic
        });
    }
    if &bytes[..EXPORT_MAGIC.len()] != EXPORT_MAGIC {
        return Err(CatalogError::ExportMagic);
    }
    let version = bytes[EXPORT_MAGIC.len()];
    if version != EXPORT_VERSION {
        return Err(CatalogError::ExportVersion(version));
    }
    if bytes.len() < EXPORT_HEADER + EXPORT_TRAILER {
        return Err(CatalogError::ExportTruncated);
    }
    let (covered, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(covered).as_bytes() != sum {
        return Err(CatalogError::ExportChecksum);
    }
    let (body, count) = covered[EXPORT_HEADER..].split_at(covered.len() - EXPORT_HEADER - 8);
    let count = u64::from_be_bytes(fixed(count, "count")?);
    let mut rest = body;
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let k = take_field(&mut rest)?;
        let v = take_field(&mut rest)?;
        if k.is_empty() {
            return Err(CatalogError::ExportFraming("an entry has an empty key"));
        }
        entries.push((k, v));
    }
    if entries.len() as u64 != count {
        return Err(CatalogError::ExportFraming(
            "the entry count does not match the entries",
        ));
    }
    Ok(entries)
}

/// Writes every entry of an export into `Cf::Catalog`, after checking the whole export: a
/// corrupt, truncated or unknown-version export is refused with nothing written. Entries go in
/// bounded batches. The snapshot counter is never lowered: if this store already handed out
/// higher ids, its counter stays. An export of a newer catalog format is refused; an older one
/// is imported as it is and upgraded by [`upgrade`] when the node opens it. Returns the number
/// of entries written.
pub fn import(kv: &dyn KvStore, bytes: &[u8]) -> Result<u64, CatalogError> {
    import_stored(kv, bytes).map(|(written, _)| written)
}

/// [`import`], also saying which tree segments it applied (none for a version-1 export).
pub fn import_stored(
    kv: &dyn KvStore,
    bytes: &[u8],
) -> Result<(u64, Vec<segments::ImportedTree>), CatalogError> {
    import_stored_from(kv, std::io::Cursor::new(bytes))
}

/// [`import_stored`] from a file (or any seekable reader): a stored catalog is read twice
/// (checked whole, then applied), never held whole (but a version-1 export, read whole).
pub fn import_stored_from<R: std::io::Read + std::io::Seek>(
    kv: &dyn KvStore,
    mut stored: R,
) -> Result<(u64, Vec<segments::ImportedTree>), CatalogError> {
    // From its start, wherever the reader is (a file just written is at its end).
    stored.seek(std::io::SeekFrom::Start(0))?;
    let mut header = Vec::with_capacity(EXPORT_HEADER);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(stored.by_ref(), EXPORT_HEADER as u64),
        &mut header,
    )?;
    stored.seek(std::io::SeekFrom::Start(0))?;
    if header.len() == EXPORT_HEADER
        && header.starts_with(EXPORT_MAGIC)
        && header[EXPORT_MAGIC.len()] == segments::SEGMENT_VERSION
    {
        return segments::import(kv, stored);
    }
    let mut bytes = Vec::new();
    stored.read_to_end(&mut bytes)?;
    let entries = parse_export(&bytes)?;
    check_format(&entries)?;
    Ok((write_entries(kv, entries)?, Vec::new()))
}

/// Refuses entries of a newer catalog format than this code reads.
fn check_format(entries: &[Entry<'_>]) -> Result<(), CatalogError> {
    if let Some((_, v)) = entries.iter().find(|(k, _)| *k == FORMAT_KEY) {
        let version = codec::decode::<records::CatalogFormat>(v)?.version;
        if version > FORMAT {
            return Err(CatalogError::NewerFormat(version));
        }
    }
    Ok(())
}

/// Writes imported entries in bounded batches; the snapshot counter only ever goes up.
fn write_entries(kv: &dyn KvStore, entries: Vec<Entry<'_>>) -> Result<u64, StoreError> {
    let mut writes = Writes::new(kv);
    for (k, v) in entries {
        if k == COUNTER_KEY && !raises_counter(kv, v)? {
            continue;
        }
        writes.put(k.to_vec(), v)?;
    }
    writes.flush()?;
    Ok(writes.written)
}

/// An import's puts into `Cf::Catalog`, in batches of at most [`IMPORT_BATCH_ENTRIES`] entries
/// or about [`IMPORT_BATCH_BYTES`].
struct Writes<'a> {
    kv: &'a dyn KvStore,
    batch: Batch,
    bytes: usize,
    written: u64,
}

impl<'a> Writes<'a> {
    fn new(kv: &'a dyn KvStore) -> Self {
        Writes {
            kv,
            batch: Batch::new(),
            bytes: 0,
            written: 0,
        }
    }

    fn put(&mut self, key: Vec<u8>, value: &[u8]) -> Result<(), StoreError> {
        self.bytes += key.len() + value.len();
        self.batch.put(CF, key, value);
        self.written += 1;
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> Result<(), StoreError> {
        if self.batch.ops().len() >= IMPORT_BATCH_ENTRIES || self.bytes >= IMPORT_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        self.bytes = 0;
        if self.batch.is_empty() {
            return Ok(());
        }
        self.kv.write(std::mem::take(&mut self.batch))
    }
}

/// Whether an imported counter should replace this store's: only if it is higher (or this
/// store's is missing or unreadable, in which case `allocate_snapshot` falls back to scanning).
fn raises_counter(kv: &dyn KvStore, imported: &[u8]) -> Result<bool, StoreError> {
    let Some(mine) = kv.get(CF, COUNTER_KEY)? else {
        return Ok(true);
    };
    let last = |v: &[u8]| codec::decode::<records::SnapshotCounter>(v).map(|c| c.last);
    Ok(match (last(&mine), last(imported)) {
        (Ok(mine), Ok(theirs)) => theirs > mine,
        (Err(_), _) => true,
        (Ok(_), Err(_)) => false,
    })
}

// ---- The recovery record: a small signed, encrypted record stored whole on every supplier, so
// that the key file plus any one supplier leads to the catalog and from it to everything.
//
// Format v2 (written since issue 18; v1 is still read):
//   magic "BDRR" | version u8 = 2 | revision u64 BE | created_at u64 BE
//   | key check value (8) | nonce (24)                                    = the header (53 bytes)
//   ciphertext of a `records::RecoveryRecordBody` | Poly1305 tag (16)
//   Ed25519 signature (64) by the owner over RECOVERY_DOMAIN followed by every byte before it
// Format v1 had no revision or date in the header (magic | 1 | key check | nonce, 37 bytes).
// Encrypt-then-sign: a supplier (who has the owner's public key but not the recovery key) can
// check a record comes from the owner, and read its revision, before agreeing to keep it,
// without reading it: so it can refuse a lower revision than it holds. The header is the
// associated data, so its version, revision, date and nonce cannot be swapped either; the body
// repeats the revision and date, and a v2 body that disagrees with its header is refused.

const RECOVERY_MAGIC: &[u8; 4] = b"BDRR";
const RECOVERY_VERSION: u8 = 2;
const RECOVERY_V1: u8 = 1;
const RECOVERY_HEADER_V1: usize = RECOVERY_MAGIC.len() + 1 + 8 + 24;
const RECOVERY_HEADER: usize = RECOVERY_MAGIC.len() + 1 + 8 + 8 + 8 + 24;
const RECOVERY_TAG: usize = 16;
const RECOVERY_SIGNATURE: usize = 64;
/// Keeps a recovery record's signature from being valid as any other signed object of the owner.
/// (The format version is inside the signed bytes, so one domain serves both versions.)
const RECOVERY_DOMAIN: &[u8] = b"bitdust recovery record v1\0";

/// What anyone holding the owner's public key can read of a recovery record: its signed, clear
/// header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub version: u8,
    /// The record's revision; 0 for a v1 record (its revision is inside the ciphertext only),
    /// so any v2 record counts as newer than a v1 one.
    pub revision: u64,
    /// Seconds since the Unix epoch; 0 for a v1 record.
    pub created_at: u64,
}

fn header_len(version: u8) -> usize {
    if version == RECOVERY_V1 {
        RECOVERY_HEADER_V1
    } else {
        RECOVERY_HEADER
    }
}

/// One block of the sealed catalog export, and who holds each of its fragments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogBlock {
    pub id: BlockId,
    pub signed_manifest: Vec<u8>,
    /// One per position; `None` where no supplier holds that fragment.
    pub suppliers: Vec<Option<NodeId>>,
}

/// Where the owner's latest catalog is, and who the suppliers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryRecord {
    /// Increases with every record; the newest one found wins.
    pub revision: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub data_shards: u32,
    pub parity_shards: u32,
    /// The supplier at each position.
    pub suppliers: Vec<(u32, NodeId)>,
    /// The blocks holding the catalog export, in order.
    pub catalog: Vec<CatalogBlock>,
    /// Length of the catalog export.
    pub catalog_len: u64,
    /// The suppliers' signed identities (their cards' contents), for a new machine to reach them.
    pub identities: Vec<Vec<u8>>,
}

fn recovery_body(record: &RecoveryRecord) -> records::RecoveryRecordBody {
    records::RecoveryRecordBody {
        revision: record.revision,
        created_at: record.created_at,
        data_shards: record.data_shards,
        parity_shards: record.parity_shards,
        suppliers: record
            .suppliers
            .iter()
            .map(|(position, node)| records::RecoverySupplier {
                position: *position,
                node: node.as_bytes().to_vec(),
            })
            .collect(),
        catalog: record
            .catalog
            .iter()
            .map(|b| records::RecoveryCatalogBlock {
                id: b.id.0.to_vec(),
                signed_manifest: b.signed_manifest.clone(),
                suppliers: b
                    .suppliers
                    .iter()
                    .map(|s| s.map(|n| n.as_bytes().to_vec()).unwrap_or_default())
                    .collect(),
            })
            .collect(),
        catalog_len: record.catalog_len,
        identities: record.identities.clone(),
    }
}

fn recovery_node(bytes: &[u8]) -> Result<NodeId, CatalogError> {
    NodeId::try_from(bytes).map_err(|_| CatalogError::RecoveryMalformed("a node id"))
}

fn recovery_from_body(body: records::RecoveryRecordBody) -> Result<RecoveryRecord, CatalogError> {
    Ok(RecoveryRecord {
        revision: body.revision,
        created_at: body.created_at,
        data_shards: body.data_shards,
        parity_shards: body.parity_shards,
        suppliers: body
            .suppliers
            .into_iter()
            .map(|s| Ok((s.position, recovery_node(&s.node)?)))
            .collect::<Result<_, CatalogError>>()?,
        catalog: body
            .catalog
            .into_iter()
            .map(|b| {
                Ok(CatalogBlock {
                    id: BlockId(
                        b.id.as_slice()
                            .try_into()
                            .map_err(|_| CatalogError::RecoveryMalformed("a block id"))?,
                    ),
                    signed_manifest: b.signed_manifest,
                    suppliers: b
                        .suppliers
                        .iter()
                        .map(|s| {
                            if s.is_empty() {
                                Ok(None)
                            } else {
                                recovery_node(s).map(Some)
                            }
                        })
                        .collect::<Result<_, CatalogError>>()?,
                })
            })
            .collect::<Result<_, CatalogError>>()?,
        catalog_len: body.catalog_len,
        identities: body.identities,
    })
}

/// Encrypts `record` under `key` (the recovery key), then signs the result with the owner's key.
/// `nonce` must be random (the caller draws it).
pub fn seal_recovery(
    record: &RecoveryRecord,
    key: &BlockKey,
    owner: &SigningKey,
    nonce: [u8; 24],
) -> Vec<u8> {
    let header = RecordHeader {
        version: RECOVERY_VERSION,
        revision: record.revision,
        created_at: record.created_at,
    };
    let body = codec::encode(&recovery_body(record));
    seal_recovery_bytes(&body, &header, key, owner, nonce)
}

fn seal_recovery_bytes(
    body: &[u8],
    header: &RecordHeader,
    key: &BlockKey,
    owner: &SigningKey,
    nonce: [u8; 24],
) -> Vec<u8> {
    let header_len = header_len(header.version);
    let mut out = Vec::with_capacity(header_len + body.len() + RECOVERY_TAG + RECOVERY_SIGNATURE);
    out.extend_from_slice(RECOVERY_MAGIC);
    out.push(header.version);
    if header.version != RECOVERY_V1 {
        out.extend_from_slice(&header.revision.to_be_bytes());
        out.extend_from_slice(&header.created_at.to_be_bytes());
    }
    out.extend_from_slice(&key.check_value());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(body);
    let (header, plain) = out.split_at_mut(header_len);
    // Encryption fails only past the cipher's 256 GiB limit; a recovery record is kilobytes.
    let tag = key
        .cipher()
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), header, plain)
        .expect("a recovery record is far below the cipher's message limit");
    out.extend_from_slice(&tag);
    let signature = owner.sign(&[RECOVERY_DOMAIN, &out[..]].concat());
    out.extend_from_slice(&signature.to_bytes());
    out
}

/// The clear header of a recovery record, unchecked: what a supplier reads when it does not know
/// the customer's signing key (the record is then only ever the customer's own business).
pub fn record_header(bytes: &[u8]) -> Result<RecordHeader, CatalogError> {
    if bytes.len() < RECOVERY_MAGIC.len() + 1 || &bytes[..RECOVERY_MAGIC.len()] != RECOVERY_MAGIC {
        return Err(CatalogError::RecoveryMagic);
    }
    let version = bytes[RECOVERY_MAGIC.len()];
    if version != RECOVERY_VERSION && version != RECOVERY_V1 {
        return Err(CatalogError::RecoveryVersion(version));
    }
    if bytes.len() < header_len(version) + RECOVERY_TAG + RECOVERY_SIGNATURE {
        return Err(CatalogError::RecoveryTruncated);
    }
    Ok(parse_header(version, bytes))
}

/// The header fields of a record whose version and length were checked.
fn parse_header(version: u8, bytes: &[u8]) -> RecordHeader {
    if version == RECOVERY_V1 {
        return RecordHeader {
            version,
            revision: 0,
            created_at: 0,
        };
    }
    let be = |at: usize| {
        let mut n = [0u8; 8];
        n.copy_from_slice(&bytes[at..at + 8]);
        u64::from_be_bytes(n)
    };
    let at = RECOVERY_MAGIC.len() + 1;
    RecordHeader {
        version,
        revision: be(at),
        created_at: be(at + 8),
    }
}

/// Checks that `bytes` is a recovery record signed by `owner`, without decrypting it: what a
/// supplier checks before keeping one. Returns the clear header (revision and date) and the
/// signed part (header and ciphertext).
pub fn verify_recovery<'a>(
    bytes: &'a [u8],
    owner: &VerifyingKey,
) -> Result<(RecordHeader, &'a [u8]), CatalogError> {
    if bytes.len() < RECOVERY_MAGIC.len() + 1 {
        return Err(if RECOVERY_MAGIC.starts_with(bytes) {
            CatalogError::RecoveryTruncated
        } else {
            CatalogError::RecoveryMagic
        });
    }
    if &bytes[..RECOVERY_MAGIC.len()] != RECOVERY_MAGIC {
        return Err(CatalogError::RecoveryMagic);
    }
    let version = bytes[RECOVERY_MAGIC.len()];
    if version != RECOVERY_VERSION && version != RECOVERY_V1 {
        return Err(CatalogError::RecoveryVersion(version));
    }
    if bytes.len() < header_len(version) + RECOVERY_TAG + RECOVERY_SIGNATURE {
        return Err(CatalogError::RecoveryTruncated);
    }
    let (signed, signature) = bytes.split_at(bytes.len() - RECOVERY_SIGNATURE);
    let signature =
        Signature::from_slice(signature).map_err(|_| CatalogError::RecoverySignature)?;
    owner
        .verify_strict(&[RECOVERY_DOMAIN, signed].concat(), &signature)
        .map_err(|_| CatalogError::RecoverySignature)?;
    Ok((parse_header(version, signed), signed))
}

/// Checks the owner's signature, then decrypts and parses a recovery record. Each way it can be
/// wrong has its own error: truncated, another format version, not the owner's signature, sealed
/// under another key, corrupted ciphertext, malformed content (a v2 body whose revision or date
/// differs from its clear header included).
pub fn open_recovery(
    bytes: &[u8],
    key: &BlockKey,
    owner: &VerifyingKey,
) -> Result<RecoveryRecord, CatalogError> {
    let (clear, signed) = verify_recovery(bytes, owner)?;
    let (header, sealed) = signed.split_at(header_len(clear.version));
    let check_at = header.len() - 24 - 8;
    if header[check_at..check_at + 8] != key.check_value() {
        return Err(CatalogError::RecoveryWrongKey);
    }
    let nonce = &header[header.len() - 24..];
    let (ciphertext, tag) = sealed.split_at(sealed.len() - RECOVERY_TAG);
    let mut plain = ciphertext.to_vec();
    key.cipher()
        .decrypt_in_place_detached(
            XNonce::from_slice(nonce),
            header,
            &mut plain,
            Tag::from_slice(tag),
        )
        .map_err(|_| CatalogError::RecoveryCorrupt)?;
    let body: records::RecoveryRecordBody = codec::decode(&plain)
        .map_err(|_| CatalogError::RecoveryMalformed("the record does not decode"))?;
    let record = recovery_from_body(body)?;
    if clear.version != RECOVERY_V1
        && (record.revision != clear.revision || record.created_at != clear.created_at)
    {
        return Err(CatalogError::RecoveryMalformed(
            "the revision or date differs from the signed header",
        ));
    }
    Ok(record)
}

// ---- Retention: which versions and blocks `backup.keep_versions` lets go, and removing them from
// the local catalog. Deleting the blocks' fragments from the suppliers is the caller's job.
//
// What keeps a block: being reachable through a chunk of a tree that is kept. Kept trees are the
// newest `keep_versions` committed snapshots of each source, every running job's tree (a job that
// resumes must find its blocks), and a tree whose snapshot record exists but cannot be read (its
// source is unknown, so it cannot be judged; keeping it costs space, never data).
//
// Dropped trees are the snapshots beyond the newest `keep_versions` of their source, plus trees
// with no snapshot record and no running job: what an abandoned job or an interrupted
// `apply_prune` left behind. Nothing can restore from those, and listing them is what lets an
// interrupted apply be planned and applied again.
//
// Not guarded here: a backup job that dedups against a block between `plan_prune` and
// `apply_prune` (or that cached the block as known earlier) would reference a removed block. The
// caller runs retention while no backup job is in its pipeline.

/// What keeping `keep_versions` newest committed snapshots per source lets go.
#[derive(Debug, Clone, PartialEq)]
pub struct Prune {
    /// Snapshots beyond the newest `keep_versions` of their source, in id order. Also lists trees
    /// left without a snapshot record and without a running job (an abandoned job's, or one an
    /// interrupted [`apply_prune`] had started removing).
    pub snapshots: Vec<SnapshotId>,
    /// Blocks no kept snapshot references (through any of its files' chunks) and not in
    /// `protect`: their fragments can be deleted from the suppliers. In block id order.
    pub blocks: Vec<BlockEntry>,
}

/// A snapshot record's id, from its key.
fn snapshot_key_id(k: &[u8]) -> Option<SnapshotId> {
    let mut r = KeyReader::new(k, TAG_SNAPSHOT)?;
    let id = r.u64()?;
    r.end()?;
    Some(SnapshotId(id))
}

/// Every snapshot id that has a tree (committed or not), in id order: one scan per distinct
/// snapshot, jumping past each one's entries.
fn tree_ids(kv: &dyn KvStore) -> Result<Vec<SnapshotId>, StoreError> {
    let mut ids = Vec::new();
    let mut from = snapshot_prefix(SnapshotId(0));
    loop {
        let rows = kv.scan(CF, TAG_FILE, Some(&from), 1)?;
        let Some((k, _)) = rows.first() else { break };
        match KeyReader::new(k, TAG_FILE).and_then(|mut r| r.u64()) {
            Some(id) => {
                ids.push(SnapshotId(id));
                match id.checked_add(1) {
                    Some(next) => from = snapshot_prefix(SnapshotId(next)),
                    None => break,
                }
            }
            // A key too short to hold a snapshot id: step over it.
            None => from = codec::successor(k),
        }
    }
    Ok(ids)
}

/// The blocks reachable from `trees`. Memory: the referenced block ids, plus the distinct chunk
/// ids of two trees at a time. A chunk the previous tree already resolved is not looked up again,
/// so consecutive versions of one source (listed next to each other) cost about one lookup per
/// chunk that changed.
fn referenced_blocks(
    kv: &dyn KvStore,
    trees: &[SnapshotId],
) -> Result<BTreeSet<BlockId>, StoreError> {
    let mut referenced = BTreeSet::new();
    let mut previous: BTreeSet<ChunkId> = BTreeSet::new();
    for &tree in trees {
        let mut current = BTreeSet::new();
        for entry in files(kv, tree) {
            current.extend(entry?.chunks);
        }
        for chunk in current.difference(&previous) {
            // A chunk with no (readable) index entry cannot be restored through any block, so it
            // keeps none.
            if let Some(block) = chunk_block(kv, chunk)? {
                referenced.insert(block);
            }
        }
        previous = current;
    }
    Ok(referenced)
}

/// keep_versions 0 is treated as 1 (never drop a source's latest version). `protect`: blocks
/// that must stay whatever the snapshots say (the current catalog export's blocks; blocks of an
/// unfinished job). `reading`: versions restores are reading ([`ReadPins`]), kept. Reads the
/// catalog a page at a time; writes nothing.
pub fn plan_prune(
    kv: &dyn KvStore,
    keep_versions: usize,
    protect: &BTreeSet<BlockId>,
    reading: &BTreeSet<SnapshotId>,
) -> Result<Prune, CatalogError> {
    // Committed snapshots in id order (the scan's order: ids are big-endian).
    let mut snapshots = Vec::new();
    for page in kv.pages(CF, TAG_SNAPSHOT, PAGE) {
        for (k, v) in page? {
            let Some(id) = snapshot_key_id(&k) else {
                warn_skipped("snapshot", &CatalogError::Key);
                continue;
            };
            match parse_snapshot(&k, &v) {
                Ok(s) => snapshots.push((id, Some(s.source))),
                Err(e) => {
                    warn_skipped("snapshot", &e);
                    snapshots.push((id, None));
                }
            }
        }
    }
    // A version being restored is read as the restore goes: it stays until the restore ends.
    let mut in_use: BTreeSet<SnapshotId> =
        jobs::jobs(kv)?.into_iter().map(|j| j.snapshot).collect();
    in_use.extend(reading);
    let versions = retention::versions(&snapshots, &tree_ids(kv)?, &in_use, keep_versions);
    let referenced = referenced_blocks(kv, &versions.kept)?;
    let mut blocks_out = Vec::new();
    for entry in blocks(kv) {
        let entry = entry?;
        if retention::block_goes(&entry.id, &referenced, protect) {
            blocks_out.push(entry);
        }
    }
    Ok(Prune {
        snapshots: versions.dropped,
        blocks: blocks_out,
    })
}

/// Removes what `plan` lets go from the local catalog, in batches: the snapshots' records and
/// file entries, the block entries, and every chunk-index entry pointing at a removed block (so
/// a later backup never dedups against a block that no longer exists). Crash-safe order: a
/// snapshot's records and files go before blocks, and an interrupted apply can be planned and
/// applied again.
///
/// In detail: each snapshot's record goes first, alone, so the version disappears whole (never a
/// visible version with half a tree); then its tree, a page per batch (a tree left half-deleted
/// has no record, and the next plan lists it). Then the chunk-index entries pointing at removed
/// blocks, a page per batch, and only then the block entries: a crash in between leaves blocks
/// nothing references, which the next plan lists again, and never a chunk entry pointing at a
/// missing block.
pub fn apply_prune(kv: &dyn KvStore, plan: &Prune) -> Result<(), CatalogError> {
    for snapshot in &plan.snapshots {
        kv.delete(CF, Key::new(TAG_SNAPSHOT).u64(snapshot.0).as_bytes())?;
        for page in kv.pages(CF, &snapshot_prefix(*snapshot), PAGE) {
            let mut batch = Batch::new();
            for (k, _) in page? {
                batch.delete(CF, k);
            }
            kv.write(batch)?;
        }
    }
    if plan.blocks.is_empty() {
        return Ok(());
    }
    let removed: BTreeSet<BlockId> = plan.blocks.iter().map(|b| b.id).collect();
    for page in kv.pages(CF, TAG_CHUNK, PAGE) {
        let mut batch = Batch::new();
        for (k, v) in page? {
            // An unreadable chunk entry is left alone: `chunk_block` already ignores it.
            let points_at = codec::decode::<records::ChunkRecord>(&v)
                .ok()
                .and_then(|r| <[u8; 32]>::try_from(r.block.as_slice()).ok());
            if points_at.is_some_and(|b| removed.contains(&BlockId(b))) {
                batch.delete(CF, [TAG_REMAPPED, &k[TAG_CHUNK.len()..]].concat());
                batch.delete(CF, k);
            }
        }
        if !batch.is_empty() {
            kv.write(batch)?;
        }
    }
    for ids in plan.blocks.chunks(PAGE) {
        let mut batch = Batch::new();
        for entry in ids {
            batch.delete(CF, Key::new(TAG_BLOCK).bytes(&entry.id.0));
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

    #[test]
    fn chunk_blocks_sorted_finds_each_chunk_across_runs_and_says_which_are_missing() {
        let kv = MemStore::new();
        let mut b = Batch::new();
        // Even chunks are in the index (300 of them: more than two runs of a scan).
        for n in 0..300 {
            put_chunk(&mut b, &chunk(2 * n), &block_id(n));
        }
        kv.write(b).expect("write");
        // Dense: every indexed chunk, with odd ones between and one past the end.
        let mut wanted: Vec<ChunkId> = (0..600).map(chunk).collect();
        wanted.push(chunk(5000));
        let found = chunk_blocks_sorted(&kv, &wanted).expect("read");
        assert_eq!(found.len(), wanted.len());
        for (n, block) in (0..600).zip(&found) {
            let expected = (n % 2 == 0).then(|| block_id(n / 2));
            assert_eq!(*block, expected, "chunk {n}");
        }
        assert_eq!(found.last(), Some(&None), "past the end");
        // Sparse: far apart, each in a run of its own; each agrees with a single lookup.
        let sparse = [chunk(1), chunk(256), chunk(257), chunk(598)];
        let found = chunk_blocks_sorted(&kv, &sparse).expect("read");
        let single: Vec<_> = sparse
            .iter()
            .map(|c| chunk_block(&kv, c).expect("read"))
            .collect();
        assert_eq!(found, single);
        assert_eq!(
            found,
            [None, Some(block_id(128)), None, Some(block_id(299))]
        );
        assert_eq!(chunk_blocks_sorted(&kv, &[]).expect("read"), vec![]);
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
            ..FileEntry::default()
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
                ..FileEntry::default()
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
                ..FileEntry::default()
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
                ..Skipped::default()
            }],
        }
    }

    fn all_files(kv: &dyn KvStore, s: SnapshotId) -> Vec<FileEntry> {
        files(kv, s).collect::<Result<_, _>>().expect("files read")
    }

    #[test]
    fn a_newer_catalog_format_is_refused_untouched_and_an_older_one_upgraded() {
        let kv = MemStore::new();
        assert_eq!(format(&kv).expect("format"), 1);
        assert_eq!(
            upgrade(&kv).expect("upgrade"),
            1,
            "reports the format it found"
        );
        assert_eq!(format(&kv).expect("format"), FORMAT);
        let newer = codec::encode(&records::CatalogFormat {
            version: FORMAT + 1,
        });
        let mut batch = Batch::new();
        batch.put(CF, FORMAT_KEY, newer.clone());
        kv.write(batch).expect("write");
        assert!(matches!(upgrade(&kv), Err(CatalogError::NewerFormat(v)) if v == FORMAT + 1));
        assert_eq!(
            kv.get(CF, FORMAT_KEY).expect("get"),
            Some(newer),
            "left as it was"
        );
        // An export of that catalog is refused by an import, with nothing written.
        let export = export(&kv).expect("export");
        let fresh = MemStore::new();
        assert!(matches!(
            import(&fresh, &export),
            Err(CatalogError::NewerFormat(_))
        ));
        assert!(
            fresh
                .pages(CF, b"", 10)
                .next()
                .transpose()
                .expect("scan")
                .is_none_or(|p| p.is_empty())
        );
    }

    /// Every field of format 2 survives the record encoding, and a record without the new
    /// fields (format 1) reads with no owner.
    #[test]
    fn a_format_2_entry_round_trips_and_a_format_1_record_has_no_owner() {
        let entry = FileEntry {
            path: b"dir/f".to_vec(),
            kind: FileKind::CharDevice,
            mode: 0o4755,
            owner: Some(Owner {
                uid: 1234,
                gid: 5678,
                user: b"alice".to_vec(),
                group: Vec::new(),
            }),
            dev: 7,
            links: 3,
            rdev: 0x0103,
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
            holes: vec![(4096, 8192), (1 << 20, 4096)],
            ..FileEntry::default()
        };
        assert_eq!(
            decode_file(b"dir/f", &encode_file(&entry)).expect("decodes"),
            entry
        );
        let old = codec::encode(&records::FileRecord {
            kind: records::FileKind::File as i32,
            mode: 0o644,
            size: 3,
            ..Default::default()
        });
        let read = decode_file(b"f", &old).expect("decodes");
        assert_eq!(
            (read.owner, read.links, read.kind),
            (None, 0, FileKind::File)
        );
        let odd = codec::encode(&records::FileRecord {
            kind: records::FileKind::File as i32,
            holes: vec![1, 2, 3],
            ..Default::default()
        });
        assert!(matches!(
            decode_file(b"f", &odd),
            Err(CatalogError::Invalid("holes"))
        ));
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
        for kind in [0, 7, -1] {
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

    fn catalog_entries(kv: &dyn KvStore) -> Vec<KeyValue> {
        kv.scan(CF, b"", None, usize::MAX).expect("scan")
    }

    /// A catalog with every kind of entry.
    fn filled() -> MemStore {
        let kv = MemStore::new();
        let a = allocate_snapshot(&kv).expect("id");
        let b = allocate_snapshot(&kv).expect("id");
        let mut batch = Batch::new();
        for e in entries() {
            put_file(&mut batch, a, &e);
        }
        for i in 0..600 {
            put_file(&mut batch, b, &regular(&format!("many/{i}"), i % 4));
            put_chunk(&mut batch, &chunk(i), &block_id(i / 10));
        }
        for n in 0..70 {
            put_block(&mut batch, &block_entry(n));
        }
        commit_snapshot(&mut batch, &snapshot(a.0, "docs"));
        commit_snapshot(&mut batch, &snapshot(b.0, "photos"));
        kv.write(batch).expect("write");
        kv
    }

    #[test]
    fn export_then_import_reproduces_every_entry() {
        let src = filled();
        let bytes = export(&src).expect("export");
        let dst = MemStore::new();
        let n = import(&dst, &bytes).expect("import");
        let want = catalog_entries(&src);
        assert_eq!(n, want.len() as u64);
        assert_eq!(catalog_entries(&dst), want);
        assert_eq!(
            export(&dst).expect("export"),
            bytes,
            "export is deterministic"
        );
        // The imported catalog works through the API, its counter included.
        assert_eq!(
            snapshots(&dst).expect("snapshots"),
            snapshots(&src).expect("snapshots")
        );
        assert_eq!(allocate_snapshot(&dst).expect("id"), SnapshotId(3));
        // An empty catalog exports to a valid, empty export.
        let empty = export(&MemStore::new()).expect("export");
        assert_eq!(import(&MemStore::new(), &empty).expect("import"), 0);
    }

    fn assert_refused(bytes: &[u8], what: &str) -> CatalogError {
        let dst = MemStore::new();
        let err = match import(&dst, bytes) {
            Ok(n) => panic!("{what}: accepted ({n} entries)"),
            Err(e) => e,
        };
        assert!(catalog_entries(&dst).is_empty(), "{what}: wrote entries");
        err
    }

    #[test]
    fn a_corrupt_or_truncated_export_is_refused_with_nothing_written() {
        let src = MemStore::new();
        let mut b = Batch::new();
        for e in entries() {
            put_file(&mut b, SnapshotId(1), &e);
        }
        put_block(&mut b, &block_entry(1));
        commit_snapshot(&mut b, &snapshot(1, "docs"));
        src.write(b).expect("write");
        let bytes = export(&src).expect("export");
        // Every single flipped byte and every truncation.
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x04;
            assert_refused(&bad, &format!("flip at {at}"));
        }
        for cut in 0..bytes.len() {
            assert_refused(&bytes[..cut], &format!("cut to {cut}"));
        }
        assert!(matches!(
            assert_refused(&bytes[..bytes.len() - 1], "cut"),
            CatalogError::ExportChecksum
        ));
        assert!(matches!(
            assert_refused(&bytes[..EXPORT_HEADER + 3], "cut"),
            CatalogError::ExportTruncated
        ));
        assert!(matches!(
            assert_refused(&bytes[..3], "cut"),
            CatalogError::ExportTruncated
        ));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(
            assert_refused(&bad, "magic"),
            CatalogError::ExportMagic
        ));
        // Relabelled as a stored catalog of segments (version 2): not one either.
        let mut relabelled = bytes.clone();
        relabelled[EXPORT_MAGIC.len()] = 2;
        assert_refused(&relabelled, "segments");
        let mut bad = bytes.clone();
        bad[EXPORT_MAGIC.len()] = 3;
        assert!(matches!(
            assert_refused(&bad, "version"),
            CatalogError::ExportVersion(3)
        ));
        // A valid checksum over bad framing (a writer's bug): refused too.
        let reframe = |body: &[u8], count: u64| {
            let mut out = EXPORT_MAGIC.to_vec();
            out.push(EXPORT_VERSION);
            out.extend_from_slice(body);
            out.extend_from_slice(&count.to_be_bytes());
            let sum = blake3::hash(&out);
            out.extend_from_slice(sum.as_bytes());
            out
        };
        let body = &bytes[EXPORT_HEADER..bytes.len() - EXPORT_TRAILER];
        let n = catalog_entries(&src).len() as u64;
        assert_eq!(
            import(&MemStore::new(), &reframe(body, n)).expect("valid"),
            n
        );
        for (bad, what) in [
            (reframe(body, n + 1), "count"),
            (reframe(&body[..body.len() - 1], n), "short entry"),
            (reframe(&[body, &[0, 0][..]].concat(), n), "short length"),
            (reframe(&[body, &[0; 8][..]].concat(), n + 1), "empty key"),
        ] {
            assert!(
                matches!(assert_refused(&bad, what), CatalogError::ExportFraming(_)),
                "{what}"
            );
        }
    }

    /// Records the size of every batch written.
    #[derive(Default)]
    struct Batches {
        inner: MemStore,
        sizes: Mutex<Vec<usize>>,
    }

    impl KvStore for Batches {
        fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(cf, key)
        }
        fn write(&self, batch: Batch) -> Result<(), StoreError> {
            self.sizes.lock().expect("lock").push(batch.ops().len());
            self.inner.write(batch)
        }
        fn scan(
            &self,
            cf: Cf,
            prefix: &[u8],
            from: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<KeyValue>, StoreError> {
            self.inner.scan(cf, prefix, from, limit)
        }
        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[test]
    fn import_writes_in_bounded_batches() {
        let src = MemStore::new();
        let mut b = Batch::new();
        for i in 0..(IMPORT_BATCH_ENTRIES as u32 * 2 + 5) {
            put_chunk(&mut b, &chunk(i), &block_id(i));
        }
        src.write(b).expect("write");
        let dst = Batches::default();
        let n = import(&dst, &export(&src).expect("export")).expect("import");
        assert_eq!(n, IMPORT_BATCH_ENTRIES as u64 * 2 + 5);
        let sizes = dst.sizes.lock().expect("lock").clone();
        assert_eq!(sizes, vec![IMPORT_BATCH_ENTRIES, IMPORT_BATCH_ENTRIES, 5]);
    }

    #[test]
    fn import_never_lowers_the_snapshot_counter() {
        let src = filled(); // counter at 2
        let bytes = export(&src).expect("export");
        let dst = MemStore::new();
        for _ in 0..50 {
            allocate_snapshot(&dst).expect("id");
        }
        let n = import(&dst, &bytes).expect("import");
        assert_eq!(n, catalog_entries(&src).len() as u64 - 1, "counter kept");
        assert_eq!(allocate_snapshot(&dst).expect("id"), SnapshotId(51));
        // And a higher imported counter is taken.
        let dst = MemStore::new();
        allocate_snapshot(&dst).expect("id");
        import(&dst, &bytes).expect("import");
        assert_eq!(allocate_snapshot(&dst).expect("id"), SnapshotId(3));
    }

    fn recovery_record() -> RecoveryRecord {
        RecoveryRecord {
            revision: 7,
            created_at: 1_764_000_000,
            data_shards: 4,
            parity_shards: 2,
            suppliers: (0..6u8).map(|i| (u32::from(i), node(i + 1))).collect(),
            catalog: vec![
                CatalogBlock {
                    id: block_id(1),
                    signed_manifest: b"MANIFEST-ONE".repeat(10),
                    suppliers: (0..6u8).map(|i| Some(node(i + 1))).collect(),
                },
                CatalogBlock {
                    id: block_id(2),
                    signed_manifest: b"MANIFEST-TWO".repeat(10),
                    suppliers: (0..6u8).map(|i| (i != 2).then(|| node(i + 1))).collect(),
                },
            ],
            catalog_len: 5_000_123,
            identities: vec![b"a signed identity".to_vec()],
        }
    }

    fn owner(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    /// Re-signs altered bytes with the owner's key: what only the owner (or a bug) could make.
    fn resign(bytes: &[u8], owner: &SigningKey) -> Vec<u8> {
        let mut out = bytes[..bytes.len() - RECOVERY_SIGNATURE].to_vec();
        let signature = owner.sign(&[RECOVERY_DOMAIN, &out[..]].concat());
        out.extend_from_slice(&signature.to_bytes());
        out
    }

    #[test]
    fn recovery_record_round_trips_and_a_supplier_can_check_it_without_the_key() {
        let key = BlockKey::from_bytes([5; 32]);
        let sealed = seal_recovery(&recovery_record(), &key, &owner(1), [9; 24]);
        assert_eq!(
            open_recovery(&sealed, &key, &owner(1).verifying_key()).expect("opens"),
            recovery_record()
        );
        // Encrypted: nothing of the content shows.
        assert!(!sealed.windows(8).any(|w| w == b"MANIFEST"));
        assert!(!sealed.windows(16).any(|w| w == node(1).as_bytes()));
        verify_recovery(&sealed, &owner(1).verifying_key()).expect("the owner's");
        assert!(matches!(
            verify_recovery(&sealed, &owner(2).verifying_key()),
            Err(CatalogError::RecoverySignature)
        ));
        // A fresh nonce, a different ciphertext.
        let again = seal_recovery(&recovery_record(), &key, &owner(1), [8; 24]);
        assert_ne!(again[RECOVERY_HEADER..], sealed[RECOVERY_HEADER..]);
    }

    #[test]
    fn each_tampering_of_a_recovery_record_is_refused_with_its_own_error() {
        let key = BlockKey::from_bytes([5; 32]);
        let owner1 = owner(1);
        let public = owner1.verifying_key();
        let sealed = seal_recovery(&recovery_record(), &key, &owner1, [9; 24]);
        let open = |b: &[u8]| open_recovery(b, &key, &public);

        // Any flipped byte anywhere is refused.
        for at in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[at] ^= 0x20;
            assert!(open(&bad).is_err(), "flip at {at} accepted");
        }
        let mut bad = sealed.clone();
        bad[RECOVERY_HEADER + 3] ^= 1;
        assert!(
            matches!(open(&bad), Err(CatalogError::RecoverySignature)),
            "ciphertext"
        );
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(
            matches!(open(&bad), Err(CatalogError::RecoverySignature)),
            "signature"
        );
        assert!(matches!(
            open_recovery(&sealed, &BlockKey::from_bytes([6; 32]), &public),
            Err(CatalogError::RecoveryWrongKey)
        ));
        assert!(matches!(
            open_recovery(&sealed, &key, &owner(2).verifying_key()),
            Err(CatalogError::RecoverySignature)
        ));
        // Another owner sealing with our key is not us either.
        let forged = seal_recovery(&recovery_record(), &key, &owner(2), [9; 24]);
        assert!(matches!(
            open(&forged),
            Err(CatalogError::RecoverySignature)
        ));
        // Too short to hold a header, a tag and a signature (a cut inside the magic included).
        for cut in 0..RECOVERY_HEADER + RECOVERY_TAG + RECOVERY_SIGNATURE {
            assert!(
                matches!(open(&sealed[..cut]), Err(CatalogError::RecoveryTruncated)),
                "cut to {cut}"
            );
        }
        // Long enough, but the signature no longer covers what is left.
        for cut in [
            RECOVERY_HEADER + RECOVERY_TAG + RECOVERY_SIGNATURE,
            sealed.len() - 1,
        ] {
            assert!(matches!(
                open(&sealed[..cut]),
                Err(CatalogError::RecoverySignature)
            ));
        }
        let mut bad = sealed.clone();
        bad[RECOVERY_MAGIC.len()] = 3;
        assert!(matches!(open(&bad), Err(CatalogError::RecoveryVersion(3))));
        let mut bad = sealed.clone();
        bad[0] = b'X';
        assert!(matches!(open(&bad), Err(CatalogError::RecoveryMagic)));

        // Past the signature (bytes only the owner could sign): authentication still holds.
        let mut bad = sealed.clone();
        bad[RECOVERY_HEADER + 3] ^= 1;
        assert!(matches!(
            open(&resign(&bad, &owner1)),
            Err(CatalogError::RecoveryCorrupt)
        ));
        // Sealed under another key that copies our key's check value.
        let mut bad = seal_recovery(
            &recovery_record(),
            &BlockKey::from_bytes([6; 32]),
            &owner1,
            [9; 24],
        );
        bad[RECOVERY_HEADER - 32..RECOVERY_HEADER - 24].copy_from_slice(&key.check_value());
        assert!(matches!(
            open(&resign(&bad, &owner1)),
            Err(CatalogError::RecoveryCorrupt)
        ));
        // Authentic but malformed content: a node id of 15 bytes, a body that is not a record.
        let mut body = recovery_body(&recovery_record());
        body.suppliers[0].node.pop();
        let header = RecordHeader {
            version: RECOVERY_VERSION,
            revision: 7,
            created_at: 1_764_000_000,
        };
        let bad = seal_recovery_bytes(&codec::encode(&body), &header, &key, &owner1, [1; 24]);
        assert!(matches!(
            open(&bad),
            Err(CatalogError::RecoveryMalformed(_))
        ));
        let bad = seal_recovery_bytes(b"\x02garbage", &header, &key, &owner1, [1; 24]);
        assert!(matches!(
            open(&bad),
            Err(CatalogError::RecoveryMalformed(_))
        ));
    }

    #[test]
    fn a_supplier_reads_the_revision_and_date_in_the_clear_but_cannot_change_them() {
        let key = BlockKey::from_bytes([5; 32]);
        let owner1 = owner(1);
        let public = owner1.verifying_key();
        let sealed = seal_recovery(&recovery_record(), &key, &owner1, [9; 24]);
        let (header, _) = verify_recovery(&sealed, &public).expect("the owner's");
        assert_eq!(
            header,
            RecordHeader {
                version: 2,
                revision: 7,
                created_at: 1_764_000_000
            }
        );
        // Raising the revision breaks the signature; only the owner could re-sign it...
        let mut raised = sealed.clone();
        raised[5 + 7] = 8;
        assert!(matches!(
            verify_recovery(&raised, &public),
            Err(CatalogError::RecoverySignature)
        ));
        // ...and a re-signed header that disagrees with the sealed body is refused at open
        // (the header is the AEAD's associated data, so the body does not even decrypt).
        assert!(open_recovery(&resign(&raised, &owner1), &key, &public).is_err());
        // A header that claims what the body does not (signed and sealed so by the owner).
        let lying = RecordHeader {
            version: 2,
            revision: 9,
            created_at: 1_764_000_000,
        };
        let body = codec::encode(&recovery_body(&recovery_record()));
        let bad = seal_recovery_bytes(&body, &lying, &key, &owner1, [1; 24]);
        assert_eq!(
            verify_recovery(&bad, &public).expect("signed").0.revision,
            9
        );
        assert!(matches!(
            open_recovery(&bad, &key, &public),
            Err(CatalogError::RecoveryMalformed(_))
        ));
    }

    #[test]
    fn a_v1_record_still_opens_and_counts_as_revision_0_to_a_supplier() {
        let key = BlockKey::from_bytes([5; 32]);
        let owner1 = owner(1);
        let public = owner1.verifying_key();
        let v1 = RecordHeader {
            version: 1,
            revision: 0,
            created_at: 0,
        };
        let body = codec::encode(&recovery_body(&recovery_record()));
        let sealed = seal_recovery_bytes(&body, &v1, &key, &owner1, [9; 24]);
        assert_eq!(sealed.len(), RECOVERY_HEADER_V1 + body.len() + 16 + 64);
        assert_eq!(verify_recovery(&sealed, &public).expect("signed").0, v1);
        assert_eq!(
            open_recovery(&sealed, &key, &public).expect("opens"),
            recovery_record()
        );
    }

    /// PROTOCOL.md's vector (`recovery_record` in test-vectors.json): the same inputs seal to
    /// the same bytes, and its clear header says what the vector says.
    #[test]
    fn the_recovery_record_test_vector_holds() {
        let vectors: serde_json::Value =
            serde_json::from_str(include_str!("../../proto/test-vectors.json")).expect("json");
        let v = &vectors["recovery_record"];
        let key = BlockKey::from_bytes([5; 32]);
        let owner1 = owner(1);
        let record = RecoveryRecord {
            revision: 42,
            created_at: 1_765_000_000,
            data_shards: 2,
            parity_shards: 1,
            suppliers: vec![(0, node(1)), (1, node(2)), (2, node(3))],
            catalog: vec![],
            catalog_len: 0,
            identities: vec![],
        };
        let sealed = seal_recovery(&record, &key, &owner1, [9; 24]);
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            v["sealed"].as_str(),
            Some(hex(&sealed).as_str()),
            "sealed {}",
            hex(&sealed)
        );
        assert_eq!(
            v["header"].as_str(),
            Some(hex(&sealed[..RECOVERY_HEADER]).as_str())
        );
        assert_eq!(v["revision"].as_u64(), Some(42));
        assert_eq!(
            v["owner_public"].as_str(),
            Some(hex(owner1.verifying_key().as_bytes()).as_str())
        );
        let (header, _) = verify_recovery(&sealed, &owner1.verifying_key()).expect("signed");
        assert_eq!(header.revision, 42);
    }
}

#[cfg(test)]
mod prune_tests {
    use super::*;
    use crate::store::MemStore;

    fn chunk(n: u32) -> ChunkId {
        let mut id = [0xc4; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        ChunkId(id)
    }

    fn block_id(n: u32) -> BlockId {
        let mut id = [0xb1; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        BlockId(id)
    }

    fn block_entry(n: u32) -> BlockEntry {
        BlockEntry {
            id: block_id(n),
            signed_manifest: vec![n as u8; 20],
            data_shards: 4,
            parity_shards: 2,
            plain_len: 1000,
            fragments: (0..6u8)
                .map(|i| FragmentPlace {
                    supplier: Some(NodeId::from_bytes([i + 1; 16])),
                    size: 300,
                    blake3: [i; 32],
                })
                .collect(),
        }
    }

    fn file_of(path: &str, chunks: &[u32]) -> FileEntry {
        FileEntry {
            path: path.as_bytes().to_vec(),
            kind: FileKind::File,
            mode: 0o644,
            mtime_ns: 1,
            ctime_ns: 1,
            inode: 1,
            size: chunks.len() as u64,
            chunks: chunks.iter().map(|&c| chunk(c)).collect(),
            target: Vec::new(),
            ..FileEntry::default()
        }
    }

    fn snapshot(id: u64, source: &str) -> Snapshot {
        Snapshot {
            id: SnapshotId(id),
            source: source.to_string(),
            root: b"/r".to_vec(),
            started_at: id,
            finished_at: id,
            files: 1,
            dirs: 0,
            symlinks: 0,
            bytes: 1,
            new_bytes: 1,
            new_blocks: 1,
            skipped: Vec::new(),
        }
    }

    /// The chunk index: chunk -> block (10 and 11 share block 1; 30 sits in block 3 beside 3,
    /// referenced by no file; 9 is the catalog export's block, which no chunk names).
    const CHUNKS: &[(u32, u32)] = &[
        (10, 1),
        (11, 1),
        (2, 2),
        (3, 3),
        (30, 3),
        (4, 4),
        (5, 5),
        (6, 6),
    ];
    const EXPORT_BLOCK: u32 = 9;
    /// Chunks only the big old docs tree uses, all in block 3.
    const BIG: u32 = 1000;

    /// Two sources with interleaved ids: docs 1, 3, 5 and photos 2, 4.
    /// - docs 1: `f` [10, 11] (block 1, shared with every docs version), `old` [3] (block 3,
    ///   only here) and `many/*`: PAGE + 3 files, each its own chunk, all in block 3.
    /// - docs 3: `f`, `g` [2] (block 2, shared with docs 5).
    /// - docs 5: `f`, `g`, `h` [4] (block 4).
    /// - photos 2: `p` [5] (block 5, only here); photos 4: `q` [6] (block 6).
    fn catalog() -> MemStore {
        let kv = MemStore::new();
        let mut b = Batch::new();
        for &(c, blk) in CHUNKS {
            put_chunk(&mut b, &chunk(c), &block_id(blk));
        }
        for n in (1..=6).chain([EXPORT_BLOCK]) {
            put_block(&mut b, &block_entry(n));
        }
        let docs1 = SnapshotId(1);
        put_file(&mut b, docs1, &file_of("f", &[10, 11]));
        put_file(&mut b, docs1, &file_of("old", &[3]));
        for i in 0..(PAGE as u32 + 3) {
            put_chunk(&mut b, &chunk(BIG + i), &block_id(3));
            put_file(&mut b, docs1, &file_of(&format!("many/{i:04}"), &[BIG + i]));
        }
        for id in [3, 5] {
            put_file(&mut b, SnapshotId(id), &file_of("f", &[10, 11]));
            put_file(&mut b, SnapshotId(id), &file_of("g", &[2]));
        }
        put_file(&mut b, SnapshotId(5), &file_of("h", &[4]));
        put_file(&mut b, SnapshotId(2), &file_of("p", &[5]));
        put_file(&mut b, SnapshotId(4), &file_of("q", &[6]));
        for (id, source) in [(1, "docs"), (2, "photos"), (3, "docs"), (4, "photos")] {
            commit_snapshot(&mut b, &snapshot(id, source));
        }
        commit_snapshot(&mut b, &snapshot(5, "docs"));
        kv.write(b).expect("write");
        kv
    }

    fn protect_export() -> BTreeSet<BlockId> {
        [block_id(EXPORT_BLOCK)].into()
    }

    fn ids(plan: &Prune) -> (Vec<u64>, Vec<BlockId>) {
        (
            plan.snapshots.iter().map(|s| s.0).collect(),
            plan.blocks.iter().map(|b| b.id).collect(),
        )
    }

    fn all_entries(kv: &dyn KvStore) -> Vec<KeyValue> {
        kv.scan(CF, b"", None, usize::MAX).expect("scan")
    }

    #[test]
    fn keeping_two_drops_the_oldest_docs_version_and_only_its_unshared_blocks() {
        let kv = catalog();
        let plan = plan_prune(&kv, 2, &protect_export(), &BTreeSet::new()).expect("plan");
        // photos has only two versions: nothing of it goes, although it has the oldest id but one.
        assert_eq!(ids(&plan), (vec![1], vec![block_id(3)]));
        assert_eq!(
            plan.blocks[0],
            block_entry(3),
            "whole entries, for the suppliers"
        );
        // Planning writes nothing.
        assert_eq!(all_entries(&kv), all_entries(&catalog()));
    }

    #[test]
    fn sources_are_counted_separately() {
        let kv = catalog();
        let plan = plan_prune(&kv, 1, &protect_export(), &BTreeSet::new()).expect("plan");
        // docs keeps 5 (blocks 1, 2, 4), photos keeps 4 (block 6).
        assert_eq!(ids(&plan), (vec![1, 2, 3], vec![block_id(3), block_id(5)]));
        let plan = plan_prune(&kv, 3, &protect_export(), &BTreeSet::new()).expect("plan");
        assert_eq!(ids(&plan), (vec![], vec![]));
    }

    #[test]
    fn keep_zero_acts_as_one() {
        let kv = catalog();
        let one = plan_prune(&kv, 1, &protect_export(), &BTreeSet::new()).expect("plan");
        assert_eq!(
            plan_prune(&kv, 0, &protect_export(), &BTreeSet::new()).expect("plan"),
            one
        );
    }

    #[test]
    fn a_version_being_restored_stays_until_the_restore_ends() {
        let kv = catalog();
        let pins = ReadPins::default();
        let pin = pins.pin(SnapshotId(1));
        let again = pins.pin(SnapshotId(1));
        let plan = plan_prune(&kv, 2, &protect_export(), &pins.pinned()).expect("plan");
        // docs 1 and block 3, which only it uses, stay.
        assert_eq!(ids(&plan), (vec![], vec![]));
        drop(pin);
        assert_eq!(
            pins.pinned(),
            [SnapshotId(1)].into(),
            "a second restore still reads it"
        );
        drop(again);
        let plan = plan_prune(&kv, 2, &protect_export(), &pins.pinned()).expect("plan");
        assert_eq!(ids(&plan), (vec![1], vec![block_id(3)]));
    }

    #[test]
    fn protect_keeps_a_block_nothing_references() {
        let kv = catalog();
        // Unprotected, the export's block (no chunk names it) goes.
        let plan = plan_prune(&kv, 2, &BTreeSet::new(), &BTreeSet::new()).expect("plan");
        assert_eq!(plan.blocks.len(), 2);
        assert!(plan.blocks.iter().any(|b| b.id == block_id(EXPORT_BLOCK)));
        // And an unreferenced block protected stays, as does one kept snapshots reference.
        let protect = [block_id(EXPORT_BLOCK), block_id(3), block_id(1)].into();
        let plan = plan_prune(&kv, 2, &protect, &BTreeSet::new()).expect("plan");
        assert_eq!(ids(&plan), (vec![1], vec![]));
    }

    #[test]
    fn running_jobs_keep_their_blocks_and_abandoned_or_unreadable_trees_are_judged_safely() {
        let kv = catalog();
        let mut b = Batch::new();
        for n in [7, 8] {
            put_chunk(&mut b, &chunk(n), &block_id(n));
            put_block(&mut b, &block_entry(n));
        }
        // A running job (6): its tree uses block 7. An abandoned tree (7, no record, no job): block
        // 8. A snapshot whose record cannot be read (8): block 5, which photos 2 shared with it.
        put_file(&mut b, SnapshotId(6), &file_of("j", &[7]));
        jobs::put_job(
            &mut b,
            &jobs::JobRecord {
                snapshot: SnapshotId(6),
                source: "docs".into(),
                root: b"/r".to_vec(),
                started_at: 6,
            },
        );
        put_file(&mut b, SnapshotId(7), &file_of("k", &[8]));
        put_file(&mut b, SnapshotId(8), &file_of("u", &[5]));
        b.put(
            CF,
            Key::new(TAG_SNAPSHOT).u64(8).into_vec(),
            b"\x02garbage".to_vec(),
        );
        kv.write(b).expect("write");
        let plan = plan_prune(&kv, 1, &protect_export(), &BTreeSet::new()).expect("plan");
        assert_eq!(
            ids(&plan),
            (vec![1, 2, 3, 7], vec![block_id(3), block_id(8)])
        );
        apply_prune(&kv, &plan).expect("apply");
        assert_eq!(files(&kv, SnapshotId(6)).count(), 1, "the job's tree stays");
        assert_eq!(files(&kv, SnapshotId(8)).count(), 1, "unjudged tree stays");
        assert_eq!(files(&kv, SnapshotId(7)).count(), 0);
        assert!(block(&kv, &block_id(7)).expect("block").is_some());
        assert_eq!(
            plan_prune(&kv, 1, &protect_export(), &BTreeSet::new()).expect("plan"),
            Prune {
                snapshots: vec![],
                blocks: vec![]
            }
        );
    }

    /// What a clean apply of `plan_prune(kv, 2, export)` must leave.
    fn assert_pruned(kv: &dyn KvStore) {
        let left: Vec<u64> = snapshots(kv)
            .expect("snapshots")
            .iter()
            .map(|s| s.id.0)
            .collect();
        assert_eq!(left, vec![2, 3, 4, 5]);
        assert_eq!(files(kv, SnapshotId(1)).count(), 0);
        assert_eq!(file(kv, SnapshotId(1), b"f").expect("file"), None);
        assert_eq!(files(kv, SnapshotId(3)).count(), 2, "kept trees are whole");
        for gone in [3, 30, BIG, BIG + PAGE as u32 + 2] {
            assert_eq!(
                chunk_block(kv, &chunk(gone)).expect("chunk"),
                None,
                "{gone}"
            );
        }
        for (c, blk) in [(10, 1), (11, 1), (2, 2), (4, 4), (5, 5), (6, 6)] {
            assert_eq!(
                chunk_block(kv, &chunk(c)).expect("chunk"),
                Some(block_id(blk))
            );
        }
        assert_eq!(block(kv, &block_id(3)).expect("block"), None);
        for kept in [1, 2, 4, 5, 6, EXPORT_BLOCK] {
            assert_eq!(
                block(kv, &block_id(kept)).expect("block"),
                Some(block_entry(kept))
            );
        }
        assert_eq!(
            plan_prune(kv, 2, &protect_export(), &BTreeSet::new()).expect("plan"),
            Prune {
                snapshots: vec![],
                blocks: vec![]
            },
            "planning again after apply finds nothing"
        );
    }

    #[test]
    fn apply_removes_the_version_its_blocks_and_their_chunk_entries() {
        let kv = catalog();
        let plan = plan_prune(&kv, 2, &protect_export(), &BTreeSet::new()).expect("plan");
        apply_prune(&kv, &plan).expect("apply");
        assert_pruned(&kv);
        // Applying the same plan twice changes nothing more.
        let after = all_entries(&kv);
        apply_prune(&kv, &plan).expect("apply again");
        assert_eq!(all_entries(&kv), after);
        // The pruned catalog still exports and imports whole.
        let bytes = export(&kv).expect("export");
        let dst = MemStore::new();
        import(&dst, &bytes).expect("import");
        assert_eq!(all_entries(&dst), after);
        assert_pruned(&dst);
    }

    /// Fails every write after the first `left`: a crash at that point.
    struct CrashAfter<'a> {
        inner: &'a MemStore,
        left: Mutex<usize>,
    }

    impl KvStore for CrashAfter<'_> {
        fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(cf, key)
        }
        fn write(&self, batch: Batch) -> Result<(), StoreError> {
            let mut left = self.left.lock().expect("lock");
            if *left == 0 {
                return Err(StoreError::Db("crashed".into()));
            }
            *left -= 1;
            self.inner.write(batch)
        }
        fn scan(
            &self,
            cf: Cf,
            prefix: &[u8],
            from: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<KeyValue>, StoreError> {
            self.inner.scan(cf, prefix, from, limit)
        }
        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// After a crash anywhere: no visible version lost part of its tree, no chunk entry points
    /// at a missing block, and planning and applying again reaches the clean result.
    #[test]
    fn an_apply_interrupted_after_any_write_is_finished_by_planning_again() {
        let mut crashed_somewhere = false;
        for writes in 0.. {
            let kv = catalog();
            let plan = plan_prune(&kv, 2, &protect_export(), &BTreeSet::new()).expect("plan");
            let crashing = CrashAfter {
                inner: &kv,
                left: Mutex::new(writes),
            };
            if apply_prune(&crashing, &plan).is_ok() {
                assert!(crashed_somewhere && writes > 4, "only {writes} writes");
                break;
            }
            crashed_somewhere = true;
            for s in snapshots(&kv).expect("snapshots") {
                let whole = all_entries(&catalog())
                    .iter()
                    .filter(|(k, _)| k.starts_with(&snapshot_prefix(s.id)))
                    .count();
                assert_eq!(files(&kv, s.id).count(), whole, "crash after {writes}");
            }
            for page in kv.pages(CF, TAG_CHUNK, PAGE) {
                for (_, v) in page.expect("page") {
                    let r: records::ChunkRecord = codec::decode(&v).expect("chunk");
                    let b = BlockId(fixed(&r.block, "block").expect("id"));
                    assert!(block(&kv, &b).expect("block").is_some(), "after {writes}");
                }
            }
            let again = plan_prune(&kv, 2, &protect_export(), &BTreeSet::new()).expect("plan");
            apply_prune(&kv, &again).expect("apply");
            assert_pruned(&kv);
        }
    }
}
