//! `bitdust export-key` and `bitdust recover`: the recovery key file, and a lost node made again
//! from it. The passphrase comes from `$BITDUST_PASSPHRASE` or a prompt on a terminal, never from
//! the command line (other users see those in `ps`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use bitdust::node::home::Home;
use bitdust::node::offline::{self, Friend, KeyFileError, RecoverySecrets};
use bitdust::node::units::ByteSize;

const PASSPHRASE_ENV: &str = "BITDUST_PASSPHRASE";

#[derive(clap::Args)]
pub struct RecoverArgs {
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
}

/// The shortest passphrase `export-key` accepts, in characters: the file may be copied to
/// places an attacker reaches, and then only the passphrase (with Argon2id's cost) guards it.
const MIN_PASSPHRASE_CHARS: usize = 12;

/// The passphrase in the environment: `None` when unset or empty.
fn passphrase_from_env() -> anyhow::Result<Option<String>> {
    match std::env::var(PASSPHRASE_ENV) {
        Ok(p) if p.is_empty() => Ok(None),
        Ok(p) => Ok(Some(p)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("${PASSPHRASE_ENV} is not valid UTF-8"),
    }
}

fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdin().is_terminal()
}

/// A new passphrase: from the environment, else asked twice on a terminal. None only when asked
/// for by `--no-passphrase`: a missing one is an error, never a file in the clear by accident.
fn new_passphrase(none_wanted: bool) -> anyhow::Result<Option<String>> {
    let unprotected = "refusing to write the key file without a passphrase: set \
         $BITDUST_PASSPHRASE, run on a terminal, or pass --no-passphrase to write it in the clear";
    let passphrase = match (passphrase_from_env()?, none_wanted) {
        (Some(_), true) => bail!("--no-passphrase, but ${PASSPHRASE_ENV} is set: which one?"),
        (None, true) => return Ok(None),
        (Some(p), false) => p,
        (None, false) if stdin_is_terminal() => {
            let first = rpassword::prompt_password("Passphrase to protect the key file: ")
                .context("reading the passphrase")?;
            if first.is_empty() {
                bail!("{unprotected}");
            }
            check_strength(&first)?;
            let again = rpassword::prompt_password("The same passphrase again: ")
                .context("reading the passphrase")?;
            if again != first {
                bail!("the two passphrases differ; nothing written");
            }
            first
        }
        (None, false) => bail!("{unprotected}"),
    };
    check_strength(&passphrase)?;
    Ok(Some(passphrase))
}

fn check_strength(passphrase: &str) -> anyhow::Result<()> {
    let chars = passphrase.chars().count();
    if chars < MIN_PASSPHRASE_CHARS {
        bail!(
            "the passphrase is too short ({chars} characters; at least {MIN_PASSPHRASE_CHARS}): \
             a few words are easier to remember and harder to guess; nothing written"
        );
    }
    Ok(())
}

/// `bitdust export-key`: seals the home's keys, master secret and identity into `out`.
pub fn export(home: &Home, out: &Path, no_passphrase: bool) -> anyhow::Result<()> {
    bitdust::node::control::disable_core_dumps().context("turning core dumps off")?;
    let secrets = offline::export_secrets(home, out)?;
    let passphrase = new_passphrase(no_passphrase)?;
    offline::write_key_file(&secrets, passphrase.as_deref(), out)?;
    let node_id = secrets.identity().node_id();
    println!("{node_id}");
    if passphrase.is_none() {
        eprintln!(
            "bitdust: WARNING: {} is NOT protected by a passphrase.\n\
             bitdust: WARNING: whoever reads it can read every backup of this node and act as it.\n\
             bitdust: WARNING: keep it offline, or export again without --no-passphrase.",
            out.display()
        );
    } else {
        eprintln!(
            "bitdust: wrote the recovery key of node {node_id} to {}, protected by your passphrase; \
             keep both: without them your backups cannot be restored",
            out.display()
        );
    }
    Ok(())
}

/// Opens a key file with the passphrase from the environment, else asks on a terminal when the
/// file needs one.
fn open_key_file(bytes: &[u8]) -> anyhow::Result<RecoverySecrets> {
    let from_env = passphrase_from_env()?;
    match offline::open_key_file(bytes, from_env.as_deref()) {
        Err(KeyFileError::PassphraseNeeded) if from_env.is_none() && stdin_is_terminal() => {
            let p = rpassword::prompt_password("Passphrase of the key file: ")
                .context("reading the passphrase")?;
            Ok(offline::open_key_file(bytes, Some(&p))?)
        }
        Err(KeyFileError::PassphraseNeeded) => bail!(
            "the key file is protected by a passphrase: set ${PASSPHRASE_ENV} or run on a terminal"
        ),
        other => Ok(other?),
    }
}

/// `bitdust recover`: a new home with the lost node's keys and identity and the friend in its
/// peer book; the node fetches its recovery record from that friend at start. Nothing is
/// created until the key file has opened.
pub fn recover(home: &Home, args: RecoverArgs) -> anyhow::Result<()> {
    bitdust::node::control::disable_core_dumps().context("turning core dumps off")?;
    let donated = ByteSize::parse(&args.donate).map_err(|e| anyhow::anyhow!("--donate: {e}"))?;
    let friend = Friend::from_card(&args.peer).context("--peer: invalid card")?;
    offline::check_new_home(home)?;
    let key = &args.key;
    let bytes = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let secrets = open_key_file(&bytes).with_context(|| key.display().to_string())?;
    offline::recover(home, &secrets, &friend, args.listen, donated)?;
    let identity = secrets.identity();
    println!("{}", identity.node_id());
    // Which version the first run will recover (the newest any reachable peer holds); the run
    // searches again, so a friend offline now is no failure.
    match bitdust::node::recover::preview(home) {
        Ok(newest) => {
            let when =
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(newest.record.created_at);
            eprintln!(
                "bitdust: the newest catalog found is revision {} of {} (UTC), from {}; {} peers asked, {} records found.",
                newest.record.revision,
                humantime::format_rfc3339_seconds(when),
                newest.from,
                newest.asked,
                newest.found
            );
        }
        // The error may carry a peer's words (a refusal's detail): escaped for the terminal.
        Err(e) => eprintln!(
            "bitdust: no recovery record could be fetched yet ({}); the first run tries again.",
            super::shown(&format!("{e:#}"))
        ),
    }
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
