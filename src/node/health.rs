//! Disk health for `status`: one line an operator can act on — the disk is fine, stalled (a
//! write has not returned for N s), full (writes refused until space is freed), or failing.
//!
//! Everything here reads atomics and a cached free-space sample: answering `status` never
//! touches the disk, so it keeps answering while the disk is frozen. A sampler thread refreshes
//! the free space (statvfs can itself hang on a dead network mount; then only its figure ages).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::units::ByteSize;
use crate::actors::status::DiskStatus;
use crate::store::{SpaceState, WriteStats, free_space};

/// Free space not yet sampled.
const UNKNOWN: u64 = u64::MAX;

/// The disk's condition, worst first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskState {
    /// A write has been running for this long (past the stall threshold).
    Stalled(Duration),
    /// Writes are refused for lack of space, for this long.
    Full(Duration),
    /// The latest write failed with this error.
    Failing(String),
    /// Writes work, but less than `node.keep_free` is free.
    Low(u64),
    Ok,
}

impl DiskState {
    pub fn name(&self) -> &'static str {
        match self {
            DiskState::Stalled(_) => "stalled",
            DiskState::Full(_) => "full",
            DiskState::Failing(_) => "failing",
            DiskState::Low(_) => "low",
            DiskState::Ok => "ok",
        }
    }
}

pub struct DiskHealth {
    home: PathBuf,
    writes: Arc<WriteStats>,
    space: Option<Arc<SpaceState>>,
    keep_free: AtomicU64,
    free: AtomicU64,
    /// Run after each sample: lets the store clear a disk-full state once space is back.
    recovery: Option<Box<dyn Fn() + Send + Sync>>,
}

impl DiskHealth {
    /// `home` is sampled for free space (the database and fragments live under it); `space` is
    /// the real store's disk-full state, when there is a real store.
    pub fn new(
        home: &Path,
        writes: Arc<WriteStats>,
        space: Option<Arc<SpaceState>>,
        keep_free: u64,
    ) -> Self {
        DiskHealth {
            home: home.to_path_buf(),
            writes,
            space,
            keep_free: AtomicU64::new(keep_free),
            free: AtomicU64::new(UNKNOWN),
            recovery: None,
        }
    }

    /// Runs `recover` after every free-space sample (on the sampler thread).
    pub fn with_recovery(mut self, recover: impl Fn() + Send + Sync + 'static) -> Self {
        self.recovery = Some(Box::new(recover));
        self
    }

    /// Samples the free space now, then every `every` on a thread of its own.
    pub fn start_sampler(self: &Arc<Self>, every: Duration) -> std::io::Result<()> {
        self.sample();
        let health = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("bitdust-disk-health".into())
            .spawn(move || {
                while let Some(health) = health.upgrade() {
                    health.sample();
                    if let Some(recover) = &health.recovery {
                        recover();
                    }
                    drop(health);
                    std::thread::sleep(every);
                }
            })?;
        Ok(())
    }

    /// Reads the free space of the home's filesystem once (a syscall: not on an event loop).
    pub fn sample(&self) {
        match free_space(&self.home) {
            Ok(free) => self.free.store(free, Ordering::Relaxed),
            Err(e) => tracing::debug!(error = %e, "cannot read the free disk space"),
        }
    }

    /// `node.keep_free` changed (SIGHUP): for the report, grants, and when the store resumes.
    pub fn set_keep_free(&self, keep_free: u64) {
        self.keep_free.store(keep_free, Ordering::Relaxed);
        if let Some(space) = &self.space {
            space.set_min_free(keep_free);
        }
    }

    /// Free bytes at the last sample; `None` before the first.
    pub fn free(&self) -> Option<u64> {
        Some(self.free.load(Ordering::Relaxed)).filter(|f| *f != UNKNOWN)
    }

    pub fn state(&self) -> DiskState {
        if let Some(stalled) = self.writes.stalled_for() {
            return DiskState::Stalled(stalled);
        }
        let snapshot = self.writes.snapshot();
        // The store knows best whether space is back (its sampler reopens it); the writer's own
        // record of "no space" only counts where there is no store to ask.
        let full = match &self.space {
            Some(space) => space.full_for(),
            None => snapshot.no_space_for,
        };
        if let Some(full) = full {
            return DiskState::Full(full);
        }
        // A write that failed for lack of space is not a failing disk once space is back.
        if snapshot.failing && snapshot.no_space_for.is_none() {
            return DiskState::Failing(snapshot.last_error.unwrap_or_default());
        }
        match self.free() {
            Some(free) if free < self.keep_free.load(Ordering::Relaxed) => DiskState::Low(free),
            _ => DiskState::Ok,
        }
    }

    /// Whether new work that must be written (a fragment, a contract) should be accepted: not
    /// while the disk is full, failing or stalled. The supplier refuses with a specific reason.
    pub fn can_write(&self) -> bool {
        matches!(self.state(), DiskState::Ok | DiskState::Low(_))
    }

    /// The one line `status` shows.
    pub fn line(&self) -> String {
        let snapshot = self.writes.snapshot();
        let free = match self.free() {
            Some(f) => ByteSize(f).to_string(),
            None => "unknown".into(),
        };
        match self.state() {
            DiskState::Stalled(d) => format!(
                "disk stalled for {} s: a database write has not returned ({} more waiting)",
                d.as_secs(),
                snapshot.queued
            ),
            DiskState::Full(d) => format!(
                "disk full for {} s: writes refused until space is freed ({} free, {} needed)",
                d.as_secs(),
                // The store's own figure from its last check is fresher than the sample.
                self.space
                    .as_ref()
                    .filter(|s| s.full_for().is_some())
                    .map_or(free.clone(), |s| ByteSize(s.free_when_checked())
                        .to_string()),
                ByteSize(self.keep_free.load(Ordering::Relaxed))
            ),
            DiskState::Failing(e) => format!("disk failing: the latest write failed: {e}"),
            DiskState::Low(_) => format!(
                "disk nearly full: {free} free, below node.keep_free ({})",
                ByteSize(self.keep_free.load(Ordering::Relaxed))
            ),
            DiskState::Ok => format!(
                "disk ok: {free} free, slowest write {} ms",
                snapshot.slowest.as_millis()
            ),
        }
    }

    /// The `disk` object of `status --json`.
    pub fn report(&self) -> DiskStatus {
        let s = self.writes.snapshot();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        DiskStatus {
            state: self.state().name().to_string(),
            line: self.line(),
            free_bytes: self.free(),
            current_write_ms: s.current.map(ms),
            last_write_ms: ms(s.last),
            slowest_write_ms: ms(s.slowest),
            writes: s.done,
            failed_writes: s.failed,
            queued_writes: s.queued,
            database_resumes: self.space.as_ref().map(|s| s.resumes()),
        }
    }

    /// The space a supplier may grant in total right now: `donated`, capped by what the disk
    /// really has (`held` bytes already stored for customers count as available to them).
    pub fn grantable(&self, donated: u64, held: u64) -> u64 {
        match self.free() {
            Some(free) => super::config::grantable(
                donated,
                held,
                free,
                self.keep_free.load(Ordering::Relaxed),
            ),
            None => donated,
        }
    }
}

/// Bytes in the files under `dir` (the fragments held for customers), counted recursively.
/// IO over every file: run it on a thread of its own.
pub fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total = total.saturating_add(m.len()),
                Err(_) => {}
            }
        }
    }
    total
}

/// Checks `supplier.donated` against the free space of `store/` (at start and on reload), on a
/// thread of its own since it reads the disk; a donation the disk cannot honour is a warning.
pub fn check_donation(config: &super::config::Config, store_dir: &Path) {
    let config = config.clone();
    let store_dir = store_dir.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("bitdust-donation-check".into())
        .spawn(move || {
            let free = match free_space(&store_dir) {
                Ok(free) => free,
                Err(e) => {
                    tracing::warn!(path = %store_dir.display(), error = %e,
                        "cannot read the free space of store/");
                    return;
                }
            };
            let held = bytes_under(&store_dir);
            if let Some(warning) = super::config::donation_warning(&config, held, free) {
                tracing::warn!(path = %store_dir.display(), free, held, "{warning}");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot check supplier.donated against the disk");
    }
}

impl crate::actors::supplier_service::DiskGate for DiskHealth {
    fn can_write(&self) -> bool {
        DiskHealth::can_write(self)
    }

    fn grantable(&self, donated: u64, held: u64) -> u64 {
        DiskHealth::grantable(self, donated, held)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::store::{Batch, Cf, Fault, FaultyStore, MemStore, Writer, WriterSettings};

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn batch() -> Batch {
        let mut b = Batch::new();
        b.put(Cf::Meta, b"k".to_vec(), b"v".to_vec());
        b
    }

    #[test]
    fn stalled_full_failing_and_ok_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(FaultyStore::new(MemStore::new()));
        let settings = WriterSettings {
            queue: 8,
            stall_after: Duration::from_millis(100),
        };
        let (writer, thread) = Writer::spawn(store.clone(), settings).expect("spawn");
        let health = Arc::new(DiskHealth::new(dir.path(), writer.stats(), None, 0));
        health
            .start_sampler(Duration::from_secs(1))
            .expect("sampler");
        assert_eq!(health.state(), DiskState::Ok);
        assert!(health.line().starts_with("disk ok"), "{}", health.line());
        assert!(health.can_write());

        // A write that hangs: the report says stalled, and reading it does not wait.
        store.set_fault(Some(Fault::Hang));
        let pending = writer.submit(batch()).expect("queued");
        wait_until("a stall", || {
            matches!(health.state(), DiskState::Stalled(_))
        });
        let began = Instant::now();
        let line = health.line();
        assert!(began.elapsed() < Duration::from_secs(1));
        assert!(line.starts_with("disk stalled for "), "{line}");
        assert_eq!(health.report().state, "stalled");
        assert!(!health.can_write());

        // The disk thaws into a full one: the hung write fails with "no space".
        store.set_fault(Some(Fault::NoSpace));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert!(rt.block_on(pending).expect_err("full").is_no_space());
        assert!(matches!(health.state(), DiskState::Full(_)));
        assert!(
            health
                .line()
                .contains("writes refused until space is freed")
        );
        assert!(!health.can_write());

        store.set_fault(Some(Fault::Io));
        rt.block_on(writer.write(batch())).expect_err("eio");
        // Still full: an IO error does not prove space came back.
        assert_eq!(health.report().state, "full");

        store.set_fault(None);
        rt.block_on(writer.write(batch())).expect("recovered");
        assert_eq!(health.state(), DiskState::Ok);
        let report = health.report();
        assert!(report.slowest_write_ms >= 100.0, "{report:?}");
        drop(writer);
        thread.join();
    }

    #[test]
    fn a_failing_write_without_space_trouble_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(FaultyStore::new(MemStore::new()));
        let (writer, thread) =
            Writer::spawn(store.clone(), WriterSettings::default()).expect("spawn");
        let health = DiskHealth::new(dir.path(), writer.stats(), None, 0);
        store.set_fault(Some(Fault::Io));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(writer.write(batch())).expect_err("eio");
        assert!(matches!(health.state(), DiskState::Failing(_)));
        assert!(
            health.line().contains("Input/output error"),
            "{}",
            health.line()
        );
        drop(writer);
        thread.join();
    }

    #[test]
    fn bytes_under_counts_nested_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("a/b/f"), [0u8; 300]).expect("write");
        std::fs::write(dir.path().join("g"), [0u8; 12]).expect("write");
        assert_eq!(bytes_under(dir.path()), 312);
        assert_eq!(bytes_under(&dir.path().join("missing")), 0);
    }

    #[test]
    fn low_space_and_the_grant_cap_use_the_sampled_free_space() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(MemStore::new());
        let (writer, thread) = Writer::spawn(store, WriterSettings::default()).expect("spawn");
        let health = DiskHealth::new(dir.path(), writer.stats(), None, u64::MAX - 1);
        // Before a sample nothing is known: no cap, no warning.
        assert_eq!(health.grantable(100, 0), 100);
        health.sample();
        let free = health.free().expect("sampled");
        assert!(matches!(health.state(), DiskState::Low(_)));
        assert!(health.can_write(), "low is a warning, not a refusal");
        health.set_keep_free(0);
        assert_eq!(health.state(), DiskState::Ok);
        assert_eq!(health.grantable(u64::MAX, 0), free);
        assert_eq!(health.grantable(10, 0), 10);
        drop(writer);
        thread.join();
    }
}
