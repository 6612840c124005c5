//! Requests with and without a contract (issue 18, PROTOCOL.md §8 "Contracts and the order of
//! checks", §8.4): a friend that never hired, one that left, one the supplier dropped. A raw
//! client through the wire, as in `tests/protocol.rs` and `tests/storage.rs`.

mod common;

use bitdust::net::envelope;
use bitdust::proto::envelope::Body;
use bitdust::proto::{
    Ack, AuditChallenge, DeleteFragment, FailReason, FragmentId, ListFragments, RetrieveFragment,
    ServiceCancel, ServiceRequest, StoreFragment,
};
use common::*;

fn fragment(block: u8, position: u32) -> FragmentId {
    FragmentId {
        block: vec![block; 32],
        position,
    }
}

fn reason(env: &bitdust::proto::Envelope) -> Option<FailReason> {
    match &env.body {
        Some(Body::Fail(f)) => FailReason::try_from(f.reason).ok(),
        Some(Body::ServiceRefuse(r)) => FailReason::try_from(r.reason).ok(),
        _ => None,
    }
}

fn audit(block: u8) -> Body {
    Body::AuditChallenge(AuditChallenge {
        id: Some(fragment(block, 0)),
        nonce: vec![42; 32],
        offset: 0,
        length: 10,
    })
}

fn hire() -> Body {
    Body::ServiceRequest(ServiceRequest {
        space: 1 << 20,
        position: 0,
        data_shards: 4,
        parity_shards: 2,
    })
}

fn store(block: u8, data: &[u8]) -> Body {
    Body::StoreFragment(StoreFragment {
        id: Some(fragment(block, 0)),
        data: data.to_vec(),
        hash: blake3::hash(data).as_bytes().to_vec(),
    })
}

#[test]
fn the_order_of_checks_without_a_contract_and_a_drop_that_sticks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("supplier");
    init(&home, "supplier");
    let (keys, me) = stranger();
    add_peer(&home, &me.card());
    let _node = Node::start(&home);
    wait_for("supplier up", 20, || try_status(&home));
    let addr = listen_addr(&home);
    let mut c = RawClient::login(&addr, &keys, &me);

    // A friend that never hired: an audit is NO_SERVICE (not NOT_FOUND), a store too; retrieve
    // and delete find nothing; a list is empty; a cancel has nothing to cancel.
    assert_eq!(reason(&c.request(2, audit(1))), Some(FailReason::NoService));
    assert_eq!(
        reason(&c.request(3, store(1, b"x"))),
        Some(FailReason::NoService)
    );
    let none = c.request(
        4,
        Body::RetrieveFragment(RetrieveFragment {
            id: Some(fragment(1, 0)),
        }),
    );
    assert_eq!(reason(&none), Some(FailReason::NotFound));
    let none = c.request(
        5,
        Body::DeleteFragment(DeleteFragment {
            id: Some(fragment(1, 0)),
        }),
    );
    assert_eq!(reason(&none), Some(FailReason::NotFound));
    let list = c.request(
        6,
        Body::ListFragments(ListFragments {
            after: None,
            limit: 0,
        }),
    );
    assert!(
        matches!(&list.body, Some(Body::FragmentList(l)) if l.fragments.is_empty() && !l.more),
        "{list:?}"
    );
    let cancel = Body::ServiceCancel(ServiceCancel {
        from_supplier: false,
    });
    assert_eq!(
        reason(&c.request(7, cancel.clone())),
        Some(FailReason::NoService)
    );
    // A malformed id comes before the contract.
    let odd = c.request(
        8,
        Body::AuditChallenge(AuditChallenge {
            id: Some(FragmentId {
                block: vec![1; 5],
                position: 0,
            }),
            nonce: vec![42; 32],
            offset: 0,
            length: 10,
        }),
    );
    assert_eq!(reason(&odd), Some(FailReason::Malformed));

    // Hired: stored and audited.
    assert!(matches!(
        c.request(9, hire()).body,
        Some(Body::ServiceAccept(_))
    ));
    let data = [7u8; 100];
    assert!(matches!(
        c.request(10, store(1, &data)).body,
        Some(Body::Ack(_))
    ));
    assert!(matches!(
        c.request(11, audit(1)).body,
        Some(Body::AuditProof(_))
    ));

    // The customer leaves: a second cancel is acknowledged again; audits and stores are
    // NO_SERVICE, but what is kept can still be listed and retrieved (a recovery needs it).
    assert!(matches!(
        c.request(12, cancel.clone()).body,
        Some(Body::Ack(_))
    ));
    assert!(matches!(
        c.request(13, cancel.clone()).body,
        Some(Body::Ack(_))
    ));
    assert_eq!(
        reason(&c.request(14, audit(1))),
        Some(FailReason::NoService)
    );
    assert_eq!(
        reason(&c.request(15, store(2, b"y"))),
        Some(FailReason::NoService)
    );
    let kept = c.request(
        16,
        Body::RetrieveFragment(RetrieveFragment {
            id: Some(fragment(1, 0)),
        }),
    );
    assert!(
        matches!(&kept.body, Some(Body::FragmentData(d)) if d.data == data),
        "{kept:?}"
    );
    // After its own cancel, a customer may hire again at once.
    assert!(matches!(
        c.request(17, hire()).body,
        Some(Body::ServiceAccept(_))
    ));

    // The supplier's owner drops the customer: it is told (we acknowledge), and from then on a
    // service request is refused: the drop sticks.
    let customer = me.node_id().to_string();
    let dropping = {
        let home = home.clone();
        std::thread::spawn(move || bitdust(&home, &["customer", "drop", &customer]))
    };
    loop {
        let bytes = c.recv().expect("the supplier's cancel");
        let env = envelope::decode(&bytes).expect("an envelope");
        if let Some(Body::ServiceCancel(sc)) = &env.body {
            assert!(sc.from_supplier);
            c.send(&envelope::encode(&envelope::envelope(
                100,
                env.request_id,
                Body::Ack(Ack {
                    size: 0,
                    hash: vec![],
                }),
            )));
            break;
        }
    }
    let out = dropping.join().expect("the drop command");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = c.request(18, hire());
    assert_eq!(
        reason(&again),
        Some(FailReason::NotTrusted),
        "a dropped customer re-hired: {again:?}"
    );
    assert_eq!(
        reason(&c.request(19, audit(1))),
        Some(FailReason::NoService)
    );
}

/// G9 (b): a friend re-signs its identity with a new Noise key and pushes it on its open
/// session: the node adopts it, and the session authenticated with the retired key is closed
/// (the friend redials with its current key, which logs in).
#[test]
fn a_session_on_a_noise_key_a_newer_revision_retired_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("node");
    init(&home, "node");
    let (old_keys, me) = stranger();
    add_peer(&home, &me.card());
    let _node = Node::start(&home);
    wait_for("node up", 20, || try_status(&home));
    let addr = listen_addr(&home);
    let mut c = RawClient::login(&addr, &old_keys, &me);
    let pong = c.request(2, Body::Ping(bitdust::proto::Ping { nonce: 7 }));
    assert!(matches!(pong.body, Some(Body::Pong(_))), "{pong:?}");

    // Same signing key, a new Noise key, the next revision.
    let fresh = bitdust::crypto::keys::NodeKeys::generate(&mut rand::rngs::OsRng);
    let new_keys = bitdust::crypto::keys::NodeKeys::from_secret_bytes(
        &old_keys.signing_secret_bytes(),
        &fresh.noise_secret_bytes(),
    )
    .expect("keys");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let newer = bitdust::crypto::identity::Identity::create(
        &new_keys,
        "mallory",
        vec!["tcp://127.0.0.1:9".into()],
        2,
        now,
    )
    .expect("identity");
    c.send(&envelope::encode(&envelope::envelope(
        3,
        0,
        Body::Identity(bitdust::proto::IdentityExchange {
            identity: Some(newer.signed().clone()),
            ..Default::default()
        }),
    )));
    assert!(
        c.closed_by_peer(),
        "the session on the retired key is still open"
    );
    // The new key logs in.
    let mut again = RawClient::login(&addr, &new_keys, &newer);
    let pong = again.request(2, Body::Ping(bitdust::proto::Ping { nonce: 8 }));
    assert!(matches!(pong.body, Some(Body::Pong(_))), "{pong:?}");
}
