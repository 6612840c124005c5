//! Restore's local core: turns decoded blocks into files under a target directory. The network
//! side (fetching `k` fragments per block, decoding them) is the caller's; it hands plain blocks
//! in through `get_block`.
//!
//! [`plan`] reads a snapshot's tree from the catalog once, in the order the backup walked it
//! (`catalog::tree`), and lists the blocks it needs in order of first need; [`restore_files`]
//! reads the tree again in that order and writes every entry. Neither holds the tree.
//!
//! Invariants (issues 9 §2 and 19; the catalog is untrusted, it could be tampered, and the
//! target may be changed by others while the restore runs):
//! - **Never outside the target, even under a race (H4).** A path with an empty, `.` or `..`
//!   component, a leading `/` or a NUL is refused (named in the report). The root is opened
//!   once; every directory below is opened `O_DIRECTORY | O_NOFOLLOW` relative to its parent's
//!   held descriptor ([`dirs::DirStack`], only the current path held), and every create, link,
//!   rename and metadata call is relative to a held descriptor and names one component. A
//!   symlink — on disk before, restored by this run, or swapped in for a directory mid-run —
//!   never redirects anything: a directory already opened stays the one written into. Files are
//!   created `O_EXCL | O_NOFOLLOW` and renamed into place (a rename replaces a final symlink,
//!   never follows it). Paths longer than `PATH_MAX` work.
//! - **Never destroys silently.** Without `overwrite`, an existing different entry is a failure
//!   named in the report; with it, it is replaced by temp + rename. A directory is never
//!   replaced.
//! - **Complete or absent.** A file is written under a temporary name in its directory, given its
//!   owner, mode, attributes and mtime, made durable (one `syncfs` per batch of files rather than
//!   an fsync per file), then renamed relative to the descriptor of the directory it was written
//!   in: a file under its real name is complete, even after a power loss. So a resumed run
//!   without `overwrite` skips a file whose size and mtime already match, and replaces stale
//!   temporary files; with `overwrite` every file is rewritten (M5: size and mtime prove
//!   nothing about content). Symlinks, FIFOs and device nodes also go through a temporary name.
//! - **Setuid only with its owner (H3).** As root ([`Privileges`]), an entry gets its recorded
//!   owner (the name where this host knows it, else the number) before its mode; setuid/setgid
//!   bits are dropped from anything not restored with its owner (not root, no owner recorded,
//!   chown refused). Directories are made 0700 and get owner, mode, attributes and mtime at the
//!   end, deepest first (L2). Order per entry: owner, mode, xattrs (ACLs after the mode), mtime.
//! - **Hard links stay links.** The first name of a `(dev, inode)` in plan order is written;
//!   later names are linked to it after the last flush, or written as files if it failed.
//! - **Sparse stays sparse.** Recorded holes are not written (when the bytes there are zeros).
//! - **Failures are local.** A block that cannot be had, a bad path or an entry that cannot be
//!   written fails that entry only; only target-level failures (the root, a full disk) stop the
//!   run. What is lost for a reason not the entry's (ownership or devices as non-root, an xattr
//!   namespace refused) is counted per kind in [`RestoreReport::not_restored`], said once.
//! - **Memory that does not grow with the tree.** The plan holds the blocks, their use counts
//!   and a 4-byte block number per chunk, not the entries: they are read from the catalog as
//!   they are restored (retention keeps the version meanwhile, `catalog::ReadPins`). What grows with the tree: the directories (their metadata is set at the end), the
//!   first names of hard-linked files and, for a resumed run, the files found complete.
//! - **Bounded memory and descriptors.** Decoded blocks stay in a cache while they still have
//!   uses, at most `cache_blocks` of them; the files queued for the writer threads keep at most
//!   `FLIGHT_BLOCKS` more alive ([`write`]). Descriptors: the current path's directories, plus
//!   one per directory holding a staged file, in at most three batches (one filling, one
//!   waiting, one flushing; a batch closes early past 512 directories).
//! - **Threads.** The walking thread makes directories, links and nodes in plan order and takes
//!   every file's bytes from the cache; writer threads write the files, a directory's files per
//!   job; a flusher thread makes each batch durable and renames it into place while the next is
//!   written ([`write`]).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};

use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, Stat, fchmod, linkat, mkdirat, mknodat, openat, readlinkat,
    renameat, symlinkat, unlinkat,
};
use rustix::io::Errno;

use crate::data::{BlockId, ChunkId, PackedBlock};
use crate::store::catalog::{self, FileEntry, FileKind, SnapshotId};
use crate::store::{KvStore, StoreError};

mod attrs;
mod dirs;
mod write;

use attrs::Attrs;
use dirs::{DirStack, file_type, lstat_at, open_dir, remove_stale};
use write::{
    FLIGHT_BLOCKS, FileJob, Finished, Flushed, GROUP_BYTES, GROUP_FILES, QUEUE_PER_WRITER,
    QUEUED_MAX_BLOCKS, Staged, WriteJob, Written, flush_batch, flusher, remove_staged,
    write_staged, writer, writer_threads,
};

/// Prefix of a file's temporary name while it is written.
pub const TEMP_PREFIX: &str = ".bitdust-restore-";

/// What to restore: which entries (read from the catalog in walk order as the restore goes,
/// not held), the blocks they need and how often.
#[derive(Clone)]
pub struct RestorePlan {
    kv: Arc<dyn KvStore>,
    snapshot: SnapshotId,
    /// The restored path's ancestors' directories (none for the whole snapshot).
    ancestors: Vec<FileEntry>,
    /// The restored path's entry (`None`: the whole snapshot).
    top: Option<FileEntry>,
    /// Entries the walk does not reach (a damaged or altered catalog): taken after it, as the
    /// restore found them before it read in walk order (unsafe paths are refused, a missing
    /// parent directory is made).
    unreached: Vec<FileEntry>,
    /// How many entries, and the regular files' bytes.
    entries: u64,
    bytes: u64,
    /// Every block needed, in order of first need (less those of files a resumed run found
    /// complete, [`RestorePlan::skip_complete`]).
    pub blocks: Vec<BlockId>,
    /// Every block the tree needs, in order of first need: what `chunk_blocks` numbers.
    order: Vec<BlockId>,
    /// The block of every chunk of every file, in walk order, as a number into `order` (4 bytes
    /// a chunk where a map would hold ~80).
    chunk_blocks: Vec<u32>,
    /// Per block: how many chunk uses the plan holds (the cache drops a block at its last use).
    uses: HashMap<BlockId, u64>,
    /// Files found complete by [`RestorePlan::skip_complete`]: their uses are out of `uses`.
    complete: HashSet<Vec<u8>>,
}

impl std::fmt::Debug for RestorePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestorePlan")
            .field("snapshot", &self.snapshot)
            .field("top", &self.top.as_ref().map(|t| lossy(&t.path)))
            .field("entries", &self.entries)
            .field("bytes", &self.bytes)
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

impl RestorePlan {
    /// Sum of the regular files' sizes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How many entries (files, directories, links, nodes) the restore goes through.
    pub fn entries_total(&self) -> u64 {
        self.entries
    }

    /// The entries in the order the backup walked them (parents before children), read from
    /// the catalog as they are taken.
    pub fn entries(&self) -> impl Iterator<Item = Result<FileEntry, StoreError>> + '_ {
        let (walk, failed) = match self.walk() {
            Ok(walk) => (Some(walk), None),
            Err(e) => (None, Some(Err(e))),
        };
        self.ancestors
            .iter()
            .cloned()
            .map(Ok)
            .chain(failed)
            .chain(walk.into_iter().flatten())
            .chain(self.unreached.iter().cloned().map(Ok))
    }

    /// The restored tree (or subtree) read in walk order.
    fn walk(&self) -> Result<catalog::tree::TreeWalk<'_>, StoreError> {
        match &self.top {
            Some(top) => Ok(catalog::tree::TreeWalk::under(
                &*self.kv,
                self.snapshot,
                top.clone(),
            )),
            None => catalog::tree::TreeWalk::whole(&*self.kv, self.snapshot),
        }
    }

    /// The block of each of a file's chunks that the index knows (looked up).
    pub fn blocks_of(&self, entry: &FileEntry) -> Result<HashMap<ChunkId, BlockId>, StoreError> {
        if entry.kind != FileKind::File || entry.chunks.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(catalog::chunk_blocks_of(&*self.kv, entry.chunks.clone())?
            .into_iter()
            .filter_map(|(chunk, block)| Some((chunk, block?)))
            .collect())
    }

    /// The entries in walk order ([`RestorePlan::entries`]), each file with the blocks of its
    /// chunks as the plan found them (in the same order: the plan keeps one block number per
    /// chunk, not a map of chunks), so nothing is looked up again.
    pub fn entries_with_blocks(
        &self,
    ) -> impl Iterator<Item = Result<(FileEntry, HashMap<ChunkId, BlockId>), StoreError>> + '_ {
        let mut next = 0usize;
        self.entries().map(move |entry| {
            let entry = entry?;
            if entry.kind != FileKind::File {
                return Ok((entry, HashMap::new()));
            }
            let numbers = self.chunk_blocks.get(next..next + entry.chunks.len());
            next += entry.chunks.len();
            let blocks = match numbers {
                Some(numbers) => entry
                    .chunks
                    .iter()
                    .zip(numbers)
                    .filter_map(|(c, n)| Some((*c, *self.order.get(*n as usize)?)))
                    .collect(),
                // Not as planned (cannot happen while the version is pinned): look them up.
                None => self.blocks_of(&entry)?,
            };
            Ok((entry, blocks))
        })
    }

    /// For a resumed restore: finds the files already complete under the target (size and mtime
    /// match, as a killed run left them), and takes their blocks out of `blocks` where no other
    /// file needs them, so the caller fetches only what is missing. The entries stay in the plan:
    /// [`restore_files`] checks them again (a file changed since is written after all, its blocks
    /// then asked for on demand). Returns how many files were found complete. With
    /// `overwrite` nothing is: every file is rewritten (M5).
    pub fn skip_complete(&mut self, target: &RestoreTarget) -> Result<u64, StoreError> {
        if target.overwrite {
            return Ok(0);
        }
        let Ok(root) = rustix::fs::open(
            &target.root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return Ok(0);
        };
        // Held directories as in the writer: one open per directory, not a path walk per file.
        let mut dirs = DirStack::new(Arc::new(root));
        // The last parent found missing: its other files are not looked for (a restore into a
        // new directory would otherwise try to open a parent once per file).
        let mut missing: Option<Vec<u8>> = None;
        let mut complete = HashSet::new();
        // Uses given back, per block.
        let mut released: HashMap<BlockId, u64> = HashMap::new();
        for item in self.entries_with_blocks() {
            let (entry, blocks) = item?;
            if entry.kind != FileKind::File || self.complete.contains(&entry.path) {
                continue;
            }
            let Some(parts) = components(&entry.path) else {
                continue;
            };
            let (parent, name) = split(&parts);
            let parent_path = entry
                .path
                .len()
                .checked_sub(name.len() + 1)
                .map_or(&b""[..], |end| &entry.path[..end]);
            if missing.as_deref() == Some(parent_path) {
                continue;
            }
            let found = match dirs.at(&parent, false) {
                Ok(dir) => matches!(
                    lstat_at(dir.as_fd(), &name),
                    Ok(Some(st)) if is_complete(&st, &entry)
                ),
                Err(_) => {
                    missing = Some(parent_path.to_vec());
                    false
                }
            };
            if !found {
                continue;
            }
            for block in entry.chunks.iter().filter_map(|c| blocks.get(c)) {
                *released.entry(*block).or_default() += 1;
            }
            complete.insert(entry.path);
        }
        for (block, given_back) in released {
            if let Some(n) = self.uses.get_mut(&block) {
                *n = n.saturating_sub(given_back);
                if *n == 0 {
                    self.uses.remove(&block);
                }
            }
        }
        let found = complete.len() as u64;
        self.complete.extend(complete);
        let uses = &self.uses;
        self.blocks.retain(|b| uses.contains_key(b));
        Ok(found)
    }
}

/// Where to restore to.
#[derive(Clone, Debug)]
pub struct RestoreTarget {
    /// `--to`, created if missing.
    pub root: PathBuf,
    /// Replace existing different entries (via temp + rename), and rewrite files even when
    /// their size and mtime match (only content proves a file intact, M5).
    pub overwrite: bool,
    /// What the process may do: chown and mknod as root only.
    pub privileges: Privileges,
}

impl RestoreTarget {
    /// A target with the privileges this process has.
    pub fn new(root: PathBuf, overwrite: bool) -> Self {
        RestoreTarget {
            root,
            overwrite,
            privileges: Privileges::detect(),
        }
    }
}

/// The process's standing for a restore, a value so that a test run as root can take the
/// ordinary user's path too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Privileges {
    /// Owners are restored and device nodes made only as root.
    pub root: bool,
    /// The effective user and group: entries recorded with these need no chown.
    pub uid: u32,
    pub gid: u32,
}

impl Privileges {
    /// This process's effective ids.
    pub fn detect() -> Self {
        let uid = rustix::process::geteuid();
        Privileges {
            root: uid.is_root(),
            uid: uid.as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }
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
    /// Later names of hard-linked files, restored as links to the first.
    pub hardlinks: u64,
    /// FIFOs and device nodes made.
    pub specials: u64,
    /// Entries not restored: path, reason.
    pub failed: Vec<(Vec<u8>, String)>,
    /// What could not be restored for a reason that is not the entry's (not root, a file
    /// system that refuses an attribute namespace), one line per kind: the entries are
    /// restored without it and are not in `failed`. For the CLI to print once each.
    pub not_restored: Vec<NotRestored>,
}

/// A kind of metadata or entry not restored, how many times, and why (the first reason seen).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotRestored {
    pub what: Unrestorable,
    pub count: u64,
    pub why: String,
}

/// What [`NotRestored`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unrestorable {
    /// Entries left owned by the user who restores (not root, or chown refused).
    Ownership,
    /// Setuid/setgid bits dropped from entries not restored with their owner (H3).
    SetIdBits,
    /// Device nodes not made (mknod needs root).
    CharDevices,
    BlockDevices,
    /// Extended attributes (ACLs are `system.`) the target or the process refused.
    Xattrs(XattrNamespace),
}

/// An extended attribute's namespace, from its name's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum XattrNamespace {
    User,
    Trusted,
    Security,
    System,
    Other,
}

impl XattrNamespace {
    pub fn of(name: &[u8]) -> Self {
        match name.split(|b| *b == b'.').next() {
            Some(b"user") => XattrNamespace::User,
            Some(b"trusted") => XattrNamespace::Trusted,
            Some(b"security") => XattrNamespace::Security,
            Some(b"system") => XattrNamespace::System,
            _ => XattrNamespace::Other,
        }
    }
}

impl std::fmt::Display for Unrestorable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unrestorable::Ownership => "ownership",
            Unrestorable::SetIdBits => "setuid/setgid bits",
            Unrestorable::CharDevices => "character devices",
            Unrestorable::BlockDevices => "block devices",
            Unrestorable::Xattrs(XattrNamespace::User) => "user.* extended attributes",
            Unrestorable::Xattrs(XattrNamespace::Trusted) => "trusted.* extended attributes",
            Unrestorable::Xattrs(XattrNamespace::Security) => "security.* extended attributes",
            Unrestorable::Xattrs(XattrNamespace::System) => "system.* extended attributes (ACLs)",
            Unrestorable::Xattrs(XattrNamespace::Other) => "other extended attributes",
        })
    }
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

#[cfg(test)]
mod walk_order_tests {
    use super::*;

    /// `sub` is `path` itself or lies below it (the empty path is the root, above everything).
    fn is_within(path: &[u8], sub: &[u8]) -> bool {
        path.is_empty()
            || sub == path
            || (sub.len() > path.len() && sub.starts_with(path) && sub[path.len()] == b'/')
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

    fn entry(path: &str, kind: FileKind) -> FileEntry {
        FileEntry {
            path: path.as_bytes().to_vec(),
            kind,
            ..FileEntry::default()
        }
    }

    #[test]
    fn entries_sort_as_the_walker_visits_them() {
        let mut files = [
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

    /// Random trees with names that sort around `/` (`-` and `.` before it, `0` after): the
    /// catalog read in walk order is the whole tree sorted by `walk_order`, and so is any
    /// subtree, without holding or sorting the tree.
    #[test]
    fn the_catalog_read_in_walk_order_is_the_sorted_tree() {
        use crate::store::catalog::tree::{TreeWalk, unreachable};
        use rand::{Rng, SeedableRng};
        let names: [&[u8]; 7] = [b"a", b"a-b", b"a0", b"b", b"-", b"a.b", b"\xff"];
        let snap = SnapshotId(3);
        for seed in 0..20 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut entries = vec![FileEntry {
                kind: FileKind::Dir,
                ..FileEntry::default()
            }];
            let mut dirs: Vec<Vec<u8>> = vec![Vec::new()];
            for _ in 0..80 {
                let mut path = dirs[rng.gen_range(0..dirs.len())].clone();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(names[rng.gen_range(0..names.len())]);
                if entries.iter().any(|e| e.path == path) {
                    continue;
                }
                let kind = if rng.gen_bool(0.4) {
                    dirs.push(path.clone());
                    FileKind::Dir
                } else {
                    FileKind::File
                };
                entries.push(FileEntry {
                    path,
                    kind,
                    ..FileEntry::default()
                });
            }
            let kv = crate::store::MemStore::new();
            let mut batch = crate::store::Batch::new();
            for e in &entries {
                catalog::put_file(&mut batch, snap, e);
            }
            kv.write(batch).expect("write");
            entries.sort_by(walk_order);
            let paths = |walk: &mut dyn Iterator<Item = Result<FileEntry, StoreError>>| {
                walk.map(|e| e.expect("entry").path).collect::<Vec<_>>()
            };
            let want: Vec<Vec<u8>> = entries.iter().map(|e| e.path.clone()).collect();
            let mut whole = TreeWalk::whole(&kv, snap).expect("walk");
            assert_eq!(paths(&mut whole), want, "seed {seed}");
            for top in entries.iter().filter(|e| e.kind == FileKind::Dir) {
                let want: Vec<Vec<u8>> = want
                    .iter()
                    .filter(|p| is_within(&top.path, p))
                    .cloned()
                    .collect();
                let mut under = TreeWalk::under(&kv, snap, top.clone());
                assert_eq!(paths(&mut under), want, "seed {seed}, under {:?}", top.path);
                assert!(!under.irregular());
            }
            assert!(!whole.irregular());
            assert!(unreachable(&kv, snap, None).expect("scan").is_empty());
        }
    }

    /// Entries no directory leads to (an altered catalog) are not walked; `unreachable` finds
    /// them in path order and the plan takes them last (as the restore did before it read in
    /// walk order), so they are restored or refused, never dropped.
    #[test]
    fn entries_the_walk_cannot_reach_are_found_and_planned_last() {
        use crate::store::catalog::tree::{TreeWalk, unreachable};
        let snap = SnapshotId(1);
        let kv: Arc<dyn KvStore> = Arc::new(crate::store::MemStore::new());
        let mut batch = crate::store::Batch::new();
        for (path, kind) in [
            ("", FileKind::Dir),
            ("a", FileKind::Dir),
            ("a/x", FileKind::File),
            ("a//z", FileKind::File),
            ("b/y", FileKind::Symlink),
            ("f", FileKind::File),
            ("f/under-a-file", FileKind::File),
        ] {
            let e = entry(path, kind);
            catalog::put_file(&mut batch, snap, &e);
        }
        kv.write(batch).expect("write");
        let mut walk = TreeWalk::whole(&*kv, snap).expect("walk");
        let walked: Vec<Vec<u8>> = walk.by_ref().map(|e| e.expect("entry").path).collect();
        assert_eq!(walked, [&b""[..], b"f", b"a", b"a/x"]);
        assert!(walk.irregular());
        // Each kind alone is noticed: under no directory, an empty name, below a file.
        for (extra, kind) in [
            ("b/y", FileKind::File),
            ("a//z", FileKind::File),
            ("f/u", FileKind::Dir),
        ] {
            let one: Arc<dyn KvStore> = Arc::new(crate::store::MemStore::new());
            let mut batch = crate::store::Batch::new();
            for (path, kind) in [
                ("", FileKind::Dir),
                ("a", FileKind::Dir),
                ("f", FileKind::File),
                (extra, kind),
            ] {
                catalog::put_file(&mut batch, snap, &entry(path, kind));
            }
            one.write(batch).expect("write");
            let mut walk = TreeWalk::whole(&*one, snap).expect("walk");
            assert_eq!(walk.by_ref().count(), 3, "{extra}");
            assert!(walk.irregular(), "{extra}");
            // A file as the top, with something below it.
            let file = catalog::file(&*one, snap, b"f").expect("read").expect("f");
            let mut under = TreeWalk::under(&*one, snap, file);
            assert_eq!(under.by_ref().count(), 1);
            assert_eq!(under.irregular(), extra == "f/u", "{extra}");
        }
        // A root that is a file (a single-file source): regular alone, irregular with anything
        // else stored in the snapshot.
        for others in [&[][..], &["x"][..], &["x", "y"][..]] {
            let one: Arc<dyn KvStore> = Arc::new(crate::store::MemStore::new());
            let mut batch = crate::store::Batch::new();
            catalog::put_file(&mut batch, snap, &entry("", FileKind::File));
            for path in others {
                catalog::put_file(&mut batch, snap, &entry(path, FileKind::File));
            }
            one.write(batch).expect("write");
            let mut walk = TreeWalk::whole(&*one, snap).expect("walk");
            assert_eq!(walk.by_ref().count(), 1, "{others:?}");
            assert_eq!(walk.irregular(), !others.is_empty(), "{others:?}");
        }
        let lost: Vec<Vec<u8>> = unreachable(&*kv, snap, None)
            .expect("scan")
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(lost, [&b"a//z"[..], b"b/y", b"f/under-a-file"]);
        let plan = plan(kv, snap, None).expect("plan");
        assert_eq!(plan.entries_total(), 7);
        let order: Vec<Vec<u8>> = plan.entries().map(|e| e.expect("entry").path).collect();
        assert_eq!(
            order,
            [
                &b""[..],
                b"f",
                b"a",
                b"a/x",
                b"a//z",
                b"b/y",
                b"f/under-a-file"
            ]
        );
    }
}

/// Chunks looked up in the index at a time while planning.
const PLAN_LOOKUP_BATCH: usize = 1 << 16;

/// Reads the snapshot's tree (or the part at `sub_path`, with its ancestors' directories) once
/// in walk order, without holding it: counts it, and lists the blocks its files need in order
/// of first need, with how many chunk uses each has.
pub fn plan(
    kv: Arc<dyn KvStore>,
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
            Some(trimmed).filter(|s| !s.is_empty())
        }
    };
    let (ancestors, top) = match sub {
        None => (Vec::new(), None),
        Some(sub) => {
            let top = catalog::file(&*kv, snapshot, sub)?
                .ok_or_else(|| RestoreError::NotFound(lossy(sub)))?;
            // The directories above it, the root first.
            let mut ends = vec![0];
            ends.extend(
                sub.iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b'/')
                    .map(|(i, _)| i),
            );
            let mut ancestors = Vec::new();
            for end in ends {
                if let Some(dir) =
                    catalog::file(&*kv, snapshot, &sub[..end])?.filter(|e| e.kind == FileKind::Dir)
                {
                    ancestors.push(dir);
                }
            }
            (ancestors, Some(top))
        }
    };
    let mut plan = RestorePlan {
        kv,
        snapshot,
        ancestors,
        top,
        unreached: Vec::new(),
        entries: 0,
        bytes: 0,
        blocks: Vec::new(),
        order: Vec::new(),
        chunk_blocks: Vec::new(),
        uses: HashMap::new(),
        complete: HashSet::new(),
    };
    let mut entries = 0u64;
    let mut bytes = 0u64;
    let mut found = Found::default();
    // Files whose chunks are not looked up yet: path and chunks, in walk order.
    let mut waiting: Vec<(Vec<u8>, Vec<ChunkId>)> = Vec::new();
    let mut waiting_chunks = 0;
    let mut walk = plan.walk()?;
    for entry in plan.ancestors.iter().cloned().map(Ok).chain(walk.by_ref()) {
        let entry = entry?;
        entries += 1;
        if entry.kind != FileKind::File {
            continue;
        }
        bytes += entry.size;
        waiting_chunks += entry.chunks.len();
        waiting.push((entry.path, entry.chunks));
        if waiting_chunks >= PLAN_LOOKUP_BATCH {
            first_needs(&*plan.kv, &mut waiting, &mut found)?;
            waiting_chunks = 0;
        }
    }
    // The walk reaches what a backup records; anything else comes after it, not dropped.
    if walk.irregular() {
        let top_path = plan.top.as_ref().map(|t| t.path.clone());
        plan.unreached = catalog::tree::unreachable(&*plan.kv, snapshot, top_path.as_deref())?;
        for entry in &plan.unreached {
            entries += 1;
            if entry.kind == FileKind::File {
                bytes += entry.size;
                waiting.push((entry.path.clone(), entry.chunks.clone()));
            }
        }
    }
    first_needs(&*plan.kv, &mut waiting, &mut found)?;
    plan.entries = entries;
    plan.bytes = bytes;
    plan.blocks = found.order.clone();
    plan.order = found.order;
    plan.chunk_blocks = found.chunk_blocks;
    plan.uses = found.uses;
    Ok(plan)
}

/// What planning found so far: the blocks in order of first need, each chunk's block number,
/// each block's uses.
#[derive(Default)]
struct Found {
    order: Vec<BlockId>,
    numbers: HashMap<BlockId, u32>,
    chunk_blocks: Vec<u32>,
    uses: HashMap<BlockId, u64>,
}

/// Looks up the blocks of the waiting files' chunks (one sorted multi-get), then, in the files'
/// order, numbers the blocks not seen yet and counts every chunk's use.
fn first_needs(
    kv: &dyn KvStore,
    waiting: &mut Vec<(Vec<u8>, Vec<ChunkId>)>,
    found: &mut Found,
) -> Result<(), RestoreError> {
    let wanted: Vec<ChunkId> = waiting
        .iter()
        .flat_map(|(_, c)| c.iter().copied())
        .collect();
    let looked_up: HashMap<ChunkId, Option<BlockId>> =
        catalog::chunk_blocks_of(kv, wanted)?.into_iter().collect();
    for (path, chunks) in waiting.drain(..) {
        for chunk in &chunks {
            let Some(block) = looked_up.get(chunk).copied().flatten() else {
                return Err(RestoreError::UnknownChunk { path: lossy(&path) });
            };
            let number = match found.numbers.get(&block) {
                Some(n) => *n,
                None => {
                    if catalog::block(kv, &block)?.is_none() {
                        return Err(RestoreError::UnknownBlock { path: lossy(&path) });
                    }
                    let n = u32::try_from(found.order.len()).unwrap_or(u32::MAX);
                    found.numbers.insert(block, n);
                    found.order.push(block);
                    n
                }
            };
            found.chunk_blocks.push(number);
            *found.uses.entry(block).or_default() += 1;
        }
    }
    Ok(())
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
    /// Blocks evicted while they still had uses, kept on disk so they are never fetched twice.
    spill: Spill,
}

/// Decoded blocks the cache let go while they still had uses, in an unnamed file (`O_TMPFILE`)
/// in the target's file system: read back instead of fetched again. Created at the first
/// eviction; where it cannot be made or written (no `O_TMPFILE`, a full disk), evicted blocks are
/// fetched again as before.
struct Spill {
    root: Arc<OwnedFd>,
    file: Option<File>,
    /// Set once making or writing the file failed: not tried again.
    broken: bool,
    end: u64,
    /// Block → (offset, length) in `file`.
    index: HashMap<BlockId, (u64, usize)>,
}

impl Spill {
    fn new(root: Arc<OwnedFd>) -> Self {
        Spill {
            root,
            file: None,
            broken: false,
            end: 0,
            index: HashMap::new(),
        }
    }

    fn put(&mut self, block: BlockId, plain: &[u8]) {
        if self.broken || self.index.contains_key(&block) {
            return;
        }
        if self.file.is_none() {
            match openat(
                self.root.as_fd(),
                ".",
                OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(fd) => self.file = Some(File::from(fd)),
                Err(e) => {
                    tracing::debug!(error = %e, "no spill file: evicted blocks are fetched again");
                    self.broken = true;
                    return;
                }
            }
        }
        let Some(file) = &self.file else { return };
        match file.write_all_at(plain, self.end) {
            Ok(()) => {
                self.index.insert(block, (self.end, plain.len()));
                self.end += plain.len() as u64;
            }
            Err(e) => {
                tracing::debug!(error = %e, "the spill file cannot grow: blocks fetched again");
                self.broken = true;
            }
        }
    }

    /// A spilled block's bytes, if it was spilled and reads back whole.
    fn get(&self, block: &BlockId) -> Option<Arc<Vec<u8>>> {
        let (at, len) = *self.index.get(block)?;
        let file = self.file.as_ref()?;
        let mut plain = vec![0; len];
        file.read_exact_at(&mut plain, at).ok()?;
        Some(Arc::new(plain))
    }

    fn forget(&mut self, block: &BlockId) {
        self.index.remove(block);
    }
}

impl BlockCache<'_> {
    /// Whether `block` is decoded in memory (taking a chunk of it will not wait).
    fn holds(&self, block: &BlockId) -> bool {
        self.blocks.contains_key(block)
    }

    /// One use of `block` is done (or given up): at the last one the block leaves the cache.
    fn used(&mut self, block: &BlockId) {
        if let Some(n) = self.remaining.get_mut(block) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.remaining.remove(block);
                self.blocks.remove(block);
                self.spill.forget(block);
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
    fn chunk(&mut self, block: BlockId, chunk: &ChunkId) -> Result<Piece, Unavailable> {
        self.tick += 1;
        if !self.blocks.contains_key(&block) {
            if let Some(why) = self.unavailable.get(&block) {
                return Err(Unavailable {
                    block,
                    why: why.clone(),
                });
            }
            let spilled = self.spill.get(&block);
            let plain = match spilled.map_or_else(|| (self.get_block)(block), Ok) {
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
                if let Some(evicted) = self.blocks.remove(&oldest)
                    && self.remaining.get(&oldest).is_some_and(|n| *n > 0)
                {
                    self.spill.put(oldest, &evicted.plain);
                }
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
        Ok(Piece {
            block: cached.plain.clone(),
            start,
            end,
        })
    }
}

/// A chunk's bytes inside its decoded block (which the piece keeps alive until written).
struct Piece {
    block: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        &self.block[self.start..self.end]
    }
}

/// Outcome of one entry.
enum Done {
    Written(u64),
    /// A file written under its temporary name, renamed at the batch's flush.
    Staged(u64),
    Existing,
    /// A later name of a hard-linked file: linked to the first after the last flush.
    Deferred,
    /// A file given to a writer thread, or written in line and already counted: its outcome is
    /// counted by [`Restorer::finished`], not by the caller.
    Queued,
    /// Not made for a reason that is not the entry's (a device as non-root): counted in
    /// `not_restored`, not a failure.
    NotMade,
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

    fn errno(what: &str, e: Errno) -> EntryError {
        EntryError::io(what, e.into())
    }
}

/// A target-level failure met while handling one entry (found collecting the writers' files).
impl From<RestoreError> for EntryError {
    fn from(e: RestoreError) -> Self {
        match e {
            RestoreError::Target(e) => EntryError::Target(e),
            other => EntryError::Target(std::io::Error::other(other.to_string())),
        }
    }
}

impl From<String> for EntryError {
    fn from(reason: String) -> Self {
        EntryError::Entry(reason)
    }
}

#[cfg(test)]
fn system_time(ns: i64) -> std::time::SystemTime {
    use std::time::{Duration, UNIX_EPOCH};
    let magnitude = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

#[cfg(test)]
fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
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
fn is_complete(st: &Stat, entry: &FileEntry) -> bool {
    let mtime = st
        .st_mtime
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_mtime_nsec as i64);
    file_type(st) == FileType::RegularFile
        && st.st_size as u64 == entry.size
        && same_mtime(mtime, entry.mtime_ns)
}

/// The temporary name of `name` while it is written: fixed per name (so a resumed run finds a
/// stale one), short whatever the name's length.
fn temp_name(name: &[u8]) -> Vec<u8> {
    let hash = blake3::hash(name);
    let mut out = TEMP_PREFIX.as_bytes().to_vec();
    out.extend_from_slice(hash.to_hex()[..32].as_bytes());
    out
}

#[cfg(test)]
fn os(bytes: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(bytes)
}

/// An entry's parent components and its own name (`parts` is never empty here).
fn split<'p>(parts: &[&'p [u8]]) -> (Vec<&'p [u8]>, Vec<u8>) {
    let (last, parent) = parts
        .split_last()
        .map_or((&b""[..], &[][..]), |(l, p)| (*l, p));
    (parent.to_vec(), last.to_vec())
}

/// The restore in progress.
struct Restorer<'a> {
    overwrite: bool,
    /// The open directories along the current path.
    dirs: DirStack,
    attrs: Attrs,
    report: RestoreReport,
    counters: &'a RestoreCounters,
    /// Whether the current file's chunk uses were counted (by its `ChunkSource`).
    consumed: bool,
    /// The plan's files found complete before the run (their uses are not counted).
    complete: &'a HashSet<Vec<u8>>,
    /// Files written, waiting for the flush that makes them durable before their rename.
    pending: Vec<Staged>,
    pending_bytes: u64,
    /// How many times the staged files' directory changed along `pending` (at least the number
    /// of distinct directories they hold open).
    pending_dirs: usize,
    /// Hard links: the first name of each `(dev, inode)`, and those whose file failed.
    leaders: HashMap<(u64, u64), Arc<FileEntry>>,
    failed_leaders: HashSet<(u64, u64)>,
    /// Directories whose owner, mode, attributes and mtime are set at the end, deepest first
    /// (writing into a directory changes its mtime, and a read-only mode would stop the writes).
    dirs_done: Vec<Arc<FileEntry>>,
    /// To each writer thread (none once they are told to stop), and back.
    writers: Vec<SyncSender<WriteJob>>,
    done: Receiver<Finished>,
    /// Jobs sent and not back.
    in_flight: usize,
    /// The job being filled (files of one directory), and the directory and writer thread of
    /// the last job sent.
    group: Option<WriteJob>,
    last_sent: Option<(Arc<OwnedFd>, usize)>,
    /// To the flusher thread (`None`: flushed here), and back; batches sent and not back.
    flusher: Option<SyncSender<Vec<Staged>>>,
    flushed_rx: Receiver<Flushed>,
    flushing: usize,
    /// The blocks kept alive by the files in flight, with how many files each.
    flight_blocks: HashMap<BlockId, usize>,
}

impl<'a> Restorer<'a> {
    fn dir(&mut self, parts: &[&[u8]]) -> Result<Done, EntryError> {
        if parts.is_empty() {
            // The root, opened by restore_files (the user's `--to`, which may be a link).
            let root = self.dirs.root().clone();
            writable(root.as_fd())?;
            return Ok(Done::Written(0));
        }
        let (parent_parts, name) = split(parts);
        let parent = self.dirs.at(&parent_parts, true)?;
        let (fd, fresh) = match mkdirat(parent.as_fd(), name.as_slice(), Mode::from_raw_mode(0o700))
        {
            // Private until its recorded mode is set at the end (L2).
            Ok(()) => (
                open_dir(parent.as_fd(), &name).map_err(|e| EntryError::errno("opening", e))?,
                true,
            ),
            Err(Errno::EXIST) => match open_dir(parent.as_fd(), &name) {
                Ok(fd) => {
                    writable(fd.as_fd())?;
                    (fd, false)
                }
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(EntryError::Entry(
                        "exists and is not a directory (not replaced)".into(),
                    ));
                }
                Err(e) => return Err(EntryError::errno("opening", e)),
            },
            Err(e) => return Err(EntryError::errno("creating", e)),
        };
        self.dirs.push(&name, Arc::new(fd), fresh);
        Ok(Done::Written(0))
    }

    fn symlink(&mut self, entry: &FileEntry, parts: &[&[u8]]) -> Result<Done, EntryError> {
        let (parent_parts, name) = split(parts);
        let dir = self.dirs.at(&parent_parts, true)?;
        if let Some(st) = lstat_at(dir.as_fd(), &name)? {
            if file_type(&st) == FileType::Symlink
                && readlinkat(dir.as_fd(), name.as_slice(), Vec::new())
                    .is_ok_and(|t| t.as_bytes() == &entry.target[..])
            {
                return Ok(Done::Existing);
            }
            may_replace(&st, self.overwrite)?;
        }
        let temp = temp_name(&name);
        let make = || symlinkat(entry.target.as_slice(), dir.as_fd(), temp.as_slice());
        match make() {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                remove_stale(dir.as_fd(), &temp)?;
                make().map_err(|e| EntryError::errno("creating the link", e))?;
            }
            Err(e) => return Err(EntryError::errno("creating the link", e)),
        }
        let placed = self
            .attrs
            .on_link(dir.as_fd(), &temp, entry)
            .and_then(|()| rename_in(&dir, &temp, &name));
        if placed.is_err() {
            let _ = unlinkat(dir.as_fd(), temp.as_slice(), AtFlags::empty());
        }
        placed.map(|()| Done::Written(0))
    }

    /// A FIFO or a device node: made under a temporary name, given its owner, mode and mtime,
    /// then renamed, so an existing entry is never half-replaced.
    fn node(&mut self, entry: &FileEntry, parts: &[&[u8]]) -> Result<Done, EntryError> {
        let (file_type_wanted, lost) = match entry.kind {
            FileKind::CharDevice => (FileType::CharacterDevice, Unrestorable::CharDevices),
            FileKind::BlockDevice => (FileType::BlockDevice, Unrestorable::BlockDevices),
            _ => (FileType::Fifo, Unrestorable::CharDevices),
        };
        let device = entry.kind != FileKind::Fifo;
        if device && !self.attrs.privileges().root {
            self.attrs
                .lose(lost, || "not running as root: device nodes not made".into());
            return Ok(Done::NotMade);
        }
        let (parent_parts, name) = split(parts);
        let dir = self.dirs.at(&parent_parts, true)?;
        if let Some(st) = lstat_at(dir.as_fd(), &name)? {
            if file_type(&st) == file_type_wanted && (!device || st.st_rdev == entry.rdev) {
                return Ok(Done::Existing);
            }
            may_replace(&st, self.overwrite)?;
        }
        let temp = temp_name(&name);
        let rdev = if device { entry.rdev } else { 0 };
        let make = || {
            mknodat(
                dir.as_fd(),
                temp.as_slice(),
                file_type_wanted,
                Mode::from_raw_mode(0o600),
                rdev,
            )
        };
        let made = match make() {
            Err(Errno::EXIST) => {
                remove_stale(dir.as_fd(), &temp)?;
                make()
            }
            other => other,
        };
        match made {
            Ok(()) => {}
            Err(e @ (Errno::PERM | Errno::ACCESS)) if device => {
                // Root without CAP_MKNOD (a container): not the entry's fault.
                self.attrs.lose(lost, || format!("mknod: {e}"));
                return Ok(Done::NotMade);
            }
            Err(e) => return Err(EntryError::errno("making the node", e)),
        }
        let placed = openat(
            dir.as_fd(),
            temp.as_slice(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| EntryError::errno("opening the node", e))
        .and_then(|node| {
            // The temporary name could have been swapped since mknod: set nothing on anything
            // but the node made.
            match rustix::fs::fstat(&node) {
                Ok(st) if file_type(&st) == file_type_wanted => {
                    self.attrs.on_node(node.as_fd(), entry)
                }
                Ok(_) => Err(EntryError::Entry("the node was replaced while made".into())),
                Err(e) => Err(EntryError::errno("checking the node", e)),
            }
        })
        .and_then(|()| rename_in(&dir, &temp, &name));
        if placed.is_err() {
            let _ = unlinkat(dir.as_fd(), temp.as_slice(), AtFlags::empty());
        }
        placed.map(|()| Done::Written(0))
    }

    /// Hands the file to a writer thread with its bytes ([`Done::Queued`]); its outcome comes
    /// back through [`Restorer::collect`].
    fn file(
        &mut self,
        entry: &Arc<FileEntry>,
        parts: &[&[u8]],
        cache: &mut BlockCache<'_>,
        chunk_blocks: &HashMap<ChunkId, BlockId>,
    ) -> Result<Done, EntryError> {
        let (parent_parts, name) = split(parts);
        let dir = self.dirs.at(&parent_parts, true)?;
        // A directory this run made holds only what the run put there: nothing by this name.
        if !self.dirs.top_is_fresh()
            && let Some(st) = lstat_at(dir.as_fd(), &name)?
        {
            // With `overwrite` a file is rewritten even when size and mtime match (M5): they
            // prove nothing about the content.
            if !self.overwrite && is_complete(&st, entry) {
                return Ok(Done::Existing);
            }
            may_replace(&st, self.overwrite)?;
        }
        if self.complete.contains(&entry.path) {
            cache.reclaim(entry, chunk_blocks);
        }
        self.consumed = true;
        let temp = temp_name(&name);
        let mut blocks: Vec<BlockId> = Vec::new();
        for chunk in &entry.chunks {
            if let Some(block) = chunk_blocks.get(chunk)
                && !blocks.contains(block)
            {
                blocks.push(*block);
                if blocks.len() > QUEUED_MAX_BLOCKS {
                    break;
                }
            }
        }
        let large = blocks.len() > QUEUED_MAX_BLOCKS || self.writers.is_empty();
        if large || blocks.iter().any(|b| !cache.holds(b)) {
            // The writers get what is gathered before this thread writes or waits for a block.
            self.send_group()?;
        }
        let source = ChunkSource {
            chunks: entry.chunks.iter(),
            cache,
            chunk_blocks,
        };
        if large {
            // A large file: written here, a chunk at a time, staged as soon as it is done.
            let result = write_staged(&dir, &temp, entry, source, &mut self.attrs);
            self.finished(Finished {
                files: vec![Written {
                    entry: entry.clone(),
                    dir,
                    temp,
                    name,
                    result,
                }],
                blocks: Vec::new(),
            })?;
            return Ok(Done::Queued);
        }
        let pieces = source.collect::<Result<Vec<_>, _>>()?;
        let bytes: u64 = pieces.iter().map(|p| (p.end - p.start) as u64).sum();
        if self.group.as_ref().is_some_and(|g| {
            !Arc::ptr_eq(&g.dir, &dir)
                || g.files.len() >= GROUP_FILES
                || g.bytes + bytes > GROUP_BYTES
        }) {
            self.send_group()?;
        }
        let group = self.group.get_or_insert_with(|| WriteJob {
            dir,
            files: Vec::new(),
            blocks: Vec::new(),
            bytes: 0,
        });
        for block in blocks {
            if !group.blocks.contains(&block) {
                group.blocks.push(block);
            }
        }
        group.bytes += bytes;
        group.files.push(FileJob {
            entry: entry.clone(),
            temp,
            name,
            pieces,
        });
        Ok(Done::Queued)
    }

    /// Sends the job being filled to a writer thread: the one that had the last job when it is
    /// the same directory (two threads in one directory contend for its lock), else the next.
    fn send_group(&mut self) -> Result<(), RestoreError> {
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        // Not more blocks kept alive by the queues than allowed: wait for the writers first.
        while self.in_flight > 0 && self.flight_blocks.len() + group.blocks.len() > FLIGHT_BLOCKS {
            self.collect_one()?;
        }
        for block in &group.blocks {
            *self.flight_blocks.entry(*block).or_default() += 1;
        }
        let writer = match &self.last_sent {
            Some((dir, writer)) if Arc::ptr_eq(dir, &group.dir) => *writer,
            Some((_, writer)) => (writer + 1) % self.writers.len().max(1),
            None => 0,
        };
        self.last_sent = Some((group.dir.clone(), writer));
        let sent = self.writers.get(writer).map(|w| w.send(group));
        if !matches!(sent, Some(Ok(()))) {
            return Err(RestoreError::Target(std::io::Error::other(
                "the restore's writer threads stopped",
            )));
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Takes the writer threads' finished files: staged for the next flush, or failed. With
    /// `wait`, until none is in flight.
    fn collect(&mut self, wait: bool) -> Result<(), RestoreError> {
        while self.in_flight > 0 {
            if wait {
                self.collect_one()?;
            } else {
                match self.done.try_recv() {
                    Ok(finished) => {
                        self.in_flight -= 1;
                        self.finished(finished)?;
                    }
                    Err(_) => break,
                }
            }
        }
        Ok(())
    }

    /// Waits for one job in flight.
    fn collect_one(&mut self) -> Result<(), RestoreError> {
        let finished = self.done.recv().map_err(|_| {
            RestoreError::Target(std::io::Error::other(
                "the restore's writer threads stopped",
            ))
        })?;
        self.in_flight -= 1;
        self.finished(finished)
    }

    /// Files written (staged for the next flush) or failed.
    fn finished(&mut self, finished: Finished) -> Result<(), RestoreError> {
        for block in &finished.blocks {
            if let Some(n) = self.flight_blocks.get_mut(block) {
                *n -= 1;
                if *n == 0 {
                    self.flight_blocks.remove(block);
                }
            }
        }
        for written in finished.files {
            let outcome = match written.result {
                Ok(n) => {
                    if self
                        .pending
                        .last()
                        .is_none_or(|last| !Arc::ptr_eq(&last.dir, &written.dir))
                    {
                        self.pending_dirs += 1;
                    }
                    self.pending.push(Staged {
                        dir: written.dir,
                        temp: written.temp,
                        name: written.name,
                        entry: written.entry.path.clone(),
                        identity: written.entry.link_identity(),
                        bytes: n,
                    });
                    self.pending_bytes += n;
                    Ok(Done::Staged(n))
                }
                Err(e) => Err(e),
            };
            self.outcome(&written.entry, outcome)?;
        }
        Ok(())
    }

    /// Sends what is gathered, waits for the files in flight, then hands the batch to the
    /// flusher (with `wait`, until every batch is flushed).
    fn settle(&mut self, wait: bool) -> Result<(), RestoreError> {
        self.send_group()?;
        self.collect(true)?;
        self.flush(wait)
    }

    /// A later name of a hard-linked file, after the last flush: a link to the first name
    /// (`linkat` between held directories). `Ok(None)` when it must be written as a file after
    /// all (the first name failed, or the link could not be made).
    fn link(
        &mut self,
        entry: &FileEntry,
        leader: &FileEntry,
        leaders: &mut DirStack,
    ) -> Result<Option<Done>, EntryError> {
        let (Some(parts), Some(leader_parts)) = (components(&entry.path), components(&leader.path))
        else {
            return Ok(None);
        };
        let (parent_parts, name) = split(&parts);
        let (leader_parent, leader_name) = split(&leader_parts);
        let Ok(from) = leaders.at(&leader_parent, false) else {
            return Ok(None);
        };
        let Ok(Some(leader_st)) = lstat_at(from.as_fd(), &leader_name) else {
            return Ok(None);
        };
        let dir = self.dirs.at(&parent_parts, true)?;
        let existing = lstat_at(dir.as_fd(), &name)?;
        if let Some(st) = &existing {
            if (st.st_dev, st.st_ino) == (leader_st.st_dev, leader_st.st_ino) {
                return Ok(Some(Done::Existing));
            }
            if !self.overwrite && is_complete(st, entry) {
                return Ok(Some(Done::Existing));
            }
            may_replace(st, self.overwrite)?;
        }
        let link_to = |to: &[u8]| {
            linkat(
                from.as_fd(),
                leader_name.as_slice(),
                dir.as_fd(),
                to,
                AtFlags::empty(),
            )
        };
        if existing.is_none() {
            return Ok(link_to(&name).is_ok().then_some(Done::Written(0)));
        }
        // Replacing: link under the temporary name, then rename over.
        let temp = temp_name(&name);
        let linked = match link_to(&temp) {
            Err(Errno::EXIST) => {
                remove_stale(dir.as_fd(), &temp)?;
                link_to(&temp)
            }
            other => other,
        };
        if linked.is_err() {
            return Ok(None);
        }
        match rename_in(&dir, &temp, &name) {
            Ok(()) => Ok(Some(Done::Written(0))),
            Err(e) => {
                let _ = unlinkat(dir.as_fd(), temp.as_slice(), AtFlags::empty());
                Err(e)
            }
        }
    }

    /// Hands the batch of staged files to the flusher thread, and takes the outcome of the
    /// batches it finished (with `wait`, of all of them).
    fn flush(&mut self, wait: bool) -> Result<(), RestoreError> {
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            self.pending_bytes = 0;
            self.pending_dirs = 0;
            match &self.flusher {
                Some(flusher) => {
                    if let Err(unsent) = flusher.send(batch) {
                        self.pending = unsent.0;
                        self.abandon();
                        return Err(RestoreError::Target(std::io::Error::other(
                            "the restore's flusher thread stopped",
                        )));
                    }
                    self.flushing += 1;
                }
                None => {
                    let flushed = flush_batch(self.dirs.root(), batch);
                    self.flushed(flushed)?;
                }
            }
        }
        while self.flushing > 0 {
            let next = if wait {
                self.flushed_rx.recv().ok()
            } else {
                self.flushed_rx.try_recv().ok()
            };
            let Some(flushed) = next else {
                if wait {
                    self.abandon();
                    return Err(RestoreError::Target(std::io::Error::other(
                        "the restore's flusher thread stopped",
                    )));
                }
                break;
            };
            self.flushing -= 1;
            self.flushed(flushed)?;
        }
        Ok(())
    }

    /// Counts a flushed batch into the report; a failed flush stops the run.
    fn flushed(&mut self, flushed: Flushed) -> Result<(), RestoreError> {
        self.report.files += flushed.files;
        self.report.bytes += flushed.bytes;
        for lost in flushed.failed {
            self.leader_failed(lost.identity, &lost.path);
            self.report.failed.push((lost.path, lost.why));
        }
        match flushed.error {
            Some(e) => {
                self.abandon();
                Err(RestoreError::Target(e))
            }
            None => Ok(()),
        }
    }

    /// An entry failed: if it is the first name of a hard-linked file, its later names are
    /// written as files instead (a later name failing changes nothing for the others).
    fn leader_failed(&mut self, identity: Option<(u64, u64)>, path: &[u8]) {
        if let Some(id) = identity
            && self.leaders.get(&id).is_some_and(|l| l.path == path)
        {
            self.failed_leaders.insert(id);
        }
    }

    /// Removes the staged files of a run that stops on a target-level failure.
    fn abandon(&mut self) {
        remove_staged(std::mem::take(&mut self.pending));
    }

    /// Counts an entry's outcome into the report (and its failure, or stops the run).
    fn outcome(
        &mut self,
        entry: &Arc<FileEntry>,
        outcome: Result<Done, EntryError>,
    ) -> Result<(), RestoreError> {
        match outcome {
            Ok(Done::Written(n)) => {
                match entry.kind {
                    FileKind::File
                        if entry.link_identity().is_some_and(|id| {
                            self.leaders.get(&id).is_some_and(|l| l.path != entry.path)
                        }) =>
                    {
                        self.report.hardlinks += 1
                    }
                    FileKind::File => self.report.files += 1,
                    FileKind::Dir => {
                        self.report.dirs += 1;
                        self.dirs_done.push(entry.clone());
                    }
                    FileKind::Symlink => self.report.symlinks += 1,
                    FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice => {
                        self.report.specials += 1
                    }
                }
                self.report.bytes += n;
                RestoreCounters::add(&self.counters.bytes_written, n);
            }
            Ok(Done::Staged(n)) => RestoreCounters::add(&self.counters.bytes_written, n),
            Ok(Done::Existing) => self.report.skipped_existing += 1,
            Ok(Done::Deferred | Done::Queued) => return Ok(()),
            Ok(Done::NotMade) => {}
            Err(EntryError::Entry(reason)) => {
                self.leader_failed(entry.link_identity(), &entry.path);
                self.report.failed.push((entry.path.clone(), reason));
            }
            Err(EntryError::Target(e)) => {
                self.abandon();
                return Err(RestoreError::Target(e));
            }
        }
        RestoreCounters::add(&self.counters.files_done, 1);
        Ok(())
    }
}

/// Renames `temp` to `name` within the held directory `dir` (a rename replaces a final symlink,
/// never follows it).
fn rename_in(dir: &OwnedFd, temp: &[u8], name: &[u8]) -> Result<(), EntryError> {
    renameat(dir.as_fd(), temp, dir.as_fd(), name)
        .map_err(|e| EntryError::errno("renaming into place", e))
}

/// A batch of staged files is flushed at this many files or bytes, whichever comes first: large
/// enough that flushes are rare, small enough that little is rewritten after a crash.
const BATCH_FILES: usize = 16_384;
const BATCH_BYTES: u64 = 256 << 20;
/// ... or when its files hold this many directories open (each staged file keeps its
/// directory's descriptor until its rename).
const BATCH_DIRS: usize = 512;

/// A file's chunks in order, taken from the cache one at a time. Every chunk's use is counted
/// done, had or not: as it is taken, and the rest when the source is dropped (a file that
/// failed midway).
struct ChunkSource<'s, 'c> {
    chunks: std::slice::Iter<'s, ChunkId>,
    cache: &'s mut BlockCache<'c>,
    chunk_blocks: &'s HashMap<ChunkId, BlockId>,
}

impl Iterator for ChunkSource<'_, '_> {
    type Item = Result<Piece, EntryError>;

    fn next(&mut self) -> Option<Self::Item> {
        let chunk = self.chunks.next()?;
        let Some(block) = self.chunk_blocks.get(chunk).copied() else {
            return Some(Err(EntryError::Entry("a chunk is not in the plan".into())));
        };
        let piece = self.cache.chunk(block, chunk);
        self.cache.used(&block);
        Some(piece.map_err(|unavailable| EntryError::Entry(unavailable.to_string())))
    }
}

impl Drop for ChunkSource<'_, '_> {
    fn drop(&mut self) {
        for chunk in self.chunks.by_ref() {
            if let Some(block) = self.chunk_blocks.get(chunk) {
                self.cache.used(block);
            }
        }
    }
}

/// Lets the owner write into a directory a previous run left read-only (its mode is set again
/// at the end), so a resumed run can add what is missing.
fn writable(dir: BorrowedFd<'_>) -> Result<(), EntryError> {
    let st = rustix::fs::fstat(dir).map_err(|e| EntryError::errno("checking", e))?;
    if st.st_mode & 0o700 == 0o700 {
        return Ok(());
    }
    fchmod(dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700))
        .map_err(|e| EntryError::errno("making the directory writable", e))
}

/// Opens the target's root (created if missing; the user's `--to`, so a symlink there is
/// followed).
fn open_root(root: &Path) -> Result<OwnedFd, RestoreError> {
    std::fs::create_dir_all(root).map_err(|source| RestoreError::Root {
        path: root.to_path_buf(),
        source,
    })?;
    match rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(fd),
        Err(Errno::NOTDIR) => Err(RestoreError::RootNotDir {
            path: root.to_path_buf(),
        }),
        Err(e) => Err(RestoreError::Root {
            path: root.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Whether an existing entry that is not the catalog's may be replaced: only with `overwrite`,
/// and never a directory (it may hold anything).
fn may_replace(st: &rustix::fs::Stat, overwrite: bool) -> Result<(), EntryError> {
    if !overwrite {
        return Err(EntryError::Entry(
            "exists and differs (not overwritten)".into(),
        ));
    }
    if file_type(st) == FileType::Directory {
        return Err(EntryError::Entry(
            "a directory is in the way (not replaced)".into(),
        ));
    }
    Ok(())
}

/// Restores every entry of the plan under `target.root`. `get_block` returns a block's PLAIN
/// bytes (decoded by the caller) or an error; it is called in plan order as files need blocks
/// (the caller prefetches ahead in `plan.blocks` order). Decoded blocks stay in a cache while
/// they still have uses, at most `cache_blocks` (an evicted block still needed waits in a spill
/// file, or is asked for again where there is none). A block that cannot be had fails only the files that need it (named in `failed`, with
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
    let root = Arc::new(open_root(&target.root)?);
    let mut cache = BlockCache {
        capacity: cache_blocks,
        blocks: HashMap::new(),
        remaining: plan.uses.clone(),
        unavailable: HashMap::new(),
        tick: 0,
        get_block,
        counters,
        spill: Spill::new(root.clone()),
    };
    let threads = writer_threads();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        let mut writers = Vec::new();
        for _ in 0..threads {
            let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel(QUEUE_PER_WRITER);
            let done = done_tx.clone();
            let attrs = Attrs::new(target.privileges);
            writers.push(
                std::thread::Builder::new()
                    .name("restore-write".into())
                    .spawn_scoped(scope, move || writer(jobs_rx, done, attrs)),
            );
            senders.push(jobs_tx);
        }
        drop(done_tx);
        // One batch flushing, one waiting: each holds the descriptors of its directories.
        let (flush_tx, flush_rx) = std::sync::mpsc::sync_channel(1);
        let (flushed_tx, flushed_rx) = std::sync::mpsc::channel();
        let flusher_root = root.clone();
        let flusher_thread = std::thread::Builder::new()
            .name("restore-flush".into())
            .spawn_scoped(scope, move || flusher(flusher_root, flush_rx, flushed_tx));
        let mut r = Restorer {
            overwrite: target.overwrite,
            dirs: DirStack::new(root.clone()),
            attrs: Attrs::new(target.privileges),
            report: RestoreReport::default(),
            counters,
            consumed: false,
            complete: &plan.complete,
            pending: Vec::new(),
            pending_bytes: 0,
            pending_dirs: 0,
            leaders: HashMap::new(),
            failed_leaders: HashSet::new(),
            dirs_done: Vec::new(),
            writers: senders,
            done: done_rx,
            in_flight: 0,
            group: None,
            last_sent: None,
            flusher: None,
            flushed_rx,
            flushing: 0,
            flight_blocks: HashMap::new(),
        };
        match flusher_thread {
            Ok(_) => r.flusher = Some(flush_tx),
            // Flushed in line.
            Err(e) => tracing::debug!(error = %e, "no flusher thread: batches flushed in line"),
        }
        let ran = if writers.iter().any(|w| w.is_err()) {
            Err(RestoreError::Target(std::io::Error::other(
                "cannot start the restore's writer threads",
            )))
        } else {
            walk_plan(&mut r, plan, &root, &mut cache, (batch_files, batch_bytes))
        };
        // Stop the writers; after a failure, remove what they staged since.
        r.writers.clear();
        r.group = None;
        // The flusher removes what it is still given after a failure; it stops with its channel.
        r.flusher = None;
        for writer in writers.into_iter().flatten() {
            match writer.join() {
                Ok(attrs) => r.attrs.absorb(attrs),
                Err(_) => {
                    return Err(RestoreError::Target(std::io::Error::other(
                        "a restore writer thread panicked",
                    )));
                }
            }
        }
        for late in r.done.try_iter().flat_map(|f| f.files) {
            if late.result.is_ok() {
                let _ = unlinkat(late.dir.as_fd(), late.temp.as_slice(), AtFlags::empty());
            }
        }
        ran?;
        r.report.not_restored = r.attrs.not_restored();
        Ok(r.report)
    })
}

/// Restores every entry of the plan in order, flushing in batches, then the hard links, then
/// the directories' metadata.
fn walk_plan(
    r: &mut Restorer<'_>,
    plan: &RestorePlan,
    root: &Arc<OwnedFd>,
    cache: &mut BlockCache<'_>,
    (batch_files, batch_bytes): (usize, u64),
) -> Result<(), RestoreError> {
    // Later names of hard-linked files, linked after the last flush.
    let mut followers: Vec<Arc<FileEntry>> = Vec::new();
    for item in plan.entries_with_blocks() {
        let (entry, chunk_blocks) = item?;
        let entry = Arc::new(entry);
        let outcome = match components(&entry.path) {
            None => Err(EntryError::Entry(
                "unsafe path (empty, `.` or `..` component, absolute, or NUL)".into(),
            )),
            Some(parts) if parts.is_empty() && entry.kind != FileKind::Dir => Err(
                EntryError::Entry("an empty path that is not the root".into()),
            ),
            Some(parts) => match entry.kind {
                FileKind::Dir => r.dir(&parts),
                FileKind::Symlink => r.symlink(&entry, &parts),
                FileKind::File => match entry.link_identity() {
                    Some(id) if r.leaders.contains_key(&id) && !r.failed_leaders.contains(&id) => {
                        followers.push(entry.clone());
                        Ok(Done::Deferred)
                    }
                    id => {
                        if let Some(id) = id {
                            // The first name, or the next one after a first that failed.
                            r.leaders.insert(id, entry.clone());
                            r.failed_leaders.remove(&id);
                        }
                        r.file(&entry, &parts, cache, &chunk_blocks)
                    }
                },
                FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice => {
                    r.node(&entry, &parts)
                }
            },
        };
        let consumed = std::mem::take(&mut r.consumed);
        if entry.kind == FileKind::File && !consumed && !plan.complete.contains(&entry.path) {
            // Skipped, deferred or failed before reading (an existing file, a bad path): its
            // chunks' uses are released all the same, so the cache frees their blocks.
            for chunk in &entry.chunks {
                if let Some(block) = chunk_blocks.get(chunk) {
                    cache.used(block);
                }
            }
        }
        r.outcome(&entry, outcome)?;
        r.collect(false)?;
        if r.pending.len() >= batch_files
            || r.pending_bytes >= batch_bytes
            || r.pending_dirs >= BATCH_DIRS
        {
            r.settle(false)?;
        }
    }
    r.settle(true)?;
    // Hard links, now that every first name is in place; a name whose first failed is written
    // as a file (its chunks are in the plan; their blocks are asked for again).
    let mut leader_dirs = DirStack::new(root.clone());
    for entry in followers {
        let linked = match entry.link_identity().and_then(|id| {
            (!r.failed_leaders.contains(&id))
                .then(|| r.leaders.get(&id).cloned())
                .flatten()
        }) {
            Some(leader) => r.link(&entry, &leader, &mut leader_dirs),
            None => Ok(None),
        };
        let outcome = match linked {
            Ok(Some(done)) => Ok(done),
            Ok(None) => match components(&entry.path) {
                Some(parts) => {
                    let chunk_blocks = plan.blocks_of(&entry)?;
                    if !plan.complete.contains(&entry.path) {
                        cache.reclaim(&entry, &chunk_blocks);
                    }
                    let written = r.file(&entry, &parts, cache, &chunk_blocks);
                    r.consumed = false;
                    written
                }
                None => Err(EntryError::Entry("unsafe path".into())),
            },
            Err(e) => Err(e),
        };
        r.outcome(&entry, outcome)?;
    }
    r.settle(true)?;
    drop(leader_dirs);
    for entry in std::mem::take(&mut r.dirs_done).iter().rev() {
        let done = components(&entry.path)
            .ok_or_else(|| EntryError::Entry("unsafe path".into()))
            .and_then(|parts| r.dirs.at(&parts, false))
            .and_then(|dir| r.attrs.on_fd(dir.as_fd(), entry));
        match done {
            Ok(()) => {}
            Err(EntryError::Target(e)) => return Err(RestoreError::Target(e)),
            Err(EntryError::Entry(reason)) => r.report.failed.push((entry.path.clone(), reason)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
