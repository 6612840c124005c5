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
//! - Fragments are asked for as a restore does: the `k` data positions first, another position
//!   for each one that fails (unreachable, refused, not matching the manifest).

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use ed25519_dalek::VerifyingKey;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::network_connector::{NetAnswer, NetQuery, NetworkConnectorDriver};
use super::shell::{Query, Shell};
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::NodeId;
use crate::data::{self, BlockId, BlockManifest, ChunkId, PackedBlock};
use crate::store::catalog::{self, FileKind, SnapshotId};
use crate::store::{KvStore, StoreError};

pub type NetworkAddr = Addr<Shell<NetworkConnectorDriver>>;

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

/// Where fragments come from: the network in a node, a map in unit tests.
pub trait FragmentSource {
    /// The stored bytes (envelope with its manifest) of `block`'s fragment at `position`, as
    /// `supplier` serves them.
    fn fetch(
        &self,
        supplier: NodeId,
        block: BlockId,
        position: u32,
    ) -> impl Future<Output = Result<Vec<u8>, String>>;
}

/// The node's suppliers, through the network actor's sessions.
pub struct NetworkSource {
    pub network: NetworkAddr,
    pub timeout: Duration,
}

impl FragmentSource for NetworkSource {
    async fn fetch(
        &self,
        supplier: NodeId,
        block: BlockId,
        position: u32,
    ) -> Result<Vec<u8>, String> {
        let link = match self
            .network
            .send(Query::new(NetQuery::Link(supplier)))
            .await
        {
            Ok(NetAnswer::Link(Some(link))) => link,
            Ok(_) => return Err(format!("no session with supplier {supplier}")),
            Err(_) => return Err("the network actor is gone".into()),
        };
        super::restore_worker::retrieve(&link, block.0, position, self.timeout)
            .await
            .map_err(|why| format!("supplier {supplier}: {why}"))
    }
}

/// What a node needs to run a drill when asked (the control socket, the schedule).
#[derive(Clone)]
pub struct DrillWiring {
    pub kv: Arc<dyn KvStore>,
    pub network: NetworkAddr,
    pub keys: Arc<DataKeys>,
    pub owner: VerifyingKey,
    pub settings: DrillSettings,
}

impl DrillWiring {
    /// One drill now, with a fresh random sample (the seed from the shell's context).
    pub async fn run_now(&self) -> Result<DrillReport, DrillError> {
        run(
            self.kv.clone(),
            self.network.clone(),
            self.keys.clone(),
            self.owner,
            self.settings,
            super::shell::ctx_now().random,
        )
        .await
    }
}

/// Restores a random sample of regular files of a random source's latest snapshot in memory and
/// checks each byte for byte against the catalog: every chunk's keyed id (`ChunkId::of` with the
/// owner's chunk-id key) must match, and a whole file's length must equal its entry. Nothing is
/// written to disk. `seed` makes the sample (not the network) reproducible.
pub async fn run(
    kv: Arc<dyn KvStore>,
    network: NetworkAddr,
    keys: Arc<DataKeys>,
    owner: VerifyingKey,
    settings: DrillSettings,
    seed: u64,
) -> Result<DrillReport, DrillError> {
    let source = NetworkSource {
        network,
        timeout: settings.request_timeout,
    };
    run_with(kv, &source, keys, owner, settings, seed).await
}

/// [`run`] with any fragment source.
pub async fn run_with<S: FragmentSource>(
    kv: Arc<dyn KvStore>,
    source: &S,
    keys: Arc<DataKeys>,
    owner: VerifyingKey,
    settings: DrillSettings,
    seed: u64,
) -> Result<DrillReport, DrillError> {
    // The shell's clock: actors read no clock of their own.
    let started = super::shell::ctx_now();
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
    };
    for file in &plan.files {
        let (bytes, failure) = drill.check(file).await;
        report.bytes += bytes;
        if let Some(reason) = failure {
            report.failures.push(DrillFailure {
                path: String::from_utf8_lossy(&file.path).into_owned(),
                reason,
            });
        }
    }
    report.fragments_fetched = drill.fetched;
    report.seconds = super::shell::ctx_now()
        .now
        .saturating_sub(started.now)
        .as_secs_f64();
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
    chunks: Vec<(usize, ChunkId, Result<BlockId, String>)>,
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
    blocks: HashMap<BlockId, Result<BlockSource, String>>,
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
                    chunks.push((index, id, Err("not in the chunk index".to_string())));
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
) -> Result<Result<BlockSource, String>, StoreError> {
    let Some(entry) = catalog::block(kv, block)? else {
        return Ok(Err(format!(
            "block {} is not in the block index",
            short(block)
        )));
    };
    Ok(match BlockManifest::verify(&entry.signed_manifest, owner) {
        Ok(manifest) if manifest.layout().total() == entry.fragments.len() => Ok(BlockSource {
            manifest,
            holders: entry.fragments.iter().map(|f| f.supplier).collect(),
        }),
        Ok(_) => Err(format!(
            "block {}: the catalog's placements do not match its manifest's layout",
            short(block)
        )),
        Err(e) => Err(format!("block {}: manifest: {e}", short(block))),
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
    blocks: HashMap<BlockId, Result<BlockSource, String>>,
    /// Decoded blocks still needed, and blocks that could not be had (with why).
    decoded: HashMap<BlockId, Result<Decoded, String>>,
    uses: HashMap<BlockId, u64>,
    fetched: u64,
}

impl<S: FragmentSource> Drill<'_, S> {
    /// Checks one file: (bytes found identical, why it failed).
    async fn check(&mut self, file: &Sampled) -> (u64, Option<String>) {
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
                    failure.get_or_insert_with(|| format!("chunk {index} of {total}: {why}"));
                    continue;
                }
            };
            match self.chunk(block, id).await {
                Ok(len) => good += len,
                Err(why) => failure = Some(format!("chunk {index} of {total}: {why}")),
            }
            self.used(&block);
        }
        if failure.is_none() && file.whole && good != file.size {
            failure = Some(format!(
                "restored {good} bytes, the catalog says {}",
                file.size
            ));
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
    async fn chunk(&mut self, block: BlockId, id: &ChunkId) -> Result<u64, String> {
        if !self.decoded.contains_key(&block) {
            let decoded = self.decode(block).await;
            self.decoded.insert(block, decoded);
        }
        let decoded = match self.decoded.get(&block) {
            Some(Ok(decoded)) => decoded,
            Some(Err(why)) => return Err(why.clone()),
            None => return Err(format!("block {} lost", short(&block))),
        };
        let (start, end) = *decoded
            .index
            .get(id)
            .ok_or_else(|| format!("block {} does not hold the chunk", short(&block)))?;
        let bytes = decoded
            .plain
            .get(start..end)
            .ok_or_else(|| format!("block {} is malformed", short(&block)))?;
        if ChunkId::of(&self.keys.chunk_id, bytes) != *id {
            return Err(format!(
                "block {}: the chunk's bytes do not match its id",
                short(&block)
            ));
        }
        Ok(bytes.len() as u64)
    }

    /// Fetches `k` good fragments of `block` (data positions first, the next position for each
    /// one that fails), decodes it off the event loop and indexes its chunks.
    async fn decode(&mut self, block: BlockId) -> Result<Decoded, String> {
        let source = match self.blocks.get(&block) {
            Some(Ok(source)) => source,
            Some(Err(why)) => return Err(why.clone()),
            None => return Err(format!("block {} was not planned", short(&block))),
        };
        let layout = source.manifest.layout();
        let (k, total) = (layout.k(), layout.total());
        let mut fragments: Vec<Option<Vec<u8>>> = vec![None; total];
        let mut problems: Vec<String> = Vec::new();
        let mut next = 0usize;
        loop {
            let have = fragments.iter().flatten().count();
            if have >= k || next >= total {
                break;
            }
            let batch: Vec<usize> = (next..total.min(next + (k - have))).collect();
            next += batch.len();
            let fetcher = self.source;
            let asks = batch.iter().map(|&position| async move {
                let result = match source.holders.get(position).copied().flatten() {
                    Some(supplier) => fetcher.fetch(supplier, block, position as u32).await,
                    None => Err("not placed".to_string()),
                };
                (position, result)
            });
            for (position, result) in futures::future::join_all(asks).await {
                let stored = match result {
                    Ok(stored) => {
                        self.fetched += 1;
                        stored
                    }
                    Err(why) => {
                        problems.push(format!("position {position}: {why}"));
                        continue;
                    }
                };
                let fragment = match data::stored::unwrap(&stored) {
                    Ok((_, fragment)) => fragment,
                    Err(e) => {
                        problems.push(format!("position {position}: {e}"));
                        continue;
                    }
                };
                match source.manifest.check_fragment(position, fragment) {
                    Ok(()) => fragments[position] = Some(fragment.to_vec()),
                    Err(e) => problems.push(format!("position {position}: {e}")),
                }
            }
        }
        let have = fragments.iter().flatten().count();
        if have < k {
            return Err(format!(
                "block {}: {have} of the {k} fragments needed ({})",
                short(&block),
                problems.join("; ")
            ));
        }
        if !problems.is_empty() {
            tracing::info!(block = %short(&block), problems = problems.len(),
                "restore drill: block decoded from other positions");
        }
        let manifest = source.manifest.clone();
        let keys = self.keys.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            let refs: Vec<Option<&[u8]>> = fragments.iter().map(|f| f.as_deref()).collect();
            let plain = data::decode_block(&refs, &manifest, &keys.block)
                .map_err(|e| format!("did not decode: {e}"))?
                .plain;
            let index = {
                let parsed =
                    PackedBlock::parse(&plain).map_err(|e| format!("is malformed: {e}"))?;
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
            Ok::<_, String>(Decoded { plain, index })
        })
        .await
        .map_err(|e| format!("decoding stopped: {e}"))?;
        decoded.map_err(|why| format!("block {} {why}", short(&block)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::crypto::derive::MasterSecret;
    use crate::data::{BlockRandom, Layout, Packer};
    use crate::store::MemStore;
    use crate::store::catalog::{BlockEntry, FileEntry, FragmentPlace, Snapshot};
    use crate::store::{Batch, KvStore};

    const CHUNK: usize = 1500;

    /// Suppliers in a map; positions listed in `refused` answer an error, in `garbage` serve
    /// bytes that do not match the manifest.
    struct MapSource {
        stored: HashMap<(BlockId, u32), Vec<u8>>,
        refused: HashSet<u32>,
        garbage: HashSet<u32>,
    }

    impl FragmentSource for MapSource {
        async fn fetch(&self, _: NodeId, block: BlockId, position: u32) -> Result<Vec<u8>, String> {
            if self.refused.contains(&position) {
                return Err("refused (NOT_FOUND)".into());
            }
            let mut stored = self
                .stored
                .get(&(block, position))
                .cloned()
                .ok_or("refused (NOT_FOUND)")?;
            if self.garbage.contains(&position)
                && let Some(last) = stored.last_mut()
            {
                *last ^= 0x55;
            }
            Ok(stored)
        }
    }

    struct Fixture {
        kv: Arc<dyn KvStore>,
        keys: Arc<DataKeys>,
        owner: SigningKey,
        source: MapSource,
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
                stored.insert(
                    (encoded.id, position as u32),
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
            source: MapSource {
                stored,
                refused: HashSet::new(),
                garbage: HashSet::new(),
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
            7,
        )
        .await
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
        f.source.refused.insert(1);
        let r = drill(&f, DrillSettings::default()).await.expect("drill");
        assert!(r.passed(), "{r:?}");
        // Per block: 0, 2, 3 came back (0 bad), 1 refused; then 4 and 5.
        assert_eq!(r.fragments_fetched, 2 * 5, "{r:?}");
    }

    #[tokio::test]
    async fn more_than_m_bad_positions_fail_every_file_with_the_reason() {
        let mut f = fixture(false);
        f.source.garbage.insert(0);
        f.source.refused.insert(1);
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
