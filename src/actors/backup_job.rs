//! The backup_job actor's IO: one per backup of one source. It runs the data pipeline
//! (`crate::pipeline`, on threads of its own), records what the pipeline produced in the catalog
//! (through the writer), sends staged fragments to the suppliers fire_hire holds per position,
//! and at the end stores the catalog and the recovery record on the suppliers
//! (`catalog_upload`). What to send where, what waits in an outbox, when a block is complete,
//! when to commit and how the catalog is stored are the machine's decisions; the driver only
//! does the IO its outputs name and reports how it went.
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
use tokio::sync::oneshot;

use super::catalog_upload::{CodedCatalog, RecordSend, UPLOADING, Upload, code_catalog};
use super::fire_hire::{FireHireInput, PositionNews};
use super::fragments::{FragmentError, Fragments, NetworkFragments};
use super::network_connector::NetworkConnectorDriver;
use super::services::Services;
use super::shell::{Deliver, Driver, Input, Io, Shell};
use super::status::{BackupOutcome, BackupStatus, JobResult, JobStatus, SkippedFile};
use crate::crypto::identity::NodeId;
use crate::data::audit::{self, AuditPair};
use crate::data::{BlockId, ChunkId, DataError, Layout};
use crate::fsm::backup_job::{self as bj, BackupJob, Ledger, Outcome, Placement, Progress};
use crate::pipeline::{
    Lookup, Pipeline, PipelineError, PipelineEvent, PipelineKeys, PipelineSettings, Totals,
    staged_path,
};
use crate::proto::FragmentId;
use crate::store::catalog::{
    self, BlockEntry, CatalogError, FileEntry, Skipped, Snapshot, SnapshotId,
};
use crate::store::health::{self, HealthError};
use crate::store::jobs::{self, JobRecord};
use crate::store::{Batch, KvStore, StoreError, WriterError};

pub use super::catalog_upload::{CatalogRefresh, RECOVERY_BLOCK, RECOVERY_POSITION, UploadError};

type NetworkAddr = Addr<Shell<NetworkConnectorDriver>>;

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
    pub fn layout(&self) -> Result<Layout, DataError> {
        let k = u8::try_from(self.data_shards)
            .map_err(|_| DataError::Params("too many data shards"))?;
        let m = u8::try_from(self.parity_shards)
            .map_err(|_| DataError::Params("too many parity shards"))?;
        Layout::new(k, m)
    }
}

/// Why a job could not start, or retention could not run.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot read or write the catalog: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error("cannot start the pipeline: {0}")]
    Pipeline(#[from] PipelineError),
    #[error("invalid layout: {0}")]
    Layout(#[from] DataError),
    #[error("cannot write the catalog: {0}")]
    Write(#[from] WriterError),
    #[error("a worker thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
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
    pub services: Services,
    pub settings: BackupSettings,
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
        result: Result<(), WriterError>,
    },
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
        let known = self.chunk_stored(id);
        if known == Some(false)
            && let Err(e) = catalog::mark_remapped(&*self.kv, id)
        {
            tracing::warn!(error = %e, "cannot mark a chunk stored again");
        }
        known == Some(true)
    }
}

impl CatalogLookup {
    /// Whether `chunk`'s block is stored (`None`: the index has no entry for it).
    fn chunk_stored(&self, id: &ChunkId) -> Option<bool> {
        let Ok(Some(block)) = catalog::chunk_block(&*self.kv, id) else {
            return None;
        };
        if let Ok(cache) = self.blocks.lock()
            && let Some(known) = cache.get(&block.0)
        {
            return Some(*known);
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
        Some(known)
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
    /// The catalog, coded, while the job commits.
    coded: Option<CodedCatalog>,
    /// Audit pairs of the catalog fragments suppliers took (saved with the catalog's entries).
    catalog_pairs: Vec<(BlockId, u32, Vec<AuditPair>)>,
    /// This job's turn to upload a catalog, from coding it until its entries are saved.
    upload_turn: Option<tokio::sync::MutexGuard<'static, ()>>,
}

impl BackupJobDriver {
    /// Queues `batch` on the writer; a failure stops the job (a catalog with holes is worse
    /// than no snapshot).
    fn write(&self, batch: Batch, io: &mut Io<'_, Self>) {
        match self.wiring.services.writer.submit(batch) {
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

    fn place(&mut self, block: [u8; 32], position: u32, io: &mut Io<'_, Self>) {
        let Some(supplier) = self.suppliers.get(&position).copied() else {
            io.send(bj::Event::PlaceFailed { block, position });
            return;
        };
        let path = staged_path(&self.wiring.settings.outbox, &BlockId(block), position);
        let send = store_fragment(
            self.wiring.services.network.clone(),
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
            if let Err(e) = self.wiring.services.writer.submit(batch) {
                tracing::warn!(error = %e, "cannot save a fragment's audit pairs");
            }
        }
        if let Some(entry) = self.blocks.get_mut(&block)
            && let Some(place) = entry.fragments.get_mut(position as usize)
        {
            place.supplier = Some(supplier);
            self.dirty.push(block);
        }
        bj::Event::Placed { block, position }
    }

    /// Every position acknowledged (the machine says so): the record is written, then the
    /// staged files go.
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
        match self.wiring.services.writer.submit(batch) {
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
                let submitted = self.wiring.services.writer.submit(batch);
                let me = io.address();
                io.spawn_task(async move {
                    let result = match submitted {
                        Ok(pending) => pending.await,
                        Err(e) => Err(e),
                    };
                    let _ = me
                        .send(Input(BackupInput::Recorded {
                            block,
                            bytes,
                            result,
                        }))
                        .await;
                });
                vec![bj::Event::BlockStaged { block }]
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
                vec![bj::Event::InputDone]
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

    /// Commits the snapshot locally, then (with this process's upload turn) exports, seals and
    /// codes the catalog.
    fn export_catalog(&mut self, io: &mut Io<'_, Self>) {
        self.flush_files(io);
        let mut batch = Batch::new();
        for entry in self.blocks.values() {
            catalog::put_block(&mut batch, entry);
        }
        self.dirty.clear();
        catalog::commit_snapshot(&mut batch, &self.snapshot_record(io.unix_secs()));
        jobs::delete_job(&mut batch, self.snapshot);
        let committed = self.wiring.services.writer.submit(batch);
        let (kv, keys, owner, settings) = (
            self.wiring.services.kv.clone(),
            self.wiring.services.keys.clone(),
            self.wiring.services.signer.clone(),
            self.wiring.settings.clone(),
        );
        let suppliers: Vec<NodeId> = self.suppliers.values().copied().collect();
        io.spawn_then(
            async move {
                committed?.await?;
                let turn = UPLOADING.lock().await;
                // Off the event loop: the catalog can be megabytes.
                let coded = tokio::task::spawn_blocking(move || {
                    code_catalog(&*kv, &keys, &owner, &settings, &suppliers)
                })
                .await??;
                Ok::<_, UploadError>((turn, coded))
            },
            |driver, result| match result {
                Ok((turn, coded)) => {
                    driver.upload_turn = Some(turn);
                    let event = bj::Event::CatalogEncoded {
                        blocks: coded.ids(),
                        last_revision: coded.last_revision,
                    };
                    driver.coded = Some(coded);
                    event
                }
                Err(why) => bj::Event::Fatal(format!("cannot commit the snapshot: {why}")),
            },
        );
    }

    /// Sends one catalog fragment to its position's supplier.
    fn place_catalog(&mut self, block: [u8; 32], position: u32, io: &mut Io<'_, Self>) {
        let supplier = self.suppliers.get(&position).copied();
        let bytes = self
            .coded
            .as_ref()
            .and_then(|c| c.fragment(block, position));
        let (Some(supplier), Some(bytes)) = (supplier, bytes) else {
            io.send(bj::Event::CatalogStored {
                block,
                position,
                stored: false,
            });
            return;
        };
        let id = FragmentId {
            block: block.to_vec(),
            position,
        };
        let send = store_fragment(
            self.wiring.services.network.clone(),
            supplier,
            id,
            FragmentSource::Bytes(bytes),
            self.wiring.settings.request_timeout,
        );
        io.spawn_then(send, move |driver, result| {
            let stored = result.is_ok();
            if let Ok(pairs) = result {
                driver.catalog_pairs.push((BlockId(block), position, pairs));
            }
            bj::Event::CatalogStored {
                block,
                position,
                stored,
            }
        });
    }

    fn upload<'a>(&'a self, revision: u64, placements: &'a [Placement]) -> Option<Upload<'a>> {
        Some(Upload {
            coded: self.coded.as_ref()?,
            settings: &self.wiring.settings,
            suppliers: &self.suppliers,
            revision,
            placements,
        })
    }

    /// Stages the catalog fragments that missed, then sends the recovery record to `to`.
    fn send_record(
        &mut self,
        revision: u64,
        placements: &[Placement],
        to: &[u32],
        io: &mut Io<'_, Self>,
    ) {
        let Some(upload) = self.upload(revision, placements) else {
            return;
        };
        let w = &self.wiring;
        let send = RecordSend::new(&upload, &w.services, io.unix_secs(), to);
        io.spawn_then(send.run(), |_, result| match result {
            Ok(copies) => bj::Event::RecordSent { copies },
            Err(why) => bj::Event::Fatal(why.to_string()),
        });
    }

    /// Saves the catalog blocks' entries, the revision and the current catalog; the blocks
    /// with fragments in the outbox become the job's to place.
    fn save_catalog(&mut self, revision: u64, placements: &[Placement], io: &mut Io<'_, Self>) {
        let Some(upload) = self.upload(revision, placements) else {
            return;
        };
        let (batch, partial) = upload.entries(&self.catalog_pairs);
        let (catalog_len, uploaded) = (upload.coded.len, upload.coded.new_len);
        for entry in partial {
            self.blocks.insert(entry.id.0, entry);
        }
        let written = self.wiring.services.writer.submit(batch);
        io.spawn_then(
            async move { written?.await },
            move |driver, result| match result {
                Ok(()) => {
                    driver.upload_turn = None;
                    driver.catalog_stored = true;
                    tracing::info!(
                        revision,
                        catalog_bytes = catalog_len,
                        catalog_uploaded_bytes = uploaded,
                        "catalog and recovery record stored"
                    );
                    bj::Event::CatalogSaved
                }
                Err(e) => bj::Event::Fatal(format!("cannot write the catalog: {e}")),
            },
        );
    }

    fn publish(&self, elapsed: f64) {
        // The shell records the new state before it performs the step's outputs.
        let machine_state = self
            .wiring
            .services
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
        self.upload_turn = None;
        let (name, error) = match &outcome {
            Outcome::Committed => (BackupOutcome::Committed, None),
            Outcome::Failed(why) => (BackupOutcome::Failed, Some(why.clone())),
            Outcome::Interrupted => (BackupOutcome::Interrupted, None),
        };
        match outcome {
            Outcome::Committed | Outcome::Interrupted => self.flush_dirty(io),
            Outcome::Failed(_) => {
                // The snapshot is abandoned; staged blocks stay in the outbox (their chunks are
                // indexed) and the next job places them.
                self.flush_dirty(io);
                let mut batch = Batch::new();
                jobs::delete_job(&mut batch, self.snapshot);
                super::persist(
                    &self.wiring.services.writer,
                    batch,
                    "cannot remove a finished job",
                );
                let kv = self.wiring.services.kv.clone();
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
                    by_design: s.by_design,
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

    fn perform(&mut self, output: bj::Output, _: &BackupJob, io: &mut Io<'_, Self>) {
        let began = *self.began.get_or_insert(io.ctx().now);
        let elapsed = io.ctx().now.saturating_sub(began).as_secs_f64();
        match output {
            bj::Output::Produce => {
                if let Some(p) = &self.pipeline {
                    p.grant(1);
                }
            }
            bj::Output::Place { block, position } => self.place(block, position, io),
            bj::Output::BlockComplete { block } => self.complete(block),
            bj::Output::ExportCatalog => self.export_catalog(io),
            bj::Output::PlaceCatalog { block, position } => self.place_catalog(block, position, io),
            bj::Output::SendRecord {
                revision,
                placements,
                to,
            } => self.send_record(revision, &placements, &to, io),
            bj::Output::SaveCatalog {
                revision,
                placements,
            } => self.save_catalog(revision, &placements, io),
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
            bj::Output::Committed(progress) => {
                self.progress = progress;
                tracing::info!(
                    run = self.run,
                    queued = self.progress.queued,
                    "snapshot committed; fragments wait for suppliers that are away"
                );
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
            BackupInput::Recorded {
                block,
                bytes,
                result,
            } => match result {
                Ok(()) => vec![bj::Event::BlockReady {
                    block,
                    bytes,
                    placed: vec![],
                }],
                Err(e) => vec![bj::Event::Fatal(format!("cannot write the catalog: {e}"))],
            },
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

/// Starts one job; `done` resolves when it finished (however it ended).
pub async fn start(
    wiring: BackupWiring,
    run: u64,
    spec: JobSpec,
    resume: Option<JobRecord>,
    now_unix: u64,
) -> Result<(Addr<Shell<BackupJobDriver>>, oneshot::Receiver<()>), BackupError> {
    let settings = wiring.settings.clone();
    let (kv, outbox) = (wiring.services.kv.clone(), settings.outbox.clone());
    let (source, root) = (spec.source.clone(), spec.root.clone());
    let total = settings.data_shards + settings.parity_shards;
    // Catalog reads and the outbox scan: off the event loop.
    let (record, previous, resumed) = tokio::task::spawn_blocking(move || {
        prepare(&*kv, &outbox, total, &source, &root, resume, now_unix)
    })
    .await??;
    let lookup = Arc::new(CatalogLookup {
        kv: wiring.services.kv.clone(),
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
            data: wiring.services.keys.clone(),
            owner: wiring.services.signer.clone(),
        },
        lookup,
        events_tx,
    )?;

    let ctx: Context<Shell<BackupJobDriver>> = Context::new();
    let addr = ctx.address();
    // Where the positions stand now; from `Start` on, every change (and where they stand at
    // subscribing) arrives in order through the subscription below.
    let positions = super::fire_hire::positions(&wiring.services.fire_hire)
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
        resumed_events.push(resumed_block(&entry));
        blocks.insert(entry.id.0, entry);
    }
    let mut machine = BackupJob {
        ledger: Ledger::new(settings.data_shards, settings.parity_shards),
        revision_floor: record.snapshot.0,
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
        began: None,
        coded: None,
        catalog_pairs: Vec::new(),
        upload_turn: None,
        result_published: false,
    };
    tracing::info!(run, snapshot = record.snapshot.0, source = %driver.spec.source,
        resumed_blocks = resumed_events.len(), "backup started");
    ctx.run(Shell::new(
        machine,
        run.to_string(),
        driver,
        wiring.services.registry.clone(),
    ));
    let _ = addr.send(Deliver(bj::Event::Start { up })).await;
    // Listening only now that the machine started: the snapshot the subscription begins with
    // brings it up to date with what changed since the query above.
    let _ = wiring
        .services
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

/// The job's record (a new one, or the one to resume), the source's previous snapshot and the
/// blocks waiting in the outbox. Blocking.
fn prepare(
    kv: &dyn KvStore,
    outbox: &Path,
    total: u32,
    source: &str,
    root: &Path,
    resume: Option<JobRecord>,
    now_unix: u64,
) -> Result<(JobRecord, Option<SnapshotId>, Vec<BlockEntry>), BackupError> {
    let record = match resume {
        Some(record) => record,
        None => {
            let record = JobRecord {
                snapshot: catalog::allocate_snapshot(kv)?,
                source: source.to_string(),
                root: root.as_os_str().as_encoded_bytes().to_vec(),
                started_at: now_unix,
            };
            let mut batch = Batch::new();
            jobs::put_job(&mut batch, &record);
            kv.write(batch)?;
            record
        }
    };
    let previous = catalog::latest(kv, source)?.map(|s| s.id);
    Ok((record, previous, staged_blocks(kv, outbox, total)))
}

/// A block staged by an earlier run, announced with the positions already acknowledged.
fn resumed_block(entry: &BlockEntry) -> bj::Event {
    let placed = (0u32..)
        .zip(&entry.fragments)
        .filter(|(_, f)| f.supplier.is_some())
        .map(|(p, _)| p)
        .collect();
    bj::Event::BlockReady {
        block: entry.id.0,
        bytes: entry.plain_len,
        placed,
    }
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
pub async fn prune(wiring: &BackupWiring) -> Result<(usize, usize), BackupError> {
    // Not while a catalog upload (a rebuild's refresh) reads the trees it diffs against and
    // saves the catalog blocks retention must keep.
    let _turn = super::catalog_upload::UPLOADING.lock().await;
    let kv = wiring.services.kv.clone();
    let keep = wiring.settings.keep_versions;
    let reading = wiring.services.reading.pinned();
    let plan = tokio::task::spawn_blocking(move || {
        let protect: std::collections::BTreeSet<BlockId> =
            health::current_catalog(&*kv)?.into_iter().collect();
        Ok::<_, BackupError>(catalog::plan_prune(&*kv, keep, &protect, &reading)?)
    })
    .await??;
    if plan.snapshots.is_empty() && plan.blocks.is_empty() {
        return Ok((0, 0));
    }
    let client = NetworkFragments::network(
        wiring.services.network.clone(),
        wiring.settings.request_timeout,
    );
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
    let kv = wiring.services.kv.clone();
    let counts = (plan.snapshots.len(), plan.blocks.len());
    let ids: Vec<BlockId> = plan.blocks.iter().map(|b| b.id).collect();
    let cleanup = tokio::task::spawn_blocking(move || {
        catalog::apply_prune(&*kv, &plan)?;
        let mut batch = Batch::new();
        for id in &ids {
            health::delete_block(&*kv, &mut batch, id)?;
        }
        Ok::<_, BackupError>(batch)
    })
    .await??;
    wiring.services.writer.write(cleanup).await?;
    tracing::info!(
        versions = counts.0,
        blocks = counts.1,
        "retention: old versions removed"
    );
    Ok(counts)
}
