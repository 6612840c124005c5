//! The encoder threads (seal a finished block, stage and fsync its fragments) and the emitter
//! thread (sends the walker's items to the job in the walker's order).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use futures::future::{Either, select};
use rand::RngCore;

use super::{
    Counters, PipelineError, PipelineEvent, PipelineKeys, Shared, StagedBlock, staged_path,
};
use crate::data::{BlockId, BlockRandom, ChunkId, Layout, audit, encode_block, stored};
use crate::store::catalog::{BlockEntry, FileEntry, FragmentPlace, Skipped};

/// A finished plain block for an encoder; the result goes to the emitter through `done`.
pub(super) struct Job {
    pub plain: Vec<u8>,
    pub chunks: Vec<(ChunkId, u32)>,
    pub done: SyncSender<StagedBlock>,
}

/// What the walker hands the emitter, in order.
pub(super) enum Item {
    /// A block being sealed: its result arrives on the receiver (dropped sender = failed).
    Block(Receiver<StagedBlock>),
    File(FileEntry),
    Skipped(Skipped),
    /// The walk is over and every earlier item is final.
    Done,
}

pub(super) struct Encoder {
    pub shared: Arc<Shared>,
    pub keys: Arc<PipelineKeys>,
    pub layout: Layout,
    pub zstd_level: i32,
    pub outbox: PathBuf,
    pub jobs: Arc<Mutex<Receiver<Job>>>,
}

impl Encoder {
    pub fn run(self) {
        loop {
            // Hold the lock only to take a job, not while sealing it.
            let job = match self.jobs.lock() {
                Ok(jobs) => jobs.recv(),
                Err(_) => return,
            };
            let Ok(job) = job else { return };
            if self.shared.halt.is_cancelled() {
                return;
            }
            match self.seal(job.plain, job.chunks) {
                // The emitter may be gone (cancelled): nothing to do then.
                Ok(staged) => drop(job.done.send(staged)),
                Err(e) => {
                    self.shared.fail(e);
                    return;
                }
            }
        }
    }

    fn seal(
        &self,
        plain: Vec<u8>,
        chunks: Vec<(ChunkId, u32)>,
    ) -> Result<StagedBlock, PipelineError> {
        let mut random = BlockRandom {
            id: BlockId([0; 32]),
            nonce: [0; 24],
        };
        let mut rng = rand::rngs::OsRng;
        rng.try_fill_bytes(&mut random.id.0)
            .map_err(PipelineError::Random)?;
        rng.try_fill_bytes(&mut random.nonce)
            .map_err(PipelineError::Random)?;
        let encoded = encode_block(
            &plain,
            &self.keys.data.block,
            &self.keys.owner,
            self.layout,
            self.zstd_level,
            random,
        )
        .map_err(PipelineError::Encode)?;
        drop(plain);
        let dir = self.outbox.join(encoded.id.to_string());
        let stage_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PipelineError::Stage { path, source }
        };
        std::fs::create_dir(&dir).map_err(stage_err(&dir))?;
        // Write every fragment, then flush them: the kernel writes them back together instead of
        // one fsync round trip after another. fdatasync suffices for a new file's bytes (its
        // length is flushed with them); the names are made durable by the directory syncs below.
        let mut fragments = Vec::with_capacity(encoded.fragments.len());
        let mut pairs = Vec::with_capacity(encoded.fragments.len());
        let mut files = Vec::with_capacity(encoded.fragments.len());
        for (position, fragment) in encoded.fragments.iter().enumerate() {
            let path = staged_path(&self.outbox, &encoded.id, position as u32);
            let bytes = stored::wrap(&encoded.signed_manifest, fragment);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(stage_err(&path))?;
            file.write_all(&bytes).map_err(stage_err(&path))?;
            fragments.push(FragmentPlace {
                supplier: None,
                size: bytes.len() as u64,
                blake3: *blake3::hash(&bytes).as_bytes(),
            });
            // The monitor's audit pairs, while the bytes are in hand (not read back later).
            pairs.push(audit::pairs_for(&bytes, &mut rand::thread_rng()));
            files.push((file, path));
        }
        for (file, path) in files {
            file.sync_data().map_err(stage_err(&path))?;
        }
        // The new names must survive a crash too: the block's directory, and its entry in the
        // outbox.
        sync_dir(&dir).map_err(stage_err(&dir))?;
        sync_dir(&self.outbox).map_err(stage_err(&self.outbox))?;
        Counters::add(&self.shared.counters.new_blocks, 1);
        Ok(StagedBlock {
            entry: BlockEntry {
                id: encoded.id,
                signed_manifest: encoded.signed_manifest,
                data_shards: self.layout.k() as u32,
                parity_shards: self.layout.m() as u32,
                plain_len: encoded.plain_len as u64,
                fragments,
            },
            chunks,
            pairs,
        })
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(super) struct Emitter {
    pub shared: Arc<Shared>,
    pub items: Receiver<Item>,
    pub events: tokio::sync::mpsc::Sender<PipelineEvent>,
}

impl Emitter {
    pub fn run(self) {
        let mut done = false;
        for item in self.items.iter() {
            if self.shared.halt.is_cancelled() {
                break;
            }
            let event = match item {
                Item::Block(result) => match result.recv() {
                    Ok(staged) => PipelineEvent::Block(staged),
                    // The encoder failed (its error is recorded) or was halted.
                    Err(_) => break,
                },
                Item::File(entry) => PipelineEvent::File(entry),
                Item::Skipped(skipped) => PipelineEvent::Skipped(skipped),
                Item::Done => {
                    done = true;
                    PipelineEvent::Done(self.shared.counters.snapshot())
                }
            };
            if !self.send(event) || done {
                break;
            }
        }
        if !done {
            // Every thread stops: either a fatal error (sent as `Failed`) or a cancel.
            self.shared.stop();
            if let Some(error) = self.shared.take_failure() {
                self.send(PipelineEvent::Failed(error));
            } else if !self.shared.cancelled.is_cancelled() {
                // Items ended without Done or a recorded error: a thread died.
                self.send(PipelineEvent::Failed(PipelineError::Internal));
            }
        }
    }

    /// Sends with backpressure; gives up (and stops everything) on cancel or when the receiver
    /// is gone. Waiting for room races with the cancel, so no event is sent after `cancel`
    /// returns (an event already in the channel stays).
    fn send(&self, event: PipelineEvent) -> bool {
        let permit = futures::executor::block_on(async {
            let cancelled = std::pin::pin!(self.shared.cancelled.cancelled());
            let reserve = std::pin::pin!(self.events.reserve());
            match select(cancelled, reserve).await {
                Either::Left(_) => None,
                Either::Right((permit, _)) => permit.ok(),
            }
        });
        match permit {
            Some(permit) if !self.shared.cancelled.is_cancelled() => {
                permit.send(event);
                true
            }
            _ => {
                self.shared.stop();
                false
            }
        }
    }
}
