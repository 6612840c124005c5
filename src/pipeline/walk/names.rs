//! User and group names by number, cached for the walk (a tree has few owners and many entries).

use std::collections::HashMap;

use crate::pipeline::owners;

/// Names looked up once per number.
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
            .or_insert_with(|| owners::user_name(uid))
            .clone()
    }

    /// The group's name, empty if this host has none for `gid`.
    pub fn group(&mut self, gid: u32) -> Vec<u8> {
        self.groups
            .entry(gid)
            .or_insert_with(|| owners::group_name(gid))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_looked_up_once_per_number() {
        let mut names = Names::default();
        assert_eq!(names.user(0), b"root");
        assert_eq!(names.group(0), b"root");
        assert_eq!((names.users.len(), names.groups.len()), (1, 1));
        assert_eq!(names.user(0), b"root");
        assert_eq!(names.users.len(), 1);
    }
}
