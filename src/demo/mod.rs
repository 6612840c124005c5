//! `bitdust demo`: the newcomer's first command (issues 9 §5 and 10 §7). With no setup it runs a
//! small network on loopback — an owner and eight friends, homes under one temporary directory,
//! free ports — by running this same binary as a user would (`init`, `peer add`, `run`, `backup`,
//! `drill`, `restore`, `status --json`). The owner hires `k + m` = 6 friends; two are spares.
//!
//! Steps: back up a directory (a generated sample by default); stop two of the owner's suppliers
//! **for good** (they stay stopped to the end); watch the owner's monitor fire them after
//! `monitor.fire_after` (5 s here) and hire the spares in their positions, and its rebuilder put
//! every block back at `k + m` good fragments; run the owner's restore drill; restore into a
//! temporary directory with the two original suppliers still gone, check every byte, mode, mtime
//! and symlink itself, and print a short report. It succeeds only when the restore matched.
//!
//! Progress goes to stderr; the report to stdout (one JSON object with `--json`), also when a
//! step fails, so a script sees how far it got. Every node is stopped on every way out
//! (`procs::Nodes`), the directory is removed unless `--keep`.

mod error;
mod procs;
mod report;
mod sample;
mod tree;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::actors::status::{Contract, JobResult, MonitorStatus, NodeStatus, RestoreOutcome};
use crate::node::client::Client;
use crate::node::home::Home;
use error::io_at;
pub use error::{DemoError, FailedFile, LogTail, Step};
use procs::{Bitdust, Finished, NodeProc, Nodes, WaitError, WorkDir};
pub use report::Report;
use report::{
    BackupReport, DataReport, DrillView, FiringReport, NetworkReport, RebuildReport, RestoreReport,
    SupplierReport, VerifyReport,
};

/// The owner's friends; the owner hires `k + m` = 6 of them (the defaults), two are spares: one
/// for each supplier the demo stops for good.
pub const FRIENDS: usize = 8;
/// The owner's monitor, in its config.toml: a round every second, and a supplier unreachable
/// this long is fired and replaced (the defaults, 10 min and 6 h, suit real use, not a demo).
const MONITOR_INTERVAL: &str = "1s";
const FIRE_AFTER: &str = "5s";

/// How long the nodes may take to answer `status` after starting.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long the owner may take to hire every position.
const HIRE_LIMIT: Duration = Duration::from_secs(120);
/// How long placing the last fragments may take after the backup committed.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
/// How long the owner may take, from the stop, to fire both suppliers, hire the spares and
/// rebuild every block (fire_after, then a hire and a rebuild of the demo's data).
const REBUILD_LIMIT: Duration = Duration::from_secs(120);
/// The owner's restore drill (a sample of at most 64 MiB, in memory).
const DRILL_LIMIT: Duration = Duration::from_secs(300);
/// A one-shot command (`init`, `peer add`, `status`).
const SHORT_LIMIT: Duration = Duration::from_secs(30);
/// The backup and the restore: generous, `--data` may be large.
const LONG_LIMIT: Duration = Duration::from_secs(6 * 3600);
/// Lines of a node's log shown with an error.
const LOG_LINES: usize = 12;

/// What `bitdust demo` was asked.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Back up this directory instead of the generated sample.
    pub data: Option<PathBuf>,
    /// Leave the temporary directory (homes, logs, data, restore) for a look.
    pub keep: bool,
    /// Print the report as one JSON object.
    pub json: bool,
}

/// Runs the demo; the report is printed (stdout) whether it succeeds or not. `Ok` only when the
/// restore matched the source.
pub fn run(opts: &Options) -> Result<(), DemoError> {
    procs::catch_interrupts().map_err(io_at(Step::Setup, "catching signals"))?;
    let exe = std::env::current_exe().map_err(io_at(Step::Setup, "finding this program"))?;
    let work = WorkDir::create(opts.keep).map_err(io_at(
        Step::Setup,
        format!("creating a directory in {}", std::env::temp_dir().display()),
    ))?;
    // Declared after `work`, so dropped before it: the nodes stop before their homes go.
    let mut demo = Demo::new(Bitdust::new(exe), work.path().to_path_buf(), opts);
    let result = demo.steps();
    demo.finish(&result, work.kept());
    let report = demo.report.clone();
    drop(demo);
    if opts.json {
        match serde_json::to_string(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("bitdust demo: cannot print the report as JSON: {e}"),
        }
    } else {
        print!("{}", report.render());
    }
    result
}

/// The demo's state between steps.
struct Demo<'a> {
    bin: Bitdust,
    opts: &'a Options,
    work: PathBuf,
    /// Index 0 is the owner, then the friends.
    names: Vec<String>,
    homes: Vec<PathBuf>,
    ids: Vec<String>,
    nodes: Nodes,
    data: PathBuf,
    source: tree::Tree,
    /// Each supplier's position when the backup ended (before any was stopped).
    positions: BTreeMap<String, u32>,
    stopped: Vec<usize>,
    /// When both stopped suppliers had exited.
    stopped_at: Option<Instant>,
    /// When the nodes were started (the hire time counts from there).
    started: Option<Instant>,
    report: Report,
}

impl<'a> Demo<'a> {
    fn new(bin: Bitdust, work: PathBuf, opts: &'a Options) -> Demo<'a> {
        let mut names = vec!["owner".to_string()];
        names.extend((1..=FRIENDS).map(|i| format!("friend{i}")));
        let homes = names.iter().map(|n| work.join(n)).collect();
        Demo {
            bin,
            opts,
            work,
            names,
            homes,
            ids: Vec::new(),
            nodes: Nodes::default(),
            data: PathBuf::new(),
            source: tree::Tree::default(),
            positions: BTreeMap::new(),
            stopped: Vec::new(),
            stopped_at: None,
            started: None,
            report: Report::default(),
        }
    }

    fn say(&self, line: impl fmt::Display) {
        eprintln!("{line}");
    }

    fn owner(&self) -> &Path {
        &self.homes[0]
    }

    fn steps(&mut self) -> Result<(), DemoError> {
        self.say(format_args!(
            "bitdust demo: 1 owner + {FRIENDS} friends on loopback, everything under {}",
            self.work.display()
        ));
        self.data()?;
        self.homes()?;
        self.start()?;
        self.hire()?;
        self.backup()?;
        self.stop()?;
        self.rebuild()?;
        self.drill()?;
        self.restore()?;
        self.verify()
    }

    // -------------------------------------------------------------- helpers

    /// Runs `bitdust --home HOME ARGS` to its end; its output when it exited 0, else an error
    /// naming the step, the command and what it said.
    fn cli(&self, step: Step, node: usize, args: &[&OsStr]) -> Result<Finished, DemoError> {
        let finished = self.cli_any(step, node, args, SHORT_LIMIT, |_| {})?;
        if !finished.success() {
            return Err(DemoError::Command {
                step,
                command: Bitdust::shown(&self.homes[node], args),
                status: finished.describe(),
                said: said(&finished),
                log: Box::default(),
            });
        }
        Ok(finished)
    }

    /// Runs a command whatever its exit status; errors only when it could not run or finish.
    fn cli_any(
        &self,
        step: Step,
        node: usize,
        args: &[&OsStr],
        limit: Duration,
        tick: impl FnMut(Duration),
    ) -> Result<Finished, DemoError> {
        let home = &self.homes[node];
        self.bin.run(home, args, limit, tick).map_err(|e| match e {
            WaitError::Spawn(source) => DemoError::Spawn {
                step,
                command: Bitdust::shown(home, args),
                source,
            },
            WaitError::Timeout(limit) => DemoError::Timeout {
                step,
                command: Bitdust::shown(home, args),
                limit,
                log: self.tail(0),
            },
            WaitError::Interrupted => DemoError::Interrupted { step },
        })
    }

    /// The owner command's parsed JSON result; without one, why: the command failed (what it
    /// said, the owner's log) or it printed something else.
    fn json_result<T>(
        &self,
        parsed: Option<T>,
        finished: &Finished,
        step: Step,
        command: String,
        detail: &str,
    ) -> Result<T, DemoError> {
        if let Some(result) = parsed {
            return Ok(result);
        }
        if !finished.success() {
            return Err(DemoError::Command {
                step,
                command,
                status: finished.describe(),
                said: said(finished),
                log: self.tail(0),
            });
        }
        Err(DemoError::Unreadable {
            step,
            command,
            detail: detail.into(),
            stdout: last_chars(&finished.stdout_text(), 2000),
        })
    }

    fn tail(&self, node: usize) -> Box<LogTail> {
        let home = &self.homes[node];
        Box::new(LogTail {
            node: self.names[node].clone(),
            path: NodeProc::log_path(home),
            lines: procs::log_tail(home, LOG_LINES),
        })
    }

    /// The owner's status, or None while it does not answer.
    fn owner_status(&self) -> Option<NodeStatus> {
        self.owner_view().map(|(status, _)| status)
    }

    /// The owner's status and its monitor's view, or None while it does not answer.
    fn owner_view(&self) -> Option<(NodeStatus, Health)> {
        let status = Client::connect(&Home::new(self.owner())).status().ok()?;
        // A node without a monitor has no `health`: read as nothing followed yet.
        let health = status.health.as_ref().map(Health::of).unwrap_or_default();
        Some((status, health))
    }

    /// An error when node `i` has exited.
    fn check_alive(&mut self, step: Step, i: usize) -> Result<(), DemoError> {
        if procs::interrupted() {
            return Err(DemoError::Interrupted { step });
        }
        match self.nodes.all.get_mut(i).and_then(NodeProc::exited) {
            Some(status) => Err(DemoError::NodeExited {
                step,
                node: self.names[i].clone(),
                status: procs::describe_status(Some(status)),
                log: self.tail(i),
            }),
            None => Ok(()),
        }
    }

    // -------------------------------------------------------------- the steps

    fn data(&mut self) -> Result<(), DemoError> {
        let generated = self.opts.data.is_none();
        self.data = match &self.opts.data {
            Some(path) => {
                let path = std::fs::canonicalize(path)
                    .map_err(io_at(Step::Data, format!("reading {}", path.display())))?;
                if !path.is_dir() {
                    return Err(DemoError::NotADirectory { path });
                }
                let work = std::fs::canonicalize(&self.work).unwrap_or(self.work.clone());
                if work.starts_with(&path) {
                    return Err(DemoError::DataHoldsWork { data: path, work });
                }
                path
            }
            None => {
                let path = self.work.join("data");
                self.say(format_args!(
                    "{} generating the sample data in {}",
                    Step::Data.counter(),
                    path.display()
                ));
                sample::generate(&path, sample::LARGE)
                    .map_err(io_at(Step::Data, "writing the sample data"))?;
                path
            }
        };
        self.source = tree::scan(&self.data).map_err(|source| DemoError::Tree {
            step: Step::Data,
            source,
        })?;
        let s = self.source.summary();
        self.say(format_args!(
            "{} data: {} in {} files, {} directories, {} symlinks ({})",
            Step::Data.counter(),
            report::size(s.bytes),
            s.files,
            s.dirs,
            s.symlinks,
            self.data.display()
        ));
        self.report.data = Some(DataReport {
            path: self.data.display().to_string(),
            generated,
            files: s.files,
            dirs: s.dirs,
            symlinks: s.symlinks,
            bytes: s.bytes,
        });
        Ok(())
    }

    fn homes(&mut self) -> Result<(), DemoError> {
        let step = Step::Homes;
        let started = Instant::now();
        let ports = procs::free_ports(self.homes.len())
            .map_err(io_at(step, "finding free ports on 127.0.0.1"))?;
        // Each position holds about 1/k of the data: ask 1.5 times that (padding, blocks that
        // do not compress) plus room for the catalog; each friend offers a little more. The
        // owner offers less than any friend asks, so no friend stores its own data on it.
        let bytes = self.source.summary().bytes;
        let space_mib = bytes * 3 / 2 / 4 / (1 << 20) + 64;
        let friend_donates = format!("{} MiB", space_mib + 64);
        self.say(format_args!(
            "{} creating {} homes (bitdust init, then peer add: each friend trusts the owner and back)",
            step.counter(),
            self.homes.len()
        ));
        for (i, port) in ports.iter().enumerate() {
            let listen = format!("127.0.0.1:{port}");
            let donate = if i == 0 {
                "16 MiB".to_string()
            } else {
                friend_donates.clone()
            };
            let args: Vec<OsString> = vec![
                "init".into(),
                "--listen".into(),
                listen.into(),
                "--name".into(),
                self.names[i].clone().into(),
                "--donate".into(),
                donate.into(),
            ];
            let out = self.cli(step, i, &os(&args))?;
            self.ids.push(out.stdout_text());
        }
        // The owner's ask, in its config.toml (as a user would edit it).
        let config = self.owner().join("config.toml");
        set_config_line(
            &config,
            "space_per_supplier",
            &format!("\"{space_mib} MiB\""),
        )
        .map_err(io_at(step, format!("editing {}", config.display())))?;
        for (key, value) in [("interval", MONITOR_INTERVAL), ("fire_after", FIRE_AFTER)] {
            set_config_line(&config, key, &format!("\"{value}\""))
                .map_err(io_at(step, format!("editing {}", config.display())))?;
        }
        let card = |i: usize| -> Result<String, DemoError> {
            Ok(self.cli(step, i, &[OsStr::new("id")])?.stdout_text())
        };
        let owner_card = card(0)?;
        for i in 1..self.homes.len() {
            let friend_card = card(i)?;
            let add = |card: &str, name: &str| {
                vec![
                    OsString::from("peer"),
                    "add".into(),
                    card.into(),
                    "--name".into(),
                    name.into(),
                ]
            };
            self.cli(step, i, &os(&add(&owner_card, "owner")))?;
            self.cli(step, 0, &os(&add(&friend_card, &self.names[i])))?;
        }
        self.say(format_args!(
            "      done in {:.1} s; the owner asks {space_mib} MiB of each supplier, each friend offers {friend_donates};",
            started.elapsed().as_secs_f64()
        ));
        self.say(format_args!(
            "      its monitor checks every {MONITOR_INTERVAL} and fires a supplier unreachable {FIRE_AFTER} ([monitor] in its config.toml)"
        ));
        Ok(())
    }

    fn start(&mut self) -> Result<(), DemoError> {
        let step = Step::Start;
        self.say(format_args!(
            "{} starting {} nodes: bitdust --home HOME run --log-format json (log in HOME/node.log)",
            step.counter(),
            self.homes.len()
        ));
        self.started = Some(Instant::now());
        for i in 0..self.homes.len() {
            let node =
                NodeProc::start(&self.bin, &self.homes[i]).map_err(|source| DemoError::Spawn {
                    step,
                    command: Bitdust::shown(&self.homes[i], &[OsStr::new("run")]),
                    source,
                })?;
            self.nodes.all.push(node);
        }
        let deadline = Instant::now() + START_LIMIT;
        for i in 0..self.homes.len() {
            loop {
                self.check_alive(step, i)?;
                let status = self.bin.run(
                    &self.homes[i],
                    &[OsStr::new("status"), OsStr::new("--json")],
                    SHORT_LIMIT,
                    |_| {},
                );
                if status.is_ok_and(|f| f.success()) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(DemoError::NodeSilent {
                        node: self.names[i].clone(),
                        limit: START_LIMIT,
                        log: self.tail(i),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    fn hire(&mut self) -> Result<(), DemoError> {
        let step = Step::Hire;
        let started = self.started.unwrap_or_else(Instant::now);
        let deadline = Instant::now() + HIRE_LIMIT;
        let mut shown = usize::MAX;
        loop {
            self.check_alive(step, 0)?;
            let status = self.owner_status();
            let (want, ready) = status.as_ref().map_or((6, 0), hired);
            if ready != shown {
                shown = ready;
                self.say(format_args!(
                    "{} the owner hires its suppliers: {ready} of {want} positions connected ({:.1} s)",
                    step.counter(),
                    started.elapsed().as_secs_f64()
                ));
            }
            if let Some(status) = status.as_ref()
                && want > 0
                && ready == want
            {
                let c = &status.customer;
                self.report.network = Some(NetworkReport {
                    owner: self.ids[0].clone(),
                    friends: FRIENDS,
                    data_shards: c.data_shards,
                    parity_shards: c.parity_shards,
                    hire_seconds: started.elapsed().as_secs_f64(),
                });
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Hire {
                    want,
                    limit: HIRE_LIMIT,
                    positions: status.map(|s| positions_text(&s)).unwrap_or_default(),
                    log: self.tail(0),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn backup(&mut self) -> Result<(), DemoError> {
        let step = Step::Backup;
        let args: Vec<OsString> = vec![
            "backup".into(),
            self.data.clone().into(),
            "--wait".into(),
            "--json".into(),
        ];
        let args = os(&args);
        let command = Bitdust::shown(self.owner(), &args);
        self.say(format_args!("{} {command}", step.counter()));
        let total = self.source.summary().bytes;
        let wall = Instant::now();
        let mut last = None;
        let finished = self.cli_any(step, 0, &args, LONG_LIMIT, |elapsed| {
            if let Some(job) = self.owner_status().and_then(|s| s.backup.running) {
                // The node refreshes its figures now and then: print only news.
                let now = (job.bytes, job.blocks_complete, job.queued_fragments);
                if last.replace(now) == Some(now) {
                    return;
                }
                let rate = if job.elapsed_secs > 0.0 {
                    job.bytes as f64 / job.elapsed_secs
                } else {
                    0.0
                };
                let waiting = if job.queued_fragments > 0 {
                    format!(", {} fragments waiting", job.queued_fragments)
                } else {
                    String::new()
                };
                self.say(format_args!(
                    "      {:>5.1} s  {} of {}, {}/s, {}/{} blocks placed ({}){waiting}",
                    elapsed.as_secs_f64(),
                    report::size(job.bytes),
                    report::size(total),
                    report::size(rate as u64),
                    job.blocks_complete,
                    job.blocks,
                    job.state
                ));
            }
        })?;
        let wall = wall.elapsed().as_secs_f64();
        let result: Option<JobResult> = serde_json::from_slice(&finished.stdout).ok();
        let result =
            self.json_result(result, &finished, step, command, "expected one JSON result")?;
        self.report.backup = Some(BackupReport::new(&result, wall));
        if !result.outcome.committed() || !finished.success() {
            return Err(DemoError::Backup {
                outcome: result.outcome.to_string(),
                error: result.error,
                log: self.tail(0),
            });
        }
        self.say(format_args!(
            "      committed snapshot {} in {:.1} s: {} files, {} new of {} ({} blocks)",
            result.snapshot,
            result.seconds,
            result.files,
            report::size(result.new_bytes),
            report::size(result.bytes),
            result.new_blocks
        ));
        // A committed job may still be sending fragments to suppliers that were slow; the demo
        // stops suppliers next, so every fragment must be in place first.
        let deadline = Instant::now() + DRAIN_LIMIT;
        loop {
            self.check_alive(step, 0)?;
            let running = self.owner_status().map(|s| s.backup.running);
            match running {
                Some(None) => break,
                Some(Some(job)) if Instant::now() >= deadline => {
                    return Err(DemoError::Drain {
                        queued: job.queued_fragments,
                        limit: DRAIN_LIMIT,
                        log: self.tail(0),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        // The monitor follows the new blocks from its next round: wait until it sees each at
        // full redundancy, so the rebuild's figures start from a known state.
        loop {
            self.check_alive(step, 0)?;
            if let Some((_, h)) = self.owner_view()
                && h.fully_redundant()
            {
                self.say(format_args!(
                    "      the owner's monitor sees {} blocks, each with all {} fragments on its suppliers",
                    h.blocks,
                    h.k + h.m
                ));
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DemoError::NotFollowed {
                    redundancy: self
                        .owner_view()
                        .map(|(_, h)| h.describe())
                        .unwrap_or_default(),
                    limit: DRAIN_LIMIT,
                    log: self.tail(0),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop(&mut self) -> Result<(), DemoError> {
        let step = Step::Stop;
        let status = self.owner_status().ok_or_else(|| DemoError::Command {
            step,
            command: Bitdust::shown(self.owner(), &[OsStr::new("status")]),
            status: "no answer".into(),
            said: "the owner does not answer".into(),
            log: self.tail(0),
        })?;
        for p in &status.customer.positions {
            if let Some(s) = &p.supplier {
                self.positions.insert(s.clone(), p.position);
            }
        }
        // The suppliers of the first m positions: data fragments, so the restore must decode
        // from parity.
        let m = status.customer.parity_shards;
        let mut victims = Vec::new();
        for position in 0..m {
            let supplier = status
                .customer
                .positions
                .iter()
                .find(|p| p.position == position)
                .and_then(|p| p.supplier.clone())
                .and_then(|s| self.ids.iter().position(|id| *id == s))
                .ok_or(DemoError::NoSupplier { position })?;
            victims.push((supplier, position));
        }
        for (i, position) in victims {
            self.say(format_args!(
                "{} stopping {} (position {position}) with SIGTERM",
                step.counter(),
                self.names[i]
            ));
            let exit = self.nodes.all[i].stop(procs::STOP_LIMIT);
            if !exit.is_some_and(|e| e.success()) {
                self.say(format_args!(
                    "      warning: {} ended with {} (log: {})",
                    self.names[i],
                    procs::describe_status(exit),
                    NodeProc::log_path(&self.homes[i]).display()
                ));
            }
            self.stopped.push(i);
        }
        self.stopped_at = Some(Instant::now());
        Ok(())
    }

    /// The name of the friend with node id `id` (its short id if none).
    fn name_of(&self, id: &str) -> String {
        self.ids
            .iter()
            .position(|i| i == id)
            .map_or_else(|| id.chars().take(8).collect(), |i| self.names[i].clone())
    }

    /// Waits until the owner has fired both stopped suppliers, hired friends that still run in
    /// their positions, and rebuilt every block to `k + m` good fragments; says what happens.
    fn rebuild(&mut self) -> Result<(), DemoError> {
        let step = Step::Rebuild;
        let stopped_at = self.stopped_at.unwrap_or_else(Instant::now);
        let gone: Vec<String> = self.stopped.iter().map(|&i| self.ids[i].clone()).collect();
        let before: BTreeMap<u32, String> = self
            .positions
            .iter()
            .map(|(id, p)| (*p, id.clone()))
            .collect();
        self.say(format_args!(
            "{} the owner's monitor fires a supplier unreachable {FIRE_AFTER}, hires a spare friend in its position, and its rebuilder puts the lost fragments there",
            step.counter()
        ));
        // The rebuilder's counters run from the node's start: count from here.
        let base = self
            .owner_view()
            .map(|(_, h)| h.rebuild)
            .unwrap_or_default();
        let deadline = stopped_at + REBUILD_LIMIT;
        let (mut fired_shown, mut placed_shown) = (0, (0, 0));
        let mut holders_shown: BTreeMap<u32, Option<String>> = BTreeMap::new();
        loop {
            self.check_alive(step, 0)?;
            let view = self.owner_view();
            let t = stopped_at.elapsed().as_secs_f64();
            if let Some((status, h)) = &view {
                for (position, reason) in h.fired.iter().skip(fired_shown) {
                    let was = before.get(position).map(|id| self.name_of(id));
                    self.say(format_args!(
                        "      {t:>5.1} s  fired {} at position {position}: {reason}",
                        was.as_deref().unwrap_or("its supplier")
                    ));
                }
                fired_shown = fired_shown.max(h.fired.len());
                for p in &status.customer.positions {
                    let holder = p
                        .supplier
                        .clone()
                        .filter(|_| p.contract == Contract::Connected);
                    let changed = holders_shown.get(&p.position) != Some(&holder);
                    let hired_anew = holder
                        .as_ref()
                        .is_some_and(|s| before.get(&p.position) != Some(s));
                    if changed
                        && hired_anew
                        && let Some(s) = &holder
                    {
                        self.say(format_args!(
                            "      {t:>5.1} s  {} took position {} (connected)",
                            self.name_of(s),
                            p.position
                        ));
                    }
                    holders_shown.insert(p.position, holder);
                }
                let r = h.rebuild.since(&base);
                let waiting = h.rebuild.in_flight + h.rebuild_queued;
                let news = (r.fragments_placed, waiting);
                if news != placed_shown && news != (0, 0) {
                    placed_shown = news;
                    self.say(format_args!(
                        "      {t:>5.1} s  {} fragments rebuilt and placed, {} blocks done, {} waiting",
                        r.fragments_placed,
                        r.blocks_rebuilt,
                        waiting
                    ));
                }
                if h.fired.len() >= gone.len() && replaced(status, &gone) && h.fully_redundant() {
                    let seconds = stopped_at.elapsed().as_secs_f64();
                    let now: BTreeMap<u32, String> = status
                        .customer
                        .positions
                        .iter()
                        .filter_map(|p| Some((p.position, p.supplier.clone()?)))
                        .collect();
                    let mut report = RebuildReport {
                        seconds,
                        fired: h
                            .fired
                            .iter()
                            .map(|(position, reason)| FiringReport {
                                position: *position,
                                reason: reason.clone(),
                                was: before.get(position).map(|id| self.name_of(id)),
                                now: now.get(position).map(|id| self.name_of(id)),
                            })
                            .collect(),
                        blocks: h.blocks,
                        blocks_rebuilt: r.blocks_rebuilt,
                        fragments_placed: r.fragments_placed,
                        fragments_fetched: r.fragments_fetched,
                        ..RebuildReport::default()
                    };
                    report.set_bytes(r.bytes_fetched, r.bytes_placed);
                    self.say(format_args!(
                        "      full redundancy again {seconds:.1} s after the stop: all {} blocks have {} fragments; fetched {}, placed {}",
                        h.blocks,
                        h.k + h.m,
                        report::size(r.bytes_fetched),
                        report::size(r.bytes_placed)
                    ));
                    self.report.rebuild = Some(report);
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let (positions, h) = view
                    .map(|(s, h)| (positions_text(&s), h))
                    .unwrap_or_default();
                return Err(DemoError::Rebuild {
                    limit: REBUILD_LIMIT,
                    fired: h.fired.len(),
                    want: gone.len(),
                    redundancy: h.describe(),
                    positions,
                    log: self.tail(0),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The owner's own check: `bitdust drill` restores a sample of files in memory and compares
    /// them with the catalog.
    fn drill(&mut self) -> Result<(), DemoError> {
        let step = Step::Drill;
        let args = [OsStr::new("drill"), OsStr::new("--json")];
        let command = Bitdust::shown(self.owner(), &args);
        self.say(format_args!(
            "{} {command}: the owner restores a sample of files in memory and checks them",
            step.counter()
        ));
        let finished = self.cli_any(step, 0, &args, DRILL_LIMIT, |_| {})?;
        let parsed = serde_json::from_slice::<DrillView>(&finished.stdout).ok();
        let drill = self.json_result(
            parsed,
            &finished,
            step,
            command,
            "expected one JSON drill report",
        )?;
        self.report.drill = Some(drill.clone());
        if !drill.passed || !finished.success() {
            return Err(DemoError::Drill {
                failed: drill.failures,
                log: self.tail(0),
            });
        }
        self.say(format_args!(
            "      passed: {} files, {} checked in {:.1} s",
            drill.files,
            report::size(drill.bytes),
            drill.seconds
        ));
        Ok(())
    }

    fn restore(&mut self) -> Result<(), DemoError> {
        let step = Step::Restore;
        let to = self.work.join("restore");
        let args: Vec<OsString> = vec![
            "restore".into(),
            "--to".into(),
            to.clone().into(),
            "--wait".into(),
            "--json".into(),
        ];
        let args = os(&args);
        let command = Bitdust::shown(self.owner(), &args);
        self.say(format_args!("{} {command}", step.counter()));
        let total = self.source.summary().bytes;
        let wall = Instant::now();
        let finished = self.cli_any(step, 0, &args, LONG_LIMIT, |elapsed| {
            let written = bytes_under(&to);
            self.say(format_args!(
                "      {:>5.1} s  {} of {} written, {}/s",
                elapsed.as_secs_f64(),
                report::size(written),
                report::size(total),
                report::size((written as f64 / elapsed.as_secs_f64().max(0.001)) as u64)
            ));
        })?;
        let wall = wall.elapsed().as_secs_f64();
        let stderr = finished.stderr_text();
        if !finished.success() && stderr.contains("unrecognized subcommand") {
            return Err(DemoError::RestoreUnavailable {
                said: stderr.lines().next().unwrap_or_default().to_string(),
            });
        }
        let result = self.json_result(
            last_json::<RestoreResult>(&finished.stdout),
            &finished,
            step,
            command,
            "expected one JSON object with `outcome`",
        )?;
        self.report.restore = Some(RestoreReport::new(&result, wall));
        if !result.outcome.complete() || !finished.success() {
            return Err(DemoError::RestoreIncomplete {
                outcome: result.outcome.to_string(),
                status: finished.describe(),
                failed: result.failed,
                log: self.tail(0),
            });
        }
        self.say(format_args!(
            "      {}: {} files, {} in {:.1} s; fetched {}",
            result.outcome,
            result.files,
            report::size(result.bytes),
            result.seconds,
            report::size(result.fetched_bytes)
        ));
        Ok(())
    }

    fn verify(&mut self) -> Result<(), DemoError> {
        let step = Step::Verify;
        let to = self.work.join("restore");
        let root = tree::locate_restored(&to, &self.data, &self.source);
        self.say(format_args!(
            "{} comparing {} with {}: every byte, mode, mtime and symlink",
            step.counter(),
            root.display(),
            self.data.display()
        ));
        let c =
            tree::compare(&self.data, &root).map_err(|source| DemoError::Tree { step, source })?;
        self.report.verify = Some(VerifyReport::new(&c, &root));
        if c.matched() {
            return Ok(());
        }
        let first: Vec<String> = c
            .mismatches
            .iter()
            .take(5)
            .map(|d| format!("{}: {}", d.path, d.what))
            .collect();
        Err(DemoError::Mismatch {
            count: c.mismatches.len(),
            first: first.join("; "),
        })
    }

    /// Fills what the report takes from the end state (fragments on disk, the owner's machines),
    /// whatever step the demo reached.
    fn finish(&mut self, result: &Result<(), DemoError>, kept: bool) {
        if self
            .nodes
            .all
            .first_mut()
            .is_some_and(|o| o.exited().is_none())
            && let Some(status) = self.owner_status()
        {
            self.report.machines = status.machines;
            self.report.positions = status.customer.positions;
        }
        if !self.ids.is_empty() {
            self.report.suppliers = (1..self.ids.len())
                .map(|i| {
                    let (fragments, bytes) =
                        report::fragments(&self.homes[i].join("store").join(&self.ids[0]));
                    SupplierReport {
                        name: self.names[i].clone(),
                        node_id: self.ids[i].clone(),
                        position: self.positions.get(&self.ids[i]).copied(),
                        fragments,
                        fragment_bytes: bytes,
                        stopped: self.stopped.contains(&i),
                        took_position: self.report.rebuild.as_ref().and_then(|r| {
                            r.fired
                                .iter()
                                .find(|f| f.now.as_deref() == Some(self.names[i].as_str()))
                                .map(|f| f.position)
                        }),
                    }
                })
                .collect();
        }
        self.report.ok = result.is_ok();
        if let Err(e) = result {
            self.report.failed_step = Some(e.step());
            self.report.error = Some(e.to_string());
        }
        self.report.dir = self.work.display().to_string();
        self.report.kept = kept;
    }
}

/// What `bitdust restore --json` prints (the fields the demo reads; others are ignored).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RestoreResult {
    pub outcome: RestoreOutcome,
    pub files: u64,
    pub bytes: u64,
    pub failed: Vec<FailedFile>,
    pub seconds: f64,
    pub fetched_bytes: u64,
}

/// The one JSON object in `stdout` (pretty or one line), else the last line that is one.
fn last_json<T: serde::de::DeserializeOwned>(stdout: &[u8]) -> Option<T> {
    let is_object = |v: &serde_json::Value| v.get("outcome").is_some();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(stdout)
        && is_object(&v)
    {
        return serde_json::from_value(v).ok();
    }
    String::from_utf8_lossy(stdout)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .find(is_object)
        .and_then(|v| serde_json::from_value(v).ok())
}

/// The parts of `status`'s `health` (the owner's monitor) the demo reads.
#[derive(Clone, Debug, Default)]
struct Health {
    blocks: u64,
    /// Blocks by good reachable fragments beyond `k`.
    by_redundancy: BTreeMap<i64, u64>,
    /// Firings, oldest first: position and reason.
    fired: Vec<(u32, String)>,
    rebuild: Rebuilding,
    rebuild_queued: u64,
    k: u32,
    m: u32,
}

/// The rebuilder's counters (since the node started).
#[derive(Clone, Copy, Debug, Default)]
struct Rebuilding {
    in_flight: u64,
    blocks_rebuilt: u64,
    fragments_placed: u64,
    fragments_fetched: u64,
    bytes_fetched: u64,
    bytes_placed: u64,
}

impl Rebuilding {
    /// The counts since `base` (the counters only grow).
    fn since(&self, base: &Rebuilding) -> Rebuilding {
        Rebuilding {
            in_flight: self.in_flight,
            blocks_rebuilt: self.blocks_rebuilt.saturating_sub(base.blocks_rebuilt),
            fragments_placed: self.fragments_placed.saturating_sub(base.fragments_placed),
            fragments_fetched: self
                .fragments_fetched
                .saturating_sub(base.fragments_fetched),
            bytes_fetched: self.bytes_fetched.saturating_sub(base.bytes_fetched),
            bytes_placed: self.bytes_placed.saturating_sub(base.bytes_placed),
        }
    }
}

impl Health {
    fn of(h: &MonitorStatus) -> Health {
        let r = &h.rebuild;
        Health {
            blocks: h.blocks,
            by_redundancy: h.by_redundancy.clone(),
            fired: h.fired.clone(),
            rebuild: Rebuilding {
                in_flight: r.in_flight,
                blocks_rebuilt: r.blocks_rebuilt,
                fragments_placed: r.fragments_placed,
                fragments_fetched: r.fragments_fetched,
                bytes_fetched: r.bytes_fetched,
                bytes_placed: r.bytes_placed,
            },
            rebuild_queued: h.rebuild_queued,
            k: h.k,
            m: h.m,
        }
    }

    /// Every followed block has all `k + m` good fragments, and nothing is left to rebuild.
    fn fully_redundant(&self) -> bool {
        self.blocks > 0
            && self.m > 0
            && self.by_redundancy.keys().all(|r| *r == i64::from(self.m))
            && self.rebuild.in_flight + self.rebuild_queued == 0
    }

    /// "blocks by good fragments beyond k: 2: 5, 0: 3; 1 rebuilding, 2 queued".
    fn describe(&self) -> String {
        let by: Vec<String> = self
            .by_redundancy
            .iter()
            .rev()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect();
        format!(
            "{} blocks by good fragments beyond k: {}; {} rebuilding, {} queued",
            self.blocks,
            if by.is_empty() {
                "none seen".to_string()
            } else {
                by.join(", ")
            },
            self.rebuild.in_flight,
            self.rebuild_queued
        )
    }
}

/// Every position is Connected to a distinct supplier, none of them in `gone`.
fn replaced(status: &NodeStatus, gone: &[String]) -> bool {
    let (want, ready) = hired(status);
    want > 0
        && ready == want
        && status
            .customer
            .positions
            .iter()
            .all(|p| p.supplier.as_ref().is_some_and(|s| !gone.contains(s)))
}

/// (positions wanted, positions held by distinct suppliers, confirmed and Connected).
fn hired(status: &NodeStatus) -> (usize, usize) {
    let c = &status.customer;
    let want = (c.data_shards + c.parity_shards) as usize;
    let mut seen = std::collections::BTreeSet::new();
    let ready = c
        .positions
        .iter()
        .filter(|p| p.confirmed && p.contract == Contract::Connected)
        .filter_map(|p| p.supplier.as_ref())
        .filter(|s| seen.insert(s.as_str()))
        .count();
    (want, ready)
}

fn positions_text(status: &NodeStatus) -> String {
    status
        .customer
        .positions
        .iter()
        .map(|p| {
            format!(
                "\n  position {}: supplier {}, confirmed {}, contract {}",
                p.position,
                p.supplier.as_deref().unwrap_or("-"),
                p.confirmed,
                p.contract
            )
        })
        .collect()
}

/// What a failed command said: its stderr, else its stdout (the end of it, if long).
fn said(finished: &Finished) -> String {
    let text = finished.stderr_text();
    let text = if text.is_empty() {
        finished.stdout_text()
    } else {
        text
    };
    last_chars(&text, 2000)
}

/// The last `n` characters of `text`, marked when cut.
fn last_chars(text: &str, n: usize) -> String {
    let count = text.chars().count();
    if count <= n {
        return text.to_string();
    }
    let tail: String = text.chars().skip(count - n).collect();
    format!("…{tail}")
}

fn os(args: &[OsString]) -> Vec<&OsStr> {
    args.iter().map(OsString::as_os_str).collect()
}

/// Replaces the `key = ...` line of a config.toml written by `bitdust init` (each key the demo
/// sets appears once there).
fn set_config_line(path: &Path, key: &str, value: &str) -> io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let prefix = format!("{key} = ");
    let mut found = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.starts_with(&prefix) {
                found = true;
                format!("{prefix}{value}")
            } else {
                line.to_string()
            }
        })
        .collect();
    if !found {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no `{key} = ` line"),
        ));
    }
    std::fs::write(path, lines.join("\n") + "\n")
}

/// Bytes of regular files under `dir` so far (a restore in progress).
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
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
    use crate::actors::status::{Contract, PositionStatus};

    #[test]
    fn the_restore_result_is_read_from_one_object_or_the_last_json_line() {
        let pretty = br#"{
  "outcome": "partial", "files": 3, "bytes": 10, "seconds": 0.5, "fetched_bytes": 12,
  "failed": [{"path": "a/b", "reason": "block 1f: 3 of 4 fragments"}], "extra": true
}"#;
        let r: RestoreResult = last_json(pretty).expect("pretty");
        assert_eq!(r.outcome, RestoreOutcome::Partial);
        assert_eq!(r.failed[0].path, "a/b");
        assert_eq!(r.fetched_bytes, 12);
        let lines = b"restoring...\n{\"progress\": 1}\n{\"outcome\":\"complete\",\"files\":1}\n";
        let r: RestoreResult = last_json(lines).expect("lines");
        assert_eq!((r.outcome, r.files), (RestoreOutcome::Complete, 1));
        assert!(last_json::<RestoreResult>(b"no json here").is_none());
    }

    #[test]
    fn hired_counts_distinct_connected_confirmed_positions() {
        let p = |position, supplier: &str, confirmed, contract: Contract| PositionStatus {
            position,
            supplier: Some(supplier.into()),
            confirmed,
            contract,
        };
        let mut status = NodeStatus::default();
        status.customer.data_shards = 2;
        status.customer.parity_shards = 2;
        status.customer.positions = vec![
            p(0, "a", true, Contract::Connected),
            p(1, "b", false, Contract::Connected),
            p(2, "c", true, Contract::Requesting),
            p(3, "a", true, Contract::Connected),
        ];
        assert_eq!(hired(&status), (4, 1));
        status.customer.positions[1].confirmed = true;
        status.customer.positions[2].contract = Contract::Connected;
        status.customer.positions[3].supplier = Some("d".into());
        assert_eq!(hired(&status), (4, 4));
    }

    #[test]
    fn the_monitors_view_is_read_from_status_and_full_only_when_nothing_is_left_to_do() {
        let json = r#"{"rounds": 9, "blocks": 2, "by_redundancy": {"2": 1, "1": 1},
            "fired": [[0, "unreachable for 5 s"]], "k": 4, "m": 2, "rebuild_queued": 1,
            "rebuild": {"queued": 1, "in_flight": 0, "blocks_rebuilt": 3, "fragments_placed": 3,
                "fragments_fetched": 12, "blocks_failed": 0, "bytes_fetched": 400, "bytes_placed": 100},
            "sources": [], "last_drill": null}"#;
        let monitor: MonitorStatus = serde_json::from_str(json).expect("health");
        let mut h = Health::of(&monitor);
        assert_eq!(h.by_redundancy, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(h.fired, vec![(0, "unreachable for 5 s".to_string())]);
        assert!(!h.fully_redundant(), "a block is one fragment short");
        h.by_redundancy = BTreeMap::from([(2, 2)]);
        assert!(!h.fully_redundant(), "a block is still queued");
        h.rebuild_queued = 0;
        assert!(h.fully_redundant());
        h.rebuild.in_flight = 1;
        assert!(!h.fully_redundant(), "a block is being rebuilt");
        assert!(
            !Health::default().fully_redundant(),
            "no block followed yet"
        );
        assert!(
            h.describe().contains("2: 2; 1 rebuilding, 0 queued"),
            "{}",
            h.describe()
        );

        let base = Rebuilding {
            fragments_placed: 1,
            bytes_fetched: 100,
            ..Rebuilding::default()
        };
        let r = h.rebuild.since(&base);
        assert_eq!(
            (r.fragments_placed, r.blocks_rebuilt, r.bytes_fetched),
            (2, 3, 300)
        );
    }

    #[test]
    fn replaced_wants_every_position_connected_and_none_held_by_a_stopped_supplier() {
        let p = |position, supplier: &str| PositionStatus {
            position,
            supplier: Some(supplier.into()),
            confirmed: true,
            contract: Contract::Connected,
        };
        let mut status = NodeStatus::default();
        status.customer.data_shards = 1;
        status.customer.parity_shards = 1;
        status.customer.positions = vec![p(0, "gone"), p(1, "b")];
        let gone = ["gone".to_string()];
        assert!(!replaced(&status, &gone));
        status.customer.positions[0].supplier = Some("spare".into());
        status.customer.positions[0].contract = Contract::Requesting;
        assert!(!replaced(&status, &gone), "not connected yet");
        status.customer.positions[0].contract = Contract::Connected;
        assert!(replaced(&status, &gone));
    }

    #[test]
    fn a_config_line_is_replaced_or_its_absence_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[backup]\n# space_per_supplier = old\nspace_per_supplier = \"1 GiB\"\nx = 1\n",
        )
        .expect("write");
        set_config_line(&path, "space_per_supplier", "\"80 MiB\"").expect("set");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text,
            "[backup]\n# space_per_supplier = old\nspace_per_supplier = \"80 MiB\"\nx = 1\n"
        );
        assert!(set_config_line(&path, "missing", "1").is_err());
    }

    #[test]
    fn every_error_names_its_step() {
        let e = DemoError::RestoreUnavailable {
            said: "error: unrecognized subcommand 'restore'".into(),
        };
        assert_eq!(e.step(), Step::Restore);
        assert!(e.to_string().starts_with("restore: "), "{e}");
        let e = DemoError::RestoreIncomplete {
            outcome: "partial".into(),
            status: "status 1".into(),
            failed: vec![FailedFile {
                path: "x".into(),
                reason: "gone".into(),
            }],
            log: Box::new(LogTail {
                node: "owner".into(),
                path: "/h/node.log".into(),
                lines: vec!["ERROR boom".into()],
            }),
        };
        let text = e.to_string();
        assert!(text.contains("not restored: x (gone)"), "{text}");
        assert!(
            text.contains("owner's log (/h/node.log) ends:\n    ERROR boom"),
            "{text}"
        );
        assert_eq!(Step::Hire.counter(), "[4/10]");
        assert_eq!(Step::Verify.counter(), "[10/10]");
        let e = DemoError::Rebuild {
            limit: REBUILD_LIMIT,
            fired: 1,
            want: 2,
            redundancy: Health::default().describe(),
            positions: String::new(),
            log: Box::new(LogTail {
                node: "owner".into(),
                path: "/h/node.log".into(),
                lines: vec!["WARN no friend to hire".into()],
            }),
        };
        assert_eq!(e.step(), Step::Rebuild);
        let text = e.to_string();
        assert!(text.starts_with("rebuild: "), "{text}");
        assert!(text.contains("1 of 2 fired"), "{text}");
        assert!(text.contains("ends:\n    WARN no friend to hire"), "{text}");
        assert_eq!(last_chars("abcdef", 3), "…def");
        assert_eq!(last_chars("abc", 3), "abc");
    }
}
