//! The backup pipeline's IO edge: walks a directory tree, reads, chunks and names the files on a
//! walker thread, seals new blocks on a pool of encoder threads (the pure stages of `data/`), stages
//! each block's fragments in the outbox and reports everything to the backup job as
//! [`PipelineEvent`]s. Never on an actor's event loop: `start` spawns std threads and returns.
//!
//! ```text
//! walker thread: walk ─ stat ─ (unchanged? previous chunks) ─ read ─ Chunker ─ ChunkId ─ dedup ─ Packer
//!      │ finished block (waits for a credit)                 │ ordered items: Block(result), File, Skipped, Done
//!      v                                                     v
//! encoder threads × workers: encode_block ─ wrap ─ write + fsync ──> emitter thread ──> events (bounded)
//! ```
//!
//! Invariants:
//! - **Order.** A `File` event comes after the `Block` events of every block that holds one of its
//!   new chunks: the walker holds a file back while one of its chunks is in the block still being
//!   packed, and the emitter sends items in the walker's order, waiting for each block's sealing.
//!   So when the job sees a file, each of its chunks is in the chunk index or in a staged block.
//! - **Durability.** A `Block` event is sent only after every fragment file and the block's
//!   directory are fsynced.
//! - **Bounded memory.** The walker seals a block only with a credit ([`Pipeline::grant`]); without
//!   one it stops reading. In memory at once: the block being packed, one finished block waiting
//!   for credit, and at most the credited blocks in the encoders — whatever the tree size. Files
//!   held back for the block being packed are capped too ([`HOLD_MAX`] closes the block early).
//! - **Cancel** stops every thread soon and sends no further event; staged files stay for the
//!   caller to clean. Dropping the [`Pipeline`] cancels it.

mod encode;
mod owners;
pub mod restore;
mod walk;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use ed25519_dalek::SigningKey;
use tokio_util::sync::CancellationToken;

use crate::crypto::derive::DataKeys;
use crate::data::audit::AuditPair;
use crate::data::{BlockId, ChunkId, DataError, Layout};
use crate::store::catalog::{BlockEntry, FileEntry, Skipped};

/// Files held back for the block being packed, at most; then that block is closed early, so a
/// tree of many small identical files cannot make the list grow without end.
pub const HOLD_MAX: usize = 4096;

/// What to back up and how.
#[derive(Clone, Debug)]
pub struct PipelineSettings {
    /// The source's root directory.
    pub root: PathBuf,
    /// Globs on the relative path (`*` also crosses `/`, so `*.tmp` matches at any depth),
    /// e.g. `"*.tmp"`, `"cache/**"`. An excluded directory is not entered.
    pub excludes: Vec<String>,
    /// Target plain block size (`backup.block_size`).
    pub block_size: usize,
    pub layout: Layout,
    pub zstd_level: i32,
    /// Encoder threads.
    pub workers: usize,
    /// Staging directory for fragments (see [`staged_path`]).
    pub outbox: PathBuf,
}

/// The owner's keys the pipeline needs.
pub struct PipelineKeys {
    pub data: Arc<DataKeys>,
    pub owner: SigningKey,
}

/// An entry named through its held directory's descriptor in `/proc` (`/proc/self/fd/N/name`):
/// how a path-only call (the `l*xattr` ones) reaches a symlink or a special file without a path
/// that could be swapped on the way, and a few bytes long whatever the entry's depth.
pub(crate) fn proc_path(dir: std::os::fd::BorrowedFd<'_>, name: &[u8]) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name);
    path
}

/// What the pipeline asks of the catalog.
pub trait Lookup: Send + Sync + 'static {
    /// This path's entry in the source's previous committed snapshot, if any.
    fn previous(&self, path: &[u8]) -> Option<FileEntry>;
    /// Whether this chunk is already stored (catalog chunk index).
    fn chunk_known(&self, id: &ChunkId) -> bool;
}

/// A sealed block whose fragments are staged and fsynced in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedBlock {
    /// Fragments: supplier `None`, size and BLAKE3 of the staged envelope.
    pub entry: BlockEntry,
    /// The chunks in the block, in order, with their lengths (for the chunk index).
    pub chunks: Vec<(ChunkId, u32)>,
    /// Each position's audit pairs, made from the staged bytes while the encoder had them.
    pub pairs: Vec<Vec<AuditPair>>,
}

#[derive(Debug)]
pub enum PipelineEvent {
    Block(StagedBlock),
    File(FileEntry),
    Skipped(Skipped),
    /// The last event of a run that went through.
    Done(Totals),
    /// The last event of a run that hit a fatal error.
    Failed(PipelineError),
}

/// Progress counters; final in `Done`, live through [`Pipeline::totals`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes actually read from files (0 for a fully unchanged tree).
    pub bytes_read: u64,
    /// Sum of the regular files' sizes.
    pub bytes: u64,
    /// Chunk bytes not known before (after dedup).
    pub new_bytes: u64,
    /// Blocks staged.
    pub new_blocks: u64,
}

/// Fatal errors: the run stops (a `Failed` event, or an error from `start`). Unreadable files are
/// not fatal: they are `Skipped` events.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("invalid settings: {0}")]
    Settings(&'static str),
    #[error("invalid data parameters")]
    Data(#[source] DataError),
    #[error("invalid exclude pattern")]
    Exclude(#[source] globset::Error),
    #[error("source root {path:?} is not usable")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("source root {0:?} is not a directory")]
    RootNotDir(PathBuf),
    #[error("outbox {path:?} is not writable")]
    Outbox {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("staging fragment {path:?} failed")]
    Stage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sealing a block failed")]
    Encode(#[source] DataError),
    #[error("the OS random generator failed")]
    Random(#[source] rand::Error),
    #[error("a pipeline thread could not be started")]
    Spawn(#[source] std::io::Error),
    #[error("a pipeline thread stopped unexpectedly")]
    Internal,
}

/// Where fragment `position` of `block` is staged: `outbox/<block id hex>/<position>`.
pub fn staged_path(outbox: &Path, block: &BlockId, position: u32) -> PathBuf {
    outbox.join(block.to_string()).join(position.to_string())
}

/// Live counters shared by the threads.
#[derive(Default)]
struct Counters {
    files: AtomicU64,
    dirs: AtomicU64,
    symlinks: AtomicU64,
    bytes_read: AtomicU64,
    bytes: AtomicU64,
    new_bytes: AtomicU64,
    new_blocks: AtomicU64,
    waiting_for_credit: AtomicBool,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Totals {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            files: get(&self.files),
            dirs: get(&self.dirs),
            symlinks: get(&self.symlinks),
            bytes_read: get(&self.bytes_read),
            bytes: get(&self.bytes),
            new_bytes: get(&self.new_bytes),
            new_blocks: get(&self.new_blocks),
        }
    }
}

/// State shared by the handle and the threads.
struct Shared {
    counters: Counters,
    /// Blocks the walker may still seal.
    credit: Mutex<usize>,
    credit_changed: Condvar,
    /// The caller's cancel: no event is sent once it is set.
    cancelled: CancellationToken,
    /// Every thread stops working (a child of `cancelled`, also set on a fatal error).
    halt: CancellationToken,
    /// The first fatal error, sent by the emitter as `Failed`.
    failure: Mutex<Option<PipelineError>>,
}

impl Shared {
    /// Records a fatal error (the first one wins) and stops every thread.
    fn fail(&self, error: PipelineError) {
        if let Ok(mut slot) = self.failure.lock()
            && slot.is_none()
        {
            *slot = Some(error);
        }
        self.stop();
    }

    fn stop(&self) {
        self.halt.cancel();
        // Wake a walker waiting for credit so it sees the halt.
        let _guard = self.credit.lock();
        self.credit_changed.notify_all();
    }

    fn take_failure(&self) -> Option<PipelineError> {
        self.failure.lock().ok().and_then(|mut slot| slot.take())
    }

    /// Takes one credit, waiting for it; `false` when halted meanwhile.
    fn take_credit(&self) -> bool {
        let Ok(mut credit) = self.credit.lock() else {
            return false;
        };
        while *credit == 0 && !self.halt.is_cancelled() {
            self.counters
                .waiting_for_credit
                .store(true, Ordering::Relaxed);
            credit = match self.credit_changed.wait(credit) {
                Ok(c) => c,
                Err(_) => return false,
            };
        }
        self.counters
            .waiting_for_credit
            .store(false, Ordering::Relaxed);
        if self.halt.is_cancelled() {
            return false;
        }
        *credit -= 1;
        true
    }
}

/// A running pipeline. Dropping it cancels the run.
pub struct Pipeline {
    shared: Arc<Shared>,
}

impl Pipeline {
    /// Checks the settings, prepares the outbox and spawns the threads; returns at once. Every
    /// further outcome arrives on `events`, ending with `Done` or `Failed` (nothing after a
    /// cancel).
    pub fn start(
        settings: PipelineSettings,
        keys: PipelineKeys,
        lookup: Arc<dyn Lookup>,
        events: tokio::sync::mpsc::Sender<PipelineEvent>,
    ) -> Result<Pipeline, PipelineError> {
        if settings.workers == 0 {
            return Err(PipelineError::Settings("workers must be at least 1"));
        }
        let walker_parts = walk::Prepared::new(&settings)?;
        std::fs::create_dir_all(&settings.outbox).map_err(|source| PipelineError::Outbox {
            path: settings.outbox.clone(),
            source,
        })?;
        let cancelled = CancellationToken::new();
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            credit: Mutex::new(0),
            credit_changed: Condvar::new(),
            halt: cancelled.child_token(),
            cancelled,
            failure: Mutex::new(None),
        });
        let keys = Arc::new(keys);
        // Small channels: the walker runs at most a few blocks ahead of the encoders, the
        // emitter a few items behind the walker; credits bound the rest.
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<encode::Job>(settings.workers);
        let (items_tx, items_rx) = std::sync::mpsc::sync_channel::<encode::Item>(256);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map(drop)
                .map_err(PipelineError::Spawn)
        };
        let on_spawn_error = |shared: &Arc<Shared>, e: PipelineError| {
            shared.cancelled.cancel();
            e
        };
        for n in 0..settings.workers {
            let encoder = encode::Encoder {
                shared: shared.clone(),
                keys: keys.clone(),
                layout: settings.layout,
                zstd_level: settings.zstd_level,
                outbox: settings.outbox.clone(),
                jobs: jobs_rx.clone(),
            };
            spawn(format!("bd-encode-{n}"), Box::new(move || encoder.run()))
                .map_err(|e| on_spawn_error(&shared, e))?;
        }
        let emitter = encode::Emitter {
            shared: shared.clone(),
            items: items_rx,
            events,
        };
        spawn("bd-emit".into(), Box::new(move || emitter.run()))
            .map_err(|e| on_spawn_error(&shared, e))?;
        let walker = walk::Walker::new(
            walker_parts,
            &settings,
            keys,
            lookup,
            shared.clone(),
            jobs_tx,
            items_tx,
        );
        spawn("bd-walk".into(), Box::new(move || walker.run()))
            .map_err(|e| on_spawn_error(&shared, e))?;
        Ok(Pipeline { shared })
    }

    /// Lets the pipeline seal up to `blocks` more blocks.
    pub fn grant(&self, blocks: usize) {
        if let Ok(mut credit) = self.shared.credit.lock() {
            *credit = credit.saturating_add(blocks);
            self.shared.credit_changed.notify_all();
        }
    }

    /// Stops soon and sends no further event. Staged files stay for the caller to clean.
    pub fn cancel(&self) {
        self.shared.cancelled.cancel();
        self.shared.stop();
    }

    /// Progress so far.
    pub fn totals(&self) -> Totals {
        self.shared.counters.snapshot()
    }

    /// Whether the walker is waiting for a credit to seal the next block (for `status`).
    pub fn waiting_for_credit(&self) -> bool {
        self.shared
            .counters
            .waiting_for_credit
            .load(Ordering::Relaxed)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.cancel();
    }
}
