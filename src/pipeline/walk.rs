//! The walker thread: walks the tree depth-first (a directory's entries in name order, its
//! subdirectories after its other entries), stats every entry (never following
//! a symlink), reads and chunks changed files, deduplicates, packs new chunks and hands finished
//! blocks to the encoders, one credit each.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::encode::{Item, Job};
use super::{Counters, HOLD_MAX, Lookup, PipelineError, PipelineKeys, PipelineSettings, Shared};
use crate::data::{ChunkId, Chunker, ChunkerParams, FinishedBlock, Packer};
use crate::store::catalog::{FileEntry, FileKind, Owner, Skipped, Xattrs};

mod names;
use names::Names;

/// Bytes per read: big enough for few syscalls, small against a block.
const READ_SIZE: usize = 1 << 20;

/// Why the walk stopped early.
enum Halt {
    /// Cancelled, a fatal error elsewhere, or the emitter is gone: just stop.
    Stopped,
    Fatal(PipelineError),
}

type Step = Result<(), Halt>;

/// What `start` checks before spawning anything.
pub(super) struct Prepared {
    excludes: GlobSet,
    chunker: Chunker,
    packer: Packer,
}

impl Prepared {
    pub fn new(settings: &PipelineSettings) -> Result<Self, PipelineError> {
        let mut excludes = GlobSetBuilder::new();
        for pattern in &settings.excludes {
            // Literal separators off: `*.tmp` matches at any depth, as users expect of an
            // exclude list; `dir/**` still anchors at the root.
            let glob = GlobBuilder::new(pattern)
                .literal_separator(false)
                .backslash_escape(true)
                .build()
                .map_err(PipelineError::Exclude)?;
            excludes.add(glob);
        }
        Ok(Prepared {
            excludes: excludes.build().map_err(PipelineError::Exclude)?,
            chunker: Chunker::new(ChunkerParams::default()).map_err(PipelineError::Data)?,
            packer: Packer::new(settings.block_size).map_err(PipelineError::Data)?,
        })
    }
}

pub(super) struct Walker {
    root: PathBuf,
    excludes: GlobSet,
    chunker: Chunker,
    /// The read buffer, allocated once: zeroing 1 MiB per file would cost more than reading a
    /// small file.
    buf: Vec<u8>,
    /// User and group names by number, looked up once each.
    names: Names,
    /// Hard-linked files read in this run, by `(dev, inode)`: their other names reuse them.
    links: HashMap<(u64, u64), Linked>,
    sink: Sink,
}

/// Blocks handed over whose chunks the walker still dedups from memory: far more than the
/// credits let be in flight between the walker and the catalog (a chunk of an older block is
/// found in the catalog; were it not recorded yet, it would only be stored twice).
const PACKED_BLOCKS_KEPT: usize = 256;

/// Everything but the chunker, so a chunk borrowed from the chunker can go into the sink.
struct Sink {
    keys: Arc<PipelineKeys>,
    lookup: Arc<dyn Lookup>,
    shared: Arc<Shared>,
    jobs: SyncSender<Job>,
    items: SyncSender<Item>,
    packer: Packer,
    /// The chunks packed in this run's most recent blocks (and the one being packed) → the
    /// sequence number of the block holding it. Older blocks are recorded in the catalog by
    /// now, where `Lookup::chunk_known` finds their chunks: a map of every chunk of the run
    /// grew with the tree (~50 MB, twice that while it grew, at a million files).
    packed: HashMap<ChunkId, u64>,
    /// The chunk ids of the blocks handed over whose chunks `packed` still holds, oldest first.
    recent: VecDeque<Vec<ChunkId>>,
    /// Sequence number of the block being packed (earlier ones are handed to the emitter).
    next_seq: u64,
    /// Items that must wait for the block being packed.
    held: Vec<Item>,
}

impl Walker {
    pub fn new(
        prepared: Prepared,
        settings: &PipelineSettings,
        keys: Arc<PipelineKeys>,
        lookup: Arc<dyn Lookup>,
        shared: Arc<Shared>,
        jobs: SyncSender<Job>,
        items: SyncSender<Item>,
    ) -> Self {
        Walker {
            root: settings.root.clone(),
            excludes: prepared.excludes,
            chunker: prepared.chunker,
            buf: vec![0; READ_SIZE],
            names: Names::default(),
            links: HashMap::new(),
            sink: Sink {
                keys,
                lookup,
                shared,
                jobs,
                items,
                packer: prepared.packer,
                packed: HashMap::new(),
                recent: VecDeque::new(),
                next_seq: 0,
                held: Vec::new(),
            },
        }
    }

    pub fn run(mut self) {
        match self.walk().and_then(|()| self.sink.finish()) {
            Ok(()) => {}
            Err(Halt::Stopped) => self.sink.shared.stop(),
            Err(Halt::Fatal(e)) => self.sink.shared.fail(e),
        }
        // Dropping the senders ends the encoders and, after the last item, the emitter.
    }

    fn walk(&mut self) -> Step {
        let root_fd = open_root(&self.root).map_err(Halt::Fatal)?;
        let root_stat = rustix::fs::fstat(&root_fd).map_err(|e| {
            Halt::Fatal(PipelineError::Root {
                path: self.root.clone(),
                source: e.into(),
            })
        })?;
        // Depth-first with an explicit stack: no recursion limit on deep trees. Every directory
        // is opened relative to its parent's descriptor, so a path of any length works (none is
        // ever handed to the kernel whole) and no symlink is followed on the way. A pending
        // directory holds its parent's descriptor, so at most one per level is open.
        let mut stack = vec![Pending {
            parent: None,
            name: CString::default(),
            rel: Vec::new(),
            stat: Meta::of(&root_stat),
        }];
        let mut root_fd = Some(root_fd);
        while let Some(dir) = stack.pop() {
            self.sink.check_halt()?;
            Counters::add(&self.sink.shared.counters.dirs, 1);
            let opened = match &dir.parent {
                None => root_fd.take().ok_or(rustix::io::Errno::BADF),
                Some(parent) => rustix::fs::openat(
                    parent.as_fd(),
                    dir.name.as_c_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ),
            };
            let mut e = self.entry(&dir.rel, FileKind::Dir, &dir.stat);
            let fd = match opened {
                Ok(fd) => {
                    e.xattrs = self.xattrs(&dir.rel, Attrs::Fd(fd.as_fd()))?;
                    self.sink.send(Item::File(e))?;
                    Arc::new(fd)
                }
                Err(err) => {
                    self.sink.send(Item::File(e))?;
                    self.sink
                        .skipped(&dir.rel, format!("cannot list directory: {err}"))?;
                    continue;
                }
            };
            let mut names: Vec<CString> = Vec::new();
            match rustix::fs::Dir::read_from(fd.as_fd()) {
                Ok(listing) => {
                    for child in listing {
                        match child {
                            Ok(child) => {
                                let name = child.file_name();
                                if name != c"." && name != c".." {
                                    names.push(name.to_owned());
                                }
                            }
                            Err(err) => {
                                self.sink
                                    .skipped(&dir.rel, format!("cannot list directory: {err}"))?;
                                break;
                            }
                        }
                    }
                }
                Err(err) => {
                    self.sink
                        .skipped(&dir.rel, format!("cannot list directory: {err}"))?;
                }
            }
            // Name order makes runs reproducible; reversed so the stack pops them in order.
            names.sort_unstable();
            let mut subdirs = Vec::new();
            for name in names {
                let child_rel = if dir.rel.is_empty() {
                    name.as_bytes().to_vec()
                } else {
                    [&dir.rel[..], b"/", name.as_bytes()].concat()
                };
                if self
                    .excludes
                    .is_match(Path::new(OsStr::from_bytes(&child_rel)))
                {
                    continue;
                }
                let stat = match rustix::fs::statat(
                    fd.as_fd(),
                    name.as_c_str(),
                    AtFlags::SYMLINK_NOFOLLOW,
                ) {
                    Ok(st) => Meta::of(&st),
                    Err(err) => {
                        self.sink
                            .skipped(&child_rel, format!("cannot stat: {err}"))?;
                        continue;
                    }
                };
                match stat.kind {
                    FileType::Directory => subdirs.push(Pending {
                        parent: Some(fd.clone()),
                        name,
                        rel: child_rel,
                        stat,
                    }),
                    FileType::RegularFile => self.file(fd.as_fd(), &name, child_rel, &stat)?,
                    FileType::Symlink => {
                        match rustix::fs::readlinkat(fd.as_fd(), name.as_c_str(), Vec::new()) {
                            Ok(target) => {
                                let mut e = self.entry(&child_rel, FileKind::Symlink, &stat);
                                e.target = target.into_bytes();
                                e.xattrs = self.xattrs(&child_rel, Attrs::At(fd.as_fd(), &name))?;
                                Counters::add(&self.sink.shared.counters.symlinks, 1);
                                self.sink.send(Item::File(e))?;
                            }
                            Err(err) => self
                                .sink
                                .skipped(&child_rel, format!("cannot read link: {err}"))?,
                        }
                    }
                    FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice => {
                        let kind = match stat.kind {
                            FileType::Fifo => FileKind::Fifo,
                            FileType::CharacterDevice => FileKind::CharDevice,
                            _ => FileKind::BlockDevice,
                        };
                        let mut e = self.entry(&child_rel, kind, &stat);
                        e.xattrs = self.xattrs(&child_rel, Attrs::At(fd.as_fd(), &name))?;
                        self.sink.send(Item::File(e))?;
                    }
                    FileType::Socket => self.sink.send(Item::Skipped(Skipped {
                        path: child_rel,
                        reason: "a socket: no backup tool restores one".into(),
                        by_design: true,
                    }))?,
                    FileType::Unknown => self
                        .sink
                        .skipped(&child_rel, "not backed up: of an unknown kind".into())?,
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    /// A regular file: unchanged → its previous chunks; else read, chunk and pack.
    fn file(&mut self, dir: BorrowedFd<'_>, name: &CStr, rel: Vec<u8>, lstat: &Meta) -> Step {
        if let Some(prev) = self.sink.lookup.previous(&rel)
            && prev.kind == FileKind::File
            && prev.size == lstat.size
            && prev.mtime_ns == lstat.mtime_ns
            && prev.ctime_ns == lstat.ctime_ns
            && prev.inode == lstat.ino
            // An entry from before catalog format 2 did not record attributes or holes: read
            // the file again once, so the new version has them.
            && prev.owner.is_some()
            && prev.chunks.iter().all(|c| self.sink.lookup.chunk_known(c))
        {
            // The status-change time covers owner, mode, links and attributes: all unchanged.
            let mut e = self.entry(&rel, FileKind::File, lstat);
            e.chunks = prev.chunks;
            e.xattrs = prev.xattrs;
            e.holes = prev.holes;
            return self.sink.file_done(e, None, false);
        }
        // A second name of a file read earlier in this run (a hard link): the same chunks.
        let identity = (lstat.links > 1).then_some((lstat.dev, lstat.ino));
        if let Some(id) = identity
            && let Some(first) = self.links.get(&id)
            && first.entry.size == lstat.size
            && first.entry.mtime_ns == lstat.mtime_ns
        {
            let mut e = first.entry.clone();
            e.path = rel;
            let dep = first.dep;
            return self.sink.file_done(e, dep, false);
        }
        // O_NOFOLLOW: the entry may have become a symlink since the stat; O_NONBLOCK: or a FIFO,
        // whose open would block forever.
        let opened = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        );
        let mut file = match opened {
            Ok(fd) => File::from(fd),
            Err(e) => return self.sink.skipped(&rel, format!("cannot open: {e}")),
        };
        let before = match rustix::fs::fstat(&file) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => Meta::of(&st),
            Ok(_) => {
                return self
                    .sink
                    .skipped(&rel, "changed kind while being read".into());
            }
            Err(e) => return self.sink.skipped(&rel, format!("cannot stat: {e}")),
        };
        let mut e = self.entry(&rel, FileKind::File, &before);
        e.xattrs = self.xattrs(&rel, Attrs::Fd(file.as_fd()))?;
        if before.allocated < before.size {
            e.holes = holes(file.as_fd(), before.size);
        }
        let mut dep = None;
        let mut read = 0u64;
        // Read no more than the size at open: a file appended to faster than we read (a busy
        // log) would otherwise keep the walk on it forever. Growth shows in the second stat.
        let limit = before.size;
        while read < limit {
            self.sink.check_halt()?;
            let want = self
                .buf
                .len()
                .min(usize::try_from(limit - read).unwrap_or(usize::MAX));
            let n = match file.read(&mut self.buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    // Reset the chunker for the next file; the chunks packed so far stay in
                    // their blocks, unreferenced (harmless, and rare).
                    self.chunker.finish();
                    while self.chunker.next_chunk().is_some() {}
                    return self.sink.skipped(&rel, format!("read error: {err}"));
                }
            };
            read += n as u64;
            Counters::add(&self.sink.shared.counters.bytes_read, n as u64);
            self.chunker.feed(&self.buf[..n]);
            while let Some(chunk) = self.chunker.next_chunk() {
                self.sink.chunk(chunk, &mut e.chunks, &mut dep)?;
            }
        }
        self.chunker.finish();
        while let Some(chunk) = self.chunker.next_chunk() {
            self.sink.chunk(chunk, &mut e.chunks, &mut dep)?;
        }
        let changed = match rustix::fs::fstat(&file) {
            Ok(after) => {
                let after = Meta::of(&after);
                after.size != before.size
                    || after.mtime_ns != before.mtime_ns
                    || read != before.size
            }
            Err(_) => true,
        };
        // The entry describes what was read; its times are those from before the read, so a
        // file that changed differs from its entry next time and is read again.
        e.size = read;
        if let Some(id) = identity
            && !changed
        {
            self.links.insert(
                id,
                Linked {
                    entry: e.clone(),
                    dep,
                },
            );
        }
        self.sink.file_done(e, dep, changed)
    }

    /// The entry of `rel` from its stat, with its owner's names.
    fn entry(&mut self, rel: &[u8], kind: FileKind, meta: &Meta) -> FileEntry {
        FileEntry {
            path: rel.to_vec(),
            kind,
            mode: meta.mode & 0o7777,
            mtime_ns: meta.mtime_ns,
            ctime_ns: meta.ctime_ns,
            inode: meta.ino,
            size: if kind == FileKind::File { meta.size } else { 0 },
            owner: Some(Owner {
                uid: meta.uid,
                gid: meta.gid,
                user: self.names.user(meta.uid),
                group: self.names.group(meta.gid),
            }),
            dev: meta.dev,
            links: meta.links,
            rdev: if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
                meta.rdev
            } else {
                0
            },
            ..FileEntry::default()
        }
    }

    /// Every extended attribute this process can read. Attributes that cannot be read are
    /// named in the job's result (the entry is still backed up, without them).
    fn xattrs(&mut self, rel: &[u8], at: Attrs<'_>) -> Result<Xattrs, Halt> {
        match read_xattrs(at) {
            Ok(list) => Ok(list),
            Err(e) => {
                self.sink
                    .skipped(rel, format!("cannot read extended attributes: {e}"))?;
                Ok(Vec::new())
            }
        }
    }
}

/// A directory waiting on the walk's stack.
struct Pending {
    /// `None` for the root (opened before the walk).
    parent: Option<Arc<OwnedFd>>,
    name: CString,
    rel: Vec<u8>,
    stat: Meta,
}

/// The first name of a hard-linked file read in this run.
struct Linked {
    entry: FileEntry,
    dep: Option<u64>,
}

/// What the walker keeps of a stat, in fixed widths.
struct Meta {
    kind: FileType,
    mode: u32,
    uid: u32,
    gid: u32,
    dev: u64,
    ino: u64,
    links: u64,
    rdev: u64,
    size: u64,
    /// Bytes allocated on disk (`st_blocks * 512`): below `size` for a sparse file.
    allocated: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Meta {
    // The stat fields' widths differ between architectures.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    fn of(st: &rustix::fs::Stat) -> Meta {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Meta {
            kind: FileType::from_raw_mode(st.st_mode as _),
            mode: st.st_mode as u32,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            links: st.st_nlink as u64,
            rdev: st.st_rdev as u64,
            size: u64::try_from(st.st_size).unwrap_or(0),
            allocated: u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512),
            mtime_ns: ns(st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime as i64, st.st_ctime_nsec as i64),
        }
    }
}

/// Opens the source root as a directory, never through a symlink.
fn open_root(root: &Path) -> Result<OwnedFd, PipelineError> {
    match rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
            Err(PipelineError::RootNotDir(root.to_path_buf()))
        }
        Err(e) => Err(PipelineError::Root {
            path: root.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Where to read an entry's attributes: its open descriptor, or its name in a directory (a
/// symlink, FIFO or device, which are not opened).
enum Attrs<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a CStr),
}

/// Bytes a first attribute list or value read tries (most fit; a bigger one is sized first).
const XATTR_GUESS: usize = 1024;

/// Every readable extended attribute, in name order. A file system without attributes gives
/// none.
fn read_xattrs(at: Attrs<'_>) -> Result<Xattrs, rustix::io::Errno> {
    // Symlinks and special files are reached by their name under the directory's descriptor
    // in /proc, which needs no path longer than a few bytes whatever the entry's depth.
    let proc_path = match at {
        Attrs::Fd(_) => None,
        Attrs::At(dir, name) => {
            let p = super::proc_path(dir, name.to_bytes());
            Some(CString::new(p).map_err(|_| rustix::io::Errno::INVAL)?)
        }
    };
    let list = |buf: &mut [u8]| match (&at, &proc_path) {
        (Attrs::Fd(fd), _) => rustix::fs::flistxattr(fd, buf),
        (_, Some(p)) => rustix::fs::llistxattr(p.as_c_str(), buf),
        _ => Err(rustix::io::Errno::INVAL),
    };
    let get = |name: &CStr, buf: &mut [u8]| match (&at, &proc_path) {
        (Attrs::Fd(fd), _) => rustix::fs::fgetxattr(fd, name, buf),
        (_, Some(p)) => rustix::fs::lgetxattr(p.as_c_str(), name, buf),
        _ => Err(rustix::io::Errno::INVAL),
    };
    let names = match sized_read(list) {
        Ok(names) => names,
        Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name).map_err(|_| rustix::io::Errno::INVAL)?;
        match sized_read(|buf| get(c_name.as_c_str(), buf)) {
            Ok(value) => out.push((name.to_vec(), value)),
            // Removed between the list and the read.
            Err(rustix::io::Errno::NODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads a list or value whose size is unknown: a guess first, then the size the kernel says.
fn sized_read(
    mut read: impl FnMut(&mut [u8]) -> Result<usize, rustix::io::Errno>,
) -> Result<Vec<u8>, rustix::io::Errno> {
    let mut buf = vec![0u8; XATTR_GUESS];
    loop {
        match read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {
                let need = read(&mut [])?;
                // It may grow again between the two calls: loop.
                buf = vec![0u8; need.max(buf.len() * 2)];
            }
            Err(e) => return Err(e),
        }
    }
}

/// A sparse file's holes, `(offset, length)`, from `SEEK_HOLE`/`SEEK_DATA`. A file system that
/// does not report holes (or a file that changes while asked) gives what it gives: the content
/// is read whole anyway, holes only save space at restore.
fn holes(fd: BorrowedFd<'_>, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        let Ok(hole) = rustix::fs::seek(fd, SeekFrom::Hole(at)) else {
            break;
        };
        if hole >= size {
            break;
        }
        let data = match rustix::fs::seek(fd, SeekFrom::Data(hole)) {
            Ok(d) => d.min(size),
            // ENXIO: no data after `hole`, the rest of the file is a hole.
            Err(_) => size,
        };
        if data > hole {
            out.push((hole, data - hole));
        }
        at = data;
    }
    // Reading starts from the beginning again.
    let _ = rustix::fs::seek(fd, SeekFrom::Start(0));
    out
}

impl Sink {
    fn check_halt(&self) -> Step {
        if self.shared.halt.is_cancelled() {
            Err(Halt::Stopped)
        } else {
            Ok(())
        }
    }

    fn send(&self, item: Item) -> Step {
        self.items.send(item).map_err(|_| Halt::Stopped)
    }

    fn skipped(&self, path: &[u8], reason: String) -> Step {
        self.send(Item::Skipped(Skipped {
            path: path.to_vec(),
            reason,
            by_design: false,
        }))
    }

    /// One chunk of the current file: name it, dedup it, pack it if new. `dep` becomes the
    /// latest block of this run that holds one of the file's chunks.
    fn chunk(&mut self, data: &[u8], chunks: &mut Vec<ChunkId>, dep: &mut Option<u64>) -> Step {
        let id = ChunkId::of(&self.keys.data.chunk_id, data);
        chunks.push(id);
        let seq = if let Some(seq) = self.packed.get(&id) {
            *seq
        } else if self.lookup.chunk_known(&id) {
            return Ok(());
        } else {
            Counters::add(&self.shared.counters.new_bytes, data.len() as u64);
            // A finished block returned here is the one before this chunk's.
            let full = self
                .packer
                .add(id, data)
                .map_err(|e| Halt::Fatal(PipelineError::Data(e)))?;
            if let Some(full) = full {
                self.dispatch(full)?;
            }
            self.packed.insert(id, self.next_seq);
            self.next_seq
        };
        *dep = Some(dep.map_or(seq, |d| d.max(seq)));
        Ok(())
    }

    /// A file is complete: send it now, or hold it until the block being packed is handed over.
    fn file_done(&mut self, e: FileEntry, dep: Option<u64>, changed: bool) -> Step {
        Counters::add(&self.shared.counters.files, 1);
        Counters::add(&self.shared.counters.bytes, e.size);
        let changed = changed.then(|| Skipped {
            path: e.path.clone(),
            reason: "changed while being read".into(),
            by_design: false,
        });
        if dep.is_some_and(|d| d >= self.next_seq) {
            self.held.push(Item::File(e));
            self.held.extend(changed.map(Item::Skipped));
            if self.held.len() >= HOLD_MAX
                && let Some(block) = self.packer.finish()
            {
                self.dispatch(block)?;
            }
            Ok(())
        } else {
            self.send(Item::File(e))?;
            match changed {
                Some(s) => self.send(Item::Skipped(s)),
                None => Ok(()),
            }
        }
    }

    /// Hands a finished block to the encoders (after taking a credit), then the items that waited
    /// for it.
    fn dispatch(&mut self, block: FinishedBlock) -> Step {
        if !self.shared.take_credit() {
            return Err(Halt::Stopped);
        }
        let (done, result) = std::sync::mpsc::sync_channel(1);
        self.send(Item::Block(result))?;
        self.recent
            .push_back(block.chunks.iter().map(|(id, _)| *id).collect());
        while self.recent.len() > PACKED_BLOCKS_KEPT {
            for id in self.recent.pop_front().unwrap_or_default() {
                self.packed.remove(&id);
            }
        }
        self.jobs
            .send(Job {
                plain: block.plain,
                chunks: block.chunks,
                done,
            })
            .map_err(|_| Halt::Stopped)?;
        self.next_seq += 1;
        for item in std::mem::take(&mut self.held) {
            self.send(item)?;
        }
        Ok(())
    }

    /// End of the walk: the last block, the files waiting for it, then Done.
    fn finish(&mut self) -> Step {
        if let Some(block) = self.packer.finish() {
            self.dispatch(block)?;
        }
        for item in std::mem::take(&mut self.held) {
            self.send(item)?;
        }
        self.send(Item::Done)
    }
}
