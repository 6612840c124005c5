//! monitor: watches what the suppliers hold and decides what to do about it — the health matrix,
//! storage audits, firing, and the rebuilder's work list.
//!
//! Every round (`monitor.interval`; a faster round while a position's supplier is unreachable)
//! it asks each reachable supplier for the list of what it holds and audits a few fragments per
//! supplier, in turn (a cursor per position walks the blocks, so every fragment is audited over
//! time). An audit is a challenge only the actual bytes answer (PROTOCOL.md §8.9): a supplier
//! that deleted, corrupted or kept only hashes of a fragment fails it.
//!
//! The matrix holds, per block and position, what is known of the fragment at the supplier the
//! catalog names for it: present, missing, corrupt or unknown. A position whose supplier was
//! replaced holds none of its blocks until the rebuilder places them.
//!
//! Only a valid proof (or a whole fetch that matches the catalog's hash) marks a fragment
//! present; a list says what a supplier *claims*. From a reachable supplier, any answer but a
//! valid proof (a refusal, a timeout, a reply of the wrong kind: [`AuditResult::Refused`], after
//! the driver's one retry) is a failed audit, and so is a fragment left out of a list, or rebuilt
//! on the same supplier a second time. "Try later" ([`AuditResult::Busy`]: a store still
//! opening after a restart, a passing IO error) counts only once it has lasted
//! [`Monitor::busy_grace`]. Failures are counted over a window of the position's last
//! [`Monitor::window`] outcomes; a position failing at least half of them is *suspect*: none of
//! its fragments counts as good (the sources' health shows the loss at once).
//!
//! Firing (at the end of a round, one decision at a time): a supplier unreachable for
//! `monitor.fire_after`, or failing at least `monitor.fire_after_failed_audits` audits of its
//! window and at least half of them (so a few passes cannot hide many failures). The
//! guard, the original's rule made exact: never fire a position while some block it may still
//! hold a good fragment of has fewer than `k` good fragments reachable elsewhere — firing it
//! would leave that block unrebuildable. No firing while an earlier one is not yet rebuilt
//! (except of that position's replacement, should it fail in turn), and none without a spare
//! friend to hire in its place.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::fetch::Latency;
use super::machine::{ChoiceRow, Ctx, Machine, Out, Row, To, Violation, row};
use crate::crypto::identity::NodeId;
use crate::data::Layout;
use crate::{events, labels};

/// Fragments beyond one per block (twice) a supplier's list may hold: one list page.
pub const LIST_SLACK: usize = 1000;

/// A block's id (see `data::BlockId`).
pub type BlockId = [u8; 32];

/// What is known of one fragment at the supplier the catalog names for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cell {
    Unknown,
    Present,
    Missing,
    Corrupt,
}

impl Cell {
    /// May hold a good fragment (not known to be bad).
    pub fn maybe_good(self) -> bool {
        matches!(self, Cell::Unknown | Cell::Present)
    }
}

/// One block as the monitor follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    pub id: BlockId,
    /// The block's own layout, as it was made: its `k` is what reading and rebuilding it needs,
    /// whatever the node's layout for new snapshots is now.
    pub layout: Layout,
    /// The supplier that acknowledged each position's fragment (`None`: still in the outbox of
    /// a backup job, which places it itself).
    pub holders: Vec<Option<NodeId>>,
    pub cells: Vec<Cell>,
    /// The newest snapshot referencing it (the rebuilder takes newer versions first).
    pub newest: u64,
    /// A block of the current catalog export (rebuilt before any data).
    pub catalog: bool,
}

/// Why a supplier was fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FireReason {
    /// Unreachable for this long.
    Unreachable(Duration),
    /// Failed this many audits of its window (at least half of them).
    FailedAudits(u32),
}

impl std::fmt::Display for FireReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FireReason::Unreachable(d) => write!(f, "unreachable for {} s", d.as_secs()),
            FireReason::FailedAudits(n) => write!(f, "failed {n} of its recent storage audits"),
        }
    }
}

/// How an audit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditResult {
    /// The proof matched.
    Passed,
    /// The supplier answered with a wrong proof (or bytes that fail their hash).
    Corrupt,
    /// The supplier says it does not hold the fragment.
    NotFound,
    /// A reachable supplier answered anything but a proof (a refusal other than NOT_FOUND,
    /// no reply in time, a reply of the wrong kind), twice: it did not show it holds the bytes.
    Refused,
    /// The supplier said "try later" (TRY_LATER: its store is not open yet, a passing IO error):
    /// not counted until it has lasted [`Monitor::busy_grace`].
    Busy,
    /// No session with the supplier (unreachable): says nothing about the fragment; being
    /// unreachable has its own rule (`fire_after`).
    NoAnswer,
}

impl AuditResult {
    /// A failed audit (counted toward firing).
    pub fn failed(self) -> bool {
        matches!(
            self,
            AuditResult::Corrupt | AuditResult::NotFound | AuditResult::Refused
        )
    }
}

/// One block for the rebuilder: which positions to recreate and where good fragments may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildTask {
    pub block: BlockId,
    /// The block's own layout (its `k` fragments rebuild it).
    pub layout: Layout,
    /// Positions to recreate, each with the supplier to place it on.
    pub targets: Vec<(u32, NodeId)>,
    /// Positions holding a fragment that may be good, reachable ones first, with their holder.
    pub sources: Vec<(u32, NodeId)>,
    /// The sources whose supplier is known down (asked only when nothing else is left).
    pub down: Vec<u32>,
    pub catalog: bool,
}

labels! {
    pub enum State { AtStartup, Idle, Checking, Closed }
}

events! {
    pub enum Event / EventKind {
        /// The node's layout (its `k + m` positions), the catalog's blocks and the hired
        /// suppliers by position.
        Start { layout: Layout, blocks: Vec<BlockInfo>, suppliers: Vec<Option<NodeId>> },
        /// The catalog changed (a backup committed, retention pruned): the blocks to follow now.
        Blocks(Vec<BlockInfo>),
        /// The supplier at a position, and whether it is reachable.
        Position { position: u32, supplier: NodeId, up: bool },
        /// How many trusted friends could be hired in a fired supplier's place.
        Spares(usize),
        /// What the supplier at `position` lists as held at that position (`None`: no answer).
        Listed { position: u32, supplier: NodeId, held: Option<BTreeSet<BlockId>> },
        Audited { block: BlockId, position: u32, supplier: NodeId, result: AuditResult },
        /// The rebuilder placed a fragment.
        Placed { block: BlockId, position: u32, supplier: NodeId },
        /// The rebuilder finished its work list (or gave up on what it could not do).
        RebuildIdle,
        Timeout(Timer),
        Shutdown,
    }
}

labels! {
    pub enum Guard {}
}

labels! {
    pub enum Action {
        /// Record what the event says in the matrix and the positions.
        Note,
        /// Ask every reachable supplier for its list and send this round's audits (IO).
        BeginRound,
        /// Fire at most one supplier (guarded), hand the rebuilder its work, report (IO).
        Decide,
        /// Arm the next round: sooner while a supplier is unreachable.
        Schedule,
    }
}

labels! {
    pub enum Timer { Round, RoundDeadline }
}

labels! {
    pub enum Choice { RoundDone }
}

/// A summary for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub blocks: u64,
    /// Blocks by their good fragments reachable beyond `k` (negative: below `k`).
    pub by_redundancy: BTreeMap<i64, u64>,
    pub cells: BTreeMap<String, u64>,
    pub rounds: u64,
    pub audits_passed: u64,
    pub audits_failed: u64,
    pub fired: Vec<(u32, String)>,
    pub rebuild_queued: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// List what `supplier` holds; more than `at_most` fragments is a malformed list.
    List {
        position: u32,
        supplier: NodeId,
        at_most: usize,
    },
    Audit {
        block: BlockId,
        position: u32,
        supplier: NodeId,
    },
    Fire {
        position: u32,
        supplier: NodeId,
        reason: FireReason,
    },
    /// The rebuilder's work, most urgent first (replaces its queue).
    Rebuild(Vec<RebuildTask>),
    /// Persist these blocks' cells.
    SaveCells(Vec<(BlockId, Vec<Cell>)>),
    Report(Summary),
}

/// One position's supplier as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PositionView {
    pub supplier: Option<NodeId>,
    pub up: bool,
    /// Since when it is unreachable (monotonic).
    pub down_since: Option<Duration>,
    /// Failed audits among the last [`Monitor::window`] outcomes.
    pub failed_audits: u32,
    /// The last outcomes, oldest first (true: failed), at most [`Monitor::window`].
    outcomes: std::collections::VecDeque<bool>,
    /// Since when it answers "try later" (reset by any other answer).
    busy_since: Option<Duration>,
    /// Blocks rebuilt on this supplier at this position: a second rebuild of one is a failure.
    rebuilt: BTreeSet<BlockId>,
    /// Time observed reachable and observed at all (for the durability estimate).
    pub up_time: Duration,
    pub observed: Duration,
    /// The last block audited here (the next round continues after it).
    cursor: Option<BlockId>,
    /// Rounds since this supplier last listed what it holds (`None`: never since it came up).
    since_listed: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Monitor {
    /// The layout new snapshots are made with: how many positions there are. Each block is
    /// judged by its own ([`BlockInfo::layout`]).
    pub layout: Layout,
    /// Positions followed (`layout.total()`; none before `Start`).
    pub total: u32,
    pub interval: Duration,
    /// The round interval while a supplier is unreachable.
    pub fast_interval: Duration,
    pub fire_after: Duration,
    pub fire_after_failed_audits: u32,
    pub audits_per_round: usize,
    /// A supplier lists what it holds every this many rounds (and when it comes up): a list
    /// costs ~80 bytes per fragment, audits far less.
    pub list_every: u64,
    /// How long a round waits for its answers.
    pub round_deadline: Duration,
    /// How long "try later" answers may go on before they count as failed audits (6 rounds of
    /// `interval`: an hour at the defaults, well past a slow store's opening after a restart).
    pub busy_grace: Duration,
    pub positions: Vec<PositionView>,
    pub blocks: BTreeMap<BlockId, BlockInfo>,
    pub spares: usize,
    /// A fired position not yet rebuilt: no other firing meanwhile.
    pub fired: Option<u32>,
    pub rebuilding: bool,
    /// Answers the round still waits for.
    /// Lists and audits asked this round and not answered, with when they were asked.
    waiting: BTreeMap<(u32, Option<BlockId>), Duration>,
    /// How fast each position's supplier answers its audits (for status: restores set aside
    /// a slow supplier on their own figures; the monitor says which one is always slow).
    pub latency: Latency,
    /// The round in which each followed block was first seen: a list asked for before a block
    /// was committed cannot be blamed for leaving it out.
    seen_in_round: BTreeMap<BlockId, u64>,
    /// Cells changed since the last save.
    dirty: BTreeSet<BlockId>,
    last_observed: Option<Duration>,
    pub summary: Summary,
}

impl Default for Monitor {
    fn default() -> Self {
        Monitor::new(
            Duration::from_secs(600),
            Duration::from_secs(6 * 3600),
            3,
            4,
        )
    }
}

impl Monitor {
    pub fn new(
        interval: Duration,
        fire_after: Duration,
        fire_after_failed_audits: u32,
        audits_per_round: usize,
    ) -> Self {
        Monitor {
            layout: Layout::default(),
            total: 0,
            interval,
            fast_interval: (interval / 10).max(Duration::from_secs(1)),
            fire_after,
            fire_after_failed_audits: fire_after_failed_audits.max(1),
            audits_per_round,
            list_every: 6,
            round_deadline: Duration::from_secs(60),
            busy_grace: interval * 6,
            positions: Vec::new(),
            blocks: BTreeMap::new(),
            spares: 0,
            fired: None,
            rebuilding: false,
            waiting: BTreeMap::new(),
            latency: Latency::default(),
            seen_in_round: BTreeMap::new(),
            dirty: BTreeSet::new(),
            last_observed: None,
            summary: Summary::default(),
        }
    }

    fn supplier_at(&self, position: u32) -> Option<NodeId> {
        self.positions
            .get(position as usize)
            .and_then(|p| p.supplier)
    }

    fn is_up(&self, position: u32) -> bool {
        self.positions.get(position as usize).is_some_and(|p| p.up)
    }

    /// Outcomes a position's failure rate is judged over: four times
    /// `fire_after_failed_audits`.
    pub fn window(&self) -> usize {
        4 * self.fire_after_failed_audits as usize
    }

    /// Failing at least half of its recent audits: none of its fragments counts as good.
    pub fn suspect(&self, position: u32) -> bool {
        self.positions.get(position as usize).is_some_and(|v| {
            v.failed_audits > 0 && 2 * v.failed_audits as usize >= v.outcomes.len()
        })
    }

    /// Records one audit outcome at `position` (failed or passed) in its window.
    fn record(&mut self, position: u32, failed: bool) {
        let window = self.window();
        let Some(view) = self.positions.get_mut(position as usize) else {
            return;
        };
        view.outcomes.push_back(failed);
        while view.outcomes.len() > window {
            view.outcomes.pop_front();
        }
        view.failed_audits = view.outcomes.iter().filter(|f| **f).count() as u32;
        if failed {
            self.summary.audits_failed += 1;
        } else {
            self.summary.audits_passed += 1;
        }
    }

    /// The fragment at `position` may be good, its holder is the position's supplier, and that
    /// supplier is not failing its audits.
    fn holds(&self, block: &BlockInfo, position: u32) -> bool {
        let p = position as usize;
        !self.suspect(position)
            && block.cells.get(p).is_some_and(|c| c.maybe_good())
            && block.holders.get(p).copied().flatten().is_some()
            && block.holders[p] == self.supplier_at(position)
    }

    /// Good fragments of `block` reachable now, leaving out `except`.
    pub fn available(&self, block: &BlockInfo, except: Option<u32>) -> usize {
        (0..self.total)
            .filter(|&p| Some(p) != except && self.is_up(p) && self.holds(block, p))
            .count()
    }

    /// Good fragments reachable beyond the block's `k` (negative: it cannot be read now).
    pub fn redundancy(&self, block: &BlockInfo) -> i64 {
        self.available(block, None) as i64 - block.layout.k() as i64
    }

    /// Firing `position` leaves every block it may hold a good fragment of with its own `k`
    /// good fragments reachable elsewhere (enough to rebuild it on the replacement).
    pub fn fire_is_safe(&self, position: u32) -> bool {
        self.blocks.values().all(|b| {
            let held_there = b
                .cells
                .get(position as usize)
                .is_some_and(|c| c.maybe_good())
                && b.holders
                    .get(position as usize)
                    .copied()
                    .flatten()
                    .is_some();
            !held_there || self.available(b, Some(position)) >= b.layout.k()
        })
    }

    /// What the matrix says must be recreated at `position` of `block`, if anything.
    fn needs(&self, block: &BlockInfo, position: u32) -> bool {
        let p = position as usize;
        if self.supplier_at(position).is_none() {
            return false;
        }
        match block.holders.get(p).copied().flatten() {
            // In a backup job's outbox: the job places it.
            None => false,
            Some(holder) => {
                Some(holder) != self.supplier_at(position)
                    || matches!(block.cells.get(p), Some(Cell::Missing | Cell::Corrupt))
            }
        }
    }

    /// The rebuilder's work: blocks with a position to recreate on a reachable supplier and at
    /// least `k` good fragments reachable; the catalog first, then the least redundancy left,
    /// then the newest versions.
    pub fn rebuild_work(&self) -> Vec<RebuildTask> {
        let mut work: Vec<(bool, i64, u64, RebuildTask)> = Vec::new();
        for block in self.blocks.values() {
            let targets: Vec<(u32, NodeId)> = (0..self.total)
                .filter(|&p| self.is_up(p) && self.needs(block, p))
                .filter_map(|p| self.supplier_at(p).map(|s| (p, s)))
                .collect();
            if targets.is_empty() || self.available(block, None) < block.layout.k() {
                continue;
            }
            let mut sources: Vec<(u32, NodeId, bool)> = (0..self.total)
                .filter(|&p| self.holds(block, p) && !targets.iter().any(|(t, _)| *t == p))
                .filter_map(|p| block.holders[p as usize].map(|h| (p, h, self.is_up(p))))
                .collect();
            sources.sort_by_key(|(p, _, up)| (!*up, *p));
            work.push((
                !block.catalog,
                self.redundancy(block),
                u64::MAX - block.newest,
                RebuildTask {
                    block: block.id,
                    layout: block.layout,
                    targets,
                    down: sources.iter().filter(|s| !s.2).map(|s| s.0).collect(),
                    sources: sources.into_iter().map(|(p, h, _)| (p, h)).collect(),
                    catalog: block.catalog,
                },
            ));
        }
        work.sort_by_key(|w| (w.0, w.1, w.2, w.3.block));
        work.into_iter().map(|w| w.3).collect()
    }

    /// The supplier to fire now, if any (one at a time, guarded).
    pub fn fire_decision(&self, now: Duration) -> Option<(u32, NodeId, FireReason)> {
        if self.spares == 0 {
            return None;
        }
        let mut candidates: Vec<(u32, NodeId, FireReason)> = Vec::new();
        for (p, view) in self.positions.iter().enumerate() {
            let Some(supplier) = view.supplier else {
                continue;
            };
            // While a firing is not yet rebuilt, only that position's replacement may be fired
            // (it failed in turn): another position waits.
            if self.fired.is_some_and(|f| f != p as u32) {
                continue;
            }
            if view.failed_audits >= self.fire_after_failed_audits && self.suspect(p as u32) {
                candidates.push((
                    p as u32,
                    supplier,
                    FireReason::FailedAudits(view.failed_audits),
                ));
            } else if let Some(since) = view.down_since {
                let down = now.saturating_sub(since);
                if down >= self.fire_after {
                    candidates.push((p as u32, supplier, FireReason::Unreachable(down)));
                }
            }
        }
        candidates
            .into_iter()
            .find(|(p, _, _)| self.fire_is_safe(*p))
    }

    fn set_cell(&mut self, block: BlockId, position: u32, cell: Cell) {
        if let Some(b) = self.blocks.get_mut(&block)
            && let Some(c) = b.cells.get_mut(position as usize)
            && *c != cell
        {
            *c = cell;
            self.dirty.insert(block);
        }
    }

    /// Adds observed time to every position's availability figures.
    fn observe_time(&mut self, now: Duration) {
        if let Some(last) = self.last_observed {
            let spent = now.saturating_sub(last);
            for view in &mut self.positions {
                if view.supplier.is_some() {
                    view.observed += spent;
                    if view.up {
                        view.up_time += spent;
                    }
                }
            }
        }
        self.last_observed = Some(now);
    }

    fn take_blocks(&mut self, blocks: &[BlockInfo]) {
        let total = self.total as usize;
        let round = self.summary.rounds;
        let ids: BTreeSet<BlockId> = blocks.iter().map(|b| b.id).collect();
        self.seen_in_round.retain(|id, _| ids.contains(id));
        for b in blocks {
            self.seen_in_round.entry(b.id).or_insert(round);
        }
        let mut next = BTreeMap::new();
        for b in blocks {
            let mut b = b.clone();
            b.holders.resize(total, None);
            b.cells.resize(total, Cell::Unknown);
            next.insert(b.id, b);
        }
        self.dirty.retain(|id| next.contains_key(id));
        self.blocks = next;
    }

    fn note(&mut self, event: &Event, ctx: &Ctx) {
        self.observe_time(ctx.now);
        match event {
            Event::Start {
                layout,
                blocks,
                suppliers,
            } => {
                self.layout = *layout;
                self.total = layout.total() as u32;
                self.positions = suppliers
                    .iter()
                    .map(|s| PositionView {
                        supplier: *s,
                        // Not yet heard of: counted unreachable from now (a supplier that
                        // never comes back is fired after `fire_after` like any other).
                        up: false,
                        down_since: s.map(|_| ctx.now),
                        ..PositionView::default()
                    })
                    .collect();
                self.positions
                    .resize(layout.total(), PositionView::default());
                self.take_blocks(blocks);
            }
            Event::Blocks(blocks) => self.take_blocks(blocks),
            Event::Position {
                position,
                supplier,
                up,
            } => {
                let Some(view) = self.positions.get_mut(*position as usize) else {
                    return;
                };
                if view.supplier != Some(*supplier) {
                    // A new supplier: its history starts now.
                    self.latency.forget(*position);
                    *view = PositionView {
                        supplier: Some(*supplier),
                        ..PositionView::default()
                    };
                    view.down_since = Some(ctx.now);
                }
                if *up {
                    if !view.up {
                        // Back (or new): what it holds is asked at the next round.
                        view.since_listed = None;
                    }
                    view.up = true;
                    view.down_since = None;
                } else if view.up || view.down_since.is_none() {
                    view.up = false;
                    view.down_since = Some(ctx.now);
                }
            }
            Event::Spares(n) => self.spares = *n,
            Event::Listed {
                position,
                supplier,
                held,
            } => {
                self.waiting.remove(&(*position, None));
                let Some(held) = held else { return };
                if self.supplier_at(*position) != Some(*supplier) {
                    return;
                }
                self.listed(*position, *supplier, held);
            }
            Event::Audited {
                block,
                position,
                supplier,
                result,
            } => {
                let asked = self.waiting.remove(&(*position, Some(*block)));
                if self.supplier_at(*position) != Some(*supplier)
                    || self
                        .blocks
                        .get(block)
                        .and_then(|b| b.holders.get(*position as usize).copied().flatten())
                        != Some(*supplier)
                {
                    return;
                }
                // An audit this round asked, answered (a restore's report was not timed here).
                if let Some(at) = asked
                    && *result != AuditResult::NoAnswer
                {
                    self.latency.observe(*position, ctx.now.saturating_sub(at));
                }
                self.audited(*block, *position, *result, ctx.now);
            }
            Event::Placed {
                block,
                position,
                supplier,
            } => self.placed(*block, *position, *supplier),
            Event::RebuildIdle => self.rebuilding = false,
            Event::Timeout(Timer::RoundDeadline) => self.waiting.clear(),
            Event::Timeout(Timer::Round) | Event::Shutdown => {}
        }
    }

    /// What a supplier lists is a claim: a listed fragment known missing may be there again
    /// (unknown until audited), never "present". A fragment it leaves out is missing, and —
    /// unless the block was committed after the list was asked for — a failed audit (M4).
    fn listed(&mut self, position: u32, supplier: NodeId, held: &BTreeSet<BlockId>) {
        let p = position as usize;
        let round = self.summary.rounds;
        let changes: Vec<(BlockId, Cell, bool)> = self
            .blocks
            .values()
            .filter(|b| b.holders.get(p).copied().flatten() == Some(supplier))
            .filter_map(|b| {
                let before_list = self.seen_in_round.get(&b.id).is_some_and(|r| *r < round);
                match (held.contains(&b.id), b.cells[p]) {
                    (true, Cell::Missing) => Some((b.id, Cell::Unknown, false)),
                    (false, Cell::Unknown | Cell::Present) => {
                        Some((b.id, Cell::Missing, before_list))
                    }
                    (false, Cell::Corrupt) => Some((b.id, Cell::Missing, false)),
                    _ => None,
                }
            })
            .collect();
        for (block, cell, omitted) in changes {
            self.set_cell(block, position, cell);
            if omitted {
                self.record(position, true);
            }
        }
    }

    /// One audit's outcome: only a pass marks the fragment present; a failure marks it bad and
    /// counts; "try later" counts only once it has lasted `busy_grace`.
    fn audited(&mut self, block: BlockId, position: u32, result: AuditResult, now: Duration) {
        let Some(view) = self.positions.get_mut(position as usize) else {
            return;
        };
        let result = match result {
            AuditResult::Busy => {
                let since = *view.busy_since.get_or_insert(now);
                if now.saturating_sub(since) < self.busy_grace {
                    return;
                }
                AuditResult::Refused
            }
            AuditResult::NoAnswer => return,
            other => {
                view.busy_since = None;
                other
            }
        };
        let cell = match result {
            AuditResult::Passed => Cell::Present,
            AuditResult::Corrupt => Cell::Corrupt,
            _ => Cell::Missing,
        };
        self.record(position, result.failed());
        self.set_cell(block, position, cell);
    }

    /// The rebuilder placed a fragment: it holds what the rebuilder verified, as far as the
    /// supplier's acknowledgement goes (unknown until audited). A second rebuild of the same
    /// fragment on the same supplier is a failed audit: it lost it again.
    fn placed(&mut self, block: BlockId, position: u32, supplier: NodeId) {
        let p = position as usize;
        let mut again = false;
        if let Some(b) = self.blocks.get_mut(&block)
            && let Some(h) = b.holders.get_mut(p)
        {
            if *h == Some(supplier)
                && let Some(view) = self.positions.get_mut(p)
                && view.supplier == Some(supplier)
            {
                again = !view.rebuilt.insert(block);
            }
            *h = Some(supplier);
        }
        if again {
            self.record(position, true);
        }
        self.set_cell(block, position, Cell::Unknown);
    }

    fn begin_round(&mut self, ctx: &Ctx, out: &mut Out<Self>) {
        self.summary.rounds += 1;
        self.waiting.clear();
        for position in 0..self.total {
            let Some(supplier) = self.supplier_at(position) else {
                continue;
            };
            if !self.is_up(position) {
                continue;
            }
            let view = &mut self.positions[position as usize];
            let due = view.since_listed.is_none_or(|n| n + 1 >= self.list_every);
            view.since_listed = Some(if due {
                0
            } else {
                view.since_listed.map_or(0, |n| n + 1)
            });
            if due {
                out.push(Output::List {
                    position,
                    supplier,
                    at_most: self.list_bound(),
                });
                self.waiting.insert((position, None), ctx.now);
            }
            for block in self.audit_sample(position) {
                out.push(Output::Audit {
                    block,
                    position,
                    supplier,
                });
                self.waiting.insert((position, Some(block)), ctx.now);
            }
        }
        // Nothing to ask (no supplier reachable): the round ends at once.
        let deadline = if self.waiting.is_empty() {
            ctx.now
        } else {
            ctx.now + self.round_deadline
        };
        out.state_timeout(Timer::RoundDeadline, deadline);
    }

    /// The most fragments an honest supplier can list for this owner: one per block at its
    /// position, as many again left at a position it held before (deleted in the background),
    /// and a page for what the monitor has not heard of yet. A longer list is not followed (a
    /// hostile supplier cannot fill the owner's memory with made-up ids: security review M3).
    fn list_bound(&self) -> usize {
        2 * self.blocks.len() + LIST_SLACK
    }

    /// The next blocks to audit at `position`: after the cursor, wrapping, held there.
    fn audit_sample(&mut self, position: u32) -> Vec<BlockId> {
        let supplier = self.supplier_at(position);
        let p = position as usize;
        let eligible = |b: &BlockInfo| {
            b.holders.get(p).copied().flatten().is_some()
                && b.holders[p] == supplier
                && b.cells[p] != Cell::Missing
        };
        let cursor = self.positions[p].cursor;
        let from = cursor.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let after = self
            .blocks
            .range::<BlockId, _>((from, std::ops::Bound::Unbounded));
        let mut picks: Vec<BlockId> = after
            .filter(|(_, b)| eligible(b))
            .map(|(id, _)| *id)
            .take(self.audits_per_round)
            .collect();
        if picks.len() < self.audits_per_round {
            let more: Vec<BlockId> = self
                .blocks
                .values()
                .filter(|b| eligible(b) && !picks.contains(&b.id))
                .map(|b| b.id)
                .take(self.audits_per_round - picks.len())
                .collect();
            picks.extend(more);
        }
        if let Some(last) = picks.last() {
            self.positions[p].cursor = Some(*last);
        }
        picks
    }

    fn decide(&mut self, ctx: &Ctx, out: &mut Out<Self>) {
        // A firing ends once its position is hired again and nothing there waits to be rebuilt.
        if let Some(p) = self.fired {
            let hired_again = self.positions[p as usize].up;
            if hired_again && !self.blocks.values().any(|b| self.needs(b, p)) {
                self.fired = None;
            }
        }
        if !self.dirty.is_empty() {
            let cells = std::mem::take(&mut self.dirty)
                .into_iter()
                .filter_map(|id| self.blocks.get(&id).map(|b| (id, b.cells.clone())))
                .collect();
            out.push(Output::SaveCells(cells));
        }
        if let Some((position, supplier, reason)) = self.fire_decision(ctx.now) {
            self.fired = Some(position);
            self.summary.fired.push((position, reason.to_string()));
            // The replacement starts with no history.
            self.positions[position as usize] = PositionView::default();
            out.push(Output::Fire {
                position,
                supplier,
                reason,
            });
        }
        let work = self.rebuild_work();
        self.summary.rebuild_queued = work.len() as u64;
        if !work.is_empty() {
            self.rebuilding = true;
            out.push(Output::Rebuild(work));
        }
        self.report(out);
    }

    fn report(&mut self, out: &mut Out<Self>) {
        let mut by_redundancy = BTreeMap::new();
        let mut cells: BTreeMap<String, u64> = BTreeMap::new();
        for b in self.blocks.values() {
            *by_redundancy.entry(self.redundancy(b)).or_insert(0) += 1;
            for c in &b.cells {
                *cells.entry(format!("{c:?}").to_lowercase()).or_insert(0) += 1;
            }
        }
        self.summary.blocks = self.blocks.len() as u64;
        self.summary.by_redundancy = by_redundancy;
        self.summary.cells = cells;
        out.push(Output::Report(self.summary.clone()));
    }

    fn schedule(&self, ctx: &Ctx, out: &mut Out<Self>) {
        // Also while a fired position waits for its replacement.
        let any_down = self.positions.iter().any(|p| !p.up);
        let wait = if any_down || self.rebuilding {
            self.fast_interval
        } else {
            self.interval
        };
        out.set_timer(Timer::Round, ctx.now + wait);
    }
}

use State::*;
use To::State as Go;

const LIVE: &[State] = &[AtStartup, Idle, Checking];
const RUNNING: &[State] = &[Idle, Checking];
const ROUND_DONE: To<Monitor> = To::Choose(Choice::RoundDone);

static ROWS: &[Row<Monitor>] = &[
    row(
        &[AtStartup],
        EventKind::Start,
        Go(Checking),
        &[Action::Note, Action::BeginRound],
    ),
    row(
        &[Idle],
        EventKind::Timeout,
        Go(Checking),
        &[Action::Note, Action::BeginRound],
    ),
    row(&[Checking], EventKind::Listed, ROUND_DONE, &[Action::Note]),
    row(&[Checking], EventKind::Audited, ROUND_DONE, &[Action::Note]),
    row(&[Checking], EventKind::Timeout, ROUND_DONE, &[Action::Note]),
    row(RUNNING, EventKind::Blocks, To::Stay, &[Action::Note]),
    row(RUNNING, EventKind::Position, To::Stay, &[Action::Note]),
    row(RUNNING, EventKind::Spares, To::Stay, &[Action::Note]),
    row(RUNNING, EventKind::Placed, To::Stay, &[Action::Note]),
    row(RUNNING, EventKind::RebuildIdle, To::Stay, &[Action::Note]),
    // Late answers of a round already decided still update the matrix.
    row(&[Idle], EventKind::Listed, To::Stay, &[Action::Note]),
    row(&[Idle], EventKind::Audited, To::Stay, &[Action::Note]),
    row(LIVE, EventKind::Shutdown, Go(Closed), &[]),
];

static ENTRY: &[super::machine::Entry<Monitor>] = &[super::machine::Entry {
    state: Idle,
    actions: &[Action::Decide, Action::Schedule],
}];

static CHOICES: &[ChoiceRow<Monitor>] = &[ChoiceRow {
    choice: Choice::RoundDone,
    targets: &[
        (Checking, "answers still awaited"),
        (Idle, "every answer in, or the round's deadline passed"),
    ],
}];

impl Machine for Monitor {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;
    type Choice = Choice;
    type Output = Output;

    const NAME: &'static str = "monitor";
    const ABOUT: &'static str = "Lists and audits what each supplier holds every round (faster while one is unreachable), keeps the health matrix, fires one supplier at a time when it stays unreachable or fails audits (never leaving a block unrebuildable), and hands the rebuilder its work.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
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

    fn guard(&self, guard: Guard, _: &Event, _: &Ctx) -> bool {
        match guard {}
    }

    fn choose(&self, _choice: Choice, _: &Ctx) -> State {
        if self.waiting.is_empty() {
            Idle
        } else {
            Checking
        }
    }

    fn apply(&mut self, action: Action, event: &Event, ctx: &Ctx, out: &mut Out<Self>) {
        match action {
            Action::Note => self.note(event, ctx),
            Action::BeginRound => self.begin_round(ctx, out),
            Action::Decide => self.decide(ctx, out),
            Action::Schedule => self.schedule(ctx, out),
        }
    }

    fn invariant(&self, state: State) -> Result<(), Violation> {
        if state == Idle && !self.waiting.is_empty() {
            return Err("idle while answers are awaited".into());
        }
        for b in self.blocks.values() {
            if b.cells.len() != self.total as usize || b.holders.len() != self.total as usize {
                return Err("a block's row has the wrong width".into());
            }
        }
        Ok(())
    }

    fn sample_events() -> Vec<Event> {
        let a = NodeId::from_signing_key(&[1; 32]);
        let b = NodeId::from_signing_key(&[2; 32]);
        let block = BlockInfo {
            id: [7; 32],
            layout: Layout::new(1, 1).expect("valid"),
            holders: vec![Some(a), Some(b)],
            cells: vec![Cell::Unknown, Cell::Unknown],
            newest: 1,
            catalog: false,
        };
        vec![
            Event::Start {
                layout: Layout::new(1, 1).expect("valid"),
                blocks: vec![block.clone()],
                suppliers: vec![Some(a), Some(b)],
            },
            Event::Blocks(vec![block]),
            Event::Position {
                position: 0,
                supplier: a,
                up: true,
            },
            Event::Position {
                position: 1,
                supplier: b,
                up: false,
            },
            Event::Spares(1),
            Event::Listed {
                position: 0,
                supplier: a,
                held: Some([[7; 32]].into_iter().collect()),
            },
            Event::Listed {
                position: 0,
                supplier: a,
                held: None,
            },
            Event::Audited {
                block: [7; 32],
                position: 0,
                supplier: a,
                result: AuditResult::Corrupt,
            },
            Event::Audited {
                block: [7; 32],
                position: 0,
                supplier: a,
                result: AuditResult::Passed,
            },
            Event::Placed {
                block: [7; 32],
                position: 1,
                supplier: b,
            },
            Event::RebuildIdle,
            Event::Timeout(Timer::Round),
            Event::Timeout(Timer::RoundDeadline),
            Event::Shutdown,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::machine::Instance;

    fn id(n: u8) -> NodeId {
        NodeId::from_signing_key(&[n; 32])
    }

    fn at(secs: u64) -> Ctx {
        Ctx::at(Duration::from_secs(secs))
    }

    fn block(n: u8, newest: u64, catalog: bool) -> BlockInfo {
        BlockInfo {
            id: [n; 32],
            layout: Layout::default(),
            holders: (1..=6).map(|s| Some(id(s))).collect(),
            cells: vec![Cell::Present; 6],
            newest,
            catalog,
        }
    }

    /// 4 + 2, suppliers 1..=6 at positions 0..=5, all reachable, three blocks, fire after 100 s.
    fn started() -> Instance<Monitor> {
        let mut m = Instance::new(
            Monitor::new(Duration::from_secs(10), Duration::from_secs(100), 3, 2),
            "0",
        );
        m.step(
            &Event::Start {
                layout: Layout::default(),
                blocks: vec![block(1, 1, false), block(2, 2, false), block(3, 1, true)],
                suppliers: (1..=6).map(|s| Some(id(s))).collect(),
            },
            &at(0),
        );
        for p in 0..6u32 {
            m.step(&position(p, p as u8 + 1, true), &at(0));
        }
        m.step(&Event::Spares(2), &at(0));
        m
    }

    fn position(position: u32, supplier: u8, up: bool) -> Event {
        Event::Position {
            position,
            supplier: id(supplier),
            up,
        }
    }

    fn fail_audits(m: &mut Instance<Monitor>, position: u32, times: u32) {
        for _ in 0..times {
            m.step(
                &Event::Audited {
                    block: [1; 32],
                    position,
                    supplier: id(position as u8 + 1),
                    result: AuditResult::Corrupt,
                },
                &at(1),
            );
        }
    }

    #[test]
    fn an_unreachable_supplier_is_fired_after_fire_after_and_only_then() {
        let mut m = started();
        m.step(&position(1, 2, false), &at(10));
        assert_eq!(m.machine.fire_decision(Duration::from_secs(109)), None);
        let (p, s, reason) = m
            .machine
            .fire_decision(Duration::from_secs(110))
            .expect("fired");
        assert_eq!((p, s), (1, id(2)));
        assert_eq!(reason, FireReason::Unreachable(Duration::from_secs(100)));
    }

    #[test]
    fn with_m_unreachable_a_failing_reachable_supplier_is_not_fired() {
        let mut m = started();
        m.step(&position(0, 1, false), &at(0));
        m.step(&position(1, 2, false), &at(0));
        // Position 2 failed a few of its audits, not half (cells untouched here, so every block
        // counts on it).
        for i in 0..12 {
            m.machine.record(2, i < 3);
        }
        assert!(!m.machine.suspect(2));
        // Firing it would leave every block 3 good reachable fragments (k = 4).
        assert!(!m.machine.fire_is_safe(2));
        // Before fire_after nobody is fired.
        assert_eq!(m.machine.fire_decision(Duration::from_secs(50)), None);
        // After it, an unreachable one is (the rest keep k reachable), never position 2.
        let (p, _, _) = m
            .machine
            .fire_decision(Duration::from_secs(200))
            .expect("fired");
        assert_eq!(p, 0);
        // Once position 2 fails half its audits, its fragments no longer count: firing position
        // 0 would leave 3 trusted fragments of k = 4, and position 2 is guarded as before.
        for _ in 0..9 {
            m.machine.record(2, true);
        }
        assert!(m.machine.suspect(2));
        assert!(!m.machine.fire_is_safe(2));
        assert!(!m.machine.fire_is_safe(0));
        assert_eq!(m.machine.fire_decision(Duration::from_secs(200)), None);
    }

    #[test]
    fn with_more_than_m_unreachable_nobody_is_fired() {
        let mut m = started();
        for p in 0..3 {
            m.step(&position(p, p as u8 + 1, false), &at(0));
        }
        assert_eq!(m.machine.fire_decision(Duration::from_secs(10_000)), None);
    }

    /// Answers every audit of a round, position 2 after `slow_ms`, the others after 20 ms.
    fn answer_round(m: &mut Instance<Monitor>, start_secs: u64, slow_ms: u64) {
        let start = Duration::from_secs(start_secs);
        let s = m
            .step(&Event::Timeout(Timer::Round), &Ctx::at(start))
            .expect("a round");
        for o in s.outputs {
            if let Output::Audit {
                block,
                position,
                supplier,
            } = o
            {
                let took = if position == 2 { slow_ms } else { 20 };
                m.step(
                    &Event::Audited {
                        block,
                        position,
                        supplier,
                        result: AuditResult::Passed,
                    },
                    &Ctx::at(start + Duration::from_millis(took)),
                );
            }
        }
    }

    #[test]
    fn a_supplier_always_slow_to_answer_audits_is_named_and_a_new_one_starts_afresh() {
        let mut m = started();
        for round in 0..3 {
            answer_round(&mut m, 10 + 10 * round, 4_000);
        }
        let latency = &m.machine.latency;
        assert_eq!(latency.slow(), BTreeSet::from([2]));
        assert_eq!(latency.typical(0), Some(Duration::from_millis(20)));
        assert!(latency.typical(2) > Some(Duration::from_secs(3)));
        // A restore's report of a fetch (not an audit this round asked) is not timed.
        m.step(
            &Event::Audited {
                block: [1; 32],
                position: 0,
                supplier: id(1),
                result: AuditResult::Refused,
            },
            &at(500),
        );
        assert_eq!(
            m.machine.latency.typical(0),
            Some(Duration::from_millis(20))
        );
        // Another supplier at position 2: its figures start afresh.
        m.step(&position(2, 9, true), &at(501));
        assert!(m.machine.latency.slow().is_empty());
        assert_eq!(m.machine.latency.typical(2), None);
    }

    #[test]
    fn one_firing_at_a_time_until_its_position_is_rebuilt() {
        let mut m = started();
        m.step(&position(0, 1, false), &at(0));
        m.step(&position(1, 2, false), &at(0));
        // The round ends after fire_after: one firing.
        let s = m
            .step(&Event::Timeout(Timer::RoundDeadline), &at(150))
            .expect("stepped");
        let fires: Vec<_> = s
            .outputs
            .iter()
            .filter(|o| matches!(o, Output::Fire { .. }))
            .collect();
        assert_eq!(fires.len(), 1, "{:?}", s.outputs);
        assert_eq!(m.machine.fired, Some(0));
        assert_eq!(m.machine.fire_decision(Duration::from_secs(1000)), None);
        // A replacement is hired: every block is to be rebuilt there, from the 4 reachable.
        m.step(&position(0, 7, true), &at(151));
        let work = m.machine.rebuild_work();
        assert_eq!(work.len(), 3);
        assert!(work[0].catalog, "the catalog first");
        assert!(work.iter().all(|t| t.targets == vec![(0, id(7))]));
        // The 4 reachable holders first; the unreachable one only as a last resort.
        for t in &work {
            let positions: Vec<u32> = t.sources.iter().map(|(p, _)| *p).collect();
            assert_eq!(positions, vec![2, 3, 4, 5, 1]);
        }
        for t in &work {
            m.step(
                &Event::Placed {
                    block: t.block,
                    position: 0,
                    supplier: id(7),
                },
                &at(152),
            );
        }
        assert!(m.machine.rebuild_work().is_empty());
        // The next round ends the firing; the second unreachable one is fired then.
        m.step(&Event::Timeout(Timer::Round), &at(160));
        let s = m
            .step(&Event::Timeout(Timer::RoundDeadline), &at(161))
            .expect("stepped");
        assert!(
            s.outputs
                .iter()
                .any(|o| matches!(o, Output::Fire { position: 1, .. })),
            "{:?}",
            s.outputs
        );
    }

    #[test]
    fn audits_and_lists_mark_cells_and_the_rebuild_goes_to_the_same_supplier() {
        let mut m = started();
        m.step(
            &Event::Audited {
                block: [2; 32],
                position: 3,
                supplier: id(4),
                result: AuditResult::Corrupt,
            },
            &at(1),
        );
        m.step(
            &Event::Listed {
                position: 5,
                supplier: id(6),
                held: Some([[1; 32], [2; 32]].into_iter().collect()),
            },
            &at(1),
        );
        assert_eq!(m.machine.blocks[&[2; 32]].cells[3], Cell::Corrupt);
        assert_eq!(m.machine.blocks[&[3; 32]].cells[5], Cell::Missing);
        let work = m.machine.rebuild_work();
        // Block 3 (catalog) first, then block 2.
        assert_eq!(work.len(), 2);
        assert_eq!(work[0].block, [3; 32]);
        assert_eq!(work[0].targets, vec![(5, id(6))]);
        assert_eq!(work[1].targets, vec![(3, id(4))]);
        assert!(!work[1].sources.iter().any(|(p, _)| *p == 3));
        // A corrupt fragment is not yet a reason to fire; three failures in a row are.
        assert_eq!(m.machine.fire_decision(Duration::from_secs(2)), None);
        fail_audits(&mut m, 3, 2);
        assert_eq!(m.machine.positions[3].failed_audits, 3);
        let (p, _, reason) = m
            .machine
            .fire_decision(Duration::from_secs(2))
            .expect("fired");
        assert_eq!((p, reason), (3, FireReason::FailedAudits(3)));
    }

    #[test]
    fn audits_walk_every_block_over_rounds() {
        let mut m = started();
        // The first round (at start) ends.
        m.step(&Event::Timeout(Timer::RoundDeadline), &at(1));
        let mut seen = BTreeSet::new();
        for round in 0..3 {
            let s = m
                .step(&Event::Timeout(Timer::Round), &at(20 + round))
                .expect("stepped");
            for o in &s.outputs {
                if let Output::Audit {
                    block, position: 0, ..
                } = o
                {
                    seen.insert(*block);
                }
            }
            m.step(&Event::Timeout(Timer::RoundDeadline), &at(21 + round));
        }
        assert_eq!(
            seen.len(),
            3,
            "2 audits a round reach all 3 blocks in 2 rounds"
        );
    }

    #[test]
    fn a_supplier_lists_every_sixth_round_and_when_it_comes_back() {
        let lists = |s: &crate::fsm::Stepped<Monitor>| {
            s.outputs
                .iter()
                .filter(|o| matches!(o, Output::List { position: 0, .. }))
                .count()
        };
        let mut m = started();
        m.step(&Event::Timeout(Timer::RoundDeadline), &at(1));
        let mut listed = 0;
        for round in 0..11 {
            let s = m
                .step(&Event::Timeout(Timer::Round), &at(10 + 2 * round))
                .expect("round");
            listed += lists(&s);
            m.step(&Event::Timeout(Timer::RoundDeadline), &at(11 + 2 * round));
        }
        // Up after the start round: listed at the first round, then six rounds later only.
        assert_eq!(listed, 2);
        // Down and back: listed at the next round.
        m.step(&position(0, 1, false), &at(40));
        m.step(&position(0, 1, true), &at(41));
        let s = m
            .step(&Event::Timeout(Timer::Round), &at(50))
            .expect("round");
        assert_eq!(lists(&s), 1);
    }

    #[test]
    fn a_replacement_lost_before_its_rebuild_is_fired_in_turn() {
        let mut m = started();
        m.step(&position(0, 1, false), &at(0));
        m.step(&Event::Timeout(Timer::RoundDeadline), &at(150));
        assert_eq!(m.machine.fired, Some(0));
        // The replacement never comes up; another position goes down too.
        m.step(&position(0, 7, false), &at(151));
        m.step(&position(1, 2, false), &at(151));
        let (p, s, _) = m
            .machine
            .fire_decision(Duration::from_secs(400))
            .expect("the failed replacement is fired");
        assert_eq!((p, s), (0, id(7)));
    }

    #[test]
    fn without_spares_nobody_is_fired() {
        let mut m = started();
        m.step(&Event::Spares(0), &at(0));
        m.step(&position(0, 1, false), &at(0));
        assert_eq!(m.machine.fire_decision(Duration::from_secs(1000)), None);
    }

    #[test]
    fn each_block_is_guarded_by_its_own_k_after_the_layout_changed() {
        // Blocks made with 4 + 2; the node was then set to 3 + 3 (same six positions).
        let mut m = Instance::new(
            Monitor::new(Duration::from_secs(10), Duration::from_secs(100), 3, 2),
            "0",
        );
        let old = block(1, 1, false);
        let new = BlockInfo {
            layout: Layout::new(3, 3).expect("valid"),
            ..block(2, 2, false)
        };
        m.step(
            &Event::Start {
                layout: Layout::new(3, 3).expect("valid"),
                blocks: vec![old.clone()],
                suppliers: (1..=6).map(|s| Some(id(s))).collect(),
            },
            &at(0),
        );
        for p in 0..6u32 {
            m.step(&position(p, p as u8 + 1, true), &at(0));
        }
        m.step(&Event::Spares(2), &at(0));
        // Two positions unreachable: the old block has 4 good fragments reachable, its own k.
        m.step(&position(0, 1, false), &at(0));
        m.step(&position(1, 2, false), &at(0));
        for i in 0..12 {
            m.machine.record(2, i < 3);
        }
        // Firing position 2 would leave it 3: enough for the node's k = 3, not for the block's 4.
        assert!(!m.machine.fire_is_safe(2));
        assert_eq!(m.machine.redundancy(&old), 0);
        assert_eq!(m.machine.fire_decision(Duration::from_secs(50)), None);
        // A block made with 3 + 3 needs only 3: with it alone, position 2 may go.
        m.step(&Event::Blocks(vec![new.clone()]), &at(1));
        assert!(m.machine.fire_is_safe(2));
        assert_eq!(m.machine.redundancy(&new), 1);
        // Both followed: the old block's k still decides.
        m.step(&Event::Blocks(vec![old, new]), &at(2));
        assert!(!m.machine.fire_is_safe(2));
    }

    fn audited(m: &mut Instance<Monitor>, block: u8, position: u32, result: AuditResult, t: u64) {
        m.step(
            &Event::Audited {
                block: [block; 32],
                position,
                supplier: id(position as u8 + 1),
                result,
            },
            &at(t),
        );
    }

    /// Ends the round under way (begins one first when idle); the decision's outputs.
    fn round_end(m: &mut Instance<Monitor>, t: u64) -> Vec<Output> {
        if m.state() == Idle {
            m.step(&Event::Timeout(Timer::Round), &at(t));
        }
        m.step(&Event::Timeout(Timer::RoundDeadline), &at(t))
            .map(|s| s.outputs)
            .unwrap_or_default()
    }

    fn fired(outputs: &[Output]) -> Option<u32> {
        outputs.iter().find_map(|o| match o {
            Output::Fire { position, .. } => Some(*position),
            _ => None,
        })
    }

    /// H1: a supplier that answers challenges with anything but a proof fails them; its
    /// fragments stop counting at the first failure (the source shows the loss), and it is fired
    /// after `fire_after_failed_audits` of them.
    #[test]
    fn refused_challenges_are_failed_audits_and_the_loss_shows_at_once() {
        let mut m = started();
        let b = m.machine.blocks[&[1; 32]].clone();
        assert_eq!(m.machine.redundancy(&b), 2);
        audited(&mut m, 1, 2, AuditResult::Refused, 1);
        assert_eq!(m.machine.positions[2].failed_audits, 1);
        // Every block (not only the one audited) loses position 2's fragment.
        for b in m.machine.blocks.values() {
            assert_eq!(m.machine.redundancy(b), 1, "{:?}", b.id);
        }
        assert_eq!(fired(&round_end(&mut m, 2)), None);
        audited(&mut m, 2, 2, AuditResult::Refused, 3);
        audited(&mut m, 3, 2, AuditResult::Refused, 3);
        assert_eq!(fired(&round_end(&mut m, 4)), Some(2));
        assert_eq!(
            m.machine.summary.fired,
            vec![(2, "failed 3 of its recent storage audits".to_string())]
        );
    }

    /// H1: a list is a claim. A listed fragment never becomes present; only a proof does.
    #[test]
    fn a_list_never_marks_a_fragment_present() {
        let mut m = started();
        m.machine.blocks.get_mut(&[1; 32]).expect("block").cells[4] = Cell::Missing;
        m.machine.blocks.get_mut(&[2; 32]).expect("block").cells[4] = Cell::Unknown;
        m.step(
            &Event::Listed {
                position: 4,
                supplier: id(5),
                held: Some([[1; 32], [2; 32], [3; 32]].into_iter().collect()),
            },
            &at(1),
        );
        assert_eq!(m.machine.blocks[&[1; 32]].cells[4], Cell::Unknown);
        assert_eq!(m.machine.blocks[&[2; 32]].cells[4], Cell::Unknown);
        audited(&mut m, 2, 4, AuditResult::Passed, 2);
        assert_eq!(m.machine.blocks[&[2; 32]].cells[4], Cell::Present);
    }

    /// Firing is on a rate over a window: passes in between do not reset the count (they did:
    /// "in a row").
    #[test]
    fn a_few_passes_do_not_hide_many_failures() {
        let mut m = started();
        for (t, result) in [
            AuditResult::Corrupt,
            AuditResult::Passed,
            AuditResult::NotFound,
            AuditResult::Corrupt,
            AuditResult::Passed,
            AuditResult::Refused,
        ]
        .into_iter()
        .enumerate()
        {
            audited(&mut m, 1 + (t % 3) as u8, 0, result, t as u64);
        }
        assert_eq!(m.machine.positions[0].failed_audits, 4);
        assert_eq!(fired(&round_end(&mut m, 10)), Some(0));
    }

    /// But a supplier that mostly passes is not fired for a few failures.
    #[test]
    fn a_supplier_passing_most_audits_is_not_fired() {
        let mut m = started();
        for t in 0..12u64 {
            let result = if t % 3 == 0 {
                AuditResult::Corrupt
            } else {
                AuditResult::Passed
            };
            audited(&mut m, 1 + (t % 3) as u8, 0, result, t);
        }
        assert_eq!(m.machine.positions[0].failed_audits, 4);
        assert!(!m.machine.suspect(0));
        assert_eq!(fired(&round_end(&mut m, 20)), None);
    }

    /// M6: "try later" is not a failure until it has lasted `busy_grace`; then it is.
    #[test]
    fn try_later_counts_only_once_it_persists() {
        let mut m = started();
        assert_eq!(m.machine.busy_grace, Duration::from_secs(60));
        for t in [1, 20, 40, 60] {
            audited(&mut m, 1, 3, AuditResult::Busy, t);
        }
        assert_eq!(m.machine.positions[3].failed_audits, 0);
        assert_eq!(m.machine.blocks[&[1; 32]].cells[3], Cell::Present);
        // Any other answer ends the episode: it starts again from the next "try later".
        audited(&mut m, 2, 3, AuditResult::Passed, 65);
        audited(&mut m, 1, 3, AuditResult::Busy, 70);
        audited(&mut m, 1, 3, AuditResult::Busy, 129);
        assert_eq!(m.machine.positions[3].failed_audits, 0);
        audited(&mut m, 1, 3, AuditResult::Busy, 130);
        assert_eq!(m.machine.positions[3].failed_audits, 1);
        assert_eq!(m.machine.blocks[&[1; 32]].cells[3], Cell::Missing);
    }

    /// M4: a supplier that leaves fragments out of its list fails an audit for each, and a
    /// fragment rebuilt on it a second time is one more: dropping 2/3 of its data gets it fired,
    /// not rebuilt every round forever.
    #[test]
    fn list_omissions_and_repeated_rebuilds_count_toward_firing() {
        let mut m = started();
        let keeps: BTreeSet<BlockId> = [[1; 32]].into_iter().collect();
        let list = |m: &mut Instance<Monitor>, t| {
            m.step(
                &Event::Listed {
                    position: 2,
                    supplier: id(3),
                    held: Some(keeps.clone()),
                },
                &at(t),
            )
        };
        list(&mut m, 1);
        assert_eq!(m.machine.positions[2].failed_audits, 2);
        audited(&mut m, 1, 2, AuditResult::Passed, 1);
        assert_eq!(fired(&round_end(&mut m, 2)), None);
        // The rebuilder puts both back on it (a first rebuild: no failure).
        for b in [2u8, 3] {
            m.step(
                &Event::Placed {
                    block: [b; 32],
                    position: 2,
                    supplier: id(3),
                },
                &at(3),
            );
        }
        assert_eq!(m.machine.positions[2].failed_audits, 2);
        // It drops them again: omitted (2 more), and rebuilt again (a second rebuild each).
        m.step(&Event::Timeout(Timer::Round), &at(10));
        list(&mut m, 11);
        assert_eq!(m.machine.positions[2].failed_audits, 4);
        m.step(
            &Event::Placed {
                block: [2; 32],
                position: 2,
                supplier: id(3),
            },
            &at(11),
        );
        assert_eq!(m.machine.positions[2].failed_audits, 5);
        assert_eq!(fired(&round_end(&mut m, 12)), Some(2));
    }

    /// A block committed after the list was asked for is not held against the supplier.
    #[test]
    fn a_block_newer_than_the_list_is_not_an_omission() {
        let mut m = started();
        let mut blocks: Vec<BlockInfo> = m.machine.blocks.values().cloned().collect();
        blocks.push(block(4, 3, false));
        m.step(&Event::Blocks(blocks), &at(1));
        m.step(
            &Event::Listed {
                position: 2,
                supplier: id(3),
                held: Some([[1; 32], [2; 32], [3; 32]].into_iter().collect()),
            },
            &at(1),
        );
        assert_eq!(m.machine.positions[2].failed_audits, 0);
        assert_eq!(m.machine.blocks[&[4; 32]].cells[2], Cell::Missing);
    }

    #[test]
    fn rebuild_work_carries_the_blocks_own_layout() {
        let mut m = started();
        m.step(&position(0, 7, true), &at(1));
        let work = m.machine.rebuild_work();
        assert!(!work.is_empty());
        assert!(work.iter().all(|t| t.layout == Layout::default()));
    }
}
