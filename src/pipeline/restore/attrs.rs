//! An entry's metadata on disk: owner (H3), mode, extended attributes and ACLs, mtime, always
//! through a descriptor or relative to a held directory, in this order:
//! 1. owner, when the process is root and the entry has one (chown clears setuid bits and
//!    file capabilities, so it comes first);
//! 2. mode, without setuid/setgid unless the owner was restored;
//! 3. extended attributes, ACLs included (setting the mode rewrites an ACL's mask, so the ACL
//!    comes after it; `security.capability` after the chown that would clear it);
//! 4. mtime, last.
//!
//! What cannot be restored for a reason that is not the entry's (not root, a namespace the
//! file system or the process may not set) is not an entry failure: it is counted per kind
//! and said once in the report's `not_restored`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use rustix::fs::{
    AtFlags, Gid, Mode, Timespec, Timestamps, UTIME_OMIT, Uid, XattrFlags, chmodat, chownat,
    fchmod, fchown, fsetxattr, futimens, lsetxattr, setxattr, utimensat,
};
use rustix::io::Errno;

use super::{EntryError, NotRestored, Privileges, Unrestorable, XattrNamespace};
use crate::pipeline::owners;
use crate::store::catalog::{FileEntry, Owner};

/// The bits a file keeps only when restored with its owner.
const SET_ID: u32 = 0o6000;

/// Applies owners, modes, attributes and times; remembers what could not be restored.
pub(super) struct Attrs {
    privileges: Privileges,
    users: HashMap<Vec<u8>, Option<u32>>,
    groups: HashMap<Vec<u8>, Option<u32>>,
    /// Per kind: how many, and the first reason.
    lost: BTreeMap<Unrestorable, (u64, String)>,
}

impl Attrs {
    pub(super) fn new(privileges: Privileges) -> Self {
        Attrs {
            privileges,
            users: HashMap::new(),
            groups: HashMap::new(),
            lost: BTreeMap::new(),
        }
    }

    pub(super) fn privileges(&self) -> Privileges {
        self.privileges
    }

    /// Counts one thing not restored; the first reason given is the one reported.
    pub(super) fn lose(&mut self, what: Unrestorable, why: impl FnOnce() -> String) {
        let slot = self.lost.entry(what).or_insert_with(|| (0, why()));
        slot.0 += 1;
    }

    /// Adds what another thread's `Attrs` could not restore.
    pub(super) fn absorb(&mut self, other: Attrs) {
        for (what, (count, why)) in other.lost {
            self.lost.entry(what).or_insert((0, why)).0 += count;
        }
    }

    pub(super) fn not_restored(&self) -> Vec<NotRestored> {
        self.lost
            .iter()
            .map(|(what, (count, why))| NotRestored {
                what: *what,
                count: *count,
                why: why.clone(),
            })
            .collect()
    }

    /// The ids to give `owner` here: the recorded user and group names where this host knows
    /// them (as tar does), else the recorded numbers.
    fn ids(&mut self, owner: &Owner) -> (Uid, Gid) {
        let uid = named(&mut self.users, &owner.user, owners::user_id).unwrap_or(owner.uid);
        let gid = named(&mut self.groups, &owner.group, owners::group_id).unwrap_or(owner.gid);
        (Uid::from_raw(uid), Gid::from_raw(gid))
    }

    /// Gives the entry its recorded owner through `chown` when that is possible; whether it now
    /// has it (only then may it keep setuid/setgid bits).
    fn own(
        &mut self,
        entry: &FileEntry,
        chown: impl FnOnce(Uid, Gid) -> Result<(), Errno>,
    ) -> bool {
        let Some(owner) = &entry.owner else {
            return false;
        };
        if !self.privileges.root {
            if (owner.uid, owner.gid) != (self.privileges.uid, self.privileges.gid) {
                self.lose(Unrestorable::Ownership, || {
                    "not running as root: entries belong to the user who restores".into()
                });
            }
            return false;
        }
        let (uid, gid) = self.ids(owner);
        match chown(uid, gid) {
            Ok(()) => true,
            Err(e) => {
                self.lose(Unrestorable::Ownership, || format!("chown: {e}"));
                false
            }
        }
    }

    /// The mode to set: setuid/setgid only on an entry restored with its owner.
    fn mode(&mut self, entry: &FileEntry, owned: bool) -> Mode {
        let mut mode = entry.mode & 0o7777;
        if !owned && mode & SET_ID != 0 {
            mode &= !SET_ID;
            self.lose(Unrestorable::SetIdBits, || {
                "dropped from entries not restored with their owner".into()
            });
        }
        Mode::from_raw_mode(mode)
    }

    /// Owner, mode, attributes and mtime of a file or directory open as `fd`.
    pub(super) fn on_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        entry: &FileEntry,
    ) -> Result<(), EntryError> {
        let owned = self.own(entry, |u, g| fchown(fd, Some(u), Some(g)));
        let mode = self.mode(entry, owned);
        fchmod(fd, mode).map_err(|e| EntryError::errno("setting the mode", e))?;
        for (name, value) in &entry.xattrs {
            let set = fsetxattr(fd, name.as_slice(), value, XattrFlags::empty());
            self.xattr(name, set);
        }
        futimens(fd, &times(entry.mtime_ns)).map_err(|e| EntryError::errno("setting the mtime", e))
    }

    /// Owner, attributes and mtime of the symlink `name` in `dir` (a link has no mode of its
    /// own), none of them following it.
    pub(super) fn on_link(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        entry: &FileEntry,
    ) -> Result<(), EntryError> {
        self.own(entry, |u, g| {
            chownat(dir, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)
        });
        if !entry.xattrs.is_empty() {
            // No fd-based call sets a link's attributes: name it through the held directory.
            let path = crate::pipeline::proc_path(dir, name);
            for (key, value) in &entry.xattrs {
                let set = lsetxattr(path.as_slice(), key.as_slice(), value, XattrFlags::empty());
                self.xattr(key, set);
            }
        }
        utimensat(dir, name, &times(entry.mtime_ns), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| EntryError::errno("setting the link's mtime", e))
    }

    /// Owner, mode, attributes and mtime of a FIFO or device node held by an `O_PATH` descriptor
    /// (opening the node itself could block or touch a device). The mode, attributes and times
    /// go through `/proc/self/fd`, which names the very node held.
    pub(super) fn on_node(
        &mut self,
        node: BorrowedFd<'_>,
        entry: &FileEntry,
    ) -> Result<(), EntryError> {
        let owned = self.own(entry, |u, g| {
            chownat(node, "", Some(u), Some(g), AtFlags::EMPTY_PATH)
        });
        let mode = self.mode(entry, owned);
        let path = format!("/proc/self/fd/{}", node.as_fd().as_raw_fd());
        chmodat(rustix::fs::CWD, path.as_str(), mode, AtFlags::empty())
            .map_err(|e| EntryError::errno("setting the mode", e))?;
        for (name, value) in &entry.xattrs {
            let set = setxattr(path.as_str(), name.as_slice(), value, XattrFlags::empty());
            self.xattr(name, set);
        }
        utimensat(
            rustix::fs::CWD,
            path.as_str(),
            &times(entry.mtime_ns),
            AtFlags::empty(),
        )
        .map_err(|e| EntryError::errno("setting the mtime", e))
    }

    fn xattr(&mut self, name: &[u8], set: Result<(), Errno>) {
        if let Err(e) = set {
            self.lose(Unrestorable::Xattrs(XattrNamespace::of(name)), || {
                format!("the target refused them: {e}")
            });
        }
    }
}

fn times(mtime_ns: i64) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
        },
    }
}

/// A cached name lookup; `None` for an empty name or one this host does not know.
fn named(
    cache: &mut HashMap<Vec<u8>, Option<u32>>,
    name: &[u8],
    lookup: fn(&CString) -> Option<u32>,
) -> Option<u32> {
    if name.is_empty() {
        return None;
    }
    *cache
        .entry(name.to_vec())
        .or_insert_with(|| CString::new(name).ok().as_ref().and_then(lookup))
}
