//! The rule for storing the catalog on the suppliers, after a snapshot (the backup job's
//! `Committing` phase) and after a rebuild (the rebuilder's refresh): pure, so both follow it
//! and tests check it without IO.
//!
//! - Every fragment of every catalog block goes once to its position's supplier, if that
//!   supplier is up; the others are not asked.
//! - The upload counts only when every catalog block reached at least `k` suppliers
//!   ([`CatalogCommit::has_k`]); otherwise the snapshot stands locally but has no stored catalog.
//! - A fragment that did not reach its supplier is staged in the outbox (a job places it when the
//!   supplier returns), except in a refresh, where a supplier that was asked and failed stays
//!   recorded as the holder and its cell is marked missing (the monitor rebuilds it).
//! - The recovery record takes the next revision: above every earlier record of this node and
//!   at least the job's floor ([`CatalogCommit::revision`]); it must reach at least one supplier
//!   ([`CatalogCommit::record_kept`]).
//! - The node's own revision never goes down ([`raise_revision`]): a record it recovers from or
//!   learns of later only ever raises it, so its next upload is above every record it has seen.

use std::collections::BTreeSet;

/// A block's id.
pub type BlockId = [u8; 32];

/// What becomes of a fragment a supplier was asked for and did not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misses {
    /// Staged in the outbox and placed like a data fragment once its supplier is back (a job).
    Stage,
    /// Recorded at that supplier, its cell marked missing: the monitor rebuilds it (a refresh).
    Monitor,
}

/// One fragment's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Its supplier was not up: never asked.
    NotAsked,
    Pending,
    Stored,
    Failed,
}

/// Where one catalog block's fragments end up, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub block: BlockId,
    /// Positions recorded as holding their fragment (stored, or missing in a refresh).
    pub holders: Vec<u32>,
    /// Positions whose fragment waits in the outbox (no holder recorded).
    pub staged: Vec<u32>,
    /// Positions recorded at their supplier whose fragment is not there (a refresh).
    pub missing: Vec<u32>,
}

/// One catalog upload: the catalog blocks and every fragment's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogCommit {
    pub data_shards: u32,
    pub positions: u32,
    pub misses: Misses,
    /// The lowest revision the record may carry (a job's snapshot id; 0 for a refresh).
    pub floor: u64,
    /// The highest revision this node stored before.
    pub last_revision: u64,
    blocks: Vec<(BlockId, Vec<Answer>)>,
}

impl CatalogCommit {
    pub fn new(data_shards: u32, parity_shards: u32, misses: Misses, floor: u64) -> Self {
        CatalogCommit {
            data_shards,
            positions: data_shards + parity_shards,
            misses,
            floor,
            last_revision: 0,
            blocks: Vec::new(),
        }
    }

    /// The catalog is sealed and coded into `blocks` (in export order): the fragments to send,
    /// one per block and position whose supplier is `up`.
    pub fn encoded(
        &mut self,
        blocks: &[BlockId],
        last_revision: u64,
        up: &BTreeSet<u32>,
    ) -> Vec<(BlockId, u32)> {
        self.last_revision = last_revision;
        self.blocks.clear();
        let mut sends = Vec::new();
        for block in blocks {
            let answers = (0..self.positions)
                .map(|position| {
                    if up.contains(&position) {
                        sends.push((*block, position));
                        Answer::Pending
                    } else {
                        Answer::NotAsked
                    }
                })
                .collect();
            self.blocks.push((*block, answers));
        }
        sends
    }

    /// Whether the upload has a chance: at least `k` of the `positions` have their supplier up
    /// (only those are asked).
    pub fn can_reach_k(data_shards: u32, positions: u32, up: &BTreeSet<u32>) -> bool {
        up.iter().filter(|p| **p < positions).count() >= data_shards as usize
    }

    fn answer_mut(&mut self, block: BlockId, position: u32) -> Option<&mut Answer> {
        self.blocks
            .iter_mut()
            .find(|(b, _)| *b == block)
            .and_then(|(_, answers)| answers.get_mut(position as usize))
    }

    /// A supplier answered; an answer nobody waits for changes nothing.
    pub fn answered(&mut self, block: BlockId, position: u32, stored: bool) {
        if let Some(answer) = self.answer_mut(block, position)
            && *answer == Answer::Pending
        {
            *answer = if stored {
                Answer::Stored
            } else {
                Answer::Failed
            };
        }
    }

    /// This catalog after the answer (for guards, which judge an event before it is applied).
    pub fn with(&self, block: BlockId, position: u32, stored: bool) -> CatalogCommit {
        let mut next = self.clone();
        next.answered(block, position, stored);
        next
    }

    /// Answers still awaited.
    pub fn pending(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|(_, a)| a)
            .filter(|a| **a == Answer::Pending)
            .count()
    }

    /// The fewest fragments any catalog block has stored (0 before the catalog is encoded).
    pub fn least_stored(&self) -> usize {
        self.blocks
            .iter()
            .map(|(_, a)| a.iter().filter(|a| **a == Answer::Stored).count())
            .min()
            .unwrap_or(0)
    }

    /// Every answer is in and every catalog block has at least `k` fragments stored.
    pub fn has_k(&self) -> bool {
        !self.blocks.is_empty()
            && self.pending() == 0
            && self.least_stored() >= self.data_shards as usize
    }

    /// Where each block's fragments end up (once every answer is in).
    pub fn placements(&self) -> Vec<Placement> {
        self.blocks
            .iter()
            .map(|(block, answers)| {
                let mut p = Placement {
                    block: *block,
                    holders: Vec::new(),
                    staged: Vec::new(),
                    missing: Vec::new(),
                };
                for (position, answer) in (0u32..).zip(answers) {
                    match (answer, self.misses) {
                        (Answer::Stored, _) => p.holders.push(position),
                        (Answer::Failed, Misses::Monitor) => {
                            p.holders.push(position);
                            p.missing.push(position);
                        }
                        _ => p.staged.push(position),
                    }
                }
                p
            })
            .collect()
    }

    /// The revision of the record this upload stores.
    pub fn revision(&self) -> u64 {
        self.floor.max(self.last_revision.saturating_add(1))
    }

    /// The record counts as stored once one supplier took it (every supplier is asked).
    pub fn record_kept(copies: usize) -> bool {
        copies >= 1
    }
}

/// The never-downward rule for the revision the node keeps as its own: `Some(seen)` when a
/// record seen (recovered from, or held by a supplier) is above the `stored` one, else `None`
/// (nothing to write: the node never lowers it).
pub fn raise_revision(stored: u64, seen: u64) -> Option<u64> {
    (seen > stored).then_some(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_own_revision_only_goes_up() {
        assert_eq!(raise_revision(5, 9), Some(9));
        assert_eq!(
            raise_revision(9, 5),
            None,
            "an older record never lowers it"
        );
        assert_eq!(raise_revision(9, 9), None);
        // And an upload after raising is above what was seen.
        let mut c = CatalogCommit::new(2, 1, Misses::Stage, 0);
        c.encoded(&[[1; 32]], raise_revision(5, 9).unwrap_or(5), &up(&[0, 1]));
        assert_eq!(c.revision(), 10);
    }

    fn up(positions: &[u32]) -> BTreeSet<u32> {
        positions.iter().copied().collect()
    }

    #[test]
    fn every_fragment_goes_once_to_its_supplier_if_it_is_up() {
        let mut c = CatalogCommit::new(2, 1, Misses::Stage, 0);
        let sends = c.encoded(&[[1; 32], [2; 32]], 0, &up(&[0, 2]));
        assert_eq!(
            sends,
            vec![([1; 32], 0), ([1; 32], 2), ([2; 32], 0), ([2; 32], 2)]
        );
        assert_eq!(c.pending(), 4);
        assert!(CatalogCommit::can_reach_k(2, 3, &up(&[0, 2])));
        assert!(!CatalogCommit::can_reach_k(2, 3, &up(&[0])));
        assert!(
            !CatalogCommit::can_reach_k(2, 3, &up(&[0, 7])),
            "no such position"
        );
    }

    #[test]
    fn the_upload_counts_only_when_every_block_has_k_fragments_stored() {
        let mut c = CatalogCommit::new(2, 1, Misses::Stage, 0);
        c.encoded(&[[1; 32], [2; 32]], 0, &up(&[0, 1, 2]));
        for p in 0..3 {
            c.answered([1; 32], p, true);
        }
        c.answered([2; 32], 0, true);
        c.answered([2; 32], 1, false);
        assert!(!c.has_k(), "an answer is still out");
        assert!(
            !c.with([2; 32], 2, false).has_k(),
            "block 2 would have only one"
        );
        assert_eq!(c.with([2; 32], 2, false).least_stored(), 1);
        assert!(c.with([2; 32], 2, true).has_k());
        c.answered([2; 32], 2, true);
        assert!(c.has_k());
        c.answered([2; 32], 2, false);
        assert!(c.has_k(), "a late second answer changes nothing");
    }

    #[test]
    fn a_job_stages_what_did_not_reach_its_supplier_a_refresh_leaves_it_to_the_monitor() {
        let mut job = CatalogCommit::new(2, 2, Misses::Stage, 0);
        job.encoded(&[[1; 32]], 0, &up(&[0, 1, 2]));
        job.answered([1; 32], 0, true);
        job.answered([1; 32], 1, true);
        job.answered([1; 32], 2, false);
        let mut refresh = job.clone();
        refresh.misses = Misses::Monitor;
        assert_eq!(
            job.placements(),
            vec![Placement {
                block: [1; 32],
                holders: vec![0, 1],
                staged: vec![2, 3],
                missing: vec![],
            }]
        );
        assert_eq!(
            refresh.placements(),
            vec![Placement {
                block: [1; 32],
                holders: vec![0, 1, 2],
                staged: vec![3],
                missing: vec![2],
            }],
            "position 3 was never asked: staged in both"
        );
    }

    #[test]
    fn the_revision_is_above_every_earlier_one_and_at_least_the_floor() {
        let mut c = CatalogCommit::new(2, 1, Misses::Stage, 10);
        c.encoded(&[[1; 32]], 3, &up(&[0, 1]));
        assert_eq!(c.revision(), 10);
        c.encoded(&[[1; 32]], 12, &up(&[0, 1]));
        assert_eq!(c.revision(), 13);
        assert!(!CatalogCommit::record_kept(0));
        assert!(CatalogCommit::record_kept(1));
    }
}
