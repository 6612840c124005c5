//! Users and groups by number and by name, as this host knows them: the backup records the names
//! beside the numbers, a restore as root maps a recorded name back to this host's number.

use std::ffi::{CStr, CString};

/// The user's name, empty if this host has none for `uid`.
pub(crate) fn user_name(uid: u32) -> Vec<u8> {
    // SAFETY: `passwd` is plain data; all-zero is a valid value to be filled in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut name = Vec::new();
    with_buffer(|buf| {
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: a struct and a buffer that outlive the call, and the buffer's true length;
        // `result` is set to `&pwd` or null.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == 0 && !result.is_null() && !pwd.pw_name.is_null() {
            // SAFETY: the lookup succeeded: pw_name is a NUL-terminated string inside `buf`,
            // copied out before the buffer goes.
            name = unsafe { CStr::from_ptr(pwd.pw_name) }.to_bytes().to_vec();
        }
        (rc, !result.is_null())
    });
    name
}

/// The group's name, empty if this host has none for `gid`.
pub(crate) fn group_name(gid: u32) -> Vec<u8> {
    // SAFETY: `group` is plain data; all-zero is a valid value to be filled in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut name = Vec::new();
    with_buffer(|buf| {
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `user_name`.
        let rc = unsafe {
            libc::getgrgid_r(
                gid,
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == 0 && !result.is_null() && !grp.gr_name.is_null() {
            // SAFETY: as in `user_name`.
            name = unsafe { CStr::from_ptr(grp.gr_name) }.to_bytes().to_vec();
        }
        (rc, !result.is_null())
    });
    name
}

/// Calls a `get*_r` lookup until its buffer is large enough (up to 1 MiB).
fn with_buffer(mut call: impl FnMut(&mut [u8]) -> (libc::c_int, bool)) -> bool {
    let mut buf = vec![0u8; 1024];
    loop {
        let (rc, found) = call(&mut buf);
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        return rc == 0 && found;
    }
}

pub(crate) fn user_id(name: &CString) -> Option<u32> {
    // SAFETY: `passwd` is plain data; all-zero is a valid value to be filled in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let found = with_buffer(|buf| {
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: a NUL-terminated name, a struct and a buffer that outlive the call, and the
        // buffer's true length; `result` is set to `&pwd` or null.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        (rc, !result.is_null())
    });
    found.then_some(pwd.pw_uid)
}

pub(crate) fn group_id(name: &CString) -> Option<u32> {
    // SAFETY: `group` is plain data; all-zero is a valid value to be filled in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let found = with_buffer(|buf| {
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `user_id`.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        (rc, !result.is_null())
    });
    found.then_some(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_maps_both_ways_and_an_unused_id_has_no_name() {
        assert_eq!(user_name(0), b"root");
        assert_eq!(group_name(0), b"root");
        assert!(user_name(4_000_000_000).is_empty());
        assert!(group_name(4_000_000_000).is_empty());
        let root = CString::new("root").expect("no NUL");
        assert_eq!((user_id(&root), group_id(&root)), (Some(0), Some(0)));
    }
}
