//! `bitdust restore`: asks the node to restore, then (with `--wait`) follows it. Exit status 0
//! when every entry was restored, 3 when the restore ran to its end but some entries could not
//! be restored (named), 1 when it failed or was interrupted.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use bitdust::actors::status::{RestoreOutcome, RestoreResult};
use bitdust::node::client::{Client, RestoreRequest};
use bitdust::node::home::Home;
use bitdust::node::units::ByteSize;

#[derive(clap::Args)]
pub struct Args {
    /// SOURCE (as `list` shows it) with an optional @VERSION, e.g. /home/me/Documents@12
    source: Option<String>,
    /// Directory to restore into (created if missing)
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Only this file or directory, relative to the source
    #[arg(long, value_name = "SUB")]
    path: Option<String>,
    /// Replace existing files that differ (without it they are left alone and named)
    #[arg(long)]
    overwrite: bool,
    /// Wait until the restore ended, with a progress bar on a terminal
    #[arg(long)]
    wait: bool,
    /// Print the result as one JSON document
    #[arg(long)]
    json: bool,
}

/// SOURCE@VERSION: the version is the part after the last '@' when it is a number.
fn source_and_version(source: Option<String>) -> anyhow::Result<(Option<String>, Option<u64>)> {
    Ok(match source {
        Some(s) => match s.rsplit_once('@') {
            Some((name, v)) if v.chars().all(|c| c.is_ascii_digit()) && !v.is_empty() => (
                (!name.is_empty()).then(|| name.to_string()),
                Some(v.parse::<u64>().context("version number too large")?),
            ),
            _ => (Some(s), None),
        },
        None => (None, None),
    })
}

pub fn run(home: &Home, args: Args) -> anyhow::Result<()> {
    let (source, version) = source_and_version(args.source)?;
    let to = if args.to.is_absolute() {
        args.to
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(args.to)
    };
    let client = Client::connect(home);
    let runs = client
        .restore(RestoreRequest {
            source,
            version,
            to: to.display().to_string(),
            path: args.path,
            overwrite: args.overwrite,
        })?
        .runs;
    let Some(runs) = super::queued(runs, "restore", args.wait, args.json) else {
        return Ok(());
    };
    let results = follow(&client, &runs, !args.json)?;
    if args.json {
        super::print_results_json(&results)?;
    } else {
        for r in &results {
            print(r);
        }
    }
    let stopped = results
        .iter()
        .filter(|r| !r.outcome.complete() && r.outcome != RestoreOutcome::Partial)
        .count();
    if stopped > 0 {
        bail!("{stopped} restore(s) did not run to their end");
    }
    let failed: usize = results.iter().map(|r| r.failed.len()).sum();
    if failed > 0 {
        return Err(super::Incomplete(format!(
            "restored, but {failed} entr{} could not be restored (listed {})",
            if failed == 1 { "y" } else { "ies" },
            if args.json { "in the JSON" } else { "above" },
        ))
        .into());
    }
    Ok(())
}

fn print(r: &RestoreResult) {
    println!(
        "{} (version {}) -> {}: {}: {} files, {} dirs, {} symlinks{}{}, {} in {:.1} s ({} fetched){}",
        super::shown(&r.source),
        r.snapshot,
        super::shown(&r.to),
        r.outcome,
        r.files,
        r.dirs,
        r.symlinks,
        if r.hardlinks > 0 {
            format!(", {} hard links", r.hardlinks)
        } else {
            String::new()
        },
        if r.specials > 0 {
            format!(", {} FIFOs and devices", r.specials)
        } else {
            String::new()
        },
        ByteSize(r.bytes),
        r.seconds,
        ByteSize(r.fetched_bytes),
        if r.skipped_existing > 0 {
            format!(", {} already there", r.skipped_existing)
        } else {
            String::new()
        }
    );
    if let Some(e) = &r.error {
        println!("  error: {}", super::shown(e));
    }
    for line in &r.not_restored {
        eprintln!("bitdust: note: not restored: {}", super::shown(line));
    }
    for f in &r.failed {
        println!(
            "  not restored: {} ({})",
            super::shown(&f.path),
            super::shown(&f.reason)
        );
    }
}

/// Follows restore runs until each has a result.
fn follow(client: &Client, runs: &[u64], show: bool) -> anyhow::Result<Vec<RestoreResult>> {
    super::follow(
        client,
        runs,
        0,
        show,
        |status, run| {
            let finished = &status.restore.finished;
            finished.iter().find(|r| r.run == run).cloned()
        },
        |bar, status| {
            let Some(job) = &status.restore.running else {
                return;
            };
            bar.set_length(job.bytes_total);
            bar.set_position(job.bytes_written.min(job.bytes_total));
            bar.set_message(format!(
                "{} {}/{} files, {}/{} blocks, {} fetched",
                job.state,
                job.files_done,
                job.files_total,
                job.blocks_decoded,
                job.blocks,
                ByteSize(job.fetched_bytes)
            ));
        },
    )
}
