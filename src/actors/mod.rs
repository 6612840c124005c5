//! Actors: one generic actix shell (`shell::Shell`) runs a pure machine from `fsm` and hands its
//! outputs to a `Driver` that does the IO. Actix knowledge stays in this module.

pub mod backup_job;
pub mod catalog_upload;
pub mod drill;
pub mod fire_hire;
pub mod fragments;
pub mod identity;
pub mod monitor;
pub mod network_connector;
pub mod peer_session;
pub mod rebuilder;
pub mod registry;
pub mod restore_worker;
pub mod router;
pub mod services;
pub mod shell;
pub mod status;
pub mod supplier_connector;
pub mod supplier_service;

pub use registry::Registry;
pub use shell::{Deliver, Driver, Input, Io, Query, Shell, Shutdown};

/// Queues `batch` on the writer thread without waiting; a failure (now or when the write runs)
/// is logged as `what`. For writes no one waits on (positions, a friend's newer identity).
pub(crate) fn persist(
    writer: &crate::store::Writer,
    batch: crate::store::Batch,
    what: &'static str,
) {
    match writer.submit(batch) {
        Ok(pending) => {
            actix::spawn(async move {
                if let Err(e) = pending.await {
                    tracing::error!(error = %e, "{what}");
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "{what}"),
    }
}
