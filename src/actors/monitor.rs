//! The monitor's driver: the IO edge of `fsm::monitor`. It loads the catalog's blocks and the
//! health matrix, hears positions from fire_hire, lists and audits suppliers, persists cells,
//! fires through fire_hire and hands the rebuilder its work.
//!
//! Audits: the owner keeps a few precomputed challenge/response pairs per fragment
//! (`data::audit`, made when the fragment's bytes were last in hand). A pair is used once. A
//! fragment with none left is fetched whole and checked against its BLAKE3 in the catalog (the
//! supplier signed nothing; the owner's record is the reference); if it passes, fresh pairs are
//! made from those bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;

use super::fire_hire::{FireHireInput, PositionNews};
use super::fragments::{FragmentError, Fragments, NetworkFragments};
use super::network_connector::NetworkConnectorDriver;
use super::rebuilder::{RebuilderDriver, RebuilderInput};
use super::services::Services;
use super::shell::{Deliver, Driver, Input, Io, Shell};
use crate::crypto::identity::NodeId;
use crate::data::audit;
use crate::data::{BlockId, Layout};
use crate::fsm::monitor::{self as mon, AuditResult, BlockInfo, Cell, Monitor, Summary};
use crate::proto::FailReason;
use crate::store::catalog::segments::{self, Change};
use crate::store::health::{self, FragmentHealth, HealthError};
use crate::store::{Batch, KvStore, StoreError, catalog};

type NetworkAddr = Addr<Shell<NetworkConnectorDriver>>;
pub type MonitorAddr = Addr<Shell<MonitorDriver>>;

#[derive(Clone, Debug)]
pub struct MonitorSettings {
    pub interval: Duration,
    pub fire_after: Duration,
    pub fire_after_failed_audits: u32,
    pub audits_per_round: usize,
    pub request_timeout: Duration,
}

#[derive(Clone)]
pub struct MonitorWiring {
    pub services: Services,
    pub status: Arc<Mutex<MonitorStatus>>,
    pub settings: MonitorSettings,
}

pub use super::status::{MonitorStatus, PositionHealth, SourceHealth};

pub enum MonitorInput {
    Position(PositionNews),
    /// The rebuilder placed a fragment.
    Placed {
        block: [u8; 32],
        position: u32,
        supplier: NodeId,
    },
    RebuildIdle,
    /// A restore (or drill) could not have a fragment from its supplier: counted like an audit
    /// of it (the restore fell back to parity because of that supplier).
    Fetched {
        block: [u8; 32],
        position: u32,
        supplier: NodeId,
        result: AuditResult,
    },
    /// The rebuilder's figures for status.
    RebuildProgress(crate::fsm::rebuilder::Progress),
}

/// Why the monitor could not read what it follows.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot read the catalog: {0}")]
    Catalog(#[from] StoreError),
    #[error("cannot read the health matrix: {0}")]
    Health(#[from] HealthError),
    #[error("the catalog reader stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the node's layout: {0}")]
    Layout(#[from] crate::data::DataError),
}

/// What the catalog says now: the blocks to follow and which sources reference which.
struct Loaded {
    blocks: Vec<BlockInfo>,
    by_source: BTreeMap<String, Vec<BlockId>>,
    /// What says the followed blocks changed: see [`mark`].
    mark: Mark,
}

pub struct MonitorDriver {
    wiring: MonitorWiring,
    rebuilder: Option<Addr<Shell<RebuilderDriver>>>,
    by_source: BTreeMap<String, Vec<BlockId>>,
    mark: Mark,
    reloading: bool,
}

/// Chunks looked up in the dedup index at a time while loading (sorted, so neighbouring ones
/// share a read of the index): bounds the load's memory whatever the tree's size (~17 MB).
const LOOKUP_BATCH: usize = 256 * 1024;

/// The blocks of `chunks` (taken, leaving it empty), each recorded as referenced by `snapshot`
/// unless a newer snapshot already was.
fn resolve(
    kv: &dyn KvStore,
    chunks: &mut Vec<crate::data::ChunkId>,
    snapshot: u64,
    newest: &mut HashMap<BlockId, u64>,
    set: &mut BTreeSet<BlockId>,
) -> Result<(), StoreError> {
    for (_, block) in catalog::chunk_blocks_of(kv, std::mem::take(chunks))? {
        if let Some(block) = block {
            newest.entry(block).or_insert(snapshot);
            set.insert(block);
        }
    }
    Ok(())
}

/// Reads the blocks to follow: every block a committed snapshot references, and the current
/// catalog's blocks; with their cells, holders, newest version and sources. Snapshots are read
/// newest first, each as its changes from the next newer one of its source (whose blocks are
/// known already, with a newer version), so memory holds one batch of chunks and the blocks,
/// and only changed entries are looked up.
fn load(kv: &dyn KvStore) -> Result<Loaded, MonitorError> {
    let snapshots = catalog::snapshots(kv)?;
    let mut newest: HashMap<BlockId, u64> = HashMap::new();
    let mut by_source: BTreeMap<String, BTreeSet<BlockId>> = BTreeMap::new();
    let mut newer: HashMap<&str, catalog::SnapshotId> = HashMap::new();
    let mut pending = Vec::with_capacity(LOOKUP_BATCH);
    for snapshot in snapshots.iter().rev() {
        let set = by_source.entry(snapshot.source.clone()).or_default();
        let base = newer.insert(&snapshot.source, snapshot.id);
        for change in segments::changes(kv, snapshot.id, base) {
            if let Change::Put { value, .. } = change? {
                pending.extend(segments::record_chunks(&value));
                if pending.len() >= LOOKUP_BATCH {
                    resolve(kv, &mut pending, snapshot.id.0, &mut newest, set)?;
                }
            }
        }
        resolve(kv, &mut pending, snapshot.id.0, &mut newest, set)?;
    }
    let current = health::current_catalog(kv)?;
    let mut blocks = Vec::new();
    for id in newest.keys().chain(current.iter()) {
        let Some(entry) = catalog::block(kv, id)? else {
            continue;
        };
        let cells = health::health(kv, id)?
            .unwrap_or_default()
            .into_iter()
            .map(cell_of)
            .collect();
        let layout = match entry.layout() {
            Ok(layout) => layout,
            Err(e) => {
                tracing::error!(block = %id, error = %e, "a block's record has no valid layout; not followed");
                continue;
            }
        };
        blocks.push(BlockInfo {
            id: id.0,
            layout,
            holders: entry.fragments.iter().map(|f| f.supplier).collect(),
            cells,
            newest: newest.get(id).copied().unwrap_or(u64::MAX),
            catalog: current.contains(id),
        });
    }
    let top = (
        snapshots.iter().map(|s| s.id.0).max().unwrap_or(0),
        snapshots.len(),
    );
    Ok(Loaded {
        blocks,
        by_source: by_source
            .into_iter()
            .map(|(s, b)| (s, b.into_iter().collect()))
            .collect(),
        mark: (top, current),
    })
}

/// How many blocks the monitor follows (for `benches/catalog_scale.rs`, which measures the load).
pub fn followed_blocks(kv: &dyn KvStore) -> Result<usize, MonitorError> {
    Ok(load(kv)?.blocks.len())
}

/// The newest snapshot, how many there are (retention drops some) and the current catalog: when
/// any changes, the blocks to follow changed.
type Mark = ((u64, usize), Vec<BlockId>);

fn mark(kv: &dyn KvStore) -> Result<Mark, MonitorError> {
    let snapshots = catalog::snapshots(kv)?;
    let top = (
        snapshots.iter().map(|s| s.id.0).max().unwrap_or(0),
        snapshots.len(),
    );
    Ok((top, health::current_catalog(kv)?))
}

pub fn cell_of(h: FragmentHealth) -> Cell {
    match h {
        FragmentHealth::Unknown => Cell::Unknown,
        FragmentHealth::Present => Cell::Present,
        FragmentHealth::Missing => Cell::Missing,
        FragmentHealth::Corrupt => Cell::Corrupt,
    }
}

pub fn health_of(c: Cell) -> FragmentHealth {
    match c {
        Cell::Unknown => FragmentHealth::Unknown,
        Cell::Present => FragmentHealth::Present,
        Cell::Missing => FragmentHealth::Missing,
        Cell::Corrupt => FragmentHealth::Corrupt,
    }
}

/// Every block the supplier lists at `position` (all pages, through the fragment client).
async fn list_position(
    network: NetworkAddr,
    supplier: NodeId,
    position: u32,
    at_most: usize,
    timeout: Duration,
) -> Option<BTreeSet<[u8; 32]>> {
    let listed = NetworkFragments::network(network, timeout)
        .list(supplier, at_most)
        .await
        .ok()?;
    Some(
        listed
            .into_iter()
            .filter(|l| l.position == position)
            .map(|l| l.block)
            .collect(),
    )
}

/// One audit of one fragment: a precomputed pair if one is left, else a whole fetch. Anything
/// but a valid proof from a reachable supplier is asked once more before it counts (H1).
async fn audit_one(
    wiring: MonitorWiring,
    block: [u8; 32],
    position: u32,
    supplier: NodeId,
) -> AuditResult {
    let first = audit_attempt(&wiring, block, position, supplier).await;
    if first != AuditResult::Refused {
        return first;
    }
    audit_attempt(&wiring, block, position, supplier).await
}

async fn audit_attempt(
    wiring: &MonitorWiring,
    block: [u8; 32],
    position: u32,
    supplier: NodeId,
) -> AuditResult {
    let kv = wiring.services.kv.clone();
    let id = BlockId(block);
    let pairs = tokio::task::spawn_blocking(move || {
        let pairs = health::pairs(&*kv, &id, position).unwrap_or_default();
        let expected = catalog::block(&*kv, &id).ok().flatten().and_then(|e| {
            e.fragments
                .get(position as usize)
                .map(|f| (f.blake3, f.size))
        });
        (pairs, expected)
    })
    .await;
    let Ok((mut pairs, expected)) = pairs else {
        return AuditResult::NoAnswer;
    };
    let client = NetworkFragments::network(
        wiring.services.network.clone(),
        wiring.settings.request_timeout,
    );
    if let Some(pair) = pairs.pop() {
        // Used once: the rest are saved before the challenge leaves.
        let mut batch = Batch::new();
        health::put_pairs(&mut batch, &id, position, &pairs);
        if wiring.services.writer.write(batch).await.is_err() {
            return AuditResult::NoAnswer;
        }
        let result = match client.audit(supplier, block, position, &pair).await {
            Ok(proof) if pair.check(&proof) => AuditResult::Passed,
            Ok(_) => AuditResult::Corrupt,
            Err(e) => failed_audit(&e),
        };
        if matches!(result, AuditResult::NoAnswer | AuditResult::Busy) {
            // No proof was given for it: the pair goes back (a retry or a later round uses it).
            pairs.push(pair);
            let mut batch = Batch::new();
            health::put_pairs(&mut batch, &id, position, &pairs);
            let _ = wiring.services.writer.write(batch).await;
        }
        return result;
    }
    // No pair left (or never made, e.g. after a recovery): a slice at a random offset, checked
    // against the fragment's BLAKE3 alone (about 1.7 KiB, where a whole fetch moves the
    // fragment). A supplier that does not serve slices is fetched from whole.
    let Some((expected, size)) = expected else {
        return AuditResult::NoAnswer;
    };
    let offset = audit::slice_offset(size, &mut rand::thread_rng());
    match client
        .slice(supplier, block, position, offset, audit::SLICE_LEN)
        .await
    {
        Ok(slice) if audit::slice_checks(&slice, &expected, size, offset, audit::SLICE_LEN) => {
            return AuditResult::Passed;
        }
        Ok(_) => return AuditResult::Corrupt,
        Err(e) if !slices_unsupported(&e) => return failed_audit(&e),
        Err(_) => {}
    }
    match client.retrieve(supplier, block, position).await {
        Ok(data) if *blake3::hash(&data).as_bytes() == expected => {
            let fresh = audit::pairs_for(&data, &mut rand::thread_rng());
            let mut batch = Batch::new();
            health::put_pairs(&mut batch, &id, position, &fresh);
            let _ = wiring.services.writer.write(batch).await;
            AuditResult::Passed
        }
        Ok(_) => AuditResult::Corrupt,
        Err(e) => failed_audit(&e),
    }
}

/// A supplier that answers a slice challenge as a request it does not know (a node from
/// before slices says NO_SERVICE to an unknown request, PROTOCOL.md §7), or says the range is
/// not in the fragment: audited by a whole fetch instead, which settles it.
fn slices_unsupported(error: &FragmentError) -> bool {
    matches!(
        error.refusal(),
        Some(FailReason::NoService | FailReason::Unexpected | FailReason::Malformed)
    )
}

/// How a restore or drill counts a fetch that failed against its supplier: as an audit of it,
/// except without a session (`None`: not the supplier's doing).
pub fn fetch_failure(error: &FragmentError) -> Option<AuditResult> {
    Some(failed_audit(error)).filter(|r| *r != AuditResult::NoAnswer)
}

/// Tells the monitor, when it runs, that `supplier` did not give a fragment a restore or drill
/// asked for (`result` from [`fetch_failure`], or `Corrupt`).
pub fn tell_fetch_failure(
    monitor: Option<&Recipient<Input<MonitorInput>>>,
    block: [u8; 32],
    position: u32,
    supplier: NodeId,
    result: AuditResult,
) {
    if let Some(monitor) = monitor {
        let _ = monitor.try_send(Input(MonitorInput::Fetched {
            block,
            position,
            supplier,
            result,
        }));
    }
}

/// What a failed audit request says (H1): without a session, or from a supplier that fell
/// silent (no reply and not even a pong), nothing; "try later", passing trouble (M6);
/// NOT_FOUND, missing; bytes it cannot read back or a range it does not have, corrupt; any
/// other answer from a reachable supplier — a refusal, no reply in time while it answers
/// pings, a reply of the wrong kind — a refusal to prove it holds the bytes.
pub fn failed_audit(error: &FragmentError) -> AuditResult {
    if matches!(error, FragmentError::Unreachable | FragmentError::Silent(_)) {
        return AuditResult::NoAnswer;
    }
    match error.refusal() {
        Some(FailReason::NotFound) => AuditResult::NotFound,
        Some(FailReason::StorageError | FailReason::Malformed) => AuditResult::Corrupt,
        Some(FailReason::TryLater) => AuditResult::Busy,
        _ => AuditResult::Refused,
    }
}

impl MonitorDriver {
    fn publish(&self, summary: &Summary, machine: &Monitor) {
        let Ok(mut status) = self.wiring.status.lock() else {
            return;
        };
        status.rounds = summary.rounds;
        status.blocks = summary.blocks;
        status.audits_passed = summary.audits_passed;
        status.audits_failed = summary.audits_failed;
        status.cells = summary.cells.clone();
        status.by_redundancy = summary.by_redundancy.clone();
        status.fired = summary.fired.clone();
        status.rebuild_queued = summary.rebuild_queued;
        status.k = machine.layout.k() as u32;
        status.m = machine.layout.m() as u32;
        let slow = machine.latency.slow();
        status.positions = machine
            .positions
            .iter()
            .enumerate()
            .map(|(p, v)| PositionHealth {
                position: p as u32,
                supplier: v.supplier.map(|s| s.to_string()),
                up: v.up,
                failed_audits: v.failed_audits,
                availability: if v.observed.is_zero() {
                    if v.up { 1.0 } else { 0.0 }
                } else {
                    v.up_time.as_secs_f64() / v.observed.as_secs_f64()
                },
                observed_secs: v.observed.as_secs(),
                latency_ms: machine
                    .latency
                    .typical(p as u32)
                    .map(|d| d.as_millis() as u64),
                slow: slow.contains(&(p as u32)),
            })
            .collect();
        let m = i64::from(status.m);
        status.sources = self
            .by_source
            .iter()
            .map(|(source, blocks)| {
                let worst = blocks
                    .iter()
                    .filter_map(|b| machine.blocks.get(&b.0))
                    .map(|b| machine.redundancy(b))
                    .min()
                    .unwrap_or(m);
                let health = if worst >= m {
                    "full"
                } else if worst > 0 {
                    "degraded"
                } else if worst == 0 {
                    "at risk"
                } else {
                    "lost"
                };
                SourceHealth {
                    source: source.clone(),
                    blocks: blocks.len() as u64,
                    worst_redundancy: worst,
                    health: health.into(),
                    ..Default::default()
                }
            })
            .collect();
    }

    /// At the end of a round: reload the blocks if a backup committed or the catalog moved.
    fn maybe_reload(&mut self, io: &mut Io<'_, Self>) {
        if self.reloading {
            return;
        }
        self.reloading = true;
        let kv = self.wiring.services.kv.clone();
        let known = self.mark.clone();
        io.spawn_then_opt(
            async move {
                tokio::task::spawn_blocking(move || {
                    if mark(&*kv).ok().as_ref() == Some(&known) {
                        return Ok(None);
                    }
                    load(&*kv).map(Some)
                })
                .await?
            },
            |driver, loaded: Result<Option<Loaded>, MonitorError>| {
                driver.reloading = false;
                match loaded {
                    Ok(Some(loaded)) => {
                        driver.by_source = loaded.by_source;
                        driver.mark = loaded.mark;
                        Some(mon::Event::Blocks(loaded.blocks))
                    }
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reload the catalog for the monitor");
                        None
                    }
                }
            },
        );
    }
}

impl Driver for MonitorDriver {
    type M = Monitor;
    type Input = MonitorInput;
    type Query = std::convert::Infallible;
    type Answer = ();

    fn perform(&mut self, output: mon::Output, machine: &Monitor, io: &mut Io<'_, Self>) {
        match output {
            mon::Output::List {
                position,
                supplier,
                at_most,
            } => {
                let network = self.wiring.services.network.clone();
                let timeout = self.wiring.settings.request_timeout;
                // The round's deadline ends the listing too: a supplier that answers pages
                // forever is given up on with the round, not followed into the next one
                // (security review M3; pages must also advance and are capped, `fragments.rs`).
                let deadline = machine.round_deadline;
                let listing = async move {
                    tokio::time::timeout(
                        deadline,
                        list_position(network, supplier, position, at_most, timeout),
                    )
                    .await
                    .ok()
                    .flatten()
                };
                io.spawn_then(listing, move |_, held| mon::Event::Listed {
                    position,
                    supplier,
                    held,
                });
            }
            mon::Output::Audit {
                block,
                position,
                supplier,
            } => {
                let wiring = self.wiring.clone();
                io.spawn_then(
                    audit_one(wiring, block, position, supplier),
                    move |_, result| {
                        if result != AuditResult::Passed && result != AuditResult::NoAnswer {
                            tracing::warn!(block = %BlockId(block), position, supplier = %supplier,
                                result = ?result, "storage audit failed");
                        }
                        mon::Event::Audited {
                            block,
                            position,
                            supplier,
                            result,
                        }
                    },
                );
            }
            mon::Output::Fire {
                position,
                supplier,
                reason,
            } => {
                tracing::warn!(position, supplier = %supplier, reason = %reason,
                    "firing the supplier; a replacement is hired for its position");
                let fire_hire = self.wiring.services.fire_hire.clone();
                io.spawn_opt(async move {
                    let _ = fire_hire
                        .send(Input(FireHireInput::Fire { position }))
                        .await;
                    None
                });
            }
            mon::Output::Rebuild(work) => {
                if let Some(rebuilder) = &self.rebuilder {
                    let rebuilder = rebuilder.clone();
                    io.spawn_opt(async move {
                        let _ = rebuilder.send(Input(RebuilderInput::Work(work))).await;
                        None
                    });
                }
            }
            mon::Output::SaveCells(cells) => {
                let mut batch = Batch::new();
                for (block, cells) in &cells {
                    let row: Vec<FragmentHealth> = cells.iter().copied().map(health_of).collect();
                    health::put_health(&mut batch, &BlockId(*block), &row);
                }
                let writer = self.wiring.services.writer.clone();
                io.spawn_opt(async move {
                    if let Err(e) = writer.write(batch).await {
                        tracing::warn!(error = %e, "cannot save the health matrix");
                    }
                    None
                });
            }
            mon::Output::Report(summary) => {
                self.publish(&summary, machine);
                self.maybe_reload(io);
                // How many friends could replace a fired supplier.
                let fire_hire = self.wiring.services.fire_hire.clone();
                io.spawn_opt(async move {
                    let positions = super::fire_hire::positions(&fire_hire).await?;
                    Some(mon::Event::Spares(positions.spares))
                });
            }
        }
    }

    fn input(
        &mut self,
        input: MonitorInput,
        _machine: &Monitor,
        _io: &mut Io<'_, Self>,
    ) -> Vec<mon::Event> {
        match input {
            MonitorInput::Position(news) => vec![mon::Event::Position {
                position: news.position,
                supplier: news.supplier,
                up: news.up,
            }],
            MonitorInput::Placed {
                block,
                position,
                supplier,
            } => vec![mon::Event::Placed {
                block,
                position,
                supplier,
            }],
            MonitorInput::RebuildIdle => vec![mon::Event::RebuildIdle],
            MonitorInput::Fetched {
                block,
                position,
                supplier,
                result,
            } => {
                tracing::warn!(block = %BlockId(block), position, supplier = %supplier,
                    result = ?result, "a restore or drill could not have a fragment from its supplier");
                vec![mon::Event::Audited {
                    block,
                    position,
                    supplier,
                    result,
                }]
            }
            MonitorInput::RebuildProgress(progress) => {
                if let Ok(mut status) = self.wiring.status.lock() {
                    status.rebuild = progress;
                }
                Vec::new()
            }
        }
    }

    fn query(&mut self, query: Self::Query, _: &Monitor, _: &mut Io<'_, Self>) {
        match query {}
    }
}

impl Handler<PositionNews> for Shell<MonitorDriver> {
    type Result = ();

    fn handle(&mut self, news: PositionNews, ctx: &mut Context<Self>) {
        <Self as Handler<Input<MonitorInput>>>::handle(
            self,
            Input(MonitorInput::Position(news)),
            ctx,
        );
    }
}

/// Starts the monitor and its rebuilder; both follow the catalog from now on.
pub async fn start(
    wiring: MonitorWiring,
    rebuilder: super::rebuilder::RebuilderWiring,
    layout: Layout,
) -> Result<MonitorAddr, MonitorError> {
    let kv = wiring.services.kv.clone();
    let loaded = tokio::task::spawn_blocking(move || load(&*kv)).await??;
    let s = &wiring.settings;
    let mut machine = Monitor::new(
        s.interval,
        s.fire_after,
        s.fire_after_failed_audits,
        s.audits_per_round,
    );
    // Every request of a round ends by its own timeout, and an audit asks at most twice: a frozen
    // supplier holds a round no longer.
    machine.round_deadline = 2 * s.request_timeout + Duration::from_secs(5);
    let ctx = actix::Context::<Shell<MonitorDriver>>::new();
    let addr = ctx.address();
    let rebuilder_addr = super::rebuilder::start(rebuilder, addr.clone()).await;
    let driver = MonitorDriver {
        wiring: wiring.clone(),
        rebuilder: Some(rebuilder_addr),
        by_source: loaded.by_source,
        mark: loaded.mark,
        reloading: false,
    };
    ctx.run(Shell::new(
        machine,
        "0",
        driver,
        wiring.services.registry.clone(),
    ));
    let _ = addr
        .send(Deliver(mon::Event::Start {
            layout,
            blocks: loaded.blocks,
            suppliers: vec![None; layout.total()],
        }))
        .await;
    let _ = wiring
        .services
        .fire_hire
        .send(Input(FireHireInput::Subscribe(addr.clone().recipient())))
        .await;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ChunkId;
    use crate::store::MemStore;
    use crate::store::catalog::{
        BlockEntry, FileEntry, FileKind, FragmentPlace, Snapshot, SnapshotId,
    };

    fn chunk(n: u32) -> ChunkId {
        let mut id = [0x3c; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        ChunkId(id)
    }

    fn block(n: u32) -> BlockId {
        BlockId([n as u8; 32])
    }

    fn file(path: &str, chunks: impl IntoIterator<Item = u32>) -> FileEntry {
        FileEntry {
            path: path.as_bytes().to_vec(),
            kind: FileKind::File,
            chunks: chunks.into_iter().map(chunk).collect(),
            ..FileEntry::default()
        }
    }

    fn commit(batch: &mut Batch, id: u64, source: &str, files: &[FileEntry]) {
        for f in files {
            catalog::put_file(batch, SnapshotId(id), f);
        }
        catalog::commit_snapshot(
            batch,
            &Snapshot {
                id: SnapshotId(id),
                source: source.into(),
                root: b"/".to_vec(),
                started_at: id,
                finished_at: id,
                files: files.len() as u64,
                dirs: 0,
                symlinks: 0,
                bytes: 0,
                new_bytes: 0,
                new_blocks: 0,
                skipped: Vec::new(),
            },
        );
    }

    #[test]
    fn load_finds_each_block_with_its_newest_version_and_sources() {
        let kv = MemStore::new();
        let mut b = Batch::new();
        // Chunk n is in block n / 1000, except the big file's (block 50).
        for n in 0..6000 {
            catalog::put_chunk(&mut b, &chunk(n), &block(n / 1000));
        }
        let big = 10_000..10_000 + LOOKUP_BATCH as u32 + 10;
        for n in big.clone() {
            catalog::put_chunk(&mut b, &chunk(n), &block(50));
        }
        for n in [0, 1, 2, 3, 4, 5, 50] {
            catalog::put_block(
                &mut b,
                &BlockEntry {
                    id: block(n),
                    signed_manifest: vec![1],
                    data_shards: 2,
                    parity_shards: 1,
                    plain_len: 1,
                    fragments: vec![
                        FragmentPlace {
                            supplier: None,
                            size: 1,
                            blake3: [0; 32],
                        };
                        3
                    ],
                },
            );
        }
        let kept = file("kept", [0, 1]);
        // docs 1: block 0 (kept to the end) and block 1 (only here);
        // docs 3: kept, block 2; docs 5: kept, block 3, the big file (a batch and more).
        // pics 4: block 3 and block 4; a chunk the index does not know is skipped.
        commit(&mut b, 1, "docs", &[kept.clone(), file("gone", [1500])]);
        commit(&mut b, 3, "docs", &[kept.clone(), file("new", [2000])]);
        commit(
            &mut b,
            5,
            "docs",
            &[kept, file("new", [3000]), file("big", big)],
        );
        commit(&mut b, 4, "pics", &[file("p", [3001, 4000, u32::MAX])]);
        kv.write(b).expect("write");

        let loaded = load(&kv).expect("load");
        let newest: BTreeMap<u8, u64> = loaded.blocks.iter().map(|b| (b.id[0], b.newest)).collect();
        assert_eq!(
            newest,
            BTreeMap::from([(0, 5), (1, 1), (2, 3), (3, 5), (4, 4), (50, 5)]),
            "each block with the newest snapshot that references it"
        );
        let sources: BTreeMap<&str, Vec<u8>> = loaded
            .by_source
            .iter()
            .map(|(s, blocks)| (s.as_str(), blocks.iter().map(|b| b.0[0]).collect()))
            .collect();
        assert_eq!(
            sources,
            BTreeMap::from([("docs", vec![0, 1, 2, 3, 50]), ("pics", vec![3, 4])])
        );
    }
}
