//! `bitdust backup`: asks the node to back up, then (with `--wait`) follows the job until it
//! ended. Exit status 0 when every asked-for backup committed whole, 3 when each committed but
//! something could not be read (named; a socket, left out by design, does not count), 1 when one
//! did not commit.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use bitdust::actors::status::{JobResult, JobStatus, NodeStatus};
use bitdust::node::client::Client;
use bitdust::node::home::Home;
use bitdust::node::units::ByteSize;

#[derive(clap::Args)]
pub struct Args {
    /// Directories to back up
    paths: Vec<PathBuf>,
    /// Wait until the backup is committed, with a progress bar on a terminal
    #[arg(long)]
    wait: bool,
    /// Print the result as one JSON document
    #[arg(long)]
    json: bool,
}

pub fn run(home: &Home, args: Args) -> anyhow::Result<()> {
    let Args { paths, wait, json } = args;
    let mut absolute = Vec::new();
    for path in &paths {
        let resolved = std::fs::canonicalize(path)
            .with_context(|| format!("cannot back up {}", path.display()))?;
        if !resolved.is_dir() {
            bail!("cannot back up {}: not a directory", path.display());
        }
        absolute.push(resolved);
    }
    let client = Client::connect(home);
    let asked = absolute.iter().map(|p| p.display().to_string()).collect();
    let runs = client.backup(asked)?.runs;
    let Some(runs) = super::queued(runs, "backup", wait, json) else {
        return Ok(());
    };
    let total: u64 = absolute.iter().map(|p| tree_size(p)).sum();
    let results = follow(&client, &runs, total, !json)?;
    let failed = results.iter().filter(|r| !r.outcome.committed()).count();
    if json {
        super::print_results_json(&results)?;
    } else {
        for r in &results {
            print(r);
        }
    }
    if failed > 0 {
        bail!("{failed} backup(s) did not commit");
    }
    let unread: usize = results
        .iter()
        .map(|r| r.skipped.iter().filter(|s| !s.by_design).count())
        .sum();
    if unread > 0 {
        return Err(super::Incomplete(format!(
            "committed, but {unread} entr{} could not be read and {} not in the backup \
             (listed {})",
            if unread == 1 { "y" } else { "ies" },
            if unread == 1 { "is" } else { "are" },
            if json { "in the JSON" } else { "above" },
        ))
        .into());
    }
    Ok(())
}

fn print(r: &JobResult) {
    println!(
        "{}: {} (snapshot {}): {} files, {} read, {} new in {} blocks, {:.1} s",
        super::shown(&r.source),
        r.outcome,
        r.snapshot,
        r.files,
        ByteSize(r.bytes_read),
        ByteSize(r.new_bytes),
        r.new_blocks,
        r.seconds
    );
    if let Some(e) = &r.error {
        println!("  error: {}", super::shown(e));
    }
    for s in &r.skipped {
        println!(
            "  {}: {} ({})",
            if s.by_design {
                "left out"
            } else {
                "not backed up"
            },
            super::shown(&s.path),
            super::shown(&s.reason)
        );
    }
}

/// Follows backup runs until each has a result.
fn follow(client: &Client, runs: &[u64], total: u64, show: bool) -> anyhow::Result<Vec<JobResult>> {
    super::follow(
        client,
        runs,
        total,
        show,
        |status, run| {
            let finished = &status.backup.finished;
            finished.iter().find(|r| r.run == run).cloned()
        },
        |bar, status| {
            let Some(job) = &status.backup.running else {
                return;
            };
            bar.set_position(job.bytes.min(total));
            // Under an upload limit the files are read long before their fragments are sent:
            // the ETA is what is left to upload at the limit, not the reading rate's.
            let eta = upload_eta(job, total, status).map_or(String::new(), |secs| {
                bar.set_style(limited_style());
                format!(
                    "ETA {} at the upload limit; ",
                    humantime::format_duration(std::time::Duration::from_secs(secs))
                )
            });
            bar.set_message(format!(
                "{eta}{} {} files, {} new, {}/{} blocks placed{}",
                job.state,
                job.files,
                ByteSize(job.new_bytes),
                job.blocks_complete,
                job.blocks,
                if job.queued_fragments > 0 {
                    format!(", {} fragments waiting for suppliers", job.queued_fragments)
                } else {
                    String::new()
                }
            ));
        },
    )
}

fn limited_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} {wide_msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
}

/// Seconds left at the upload limit in force (`None` without one): the new bytes not yet placed
/// and those of the files not read yet (as new as the ones read so far), times the erasure
/// code's expansion, over the limit (the total, or the per-peer one times the suppliers).
pub fn upload_eta(job: &JobStatus, total: u64, status: &NodeStatus) -> Option<u64> {
    let bandwidth = status.bandwidth.as_ref()?;
    let (k, m) = (
        u64::from(status.customer.data_shards.max(1)),
        u64::from(status.customer.parity_shards),
    );
    let per_peer_total = bandwidth.per_peer_upload_limit.saturating_mul(k + m);
    let limit = match (bandwidth.upload_limit, per_peer_total) {
        (0, 0) => return None,
        (0, p) => p,
        (t, 0) => t,
        (t, p) => t.min(p),
    };
    let unplaced = if job.blocks == 0 {
        job.new_bytes
    } else {
        let left = job.blocks - job.blocks_complete.min(job.blocks);
        (u128::from(job.new_bytes) * u128::from(left) / u128::from(job.blocks)) as u64
    };
    let unread = total.saturating_sub(job.bytes);
    let new_share = if job.bytes == 0 {
        1.0
    } else {
        (job.new_bytes as f64 / job.bytes as f64).min(1.0)
    };
    let to_send = (unplaced as f64 + unread as f64 * new_share) * (k + m) as f64 / k as f64;
    Some((to_send / limit as f64).ceil() as u64)
}

/// Bytes of regular files under `root` (symlinks not followed): the progress bar's total.
fn tree_size(root: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitdust::actors::status::BandwidthStatus;

    const MIB: u64 = 1 << 20;

    fn status(upload: u64, per_peer: u64) -> NodeStatus {
        let mut status = NodeStatus::default();
        status.customer.data_shards = 4;
        status.customer.parity_shards = 2;
        status.bandwidth = Some(BandwidthStatus {
            upload_limit: upload,
            per_peer_upload_limit: per_peer,
            ..BandwidthStatus::default()
        });
        status
    }

    #[test]
    fn the_eta_is_what_is_left_to_upload_at_the_limit() {
        // 24 MiB read, all new, a quarter of its blocks placed; 8 MiB not read yet.
        let job = JobStatus {
            bytes: 24 * MIB,
            new_bytes: 24 * MIB,
            blocks: 4,
            blocks_complete: 1,
            ..JobStatus::default()
        };
        // (18 + 8) MiB × 6/4 at 2 MiB/s.
        assert_eq!(upload_eta(&job, 32 * MIB, &status(2 * MIB, 0)), Some(20));
        // Per peer 256 KiB/s × 6 suppliers = 1.5 MiB/s.
        assert_eq!(upload_eta(&job, 32 * MIB, &status(0, MIB / 4)), Some(26));
        assert_eq!(
            upload_eta(&job, 32 * MIB, &status(2 * MIB, MIB / 4)),
            Some(26)
        );
        assert_eq!(upload_eta(&job, 32 * MIB, &status(0, 0)), None, "no limit");
        // An unchanged tree sends nothing.
        let unchanged = JobStatus {
            bytes: 24 * MIB,
            ..JobStatus::default()
        };
        assert_eq!(
            upload_eta(&unchanged, 32 * MIB, &status(2 * MIB, 0)),
            Some(0)
        );
    }
}
