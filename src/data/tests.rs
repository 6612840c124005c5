//! Whole-pipeline tests: a tree of files through every stage and back, and each kind of damage.

use super::*;
use crate::crypto::derive::MasterSecret;
use ed25519_dalek::VerifyingKey;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

/// Deterministic incompressible-looking bytes (xorshift), so tests need no RNG crate.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Text-like, compressible bytes.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "backup ",
        "friend ",
        "supplier ",
        "block ",
        "chunk ",
        "owner\n",
        "key ",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut x = seed | 1;
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(words[(x >> 60) as usize % words.len()].as_bytes());
    }
    out.truncate(len);
    out
}

const SMALL: ChunkerParams = ChunkerParams {
    min: 1024,
    avg: 4096,
    max: 16 * 1024,
};

fn random_for(n: u64) -> BlockRandom {
    let mut id = [0; 32];
    id[..8].copy_from_slice(&n.to_le_bytes());
    id[8] = 0xb1;
    let mut nonce = [0; 24];
    nonce[..8].copy_from_slice(&n.to_le_bytes());
    BlockRandom {
        id: BlockId(id),
        nonce,
    }
}

struct Stored {
    /// Per file, its chunk ids in order.
    recipes: Vec<Vec<ChunkId>>,
    blocks: Vec<EncodedBlock>,
    unique_chunks: usize,
}

/// The backup side: chunk every file, dedup against chunks already seen, pack, encode.
fn back_up(files: &[Vec<u8>], secret: &MasterSecret, owner: &SigningKey, layout: Layout) -> Stored {
    let keys = secret.data_keys();
    let mut chunker = Chunker::new(SMALL).expect("valid");
    let mut packer = Packer::new(16 * 1024).expect("valid");
    let mut seen = HashSet::new();
    let mut plain_blocks = Vec::new();
    let mut recipes = Vec::new();
    for file in files {
        let mut recipe = Vec::new();
        let mut take = |chunker: &mut Chunker, plain_blocks: &mut Vec<FinishedBlock>| {
            while let Some(chunk) = chunker.next_chunk() {
                let id = ChunkId::of(&keys.chunk_id, chunk);
                recipe.push(id);
                if seen.insert(id) {
                    plain_blocks.extend(packer.add(id, chunk).expect("chunk fits"));
                }
            }
        };
        for piece in file.chunks(5000) {
            chunker.feed(piece);
            take(&mut chunker, &mut plain_blocks);
        }
        chunker.finish();
        take(&mut chunker, &mut plain_blocks);
        recipes.push(recipe);
    }
    plain_blocks.extend(packer.finish());
    let blocks = plain_blocks
        .iter()
        .enumerate()
        .map(|(n, b)| {
            encode_block(
                &b.plain,
                &keys.block,
                owner,
                layout,
                3,
                random_for(n as u64),
            )
            .expect("encodes")
        })
        .collect();
    Stored {
        recipes,
        blocks,
        unique_chunks: seen.len(),
    }
}

/// The restore side: verify each manifest with the public key, decode from what is left, and
/// rebuild the files from their recipes.
fn restore(
    stored: &Stored,
    fragments: &[Vec<Option<Vec<u8>>>],
    secret: &MasterSecret,
    owner: &VerifyingKey,
) -> Result<Vec<Vec<u8>>, DataError> {
    let keys = secret.data_keys();
    let mut plains = Vec::new();
    for (block, frags) in stored.blocks.iter().zip(fragments) {
        let manifest = BlockManifest::verify(&block.signed_manifest, owner)?;
        let given: Vec<Option<&[u8]>> = frags.iter().map(|f| f.as_deref()).collect();
        plains.push(decode_block(&given, &manifest, &keys.block)?.plain);
    }
    let mut chunks: HashMap<ChunkId, &[u8]> = HashMap::new();
    for plain in &plains {
        for (id, bytes) in PackedBlock::parse(plain)?.chunks() {
            chunks.insert(*id, bytes);
        }
    }
    Ok(stored
        .recipes
        .iter()
        .map(|recipe| {
            recipe
                .iter()
                .flat_map(|id| chunks[id].iter().copied())
                .collect()
        })
        .collect())
}

fn all_fragments(stored: &Stored) -> Vec<Vec<Option<Vec<u8>>>> {
    stored
        .blocks
        .iter()
        .map(|b| b.fragments.iter().cloned().map(Some).collect())
        .collect()
}

fn tree(seed: u64, sizes: &[usize]) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, len)| {
            let s = seed.wrapping_add(i as u64);
            if i % 2 == 0 {
                text(s, *len)
            } else {
                noise(s, *len)
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn a_tree_comes_back_from_any_k_fragments_of_every_block(
        seed in any::<u64>(),
        sizes in proptest::collection::vec(0usize..60_000, 1..6),
        k in 1u8..6,
        m in 1u8..4,
        lost in proptest::collection::vec(any::<u64>(), 8),
    ) {
        let secret = MasterSecret::from_bytes([seed as u8; 32]);
        let owner = SigningKey::from_bytes(&[seed as u8 ^ 0x55; 32]);
        let layout = Layout::new(k, m).expect("valid");
        let mut files = tree(seed, &sizes);
        // A duplicate file: deduplication must store its chunks once.
        files.push(files[0].clone());
        let stored = back_up(&files, &secret, &owner, layout);
        let total_chunks: usize = stored.recipes.iter().map(Vec::len).sum();
        prop_assert!(stored.unique_chunks + stored.recipes[0].len() <= total_chunks);
        let mut fragments = all_fragments(&stored);
        // Lose exactly m fragments of each block, at positions chosen by `lost`.
        for (n, frags) in fragments.iter_mut().enumerate() {
            let mut s = lost[n % lost.len()].wrapping_add(n as u64);
            for _ in 0..m {
                let start = (s % frags.len() as u64) as usize;
                let at = (start..frags.len()).chain(0..start).find(|i| frags[*i].is_some()).expect("left");
                frags[at] = None;
                s = s.rotate_left(17).wrapping_mul(0x2545_f491_4f6c_dd1d);
            }
        }
        let back = restore(&stored, &fragments, &secret, &owner.verifying_key()).expect("restores");
        prop_assert_eq!(back, files);
    }
}

fn sample() -> (MasterSecret, SigningKey, Stored, Vec<Vec<u8>>) {
    let secret = MasterSecret::from_bytes([1; 32]);
    let owner = SigningKey::from_bytes(&[2; 32]);
    let files = tree(7, &[50_000, 40_000, 3_000]);
    let stored = back_up(&files, &secret, &owner, Layout::default());
    assert!(stored.blocks.len() >= 3, "need several blocks to swap");
    (secret, owner, stored, files)
}

#[test]
fn the_sample_round_trips_and_holds_no_plaintext() {
    let (secret, owner, stored, files) = sample();
    let back = restore(
        &stored,
        &all_fragments(&stored),
        &secret,
        &owner.verifying_key(),
    );
    assert_eq!(back.expect("restores"), files);
    // No fragment holds a recognisable piece of the text files.
    let needle = &files[0][1000..1032];
    for block in &stored.blocks {
        for fragment in &block.fragments {
            assert!(!fragment.windows(needle.len()).any(|w| w == needle));
        }
    }
    assert!(
        stored.blocks.iter().any(|b| b.compressed),
        "text blocks compress"
    );
}

#[test]
fn a_wrong_key_is_reported_as_such() {
    let (_, owner, stored, _) = sample();
    let other = MasterSecret::from_bytes([3; 32]);
    let err = restore(
        &stored,
        &all_fragments(&stored),
        &other,
        &owner.verifying_key(),
    );
    assert!(matches!(err, Err(DataError::WrongKey)), "{err:?}");
}

#[test]
fn swapped_blocks_are_detected() {
    let (secret, owner, stored, _) = sample();
    let keys = secret.data_keys();
    let public = owner.verifying_key();
    // Block 1's fragments offered under block 0's manifest: none matches its hash.
    let manifest0 = BlockManifest::verify(&stored.blocks[0].signed_manifest, &public).expect("ok");
    let given: Vec<Option<&[u8]>> = stored.blocks[1]
        .fragments
        .iter()
        .map(|f| Some(&f[..]))
        .collect();
    let err = decode_block(&given, &manifest0, &keys.block);
    assert!(
        matches!(err, Err(DataError::TooFewFragments { usable: 0, .. })),
        "{err:?}"
    );
    // Below the manifest: block 1's sealed bytes opened as block 0 fail on the associated data.
    let b1 = &stored.blocks[1];
    let frags: Vec<Option<&[u8]>> = b1.fragments.iter().map(|f| Some(&f[..])).collect();
    let sealed = erasure::decode(&frags, Layout::default(), b1.sealed_len).expect("decodes");
    assert!(matches!(
        seal::open(&keys.block, stored.blocks[0].id, &sealed),
        Err(DataError::BlockIdMismatch { .. })
    ));
    // And rewriting the id in the header to pass that check still fails authentication.
    let mut forged = sealed.clone();
    forged[9..41].copy_from_slice(&stored.blocks[0].id.0);
    assert!(matches!(
        seal::open(&keys.block, stored.blocks[0].id, &forged),
        Err(DataError::Corrupt)
    ));
}

#[test]
fn flipped_bits_are_set_aside_or_refused_never_accepted() {
    let (secret, owner, stored, files) = sample();
    let public = owner.verifying_key();
    let keys = secret.data_keys();
    // Up to m corrupt fragments: they are named, and the block still comes back right.
    let mut fragments = all_fragments(&stored);
    for at in [0, 4] {
        if let Some(f) = fragments[0][at].as_mut() {
            f[7] ^= 0x80;
        }
    }
    let manifest = BlockManifest::verify(&stored.blocks[0].signed_manifest, &public).expect("ok");
    let given: Vec<Option<&[u8]>> = fragments[0].iter().map(|f| f.as_deref()).collect();
    let decoded =
        decode_block(&given, &manifest, &keys.block).expect("m bad fragments are tolerated");
    let positions: Vec<usize> = decoded.rejected.iter().map(|(p, _)| *p).collect();
    assert_eq!(positions, [0, 4]);
    assert!(
        decoded
            .rejected
            .iter()
            .all(|(_, e)| matches!(e, DataError::FragmentHash { .. }))
    );
    assert_eq!(
        restore(&stored, &fragments, &secret, &public).expect("restores"),
        files
    );
    // One more is too many: refused, not decoded into garbage.
    if let Some(f) = fragments[0][1].as_mut() {
        f[0] ^= 1;
    }
    assert!(matches!(
        restore(&stored, &fragments, &secret, &public),
        Err(DataError::TooFewFragments { usable: 3, need: 4 })
    ));
    // Without the manifest check, a flipped bit reaches the cipher, which refuses it.
    let b = &stored.blocks[2];
    let mut frags = b.fragments.clone();
    frags[1][3] ^= 2;
    let given: Vec<Option<&[u8]>> = frags.iter().map(|f| Some(&f[..])).collect();
    let sealed = erasure::decode(&given, Layout::default(), b.sealed_len).expect("decodes");
    assert!(matches!(
        seal::open(&keys.block, b.id, &sealed),
        Err(DataError::Corrupt)
    ));
}

#[test]
fn a_truncated_fragment_and_missing_fragments_are_refused() {
    let (secret, owner, stored, _) = sample();
    let public = owner.verifying_key();
    let keys = secret.data_keys();
    let manifest = BlockManifest::verify(&stored.blocks[0].signed_manifest, &public).expect("ok");
    let f = &stored.blocks[0].fragments;
    let short = &f[3][..f[3].len() - 1];
    let given = [
        Some(&f[0][..]),
        Some(&f[1][..]),
        Some(&f[2][..]),
        Some(short),
        None,
        None,
    ];
    assert!(matches!(
        decode_block(&given, &manifest, &keys.block),
        Err(DataError::TooFewFragments { usable: 3, need: 4 })
    ));
    let given = [
        Some(&f[0][..]),
        Some(&f[1][..]),
        Some(&f[2][..]),
        Some(short),
        Some(&f[4][..]),
        None,
    ];
    let decoded = decode_block(&given, &manifest, &keys.block).expect("4 good fragments suffice");
    assert!(matches!(
        decoded.rejected[..],
        [(3, DataError::FragmentLength { .. })]
    ));
    assert!(decode_block(&given[..5], &manifest, &keys.block).is_err());
}

#[test]
fn a_manifest_with_a_bad_signature_is_refused() {
    let (secret, owner, mut stored, _) = sample();
    let public = owner.verifying_key();
    // Another owner's key does not verify the real manifests.
    let stranger = SigningKey::from_bytes(&[9; 32]).verifying_key();
    assert!(matches!(
        restore(&stored, &all_fragments(&stored), &secret, &stranger),
        Err(DataError::ManifestSignature)
    ));
    // A manifest altered after signing is refused with the right key.
    let signed = &mut stored.blocks[1].signed_manifest;
    let last = signed.len() - 1;
    signed[last] ^= 1;
    let err = restore(&stored, &all_fragments(&stored), &secret, &public);
    assert!(matches!(err, Err(DataError::ManifestSignature)), "{err:?}");
}
