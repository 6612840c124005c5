//! The stored fragment: what a supplier holds for one position of one block. The owner-signed
//! manifest travels beside the fragment bytes, so a supplier, an audit or a repairer working
//! without the owner's secrets can check the fragment with the owner's public key alone.
//!
//! Encoding v1 (integers little-endian):
//! ```text
//! magic "BDF1" | manifest length: u32 | signed manifest | fragment bytes
//! ```

use super::DataError;

const MAGIC: &[u8; 4] = b"BDF1";
const HEADER: usize = 4 + 4;
/// A signed manifest is small (a few hundred bytes for any sane layout); more is malformed.
const MAX_MANIFEST: usize = 64 * 1024;

/// Bytes stored for one position: the envelope around `fragment`.
pub fn wrap(signed_manifest: &[u8], fragment: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + signed_manifest.len() + fragment.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(signed_manifest.len() as u32).to_le_bytes());
    out.extend_from_slice(signed_manifest);
    out.extend_from_slice(fragment);
    out
}

/// The stored bytes split into (signed manifest, fragment). Checks the framing only: the caller
/// verifies the manifest's signature and the fragment against it.
pub fn unwrap(stored: &[u8]) -> Result<(&[u8], &[u8]), DataError> {
    if stored.len() < HEADER || &stored[..4] != MAGIC {
        return Err(DataError::StoredMalformed);
    }
    let mut len = [0; 4];
    len.copy_from_slice(&stored[4..HEADER]);
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MANIFEST || stored.len() < HEADER + len {
        return Err(DataError::StoredMalformed);
    }
    Ok((&stored[HEADER..HEADER + len], &stored[HEADER + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_malformed_envelopes_are_refused() {
        let stored = wrap(b"manifest", b"fragment bytes");
        assert_eq!(
            unwrap(&stored).expect("unwrap"),
            (&b"manifest"[..], &b"fragment bytes"[..])
        );
        assert!(unwrap(&stored[..6]).is_err(), "truncated header");
        assert!(unwrap(&stored[..10]).is_err(), "truncated manifest");
        let mut bad = stored.clone();
        bad[0] = b'X';
        assert!(unwrap(&bad).is_err(), "wrong magic");
        let mut huge = stored;
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unwrap(&huge).is_err(), "absurd manifest length");
    }
}
