//! One runner for the node's job queues (`backups.rs`, `restores.rs`): the pure
//! [`JobQueue`](crate::fsm::jobs::JobQueue) decides what waits, what starts and when; the runner
//! starts and stops the jobs its outputs name (through a [`JobKind`]) and reports back. Everything
//! runs on the node's event loop thread; what may take long (starting a job, the work between
//! two jobs) runs in its own task, so a stop is never held up behind it.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::rc::Rc;

use tokio::sync::{Notify, oneshot};

use crate::actors::shell::ctx_now;
use crate::fsm::jobs::{Event, JobQueue, Output};
use crate::fsm::{Instance, Machine};

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("{max} {what} are already waiting")]
    Full { max: usize, what: &'static str },
}

/// One kind of job: how to start, stop and report it.
pub trait JobKind: 'static {
    type Spec: Clone + 'static;
    type Handle: Clone + 'static;
    type Error: std::fmt::Display;
    /// Plural, for messages ("backups").
    const WHAT: &'static str;

    /// The key the queue dedupes by (where it does).
    fn key(spec: &Self::Spec) -> String;
    /// Starts `run`; the receiver resolves when the job finished, however it ended.
    fn start(
        &self,
        run: u64,
        spec: Self::Spec,
    ) -> impl Future<Output = Result<(Self::Handle, oneshot::Receiver<()>), Self::Error>>;
    /// Records a job that could not start (for `status`).
    fn start_failed(&self, run: u64, spec: Self::Spec, error: Self::Error);
    /// Whether a finished job's actor still runs (draining its outboxes).
    fn alive(handle: &Self::Handle) -> bool;
    fn stop(handle: Self::Handle) -> impl Future<Output = ()>;
    /// The work between two jobs.
    fn between(&self) -> impl Future<Output = ()>;
    /// The keys waiting, for `status`.
    fn publish_queue(&self, keys: Vec<String>);
}

pub struct Runner<K: JobKind> {
    kind: K,
    machine: RefCell<Instance<JobQueue>>,
    /// What each pending or running run does.
    specs: RefCell<BTreeMap<u64, K::Spec>>,
    /// The running job and the draining one.
    handles: RefCell<BTreeMap<u64, K::Handle>>,
    /// Outputs the loop performs in order (bounded by the queue's bound: a few per job).
    work: RefCell<VecDeque<Output>>,
    wake: Notify,
}

impl<K: JobKind> Runner<K> {
    /// Starts the runner's loop on the current event loop.
    pub fn start(kind: K, queue: JobQueue) -> Rc<Self> {
        let runner = Rc::new(Runner {
            kind,
            machine: RefCell::new(Instance::new(queue, K::WHAT)),
            specs: RefCell::new(BTreeMap::new()),
            handles: RefCell::new(BTreeMap::new()),
            work: RefCell::new(VecDeque::new()),
            wake: Notify::new(),
        });
        let looping = runner.clone();
        actix::spawn(async move { looping.run().await });
        runner
    }

    pub fn kind(&self) -> &K {
        &self.kind
    }

    /// Steps the queue; returns the request's answers, hands the rest to the loop.
    fn step(&self, event: &Event) -> Option<Vec<Output>> {
        let stepped = self.machine.borrow_mut().step(event, &ctx_now())?;
        let mut answers = Vec::new();
        for output in stepped.outputs {
            match output {
                Output::Accepted { .. } | Output::Refused { .. } => answers.push(output),
                Output::Queue(keys) => self.kind.publish_queue(keys),
                other => self.work.borrow_mut().push_back(other),
            }
        }
        self.wake.notify_one();
        Some(answers)
    }

    fn stopped(&self) -> bool {
        self.machine.borrow().is_terminal()
    }

    /// Queues one job per spec; returns the run numbers to wait for (a spec whose key is already
    /// pending gets that run's number).
    pub fn request(&self, specs: Vec<K::Spec>) -> Result<Vec<u64>, Refused> {
        let keys: Vec<String> = specs.iter().map(K::key).collect();
        let Some(answers) = self.step(&Event::Request { keys }) else {
            return Err(Refused::ShuttingDown);
        };
        self.accepted(answers, specs)
    }

    /// Records the specs of what the queue accepted: one answer per spec, in the order asked.
    fn accepted(&self, answers: Vec<Output>, specs: Vec<K::Spec>) -> Result<Vec<u64>, Refused> {
        let mut runs = Vec::new();
        for (answer, spec) in answers.into_iter().zip(specs) {
            match answer {
                Output::Refused { max } => {
                    return Err(Refused::Full { max, what: K::WHAT });
                }
                Output::Accepted { run, new, .. } => {
                    if new {
                        self.specs.borrow_mut().insert(run, spec);
                    }
                    runs.push(run);
                }
                _ => {}
            }
        }
        Ok(runs)
    }

    /// The schedule's tick: the configured sources with their last finish (read off the loop by
    /// the caller), each with its spec.
    pub fn schedule(&self, sources: Vec<(crate::fsm::jobs::Scheduled, K::Spec)>) {
        let scheduled = sources.iter().map(|(s, _)| s.clone()).collect();
        let Some(answers) = self.step(&Event::Schedule { sources: scheduled }) else {
            return;
        };
        for answer in answers {
            if let Output::Accepted { key, run, .. } = answer
                && let Some((_, spec)) = sources.iter().find(|(s, _)| s.key == key)
            {
                tracing::info!(source = %key, run, "scheduled {} due", K::WHAT);
                self.specs.borrow_mut().insert(run, spec.clone());
            }
        }
    }

    /// Stops taking jobs and stops the running (and draining) one; returns once they stopped.
    pub async fn shutdown(&self) {
        let stepped = self
            .machine
            .borrow_mut()
            .step(&JobQueue::shutdown_event(), &ctx_now());
        // The loop sees the queue stopped and ends.
        self.wake.notify_one();
        for output in stepped.map(|s| s.outputs).unwrap_or_default() {
            match output {
                Output::Queue(keys) => self.kind.publish_queue(keys),
                other => self.perform(other).await,
            }
        }
    }

    async fn run(self: Rc<Self>) {
        loop {
            self.clone().perform_loop().await;
            if self.stopped() {
                return;
            }
            self.wake.notified().await;
        }
    }

    async fn perform_loop(self: Rc<Self>) {
        loop {
            let next = self.work.borrow_mut().pop_front();
            let Some(output) = next else { return };
            match output {
                Output::Start { run, .. } => {
                    let me = self.clone();
                    actix::spawn(async move { me.start_job(run).await });
                }
                Output::Between => {
                    let me = self.clone();
                    actix::spawn(async move {
                        me.kind.between().await;
                        me.step(&Event::BetweenDone);
                    });
                }
                other => self.perform(other).await,
            }
        }
    }

    /// Outputs performed in place (stops).
    async fn perform(&self, output: Output) {
        match output {
            Output::StopDraining { run } => {
                let handle = self.handles.borrow_mut().remove(&run);
                if let Some(handle) = handle {
                    K::stop(handle).await;
                }
            }
            Output::Stop { runs } => {
                for run in runs {
                    let handle = self.handles.borrow_mut().remove(&run);
                    if let Some(handle) = handle {
                        K::stop(handle).await;
                    }
                }
                self.specs.borrow_mut().clear();
            }
            // Started by the loop (never reached for them here).
            Output::Start { .. } | Output::Between => {}
            Output::Accepted { .. } | Output::Refused { .. } | Output::Queue(_) => {}
        }
    }

    async fn start_job(self: Rc<Self>, run: u64) {
        let spec = self.specs.borrow_mut().remove(&run);
        let Some(spec) = spec else {
            self.step(&Event::StartFailed { run });
            return;
        };
        match self.kind.start(run, spec.clone()).await {
            Ok((handle, done)) => {
                if self.step(&Event::Started { run }).is_none() {
                    // Stopped while it started.
                    K::stop(handle).await;
                    return;
                }
                self.handles.borrow_mut().insert(run, handle.clone());
                let _ = done.await;
                let alive = K::alive(&handle);
                if !alive {
                    self.handles.borrow_mut().remove(&run);
                }
                self.step(&Event::Finished { run, alive });
            }
            Err(error) => {
                self.kind.start_failed(run, spec, error);
                self.step(&Event::StartFailed { run });
            }
        }
    }
}
