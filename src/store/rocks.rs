//! RocksDB behind `KvStore`: one column family per `Cf`, batches as `WriteBatch`.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch};

use super::{Batch, Cf, KvStore, Op, StoreError};

pub struct RocksStore {
    db: DB,
}

fn db_error(e: rocksdb::Error) -> StoreError {
    StoreError::Db(e.into_string())
}

impl RocksStore {
    /// Opens (creating if needed) the database at `path` with every column family.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // A home server, not a database server: keep memory modest.
        options.set_max_open_files(256);
        options.set_keep_log_file_num(4);
        let cfs = Cf::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), Options::default()));
        let db = DB::open_cf_descriptors(&options, path, cfs).map_err(|e| {
            let text = e.clone().into_string();
            if text.contains("lock") || text.contains("Resource temporarily unavailable") {
                StoreError::Locked {
                    path: path.display().to_string(),
                }
            } else {
                db_error(e)
            }
        })?;
        Ok(RocksStore { db })
    }

    fn handle(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StoreError::Db(format!("column family {} missing", cf.name())))
    }
}

impl KvStore for RocksStore {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_cf(self.handle(cf)?, key).map_err(db_error)
    }

    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        for op in batch.ops() {
            match op {
                Op::Put { cf, key, value } => wb.put_cf(self.handle(*cf)?, key, value),
                Op::Delete { cf, key } => wb.delete_cf(self.handle(*cf)?, key),
            }
        }
        // Synced: a write that returned (and was acked to a peer) survives a power loss too.
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(wb, &options).map_err(db_error)
    }

    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let start = from.unwrap_or(prefix);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.handle(cf)?,
            IteratorMode::From(start, Direction::Forward),
        ) {
            let (k, v) = item.map_err(db_error)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        for cf in Cf::ALL {
            self.db.flush_cf(self.handle(cf)?).map_err(db_error)?;
        }
        self.db.flush_wal(true).map_err(db_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_and_persistence() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RocksStore::open(dir.path()).expect("open");
            super::super::contract_tests::exercise(&store);
            // A second open of the same path while the first is open is refused.
            assert!(matches!(
                RocksStore::open(dir.path()),
                Err(StoreError::Locked { .. })
            ));
        }
        let store = RocksStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get(Cf::Meta, b"c").expect("get"), Some(b"4".to_vec()));
    }
}
