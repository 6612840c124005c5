//! The walker thread: walks the tree depth-first (a directory's entries in name order, its
//! subdirectories after its other entries), stats every entry (never following
//! a symlink), reads and chunks changed files, deduplicates, packs new chunks and hands finished
//! blocks to the encoders, one credit each.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{Metadata, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::encode::{Item, Job};
use super::{Counters, HOLD_MAX, Lookup, PipelineError, PipelineKeys, PipelineSettings, Shared};
use crate::data::{ChunkId, Chunker, ChunkerParams, FinishedBlock, Packer};
use crate::store::catalog::{FileEntry, FileKind, Skipped};

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
    sink: Sink,
}

/// Everything but the chunker, so a chunk borrowed from the chunker can go into the sink.
struct Sink {
    keys: Arc<PipelineKeys>,
    lookup: Arc<dyn Lookup>,
    shared: Arc<Shared>,
    jobs: SyncSender<Job>,
    items: SyncSender<Item>,
    packer: Packer,
    /// Every chunk packed in this run → the sequence number of the block holding it.
    packed: HashMap<ChunkId, u64>,
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
            sink: Sink {
                keys,
                lookup,
                shared,
                jobs,
                items,
                packer: prepared.packer,
                packed: HashMap::new(),
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
        let meta = std::fs::symlink_metadata(&self.root).map_err(|source| {
            Halt::Fatal(PipelineError::Root {
                path: self.root.clone(),
                source,
            })
        })?;
        if !meta.is_dir() {
            return Err(Halt::Fatal(PipelineError::RootNotDir(self.root.clone())));
        }
        // Depth-first with an explicit stack: no recursion limit on deep trees. Each entry is
        // (absolute path, relative path).
        let mut stack = vec![(self.root.clone(), Vec::new(), meta)];
        while let Some((abs, rel, meta)) = stack.pop() {
            self.sink.check_halt()?;
            Counters::add(&self.sink.shared.counters.dirs, 1);
            self.sink
                .send(Item::File(entry(&rel, FileKind::Dir, &meta)))?;
            let mut names: Vec<Vec<u8>> = Vec::new();
            match std::fs::read_dir(&abs) {
                Ok(dir) => {
                    for child in dir {
                        match child {
                            Ok(child) => names.push(child.file_name().as_bytes().to_vec()),
                            Err(e) => {
                                self.sink
                                    .skipped(&rel, format!("cannot list directory: {e}"))?;
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    self.sink
                        .skipped(&rel, format!("cannot list directory: {e}"))?;
                }
            }
            // Name order makes runs reproducible; reversed so the stack pops them in order.
            names.sort_unstable();
            let mut subdirs = Vec::new();
            for name in names {
                let child_rel = if rel.is_empty() {
                    name.clone()
                } else {
                    [&rel[..], b"/", &name[..]].concat()
                };
                if self
                    .excludes
                    .is_match(Path::new(OsStr::from_bytes(&child_rel)))
                {
                    continue;
                }
                let child_abs = abs.join(OsStr::from_bytes(&name));
                let meta = match std::fs::symlink_metadata(&child_abs) {
                    Ok(m) => m,
                    Err(e) => {
                        self.sink.skipped(&child_rel, format!("cannot stat: {e}"))?;
                        continue;
                    }
                };
                let kind = meta.file_type();
                if kind.is_dir() {
                    subdirs.push((child_abs, child_rel, meta));
                } else if kind.is_file() {
                    self.file(&child_abs, child_rel, &meta)?;
                } else if kind.is_symlink() {
                    match std::fs::read_link(&child_abs) {
                        Ok(target) => {
                            let mut e = entry(&child_rel, FileKind::Symlink, &meta);
                            e.target = target.as_os_str().as_bytes().to_vec();
                            Counters::add(&self.sink.shared.counters.symlinks, 1);
                            self.sink.send(Item::File(e))?;
                        }
                        Err(e) => self
                            .sink
                            .skipped(&child_rel, format!("cannot read link: {e}"))?,
                    }
                } else {
                    let what = if kind.is_fifo() {
                        "a FIFO"
                    } else if kind.is_socket() {
                        "a socket"
                    } else if kind.is_block_device() {
                        "a block device"
                    } else if kind.is_char_device() {
                        "a character device"
                    } else {
                        "of an unknown kind"
                    };
                    self.sink
                        .skipped(&child_rel, format!("not backed up: {what}"))?;
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    /// A regular file: unchanged → its previous chunks; else read, chunk and pack.
    fn file(&mut self, abs: &Path, rel: Vec<u8>, lstat: &Metadata) -> Step {
        if let Some(prev) = self.sink.lookup.previous(&rel)
            && prev.kind == FileKind::File
            && prev.size == lstat.size()
            && prev.mtime_ns == mtime_ns(lstat)
            && prev.ctime_ns == ctime_ns(lstat)
            && prev.inode == lstat.ino()
            && prev.chunks.iter().all(|c| self.sink.lookup.chunk_known(c))
        {
            let mut e = entry(&rel, FileKind::File, lstat);
            e.chunks = prev.chunks;
            return self.sink.file_done(e, None, false);
        }
        // O_NOFOLLOW: the entry may have become a symlink since the stat; O_NONBLOCK: or a FIFO,
        // whose open would block forever.
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(abs);
        let mut file = match opened {
            Ok(f) => f,
            Err(e) => return self.sink.skipped(&rel, format!("cannot open: {e}")),
        };
        let before = match file.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => {
                return self
                    .sink
                    .skipped(&rel, "changed kind while being read".into());
            }
            Err(e) => return self.sink.skipped(&rel, format!("cannot stat: {e}")),
        };
        let mut e = entry(&rel, FileKind::File, &before);
        let mut dep = None;
        let mut read = 0u64;
        // Read no more than the size at open: a file appended to faster than we read (a busy
        // log) would otherwise keep the walk on it forever. Growth shows in the second stat.
        let limit = before.size();
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
        let changed = match file.metadata() {
            Ok(after) => {
                after.size() != before.size()
                    || mtime_ns(&after) != mtime_ns(&before)
                    || read != before.size()
            }
            Err(_) => true,
        };
        // The entry describes what was read; its times are those from before the read, so a
        // file that changed differs from its entry next time and is read again.
        e.size = read;
        self.sink.file_done(e, dep, changed)
    }
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

fn mtime_ns(m: &Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

fn ctime_ns(m: &Metadata) -> i64 {
    m.ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.ctime_nsec())
}

fn entry(rel: &[u8], kind: FileKind, meta: &Metadata) -> FileEntry {
    FileEntry {
        path: rel.to_vec(),
        kind,
        mode: meta.mode() & 0o7777,
        mtime_ns: mtime_ns(meta),
        ctime_ns: ctime_ns(meta),
        inode: meta.ino(),
        size: if kind == FileKind::File {
            meta.size()
        } else {
            0
        },
        ..FileEntry::default()
    }
}
