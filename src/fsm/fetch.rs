//! The fetch planner: which positions of one block to ask for, so that `k` good fragments arrive
//! at the least cost. The one copy of this rule; the restore worker, the rebuilder, the restore
//! drill and recovery on a new machine all ask through it, and the simulation runs it.
//!
//! The rule:
//! - ask `k` positions at once, **data positions first** (the lowest positions: a block whose
//!   `k` data fragments arrive decodes without Reed-Solomon arithmetic), then parity;
//! - skip positions whose supplier is **known down**, using them only when nothing else is left
//!   (a down supplier may be back);
//! - ask **one more position for each one that fails** (unreachable, refused, corrupt), never a
//!   position that failed;
//! - **hedge**: a request outstanding past a latency bound is *slow*; the caller says so
//!   ([`Plan::slow`], or [`Plan::overdue`] with its clock) and one more position is asked
//!   beside it instead of waiting a whole request timeout. The slow request still counts if it
//!   answers first;
//! - **give up** when fewer than `k` positions can still succeed.
//!
//! Pure: time comes from the caller (each ask is stamped with the caller's `now`); nothing here
//! reads a clock.
//!
//! Invariant ([`Plan::check`]): positions good or being asked never exceed `k` plus the hedges
//! asked (each slow request allows exactly one more).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// A plan that asked more than its rule allows (a bug: the machines' invariants check it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{held} fragments good or asked for a block that needs {k} ({hedges} hedges)")]
    Overasked {
        held: usize,
        k: usize,
        hedges: usize,
    },
    #[error("a slow request that is not being asked")]
    StraySlow,
}

/// One block's fetch: the positions that may hold a fragment and what became of each ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    k: usize,
    /// Positions that may hold a good fragment, lowest (data) first.
    candidates: Vec<u32>,
    good: BTreeSet<u32>,
    /// Positions asked and not answered, with when they were asked (the caller's clock).
    asking: BTreeMap<u32, Duration>,
    /// Asked positions declared slow: each already has a hedge beside it.
    slow: BTreeSet<u32>,
    failed: BTreeSet<u32>,
    /// Hedges asked so far (the bound on asks beyond `k`).
    hedges: usize,
}

impl Plan {
    /// A plan for a block needing `k` good fragments from `candidates` (any order; asked lowest
    /// first). `k` is at least 1.
    pub fn new(k: u32, candidates: impl IntoIterator<Item = u32>) -> Plan {
        let candidates: BTreeSet<u32> = candidates.into_iter().collect();
        Plan {
            k: (k as usize).max(1),
            candidates: candidates.into_iter().collect(),
            good: BTreeSet::new(),
            asking: BTreeMap::new(),
            slow: BTreeSet::new(),
            failed: BTreeSet::new(),
            hedges: 0,
        }
    }

    /// A plan over every position of a `k`-of-`total` layout.
    pub fn layout(k: u32, total: u32) -> Plan {
        Plan::new(k, 0..total)
    }

    pub fn k(&self) -> u32 {
        self.k as u32
    }

    /// The positions to ask now (each stamped `now`): as many as are missing towards `k` good,
    /// counting requests in flight that are not slow. Positions not `down` first, lowest first;
    /// down ones only when nothing else is left. Empty once complete or hopeless.
    pub fn next(&mut self, down: &BTreeSet<u32>, now: Duration) -> Vec<u32> {
        if self.complete() || self.hopeless() {
            return Vec::new();
        }
        let live = self.asking.len() - self.slow.len();
        let need = self.k.saturating_sub(self.good.len() + live);
        let fresh: Vec<u32> = self
            .candidates
            .iter()
            .copied()
            .filter(|p| {
                !self.good.contains(p) && !self.asking.contains_key(p) && !self.failed.contains(p)
            })
            .collect();
        let (up, known_down): (Vec<u32>, Vec<u32>) =
            fresh.into_iter().partition(|p| !down.contains(p));
        let picks: Vec<u32> = up.into_iter().chain(known_down).take(need).collect();
        for p in &picks {
            self.asking.insert(*p, now);
        }
        picks
    }

    /// A good fragment at `position`. Returns whether it counts (it was asked and the block was
    /// not complete yet); a late answer of a hedged pair does not.
    pub fn ok(&mut self, position: u32) -> bool {
        if self.asking.remove(&position).is_none() {
            return false;
        }
        self.slow.remove(&position);
        if self.complete() {
            return false;
        }
        self.good.insert(position);
        true
    }

    /// The fragment at `position` could not be had (or failed its check). Returns whether it was
    /// being asked; the caller then asks [`Plan::next`] (one more, unless it was hedged already).
    pub fn failed(&mut self, position: u32) -> bool {
        if self.asking.remove(&position).is_none() {
            return false;
        }
        self.slow.remove(&position);
        self.failed.insert(position);
        true
    }

    /// The request at `position` is slow (past the caller's latency bound): one more position
    /// may be asked beside it. Returns whether that is new (asked, not already slow).
    pub fn slow(&mut self, position: u32) -> bool {
        if !self.asking.contains_key(&position) || !self.slow.insert(position) {
            return false;
        }
        self.hedges += 1;
        true
    }

    /// Requests asked at or before `now - bound` and not yet declared slow.
    pub fn overdue(&self, now: Duration, bound: Duration) -> Vec<u32> {
        self.asking
            .iter()
            .filter(|(p, at)| !self.slow.contains(p) && now.saturating_sub(**at) >= bound)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Declares every overdue request slow and returns the hedges to ask (stamped `now`).
    pub fn hedge(&mut self, down: &BTreeSet<u32>, now: Duration, bound: Duration) -> Vec<u32> {
        let overdue = self.overdue(now, bound);
        if overdue.is_empty() || self.complete() {
            return Vec::new();
        }
        for p in overdue {
            self.slow(p);
        }
        self.next(down, now)
    }

    /// `k` good fragments are in.
    pub fn complete(&self) -> bool {
        self.good.len() >= self.k
    }

    /// Fewer than `k` positions can still succeed, even if every one not failed answered well.
    pub fn hopeless(&self) -> bool {
        self.possible() < self.k
    }

    /// How many good fragments the positions not failed could give at best.
    pub fn possible(&self) -> usize {
        self.candidates.len().saturating_sub(self.failed.len())
    }

    /// The good positions, lowest first.
    pub fn good(&self) -> impl Iterator<Item = u32> + '_ {
        self.good.iter().copied()
    }

    pub fn good_count(&self) -> usize {
        self.good.len()
    }

    /// Whether `position` is being asked now.
    pub fn is_asking(&self, position: u32) -> bool {
        self.asking.contains_key(&position)
    }

    pub fn asking(&self) -> impl Iterator<Item = u32> + '_ {
        self.asking.keys().copied()
    }

    pub fn failed_positions(&self) -> impl Iterator<Item = u32> + '_ {
        self.failed.iter().copied()
    }

    /// Never more asked than needed: good plus asked is at most `k` plus the hedges.
    pub fn check(&self) -> Result<(), PlanError> {
        let held = self.good.len() + self.asking.len();
        if held > self.k + self.hedges {
            return Err(PlanError::Overasked {
                held,
                k: self.k,
                hedges: self.hedges,
            });
        }
        if self.slow.iter().any(|p| !self.asking.contains_key(p)) {
            return Err(PlanError::StraySlow);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::ZERO;

    fn none() -> BTreeSet<u32> {
        BTreeSet::new()
    }

    fn set(ps: &[u32]) -> BTreeSet<u32> {
        ps.iter().copied().collect()
    }

    #[test]
    fn asks_exactly_k_data_positions_first() {
        let mut plan = Plan::layout(4, 6);
        assert_eq!(plan.next(&none(), T0), vec![0, 1, 2, 3]);
        assert!(
            plan.next(&none(), T0).is_empty(),
            "k in flight: nothing more"
        );
        plan.check().expect("bounded");
    }

    #[test]
    fn data_first_whatever_order_the_candidates_come_in() {
        let mut plan = Plan::new(3, [5, 4, 3, 2, 1, 0]);
        assert_eq!(plan.next(&none(), T0), vec![0, 1, 2]);
        let mut plan = Plan::new(2, [7, 2, 9, 4]);
        assert_eq!(plan.next(&none(), T0), vec![2, 4]);
    }

    #[test]
    fn one_more_position_for_each_failure_never_a_failed_one() {
        let mut plan = Plan::layout(4, 6);
        plan.next(&none(), T0);
        assert!(plan.failed(1));
        assert_eq!(plan.next(&none(), T0), vec![4], "exactly one more");
        assert!(plan.failed(4));
        assert_eq!(plan.next(&none(), T0), vec![5]);
        for p in [0, 2, 3, 5] {
            assert!(plan.ok(p));
        }
        assert!(plan.complete());
        assert_eq!(plan.good().collect::<Vec<_>>(), vec![0, 2, 3, 5]);
        assert!(plan.next(&none(), T0).is_empty(), "complete: nothing more");
    }

    #[test]
    fn known_down_positions_are_skipped_until_nothing_else_is_left() {
        let mut plan = Plan::layout(4, 6);
        assert_eq!(plan.next(&set(&[0, 2]), T0), vec![1, 3, 4, 5]);
        assert!(plan.failed(4));
        assert_eq!(
            plan.next(&set(&[0, 2]), T0),
            vec![0],
            "a down one, lowest first"
        );
        // Three down with k = 4 of 6: one down position is needed at once.
        let mut plan = Plan::layout(4, 6);
        assert_eq!(plan.next(&set(&[0, 1, 5]), T0), vec![2, 3, 4, 0]);
    }

    #[test]
    fn gives_up_when_fewer_than_k_can_still_succeed() {
        let mut plan = Plan::layout(4, 6);
        plan.next(&none(), T0);
        plan.failed(0);
        plan.failed(1);
        assert!(!plan.hopeless(), "4 of 6 may still answer");
        plan.next(&none(), T0);
        plan.failed(2);
        assert!(plan.hopeless(), "3 left for k = 4");
        assert!(plan.next(&none(), T0).is_empty());
    }

    #[test]
    fn a_slow_request_is_hedged_by_one_more_position_and_still_counts() {
        let bound = Duration::from_secs(5);
        let mut plan = Plan::layout(4, 6);
        plan.next(&none(), T0);
        for p in [0, 2, 3] {
            plan.ok(p);
        }
        assert!(
            plan.hedge(&none(), Duration::from_secs(4), bound)
                .is_empty(),
            "not yet past the bound"
        );
        assert_eq!(plan.overdue(Duration::from_secs(5), bound), vec![1]);
        assert_eq!(plan.hedge(&none(), Duration::from_secs(5), bound), vec![4]);
        assert!(
            plan.hedge(&none(), Duration::from_secs(9), bound)
                .is_empty(),
            "position 1 is hedged once; position 4 is not overdue yet"
        );
        plan.check().expect("k + 1 with one hedge");
        // The slow one answers first: it counts, and the hedge's late answer does not.
        assert!(plan.ok(1));
        assert!(plan.complete());
        assert!(!plan.ok(4));
        assert_eq!(plan.good().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_hedged_request_that_fails_asks_nothing_more() {
        let mut plan = Plan::layout(2, 4);
        plan.next(&none(), T0);
        assert!(plan.slow(0));
        assert!(!plan.slow(0), "once");
        assert_eq!(plan.next(&none(), T0), vec![2]);
        assert!(plan.failed(0));
        assert!(
            plan.next(&none(), T0).is_empty(),
            "its hedge is already asked"
        );
        plan.check().expect("bounded");
    }

    #[test]
    fn answers_for_positions_not_asked_are_ignored() {
        let mut plan = Plan::layout(2, 4);
        plan.next(&none(), T0);
        assert!(!plan.ok(3));
        assert!(!plan.failed(3));
        assert!(!plan.slow(3));
        assert_eq!(plan.good_count(), 0);
    }

    #[test]
    fn check_catches_more_asked_than_k_without_hedges() {
        let mut plan = Plan::layout(2, 4);
        plan.next(&none(), T0);
        plan.asking.insert(3, T0);
        assert!(plan.check().is_err());
    }
}
