//! Which backup runs when: jobs asked for by `bitdust backup` and by the schedule run one at a
//! time, in order; a job a previous run left unfinished is resumed first. One job at a time
//! keeps the outbox, the deduplication and the suppliers' bandwidth simple and bounded. The rules
//! (queue, one pending run per source, the due rule, retention between jobs, the handover from a
//! draining job) are the `fsm::jobs` machine's; this is the backup side of its runner.

use std::path::PathBuf;
use std::rc::Rc;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::config::{BackupSection, SourceEntry};
use super::jobs::{JobKind, Refused, Runner};
use crate::actors::Shell;
use crate::actors::backup_job::{self, BackupError, BackupJobDriver, BackupWiring, JobSpec};
use crate::actors::status::JobResult;
use crate::fsm::jobs::{JobQueue, Scheduled};
use crate::store::catalog;
use crate::store::jobs::JobRecord;

/// Jobs waiting at most; more requests are refused (the CLI says so).
const MAX_QUEUED: usize = 32;

/// The job spec for a configured source.
pub fn spec_of(source: &SourceEntry) -> JobSpec {
    JobSpec {
        source: source.path.display().to_string(),
        root: source.path.clone(),
        excludes: source.exclude.clone(),
    }
}

/// A backup job: what to back up, and the record of an unfinished one to resume.
pub struct BackupKind {
    wiring: BackupWiring,
}

impl JobKind for BackupKind {
    type Spec = (JobSpec, Option<JobRecord>);
    type Handle = Addr<Shell<BackupJobDriver>>;
    type Error = BackupError;
    const WHAT: &'static str = "backups";

    fn key((spec, _): &Self::Spec) -> String {
        spec.source.clone()
    }

    async fn start(
        &self,
        run: u64,
        (spec, resume): Self::Spec,
    ) -> Result<(Self::Handle, oneshot::Receiver<()>), BackupError> {
        backup_job::start(self.wiring.clone(), run, spec, resume, crate::unix_now()).await
    }

    fn start_failed(&self, run: u64, (spec, _): Self::Spec, error: BackupError) {
        tracing::error!(run, source = %spec.source, error = %error, "cannot start a backup");
        if let Ok(mut s) = self.wiring.status.lock() {
            s.finished.push(JobResult {
                run,
                source: spec.source,
                outcome: crate::actors::status::BackupOutcome::Failed,
                error: Some(error.to_string()),
                ..JobResult::default()
            });
        }
    }

    fn alive(handle: &Self::Handle) -> bool {
        handle.connected()
    }

    async fn stop(handle: Self::Handle) {
        let _ = handle.send(crate::actors::Shutdown).await;
    }

    /// Retention: nothing dedups against the catalog while it is pruned.
    async fn between(&self) {
        if let Err(why) = backup_job::prune(&self.wiring).await {
            tracing::warn!(error = %why, "retention did not complete; tried again after the next backup");
        }
    }

    fn publish_queue(&self, keys: Vec<String>) {
        if let Ok(mut s) = self.wiring.status.lock() {
            s.queued = keys;
        }
    }
}

pub struct Backups {
    runner: Rc<Runner<BackupKind>>,
}

impl Backups {
    /// Starts the runner; `unfinished` jobs (from an earlier run) go first.
    pub fn start(wiring: BackupWiring, unfinished: Vec<JobRecord>) -> Rc<Backups> {
        let runner = Runner::start(BackupKind { wiring }, JobQueue::new(MAX_QUEUED, true));
        let resumed: Vec<_> = unfinished
            .into_iter()
            .map(|record| {
                let root = PathBuf::from(String::from_utf8_lossy(&record.root).into_owned());
                tracing::info!(snapshot = record.snapshot.0, source = %record.source,
                    "resuming an unfinished backup");
                let spec = JobSpec {
                    source: record.source.clone(),
                    root,
                    excludes: Vec::new(),
                };
                (spec, Some(record))
            })
            .collect();
        if !resumed.is_empty()
            && let Err(why) = runner.request(resumed)
        {
            tracing::error!(error = %why, "cannot resume the unfinished backups");
        }
        Rc::new(Backups { runner })
    }

    /// Queues one job per spec; a source already running or waiting is not queued twice (its
    /// pending run number is returned). Returns the run numbers to wait for.
    pub fn request(&self, specs: Vec<JobSpec>) -> Result<Vec<u64>, Refused> {
        self.runner
            .request(specs.into_iter().map(|s| (s, None)).collect())
    }

    /// Stops taking jobs and interrupts the running one (it resumes at the next start).
    pub async fn shutdown(&self) {
        self.runner.shutdown().await;
    }

    /// Queues every configured source whose schedule is due (its last snapshot older than its
    /// interval, or none yet). The catalog is read on a worker thread, not on the node's loop.
    pub fn schedule_due(&self, section: &BackupSection) {
        let kv = self.runner.kind().wiring.services.kv.clone();
        let sources: Vec<(JobSpec, std::time::Duration)> = section
            .sources
            .iter()
            .map(|s| (spec_of(s), s.schedule.unwrap_or(section.schedule).get()))
            .collect();
        let runner = self.runner.clone();
        actix::spawn(async move {
            let read = tokio::task::spawn_blocking(move || {
                sources
                    .into_iter()
                    .map(|(spec, every)| {
                        let last_finished = catalog::latest(&*kv, &spec.source)
                            .ok()
                            .flatten()
                            .map(|s| s.finished_at);
                        let scheduled = Scheduled {
                            key: spec.source.clone(),
                            last_finished,
                            every,
                        };
                        (scheduled, (spec, None))
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            match read {
                Ok(sources) => runner.schedule(sources),
                Err(e) => tracing::warn!(error = %e, "cannot read the schedule"),
            }
        });
    }
}
