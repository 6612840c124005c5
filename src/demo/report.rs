//! The demo's report: what it did and measured, as one JSON object (`--json`) or a short text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::tree::{Comparison, Difference};
use super::{FailedFile, RestoreResult, Step};
use crate::actors::status::{JobResult, MachineStatus, PositionStatus};

/// Differences listed in the report (all are counted).
const LISTED: usize = 20;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// True only when the restore matched the source.
    pub ok: bool,
    pub failed_step: Option<Step>,
    pub error: Option<String>,
    /// The temporary directory: homes (each with its node.log), data, restore.
    pub dir: String,
    /// `--keep` left it; otherwise it is removed as the demo ends.
    pub kept: bool,
    pub data: Option<DataReport>,
    pub network: Option<NetworkReport>,
    pub backup: Option<BackupReport>,
    /// Every friend: the position it held for the owner when the backup ended, and the
    /// fragment files it holds for the owner.
    pub suppliers: Vec<SupplierReport>,
    /// Two suppliers stopped for good: their firing, replacement and the rebuild.
    pub rebuild: Option<RebuildReport>,
    /// The owner's own restore drill after the rebuild.
    pub drill: Option<DrillView>,
    pub restore: Option<RestoreReport>,
    pub verify: Option<VerifyReport>,
    /// The owner's state machines at the end.
    pub machines: Vec<MachineStatus>,
    /// The owner's positions at the end (stopped suppliers may have been replaced).
    pub positions: Vec<PositionStatus>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DataReport {
    pub path: String,
    /// The demo's own sample (no `--data`).
    pub generated: bool,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct NetworkReport {
    pub owner: String,
    pub friends: usize,
    pub data_shards: u32,
    pub parity_shards: u32,
    /// From the nodes' start to every position connected.
    pub hire_seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BackupReport {
    pub outcome: String,
    pub snapshot: u64,
    pub files: u64,
    pub bytes: u64,
    /// Bytes of chunks not stored before (after deduplication).
    pub new_bytes: u64,
    pub new_blocks: u64,
    /// The node's own measure of the job.
    pub seconds: f64,
    /// The `backup --wait` command, end to end.
    pub wall_seconds: f64,
    pub bytes_per_second: Option<f64>,
}

impl BackupReport {
    pub fn new(r: &JobResult, wall: f64) -> BackupReport {
        BackupReport {
            outcome: r.outcome.to_string(),
            snapshot: r.snapshot,
            files: r.files,
            bytes: r.bytes,
            new_bytes: r.new_bytes,
            new_blocks: r.new_blocks,
            seconds: r.seconds,
            wall_seconds: wall,
            bytes_per_second: per(r.bytes as f64, r.seconds),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SupplierReport {
    pub name: String,
    pub node_id: String,
    pub position: Option<u32>,
    /// Fragment files under its `store/<owner>/` (the recovery record included).
    pub fragments: u64,
    pub fragment_bytes: u64,
    /// Stopped for good after the backup.
    pub stopped: bool,
    /// The position this spare took over in the rebuild.
    pub took_position: Option<u32>,
}

/// A supplier fired by the owner's monitor.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FiringReport {
    pub position: u32,
    /// The monitor's reason, as it logged it.
    pub reason: String,
    /// The friends that held the position before and after (names).
    pub was: Option<String>,
    pub now: Option<String>,
}

/// From the two suppliers' stop to every block back at `k + m` good fragments.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RebuildReport {
    /// Seconds from the stop to full redundancy (fired, re-hired and rebuilt).
    pub seconds: f64,
    /// When each position was fired, seconds after the stop.
    pub fired: Vec<FiringReport>,
    /// Blocks the monitor follows (the catalog and the recovery record included).
    pub blocks: u64,
    pub blocks_rebuilt: u64,
    pub fragments_placed: u64,
    pub fragments_fetched: u64,
    pub bytes_fetched: u64,
    pub bytes_placed: u64,
    /// Bytes fetched per byte placed (ideal: `k` fetched per block for its rebuilt fragments).
    pub fetched_per_placed: Option<f64>,
}

impl RebuildReport {
    pub fn set_bytes(&mut self, fetched: u64, placed: u64) {
        self.bytes_fetched = fetched;
        self.bytes_placed = placed;
        self.fetched_per_placed = per(fetched as f64, placed as f64);
    }
}

/// What `bitdust drill --json` answered.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DrillView {
    pub passed: bool,
    pub source: String,
    pub snapshot: u64,
    pub files: u64,
    pub bytes: u64,
    pub fragments_fetched: u64,
    pub failures: Vec<FailedFile>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreReport {
    pub outcome: String,
    pub files: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub wall_seconds: f64,
    pub fetched_bytes: u64,
    pub bytes_per_second: Option<f64>,
    /// Bytes fetched from suppliers per byte restored.
    pub fetched_per_byte: Option<f64>,
    pub failed: Vec<FailedFile>,
}

impl RestoreReport {
    pub fn new(r: &RestoreResult, wall: f64) -> RestoreReport {
        RestoreReport {
            outcome: r.outcome.to_string(),
            files: r.files,
            bytes: r.bytes,
            seconds: r.seconds,
            wall_seconds: wall,
            fetched_bytes: r.fetched_bytes,
            bytes_per_second: per(r.bytes as f64, r.seconds),
            fetched_per_byte: per(r.fetched_bytes as f64, r.bytes as f64),
            failed: r.failed.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub matched: bool,
    /// Where the restored tree was found under `--to`.
    pub restored_root: String,
    pub entries: u64,
    pub bytes: u64,
    pub mismatch_count: usize,
    /// The first differences.
    pub mismatches: Vec<Difference>,
    /// Directory times that differ (not failures), first few.
    pub note_count: usize,
    pub notes: Vec<Difference>,
}

impl VerifyReport {
    pub fn new(c: &Comparison, root: &Path) -> VerifyReport {
        VerifyReport {
            matched: c.matched(),
            restored_root: root.display().to_string(),
            entries: c.entries,
            bytes: c.bytes,
            mismatch_count: c.mismatches.len(),
            mismatches: c.mismatches.iter().take(LISTED).cloned().collect(),
            note_count: c.notes.len(),
            notes: c.notes.iter().take(5).cloned().collect(),
        }
    }
}

fn per(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// A size for people: "27.4 MiB".
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn rate(bytes_per_second: Option<f64>) -> String {
    bytes_per_second.map_or("-".into(), |r| format!("{}/s", size(r as u64)))
}

/// (fragment files, their bytes) under a supplier's directory for one customer; temp files of
/// writes in flight (`.tmp-…`) do not count.
pub fn fragments(dir: &Path) -> (u64, u64) {
    let (mut count, mut bytes) = (0, 0);
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(entry.path()),
                Ok(t)
                    if t.is_file() && !entry.file_name().to_string_lossy().starts_with(".tmp-") =>
                {
                    count += 1;
                    bytes += entry.metadata().map_or(0, |m| m.len());
                }
                _ => {}
            }
        }
    }
    (count, bytes)
}

impl Report {
    /// The text form.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out);
        match (&self.failed_step, &self.error) {
            (None, _) if self.ok => {
                let _ = writeln!(
                    out,
                    "bitdust demo: OK, the restore matched the source (every byte, mode, mtime and symlink)"
                );
            }
            (_, error) => {
                // The error starts with the step's name.
                let _ = writeln!(
                    out,
                    "bitdust demo: FAILED at {}",
                    error.as_deref().unwrap_or("an unknown step")
                );
            }
        }
        let _ = writeln!(out);
        self.data_lines(&mut out);
        self.backup_lines(&mut out);
        self.suppliers_lines(&mut out);
        self.rebuild_lines(&mut out);
        self.drill_lines(&mut out);
        self.restore_lines(&mut out);
        self.verify_lines(&mut out);
        self.machines_lines(&mut out);
        self.positions_lines(&mut out);
        self.kept_lines(&mut out);
        out
    }

    fn data_lines(&self, out: &mut String) {
        if let Some(d) = &self.data {
            let _ = writeln!(
                out,
                "data       {} in {} files, {} directories, {} symlinks{}",
                size(d.bytes),
                d.files,
                d.dirs,
                d.symlinks,
                if d.generated {
                    " (generated sample)".to_string()
                } else {
                    format!(" ({})", d.path)
                }
            );
        }
        if let Some(n) = &self.network {
            let _ = writeln!(
                out,
                "network    owner {} + {} friends on loopback; {} data + {} parity fragments per block; hired in {:.1} s",
                short(&n.owner),
                n.friends,
                n.data_shards,
                n.parity_shards,
                n.hire_seconds
            );
        }
    }

    fn backup_lines(&self, out: &mut String) {
        if let Some(b) = &self.backup {
            let deduplicated = b.bytes.saturating_sub(b.new_bytes);
            let _ = writeln!(
                out,
                "backup     {} snapshot {} in {:.1} s: {} (`backup --wait` end to end {:.1} s)",
                b.outcome,
                b.snapshot,
                b.seconds,
                rate(b.bytes_per_second),
                b.wall_seconds
            );
            let _ = writeln!(
                out,
                "dedup      {} new of {} read: {} ({:.0}%) not stored again; {} new blocks",
                size(b.new_bytes),
                size(b.bytes),
                size(deduplicated),
                percent(deduplicated, b.bytes),
                b.new_blocks
            );
        }
    }

    fn suppliers_lines(&self, out: &mut String) {
        if !self.suppliers.is_empty() {
            let _ = writeln!(out, "fragments  held for the owner by each friend:");
            for s in &self.suppliers {
                let _ = writeln!(
                    out,
                    "  {:<8} {}  {:<11} {:>5} fragments {:>10}{}{}",
                    s.name,
                    short(&s.node_id),
                    s.position
                        .map_or("(spare)".to_string(), |p| format!("position {p}")),
                    s.fragments,
                    size(s.fragment_bytes),
                    if s.stopped { "  stopped for good" } else { "" },
                    s.took_position.map_or(String::new(), |p| format!(
                        "  took position {p} in the rebuild"
                    ))
                );
            }
        }
    }

    fn rebuild_lines(&self, out: &mut String) {
        if let Some(r) = &self.rebuild {
            let _ = writeln!(
                out,
                "rebuild    full redundancy again {:.1} s after the stop: {} fired, {} blocks rebuilt, {} fragments placed",
                r.seconds,
                r.fired.len(),
                r.blocks_rebuilt,
                r.fragments_placed
            );
            let _ = writeln!(
                out,
                "           fetched {} ({} fragments), placed {} ({} fetched per byte placed)",
                size(r.bytes_fetched),
                r.fragments_fetched,
                size(r.bytes_placed),
                r.fetched_per_placed
                    .map_or("-".into(), |f| format!("{f:.2}"))
            );
            for f in &r.fired {
                let _ = writeln!(
                    out,
                    "  fired position {} ({}): {}; now held by {}",
                    f.position,
                    f.was.as_deref().unwrap_or("-"),
                    f.reason,
                    f.now.as_deref().unwrap_or("-")
                );
            }
        }
    }

    fn drill_lines(&self, out: &mut String) {
        if let Some(d) = &self.drill {
            let _ = writeln!(
                out,
                "drill      {}: {} files, {} restored in memory and checked by the owner in {:.1} s ({} fragments fetched)",
                if d.passed { "passed" } else { "FAILED" },
                d.files,
                size(d.bytes),
                d.seconds,
                d.fragments_fetched
            );
            for f in d.failures.iter().take(LISTED) {
                let _ = writeln!(out, "  drill failed: {} ({})", f.path, f.reason);
            }
        }
    }

    fn restore_lines(&self, out: &mut String) {
        if let Some(r) = &self.restore {
            let _ = writeln!(
                out,
                "restore    {}: {} files, {} in {:.1} s: {}; fetched {} ({} per byte restored)",
                r.outcome,
                r.files,
                size(r.bytes),
                r.seconds,
                rate(r.bytes_per_second),
                size(r.fetched_bytes),
                r.fetched_per_byte.map_or("-".into(), |f| format!("{f:.2}"))
            );
            for f in r.failed.iter().take(LISTED) {
                let _ = writeln!(out, "  not restored: {} ({})", f.path, f.reason);
            }
        }
    }

    fn verify_lines(&self, out: &mut String) {
        if let Some(v) = &self.verify {
            let _ = writeln!(
                out,
                "verify     {} entries, {} compared byte by byte: {}",
                v.entries,
                size(v.bytes),
                if v.matched {
                    "all match".to_string()
                } else {
                    format!("{} differences", v.mismatch_count)
                }
            );
            for d in &v.mismatches {
                let _ = writeln!(out, "  {}: {}", d.path, d.what);
            }
            if v.note_count > 0 {
                let _ = writeln!(
                    out,
                    "  note: {} directory time(s) differ (not counted as a failure)",
                    v.note_count
                );
            }
        }
    }

    fn machines_lines(&self, out: &mut String) {
        if !self.machines.is_empty() {
            let _ = writeln!(out, "machines   the owner's, by state:");
            let mut by_actor: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
            for m in &self.machines {
                *by_actor
                    .entry(m.actor.as_str())
                    .or_default()
                    .entry(m.state.as_str())
                    .or_default() += 1;
            }
            for (actor, states) in by_actor {
                let states: Vec<String> = states
                    .iter()
                    .map(|(state, n)| {
                        if *n == 1 {
                            state.to_string()
                        } else {
                            format!("{n} {state}")
                        }
                    })
                    .collect();
                let _ = writeln!(out, "  {actor:<20} {}", states.join(", "));
            }
        }
    }

    fn positions_lines(&self, out: &mut String) {
        if !self.positions.is_empty() {
            let held: Vec<String> = self
                .positions
                .iter()
                .map(|p| {
                    let who = p.supplier.as_deref().map_or("-".to_string(), |s| {
                        self.suppliers
                            .iter()
                            .find(|f| f.node_id == s)
                            .map_or_else(|| short(s), |f| f.name.clone())
                    });
                    format!("{}: {who} {}", p.position, p.contract)
                })
                .collect();
            let _ = writeln!(out, "positions  now: {}", held.join("; "));
        }
    }

    fn kept_lines(&self, out: &mut String) {
        if self.kept {
            let dir = &self.dir;
            let _ = writeln!(
                out,
                "\nkept       {dir}: owner/ and friend1..{}/ (each with node.log), data/, restore/",
                self.suppliers.len()
            );
            let _ = writeln!(
                out,
                "           e.g. `bitdust --home {dir}/owner list`; remove it with `rm -rf {dir}`"
            );
        }
    }
}

fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(27 * 1024 * 1024 + 400 * 1024), "27.4 MiB");
    }

    #[test]
    fn fragments_count_files_but_not_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("ab")).expect("mkdir");
        std::fs::write(dir.path().join("ab/ab01.0"), [0u8; 10]).expect("write");
        std::fs::write(dir.path().join("ab/ab02.3"), [0u8; 5]).expect("write");
        std::fs::write(dir.path().join("ab/.tmp-ab03.1.ff"), [0u8; 7]).expect("write");
        assert_eq!(fragments(dir.path()), (2, 15));
        assert_eq!(fragments(&dir.path().join("none")), (0, 0));
    }

    #[test]
    fn a_failed_report_says_the_step_and_a_good_one_says_ok() {
        let mut r = Report {
            failed_step: Some(Step::Restore),
            error: Some("restore: no restore command".into()),
            ..Report::default()
        };
        assert!(r.render().contains("FAILED at restore: no restore command"));
        r.ok = true;
        r.failed_step = None;
        r.error = None;
        r.backup = Some(BackupReport {
            outcome: "committed".into(),
            bytes: 100,
            new_bytes: 25,
            ..BackupReport::default()
        });
        let text = r.render();
        assert!(text.contains("OK, the restore matched"), "{text}");
        assert!(text.contains("75 B (75%) not stored again"), "{text}");
        assert!(!text.contains("rebuild "), "no rebuild, no line: {text}");
    }

    #[test]
    fn the_rebuild_says_how_long_what_it_moved_and_who_was_fired_for_what() {
        let mut rebuild = RebuildReport {
            seconds: 11.14,
            fired: vec![FiringReport {
                position: 0,
                reason: "unreachable for 5 s".into(),
                was: Some("friend5".into()),
                now: Some("friend2".into()),
            }],
            blocks_rebuilt: 9,
            fragments_placed: 9,
            fragments_fetched: 36,
            ..RebuildReport::default()
        };
        rebuild.set_bytes(4096, 1024);
        assert_eq!(rebuild.fetched_per_placed, Some(4.0));
        let r = Report {
            rebuild: Some(rebuild),
            drill: Some(DrillView {
                passed: true,
                files: 8,
                ..DrillView::default()
            }),
            ..Report::default()
        };
        let text = r.render();
        assert!(
            text.contains("full redundancy again 11.1 s after the stop: 1 fired, 9 blocks rebuilt, 9 fragments placed"),
            "{text}"
        );
        assert!(
            text.contains(
                "fetched 4.0 KiB (36 fragments), placed 1.0 KiB (4.00 fetched per byte placed)"
            ),
            "{text}"
        );
        assert!(
            text.contains("fired position 0 (friend5): unreachable for 5 s; now held by friend2"),
            "{text}"
        );
        assert!(text.contains("drill      passed: 8 files"), "{text}");
    }
}
