//! The monitor and the rebuilder between real nodes on loopback: suppliers lost for good are
//! replaced and their fragments rebuilt elsewhere; fragments corrupted, deleted or replaced by
//! their hashes on a supplier's disk are caught by storage audits and rebuilt.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use bitdust::actors::backup_job::RECOVERY_BLOCK;
use common::tree::*;
use common::*;

/// Fast rounds and firing for tests (the defaults are 10 min and 6 h).
fn fast(fire_after: &str, failed_audits: &str) -> Vec<(&'static str, String)> {
    vec![
        ("BITDUST_MONITOR__INTERVAL", "1s".into()),
        ("BITDUST_MONITOR__FIRE_AFTER", fire_after.into()),
        (
            "BITDUST_MONITOR__FIRE_AFTER_FAILED_AUDITS",
            failed_audits.into(),
        ),
        ("BITDUST_MONITOR__AUDITS_PER_ROUND", "200".into()),
        ("BITDUST_BACKUP__BLOCK_SIZE", "256KiB".into()),
    ]
}

fn start(home: &Path, env: &[(&'static str, String)]) -> Node {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Node::start_with(home, &env)
}

fn health(home: &Path) -> serde_json::Value {
    try_status(home)
        .map(|s| s["health"].clone())
        .unwrap_or_default()
}

/// Every followed block has all `k + m` good fragments reachable, and nothing is being rebuilt.
fn fully_redundant(h: &serde_json::Value) -> bool {
    let m = h["m"].as_u64().unwrap_or(0);
    let Some(by) = h["by_redundancy"].as_object() else {
        return false;
    };
    h["blocks"].as_u64().unwrap_or(0) > 0
        && by.keys().all(|k| *k == m.to_string())
        && h["rebuild"]["in_flight"].as_u64() == Some(0)
        && h["rebuild_queued"].as_u64() == Some(0)
}

/// One cluster at a time: four clusters of 7 to 9 nodes at once on 2 cores make every
/// deadline a coin toss.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn home_of(c: &Cluster, id: &str) -> usize {
    c.ids.iter().position(|i| i == id).expect("a cluster node")
}

#[test]
fn two_suppliers_lost_for_good_are_replaced_and_rebuilt_and_the_restore_survives_two_more() {
    let _serial = one_at_a_time();
    let c = star(8);
    let env = fast("3s", "3");
    let mut nodes: Vec<Option<Node>> = c.homes.iter().map(|h| Some(start(h, &env))).collect();
    let hired = wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());
    backup(&c.homes[0], source.path());
    wait_for("full redundancy after the backup", 60, || {
        fully_redundant(&health(&c.homes[0])).then_some(())
    });

    // Positions 0 and 1 lose their suppliers for good.
    let lost: Vec<usize> = hired[..2].iter().map(|id| home_of(&c, id)).collect();
    for &i in &lost {
        nodes[i].take().expect("running").signal(libc::SIGKILL);
    }
    let rebuilt = wait_for("both positions re-hired and rebuilt", 120, || {
        let h = health(&c.homes[0]);
        let now = wait_positions(&c.homes[0])?;
        let replaced = now.len() == 6 && !now.iter().any(|s| hired[..2].contains(s));
        (replaced && h["fired"].as_array().is_some_and(|f| f.len() >= 2) && fully_redundant(&h))
            .then_some((h, now))
    });
    let (h, now) = rebuilt;
    let fired = h["fired"].as_array().expect("fired");
    assert!(
        fired
            .iter()
            .all(|f| f[1].as_str().is_some_and(|r| r.contains("unreachable"))),
        "{fired:?}"
    );
    assert_eq!(
        now[2..],
        hired[2..],
        "the other positions kept their suppliers"
    );
    // The replacements hold their positions' fragments on disk.
    for (position, id) in now[..2].iter().enumerate() {
        let held = held(&c.homes[home_of(&c, id)], &c.ids[0]);
        let at_position = held
            .iter()
            .filter(|(b, p)| *p == position as u32 && *b != hex::encode(RECOVERY_BLOCK))
            .count();
        assert!(
            at_position as u64 >= h["blocks"].as_u64().expect("blocks"),
            "position {position}: {at_position} fragments on the replacement"
        );
    }

    // Two more of the original suppliers go: the 4 left (2 rebuilt) restore everything.
    for id in &hired[2..4] {
        nodes[home_of(&c, id)]
            .take()
            .expect("running")
            .signal(libc::SIGKILL);
    }
    let out = tempfile::tempdir().expect("tempdir");
    let to = out.path().join("r");
    let (ok, r) = restore(&c.homes[0], &["--to", to.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    assert_same_tree(source.path(), &to);
}

/// The hired suppliers by position, once all are connected (None until then).
fn wait_positions(home: &Path) -> Option<Vec<String>> {
    let p = positions(home)?;
    let connected: Vec<String> = p
        .iter()
        .filter_map(|(s, c)| (c == "Connected").then_some(s.clone()).flatten())
        .collect();
    (connected.len() == p.len()).then_some(connected)
}

/// The fragment file a supplier keeps for `customer`.
fn fragment_file(
    supplier: &Path,
    customer: &str,
    block: &str,
    position: u32,
) -> std::path::PathBuf {
    supplier
        .join("store")
        .join(customer)
        .join(&block[..2])
        .join(format!("{block}.{position}"))
}

#[test]
fn corrupted_deleted_and_hash_only_fragments_fail_audits_and_are_rebuilt() {
    let _serial = one_at_a_time();
    let c = star(6);
    // Never fired here: the fragments are rebuilt on the same suppliers.
    let env = fast("1h", "1000000");
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| start(h, &env)).collect();
    let hired = wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());
    backup(&c.homes[0], source.path());
    wait_for("full redundancy after the backup", 60, || {
        fully_redundant(&health(&c.homes[0])).then_some(())
    });
    let owner = &c.ids[0];
    let recovery = hex::encode(RECOVERY_BLOCK);
    let data_of = |home: &Path| -> Vec<(String, u32)> {
        held(home, owner)
            .into_iter()
            .filter(|(b, _)| *b != recovery)
            .collect()
    };

    // Supplier A: one fragment's bytes rot, another fragment file is deleted.
    let a = &c.homes[home_of(&c, &hired[0])];
    let a_frags = data_of(a);
    assert!(a_frags.len() >= 2, "{a_frags:?}");
    let mut originals: BTreeMap<std::path::PathBuf, Vec<u8>> = BTreeMap::new();
    let rotten = fragment_file(a, owner, &a_frags[0].0, a_frags[0].1);
    let deleted = fragment_file(a, owner, &a_frags[1].0, a_frags[1].1);
    for f in [&rotten, &deleted] {
        originals.insert(f.clone(), std::fs::read(f).expect("fragment"));
    }
    let mut bytes = originals[&rotten].clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&rotten, &bytes).expect("rot");
    std::fs::remove_file(&deleted).expect("delete");

    // Supplier B keeps only hashes: each file replaced by its BLAKE3, its index made to agree
    // (stopped meanwhile: its database is its own).
    let b_index = home_of(&c, &hired[1]);
    let b = &c.homes[b_index];
    let b_frags = data_of(b);
    nodes[b_index].signal(libc::SIGTERM);
    assert!(nodes[b_index].wait_exit().success());
    {
        use bitdust::store::codec::{self, records::FragmentEntry};
        use bitdust::store::{Cf, KvStore};
        let store = bitdust::store::RocksStore::open(&b.join("db")).expect("supplier db");
        for (block, position) in &b_frags {
            let file = fragment_file(b, owner, block, *position);
            let real = std::fs::read(&file).expect("fragment");
            let fake = blake3::hash(&real).as_bytes().to_vec();
            originals.insert(file.clone(), real);
            std::fs::write(&file, &fake).expect("write");
            let mut key = b"f/".to_vec();
            key.extend_from_slice(&hex::decode(owner).expect("hex"));
            key.extend_from_slice(&hex::decode(block).expect("hex"));
            key.extend_from_slice(&position.to_be_bytes());
            let entry = FragmentEntry {
                size: fake.len() as u64,
                blake3: blake3::hash(&fake).as_bytes().to_vec(),
            };
            store
                .put(Cf::SupplierIndex, &key, &codec::encode(&entry))
                .expect("rewrite the index");
        }
    }
    nodes[b_index] = start(b, &env);

    // Every damaged fragment is found by audits and rebuilt, byte-identical, where it was.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let h = loop {
        let wrong: Vec<_> = originals
            .iter()
            .filter(|(f, bytes)| std::fs::read(f).ok().as_ref() != Some(*bytes))
            .map(|(f, _)| f.display().to_string())
            .collect();
        let h = health(&c.homes[0]);
        if wrong.is_empty() && fully_redundant(&h) {
            break h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not rebuilt: {wrong:?}\n{h:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let failed = h["audits_failed"].as_u64().expect("audits_failed");
    assert!(
        failed >= 2 + b_frags.len() as u64,
        "{failed} audits failed for {} damaged fragments",
        2 + b_frags.len()
    );
    assert_eq!(h["fired"].as_array().map(Vec::len), Some(0), "{h:#}");
}

#[test]
fn versions_beyond_keep_versions_are_dropped_and_their_fragments_deleted_from_suppliers() {
    let _serial = one_at_a_time();
    let c = star(6);
    let mut env = fast("1h", "3");
    env.push(("BITDUST_BACKUP__KEEP_VERSIONS", "1".into()));
    let _nodes: Vec<Node> = c.homes.iter().map(|h| start(h, &env)).collect();
    wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    let recovery = hex::encode(RECOVERY_BLOCK);
    let blocks_held = || -> std::collections::BTreeSet<String> {
        c.homes[1..]
            .iter()
            .flat_map(|h| held(h, &c.ids[0]))
            .map(|(b, _)| b)
            .filter(|b| *b != recovery)
            .collect()
    };
    std::fs::write(source.path().join("a.bin"), noise(1, 2 << 20)).expect("write");
    backup(&c.homes[0], source.path());
    let first = blocks_held();
    std::fs::write(source.path().join("a.bin"), noise(2, 2 << 20)).expect("write");
    backup(&c.homes[0], source.path());
    // The first version's data block and catalog head leave the suppliers; of its blocks only
    // its tree segment stays, which the second version's changes stand on.
    assert!(first.len() >= 3, "data, tree segment and head: {first:?}");
    let after = wait_for("the first version's fragments deleted", 60, || {
        let now = blocks_held();
        (now.intersection(&first).count() == 1).then_some(now)
    });
    assert!(!after.is_empty());
    // The monitor follows the kept version only: the deleted blocks are not missing fragments.
    let h = wait_for("full redundancy after retention", 60, || {
        let h = health(&c.homes[0]);
        (fully_redundant(&h) && h["rounds"].as_u64() > Some(3)).then_some(h)
    });
    assert_eq!(h["rebuild"]["blocks_failed"], 0, "{h:#}");
    assert_eq!(h["sources"][0]["health"], "full", "{h:#}");
    let list = bitdust(&c.homes[0], &["list", "--json"]);
    assert!(list.status.success());
    let text = String::from_utf8_lossy(&list.stdout);
    let versions: serde_json::Value = serde_json::from_str(&text).expect("json");
    let count = versions["versions"].as_array().map_or(0, Vec::len);
    assert_eq!(count, 1, "{text}");
}

#[test]
fn with_m_suppliers_unreachable_a_supplier_failing_an_audit_is_not_fired() {
    let _serial = one_at_a_time();
    let c = star(8);
    // Unreachable suppliers are never fired here; a failed audit is enough to fire.
    // One audit per supplier per round, and one failure is enough to fire.
    let mut env = fast("1h", "1");
    env.retain(|(k, _)| *k != "BITDUST_MONITOR__AUDITS_PER_ROUND");
    env.push(("BITDUST_MONITOR__AUDITS_PER_ROUND", "1".into()));
    // A frozen supplier is noticed in seconds, not the default minute.
    env.push(("BITDUST_NETWORK__REQUEST_TIMEOUT", "3s".into()));
    env.push(("BITDUST_NETWORK__KEEPALIVE", "1s".into()));
    env.push(("BITDUST_NETWORK__DEAD_AFTER", "3s".into()));
    let nodes: Vec<Option<Node>> = c.homes.iter().map(|h| Some(start(h, &env))).collect();
    let hired = wait_all_connected(&c.homes[0], 60);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());
    backup(&c.homes[0], source.path());
    wait_for("full redundancy after the backup", 60, || {
        fully_redundant(&health(&c.homes[0])).then_some(())
    });
    let owner = &c.ids[0];
    // The suppliers at positions 0 and 1 (m = 2) freeze, and the owner notices.
    let stopped: Vec<usize> = hired[..2].iter().map(|id| home_of(&c, id)).collect();
    for &i in &stopped {
        nodes[i].as_ref().expect("running").signal(libc::SIGSTOP);
    }
    wait_for("positions 0 and 1 unreachable", 60, || {
        let h = health(&c.homes[0]);
        (h["positions"][0]["up"] == false && h["positions"][1]["up"] == false).then_some(())
    });
    // Then one fragment rots at position 2: its audit fails (one failure fires here), but the
    // supplier still holds the other blocks' good fragments, and without it those blocks have 3
    // good reachable fragments (k = 4): it is not fired.
    let liar = &c.homes[home_of(&c, &hired[2])];
    let (block, position) = held(liar, owner)
        .into_iter()
        .find(|(b, _)| *b != hex::encode(RECOVERY_BLOCK))
        .expect("a fragment at position 2");
    let file = fragment_file(liar, owner, &block, position);
    let mut bytes = std::fs::read(&file).expect("fragment");
    // In the middle: every audit range of this fragment covers it (an audit reads only its
    // range, L7; a byte near the start is inside only the ranges that start there).
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, &bytes).expect("rot");
    // The rotten fragment's audit fails (the audits walk every block in turn); at the end of
    // that round position 2 qualifies for firing, and the guard refuses.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let h = loop {
        let h = health(&c.homes[0]);
        if h["audits_failed"].as_u64() >= Some(1) && h["rounds"].as_u64() > Some(0) {
            break h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed audit at position 2: {h:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let rounds = h["rounds"].as_u64().unwrap_or(0);
    wait_for("two more rounds", 60, || {
        (health(&c.homes[0])["rounds"].as_u64() > Some(rounds + 2)).then_some(())
    });
    let h2 = health(&c.homes[0]);
    assert_eq!(
        h2["fired"].as_array().map(Vec::len),
        Some(0),
        "{h:#}\n{h2:#}"
    );
    assert_eq!(
        positions(&c.homes[0]).expect("status")[2].0.as_deref(),
        Some(hired[2].as_str())
    );
    // The two come back: the rotten fragment is rebuilt and every block is whole again.
    for &i in &stopped {
        nodes[i].as_ref().expect("running").signal(libc::SIGCONT);
    }
    wait_for("full redundancy once the two are back", 120, || {
        fully_redundant(&health(&c.homes[0])).then_some(())
    });
}
