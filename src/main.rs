//! The `bitdust` command line (DESIGN.md §5): parse, then hand over to one `cli::<verb>` module,
//! which asks the node (`bitdust::node::client`) or works on the home (`bitdust::node::offline`)
//! and prints the answer.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use bitdust::node::config::LogFormat;
use bitdust::node::home::Home;

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
    Init(cli::init::Args),
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
    Backup(cli::backup::Args),
    /// Restore a backed-up version into a directory (default: the latest of every source)
    Restore(cli::restore::Args),
    /// Write the recovery key file (keys, master secret, identity); the passphrase comes from
    /// $BITDUST_PASSPHRASE or a prompt, never from the command line
    ExportKey {
        /// File to write (mode 0600); an existing file is never overwritten
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Write the file without a passphrase: whoever reads it can read every backup
        #[arg(long)]
        no_passphrase: bool,
    },
    /// Become a lost node again on a new machine, from its key file and one friend's card
    Recover(cli::keys::RecoverArgs),
    /// Show the backed-up sources and their versions
    List {
        #[arg(long)]
        json: bool,
    },
    /// Manage trusted friends
    Peer {
        #[command(subcommand)]
        command: cli::peer::PeerCommand,
    },
    /// Manage the customers this node stores data for
    Customer {
        #[command(subcommand)]
        command: cli::peer::CustomerCommand,
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

/// glibc gives each thread that allocates an arena of its own (up to 8 per core) and keeps what
/// was freed in each: with the runtime's, the restore's and RocksDB's threads, that held ~45 MB
/// more at the peak of a restore of 200,000 files (263 -> 222 MB, same speed). One per core is
/// enough. Before any thread is started.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    // SAFETY: mallopt only sets an allocator parameter; no allocation is in progress here.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, cores as libc::c_int);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
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
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<cli::Incomplete>() => {
            eprintln!("bitdust: {e:#}");
            ExitCode::from(cli::Incomplete::EXIT_CODE)
        }
        Err(e) => {
            eprintln!("bitdust: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let home = Home::new(home_dir(cli.home)?);
    let log_format = cli.log_format.map(|f| match f {
        LogFormatArg::Human => LogFormat::Human,
        LogFormatArg::Json => LogFormat::Json,
    });
    match cli.command {
        Command::Init(args) => cli::init::run(&home, args),
        Command::Run => bitdust::node::run::run(home, log_format),
        Command::Id { json } => cli::init::id(&home, json),
        Command::Status { json } => cli::status::run(&home, json),
        Command::Backup(args) => cli::backup::run(&home, args),
        Command::List { json } => cli::list::run(&home, json),
        Command::ExportKey { out, no_passphrase } => cli::keys::export(&home, &out, no_passphrase),
        Command::Recover(args) => cli::keys::recover(&home, args),
        Command::Restore(args) => cli::restore::run(&home, args),
        Command::Peer { command } => cli::peer::run(&home, command),
        Command::Customer { command } => cli::peer::customer(&home, command),
        Command::Demo { data, keep, json } => Ok(bitdust::demo::run(&bitdust::demo::Options {
            data,
            keep,
            json,
        })?),
        Command::Drill { json } => cli::drill::run(&home, json),
        Command::Diagrams { out } => {
            for path in bitdust::node::offline::write_diagrams(&out)? {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}
