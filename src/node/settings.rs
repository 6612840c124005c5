//! The actors' settings, each read from the config in one place: what `config.toml` says becomes
//! the figures each driver is started with (a config key is mapped here and nowhere else).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::config::{AcceptPolicy, Config};
use super::control;
use super::health::DiskHealth;
use super::home::Home;
use crate::actors::backup_job::BackupSettings;
use crate::actors::drill::DrillSettings;
use crate::actors::fire_hire::CustomerSettings;
use crate::actors::monitor::MonitorSettings;
use crate::actors::network_connector::NetworkSettings;
use crate::actors::peer_session::SessionShared;
use crate::actors::supplier_service::{SupplierInput, SupplierSettings};
use crate::crypto::identity::{Identity, NodeId};
use crate::crypto::keys::NodeKeys;
use crate::fsm::network_connector::NetworkConnector;
use crate::net::link::TrustPolicy;

/// Each request to a peer waits this long for its answer (every driver that asks peers).
pub fn request_timeout(config: &Config) -> Duration {
    config.network.request_timeout.get()
}

/// Positions to hire: `k + m`.
pub fn positions(config: &Config) -> u32 {
    u32::from(config.backup.data_shards) + u32::from(config.backup.parity_shards)
}

pub fn backup(config: &Config, home: &Home) -> BackupSettings {
    let b = &config.backup;
    BackupSettings {
        data_shards: u32::from(b.data_shards),
        parity_shards: u32::from(b.parity_shards),
        block_size: b.block_size.0 as usize,
        zstd_level: crate::data::DEFAULT_ZSTD_LEVEL,
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        request_timeout: request_timeout(config),
        outbox: home.outbox_dir(),
        keep_versions: b.keep_versions as usize,
    }
}

pub fn monitor(config: &Config) -> MonitorSettings {
    let mo = &config.monitor;
    MonitorSettings {
        interval: mo.interval.get(),
        fire_after: mo.fire_after.get(),
        fire_after_failed_audits: mo.fire_after_failed_audits,
        audits_per_round: mo.audits_per_round as usize,
        request_timeout: request_timeout(config),
    }
}

pub fn drill(config: &Config) -> DrillSettings {
    DrillSettings {
        request_timeout: request_timeout(config),
        files: config.monitor.drill_files as usize,
        ..Default::default()
    }
}

/// How often a restore drill runs.
pub fn drill_interval(config: &Config) -> Duration {
    config.monitor.drill_interval.get()
}

/// How long a lost fragment stays lost before it is rebuilt (for the durability estimate):
/// firing waits `fire_after`; the rebuild itself is assumed to take at most an hour.
pub fn repair_window(config: &Config) -> Duration {
    config.monitor.fire_after.get() + Duration::from_secs(3600)
}

pub fn customer(config: &Config) -> CustomerSettings {
    let b = &config.backup;
    CustomerSettings {
        data_shards: u32::from(b.data_shards),
        parity_shards: u32::from(b.parity_shards),
        space_per_supplier: b.space_per_supplier.0,
        request_timeout: request_timeout(config),
    }
}

/// Whether strangers may hire this node.
pub fn open(config: &Config) -> bool {
    config.supplier.accept == AcceptPolicy::Open
}

pub fn supplier(config: &Config, root: PathBuf, disk: Arc<DiskHealth>) -> SupplierSettings {
    SupplierSettings {
        root,
        donated: config.supplier.donated.0,
        disk,
        open: open(config),
        grace: config.supplier.grace_period.get(),
    }
}

/// The supplier's live settings after a reload.
pub fn supplier_reconfigure(config: &Config) -> SupplierInput {
    SupplierInput::Reconfigure {
        donated: config.supplier.donated.0,
        open: open(config),
        grace: config.supplier.grace_period.get(),
    }
}

pub fn trust(config: &Config) -> TrustPolicy {
    TrustPolicy {
        trusted: Default::default(),
        open: open(config),
    }
}

/// What every peer session shares: keys, the published identity, the trust policy, limits.
pub fn session(
    config: &Config,
    keys: &NodeKeys,
    identity: watch::Receiver<Option<Identity>>,
    policy: watch::Receiver<TrustPolicy>,
    shaper: Arc<crate::net::bandwidth::Shaper>,
) -> SessionShared {
    let n = &config.network;
    SessionShared {
        noise_secret: zeroize::Zeroizing::new(keys.noise_secret_bytes()),
        identity,
        policy,
        connect_timeout: n.connect_timeout.get(),
        handshake_timeout: n.handshake_timeout.get(),
        max_message: n.max_message.0 as usize,
        queue: n.outbound_queue,
        budgets: crate::net::budget::Budgets::new(
            n.peer_budget.0 as usize,
            n.max_message.0 as usize,
        ),
        dropped_notices: Default::default(),
        shaper,
    }
}

pub fn network(config: &Config) -> NetworkSettings {
    let n = &config.network;
    NetworkSettings {
        listen: config.node.listen,
        keepalive: n.keepalive.get(),
        dead_after: n.dead_after.get(),
        admission: n.admission_limits(),
    }
}

/// The network machine with its reconnect backoff.
pub fn connector(config: &Config, node_id: NodeId) -> NetworkConnector {
    let n = &config.network;
    NetworkConnector {
        reconnect_min: n.reconnect_min.get(),
        reconnect_max: n.reconnect_max.get(),
        ..NetworkConnector::new(node_id)
    }
}

/// Largest message a peer may send (the recovery fetch reads it before the network starts).
pub fn max_message(config: &Config) -> usize {
    config.network.max_message.0 as usize
}

pub fn control_limits(config: &Config) -> control::Limits {
    control::Limits {
        read_timeout: config.node.control_timeout.get(),
        max_clients: config.node.control_clients,
    }
}
