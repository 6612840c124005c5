//! Nodes on loopback: handshakes, messages both ways, reconnects, identity propagation, and
//! every kind of bad input through a real socket with the node still serving afterwards.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bitdust::crypto::identity::Identity;
use bitdust::crypto::keys::NodeKeys;
use bitdust::net::envelope;
use bitdust::proto::envelope::Body;
use bitdust::proto::{IdentityExchange, Ping};
use common::*;
use prost::Message as _;

fn card(home: &Path) -> String {
    let out = bitdust(home, &["id"]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn add_peer(home: &Path, peer_card: &str) {
    let out = bitdust(home, &["peer", "add", peer_card]);
    assert!(
        out.status.success(),
        "peer add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn listen_addr(home: &Path) -> String {
    id_json(home)["contacts"][0]
        .as_str()
        .expect("contact")
        .trim_start_matches("tcp://")
        .to_string()
}

/// Waits until `home`'s session with `peer` is in `state`.
fn wait_session(home: &Path, peer: &str, state: &str) {
    wait_for(&format!("{peer} {state}"), 30, || {
        let status = try_status(home)?;
        (peer_status(&status, peer)?["session"] == state).then_some(())
    });
}

fn ping(home: &Path, peer: &str) -> f64 {
    let out = bitdust(home, &["peer", "ping", peer, "--json"]);
    assert!(
        out.status.success(),
        "ping failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["rtt_ms"].as_f64().expect("rtt")
}

struct Cluster {
    _dir: tempfile::TempDir,
    homes: Vec<PathBuf>,
    ids: Vec<String>,
}

/// `n` nodes that all trust each other (added while stopped, through the database).
fn cluster(n: usize) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let homes: Vec<PathBuf> = (0..n).map(|i| dir.path().join(format!("n{i}"))).collect();
    let ids: Vec<String> = homes
        .iter()
        .enumerate()
        .map(|(i, h)| init(h, &format!("node{i}")))
        .collect();
    let cards: Vec<String> = homes.iter().map(|h| card(h)).collect();
    for (i, home) in homes.iter().enumerate() {
        for (j, c) in cards.iter().enumerate() {
            if i != j {
                add_peer(home, c);
            }
        }
    }
    Cluster {
        _dir: dir,
        homes,
        ids,
    }
}

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

// ------------------------------------------------------------ a raw Noise client

const PROLOGUE: &[u8] = b"bitdust.v1";

fn write_frame(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(&(bytes.len() as u32).to_be_bytes())
        .expect("write len");
    s.write_all(bytes).expect("write frame");
}

fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// A client that speaks the transport by hand, so it can misbehave on purpose.
struct RawClient {
    stream: TcpStream,
    transport: snow::TransportState,
}

impl RawClient {
    fn connect(addr: &str, noise_private: &[u8]) -> RawClient {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let params = "Noise_XX_25519_ChaChaPoly_BLAKE2s".parse().expect("params");
        let mut hs = snow::Builder::new(params)
            .local_private_key(noise_private)
            .expect("key")
            .prologue(PROLOGUE)
            .expect("prologue")
            .build_initiator()
            .expect("initiator");
        let mut buf = vec![0u8; 65535];
        let n = hs.write_message(&[], &mut buf).expect("msg1");
        write_frame(&mut stream, &buf[..n]);
        let msg2 = read_frame(&mut stream).expect("msg2");
        hs.read_message(&msg2, &mut buf).expect("read msg2");
        let n = hs.write_message(&[], &mut buf).expect("msg3");
        write_frame(&mut stream, &buf[..n]);
        RawClient {
            stream,
            transport: hs.into_transport_mode().expect("transport"),
        }
    }

    /// Sends `payload` as one final chunk.
    fn send(&mut self, payload: &[u8]) {
        let mut plain = vec![1u8];
        plain.extend_from_slice(payload);
        let mut buf = vec![0u8; plain.len() + 16];
        let n = self
            .transport
            .write_message(&plain, &mut buf)
            .expect("encrypt");
        write_frame(&mut self.stream, &buf[..n]);
    }

    fn recv(&mut self) -> Option<Vec<u8>> {
        let frame = read_frame(&mut self.stream)?;
        let mut buf = vec![0u8; frame.len()];
        let n = self.transport.read_message(&frame, &mut buf).ok()?;
        Some(buf[1..n].to_vec())
    }

    /// True once the node has closed the connection.
    fn closed_by_peer(&mut self) -> bool {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn identity_envelope(identity: &Identity) -> Vec<u8> {
    envelope::encode(&envelope::envelope(
        1,
        0,
        Body::Identity(IdentityExchange {
            identity: Some(identity.signed().clone()),
        }),
    ))
}

/// A stranger's keys and identity, made in the test.
fn stranger() -> (NodeKeys, Identity) {
    let keys = NodeKeys::generate(&mut rand::rngs::OsRng);
    let identity = Identity::create(&keys, "mallory", vec!["tcp://127.0.0.1:9".into()], 1, 0)
        .expect("identity");
    (keys, identity)
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
    assert!(client.closed_by_peer());
    wait_closed(a, "Malformed", 1);

    // An unknown protocol version.
    let mut client = RawClient::connect(&addr, &keys.noise_secret_bytes());
    let mut future = envelope::envelope(
        1,
        0,
        Body::Identity(IdentityExchange {
            identity: Some(me.signed().clone()),
        }),
    );
    future.version = 99;
    client.send(&future.encode_to_vec());
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

    // A relay that terminates Noise on both sides and re-encrypts: it gets B's real identity
    // message from B, and replays it to A inside its own session. A sees the relay's key.
    let (relay_keys, relay_identity) = stranger();
    let mut to_b = RawClient::connect(&b_addr, &relay_keys.noise_secret_bytes());
    to_b.send(&identity_envelope(&relay_identity));
    let b_hello = to_b.recv().expect("B sends its identity first");
    let mut to_a = RawClient::connect(&a_addr, &relay_keys.noise_secret_bytes());
    to_a.send(&b_hello);
    assert!(to_a.closed_by_peer());
    wait_closed(a, "IdentityMismatch", 2);
    // B refused the relay as an unknown node.
    wait_closed(b, "UnknownPeer", 1);
    still_serving(a, &c.ids[1]);
}
