//! Content-defined chunking (FastCDC 2020) over a stream: the caller feeds bytes as it reads them
//! and takes chunks out, so a file of any size is chunked with at most about `max` + one feed of
//! bytes in memory. Boundaries depend only on content, never on how the input was split into
//! feeds: the result equals chunking the whole file at once.

use super::DataError;
use fastcdc::v2020::{self, Normalization};

/// Chunk size limits in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min: usize,
    pub avg: usize,
    pub max: usize,
}

impl Default for ChunkerParams {
    /// About 1 MiB on average: few enough chunks that the chunk index of a large tree stays small,
    /// small enough that an edit re-uploads little. 4 MiB max matches the default block size.
    fn default() -> Self {
        ChunkerParams {
            min: 256 * 1024,
            avg: 1024 * 1024,
            max: 4 * 1024 * 1024,
        }
    }
}

impl ChunkerParams {
    /// FastCDC's own limits (it only checks them in debug builds) and even sizes (its two-byte
    /// scan shifts odd boundaries).
    pub fn validate(&self) -> Result<(), DataError> {
        let ok = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&self.min)
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&self.avg)
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max
            && self.min.is_multiple_of(2)
            && self.avg.is_multiple_of(2)
            && self.max.is_multiple_of(2);
        if ok {
            Ok(())
        } else {
            Err(DataError::Params("chunk sizes outside FastCDC's limits"))
        }
    }
}

/// A streaming chunker. Per file: `feed` bytes, take chunks with `next_chunk` until `None`, repeat;
/// at the end `finish`, then take the remaining chunks until `None`. After that the chunker is
/// ready for the next file (its buffer is reused).
///
/// Take all available chunks before feeding more, or the buffer grows with the input.
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    buf: Vec<u8>,
    /// Start of the bytes not yet returned as a chunk.
    pos: usize,
    /// `finish` was called: the tail is a chunk even if shorter than `max`.
    eof: bool,
}

impl Chunker {
    pub fn new(params: ChunkerParams) -> Result<Self, DataError> {
        params.validate()?;
        let (mask_s, mask_l) = v2020::select_masks(params.avg, Normalization::Level1);
        Ok(Chunker {
            params,
            mask_s,
            mask_l,
            buf: Vec::new(),
            pos: 0,
            eof: false,
        })
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Adds the next bytes of the current file.
    pub fn feed(&mut self, bytes: &[u8]) {
        // Drop consumed bytes once they are at least as many as the kept ones, so each byte is
        // moved O(1) times on average however small the feeds are.
        if self.pos > 0 && self.pos >= self.buf.len() - self.pos {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Marks the end of the current file: the remaining bytes become the last chunk(s).
    pub fn finish(&mut self) {
        self.eof = true;
    }

    /// The next chunk whose boundary is known, or `None` when more input (or `finish`) is needed.
    /// After `finish`, `None` means the file is done and the chunker has been reset.
    pub fn next_chunk(&mut self) -> Option<&[u8]> {
        let avail = self.buf.len() - self.pos;
        if avail == 0 {
            if self.eof {
                self.buf.clear();
                self.pos = 0;
                self.eof = false;
            }
            return None;
        }
        // A cut is decided within the first `max` bytes, so with `max` bytes at hand (or the end
        // of the file) it is the same cut the whole file would give.
        if !self.eof && avail < self.params.max {
            return None;
        }
        let window = &self.buf[self.pos..self.pos + avail.min(self.params.max)];
        let (_, len) = v2020::cut(
            window,
            self.params.min,
            self.params.avg,
            self.params.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        // `cut` returns at least `min` (or the whole window when it is shorter); never 0 here.
        let len = len.max(1);
        let start = self.pos;
        self.pos += len;
        Some(&self.buf[start..start + len])
    }
}

/// Chunks a whole in-memory buffer (the same boundaries as [`Chunker`]).
pub fn chunk_slice(params: ChunkerParams, data: &[u8]) -> Result<Vec<&[u8]>, DataError> {
    params.validate()?;
    Ok(
        v2020::FastCDC::new(data, params.min, params.avg, params.max)
            .map(|c| &data[c.offset..c.offset + c.length])
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::derive::ChunkIdKey;
    use crate::data::ChunkId;
    use crate::data::tests::noise;
    use proptest::prelude::*;

    /// Small sizes so tests see many chunks in little data.
    const SMALL: ChunkerParams = ChunkerParams {
        min: 2 * 1024,
        avg: 8 * 1024,
        max: 32 * 1024,
    };

    fn stream(params: ChunkerParams, data: &[u8], feed: usize) -> Vec<Vec<u8>> {
        let mut chunker = Chunker::new(params).expect("valid params");
        let mut out = Vec::new();
        for piece in data.chunks(feed.max(1)) {
            chunker.feed(piece);
            while let Some(c) = chunker.next_chunk() {
                out.push(c.to_vec());
            }
        }
        chunker.finish();
        while let Some(c) = chunker.next_chunk() {
            out.push(c.to_vec());
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn streaming_equals_one_shot_whatever_the_feed_sizes(
            seed in any::<u64>(), len in 0usize..300_000, feed in 1usize..70_000,
        ) {
            let data = noise(seed, len);
            let whole: Vec<Vec<u8>> = chunk_slice(SMALL, &data).expect("valid").iter().map(|c| c.to_vec()).collect();
            let streamed = stream(SMALL, &data, feed);
            prop_assert_eq!(&streamed, &whole);
            prop_assert_eq!(streamed.concat(), data);
            for c in &streamed[..streamed.len().saturating_sub(1)] {
                prop_assert!(c.len() >= SMALL.min && c.len() <= SMALL.max);
            }
        }
    }

    #[test]
    fn the_chunker_is_reusable_across_files_and_memory_stays_bounded() {
        let mut chunker = Chunker::new(SMALL).expect("valid");
        for seed in 1..4 {
            let data = noise(seed, 200_000);
            let mut got = Vec::new();
            for piece in data.chunks(1000) {
                chunker.feed(piece);
                while let Some(c) = chunker.next_chunk() {
                    got.extend_from_slice(c);
                }
                assert!(chunker.buf.len() <= 2 * SMALL.max + 1000, "buffer grew");
            }
            chunker.finish();
            while let Some(c) = chunker.next_chunk() {
                got.extend_from_slice(c);
            }
            assert_eq!(got, data, "file {seed} came back different");
            assert!(chunker.buf.is_empty() && !chunker.eof);
        }
        // An empty file gives no chunk.
        chunker.finish();
        assert!(chunker.next_chunk().is_none());
    }

    #[test]
    fn boundaries_are_content_defined_an_insert_changes_only_nearby_chunks() {
        let data = noise(42, 1_000_000);
        let before = chunk_slice(SMALL, &data).expect("valid");
        let mut edited = vec![0x5a];
        edited.extend_from_slice(&data);
        let after = chunk_slice(SMALL, &edited).expect("valid");
        assert!(before.len() > 50, "too few chunks to mean anything");
        let old: std::collections::HashSet<&[u8]> = before.iter().copied().collect();
        let changed = after.iter().filter(|c| !old.contains(*c)).count();
        assert!(changed <= 2, "{changed} of {} chunks changed", after.len());
        // Fixed-size blocks would all shift: check the test would see that.
        let fixed_before: std::collections::HashSet<&[u8]> = data.chunks(8192).collect();
        assert!(
            edited
                .chunks(8192)
                .filter(|c| !fixed_before.contains(*c))
                .count()
                > 50
        );
    }

    #[test]
    fn chunk_ids_dedup_under_one_key_and_differ_under_another() {
        let a = ChunkIdKey::from_bytes([1; 32]);
        let b = ChunkIdKey::from_bytes([2; 32]);
        let data = noise(9, 300_000);
        let ids = |key: &ChunkIdKey, d: &[u8]| -> Vec<ChunkId> {
            chunk_slice(SMALL, d)
                .expect("valid")
                .iter()
                .map(|c| ChunkId::of(key, c))
                .collect()
        };
        let first = ids(&a, &data);
        assert_eq!(first, ids(&a, &data.clone()));
        let under_b = ids(&b, &data);
        assert_eq!(first.len(), under_b.len());
        assert!(first.iter().zip(&under_b).all(|(x, y)| x != y));
        // Different content, different ids.
        let other = ids(&a, &noise(10, 300_000));
        assert!(first.iter().all(|x| !other.contains(x)));
    }

    #[test]
    fn bad_params_are_refused() {
        let mut p = ChunkerParams::default();
        assert!(p.validate().is_ok());
        p.min = 3;
        assert!(matches!(Chunker::new(p), Err(DataError::Params(_))));
        p = ChunkerParams {
            min: 8192,
            avg: 4096,
            max: 65536,
        };
        assert!(p.validate().is_err());
        p = ChunkerParams {
            min: 4097,
            avg: 8192,
            max: 65536,
        };
        assert!(p.validate().is_err());
    }
}
