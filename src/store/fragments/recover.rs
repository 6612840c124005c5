//! Crash recovery at `open`: finishes or rolls back interrupted replaces, removes temp and
//! orphan files, drops entries whose file is gone or wrong, and recomputes every `used`.

use std::collections::BTreeSet;
use std::fs;
use std::io;

use super::index::{
    FRAGMENT, PENDING, account_key, decode_entry, encode_account, index_key, parse_index_key,
};
use super::layout::{
    TMP_PREFIX, file_matches, is_shard_name, parse_customer_dir, parse_file_name, read_dir,
    remove_if_exists,
};
use super::{CF, CustomerAccount, FragmentError, FragmentStore, PAGE, RecoveryReport, io_err};
use crate::crypto::identity::NodeId;
use crate::store::Batch;
use crate::store::codec::KvPages;

impl FragmentStore {
    pub(super) fn recover(&self) -> Result<RecoveryReport, FragmentError> {
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
    /// has the wrong size; then sets every account's `used` to the sum of its entries' charges
    /// and its `fragments` to their count (a store written before fragments were charged their
    /// overhead is brought up to date here).
    fn check_entries(&self, report: &mut RecoveryReport) -> Result<(), FragmentError> {
        struct Current {
            customer: NodeId,
            account: Option<CustomerAccount>,
            sum: u64,
            count: u64,
        }
        let finish = |cur: Current, batch: &mut Batch, report: &mut RecoveryReport| {
            if let Some(mut account) = cur.account
                && (account.used != cur.sum || account.fragments != cur.count)
            {
                account.used = cur.sum;
                account.fragments = cur.count;
                batch.put(CF, account_key(&cur.customer), encode_account(&account));
                report.accounts_corrected += 1;
            }
        };
        let mut seen: BTreeSet<NodeId> = BTreeSet::new();
        let mut current: Option<Current> = None;
        for page in self.kv.pages(CF, FRAGMENT, PAGE) {
            let mut batch = Batch::new();
            for (k, v) in page? {
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
                        count: 0,
                    });
                }
                let cur = current.as_mut().expect("set above");
                let path = self.fragment_path(&customer, &key);
                let keep = cur.account.is_some()
                    && match decode_entry(&v) {
                        Ok(entry) => match fs::metadata(&path) {
                            Ok(m) if m.is_file() && m.len() == entry.size => {
                                cur.sum = cur.sum.saturating_add(self.charge(entry.size));
                                cur.count += 1;
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
            if !batch.is_empty() {
                self.kv.write(batch)?;
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
            if (a.used != 0 || a.fragments != 0) && !seen.contains(&a.customer) {
                zero.push(a);
            }
            Ok(())
        })?;
        for mut a in zero {
            a.used = 0;
            a.fragments = 0;
            self.kv
                .put(CF, &account_key(&a.customer), &encode_account(&a))?;
            report.accounts_corrected += 1;
        }
        Ok(())
    }
}
