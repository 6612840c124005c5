//! A second implementation of the wire protocol, written from `proto/PROTOCOL.md` alone, with a
//! different Noise implementation (`noise-protocol` + `noise-rust-crypto`, not snow) and
//! nothing from `bitdust::net` or `bitdust::crypto`: only the prost message types. It talks to
//! the real node binary, and checks the byte-level test vectors that live beside the spec.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use noise_protocol::patterns::noise_xx;
use noise_protocol::{CipherState, DH, HandshakeState, U8Array};
use noise_rust_crypto::{Blake2s, ChaCha20Poly1305, X25519};
use prost::Message as _;

use bitdust::proto::envelope::Body;
use bitdust::proto::{
    DeleteFragment, Envelope, Fail, FailReason, FragmentId, IdentityBody, IdentityExchange,
    ListFragments, Ping, Pong, RetrieveFragment, ServiceRefuse, ServiceRequest, SignedIdentity,
    StoreFragment,
};
use common::{bitdust, init, wait_for};

// ---------------------------------------------------------------- from PROTOCOL.md

const PROLOGUE: &[u8] = b"bitdust.v1";
const VERSION: u32 = 1;
const IDENTITY_CONTEXT: &[u8] = b"bitdust.v1.identity\0";
const NODE_ID_CONTEXT: &str = "bitdust.v1 node id";
const CARD_PREFIX: &str = "bitdust1:";
const MAX_NOISE_MESSAGE: usize = 65535;
const TAG: usize = 16;
const MAX_CHUNK_DATA: usize = MAX_NOISE_MESSAGE - TAG - 1;
const FLAG_MORE: u8 = 0;
const FLAG_FINAL: u8 = 1;

fn node_id(signing_key: &[u8; 32]) -> String {
    hex::encode(&blake3::derive_key(NODE_ID_CONTEXT, signing_key)[..16])
}

fn sign_identity(key: &SigningKey, body: &IdentityBody) -> SignedIdentity {
    let body = body.encode_to_vec();
    let mut message = IDENTITY_CONTEXT.to_vec();
    message.extend_from_slice(&body);
    SignedIdentity {
        signature: key.sign(&message).to_bytes().to_vec(),
        body,
    }
}

/// Checks a signed identity as the spec says; returns its body.
fn verify_identity(signed: &SignedIdentity) -> IdentityBody {
    assert!(signed.body.len() + signed.signature.len() <= 4096);
    let body = IdentityBody::decode(signed.body.as_slice()).expect("body decodes");
    assert_eq!(body.format, 1);
    let key: [u8; 32] = body.signing_key.as_slice().try_into().expect("32 bytes");
    let signature =
        ed25519_dalek::Signature::from_slice(&signed.signature).expect("64-byte signature");
    let mut message = IDENTITY_CONTEXT.to_vec();
    message.extend_from_slice(&signed.body);
    VerifyingKey::from_bytes(&key)
        .expect("a valid key")
        .verify_strict(&message, &signature)
        .expect("signature verifies");
    body
}

fn card(signed: &SignedIdentity) -> String {
    format!(
        "{CARD_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(signed.encode_to_vec())
    )
}

fn parse_card(card: &str) -> SignedIdentity {
    let b64 = card.trim().strip_prefix(CARD_PREFIX).expect("card prefix");
    let bytes = URL_SAFE_NO_PAD.decode(b64).expect("base64url");
    SignedIdentity::decode(bytes.as_slice()).expect("SignedIdentity")
}

/// One logical message as framed transport chunks: each chunk's plaintext is a flag byte, then
/// up to 65518 bytes of data; each sealed chunk goes in one frame (4-byte big-endian length).
fn seal_message(cipher: &mut Cipher, message: &[u8]) -> Vec<u8> {
    let pieces: Vec<&[u8]> = if message.is_empty() {
        vec![&[]]
    } else {
        message.chunks(MAX_CHUNK_DATA).collect()
    };
    let mut wire = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let flag = if i + 1 == pieces.len() {
            FLAG_FINAL
        } else {
            FLAG_MORE
        };
        let mut plain = vec![flag];
        plain.extend_from_slice(piece);
        let sealed = cipher.encrypt_vec(&plain);
        wire.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
        wire.extend_from_slice(&sealed);
    }
    wire
}

type Handshake = HandshakeState<X25519, ChaCha20Poly1305, Blake2s>;
type Cipher = CipherState<ChaCha20Poly1305>;

struct Client {
    stream: TcpStream,
    send: Cipher,
    recv: Cipher,
    remote_static: [u8; 32],
    next_id: u64,
}

fn write_frame(stream: &mut TcpStream, body: &[u8]) {
    assert!(body.len() <= MAX_NOISE_MESSAGE);
    let mut wire = (body.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(body);
    stream.write_all(&wire).expect("write");
}

fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let len = u32::from_be_bytes(len) as usize;
    assert!(len <= MAX_NOISE_MESSAGE, "frame of {len} bytes");
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

impl Client {
    /// TCP connect, then Noise XX as initiator: -> e; <- e, ee, s, es; -> s, se. Every
    /// handshake payload is empty.
    fn connect(addr: &str, static_key: &[u8; 32]) -> Client {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let s = <X25519 as DH>::Key::from_slice(static_key);
        let mut hs = Handshake::new(noise_xx(), true, PROLOGUE, Some(s), None, None, None);
        write_frame(&mut stream, &hs.write_message_vec(&[]).expect("msg 1"));
        let msg2 = read_frame(&mut stream).expect("msg 2");
        assert!(
            hs.read_message_vec(&msg2)
                .expect("msg 2 decrypts")
                .is_empty()
        );
        write_frame(&mut stream, &hs.write_message_vec(&[]).expect("msg 3"));
        assert!(hs.completed());
        let remote_static = hs.get_rs().expect("responder's static key");
        let (send, recv) = hs.get_ciphers();
        Client {
            stream,
            send,
            recv,
            remote_static,
            next_id: 1,
        }
    }

    fn send_message(&mut self, message: &[u8]) {
        let wire = seal_message(&mut self.send, message);
        self.stream.write_all(&wire).expect("write");
    }

    fn recv_message(&mut self) -> Option<Vec<u8>> {
        let mut message = Vec::new();
        loop {
            let frame = read_frame(&mut self.stream)?;
            let plain = self.recv.decrypt_vec(&frame).expect("chunk decrypts");
            let (&flag, data) = plain.split_first().expect("flag byte");
            message.extend_from_slice(data);
            match flag {
                FLAG_FINAL => return Some(message),
                FLAG_MORE => assert!(!data.is_empty(), "empty continuation chunk"),
                other => panic!("unknown chunk flag {other}"),
            }
        }
    }

    fn send_envelope(&mut self, request_id: u64, reply_to: u64, body: Body) {
        let envelope = Envelope {
            version: VERSION,
            request_id,
            reply_to,
            body: Some(body),
        };
        self.send_message(&envelope.encode_to_vec());
    }

    fn recv_envelope(&mut self) -> Option<Envelope> {
        let bytes = self.recv_message()?;
        let envelope = Envelope::decode(bytes.as_slice()).expect("an Envelope");
        assert_eq!(envelope.version, VERSION);
        assert_ne!(envelope.request_id, 0);
        Some(envelope)
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends a request and waits for the envelope whose reply_to names it. Requests the node
    /// makes meanwhile are answered as the spec asks: Ping with Pong, anything else with a
    /// Fail(NO_SERVICE) or, for a service request, a ServiceRefuse (this client serves nothing).
    fn request(&mut self, body: Body) -> Body {
        let id = self.take_id();
        self.send_envelope(id, 0, body);
        loop {
            let envelope = self.recv_envelope().expect("a reply before the close");
            if envelope.reply_to == id {
                return envelope.body.expect("a body");
            }
            if envelope.reply_to != 0 {
                continue;
            }
            let answer = match envelope.body {
                Some(Body::Ping(Ping { nonce })) => Body::Pong(Pong { nonce }),
                Some(Body::ServiceRequest(_)) => Body::ServiceRefuse(ServiceRefuse {
                    reason: FailReason::NoService as i32,
                    detail: "a test client".into(),
                }),
                Some(Body::Identity(_)) | Some(Body::Fail(_)) | Some(Body::Pong(_)) => continue,
                _ => Body::Fail(Fail {
                    reason: FailReason::NoService as i32,
                    detail: "a test client".into(),
                }),
            };
            let reply_id = self.take_id();
            self.send_envelope(reply_id, envelope.request_id, answer);
        }
    }
}

#[test]
fn a_client_written_from_the_spec_talks_to_a_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("node");
    let printed_id = init(&home, "spec-node");

    // The node's card: its node id derives from its signing key as the spec says.
    let out = bitdust(&home, &["id"]);
    assert!(out.status.success());
    let node_card = parse_card(&String::from_utf8_lossy(&out.stdout));
    let node_body = verify_identity(&node_card);
    let node_signing: [u8; 32] = node_body.signing_key.as_slice().try_into().expect("32");
    assert_eq!(node_id(&node_signing), printed_id);
    let addr = node_body.contacts[0]
        .strip_prefix("tcp://")
        .expect("a tcp contact")
        .to_string();

    // Our own identity, signed by hand, given to the node as a card.
    let signing = SigningKey::generate(&mut rand::rngs::OsRng);
    let noise_secret = <X25519 as DH>::genkey();
    let noise_public = <X25519 as DH>::pubkey(&noise_secret);
    let mine = sign_identity(
        &signing,
        &IdentityBody {
            format: 1,
            signing_key: signing.verifying_key().to_bytes().to_vec(),
            noise_key: noise_public.to_vec(),
            name: "second implementation".into(),
            contacts: vec!["tcp://127.0.0.1:9".into()],
            revision: 1,
            timestamp: 1_790_000_000,
        },
    );
    let my_id = node_id(&signing.verifying_key().to_bytes());
    let added = bitdust(&home, &["peer", "add", &card(&mine)]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert!(String::from_utf8_lossy(&added.stdout).contains(&my_id));
    let _node = common::Node::start(&home);
    wait_for("the node listens", 20, || TcpStream::connect(&addr).ok());

    // Handshake, then identities: the initiator first, the responder's answer second.
    let mut secret = [0u8; 32];
    secret.copy_from_slice(noise_secret.as_slice());
    let mut client = Client::connect(&addr, &secret);
    let id = client.take_id();
    client.send_envelope(
        id,
        0,
        Body::Identity(IdentityExchange {
            identity: Some(mine.clone()),
            features: 0,
        }),
    );
    let hello = client.recv_envelope().expect("the node's identity");
    let Some(Body::Identity(IdentityExchange {
        identity: Some(theirs),
        features,
    })) = hello.body
    else {
        panic!("identity first, got {hello:?}");
    };
    // It reads flag 0x02 chunks (§4); this client said it does not, so it gets none.
    assert_eq!(features & 1, 1, "features {features}");
    let theirs = verify_identity(&theirs);
    assert_eq!(theirs.noise_key, client.remote_static.to_vec());
    assert_eq!(theirs.signing_key, node_body.signing_key);

    // Ping.
    let pong = client.request(Body::Ping(Ping { nonce: 0x5eed }));
    assert_eq!(pong, Body::Pong(Pong { nonce: 0x5eed }));

    // Hire space.
    let hired = client.request(Body::ServiceRequest(ServiceRequest {
        space: 64 << 20,
        position: 0,
        data_shards: 2,
        parity_shards: 1,
    }));
    assert!(
        matches!(hired, Body::ServiceAccept(ref a) if a.space == 64 << 20),
        "{hired:?}"
    );

    // Store a fragment that needs several chunks each way.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let hash = blake3::hash(&data).as_bytes().to_vec();
    let fragment = FragmentId {
        block: blake3::hash(b"block one").as_bytes().to_vec(),
        position: 1,
    };
    let stored = client.request(Body::StoreFragment(StoreFragment {
        id: Some(fragment.clone()),
        data: data.clone(),
        hash: hash.clone(),
    }));
    assert!(
        matches!(&stored, Body::Ack(a) if a.size == data.len() as u64 && a.hash == hash),
        "{stored:?}"
    );

    // A wrong hash is refused and stores nothing.
    let bad = client.request(Body::StoreFragment(StoreFragment {
        id: Some(FragmentId {
            block: blake3::hash(b"block two").as_bytes().to_vec(),
            position: 0,
        }),
        data: vec![1, 2, 3],
        hash: vec![0; 32],
    }));
    assert!(
        matches!(&bad, Body::Fail(f) if f.reason == FailReason::HashMismatch as i32),
        "{bad:?}"
    );

    // List.
    let listed = client.request(Body::ListFragments(ListFragments {
        after: None,
        limit: 100,
    }));
    let Body::FragmentList(list) = listed else {
        panic!("a list, got {listed:?}");
    };
    assert!(!list.more);
    assert_eq!(list.fragments.len(), 1);
    assert_eq!(list.fragments[0].id.as_ref(), Some(&fragment));
    assert_eq!(list.fragments[0].size, data.len() as u64);
    assert_eq!(list.fragments[0].hash, hash);
    // No limit: a full page, not one item.
    let second = FragmentId {
        block: blake3::hash(b"block three").as_bytes().to_vec(),
        position: 1,
    };
    let small = client.request(Body::StoreFragment(StoreFragment {
        id: Some(second.clone()),
        data: vec![9; 10],
        hash: blake3::hash(&[9; 10]).as_bytes().to_vec(),
    }));
    assert!(matches!(&small, Body::Ack(_)), "{small:?}");
    let listed = client.request(Body::ListFragments(ListFragments {
        after: None,
        limit: 0,
    }));
    assert!(
        matches!(&listed, Body::FragmentList(l) if l.fragments.len() == 2 && !l.more),
        "{listed:?}"
    );
    let removed = client.request(Body::DeleteFragment(DeleteFragment { id: Some(second) }));
    assert!(matches!(&removed, Body::Ack(_)), "{removed:?}");
    // A block id that is not 32 bytes is malformed, not missing.
    let odd = client.request(Body::RetrieveFragment(RetrieveFragment {
        id: Some(FragmentId {
            block: vec![1; 5],
            position: 0,
        }),
    }));
    assert!(
        matches!(&odd, Body::Fail(f) if f.reason == FailReason::Malformed as i32),
        "{odd:?}"
    );

    // Retrieve.
    let got = client.request(Body::RetrieveFragment(RetrieveFragment {
        id: Some(fragment.clone()),
    }));
    assert!(
        matches!(&got, Body::FragmentData(d) if d.data == data && d.id.as_ref() == Some(&fragment)),
        "retrieved something else"
    );

    // Delete, then it is gone.
    let deleted = client.request(Body::DeleteFragment(DeleteFragment {
        id: Some(fragment.clone()),
    }));
    assert!(
        matches!(&deleted, Body::Ack(a) if a.size == data.len() as u64),
        "{deleted:?}"
    );
    let gone = client.request(Body::RetrieveFragment(RetrieveFragment {
        id: Some(fragment),
    }));
    assert!(
        matches!(&gone, Body::Fail(f) if f.reason == FailReason::NotFound as i32),
        "{gone:?}"
    );

    // Another version is told UNSUPPORTED_VERSION in a version 1 envelope, then closed.
    let future = Envelope {
        version: 2,
        request_id: 999,
        reply_to: 0,
        body: Some(Body::Ping(Ping { nonce: 1 })),
    };
    client.send_message(&future.encode_to_vec());
    let said = loop {
        let envelope = client.recv_envelope().expect("a Fail before the close");
        if envelope.reply_to == 999 {
            break envelope;
        }
    };
    assert!(
        matches!(&said.body, Some(Body::Fail(f)) if f.reason == FailReason::UnsupportedVersion as i32),
        "{said:?}"
    );
    assert!(client.recv_message().is_none(), "closed after the Fail");
}

// ---------------------------------------------------------------- test vectors

const VECTORS_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/test-vectors.json");

/// 32 bytes counting up from `start`: the fixed keys of the vectors.
fn counting(start: u8) -> [u8; 32] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

/// The vectors' fragment data: byte i is (i * 7) mod 251.
fn pattern(len: u32) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn frame_lengths(wire: &[u8]) -> Vec<u32> {
    let mut lengths = Vec::new();
    let mut rest = wire;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
        lengths.push(len);
        rest = &rest[4 + len as usize..];
    }
    lengths
}

fn envelope_bytes(request_id: u64, reply_to: u64, body: Body) -> Vec<u8> {
    Envelope {
        version: VERSION,
        request_id,
        reply_to,
        body: Some(body),
    }
    .encode_to_vec()
}

/// Computes every vector with this file's own implementation of the spec.
fn compute_vectors() -> serde_json::Value {
    // A signed identity, its card and its node id.
    let signing_secret = counting(0x00);
    let initiator_static = counting(0x20);
    let signing = SigningKey::from_bytes(&signing_secret);
    let noise_key = <X25519 as DH>::pubkey(&<X25519 as DH>::Key::from_slice(&initiator_static));
    let body = IdentityBody {
        format: 1,
        signing_key: signing.verifying_key().to_bytes().to_vec(),
        noise_key: noise_key.to_vec(),
        name: "vector".into(),
        contacts: vec!["tcp://192.0.2.1:7771".into()],
        revision: 1,
        timestamp: 1_790_000_000,
    };
    let signed = sign_identity(&signing, &body);
    let identity = serde_json::json!({
        "signing_secret": hex::encode(signing_secret),
        "noise_secret": hex::encode(initiator_static),
        "signing_key": hex::encode(&body.signing_key),
        "noise_key": hex::encode(&body.noise_key),
        "name": body.name,
        "contacts": body.contacts,
        "revision": body.revision,
        "timestamp": body.timestamp,
        "body": hex::encode(&signed.body),
        "signature": hex::encode(&signed.signature),
        "signed_identity": hex::encode(signed.encode_to_vec()),
        "card": card(&signed),
        "node_id": node_id(&signing.verifying_key().to_bytes()),
    });

    // A session under fixed static and ephemeral keys.
    let key = |k: [u8; 32]| <X25519 as DH>::Key::from_slice(&k);
    let (i_s, i_e, r_s, r_e) = (
        counting(0x20),
        counting(0x40),
        counting(0x60),
        counting(0x80),
    );
    let mut initiator = Handshake::new(
        noise_xx(),
        true,
        PROLOGUE,
        Some(key(i_s)),
        Some(key(i_e)),
        None,
        None,
    );
    let mut responder = Handshake::new(
        noise_xx(),
        false,
        PROLOGUE,
        Some(key(r_s)),
        Some(key(r_e)),
        None,
        None,
    );
    let msg1 = initiator.write_message_vec(&[]).expect("msg 1");
    responder.read_message_vec(&msg1).expect("read 1");
    let msg2 = responder.write_message_vec(&[]).expect("msg 2");
    initiator.read_message_vec(&msg2).expect("read 2");
    let msg3 = initiator.write_message_vec(&[]).expect("msg 3");
    responder.read_message_vec(&msg3).expect("read 3");
    assert_eq!(initiator.get_hash(), responder.get_hash());
    let (mut i_send, _) = initiator.get_ciphers();
    let (_, mut r_send) = responder.get_ciphers();

    let hello = envelope_bytes(
        1,
        0,
        Body::Identity(IdentityExchange {
            identity: Some(signed.clone()),
            features: 0,
        }),
    );
    let data = pattern(70_000);
    let store = envelope_bytes(
        2,
        0,
        Body::StoreFragment(StoreFragment {
            id: Some(FragmentId {
                block: blake3::hash(b"vector block").as_bytes().to_vec(),
                position: 3,
            }),
            hash: blake3::hash(&data).as_bytes().to_vec(),
            data,
        }),
    );
    let ack = envelope_bytes(
        1,
        2,
        Body::Ack(bitdust::proto::Ack {
            size: 70_000,
            hash: blake3::hash(&pattern(70_000)).as_bytes().to_vec(),
        }),
    );
    let hello_wire = seal_message(&mut i_send, &hello);
    let store_wire = seal_message(&mut i_send, &store);
    let ack_wire = seal_message(&mut r_send, &ack);
    let last_frame = {
        let lengths = frame_lengths(&store_wire);
        let last = *lengths.last().expect("frames") as usize;
        hex::encode(&store_wire[store_wire.len() - 4 - last..])
    };
    serde_json::json!({
        "identity": identity,
        "session": {
            "noise": "Noise_XX_25519_ChaChaPoly_BLAKE2s",
            "prologue": String::from_utf8_lossy(PROLOGUE),
            "initiator_static_secret": hex::encode(i_s),
            "initiator_ephemeral_secret": hex::encode(i_e),
            "responder_static_secret": hex::encode(r_s),
            "responder_ephemeral_secret": hex::encode(r_e),
            "handshake": [
                hex::encode(frame(&msg1)),
                hex::encode(frame(&msg2)),
                hex::encode(frame(&msg3)),
            ],
            "handshake_hash": hex::encode(initiator.get_hash()),
            "messages": [
                {
                    "note": "initiator -> responder, nonce 0: its identity (the identity vector above), one chunk",
                    "plaintext": hex::encode(&hello),
                    "wire": hex::encode(&hello_wire),
                },
                {
                    "note": "initiator -> responder, nonces 1-2: StoreFragment of pattern(70000), two chunks",
                    "plaintext_len": store.len(),
                    "plaintext_blake3": blake3::hash(&store).to_hex().to_string(),
                    "wire_len": store_wire.len(),
                    "wire_blake3": blake3::hash(&store_wire).to_hex().to_string(),
                    "frame_lengths": frame_lengths(&store_wire),
                    "wire_head": hex::encode(&store_wire[..64]),
                    "last_frame": last_frame,
                },
                {
                    "note": "responder -> initiator, nonce 0: the Ack answering request 2, one chunk",
                    "plaintext": hex::encode(&ack),
                    "wire": hex::encode(&ack_wire),
                },
            ],
        },
        "slice": slice_vector(),
    })
}

/// §8.10: the Bao slice of pattern(5000) for offset 2048, length 1024 (the Bao crate's
/// outboard encoding, as a second implementation of the node's `data::audit::slice_of`).
fn slice_vector() -> serde_json::Value {
    let fragment = pattern(5000);
    let (offset, length) = (2048u64, 1024u64);
    let (outboard, hash) = bao::encode::outboard(&fragment);
    let mut extractor = bao::encode::SliceExtractor::new_outboard(
        std::io::Cursor::new(&fragment),
        std::io::Cursor::new(&outboard),
        offset,
        length,
    );
    let mut slice = Vec::new();
    std::io::Read::read_to_end(&mut extractor, &mut slice).expect("slice");
    serde_json::json!({
        "about": "fragment = pattern(5000); SliceChallenge{offset 2048, length 1024}",
        "fragment_blake3": hash.to_hex().to_string(),
        "offset": offset,
        "length": length,
        "slice": hex::encode(&slice),
    })
}

/// The vectors beside PROTOCOL.md match what this implementation computes, and what the
/// node's own code computes (identity signing, card and node id here; the chunked framing in
/// `bitdust::net::noise`'s unit tests). `BITDUST_WRITE_VECTORS=1` rewrites the file.
#[test]
fn the_test_vectors_hold() {
    let mut computed = compute_vectors();
    // The recovery record's sealing needs the node's recovery key derivation (not on the wire):
    // its vector is the node's (checked by `store::catalog`'s tests); what a supplier must do
    // with it, from PROTOCOL.md §8.5 alone, is checked below.
    let on_disk: Option<serde_json::Value> = std::fs::read_to_string(VECTORS_FILE)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(record) = on_disk.as_ref().map(|v| v["recovery_record"].clone()) {
        computed["recovery_record"] = record;
    }
    if std::env::var_os("BITDUST_WRITE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&computed).expect("json") + "\n";
        std::fs::write(VECTORS_FILE, text).expect("write vectors");
    }
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(VECTORS_FILE).expect("vectors file"))
            .expect("vectors parse");
    assert_eq!(
        computed, stored,
        "computed vectors differ from {VECTORS_FILE}"
    );

    // A supplier's view of the recovery record (§8.5): the owner's signature over the domain
    // string and every byte before it verifies, and the clear header gives the revision and date.
    let r = &stored["recovery_record"];
    let sealed = hex::decode(r["sealed"].as_str().expect("sealed")).expect("hex");
    let owner: [u8; 32] = hex::decode(r["owner_public"].as_str().expect("key"))
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    let owner = VerifyingKey::from_bytes(&owner).expect("a key");
    let (signed, signature) = sealed.split_at(sealed.len() - 64);
    let signature = ed25519_dalek::Signature::from_slice(signature).expect("64 bytes");
    owner
        .verify_strict(
            &[b"bitdust recovery record v1\0".as_slice(), signed].concat(),
            &signature,
        )
        .expect("the owner's signature");
    assert_eq!(&sealed[..5], b"BDRR\x02");
    let be = |at: usize| u64::from_be_bytes(sealed[at..at + 8].try_into().expect("8"));
    assert_eq!(Some(be(5)), r["revision"].as_u64());
    assert_eq!(Some(be(13)), r["created_at"].as_u64());
    assert_eq!(
        hex::encode(&sealed[..53]),
        r["header"].as_str().expect("header")
    );

    // The node's slices (§8.10) are the same bytes, and check against the fragment's BLAKE3.
    let v = &stored["slice"];
    let fragment = pattern(5000);
    let slice = hex::decode(v["slice"].as_str().expect("slice")).expect("hex");
    let (offset, length) = (2048, 1024);
    assert_eq!(
        bitdust::data::audit::slice_of(&fragment, offset, length),
        Some(slice.clone())
    );
    assert!(bitdust::data::audit::slice_checks(
        &slice,
        blake3::hash(&fragment).as_bytes(),
        5000,
        offset,
        length
    ));

    // The node's implementation of identities agrees.
    let v = &stored["identity"];
    let unhex = |key: &str| hex::decode(v[key].as_str().expect(key)).expect("hex");
    let keys = bitdust::crypto::keys::NodeKeys::from_secret_bytes(
        &unhex("signing_secret"),
        &unhex("noise_secret"),
    )
    .expect("keys");
    let identity = bitdust::crypto::identity::Identity::create(
        &keys,
        "vector",
        vec!["tcp://192.0.2.1:7771".into()],
        1,
        1_790_000_000,
    )
    .expect("identity");
    assert_eq!(identity.card(), v["card"].as_str().expect("card"));
    assert_eq!(
        identity.node_id().to_string(),
        v["node_id"].as_str().expect("id")
    );
    assert_eq!(identity.to_bytes(), unhex("signed_identity"));
    let parsed = bitdust::crypto::identity::Identity::from_card(v["card"].as_str().expect("card"))
        .expect("the node reads the vector card");
    assert_eq!(parsed.noise_key().to_vec(), unhex("noise_key"));

    // snow (the node's Noise library), with the same fixed keys, produces the same handshake.
    let s = &stored["session"];
    let unhex = |v: &serde_json::Value| hex::decode(v.as_str().expect("hex")).expect("hex");
    let (i_s, i_e) = (
        unhex(&s["initiator_static_secret"]),
        unhex(&s["initiator_ephemeral_secret"]),
    );
    let mut hs = snow::Builder::new(s["noise"].as_str().expect("name").parse().expect("params"))
        .local_private_key(&i_s)
        .expect("s")
        .fixed_ephemeral_key_for_testing_only(&i_e)
        .prologue(PROLOGUE)
        .expect("prologue")
        .build_initiator()
        .expect("initiator");
    let mut buf = vec![0u8; 65535];
    let n = hs.write_message(&[], &mut buf).expect("msg 1");
    assert_eq!(frame(&buf[..n]), unhex(&s["handshake"][0]));
    let msg2 = unhex(&s["handshake"][1]);
    hs.read_message(&msg2[4..], &mut buf).expect("msg 2");
    let n = hs.write_message(&[], &mut buf).expect("msg 3");
    assert_eq!(frame(&buf[..n]), unhex(&s["handshake"][2]));
    assert_eq!(
        hs.get_handshake_hash().to_vec(),
        unhex(&s["handshake_hash"])
    );
}
