//! Restores asked for through the control socket run one at a time, in order.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use actix::prelude::*;
use tokio::sync::Notify;

use crate::actors::Shell;
use crate::actors::restore_worker::{self, RestoreSpec, RestoreWiring, RestoreWorkerDriver};
use crate::actors::status::RestoreResult;

const MAX_QUEUED: usize = 16;

pub struct Restores {
    wiring: RestoreWiring,
    queue: RefCell<VecDeque<(u64, RestoreSpec)>>,
    wake: Notify,
    next_run: Cell<u64>,
    current: RefCell<Option<Addr<Shell<RestoreWorkerDriver>>>>,
    stopping: Cell<bool>,
}

impl Restores {
    pub fn start(wiring: RestoreWiring) -> Rc<Restores> {
        let restores = Rc::new(Restores {
            wiring,
            queue: RefCell::new(VecDeque::new()),
            wake: Notify::new(),
            next_run: Cell::new(1),
            current: RefCell::new(None),
            stopping: Cell::new(false),
        });
        let runner = restores.clone();
        actix::spawn(async move { runner.run().await });
        restores
    }

    /// Queues the restores; returns their run numbers.
    pub fn request(&self, specs: Vec<RestoreSpec>) -> Result<Vec<u64>, String> {
        if self.stopping.get() {
            return Err("the node is shutting down".into());
        }
        if self.queue.borrow().len() + specs.len() > MAX_QUEUED {
            return Err(format!("{MAX_QUEUED} restores are already waiting"));
        }
        let mut runs = Vec::new();
        for spec in specs {
            let run = self.next_run.get();
            self.next_run.set(run + 1);
            self.queue.borrow_mut().push_back((run, spec));
            runs.push(run);
        }
        self.wake.notify_one();
        Ok(runs)
    }

    async fn run(self: Rc<Self>) {
        loop {
            let next = self.queue.borrow_mut().pop_front();
            let Some((run, spec)) = next else {
                if self.stopping.get() {
                    return;
                }
                self.wake.notified().await;
                continue;
            };
            if self.stopping.get() {
                return;
            }
            let (source, snapshot, to) = (
                spec.source.clone(),
                spec.snapshot.0,
                spec.to.display().to_string(),
            );
            match restore_worker::start(self.wiring.clone(), run, spec).await {
                Ok((addr, done)) => {
                    *self.current.borrow_mut() = Some(addr);
                    let _ = done.await;
                    *self.current.borrow_mut() = None;
                }
                Err(why) => {
                    tracing::error!(run, error = %why, "cannot start a restore");
                    if let Ok(mut s) = self.wiring.status.lock() {
                        s.finished.push(RestoreResult {
                            run,
                            snapshot,
                            source,
                            to,
                            outcome: crate::actors::status::RestoreOutcome::Failed,
                            error: Some(why),
                            ..RestoreResult::default()
                        });
                    }
                }
            }
        }
    }

    /// Stops taking restores and interrupts the running one.
    pub async fn shutdown(&self) {
        self.stopping.set(true);
        self.queue.borrow_mut().clear();
        self.wake.notify_one();
        let current = self.current.borrow().clone();
        if let Some(addr) = current {
            let _ = addr.send(crate::actors::Shutdown).await;
        }
    }
}
