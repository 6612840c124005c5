//! What `bitdust status` shows, as types: each actor fills its own section, the control socket
//! sends the whole as JSON, and the CLI and the tests read it back into the same structs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One machine instance and its state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineStatus {
    pub actor: String,
    pub id: String,
    pub state: String,
    /// Seconds in the current state.
    pub for_secs: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub node_id: String,
    pub name: Option<String>,
    pub revision: Option<u64>,
    pub contacts: Option<Vec<String>>,
    pub pid: u32,
    pub uptime_secs: u64,
    pub machines: Vec<MachineStatus>,
    pub network: NetworkStatus,
    pub customer: CustomerStatus,
    pub supplier: SupplierStatus,
    /// The disk under the home: its state and write latency (filled by the node, read from
    /// counters, so it answers even while the disk is frozen).
    #[serde(default)]
    pub disk: Option<DiskStatus>,
    #[serde(default)]
    pub backup: BackupStatus,
    #[serde(default)]
    pub restore: RestoreStatus,
    /// The monitor's view: sources by health with their durability, audits, rebuild, firings
    /// and the last restore drill (filled by the node).
    #[serde(default)]
    pub health: Option<MonitorStatus>,
    /// The bandwidth limits in force and the rates of the last second (filled by the node).
    #[serde(default)]
    pub bandwidth: Option<BandwidthStatus>,
}

/// Bytes per second; a limit of 0 is none.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BandwidthStatus {
    pub upload_limit: u64,
    pub download_limit: u64,
    pub per_peer_upload_limit: u64,
    pub per_peer_download_limit: u64,
    pub lan_unlimited: bool,
    /// Measured over the last second, all peers, limited or not.
    pub upload_rate: u64,
    pub download_rate: u64,
}

impl From<crate::net::bandwidth::Snapshot> for BandwidthStatus {
    fn from(s: crate::net::bandwidth::Snapshot) -> Self {
        BandwidthStatus {
            upload_limit: s.in_force.upload,
            download_limit: s.in_force.download,
            per_peer_upload_limit: s.in_force.per_peer_upload,
            per_peer_download_limit: s.in_force.per_peer_download,
            lan_unlimited: s.lan_unlimited,
            upload_rate: s.upload_now,
            download_rate: s.download_now,
        }
    }
}

/// Restores: the one running now and the latest results (newest last).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RestoreStatus {
    pub running: Option<RestoreJobStatus>,
    pub finished: Vec<RestoreResult>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RestoreJobStatus {
    pub run: u64,
    pub snapshot: u64,
    pub source: String,
    pub to: String,
    pub state: String,
    pub blocks: u64,
    pub blocks_decoded: u64,
    pub blocks_lost: u64,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_written: u64,
    pub bytes_total: u64,
    pub fetched_bytes: u64,
    pub elapsed_secs: f64,
}

/// How a restore ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RestoreResult {
    pub run: u64,
    pub snapshot: u64,
    pub source: String,
    pub to: String,
    pub outcome: RestoreOutcome,
    pub error: Option<String>,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Files already complete from an earlier, interrupted restore.
    pub skipped_existing: u64,
    pub failed: Vec<SkippedFile>,
    pub seconds: f64,
    /// Fragment bytes received from suppliers.
    pub fetched_bytes: u64,
    /// Fragments asked beyond `k` per block (something failed).
    pub extra_fragments: u64,
    /// Suppliers that sent fragments not matching the owner's manifest, with a count.
    pub corrupt_fragments: Vec<(String, u64)>,
    /// Suppliers that answered much slower than the others (asked last, hedged early).
    #[serde(default)]
    pub slow_suppliers: Vec<String>,
    /// Later names of hard-linked files, restored as links.
    #[serde(default)]
    pub hardlinks: u64,
    /// FIFOs and device nodes made.
    #[serde(default)]
    pub specials: u64,
    /// What was left out for a reason that is not the entry's (not root, a file system that
    /// refuses an attribute namespace), one line per kind, e.g. "ownership of 6 entries: not
    /// running as root". The entries themselves are restored, so this leaves the exit status.
    #[serde(default)]
    pub not_restored: Vec<String>,
}

/// Backups: the job running now and the latest results (newest last).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupStatus {
    pub running: Option<JobStatus>,
    /// Jobs asked for and not started yet.
    pub queued: Vec<String>,
    pub finished: Vec<JobResult>,
}

/// A running backup job's figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct JobStatus {
    /// The job's number (increasing per node run; `backup --wait` waits for its own).
    pub run: u64,
    pub snapshot: u64,
    pub source: String,
    pub state: String,
    pub files: u64,
    pub bytes_read: u64,
    /// Bytes of the files seen so far (read or unchanged).
    pub bytes: u64,
    /// Bytes of new chunks (after deduplication).
    pub new_bytes: u64,
    pub blocks: u64,
    /// Blocks with every fragment placed.
    pub blocks_complete: u64,
    /// Fragments waiting in an outbox for their supplier.
    pub queued_fragments: u64,
    /// Least redundancy of any block so far: fragments placed minus k.
    pub worst_redundancy: i64,
    pub started_at: u64,
    pub elapsed_secs: f64,
}

/// How a backup job ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    pub run: u64,
    pub snapshot: u64,
    pub source: String,
    pub outcome: BackupOutcome,
    pub error: Option<String>,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub bytes_read: u64,
    pub new_bytes: u64,
    pub new_blocks: u64,
    pub seconds: f64,
    /// Files not backed up (or backed up while changing), with why.
    pub skipped: Vec<SkippedFile>,
    /// The catalog and the recovery record reached the suppliers.
    pub catalog_stored: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SkippedFile {
    pub path: String,
    pub reason: String,
    /// Left out by design (a socket, which no tool restores): listed, not an error.
    #[serde(default)]
    pub by_design: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskStatus {
    /// `ok`, `low`, `full`, `failing` or `stalled`.
    pub state: String,
    /// The line an operator reads, e.g. "disk stalled for 12 s: ...".
    pub line: String,
    pub free_bytes: Option<u64>,
    pub current_write_ms: Option<f64>,
    pub last_write_ms: f64,
    pub slowest_write_ms: f64,
    pub writes: u64,
    pub failed_writes: u64,
    pub queued_writes: u64,
    pub database_resumes: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkStatus {
    pub listen: Option<String>,
    pub sessions: usize,
    pub peers: Vec<PeerStatus>,
    /// Closed sessions by reason, refused identity pushes, dropped notices.
    pub counters: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub node_id: String,
    pub name: String,
    pub address: Option<String>,
    pub remote: Option<String>,
    pub revision: u64,
    /// The peer_session state, or `Disconnected`.
    pub session: String,
    /// Unix seconds of the last message from the peer.
    pub last_seen: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Protocol messages received and sent (keep-alives included).
    pub messages_in: u64,
    pub messages_out: u64,
    /// Pongs and other control messages dropped because the link's queue was full.
    #[serde(default)]
    pub control_dropped: u64,
    /// Bytes the peer holds on this node now: its requests not yet handled and the replies
    /// queued for it, at most `network.peer_budget`.
    #[serde(default)]
    pub budget_held: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CustomerStatus {
    pub data_shards: u32,
    pub parity_shards: u32,
    pub positions: Vec<PositionStatus>,
    /// Trusted friends online that could be hired in a fired supplier's place.
    #[serde(default)]
    pub spares: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PositionStatus {
    pub position: u32,
    pub supplier: Option<String>,
    pub confirmed: bool,
    /// The supplier_connector state, or `NoService`.
    pub contract: Contract,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SupplierStatus {
    pub donated: u64,
    pub customers: Vec<AccountStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountStatus {
    pub node_id: String,
    pub quota: u64,
    pub used: u64,
    /// `active` or `cancelled`.
    pub state: String,
}

pub use super::drill::{DrillFailure, DrillReport};

/// A drill's report with its verdict, as `drill --json` and `status` show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DrillStatus {
    #[serde(flatten)]
    pub report: DrillReport,
    pub passed: bool,
}

impl From<DrillReport> for DrillStatus {
    fn from(report: DrillReport) -> Self {
        DrillStatus {
            passed: report.passed(),
            report,
        }
    }
}

/// Per source: the worst redundancy over the blocks of its kept versions.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceHealth {
    pub source: String,
    pub blocks: u64,
    /// Good reachable fragments beyond `k` of its worst block (negative: unreadable now).
    pub worst_redundancy: i64,
    /// "full", "degraded", "at risk" or "lost".
    pub health: String,
    /// The chance to lose a block within a year at the positions' observed availability
    /// (estimated by the node for `status`; absent in the monitor's own figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_within_a_year: Option<f64>,
    /// The same in words, e.g. "less than 1 in a million".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_within_a_year_text: Option<String>,
}

/// One position as the monitor sees it (for status and the durability estimate).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PositionHealth {
    pub position: u32,
    pub supplier: Option<String>,
    pub up: bool,
    pub failed_audits: u32,
    /// Fraction of the observed time it was reachable.
    pub availability: f64,
    pub observed_secs: u64,
    /// Its usual time to answer an audit challenge (an average weighted to the latest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Much slower than the other positions' suppliers (restores ask it last).
    #[serde(default)]
    pub slow: bool,
}

/// The monitor's figures (`status`'s `health`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MonitorStatus {
    pub rounds: u64,
    pub blocks: u64,
    pub audits_passed: u64,
    pub audits_failed: u64,
    /// Cells of the health matrix by kind.
    pub cells: BTreeMap<String, u64>,
    /// Blocks by good reachable fragments beyond `k`.
    pub by_redundancy: BTreeMap<i64, u64>,
    pub sources: Vec<SourceHealth>,
    pub positions: Vec<PositionHealth>,
    /// Firings, oldest first: position and reason.
    pub fired: Vec<(u32, String)>,
    pub rebuild: crate::fsm::rebuilder::Progress,
    pub rebuild_queued: u64,
    pub k: u32,
    pub m: u32,
    /// The latest restore drill (filled by the node, which runs drills).
    #[serde(default)]
    pub last_drill: Option<DrillStatus>,
}

/// Writes a unit enum as its JSON name (padding honoured, for tables).
macro_rules! named {
    ($name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

/// How a backup job ended.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackupOutcome {
    Committed,
    #[default]
    Failed,
    /// The node stopped; the job resumes at the next start.
    Interrupted,
}

named!(BackupOutcome {
    Committed => "committed",
    Failed => "failed",
    Interrupted => "interrupted",
});

impl BackupOutcome {
    pub fn committed(self) -> bool {
        self == BackupOutcome::Committed
    }
}

/// How a restore ended.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RestoreOutcome {
    /// Every file restored.
    Complete,
    /// Some files named in `failed` were not restored; the rest are.
    Partial,
    #[default]
    Failed,
    /// The node stopped; running the restore again skips what is complete.
    Interrupted,
}

named!(RestoreOutcome {
    Complete => "complete",
    Partial => "partial",
    Failed => "failed",
    Interrupted => "interrupted",
});

impl RestoreOutcome {
    pub fn complete(self) -> bool {
        self == RestoreOutcome::Complete
    }
}

/// A position's contract: its supplier_connector's state (`NoService` when none runs).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum Contract {
    #[default]
    NoService,
    Requesting,
    Connected,
    Disconnected,
    Refused,
    Cancelling,
    Closed,
}

named!(Contract {
    NoService => "NoService",
    Requesting => "Requesting",
    Connected => "Connected",
    Disconnected => "Disconnected",
    Refused => "Refused",
    Cancelling => "Cancelling",
    Closed => "Closed",
});

impl From<crate::fsm::supplier_connector::State> for Contract {
    fn from(state: crate::fsm::supplier_connector::State) -> Self {
        use crate::fsm::supplier_connector::State as S;
        match state {
            S::NoService => Contract::NoService,
            S::Requesting => Contract::Requesting,
            S::Connected => Contract::Connected,
            S::Disconnected => Contract::Disconnected,
            S::Refused => Contract::Refused,
            S::Cancelling => Contract::Cancelling,
            S::Closed => Contract::Closed,
        }
    }
}

impl Contract {
    /// The contract named by a supplier_connector state's name (as the registry lists it).
    pub fn of_state(name: Option<&str>) -> Contract {
        use crate::fsm::Label as _;
        use crate::fsm::supplier_connector::State;
        State::ALL
            .iter()
            .find(|s| Some(s.name()) == name)
            .map_or(Contract::NoService, |s| Contract::from(*s))
    }
}
