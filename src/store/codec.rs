//! One way to lay out what goes into the key-value store, for every column family.
//!
//! - **Keys** are a short family tag (`b"f/"`) followed by fixed-width big-endian fields, built
//!   with [`Key`] and read back with [`KeyReader`]. Big-endian, so the store's byte order is the
//!   fields' numeric order and a prefix selects a range (one customer's fragments, one block).
//! - **Values** are prost messages from `proto/store.proto` ([`records`]), so a field can be added
//!   without a migration. [`decode`] turns bytes that are not a record into a typed error.
//! - **Paging**: [`KvPages::pages`] walks every entry under a prefix a bounded page at a time, so
//!   no caller loads a whole family into memory or rewrites the "scan, resume after the last key"
//!   loop.

use prost::Message;

use super::{Cf, KeyValue, KvStore, StoreError};
use crate::crypto::identity::NodeId;

/// The records kept in the store (package `bitdust.store.v1`).
pub mod records {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/bitdust.store.v1.rs"));
}

/// A stored value that is not the record it should be.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("stored record does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("stored record has an invalid `{field}`")]
    Invalid { field: &'static str },
}

/// Encodes a record.
pub fn encode(record: &impl Message) -> Vec<u8> {
    record.encode_to_vec()
}

/// Decodes a record; bytes that are not one are an error, never a panic.
pub fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, CodecError> {
    Ok(M::decode(bytes)?)
}

/// A node id stored in a record's `bytes` field.
pub fn node_id_field(bytes: &[u8], field: &'static str) -> Result<NodeId, CodecError> {
    NodeId::try_from(bytes).map_err(|_| CodecError::Invalid { field })
}

/// A key under construction: a family tag, then fixed-width fields in order.
///
/// Only fixed-width fields go in, so no field can run into the next one and every key of a
/// family sorts by its fields left to right.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Key(Vec<u8>);

impl Key {
    /// Starts a key of the family `tag` (empty when the column family holds one kind of key).
    pub fn new(tag: &[u8]) -> Self {
        Key(tag.to_vec())
    }

    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A fixed-width byte field (a hash, a block id).
    pub fn bytes<const N: usize>(mut self, v: &[u8; N]) -> Self {
        self.0.extend_from_slice(v);
        self
    }

    pub fn node(self, id: &NodeId) -> Self {
        self.bytes(id.as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl From<Key> for Vec<u8> {
    fn from(k: Key) -> Vec<u8> {
        k.0
    }
}

/// Reads a key's fields back in the order [`Key`] wrote them. Every read is `None` when the
/// key is too short; [`KeyReader::end`] is `None` when bytes are left over, so a key of
/// another shape is never half-read as this one.
pub struct KeyReader<'a> {
    rest: &'a [u8],
}

impl<'a> KeyReader<'a> {
    /// `None` unless `key` is of the family `tag`.
    pub fn new(key: &'a [u8], tag: &[u8]) -> Option<Self> {
        Some(KeyReader {
            rest: key.strip_prefix(tag)?,
        })
    }

    pub fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(*head)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_be_bytes)
    }

    pub fn node(&mut self) -> Option<NodeId> {
        self.bytes().map(NodeId::from_bytes)
    }

    /// `Some` only if every byte was read.
    pub fn end(self) -> Option<()> {
        self.rest.is_empty().then_some(())
    }
}

/// The smallest key after `key`: where to resume a scan that ended at `key`.
pub fn successor(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.extend_from_slice(key);
    k.push(0);
    k
}

/// Every entry under a prefix, one page (at most `page` entries) per step, in key order.
///
/// Each page is a fresh scan starting just after the previous page's last key, so entries may be
/// deleted (or added after the cursor) between pages. The walk ends after the first short page,
/// and after the first error.
pub struct Pages<'a, S: ?Sized> {
    kv: &'a S,
    cf: Cf,
    prefix: Vec<u8>,
    from: Option<Vec<u8>>,
    page: usize,
    done: bool,
}

impl<S: KvStore + ?Sized> Iterator for Pages<'_, S> {
    type Item = Result<Vec<KeyValue>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rows = match self
            .kv
            .scan(self.cf, &self.prefix, self.from.as_deref(), self.page)
        {
            Ok(rows) => rows,
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        let Some((last, _)) = rows.last() else {
            self.done = true;
            return None;
        };
        self.from = Some(successor(last));
        // A short page was the last one: no need to ask again.
        self.done = rows.len() < self.page;
        Some(Ok(rows))
    }
}

/// Paging for every store, `dyn KvStore` included.
pub trait KvPages: KvStore {
    /// Pages of at most `page` (at least 1) entries whose key starts with `prefix`.
    fn pages(&self, cf: Cf, prefix: &[u8], page: usize) -> Pages<'_, Self> {
        Pages {
            kv: self,
            cf,
            prefix: prefix.to_vec(),
            from: None,
            page: page.max(1),
            done: false,
        }
    }
}

impl<S: KvStore + ?Sized> KvPages for S {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Batch, MemStore, RocksStore};
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn keys_roundtrip_and_sort_by_their_fields() {
        let id = NodeId::from_signing_key(&[1; 32]);
        let k = Key::new(b"f/")
            .node(&id)
            .bytes(&[9u8; 32])
            .u32(7)
            .u64(u64::MAX);
        assert_eq!(k.as_bytes().len(), 2 + 16 + 32 + 4 + 8);
        let mut r = KeyReader::new(k.as_bytes(), b"f/").expect("family");
        assert_eq!(r.node(), Some(id));
        assert_eq!(r.bytes::<32>(), Some([9; 32]));
        assert_eq!(r.u32(), Some(7));
        assert_eq!(r.u64(), Some(u64::MAX));
        assert_eq!(r.end(), Some(()));
        // Big-endian: byte order is numeric order, 255 < 256 included.
        let keys: Vec<Vec<u8>> = [0u32, 1, 255, 256, 65_536, u32::MAX]
            .iter()
            .map(|&p| Key::new(b"x").u32(p).into_vec())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, keys);
        assert!(Key::new(b"").u64(1) < Key::new(b"").u64(0x100));
    }

    #[test]
    fn key_reader_refuses_other_shapes() {
        let k = Key::new(b"a/").u32(5).into_vec();
        assert!(KeyReader::new(&k, b"f/").is_none());
        let mut r = KeyReader::new(&k, b"a/").expect("family");
        assert_eq!(r.u64(), None, "too short for a u64");
        let mut r = KeyReader::new(&k, b"a/").expect("family");
        assert_eq!(r.u32(), Some(5));
        assert_eq!(r.u32(), None);
        let mut r = KeyReader::new(&k, b"a").expect("family");
        assert_eq!(r.u32(), Some(u32::from_be_bytes([b'/', 0, 0, 0])));
        assert_eq!(r.end(), None, "a byte left over");
    }

    #[test]
    fn decode_refuses_what_is_not_a_record() {
        let c = records::Contract {
            supplier: vec![3; 16],
            confirmed: true,
        };
        assert_eq!(decode::<records::Contract>(&encode(&c)).expect("decode"), c);
        assert!(matches!(
            decode::<records::Contract>(b"\x02garbage"),
            Err(CodecError::Decode(_))
        ));
        assert!(matches!(
            node_id_field(&[1; 15], "supplier"),
            Err(CodecError::Invalid { field: "supplier" })
        ));
        assert_eq!(
            node_id_field(&[1; 16], "supplier").expect("16 bytes"),
            NodeId::from_bytes([1; 16])
        );
    }

    #[test]
    fn successor_is_the_next_key() {
        assert_eq!(successor(b"ab"), b"ab\0");
        assert!(successor(b"ab").as_slice() > b"ab".as_slice());
        assert!(successor(b"ab").as_slice() < b"ab\0\0".as_slice());
    }

    /// Counts scans, to show the walk stops after a short page.
    struct Counting {
        inner: MemStore,
        scans: AtomicUsize,
    }

    impl KvStore for Counting {
        fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(cf, key)
        }
        fn write(&self, batch: Batch) -> Result<(), StoreError> {
            self.inner.write(batch)
        }
        fn scan(
            &self,
            cf: Cf,
            prefix: &[u8],
            from: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<KeyValue>, StoreError> {
            self.scans.fetch_add(1, Ordering::SeqCst);
            self.inner.scan(cf, prefix, from, limit)
        }
        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn fill(kv: &dyn KvStore, n: u32) {
        let mut b = Batch::new();
        for i in 0..n {
            b.put(Cf::Meta, Key::new(b"k/").u32(i), i.to_be_bytes().to_vec());
        }
        // Neighbours that must not be walked.
        b.put(Cf::Meta, b"j".to_vec(), b"".to_vec())
            .put(Cf::Meta, b"l".to_vec(), b"".to_vec())
            .put(Cf::Peers, Key::new(b"k/").u32(0), b"".to_vec());
        kv.write(b).expect("write");
    }

    #[test]
    fn pages_walk_every_entry_once_in_order() {
        for (n, page, scans) in [(0, 3, 1), (5, 3, 2), (6, 3, 3), (7, 3, 3), (1, 1, 2)] {
            let kv = Counting {
                inner: MemStore::new(),
                scans: AtomicUsize::new(0),
            };
            fill(&kv, n);
            let pages: Vec<Vec<KeyValue>> = kv
                .pages(Cf::Meta, b"k/", page)
                .collect::<Result<_, _>>()
                .expect("pages");
            assert!(pages.iter().all(|p| !p.is_empty() && p.len() <= page));
            let got: Vec<u32> = pages
                .into_iter()
                .flatten()
                .map(|(k, _)| {
                    let mut r = KeyReader::new(&k, b"k/").expect("family");
                    r.u32().expect("u32")
                })
                .collect();
            assert_eq!(got, (0..n).collect::<Vec<_>>(), "n={n} page={page}");
            assert_eq!(kv.scans.load(Ordering::SeqCst), scans, "n={n} page={page}");
        }
    }

    #[test]
    fn pages_tolerate_deleting_what_was_read() {
        let kv = MemStore::new();
        fill(&kv, 10);
        let mut seen = 0;
        for page in kv.pages(Cf::Meta, b"k/", 4) {
            let page = page.expect("page");
            let mut b = Batch::new();
            for (k, _) in page {
                seen += 1;
                b.delete(Cf::Meta, k);
            }
            kv.write(b).expect("delete");
        }
        assert_eq!(seen, 10);
        assert!(
            kv.scan(Cf::Meta, b"k/", None, 100)
                .expect("scan")
                .is_empty()
        );
    }

    #[test]
    fn pages_work_on_rocksdb_and_through_dyn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv: Box<dyn KvStore> = Box::new(RocksStore::open(dir.path()).expect("open"));
        fill(kv.as_ref(), 9);
        let n: usize = kv
            .pages(Cf::Meta, b"k/", 2)
            .map(|p| p.expect("page").len())
            .sum();
        assert_eq!(n, 9);
    }

    /// A scan error ends the walk after being reported once.
    struct Failing;

    impl KvStore for Failing {
        fn get(&self, _: Cf, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(None)
        }
        fn write(&self, _: Batch) -> Result<(), StoreError> {
            Ok(())
        }
        fn scan(
            &self,
            _: Cf,
            _: &[u8],
            _: Option<&[u8]>,
            _: usize,
        ) -> Result<Vec<KeyValue>, StoreError> {
            Err(StoreError::Db("broken".into()))
        }
        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[test]
    fn a_scan_error_is_reported_once() {
        let mut pages = Failing.pages(Cf::Meta, b"", 10);
        assert!(matches!(pages.next(), Some(Err(StoreError::Db(_)))));
        assert!(pages.next().is_none());
    }

    proptest! {
        #[test]
        fn key_reader_never_panics(k in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Some(mut r) = KeyReader::new(&k, b"f/") {
                let _ = (r.node(), r.bytes::<32>(), r.u32(), r.u64());
                let _ = r.end();
            }
        }
    }
}
