//! Where fragments live on disk: `root/<customer hex>/<first 2 hex of block>/<block hex>.<position>`,
//! temp files `.tmp-…` beside them, and the names recovery accepts as ours.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::index::Entry;
use super::{FragmentError, FragmentKey, FragmentStore, io_err};
use crate::crypto::identity::NodeId;

/// Temp files start with this; recovery removes any it finds.
pub(super) const TMP_PREFIX: &str = ".tmp-";

impl FragmentKey {
    /// The file name: `<block hex>.<position>`.
    pub(super) fn file_name(&self) -> String {
        format!("{}.{}", hex::encode(self.block), self.position)
    }
}

impl FragmentStore {
    pub(super) fn customer_dir(&self, customer: &NodeId) -> PathBuf {
        self.root.join(customer.to_string())
    }

    pub(super) fn block_dir(&self, customer: &NodeId, block: &[u8; 32]) -> PathBuf {
        self.customer_dir(customer).join(hex::encode(&block[..1]))
    }

    pub(super) fn fragment_path(&self, customer: &NodeId, key: &FragmentKey) -> PathBuf {
        self.block_dir(customer, &key.block).join(key.file_name())
    }

    /// Creates the customer and block directories if needed, fsyncing each new one's parent.
    pub(super) fn ensure_block_dir(
        &self,
        customer: &NodeId,
        block: &[u8; 32],
    ) -> Result<PathBuf, FragmentError> {
        let cdir = self.customer_dir(customer);
        let bdir = self.block_dir(customer, block);
        if bdir.is_dir() {
            return Ok(bdir);
        }
        for (dir, parent) in [(&cdir, &self.root), (&bdir, &cdir)] {
            match self.fs.create_dir(dir) {
                Ok(()) => self.sync_dir(parent)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
            }
        }
        Ok(bdir)
    }
}

/// A fresh temp file's path beside `key`'s final place, so the rename stays in one directory.
pub(super) fn temp_path(dir: &Path, key: &FragmentKey) -> PathBuf {
    dir.join(format!(
        "{TMP_PREFIX}{}.{:016x}",
        key.file_name(),
        rand::random::<u64>()
    ))
}

pub(super) fn remove_if_exists(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove a file");
    }
}

/// The entries of a directory (none if it vanished meanwhile).
pub(super) fn read_dir(dir: &Path) -> Result<impl Iterator<Item = fs::DirEntry>, FragmentError> {
    let entries = match fs::read_dir(dir) {
        Ok(rd) => Some(rd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(format!("listing {}", dir.display()))(e)),
    };
    Ok(entries.into_iter().flatten().filter_map(Result::ok))
}

/// Whether the file's size and blake3 match the entry, streaming (bounded memory).
pub(super) fn file_matches(path: &Path, entry: &Entry) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let mut hasher = blake3::Hasher::new();
    match io::copy(&mut f, &mut hasher) {
        Ok(n) => n == entry.size && *hasher.finalize().as_bytes() == entry.hash,
        Err(_) => false,
    }
}

pub(super) fn parse_customer_dir(name: &str) -> Option<NodeId> {
    let id = NodeId::parse(name)?;
    (id.to_string() == name).then_some(id)
}

pub(super) fn is_shard_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `<64 lowercase hex>.<canonical decimal u32>`, else not one of ours.
pub(super) fn parse_file_name(name: &str) -> Option<FragmentKey> {
    let (block_hex, pos) = name.split_once('.')?;
    if block_hex.len() != 64
        || !block_hex
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let block: [u8; 32] = hex::decode(block_hex).ok()?.try_into().ok()?;
    let position: u32 = pos.parse().ok()?;
    let key = FragmentKey { block, position };
    (key.file_name() == name).then_some(key)
}
