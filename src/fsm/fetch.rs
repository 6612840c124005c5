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
        self.overdue_by(now, |_| bound)
    }

    /// Requests outstanding at least their own position's bound and not yet declared slow.
    pub fn overdue_by(&self, now: Duration, bound: impl Fn(u32) -> Duration) -> Vec<u32> {
        self.asking
            .iter()
            .filter(|(p, at)| !self.slow.contains(p) && now.saturating_sub(**at) >= bound(**p))
            .map(|(p, _)| *p)
            .collect()
    }

    /// When the request at `position` was asked (the caller's clock), if it is being asked.
    pub fn asked_at(&self, position: u32) -> Option<Duration> {
        self.asking.get(&position).copied()
    }

    /// Declares every overdue request slow and returns the hedges to ask (stamped `now`).
    pub fn hedge(&mut self, down: &BTreeSet<u32>, now: Duration, bound: Duration) -> Vec<u32> {
        self.hedge_by(down, now, |_| bound)
    }

    /// [`Plan::hedge`] with a bound per position (see [`Latency::bound`]).
    pub fn hedge_by(
        &mut self,
        down: &BTreeSet<u32>,
        now: Duration,
        bound: impl Fn(u32) -> Duration,
    ) -> Vec<u32> {
        let overdue = self.overdue_by(now, bound);
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

/// Observed answer times per position (its supplier), for hedging and ranking (M7).
///
/// - A request is hedged after a few times its supplier's usual latency
///   ([`LATENCY_FACTOR`] × the EWMA), never sooner than [`LATENCY_FLOOR`] and never later than
///   the caller's static bound; a supplier not yet observed gets the same multiple of the median
///   of those that are.
/// - A position whose EWMA is over [`LATENCY_FACTOR`] times the median of all observed ones
///   (and over the floor) is *slow*: asked only when nothing else is left, like a known-down one.
///
/// Pure: the caller measures (ask time from the plan, answer time from its clock).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latency {
    /// Per position: EWMA in seconds and the samples seen.
    seen: BTreeMap<u32, (f64, u32)>,
}

/// How many times its usual latency a request may take before it is hedged.
pub const LATENCY_FACTOR: f64 = 4.0;
/// No hedge sooner than this (loopback answers in microseconds; a busy disk takes more).
pub const LATENCY_FLOOR: Duration = Duration::from_millis(500);
/// Weight of the newest sample in the EWMA.
const EWMA_WEIGHT: f64 = 0.3;
/// Samples before a position's own figure is trusted.
const MIN_SAMPLES: u32 = 2;

impl Latency {
    /// One answer (or failure) at `position`, `took` after it was asked.
    pub fn observe(&mut self, position: u32, took: Duration) {
        let x = took.as_secs_f64();
        let entry = self.seen.entry(position).or_insert((x, 0));
        if entry.1 > 0 {
            entry.0 = EWMA_WEIGHT * x + (1.0 - EWMA_WEIGHT) * entry.0;
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// Forgets what was seen at `position` (another supplier holds it now).
    pub fn forget(&mut self, position: u32) {
        self.seen.remove(&position);
    }

    /// The position's EWMA, once it has enough samples.
    pub fn typical(&self, position: u32) -> Option<Duration> {
        self.seen
            .get(&position)
            .filter(|(_, n)| *n >= MIN_SAMPLES)
            .map(|(x, _)| Duration::from_secs_f64(*x))
    }

    /// The median of the trusted EWMAs.
    fn median(&self) -> Option<f64> {
        let mut xs: Vec<f64> = self
            .seen
            .values()
            .filter(|(_, n)| *n >= MIN_SAMPLES)
            .map(|(x, _)| *x)
            .collect();
        if xs.is_empty() {
            return None;
        }
        xs.sort_by(f64::total_cmp);
        Some(xs[xs.len() / 2])
    }

    /// How long a request to `position` may be outstanding before a hedge: `cap` (the caller's
    /// static bound) until something was observed.
    ///
    /// The figure is the lesser of the position's own EWMA and the median of all: a supplier
    /// that is usually slow must not earn itself a longer wait (its slow answers would otherwise
    /// raise its own bound until nothing is hedged).
    pub fn bound(&self, position: u32, cap: Duration) -> Duration {
        let own = self.typical(position).map(|d| d.as_secs_f64());
        let typical = match (own, self.median()) {
            (Some(own), Some(median)) => Some(own.min(median)),
            (own, median) => own.or(median),
        };
        // Never sooner than a third of the static bound either: suppliers whose answers vary
        // (a busy disk, a slow link) are not hedged for an ordinary slow answer.
        let floor = LATENCY_FLOOR.max(cap / 3);
        match typical {
            Some(x) => Duration::from_secs_f64(x * LATENCY_FACTOR).clamp(floor, cap.max(floor)),
            None => cap,
        }
    }

    /// Positions much slower than the others (asked last).
    pub fn slow(&self) -> BTreeSet<u32> {
        let Some(median) = self.median() else {
            return BTreeSet::new();
        };
        let limit = (median * LATENCY_FACTOR).max(LATENCY_FLOOR.as_secs_f64());
        self.seen
            .iter()
            .filter(|(_, (x, n))| *n >= MIN_SAMPLES && *x > limit)
            .map(|(p, _)| *p)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::ZERO;

    #[test]
    fn latency_bounds_follow_each_supplier_and_slow_ones_are_named() {
        let mut l = Latency::default();
        let cap = Duration::from_secs(15);
        assert_eq!(l.bound(0, cap), cap, "nothing observed: the caller's bound");
        for p in 0..5 {
            l.observe(p, Duration::from_millis(20));
            l.observe(p, Duration::from_millis(40));
        }
        // 4 x ~26 ms is under the floor (a third of the caller's bound).
        assert_eq!(l.bound(1, cap), cap / 3);
        // Not observed yet: the others' median.
        assert_eq!(l.bound(5, cap), cap / 3);
        l.observe(5, Duration::from_secs(10));
        l.observe(5, Duration::from_secs(10));
        assert_eq!(
            l.bound(5, cap),
            cap / 3,
            "a slow supplier is hedged on the others' figure, not its own"
        );
        assert_eq!(l.slow(), [5].into_iter().collect());
        // A request at a fast position outstanding past its bound is hedged then, not at 15 s.
        let mut plan = Plan::layout(4, 6);
        plan.next(&BTreeSet::new(), T0);
        let hedges = plan.hedge_by(&BTreeSet::new(), Duration::from_secs(5), |p| {
            l.bound(p, cap)
        });
        assert_eq!(hedges, vec![4, 5], "all four asked are past 5 s at 5 s");
    }

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
