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
    /// `complete`, `partial` (some files named in `failed`), `failed`, `aborted`, `interrupted`.
    pub outcome: String,
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
    /// `committed`, `aborted`, `failed` or `interrupted` (resumed at the next start).
    pub outcome: String,
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
    pub contract: String,
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
