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
use super::budget::{Held, PeerBudget};
use super::envelope::{self, EnvelopeError};
use super::noise::{
    NoiseReader, NoiseSession, NoiseWriter, handshake_initiator, handshake_responder,
};
use super::paced::ControlWrites;
use crate::crypto::identity::{Identity, NodeId};
use crate::proto::envelope::Body;
use crate::proto::{Envelope, Fail, FailReason, IdentityExchange, Ping, Pong};

/// Binds the protocol into the Noise handshake: a peer of another protocol fails the handshake.
pub const PROLOGUE: &[u8] = b"bitdust.v1";

/// The largest message either side accepts before the peer's identity is checked: enough for
/// an envelope carrying a signed identity (its body and signature are capped at 4096 bytes),
/// far below the limit after authentication, so a stranger cannot make the node buffer more
/// than one frame (security review M1). PROTOCOL.md §11.
pub const PREAUTH_MAX_MESSAGE: usize = 8 * 1024;

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
///
/// The initiator names itself first; the responder sends its identity only to a peer it has
/// admitted, so a stranger learns nothing of this node beyond its Noise key. A peer refused
/// after the handshake is told why in a `Fail` before the connection closes.
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
    let started = tokio::time::Instant::now();
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
        // Until the peer has shown a valid identity it may send no more than an identity.
        session.set_max_message(PREAUTH_MAX_MESSAGE.min(max_message));
        let hello = envelope::encode(&envelope::envelope(
            1,
            0,
            Body::Identity(IdentityExchange {
                identity: Some(mine.signed().clone()),
                features: FEATURES,
            }),
        ));
        // Our next request id: 1 went with our identity if we sent it.
        let fail_id = if outbound { 2 } else { 1 };
        if outbound {
            session.send(&hello).await.map_err(|e| close_reason(&e))?;
        }
        // The last tenth of the deadline is kept for telling the peer it was too slow.
        let soft = (timeout - timeout / 10).saturating_sub(started.elapsed());
        let bytes = match tokio::time::timeout(soft, session.recv()).await {
            Err(_) => {
                say_fail(
                    &mut session,
                    fail_id,
                    0,
                    FailReason::Timeout,
                    "no identity in time",
                )
                .await;
                return Err(LinkClose::HandshakeTimeout);
            }
            Ok(received) => received
                .map_err(|e| close_reason(&e))?
                .ok_or(LinkClose::PeerClosed)?,
        };
        let identity = match check_identity(&bytes, &session.remote_static(), expected, policy) {
            Ok((identity, features)) => {
                session.set_peer_reads_alone(features & FEATURE_READS_ALONE != 0);
                identity
            }
            Err(reason) => {
                if let Some((fail, detail)) = fail_for(reason) {
                    let reply_to = raw_request_id(&bytes);
                    say_fail(&mut session, fail_id, reply_to, fail, detail).await;
                }
                return Err(reason);
            }
        };
        session.set_max_message(max_message);
        if !outbound {
            session.send(&hello).await.map_err(|e| close_reason(&e))?;
        }
        Ok((session, identity))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| LinkClose::HandshakeTimeout)?
}

/// Checks the first message of the peer: an identity, signed, naming the proven Noise key,
/// the node we dialed (if we did), admitted by the policy.
fn check_identity(
    bytes: &[u8],
    remote_static: &[u8; 32],
    expected: Option<NodeId>,
    policy: &TrustPolicy,
) -> Result<(Identity, u32), LinkClose> {
    let theirs = envelope::decode(bytes).map_err(|e| envelope_reason(&e))?;
    let Some(Body::Identity(IdentityExchange {
        identity: Some(signed),
        features,
    })) = theirs.body
    else {
        return Err(LinkClose::UnexpectedMessage);
    };
    let identity = Identity::verify(signed).map_err(|_| LinkClose::BadIdentity)?;
    if identity.noise_key() != remote_static {
        return Err(LinkClose::IdentityMismatch);
    }
    if expected.is_some_and(|e| e != identity.node_id()) {
        return Err(LinkClose::WrongPeer);
    }
    policy.admit(&identity)?;
    Ok((identity, features))
}

/// What a peer is told before a close for `reason`; `None` where nothing is said (the
/// transport itself failed, or we dialed the wrong node and owe it nothing).
pub fn fail_for(reason: LinkClose) -> Option<(FailReason, &'static str)> {
    Some(match reason {
        LinkClose::UnsupportedVersion => (
            FailReason::UnsupportedVersion,
            "this node speaks protocol version 1",
        ),
        LinkClose::Malformed => (FailReason::Malformed, "message does not decode"),
        LinkClose::BadIdentity => (FailReason::Malformed, "identity does not verify"),
        LinkClose::UnexpectedMessage => (FailReason::Unexpected, "expected an identity first"),
        LinkClose::IdentityMismatch => (
            FailReason::NotTrusted,
            "identity names another Noise key than the handshake's",
        ),
        LinkClose::StaleIdentity => (
            FailReason::NotTrusted,
            "a newer identity revision is known for this node",
        ),
        LinkClose::UnknownPeer => (FailReason::NotTrusted, "not a friend of this node"),
        LinkClose::HandshakeTimeout => (FailReason::Timeout, "no identity in time"),
        LinkClose::WrongPeer
        | LinkClose::BadHandshake
        | LinkClose::FrameTooLarge
        | LinkClose::DecryptFailed
        | LinkClose::MessageTooLarge
        | LinkClose::PeerClosed
        | LinkClose::IoError => return None,
    })
}

/// The request id of a message that may not pass [`envelope::decode`] (another version), so
/// a `Fail` can name what it answers; 0 when even that cannot be read.
fn raw_request_id(bytes: &[u8]) -> u64 {
    use prost::Message as _;
    Envelope::decode(bytes).map_or(0, |e| e.request_id)
}

fn fail_bytes(id: u64, reply_to: u64, reason: FailReason, detail: &str) -> Vec<u8> {
    envelope::encode(&envelope::envelope(
        id,
        reply_to,
        Body::Fail(Fail {
            reason: reason as i32,
            detail: detail.into(),
        }),
    ))
}

/// Best effort: the connection is about to close whatever happens.
async fn say_fail<IO>(
    session: &mut NoiseSession<IO>,
    id: u64,
    reply_to: u64,
    reason: FailReason,
    detail: &str,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let _ = session
        .send(&fail_bytes(id, reply_to, reason, detail))
        .await;
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
    /// Pongs and other control replies dropped because their queue was full.
    pub control_dropped: AtomicU64,
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
    /// No reply in time, though the peer sent other messages meanwhile: it is there and did
    /// not answer this request.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// No reply and nothing else from the peer within the timeout, not even the pong to a probe
    /// sent halfway: the peer fell silent (frozen, or the path is gone). Says nothing about the
    /// request itself; the session closes the link once `network.dead_after` has passed.
    #[error("no reply and nothing else from the peer within {0:?}")]
    Silent(Duration),
}

/// What went out in answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replied {
    /// The reply itself.
    Sent,
    /// `TRY_LATER`: the reply did not fit in the peer's byte budget (security review M2).
    TryLater,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Envelope>>>>;

/// A cheap, cloneable way to talk to one peer over its established link.
#[derive(Clone)]
pub struct LinkHandle {
    peer: NodeId,
    /// Bulk: fragments, lists, one-way messages (kept in order).
    tx: mpsc::Sender<Outgoing>,
    /// Requests and replies of at most [`SMALL_MESSAGE`] bytes (audits, acknowledgements),
    /// written ahead of bulk so a link busy with fragments still answers them.
    small: mpsc::Sender<Outgoing>,
    /// Pings and pongs, ahead of everything else.
    control: mpsc::Sender<Vec<u8>>,
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

    /// The queue a request or reply of `len` bytes waits in.
    fn lane(&self, len: usize) -> &mpsc::Sender<Outgoing> {
        if len <= SMALL_MESSAGE {
            &self.small
        } else {
            &self.tx
        }
    }

    /// Sends a request and waits for the envelope that replies to it: `timeout` counts from
    /// when the request is written. The wait to be written (behind other messages on a link
    /// under a bandwidth limit) is bounded by [`WRITE_WAIT_FACTOR`] times `timeout`, and ends
    /// at once if the link closes (the session closes a link whose peer falls silent).
    pub async fn request(&self, body: Body, timeout: Duration) -> Result<Envelope, RequestError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let bytes = envelope::encode(&envelope::envelope(id, 0, body));
        let (written, out) = oneshot::channel();
        let outgoing = Outgoing {
            bytes,
            charge: None,
            written: Some(written),
        };
        let lane = self.lane(outgoing.bytes.len());
        let queued = async {
            lane.send(outgoing)
                .await
                .map_err(|_| RequestError::Closed)?;
            out.await.map_err(|_| RequestError::Closed)
        };
        let result = match tokio::time::timeout(timeout * WRITE_WAIT_FACTOR, queued).await {
            Err(_) => Err(RequestError::Timeout(timeout * WRITE_WAIT_FACTOR)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => self.reply_or_silence(rx, timeout).await,
        };
        lock(&self.pending).remove(&id);
        result
    }

    /// Waits `timeout` for the reply. Halfway, if nothing at all came from the peer since the
    /// request was written, a probe ping goes out: a peer that answers it (or anything else)
    /// but not the request ignored the request ([`RequestError::Timeout`]); one that sends
    /// nothing fell silent ([`RequestError::Silent`]). An audit counts the first as a refusal
    /// and not the second (a frozen supplier is unreachable, not a liar).
    async fn reply_or_silence(
        &self,
        mut rx: oneshot::Receiver<Envelope>,
        timeout: Duration,
    ) -> Result<Envelope, RequestError> {
        let heard = || self.stats.messages_in.load(Ordering::Relaxed);
        let before = heard();
        let half = timeout / 2;
        if let Ok(reply) = tokio::time::timeout(half, &mut rx).await {
            return reply.map_err(|_| RequestError::Closed);
        }
        if heard() == before {
            let _ = self.ping(rand::random());
        }
        match tokio::time::timeout(timeout - half, rx).await {
            Ok(reply) => reply.map_err(|_| RequestError::Closed),
            Err(_) if heard() == before => Err(RequestError::Silent(timeout)),
            Err(_) => Err(RequestError::Timeout(timeout)),
        }
    }

    /// Sends a ping ahead of every queued message, if the control queue has room.
    pub fn ping(&self, nonce: u64) -> Result<(), RequestError> {
        let bytes = envelope::encode(&envelope::envelope(
            self.next_id(),
            0,
            Body::Ping(Ping { nonce }),
        ));
        self.control.try_send(bytes).map_err(queue_error)
    }

    /// Sends a one-way message, waiting for queue space.
    pub async fn send(&self, body: Body) -> Result<(), RequestError> {
        let bytes = envelope::encode(&envelope::envelope(self.next_id(), 0, body));
        self.tx
            .send(Outgoing::plain(bytes))
            .await
            .map_err(|_| RequestError::Closed)
    }

    /// Sends a one-way message if the queue has room now.
    pub fn try_send(&self, body: Body) -> Result<(), RequestError> {
        let bytes = envelope::encode(&envelope::envelope(self.next_id(), 0, body));
        self.tx
            .try_send(Outgoing::plain(bytes))
            .map_err(queue_error)
    }

    /// Answers request `to`.
    pub async fn reply(&self, to: u64, body: Body) -> Result<(), RequestError> {
        let bytes = envelope::encode(&envelope::envelope(self.next_id(), to, body));
        self.lane(bytes.len())
            .send(Outgoing::plain(bytes))
            .await
            .map_err(|_| RequestError::Closed)
    }

    /// Answers request `to` and gives its slot back. The request's charge on the peer's budget
    /// becomes the reply's until the writer has written it. A reply larger than its request
    /// takes the difference only if it fits now, leaving room to read a message. It never
    /// waits: the bytes it would wait for may be held by requests queued behind this one. A
    /// reply that does not fit is dropped and `TRY_LATER` said in its place.
    pub async fn reply_within(
        &self,
        to: u64,
        body: Body,
        in_flight: InFlight,
    ) -> Result<Replied, RequestError> {
        let InFlight { slot, mut charge } = in_flight;
        let id = self.next_id();
        let mut bytes = envelope::encode(&envelope::envelope(id, to, body));
        let fits = charge.resize_for_reply(bytes.len()).is_ok();
        if !fits {
            bytes = fail_bytes(id, to, FailReason::TryLater, OVER_BUDGET);
            charge.shrink_to(bytes.len());
        }
        let outgoing = Outgoing {
            charge: Some(charge),
            ..Outgoing::plain(bytes)
        };
        let sent = self.lane(outgoing.bytes.len()).send(outgoing).await;
        drop(slot);
        sent.map_err(|_| RequestError::Closed)?;
        Ok(if fits {
            Replied::Sent
        } else {
            Replied::TryLater
        })
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves once the link is gone (its writer has ended): work queued for a request that
    /// came on it can be dropped.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Why a message could not be queued without waiting.
fn queue_error<T>(e: mpsc::error::TrySendError<T>) -> RequestError {
    match e {
        mpsc::error::TrySendError::Full(_) => RequestError::QueueFull,
        mpsc::error::TrySendError::Closed(_) => RequestError::Closed,
    }
}

/// What a peer hears instead of a reply that does not fit in its budget.
const OVER_BUDGET: &str = "this node holds too much for you now; ask again later";

/// A message to write.
struct Outgoing {
    bytes: Vec<u8>,
    /// Its charge on the peer's budget when it is a reply to the peer.
    charge: Option<Held>,
    /// Told once it is written (a request's timeout starts then).
    written: Option<oneshot::Sender<()>>,
}

impl Outgoing {
    fn plain(bytes: Vec<u8>) -> Self {
        Outgoing {
            bytes,
            charge: None,
            written: None,
        }
    }

    /// A request whose asker gave up (it timed out waiting to be written): not worth the
    /// bandwidth any more.
    fn abandoned(&self) -> bool {
        self.written.as_ref().is_some_and(|w| w.is_closed())
    }

    /// Counts it and tells whoever waits; a reply's charge goes back as it drops.
    fn written(self, stats: &LinkStats) {
        let Outgoing {
            bytes,
            charge,
            written,
        } = self;
        drop(charge);
        if let Some(written) = written {
            let _ = written.send(());
        }
        stats
            .bytes_out
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        stats.messages_out.fetch_add(1, Ordering::Relaxed);
    }
}

impl AsRef<[u8]> for Outgoing {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// `IdentityExchange.features` bit: this node reads chunks of flag 0x02 (`FLAG_ALONE`).
pub const FEATURE_READS_ALONE: u32 = 1;
/// What this node says it reads, in its identity exchange.
pub const FEATURES: u32 = FEATURE_READS_ALONE;

/// Requests and replies up to this size go ahead of bulk messages (fragments, lists).
pub const SMALL_MESSAGE: usize = 8 * 1024;

/// How many request timeouts a request may wait to be written, behind other messages on a
/// slow (bandwidth-limited) link, before it fails.
pub const WRITE_WAIT_FACTOR: u32 = 10;

/// A message to write before the link closes, and who to tell once it is out.
type LastWords = (Vec<u8>, Option<oneshot::Sender<()>>);

/// How long the writer may take to get a closing `Fail` out to a peer that does not read.
const FAREWELL_TIME: Duration = Duration::from_secs(1);

/// Pongs (and other control replies) waiting to be written; they bypass the request queue.
const CONTROL_QUEUE: usize = 8;

/// The running tasks of a link; dropping this ends them, and every request still waiting for
/// a reply on this link fails at once with `Closed` (rather than waiting out its timeout).
pub struct LinkTasks {
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
    pending: Pending,
    last_words: mpsc::Sender<LastWords>,
    next_id: Arc<AtomicU64>,
}

impl LinkTasks {
    /// Ends the link after telling the peer why (`SHUTTING_DOWN` when the node stops). The
    /// writer sends the `Fail` ahead of anything still queued, then closes; a peer that does
    /// not read gets [`FAREWELL_TIME`].
    pub fn farewell(mut self, reason: FailReason, detail: &str) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (Some(writer), Ok(runtime)) =
            (self.writer.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        if self
            .last_words
            .try_send((fail_bytes(id, 0, reason, detail), None))
            .is_err()
        {
            writer.abort();
            return;
        }
        let abort = writer.abort_handle();
        runtime.spawn(async move {
            if tokio::time::timeout(FAREWELL_TIME, writer).await.is_err() {
                abort.abort();
            }
        });
    }
}

impl Drop for LinkTasks {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(writer) = &self.writer {
            writer.abort();
        }
        lock(&self.pending).clear();
    }
}

pub type LinkSink = Arc<dyn Fn(LinkEvent) + Send + Sync>;

/// Requests from one peer being handled at once; past this the reader stops reading, and TCP
/// pushes back on the peer. Bounds the memory one peer can make this node hold.
pub const MAX_IN_FLIGHT: usize = 32;

/// A request being handled: a slot of its link's in-flight requests and the bytes of its body
/// on the peer's budget, both given back when dropped (or passed on to the reply by
/// [`LinkHandle::reply_within`]).
#[derive(Debug)]
pub struct InFlight {
    slot: tokio::sync::OwnedSemaphorePermit,
    charge: Held,
}

impl InFlight {
    /// Bytes this request holds on its peer's budget.
    pub fn bytes(&self) -> usize {
        self.charge.bytes()
    }
}

use crate::unix_now;

/// Starts the reader and writer of an established session. Pings are answered here, replies
/// matched to their requests; everything else goes to `sink`, which also hears of the end.
pub fn start<R, W>(
    reader: NoiseReader<R>,
    writer: NoiseWriter<W>,
    peer: Identity,
    queue: usize,
    budget: Arc<PeerBudget>,
    sink: LinkSink,
    control_writes: ControlWrites,
) -> (LinkHandle, LinkTasks)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Outgoing>(queue.max(1));
    let (small_tx, small_rx) = mpsc::channel::<Outgoing>(queue.max(1));
    let (control_tx, control_rx) = mpsc::channel::<Vec<u8>>(CONTROL_QUEUE);
    let (last_tx, last_rx) = mpsc::channel::<LastWords>(1);
    let stats = Arc::new(LinkStats::default());
    stats.last_seen.store(unix_now(), Ordering::Relaxed);
    let handle = LinkHandle {
        peer: peer.node_id(),
        tx,
        small: small_tx,
        control: control_tx.clone(),
        pending: Arc::default(),
        next_id: Arc::new(AtomicU64::new(2)),
        stats: stats.clone(),
    };
    let queues = WriterQueues {
        last_words: last_rx,
        control: control_rx,
        small: small_rx,
        requests: rx,
    };
    let writer_task = tokio::spawn(run_writer(
        writer,
        queues,
        stats,
        sink.clone(),
        control_writes,
    ));
    let reader_task = tokio::spawn(run_reader(
        reader,
        ReaderSide {
            link: handle.clone(),
            peer: peer.node_id(),
            control: control_tx,
            last_words: last_tx.clone(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            budget,
            sink,
        },
    ));
    let pending = handle.pending.clone();
    let next_id = handle.next_id.clone();
    (
        handle,
        LinkTasks {
            reader: reader_task,
            writer: Some(writer_task),
            pending,
            last_words: last_tx,
            next_id,
        },
    )
}

/// What the writer takes its messages from, in this order of precedence.
struct WriterQueues {
    /// Closing words: written, then the link closes.
    last_words: mpsc::Receiver<LastWords>,
    /// Pings and pongs (and `Fail`s for unknown requests), ahead of the request queues.
    control: mpsc::Receiver<Vec<u8>>,
    /// Small requests and replies, ahead of bulk.
    small: mpsc::Receiver<Outgoing>,
    /// Bulk requests, replies and one-way messages of the node.
    requests: mpsc::Receiver<Outgoing>,
}

/// The writer task: closing words first, then control messages, then small messages, then
/// bulk. Control messages are written without waiting out a bandwidth debt.
async fn run_writer<W>(
    mut writer: NoiseWriter<W>,
    mut queues: WriterQueues,
    stats: Arc<LinkStats>,
    sink: LinkSink,
    control_writes: ControlWrites,
) where
    W: AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let (outgoing, control) = tokio::select! {
            biased;
            Some((bytes, written)) = queues.last_words.recv() => {
                let _ = writer.send(&bytes).await;
                if let Some(written) = written {
                    let _ = written.send(());
                }
                break;
            }
            Some(bytes) = queues.control.recv() => (Outgoing::plain(bytes), true),
            Some(outgoing) = queues.small.recv() => (outgoing, false),
            next = queues.requests.recv() => match next {
                Some(outgoing) => (outgoing, false),
                None => break,
            },
        };
        if outgoing.abandoned() {
            continue;
        }
        control_writes.set(control);
        // Pings, pongs and small messages that come while a long message is written slip in
        // between its chunks (if the peer reads that).
        let sent = writer
            .send_between(&outgoing.bytes, || {
                let mut next = loop {
                    let next = queues
                        .control
                        .try_recv()
                        .ok()
                        .map(Outgoing::plain)
                        .or_else(|| queues.small.try_recv().ok())?;
                    if !next.abandoned() {
                        break next;
                    }
                };
                // Its request's timeout starts now, not when the long message ends.
                if let Some(written) = next.written.take() {
                    let _ = written.send(());
                }
                Some(next)
            })
            .await;
        control_writes.set(false);
        match sent {
            Ok(slipped) => {
                for done in std::iter::once(outgoing).chain(slipped) {
                    done.written(&stats);
                }
            }
            Err(e) => {
                sink(LinkEvent::Closed(close_reason(&e)));
                return;
            }
        }
    }
    let _ = writer.shutdown().await;
}

/// What the reader task holds besides its half of the session.
struct ReaderSide {
    link: LinkHandle,
    peer: NodeId,
    control: mpsc::Sender<Vec<u8>>,
    last_words: mpsc::Sender<LastWords>,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The peer's byte budget, shared with its other links.
    budget: Arc<PeerBudget>,
    sink: LinkSink,
}

impl ReaderSide {
    /// Queues a control reply (a pong, a `Fail` for an unknown request); if even its own queue
    /// is full (the peer sends faster than it reads), the drop is counted, not silent.
    fn control_reply(&self, bytes: Vec<u8>) {
        if self.control.try_send(bytes).is_err() {
            self.link
                .stats
                .control_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A message that did not decode: a request of a type this node does not know is answered
    /// and the link stays (`None`); anything else is told why and ends the link.
    async fn undecodable(&self, bytes: &[u8], e: &EnvelopeError) -> Option<LinkClose> {
        if *e == EnvelopeError::MissingBody {
            // A message type this node does not know (a newer minor addition, see
            // PROTOCOL.md "Versioning"): a request is answered, the session stays.
            let request = raw_request_id(bytes);
            if request != 0 && raw_reply_to(bytes) == 0 {
                self.control_reply(fail_bytes(
                    self.link.next_id(),
                    request,
                    FailReason::NoService,
                    "no such request on this node",
                ));
            }
            return None;
        }
        let reason = envelope_reason(e);
        if let Some((fail, detail)) = fail_for(reason) {
            let words = fail_bytes(self.link.next_id(), raw_request_id(bytes), fail, detail);
            let (written, out) = oneshot::channel();
            if self.last_words.try_send((words, Some(written))).is_ok() {
                let _ = tokio::time::timeout(FAREWELL_TIME, out).await;
            }
        }
        Some(reason)
    }

    /// Handles one decoded message, which holds `charge` on the peer's budget (kept only by a
    /// request); `Some` ends the link.
    async fn dispatch(&self, envelope: Envelope, charge: Held) -> Option<LinkClose> {
        if envelope.reply_to != 0 {
            if let Some(waiter) = lock(&self.link.pending).remove(&envelope.reply_to) {
                let _ = waiter.send(envelope);
            } else if let Some(Body::Pong(_)) = envelope.body {
                (self.sink)(LinkEvent::Pong);
            }
            return None;
        }
        match envelope.body {
            Some(Body::Ping(ping)) => {
                // Pongs skip the request queue.
                let pong = envelope::envelope(
                    self.link.next_id(),
                    envelope.request_id,
                    Body::Pong(Pong { nonce: ping.nonce }),
                );
                self.control_reply(envelope::encode(&pong));
            }
            Some(Body::Identity(IdentityExchange {
                identity: Some(signed),
                ..
            })) => match Identity::verify(signed) {
                Ok(identity) if identity.node_id() == self.peer => {
                    (self.sink)(LinkEvent::Identity(Box::new(identity)))
                }
                _ => (self.sink)(LinkEvent::ForgedIdentity),
            },
            Some(Body::Pong(_)) => (self.sink)(LinkEvent::Pong),
            // A Fail answering nothing says why the peer is about to close (e.g.
            // SHUTTING_DOWN); the close itself follows. Never answered: no Fail loops.
            Some(Body::Fail(_)) => {}
            _ => {
                let Ok(slot) = self.in_flight.clone().acquire_owned().await else {
                    return Some(LinkClose::IoError);
                };
                (self.sink)(LinkEvent::Request(
                    Box::new(envelope),
                    self.link.clone(),
                    InFlight { slot, charge },
                ))
            }
        }
        None
    }
}

/// The reader task: reads until the link ends, then fails every waiting request and tells the
/// sink why it ended.
async fn run_reader<R>(mut reader: NoiseReader<R>, side: ReaderSide)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let stats = side.link.stats.clone();
    // A long message is read only once the peer's budget has room for the longest one; a
    // short one (a chunk, already in hand) waits for room before the next is read. Either way
    // the reader stops while the peer holds its whole budget, and TCP holds the peer back.
    let longest = reader.max_message();
    // The reservation of a long message that a slipped (flag 0x02) message interrupted: kept
    // until the long one is complete, so its partial bytes stay counted.
    let mut long_reserved: Option<Held> = None;
    let reason = loop {
        let budget = &side.budget;
        let holding = long_reserved.is_some();
        let gate = || async move {
            if holding {
                None
            } else {
                Some(budget.acquire(longest).await)
            }
        };
        let (bytes, gated) = match reader.recv_gated(gate).await {
            Ok(Some((bytes, gated))) => (bytes, gated.flatten()),
            Ok(None) => break LinkClose::PeerClosed,
            Err(e) => break close_reason(&e),
        };
        let charge = if reader.in_message() {
            // A message slipped into a long one: the long one keeps its reservation, this one
            // is charged on its own.
            if let Some(reserved) = gated {
                long_reserved = Some(reserved);
            }
            budget.acquire(bytes.len()).await
        } else {
            match gated.or_else(|| long_reserved.take()) {
                Some(mut reserved) => {
                    reserved.shrink_to(bytes.len());
                    reserved
                }
                None => budget.acquire(bytes.len()).await,
            }
        };
        stats
            .bytes_in
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        stats.messages_in.fetch_add(1, Ordering::Relaxed);
        stats.last_seen.store(unix_now(), Ordering::Relaxed);
        let ended = match envelope::decode(&bytes) {
            Ok(envelope) => {
                // The envelope has its own copy of the body: the charge covers one of them.
                drop(bytes);
                side.dispatch(envelope, charge).await
            }
            Err(e) => side.undecodable(&bytes, &e).await,
        };
        if let Some(reason) = ended {
            break reason;
        }
    };
    // Wake every waiting requester: their link is gone.
    lock(&side.link.pending).clear();
    (side.sink)(LinkEvent::Closed(reason));
}

fn raw_reply_to(bytes: &[u8]) -> u64 {
    use prost::Message as _;
    Envelope::decode(bytes).map_or(0, |e| e.reply_to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::NodeKeys;
    use crate::net::noise::handshake_initiator;
    use crate::proto::Ack;
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

    type Established = (NoiseSession<tokio::io::DuplexStream>, Identity);

    /// Two nodes a and b that trust each other, after the handshake and identity exchange
    /// over a 1 MiB pipe: a's session and the identity it saw, then b's.
    async fn established(max_message: usize) -> (Established, Established) {
        let (ka, a) = node("a");
        let (kb, b) = node("b");
        let (io_a, io_b) = tokio::io::duplex(1 << 20);
        let (pa, pb) = (trusting(&b), trusting(&a));
        let (na, nb) = (ka.noise_secret_bytes(), kb.noise_secret_bytes());
        let (sa, sb) = tokio::join!(
            establish(io_a, true, &na, &a, Some(b.node_id()), &pa, T, max_message),
            establish(io_b, false, &nb, &b, None, &pb, T, max_message),
        );
        let ((sa, seen_b), (sb, seen_a)) = (sa.expect("a side"), sb.expect("b side"));
        assert_eq!(
            (seen_b.node_id(), seen_a.node_id()),
            (b.node_id(), a.node_id())
        );
        ((sa, seen_b), (sb, seen_a))
    }

    async fn pair(
        queue: usize,
    ) -> (
        (LinkHandle, LinkTasks, std_mpsc::Receiver<LinkEvent>),
        (LinkHandle, LinkTasks, std_mpsc::Receiver<LinkEvent>),
    ) {
        let ((sa, seen_b), (sb, seen_a)) = established(1 << 20).await;
        let side = |session: NoiseSession<tokio::io::DuplexStream>, peer: Identity, queue| {
            let (tx, rx) = std_mpsc::channel();
            let sink: LinkSink = Arc::new(move |e| {
                let _ = tx.send(e);
            });
            let (r, w) = session.split();
            let (handle, tasks) = start(
                r,
                w,
                peer,
                queue,
                PeerBudget::new(64 << 20, 1 << 20),
                sink,
                ControlWrites::default(),
            );
            (handle, tasks, rx)
        };
        (side(sa, seen_b, queue), side(sb, seen_a, queue))
    }

    /// Side a's uploads are limited to 256 KiB/s and it sends 1 MiB messages (4 s each): a
    /// ping either way still has its answer within a second, slipped between chunks.
    #[tokio::test]
    async fn a_saturated_limited_link_still_answers_pings_within_a_second() {
        use crate::net::bandwidth::{Limits, LocalTime, Rates, Shaper};
        use crate::net::paced::{PacedRead, PacedWrite, Pacing};
        let ((sa, seen_b), (sb, seen_a)) = established(2 << 20).await;
        let shaper = Arc::new(Shaper::new(
            Limits {
                usual: Rates {
                    upload: 256 * 1024,
                    ..Rates::default()
                },
                ..Limits::default()
            },
            std::time::Instant::now(),
            LocalTime {
                weekday: 0,
                minute: 0,
            },
        ));
        let pacing = Pacing {
            shaper,
            peer: seen_b.node_id(),
            lan: false,
        };
        let control = ControlWrites::default();
        let writes = control.clone();
        let (ra, wa) = sa.split_with(move |io| {
            let (r, w) = tokio::io::split(io);
            (
                PacedRead::new(r, pacing.clone(), None),
                PacedWrite::new(w, pacing, writes),
            )
        });
        let sink = |tx: std_mpsc::Sender<LinkEvent>| -> LinkSink {
            Arc::new(move |e| {
                let _ = tx.send(e);
            })
        };
        let (tx_a, _ea) = std_mpsc::channel();
        let (a_link, _ta) = start(
            ra,
            wa,
            seen_b,
            8,
            PeerBudget::new(64 << 20, 2 << 20),
            sink(tx_a),
            control,
        );
        let (rb, wb) = sb.split();
        let (tx_b, _eb) = std_mpsc::channel();
        let (b_link, _tb) = start(
            rb,
            wb,
            seen_a,
            8,
            PeerBudget::new(64 << 20, 2 << 20),
            sink(tx_b),
            ControlWrites::default(),
        );
        for _ in 0..3 {
            a_link
                .send(Body::StoreFragment(crate::proto::StoreFragment {
                    id: None,
                    data: vec![7; 1 << 20],
                    hash: vec![],
                }))
                .await
                .expect("queued");
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        for (who, link) in [("b pings a", &b_link), ("a pings b", &a_link)] {
            for nonce in 0..3 {
                let asked = std::time::Instant::now();
                let pong = link
                    .request(Body::Ping(Ping { nonce }), T)
                    .await
                    .expect("pong");
                assert!(matches!(pong.body, Some(Body::Pong(_))));
                let rtt = asked.elapsed();
                assert!(rtt < Duration::from_secs(1), "{who}: {rtt:?}");
            }
        }
        // The long messages (12 s of them) were still going out: the pings did not wait.
        let written = a_link.stats.messages_out.load(Ordering::Relaxed);
        assert!(written < 3 + 6, "all written already: {written}");
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

    /// A peer that reads nothing (frozen, or the path is gone) does not answer the probe ping
    /// either: the request ends as silence, not as an ignored request. The peer above answered
    /// the probe, so its unanswered request was a plain timeout.
    #[tokio::test]
    async fn a_peer_that_sends_nothing_at_all_is_silent_not_unanswering() {
        let ((sa, seen_b), (_frozen, _)) = established(1 << 20).await;
        let (r, w) = sa.split();
        let (a, _tasks) = start(
            r,
            w,
            seen_b,
            8,
            PeerBudget::new(64 << 20, 1 << 20),
            Arc::new(|_| {}),
            ControlWrites::default(),
        );
        let err = a
            .request(
                Body::ServiceCancel(crate::proto::ServiceCancel {
                    from_supplier: false,
                }),
                Duration::from_millis(200),
            )
            .await
            .expect_err("nobody reads");
        assert_eq!(err, RequestError::Silent(Duration::from_millis(200)));
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

    /// A node (b, running the link) and a peer speaking raw Noise (a), over a pipe of
    /// `pipe` bytes per direction.
    async fn raw_and_link(
        queue: usize,
        pipe: usize,
    ) -> (
        NoiseSession<tokio::io::DuplexStream>,
        LinkHandle,
        LinkTasks,
        std_mpsc::Receiver<LinkEvent>,
    ) {
        raw_and_link_within(queue, pipe, PeerBudget::new(64 << 20, 1 << 20)).await
    }

    /// [`raw_and_link`] with the peer's byte budget given (its largest message is 1 MiB).
    async fn raw_and_link_within(
        queue: usize,
        pipe: usize,
        budget: Arc<PeerBudget>,
    ) -> (
        NoiseSession<tokio::io::DuplexStream>,
        LinkHandle,
        LinkTasks,
        std_mpsc::Receiver<LinkEvent>,
    ) {
        let (ka, a) = node("a");
        let (kb, b) = node("b");
        let (io_a, io_b) = tokio::io::duplex(pipe);
        let (pa, pb) = (trusting(&b), trusting(&a));
        let (na, nb) = (ka.noise_secret_bytes(), kb.noise_secret_bytes());
        let (sa, sb) = tokio::join!(
            establish(io_a, true, &na, &a, None, &pa, T, 1 << 20),
            establish(io_b, false, &nb, &b, None, &pb, T, 1 << 20),
        );
        let ((sa, _), (sb, seen_a)) = (sa.expect("a side"), sb.expect("b side"));
        let (tx, rx) = std_mpsc::channel();
        let sink: LinkSink = Arc::new(move |e| {
            let _ = tx.send(e);
        });
        let (r, w) = sb.split();
        let (handle, tasks) = start(r, w, seen_a, queue, budget, sink, ControlWrites::default());
        (sa, handle, tasks, rx)
    }

    /// A request slipped (flag 0x02) between the chunks of a long message is charged on its
    /// own: the long message keeps the room it reserved, so its partial bytes stay counted.
    #[tokio::test]
    async fn a_slipped_request_leaves_the_long_message_its_reservation() {
        let (ka, a) = node("a");
        let (kb, b) = node("b");
        let (io_a, io_b) = tokio::io::duplex(4 << 20);
        let (pa, pb) = (trusting(&b), trusting(&a));
        let (na, nb) = (ka.noise_secret_bytes(), kb.noise_secret_bytes());
        let (sa, sb) = tokio::join!(
            establish(io_a, true, &na, &a, None, &pa, T, 1 << 20),
            establish(io_b, false, &nb, &b, None, &pb, T, 1 << 20),
        );
        let ((mut sa, _), (sb, seen_a)) = (sa.expect("a side"), sb.expect("b side"));
        let budget = PeerBudget::new(4 << 20, 1 << 20);
        // What the peer held at the moment each request was handed over, on the reader task.
        let held_then = Arc::new(Mutex::new(Vec::new()));
        let (record, watched) = (held_then.clone(), budget.clone());
        let sink: LinkSink = Arc::new(move |e| {
            if let LinkEvent::Request(env, _, in_flight) = e {
                let mut seen = record.lock().expect("lock");
                seen.push((env.request_id, watched.held(), in_flight.bytes()));
            }
        });
        let (r, w) = sb.split();
        let (_link, _tasks) = start(
            r,
            w,
            seen_a,
            8,
            budget.clone(),
            sink,
            ControlWrites::default(),
        );
        sa.set_peer_reads_alone(true);
        let (_ar, mut aw) = sa.split();
        let mut small = Some(envelope::encode(&envelope::envelope(
            7,
            0,
            Body::ListFragments(crate::proto::ListFragments {
                after: None,
                limit: 0,
            }),
        )));
        let long = envelope::encode(&envelope::envelope(
            8,
            0,
            Body::StoreFragment(crate::proto::StoreFragment {
                id: None,
                data: vec![3; 500_000],
                hash: vec![],
            }),
        ));
        aw.send_between(&long, || small.take()).await.expect("sent");
        for _ in 0..100 {
            if held_then.lock().expect("lock").len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = held_then.lock().expect("lock").clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        let (id, held, own) = seen[0];
        assert_eq!(id, 7, "the slipped request comes first");
        assert!(own < 100, "charged its own size: {own}");
        assert!(
            held >= (1 << 20) + own,
            "the long message's room went: {held}"
        );
        let (id, _, own) = seen[1];
        assert_eq!((id, own), (8, long.len()));
    }

    fn store_request(id: u64) -> Vec<u8> {
        envelope::encode(&envelope::envelope(id, 0, big_fragment()))
    }

    /// Security review M2: a long message is read only while the peer's budget has room for
    /// the longest one (1 MiB here), and what a request holds comes back when it is done.
    #[tokio::test]
    async fn the_reader_waits_while_the_peer_holds_its_budget() {
        let budget = PeerBudget::new((1 << 20) + 150_000, 1 << 20);
        let (mut a, _b, _tb, eb) = raw_and_link_within(8, 4 << 20, budget.clone()).await;
        for id in 10..14 {
            a.send(&store_request(id)).await.expect("send");
        }
        let held = collect_events(&eb, 4).await;
        assert_eq!(
            held.len(),
            2,
            "two of 100 kB fit beside a 1 MiB reservation"
        );
        let charged: usize = held
            .iter()
            .map(|e| match e {
                LinkEvent::Request(_, _, in_flight) => in_flight.bytes(),
                other => panic!("expected a request, got {other:?}"),
            })
            .sum();
        assert_eq!(budget.held(), charged);
        assert!((200_000..210_000).contains(&charged), "{charged}");
        drop(held);
        let rest = collect_events(&eb, 2).await;
        assert_eq!(rest.len(), 2, "read once the first two were done");
    }

    /// A reply that does not fit beside what the peer holds (and the room kept for reading) is
    /// TRY_LATER; one that fits is held on the budget until it is written.
    #[tokio::test]
    async fn a_reply_that_does_not_fit_is_try_later() {
        // Room for one reply of 900 kB beside the 1 MiB kept for reading, not for two.
        let budget = PeerBudget::new((2 << 20) + 100_000, 1 << 20);
        // A pipe the first reply does not fit in, so it is still queued when the second comes.
        let (mut a, _b, _tb, eb) = raw_and_link_within(8, 64 * 1024, budget.clone()).await;
        let ask = |id| {
            envelope::encode(&envelope::envelope(
                id,
                0,
                Body::ListFragments(crate::proto::ListFragments {
                    after: None,
                    limit: 0,
                }),
            ))
        };
        a.send(&ask(20)).await.expect("send");
        a.send(&ask(21)).await.expect("send");
        let mut asked = collect_events(&eb, 2).await.into_iter();
        let (Some(LinkEvent::Request(_, link, first)), Some(LinkEvent::Request(_, _, second))) =
            (asked.next(), asked.next())
        else {
            panic!("two requests");
        };
        let reply = |n: usize| {
            Body::FragmentData(crate::proto::FragmentData {
                id: None,
                data: vec![1; n],
            })
        };
        assert_eq!(
            link.reply_within(20, reply(900_000), first).await,
            Ok(Replied::Sent)
        );
        assert_eq!(
            link.reply_within(21, reply(900_000), second).await,
            Ok(Replied::TryLater)
        );
        // The small TRY_LATER may overtake the long reply (it has the small lane).
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(a.recv().await.expect("recv").expect("msg"));
        }
        got.sort_by_key(|bytes| bytes.len());
        assert_eq!(fail_of(&got[0]), (21, FailReason::TryLater));
        let first = envelope::decode(&got[1]).expect("env");
        assert_eq!(first.reply_to, 20);
        assert!(matches!(first.body, Some(Body::FragmentData(_))));
        for _ in 0..100 {
            if budget.held() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(budget.held(), 0, "written replies give their bytes back");
    }

    fn fail_of(bytes: &[u8]) -> (u64, FailReason) {
        let env = envelope::decode(bytes).expect("an envelope");
        match env.body {
            Some(Body::Fail(f)) => (
                env.reply_to,
                FailReason::try_from(f.reason).expect("a known reason"),
            ),
            other => panic!("expected a Fail, got {other:?}"),
        }
    }

    fn big_fragment() -> Body {
        Body::StoreFragment(crate::proto::StoreFragment {
            id: None,
            data: vec![7; 100_000],
            hash: vec![],
        })
    }

    #[tokio::test]
    async fn outbound_queue_is_bounded() {
        // The peer does not read: the writer blocks on a full pipe, then the queue fills.
        let (_a, b, _tb, _eb) = raw_and_link(2, 64 * 1024).await;
        let mut refused = None;
        for _ in 0..20 {
            if let Err(e) = b.try_send(big_fragment()) {
                refused = Some(e);
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(refused, Some(RequestError::QueueFull));
    }

    /// On a link busy with bulk (the peer reads slowly): a ping goes next, then a small
    /// request, then the rest of the bulk; the request's timeout starts once it is written.
    #[tokio::test]
    async fn pings_and_small_requests_overtake_bulk_and_timeouts_start_when_written() {
        let (mut a, b, _tb, _eb) = raw_and_link(8, 64 * 1024).await;
        for _ in 0..4 {
            b.try_send(big_fragment()).expect("queued");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.ping(7).expect("ping queued");
        let asking = b.clone();
        let request = tokio::spawn(async move {
            let list = Body::ListFragments(crate::proto::ListFragments {
                after: None,
                limit: 0,
            });
            asking.request(list, Duration::from_millis(300)).await
        });
        // Longer than the request's timeout, but it has not been written yet.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!request.is_finished(), "timed out before it was written");
        let mut order = Vec::new();
        let mut request_id = 0;
        for _ in 0..6 {
            let bytes = a.recv().await.expect("recv").expect("msg");
            let env = envelope::decode(&bytes).expect("env");
            order.push(match env.body {
                Some(Body::StoreFragment(_)) => "bulk",
                Some(Body::Ping(_)) => "ping",
                Some(Body::ListFragments(_)) => {
                    request_id = env.request_id;
                    "small"
                }
                other => panic!("unexpected {other:?}"),
            });
        }
        assert_eq!(order, ["bulk", "ping", "small", "bulk", "bulk", "bulk"]);
        let reply = envelope::envelope(900, request_id, Body::Ack(Ack::default()));
        a.send(&envelope::encode(&reply)).await.expect("reply");
        let answered = request.await.expect("task").expect("answered in time");
        assert_eq!(answered.reply_to, request_id);
    }

    /// A request that timed out waiting behind bulk is not sent once the link moves again.
    #[tokio::test]
    async fn a_request_given_up_before_it_is_written_is_not_sent() {
        let (mut a, b, _tb, _eb) = raw_and_link(8, 64 * 1024).await;
        for _ in 0..2 {
            b.try_send(big_fragment()).expect("queued");
        }
        // The writer is stuck in the first fragment (the pipe is full) before the request.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let list = Body::ListFragments(crate::proto::ListFragments {
            after: None,
            limit: 0,
        });
        // Ten times this timeout to be written, then it gives up.
        let gave_up = b.request(list, Duration::from_millis(20)).await;
        assert!(
            matches!(gave_up, Err(RequestError::Timeout(_))),
            "{gave_up:?}"
        );
        b.try_send(Body::Ping(Ping { nonce: 5 })).expect("queued");
        let mut seen = Vec::new();
        loop {
            let bytes = a.recv().await.expect("recv").expect("msg");
            match envelope::decode(&bytes).expect("env").body {
                Some(Body::Ping(_)) => break,
                Some(Body::StoreFragment(_)) => seen.push("bulk"),
                other => panic!("sent after it was given up: {other:?}"),
            }
        }
        assert_eq!(seen, ["bulk", "bulk"]);
    }

    #[tokio::test]
    async fn pongs_skip_a_full_queue_and_drops_are_counted() {
        let (mut a, b, _tb, _eb) = raw_and_link(4, 64 * 1024).await;
        let mut queued = 0;
        while b.try_send(big_fragment()).is_ok() {
            queued += 1;
            tokio::task::yield_now().await;
        }
        // 20 pings while the writer is stuck: 8 pongs wait in their own queue, 12 are dropped.
        for nonce in 0..20u64 {
            let ping = envelope::envelope(100 + nonce, 0, Body::Ping(Ping { nonce }));
            a.send(&envelope::encode(&ping)).await.expect("ping");
        }
        for _ in 0..200 {
            if b.stats.control_dropped.load(Ordering::Relaxed) >= 12 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(b.stats.control_dropped.load(Ordering::Relaxed), 12);
        // Now read: the pongs come right after the message that was being written, ahead of
        // the rest of the queue.
        let mut order = Vec::new();
        while order.len() < queued + 8 {
            let bytes = a.recv().await.expect("recv").expect("message");
            let env = envelope::decode(&bytes).expect("envelope");
            order.push(matches!(env.body, Some(Body::Pong(_))));
        }
        let first_pong = order.iter().position(|p| *p).expect("pongs arrive");
        assert!(
            first_pong < queued,
            "pongs waited behind the queue: {order:?}"
        );
        assert_eq!(order.iter().filter(|p| **p).count(), 8);
    }

    #[tokio::test]
    async fn another_version_is_told_then_closed() {
        let (mut a, _b, _tb, eb) = raw_and_link(8, 1 << 20).await;
        let mut future = envelope::envelope(41, 0, Body::Ping(Ping { nonce: 1 }));
        future.version = 2;
        a.send(&envelope::encode(&future)).await.expect("send");
        let said = a.recv().await.expect("recv").expect("a Fail");
        assert_eq!(fail_of(&said), (41, FailReason::UnsupportedVersion));
        assert!(a.recv().await.expect("clean end").is_none());
        let events = collect_events(&eb, 1).await;
        assert!(
            matches!(
                events.last(),
                Some(LinkEvent::Closed(LinkClose::UnsupportedVersion))
            ),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn garbage_is_told_malformed_then_closed() {
        let (mut a, _b, _tb, eb) = raw_and_link(8, 1 << 20).await;
        a.send(&[0xff, 0xff, 0xff, 0xff, 0x0f]).await.expect("send");
        let said = a.recv().await.expect("recv").expect("a Fail");
        assert_eq!(fail_of(&said), (0, FailReason::Malformed));
        assert!(a.recv().await.expect("clean end").is_none());
        let events = collect_events(&eb, 1).await;
        assert!(
            matches!(events.last(), Some(LinkEvent::Closed(LinkClose::Malformed))),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn an_unknown_request_is_answered_and_the_session_stays() {
        let (mut a, _b, _tb, _eb) = raw_and_link(8, 1 << 20).await;
        // What a newer message type looks like to this node: a version 1 envelope whose body
        // field it does not know (field 99, an empty message).
        let mut bytes = envelope::encode(&Envelope {
            version: 1,
            request_id: 42,
            reply_to: 0,
            body: None,
        });
        bytes.extend_from_slice(&[0x9a, 0x06, 0x00]);
        a.send(&bytes).await.expect("send");
        let said = a.recv().await.expect("recv").expect("a Fail");
        assert_eq!(fail_of(&said), (42, FailReason::NoService));
        let ping = envelope::envelope(43, 0, Body::Ping(Ping { nonce: 5 }));
        a.send(&envelope::encode(&ping)).await.expect("send");
        let pong = envelope::decode(&a.recv().await.expect("recv").expect("pong")).expect("env");
        assert_eq!(pong.reply_to, 43);
        assert!(matches!(pong.body, Some(Body::Pong(Pong { nonce: 5 }))));
    }

    #[tokio::test]
    async fn farewell_says_shutting_down_before_the_close() {
        let (mut a, _b, tb, _eb) = raw_and_link(8, 1 << 20).await;
        tb.farewell(FailReason::ShuttingDown, "bye");
        let said = a.recv().await.expect("recv").expect("a Fail");
        assert_eq!(fail_of(&said), (0, FailReason::ShuttingDown));
        assert!(a.recv().await.expect("clean end").is_none());
    }

    #[tokio::test]
    async fn refusals_in_the_handshake_are_told() {
        let (ka, a) = node("a");
        let (kb, b) = node("b");
        let (na, nb) = (ka.noise_secret_bytes(), kb.noise_secret_bytes());
        // b does not know a: a hears NOT_TRUSTED, and never sees b's identity.
        let (io_a, io_b) = tokio::io::duplex(1 << 16);
        let responder = tokio::spawn(async move {
            establish(
                io_b,
                false,
                &nb,
                &b,
                None,
                &TrustPolicy::default(),
                T,
                1 << 16,
            )
            .await
            .err()
        });
        let mut raw = handshake_initiator(io_a, &na, PROLOGUE, T)
            .await
            .expect("noise");
        let hello = envelope::envelope(
            1,
            0,
            Body::Identity(IdentityExchange {
                identity: Some(a.signed().clone()),
                ..Default::default()
            }),
        );
        raw.send(&envelope::encode(&hello)).await.expect("send");
        let said = raw.recv().await.expect("recv").expect("a Fail");
        assert_eq!(fail_of(&said), (1, FailReason::NotTrusted));
        assert!(raw.recv().await.expect("clean end").is_none());
        assert_eq!(
            responder.await.expect("joined"),
            Some(LinkClose::UnknownPeer)
        );

        // Silence after the handshake: TIMEOUT is said before the deadline closes it.
        let (kb, b) = node("b");
        let nb = kb.noise_secret_bytes();
        let (io_a, io_b) = tokio::io::duplex(1 << 16);
        let short = Duration::from_millis(300);
        let responder = tokio::spawn(async move {
            establish(
                io_b,
                false,
                &nb,
                &b,
                None,
                &TrustPolicy::default(),
                short,
                1 << 16,
            )
            .await
            .err()
        });
        let mut raw = handshake_initiator(io_a, &na, PROLOGUE, T)
            .await
            .expect("noise");
        let said = raw.recv().await.expect("recv").expect("a Fail");
        assert_eq!(fail_of(&said), (0, FailReason::Timeout));
        assert_eq!(
            responder.await.expect("joined"),
            Some(LinkClose::HandshakeTimeout)
        );
    }

    /// Security review M1: before the identity is checked, a message above
    /// `PREAUTH_MAX_MESSAGE` ends the handshake on its first chunk, whatever the limit after
    /// authentication; the rest is never read (it used to be buffered up to `max_message`).
    #[tokio::test]
    async fn a_large_message_before_the_identity_closes_on_its_first_chunk() {
        let (ka, _) = node("a");
        let (kb, b) = node("b");
        let (na, nb) = (ka.noise_secret_bytes(), kb.noise_secret_bytes());
        let (io_a, io_b) = tokio::io::duplex(1 << 20);
        let responder = tokio::spawn(async move {
            let open = TrustPolicy {
                trusted: HashMap::new(),
                open: true,
            };
            establish(io_b, false, &nb, &b, None, &open, T, 32 << 20)
                .await
                .err()
        });
        let mut raw = handshake_initiator(io_a, &na, PROLOGUE, T)
            .await
            .expect("noise");
        // Five chunks of a 300 KiB message: the node stops reading after the first.
        let sent = raw.send(&vec![0x42; 300 * 1024]).await;
        assert_eq!(
            responder.await.expect("joined"),
            Some(LinkClose::MessageTooLarge)
        );
        drop(sent);
        // Nothing was said: a stranger that floods is not owed a reason.
        assert!(matches!(raw.recv().await, Ok(None) | Err(_)));
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
