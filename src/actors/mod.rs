//! Actors: one generic actix shell (`shell::Shell`) runs a pure machine from `fsm` and hands its
//! outputs to a `Driver` that does the IO. Actix knowledge stays in this module.

pub mod customer;
pub mod identity;
pub mod network;
pub mod registry;
pub mod router;
pub mod session;
pub mod shell;
pub mod status;
pub mod supplier;

pub use registry::Registry;
pub use shell::{Deliver, Driver, Input, Io, Query, Shell, Shutdown};
