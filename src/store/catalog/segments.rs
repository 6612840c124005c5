//! The catalog as the suppliers hold it: **segments**, so that what a snapshot uploads grows
//! with what changed, not with the tree.
//!
//! A stored catalog (what the recovery record's blocks hold, concatenated) is a sequence of
//! segments, each written as it is made (nothing holds a whole one) and checksummed on its own:
//! ```text
//! magic "BDCATLG\0" | version 2 | kind u8 | [tree: snapshot u64 | base u64 (0: whole)]
//!   | items | b'.' | BLAKE3 of every byte before (32)
//! ```
//! Integers are big-endian; a field is `u32 length | bytes`.
//! - kind 1, a **tree**: one snapshot's file tree, whole or as the changes from an earlier
//!   snapshot's tree (its *base*, which comes earlier in the same catalog). Items:
//!   `b'#' | block id (32)` adds a block to the segment's table (before the first put naming
//!   it); `b'+' | path | file record | n u32 | n × u32` is an entry, with for each of its chunks
//!   the index of its block in the table (`u32::MAX`: unknown); `b'-' | path` is a path the base
//!   has and this tree does not. Entries and removals are in strictly increasing path order.
//!   The chunk index is not stored: an import rebuilds it from the puts.
//! - kind 0, the **head**: every catalog entry but trees and the chunk index (snapshot records,
//!   the block index, the counter, the format), and the current entry of each chunk stored
//!   again in another block since a tree named it (`catalog::mark_remapped`: a block placed to
//!   fewer than `k` suppliers is not reused; an unchanged file naming such a chunk is no change
//!   to a tree). Items: `b'e' | key | value`.
//!
//! A snapshot's tree segment is made once, when it is first uploaded, and is kept on the
//! suppliers while that snapshot, or one whose segment is built on it, is kept. So a backup
//! uploads the new snapshot's changes and the head (a few hundred bytes per block), and an
//! unchanged snapshot costs nothing the next time. A chain is at most [`MAX_DEPTH`] segments
//! long: the next one is whole, and the old chain is freed once nothing kept stands on it.
//! Import applies trees first (in order), then the head, then drops the trees of snapshots the
//! head does not list (bases kept only for their changes). A version-1 export (one whole
//! catalog, before segments) is still imported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};

use super::{
    CF, CHUNK_ID_LEN, CatalogError, EXPORT_MAGIC, KvPages, KvStore, PAGE, Records, SnapshotId,
    StoreError, TAG_CHUNK, TAG_FILE, TAG_REMAPPED, TAG_SNAPSHOT, Writes, chunk_blocks_of, codec,
    file_key, put_chunk, records, snapshot_prefix,
};
use crate::data::{BlockId, ChunkId};

pub(super) const SEGMENT_VERSION: u8 = 2;
const KIND_HEAD: u8 = 0;
const KIND_TREE: u8 = 1;
const SEGMENT_HEADER: usize = EXPORT_MAGIC.len() + 1 + 1;
const SEGMENT_SUM: usize = 32;
const OP_PUT: u8 = b'+';
const OP_DELETE: u8 = b'-';
const OP_BLOCK: u8 = b'#';
const OP_ENTRY: u8 = b'e';
const END: u8 = b'.';
/// A chunk whose block the index did not know when the segment was made.
const UNKNOWN_BLOCK: u32 = u32::MAX;
/// The longest chain of segments before a whole tree is stored again: bounds what a recovery
/// replays and what old segments the suppliers keep.
pub const MAX_DEPTH: u32 = 16;
/// The head's entries, by tag, in key order: everything but trees (`t`) and chunks (`c`).
const HEAD_TAGS: [&[u8]; 4] = [b"b", b"n", b"s", b"v"];

/// One snapshot's tree segment as uploaded: where it is and what it stands on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub snapshot: SnapshotId,
    /// The snapshot whose tree this one's changes apply to (`None`: the whole tree).
    pub base: Option<SnapshotId>,
    pub source: String,
    /// Segments between this one and a whole tree (0 for a whole one).
    pub depth: u32,
    /// The catalog blocks holding its bytes, in order.
    pub blocks: Vec<BlockId>,
    /// Length of its bytes.
    pub len: u64,
}

/// A tree segment to make in this upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSegment {
    pub snapshot: SnapshotId,
    pub base: Option<SnapshotId>,
    pub source: String,
    pub depth: u32,
}

/// What an upload keeps of the segments already stored, and which it makes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentPlan {
    /// Stored segments still needed, in their order (a base before what stands on it).
    pub keep: Vec<Segment>,
    /// Segments to make, in snapshot order (after every kept one).
    pub new: Vec<NewSegment>,
}

/// Which segments an upload keeps and makes. `stored`: the segments of the last upload, in
/// order; `committed`: every committed snapshot with its source; `intact`: whether a stored
/// segment's blocks are all still known (one that is not is made again, with everything that
/// stands on it). Each committed snapshot without a segment gets one built on the newest
/// segment of its source below it, unless that chain is [`MAX_DEPTH`] long; a stored segment
/// is kept while its snapshot is committed or a kept segment stands on it.
pub fn plan(
    stored: &[Segment],
    committed: &[(SnapshotId, String)],
    intact: impl Fn(&Segment) -> bool,
) -> SegmentPlan {
    // Usable: intact, and standing on a usable segment stored before it.
    let mut usable: BTreeMap<SnapshotId, &Segment> = BTreeMap::new();
    let mut order = Vec::new();
    for segment in stored {
        let base_ok = segment.base.is_none_or(|b| usable.contains_key(&b));
        if base_ok && intact(segment) && !usable.contains_key(&segment.snapshot) {
            usable.insert(segment.snapshot, segment);
            order.push(segment.snapshot);
        }
    }
    // (snapshot, source, depth) of every segment a new one may stand on: only a committed
    // snapshot's, whose tree is still here to compare with (a segment kept for what stands on
    // it may have lost its tree to retention; a diff against nothing would drop no path).
    let is_committed: BTreeSet<SnapshotId> = committed.iter().map(|(id, _)| *id).collect();
    let mut bases: Vec<(SnapshotId, &str, u32)> = usable
        .values()
        .filter(|s| is_committed.contains(&s.snapshot))
        .map(|s| (s.snapshot, s.source.as_str(), s.depth))
        .collect();
    let mut new = Vec::new();
    let mut sorted: Vec<&(SnapshotId, String)> = committed.iter().collect();
    sorted.sort();
    for (snapshot, source) in sorted {
        if usable.contains_key(snapshot) {
            continue;
        }
        let base = bases
            .iter()
            .filter(|(id, s, _)| id < snapshot && *s == source.as_str())
            .max_by_key(|(id, _, _)| *id)
            .filter(|(_, _, depth)| depth + 1 < MAX_DEPTH);
        let (base, depth) = match base {
            Some((id, _, depth)) => (Some(*id), depth + 1),
            None => (None, 0),
        };
        new.push(NewSegment {
            snapshot: *snapshot,
            base,
            source: source.clone(),
            depth,
        });
        bases.push((*snapshot, source.as_str(), depth));
    }
    // Needed: committed snapshots' segments and, transitively, what they stand on.
    let base_of: HashMap<SnapshotId, Option<SnapshotId>> = usable
        .values()
        .map(|s| (s.snapshot, s.base))
        .chain(new.iter().map(|n| (n.snapshot, n.base)))
        .collect();
    let mut needed = BTreeSet::new();
    for (snapshot, _) in committed {
        let mut at = Some(*snapshot);
        while let Some(id) = at {
            if !needed.insert(id) {
                break;
            }
            at = base_of.get(&id).copied().flatten();
        }
    }
    SegmentPlan {
        keep: order
            .into_iter()
            .filter(|id| needed.contains(id))
            .filter_map(|id| usable.get(&id).map(|s| (*s).clone()))
            .collect(),
        new,
    }
}

fn write_error(e: std::io::Error) -> StoreError {
    StoreError::Db(format!("cannot write a catalog segment: {e}"))
}

/// Writes one segment to `out` as it is made, hashing what it writes.
struct SegmentWriter<'w, W: std::io::Write> {
    out: &'w mut W,
    hasher: blake3::Hasher,
    len: u64,
}

impl<'w, W: std::io::Write> SegmentWriter<'w, W> {
    fn start(out: &'w mut W, kind: u8) -> Result<Self, StoreError> {
        let mut writer = SegmentWriter {
            out,
            hasher: blake3::Hasher::new(),
            len: 0,
        };
        writer.bytes(EXPORT_MAGIC)?;
        writer.bytes(&[SEGMENT_VERSION, kind])?;
        Ok(writer)
    }

    fn bytes(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(bytes);
        self.out.write_all(bytes).map_err(write_error)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn field(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| StoreError::Db("a catalog entry is over 4 GiB".into()))?;
        self.bytes(&len.to_be_bytes())?;
        self.bytes(bytes)
    }

    /// Ends the segment; its length.
    fn finish(mut self) -> Result<u64, StoreError> {
        self.bytes(&[END])?;
        let sum = self.hasher.finalize();
        self.out.write_all(sum.as_bytes()).map_err(write_error)?;
        Ok(self.len + SEGMENT_SUM as u64)
    }
}

/// Writes the head segment to `out`: every entry but trees and the chunk index, read a page at
/// a time; with `snapshots`, only those snapshots' records (the ones whose trees the catalog
/// holds: a version committed while the trees were written is in the next one). Returns its
/// length.
pub fn write_head(
    kv: &dyn KvStore,
    snapshots: Option<&BTreeSet<SnapshotId>>,
    out: &mut impl std::io::Write,
) -> Result<u64, StoreError> {
    let mut w = SegmentWriter::start(out, KIND_HEAD)?;
    for tag in HEAD_TAGS {
        for page in kv.pages(CF, tag, PAGE) {
            for (k, v) in page? {
                if let Some(wanted) = snapshots
                    && tag == TAG_SNAPSHOT
                    && let Some(id) = k.get(1..9).and_then(|b| b.try_into().ok())
                    && !wanted.contains(&SnapshotId(u64::from_be_bytes(id)))
                {
                    continue;
                }
                w.bytes(&[OP_ENTRY])?;
                w.field(&k)?;
                w.field(&v)?;
            }
        }
    }
    // Chunks stored again in another block since a tree segment named their first one.
    for page in kv.pages(CF, TAG_REMAPPED, PAGE) {
        for (k, _) in page? {
            let key = [TAG_CHUNK, &k[TAG_REMAPPED.len()..]].concat();
            if let Some(v) = kv.get(CF, &key)? {
                w.bytes(&[OP_ENTRY])?;
                w.field(&key)?;
                w.field(&v)?;
            }
        }
    }
    w.finish()
}

/// [`write_head`] into memory.
pub fn export_head(kv: &dyn KvStore) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    write_head(kv, None, &mut out)?;
    Ok(out)
}

/// [`write_head`] of `snapshots` only, into memory.
pub fn export_head_of(
    kv: &dyn KvStore,
    snapshots: &BTreeSet<SnapshotId>,
) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    write_head(kv, Some(snapshots), &mut out)?;
    Ok(out)
}

/// A snapshot's tree entries as (path, record bytes), a page at a time.
fn tree_entries(kv: &dyn KvStore, snapshot: SnapshotId) -> Records<'_, (Vec<u8>, Vec<u8>)> {
    fn raw(k: &[u8], v: &[u8]) -> Result<(Vec<u8>, Vec<u8>), CatalogError> {
        let path = k.get(TAG_FILE.len() + 8..).ok_or(CatalogError::Key)?;
        Ok((path.to_vec(), v.to_vec()))
    }
    Records::new(kv, &snapshot_prefix(snapshot), raw, "file")
}

/// The chunk ids of a file record (none if it does not decode: it is stored as it is).
pub(crate) fn record_chunks(value: &[u8]) -> Vec<ChunkId> {
    let Ok(r) = codec::decode::<records::FileRecord>(value) else {
        return Vec::new();
    };
    if !r.chunks.len().is_multiple_of(CHUNK_ID_LEN) {
        return Vec::new();
    }
    r.chunks
        .chunks_exact(CHUNK_ID_LEN)
        .filter_map(|c| c.try_into().ok().map(ChunkId))
        .collect()
}

/// One difference between a snapshot's tree and its base's.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// An entry the base does not have, or has with other bytes (path, file record).
    Put { path: Vec<u8>, value: Vec<u8> },
    /// A path the base has and the snapshot does not.
    Delete { path: Vec<u8> },
}

type Entries<'a> =
    std::iter::Peekable<Box<dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + 'a>>;

/// The changes from one tree to another in path order, by one merge of their two key ranges
/// read a page at a time: what a tree segment stores, and what the monitor looks up.
pub struct Changes<'a> {
    mine: Entries<'a>,
    theirs: Entries<'a>,
}

/// The changes from `base`'s tree to `snapshot`'s; without a base, every entry of `snapshot`.
pub fn changes(kv: &dyn KvStore, snapshot: SnapshotId, base: Option<SnapshotId>) -> Changes<'_> {
    fn boxed<'a>(
        entries: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + 'a,
    ) -> Entries<'a> {
        let entries: Box<dyn Iterator<Item = _> + 'a> = Box::new(entries);
        entries.peekable()
    }
    Changes {
        mine: boxed(tree_entries(kv, snapshot)),
        theirs: match base {
            Some(base) => boxed(tree_entries(kv, base)),
            None => boxed(std::iter::empty()),
        },
    }
}

impl Iterator for Changes<'_> {
    type Item = Result<Change, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering;
        loop {
            let order = match (self.mine.peek(), self.theirs.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) => return self.mine.next().and_then(Result::err).map(Err),
                (_, Some(Err(_))) => return self.theirs.next().and_then(Result::err).map(Err),
                (Some(Ok(_)), None) => Ordering::Less,
                (None, Some(Ok(_))) => Ordering::Greater,
                (Some(Ok((a, _))), Some(Ok((b, _)))) => a.cmp(b),
            };
            match order {
                Ordering::Less => {
                    if let Some(Ok((path, value))) = self.mine.next() {
                        return Some(Ok(Change::Put { path, value }));
                    }
                }
                Ordering::Greater => {
                    if let Some(Ok((path, _))) = self.theirs.next() {
                        return Some(Ok(Change::Delete { path }));
                    }
                }
                Ordering::Equal => {
                    if let (Some(Ok((path, value))), Some(Ok((_, old)))) =
                        (self.mine.next(), self.theirs.next())
                        && value != old
                    {
                        return Some(Ok(Change::Put { path, value }));
                    }
                }
            }
        }
    }
}

/// Writes the tree segment of `snapshot` to `out` as it is made: its whole tree, or (with
/// `base`) its [`changes`] from `base`'s. Memory holds a page and the block table. Returns its
/// length.
pub fn write_tree(
    kv: &dyn KvStore,
    snapshot: SnapshotId,
    base: Option<SnapshotId>,
    out: &mut impl std::io::Write,
) -> Result<u64, StoreError> {
    if let Some(base) = base {
        let record = crate::store::codec::Key::new(TAG_SNAPSHOT).u64(base.0);
        if kv.get(CF, record.as_bytes())?.is_none() {
            return Err(StoreError::Db(format!(
                "the base of a tree segment (snapshot {}) is not in the catalog",
                base.0
            )));
        }
    }
    let mut w = SegmentWriter::start(out, KIND_TREE)?;
    w.bytes(&snapshot.0.to_be_bytes())?;
    w.bytes(&base.map_or(0, |b| b.0).to_be_bytes())?;
    let mut table: HashMap<BlockId, u32> = HashMap::new();
    let mut pending: Vec<(Change, Vec<ChunkId>)> = Vec::with_capacity(TREE_BATCH);
    for change in changes(kv, snapshot, base) {
        let change = change?;
        let chunks = match &change {
            Change::Put { value, .. } => record_chunks(value),
            Change::Delete { .. } => Vec::new(),
        };
        pending.push((change, chunks));
        if pending.len() >= TREE_BATCH {
            write_items(kv, &mut w, &mut table, &mut pending)?;
        }
    }
    write_items(kv, &mut w, &mut table, &mut pending)?;
    w.finish()
}

/// Items buffered while a tree segment is written: their chunks are looked up together, in
/// sorted order, so a batch reads each block of the chunk index it touches once. Larger batches
/// touch fewer blocks per chunk (a million files: 4,096 took 14.6 s, most of it index reads);
/// this one holds ~15 MB.
const TREE_BATCH: usize = 64 * 1024;

/// Writes buffered changes as items, their chunks' blocks looked up in one sorted batch; a
/// block new to the segment's table is declared before the first put naming it.
fn write_items<W: std::io::Write>(
    kv: &dyn KvStore,
    w: &mut SegmentWriter<'_, W>,
    table: &mut HashMap<BlockId, u32>,
    pending: &mut Vec<(Change, Vec<ChunkId>)>,
) -> Result<(), StoreError> {
    let chunks: Vec<ChunkId> = pending
        .iter()
        .flat_map(|(_, c)| c.iter().copied())
        .collect();
    let blocks: HashMap<ChunkId, BlockId> = chunk_blocks_of(kv, chunks)?
        .into_iter()
        .filter_map(|(c, b)| b.map(|b| (c, b)))
        .collect();
    let mut refs = Vec::new();
    for (change, chunks) in pending.drain(..) {
        match change {
            Change::Put { path, value } => {
                refs.clear();
                for chunk in chunks {
                    let at = match blocks.get(&chunk) {
                        Some(block) => match table.get(block) {
                            Some(at) => *at,
                            None => {
                                let at = table.len() as u32;
                                table.insert(*block, at);
                                w.bytes(&[OP_BLOCK])?;
                                w.bytes(&block.0)?;
                                at
                            }
                        },
                        None => UNKNOWN_BLOCK,
                    };
                    refs.extend_from_slice(&at.to_be_bytes());
                }
                w.bytes(&[OP_PUT])?;
                w.field(&path)?;
                w.field(&value)?;
                w.bytes(&((refs.len() / 4) as u32).to_be_bytes())?;
                w.bytes(&refs)?;
            }
            Change::Delete { path } => {
                w.bytes(&[OP_DELETE])?;
                w.field(&path)?;
            }
        }
    }
    Ok(())
}

/// [`write_tree`] into memory.
pub fn export_tree(
    kv: &dyn KvStore,
    snapshot: SnapshotId,
    base: Option<SnapshotId>,
) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    write_tree(kv, snapshot, base, &mut out)?;
    Ok(out)
}

/// One op of a tree segment.
#[derive(Debug)]
enum Op {
    Put {
        path: Vec<u8>,
        value: Vec<u8>,
        refs: Vec<u8>,
    },
    Delete {
        path: Vec<u8>,
    },
}

impl Op {
    fn path(&self) -> &[u8] {
        match self {
            Op::Put { path, .. } | Op::Delete { path } => path,
        }
    }
}

/// A tree segment, checked: what it stands on, its block table, where its items are.
#[derive(Debug)]
struct Tree {
    snapshot: SnapshotId,
    base: Option<SnapshotId>,
    table: Vec<BlockId>,
    /// Where its items are (after the header, before the end mark), checked (framing, path
    /// order, refs inside the table) and read again by [`tree_ops`] when applied: a stored
    /// catalog is read from a file, never held (132 MB raw at a million files).
    items: std::ops::Range<u64>,
    /// Where the segment's bytes are in the stored catalog.
    at: std::ops::Range<u64>,
}

/// A checked stored catalog: its trees in order and its heads' entries.
#[derive(Debug, Default)]
struct Parsed {
    trees: Vec<Tree>,
    head: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Reads a stored catalog, hashing what it reads since the segment began.
struct Reader<R> {
    r: R,
    pos: u64,
    len: u64,
    sum: blake3::Hasher,
}

impl<R: Read + Seek> Reader<R> {
    fn new(mut r: R) -> Result<Self, CatalogError> {
        let len = r.seek(SeekFrom::End(0))?;
        r.seek(SeekFrom::Start(0))?;
        Ok(Reader {
            r,
            pos: 0,
            len,
            sum: blake3::Hasher::new(),
        })
    }

    fn seek(&mut self, to: u64) -> Result<(), CatalogError> {
        self.r.seek(SeekFrom::Start(to))?;
        self.pos = to;
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), CatalogError> {
        if buf.len() as u64 > self.len - self.pos {
            return Err(CatalogError::ExportTruncated);
        }
        self.r.read_exact(buf)?;
        self.sum.update(buf);
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CatalogError> {
        let mut out = [0; N];
        self.fill(&mut out)?;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, CatalogError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, CatalogError> {
        self.array::<4>()
            .map(u32::from_be_bytes)
            .map_err(|_| CatalogError::ExportFraming(what))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, CatalogError> {
        self.array::<8>()
            .map(u64::from_be_bytes)
            .map_err(|_| CatalogError::ExportFraming(what))
    }

    /// A length-prefixed field (no longer than what is left: the length is not trusted).
    fn field(&mut self) -> Result<Vec<u8>, CatalogError> {
        let len = self.u32("a length runs past the end")? as u64;
        if len > self.len - self.pos {
            return Err(CatalogError::ExportFraming("an entry runs past the end"));
        }
        self.bytes(len)
    }

    /// Up to `n` bytes, no more than what is left.
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, CatalogError> {
        if n > self.len - self.pos {
            return Err(CatalogError::ExportTruncated);
        }
        let mut out = vec![0; n as usize];
        self.fill(&mut out)?;
        Ok(out)
    }
}

/// One item of a tree segment.
enum Item {
    End,
    Block(BlockId),
    Op(Op),
}

/// Reads one item of a tree segment (framing only).
fn next_item<R: Read + Seek>(r: &mut Reader<R>) -> Result<Item, CatalogError> {
    Ok(match r.byte()? {
        END => Item::End,
        OP_BLOCK => Item::Block(BlockId(r.array::<32>()?)),
        OP_PUT => {
            let path = r.field()?;
            let value = r.field()?;
            let count = u64::from(r.u32("a put's refs")?);
            let refs = r.bytes(count * 4)?;
            Item::Op(Op::Put { path, value, refs })
        }
        OP_DELETE => Item::Op(Op::Delete { path: r.field()? }),
        _ => return Err(CatalogError::ExportFraming("an unknown tree item")),
    })
}

/// A tree's items, up to and with the end mark: checked whole, not kept.
fn parse_tree<R: Read + Seek>(r: &mut Reader<R>) -> Result<Tree, CatalogError> {
    let snapshot = r.u64("a tree segment's snapshot")?;
    let base = r.u64("a tree segment's base")?;
    if snapshot == 0 || base >= snapshot {
        return Err(CatalogError::ExportFraming(
            "a tree segment's snapshot or base",
        ));
    }
    let start = r.pos;
    let mut table: Vec<BlockId> = Vec::new();
    let mut last: Option<Vec<u8>> = None;
    loop {
        let op = match next_item(r)? {
            Item::End => break,
            Item::Block(id) => {
                table.push(id);
                continue;
            }
            Item::Op(op) => op,
        };
        if let Op::Put { refs, .. } = &op
            && refs
                .chunks_exact(4)
                .map(|r| u32::from_be_bytes([r[0], r[1], r[2], r[3]]))
                .any(|r| r != UNKNOWN_BLOCK && r as usize >= table.len())
        {
            return Err(CatalogError::ExportFraming("a ref outside the block table"));
        }
        if last.as_deref().is_some_and(|last| last >= op.path()) {
            return Err(CatalogError::ExportFraming("tree items out of path order"));
        }
        last = Some(match op {
            Op::Put { path, .. } | Op::Delete { path } => path,
        });
    }
    Ok(Tree {
        snapshot: SnapshotId(snapshot),
        base: (base != 0).then_some(SnapshotId(base)),
        table,
        // Without the end mark.
        items: start..r.pos - 1,
        at: 0..0,
    })
}

/// A tree's puts and deletes in path order, read again from the stored catalog (checked by
/// [`parse_tree`]: a read error ends them, and the import reports it).
fn tree_ops<'r, R: Read + Seek>(
    r: &'r mut Reader<R>,
    tree: &Tree,
    failed: &'r mut Option<CatalogError>,
) -> impl Iterator<Item = Op> + 'r {
    let end = tree.items.end;
    let mut sought = Some(tree.items.start);
    std::iter::from_fn(move || {
        if let Some(at) = sought.take()
            && let Err(e) = r.seek(at)
        {
            *failed = Some(e);
            return None;
        }
        while r.pos < end {
            match next_item(r) {
                Ok(Item::Op(op)) => return Some(op),
                Ok(Item::Block(_)) => continue,
                Ok(Item::End) => return None,
                Err(e) => {
                    *failed = Some(e);
                    return None;
                }
            }
        }
        None
    })
}

/// A head's entries, up to and with the end mark.
fn parse_head<R: Read + Seek>(
    r: &mut Reader<R>,
    entries: &mut Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<(), CatalogError> {
    loop {
        match r.byte()? {
            END => return Ok(()),
            OP_ENTRY => {
                let k = r.field()?;
                let v = r.field()?;
                // Chunk entries come as corrections after the trees (remapped chunks).
                if k.is_empty() || k.starts_with(TAG_FILE) {
                    return Err(CatalogError::ExportFraming(
                        "a head entry that is not a head's",
                    ));
                }
                entries.push((k, v));
            }
            _ => return Err(CatalogError::ExportFraming("an unknown head item")),
        }
    }
}

/// Checks every segment of a stored catalog (framing, checksums, each base before what stands
/// on it) and returns where its trees are, and its heads' entries.
fn parse<R: Read + Seek>(r: &mut Reader<R>) -> Result<Parsed, CatalogError> {
    let mut parsed = Parsed::default();
    let mut seen = BTreeSet::new();
    while r.pos < r.len {
        let start = r.pos;
        r.sum = blake3::Hasher::new();
        if r.len - r.pos < SEGMENT_HEADER as u64 {
            return Err(CatalogError::ExportTruncated);
        }
        if &r.array::<8>()? != EXPORT_MAGIC {
            return Err(CatalogError::ExportMagic);
        }
        let version = r.byte()?;
        if version != SEGMENT_VERSION {
            return Err(CatalogError::ExportVersion(version));
        }
        let kind = r.byte()?;
        let mut tree = None;
        match kind {
            KIND_HEAD => parse_head(r, &mut parsed.head)?,
            KIND_TREE => tree = Some(parse_tree(r)?),
            _ => return Err(CatalogError::ExportFraming("an unknown segment kind")),
        }
        let covered = r.sum.finalize();
        let sum = r.array::<SEGMENT_SUM>()?;
        if covered.as_bytes() != &sum {
            return Err(CatalogError::ExportChecksum);
        }
        if let Some(mut tree) = tree {
            if tree.base.is_some_and(|b| !seen.contains(&b)) {
                return Err(CatalogError::ExportFraming(
                    "a tree segment before its base",
                ));
            }
            tree.at = start..r.pos;
            seen.insert(tree.snapshot);
            parsed.trees.push(tree);
        }
    }
    Ok(parsed)
}

impl Writes<'_> {
    /// The chunk entries a tree's put names (block refs into the tree's table).
    fn chunks(&mut self, tree: &Tree, value: &[u8], refs: &[u8]) -> Result<(), StoreError> {
        for (chunk, at) in record_chunks(value).iter().zip(refs.chunks_exact(4)) {
            let at = u32::from_be_bytes([at[0], at[1], at[2], at[3]]);
            if let Some(block) = tree.table.get(at as usize) {
                put_chunk(&mut self.batch, chunk, block);
                self.bytes += 70;
            }
        }
        self.maybe_flush()
    }
}

/// Writes one tree: its base's entries merged with its ops (read again from the stored
/// catalog), and the chunk entries its puts name.
fn apply_tree<R: Read + Seek>(
    writes: &mut Writes<'_>,
    tree: &Tree,
    r: &mut Reader<R>,
) -> Result<(), CatalogError> {
    let mut failed = None;
    let mut ops = tree_ops(r, tree, &mut failed).peekable();
    let apply = |writes: &mut Writes<'_>, op: &Op| -> Result<(), StoreError> {
        if let Op::Put { path, value, refs } = op {
            writes.put(file_key(tree.snapshot, path), value)?;
            writes.chunks(tree, value, refs)?;
        }
        Ok(())
    };
    if let Some(base) = tree.base {
        for entry in tree_entries(writes.kv, base) {
            let (path, value) = entry?;
            while let Some(op) = ops.next_if(|op| op.path() < path.as_slice()) {
                apply(writes, &op)?;
            }
            match ops.next_if(|op| op.path() == path.as_slice()) {
                Some(op) => apply(writes, &op)?,
                None => writes.put(file_key(tree.snapshot, &path), &value)?,
            }
        }
    }
    for op in ops.by_ref() {
        apply(writes, &op)?;
    }
    drop(ops);
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(writes.flush()?)
}

/// A tree segment an import applied, and where its bytes were in the stored catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedTree {
    pub snapshot: SnapshotId,
    pub base: Option<SnapshotId>,
    pub at: std::ops::Range<u64>,
}

/// The segments of a catalog recovered (or adopted) from a record, for the next upload to build
/// on and retention to keep: each imported tree with the record's blocks that hold exactly its
/// bytes (`blocks`: each block's id and plain length, in the record's order). A tree whose
/// bytes do not fall on block boundaries is left out (the next upload makes it again).
pub fn recovered(
    kv: &dyn KvStore,
    trees: &[ImportedTree],
    blocks: &[(BlockId, u64)],
) -> Result<Vec<Segment>, StoreError> {
    let mut starts = BTreeMap::new();
    let mut at = 0u64;
    for (i, (_, len)) in blocks.iter().enumerate() {
        starts.insert(at, i);
        at += len;
    }
    let mut source_of: HashMap<SnapshotId, String> = super::snapshots(kv)?
        .into_iter()
        .map(|s| (s.id, s.source))
        .collect();
    // A base kept only for what stands on it has the source of what stands on it.
    for tree in trees.iter().rev() {
        if let (Some(base), Some(source)) = (tree.base, source_of.get(&tree.snapshot).cloned()) {
            source_of.entry(base).or_insert(source);
        }
    }
    let mut depth: HashMap<SnapshotId, u32> = HashMap::new();
    let mut out = Vec::new();
    for tree in trees {
        let (Some(&first), Some(source)) =
            (starts.get(&tree.at.start), source_of.get(&tree.snapshot))
        else {
            continue;
        };
        let mut ids = Vec::new();
        let mut end = tree.at.start;
        for (id, len) in &blocks[first..] {
            if end >= tree.at.end {
                break;
            }
            ids.push(*id);
            end += len;
        }
        let d = match tree.base {
            None => 0,
            Some(base) => match depth.get(&base) {
                Some(d) => d + 1,
                None => continue,
            },
        };
        if end != tree.at.end {
            continue;
        }
        depth.insert(tree.snapshot, d);
        out.push(Segment {
            snapshot: tree.snapshot,
            base: tree.base,
            source: source.clone(),
            depth: d,
            blocks: ids,
            len: tree.at.end - tree.at.start,
        });
    }
    Ok(out)
}

/// Imports a stored catalog made of segments into `Cf::Catalog` (see the module doc); the
/// whole is checked before anything is written. Returns the number of entries written and the
/// trees applied.
pub(super) fn import<R: Read + Seek>(
    kv: &dyn KvStore,
    stored: R,
) -> Result<(u64, Vec<ImportedTree>), CatalogError> {
    let mut r = Reader::new(stored)?;
    let parsed = parse(&mut r)?;
    let head: Vec<(&[u8], &[u8])> = parsed
        .head
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    super::check_format(&head)?;
    let mut writes = Writes::new(kv);
    for tree in &parsed.trees {
        apply_tree(&mut writes, tree, &mut r)?;
    }
    let mut written = writes.written;
    written += super::write_entries(kv, head)?;
    // A base kept only for its changes: its snapshot is gone, so is its tree (never the tree of
    // a job running here under that id, nor a committed one: `drop_files` keeps those).
    let running: BTreeSet<SnapshotId> = super::jobs::jobs(kv)?
        .into_iter()
        .map(|j| j.snapshot)
        .collect();
    for tree in &parsed.trees {
        let record = crate::store::codec::Key::new(TAG_SNAPSHOT).u64(tree.snapshot.0);
        if kv.get(CF, record.as_bytes())?.is_none() && !running.contains(&tree.snapshot) {
            super::drop_files(kv, tree.snapshot)?;
        }
    }
    let trees = parsed
        .trees
        .iter()
        .map(|t| ImportedTree {
            snapshot: t.snapshot,
            base: t.base,
            at: t.at.clone(),
        })
        .collect();
    Ok((written, trees))
}

#[cfg(test)]
mod tests {
    use super::super::{
        BlockEntry, FileEntry, FileKind, FragmentPlace, Snapshot, chunk_block, commit_snapshot,
        files, put_block, put_file,
    };
    use super::*;

    /// The import of a stored catalog held in memory.
    fn import(kv: &dyn KvStore, bytes: &[u8]) -> Result<(u64, Vec<ImportedTree>), CatalogError> {
        super::import(kv, std::io::Cursor::new(bytes))
    }
    use crate::crypto::identity::NodeId;
    use crate::store::{Batch, MemStore};

    fn chunk(n: u32) -> ChunkId {
        let mut id = [0x5c; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        ChunkId(id)
    }

    fn block(n: u32) -> BlockId {
        let mut id = [0xb7; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        BlockId(id)
    }

    fn file(path: &str, chunks: &[u32], mtime: i64) -> FileEntry {
        FileEntry {
            path: path.as_bytes().to_vec(),
            kind: FileKind::File,
            mode: 0o640,
            mtime_ns: mtime,
            size: chunks.len() as u64 * 1000,
            chunks: chunks.iter().copied().map(chunk).collect(),
            ..FileEntry::default()
        }
    }

    fn snapshot(id: u64, source: &str) -> Snapshot {
        Snapshot {
            id: SnapshotId(id),
            source: source.into(),
            root: b"/src".to_vec(),
            started_at: 10 + id,
            finished_at: 20 + id,
            files: 3,
            dirs: 1,
            symlinks: 0,
            bytes: 3000,
            new_bytes: 1000,
            new_blocks: 1,
            skipped: Vec::new(),
        }
    }

    /// Snapshot 1: 300 files, chunk i in block i / 100. Snapshot 2 changes file 7, removes
    /// file 8, adds "f/new" (a new chunk in a new block). Both committed.
    fn two_versions() -> MemStore {
        let kv = MemStore::new();
        let mut b = Batch::new();
        for i in 0..300u32 {
            put_file(&mut b, SnapshotId(1), &file(&format!("f/{i:03}"), &[i], 1));
            put_chunk(&mut b, &chunk(i), &block(i / 100));
            if i != 8 {
                let changed = if i == 7 {
                    file("f/007", &[7, 1000], 2)
                } else {
                    file(&format!("f/{i:03}"), &[i], 1)
                };
                put_file(&mut b, SnapshotId(2), &changed);
            }
        }
        put_file(&mut b, SnapshotId(2), &file("f/new", &[1001], 3));
        for c in [1000, 1001] {
            put_chunk(&mut b, &chunk(c), &block(9));
        }
        for n in [0, 1, 2, 9] {
            put_block(
                &mut b,
                &BlockEntry {
                    id: block(n),
                    signed_manifest: vec![n as u8; 40],
                    data_shards: 2,
                    parity_shards: 1,
                    plain_len: 100,
                    fragments: (0..3u8)
                        .map(|i| FragmentPlace {
                            supplier: Some(NodeId::from_bytes([i + 1; 16])),
                            size: 60,
                            blake3: [i; 32],
                        })
                        .collect(),
                },
            );
        }
        commit_snapshot(&mut b, &snapshot(1, "docs"));
        commit_snapshot(&mut b, &snapshot(2, "docs"));
        kv.write(b).expect("write");
        kv
    }

    fn tree(kv: &dyn KvStore, id: u64) -> Vec<FileEntry> {
        files(kv, SnapshotId(id))
            .collect::<Result<_, _>>()
            .expect("tree")
    }

    fn all(kv: &dyn KvStore, prefix: &[u8]) -> Vec<crate::store::KeyValue> {
        kv.scan(CF, prefix, None, usize::MAX).expect("scan")
    }

    /// The two trees' segments, made while both are committed; then, with `drop_first`,
    /// version 1 is dropped (as retention does) before the head is written.
    fn stored_catalog(kv: &MemStore, drop_first: bool) -> (Vec<u8>, usize, usize) {
        let whole = export_tree(kv, SnapshotId(1), None).expect("tree 1");
        let diff = export_tree(kv, SnapshotId(2), Some(SnapshotId(1))).expect("tree 2");
        if drop_first {
            let record = crate::store::codec::Key::new(TAG_SNAPSHOT).u64(1);
            kv.delete(CF, record.as_bytes()).expect("delete");
            super::super::drop_files(kv, SnapshotId(1)).expect("drop");
        }
        let head = export_head(kv).expect("head");
        let (w, d) = (whole.len(), diff.len());
        ([whole, diff, head].concat(), w, d)
    }

    #[test]
    fn segments_import_to_the_same_trees_chunk_index_and_head() {
        let src = two_versions();
        let (bytes, whole, diff) = stored_catalog(&src, false);
        // The changes are three entries of 300: a small fraction of the whole tree.
        assert!(diff * 20 < whole, "diff {diff} bytes, whole {whole}");
        let dst = MemStore::new();
        import(&dst, &bytes).expect("import");
        assert_eq!(tree(&dst, 1), tree(&src, 1));
        assert_eq!(tree(&dst, 2), tree(&src, 2));
        for prefix in [b"c", b"b", b"s", b"n"] {
            assert_eq!(
                all(&dst, prefix),
                all(&src, prefix),
                "{}",
                prefix[0] as char
            );
        }
        // Through the public entry point too, which tells segments from a version-1 export.
        let again = MemStore::new();
        super::super::import(&again, &bytes).expect("import");
        assert_eq!(all(&again, b""), all(&dst, b""));
    }

    /// As a recovery has it: the fetched catalog in a file just written (so at its end), read
    /// from its start, twice, and never held.
    #[test]
    fn a_stored_catalog_imports_from_a_file_left_at_its_end() {
        use std::io::Write;
        let src = two_versions();
        let (bytes, _, _) = stored_catalog(&src, false);
        let mut file = tempfile::tempfile().expect("file");
        file.write_all(&bytes).expect("write");
        let from_file = MemStore::new();
        let (written, trees) =
            super::super::import_stored_from(&from_file, std::io::BufReader::new(&file))
                .expect("import");
        let from_bytes = MemStore::new();
        assert_eq!(
            (written, trees),
            import(&from_bytes, &bytes).expect("import")
        );
        assert_eq!(all(&from_file, b""), all(&from_bytes, b""));
        // Cut short, it is refused with nothing written.
        let short = tempfile::tempfile().expect("file");
        (&short)
            .write_all(&bytes[..bytes.len() - 1])
            .expect("write");
        let empty = MemStore::new();
        assert!(super::super::import_stored_from(&empty, &short).is_err());
        assert_eq!(all(&empty, b""), vec![]);
    }

    #[test]
    fn a_recovered_catalog_gives_back_its_segments_on_their_blocks() {
        let src = two_versions();
        let (bytes, whole, diff) = stored_catalog(&src, true);
        let dst = MemStore::new();
        let (_, trees) = import(&dst, &bytes).expect("import");
        let head = (bytes.len() - whole - diff) as u64;
        let (whole, diff) = (whole as u64, diff as u64);
        // The whole tree on two blocks, the changes on one, the head on one.
        let blocks = [
            (block(1), whole / 2),
            (block(2), whole - whole / 2),
            (block(3), diff),
            (block(4), head),
        ];
        let got = recovered(&dst, &trees, &blocks).expect("segments");
        let want = [
            Segment {
                snapshot: SnapshotId(1),
                base: None,
                source: "docs".into(),
                depth: 0,
                blocks: vec![block(1), block(2)],
                len: whole,
            },
            Segment {
                snapshot: SnapshotId(2),
                base: Some(SnapshotId(1)),
                source: "docs".into(),
                depth: 1,
                blocks: vec![block(3)],
                len: diff,
            },
        ];
        assert_eq!(got, want, "the base's source is that of what stands on it");
        // Bytes off the block boundaries: that tree (and what stands on it) is made again.
        let shifted = [
            (block(1), whole + 1),
            (block(3), diff - 1),
            (block(4), head),
        ];
        assert!(
            recovered(&dst, &trees, &shifted)
                .expect("segments")
                .is_empty()
        );
    }

    #[test]
    fn a_chunk_stored_again_elsewhere_is_corrected_by_the_head() {
        let src = two_versions();
        let (mut bytes, whole, diff) = stored_catalog(&src, false);
        // Chunk 5 (in block 0 for both trees) is stored again in block 7 after the segments.
        let mut b = Batch::new();
        put_chunk(&mut b, &chunk(5), &block(7));
        src.write(b).expect("write");
        super::super::mark_remapped(&src, &chunk(5)).expect("mark");
        bytes.truncate(whole + diff);
        bytes.extend(export_head(&src).expect("head"));
        let dst = MemStore::new();
        import(&dst, &bytes).expect("import");
        assert_eq!(chunk_block(&dst, &chunk(5)).expect("read"), Some(block(7)));
        assert_eq!(chunk_block(&dst, &chunk(6)).expect("read"), Some(block(0)));
    }

    #[test]
    fn a_base_kept_only_for_its_changes_is_dropped_after_import() {
        let src = two_versions();
        let (bytes, _, _) = stored_catalog(&src, true);
        let dst = MemStore::new();
        import(&dst, &bytes).expect("import");
        assert!(
            tree(&dst, 1).is_empty(),
            "the uncommitted base's tree is dropped"
        );
        assert_eq!(tree(&dst, 2), tree(&src, 2));
        // Chunks named only by the dropped base still resolve (retention decides about them).
        assert_eq!(chunk_block(&dst, &chunk(8)).expect("read"), Some(block(0)));
    }

    #[test]
    fn a_corrupt_truncated_or_misordered_catalog_is_refused_with_nothing_written() {
        let src = two_versions();
        let (bytes, whole, _) = stored_catalog(&src, false);
        let refused = |bytes: &[u8], what: &str| {
            let dst = MemStore::new();
            assert!(import(&dst, bytes).is_err(), "{what}: accepted");
            assert!(all(&dst, b"").is_empty(), "{what}: wrote entries");
        };
        let mut flipped = bytes.clone();
        flipped[whole + 40] ^= 1;
        refused(&flipped, "a flipped byte");
        refused(&bytes[..bytes.len() - 1], "truncated");
        refused(&bytes[whole..], "a diff without its base");
        let mut bad_version = bytes.clone();
        bad_version[EXPORT_MAGIC.len()] = 9;
        refused(&bad_version, "an unknown version");
        let mut bad_kind = seal(7, b"");
        bad_kind.extend_from_slice(&bytes);
        refused(&bad_kind, "an unknown kind");
        // A ref past the block table, and items out of order, even with a valid checksum.
        let mut body = Vec::new();
        body.extend_from_slice(&1u64.to_be_bytes());
        body.extend_from_slice(&0u64.to_be_bytes());
        let field = |body: &mut Vec<u8>, bytes: &[u8]| {
            body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            body.extend_from_slice(bytes);
        };
        let op = |body: &mut Vec<u8>, path: &[u8], refs: &[u32]| {
            body.push(OP_PUT);
            field(body, path);
            field(body, &codec::encode(&records::FileRecord::default()));
            body.extend_from_slice(&(refs.len() as u32).to_be_bytes());
            for r in refs {
                body.extend_from_slice(&r.to_be_bytes());
            }
        };
        let mut past = body.clone();
        past.push(OP_BLOCK);
        past.extend_from_slice(&block(1).0);
        op(&mut past, b"a", &[0]);
        import(&MemStore::new(), &seal(KIND_TREE, &past)).expect("a ref to the table");
        op(&mut past, b"b", &[1]);
        refused(&seal(KIND_TREE, &past), "a ref past the table");
        let mut unordered = body.clone();
        op(&mut unordered, b"b", &[]);
        op(&mut unordered, b"a", &[]);
        refused(&seal(KIND_TREE, &unordered), "items out of order");
        let mut unknown = body.clone();
        unknown.push(b'?');
        refused(&seal(KIND_TREE, &unknown), "an unknown item");
        let mut fine = body;
        op(&mut fine, b"a", &[UNKNOWN_BLOCK]);
        import(&MemStore::new(), &seal(KIND_TREE, &fine)).expect("an unknown block is allowed");
    }

    /// A segment of `kind` with these items, ended and checksummed.
    fn seal(kind: u8, items: &[u8]) -> Vec<u8> {
        let mut out = EXPORT_MAGIC.to_vec();
        out.extend_from_slice(&[SEGMENT_VERSION, kind]);
        out.extend_from_slice(items);
        out.push(END);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    fn stored(snapshot: u64, base: Option<u64>, depth: u32) -> Segment {
        Segment {
            snapshot: SnapshotId(snapshot),
            base: base.map(SnapshotId),
            source: "docs".into(),
            depth,
            blocks: vec![block(snapshot as u32)],
            len: 100,
        }
    }

    fn committed(ids: &[u64]) -> Vec<(SnapshotId, String)> {
        ids.iter()
            .map(|&i| (SnapshotId(i), "docs".to_string()))
            .collect()
    }

    fn new(snapshot: u64, base: Option<u64>, depth: u32, source: &str) -> NewSegment {
        NewSegment {
            snapshot: SnapshotId(snapshot),
            base: base.map(SnapshotId),
            source: source.into(),
            depth,
        }
    }

    #[test]
    fn plan_makes_whole_trees_first_then_changes_on_the_newest_of_the_source() {
        let first = plan(&[], &committed(&[1, 2]), |_| true);
        assert!(first.keep.is_empty());
        assert_eq!(
            first.new,
            [new(1, None, 0, "docs"), new(2, Some(1), 1, "docs")]
        );
        // Another source does not stand on this one's segments.
        let mut both = committed(&[2, 3]);
        both.push((SnapshotId(4), "photos".into()));
        let next = plan(&[stored(1, None, 0), stored(2, Some(1), 1)], &both, |_| {
            true
        });
        assert_eq!(
            next.new,
            [new(3, Some(2), 2, "docs"), new(4, None, 0, "photos")]
        );
        // 1 is not committed any more, but 3 stands on 2, which stands on 1.
        assert_eq!(next.keep, [stored(1, None, 0), stored(2, Some(1), 1)]);
    }

    #[test]
    fn plan_bounds_chains_and_frees_what_nothing_kept_stands_on() {
        let chain: Vec<Segment> = (1..=MAX_DEPTH as u64)
            .map(|i| stored(i, (i > 1).then(|| i - 1), i as u32 - 1))
            .collect();
        let top = MAX_DEPTH as u64;
        let next = plan(&chain, &committed(&[top, top + 1]), |_| true);
        assert_eq!(
            next.new,
            [new(top + 1, None, 0, "docs")],
            "a chain at the bound restarts whole"
        );
        assert_eq!(
            next.keep, chain,
            "the top of the old chain is still committed"
        );
        let after = plan(
            &[chain.clone(), vec![stored(top + 1, None, 0)]].concat(),
            &committed(&[top + 1]),
            |_| true,
        );
        assert!(after.new.is_empty());
        assert_eq!(
            after.keep,
            [stored(top + 1, None, 0)],
            "the old chain is freed"
        );
    }

    #[test]
    fn plan_never_builds_on_a_segment_whose_snapshot_is_gone() {
        // 2 stands on 1; 1 is gone (kept for 2), 3 is new: it stands on 2, not on 1.
        let segs = [stored(1, None, 0), stored(2, Some(1), 1)];
        let next = plan(&segs, &committed(&[2, 3]), |_| true);
        assert_eq!(next.new, [new(3, Some(2), 2, "docs")]);
        // 2's upload failed and 1 was dropped since: 2 is made whole, not on 1's lost tree.
        let next = plan(&segs[..1], &committed(&[2]), |_| true);
        assert_eq!(next.new, [new(2, None, 0, "docs")]);
        assert!(next.keep.is_empty(), "nothing stands on 1 any more");
    }

    #[test]
    fn plan_makes_a_segment_again_when_its_blocks_are_lost_and_so_what_stands_on_it() {
        let segs = [
            stored(1, None, 0),
            stored(2, Some(1), 1),
            stored(3, None, 0),
        ];
        let next = plan(&segs, &committed(&[2, 3]), |s| s.snapshot != SnapshotId(1));
        assert_eq!(next.keep, [stored(3, None, 0)]);
        assert_eq!(next.new, [new(2, None, 0, "docs")]);
        // A stored segment whose snapshot is neither committed nor stood on is dropped.
        let next = plan(&segs, &committed(&[3]), |_| true);
        assert_eq!(next.keep, [stored(3, None, 0)]);
        assert!(next.new.is_empty());
    }
}
