//! An in-memory `KvStore` with the same semantics as RocksDB's, for tests and simulation.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Batch, Cf, KvStore, Op, StoreError};

type Entries = BTreeMap<(Cf, Vec<u8>), Vec<u8>>;

#[derive(Default)]
pub struct MemStore {
    data: Mutex<Entries>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding the lock leaves a consistent map (each op is one insert/remove).
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KvStore for MemStore {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(&(cf, key.to_vec())).cloned())
    }

    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let mut data = self.lock();
        for op in batch.ops() {
            match op {
                Op::Put { cf, key, value } => {
                    data.insert((*cf, key.clone()), value.clone());
                }
                Op::Delete { cf, key } => {
                    data.remove(&(*cf, key.clone()));
                }
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let start = from.unwrap_or(prefix).to_vec();
        Ok(self
            .lock()
            .range((cf, start)..)
            .take_while(|((c, k), _)| *c == cf && k.starts_with(prefix))
            .take(limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn contract() {
        super::super::contract_tests::exercise(&super::MemStore::new());
    }
}
