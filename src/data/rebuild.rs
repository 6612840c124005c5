//! The rebuilder's data step: lost fragments of a block recreated from any `k` others, without
//! the block key (Reed-Solomon works on the ciphertext), and checked against the owner-signed
//! manifest before anything is handed back to be placed.

use super::{BlockManifest, DataError, erasure, stored};

/// The stored envelopes ([`stored::wrap`]`(signed_manifest, fragment)`) of the `targets`
/// positions, rebuilt from at least `k` fragments (`fragments[p]` = the fragment BYTES at position
/// `p`, already unwrapped from their envelope, or `None`). Every rebuilt fragment is checked
/// against the manifest's hash for its position before it is returned; a source fragment that
/// fails its hash is an error (the caller checks sources first, but this never trusts it: one bad
/// source would silently poison every rebuilt fragment). Returns `(position, stored envelope
/// bytes)` in `targets` order.
///
/// `signed_manifest` must be the signed encoding of `manifest` (the caller verified it with the
/// owner's key); it is copied into each envelope as is.
pub fn rebuild_fragments(
    manifest: &BlockManifest,
    signed_manifest: &[u8],
    fragments: &[Option<&[u8]>],
    targets: &[usize],
) -> Result<Vec<(usize, Vec<u8>)>, DataError> {
    let layout = manifest.layout();
    let total = layout.total();
    if fragments.len() != total {
        return Err(DataError::Params(
            "fragment list length differs from the layout",
        ));
    }
    if let Some(&position) = targets.iter().find(|&&t| t >= total) {
        return Err(DataError::FragmentPosition { position, total });
    }
    for (position, fragment) in fragments.iter().enumerate() {
        if let Some(bytes) = fragment {
            manifest.check_fragment(position, bytes)?;
        }
    }
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let all = erasure::reconstruct(fragments, layout, manifest.sealed_len())?;
    targets
        .iter()
        .map(|&position| {
            let fragment = &all[position];
            // Good sources and a consistent manifest make this hold; it is checked anyway, so a
            // wrong fragment is never placed under the owner's signature.
            manifest.check_fragment(position, fragment)?;
            Ok((position, stored::wrap(signed_manifest, fragment)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::derive::MasterSecret;
    use crate::data::tests::noise;
    use crate::data::{BlockId, BlockRandom, EncodedBlock, Layout, encode_block};
    use ed25519_dalek::SigningKey;

    fn block() -> EncodedBlock {
        let keys = MasterSecret::from_bytes([5; 32]).data_keys();
        let owner = SigningKey::from_bytes(&[6; 32]);
        let random = BlockRandom {
            id: BlockId([7; 32]),
            nonce: [8; 24],
        };
        encode_block(
            &noise(9, 50_000),
            &keys.block,
            &owner,
            Layout::new(4, 2).expect("valid"),
            3,
            random,
        )
        .expect("encodes")
    }

    fn sources<'a>(b: &'a EncodedBlock, lost: &[usize]) -> Vec<Option<&'a [u8]>> {
        b.fragments
            .iter()
            .enumerate()
            .map(|(p, f)| (!lost.contains(&p)).then_some(&f[..]))
            .collect()
    }

    #[test]
    fn two_lost_fragments_come_back_byte_identical() {
        let b = block();
        // A data and a parity position, asked out of order: the answer follows `targets`.
        for lost in [[4, 1], [0, 3], [5, 4]] {
            let rebuilt =
                rebuild_fragments(&b.manifest, &b.signed_manifest, &sources(&b, &lost), &lost)
                    .expect("rebuilds");
            let want: Vec<(usize, Vec<u8>)> = lost
                .iter()
                .map(|&p| (p, stored::wrap(&b.signed_manifest, &b.fragments[p])))
                .collect();
            assert_eq!(rebuilt, want, "lost {lost:?}");
        }
        assert!(
            rebuild_fragments(&b.manifest, &b.signed_manifest, &sources(&b, &[]), &[])
                .expect("nothing to do")
                .is_empty()
        );
    }

    #[test]
    fn fewer_than_k_sources_are_refused() {
        let b = block();
        let lost = [0, 2, 5];
        assert!(matches!(
            rebuild_fragments(&b.manifest, &b.signed_manifest, &sources(&b, &lost), &[0]),
            Err(DataError::TooFewFragments { usable: 3, need: 4 })
        ));
    }

    #[test]
    fn a_tampered_source_is_refused_not_spread() {
        let b = block();
        let mut bad = b.fragments[2].clone();
        bad[17] ^= 0x40;
        let mut given = sources(&b, &[0, 1]);
        given[2] = Some(&bad);
        assert!(matches!(
            rebuild_fragments(&b.manifest, &b.signed_manifest, &given, &[0, 1]),
            Err(DataError::FragmentHash { position: 2 })
        ));
        // A truncated one as well, even when the target is elsewhere.
        let mut given = sources(&b, &[0]);
        given[5] = Some(&b.fragments[5][1..]);
        assert!(matches!(
            rebuild_fragments(&b.manifest, &b.signed_manifest, &given, &[0]),
            Err(DataError::FragmentLength { position: 5, .. })
        ));
    }

    #[test]
    fn a_target_or_list_outside_the_layout_is_refused() {
        let b = block();
        let given = sources(&b, &[0]);
        assert!(matches!(
            rebuild_fragments(&b.manifest, &b.signed_manifest, &given, &[0, 6]),
            Err(DataError::FragmentPosition {
                position: 6,
                total: 6
            })
        ));
        assert!(matches!(
            rebuild_fragments(&b.manifest, &b.signed_manifest, &given[..5], &[0]),
            Err(DataError::Params(_))
        ));
    }
}
