//! The peer book: trusted friends and their latest verified identities, in `Cf::Peers`.
//!
//! | key | value |
//! |---|---|
//! | `<node id 16>` | `records::PeerRecord` (the signed identity's bytes, a label, when added) |
//!
//! One writer at a time: the network actor while the node runs, the CLI (holding the home's
//! lock) when it does not.

use super::codec::{self, Key, KeyReader, KvPages, records::PeerRecord};
use super::{Batch, Cf, KvStore, StoreError};
use crate::crypto::identity::{Identity, NodeId};

const CF: Cf = Cf::Peers;
/// The column family holds only peers: the key is the bare node id.
const TAG: &[u8] = b"";
/// Records read per scan while loading.
const PAGE: usize = 256;

fn key(peer: &NodeId) -> Key {
    Key::new(TAG).node(peer)
}

/// A record that is not a peer we can trust again: skipped (with a WARN) rather than fatal, so
/// one bad record does not cost the whole book.
fn parse(k: &[u8], v: &[u8]) -> Option<(Identity, Option<String>)> {
    let mut r = KeyReader::new(k, TAG)?;
    let id = r.node()?;
    r.end()?;
    let record: PeerRecord = codec::decode(v).ok()?;
    let identity = Identity::from_bytes(&record.identity).ok()?;
    // The signature proves the identity; the key must also be the id it claims.
    (identity.node_id() == id).then_some(())?;
    Some((identity, (!record.label.is_empty()).then_some(record.label)))
}

/// Every readable peer with its label, in node id order.
pub fn load(kv: &dyn KvStore) -> Result<Vec<(Identity, Option<String>)>, StoreError> {
    let mut out = Vec::new();
    for page in kv.pages(CF, TAG, PAGE) {
        for (k, v) in page? {
            match parse(&k, &v) {
                Some(peer) => out.push(peer),
                None => {
                    tracing::warn!(key = %hex::encode(&k), "skipping an unreadable peer record")
                }
            }
        }
    }
    Ok(out)
}

/// The batch that adds a peer or replaces its record (a newer identity, a new label), for a
/// caller that writes through the `Writer`.
pub fn save_batch(identity: &Identity, label: Option<&str>, added_at: u64) -> Batch {
    let record = PeerRecord {
        identity: identity.to_bytes(),
        label: label.unwrap_or_default().to_string(),
        added_at,
    };
    let mut batch = Batch::new();
    batch.put(CF, key(&identity.node_id()), codec::encode(&record));
    batch
}

/// Adds a peer or replaces its record (a newer identity, a new label).
pub fn save(
    kv: &dyn KvStore,
    identity: &Identity,
    label: Option<&str>,
    added_at: u64,
) -> Result<(), StoreError> {
    kv.write(save_batch(identity, label, added_at))
}

/// The batch that forgets a peer.
pub fn remove_batch(peer: &NodeId) -> Batch {
    let mut batch = Batch::new();
    batch.delete(CF, key(peer));
    batch
}

/// Forgets a peer; false when it was not in the book.
pub fn remove(kv: &dyn KvStore, peer: &NodeId) -> Result<bool, StoreError> {
    let k = key(peer);
    if kv.get(CF, k.as_bytes())?.is_none() {
        return Ok(false);
    }
    kv.write(remove_batch(peer))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::NodeKeys;
    use crate::store::MemStore;

    fn identity(name: &str, revision: u64) -> Identity {
        let keys = NodeKeys::generate(&mut rand::rngs::OsRng);
        Identity::create(
            &keys,
            name,
            vec!["tcp://127.0.0.1:7771".into()],
            revision,
            1_700_000_000,
        )
        .expect("identity")
    }

    #[test]
    fn save_load_remove() {
        let kv = MemStore::new();
        assert!(load(&kv).expect("load").is_empty());
        let (a, b) = (identity("a", 1), identity("b", 1));
        save(&kv, &a, Some("alice"), 1).expect("save");
        save(&kv, &b, None, 1).expect("save");
        let mut want = vec![(a.clone(), Some("alice".to_string())), (b.clone(), None)];
        want.sort_by_key(|(i, _)| i.node_id());
        assert_eq!(load(&kv).expect("load"), want);
        // Saving again replaces the record: one entry per peer.
        save(&kv, &a, Some("al"), 1).expect("save");
        let got = load(&kv).expect("load");
        assert_eq!(got.len(), 2);
        assert!(got.contains(&(a.clone(), Some("al".to_string()))));
        assert!(remove(&kv, &a.node_id()).expect("remove"));
        assert!(!remove(&kv, &a.node_id()).expect("remove"), "already gone");
        assert_eq!(load(&kv).expect("load"), vec![(b, None)]);
    }

    #[test]
    fn more_peers_than_one_page() {
        let kv = MemStore::new();
        let n = PAGE + 3;
        // Signing hundreds of identities is slow unoptimised; one identity under many keys
        // is enough to count, and every one of them is skipped for not matching its key...
        let real = identity("r", 1);
        let mut b = crate::store::Batch::new();
        let record = codec::encode(&PeerRecord {
            identity: real.to_bytes(),
            label: String::new(),
            added_at: 0,
        });
        for i in 0..n as u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            b.put(CF, key(&NodeId::from_bytes(id)).into_vec(), record.clone());
        }
        kv.write(b).expect("write");
        // ... except the one stored under its own id, found after more than a page.
        save(&kv, &real, None, 1).expect("save");
        assert_eq!(load(&kv).expect("load"), vec![(real, None)]);
    }

    #[test]
    fn unreadable_records_are_skipped_not_fatal() {
        let kv = MemStore::new();
        let good = identity("good", 1);
        save(&kv, &good, None, 1).expect("save");
        let other = identity("other", 1);
        // Not a record; a record under another peer's id; a key that is not a node id.
        kv.put(CF, key(&other.node_id()).as_bytes(), b"\x02garbage")
            .expect("put");
        let forged = NodeId::from_bytes([0xff; 16]);
        kv.put(
            CF,
            key(&forged).as_bytes(),
            &codec::encode(&PeerRecord {
                identity: other.to_bytes(),
                label: "x".into(),
                added_at: 1,
            }),
        )
        .expect("put");
        kv.put(CF, b"short", &codec::encode(&PeerRecord::default()))
            .expect("put");
        // An altered signature.
        let mut tampered = good.to_bytes();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let third = identity("third", 1);
        kv.put(
            CF,
            key(&third.node_id()).as_bytes(),
            &codec::encode(&PeerRecord {
                identity: tampered,
                label: String::new(),
                added_at: 1,
            }),
        )
        .expect("put");
        assert_eq!(load(&kv).expect("load"), vec![(good, None)]);
    }

    #[test]
    fn records_written_with_an_embedded_identity_still_read() {
        // Before `proto/store.proto`, `identity` was an embedded SignedIdentity message; the bytes
        // on disk are the same as the `bytes` field's.
        use prost::Message as _;
        #[derive(Clone, PartialEq, prost::Message)]
        struct OldPeerRecord {
            #[prost(message, optional, tag = "1")]
            identity: Option<crate::proto::SignedIdentity>,
            #[prost(string, tag = "2")]
            label: String,
            #[prost(uint64, tag = "3")]
            added_at: u64,
        }
        let kv = MemStore::new();
        let a = identity("a", 3);
        let old = OldPeerRecord {
            identity: Some(a.signed().clone()),
            label: "old".into(),
            added_at: 5,
        };
        kv.put(CF, a.node_id().as_bytes(), &old.encode_to_vec())
            .expect("put");
        assert_eq!(load(&kv).expect("load"), vec![(a, Some("old".into()))]);
    }
}
