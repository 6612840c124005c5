//! Bounds that hold under a peer's abuse, and the log contract under keep-alives: a friend that
//! floods pongs or identity pushes cannot grow the node's memory, stall `status` or flood the
//! log; keep-alive steps never log a state change that changes nothing.

mod common;

use std::time::{Duration, Instant};

use bitdust::crypto::identity::Identity;
use bitdust::crypto::keys::NodeKeys;
use bitdust::net::envelope;
use bitdust::proto::envelope::Body;
use bitdust::proto::{IdentityExchange, Pong};
use common::*;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn push(identity: &Identity, id: u64) -> Vec<u8> {
    envelope::encode(&envelope::envelope(
        id,
        0,
        Body::Identity(IdentityExchange {
            identity: Some(identity.signed().clone()),
            ..Default::default()
        }),
    ))
}

/// Sends `message` about `rate` times a second for `secs` seconds.
fn flood(client: &mut RawClient, message: &[u8], rate: u32, secs: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut sent = 0;
    while Instant::now() < end {
        let batch = Instant::now();
        for _ in 0..rate / 100 {
            client.send(message);
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(10).saturating_sub(batch.elapsed()));
    }
    sent
}

/// A node and a friend of it, logged in over a raw connection.
struct Friend {
    _dir: tempfile::TempDir,
    home: std::path::PathBuf,
    node: Node,
    client: RawClient,
    keys: NodeKeys,
    me: Identity,
}

fn friend_of_a_node() -> Friend {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    init(&home, "a");
    let (keys, me) = stranger();
    add_peer(&home, &me.card());
    let node = Node::start(&home);
    wait_for("node up", 20, || try_status(&home));
    let client = RawClient::login(&listen_addr(&home), &keys, &me);
    Friend {
        _dir: dir,
        home,
        node,
        client,
        keys,
        me,
    }
}

#[test]
fn a_flood_of_pongs_and_forged_pushes_costs_no_memory_and_one_warning() {
    let Friend {
        _dir,
        home,
        mut node,
        mut client,
        ..
    } = friend_of_a_node();
    let pid = node_status(&home).expect("status").pid;
    let before = rss_kib(pid);
    let pong = envelope::encode(&envelope::envelope(7, 0, Body::Pong(Pong { nonce: 1 })));
    let (_, other) = stranger();
    let forged = push(&other, 8);
    let flooder = std::thread::spawn(move || {
        let pongs = flood(&mut client, &pong, 10_000, 3);
        let pushes = flood(&mut client, &forged, 10_000, 3);
        (pongs, pushes, client)
    });
    // The node keeps answering while it is flooded.
    let mut answers = 0;
    while !flooder.is_finished() {
        let started = Instant::now();
        assert!(
            node_status(&home).is_some(),
            "status must answer under a flood"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "status took {:?}",
            started.elapsed()
        );
        answers += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let (pongs, pushes, _client) = flooder.join().expect("flooder");
    assert!(
        pongs > 20_000 && pushes > 20_000,
        "flooded {pongs} pongs, {pushes} pushes"
    );
    assert!(answers >= 10, "status answered {answers} times");
    let status = wait_for("the pushes are counted", 20, || {
        let s = node_status(&home)?;
        let counted = s
            .network
            .counters
            .get("ForgedIdentity")
            .copied()
            .unwrap_or(0)
            + s.network
                .counters
                .get("DroppedNotices")
                .copied()
                .unwrap_or(0);
        (counted >= pushes).then_some(s)
    });
    // Memory stays flat: queues are bounded, what does not fit is dropped and counted.
    let after = rss_kib(pid);
    eprintln!(
        "flooded {pongs} pongs and {pushes} forged pushes; RSS {before} -> {after} KiB; counters {:?}",
        status.network.counters
    );
    assert!(
        after < before + 40 * 1024,
        "memory grew from {before} KiB to {after} KiB under the flood"
    );
    // One warning per interval (10 s), not one per push.
    let warnings = node
        .logs_so_far()
        .iter()
        .filter(|v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("do not verify")
        })
        .count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warnings for {pushes} forged pushes"
    );
    // The friend's session survived all of it.
    let peer = &status.network.peers[0];
    assert_eq!(peer.session, "Established", "{peer:?}");
}

#[test]
fn a_same_revision_push_is_quiet_and_an_older_one_is_stale() {
    let Friend {
        _dir,
        home,
        node: _node,
        mut client,
        keys,
        me,
    } = friend_of_a_node();
    for id in 0..20 {
        client.send(&push(&me, 100 + id));
    }
    // Give the node time to handle all twenty: a ping on the same connection comes back after them.
    let ping = envelope::encode(&envelope::envelope(
        500,
        0,
        Body::Ping(bitdust::proto::Ping { nonce: 5 }),
    ));
    client.send(&ping);
    loop {
        let reply = client.recv().expect("pong");
        if envelope::decode(&reply).is_ok_and(|e| e.reply_to == 500) {
            break;
        }
    }
    let status = node_status(&home).expect("status");
    assert_eq!(
        status.network.counters.get("StaleIdentity"),
        None,
        "same revision counted as stale"
    );
    let older = Identity::create(&keys, "mallory", vec!["tcp://127.0.0.1:9".into()], 0, 0)
        .expect("identity");
    client.send(&push(&older, 200));
    wait_for("the older push counted once", 20, || {
        let s = node_status(&home)?;
        (s.network.counters.get("StaleIdentity") == Some(&1)).then_some(())
    });
}

#[test]
fn keepalives_flow_without_logging_a_change_of_state_that_is_none() {
    let c = cluster(2);
    let env = [("BITDUST_NETWORK__KEEPALIVE", "1s")];
    let mut a = Node::start_with(&c.homes[0], &env);
    let _b = Node::start_with(&c.homes[1], &env);
    wait_session(&c.homes[0], &c.ids[1], "Established");
    let first = node_status(&c.homes[0]).expect("status").network.peers[0].messages_out;
    std::thread::sleep(Duration::from_secs(10));
    let status = node_status(&c.homes[0]).expect("status");
    let peer = &status.network.peers[0];
    assert_eq!(peer.session, "Established");
    assert!(
        peer.messages_out >= first + 8 && peer.messages_in >= 8,
        "keep-alives did not flow: {peer:?}"
    );
    let self_loops: Vec<_> = a
        .logs_so_far()
        .iter()
        .filter(|v| v["level"] == "INFO" && v["message"] == "transition" && v["from"] == v["to"])
        .cloned()
        .collect();
    assert!(
        self_loops.is_empty(),
        "INFO transitions that change nothing: {self_loops:#?}"
    );
}

#[test]
fn a_frozen_peer_is_noticed_within_keepalive_and_dead_after() {
    let c = cluster(2);
    let env = [
        ("BITDUST_NETWORK__KEEPALIVE", "1s"),
        ("BITDUST_NETWORK__DEAD_AFTER", "2s"),
    ];
    let _a = Node::start_with(&c.homes[0], &env);
    let b = Node::start_with(&c.homes[1], &env);
    wait_session(&c.homes[0], &c.ids[1], "Established");
    // The peer's process stops dead: its socket stays open, nothing answers.
    b.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    wait_for("the frozen peer noticed", 20, || {
        let s = node_status(&c.homes[0])?;
        (s.network.peers[0].session != "Established").then_some(())
    });
    eprintln!("a frozen peer was noticed after {:?}", frozen.elapsed());
    b.signal(libc::SIGCONT);
    // Once it wakes, the friends reconnect.
    wait_session(&c.homes[0], &c.ids[1], "Established");
}

#[test]
fn a_forward_dated_or_replayed_revision_is_not_adopted() {
    let Friend {
        _dir,
        home,
        node: _node,
        mut client,
        keys,
        me,
    } = friend_of_a_node();
    let now = bitdust::unix_now();
    let contacts = || vec!["tcp://127.0.0.1:9".to_string()];
    let known =
        Identity::create(&keys, "mallory", contacts(), me.revision() + 1, now - 100).expect("id");
    client.send(&push(&known, 299));
    wait_for("a dated revision adopted", 20, || {
        (node_status(&home)?.network.peers[0].revision == known.revision()).then_some(())
    });
    // Ten days ahead of the node's clock.
    let ahead = Identity::create(&keys, "mallory", contacts(), 5, now + 10 * 86_400).expect("id");
    client.send(&push(&ahead, 300));
    // A higher revision dated before the known one (a replay of an old signing session).
    let behind = Identity::create(&keys, "mallory", contacts(), 6, now - 200).expect("id");
    client.send(&push(&behind, 301));
    wait_for("both refused and counted", 20, || {
        let s = node_status(&home)?;
        (s.network.counters.get("BadIdentityTimestamp") == Some(&2)).then_some(())
    });
    let peer = &node_status(&home).expect("status").network.peers[0];
    assert_eq!(peer.revision, known.revision(), "the known revision stays");
    // A believable newer revision is still adopted.
    let next = Identity::create(&keys, "mallory", contacts(), 7, now).expect("id");
    client.send(&push(&next, 302));
    wait_for("revision 7 adopted", 20, || {
        (node_status(&home)?.network.peers[0].revision == 7).then_some(())
    });
}
