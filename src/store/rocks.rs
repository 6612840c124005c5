//! RocksDB behind `KvStore`: one column family per `Cf`, batches as `WriteBatch`.
//!
//! Disk full is a state, not a fate. When RocksDB reports "No space left" (or an IO error) it
//! latches a background error and refuses every later write, even after space is freed; the
//! `rocksdb` crate (0.24) does not expose `DB::Resume`. So this store remembers the failure, refuses
//! writes with `StoreError::NoSpace` while the disk stays full (one statvfs per refused write, no
//! RocksDB call), and once space is back closes and reopens the database in place: the reopen
//! replays the synced WAL, so every acknowledged write is still there, and callers holding this
//! store never notice beyond the error they already got.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch};

use super::{Batch, Cf, KvStore, Op, StoreError, free_space};

/// Tunables of the real store.
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    /// After a disk-full error, writes stay refused until at least this much is free again.
    pub min_free: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            min_free: 4 * 1024 * 1024,
        }
    }
}

/// Whether the store is refusing writes for lack of space, shared with the health report.
#[derive(Debug, Default)]
pub struct SpaceState {
    full_since: Mutex<Option<Instant>>,
    /// Free bytes at the last check made while full.
    free: AtomicU64,
    /// Times the database was reopened to clear a latched error.
    resumes: AtomicU64,
    /// `StoreOptions::min_free`, changeable while running (SIGHUP).
    min_free: AtomicU64,
}

impl SpaceState {
    /// How long writes have been refused for lack of space; `None` when they are not.
    pub fn full_for(&self) -> Option<Duration> {
        self.since().map(|t| t.elapsed())
    }

    /// Free bytes seen at the last check while full.
    pub fn free_when_checked(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    pub fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::Relaxed)
    }

    /// Changes the free space needed before writes resume after a disk-full error.
    pub fn set_min_free(&self, bytes: u64) {
        self.min_free.store(bytes, Ordering::Relaxed);
    }

    fn min_free(&self) -> u64 {
        self.min_free.load(Ordering::Relaxed)
    }

    fn since(&self) -> Option<Instant> {
        *self.full_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_full(&self, full: bool) {
        let mut since = self.full_since.lock().unwrap_or_else(|e| e.into_inner());
        match (full, since.is_some()) {
            (true, false) => *since = Some(Instant::now()),
            (false, true) => *since = None,
            _ => {}
        }
    }
}

pub struct RocksStore {
    path: PathBuf,
    /// `None` only between closing a failed database and reopening it.
    db: RwLock<Option<DB>>,
    space: Arc<SpaceState>,
    /// Set when RocksDB latched an error: the next write reopens the database first.
    latched: Mutex<Option<Instant>>,
}

/// An IO error of any kind other than "disk full" is retried with a reopen at most this often,
/// so a dying disk does not turn every write into a database reopen.
const REOPEN_EVERY: Duration = Duration::from_secs(5);

fn is_no_space(text: &str) -> bool {
    text.contains("No space left") || text.contains("ENOSPC")
}

fn is_io(text: &str) -> bool {
    text.starts_with("IO error") || text.contains("Input/output error")
}

impl RocksStore {
    /// Opens (creating if needed) the database at `path` with every column family.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let db = open_db(path)?;
        let space = SpaceState::default();
        space.set_min_free(options.min_free);
        Ok(RocksStore {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            space: Arc::new(space),
            latched: Mutex::new(None),
        })
    }

    /// Clears the disk-full state if space is back, without waiting for a write to try: the
    /// health sampler calls this, so `status` turns back to ok and the database is writable
    /// again within a sample. Returns whether it resumed.
    pub fn resume_if_space(&self) -> Result<bool, StoreError> {
        if self.space.since().is_none() {
            return Ok(false);
        }
        let free = free_space(&self.path).map_err(|e| StoreError::Io {
            path: self.path.display().to_string(),
            message: e.to_string(),
        })?;
        self.space.free.store(free, Ordering::Relaxed);
        if free < self.space.min_free() {
            return Ok(false);
        }
        self.reopen()?;
        self.space.set_full(false);
        tracing::info!(path = %self.path.display(), free, "disk has space again: writes resumed");
        Ok(true)
    }

    /// The disk-full state, for the health report.
    pub fn space(&self) -> Arc<SpaceState> {
        self.space.clone()
    }

    fn db(&self) -> Result<RwLockReadGuard<'_, Option<DB>>, StoreError> {
        {
            let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
            if guard.is_some() {
                return Ok(guard);
            }
        }
        self.reopen()?;
        Ok(self.db.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Closes the database (clearing RocksDB's latched error with it) and opens it again.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut guard = self.db.write().unwrap_or_else(|e| e.into_inner());
        // Close first: RocksDB's lock file allows one open instance per process.
        drop(guard.take());
        let db = open_db(&self.path)?;
        *guard = Some(db);
        self.space.resumes.fetch_add(1, Ordering::Relaxed);
        *self.latched.lock().unwrap_or_else(|e| e.into_inner()) = None;
        tracing::info!(path = %self.path.display(), "database reopened to clear a disk error");
        Ok(())
    }

    /// The typed error for a failed write; remembers that RocksDB has latched it.
    fn write_error(&self, e: rocksdb::Error) -> StoreError {
        let text = e.into_string();
        if is_no_space(&text) {
            *self.latched.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            let free = free_space(&self.path).unwrap_or(0);
            self.space.free.store(free, Ordering::Relaxed);
            if self.space.since().is_none() {
                tracing::warn!(path = %self.path.display(), free,
                    "disk full: database writes are refused until space is freed");
            }
            self.space.set_full(true);
            StoreError::NoSpace {
                path: self.path.display().to_string(),
                free,
            }
        } else if is_io(&text) {
            *self.latched.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            StoreError::Io {
                path: self.path.display().to_string(),
                message: text,
            }
        } else {
            StoreError::Db(text)
        }
    }

    /// Before a write: refuse it while the disk is still full; clear a latched error once the
    /// cause may be gone.
    fn before_write(&self) -> Result<(), StoreError> {
        if self.space.since().is_some() {
            let free = free_space(&self.path).map_err(|e| StoreError::Io {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })?;
            self.space.free.store(free, Ordering::Relaxed);
            if free < self.space.min_free() {
                return Err(StoreError::NoSpace {
                    path: self.path.display().to_string(),
                    free,
                });
            }
            return self.reopen();
        }
        let latched = *self.latched.lock().unwrap_or_else(|e| e.into_inner());
        if latched.is_some_and(|t| t.elapsed() >= REOPEN_EVERY) {
            self.reopen()?;
        }
        Ok(())
    }
}

/// Bytes of memtables across every column family before the largest is flushed.
const DB_WRITE_BUFFERS: usize = 32 << 20;

fn open_db(path: &Path) -> Result<DB, StoreError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // A home server, not a database server: keep memory modest.
    options.set_max_open_files(256);
    options.set_keep_log_file_num(4);
    // All column families' memtables together: by default each may hold 2 x 64 MiB, which a
    // backup or import of a big tree fills (the owner's RSS budget is 256 MB, issue 20).
    options.set_db_write_buffer_size(DB_WRITE_BUFFERS);
    let cfs = Cf::ALL
        .iter()
        .map(|cf| ColumnFamilyDescriptor::new(cf.name(), Options::default()));
    DB::open_cf_descriptors(&options, path, cfs).map_err(|e| {
        let text = e.into_string();
        if text.contains("lock") || text.contains("Resource temporarily unavailable") {
            StoreError::Locked {
                path: path.display().to_string(),
            }
        } else if is_no_space(&text) {
            StoreError::NoSpace {
                path: path.display().to_string(),
                free: free_space(path).unwrap_or(0),
            }
        } else {
            StoreError::Db(text)
        }
    })
}

fn handle(db: &DB, cf: Cf) -> Result<&rocksdb::ColumnFamily, StoreError> {
    db.cf_handle(cf.name())
        .ok_or_else(|| StoreError::Db(format!("column family {} missing", cf.name())))
}

fn closed() -> StoreError {
    StoreError::Db("the database is closed".into())
}

impl KvStore for RocksStore {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        db.get_cf(handle(db, cf)?, key)
            .map_err(|e| StoreError::Db(e.into_string()))
    }

    fn get_sorted(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        db.batched_multi_get_cf(handle(db, cf)?, keys.iter(), true)
            .into_iter()
            .map(|r| {
                r.map(|v| v.map(|v| v.to_vec()))
                    .map_err(|e| StoreError::Db(e.into_string()))
            })
            .collect()
    }

    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        self.before_write()?;
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        let mut wb = WriteBatch::default();
        for op in batch.ops() {
            match op {
                Op::Put { cf, key, value } => wb.put_cf(handle(db, *cf)?, key, value),
                Op::Delete { cf, key } => wb.delete_cf(handle(db, *cf)?, key),
            }
        }
        // Synced: a write that returned (and was acked to a peer) survives a power loss too.
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        match db.write_opt(wb, &options) {
            Ok(()) => {
                if self.space.since().is_some() {
                    tracing::info!(path = %self.path.display(), "disk has space again: writes resumed");
                    self.space.set_full(false);
                }
                Ok(())
            }
            Err(e) => Err(self.write_error(e)),
        }
    }

    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        let start = from.unwrap_or(prefix);
        let mut out = Vec::new();
        for item in db.iterator_cf(
            handle(db, cf)?,
            IteratorMode::From(start, Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| StoreError::Db(e.into_string()))?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().ok_or_else(closed)?;
        for cf in Cf::ALL {
            db.flush_cf(handle(db, cf)?)
                .map_err(|e| self.write_error(e))?;
        }
        db.flush_wal(true).map_err(|e| self.write_error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rocksdb_errors_are_classified() {
        assert!(is_no_space(
            "IO error: No space left on device: While appending to file: /h/db/000004.log"
        ));
        assert!(is_io(
            "IO error: Input/output error: While fsync: /h/db/000004.log"
        ));
        assert!(!is_no_space("Corruption: block checksum mismatch"));
        assert!(!is_io("Corruption: block checksum mismatch"));
    }

    #[test]
    fn not_full_means_nothing_to_resume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RocksStore::open(dir.path()).expect("open");
        assert!(!store.resume_if_space().expect("resume"));
        assert_eq!(store.space().full_for(), None);
        assert_eq!(store.space().resumes(), 0);
    }

    #[test]
    fn contract_and_persistence() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RocksStore::open(dir.path()).expect("open");
            super::super::contract_tests::exercise(&store);
            // A second open of the same path while the first is open is refused.
            assert!(matches!(
                RocksStore::open(dir.path()),
                Err(StoreError::Locked { .. })
            ));
        }
        let store = RocksStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get(Cf::Meta, b"c").expect("get"), Some(b"4".to_vec()));
    }
}
