//! Padmé padding (Nikitin et al., "Reducing Metadata Leakage from Encrypted Files and
//! Communication with PURBs", PETS 2019): a length `L` is rounded up so that only the top
//! `floor(log2(floor(log2 L))) + 1` bits may be non-zero. Overhead is at most ~12% (under 3% for
//! megabyte blocks), and a padded size says only O(log log L) bits about the real one.
//!
//! Padded form (the plaintext that gets sealed): `content length: u64 LE`, content, zero bytes up
//! to `padme(8 + content length)`. The length is authenticated with everything else.

use super::DataError;

pub(crate) const LEN: usize = 8;

/// The Padmé length for `len`.
pub fn padme(len: u64) -> u64 {
    if len < 2 {
        return len;
    }
    let e = u64::from(len.ilog2());
    let s = u64::from(e.ilog2()) + 1;
    let last_bits = e - s;
    let mask = (1u64 << last_bits) - 1;
    (len + mask) & !mask
}

/// Prefixes the length and pads with zeros to the Padmé size.
pub fn pad(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(padme((LEN + content.len()) as u64) as usize);
    out.resize(LEN, 0);
    out.extend_from_slice(content);
    pad_in_place(&mut out, 0);
    out
}

/// [`pad`] without copying: `buf[start..start + 8]` is room for the length, the content follows
/// to the end of `buf`; the length is written and the zeros appended.
pub(crate) fn pad_in_place(buf: &mut Vec<u8>, start: usize) {
    if buf.len() < start + LEN {
        buf.resize(start + LEN, 0);
    }
    let content = buf.len() - start - LEN;
    buf[start..start + LEN].copy_from_slice(&(content as u64).to_le_bytes());
    buf.resize(start + padme((LEN + content) as u64) as usize, 0);
}

/// Padded size of `content_len` bytes of content.
pub fn padded_len(content_len: usize) -> usize {
    padme((LEN + content_len) as u64) as usize
}

/// The content back; the length must fit and the padding must be zeros of exactly Padmé size.
pub fn unpad(padded: &[u8]) -> Result<&[u8], DataError> {
    if padded.len() < LEN {
        return Err(DataError::Padding);
    }
    let mut len = [0; LEN];
    len.copy_from_slice(&padded[..LEN]);
    let len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| DataError::Padding)?;
    let end = LEN
        .checked_add(len)
        .filter(|end| *end <= padded.len())
        .ok_or(DataError::Padding)?;
    if padme(end as u64) != padded.len() as u64 || padded[end..].iter().any(|b| *b != 0) {
        return Err(DataError::Padding);
    }
    Ok(&padded[LEN..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn padme_matches_hand_computed_values() {
        // L=9: E=3, S=2, keep 2 top bits -> round to 2; L=100: E=6, S=3 -> round to 8, etc.
        let cases = [
            (0, 0),
            (1, 1),
            (2, 2),
            (9, 10),
            (100, 104),
            (1000, 1024),
            (1_000_000, 1_015_808),
            (4 * 1024 * 1024, 4 * 1024 * 1024),
            (4 * 1024 * 1024 + 1, 4 * 1024 * 1024 + 131_072),
        ];
        for (len, want) in cases {
            assert_eq!(padme(len), want, "padme({len})");
        }
    }

    proptest! {
        #[test]
        fn padme_rounds_up_little_and_keeps_only_the_top_bits(len in 2u64..(1 << 40)) {
            let p = padme(len);
            prop_assert!(p >= len);
            prop_assert!((p - len) * 100 <= len * 12, "overhead over 12%: {} -> {}", len, p);
            let e = u64::from(len.ilog2());
            let s = u64::from(e.ilog2()) + 1;
            prop_assert!(u64::from(p.trailing_zeros()) >= e - s);
            // Idempotent: a padded size is its own Padmé size.
            prop_assert_eq!(padme(p), p);
        }

        #[test]
        fn pad_unpad_round_trips(content in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let padded = pad(&content);
            prop_assert_eq!(padded.len() as u64, padme(content.len() as u64 + 8));
            prop_assert_eq!(unpad(&padded).expect("valid"), &content[..]);
        }
    }

    #[test]
    fn bad_lengths_and_padding_are_refused() {
        let padded = pad(&[7; 1000]);
        assert!(padded.len() > 1008, "needs padding bytes for this test");
        let mut longer = padded.clone();
        longer[0] = 0xff; // length past the end
        assert!(matches!(unpad(&longer), Err(DataError::Padding)));
        let mut shorter = padded.clone();
        shorter[0] = 0xe0; // 992: the same Padmé size, so the "padding" is content bytes, not zeros
        assert!(unpad(&shorter).is_err());
        let mut dirty = padded.clone();
        *dirty.last_mut().expect("non-empty") = 1;
        assert!(unpad(&dirty).is_err());
        assert!(unpad(&padded[..padded.len() - 1]).is_err());
        assert!(unpad(&[0; 5]).is_err());
    }
}
