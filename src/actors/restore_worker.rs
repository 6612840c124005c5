//! The restore_worker actor's IO: fetches the fragments the machine asks for from the suppliers
//! that acknowledged them at backup time, checks each against the owner-signed manifest, decodes
//! blocks off the event loop and hands them to the file writer (`pipeline::restore`), which runs
//! on a thread of its own and says when it consumed a block or needs one again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::fire_hire::{FireHireInput, PositionNews};
use super::fragments::{FragmentError, Fragments, NetworkFragments};
use super::services::Services;
use super::shell::{Deliver, Driver, Input, Io, Shell};
use super::status::{RestoreJobStatus, RestoreOutcome, RestoreResult, RestoreStatus, SkippedFile};
use crate::crypto::identity::NodeId;
use crate::data::{self, BlockId, BlockManifest, DataError};
use crate::fsm::monitor::AuditResult;
use crate::fsm::restore_worker::{self as rw, Outcome, Progress, RestoreWorker};
use crate::pipeline::restore::{
    self, BlockError, RestoreCounters, RestoreError, RestorePlan, RestoreReport, RestoreTarget,
};
use crate::store::StoreError;
use crate::store::catalog::{self, SnapshotId};

/// Blocks fetched at once (each holds `k` fragments while it is assembled).
const WINDOW: usize = 6;
/// Decoded blocks the writer keeps while they still have uses.
const CACHE_BLOCKS: usize = 8;
const RESULTS_KEPT: usize = 16;

/// A fragment request outstanding this long is hedged by the machine (one more position beside
/// it): a quarter of the request timeout, at least a second.
pub fn hedge_bound(request_timeout: Duration) -> Duration {
    (request_timeout / 4).max(Duration::from_secs(1))
}

/// What to restore.
#[derive(Clone, Debug)]
pub struct RestoreSpec {
    pub snapshot: SnapshotId,
    pub source: String,
    pub to: PathBuf,
    pub sub_path: Option<Vec<u8>>,
    pub overwrite: bool,
}

/// The node's pieces every restore uses.
#[derive(Clone)]
pub struct RestoreWiring {
    pub services: Services,
    pub request_timeout: Duration,
    pub status: Arc<Mutex<RestoreStatus>>,
    /// Told which supplier failed a fetch (the monitor counts it like an audit); `None` when
    /// the monitor did not start.
    pub monitor: Option<actix::Recipient<Input<super::monitor::MonitorInput>>>,
}

/// A decoded block, or why it cannot be had.
type BlockResult = Result<Arc<Vec<u8>>, BlockError>;

/// Between the actor and the writer thread: decoded blocks waiting to be taken.
#[derive(Default)]
struct Handoff {
    ready: Mutex<HashMap<[u8; 32], BlockResult>>,
    arrived: Condvar,
    cancelled: AtomicBool,
}

impl Handoff {
    fn put(&self, block: [u8; 32], value: BlockResult) {
        if let Ok(mut ready) = self.ready.lock() {
            ready.insert(block, value);
        }
        self.arrived.notify_all();
    }
}

pub enum RestoreInput {
    /// From the writer thread.
    Consumed([u8; 32]),
    Want([u8; 32]),
    WriterDone(Result<RestoreReport, RestoreError>),
    /// From fire_hire: a position's supplier came up or went down.
    Position(PositionNews),
}

/// One block's manifest and who holds each position.
struct BlockSource {
    manifest: BlockManifest,
    holders: Vec<Option<NodeId>>,
    fragments: Vec<Option<Vec<u8>>>,
}

pub struct RestoreWorkerDriver {
    run: u64,
    spec: RestoreSpec,
    wiring: RestoreWiring,
    blocks: HashMap<[u8; 32], BlockSource>,
    handoff: Arc<Handoff>,
    counters: Arc<RestoreCounters>,
    fetched: Arc<AtomicU64>,
    files_total: u64,
    bytes_total: u64,
    progress: Progress,
    report: Option<RestoreReport>,
    began: Option<Duration>,
    done: Option<oneshot::Sender<()>>,
    /// Fragments that arrived and did not match the owner's manifest, by supplier.
    corrupt_by: BTreeMap<NodeId, u64>,
}

impl RestoreWorkerDriver {
    fn fetch(&mut self, block: [u8; 32], position: u32, io: &mut Io<'_, Self>) {
        let failed = rw::Event::FragmentFailed {
            block,
            position,
            corrupt: false,
        };
        let Some(source) = self.blocks.get(&block) else {
            io.send(failed);
            return;
        };
        let Some(Some(supplier)) = source.holders.get(position as usize).copied() else {
            io.send(failed);
            return;
        };
        let client = NetworkFragments::network(
            self.wiring.services.network.clone(),
            self.wiring.request_timeout,
        );
        let fetched = self.fetched.clone();
        let ask = async move {
            let data = client.retrieve(supplier, block, position).await?;
            fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(data)
        };
        io.spawn_then(ask, move |driver, result| {
            driver.received(block, position, supplier, result)
        });
    }

    /// A fetch that failed at its supplier (not for want of a session): the monitor hears it as
    /// a typed message, like an audit's result.
    fn tell_monitor(&self, block: [u8; 32], position: u32, supplier: NodeId, result: AuditResult) {
        let monitor = self.wiring.monitor.as_ref();
        super::monitor::tell_fetch_failure(monitor, block, position, supplier, result);
    }

    /// The suppliers at the positions the restore found slow (each block names its holders).
    fn slow_suppliers(&self) -> Vec<String> {
        let mut slow: BTreeSet<NodeId> = BTreeSet::new();
        for source in self.blocks.values() {
            for p in &self.progress.slow {
                if let Some(Some(s)) = source.holders.get(*p as usize) {
                    slow.insert(*s);
                }
            }
        }
        slow.iter().map(|s| s.to_string()).collect()
    }

    /// A fragment's bytes: checked against the owner's manifest before they count.
    fn received(
        &mut self,
        block: [u8; 32],
        position: u32,
        supplier: NodeId,
        result: Result<Vec<u8>, FragmentError>,
    ) -> rw::Event {
        let failed = |corrupt| rw::Event::FragmentFailed {
            block,
            position,
            corrupt,
        };
        let stored = match result {
            Ok(stored) => stored,
            Err(why) => {
                tracing::debug!(position, supplier = %supplier, error = %why, "fragment not fetched");
                if let Some(result) = super::monitor::fetch_failure(&why) {
                    self.tell_monitor(block, position, supplier, result);
                }
                return failed(false);
            }
        };
        let Some(source) = self.blocks.get_mut(&block) else {
            return failed(false);
        };
        let fragment = match data::stored::unwrap(&stored) {
            Ok((_, fragment)) => fragment,
            Err(_) => {
                tracing::warn!(position, supplier = %supplier, "a supplier sent a malformed fragment");
                *self.corrupt_by.entry(supplier).or_default() += 1;
                self.tell_monitor(block, position, supplier, AuditResult::Corrupt);
                return failed(true);
            }
        };
        if source
            .manifest
            .check_fragment(position as usize, fragment)
            .is_err()
        {
            tracing::warn!(position, supplier = %supplier,
                "a supplier sent a fragment that does not match the owner's manifest");
            *self.corrupt_by.entry(supplier).or_default() += 1;
            self.tell_monitor(block, position, supplier, AuditResult::Corrupt);
            return failed(true);
        }
        if let Some(slot) = source.fragments.get_mut(position as usize) {
            *slot = Some(fragment.to_vec());
        }
        rw::Event::FragmentOk { block, position }
    }

    fn decode(&mut self, block: [u8; 32], io: &mut Io<'_, Self>) {
        let Some(source) = self.blocks.get_mut(&block) else {
            return;
        };
        // The fragments leave the driver: a block is decoded once, then only the writer has it.
        let fragments = std::mem::replace(&mut source.fragments, vec![None; source.holders.len()]);
        let manifest = source.manifest.clone();
        let keys = self.wiring.services.keys.clone();
        let handoff = self.handoff.clone();
        io.spawn_blocking(move || {
            let refs: Vec<Option<&[u8]>> = fragments.iter().map(|f| f.as_deref()).collect();
            match data::decode_block(&refs, &manifest, &keys.block) {
                Ok(decoded) => {
                    handoff.put(block, Ok(Arc::new(decoded.plain)));
                    rw::Event::Decoded { block }
                }
                Err(e) => {
                    tracing::error!(error = %e, "a block did not decode from fragments matching its manifest");
                    handoff.put(block, Err(BlockError::Undecodable(e.to_string())));
                    rw::Event::DecodeFailed { block }
                }
            }
        });
    }

    fn publish(&self, elapsed: f64) {
        let p = self.counters.snapshot();
        let state = self
            .wiring
            .services
            .registry
            .state_of(
                <RestoreWorker as crate::fsm::Machine>::NAME,
                &self.run.to_string(),
            )
            .unwrap_or("Fetching");
        let status = RestoreJobStatus {
            run: self.run,
            snapshot: self.spec.snapshot.0,
            source: self.spec.source.clone(),
            to: self.spec.to.display().to_string(),
            state: state.to_string(),
            blocks: self.progress.blocks,
            blocks_decoded: self.progress.decoded,
            blocks_lost: self.progress.lost,
            files_done: p.files_done,
            files_total: self.files_total,
            bytes_written: p.bytes_written,
            bytes_total: self.bytes_total,
            fetched_bytes: self.fetched.load(Ordering::Relaxed),
            elapsed_secs: elapsed,
        };
        if let Ok(mut s) = self.wiring.status.lock() {
            s.running = Some(status);
        }
    }

    fn finish(&mut self, outcome: Outcome, elapsed: f64) {
        self.handoff.cancelled.store(true, Ordering::Relaxed);
        self.handoff.arrived.notify_all();
        let (name, error) = match &outcome {
            Outcome::Complete => (RestoreOutcome::Complete, None),
            Outcome::Partial => (RestoreOutcome::Partial, None),
            Outcome::Failed(why) => (RestoreOutcome::Failed, Some(why.clone())),
            Outcome::Interrupted => (RestoreOutcome::Interrupted, None),
        };
        let report = self.report.take().unwrap_or_default();
        let result = RestoreResult {
            run: self.run,
            snapshot: self.spec.snapshot.0,
            source: self.spec.source.clone(),
            to: self.spec.to.display().to_string(),
            outcome: name,
            error,
            files: report.files,
            dirs: report.dirs,
            symlinks: report.symlinks,
            bytes: report.bytes,
            skipped_existing: report.skipped_existing,
            failed: report
                .failed
                .iter()
                .map(|(path, reason)| SkippedFile {
                    path: String::from_utf8_lossy(path).into_owned(),
                    reason: reason.clone(),
                    ..SkippedFile::default()
                })
                .collect(),
            seconds: elapsed,
            fetched_bytes: self.fetched.load(Ordering::Relaxed),
            extra_fragments: self.progress.extra_fragments,
            corrupt_fragments: self
                .corrupt_by
                .iter()
                .map(|(supplier, n)| (supplier.to_string(), *n))
                .collect(),
            slow_suppliers: self.slow_suppliers(),
            hardlinks: report.hardlinks,
            specials: report.specials,
            not_restored: report
                .not_restored
                .iter()
                .map(|n| format!("{} of {} entries: {}", n.what, n.count, n.why))
                .collect(),
        };
        tracing::info!(
            run = self.run,
            snapshot = self.spec.snapshot.0,
            outcome = name.as_str(),
            files = result.files,
            bytes = result.bytes,
            failed = result.failed.len(),
            fetched = result.fetched_bytes,
            "restore finished"
        );
        if let Ok(mut s) = self.wiring.status.lock() {
            if s.running.as_ref().is_some_and(|r| r.run == self.run) {
                s.running = None;
            }
            s.finished.push(result);
            let excess = s.finished.len().saturating_sub(RESULTS_KEPT);
            s.finished.drain(..excess);
        }
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

impl Driver for RestoreWorkerDriver {
    type M = RestoreWorker;
    type Input = RestoreInput;
    type Query = std::convert::Infallible;
    type Answer = ();

    fn perform(&mut self, output: rw::Output, machine: &RestoreWorker, io: &mut Io<'_, Self>) {
        let began = *self.began.get_or_insert(io.ctx().now);
        let elapsed = io.ctx().now.saturating_sub(began).as_secs_f64();
        match output {
            rw::Output::Fetch { block, position } => self.fetch(block, position, io),
            rw::Output::Decode { block } => self.decode(block, io),
            rw::Output::GiveUp { block } => {
                self.handoff.put(block, Err(BlockError::TooFewFragments));
            }
            rw::Output::Progress(progress) => {
                self.progress = progress;
                self.publish(elapsed);
            }
            rw::Output::Cancel => {
                self.handoff.cancelled.store(true, Ordering::Relaxed);
                self.handoff.arrived.notify_all();
            }
            rw::Output::Finished(outcome) => {
                self.progress = machine.fetches.progress.clone();
                self.finish(outcome, elapsed);
            }
        }
    }

    fn input(
        &mut self,
        input: RestoreInput,
        _machine: &RestoreWorker,
        _io: &mut Io<'_, Self>,
    ) -> Vec<rw::Event> {
        match input {
            RestoreInput::Consumed(block) => vec![rw::Event::Consumed { block }],
            RestoreInput::Want(block) => vec![rw::Event::Want { block }],
            RestoreInput::WriterDone(Ok(report)) => {
                let failed = report.failed.len() as u64;
                self.report = Some(report);
                vec![rw::Event::WriterDone { failed }]
            }
            RestoreInput::WriterDone(Err(e)) => vec![rw::Event::Fatal(e.to_string())],
            RestoreInput::Position(news) if news.up => vec![rw::Event::SupplierUp(news.position)],
            RestoreInput::Position(news) => vec![rw::Event::SupplierDown(news.position)],
        }
    }

    fn query(&mut self, query: Self::Query, _: &RestoreWorker, _: &mut Io<'_, Self>) {
        match query {}
    }
}

/// Runs the writer: takes blocks from the handoff as files need them.
fn run_writer(
    plan: RestorePlan,
    target: RestoreTarget,
    handoff: Arc<Handoff>,
    counters: Arc<RestoreCounters>,
    news: mpsc::UnboundedSender<RestoreInput>,
) {
    let mut get_block = |id: BlockId| -> BlockResult {
        let mut asked = false;
        let Ok(mut ready) = handoff.ready.lock() else {
            return Err(BlockError::Stopped);
        };
        loop {
            if let Some(value) = ready.remove(&id.0) {
                let _ = news.send(RestoreInput::Consumed(id.0));
                return value;
            }
            if handoff.cancelled.load(Ordering::Relaxed) {
                return Err(BlockError::Stopped);
            }
            if !asked {
                let _ = news.send(RestoreInput::Want(id.0));
                asked = true;
            }
            ready = match handoff
                .arrived
                .wait_timeout(ready, Duration::from_millis(500))
            {
                Ok((guard, _)) => guard,
                Err(_) => return Err(BlockError::Stopped),
            };
        }
    };
    let result = restore::restore_files(&plan, &target, &mut get_block, CACHE_BLOCKS, &counters);
    let _ = news.send(RestoreInput::WriterDone(result));
}

/// Why a restore could not start.
#[derive(Debug, thiserror::Error)]
pub enum RestoreStartError {
    #[error(transparent)]
    Plan(#[from] RestoreError),
    #[error("reading the catalog: {0}")]
    Catalog(#[from] StoreError),
    #[error("block {block}: {source}")]
    Manifest {
        block: BlockId,
        #[source]
        source: DataError,
    },
    #[error("the restore's preparation did not finish: {0}")]
    Preparation(#[from] tokio::task::JoinError),
    #[error("cannot start the restore writer: {0}")]
    Writer(#[source] std::io::Error),
}

/// Starts one restore; `done` resolves when it finished.
pub async fn start(
    wiring: RestoreWiring,
    run: u64,
    spec: RestoreSpec,
) -> Result<(Addr<Shell<RestoreWorkerDriver>>, oneshot::Receiver<()>), RestoreStartError> {
    let kv = wiring.services.kv.clone();
    let owner = wiring.services.owner();
    let snapshot = spec.snapshot;
    let sub = spec.sub_path.clone();
    let target = RestoreTarget::new(spec.to.clone(), spec.overwrite);
    let resume_target = target.clone();
    // The tree is read from the catalog as the restore goes: retention keeps this version until
    // the writer is done with it.
    let pin = wiring.services.reading.pin(snapshot);
    // The plan and every block's manifest: read and verified off the event loop. A restore run
    // again after an interruption leaves out the blocks of files already complete.
    let prepared = tokio::task::spawn_blocking(move || {
        let mut plan = restore::plan(kv.clone(), snapshot, sub.as_deref())?;
        plan.skip_complete(&resume_target)?;
        let mut sources = HashMap::new();
        let mut layout = Vec::new();
        for id in &plan.blocks {
            let Some(entry) = catalog::block(&*kv, id)? else {
                continue;
            };
            let manifest = BlockManifest::verify(&entry.signed_manifest, &owner)
                .map_err(|source| RestoreStartError::Manifest { block: *id, source })?;
            let total = entry.fragments.len();
            layout.push((id.0, entry.data_shards, total as u32));
            sources.insert(
                id.0,
                BlockSource {
                    manifest,
                    holders: entry.fragments.iter().map(|f| f.supplier).collect(),
                    fragments: vec![None; total],
                },
            );
        }
        Ok::<_, RestoreStartError>((plan, sources, layout))
    })
    .await??;
    let (plan, sources, layout) = prepared;
    // Positions whose suppliers are not up now are asked last; the subscription below says
    // when they come back (or others go), in order.
    let positions = layout.iter().map(|(_, _, total)| *total).max().unwrap_or(0);
    let down = super::fire_hire::positions(&wiring.services.fire_hire)
        .await
        .unwrap_or_default()
        .down(positions);

    let handoff = Arc::new(Handoff::default());
    let counters = Arc::new(RestoreCounters::default());
    let (news_tx, mut news_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = oneshot::channel();
    let driver = RestoreWorkerDriver {
        run,
        spec: spec.clone(),
        wiring: wiring.clone(),
        blocks: sources,
        handoff: handoff.clone(),
        counters: counters.clone(),
        fetched: Arc::new(AtomicU64::new(0)),
        files_total: plan.entries_total(),
        bytes_total: plan.bytes(),
        progress: Progress::default(),
        report: None,
        began: None,
        done: Some(done_tx),
        corrupt_by: BTreeMap::new(),
    };
    tracing::info!(run, snapshot = spec.snapshot.0, source = %spec.source,
        to = %spec.to.display(), blocks = layout.len(), files = plan.entries_total(), "restore started");
    let addr = Shell::new(
        RestoreWorker::with_window(WINDOW).hedging_after(hedge_bound(wiring.request_timeout)),
        run.to_string(),
        driver,
        wiring.services.registry.clone(),
    )
    .start();
    let _ = addr
        .send(Deliver(rw::Event::Start {
            blocks: layout,
            down,
        }))
        .await;
    let _ = wiring
        .services
        .fire_hire
        .send(Input(FireHireInput::Subscribe(addr.clone().recipient())))
        .await;
    let forward = addr.clone();
    actix::spawn(async move {
        while let Some(news) = news_rx.recv().await {
            if forward.send(Input(news)).await.is_err() {
                break;
            }
        }
    });
    std::thread::Builder::new()
        .name("restore-writer".into())
        .spawn(move || {
            run_writer(plan, target, handoff, counters, news_tx);
            drop(pin);
        })
        .map_err(RestoreStartError::Writer)?;
    Ok((addr, done_rx))
}

impl Handler<PositionNews> for Shell<RestoreWorkerDriver> {
    type Result = ();

    fn handle(&mut self, news: PositionNews, ctx: &mut Context<Self>) {
        <Self as Handler<Input<RestoreInput>>>::handle(
            self,
            Input(RestoreInput::Position(news)),
            ctx,
        );
    }
}
