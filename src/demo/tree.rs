//! The demo's own check of a restore: walks the source and the restored tree (never following a
//! symlink) and compares every entry — kind, every byte of every file, permission bits, file
//! modification times to the nanosecond, symlink targets — and reports each difference by path.
//! Directory modification times are reported as notes, not failures: many restorers leave them
//! as the restore wrote them.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File {
        size: u64,
    },
    Dir,
    Symlink {
        target: OsString,
    },
    /// A fifo, socket or device: neither backed up nor compared.
    Other,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub mtime_ns: i128,
}

/// A tree by relative path (the root itself excluded).
#[derive(Debug, Default)]
pub struct Tree {
    pub entries: BTreeMap<PathBuf, Entry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub other: u64,
    pub bytes: u64,
}

impl Tree {
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for entry in self.entries.values() {
            match &entry.kind {
                Kind::File { size } => {
                    s.files += 1;
                    s.bytes += size;
                }
                Kind::Dir => s.dirs += 1,
                Kind::Symlink { .. } => s.symlinks += 1,
                Kind::Other => s.other += 1,
            }
        }
        s
    }

    /// The names directly under the root.
    pub fn top_level(&self) -> Vec<&PathBuf> {
        self.entries
            .keys()
            .filter(|p| p.components().count() == 1)
            .collect()
    }
}

/// A walk or a read failed.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct TreeError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |source| TreeError {
        path: path.to_path_buf(),
        source,
    }
}

fn entry_of(path: &Path, meta: &fs::Metadata) -> Result<Entry, TreeError> {
    let t = meta.file_type();
    let kind = if t.is_file() {
        Kind::File { size: meta.len() }
    } else if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Symlink {
            target: fs::read_link(path).map_err(at(path))?.into_os_string(),
        }
    } else {
        Kind::Other
    };
    Ok(Entry {
        kind,
        mode: meta.permissions().mode() & 0o7777,
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    })
}

/// Every entry under `root`, symlinks not followed.
pub fn scan(root: &Path) -> Result<Tree, TreeError> {
    let mut tree = Tree::default();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for item in fs::read_dir(&dir).map_err(at(&dir))? {
            let item = item.map_err(at(&dir))?;
            let path = item.path();
            let meta = fs::symlink_metadata(&path).map_err(at(&path))?;
            let entry = entry_of(&path, &meta)?;
            if entry.kind == Kind::Dir {
                dirs.push(path.clone());
            }
            let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            tree.entries.insert(rel, entry);
        }
    }
    Ok(tree)
}

/// One difference between the source and the restored tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub path: String,
    pub what: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Comparison {
    /// Source entries compared (files, directories, symlinks).
    pub entries: u64,
    /// File bytes compared one by one.
    pub bytes: u64,
    /// What makes the restore wrong.
    pub mismatches: Vec<Difference>,
    /// What differs without making it wrong (directory times).
    pub notes: Vec<Difference>,
}

impl Comparison {
    pub fn matched(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Compares the restored tree at `restored` with the source at `source`.
pub fn compare(source: &Path, restored: &Path) -> Result<Comparison, TreeError> {
    let want = scan(source)?;
    let got = scan(restored)?;
    let mut out = Comparison::default();
    let differ = |list: &mut Vec<Difference>, path: &Path, what: String| {
        list.push(Difference {
            path: path.display().to_string(),
            what,
        });
    };
    for (path, w) in &want.entries {
        if w.kind == Kind::Other {
            continue; // not something a backup holds
        }
        out.entries += 1;
        let Some(g) = got.entries.get(path) else {
            differ(&mut out.mismatches, path, "missing".into());
            continue;
        };
        match (&w.kind, &g.kind) {
            (Kind::File { size: ws }, Kind::File { size: gs }) => {
                if ws != gs {
                    differ(
                        &mut out.mismatches,
                        path,
                        format!("size {gs}, expected {ws}"),
                    );
                } else {
                    out.bytes += ws;
                    if let Some(offset) =
                        first_difference(&source.join(path), &restored.join(path))?
                    {
                        differ(
                            &mut out.mismatches,
                            path,
                            format!("bytes differ from offset {offset}"),
                        );
                    }
                }
                if w.mtime_ns != g.mtime_ns {
                    differ(
                        &mut out.mismatches,
                        path,
                        format!("mtime {} ns, expected {} ns", g.mtime_ns, w.mtime_ns),
                    );
                }
            }
            (Kind::Dir, Kind::Dir) => {
                if w.mtime_ns != g.mtime_ns {
                    differ(
                        &mut out.notes,
                        path,
                        format!(
                            "directory mtime {} ns, source {} ns",
                            g.mtime_ns, w.mtime_ns
                        ),
                    );
                }
            }
            (Kind::Symlink { target: wt }, Kind::Symlink { target: gt }) => {
                if wt != gt {
                    differ(
                        &mut out.mismatches,
                        path,
                        format!(
                            "symlink to {}, expected {}",
                            gt.to_string_lossy(),
                            wt.to_string_lossy()
                        ),
                    );
                }
                continue; // a symlink's own mode and time mean nothing on Linux
            }
            (w, g) => {
                differ(
                    &mut out.mismatches,
                    path,
                    format!("a {}, expected a {}", kind_name(g), kind_name(w)),
                );
                continue;
            }
        }
        if w.mode != g.mode {
            differ(
                &mut out.mismatches,
                path,
                format!("mode {:o}, expected {:o}", g.mode, w.mode),
            );
        }
    }
    for path in got.entries.keys() {
        if !want.entries.contains_key(path) {
            differ(&mut out.mismatches, path, "not in the source".into());
        }
    }
    Ok(out)
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::File { .. } => "file",
        Kind::Dir => "directory",
        Kind::Symlink { .. } => "symlink",
        Kind::Other => "special file",
    }
}

/// The offset of the first byte where two files of the same size differ, if any.
fn first_difference(a: &Path, b: &Path) -> Result<Option<u64>, TreeError> {
    let mut fa = File::open(a).map_err(at(a))?;
    let mut fb = File::open(b).map_err(at(b))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(at(a))?;
        let nb = read_full(&mut fb, &mut bb).map_err(at(b))?;
        if let Some(i) = ba[..na.min(nb)]
            .iter()
            .zip(&bb[..na.min(nb)])
            .position(|(x, y)| x != y)
        {
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + na.min(nb) as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += na as u64;
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Where a restore into `to` put the tree of `source`: `to` itself, `to/<source's absolute
/// path>` or `to/<source's name>`, whichever holds the same top-level names as the source (`to`
/// when none does, so the comparison names what is missing).
pub fn locate_restored(to: &Path, source: &Path, source_tree: &Tree) -> PathBuf {
    let want: Vec<&PathBuf> = source_tree.top_level();
    let relative = source.strip_prefix("/").unwrap_or(source);
    let mut candidates = vec![to.to_path_buf(), to.join(relative)];
    if let Some(name) = source.file_name() {
        candidates.push(to.join(name));
    }
    for candidate in &candidates {
        if let Ok(tree) = scan_top(candidate)
            && tree
                == want
                    .iter()
                    .map(|p| p.as_os_str().to_owned())
                    .collect::<Vec<_>>()
        {
            return candidate.clone();
        }
    }
    to.to_path_buf()
}

/// The sorted names directly under `dir`.
fn scan_top(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names: Vec<OsString> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::FileTimes;
    use std::os::unix::fs::symlink;
    use std::time::{Duration, SystemTime};

    fn set_mtime(path: &Path, secs: u64, nanos: u32) {
        let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
        File::options()
            .write(true)
            .open(path)
            .expect("open")
            .set_times(FileTimes::new().set_modified(t))
            .expect("set mtime");
    }

    /// A small tree with a file, a nested file, an empty file and a symlink.
    fn tree(root: &Path) {
        fs::create_dir_all(root.join("d/e")).expect("mkdir");
        fs::write(root.join("a.txt"), vec![7u8; 200_000]).expect("write");
        fs::write(root.join("d/e/b.bin"), b"bee").expect("write");
        fs::write(root.join("empty"), b"").expect("write");
        symlink("d/e/b.bin", root.join("link")).expect("symlink");
        for (p, s) in [("a.txt", 1_600_000_000), ("d/e/b.bin", 1_600_000_001)] {
            set_mtime(&root.join(p), s, 123_456_789);
        }
        set_mtime(&root.join("empty"), 1_600_000_002, 0);
        for (d, secs) in [("d/e", 1_600_000_003), ("d", 1_600_000_004)] {
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            File::open(root.join(d))
                .expect("open dir")
                .set_times(FileTimes::new().set_modified(t))
                .expect("set dir mtime");
        }
    }

    fn pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("src"), dir.path().join("out"));
        tree(&a);
        tree(&b);
        (dir, a, b)
    }

    fn whats(c: &Comparison) -> Vec<String> {
        c.mismatches
            .iter()
            .map(|d| format!("{}: {}", d.path, d.what))
            .collect()
    }

    #[test]
    fn identical_trees_match() {
        let (_d, a, b) = pair();
        let c = compare(&a, &b).expect("compare");
        assert!(c.matched(), "{:?}", whats(&c));
        assert_eq!(c.entries, 6, "3 files (one empty), 1 symlink, 2 dirs");
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        assert_eq!(c.bytes, 200_003);
        assert_eq!(scan(&a).expect("scan").summary().symlinks, 1);
    }

    #[test]
    fn one_changed_byte_is_found_at_its_offset() {
        let (_d, a, b) = pair();
        let mut bytes = vec![7u8; 200_000];
        bytes[150_001] = 8;
        fs::write(b.join("a.txt"), bytes).expect("write");
        set_mtime(&b.join("a.txt"), 1_600_000_000, 123_456_789);
        let c = compare(&a, &b).expect("compare");
        assert_eq!(whats(&c), ["a.txt: bytes differ from offset 150001"]);
    }

    #[test]
    fn size_mode_mtime_and_symlink_differences_are_each_named() {
        let (_d, a, b) = pair();
        fs::write(b.join("d/e/b.bin"), b"be").expect("write");
        set_mtime(&b.join("d/e/b.bin"), 1_600_000_001, 123_456_789);
        fs::set_permissions(b.join("empty"), fs::Permissions::from_mode(0o600)).expect("chmod");
        set_mtime(&b.join("a.txt"), 1_600_000_000, 0); // the nanoseconds lost
        fs::remove_file(b.join("link")).expect("rm");
        symlink("elsewhere", b.join("link")).expect("symlink");
        let c = compare(&a, &b).expect("compare");
        let w = whats(&c);
        assert!(
            w.contains(&"d/e/b.bin: size 2, expected 3".to_string()),
            "{w:?}"
        );
        assert!(w.iter().any(|m| m.starts_with("empty: mode 600")), "{w:?}");
        assert!(
            w.iter()
                .any(|m| m.starts_with("a.txt: mtime 1600000000000000000 ns")),
            "{w:?}"
        );
        assert!(
            w.contains(&"link: symlink to elsewhere, expected d/e/b.bin".to_string()),
            "{w:?}"
        );
        assert_eq!(w.len(), 4, "{w:?}");
    }

    #[test]
    fn missing_extra_and_retyped_entries_fail() {
        let (_d, a, b) = pair();
        fs::remove_file(b.join("empty")).expect("rm");
        fs::write(b.join("stray.tmp"), b"x").expect("write");
        fs::remove_file(b.join("link")).expect("rm");
        fs::write(b.join("link"), b"d/e/b.bin").expect("write");
        let c = compare(&a, &b).expect("compare");
        let w = whats(&c);
        assert!(w.contains(&"empty: missing".to_string()), "{w:?}");
        assert!(
            w.contains(&"stray.tmp: not in the source".to_string()),
            "{w:?}"
        );
        assert!(
            w.contains(&"link: a file, expected a symlink".to_string()),
            "{w:?}"
        );
    }

    #[test]
    fn directory_times_are_notes_not_failures() {
        let (_d, a, b) = pair();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
        File::open(b.join("d"))
            .expect("open dir")
            .set_times(FileTimes::new().set_modified(t))
            .expect("set");
        let c = compare(&a, &b).expect("compare");
        assert!(c.matched(), "{:?}", whats(&c));
        assert_eq!(c.notes.len(), 1, "{:?}", c.notes);
        assert_eq!(c.notes[0].path, "d");
    }

    #[test]
    fn the_restored_root_is_found_in_each_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("data");
        tree(&source);
        let source_tree = scan(&source).expect("scan");
        // The tree straight in --to.
        let flat = dir.path().join("flat");
        tree(&flat);
        assert_eq!(locate_restored(&flat, &source, &source_tree), flat);
        // Under the source's absolute path.
        let full = dir.path().join("full");
        let nested = full.join(source.strip_prefix("/").expect("absolute"));
        tree(&nested);
        assert_eq!(locate_restored(&full, &source, &source_tree), nested);
        // Under the source's name.
        let named = dir.path().join("named");
        tree(&named.join("data"));
        assert_eq!(
            locate_restored(&named, &source, &source_tree),
            named.join("data")
        );
        // Nothing there: `to` itself, so the comparison says what is missing.
        let empty = dir.path().join("empty");
        assert_eq!(locate_restored(&empty, &source, &source_tree), empty);
    }
}
