//! Restores asked for through the control socket run one at a time, in order: the restore side
//! of the `fsm::jobs` runner (no dedupe: every request is its own run; nothing between two).

use std::rc::Rc;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::jobs::{JobKind, Refused, Runner};
use crate::actors::Shell;
use crate::actors::restore_worker::{self, RestoreSpec, RestoreWiring, RestoreWorkerDriver};
use crate::actors::status::RestoreResult;
use crate::fsm::jobs::JobQueue;

const MAX_QUEUED: usize = 16;

pub struct RestoreKind {
    wiring: RestoreWiring,
}

impl JobKind for RestoreKind {
    type Spec = RestoreSpec;
    type Handle = Addr<Shell<RestoreWorkerDriver>>;
    type Error = restore_worker::RestoreStartError;
    const WHAT: &'static str = "restores";

    fn key(spec: &RestoreSpec) -> String {
        format!("{}#{}", spec.source, spec.snapshot.0)
    }

    async fn start(
        &self,
        run: u64,
        spec: RestoreSpec,
    ) -> Result<(Self::Handle, oneshot::Receiver<()>), Self::Error> {
        restore_worker::start(self.wiring.clone(), run, spec).await
    }

    fn start_failed(&self, run: u64, spec: RestoreSpec, error: Self::Error) {
        tracing::error!(run, error = %error, "cannot start a restore");
        if let Ok(mut s) = self.wiring.status.lock() {
            s.finished.push(RestoreResult {
                run,
                snapshot: spec.snapshot.0,
                source: spec.source,
                to: spec.to.display().to_string(),
                outcome: crate::actors::status::RestoreOutcome::Failed,
                error: Some(error.to_string()),
                ..RestoreResult::default()
            });
        }
    }

    fn alive(_: &Self::Handle) -> bool {
        // A finished restore leaves nothing running.
        false
    }

    async fn stop(handle: Self::Handle) {
        let _ = handle.send(crate::actors::Shutdown).await;
    }

    async fn between(&self) {}

    fn publish_queue(&self, _: Vec<String>) {}
}

pub struct Restores {
    runner: Rc<Runner<RestoreKind>>,
}

impl Restores {
    pub fn start(wiring: RestoreWiring) -> Rc<Restores> {
        let runner = Runner::start(RestoreKind { wiring }, JobQueue::new(MAX_QUEUED, false));
        Rc::new(Restores { runner })
    }

    /// Queues the restores; returns their run numbers.
    pub fn request(&self, specs: Vec<RestoreSpec>) -> Result<Vec<u64>, Refused> {
        self.runner.request(specs)
    }

    /// Stops taking restores and interrupts the running one.
    pub async fn shutdown(&self) {
        self.runner.shutdown().await;
    }
}
