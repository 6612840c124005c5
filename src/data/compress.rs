//! zstd compression of a plain block, or the block stored raw when zstd does not shrink it.
//!
//! Frame (inside the sealed, authenticated plaintext): `method: u8` (0 = raw, 1 = zstd),
//! `plain length: u32 LE`, then the payload. The recorded length bounds the decompression buffer
//! and is checked exactly.

use super::{DataError, MAX_BLOCK_SIZE};

const RAW: u8 = 0;
const ZSTD: u8 = 1;
pub(crate) const HEADER: usize = 5;

/// Compresses `plain` at `level`; raw when that would not be smaller.
pub fn compress(plain: &[u8], level: i32) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::with_capacity(HEADER + plain.len());
    compress_into(plain, level, &mut out)?;
    Ok(out)
}

/// [`compress`], appending the frame to `out` (so the caller can leave room in front); returns
/// whether zstd was used.
pub(crate) fn compress_into(
    plain: &[u8],
    level: i32,
    out: &mut Vec<u8>,
) -> Result<bool, DataError> {
    let len = u32::try_from(plain.len())
        .ok()
        .filter(|_| plain.len() <= MAX_BLOCK_SIZE)
        .ok_or(DataError::Params("block larger than MAX_BLOCK_SIZE"))?;
    let start = out.len();
    out.push(ZSTD);
    out.extend_from_slice(&len.to_le_bytes());
    // Give zstd exactly the room a raw copy would take: if it needs more, raw wins anyway.
    out.resize(start + HEADER + plain.len(), 0);
    let mut compressor = zstd::bulk::Compressor::new(level).map_err(DataError::Zstd)?;
    match compressor.compress_to_buffer(plain, &mut out[start + HEADER..]) {
        Ok(n) if n < plain.len() => {
            out.truncate(start + HEADER + n);
            Ok(true)
        }
        // Not smaller (or did not fit in the raw size): store raw.
        _ => {
            out[start] = RAW;
            out[start + HEADER..].copy_from_slice(plain);
            Ok(false)
        }
    }
}

/// Whether a frame made by [`compress`] holds zstd data (else raw).
pub fn is_compressed(framed: &[u8]) -> bool {
    framed.first() == Some(&ZSTD)
}

/// The plain block back from a frame.
pub fn decompress(framed: &[u8]) -> Result<Vec<u8>, DataError> {
    if framed.len() < HEADER {
        return Err(DataError::Compression);
    }
    let mut len = [0; 4];
    len.copy_from_slice(&framed[1..HEADER]);
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_BLOCK_SIZE {
        return Err(DataError::Compression);
    }
    let payload = &framed[HEADER..];
    match framed[0] {
        RAW if payload.len() == len => Ok(payload.to_vec()),
        ZSTD => {
            let plain = zstd::bulk::decompress(payload, len).map_err(|_| DataError::Compression)?;
            if plain.len() == len {
                Ok(plain)
            } else {
                Err(DataError::Compression)
            }
        }
        RAW => Err(DataError::Compression),
        version => Err(DataError::UnknownVersion {
            what: "compression",
            version,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::noise;

    #[test]
    fn text_is_compressed_and_noise_is_stored_raw_both_round_trip() {
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog\n".repeat(2000);
        let framed = compress(&text, 3).expect("compresses");
        assert!(is_compressed(&framed));
        assert!(framed.len() < text.len() / 10);
        assert_eq!(decompress(&framed).expect("valid"), text);

        let random = noise(3, 100_000);
        let framed = compress(&random, 3).expect("compresses");
        assert!(!is_compressed(&framed));
        assert_eq!(framed.len(), random.len() + HEADER);
        assert_eq!(decompress(&framed).expect("valid"), random);

        let empty = compress(&[], 3).expect("ok");
        assert_eq!(decompress(&empty).expect("valid"), Vec::<u8>::new());
    }

    #[test]
    fn a_wrong_length_or_method_or_payload_is_refused() {
        let text: Vec<u8> = b"abcabcabd".repeat(500);
        let framed = compress(&text, 3).expect("ok");
        for (at, flip) in [(0, 0x02), (1, 1), (4, 0x80)] {
            let mut bad = framed.clone();
            bad[at] ^= flip;
            assert!(decompress(&bad).is_err(), "flip at {at}");
        }
        assert!(decompress(&framed[..framed.len() - 1]).is_err());
        assert!(decompress(&framed[..3]).is_err());
        let mut raw = compress(&noise(1, 100), 3).expect("ok");
        raw.pop();
        assert!(matches!(decompress(&raw), Err(DataError::Compression)));
    }
}
