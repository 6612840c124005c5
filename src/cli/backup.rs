//! `bitdust backup`: asks the node to back up, then (with `--wait`) follows the job until it
//! ended. Exit status 0 when every asked-for backup committed whole, 3 when each committed but
//! something could not be read (named; a socket, left out by design, does not count), 1 when one
//! did not commit.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use bitdust::actors::status::JobResult;
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
            bar.set_message(format!(
                "{} {} files, {} new, {}/{} blocks placed{}",
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
