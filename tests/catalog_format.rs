//! A catalog written by the release before format 2 (tests/fixtures/catalog-format-1, made by
//! that release's own backup code: the patch that made it is beside it) is imported, upgraded in
//! place and restored with everything it recorded.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use bitdust::pipeline::restore::{self, BlockError, RestoreCounters, RestoreTarget};
use bitdust::store::MemStore;
use bitdust::store::catalog::{self, FileKind, SnapshotId};

const T0: i64 = 1_600_000_000_123_456_789;

fn fixture() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/catalog-format-1"
    ))
}

#[test]
fn a_format_1_catalog_is_upgraded_in_place_and_restores() {
    let kv = Arc::new(MemStore::new());
    assert_eq!(
        catalog::format(&*kv).expect("format"),
        1,
        "no format record: format 1"
    );
    let export = std::fs::read(fixture().join("catalog.export")).expect("fixture");
    catalog::import(&*kv, &export).expect("a format-1 export imports");
    assert_eq!(
        catalog::format(&*kv).expect("format"),
        1,
        "imported as it was"
    );
    // What the node does when it opens its database.
    assert_eq!(catalog::upgrade(&*kv).expect("upgrade"), 1);
    assert_eq!(catalog::format(&*kv).expect("format"), catalog::FORMAT);
    assert_eq!(
        catalog::upgrade(&*kv).expect("again"),
        catalog::FORMAT,
        "idempotent"
    );

    let snapshots = catalog::snapshots(&*kv).expect("snapshots");
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0].source, "fixture");
    let entries: Vec<_> = catalog::files(&*kv, SnapshotId(1))
        .collect::<Result<_, _>>()
        .expect("every format-1 record reads");
    assert_eq!(entries.len(), 10);
    assert!(
        entries
            .iter()
            .all(|e| e.owner.is_none() && e.xattrs.is_empty() && e.holes.is_empty()),
        "format 1 recorded no owner, attributes or holes"
    );

    let plan = restore::plan(kv.clone(), SnapshotId(1), None).expect("plan");
    let dir = tempfile::tempdir().expect("tempdir");
    let target = RestoreTarget::new(dir.path().join("out"), false);
    let mut get_block = |id: bitdust::data::BlockId| {
        std::fs::read(fixture().join("blocks").join(hex::encode(id.0)))
            .map(Arc::new)
            .map_err(|_| BlockError::TooFewFragments)
    };
    let report = restore::restore_files(
        &plan,
        &target,
        &mut get_block,
        4,
        &RestoreCounters::default(),
    )
    .expect("restores");
    assert!(report.failed.is_empty(), "{:?}", report.failed);

    let out = &target.root;
    let read = |p: &[u8]| std::fs::read(out.join(std::ffi::OsStr::from_bytes(p))).expect("file");
    let mut expected: BTreeMap<&[u8], &[u8]> = BTreeMap::new();
    expected.insert(b"notes.txt", b"a note kept by format 1\n");
    expected.insert(b"docs/report.md", b"# Report\nbody\n");
    expected.insert(b"docs/dup.md", b"# Report\nbody\n");
    expected.insert(b"empty", b"");
    expected.insert(b"docs/private/key", b"secret-ish");
    expected.insert(b"caf\xe9", b"latin-1 name");
    for (path, content) in &expected {
        assert_eq!(read(path), *content, "{}", String::from_utf8_lossy(path));
    }
    let meta = |p: &str| std::fs::symlink_metadata(out.join(p)).expect("restored");
    assert_eq!(meta("docs/private").permissions().mode() & 0o7777, 0o700);
    assert_eq!(
        meta("docs/private/key").permissions().mode() & 0o7777,
        0o600
    );
    let mtime = |p: &str| {
        let m = meta(p);
        m.mtime() * 1_000_000_000 + m.mtime_nsec()
    };
    assert_eq!(mtime("notes.txt"), T0 + 1_000_000_007);
    assert_eq!(mtime("docs"), T0 + 7 * 1_000_000_007);
    assert_eq!(
        std::fs::read_link(out.join("link")).expect("link"),
        Path::new("docs/report.md")
    );
    let kinds: Vec<FileKind> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == FileKind::Dir).count(), 3);
}
