//! The backup data pipeline as pure functions on bytes: no IO, no clock, no randomness (the
//! caller passes in every random value), so the worker pool can run any stage anywhere and tests
//! are deterministic.
//!
//! ```text
//! file bytes ─ Chunker ─> chunks ─ ChunkIdKey ─> ChunkId ─ (caller dedups) ─> Packer ─> plain block
//! plain block ─ encode_block: compress ─ pad ─ seal ─ Reed-Solomon ─> k + m fragments + signed manifest
//! any k fragments + manifest ─ decode_block ─> plain block ─ PackedBlock::parse ─> (ChunkId, bytes)
//! any k fragments + manifest ─ rebuild_fragments ─> the lost positions' stored envelopes (no key)
//! stored envelope ─ audit::make_pairs ─> challenge/answer pairs the owner keeps for audits
//! ```
//!
//! Decisions (they are the storage format; change them only with a new version byte):
//! - **Chunks** are content-defined (FastCDC 2020, 256 KiB / 1 MiB / 4 MiB), so an edit moves only
//!   the chunks around it. A chunk is named by BLAKE3 keyed with a key derived from the owner's
//!   master secret: suppliers never see chunk ids, and even the catalog, if leaked, does not let
//!   anyone test for known content.
//! - **Blocks** hold whole chunks, in order, with a trailing index (chunk id + length of each), so
//!   a restore finds a chunk's bytes from its id alone. A block holds at least one chunk, so a
//!   maximum-size chunk makes a block slightly over `block_size`.
//! - **Block id = 32 random bytes from the caller**, not a hash. It must exist before sealing (it is
//!   the associated data, so a block cannot be passed off as another), it says nothing about the
//!   contents, and every sealing gets a new id, so fragments of two sealings of the same content
//!   (a job resumed after a crash) never mix under one id. Content-derived ids would add nothing:
//!   deduplication already happens per chunk, before packing.
//! - **Compression** is zstd; the block is stored raw (and says so) when zstd does not shrink it.
//! - **Padding** is Padmé (at most ~12% overhead, less for big blocks), with the real length inside
//!   the authenticated plaintext.
//! - **Sealing** is XChaCha20-Poly1305 with a caller-supplied random 24-byte nonce. The sealed
//!   header (version, key check value, block id, nonce) is the associated data; the key check value
//!   lets a wrong key be reported as such.
//! - **Erasure coding** is Reed-Solomon over GF(2^8): `k` data + `m` parity fragments, each
//!   `ceil(sealed_len / k)` bytes; the sealed length is in the manifest.
//! - **The manifest** (block id, k, m, sealed length, BLAKE3 of the fragment at every position) is
//!   signed by the owner's Ed25519 key, so a supplier, an audit or a repairer without the owner's
//!   secrets can check any fragment with the owner's public key alone.

pub mod audit;
pub mod chunk;
pub mod compress;
pub mod erasure;
pub mod manifest;
pub mod pack;
pub mod pad;
pub mod rebuild;
pub mod seal;
pub mod stored;

use crate::crypto::derive::{BlockKey, ChunkIdKey};
use ed25519_dalek::SigningKey;

pub use chunk::{Chunker, ChunkerParams};
pub use erasure::Layout;
pub use manifest::BlockManifest;
pub use pack::{FinishedBlock, PackedBlock, Packer};
pub use rebuild::rebuild_fragments;

/// Default target size of a plain block before compression (`backup.block_size`).
pub const DEFAULT_BLOCK_SIZE: usize = 4 * 1024 * 1024;
/// Largest plain block any code path accepts; bounds allocations driven by recorded lengths.
pub const MAX_BLOCK_SIZE: usize = 64 * 1024 * 1024;
/// The target block sizes (`backup.block_size`) the packer takes. Config validation checks
/// the same bounds ([`check_block_size`]), so a valid config never fails at its first backup.
/// The upper one leaves room for a block's last chunk to go past the target.
pub const MIN_TARGET_BLOCK_SIZE: usize = 1024;
pub const MAX_TARGET_BLOCK_SIZE: usize = MAX_BLOCK_SIZE / 2;

/// `size` as a target block size, if the packer takes it.
pub fn check_block_size(size: u64) -> Result<usize, DataError> {
    usize::try_from(size)
        .ok()
        .filter(|s| (MIN_TARGET_BLOCK_SIZE..=MAX_TARGET_BLOCK_SIZE).contains(s))
        .ok_or(DataError::BlockSize { size })
}
/// zstd level used by default: level 3 is zstd's own default (see benches/pipeline.rs).
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Everything that can go wrong in the pipeline. Each failure has its own variant; none is
/// silently accepted.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("invalid parameters: {0}")]
    Params(&'static str),
    #[error(
        "a block size of {size} bytes is outside what the packer takes ({min} bytes to {max} MiB)",
        min = MIN_TARGET_BLOCK_SIZE,
        max = MAX_TARGET_BLOCK_SIZE >> 20
    )]
    BlockSize { size: u64 },
    #[error("sealed block was made with another key")]
    WrongKey,
    #[error("sealed block belongs to block {found}, not to {expected}")]
    BlockIdMismatch { expected: BlockId, found: BlockId },
    #[error("sealed block failed authentication (corrupted bytes)")]
    Corrupt,
    #[error("sealed block is truncated or malformed")]
    SealedMalformed,
    #[error("unknown {what} format version {version}")]
    UnknownVersion { what: &'static str, version: u8 },
    #[error("fragment {position} has {found} bytes, expected {expected}")]
    FragmentLength {
        position: usize,
        expected: usize,
        found: usize,
    },
    #[error("fragment {position} does not match its hash in the manifest")]
    FragmentHash { position: usize },
    #[error("fragment position {position} is outside the layout ({total} fragments)")]
    FragmentPosition { position: usize, total: usize },
    #[error("only {usable} usable fragments, {need} needed")]
    TooFewFragments { usable: usize, need: usize },
    #[error("manifest signature is invalid")]
    ManifestSignature,
    #[error("manifest is malformed")]
    ManifestMalformed,
    #[error("padding is malformed")]
    Padding,
    #[error("compressed block is malformed")]
    Compression,
    #[error("zstd failed")]
    Zstd(#[source] std::io::Error),
    #[error("plain block is malformed: {0}")]
    BlockMalformed(&'static str),
    #[error("stored fragment envelope is malformed")]
    StoredMalformed,
    #[error("reed-solomon: {0}")]
    Erasure(&'static str),
}

/// Names a chunk: keyed BLAKE3 of its bytes (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(key: &ChunkIdKey, data: &[u8]) -> Self {
        ChunkId(key.hash(data))
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkId({})", hex::encode(&self.0[..8]))
    }
}

/// Names a block: 32 random bytes chosen by the caller before sealing (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub [u8; 32]);

impl std::fmt::Debug for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockId({})", hex::encode(&self.0[..8]))
    }
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The per-block random values, drawn by the caller (the pipeline is pure).
#[derive(Clone, Copy, Debug)]
pub struct BlockRandom {
    pub id: BlockId,
    pub nonce: [u8; 24],
}

/// A block ready to be placed: fragment `i` goes to the supplier at position `i`, each with a
/// copy of `signed_manifest`.
#[derive(Debug)]
pub struct EncodedBlock {
    pub id: BlockId,
    pub manifest: BlockManifest,
    /// The manifest's signed encoding, stored beside every fragment.
    pub signed_manifest: Vec<u8>,
    pub fragments: Vec<Vec<u8>>,
    /// Length of the plain block (before compression).
    pub plain_len: usize,
    /// Length of the sealed block (after compression, padding and sealing).
    pub sealed_len: usize,
    /// Whether zstd made it smaller (else stored raw).
    pub compressed: bool,
}

/// A decoded block and the fragments that were offered but not used because they failed their
/// check against the manifest (for the monitor / rebuilder).
#[derive(Debug)]
pub struct DecodedBlock {
    pub plain: Vec<u8>,
    pub rejected: Vec<(usize, DataError)>,
}

/// Plain block → fragments + signed manifest: compress, pad, seal, erasure-code, sign.
pub fn encode_block(
    plain: &[u8],
    key: &BlockKey,
    owner: &SigningKey,
    layout: Layout,
    zstd_level: i32,
    random: BlockRandom,
) -> Result<EncodedBlock, DataError> {
    if plain.len() > MAX_BLOCK_SIZE {
        return Err(DataError::Params("plain block larger than MAX_BLOCK_SIZE"));
    }
    // One buffer for the three stages, in place: room for the sealed header and the padding's
    // length, then the compressed frame; padded, then encrypted where it lies.
    let room = seal::HEADER + pad::LEN;
    let mut sealed = Vec::with_capacity(
        seal::HEADER + pad::padded_len(compress::HEADER + plain.len()) + seal::TAG,
    );
    sealed.resize(room, 0);
    let compressed = compress::compress_into(plain, zstd_level, &mut sealed)?;
    pad::pad_in_place(&mut sealed, seal::HEADER);
    seal::seal_in_place(key, random.id, random.nonce, &mut sealed)?;
    let fragments = erasure::encode(&sealed, layout)?;
    let manifest = BlockManifest::new(random.id, layout, sealed.len(), &fragments);
    let signed_manifest = manifest.sign(owner);
    Ok(EncodedBlock {
        id: random.id,
        manifest,
        signed_manifest,
        fragments,
        plain_len: plain.len(),
        sealed_len: sealed.len(),
        compressed,
    })
}

/// Any `k` good fragments (by position; `None` = missing) + the verified manifest → plain block.
/// Fragments that fail their hash or length are set aside (listed in `rejected`) and the block is
/// rebuilt from the others when at least `k` remain.
pub fn decode_block(
    fragments: &[Option<&[u8]>],
    manifest: &BlockManifest,
    key: &BlockKey,
) -> Result<DecodedBlock, DataError> {
    let total = manifest.layout().total();
    if fragments.len() != total {
        return Err(DataError::Params(
            "fragment list length differs from the layout",
        ));
    }
    let mut usable: Vec<Option<&[u8]>> = Vec::with_capacity(total);
    let mut rejected = Vec::new();
    for (position, fragment) in fragments.iter().enumerate() {
        match fragment {
            Some(bytes) => match manifest.check_fragment(position, bytes) {
                Ok(()) => usable.push(Some(bytes)),
                Err(e) => {
                    rejected.push((position, e));
                    usable.push(None);
                }
            },
            None => usable.push(None),
        }
    }
    let sealed = erasure::decode(&usable, manifest.layout(), manifest.sealed_len())?;
    let padded = seal::open(key, manifest.block_id(), &sealed)?;
    drop(sealed);
    let framed = pad::unpad(&padded)?;
    let plain = compress::decompress(framed)?;
    Ok(DecodedBlock { plain, rejected })
}

#[cfg(test)]
mod tests;
