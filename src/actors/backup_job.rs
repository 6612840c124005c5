//! The backup_job actor's IO: one per backup of one source. It runs the data pipeline
//! (`crate::pipeline`, on threads of its own), records what the pipeline produced in the catalog
//! (through the writer), sends staged fragments to the suppliers fire_hire holds per position,
//! and at the end stores the catalog and the recovery record on the suppliers. What to send
//! where, what waits in an outbox and when to commit are the machine's decisions.
//!
//! Crash safety: a staged block's record (block index + chunk index) is written before any of
//! its fragments is sent; the staged files stay until every position acknowledged and that is
//! durable. A job killed midway is resumed at the next start from its job record: blocks still
//! in the outbox are placed (not re-sealed), and the re-walk skips every chunk already indexed.
//! A snapshot becomes visible in one batch, only once every block has `k` fragments placed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use ed25519_dalek::SigningKey;
use tokio::sync::oneshot;

use super::fire_hire::{FireHireDriver, FireHireInput, PositionNews};
use super::fragments::{FragmentError, Fragments, NetworkFragments};
use super::network_connector::NetworkConnectorDriver;
use super::registry::Registry;
use super::shell::{Deliver, Driver, Input, Io, Shell};
use super::status::{BackupOutcome, BackupStatus, JobResult, JobStatus, SkippedFile};
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::NodeId;
use crate::data::audit::{self, AuditPair};
use crate::data::{self, BlockId, BlockRandom, ChunkId, Layout};
use crate::fsm::backup_job::{self as bj, BackupJob, Ledger, Outcome, Progress};
use crate::pipeline::{
    Lookup, Pipeline, PipelineEvent, PipelineKeys, PipelineSettings, Totals, staged_path,
};
use crate::proto::FragmentId;
use crate::store::catalog::{
    self, BlockEntry, CatalogBlock, FileEntry, FragmentPlace, RecoveryRecord, Skipped, Snapshot,
    SnapshotId,
};
use crate::store::health;
use crate::store::jobs::{self, JobRecord};
use crate::store::{Batch, KvStore, Writer};

type NetworkAddr = Addr<Shell<NetworkConnectorDriver>>;
type FireHireAddr = Addr<Shell<FireHireDriver>>;

/// The fragment id the recovery record is stored under on every supplier (documented in
/// PROTOCOL.md): a fixed block id no random block id will meet, at the last position.
pub const RECOVERY_BLOCK: [u8; 32] = *b"bitdust recovery record, v1\0\0\0\0\0";
pub const RECOVERY_POSITION: u32 = u32::MAX;
/// File entries written per catalog batch.
const FILES_PER_BATCH: usize = 512;
/// Results kept for `status`.
const RESULTS_KEPT: usize = 16;

#[derive(Clone, Debug)]
pub struct BackupSettings {
    pub data_shards: u32,
    pub parity_shards: u32,
    pub block_size: usize,
    pub zstd_level: i32,
    /// Encoder threads.
    pub workers: usize,
    pub request_timeout: Duration,
    /// Where fragments wait for their supplier (`HOME/outbox`).
    pub outbox: PathBuf,
    /// Versions kept per source (`backup.keep_versions`).
    pub keep_versions: usize,
}

impl BackupSettings {
    pub fn layout(&self) -> Result<Layout, String> {
        let k = u8::try_from(self.data_shards).map_err(|_| "too many data shards")?;
        let m = u8::try_from(self.parity_shards).map_err(|_| "too many parity shards")?;
        Layout::new(k, m).map_err(|e| e.to_string())
    }
}

/// What to back up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub source: String,
    pub root: PathBuf,
    pub excludes: Vec<String>,
}

/// The node's pieces every job uses.
#[derive(Clone)]
pub struct BackupWiring {
    pub kv: Arc<dyn KvStore>,
    pub writer: Writer,
    pub network: NetworkAddr,
    pub fire_hire: FireHireAddr,
    pub keys: Arc<DataKeys>,
    pub owner: SigningKey,
    pub settings: BackupSettings,
    pub registry: Registry,
    pub status: Arc<Mutex<BackupStatus>>,
}

/// What the pipeline and the suppliers tell a job.
pub enum BackupInput {
    Pipeline(PipelineEvent),
    Position(PositionNews),
    /// A staged block's record is durable (or could not be written): only now may its
    /// fragments leave, so a node killed in between never has fragments out that its catalog
    /// does not know.
    Recorded {
        block: [u8; 32],
        bytes: u64,
        result: Result<(), String>,
    },
    /// A catalog block some supplier was away for: its missing fragments are staged in the
    /// outbox and go out like data fragments when their suppliers return.
    CatalogPartial(BlockEntry),
}

/// The catalog as the pipeline reads it: the previous snapshot's entries, and whether a chunk
/// is stored (its block has its own `k` fragments placed, or waits staged in the outbox).
struct CatalogLookup {
    kv: Arc<dyn KvStore>,
    previous: Option<SnapshotId>,
    outbox: PathBuf,
    blocks: Mutex<HashMap<[u8; 32], bool>>,
}

impl Lookup for CatalogLookup {
    fn previous(&self, path: &[u8]) -> Option<FileEntry> {
        let snapshot = self.previous?;
        catalog::file(&*self.kv, snapshot, path).ok().flatten()
    }

    fn chunk_known(&self, id: &ChunkId) -> bool {
        let Ok(Some(block)) = catalog::chunk_block(&*self.kv, id) else {
            return false;
        };
        if let Ok(cache) = self.blocks.lock()
            && let Some(known) = cache.get(&block.0)
        {
            return *known;
        }
        let known = match catalog::block(&*self.kv, &block) {
            Ok(Some(entry)) => {
                entry.layout().is_ok_and(|l| entry.placed() >= l.k())
                    || staged_path(&self.outbox, &block, 0)
                        .parent()
                        .is_some_and(Path::exists)
            }
            _ => false,
        };
        if let Ok(mut cache) = self.blocks.lock() {
            cache.insert(block.0, known);
        }
        known
    }
}

pub struct BackupJobDriver {
    run: u64,
    spec: JobSpec,
    snapshot: SnapshotId,
    started_at: u64,
    wiring: BackupWiring,
    pipeline: Option<Pipeline>,
    /// The supplier at each position, as fire_hire last said.
    suppliers: BTreeMap<u32, NodeId>,
    /// Unfinished blocks (some position not acknowledged yet).
    blocks: HashMap<[u8; 32], BlockEntry>,
    /// Blocks with acknowledgements not yet written (written when complete or on progress).
    dirty: Vec<[u8; 32]>,
    files: Batch,
    files_in_batch: usize,
    skipped: Vec<Skipped>,
    totals: Totals,
    progress: Progress,
    catalog_stored: bool,
    done: Option<oneshot::Sender<()>>,
    /// The result went out (at commit, or at the end).
    result_published: bool,
    /// Monotonic time of the job's first step (for its duration and rate).
    began: Option<Duration>,
    /// Block records queued and not yet durable.
    recording: usize,
    /// The pipeline finished while records were still being written: `InputDone` waits.
    input_done_waiting: bool,
}

impl BackupJobDriver {
    /// Queues `batch` on the writer; a failure stops the job (a catalog with holes is worse
    /// than no snapshot).
    fn write(&self, batch: Batch, io: &mut Io<'_, Self>) {
        match self.wiring.writer.submit(batch) {
            Ok(pending) => io.spawn_opt(async move {
                let e = pending.await.err()?;
                Some(bj::Event::Fatal(format!("cannot write the catalog: {e}")))
            }),
            Err(e) => io.send(bj::Event::Fatal(format!("cannot write the catalog: {e}"))),
        }
    }

    fn flush_files(&mut self, io: &mut Io<'_, Self>) {
        if self.files_in_batch > 0 {
            let batch = std::mem::take(&mut self.files);
            self.files_in_batch = 0;
            self.write(batch, io);
        }
    }

    fn flush_dirty(&mut self, io: &mut Io<'_, Self>) {
        let mut batch = Batch::new();
        for id in std::mem::take(&mut self.dirty) {
            if let Some(entry) = self.blocks.get(&id) {
                catalog::put_block(&mut batch, entry);
            }
        }
        if !batch.is_empty() {
            self.write(batch, io);
        }
    }

    fn layout_total(&self) -> u32 {
        self.wiring.settings.data_shards + self.wiring.settings.parity_shards
    }

    fn place(&mut self, block: [u8; 32], position: u32, io: &mut Io<'_, Self>) {
        let Some(supplier) = self.suppliers.get(&position).copied() else {
            io.send(bj::Event::PlaceFailed { block, position });
            return;
        };
        let path = staged_path(&self.wiring.settings.outbox, &BlockId(block), position);
        let send = store_fragment(
            self.wiring.network.clone(),
            supplier,
            FragmentId {
                block: block.to_vec(),
                position,
            },
            FragmentSource::File(path),
            self.wiring.settings.request_timeout,
        );
        io.spawn_then(send, move |driver, result| {
            driver.stored(block, position, supplier, result)
        });
    }

    /// A supplier's answer to one fragment.
    fn stored(
        &mut self,
        block: [u8; 32],
        position: u32,
        supplier: NodeId,
        result: Result<Vec<AuditPair>, PlaceError>,
    ) -> bj::Event {
        let pairs = match result {
            Ok(pairs) => pairs,
            Err(why) => {
                tracing::debug!(position, supplier = %supplier, error = %why, "fragment not placed");
                return bj::Event::PlaceFailed { block, position };
            }
        };
        // A staged fragment's pairs were recorded with its block (the encoder made them).
        if !pairs.is_empty() {
            let mut batch = Batch::new();
            health::put_pairs(&mut batch, &BlockId(block), position, &pairs);
            if let Err(e) = self.wiring.writer.submit(batch) {
                tracing::warn!(error = %e, "cannot save a fragment's audit pairs");
            }
        }
        let total = self.layout_total() as usize;
        if let Some(entry) = self.blocks.get_mut(&block)
            && let Some(place) = entry.fragments.get_mut(position as usize)
        {
            place.supplier = Some(supplier);
            self.dirty.push(block);
            if entry.placed() == total {
                self.complete(block);
            }
        }
        bj::Event::Placed { block, position }
    }

    /// Every position acknowledged: the record is written, then the staged files go.
    fn complete(&mut self, block: [u8; 32]) {
        let Some(entry) = self.blocks.remove(&block) else {
            return;
        };
        self.dirty.retain(|b| *b != block);
        let mut batch = Batch::new();
        catalog::put_block(&mut batch, &entry);
        let dir = staged_path(&self.wiring.settings.outbox, &BlockId(block), 0)
            .parent()
            .map(Path::to_path_buf);
        match self.wiring.writer.submit(batch) {
            Ok(pending) => {
                actix::spawn(async move {
                    if pending.await.is_ok()
                        && let Some(dir) = dir
                    {
                        let _ = tokio::fs::remove_dir_all(dir).await;
                    }
                });
            }
            // The files stay: the next job places the block again (idempotent on suppliers).
            Err(e) => tracing::error!(error = %e, "cannot record a placed block"),
        }
    }

    fn on_pipeline(&mut self, event: PipelineEvent, io: &mut Io<'_, Self>) -> Vec<bj::Event> {
        match event {
            PipelineEvent::Block(staged) => {
                let mut batch = Batch::new();
                catalog::put_block(&mut batch, &staged.entry);
                for (chunk, _) in &staged.chunks {
                    catalog::put_chunk(&mut batch, chunk, &staged.entry.id);
                }
                // The encoder's audit pairs, recorded with the block (kept if it is resumed).
                for (position, pairs) in staged.pairs.iter().enumerate() {
                    health::put_pairs(&mut batch, &staged.entry.id, position as u32, pairs);
                }
                let block = staged.entry.id.0;
                let bytes = staged.entry.plain_len;
                self.blocks.insert(block, staged.entry);
                self.recording += 1;
                let submitted = self.wiring.writer.submit(batch);
                let me = io.address();
                io.spawn_task(async move {
                    let result = match submitted {
                        Ok(pending) => pending.await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = me
                        .send(Input(BackupInput::Recorded {
                            block,
                            bytes,
                            result,
                        }))
                        .await;
                });
                Vec::new()
            }
            PipelineEvent::File(entry) => {
                catalog::put_file(&mut self.files, self.snapshot, &entry);
                self.files_in_batch += 1;
                if self.files_in_batch >= FILES_PER_BATCH {
                    self.flush_files(io);
                }
                Vec::new()
            }
            PipelineEvent::Skipped(skipped) => {
                tracing::warn!(path = %String::from_utf8_lossy(&skipped.path),
                    reason = %skipped.reason, "not backed up");
                self.skipped.push(skipped);
                Vec::new()
            }
            PipelineEvent::Done(totals) => {
                self.totals = totals;
                self.flush_files(io);
                if self.recording == 0 {
                    vec![bj::Event::InputDone]
                } else {
                    self.input_done_waiting = true;
                    Vec::new()
                }
            }
            PipelineEvent::Failed(e) => vec![bj::Event::Fatal(e.to_string())],
        }
    }

    fn snapshot_record(&self, finished_at: u64) -> Snapshot {
        let t = &self.totals;
        Snapshot {
            id: self.snapshot,
            source: self.spec.source.clone(),
            root: self.spec.root.as_os_str().as_encoded_bytes().to_vec(),
            started_at: self.started_at,
            finished_at,
            files: t.files,
            dirs: t.dirs,
            symlinks: t.symlinks,
            bytes: t.bytes,
            new_bytes: t.new_bytes,
            new_blocks: t.new_blocks,
            skipped: self.skipped.clone(),
        }
    }

    /// Commits the snapshot locally, then stores the catalog and the recovery record.
    fn save_catalog(&mut self, io: &mut Io<'_, Self>) {
        self.flush_files(io);
        let mut batch = Batch::new();
        for entry in self.blocks.values() {
            catalog::put_block(&mut batch, entry);
        }
        self.dirty.clear();
        catalog::commit_snapshot(&mut batch, &self.snapshot_record(io.unix_secs()));
        jobs::delete_job(&mut batch, self.snapshot);
        let committed = self.wiring.writer.submit(batch);
        let me = io.address();
        let upload = CatalogUpload {
            kv: self.wiring.kv.clone(),
            network: self.wiring.network.clone(),
            keys: self.wiring.keys.clone(),
            owner: self.wiring.owner.clone(),
            settings: self.wiring.settings.clone(),
            suppliers: self.suppliers.clone(),
            revision: self.snapshot.0,
            now: io.unix_secs(),
            refresh: false,
        };
        io.spawn_then(
            async move {
                committed
                    .map_err(|e| format!("cannot commit the snapshot: {e}"))?
                    .await
                    .map_err(|e| format!("cannot commit the snapshot: {e}"))?;
                let partial = upload.run().await?;
                for entry in partial {
                    let _ = me.send(Input(BackupInput::CatalogPartial(entry))).await;
                }
                Ok(())
            },
            |driver, result| match result {
                Ok(()) => {
                    driver.catalog_stored = true;
                    bj::Event::CatalogSaved
                }
                Err(why) => bj::Event::Fatal(why),
            },
        );
    }

    fn publish(&self, elapsed: f64) {
        // The shell records the new state before it performs the step's outputs.
        let machine_state = self
            .wiring
            .registry
            .state_of(
                <BackupJob as crate::fsm::Machine>::NAME,
                &self.run.to_string(),
            )
            .unwrap_or("Running");
        let t = self
            .pipeline
            .as_ref()
            .map(Pipeline::totals)
            .unwrap_or_default();
        let status = JobStatus {
            run: self.run,
            snapshot: self.snapshot.0,
            source: self.spec.source.clone(),
            state: machine_state.to_string(),
            files: t.files + t.dirs + t.symlinks,
            bytes_read: t.bytes_read,
            bytes: t.bytes,
            new_bytes: t.new_bytes,
            blocks: self.progress.blocks,
            blocks_complete: self.progress.complete,
            queued_fragments: self.progress.queued,
            worst_redundancy: self.progress.worst_redundancy,
            started_at: self.started_at,
            elapsed_secs: elapsed,
        };
        if let Ok(mut s) = self.wiring.status.lock() {
            s.running = Some(status);
        }
    }

    fn finish(&mut self, outcome: Outcome, seconds: f64, io: &mut Io<'_, Self>) {
        if let Some(p) = self.pipeline.take() {
            p.cancel();
        }
        let (name, error) = match &outcome {
            Outcome::Committed => (BackupOutcome::Committed, None),
            Outcome::Aborted => (BackupOutcome::Aborted, None),
            Outcome::Failed(why) => (BackupOutcome::Failed, Some(why.clone())),
            Outcome::Interrupted => (BackupOutcome::Interrupted, None),
        };
        match outcome {
            Outcome::Committed | Outcome::Interrupted => self.flush_dirty(io),
            Outcome::Aborted | Outcome::Failed(_) => {
                // The snapshot is abandoned; staged blocks stay in the outbox (their chunks are
                // indexed) and the next job places them.
                self.flush_dirty(io);
                let mut batch = Batch::new();
                jobs::delete_job(&mut batch, self.snapshot);
                super::persist(&self.wiring.writer, batch, "cannot remove a finished job");
                let kv = self.wiring.kv.clone();
                let snapshot = self.snapshot;
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = catalog::drop_files(&*kv, snapshot) {
                        tracing::warn!(error = %e, "cannot drop an abandoned snapshot's files");
                    }
                });
            }
        }
        self.publish_result(name, error, seconds);
        if let Ok(mut s) = self.wiring.status.lock()
            && s.running.as_ref().is_some_and(|r| r.run == self.run)
        {
            s.running = None;
        }
    }

    /// The job's result for `status` and `backup --wait` (once: a committed job that drains its
    /// outboxes afterwards has reported already).
    fn publish_result(&mut self, name: BackupOutcome, error: Option<String>, seconds: f64) {
        if self.result_published {
            return;
        }
        self.result_published = true;
        let t = &self.totals;
        let result = JobResult {
            run: self.run,
            snapshot: self.snapshot.0,
            source: self.spec.source.clone(),
            outcome: name,
            error,
            files: t.files,
            dirs: t.dirs,
            symlinks: t.symlinks,
            bytes: t.bytes,
            bytes_read: t.bytes_read,
            new_bytes: t.new_bytes,
            new_blocks: t.new_blocks,
            seconds,
            skipped: self
                .skipped
                .iter()
                .map(|s| SkippedFile {
                    path: String::from_utf8_lossy(&s.path).into_owned(),
                    reason: s.reason.clone(),
                })
                .collect(),
            catalog_stored: self.catalog_stored,
        };
        tracing::info!(run = self.run, snapshot = self.snapshot.0, source = %self.spec.source,
            outcome = name.as_str(), files = t.files, bytes = t.bytes, new_bytes = t.new_bytes,
            skipped = self.skipped.len(), "backup finished");
        if let Ok(mut s) = self.wiring.status.lock() {
            s.finished.push(result);
            let excess = s.finished.len().saturating_sub(RESULTS_KEPT);
            s.finished.drain(..excess);
        }
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

impl Driver for BackupJobDriver {
    type M = BackupJob;
    type Input = BackupInput;
    type Query = std::convert::Infallible;
    type Answer = ();

    fn perform(&mut self, output: bj::Output, machine: &BackupJob, io: &mut Io<'_, Self>) {
        let began = *self.began.get_or_insert(io.ctx().now);
        let elapsed = io.ctx().now.saturating_sub(began).as_secs_f64();
        match output {
            bj::Output::Produce => {
                if let Some(p) = &self.pipeline {
                    p.grant(1);
                }
            }
            bj::Output::Place { block, position } => self.place(block, position, io),
            bj::Output::SaveCatalog => self.save_catalog(io),
            bj::Output::Cancel => {
                if let Some(p) = self.pipeline.take() {
                    p.cancel();
                }
            }
            bj::Output::Progress(progress) => {
                self.progress = progress;
                self.flush_dirty(io);
                self.publish(elapsed);
            }
            bj::Output::Committed => {
                tracing::info!(
                    run = self.run,
                    queued = self.progress.queued,
                    "snapshot committed; fragments wait for suppliers that are away"
                );
                self.progress = machine.ledger.clone().progress();
                self.publish(elapsed);
                self.publish_result(BackupOutcome::Committed, None, elapsed);
            }
            bj::Output::Finished(outcome) => self.finish(outcome, elapsed, io),
        }
    }

    fn input(
        &mut self,
        input: BackupInput,
        _machine: &BackupJob,
        io: &mut Io<'_, Self>,
    ) -> Vec<bj::Event> {
        match input {
            BackupInput::Pipeline(event) => self.on_pipeline(event, io),
            BackupInput::CatalogPartial(entry) => {
                let block = entry.id.0;
                let bytes = entry.plain_len;
                let placed = entry
                    .fragments
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.supplier.is_some())
                    .map(|(p, _)| p as u32)
                    .collect();
                self.blocks.insert(block, entry);
                vec![bj::Event::BlockReady {
                    block,
                    bytes,
                    placed,
                }]
            }
            BackupInput::Recorded {
                block,
                bytes,
                result,
            } => {
                self.recording = self.recording.saturating_sub(1);
                let mut events = match result {
                    Ok(()) => vec![bj::Event::BlockReady {
                        block,
                        bytes,
                        placed: vec![],
                    }],
                    Err(e) => vec![bj::Event::Fatal(format!("cannot write the catalog: {e}"))],
                };
                if self.input_done_waiting && self.recording == 0 {
                    self.input_done_waiting = false;
                    events.push(bj::Event::InputDone);
                }
                events
            }
            BackupInput::Position(news) => {
                if news.up {
                    self.suppliers.insert(news.position, news.supplier);
                    vec![bj::Event::SupplierUp(news.position)]
                } else {
                    vec![bj::Event::SupplierDown(news.position)]
                }
            }
        }
    }

    fn query(&mut self, query: Self::Query, _: &BackupJob, _: &mut Io<'_, Self>) {
        match query {}
    }
}

impl Handler<PositionNews> for Shell<BackupJobDriver> {
    type Result = ();

    fn handle(&mut self, news: PositionNews, ctx: &mut Context<Self>) {
        <Self as Handler<Input<BackupInput>>>::handle(
            self,
            Input(BackupInput::Position(news)),
            ctx,
        );
    }
}

/// Where a fragment's bytes come from.
pub(crate) enum FragmentSource {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// Why a fragment was not placed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlaceError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the audit pairs' worker failed: {0}")]
    Worker(String),
    #[error(transparent)]
    Supplier(#[from] FragmentError),
}

/// Sends one stored fragment to `supplier` through the fragment client and waits for its
/// acknowledgement (the supplier checks the BLAKE3 before it answers). Returns the audit pairs
/// of bytes given in hand (`Bytes`: the catalog and recovery record, rebuilt fragments); a staged
/// file's pairs were made by the encoder and recorded with its block, so none are made here.
pub(crate) async fn store_fragment(
    network: NetworkAddr,
    supplier: NodeId,
    id: FragmentId,
    source: FragmentSource,
    timeout: Duration,
) -> Result<Vec<AuditPair>, PlaceError> {
    let (data, pairs) = match source {
        FragmentSource::File(path) => match tokio::fs::read(&path).await {
            Ok(data) => (data, Vec::new()),
            Err(source) => return Err(PlaceError::Read { path, source }),
        },
        // The monitor's audit pairs, made while the bytes are in hand (off the event loop).
        FragmentSource::Bytes(data) => tokio::task::spawn_blocking(move || {
            let pairs = audit::pairs_for(&data, &mut rand::thread_rng());
            (data, pairs)
        })
        .await
        .map_err(|e| PlaceError::Worker(e.to_string()))?,
    };
    let Ok(block) = <[u8; 32]>::try_from(id.block.as_slice()) else {
        return Err(FragmentError::Malformed("a block id that is not 32 bytes").into());
    };
    NetworkFragments::network(network, timeout)
        .store(supplier, block, id.position, data)
        .await?;
    Ok(pairs)
}

/// The end of a job: the catalog, sealed and erasure-coded like data, and the recovery record
/// that says where it is, stored whole on every supplier.
struct CatalogUpload {
    kv: Arc<dyn KvStore>,
    network: NetworkAddr,
    keys: Arc<DataKeys>,
    owner: SigningKey,
    settings: BackupSettings,
    suppliers: BTreeMap<u32, NodeId>,
    /// The lowest revision the record may carry (it also exceeds every earlier record's).
    revision: u64,
    now: u64,
    /// Stored by the rebuilder, not a job: a fragment its supplier did not take is left to the
    /// monitor (recorded at that supplier, cell missing) instead of a job's outbox.
    refresh: bool,
}

/// One catalog upload at a time in this process: each takes the next recovery revision.
static UPLOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Where the latest recovery record revision is kept (health meta).
pub const REVISION_META: &str = "recovery-revision";

/// Stores a fresh catalog and recovery record naming the current holders (after a rebuild).
#[derive(Clone)]
pub struct CatalogRefresh {
    pub kv: Arc<dyn KvStore>,
    pub network: NetworkAddr,
    pub fire_hire: FireHireAddr,
    pub keys: Arc<DataKeys>,
    pub owner: SigningKey,
    pub settings: BackupSettings,
}

impl CatalogRefresh {
    pub async fn run(&self) -> Result<(), String> {
        let positions = super::fire_hire::positions(&self.fire_hire)
            .await
            .ok_or("fire_hire is gone (the node stops)")?;
        let suppliers: BTreeMap<u32, NodeId> =
            positions.up().map(|p| (p.position, p.supplier)).collect();
        let upload = CatalogUpload {
            kv: self.kv.clone(),
            network: self.network.clone(),
            keys: self.keys.clone(),
            owner: self.owner.clone(),
            settings: self.settings.clone(),
            suppliers,
            revision: 0,
            now: super::shell::ctx_now().wall.as_secs(),
            refresh: true,
        };
        upload.run().await.map(|_| ())
    }
}

impl CatalogUpload {
    /// Returns the catalog blocks with fragments left to place (staged in the outbox).
    async fn run(self) -> Result<Vec<BlockEntry>, String> {
        let _one_at_a_time = UPLOADING.lock().await;
        let k = self.settings.data_shards as usize;
        let layout = self.settings.layout()?;
        let kv = self.kv.clone();
        let keys = self.keys.clone();
        let owner = self.owner.clone();
        let block_size = self.settings.block_size;
        let level = self.settings.zstd_level;
        // Export and seal off the event loop: the catalog can be megabytes.
        let (catalog_len, encoded) = tokio::task::spawn_blocking(move || {
            let exported = catalog::export(&*kv).map_err(|e| e.to_string())?;
            let mut encoded = Vec::new();
            for piece in exported.chunks(block_size.max(1)) {
                let random = BlockRandom {
                    id: BlockId(rand::random()),
                    nonce: rand::random(),
                };
                encoded.push(
                    data::encode_block(piece, &keys.catalog, &owner, layout, level, random)
                        .map_err(|e| e.to_string())?,
                );
            }
            Ok::<_, String>((exported.len() as u64, encoded))
        })
        .await
        .map_err(|e| e.to_string())??;
        let mut blocks = Vec::new();
        let mut entries = Batch::new();
        let mut partial = Vec::new();
        for block in encoded {
            let mut sends = Vec::new();
            for (position, fragment) in block.fragments.iter().enumerate() {
                let Some(supplier) = self.suppliers.get(&(position as u32)).copied() else {
                    continue;
                };
                let stored = data::stored::wrap(&block.signed_manifest, fragment);
                let id = FragmentId {
                    block: block.id.0.to_vec(),
                    position: position as u32,
                };
                let network = self.network.clone();
                let timeout = self.settings.request_timeout;
                sends.push(async move {
                    let size = stored.len() as u64;
                    let hash = *blake3::hash(&stored).as_bytes();
                    let r = store_fragment(
                        network,
                        supplier,
                        id,
                        FragmentSource::Bytes(stored),
                        timeout,
                    )
                    .await;
                    (position, supplier, size, hash, r)
                });
            }
            let results = futures::future::join_all(sends).await;
            let mut places = vec![
                FragmentPlace {
                    supplier: None,
                    size: 0,
                    blake3: [0; 32],
                };
                block.fragments.len()
            ];
            let mut missing = Vec::new();
            for (position, supplier, size, hash, r) in results {
                let ok = match r {
                    Ok(pairs) => {
                        health::put_pairs(&mut entries, &block.id, position as u32, &pairs);
                        true
                    }
                    Err(_) => false,
                };
                if !ok && self.refresh {
                    missing.push(position);
                }
                places[position] = FragmentPlace {
                    supplier: (ok || self.refresh).then_some(supplier),
                    size,
                    blake3: hash,
                };
            }
            let placed = places.iter().filter(|p| p.supplier.is_some()).count() - missing.len();
            if placed < k {
                return Err(format!(
                    "the snapshot is committed here, but its catalog reached only {placed} of the {k} suppliers it needs"
                ));
            }
            blocks.push(CatalogBlock {
                id: block.id,
                signed_manifest: block.signed_manifest.clone(),
                suppliers: places.iter().map(|p| p.supplier).collect(),
            });
            if !missing.is_empty() {
                use crate::store::health::FragmentHealth;
                let cells: Vec<FragmentHealth> = (0..places.len())
                    .map(|p| {
                        if missing.contains(&p) {
                            FragmentHealth::Missing
                        } else {
                            FragmentHealth::Present
                        }
                    })
                    .collect();
                health::put_health(&mut entries, &block.id, &cells);
            }
            // What did not reach its supplier waits in the outbox, as data fragments do.
            for (position, fragment) in block.fragments.iter().enumerate() {
                if places[position].supplier.is_none() {
                    let stored = data::stored::wrap(&block.signed_manifest, fragment);
                    places[position].size = stored.len() as u64;
                    places[position].blake3 = *blake3::hash(&stored).as_bytes();
                    let path = staged_path(&self.settings.outbox, &block.id, position as u32);
                    stage(&path, &stored)
                        .await
                        .map_err(|e| format!("cannot stage a catalog fragment: {e}"))?;
                }
            }
            let entry = BlockEntry {
                id: block.id,
                signed_manifest: block.signed_manifest,
                data_shards: self.settings.data_shards,
                parity_shards: self.settings.parity_shards,
                plain_len: block.plain_len as u64,
                fragments: places,
            };
            catalog::put_block(&mut entries, &entry);
            if entry.placed() < entry.fragments.len() {
                partial.push(entry);
            }
        }
        // The suppliers' identities from the peer book: a new machine reaches them with these.
        let kv = self.kv.clone();
        let wanted: Vec<NodeId> = self.suppliers.values().copied().collect();
        let identities = tokio::task::spawn_blocking(move || {
            crate::store::peers::load(&*kv)
                .map(|peers| {
                    peers
                        .into_iter()
                        .filter(|(identity, _)| wanted.contains(&identity.node_id()))
                        .map(|(identity, _)| identity.to_bytes())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .await
        .map_err(|e| e.to_string())?;
        // Above every earlier record of this node (a refresh comes between two snapshots).
        let kv = self.kv.clone();
        let last = tokio::task::spawn_blocking(move || health::meta(&*kv, REVISION_META))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_le_bytes);
        let revision = self.revision.max(last + 1);
        health::put_meta(&mut entries, REVISION_META, &revision.to_le_bytes());
        health::put_current_catalog(
            &mut entries,
            &blocks.iter().map(|b| b.id).collect::<Vec<_>>(),
        );
        let record = RecoveryRecord {
            revision,
            created_at: self.now,
            data_shards: self.settings.data_shards,
            parity_shards: self.settings.parity_shards,
            suppliers: self.suppliers.iter().map(|(p, s)| (*p, *s)).collect(),
            catalog: blocks,
            catalog_len,
            identities,
        };
        let sealed =
            catalog::seal_recovery(&record, &self.keys.recovery, &self.owner, rand::random());
        let mut sends = Vec::new();
        for supplier in self.suppliers.values().copied() {
            let id = FragmentId {
                block: RECOVERY_BLOCK.to_vec(),
                position: RECOVERY_POSITION,
            };
            sends.push(store_fragment(
                self.network.clone(),
                supplier,
                id,
                FragmentSource::Bytes(sealed.clone()),
                self.settings.request_timeout,
            ));
        }
        let stored = futures::future::join_all(sends)
            .await
            .into_iter()
            .filter(Result::is_ok)
            .count();
        if stored == 0 {
            return Err(
                "the snapshot is committed here, but no supplier took the recovery record".into(),
            );
        }
        // The catalog's own blocks, for the monitor (not part of the exported catalog itself).
        let kv = self.kv.clone();
        tokio::task::spawn_blocking(move || kv.write(entries))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        tracing::info!(
            revision,
            catalog_bytes = catalog_len,
            recovery_copies = stored,
            "catalog and recovery record stored"
        );
        Ok(partial)
    }
}

/// Writes one staged fragment durably (file and directory synced).
async fn stage(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (path, bytes) = (path.to_path_buf(), bytes.to_vec());
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::File::open(dir)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Starts one job; `done` resolves when it finished (however it ended).
pub async fn start(
    wiring: BackupWiring,
    run: u64,
    spec: JobSpec,
    resume: Option<JobRecord>,
    now_unix: u64,
) -> Result<(Addr<Shell<BackupJobDriver>>, oneshot::Receiver<()>), String> {
    let settings = wiring.settings.clone();
    let kv = wiring.kv.clone();
    let outbox = settings.outbox.clone();
    let source = spec.source.clone();
    let root = spec.root.clone();
    let total = settings.data_shards + settings.parity_shards;
    // Catalog reads and the outbox scan: off the event loop.
    let prepared = tokio::task::spawn_blocking(move || {
        let record = match resume {
            Some(record) => record,
            None => {
                let snapshot = catalog::allocate_snapshot(&*kv).map_err(|e| e.to_string())?;
                let record = JobRecord {
                    snapshot,
                    source: source.clone(),
                    root: root.as_os_str().as_encoded_bytes().to_vec(),
                    started_at: now_unix,
                };
                let mut batch = Batch::new();
                jobs::put_job(&mut batch, &record);
                kv.write(batch).map_err(|e| e.to_string())?;
                record
            }
        };
        let previous = catalog::latest(&*kv, &source)
            .map_err(|e| e.to_string())?
            .map(|s| s.id);
        let resumed = staged_blocks(&*kv, &outbox, total);
        Ok::<_, String>((record, previous, resumed))
    })
    .await
    .map_err(|e| e.to_string())??;
    let (record, previous, resumed) = prepared;
    let lookup = Arc::new(CatalogLookup {
        kv: wiring.kv.clone(),
        previous,
        outbox: settings.outbox.clone(),
        blocks: Mutex::new(HashMap::new()),
    });
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(64);
    let pipeline = Pipeline::start(
        PipelineSettings {
            root: spec.root.clone(),
            excludes: spec.excludes.clone(),
            block_size: settings.block_size,
            layout: settings.layout()?,
            zstd_level: settings.zstd_level,
            workers: settings.workers,
            outbox: settings.outbox.clone(),
        },
        PipelineKeys {
            data: wiring.keys.clone(),
            owner: wiring.owner.clone(),
        },
        lookup,
        events_tx,
    )
    .map_err(|e| e.to_string())?;

    let ctx: Context<Shell<BackupJobDriver>> = Context::new();
    let addr = ctx.address();
    // Where the positions stand now; from `Start` on, every change (and where they stand at
    // subscribing) arrives in order through the subscription below.
    let positions = super::fire_hire::positions(&wiring.fire_hire)
        .await
        .unwrap_or_default();
    let suppliers: BTreeMap<u32, NodeId> = positions
        .held
        .iter()
        .map(|p| (p.position, p.supplier))
        .collect();
    let up: Vec<u32> = positions.up().map(|p| p.position).collect();
    let (done_tx, done_rx) = oneshot::channel();
    let mut blocks = HashMap::new();
    let mut resumed_events = Vec::new();
    for entry in resumed {
        let placed: Vec<u32> = entry
            .fragments
            .iter()
            .enumerate()
            .filter(|(_, f)| f.supplier.is_some())
            .map(|(p, _)| p as u32)
            .collect();
        resumed_events.push(bj::Event::BlockReady {
            block: entry.id.0,
            bytes: entry.plain_len,
            placed,
        });
        blocks.insert(entry.id.0, entry);
    }
    let mut machine = BackupJob {
        ledger: Ledger::new(settings.data_shards, settings.parity_shards),
        ..BackupJob::default()
    };
    machine.ledger.max_unplaced = machine.ledger.max_unplaced.max(resumed_events.len() + 2);
    let driver = BackupJobDriver {
        run,
        spec,
        snapshot: record.snapshot,
        started_at: record.started_at,
        wiring: wiring.clone(),
        pipeline: Some(pipeline),
        suppliers,
        blocks,
        dirty: Vec::new(),
        files: Batch::new(),
        files_in_batch: 0,
        skipped: Vec::new(),
        totals: Totals::default(),
        progress: Progress::default(),
        catalog_stored: false,
        done: Some(done_tx),
        recording: 0,
        input_done_waiting: false,
        began: None,
        result_published: false,
    };
    tracing::info!(run, snapshot = record.snapshot.0, source = %driver.spec.source,
        resumed_blocks = resumed_events.len(), "backup started");
    ctx.run(Shell::new(
        machine,
        run.to_string(),
        driver,
        wiring.registry.clone(),
    ));
    let _ = addr.send(Deliver(bj::Event::Start { up })).await;
    // Listening only now that the machine started: the snapshot the subscription begins with
    // brings it up to date with what changed since the query above.
    let _ = wiring
        .fire_hire
        .send(Input(FireHireInput::Subscribe(addr.clone().recipient())))
        .await;
    for event in resumed_events {
        let _ = addr.send(Deliver(event)).await;
    }
    // The pipeline's events, in order, with backpressure.
    let forward = addr.clone();
    actix::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            if forward
                .send(Input(BackupInput::Pipeline(event)))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    Ok((addr, done_rx))
}

/// Blocks waiting in the outbox with their records; a staged directory without a record (the
/// node stopped between staging and recording) is removed: its chunks were never indexed.
fn staged_blocks(kv: &dyn KvStore, outbox: &Path, total: u32) -> Vec<BlockEntry> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(outbox) else {
        return out;
    };
    for item in dir.flatten() {
        let name = item.file_name();
        let parsed = hex::decode(name.as_encoded_bytes())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        let Some(id) = parsed else { continue };
        match catalog::block(kv, &BlockId(id)) {
            Ok(Some(entry)) if entry.fragments.len() == total as usize => {
                if entry.placed() == total as usize {
                    let _ = std::fs::remove_dir_all(item.path());
                } else {
                    out.push(entry);
                }
            }
            Ok(_) => {
                let _ = std::fs::remove_dir_all(item.path());
            }
            Err(e) => tracing::warn!(error = %e, "cannot read a staged block's record"),
        }
    }
    out
}

/// Retention, between two jobs (never while one runs: a job dedups against the catalog):
/// versions beyond `keep_versions` per source go, and the fragments of blocks no kept version
/// (nor the current catalog) references are deleted from their suppliers, then from the
/// catalog. A crash between the two finds the same plan again (deleting twice is harmless).
/// Returns (versions dropped, blocks deleted).
pub async fn prune(wiring: &BackupWiring) -> Result<(usize, usize), String> {
    let kv = wiring.kv.clone();
    let keep = wiring.settings.keep_versions;
    let plan = tokio::task::spawn_blocking(move || {
        let protect: std::collections::BTreeSet<BlockId> = health::current_catalog(&*kv)
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        catalog::plan_prune(&*kv, keep, &protect).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    if plan.snapshots.is_empty() && plan.blocks.is_empty() {
        return Ok((0, 0));
    }
    let client = NetworkFragments::network(wiring.network.clone(), wiring.settings.request_timeout);
    for block in &plan.blocks {
        let deletes = block
            .fragments
            .iter()
            .enumerate()
            .filter_map(|(position, place)| {
                let supplier = place.supplier?;
                let client = client.clone();
                Some(async move {
                    // A refusal (not found, or any other) is an answer: the supplier was asked.
                    match client.delete(supplier, block.id.0, position as u32).await {
                        Ok(()) => Ok(()),
                        Err(e) if !e.no_answer() && !matches!(e, FragmentError::Malformed(_)) => {
                            Ok(())
                        }
                        Err(_) => Err(supplier),
                    }
                })
            });
        for result in futures::future::join_all(deletes).await {
            if let Err(supplier) = result {
                tracing::warn!(block = %block.id, supplier = %supplier,
                    "an unreferenced fragment could not be deleted (the supplier keeps it)");
            }
        }
    }
    let kv = wiring.kv.clone();
    let counts = (plan.snapshots.len(), plan.blocks.len());
    let ids: Vec<BlockId> = plan.blocks.iter().map(|b| b.id).collect();
    let cleanup = tokio::task::spawn_blocking(move || {
        catalog::apply_prune(&*kv, &plan).map_err(|e| e.to_string())?;
        let mut batch = Batch::new();
        for id in &ids {
            health::delete_block(&*kv, &mut batch, id).map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(batch)
    })
    .await
    .map_err(|e| e.to_string())??;
    wiring
        .writer
        .write(cleanup)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        versions = counts.0,
        blocks = counts.1,
        "retention: old versions removed"
    );
    Ok(counts)
}
