//! The demo's sample data when no `--data` is given: a small tree of the kinds a real home
//! directory holds — text (compresses), random binaries (does not), duplicates (deduplicated),
//! one larger file (several blocks), nested and empty directories, an empty file, symlinks (to a
//! file, to a directory, dangling), unusual modes — with fixed modification times. The same
//! bytes every run (a seeded xorshift), so two runs' figures compare.

use std::fs::{self, File, FileTimes};
use std::io;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The larger file's size in the default sample.
pub const LARGE: usize = 20 << 20;

/// Deterministic pseudo-random bytes: incompressible, different for every seed.
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

const WORDS: &[&str] = &[
    "friend", "backup", "block", "parity", "restore", "supplier", "owner", "fragment", "node",
    "key", "network", "loopback", "the", "a", "of", "and", "every", "byte", "home", "server",
];

/// Readable text of about `len` bytes: lines of words picked by a seeded generator.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let picks = noise(seed, len / 3 + 16);
    let mut out = Vec::with_capacity(len + 16);
    let mut line = 0;
    for (i, p) in picks.iter().enumerate() {
        if out.len() >= len {
            break;
        }
        if i % 12 == 0 {
            line += 1;
            out.extend_from_slice(format!("\n{line:04}:").as_bytes());
        }
        out.push(b' ');
        out.extend_from_slice(WORDS[usize::from(*p) % WORDS.len()].as_bytes());
    }
    out.push(b'\n');
    out
}

/// 2021-01-01T00:00:00Z plus `hours`: whole seconds, the same every run.
fn when(hours: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_609_459_200 + hours * 3600)
}

fn write(root: &Path, rel: &str, bytes: &[u8], mode: u32, hours: u64) -> io::Result<()> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&path, bytes)?;
    let file = File::options().write(true).open(&path)?;
    file.set_times(FileTimes::new().set_modified(when(hours)))?;
    drop(file);
    // Last: a read-only mode would forbid opening it for the time change.
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
}

/// Writes the sample under `root` (which must not exist yet or be empty), with a larger file of
/// `large` bytes.
pub fn generate(root: &Path, large: usize) -> io::Result<()> {
    fs::create_dir_all(root)?;
    let mut hour = 0;
    let mut next = || {
        hour += 1;
        hour
    };
    // Text of many sizes, two directories deep.
    for i in 0..24u64 {
        let dir = ["docs", "docs/notes", "docs/notes/2021"][(i % 3) as usize];
        let len = 512 + (i as usize * 7919) % (48 << 10);
        write(
            root,
            &format!("{dir}/note-{i:02}.txt"),
            &text(i, len),
            0o644,
            next(),
        )?;
    }
    write(root, "docs/README.md", &text(99, 3000), 0o644, next())?;
    // Random binaries, then copies of some under other names (stored once).
    let sizes = [96 << 10, 300 << 10, 700 << 10, 1 << 20, 1536 << 10, 2 << 20];
    for (i, size) in sizes.iter().enumerate() {
        let bytes = noise(1000 + i as u64, *size);
        write(root, &format!("bin/blob-{i}.dat"), &bytes, 0o644, next())?;
        if i % 2 == 1 {
            write(
                root,
                &format!("copies/blob-{i}.copy"),
                &bytes,
                0o644,
                next(),
            )?;
        }
    }
    write(
        root,
        "copies/note-03.txt",
        &text(3, 512 + 3 * 7919),
        0o644,
        next(),
    )?;
    // The larger file: several blocks.
    write(root, "media/large.bin", &noise(7, large), 0o644, next())?;
    // Modes that must come back: a script, a private and a read-only file.
    write(
        root,
        "bin/run.sh",
        b"#!/bin/sh\necho 'restored by bitdust'\n",
        0o755,
        next(),
    )?;
    write(root, "private/secret.txt", &text(42, 900), 0o600, next())?;
    write(root, "docs/frozen.txt", &text(43, 1200), 0o444, next())?;
    write(root, "empty.txt", b"", 0o644, next())?;
    fs::create_dir_all(root.join("empty-dir"))?;
    fs::create_dir_all(root.join("a/b/c/d"))?;
    write(
        root,
        "a/b/c/d/deep.txt",
        b"five levels down\n",
        0o644,
        next(),
    )?;
    // Symlinks: to a file, to a directory (not followed by the backup), and dangling.
    fs::create_dir_all(root.join("links"))?;
    symlink("../docs/README.md", root.join("links/readme"))?;
    symlink("../docs/notes", root.join("links/notes"))?;
    symlink("nowhere/at-all", root.join("links/dangling"))?;
    // Directory times last, deepest first: creating entries above changed them.
    let mut dirs = Vec::new();
    collect_dirs(root, &mut dirs)?;
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in dirs {
        File::open(&dir)?.set_times(FileTimes::new().set_modified(when(next())))?;
    }
    Ok(())
}

fn collect_dirs(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.push(entry.path());
            collect_dirs(&entry.path(), out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::tree;

    #[test]
    fn the_sample_is_the_same_every_run_and_has_every_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        generate(&a, 3 << 20).expect("first");
        generate(&b, 3 << 20).expect("second");
        let same = tree::compare(&a, &b).expect("compare");
        assert!(same.mismatches.is_empty(), "{:?}", same.mismatches);
        assert!(same.notes.is_empty(), "{:?}", same.notes);

        let summary = tree::scan(&a).expect("scan").summary();
        assert_eq!(summary.symlinks, 3);
        assert!(summary.files >= 30, "{summary:?}");
        assert!(summary.dirs >= 10, "{summary:?}");
        let meta = |rel: &str| fs::symlink_metadata(a.join(rel)).expect(rel);
        assert_eq!(meta("media/large.bin").len(), 3 << 20);
        assert_eq!(meta("empty.txt").len(), 0);
        assert_eq!(meta("bin/run.sh").permissions().mode() & 0o7777, 0o755);
        assert_eq!(meta("docs/frozen.txt").permissions().mode() & 0o7777, 0o444);
        assert_eq!(
            fs::read(a.join("bin/blob-3.dat")).expect("read"),
            fs::read(a.join("copies/blob-3.copy")).expect("read"),
            "duplicates"
        );
        // Fixed times (2021), not the clock's: the two runs' trees compared equal above.
        let mtime = meta("empty.txt").modified().expect("mtime");
        assert!(mtime > when(0) && mtime < when(24 * 365), "{mtime:?}");
        // Text compresses, noise does not: the sample exercises both.
        let txt = fs::read(a.join("docs/README.md")).expect("read");
        assert!(txt.iter().all(|b| b.is_ascii()));
        assert_ne!(noise(1, 64), noise(2, 64));
    }
}
