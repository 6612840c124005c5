//! Actors: one generic actix shell (`shell::Shell`) runs a pure machine from `fsm` and hands its
//! actions to a `Driver` that does the IO. Actix knowledge stays in this module.

pub mod customer;
pub mod identity;
pub mod network;
pub mod registry;
pub mod session;
pub mod shell;
pub mod supplier;

pub use registry::Registry;
pub use shell::{Driver, Fire, Input, Io, Shell, Shutdown};
