//! How the demo fails: its steps, and one error per way a step can go wrong, saying what the
//! node or the command said and, where a node is involved, the end of its log.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::tree;

/// The demo's steps, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Setup,
    Data,
    Homes,
    Start,
    Hire,
    Backup,
    Stop,
    Rebuild,
    Drill,
    Restore,
    Verify,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Setup => "setup",
            Step::Data => "data",
            Step::Homes => "homes",
            Step::Start => "start",
            Step::Hire => "hire",
            Step::Backup => "backup",
            Step::Stop => "stop",
            Step::Rebuild => "rebuild",
            Step::Drill => "drill",
            Step::Restore => "restore",
            Step::Verify => "verify",
        }
    }

    /// "[3/8]": the step's place in the progress output.
    pub(super) fn counter(self) -> String {
        let n = self as usize;
        format!("[{n}/{}]", Step::Verify as usize)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The end of a node's log, shown with an error that involves that node.
#[derive(Debug, Default)]
pub struct LogTail {
    pub node: String,
    pub path: PathBuf,
    pub lines: Vec<String>,
}

impl fmt::Display for LogTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lines.is_empty() {
            return Ok(());
        }
        write!(f, "\n  {}'s log ({}) ends:", self.node, self.path.display())?;
        for line in &self.lines {
            write!(f, "\n    {line}")?;
        }
        Ok(())
    }
}

/// A file the restore could not bring back, as `restore --json` names it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailedFile {
    pub path: String,
    pub reason: String,
}

/// Why the demo failed, by step. The message says what the node (or the command) said.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{step}: {what}: {source}")]
    Io {
        step: Step,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{step}: {source}")]
    Tree {
        step: Step,
        #[source]
        source: tree::TreeError,
    },
    #[error("data: {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error(
        "data: {} holds the demo's own directory {}: pick another --data",
        data.display(),
        work.display()
    )]
    DataHoldsWork { data: PathBuf, work: PathBuf },
    #[error("{step}: `{command}` could not start: {source}")]
    Spawn {
        step: Step,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{step}: `{command}` failed ({status}): {said}{log}")]
    Command {
        step: Step,
        command: String,
        status: String,
        said: String,
        log: Box<LogTail>,
    },
    #[error("{step}: `{command}` did not finish within {} s{log}", limit.as_secs())]
    Timeout {
        step: Step,
        command: String,
        limit: Duration,
        log: Box<LogTail>,
    },
    #[error("{step}: `{command}` printed no result this version can read ({detail}): {stdout}")]
    Unreadable {
        step: Step,
        command: String,
        detail: String,
        stdout: String,
    },
    #[error("{step}: node {node} exited ({status}){log}")]
    NodeExited {
        step: Step,
        node: String,
        status: String,
        log: Box<LogTail>,
    },
    #[error("start: node {node} does not answer `status` after {} s{log}", limit.as_secs())]
    NodeSilent {
        node: String,
        limit: Duration,
        log: Box<LogTail>,
    },
    #[error(
        "hire: the owner has not hired all {want} positions after {} s:{positions}{log}",
        limit.as_secs()
    )]
    Hire {
        want: usize,
        limit: Duration,
        positions: String,
        log: Box<LogTail>,
    },
    #[error("backup: the backup ended `{outcome}`{}{log}", error.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    Backup {
        outcome: String,
        error: Option<String>,
        log: Box<LogTail>,
    },
    #[error(
        "backup: {queued} fragment(s) still wait for their suppliers {} s after the backup committed{log}",
        limit.as_secs()
    )]
    Drain {
        queued: u64,
        limit: Duration,
        log: Box<LogTail>,
    },
    #[error(
        "backup: the owner's monitor does not see every block at full redundancy {} s after the backup committed: {redundancy}{log}",
        limit.as_secs()
    )]
    NotFollowed {
        redundancy: String,
        limit: Duration,
        log: Box<LogTail>,
    },
    #[error("stop: the owner's status names no supplier at position {position}")]
    NoSupplier { position: u32 },
    #[error(
        "rebuild: the owner has not replaced the stopped suppliers and rebuilt their fragments within {} s: {fired} of {want} fired; {redundancy}{positions}{log}",
        limit.as_secs()
    )]
    Rebuild {
        limit: Duration,
        fired: usize,
        want: usize,
        /// Blocks by good fragments beyond `k`, and what the rebuilder still has to do.
        redundancy: String,
        positions: String,
        log: Box<LogTail>,
    },
    #[error(
        "drill: the owner's restore drill failed for {}{log}",
        failed_list(failed)
    )]
    Drill {
        failed: Vec<FailedFile>,
        log: Box<LogTail>,
    },
    #[error(
        "restore: this bitdust has no `restore` command yet, so the demo cannot restore (it said: {said})"
    )]
    RestoreUnavailable { said: String },
    #[error(
        "restore: the restore ended `{outcome}` ({status}); not restored: {}{log}",
        failed_list(failed)
    )]
    RestoreIncomplete {
        outcome: String,
        status: String,
        failed: Vec<FailedFile>,
        log: Box<LogTail>,
    },
    #[error("verify: the restored tree differs from the source in {count} place(s): {first}")]
    Mismatch { count: usize, first: String },
    #[error("{step}: interrupted")]
    Interrupted { step: Step },
}

fn failed_list(failed: &[FailedFile]) -> String {
    if failed.is_empty() {
        return "nothing named".into();
    }
    let mut parts: Vec<String> = failed
        .iter()
        .take(10)
        .map(|f| format!("{} ({})", f.path, f.reason))
        .collect();
    if failed.len() > 10 {
        parts.push(format!("and {} more", failed.len() - 10));
    }
    parts.join(", ")
}

impl DemoError {
    /// The step that failed.
    pub fn step(&self) -> Step {
        match self {
            DemoError::Io { step, .. }
            | DemoError::Tree { step, .. }
            | DemoError::Spawn { step, .. }
            | DemoError::Command { step, .. }
            | DemoError::Timeout { step, .. }
            | DemoError::Unreadable { step, .. }
            | DemoError::NodeExited { step, .. }
            | DemoError::Interrupted { step } => *step,
            DemoError::NotADirectory { .. } | DemoError::DataHoldsWork { .. } => Step::Data,
            DemoError::NodeSilent { .. } => Step::Start,
            DemoError::Hire { .. } => Step::Hire,
            DemoError::Backup { .. } | DemoError::Drain { .. } | DemoError::NotFollowed { .. } => {
                Step::Backup
            }
            DemoError::NoSupplier { .. } => Step::Stop,
            DemoError::Rebuild { .. } => Step::Rebuild,
            DemoError::Drill { .. } => Step::Drill,
            DemoError::RestoreUnavailable { .. } | DemoError::RestoreIncomplete { .. } => {
                Step::Restore
            }
            DemoError::Mismatch { .. } => Step::Verify,
        }
    }
}

pub(super) fn io_at(step: Step, what: impl Into<String>) -> impl FnOnce(io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { step, what, source }
}
