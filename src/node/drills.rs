//! Restore drills: one at a time, on request (`bitdust drill`) or on schedule
//! (`monitor.drill_interval`); the latest report is kept in the database so that it outlives a
//! restart and `status` can show it.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Duration;

use crate::actors::drill::{DrillError, DrillReport, DrillWiring};
use crate::store::KvStore;
use crate::store::catalog;

const LAST_DRILL: &str = "last-drill";

#[derive(Debug, thiserror::Error)]
pub enum DrillRunError {
    #[error("a restore drill is already running")]
    Busy,
    #[error(transparent)]
    Drill(#[from] DrillError),
}

pub struct Drills {
    wiring: DrillWiring,
    store: Arc<dyn KvStore>,
    /// The latest restore drill (also kept in the database, so it outlives a restart).
    last: RefCell<Option<DrillReport>>,
    running: Cell<bool>,
}

impl Drills {
    pub fn new(wiring: DrillWiring, store: Arc<dyn KvStore>) -> Drills {
        let last = load_last(store.as_ref());
        Drills {
            wiring,
            store,
            last: RefCell::new(last),
            running: Cell::new(false),
        }
    }

    pub fn last(&self) -> Option<DrillReport> {
        self.last.borrow().clone()
    }

    /// One restore drill now (none while another runs); its report is kept and saved.
    pub async fn run(&self) -> Result<DrillReport, DrillRunError> {
        if self.running.replace(true) {
            return Err(DrillRunError::Busy);
        }
        let result = self.wiring.run_now(crate::actors::shell::ctx_now).await;
        self.running.set(false);
        let report = result?;
        if report.passed() {
            tracing::info!(source = %report.source, files = report.files, bytes = report.bytes,
                "restore drill passed");
        } else {
            tracing::warn!(source = %report.source, failures = report.failures.len(),
                "restore drill FAILED: files could not be restored byte for byte");
        }
        *self.last.borrow_mut() = Some(report.clone());
        if let Ok(bytes) = serde_json::to_vec(&report) {
            let mut batch = crate::store::Batch::new();
            crate::store::health::put_meta(&mut batch, LAST_DRILL, &bytes);
            let kv = self.store.clone();
            // Off the event loop: the disk may be slow.
            tokio::task::spawn_blocking(move || kv.write(batch));
        }
        Ok(report)
    }

    /// A drill is due: none yet and a version exists, or the last is `interval` old.
    pub fn due(&self, interval: Duration, now_unix: u64) -> bool {
        if self.running.get() {
            return false;
        }
        match self.last.borrow().as_ref() {
            Some(last) => now_unix.saturating_sub(last.at) >= interval.as_secs(),
            None => catalog::snapshots(self.store.as_ref()).is_ok_and(|s| !s.is_empty()),
        }
    }
}

/// The last drill's report, as saved (none, or unreadable: none).
fn load_last(kv: &dyn KvStore) -> Option<DrillReport> {
    let bytes = crate::store::health::meta(kv, LAST_DRILL).ok()??;
    serde_json::from_slice(&bytes).ok()
}
