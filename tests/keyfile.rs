//! The recovery key file through the binary: `bitdust export-key` on the old home, `bitdust
//! recover` into a new one; refusals leave nothing behind.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;

/// Runs the binary with `$BITDUST_PASSPHRASE` set to `passphrase`, or unset. Stdin is not a
/// terminal, so the binary never prompts.
fn bitdust_pass(home: &Path, args: &[&str], passphrase: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--home")
        .arg(home)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("BITDUST_PASSPHRASE")
        .stdin(Stdio::null());
    if let Some(p) = passphrase {
        cmd.env("BITDUST_PASSPHRASE", p);
    }
    cmd.output().expect("bitdust runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const KEY_FILES: [&str; 3] = ["keys/signing.key", "keys/noise.key", "keys/master.key"];

/// An initialised home (alice) with its key file exported under `passphrase`, and a friend (bob).
struct Setup {
    dir: tempfile::TempDir,
    alice: std::path::PathBuf,
    alice_id: String,
    bob_card: String,
    bob_id: String,
    key: std::path::PathBuf,
}

fn setup(passphrase: Option<&str>) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = dir.path().join("alice");
    let bob = dir.path().join("bob");
    let alice_id = init(&alice, "alice");
    let bob_id = init(&bob, "bob");
    let bob_card = card(&bob);
    let key = dir.path().join("alice.key");
    let key_arg = key.to_str().expect("utf-8");
    let args: &[&str] = match passphrase {
        Some(_) => &["export-key", "--out", key_arg],
        None => &["export-key", "--out", key_arg, "--no-passphrase"],
    };
    let out = bitdust_pass(&alice, args, passphrase);
    assert!(out.status.success(), "export-key: {}", stderr(&out));
    assert_eq!(stdout(&out), alice_id);
    Setup {
        dir,
        alice,
        alice_id,
        bob_card,
        bob_id,
        key,
    }
}

fn recover(s: &Setup, new: &Path, key: &Path, passphrase: Option<&str>) -> Output {
    bitdust_pass(
        new,
        &[
            "recover",
            "--key",
            key.to_str().expect("utf-8"),
            "--peer",
            &s.bob_card,
            "--listen",
            "127.0.0.1:7999",
        ],
        passphrase,
    )
}

#[test]
fn export_then_recover_gives_the_same_node() {
    let s = setup(Some("correct horse battery"));
    let mode = fs::metadata(&s.key).expect("key file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = fs::read_to_string(&s.key).expect("armoured text");
    assert!(text.contains("-----BEGIN BITDUST RECOVERY KEY-----"));
    assert!(text.contains(&s.alice_id));

    let new = s.dir.path().join("new-machine");
    let out = recover(&s, &new, &s.key, Some("correct horse battery"));
    assert!(out.status.success(), "recover: {}", stderr(&out));
    assert_eq!(stdout(&out), s.alice_id);
    assert!(stderr(&out).contains("bitdust run"), "{}", stderr(&out));
    assert!(stderr(&out).contains(&s.bob_id), "{}", stderr(&out));

    // Same identity, byte for byte (the card is the signed identity), and the same secrets.
    assert_eq!(id_json(&new)["node_id"], s.alice_id.as_str());
    assert_eq!(card(&new), card(&s.alice));
    for rel in KEY_FILES {
        assert_eq!(
            fs::read(new.join(rel)).expect("new key"),
            fs::read(s.alice.join(rel)).expect("old key"),
            "{rel}"
        );
        let mode = fs::metadata(new.join(rel))
            .expect("key")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{rel}");
    }
    let config = fs::read_to_string(new.join("config.toml")).expect("config");
    assert!(config.contains("listen = \"127.0.0.1:7999\""), "{config}");
    // The friend is in the peer book and the node is told whom to ask for its recovery record.
    assert_eq!(
        fs::read_to_string(new.join("recover.pending")).expect("marker"),
        s.bob_id
    );
    let store = bitdust::store::RocksStore::open(&new.join("db")).expect("db");
    let peers = bitdust::store::peers::load(&store).expect("peers");
    let ids: Vec<String> = peers.iter().map(|(i, _)| i.node_id().to_string()).collect();
    assert_eq!(ids, vec![s.bob_id.as_str()]);
}

#[test]
fn unprotected_export_warns_and_recovers_without_a_passphrase() {
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = dir.path().join("alice");
    init(&alice, "alice");
    let key = dir.path().join("alice.key");
    // Unset, and no terminal: refused, nothing written, unless asked for in so many words.
    let out = bitdust_pass(
        &alice,
        &["export-key", "--out", key.to_str().expect("utf-8")],
        None,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--no-passphrase"), "{}", stderr(&out));
    assert!(!key.exists(), "nothing may be written without a passphrase");
    // Too short a passphrase: refused, nothing written.
    let out = bitdust_pass(
        &alice,
        &["export-key", "--out", key.to_str().expect("utf-8")],
        Some("short"),
    );
    assert!(stderr(&out).contains("too short"), "{}", stderr(&out));
    assert!(
        !key.exists(),
        "nothing may be written under a short passphrase"
    );
    let out = bitdust_pass(
        &alice,
        &[
            "export-key",
            "--out",
            key.to_str().expect("utf-8"),
            "--no-passphrase",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("NOT protected"), "{}", stderr(&out));
    let bob = dir.path().join("bob");
    init(&bob, "bob");
    let new = dir.path().join("new");
    let out = bitdust_pass(
        &new,
        &[
            "recover",
            "--key",
            key.to_str().expect("utf-8"),
            "--peer",
            &card(&bob),
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(card(&new), card(&alice));
}

#[test]
fn wrong_or_missing_passphrase_creates_nothing() {
    let s = setup(Some("the right passphrase"));
    let new = s.dir.path().join("new");
    let out = recover(&s, &new, &s.key, Some("the wrong passphrase"));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("wrong passphrase"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert!(!new.exists(), "nothing may be created");

    let out = recover(&s, &new, &s.key, None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("protected by a passphrase"),
        "{}",
        stderr(&out)
    );
    assert!(!new.exists());
}

#[test]
fn damaged_key_files_are_refused_clearly() {
    let s = setup(Some("a long passphrase"));
    let text = fs::read_to_string(&s.key).expect("key");
    let new = s.dir.path().join("new");

    // One base64 character changed inside the armour (a different but valid character), on the
    // second line: past the magic and version, which have errors of their own.
    let begin = text.find("-----BEGIN").expect("begin");
    let first = begin + text[begin..].find('\n').expect("line") + 1;
    let at = first + text[first..].find('\n').expect("line") + 11;
    let mut flipped = text.clone().into_bytes();
    flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
    // Half the file (no END line), and the binary cut short behind intact armour lines.
    let half = text.as_bytes()[..text.len() / 2].to_vec();
    let lines: Vec<&str> = text.lines().collect();
    let end = lines.len() - 1;
    let short = [&lines[..end - 2], &lines[end..]].concat().join("\n");

    for (what, bytes) in [
        ("flipped", flipped),
        ("half", half),
        ("short", short.into_bytes()),
    ] {
        let bad = s.dir.path().join(format!("{what}.key"));
        fs::write(&bad, bytes).expect("write");
        let out = recover(&s, &new, &bad, Some("a long passphrase"));
        assert!(!out.status.success(), "{what}");
        let err = stderr(&out);
        assert!(err.contains("damaged"), "{what}: {err}");
        assert!(!err.contains("wrong passphrase"), "{what}: {err}");
        assert!(!new.exists(), "{what}: nothing may be created");
    }

    let other = s.dir.path().join("notes.txt");
    fs::write(&other, "shopping list\n").expect("write");
    let out = recover(&s, &new, &other, Some("a long passphrase"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a bitdust recovery key file"),
        "{}",
        stderr(&out)
    );
    assert!(!new.exists());
}

#[test]
fn recover_refuses_an_initialised_home() {
    let s = setup(Some("a long passphrase"));
    let carol = s.dir.path().join("carol");
    let carol_id = init(&carol, "carol");
    let before: Vec<Vec<u8>> = KEY_FILES
        .iter()
        .map(|r| fs::read(carol.join(r)).expect("key"))
        .collect();
    let out = recover(&s, &carol, &s.key, Some("a long passphrase"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already a bitdust home"),
        "{}",
        stderr(&out)
    );
    let after: Vec<Vec<u8>> = KEY_FILES
        .iter()
        .map(|r| fs::read(carol.join(r)).expect("key"))
        .collect();
    assert_eq!(before, after);
    assert_eq!(id_json(&carol)["node_id"], carol_id.as_str());
    assert!(!carol.join("recover.pending").exists());
}

#[test]
fn export_refuses_to_overwrite() {
    let s = setup(Some("a long passphrase"));
    let existing = s.dir.path().join("precious.txt");
    fs::write(&existing, "keep me").expect("write");
    let out = bitdust_pass(
        &s.alice,
        &["export-key", "--out", existing.to_str().expect("utf-8")],
        Some("a long passphrase"),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert_eq!(fs::read_to_string(&existing).expect("read"), "keep me");
    // The key file written by setup is not replaced by a second export either.
    let before = fs::read(&s.key).expect("key");
    let out = bitdust_pass(
        &s.alice,
        &["export-key", "--out", s.key.to_str().expect("utf-8")],
        Some("a long passphrase"),
    );
    assert!(!out.status.success());
    assert_eq!(fs::read(&s.key).expect("key"), before);
}
