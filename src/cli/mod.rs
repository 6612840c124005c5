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

use std::borrow::Cow;

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
/// A job that ran to its end but left something out: what could not be read at backup, or
/// written at restore. `main` exits with [`Incomplete::EXIT_CODE`] (3, as restic does for a
/// backup that could not read every file) and prints the summary on stderr.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Incomplete(pub String);

impl Incomplete {
    pub const EXIT_CODE: u8 = 3;
}

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

/// Whether `c` must not reach a terminal as it is: control characters (C0, DEL, C1) move the
/// cursor, retitle the window or clear the screen; bidirectional overrides reorder what is shown.
fn unsafe_on_terminal(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` as it may be printed: every character [`unsafe_on_terminal`] escaped (`\u{1b}`), so a
/// file name from the catalog or a message from a peer shows as text, never as a command.
pub fn shown(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_on_terminal) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_on_terminal(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A rendered block of lines: each line [`shown`], the line breaks kept.
pub fn shown_lines(block: &str) -> String {
    block
        .split_inclusive('\n')
        .map(|line| match line.strip_suffix('\n') {
            Some(text) => format!("{}\n", shown(text)),
            None => shown(line).into_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_reaches_the_terminal_cannot_command_it() {
        assert!(matches!(shown("plain/path é.txt"), Cow::Borrowed(_)));
        assert_eq!(shown("a\x1b]0;owned\x07b"), "a\\u{1b}]0;owned\\u{7}b");
        assert_eq!(shown("two\nlines\r"), "two\\u{a}lines\\u{d}");
        assert_eq!(shown("\u{9b}2J"), "\\u{9b}2J");
        assert_eq!(shown("abc\u{202e}txt.exe"), "abc\\u{202e}txt.exe");
        assert_eq!(shown_lines("ok\nbad\x1b[2J\n"), "ok\nbad\\u{1b}[2J\n");
    }
}
