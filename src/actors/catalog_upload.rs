//! The catalog upload's IO, shared by the backup job (its `Committing` phase, driven by the
//! machine's outputs) and the rebuilder's refresh: export, seal and code the catalog; send one
//! catalog fragment; stage the misses and send the recovery record; save the catalog's entries.
//! What is sent where, when the upload counts ("≥ k" of every block), the revision and "at least
//! one copy of the record" are decided by [`CatalogCommit`] (`src/fsm/catalog_commit.rs`).
//!
//! One upload at a time in this process ([`UPLOADING`]): an upload reads the last revision when
//! it codes the catalog and writes the next one when it saves; a job's commit and a rebuild's
//! refresh must not interleave between the two. The job takes the turn when it starts coding and
//! gives it back once its entries are saved (or it ends); the refresh holds it for its whole run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use ed25519_dalek::{SigningKey, VerifyingKey};

use super::backup_job::{BackupSettings, FragmentSource, PlaceError, store_fragment};
use super::fragments::{Fragments, NetworkFragments};
use super::network_connector::NetworkConnectorDriver;
use super::services::Services;
use super::shell::Shell;
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::NodeId;
use crate::data::audit::AuditPair;
use crate::data::{self, BlockId, BlockManifest, BlockRandom, DataError};
use crate::fsm::catalog_commit::{CatalogCommit, Misses, Placement, raise_revision};
use crate::fsm::fetch::Plan;
use crate::pipeline::staged_path;
use crate::proto::{FailReason, FragmentId};
use crate::store::catalog::segments::{self, Segment};
use crate::store::catalog::{
    self, BlockEntry, CatalogBlock, FragmentPlace, RecoveryRecord, SnapshotId,
};
use crate::store::health::{self, FragmentHealth, HealthError};
use crate::store::{Batch, KvStore, StoreError, WriterError};

/// The fragment id the recovery record is stored under on every supplier (documented in
/// PROTOCOL.md): a fixed block id no random block id will meet, at the last position.
pub const RECOVERY_BLOCK: [u8; 32] = *b"bitdust recovery record, v1\0\0\0\0\0";
pub const RECOVERY_POSITION: u32 = u32::MAX;

/// One catalog upload at a time in this process (see the module doc).
pub(crate) static UPLOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Why a catalog upload did not complete.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot read the catalog: {0}")]
    Store(#[from] StoreError),
    #[error("cannot read the recovery revision: {0}")]
    Health(#[from] HealthError),
    #[error("cannot code the catalog: {0}")]
    Code(#[from] DataError),
    #[error("cannot stage a catalog fragment: {0}")]
    Stage(#[source] std::io::Error),
    #[error(
        "the snapshot is committed here, but its catalog reached only {placed} of the {k} suppliers it needs"
    )]
    BelowK { placed: usize, k: u32 },
    #[error("the snapshot is committed here, but no supplier took the recovery record")]
    NoRecordCopy,
    #[error(
        "suppliers hold a newer recovery record than this node's{}; back up again to store one above it",
        match .adopted { Some(r) => format!(" (revision {r}, adopted: its versions are listed now)"), None => String::new() }
    )]
    Behind { adopted: Option<u64> },
    #[error("cannot write the catalog: {0}")]
    Write(#[from] WriterError),
    #[error("fire_hire is gone (the node stops)")]
    FireHireGone,
    #[error("a worker thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// One catalog block, coded: each fragment as a supplier stores it (manifest beside it).
pub(crate) struct CodedBlock {
    pub id: BlockId,
    pub signed_manifest: Vec<u8>,
    pub plain_len: u64,
    pub stored: Vec<Vec<u8>>,
    pub hashes: Vec<[u8; 32]>,
}

/// The catalog sealed and coded, with what the recovery record needs besides.
pub(crate) struct CodedCatalog {
    /// The blocks made by this upload: new tree segments', then the head's.
    pub blocks: Vec<CodedBlock>,
    /// Blocks of tree segments stored before and kept, named again by the record (first).
    pub kept: Vec<CatalogBlock>,
    /// Every tree segment of this catalog, in order, for the next upload to build on.
    pub segments: Vec<Segment>,
    /// Length of the stored catalog (every segment's bytes).
    pub len: u64,
    /// Of which this upload made (new tree segments and the head).
    pub new_len: u64,
    /// The highest revision this node stored before.
    pub last_revision: u64,
    /// The suppliers' signed identities, for a new machine to reach them.
    pub identities: Vec<Vec<u8>>,
}

impl CodedCatalog {
    pub fn ids(&self) -> Vec<[u8; 32]> {
        self.blocks.iter().map(|b| b.id.0).collect()
    }

    /// The stored bytes of one fragment.
    pub fn fragment(&self, block: [u8; 32], position: u32) -> Option<Vec<u8>> {
        self.blocks
            .iter()
            .find(|b| b.id.0 == block)?
            .stored
            .get(position as usize)
            .cloned()
    }

    /// Every block of the catalog in the order its bytes go: kept, then new.
    pub fn all_ids(&self) -> Vec<BlockId> {
        self.kept
            .iter()
            .map(|b| b.id)
            .chain(self.blocks.iter().map(|b| b.id))
            .collect()
    }
}

/// Seals and codes `bytes` into catalog blocks of at most the block size; returns their ids.
fn code_pieces(
    bytes: &[u8],
    keys: &DataKeys,
    owner: &SigningKey,
    settings: &BackupSettings,
    out: &mut Vec<CodedBlock>,
) -> Result<Vec<BlockId>, UploadError> {
    let layout = settings.layout()?;
    let mut ids = Vec::new();
    for piece in bytes.chunks(settings.block_size.max(1)) {
        let random = BlockRandom {
            id: BlockId(rand::random()),
            nonce: rand::random(),
        };
        let block = data::encode_block(
            piece,
            &keys.catalog,
            owner,
            layout,
            settings.zstd_level,
            random,
        )?;
        let stored: Vec<Vec<u8>> = block
            .fragments
            .iter()
            .map(|f| data::stored::wrap(&block.signed_manifest, f))
            .collect();
        ids.push(block.id);
        out.push(CodedBlock {
            id: block.id,
            hashes: stored.iter().map(|s| *blake3::hash(s).as_bytes()).collect(),
            signed_manifest: block.signed_manifest,
            plain_len: block.plain_len as u64,
            stored,
        });
    }
    Ok(ids)
}

/// Codes a segment into catalog blocks as it is written: memory holds at most one block's plain
/// bytes besides the coded blocks.
struct Pieces<'a> {
    keys: &'a DataKeys,
    owner: &'a SigningKey,
    settings: &'a BackupSettings,
    plain: Vec<u8>,
    out: &'a mut Vec<CodedBlock>,
    ids: Vec<BlockId>,
    /// Why coding failed (the writer's caller sees an IO error).
    failed: Option<UploadError>,
}

impl<'a> Pieces<'a> {
    fn new(
        keys: &'a DataKeys,
        owner: &'a SigningKey,
        settings: &'a BackupSettings,
        out: &'a mut Vec<CodedBlock>,
    ) -> Self {
        Pieces {
            keys,
            owner,
            settings,
            plain: Vec::new(),
            out,
            ids: Vec::new(),
            failed: None,
        }
    }

    fn code(&mut self) -> Result<(), UploadError> {
        if !self.plain.is_empty() {
            let ids = code_pieces(&self.plain, self.keys, self.owner, self.settings, self.out)?;
            self.ids.extend(ids);
            self.plain.clear();
        }
        Ok(())
    }

    /// Codes what is left; the blocks made, in order.
    fn finish(mut self) -> Result<Vec<BlockId>, UploadError> {
        self.code()?;
        Ok(self.ids)
    }

    /// The error of a write through these pieces: coding's own, else the store's.
    fn error(&mut self, e: StoreError) -> UploadError {
        self.failed.take().unwrap_or(UploadError::Store(e))
    }
}

impl std::io::Write for Pieces<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let size = self.settings.block_size.max(1);
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = size - self.plain.len().min(size);
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.plain.extend_from_slice(now);
            rest = later;
            if self.plain.len() >= size
                && let Err(e) = self.code()
            {
                let message = e.to_string();
                self.failed = Some(e);
                return Err(std::io::Error::other(message));
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A stored segment's blocks as the record names them, from the block index (`None` if one is
/// no longer known, or has fewer than `k` fragments placed and not found missing or corrupt by
/// the monitor: the segment is made again, rather than named by every record until a recovery
/// cannot read it).
fn kept_blocks(
    kv: &dyn KvStore,
    segment: &Segment,
) -> Result<Option<Vec<CatalogBlock>>, UploadError> {
    let mut blocks = Vec::with_capacity(segment.blocks.len());
    for id in &segment.blocks {
        let Some(entry) = catalog::block(kv, id)? else {
            return Ok(None);
        };
        // An unreadable health record counts as never audited.
        let cells = health::health(kv, id).ok().flatten().unwrap_or_default();
        let good = entry
            .fragments
            .iter()
            .enumerate()
            .filter(|(p, f)| {
                f.supplier.is_some()
                    && !matches!(
                        cells.get(*p),
                        Some(FragmentHealth::Missing | FragmentHealth::Corrupt)
                    )
            })
            .count();
        if !entry.layout().is_ok_and(|l| good >= l.k()) {
            return Ok(None);
        }
        blocks.push(CatalogBlock {
            id: entry.id,
            signed_manifest: entry.signed_manifest,
            suppliers: entry.fragments.iter().map(|f| f.supplier).collect(),
        });
    }
    Ok(Some(blocks))
}

/// Exports, seals and codes what changed of the catalog (new snapshots' tree segments, and the
/// head), names the tree segments kept from before, and reads the last revision and the
/// suppliers' identities (blocking: run it on a worker thread).
pub(crate) fn code_catalog(
    kv: &dyn KvStore,
    keys: &DataKeys,
    owner: &SigningKey,
    settings: &BackupSettings,
    suppliers: &[NodeId],
) -> Result<CodedCatalog, UploadError> {
    // A bookkeeping record that cannot be read costs whole trees once, nothing else.
    let stored = health::catalog_segments(kv).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the stored catalog's segments; storing every tree whole");
        Vec::new()
    });
    let mut known: HashMap<SnapshotId, Vec<CatalogBlock>> = HashMap::new();
    for segment in &stored {
        if let Some(blocks) = kept_blocks(kv, segment)? {
            known.insert(segment.snapshot, blocks);
        }
    }
    let committed: Vec<(SnapshotId, String)> = catalog::snapshots(kv)?
        .into_iter()
        .map(|s| (s.id, s.source))
        .collect();
    let plan = segments::plan(&stored, &committed, |s| known.contains_key(&s.snapshot));
    let mut kept = Vec::new();
    let mut all = Vec::new();
    let mut len = 0;
    for segment in plan.keep {
        kept.extend(known.remove(&segment.snapshot).unwrap_or_default());
        len += segment.len;
        all.push(segment);
    }
    let kept_len = len;
    let mut blocks = Vec::new();
    for new in plan.new {
        let mut pieces = Pieces::new(keys, owner, settings, &mut blocks);
        let written = segments::write_tree(kv, new.snapshot, new.base, &mut pieces)
            .map_err(|e| pieces.error(e))?;
        let ids = pieces.finish()?;
        len += written;
        all.push(Segment {
            snapshot: new.snapshot,
            base: new.base,
            source: new.source,
            depth: new.depth,
            blocks: ids,
            len: written,
        });
    }
    // The head lists the versions planned above only: one committed since has no tree here.
    let planned: BTreeSet<SnapshotId> = all.iter().map(|s| s.snapshot).collect();
    let mut pieces = Pieces::new(keys, owner, settings, &mut blocks);
    len += segments::write_head(kv, Some(&planned), &mut pieces).map_err(|e| pieces.error(e))?;
    pieces.finish()?;
    // A peer book that cannot be read leaves the record without identities (as before).
    let identities = crate::store::peers::load(kv)
        .map(|peers| {
            peers
                .into_iter()
                .filter(|(identity, _)| suppliers.contains(&identity.node_id()))
                .map(|(identity, _)| identity.to_bytes())
                .collect()
        })
        .unwrap_or_default();
    Ok(CodedCatalog {
        blocks,
        kept,
        segments: all,
        len,
        new_len: len - kept_len,
        last_revision: health::recovery_revision(kv)?,
        identities,
    })
}

/// Writes one staged fragment durably (file and directory synced).
async fn stage(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (path, bytes) = (path.to_path_buf(), bytes.to_vec());
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::File::open(dir)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}

/// What the record and the entries need beyond the machine's decision.
pub(crate) struct Upload<'a> {
    pub coded: &'a CodedCatalog,
    pub settings: &'a BackupSettings,
    /// The supplier at each position.
    pub suppliers: &'a BTreeMap<u32, NodeId>,
    pub revision: u64,
    pub placements: &'a [Placement],
}

impl Upload<'_> {
    fn holder(&self, placement: &Placement, position: u32) -> Option<NodeId> {
        placement
            .holders
            .contains(&position)
            .then(|| self.suppliers.get(&position).copied())
            .flatten()
    }

    /// The sealed recovery record naming the holders, and the staged fragments to write first.
    fn record(&self, keys: &DataKeys, owner: &SigningKey, now: u64) -> Vec<u8> {
        let made = self
            .coded
            .blocks
            .iter()
            .zip(self.placements)
            .map(|(block, placement)| CatalogBlock {
                id: block.id,
                signed_manifest: block.signed_manifest.clone(),
                suppliers: (0..block.stored.len() as u32)
                    .map(|p| self.holder(placement, p))
                    .collect(),
            });
        let catalog = self.coded.kept.iter().cloned().chain(made).collect();
        let record = RecoveryRecord {
            revision: self.revision,
            created_at: now,
            data_shards: self.settings.data_shards,
            parity_shards: self.settings.parity_shards,
            suppliers: self.suppliers.iter().map(|(p, s)| (*p, *s)).collect(),
            catalog,
            catalog_len: self.coded.len,
            identities: self.coded.identities.clone(),
        };
        catalog::seal_recovery(&record, &keys.recovery, owner, rand::random())
    }

    /// The catalog blocks' entries (with their audit pairs and missing cells), the revision and
    /// the current catalog, in one batch; and the blocks with fragments left in the outbox.
    pub fn entries(&self, pairs: &[(BlockId, u32, Vec<AuditPair>)]) -> (Batch, Vec<BlockEntry>) {
        let mut batch = Batch::new();
        let mut partial = Vec::new();
        for (block, placement) in self.coded.blocks.iter().zip(self.placements) {
            let fragments = (0..block.stored.len())
                .map(|p| FragmentPlace {
                    supplier: self.holder(placement, p as u32),
                    size: block.stored[p].len() as u64,
                    blake3: block.hashes[p],
                })
                .collect();
            let entry = BlockEntry {
                id: block.id,
                signed_manifest: block.signed_manifest.clone(),
                data_shards: self.settings.data_shards,
                parity_shards: self.settings.parity_shards,
                plain_len: block.plain_len,
                fragments,
            };
            catalog::put_block(&mut batch, &entry);
            if !placement.missing.is_empty() {
                let cells: Vec<FragmentHealth> = (0..block.stored.len() as u32)
                    .map(|p| {
                        if placement.missing.contains(&p) {
                            FragmentHealth::Missing
                        } else {
                            // Acknowledged, not yet proven: only an audit marks it present.
                            FragmentHealth::Unknown
                        }
                    })
                    .collect();
                health::put_health(&mut batch, &block.id, &cells);
            }
            if entry.placed() < entry.fragments.len() {
                partial.push(entry);
            }
        }
        for (block, position, pairs) in pairs {
            health::put_pairs(&mut batch, block, *position, pairs);
        }
        health::put_recovery_revision(&mut batch, self.revision);
        health::put_current_catalog(&mut batch, &self.coded.all_ids(), &self.coded.segments);
        (batch, partial)
    }
}

/// What sending the record needs that outlives the driver's borrow.
pub(crate) struct RecordSend {
    pub network: Addr<Shell<NetworkConnectorDriver>>,
    pub timeout: std::time::Duration,
    /// The staged fragments to write before the record names them as waiting.
    pub staged: Vec<(std::path::PathBuf, Vec<u8>)>,
    pub sealed: Vec<u8>,
    pub to: Vec<NodeId>,
    pub adopt: Adopt,
}

impl RecordSend {
    pub fn new(upload: &Upload<'_>, services: &Services, now: u64, to: &[u32]) -> RecordSend {
        let (keys, owner) = (&services.keys, &services.signer);
        let mut staged = Vec::new();
        for (block, placement) in upload.coded.blocks.iter().zip(upload.placements) {
            for &position in &placement.staged {
                if let Some(bytes) = block.stored.get(position as usize) {
                    let path = staged_path(&upload.settings.outbox, &block.id, position);
                    staged.push((path, bytes.clone()));
                }
            }
        }
        RecordSend {
            network: services.network.clone(),
            timeout: upload.settings.request_timeout,
            staged,
            sealed: upload.record(keys, owner, now),
            to: to
                .iter()
                .filter_map(|p| upload.suppliers.get(p).copied())
                .collect(),
            adopt: Adopt {
                kv: services.kv.clone(),
                keys: keys.clone(),
                owner: services.owner(),
                spill: upload.settings.outbox.clone(),
            },
        }
    }

    /// Stages the misses, then sends the record to every supplier; returns how many took it.
    pub async fn run(self) -> Result<usize, UploadError> {
        for (path, bytes) in &self.staged {
            stage(path, bytes).await.map_err(UploadError::Stage)?;
        }
        let sends = self.to.iter().map(|supplier| {
            store_fragment(
                self.network.clone(),
                *supplier,
                FragmentId {
                    block: RECOVERY_BLOCK.to_vec(),
                    position: RECOVERY_POSITION,
                },
                FragmentSource::Bytes(self.sealed.clone()),
                self.timeout,
            )
        });
        let answers = futures::future::join_all(sends).await;
        let copies = answers.iter().filter(|a| a.is_ok()).count();
        // Suppliers that refused it as older than theirs: this node is behind. It adopts the
        // newer record and does not save its own (lower) revision: the upload counts as failed.
        let ahead: Vec<NodeId> = self
            .to
            .iter()
            .zip(&answers)
            .filter(|(_, a)| {
                matches!(a, Err(PlaceError::Supplier(e))
                    if e.refusal() == Some(FailReason::StaleRevision))
            })
            .map(|(s, _)| *s)
            .collect();
        if ahead.is_empty() {
            return Ok(copies);
        }
        let client = NetworkFragments::network(self.network.clone(), self.timeout);
        let adopted = match adopt_newer(&client, &ahead, &self.adopt).await {
            Ok(adopted) => adopted,
            Err(e) => {
                tracing::warn!(error = %e, "cannot adopt the suppliers' newer recovery record");
                None
            }
        };
        Err(UploadError::Behind { adopted })
    }
}

/// Stores a fresh catalog and recovery record naming the current holders (after a rebuild).
#[derive(Clone)]
pub struct CatalogRefresh {
    pub services: Services,
    pub settings: BackupSettings,
}

impl CatalogRefresh {
    /// Stores the catalog and the recovery record again; `now_unix` dates the record.
    pub async fn run(&self, now_unix: u64) -> Result<(), UploadError> {
        let positions = super::fire_hire::positions(&self.services.fire_hire)
            .await
            .ok_or(UploadError::FireHireGone)?;
        let suppliers: BTreeMap<u32, NodeId> =
            positions.up().map(|p| (p.position, p.supplier)).collect();
        let _turn = UPLOADING.lock().await;
        let (kv, keys, owner, settings) = (
            self.services.kv.clone(),
            self.services.keys.clone(),
            self.services.signer.clone(),
            self.settings.clone(),
        );
        let wanted: Vec<NodeId> = suppliers.values().copied().collect();
        let coded = tokio::task::spawn_blocking(move || {
            code_catalog(&*kv, &keys, &owner, &settings, &wanted)
        })
        .await??;
        let k = self.settings.data_shards;
        let mut commit = CatalogCommit::new(k, self.settings.parity_shards, Misses::Monitor, 0);
        let up: BTreeSet<u32> = suppliers.keys().copied().collect();
        let sends = commit.encoded(&coded.ids(), coded.last_revision, &up);
        let answers = futures::future::join_all(sends.into_iter().map(|(block, position)| {
            let supplier = suppliers.get(&position).copied();
            let bytes = coded.fragment(block, position);
            let network = self.services.network.clone();
            let timeout = self.settings.request_timeout;
            async move {
                let result = match (supplier, bytes) {
                    (Some(supplier), Some(bytes)) => {
                        let id = FragmentId {
                            block: block.to_vec(),
                            position,
                        };
                        store_fragment(network, supplier, id, FragmentSource::Bytes(bytes), timeout)
                            .await
                            .ok()
                    }
                    _ => None,
                };
                (block, position, result)
            }
        }))
        .await;
        let mut pairs = Vec::new();
        for (block, position, result) in answers {
            commit.answered(block, position, result.is_some());
            if let Some(p) = result {
                pairs.push((BlockId(block), position, p));
            }
        }
        if !commit.has_k() {
            return Err(UploadError::BelowK {
                placed: commit.least_stored(),
                k,
            });
        }
        let placements = commit.placements();
        let upload = Upload {
            coded: &coded,
            settings: &self.settings,
            suppliers: &suppliers,
            revision: commit.revision(),
            placements: &placements,
        };
        let to: Vec<u32> = up.iter().copied().collect();
        let send = RecordSend::new(&upload, &self.services, now_unix, &to);
        let copies = send.run().await?;
        if !CatalogCommit::record_kept(copies) {
            return Err(UploadError::NoRecordCopy);
        }
        let (batch, _staged_for_a_job) = upload.entries(&pairs);
        self.services.writer.write(batch).await?;
        tracing::info!(
            revision = upload.revision,
            catalog_bytes = coded.len,
            recovery_copies = copies,
            "catalog and recovery record stored"
        );
        Ok(())
    }
}

/// What the owner needs to adopt a newer recovery record it finds on its suppliers.
#[derive(Clone)]
pub(crate) struct Adopt {
    pub kv: Arc<dyn KvStore>,
    pub keys: Arc<DataKeys>,
    pub owner: VerifyingKey,
    /// Where a fetched catalog waits to be imported (the outbox, in the home).
    pub spill: std::path::PathBuf,
}

/// Why a newer recovery record could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("cannot read or write the local catalog: {0}")]
    Store(#[from] StoreError),
    #[error("cannot read the recovery revision: {0}")]
    Health(#[from] HealthError),
    #[error("cannot open the newer record's catalog: {0}")]
    Catalog(#[from] catalog::CatalogError),
    #[error("cannot fetch the newer record's catalog: {0}")]
    Fetch(#[from] FetchCatalogError),
    #[error("a worker thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Why a catalog could not be fetched from the suppliers a recovery record names.
#[derive(Debug, thiserror::Error)]
pub enum FetchCatalogError {
    #[error("a catalog block's manifest does not verify: {0}")]
    Manifest(DataError),
    #[error("only {good} of the {k} fragments needed for a catalog block could be fetched")]
    TooFew { good: usize, k: usize },
    #[error("cannot decode a catalog block: {0}")]
    Decode(DataError),
    #[error("cannot keep the fetched catalog on disk: {0}")]
    Spill(#[from] std::io::Error),
}

/// The catalog export a recovery record points at: each of its blocks from any `k` good
/// fragments, asked one at a time in the fetch plan's order (data positions first, another
/// position for each one that fails), each checked against the owner-signed manifest. The
/// blocks go, decoded, into an unnamed file in `spill` (the node's home): a catalog is not held
/// in memory (132 MB at a million files).
pub(crate) async fn fetch_catalog(
    record: &RecoveryRecord,
    client: &impl Fragments,
    data_keys: &DataKeys,
    owner: &VerifyingKey,
    spill: &std::path::Path,
) -> Result<FetchedCatalog, FetchCatalogError> {
    let mut file = unnamed_file(spill)?;
    let mut written = 0u64;
    let mut blocks = Vec::with_capacity(record.catalog.len());
    for block in &record.catalog {
        let manifest = BlockManifest::verify(&block.signed_manifest, owner)
            .map_err(FetchCatalogError::Manifest)?;
        let k = manifest.layout().k();
        let mut fragments: Vec<Option<Vec<u8>>> = vec![None; block.suppliers.len()];
        let holders: HashMap<u32, NodeId> = block
            .suppliers
            .iter()
            .enumerate()
            .filter_map(|(p, h)| h.map(|h| (p as u32, h)))
            .collect();
        // No clock and nothing known down: the plan only orders and counts.
        let mut plan = Plan::new(k as u32, holders.keys().copied());
        let nobody_down = BTreeSet::new();
        loop {
            let batch = plan.next(&nobody_down, Duration::ZERO);
            if batch.is_empty() {
                break;
            }
            for position in batch {
                let Some(holder) = holders.get(&position).copied() else {
                    plan.failed(position);
                    continue;
                };
                let slot = position as usize;
                match client.retrieve(holder, block.id.0, position).await {
                    Ok(stored) => match data::stored::unwrap(&stored) {
                        Ok((_, fragment)) if manifest.check_fragment(slot, fragment).is_ok() => {
                            if let Some(f) = fragments.get_mut(slot) {
                                *f = Some(fragment.to_vec());
                                plan.ok(position);
                            } else {
                                plan.failed(position);
                            }
                        }
                        _ => {
                            plan.failed(position);
                            tracing::warn!(
                                position,
                                "a catalog fragment does not match its manifest"
                            )
                        }
                    },
                    Err(e) => {
                        plan.failed(position);
                        tracing::warn!(position, supplier = %holder, error = %e,
                            "a catalog fragment could not be fetched")
                    }
                }
            }
        }
        let good = plan.good_count();
        if good < k {
            return Err(FetchCatalogError::TooFew { good, k });
        }
        let refs: Vec<Option<&[u8]>> = fragments.iter().map(|f| f.as_deref()).collect();
        let decoded = data::decode_block(&refs, &manifest, &data_keys.catalog)
            .map_err(FetchCatalogError::Decode)?;
        // Past `catalog_len` is the last block's padding.
        let keep = record
            .catalog_len
            .saturating_sub(written)
            .min(decoded.plain.len() as u64);
        std::io::Write::write_all(&mut file, &decoded.plain[..keep as usize])?;
        written += keep;
        blocks.push((block.id, decoded.plain.len() as u64));
    }
    Ok(FetchedCatalog { file, blocks })
}

/// A file in `dir` with no name (gone once closed): `O_TMPFILE`, or where the file system
/// has none, a named file removed at once.
fn unnamed_file(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    use std::os::unix::fs::OpenOptionsExt;
    let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
    if let Ok(fd) = rustix::fs::open(dir, flags, Mode::from_raw_mode(0o600)) {
        return Ok(std::fs::File::from(fd));
    }
    let path = dir.join(format!(".catalog-fetched-{:016x}", rand::random::<u64>()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// A stored catalog fetched whole (in an unnamed file, gone when this is dropped), and its
/// blocks with their plain lengths, in order.
pub(crate) struct FetchedCatalog {
    file: std::fs::File,
    pub blocks: Vec<(BlockId, u64)>,
}

impl FetchedCatalog {
    /// Imports it, and makes its blocks the current catalog, with its tree segments: so that
    /// retention keeps the blocks the suppliers' record names, and the next upload builds on
    /// them. Returns the entries written.
    pub fn import(&self, kv: &dyn KvStore) -> Result<u64, catalog::CatalogError> {
        let stored = std::io::BufReader::with_capacity(1 << 16, &self.file);
        let (entries, trees) = catalog::import_stored_from(kv, stored)?;
        let segments = segments::recovered(kv, &trees, &self.blocks)?;
        let ids: Vec<BlockId> = self.blocks.iter().map(|(id, _)| *id).collect();
        let mut batch = Batch::new();
        health::put_current_catalog(&mut batch, &ids, &segments);
        kv.write(batch)?;
        Ok(entries)
    }
}

/// Suppliers refused this node's recovery record as older than one they hold (`STALE_REVISION`):
/// another machine with this identity (or a run before a recovery that missed it) stored a newer
/// one. Takes the newest of theirs that opens, imports its catalog (an import only adds) and
/// raises this node's revision to it, so that the next upload is above it and names both.
/// `Some(revision)` when adopted.
pub(crate) async fn adopt_newer(
    client: &impl Fragments,
    from: &[NodeId],
    adopt: &Adopt,
) -> Result<Option<u64>, AdoptError> {
    let mut newest: Option<RecoveryRecord> = None;
    for supplier in from {
        let Ok(sealed) = client
            .retrieve(*supplier, RECOVERY_BLOCK, RECOVERY_POSITION)
            .await
        else {
            continue;
        };
        match catalog::open_recovery(&sealed, &adopt.keys.recovery, &adopt.owner) {
            Ok(record) if newest.as_ref().is_none_or(|n| record.revision > n.revision) => {
                newest = Some(record)
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(supplier = %supplier, error = %e,
                "a supplier's newer recovery record does not open"),
        }
    }
    let Some(record) = newest else {
        return Ok(None);
    };
    let kv = adopt.kv.clone();
    let stored = tokio::task::spawn_blocking(move || health::recovery_revision(&*kv)).await??;
    let Some(revision) = raise_revision(stored, record.revision) else {
        return Ok(None);
    };
    let fetched = fetch_catalog(&record, client, &adopt.keys, &adopt.owner, &adopt.spill).await?;
    let kv = adopt.kv.clone();
    let entries = tokio::task::spawn_blocking(move || -> Result<u64, AdoptError> {
        let entries = fetched.import(&*kv)?;
        let mut batch = Batch::new();
        health::put_recovery_revision(&mut batch, revision);
        kv.write(batch)?;
        Ok(entries)
    })
    .await??;
    tracing::warn!(
        revision,
        created_at = record.created_at,
        entries,
        "adopted a newer recovery record found on the suppliers; its versions are listed now"
    );
    Ok(Some(revision))
}

#[cfg(test)]
mod adopt_tests {
    use super::*;
    use crate::actors::fragments::MemFragments;
    use crate::crypto::derive::MasterSecret;
    use crate::data::erasure::Layout;
    use crate::store::{Cf, MemStore};

    fn node(n: u8) -> NodeId {
        NodeId::from_signing_key(&[n; 32])
    }

    /// A newer machine's catalog (one entry besides the counter), coded 2 + 1 onto suppliers
    /// 1..=3 of `suppliers`, and its record at `revision` on every one of them.
    async fn newer_machine(
        suppliers: &MemFragments,
        keys: &DataKeys,
        owner: &SigningKey,
        revision: u64,
    ) {
        let other = MemStore::new();
        other
            .put(Cf::Catalog, b"zz-a-version-made-elsewhere", b"v")
            .expect("put");
        let export = catalog::export(&other).expect("export");
        let random = BlockRandom {
            id: BlockId([7; 32]),
            nonce: [8; 24],
        };
        let layout = Layout::new(2, 1).expect("layout");
        let block =
            data::encode_block(&export, &keys.catalog, owner, layout, 1, random).expect("encode");
        for (p, f) in block.fragments.iter().enumerate() {
            let stored = data::stored::wrap(&block.signed_manifest, f);
            suppliers
                .store(node(p as u8 + 1), block.id.0, p as u32, stored)
                .await
                .expect("store");
        }
        let record = RecoveryRecord {
            revision,
            created_at: 1_765_000_000,
            data_shards: 2,
            parity_shards: 1,
            suppliers: (0..3u8).map(|p| (u32::from(p), node(p + 1))).collect(),
            catalog: vec![CatalogBlock {
                id: block.id,
                signed_manifest: block.signed_manifest.clone(),
                suppliers: (0..3u8).map(|p| Some(node(p + 1))).collect(),
            }],
            catalog_len: export.len() as u64,
            identities: vec![],
        };
        let sealed = catalog::seal_recovery(&record, &keys.recovery, owner, [3; 24]);
        for p in 0..3u8 {
            suppliers
                .store(
                    node(p + 1),
                    RECOVERY_BLOCK,
                    RECOVERY_POSITION,
                    sealed.clone(),
                )
                .await
                .expect("store");
        }
    }

    fn revision_of(kv: &dyn KvStore) -> u64 {
        health::recovery_revision(kv).expect("read")
    }

    #[tokio::test]
    async fn a_newer_record_on_the_suppliers_is_adopted_and_an_older_one_never_lowers() {
        let owner = SigningKey::from_bytes(&[4; 32]);
        let keys = Arc::new(MasterSecret::from_bytes([5; 32]).data_keys());
        let suppliers = MemFragments::default();
        newer_machine(&suppliers, &keys, &owner, 7).await;

        // This node stored revision 3: the suppliers' 7 is adopted, its catalog imported.
        let kv: Arc<dyn KvStore> = Arc::new(MemStore::new());
        let mut batch = Batch::new();
        health::put_recovery_revision(&mut batch, 3);
        kv.write(batch).expect("write");
        let adopt = Adopt {
            kv: kv.clone(),
            keys: keys.clone(),
            owner: owner.verifying_key(),
            spill: std::env::temp_dir(),
        };
        let adopted = adopt_newer(&suppliers, &[node(1)], &adopt).await;
        assert_eq!(adopted.expect("adopted"), Some(7));
        assert_eq!(revision_of(kv.as_ref()), 7);
        assert!(
            kv.get(Cf::Catalog, b"zz-a-version-made-elsewhere")
                .expect("get")
                .is_some(),
            "the newer record's catalog is imported"
        );

        // A node already above the suppliers' record adopts nothing and keeps its revision.
        let ahead: Arc<dyn KvStore> = Arc::new(MemStore::new());
        let mut batch = Batch::new();
        health::put_recovery_revision(&mut batch, 9);
        ahead.write(batch).expect("write");
        let adopt = Adopt {
            kv: ahead.clone(),
            ..adopt
        };
        let adopted = adopt_newer(&suppliers, &[node(1), node(2)], &adopt).await;
        assert_eq!(adopted.expect("nothing to adopt"), None);
        assert_eq!(revision_of(ahead.as_ref()), 9, "never lowered");
        assert!(
            ahead
                .get(Cf::Catalog, b"zz-a-version-made-elsewhere")
                .expect("get")
                .is_none()
        );
    }
}

#[cfg(test)]
mod code_tests {
    use super::*;
    use crate::crypto::derive::MasterSecret;
    use crate::data::ChunkId;
    use crate::store::MemStore;
    use crate::store::catalog::{FileEntry, FileKind, Snapshot};

    fn settings() -> BackupSettings {
        BackupSettings {
            data_shards: 2,
            parity_shards: 1,
            // Small blocks, so a tree segment is coded as it is written, over several.
            block_size: 64 * 1024,
            zstd_level: 1,
            workers: 1,
            request_timeout: Duration::from_secs(1),
            outbox: std::path::PathBuf::from("/nonexistent"),
            keep_versions: 7,
        }
    }

    fn version(kv: &MemStore, id: u64, changed: &str) {
        let mut b = Batch::new();
        for i in 0..3000u32 {
            let path = format!("dir/file-{i:05}");
            let mut chunk = [0x11; 32];
            chunk[..4].copy_from_slice(&i.to_be_bytes());
            if path == changed {
                chunk[31] = id as u8;
            }
            catalog::put_chunk(&mut b, &ChunkId(chunk), &BlockId([(i % 7) as u8; 32]));
            let entry = FileEntry {
                path: path.into_bytes(),
                kind: FileKind::File,
                mode: 0o600,
                mtime_ns: i64::from(i) * 1_000_003,
                size: 4096,
                chunks: vec![ChunkId(chunk)],
                ..FileEntry::default()
            };
            catalog::put_file(&mut b, SnapshotId(id), &entry);
        }
        catalog::commit_snapshot(
            &mut b,
            &Snapshot {
                id: SnapshotId(id),
                source: "docs".into(),
                root: b"/d".to_vec(),
                started_at: id,
                finished_at: id,
                files: 3000,
                dirs: 0,
                symlinks: 0,
                bytes: 0,
                new_bytes: 0,
                new_blocks: 0,
                skipped: Vec::new(),
            },
        );
        kv.write(b).expect("write");
    }

    fn plain(block: &CodedBlock, keys: &DataKeys, owner: &SigningKey) -> Vec<u8> {
        let manifest = BlockManifest::verify(&block.signed_manifest, &owner.verifying_key())
            .expect("manifest");
        let fragments: Vec<Option<&[u8]>> = block
            .stored
            .iter()
            .map(|s| Some(data::stored::unwrap(s).expect("stored").1))
            .collect();
        data::decode_block(&fragments, &manifest, &keys.catalog)
            .expect("decode")
            .plain
    }

    /// What the upload's `entries` would save: the blocks' records and the segments.
    fn save(kv: &MemStore, coded: &CodedCatalog) {
        let mut b = Batch::new();
        for block in &coded.blocks {
            catalog::put_block(
                &mut b,
                &BlockEntry {
                    id: block.id,
                    signed_manifest: block.signed_manifest.clone(),
                    data_shards: 2,
                    parity_shards: 1,
                    plain_len: block.plain_len,
                    fragments: block
                        .hashes
                        .iter()
                        .enumerate()
                        .map(|(p, h)| FragmentPlace {
                            supplier: Some(NodeId::from_bytes([p as u8 + 1; 16])),
                            size: 1,
                            blake3: *h,
                        })
                        .collect(),
                },
            );
        }
        health::put_current_catalog(&mut b, &coded.all_ids(), &coded.segments);
        kv.write(b).expect("write");
    }

    #[test]
    fn an_upload_codes_new_trees_and_the_head_and_names_the_kept_segments_again() {
        let owner = SigningKey::from_bytes(&[4; 32]);
        let keys = MasterSecret::from_bytes([5; 32]).data_keys();
        let kv = MemStore::new();
        version(&kv, 1, "");
        let first = code_catalog(&kv, &keys, &owner, &settings(), &[]).expect("code");
        assert!(first.kept.is_empty());
        assert_eq!(first.segments.len(), 1);
        assert!(
            first.segments[0].blocks.len() >= 2,
            "the whole tree spans blocks"
        );
        assert_eq!(first.new_len, first.len);
        let mut plains: HashMap<BlockId, Vec<u8>> = first
            .blocks
            .iter()
            .map(|b| (b.id, plain(b, &keys, &owner)))
            .collect();
        save(&kv, &first);

        version(&kv, 2, "dir/file-01234");
        let second = code_catalog(&kv, &keys, &owner, &settings(), &[]).expect("code");
        let kept: Vec<BlockId> = second.kept.iter().map(|b| b.id).collect();
        assert_eq!(
            kept, first.segments[0].blocks,
            "the first tree is named, not coded"
        );
        assert_eq!(second.segments.len(), 2);
        assert_eq!(second.segments[1].base, Some(SnapshotId(1)));
        assert!(
            second.new_len * 10 < second.len,
            "a one-file change uploads little: {} of {}",
            second.new_len,
            second.len
        );
        plains.extend(
            second
                .blocks
                .iter()
                .map(|b| (b.id, plain(b, &keys, &owner))),
        );
        // A version committed after the trees were planned is not in the head: its tree is not
        // in this catalog (it waits for the next upload).
        let head_only: BTreeSet<SnapshotId> = [SnapshotId(1)].into();
        let head = segments::export_head_of(&kv, &head_only).expect("head");
        let listed = MemStore::new();
        catalog::import(&listed, &head).expect("import");
        let ids: Vec<u64> = catalog::snapshots(&listed)
            .expect("snapshots")
            .iter()
            .map(|s| s.id.0)
            .collect();
        assert_eq!(ids, [1]);
        // The record's blocks in its order, concatenated, are the catalog.
        let stored: Vec<u8> = second
            .all_ids()
            .iter()
            .flat_map(|id| plains[id].clone())
            .collect();
        assert_eq!(stored.len() as u64, second.len);
        let recovered = MemStore::new();
        catalog::import(&recovered, &stored).expect("import");
        for id in [1, 2] {
            let trees = [&kv, &recovered].map(|kv| {
                catalog::files(kv, SnapshotId(id))
                    .collect::<Result<Vec<_>, _>>()
                    .expect("files")
            });
            assert_eq!(trees[0], trees[1], "snapshot {id}");
            assert_eq!(trees[0].len(), 3000);
        }
    }

    #[test]
    fn a_kept_segment_below_k_good_fragments_is_made_again() {
        let owner = SigningKey::from_bytes(&[4; 32]);
        let keys = MasterSecret::from_bytes([5; 32]).data_keys();
        let kv = MemStore::new();
        version(&kv, 1, "");
        let first = code_catalog(&kv, &keys, &owner, &settings(), &[]).expect("code");
        save(&kv, &first);
        // Two of the three fragments of the tree's first block found bad (k = 2).
        let block = first.segments[0].blocks[0];
        let mut b = Batch::new();
        let cells = [
            FragmentHealth::Present,
            FragmentHealth::Missing,
            FragmentHealth::Corrupt,
        ];
        health::put_health(&mut b, &block, &cells);
        kv.write(b).expect("write");
        version(&kv, 2, "dir/file-00001");
        let next = code_catalog(&kv, &keys, &owner, &settings(), &[]).expect("code");
        assert!(
            next.kept.is_empty(),
            "the damaged segment is not named again"
        );
        let bases: Vec<Option<SnapshotId>> = next.segments.iter().map(|s| s.base).collect();
        assert_eq!(bases, [None, Some(SnapshotId(1))], "both trees made again");
        assert!(!next.segments[0].blocks.contains(&block));
    }
}
