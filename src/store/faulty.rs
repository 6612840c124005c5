//! Fault injection at the storage boundary: a `KvStore` that wraps another and makes its writes
//! fail the way a real disk does (full, IO error) or hang (a frozen or stalled filesystem).
//!
//! It goes through the same trait production uses, so whatever sits on top (the `Writer`, the
//! actors, the health report) is tested against the faults it will meet, not a mock of itself.
//! Reads pass through untouched: a frozen or full filesystem still serves reads from the cache.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::{Batch, Cf, KeyValue, KvStore, StoreError};

/// What every write (and flush) does while a fault is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fails with `StoreError::NoSpace`, as RocksDB does on ENOSPC.
    NoSpace,
    /// Fails with `StoreError::Io`, as on EIO.
    Io,
    /// Blocks until the fault is changed or cleared (a frozen filesystem), then proceeds.
    Hang,
    /// Blocks this long, then proceeds (a slow SD card).
    Delay(Duration),
}

#[derive(Default)]
struct State {
    fault: Option<Fault>,
    /// Writes currently blocked by `Hang` or `Delay`, so tests can wait for one to be stuck.
    blocked: usize,
}

pub struct FaultyStore<S> {
    inner: S,
    state: Mutex<State>,
    changed: Condvar,
}

impl<S: KvStore> FaultyStore<S> {
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    /// Sets (or with `None` clears) the fault every later write meets; wakes hung writes.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
        self.changed.notify_all();
    }

    /// How many writes are blocked inside the store right now.
    pub fn blocked(&self) -> usize {
        self.lock().blocked
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is two plain fields: a panic while holding the lock leaves it usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the current fault: an error to return, or a wait, or nothing.
    fn before_write(&self) -> Result<(), StoreError> {
        let mut state = self.lock();
        match state.fault {
            None => Ok(()),
            Some(Fault::NoSpace) => Err(StoreError::NoSpace {
                path: "faulty-store".into(),
                free: 0,
            }),
            Some(Fault::Io) => Err(StoreError::Io {
                path: "faulty-store".into(),
                message: "Input/output error (injected)".into(),
            }),
            Some(Fault::Hang) => {
                state.blocked += 1;
                while state.fault == Some(Fault::Hang) {
                    state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                state.blocked -= 1;
                // Whatever replaced the hang (an error, say) applies to this write too.
                drop(state);
                self.before_write()
            }
            Some(Fault::Delay(delay)) => {
                state.blocked += 1;
                drop(state);
                std::thread::sleep(delay);
                self.lock().blocked -= 1;
                Ok(())
            }
        }
    }
}

impl<S: KvStore> KvStore for FaultyStore<S> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(cf, key)
    }

    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        self.before_write()?;
        self.inner.write(batch)
    }

    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.scan(cf, prefix, from, limit)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.before_write()?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::store::MemStore;

    #[test]
    fn without_a_fault_it_is_the_inner_store() {
        super::super::contract_tests::exercise(&FaultyStore::new(MemStore::new()));
    }

    #[test]
    fn errors_are_typed_and_lose_nothing_written_before() {
        let store = FaultyStore::new(MemStore::new());
        store.put(Cf::Meta, b"k", b"1").expect("put");
        store.set_fault(Some(Fault::NoSpace));
        assert!(
            store
                .put(Cf::Meta, b"k", b"2")
                .expect_err("full")
                .is_no_space()
        );
        store.set_fault(Some(Fault::Io));
        assert!(matches!(
            store.put(Cf::Meta, b"k", b"3"),
            Err(StoreError::Io { .. })
        ));
        assert!(store.flush().is_err());
        // Reads still work, and the refused writes changed nothing.
        assert_eq!(store.get(Cf::Meta, b"k").expect("get"), Some(b"1".to_vec()));
        store.set_fault(None);
        store
            .put(Cf::Meta, b"k", b"4")
            .expect("put after the fault");
        assert_eq!(store.get(Cf::Meta, b"k").expect("get"), Some(b"4".to_vec()));
    }

    #[test]
    fn a_hung_write_waits_for_release() {
        let store = Arc::new(FaultyStore::new(MemStore::new()));
        store.set_fault(Some(Fault::Hang));
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || store.put(Cf::Meta, b"k", b"v"))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.blocked() == 0 {
            assert!(Instant::now() < deadline, "the write never blocked");
            std::thread::yield_now();
        }
        assert_eq!(store.get(Cf::Meta, b"k").expect("get"), None);
        store.set_fault(None);
        writer.join().expect("join").expect("write after release");
        assert_eq!(store.blocked(), 0);
        assert_eq!(store.get(Cf::Meta, b"k").expect("get"), Some(b"v".to_vec()));
    }
}
