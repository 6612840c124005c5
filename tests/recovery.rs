//! Recovery that only moves forward (issue 18, H2), with real nodes through the CLI: a new
//! machine recovering through a friend that holds an old recovery record still ends with the
//! newest version, and afterwards no supplier holds a lower revision than the newest.

mod common;

use std::path::{Path, PathBuf};

use bitdust::actors::backup_job::RECOVERY_BLOCK;
use common::tree::*;
use common::*;

/// The binary with `$BITDUST_PASSPHRASE` set (stdin not a terminal: it never prompts).
fn bitdust_with_passphrase(home: &Path, args: &[&str], passphrase: &str) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("RUST_LOG")
        .env("BITDUST_PASSPHRASE", passphrase)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("bitdust runs")
}

/// The recovery record `supplier` holds for `customer`, as stored.
fn record_file(supplier: &Path, customer: &str) -> PathBuf {
    let block = hex::encode(RECOVERY_BLOCK);
    supplier
        .join("store")
        .join(customer)
        .join(&block[..2])
        .join(format!("{block}.{}", u32::MAX))
}

/// The revision in the clear, signed header of the record `supplier` holds (PROTOCOL.md 8.5),
/// or `None` when it holds none or one without a revision in its header.
fn held_revision(supplier: &Path, customer: &str) -> Option<u64> {
    let bytes = std::fs::read(record_file(supplier, customer)).ok()?;
    if bytes.len() < 13 || &bytes[..4] != b"BDRR" || bytes[4] != 2 {
        return None;
    }
    Some(u64::from_be_bytes(bytes[5..13].try_into().ok()?))
}

fn versions(home: &Path) -> usize {
    let list = bitdust(home, &["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&list.stderr)));
    list["versions"].as_array().map_or(0, Vec::len)
}

#[test]
fn a_recovery_through_a_friend_with_an_old_record_ends_with_the_newest_version() {
    let c = star(6);
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());
    backup(&c.homes[0], source.path());
    let keys = tempfile::tempdir().expect("tempdir");
    let key_file = keys.path().join("owner.key");
    let out = bitdust_with_passphrase(
        &c.homes[0],
        &["export-key", "--out", key_file.to_str().expect("utf-8")],
        "correct horse",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = held_revision(&c.homes[1], &c.ids[0]).expect("a record on supplier 1");

    // Supplier 1 is away while the second version is made: it keeps the first record.
    nodes[1].signal(libc::SIGTERM);
    nodes[1].wait_exit();
    std::fs::write(source.path().join("docs/new-in-v2.txt"), b"second version").expect("write");
    let second = backup(&c.homes[0], source.path());
    assert_eq!(second["outcome"], "committed", "{second:#}");
    let newest = held_revision(&c.homes[2], &c.ids[0]).expect("a record on supplier 2");
    assert!(newest > first, "{newest} after {first}");
    assert_eq!(held_revision(&c.homes[1], &c.ids[0]), Some(first));

    // The old machine is gone; supplier 1 comes back holding the old record.
    nodes[0].signal(libc::SIGKILL);
    nodes[0].wait_exit();
    nodes[1] = Node::start(&c.homes[1]);
    nodes[1].wait_running();

    // The new machine knows only supplier 1.
    let fresh = tempfile::tempdir().expect("tempdir");
    let new_home = fresh.path().join("owner-again");
    let listen = format!("127.0.0.1:{}", free_port());
    let out = bitdust_with_passphrase(
        &new_home,
        &[
            "recover",
            "--key",
            key_file.to_str().expect("utf-8"),
            "--peer",
            &card(&c.homes[1]),
            "--listen",
            &listen,
        ],
        "correct horse",
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    // `recover` names the version it found, with its date.
    assert!(
        said.contains(&format!(
            "the newest catalog found is revision {newest} of 20"
        )),
        "{said}"
    );
    let mut owner = Node::start(&new_home);
    let recovered = owner.wait_log("the catalog recovered", |v| {
        v["message"] == "recovered the catalog; resuming the suppliers"
    });
    assert_eq!(
        recovered["revision"].as_u64(),
        Some(newest),
        "recovered from the newest record: {recovered}"
    );
    owner.wait_running();
    assert_eq!(versions(&new_home), 2, "the newest version is listed");
    // No supplier holds a lower revision than the newest any more.
    for home in &c.homes[1..] {
        let held = held_revision(home, &c.ids[0]);
        assert!(
            held.is_some_and(|r| r >= newest),
            "{} holds {held:?}, the newest is {newest}",
            home.display()
        );
    }
    wait_all_connected(&new_home, 60);
    let to = fresh.path().join("restored");
    let (ok, r) = restore(&new_home, &["--to", to.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    assert_same_tree(source.path(), &to);

    // The recovered node builds on the catalog's stored tree segments: its next backup uploads
    // the new version's changes and the head, not every tree again.
    std::fs::write(source.path().join("docs/new-in-v3.txt"), b"third version").expect("write");
    let third = backup(&new_home, source.path());
    assert_eq!(third["outcome"], "committed", "{third:#}");
    let stored = owner.wait_log("the third catalog stored", |v| {
        v["message"] == "catalog and recovery record stored"
    });
    let (total, uploaded) = (
        stored["catalog_bytes"].as_u64().expect("bytes"),
        stored["catalog_uploaded_bytes"].as_u64().expect("bytes"),
    );
    assert!(uploaded < total, "the stored segments were kept: {stored}");
    let to = fresh.path().join("restored-3");
    let (ok, r) = restore(&new_home, &["--to", to.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    assert_same_tree(source.path(), &to);
}
