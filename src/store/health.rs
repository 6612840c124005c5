//! The owner's health matrix and audit material, in `Cf::Health`: what the monitor last found at
//! each position of each block, the audit pairs it spends to check suppliers, which catalog
//! blocks are current, and small named records of the monitor's own.
//!
//! | key | value |
//! |---|---|
//! | `h<block id 32>` | `records::HealthRecord`: one [`FragmentHealth`] per position |
//! | `p<block id 32><position u32 BE>` | `records::AuditPairsRecord`: that position's unspent audit pairs |
//! | `c` | `records::CurrentCatalogRecord`: the blocks of the current catalog export |
//! | `m<name bytes>` | the caller's bytes as given (per-supplier statistics, the last restore drill) |
//! | `mrecovery-revision.v2` | `records::RecoveryRevisionRecord`: the latest recovery record's revision |
//!
//! Each kind has its own first byte, so no key of one kind is a key (or a prefix) of another;
//! a block's pairs share the prefix `p<block>`, so [`delete_block`] finds them all with one scan.
//!
//! Everything here can be found again by auditing, so it favours going on over stopping: a
//! reader of one record reports an unreadable one as an error (the caller may overwrite it), and
//! [`all_health`] skips one with a WARN (that block reads as never audited and is audited again).

use super::catalog::SnapshotId;
use super::catalog::segments::Segment;
use super::codec::{self, Key, KeyReader, KvPages, records};
use super::{Batch, Cf, KvStore, StoreError};
use crate::data::BlockId;
use crate::data::audit::{AuditPair, MAX_AUDIT_RANGE};

const CF: Cf = Cf::Health;
const TAG_CELLS: &[u8] = b"h";
const TAG_PAIRS: &[u8] = b"p";
const KEY_CATALOG: &[u8] = b"c";
const TAG_META: &[u8] = b"m";
/// Records read per scan.
const PAGE: usize = 512;

/// What is known of one fragment position of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FragmentHealth {
    /// Not audited yet.
    Unknown,
    /// Held, and passed its last audit.
    Present,
    /// Not held (the supplier says so, or no supplier holds the position).
    Missing,
    /// Held, but failed an audit: the bytes are not the ones placed.
    Corrupt,
}

impl FragmentHealth {
    /// A stable lower-case name, for `status` and logs.
    pub fn label(self) -> &'static str {
        match self {
            FragmentHealth::Unknown => "unknown",
            FragmentHealth::Present => "present",
            FragmentHealth::Missing => "missing",
            FragmentHealth::Corrupt => "corrupt",
        }
    }

    fn to_record(self) -> records::FragmentHealthState {
        match self {
            FragmentHealth::Unknown => records::FragmentHealthState::Unknown,
            FragmentHealth::Present => records::FragmentHealthState::Present,
            FragmentHealth::Missing => records::FragmentHealthState::Missing,
            FragmentHealth::Corrupt => records::FragmentHealthState::Corrupt,
        }
    }

    /// A state this version does not know (written by a newer one) reads as `Unknown`: the
    /// position is audited again, which is always safe.
    fn from_record(value: i32) -> Self {
        match records::FragmentHealthState::try_from(value) {
            Ok(records::FragmentHealthState::Present) => FragmentHealth::Present,
            Ok(records::FragmentHealthState::Missing) => FragmentHealth::Missing,
            Ok(records::FragmentHealthState::Corrupt) => FragmentHealth::Corrupt,
            Ok(records::FragmentHealthState::Unknown) | Err(_) => FragmentHealth::Unknown,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Record(#[from] codec::CodecError),
    #[error("a health record has an invalid `{0}`")]
    Invalid(&'static str),
}

fn cells_key(block: &BlockId) -> Key {
    Key::new(TAG_CELLS).bytes(&block.0)
}

fn pairs_prefix(block: &BlockId) -> Key {
    Key::new(TAG_PAIRS).bytes(&block.0)
}

fn pairs_key(block: &BlockId, position: u32) -> Key {
    pairs_prefix(block).u32(position)
}

fn meta_key(name: &str) -> Vec<u8> {
    // The name is variable-length, so it goes last (and alone).
    [TAG_META, name.as_bytes()].concat()
}

fn decode_cells(v: &[u8]) -> Result<Vec<FragmentHealth>, HealthError> {
    let r: records::HealthRecord = codec::decode(v)?;
    Ok(r.cells
        .into_iter()
        .map(FragmentHealth::from_record)
        .collect())
}

/// Sets (replaces) a block's cells, one per position.
pub fn put_health(batch: &mut Batch, block: &BlockId, cells: &[FragmentHealth]) {
    let record = records::HealthRecord {
        cells: cells.iter().map(|c| c.to_record() as i32).collect(),
    };
    batch.put(CF, cells_key(block), codec::encode(&record));
}

/// A block's cells (`None`: never recorded).
pub fn health(
    kv: &dyn KvStore,
    block: &BlockId,
) -> Result<Option<Vec<FragmentHealth>>, HealthError> {
    kv.get(CF, cells_key(block).as_bytes())?
        .map(|v| decode_cells(&v))
        .transpose()
}

/// Every block's readable cells, in block id order, read a page at a time. An unreadable
/// record is skipped with a WARN (see the module doc).
pub fn all_health(kv: &dyn KvStore) -> Result<Vec<(BlockId, Vec<FragmentHealth>)>, HealthError> {
    let mut out = Vec::new();
    for page in kv.pages(CF, TAG_CELLS, PAGE) {
        for (k, v) in page? {
            let id = KeyReader::new(&k, TAG_CELLS).and_then(|mut r| {
                let id = r.bytes()?;
                r.end()?;
                Some(BlockId(id))
            });
            let Some(id) = id else {
                tracing::warn!(key = %hex::encode(&k), "skipping a health key of the wrong shape");
                continue;
            };
            match decode_cells(&v) {
                Ok(cells) => out.push((id, cells)),
                Err(e) => {
                    tracing::warn!(block = %id, error = %e, "skipping an unreadable health record")
                }
            }
        }
    }
    Ok(out)
}

/// Removes the block's cells and all its audit pairs (the block was dropped by retention).
pub fn delete_block(
    kv: &dyn KvStore,
    batch: &mut Batch,
    block: &BlockId,
) -> Result<(), HealthError> {
    batch.delete(CF, cells_key(block));
    for page in kv.pages(CF, pairs_prefix(block).as_bytes(), PAGE) {
        for (k, _) in page? {
            batch.delete(CF, k);
        }
    }
    Ok(())
}

/// Sets (replaces) the unspent audit pairs of one position; none deletes the record.
pub fn put_pairs(batch: &mut Batch, block: &BlockId, position: u32, pairs: &[AuditPair]) {
    let key = pairs_key(block, position);
    if pairs.is_empty() {
        batch.delete(CF, key);
        return;
    }
    let record = records::AuditPairsRecord {
        pairs: pairs
            .iter()
            .map(|p| records::AuditPairRecord {
                nonce: p.nonce.to_vec(),
                offset: p.offset,
                length: p.length,
                proof: p.proof.to_vec(),
            })
            .collect(),
    };
    batch.put(CF, key, codec::encode(&record));
}

/// The unspent audit pairs of one position (empty when none are kept). A pair that could not be
/// asked (a nonce or proof not 32 bytes, a range empty or too long) makes the record invalid.
pub fn pairs(
    kv: &dyn KvStore,
    block: &BlockId,
    position: u32,
) -> Result<Vec<AuditPair>, HealthError> {
    let Some(v) = kv.get(CF, pairs_key(block, position).as_bytes())? else {
        return Ok(Vec::new());
    };
    let record: records::AuditPairsRecord = codec::decode(&v)?;
    record
        .pairs
        .into_iter()
        .map(|p| {
            if p.length == 0
                || p.length > MAX_AUDIT_RANGE
                || p.offset.checked_add(p.length).is_none()
            {
                return Err(HealthError::Invalid("length"));
            }
            Ok(AuditPair {
                nonce: p
                    .nonce
                    .try_into()
                    .map_err(|_| HealthError::Invalid("nonce"))?,
                offset: p.offset,
                length: p.length,
                proof: p
                    .proof
                    .try_into()
                    .map_err(|_| HealthError::Invalid("proof"))?,
            })
        })
        .collect()
}

/// Records the blocks of the catalog export the latest recovery record points at, and the tree
/// segments among them.
pub fn put_current_catalog(batch: &mut Batch, blocks: &[BlockId], segments: &[Segment]) {
    let ids = |blocks: &[BlockId]| blocks.iter().map(|b| b.0.to_vec()).collect();
    let record = records::CurrentCatalogRecord {
        blocks: ids(blocks),
        segments: segments
            .iter()
            .map(|s| records::CatalogSegmentRecord {
                snapshot: s.snapshot.0,
                base: s.base.map_or(0, |b| b.0),
                source: s.source.clone(),
                depth: s.depth,
                blocks: ids(&s.blocks),
                len: s.len,
            })
            .collect(),
    };
    batch.put(CF, KEY_CATALOG, codec::encode(&record));
}

fn block_ids(blocks: Vec<Vec<u8>>) -> Result<Vec<BlockId>, HealthError> {
    blocks
        .into_iter()
        .map(|b| {
            b.try_into()
                .map(BlockId)
                .map_err(|_| HealthError::Invalid("blocks"))
        })
        .collect()
}

/// The tree segments of the current catalog, in upload order (empty before the first, and for
/// a catalog stored before segments).
pub fn catalog_segments(kv: &dyn KvStore) -> Result<Vec<Segment>, HealthError> {
    let Some(v) = kv.get(CF, KEY_CATALOG)? else {
        return Ok(Vec::new());
    };
    let record: records::CurrentCatalogRecord = codec::decode(&v)?;
    record
        .segments
        .into_iter()
        .map(|s| {
            if s.snapshot == 0 {
                return Err(HealthError::Invalid("segments"));
            }
            Ok(Segment {
                snapshot: SnapshotId(s.snapshot),
                base: (s.base != 0).then_some(SnapshotId(s.base)),
                source: s.source,
                depth: s.depth,
                blocks: block_ids(s.blocks)?,
                len: s.len,
            })
        })
        .collect()
}

/// The blocks of the current catalog export, in export order (empty before the first one).
pub fn current_catalog(kv: &dyn KvStore) -> Result<Vec<BlockId>, HealthError> {
    let Some(v) = kv.get(CF, KEY_CATALOG)? else {
        return Ok(Vec::new());
    };
    let record: records::CurrentCatalogRecord = codec::decode(&v)?;
    block_ids(record.blocks)
}

/// Stores a small opaque record by name (replacing it).
pub fn put_meta(batch: &mut Batch, name: &str, bytes: &[u8]) {
    batch.put(CF, meta_key(name), bytes.to_vec());
}

/// The record stored by name, as given.
pub fn meta(kv: &dyn KvStore, name: &str) -> Result<Option<Vec<u8>>, HealthError> {
    Ok(kv.get(CF, &meta_key(name))?)
}

/// Where the latest recovery record revision is kept (a `RecoveryRevisionRecord`).
const REVISION: &str = "recovery-revision.v2";
/// Where releases before the typed record kept it (8 bytes, little-endian); read, never written.
const REVISION_LEGACY: &str = "recovery-revision";

/// Records the revision of the latest recovery record this node stored (or recovered from).
pub fn put_recovery_revision(batch: &mut Batch, revision: u64) {
    let record = records::RecoveryRevisionRecord { revision };
    batch.put(CF, meta_key(REVISION), codec::encode(&record));
}

/// The revision of the latest recovery record this node stored; 0 before the first.
pub fn recovery_revision(kv: &dyn KvStore) -> Result<u64, HealthError> {
    if let Some(v) = kv.get(CF, &meta_key(REVISION))? {
        let record: records::RecoveryRevisionRecord = codec::decode(&v)?;
        return Ok(record.revision);
    }
    Ok(meta(kv, REVISION_LEGACY)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map_or(0, u64::from_le_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use FragmentHealth::*;

    fn id(n: u32) -> BlockId {
        let mut b = [0xa5; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        BlockId(b)
    }

    #[test]
    fn the_recovery_revision_is_a_typed_record_and_an_old_one_is_still_read() {
        let kv = MemStore::new();
        assert_eq!(recovery_revision(&kv).expect("read"), 0);
        write(&kv, |b| put_meta(b, REVISION_LEGACY, &7u64.to_le_bytes()));
        assert_eq!(recovery_revision(&kv).expect("read"), 7);
        write(&kv, |b| put_recovery_revision(b, 8));
        assert_eq!(recovery_revision(&kv).expect("read"), 8);
        write(&kv, |b| put_meta(b, REVISION, b"\xff\xff"));
        assert!(
            recovery_revision(&kv).is_err(),
            "bytes that are not a record"
        );
    }

    fn pair(n: u8) -> AuditPair {
        AuditPair {
            nonce: [n; 32],
            offset: u64::from(n) * 1000,
            length: 4096,
            proof: [n.wrapping_add(1); 32],
        }
    }

    fn write(kv: &MemStore, fill: impl FnOnce(&mut Batch)) {
        let mut b = Batch::new();
        fill(&mut b);
        kv.write(b).expect("write");
    }

    #[test]
    fn every_kind_round_trips_without_touching_the_others() {
        let kv = MemStore::new();
        let segments = [
            Segment {
                snapshot: SnapshotId(4),
                base: None,
                source: "docs".into(),
                depth: 0,
                blocks: vec![id(9)],
                len: 700,
            },
            Segment {
                snapshot: SnapshotId(6),
                base: Some(SnapshotId(4)),
                source: "docs".into(),
                depth: 1,
                blocks: vec![id(8)],
                len: 70,
            },
        ];
        assert_eq!(health(&kv, &id(1)).expect("read"), None);
        assert!(pairs(&kv, &id(1), 0).expect("read").is_empty());
        assert!(current_catalog(&kv).expect("read").is_empty());
        assert_eq!(meta(&kv, "drill").expect("read"), None);

        let cells = vec![Present, Missing, Corrupt, Unknown, Present, Present];
        write(&kv, |b| {
            put_health(b, &id(1), &cells);
            put_pairs(b, &id(1), 0, &[pair(1), pair(2)]);
            put_pairs(b, &id(1), 5, &[pair(3)]);
            put_current_catalog(b, &[id(9), id(8)], &segments);
            put_meta(b, "drill", b"last drill");
            put_meta(b, "", b"empty name");
        });
        assert_eq!(health(&kv, &id(1)).expect("read"), Some(cells.clone()));
        assert_eq!(health(&kv, &id(2)).expect("read"), None);
        assert_eq!(pairs(&kv, &id(1), 0).expect("read"), vec![pair(1), pair(2)]);
        assert_eq!(pairs(&kv, &id(1), 5).expect("read"), vec![pair(3)]);
        assert!(pairs(&kv, &id(1), 1).expect("read").is_empty());
        assert_eq!(current_catalog(&kv).expect("read"), vec![id(9), id(8)]);
        assert_eq!(catalog_segments(&kv).expect("read"), segments);
        assert_eq!(
            meta(&kv, "drill").expect("read"),
            Some(b"last drill".to_vec())
        );
        assert_eq!(meta(&kv, "").expect("read"), Some(b"empty name".to_vec()));
        // Only the cells are health records: pairs, the catalog list and meta are not listed.
        assert_eq!(all_health(&kv).expect("all"), vec![(id(1), cells)]);

        // Replacing: fewer pairs, then none (the record goes).
        write(&kv, |b| put_pairs(b, &id(1), 0, &[pair(2)]));
        assert_eq!(pairs(&kv, &id(1), 0).expect("read"), vec![pair(2)]);
        write(&kv, |b| put_pairs(b, &id(1), 0, &[]));
        assert!(pairs(&kv, &id(1), 0).expect("read").is_empty());
        write(&kv, |b| put_health(b, &id(1), &[Missing; 3]));
        assert_eq!(health(&kv, &id(1)).expect("read"), Some(vec![Missing; 3]));
    }

    #[test]
    fn delete_block_removes_its_pairs_at_every_position_and_nothing_else() {
        let kv = MemStore::new();
        write(&kv, |b| {
            for block in [id(1), id(2)] {
                put_health(b, &block, &[Present; 6]);
                // Positions whose bytes would sort anywhere, u32::MAX included.
                for position in [0, 1, 5, 256, u32::MAX] {
                    put_pairs(b, &block, position, &[pair(position as u8)]);
                }
            }
            put_current_catalog(b, &[id(1)], &[]);
            put_meta(b, "supplier", b"stats");
        });
        let mut b = Batch::new();
        delete_block(&kv, &mut b, &id(1)).expect("delete");
        kv.write(b).expect("write");
        assert_eq!(health(&kv, &id(1)).expect("read"), None);
        for position in [0, 1, 5, 256, u32::MAX] {
            assert!(pairs(&kv, &id(1), position).expect("read").is_empty());
            assert_eq!(
                pairs(&kv, &id(2), position).expect("read"),
                vec![pair(position as u8)]
            );
        }
        assert_eq!(health(&kv, &id(2)).expect("read"), Some(vec![Present; 6]));
        assert_eq!(current_catalog(&kv).expect("read"), vec![id(1)]);
        assert_eq!(
            meta(&kv, "supplier").expect("read"),
            Some(b"stats".to_vec())
        );
        // Nothing of block 1 is left under any tag.
        let left = kv.scan(CF, b"", None, 100).expect("scan");
        assert!(
            left.iter()
                .all(|(k, _)| !k.windows(32).any(|w| w == id(1).0)),
            "{left:?}"
        );
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let kv = MemStore::new();
        kv.put(CF, cells_key(&id(1)).as_bytes(), b"\x02garbage")
            .expect("put");
        assert!(matches!(health(&kv, &id(1)), Err(HealthError::Record(_))));
        kv.put(CF, pairs_key(&id(1), 3).as_bytes(), b"\x0a\xff")
            .expect("put");
        assert!(matches!(pairs(&kv, &id(1), 3), Err(HealthError::Record(_))));
        kv.put(CF, KEY_CATALOG, b"\xff\xff").expect("put");
        assert!(matches!(current_catalog(&kv), Err(HealthError::Record(_))));

        // Well-formed messages with values no pair or block id can have.
        let bad_pair = |p: records::AuditPairRecord| {
            codec::encode(&records::AuditPairsRecord { pairs: vec![p] })
        };
        let good = records::AuditPairRecord {
            nonce: vec![1; 32],
            offset: 0,
            length: 10,
            proof: vec![2; 32],
        };
        for (record, field) in [
            (
                records::AuditPairRecord {
                    nonce: vec![1; 31],
                    ..good.clone()
                },
                "nonce",
            ),
            (
                records::AuditPairRecord {
                    proof: vec![],
                    ..good.clone()
                },
                "proof",
            ),
            (
                records::AuditPairRecord {
                    length: 0,
                    ..good.clone()
                },
                "length",
            ),
            (
                records::AuditPairRecord {
                    length: MAX_AUDIT_RANGE + 1,
                    ..good.clone()
                },
                "length",
            ),
            (
                records::AuditPairRecord {
                    offset: u64::MAX,
                    ..good.clone()
                },
                "length",
            ),
        ] {
            kv.put(CF, pairs_key(&id(2), 0).as_bytes(), &bad_pair(record))
                .expect("put");
            let got = pairs(&kv, &id(2), 0);
            assert!(
                matches!(got, Err(HealthError::Invalid(f)) if f == field),
                "{field}: {got:?}"
            );
        }
        kv.put(CF, pairs_key(&id(2), 0).as_bytes(), &bad_pair(good))
            .expect("put");
        assert_eq!(pairs(&kv, &id(2), 0).expect("valid").len(), 1);
        let short = codec::encode(&records::CurrentCatalogRecord {
            blocks: vec![vec![1; 32], vec![2; 5]],
            ..Default::default()
        });
        kv.put(CF, KEY_CATALOG, &short).expect("put");
        assert!(matches!(
            current_catalog(&kv),
            Err(HealthError::Invalid("blocks"))
        ));

        // A state from a newer version reads as Unknown: audited again, never trusted.
        let newer = codec::encode(&records::HealthRecord {
            cells: vec![1, 7, 3],
        });
        kv.put(CF, cells_key(&id(3)).as_bytes(), &newer)
            .expect("put");
        assert_eq!(
            health(&kv, &id(3)).expect("read"),
            Some(vec![Present, Unknown, Corrupt])
        );
        // The scan skips the unreadable block 1 and a key of the wrong shape, keeps the rest.
        kv.put(CF, b"h\x01\x02", b"").expect("put");
        assert_eq!(
            all_health(&kv).expect("all"),
            vec![(id(3), vec![Present, Unknown, Corrupt])]
        );
    }

    #[test]
    fn all_health_reads_more_than_a_page_in_block_order() {
        let kv = MemStore::new();
        let n = PAGE as u32 * 2 + 7;
        let cells = |i: u32| match i % 4 {
            0 => vec![Present; 6],
            1 => vec![Missing, Present],
            2 => vec![Corrupt],
            _ => vec![],
        };
        write(&kv, |b| {
            // Written in reverse and with pairs in between, read back in id order and alone.
            for i in (0..n).rev() {
                put_health(b, &id(i), &cells(i));
                put_pairs(b, &id(i), 0, &[pair(1)]);
            }
        });
        let all = all_health(&kv).expect("all");
        assert_eq!(all.len(), n as usize);
        for (i, (block, got)) in all.into_iter().enumerate() {
            assert_eq!(block, id(i as u32));
            assert_eq!(got, cells(i as u32));
        }
    }

    #[test]
    fn labels_are_distinct_and_states_round_trip() {
        let all = [Unknown, Present, Missing, Corrupt];
        let labels: Vec<&str> = all.iter().map(|h| h.label()).collect();
        assert_eq!(labels, ["unknown", "present", "missing", "corrupt"]);
        for h in all {
            assert_eq!(FragmentHealth::from_record(h.to_record() as i32), h);
        }
    }
}
