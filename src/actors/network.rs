//! The network_connector actor's IO: the listening socket, one session actor per connection,
//! the book of trusted peers (persisted), identity propagation, counters and status.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

use super::registry::Registry;
use super::session::{SessionDriver, SessionShared, Target};
use super::shell::{Driver, Fire, Input, Io, Shell, Shutdown};
use crate::crypto::identity::{Identity, NodeId};
use crate::fsm::Label;
use crate::fsm::network_connector::{Action, Event, NetworkConnector};
use crate::fsm::peer_session::{CloseReason, Event as SessionEvent, PeerSession};
use crate::net::link::{InFlight, LinkHandle, TrustPolicy};
use crate::proto::envelope::Body;
use crate::proto::{Envelope, Fail, FailReason, IdentityExchange, Ping};
use crate::store::{KvStore, peers};

/// Sessions with one peer established within this window of each other are a simultaneous
/// dial, settled by node id; a session older than that is replaced by a new one.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(5);

/// Inbound connections allowed to be handshaking at once; more are dropped (and counted).
const MAX_PENDING_INBOUND: usize = 64;

pub enum NetInput {
    Accepted(TcpStream, SocketAddr),
    SessionUp {
        session: u64,
        identity: Box<Identity>,
        outbound: bool,
        addr: Addr<Shell<SessionDriver>>,
        link: LinkHandle,
        remote: Option<SocketAddr>,
        /// Our identity revision sent in this session's handshake.
        sent_revision: u64,
    },
    SessionDown {
        session: u64,
        peer: Option<NodeId>,
        dialed: Option<NodeId>,
        reason: CloseReason,
    },
    PeerIdentity(Box<Identity>),
    ForgedIdentity(NodeId),
    /// A request that came on `link`; the reply goes back on the same link (another session
    /// with the same peer may be replacing it at this very moment).
    Request {
        peer: NodeId,
        envelope: Box<Envelope>,
        link: LinkHandle,
        permit: InFlight,
    },
    AddPeer {
        identity: Box<Identity>,
        label: Option<String>,
        reply: oneshot::Sender<Result<bool, String>>,
    },
    OwnIdentity(Box<Identity>),
    Status(oneshot::Sender<serde_json::Value>),
    Ping {
        peer: NodeId,
        reply: oneshot::Sender<Result<Duration, String>>,
    },
    /// The link to a peer, if a session is established (for other actors' requests).
    Link {
        peer: NodeId,
        reply: oneshot::Sender<Option<LinkHandle>>,
    },
    /// Stop trusting a friend: forget it, close its sessions.
    RemovePeer {
        peer: NodeId,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Where peer presence and requests go: set once the customer and supplier actors run.
    SetSinks(Sinks),
    /// Whether any authenticated node may connect (supplier `accept = "open"`), on SIGHUP.
    SetOpen(bool),
}

/// A request for the supplier side: from `customer`, to answer on `link`.
pub struct ServiceCall {
    pub customer: NodeId,
    pub trusted: bool,
    pub envelope: Box<Envelope>,
    pub link: LinkHandle,
    /// Held until the reply is sent.
    pub permit: InFlight,
}

/// Consumers of what the network hears, kept as callbacks so this module needs no knowledge of
/// the actors behind them.
pub struct Sinks {
    /// A trusted peer's session came up (true) or went down (false).
    pub presence: Box<dyn Fn(NodeId, bool) + Send>,
    /// Requests for the supplier side (service, fragments).
    pub supplier: Box<dyn Fn(ServiceCall) + Send>,
    /// A supplier ended our contract with it.
    pub supplier_left: Box<dyn Fn(NodeId) + Send>,
}

struct BookEntry {
    identity: Identity,
    label: Option<String>,
    bytes_in: u64,
    bytes_out: u64,
    last_seen: u64,
}

struct SessionEntry {
    id: u64,
    addr: Addr<Shell<SessionDriver>>,
    peer: Option<NodeId>,
    dialed: Option<NodeId>,
    link: Option<LinkHandle>,
    remote: Option<SocketAddr>,
    outbound: bool,
    /// When the session was established.
    up_since: Option<Instant>,
}

pub struct NetworkSettings {
    pub listen: SocketAddr,
    pub request_timeout: Duration,
    pub keepalive: Duration,
}

pub struct NetworkDriver {
    settings: NetworkSettings,
    my_id: NodeId,
    shared: Arc<SessionShared>,
    store: Arc<dyn KvStore>,
    registry: Registry,
    policy: watch::Sender<TrustPolicy>,
    book: BTreeMap<NodeId, BookEntry>,
    sessions: HashMap<u64, SessionEntry>,
    active: HashMap<NodeId, u64>,
    next_session: u64,
    counters: BTreeMap<&'static str, u64>,
    listener: Option<actix::SpawnHandle>,
    bound: Option<SocketAddr>,
    sinks: Option<Sinks>,
}

/// Loads the persisted peer book (a database that cannot be read counts as an empty book).
pub fn load_peers(store: &dyn KvStore) -> Vec<(Identity, Option<String>)> {
    crate::store::peers::load(store).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read the peer book");
        Vec::new()
    })
}

impl NetworkDriver {
    pub fn new(
        settings: NetworkSettings,
        my_id: NodeId,
        shared: Arc<SessionShared>,
        store: Arc<dyn KvStore>,
        registry: Registry,
        policy: watch::Sender<TrustPolicy>,
        peers: Vec<(Identity, Option<String>)>,
    ) -> Self {
        let mut driver = NetworkDriver {
            settings,
            my_id,
            shared,
            store,
            registry,
            policy,
            book: BTreeMap::new(),
            sessions: HashMap::new(),
            active: HashMap::new(),
            next_session: 1,
            counters: BTreeMap::new(),
            listener: None,
            bound: None,
            sinks: None,
        };
        for (identity, label) in peers {
            driver.learn(identity, label);
        }
        driver.publish_policy();
        driver
    }

    /// The peers known at start, for the machine's first `PeerAdded` events.
    pub fn known_peers(&self) -> Vec<NodeId> {
        self.book.keys().copied().collect()
    }

    /// Adds or updates a book entry; a newer revision of a known peer replaces the old one.
    /// Replaces a friend's identity with a newer revision signed by the same key, and saves it.
    /// False when `identity` is not a newer revision of a friend.
    fn adopt_newer(&mut self, identity: &Identity) -> bool {
        let peer = identity.node_id();
        let Some(entry) = self
            .book
            .get(&peer)
            .filter(|e| e.identity.is_superseded_by(identity))
        else {
            return false;
        };
        tracing::info!(peer = %peer, revision = identity.revision(), contacts = ?identity.contacts(),
            "peer identity updated");
        if let Err(e) = peers::save(self.store.as_ref(), identity, entry.label.as_deref()) {
            tracing::error!(peer = %peer, error = %e, "cannot persist the peer's new identity");
        }
        self.learn(identity.clone(), None);
        true
    }

    fn learn(&mut self, identity: Identity, label: Option<String>) -> bool {
        match self.book.get_mut(&identity.node_id()) {
            Some(entry) => {
                if entry.identity.is_superseded_by(&identity) {
                    entry.identity = identity;
                }
                if label.is_some() {
                    entry.label = label;
                }
                false
            }
            None => {
                self.book.insert(
                    identity.node_id(),
                    BookEntry {
                        identity,
                        label,
                        bytes_in: 0,
                        bytes_out: 0,
                        last_seen: 0,
                    },
                );
                true
            }
        }
    }

    fn publish_policy(&self) {
        let open = self.policy.borrow().open;
        self.policy.send_replace(TrustPolicy {
            trusted: self.book.keys().copied().collect(),
            open,
        });
    }

    fn count(&mut self, key: &'static str) {
        *self.counters.entry(key).or_default() += 1;
    }

    fn jitter() -> u16 {
        rand::random::<u16>() % 1001
    }

    fn start_session(
        &mut self,
        target: Option<Target>,
        stream: Option<TcpStream>,
        io: &mut Io<'_, Self>,
    ) {
        let id = self.next_session;
        self.next_session += 1;
        let outbound = target.is_some();
        let dialed = target.as_ref().map(|t| t.peer);
        let driver = SessionDriver::new(id, target, stream, self.shared.clone(), io.address());
        let remote = None;
        let machine = PeerSession {
            connect_timeout: self.shared.connect_timeout,
            handshake_timeout: self.shared.handshake_timeout,
            keepalive: self.settings.keepalive,
            ..PeerSession::default()
        };
        let addr = Shell::new(machine, format!("s{id}"), driver, self.registry.clone()).start();
        addr.do_send(Fire(if outbound {
            SessionEvent::Dial
        } else {
            SessionEvent::Accept
        }));
        self.sessions.insert(
            id,
            SessionEntry {
                up_since: None,
                id,
                addr,
                peer: None,
                dialed,
                link: None,
                remote,
                outbound,
            },
        );
    }

    fn pending_inbound(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| !s.outbound && s.link.is_none())
            .count()
    }

    fn link_of(&self, peer: &NodeId) -> Option<LinkHandle> {
        self.active
            .get(peer)
            .and_then(|s| self.sessions.get(s))
            .and_then(|s| s.link.clone())
    }

    fn status(&self) -> serde_json::Value {
        let peers: Vec<_> = self
            .book
            .iter()
            .map(|(id, entry)| {
                let session = self.active.get(id).and_then(|s| self.sessions.get(s)).or_else(|| {
                    self.sessions.values().find(|s| s.dialed == Some(*id) || s.peer == Some(*id))
                });
                let state = session
                    .and_then(|s| self.registry.state_of("peer_session", &format!("s{}", s.id)))
                    .unwrap_or("Disconnected");
                let link = self.link_of(id);
                let (bytes_in, bytes_out, last_seen) = match &link {
                    Some(l) => (
                        entry.bytes_in + l.stats.bytes_in.load(Ordering::Relaxed),
                        entry.bytes_out + l.stats.bytes_out.load(Ordering::Relaxed),
                        l.stats.last_seen.load(Ordering::Relaxed),
                    ),
                    None => (entry.bytes_in, entry.bytes_out, entry.last_seen),
                };
                json!({
                    "node_id": id.to_string(),
                    "name": entry.label.clone().unwrap_or_else(|| entry.identity.name().to_string()),
                    "address": entry.identity.contacts().first().cloned(),
                    "remote": session.and_then(|s| s.remote).map(|r| r.to_string()),
                    "revision": entry.identity.revision(),
                    "session": state,
                    "last_seen": (last_seen > 0).then_some(last_seen),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                })
            })
            .collect();
        json!({
            "listen": self.bound.map(|a| a.to_string()),
            "sessions": self.sessions.len(),
            "peers": peers,
            "counters": self.counters,
        })
    }
}

impl Driver for NetworkDriver {
    type M = NetworkConnector;
    type Input = NetInput;

    fn perform(
        &mut self,
        action: Action,
        _event: &Event,
        machine: &NetworkConnector,
        io: &mut Io<'_, Self>,
    ) {
        match action {
            Action::Bind => {
                let bound = std::net::TcpListener::bind(self.settings.listen)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(tokio::net::TcpListener::from_std);
                match bound {
                    Ok(listener) => {
                        self.bound = listener.local_addr().ok();
                        let me = io.address();
                        let accept_loop = async move {
                            loop {
                                match listener.accept().await {
                                    Ok((stream, remote)) => {
                                        let _ = stream.set_nodelay(true);
                                        me.do_send(Input(NetInput::Accepted(stream, remote)));
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "accept failed");
                                        tokio::time::sleep(Duration::from_millis(100)).await;
                                    }
                                }
                            }
                        };
                        self.listener = Some(io.spawn_task(accept_loop));
                        tracing::info!(listen = %self.bound.map(|a| a.to_string()).unwrap_or_default(), "listening for peers");
                        io.send(Event::Bound { now: io.now() });
                    }
                    Err(e) => io.send(Event::BindFailed(format!("{}: {e}", self.settings.listen))),
                }
            }
            Action::ReportBindFailure => {
                tracing::error!(
                    reason = machine.bind_failure.as_deref().unwrap_or(""),
                    "cannot listen; retrying"
                );
            }
            Action::DialDue => {
                for peer in machine.to_dial.clone() {
                    if self.active.contains_key(&peer) {
                        // Connected before it was a friend (an open-policy customer, or the
                        // other end added us first): it counts as up now.
                        if let Some(sinks) = &self.sinks {
                            (sinks.presence)(peer, true);
                        }
                        io.send(Event::PeerUp { peer });
                        continue;
                    }
                    let contacts = self
                        .book
                        .get(&peer)
                        .map(|e| e.identity.contacts().to_vec())
                        .unwrap_or_default();
                    if contacts.is_empty() {
                        io.send(Event::PeerDown {
                            peer,
                            now: io.now(),
                            jitter: Self::jitter(),
                        });
                        continue;
                    }
                    self.start_session(Some(Target { peer, contacts }), None, io);
                }
            }
            Action::CloseAll => {
                if let Some(handle) = self.listener.take() {
                    io.cancel(handle);
                }
                for session in self.sessions.values() {
                    session.addr.do_send(Shutdown);
                }
            }
            Action::NotePeer | Action::NotePeerUp | Action::NotePeerDown | Action::ForgetPeer => {}
        }
    }

    fn input(
        &mut self,
        input: NetInput,
        _machine: &NetworkConnector,
        io: &mut Io<'_, Self>,
    ) -> Vec<Event> {
        match input {
            NetInput::Accepted(stream, remote) => {
                if self.pending_inbound() >= MAX_PENDING_INBOUND {
                    self.count("TooManyConnections");
                    tracing::warn!(remote = %remote, "too many connections handshaking; dropping one");
                    return vec![];
                }
                self.start_session(None, Some(stream), io);
                vec![]
            }
            NetInput::SessionUp {
                session,
                identity,
                outbound,
                addr,
                link,
                remote,
                sent_revision,
            } => {
                let peer = identity.node_id();
                // Re-signed while this session was handshaking: the peer has an older card.
                let current = self.shared.identity.borrow().clone();
                if let Some(current) = current.filter(|c| c.revision() > sent_revision) {
                    let push = link.clone();
                    let body = Body::Identity(IdentityExchange {
                        identity: Some(current.signed().clone()),
                    });
                    actix::spawn(async move {
                        let _ = push.send(body).await;
                    });
                }
                if let Some(entry) = self.sessions.get_mut(&session) {
                    entry.peer = Some(peer);
                    entry.link = Some(link);
                    entry.remote = remote;
                    entry.up_since = Some(Instant::now());
                }
                if peer == self.my_id {
                    addr.do_send(Fire(SessionEvent::Superseded));
                    return vec![];
                }
                let known = self.book.contains_key(&peer);
                // A newer revision learned in the handshake is kept, and saved.
                self.adopt_newer(&identity);
                match self.active.get(&peer).copied() {
                    Some(old) if old != session => {
                        // Two sessions opened at about the same time from both ends: both ends
                        // keep the one opened by the node with the smaller id. An older session
                        // (a peer that restarted or moved, whose old connection may be dead)
                        // gives way to the new one.
                        let old_age = self
                            .sessions
                            .get(&old)
                            .and_then(|e| e.up_since)
                            .map(|t| t.elapsed());
                        let simultaneous = old_age.is_none_or(|age| age < DUPLICATE_WINDOW);
                        let keep_new = !simultaneous || outbound == (self.my_id < peer);
                        let loser = if keep_new { old } else { session };
                        if keep_new {
                            self.active.insert(peer, session);
                        }
                        if let Some(entry) = self.sessions.get(&loser) {
                            entry.addr.do_send(Fire(SessionEvent::Superseded));
                        }
                        vec![]
                    }
                    Some(_) => vec![],
                    None => {
                        self.active.insert(peer, session);
                        if !known {
                            return vec![];
                        }
                        if let Some(sinks) = &self.sinks {
                            (sinks.presence)(peer, true);
                        }
                        vec![Event::PeerUp { peer }]
                    }
                }
            }
            NetInput::SessionDown {
                session,
                peer,
                dialed,
                reason,
            } => {
                self.count(reason.name());
                let entry = self.sessions.remove(&session);
                if let (Some(entry), Some(p)) = (&entry, peer)
                    && let (Some(book), Some(link)) = (self.book.get_mut(&p), &entry.link)
                {
                    book.bytes_in += link.stats.bytes_in.load(Ordering::Relaxed);
                    book.bytes_out += link.stats.bytes_out.load(Ordering::Relaxed);
                    book.last_seen = book
                        .last_seen
                        .max(link.stats.last_seen.load(Ordering::Relaxed));
                }
                let subject = peer.or(dialed);
                match subject {
                    Some(p) if self.active.get(&p) == Some(&session) => {
                        self.active.remove(&p);
                        if self.book.contains_key(&p) {
                            if let Some(sinks) = &self.sinks {
                                (sinks.presence)(p, false);
                            }
                            return vec![Event::PeerDown {
                                peer: p,
                                now: io.now(),
                                jitter: Self::jitter(),
                            }];
                        }
                        vec![]
                    }
                    Some(p)
                        if dialed == Some(p) && !self.active.contains_key(&p) && peer.is_none() =>
                    {
                        vec![Event::PeerDown {
                            peer: p,
                            now: io.now(),
                            jitter: Self::jitter(),
                        }]
                    }
                    _ => vec![],
                }
            }
            NetInput::PeerIdentity(identity) => {
                let peer = identity.node_id();
                if self.adopt_newer(&identity) {
                    return vec![];
                }
                match self.book.get(&peer) {
                    // The same revision again is normal (a handshake and a push crossing); older is stale.
                    Some(entry) if identity.revision() < entry.identity.revision() => {
                        self.count("StaleIdentity")
                    }
                    Some(_) => {}
                    None => {}
                }
                vec![]
            }
            NetInput::ForgedIdentity(peer) => {
                tracing::warn!(peer = %peer, "ignoring an identity push that does not verify");
                self.count("ForgedIdentity");
                vec![]
            }
            NetInput::Request {
                peer,
                envelope,
                link,
                permit,
            } => {
                let trusted = self.book.contains_key(&peer);
                if let Some(sinks) = &self.sinks {
                    match &envelope.body {
                        Some(Body::ServiceCancel(c)) if c.from_supplier => {
                            (sinks.supplier_left)(peer);
                            let id = envelope.request_id;
                            actix::spawn(async move {
                                let ack = Body::Ack(crate::proto::Ack {
                                    size: 0,
                                    hash: vec![],
                                });
                                let _ = link.reply(id, ack).await;
                                drop(permit);
                            });
                            return vec![];
                        }
                        Some(
                            Body::ServiceRequest(_)
                            | Body::ServiceCancel(_)
                            | Body::StoreFragment(_)
                            | Body::RetrieveFragment(_)
                            | Body::ListFragments(_)
                            | Body::DeleteFragment(_),
                        ) => {
                            (sinks.supplier)(ServiceCall {
                                customer: peer,
                                trusted,
                                envelope,
                                link,
                                permit,
                            });
                            return vec![];
                        }
                        _ => {}
                    }
                }
                // Nothing here serves it: say so instead of leaving the peer waiting.
                {
                    let fail = Body::Fail(Fail {
                        reason: FailReason::NoService as i32,
                        detail: "no such service on this node".into(),
                    });
                    let id = envelope.request_id;
                    actix::spawn(async move {
                        let _ = link.reply(id, fail).await;
                        drop(permit);
                    });
                }
                vec![]
            }
            NetInput::AddPeer {
                identity,
                label,
                reply,
            } => {
                let peer = identity.node_id();
                if peer == self.my_id {
                    let _ = reply.send(Err("that is this node's own card".into()));
                    return vec![];
                }
                if let Err(e) = peers::save(self.store.as_ref(), &identity, label.as_deref()) {
                    let _ = reply.send(Err(format!("cannot save the peer: {e}")));
                    return vec![];
                }
                let new = self.learn(*identity, label);
                self.publish_policy();
                tracing::info!(peer = %peer, new, "peer added");
                let _ = reply.send(Ok(new));
                vec![Event::PeerAdded {
                    peer,
                    now: io.now(),
                }]
            }
            NetInput::OwnIdentity(identity) => {
                for link in self
                    .active
                    .values()
                    .filter_map(|s| self.sessions.get(s))
                    .filter_map(|s| s.link.clone())
                {
                    let body = Body::Identity(IdentityExchange {
                        identity: Some(identity.signed().clone()),
                    });
                    actix::spawn(async move {
                        let _ = link.send(body).await;
                    });
                }
                vec![]
            }
            NetInput::Status(reply) => {
                let _ = reply.send(self.status());
                vec![]
            }
            NetInput::Ping { peer, reply } => {
                let Some(link) = self.link_of(&peer) else {
                    let _ = reply.send(Err(format!("no session with {peer}")));
                    return vec![];
                };
                let timeout = self.settings.request_timeout;
                actix::spawn(async move {
                    let started = Instant::now();
                    let result = link
                        .request(
                            Body::Ping(Ping {
                                nonce: rand::random(),
                            }),
                            timeout,
                        )
                        .await
                        .map(|_| started.elapsed())
                        .map_err(|e| e.to_string());
                    let _ = reply.send(result);
                });
                vec![]
            }
            NetInput::Link { peer, reply } => {
                let _ = reply.send(self.link_of(&peer));
                vec![]
            }
            NetInput::RemovePeer { peer, reply } => {
                if !self.book.contains_key(&peer) {
                    let _ = reply.send(Err(format!("{peer} is not a peer of this node")));
                    return vec![];
                }
                if let Err(e) = peers::remove(self.store.as_ref(), &peer) {
                    let _ = reply.send(Err(format!("cannot remove the peer: {e}")));
                    return vec![];
                }
                self.book.remove(&peer);
                self.publish_policy();
                if self.active.remove(&peer).is_some()
                    && let Some(sinks) = &self.sinks
                {
                    (sinks.presence)(peer, false);
                }
                for session in self
                    .sessions
                    .values()
                    .filter(|s| s.peer == Some(peer) || s.dialed == Some(peer))
                {
                    session.addr.do_send(Shutdown);
                }
                tracing::info!(peer = %peer, "peer removed");
                let _ = reply.send(Ok(()));
                vec![Event::PeerRemoved { peer }]
            }
            NetInput::SetOpen(open) => {
                self.policy.send_modify(|p| p.open = open);
                if !open {
                    // Strangers let in by the open policy are not welcome any more.
                    for session in self.sessions.values() {
                        if session.peer.is_some_and(|p| !self.book.contains_key(&p)) {
                            session.addr.do_send(Shutdown);
                        }
                    }
                }
                vec![]
            }
            NetInput::SetSinks(sinks) => {
                for peer in self.active.keys().filter(|p| self.book.contains_key(p)) {
                    (sinks.presence)(*peer, true);
                }
                self.sinks = Some(sinks);
                vec![]
            }
        }
    }
}
