//! The fragment client: the one way the owner talks to suppliers about fragments — store,
//! retrieve, list, audit, delete. Every fragment request of the node goes through [`Fragments`]
//! (the backup job's placements, the restore, the drill, recovery, the monitor's lists and
//! audits, the rebuilder, retention's deletes); a test double ([`MemFragments`]) implements the
//! same trait.
//!
//! One typed error ([`FragmentError`]) replaces the error mapping each caller did by hand, and
//! one place ([`Client`]) holds the request timeout and the retry policy. What a reply *means*
//! (a failed audit, a fragment that does not match its manifest) stays with the caller: the
//! client reports what the supplier said.
//!
//! Invariants:
//! - A list follows pages only while each page advances past the previous one, at most
//!   [`MAX_LIST_PAGES`] pages and at most the caller's count of fragments: a supplier cannot
//!   keep the owner listing forever, nor fill its memory.
//! - A store is acknowledged only with the BLAKE3 of the bytes sent (the supplier checks it
//!   before it answers).
//! - Retries (none by default) repeat only what failed to get an answer (unreachable, timed out,
//!   link closed); a supplier's refusal is an answer and is never retried.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use actix::Addr;

use super::network_connector::{NetworkConnectorDriver, link_to};
use super::shell::Shell;
use crate::crypto::identity::NodeId;
use crate::data::audit::AuditPair;
use crate::net::link::{LinkHandle, RequestError};
use crate::proto::envelope::Body;
use crate::proto::{
    AuditChallenge, DeleteFragment, FailReason, FragmentId, ListFragments, RetrieveFragment,
    SliceChallenge, StoreFragment,
};

/// Pages of a supplier's list followed at most (1000 fragments a page by default on the
/// supplier's side: millions of fragments).
pub const MAX_LIST_PAGES: usize = 16_384;

/// What can go wrong asking a supplier about a fragment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// No session with the supplier (or the network actor is gone).
    #[error("no session with the supplier")]
    Unreachable,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// No reply and nothing else from the supplier in time: it fell silent (frozen, or the
    /// path is gone), which says nothing about the fragment.
    #[error("no reply and nothing else from the supplier within {0:?}")]
    Silent(Duration),
    /// The link closed or its queue was full before an answer came.
    #[error("the link failed: {0}")]
    Link(RequestError),
    /// The supplier says it does not hold the fragment.
    #[error("refused (NOT_FOUND)")]
    NotFound,
    /// The supplier refused for another reason.
    #[error("refused ({}): {detail}", reason_name(.reason))]
    Refused { reason: i32, detail: String },
    /// The supplier acknowledged a store with another hash than the bytes sent.
    #[error("the supplier acknowledged other bytes")]
    WrongAck,
    /// A reply of the wrong kind, or a list that does not advance or never ends.
    #[error("unexpected reply: {0}")]
    Malformed(&'static str),
}

impl FragmentError {
    /// The supplier's refusal reason, if it refused.
    pub fn refusal(&self) -> Option<FailReason> {
        match self {
            FragmentError::NotFound => Some(FailReason::NotFound),
            FragmentError::Refused { reason, .. } => FailReason::try_from(*reason).ok(),
            _ => None,
        }
    }

    /// No answer came (worth a retry); a refusal or a bad reply is an answer.
    pub fn no_answer(&self) -> bool {
        matches!(
            self,
            FragmentError::Unreachable
                | FragmentError::Timeout(_)
                | FragmentError::Silent(_)
                | FragmentError::Link(_)
        )
    }
}

fn reason_name(reason: &i32) -> String {
    match FailReason::try_from(*reason) {
        Ok(r) => r
            .as_str_name()
            .trim_start_matches("FAIL_REASON_")
            .to_string(),
        Err(_) => reason.to_string(),
    }
}

/// One fragment a supplier lists.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    pub block: [u8; 32],
    pub position: u32,
}

/// Talking to suppliers about fragments. `stored` bytes are the fragment's envelope as kept by
/// the supplier (manifest and fragment, see `data::stored`).
pub trait Fragments {
    /// Stores `stored` as `block`'s fragment at `position` on `supplier`; Ok once it
    /// acknowledged these exact bytes.
    fn store(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
        stored: Vec<u8>,
    ) -> impl Future<Output = Result<(), FragmentError>>;

    /// The stored bytes of `block`'s fragment at `position`.
    fn retrieve(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
    ) -> impl Future<Output = Result<Vec<u8>, FragmentError>>;

    /// Every fragment `supplier` holds for this owner; `Malformed` past `at_most` fragments
    /// (the caller's bound from what it placed there: a hostile list costs no more memory).
    fn list(
        &self,
        supplier: NodeId,
        at_most: usize,
    ) -> impl Future<Output = Result<Vec<Listed>, FragmentError>>;

    /// The supplier's proof for one precomputed challenge (the caller checks it).
    fn audit(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
        pair: &AuditPair,
    ) -> impl Future<Output = Result<Vec<u8>, FragmentError>>;

    /// The supplier's Bao slice of the fragment's bytes `offset .. offset + length` (the
    /// caller checks it against the fragment's BLAKE3).
    fn slice(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = Result<Vec<u8>, FragmentError>>;

    /// Asks `supplier` to delete the fragment.
    fn delete(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
    ) -> impl Future<Output = Result<(), FragmentError>>;
}

/// Where the client gets a session with a supplier: the network actor in a running node, a
/// dialer of its own during recovery.
pub trait Links {
    fn link(&self, supplier: NodeId) -> impl Future<Output = Option<LinkHandle>>;
}

/// The running node's sessions, through the network actor.
#[derive(Clone)]
pub struct NetworkLinks(pub Addr<Shell<NetworkConnectorDriver>>);

impl Links for NetworkLinks {
    async fn link(&self, supplier: NodeId) -> Option<LinkHandle> {
        link_to(&self.0, supplier).await
    }
}

/// The client over real links: one request timeout, one retry policy.
#[derive(Clone)]
pub struct Client<L> {
    links: L,
    timeout: Duration,
    /// Further attempts for a request that got no answer (0: none).
    retries: u32,
}

/// The client a running node's actors use.
pub type NetworkFragments = Client<NetworkLinks>;

impl NetworkFragments {
    pub fn network(network: Addr<Shell<NetworkConnectorDriver>>, timeout: Duration) -> Self {
        Client::new(NetworkLinks(network), timeout)
    }
}

impl<L: Links> Client<L> {
    pub fn new(links: L, timeout: Duration) -> Self {
        Client {
            links,
            timeout,
            retries: 0,
        }
    }

    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn links(&self) -> &L {
        &self.links
    }

    /// One request and its reply body, retried while no answer came (the body is copied only
    /// when another attempt may follow).
    async fn ask(&self, supplier: NodeId, body: Body) -> Result<Body, FragmentError> {
        let mut attempt = 0;
        loop {
            if attempt >= self.retries {
                return self.ask_once(supplier, body).await;
            }
            match self.ask_once(supplier, body.clone()).await {
                Err(e) if e.no_answer() => attempt += 1,
                other => return other,
            }
        }
    }

    async fn ask_once(&self, supplier: NodeId, body: Body) -> Result<Body, FragmentError> {
        let link = self
            .links
            .link(supplier)
            .await
            .ok_or(FragmentError::Unreachable)?;
        let reply = link
            .request(body, self.timeout)
            .await
            .map_err(|e| match e {
                RequestError::Timeout(t) => FragmentError::Timeout(t),
                RequestError::Silent(t) => FragmentError::Silent(t),
                other => FragmentError::Link(other),
            })?;
        match reply.body {
            Some(Body::Fail(f)) if f.reason == FailReason::NotFound as i32 => {
                Err(FragmentError::NotFound)
            }
            Some(Body::Fail(f)) => Err(FragmentError::Refused {
                reason: f.reason,
                detail: f.detail,
            }),
            Some(body) => Ok(body),
            None => Err(FragmentError::Malformed("an empty reply")),
        }
    }
}

/// Whether a list page ending at `last` moves past the cursor `after` (pages are in key order:
/// block, then position). One that does not would be asked for again forever.
fn advances(after: Option<&FragmentId>, last: &FragmentId) -> bool {
    let key = |f: &FragmentId| (f.block.clone(), f.position);
    after.is_none_or(|a| key(last) > key(a))
}

fn id(block: [u8; 32], position: u32) -> Option<FragmentId> {
    Some(FragmentId {
        block: block.to_vec(),
        position,
    })
}

impl<L: Links> Fragments for Client<L> {
    async fn store(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
        stored: Vec<u8>,
    ) -> Result<(), FragmentError> {
        let hash = blake3::hash(&stored);
        let request = Body::StoreFragment(StoreFragment {
            id: id(block, position),
            data: stored,
            hash: hash.as_bytes().to_vec(),
        });
        match self.ask(supplier, request).await? {
            Body::Ack(ack) if ack.hash == hash.as_bytes() => Ok(()),
            Body::Ack(_) => Err(FragmentError::WrongAck),
            _ => Err(FragmentError::Malformed("not an acknowledgement")),
        }
    }

    async fn retrieve(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
    ) -> Result<Vec<u8>, FragmentError> {
        let request = Body::RetrieveFragment(RetrieveFragment {
            id: id(block, position),
        });
        match self.ask(supplier, request).await? {
            Body::FragmentData(d) => Ok(d.data),
            _ => Err(FragmentError::Malformed("not fragment data")),
        }
    }

    async fn list(&self, supplier: NodeId, at_most: usize) -> Result<Vec<Listed>, FragmentError> {
        let mut held = BTreeSet::new();
        let mut after: Option<FragmentId> = None;
        for _ in 0..MAX_LIST_PAGES {
            let request = Body::ListFragments(ListFragments {
                after: after.clone(),
                limit: 0,
            });
            let Body::FragmentList(list) = self.ask(supplier, request).await? else {
                return Err(FragmentError::Malformed("not a fragment list"));
            };
            for info in &list.fragments {
                if let Some(id) = &info.id
                    && let Ok(block) = <[u8; 32]>::try_from(id.block.as_slice())
                {
                    held.insert(Listed {
                        block,
                        position: id.position,
                    });
                }
            }
            if held.len() > at_most {
                return Err(FragmentError::Malformed(
                    "a list longer than what was placed there",
                ));
            }
            let last = list.fragments.last().and_then(|f| f.id.clone());
            match last {
                Some(last) if list.more => {
                    if !advances(after.as_ref(), &last) {
                        return Err(FragmentError::Malformed(
                            "a list page that does not advance",
                        ));
                    }
                    after = Some(last);
                }
                _ => return Ok(held.into_iter().collect()),
            }
        }
        Err(FragmentError::Malformed("a list longer than the page cap"))
    }

    async fn audit(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
        pair: &AuditPair,
    ) -> Result<Vec<u8>, FragmentError> {
        let request = Body::AuditChallenge(AuditChallenge {
            id: id(block, position),
            nonce: pair.nonce.to_vec(),
            offset: pair.offset,
            length: pair.length,
        });
        match self.ask(supplier, request).await? {
            Body::AuditProof(p) => Ok(p.proof),
            _ => Err(FragmentError::Malformed("not an audit proof")),
        }
    }

    async fn slice(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, FragmentError> {
        let request = Body::SliceChallenge(SliceChallenge {
            id: id(block, position),
            offset,
            length,
        });
        match self.ask(supplier, request).await? {
            Body::FragmentSlice(s) => Ok(s.slice),
            _ => Err(FragmentError::Malformed("not a fragment slice")),
        }
    }

    async fn delete(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
    ) -> Result<(), FragmentError> {
        let request = Body::DeleteFragment(DeleteFragment {
            id: id(block, position),
        });
        match self.ask(supplier, request).await? {
            Body::Ack(_) => Ok(()),
            _ => Err(FragmentError::Malformed("not an acknowledgement")),
        }
    }
}

/// What the double's suppliers hold: (supplier, block, position) → stored bytes.
pub type Held = HashMap<(NodeId, [u8; 32], u32), Vec<u8>>;

/// A test double: suppliers in memory. Positions in `failing` answer that error to every
/// request; positions in `garbage` serve their bytes with the last one flipped.
#[derive(Default)]
pub struct MemFragments {
    pub held: Mutex<Held>,
    pub failing: HashMap<u32, FragmentError>,
    pub garbage: BTreeSet<u32>,
    /// Requests served, by kind (`"store"`, `"retrieve"`, …).
    pub asked: Mutex<HashMap<&'static str, u64>>,
}

impl MemFragments {
    fn count(&self, kind: &'static str, position: u32) -> Result<(), FragmentError> {
        if let Ok(mut asked) = self.asked.lock() {
            *asked.entry(kind).or_default() += 1;
        }
        match self.failing.get(&position) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn held(&self) -> Result<std::sync::MutexGuard<'_, Held>, FragmentError> {
        self.held
            .lock()
            .map_err(|_| FragmentError::Malformed("the double is poisoned"))
    }
}

impl Fragments for MemFragments {
    async fn store(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
        stored: Vec<u8>,
    ) -> Result<(), FragmentError> {
        self.count("store", position)?;
        self.held()?.insert((supplier, block, position), stored);
        Ok(())
    }

    async fn retrieve(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
    ) -> Result<Vec<u8>, FragmentError> {
        self.count("retrieve", position)?;
        let mut stored = self
            .held()?
            .get(&(supplier, block, position))
            .cloned()
            .ok_or(FragmentError::NotFound)?;
        if self.garbage.contains(&position)
            && let Some(last) = stored.last_mut()
        {
            *last ^= 0x55;
        }
        Ok(stored)
    }

    async fn list(&self, supplier: NodeId, at_most: usize) -> Result<Vec<Listed>, FragmentError> {
        let mut listed: Vec<Listed> = self
            .held()?
            .keys()
            .filter(|(s, _, _)| *s == supplier)
            .map(|(_, block, position)| Listed {
                block: *block,
                position: *position,
            })
            .collect();
        if listed.len() > at_most {
            return Err(FragmentError::Malformed(
                "a list longer than what was placed there",
            ));
        }
        listed.sort();
        Ok(listed)
    }

    async fn audit(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
        pair: &AuditPair,
    ) -> Result<Vec<u8>, FragmentError> {
        let stored = self.retrieve(supplier, block, position).await?;
        crate::data::audit::audit_proof(&pair.nonce, &stored, pair.offset, pair.length)
            .map(|p| p.to_vec())
            .ok_or(FragmentError::Refused {
                reason: FailReason::Malformed as i32,
                detail: "range outside the fragment".into(),
            })
    }

    async fn slice(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, FragmentError> {
        let stored = self.retrieve(supplier, block, position).await?;
        crate::data::audit::slice_of(&stored, offset, length).ok_or(FragmentError::Refused {
            reason: FailReason::Malformed as i32,
            detail: "slice outside the fragment".into(),
        })
    }

    async fn delete(
        &self,
        supplier: NodeId,
        block: [u8; 32],
        position: u32,
    ) -> Result<(), FragmentError> {
        self.count("delete", position)?;
        self.held()?.remove(&(supplier, block, position));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId::from_signing_key(&[n; 32])
    }

    #[tokio::test]
    async fn the_double_stores_retrieves_lists_audits_and_deletes() {
        let double = MemFragments::default();
        let (a, b) = (node(1), node(2));
        let bytes: Vec<u8> = (0..200u8).collect();
        double
            .store(a, [1; 32], 0, bytes.clone())
            .await
            .expect("store");
        double
            .store(a, [2; 32], 3, bytes.clone())
            .await
            .expect("store");
        assert_eq!(double.retrieve(a, [1; 32], 0).await, Ok(bytes.clone()));
        assert_eq!(
            double.retrieve(b, [1; 32], 0).await,
            Err(FragmentError::NotFound)
        );
        let listed = double.list(a, 2).await.expect("list");
        assert_eq!(listed.len(), 2);
        assert!(matches!(
            double.list(a, 1).await,
            Err(FragmentError::Malformed(_))
        ));
        assert_eq!(listed[1].position, 3);
        let pair = crate::data::audit::make_pairs(&bytes, 1, &mut rand::thread_rng())
            .pop()
            .expect("a pair");
        let proof = double.audit(a, [1; 32], 0, &pair).await.expect("proof");
        assert!(pair.check(&proof));
        double.delete(a, [1; 32], 0).await.expect("delete");
        assert_eq!(
            double.retrieve(a, [1; 32], 0).await,
            Err(FragmentError::NotFound)
        );
    }

    #[test]
    fn a_list_page_must_advance_past_the_cursor() {
        let at = |b: u8, p: u32| FragmentId {
            block: vec![b; 32],
            position: p,
        };
        assert!(advances(None, &at(1, 0)));
        assert!(advances(Some(&at(1, 0)), &at(1, 1)));
        assert!(advances(Some(&at(1, 9)), &at(2, 0)));
        assert!(!advances(Some(&at(1, 1)), &at(1, 1)), "the same page again");
        assert!(!advances(Some(&at(2, 0)), &at(1, 5)), "backwards");
    }

    #[test]
    fn refusals_say_the_supplier_s_reason() {
        let e = FragmentError::Refused {
            reason: FailReason::NoSpace as i32,
            detail: "full".into(),
        };
        assert_eq!(e.to_string(), "refused (NO_SPACE): full");
        assert_eq!(e.refusal(), Some(FailReason::NoSpace));
        assert!(!e.no_answer(), "a refusal is an answer");
        assert_eq!(FragmentError::NotFound.to_string(), "refused (NOT_FOUND)");
        assert!(FragmentError::Unreachable.no_answer());
    }
}
