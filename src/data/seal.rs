//! Sealing a padded block with XChaCha20-Poly1305.
//!
//! Sealed format v1:
//! ```text
//! version: u8 = 1 | key check: 8 bytes | block id: 32 bytes | nonce: 24 bytes | ciphertext | tag: 16
//! ```
//! The whole header is the associated data, so a block cannot be passed off under another id or
//! version. The key check value (see `BlockKey::check_value`) tells a wrong key from corruption;
//! the nonce is random (192 bits: no counter to keep across restarts) and comes from the caller.

use super::{BlockId, DataError};
use crate::crypto::derive::BlockKey;
use chacha20poly1305::{AeadInPlace, Tag, XNonce};

const VERSION: u8 = 1;
/// Bytes before the ciphertext.
pub const HEADER: usize = 1 + 8 + 32 + 24;
pub(crate) const TAG: usize = 16;
/// Bytes sealing adds to the plaintext.
pub const OVERHEAD: usize = HEADER + TAG;

/// Encrypts and authenticates `plaintext` for block `id`.
pub fn seal(
    key: &BlockKey,
    id: BlockId,
    plaintext: &[u8],
    nonce: [u8; 24],
) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.resize(HEADER, 0);
    out.extend_from_slice(plaintext);
    seal_in_place(key, id, nonce, &mut out)?;
    Ok(out)
}

/// [`seal`] without copying: `buf` holds [`HEADER`] bytes of room (overwritten) followed by the
/// plaintext, which is encrypted in place; the tag is appended.
pub(crate) fn seal_in_place(
    key: &BlockKey,
    id: BlockId,
    nonce: [u8; 24],
    buf: &mut Vec<u8>,
) -> Result<(), DataError> {
    if buf.len() < HEADER {
        return Err(DataError::Params("no room for the sealed header"));
    }
    buf[0] = VERSION;
    buf[1..9].copy_from_slice(&key.check_value());
    buf[9..41].copy_from_slice(&id.0);
    buf[41..HEADER].copy_from_slice(&nonce);
    let (header, body) = buf.split_at_mut(HEADER);
    // Encryption only fails for messages beyond the cipher's 256 GiB limit.
    let tag = key
        .cipher()
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), header, body)
        .map_err(|_| DataError::Params("plaintext too long to seal"))?;
    buf.extend_from_slice(&tag);
    Ok(())
}

/// Checks and decrypts a sealed block that should be block `id`.
pub fn open(key: &BlockKey, id: BlockId, sealed: &[u8]) -> Result<Vec<u8>, DataError> {
    if sealed.len() < OVERHEAD {
        return Err(DataError::SealedMalformed);
    }
    if sealed[0] != VERSION {
        return Err(DataError::UnknownVersion {
            what: "sealed block",
            version: sealed[0],
        });
    }
    if sealed[1..9] != key.check_value() {
        return Err(DataError::WrongKey);
    }
    let mut found = [0; 32];
    found.copy_from_slice(&sealed[9..41]);
    if found != id.0 {
        return Err(DataError::BlockIdMismatch {
            expected: id,
            found: BlockId(found),
        });
    }
    let (header, rest) = sealed.split_at(HEADER);
    let (body, tag) = rest.split_at(rest.len() - TAG);
    let mut plain = body.to_vec();
    key.cipher()
        .decrypt_in_place_detached(
            XNonce::from_slice(&header[41..]),
            header,
            &mut plain,
            Tag::from_slice(tag),
        )
        .map_err(|_| DataError::Corrupt)?;
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> BlockKey {
        BlockKey::from_bytes([n; 32])
    }

    #[test]
    fn round_trip_and_each_fault_is_named() {
        let id = BlockId([3; 32]);
        let msg = b"a padded block".repeat(100);
        let sealed = seal(&key(1), id, &msg, [9; 24]).expect("seals");
        assert_eq!(sealed.len(), msg.len() + OVERHEAD);
        assert_eq!(open(&key(1), id, &sealed).expect("opens"), msg);
        // The ciphertext does not contain the plaintext.
        assert!(!sealed.windows(14).any(|w| w == b"a padded block"));
        // Another nonce, another ciphertext.
        assert_ne!(
            seal(&key(1), id, &msg, [8; 24]).expect("seals")[HEADER..],
            sealed[HEADER..]
        );

        assert!(matches!(
            open(&key(2), id, &sealed),
            Err(DataError::WrongKey)
        ));
        let other = BlockId([4; 32]);
        assert!(matches!(
            open(&key(1), other, &sealed),
            Err(DataError::BlockIdMismatch { expected, found }) if expected == other && found == id
        ));
        // Every single-bit flip, header included, is refused.
        for at in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[at] ^= 0x10;
            assert!(open(&key(1), id, &bad).is_err(), "flip at {at} accepted");
        }
        let mut bad = sealed.clone();
        bad[HEADER + 5] ^= 1;
        assert!(matches!(open(&key(1), id, &bad), Err(DataError::Corrupt)));
        // A nonce change is caught by authentication too (the nonce is in the header/AD).
        let mut bad = sealed.clone();
        bad[HEADER - 1] ^= 1;
        assert!(matches!(open(&key(1), id, &bad), Err(DataError::Corrupt)));
        for cut in [0, 1, OVERHEAD - 1, sealed.len() - 1] {
            assert!(
                open(&key(1), id, &sealed[..cut]).is_err(),
                "truncated to {cut}"
            );
        }
    }

    #[test]
    fn a_wrong_key_that_forges_the_check_value_still_fails_authentication() {
        // The check value is a convenience for error messages, not the security: copy key 1's
        // check value into a block sealed under key 2 and opening with key 1 must still fail.
        let id = BlockId([5; 32]);
        let mut sealed = seal(&key(2), id, b"secret", [1; 24]).expect("seals");
        sealed[1..9].copy_from_slice(&key(1).check_value());
        assert!(matches!(
            open(&key(1), id, &sealed),
            Err(DataError::Corrupt)
        ));
    }
}
