//! The recovery record on the supplier (issue 18, H2): it keeps the highest revision each
//! customer stored and refuses a lower one, checked and recorded under the store's lock.

use super::*;
use crate::store::MemStore;

fn node(n: u8) -> NodeId {
    NodeId::try_from([n; 16].as_slice()).expect("16 bytes")
}

const RECORD: FragmentKey = FragmentKey {
    block: [0xee; 32],
    position: u32::MAX,
};

fn put(
    store: &FragmentStore,
    who: &NodeId,
    data: &[u8],
    revision: u64,
) -> Result<(), FragmentError> {
    let hash = *blake3::hash(data).as_bytes();
    store
        .put_record(who, RECORD, data, &hash, revision)
        .map(|_| ())
}

#[test]
fn a_supplier_keeps_the_highest_revision_per_customer_and_refuses_a_lower_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store =
        FragmentStore::open(dir.path().join("store"), Arc::new(MemStore::new())).expect("open");
    let (a, b) = (node(1), node(2));
    for who in [a, b] {
        store
            .grant_with(who, |_| Ok::<u64, ()>(1 << 20))
            .expect("db")
            .expect("granted");
    }
    assert_eq!(store.record_revision(&a).expect("read"), 0);
    put(&store, &a, b"revision 5", 5).expect("first");
    put(&store, &a, b"revision 5 again", 5).expect("the same revision again");
    assert!(matches!(
        put(&store, &a, b"revision 4", 4),
        Err(FragmentError::StaleRevision {
            held: 5,
            offered: 4
        })
    ));
    assert_eq!(store.get(&a, RECORD).expect("kept"), b"revision 5 again");
    // Per customer: another customer's revisions are its own.
    put(&store, &b, b"b's first", 1).expect("b");
    put(&store, &a, b"revision 9", 9).expect("higher");
    assert_eq!(store.record_revision(&a).expect("read"), 9);
    assert_eq!(store.record_revision(&b).expect("read"), 1);
    // A delete does not reset it: an old record cannot come back through an empty slot.
    store.delete(&a, RECORD).expect("delete");
    assert!(matches!(
        put(&store, &a, b"revision 5", 5),
        Err(FragmentError::StaleRevision {
            held: 9,
            offered: 5
        })
    ));
    // An ordinary fragment at the same id through `put` is not a record (the driver routes
    // the record id to `put_record`); the mark is untouched by it.
    let hash = *blake3::hash(b"plain").as_bytes();
    store.put(&a, RECORD, b"plain", &hash).expect("plain put");
    assert_eq!(store.record_revision(&a).expect("read"), 9);
}
