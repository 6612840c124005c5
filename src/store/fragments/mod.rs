//! The supplier side of the storage contract: fragments held on disk for customers, each
//! customer within its quota, never lost or half-written.
//!
//! Files live at `root/<customer hex>/<first 2 hex of block>/<block hex>.<position>`; temp
//! files are `.tmp-…` in the same directory (`layout.rs`). The index lives in
//! `Cf::SupplierIndex`, big-endian keys and `proto/store.proto` records (`index.rs`):
//!
//! | key | value |
//! |---|---|
//! | `a/<customer 16>` | `Account`: quota, used, cancelled since |
//! | `f/<customer 16><block 32><position u32 BE>` | `FragmentEntry`: size, blake3 |
//! | `p/<customer 16><block 32><position u32 BE>` | `ReplaceIntent`: a replace in flight |
//! | `r/<customer 16>` | u64 BE: the highest recovery-record revision the customer stored here |
//! | `d/<customer 16>` | u64 BE: when this supplier dropped the customer (refuses it until purged) |
//!
//! A fragment exists once its index entry does. `put` writes a temp file, fsyncs it, renames
//! it into place, fsyncs the directory, and only then commits one batch (entry + `used`); the
//! file operations go through [`FileSystem`] so a test can check that order. Replacing an
//! existing fragment first records a `p/` intent, so a crash after the rename is detected at
//! `open` (the file no longer matches the old entry: both are dropped). `open` (`recover.rs`)
//! removes temp files, fragment files without an entry, and entries whose file is missing or
//! has the wrong size, then recomputes every account's `used` from the surviving entries.

mod index;
mod layout;
#[cfg(test)]
mod record_tests;
mod recover;
#[cfg(test)]
mod tests;

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use super::codec::{KvPages, successor};
use super::{Batch, Cf, KvStore, StoreError};
use crate::crypto::identity::NodeId;
use index::{ACCOUNT, Entry, FRAGMENT, PENDING};
use index::{account_key, decode_entry, encode_account, encode_entry, encode_intent};
use index::{index_key, index_prefix, parse_account, parse_index_key};
use layout::{remove_if_exists, temp_path};

const CF: Cf = Cf::SupplierIndex;
/// Index entries handled per scan while recovering or purging.
const PAGE: usize = 1000;
/// The most fragments one `list` call returns, whatever `limit` asks for.
pub const MAX_LIST: usize = 10_000;

/// The least a fragment is charged against its customer's quota, however small: a file takes
/// at least a block of disk and an inode (security review H5).
pub const MIN_CHARGE: u64 = 4096;
/// What every fragment costs beyond its bytes: its index entry in the database, the directory
/// entry, and the synced write that made them.
pub const ENTRY_OVERHEAD: u64 = 512;
/// The most fragments one customer may hold, whatever its quota: bounds the index, the
/// directories and the time `open` spends checking them. A 4 + 2 layout of 4 MiB blocks puts
/// 1 MiB fragments on a supplier, so this is 1 TiB of ordinary backups.
pub const MAX_FRAGMENTS: u64 = 1 << 20;

/// What a fragment of `size` bytes is charged against its customer's quota:
/// `max(size, MIN_CHARGE) + ENTRY_OVERHEAD`. PROTOCOL.md §8.6.
pub fn charge(size: u64) -> u64 {
    Limits::DEFAULT.charge(size)
}

/// The store's per-fragment rules: what a fragment is charged and how many one customer may
/// hold. Production uses [`Limits::DEFAULT`]; tests of the quota's arithmetic may count
/// payload bytes only, and tests of the cap use a small one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub min_charge: u64,
    pub entry_overhead: u64,
    pub max_fragments: u64,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        min_charge: MIN_CHARGE,
        entry_overhead: ENTRY_OVERHEAD,
        max_fragments: MAX_FRAGMENTS,
    };

    /// What a fragment of `size` bytes is charged.
    pub fn charge(&self, size: u64) -> u64 {
        size.max(self.min_charge)
            .saturating_add(self.entry_overhead)
    }
}

/// One fragment of one block: which block, and which erasure-coded position.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragmentKey {
    pub block: [u8; 32],
    pub position: u32,
}

impl std::fmt::Display for FragmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.file_name())
    }
}

impl std::fmt::Debug for FragmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FragmentKey({self})")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentInfo {
    pub key: FragmentKey,
    pub size: u64,
    pub hash: [u8; 32],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccountState {
    Active,
    /// The customer left; its data is kept until `purge_expired` after a grace period.
    Cancelled {
        since_unix: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerAccount {
    pub customer: NodeId,
    pub quota: u64,
    /// Bytes charged for the fragments held (see [`charge`]), not their payload.
    pub used: u64,
    /// Fragments held.
    pub fragments: u64,
    pub state: AccountState,
}

#[derive(Debug, thiserror::Error)]
pub enum FragmentError {
    #[error("no storage service for this customer")]
    NoService,
    #[error("not enough donated space: {requested} bytes requested, {available} available")]
    NoSpace { requested: u64, available: u64 },
    #[error("over quota: {needed} bytes needed, {available} available")]
    OverQuota { needed: u64, available: u64 },
    #[error("an empty fragment is not stored")]
    Empty,
    #[error("too many fragments: this customer may hold at most {max}")]
    TooManyFragments { max: u64 },
    #[error("fragment not found")]
    NotFound,
    #[error("fragment data does not match the expected hash")]
    HashMismatch,
    /// A recovery record older than one this customer already stored here.
    #[error("recovery record revision {offered} is older than revision {held} held here")]
    StaleRevision { held: u64, offered: u64 },
    #[error("stored fragment or index record is corrupt")]
    Corrupt,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Db(#[from] StoreError),
}

impl FragmentError {
    /// A stable snake_case key, for replies to customers and for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            FragmentError::NoService => "no_service",
            FragmentError::NoSpace { .. } => "no_space",
            FragmentError::OverQuota { .. } => "over_quota",
            FragmentError::Empty => "empty",
            FragmentError::TooManyFragments { .. } => "too_many_fragments",
            FragmentError::NotFound => "not_found",
            FragmentError::HashMismatch => "hash_mismatch",
            FragmentError::StaleRevision { .. } => "stale_revision",
            FragmentError::Corrupt => "corrupt",
            FragmentError::Io { .. } => "io",
            FragmentError::Db(_) => "db",
        }
    }
}

fn io_err(context: impl std::fmt::Display) -> impl FnOnce(io::Error) -> FragmentError {
    let context = context.to_string();
    move |source| FragmentError::Io { context, source }
}

/// What `open` found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub temp_files_removed: u64,
    pub orphan_files_removed: u64,
    pub entries_dropped: u64,
    pub replaces_rolled_back: u64,
    pub accounts_corrected: u64,
}

/// The file operations whose order makes a stored fragment durable: write, fsync the file,
/// rename it into place, fsync the directory. Production uses [`RealFs`]; the tests record the
/// calls (and inject failures), because a missing fsync shows only after a power cut.
trait FileSystem: Send + Sync {
    /// Creates `path`, which must not exist, readable by the owner only, and writes `data`.
    fn write_new(&self, path: &Path, data: &[u8]) -> io::Result<File>;
    /// Makes the file's content durable.
    fn sync_file(&self, file: &File, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Creates one directory (its parent must exist), usable by the owner only.
    fn create_dir(&self, dir: &Path) -> io::Result<()>;
    /// Makes the directory's entries durable (a rename into it, a new subdirectory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The operating system's file operations.
struct RealFs;

impl FileSystem for RealFs {
    fn write_new(&self, path: &Path, data: &[u8]) -> io::Result<File> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(data)?;
        Ok(f)
    }

    fn sync_file(&self, file: &File, _path: &Path) -> io::Result<()> {
        file.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        DirBuilder::new().mode(0o700).create(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

pub struct FragmentStore {
    root: PathBuf,
    kv: Arc<dyn KvStore>,
    /// Index + file mutations take it exclusively; `get` shares it while it opens the file, so
    /// it never sees a file and an entry from different writes.
    lock: RwLock<()>,
    recovered: RecoveryReport,
    fs: Arc<dyn FileSystem>,
    /// What a fragment is charged, how many a customer may hold.
    limits: Limits,
}

impl FragmentStore {
    /// Opens the store and recovers from a crash: deletes leftover temp files; a fragment file
    /// with no index entry (killed after rename, before the index update and the ack) is deleted;
    /// an index entry whose file is missing or has the wrong size is dropped and `used` corrected.
    pub fn open(root: PathBuf, kv: Arc<dyn KvStore>) -> Result<Self, FragmentError> {
        Self::open_with(root, kv, Arc::new(RealFs), Limits::DEFAULT)
    }

    /// `open` with other per-fragment rules (tests).
    pub fn open_with_limits(
        root: PathBuf,
        kv: Arc<dyn KvStore>,
        limits: Limits,
    ) -> Result<Self, FragmentError> {
        Self::open_with(root, kv, Arc::new(RealFs), limits)
    }

    /// `open`, with the write path's file operations done by `fs`.
    fn open_with(
        root: PathBuf,
        kv: Arc<dyn KvStore>,
        fs: Arc<dyn FileSystem>,
        limits: Limits,
    ) -> Result<Self, FragmentError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io_err(format!("creating {}", root.display())))?;
        let mut store = FragmentStore {
            root,
            kv,
            lock: RwLock::new(()),
            recovered: RecoveryReport::default(),
            fs,
            limits,
        };
        let report = store.recover()?;
        if report != RecoveryReport::default() {
            tracing::warn!(
                temp_files_removed = report.temp_files_removed,
                orphan_files_removed = report.orphan_files_removed,
                entries_dropped = report.entries_dropped,
                replaces_rolled_back = report.replaces_rolled_back,
                accounts_corrected = report.accounts_corrected,
                "fragment store recovered"
            );
        }
        store.recovered = report;
        Ok(store)
    }

    /// What a fragment of `size` bytes is charged here.
    pub fn charge(&self, size: u64) -> u64 {
        self.limits.charge(size)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What the last `open` repaired.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovered
    }

    /// Grants (or changes) a customer's quota as `decide` says, given the space other
    /// customers hold claim to (active ones their quota, cancelled ones the bytes they still
    /// hold). The decision is taken under the store's lock, so two grants cannot both count the
    /// same space; the rule itself is the caller's (`fsm::supplier_service::decide`).
    /// Re-granting an existing customer re-activates a cancelled account and keeps its data. A
    /// quota below `used` is allowed: puts are refused until deletes free space.
    pub fn grant_with<E>(
        &self,
        customer: NodeId,
        decide: impl FnOnce(u64) -> Result<u64, E>,
    ) -> Result<Result<u64, E>, FragmentError> {
        let _w = self.exclusive();
        let mut others: u64 = 0;
        self.for_each_account(|account| {
            if account.customer != customer {
                others = others.saturating_add(match account.state {
                    AccountState::Active => account.quota,
                    AccountState::Cancelled { .. } => account.used,
                });
            }
            Ok(())
        })?;
        let quota = match decide(others) {
            Ok(quota) => quota,
            Err(refused) => return Ok(Err(refused)),
        };
        let account = match self.load_account(&customer)? {
            Some(a) => CustomerAccount {
                quota,
                state: AccountState::Active,
                ..a
            },
            None => CustomerAccount {
                customer,
                quota,
                used: 0,
                fragments: 0,
                state: AccountState::Active,
            },
        };
        self.kv
            .put(CF, &account_key(&customer), &encode_account(&account))?;
        Ok(Ok(quota))
    }

    pub fn account(&self, customer: &NodeId) -> Result<Option<CustomerAccount>, FragmentError> {
        self.load_account(customer)
    }

    /// Every account, in customer id order (one record per customer, so this stays small).
    pub fn accounts(&self) -> Result<Vec<CustomerAccount>, FragmentError> {
        let mut out = Vec::new();
        self.for_each_account(|a| {
            out.push(a);
            Ok(())
        })?;
        Ok(out)
    }

    /// Stores a fragment: refuses an empty one (Empty), checks the account is active
    /// (NoService), the quota (OverQuota: the fragment is charged [`charge`]`(size)`, a replaced
    /// fragment's old charge counts as freed) and the count (TooManyFragments), checks blake3(data) == expected
    /// (HashMismatch), writes a temp file in the same directory, fsyncs, renames, fsyncs the
    /// directory, then ONE batch updates the fragment's index entry and the account's `used`.
    /// On any error the temp file is removed and the index is unchanged.
    pub fn put(
        &self,
        customer: &NodeId,
        key: FragmentKey,
        data: &[u8],
        expected: &[u8; 32],
    ) -> Result<FragmentInfo, FragmentError> {
        self.put_inner(customer, key, data, expected, None)
    }

    /// Stores the customer's recovery record (signed by it, checked by the caller) at `key`,
    /// as `put` does, unless this customer already stored a higher `revision` here
    /// (`StaleRevision`). The highest revision seen is kept with the entry, in the same batch,
    /// and outlives a delete of the record: a supplier never goes back to an older one.
    pub fn put_record(
        &self,
        customer: &NodeId,
        key: FragmentKey,
        data: &[u8],
        expected: &[u8; 32],
        revision: u64,
    ) -> Result<FragmentInfo, FragmentError> {
        self.put_inner(customer, key, data, expected, Some(revision))
    }

    /// The highest recovery-record revision `customer` stored here (0: none).
    pub fn record_revision(&self, customer: &NodeId) -> Result<u64, FragmentError> {
        Ok(match self.kv.get(CF, &index::revision_key(customer))? {
            None => 0,
            Some(v) => {
                let bytes: [u8; 8] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| FragmentError::Corrupt)?;
                u64::from_be_bytes(bytes)
            }
        })
    }

    /// `StaleRevision` if `offered` is below what `customer` stored before.
    fn admit_record(&self, customer: &NodeId, offered: u64) -> Result<(), FragmentError> {
        let held = self.record_revision(customer)?;
        if offered < held {
            return Err(FragmentError::StaleRevision { held, offered });
        }
        Ok(())
    }

    fn put_inner(
        &self,
        customer: &NodeId,
        key: FragmentKey,
        data: &[u8],
        expected: &[u8; 32],
        record: Option<u64>,
    ) -> Result<FragmentInfo, FragmentError> {
        let size = data.len() as u64;
        if size == 0 {
            // It would cost an inode, a directory entry and a synced index entry for nothing.
            return Err(FragmentError::Empty);
        }
        // Refuse early, before spending IO; checked again under the lock before committing.
        self.admit(customer, &key, size)?;
        if let Some(revision) = record {
            self.admit_record(customer, revision)?;
        }
        let hash: [u8; 32] = *blake3::hash(data).as_bytes();
        if &hash != expected {
            return Err(FragmentError::HashMismatch);
        }
        let dir = self.ensure_block_dir(customer, &key.block)?;
        // The expensive part (write + fsync) runs outside the lock.
        let tmp = self.write_temp(&dir, &key, data)?;
        let result = self.commit(customer, key, (size, hash), record, &dir, &tmp);
        if result.is_err() {
            remove_if_exists(&tmp);
        }
        result
    }

    /// Reads a fragment, verifying its hash against the index (Corrupt when it differs or the
    /// file is gone; NotFound when there is no entry).
    pub fn get(&self, customer: &NodeId, key: FragmentKey) -> Result<Vec<u8>, FragmentError> {
        let path = self.fragment_path(customer, &key);
        let (entry, mut file) = {
            let _r = self.shared();
            let entry = self
                .load_entry(customer, &key)?
                .ok_or(FragmentError::NotFound)?;
            match File::open(&path) {
                Ok(f) => (entry, f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::warn!(customer = %customer, fragment = %key, "fragment file missing");
                    return Err(FragmentError::Corrupt);
                }
                Err(e) => return Err(io_err(format!("opening {}", path.display()))(e)),
            }
        };
        // Files are only ever replaced by rename, never rewritten, so the open file is stable.
        let len = file
            .metadata()
            .map_err(io_err(format!("reading {}", path.display())))?
            .len();
        if len != entry.size {
            tracing::warn!(customer = %customer, fragment = %key, "fragment file has the wrong size");
            return Err(FragmentError::Corrupt);
        }
        let mut data = Vec::with_capacity(usize::try_from(entry.size).unwrap_or(0));
        file.read_to_end(&mut data)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if data.len() as u64 != entry.size || *blake3::hash(&data).as_bytes() != entry.hash {
            tracing::warn!(customer = %customer, fragment = %key, "fragment content does not match its hash");
            return Err(FragmentError::Corrupt);
        }
        Ok(data)
    }

    /// The bytes `offset .. offset + length` of a stored fragment, read alone (an audit's range,
    /// PROTOCOL.md §8.9: at most `MAX_AUDIT_RANGE`, never the whole fragment). `Ok(None)` when the
    /// range is empty, too long or not inside the fragment. The fragment's whole hash is not
    /// checked here (that needs every byte); the audit's proof covers the range's bytes.
    pub fn read_range(
        &self,
        customer: &NodeId,
        key: FragmentKey,
        offset: u64,
        length: u64,
    ) -> Result<Option<Vec<u8>>, FragmentError> {
        use std::io::{Seek, SeekFrom};
        let path = self.fragment_path(customer, &key);
        let (entry, mut file) = {
            let _r = self.shared();
            let entry = self
                .load_entry(customer, &key)?
                .ok_or(FragmentError::NotFound)?;
            match File::open(&path) {
                Ok(f) => (entry, f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::warn!(customer = %customer, fragment = %key, "fragment file missing");
                    return Err(FragmentError::Corrupt);
                }
                Err(e) => return Err(io_err(format!("opening {}", path.display()))(e)),
            }
        };
        let inside = offset
            .checked_add(length)
            .is_some_and(|end| end <= entry.size);
        if length == 0 || length > crate::data::audit::MAX_AUDIT_RANGE || !inside {
            return Ok(None);
        }
        let len = file
            .metadata()
            .map_err(io_err(format!("reading {}", path.display())))?
            .len();
        if len != entry.size {
            tracing::warn!(customer = %customer, fragment = %key, "fragment file has the wrong size");
            return Err(FragmentError::Corrupt);
        }
        let mut data = vec![0u8; length as usize];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut data))
            .map_err(io_err(format!("reading {}", path.display())))?;
        Ok(Some(data))
    }

    /// Up to `limit` (at most `MAX_LIST`) fragments of this customer after `after` (exclusive),
    /// in key order, and whether more remain. From the index only.
    pub fn list(
        &self,
        customer: &NodeId,
        after: Option<FragmentKey>,
        limit: usize,
    ) -> Result<(Vec<FragmentInfo>, bool), FragmentError> {
        let limit = limit.min(MAX_LIST);
        let prefix = index_prefix(FRAGMENT, customer);
        let from = after.map(|k| successor(&index_key(FRAGMENT, customer, &k)));
        let rows = self.kv.scan(CF, &prefix, from.as_deref(), limit + 1)?;
        let more = rows.len() > limit;
        let mut out = Vec::with_capacity(rows.len().min(limit));
        for (k, v) in rows.into_iter().take(limit) {
            let (owner, key) = parse_index_key(FRAGMENT, &k).ok_or(FragmentError::Corrupt)?;
            if owner != *customer {
                return Err(FragmentError::Corrupt);
            }
            let entry = decode_entry(&v)?;
            out.push(FragmentInfo {
                key,
                size: entry.size,
                hash: entry.hash,
            });
        }
        Ok((out, more))
    }

    /// Deletes a fragment; returns the bytes freed (NotFound when absent). The index entry goes
    /// first; a file left behind by a crash or an unlink error is removed by the next `open`.
    pub fn delete(&self, customer: &NodeId, key: FragmentKey) -> Result<u64, FragmentError> {
        let _w = self.exclusive();
        let entry = self
            .load_entry(customer, &key)?
            .ok_or(FragmentError::NotFound)?;
        let mut batch = Batch::new();
        batch.delete(CF, index_key(FRAGMENT, customer, &key));
        if let Some(mut account) = self.load_account(customer)? {
            account.used = account.used.saturating_sub(self.charge(entry.size));
            account.fragments = account.fragments.saturating_sub(1);
            batch.put(CF, account_key(customer), encode_account(&account));
        }
        self.kv.write(batch)?;
        let path = self.fragment_path(customer, &key);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(customer = %customer, fragment = %key, error = %e,
                "could not remove a deleted fragment's file; the next open will");
        }
        Ok(entry.size)
    }

    /// The customer leaves: the account is marked Cancelled{since} (kept if already cancelled);
    /// its data is kept until `purge_expired`. NoService for an unknown customer.
    pub fn cancel(&self, customer: &NodeId, now_unix: u64) -> Result<(), FragmentError> {
        let _w = self.exclusive();
        let mut account = self
            .load_account(customer)?
            .ok_or(FragmentError::NoService)?;
        if account.state == AccountState::Active {
            account.state = AccountState::Cancelled {
                since_unix: now_unix,
            };
            self.kv
                .put(CF, &account_key(customer), &encode_account(&account))?;
        }
        Ok(())
    }

    /// This supplier stops serving `customer`: cancelled as if it had left (its data kept for the
    /// grace period), and marked dropped, so that a new service request from it is refused until
    /// its data is purged ([`FragmentStore::dropped`]): a drop sticks.
    pub fn drop_customer(&self, customer: &NodeId, now_unix: u64) -> Result<(), FragmentError> {
        let _w = self.exclusive();
        let mut account = self
            .load_account(customer)?
            .ok_or(FragmentError::NoService)?;
        let mut batch = Batch::new();
        if account.state == AccountState::Active {
            account.state = AccountState::Cancelled {
                since_unix: now_unix,
            };
            batch.put(CF, account_key(customer), encode_account(&account));
        }
        batch.put(
            CF,
            index::dropped_key(customer),
            now_unix.to_be_bytes().to_vec(),
        );
        self.kv.write(batch)?;
        Ok(())
    }

    /// Whether this supplier dropped `customer` and has not purged its data yet.
    pub fn dropped(&self, customer: &NodeId) -> Result<bool, FragmentError> {
        Ok(self.kv.get(CF, &index::dropped_key(customer))?.is_some())
    }

    /// Removes all data and the account of customers cancelled at least `grace` ago; returns them.
    pub fn purge_expired(
        &self,
        now_unix: u64,
        grace: Duration,
    ) -> Result<Vec<NodeId>, FragmentError> {
        let mut purged = Vec::new();
        for page in self.kv.pages(CF, ACCOUNT, PAGE) {
            for (k, v) in page? {
                let Some(account) = parse_account(&k, &v) else {
                    continue;
                };
                if expired(&account, now_unix, grace)
                    && self.purge(&account.customer, now_unix, grace)?
                {
                    purged.push(account.customer);
                }
            }
        }
        Ok(purged)
    }

    // ---- put internals ----

    /// NoService / OverQuota / TooManyFragments for storing `size` bytes at `key`; the account
    /// and the entry being replaced, if any.
    fn admit(
        &self,
        customer: &NodeId,
        key: &FragmentKey,
        size: u64,
    ) -> Result<(CustomerAccount, Option<Entry>), FragmentError> {
        let account = match self.load_account(customer)? {
            Some(a) if a.state == AccountState::Active => a,
            _ => return Err(FragmentError::NoService),
        };
        let old = self.load_entry(customer, key)?;
        if old.is_none() && account.fragments >= self.limits.max_fragments {
            return Err(FragmentError::TooManyFragments {
                max: self.limits.max_fragments,
            });
        }
        let base = account
            .used
            .saturating_sub(old.map(|e| self.charge(e.size)).unwrap_or(0));
        let needed = self.charge(size);
        match base.checked_add(needed) {
            Some(total) if total <= account.quota => Ok((account, old)),
            _ => Err(FragmentError::OverQuota {
                needed,
                available: account.quota.saturating_sub(base),
            }),
        }
    }

    fn write_temp(
        &self,
        dir: &Path,
        key: &FragmentKey,
        data: &[u8],
    ) -> Result<PathBuf, FragmentError> {
        let tmp = temp_path(dir, key);
        let written = self
            .fs
            .write_new(&tmp, data)
            .and_then(|f| self.fs.sync_file(&f, &tmp));
        if let Err(e) = written {
            remove_if_exists(&tmp);
            return Err(io_err(format!("writing {}", tmp.display()))(e));
        }
        Ok(tmp)
    }

    /// Under the lock: re-admit, rename into place, fsync the directory, one index batch.
    /// `record`: the revision of a recovery record, re-checked and kept in the same batch.
    fn commit(
        &self,
        customer: &NodeId,
        key: FragmentKey,
        (size, hash): (u64, [u8; 32]),
        record: Option<u64>,
        dir: &Path,
        tmp: &Path,
    ) -> Result<FragmentInfo, FragmentError> {
        let _w = self.exclusive();
        let (mut account, old) = self.admit(customer, &key, size)?;
        if let Some(revision) = record {
            self.admit_record(customer, revision)?;
        }
        let entry_key = index_key(FRAGMENT, customer, &key);
        let pending_key = index_key(PENDING, customer, &key);
        if old.is_some() {
            // The rename destroys the old content: say so first, so a crash between the
            // rename and the batch is caught by `open`.
            self.kv.put(CF, &pending_key, &encode_intent())?;
        }
        let path = dir.join(key.file_name());
        if let Err(e) = self.fs.rename(tmp, &path) {
            if old.is_some() {
                // Nothing moved: the old fragment is intact.
                let _ = self.kv.delete(CF, &pending_key);
            }
            return Err(io_err(format!("renaming into {}", path.display()))(e));
        }
        let committed = self.sync_dir(dir).and_then(|()| {
            account.used = account
                .used
                .saturating_sub(old.map(|e| self.charge(e.size)).unwrap_or(0))
                .saturating_add(self.charge(size));
            if old.is_none() {
                account.fragments = account.fragments.saturating_add(1);
            }
            let mut batch = Batch::new();
            batch
                .put(CF, entry_key.clone(), encode_entry(size, &hash))
                .put(CF, account_key(customer), encode_account(&account));
            if old.is_some() {
                batch.delete(CF, pending_key.clone());
            }
            if let Some(revision) = record {
                batch.put(
                    CF,
                    index::revision_key(customer),
                    revision.to_be_bytes().to_vec(),
                );
            }
            self.kv.write(batch).map_err(FragmentError::from)
        });
        if let Err(e) = committed {
            self.roll_back_renamed(customer, &key, old, &path);
            return Err(e);
        }
        Ok(FragmentInfo { key, size, hash })
    }

    /// The new file is in place but not committed. A new fragment: remove the file. A replaced
    /// one: its old content is gone, so drop the entry too (if the index refuses, the `p/`
    /// intent stays and `open` finishes the job).
    fn roll_back_renamed(
        &self,
        customer: &NodeId,
        key: &FragmentKey,
        old: Option<Entry>,
        path: &Path,
    ) {
        if let Some(old) = old {
            let mut batch = Batch::new();
            batch
                .delete(CF, index_key(FRAGMENT, customer, key))
                .delete(CF, index_key(PENDING, customer, key));
            if let Ok(Some(mut account)) = self.load_account(customer) {
                account.used = account.used.saturating_sub(self.charge(old.size));
                account.fragments = account.fragments.saturating_sub(1);
                batch.put(CF, account_key(customer), encode_account(&account));
            }
            if let Err(e) = self.kv.write(batch) {
                tracing::warn!(customer = %customer, fragment = %key, error = %e,
                    "could not roll back a failed replace; the next open will");
                return;
            }
            tracing::warn!(customer = %customer, fragment = %key,
                "a failed replace lost the old fragment");
        }
        remove_if_exists(path);
    }

    // ---- purge internals ----

    /// Deletes one expired customer's entries and files page by page, then its directory and
    /// account. Stops (false) if the account was re-granted meanwhile.
    fn purge(
        &self,
        customer: &NodeId,
        now_unix: u64,
        grace: Duration,
    ) -> Result<bool, FragmentError> {
        let prefix = index_prefix(FRAGMENT, customer);
        loop {
            let _w = self.exclusive();
            let Some(mut account) = self.load_account(customer)? else {
                return Ok(false);
            };
            if !expired(&account, now_unix, grace) {
                return Ok(false);
            }
            let page = self.kv.scan(CF, &prefix, None, PAGE)?;
            if page.is_empty() {
                break;
            }
            let mut batch = Batch::new();
            let mut files = Vec::with_capacity(page.len());
            for (k, v) in page {
                if let Ok(entry) = decode_entry(&v) {
                    account.used = account.used.saturating_sub(self.charge(entry.size));
                }
                account.fragments = account.fragments.saturating_sub(1);
                if let Some((_, key)) = parse_index_key(FRAGMENT, &k) {
                    files.push(self.fragment_path(customer, &key));
                }
                batch.delete(CF, k);
            }
            batch.put(CF, account_key(customer), encode_account(&account));
            self.kv.write(batch)?;
            for f in files {
                remove_if_exists(&f);
            }
        }
        let _w = self.exclusive();
        match self.load_account(customer)? {
            Some(a) if expired(&a, now_unix, grace) => {}
            _ => return Ok(false),
        }
        let dir = self.customer_dir(customer);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(customer = %customer, error = %e,
                "could not remove a purged customer's directory; the next open cleans it");
        }
        let mut batch = Batch::new();
        batch.delete(CF, account_key(customer));
        batch.delete(CF, index::dropped_key(customer));
        for (k, _) in self
            .kv
            .scan(CF, &index_prefix(PENDING, customer), None, PAGE)?
        {
            batch.delete(CF, k);
        }
        self.kv.write(batch)?;
        tracing::info!(customer = %customer, "purged a cancelled customer's data");
        Ok(true)
    }

    // ---- locks and durability ----

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    fn sync_dir(&self, dir: &Path) -> Result<(), FragmentError> {
        self.fs
            .sync_dir(dir)
            .map_err(io_err(format!("syncing {}", dir.display())))
    }
}

fn expired(account: &CustomerAccount, now_unix: u64, grace: Duration) -> bool {
    match account.state {
        AccountState::Cancelled { since_unix } => {
            now_unix >= since_unix.saturating_add(grace.as_secs())
        }
        AccountState::Active => false,
    }
}
