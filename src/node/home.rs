//! The node's home directory: layout, creation (`bitdust init`), the single-instance lock and
//! loading of keys and identity. Secret files are created with mode 0600 and never logged.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::config::{CONFIG_FILE, default_file};
use super::units::ByteSize;
use crate::actors::identity::IdentityFileError;
use crate::crypto::derive::MasterSecret;
use crate::crypto::identity::{Identity, IdentityError};
use crate::crypto::keys::NodeKeys;

pub const SIGNING_KEY_FILE: &str = "keys/signing.key";
pub const NOISE_KEY_FILE: &str = "keys/noise.key";
/// The owner's 32-byte master secret: every backup key derives from it (`crypto::derive`).
pub const MASTER_KEY_FILE: &str = "keys/master.key";
pub const IDENTITY_FILE: &str = "identity.card";
pub const LOCK_FILE: &str = "node.lock";
pub const CONTROL_SOCKET: &str = "control.sock";
/// Left by `bitdust recover`: the node id of the friend to fetch the recovery record from; the
/// node acts on it at start.
pub const RECOVER_PENDING_FILE: &str = "recover.pending";

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("{0} is already a bitdust home (it has {1}); refusing to overwrite it")]
    AlreadyInitialised(PathBuf, &'static str),
    #[error("{0} is not a bitdust home (no {1}); run `bitdust init --home {0}` first")]
    NotInitialised(PathBuf, &'static str),
    #[error("another bitdust node is already running on {home}{pid}")]
    AlreadyRunning { home: PathBuf, pid: String },
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{path}: {cause}")]
    Identity { path: PathBuf, cause: IdentityError },
    #[error(
        "{0} is missing and backups are sealed with it: restore the file from a copy, or make \
         the home again with `bitdust recover` and your recovery key file (a new key would \
         orphan every backup)"
    )]
    MasterKeyMissing(PathBuf),
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    InsecureKey { path: PathBuf, mode: u32 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_path_buf(),
        cause: source,
    }
}

/// Paths inside one home directory.
#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Home { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn config_file(&self) -> PathBuf {
        self.path(CONFIG_FILE)
    }

    pub fn db_dir(&self) -> PathBuf {
        self.path("db")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.path("store")
    }

    /// Fragments staged for suppliers (the backup's outbox).
    pub fn outbox_dir(&self) -> PathBuf {
        self.path("outbox")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.path(CONTROL_SOCKET)
    }

    /// Creates a new home: keys, signed identity (revision 1), commented config and directories.
    pub fn init(
        &self,
        name: &str,
        listen: SocketAddr,
        donated: ByteSize,
        now_unix: u64,
    ) -> Result<Identity, HomeError> {
        for (rel, what) in [
            (SIGNING_KEY_FILE, "keys"),
            (IDENTITY_FILE, "an identity"),
            (CONFIG_FILE, "a config"),
        ] {
            if self.path(rel).exists() {
                return Err(HomeError::AlreadyInitialised(self.root.clone(), what));
            }
        }
        self.make_private_root()?;
        let keys_dir = self.path("keys");
        fs::create_dir_all(&keys_dir).map_err(io_err(&keys_dir))?;
        fs::set_permissions(&keys_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(&keys_dir))?;
        for dir in [self.store_dir(), self.db_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let text = default_file(name, listen, donated);
        let config =
            super::config::Config::parse_with_env(&text, &self.config_file(), &Default::default())
                .map_err(|e| HomeError::BadFile {
                    path: self.config_file(),
                    message: e.to_string(),
                })?;
        let keys = NodeKeys::generate(&mut rand::rngs::OsRng);
        let identity =
            Identity::create(&keys, name, config.contacts(), 1, now_unix).map_err(|source| {
                HomeError::Identity {
                    path: self.path(IDENTITY_FILE),
                    cause: source,
                }
            })?;
        write_secret(&self.path(SIGNING_KEY_FILE), &keys.signing_secret_bytes())?;
        write_secret(&self.path(NOISE_KEY_FILE), &keys.noise_secret_bytes())?;
        write_secret(&self.path(MASTER_KEY_FILE), &rand::random::<[u8; 32]>())?;
        self.save_identity(&identity)?;
        write_atomic(&self.config_file(), text.as_bytes(), 0o600)?;
        Ok(identity)
    }

    /// Creates a home for a node restored from its recovery key file (`bitdust recover`): the
    /// same keys, master secret and identity as the lost machine, a fresh config and directories.
    /// The identity is kept as signed; the node re-signs it at start if the contacts differ.
    pub fn init_from_secrets(
        &self,
        secrets: &crate::crypto::keyfile::RecoverySecrets,
        listen: SocketAddr,
        donated: ByteSize,
    ) -> Result<(), HomeError> {
        for (rel, what) in [
            (SIGNING_KEY_FILE, "keys"),
            (IDENTITY_FILE, "an identity"),
            (CONFIG_FILE, "a config"),
        ] {
            if self.path(rel).exists() {
                return Err(HomeError::AlreadyInitialised(self.root.clone(), what));
            }
        }
        self.make_private_root()?;
        let keys_dir = self.path("keys");
        fs::create_dir_all(&keys_dir).map_err(io_err(&keys_dir))?;
        fs::set_permissions(&keys_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(&keys_dir))?;
        for dir in [self.store_dir(), self.db_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let text = default_file(secrets.identity().name(), listen, donated);
        super::config::Config::parse_with_env(&text, &self.config_file(), &Default::default())
            .map_err(|e| HomeError::BadFile {
                path: self.config_file(),
                message: e.to_string(),
            })?;
        let keys = secrets.keys();
        write_secret(&self.path(SIGNING_KEY_FILE), &keys.signing_secret_bytes())?;
        write_secret(&self.path(NOISE_KEY_FILE), &keys.noise_secret_bytes())?;
        write_secret(&self.path(MASTER_KEY_FILE), &secrets.master().to_bytes())?;
        self.save_identity(secrets.identity())?;
        write_atomic(&self.config_file(), text.as_bytes(), 0o600)
    }

    /// Creates the home directory (and its parents) if needed and makes it 0700: the catalog in
    /// `db/` names every backed-up path, and `store/` and `outbox/` hold fragments; other local
    /// users get none of it.
    fn make_private_root(&self) -> Result<(), HomeError> {
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(io_err(&self.root))
    }

    /// At start: a home that other users can enter (made by an older version, or chmodded) is
    /// made private again, with a warning. A home we do not own is left alone.
    pub fn keep_private(&self) -> Result<(), HomeError> {
        let meta = fs::metadata(&self.root).map_err(io_err(&self.root))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            fs::set_permissions(&self.root, fs::Permissions::from_mode(mode & 0o700))
                .map_err(io_err(&self.root))?;
            tracing::warn!(home = %self.root.display(), was = format!("{mode:o}"),
                "the home was readable by other users; it is now 0700");
        }
        Ok(())
    }

    /// Reads both secret keys, refusing files other users could read.
    pub fn load_keys(&self) -> Result<NodeKeys, HomeError> {
        let signing = read_secret(&self.path(SIGNING_KEY_FILE))?;
        let noise = read_secret(&self.path(NOISE_KEY_FILE))?;
        NodeKeys::from_secret_bytes(&signing, &noise).map_err(|e| HomeError::BadFile {
            path: self.path("keys"),
            message: e.to_string(),
        })
    }

    /// The owner's master secret. A home made before backups existed gets one now, but only
    /// when the catalog is empty (`has_backups` false): nothing was encrypted with an earlier
    /// one. A missing file beside a catalog, or a damaged file, is an error, never silently
    /// replaced (that would orphan every backup).
    pub fn load_master(&self, has_backups: bool) -> Result<MasterSecret, HomeError> {
        let path = self.path(MASTER_KEY_FILE);
        if !path.exists() {
            if has_backups {
                return Err(HomeError::MasterKeyMissing(path));
            }
            write_secret(&path, &rand::random::<[u8; 32]>())?;
            tracing::info!(path = %path.display(), "created the backup master key");
        }
        let bytes = read_secret(&path)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| HomeError::BadFile {
            path: path.clone(),
            message: format!("holds {} bytes, expected 32", b.len()),
        })?;
        Ok(MasterSecret::from_bytes(bytes))
    }

    /// Reads and verifies this node's identity, and checks it belongs to the keys in `keys/`.
    pub fn load_identity(&self, keys: &NodeKeys) -> Result<Identity, HomeError> {
        let identity = self.read_identity()?;
        if identity.signing_key() != &keys.signing_public()
            || identity.noise_key() != &keys.noise_public()
        {
            return Err(HomeError::BadFile {
                path: self.path(IDENTITY_FILE),
                message: "identity does not match the keys in keys/".into(),
            });
        }
        Ok(identity)
    }

    /// Reads and verifies the identity file without the keys (for `bitdust id`).
    pub fn read_identity(&self) -> Result<Identity, HomeError> {
        let path = self.path(IDENTITY_FILE);
        if !path.exists() {
            return Err(HomeError::NotInitialised(self.root.clone(), IDENTITY_FILE));
        }
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        Identity::from_bytes(&bytes).map_err(|cause| HomeError::Identity { path, cause })
    }

    pub fn save_identity(&self, identity: &Identity) -> Result<(), HomeError> {
        write_atomic(&self.path(IDENTITY_FILE), &identity.to_bytes(), 0o644)
    }

    /// Takes the single-instance lock; held until the returned guard is dropped.
    pub fn lock(&self) -> Result<HomeLock, HomeError> {
        if !self.config_file().exists() {
            return Err(HomeError::NotInitialised(self.root.clone(), CONFIG_FILE));
        }
        let path = self.path(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let pid = if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            };
            return Err(HomeError::AlreadyRunning {
                home: self.root.clone(),
                pid,
            });
        }
        file.set_len(0).map_err(io_err(&path))?;
        write!(file, "{}", std::process::id()).map_err(io_err(&path))?;
        Ok(HomeLock { _file: file })
    }
}

/// Holds the home's lock file; the OS releases it when the process ends, however it ends.
pub struct HomeLock {
    _file: File,
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), HomeError> {
    write_atomic(path, bytes, 0o600)
}

fn read_secret(path: &Path) -> Result<Vec<u8>, HomeError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(HomeError::InsecureKey {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read(path).map_err(io_err(path))
}

/// Writes a file so that a crash leaves either the old or the new content: temp file, fsync,
/// rename, fsync of the directory. The temp file has a random name and is created exclusively
/// (`O_EXCL`: a symlink or file planted at that name makes the write fail, never followed), with
/// exactly `mode`, whatever the umask.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), HomeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(cause) = written {
        let _ = fs::remove_file(&tmp);
        return Err(HomeError::Io { path: tmp, cause });
    }
    if let Err(cause) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(HomeError::Io {
            path: path.to_path_buf(),
            cause,
        });
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

impl crate::actors::identity::IdentityFile for Home {
    fn load(&self, keys: &NodeKeys) -> Result<Identity, IdentityFileError> {
        Ok(self.load_identity(keys)?)
    }

    fn save(&self, identity: &Identity) -> Result<(), IdentityFileError> {
        Ok(self.save_identity(identity)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_private_keys_and_a_valid_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().join("n1"));
        let listen: SocketAddr = "127.0.0.1:7900".parse().expect("addr");
        let identity = home
            .init("alice", listen, ByteSize(1 << 30), 1_700_000_000)
            .expect("init");
        for rel in [SIGNING_KEY_FILE, NOISE_KEY_FILE] {
            let mode = fs::metadata(home.path(rel))
                .expect("key")
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{rel}");
        }
        let keys = home.load_keys().expect("keys");
        assert_eq!(home.load_identity(&keys).expect("identity"), identity);
        assert_eq!(identity.contacts(), ["tcp://127.0.0.1:7900".to_string()]);
        assert!(matches!(
            home.init("alice", listen, ByteSize(1), 0),
            Err(HomeError::AlreadyInitialised(..))
        ));
        // A key file opened up to other users is refused.
        fs::set_permissions(home.path(NOISE_KEY_FILE), fs::Permissions::from_mode(0o644))
            .expect("chmod");
        assert!(matches!(
            home.load_keys(),
            Err(HomeError::InsecureKey { .. })
        ));
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    /// The catalog names every backed-up path: other local users must not read the home.
    #[test]
    fn the_home_is_private_and_made_private_again_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().join("n1"));
        home.init("a", "127.0.0.1:1".parse().expect("addr"), ByteSize(1), 0)
            .expect("init");
        assert_eq!(mode(home.root()), 0o700);
        fs::set_permissions(home.root(), fs::Permissions::from_mode(0o755)).expect("chmod");
        home.keep_private().expect("keep private");
        assert_eq!(mode(home.root()), 0o700);
    }

    /// A file planted where a fixed temp name used to be is neither followed nor reused.
    #[test]
    fn an_atomic_write_follows_no_planted_link_and_sets_its_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"untouched").expect("victim");
        std::os::unix::fs::symlink(&victim, dir.path().join(".secret.tmp")).expect("symlink");
        let target = dir.path().join("secret");
        write_atomic(&target, b"new", 0o600).expect("write");
        assert_eq!(fs::read(&victim).expect("victim"), b"untouched");
        assert_eq!(fs::read(&target).expect("target"), b"new");
        assert_eq!(mode(&target), 0o600);
        // No temp file is left behind.
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .filter(|e| e.file_name() != ".secret.tmp")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A missing master key beside a catalog is an error, not a new key that opens nothing.
    #[test]
    fn a_missing_master_key_is_only_made_for_a_home_without_backups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        home.init("a", "127.0.0.1:1".parse().expect("addr"), ByteSize(1), 0)
            .expect("init");
        let path = home.path(MASTER_KEY_FILE);
        fs::remove_file(&path).expect("remove");
        assert!(matches!(
            home.load_master(true),
            Err(HomeError::MasterKeyMissing(_))
        ));
        assert!(!path.exists(), "no key may be made when backups exist");
        home.load_master(false)
            .expect("a home without backups gets one");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn second_lock_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        home.init("a", "127.0.0.1:1".parse().expect("addr"), ByteSize(1), 0)
            .expect("init");
        let first = home.lock().expect("first lock");
        assert!(matches!(home.lock(), Err(HomeError::AlreadyRunning { .. })));
        drop(first);
        assert!(home.lock().is_ok());
    }
}
