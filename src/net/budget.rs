//! The bytes one peer can make this node hold (security review M2): the request bodies read
//! from it and not yet handled, and the replies queued for it and not yet written, across all
//! its links. A link's reader waits for room before it reads more of a peer's messages, so a
//! peer that sends faster than the node works (or does not read its replies) is held back by
//! TCP instead of filling memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use crate::crypto::identity::NodeId;

/// Default bytes per peer: two of the default largest messages, so one store of the largest
/// size always fits beside a reply.
pub const DEFAULT_PEER_BUDGET: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum BudgetError {
    #[error("{wanted} bytes do not fit: {held} of {limit} are held")]
    Exhausted {
        wanted: usize,
        held: usize,
        limit: usize,
    },
    #[error("a budget of {limit} bytes cannot hold two messages of {max_message} bytes")]
    TooSmall { limit: usize, max_message: usize },
}

/// The rule, without IO or waiting: bytes are taken while they fit under the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    limit: usize,
    held: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget { limit, held: 0 }
    }

    /// A budget must fit two of the largest messages: a long message can always be read while
    /// another one is being answered, so a peer never waits on itself.
    pub fn check(limit: usize, max_message: usize) -> Result<(), BudgetError> {
        if limit < max_message.saturating_mul(2) {
            return Err(BudgetError::TooSmall { limit, max_message });
        }
        Ok(())
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn held(&self) -> usize {
        self.held
    }

    pub fn try_take(&mut self, wanted: usize) -> Result<(), BudgetError> {
        self.try_take_leaving(wanted, 0)
    }

    /// Takes `wanted` bytes only if `room` bytes are still free after them.
    pub fn try_take_leaving(&mut self, wanted: usize, room: usize) -> Result<(), BudgetError> {
        match self.held.checked_add(wanted) {
            Some(after) if after.saturating_add(room) <= self.limit => {
                self.held = after;
                Ok(())
            }
            _ => Err(BudgetError::Exhausted {
                wanted,
                held: self.held,
                limit: self.limit,
            }),
        }
    }

    pub fn give_back(&mut self, bytes: usize) {
        debug_assert!(bytes <= self.held, "{bytes} given back, {} held", self.held);
        self.held = self.held.saturating_sub(bytes);
    }
}

/// One peer's budget, shared by its links and by the work they queued.
#[derive(Debug)]
pub struct PeerBudget {
    state: Mutex<Budget>,
    freed: Notify,
    /// What replies leave free: room to read one more message of the largest size. Replies
    /// wait on the peer reading them, and the peer (a node too) may be waiting for this node to
    /// read; requests never wait on the network, so with this room the reader always gets on.
    reading_room: usize,
}

impl PeerBudget {
    pub fn new(limit: usize, reading_room: usize) -> Arc<Self> {
        Arc::new(PeerBudget {
            state: Mutex::new(Budget::new(limit)),
            freed: Notify::new(),
            reading_room,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Budget> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn limit(&self) -> usize {
        self.state().limit()
    }

    pub fn held(&self) -> usize {
        self.state().held()
    }

    /// Takes `wanted` bytes now, or says why not.
    pub fn try_acquire(self: &Arc<Self>, wanted: usize) -> Result<Held, BudgetError> {
        self.state().try_take(wanted)?;
        Ok(Held {
            budget: self.clone(),
            bytes: wanted,
        })
    }

    /// Waits until `wanted` bytes fit (at most the whole limit: more could never fit).
    pub async fn acquire(self: &Arc<Self>, wanted: usize) -> Held {
        let wanted = wanted.min(self.limit());
        loop {
            // Registered before the check, so a release between the two is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Ok(held) = self.try_acquire(wanted) {
                return held;
            }
            freed.await;
        }
    }

    /// An empty charge on this budget, to grow later.
    pub fn none(self: &Arc<Self>) -> Held {
        Held {
            budget: self.clone(),
            bytes: 0,
        }
    }

    fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.state().give_back(bytes);
            self.freed.notify_waiters();
        }
    }
}

/// Bytes taken from a peer's budget, given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<PeerBudget>,
    bytes: usize,
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives back all but `bytes` (a reservation for a long message, once its length is known).
    pub fn shrink_to(&mut self, bytes: usize) {
        if bytes < self.bytes {
            self.budget.give_back(self.bytes - bytes);
            self.bytes = bytes;
        }
    }

    /// Makes this charge a reply of `bytes`: shrinks at once, grows only if the rest fits now
    /// and leaves the budget's reading room free.
    pub fn resize_for_reply(&mut self, bytes: usize) -> Result<(), BudgetError> {
        if bytes <= self.bytes {
            self.shrink_to(bytes);
            return Ok(());
        }
        self.budget
            .state()
            .try_take_leaving(bytes - self.bytes, self.budget.reading_room)?;
        self.bytes = bytes;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// Every peer's budget, by node id: a peer's links share one, whichever connected first. An
/// entry lives while a link or a queued request of that peer holds it.
#[derive(Debug)]
pub struct Budgets {
    limit: usize,
    max_message: usize,
    peers: Mutex<HashMap<NodeId, Weak<PeerBudget>>>,
}

impl Budgets {
    pub fn new(limit: usize, max_message: usize) -> Self {
        Budgets {
            limit,
            max_message,
            peers: Mutex::default(),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Weak<PeerBudget>>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn for_peer(&self, peer: NodeId) -> Arc<PeerBudget> {
        let mut peers = self.peers();
        if let Some(budget) = peers.get(&peer).and_then(Weak::upgrade) {
            return budget;
        }
        // Forget peers whose links and work are all gone, so the table stays small.
        peers.retain(|_, b| b.strong_count() > 0);
        let budget = PeerBudget::new(self.limit, self.max_message);
        peers.insert(peer, Arc::downgrade(&budget));
        budget
    }

    /// Bytes held for `peer` now (0 when nothing is).
    pub fn held(&self, peer: &NodeId) -> usize {
        self.peers()
            .get(peer)
            .and_then(Weak::upgrade)
            .map_or(0, |b| b.held())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bytes_are_taken_while_they_fit() {
        let mut b = Budget::new(100);
        assert_eq!(b.try_take(60), Ok(()));
        assert_eq!(b.try_take(40), Ok(()));
        assert_eq!(
            b.try_take(1),
            Err(BudgetError::Exhausted {
                wanted: 1,
                held: 100,
                limit: 100
            })
        );
        b.give_back(60);
        assert_eq!(b.held(), 40);
        assert!(b.try_take(61).is_err(), "refused whole, not in part");
        assert_eq!(b.held(), 40);
        assert_eq!(b.try_take(usize::MAX).map_err(|_| ()), Err(()));
        assert!(b.try_take_leaving(30, 31).is_err(), "31 would not be left");
        assert_eq!(b.try_take_leaving(30, 30), Ok(()));
    }

    #[test]
    fn a_budget_holds_two_of_the_largest_messages() {
        assert_eq!(Budget::check(64 << 20, 32 << 20), Ok(()));
        assert!(Budget::check((64 << 20) - 1, 32 << 20).is_err());
    }

    #[test]
    fn held_bytes_come_back_when_dropped_or_shrunk() {
        let budget = PeerBudget::new(100, 20);
        let mut a = budget.try_acquire(70).expect("fits");
        assert!(budget.try_acquire(31).is_err());
        a.shrink_to(10);
        assert_eq!(budget.held(), 10);
        let b = budget.try_acquire(90).expect("fits after the shrink");
        assert!(
            a.resize_for_reply(11).is_err(),
            "a grow that does not fit is refused"
        );
        assert_eq!(a.bytes(), 10);
        drop(b);
        assert!(
            a.resize_for_reply(81).is_err(),
            "a reply leaves room to read"
        );
        assert_eq!(a.resize_for_reply(80), Ok(()));
        assert_eq!(a.resize_for_reply(50), Ok(()), "a shrink always fits");
        assert_eq!(budget.held(), 50);
        drop(a);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn acquire_waits_until_bytes_are_given_back() {
        let budget = PeerBudget::new(100, 0);
        let first = budget.try_acquire(80).expect("fits");
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.acquire(50).await.bytes() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "50 more do not fit beside 80");
        drop(first);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(got, 50);
        // More than the limit is asked as the whole limit (it could never fit otherwise).
        let all = tokio::time::timeout(Duration::from_secs(5), budget.acquire(1000))
            .await
            .expect("fits an empty budget");
        assert_eq!(all.bytes(), 100);
    }

    #[test]
    fn a_peer_has_one_budget_across_its_links() {
        let budgets = Budgets::new(100, 10);
        let peer = NodeId::from_signing_key(&[1; 32]);
        let other = NodeId::from_signing_key(&[2; 32]);
        let link1 = budgets.for_peer(peer);
        let link2 = budgets.for_peer(peer);
        let _a = link1.try_acquire(60).expect("fits");
        assert!(link2.try_acquire(60).is_err(), "the second link shares it");
        assert_eq!(budgets.held(&peer), 60);
        let _c = budgets.for_peer(other).try_acquire(60).expect("its own");
        drop((_a, link1, link2));
        assert_eq!(budgets.held(&peer), 0, "forgotten once nothing holds it");
    }
}
