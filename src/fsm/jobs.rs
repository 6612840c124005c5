//! jobs: a queue of jobs run one at a time (the node's backups, its restores). It holds the
//! rules the node used to write twice: a bounded queue (a request that does not fit is refused
//! whole), one pending run per key where the queue dedupes (a source asked for again joins the
//! run already waiting or running), the schedule's due rule, one job at a time, the work between
//! two jobs (retention), and the handover from a committed job still draining its outboxes to
//! the next one (which takes the outbox over). The runner (`node/jobs.rs`) starts and stops the
//! jobs its outputs name and reports back.

use std::collections::VecDeque;
use std::time::Duration;

use super::machine::{ChoiceRow, Ctx, Label, Machine, Out, Row, To, Violation, row};
use crate::{events, labels};

/// A configured source as the schedule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub key: String,
    /// When its latest snapshot finished (seconds since the Unix epoch); none yet: `None`.
    pub last_finished: Option<u64>,
    pub every: Duration,
}

/// Whether a job last finished at `last_finished` is due again at `now` (seconds since the Unix
/// epoch): never run, or its interval has passed.
pub fn due(last_finished: Option<u64>, every: Duration, now: u64) -> bool {
    last_finished.is_none_or(|at| at.saturating_add(every.as_secs()) <= now)
}

labels! {
    pub enum State { Idle, Starting, Running, Between, Stopped }
}

events! {
    pub enum Event / EventKind {
        /// Jobs asked for, by key (a backup's source), in order.
        Request { keys: Vec<String> },
        /// The schedule's tick: the configured sources (now is the step's wall clock).
        Schedule { sources: Vec<Scheduled> },
        Started { run: u64 },
        StartFailed { run: u64 },
        /// The job ended; `alive`: its actor still drains (a committed backup sending what waits
        /// for suppliers that are away).
        Finished { run: u64, alive: bool },
        /// The work between two jobs is done.
        BetweenDone,
        Shutdown,
    }
}

labels! {
    /// `Current`: the event is about the job being started or running.
    pub enum Guard { Current }
}

labels! {
    pub enum Action {
        /// Queue what the event asks for (dedupe, bound, due rule); note the job's news.
        Note,
        /// Start the next job if none is running (stopping the draining one first).
        StartNext,
        /// Do the work between two jobs.
        Between,
        /// Stop the running and the draining job.
        Stop,
    }
}

labels! {
    pub enum Timer {}
}

labels! {
    pub enum Choice { Next }
}

/// What the runner must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A request's answer: the run that will do `key`; `new`: queued now (else the run already
    /// pending for that key).
    Accepted { key: String, run: u64, new: bool },
    /// A request refused whole: `max` jobs are already waiting.
    Refused { max: usize },
    /// The keys waiting, in order (for status).
    Queue(Vec<String>),
    /// Stop the job still draining: the next one takes its outbox over.
    StopDraining { run: u64 },
    /// Start run `run` for `key`; answer `Started` or `StartFailed`, then `Finished`.
    Start { run: u64, key: String },
    /// Do the work between two jobs (retention); answer `BetweenDone`.
    Between,
    /// Stop these runs (the running job, the draining one).
    Stop { runs: Vec<u64> },
}

#[derive(Debug, Clone)]
pub struct JobQueue {
    /// Jobs waiting at most.
    pub max_queued: usize,
    /// One pending run per key (backups: per source); restores queue every request.
    pub dedupe: bool,
    next_run: u64,
    queue: VecDeque<(u64, String)>,
    /// The job being started or running.
    current: Option<(u64, String)>,
    /// A finished job whose actor still drains its outboxes.
    draining: Option<u64>,
}

impl JobQueue {
    pub fn new(max_queued: usize, dedupe: bool) -> Self {
        JobQueue {
            max_queued,
            dedupe,
            next_run: 1,
            queue: VecDeque::new(),
            current: None,
            draining: None,
        }
    }

    /// The run already waiting or running for `key`, where the queue dedupes.
    fn pending_run(&self, key: &str) -> Option<u64> {
        if !self.dedupe {
            return None;
        }
        self.current
            .iter()
            .chain(self.queue.iter())
            .find(|(_, k)| k == key)
            .map(|(run, _)| *run)
    }

    fn enqueue(&mut self, key: &str) -> u64 {
        let run = self.next_run;
        self.next_run += 1;
        self.queue.push_back((run, key.to_string()));
        run
    }

    fn publish(&self, out: &mut Out<Self>) {
        out.push(Output::Queue(
            self.queue.iter().map(|(_, k)| k.clone()).collect(),
        ));
    }

    fn request(&mut self, keys: &[String], out: &mut Out<Self>) {
        let mut new: Vec<&String> = Vec::new();
        for key in keys {
            if self.pending_run(key).is_none() && !(self.dedupe && new.contains(&key)) {
                new.push(key);
            }
        }
        if self.queue.len() + new.len() > self.max_queued {
            out.push(Output::Refused {
                max: self.max_queued,
            });
            return;
        }
        for key in keys {
            let (run, new) = match self.pending_run(key) {
                Some(run) => (run, false),
                None => (self.enqueue(key), true),
            };
            out.push(Output::Accepted {
                key: key.clone(),
                run,
                new,
            });
        }
        self.publish(out);
    }

    fn schedule(&mut self, sources: &[Scheduled], now: u64, out: &mut Out<Self>) {
        let mut queued = false;
        for source in sources {
            if self.pending_run(&source.key).is_some()
                || !due(source.last_finished, source.every, now)
                || self.queue.len() >= self.max_queued
            {
                continue;
            }
            let run = self.enqueue(&source.key);
            out.push(Output::Accepted {
                key: source.key.clone(),
                run,
                new: true,
            });
            queued = true;
        }
        if queued {
            self.publish(out);
        }
    }
}

impl Default for JobQueue {
    fn default() -> Self {
        JobQueue::new(4, true)
    }
}

use State::*;
use To::State as Go;

const BUSY: &[State] = &[Starting, Running, Between];
const LIVE: &[State] = &[Idle, Starting, Running, Between];
const NEXT: To<JobQueue> = To::Choose(Choice::Next);

static ROWS: &[Row<JobQueue>] = &[
    row(
        &[Idle],
        EventKind::Request,
        NEXT,
        &[Action::Note, Action::StartNext],
    ),
    row(
        &[Idle],
        EventKind::Schedule,
        NEXT,
        &[Action::Note, Action::StartNext],
    ),
    row(BUSY, EventKind::Request, To::Stay, &[Action::Note]),
    row(BUSY, EventKind::Schedule, To::Stay, &[Action::Note]),
    row(&[Starting], EventKind::Started, Go(Running), &[]).when(Guard::Current),
    row(
        &[Starting],
        EventKind::StartFailed,
        NEXT,
        &[Action::Note, Action::StartNext],
    )
    .when(Guard::Current),
    // One job at a time: the next starts only after the work between two jobs.
    row(
        &[Running],
        EventKind::Finished,
        Go(Between),
        &[Action::Note, Action::Between],
    )
    .when(Guard::Current),
    row(
        &[Between],
        EventKind::BetweenDone,
        NEXT,
        &[Action::StartNext],
    ),
    row(LIVE, EventKind::Shutdown, Go(Stopped), &[Action::Stop]),
];

static CHOICES: &[ChoiceRow<JobQueue>] = &[ChoiceRow {
    choice: Choice::Next,
    targets: &[(Starting, "a job waits"), (Idle, "the queue is empty")],
}];

impl Machine for JobQueue {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;
    type Choice = Choice;
    type Output = Output;

    const NAME: &'static str = "jobs";
    const ABOUT: &'static str = "A queue of jobs run one at a time (backups, restores): a bounded queue, one pending run per source where it dedupes, the schedule's due rule, the work between two jobs (retention), and the handover from a committed job still draining its outboxes to the next one.";
    const INITIAL: State = Idle;
    const TERMINAL: &'static [State] = &[Stopped];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn choices() -> &'static [ChoiceRow<Self>] {
        CHOICES
    }

    fn timer_event(timer: Timer) -> Event {
        match timer {}
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn guard(&self, guard: Guard, event: &Event, _: &Ctx) -> bool {
        match (guard, event) {
            (
                Guard::Current,
                Event::Started { run } | Event::StartFailed { run } | Event::Finished { run, .. },
            ) => self.current.as_ref().is_some_and(|(r, _)| r == run),
            _ => false,
        }
    }

    fn choose(&self, _: Choice, _: &Ctx) -> State {
        if self.current.is_some() {
            Starting
        } else {
            Idle
        }
    }

    fn apply(&mut self, action: Action, event: &Event, ctx: &Ctx, out: &mut Out<Self>) {
        match action {
            Action::Note => match event {
                Event::Request { keys } => self.request(keys, out),
                Event::Schedule { sources } => self.schedule(sources, ctx.wall.as_secs(), out),
                Event::StartFailed { .. } => self.current = None,
                Event::Finished { run, alive } => {
                    self.current = None;
                    self.draining = alive.then_some(*run);
                }
                _ => {}
            },
            Action::StartNext => {
                if self.current.is_some() {
                    return;
                }
                let Some((run, key)) = self.queue.pop_front() else {
                    return;
                };
                self.publish(out);
                if let Some(draining) = self.draining.take() {
                    out.push(Output::StopDraining { run: draining });
                }
                self.current = Some((run, key.clone()));
                out.push(Output::Start { run, key });
            }
            Action::Between => out.push(Output::Between),
            Action::Stop => {
                let runs = self
                    .current
                    .take()
                    .map(|(run, _)| run)
                    .into_iter()
                    .chain(self.draining.take())
                    .collect();
                self.queue.clear();
                self.publish(out);
                out.push(Output::Stop { runs });
            }
        }
    }

    fn invariant(&self, state: State) -> Result<(), Violation> {
        if self.queue.len() > self.max_queued {
            return Err(format!("{} jobs waiting", self.queue.len()).into());
        }
        if self.dedupe {
            let mut keys: Vec<&String> = self.current.iter().map(|(_, k)| k).collect();
            keys.extend(self.queue.iter().map(|(_, k)| k));
            let all = keys.len();
            keys.sort();
            keys.dedup();
            if keys.len() != all {
                return Err("a key is pending twice".into());
            }
        }
        let problem = match state {
            Starting | Running if self.current.is_none() => {
                format!("{} with no current job", state.name())
            }
            Idle | Between if self.current.is_some() => {
                format!("a current job in {}", state.name())
            }
            Idle if !self.queue.is_empty() => "idle while jobs wait".into(),
            Stopped if !self.queue.is_empty() || self.draining.is_some() => {
                "stopped with jobs left".into()
            }
            _ => return Ok(()),
        };
        Err(problem.into())
    }

    fn sample_events() -> Vec<Event> {
        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect();
        vec![
            Event::Request { keys: keys(&["a"]) },
            Event::Request {
                keys: keys(&["a", "b", "c"]),
            },
            Event::Request {
                keys: keys(&["d", "e", "f", "g", "h"]),
            },
            Event::Schedule {
                sources: vec![
                    Scheduled {
                        key: "a".into(),
                        last_finished: None,
                        every: Duration::from_secs(60),
                    },
                    Scheduled {
                        key: "s".into(),
                        last_finished: Some(0),
                        every: Duration::from_secs(5),
                    },
                ],
            },
            Event::Started { run: 1 },
            Event::Started { run: 2 },
            Event::StartFailed { run: 1 },
            Event::StartFailed { run: 3 },
            Event::Finished {
                run: 1,
                alive: true,
            },
            Event::Finished {
                run: 2,
                alive: false,
            },
            Event::Finished {
                run: 3,
                alive: true,
            },
            Event::BetweenDone,
            Event::Shutdown,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{Instance, Stepped};

    const C: Ctx = Ctx::at(Duration::ZERO);

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    fn accepted(s: &Stepped<JobQueue>) -> Vec<(String, u64)> {
        s.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Accepted { key, run, .. } => Some((key.clone(), *run)),
                _ => None,
            })
            .collect()
    }

    fn starts(s: &Stepped<JobQueue>) -> Vec<u64> {
        s.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Start { run, .. } => Some(*run),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn jobs_run_one_at_a_time_in_order_with_the_work_between_them() {
        let mut q = Instance::new(JobQueue::new(8, true), "q");
        let s = q
            .step(
                &Event::Request {
                    keys: keys(&["a", "b"]),
                },
                &C,
            )
            .expect("request");
        assert_eq!(accepted(&s), vec![("a".into(), 1), ("b".into(), 2)]);
        assert_eq!(starts(&s), vec![1]);
        assert_eq!(s.to, Starting);
        assert!(s.outputs.contains(&Output::Queue(keys(&["b"]))));
        q.step(&Event::Started { run: 1 }, &C).expect("started");
        let s = q
            .step(
                &Event::Finished {
                    run: 1,
                    alive: false,
                },
                &C,
            )
            .expect("finished");
        assert_eq!(s.to, Between);
        assert_eq!(s.outputs, vec![Output::Between], "b waits for retention");
        let s = q.step(&Event::BetweenDone, &C).expect("between");
        assert_eq!(starts(&s), vec![2]);
    }

    #[test]
    fn a_source_asked_for_again_joins_the_run_already_pending() {
        let mut q = Instance::new(JobQueue::new(8, true), "q");
        q.step(
            &Event::Request {
                keys: keys(&["a", "b"]),
            },
            &C,
        );
        let s = q
            .step(
                &Event::Request {
                    keys: keys(&["a", "b", "c", "c"]),
                },
                &C,
            )
            .expect("again");
        assert_eq!(
            accepted(&s),
            vec![
                ("a".into(), 1),
                ("b".into(), 2),
                ("c".into(), 3),
                ("c".into(), 3)
            ],
            "a runs, b waits, c is new (once)"
        );
        let mut restores = Instance::new(JobQueue::new(8, false), "r");
        restores.step(&Event::Request { keys: keys(&["x"]) }, &C);
        let s = restores
            .step(&Event::Request { keys: keys(&["x"]) }, &C)
            .expect("again");
        assert_eq!(
            accepted(&s),
            vec![("x".into(), 2)],
            "restores do not dedupe"
        );
    }

    #[test]
    fn a_request_that_does_not_fit_is_refused_whole() {
        let mut q = Instance::new(JobQueue::new(2, true), "q");
        let s = q
            .step(
                &Event::Request {
                    keys: keys(&["a", "b", "c"]),
                },
                &C,
            )
            .expect("too many");
        assert_eq!(s.outputs, vec![Output::Refused { max: 2 }]);
        assert_eq!(s.to, Idle, "nothing queued");
        q.step(
            &Event::Request {
                keys: keys(&["a", "b"]),
            },
            &C,
        );
        let s = q
            .step(
                &Event::Request {
                    keys: keys(&["c", "d"]),
                },
                &C,
            )
            .expect("full");
        assert_eq!(
            s.outputs,
            vec![Output::Refused { max: 2 }],
            "b waits: room for one"
        );
        let s = q
            .step(
                &Event::Request {
                    keys: keys(&["b", "c"]),
                },
                &C,
            )
            .expect("fits");
        assert_eq!(accepted(&s), vec![("b".into(), 2), ("c".into(), 3)]);
    }

    #[test]
    fn the_schedule_queues_a_source_whose_interval_passed_and_not_one_pending() {
        let hour = Duration::from_secs(3600);
        assert!(due(None, hour, 0));
        assert!(!due(Some(1000), hour, 4599));
        assert!(due(Some(1000), hour, 4600));
        assert!(!due(Some(u64::MAX), hour, 0));
        let mut q = Instance::new(JobQueue::new(8, true), "q");
        q.step(
            &Event::Request {
                keys: keys(&["busy"]),
            },
            &C,
        );
        let ctx = Ctx {
            wall: Duration::from_secs(5000),
            ..C
        };
        let source = |key: &str, last| Scheduled {
            key: key.into(),
            last_finished: last,
            every: hour,
        };
        let s = q
            .step(
                &Event::Schedule {
                    sources: vec![
                        source("busy", None),
                        source("new", None),
                        source("old", Some(1000)),
                        source("recent", Some(2000)),
                    ],
                },
                &ctx,
            )
            .expect("tick");
        assert_eq!(accepted(&s), vec![("new".into(), 2), ("old".into(), 3)]);
    }

    #[test]
    fn the_draining_job_is_stopped_before_the_next_starts_and_a_stop_ends_both() {
        let mut q = Instance::new(JobQueue::new(8, true), "q");
        q.step(
            &Event::Request {
                keys: keys(&["a", "b"]),
            },
            &C,
        );
        q.step(&Event::Started { run: 1 }, &C);
        q.step(
            &Event::Finished {
                run: 1,
                alive: true,
            },
            &C,
        );
        let s = q.step(&Event::BetweenDone, &C).expect("next");
        let order: Vec<&Output> = s
            .outputs
            .iter()
            .filter(|o| matches!(o, Output::StopDraining { .. } | Output::Start { .. }))
            .collect();
        assert_eq!(
            order,
            vec![
                &Output::StopDraining { run: 1 },
                &Output::Start {
                    run: 2,
                    key: "b".into()
                }
            ]
        );
        q.step(&Event::Started { run: 2 }, &C);
        q.step(
            &Event::Finished {
                run: 2,
                alive: true,
            },
            &C,
        );
        q.step(&Event::Request { keys: keys(&["c"]) }, &C);
        let s = q.step(&Event::Shutdown, &C).expect("stop");
        assert_eq!(s.to, Stopped);
        assert!(s.outputs.contains(&Output::Stop { runs: vec![2] }));
        assert!(s.outputs.contains(&Output::Queue(vec![])));
        assert!(
            q.step(&Event::Request { keys: keys(&["d"]) }, &C).is_none(),
            "no job is taken once stopped"
        );
    }

    #[test]
    fn a_failed_start_goes_on_with_the_next_and_stale_news_changes_nothing() {
        let mut q = Instance::new(JobQueue::new(8, true), "q");
        q.step(
            &Event::Request {
                keys: keys(&["a", "b"]),
            },
            &C,
        );
        assert!(
            q.step(&Event::Started { run: 2 }, &C).is_none(),
            "not run 2's turn"
        );
        let s = q.step(&Event::StartFailed { run: 1 }, &C).expect("failed");
        assert_eq!(s.to, Starting);
        assert_eq!(starts(&s), vec![2]);
    }
}
