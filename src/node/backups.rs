//! Which backup runs when: jobs asked for by `bitdust backup` and by the schedule run one at a
//! time, in order; a job a previous run left unfinished is resumed first. One job at a time
//! keeps the outbox, the deduplication and the suppliers' bandwidth simple and bounded.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::Notify;

use super::config::{BackupSection, SourceEntry};
use crate::actors::Shell;
use crate::actors::backup_job::{self, BackupJobDriver, BackupWiring, JobSpec};
use crate::actors::status::JobResult;
use crate::store::catalog;
use crate::store::jobs::JobRecord;

/// Jobs waiting at most; more requests are refused (the CLI says so).
const MAX_QUEUED: usize = 32;

struct Queued {
    run: u64,
    spec: JobSpec,
    resume: Option<JobRecord>,
}

/// The job running now.
struct Running {
    run: u64,
    source: String,
    addr: Addr<Shell<BackupJobDriver>>,
}

pub struct Backups {
    wiring: BackupWiring,
    queue: RefCell<VecDeque<Queued>>,
    wake: Notify,
    next_run: Cell<u64>,
    current: RefCell<Option<Running>>,
    /// A committed job still sending fragments to suppliers that were away. It is stopped
    /// before the next job starts, which takes over its outbox.
    draining: RefCell<Option<Addr<Shell<BackupJobDriver>>>>,
    stopping: Cell<bool>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The job spec for a configured source.
pub fn spec_of(source: &SourceEntry) -> JobSpec {
    JobSpec {
        source: source.path.display().to_string(),
        root: source.path.clone(),
        excludes: source.exclude.clone(),
    }
}

impl Backups {
    /// Starts the runner; `unfinished` jobs (from an earlier run) go first.
    pub fn start(wiring: BackupWiring, unfinished: Vec<JobRecord>) -> Rc<Backups> {
        let backups = Rc::new(Backups {
            wiring,
            queue: RefCell::new(VecDeque::new()),
            wake: Notify::new(),
            next_run: Cell::new(1),
            current: RefCell::new(None),
            draining: RefCell::new(None),
            stopping: Cell::new(false),
        });
        for record in unfinished {
            let root = PathBuf::from(String::from_utf8_lossy(&record.root).into_owned());
            let spec = JobSpec {
                source: record.source.clone(),
                root,
                excludes: Vec::new(),
            };
            tracing::info!(snapshot = record.snapshot.0, source = %record.source,
                "resuming an unfinished backup");
            backups.enqueue(spec, Some(record));
        }
        let runner = backups.clone();
        actix::spawn(async move { runner.run().await });
        backups
    }

    fn enqueue(&self, spec: JobSpec, resume: Option<JobRecord>) -> u64 {
        let run = self.next_run.get();
        self.next_run.set(run + 1);
        self.queue
            .borrow_mut()
            .push_back(Queued { run, spec, resume });
        self.publish_queue();
        self.wake.notify_one();
        run
    }

    fn publish_queue(&self) {
        let names = self
            .queue
            .borrow()
            .iter()
            .map(|q| q.spec.source.clone())
            .collect();
        if let Ok(mut s) = self.wiring.status.lock() {
            s.queued = names;
        }
    }

    /// Whether a job for `source` is running or waiting.
    fn busy_with(&self, source: &str) -> bool {
        self.current
            .borrow()
            .as_ref()
            .is_some_and(|r| r.source == source)
            || self.queue.borrow().iter().any(|q| q.spec.source == source)
    }

    /// Queues one job per spec; a source already running or waiting is not queued twice (its
    /// pending run number is returned). Returns the run numbers to wait for.
    pub fn request(&self, specs: Vec<JobSpec>) -> Result<Vec<u64>, String> {
        if self.stopping.get() {
            return Err("the node is shutting down".into());
        }
        let mut runs = Vec::new();
        for spec in specs {
            if let Some(run) = self.pending_run(&spec.source) {
                runs.push(run);
                continue;
            }
            if self.queue.borrow().len() >= MAX_QUEUED {
                return Err(format!("{MAX_QUEUED} backups are already waiting"));
            }
            runs.push(self.enqueue(spec, None));
        }
        Ok(runs)
    }

    fn pending_run(&self, source: &str) -> Option<u64> {
        if let Some(r) = self.current.borrow().as_ref()
            && r.source == source
        {
            return Some(r.run);
        }
        self.queue
            .borrow()
            .iter()
            .find(|q| q.spec.source == source)
            .map(|q| q.run)
    }

    async fn run(self: Rc<Self>) {
        loop {
            let next = self.queue.borrow_mut().pop_front();
            let Some(job) = next else {
                if self.stopping.get() {
                    return;
                }
                self.wake.notified().await;
                continue;
            };
            self.publish_queue();
            if self.stopping.get() {
                return;
            }
            let source = job.spec.source.clone();
            let draining = self.draining.borrow_mut().take();
            if let Some(addr) = draining {
                let _ = addr.send(crate::actors::Shutdown).await;
            }
            match backup_job::start(
                self.wiring.clone(),
                job.run,
                job.spec,
                job.resume,
                unix_now(),
            )
            .await
            {
                Ok((addr, done)) => {
                    *self.current.borrow_mut() = Some(Running {
                        run: job.run,
                        source,
                        addr,
                    });
                    let _ = done.await;
                    if let Some(running) = self.current.borrow_mut().take()
                        && running.addr.connected()
                    {
                        *self.draining.borrow_mut() = Some(running.addr);
                    }
                    // Between jobs: nothing dedups against the catalog while it is pruned.
                    if let Err(why) = backup_job::prune(&self.wiring).await {
                        tracing::warn!(error = %why, "retention did not complete; tried again after the next backup");
                    }
                }
                Err(why) => {
                    tracing::error!(run = job.run, source = %source, error = %why,
                        "cannot start a backup");
                    if let Ok(mut s) = self.wiring.status.lock() {
                        s.finished.push(JobResult {
                            run: job.run,
                            source,
                            outcome: crate::actors::status::BackupOutcome::Failed,
                            error: Some(why),
                            ..JobResult::default()
                        });
                    }
                }
            }
        }
    }

    /// Stops taking jobs and interrupts the running one (it resumes at the next start).
    pub async fn shutdown(&self) {
        self.stopping.set(true);
        self.queue.borrow_mut().clear();
        self.wake.notify_one();
        let current = self.current.borrow().as_ref().map(|r| r.addr.clone());
        let draining = self.draining.borrow_mut().take();
        for addr in current.into_iter().chain(draining) {
            let _ = addr.send(crate::actors::Shutdown).await;
        }
    }

    /// Queues every configured source whose schedule is due (its last snapshot older than its
    /// interval, or none yet).
    pub fn schedule_due(&self, section: &BackupSection) {
        let now = unix_now();
        for source in &section.sources {
            let spec = spec_of(source);
            if self.busy_with(&spec.source) {
                continue;
            }
            let every: Duration = source.schedule.unwrap_or(section.schedule).get();
            let last = catalog::latest(&*self.wiring.kv, &spec.source)
                .ok()
                .flatten()
                .map(|s| s.finished_at);
            let due = last.is_none_or(|at| at.saturating_add(every.as_secs()) <= now);
            if due {
                tracing::info!(source = %spec.source, "scheduled backup due");
                let _ = self.request(vec![spec]);
            }
        }
    }
}
