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

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use actix::prelude::*;
use ed25519_dalek::SigningKey;

use super::backup_job::{BackupSettings, FragmentSource, store_fragment};
use super::network_connector::NetworkConnectorDriver;
use super::services::Services;
use super::shell::Shell;
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::NodeId;
use crate::data::audit::AuditPair;
use crate::data::{self, BlockId, BlockRandom, DataError};
use crate::fsm::catalog_commit::{CatalogCommit, Misses, Placement};
use crate::pipeline::staged_path;
use crate::proto::FragmentId;
use crate::store::catalog::{self, BlockEntry, CatalogBlock, FragmentPlace, RecoveryRecord};
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
    pub blocks: Vec<CodedBlock>,
    /// Length of the catalog export.
    pub len: u64,
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
}

/// Exports, seals and codes the catalog, and reads the last revision and the suppliers'
/// identities (blocking: run it on a worker thread).
pub(crate) fn code_catalog(
    kv: &dyn KvStore,
    keys: &DataKeys,
    owner: &SigningKey,
    settings: &BackupSettings,
    suppliers: &[NodeId],
) -> Result<CodedCatalog, UploadError> {
    let layout = settings.layout()?;
    let exported = catalog::export(kv)?;
    let mut blocks = Vec::new();
    for piece in exported.chunks(settings.block_size.max(1)) {
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
        blocks.push(CodedBlock {
            id: block.id,
            hashes: stored.iter().map(|s| *blake3::hash(s).as_bytes()).collect(),
            signed_manifest: block.signed_manifest,
            plain_len: block.plain_len as u64,
            stored,
        });
    }
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
        len: exported.len() as u64,
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
        let catalog = self
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
            })
            .collect();
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
        health::put_current_catalog(
            &mut batch,
            &self.coded.blocks.iter().map(|b| b.id).collect::<Vec<_>>(),
        );
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
}

impl RecordSend {
    pub fn new(
        upload: &Upload<'_>,
        network: Addr<Shell<NetworkConnectorDriver>>,
        keys: &DataKeys,
        owner: &SigningKey,
        now: u64,
        to: &[u32],
    ) -> RecordSend {
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
            network,
            timeout: upload.settings.request_timeout,
            staged,
            sealed: upload.record(keys, owner, now),
            to: to
                .iter()
                .filter_map(|p| upload.suppliers.get(p).copied())
                .collect(),
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
        Ok(futures::future::join_all(sends)
            .await
            .into_iter()
            .filter(Result::is_ok)
            .count())
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
        let send = RecordSend::new(
            &upload,
            self.services.network.clone(),
            &self.services.keys,
            &self.services.signer,
            now_unix,
            &to,
        );
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
