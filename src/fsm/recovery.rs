//! Which recovery record a new machine recovers from (issue 18, H2): pure, so the rule is tested
//! without a network. A stale copy (a supplier that missed the last upload, a friend fired long
//! ago) must never win over a newer one, and the answer must not depend on which peer the user
//! happened to name.
//!
//! - Ask every candidate once: the friend named to `recover`, every friend in the peer book, and
//!   every supplier any valid record names (so a record names the peers that hold newer ones).
//! - Only a record that verifies under the owner's key and opens counts; its revision is the
//!   one in its signed header. The highest revision wins; between equal revisions the first
//!   found stays.
//! - Repeat while a record named a peer not asked yet: the search is stable when every
//!   candidate was asked.
//! - Afterwards every peer that answered with a lower revision, or with none, is a peer to give
//!   the winner to ([`Search::behind`]), so no supplier is left holding an older record.

use std::collections::{BTreeMap, BTreeSet};

/// What one peer answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A record that verified and opened, with this revision.
    Record(u64),
    /// No record, an invalid one, a refusal or no answer at all.
    Nothing,
}

/// The search for the newest recovery record among peers `P`.
#[derive(Debug, Clone)]
pub struct Search<P: Ord + Copy> {
    candidates: BTreeSet<P>,
    asked: BTreeSet<P>,
    answers: BTreeMap<P, Answer>,
    best: Option<(P, u64)>,
}

impl<P: Ord + Copy> Search<P> {
    /// A search that starts with `peers` (the friend given to `recover` and the peer book).
    pub fn new(peers: impl IntoIterator<Item = P>) -> Self {
        Search {
            candidates: peers.into_iter().collect(),
            asked: BTreeSet::new(),
            answers: BTreeMap::new(),
            best: None,
        }
    }

    /// The peers to ask now (each is handed out once, ever).
    pub fn to_ask(&mut self) -> Vec<P> {
        let fresh: Vec<P> = self.candidates.difference(&self.asked).copied().collect();
        self.asked.extend(fresh.iter().copied());
        fresh
    }

    /// `peer` answered. Returns whether its record is the new best (strictly higher revision
    /// than any found before).
    pub fn answered(&mut self, peer: P, answer: Answer) -> bool {
        self.answers.insert(peer, answer);
        let Answer::Record(revision) = answer else {
            return false;
        };
        let better = self.best.is_none_or(|(_, best)| revision > best);
        if better {
            self.best = Some((peer, revision));
        }
        better
    }

    /// A valid record names these peers (its suppliers): they are asked too.
    pub fn named(&mut self, peers: impl IntoIterator<Item = P>) {
        self.candidates.extend(peers);
    }

    /// The peer that served the newest record, and its revision.
    pub fn best(&self) -> Option<(P, u64)> {
        self.best
    }

    /// Every candidate was asked.
    pub fn stable(&self) -> bool {
        self.candidates.is_subset(&self.asked)
    }

    /// Peers that answered with an older record or none, once the search is over: they are
    /// given the winner.
    pub fn behind(&self) -> Vec<P> {
        let Some((_, best)) = self.best else {
            return Vec::new();
        };
        self.answers
            .iter()
            .filter(|(_, a)| match a {
                Answer::Record(r) => *r < best,
                Answer::Nothing => true,
            })
            .map(|(p, _)| *p)
            .collect()
    }

    /// How many peers were asked.
    pub fn asked_count(&self) -> usize {
        self.asked.len()
    }

    /// How many peers answered with a valid record.
    pub fn records_found(&self) -> usize {
        self.answers
            .values()
            .filter(|a| matches!(a, Answer::Record(_)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a search over `records` (peer -> (revision, peers that record names)); a peer with
    /// no entry has nothing. Returns the search and the order peers were asked in.
    fn run(start: &[u8], records: &BTreeMap<u8, (u64, Vec<u8>)>) -> (Search<u8>, Vec<u8>) {
        let mut s = Search::new(start.iter().copied());
        let mut order = Vec::new();
        let mut rounds = 0;
        while !s.stable() {
            rounds += 1;
            assert!(rounds < 100, "the search does not end");
            for peer in s.to_ask() {
                order.push(peer);
                match records.get(&peer) {
                    Some((revision, named)) => {
                        s.answered(peer, Answer::Record(*revision));
                        s.named(named.iter().copied());
                    }
                    None => {
                        s.answered(peer, Answer::Nothing);
                    }
                }
            }
        }
        (s, order)
    }

    #[test]
    fn a_friend_with_an_old_record_leads_to_the_newest_through_the_suppliers_it_names() {
        // Friend 1 was fired at revision 3; its record names 2, 3, 4. Supplier 4 missed the
        // last upload (revision 8); 2 and 3 hold 9, which names 5 (hired since) holding 9.
        let records = BTreeMap::from([
            (1, (3, vec![2, 3, 4])),
            (2, (9, vec![2, 3, 5])),
            (3, (9, vec![2, 3, 5])),
            (4, (8, vec![2, 3, 4])),
            (5, (9, vec![2, 3, 5])),
        ]);
        let (s, order) = run(&[1], &records);
        assert_eq!(s.best(), Some((2, 9)), "the first of the newest");
        assert_eq!(order.len(), 5, "each asked once: {order:?}");
        assert_eq!(s.behind(), vec![1, 4]);
        assert_eq!(s.records_found(), 5);
    }

    #[test]
    fn the_answer_does_not_depend_on_where_the_search_starts() {
        let records = BTreeMap::from([(1, (3, vec![2])), (2, (5, vec![3])), (3, (7, vec![1]))]);
        for start in [1u8, 2, 3] {
            let (s, _) = run(&[start], &records);
            assert_eq!(s.best().map(|b| b.1), Some(7), "from {start}");
        }
    }

    #[test]
    fn nothing_valid_is_no_best_and_a_lower_answer_never_replaces_a_higher_one() {
        let mut s = Search::new([1u8, 2]);
        assert_eq!(s.to_ask(), vec![1, 2]);
        assert!(s.to_ask().is_empty(), "asked once");
        assert!(!s.answered(1, Answer::Nothing));
        assert_eq!(s.best(), None);
        assert!(s.behind().is_empty(), "nothing to hand out");
        assert!(s.answered(2, Answer::Record(4)));
        assert!(!s.answered(1, Answer::Record(4)), "a tie keeps the first");
        assert!(!s.answered(1, Answer::Record(2)));
        assert_eq!(s.best(), Some((2, 4)));
        assert!(s.stable());
        s.named([3]);
        assert!(!s.stable(), "a newly named peer is asked");
        assert_eq!(s.to_ask(), vec![3]);
    }
}
