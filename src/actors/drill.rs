//! Restore drills (issue 10 §6): proof, on a schedule, that the backups restore. A drill picks a
//! random source, takes its latest committed snapshot, samples a few of its regular files at
//! random and restores them **in memory**: for each chunk, `k` fragments of its block are fetched
//! from the suppliers that acknowledged them, checked against the owner-signed manifest, decoded,
//! and the chunk's bytes must hash (keyed BLAKE3, the owner's chunk-id key) to the id the catalog
//! names; a whole file's chunks must add up to its recorded length. Nothing is written to disk.
//!
//! Invariants:
//! - **Read-only.** A drill reads the catalog and asks suppliers for fragments; it writes
//!   nothing, neither to disk nor to the catalog (the caller keeps its report).
//! - **Bounded.** At most `DrillSettings::files` files and about `DrillSettings::max_bytes`
//!   file bytes; a decoded block is kept only while a sampled chunk still needs it; every
//!   fragment request has `request_timeout`.
//! - **Failures are per file and say why** (which chunk, which block, which positions failed and
//!   how); a drill never panics on what the catalog or a supplier gives it. Only "there is nothing
//!   to drill" and an unreadable catalog are errors of the drill itself.
//! - Fragments are asked for as a restore does, by the one fetch plan (`fsm::fetch`): the `k`
//!   data positions first, another position for each one that fails (unreachable, refused, not
//!   matching the manifest), through the one fragment client (`actors::fragments`).

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use ed25519_dalek::VerifyingKey;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::fragments::{FragmentError, Fragments, NetworkFragments};
use super::monitor::MonitorInput;
use super::network_connector::NetworkConnectorDriver;
use super::services::Services;
use super::shell::{Clock, Input, Shell};
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::NodeId;
use crate::data::{self, BlockId, BlockManifest, ChunkId, DataError, PackedBlock};
use crate::fsm::fetch::Plan as FetchPlan;
use crate::fsm::monitor::AuditResult;
use crate::store::catalog::{self, FileKind, SnapshotId};
use crate::store::{KvStore, StoreError};

pub type NetworkAddr = Addr<Shell<NetworkConnectorDriver>>;

/// How often a drill looks for requests past the hedge bound.
const HEDGE_TICK: Duration = Duration::from_secs(1);

/// How much one drill checks.
#[derive(Clone, Copy, Debug)]
pub struct DrillSettings {
    /// Files sampled (regular, non-empty).
    pub files: usize,
    /// Stop sampling past this many file bytes.
    pub max_bytes: u64,
    /// Each fragment request's deadline.
    pub request_timeout: Duration,
}

impl Default for DrillSettings {
    fn default() -> Self {
        DrillSettings {
            files: 8,
            max_bytes: 16 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// One sampled file that did not restore byte for byte, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillFailure {
    /// The file's path in the snapshot (lossy UTF-8).
    pub path: String,
    pub reason: String,
}

/// What one drill did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    /// When it started, seconds since the Unix epoch.
    pub at: u64,
    pub source: String,
    pub snapshot: u64,
    /// Files checked (whole, or a window of one larger than `max_bytes`), passed or not.
    pub files: u64,
    /// File bytes restored and found identical.
    pub bytes: u64,
    /// Fragments that came back from suppliers (good or not).
    pub fragments_fetched: u64,
    pub failures: Vec<DrillFailure>,
    pub seconds: f64,
    /// Fragments a supplier failed to give (refused, not found, corrupt), for the monitor: it
    /// counts them like audits (the drill fell back to parity because of that supplier).
    #[serde(skip)]
    pub supplier_failures: Vec<SupplierFailure>,
}

/// A fragment its supplier did not give back whole (an unreachable supplier is not one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupplierFailure {
    pub block: [u8; 32],
    pub position: u32,
    pub supplier: NodeId,
    pub result: AuditResult,
}

impl DrillReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The report as JSON with its verdict (`passed`) beside the fields.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("passed".into(), self.passed().into());
        }
        value
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("no committed snapshot yet: nothing to drill")]
    NoSnapshot,
    #[error("cannot read the catalog: {0}")]
    Store(#[from] StoreError),
    #[error("the drill's worker thread failed: {0}")]
    Worker(String),
}

/// Why a sampled chunk (and so its file) did not check out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DrillProblem {
    #[error("not in the chunk index")]
    NotIndexed,
    #[error("block {} is not in the block index", short(.0))]
    BlockNotIndexed(BlockId),
    #[error("block {}: the catalog's placements do not match its manifest's layout", short(.0))]
    Placements(BlockId),
    #[error("block {}: manifest: {}", short(.0), .1)]
    Manifest(BlockId, Arc<DataError>),
    #[error("block {} was not planned", short(.0))]
    Unplanned(BlockId),
    #[error("block {} lost", short(.0))]
    Lost(BlockId),
    #[error("block {}: {have} of the {k} fragments needed ({})", short(.block), joined(.problems))]
    TooFew {
        block: BlockId,
        have: usize,
        k: usize,
        problems: Vec<(usize, FragmentProblem)>,
    },
    #[error("block {} did not decode: {}", short(.0), .1)]
    Undecodable(BlockId, Arc<DataError>),
    #[error("block {} is malformed: {}", short(.0), .1)]
    Unparsable(BlockId, Arc<DataError>),
    #[error("block {} is malformed", short(.0))]
    Malformed(BlockId),
    #[error("decoding stopped: {0}")]
    Stopped(String),
    #[error("block {} does not hold the chunk", short(.0))]
    NotInBlock(BlockId),
    #[error("block {}: the chunk's bytes do not match its id", short(.0))]
    Mismatch(BlockId),
}

/// Why one fragment did not count towards its block's `k`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FragmentProblem {
    #[error("not placed")]
    NotPlaced,
    #[error(transparent)]
    Fetch(#[from] FragmentError),
    /// It arrived and is not the fragment the manifest names.
    #[error(transparent)]
    Check(Arc<DataError>),
}

impl FragmentProblem {
    /// How the monitor counts it against the supplier; `None` when it is not the supplier's
    /// doing (not placed, unreachable).
    fn audit_result(&self) -> Option<AuditResult> {
        match self {
            FragmentProblem::NotPlaced => None,
            FragmentProblem::Fetch(e) => super::monitor::fetch_failure(e),
            FragmentProblem::Check(_) => Some(AuditResult::Corrupt),
        }
    }
}

fn joined(problems: &[(usize, FragmentProblem)]) -> String {
    problems
        .iter()
        .map(|(position, why)| format!("position {position}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a node needs to run a drill when asked (the control socket, the schedule).
#[derive(Clone)]
pub struct DrillWiring {
    pub services: Services,
    pub settings: DrillSettings,
    /// Told which supplier failed a fetch; `None` when the monitor did not start.
    pub monitor: Option<actix::Recipient<Input<MonitorInput>>>,
}

impl DrillWiring {
    /// One drill now, with a fresh random sample (the seed from `clock`'s context).
    pub async fn run_now(&self, clock: Clock) -> Result<DrillReport, DrillError> {
        let report = run(
            self.services.kv.clone(),
            self.services.network.clone(),
            self.services.keys.clone(),
            self.services.owner(),
            self.settings,
            clock,
        )
        .await?;
        for f in &report.supplier_failures {
            let monitor = self.monitor.as_ref();
            super::monitor::tell_fetch_failure(monitor, f.block, f.position, f.supplier, f.result);
        }
        Ok(report)
    }
}

/// Restores a random sample of regular files of a random source's latest snapshot in memory and
/// checks each byte for byte against the catalog: every chunk's keyed id (`ChunkId::of` with the
/// owner's chunk-id key) must match, and a whole file's length must equal its entry. Nothing is
/// written to disk. The sample's seed is `clock`'s random number at the start.
pub async fn run(
    kv: Arc<dyn KvStore>,
    network: NetworkAddr,
    keys: Arc<DataKeys>,
    owner: VerifyingKey,
    settings: DrillSettings,
    clock: Clock,
) -> Result<DrillReport, DrillError> {
    let source = NetworkFragments::network(network, settings.request_timeout);
    run_with(kv, &source, keys, owner, settings, clock).await
}

/// [`run`] with any fragment client. `clock`'s random number at the start seeds the sample (a
/// fixed one makes the sample, not the network, reproducible).
pub async fn run_with<S: Fragments>(
    kv: Arc<dyn KvStore>,
    source: &S,
    keys: Arc<DataKeys>,
    owner: VerifyingKey,
    settings: DrillSettings,
    clock: Clock,
) -> Result<DrillReport, DrillError> {
    let started = clock();
    let seed = started.random;
    // The catalog is RocksDB: read it off the event loop.
    let plan = tokio::task::spawn_blocking(move || plan(&*kv, &owner, settings, seed))
        .await
        .map_err(|e| DrillError::Worker(e.to_string()))??;
    let mut drill = Drill {
        source,
        keys,
        blocks: plan.blocks,
        decoded: HashMap::new(),
        uses: plan.uses,
        fetched: 0,
        supplier_failures: Vec::new(),
        hedge_after: super::restore_worker::hedge_bound(settings.request_timeout),
        clock,
    };
    let mut report = DrillReport {
        at: started.wall.as_secs(),
        source: plan.source,
        snapshot: plan.snapshot.0,
        files: plan.files.len() as u64,
        bytes: 0,
        fragments_fetched: 0,
        failures: Vec::new(),
        seconds: 0.0,
        supplier_failures: Vec::new(),
    };
    for file in &plan.files {
        let (bytes, failure) = drill.check(file).await;
        report.bytes += bytes;
        if let Some(reason) = failure {
            report.failures.push(DrillFailure {
                path: String::from_utf8_lossy(&file.path).into_owned(),
                reason: reason.to_string(),
            });
        }
    }
    report.fragments_fetched = drill.fetched;
    report.supplier_failures = drill.supplier_failures;
    report.seconds = clock().now.saturating_sub(started.now).as_secs_f64();
    tracing::info!(
        source = %report.source,
        snapshot = report.snapshot,
        files = report.files,
        bytes = report.bytes,
        fragments = report.fragments_fetched,
        failures = report.failures.len(),
        "restore drill finished"
    );
    Ok(report)
}

/// A sampled file and what to check of it.
struct Sampled {
    path: Vec<u8>,
    size: u64,
    /// Its chunks, each with its index in the file and its block (or why the catalog has none).
    chunks: Vec<(usize, ChunkId, Result<BlockId, DrillProblem>)>,
    /// Every chunk is checked (so is the length), not a window of a file past the budget.
    whole: bool,
}

/// A block as the catalog describes it: its verified manifest and who holds each position.
struct BlockSource {
    manifest: BlockManifest,
    holders: Vec<Option<NodeId>>,
}

struct Plan {
    source: String,
    snapshot: SnapshotId,
    files: Vec<Sampled>,
    blocks: HashMap<BlockId, Result<BlockSource, DrillProblem>>,
    /// Chunks of the sample per block: a decoded block is dropped after its last use.
    uses: HashMap<BlockId, u64>,
}

fn short(block: &BlockId) -> String {
    hex::encode(&block.0[..8])
}

/// Picks the source, the snapshot and the files; resolves every chunk's block and verifies each
/// block's manifest with the owner's key. Blocking (catalog reads).
fn plan(
    kv: &dyn KvStore,
    owner: &VerifyingKey,
    settings: DrillSettings,
    seed: u64,
) -> Result<Plan, DrillError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let snapshots = catalog::snapshots(kv)?;
    let sources: BTreeSet<&str> = snapshots.iter().map(|s| s.source.as_str()).collect();
    let sources: Vec<&str> = sources.into_iter().collect();
    let source = *sources.choose(&mut rng).ok_or(DrillError::NoSnapshot)?;
    let snapshot = snapshots
        .iter()
        .filter(|s| s.source == source)
        .map(|s| s.id)
        .max()
        .ok_or(DrillError::NoSnapshot)?;

    // Reservoir sampling: one pass over the tree, `files` entries kept, each equally likely
    // (at least one: a drill that checks nothing would pass and prove nothing).
    let want = settings.files.max(1);
    let mut sample: Vec<catalog::FileEntry> = Vec::with_capacity(want);
    let mut seen = 0u64;
    for entry in catalog::files(kv, snapshot) {
        let entry = entry?;
        if entry.kind != FileKind::File || entry.size == 0 {
            continue;
        }
        seen += 1;
        if sample.len() < want {
            sample.push(entry);
        } else {
            let slot = rng.gen_range(0..seen);
            if let Some(kept) = sample.get_mut(slot as usize) {
                *kept = entry;
            }
        }
    }

    // The budget: smaller files first, whole while they fit; if none fits, a random window of
    // the smallest one's chunks of about `max_bytes` (so a source of huge files is still drilled).
    sample.sort_by(|a, b| a.size.cmp(&b.size).then_with(|| a.path.cmp(&b.path)));
    let mut chosen: Vec<(catalog::FileEntry, std::ops::Range<usize>, bool)> = Vec::new();
    let mut planned = 0u64;
    for entry in sample {
        if planned.saturating_add(entry.size) <= settings.max_bytes {
            planned += entry.size;
            let all = 0..entry.chunks.len();
            chosen.push((entry, all, true));
        } else if chosen.is_empty() && !entry.chunks.is_empty() {
            let n = entry.chunks.len();
            let fit = (settings.max_bytes as u128 * n as u128 / u128::from(entry.size.max(1)))
                .clamp(1, n as u128) as usize;
            let start = rng.gen_range(0..=n - fit);
            let whole = fit == n;
            chosen.push((entry, start..start + fit, whole));
            break;
        } else {
            break;
        }
    }

    let mut blocks = HashMap::new();
    let mut uses: HashMap<BlockId, u64> = HashMap::new();
    let mut files = Vec::with_capacity(chosen.len());
    for (entry, window, whole) in chosen {
        let mut chunks = Vec::with_capacity(window.len());
        for index in window {
            let Some(id) = entry.chunks.get(index).copied() else {
                continue;
            };
            let block = match catalog::chunk_block(kv, &id)? {
                Some(block) => block,
                None => {
                    chunks.push((index, id, Err(DrillProblem::NotIndexed)));
                    continue;
                }
            };
            if let Entry::Vacant(slot) = blocks.entry(block) {
                slot.insert(block_source(kv, owner, &block)?);
            }
            *uses.entry(block).or_default() += 1;
            chunks.push((index, id, Ok(block)));
        }
        files.push(Sampled {
            path: entry.path,
            size: entry.size,
            chunks,
            whole,
        });
    }
    Ok(Plan {
        source: source.to_string(),
        snapshot,
        files,
        blocks,
        uses,
    })
}

/// A block's verified manifest and holders, or why the catalog cannot give them.
fn block_source(
    kv: &dyn KvStore,
    owner: &VerifyingKey,
    block: &BlockId,
) -> Result<Result<BlockSource, DrillProblem>, StoreError> {
    let Some(entry) = catalog::block(kv, block)? else {
        return Ok(Err(DrillProblem::BlockNotIndexed(*block)));
    };
    Ok(match BlockManifest::verify(&entry.signed_manifest, owner) {
        Ok(manifest) if manifest.layout().total() == entry.fragments.len() => Ok(BlockSource {
            manifest,
            holders: entry.fragments.iter().map(|f| f.supplier).collect(),
        }),
        Ok(_) => Err(DrillProblem::Placements(*block)),
        Err(e) => Err(DrillProblem::Manifest(*block, Arc::new(e))),
    })
}

/// A decoded block: its plain bytes and where each chunk lies in them.
struct Decoded {
    plain: Vec<u8>,
    index: HashMap<ChunkId, (usize, usize)>,
}

/// The drill in progress: decoded blocks are shared by the files that need them.
struct Drill<'a, S> {
    source: &'a S,
    keys: Arc<DataKeys>,
    blocks: HashMap<BlockId, Result<BlockSource, DrillProblem>>,
    /// Decoded blocks still needed, and blocks that could not be had (with why).
    decoded: HashMap<BlockId, Result<Decoded, DrillProblem>>,
    uses: HashMap<BlockId, u64>,
    fetched: u64,
    supplier_failures: Vec<SupplierFailure>,
    /// A fragment request outstanding this long is hedged by one more position.
    hedge_after: Duration,
    /// Stamps the asks and hedges (the node's clock, or a test's).
    clock: Clock,
}

/// Why a sampled file failed.
#[derive(Debug)]
enum FileProblem {
    Chunk {
        index: usize,
        total: usize,
        why: DrillProblem,
    },
    Length {
        restored: u64,
        recorded: u64,
    },
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileProblem::Chunk { index, total, why } => {
                write!(f, "chunk {index} of {total}: {why}")
            }
            FileProblem::Length { restored, recorded } => {
                write!(f, "restored {restored} bytes, the catalog says {recorded}")
            }
        }
    }
}

impl<S: Fragments> Drill<'_, S> {
    /// Checks one file: (bytes found identical, why it failed).
    async fn check(&mut self, file: &Sampled) -> (u64, Option<FileProblem>) {
        let mut good = 0u64;
        let mut failure = None;
        let total = file.chunks.len();
        for (index, id, block) in &file.chunks {
            // After a failure the file's remaining chunks are not fetched, but their uses end.
            let block = match block {
                Ok(block) if failure.is_none() => *block,
                Ok(block) => {
                    self.used(block);
                    continue;
                }
                Err(why) => {
                    failure.get_or_insert_with(|| FileProblem::Chunk {
                        index: *index,
                        total,
                        why: why.clone(),
                    });
                    continue;
                }
            };
            match self.chunk(block, id).await {
                Ok(len) => good += len,
                Err(why) => {
                    failure = Some(FileProblem::Chunk {
                        index: *index,
                        total,
                        why,
                    })
                }
            }
            self.used(&block);
        }
        if failure.is_none() && file.whole && good != file.size {
            failure = Some(FileProblem::Length {
                restored: good,
                recorded: file.size,
            });
        }
        (good, failure)
    }

    /// One use of `block` is done: at the last, its decoded bytes go.
    fn used(&mut self, block: &BlockId) {
        if let Some(n) = self.uses.get_mut(block) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.uses.remove(block);
                if matches!(self.decoded.get(block), Some(Ok(_))) {
                    self.decoded.remove(block);
                }
            }
        }
    }

    /// Checks one chunk; its length when its bytes hash to its id.
    async fn chunk(&mut self, block: BlockId, id: &ChunkId) -> Result<u64, DrillProblem> {
        if !self.decoded.contains_key(&block) {
            let decoded = self.decode(block).await;
            self.decoded.insert(block, decoded);
        }
        let decoded = match self.decoded.get(&block) {
            Some(Ok(decoded)) => decoded,
            Some(Err(why)) => return Err(why.clone()),
            None => return Err(DrillProblem::Lost(block)),
        };
        let (start, end) = *decoded
            .index
            .get(id)
            .ok_or(DrillProblem::NotInBlock(block))?;
        let bytes = decoded
            .plain
            .get(start..end)
            .ok_or(DrillProblem::Malformed(block))?;
        if ChunkId::of(&self.keys.chunk_id, bytes) != *id {
            return Err(DrillProblem::Mismatch(block));
        }
        Ok(bytes.len() as u64)
    }

    /// Fetches `k` good fragments of `block` by the fetch plan's rule (`fsm::fetch`: data
    /// positions first, the next position as soon as one fails, a hedge beside a slow one),
    /// decodes it off the event loop and indexes its chunks.
    async fn decode(&mut self, block: BlockId) -> Result<Decoded, DrillProblem> {
        let source = match self.blocks.get(&block) {
            Some(Ok(source)) => source,
            Some(Err(why)) => return Err(why.clone()),
            None => return Err(DrillProblem::Unplanned(block)),
        };
        let layout = source.manifest.layout();
        let (k, total) = (layout.k(), layout.total());
        let mut fragments: Vec<Option<Vec<u8>>> = vec![None; total];
        let mut problems: Vec<(usize, FragmentProblem)> = Vec::new();
        // A drill knows nothing of who is up; a request slower than the bound is hedged (the
        // plan decides; the shell's clock stamps the asks).
        let mut plan = FetchPlan::layout(k as u32, total as u32);
        let nobody_down = BTreeSet::new();
        let fetcher = self.source;
        let ask = |position: u32| async move {
            let result = match source.holders.get(position as usize).copied().flatten() {
                Some(supplier) => fetcher
                    .retrieve(supplier, block.0, position)
                    .await
                    .map_err(FragmentProblem::from),
                None => Err(FragmentProblem::NotPlaced),
            };
            (position, result)
        };
        let mut asking: FuturesUnordered<_> = plan
            .next(&nobody_down, (self.clock)().now)
            .into_iter()
            .map(ask)
            .collect();
        while !plan.complete() && !plan.hopeless() {
            let answer = tokio::select! {
                answer = asking.next() => answer,
                () = tokio::time::sleep(HEDGE_TICK) => {
                    let now = (self.clock)().now;
                    asking.extend(plan.hedge(&nobody_down, now, self.hedge_after).into_iter().map(ask));
                    continue;
                }
            };
            let Some((position, result)) = answer else {
                break;
            };
            let checked = result.and_then(|stored| {
                self.fetched += 1;
                let (_, fragment) = data::stored::unwrap(&stored)
                    .map_err(|e| FragmentProblem::Check(Arc::new(e)))?;
                source
                    .manifest
                    .check_fragment(position as usize, fragment)
                    .map_err(|e| FragmentProblem::Check(Arc::new(e)))?;
                Ok(fragment.to_vec())
            });
            match checked {
                Ok(fragment) => {
                    if plan.ok(position)
                        && let Some(slot) = fragments.get_mut(position as usize)
                    {
                        *slot = Some(fragment);
                    }
                }
                Err(why) => {
                    plan.failed(position);
                    let supplier = source.holders.get(position as usize).copied().flatten();
                    if let (Some(supplier), Some(result)) = (supplier, why.audit_result()) {
                        self.supplier_failures.push(SupplierFailure {
                            block: block.0,
                            position,
                            supplier,
                            result,
                        });
                    }
                    problems.push((position as usize, why));
                }
            }
            let now = (self.clock)().now;
            asking.extend(plan.next(&nobody_down, now).into_iter().map(ask));
            asking.extend(
                plan.hedge(&nobody_down, now, self.hedge_after)
                    .into_iter()
                    .map(ask),
            );
        }
        // Requests still out (hedged pairs) are dropped with `asking`.
        drop(asking);
        if !plan.complete() {
            return Err(DrillProblem::TooFew {
                block,
                // What the positions not failed could give at best (the plan stops asking once
                // that is below k, so fewer may have arrived).
                have: plan.possible(),
                k,
                problems,
            });
        }
        if !problems.is_empty() {
            tracing::info!(block = %short(&block), problems = problems.len(),
                "restore drill: block decoded from other positions");
        }
        let manifest = source.manifest.clone();
        let keys = self.keys.clone();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<Option<&[u8]>> = fragments.iter().map(|f| f.as_deref()).collect();
            let plain = data::decode_block(&refs, &manifest, &keys.block)
                .map_err(|e| DrillProblem::Undecodable(block, Arc::new(e)))?
                .plain;
            let index = {
                let parsed = PackedBlock::parse(&plain)
                    .map_err(|e| DrillProblem::Unparsable(block, Arc::new(e)))?;
                let base = plain.as_ptr() as usize;
                parsed
                    .chunks()
                    .iter()
                    .map(|(id, bytes)| {
                        let start = bytes.as_ptr() as usize - base;
                        (*id, (start, start + bytes.len()))
                    })
                    .collect()
            };
            Ok(Decoded { plain, index })
        })
        .await
        .map_err(|e| DrillProblem::Stopped(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::actors::fragments::MemFragments;
    use crate::crypto::derive::MasterSecret;
    use crate::data::{BlockRandom, Layout, Packer};
    use crate::store::MemStore;
    use crate::store::catalog::{BlockEntry, FileEntry, FragmentPlace, Snapshot};
    use crate::store::{Batch, KvStore};

    const CHUNK: usize = 1500;

    struct Fixture {
        kv: Arc<dyn KvStore>,
        keys: Arc<DataKeys>,
        owner: SigningKey,
        source: MemFragments,
    }

    fn bytes(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// One snapshot: `b.bin` (1 chunk), `dir/c` (2 chunks, shared with `a.txt`), `a.txt`
    /// (3 chunks), `empty`; two chunks per block, so 2 blocks of 4 + 2 fragments. With
    /// `swapped_b`, the block holds other bytes under `b.bin`'s chunk id.
    fn fixture(swapped_b: bool) -> Fixture {
        let keys = Arc::new(MasterSecret::from_bytes([3; 32]).data_keys());
        let owner = SigningKey::from_bytes(&[5; 32]);
        let kv: Arc<dyn KvStore> = Arc::new(MemStore::new());
        let contents: Vec<Vec<u8>> = (0..4).map(|i| bytes(i, CHUNK)).collect();
        let ids: Vec<ChunkId> = contents
            .iter()
            .map(|c| ChunkId::of(&keys.chunk_id, c))
            .collect();
        let suppliers: Vec<Option<NodeId>> = (0..6u8)
            .map(|i| Some(NodeId::from_signing_key(&[i + 10; 32])))
            .collect();
        let mut batch = Batch::new();
        let mut stored = HashMap::new();
        let mut packer = Packer::new(2 * CHUNK + 200).expect("packer");
        let mut finished = Vec::new();
        for (i, (id, data)) in ids.iter().zip(&contents).enumerate() {
            let data = if swapped_b && i == 3 {
                bytes(99, CHUNK)
            } else {
                data.clone()
            };
            finished.extend(packer.add(*id, &data).expect("add"));
        }
        finished.extend(packer.finish());
        assert_eq!(finished.len(), 2, "two chunks per block");
        for (n, block) in finished.iter().enumerate() {
            let random = BlockRandom {
                id: BlockId([n as u8 + 1; 32]),
                nonce: [n as u8; 24],
            };
            let encoded = data::encode_block(
                &block.plain,
                &keys.block,
                &owner,
                Layout::new(4, 2).expect("layout"),
                1,
                random,
            )
            .expect("encode");
            for (position, fragment) in encoded.fragments.iter().enumerate() {
                let supplier = suppliers[position].expect("placed");
                stored.insert(
                    (supplier, encoded.id.0, position as u32),
                    data::stored::wrap(&encoded.signed_manifest, fragment),
                );
            }
            for (chunk, _) in &block.chunks {
                catalog::put_chunk(&mut batch, chunk, &encoded.id);
            }
            catalog::put_block(
                &mut batch,
                &BlockEntry {
                    id: encoded.id,
                    signed_manifest: encoded.signed_manifest.clone(),
                    data_shards: 4,
                    parity_shards: 2,
                    plain_len: encoded.plain_len as u64,
                    fragments: suppliers
                        .iter()
                        .map(|s| FragmentPlace {
                            supplier: *s,
                            size: 0,
                            blake3: [0; 32],
                        })
                        .collect(),
                },
            );
        }
        let snapshot = catalog::allocate_snapshot(&*kv).expect("snapshot id");
        let file = |path: &str, kind: FileKind, chunks: &[usize]| FileEntry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            mtime_ns: 0,
            ctime_ns: 0,
            inode: 0,
            size: (chunks.len() * CHUNK) as u64,
            chunks: chunks.iter().map(|&c| ids[c]).collect(),
            target: Vec::new(),
            ..FileEntry::default()
        };
        for entry in [
            file("", FileKind::Dir, &[]),
            file("a.txt", FileKind::File, &[0, 1, 2]),
            file("b.bin", FileKind::File, &[3]),
            file("dir", FileKind::Dir, &[]),
            file("dir/c", FileKind::File, &[0, 1]),
            file("empty", FileKind::File, &[]),
        ] {
            catalog::put_file(&mut batch, snapshot, &entry);
        }
        catalog::commit_snapshot(
            &mut batch,
            &Snapshot {
                id: snapshot,
                source: "/src".into(),
                root: b"/src".to_vec(),
                started_at: 1,
                finished_at: 2,
                files: 4,
                dirs: 2,
                symlinks: 0,
                bytes: 6 * CHUNK as u64,
                new_bytes: 4 * CHUNK as u64,
                new_blocks: 2,
                skipped: Vec::new(),
            },
        );
        kv.write(batch).expect("write the catalog");
        Fixture {
            kv,
            keys,
            owner,
            source: MemFragments {
                held: std::sync::Mutex::new(stored),
                ..MemFragments::default()
            },
        }
    }

    async fn drill(f: &Fixture, settings: DrillSettings) -> Result<DrillReport, DrillError> {
        run_with(
            f.kv.clone(),
            &f.source,
            f.keys.clone(),
            f.owner.verifying_key(),
            settings,
            seven,
        )
        .await
    }

    /// The real clock with a fixed random number: the same sample every run.
    fn seven() -> crate::fsm::machine::Ctx {
        crate::fsm::machine::Ctx {
            random: 7,
            ..crate::actors::shell::ctx_now()
        }
    }

    #[tokio::test]
    async fn a_sound_backup_passes_with_k_fragments_per_block() {
        let f = fixture(false);
        let r = drill(&f, DrillSettings::default()).await.expect("drill");
        assert!(r.passed(), "{r:?}");
        assert_eq!((r.source.as_str(), r.files), ("/src", 3), "{r:?}");
        assert_eq!(r.bytes, 6 * CHUNK as u64, "every non-empty file, whole");
        assert_eq!(
            r.fragments_fetched,
            2 * 4,
            "each block decoded once, from k"
        );
        assert_eq!(r.to_json()["passed"], true);
        assert!(r.at > 1_700_000_000, "dated by the wall clock: {}", r.at);
    }

    #[tokio::test]
    async fn m_bad_positions_are_replaced_by_parity() {
        let mut f = fixture(false);
        f.source.garbage.insert(0);
        f.source.failing.insert(1, FragmentError::NotFound);
        let r = drill(&f, DrillSettings::default()).await.expect("drill");
        assert!(r.passed(), "{r:?}");
        // Per block: 0, 2, 3 came back (0 bad), 1 refused; then 4 and 5.
        assert_eq!(r.fragments_fetched, 2 * 5, "{r:?}");
        // The monitor hears of both, in each of the two blocks, against their suppliers.
        let mut told: Vec<(u32, AuditResult)> = r
            .supplier_failures
            .iter()
            .map(|f| (f.position, f.result))
            .collect();
        told.sort_by_key(|(p, _)| *p);
        let (corrupt, absent) = ((0, AuditResult::Corrupt), (1, AuditResult::NotFound));
        assert_eq!(told, vec![corrupt, corrupt, absent, absent], "{r:?}");
        assert!(r.to_json().get("supplier_failures").is_none());
    }

    #[tokio::test]
    async fn more_than_m_bad_positions_fail_every_file_with_the_reason() {
        let mut f = fixture(false);
        f.source.garbage.insert(0);
        f.source.failing.insert(1, FragmentError::NotFound);
        f.source.garbage.insert(5);
        let r = drill(&f, DrillSettings::default()).await.expect("drill");
        assert!(!r.passed());
        assert_eq!(r.bytes, 0, "{r:?}");
        let paths: BTreeSet<&str> = r.failures.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, BTreeSet::from(["a.txt", "b.bin", "dir/c"]));
        let reason = &r.failures[0].reason;
        assert!(
            reason.contains("3 of the 4 fragments needed")
                && reason.contains("position 0: fragment 0 does not match its hash")
                && reason.contains("position 1: refused (NOT_FOUND)"),
            "{reason}"
        );
        assert_eq!(r.to_json()["passed"], false);
    }

    #[tokio::test]
    async fn bytes_that_do_not_hash_to_the_chunk_id_fail_the_file() {
        let f = fixture(true);
        let r = drill(&f, DrillSettings::default()).await.expect("drill");
        assert_eq!(r.failures.len(), 1, "{r:?}");
        assert_eq!(r.failures[0].path, "b.bin");
        assert!(
            r.failures[0].reason.contains("do not match its id"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_length_the_chunks_do_not_add_up_to_fails_the_file() {
        let f = fixture(false);
        let mut entry = catalog::file(&*f.kv, SnapshotId(1), b"a.txt")
            .expect("read")
            .expect("a.txt");
        entry.size += 1;
        let mut batch = Batch::new();
        catalog::put_file(&mut batch, SnapshotId(1), &entry);
        f.kv.write(batch).expect("write");
        let r = drill(&f, DrillSettings::default()).await.expect("drill");
        assert_eq!(r.failures.len(), 1, "{r:?}");
        assert_eq!(r.failures[0].path, "a.txt");
        assert!(
            r.failures[0].reason.contains("the catalog says 4501"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn the_sample_stays_within_its_bounds() {
        let f = fixture(false);
        let small = DrillSettings {
            max_bytes: 2 * CHUNK as u64,
            ..DrillSettings::default()
        };
        let r = drill(&f, small).await.expect("drill");
        assert!(r.passed(), "{r:?}");
        assert_eq!((r.files, r.bytes), (1, CHUNK as u64), "b.bin only: {r:?}");
        let one = DrillSettings {
            files: 1,
            ..DrillSettings::default()
        };
        let r = drill(&f, one).await.expect("drill");
        assert_eq!(r.files, 1, "{r:?}");
        // Nothing fits: a window of the smallest sampled file.
        let tiny = DrillSettings {
            max_bytes: 10,
            ..DrillSettings::default()
        };
        let r = drill(&f, tiny).await.expect("drill");
        assert!(r.passed(), "{r:?}");
        assert_eq!((r.files, r.bytes), (1, CHUNK as u64), "{r:?}");
    }

    #[tokio::test]
    async fn no_snapshot_is_an_error_saying_so() {
        let f = Fixture {
            kv: Arc::new(MemStore::new()),
            ..fixture(false)
        };
        let e = drill(&f, DrillSettings::default())
            .await
            .expect_err("nothing to drill");
        assert!(matches!(e, DrillError::NoSnapshot), "{e}");
        assert!(e.to_string().contains("no committed snapshot"));
    }
}
