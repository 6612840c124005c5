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

const MIB: u64 = 1 << 20;
/// The budget of the node under attack, and its largest message (the budget is twice it).
const BUDGET: u64 = 16 * MIB;
const FRAGMENT: usize = 4 << 20;

fn fragment_id(i: u32) -> FragmentId {
    let mut block = vec![0u8; 32];
    block[..4].copy_from_slice(&i.to_be_bytes());
    FragmentId { block, position: 0 }
}

fn request(id: u64, body: Body) -> Vec<u8> {
    envelope::encode(&envelope::envelope(id, 0, body))
}

/// The replies to `n` requests, skipping pings and pushes.
fn replies(client: &mut RawClient, n: usize) -> Vec<bitdust::proto::Envelope> {
    let mut got = Vec::new();
    while got.len() < n {
        let bytes = client.recv_message().expect("a reply");
        let env = envelope::decode(&bytes).expect("an envelope");
        if env.reply_to != 0 {
            got.push(env);
        }
    }
    got
}

fn budget_held(home: &std::path::Path, peer: &str) -> Option<u64> {
    peer_status(&try_status(home)?, peer)?
        .get("budget_held")?
        .as_u64()
}

/// Security review M2, "memory one friend can pin on a supplier": a friend with a contract
/// stores one 4 MiB fragment, then asks for it 32 times and reads nothing, so the replies
/// pile up on the supplier; then it sends 12 stores of 4 MiB as fast as TCP lets it, while
/// reading nothing back. With a 16 MiB budget per peer the node's peak RSS grows by less than
/// the budget plus 40 MiB; the replies that did not fit are TRY_LATER, every store is
/// acknowledged (the reader waited, nothing was refused), and `status` never shows the friend
/// holding more than its budget. Measured: the peak grows by 24-31 MiB, one fragment is sent
/// and 31 are TRY_LATER. The old node queued every reply (32 × 4 MiB: its peak RSS grew by
/// 135-143 MiB) and read up to 32 requests of any size per link.
#[test]
fn a_friend_cannot_pin_more_than_its_byte_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    init(&home, "a");
    let (keys, me) = stranger();
    add_peer(&home, &me.card());
    let node = Node::start_with(
        &home,
        &[
            ("BITDUST_NETWORK__PEER_BUDGET", "16 MiB"),
            ("BITDUST_NETWORK__MAX_MESSAGE", "8 MiB"),
        ],
    );
    wait_for("node up", 20, || try_status(&home));
    let peer = me.node_id().to_string();
    let mut client = RawClient::login(&listen_addr(&home), &keys, &me);
    let ask = ServiceRequest {
        space: 1 << 30,
        position: 0,
        data_shards: 4,
        parity_shards: 2,
    };
    assert!(matches!(
        client.request(2, Body::ServiceRequest(ask)).body,
        Some(Body::ServiceAccept(_))
    ));
    let data: Vec<u8> = (0..FRAGMENT).map(|i| (i % 251) as u8).collect();
    let store = |i: u32| {
        Body::StoreFragment(StoreFragment {
            id: Some(fragment_id(i)),
            data: data.clone(),
            hash: blake3::hash(&data).as_bytes().to_vec(),
        })
    };
    assert!(client.send_message(&request(3, store(0))));
    let stored = replies(&mut client, 1);
    assert!(matches!(stored[0].body, Some(Body::Ack(_))), "{stored:?}");

    let pid = node.pid();
    reset_peak_rss(pid);
    let before = proc_bytes(pid, "VmHWM");
    for id in 100..132u64 {
        let retrieve = Body::RetrieveFragment(bitdust::proto::RetrieveFragment {
            id: Some(fragment_id(0)),
        });
        assert!(client.send_message(&request(id, retrieve)));
    }
    // Every retrieve is handled (answered or refused) while the friend reads nothing: what it
    // holds stops changing.
    let mut last = (0, 0);
    wait_for("the retrieves handled", 20, || {
        let held = budget_held(&home, &peer)?;
        assert!(held <= BUDGET, "the friend holds {held} bytes");
        last = if held == last.0 {
            (held, last.1 + 1)
        } else {
            (held, 0)
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        (held >= FRAGMENT as u64 && last.1 >= 5).then_some(())
    });
    let grew = proc_bytes(pid, "VmHWM").saturating_sub(before);
    let answers = replies(&mut client, 32);
    let sent = answers
        .iter()
        .filter(|e| matches!(e.body, Some(Body::FragmentData(_))))
        .count();
    let later = answers
        .iter()
        .filter(|e| fail_reason(e) == Some(FailReason::TryLater))
        .count();
    assert_eq!(sent + later, 32, "{answers:?}");
    assert!(
        (1..16).contains(&sent),
        "{sent} fragments sent, {later} TRY_LATER"
    );
    assert!(
        grew < BUDGET + 40 * MIB,
        "the node's peak RSS grew by {} MiB for one friend",
        grew / MIB
    );

    // Stores as fast as TCP lets the friend send them, no reply read until all are sent.
    let mut most = 0;
    std::thread::scope(|s| {
        let sender = s.spawn(|| {
            for i in 1..=12u32 {
                assert!(client.send_message(&request(200 + u64::from(i), store(i))));
            }
        });
        while !sender.is_finished() {
            most = most.max(budget_held(&home, &peer).unwrap_or(0));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    assert!(most <= BUDGET, "the friend held {most} bytes");
    let acks = replies(&mut client, 12);
    assert!(
        acks.iter().all(|e| matches!(e.body, Some(Body::Ack(_)))),
        "{acks:?}"
    );
    let grew = proc_bytes(pid, "VmHWM").saturating_sub(before);
    assert!(
        grew < BUDGET + 40 * MIB,
        "the node's peak RSS grew by {} MiB for one friend",
        grew / MIB
    );
    eprintln!(
        "peak RSS growth {} MiB; {sent} fragments sent, {later} TRY_LATER; stores held at most {most} bytes",
        grew / MIB
    );
}
