//! Keys derived from the owner's 32-byte master secret with BLAKE3 `derive_key`, one distinct
//! context string per purpose, so that no derived key tells anything about another or about the
//! master secret. Pure: the master secret comes from the caller (the key file is read elsewhere).
//!
//! The context strings are part of the storage format: changing one makes every stored chunk id,
//! block and catalog unreadable. Add a new context for a new purpose; never reuse one.

use chacha20poly1305::{KeyInit, XChaCha20Poly1305};

const CONTEXT_CHUNK_ID: &str = "bitdust 2026-11-26 chunk id key v1";
const CONTEXT_BLOCK: &str = "bitdust 2026-11-26 block encryption key v1";
const CONTEXT_CATALOG: &str = "bitdust 2026-11-26 catalog encryption key v1";
const CONTEXT_RECOVERY: &str = "bitdust 2026-11-26 recovery record key v1";
/// Not a key: the input to a key's check value (see [`BlockKey::check_value`]).
const KEY_CHECK_INPUT: &[u8] = b"bitdust key check value v1";

/// The owner's root secret. Everything the owner stores is derived from it; `Debug` never shows it.
pub struct MasterSecret([u8; 32]);

impl MasterSecret {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterSecret(bytes)
    }

    /// The raw secret, for the recovery key file (`crypto::keyfile`) only; never log it.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// All keys the data pipeline and the catalog use.
    pub fn data_keys(&self) -> DataKeys {
        DataKeys {
            chunk_id: ChunkIdKey(blake3::derive_key(CONTEXT_CHUNK_ID, &self.0)),
            block: BlockKey(blake3::derive_key(CONTEXT_BLOCK, &self.0)),
            catalog: BlockKey(blake3::derive_key(CONTEXT_CATALOG, &self.0)),
            recovery: BlockKey(blake3::derive_key(CONTEXT_RECOVERY, &self.0)),
        }
    }
}

/// Key material is wiped when it goes (not left in freed memory, swap or a core dump).
macro_rules! wiped_on_drop {
    ($($key:ty),*) => {$(
        impl Drop for $key {
            fn drop(&mut self) {
                zeroize::Zeroize::zeroize(&mut self.0);
            }
        }
    )*};
}

wiped_on_drop!(MasterSecret, ChunkIdKey, BlockKey);

impl std::fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

/// The derived keys, one per purpose.
#[derive(Debug)]
pub struct DataKeys {
    /// Keys the chunk id hash: a supplier cannot test whether we store a known file.
    pub chunk_id: ChunkIdKey,
    /// Encrypts data blocks.
    pub block: BlockKey,
    /// Encrypts the catalog's blocks (kept apart from data blocks so one can be rotated alone).
    pub catalog: BlockKey,
    /// Encrypts the small recovery record stored whole on every supplier.
    pub recovery: BlockKey,
}

/// Key for the keyed BLAKE3 that names chunks.
pub struct ChunkIdKey([u8; 32]);

impl ChunkIdKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ChunkIdKey(bytes)
    }

    /// Keyed BLAKE3 of `data`: equal content gives equal ids under one key only.
    pub fn hash(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, data).as_bytes()
    }
}

impl std::fmt::Debug for ChunkIdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkIdKey(..)")
    }
}

/// A 256-bit XChaCha20-Poly1305 key for blocks (data, catalog or recovery record).
pub struct BlockKey([u8; 32]);

impl BlockKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        BlockKey(bytes)
    }

    pub fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.0.into())
    }

    /// Eight bytes that identify the key without revealing it (a PRF output under the key). Stored
    /// in each sealed block so that opening with the wrong key is reported as such rather than as
    /// corruption. It links blocks to one owner, which the suppliers know anyway.
    pub fn check_value(&self) -> [u8; 8] {
        let full = blake3::keyed_hash(&self.0, KEY_CHECK_INPUT);
        let mut out = [0; 8];
        out.copy_from_slice(&full.as_bytes()[..8]);
        out
    }
}

impl std::fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockKey(check {})", hex::encode(self.check_value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_purpose_gets_its_own_key_and_the_same_secret_gives_the_same_keys() {
        let secret = MasterSecret::from_bytes([7; 32]);
        let a = secret.data_keys();
        let b = MasterSecret::from_bytes([7; 32]).data_keys();
        let other = MasterSecret::from_bytes([8; 32]).data_keys();
        let all = [a.chunk_id.0, a.block.0, a.catalog.0, a.recovery.0, [7; 32]];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y, "two purposes share a key");
            }
        }
        assert_eq!(a.block.0, b.block.0);
        assert_eq!(a.chunk_id.hash(b"x"), b.chunk_id.hash(b"x"));
        assert_ne!(a.block.0, other.block.0);
        assert_ne!(a.chunk_id.hash(b"x"), other.chunk_id.hash(b"x"));
        // The chunk id is keyed: not the plain BLAKE3 anyone could compute.
        assert_ne!(a.chunk_id.hash(b"x"), *blake3::hash(b"x").as_bytes());
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let keys = MasterSecret::from_bytes([0xab; 32]).data_keys();
        let text = format!("{keys:?} {:?}", MasterSecret::from_bytes([0xab; 32]));
        assert!(!text.contains("abab"));
        assert!(!text.contains(&hex::encode(keys.block.0)));
        assert!(!text.contains(&hex::encode(keys.chunk_id.0)));
        assert_ne!(keys.block.check_value(), keys.catalog.check_value());
    }
}
