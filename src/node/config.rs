//! `config.toml`: typed, validated, with `BITDUST_SECTION__KEY` environment overrides.
//!
//! Every error names the key and the file. Unknown keys are errors (a typo must not silently
//! fall back to a default). Which settings SIGHUP can change is in [`Config::restart_needed`]
//! and in the commented default file that `bitdust init` writes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units::{ByteSize, GIB, MIB, Rate, Span};
use crate::crypto::identity::{Identity, validate_contact, validate_name};
use crate::net::bandwidth::{Limits, MINUTES_PER_DAY, Rates, Window};

pub const CONFIG_FILE: &str = "config.toml";
/// Environment variables `BITDUST_<SECTION>__<KEY>` override the file.
pub const ENV_PREFIX: &str = "BITDUST";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {message}")]
    Read { file: PathBuf, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptPolicy {
    /// Only nodes listed as peers may become customers.
    Peers,
    /// Any node that completes an authenticated handshake may become a customer.
    Open,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    pub name: String,
    pub listen: SocketAddr,
    /// Addresses friends dial, `tcp://HOST:PORT`; empty means derived from `listen`.
    pub contacts: Vec<String>,
    /// How long a graceful stop may take before the node exits anyway.
    pub shutdown_timeout: Span,
    /// Space always left free on the home's disk: grants to customers are capped so fragments
    /// never eat into it, and after a disk-full error writes resume once this much is free.
    pub keep_free: ByteSize,
    /// A database write running longer than this shows as "disk stalled" in `status`.
    pub disk_stall: Span,
    /// How long a control client may take to send its request before it is disconnected.
    pub control_timeout: Span,
    /// Control clients served at once; past it the one idle longest is disconnected.
    pub control_clients: usize,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            name: "bitdust-node".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 7771)),
            contacts: Vec::new(),
            shutdown_timeout: Span(Duration::from_secs(5)),
            keep_free: ByteSize(16 * MIB),
            disk_stall: Span(Duration::from_secs(5)),
            control_timeout: Span(Duration::from_secs(5)),
            control_clients: 64,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    pub connect_timeout: Span,
    pub handshake_timeout: Span,
    /// Interval at which a session pings its peer.
    pub keepalive: Span,
    /// How long a ping may go unanswered before the peer counts as unreachable.
    pub dead_after: Span,
    pub request_timeout: Span,
    pub reconnect_min: Span,
    pub reconnect_max: Span,
    /// Messages queued per peer before senders are made to wait.
    pub outbound_queue: usize,
    /// Largest protocol message accepted from a peer.
    pub max_message: ByteSize,
    /// Bytes one peer can make this node hold, all its sessions together: its requests read
    /// and not yet handled, and the replies queued for it. Past it the node reads no more from
    /// that peer until some are done (security review M2).
    pub peer_budget: ByteSize,
    /// Inbound connections allowed to be handshaking at once, all sources together.
    pub max_pending: usize,
    /// Inbound connections allowed to be handshaking at once from one source IP.
    pub max_pending_per_address: usize,
    /// Of `max_pending`, slots kept for friends' hosts (their contact IPs and the IPs they
    /// connected from before).
    pub friend_reserve: usize,
    /// Time an inbound connection has to authenticate (handshake and identity exchange).
    pub preauth_timeout: Span,
}

impl NetworkSection {
    /// The pre-handshake admission limits of this section.
    pub fn admission_limits(&self) -> crate::net::admission::Limits {
        crate::net::admission::Limits {
            max_pending: self.max_pending,
            per_address: self.max_pending_per_address,
            friend_reserve: self.friend_reserve,
            preauth_timeout: self.preauth_timeout.get(),
        }
    }
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            connect_timeout: Span(Duration::from_secs(10)),
            handshake_timeout: Span(Duration::from_secs(10)),
            keepalive: Span(Duration::from_secs(10)),
            dead_after: Span(Duration::from_secs(20)),
            request_timeout: Span(Duration::from_secs(60)),
            reconnect_min: Span(Duration::from_secs(1)),
            reconnect_max: Span(Duration::from_secs(300)),
            outbound_queue: 64,
            max_message: ByteSize(32 * MIB),
            peer_budget: ByteSize(64 * MIB),
            max_pending: 64,
            max_pending_per_address: 8,
            friend_reserve: 16,
            preauth_timeout: Span(Duration::from_secs(5)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupplierSection {
    /// Disk space offered to customers in total.
    pub donated: ByteSize,
    pub accept: AcceptPolicy,
    /// How long a departed customer's fragments are kept before removal.
    pub grace_period: Span,
}

impl Default for SupplierSection {
    fn default() -> Self {
        SupplierSection {
            donated: ByteSize(8 * GIB),
            accept: AcceptPolicy::Peers,
            grace_period: Span(Duration::from_secs(14 * 86_400)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceEntry {
    pub path: PathBuf,
    /// Interval between backups of this source; the `[backup]` schedule when absent.
    #[serde(default)]
    pub schedule: Option<Span>,
    /// Glob patterns left out of the backup.
    #[serde(default)]
    pub exclude: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupSection {
    /// Reed-Solomon data fragments per block (k).
    pub data_shards: u8,
    /// Reed-Solomon parity fragments per block (m); any k of k + m restore a block.
    pub parity_shards: u8,
    pub block_size: ByteSize,
    /// Space to ask of each supplier.
    pub space_per_supplier: ByteSize,
    /// Default interval between scheduled backups.
    pub schedule: Span,
    /// Versions kept per source.
    pub keep_versions: u32,
    pub sources: Vec<SourceEntry>,
}

impl BackupSection {
    /// The layout new snapshots are made with (validated: `k` and `m` at least 1, at most 64
    /// in all). Blocks already stored keep the layout they were made with.
    pub fn layout(&self) -> Result<crate::data::Layout, crate::data::DataError> {
        crate::data::Layout::new(self.data_shards, self.parity_shards)
    }
}

impl Default for BackupSection {
    fn default() -> Self {
        BackupSection {
            data_shards: 4,
            parity_shards: 2,
            block_size: ByteSize(4 * MIB),
            space_per_supplier: ByteSize(GIB),
            schedule: Span(Duration::from_secs(86_400)),
            keep_versions: 7,
            sources: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// The friend's contact card (`bitdust id` on their node).
    pub card: String,
    /// A local label; the card's own name is used when absent.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub format: LogFormat,
    /// Default filter when RUST_LOG is unset, e.g. "info" or "bitdust=debug".
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// Watching the suppliers: audits, firing, restore drills.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorSection {
    /// Between two rounds of lists and audits (a tenth of it while a supplier is unreachable).
    pub interval: Span,
    /// A supplier unreachable this long is replaced (its fragments rebuilt elsewhere).
    pub fire_after: Span,
    /// A supplier failing this many storage audits in a row is replaced.
    pub fire_after_failed_audits: u32,
    /// Fragments audited per supplier per round.
    pub audits_per_round: u32,
    /// Between two restore drills (a sample of files restored in memory and verified).
    pub drill_interval: Span,
    /// Files per drill.
    pub drill_files: u32,
}

impl Default for MonitorSection {
    fn default() -> Self {
        MonitorSection {
            interval: Span(Duration::from_secs(600)),
            fire_after: Span(Duration::from_secs(6 * 3600)),
            fire_after_failed_audits: 3,
            audits_per_round: 2,
            drill_interval: Span(Duration::from_secs(86_400)),
            drill_files: 8,
        }
    }
}

/// Bandwidth limits for a home uplink (issue 22). All of it applies live on SIGHUP, without
/// dropping a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BandwidthSection {
    /// All peers together, each direction (`0`: unlimited).
    pub upload: Rate,
    pub download: Rate,
    /// Each peer on its own, within the totals.
    pub per_peer_upload: Rate,
    pub per_peer_download: Rate,
    /// Peers on this host or the same private network are not limited.
    pub lan_unlimited: bool,
    /// Times of the week with other totals; the first entry that covers a moment wins.
    pub schedule: Vec<ScheduleEntry>,
}

impl Default for BandwidthSection {
    fn default() -> Self {
        BandwidthSection {
            upload: Rate::UNLIMITED,
            download: Rate::UNLIMITED,
            per_peer_upload: Rate::UNLIMITED,
            per_peer_download: Rate::UNLIMITED,
            lan_unlimited: true,
            schedule: Vec::new(),
        }
    }
}

/// One `[[bandwidth.schedule]]` entry: on `days` (default every day), local time `from` until
/// `to` ("HH:MM"; `to` before `from` runs past midnight), these totals replace the usual ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleEntry {
    #[serde(default)]
    pub days: Vec<String>,
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub upload: Option<Rate>,
    #[serde(default)]
    pub download: Option<Rate>,
}

impl BandwidthSection {
    /// The limits this section describes, or the key at fault and why.
    pub fn limits(&self) -> Result<Limits, (String, String)> {
        let mut schedule = Vec::with_capacity(self.schedule.len());
        for (i, entry) in self.schedule.iter().enumerate() {
            let key = |field: &str| format!("bandwidth.schedule[{i}].{field}");
            let days = days_mask(&entry.days).map_err(|why| (key("days"), why))?;
            let from = clock_minute(&entry.from, false).map_err(|why| (key("from"), why))?;
            let to = clock_minute(&entry.to, true).map_err(|why| (key("to"), why))?;
            if entry.upload.is_none() && entry.download.is_none() {
                return Err((
                    key("upload"),
                    "an entry needs upload, download or both".into(),
                ));
            }
            schedule.push(Window {
                days,
                from,
                to: to % MINUTES_PER_DAY,
                upload: entry.upload.map(|r| r.0),
                download: entry.download.map(|r| r.0),
            });
        }
        Ok(Limits {
            usual: Rates {
                upload: self.upload.0,
                download: self.download.0,
                per_peer_upload: self.per_peer_upload.0,
                per_peer_download: self.per_peer_download.0,
            },
            lan_unlimited: self.lan_unlimited,
            schedule,
        })
    }
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Days as a bit set (bit 0 Monday): names, `weekdays`, `weekend`, or none for every day.
fn days_mask(days: &[String]) -> Result<u8, String> {
    if days.is_empty() {
        return Ok(0x7f);
    }
    let mut mask = 0u8;
    for day in days {
        let lower = day.trim().to_ascii_lowercase();
        mask |= match lower.as_str() {
            "weekdays" => 0b001_1111,
            "weekend" | "weekends" => 0b110_0000,
            "all" | "daily" | "every day" => 0x7f,
            name => {
                let short = name.get(..3).unwrap_or(name);
                let Some(i) = DAY_NAMES.iter().position(|d| *d == short) else {
                    return Err(format!(
                        "`{day}` is not a day (use mon … sun, weekdays, weekend)"
                    ));
                };
                1 << i
            }
        };
    }
    Ok(mask)
}

/// "HH:MM" as minutes of the day; "24:00" only as an end.
fn clock_minute(text: &str, end: bool) -> Result<u16, String> {
    let bad = || format!("`{text}` is not a time of day (HH:MM, 24-hour)");
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    if h > 24 || m >= 60 {
        return Err(bad());
    }
    let minute = h * 60 + m;
    if minute > MINUTES_PER_DAY || (minute == MINUTES_PER_DAY && !end) {
        return Err(bad());
    }
    Ok(minute)
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeSection,
    pub network: NetworkSection,
    pub bandwidth: BandwidthSection,
    pub supplier: SupplierSection,
    pub backup: BackupSection,
    pub monitor: MonitorSection,
    pub peers: Vec<PeerEntry>,
    pub log: LogSection,
}

impl Config {
    /// Loads `HOME/config.toml` with environment overrides and validates it.
    pub fn load(home: &Path) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::load_with_env(&home.join(CONFIG_FILE), &vars)
    }

    /// Like [`Config::load`] with an explicit environment (tests).
    pub fn load_with_env(
        file: &Path,
        vars: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Read {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse_with_env(&text, file, vars)
    }

    pub fn parse_with_env(
        text: &str,
        file: &Path,
        vars: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            message,
        };
        // Only SECTION__KEY variables are overrides; BITDUST_HOME and the like are not config.
        let overrides: HashMap<String, String> = vars
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(ENV_PREFIX)
                    .and_then(|rest| rest.strip_prefix('_'))
                    .is_some_and(|rest| rest.contains("__"))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(overrides.into_iter().collect())),
            )
            .build()
            .map_err(|e| invalid(error_key(&e.to_string()), e.to_string()))?;
        let config: Config = serde_path_to_error::deserialize(raw).map_err(|e| {
            let key = e.path().to_string();
            let message = e.inner().to_string();
            // An unknown key's path is its parent; name the key itself.
            let key = match unknown_field(&message) {
                Some(field) if key == "." => field,
                Some(field) if !key.ends_with(&field) => format!("{key}.{field}"),
                _ => key,
            };
            invalid(key, message)
        })?;
        config
            .validate()
            .map_err(|(key, message)| invalid(key.to_string(), message))?;
        Ok(config)
    }

    /// Checks values serde cannot: ranges and cross-field rules. Returns the key at fault.
    pub fn validate(&self) -> Result<(), (String, String)> {
        validate_name(&self.node.name).map_err(|e| ("node.name".into(), e.to_string()))?;
        for (i, c) in self.node.contacts.iter().enumerate() {
            validate_contact(c).map_err(|e| (format!("node.contacts[{i}]"), e.to_string()))?;
        }
        let b = &self.backup;
        if b.data_shards == 0 {
            return Err(("backup.data_shards".into(), "must be at least 1".into()));
        }
        if b.parity_shards == 0 {
            return Err((
                "backup.parity_shards".into(),
                "must be at least 1 (without parity a lost supplier loses data)".into(),
            ));
        }
        if b.data_shards as u32 + b.parity_shards as u32 > 64 {
            return Err((
                "backup.parity_shards".into(),
                "data_shards + parity_shards must be at most 64".into(),
            ));
        }
        // The packer's own limits: a block size it would refuse fails here, not at the first
        // backup.
        crate::data::check_block_size(b.block_size.0)
            .map_err(|e| ("backup.block_size".to_string(), e.to_string()))?;
        let mo = &self.monitor;
        if mo.interval.get().is_zero() {
            return Err(("monitor.interval".into(), "must be more than 0".into()));
        }
        if mo.fire_after_failed_audits == 0 {
            return Err((
                "monitor.fire_after_failed_audits".into(),
                "must be at least 1".into(),
            ));
        }
        if b.keep_versions == 0 {
            return Err(("backup.keep_versions".into(), "must be at least 1".into()));
        }
        if b.schedule.get() < Duration::from_secs(60) {
            return Err(("backup.schedule".into(), "must be at least 1m".into()));
        }
        for (i, s) in b.sources.iter().enumerate() {
            if !s.path.is_absolute() {
                return Err((
                    format!("backup.sources[{i}].path"),
                    "must be an absolute path".into(),
                ));
            }
            if s.schedule
                .is_some_and(|d| d.get() < Duration::from_secs(60))
            {
                return Err((
                    format!("backup.sources[{i}].schedule"),
                    "must be at least 1m".into(),
                ));
            }
        }
        let n = &self.network;
        for (key, value) in [
            ("network.connect_timeout", n.connect_timeout),
            ("network.handshake_timeout", n.handshake_timeout),
            ("network.keepalive", n.keepalive),
            ("network.dead_after", n.dead_after),
            ("network.request_timeout", n.request_timeout),
            ("network.reconnect_min", n.reconnect_min),
            ("network.preauth_timeout", n.preauth_timeout),
            ("node.shutdown_timeout", self.node.shutdown_timeout),
            ("node.disk_stall", self.node.disk_stall),
            ("node.control_timeout", self.node.control_timeout),
        ] {
            if value.get().is_zero() {
                return Err((key.into(), "must be greater than zero".into()));
            }
        }
        if self.node.control_clients == 0 {
            return Err(("node.control_clients".into(), "must be at least 1".into()));
        }
        if n.reconnect_max < n.reconnect_min {
            return Err((
                "network.reconnect_max".into(),
                "must not be less than network.reconnect_min".into(),
            ));
        }
        if n.max_pending_per_address == 0 {
            return Err((
                "network.max_pending_per_address".into(),
                "must be at least 1".into(),
            ));
        }
        if n.friend_reserve >= n.max_pending {
            return Err((
                "network.friend_reserve".into(),
                "must be less than network.max_pending (strangers need room too)".into(),
            ));
        }
        if n.outbound_queue == 0 {
            return Err(("network.outbound_queue".into(), "must be at least 1".into()));
        }
        if !(64 * 1024..=1024 * MIB).contains(&n.max_message.0) {
            return Err((
                "network.max_message".into(),
                "must be between 64 KiB and 1 GiB".into(),
            ));
        }
        if (n.max_message.0) < b.block_size.0 / b.data_shards as u64 + 64 * 1024 {
            return Err((
                "network.max_message".into(),
                "must hold one fragment (block_size / data_shards) plus 64 KiB".into(),
            ));
        }
        crate::net::budget::Budget::check(n.peer_budget.0 as usize, n.max_message.0 as usize)
            .map_err(|e| ("network.peer_budget".to_string(), e.to_string()))?;
        for (i, p) in self.peers.iter().enumerate() {
            Identity::from_card(&p.card)
                .map_err(|e| (format!("peers[{i}].card"), e.to_string()))?;
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ("log.level".to_string(), e.to_string()))?;
        self.bandwidth.limits()?;
        Ok(())
    }

    /// Contact addresses to sign into the identity: `node.contacts`, else the listen address
    /// (an unspecified IP becomes loopback, which only local peers can reach).
    pub fn contacts(&self) -> Vec<String> {
        if !self.node.contacts.is_empty() {
            return self.node.contacts.clone();
        }
        let mut addr = self.node.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        vec![format!("tcp://{addr}")]
    }

    /// Keys whose change a SIGHUP cannot apply: they need a restart. Applied live: node.contacts,
    /// node.shutdown_timeout, node.keep_free, [bandwidth], [supplier], [[peers]] (added ones).
    pub fn restart_needed(&self, newer: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.node.listen != newer.node.listen {
            keys.push("node.listen");
        }
        if self.node.name != newer.node.name {
            keys.push("node.name");
        }
        if self.node.disk_stall != newer.node.disk_stall {
            keys.push("node.disk_stall");
        }
        if self.node.control_timeout != newer.node.control_timeout {
            keys.push("node.control_timeout");
        }
        if self.node.control_clients != newer.node.control_clients {
            keys.push("node.control_clients");
        }
        if self.backup.data_shards != newer.backup.data_shards {
            keys.push("backup.data_shards");
        }
        if self.backup.parity_shards != newer.backup.parity_shards {
            keys.push("backup.parity_shards");
        }
        if self.backup.space_per_supplier != newer.backup.space_per_supplier {
            keys.push("backup.space_per_supplier");
        }
        if self.network != newer.network {
            keys.push("network");
        }
        if self.log != newer.log {
            keys.push("log");
        }
        keys
    }
}

/// The space a supplier may grant in total: `donated`, capped by what the disk really has.
/// Bytes already `held` for customers count (they are on the disk, inside the donation); of the
/// `free` space, `keep_free` stays untouched.
pub fn grantable(donated: u64, held: u64, free: u64, keep_free: u64) -> u64 {
    donated.min(held.saturating_add(free.saturating_sub(keep_free)))
}

/// The warning for a donation the disk cannot honour (`None` when it can): logged at start and
/// on reload, with the capped figure grants will really use.
pub fn donation_warning(config: &Config, held: u64, free: u64) -> Option<String> {
    let donated = config.supplier.donated.0;
    let cap = grantable(donated, held, free, config.node.keep_free.0);
    (cap < donated).then(|| {
        format!(
            "supplier.donated ({}) exceeds what the disk holding store/ can give ({} free, {} kept free): grants are capped at {}",
            ByteSize(donated),
            ByteSize(free),
            config.node.keep_free,
            ByteSize(cap)
        )
    })
}

/// The key named in a `config` crate error such as "... for key `node.listen` ...".
fn error_key(message: &str) -> String {
    message
        .split("key `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or("(file)")
        .to_string()
}

/// The field named in serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// The commented default `config.toml` that `bitdust init` writes.
pub fn default_file(name: &str, listen: SocketAddr, donated: ByteSize) -> String {
    let d = Config::default();
    let n = &d.network;
    let b = &d.backup;
    let s = &d.supplier;
    format!(
        r#"# bitdust node configuration.
# Sizes take units (4096, 512 MiB, 8 GiB); durations too (250ms, 30s, 5m, 2h, 14d).
# Any key can be overridden from the environment: BITDUST_<SECTION>__<KEY>,
# e.g. BITDUST_NODE__LISTEN=0.0.0.0:7771.
# SIGHUP re-reads this file; keys marked (restart) only take effect after a restart.

[node]
# Shown to friends on your contact card. (restart)
name = "{name}"
# Address the node listens on for peers. (restart)
listen = "{listen}"
# Addresses friends dial, most preferred first, e.g. ["tcp://203.0.113.7:7771"].
# Empty: derived from `listen`. A change re-signs the identity with a new revision.
contacts = []
# How long a graceful stop (SIGTERM/SIGINT) may take; past it the node exits with status 2.
shutdown_timeout = "{shutdown}"
# Space always left free on this disk: grants to customers are capped by it, and after a
# disk-full error writes resume once this much is free again.
keep_free = "{keep_free}"
# A database write running longer than this shows as "disk stalled" in `status`. (restart)
disk_stall = "{disk_stall}"
# A control client (the CLI) that sends nothing for this long is disconnected. (restart)
control_timeout = "{control_timeout}"
# Control clients served at once; past it the one idle longest is dropped. (restart)
control_clients = {control_clients}

# Every key in [network] takes effect after a restart.
[network]
connect_timeout = "{connect}"
handshake_timeout = "{handshake}"
# Interval at which a session pings its peer (at most half of dead_after).
keepalive = "{keepalive}"
# A ping unanswered this long marks the peer unreachable (its session closes).
dead_after = "{dead_after}"
request_timeout = "{request}"
# Reconnect backoff: doubles from min to max, with jitter.
reconnect_min = "{rmin}"
reconnect_max = "{rmax}"
# Messages queued per peer before senders wait.
outbound_queue = {queue}
# Largest message accepted from a peer.
max_message = "{max_message}"
# Bytes one peer may make this node hold (its requests not yet handled, replies not yet
# written), all its sessions together; past it the node stops reading from that peer until
# some are done. At least twice max_message.
peer_budget = "{peer_budget}"
# Inbound connections handshaking at once: in total, from one IP address, and how many of
# the total are kept for friends' hosts (their contact IPs and IPs they connected from).
max_pending = {max_pending}
max_pending_per_address = {per_address}
friend_reserve = {friend_reserve}
# Time an inbound connection has to authenticate; slower ones are closed.
preauth_timeout = "{preauth}"

# Bandwidth limits; every key applies live on SIGHUP. Rates: "2 MiB/s", "20 Mbit/s",
# "500 KB/s"; 0 = unlimited. Set the upload to 70-80 % of your uplink so calls and video
# keep working while a backup runs.
[bandwidth]
upload = "0"
download = "0"
# Each friend on its own, within the totals.
per_peer_upload = "0"
per_peer_download = "0"
# Friends on this host or your home network are not limited.
lan_unlimited = true
# Other totals at times of the week (local time; the first entry that matches wins):
# [[bandwidth.schedule]]
# days = ["weekdays"]      # mon … sun, weekdays, weekend; empty or absent: every day
# from = "18:00"
# to = "23:00"             # before `from`: runs past midnight
# upload = "1 MiB/s"
# download = "4 MiB/s"

[supplier]
# Disk space offered to friends in total.
donated = "{donated}"
# Who may store data here: "peers" (your friends) or "open" (any authenticated node).
accept = "peers"
# How long a departed customer's data is kept before it is removed.
grace_period = "{grace}"

[backup]
# Reed-Solomon layout: any data_shards of data_shards + parity_shards fragments restore a
# block; each fragment goes to a different friend. (restart) A change applies to new
# snapshots only: stored blocks keep the layout they were made with.
data_shards = {k}
parity_shards = {m}
# Target block size before erasure coding: 1 KiB to 32 MiB. New snapshots only.
block_size = "{block}"
# Space to ask of each supplier. (restart)
space_per_supplier = "{space}"
# Default interval between scheduled backups.
schedule = "{schedule}"
keep_versions = {keep}
# Directories to back up, one table each:
# [[backup.sources]]
# path = "/home/me/Documents"
# schedule = "6h"
# exclude = ["*.tmp"]

[monitor]
# Every interval each supplier lists what it holds and answers storage audits (a tenth of it
# while a supplier is unreachable).
interval = "{mon_interval}"
# A supplier unreachable this long, or failing this many audits in a row, is replaced and its
# fragments rebuilt on another friend (never when that would leave a block unrebuildable).
fire_after = "{fire_after}"
fire_after_failed_audits = {fire_audits}
audits_per_round = {audits}
# Restore drills: a sample of files restored in memory and checked byte for byte.
drill_interval = "{drill_interval}"
drill_files = {drill_files}

# Friends, one table each (`bitdust peer add CARD` appends here too):
# [[peers]]
# card = "bitdust1:..."
# name = "bob"

[log]
# "human" or "json" (one JSON object per line). (restart)
format = "human"
# Filter when RUST_LOG is unset. (restart)
level = "info"
"#,
        shutdown = d.node.shutdown_timeout,
        keep_free = d.node.keep_free,
        disk_stall = d.node.disk_stall,
        control_timeout = d.node.control_timeout,
        control_clients = d.node.control_clients,
        connect = n.connect_timeout,
        handshake = n.handshake_timeout,
        keepalive = n.keepalive,
        dead_after = n.dead_after,
        request = n.request_timeout,
        rmin = n.reconnect_min,
        rmax = n.reconnect_max,
        queue = n.outbound_queue,
        max_message = n.max_message,
        peer_budget = n.peer_budget,
        max_pending = n.max_pending,
        per_address = n.max_pending_per_address,
        friend_reserve = n.friend_reserve,
        preauth = n.preauth_timeout,
        grace = s.grace_period,
        k = b.data_shards,
        m = b.parity_shards,
        block = b.block_size,
        space = b.space_per_supplier,
        schedule = b.schedule,
        keep = b.keep_versions,
        mon_interval = d.monitor.interval,
        fire_after = d.monitor.fire_after,
        fire_audits = d.monitor.fire_after_failed_audits,
        audits = d.monitor.audits_per_round,
        drill_interval = d.monitor.drill_interval,
        drill_files = d.monitor.drill_files,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, Path::new("/h/config.toml"), &HashMap::new())
    }

    fn key_of(text: &str) -> String {
        match parse(text) {
            Err(e) => {
                assert!(
                    e.to_string().contains("/h/config.toml"),
                    "file not named: {e}"
                );
                e.key().unwrap_or_default().to_string()
            }
            Ok(_) => panic!("accepted: {text}"),
        }
    }

    #[test]
    fn default_file_parses_to_defaults() {
        let listen: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
        let text = default_file("alice", listen, ByteSize(3 * GIB));
        let config = parse(&text).expect("default file is valid");
        let mut expected = Config::default();
        expected.node.name = "alice".into();
        expected.node.listen = listen;
        expected.supplier.donated = ByteSize(3 * GIB);
        assert_eq!(config, expected);
    }

    #[test]
    fn bandwidth_section_parses_and_names_bad_keys() {
        let config = parse(
            "[bandwidth]\nupload = \"20 Mbit/s\"\nper_peer_download = \"1 MiB/s\"\nlan_unlimited = false\n\
             [[bandwidth.schedule]]\ndays = [\"weekdays\", \"Saturday\"]\nfrom = \"22:00\"\nto = \"06:30\"\nupload = 0\n\
             [[bandwidth.schedule]]\nfrom = \"09:00\"\nto = \"24:00\"\ndownload = \"4 MiB/s\"\n",
        )
        .expect("valid");
        let limits = config.bandwidth.limits().expect("limits");
        assert_eq!(limits.usual.upload, 2_500_000);
        assert_eq!(limits.usual.per_peer_download, MIB);
        assert!(!limits.lan_unlimited);
        assert_eq!(limits.schedule[0].days, 0b011_1111);
        assert_eq!(
            (limits.schedule[0].from, limits.schedule[0].to),
            (1320, 390)
        );
        assert_eq!(limits.schedule[0].upload, Some(0));
        assert_eq!(limits.schedule[1].days, 0x7f, "no days: every day");
        assert_eq!(limits.schedule[1].to, 0, "24:00 is the end of the day");
        assert_eq!(limits.schedule[1].upload, None);

        let entry = "[[bandwidth.schedule]]\nfrom = \"18:00\"\nto = \"23:00\"\n";
        assert_eq!(
            key_of("[bandwidth]\nupload = \"fast\"\n"),
            "bandwidth.upload"
        );
        assert_eq!(
            key_of(&format!(
                "{entry}upload = \"1 MiB/s\"\ndays = [\"someday\"]\n"
            )),
            "bandwidth.schedule[0].days"
        );
        assert_eq!(
            key_of("[[bandwidth.schedule]]\nfrom = \"25:00\"\nto = \"23:00\"\nupload = 1\n"),
            "bandwidth.schedule[0].from"
        );
        assert_eq!(
            key_of("[[bandwidth.schedule]]\nfrom = \"1093:00\"\nto = \"23:00\"\nupload = 1\n"),
            "bandwidth.schedule[0].from",
            "no overflow"
        );
        assert_eq!(
            key_of(entry),
            "bandwidth.schedule[0].upload",
            "no rate at all"
        );
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").expect("valid"), Config::default());
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(key_of("[node]\nlisten = \"nowhere\"\n"), "node.listen");
        assert_eq!(key_of("[node]\nbogus = 1\n"), "node.bogus");
        assert_eq!(key_of("bogus = 1\n"), "bogus");
        assert_eq!(key_of("[backup]\ndata_shards = 0\n"), "backup.data_shards");
        assert_eq!(
            key_of("[backup]\nblock_size = \"huge\"\n"),
            "backup.block_size"
        );
        // Sizes the packer cannot take are refused here, with its limits named.
        for size in ["64MiB", "33MiB", "512"] {
            let text = format!("[backup]\nblock_size = \"{size}\"\n");
            let e = parse(&text).expect_err(&text);
            assert_eq!(e.key(), Some("backup.block_size"), "{size}");
            assert!(
                e.to_string().contains("outside what the packer takes"),
                "{size}: {e}"
            );
        }
        for size in ["32MiB", "64KiB", "1KiB"] {
            let text = format!("[backup]\nblock_size = \"{size}\"\n");
            let config = parse(&text).expect(&text);
            assert!(crate::data::Packer::new(config.backup.block_size.0 as usize).is_ok());
        }
        assert_eq!(
            key_of("[network]\nkeepalive = \"30\"\n"),
            "network.keepalive"
        );
        assert_eq!(
            key_of("[supplier]\naccept = \"everyone\"\n"),
            "supplier.accept"
        );
        assert_eq!(
            key_of("[[peers]]\ncard = \"bitdust1:AAAA\"\n"),
            "peers[0].card"
        );
        assert_eq!(
            key_of("[[backup.sources]]\npath = \"relative\"\n"),
            "backup.sources[0].path"
        );
        assert_eq!(
            key_of("[node]\ncontacts = [\"udp://x:1\"]\n"),
            "node.contacts[0]"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut vars = HashMap::new();
        vars.insert(
            "BITDUST_NODE__LISTEN".to_string(),
            "127.0.0.1:7000".to_string(),
        );
        vars.insert("BITDUST_BACKUP__DATA_SHARDS".to_string(), "6".to_string());
        vars.insert("BITDUST_HOME".to_string(), "/ignored".to_string());
        let c = Config::parse_with_env(
            "[node]\nlisten = \"127.0.0.1:1\"\n",
            Path::new("c.toml"),
            &vars,
        )
        .expect("valid");
        assert_eq!(c.node.listen.port(), 7000);
        assert_eq!(c.backup.data_shards, 6);
        vars.insert("BITDUST_NODE__LISTEN".to_string(), "bad".to_string());
        let e = Config::parse_with_env("", Path::new("c.toml"), &vars).expect_err("bad env");
        assert_eq!(e.key(), Some("node.listen"));
    }

    #[test]
    fn grants_are_capped_by_the_disk() {
        // Plenty of disk: the donation stands.
        assert_eq!(grantable(GIB, 0, 10 * GIB, 16 * MIB), GIB);
        // A 20 MiB disk: 1 GiB is not there; what is, minus what stays free.
        assert_eq!(grantable(GIB, 0, 20 * MIB, 16 * MIB), 4 * MIB);
        // Fragments already held are inside the donation, not extra.
        assert_eq!(grantable(GIB, 300 * MIB, 20 * MIB, 16 * MIB), 304 * MIB);
        assert_eq!(grantable(GIB, 0, MIB, 16 * MIB), 0);
        let mut c = Config::default();
        c.supplier.donated = ByteSize(GIB);
        assert_eq!(donation_warning(&c, 0, 10 * GIB), None);
        let w = donation_warning(&c, 0, 20 * MIB).expect("warned");
        assert!(
            w.contains("supplier.donated") && w.contains("capped at 4 MiB"),
            "{w}"
        );
    }

    #[test]
    fn new_node_keys_are_validated() {
        assert_eq!(
            key_of("[node]\ncontrol_clients = 0\n"),
            "node.control_clients"
        );
        assert_eq!(key_of("[node]\ndisk_stall = \"0s\"\n"), "node.disk_stall");
        // A peer's budget holds two of the largest messages (security review M2).
        assert_eq!(
            key_of("[network]\npeer_budget = \"63 MiB\"\n"),
            "network.peer_budget"
        );
        let c =
            parse("[network]\nmax_message = \"8 MiB\"\npeer_budget = \"16 MiB\"\n").expect("valid");
        assert_eq!(c.network.peer_budget, ByteSize(16 * MIB));
        let c = parse("[node]\nkeep_free = \"1 MiB\"\n").expect("valid");
        assert_eq!(c.node.keep_free, ByteSize(MIB));
    }

    #[test]
    fn contacts_default_to_listen_address() {
        let mut c = Config::default();
        assert_eq!(c.contacts(), vec!["tcp://127.0.0.1:7771".to_string()]);
        c.node.contacts = vec!["tcp://example.org:1".into()];
        assert_eq!(c.contacts(), vec!["tcp://example.org:1".to_string()]);
    }
}
