//! The peer_session actor's IO: TCP connect, Noise handshake and identity exchange, the link's
//! reader and writer, pings, and reporting to the network actor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::network::{NetInput, NetworkDriver};
use super::shell::{Driver, Fire, Input, Io, Shell};
use crate::crypto::identity::{Identity, NodeId};
use crate::fsm::Label;
use crate::fsm::peer_session::{Action, CloseReason, Event, PeerSession};
use crate::net::link::{self, LinkClose, LinkEvent, LinkHandle, LinkTasks, TrustPolicy};
use crate::net::noise::NoiseSession;
use crate::proto::envelope::Body;
use crate::proto::{FailReason, Ping};

/// What every session of this node shares. Holds the Noise secret: never `Debug`.
pub struct SessionShared {
    pub noise_secret: [u8; 32],
    pub identity: watch::Receiver<Option<Identity>>,
    pub policy: watch::Receiver<TrustPolicy>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_message: usize,
    pub queue: usize,
}

/// A peer to dial: its id and contact addresses (`tcp://HOST:PORT`).
#[derive(Clone, Debug)]
pub struct Target {
    pub peer: NodeId,
    pub contacts: Vec<String>,
}

pub struct SessionDriver {
    id: u64,
    target: Option<Target>,
    shared: Arc<SessionShared>,
    network: Addr<Shell<NetworkDriver>>,
    stream: Option<TcpStream>,
    remote: Option<SocketAddr>,
    authenticated: Option<(NoiseSession<TcpStream>, Identity)>,
    link: Option<(LinkHandle, LinkTasks)>,
    /// The revision of our identity sent in the handshake.
    sent_revision: u64,
}

impl SessionDriver {
    pub fn new(
        id: u64,
        target: Option<Target>,
        stream: Option<TcpStream>,
        shared: Arc<SessionShared>,
        network: Addr<Shell<NetworkDriver>>,
    ) -> Self {
        let remote = stream.as_ref().and_then(|s| s.peer_addr().ok());
        SessionDriver {
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

/// The session machine's reason for a net-level close. `StaleIdentity` has no reason of its
/// own in the machine yet: it is counted as `BadIdentity` (and logged under its own name).
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
        LinkClose::BadIdentity | LinkClose::StaleIdentity => CloseReason::BadIdentity,
        LinkClose::UnknownPeer => CloseReason::UnknownPeer,
        LinkClose::WrongPeer => CloseReason::WrongPeer,
        LinkClose::PeerClosed => CloseReason::PeerClosed,
        LinkClose::IoError => CloseReason::IoError,
    }
}

fn net_failed(session: u64, reason: LinkClose) -> CloseReason {
    if reason == LinkClose::StaleIdentity {
        tracing::warn!(
            session,
            reason = reason.name(),
            "refused an older identity revision"
        );
    }
    session_reason(reason)
}

fn is_routine(reason: CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::Shutdown | CloseReason::Duplicate | CloseReason::PeerClosed
    )
}

impl Driver for SessionDriver {
    type M = PeerSession;
    type Input = std::convert::Infallible;

    fn input(&mut self, input: Self::Input, _: &PeerSession, _: &mut Io<'_, Self>) -> Vec<Event> {
        match input {}
    }

    fn perform(
        &mut self,
        action: Action,
        _event: &Event,
        machine: &PeerSession,
        io: &mut Io<'_, Self>,
    ) {
        match action {
            Action::OpenTcp => {
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
            Action::RunHandshake => {
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
                    Err(reason) => Event::HandshakeFailed(net_failed(driver.id, reason)),
                });
            }
            Action::StartLink => {
                let Some((session, identity)) = self.authenticated.take() else {
                    io.send(Event::LinkFailed(CloseReason::IoError));
                    return;
                };
                let (reader, writer) = session.split_with(TcpStream::into_split);
                let me = io.address();
                let network = self.network.clone();
                let peer = identity.node_id();
                let sink: link::LinkSink = Arc::new(move |event| match event {
                    LinkEvent::Pong => me.do_send(Fire(Event::Pong)),
                    LinkEvent::Closed(reason) => {
                        me.do_send(Fire(Event::LinkFailed(session_reason(reason))))
                    }
                    LinkEvent::Identity(identity) => {
                        network.do_send(Input(NetInput::PeerIdentity(identity)))
                    }
                    LinkEvent::ForgedIdentity => {
                        network.do_send(Input(NetInput::ForgedIdentity(peer)))
                    }
                    LinkEvent::Request(envelope, link, permit) => {
                        network.do_send(Input(NetInput::Request {
                            peer,
                            envelope,
                            link,
                            permit,
                        }))
                    }
                });
                let (handle, tasks) =
                    link::start(reader, writer, identity.clone(), self.shared.queue, sink);
                self.network.do_send(Input(NetInput::SessionUp {
                    session: self.id,
                    identity: Box::new(identity),
                    outbound: self.target.is_some(),
                    addr: io.address(),
                    link: handle.clone(),
                    remote: self.remote,
                    sent_revision: self.sent_revision,
                }));
                self.link = Some((handle, tasks));
            }
            Action::SendPing => {
                if let Some((link, _)) = &self.link {
                    // A full queue counts as a missed ping; the machine decides when to give up.
                    let _ = link.try_send(Body::Ping(Ping {
                        nonce: rand::random(),
                    }));
                }
            }
            Action::ClearMissed => {}
            Action::ReportClosed => {
                let reason = machine.close_reason.unwrap_or(CloseReason::Shutdown);
                let peer = machine.peer.or(self.target.as_ref().map(|t| t.peer));
                let peer_text = peer.map(|p| p.to_string()).unwrap_or_default();
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
                self.network.do_send(Input(NetInput::SessionDown {
                    session: self.id,
                    peer: machine.peer,
                    dialed: self.target.as_ref().map(|t| t.peer),
                    reason,
                }));
            }
        }
    }
}
