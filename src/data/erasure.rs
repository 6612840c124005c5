//! Reed-Solomon over GF(2^8): a sealed block becomes `k` data fragments (the block cut in `k`
//! equal parts, the last zero-filled) and `m` parity fragments; any `k` of them give the block
//! back. It works on ciphertext, so a repairer needs no key. Fragments carry no header: their
//! position, the layout and the sealed length are in the block's manifest.

use super::DataError;
use reed_solomon_erasure::galois_8::ReedSolomon;

/// `k` data + `m` parity fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    k: u8,
    m: u8,
}

impl Layout {
    /// At least one of each, and at most 255 in all (GF(2^8) allows 256; 255 keeps counts in a byte).
    pub fn new(k: u8, m: u8) -> Result<Self, DataError> {
        if k == 0 || m == 0 || usize::from(k) + usize::from(m) > 255 {
            return Err(DataError::Params(
                "erasure layout needs k >= 1, m >= 1, k + m <= 255",
            ));
        }
        Ok(Layout { k, m })
    }

    pub fn k(&self) -> usize {
        usize::from(self.k)
    }

    pub fn m(&self) -> usize {
        usize::from(self.m)
    }

    pub fn total(&self) -> usize {
        self.k() + self.m()
    }

    /// Bytes in each fragment of a sealed block of `sealed_len` bytes.
    pub fn fragment_len(&self, sealed_len: usize) -> usize {
        sealed_len.div_ceil(self.k())
    }

    fn codec(&self) -> Result<ReedSolomon, DataError> {
        ReedSolomon::new(self.k(), self.m()).map_err(|_| DataError::Erasure("bad layout"))
    }
}

impl Default for Layout {
    /// 4 + 2: any two suppliers may be lost, at 1.5× the stored size.
    fn default() -> Self {
        Layout { k: 4, m: 2 }
    }
}

/// The `k + m` fragments of a sealed block, in position order.
pub fn encode(sealed: &[u8], layout: Layout) -> Result<Vec<Vec<u8>>, DataError> {
    if sealed.is_empty() {
        return Err(DataError::Params("nothing to erasure-code"));
    }
    let len = layout.fragment_len(sealed.len());
    let mut fragments: Vec<Vec<u8>> = sealed
        .chunks(len)
        .map(|part| {
            let mut f = Vec::with_capacity(len);
            f.extend_from_slice(part);
            f.resize(len, 0);
            f
        })
        .collect();
    // A short block (fewer than k parts of `len`) still gets k data fragments.
    fragments.resize(layout.total(), vec![0; len]);
    layout
        .codec()?
        .encode(&mut fragments)
        .map_err(|_| DataError::Erasure("encode failed"))?;
    Ok(fragments)
}

/// All `k + m` fragments from any `k` (by position; `None` = missing), for a repairer that must
/// recreate lost fragments.
pub fn reconstruct(
    fragments: &[Option<&[u8]>],
    layout: Layout,
    sealed_len: usize,
) -> Result<Vec<Vec<u8>>, DataError> {
    let mut shards = checked_shards(fragments, layout, sealed_len)?;
    layout
        .codec()?
        .reconstruct(&mut shards)
        .map_err(|_| DataError::Erasure("reconstruct failed"))?;
    shards
        .into_iter()
        .map(|s| s.ok_or(DataError::Erasure("a fragment was not rebuilt")))
        .collect()
}

/// The sealed block from any `k` fragments.
pub fn decode(
    fragments: &[Option<&[u8]>],
    layout: Layout,
    sealed_len: usize,
) -> Result<Vec<u8>, DataError> {
    let mut shards = checked_shards(fragments, layout, sealed_len)?;
    // Only the missing data fragments need computing; parity is not part of the block.
    if shards[..layout.k()].iter().any(Option::is_none) {
        layout
            .codec()?
            .reconstruct_data(&mut shards)
            .map_err(|_| DataError::Erasure("reconstruct failed"))?;
    }
    let mut sealed = Vec::with_capacity(layout.k() * layout.fragment_len(sealed_len));
    for shard in &shards[..layout.k()] {
        sealed.extend_from_slice(
            shard
                .as_deref()
                .ok_or(DataError::Erasure("a data fragment was not rebuilt"))?,
        );
    }
    sealed.truncate(sealed_len);
    Ok(sealed)
}

/// Checks the count and the length of every present fragment (a truncated one is refused, not
/// zero-filled), and copies them into the shape the codec wants.
fn checked_shards(
    fragments: &[Option<&[u8]>],
    layout: Layout,
    sealed_len: usize,
) -> Result<Vec<Option<Vec<u8>>>, DataError> {
    if fragments.len() != layout.total() {
        return Err(DataError::FragmentPosition {
            position: fragments.len(),
            total: layout.total(),
        });
    }
    if sealed_len == 0 {
        return Err(DataError::Params("sealed length is zero"));
    }
    let expected = layout.fragment_len(sealed_len);
    for (position, fragment) in fragments.iter().enumerate() {
        if let Some(bytes) = fragment
            && bytes.len() != expected
        {
            return Err(DataError::FragmentLength {
                position,
                expected,
                found: bytes.len(),
            });
        }
    }
    let usable = fragments.iter().filter(|f| f.is_some()).count();
    if usable < layout.k() {
        return Err(DataError::TooFewFragments {
            usable,
            need: layout.k(),
        });
    }
    Ok(fragments.iter().map(|f| f.map(<[u8]>::to_vec)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::noise;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_k_fragments_give_the_block_back(
            len in 1usize..20_000, k in 1u8..8, m in 1u8..5, lost_seed in any::<u64>(),
        ) {
            let layout = Layout::new(k, m).expect("valid");
            let sealed = noise(len as u64, len);
            let fragments = encode(&sealed, layout).expect("encodes");
            prop_assert_eq!(fragments.len(), layout.total());
            prop_assert!(fragments.iter().all(|f| f.len() == len.div_ceil(usize::from(k))));
            // Lose m fragments chosen by the seed.
            let mut kept: Vec<Option<&[u8]>> = fragments.iter().map(|f| Some(&f[..])).collect();
            let mut s = lost_seed;
            for _ in 0..m {
                let at = (s % kept.len() as u64) as usize;
                let at = (at..kept.len()).chain(0..at).find(|i| kept[*i].is_some()).expect("one left");
                kept[at] = None;
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 7;
            }
            prop_assert_eq!(&decode(&kept, layout, len).expect("decodes"), &sealed);
            let all = reconstruct(&kept, layout, len).expect("rebuilds");
            prop_assert_eq!(&all, &fragments);
            // One more loss is too many.
            let at = kept.iter().position(Option::is_some).expect("k left");
            kept[at] = None;
            let too_few = matches!(
                decode(&kept, layout, len),
                Err(DataError::TooFewFragments { usable, need }) if usable == usize::from(k) - 1 && need == usize::from(k)
            );
            prop_assert!(too_few);
        }
    }

    #[test]
    fn a_truncated_or_padded_fragment_is_refused() {
        let layout = Layout::default();
        let sealed = noise(1, 1001);
        let fragments = encode(&sealed, layout).expect("encodes");
        let mut given: Vec<Option<&[u8]>> = fragments.iter().map(|f| Some(&f[..])).collect();
        given[2] = Some(&fragments[2][..250]);
        assert!(matches!(
            decode(&given, layout, 1001),
            Err(DataError::FragmentLength {
                position: 2,
                expected: 251,
                found: 250
            })
        ));
        let longer = [&fragments[5][..], &[0]].concat();
        given[2] = Some(&fragments[2]);
        given[5] = Some(&longer);
        assert!(matches!(
            decode(&given, layout, 1001),
            Err(DataError::FragmentLength { position: 5, .. })
        ));
        assert!(decode(&given[..5], layout, 1001).is_err());
        assert!(
            Layout::new(0, 2).is_err()
                && Layout::new(4, 0).is_err()
                && Layout::new(200, 56).is_err()
        );
        assert!(encode(&[], layout).is_err());
    }
}
