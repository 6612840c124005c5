//! Retention's policy, pure: which versions go, and which blocks nothing kept references. The
//! catalog (`catalog::plan_prune`) reads what these functions need a page at a time and asks
//! them; `catalog::apply_prune` and the backup driver carry the plan out.

use std::collections::{BTreeMap, BTreeSet};

use super::catalog::SnapshotId;
use crate::data::BlockId;

/// Which snapshots go and which stay.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Versions {
    /// In id order, without repeats.
    pub dropped: Vec<SnapshotId>,
    /// Grouped by source, oldest first (the order the reference walk is fastest in), then the
    /// snapshots that could not be judged, then the unfinished jobs'.
    pub kept: Vec<SnapshotId>,
}

/// Chooses the versions to drop.
///
/// - `snapshots`: every committed snapshot in id order, with its source (`None`: its record does
///   not parse, so it is kept, never judged).
/// - `trees`: every snapshot id that has file entries, committed or not.
/// - `in_use`: the snapshots of unfinished jobs, and the versions restores are reading (kept,
///   and so are their trees, however old).
/// - `keep_versions`: versions kept per source; 0 counts as 1 (a source's latest version never
///   goes).
///
/// A tree with neither a snapshot record nor a job or restore using it (an abandoned job's, or
/// one an interrupted prune had started removing) is dropped.
pub fn versions(
    snapshots: &[(SnapshotId, Option<String>)],
    trees: &[SnapshotId],
    in_use: &BTreeSet<SnapshotId>,
    keep_versions: usize,
) -> Versions {
    let keep = keep_versions.max(1);
    let mut by_source: BTreeMap<&str, Vec<SnapshotId>> = BTreeMap::new();
    let mut unjudged = Vec::new();
    for (id, source) in snapshots {
        match source {
            Some(source) => by_source.entry(source).or_default().push(*id),
            None => unjudged.push(*id),
        }
    }
    let mut plan = Versions::default();
    for ids in by_source.values() {
        let (old, newest) = ids.split_at(ids.len().saturating_sub(keep));
        for id in old {
            if in_use.contains(id) {
                plan.kept.push(*id);
            } else {
                plan.dropped.push(*id);
            }
        }
        plan.kept.extend_from_slice(newest);
    }
    plan.kept.extend(unjudged);
    let recorded: BTreeSet<SnapshotId> = snapshots.iter().map(|(id, _)| *id).collect();
    plan.kept
        .extend(in_use.iter().filter(|id| !recorded.contains(id)));
    plan.dropped.extend(
        trees
            .iter()
            .filter(|id| !recorded.contains(id) && !in_use.contains(id)),
    );
    plan.dropped.sort_unstable();
    plan.dropped.dedup();
    plan
}

/// Whether a block goes: no kept version references it and it is not protected (the current
/// catalog export's blocks, an unfinished job's).
pub fn block_goes(
    block: &BlockId,
    referenced: &BTreeSet<BlockId>,
    protect: &BTreeSet<BlockId>,
) -> bool {
    !referenced.contains(block) && !protect.contains(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: u64, source: &str) -> (SnapshotId, Option<String>) {
        (SnapshotId(id), Some(source.into()))
    }

    fn ids(v: &[u64]) -> Vec<SnapshotId> {
        v.iter().map(|i| SnapshotId(*i)).collect()
    }

    #[test]
    fn each_source_keeps_its_newest_versions() {
        let snapshots = [s(1, "a"), s(2, "b"), s(3, "a"), s(4, "a"), s(5, "b")];
        let plan = versions(&snapshots, &ids(&[1, 2, 3, 4, 5]), &BTreeSet::new(), 2);
        assert_eq!(plan.dropped, ids(&[1]));
        assert_eq!(plan.kept, ids(&[3, 4, 2, 5]), "by source, oldest first");
        let plan = versions(&snapshots, &[], &BTreeSet::new(), 1);
        assert_eq!(plan.dropped, ids(&[1, 2, 3]));
    }

    #[test]
    fn keeping_zero_versions_keeps_the_latest() {
        let snapshots = [s(1, "a"), s(2, "a")];
        assert_eq!(
            versions(&snapshots, &[], &BTreeSet::new(), 0),
            versions(&snapshots, &[], &BTreeSet::new(), 1)
        );
        assert_eq!(
            versions(&snapshots, &[], &BTreeSet::new(), 0).kept,
            ids(&[2])
        );
    }

    #[test]
    fn an_unreadable_record_and_a_running_job_are_kept_an_orphan_tree_goes() {
        let snapshots = [s(1, "a"), (SnapshotId(2), None), s(3, "a")];
        let running = BTreeSet::from([SnapshotId(9)]);
        let plan = versions(&snapshots, &ids(&[1, 2, 3, 7, 9]), &running, 1);
        assert_eq!(plan.dropped, ids(&[1, 7]), "7 has a tree and nothing else");
        assert_eq!(plan.kept, ids(&[3, 2, 9]));
    }

    #[test]
    fn a_version_in_use_is_kept_however_old_and_named_once() {
        let snapshots = [s(1, "a"), s(2, "a"), s(3, "a")];
        // 1 is being restored, 3 is also among the newest kept.
        let in_use = BTreeSet::from([SnapshotId(1), SnapshotId(3)]);
        let plan = versions(&snapshots, &ids(&[1, 2, 3]), &in_use, 1);
        assert_eq!(plan.dropped, ids(&[2]));
        assert_eq!(plan.kept, ids(&[1, 3]));
    }

    #[test]
    fn a_block_goes_only_when_nothing_kept_references_it_and_it_is_not_protected() {
        let (a, b, c) = (BlockId([1; 32]), BlockId([2; 32]), BlockId([3; 32]));
        let referenced = BTreeSet::from([a]);
        let protect = BTreeSet::from([b]);
        assert!(!block_goes(&a, &referenced, &protect));
        assert!(!block_goes(&b, &referenced, &protect));
        assert!(block_goes(&c, &referenced, &protect));
    }
}
