//! One module per verb (restic's `cmd_<verb>.go`): each asks the node through the typed client
//! (`bitdust::node::client`) or works on the home (`bitdust::node::offline`), and prints. The
//! helpers here are what several verbs share: following a job's progress, printing results.

pub mod backup;
pub mod drill;
pub mod init;
pub mod keys;
pub mod list;
pub mod peer;
pub mod restore;
pub mod status;

use bitdust::actors::status::NodeStatus;
use bitdust::node::client::{Client, ClientError};
use bitdust::node::home::Home;

/// `Some(answer)` from the running node, or `None` when no node runs on this home (the caller
/// then works on the database itself, under the home lock).
pub fn if_running<T>(
    home: &Home,
    ask: impl FnOnce(&Client) -> Result<T, ClientError>,
) -> anyhow::Result<Option<T>> {
    let client = Client::connect(home);
    if !client.socket_exists() {
        return Ok(None);
    }
    match ask(&client) {
        Ok(answer) => Ok(Some(answer)),
        Err(e) if e.not_running() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// One result as a JSON object; several as `{"results": [...]}`.
pub fn print_results_json<R: serde::Serialize>(results: &[R]) -> anyhow::Result<()> {
    let doc = match results {
        [one] => serde_json::to_value(one)?,
        all => serde_json::json!({ "results": all }),
    };
    println!("{doc}");
    Ok(())
}

/// Without `--wait`: says the runs are queued (as JSON with `json`) and answers `None`; with it,
/// the runs to follow.
pub fn queued(runs: Vec<u64>, what: &str, wait: bool, json: bool) -> Option<Vec<u64>> {
    if wait {
        return Some(runs);
    }
    if json {
        println!("{}", serde_json::json!({ "runs": runs }));
    } else {
        println!("{what} queued (run {runs:?}); follow it with `bitdust status`");
    }
    None
}

/// Polls the node's status until `result(status, run)` answers for every run in `runs`; on a
/// terminal (when `show`) a progress bar of `total` bytes is redrawn by `draw`.
pub fn follow<R>(
    client: &Client,
    runs: &[u64],
    total: u64,
    show: bool,
    result: impl Fn(&NodeStatus, u64) -> Option<R>,
    draw: impl Fn(&indicatif::ProgressBar, &NodeStatus),
) -> anyhow::Result<Vec<R>> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal as _;
    let bar = (show && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    loop {
        let status = client.status()?;
        let results: Vec<R> = runs
            .iter()
            .filter_map(|run| result(&status, *run))
            .collect();
        if results.len() == runs.len() {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Ok(results);
        }
        if let Some(bar) = &bar {
            draw(bar, &status);
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}
