//! Nodes on loopback: handshakes, messages both ways, reconnects, identity propagation, and
//! every kind of bad input through a real socket with the node still serving afterwards.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;

use bitdust::crypto::identity::Identity;
use bitdust::net::envelope;
use bitdust::proto::envelope::Body;
use bitdust::proto::{FailReason, IdentityExchange, Ping};
use common::*;
use prost::Message as _;

#[test]
fn three_nodes_connect_exchange_and_reconnect() {
    let c = cluster(3);
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    for (i, home) in c.homes.iter().enumerate() {
        for (j, id) in c.ids.iter().enumerate() {
            if i != j {
                wait_session(home, id, "Established");
            }
        }
    }
    // Messages both ways.
    assert!(ping(&c.homes[0], &c.ids[1]) > 0.0);
    assert!(ping(&c.homes[1], &c.ids[0]) > 0.0);
    assert!(ping(&c.homes[2], &c.ids[0]) > 0.0);
    let status = status_json(&c.homes[0]);
    let to_b = peer_status(&status, &c.ids[1]).expect("peer listed");
    assert!(
        to_b["bytes_in"].as_u64().unwrap_or(0) > 0 && to_b["bytes_out"].as_u64().unwrap_or(0) > 0,
        "{to_b}"
    );
    assert!(to_b["last_seen"].as_u64().is_some());
    assert_eq!(to_b["name"], "node1");

    // Node 1 restarts: the others see it go and come back.
    nodes[1].signal(libc::SIGTERM);
    assert!(nodes[1].wait_exit().success());
    wait_session(&c.homes[0], &c.ids[1], "Disconnected");
    nodes[1] = Node::start(&c.homes[1]);
    wait_session(&c.homes[0], &c.ids[1], "Established");
    wait_session(&c.homes[2], &c.ids[1], "Established");
    assert!(ping(&c.homes[0], &c.ids[1]) > 0.0);
    drop(nodes);
}

#[test]
fn identity_revision_propagates_to_peers() {
    let c = cluster(2);
    let mut a = Node::start(&c.homes[0]);
    let _b = Node::start(&c.homes[1]);
    wait_session(&c.homes[1], &c.ids[0], "Established");
    let b_status = status_json(&c.homes[1]);
    assert_eq!(peer_status(&b_status, &c.ids[0]).expect("a")["revision"], 1);

    let addr = listen_addr(&c.homes[0]);
    let config_path = c.homes[0].join("config.toml");
    let config = std::fs::read_to_string(&config_path).expect("config");
    let contacts = format!("contacts = [\"tcp://{addr}\", \"tcp://127.0.0.2:9\"]");
    std::fs::write(&config_path, config.replace("contacts = []", &contacts)).expect("write");
    a.signal(libc::SIGHUP);
    a.wait_log("re-signed", |v| {
        transition(v, "identity", "Resigning", "Ready")
    });
    wait_for("B sees revision 2", 30, || {
        let status = try_status(&c.homes[1])?;
        (peer_status(&status, &c.ids[0])?["revision"] == 2).then_some(())
    });
}

#[test]
fn peer_added_while_running_connects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (a_id, b_id) = (init(&a, "a"), init(&b, "b"));
    let _na = Node::start(&a);
    let _nb = Node::start(&b);
    wait_for("a running", 20, || try_status(&a));
    wait_for("b running", 20, || try_status(&b));
    add_peer(&a, &card(&b));
    add_peer(&b, &card(&a));
    wait_session(&a, &b_id, "Established");
    wait_session(&b, &a_id, "Established");
    // Adding our own card is refused.
    let own = bitdust(&a, &["peer", "add", &card(&a)]);
    assert!(!own.status.success());
    // A garbage card is refused with a clear error.
    let bad = bitdust(&a, &["peer", "add", "bitdust1:AAAA"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid card"));
}

/// The node still serves: status answers, the trusted peer is established and answers a ping.
fn still_serving(home: &Path, peer: &str) {
    wait_session(home, peer, "Established");
    assert!(ping(home, peer) > 0.0);
}

fn wait_closed(home: &Path, reason: &str, at_least: u64) {
    wait_for(&format!("a close counted as {reason}"), 20, || {
        (closed_count(&try_status(home)?, reason) >= at_least).then_some(())
    });
}

#[test]
fn bad_input_closes_only_that_connection() {
    let c = cluster(2);
    let (a, b_id) = (&c.homes[0], &c.ids[1]);
    let _na = Node::start(a);
    let _nb = Node::start(&c.homes[1]);
    wait_session(a, b_id, "Established");
    let addr = listen_addr(a);

    // Garbage instead of a handshake.
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.write_all(&[0, 0, 0, 20])
        .and_then(|()| s.write_all(&[0x5a; 20]))
        .expect("write");
    wait_closed(a, "BadHandshake", 1);
    // A plaintext protobuf before any handshake is just as bad.
    let mut s = TcpStream::connect(&addr).expect("connect");
    let (_, me) = stranger();
    write_frame(&mut s, &identity_envelope(&me));
    wait_closed(a, "BadHandshake", 2);
    // An oversized length prefix.
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.write_all(&[0xff, 0xff, 0xff, 0xff]).expect("write");
    wait_closed(a, "FrameTooLarge", 1);
    still_serving(a, b_id);

    // After a good handshake: a frame that does not decrypt.
    let (keys, me) = stranger();
    let mut client = RawClient::connect(&addr, &keys.noise_secret_bytes());
    write_frame(&mut client.stream, &[0x33; 64]);
    assert!(client.closed_by_peer());
    wait_closed(a, "DecryptFailed", 1);

    // A message other than the identity first.
    let mut client = RawClient::connect(&addr, &keys.noise_secret_bytes());
    client.send(&envelope::encode(&envelope::envelope(
        5,
        0,
        Body::Ping(Ping { nonce: 1 }),
    )));
    assert!(client.closed_by_peer());
    wait_closed(a, "UnexpectedMessage", 1);

    // A protobuf that does not decode.
    let mut client = RawClient::connect(&addr, &keys.noise_secret_bytes());
    client.send(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    let said = envelope::decode(&client.recv().expect("a Fail")).expect("an envelope");
    assert!(
        matches!(&said.body, Some(Body::Fail(f)) if f.reason == FailReason::Malformed as i32),
        "{said:?}"
    );
    assert!(client.closed_by_peer());
    wait_closed(a, "Malformed", 1);

    // An unknown protocol version.
    let mut client = RawClient::connect(&addr, &keys.noise_secret_bytes());
    let mut future = envelope::envelope(
        1,
        0,
        Body::Identity(IdentityExchange {
            identity: Some(me.signed().clone()),
            ..Default::default()
        }),
    );
    future.version = 99;
    client.send(&future.encode_to_vec());
    // Told why (in a version 1 envelope answering request 1), then closed.
    let said = envelope::decode(&client.recv().expect("a Fail")).expect("an envelope");
    assert_eq!(said.reply_to, 1);
    assert!(
        matches!(&said.body, Some(Body::Fail(f)) if f.reason == FailReason::UnsupportedVersion as i32),
        "{said:?}"
    );
    assert!(client.closed_by_peer());
    wait_closed(a, "UnsupportedVersion", 1);

    // A stranger with a valid identity and key, but not a trusted peer.
    let mut client = RawClient::connect(&addr, &keys.noise_secret_bytes());
    client.send(&identity_envelope(&me));
    assert!(client.closed_by_peer());
    wait_closed(a, "UnknownPeer", 1);

    still_serving(a, b_id);
    // Nothing stored changed: the trusted peer is still the only one.
    let status = status_json(a);
    assert_eq!(status["network"]["peers"].as_array().map(Vec::len), Some(1));
}

#[test]
fn wrong_static_key_and_relaying_man_in_the_middle_are_refused() {
    let c = cluster(2);
    let (a, b) = (&c.homes[0], &c.homes[1]);
    let _na = Node::start(a);
    let _nb = Node::start(b);
    wait_session(a, &c.ids[1], "Established");
    let (a_addr, b_addr) = (listen_addr(a), listen_addr(b));

    // Someone presents B's (public, signed) card with their own Noise key.
    let b_identity = Identity::from_card(&card(b)).expect("card");
    let (keys, _) = stranger();
    let mut client = RawClient::connect(&a_addr, &keys.noise_secret_bytes());
    client.send(&identity_envelope(&b_identity));
    assert!(client.closed_by_peer());
    wait_closed(a, "IdentityMismatch", 1);

    // A relay that terminates Noise on both sides and re-encrypts. B does not show its
    // identity to a node it does not trust (it says NOT_TRUSTED), so the relay replays B's
    // public card to A inside its own session. A sees the relay's key.
    let (relay_keys, relay_identity) = stranger();
    let mut to_b = RawClient::connect(&b_addr, &relay_keys.noise_secret_bytes());
    to_b.send(&identity_envelope(&relay_identity));
    let b_said = envelope::decode(&to_b.recv().expect("B answers")).expect("an envelope");
    assert!(
        matches!(&b_said.body, Some(Body::Fail(f)) if f.reason == FailReason::NotTrusted as i32),
        "{b_said:?}"
    );
    let mut to_a = RawClient::connect(&a_addr, &relay_keys.noise_secret_bytes());
    to_a.send(&identity_envelope(&b_identity));
    assert!(to_a.closed_by_peer());
    wait_closed(a, "IdentityMismatch", 2);
    // B refused the relay as an unknown node.
    wait_closed(b, "UnknownPeer", 1);
    still_serving(a, &c.ids[1]);
}

#[test]
fn stale_and_forged_identity_pushes_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    init(&home, "a");
    let (keys, me) = stranger();
    add_peer(&home, &me.card());
    let _node = Node::start(&home);
    wait_for("node up", 20, || try_status(&home));
    let mut client = RawClient::login(&listen_addr(&home), &keys, &me);
    let push = |identity: &Identity, id: u64| {
        envelope::encode(&envelope::envelope(
            id,
            0,
            Body::Identity(IdentityExchange {
                identity: Some(identity.signed().clone()),
                ..Default::default()
            }),
        ))
    };
    // The same revision again is ignored quietly; an older one is stale.
    client.send(&push(&me, 2));
    let older = Identity::create(&keys, "mallory", vec!["tcp://127.0.0.1:9".into()], 0, 0)
        .expect("identity");
    client.send(&push(&older, 5));
    // Another node's identity on this session: forged.
    let (_, other) = stranger();
    client.send(&push(&other, 3));
    wait_for("both counted", 20, || {
        let s = try_status(&home)?;
        (closed_count(&s, "StaleIdentity") >= 1 && closed_count(&s, "ForgedIdentity") >= 1)
            .then_some(())
    });
    // A higher revision signed by the same key is adopted.
    let newer = Identity::create(&keys, "mallory", vec!["tcp://127.0.0.1:10".into()], 2, 1)
        .expect("identity");
    client.send(&push(&newer, 4));
    wait_for("revision 2 adopted", 20, || {
        let s = try_status(&home)?;
        (peer_status(&s, &me.node_id().to_string())?["revision"] == 2).then_some(())
    });
    // The session survived all of it.
    let status = status_json(&home);
    assert_eq!(
        peer_status(&status, &me.node_id().to_string()).expect("peer")["session"],
        "Established"
    );
}

#[test]
fn a_removed_peer_is_disconnected_and_refused() {
    let c = cluster(2);
    let (a, b) = (&c.homes[0], &c.homes[1]);
    let _na = Node::start(a);
    let _nb = Node::start(b);
    wait_session(a, &c.ids[1], "Established");
    let out = bitdust(a, &["peer", "remove", &c.ids[1]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Gone from A's book; B loses its session and A refuses B's redials.
    assert!(peer_status(&status_json(a), &c.ids[1]).is_none());
    wait_session(b, &c.ids[0], "Disconnected");
    wait_closed(a, "UnknownPeer", 1);
    // Removing it again, or a stranger, is a clear error.
    let again = bitdust(a, &["peer", "remove", &c.ids[1]]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not a peer"));
}

/// Issue 11, fault 1: a friend re-signs with a new Noise key and pushes revision 2. Whoever
/// still holds the old key cannot log in with the (validly signed) revision 1 any more.
#[test]
fn a_retired_noise_key_cannot_log_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    init(&home, "a");
    let (old_keys, old) = stranger();
    add_peer(&home, &old.card());
    let _node = Node::start(&home);
    wait_for("node up", 20, || try_status(&home));
    let addr = listen_addr(&home);
    let peer = old.node_id().to_string();

    // Revision 2 under a new Noise key (same signing key, so the same node id).
    let (new_noise, _) = bitdust::net::generate_static_keypair();
    let new_keys = bitdust::crypto::keys::NodeKeys::from_secret_bytes(
        &old_keys.signing_secret_bytes(),
        &new_noise,
    )
    .expect("keys");
    let newer = Identity::create(&new_keys, "mallory", vec!["tcp://127.0.0.1:9".into()], 2, 1)
        .expect("identity");
    let mut client = RawClient::login(&addr, &old_keys, &old);
    client.send(&envelope::encode(&envelope::envelope(
        2,
        0,
        Body::Identity(IdentityExchange {
            identity: Some(newer.signed().clone()),
            ..Default::default()
        }),
    )));
    wait_for("revision 2 adopted", 20, || {
        (peer_status(&try_status(&home)?, &peer)?["revision"] == 2).then_some(())
    });
    drop(client);
    wait_session(&home, &peer, "Disconnected");

    // The old key with the old revision is refused, and counted.
    let before = closed_count(&status_json(&home), "RetiredKey");
    let mut thief = RawClient::connect(&addr, &old_keys.noise_secret_bytes());
    thief.send(&identity_envelope(&old));
    assert!(thief.closed_by_peer());
    wait_closed(&home, "RetiredKey", before + 1);
    // The new key logs in.
    let mut client = RawClient::login(&addr, &new_keys, &newer);
    let pong = client.request(3, Body::Ping(Ping { nonce: 5 }));
    assert!(matches!(pong.body, Some(Body::Pong(_))), "{pong:?}");
}

/// Issue 11, fault 3: 200 connections from one address that never handshake do not keep a
/// friend (connecting from another address, one its contacts name) out.
#[test]
fn a_flood_from_one_address_does_not_lock_a_friend_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    init(&home, "a");
    let (keys, friend) = stranger(); // contacts: tcp://127.0.0.1:9
    add_peer(&home, &friend.card());
    // A short pre-authentication deadline, so the test also sees the admitted flood expire.
    let config_path = home.join("config.toml");
    let config = std::fs::read_to_string(&config_path).expect("config");
    assert!(
        config.contains("preauth_timeout = \"5s\""),
        "documented default"
    );
    std::fs::write(
        &config_path,
        config.replace("preauth_timeout = \"5s\"", "preauth_timeout = \"1s\""),
    )
    .expect("write config");
    let _node = Node::start(&home);
    wait_for("node up", 20, || try_status(&home));
    let addr: std::net::SocketAddr = listen_addr(&home).parse().expect("addr");

    // 127.0.0.2 is a distinct source address on loopback (Linux routes all of 127/8 there).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let flood: Vec<tokio::net::TcpStream> = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..200 {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind("127.0.0.2:0".parse().expect("addr"))
                .expect("bind");
            if let Ok(stream) = socket.connect(addr).await {
                held.push(stream);
            }
        }
        held
    });
    assert!(flood.len() >= 100, "only {} flood connections", flood.len());
    wait_for("the flood refused", 20, || {
        let s = try_status(&home)?;
        let refused =
            closed_count(&s, "TooManyFromAddress") + closed_count(&s, "TooManyConnections");
        (refused >= 100).then_some(())
    });

    let started = std::time::Instant::now();
    let mut client = RawClient::login(&addr.to_string(), &keys, &friend);
    let pong = client.request(2, Body::Ping(Ping { nonce: 7 }));
    let took = started.elapsed();
    assert!(matches!(pong.body, Some(Body::Pong(_))), "{pong:?}");
    assert!(
        took < std::time::Duration::from_secs(2),
        "friend served after {took:?}"
    );
    // The flood's admitted connections (8 by default) are closed at the deadline.
    wait_closed(&home, "HandshakeTimeout", 8);
    drop(flood);
}

/// A node that stops tells each connected peer SHUTTING_DOWN before it closes the session.
#[test]
fn a_stopping_node_says_shutting_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    init(&home, "a");
    let (keys, me) = stranger();
    add_peer(&home, &me.card());
    let mut node = Node::start(&home);
    wait_for("node up", 20, || try_status(&home));
    let mut client = RawClient::login(&listen_addr(&home), &keys, &me);
    node.signal(libc::SIGTERM);
    let said = loop {
        let env = envelope::decode(&client.recv().expect("a Fail before the close"))
            .expect("an envelope");
        if let Some(Body::Fail(f)) = env.body {
            break (env.reply_to, f.reason);
        }
    };
    assert_eq!(said, (0, FailReason::ShuttingDown as i32));
    assert!(client.closed_by_peer());
    assert!(node.wait_exit().success());
}
