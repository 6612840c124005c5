//! backup_job: one backup of one source, from the first block the pipeline produces to the
//! committed catalog. The table is the job's lifecycle; which fragment goes where, what waits in
//! an outbox while its supplier is away, when a block is complete and when the pipeline may
//! produce the next block are decided by the pure [`Ledger`] beside it; how the catalog is stored
//! by the pure [`CatalogCommit`].
//!
//! Flow: the driver runs the data pipeline (`src/data`) on a worker pool and asks it for one
//! block per `Produce`; each block's `k + m` fragments are staged on disk and its record written
//! (`BlockStaged`, then `BlockReady` once the record is durable), and the machine says where each
//! fragment goes (`Place`) or keeps it in the position's outbox while that supplier is down. A
//! block every position acknowledged is `BlockComplete`. The job commits once the input is done,
//! every block record is durable and every block has at least `k` fragments placed, the rest
//! placed or waiting in an outbox (reduced redundancy, shown in status); with fewer than `k`
//! suppliers up it waits instead of failing.
//!
//! Committing: the snapshot is committed locally and the catalog exported, sealed and coded
//! (`ExportCatalog`); each catalog fragment goes once to its supplier (`PlaceCatalog`); with every
//! catalog block on at least `k` suppliers (a guard) the recovery record goes to every supplier
//! (`SendRecord`), and once one took it the catalog's entries are saved (`SaveCatalog`). The
//! catalog fragments that missed their supplier join the ledger and drain like data fragments.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

pub use super::catalog_commit::{CatalogCommit, Misses, Placement};
use super::machine::{
    ChoiceRow, Ctx, Kinded, Label, Machine, Out, Row, TimerRow, To, Violation, row,
};
use crate::{events, labels};

/// A block's id (random, chosen by the pipeline; see `data::BlockId`).
pub type BlockId = [u8; 32];

labels! {
    pub enum State {
        AtStartup, Running, WaitingForSuppliers, Committing, UploadingCatalog, StoringRecord,
        Draining, Committed, Interrupted, Failed,
    }
}

events! {
    pub enum Event / EventKind {
        /// Begin, with the positions whose suppliers are up now.
        Start { up: Vec<u32> },
        /// The pipeline staged a block's fragments; its record is being written.
        BlockStaged { block: BlockId },
        /// A block's record is durable: its fragments may leave. `placed`: positions already
        /// acknowledged (a block resumed after a restart).
        BlockReady { block: BlockId, bytes: u64, placed: Vec<u32> },
        /// The pipeline has no more blocks.
        InputDone,
        /// A supplier acknowledged a fragment.
        Placed { block: BlockId, position: u32 },
        /// A fragment could not be placed (it goes back to the position's outbox).
        PlaceFailed { block: BlockId, position: u32 },
        SupplierUp(u32),
        SupplierDown(u32),
        /// The snapshot is committed locally; the catalog is sealed and coded into `blocks`.
        /// `last_revision`: the highest recovery record revision this node stored before.
        CatalogEncoded { blocks: Vec<BlockId>, last_revision: u64 },
        /// A supplier's answer to one catalog fragment.
        CatalogStored { block: BlockId, position: u32, stored: bool },
        /// The recovery record went to the suppliers; `copies` took it.
        RecordSent { copies: usize },
        /// The catalog's entries are durable.
        CatalogSaved,
        /// Something the job cannot go on without (the pipeline or the disk) failed.
        Fatal(String),
        Timeout(Timer),
        Shutdown,
    }
}

labels! {
    /// `CanReachK`: at least `k` suppliers are up to take the catalog. `CatalogPending`: answers
    /// for catalog fragments are still out after this one. `CatalogHasK`: with this answer, every
    /// catalog block has at least `k` fragments stored. `RecordKept`: a supplier took the
    /// recovery record.
    pub enum Guard { CanReachK, CatalogPending, CatalogHasK, RecordKept }
}

labels! {
    pub enum Action {
        /// Record what the event says in the ledger; place or queue fragments.
        Note,
        /// Ask the pipeline for blocks while the bounds allow.
        Produce,
        /// Commit the snapshot locally, then export, seal and code the catalog (IO).
        ExportCatalog,
        /// Send each catalog fragment to its position's supplier, if it is up.
        PlaceCatalog,
        /// Stage the catalog fragments that missed, send the recovery record to every supplier.
        SendRecord,
        /// Save the catalog's entries and the record's revision.
        SaveCatalog,
        /// Stop the pipeline and drop what is staged (IO).
        Cancel,
        /// Report how the job ended (IO).
        Finish,
        /// Report that the snapshot is committed while fragments still wait for their suppliers.
        Commit,
        /// Report the figures for `status`.
        Report,
    }
}

labels! {
    /// `Retry`: a position whose placement failed is held back until then.
    pub enum Timer { Progress, Retry }
}

labels! {
    pub enum Choice { Placing, Drained }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Failed(String),
    /// The node stopped; the job resumes from what was persisted.
    Interrupted,
}

/// What the backup job's driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Produce the next block (the pipeline answers `BlockReady` or `InputDone`).
    Produce,
    /// Send the staged fragment `position` of `block` to that position's supplier.
    Place {
        block: BlockId,
        position: u32,
    },
    /// Every position of `block` acknowledged: record it, then remove its staged files.
    BlockComplete {
        block: BlockId,
    },
    /// Commit the snapshot locally, then export, seal and code the catalog; answer
    /// `CatalogEncoded`.
    ExportCatalog,
    /// Send catalog fragment `position` of `block` to that position's supplier; answer
    /// `CatalogStored`.
    PlaceCatalog {
        block: BlockId,
        position: u32,
    },
    /// Stage each placement's `staged` fragments, then send the recovery record (revision
    /// `revision`, naming the holders) to the suppliers at `to`; answer `RecordSent`.
    SendRecord {
        revision: u64,
        placements: Vec<Placement>,
        to: Vec<u32>,
    },
    /// Save the catalog blocks' entries, the revision and the current catalog; answer
    /// `CatalogSaved`.
    SaveCatalog {
        revision: u64,
        placements: Vec<Placement>,
    },
    /// The snapshot is committed; fragments still wait in outboxes (`Finished` follows once they
    /// are placed, or when the job is stopped and leaves them to the next job).
    Committed(Progress),
    Cancel,
    /// Progress for `status` (on the periodic timer and on each change of state).
    Progress(Progress),
    Finished(Outcome),
}

/// The job's figures for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub blocks: u64,
    pub bytes: u64,
    /// Blocks with every fragment placed.
    pub complete: u64,
    /// Fragments waiting for their supplier.
    pub queued: u64,
    /// The least redundancy of any block so far: fragments placed minus `k` (negative: below).
    pub worst_redundancy: i64,
}

/// Where each fragment of each unfinished block is, and what waits for which supplier.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub data_shards: u32,
    pub parity_shards: u32,
    /// Blocks the pipeline may have produced and not fully placed at once (memory and disk
    /// staging stay bounded whatever the size of the backup).
    pub max_unplaced: usize,
    /// Fragments one position's outbox may hold before the pipeline is held back.
    pub outbox_limit: usize,
    /// Fragments sent to one supplier and not yet acknowledged, at most.
    pub window: usize,
    up: BTreeSet<u32>,
    /// Unfinished blocks: the positions placed so far. A block leaves once every position is
    /// placed, so the ledger's size is bounded by the blocks in flight, not the backup's size.
    placed: BTreeMap<BlockId, BTreeSet<u32>>,
    /// Per position: fragments waiting for the supplier, oldest first.
    outbox: BTreeMap<u32, VecDeque<BlockId>>,
    /// Per position: fragments sent and not yet answered.
    sending: BTreeMap<u32, BTreeSet<BlockId>>,
    /// Positions whose last placement failed: nothing is sent to them until the retry timer
    /// (or news that the supplier is back), so a refusing supplier is not asked in a loop.
    held: BTreeSet<u32>,
    /// Blocks the pipeline was asked for and has not delivered.
    producing: usize,
    /// Blocks staged whose record is not durable yet: the job commits only once it is.
    recording: BTreeSet<BlockId>,
    /// Blocks every position acknowledged since the machine last asked ([`Ledger::take_complete`]).
    complete: Vec<BlockId>,
    pub input_done: bool,
    pub progress: Progress,
}

impl Ledger {
    pub fn new(data_shards: u32, parity_shards: u32) -> Self {
        Ledger {
            data_shards,
            parity_shards,
            max_unplaced: 8,
            outbox_limit: 256,
            window: 4,
            up: BTreeSet::new(),
            placed: BTreeMap::new(),
            outbox: BTreeMap::new(),
            sending: BTreeMap::new(),
            held: BTreeSet::new(),
            producing: 0,
            recording: BTreeSet::new(),
            complete: Vec::new(),
            input_done: false,
            progress: Progress::default(),
        }
    }

    fn positions(&self) -> u32 {
        self.data_shards + self.parity_shards
    }

    pub fn suppliers_up(&self) -> usize {
        self.up.len()
    }

    /// The positions whose suppliers are up.
    pub fn up(&self) -> &BTreeSet<u32> {
        &self.up
    }

    /// Blocks not yet placed in full (sent or queued fragments remain).
    fn unplaced(&self) -> usize {
        self.placed
            .values()
            .filter(|p| p.len() < self.positions() as usize)
            .count()
    }

    /// Whether the pipeline may be asked for one more block now.
    pub fn may_produce(&self) -> bool {
        !self.input_done
            && self.up.len() >= self.data_shards as usize
            && self.unplaced() + self.producing + self.recording.len() < self.max_unplaced
            && self.outbox.values().all(|q| q.len() < self.outbox_limit)
    }

    /// Nothing waits in an outbox and nothing is out for an answer.
    pub fn drained(&self) -> bool {
        self.outbox.values().all(VecDeque::is_empty)
            && self.sending.values().all(BTreeSet::is_empty)
    }

    /// Every block known to the ledger has at least `k` fragments placed.
    pub fn every_block_has_k(&self) -> bool {
        self.placed
            .values()
            .all(|p| p.len() >= self.data_shards as usize)
    }

    /// Every block's record is durable, every block has at least `k` fragments placed, and no
    /// fragment is out for an answer.
    pub fn safe_to_commit(&self) -> bool {
        self.input_done
            && self.producing == 0
            && self.recording.is_empty()
            && self.sending.values().all(BTreeSet::is_empty)
            && self
                .placed
                .values()
                .all(|p| p.len() >= self.data_shards as usize)
    }

    /// Sends what the window allows from `position`'s outbox.
    fn drain(&mut self, position: u32, out: &mut Vec<(BlockId, u32)>) {
        if !self.up.contains(&position) || self.held.contains(&position) {
            return;
        }
        let sending = self.sending.entry(position).or_default();
        let queue = self.outbox.entry(position).or_default();
        while sending.len() < self.window {
            let Some(block) = queue.pop_front() else {
                break;
            };
            sending.insert(block);
            out.push((block, position));
        }
    }

    /// The pipeline delivered a block; its record is being written.
    pub fn block_staged(&mut self, block: BlockId) {
        if !self.placed.contains_key(&block) && self.recording.insert(block) {
            self.producing = self.producing.saturating_sub(1);
        }
    }

    /// A new block: every fragment goes to its position's outbox, then out as windows allow.
    pub fn block_ready(
        &mut self,
        block: BlockId,
        bytes: u64,
        already: &[u32],
    ) -> Vec<(BlockId, u32)> {
        // A staged block was counted off when it was staged; a resumed one was not asked for.
        if !self.recording.remove(&block) && already.is_empty() {
            self.producing = self.producing.saturating_sub(1);
        }
        // A block announced twice (a driver retrying) is placed once.
        if self.placed.contains_key(&block) {
            return Vec::new();
        }
        let placed: BTreeSet<u32> = already
            .iter()
            .copied()
            .filter(|p| *p < self.positions())
            .collect();
        self.progress.blocks += 1;
        self.progress.bytes += bytes;
        if placed.len() == self.positions() as usize {
            self.progress.complete += 1;
            self.complete.push(block);
            return Vec::new();
        }
        let mut sends = Vec::new();
        for position in 0..self.positions() {
            if !placed.contains(&position) {
                self.outbox.entry(position).or_default().push_back(block);
                self.drain(position, &mut sends);
            }
        }
        self.placed.insert(block, placed);
        sends
    }

    pub fn placed(&mut self, block: BlockId, position: u32) -> Vec<(BlockId, u32)> {
        let was_sent = self
            .sending
            .get_mut(&position)
            .is_some_and(|s| s.remove(&block));
        if was_sent && let Some(p) = self.placed.get_mut(&block) {
            p.insert(position);
            if p.len() == self.positions() as usize {
                self.progress.complete += 1;
                self.placed.remove(&block);
                self.complete.push(block);
            }
        }
        let mut sends = Vec::new();
        self.drain(position, &mut sends);
        sends
    }

    /// The fragment goes back to the front of its outbox and the position is held until
    /// [`Ledger::release`]. Returns whether anything was held (the caller sets the retry timer).
    pub fn place_failed(&mut self, block: BlockId, position: u32) -> bool {
        if self
            .sending
            .get_mut(&position)
            .is_some_and(|s| s.remove(&block))
        {
            self.outbox.entry(position).or_default().push_front(block);
            self.held.insert(position);
            return true;
        }
        false
    }

    /// Every held position may be sent to again.
    pub fn release(&mut self) -> Vec<(BlockId, u32)> {
        let held = std::mem::take(&mut self.held);
        let mut sends = Vec::new();
        for position in held {
            self.drain(position, &mut sends);
        }
        sends
    }

    pub fn supplier_up(&mut self, position: u32) -> Vec<(BlockId, u32)> {
        self.up.insert(position);
        self.held.remove(&position);
        let mut sends = Vec::new();
        self.drain(position, &mut sends);
        sends
    }

    /// A supplier went away: what it was sending goes back to its outbox, oldest first.
    pub fn supplier_down(&mut self, position: u32) {
        self.up.remove(&position);
        let back: Vec<BlockId> = self
            .sending
            .remove(&position)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        let queue = self.outbox.entry(position).or_default();
        for block in back.into_iter().rev() {
            queue.push_front(block);
        }
    }

    /// The blocks that became complete since the last call.
    pub fn take_complete(&mut self) -> Vec<BlockId> {
        std::mem::take(&mut self.complete)
    }

    /// Whether `block` waits for its record.
    pub fn recording(&self, block: &BlockId) -> bool {
        self.recording.contains(block)
    }

    pub fn asked_to_produce(&mut self) {
        self.producing += 1;
    }

    pub fn input_done(&mut self) {
        self.producing = 0;
        self.input_done = true;
    }

    /// The figures for `status`, brought up to date.
    pub fn progress(&mut self) -> Progress {
        let k = i64::from(self.data_shards);
        self.progress.queued = self.outbox.values().map(|q| q.len() as u64).sum();
        self.progress.worst_redundancy = self
            .placed
            .values()
            .map(|p| p.len() as i64 - k)
            .min()
            .unwrap_or(i64::from(self.parity_shards));
        self.progress.clone()
    }

    /// Every fragment of every block is accounted for exactly once: placed, sent or queued.
    pub fn check(&self) -> Result<(), Violation> {
        if let Some(block) = self.recording.iter().find(|b| self.placed.contains_key(*b)) {
            return Err(format!(
                "block {:02x?} is placed before its record is durable",
                &block[..4]
            )
            .into());
        }
        for (block, placed) in &self.placed {
            for position in 0..self.positions() {
                let sent = self
                    .sending
                    .get(&position)
                    .is_some_and(|s| s.contains(block));
                let queued = self
                    .outbox
                    .get(&position)
                    .map_or(0, |q| q.iter().filter(|b| *b == block).count());
                let count = usize::from(placed.contains(&position)) + usize::from(sent) + queued;
                if count != 1 {
                    return Err(format!(
                        "fragment {position} of a block is accounted for {count} times"
                    )
                    .into());
                }
            }
        }
        for (position, sending) in &self.sending {
            if sending.len() > self.window {
                return Err(
                    format!("{} fragments out to position {position}", sending.len()).into(),
                );
            }
            if !sending.is_empty() && !self.up.contains(position) {
                return Err(format!("fragments out to position {position}, which is down").into());
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct BackupJob {
    pub ledger: Ledger,
    pub progress_every: Duration,
    /// How long a position whose placement failed is held back.
    pub retry_after: Duration,
    /// The lowest revision the job's recovery record may carry (its snapshot id).
    pub revision_floor: u64,
    /// The catalog upload, from the moment the catalog is coded.
    pub catalog: Option<CatalogCommit>,
    /// The catalog was saved: however the job ends now, the snapshot is committed.
    pub committed: bool,
}

impl Default for BackupJob {
    fn default() -> Self {
        BackupJob {
            ledger: Ledger::new(4, 2),
            progress_every: Duration::from_secs(1),
            retry_after: Duration::from_secs(2),
            revision_floor: 0,
            catalog: None,
            committed: false,
        }
    }
}

impl BackupJob {
    fn produce(&mut self, out: &mut Out<Self>) {
        while self.ledger.may_produce() {
            self.ledger.asked_to_produce();
            out.push(Output::Produce);
        }
    }

    fn place(out: &mut Out<Self>, sends: Vec<(BlockId, u32)>) {
        for (block, position) in sends {
            out.push(Output::Place { block, position });
        }
    }

    /// What the ledger says about the event (and which fragments go out now).
    fn note(&mut self, event: &Event, ctx: &Ctx, out: &mut Out<Self>) -> Vec<(BlockId, u32)> {
        match event {
            Event::Start { up } => {
                let mut sends = Vec::new();
                for position in up {
                    sends.extend(self.ledger.supplier_up(*position));
                }
                sends
            }
            Event::BlockStaged { block } => {
                self.ledger.block_staged(*block);
                Vec::new()
            }
            Event::BlockReady {
                block,
                bytes,
                placed,
            } => self.ledger.block_ready(*block, *bytes, placed),
            Event::InputDone => {
                self.ledger.input_done();
                Vec::new()
            }
            Event::Placed { block, position } => self.ledger.placed(*block, *position),
            Event::PlaceFailed { block, position } => {
                if self.ledger.place_failed(*block, *position) {
                    out.set_timer(Timer::Retry, ctx.now + self.retry_after);
                }
                Vec::new()
            }
            Event::Timeout(Timer::Retry) => self.ledger.release(),
            Event::SupplierUp(position) => self.ledger.supplier_up(*position),
            Event::SupplierDown(position) => {
                self.ledger.supplier_down(*position);
                Vec::new()
            }
            Event::CatalogStored {
                block,
                position,
                stored,
            } => {
                if let Some(catalog) = &mut self.catalog {
                    catalog.answered(*block, *position, *stored);
                }
                Vec::new()
            }
            // The catalog's entries are durable: its fragments that missed their supplier join
            // the ledger (staged, recorded) and go out like data fragments.
            Event::CatalogSaved => {
                self.committed = true;
                let mut sends = Vec::new();
                let placements = self
                    .catalog
                    .as_ref()
                    .map(CatalogCommit::placements)
                    .unwrap_or_default();
                for p in placements.into_iter().filter(|p| !p.staged.is_empty()) {
                    sends.extend(self.ledger.block_ready(p.block, 0, &p.holders));
                }
                sends
            }
            _ => Vec::new(),
        }
    }

    /// The catalog upload as it would be after `event` (guards judge an event before it is
    /// applied).
    fn catalog_after(&self, event: &Event) -> Option<CatalogCommit> {
        let catalog = self.catalog.as_ref()?;
        Some(match event {
            Event::CatalogStored {
                block,
                position,
                stored,
            } => catalog.with(*block, *position, *stored),
            _ => catalog.clone(),
        })
    }

    /// Why a job that ends in `Failed` failed.
    fn failure(&self, event: &Event) -> String {
        let k = self.ledger.data_shards;
        let below_k = |placed: usize| {
            format!(
                "the snapshot is committed here, but its catalog reached only {placed} of the {k} suppliers it needs"
            )
        };
        match event {
            Event::Fatal(why) => why.clone(),
            Event::CatalogEncoded { .. } => below_k(self.ledger.suppliers_up()),
            Event::CatalogStored { .. } => {
                below_k(self.catalog.as_ref().map_or(0, CatalogCommit::least_stored))
            }
            Event::RecordSent { .. } => {
                "the snapshot is committed here, but no supplier took the recovery record".into()
            }
            other => format!("stopped by {:?}", other.kind()),
        }
    }
}

use State::*;
use To::State as Go;

const WORKING: &[State] = &[Running, WaitingForSuppliers];
/// The snapshot is being committed: data fragments keep going out meanwhile.
const COMMITTING: &[State] = &[Committing, UploadingCatalog, StoringRecord];
const LIVE: &[State] = &[
    AtStartup,
    Running,
    WaitingForSuppliers,
    Committing,
    UploadingCatalog,
    StoringRecord,
];
const PLACING: To<BackupJob> = To::Choose(Choice::Placing);
const DRAINED: To<BackupJob> = To::Choose(Choice::Drained);
const NOTE: &[Action] = &[Action::Note, Action::Produce];

static ROWS: &[Row<BackupJob>] = &[
    row(&[AtStartup], EventKind::Start, PLACING, NOTE),
    row(WORKING, EventKind::BlockStaged, PLACING, NOTE),
    row(WORKING, EventKind::BlockReady, PLACING, NOTE),
    row(WORKING, EventKind::InputDone, PLACING, NOTE),
    row(WORKING, EventKind::Placed, PLACING, NOTE),
    row(WORKING, EventKind::PlaceFailed, PLACING, NOTE),
    row(WORKING, EventKind::SupplierUp, PLACING, NOTE),
    row(WORKING, EventKind::SupplierDown, PLACING, NOTE),
    row(
        WORKING,
        EventKind::Timeout,
        PLACING,
        &[Action::Note, Action::Produce, Action::Report],
    ),
    // Committing: the snapshot is committed locally and the catalog coded; each catalog
    // fragment goes once to its supplier, and the upload counts only with k of every block.
    row(
        &[Committing],
        EventKind::CatalogEncoded,
        Go(UploadingCatalog),
        &[Action::PlaceCatalog],
    )
    .when(Guard::CanReachK),
    row(&[Committing], EventKind::CatalogEncoded, Go(Failed), &[]),
    row(
        &[UploadingCatalog],
        EventKind::CatalogStored,
        To::Stay,
        &[Action::Note],
    )
    .when(Guard::CatalogPending),
    row(
        &[UploadingCatalog],
        EventKind::CatalogStored,
        Go(StoringRecord),
        &[Action::Note],
    )
    .when(Guard::CatalogHasK),
    row(
        &[UploadingCatalog],
        EventKind::CatalogStored,
        Go(Failed),
        &[Action::Note],
    ),
    row(
        &[StoringRecord],
        EventKind::RecordSent,
        To::Stay,
        &[Action::SaveCatalog],
    )
    .when(Guard::RecordKept),
    row(&[StoringRecord], EventKind::RecordSent, Go(Failed), &[]),
    row(
        &[StoringRecord],
        EventKind::CatalogSaved,
        DRAINED,
        &[Action::Note],
    ),
    // Data fragments still out while the snapshot commits.
    row(COMMITTING, EventKind::Placed, To::Stay, &[Action::Note]),
    row(
        COMMITTING,
        EventKind::PlaceFailed,
        To::Stay,
        &[Action::Note],
    ),
    row(COMMITTING, EventKind::Timeout, To::Stay, &[Action::Note]),
    row(COMMITTING, EventKind::SupplierUp, To::Stay, &[Action::Note]),
    row(
        COMMITTING,
        EventKind::SupplierDown,
        To::Stay,
        &[Action::Note],
    ),
    // Committed, with fragments still waiting for suppliers that are away: sent as they return.
    row(&[Draining], EventKind::Placed, DRAINED, &[Action::Note]),
    row(
        &[Draining],
        EventKind::PlaceFailed,
        DRAINED,
        &[Action::Note],
    ),
    row(&[Draining], EventKind::SupplierUp, DRAINED, &[Action::Note]),
    row(
        &[Draining],
        EventKind::SupplierDown,
        DRAINED,
        &[Action::Note],
    ),
    row(
        &[Draining],
        EventKind::Timeout,
        DRAINED,
        &[Action::Note, Action::Report],
    ),
    // Stopped while draining: the snapshot stands; what waits is placed by the next job.
    row(&[Draining], EventKind::Shutdown, Go(Committed), &[]),
    row(&[Draining], EventKind::Fatal, Go(Committed), &[]),
    row(LIVE, EventKind::Fatal, Go(Failed), &[Action::Cancel]),
    // A node stop: the job resumes from its job record at the next start.
    row(
        LIVE,
        EventKind::Shutdown,
        Go(Interrupted),
        &[Action::Cancel],
    ),
];

static ENTRY: &[super::machine::Entry<BackupJob>] = &[
    super::machine::Entry {
        state: Committing,
        actions: &[Action::ExportCatalog],
    },
    super::machine::Entry {
        state: StoringRecord,
        actions: &[Action::SendRecord],
    },
    super::machine::Entry {
        state: Draining,
        actions: &[Action::Commit],
    },
    super::machine::Entry {
        state: Committed,
        actions: &[Action::Finish],
    },
    super::machine::Entry {
        state: Interrupted,
        actions: &[Action::Finish],
    },
    super::machine::Entry {
        state: Failed,
        actions: &[Action::Finish],
    },
];

static CHOICES: &[ChoiceRow<BackupJob>] = &[
    ChoiceRow {
        choice: Choice::Placing,
        targets: &[
            (
                Committing,
                "input done, every record durable, every block has k fragments placed",
            ),
            (WaitingForSuppliers, "fewer than k suppliers up"),
            (Running, "otherwise"),
        ],
    },
    ChoiceRow {
        choice: Choice::Drained,
        targets: &[
            (Committed, "every fragment placed"),
            (Draining, "fragments wait for their suppliers"),
        ],
    },
];

static TIMERS: &[TimerRow<BackupJob>] = &[TimerRow {
    timer: Timer::Progress,
    period: Duration::from_secs(1),
    config: None,
    states: &[Running, WaitingForSuppliers, Draining],
}];

impl Machine for BackupJob {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;
    type Choice = Choice;
    type Output = Output;

    const NAME: &'static str = "backup_job";
    const ABOUT: &'static str = "One backup of one source: asks the pipeline for blocks within bounds, places each fragment on its position's supplier or keeps it in that position's outbox while the supplier is away, waits while fewer than k suppliers are up, and commits once every block has k fragments placed: the catalog goes once to every supplier that is up, counts only with k fragments of every catalog block stored, and the recovery record must reach at least one supplier.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Committed, Interrupted, Failed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timers() -> &'static [TimerRow<Self>] {
        TIMERS
    }

    fn entry() -> &'static [super::machine::Entry<Self>] {
        ENTRY
    }

    fn choices() -> &'static [ChoiceRow<Self>] {
        CHOICES
    }

    fn timer_event(timer: Timer) -> Event {
        Event::Timeout(timer)
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn timer_period(&self, _timer: Timer) -> Duration {
        self.progress_every
    }

    fn guard(&self, guard: Guard, event: &Event, _: &Ctx) -> bool {
        match (guard, event) {
            (Guard::CanReachK, Event::CatalogEncoded { .. }) => CatalogCommit::can_reach_k(
                self.ledger.data_shards,
                self.ledger.data_shards + self.ledger.parity_shards,
                self.ledger.up(),
            ),
            (Guard::CatalogPending, Event::CatalogStored { .. }) => {
                self.catalog_after(event).is_some_and(|c| c.pending() > 0)
            }
            (Guard::CatalogHasK, Event::CatalogStored { .. }) => {
                self.catalog_after(event).is_some_and(|c| c.has_k())
            }
            (Guard::RecordKept, Event::RecordSent { copies }) => {
                CatalogCommit::record_kept(*copies)
            }
            _ => false,
        }
    }

    fn choose(&self, choice: Choice, _: &Ctx) -> State {
        if choice == Choice::Drained {
            return if self.ledger.drained() {
                Committed
            } else {
                Draining
            };
        }
        if self.ledger.safe_to_commit() {
            Committing
        } else if self.ledger.suppliers_up() < self.ledger.data_shards as usize {
            WaitingForSuppliers
        } else {
            Running
        }
    }

    fn apply(&mut self, action: Action, event: &Event, ctx: &Ctx, out: &mut Out<Self>) {
        match action {
            Action::Note => {
                let sends = self.note(event, ctx, out);
                Self::place(out, sends);
                for block in self.ledger.take_complete() {
                    out.push(Output::BlockComplete { block });
                }
            }
            Action::Produce => self.produce(out),
            Action::ExportCatalog => out.push(Output::ExportCatalog),
            Action::PlaceCatalog => {
                if let Event::CatalogEncoded {
                    blocks,
                    last_revision,
                } = event
                {
                    let mut catalog = CatalogCommit::new(
                        self.ledger.data_shards,
                        self.ledger.parity_shards,
                        Misses::Stage,
                        self.revision_floor,
                    );
                    let sends = catalog.encoded(blocks, *last_revision, self.ledger.up());
                    self.catalog = Some(catalog);
                    for (block, position) in sends {
                        out.push(Output::PlaceCatalog { block, position });
                    }
                }
            }
            Action::SendRecord => {
                if let Some(catalog) = &self.catalog {
                    out.push(Output::SendRecord {
                        revision: catalog.revision(),
                        placements: catalog.placements(),
                        to: self.ledger.up().iter().copied().collect(),
                    });
                }
            }
            Action::SaveCatalog => {
                if let Some(catalog) = &self.catalog {
                    out.push(Output::SaveCatalog {
                        revision: catalog.revision(),
                        placements: catalog.placements(),
                    });
                }
            }
            Action::Report => out.push(Output::Progress(self.ledger.progress())),
            Action::Cancel => out.push(Output::Cancel),
            Action::Commit => out.push(Output::Committed(self.ledger.progress())),
            Action::Finish => {
                let outcome = match event {
                    _ if self.committed => Outcome::Committed,
                    Event::Shutdown => Outcome::Interrupted,
                    _ => Outcome::Failed(self.failure(event)),
                };
                out.push(Output::Progress(self.ledger.progress()));
                out.push(Output::Finished(outcome));
            }
        }
    }

    fn invariant(&self, state: State) -> Result<(), Violation> {
        self.ledger.check()?;
        if state == Committed && !self.ledger.every_block_has_k() {
            return Err("committed before every block had k fragments placed".into());
        }
        if matches!(state, UploadingCatalog | StoringRecord) && self.catalog.is_none() {
            return Err("uploading a catalog that was never coded".into());
        }
        if state == StoringRecord && !self.catalog.as_ref().is_some_and(CatalogCommit::has_k) {
            return Err("storing the record before every catalog block had k fragments".into());
        }
        if self.committed && !matches!(state, StoringRecord | Draining | Committed) {
            return Err(format!("the catalog was saved in {}", state.name()).into());
        }
        Ok(())
    }

    fn sample_events() -> Vec<Event> {
        let (a, b, c) = ([1; 32], [2; 32], [3; 32]);
        let mut events = vec![
            Event::Start {
                up: vec![0, 1, 2, 3, 4, 5],
            },
            Event::Start { up: vec![0, 1] },
            Event::BlockStaged { block: a },
            Event::BlockReady {
                block: a,
                bytes: 100,
                placed: vec![],
            },
            Event::BlockReady {
                block: b,
                bytes: 100,
                placed: vec![0, 2],
            },
            Event::InputDone,
            Event::Placed {
                block: a,
                position: 0,
            },
            Event::Placed {
                block: a,
                position: 5,
            },
            Event::Placed {
                block: b,
                position: 1,
            },
            Event::PlaceFailed {
                block: a,
                position: 2,
            },
            Event::SupplierUp(4),
            Event::SupplierDown(3),
            Event::CatalogEncoded {
                blocks: vec![c],
                last_revision: 7,
            },
            Event::RecordSent { copies: 0 },
            Event::RecordSent { copies: 3 },
            Event::CatalogSaved,
            Event::Fatal("disk".into()),
            Event::Timeout(Timer::Progress),
            Event::Timeout(Timer::Retry),
            Event::Shutdown,
        ];
        for position in 0..6 {
            events.push(Event::CatalogStored {
                block: c,
                position,
                stored: position != 1,
            });
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{Instance, Stepped};

    const C: Ctx = Ctx::at(Duration::ZERO);

    fn places(s: &Stepped<BackupJob>) -> Vec<(BlockId, u32)> {
        s.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Place { block, position } => Some((*block, *position)),
                _ => None,
            })
            .collect()
    }

    fn produces(s: &Stepped<BackupJob>) -> usize {
        s.outputs.iter().filter(|o| **o == Output::Produce).count()
    }

    fn started(up: Vec<u32>) -> (Instance<BackupJob>, Stepped<BackupJob>) {
        let mut job = Instance::new(BackupJob::default(), "j");
        let s = job.step(&Event::Start { up }, &C).expect("start");
        (job, s)
    }

    #[test]
    fn blocks_are_produced_within_bounds_and_placed_one_fragment_per_position() {
        let (mut job, s) = started((0..6).collect());
        assert_eq!(s.to, Running);
        assert_eq!(
            produces(&s),
            8,
            "up to max_unplaced blocks asked for at once"
        );
        let s = job
            .step(
                &Event::BlockReady {
                    block: [1; 32],
                    bytes: 10,
                    placed: vec![],
                },
                &C,
            )
            .expect("ready");
        let positions: Vec<u32> = places(&s).iter().map(|(_, p)| *p).collect();
        assert_eq!(positions, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(
            produces(&s),
            0,
            "the block is still unplaced: no room for more"
        );
    }

    #[test]
    fn a_supplier_away_gets_its_fragments_queued_and_sent_when_it_returns() {
        let (mut job, _) = started(vec![0, 1, 2, 3, 4]);
        let block = [7; 32];
        let s = job
            .step(
                &Event::BlockReady {
                    block,
                    bytes: 10,
                    placed: vec![],
                },
                &C,
            )
            .expect("ready");
        assert!(
            !places(&s).iter().any(|(_, p)| *p == 5),
            "position 5 is down"
        );
        for position in 0..5 {
            job.step(&Event::Placed { block, position }, &C);
        }
        assert_eq!(job.machine.ledger.progress().queued, 1);
        assert_eq!(job.machine.ledger.progress().worst_redundancy, 1);
        let s = job.step(&Event::SupplierUp(5), &C).expect("up");
        assert_eq!(places(&s), vec![(block, 5)]);
    }

    #[test]
    fn fewer_than_k_suppliers_waits_instead_of_failing() {
        let (mut job, s) = started(vec![0, 1, 2]);
        assert_eq!(s.to, WaitingForSuppliers);
        assert_eq!(produces(&s), 0, "nothing produced while too few are up");
        let s = job.step(&Event::SupplierUp(3), &C).expect("up");
        assert_eq!(s.to, Running);
        assert!(produces(&s) > 0);
    }

    /// Steps through the commit of a job whose one `block` reached positions 0..5 (5 is away):
    /// returns the job in `Draining`.
    fn commit_with_catalog(
        job: &mut Instance<BackupJob>,
        catalog: BlockId,
        stored: &[u32],
    ) -> Stepped<BackupJob> {
        let s = job
            .step(
                &Event::CatalogEncoded {
                    blocks: vec![catalog],
                    last_revision: 41,
                },
                &C,
            )
            .expect("encoded");
        assert_eq!(s.to, UploadingCatalog);
        let asked: Vec<u32> = s
            .outputs
            .iter()
            .filter_map(|o| match o {
                Output::PlaceCatalog { block, position } if *block == catalog => Some(*position),
                _ => None,
            })
            .collect();
        assert_eq!(asked, vec![0, 1, 2, 3, 4], "once to every supplier up");
        let mut last = None;
        for position in 0..5 {
            last = job.step(
                &Event::CatalogStored {
                    block: catalog,
                    position,
                    stored: stored.contains(&position),
                },
                &C,
            );
        }
        last.expect("answered")
    }

    fn ready_to_commit() -> (Instance<BackupJob>, BlockId) {
        let (mut job, _) = started(vec![0, 1, 2, 3, 4]);
        job.machine.revision_floor = 9;
        let block = [9; 32];
        job.step(&Event::BlockStaged { block }, &C);
        job.step(
            &Event::BlockReady {
                block,
                bytes: 10,
                placed: vec![],
            },
            &C,
        );
        job.step(&Event::InputDone, &C);
        for position in 0..5 {
            job.step(&Event::Placed { block, position }, &C);
        }
        assert_eq!(job.state(), Committing);
        (job, block)
    }

    #[test]
    fn commits_once_every_block_has_k_placed_and_nothing_is_out() {
        let (mut job, _) = started(vec![0, 1, 2, 3, 4]);
        let block = [9; 32];
        job.step(
            &Event::BlockReady {
                block,
                bytes: 10,
                placed: vec![],
            },
            &C,
        );
        job.step(&Event::InputDone, &C);
        for position in 0..3 {
            let s = job
                .step(&Event::Placed { block, position }, &C)
                .expect("placed");
            assert_ne!(s.to, Committing, "only {} placed", position + 1);
        }
        let s = job
            .step(&Event::Placed { block, position: 3 }, &C)
            .expect("placed");
        assert_ne!(s.to, Committing, "position 4 is still out for an answer");
        let s = job
            .step(&Event::Placed { block, position: 4 }, &C)
            .expect("placed");
        assert_eq!(s.to, Committing);
        assert!(s.outputs.contains(&Output::ExportCatalog));
        let s = commit_with_catalog(&mut job, [5; 32], &[0, 1, 2, 3, 4]);
        assert_eq!(s.to, StoringRecord);
        let s = job
            .step(&Event::RecordSent { copies: 5 }, &C)
            .expect("sent");
        assert!(matches!(s.outputs[..], [Output::SaveCatalog { .. }]));
        let s = job.step(&Event::CatalogSaved, &C).expect("saved");
        assert_eq!(s.to, Draining, "position 5's fragment still waits");
        assert!(
            s.outputs
                .iter()
                .any(|o| matches!(o, Output::Committed(p) if p.queued == 2)),
            "committed with two fragments waiting"
        );
        let s = job.step(&Event::SupplierUp(5), &C).expect("up");
        assert_eq!(
            places(&s),
            vec![(block, 5), ([5; 32], 5)],
            "the data and the catalog fragment are sent once their supplier is back"
        );
        let s = job
            .step(&Event::Placed { block, position: 5 }, &C)
            .expect("placed");
        assert_eq!(s.to, Draining);
        assert!(s.outputs.contains(&Output::BlockComplete { block }));
        let s = job
            .step(
                &Event::Placed {
                    block: [5; 32],
                    position: 5,
                },
                &C,
            )
            .expect("placed");
        assert_eq!(s.to, Committed);
        assert!(s.outputs.contains(&Output::Finished(Outcome::Committed)));
    }

    #[test]
    fn the_record_names_the_holders_takes_the_next_revision_and_goes_to_every_supplier_up() {
        let (mut job, _) = ready_to_commit();
        let catalog = [5; 32];
        let s = commit_with_catalog(&mut job, catalog, &[0, 1, 2, 4]);
        assert_eq!(s.to, StoringRecord, "4 of 4 needed");
        let expected = vec![Placement {
            block: catalog,
            holders: vec![0, 1, 2, 4],
            staged: vec![3, 5],
            missing: vec![],
        }];
        assert_eq!(
            s.outputs,
            vec![Output::SendRecord {
                revision: 42,
                placements: expected.clone(),
                to: vec![0, 1, 2, 3, 4],
            }]
        );
        let s = job
            .step(&Event::RecordSent { copies: 1 }, &C)
            .expect("sent");
        assert_eq!(
            s.outputs,
            vec![Output::SaveCatalog {
                revision: 42,
                placements: expected,
            }]
        );
    }

    #[test]
    fn a_catalog_below_k_or_a_record_no_supplier_took_fails_the_job() {
        let (mut job, _) = ready_to_commit();
        let s = commit_with_catalog(&mut job, [5; 32], &[0, 1, 2]);
        assert_eq!(s.to, Failed, "3 of the 4 needed");
        assert!(s.outputs.contains(&Output::Finished(Outcome::Failed(
            "the snapshot is committed here, but its catalog reached only 3 of the 4 suppliers it needs".into()
        ))));

        let (mut job, _) = ready_to_commit();
        job.step(&Event::SupplierDown(0), &C);
        job.step(&Event::SupplierDown(1), &C);
        let s = job
            .step(
                &Event::CatalogEncoded {
                    blocks: vec![[5; 32]],
                    last_revision: 0,
                },
                &C,
            )
            .expect("encoded");
        assert_eq!(
            s.to, Failed,
            "only 3 suppliers up: no catalog fragment asked"
        );
        assert!(
            !s.outputs
                .iter()
                .any(|o| matches!(o, Output::PlaceCatalog { .. }))
        );

        let (mut job, _) = ready_to_commit();
        commit_with_catalog(&mut job, [5; 32], &[0, 1, 2, 3, 4]);
        let s = job
            .step(&Event::RecordSent { copies: 0 }, &C)
            .expect("sent");
        assert_eq!(s.to, Failed);
        assert!(s.outputs.contains(&Output::Finished(Outcome::Failed(
            "the snapshot is committed here, but no supplier took the recovery record".into()
        ))));
    }

    #[test]
    fn the_job_commits_only_once_every_block_record_is_durable() {
        let (mut job, _) = started(vec![0, 1, 2, 3, 4, 5]);
        let (a, b) = ([1; 32], [2; 32]);
        job.step(&Event::BlockStaged { block: a }, &C);
        job.step(
            &Event::BlockReady {
                block: a,
                bytes: 10,
                placed: vec![],
            },
            &C,
        );
        job.step(&Event::BlockStaged { block: b }, &C);
        job.step(&Event::InputDone, &C);
        for position in 0..6 {
            let s = job
                .step(&Event::Placed { block: a, position }, &C)
                .expect("placed");
            assert_ne!(s.to, Committing, "block b's record is not durable yet");
        }
        let s = job
            .step(
                &Event::BlockReady {
                    block: b,
                    bytes: 10,
                    placed: vec![],
                },
                &C,
            )
            .expect("recorded");
        assert_eq!(places(&s).len(), 6, "b's fragments leave once recorded");
        for position in 0..6 {
            job.step(&Event::Placed { block: b, position }, &C);
        }
        assert_eq!(job.state(), Committing);
    }

    #[test]
    fn a_failed_placement_is_retried_and_a_lost_supplier_requeues_what_was_out() {
        let (mut job, _) = started((0..6).collect());
        let block = [3; 32];
        job.step(
            &Event::BlockReady {
                block,
                bytes: 10,
                placed: vec![],
            },
            &C,
        );
        let s = job
            .step(&Event::PlaceFailed { block, position: 2 }, &C)
            .expect("failed");
        assert!(places(&s).is_empty(), "not asked again in a loop");
        let s = job.step(&Event::Timeout(Timer::Retry), &C).expect("retry");
        assert_eq!(
            places(&s),
            vec![(block, 2)],
            "sent again after the retry delay"
        );
        job.step(&Event::SupplierDown(4), &C);
        job.machine.ledger.check().expect("accounted for");
        assert_eq!(job.machine.ledger.progress().queued, 1);
        let s = job.step(&Event::SupplierUp(4), &C).expect("up");
        assert_eq!(places(&s), vec![(block, 4)]);
    }

    #[test]
    fn a_resumed_block_sends_only_what_was_not_acknowledged() {
        let (mut job, _) = started((0..6).collect());
        let block = [4; 32];
        let s = job
            .step(
                &Event::BlockReady {
                    block,
                    bytes: 10,
                    placed: vec![0, 1, 2, 3],
                },
                &C,
            )
            .expect("resumed");
        assert_eq!(places(&s), vec![(block, 4), (block, 5)]);
        assert_eq!(produces(&s), 0, "a resumed block was not asked for");
        job.machine.ledger.check().expect("accounted for");
    }

    #[test]
    fn a_job_stopped_while_draining_stays_committed() {
        let (mut job, _) = started(vec![0, 1, 2, 3, 4]);
        let block = [8; 32];
        job.step(
            &Event::BlockReady {
                block,
                bytes: 10,
                placed: vec![],
            },
            &C,
        );
        job.step(&Event::InputDone, &C);
        for position in 0..5 {
            job.step(&Event::Placed { block, position }, &C);
        }
        commit_with_catalog(&mut job, [5; 32], &[0, 1, 2, 3, 4]);
        job.step(&Event::RecordSent { copies: 5 }, &C);
        let s = job.step(&Event::CatalogSaved, &C).expect("saved");
        assert_eq!(s.to, Draining);
        let s = job.step(&Event::Shutdown, &C).expect("stop");
        assert_eq!(s.to, Committed);
        assert!(s.outputs.contains(&Output::Finished(Outcome::Committed)));
    }

    #[test]
    fn a_node_stop_interrupts_the_job() {
        let (mut job, _) = started((0..6).collect());
        let s = job.step(&Event::Shutdown, &C).expect("stop");
        assert_eq!(s.to, Interrupted);
        assert!(s.outputs.contains(&Output::Cancel));
        assert!(s.outputs.contains(&Output::Finished(Outcome::Interrupted)));
        let (mut job, _) = ready_to_commit();
        let s = job.step(&Event::Shutdown, &C).expect("stop");
        assert_eq!(s.to, Interrupted, "stopped before the catalog was saved");
    }
}
