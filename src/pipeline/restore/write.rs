//! The restore's writing threads, beside the one that walks the plan (which makes the
//! directories, links and nodes, and takes every file's bytes from the block cache, in plan
//! order):
//! - **writers** create, write and close the files of a directory handed to them in a job, each
//!   under its temporary name (creating, writing and closing small files is kernel work a single
//!   thread spent most of a restore on);
//! - the **flusher** makes a batch of written files durable (`syncfs`) and renames them into
//!   place while the others write the next batch (done in line, the flush took half of a restore
//!   of many small files).
//!
//! A file that needs more than [`QUEUED_MAX_BLOCKS`] blocks is written by the walking thread a
//! chunk at a time: a queued file holds all its bytes.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};

use rustix::fs::{AtFlags, Mode, OFlags, openat, renameat, unlinkat};
use rustix::io::Errno;

use super::attrs::Attrs;
use super::dirs::remove_stale;
use super::{EntryError, Piece};
use crate::data::BlockId;
use crate::store::catalog::FileEntry;

/// A file that was written but could not be renamed into place.
pub(super) struct NotPlaced {
    pub(super) path: Vec<u8>,
    /// Its hard-link identity, if it is the first name of several.
    pub(super) identity: Option<(u64, u64)>,
    pub(super) why: String,
}

/// A file written and closed under its temporary name, waiting for the batch's flush.
pub(super) struct Staged {
    /// The directory it was written in, held until the rename.
    pub(super) dir: Arc<OwnedFd>,
    pub(super) temp: Vec<u8>,
    pub(super) name: Vec<u8>,
    pub(super) entry: Vec<u8>,
    /// Its hard-link identity, if it is the first name of several.
    pub(super) identity: Option<(u64, u64)>,
    pub(super) bytes: u64,
}

/// Files of one directory to write under their temporary names, with their bytes: a writer
/// thread's work.
pub(super) struct WriteJob {
    pub(super) dir: Arc<OwnedFd>,
    pub(super) files: Vec<FileJob>,
    /// The distinct blocks the pieces keep alive.
    pub(super) blocks: Vec<BlockId>,
    pub(super) bytes: u64,
}

pub(super) struct FileJob {
    pub(super) entry: Arc<FileEntry>,
    pub(super) temp: Vec<u8>,
    pub(super) name: Vec<u8>,
    pub(super) pieces: Vec<Piece>,
}

/// A file written (or not: the temporary file is then gone), by a writer thread or inline.
pub(super) struct Written {
    pub(super) entry: Arc<FileEntry>,
    pub(super) dir: Arc<OwnedFd>,
    pub(super) temp: Vec<u8>,
    pub(super) name: Vec<u8>,
    pub(super) result: Result<u64, EntryError>,
}

/// A [`WriteJob`] done.
pub(super) struct Finished {
    pub(super) files: Vec<Written>,
    pub(super) blocks: Vec<BlockId>,
}

/// Files needing more blocks than this are written by the walking thread, a chunk at a time
/// (a queued file holds all its bytes in memory).
pub(super) const QUEUED_MAX_BLOCKS: usize = 2;
/// Decoded blocks the queued jobs may keep alive beside the cache's; past it, the walking
/// thread waits for the writers.
pub(super) const FLIGHT_BLOCKS: usize = 8;
/// Jobs queued per writer thread: enough to keep it busy.
pub(super) const QUEUE_PER_WRITER: usize = 2;
/// A job holds at most this many files or bytes (fewer wakeups than a file at a time; not so
/// many that a thread waits long for the next).
pub(super) const GROUP_FILES: usize = 64;
pub(super) const GROUP_BYTES: u64 = 1 << 20;

/// Writer threads beside the one walking the plan: creating, writing and closing small files
/// is kernel work a single thread spent most of a restore on. Directories, links, nodes and
/// renames stay on the walking thread, in plan order.
/// `BITDUST_RESTORE_WRITERS` overrides the count, for benchmarks (0: every file on the walking
/// thread).
pub(super) fn writer_threads() -> usize {
    std::env::var("BITDUST_RESTORE_WRITERS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .map(|n| n.min(64))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4)))
}

/// A writer thread: takes jobs until the channel closes; returns what it could not restore.
pub(super) fn writer(jobs: Receiver<WriteJob>, done: Sender<Finished>, mut attrs: Attrs) -> Attrs {
    while let Ok(job) = jobs.recv() {
        let files = job
            .files
            .into_iter()
            .map(|file| {
                // The pieces go here: their blocks are released as soon as the file is written.
                let result = write_staged(
                    &job.dir,
                    &file.temp,
                    &file.entry,
                    file.pieces.into_iter().map(Ok),
                    &mut attrs,
                );
                Written {
                    entry: file.entry,
                    dir: job.dir.clone(),
                    temp: file.temp,
                    name: file.name,
                    result,
                }
            })
            .collect();
        let finished = Finished {
            files,
            blocks: job.blocks,
        };
        if done.send(finished).is_err() {
            break;
        }
    }
    attrs
}

/// Creates the temporary file `temp` in `dir` (never opening what is there), writes the
/// entry's pieces at their offsets and gives it its owner, mode, attributes and mtime; on
/// failure the temporary file is removed. Bytes inside a recorded hole are skipped when they
/// are zeros (as they should be), so a sparse file stays sparse.
pub(super) fn write_staged(
    dir: &OwnedFd,
    temp: &[u8],
    entry: &FileEntry,
    pieces: impl Iterator<Item = Result<Piece, EntryError>>,
    attrs: &mut Attrs,
) -> Result<u64, EntryError> {
    // O_EXCL: never opens what is there (a symlink included); O_NOFOLLOW for good measure.
    let create = || {
        openat(
            dir.as_fd(),
            temp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
    };
    let out = match create() {
        Ok(f) => f,
        // A killed run's leftover (checked only then: one syscall less per file).
        Err(Errno::EXIST) => {
            remove_stale(dir.as_fd(), temp)?;
            create().map_err(|e| EntryError::errno("creating the temporary file", e))?
        }
        Err(e) => return Err(EntryError::errno("creating the temporary file", e)),
    };
    let out = File::from(out);
    let written = (|| {
        let mut written = 0u64;
        let mut next_hole = 0;
        for piece in pieces {
            let piece = piece?;
            let bytes = piece.bytes();
            write_at_around_holes(&out, bytes, written, &entry.holes, &mut next_hole)
                .map_err(|e| EntryError::io("writing", e))?;
            written += bytes.len() as u64;
        }
        if written != entry.size {
            return Err(EntryError::Entry(format!(
                "assembled {written} bytes, the catalog says {}",
                entry.size
            )));
        }
        if !entry.holes.is_empty() {
            // A trailing hole was never written: the size makes it.
            out.set_len(entry.size)
                .map_err(|e| EntryError::io("setting the size", e))?;
        }
        attrs.on_fd(out.as_fd(), entry)?;
        Ok(written)
    })();
    drop(out);
    if written.is_err() {
        let _ = unlinkat(dir.as_fd(), temp, AtFlags::empty());
    }
    written
}

/// Writes `bytes` at `offset`, leaving out the parts inside `holes` (in offset order; `next`
/// is the first that may still matter) that are all zeros.
fn write_at_around_holes(
    out: &File,
    bytes: &[u8],
    offset: u64,
    holes: &[(u64, u64)],
    next: &mut usize,
) -> std::io::Result<()> {
    let end = offset + bytes.len() as u64;
    let mut pos = offset;
    while pos < end {
        while holes
            .get(*next)
            .is_some_and(|(at, len)| at.saturating_add(*len) <= pos)
        {
            *next += 1;
        }
        let (hole_at, hole_len) = holes.get(*next).copied().unwrap_or((u64::MAX, 0));
        let (stop, in_hole) = if hole_at > pos {
            (hole_at.min(end), false)
        } else {
            (hole_at.saturating_add(hole_len).min(end), true)
        };
        let part = &bytes[(pos - offset) as usize..(stop - offset) as usize];
        if !in_hole || part.iter().any(|b| *b != 0) {
            out.write_all_at(part, pos)?;
        }
        pos = stop;
    }
    Ok(())
}

/// What flushing a batch did: files renamed into place, and those that could not be (path,
/// hard-link identity, why); `error` when the flush itself failed (the batch is then removed).
#[derive(Default)]
pub(super) struct Flushed {
    pub(super) files: u64,
    pub(super) bytes: u64,
    pub(super) failed: Vec<NotPlaced>,
    pub(super) error: Option<std::io::Error>,
}

/// Makes the staged files durable with one `syncfs`, then renames each into place: a file
/// under its real name is always complete on disk, even after a power loss, at one flush per
/// batch instead of one fsync per file (which cost ~0.5 ms a file, most of a restore of many
/// small files).
pub(super) fn flush_batch(root: &OwnedFd, batch: Vec<Staged>) -> Flushed {
    let mut flushed = Flushed::default();
    if let Err(e) = rustix::fs::syncfs(root.as_fd()) {
        remove_staged(batch);
        flushed.error = Some(e.into());
        return flushed;
    }
    for staged in batch {
        // Relative to the directory the file was written in, whatever happened to its path
        // since.
        match renameat(
            staged.dir.as_fd(),
            staged.temp.as_slice(),
            staged.dir.as_fd(),
            staged.name.as_slice(),
        ) {
            Ok(()) => {
                flushed.files += 1;
                flushed.bytes += staged.bytes;
            }
            Err(e) => {
                let _ = unlinkat(staged.dir.as_fd(), staged.temp.as_slice(), AtFlags::empty());
                flushed.failed.push(NotPlaced {
                    path: staged.entry,
                    identity: staged.identity,
                    why: format!("renaming into place: {e}"),
                });
            }
        }
    }
    flushed
}

pub(super) fn remove_staged(batch: Vec<Staged>) {
    for staged in batch {
        let _ = unlinkat(staged.dir.as_fd(), staged.temp.as_slice(), AtFlags::empty());
    }
}

/// The flusher thread: flushes batches while the others write the next one (the `syncfs` and
/// the renames took half of a restore of many small files when done in line). After a failed
/// flush, later batches are only removed.
pub(super) fn flusher(root: Arc<OwnedFd>, batches: Receiver<Vec<Staged>>, done: Sender<Flushed>) {
    let mut failed = false;
    for batch in batches {
        if failed {
            remove_staged(batch);
            continue;
        }
        let flushed = flush_batch(&root, batch);
        failed = flushed.error.is_some();
        if done.send(flushed).is_err() {
            failed = true;
        }
    }
}
