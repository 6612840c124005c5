//! The `bitdust` command line (DESIGN.md §5): parse, then hand over to `bitdust::node`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use bitdust::actors::status::NodeStatus;
use clap::{Parser, Subcommand};

use bitdust::crypto::identity::Identity;
use bitdust::node::config::LogFormat;
use bitdust::node::control::{self, Request};
use bitdust::node::home::Home;
use bitdust::node::units::ByteSize;

#[derive(Parser)]
#[command(
    name = "bitdust",
    version,
    about = "Peer-to-peer backup: friends store each other's encrypted data"
)]
struct Cli {
    /// Node home directory [default: $BITDUST_HOME, else ~/.bitdust]
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Log format for `run` (overrides [log] format in config.toml)
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new home: keys, signed identity, config and database; prints the node id
    Init {
        /// Address to listen on for peers
        #[arg(long, default_value = "0.0.0.0:7771")]
        listen: SocketAddr,
        /// Name shown to friends [default: the host name]
        #[arg(long)]
        name: Option<String>,
        /// Disk space offered to friends, e.g. "8 GiB"
        #[arg(long, default_value = "8 GiB")]
        donate: String,
    },
    /// Run the node in the foreground (SIGHUP reloads config, SIGTERM/SIGINT stop it)
    Run,
    /// Print this node's contact card (one line) for friends to add
    Id {
        #[arg(long)]
        json: bool,
    },
    /// Show the running node: id, uptime, every state machine and its state
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Back up directories (default: the configured [[backup.sources]]) through the running node
    Backup {
        /// Directories to back up
        paths: Vec<PathBuf>,
        /// Wait until the backup is committed, with a progress bar on a terminal
        #[arg(long)]
        wait: bool,
        /// Print the result as one JSON document
        #[arg(long)]
        json: bool,
    },
    /// Restore a backed-up version into a directory (default: the latest of every source)
    Restore {
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
    },
    /// Write the recovery key file (keys, master secret, identity); the passphrase comes from
    /// $BITDUST_PASSPHRASE or a prompt, never from the command line
    ExportKey {
        /// File to write (mode 0600); an existing file is never overwritten
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Become a lost node again on a new machine, from its key file and one friend's card
    Recover {
        /// The key file written by `bitdust export-key`
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// A friend's contact card (`bitdust id` on their node)
        #[arg(long, value_name = "CARD")]
        peer: String,
        /// Address to listen on for peers
        #[arg(long, default_value = "0.0.0.0:7771")]
        listen: SocketAddr,
        /// Disk space offered to friends, e.g. "8 GiB"
        #[arg(long, default_value = "8 GiB")]
        donate: String,
    },
    /// Show the backed-up sources and their versions
    List {
        #[arg(long)]
        json: bool,
    },
    /// Manage trusted friends
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// Manage the customers this node stores data for
    Customer {
        #[command(subcommand)]
        command: CustomerCommand,
    },
    /// Try it with no setup: a loopback network of 1 owner + 7 friends backs up a directory,
    /// loses two suppliers, restores and verifies every byte; prints a report
    Demo {
        /// Directory to back up [default: a generated sample]
        #[arg(long, value_name = "PATH")]
        data: Option<PathBuf>,
        /// Keep the temporary homes, logs and restored files (their path is printed)
        #[arg(long)]
        keep: bool,
        /// Print the report as one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Restore a random sample of files in memory now and check them byte for byte (exit status
    /// 1 when any file failed)
    Drill {
        /// Print the report as one JSON document
        #[arg(long)]
        json: bool,
    },
    /// Write the state diagrams generated from the machines' tables
    Diagrams {
        #[arg(long, default_value = "state-diagrams")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Trust a friend, given their contact card (`bitdust id` on their node); works while the node runs
    Add {
        card: String,
        /// Local label for this friend
        #[arg(long)]
        name: Option<String>,
    },
    /// Stop trusting a friend: forget its card and close its sessions (remove it from
    /// [[peers]] in config.toml too, if it is listed there)
    Remove {
        /// The peer's node id (32 hex characters)
        node_id: String,
    },
    /// Measure the round trip to a connected peer
    Ping {
        /// The peer's node id (32 hex characters)
        node_id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CustomerCommand {
    /// Stop storing for a customer: it is told, and its data is kept for the grace period
    Drop {
        /// The customer's node id (32 hex characters)
        node_id: String,
    },
}

fn home_dir(cli: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(h) = cli {
        return Ok(h);
    }
    if let Some(h) = std::env::var_os("BITDUST_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let user =
        std::env::var_os("HOME").context("neither --home, $BITDUST_HOME nor $HOME is set")?;
    Ok(PathBuf::from(user).join(".bitdust"))
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "bitdust-node".into())
}

/// Installs the signal handlers from the ELF initialiser list, before `main` and before the
/// static constructors of the linked C++ (RocksDB): a SIGTERM or SIGHUP sent the moment we were
/// spawned must find them (bitdust::node::signals explains why). Only libc calls and atomics run
/// here, which is all that is safe before the Rust runtime is set up.
#[used]
#[unsafe(link_section = ".init_array.00200")]
static INSTALL_SIGNALS_EARLY: extern "C" fn() = install_signals_early;

extern "C" fn install_signals_early() {
    // An error is reported by the call in `main`, where printing is possible.
    let _ = bitdust::node::signals::install();
}

fn main() -> ExitCode {
    // Again in case the initialiser did not run or failed (a no-op when it worked).
    if let Err(e) = bitdust::node::signals::install() {
        eprintln!("bitdust: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run) {
        // Only the node handles signals; every other command dies of them as usual.
        bitdust::node::signals::restore_default();
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bitdust: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let home = Home::new(home_dir(cli.home)?);
    let log_format = cli.log_format.map(|f| match f {
        LogFormatArg::Human => LogFormat::Human,
        LogFormatArg::Json => LogFormat::Json,
    });
    match cli.command {
        Command::Init {
            listen,
            name,
            donate,
        } => {
            let donated = ByteSize::parse(&donate).map_err(|e| anyhow::anyhow!("--donate: {e}"))?;
            let name = name.unwrap_or_else(default_name);
            let identity = home.init(&name, listen, donated, bitdust::unix_now())?;
            // Accepted (the disk may grow, or be mounted later), but not silently.
            if let Ok(free) = bitdust::store::free_space(&home.store_dir()) {
                let mut offered = bitdust::node::config::Config::default();
                offered.supplier.donated = donated;
                if let Some(warning) = bitdust::node::config::donation_warning(&offered, 0, free) {
                    eprintln!("bitdust: warning: {warning}");
                }
            }
            println!("{}", identity.node_id());
            eprintln!(
                "bitdust: new node `{}` in {}; start it with `bitdust run --home {}`",
                identity.name(),
                home.root().display(),
                home.root().display()
            );
            Ok(())
        }
        Command::Run => bitdust::node::run::run(home, log_format),
        Command::Id { json } => {
            let identity = home.read_identity()?;
            if json {
                println!("{}", identity_json(&identity));
            } else {
                println!("{}", identity.card());
            }
            Ok(())
        }
        Command::Status { json } => status(&home, json),
        Command::Backup { paths, wait, json } => backup(&home, paths, wait, json),
        Command::List { json } => list(&home, json),
        Command::ExportKey { out } => export_key(&home, &out),
        Command::Recover {
            key,
            peer,
            listen,
            donate,
        } => recover(&home, &key, &peer, listen, &donate),
        Command::Restore {
            source,
            to,
            path,
            overwrite,
            wait,
            json,
        } => restore(&home, source, to, path, overwrite, wait, json),
        Command::Peer {
            command: PeerCommand::Add { card, name },
        } => peer_add(&home, card, name),
        Command::Peer {
            command: PeerCommand::Remove { node_id },
        } => peer_remove(&home, node_id),
        Command::Customer {
            command: CustomerCommand::Drop { node_id },
        } => {
            call(
                &home,
                &Request::CustomerDrop {
                    node_id: node_id.clone(),
                },
            )?;
            println!("{node_id}");
            Ok(())
        }
        Command::Peer {
            command: PeerCommand::Ping { node_id, json },
        } => {
            let data = call(&home, &Request::PeerPing { node_id })?;
            if json {
                println!("{data}");
            } else {
                println!("{:.2} ms", data["rtt_ms"].as_f64().unwrap_or_default());
            }
            Ok(())
        }
        Command::Demo { data, keep, json } => Ok(bitdust::demo::run(&bitdust::demo::Options {
            data,
            keep,
            json,
        })?),
        Command::Drill { json } => drill(&home, json),
        Command::Diagrams { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for (name, contents) in bitdust::fsm::diagram_files() {
                let path = out.join(name);
                std::fs::write(&path, contents)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

fn identity_json(identity: &Identity) -> serde_json::Value {
    serde_json::json!({
        "node_id": identity.node_id().to_string(),
        "name": identity.name(),
        "contacts": identity.contacts(),
        "revision": identity.revision(),
        "timestamp": identity.timestamp(),
        "card": identity.card(),
    })
}

/// Sends one request to the running node; its data, or its error as ours.
fn call(home: &Home, request: &Request) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let response = runtime.block_on(control::call(&home.control_socket(), request))?;
    if !response.ok {
        bail!(
            "{}",
            response
                .error
                .unwrap_or_else(|| "the node refused the request".into())
        );
    }
    Ok(response.data.unwrap_or_default())
}

/// Sends `request` to the running node; `None` when no node runs on this home (the caller then
/// works on the database itself, under the home lock).
fn call_if_running(home: &Home, request: &Request) -> anyhow::Result<Option<serde_json::Value>> {
    if !home.control_socket().exists() {
        return Ok(None);
    }
    match call(home, request) {
        Ok(data) => Ok(Some(data)),
        Err(e)
            if e.downcast_ref::<control::ControlError>()
                .is_some_and(|c| matches!(c, control::ControlError::NotRunning { .. })) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `bitdust drill`: one restore drill through the running node; fails when a file failed.
fn drill(home: &Home, json: bool) -> anyhow::Result<()> {
    let data = call(home, &Request::Drill)?;
    let report: bitdust::actors::drill::DrillReport =
        serde_json::from_value(data.clone()).context("the node sent an unreadable drill report")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
    } else {
        println!(
            "drill of {} (version {}): {} files, {} bytes checked, {} fragments fetched, {:.1} s",
            report.source,
            report.snapshot,
            report.files,
            report.bytes,
            report.fragments_fetched,
            report.seconds
        );
        for failure in &report.failures {
            println!("  FAILED {}: {}", failure.path, failure.reason);
        }
    }
    if !report.passed() {
        bail!("the drill failed for {} file(s)", report.failures.len());
    }
    Ok(())
}

/// Adds a peer through the running node, or straight into the database when none runs.
fn peer_add(home: &Home, card: String, name: Option<String>) -> anyhow::Result<()> {
    let identity = Identity::from_card(&card).context("invalid card")?;
    if call_if_running(
        home,
        &Request::PeerAdd {
            card: card.clone(),
            name: name.clone(),
        },
    )?
    .is_some()
    {
        println!("{}", identity.node_id());
        return Ok(());
    }
    let _lock = home.lock()?;
    let own = home.read_identity()?;
    if own.node_id() == identity.node_id() {
        bail!("that is this node's own card");
    }
    let store = bitdust::store::RocksStore::open(&home.db_dir())?;
    bitdust::store::peers::save(&store, &identity, name.as_deref(), bitdust::unix_now())?;
    println!("{}", identity.node_id());
    Ok(())
}

/// Removes a peer through the running node, or straight from the database when none runs.
fn peer_remove(home: &Home, node_id: String) -> anyhow::Result<()> {
    let peer: bitdust::crypto::identity::NodeId = node_id.parse()?;
    if call_if_running(
        home,
        &Request::PeerRemove {
            node_id: node_id.clone(),
        },
    )?
    .is_some()
    {
        println!("{node_id}");
        return Ok(());
    }
    let _lock = home.lock()?;
    let store = bitdust::store::RocksStore::open(&home.db_dir())?;
    if !bitdust::store::peers::remove(&store, &peer)? {
        bail!("{node_id} is not a peer of this node");
    }
    println!("{node_id}");
    Ok(())
}

fn status(home: &Home, json: bool) -> anyhow::Result<()> {
    let data = call(home, &Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let health = data["health"].clone();
    let status: NodeStatus = serde_json::from_value(data)
        .context("the node answered with a status this version cannot read")?;
    print!("{}", render_status(&status));
    print!("{}", render_health(&health));
    Ok(())
}

/// The monitor's part of `status`: sources by health, each with its worst redundancy and
/// durability estimate, audits, the rebuild, firings and the last restore drill.
fn render_health(h: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let Some(sources) = h["sources"].as_array() else {
        return out;
    };
    let count = |what: &str| {
        sources
            .iter()
            .filter(|s| s["health"].as_str() == Some(what))
            .count()
    };
    let _ = writeln!(
        out,
        "
health: {} sources at full health, {} degraded, {} at risk, {} lost ({} rounds, {} audits passed, {} failed)",
        count("full"),
        count("degraded"),
        count("at risk"),
        count("lost"),
        h["rounds"].as_u64().unwrap_or(0),
        h["audits_passed"].as_u64().unwrap_or(0),
        h["audits_failed"].as_u64().unwrap_or(0),
    );
    if !sources.is_empty() {
        let _ = writeln!(
            out,
            "{:<40} {:<9} {:>7} {:>10}  LOSS WITHIN A YEAR",
            "SOURCE", "HEALTH", "BLOCKS", "REDUNDANCY"
        );
    }
    for s in sources {
        let _ = writeln!(
            out,
            "{:<40} {:<9} {:>7} {:>+10}  {}",
            s["source"].as_str().unwrap_or("-"),
            s["health"].as_str().unwrap_or("-"),
            s["blocks"].as_u64().unwrap_or(0),
            s["worst_redundancy"].as_i64().unwrap_or(0),
            s["loss_within_a_year_text"].as_str().unwrap_or("-"),
        );
    }
    let r = &h["rebuild"];
    let queued = h["rebuild_queued"].as_u64().unwrap_or(0) + r["in_flight"].as_u64().unwrap_or(0);
    if queued > 0 || r["fragments_placed"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            out,
            "rebuild: {} blocks waiting, {} rebuilt, {} fragments placed, {} failed",
            queued,
            r["blocks_rebuilt"].as_u64().unwrap_or(0),
            r["fragments_placed"].as_u64().unwrap_or(0),
            r["blocks_failed"].as_u64().unwrap_or(0),
        );
    }
    for f in h["fired"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "fired: position {} ({})",
            f[0].as_u64().unwrap_or(0),
            f[1].as_str().unwrap_or("-")
        );
    }
    let d = &h["last_drill"];
    if d.is_object() {
        let _ = writeln!(
            out,
            "last restore drill: {} at {} (unix), {} files, {} verified byte for byte from {}",
            if d["passed"].as_bool() == Some(true) {
                "passed"
            } else {
                "FAILED"
            },
            d["at"].as_u64().unwrap_or(0),
            d["files"].as_u64().unwrap_or(0),
            ByteSize(d["bytes"].as_u64().unwrap_or(0)),
            d["source"].as_str().unwrap_or("-"),
        );
    } else {
        let _ = writeln!(out, "last restore drill: none yet");
    }
    out
}

/// The human form of `status`: one table per concern.
fn render_status(status: &NodeStatus) -> String {
    use std::fmt::Write as _;
    let text = |v: Option<&str>| v.unwrap_or("-").to_string();
    let size = |b: u64| ByteSize(b).to_string();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node      {} ({})",
        status.node_id,
        text(status.name.as_deref())
    );
    let revision = status.revision.map_or("-".into(), |r| r.to_string());
    let _ = writeln!(out, "revision  {revision}");
    let _ = writeln!(out, "uptime    {}s", status.uptime_secs);
    if let Some(disk) = &status.disk {
        let _ = writeln!(out, "disk      {}", disk.line);
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:<8} {:<14} {:>8}",
        "MACHINE", "ID", "STATE", "FOR"
    );
    for m in &status.machines {
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:<14} {:>7}s",
            m.actor, m.id, m.state, m.for_secs
        );
    }
    let network = &status.network;
    let _ = writeln!(out, "\nlistening on {}", text(network.listen.as_deref()));
    let _ = writeln!(
        out,
        "{:<32}  {:<14} {:<22} {:<13} {:>10} {:>10}",
        "PEER", "NAME", "ADDRESS", "SESSION", "IN", "OUT"
    );
    for p in &network.peers {
        let _ = writeln!(
            out,
            "{:<32}  {:<14} {:<22} {:<13} {:>10} {:>10}",
            p.node_id,
            p.name,
            text(p.address.as_deref()),
            p.session,
            size(p.bytes_in),
            size(p.bytes_out)
        );
    }
    let customer = &status.customer;
    let _ = writeln!(
        out,
        "\nsuppliers ({} data + {} parity)",
        customer.data_shards, customer.parity_shards
    );
    let _ = writeln!(
        out,
        "{:<9} {:<32}  {:<14}",
        "POSITION", "SUPPLIER", "CONTRACT"
    );
    for p in &customer.positions {
        let _ = writeln!(
            out,
            "{:<9} {:<32}  {:<14}",
            p.position,
            text(p.supplier.as_deref()),
            p.contract
        );
    }
    let supplier = &status.supplier;
    let _ = writeln!(out, "\ncustomers (donating {})", size(supplier.donated));
    let _ = writeln!(
        out,
        "{:<32}  {:>10} {:>10} {:<10}",
        "CUSTOMER", "QUOTA", "USED", "STATE"
    );
    for c in &supplier.customers {
        let _ = writeln!(
            out,
            "{:<32}  {:>10} {:>10} {:<10}",
            c.node_id,
            size(c.quota),
            size(c.used),
            c.state
        );
    }
    let backup = &status.backup;
    if let Some(job) = &backup.running {
        let _ = writeln!(
            out,
            "\nbackup running: {} (snapshot {}) {}: {} files, {} read, {} new, {}/{} blocks placed, {} fragments waiting, redundancy {:+}",
            job.source,
            job.snapshot,
            job.state,
            job.files,
            size(job.bytes_read),
            size(job.new_bytes),
            job.blocks_complete,
            job.blocks,
            job.queued_fragments,
            job.worst_redundancy
        );
    }
    if !backup.queued.is_empty() {
        let _ = writeln!(out, "backups waiting: {}", backup.queued.join(", "));
    }
    if let Some(last) = backup.finished.last() {
        let _ = writeln!(
            out,
            "last backup: {} (snapshot {}) {}{}: {} files, {} new, {:.1} s, {} not backed up",
            last.source,
            last.snapshot,
            last.outcome,
            last.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
            last.files,
            size(last.new_bytes),
            last.seconds,
            last.skipped.len()
        );
    }
    let restore = &status.restore;
    if let Some(job) = &restore.running {
        let _ = writeln!(
            out,
            "\nrestore running: {} (version {}) -> {} {}: {}/{} files, {} of {}, {}/{} blocks, {} fetched",
            job.source,
            job.snapshot,
            job.to,
            job.state,
            job.files_done,
            job.files_total,
            size(job.bytes_written),
            size(job.bytes_total),
            job.blocks_decoded,
            job.blocks,
            size(job.fetched_bytes)
        );
    }
    if let Some(last) = restore.finished.last() {
        let _ = writeln!(
            out,
            "last restore: {} (version {}) -> {}: {}: {} files, {} not restored",
            last.source,
            last.snapshot,
            last.to,
            last.outcome,
            last.files,
            last.failed.len()
        );
    }
    if !network.counters.is_empty() {
        let parts: Vec<String> = network
            .counters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "\ncounters: {}", parts.join(" "));
    }
    out
}

/// `bitdust backup`: asks the node to back up, then (with `--wait`) follows the job until it
/// ended. Exit status 0 only when every asked-for backup committed.
fn backup(home: &Home, paths: Vec<PathBuf>, wait: bool, json: bool) -> anyhow::Result<()> {
    let mut absolute = Vec::new();
    for path in &paths {
        let resolved = std::fs::canonicalize(path)
            .with_context(|| format!("cannot back up {}", path.display()))?;
        if !resolved.is_dir() {
            bail!("cannot back up {}: not a directory", path.display());
        }
        absolute.push(resolved);
    }
    let request = Request::Backup {
        paths: absolute.iter().map(|p| p.display().to_string()).collect(),
    };
    let Some(runs) = queue(home, &request, "backup", wait, json)? else {
        return Ok(());
    };
    let total: u64 = absolute.iter().map(|p| tree_size(p)).sum();
    let results = follow_backup(home, &runs, total, !json)?;
    let failed = results.iter().filter(|r| r.outcome != "committed").count();
    if json {
        print_results_json(&results)?;
    } else {
        for r in &results {
            println!(
                "{}: {} (snapshot {}): {} files, {} read, {} new in {} blocks, {:.1} s",
                r.source,
                r.outcome,
                r.snapshot,
                r.files,
                ByteSize(r.bytes_read),
                ByteSize(r.new_bytes),
                r.new_blocks,
                r.seconds
            );
            if let Some(e) = &r.error {
                println!("  error: {e}");
            }
            for s in &r.skipped {
                println!("  not backed up: {} ({})", s.path, s.reason);
            }
        }
    }
    if failed > 0 {
        bail!("{failed} backup(s) did not commit");
    }
    Ok(())
}

/// Sends a backup or restore request; answers the run numbers to follow, or, without `--wait`,
/// says they are queued and answers `None`.
fn queue(
    home: &Home,
    request: &Request,
    what: &str,
    wait: bool,
    json: bool,
) -> anyhow::Result<Option<Vec<u64>>> {
    let data = call(home, request)?;
    let runs: Vec<u64> = serde_json::from_value(data["runs"].clone())
        .context("the node answered with run numbers this version cannot read")?;
    if wait {
        return Ok(Some(runs));
    }
    if json {
        println!("{}", serde_json::json!({ "runs": runs }));
    } else {
        println!("{what} queued (run {runs:?}); follow it with `bitdust status`");
    }
    Ok(None)
}

/// One result as a JSON object; several as `{"results": [...]}`.
fn print_results_json<R: serde::Serialize>(results: &[R]) -> anyhow::Result<()> {
    let doc = match results {
        [one] => serde_json::to_value(one)?,
        all => serde_json::json!({ "results": all }),
    };
    println!("{doc}");
    Ok(())
}

/// Bytes of regular files under `root` (symlinks not followed): the progress bar's total.
fn tree_size(root: &std::path::Path) -> u64 {
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

/// Polls the node's status until `result(status, run)` answers for every run in `runs`; on a
/// terminal (when `show`) a progress bar of `total` bytes is redrawn by `draw`.
fn follow<R>(
    home: &Home,
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
        let data = call(home, &Request::Status)?;
        let status: NodeStatus = serde_json::from_value(data)
            .context("the node answered with a status this version cannot read")?;
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

/// Follows backup runs until each has a result.
fn follow_backup(
    home: &Home,
    runs: &[u64],
    total: u64,
    show: bool,
) -> anyhow::Result<Vec<bitdust::actors::status::JobResult>> {
    follow(
        home,
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

/// `bitdust list`: the versions in the catalog, from the running node or the database.
fn list(home: &Home, json: bool) -> anyhow::Result<()> {
    let data = match call_if_running(home, &Request::List)? {
        Some(data) => data,
        None => {
            let _lock = home.lock()?;
            let store = bitdust::store::RocksStore::open(&home.db_dir())?;
            bitdust::node::run::list_json(&bitdust::store::catalog::snapshots(&store)?)
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let versions = data["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        println!("no backups yet");
        return Ok(());
    }
    println!(
        "{:<40} {:>8}  {:<20} {:>8} {:>10} {:>10}",
        "SOURCE", "VERSION", "DATE (UTC)", "FILES", "SIZE", "NEW"
    );
    for v in versions {
        let when = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(v["finished_at"].as_u64().unwrap_or(0));
        println!(
            "{:<40} {:>8}  {:<20} {:>8} {:>10} {:>10}",
            v["source"].as_str().unwrap_or("?"),
            v["snapshot"].as_u64().unwrap_or(0),
            humantime::format_rfc3339_seconds(when).to_string(),
            v["files"].as_u64().unwrap_or(0),
            ByteSize(v["bytes"].as_u64().unwrap_or(0)).to_string(),
            ByteSize(v["new_bytes"].as_u64().unwrap_or(0)).to_string(),
        );
    }
    Ok(())
}

/// `bitdust restore`: asks the node to restore, then (with `--wait`) follows it. Exit status 0
/// only when every file was restored.
fn restore(
    home: &Home,
    source: Option<String>,
    to: PathBuf,
    path: Option<String>,
    overwrite: bool,
    wait: bool,
    json: bool,
) -> anyhow::Result<()> {
    // SOURCE@VERSION: the version is the part after the last '@' when it is a number.
    let (source, version) = match source {
        Some(s) => match s.rsplit_once('@') {
            Some((name, v)) if v.chars().all(|c| c.is_ascii_digit()) && !v.is_empty() => (
                (!name.is_empty()).then(|| name.to_string()),
                Some(v.parse::<u64>().context("version number too large")?),
            ),
            _ => (Some(s), None),
        },
        None => (None, None),
    };
    let to = if to.is_absolute() {
        to
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(to)
    };
    let request = Request::Restore {
        source,
        version,
        to: to.display().to_string(),
        path,
        overwrite,
    };
    let Some(runs) = queue(home, &request, "restore", wait, json)? else {
        return Ok(());
    };
    let results = follow_restore(home, &runs, !json)?;
    if json {
        print_results_json(&results)?;
    } else {
        for r in &results {
            println!(
                "{} (version {}) -> {}: {}: {} files, {} dirs, {} symlinks, {} in {:.1} s ({} fetched){}",
                r.source,
                r.snapshot,
                r.to,
                r.outcome,
                r.files,
                r.dirs,
                r.symlinks,
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
                println!("  error: {e}");
            }
            for f in &r.failed {
                println!("  not restored: {} ({})", f.path, f.reason);
            }
        }
    }
    let incomplete = results.iter().filter(|r| r.outcome != "complete").count();
    if incomplete > 0 {
        bail!("{incomplete} restore(s) did not complete");
    }
    Ok(())
}

/// Follows restore runs until each has a result.
fn follow_restore(
    home: &Home,
    runs: &[u64],
    show: bool,
) -> anyhow::Result<Vec<bitdust::actors::status::RestoreResult>> {
    follow(
        home,
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

/// Where a key file's passphrase may come from besides the prompt; never a command-line argument
/// (other users see those in `ps`).
const PASSPHRASE_ENV: &str = "BITDUST_PASSPHRASE";

/// The passphrase in the environment: `Some(None)` when set but empty (deliberately none),
/// `None` when unset.
fn passphrase_from_env() -> anyhow::Result<Option<Option<String>>> {
    match std::env::var(PASSPHRASE_ENV) {
        Ok(p) if p.is_empty() => Ok(Some(None)),
        Ok(p) => Ok(Some(Some(p))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("${PASSPHRASE_ENV} is not valid UTF-8"),
    }
}

fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdin().is_terminal()
}

/// `bitdust export-key`: seals the home's keys, master secret and identity into `out`.
fn export_key(home: &Home, out: &std::path::Path) -> anyhow::Result<()> {
    use bitdust::crypto::keyfile::{self, RecoverySecrets};
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    // Checked before asking for a passphrase; `create_new` below closes the race.
    if out.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; refusing to overwrite it (choose another --out)",
            out.display()
        );
    }
    let keys = home.load_keys()?;
    let identity = home.load_identity(&keys)?;
    let master = home.load_master()?;
    let secrets = RecoverySecrets::new(keys, master, identity)?;
    let passphrase = match passphrase_from_env()? {
        Some(p) => p,
        None if stdin_is_terminal() => {
            let first =
                rpassword::prompt_password("Passphrase to protect the key file (empty for none): ")
                    .context("reading the passphrase")?;
            if first.is_empty() {
                None
            } else {
                let again = rpassword::prompt_password("The same passphrase again: ")
                    .context("reading the passphrase")?;
                if again != first {
                    bail!("the two passphrases differ; nothing written");
                }
                Some(first)
            }
        }
        None => None,
    };
    let bytes = keyfile::seal(&secrets, passphrase.as_deref())?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    if let Err(e) = file.write_all(&bytes).and_then(|()| file.sync_all()) {
        // A partial key file would fail only on the day it is needed.
        let _ = std::fs::remove_file(out);
        return Err(e).with_context(|| format!("writing {}", out.display()));
    }
    println!("{}", secrets.identity().node_id());
    if passphrase.is_none() {
        eprintln!(
            "bitdust: WARNING: {} is NOT protected by a passphrase.\n\
             bitdust: WARNING: whoever reads it can read every backup of this node and act as it.\n\
             bitdust: WARNING: keep it offline, or export again with ${PASSPHRASE_ENV} set or on a terminal.",
            out.display()
        );
    } else {
        eprintln!(
            "bitdust: wrote the recovery key of node {} to {}, protected by your passphrase; \
             keep both: without them your backups cannot be restored",
            secrets.identity().node_id(),
            out.display()
        );
    }
    Ok(())
}

/// Opens a key file with the passphrase from the environment, else asks on a terminal when the
/// file needs one.
fn open_key_file(bytes: &[u8]) -> anyhow::Result<bitdust::crypto::keyfile::RecoverySecrets> {
    use bitdust::crypto::keyfile::{self, KeyFileError};
    let from_env = passphrase_from_env()?.flatten();
    match keyfile::open(bytes, from_env.as_deref()) {
        Err(KeyFileError::PassphraseNeeded) if from_env.is_none() && stdin_is_terminal() => {
            let p = rpassword::prompt_password("Passphrase of the key file: ")
                .context("reading the passphrase")?;
            Ok(keyfile::open(bytes, Some(&p))?)
        }
        Err(KeyFileError::PassphraseNeeded) => bail!(
            "the key file is protected by a passphrase: set ${PASSPHRASE_ENV} or run on a terminal"
        ),
        other => Ok(other?),
    }
}

/// `bitdust recover`: a new home with the lost node's keys and identity, the friend in its peer
/// book, and a marker that makes the node fetch its recovery record from that friend at start.
/// Nothing is created until the key file has opened.
fn recover(
    home: &Home,
    key: &std::path::Path,
    peer: &str,
    listen: SocketAddr,
    donate: &str,
) -> anyhow::Result<()> {
    use bitdust::node::home::{IDENTITY_FILE, RECOVER_PENDING_FILE, SIGNING_KEY_FILE};

    let donated = ByteSize::parse(donate).map_err(|e| anyhow::anyhow!("--donate: {e}"))?;
    let friend = Identity::from_card(peer).context("--peer: invalid card")?;
    for rel in [
        SIGNING_KEY_FILE,
        IDENTITY_FILE,
        bitdust::node::config::CONFIG_FILE,
    ] {
        if home.path(rel).exists() {
            bail!(
                "{} is already a bitdust home (it has {rel}); recover into a new directory",
                home.root().display()
            );
        }
    }
    let bytes = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let secrets = open_key_file(&bytes).with_context(|| key.display().to_string())?;
    let identity = secrets.identity().clone();
    if identity.node_id() == friend.node_id() {
        bail!("--peer is this node's own card; give a friend's");
    }
    let created_root = !home.root().exists();
    let result = (|| -> anyhow::Result<()> {
        std::fs::create_dir_all(home.root())
            .with_context(|| format!("creating {}", home.root().display()))?;
        home.init_from_secrets(&secrets, listen, donated)?;
        let _lock = home.lock()?;
        let store = bitdust::store::RocksStore::open(&home.db_dir())?;
        bitdust::store::peers::save(&store, &friend, None, bitdust::unix_now())?;
        bitdust::node::home::write_atomic(
            &home.path(RECOVER_PENDING_FILE),
            friend.node_id().to_string().as_bytes(),
            0o600,
        )?;
        Ok(())
    })();
    if let Err(e) = result {
        // Half a home would be refused by the next attempt as "already a home".
        if created_root {
            let _ = std::fs::remove_dir_all(home.root());
        }
        return Err(e);
    }
    println!("{}", identity.node_id());
    eprintln!(
        "bitdust: recovered node `{}` ({}) in {}.\n\
         bitdust: start the node with `bitdust run --home {}`; it fetches your catalog from `{}` ({}),\n\
         bitdust: then `bitdust list` and `bitdust restore` work as on the old machine.",
        identity.name(),
        identity.node_id(),
        home.root().display(),
        home.root().display(),
        friend.name(),
        friend.node_id()
    );
    Ok(())
}
