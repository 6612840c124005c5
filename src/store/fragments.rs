//! The supplier side of the storage contract: fragments held on disk for customers, each
//! customer within its quota, never lost or half-written.
//!
//! Files live at `root/<customer hex>/<first 2 hex of block>/<block hex>.<position>`; temp
//! files are `.tmp-…` in the same directory. The index lives in `Cf::SupplierIndex`:
//!
//! | key | value |
//! |---|---|
//! | `a/<customer 16>` | account: `[1][quota u64][used u64][state u8][since u64]` (26 bytes, BE) |
//! | `f/<customer 16><block 32><position u32 BE>` | fragment: `[1][size u64 BE][blake3 32]` (41 bytes) |
//! | `p/<customer 16><block 32><position u32 BE>` | a replace in flight: `[1]` |
//!
//! A fragment exists once its index entry does. `put` writes a temp file, fsyncs it, renames
//! it into place, fsyncs the directory, and only then commits one batch (entry + `used`).
//! Replacing an existing fragment first records a `p/` intent, so a crash after the rename is
//! detected at `open` (the file no longer matches the old entry: both are dropped). `open`
//! removes temp files, fragment files without an entry, and entries whose file is missing or
//! has the wrong size, then recomputes every account's `used` from the surviving entries.

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use super::{Batch, Cf, KvStore, StoreError};
use crate::crypto::identity::NodeId;

const CF: Cf = Cf::SupplierIndex;
const VERSION: u8 = 1;
const ACCOUNT: &[u8] = b"a/";
const FRAGMENT: &[u8] = b"f/";
const PENDING: &[u8] = b"p/";
const TMP_PREFIX: &str = ".tmp-";
/// Index entries handled per scan while recovering or purging.
const PAGE: usize = 1000;
/// The most fragments one `list` call returns, whatever `limit` asks for.
pub const MAX_LIST: usize = 10_000;

const ACCOUNT_LEN: usize = 1 + 8 + 8 + 1 + 8;
const ENTRY_LEN: usize = 1 + 8 + 32;
const INDEX_KEY_LEN: usize = 2 + 16 + 32 + 4;

/// One fragment of one block: which block, and which erasure-coded position.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragmentKey {
    pub block: [u8; 32],
    pub position: u32,
}

impl FragmentKey {
    /// The file name: `<block hex>.<position>`.
    fn file_name(&self) -> String {
        format!("{}.{}", hex::encode(self.block), self.position)
    }
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
    pub used: u64,
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
    #[error("fragment not found")]
    NotFound,
    #[error("fragment data does not match the expected hash")]
    HashMismatch,
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
            FragmentError::NotFound => "not_found",
            FragmentError::HashMismatch => "hash_mismatch",
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

/// Where a test makes the next write fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// While writing the temp file, as a full disk would (ENOSPC).
    Write,
    /// When renaming the temp file into place.
    Rename,
}

pub struct FragmentStore {
    root: PathBuf,
    kv: Arc<dyn KvStore>,
    /// Index + file mutations take it exclusively; `get` shares it while it opens the file, so
    /// it never sees a file and an entry from different writes.
    lock: RwLock<()>,
    recovered: RecoveryReport,
    #[cfg(test)]
    fault: std::sync::Mutex<Option<Fault>>,
}

impl FragmentStore {
    /// Opens the store and recovers from a crash: deletes leftover temp files; a fragment file
    /// with no index entry (killed after rename, before the index update and the ack) is deleted;
    /// an index entry whose file is missing or has the wrong size is dropped and `used` corrected.
    pub fn open(root: PathBuf, kv: Arc<dyn KvStore>) -> Result<Self, FragmentError> {
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
            #[cfg(test)]
            fault: std::sync::Mutex::new(None),
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

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What the last `open` repaired.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovered
    }

    /// Grants (or changes) a customer's quota; NoSpace when the sum of all quotas would exceed
    /// `donated`. Other active customers count with their quota, cancelled ones with the bytes
    /// they still hold. Re-granting an existing customer re-activates a cancelled account and
    /// keeps its data. A quota below `used` is allowed: puts are refused until deletes free space.
    pub fn grant(&self, customer: NodeId, quota: u64, donated: u64) -> Result<(), FragmentError> {
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
        let available = donated.saturating_sub(others);
        if quota > available {
            return Err(FragmentError::NoSpace {
                requested: quota,
                available,
            });
        }
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
                state: AccountState::Active,
            },
        };
        self.kv
            .put(CF, &account_key(&customer), &encode_account(&account))?;
        Ok(())
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

    /// Stores a fragment: checks the account is active (NoService) and the quota (OverQuota,
    /// counting a replaced fragment's old size as freed), checks blake3(data) == expected
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
        let size = data.len() as u64;
        // Refuse early, before spending IO; checked again under the lock before committing.
        self.admit(customer, &key, size)?;
        let hash: [u8; 32] = *blake3::hash(data).as_bytes();
        if &hash != expected {
            return Err(FragmentError::HashMismatch);
        }
        let dir = self.ensure_block_dir(customer, &key.block)?;
        // The expensive part (write + fsync) runs outside the lock.
        let tmp = self.write_temp(&dir, &key, data)?;
        let result = self.commit(customer, key, size, hash, &dir, &tmp);
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
            account.used = account.used.saturating_sub(entry.size);
            batch.put(CF, account_key(customer), encode_account(&account).to_vec());
        }
        self.kv.write(batch)?;
        let path = self.fragment_path(customer, &key);
        if let Err(e) = fs::remove_file(&path)
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

    /// Removes all data and the account of customers cancelled at least `grace` ago; returns them.
    pub fn purge_expired(
        &self,
        now_unix: u64,
        grace: Duration,
    ) -> Result<Vec<NodeId>, FragmentError> {
        let mut purged = Vec::new();
        let mut from: Option<Vec<u8>> = None;
        loop {
            let page = self.kv.scan(CF, ACCOUNT, from.as_deref(), PAGE)?;
            let Some((last, _)) = page.last() else { break };
            from = Some(successor(last));
            let full = page.len() == PAGE;
            for (k, v) in page {
                let Some(account) = parse_account(&k, &v) else {
                    continue;
                };
                if expired(&account, now_unix, grace)
                    && self.purge(&account.customer, now_unix, grace)?
                {
                    purged.push(account.customer);
                }
            }
            if !full {
                break;
            }
        }
        Ok(purged)
    }

    // ---- put internals ----

    /// NoService / OverQuota for storing `size` bytes at `key`; the account and the entry being
    /// replaced, if any.
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
        let base = account
            .used
            .saturating_sub(old.map(|e| e.size).unwrap_or(0));
        match base.checked_add(size) {
            Some(total) if total <= account.quota => Ok((account, old)),
            _ => Err(FragmentError::OverQuota {
                needed: size,
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
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{}.{:016x}",
            key.file_name(),
            rand::random::<u64>()
        ));
        let written = (|| -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            self.inject(Fault::Write)?;
            f.write_all(data)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            remove_if_exists(&tmp);
            return Err(io_err(format!("writing {}", tmp.display()))(e));
        }
        Ok(tmp)
    }

    /// Under the lock: re-admit, rename into place, fsync the directory, one index batch.
    fn commit(
        &self,
        customer: &NodeId,
        key: FragmentKey,
        size: u64,
        hash: [u8; 32],
        dir: &Path,
        tmp: &Path,
    ) -> Result<FragmentInfo, FragmentError> {
        let _w = self.exclusive();
        let (mut account, old) = self.admit(customer, &key, size)?;
        let entry_key = index_key(FRAGMENT, customer, &key);
        let pending_key = index_key(PENDING, customer, &key);
        if old.is_some() {
            // The rename destroys the old content: say so first, so a crash between the
            // rename and the batch is caught by `open`.
            self.kv.put(CF, &pending_key, &[VERSION])?;
        }
        let path = dir.join(key.file_name());
        if let Err(e) = self
            .inject(Fault::Rename)
            .and_then(|()| fs::rename(tmp, &path))
        {
            if old.is_some() {
                // Nothing moved: the old fragment is intact.
                let _ = self.kv.delete(CF, &pending_key);
            }
            return Err(io_err(format!("renaming into {}", path.display()))(e));
        }
        let committed = sync_dir(dir).and_then(|()| {
            account.used = account
                .used
                .saturating_sub(old.map(|e| e.size).unwrap_or(0))
                .saturating_add(size);
            let mut batch = Batch::new();
            batch
                .put(CF, entry_key.clone(), encode_entry(size, &hash).to_vec())
                .put(CF, account_key(customer), encode_account(&account).to_vec());
            if old.is_some() {
                batch.delete(CF, pending_key.clone());
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
                account.used = account.used.saturating_sub(old.size);
                batch.put(CF, account_key(customer), encode_account(&account).to_vec());
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

    #[cfg(test)]
    fn inject(&self, at: Fault) -> io::Result<()> {
        let mut fault = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        if *fault == Some(at) {
            *fault = None;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline]
    fn inject(&self, _at: Fault) -> io::Result<()> {
        Ok(())
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
                    account.used = account.used.saturating_sub(entry.size);
                }
                if let Some((_, key)) = parse_index_key(FRAGMENT, &k) {
                    files.push(self.fragment_path(customer, &key));
                }
                batch.delete(CF, k);
            }
            batch.put(CF, account_key(customer), encode_account(&account).to_vec());
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
        if let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(customer = %customer, error = %e,
                "could not remove a purged customer's directory; the next open cleans it");
        }
        let mut batch = Batch::new();
        batch.delete(CF, account_key(customer));
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

    // ---- recovery ----

    fn recover(&self) -> Result<RecoveryReport, FragmentError> {
        let mut report = RecoveryReport::default();
        self.resolve_pending(&mut report)?;
        self.sweep_files(&mut report)?;
        self.check_entries(&mut report)?;
        Ok(report)
    }

    /// A `p/` intent means a replace was not acknowledged. If the file still holds the old
    /// content (killed before the rename), keep it; otherwise drop the entry and the file.
    fn resolve_pending(&self, report: &mut RecoveryReport) -> Result<(), FragmentError> {
        loop {
            let page = self.kv.scan(CF, PENDING, None, PAGE)?;
            if page.is_empty() {
                return Ok(());
            }
            for (k, _) in page {
                let mut batch = Batch::new();
                batch.delete(CF, k.clone());
                if let Some((customer, key)) = parse_index_key(PENDING, &k)
                    && let Some(Ok(entry)) = self
                        .kv
                        .get(CF, &index_key(FRAGMENT, &customer, &key))?
                        .map(|v| decode_entry(&v))
                {
                    let path = self.fragment_path(&customer, &key);
                    if !file_matches(&path, &entry) {
                        batch.delete(CF, index_key(FRAGMENT, &customer, &key));
                        remove_if_exists(&path);
                        report.replaces_rolled_back += 1;
                        tracing::warn!(customer = %customer, fragment = %key,
                            "dropped a fragment whose replace was interrupted");
                    }
                }
                // `used` is recomputed by `check_entries`.
                self.kv.write(batch)?;
            }
        }
    }

    /// Walks `root/<customer>/<xx>/`: removes temp files and fragment files with no entry.
    /// Anything not named like ours is left alone.
    fn sweep_files(&self, report: &mut RecoveryReport) -> Result<(), FragmentError> {
        for top in read_dir(&self.root)? {
            let Some(customer) = top.file_name().to_str().and_then(parse_customer_dir) else {
                continue;
            };
            if !top.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let cdir = top.path();
            for sub in read_dir(&cdir)? {
                let name = sub.file_name();
                let Some(name) = name.to_str() else { continue };
                let is_dir = sub.file_type().is_ok_and(|t| t.is_dir());
                if !is_dir && name.starts_with(TMP_PREFIX) {
                    remove_if_exists(&sub.path());
                    report.temp_files_removed += 1;
                    continue;
                }
                if !is_dir || !is_shard_name(name) {
                    continue;
                }
                for file in read_dir(&sub.path())? {
                    let fname = file.file_name();
                    let Some(fname) = fname.to_str() else {
                        continue;
                    };
                    if file.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    if fname.starts_with(TMP_PREFIX) {
                        remove_if_exists(&file.path());
                        report.temp_files_removed += 1;
                        continue;
                    }
                    let Some(key) = parse_file_name(fname) else {
                        continue;
                    };
                    if !fname.starts_with(name) {
                        continue;
                    }
                    if self
                        .kv
                        .get(CF, &index_key(FRAGMENT, &customer, &key))?
                        .is_none()
                    {
                        tracing::warn!(customer = %customer, fragment = %key,
                            "removed a fragment file with no index entry");
                        remove_if_exists(&file.path());
                        report.orphan_files_removed += 1;
                    }
                }
            }
            if self.load_account(&customer)?.is_none() {
                // Tidy up after customers that are gone; only empty directories go.
                for sub in read_dir(&cdir)? {
                    let _ = fs::remove_dir(sub.path());
                }
                let _ = fs::remove_dir(&cdir);
            }
        }
        Ok(())
    }

    /// Drops entries that are unreadable, belong to no account, or whose file is missing or
    /// has the wrong size; then sets every account's `used` to the sum of its entries.
    fn check_entries(&self, report: &mut RecoveryReport) -> Result<(), FragmentError> {
        struct Current {
            customer: NodeId,
            account: Option<CustomerAccount>,
            sum: u64,
        }
        let finish = |cur: Current, batch: &mut Batch, report: &mut RecoveryReport| {
            if let Some(mut account) = cur.account
                && account.used != cur.sum
            {
                account.used = cur.sum;
                batch.put(
                    CF,
                    account_key(&cur.customer),
                    encode_account(&account).to_vec(),
                );
                report.accounts_corrected += 1;
            }
        };
        let mut seen: BTreeSet<NodeId> = BTreeSet::new();
        let mut current: Option<Current> = None;
        let mut from: Option<Vec<u8>> = None;
        loop {
            let page = self.kv.scan(CF, FRAGMENT, from.as_deref(), PAGE)?;
            let Some((last, _)) = page.last() else { break };
            from = Some(successor(last));
            let full = page.len() == PAGE;
            let mut batch = Batch::new();
            for (k, v) in page {
                let Some((customer, key)) = parse_index_key(FRAGMENT, &k) else {
                    tracing::warn!("dropped a malformed fragment index key");
                    batch.delete(CF, k);
                    report.entries_dropped += 1;
                    continue;
                };
                if current.as_ref().is_none_or(|c| c.customer != customer) {
                    if let Some(done) = current.take() {
                        finish(done, &mut batch, report);
                    }
                    seen.insert(customer);
                    current = Some(Current {
                        customer,
                        account: self.load_account_lenient(&customer)?,
                        sum: 0,
                    });
                }
                let cur = current.as_mut().expect("set above");
                let path = self.fragment_path(&customer, &key);
                let keep = cur.account.is_some()
                    && match decode_entry(&v) {
                        Ok(entry) => match fs::metadata(&path) {
                            Ok(m) if m.is_file() && m.len() == entry.size => {
                                cur.sum = cur.sum.saturating_add(entry.size);
                                true
                            }
                            Ok(_) => false,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                            Err(e) => {
                                return Err(io_err(format!("checking {}", path.display()))(e));
                            }
                        },
                        Err(_) => false,
                    };
                if !keep {
                    tracing::warn!(customer = %customer, fragment = %key,
                        "dropped a fragment entry whose file is missing, wrong or unowned");
                    batch.delete(CF, k);
                    if path.is_file() {
                        remove_if_exists(&path);
                    }
                    report.entries_dropped += 1;
                }
            }
            if !full && let Some(done) = current.take() {
                finish(done, &mut batch, report);
            }
            if !batch.is_empty() {
                self.kv.write(batch)?;
            }
            if !full {
                break;
            }
        }
        if let Some(done) = current.take() {
            let mut batch = Batch::new();
            finish(done, &mut batch, report);
            if !batch.is_empty() {
                self.kv.write(batch)?;
            }
        }
        // Accounts with no entries at all hold nothing.
        let mut zero = Vec::new();
        self.for_each_account(|a| {
            if a.used != 0 && !seen.contains(&a.customer) {
                zero.push(a);
            }
            Ok(())
        })?;
        for mut a in zero {
            a.used = 0;
            self.kv
                .put(CF, &account_key(&a.customer), &encode_account(&a))?;
            report.accounts_corrected += 1;
        }
        Ok(())
    }

    // ---- index and path helpers ----

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    fn load_account(&self, customer: &NodeId) -> Result<Option<CustomerAccount>, FragmentError> {
        self.kv
            .get(CF, &account_key(customer))?
            .map(|v| decode_account(*customer, &v))
            .transpose()
    }

    /// As `load_account`, but an unreadable record counts as none (recovery keeps going).
    fn load_account_lenient(
        &self,
        customer: &NodeId,
    ) -> Result<Option<CustomerAccount>, FragmentError> {
        match self.load_account(customer) {
            Err(FragmentError::Corrupt) => {
                tracing::warn!(customer = %customer, "unreadable account record");
                Ok(None)
            }
            other => other,
        }
    }

    fn load_entry(
        &self,
        customer: &NodeId,
        key: &FragmentKey,
    ) -> Result<Option<Entry>, FragmentError> {
        self.kv
            .get(CF, &index_key(FRAGMENT, customer, key))?
            .map(|v| decode_entry(&v))
            .transpose()
    }

    /// Calls `f` with every readable account, a page at a time.
    fn for_each_account(
        &self,
        mut f: impl FnMut(CustomerAccount) -> Result<(), FragmentError>,
    ) -> Result<(), FragmentError> {
        let mut from: Option<Vec<u8>> = None;
        loop {
            let page = self.kv.scan(CF, ACCOUNT, from.as_deref(), PAGE)?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            from = Some(successor(last));
            let full = page.len() == PAGE;
            for (k, v) in page {
                match parse_account(&k, &v) {
                    Some(a) => f(a)?,
                    None => tracing::warn!("skipped an unreadable account record"),
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn customer_dir(&self, customer: &NodeId) -> PathBuf {
        self.root.join(customer.to_string())
    }

    fn block_dir(&self, customer: &NodeId, block: &[u8; 32]) -> PathBuf {
        self.customer_dir(customer).join(hex::encode(&block[..1]))
    }

    fn fragment_path(&self, customer: &NodeId, key: &FragmentKey) -> PathBuf {
        self.block_dir(customer, &key.block).join(key.file_name())
    }

    /// Creates the customer and block directories if needed, fsyncing each new one's parent.
    fn ensure_block_dir(
        &self,
        customer: &NodeId,
        block: &[u8; 32],
    ) -> Result<PathBuf, FragmentError> {
        let cdir = self.customer_dir(customer);
        let bdir = self.block_dir(customer, block);
        if bdir.is_dir() {
            return Ok(bdir);
        }
        for (dir, parent) in [(&cdir, &self.root), (&bdir, &cdir)] {
            match DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => sync_dir(parent)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
            }
        }
        Ok(bdir)
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

fn sync_dir(dir: &Path) -> Result<(), FragmentError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("syncing {}", dir.display())))
}

fn remove_if_exists(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove a file");
    }
}

/// The entries of a directory (none if it vanished meanwhile).
fn read_dir(dir: &Path) -> Result<impl Iterator<Item = fs::DirEntry>, FragmentError> {
    let entries = match fs::read_dir(dir) {
        Ok(rd) => Some(rd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(format!("listing {}", dir.display()))(e)),
    };
    Ok(entries.into_iter().flatten().filter_map(Result::ok))
}

/// Whether the file's size and blake3 match the entry, streaming (bounded memory).
fn file_matches(path: &Path, entry: &Entry) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let mut hasher = blake3::Hasher::new();
    match io::copy(&mut f, &mut hasher) {
        Ok(n) => n == entry.size && *hasher.finalize().as_bytes() == entry.hash,
        Err(_) => false,
    }
}

fn parse_customer_dir(name: &str) -> Option<NodeId> {
    let id = NodeId::parse(name)?;
    (id.to_string() == name).then_some(id)
}

fn is_shard_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `<64 lowercase hex>.<canonical decimal u32>`, else not one of ours.
fn parse_file_name(name: &str) -> Option<FragmentKey> {
    let (block_hex, pos) = name.split_once('.')?;
    if block_hex.len() != 64
        || !block_hex
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let block: [u8; 32] = hex::decode(block_hex).ok()?.try_into().ok()?;
    let position: u32 = pos.parse().ok()?;
    let key = FragmentKey { block, position };
    (key.file_name() == name).then_some(key)
}

// ---- index encoding ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    size: u64,
    hash: [u8; 32],
}

fn node_id_from_bytes(bytes: &[u8]) -> Option<NodeId> {
    if bytes.len() != 16 {
        return None;
    }
    NodeId::parse(&hex::encode(bytes))
}

fn account_key(customer: &NodeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + 16);
    k.extend_from_slice(ACCOUNT);
    k.extend_from_slice(customer.as_bytes());
    k
}

fn index_prefix(kind: &[u8], customer: &NodeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(INDEX_KEY_LEN);
    k.extend_from_slice(kind);
    k.extend_from_slice(customer.as_bytes());
    k
}

fn index_key(kind: &[u8], customer: &NodeId, key: &FragmentKey) -> Vec<u8> {
    let mut k = index_prefix(kind, customer);
    k.extend_from_slice(&key.block);
    k.extend_from_slice(&key.position.to_be_bytes());
    k
}

fn parse_index_key(kind: &[u8], k: &[u8]) -> Option<(NodeId, FragmentKey)> {
    let rest = k.strip_prefix(kind)?;
    if rest.len() != 16 + 32 + 4 {
        return None;
    }
    let customer = node_id_from_bytes(&rest[..16])?;
    let block: [u8; 32] = rest[16..48].try_into().ok()?;
    let position = u32::from_be_bytes(rest[48..52].try_into().ok()?);
    Some((customer, FragmentKey { block, position }))
}

/// The smallest key after `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.extend_from_slice(key);
    k.push(0);
    k
}

fn encode_account(a: &CustomerAccount) -> [u8; ACCOUNT_LEN] {
    let mut out = [0u8; ACCOUNT_LEN];
    out[0] = VERSION;
    out[1..9].copy_from_slice(&a.quota.to_be_bytes());
    out[9..17].copy_from_slice(&a.used.to_be_bytes());
    let (state, since) = match a.state {
        AccountState::Active => (0u8, 0u64),
        AccountState::Cancelled { since_unix } => (1u8, since_unix),
    };
    out[17] = state;
    out[18..26].copy_from_slice(&since.to_be_bytes());
    out
}

fn decode_account(customer: NodeId, v: &[u8]) -> Result<CustomerAccount, FragmentError> {
    let v: &[u8; ACCOUNT_LEN] = v.try_into().map_err(|_| FragmentError::Corrupt)?;
    if v[0] != VERSION {
        return Err(FragmentError::Corrupt);
    }
    let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
    let state = match v[17] {
        0 => AccountState::Active,
        1 => AccountState::Cancelled {
            since_unix: u64_at(18),
        },
        _ => return Err(FragmentError::Corrupt),
    };
    Ok(CustomerAccount {
        customer,
        quota: u64_at(1),
        used: u64_at(9),
        state,
    })
}

fn parse_account(k: &[u8], v: &[u8]) -> Option<CustomerAccount> {
    let customer = node_id_from_bytes(k.strip_prefix(ACCOUNT)?)?;
    decode_account(customer, v).ok()
}

fn encode_entry(size: u64, hash: &[u8; 32]) -> [u8; ENTRY_LEN] {
    let mut out = [0u8; ENTRY_LEN];
    out[0] = VERSION;
    out[1..9].copy_from_slice(&size.to_be_bytes());
    out[9..41].copy_from_slice(hash);
    out
}

fn decode_entry(v: &[u8]) -> Result<Entry, FragmentError> {
    let v: &[u8; ENTRY_LEN] = v.try_into().map_err(|_| FragmentError::Corrupt)?;
    if v[0] != VERSION {
        return Err(FragmentError::Corrupt);
    }
    Ok(Entry {
        size: u64::from_be_bytes(v[1..9].try_into().expect("8 bytes")),
        hash: v[9..41].try_into().expect("32 bytes"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemStore, RocksStore};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const DAY: Duration = Duration::from_secs(86_400);

    fn node(i: u8) -> NodeId {
        NodeId::from_signing_key(&[i; 32])
    }

    fn fkey(b: u8, position: u32) -> FragmentKey {
        FragmentKey {
            block: [b; 32],
            position,
        }
    }

    fn h(data: &[u8]) -> [u8; 32] {
        *blake3::hash(data).as_bytes()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        kv: Arc<dyn KvStore>,
        store: FragmentStore,
    }

    impl Fixture {
        fn mem() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let kv: Arc<dyn KvStore> = Arc::new(MemStore::new());
            let store = FragmentStore::open(dir.path().join("store"), kv.clone()).expect("open");
            Fixture { dir, kv, store }
        }

        fn reopen(&mut self) {
            self.store = FragmentStore::open(self.root(), self.kv.clone()).expect("reopen");
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("store")
        }

        /// Every file under the root, relative, sorted.
        fn files(&self) -> Vec<String> {
            fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
                for e in fs::read_dir(dir).expect("read_dir").flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p, base, out);
                    } else {
                        out.push(p.strip_prefix(base).expect("prefix").display().to_string());
                    }
                }
            }
            let mut out = Vec::new();
            walk(&self.root(), &self.root(), &mut out);
            out.sort();
            out
        }

        fn put(
            &self,
            c: &NodeId,
            k: FragmentKey,
            data: &[u8],
        ) -> Result<FragmentInfo, FragmentError> {
            self.store.put(c, k, data, &h(data))
        }

        fn used(&self, c: &NodeId) -> u64 {
            self.store
                .account(c)
                .expect("account")
                .expect("exists")
                .used
        }

        fn list_all(&self, c: &NodeId) -> Vec<FragmentInfo> {
            self.store.list(c, None, MAX_LIST).expect("list").0
        }
    }

    fn roundtrip(store: &FragmentStore) {
        let a = node(1);
        store.grant(a, 1000, 10_000).expect("grant");
        let k1 = fkey(0xab, 0);
        let k2 = fkey(0xab, 1);
        let info = store.put(&a, k1, b"hello", &h(b"hello")).expect("put");
        assert_eq!(
            info,
            FragmentInfo {
                key: k1,
                size: 5,
                hash: h(b"hello")
            }
        );
        store.put(&a, k2, b"world!", &h(b"world!")).expect("put");
        assert_eq!(store.get(&a, k1).expect("get"), b"hello");
        assert_eq!(store.get(&a, k2).expect("get"), b"world!");
        let (list, more) = store.list(&a, None, 10).expect("list");
        assert!(!more);
        assert_eq!(
            list.iter().map(|i| (i.key, i.size)).collect::<Vec<_>>(),
            vec![(k1, 5), (k2, 6)]
        );
        assert_eq!(store.account(&a).expect("account").expect("some").used, 11);
        assert_eq!(store.delete(&a, k1).expect("delete"), 5);
        assert!(matches!(store.get(&a, k1), Err(FragmentError::NotFound)));
        assert!(matches!(store.delete(&a, k1), Err(FragmentError::NotFound)));
        assert_eq!(store.account(&a).expect("account").expect("some").used, 6);
        assert!(
            !store
                .root()
                .join(a.to_string())
                .join("ab")
                .join(k1.file_name())
                .exists()
        );
        assert!(
            store
                .root()
                .join(a.to_string())
                .join("ab")
                .join(k2.file_name())
                .is_file()
        );
    }

    #[test]
    fn roundtrip_mem() {
        let f = Fixture::mem();
        roundtrip(&f.store);
    }

    #[test]
    fn roundtrip_rocks_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let kv: Arc<dyn KvStore> =
                Arc::new(RocksStore::open(&dir.path().join("db")).expect("db"));
            let store = FragmentStore::open(dir.path().join("store"), kv.clone()).expect("open");
            roundtrip(&store);
            kv.flush().expect("flush");
        }
        let kv: Arc<dyn KvStore> = Arc::new(RocksStore::open(&dir.path().join("db")).expect("db"));
        let store = FragmentStore::open(dir.path().join("store"), kv).expect("reopen");
        assert_eq!(store.recovery_report(), &RecoveryReport::default());
        assert_eq!(store.get(&node(1), fkey(0xab, 1)).expect("get"), b"world!");
        assert_eq!(
            store
                .account(&node(1))
                .expect("account")
                .expect("some")
                .used,
            6
        );
    }

    #[test]
    fn list_pages_with_after_and_limit() {
        let f = Fixture::mem();
        let a = node(1);
        f.store.grant(a, 1 << 20, 1 << 30).expect("grant");
        let mut keys = Vec::new();
        for b in [3u8, 1, 2] {
            for p in [2u32, 0, 256] {
                let k = fkey(b, p);
                f.put(&a, k, &[b; 3]).expect("put");
                keys.push(k);
            }
        }
        keys.sort();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = f.store.list(&a, after, 4).expect("list");
            assert!(page.len() <= 4);
            seen.extend(page.iter().map(|i| i.key));
            after = page.last().map(|i| i.key);
            if !more {
                break;
            }
        }
        assert_eq!(seen, keys);
        let (page, more) = f.store.list(&a, Some(keys[8]), 4).expect("list");
        assert!(page.is_empty() && !more);
        let (page, more) = f.store.list(&a, None, 0).expect("list");
        assert!(page.is_empty() && more);
        let (page, more) = f.store.list(&a, Some(keys[2]), 2).expect("list");
        assert_eq!(page.iter().map(|i| i.key).collect::<Vec<_>>(), keys[3..5]);
        assert!(more);
        // `after` need not exist.
        let (page, _) = f.store.list(&a, Some(fkey(1, 1)), 1).expect("list");
        assert_eq!(page[0].key, fkey(1, 2));
    }

    #[test]
    fn over_quota_is_refused_and_nothing_is_written() {
        let f = Fixture::mem();
        let a = node(1);
        f.store.grant(a, 10, 100).expect("grant");
        f.put(&a, fkey(1, 0), &[1; 8]).expect("put");
        let before = f.files();
        match f.put(&a, fkey(2, 0), &[2; 3]) {
            Err(FragmentError::OverQuota {
                needed: 3,
                available: 2,
            }) => {}
            other => panic!("expected OverQuota, got {other:?}"),
        }
        assert_eq!(f.files(), before);
        assert_eq!(f.used(&a), 8);
        assert!(matches!(
            f.store.get(&a, fkey(2, 0)),
            Err(FragmentError::NotFound)
        ));
        // Replacing counts the old size as freed: 8 -> 10 fits.
        f.put(&a, fkey(1, 0), &[3; 10]).expect("replace");
        assert_eq!(f.used(&a), 10);
        assert_eq!(f.store.get(&a, fkey(1, 0)).expect("get"), vec![3; 10]);
        f.put(&a, fkey(1, 0), &[4; 1]).expect("shrink");
        assert_eq!(f.used(&a), 1);
        assert_eq!(f.list_all(&a).len(), 1);
        f.put(&a, fkey(2, 0), &[5; 9]).expect("fits now");
        assert_eq!(f.used(&a), 10);
    }

    #[test]
    fn grant_refuses_more_than_donated() {
        let f = Fixture::mem();
        let (a, b) = (node(1), node(2));
        f.store.grant(a, 600, 1000).expect("grant a");
        match f.store.grant(b, 500, 1000) {
            Err(FragmentError::NoSpace {
                requested: 500,
                available: 400,
            }) => {}
            other => panic!("expected NoSpace, got {other:?}"),
        }
        assert!(f.store.account(&b).expect("account").is_none());
        f.store.grant(b, 400, 1000).expect("grant b");
        // Changing a's own quota does not count a's old quota.
        f.store.grant(a, 600, 1000).expect("same");
        assert!(matches!(
            f.store.grant(a, 601, 1000),
            Err(FragmentError::NoSpace { .. })
        ));
        f.store.grant(a, 100, 1000).expect("shrink");
        assert_eq!(f.store.accounts().expect("accounts").len(), 2);
    }

    #[test]
    fn customers_are_isolated() {
        let f = Fixture::mem();
        let (a, b) = (node(1), node(2));
        f.store.grant(a, 100, 1000).expect("grant");
        f.store.grant(b, 100, 1000).expect("grant");
        let k = fkey(7, 3);
        f.put(&a, k, b"secret").expect("put");
        assert!(matches!(f.store.get(&b, k), Err(FragmentError::NotFound)));
        assert!(f.list_all(&b).is_empty());
        assert!(matches!(
            f.store.delete(&b, k),
            Err(FragmentError::NotFound)
        ));
        // B storing the same key gets its own copy.
        f.put(&b, k, b"other").expect("put");
        assert_eq!(f.store.get(&a, k).expect("get"), b"secret");
        assert_eq!(f.store.get(&b, k).expect("get"), b"other");
        assert_eq!(f.store.delete(&b, k).expect("delete"), 5);
        assert_eq!(f.store.get(&a, k).expect("get"), b"secret");
        assert_eq!((f.used(&a), f.used(&b)), (6, 0));
    }

    #[test]
    fn no_service_cancel_and_purge() {
        let f = Fixture::mem();
        let (a, b) = (node(1), node(2));
        let k = fkey(9, 0);
        assert!(matches!(f.put(&a, k, b"x"), Err(FragmentError::NoService)));
        assert!(matches!(
            f.store.cancel(&a, 0),
            Err(FragmentError::NoService)
        ));
        assert!(f.files().is_empty());
        f.store.grant(a, 100, 1000).expect("grant");
        f.store.grant(b, 100, 1000).expect("grant");
        f.put(&a, k, b"data").expect("put");
        f.put(&b, k, b"bdata").expect("put");
        f.store.cancel(&a, 1000).expect("cancel");
        f.store
            .cancel(&a, 5000)
            .expect("cancel again keeps the first date");
        assert_eq!(
            f.store.account(&a).expect("account").expect("some").state,
            AccountState::Cancelled { since_unix: 1000 }
        );
        assert!(matches!(
            f.put(&a, fkey(9, 1), b"y"),
            Err(FragmentError::NoService)
        ));
        assert_eq!(f.store.get(&a, k).expect("still readable"), b"data");
        // Before the grace period: nothing happens.
        assert!(
            f.store
                .purge_expired(1000 + 86_399, DAY)
                .expect("purge")
                .is_empty()
        );
        assert_eq!(f.store.get(&a, k).expect("get"), b"data");
        // Re-granting re-activates and keeps the data.
        f.store.grant(a, 100, 1000).expect("regrant");
        assert_eq!(
            f.store.account(&a).expect("a").expect("a").state,
            AccountState::Active
        );
        assert_eq!(f.used(&a), 4);
        f.store.cancel(&a, 2000).expect("cancel");
        assert_eq!(
            f.store.purge_expired(2000 + 86_400, DAY).expect("purge"),
            vec![a]
        );
        assert!(f.store.account(&a).expect("account").is_none());
        assert!(matches!(f.store.get(&a, k), Err(FragmentError::NotFound)));
        assert!(!f.root().join(a.to_string()).exists());
        assert_eq!(f.store.get(&b, k).expect("b untouched"), b"bdata");
        assert!(
            f.kv.scan(CF, &index_prefix(FRAGMENT, &a), None, 10)
                .expect("scan")
                .is_empty()
        );
    }

    #[test]
    fn purge_pages_through_many_fragments() {
        let f = Fixture::mem();
        let a = node(1);
        f.store.grant(a, 1 << 20, 1 << 30).expect("grant");
        for i in 0..(PAGE as u32 + 5) {
            let mut block = [0u8; 32];
            block[..4].copy_from_slice(&i.to_be_bytes());
            f.put(&a, FragmentKey { block, position: 0 }, &[1])
                .expect("put");
        }
        f.store.cancel(&a, 0).expect("cancel");
        assert_eq!(
            f.store
                .purge_expired(10, Duration::from_secs(10))
                .expect("purge"),
            vec![a]
        );
        assert!(f.files().is_empty());
        assert!(f.kv.scan(CF, b"", None, 10).expect("scan").is_empty());
    }

    #[test]
    fn hash_mismatch_leaves_nothing() {
        let f = Fixture::mem();
        let a = node(1);
        f.store.grant(a, 100, 1000).expect("grant");
        assert!(matches!(
            f.store.put(&a, fkey(1, 0), b"data", &h(b"other")),
            Err(FragmentError::HashMismatch)
        ));
        assert!(f.files().is_empty());
        assert!(f.list_all(&a).is_empty());
        assert_eq!(f.used(&a), 0);
    }

    #[test]
    fn altered_file_is_corrupt() {
        let f = Fixture::mem();
        let a = node(1);
        f.store.grant(a, 100, 1000).expect("grant");
        let k = fkey(0x5c, 2);
        f.put(&a, k, b"original").expect("put");
        let path = f.store.fragment_path(&a, &k);
        assert_eq!(
            path,
            f.root()
                .join(a.to_string())
                .join("5c")
                .join(format!("{}.2", "5c".repeat(32)))
        );
        fs::write(&path, b"0riginal").expect("alter");
        assert!(matches!(f.store.get(&a, k), Err(FragmentError::Corrupt)));
        fs::write(&path, b"longer content").expect("alter");
        assert!(matches!(f.store.get(&a, k), Err(FragmentError::Corrupt)));
        fs::remove_file(&path).expect("remove");
        assert!(matches!(f.store.get(&a, k), Err(FragmentError::Corrupt)));
    }

    #[test]
    fn recovery_after_crashes() {
        let mut f = Fixture::mem();
        let a = node(1);
        f.store.grant(a, 1000, 10_000).expect("grant");
        let (keep, gone, resized) = (fkey(1, 0), fkey(2, 0), fkey(3, 0));
        for k in [keep, gone, resized] {
            f.put(&a, k, b"0123456789").expect("put");
        }
        assert_eq!(f.used(&a), 30);
        // (a) a leftover temp file, in a block dir and in the customer dir.
        let tmp = f.store.block_dir(&a, &[1; 32]).join(".tmp-whatever.0.1234");
        fs::write(&tmp, b"partial").expect("tmp");
        fs::write(f.store.customer_dir(&a).join(".tmp-x"), b"").expect("tmp");
        // (b) a renamed fragment file without an index entry, also for an unknown customer.
        let orphan = fkey(4, 7);
        let dir = f.store.ensure_block_dir(&a, &orphan.block).expect("dir");
        fs::write(dir.join(orphan.file_name()), b"unacked").expect("orphan");
        let stranger = node(9);
        let sdir = f
            .store
            .ensure_block_dir(&stranger, &orphan.block)
            .expect("dir");
        fs::write(sdir.join(orphan.file_name()), b"unacked").expect("orphan");
        // (c) an index entry whose file was deleted, and one whose file has the wrong size.
        fs::remove_file(f.store.fragment_path(&a, &gone)).expect("rm");
        fs::write(f.store.fragment_path(&a, &resized), b"short").expect("resize");
        // Not ours: left alone.
        fs::write(f.root().join("README"), b"hi").expect("foreign");

        f.reopen();
        let report = f.store.recovery_report().clone();
        assert_eq!(report.temp_files_removed, 2);
        assert_eq!(report.orphan_files_removed, 2);
        assert_eq!(report.entries_dropped, 2);
        assert_eq!(report.accounts_corrected, 1);
        assert_eq!(
            f.list_all(&a).iter().map(|i| i.key).collect::<Vec<_>>(),
            vec![keep]
        );
        assert_eq!(f.used(&a), 10);
        for k in [gone, resized, orphan] {
            assert!(
                matches!(f.store.get(&a, k), Err(FragmentError::NotFound)),
                "{k:?}"
            );
        }
        assert_eq!(f.store.get(&a, keep).expect("get"), b"0123456789");
        let mut want = vec!["README".to_string(), format!("{a}/01/{}", keep.file_name())];
        want.sort();
        assert_eq!(f.files(), want);
        // A second open finds nothing to do.
        f.reopen();
        assert_eq!(f.store.recovery_report(), &RecoveryReport::default());
    }

    #[test]
    fn recovery_of_an_interrupted_replace() {
        let mut f = Fixture::mem();
        let a = node(1);
        f.store.grant(a, 1000, 10_000).expect("grant");
        let (before_rename, after_rename) = (fkey(1, 0), fkey(2, 0));
        f.put(&a, before_rename, b"old one").expect("put");
        f.put(&a, after_rename, b"old two").expect("put");
        // Killed with the intent recorded: one before the rename, one after (same size).
        f.kv.put(CF, &index_key(PENDING, &a, &before_rename), &[VERSION])
            .expect("intent");
        f.kv.put(CF, &index_key(PENDING, &a, &after_rename), &[VERSION])
            .expect("intent");
        fs::write(f.store.fragment_path(&a, &after_rename), b"new two").expect("renamed");
        f.reopen();
        assert_eq!(f.store.recovery_report().replaces_rolled_back, 1);
        assert_eq!(f.store.get(&a, before_rename).expect("kept"), b"old one");
        assert!(matches!(
            f.store.get(&a, after_rename),
            Err(FragmentError::NotFound)
        ));
        assert_eq!(f.used(&a), 7);
        assert!(f.kv.scan(CF, PENDING, None, 10).expect("scan").is_empty());
        assert_eq!(f.files().len(), 1);
    }

    #[test]
    fn full_disk_is_an_io_error_and_leaves_nothing() {
        let f = Fixture::mem();
        let a = node(1);
        f.store.grant(a, 1000, 10_000).expect("grant");
        let k = fkey(1, 0);
        *f.store.fault.lock().expect("fault") = Some(Fault::Write);
        let err = f.put(&a, k, b"data").expect_err("enospc");
        assert_eq!(err.reason(), "io");
        match &err {
            FragmentError::Io { context, source } => {
                assert!(context.contains("writing"), "{context}");
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
            }
            other => panic!("{other:?}"),
        }
        assert!(f.files().is_empty());
        assert_eq!(f.used(&a), 0);
        assert!(f.list_all(&a).is_empty());
        // The store keeps working; a replace whose rename fails keeps the old fragment.
        f.put(&a, k, b"data").expect("put");
        *f.store.fault.lock().expect("fault") = Some(Fault::Rename);
        assert!(matches!(
            f.put(&a, k, b"newer data"),
            Err(FragmentError::Io { .. })
        ));
        assert_eq!(f.store.get(&a, k).expect("old kept"), b"data");
        assert_eq!(f.used(&a), 4);
        assert_eq!(f.files(), vec![format!("{a}/01/{}", k.file_name())]);
        assert!(f.kv.scan(CF, PENDING, None, 10).expect("scan").is_empty());
    }

    #[test]
    fn reasons_are_stable() {
        let reasons: Vec<_> = [
            FragmentError::NoService,
            FragmentError::NoSpace {
                requested: 1,
                available: 0,
            },
            FragmentError::OverQuota {
                needed: 1,
                available: 0,
            },
            FragmentError::NotFound,
            FragmentError::HashMismatch,
            FragmentError::Corrupt,
            FragmentError::Io {
                context: "x".into(),
                source: io::Error::other("y"),
            },
            FragmentError::Db(StoreError::Db("z".into())),
        ]
        .iter()
        .map(FragmentError::reason)
        .collect();
        assert_eq!(
            reasons,
            [
                "no_service",
                "no_space",
                "over_quota",
                "not_found",
                "hash_mismatch",
                "corrupt",
                "io",
                "db"
            ]
        );
    }

    #[test]
    fn encodings_roundtrip() {
        let acct = CustomerAccount {
            customer: node(3),
            quota: u64::MAX,
            used: 12345,
            state: AccountState::Cancelled { since_unix: 77 },
        };
        assert_eq!(
            decode_account(node(3), &encode_account(&acct)).expect("decode"),
            acct
        );
        let e = decode_entry(&encode_entry(9, &[7; 32])).expect("decode");
        assert_eq!(
            e,
            Entry {
                size: 9,
                hash: [7; 32]
            }
        );
        let k = fkey(0xfe, u32::MAX);
        assert_eq!(
            parse_index_key(FRAGMENT, &index_key(FRAGMENT, &node(3), &k)),
            Some((node(3), k))
        );
        assert_eq!(parse_file_name(&k.file_name()), Some(k));
        assert_eq!(parse_file_name(&format!("{}.01", "ab".repeat(32))), None);
        assert_eq!(parse_file_name(&format!("{}.1", "AB".repeat(32))), None);
        assert_eq!(parse_file_name("../etc.1"), None);
    }

    #[test]
    fn corrupt_index_records_are_errors() {
        let f = Fixture::mem();
        let a = node(1);
        f.kv.put(CF, &account_key(&a), b"\x02garbage").expect("put");
        assert!(matches!(f.store.account(&a), Err(FragmentError::Corrupt)));
        f.kv.put(CF, &index_key(FRAGMENT, &a, &fkey(1, 0)), b"\x01short")
            .expect("put");
        assert!(matches!(
            f.store.get(&a, fkey(1, 0)),
            Err(FragmentError::Corrupt)
        ));
        assert!(matches!(
            f.store.list(&a, None, 10),
            Err(FragmentError::Corrupt)
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn decoders_never_panic(v in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_account(node(1), &v);
            let _ = decode_entry(&v);
            let _ = parse_index_key(FRAGMENT, &v);
            let _ = parse_account(&v, &v);
        }

        #[test]
        fn matches_a_simple_model(ops in proptest::collection::vec(
            (0u8..4, 0u8..2, 0u8..3, 0u32..2, 0usize..40), 1..40)) {
            let mut f = Fixture::mem();
            let customers = [node(1), node(2)];
            const QUOTA: u64 = 100;
            for c in customers {
                f.store.grant(c, QUOTA, 1000).expect("grant");
            }
            let mut model: BTreeMap<(usize, FragmentKey), Vec<u8>> = BTreeMap::new();
            for (step, (op, ci, b, p, len)) in ops.into_iter().enumerate() {
                let ci = ci as usize;
                let c = customers[ci];
                let k = fkey(b, p);
                match op {
                    0 | 1 => {
                        let data = vec![step as u8; len];
                        let old = model.get(&(ci, k)).map_or(0, |d| d.len() as u64);
                        let used: u64 = model.iter().filter(|((x, _), _)| *x == ci).map(|(_, d)| d.len() as u64).sum();
                        let fits = used - old + len as u64 <= QUOTA;
                        match f.put(&c, k, &data) {
                            Ok(info) => {
                                prop_assert!(fits);
                                prop_assert_eq!(info.size, len as u64);
                                model.insert((ci, k), data);
                            }
                            Err(FragmentError::OverQuota { .. }) => prop_assert!(!fits),
                            Err(e) => panic!("put: {e:?}"),
                        }
                    }
                    2 => match (f.store.delete(&c, k), model.remove(&(ci, k))) {
                        (Ok(n), Some(d)) => prop_assert_eq!(n, d.len() as u64),
                        (Err(FragmentError::NotFound), None) => {}
                        (got, want) => panic!("delete: {got:?} vs {want:?}"),
                    },
                    _ => f.reopen(),
                }
                for (ci, c) in customers.iter().enumerate() {
                    let want: Vec<FragmentInfo> = model
                        .iter()
                        .filter(|((x, _), _)| *x == ci)
                        .map(|((_, k), d)| FragmentInfo { key: *k, size: d.len() as u64, hash: h(d) })
                        .collect();
                    let mut got = Vec::new();
                    let mut after = None;
                    loop {
                        let (page, more) = f.store.list(c, after, 2).expect("list");
                        after = page.last().map(|i| i.key);
                        got.extend(page);
                        if !more { break; }
                    }
                    prop_assert_eq!(&got, &want);
                    prop_assert_eq!(f.used(c), want.iter().map(|i| i.size).sum::<u64>());
                }
                if let Some(d) = model.get(&(ci, k)) {
                    prop_assert_eq!(&f.store.get(&c, k).expect("get"), d);
                }
            }
            prop_assert_eq!(f.files().len(), model.len());
            prop_assert_eq!(f.store.recovery_report().clone(), RecoveryReport::default());
        }
    }
}
