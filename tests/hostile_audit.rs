//! Storage audits against a hostile supplier (`common::hostile`): an owner whose suppliers are
//! all in-process test peers, one of which keeps only ids, refuses challenges or omits from its
//! lists.

mod common;

use std::path::Path;

use bitdust::proto::envelope::Body;
use bitdust::proto::{FailReason, FragmentId, FragmentInfo, FragmentList};
use common::hostile::{Action, Hostile};
use common::tree::*;
use common::*;

/// Fast rounds for tests (the defaults are 10 min and 6 h).
fn fast(failed_audits: u32) -> Vec<(&'static str, String)> {
    vec![
        ("BITDUST_MONITOR__INTERVAL", "1s".into()),
        ("BITDUST_MONITOR__FIRE_AFTER", "1h".into()),
        (
            "BITDUST_MONITOR__FIRE_AFTER_FAILED_AUDITS",
            failed_audits.to_string(),
        ),
        ("BITDUST_MONITOR__AUDITS_PER_ROUND", "4".into()),
        ("BITDUST_NETWORK__REQUEST_TIMEOUT", "3s".into()),
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

/// An owner and `n` hostile peers (honest for now) it trusts; the owner running.
struct World {
    _dir: tempfile::TempDir,
    home: std::path::PathBuf,
    owner: String,
    peers: Vec<Hostile>,
    node: Node,
}

fn world(n: usize, env: &[(&'static str, String)]) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("owner");
    let owner = init(&home, "owner");
    let peers: Vec<Hostile> = (0..n)
        .map(|i| Hostile::start(&format!("hostile{i}")))
        .collect();
    for p in &peers {
        add_peer(&home, &p.card());
    }
    let node = start(&home, env);
    World {
        _dir: dir,
        home,
        owner,
        peers,
        node,
    }
}

impl World {
    fn peer(&self, id: &str) -> &Hostile {
        self.peers
            .iter()
            .find(|p| p.node_id() == id)
            .expect("a hostile peer")
    }
}

#[test]
fn hostile_peers_are_hired_hold_the_backup_pass_audits_and_restore_it() {
    let w = world(7, &fast(3));
    let hired = wait_all_connected(&w.home, 60);
    assert_eq!(hired.len(), 6);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());
    backup(&w.home, source.path());
    wait_for("full redundancy after the backup", 60, || {
        let h = health(&w.home);
        (fully_redundant(&h) && h["audits_passed"].as_u64() > Some(6)).then_some(())
    });
    for id in &hired {
        let p = w.peer(id);
        assert!(p.received("store") > 0, "{:?}", p.counters());
        assert!(!p.held(&w.owner).is_empty());
    }
    let h = health(&w.home);
    assert_eq!(h["audits_failed"].as_u64(), Some(0), "{h:#}");
    let out = tempfile::tempdir().expect("tempdir");
    let to = out.path().join("r");
    let (ok, r) = restore(&w.home, &["--to", to.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    assert_same_tree(source.path(), &to);
    drop(w.node);
}

/// The issue's done-when: a supplier that keeps only ids and refuses every challenge is fired
/// and its position rebuilt on a spare within `fire_after_failed_audits` rounds; the source's
/// health shows the loss meanwhile.
#[test]
fn a_supplier_keeping_only_ids_and_refusing_challenges_is_fired_within_the_bound() {
    // The supplier at position 1 keeps only its list: challenges and fetches are refused.
    fired_within_the_bound_and_rebuilt(|lazy| {
        lazy.keep_only_ids();
        lazy.behave(|r| match r.body {
            Body::AuditChallenge(_) | Body::SliceChallenge(_) | Body::RetrieveFragment(_) => {
                Action::Refuse(FailReason::NoService)
            }
            _ => Action::Honest,
        });
    });
}

/// A supplier that answers pings and lists but never a challenge (each times out, asked twice)
/// is fired like one that refuses.
#[test]
fn a_supplier_ignoring_challenges_is_fired_within_the_bound() {
    fired_within_the_bound_and_rebuilt(|lazy| {
        lazy.behave(|r| match r.body {
            Body::AuditChallenge(_) | Body::SliceChallenge(_) | Body::RetrieveFragment(_) => {
                Action::Ignore
            }
            _ => Action::Honest,
        });
    });
}

/// The supplier at position 1 turns lazy (`lie`) after a backup: the source shows the loss at
/// once, the supplier is fired within `fire_after_failed_audits` rounds and its position is
/// rebuilt on the spare.
fn fired_within_the_bound_and_rebuilt(lie: impl FnOnce(&Hostile)) {
    const FIRE_AFTER_FAILED_AUDITS: u64 = 3;
    let (mut w, hired, _source) = backed_up(7, &fast(FIRE_AFTER_FAILED_AUDITS as u32));

    lie(w.peer(&hired[1]));
    let rounds_then = health(&w.home)["rounds"].as_u64().expect("rounds");

    // Meanwhile the source shows the loss: not "full" while the position is not rebuilt.
    let shown = wait_for("the source's health shows the loss", 60, || {
        let status = try_status(&w.home)?;
        let source = status["health"]["sources"].as_array()?.first()?.clone();
        (source["health"] != "full").then_some(source)
    });
    assert_ne!(shown["health"], "full", "{shown:#}");

    // Fired, and its position rebuilt on the spare.
    let fired_at = wait_for("the lazy supplier fired", 120, || {
        let h = health(&w.home);
        let fired = h["fired"].as_array()?;
        fired
            .iter()
            .any(|f| f[0] == 1)
            .then(|| h["rounds"].as_u64())
            .flatten()
    });
    assert!(
        fired_at - rounds_then <= FIRE_AFTER_FAILED_AUDITS + 1,
        "fired {} rounds after it stopped proving (bound: {FIRE_AFTER_FAILED_AUDITS} rounds, \
         plus the round under way)",
        fired_at - rounds_then
    );
    let spare = w
        .peers
        .iter()
        .find(|p| !hired.contains(&p.node_id()))
        .expect("a spare")
        .node_id();
    wait_for("position 1 rebuilt on the spare", 120, || {
        let now = positions(&w.home)?;
        let h = health(&w.home);
        (now[1].0.as_deref() == Some(spare.as_str()) && fully_redundant(&h)).then_some(())
    });
    let blocks = health(&w.home)["blocks"].as_u64().expect("blocks");
    let on_spare = w
        .peer(&spare)
        .held(&w.owner)
        .iter()
        .filter(|(_, p, len)| *p == 1 && *len > 0)
        .count() as u64;
    assert!(
        on_spare >= blocks.saturating_sub(1),
        "{on_spare} of {blocks}"
    );
    let _ = w.node.logs_so_far();
}

/// A page of made-up fragment ids just after `after` (block ids counting up), saying more.
fn made_up_page(after: Option<&FragmentId>) -> Body {
    let from = after.map_or(0, |a| {
        let mut n = [0u8; 8];
        n.copy_from_slice(a.block.get(..8).unwrap_or(&[0; 8]));
        u64::from_be_bytes(n)
    });
    let fragments = (1..=1000u64)
        .map(|i| {
            let mut block = vec![0u8; 32];
            block[..8].copy_from_slice(&(from + i).to_be_bytes());
            FragmentInfo {
                id: Some(FragmentId { block, position: 0 }),
                size: 4096,
                hash: vec![0; 32],
            }
        })
        .collect();
    Body::FragmentList(FragmentList {
        fragments,
        more: true,
    })
}

/// M3: a supplier that answers list pages forever (each advancing, always "more") is followed
/// no further than what the owner placed there, every round: the owner's memory does not grow
/// with the lie, and nothing else about that supplier changes (its audits still pass).
#[test]
fn a_supplier_listing_pages_forever_is_followed_only_as_far_as_was_placed() {
    let (w, hired, _source) = backed_up(6, &fast(1000));
    let liar = w.peer(&hired[0]);
    liar.behave(|r| match &r.body {
        Body::ListFragments(l) => Action::Reply(made_up_page(l.after.as_ref())),
        _ => Action::Honest,
    });
    let rounds = |h: &serde_json::Value| h["rounds"].as_u64().unwrap_or(0);
    let (r0, l0) = (rounds(&health(&w.home)), liar.received("list"));
    // A supplier is listed every sixth round.
    let h = wait_for("thirteen more rounds", 90, || {
        let h = health(&w.home);
        (rounds(&h) >= r0 + 13).then_some(h)
    });
    let (r1, l1) = (rounds(&h), liar.received("list"));
    // The owner holds a few blocks: its bound is under two pages of 1000, so each round
    // follows at most two (the round's deadline alone would allow thousands).
    let blocks = h["blocks"].as_u64().unwrap_or(0);
    assert!(blocks > 0 && 2 * blocks + 1000 < 2000, "{blocks} blocks");
    assert!(
        l1 - l0 <= 2 * (r1 - r0 + 1),
        "{} pages followed in {} rounds",
        l1 - l0,
        r1 - r0
    );
    assert!(l1 > l0, "the liar was listed");
    assert!(
        fully_redundant(&h),
        "the liar's lists cost nothing else: {h:#}"
    );
}

/// An owner whose supplier at position 0 answers every fetch `delay` late; backed up, ready to
/// restore. Returns the world, the source tree and the slow supplier's id.
/// `extra` bytes of incompressible data join the usual tree (more blocks than the restore's
/// window of 6).
fn with_a_slow_supplier(
    delay: std::time::Duration,
    extra: usize,
) -> (World, tempfile::TempDir, String) {
    // The default request timeout (60 s), so the static hedge bound is 15 s.
    let mut env = fast(3);
    env.retain(|(k, _)| *k != "BITDUST_NETWORK__REQUEST_TIMEOUT");
    let w = world(7, &env);
    let hired = wait_all_connected(&w.home, 60);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());
    std::fs::write(source.path().join("extra.bin"), noise(7, extra)).expect("write");
    backup(&w.home, source.path());
    wait_for("full redundancy after the backup", 60, || {
        fully_redundant(&health(&w.home)).then_some(())
    });
    let slow = hired[0].clone();
    w.peer(&slow).behave(move |r| match r.body {
        Body::RetrieveFragment(_) => Action::Delay(delay),
        _ => Action::Honest,
    });
    (w, source, slow)
}

/// M7: a supplier that answers correctly but slowly is hedged on the others' observed latency,
/// asked last once seen to be slow, and named in the restore's result (and so in `status`).
#[test]
fn a_slow_supplier_is_hedged_and_named_in_the_restore_result() {
    let (w, source, slow) = with_a_slow_supplier(std::time::Duration::from_secs(3), 4 << 20);
    let out = tempfile::tempdir().expect("tempdir");
    let to = out.path().join("r");
    let (ok, r) = restore(&w.home, &["--to", to.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    assert_same_tree(source.path(), &to);
    let named: Vec<&str> = r["slow_suppliers"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(named, vec![slow.as_str()], "{r:#}");
    let finished = status_json(&w.home)["restore"]["finished"].clone();
    assert!(
        finished.to_string().contains(&slow),
        "status names the slow supplier: {finished:#}"
    );
}

/// An owner and `n` hostile peers, `mixed_tree` backed up and at full redundancy; the hired
/// suppliers by position and the source.
fn backed_up(n: usize, env: &[(&'static str, String)]) -> (World, Vec<String>, tempfile::TempDir) {
    let w = world(n, env);
    let hired = wait_all_connected(&w.home, 60);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());
    backup(&w.home, source.path());
    wait_for("full redundancy after the backup", 60, || {
        fully_redundant(&health(&w.home)).then_some(())
    });
    (w, hired, source)
}

/// A supplier away when a restore starts and back while it runs is asked again: the restore
/// machine hears it is up, and a data position that is up is asked before a parity one. Every
/// supplier answers fetches a second late (none slower than the others, so none is set aside
/// as slow), which makes the restore slow enough to see position 0 return.
#[test]
fn a_supplier_back_during_a_restore_is_asked_again() {
    let mut env = fast(3);
    env.retain(|(k, _)| {
        !matches!(
            *k,
            "BITDUST_BACKUP__BLOCK_SIZE" | "BITDUST_NETWORK__REQUEST_TIMEOUT"
        )
    });
    env.extend([
        // One 60 KiB file per block: many blocks, each a second's wait.
        ("BITDUST_BACKUP__BLOCK_SIZE", "64KiB".to_string()),
        // Hedged after 2 s: the second every answer takes is no reason to ask another position.
        ("BITDUST_NETWORK__REQUEST_TIMEOUT", "8s".to_string()),
        // A returning supplier is redialed within two seconds.
        ("BITDUST_NETWORK__RECONNECT_MAX", "2s".to_string()),
    ]);
    let w = world(6, &env);
    let hired = wait_all_connected(&w.home, 60);
    let source = tempfile::tempdir().expect("tempdir");
    for i in 0..60u64 {
        std::fs::write(
            source.path().join(format!("f{i:02}")),
            noise(3000 + i, 60 * 1024),
        )
        .expect("write");
    }
    backup(&w.home, source.path());
    for p in &w.peers {
        p.behave(|r| match r.body {
            Body::RetrieveFragment(_) => Action::Delay(std::time::Duration::from_secs(1)),
            _ => Action::Honest,
        });
    }
    let away = w.peer(&hired[0]);
    away.go_away();
    wait_for("position 0 down", 30, || {
        let p = positions(&w.home)?;
        (p[0].1 != "Connected").then_some(())
    });
    let out = tempfile::tempdir().expect("tempdir");
    let target = out.path().join("r");
    let restoring = {
        let (home, target) = (w.home.clone(), target.clone());
        std::thread::spawn(move || restore(&home, &["--to", target.to_str().expect("utf-8")]))
    };
    let blocks = wait_for("the restore under way", 60, || {
        let job = node_status(&w.home)?.restore.running?;
        (job.blocks_decoded > 0 && job.blocks_decoded < job.blocks).then_some(job.blocks)
    });
    // Six blocks a second: position 0 is redialed long before the sixty are done.
    away.come_back();
    let (ok, r) = restoring.join().expect("restore thread");
    assert!(ok, "{r:#}");
    assert_eq!(r["outcome"], "complete", "{r:#}");
    assert_same_tree(source.path(), &target);
    // Only the restore fetches (no drill; no rebuild, nothing is missing). Never told that
    // position 0 is back, it would fetch positions 1 to 5 to the end: never position 0 again,
    // and a parity fragment for every block.
    assert!(
        away.received("retrieve") > 0,
        "position 0 was not asked again after it came back: {r:#}"
    );
    let extra = r["extra_fragments"].as_u64().expect("a count");
    assert!(extra < blocks, "{extra} extra for {blocks} blocks: {r:#}");
}

/// Once a fragment's precomputed pairs are used up, its audits are Bao slices checked against
/// its BLAKE3 alone (a KiB and its hashes, no whole fetch); a supplier that kept only the ids
/// fails them.
#[test]
fn once_the_pairs_are_used_up_audits_are_slices_only_a_holder_passes() {
    let w = world(7, &fast(3));
    let hired = wait_all_connected(&w.home, 60);
    let source = tempfile::tempdir().expect("tempdir");
    // One small file: few blocks, so their pairs are soon used up at four audits a round.
    std::fs::write(source.path().join("one"), noise(11, 100_000)).expect("write");
    backup(&w.home, source.path());
    wait_for("slice audits at every position", 180, || {
        hired
            .iter()
            .all(|id| w.peer(id).received("slice") > 0)
            .then_some(())
    });
    let h = health(&w.home);
    assert_eq!(h["audits_failed"].as_u64(), Some(0), "{h:#}");
    for id in &hired {
        assert_eq!(
            w.peer(id).received("retrieve"),
            0,
            "no whole fetch from {id}"
        );
    }
    let liar = w.peer(&hired[0]);
    liar.keep_only_ids();
    let slices = liar.received("slice");
    let h = wait_for("position 0's supplier fails its slices", 60, || {
        let h = health(&w.home);
        let failed = h["positions"][0]["failed_audits"].as_u64() > Some(0);
        (failed || !h["fired"].as_array().is_none_or(Vec::is_empty)).then_some(h)
    });
    assert!(liar.received("slice") > slices, "{h:#}");
}

/// Item 1: a restore drill that falls back to parity tells the monitor who failed, like a
/// restore.
#[test]
fn a_drill_falling_back_to_parity_tells_the_monitor_who_failed() {
    let (w, hired, _source) = backed_up(6, &fast(1000));
    assert_eq!(health(&w.home)["audits_failed"].as_u64(), Some(0));
    w.peer(&hired[0]).behave(|r| match r.body {
        Body::RetrieveFragment(_) => Action::Refuse(FailReason::NotFound),
        _ => Action::Honest,
    });
    let out = bitdust(&w.home, &["drill", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("drill JSON");
    assert_eq!(report["passed"], true, "{report:#}");
    let h = wait_for("the monitor counts the drill's failed fetches", 30, || {
        let h = health(&w.home);
        (h["positions"][0]["failed_audits"].as_u64() > Some(0)).then_some(h)
    });
    let others: u64 = (1..6)
        .filter_map(|p| h["positions"][p]["failed_audits"].as_u64())
        .sum();
    assert_eq!(others, 0, "{h:#}");
}

/// Item 4: a supplier that answers every audit challenge two seconds late (honestly) is named
/// slow in `status`, with its latency; it is not failed for it.
#[test]
fn a_supplier_always_slow_to_answer_shows_in_status() {
    let w = world(6, &fast(3));
    let hired = wait_all_connected(&w.home, 60);
    let source = tempfile::tempdir().expect("tempdir");
    mixed_tree(source.path());
    backup(&w.home, source.path());
    w.peer(&hired[0]).behave(|r| match r.body {
        Body::AuditChallenge(_) => Action::Delay(std::time::Duration::from_secs(2)),
        _ => Action::Honest,
    });
    let h = wait_for("position 0 named slow", 90, || {
        let h = health(&w.home);
        (h["positions"][0]["slow"] == true).then_some(h)
    });
    let at_0 = &h["positions"][0];
    assert!(at_0["latency_ms"].as_u64() >= Some(1500), "{h:#}");
    assert_eq!(at_0["failed_audits"].as_u64(), Some(0), "{h:#}");
    let others_slow: Vec<_> = (1..6)
        .filter(|p| h["positions"][*p]["slow"] == true)
        .collect();
    assert!(others_slow.is_empty(), "{h:#}");
    let text = bitdust(&w.home, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("slow: position 0 ({})", hired[0])),
        "{text}"
    );
}

/// Benchmark (not a test: run with `--ignored --nocapture`): restore time with one supplier
/// answering every fetch 10 s late. Prints the figures.
#[test]
#[ignore]
fn bench_restore_with_one_supplier_at_10_s_per_request() {
    let (w, _source, _slow) = with_a_slow_supplier(std::time::Duration::from_secs(10), 12 << 20);
    let blocks = health(&w.home)["blocks"].as_u64().unwrap_or(0);
    let out = tempfile::tempdir().expect("tempdir");
    let to = out.path().join("r");
    let began = std::time::Instant::now();
    let (ok, r) = restore(&w.home, &["--to", to.to_str().expect("utf-8")]);
    let took = began.elapsed();
    println!(
        "restore with one supplier at 10 s per request: ok={ok} blocks={blocks} \
         wall={:.1}s reported={}s extra_fragments={} slow_suppliers={}",
        took.as_secs_f64(),
        r["seconds"],
        r["extra_fragments"],
        r["slow_suppliers"]
    );
}

/// A restore that falls back to parity because a supplier refused its fetches tells the
/// monitor which supplier failed (counted like failed audits), though that supplier passes
/// every challenge.
#[test]
fn a_restore_falling_back_to_parity_tells_the_monitor_who_failed() {
    let (w, hired, source) = backed_up(7, &fast(1000));
    assert_eq!(health(&w.home)["audits_failed"].as_u64(), Some(0));
    w.peer(&hired[0]).behave(|r| match r.body {
        Body::RetrieveFragment(_) => Action::Refuse(FailReason::NoService),
        _ => Action::Honest,
    });
    let out = tempfile::tempdir().expect("tempdir");
    let to = out.path().join("r");
    let (ok, r) = restore(&w.home, &["--to", to.to_str().expect("utf-8")]);
    assert!(ok, "{r:#}");
    assert_same_tree(source.path(), &to);
    let h = wait_for("the monitor counts the refused fetches", 30, || {
        let h = health(&w.home);
        (h["audits_failed"].as_u64() > Some(0)).then_some(h)
    });
    let at_0 = h["positions"]
        .as_array()
        .and_then(|p| p.first())
        .cloned()
        .unwrap_or_default();
    assert!(
        at_0["failed_audits"].as_u64() > Some(0)
            || !h["fired"].as_array().is_none_or(Vec::is_empty),
        "{h:#}"
    );
}
