//! A hostile supplier: a test peer the real node hires as a supplier, written from
//! `proto/PROTOCOL.md` alone like the second implementation in `tests/protocol.rs` (the
//! `noise-protocol` crate, not snow; nothing from `bitdust::net` or `bitdust::crypto`, only the
//! prost message types).
//!
//! It listens on loopback as a Noise responder, checks the dialer's identity, answers with its
//! own, and serves what a supplier serves — service requests, store, retrieve, list, audit,
//! delete, cancel, pings — honestly by default, from memory. A behaviour hook decides per
//! request: answer honestly, refuse, ignore, answer late, answer something else, or drop the
//! connection. Counters say what it received.
//!
//! ```ignore
//! let peer = Hostile::start("mallory");
//! add_peer(&home, &peer.card());          // `bitdust peer add`: the node dials it and hires it
//! peer.behave(|r| match r.body {
//!     Body::AuditChallenge(_) | Body::RetrieveFragment(_) => Action::Refuse(FailReason::NoService),
//!     _ => Action::Honest,
//! });
//! assert!(peer.received("audit") > 0);
//! ```
//!
//! Owned by the audit work (branch h18-audit); other tests write their behaviours through the
//! hook in their own files.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer as _, SigningKey};
use noise_protocol::patterns::noise_xx;
use noise_protocol::{CipherState, DH, HandshakeState, U8Array};
use noise_rust_crypto::{Blake2s, ChaCha20Poly1305, X25519};
use prost::Message as _;

use bitdust::proto::envelope::Body;
use bitdust::proto::{
    Ack, AuditProof, Envelope, Fail, FailReason, FragmentData, FragmentId, FragmentInfo,
    FragmentList, FragmentSlice, IdentityBody, IdentityExchange, Pong, ServiceAccept,
    SignedIdentity,
};

// ---------------------------------------------------------------- from PROTOCOL.md

const PROLOGUE: &[u8] = b"bitdust.v1";
const VERSION: u32 = 1;
const IDENTITY_CONTEXT: &[u8] = b"bitdust.v1.identity\0";
const NODE_ID_CONTEXT: &str = "bitdust.v1 node id";
const MAX_NOISE_MESSAGE: usize = 65535;
const MAX_CHUNK_DATA: usize = MAX_NOISE_MESSAGE - 16 - 1;
const FLAG_MORE: u8 = 0;
const FLAG_FINAL: u8 = 1;
/// The receiver's message limit (the node's default `max_message`).
const MAX_MESSAGE: usize = 32 << 20;
const LIST_PAGE: usize = 1000;
const MAX_AUDIT_RANGE: u64 = 1 << 20;
const MAX_SLICE: u64 = 64 * 1024;

type Handshake = HandshakeState<X25519, ChaCha20Poly1305, Blake2s>;
type Cipher = CipherState<ChaCha20Poly1305>;

/// A node id (32 hex characters) from an Ed25519 public key, as §5 says.
pub fn node_id_of(signing_key: &[u8]) -> String {
    hex::encode(&blake3::derive_key(NODE_ID_CONTEXT, signing_key)[..16])
}

// ---------------------------------------------------------------- the API

/// One request the node sent, as the hook sees it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The node id of the customer that sent it.
    pub from: String,
    pub body: Body,
    /// Whether the fragment the request names is held (false when it names none).
    pub held: bool,
}

impl Request {
    /// The request's kind, as counted: "ping", "service", "cancel", "store", "retrieve",
    /// "list", "delete", "audit", "other".
    pub fn kind(&self) -> &'static str {
        kind(&self.body)
    }

    /// The fragment the request names, if any (block bytes, position).
    pub fn fragment(&self) -> Option<(Vec<u8>, u32)> {
        fragment_of(&self.body)
    }
}

/// What the hostile supplier does with one request.
#[derive(Debug, Clone)]
pub enum Action {
    /// What an honest supplier answers.
    Honest,
    /// `Fail(reason)` (a `ServiceRefuse` for a service request).
    Refuse(FailReason),
    /// No reply at all (the node's request times out); the session stays up.
    Ignore,
    /// The honest answer, after this long (pings and other requests are still answered meanwhile).
    Delay(Duration),
    /// This body as the reply.
    Reply(Body),
    /// Store nothing but answer as if stored (a store is acknowledged, the bytes are dropped;
    /// later requests for it find it "held" with no bytes: audits get a wrong proof, retrieves
    /// empty data). For other requests, the same as `Honest`.
    Discard,
    /// Close the connection without a reply.
    Close,
}

type Hook = dyn Fn(&Request) -> Action + Send + Sync;
/// One customer's fragments: (block, position) → stored bytes.
type Held = BTreeMap<(Vec<u8>, u32), Vec<u8>>;

/// What every connection shares: the behaviour, the held fragments, the counters.
struct Shared {
    hook: RwLock<Arc<Hook>>,
    /// Per customer: (block, position) → stored bytes.
    held: Mutex<BTreeMap<String, Held>>,
    counters: Mutex<BTreeMap<&'static str, u64>>,
    streams: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
    /// Away: every new connection is closed at once (the node's dials fail).
    away: AtomicBool,
}

/// A hostile supplier listening on loopback; stops when dropped.
pub struct Hostile {
    signing: SigningKey,
    identity: SignedIdentity,
    addr: String,
    shared: Arc<Shared>,
}

impl Hostile {
    /// A new peer with fresh keys, honest until told otherwise.
    pub fn start(name: &str) -> Hostile {
        Hostile::start_with_key(name, SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// A peer with this signing key (a test that restarts a peer keeps its node id); a fresh
    /// Noise key and a new identity revision each time.
    pub fn start_with_key(name: &str, signing: SigningKey) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr").to_string();
        let noise_secret = <X25519 as DH>::genkey();
        let noise_public = <X25519 as DH>::pubkey(&noise_secret);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1_790_000_000);
        let identity = sign_identity(
            &signing,
            &IdentityBody {
                format: 1,
                signing_key: signing.verifying_key().to_bytes().to_vec(),
                noise_key: noise_public.to_vec(),
                name: name.into(),
                contacts: vec![format!("tcp://{addr}")],
                // A restarted peer under the same key must supersede its last revision.
                revision: now,
                timestamp: now,
            },
        );
        let shared = Arc::new(Shared {
            hook: RwLock::new(Arc::new(|_: &Request| Action::Honest)),
            held: Mutex::new(BTreeMap::new()),
            counters: Mutex::new(BTreeMap::new()),
            streams: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            away: AtomicBool::new(false),
        });
        let mut secret = [0u8; 32];
        secret.copy_from_slice(noise_secret.as_slice());
        let (accept_shared, accept_identity) = (shared.clone(), identity.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                if accept_shared.away.load(Ordering::SeqCst) {
                    let _ = stream.shutdown(Shutdown::Both);
                    continue;
                }
                if let Ok(clone) = stream.try_clone() {
                    lock(&accept_shared.streams).push(clone);
                }
                let (shared, identity) = (accept_shared.clone(), accept_identity.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &secret, &identity, &shared);
                });
            }
        });
        Hostile {
            signing,
            identity,
            addr,
            shared,
        }
    }

    /// The contact card to give the node (`bitdust peer add CARD`).
    pub fn card(&self) -> String {
        format!(
            "bitdust1:{}",
            URL_SAFE_NO_PAD.encode(self.identity.encode_to_vec())
        )
    }

    pub fn node_id(&self) -> String {
        node_id_of(&self.signing.verifying_key().to_bytes())
    }

    /// The signing key (to start the same peer again with [`Hostile::start_with_key`]).
    pub fn signing_key(&self) -> SigningKey {
        self.signing.clone()
    }

    /// `host:port` it listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Replaces the behaviour (for requests that arrive from now on).
    pub fn behave(&self, hook: impl Fn(&Request) -> Action + Send + Sync + 'static) {
        *self.shared.hook.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(hook);
    }

    /// Back to honest answers.
    pub fn honest(&self) {
        self.behave(|_| Action::Honest);
    }

    /// Requests of this kind received so far (see [`Request::kind`]).
    pub fn received(&self, kind: &str) -> u64 {
        lock(&self.shared.counters).get(kind).copied().unwrap_or(0)
    }

    /// Every counter.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.shared.counters).clone()
    }

    /// The fragments held for `customer`: (block hex, position, bytes held).
    pub fn held(&self, customer: &str) -> Vec<(String, u32, usize)> {
        lock(&self.shared.held)
            .get(customer)
            .map(|m| {
                m.iter()
                    .map(|((b, p), d)| (hex::encode(b), *p, d.len()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops the bytes of every fragment held, keeping the ids (a supplier that kept only its
    /// list).
    pub fn keep_only_ids(&self) {
        for fragments in lock(&self.shared.held).values_mut() {
            for data in fragments.values_mut() {
                data.clear();
            }
        }
    }

    /// Forgets fragments for which `drop(block, position)` is true (they are no longer listed).
    pub fn forget(&self, drop: impl Fn(&[u8], u32) -> bool) {
        for fragments in lock(&self.shared.held).values_mut() {
            fragments.retain(|(b, p), _| !drop(b, *p));
        }
    }

    /// Closes every open connection (the node sees the peer go; it redials).
    pub fn disconnect(&self) {
        for s in lock(&self.shared.streams).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Hostile {
    /// Goes away: closes every connection and refuses new ones until [`Hostile::come_back`]
    /// (to the node, a supplier whose host is down).
    pub fn go_away(&self) {
        self.shared.away.store(true, Ordering::SeqCst);
        self.disconnect();
    }

    /// Accepts connections again (what it holds is kept).
    pub fn come_back(&self) {
        self.shared.away.store(false, Ordering::SeqCst);
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(&self.addr);
        self.disconnect();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn kind(body: &Body) -> &'static str {
    match body {
        Body::Ping(_) => "ping",
        Body::ServiceRequest(_) => "service",
        Body::ServiceCancel(_) => "cancel",
        Body::StoreFragment(_) => "store",
        Body::RetrieveFragment(_) => "retrieve",
        Body::ListFragments(_) => "list",
        Body::DeleteFragment(_) => "delete",
        Body::AuditChallenge(_) => "audit",
        Body::SliceChallenge(_) => "slice",
        _ => "other",
    }
}

fn fragment_of(body: &Body) -> Option<(Vec<u8>, u32)> {
    let id = match body {
        Body::StoreFragment(r) => r.id.as_ref(),
        Body::RetrieveFragment(r) => r.id.as_ref(),
        Body::DeleteFragment(r) => r.id.as_ref(),
        Body::AuditChallenge(r) => r.id.as_ref(),
        Body::SliceChallenge(r) => r.id.as_ref(),
        _ => None,
    }?;
    Some((id.block.clone(), id.position))
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

// ---------------------------------------------------------------- the wire

/// Why a connection ended (never a panic: a hostile peer's thread just stops).
#[derive(Debug)]
enum End {
    Io,
    Noise,
    Protocol(&'static str),
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> Self {
        End::Io
    }
}

fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>, End> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_NOISE_MESSAGE {
        return Err(End::Protocol("frame length"));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(body)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut wire = (body.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(body);
    wire
}

/// The sending half: the stream and the responder → initiator cipher, behind one lock so that
/// delayed replies and pongs never interleave chunks.
struct Sender {
    stream: TcpStream,
    cipher: Cipher,
    next_id: u64,
}

impl Sender {
    fn send(&mut self, reply_to: u64, body: Body) -> Result<(), End> {
        let request_id = self.next_id;
        self.next_id += 1;
        let message = Envelope {
            version: VERSION,
            request_id,
            reply_to,
            body: Some(body),
        }
        .encode_to_vec();
        let pieces: Vec<&[u8]> = if message.is_empty() {
            vec![&[]]
        } else {
            message.chunks(MAX_CHUNK_DATA).collect()
        };
        let mut wire = Vec::with_capacity(message.len() + pieces.len() * 21);
        for (i, piece) in pieces.iter().enumerate() {
            let flag = if i + 1 == pieces.len() {
                FLAG_FINAL
            } else {
                FLAG_MORE
            };
            let mut plain = Vec::with_capacity(piece.len() + 1);
            plain.push(flag);
            plain.extend_from_slice(piece);
            wire.extend_from_slice(&frame(&self.cipher.encrypt_vec(&plain)));
        }
        self.stream.write_all(&wire)?;
        Ok(())
    }
}

fn recv_envelope(stream: &mut TcpStream, cipher: &mut Cipher) -> Result<Envelope, End> {
    let mut message = Vec::new();
    loop {
        let sealed = read_frame(stream)?;
        let plain = cipher.decrypt_vec(&sealed).map_err(|_| End::Noise)?;
        let (&flag, data) = plain.split_first().ok_or(End::Protocol("empty chunk"))?;
        message.extend_from_slice(data);
        if message.len() > MAX_MESSAGE {
            return Err(End::Protocol("message too large"));
        }
        match flag {
            FLAG_FINAL => break,
            FLAG_MORE if !data.is_empty() => continue,
            _ => return Err(End::Protocol("bad chunk")),
        }
    }
    let envelope =
        Envelope::decode(message.as_slice()).map_err(|_| End::Protocol("not an envelope"))?;
    if envelope.version != VERSION {
        return Err(End::Protocol("version"));
    }
    Ok(envelope)
}

/// One connection: responder handshake, identity exchange, then requests until it closes.
fn serve(
    mut stream: TcpStream,
    static_secret: &[u8; 32],
    identity: &SignedIdentity,
    shared: &Arc<Shared>,
) -> Result<(), End> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let s = <X25519 as DH>::Key::from_slice(static_secret);
    let mut hs = Handshake::new(noise_xx(), false, PROLOGUE, Some(s), None, None, None);
    let msg1 = read_frame(&mut stream)?;
    hs.read_message_vec(&msg1).map_err(|_| End::Noise)?;
    stream.write_all(&frame(&hs.write_message_vec(&[]).map_err(|_| End::Noise)?))?;
    let msg3 = read_frame(&mut stream)?;
    hs.read_message_vec(&msg3).map_err(|_| End::Noise)?;
    let (mut recv, send) = hs.get_ciphers();
    let remote_static = hs.get_rs().ok_or(End::Noise)?;

    // The dialer's identity first: it must name the Noise key it just proved.
    let hello = recv_envelope(&mut stream, &mut recv)?;
    let Some(Body::Identity(IdentityExchange {
        identity: Some(theirs),
        ..
    })) = hello.body
    else {
        return Err(End::Protocol("identity first"));
    };
    let body =
        IdentityBody::decode(theirs.body.as_slice()).map_err(|_| End::Protocol("identity body"))?;
    if body.noise_key != remote_static.to_vec() {
        return Err(End::Protocol("identity names another noise key"));
    }
    let from = node_id_of(&body.signing_key);
    stream.set_read_timeout(None)?;
    let sender = Arc::new(Mutex::new(Sender {
        stream: stream.try_clone()?,
        cipher: send,
        next_id: 1,
    }));
    lock(&sender).send(
        0,
        Body::Identity(IdentityExchange {
            identity: Some(identity.clone()),
            ..Default::default()
        }),
    )?;
    loop {
        let envelope = recv_envelope(&mut stream, &mut recv)?;
        if envelope.reply_to != 0 {
            continue;
        }
        let Some(body) = envelope.body else { continue };
        if matches!(body, Body::Identity(_) | Body::Fail(_) | Body::Pong(_)) {
            continue;
        }
        let request = Request {
            held: fragment_of(&body).is_some_and(|(b, p)| {
                lock(&shared.held)
                    .get(&from)
                    .is_some_and(|m| m.contains_key(&(b, p)))
            }),
            from: from.clone(),
            body,
        };
        *lock(&shared.counters).entry(request.kind()).or_insert(0) += 1;
        let hook = shared
            .hook
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let action = hook(&request);
        let reply_to = envelope.request_id;
        match action {
            Action::Ignore => {}
            Action::Close => {
                let _ = stream.shutdown(Shutdown::Both);
                return Ok(());
            }
            Action::Reply(body) => lock(&sender).send(reply_to, body)?,
            Action::Refuse(reason) => lock(&sender).send(reply_to, refusal(&request, reason))?,
            Action::Honest => lock(&sender).send(reply_to, honest(shared, &request, false))?,
            Action::Discard => lock(&sender).send(reply_to, honest(shared, &request, true))?,
            Action::Delay(d) => {
                let (sender, shared) = (sender.clone(), shared.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    let body = honest(&shared, &request, false);
                    let _ = lock(&sender).send(reply_to, body);
                });
            }
        }
    }
}

fn fail(reason: FailReason, detail: &str) -> Body {
    Body::Fail(Fail {
        reason: reason as i32,
        detail: detail.into(),
    })
}

fn refusal(request: &Request, reason: FailReason) -> Body {
    match request.body {
        Body::ServiceRequest(_) => Body::ServiceRefuse(bitdust::proto::ServiceRefuse {
            reason: reason as i32,
            detail: "a hostile supplier".into(),
        }),
        _ => fail(reason, "a hostile supplier"),
    }
}

fn key(id: &Option<FragmentId>) -> Option<(Vec<u8>, u32)> {
    let id = id.as_ref()?;
    (id.block.len() == 32).then(|| (id.block.clone(), id.position))
}

/// What an honest supplier answers (`discard`: a store is acknowledged but its bytes dropped).
fn honest(shared: &Shared, request: &Request, discard: bool) -> Body {
    let mut held = lock(&shared.held);
    let mine = held.entry(request.from.clone()).or_default();
    match &request.body {
        Body::Ping(p) => Body::Pong(Pong { nonce: p.nonce }),
        Body::ServiceRequest(r) => Body::ServiceAccept(ServiceAccept { space: r.space }),
        Body::ServiceCancel(_) => Body::Ack(Ack {
            size: 0,
            hash: Vec::new(),
        }),
        Body::StoreFragment(r) => {
            let Some(k) = key(&r.id) else {
                return fail(FailReason::Malformed, "fragment id");
            };
            let hash = blake3::hash(&r.data);
            if r.hash != hash.as_bytes() {
                return fail(FailReason::HashMismatch, "hash");
            }
            let size = r.data.len() as u64;
            mine.insert(k, if discard { Vec::new() } else { r.data.clone() });
            Body::Ack(Ack {
                size,
                hash: hash.as_bytes().to_vec(),
            })
        }
        Body::RetrieveFragment(r) => match key(&r.id) {
            None => fail(FailReason::Malformed, "fragment id"),
            Some(k) => match mine.get(&k) {
                Some(data) => Body::FragmentData(FragmentData {
                    id: r.id.clone(),
                    data: data.clone(),
                }),
                None => fail(FailReason::NotFound, "not held"),
            },
        },
        Body::DeleteFragment(r) => match key(&r.id) {
            None => fail(FailReason::Malformed, "fragment id"),
            Some(k) => match mine.remove(&k) {
                Some(data) => Body::Ack(Ack {
                    size: data.len() as u64,
                    hash: Vec::new(),
                }),
                None => fail(FailReason::NotFound, "not held"),
            },
        },
        Body::ListFragments(r) => {
            let limit = match r.limit as usize {
                0 => LIST_PAGE,
                n => n.min(LIST_PAGE),
            };
            let after = r.after.as_ref().map(|a| (a.block.clone(), a.position));
            let mut page: Vec<FragmentInfo> = mine
                .iter()
                .filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a))
                .take(limit + 1)
                .map(|((b, p), d)| FragmentInfo {
                    id: Some(FragmentId {
                        block: b.clone(),
                        position: *p,
                    }),
                    size: d.len() as u64,
                    hash: blake3::hash(d).as_bytes().to_vec(),
                })
                .collect();
            let more = page.len() > limit;
            page.truncate(limit);
            Body::FragmentList(FragmentList {
                fragments: page,
                more,
            })
        }
        Body::AuditChallenge(r) => {
            let Some(k) = key(&r.id) else {
                return fail(FailReason::Malformed, "fragment id");
            };
            let Ok(nonce) = <[u8; 32]>::try_from(r.nonce.as_slice()) else {
                return fail(FailReason::Malformed, "nonce");
            };
            let Some(data) = mine.get(&k) else {
                return fail(FailReason::NotFound, "not held");
            };
            let range = (r.length > 0 && r.length <= MAX_AUDIT_RANGE)
                .then(|| r.offset.checked_add(r.length))
                .flatten()
                .and_then(|end| data.get(r.offset as usize..end as usize));
            match range {
                Some(bytes) => Body::AuditProof(AuditProof {
                    id: r.id.clone(),
                    proof: blake3::keyed_hash(&nonce, bytes).as_bytes().to_vec(),
                }),
                // A discarded fragment: a proof of nothing (wrong).
                None if data.is_empty() => Body::AuditProof(AuditProof {
                    id: r.id.clone(),
                    proof: blake3::keyed_hash(&nonce, b"").as_bytes().to_vec(),
                }),
                None => fail(FailReason::Malformed, "range"),
            }
        }
        Body::SliceChallenge(r) => {
            let Some(k) = key(&r.id) else {
                return fail(FailReason::Malformed, "id");
            };
            let Some(data) = mine.get(&k) else {
                return fail(FailReason::NotFound, "not held");
            };
            // A discarded fragment: the slice of nothing (wrong); past the end: refused.
            if r.length == 0
                || r.length > MAX_SLICE
                || (r.offset >= data.len() as u64 && !data.is_empty())
            {
                return fail(FailReason::Malformed, "range");
            }
            let (outboard, _) = bao::encode::outboard(data);
            let mut extractor = bao::encode::SliceExtractor::new_outboard(
                std::io::Cursor::new(data),
                std::io::Cursor::new(&outboard),
                r.offset,
                r.length,
            );
            let mut slice = Vec::new();
            let _ = extractor.read_to_end(&mut slice);
            Body::FragmentSlice(FragmentSlice {
                id: r.id.clone(),
                slice,
            })
        }
        _ => fail(
            FailReason::NoService,
            "a hostile supplier serves fragments only",
        ),
    }
}
