//! A hostile peer that tries to flood a node: a stranger's large message before it has shown an
//! identity, frames longer than the Noise maximum, and a customer that stores thousands of
//! empty fragments or asks for a contract of nothing (issue 18, deliverable 3; security review
//! M1 and H5, protocol review G5).

mod common;

use std::io::Write;

use bitdust::net::envelope;
use bitdust::proto::envelope::Body;
use bitdust::proto::{FailReason, FragmentId, ServiceRequest, StoreFragment};
use common::*;

/// A node with a friend that has not logged in yet.
fn node_and_friend() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Node,
    bitdust::crypto::keys::NodeKeys,
    bitdust::crypto::identity::Identity,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    init(&home, "a");
    let (keys, me) = stranger();
    add_peer(&home, &me.card());
    let node = Node::start(&home);
    wait_for("node up", 20, || try_status(&home));
    (dir, home, node, keys, me)
}

fn wait_counted(home: &std::path::Path, reason: &str, at_least: u64) {
    wait_for(&format!("a close counted as {reason}"), 20, || {
        (closed_count(&try_status(home)?, reason) >= at_least).then_some(())
    });
}

/// Security review M1, done-when "a 30 MiB message before the identity closes the connection
/// without being read": a stranger (no identity shown) sends a 30 MiB message in full chunks.
/// The node stops on the first chunk (the limit before authentication is 8 KiB), so the
/// stranger cannot even finish writing it. The old node read it whole (its limit was
/// `max_message`, 32 MiB) and closed only when it did not decode.
#[test]
fn a_30_mib_message_before_the_identity_is_not_read() {
    let (_dir, home, _node, keys, _me) = node_and_friend();
    let mut client = RawClient::connect(&listen_addr(&home), &keys.noise_secret_bytes());
    let total = 30usize << 20;
    let chunk = vec![0x42u8; 65_518];
    let mut written = 0usize;
    let mut buf = vec![0u8; 65_535];
    while written < total {
        let mut plain = vec![0u8]; // more chunks follow
        plain.extend_from_slice(&chunk);
        let n = client
            .transport
            .write_message(&plain, &mut buf)
            .expect("encrypt");
        let frame = [&(n as u32).to_be_bytes()[..], &buf[..n]].concat();
        if client.stream.write_all(&frame).is_err() {
            break;
        }
        written += chunk.len();
    }
    assert!(
        written < total,
        "the node read all {written} bytes of a message before the identity"
    );
    wait_counted(&home, "MessageTooLarge", 1);
    assert_eq!(closed_count(&status_json(&home), "Malformed"), 0);
}

/// Protocol review G5 (and the 30 MiB frame of the issue): a declared frame length above 65535
/// closes the connection as soon as the length is read, before and after the handshake. 65536
/// used to wait for its body (and the pre-auth deadline).
#[test]
fn a_frame_longer_than_the_noise_maximum_closes_on_its_length() {
    let (_dir, home, _node, keys, me) = node_and_friend();
    let addr = listen_addr(&home);
    // Before authentication (after the Noise handshake): a 65536-byte frame, then 30 MiB.
    for (n, len) in [(1, 65_536u32), (2, 30 << 20)] {
        let mut client = RawClient::connect(&addr, &keys.noise_secret_bytes());
        client.stream.write_all(&len.to_be_bytes()).expect("length");
        assert!(client.closed_by_peer(), "a {len}-byte frame was waited for");
        wait_counted(&home, "FrameTooLarge", n);
    }
    // After authentication.
    let mut client = RawClient::login(&addr, &keys, &me);
    client
        .stream
        .write_all(&65_536u32.to_be_bytes())
        .expect("length");
    assert!(client.closed_by_peer());
    wait_counted(&home, "FrameTooLarge", 3);
}

fn empty_fragment(i: u32) -> Body {
    let mut block = vec![0u8; 32];
    block[..4].copy_from_slice(&i.to_be_bytes());
    Body::StoreFragment(StoreFragment {
        id: Some(FragmentId { block, position: 0 }),
        data: vec![],
        hash: blake3::hash(b"").as_bytes().to_vec(),
    })
}

fn fail_reason(env: &bitdust::proto::Envelope) -> Option<FailReason> {
    match &env.body {
        Some(Body::Fail(f)) => FailReason::try_from(f.reason).ok(),
        Some(Body::ServiceRefuse(r)) => FailReason::try_from(r.reason).ok(),
        _ => None,
    }
}

/// Security review H5, done-when "20,000 empty fragments are refused": a friend with a 1 GiB
/// contract stores 20,000 empty fragments. Each is refused (MALFORMED) before any file or index
/// entry exists: the supplier's store holds nothing for it and charges it nothing. A contract
/// for 0 bytes is refused as well. The old node acknowledged every one (an inode, a directory
/// entry and a synced index entry each, for a charge of 0 bytes).
#[test]
fn twenty_thousand_empty_fragments_are_refused() {
    let (_dir, home, _node, keys, me) = node_and_friend();
    let mut client = RawClient::login(&listen_addr(&home), &keys, &me);
    let nothing = ServiceRequest {
        space: 0,
        position: 0,
        data_shards: 4,
        parity_shards: 2,
    };
    assert_eq!(
        fail_reason(&client.request(2, Body::ServiceRequest(nothing))),
        Some(FailReason::Malformed),
        "a contract for 0 bytes"
    );
    let ask = ServiceRequest {
        space: 1 << 30,
        ..nothing
    };
    assert!(matches!(
        client.request(3, Body::ServiceRequest(ask)).body,
        Some(Body::ServiceAccept(_))
    ));
    // In batches, so neither side's queue fills while the other writes.
    const BATCH: u32 = 50;
    let mut refused = 0;
    for batch in 0..20_000 / BATCH {
        for i in 0..BATCH {
            let n = batch * BATCH + i;
            let env = envelope::envelope(u64::from(n) + 10, 0, empty_fragment(n));
            client.send(&envelope::encode(&env));
        }
        let mut answered = 0;
        while answered < BATCH {
            let env = envelope::decode(&client.recv().expect("a reply")).expect("an envelope");
            if env.reply_to == 0 {
                continue;
            }
            answered += 1;
            assert_eq!(fail_reason(&env), Some(FailReason::Malformed), "{env:?}");
            refused += 1;
        }
    }
    assert_eq!(refused, 20_000);
    let status = node_status(&home).expect("status");
    let account = status
        .supplier
        .customers
        .iter()
        .find(|c| c.node_id == me.node_id().to_string())
        .expect("the friend's account");
    assert_eq!(account.used, 0, "{status:#?}");
    let customer_dir = home.join("store").join(me.node_id().to_string());
    let files = std::fs::read_dir(&customer_dir).map_or(0, |d| d.count());
    assert_eq!(files, 0, "files under {}", customer_dir.display());
}
