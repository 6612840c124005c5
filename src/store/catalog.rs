//! The owner's catalog, in `Cf::Catalog`: snapshots (versions) with their file trees, the chunk
//! index and the block index; and the running backup jobs, in `Cf::Jobs`.
//!
//! These types are the catalog's in-memory shape, shared by the pipeline (which makes file and
//! block entries), the backup job (which records them) and restore (which reads them). The key
//! layout and the record encodings are below the types.

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
