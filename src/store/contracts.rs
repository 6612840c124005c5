//! The customer's contracts: which supplier holds each fragment position, in `Cf::Contracts`.
//!
//! | key | value |
//! |---|---|
//! | `<position u32 BE>` | `records::Contract` (supplier id, confirmed) |
//!
//! Written only by the customer actor, one save at a time, each save one batch.

use super::codec::{self, Key, KeyReader, KvPages, records};
use super::{Batch, Cf, KvStore, StoreError};
use crate::crypto::identity::NodeId;

const CF: Cf = Cf::Contracts;
/// The column family holds only contracts: the key is the bare position.
const TAG: &[u8] = b"";
/// Records read per scan while loading.
const PAGE: usize = 256;

/// The supplier hired for one position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contract {
    pub supplier: NodeId,
    /// The supplier accepted (at least once).
    pub confirmed: bool,
}

fn key(position: u32) -> Key {
    Key::new(TAG).u32(position)
}

fn parse(k: &[u8], v: &[u8]) -> Option<(u32, Contract)> {
    let mut r = KeyReader::new(k, TAG)?;
    let position = r.u32()?;
    r.end()?;
    let record: records::Contract = codec::decode(v).ok()?;
    Some((
        position,
        Contract {
            supplier: codec::node_id_field(&record.supplier, "supplier").ok()?,
            confirmed: record.confirmed,
        },
    ))
}

/// Every readable contract, by position. An unreadable record is skipped (with a WARN): its
/// position is hired anew, which costs a hire but loses no data.
pub fn load(kv: &dyn KvStore) -> Result<Vec<(u32, Contract)>, StoreError> {
    let mut out = Vec::new();
    for page in kv.pages(CF, TAG, PAGE) {
        for (k, v) in page? {
            match parse(&k, &v) {
                Some(c) => out.push(c),
                None => tracing::warn!(key = %hex::encode(&k), "skipping an unreadable contract"),
            }
        }
    }
    Ok(out)
}

/// The positions to resume after a restart: confirmed contracts only. A hire its supplier never
/// confirmed is not a contract, so that position is hired anew.
pub fn confirmed(kv: &dyn KvStore) -> Result<Vec<(u32, NodeId)>, StoreError> {
    Ok(load(kv)?
        .into_iter()
        .filter(|(_, c)| c.confirmed)
        .map(|(p, c)| (p, c.supplier))
        .collect())
}

/// Saves the positions `0..slots.len()` in one batch: a contract is written, an empty slot
/// deleted. Positions past the end are left as they are.
pub fn save(
    kv: &dyn KvStore,
    slots: impl IntoIterator<Item = Option<Contract>>,
) -> Result<(), StoreError> {
    kv.write(save_batch(slots))
}

/// The batch `save` writes, for a caller that writes through the `Writer`.
pub fn save_batch(slots: impl IntoIterator<Item = Option<Contract>>) -> Batch {
    let mut batch = Batch::new();
    for (position, slot) in (0u32..).zip(slots) {
        match slot {
            Some(c) => {
                let record = records::Contract {
                    supplier: c.supplier.as_bytes().to_vec(),
                    confirmed: c.confirmed,
                };
                batch.put(CF, key(position), codec::encode(&record));
            }
            None => {
                batch.delete(CF, key(position));
            }
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    fn node(i: u8) -> NodeId {
        NodeId::from_signing_key(&[i; 32])
    }

    fn hired(i: u8, confirmed: bool) -> Option<Contract> {
        Some(Contract {
            supplier: node(i),
            confirmed,
        })
    }

    #[test]
    fn save_then_load() {
        let kv = MemStore::new();
        assert!(load(&kv).expect("load").is_empty());
        save(&kv, [hired(1, true), None, hired(3, false), hired(4, true)]).expect("save");
        assert_eq!(
            load(&kv).expect("load"),
            vec![
                (0, hired(1, true).expect("some")),
                (2, hired(3, false).expect("some")),
                (3, hired(4, true).expect("some")),
            ]
        );
        assert_eq!(
            confirmed(&kv).expect("confirmed"),
            vec![(0, node(1)), (3, node(4))]
        );
        // A later save empties a slot and confirms another; positions past the end stay.
        save(&kv, [None, hired(2, true), hired(3, true)]).expect("save");
        assert_eq!(
            confirmed(&kv).expect("confirmed"),
            vec![(1, node(2)), (2, node(3)), (3, node(4))]
        );
    }

    #[test]
    fn positions_load_in_numeric_order_past_a_page() {
        let kv = MemStore::new();
        let n = PAGE as u32 + 260;
        save(&kv, (0..n).map(|p| hired((p % 7) as u8, true))).expect("save");
        let got = confirmed(&kv).expect("confirmed");
        assert_eq!(
            got.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            (0..n).collect::<Vec<_>>()
        );
        assert_eq!(got[300], (300, node((300 % 7) as u8)));
    }

    #[test]
    fn unreadable_records_are_skipped() {
        let kv = MemStore::new();
        save(&kv, [hired(1, true), hired(2, true)]).expect("save");
        kv.put(CF, key(0).as_bytes(), b"\x02garbage").expect("put");
        kv.put(
            CF,
            key(5).as_bytes(),
            &codec::encode(&records::Contract {
                supplier: vec![1; 15],
                confirmed: true,
            }),
        )
        .expect("put");
        kv.put(
            CF,
            b"\0\0\0\x07\0",
            &codec::encode(&records::Contract::default()),
        )
        .expect("put");
        assert_eq!(confirmed(&kv).expect("confirmed"), vec![(1, node(2))]);
    }
}
