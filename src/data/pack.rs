//! Packing chunks into plain blocks, and finding them again.
//!
//! Plain block format v1 (all integers little-endian); the index trails the data so the packer
//! appends chunk bytes as they come and never moves them:
//! ```text
//! chunk bytes, concatenated in index order
//! index: count × (chunk id: 32 bytes, length: u32)
//! count: u32
//! magic: "BDP1"
//! ```

use super::{ChunkId, DataError, MAX_BLOCK_SIZE};

const MAGIC: &[u8; 4] = b"BDP1";
const ENTRY: usize = 32 + 4;
const TRAILER: usize = 4 + 4;

/// A finished plain block and the chunks in it (for the catalog's chunk index).
#[derive(Debug)]
pub struct FinishedBlock {
    pub plain: Vec<u8>,
    pub chunks: Vec<(ChunkId, u32)>,
}

/// Collects chunks into blocks of about `block_size` bytes.
#[derive(Debug)]
pub struct Packer {
    block_size: usize,
    body: Vec<u8>,
    chunks: Vec<(ChunkId, u32)>,
}

impl Packer {
    pub fn new(block_size: usize) -> Result<Self, DataError> {
        let block_size = super::check_block_size(block_size as u64)?;
        Ok(Packer {
            block_size,
            body: Vec::new(),
            chunks: Vec::new(),
        })
    }

    /// Adds a chunk (the caller has already checked it is new). Returns the current block first if
    /// this chunk would take it past `block_size`; the chunk then starts the next block. A chunk
    /// bigger than `block_size` gets a block of its own.
    pub fn add(&mut self, id: ChunkId, data: &[u8]) -> Result<Option<FinishedBlock>, DataError> {
        let len = u32::try_from(data.len())
            .ok()
            .filter(|_| data.len() <= MAX_BLOCK_SIZE / 2)
            .ok_or(DataError::Params(
                "chunk larger than half of MAX_BLOCK_SIZE",
            ))?;
        let next_size = self.pending_size() + data.len() + ENTRY;
        let full = if !self.chunks.is_empty() && next_size > self.block_size {
            self.take()
        } else {
            None
        };
        if self.body.capacity() == 0 {
            self.body.reserve(self.block_size.max(data.len()) + TRAILER);
        }
        self.body.extend_from_slice(data);
        self.chunks.push((id, len));
        Ok(full)
    }

    /// The last, partly filled block, if any.
    pub fn finish(&mut self) -> Option<FinishedBlock> {
        self.take()
    }

    /// Bytes the current block would have if finished now.
    pub fn pending_size(&self) -> usize {
        self.body.len() + self.chunks.len() * ENTRY + TRAILER
    }

    pub fn pending_chunks(&self) -> &[(ChunkId, u32)] {
        &self.chunks
    }

    fn take(&mut self) -> Option<FinishedBlock> {
        if self.chunks.is_empty() {
            return None;
        }
        let mut plain = std::mem::take(&mut self.body);
        let chunks = std::mem::take(&mut self.chunks);
        plain.reserve(chunks.len() * ENTRY + TRAILER);
        for (id, len) in &chunks {
            plain.extend_from_slice(&id.0);
            plain.extend_from_slice(&len.to_le_bytes());
        }
        // The count fits: each entry is 36 bytes and blocks are under 4 GiB.
        plain.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
        plain.extend_from_slice(MAGIC);
        Some(FinishedBlock { plain, chunks })
    }
}

/// A parsed plain block: its chunks by id, borrowing the block's bytes.
#[derive(Debug)]
pub struct PackedBlock<'a> {
    chunks: Vec<(ChunkId, &'a [u8])>,
}

impl<'a> PackedBlock<'a> {
    /// Parses and checks a plain block: the index must describe the data exactly.
    pub fn parse(plain: &'a [u8]) -> Result<Self, DataError> {
        let bad = DataError::BlockMalformed;
        let body_and_index = plain
            .len()
            .checked_sub(TRAILER)
            .ok_or(bad("shorter than its trailer"))?;
        if &plain[plain.len() - 4..] != MAGIC {
            return Err(bad("bad magic"));
        }
        let mut count = [0; 4];
        count.copy_from_slice(&plain[body_and_index..body_and_index + 4]);
        let count = u32::from_le_bytes(count) as usize;
        let index_len = count
            .checked_mul(ENTRY)
            .filter(|n| *n <= body_and_index)
            .ok_or(bad("index longer than the block"))?;
        let body_len = body_and_index - index_len;
        let index = &plain[body_len..body_and_index];
        let mut chunks = Vec::with_capacity(count);
        let mut offset = 0usize;
        for entry in index.chunks_exact(ENTRY) {
            let mut id = [0; 32];
            id.copy_from_slice(&entry[..32]);
            let mut len = [0; 4];
            len.copy_from_slice(&entry[32..]);
            let end = offset
                .checked_add(u32::from_le_bytes(len) as usize)
                .filter(|end| *end <= body_len)
                .ok_or(bad("chunk lengths exceed the data"))?;
            chunks.push((ChunkId(id), &plain[offset..end]));
            offset = end;
        }
        if offset != body_len {
            return Err(bad("chunk lengths do not cover the data"));
        }
        Ok(PackedBlock { chunks })
    }

    /// The chunks in block order.
    pub fn chunks(&self) -> &[(ChunkId, &'a [u8])] {
        &self.chunks
    }

    /// A chunk's bytes by id.
    pub fn get(&self, id: &ChunkId) -> Option<&'a [u8]> {
        self.chunks.iter().find(|(c, _)| c == id).map(|(_, d)| *d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn chunks_come_back_by_id_and_blocks_close_at_block_size() {
        let mut packer = Packer::new(10_000).expect("valid size");
        let mut blocks = Vec::new();
        for n in 0..10u8 {
            let data = vec![n; 3000];
            if let Some(b) = packer.add(id(n), &data).expect("small chunk") {
                blocks.push(b);
            }
        }
        blocks.extend(packer.finish());
        assert!(packer.finish().is_none(), "finish twice gives nothing");
        // 3 chunks of 3036 bytes + trailer fit in 10 000; a fourth does not.
        assert_eq!(blocks.len(), 4);
        assert!(blocks.iter().all(|b| b.plain.len() <= 10_000));
        let mut seen = 0;
        for block in &blocks {
            let parsed = PackedBlock::parse(&block.plain).expect("well formed");
            assert_eq!(parsed.chunks().len(), block.chunks.len());
            for (cid, bytes) in parsed.chunks() {
                assert_eq!(*bytes, &vec![cid.0[0]; 3000][..]);
                assert_eq!(parsed.get(cid), Some(*bytes));
                seen += 1;
            }
        }
        assert_eq!(seen, 10);
    }

    #[test]
    fn an_oversized_chunk_gets_its_own_block() {
        let mut packer = Packer::new(4096).expect("valid");
        assert!(packer.add(id(1), &[1; 100]).expect("ok").is_none());
        let first = packer
            .add(id(2), &[2; 9000])
            .expect("ok")
            .expect("block 1 closed");
        assert_eq!(first.chunks, vec![(id(1), 100)]);
        let second = packer.finish().expect("block 2");
        assert_eq!(
            PackedBlock::parse(&second.plain)
                .expect("ok")
                .get(&id(2))
                .map(<[u8]>::len),
            Some(9000)
        );
    }

    #[test]
    fn malformed_blocks_are_refused() {
        let mut packer = Packer::new(4096).expect("valid");
        let _ = packer.add(id(1), &[1; 100]);
        let _ = packer.add(id(2), &[2; 50]);
        let good = packer.finish().expect("block").plain;
        assert!(PackedBlock::parse(&good).is_ok());
        // Every truncation from the front or the back fails, as does any change to the trailer
        // or to a length in the index.
        for cut in 1..good.len() {
            assert!(PackedBlock::parse(&good[cut..]).is_err(), "front cut {cut}");
            assert!(
                PackedBlock::parse(&good[..good.len() - cut]).is_err(),
                "back cut {cut}"
            );
        }
        let index_start = 150;
        for at in [
            index_start + 32,
            index_start + 36 + 32,
            good.len() - 8,
            good.len() - 1,
        ] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert!(PackedBlock::parse(&bad).is_err(), "flip at {at}");
        }
        assert!(Packer::new(10).is_err());
        assert!(Packer::new(super::super::MAX_TARGET_BLOCK_SIZE + 1).is_err());
        assert!(Packer::new(super::super::MAX_TARGET_BLOCK_SIZE).is_ok());
    }
}
