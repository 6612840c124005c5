use super::index::*;
use super::layout::parse_file_name;
use super::*;
use crate::store::{MemStore, Op, RocksStore};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::fs;
use std::sync::Mutex;

/// Where a test makes the next file operation fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// While writing the temp file, as a full disk would (ENOSPC).
    Write,
    SyncFile,
    Rename,
    SyncDir,
    CreateDir,
}

/// One file operation or index write, in the order the store made it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    CreateDir(PathBuf),
    SyncDir(PathBuf),
    Write(PathBuf),
    SyncFile(PathBuf),
    Rename(PathBuf, PathBuf),
    /// One index batch: the keys it puts or deletes.
    Index(Vec<Vec<u8>>),
}

type Log = Arc<Mutex<Vec<Step>>>;

fn take(log: &Log) -> Vec<Step> {
    std::mem::take(&mut *log.lock().expect("log"))
}

/// The real file operations, recorded, with one injectable failure (ENOSPC).
#[derive(Default)]
struct TestFs {
    log: Log,
    fail: Mutex<Option<Fault>>,
}

impl TestFs {
    fn fail_next(&self, at: Fault) {
        *self.fail.lock().expect("fault") = Some(at);
    }

    fn step(&self, at: Fault, step: Step) -> io::Result<()> {
        self.log.lock().expect("log").push(step);
        let mut fail = self.fail.lock().expect("fault");
        if *fail == Some(at) {
            *fail = None;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

impl FileSystem for TestFs {
    fn write_new(&self, path: &Path, data: &[u8]) -> io::Result<File> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
        // The file exists before the disk fills, as with a real ENOSPC.
        self.step(Fault::Write, Step::Write(path.to_path_buf()))?;
        f.write_all(data)?;
        Ok(f)
    }

    fn sync_file(&self, file: &File, path: &Path) -> io::Result<()> {
        self.step(Fault::SyncFile, Step::SyncFile(path.to_path_buf()))?;
        RealFs.sync_file(file, path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.step(
            Fault::Rename,
            Step::Rename(from.to_path_buf(), to.to_path_buf()),
        )?;
        RealFs.rename(from, to)
    }

    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        self.step(Fault::CreateDir, Step::CreateDir(dir.to_path_buf()))?;
        RealFs.create_dir(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.step(Fault::SyncDir, Step::SyncDir(dir.to_path_buf()))?;
        RealFs.sync_dir(dir)
    }
}

/// A `MemStore` that records each batch in the same log as the file operations.
struct RecordingKv {
    inner: MemStore,
    log: Log,
}

impl KvStore for RecordingKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(cf, key)
    }

    fn write(&self, batch: Batch) -> Result<(), StoreError> {
        let keys = batch
            .ops()
            .iter()
            .map(|op| match op {
                Op::Put { key, .. } | Op::Delete { key, .. } => key.clone(),
            })
            .collect();
        self.log.lock().expect("log").push(Step::Index(keys));
        self.inner.write(batch)
    }

    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<crate::store::KeyValue>, StoreError> {
        self.inner.scan(cf, prefix, from, limit)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
}

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

/// Payload bytes only: the tests of the quota's arithmetic and of the write path count in
/// bytes; the production charge and the cap have tests of their own (and the model test).
const BYTES: Limits = Limits {
    min_charge: 0,
    entry_overhead: 0,
    max_fragments: MAX_FRAGMENTS,
};

struct Fixture {
    dir: tempfile::TempDir,
    kv: Arc<dyn KvStore>,
    fs: Arc<TestFs>,
    store: FragmentStore,
    limits: Limits,
}

impl Fixture {
    fn mem() -> Self {
        Self::with(BYTES)
    }

    fn with(limits: Limits) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv: Arc<dyn KvStore> = Arc::new(MemStore::new());
        let fs = Arc::new(TestFs::default());
        let store =
            FragmentStore::open_with(dir.path().join("store"), kv.clone(), fs.clone(), limits)
                .expect("open");
        Fixture {
            dir,
            kv,
            fs,
            store,
            limits,
        }
    }

    fn reopen(&mut self) {
        self.store =
            FragmentStore::open_with(self.root(), self.kv.clone(), self.fs.clone(), self.limits)
                .expect("reopen");
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

    fn put(&self, c: &NodeId, k: FragmentKey, data: &[u8]) -> Result<FragmentInfo, FragmentError> {
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
    grant(store, a, 1 << 20, 1 << 30).expect("grant");
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
    assert_eq!(
        store.account(&a).expect("account").expect("some").used,
        store.charge(5) + store.charge(6)
    );
    assert_eq!(store.delete(&a, k1).expect("delete"), 5);
    assert!(matches!(store.get(&a, k1), Err(FragmentError::NotFound)));
    assert!(matches!(store.delete(&a, k1), Err(FragmentError::NotFound)));
    assert_eq!(
        store.account(&a).expect("account").expect("some").used,
        store.charge(6)
    );
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
        let kv: Arc<dyn KvStore> = Arc::new(RocksStore::open(&dir.path().join("db")).expect("db"));
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
        charge(6)
    );
}

#[test]
fn list_pages_with_after_and_limit() {
    let f = Fixture::mem();
    let a = node(1);
    grant(&f.store, a, 1 << 20, 1 << 30).expect("grant");
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
    grant(&f.store, a, 10, 100).expect("grant");
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
    grant(&f.store, a, 600, 1000).expect("grant a");
    match grant(&f.store, b, 500, 1000) {
        Err(FragmentError::NoSpace {
            requested: 500,
            available: 400,
        }) => {}
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert!(f.store.account(&b).expect("account").is_none());
    grant(&f.store, b, 400, 1000).expect("grant b");
    // Changing a's own quota does not count a's old quota.
    grant(&f.store, a, 600, 1000).expect("same");
    assert!(matches!(
        grant(&f.store, a, 601, 1000),
        Err(FragmentError::NoSpace { .. })
    ));
    grant(&f.store, a, 100, 1000).expect("shrink");
    assert_eq!(f.store.accounts().expect("accounts").len(), 2);
}

#[test]
fn a_new_grant_replaces_the_quota_and_keeps_the_data() {
    let f = Fixture::mem();
    let a = node(1);
    grant(&f.store, a, 100, 1000).expect("grant");
    f.put(&a, fkey(1, 0), b"data").expect("put");
    grant(&f.store, a, 300, 1000).expect("grow");
    let account = f.store.account(&a).expect("account").expect("some");
    assert_eq!((account.quota, account.used), (300, 4));
    grant(&f.store, a, 2, 1000).expect("below used is allowed");
    assert_eq!(
        f.store.account(&a).expect("account").expect("some").quota,
        2
    );
    assert!(matches!(
        f.put(&a, fkey(2, 0), b"x"),
        Err(FragmentError::OverQuota { .. })
    ));
}

#[test]
fn a_directory_that_cannot_be_created_fails_the_put() {
    let f = Fixture::mem();
    let a = node(1);
    grant(&f.store, a, 100, 1000).expect("grant");
    f.fs.fail_next(Fault::CreateDir);
    match f.put(&a, fkey(1, 0), b"data") {
        Err(FragmentError::Io { context, source }) => {
            assert!(context.contains("creating"), "{context}");
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(f.list_all(&a).is_empty());
    f.put(&a, fkey(1, 0), b"data")
        .expect("put once the disk has room");
}

#[test]
fn customers_are_isolated() {
    let f = Fixture::mem();
    let (a, b) = (node(1), node(2));
    grant(&f.store, a, 100, 1000).expect("grant");
    grant(&f.store, b, 100, 1000).expect("grant");
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
    grant(&f.store, a, 100, 1000).expect("grant");
    grant(&f.store, b, 100, 1000).expect("grant");
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
    grant(&f.store, a, 100, 1000).expect("regrant");
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
    grant(&f.store, a, 1 << 20, 1 << 30).expect("grant");
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
    grant(&f.store, a, 100, 1000).expect("grant");
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
    grant(&f.store, a, 100, 1000).expect("grant");
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
    grant(&f.store, a, 1000, 10_000).expect("grant");
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
    grant(&f.store, a, 1000, 10_000).expect("grant");
    let (before_rename, after_rename) = (fkey(1, 0), fkey(2, 0));
    f.put(&a, before_rename, b"old one").expect("put");
    f.put(&a, after_rename, b"old two").expect("put");
    // Killed with the intent recorded: one before the rename, one after (same size).
    f.kv.put(
        CF,
        &index_key(PENDING, &a, &before_rename),
        &encode_intent(),
    )
    .expect("intent");
    f.kv.put(CF, &index_key(PENDING, &a, &after_rename), &encode_intent())
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
    grant(&f.store, a, 1000, 10_000).expect("grant");
    let k = fkey(1, 0);
    f.fs.fail_next(Fault::Write);
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
    f.fs.fail_next(Fault::Rename);
    assert!(matches!(
        f.put(&a, k, b"newer data"),
        Err(FragmentError::Io { .. })
    ));
    assert_eq!(f.store.get(&a, k).expect("old kept"), b"data");
    assert_eq!(f.used(&a), 4);
    assert_eq!(f.files(), vec![format!("{a}/01/{}", k.file_name())]);
    assert!(f.kv.scan(CF, PENDING, None, 10).expect("scan").is_empty());
}

/// A store whose file operations and index batches land in one log.
fn recorded() -> (tempfile::TempDir, Log, FragmentStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::default();
    let kv = Arc::new(RecordingKv {
        inner: MemStore::new(),
        log: log.clone(),
    });
    let fs = Arc::new(TestFs {
        log: log.clone(),
        fail: Mutex::new(None),
    });
    let store = FragmentStore::open_with(dir.path().join("store"), kv, fs, BYTES).expect("open");
    (dir, log, store)
}

/// Durability: the file's bytes are on disk before the rename publishes its name, the name is on
/// disk before the index says the fragment exists (and the customer gets its ack). Removing
/// either fsync, or moving it after the index batch, fails here.
#[test]
fn put_writes_syncs_renames_syncs_the_directory_then_indexes() {
    let (_dir, log, store) = recorded();
    let a = node(1);
    grant(&store, a, 1000, 10_000).expect("grant");
    take(&log);
    let k = fkey(0xab, 3);
    store.put(&a, k, b"hello", &h(b"hello")).expect("put");
    let (root, cdir, bdir) = (
        store.root().to_path_buf(),
        store.customer_dir(&a),
        store.block_dir(&a, &k.block),
    );
    let final_path = store.fragment_path(&a, &k);
    let steps = take(&log);
    let tmp = match steps.get(4) {
        Some(Step::Write(tmp)) => tmp.clone(),
        _ => panic!("no write where expected: {steps:?}"),
    };
    assert_eq!(
        tmp.parent(),
        Some(bdir.as_path()),
        "the rename stays in one directory"
    );
    assert_eq!(
        steps,
        vec![
            // New directories: each one's name made durable in its parent.
            Step::CreateDir(cdir.clone()),
            Step::SyncDir(root),
            Step::CreateDir(bdir.clone()),
            Step::SyncDir(cdir),
            Step::Write(tmp.clone()),
            Step::SyncFile(tmp.clone()),
            Step::Rename(tmp, final_path.clone()),
            Step::SyncDir(bdir.clone()),
            Step::Index(vec![index_key(FRAGMENT, &a, &k), account_key(&a)]),
        ]
    );

    // A replace in the same directory: no directory is created; the intent comes before the
    // rename and is cleared by the same batch that records the new entry.
    store.put(&a, k, b"world!", &h(b"world!")).expect("replace");
    let steps = take(&log);
    let tmp = match steps.first() {
        Some(Step::Write(tmp)) => tmp.clone(),
        _ => panic!("no write first: {steps:?}"),
    };
    assert_eq!(
        steps,
        vec![
            Step::Write(tmp.clone()),
            Step::SyncFile(tmp.clone()),
            Step::Index(vec![index_key(PENDING, &a, &k)]),
            Step::Rename(tmp, final_path),
            Step::SyncDir(bdir),
            Step::Index(vec![
                index_key(FRAGMENT, &a, &k),
                account_key(&a),
                index_key(PENDING, &a, &k),
            ]),
        ]
    );
    assert_eq!(store.get(&a, k).expect("get"), b"world!");
}

/// A failed fsync is a failed put: nothing is indexed, nothing is left on disk, nothing is
/// acknowledged; for a replace, the old fragment is kept when its file was not touched.
#[test]
fn a_failed_fsync_fails_the_put_and_leaves_nothing() {
    let f = Fixture::mem();
    let a = node(1);
    grant(&f.store, a, 1000, 10_000).expect("grant");
    let k = fkey(1, 0);
    f.fs.fail_next(Fault::SyncFile);
    match f.put(&a, k, b"data") {
        Err(FragmentError::Io { context, source }) => {
            assert!(context.contains("writing"), "{context}");
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(f.files().is_empty());
    assert!(f.list_all(&a).is_empty());
    // The directory fsync fails after the rename: the new file goes again.
    f.fs.fail_next(Fault::SyncDir);
    match f.put(&a, k, b"data") {
        Err(FragmentError::Io { context, .. }) => assert!(context.contains("syncing"), "{context}"),
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(f.files().is_empty(), "{:?}", f.files());
    assert!(f.list_all(&a).is_empty());
    assert_eq!(f.used(&a), 0);
    f.put(&a, k, b"data").expect("put");
    f.fs.fail_next(Fault::SyncFile);
    assert!(matches!(
        f.put(&a, k, b"newer"),
        Err(FragmentError::Io { .. })
    ));
    assert_eq!(f.store.get(&a, k).expect("old kept"), b"data");
    assert_eq!(f.files(), vec![format!("{a}/01/{}", k.file_name())]);
}

/// The production operations reach the system calls: each reports the kernel's error.
#[test]
fn real_fs_calls_through_to_the_system() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f");
    let file = RealFs.write_new(&path, b"abc").expect("write");
    assert_eq!(fs::read(&path).expect("read"), b"abc");
    let mode = fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        RealFs.write_new(&path, b"x").expect_err("exists").kind(),
        io::ErrorKind::AlreadyExists
    );
    RealFs.sync_file(&file, &path).expect("fsync");
    // fsync(2) on a pipe is EINVAL: only a real call can say so.
    let (_reader, writer) = io::pipe().expect("pipe");
    let pipe = File::from(std::os::fd::OwnedFd::from(writer));
    assert_eq!(
        RealFs
            .sync_file(&pipe, Path::new("pipe"))
            .expect_err("a pipe cannot be synced")
            .raw_os_error(),
        Some(libc::EINVAL)
    );
    let sub = dir.path().join("d");
    RealFs.create_dir(&sub).expect("mkdir");
    let mode = fs::metadata(&sub).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    RealFs.sync_dir(&sub).expect("sync dir");
    assert_eq!(
        RealFs
            .sync_dir(&dir.path().join("missing"))
            .expect_err("missing")
            .kind(),
        io::ErrorKind::NotFound
    );
    RealFs.rename(&path, &sub.join("g")).expect("rename");
    assert!(sub.join("g").is_file() && !path.exists());
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
        FragmentError::Empty,
        FragmentError::TooManyFragments { max: 1 },
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
            "empty",
            "too_many_fragments",
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
        fragments: 6,
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

/// Security review H5: a fragment is charged its real cost, so tiny fragments fill a quota
/// like 4 KiB ones do (they used to cost their payload only: a 1-byte fragment cost 1 byte).
#[test]
fn a_fragment_is_charged_at_least_its_minimum_and_its_index_entry() {
    let f = Fixture::with(Limits::DEFAULT);
    let a = node(1);
    assert_eq!(charge(1), MIN_CHARGE + ENTRY_OVERHEAD);
    assert_eq!(charge(1 << 20), (1 << 20) + ENTRY_OVERHEAD);
    // Room for two minimum charges and a bit: the third 1-byte fragment does not fit.
    grant(&f.store, a, 2 * charge(1) + 100, 1 << 30).expect("grant");
    f.put(&a, fkey(1, 0), b"x").expect("first");
    f.put(&a, fkey(2, 0), b"y").expect("second");
    assert!(matches!(
        f.put(&a, fkey(3, 0), b"z"),
        Err(FragmentError::OverQuota { needed, .. }) if needed == charge(1)
    ));
    assert_eq!(f.used(&a), 2 * charge(1));
    f.store.delete(&a, fkey(1, 0)).expect("delete");
    assert_eq!(f.used(&a), charge(1));
}

/// Security review H5, done-when "20,000 empty fragments are refused": each is refused before
/// any file or index entry exists, so the supplier's disk and database stay as they were.
#[test]
fn twenty_thousand_empty_fragments_are_refused_and_nothing_is_written() {
    let f = Fixture::with(Limits::DEFAULT);
    let a = node(1);
    grant(&f.store, a, 1 << 40, 1 << 41).expect("grant");
    let index_before = f.kv.scan(CF, b"", None, 10).expect("scan");
    for i in 0..20_000u32 {
        let mut block = [0u8; 32];
        block[..4].copy_from_slice(&i.to_be_bytes());
        let key = FragmentKey { block, position: 0 };
        assert!(
            matches!(f.put(&a, key, b""), Err(FragmentError::Empty)),
            "empty fragment {i} was not refused"
        );
    }
    assert!(f.files().is_empty(), "{:?}", &f.files()[..3]);
    assert_eq!(f.kv.scan(CF, b"", None, 10).expect("scan"), index_before);
    let account = f.store.account(&a).expect("account").expect("exists");
    assert_eq!((account.used, account.fragments), (0, 0));
}

/// Security review H5: a customer may hold at most `max_fragments`, whatever its quota; a
/// replace does not count as a new one, and a delete makes room.
#[test]
fn fragments_per_customer_are_capped() {
    let f = Fixture::with(Limits {
        max_fragments: 3,
        ..Limits::DEFAULT
    });
    let (a, b) = (node(1), node(2));
    grant(&f.store, a, 1 << 30, 1 << 32).expect("grant a");
    grant(&f.store, b, 1 << 30, 1 << 32).expect("grant b");
    for i in 0..3 {
        f.put(&a, fkey(i, 0), b"data").expect("under the cap");
    }
    assert!(matches!(
        f.put(&a, fkey(9, 0), b"data"),
        Err(FragmentError::TooManyFragments { max: 3 })
    ));
    f.put(&a, fkey(0, 0), b"new data")
        .expect("a replace is not a new fragment");
    f.put(&b, fkey(9, 0), b"data")
        .expect("another customer has its own count");
    f.store.delete(&a, fkey(1, 0)).expect("delete");
    f.put(&a, fkey(9, 0), b"data").expect("room again");
    assert_eq!(
        f.store
            .account(&a)
            .expect("account")
            .expect("exists")
            .fragments,
        3
    );
}

/// A store written before fragments were charged their overhead (or with a wrong count) is
/// brought up to date when it is opened.
#[test]
fn open_recomputes_charges_and_counts() {
    let mut f = Fixture::with(Limits::DEFAULT);
    let a = node(1);
    grant(&f.store, a, 1 << 30, 1 << 32).expect("grant");
    f.put(&a, fkey(1, 0), b"abc").expect("put");
    f.put(&a, fkey(2, 0), &[7; 5000]).expect("put");
    let mut old = f.store.account(&a).expect("account").expect("exists");
    old.used = 5003;
    old.fragments = 0;
    f.kv.put(CF, &account_key(&a), &encode_account(&old))
        .expect("write the old record");
    f.reopen();
    let now = f.store.account(&a).expect("account").expect("exists");
    assert_eq!((now.used, now.fragments), (charge(3) + charge(5000), 2));
    assert_eq!(f.store.recovery_report().accounts_corrected, 1);
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

    /// The store against a map, with a small charge rule (at least 8 bytes, 2 of overhead) and
    /// a cap of 4 fragments per customer, so both bind within a few steps.
    #[test]
    fn matches_a_simple_model(ops in proptest::collection::vec(
        (0u8..4, 0u8..2, 0u8..3, 0u32..2, 0usize..40), 1..40)) {
        const LIMITS: Limits = Limits { min_charge: 8, entry_overhead: 2, max_fragments: 4 };
        let charge = |len: u64| LIMITS.charge(len);
        let mut f = Fixture::with(LIMITS);
        let customers = [node(1), node(2)];
        const QUOTA: u64 = 100;
        for c in customers {
            grant(&f.store, c, QUOTA, 1000).expect("grant");
        }
        let mut model: BTreeMap<(usize, FragmentKey), Vec<u8>> = BTreeMap::new();
        for (step, (op, ci, b, p, len)) in ops.into_iter().enumerate() {
            let ci = ci as usize;
            let c = customers[ci];
            let k = fkey(b, p);
            match op {
                0 | 1 => {
                    let data = vec![step as u8; len];
                    let old = model.get(&(ci, k)).map_or(0, |d| charge(d.len() as u64));
                    let mine = model.iter().filter(|((x, _), _)| *x == ci);
                    let used: u64 = mine.clone().map(|(_, d)| charge(d.len() as u64)).sum();
                    let counted = model.contains_key(&(ci, k)) || mine.count() < 4;
                    let fits = used - old + charge(len as u64) <= QUOTA;
                    match f.put(&c, k, &data) {
                        Ok(info) => {
                            prop_assert!(len > 0 && fits && counted);
                            prop_assert_eq!(info.size, len as u64);
                            model.insert((ci, k), data);
                        }
                        Err(FragmentError::Empty) => prop_assert_eq!(len, 0),
                        Err(FragmentError::TooManyFragments { .. }) => {
                            prop_assert!(len > 0 && !counted)
                        }
                        Err(FragmentError::OverQuota { .. }) => {
                            prop_assert!(len > 0 && counted && !fits)
                        }
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
                prop_assert_eq!(f.used(c), want.iter().map(|i| charge(i.size)).sum::<u64>());
                let count = f.store.account(c).expect("account").expect("exists").fragments;
                prop_assert_eq!(count, want.len() as u64);
            }
            if let Some(d) = model.get(&(ci, k)) {
                prop_assert_eq!(&f.store.get(&c, k).expect("get"), d);
            }
        }
        prop_assert_eq!(f.files().len(), model.len());
        prop_assert_eq!(f.store.recovery_report().clone(), RecoveryReport::default());
    }
}

/// The grant the tests ask for: `quota` if it fits in `donated` beside the others' claims. (The
/// node's rule lives in `fsm::supplier_service::decide`, out of this layer's reach.)
fn grant(
    store: &FragmentStore,
    customer: NodeId,
    quota: u64,
    donated: u64,
) -> Result<(), FragmentError> {
    let decided = store.grant_with(customer, |others| {
        let available = donated.saturating_sub(others);
        if quota > available {
            Err(FragmentError::NoSpace {
                requested: quota,
                available,
            })
        } else {
            Ok(quota)
        }
    })?;
    decided.map(|_| ())
}
