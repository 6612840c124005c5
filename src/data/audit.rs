//! Storage audits (PROTOCOL.md §8.9): a proof of storage is BLAKE3 keyed with the challenger's
//! fresh 32-byte nonce over a range of the stored bytes (the stored-fragment envelope, exactly as
//! the supplier keeps it). The nonce is unknown until the challenge arrives, so a supplier that
//! kept only hashes, or lost or corrupted the bytes, cannot answer.
//!
//! The owner does not keep the data, so at backup time it precomputes challenge/answer pairs
//! ([`make_pairs`]) from the bytes it is about to place and keeps only the pairs; each later
//! audit spends one pair (a pair asked twice would let a supplier replay the answer).
//!
//! Once a fragment's pairs are used up, a **slice audit** (§8.10) needs nothing precomputed: the
//! supplier sends a Bao slice of a random chunk, which verifies against the fragment's BLAKE3
//! the catalog already holds ([`slice_of`], [`slice_checks`]).
//!
//! Pure: the randomness comes in from the caller's RNG.

use rand_core::RngCore;

/// Audit pairs made per fragment when its bytes are in hand.
pub const AUDIT_PAIRS: usize = 24;
/// Bytes each pair covers: 64 KiB at a random offset. Whole-fragment ranges would hash every
/// stored byte eight times during a backup; the supplier reads only the range (a bit flip
/// elsewhere is caught by a later audit's range, a whole fetch, or any read), and a supplier
/// keeping a fraction `x` of the bytes passes `n` audits with a probability of about `x^n`.
pub const AUDIT_RANGE: u64 = 64 * 1024;

/// The owner's pairs for one stored fragment: [`AUDIT_PAIRS`] of [`AUDIT_RANGE`] bytes each.
/// Made where the bytes already are (the encoder that stages them, the rebuilder that rebuilt
/// them, an audit that fetched them whole), never by reading a fragment back.
pub fn pairs_for(stored: &[u8], rng: &mut impl RngCore) -> Vec<AuditPair> {
    make_pairs_within(stored, AUDIT_PAIRS, AUDIT_RANGE, rng)
}

/// Longest range one audit may cover: an audit costs the supplier a read, never a whole file.
pub const MAX_AUDIT_RANGE: u64 = 1 << 20;

/// The proof of storage for a range of a stored fragment (PROTOCOL.md §8.9): BLAKE3 keyed with
/// the challenger's fresh 32-byte nonce over the bytes `offset .. offset + length`. `None` when
/// the range is empty, longer than [`MAX_AUDIT_RANGE`] or not inside the fragment.
pub fn audit_proof(nonce: &[u8; 32], stored: &[u8], offset: u64, length: u64) -> Option<[u8; 32]> {
    if length == 0 || length > MAX_AUDIT_RANGE {
        return None;
    }
    let end = offset.checked_add(length)?;
    let range = stored.get(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)?;
    Some(range_proof(nonce, range))
}

/// The proof over a range's bytes already cut out of the fragment (a supplier reads only the
/// range from its file): BLAKE3 keyed with the nonce.
pub fn range_proof(nonce: &[u8; 32], range: &[u8]) -> [u8; 32] {
    *blake3::keyed_hash(nonce, range).as_bytes()
}

/// Bytes a slice audit asks for: one BLAKE3 chunk. A supplier keeping a fraction `x` of the
/// bytes answers `n` slice audits at random offsets with a probability of about `x^n`, as with
/// the pairs; a slice costs about 1.7 KiB on the wire for a 1 MiB fragment.
pub const SLICE_LEN: u64 = 1024;

/// Longest slice a supplier serves.
pub const MAX_SLICE_LEN: u64 = 64 * 1024;

/// A random chunk-aligned offset inside a fragment of `size` bytes (0 for an empty one).
pub fn slice_offset(size: u64, rng: &mut impl RngCore) -> u64 {
    let chunks = size.div_ceil(SLICE_LEN).max(1);
    (rng.next_u64() % chunks) * SLICE_LEN
}

/// The supplier's answer to a slice audit (PROTOCOL.md §8.10): the Bao slice of `stored` for
/// `offset .. offset + length` — the length, the parent hashes down to the range and its chunks.
/// `None` when `length` is 0 or over [`MAX_SLICE_LEN`], or `offset` is not inside `stored`.
/// Hashes the whole fragment (its tree is not kept).
pub fn slice_of(stored: &[u8], offset: u64, length: u64) -> Option<Vec<u8>> {
    if length == 0 || length > MAX_SLICE_LEN || offset >= stored.len() as u64 {
        return None;
    }
    let (outboard, _) = bao::encode::outboard(stored);
    let mut extractor = bao::encode::SliceExtractor::new_outboard(
        std::io::Cursor::new(stored),
        std::io::Cursor::new(&outboard),
        offset,
        length,
    );
    let mut slice = Vec::new();
    std::io::Read::read_to_end(&mut extractor, &mut slice).ok()?;
    Some(slice)
}

/// Whether `slice` proves the bytes `offset .. offset + length` of a fragment of `size` bytes
/// whose BLAKE3 is `hash`: every chunk and parent hash verified up to the root, and as many
/// bytes as the range holds inside the fragment.
pub fn slice_checks(slice: &[u8], hash: &[u8; 32], size: u64, offset: u64, length: u64) -> bool {
    let expected = size.saturating_sub(offset).min(length);
    // The slice opens with the fragment's length (verified with the root): the catalog's size.
    if expected == 0 || slice.get(..8) != Some(&size.to_le_bytes()[..]) {
        return false;
    }
    let hash = bao::Hash::from(*hash);
    let mut decoder = bao::decode::SliceDecoder::new(slice, &hash, offset, length);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut decoder, &mut bytes).is_ok() && bytes.len() as u64 == expected
}

/// One precomputed audit: the challenge to send (nonce, offset, length) and the answer an honest
/// supplier gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditPair {
    pub nonce: [u8; 32],
    pub offset: u64,
    pub length: u64,
    pub proof: [u8; 32],
}

impl AuditPair {
    /// Whether `proof` (as received, any length) is the expected answer. Compared in constant
    /// time (`blake3::Hash`'s equality), so timing says nothing about how close a guess was.
    pub fn check(&self, proof: &[u8]) -> bool {
        let Ok(got) = <[u8; 32]>::try_from(proof) else {
            return false;
        };
        blake3::Hash::from_bytes(got) == blake3::Hash::from_bytes(self.proof)
    }
}

/// `count` challenges precomputed from the stored bytes (what the owner keeps to check a supplier
/// later without the data). Each covers `min(len, MAX_AUDIT_RANGE)` bytes at a random offset (the
/// whole fragment when it fits, so any corrupted byte fails it), with a fresh random nonce.
/// Empty `stored` gives no pairs (there is nothing to prove).
pub fn make_pairs(stored: &[u8], count: usize, rng: &mut impl RngCore) -> Vec<AuditPair> {
    make_pairs_within(stored, count, MAX_AUDIT_RANGE, rng)
}

/// Like [`make_pairs`], each range at most `range` bytes (clamped to 1 ..= `MAX_AUDIT_RANGE`):
/// shorter ranges cost less to precompute and to answer; a supplier keeping a fraction `x` of
/// the bytes still passes one audit with a probability of about `x` only.
pub fn make_pairs_within(
    stored: &[u8],
    count: usize,
    range: u64,
    rng: &mut impl RngCore,
) -> Vec<AuditPair> {
    let len = stored.len() as u64;
    if len == 0 {
        return Vec::new();
    }
    let length = len.min(range.clamp(1, MAX_AUDIT_RANGE));
    // Offsets 0 ..= len - length keep the range inside the data.
    let span = len - length + 1;
    (0..count)
        .map(|_| {
            let mut nonce = [0u8; 32];
            rng.fill_bytes(&mut nonce);
            // Multiply-shift maps a u64 onto 0..span without the modulo's bias toward low offsets.
            let offset = ((u128::from(rng.next_u64()) * u128::from(span)) >> 64) as u64;
            let proof = audit_proof(&nonce, stored, offset, length)
                .expect("the range is non-empty, at most MAX_AUDIT_RANGE and inside the data");
            AuditPair {
                nonce,
                offset,
                length,
                proof,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::noise;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn slice_offsets_are_chunk_aligned_inside_the_fragment_and_cover_it() {
        let mut rng = StdRng::seed_from_u64(7);
        let size = 10 * SLICE_LEN + 300;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let offset = slice_offset(size, &mut rng);
            assert_eq!(offset % SLICE_LEN, 0, "{offset}");
            assert!(offset < size, "{offset}");
            seen.insert(offset);
        }
        // Every chunk is audited in turn, the short last one too.
        assert_eq!(seen.len(), 11, "{seen:?}");
        assert_eq!(slice_offset(1, &mut rng), 0);
        assert_eq!(slice_offset(0, &mut rng), 0);
    }

    #[test]
    fn a_slice_proves_its_range_against_the_hash_alone() {
        let stored: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 1000) as u8).collect();
        let hash = *blake3::hash(&stored).as_bytes();
        let size = stored.len() as u64;
        for offset in [0, 1024, 150_000, size - 1] {
            let slice = slice_of(&stored, offset, SLICE_LEN).expect("a slice");
            assert!(
                slice_checks(&slice, &hash, size, offset, SLICE_LEN),
                "{offset}"
            );
            // About a chunk or two plus the parent hashes, never the fragment.
            assert!(slice.len() < 4 * 1024 + 8 + 64 * 20, "{}", slice.len());
            // It does not prove another range, another fragment or another size.
            assert!(!slice_checks(
                &slice,
                &hash,
                size,
                (offset + 8192) % size,
                SLICE_LEN
            ));
            assert!(!slice_checks(&slice, &[9; 32], size, offset, SLICE_LEN));
            assert!(!slice_checks(&slice, &hash, size + 4096, offset, SLICE_LEN));
            // A flipped byte anywhere in it (data or hashes) fails.
            for at in [0, 8, slice.len() / 2, slice.len() - 1] {
                let mut bad = slice.clone();
                bad[at] ^= 1;
                assert!(!slice_checks(&bad, &hash, size, offset, SLICE_LEN), "{at}");
            }
            // A truncated slice fails.
            assert!(!slice_checks(
                &slice[..slice.len() - 1],
                &hash,
                size,
                offset,
                SLICE_LEN
            ));
        }
        // A supplier that kept all but one byte fails the slice that covers it.
        let mut damaged = stored.clone();
        damaged[150_500] ^= 0x40;
        let slice = slice_of(&damaged, 150_000, SLICE_LEN).expect("a slice");
        assert!(!slice_checks(&slice, &hash, size, 150_000, SLICE_LEN));
        // Ranges a supplier refuses.
        assert_eq!(slice_of(&stored, size, 1), None);
        assert_eq!(slice_of(&stored, 0, 0), None);
        assert_eq!(slice_of(&stored, 0, MAX_SLICE_LEN + 1), None);
        assert!(slice_of(&stored, 0, MAX_SLICE_LEN).is_some());
    }

    #[test]
    fn pairs_within_a_range_stay_that_short_and_verify() {
        let data = noise(5, 300_000);
        let mut rng = StdRng::seed_from_u64(3);
        let pairs = make_pairs_within(&data, 16, 65_536, &mut rng);
        assert_eq!(pairs.len(), 16);
        let offsets: std::collections::BTreeSet<u64> = pairs.iter().map(|p| p.offset).collect();
        assert!(offsets.len() > 8, "offsets vary: {offsets:?}");
        for p in &pairs {
            assert_eq!(p.length, 65_536);
            assert!(p.offset + p.length <= data.len() as u64);
            let proof = audit_proof(&p.nonce, &data, p.offset, p.length).expect("in range");
            assert!(p.check(&proof));
        }
        // A range of 0 is taken as 1 byte; a short fragment is covered whole.
        assert_eq!(make_pairs_within(&data, 1, 0, &mut rng)[0].length, 1);
        assert_eq!(
            make_pairs_within(&data[..100], 1, 65_536, &mut rng)[0].length,
            100
        );
    }

    #[test]
    fn an_audit_proof_covers_exactly_the_range_and_refuses_bad_ones() {
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let nonce = [9u8; 32];
        let proof = audit_proof(&nonce, &data, 10, 100).expect("in range");
        assert_eq!(
            proof,
            *blake3::keyed_hash(&nonce, &data[10..110]).as_bytes()
        );
        assert_ne!(
            proof,
            audit_proof(&[8u8; 32], &data, 10, 100).expect("in range")
        );
        assert_ne!(
            proof,
            audit_proof(&nonce, &data, 11, 100).expect("in range")
        );
        assert!(
            audit_proof(&nonce, &data, 4990, 10).is_some(),
            "up to the last byte"
        );
        assert!(
            audit_proof(&nonce, &data, 4991, 10).is_none(),
            "past the end"
        );
        assert!(audit_proof(&nonce, &data, 0, 0).is_none(), "empty");
        assert!(
            audit_proof(&nonce, &data, u64::MAX, 2).is_none(),
            "overflow"
        );
        let big = vec![0u8; (MAX_AUDIT_RANGE + 1) as usize];
        assert!(
            audit_proof(&nonce, &big, 0, MAX_AUDIT_RANGE + 1).is_none(),
            "too long"
        );
    }

    #[test]
    fn pairs_verify_and_a_flipped_byte_fails_every_pair() {
        let stored = noise(3, 10_000);
        let mut rng = StdRng::seed_from_u64(1);
        let pairs = make_pairs(&stored, 8, &mut rng);
        assert_eq!(pairs.len(), 8);
        for p in &pairs {
            // A small fragment is covered whole.
            assert_eq!((p.offset, p.length), (0, 10_000));
            let answer = audit_proof(&p.nonce, &stored, p.offset, p.length).expect("in range");
            assert_eq!(answer, p.proof);
            assert!(p.check(&answer));
            assert!(!p.check(&answer[..31]), "a short proof");
            assert!(
                !p.check(&[answer.as_slice(), &[0]].concat()),
                "a long proof"
            );
        }
        // Fresh nonces: no two pairs share one, so one answer cannot be replayed for another.
        for (i, a) in pairs.iter().enumerate() {
            for b in &pairs[i + 1..] {
                assert_ne!(a.nonce, b.nonce);
                assert_ne!(a.proof, b.proof);
            }
        }
        for at in [0, 1, 4_321, 9_999] {
            let mut bad = stored.clone();
            bad[at] ^= 0x80;
            for p in &pairs {
                let answer = audit_proof(&p.nonce, &bad, p.offset, p.length).expect("in range");
                assert!(!p.check(&answer), "flip at {at} passed");
            }
        }
        // A supplier that kept the fragment's hash (not its bytes) has nothing to answer with.
        let hash = blake3::hash(&stored);
        assert!(pairs.iter().all(|p| !p.check(hash.as_bytes())));
        assert!(make_pairs(&[], 5, &mut rng).is_empty());
        assert!(make_pairs(&stored, 0, &mut rng).is_empty());
    }

    #[test]
    fn a_large_fragment_is_audited_a_mib_at_a_time_at_varied_offsets() {
        let len = 3 << 20;
        let stored = noise(4, len);
        let mut rng = StdRng::seed_from_u64(2);
        let pairs = make_pairs(&stored, 32, &mut rng);
        assert!(pairs.iter().all(|p| p.length == MAX_AUDIT_RANGE));
        assert!(pairs.iter().all(|p| p.offset + p.length <= len as u64
            && audit_proof(&p.nonce, &stored, p.offset, p.length) == Some(p.proof)));
        let mut offsets: Vec<u64> = pairs.iter().map(|p| p.offset).collect();
        offsets.sort_unstable();
        offsets.dedup();
        assert!(offsets.len() > 16, "offsets barely vary: {offsets:?}");
        // Over 32 draws from 0 ..= 2 MiB, both halves of the range are reached.
        assert!(offsets.first() < Some(&(1 << 20)) && offsets.last() > Some(&(1 << 20)));
        // A flipped byte fails exactly the pairs whose range covers it.
        let at = 3 * (1 << 19); // the middle
        let mut bad = stored.clone();
        bad[at] ^= 1;
        for p in &pairs {
            let covers = (p.offset..p.offset + p.length).contains(&(at as u64));
            let answer = audit_proof(&p.nonce, &bad, p.offset, p.length).expect("in range");
            assert_eq!(p.check(&answer), !covers, "pair at {}", p.offset);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn ranges_are_always_inside_the_data(
            len in prop_oneof![
                1usize..4096,
                Just(MAX_AUDIT_RANGE as usize),
                Just(MAX_AUDIT_RANGE as usize + 1),
                (MAX_AUDIT_RANGE as usize + 2)..(MAX_AUDIT_RANGE as usize + 5000),
            ],
            seed in any::<u64>(),
        ) {
            let stored = noise(seed, len);
            let pairs = make_pairs(&stored, 4, &mut StdRng::seed_from_u64(seed));
            prop_assert_eq!(pairs.len(), 4);
            for p in pairs {
                prop_assert_eq!(p.length, (len as u64).min(MAX_AUDIT_RANGE));
                prop_assert!(p.offset + p.length <= len as u64);
                prop_assert_eq!(audit_proof(&p.nonce, &stored, p.offset, p.length), Some(p.proof));
            }
        }
    }
}
