//! A snapshot's tree read from the store in the walker's order, without holding it: a
//! directory, its other entries by name, then its subdirectories by name, depth first (the
//! order the backup packed the chunks in, so a restore reading in it goes through the blocks
//! in order). What is held is the directories still to visit along the current path, and one
//! page of keys.
//!
//! Keys of one snapshot sort by path bytes, which is not that order (`a-b` < `a/x` < `a0`): a
//! directory's direct children are listed by a scan of its `dir/` prefix that jumps over each
//! child's subtree (a seek past `child/`), and each subtree is read when its turn comes.
//!
//! Only entries reachable that way come out: an entry whose parent directory is not in the
//! snapshot, whose path has an empty component, or that lies below a file, is not (a catalog
//! made by a backup has none; a damaged or altered one may). [`unreachable`] finds them, for a restore to handle
//! rather than drop in silence.

use std::collections::HashSet;

use super::{CF, FileEntry, FileKind, SnapshotId, decode_file, file, snapshot_prefix};
use crate::store::{KeyValue, KvStore, StoreError};

/// The first page after a jump is small (most of a big one would be inside the next subtree);
/// pages grow while no jump comes.
const FIRST_PAGE: usize = 16;
const MAX_PAGE: usize = 1024;

/// The directory whose direct children are being listed.
struct Listing {
    /// The key prefix of its children (`snapshot` + `dir/`; the snapshot's own for the root).
    children: Vec<u8>,
    /// The key to go on from.
    from: Vec<u8>,
    /// No key at or after `from` is left.
    exhausted: bool,
    /// Its subdirectories found so far, in name order.
    subdirs: Vec<FileEntry>,
}

/// The entries of a snapshot (or of one subtree) in the walker's order; see the module.
pub struct TreeWalk<'a> {
    kv: &'a dyn KvStore,
    prefix: Vec<u8>,
    /// Entries to visit, the next on top: a visit yields the entry and, for a directory, lists
    /// its children.
    todo: Vec<FileEntry>,
    listing: Option<Listing>,
    rows: std::vec::IntoIter<KeyValue>,
    page: usize,
    /// Some entry was passed over: under no directory entry, with an empty name, or below a
    /// file (see [`TreeWalk::irregular`]).
    irregular: bool,
}

impl<'a> TreeWalk<'a> {
    /// The whole snapshot, from its root (whose entry is yielded first if it has one).
    pub fn whole(kv: &'a dyn KvStore, snapshot: SnapshotId) -> Result<Self, StoreError> {
        let mut walk = TreeWalk::new(kv, snapshot, Vec::new());
        match file(kv, snapshot, b"")? {
            Some(root) => walk.todo.push(root),
            // No root entry: its children are listed all the same.
            None => walk.listing = Some(walk.listing_of(b"")),
        }
        Ok(walk)
    }

    /// `top` and, if it is a directory, everything below it.
    pub fn under(kv: &'a dyn KvStore, snapshot: SnapshotId, top: FileEntry) -> Self {
        TreeWalk::new(kv, snapshot, vec![top])
    }

    fn new(kv: &'a dyn KvStore, snapshot: SnapshotId, todo: Vec<FileEntry>) -> Self {
        TreeWalk {
            kv,
            prefix: snapshot_prefix(snapshot),
            todo,
            listing: None,
            rows: Vec::new().into_iter(),
            page: FIRST_PAGE,
            irregular: false,
        }
    }

    /// Whether the walk so far passed over entries it does not yield (the catalog was damaged
    /// or altered: [`unreachable`] finds them). Once the walk is done, `false` means it yielded
    /// every entry of its scope.
    pub fn irregular(&self) -> bool {
        self.irregular
    }

    /// Whether anything is stored below the entry at `path`, which is not a directory.
    fn below_a_file(&self, path: &[u8]) -> Result<bool, StoreError> {
        let mut below = self.prefix.clone();
        below.extend_from_slice(path);
        if path.is_empty() {
            // The root: any key but its own.
            return Ok(self.kv.scan(CF, &below, None, 2)?.len() > 1);
        }
        below.push(b'/');
        Ok(!self.kv.scan(CF, &below, None, 1)?.is_empty())
    }

    fn listing_of(&self, dir: &[u8]) -> Listing {
        let mut children = self.prefix.clone();
        if !dir.is_empty() {
            children.extend_from_slice(dir);
            children.push(b'/');
        }
        Listing {
            from: children.clone(),
            children,
            exhausted: false,
            subdirs: Vec::new(),
        }
    }

    /// The next row of the listing's scan, reading a page when needed (`None`: listed).
    fn next_row(&mut self) -> Result<Option<KeyValue>, StoreError> {
        loop {
            if let Some(row) = self.rows.next() {
                return Ok(Some(row));
            }
            let Some(listing) = &mut self.listing else {
                return Ok(None);
            };
            if listing.exhausted {
                return Ok(None);
            }
            let page = self
                .kv
                .scan(CF, &listing.children, Some(&listing.from), self.page)?;
            listing.exhausted = page.len() < self.page;
            if let Some((last, _)) = page.last() {
                listing.from = last.clone();
                listing.from.push(0);
            }
            self.page = (self.page * 2).min(MAX_PAGE);
            self.rows = page.into_iter();
        }
    }
}

impl Iterator for TreeWalk<'_> {
    type Item = Result<FileEntry, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.listing.is_none() {
                let entry = self.todo.pop()?;
                if entry.kind == FileKind::Dir {
                    self.listing = Some(self.listing_of(&entry.path));
                } else {
                    // Only a top (or the root) can be a file here: subdirectories are dirs.
                    match self.below_a_file(&entry.path) {
                        Ok(below) => self.irregular |= below,
                        Err(e) => return Some(Err(e)),
                    }
                }
                return Some(Ok(entry));
            }
            let (key, value) = match self.next_row() {
                Ok(Some(row)) => row,
                Ok(None) => {
                    // Listed: its subdirectories are visited next, the first name first.
                    if let Some(done) = self.listing.take() {
                        self.todo.extend(done.subdirs.into_iter().rev());
                    }
                    continue;
                }
                Err(e) => return Some(Err(e)),
            };
            let Some(listing) = &mut self.listing else {
                continue;
            };
            let Some(name) = key.get(listing.children.len()..) else {
                continue;
            };
            if name.is_empty() {
                // The root's own key (its children's prefix is the snapshot's).
                continue;
            }
            if let Some(slash) = name.iter().position(|b| *b == b'/') {
                // Inside a child's subtree: jump past it (`/` + 1 is `0`); it is read on its
                // own turn, if the child is a directory (listed just before: a name sorts
                // before the names it prefixes).
                let child = &name[..slash];
                let base = listing.children.len() - self.prefix.len();
                let listed = listing
                    .subdirs
                    .iter()
                    .rev()
                    .map(|d| d.path.get(base..).unwrap_or_default())
                    .take_while(|n| n.starts_with(child))
                    .any(|n| n == child);
                self.irregular |= child.is_empty() || !listed;
                let mut from = key[..listing.children.len() + slash].to_vec();
                from.push(b'/' + 1);
                listing.from = from;
                listing.exhausted = false;
                self.rows = Vec::new().into_iter();
                self.page = FIRST_PAGE;
                continue;
            }
            let path = &key[self.prefix.len()..];
            match decode_file(path, &value) {
                Ok(entry) if entry.kind == FileKind::Dir => listing.subdirs.push(entry),
                Ok(entry) => return Some(Ok(entry)),
                Err(e) => super::warn_skipped("file", &e),
            }
        }
    }
}

/// The entries of the scope (the whole snapshot, or `top` and below) that a [`TreeWalk`] does
/// not reach, in path order: under no directory of the snapshot, with an empty name, or below
/// a file. One pass in key order (a parent sorts before its children), holding the reachable
/// directories' paths: meant for when a walk was [`TreeWalk::irregular`] (a catalog made by a
/// backup has none).
pub fn unreachable(
    kv: &dyn KvStore,
    snapshot: SnapshotId,
    top: Option<&[u8]>,
) -> Result<Vec<FileEntry>, StoreError> {
    let mut reached: HashSet<Vec<u8>> = HashSet::new();
    if top.is_none() {
        // The root's children are listed even without a root entry (not under a file).
        reached.insert(Vec::new());
    }
    let mut lost = Vec::new();
    for entry in super::Records::new(
        kv,
        &super::file_key(snapshot, top.unwrap_or_default()),
        super::parse_file,
        "file",
    ) {
        let entry = entry?;
        if !in_scope(&entry.path, top) {
            continue;
        }
        let is_top = entry.path == top.unwrap_or_default();
        let parent = entry
            .path
            .iter()
            .rposition(|b| *b == b'/')
            .map_or(&b""[..], |i| &entry.path[..i]);
        let named = entry.path.last() != Some(&b'/');
        if is_top || (named && reached.contains(parent)) {
            if entry.kind == FileKind::Dir {
                reached.insert(entry.path);
            } else if is_top {
                reached.remove(&entry.path);
            }
        } else {
            lost.push(entry);
        }
    }
    Ok(lost)
}

/// `path` is `top` or below it (everything is, without a top).
fn in_scope(path: &[u8], top: Option<&[u8]>) -> bool {
    top.is_none_or(|top| {
        path.starts_with(top) && (path.len() == top.len() || path[top.len()] == b'/')
    })
}
