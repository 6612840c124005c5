//! Trees to back up, backups and restores through the CLI, and what suppliers hold on disk:
//! shared by the backup, monitor and drill tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::*;
use bitdust::actors::backup_job::RECOVERY_BLOCK;
use bitdust::store::catalog;

pub const MARKER: &[u8] = b"PLAINTEXT-MARKER-7f3a9c-do-not-leak";
pub const NAME_MARKER: &str = "secret-name-marker-51c2";

/// Deterministic pseudo-random bytes (xorshift): incompressible, no two files alike.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A mixed tree: text holding the marker, a file whose name is a marker, a big random file and
/// its duplicate, an empty file, a symlink, nested directories.
pub fn mixed_tree(root: &Path) {
    std::fs::create_dir_all(root.join("docs/deep/er")).expect("mkdir");
    for i in 0..20 {
        let mut text = Vec::new();
        for line in 0..200 {
            text.extend_from_slice(format!("line {line} of note {i}: ").as_bytes());
            text.extend_from_slice(MARKER);
            text.push(b'\n');
        }
        std::fs::write(root.join(format!("docs/note-{i}.txt")), text).expect("write");
    }
    std::fs::write(root.join(format!("docs/deep/{NAME_MARKER}.txt")), b"x").expect("write");
    let big = noise(1, 3 << 20);
    std::fs::write(root.join("big.bin"), &big).expect("write");
    std::fs::write(root.join("docs/deep/er/big-copy.bin"), &big).expect("write");
    std::fs::write(root.join("empty"), b"").expect("write");
    std::os::unix::fs::symlink("docs/note-1.txt", root.join("link")).expect("symlink");
}

/// `bitdust backup PATH --wait --json`, asserted to succeed; its result.
pub fn backup(home: &Path, path: &Path) -> serde_json::Value {
    let out = bitdust(
        home,
        &["backup", path.to_str().expect("utf-8"), "--wait", "--json"],
    );
    assert!(
        out.status.success(),
        "backup failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON result")
}

/// Every fragment file a supplier holds for `customer`: (block hex, position).
pub fn held(supplier: &Path, customer: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let root = supplier.join("store").join(customer);
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return out;
    };
    for dir in dirs.flatten() {
        for file in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = file.file_name().to_string_lossy().to_string();
            if let Some((block, position)) = name.split_once('.')
                && let Ok(position) = position.parse::<u32>()
            {
                out.push((block.to_string(), position));
            }
        }
    }
    out
}

/// Data and catalog fragments across all suppliers: block -> position -> suppliers holding it.
pub fn placement(c: &Cluster) -> BTreeMap<String, BTreeMap<u32, Vec<usize>>> {
    let recovery = hex::encode(RECOVERY_BLOCK);
    let mut blocks: BTreeMap<String, BTreeMap<u32, Vec<usize>>> = BTreeMap::new();
    for (s, home) in c.homes.iter().enumerate().skip(1) {
        for (block, position) in held(home, &c.ids[0]) {
            if block != recovery {
                blocks
                    .entry(block)
                    .or_default()
                    .entry(position)
                    .or_default()
                    .push(s);
            }
        }
    }
    blocks
}

/// Each block's six fragments are on six different suppliers, one per position.
pub fn assert_spread(blocks: &BTreeMap<String, BTreeMap<u32, Vec<usize>>>) {
    for (block, positions) in blocks {
        assert_eq!(
            positions.keys().copied().collect::<Vec<_>>(),
            (0..6).collect::<Vec<u32>>(),
            "block {block}: positions {positions:?}"
        );
        let suppliers: BTreeSet<usize> = positions.values().flatten().copied().collect();
        assert_eq!(
            suppliers.len(),
            6,
            "block {block}: fragments on {suppliers:?}"
        );
    }
}

pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The block ids in the owner's block index (the owner must be stopped).
pub fn catalog_blocks(owner: &Path) -> BTreeSet<String> {
    let store = bitdust::store::RocksStore::open(&owner.join("db")).expect("open the owner's db");
    catalog::blocks(&store)
        .map(|b| hex::encode(b.expect("readable block").id.0))
        .collect()
}

pub fn restore(home: &Path, args: &[&str]) -> (bool, serde_json::Value) {
    let mut all = vec!["restore"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--wait", "--json"]);
    let out = bitdust(home, &all);
    let result = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON result: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.success(), result)
}

/// Every entry under `a` is under `b` with the same kind, bytes, permissions, mtime and link
/// target (and nothing more under `b`).
pub fn assert_same_tree(a: &Path, b: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    let list = |root: &Path| -> BTreeSet<PathBuf> {
        let mut out = BTreeSet::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
                let p = e.path();
                if e.file_type().expect("type").is_dir() {
                    dirs.push(p.clone());
                }
                out.insert(p.strip_prefix(root).expect("under root").to_path_buf());
            }
        }
        out
    };
    let (left, right) = (list(a), list(b));
    assert_eq!(left, right, "the same entries");
    for rel in &left {
        let (x, y) = (a.join(rel), b.join(rel));
        let (mx, my) = (
            std::fs::symlink_metadata(&x).expect("meta"),
            std::fs::symlink_metadata(&y).expect("meta"),
        );
        assert_eq!(mx.file_type(), my.file_type(), "{}", rel.display());
        if mx.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&x).expect("link"),
                std::fs::read_link(&y).expect("link")
            );
            continue;
        }
        assert_eq!(mx.mode() & 0o7777, my.mode() & 0o7777, "{}", rel.display());
        assert_eq!(
            (mx.mtime(), mx.mtime_nsec()),
            (my.mtime(), my.mtime_nsec()),
            "mtime of {}",
            rel.display()
        );
        if mx.is_file() {
            assert!(
                std::fs::read(&x).expect("read") == std::fs::read(&y).expect("read"),
                "contents of {}",
                rel.display()
            );
        }
    }
}

/// A supplier that lies: each fragment file it holds is changed and its own index made to
/// agree, so it serves the wrong bytes as good ones. Returns how many it now lies about.
pub fn make_supplier_lie(supplier: &Path, customer: &str) -> usize {
    let fragments: Vec<(String, u32)> = held(supplier, customer)
        .into_iter()
        .filter(|(b, _)| *b != hex::encode(RECOVERY_BLOCK))
        .collect();
    let store = bitdust::store::RocksStore::open(&supplier.join("db")).expect("supplier db");
    for (block, position) in &fragments {
        forge(supplier, &store, customer, block, *position);
    }
    fragments.len()
}

pub fn forge(
    supplier: &Path,
    store: &bitdust::store::RocksStore,
    customer: &str,
    block: &str,
    position: u32,
) {
    use bitdust::store::codec::{self, records::FragmentEntry};
    use bitdust::store::{Cf, KvStore};
    let file = supplier
        .join("store")
        .join(customer)
        .join(&block[..2])
        .join(format!("{block}.{position}"));
    let mut bytes = std::fs::read(&file).expect("fragment");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&file, &bytes).expect("write");
    let mut key = b"f/".to_vec();
    key.extend_from_slice(&hex::decode(customer).expect("hex"));
    key.extend_from_slice(&hex::decode(block).expect("hex"));
    key.extend_from_slice(&position.to_be_bytes());
    let entry = FragmentEntry {
        size: bytes.len() as u64,
        blake3: blake3::hash(&bytes).as_bytes().to_vec(),
    };
    store
        .put(Cf::SupplierIndex, &key, &codec::encode(&entry))
        .expect("rewrite the index");
}
