//! An authenticated link with one peer: the identity exchange that follows the Noise handshake,
//! then a reader and a writer task with request/reply matching by request id, a bounded outbound
//! queue (backpressure, no unbounded memory) and per-request timeouts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::NetError;
use super::envelope::{self, EnvelopeError};
use super::noise::{
    NoiseReader, NoiseSession, NoiseWriter, handshake_initiator, handshake_responder,
};
use crate::crypto::identity::{Identity, NodeId};
use crate::proto::envelope::Body;
use crate::proto::{Envelope, IdentityExchange, Pong};

/// Binds the protocol into the Noise handshake: a peer of another protocol fails the handshake.
pub const PROLOGUE: &[u8] = b"bitdust.v1";

/// Why the net layer refused or ended a session. The session actor maps it onto its own
/// close reasons; `name` is a stable counter/log key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkClose {
    HandshakeTimeout,
    BadHandshake,
    FrameTooLarge,
    DecryptFailed,
    MessageTooLarge,
    Malformed,
    UnsupportedVersion,
    UnexpectedMessage,
    /// The identity's Noise key is not the key the handshake proved.
    IdentityMismatch,
    /// The identity does not verify.
    BadIdentity,
    /// The identity is older than the newest one this node knows for that peer (or has the
    /// same revision and another Noise key): its key may be retired, so it cannot log in.
    StaleIdentity,
    UnknownPeer,
    WrongPeer,
    PeerClosed,
    IoError,
}

impl LinkClose {
    pub fn name(self) -> &'static str {
        match self {
            LinkClose::HandshakeTimeout => "HandshakeTimeout",
            LinkClose::BadHandshake => "BadHandshake",
            LinkClose::FrameTooLarge => "FrameTooLarge",
            LinkClose::DecryptFailed => "DecryptFailed",
            LinkClose::MessageTooLarge => "MessageTooLarge",
            LinkClose::Malformed => "Malformed",
            LinkClose::UnsupportedVersion => "UnsupportedVersion",
            LinkClose::UnexpectedMessage => "UnexpectedMessage",
            LinkClose::IdentityMismatch => "IdentityMismatch",
            LinkClose::BadIdentity => "BadIdentity",
            LinkClose::StaleIdentity => "StaleIdentity",
            LinkClose::UnknownPeer => "UnknownPeer",
            LinkClose::WrongPeer => "WrongPeer",
            LinkClose::PeerClosed => "PeerClosed",
            LinkClose::IoError => "IoError",
        }
    }
}

/// What this node knows of a friend's newest identity: a session with that friend must prove
/// this Noise key (or present a newer revision, which the node then adopts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewestKey {
    pub revision: u64,
    pub noise_key: [u8; 32],
}

impl NewestKey {
    pub fn of(identity: &Identity) -> Self {
        NewestKey {
            revision: identity.revision(),
            noise_key: *identity.noise_key(),
        }
    }
}

/// Who may complete a handshake with this node.
#[derive(Clone, Debug, Default)]
pub struct TrustPolicy {
    /// Friends, with the newest identity this node knows for each.
    pub trusted: HashMap<NodeId, NewestKey>,
    /// Accept any authenticated node (supplier `accept = "open"`).
    pub open: bool,
}

impl TrustPolicy {
    pub fn allows(&self, node: &NodeId) -> bool {
        self.open || self.trusted.contains_key(node)
    }

    /// Checks an identity whose Noise key the handshake has just proven. A friend's older
    /// revision is refused even though it is validly signed: after a re-sign with a new Noise
    /// key, whoever holds the old key must not log in as that friend.
    pub fn admit(&self, identity: &Identity) -> Result<(), LinkClose> {
        if let Some(newest) = self.trusted.get(&identity.node_id()) {
            let stale = identity.revision() < newest.revision
                || (identity.revision() == newest.revision
                    && identity.noise_key() != &newest.noise_key);
            if stale {
                return Err(LinkClose::StaleIdentity);
            }
        }
        if self.allows(&identity.node_id()) {
            Ok(())
        } else {
            Err(LinkClose::UnknownPeer)
        }
    }
}

pub fn close_reason(e: &NetError) -> LinkClose {
    match e {
        NetError::FrameTooLarge { .. } => LinkClose::FrameTooLarge,
        NetError::HandshakeTimeout => LinkClose::HandshakeTimeout,
        NetError::Handshake(_) => LinkClose::BadHandshake,
        NetError::Decrypt => LinkClose::DecryptFailed,
        NetError::MessageTooLarge { .. } => LinkClose::MessageTooLarge,
        NetError::BadChunk => LinkClose::Malformed,
        NetError::UnexpectedEof | NetError::Closed => LinkClose::PeerClosed,
        NetError::Io(_) => LinkClose::IoError,
    }
}

fn envelope_reason(e: &EnvelopeError) -> LinkClose {
    match e {
        EnvelopeError::UnsupportedVersion(_) => LinkClose::UnsupportedVersion,
        _ => LinkClose::Malformed,
    }
}

/// Runs the Noise handshake, then exchanges signed identities and checks that the peer's
/// identity is signed, names the Noise key it just proved, is the node we meant to reach
/// (outbound) and is allowed by `policy`.
#[allow(clippy::too_many_arguments)] // each is a distinct input of the handshake
pub async fn establish<IO>(
    io: IO,
    outbound: bool,
    noise_secret: &[u8; 32],
    mine: &Identity,
    expected: Option<NodeId>,
    policy: &TrustPolicy,
    timeout: Duration,
    max_message: usize,
) -> Result<(NoiseSession<IO>, Identity), LinkClose>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let work = async {
        let mut session = if outbound {
            handshake_initiator(io, noise_secret, PROLOGUE, timeout).await
        } else {
            handshake_responder(io, noise_secret, PROLOGUE, timeout).await
        }
        .map_err(|e| match e {
            NetError::HandshakeTimeout => LinkClose::HandshakeTimeout,
            NetError::FrameTooLarge { .. } => LinkClose::FrameTooLarge,
            _ => LinkClose::BadHandshake,
        })?;
        session.set_max_message(max_message);
        let hello = envelope::envelope(
            1,
            0,
            Body::Identity(IdentityExchange {
                identity: Some(mine.signed().clone()),
            }),
        );
        session
            .send(&envelope::encode(&hello))
            .await
            .map_err(|e| close_reason(&e))?;
        let bytes = session
            .recv()
            .await
            .map_err(|e| close_reason(&e))?
            .ok_or(LinkClose::PeerClosed)?;
        let theirs = envelope::decode(&bytes).map_err(|e| envelope_reason(&e))?;
        let Some(Body::Identity(IdentityExchange {
            identity: Some(signed),
        })) = theirs.body
        else {
            return Err(LinkClose::UnexpectedMessage);
        };
        let identity = Identity::verify(signed).map_err(|_| LinkClose::BadIdentity)?;
        if identity.noise_key() != &session.remote_static() {
            return Err(LinkClose::IdentityMismatch);
        }
        if expected.is_some_and(|e| e != identity.node_id()) {
            return Err(LinkClose::WrongPeer);
        }
        policy.admit(&identity)?;
        Ok((session, identity))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| LinkClose::HandshakeTimeout)?
}

/// Traffic counters of one link, readable while it runs.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    /// Unix seconds of the last message received.
    pub last_seen: AtomicU64,
}

/// What the reader hands to the session that owns the link.
#[derive(Debug)]
pub enum LinkEvent {
    Pong,
    /// The peer pushed a (possibly newer) identity.
    Identity(Box<Identity>),
    /// An identity push that failed verification.
    ForgedIdentity,
    /// A request for a service (fragments, audits, contracts): answer on the link it came on,
    /// then drop the permit (at most `MAX_IN_FLIGHT` requests per link are being handled).
    Request(Box<Envelope>, LinkHandle, InFlight),
    Closed(LinkClose),
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("the link is closed")]
    Closed,
    #[error("the outbound queue is full")]
    QueueFull,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Envelope>>>>;

/// A cheap, cloneable way to talk to one peer over its established link.
#[derive(Clone)]
pub struct LinkHandle {
    peer: NodeId,
    tx: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    pub stats: Arc<LinkStats>,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

fn lock(p: &Pending) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Envelope>>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl LinkHandle {
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    fn next_id(&self) -> u64 {
        // Request ids start at 2: 1 is the identity exchange of the handshake.
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a request and waits for the envelope that replies to it.
    pub async fn request(&self, body: Body, timeout: Duration) -> Result<Envelope, RequestError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let bytes = envelope::encode(&envelope::envelope(id, 0, body));
        // The timeout covers waiting for queue space as well as for the reply.
        let exchange = async {
            self.tx
                .send(bytes)
                .await
                .map_err(|_| RequestError::Closed)?;
            rx.await.map_err(|_| RequestError::Closed)
        };
        let result = tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(RequestError::Timeout(timeout)));
        lock(&self.pending).remove(&id);
        result
    }

    /// Sends a one-way message, waiting for queue space.
    pub async fn send(&self, body: Body) -> Result<(), RequestError> {
        let bytes = envelope::encode(&envelope::envelope(self.next_id(), 0, body));
        self.tx.send(bytes).await.map_err(|_| RequestError::Closed)
    }

    /// Sends a one-way message if the queue has room now.
    pub fn try_send(&self, body: Body) -> Result<(), RequestError> {
        let bytes = envelope::encode(&envelope::envelope(self.next_id(), 0, body));
        self.tx.try_send(bytes).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RequestError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => RequestError::Closed,
        })
    }

    /// Answers request `to`.
    pub async fn reply(&self, to: u64, body: Body) -> Result<(), RequestError> {
        let bytes = envelope::encode(&envelope::envelope(self.next_id(), to, body));
        self.tx.send(bytes).await.map_err(|_| RequestError::Closed)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The running tasks of a link; dropping this ends them, and every request still waiting for
/// a reply on this link fails at once with `Closed` (rather than waiting out its timeout).
pub struct LinkTasks {
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    pending: Pending,
}

impl Drop for LinkTasks {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        lock(&self.pending).clear();
    }
}

pub type LinkSink = Arc<dyn Fn(LinkEvent) + Send + Sync>;

/// Requests from one peer being handled at once; past this the reader stops reading, and TCP
/// pushes back on the peer. Bounds the memory one peer can make this node hold.
pub const MAX_IN_FLIGHT: usize = 32;

/// A slot of a link's in-flight requests, given back when dropped.
pub type InFlight = tokio::sync::OwnedSemaphorePermit;

use crate::unix_now;

/// Starts the reader and writer of an established session. Pings are answered here, replies
/// matched to their requests; everything else goes to `sink`, which also hears of the end.
pub fn start<R, W>(
    mut reader: NoiseReader<R>,
    mut writer: NoiseWriter<W>,
    peer: Identity,
    queue: usize,
    sink: LinkSink,
) -> (LinkHandle, LinkTasks)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(queue.max(1));
    let stats = Arc::new(LinkStats::default());
    stats.last_seen.store(unix_now(), Ordering::Relaxed);
    let handle = LinkHandle {
        peer: peer.node_id(),
        tx,
        pending: Arc::default(),
        next_id: Arc::new(AtomicU64::new(2)),
        stats: stats.clone(),
    };

    let writer_sink = sink.clone();
    let writer_stats = stats.clone();
    let writer_task = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if let Err(e) = writer.send(&bytes).await {
                writer_sink(LinkEvent::Closed(close_reason(&e)));
                return;
            }
            writer_stats
                .bytes_out
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            writer_stats.messages_out.fetch_add(1, Ordering::Relaxed);
        }
        let _ = writer.shutdown().await;
    });

    let link = handle.clone();
    let peer_id = peer.node_id();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let reader_task = tokio::spawn(async move {
        let reason = loop {
            let bytes = match reader.recv().await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => break LinkClose::PeerClosed,
                Err(e) => break close_reason(&e),
            };
            stats
                .bytes_in
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            stats.messages_in.fetch_add(1, Ordering::Relaxed);
            stats.last_seen.store(unix_now(), Ordering::Relaxed);
            let envelope = match envelope::decode(&bytes) {
                Ok(e) => e,
                Err(e) => break envelope_reason(&e),
            };
            if envelope.reply_to != 0 {
                if let Some(waiter) = lock(&link.pending).remove(&envelope.reply_to) {
                    let _ = waiter.send(envelope);
                } else if let Some(Body::Pong(_)) = envelope.body {
                    sink(LinkEvent::Pong);
                }
                continue;
            }
            match envelope.body {
                Some(Body::Ping(ping)) => {
                    // Best effort: a full queue already proves the link is alive.
                    let pong = envelope::envelope(
                        link.next_id(),
                        envelope.request_id,
                        Body::Pong(Pong { nonce: ping.nonce }),
                    );
                    let _ = link.tx.try_send(envelope::encode(&pong));
                }
                Some(Body::Identity(IdentityExchange {
                    identity: Some(signed),
                })) => match Identity::verify(signed) {
                    Ok(identity) if identity.node_id() == peer_id => {
                        sink(LinkEvent::Identity(Box::new(identity)))
                    }
                    _ => sink(LinkEvent::ForgedIdentity),
                },
                Some(Body::Pong(_)) => sink(LinkEvent::Pong),
                _ => {
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        break LinkClose::IoError;
                    };
                    sink(LinkEvent::Request(Box::new(envelope), link.clone(), permit))
                }
            }
        };
        // Wake every waiting requester: their link is gone.
        lock(&link.pending).clear();
        sink(LinkEvent::Closed(reason));
    });
    let pending = handle.pending.clone();
    (
        handle,
        LinkTasks {
            reader: reader_task,
            writer: writer_task,
            pending,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::NodeKeys;
    use crate::proto::{Ack, Ping};
    use std::sync::mpsc as std_mpsc;

    fn node(name: &str) -> (NodeKeys, Identity) {
        let keys = NodeKeys::generate(&mut rand::rngs::OsRng);
        let identity = Identity::create(&keys, name, vec!["tcp://127.0.0.1:1".into()], 1, 0)
            .expect("identity");
        (keys, identity)
    }

    fn trusting(id: &Identity) -> TrustPolicy {
        TrustPolicy {
            trusted: [(id.node_id(), NewestKey::of(id))].into_iter().collect(),
            open: false,
        }
    }

    const T: Duration = Duration::from_secs(5);

    async fn pair(
        queue: usize,
    ) -> (
        (LinkHandle, LinkTasks, std_mpsc::Receiver<LinkEvent>),
        (LinkHandle, LinkTasks, std_mpsc::Receiver<LinkEvent>),
    ) {
        let (ka, a) = node("a");
        let (kb, b) = node("b");
        let (io_a, io_b) = tokio::io::duplex(1 << 20);
        let (pa, pb) = (trusting(&b), trusting(&a));
        let (na, nb) = (ka.noise_secret_bytes(), kb.noise_secret_bytes());
        let (sa, sb) = tokio::join!(
            establish(io_a, true, &na, &a, Some(b.node_id()), &pa, T, 1 << 20),
            establish(io_b, false, &nb, &b, None, &pb, T, 1 << 20),
        );
        let ((sa, seen_b), (sb, seen_a)) = (sa.expect("a side"), sb.expect("b side"));
        assert_eq!(
            (seen_b.node_id(), seen_a.node_id()),
            (b.node_id(), a.node_id())
        );
        let side = |session: NoiseSession<tokio::io::DuplexStream>, peer: Identity, queue| {
            let (tx, rx) = std_mpsc::channel();
            let sink: LinkSink = Arc::new(move |e| {
                let _ = tx.send(e);
            });
            let (r, w) = session.split();
            let (handle, tasks) = start(r, w, peer, queue, sink);
            (handle, tasks, rx)
        };
        (side(sa, seen_b, queue), side(sb, seen_a, queue))
    }

    #[tokio::test]
    async fn requests_are_matched_to_replies() {
        let ((a, _ta, _ea), (b, _tb, eb)) = pair(8).await;
        // Pings are answered by the link itself.
        let reply = a
            .request(Body::Ping(Ping { nonce: 9 }), T)
            .await
            .expect("pong");
        assert!(matches!(reply.body, Some(Body::Pong(Pong { nonce: 9 }))));
        // Other requests reach the owner, who replies by id.
        let b2 = b.clone();
        let answer = tokio::spawn(async move {
            loop {
                match eb.try_recv() {
                    Ok(LinkEvent::Request(env, _, _permit)) => {
                        b2.reply(
                            env.request_id,
                            Body::Ack(Ack {
                                size: 7,
                                hash: vec![],
                            }),
                        )
                        .await
                        .expect("reply");
                        return;
                    }
                    Ok(_) => {}
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        });
        let reply = a
            .request(
                Body::ServiceCancel(crate::proto::ServiceCancel {
                    from_supplier: false,
                }),
                T,
            )
            .await
            .expect("ack");
        assert!(matches!(reply.body, Some(Body::Ack(Ack { size: 7, .. }))));
        answer.await.expect("answered");
        assert!(a.stats.bytes_out.load(Ordering::Relaxed) > 0);
        assert!(b.stats.messages_in.load(Ordering::Relaxed) >= 2);
    }

    #[tokio::test]
    async fn unanswered_request_times_out_and_is_forgotten() {
        let ((a, _ta, _ea), (_b, _tb, _eb)) = pair(8).await;
        let err = a
            .request(
                Body::ServiceCancel(crate::proto::ServiceCancel {
                    from_supplier: false,
                }),
                Duration::from_millis(100),
            )
            .await
            .expect_err("nobody answers");
        assert_eq!(err, RequestError::Timeout(Duration::from_millis(100)));
        assert!(lock(&a.pending).is_empty());
    }

    #[tokio::test]
    async fn closing_a_link_fails_its_waiting_requests_at_once() {
        let ((a, ta, _ea), (_b, _tb, _eb)) = pair(8).await;
        let waiting = tokio::spawn({
            let a = a.clone();
            async move {
                a.request(
                    Body::ServiceCancel(crate::proto::ServiceCancel {
                        from_supplier: false,
                    }),
                    T,
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(ta);
        let result = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("not left waiting");
        assert_eq!(result.expect("joined").err(), Some(RequestError::Closed));
    }

    /// Events that arrive within about half a second, stopping once `n` came.
    async fn collect_events(events: &std_mpsc::Receiver<LinkEvent>, n: usize) -> Vec<LinkEvent> {
        let mut got = Vec::new();
        for _ in 0..50 {
            while let Ok(e) = events.try_recv() {
                got.push(e);
            }
            if got.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        got
    }

    #[tokio::test]
    async fn a_peer_cannot_have_more_than_max_in_flight_requests_handled() {
        let ((a, _ta, _ea), (_b, _tb, eb)) = pair(64).await;
        let cancel = || {
            Body::ServiceCancel(crate::proto::ServiceCancel {
                from_supplier: false,
            })
        };
        for _ in 0..MAX_IN_FLIGHT + 8 {
            a.send(cancel()).await.expect("queued");
        }
        let held = collect_events(&eb, MAX_IN_FLIGHT + 8).await;
        assert_eq!(
            held.len(),
            MAX_IN_FLIGHT,
            "the reader waits while {MAX_IN_FLIGHT} are held"
        );
        drop(held); // replies sent: the slots come back
        let rest = collect_events(&eb, 8).await;
        assert_eq!(rest.len(), 8);
    }

    #[tokio::test]
    async fn outbound_queue_is_bounded() {
        let ((a, ta, _ea), _b) = pair(2).await;
        // Stop the writer so nothing drains: the queue fills and then refuses.
        ta.writer.abort();
        tokio::task::yield_now().await;
        let mut refused = None;
        for _ in 0..10 {
            if let Err(e) = a.try_send(Body::Ping(Ping { nonce: 1 })) {
                refused = Some(e);
                break;
            }
        }
        assert!(
            matches!(
                refused,
                Some(RequestError::QueueFull | RequestError::Closed)
            ),
            "{refused:?}"
        );
    }

    /// Fault 1 of issue 11: after a friend re-signs with a new Noise key, whoever holds the
    /// old key and the old (validly signed) revision cannot log in as that friend.
    #[tokio::test]
    async fn a_retired_key_with_an_older_revision_is_refused() {
        let (old_keys, old) = node("a");
        let (new_noise, _) = crate::net::generate_static_keypair();
        let new_keys = NodeKeys::from_secret_bytes(&old_keys.signing_secret_bytes(), &new_noise)
            .expect("keys");
        let newer = Identity::create(&new_keys, "a", vec!["tcp://127.0.0.1:2".into()], 2, 1)
            .expect("identity");
        assert_eq!(newer.node_id(), old.node_id());
        let (kb, b) = node("b");
        let nb = kb.noise_secret_bytes();
        let knows_newer = trusting(&newer);
        let attempt = |keys: &NodeKeys, presented: &Identity, policy: &TrustPolicy| {
            let (io_a, io_b) = tokio::io::duplex(1 << 16);
            let na = keys.noise_secret_bytes();
            let (presented, policy, b) = (presented.clone(), policy.clone(), b.clone());
            async move {
                let trusts_b = trusting(&b);
                let (_, rb) = tokio::join!(
                    establish(io_a, true, &na, &presented, None, &trusts_b, T, 1 << 16),
                    establish(io_b, false, &nb, &b, None, &policy, T, 1 << 16),
                );
                rb.map(|(_, seen)| seen.revision())
            }
        };
        // The old key with the old revision: validly signed, but not the newest.
        assert_eq!(
            attempt(&old_keys, &old, &knows_newer).await.err(),
            Some(LinkClose::StaleIdentity)
        );
        // The same revision as the newest known but another key (a second body signed with
        // that revision number): refused as well.
        let twin = Identity::create(&old_keys, "a", vec![], 2, 1).expect("identity");
        assert_eq!(
            attempt(&old_keys, &twin, &knows_newer).await.err(),
            Some(LinkClose::StaleIdentity)
        );
        // The newest key logs in; so does a newer revision than any known (adopted later).
        assert_eq!(attempt(&new_keys, &newer, &knows_newer).await.ok(), Some(2));
        let newest = newer
            .with_contacts(&old_keys, vec![], 2)
            .expect("revision 3");
        assert_eq!(
            attempt(&old_keys, &newest, &knows_newer).await.ok(),
            Some(3)
        );
        // A node that only knows revision 1 still accepts it.
        assert_eq!(
            attempt(&old_keys, &old, &trusting(&old)).await.ok(),
            Some(1)
        );
    }

    #[tokio::test]
    async fn wrong_peer_and_unknown_peer_are_refused() {
        let (ka, a) = node("a");
        let (kb, b) = node("b");
        let (_, c) = node("c");
        let (io_a, io_b) = tokio::io::duplex(1 << 16);
        let (pa, pb) = (trusting(&b), trusting(&a));
        let (na, nb) = (ka.noise_secret_bytes(), kb.noise_secret_bytes());
        // A expects to reach C but B answers.
        let (ra, _) = tokio::join!(
            establish(io_a, true, &na, &a, Some(c.node_id()), &pa, T, 1 << 16),
            establish(io_b, false, &nb, &b, None, &pb, T, 1 << 16),
        );
        assert_eq!(ra.err(), Some(LinkClose::WrongPeer));
        // B does not trust A.
        let (io_a, io_b) = tokio::io::duplex(1 << 16);
        let nobody = TrustPolicy::default();
        let (_, rb) = tokio::join!(
            establish(io_a, true, &na, &a, None, &pa, T, 1 << 16),
            establish(io_b, false, &nb, &b, None, &nobody, T, 1 << 16),
        );
        assert_eq!(rb.err(), Some(LinkClose::UnknownPeer));
    }
}
