//! The fragment index in `Cf::SupplierIndex`: keys built with `store::codec` (big-endian, so one
//! customer's entries are one key range in block, position order) and `proto/store.proto`
//! records. A value that does not decode, or decodes to something impossible, is `Corrupt`.

use super::{AccountState, CF, CustomerAccount, FragmentError, FragmentKey, FragmentStore, PAGE};
use crate::crypto::identity::NodeId;
use crate::store::codec::{self, Key, KeyReader, KvPages, records};

/// `a/<customer 16>`: the customer's account.
pub(super) const ACCOUNT: &[u8] = b"a/";
/// `f/<customer 16><block 32><position u32 BE>`: a stored fragment.
pub(super) const FRAGMENT: &[u8] = b"f/";
/// `p/<customer 16><block 32><position u32 BE>`: a replace of that fragment is in flight.
pub(super) const PENDING: &[u8] = b"p/";

/// A fragment's index entry: what its file must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) size: u64,
    pub(super) hash: [u8; 32],
}

impl FragmentStore {
    pub(super) fn load_account(
        &self,
        customer: &NodeId,
    ) -> Result<Option<CustomerAccount>, FragmentError> {
        self.kv
            .get(CF, &account_key(customer))?
            .map(|v| decode_account(*customer, &v))
            .transpose()
    }

    /// As `load_account`, but an unreadable record counts as none (recovery keeps going).
    pub(super) fn load_account_lenient(
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

    pub(super) fn load_entry(
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
    pub(super) fn for_each_account(
        &self,
        mut f: impl FnMut(CustomerAccount) -> Result<(), FragmentError>,
    ) -> Result<(), FragmentError> {
        for page in self.kv.pages(CF, ACCOUNT, PAGE) {
            for (k, v) in page? {
                match parse_account(&k, &v) {
                    Some(a) => f(a)?,
                    None => tracing::warn!("skipped an unreadable account record"),
                }
            }
        }
        Ok(())
    }
}

/// `r/<customer 16>`: the highest recovery-record revision the customer stored (u64 BE).
pub(super) const REVISION: &[u8] = b"r/";

/// `d/<customer 16>`: this supplier dropped the customer (u64 BE: when); gone with its data.
pub(super) const DROPPED: &[u8] = b"d/";

pub(super) fn dropped_key(customer: &NodeId) -> Vec<u8> {
    Key::new(DROPPED).node(customer).into_vec()
}

pub(super) fn revision_key(customer: &NodeId) -> Vec<u8> {
    Key::new(REVISION).node(customer).into_vec()
}

pub(super) fn account_key(customer: &NodeId) -> Vec<u8> {
    Key::new(ACCOUNT).node(customer).into_vec()
}

/// Every `kind` key of one customer starts with this.
pub(super) fn index_prefix(kind: &[u8], customer: &NodeId) -> Vec<u8> {
    Key::new(kind).node(customer).into_vec()
}

pub(super) fn index_key(kind: &[u8], customer: &NodeId, key: &FragmentKey) -> Vec<u8> {
    Key::new(kind)
        .node(customer)
        .bytes(&key.block)
        .u32(key.position)
        .into_vec()
}

pub(super) fn parse_index_key(kind: &[u8], k: &[u8]) -> Option<(NodeId, FragmentKey)> {
    let mut r = KeyReader::new(k, kind)?;
    let customer = r.node()?;
    let block = r.bytes()?;
    let position = r.u32()?;
    r.end()?;
    Some((customer, FragmentKey { block, position }))
}

pub(super) fn encode_account(a: &CustomerAccount) -> Vec<u8> {
    codec::encode(&records::Account {
        quota: a.quota,
        used: a.used,
        fragments: a.fragments,
        cancelled_since: match a.state {
            AccountState::Active => None,
            AccountState::Cancelled { since_unix } => Some(since_unix),
        },
    })
}

pub(super) fn decode_account(customer: NodeId, v: &[u8]) -> Result<CustomerAccount, FragmentError> {
    let r: records::Account = codec::decode(v).map_err(|_| FragmentError::Corrupt)?;
    Ok(CustomerAccount {
        customer,
        quota: r.quota,
        used: r.used,
        fragments: r.fragments,
        state: match r.cancelled_since {
            None => AccountState::Active,
            Some(since_unix) => AccountState::Cancelled { since_unix },
        },
    })
}

pub(super) fn parse_account(k: &[u8], v: &[u8]) -> Option<CustomerAccount> {
    let mut r = KeyReader::new(k, ACCOUNT)?;
    let customer = r.node()?;
    r.end()?;
    decode_account(customer, v).ok()
}

pub(super) fn encode_entry(size: u64, hash: &[u8; 32]) -> Vec<u8> {
    codec::encode(&records::FragmentEntry {
        size,
        blake3: hash.to_vec(),
    })
}

pub(super) fn decode_entry(v: &[u8]) -> Result<Entry, FragmentError> {
    let r: records::FragmentEntry = codec::decode(v).map_err(|_| FragmentError::Corrupt)?;
    Ok(Entry {
        size: r.size,
        hash: r
            .blake3
            .as_slice()
            .try_into()
            .map_err(|_| FragmentError::Corrupt)?,
    })
}

/// The value of a `p/` key: its presence is the whole message.
pub(super) fn encode_intent() -> Vec<u8> {
    codec::encode(&records::ReplaceIntent {})
}
