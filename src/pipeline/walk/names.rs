//! User and group names by number, as the backed-up host knows them (recorded beside the
//! numbers, so a restore on another host can map by name, as tar and restic do).

use std::collections::HashMap;
use std::ffi::CStr;

/// Names looked up once per number (a tree has few owners and many entries).
#[derive(Default)]
pub(super) struct Names {
    users: HashMap<u32, Vec<u8>>,
    groups: HashMap<u32, Vec<u8>>,
}

impl Names {
    /// The user's name, empty if this host has none for `uid`.
    pub fn user(&mut self, uid: u32) -> Vec<u8> {
        self.users
            .entry(uid)
            .or_insert_with(|| user_name(uid))
            .clone()
    }

    /// The group's name, empty if this host has none for `gid`.
    pub fn group(&mut self, gid: u32) -> Vec<u8> {
        self.groups
            .entry(gid)
            .or_insert_with(|| group_name(gid))
            .clone()
    }
}

/// Buffer for one passwd or group record; grown on ERANGE up to this bound.
const START: usize = 1024;
const MOST: usize = 1 << 20;

fn user_name(uid: u32) -> Vec<u8> {
    let mut buf = vec![0 as libc::c_char; START];
    loop {
        // SAFETY: zeroed plain C struct, filled by getpwuid_r.
        let mut record: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: valid pointers to a record, a buffer of `buf.len()` bytes and a result slot,
        // all living across the call; the name read after points into `buf`.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut record, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc == libc::ERANGE && buf.len() < MOST {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || found.is_null() || record.pw_name.is_null() {
            return Vec::new();
        }
        // SAFETY: getpwuid_r succeeded: pw_name is a NUL-terminated string inside `buf`.
        return unsafe { CStr::from_ptr(record.pw_name) }
            .to_bytes()
            .to_vec();
    }
}

fn group_name(gid: u32) -> Vec<u8> {
    let mut buf = vec![0 as libc::c_char; START];
    loop {
        // SAFETY: zeroed plain C struct, filled by getgrgid_r.
        let mut record: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `user_name`.
        let rc =
            unsafe { libc::getgrgid_r(gid, &mut record, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc == libc::ERANGE && buf.len() < MOST {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || found.is_null() || record.gr_name.is_null() {
            return Vec::new();
        }
        // SAFETY: getgrgid_r succeeded: gr_name is a NUL-terminated string inside `buf`.
        return unsafe { CStr::from_ptr(record.gr_name) }
            .to_bytes()
            .to_vec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_a_name_and_an_unused_id_has_none() {
        let mut names = Names::default();
        assert_eq!(names.user(0), b"root");
        assert_eq!(names.group(0), b"root");
        assert!(names.user(4_000_000_000).is_empty());
        assert!(names.group(4_000_000_000).is_empty());
    }
}
