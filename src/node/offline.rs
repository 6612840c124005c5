//! What the CLI does on a home itself, with no node running: create it (`init`, `recover`), read
//! its catalog (`list`), edit its peer book (`peer add`/`remove`), write and open recovery key
//! files, and write the state diagrams. Each opens the database under the home lock.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::{self, Config};
use super::control::Versions;
use super::home::Home;
use super::home::{HomeError, IDENTITY_FILE, RECOVER_PENDING_FILE, SIGNING_KEY_FILE, write_atomic};
use super::units::ByteSize;
use crate::crypto::identity::{BadNodeId, Identity, IdentityError, NodeId};
pub use crate::crypto::keyfile::{KeyFileError, RecoverySecrets};
use crate::store::{RocksStore, StoreError, catalog, peers};

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("invalid card: {0}")]
    Card(#[from] IdentityError),
    #[error(transparent)]
    NodeId(#[from] BadNodeId),
    #[error("that is this node's own card")]
    OwnCard,
    #[error("{0} is not a peer of this node")]
    NotAPeer(String),
    #[error("{root} is already a bitdust home (it has {file}); recover into a new directory")]
    AlreadyAHome { root: PathBuf, file: &'static str },
    #[error("--peer is this node's own card; give a friend's")]
    RecoverFromSelf,
    #[error("{} already exists; refusing to overwrite it (choose another --out)", .0.display())]
    KeyFileExists(PathBuf),
    #[error("{what} {}: {cause}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// A node's public identity as `bitdust id --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdCard {
    pub node_id: String,
    pub name: String,
    pub contacts: Vec<String>,
    pub revision: u64,
    pub timestamp: u64,
    pub card: String,
}

impl IdCard {
    pub fn of(identity: &Identity) -> IdCard {
        IdCard {
            node_id: identity.node_id().to_string(),
            name: identity.name().to_string(),
            contacts: identity.contacts().to_vec(),
            revision: identity.revision(),
            timestamp: identity.timestamp(),
            card: identity.card(),
        }
    }
}

/// This home's identity.
pub fn id_card(home: &Home) -> Result<IdCard, OfflineError> {
    Ok(IdCard::of(&home.read_identity()?))
}

/// A new home; its identity and, when the disk has less free space than offered, a warning
/// (accepted: the disk may grow, or be mounted later, but not silently).
pub fn init(
    home: &Home,
    name: &str,
    listen: SocketAddr,
    donated: ByteSize,
) -> Result<(IdCard, Option<String>), OfflineError> {
    let identity = home.init(name, listen, donated, crate::unix_now())?;
    let warning = crate::store::free_space(&home.store_dir())
        .ok()
        .and_then(|free| {
            let mut offered = Config::default();
            offered.supplier.donated = donated;
            config::donation_warning(&offered, 0, free)
        });
    Ok((IdCard::of(&identity), warning))
}

/// The catalog's versions, read from the database (no node may run on the home).
pub fn list(home: &Home) -> Result<Versions, OfflineError> {
    let _lock = home.lock()?;
    let store = RocksStore::open(&home.db_dir())?;
    Ok(Versions::of(&catalog::snapshots(&store)?))
}

/// The node a contact card names (checked: it must verify).
pub fn card_node(card: &str) -> Result<String, OfflineError> {
    Ok(Identity::from_card(card)?.node_id().to_string())
}

/// Adds a friend to the peer book in the database; its node id.
pub fn add_peer(home: &Home, card: &str, name: Option<&str>) -> Result<String, OfflineError> {
    let identity = Identity::from_card(card)?;
    let _lock = home.lock()?;
    let own = home.read_identity()?;
    if own.node_id() == identity.node_id() {
        return Err(OfflineError::OwnCard);
    }
    let store = RocksStore::open(&home.db_dir())?;
    peers::save(&store, &identity, name, crate::unix_now())?;
    Ok(identity.node_id().to_string())
}

/// Removes a friend from the peer book in the database.
pub fn remove_peer(home: &Home, node_id: &str) -> Result<(), OfflineError> {
    let peer: NodeId = node_id.parse()?;
    let _lock = home.lock()?;
    let store = RocksStore::open(&home.db_dir())?;
    if !peers::remove(&store, &peer)? {
        return Err(OfflineError::NotAPeer(node_id.to_string()));
    }
    Ok(())
}

/// The home's keys, master secret and identity, to be sealed into a key file at `out` (which
/// must not exist: checked before a passphrase is asked for).
pub fn export_secrets(home: &Home, out: &Path) -> Result<RecoverySecrets, OfflineError> {
    if out.symlink_metadata().is_ok() {
        return Err(OfflineError::KeyFileExists(out.to_path_buf()));
    }
    let keys = home.load_keys()?;
    let identity = home.load_identity(&keys)?;
    // Never a new master key here: the file would not open the backups made with the lost one.
    let master = home.load_master(true)?;
    Ok(RecoverySecrets::new(keys, master, identity)?)
}

/// Seals `secrets` into a new file `out` (mode 0600, never overwriting); a partial file is
/// removed (it would fail only on the day it is needed).
pub fn write_key_file(
    secrets: &RecoverySecrets,
    passphrase: Option<&str>,
    out: &Path,
) -> Result<(), OfflineError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let bytes = crate::crypto::keyfile::seal(secrets, passphrase)?;
    let io = |what| {
        move |cause| OfflineError::Io {
            what,
            path: out.to_path_buf(),
            cause,
        }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(io("creating"))?;
    if let Err(e) = file.write_all(&bytes).and_then(|()| file.sync_all()) {
        let _ = std::fs::remove_file(out);
        return Err(io("writing")(e));
    }
    Ok(())
}

/// Opens a key file's bytes.
pub fn open_key_file(
    bytes: &[u8],
    passphrase: Option<&str>,
) -> Result<RecoverySecrets, KeyFileError> {
    crate::crypto::keyfile::open(bytes, passphrase)
}

/// The friend named by `--peer` in `recover` (its card must verify).
pub struct Friend(Identity);

impl Friend {
    pub fn from_card(card: &str) -> Result<Friend, IdentityError> {
        Identity::from_card(card).map(Friend)
    }

    pub fn name(&self) -> &str {
        self.0.name()
    }

    pub fn node_id(&self) -> String {
        self.0.node_id().to_string()
    }
}

/// Refuses a directory that is a home already (before the key file is opened).
pub fn check_new_home(home: &Home) -> Result<(), OfflineError> {
    for file in [SIGNING_KEY_FILE, IDENTITY_FILE, config::CONFIG_FILE] {
        if home.path(file).exists() {
            return Err(OfflineError::AlreadyAHome {
                root: home.root().to_path_buf(),
                file,
            });
        }
    }
    Ok(())
}

/// A new home with the lost node's keys and identity, the friend in its peer book, and a marker
/// that makes the node fetch its recovery record from that friend at start. On failure nothing
/// is left (half a home would be refused by the next attempt as "already a home").
pub fn recover(
    home: &Home,
    secrets: &RecoverySecrets,
    friend: &Friend,
    listen: SocketAddr,
    donated: ByteSize,
) -> Result<(), OfflineError> {
    if secrets.identity().node_id() == friend.0.node_id() {
        return Err(OfflineError::RecoverFromSelf);
    }
    let created_root = !home.root().exists();
    let result = (|| -> Result<(), OfflineError> {
        std::fs::create_dir_all(home.root()).map_err(|cause| OfflineError::Io {
            what: "creating",
            path: home.root().to_path_buf(),
            cause,
        })?;
        home.init_from_secrets(secrets, listen, donated)?;
        let _lock = home.lock()?;
        let store = RocksStore::open(&home.db_dir())?;
        peers::save(&store, &friend.0, None, crate::unix_now())?;
        write_atomic(
            &home.path(RECOVER_PENDING_FILE),
            friend.0.node_id().to_string().as_bytes(),
            0o600,
        )?;
        Ok(())
    })();
    if result.is_err() && created_root {
        let _ = std::fs::remove_dir_all(home.root());
    }
    result
}

/// Writes the state diagrams generated from the machines' tables into `out`; the files written.
pub fn write_diagrams(out: &Path) -> Result<Vec<PathBuf>, OfflineError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |cause| OfflineError::Io { what, path, cause }
    };
    std::fs::create_dir_all(out).map_err(io("creating", out))?;
    let mut written = Vec::new();
    for (name, contents) in crate::fsm::diagram_files() {
        let path = out.join(name);
        std::fs::write(&path, contents).map_err(io("writing", &path))?;
        written.push(path);
    }
    Ok(written)
}
