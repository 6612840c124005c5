//! Storage contracts between real nodes on loopback: hiring one supplier per position, refusals,
//! a supplier that leaves, restarts on both sides; and the supplier's store through the wire:
//! quotas, isolation between customers, recovery from an interrupted write.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use bitdust::proto::envelope::Body;
use bitdust::proto::{
    AuditChallenge, DeleteFragment, FailReason, FragmentId, ListFragments, RetrieveFragment,
    ServiceRequest, StoreFragment,
};
use common::*;

const NO_SPACE: &str = "100 MiB";

fn set_donated(home: &Path, size: &str) {
    let path = home.join("config.toml");
    let config = std::fs::read_to_string(&path).expect("config");
    let (before, after) = config.split_once("donated = \"").expect("donated key");
    let rest = after.split_once('"').expect("closing quote").1;
    std::fs::write(&path, format!("{before}donated = \"{size}\"{rest}")).expect("write");
}

#[test]
fn customer_hires_one_supplier_per_position_and_replaces_one_that_leaves() {
    let c = star(7);
    set_donated(&c.homes[1], NO_SPACE);
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    let hired = wait_all_connected(&c.homes[0], 60);
    assert_eq!(hired.len(), 6, "4 + 2 positions");
    assert_eq!(
        hired.iter().collect::<BTreeSet<_>>().len(),
        6,
        "one position per supplier: {hired:?}"
    );
    assert!(
        !hired.contains(&c.ids[1]),
        "the friend without space was hired"
    );
    // Each supplier shows the customer with the quota asked.
    let s = c
        .ids
        .iter()
        .position(|id| *id == hired[0])
        .expect("a friend");
    let customers = node_status(&c.homes[s]).expect("status").supplier.customers;
    assert!(
        customers
            .iter()
            .any(|x| x.node_id == c.ids[0] && x.quota == 1u64 << 30),
        "{customers:?}"
    );

    // An eighth friend joins; then a supplier drops the customer: it is replaced.
    let dir = tempfile::tempdir().expect("tempdir");
    let eighth = dir.path().join("n8");
    let eighth_id = init(&eighth, "node8");
    add_peer(&eighth, &card(&c.homes[0]));
    nodes.push(Node::start(&eighth));
    add_peer(&c.homes[0], &card(&eighth));
    wait_session(&c.homes[0], &eighth_id, "Established");
    let leaving = hired[2].clone();
    let home_of_leaving = &c.homes[c.ids.iter().position(|id| *id == leaving).expect("friend")];
    let out = bitdust(home_of_leaving, &["customer", "drop", &c.ids[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replaced = wait_for("the leaving supplier replaced", 60, || {
        let p = positions(&c.homes[0])?;
        let now: Vec<String> = p
            .iter()
            .filter_map(|(s, c)| (c == "Connected").then_some(s.clone()).flatten())
            .collect();
        (now.len() == 6 && !now.contains(&leaving)).then_some(now)
    });
    assert_eq!(replaced[2], eighth_id, "position 2 went to the new friend");
    assert_eq!(
        (&replaced[..2], &replaced[3..]),
        (&hired[..2], &hired[3..]),
        "other positions unchanged"
    );
    drop(nodes);
}

#[test]
fn restarts_resume_contracts_without_rehiring() {
    let c = star(6);
    let mut nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    let hired = wait_all_connected(&c.homes[0], 60);

    // The customer restarts: same supplier at every position.
    nodes[0].signal(libc::SIGTERM);
    assert!(nodes[0].wait_exit().success());
    nodes[0] = Node::start(&c.homes[0]);
    assert_eq!(wait_all_connected(&c.homes[0], 90), hired);

    // A supplier restarts: its position comes back to it.
    let s = c.ids.iter().position(|id| *id == hired[3]).expect("friend");
    nodes[s].signal(libc::SIGTERM);
    assert!(nodes[s].wait_exit().success());
    wait_for("position 3 not connected", 30, || {
        let p = positions(&c.homes[0])?;
        (p[3].1 != "Connected").then_some(())
    });
    nodes[s] = Node::start(&c.homes[s]);
    assert_eq!(wait_all_connected(&c.homes[0], 120), hired);
    drop(nodes);
}

fn fragment(block: u8, position: u32) -> FragmentId {
    FragmentId {
        block: vec![block; 32],
        position,
    }
}

fn store(
    client: &mut RawClient,
    id: u64,
    frag: FragmentId,
    data: &[u8],
) -> bitdust::proto::Envelope {
    let hash = blake3::hash(data).as_bytes().to_vec();
    client.request(
        id,
        Body::StoreFragment(StoreFragment {
            id: Some(frag),
            data: data.to_vec(),
            hash,
        }),
    )
}

fn fail_reason(env: &bitdust::proto::Envelope) -> Option<FailReason> {
    match &env.body {
        Some(Body::Fail(f)) => FailReason::try_from(f.reason).ok(),
        Some(Body::ServiceRefuse(r)) => FailReason::try_from(r.reason).ok(),
        _ => None,
    }
}

#[test]
fn quota_isolation_and_interrupted_writes_through_the_wire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("supplier");
    init(&home, "supplier");
    let (ka, a) = stranger();
    let (kb, b) = stranger();
    add_peer(&home, &a.card());
    add_peer(&home, &b.card());
    let mut node = Node::start(&home);
    wait_for("supplier up", 20, || try_status(&home));
    let addr = listen_addr(&home);

    let mut alice = RawClient::login(&addr, &ka, &a);
    // Storing before a contract is refused.
    assert_eq!(
        fail_reason(&store(&mut alice, 2, fragment(1, 0), b"early")),
        Some(FailReason::NoService)
    );
    // Asking for more than the donated space is refused.
    let huge = ServiceRequest {
        space: 1 << 40,
        position: 0,
        data_shards: 4,
        parity_shards: 2,
    };
    assert_eq!(
        fail_reason(&alice.request(3, Body::ServiceRequest(huge))),
        Some(FailReason::NoSpace)
    );
    // Each fragment is charged max(size, 4 KiB) + 512: room for two small ones, not for a
    // small one and one of 6000 bytes.
    let ask = ServiceRequest {
        space: 10_000,
        position: 0,
        data_shards: 4,
        parity_shards: 2,
    };
    assert!(matches!(
        alice.request(4, Body::ServiceRequest(ask)).body,
        Some(Body::ServiceAccept(_))
    ));
    let stored = store(&mut alice, 5, fragment(1, 0), &[7u8; 600]);
    assert!(
        matches!(stored.body, Some(Body::Ack(ref ack)) if ack.size == 600),
        "{stored:?}"
    );
    // A storage audit: BLAKE3 keyed with the nonce over the range proves the bytes are held.
    let nonce = [42u8; 32];
    let audit = |offset, length| {
        Body::AuditChallenge(AuditChallenge {
            id: Some(fragment(1, 0)),
            nonce: nonce.to_vec(),
            offset,
            length,
        })
    };
    let proof = alice.request(100, audit(100, 50));
    let expected = blake3::keyed_hash(&nonce, &[7u8; 50]);
    assert!(
        matches!(&proof.body, Some(Body::AuditProof(p)) if p.proof == expected.as_bytes()),
        "{proof:?}"
    );
    assert_eq!(
        fail_reason(&alice.request(101, audit(590, 20))),
        Some(FailReason::Malformed),
        "a range past the end"
    );
    let unknown = Body::AuditChallenge(AuditChallenge {
        id: Some(fragment(9, 0)),
        nonce: nonce.to_vec(),
        offset: 0,
        length: 1,
    });
    assert_eq!(
        fail_reason(&alice.request(102, unknown)),
        Some(FailReason::NotFound)
    );
    // Over quota: refused, nothing written.
    assert_eq!(
        fail_reason(&store(&mut alice, 6, fragment(2, 0), &[8u8; 6000])),
        Some(FailReason::OverQuota)
    );
    // A hash that does not match the data is refused.
    let bad = StoreFragment {
        id: Some(fragment(3, 0)),
        data: vec![1; 10],
        hash: vec![0; 32],
    };
    assert_eq!(
        fail_reason(&alice.request(7, Body::StoreFragment(bad))),
        Some(FailReason::HashMismatch)
    );

    // Bob has his own contract but cannot touch Alice's fragment.
    let mut bob = RawClient::login(&addr, &kb, &b);
    assert!(matches!(
        bob.request(2, Body::ServiceRequest(ask)).body,
        Some(Body::ServiceAccept(_))
    ));
    let get = RetrieveFragment {
        id: Some(fragment(1, 0)),
    };
    assert_eq!(
        fail_reason(&bob.request(3, Body::RetrieveFragment(get.clone()))),
        Some(FailReason::NotFound)
    );
    let list = bob.request(
        4,
        Body::ListFragments(ListFragments {
            after: None,
            limit: 100,
        }),
    );
    assert!(
        matches!(list.body, Some(Body::FragmentList(ref l)) if l.fragments.is_empty()),
        "{list:?}"
    );
    let del = DeleteFragment {
        id: Some(fragment(1, 0)),
    };
    assert_eq!(
        fail_reason(&bob.request(5, Body::DeleteFragment(del))),
        Some(FailReason::NotFound)
    );
    // Alice still reads hers, intact.
    let got = alice.request(8, Body::RetrieveFragment(get.clone()));
    assert!(
        matches!(got.body, Some(Body::FragmentData(ref d)) if d.data == vec![7u8; 600]),
        "{got:?}"
    );
    let status = node_status(&home).expect("status");
    let used: Vec<u64> = status.supplier.customers.iter().map(|c| c.used).collect();
    assert!(used.contains(&(4096 + 512)), "{status:#?}");

    // SIGHUP with less donated space: applies at once, a larger request is refused.
    set_donated(&home, "12000");
    node.signal(libc::SIGHUP);
    node.wait_log("reloaded", |v| v["message"] == "config reloaded");
    let more = ServiceRequest {
        space: 16000,
        position: 0,
        data_shards: 4,
        parity_shards: 2,
    };
    wait_for("the smaller donation applied", 20, || {
        let reply = alice.request(9, Body::ServiceRequest(more));
        (fail_reason(&reply) == Some(FailReason::NoSpace)).then_some(())
    });

    // The node stops; an interrupted write is left behind: a temp file and a fragment file that
    // never reached the index (killed between rename and ack).
    drop(alice);
    drop(bob);
    node.signal(libc::SIGTERM);
    assert!(node.wait_exit().success());
    let customer_dir = home.join("store").join(a.node_id().to_string());
    let block_dir = customer_dir.join(&hex::encode([9u8; 32])[..2]);
    std::fs::create_dir_all(&block_dir).expect("dir");
    std::fs::write(
        block_dir.join(format!("{}.0", hex::encode([9u8; 32]))),
        b"half",
    )
    .expect("orphan");
    std::fs::write(
        block_dir.join(format!(".tmp-{}.1.1234", hex::encode([9u8; 32]))),
        b"partial",
    )
    .expect("temp");

    let _node = Node::start(&home);
    wait_for("supplier up again", 20, || try_status(&home));
    let mut alice = RawClient::login(&addr, &ka, &a);
    let list = alice.request(
        2,
        Body::ListFragments(ListFragments {
            after: None,
            limit: 100,
        }),
    );
    let Some(Body::FragmentList(listed)) = list.body else {
        panic!("{list:?}")
    };
    assert_eq!(
        listed.fragments.len(),
        1,
        "only the acked fragment is visible"
    );
    assert_eq!(listed.fragments[0].id, Some(fragment(1, 0)));
    let orphan = RetrieveFragment {
        id: Some(FragmentId {
            block: vec![9; 32],
            position: 0,
        }),
    };
    assert_eq!(
        fail_reason(&alice.request(3, Body::RetrieveFragment(orphan))),
        Some(FailReason::NotFound)
    );
    let leftovers: Vec<_> = std::fs::read_dir(&block_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "recovery left {leftovers:?}");
    let got = alice.request(4, Body::RetrieveFragment(get));
    assert!(matches!(got.body, Some(Body::FragmentData(ref d)) if d.data == vec![7u8; 600]));
}

/// A customer's requests are answered in the order they came: a store and a delete of one
/// fragment, pipelined without waiting, never swap (the delete never finds nothing, the fragment
/// never survives its delete).
#[test]
fn one_customers_pipelined_requests_keep_their_order() {
    use bitdust::net::envelope;
    use bitdust::proto::{
        DeleteFragment, FragmentId, ListFragments, ServiceRequest, StoreFragment,
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("s");
    init(&home, "s");
    let (keys, me) = stranger();
    add_peer(&home, &me.card());
    let _node = Node::start(&home);
    wait_for("node up", 20, || try_status(&home));
    let mut client = RawClient::login(&listen_addr(&home), &keys, &me);
    let mut next_id = 10;
    let mut request = |client: &mut RawClient, body: Body| {
        next_id += 1;
        client.send(&envelope::encode(&envelope::envelope(next_id, 0, body)));
        next_id
    };
    // Hire the node as a supplier, retrying while its store opens.
    wait_for("service granted", 20, || {
        let id = request(
            &mut client,
            Body::ServiceRequest(ServiceRequest {
                space: 64 << 20,
                position: 0,
                data_shards: 4,
                parity_shards: 2,
            }),
        );
        loop {
            let reply = envelope::decode(&client.recv()?).ok()?;
            if reply.reply_to == id {
                return matches!(reply.body, Some(Body::ServiceAccept(_))).then_some(());
            }
        }
    });
    // One Noise message of the raw client: under 64 KiB.
    let data = vec![7u8; 60 << 10];
    let hash = blake3::hash(&data).as_bytes().to_vec();
    let mut deletes = Vec::new();
    for i in 0..24u8 {
        let fid = FragmentId {
            block: vec![i; 32],
            position: 0,
        };
        request(
            &mut client,
            Body::StoreFragment(StoreFragment {
                id: Some(fid.clone()),
                data: data.clone(),
                hash: hash.clone(),
            }),
        );
        deletes.push(request(
            &mut client,
            Body::DeleteFragment(DeleteFragment { id: Some(fid) }),
        ));
    }
    let list = request(
        &mut client,
        Body::ListFragments(ListFragments {
            after: None,
            limit: 1000,
        }),
    );
    loop {
        let reply = envelope::decode(&client.recv().expect("a reply")).expect("an envelope");
        if deletes.contains(&reply.reply_to) {
            assert!(
                matches!(reply.body, Some(Body::Ack(_))),
                "a delete overtook its store: {:?}",
                reply.body
            );
        }
        if reply.reply_to == list {
            let Some(Body::FragmentList(listed)) = reply.body else {
                panic!("not a list: {:?}", reply.body);
            };
            assert!(
                listed.fragments.is_empty(),
                "{} fragments survived their delete",
                listed.fragments.len()
            );
            break;
        }
    }
}
