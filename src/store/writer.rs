//! The bounded writer: synced database writes run on a thread of their own, never on an actor's
//! event loop, so a stalled disk (a frozen filesystem, a dying SD card, a hung network mount)
//! delays writes but never freezes the node: `status` keeps answering and says the disk stalled.
//!
//! Invariants:
//! - The queue is bounded (`WriterSettings::queue`): `submit` refuses with `WriterError::Busy`
//!   when it is full, `write` waits for room without blocking its thread.
//! - Writes apply in submission order, one at a time, each synced before its caller hears `Ok`
//!   (the store's WAL sync): what was acknowledged stays acknowledged.
//! - `WriteStats` is plain atomics, readable from any thread without touching the disk.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Batch, KvStore, StoreError};

#[derive(Clone, Copy, Debug)]
pub struct WriterSettings {
    /// Writes queued (not yet started) before `submit` refuses and `write` waits.
    pub queue: usize,
    /// A write running longer than this makes the disk count as stalled.
    pub stall_after: Duration,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            queue: 256,
            stall_after: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("the disk writer's queue is full ({0} writes waiting)")]
    Busy(usize),
    #[error("the disk writer has stopped")]
    Closed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl WriterError {
    pub fn is_no_space(&self) -> bool {
        matches!(self, WriterError::Store(e) if e.is_no_space())
    }
}

enum Job {
    Write(Batch, oneshot::Sender<Result<(), StoreError>>),
    Flush(oneshot::Sender<Result<(), StoreError>>),
}

/// Latency and progress of the writer, shared with the health report.
#[derive(Debug)]
pub struct WriteStats {
    epoch: Instant,
    stall_after: Duration,
    /// Start of the write in progress, in µs since `epoch` plus one; 0 when idle.
    busy_since: AtomicU64,
    last_us: AtomicU64,
    slowest_us: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    queued: AtomicU64,
    /// When writes started failing for lack of space (µs since `epoch` plus one; 0 = they don't).
    no_space_since: AtomicU64,
    /// Whether the latest finished write failed.
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// A copy of the stats at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteSnapshot {
    /// How long the write in progress has been running.
    pub current: Option<Duration>,
    pub last: Duration,
    pub slowest: Duration,
    pub done: u64,
    pub failed: u64,
    pub queued: u64,
    /// How long writes have been failing with "no space".
    pub no_space_for: Option<Duration>,
    /// Whether the latest finished write failed (its error is `last_error`).
    pub failing: bool,
    pub last_error: Option<String>,
}

impl WriteStats {
    fn new(stall_after: Duration) -> Self {
        WriteStats {
            epoch: Instant::now(),
            stall_after,
            busy_since: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
            slowest_us: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            no_space_since: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    fn now_mark(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1) + 1
    }

    fn since(&self, mark: u64) -> Option<Duration> {
        (mark != 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_micros(mark - 1))
        })
    }

    /// How long the write in progress has been stuck, once that exceeds the stall threshold.
    pub fn stalled_for(&self) -> Option<Duration> {
        self.since(self.busy_since.load(Ordering::Acquire))
            .filter(|d| *d >= self.stall_after)
    }

    pub fn stall_after(&self) -> Duration {
        self.stall_after
    }

    pub fn snapshot(&self) -> WriteSnapshot {
        WriteSnapshot {
            current: self.since(self.busy_since.load(Ordering::Acquire)),
            last: Duration::from_micros(self.last_us.load(Ordering::Relaxed)),
            slowest: Duration::from_micros(self.slowest_us.load(Ordering::Relaxed)),
            done: self.done.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            no_space_for: self.since(self.no_space_since.load(Ordering::Relaxed)),
            failing: self.failing.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn started(&self) {
        self.busy_since.store(self.now_mark(), Ordering::Release);
    }

    fn finished(&self, took: Duration, result: &Result<(), StoreError>) {
        self.busy_since.store(0, Ordering::Release);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.last_us.store(us, Ordering::Relaxed);
        self.slowest_us.fetch_max(us, Ordering::Relaxed);
        self.failing.store(result.is_err(), Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.done.fetch_add(1, Ordering::Relaxed);
                self.no_space_since.store(0, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if e.is_no_space() {
                    let _ = self.no_space_since.compare_exchange(
                        0,
                        self.now_mark(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
        }
    }
}

/// A handle to the writer thread; clones share it. The thread ends (after finishing every
/// queued write) when the last handle is dropped.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    stats: Arc<WriteStats>,
    capacity: usize,
}

/// A submitted write: resolves when it is synced (or failed).
pub struct Pending(oneshot::Receiver<Result<(), StoreError>>);

impl Future for Pending {
    type Output = Result<(), WriterError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(result) => result.map_err(WriterError::Store),
            Err(_) => Err(WriterError::Closed),
        })
    }
}

impl Writer {
    /// Starts the writer thread over `store`. The returned handle's `join` waits for it.
    pub fn spawn(
        store: Arc<dyn KvStore>,
        settings: WriterSettings,
    ) -> std::io::Result<(Writer, WriterThread)> {
        let capacity = settings.queue.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let stats = Arc::new(WriteStats::new(settings.stall_after));
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("bitdust-writer".into())
            .spawn(move || run(store, rx, &thread_stats))?;
        Ok((
            Writer {
                tx,
                stats,
                capacity,
            },
            WriterThread(thread),
        ))
    }

    pub fn stats(&self) -> Arc<WriteStats> {
        self.stats.clone()
    }

    /// Queues `batch` without waiting: `Busy` when the queue is full (the caller sheds load).
    pub fn submit(&self, batch: Batch) -> Result<Pending, WriterError> {
        let (reply, rx) = oneshot::channel();
        // Counted before sending: the thread may take the job (and count it off) at once.
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Job::Write(batch, reply)) {
            Ok(()) => Ok(Pending(rx)),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => WriterError::Busy(self.capacity),
                    mpsc::error::TrySendError::Closed(_) => WriterError::Closed,
                })
            }
        }
    }

    async fn send(&self, job: Job) -> Result<(), WriterError> {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(job).await.map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            WriterError::Closed
        })
    }

    /// Queues `batch`, waiting (asynchronously) for room, and resolves when it is synced.
    pub async fn write(&self, batch: Batch) -> Result<(), WriterError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Write(batch, reply)).await?;
        Pending(rx).await
    }

    /// Makes everything written before it durable (after the writes queued ahead of it).
    pub async fn flush(&self) -> Result<(), WriterError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Flush(reply)).await?;
        Pending(rx).await
    }
}

/// The writer's thread; `join` returns once every handle is dropped and the queue is drained.
pub struct WriterThread(std::thread::JoinHandle<()>);

impl WriterThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("the disk writer thread panicked");
        }
    }
}

fn run(store: Arc<dyn KvStore>, mut rx: mpsc::Receiver<Job>, stats: &WriteStats) {
    while let Some(job) = rx.blocking_recv() {
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        stats.started();
        let began = Instant::now();
        let (result, reply) = match job {
            Job::Write(batch, reply) => (store.write(batch), reply),
            Job::Flush(reply) => (store.flush(), reply),
        };
        stats.finished(began.elapsed(), &result);
        if let Err(e) = &result {
            tracing::warn!(error = %e, "database write failed");
        }
        // The caller may have given up waiting; the write happened (or failed) all the same.
        let _ = reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Cf, Fault, FaultyStore, MemStore};

    fn batch(key: &[u8]) -> Batch {
        let mut b = Batch::new();
        b.put(Cf::Meta, key.to_vec(), b"v".to_vec());
        b
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn writes_apply_in_order_and_are_counted() {
        let store = Arc::new(MemStore::new());
        let (writer, thread) =
            Writer::spawn(store.clone(), WriterSettings::default()).expect("spawn");
        runtime().block_on(async {
            let first = writer.submit(batch(b"a")).expect("queued");
            writer.write(batch(b"b")).await.expect("write");
            first.await.expect("first write");
            writer.flush().await.expect("flush");
        });
        assert!(store.get(Cf::Meta, b"a").expect("get").is_some());
        let stats = writer.stats().snapshot();
        assert_eq!((stats.done, stats.failed, stats.queued), (3, 0, 0));
        assert_eq!(stats.current, None);
        drop(writer);
        thread.join();
    }

    #[test]
    fn a_hung_write_is_reported_as_a_stall_and_blocks_no_caller() {
        let store = Arc::new(FaultyStore::new(MemStore::new()));
        let settings = WriterSettings {
            queue: 2,
            stall_after: Duration::from_millis(200),
        };
        let (writer, thread) = Writer::spawn(store.clone(), settings).expect("spawn");
        let stats = writer.stats();
        store.set_fault(Some(Fault::Hang));
        // The caller gets its ticket at once even though the disk is stuck.
        let began = Instant::now();
        let stuck = writer.submit(batch(b"stuck")).expect("queued");
        assert!(began.elapsed() < Duration::from_secs(1));
        wait_until("the write to block", || store.blocked() == 1);
        assert_eq!(
            stats.stalled_for(),
            None,
            "not a stall before the threshold"
        );
        wait_until("the stall to show", || stats.stalled_for().is_some());
        // The queue fills but never blocks: the third write is refused, not waited on.
        writer.submit(batch(b"q1")).expect("room for one");
        writer.submit(batch(b"q2")).expect("room for two");
        assert!(matches!(
            writer.submit(batch(b"q3")),
            Err(WriterError::Busy(2))
        ));
        let snapshot = stats.snapshot();
        assert!(snapshot.current.expect("in progress") >= Duration::from_millis(200));
        assert_eq!(snapshot.queued, 2);
        store.set_fault(None);
        runtime().block_on(async { stuck.await.expect("the write lands once the disk thaws") });
        wait_until("the queue to drain", || stats.snapshot().queued == 0);
        assert_eq!(stats.stalled_for(), None);
        assert!(stats.snapshot().slowest >= Duration::from_millis(200));
        assert!(store.get(Cf::Meta, b"q2").expect("get").is_some());
        drop(writer);
        thread.join();
    }

    #[test]
    fn no_space_and_io_errors_reach_the_caller_typed() {
        let store = Arc::new(FaultyStore::new(MemStore::new()));
        let (writer, thread) =
            Writer::spawn(store.clone(), WriterSettings::default()).expect("spawn");
        let stats = writer.stats();
        runtime().block_on(async {
            store.set_fault(Some(Fault::NoSpace));
            let e = writer.write(batch(b"a")).await.expect_err("full");
            assert!(e.is_no_space(), "{e}");
            assert!(stats.snapshot().no_space_for.is_some());
            store.set_fault(Some(Fault::Io));
            let e = writer.write(batch(b"b")).await.expect_err("eio");
            assert!(
                matches!(e, WriterError::Store(StoreError::Io { .. })),
                "{e}"
            );
            store.set_fault(None);
            writer.write(batch(b"c")).await.expect("space is back");
        });
        let snapshot = stats.snapshot();
        assert_eq!(
            snapshot.no_space_for, None,
            "a success clears the full state"
        );
        assert_eq!((snapshot.done, snapshot.failed), (1, 2));
        assert!(
            snapshot
                .last_error
                .is_some_and(|e| e.contains("Input/output"))
        );
        drop(writer);
        thread.join();
    }

    #[test]
    fn dropping_every_handle_drains_the_queue_then_ends_the_thread() {
        let store = Arc::new(FaultyStore::new(MemStore::new()));
        let (writer, thread) =
            Writer::spawn(store.clone(), WriterSettings::default()).expect("spawn");
        store.set_fault(Some(Fault::Delay(Duration::from_millis(50))));
        for key in [b"x", b"y", b"z"] {
            drop(writer.submit(batch(key)).expect("queued"));
        }
        drop(writer);
        thread.join();
        for key in [b"x", b"y", b"z"] {
            assert!(store.get(Cf::Meta, key).expect("get").is_some());
        }
    }
}
