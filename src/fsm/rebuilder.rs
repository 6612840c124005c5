//! rebuilder: recreates missing or corrupt fragments. The monitor hands it a work list (most
//! urgent first); for each block it fetches `k` good fragments — reachable holders first, another
//! one only when one fails — then the driver reconstructs the missing ones (Reed-Solomon, no
//! decryption: the rebuilder never needs the owner's data key), checks each against the signed
//! manifest, places them on the position's supplier and records the new holder in the catalog.
//!
//! A bounded number of blocks are in flight at once (`monitor.rebuild_parallel`). When the list
//! is done and anything was placed, the driver stores a fresh catalog and recovery record, so
//! both name the new holders (a new machine with only the key file finds them).
//!
//! Nothing is persisted here: after a restart the monitor finds the same work again from the
//! catalog and the health matrix.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::fetch::Plan;
use super::machine::{ChoiceRow, Ctx, Machine, Out, Row, TimerRow, To, Violation, row};
use super::monitor::{BlockId, RebuildTask};
use crate::crypto::identity::NodeId;
use crate::{events, labels};

labels! {
    pub enum State { AtStartup, Idle, Working, Closed }
}

events! {
    pub enum Event / EventKind {
        /// The layout's `k`.
        Start,
        /// The monitor's work list, most urgent first (replaces what is queued).
        Work(Vec<RebuildTask>),
        /// A source fragment arrived and matches the manifest.
        FragmentOk { block: BlockId, position: u32 },
        /// A source fragment could not be had or failed its hash.
        FragmentFailed { block: BlockId, position: u32 },
        /// The driver rebuilt the block and tried to place each target: which were stored.
        Done { block: BlockId, placed: Vec<(u32, NodeId)>, failed: Vec<u32> },
        Timeout(Timer),
        Shutdown,
    }
}

labels! {
    pub enum Guard {}
}

labels! {
    pub enum Action {
        /// Update the ledger from the event; start blocks up to the window; ask for fragments;
        /// rebuild blocks whose `k` fragments are in.
        Note,
        /// Ask one more source beside each request outstanding past `hedge_after`.
        Hedge,
        /// Report progress for `status`.
        Report,
        /// The list is done: refresh the catalog if anything was placed (IO), tell the monitor.
        Finish,
    }
}

labels! {
    pub enum Timer { Progress }
}

labels! {
    pub enum Choice { MoreWork }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub queued: u64,
    pub in_flight: u64,
    pub blocks_rebuilt: u64,
    pub fragments_placed: u64,
    pub fragments_fetched: u64,
    pub blocks_failed: u64,
    /// Bytes fetched and placed (counted by the driver, which sees them).
    pub bytes_fetched: u64,
    pub bytes_placed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Fetch {
        block: BlockId,
        position: u32,
        supplier: NodeId,
    },
    /// `sources` are good (fetched, checked): rebuild `targets` and place them.
    Rebuild {
        block: BlockId,
        sources: Vec<u32>,
        targets: Vec<(u32, NodeId)>,
    },
    /// The driver may drop what it fetched for this block.
    Forget {
        block: BlockId,
    },
    /// A fragment was placed (for the monitor's matrix).
    Placed {
        block: BlockId,
        position: u32,
        supplier: NodeId,
    },
    /// The work list is done; `placed`: fragments were placed since the last finish.
    Finished {
        placed: bool,
    },
    Progress(Progress),
}

#[derive(Clone, Debug)]
struct Job {
    task: RebuildTask,
    plan: Plan,
    rebuilding: bool,
}

impl Job {
    /// The block's own k: it may have been made with another layout than today's.
    fn new(task: RebuildTask) -> Job {
        let plan = Plan::new(task.layout.k() as u32, task.sources.iter().map(|(p, _)| *p));
        Job {
            task,
            plan,
            rebuilding: false,
        }
    }

    fn down(&self) -> BTreeSet<u32> {
        self.task.down.iter().copied().collect()
    }

    fn supplier(&self, position: u32) -> Option<NodeId> {
        self.task
            .sources
            .iter()
            .find(|(p, _)| *p == position)
            .map(|(_, s)| *s)
    }

    /// The sources to ask now (the plan's rule: reachable holders first, lowest position first),
    /// with their holders.
    fn next(&mut self, now: Duration) -> Vec<(u32, NodeId)> {
        let down = self.down();
        let picks = self.plan.next(&down, now);
        picks
            .into_iter()
            .filter_map(|p| self.supplier(p).map(|s| (p, s)))
            .collect()
    }
}

#[derive(Clone, Debug)]
pub struct Rebuilder {
    pub window: usize,
    /// A source request outstanding this long is hedged by one more source.
    pub hedge_after: Duration,
    queue: VecDeque<RebuildTask>,
    active: BTreeMap<BlockId, Job>,
    placed_since_finish: bool,
    pub progress: Progress,
}

impl Default for Rebuilder {
    fn default() -> Self {
        Rebuilder::new(2)
    }
}

impl Rebuilder {
    pub fn new(window: usize) -> Self {
        Rebuilder {
            window: window.max(1),
            hedge_after: super::restore_worker::HEDGE_AFTER,
            queue: VecDeque::new(),
            active: BTreeMap::new(),
            placed_since_finish: false,
            progress: Progress::default(),
        }
    }

    pub fn busy(&self) -> bool {
        !self.queue.is_empty() || !self.active.is_empty()
    }

    fn advance(&mut self, block: BlockId, now: Duration, out: &mut Out<Self>) {
        let Some(job) = self.active.get_mut(&block) else {
            return;
        };
        if job.rebuilding {
            return;
        }
        if job.plan.complete() {
            job.rebuilding = true;
            out.push(Output::Rebuild {
                block,
                sources: job.plan.good().collect(),
                targets: job.task.targets.clone(),
            });
            return;
        }
        if job.plan.hopeless() {
            self.active.remove(&block);
            self.progress.blocks_failed += 1;
            out.push(Output::Forget { block });
            return;
        }
        let asks = job.next(now);
        self.ask(block, asks, out);
    }

    fn ask(&mut self, block: BlockId, asks: Vec<(u32, NodeId)>, out: &mut Out<Self>) {
        for (position, supplier) in asks {
            self.progress.fragments_fetched += 1;
            out.push(Output::Fetch {
                block,
                position,
                supplier,
            });
        }
    }

    /// Source requests outstanding past `hedge_after`: one more source beside each.
    fn hedge(&mut self, now: Duration, out: &mut Out<Self>) {
        let blocks: Vec<BlockId> = self.active.keys().copied().collect();
        for block in blocks {
            let Some(job) = self.active.get_mut(&block) else {
                continue;
            };
            if job.rebuilding {
                continue;
            }
            let down = job.down();
            let picks = job.plan.hedge(&down, now, self.hedge_after);
            let asks: Vec<(u32, NodeId)> = picks
                .into_iter()
                .filter_map(|p| job.supplier(p).map(|s| (p, s)))
                .collect();
            self.ask(block, asks, out);
        }
    }

    fn fill(&mut self, now: Duration, out: &mut Out<Self>) {
        while self.active.len() < self.window {
            let Some(task) = self.queue.pop_front() else {
                break;
            };
            let block = task.block;
            self.active.insert(block, Job::new(task));
            self.advance(block, now, out);
        }
    }

    fn note(&mut self, event: &Event, now: Duration, out: &mut Out<Self>) {
        match event {
            Event::Start => {}
            Event::Work(tasks) => {
                self.queue = tasks
                    .iter()
                    .filter(|t| !self.active.contains_key(&t.block))
                    .cloned()
                    .collect();
            }
            Event::FragmentOk { block, position } => {
                if let Some(job) = self.active.get_mut(block) {
                    job.plan.ok(*position);
                }
                self.advance(*block, now, out);
            }
            Event::FragmentFailed { block, position } => {
                if let Some(job) = self.active.get_mut(block) {
                    job.plan.failed(*position);
                }
                self.advance(*block, now, out);
            }
            Event::Done {
                block,
                placed,
                failed,
            } => {
                if self.active.remove(block).is_some() {
                    self.progress.blocks_rebuilt += u64::from(failed.is_empty());
                    self.progress.blocks_failed += u64::from(!failed.is_empty());
                    for (position, supplier) in placed {
                        self.progress.fragments_placed += 1;
                        self.placed_since_finish = true;
                        out.push(Output::Placed {
                            block: *block,
                            position: *position,
                            supplier: *supplier,
                        });
                    }
                    out.push(Output::Forget { block: *block });
                }
            }
            Event::Timeout(_) | Event::Shutdown => {}
        }
        self.fill(now, out);
        self.progress.queued = self.queue.len() as u64;
        self.progress.in_flight = self.active.len() as u64;
    }
}

use State::*;
use To::State as Go;

const LIVE: &[State] = &[AtStartup, Idle, Working];
const RUNNING: &[State] = &[Idle, Working];
const MORE: To<Rebuilder> = To::Choose(Choice::MoreWork);
const NOTE: &[Action] = &[Action::Note, Action::Report];

static ROWS: &[Row<Rebuilder>] = &[
    row(&[AtStartup], EventKind::Start, Go(Idle), &[Action::Note]),
    row(RUNNING, EventKind::Work, MORE, NOTE),
    row(&[Working], EventKind::FragmentOk, MORE, NOTE),
    row(&[Working], EventKind::FragmentFailed, MORE, NOTE),
    row(&[Working], EventKind::Done, MORE, NOTE),
    row(
        &[Working],
        EventKind::Timeout,
        To::Stay,
        &[Action::Hedge, Action::Report],
    ),
    row(LIVE, EventKind::Shutdown, Go(Closed), &[]),
];

static ENTRY: &[super::machine::Entry<Rebuilder>] = &[super::machine::Entry {
    state: Idle,
    actions: &[Action::Finish],
}];

static TIMERS: &[TimerRow<Rebuilder>] = &[TimerRow {
    timer: Timer::Progress,
    period: Duration::from_secs(1),
    config: None,
    states: &[Working],
}];

static CHOICES: &[ChoiceRow<Rebuilder>] = &[ChoiceRow {
    choice: Choice::MoreWork,
    targets: &[
        (Working, "blocks queued or in flight"),
        (Idle, "the list is done"),
    ],
}];

impl Machine for Rebuilder {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;
    type Choice = Choice;
    type Output = Output;

    const NAME: &'static str = "rebuilder";
    const ABOUT: &'static str = "Recreates missing or corrupt fragments from k good ones (fetched from reachable holders first, another only on failure), a bounded number of blocks at a time, in the monitor's order; refreshes the catalog and recovery record when done.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn entry() -> &'static [super::machine::Entry<Self>] {
        ENTRY
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

    fn guard(&self, guard: Guard, _: &Event, _: &Ctx) -> bool {
        match guard {}
    }

    fn choose(&self, _choice: Choice, _: &Ctx) -> State {
        if self.busy() { Working } else { Idle }
    }

    fn apply(&mut self, action: Action, event: &Event, ctx: &Ctx, out: &mut Out<Self>) {
        match action {
            Action::Note => self.note(event, ctx.now, out),
            Action::Hedge => self.hedge(ctx.now, out),
            Action::Report => out.push(Output::Progress(self.progress.clone())),
            Action::Finish => {
                out.push(Output::Finished {
                    placed: std::mem::take(&mut self.placed_since_finish),
                });
                out.push(Output::Progress(self.progress.clone()));
            }
        }
    }

    fn invariant(&self, _state: State) -> Result<(), Violation> {
        if self.active.len() > self.window {
            return Err(format!(
                "{} blocks in flight, window {}",
                self.active.len(),
                self.window
            )
            .into());
        }
        for (block, job) in &self.active {
            if !job.rebuilding {
                job.plan
                    .check()
                    .map_err(|e| Violation::from(format!("block {block:?}: {e}")))?;
            }
            if job
                .task
                .targets
                .iter()
                .any(|(t, _)| job.plan.good().any(|g| g == *t) || job.plan.is_asking(*t))
            {
                return Err("a target position used as a source".into());
            }
        }
        Ok(())
    }

    fn sample_events() -> Vec<Event> {
        let a = NodeId::from_signing_key(&[1; 32]);
        let b = NodeId::from_signing_key(&[2; 32]);
        let task = RebuildTask {
            block: [7; 32],
            layout: crate::data::Layout::new(1, 1).expect("valid"),
            targets: vec![(1, b)],
            sources: vec![(0, a)],
            down: vec![],
            catalog: false,
        };
        vec![
            Event::Start,
            Event::Work(vec![task]),
            Event::Work(vec![]),
            Event::FragmentOk {
                block: [7; 32],
                position: 0,
            },
            Event::FragmentFailed {
                block: [7; 32],
                position: 0,
            },
            Event::Done {
                block: [7; 32],
                placed: vec![(1, b)],
                failed: vec![],
            },
            Event::Timeout(Timer::Progress),
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

    fn task(n: u8, sources: &[u32]) -> RebuildTask {
        RebuildTask {
            block: [n; 32],
            layout: crate::data::Layout::default(),
            targets: vec![(0, id(9))],
            sources: sources.iter().map(|p| (*p, id(*p as u8 + 1))).collect(),
            down: vec![],
            catalog: false,
        }
    }

    fn fetches(outputs: &[Output]) -> Vec<([u8; 32], u32)> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Fetch {
                    block, position, ..
                } => Some((*block, *position)),
                _ => None,
            })
            .collect()
    }

    fn started(window: usize) -> Instance<Rebuilder> {
        let mut m = Instance::new(Rebuilder::new(window), "0");
        m.step(&Event::Start, &Ctx::at(Duration::ZERO));
        m
    }

    #[test]
    fn asks_k_sources_in_order_then_another_only_for_a_failure() {
        let mut m = started(1);
        let c = Ctx::at(Duration::ZERO);
        let s = m
            .step(
                &Event::Work(vec![task(1, &[1, 2, 3, 4, 5]), task(2, &[1, 2, 3, 4])]),
                &c,
            )
            .expect("work");
        // Window 1: only the first block, its first k sources.
        assert_eq!(
            fetches(&s.outputs),
            vec![([1; 32], 1), ([1; 32], 2), ([1; 32], 3), ([1; 32], 4)]
        );
        let s = m
            .step(
                &Event::FragmentFailed {
                    block: [1; 32],
                    position: 2,
                },
                &c,
            )
            .expect("failed");
        assert_eq!(fetches(&s.outputs), vec![([1; 32], 5)]);
        for p in [1, 3, 4] {
            m.step(
                &Event::FragmentOk {
                    block: [1; 32],
                    position: p,
                },
                &c,
            );
        }
        let s = m
            .step(
                &Event::FragmentOk {
                    block: [1; 32],
                    position: 5,
                },
                &c,
            )
            .expect("ok");
        assert!(s.outputs.iter().any(|o| matches!(
            o,
            Output::Rebuild { block, sources, .. } if *block == [1; 32] && *sources == vec![1, 3, 4, 5]
        )));
        // Done: placed, forgotten, and the next block starts.
        let s = m
            .step(
                &Event::Done {
                    block: [1; 32],
                    placed: vec![(0, id(9))],
                    failed: vec![],
                },
                &c,
            )
            .expect("done");
        assert!(s.outputs.contains(&Output::Placed {
            block: [1; 32],
            position: 0,
            supplier: id(9)
        }));
        assert_eq!(fetches(&s.outputs).len(), 4);
        assert_eq!(m.machine.progress.fragments_placed, 1);
    }

    #[test]
    fn a_block_without_k_good_sources_is_given_up_and_the_list_finishes() {
        let mut m = started(2);
        let c = Ctx::at(Duration::ZERO);
        m.step(&Event::Work(vec![task(1, &[1, 2, 3, 4])]), &c);
        let s = m
            .step(
                &Event::FragmentFailed {
                    block: [1; 32],
                    position: 3,
                },
                &c,
            )
            .expect("failed");
        assert!(s.outputs.contains(&Output::Forget { block: [1; 32] }));
        assert!(s.outputs.contains(&Output::Finished { placed: false }));
        assert_eq!(m.state(), State::Idle);
        assert_eq!(m.machine.progress.blocks_failed, 1);
    }
}
