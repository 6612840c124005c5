//! The backup pipeline without IO, and each of its CPU stages alone, on one core, in one run.
//!
//! Run: `cargo bench --bench pipeline` (harness = false; prints figures).
//! Env: `BENCH_MIB` (default 256) = input bytes, half text-like (compressible) and half random,
//! in 8 MiB "files"; `BENCH_RUNS` (default 3); `BENCH_ZSTD` (default the pipeline's level).
//! Each figure is the best of the runs, in MB/s of input (MB = 10^6 bytes).
//!
//! The "tree" case runs the real `pipeline::Pipeline` (walker + `BENCH_WORKERS` encoder threads,
//! default all cores, fragments staged and fsynced in a temporary outbox) on the directory in
//! `BENCH_TREE` (default /usr/share/doc), with nothing known before (a first backup), and prints
//! MB/s of file bytes; it is printed beside XChaCha20-Poly1305 alone. One run (the page cache is
//! warm after a first walk: the first figure of a cold machine reads from disk).

mod common;
use common::env_or;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitdust::crypto::derive::MasterSecret;
use bitdust::data::{
    BlockId, BlockManifest, BlockRandom, ChunkId, Chunker, ChunkerParams, DEFAULT_BLOCK_SIZE,
    DEFAULT_ZSTD_LEVEL, Layout, PackedBlock, Packer, compress, decode_block, encode_block, erasure,
};
use bitdust::pipeline::{Lookup, Pipeline, PipelineEvent, PipelineKeys, PipelineSettings, Totals};
use bitdust::store::catalog::FileEntry;
use chacha20poly1305::{AeadInPlace, XNonce};
use ed25519_dalek::SigningKey;

const MIB: usize = 1 << 20;
const FILE: usize = 8 * MIB;

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Alternating 8 MiB files: text-like (words, numbers, newlines) and random bytes.
fn mixed(total: usize) -> Vec<Vec<u8>> {
    let words: Vec<&[u8]> = "the backup of a home directory holds mail, photos, source code and \
        configuration; friends store encrypted fragments for each other. 0 1 2 3 42 1999 2026\n"
        .split(' ')
        .map(str::as_bytes)
        .collect();
    let mut s = 0x1234_5678_9abc_def1u64;
    (0..total.div_ceil(FILE))
        .map(|i| {
            let mut f = Vec::with_capacity(FILE + 64);
            if i % 2 == 0 {
                while f.len() < FILE {
                    f.extend_from_slice(words[(xorshift(&mut s) % words.len() as u64) as usize]);
                    f.push(b' ');
                }
                f.truncate(FILE);
            } else {
                while f.len() < FILE {
                    f.extend_from_slice(&xorshift(&mut s).to_le_bytes());
                }
            }
            f
        })
        .collect()
}

fn random_for(n: u64) -> BlockRandom {
    let mut id = [0; 32];
    id[..8].copy_from_slice(&n.to_le_bytes());
    let mut nonce = [0; 24];
    nonce[..8].copy_from_slice(&n.to_le_bytes());
    BlockRandom {
        id: BlockId(id),
        nonce,
    }
}

fn best(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().unwrap_or(Duration::MAX)
}

/// A first backup: nothing known.
struct NothingKnown;

impl Lookup for NothingKnown {
    fn previous(&self, _: &[u8]) -> Option<FileEntry> {
        None
    }
    fn chunk_known(&self, _: &ChunkId) -> bool {
        false
    }
}

/// Runs the pipeline on a tree to the end; the elapsed time, the totals and the staged bytes.
fn tree(root: PathBuf, workers: usize, level: i32) -> (Duration, Totals, u64) {
    let outbox = tempfile::tempdir().expect("temporary outbox");
    let settings = PipelineSettings {
        root,
        excludes: Vec::new(),
        block_size: DEFAULT_BLOCK_SIZE,
        layout: Layout::default(),
        zstd_level: level,
        workers,
        outbox: outbox.path().to_path_buf(),
    };
    let keys = PipelineKeys {
        data: Arc::new(MasterSecret::from_bytes([7; 32]).data_keys()),
        owner: SigningKey::from_bytes(&[9; 32]),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let start = Instant::now();
    let pipeline = Pipeline::start(settings, keys, Arc::new(NothingKnown), tx).expect("starts");
    pipeline.grant(usize::MAX);
    let mut staged = 0u64;
    let mut skipped = 0usize;
    while let Some(event) = rx.blocking_recv() {
        match event {
            PipelineEvent::Block(b) => {
                staged += b.entry.fragments.iter().map(|f| f.size).sum::<u64>()
            }
            PipelineEvent::Skipped(_) => skipped += 1,
            PipelineEvent::File(_) => {}
            PipelineEvent::Done(totals) => {
                if skipped > 0 {
                    println!("  ({skipped} entries skipped: unreadable or special files)");
                }
                return (start.elapsed(), totals, staged);
            }
            PipelineEvent::Failed(e) => panic!("pipeline failed: {e}"),
        }
    }
    panic!("pipeline ended without Done");
}

fn main() {
    let total = env_or::<usize>("BENCH_MIB", 256) * MIB;
    let runs = env_or::<usize>("BENCH_RUNS", 3).max(1);
    let level = env_or::<usize>("BENCH_ZSTD", DEFAULT_ZSTD_LEVEL as usize) as i32;
    let files = mixed(total);
    let total: usize = files.iter().map(Vec::len).sum();
    let keys = MasterSecret::from_bytes([7; 32]).data_keys();
    let owner = SigningKey::from_bytes(&[9; 32]);
    let layout = Layout::default();
    let params = ChunkerParams::default();
    println!(
        "pipeline bench: {} MiB mixed input (half text, half random), 1 core, zstd {level}, \
         {}+{} fragments, {} MiB blocks, best of {runs}",
        total / MIB,
        layout.k(),
        layout.m(),
        DEFAULT_BLOCK_SIZE / MIB
    );

    // The whole pipeline: stream-chunk, name, pack, then compress, pad, seal, erasure-code, sign.
    let mut stored = 0usize;
    let mut blocks_out = 0usize;
    let mut plain_blocks = Vec::new();
    let pipeline = best(runs, || {
        let start = Instant::now();
        let mut chunker = Chunker::new(params).expect("default params are valid");
        let mut packer = Packer::new(DEFAULT_BLOCK_SIZE).expect("default block size is valid");
        let (mut n, mut bytes) = (0u64, 0usize);
        let mut encode = |plain: &[u8], n: &mut u64| {
            let b = encode_block(plain, &keys.block, &owner, layout, level, random_for(*n))
                .expect("encodes");
            *n += 1;
            bytes += b.fragments.iter().map(Vec::len).sum::<usize>();
        };
        for file in &files {
            for piece in file.chunks(MIB) {
                chunker.feed(piece);
                while let Some(c) = chunker.next_chunk() {
                    let id = ChunkId::of(&keys.chunk_id, c);
                    if let Some(b) = packer.add(id, c).expect("chunk fits") {
                        encode(&b.plain, &mut n);
                    }
                }
            }
            chunker.finish();
            while let Some(c) = chunker.next_chunk() {
                let id = ChunkId::of(&keys.chunk_id, c);
                if let Some(b) = packer.add(id, c).expect("chunk fits") {
                    encode(&b.plain, &mut n);
                }
            }
        }
        if let Some(b) = packer.finish() {
            encode(&b.plain, &mut n);
        }
        stored = bytes;
        blocks_out = n as usize;
        start.elapsed()
    });
    println!(
        "pipeline (chunk+id+pack+zstd+pad+seal+RS+sign): {:.1} MB/s  ({} blocks, fragments = {:.2}x input)",
        mb_per_s(total, pipeline),
        blocks_out,
        stored as f64 / total as f64
    );

    // Plain blocks for the per-stage figures and the restore direction.
    {
        let mut packer = Packer::new(DEFAULT_BLOCK_SIZE).expect("valid");
        for file in &files {
            let mut chunker = Chunker::new(params).expect("valid");
            chunker.feed(file);
            chunker.finish();
            while let Some(c) = chunker.next_chunk() {
                plain_blocks.extend(packer.add(ChunkId::of(&keys.chunk_id, c), c).expect("fits"));
            }
        }
        plain_blocks.extend(packer.finish());
    }
    let encoded: Vec<_> = plain_blocks
        .iter()
        .enumerate()
        .map(|(n, b)| {
            encode_block(
                &b.plain,
                &keys.block,
                &owner,
                layout,
                level,
                random_for(n as u64),
            )
            .expect("encodes")
        })
        .collect();
    let public = owner.verifying_key();
    let restore = best(runs, || {
        let start = Instant::now();
        let mut out = 0usize;
        for b in &encoded {
            let manifest = BlockManifest::verify(&b.signed_manifest, &public).expect("valid");
            // Two fragments lost: decode from positions 1, 2, 4, 5 (one data fragment rebuilt).
            let given: Vec<Option<&[u8]>> = b
                .fragments
                .iter()
                .enumerate()
                .map(|(i, f)| (i != 0 && i != 3).then_some(&f[..]))
                .collect();
            let plain = decode_block(&given, &manifest, &keys.block)
                .expect("decodes")
                .plain;
            out += PackedBlock::parse(&plain).expect("parses").chunks().len();
        }
        assert!(out > 0);
        start.elapsed()
    });
    println!(
        "restore direction (verify+RS decode, 2 lost+open+unpad+unzstd+parse): {:.1} MB/s",
        mb_per_s(total, restore)
    );
    drop(encoded);

    let chunking = best(runs, || {
        let start = Instant::now();
        let mut chunker = Chunker::new(params).expect("valid");
        let mut count = 0usize;
        for file in &files {
            for piece in file.chunks(MIB) {
                chunker.feed(piece);
                while chunker.next_chunk().is_some() {
                    count += 1;
                }
            }
            chunker.finish();
            while chunker.next_chunk().is_some() {
                count += 1;
            }
        }
        assert!(count > 0);
        start.elapsed()
    });
    println!(
        "chunking alone (FastCDC, streamed in 1 MiB feeds): {:.1} MB/s",
        mb_per_s(total, chunking)
    );

    let ids = best(runs, || {
        let start = Instant::now();
        let mut x = 0u8;
        for file in &files {
            x ^= ChunkId::of(&keys.chunk_id, file).0[0];
        }
        std::hint::black_box(x);
        start.elapsed()
    });
    println!(
        "chunk ids alone (keyed BLAKE3): {:.1} MB/s",
        mb_per_s(total, ids)
    );

    let mut compressed_len = 0usize;
    let zstd = best(runs, || {
        let start = Instant::now();
        compressed_len = plain_blocks
            .iter()
            .map(|b| {
                compress::compress(&b.plain, level)
                    .expect("compresses")
                    .len()
            })
            .sum();
        start.elapsed()
    });
    println!(
        "zstd alone (level {level}, raw when not smaller): {:.1} MB/s  (output {:.2}x input)",
        mb_per_s(total, zstd),
        compressed_len as f64 / total as f64
    );

    let cipher = keys.block.cipher();
    let mut buf = vec![0xa5u8; DEFAULT_BLOCK_SIZE];
    let blocks = total / DEFAULT_BLOCK_SIZE;
    let aead = best(runs, || {
        let start = Instant::now();
        for n in 0..blocks {
            let nonce = random_for(n as u64).nonce;
            let tag = cipher
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), b"ad", &mut buf)
                .expect("encrypts");
            std::hint::black_box(tag);
        }
        start.elapsed()
    });
    println!(
        "XChaCha20-Poly1305 alone (4 MiB in place): {:.1} MB/s",
        mb_per_s(blocks * DEFAULT_BLOCK_SIZE, aead)
    );

    let root = PathBuf::from(std::env::var("BENCH_TREE").unwrap_or("/usr/share/doc".into()));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = env_or::<usize>("BENCH_WORKERS", cores).max(1);
    let (elapsed, t, staged) = tree(root.clone(), workers, level);
    println!(
        "tree {} (Pipeline: walk+read+chunk+id+dedup+pack | {workers} encoders+stage+fsync): \
         {:.1} MB/s of file bytes  ({} files, {} dirs, {:.1} MB, {:.1} MB new, {} blocks, \
         staged = {:.2}x file bytes, {:.2} s)",
        root.display(),
        t.bytes as f64 / elapsed.as_secs_f64() / 1e6,
        t.files,
        t.dirs,
        t.bytes as f64 / 1e6,
        t.new_bytes as f64 / 1e6,
        t.new_blocks,
        staged as f64 / t.bytes.max(1) as f64,
        elapsed.as_secs_f64()
    );

    let sealed = vec![0x5au8; DEFAULT_BLOCK_SIZE];
    let rs = best(runs, || {
        let start = Instant::now();
        for _ in 0..blocks {
            std::hint::black_box(erasure::encode(&sealed, layout).expect("encodes"));
        }
        start.elapsed()
    });
    println!(
        "Reed-Solomon {}+{} encode alone (incl. splitting into fragments): {:.1} MB/s",
        layout.k(),
        layout.m(),
        mb_per_s(blocks * DEFAULT_BLOCK_SIZE, rs)
    );
}
