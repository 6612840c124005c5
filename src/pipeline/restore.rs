//! Restore's local core: turns decoded blocks into files under a target directory. The network
//! side (fetching `k` fragments per block, decoding them) is the caller's; it hands plain blocks
//! in through `get_block`.
//!
//! [`plan`] reads a snapshot's tree from the catalog and lists the blocks it needs, in order of
//! first need; [`restore_files`] walks the plan and writes every entry.
//!
//! Invariants (issue 9 §2; the catalog's paths are untrusted, it could be tampered):
//! - **Never outside the target.** A path with an empty, `.` or `..` component, a leading `/` or
//!   a NUL is refused (named in the report). Every parent of an entry is checked with
//!   `symlink_metadata` to be a real directory, so no symlink — one on disk before, or one this
//!   run restored — ever redirects a write; files are created with `O_EXCL | O_NOFOLLOW` and
//!   renamed into place (a rename replaces a final symlink, never follows it).
//! - **Never destroys silently.** Without `overwrite`, an existing different file or symlink is a
//!   failure named in the report; with it, it is replaced by temp + rename.
//! - **Complete or absent.** A file is written under a temporary name in its directory, given its
//!   mode and mtime, made durable (one `syncfs` per batch of files rather than an fsync per file),
//!   then renamed: a file under its real name is complete, even after a power loss. So a resumed
//!   run skips a file whose size and mtime already match, and replaces stale temporary files.
//! - **Failures are local.** A block that cannot be had, a bad path or an entry that cannot be
//!   written fails that entry only; only target-level failures (the root, a full disk) stop the
//!   run.
//! - **Bounded memory.** Decoded blocks stay in a cache while they still have uses, at most
//!   `cache_blocks` of them.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{File, FileTimes, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::data::{BlockId, ChunkId, PackedBlock};
use crate::store::catalog::{self, FileEntry, FileKind, SnapshotId};
use crate::store::{KvStore, StoreError};

/// Prefix of a file's temporary name while it is written.
pub const TEMP_PREFIX: &str = ".bitdust-restore-";

/// What to restore: the entries in walk order (parents before children) and the blocks they
/// need.
#[derive(Clone, Debug)]
pub struct RestorePlan {
    /// Every entry in the order the backup walked them (parents before children).
    pub files: Vec<FileEntry>,
    /// Every block needed, in order of first need.
    pub blocks: Vec<BlockId>,
    /// Per block: how many chunk uses the plan holds (the cache drops a block at its last use).
    uses: HashMap<BlockId, u64>,
    /// The block holding each chunk of the plan.
    chunk_blocks: HashMap<ChunkId, BlockId>,
    /// Files found complete by [`RestorePlan::skip_complete`]: their uses are out of `uses`.
    complete: HashSet<Vec<u8>>,
}

impl RestorePlan {
    /// Sum of the regular files' sizes.
    pub fn bytes(&self) -> u64 {
        self.files
            .iter()
            .filter(|f| f.kind == FileKind::File)
            .map(|f| f.size)
            .sum()
    }

    /// For a resumed restore: finds the files already complete under the target (size and mtime
    /// match, as a killed run left them), and takes their blocks out of `blocks` where no other
    /// file needs them, so the caller fetches only what is missing. The entries stay in the plan:
    /// [`restore_files`] checks them again (a file changed since is written after all, its blocks
    /// then asked for on demand). Returns how many files were found complete.
    pub fn skip_complete(&mut self, target: &RestoreTarget) -> u64 {
        for entry in self.files.iter().filter(|f| f.kind == FileKind::File) {
            if self.complete.contains(&entry.path) || components(&entry.path).is_none() {
                continue;
            }
            let complete = std::fs::symlink_metadata(target.root.join(os(&entry.path)))
                .is_ok_and(|meta| is_complete(&meta, entry));
            if !complete {
                continue;
            }
            for chunk in &entry.chunks {
                if let Some(block) = self.chunk_blocks.get(chunk)
                    && let Some(n) = self.uses.get_mut(block)
                {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.uses.remove(block);
                    }
                }
            }
            self.complete.insert(entry.path.clone());
        }
        let uses = &self.uses;
        self.blocks.retain(|b| uses.contains_key(b));
        self.complete.len() as u64
    }
}

/// Where to restore to.
#[derive(Clone, Debug)]
pub struct RestoreTarget {
    /// `--to`, created if missing.
    pub root: PathBuf,
    /// Replace existing different files and symlinks (via temp + rename).
    pub overwrite: bool,
}

/// Live progress, shared with whoever shows it.
#[derive(Debug, Default)]
pub struct RestoreCounters {
    /// Entries (files, dirs, symlinks) done: written, skipped or failed.
    pub files_done: AtomicU64,
    /// File bytes written (skipped files not included).
    pub bytes_written: AtomicU64,
    /// Blocks whose every use is done (out of `plan.blocks.len()`).
    pub blocks_used: AtomicU64,
}

/// A plain copy of [`RestoreCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreProgress {
    pub files_done: u64,
    pub bytes_written: u64,
    pub blocks_used: u64,
}

impl RestoreCounters {
    pub fn snapshot(&self) -> RestoreProgress {
        RestoreProgress {
            files_done: self.files_done.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            blocks_used: self.blocks_used.load(Ordering::Relaxed),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Regular files written.
    pub files: u64,
    /// Directories created or found in place.
    pub dirs: u64,
    pub symlinks: u64,
    /// File bytes written.
    pub bytes: u64,
    /// Files and symlinks already complete (from a previous, killed run): not rewritten.
    pub skipped_existing: u64,
    /// Entries not restored: path, reason.
    pub failed: Vec<(Vec<u8>, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid restore path {0:?} (relative, `/`-separated, no `.` or `..`)")]
    InvalidSubPath(String),
    #[error("{0:?} is not in this snapshot")]
    NotFound(String),
    #[error("{path:?} needs a chunk the catalog does not know")]
    UnknownChunk { path: String },
    #[error("{path:?} needs a block the catalog does not know")]
    UnknownBlock { path: String },
    #[error("the restore target {path:?} is not usable")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the restore target {path:?} is not a directory")]
    RootNotDir { path: PathBuf },
    #[error("writing under the restore target failed (disk full or read-only)")]
    Target(#[source] std::io::Error),
}

/// Why a block could not be had for a restore.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The restore was cancelled, or the side that fetches blocks went away.
    #[error("the restore stopped")]
    Stopped,
    /// Fewer than the block's `k` positions could give a fragment matching its manifest.
    #[error("fewer than k suppliers could give a good fragment")]
    TooFewFragments,
    /// Fragments that match the manifest did not decode to the block.
    #[error("the block did not decode: {0}")]
    Undecodable(String),
    /// The decoded bytes are not a packed block.
    #[error("the block is malformed: {0}")]
    Malformed(String),
    /// The block does not hold a chunk the catalog places in it.
    #[error("the block does not hold a chunk it should")]
    MissingChunk,
}

/// A block a file needs could not be had: which, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block {block} unavailable: {why}")]
pub struct Unavailable {
    pub block: BlockId,
    pub why: BlockError,
}

/// Gives a block's plain bytes to the restore, fetching and decoding it as needed.
pub type GetBlock<'a> = dyn FnMut(BlockId) -> Result<Arc<Vec<u8>>, BlockError> + 'a;

fn lossy(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// `sub` is `path` itself or lies below it (the empty path is the root, above everything).
fn is_within(path: &[u8], sub: &[u8]) -> bool {
    path.is_empty()
        || sub == path
        || (sub.len() > path.len() && sub.starts_with(path) && sub[path.len()] == b'/')
}

/// The components of a catalog path, if every one is a plain name: no empty, `.` or `..`
/// component (so no leading `/` either), no NUL. The empty path (the root) has none.
fn components(path: &[u8]) -> Option<Vec<&[u8]>> {
    if path.is_empty() {
        return Some(Vec::new());
    }
    let parts: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
    parts
        .iter()
        .all(|c| !c.is_empty() && *c != b"." && *c != b".." && !c.contains(&0))
        .then_some(parts)
}

/// The walker's order (see `pipeline::walk`): at the first component where two paths differ,
/// an entry that ends there and is not a directory comes before a subtree; then by name. A
/// directory comes before everything under it.
fn walk_order(a: &FileEntry, b: &FileEntry) -> std::cmp::Ordering {
    fn key(e: &FileEntry) -> impl Iterator<Item = (bool, &[u8])> {
        let last = e.path.split(|c| *c == b'/').count();
        e.path
            .split(|c| *c == b'/')
            .enumerate()
            .filter(|_| !e.path.is_empty())
            .map(move |(i, part)| (i + 1 < last || e.kind == FileKind::Dir, part))
    }
    key(a).cmp(key(b))
}

#[cfg(test)]
mod walk_order_tests {
    use super::*;

    #[test]
    fn entries_sort_as_the_walker_visits_them() {
        let entry = |path: &str, kind| FileEntry {
            path: path.as_bytes().to_vec(),
            kind,
            ..FileEntry::default()
        };
        let mut files = vec![
            entry("a/b/x", FileKind::File),
            entry("a/c", FileKind::File),
            entry("a/b", FileKind::Dir),
            entry("a/a", FileKind::Symlink),
            entry("a", FileKind::Dir),
            entry("", FileKind::Dir),
            entry("a/b-", FileKind::File),
            entry("z", FileKind::File),
        ];
        files.sort_by(walk_order);
        let order: Vec<&str> = files
            .iter()
            .map(|f| std::str::from_utf8(&f.path).expect("utf-8"))
            .collect();
        // Path byte order would be "", a, a/a, a/b, a/b-, a/b/x, a/c, z.
        assert_eq!(order, ["", "z", "a", "a/a", "a/b-", "a/c", "a/b", "a/b/x"]);
    }
}

/// Reads the snapshot's tree (or the part at `sub_path`, with its ancestors' directories) and
/// finds the block of every chunk.
pub fn plan(
    kv: &dyn KvStore,
    snapshot: SnapshotId,
    sub_path: Option<&[u8]>,
) -> Result<RestorePlan, RestoreError> {
    let sub = match sub_path {
        None => None,
        Some(p) => {
            let trimmed = p.strip_suffix(b"/").unwrap_or(p);
            if components(trimmed).is_none() {
                return Err(RestoreError::InvalidSubPath(lossy(p)));
            }
            Some(trimmed)
        }
    };
    let mut files = Vec::new();
    let mut found = sub.is_none_or(|s| s.is_empty());
    for entry in catalog::files(kv, snapshot) {
        let entry = entry?;
        if let Some(sub) = sub {
            // The entry itself or below it, or one of its ancestors (for their directories).
            let below = is_within(sub, &entry.path);
            let ancestor = entry.kind == FileKind::Dir && is_within(&entry.path, sub);
            if !below && !ancestor {
                continue;
            }
            found |= entry.path == sub;
        }
        files.push(entry);
    }
    if !found {
        return Err(RestoreError::NotFound(lossy(sub.unwrap_or_default())));
    }
    // In the order the backup walked them, which is the order their chunks were packed in: a
    // directory, its other entries by name, then its subdirectories by name, depth first. Path
    // byte order would restore `a/b/...` between `a/a` and `a/c`, going back to blocks the cache
    // may have let go. A parent still precedes its children.
    files.sort_by(|a, b| walk_order(a, b));

    let mut blocks = Vec::new();
    let mut uses: HashMap<BlockId, u64> = HashMap::new();
    let mut chunk_blocks: HashMap<ChunkId, BlockId> = HashMap::new();
    let mut known_blocks: HashSet<BlockId> = HashSet::new();
    for entry in files.iter().filter(|f| f.kind == FileKind::File) {
        for chunk in &entry.chunks {
            let block = match chunk_blocks.get(chunk) {
                Some(b) => *b,
                None => {
                    let b = catalog::chunk_block(kv, chunk)?.ok_or_else(|| {
                        RestoreError::UnknownChunk {
                            path: lossy(&entry.path),
                        }
                    })?;
                    chunk_blocks.insert(*chunk, b);
                    b
                }
            };
            if known_blocks.insert(block) {
                if catalog::block(kv, &block)?.is_none() {
                    return Err(RestoreError::UnknownBlock {
                        path: lossy(&entry.path),
                    });
                }
                blocks.push(block);
            }
            *uses.entry(block).or_default() += 1;
        }
    }
    Ok(RestorePlan {
        files,
        blocks,
        uses,
        chunk_blocks,
        complete: HashSet::new(),
    })
}

/// A decoded block with its chunk index, kept while it has uses.
struct Cached {
    plain: Arc<Vec<u8>>,
    /// Chunk → byte range in `plain`.
    index: HashMap<ChunkId, (usize, usize)>,
    last_used: u64,
}

/// The decoded blocks still to be used, at most `capacity`; the least recently used goes first.
struct BlockCache<'a> {
    capacity: usize,
    blocks: HashMap<BlockId, Cached>,
    remaining: HashMap<BlockId, u64>,
    /// Blocks the caller could not deliver, and why: not asked for again.
    unavailable: HashMap<BlockId, BlockError>,
    tick: u64,
    get_block: &'a mut GetBlock<'a>,
    counters: &'a RestoreCounters,
}

impl BlockCache<'_> {
    /// One use of `block` is done (or given up): at the last one the block leaves the cache.
    fn used(&mut self, block: &BlockId) {
        if let Some(n) = self.remaining.get_mut(block) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.remaining.remove(block);
                self.blocks.remove(block);
                RestoreCounters::add(&self.counters.blocks_used, 1);
            }
        }
    }

    /// A file [`RestorePlan::skip_complete`] counted as done is written after all: its uses
    /// count again.
    fn reclaim(&mut self, entry: &FileEntry, chunk_blocks: &HashMap<ChunkId, BlockId>) {
        for chunk in &entry.chunks {
            if let Some(block) = chunk_blocks.get(chunk) {
                *self.remaining.entry(*block).or_default() += 1;
            }
        }
    }

    /// The bytes of `chunk` from `block`, fetching the block if it is not cached.
    fn chunk(&mut self, block: BlockId, chunk: &ChunkId) -> Result<&[u8], Unavailable> {
        self.tick += 1;
        if !self.blocks.contains_key(&block) {
            if let Some(why) = self.unavailable.get(&block) {
                return Err(Unavailable {
                    block,
                    why: why.clone(),
                });
            }
            let plain = match (self.get_block)(block) {
                Ok(p) => p,
                Err(why) => {
                    self.unavailable.insert(block, why.clone());
                    return Err(Unavailable { block, why });
                }
            };
            let index = match PackedBlock::parse(&plain) {
                Ok(parsed) => {
                    let base = plain.as_ptr() as usize;
                    parsed
                        .chunks()
                        .iter()
                        .map(|(id, data)| {
                            let start = data.as_ptr() as usize - base;
                            (*id, (start, start + data.len()))
                        })
                        .collect()
                }
                Err(e) => {
                    let why = BlockError::Malformed(e.to_string());
                    self.unavailable.insert(block, why.clone());
                    return Err(Unavailable { block, why });
                }
            };
            while self.blocks.len() >= self.capacity.max(1) {
                let Some(oldest) = self
                    .blocks
                    .iter()
                    .min_by_key(|(_, c)| c.last_used)
                    .map(|(id, _)| *id)
                else {
                    break;
                };
                self.blocks.remove(&oldest);
            }
            self.blocks.insert(
                block,
                Cached {
                    plain,
                    index,
                    last_used: 0,
                },
            );
        }
        let tick = self.tick;
        let missing = || Unavailable {
            block,
            why: BlockError::MissingChunk,
        };
        let cached = self.blocks.get_mut(&block).ok_or_else(missing)?;
        cached.last_used = tick;
        let (start, end) = *cached.index.get(chunk).ok_or_else(missing)?;
        Ok(&cached.plain[start..end])
    }
}

/// Outcome of one entry.
enum Done {
    Written(u64),
    /// A file written under its temporary name, renamed at the batch's flush.
    Staged(u64),
    Existing,
}

/// Errors of one entry: a reason for the report, or a target-level failure that stops the run.
enum EntryError {
    Entry(String),
    Target(std::io::Error),
}

impl EntryError {
    /// Sorts an IO error: a full disk, quota or read-only file system stops everything.
    fn io(what: &str, e: std::io::Error) -> EntryError {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EROFS) => EntryError::Target(e),
            _ => EntryError::Entry(format!("{what}: {e}")),
        }
    }
}

impl From<String> for EntryError {
    fn from(reason: String) -> Self {
        EntryError::Entry(reason)
    }
}

fn system_time(ns: i64) -> SystemTime {
    let magnitude = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// Whether a file's mtime on disk is the entry's, allowing for a file system that keeps only
/// microseconds or seconds.
fn same_mtime(on_disk: i64, wanted: i64) -> bool {
    on_disk == wanted
        || on_disk == wanted - wanted.rem_euclid(1_000)
        || on_disk == wanted - wanted.rem_euclid(1_000_000_000)
}

/// Whether what is on disk is the entry's file as a previous run completed it (a file under its
/// real name was renamed there complete, with its mtime already set).
fn is_complete(meta: &std::fs::Metadata, entry: &FileEntry) -> bool {
    meta.file_type().is_file()
        && meta.len() == entry.size
        && same_mtime(mtime_ns(meta), entry.mtime_ns)
}

/// The temporary name of `name` while it is written: fixed per name (so a resumed run finds a
/// stale one), short whatever the name's length.
fn temp_name(name: &[u8]) -> Vec<u8> {
    let hash = blake3::hash(name);
    let mut out = TEMP_PREFIX.as_bytes().to_vec();
    out.extend_from_slice(hash.to_hex()[..32].as_bytes());
    out
}

fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

/// The restore in progress.
struct Restorer<'a> {
    root: &'a Path,
    overwrite: bool,
    /// Directories (relative paths) known to be real directories under the root: created or
    /// checked in this run. A directory is never replaced by anything in a run (a rename of a
    /// file or link over a directory fails), so a check holds for the rest of the run.
    dirs: HashSet<Vec<u8>>,
    report: RestoreReport,
    counters: &'a RestoreCounters,
    /// Whether the current file's chunk uses were counted (by `write_chunks`).
    consumed: bool,
    /// The plan's files found complete before the run (their uses are not counted).
    complete: &'a HashSet<Vec<u8>>,
    /// Files written, waiting for the flush that makes them durable before their rename.
    pending: Vec<Staged>,
    pending_bytes: u64,
}

impl Restorer<'_> {
    /// Makes sure every parent of `parts` is a real directory (creating missing ones, which a
    /// catalog whose directory record was unreadable needs), never passing through a symlink.
    fn parents(&mut self, parts: &[&[u8]]) -> Result<PathBuf, EntryError> {
        let mut rel: Vec<u8> = Vec::new();
        let mut abs = self.root.to_path_buf();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(part);
            abs.push(os(part));
            if self.dirs.contains(&rel) {
                continue;
            }
            match std::fs::symlink_metadata(&abs) {
                Ok(meta) if meta.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(EntryError::Entry(format!(
                        "parent {:?} is not a directory (a symlink or a file)",
                        lossy(&rel)
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // mkdir does not follow a symlink at its last component: if one appeared,
                    // it fails with EEXIST.
                    std::fs::create_dir(&abs)
                        .map_err(|e| EntryError::io(&format!("creating parent {rel:?}"), e))?;
                }
                Err(e) => return Err(EntryError::io("checking a parent", e)),
            }
            self.dirs.insert(rel.clone());
        }
        Ok(abs)
    }

    fn dir(&mut self, entry: &FileEntry, parts: &[&[u8]]) -> Result<Done, EntryError> {
        if parts.is_empty() {
            // The root, made by restore_files; the user's `--to` may be a link they chose.
            if let Ok(meta) = std::fs::metadata(self.root) {
                writable(self.root, &meta, true)?;
            }
            return Ok(Done::Written(0));
        }
        let parent = self.parents(parts)?;
        let path = parent.join(os(parts[parts.len() - 1]));
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_dir() => writable(&path, &meta, false)?,
            Ok(_) => {
                return Err(EntryError::Entry(
                    "exists and is not a directory (not replaced)".into(),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&path).map_err(|e| EntryError::io("creating", e))?;
            }
            Err(e) => return Err(EntryError::io("checking", e)),
        }
        self.dirs.insert(entry.path.clone());
        Ok(Done::Written(0))
    }

    fn symlink(&mut self, entry: &FileEntry, parts: &[&[u8]]) -> Result<Done, EntryError> {
        let parent = self.parents(parts)?;
        let name = parts[parts.len() - 1];
        let path = parent.join(os(name));
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => {
                if meta.file_type().is_symlink()
                    && std::fs::read_link(&path)
                        .is_ok_and(|t| t.as_os_str().as_bytes() == &entry.target[..])
                {
                    return Ok(Done::Existing);
                }
                if !self.overwrite {
                    return Err(EntryError::Entry(
                        "exists and differs (not overwritten)".into(),
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EntryError::io("checking", e)),
        }
        let temp = parent.join(os(&temp_name(name)));
        remove_stale(&temp)?;
        std::os::unix::fs::symlink(os(&entry.target), &temp)
            .map_err(|e| EntryError::io("creating the link", e))?;
        let placed = link_mtime(&temp, entry.mtime_ns).and_then(|()| {
            std::fs::rename(&temp, &path).map_err(|e| EntryError::io("renaming into place", e))
        });
        if placed.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        placed.map(|()| Done::Written(0))
    }

    fn file(
        &mut self,
        entry: &FileEntry,
        parts: &[&[u8]],
        cache: &mut BlockCache<'_>,
        chunk_blocks: &HashMap<ChunkId, BlockId>,
    ) -> Result<Done, EntryError> {
        let parent = self.parents(parts)?;
        let name = parts[parts.len() - 1];
        let path = parent.join(os(name));
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => {
                if is_complete(&meta, entry) {
                    return Ok(Done::Existing);
                }
                if !self.overwrite {
                    return Err(EntryError::Entry(
                        "exists and differs (not overwritten)".into(),
                    ));
                }
                if meta.file_type().is_dir() {
                    return Err(EntryError::Entry(
                        "a directory is in the way (not replaced)".into(),
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EntryError::io("checking", e)),
        }
        let temp = parent.join(os(&temp_name(name)));
        // O_EXCL: never opens what is there (a symlink included); O_NOFOLLOW for good measure.
        let create = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&temp)
        };
        let mut out = match create() {
            Ok(f) => f,
            // A killed run's leftover (checked only then: one syscall less per file).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                remove_stale(&temp)?;
                create().map_err(|e| EntryError::io("creating the temporary file", e))?
            }
            Err(e) => return Err(EntryError::io("creating the temporary file", e)),
        };
        if self.complete.contains(&entry.path) {
            cache.reclaim(entry, chunk_blocks);
        }
        self.consumed = true;
        let written = write_chunks(&mut out, entry, cache, chunk_blocks)
            .and_then(|n| {
                if n == entry.size {
                    Ok(n)
                } else {
                    Err(EntryError::Entry(format!(
                        "assembled {n} bytes, the catalog says {}",
                        entry.size
                    )))
                }
            })
            .and_then(|n| finish(&out, entry).map(|()| n));
        drop(out);
        match written {
            Ok(n) => {
                self.pending.push(Staged {
                    temp,
                    path,
                    entry: entry.path.clone(),
                    bytes: n,
                });
                self.pending_bytes += n;
                Ok(Done::Staged(n))
            }
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                Err(e)
            }
        }
    }

    /// Makes the staged files durable with one `syncfs`, then renames each into place: a file
    /// under its real name is always complete on disk, even after a power loss, at one flush per
    /// batch instead of one fsync per file (which cost ~0.5 ms a file, most of a restore of many
    /// small files). `Err` only when the flush itself fails.
    fn flush(&mut self) -> Result<(), std::io::Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        syncfs(self.root)?;
        for staged in std::mem::take(&mut self.pending) {
            match std::fs::rename(&staged.temp, &staged.path) {
                Ok(()) => {
                    self.report.files += 1;
                    self.report.bytes += staged.bytes;
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&staged.temp);
                    self.report
                        .failed
                        .push((staged.entry, format!("renaming into place: {e}")));
                }
            }
        }
        self.pending_bytes = 0;
        Ok(())
    }

    /// Removes the staged files of a run that stops on a target-level failure.
    fn abandon(&mut self) {
        for staged in std::mem::take(&mut self.pending) {
            let _ = std::fs::remove_file(&staged.temp);
        }
    }
}

/// Flushes the file system holding `root` (every file written there so far).
fn syncfs(root: &Path) -> Result<(), std::io::Error> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(root)?;
    // SAFETY: a valid open descriptor, owned by `dir` for the duration of the call.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A file written and closed under its temporary name, waiting for the batch's flush.
struct Staged {
    temp: PathBuf,
    path: PathBuf,
    entry: Vec<u8>,
    bytes: u64,
}

/// A batch of staged files is flushed at this many files or bytes, whichever comes first: large
/// enough that flushes are rare, small enough that little is rewritten after a crash.
const BATCH_FILES: usize = 16_384;
const BATCH_BYTES: u64 = 256 << 20;

/// Sets a symlink's own mtime (`utimensat` with `AT_SYMLINK_NOFOLLOW`; std has no call for it).
fn link_mtime(path: &Path, ns: i64) -> Result<(), EntryError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| EntryError::Entry("a NUL in the path".into()))?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: ns.div_euclid(1_000_000_000) as libc::time_t,
            tv_nsec: ns.rem_euclid(1_000_000_000) as libc::c_long,
        },
    ];
    // SAFETY: a valid NUL-terminated path and an array of two timespecs, as utimensat wants.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(EntryError::io(
            "setting the link's mtime",
            std::io::Error::last_os_error(),
        ))
    }
}

/// Removes a temporary file a killed run left (a file or a link: never followed).
fn remove_stale(temp: &Path) -> Result<(), EntryError> {
    match std::fs::symlink_metadata(temp) {
        Ok(meta) if meta.file_type().is_dir() => Err(EntryError::Entry(
            "a directory holds the temporary name".into(),
        )),
        Ok(_) => std::fs::remove_file(temp)
            .map_err(|e| EntryError::io("removing a stale temporary file", e)),
        Err(_) => Ok(()),
    }
}

/// Writes the file's chunks in order; every chunk's use is counted done, written or not.
fn write_chunks(
    out: &mut File,
    entry: &FileEntry,
    cache: &mut BlockCache<'_>,
    chunk_blocks: &HashMap<ChunkId, BlockId>,
) -> Result<u64, EntryError> {
    let mut written = 0u64;
    let mut result = Ok(());
    for chunk in &entry.chunks {
        let Some(block) = chunk_blocks.get(chunk).copied() else {
            result = Err(EntryError::Entry("a chunk is not in the plan".into()));
            break;
        };
        if result.is_ok() {
            result = match cache.chunk(block, chunk) {
                Ok(bytes) => {
                    written += bytes.len() as u64;
                    out.write_all(bytes)
                        .map_err(|e| EntryError::io("writing", e))
                }
                Err(unavailable) => Err(EntryError::Entry(unavailable.to_string())),
            };
        }
        cache.used(&block);
    }
    result.map(|()| written)
}

/// Mode and mtime of a complete temporary file (made durable by the batch's flush).
fn finish(out: &File, entry: &FileEntry) -> Result<(), EntryError> {
    out.set_permissions(Permissions::from_mode(entry.mode & 0o7777))
        .map_err(|e| EntryError::io("setting the mode", e))?;
    out.set_times(FileTimes::new().set_modified(system_time(entry.mtime_ns)))
        .map_err(|e| EntryError::io("setting the mtime", e))
}

/// Lets the owner write into a directory a previous run left read-only (its mode is set again
/// at the end), so a resumed run can add what is missing.
fn writable(path: &Path, meta: &std::fs::Metadata, follow: bool) -> Result<(), EntryError> {
    if meta.mode() & 0o700 == 0o700 {
        return Ok(());
    }
    let flags = libc::O_DIRECTORY | if follow { 0 } else { libc::O_NOFOLLOW };
    OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .and_then(|dir| dir.set_permissions(Permissions::from_mode((meta.mode() & 0o7777) | 0o700)))
        .map_err(|e| EntryError::io("making the directory writable", e))
}

/// Sets a directory's mode and mtime through a descriptor opened without following a symlink.
fn dir_metadata(path: &Path, entry: &FileEntry, follow: bool) -> Result<(), EntryError> {
    let flags = libc::O_DIRECTORY | if follow { 0 } else { libc::O_NOFOLLOW };
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| EntryError::io("opening the directory", e))?;
    dir.set_permissions(Permissions::from_mode(entry.mode & 0o7777))
        .map_err(|e| EntryError::io("setting the mode", e))?;
    dir.set_times(FileTimes::new().set_modified(system_time(entry.mtime_ns)))
        .map_err(|e| EntryError::io("setting the mtime", e))
}

/// Restores every entry of the plan under `target.root`. `get_block` returns a block's PLAIN
/// bytes (decoded by the caller) or an error; it is called in plan order as files need blocks
/// (the caller prefetches ahead in `plan.blocks` order). Decoded blocks stay in a cache while
/// they still have uses, at most `cache_blocks` (an evicted block is asked for again if needed
/// later). A block that cannot be had fails only the files that need it (named in `failed`, with
/// the reason); everything else is restored. Never returns early on one bad entry: `Err` only
/// for target-level failures (the root cannot be made, the disk is full or read-only).
pub fn restore_files(
    plan: &RestorePlan,
    target: &RestoreTarget,
    get_block: &mut GetBlock<'_>,
    cache_blocks: usize,
    counters: &RestoreCounters,
) -> Result<RestoreReport, RestoreError> {
    restore_batched(
        plan,
        target,
        get_block,
        cache_blocks,
        counters,
        (BATCH_FILES, BATCH_BYTES),
    )
}

/// [`restore_files`] with the flush batch's size in files and bytes (small in tests).
fn restore_batched(
    plan: &RestorePlan,
    target: &RestoreTarget,
    get_block: &mut GetBlock<'_>,
    cache_blocks: usize,
    counters: &RestoreCounters,
    (batch_files, batch_bytes): (usize, u64),
) -> Result<RestoreReport, RestoreError> {
    let root = &target.root;
    std::fs::create_dir_all(root).map_err(|source| RestoreError::Root {
        path: root.clone(),
        source,
    })?;
    let meta = std::fs::metadata(root).map_err(|source| RestoreError::Root {
        path: root.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(RestoreError::RootNotDir { path: root.clone() });
    }
    let mut cache = BlockCache {
        capacity: cache_blocks,
        blocks: HashMap::new(),
        remaining: plan.uses.clone(),
        unavailable: HashMap::new(),
        tick: 0,
        get_block,
        counters,
    };
    let mut r = Restorer {
        root,
        overwrite: target.overwrite,
        dirs: HashSet::new(),
        report: RestoreReport::default(),
        counters,
        consumed: false,
        complete: &plan.complete,
        pending: Vec::new(),
        pending_bytes: 0,
    };
    // Directories whose mode and mtime are set at the end, deepest first (writing into a
    // directory changes its mtime, and a read-only mode would stop the writes).
    let mut dirs_done: Vec<&FileEntry> = Vec::new();
    for entry in &plan.files {
        let outcome = match components(&entry.path) {
            None => Err(EntryError::Entry(
                "unsafe path (empty, `.` or `..` component, absolute, or NUL)".into(),
            )),
            Some(parts) if parts.is_empty() && entry.kind != FileKind::Dir => Err(
                EntryError::Entry("an empty path that is not the root".into()),
            ),
            Some(parts) => match entry.kind {
                FileKind::Dir => r.dir(entry, &parts),
                FileKind::Symlink => r.symlink(entry, &parts),
                FileKind::File => r.file(entry, &parts, &mut cache, &plan.chunk_blocks),
                FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice => Err(
                    EntryError::Entry(format!("a {} is not restored yet", entry.kind.name())),
                ),
            },
        };
        let consumed = std::mem::take(&mut r.consumed);
        if entry.kind == FileKind::File && !consumed && !plan.complete.contains(&entry.path) {
            // Skipped or failed before reading (an existing file, a bad path): its chunks' uses
            // are released all the same, so the cache frees their blocks.
            for chunk in &entry.chunks {
                if let Some(block) = plan.chunk_blocks.get(chunk) {
                    cache.used(block);
                }
            }
        }
        match outcome {
            Ok(Done::Written(n)) => {
                match entry.kind {
                    FileKind::File => r.report.files += 1,
                    FileKind::Dir => {
                        r.report.dirs += 1;
                        dirs_done.push(entry);
                    }
                    FileKind::Symlink => r.report.symlinks += 1,
                    FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice => {}
                }
                r.report.bytes += n;
                RestoreCounters::add(&r.counters.bytes_written, n);
            }
            Ok(Done::Staged(n)) => RestoreCounters::add(&r.counters.bytes_written, n),
            Ok(Done::Existing) => r.report.skipped_existing += 1,
            Err(EntryError::Entry(reason)) => {
                r.report.failed.push((entry.path.clone(), reason));
            }
            Err(EntryError::Target(e)) => {
                r.abandon();
                return Err(RestoreError::Target(e));
            }
        }
        RestoreCounters::add(&r.counters.files_done, 1);
        if r.pending.len() >= batch_files || r.pending_bytes >= batch_bytes {
            r.flush().map_err(|e| {
                r.abandon();
                RestoreError::Target(e)
            })?;
        }
    }
    r.flush().map_err(|e| {
        r.abandon();
        RestoreError::Target(e)
    })?;
    for entry in dirs_done.iter().rev() {
        let path = root.join(os(&entry.path));
        // The root is the user's `--to`, which may be a symlink they chose.
        if let Err(e) = dir_metadata(&path, entry, entry.path.is_empty()) {
            match e {
                EntryError::Target(e) => return Err(RestoreError::Target(e)),
                EntryError::Entry(reason) => r.report.failed.push((entry.path.clone(), reason)),
            }
        }
    }
    Ok(r.report)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Weak};

    use super::*;
    use crate::data::{BlockManifest, decode_block, stored};
    use crate::pipeline::staged_path;
    use crate::pipeline::tests::{
        MemLookup, blocks, files, keys, mixed_tree, run, settings, write,
    };
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
            RestoreTarget {
                root: self.dir.path().join(name),
                overwrite,
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
        assert_eq!(
            (report.files, report.symlinks, report.skipped_existing),
            (1, 1, 9)
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
        let target = RestoreTarget {
            root: root.to_path_buf(),
            overwrite: true,
        };
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
}
