//! The node: config, home directory, logging, control socket, signals, and the wiring of actors.

pub mod backups;
pub mod bandwidth;
pub mod client;
pub mod config;
pub mod control;
pub mod drills;
pub mod durability;
pub mod handlers;
pub mod health;
pub mod home;
pub mod jobs;
pub mod logging;
pub mod offline;
pub mod recover;
pub mod reload;
pub mod restores;
pub mod run;
pub mod settings;
pub mod signals;
pub mod units;
pub mod wiring;
