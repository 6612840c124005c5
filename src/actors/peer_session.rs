//! The peer_session actor's IO: TCP connect, Noise handshake and identity exchange, the link's
//! reader and writer, pings, and reporting to the network actor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use actix::Recipient;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::network_connector::NetInput;
use super::shell::{Deliver, Driver, Input, Io};
use crate::crypto::identity::{Identity, NodeId};
use crate::fsm::Label;
use crate::fsm::peer_session::{CloseReason, Event, Output, PeerSession};
use crate::net::link::{self, LinkClose, LinkEvent, LinkHandle, LinkTasks, TrustPolicy};
use crate::net::noise::NoiseSession;
use crate::net::paced::{self, ControlWrites, PacedRead, PacedWrite, Pacing};
use crate::proto::FailReason;

/// What every session of this node shares. Holds the Noise secret: never `Debug`.
pub struct SessionShared {
    pub noise_secret: zeroize::Zeroizing<[u8; 32]>,
    pub identity: watch::Receiver<Option<Identity>>,
    pub policy: watch::Receiver<TrustPolicy>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_message: usize,
    pub queue: usize,
    /// What each peer may make this node hold, across its sessions (security review M2).
    pub budgets: crate::net::budget::Budgets,
    /// Best-effort notices (pongs, identity pushes) dropped because a mailbox was full: a peer
    /// flooding them cannot grow the node's memory.
    pub dropped_notices: AtomicU64,
    /// The bandwidth limits every session's reads and writes are charged to.
    pub shaper: Arc<crate::net::bandwidth::Shaper>,
}

/// A peer to dial: its id and contact addresses (`tcp://HOST:PORT`).
#[derive(Clone, Debug)]
pub struct Target {
    pub peer: NodeId,
    pub contacts: Vec<String>,
}

pub struct PeerSessionDriver {
    id: u64,
    target: Option<Target>,
    shared: Arc<SessionShared>,
    network: Recipient<Input<NetInput>>,
    stream: Option<TcpStream>,
    remote: Option<SocketAddr>,
    authenticated: Option<(NoiseSession<TcpStream>, Identity)>,
    link: Option<(LinkHandle, LinkTasks)>,
    /// The revision of our identity sent in the handshake.
    sent_revision: u64,
}

impl PeerSessionDriver {
    pub fn new(
        id: u64,
        target: Option<Target>,
        stream: Option<TcpStream>,
        shared: Arc<SessionShared>,
        network: Recipient<Input<NetInput>>,
    ) -> Self {
        let remote = stream.as_ref().and_then(|s| s.peer_addr().ok());
        PeerSessionDriver {
            id,
            target,
            shared,
            network,
            stream,
            remote,
            authenticated: None,
            sent_revision: 0,
            link: None,
        }
    }
}

/// Connects to the first contact address that answers.
async fn connect_any(contacts: Vec<String>, timeout: Duration) -> Option<TcpStream> {
    for contact in contacts {
        let Some(addr) = contact.strip_prefix("tcp://") else {
            continue;
        };
        if let Ok(Ok(stream)) = tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            let _ = stream.set_nodelay(true);
            return Some(stream);
        }
    }
    None
}

/// The session machine's reason for a net-level close.
fn session_reason(reason: LinkClose) -> CloseReason {
    match reason {
        LinkClose::HandshakeTimeout => CloseReason::HandshakeTimeout,
        LinkClose::BadHandshake => CloseReason::BadHandshake,
        LinkClose::FrameTooLarge => CloseReason::FrameTooLarge,
        LinkClose::DecryptFailed => CloseReason::DecryptFailed,
        LinkClose::MessageTooLarge => CloseReason::MessageTooLarge,
        LinkClose::Malformed => CloseReason::Malformed,
        LinkClose::UnsupportedVersion => CloseReason::UnsupportedVersion,
        LinkClose::UnexpectedMessage => CloseReason::UnexpectedMessage,
        LinkClose::IdentityMismatch => CloseReason::IdentityMismatch,
        LinkClose::BadIdentity => CloseReason::BadIdentity,
        LinkClose::StaleIdentity => CloseReason::RetiredKey,
        LinkClose::UnknownPeer => CloseReason::UnknownPeer,
        LinkClose::WrongPeer => CloseReason::WrongPeer,
        LinkClose::PeerClosed => CloseReason::PeerClosed,
        LinkClose::IoError => CloseReason::IoError,
    }
}

fn is_routine(reason: CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::Shutdown | CloseReason::Duplicate | CloseReason::PeerClosed
    )
}

impl PeerSessionDriver {
    /// Reports to the network actor, waiting for room in its mailbox.
    fn report(&self, input: NetInput) {
        let network = self.network.clone();
        actix::spawn(async move {
            let _ = network.send(Input(input)).await;
        });
    }
}

impl PeerSessionDriver {
    /// Dials the target's contact addresses, the first that answers wins.
    fn open_tcp(&mut self, io: &mut Io<'_, Self>) {
        let contacts = self
            .target
            .as_ref()
            .map(|t| t.contacts.clone())
            .unwrap_or_default();
        let timeout = self.shared.connect_timeout;
        io.spawn_then(
            connect_any(contacts, timeout),
            |driver, stream| match stream {
                Some(stream) => {
                    driver.remote = stream.peer_addr().ok();
                    driver.stream = Some(stream);
                    Event::TcpConnected
                }
                None => Event::ConnectFailed,
            },
        );
    }

    /// The Noise handshake and the identity exchange on the connected stream.
    fn run_handshake(&mut self, machine: &PeerSession, io: &mut Io<'_, Self>) {
        let (Some(stream), Some(mine)) =
            (self.stream.take(), self.shared.identity.borrow().clone())
        else {
            io.send(Event::HandshakeFailed(CloseReason::IoError));
            return;
        };
        self.sent_revision = mine.revision();
        let shared = self.shared.clone();
        let expected = self.target.as_ref().map(|t| t.peer);
        let outbound = self.target.is_some();
        let policy = shared.policy.borrow().clone();
        // The machine's deadline (shorter for inbound: the pre-auth deadline), so the
        // net layer's own deadline comes first and can tell the peer TIMEOUT.
        let deadline = machine.handshake_timeout;
        let work = async move {
            link::establish(
                stream,
                outbound,
                &shared.noise_secret,
                &mine,
                expected,
                &policy,
                deadline,
                shared.max_message,
            )
            .await
        };
        io.spawn_then(work, |driver, result| match result {
            Ok((session, identity)) => {
                let peer = identity.node_id();
                driver.authenticated = Some((session, identity));
                Event::Authenticated(peer)
            }
            Err(reason) => Event::HandshakeFailed(session_reason(reason)),
        });
    }

    /// Where the link's events go: pongs and the close to this actor, identity news and
    /// requests to the network actor.
    fn link_sink(&self, peer: NodeId, io: &mut Io<'_, Self>) -> link::LinkSink {
        let me = io.address();
        let network = self.network.clone();
        let shared = self.shared.clone();
        // Best-effort notices go with try_send: a flooding peer fills a mailbox and the
        // rest is dropped and counted. Requests and the close wait for room (the link
        // bounds requests in flight, and there is one close).
        let dropped = move || {
            shared.dropped_notices.fetch_add(1, Ordering::Relaxed);
        };
        // Requests keep their order on the way to the network actor: one task forwards
        // them, waiting for room in its mailbox. The link holds at most MAX_IN_FLIGHT
        // requests unanswered, so this queue never fills.
        let (requests, mut queue) = mpsc::channel::<NetInput>(2 * link::MAX_IN_FLIGHT);
        let forward_to = network.clone();
        io.spawn_task(async move {
            while let Some(input) = queue.recv().await {
                if forward_to.send(Input(input)).await.is_err() {
                    return;
                }
            }
        });
        // The sink runs on the link's reader task, off this actor's event loop.
        Arc::new(move |event| match event {
            LinkEvent::Pong => {
                if me.try_send(Deliver(Event::Pong)).is_err() {
                    dropped();
                }
            }
            LinkEvent::Closed(reason) => {
                let me = me.clone();
                tokio::spawn(async move {
                    let reason = session_reason(reason);
                    let _ = me.send(Deliver(Event::LinkFailed(reason))).await;
                });
            }
            LinkEvent::Identity(identity) => {
                if network
                    .try_send(Input(NetInput::PeerIdentity(identity)))
                    .is_err()
                {
                    dropped();
                }
            }
            LinkEvent::ForgedIdentity => {
                if network
                    .try_send(Input(NetInput::ForgedIdentity(peer)))
                    .is_err()
                {
                    dropped();
                }
            }
            LinkEvent::Request(envelope, link, permit) => {
                let request = NetInput::Request {
                    peer,
                    envelope,
                    link,
                    permit,
                };
                if requests.try_send(request).is_err() {
                    dropped();
                }
            }
        })
    }

    /// Starts the link's reader and writer and tells the network actor the session is up.
    fn start_link(&mut self, io: &mut Io<'_, Self>) {
        let Some((session, identity)) = self.authenticated.take() else {
            io.send(Event::LinkFailed(CloseReason::IoError));
            return;
        };
        let pacing = Pacing {
            shaper: self.shared.shaper.clone(),
            peer: identity.node_id(),
            lan: self.remote.is_some_and(|r| paced::is_lan(r.ip())),
        };
        let control = ControlWrites::default();
        let me = io.address();
        let heard: paced::Heard = Arc::new(move || {
            // Best effort: a full mailbox has other news of the peer in it.
            let _ = me.try_send(Deliver(Event::Heard));
        });
        let writes = control.clone();
        let (reader, writer) = session.split_with(move |stream: TcpStream| {
            let (r, w) = stream.into_split();
            (
                PacedRead::new(r, pacing.clone(), Some(heard)),
                PacedWrite::new(w, pacing, writes),
            )
        });
        let sink = self.link_sink(identity.node_id(), io);
        let budget = self.shared.budgets.for_peer(identity.node_id());
        let (handle, tasks) = link::start(
            reader,
            writer,
            identity.clone(),
            self.shared.queue,
            budget,
            sink,
            control,
        );
        self.report(NetInput::SessionUp {
            session: self.id,
            identity: Box::new(identity),
            outbound: self.target.is_some(),
            link: handle.clone(),
            remote: self.remote,
            sent_revision: self.sent_revision,
        });
        self.link = Some((handle, tasks));
    }

    /// Logs the close, says goodbye if we end it, and tells the network actor.
    fn closed(&mut self, reason: CloseReason, peer: Option<NodeId>) {
        let shown = peer.or(self.target.as_ref().map(|t| t.peer));
        let peer_text = shown.map(|p| p.to_string()).unwrap_or_default();
        let remote = self.remote.map(|r| r.to_string()).unwrap_or_default();
        if is_routine(reason) {
            tracing::info!(session = self.id, peer = %peer_text, remote = %remote, reason = reason.name(), "session closed");
        } else {
            tracing::warn!(session = self.id, peer = %peer_text, remote = %remote, reason = reason.name(), "session closed");
        }
        // A session we end ourselves says so before the close; other ends are the
        // peer's doing or a broken transport.
        if let Some((_, tasks)) = self.link.take()
            && reason == CloseReason::Shutdown
        {
            tasks.farewell(FailReason::ShuttingDown, "this node is closing the session");
        }
        self.stream = None;
        self.authenticated = None;
        self.report(NetInput::SessionDown {
            session: self.id,
            peer,
            dialed: self.target.as_ref().map(|t| t.peer),
            reason,
        });
    }
}

impl Driver for PeerSessionDriver {
    type M = PeerSession;
    type Input = std::convert::Infallible;
    type Query = std::convert::Infallible;
    type Answer = ();

    fn input(&mut self, input: Self::Input, _: &PeerSession, _: &mut Io<'_, Self>) -> Vec<Event> {
        match input {}
    }

    fn query(&mut self, query: Self::Query, _: &PeerSession, _: &mut Io<'_, Self>) {
        match query {}
    }

    fn perform(&mut self, output: Output, machine: &PeerSession, io: &mut Io<'_, Self>) {
        match output {
            Output::OpenTcp => self.open_tcp(io),
            Output::RunHandshake => self.run_handshake(machine, io),
            Output::StartLink { .. } => self.start_link(io),
            Output::SendPing => {
                if let Some((link, _)) = &self.link {
                    // Ahead of queued messages; a full control queue is a ping not sent, and
                    // the pong deadline decides.
                    let _ = link.ping(rand::random());
                }
            }
            Output::Closed { reason, peer } => self.closed(reason, peer),
        }
    }
}
