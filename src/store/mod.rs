//! Node state: a key-value store with one column family per concern and atomic batches.
//! `RocksStore` is the real one; `MemStore` has the same semantics for tests and simulation;
//! `FaultyStore` wraps either to inject disk faults (full, IO error, a write that hangs) through
//! the same trait production uses. `Writer` runs synced writes on a thread of its own, so no
//! actor's event loop ever waits for the disk.

pub mod catalog;
pub mod codec;
pub mod contracts;
pub mod faulty;
pub mod fragments;
pub mod health;
pub mod jobs;
mod mem;
pub mod peers;
pub mod retention;
mod rocks;
pub mod writer;

pub use codec::{KvPages, Pages};
pub use faulty::{Fault, FaultyStore};
pub use mem::MemStore;
pub use rocks::{RocksStore, SpaceState, StoreOptions};
pub use writer::{WriteStats, Writer, WriterError, WriterSettings};

/// Column families, one per concern. Each actor owns its own.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Cf {
    /// This node's identity history.
    Identity,
    /// Trusted friends and their latest verified identities.
    Peers,
    /// Supplier contracts, one per fragment position (customer side).
    Contracts,
    /// Backups, versions, files, chunks and blocks.
    Catalog,
    /// Running backup and restore jobs, for resumption.
    Jobs,
    /// Audit results: block x fragment health.
    Health,
    /// Supplier side: customers, quotas and the fragments held for them.
    SupplierIndex,
    /// Store format and node-wide facts.
    Meta,
}

impl Cf {
    pub const ALL: [Cf; 8] = [
        Cf::Identity,
        Cf::Peers,
        Cf::Contracts,
        Cf::Catalog,
        Cf::Jobs,
        Cf::Health,
        Cf::SupplierIndex,
        Cf::Meta,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Identity => "identity",
            Cf::Peers => "peers",
            Cf::Contracts => "contracts",
            Cf::Catalog => "catalog",
            Cf::Jobs => "jobs",
            Cf::Health => "health",
            Cf::SupplierIndex => "supplier_index",
            Cf::Meta => "meta",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the database at {path} is in use by another process (is a bitdust node already running on this home?)"
    )]
    Locked { path: String },
    #[error("database error: {0}")]
    Db(String),
    /// The disk holding the database is full. Not a fate: once space is freed the next write
    /// goes through again (the database's error state is cleared without a restart).
    #[error(
        "no space left on the disk holding {path} ({free} bytes free): writes are refused until space is freed"
    )]
    NoSpace { path: String, free: u64 },
    /// The operating system reported an IO error (EIO and the like): a failing disk.
    #[error("disk IO error on {path}: {message}")]
    Io { path: String, message: String },
}

impl StoreError {
    /// Whether this error means "the disk is full" (the caller refuses new work for a reason
    /// the peer understands, rather than failing it as a fault).
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
}

/// Several updates applied all together or not at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Put {
            cf,
            key: key.into(),
            value: value.into(),
        });
        self
    }

    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete {
            cf,
            key: key.into(),
        });
        self
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Bytes an unprivileged process may still write on the filesystem holding `path`.
/// A syscall that can itself hang on a dead network mount: call it off any event loop.
pub fn free_space(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path holds a NUL"))?;
    // SAFETY: statvfs only writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field widths differ between targets
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// One entry of a scan.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The store every actor writes through.
pub trait KvStore: Send + Sync {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// The values of `keys`, which are sorted, in their order: one call for many lookups, so a
    /// store can share its reads between neighbouring keys (RocksDB's batched multi-get).
    fn get_sorted(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|k| self.get(cf, k)).collect()
    }
    /// Applies every op of `batch` atomically.
    fn write(&self, batch: Batch) -> Result<(), StoreError>;
    /// Up to `limit` entries whose key starts with `prefix`, in key order, starting at `from`
    /// (inclusive; `None` = the prefix itself). Bounded, so callers page through large sets.
    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), StoreError>;

    fn put(&self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut b = Batch::new();
        b.put(cf, key, value);
        self.write(b)
    }

    fn delete(&self, cf: Cf, key: &[u8]) -> Result<(), StoreError> {
        let mut b = Batch::new();
        b.delete(cf, key);
        self.write(b)
    }
}

#[cfg(test)]
pub(crate) mod contract_tests {
    //! The same assertions run against every implementation.
    use super::*;

    pub fn exercise(store: &dyn KvStore) {
        assert_eq!(store.get(Cf::Meta, b"a").expect("get"), None);
        let mut b = Batch::new();
        b.put(Cf::Meta, b"a".to_vec(), b"1".to_vec())
            .put(Cf::Peers, b"a".to_vec(), b"peer".to_vec())
            .put(Cf::Meta, b"ab".to_vec(), b"2".to_vec())
            .put(Cf::Meta, b"b".to_vec(), b"3".to_vec());
        store.write(b).expect("write");
        assert_eq!(store.get(Cf::Meta, b"a").expect("get"), Some(b"1".to_vec()));
        // Column families are separate namespaces.
        assert_eq!(
            store.get(Cf::Peers, b"a").expect("get"),
            Some(b"peer".to_vec())
        );
        let scanned = store.scan(Cf::Meta, b"a", None, 10).expect("scan");
        assert_eq!(
            scanned,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"ab".to_vec(), b"2".to_vec())
            ]
        );
        let paged = store.scan(Cf::Meta, b"", Some(b"ab"), 1).expect("scan");
        assert_eq!(paged, vec![(b"ab".to_vec(), b"2".to_vec())]);
        let mut b = Batch::new();
        b.delete(Cf::Meta, b"a".to_vec())
            .put(Cf::Meta, b"c".to_vec(), b"4".to_vec());
        store.write(b).expect("write");
        assert_eq!(store.get(Cf::Meta, b"a").expect("get"), None);
        assert_eq!(store.get(Cf::Meta, b"c").expect("get"), Some(b"4".to_vec()));
        store.flush().expect("flush");
    }
}
