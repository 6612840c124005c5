//! Running jobs, in `Cf::Jobs`, so a node restarted mid-job (even by `kill -9`) resumes it.
//!
//! | key | value |
//! |---|---|
//! | `b<snapshot u64 BE>` | `records::BackupJobRecord` (source name, root, when started) |
//!
//! A backup job's record is written when its snapshot id is allocated and deleted in the batch
//! that commits the snapshot (or after its tree is dropped, when abandoned). The tag leaves room
//! for restore jobs beside backup jobs.

use super::codec::{self, Key, KeyReader, KvPages, records};
use super::{Batch, Cf, KvStore, StoreError};
use crate::store::catalog::SnapshotId;

const CF: Cf = Cf::Jobs;
const TAG_BACKUP: &[u8] = b"b";
/// Records read per scan while loading.
const PAGE: usize = 256;

/// A backup job that started and has not committed or been abandoned yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    pub snapshot: SnapshotId,
    /// The source's name (its configured name, else its root path).
    pub source: String,
    /// The source's root directory as given (absolute, raw bytes).
    pub root: Vec<u8>,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
}

fn key(snapshot: SnapshotId) -> Key {
    Key::new(TAG_BACKUP).u64(snapshot.0)
}

fn parse(k: &[u8], v: &[u8]) -> Option<JobRecord> {
    let mut r = KeyReader::new(k, TAG_BACKUP)?;
    let snapshot = SnapshotId(r.u64()?);
    r.end()?;
    let record: records::BackupJobRecord = codec::decode(v).ok()?;
    Some(JobRecord {
        snapshot,
        source: record.source,
        root: record.root,
        started_at: record.started_at,
    })
}

/// Adds (or replaces) a job's record.
pub fn put_job(batch: &mut Batch, job: &JobRecord) {
    let record = records::BackupJobRecord {
        source: job.source.clone(),
        root: job.root.clone(),
        started_at: job.started_at,
    };
    batch.put(CF, key(job.snapshot), codec::encode(&record));
}

/// Forgets a job (committed or abandoned).
pub fn delete_job(batch: &mut Batch, snapshot: SnapshotId) {
    batch.delete(CF, key(snapshot));
}

/// Every readable backup job, in snapshot order. An unreadable record is skipped with a WARN:
/// its snapshot was never committed, so the cost is a job that does not resume (its source is
/// backed up again by the next run) and a tree left until the catalog is next cleaned.
pub fn jobs(kv: &dyn KvStore) -> Result<Vec<JobRecord>, StoreError> {
    let mut out = Vec::new();
    for page in kv.pages(CF, TAG_BACKUP, PAGE) {
        for (k, v) in page? {
            match parse(&k, &v) {
                Some(job) => out.push(job),
                None => tracing::warn!(key = %hex::encode(&k), "skipping an unreadable job record"),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    fn job(n: u64, source: &str) -> JobRecord {
        JobRecord {
            snapshot: SnapshotId(n),
            source: source.to_string(),
            root: format!("/home/u/{source}").into_bytes(),
            started_at: 1_700_000_000 + n,
        }
    }

    #[test]
    fn put_list_delete() {
        let kv = MemStore::new();
        assert!(jobs(&kv).expect("jobs").is_empty());
        let mut b = Batch::new();
        // Written out of order; 256 sorts after 2 only if the key is big-endian.
        for j in [job(256, "photos"), job(2, "docs"), job(7, "mail")] {
            put_job(&mut b, &j);
        }
        kv.write(b).expect("write");
        assert_eq!(
            jobs(&kv).expect("jobs"),
            vec![job(2, "docs"), job(7, "mail"), job(256, "photos")]
        );
        let mut b = Batch::new();
        delete_job(&mut b, SnapshotId(7));
        kv.write(b).expect("write");
        assert_eq!(
            jobs(&kv).expect("jobs"),
            vec![job(2, "docs"), job(256, "photos")]
        );
    }

    #[test]
    fn many_jobs_page_and_unreadable_ones_are_skipped() {
        let kv = MemStore::new();
        let mut b = Batch::new();
        for n in 0..(PAGE as u64 + 10) {
            put_job(&mut b, &job(n, "s"));
        }
        kv.write(b).expect("write");
        kv.put(CF, key(SnapshotId(3)).as_bytes(), b"\x02garbage")
            .expect("put");
        kv.put(CF, b"b\0\0\x01", b"").expect("put"); // a key too short to be a job's
        let got = jobs(&kv).expect("jobs");
        assert_eq!(got.len(), PAGE + 9);
        assert!(got.iter().all(|j| j.snapshot != SnapshotId(3)));
        assert!(got.windows(2).all(|w| w[0].snapshot < w[1].snapshot));
    }
}
