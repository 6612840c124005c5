//! The block manifest: which fragment belongs at which position, signed by the owner.
//!
//! Stored beside every fragment, so a supplier, an audit or a repairer working without the owner's
//! secrets (Reed-Solomon works on ciphertext) can check any fragment with the owner's public key.
//!
//! Signed encoding v1 (integers little-endian):
//! ```text
//! magic "BDM1" | block id: 32 | k: u8 | m: u8 | sealed length: u64 | (k + m) × BLAKE3: 32
//! | Ed25519 signature: 64, over DOMAIN followed by every byte before it
//! ```

use super::erasure::Layout;
use super::{BlockId, DataError};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

const MAGIC: &[u8; 4] = b"BDM1";
/// Keeps a manifest signature from being valid as any other signed object of the owner.
const DOMAIN: &[u8] = b"bitdust block manifest v1\0";
const FIXED: usize = 4 + 32 + 1 + 1 + 8;
const SIGNATURE: usize = 64;

/// A block's manifest. Only [`crate::data::encode_block`] and [`BlockManifest::verify`] make one,
/// so holding one means it was signed by the owner (or is about to be).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockManifest {
    block_id: BlockId,
    layout: Layout,
    sealed_len: usize,
    hashes: Vec<[u8; 32]>,
}

impl BlockManifest {
    pub(crate) fn new(
        block_id: BlockId,
        layout: Layout,
        sealed_len: usize,
        fragments: &[Vec<u8>],
    ) -> Self {
        BlockManifest {
            block_id,
            layout,
            sealed_len,
            hashes: fragments
                .iter()
                .map(|f| *blake3::hash(f).as_bytes())
                .collect(),
        }
    }

    pub fn block_id(&self) -> BlockId {
        self.block_id
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn sealed_len(&self) -> usize {
        self.sealed_len
    }

    /// BLAKE3 of the fragment at each position.
    pub fn fragment_hashes(&self) -> &[[u8; 32]] {
        &self.hashes
    }

    /// Bytes every fragment of this block has.
    pub fn fragment_len(&self) -> usize {
        self.layout.fragment_len(self.sealed_len)
    }

    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED + self.hashes.len() * 32 + SIGNATURE);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.block_id.0);
        // Layout::new keeps both in a byte.
        out.push(self.layout.k() as u8);
        out.push(self.layout.m() as u8);
        out.extend_from_slice(&(self.sealed_len as u64).to_le_bytes());
        for h in &self.hashes {
            out.extend_from_slice(h);
        }
        out
    }

    /// The signed encoding.
    pub fn sign(&self, owner: &SigningKey) -> Vec<u8> {
        let mut out = self.body();
        let signature = owner.sign(&[DOMAIN, &out[..]].concat());
        out.extend_from_slice(&signature.to_bytes());
        out
    }

    /// Parses a signed encoding and checks the owner's signature.
    pub fn verify(signed: &[u8], owner: &VerifyingKey) -> Result<Self, DataError> {
        let bad = DataError::ManifestMalformed;
        if signed.len() < FIXED + SIGNATURE || &signed[..4] != MAGIC {
            return Err(bad);
        }
        let (body, signature) = signed.split_at(signed.len() - SIGNATURE);
        let signature =
            Signature::from_slice(signature).map_err(|_| DataError::ManifestSignature)?;
        owner
            .verify_strict(&[DOMAIN, body].concat(), &signature)
            .map_err(|_| DataError::ManifestSignature)?;
        // Signed by the owner, but parse defensively all the same.
        let mut id = [0; 32];
        id.copy_from_slice(&body[4..36]);
        let layout = Layout::new(body[36], body[37]).map_err(|_| DataError::ManifestMalformed)?;
        let mut len = [0; 8];
        len.copy_from_slice(&body[38..46]);
        let sealed_len = usize::try_from(u64::from_le_bytes(len))
            .ok()
            .filter(|n| *n > 0 && *n <= 2 * super::MAX_BLOCK_SIZE)
            .ok_or(DataError::ManifestMalformed)?;
        let hashes = &body[FIXED..];
        if hashes.len() != layout.total() * 32 {
            return Err(DataError::ManifestMalformed);
        }
        let hashes = hashes
            .chunks_exact(32)
            .map(|h| {
                let mut a = [0; 32];
                a.copy_from_slice(h);
                a
            })
            .collect();
        Ok(BlockManifest {
            block_id: BlockId(id),
            layout,
            sealed_len,
            hashes,
        })
    }

    /// Checks the fragment claimed to be at `position`: its length, then its BLAKE3.
    pub fn check_fragment(&self, position: usize, bytes: &[u8]) -> Result<(), DataError> {
        let want = self
            .hashes
            .get(position)
            .ok_or(DataError::FragmentPosition {
                position,
                total: self.hashes.len(),
            })?;
        let expected = self.fragment_len();
        if bytes.len() != expected {
            return Err(DataError::FragmentLength {
                position,
                expected,
                found: bytes.len(),
            });
        }
        if blake3::hash(bytes).as_bytes() != want {
            return Err(DataError::FragmentHash { position });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::erasure;
    use crate::data::tests::noise;

    fn setup() -> (SigningKey, BlockManifest, Vec<Vec<u8>>) {
        let owner = SigningKey::from_bytes(&[11; 32]);
        let layout = Layout::new(4, 2).expect("valid");
        let sealed = noise(5, 10_000);
        let fragments = erasure::encode(&sealed, layout).expect("encodes");
        let manifest = BlockManifest::new(BlockId([1; 32]), layout, sealed.len(), &fragments);
        (owner, manifest, fragments)
    }

    #[test]
    fn a_public_key_alone_checks_every_fragment() {
        let (owner, manifest, fragments) = setup();
        let signed = manifest.sign(&owner);
        let verified = BlockManifest::verify(&signed, &owner.verifying_key()).expect("valid");
        assert_eq!(verified, manifest);
        for (i, f) in fragments.iter().enumerate() {
            verified.check_fragment(i, f).expect("matches");
        }
        // A fragment at the wrong position, flipped, truncated, or past the end is refused.
        assert!(matches!(
            verified.check_fragment(0, &fragments[1]),
            Err(DataError::FragmentHash { position: 0 })
        ));
        let mut flipped = fragments[3].clone();
        flipped[100] ^= 4;
        assert!(matches!(
            verified.check_fragment(3, &flipped),
            Err(DataError::FragmentHash { position: 3 })
        ));
        assert!(matches!(
            verified.check_fragment(3, &fragments[3][1..]),
            Err(DataError::FragmentLength { position: 3, .. })
        ));
        assert!(matches!(
            verified.check_fragment(6, &fragments[0]),
            Err(DataError::FragmentPosition { .. })
        ));
    }

    #[test]
    fn a_forged_or_altered_manifest_is_refused() {
        let (owner, manifest, _) = setup();
        let signed = manifest.sign(&owner);
        let public = owner.verifying_key();
        // Any bit flipped anywhere, signature included.
        for at in 0..signed.len() {
            let mut bad = signed.clone();
            bad[at] ^= 0x01;
            assert!(
                BlockManifest::verify(&bad, &public).is_err(),
                "flip at {at} accepted"
            );
        }
        let mut bad = signed.clone();
        bad[50] ^= 1; // inside a hash
        assert!(matches!(
            BlockManifest::verify(&bad, &public),
            Err(DataError::ManifestSignature)
        ));
        // Signed by someone else.
        let mallory = SigningKey::from_bytes(&[12; 32]);
        assert!(matches!(
            BlockManifest::verify(&manifest.sign(&mallory), &public),
            Err(DataError::ManifestSignature)
        ));
        assert!(BlockManifest::verify(&signed[..signed.len() - 1], &public).is_err());
        assert!(BlockManifest::verify(&signed[..20], &public).is_err());
    }
}
