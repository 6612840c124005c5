//! The writer's directories as held descriptors (security review H4): every directory of the
//! current path is open, each opened with `O_DIRECTORY | O_NOFOLLOW` relative to its parent's
//! descriptor, and every create, rename and metadata call is relative to one of them. A
//! directory swapped for a symlink after it was opened cannot redirect anything, and a path
//! longer than `PATH_MAX` works (no call ever sees more than one component).
//!
//! Only the current path is held (the plan is in path order): a tree of 43k directories needs
//! at most its depth in descriptors, plus what the staged files of a batch keep.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, mkdirat, openat, statat, unlinkat};
use rustix::io::Errno;

use super::{EntryError, lossy};

/// Opens the directory `name` in `parent` without following a symlink.
pub(super) fn open_dir(parent: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd, Errno> {
    openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// `lstat` of `name` in `dir`: `None` if there is nothing by that name.
pub(super) fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<Option<Stat>, EntryError> {
    match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(EntryError::errno("checking", e)),
    }
}

pub(super) fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Removes a temporary name a killed run left in `dir` (a file, link or node: never followed).
pub(super) fn remove_stale(dir: BorrowedFd<'_>, temp: &[u8]) -> Result<(), EntryError> {
    match lstat_at(dir, temp)? {
        Some(st) if file_type(&st) == FileType::Directory => Err(EntryError::Entry(
            "a directory holds the temporary name".into(),
        )),
        Some(_) => unlinkat(dir, temp, AtFlags::empty())
            .map_err(|e| EntryError::errno("removing a stale temporary file", e)),
        None => Ok(()),
    }
}

/// The open directories along the current path, below the target's root.
pub(super) struct DirStack {
    root: Arc<OwnedFd>,
    /// From the root's child down.
    held: Vec<Held>,
}

struct Held {
    name: Vec<u8>,
    fd: Arc<OwnedFd>,
    /// Made by this run (private, 0700): nothing is in it that the run did not put there.
    fresh: bool,
}

impl DirStack {
    pub(super) fn new(root: Arc<OwnedFd>) -> Self {
        DirStack {
            root,
            held: Vec::new(),
        }
    }

    pub(super) fn root(&self) -> &Arc<OwnedFd> {
        &self.root
    }

    /// The directory at `parts` (relative to the root), reusing what is held along the way and
    /// opening the rest one component at a time relative to its parent. With `create`, a missing
    /// component is made (private, 0700: a catalog whose directory record was unreadable still
    /// restores the files below it). A component that is not a directory (a symlink, a file)
    /// fails the entry.
    pub(super) fn at(&mut self, parts: &[&[u8]], create: bool) -> Result<Arc<OwnedFd>, EntryError> {
        let common = self
            .held
            .iter()
            .zip(parts)
            .take_while(|(held, part)| held.name.as_slice() == **part)
            .count();
        self.held.truncate(common);
        for (i, part) in parts.iter().enumerate().skip(common) {
            let parent = self.top();
            let mut fresh = false;
            let opened = match open_dir(parent.as_fd(), part) {
                Err(Errno::NOENT) if create => {
                    // mkdirat never follows a symlink at its last component: one that appeared
                    // makes it fail with EEXIST, and the open below refuses it.
                    match mkdirat(parent.as_fd(), *part, Mode::from_raw_mode(0o700)) {
                        Ok(()) => {
                            fresh = true;
                            open_dir(parent.as_fd(), part)
                        }
                        Err(Errno::EXIST) => open_dir(parent.as_fd(), part),
                        Err(e) => Err(e),
                    }
                }
                other => other,
            };
            match opened {
                Ok(fd) => self.push(part, Arc::new(fd), fresh),
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(EntryError::Entry(format!(
                        "parent {:?} is not a directory (a symlink or a file)",
                        lossy(&parts[..=i].join(&b'/'))
                    )));
                }
                Err(e) => {
                    return Err(EntryError::errno(
                        &format!("opening parent {:?}", lossy(&parts[..=i].join(&b'/'))),
                        e,
                    ));
                }
            }
        }
        Ok(self.top())
    }

    /// A directory just made (`fresh`) or opened in the directory [`DirStack::at`] returned
    /// last.
    pub(super) fn push(&mut self, name: &[u8], fd: Arc<OwnedFd>, fresh: bool) {
        self.held.push(Held {
            name: name.to_vec(),
            fd,
            fresh,
        });
    }

    /// Whether the directory [`DirStack::at`] returned last was made by this run: a name in
    /// it needs no check for what is already there.
    pub(super) fn top_is_fresh(&self) -> bool {
        self.held.last().is_some_and(|h| h.fresh)
    }

    fn top(&self) -> Arc<OwnedFd> {
        self.held
            .last()
            .map_or_else(|| self.root.clone(), |h| h.fd.clone())
    }
}
