//! The node: config, home directory, logging, control socket, signals, and the wiring of actors.

pub mod backups;
pub mod config;
pub mod control;
pub mod durability;
pub mod health;
pub mod home;
pub mod logging;
pub mod recover;
pub mod restores;
pub mod run;
pub mod signals;
pub mod units;
