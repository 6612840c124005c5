//! restore_worker: one restore of one version. The table is the job's lifecycle; which fragment to
//! ask of whom is decided by the pure [`Fetches`] beside it.
//!
//! For each block the restore needs (in the order files need them, a bounded number at once) it
//! asks for `k` fragments — data positions first, since a block whose data fragments all arrive
//! is decoded without Reed-Solomon arithmetic — and asks another position (parity) only for a
//! fragment that fails: unreachable, timed out, or not matching its hash in the owner-signed
//! manifest. The original fetched all `k + m` fragments of every block; we fetch `k`. A request
//! outstanding past `hedge_after` is hedged by one more position on the progress tick. The rule
//! is `fsm::fetch::Plan`'s, one per block.
//!
//! The driver runs the file writer on a thread of its own; it hands blocks to it as they are
//! decoded, says when the writer consumed one (which frees a place in the window) or wants one
//! again (its cache evicted it), and reports when the writer finished.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::fetch::{Latency, Plan};
use super::machine::{ChoiceRow, Ctx, Machine, Out, Row, TimerRow, To, Violation, row};
use crate::{events, labels};

/// A fragment request outstanding this long is hedged (the driver sets a bound from its request
/// timeout).
pub const HEDGE_AFTER: Duration = Duration::from_secs(10);

/// A block's id (see `data::BlockId`).
pub type BlockId = [u8; 32];

labels! {
    pub enum State { AtStartup, Fetching, Finishing, Done, Aborted, Failed }
}

events! {
    pub enum Event / EventKind {
        /// Begin: the blocks in the order files need them, each with its layout size, and the
        /// positions known to be unreachable now.
        Start { blocks: Vec<(BlockId, u32, u32)>, down: Vec<u32> },
        /// A fragment arrived and matches the manifest.
        FragmentOk { block: BlockId, position: u32 },
        /// A fragment could not be had (`corrupt`: it arrived and failed its hash).
        FragmentFailed { block: BlockId, position: u32, corrupt: bool },
        /// A block was decoded and handed to the writer.
        Decoded { block: BlockId },
        /// `k` good fragments did not decode (AEAD failure): the block is lost to this restore.
        DecodeFailed { block: BlockId },
        /// The writer took a block (a place in the window is free).
        Consumed { block: BlockId },
        /// The writer needs a block again (evicted from its cache).
        Want { block: BlockId },
        /// The writer finished every file (`failed`: files it could not restore).
        WriterDone { failed: u64 },
        SupplierDown(u32),
        SupplierUp(u32),
        /// The writer or the target failed as a whole (disk full, cannot create the target).
        Fatal(String),
        Timeout(Timer),
        Shutdown,
    }
}

labels! {
    pub enum Guard {}
}

labels! {
    pub enum Action {
        /// Update the fetch ledger from the event; ask for fragments, decode, give up blocks.
        Note,
        /// Ask one more position beside each fragment request outstanding past the latency
        /// bound (`hedge_after`) instead of waiting for its whole request timeout.
        Hedge,
        /// Report the figures for `status`.
        Report,
        /// Stop fetching and writing (IO).
        Cancel,
        /// Report how the restore ended (IO).
        Finish,
    }
}

labels! {
    pub enum Timer { Progress }
}

labels! {
    pub enum Choice { Fetched }
}

/// How a restore ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every file restored.
    Complete,
    /// Some files could not be restored (named by the writer); the rest are.
    Partial,
    Failed(String),
    /// The node stopped; the restore can be run again and skips what is complete.
    Interrupted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Ask the supplier at `position` for this fragment.
    Fetch {
        block: BlockId,
        position: u32,
    },
    /// `k` good fragments are in: decode the block and hand it to the writer.
    Decode {
        block: BlockId,
    },
    /// The block cannot be had: the writer fails the files that need it.
    GiveUp {
        block: BlockId,
    },
    Progress(Progress),
    Cancel,
    Finished(Outcome),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub blocks: u64,
    pub decoded: u64,
    pub lost: u64,
    /// Fragments asked for, and of those beyond the first `k` per block (parity fetched because
    /// something failed).
    pub fragments_asked: u64,
    pub extra_fragments: u64,
    /// Fragments that arrived and failed their hash, per position.
    pub corrupt: BTreeMap<u32, u64>,
    /// Positions whose supplier answers much slower than the others (asked last).
    pub slow: BTreeSet<u32>,
}

/// Which blocks are being fetched, which wait, which are done.
#[derive(Debug, Clone, Default)]
pub struct Fetches {
    /// Blocks in flight (fetching, decoding, or decoded and not yet taken by the writer), at most.
    pub window: usize,
    queue: VecDeque<(BlockId, u32, u32)>,
    layouts: BTreeMap<BlockId, (u32, u32)>,
    active: BTreeMap<BlockId, Plan>,
    /// Decoding or decoded, not yet consumed.
    held: BTreeSet<BlockId>,
    done: BTreeSet<BlockId>,
    lost: BTreeSet<BlockId>,
    /// Blocks the writer asked for again: fetched at once, past the window (the writer waits
    /// for them, and the window may be full of blocks it needs later).
    wanted: BTreeSet<BlockId>,
    down: BTreeSet<u32>,
    /// The most a fragment request may be outstanding before one more position is asked beside
    /// it; sooner for a supplier that usually answers faster (see [`Latency::bound`]).
    pub hedge_after: Duration,
    /// Observed answer times per position.
    pub latency: Latency,
    /// When each outstanding request was asked (also after its block completed: a hedged
    /// request's late answer still says how slow its supplier is).
    asked_at: BTreeMap<(BlockId, u32), Duration>,
    pub progress: Progress,
}

impl Fetches {
    pub fn new(window: usize) -> Self {
        Fetches {
            window: window.max(1),
            hedge_after: HEDGE_AFTER,
            ..Fetches::default()
        }
    }

    fn in_flight(&self) -> usize {
        self.active.len() + self.held.len()
    }

    /// Every block is decoded (and consumed) or given up, and nothing is queued.
    pub fn finished(&self) -> bool {
        self.queue.is_empty() && self.active.is_empty() && self.held.is_empty()
    }

    pub fn start(&mut self, blocks: Vec<(BlockId, u32, u32)>, down: Vec<u32>) {
        self.progress.blocks = blocks.len() as u64;
        for (block, k, total) in &blocks {
            self.layouts.insert(*block, (*k, *total));
        }
        self.queue = blocks.into();
        self.down = down.into_iter().collect();
    }

    /// Starts blocks while the window allows; returns the fragments to ask for.
    pub fn fill(&mut self, now: Duration) -> Vec<(BlockId, u32)> {
        let mut asks = Vec::new();
        while self.in_flight() < self.window {
            let Some((block, k, total)) = self.queue.pop_front() else {
                break;
            };
            if self.active.contains_key(&block) || self.held.contains(&block) {
                continue;
            }
            self.active.insert(block, Plan::layout(k, total));
            asks.extend(self.ask(block, now));
        }
        asks
    }

    fn ask(&mut self, block: BlockId, now: Duration) -> Vec<(BlockId, u32)> {
        let Some(plan) = self.active.get_mut(&block) else {
            return Vec::new();
        };
        // Known-down and known-slow suppliers are asked only when nothing else is left.
        let avoid: BTreeSet<u32> = self.down.union(&self.progress.slow).copied().collect();
        let picks = plan.next(&avoid, now);
        self.asked(block, picks, now)
    }

    /// An answer (good or not) from `position` for `block`: its latency is observed.
    fn observe(&mut self, block: BlockId, position: u32, now: Duration) {
        if let Some(at) = self.asked_at.remove(&(block, position)) {
            self.latency.observe(position, now.saturating_sub(at));
            self.progress.slow = self.latency.slow();
        }
    }

    fn asked(&mut self, block: BlockId, picks: Vec<u32>, now: Duration) -> Vec<(BlockId, u32)> {
        let k = self.layouts.get(&block).map_or(0, |(k, _)| *k);
        for p in &picks {
            self.asked_at.insert((block, *p), now);
            self.progress.fragments_asked += 1;
            if *p >= k {
                self.progress.extra_fragments += 1;
            }
        }
        picks.into_iter().map(|p| (block, p)).collect()
    }

    /// Requests outstanding past `hedge_after` at `now`: one more position beside each.
    pub fn hedge(&mut self, now: Duration) -> Vec<(BlockId, u32)> {
        let mut asks = Vec::new();
        let blocks: Vec<BlockId> = self.active.keys().copied().collect();
        for block in blocks {
            let Some(plan) = self.active.get_mut(&block) else {
                continue;
            };
            let avoid: BTreeSet<u32> = self.down.union(&self.progress.slow).copied().collect();
            let (latency, cap) = (&self.latency, self.hedge_after);
            let overdue = plan.overdue_by(now, |p| latency.bound(p, cap));
            let picks = plan.hedge_by(&avoid, now, |p| latency.bound(p, cap));
            // A request past its bound took at least this long: observed now (its answer may
            // come after the block, or the whole restore, is done).
            for p in overdue {
                if let Some(at) = self.asked_at.get(&(block, p)) {
                    self.latency.observe(p, now.saturating_sub(*at));
                }
            }
            self.progress.slow = self.latency.slow();
            asks.extend(self.asked(block, picks, now));
        }
        asks
    }

    /// A good fragment: returns whether the block now has `k` (decode it).
    pub fn fragment_ok(&mut self, block: BlockId, position: u32, now: Duration) -> bool {
        self.observe(block, position, now);
        let Some(plan) = self.active.get_mut(&block) else {
            return false;
        };
        if !plan.ok(position) {
            return false;
        }
        if plan.complete() {
            self.active.remove(&block);
            self.held.insert(block);
            return true;
        }
        false
    }

    /// A failed fragment: asks another position, or gives the block up when none is left.
    /// Returns (fragments to ask, whether the block is lost).
    pub fn fragment_failed(
        &mut self,
        block: BlockId,
        position: u32,
        corrupt: bool,
        now: Duration,
    ) -> (Vec<(BlockId, u32)>, bool) {
        self.observe(block, position, now);
        let Some(plan) = self.active.get_mut(&block) else {
            return (Vec::new(), false);
        };
        if !plan.failed(position) {
            return (Vec::new(), false);
        }
        if corrupt {
            *self.progress.corrupt.entry(position).or_default() += 1;
        }
        if self.active.get(&block).is_some_and(Plan::hopeless) {
            self.active.remove(&block);
            self.lost.insert(block);
            self.progress.lost += 1;
            return (Vec::new(), true);
        }
        let asks = self.ask(block, now);
        (asks, false)
    }

    pub fn decoded(&mut self, block: BlockId) {
        if self.held.contains(&block) {
            self.done.insert(block);
            self.progress.decoded += 1;
        }
    }

    /// A block that did not decode from `k` fragments that matched the manifest.
    pub fn decode_failed(&mut self, block: BlockId) {
        if self.held.remove(&block) {
            self.lost.insert(block);
            self.progress.lost += 1;
        }
    }

    pub fn consumed(&mut self, block: BlockId) {
        self.held.remove(&block);
        self.wanted.remove(&block);
    }

    /// The writer needs a block now (evicted from its cache, or not started yet): fetched at
    /// once. Returns the fragments to ask for.
    pub fn want(&mut self, block: BlockId, now: Duration) -> Vec<(BlockId, u32)> {
        if self.active.contains_key(&block)
            || self.held.contains(&block)
            || self.lost.contains(&block)
        {
            return Vec::new();
        }
        let Some((k, total)) = self.layouts.get(&block).copied() else {
            return Vec::new();
        };
        self.done.remove(&block);
        self.queue.retain(|(b, _, _)| *b != block);
        self.wanted.insert(block);
        self.active.insert(block, Plan::layout(k, total));
        self.ask(block, now)
    }

    /// Whether the block is part of this restore (the catalog had its record).
    pub fn knows(&self, block: &BlockId) -> bool {
        self.layouts.contains_key(block)
    }

    pub fn is_lost(&self, block: &BlockId) -> bool {
        self.lost.contains(block)
    }

    pub fn supplier_down(&mut self, position: u32) {
        self.down.insert(position);
    }

    pub fn supplier_up(&mut self, position: u32) {
        self.down.remove(&position);
    }

    /// No block asks for more fragments than it needs: at most `k` good-or-asked at once, plus
    /// one per hedged (slow) request.
    pub fn check(&self) -> Result<(), Violation> {
        for plan in self.active.values() {
            plan.check().map_err(|e| Violation::from(e.to_string()))?;
        }
        if self.in_flight() > self.window + self.wanted.len() {
            return Err(format!(
                "{} blocks in flight, window {}",
                self.in_flight(),
                self.window
            )
            .into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct RestoreWorker {
    pub fetches: Fetches,
    pub progress_every: Duration,
    writer_failed: Option<u64>,
}

impl Default for RestoreWorker {
    fn default() -> Self {
        RestoreWorker {
            fetches: Fetches::new(4),
            progress_every: Duration::from_secs(1),
            writer_failed: None,
        }
    }
}

impl RestoreWorker {
    pub fn with_window(window: usize) -> Self {
        RestoreWorker {
            fetches: Fetches::new(window),
            ..RestoreWorker::default()
        }
    }

    /// Hedges a fragment request outstanding `bound` (see [`Fetches::hedge`]).
    pub fn hedging_after(mut self, bound: Duration) -> Self {
        self.fetches.hedge_after = bound;
        self
    }
}

use State::*;
use To::State as Go;

const LIVE: &[State] = &[AtStartup, Fetching, Finishing];
const WORKING: &[State] = &[Fetching, Finishing];
const FETCHED: To<RestoreWorker> = To::Choose(Choice::Fetched);

static ROWS: &[Row<RestoreWorker>] = &[
    row(&[AtStartup], EventKind::Start, FETCHED, &[Action::Note]),
    // Finishing (every block decoded or given up, the writer finishing the last files) hears the
    // same news: a block the writer wants again sends it back to Fetching.
    row(WORKING, EventKind::FragmentOk, FETCHED, &[Action::Note]),
    row(WORKING, EventKind::FragmentFailed, FETCHED, &[Action::Note]),
    row(WORKING, EventKind::Decoded, FETCHED, &[Action::Note]),
    row(WORKING, EventKind::DecodeFailed, FETCHED, &[Action::Note]),
    row(WORKING, EventKind::Consumed, FETCHED, &[Action::Note]),
    row(WORKING, EventKind::Want, FETCHED, &[Action::Note]),
    row(WORKING, EventKind::SupplierDown, To::Stay, &[Action::Note]),
    row(WORKING, EventKind::SupplierUp, To::Stay, &[Action::Note]),
    row(
        WORKING,
        EventKind::Timeout,
        To::Stay,
        &[Action::Hedge, Action::Report],
    ),
    // The writer may finish while blocks are still fetched (it fails the files of lost blocks
    // without waiting for the rest).
    row(
        WORKING,
        EventKind::WriterDone,
        Go(Done),
        &[Action::Note, Action::Finish],
    ),
    row(
        LIVE,
        EventKind::Fatal,
        Go(Failed),
        &[Action::Cancel, Action::Finish],
    ),
    row(
        LIVE,
        EventKind::Shutdown,
        Go(Aborted),
        &[Action::Cancel, Action::Finish],
    ),
];

static CHOICES: &[ChoiceRow<RestoreWorker>] = &[ChoiceRow {
    choice: Choice::Fetched,
    targets: &[
        (Finishing, "every block decoded or given up"),
        (Fetching, "otherwise"),
    ],
}];

static TIMERS: &[TimerRow<RestoreWorker>] = &[TimerRow {
    timer: Timer::Progress,
    period: Duration::from_secs(1),
    config: None,
    states: &[Fetching, Finishing],
}];

impl RestoreWorker {
    fn fetch(out: &mut Out<Self>, asks: Vec<(BlockId, u32)>) {
        for (block, position) in asks {
            out.push(Output::Fetch { block, position });
        }
    }
}

impl Machine for RestoreWorker {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;
    type Choice = Choice;
    type Output = Output;

    const NAME: &'static str = "restore_worker";
    const ABOUT: &'static str = "One restore of one version: fetches k fragments per block (data positions first, parity only for what fails), a bounded number of blocks at once in the order files need them, decodes them for the file writer and finishes when the writer has restored or named every file.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Done, Aborted, Failed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timers() -> &'static [TimerRow<Self>] {
        TIMERS
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

    fn guard(&self, guard: Guard, _: &Event, _: &Ctx) -> bool {
        match guard {}
    }

    fn choose(&self, _choice: Choice, _: &Ctx) -> State {
        if self.fetches.queue.is_empty() && self.fetches.active.is_empty() {
            Finishing
        } else {
            Fetching
        }
    }

    fn apply(&mut self, action: Action, event: &Event, ctx: &Ctx, out: &mut Out<Self>) {
        let f = &mut self.fetches;
        match action {
            Action::Note => match event {
                Event::Start { blocks, down } => {
                    f.start(blocks.clone(), down.clone());
                    let asks = f.fill(ctx.now);
                    Self::fetch(out, asks);
                }
                Event::FragmentOk { block, position }
                    if f.fragment_ok(*block, *position, ctx.now) =>
                {
                    out.push(Output::Decode { block: *block });
                }
                Event::FragmentFailed {
                    block,
                    position,
                    corrupt,
                } => {
                    let (asks, lost) = f.fragment_failed(*block, *position, *corrupt, ctx.now);
                    Self::fetch(out, asks);
                    if lost {
                        out.push(Output::GiveUp { block: *block });
                        let asks = f.fill(ctx.now);
                        Self::fetch(out, asks);
                    }
                }
                Event::Decoded { block } => f.decoded(*block),
                Event::DecodeFailed { block } => {
                    f.decode_failed(*block);
                    out.push(Output::GiveUp { block: *block });
                    let asks = f.fill(ctx.now);
                    Self::fetch(out, asks);
                }
                Event::Consumed { block } => {
                    f.consumed(*block);
                    let asks = f.fill(ctx.now);
                    Self::fetch(out, asks);
                }
                Event::Want { block } => {
                    if f.is_lost(block) || !f.knows(block) {
                        out.push(Output::GiveUp { block: *block });
                    } else {
                        let asks = f.want(*block, ctx.now);
                        Self::fetch(out, asks);
                    }
                }
                Event::SupplierDown(p) => f.supplier_down(*p),
                Event::SupplierUp(p) => f.supplier_up(*p),
                Event::WriterDone { failed } => self.writer_failed = Some(*failed),
                _ => {}
            },
            Action::Hedge => {
                let asks = f.hedge(ctx.now);
                Self::fetch(out, asks);
            }
            Action::Report => out.push(Output::Progress(self.fetches.progress.clone())),
            Action::Cancel => out.push(Output::Cancel),
            Action::Finish => {
                let outcome = match event {
                    Event::WriterDone { failed: 0 } => Outcome::Complete,
                    Event::WriterDone { .. } => Outcome::Partial,
                    Event::Fatal(why) => Outcome::Failed(why.clone()),
                    // The node stops (`Shutdown`, the only other way out).
                    _ => Outcome::Interrupted,
                };
                out.push(Output::Progress(self.fetches.progress.clone()));
                out.push(Output::Finished(outcome));
            }
        }
    }

    fn invariant(&self, _state: State) -> Result<(), Violation> {
        self.fetches.check()
    }

    fn sample_events() -> Vec<Event> {
        let (a, b) = ([1; 32], [2; 32]);
        vec![
            Event::Start {
                blocks: vec![(a, 4, 6), (b, 4, 6)],
                down: vec![],
            },
            Event::Start {
                blocks: vec![(a, 4, 6)],
                down: vec![0, 1],
            },
            Event::FragmentOk {
                block: a,
                position: 0,
            },
            Event::FragmentOk {
                block: a,
                position: 2,
            },
            Event::FragmentFailed {
                block: a,
                position: 1,
                corrupt: true,
            },
            Event::FragmentFailed {
                block: b,
                position: 3,
                corrupt: false,
            },
            Event::Decoded { block: a },
            Event::DecodeFailed { block: b },
            Event::Consumed { block: a },
            Event::Want { block: a },
            Event::WriterDone { failed: 0 },
            Event::WriterDone { failed: 2 },
            Event::SupplierDown(3),
            Event::SupplierUp(3),
            Event::Fatal("disk".into()),
            Event::Timeout(Timer::Progress),
            Event::Shutdown,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{Instance, Stepped};

    const C: Ctx = Ctx::at(Duration::ZERO);

    fn fetches(s: &Stepped<RestoreWorker>) -> Vec<(BlockId, u32)> {
        s.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Fetch { block, position } => Some((*block, *position)),
                _ => None,
            })
            .collect()
    }

    fn started(
        blocks: &[BlockId],
        down: Vec<u32>,
        window: usize,
    ) -> (Instance<RestoreWorker>, Stepped<RestoreWorker>) {
        let mut job = Instance::new(RestoreWorker::with_window(window), "r");
        let blocks = blocks.iter().map(|b| (*b, 4, 6)).collect();
        let s = job.step(&Event::Start { blocks, down }, &C).expect("start");
        (job, s)
    }

    /// M7: a supplier answering at 10 s while the others answer in 20 ms is hedged after a few
    /// times the others' latency (not the static bound, 15 s here), and once observed slow it is
    /// asked last.
    #[test]
    fn a_slow_supplier_is_hedged_on_observed_latency_and_then_asked_last() {
        let ms = Duration::from_millis;
        let (a, b, c) = ([1; 32], [2; 32], [3; 32]);
        let mut f = Fetches::new(2);
        f.hedge_after = Duration::from_secs(15);
        f.start(vec![(a, 4, 6), (b, 4, 6), (c, 4, 6)], vec![]);
        let asks = f.fill(Duration::ZERO);
        assert_eq!(asks.len(), 8);
        for block in [a, b] {
            for p in 1..4 {
                assert!(!f.fragment_ok(block, p, ms(20)));
            }
        }
        // Not at 4 s (the floor: a third of the static bound), at 5 s: hedged by position 4.
        assert!(f.hedge(ms(4000)).is_empty());
        let hedges = f.hedge(ms(5000));
        assert_eq!(hedges, vec![(a, 4), (b, 4)]);
        assert!(f.fragment_ok(a, 4, ms(5020)));
        assert!(f.fragment_ok(b, 4, ms(5020)));
        // Position 0's answers come at 10 s: too late to count, but observed.
        assert!(!f.fragment_ok(a, 0, ms(10_000)));
        assert!(!f.fragment_ok(b, 0, ms(10_000)));
        assert_eq!(f.progress.slow, [0].into_iter().collect());
        for block in [a, b] {
            f.decoded(block);
            f.consumed(block);
        }
        // The next block asks the four fast positions; the slow one only if one fails.
        let asks: Vec<u32> = f.fill(ms(10_001)).into_iter().map(|(_, p)| p).collect();
        assert_eq!(asks, vec![1, 2, 3, 4]);
        let _ = c;
    }

    #[test]
    fn asks_k_data_fragments_first_and_parity_only_for_what_fails() {
        let a = [1; 32];
        let (mut job, s) = started(&[a], vec![], 4);
        assert_eq!(fetches(&s), vec![(a, 0), (a, 1), (a, 2), (a, 3)]);
        let s = job
            .step(
                &Event::FragmentFailed {
                    block: a,
                    position: 1,
                    corrupt: true,
                },
                &C,
            )
            .expect("failed");
        assert_eq!(fetches(&s), vec![(a, 4)], "one parity fragment, no more");
        for p in [0, 2, 3] {
            let s = job
                .step(
                    &Event::FragmentOk {
                        block: a,
                        position: p,
                    },
                    &C,
                )
                .expect("ok");
            assert!(!s.outputs.contains(&Output::Decode { block: a }));
        }
        let s = job
            .step(
                &Event::FragmentOk {
                    block: a,
                    position: 4,
                },
                &C,
            )
            .expect("ok");
        assert!(s.outputs.contains(&Output::Decode { block: a }));
        let p = &job.machine.fetches.progress;
        assert_eq!((p.fragments_asked, p.extra_fragments), (5, 1));
        assert_eq!(p.corrupt.get(&1), Some(&1));
    }

    #[test]
    fn a_position_whose_supplier_is_down_is_skipped_up_front() {
        let a = [1; 32];
        let (_, s) = started(&[a], vec![0, 2], 4);
        assert_eq!(fetches(&s), vec![(a, 1), (a, 3), (a, 4), (a, 5)]);
    }

    #[test]
    fn a_block_with_more_than_m_failures_is_given_up_and_the_next_one_starts() {
        let (a, b) = ([1; 32], [2; 32]);
        let (mut job, _) = started(&[a, b], vec![], 1);
        let mut gave_up = false;
        for p in 0..3 {
            let s = job
                .step(
                    &Event::FragmentFailed {
                        block: a,
                        position: p,
                        corrupt: false,
                    },
                    &C,
                )
                .expect("failed");
            gave_up |= s.outputs.contains(&Output::GiveUp { block: a });
            if gave_up {
                assert_eq!(fetches(&s).first(), Some(&(b, 0)), "the window moves on");
            }
        }
        assert!(gave_up, "3 of 6 failed with k = 4: lost");
        job.machine.fetches.check().expect("bounded");
    }

    #[test]
    fn the_window_bounds_blocks_in_flight_until_the_writer_consumes() {
        let blocks: Vec<BlockId> = (0..5u8).map(|i| [i; 32]).collect();
        let (mut job, s) = started(&blocks, vec![], 2);
        assert_eq!(fetches(&s).len(), 8, "two blocks of four fragments");
        let a = blocks[0];
        for p in 0..4 {
            job.step(
                &Event::FragmentOk {
                    block: a,
                    position: p,
                },
                &C,
            );
        }
        let s = job.step(&Event::Decoded { block: a }, &C).expect("decoded");
        assert!(
            fetches(&s).is_empty(),
            "decoded but not consumed: still in the window"
        );
        let s = job
            .step(&Event::Consumed { block: a }, &C)
            .expect("consumed");
        assert_eq!(fetches(&s).len(), 4, "the third block starts");
    }

    #[test]
    fn finishes_complete_or_partial_from_the_writer() {
        let a = [1; 32];
        let (mut job, _) = started(&[a], vec![], 2);
        for p in 0..4 {
            job.step(
                &Event::FragmentOk {
                    block: a,
                    position: p,
                },
                &C,
            );
        }
        let s = job.step(&Event::Decoded { block: a }, &C).expect("decoded");
        assert_eq!(s.to, Finishing);
        let s = job
            .step(&Event::WriterDone { failed: 0 }, &C)
            .expect("done");
        assert_eq!(s.to, Done);
        assert!(s.outputs.contains(&Output::Finished(Outcome::Complete)));
        let (mut job, _) = started(&[a], vec![], 2);
        let s = job
            .step(&Event::WriterDone { failed: 3 }, &C)
            .expect("done");
        assert!(s.outputs.contains(&Output::Finished(Outcome::Partial)));
    }
}
