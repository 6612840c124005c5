//! The network_connector actor's IO: the listening socket, one session actor per connection,
//! the book of trusted peers (persisted), identity propagation, request routing, counters and
//! status. Which session survives, when a friend is up or down and when to redial are decided
//! by the machine (`fsm::network_connector`); this driver only carries them out.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::prelude::*;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::peer_session::{PeerSessionDriver, SessionShared, Target};
use super::registry::Registry;
use super::router::{Routed, Router};
use super::shell::{Deliver, Driver, Io, Shell, Shutdown};
use super::status::{NetworkStatus, PeerStatus};
use crate::crypto::identity::{Identity, NodeId};
use crate::fsm::Label;
use crate::fsm::network_connector::{Event, NetworkConnector, Output};
use crate::fsm::peer_session::{CloseReason, Event as SessionEvent, PeerSession};
use crate::net::admission::{Admission, Limits};
use crate::net::link::{InFlight, LinkHandle, NewestKey, TrustPolicy};
use crate::proto::envelope::Body;
use crate::proto::{Envelope, IdentityExchange};
use crate::store::writer::Pending;
use crate::store::{KvStore, Writer, WriterError, peers};

/// Presence notices waiting to be forwarded (two per friend going down and up again).
const PRESENCE_QUEUE: usize = 1024;

/// How far ahead of this node's clock a friend's identity timestamp may be (clocks differ).
const MAX_CLOCK_AHEAD: u64 = 24 * 3600;

/// At most one warning about forged identity pushes per this interval (the rest are counted).
const WARN_INTERVAL: Duration = Duration::from_secs(10);

pub enum NetInput {
    Accepted(TcpStream, SocketAddr),
    SessionUp {
        session: u64,
        identity: Box<Identity>,
        outbound: bool,
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
    OwnIdentity(Box<Identity>),
    /// Whether any authenticated node may connect (supplier `accept = "open"`), on SIGHUP.
    SetOpen(bool),
}

/// Questions to the network actor.
pub enum NetQuery {
    Status,
    /// The link to a peer, if a session is established (for other actors' requests).
    Link(NodeId),
    /// Trust a friend (saved first); the answer says whether it is new.
    AddPeer {
        identity: Box<Identity>,
        label: Option<String>,
    },
    /// Stop trusting a friend: forget it, close its sessions.
    RemovePeer(NodeId),
}

pub enum NetAnswer {
    Status(NetworkStatus),
    Link(Option<LinkHandle>),
    /// Whether the friend is new, and the write that makes it durable.
    Added(Result<(bool, Pending), PeerBookError>),
    /// The write that forgets the friend.
    Removed(Result<Pending, PeerBookError>),
}

#[derive(Debug, thiserror::Error)]
pub enum PeerBookError {
    #[error("that is this node's own card")]
    OwnCard,
    #[error("{0} is not a peer of this node")]
    NotAPeer(NodeId),
    #[error("cannot save the peer book: {0}")]
    Store(#[from] WriterError),
}

/// A friend reachable (true) or not (false): news for the customer side.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct Presence {
    pub peer: NodeId,
    pub up: bool,
}

struct BookEntry {
    identity: Identity,
    label: Option<String>,
    /// Traffic of the peer's closed sessions.
    traffic: Traffic,
}

/// What a link carried: bytes and messages each way, and when the peer was last heard.
#[derive(Clone, Copy, Default)]
struct Traffic {
    bytes_in: u64,
    bytes_out: u64,
    messages_in: u64,
    messages_out: u64,
    /// Pongs and other control messages dropped because the link's control queue was full.
    control_dropped: u64,
    last_seen: u64,
}

impl Traffic {
    fn of(link: &LinkHandle) -> Traffic {
        let s = &link.stats;
        Traffic {
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
            messages_in: s.messages_in.load(Ordering::Relaxed),
            messages_out: s.messages_out.load(Ordering::Relaxed),
            control_dropped: s.control_dropped.load(Ordering::Relaxed),
            last_seen: s.last_seen.load(Ordering::Relaxed),
        }
    }

    fn plus(self, other: Traffic) -> Traffic {
        Traffic {
            bytes_in: self.bytes_in + other.bytes_in,
            bytes_out: self.bytes_out + other.bytes_out,
            messages_in: self.messages_in + other.messages_in,
            messages_out: self.messages_out + other.messages_out,
            control_dropped: self.control_dropped + other.control_dropped,
            last_seen: self.last_seen.max(other.last_seen),
        }
    }
}

struct SessionEntry {
    addr: Addr<Shell<PeerSessionDriver>>,
    peer: Option<NodeId>,
    dialed: Option<NodeId>,
    link: Option<LinkHandle>,
    remote: Option<SocketAddr>,
    /// The Noise static key the peer proved in this session's handshake.
    noise_key: Option<[u8; 32]>,
}

pub struct NetworkSettings {
    pub listen: SocketAddr,
    pub keepalive: Duration,
    pub dead_after: Duration,
    /// Limits on inbound connections that have not authenticated yet.
    pub admission: Limits,
}

/// Where the network's news goes, fixed before the actor starts.
pub struct NetworkWiring {
    pub router: Router,
    /// Told when a friend goes up or down, in order.
    pub presence: Vec<Recipient<Presence>>,
}

pub struct NetworkConnectorDriver {
    settings: NetworkSettings,
    shared: Arc<SessionShared>,
    /// Peer book writes go through the writer thread: never a synced write on this loop.
    writer: Writer,
    registry: Registry,
    policy: watch::Sender<TrustPolicy>,
    wiring: NetworkWiring,
    book: BTreeMap<NodeId, BookEntry>,
    sessions: HashMap<u64, SessionEntry>,
    next_session: u64,
    counters: BTreeMap<String, u64>,
    listener: Option<actix::SpawnHandle>,
    bound: Option<SocketAddr>,
    /// Presence notices, forwarded in order by one task.
    presence: tokio::sync::mpsc::Sender<Presence>,
    /// Who may hold a pre-handshake slot (per address, room kept for friends).
    admission: Admission,
    /// When the last warning about forged pushes was logged (the shell's clock).
    last_forged_warning: Option<Duration>,
}

/// Loads the persisted peer book (a database that cannot be read counts as an empty book).
pub fn load_peers(store: &dyn KvStore) -> Vec<(Identity, Option<String>)> {
    peers::load(store).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read the peer book");
        Vec::new()
    })
}

impl NetworkConnectorDriver {
    pub fn new(
        settings: NetworkSettings,
        shared: Arc<SessionShared>,
        writer: Writer,
        registry: Registry,
        policy: watch::Sender<TrustPolicy>,
        wiring: NetworkWiring,
        peers: Vec<(Identity, Option<String>)>,
    ) -> Self {
        // One task forwards presence in order, waiting for room in each recipient's mailbox.
        let (presence, mut queue) = tokio::sync::mpsc::channel::<Presence>(PRESENCE_QUEUE);
        let recipients = wiring.presence.clone();
        actix::spawn(async move {
            while let Some(notice) = queue.recv().await {
                for to in &recipients {
                    let _ = to.send(notice).await;
                }
            }
        });
        let admission = Admission::new(settings.admission);
        let mut driver = NetworkConnectorDriver {
            admission,
            settings,
            shared,
            writer,
            registry,
            policy,
            wiring,
            book: BTreeMap::new(),
            sessions: HashMap::new(),
            next_session: 1,
            counters: BTreeMap::new(),
            listener: None,
            bound: None,
            presence,
            last_forged_warning: None,
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

    /// Replaces a friend's identity with a newer revision signed by the same key, and saves it.
    /// False when `identity` is not a newer revision of a friend, or its timestamp is not
    /// believable (more than a day ahead of this node's clock, or before the revision it
    /// replaces: a replayed or forward-dated document).
    fn adopt_newer(&mut self, identity: &Identity, now: u64) -> bool {
        let peer = identity.node_id();
        let Some(entry) = self
            .book
            .get(&peer)
            .filter(|e| e.identity.is_superseded_by(identity))
        else {
            return false;
        };
        if identity.timestamp() > now.saturating_add(MAX_CLOCK_AHEAD)
            || identity.timestamp() < entry.identity.timestamp()
        {
            tracing::warn!(peer = %peer, revision = identity.revision(), timestamp = identity.timestamp(),
                "ignoring a newer identity revision with an unbelievable timestamp");
            self.count("BadIdentityTimestamp");
            return false;
        }
        tracing::info!(peer = %peer, revision = identity.revision(), contacts = ?identity.contacts(),
            "peer identity updated");
        let batch = peers::save_batch(identity, entry.label.as_deref(), now);
        super::persist(
            &self.writer,
            batch,
            "cannot persist the peer's new identity",
        );
        self.learn(identity.clone(), None);
        self.publish_policy();
        self.close_retired(identity);
        true
    }

    /// Closes the sessions with `identity`'s node that were authenticated with a Noise key its
    /// new revision retired (PROTOCOL.md §5): "only the newest revision logs in" holds for live
    /// sessions too, not only for the next handshake. The peer redials with its current key.
    fn close_retired(&mut self, identity: &Identity) {
        let peer = identity.node_id();
        let mut closed = 0u64;
        for entry in self.sessions.values() {
            if entry.peer == Some(peer)
                && entry.noise_key.is_some_and(|k| k != *identity.noise_key())
            {
                Self::shut_session(entry);
                closed += 1;
            }
        }
        if closed > 0 {
            tracing::info!(peer = %peer, sessions = closed, revision = identity.revision(),
                "closed sessions on a Noise key the peer's new identity retired");
            for _ in 0..closed {
                self.count("RetiredKeySession");
            }
        }
    }

    /// Adds or updates a book entry; a newer revision of a known peer replaces the old one.
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
                        traffic: Traffic::default(),
                    },
                );
                true
            }
        }
    }

    fn publish_policy(&mut self) {
        self.admission.set_friend_contacts(
            self.book
                .values()
                .flat_map(|e| e.identity.contacts().iter().map(String::as_str)),
        );
        let open = self.policy.borrow().open;
        // Only the newest known revision's Noise key logs in as a friend.
        self.policy.send_replace(TrustPolicy {
            trusted: self
                .book
                .iter()
                .map(|(id, e)| (*id, NewestKey::of(&e.identity)))
                .collect(),
            open,
        });
    }

    fn count(&mut self, key: &str) {
        *self.counters.entry(key.to_string()).or_default() += 1;
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
        let network = io.address().recipient();
        let driver = PeerSessionDriver::new(id, target, stream, self.shared.clone(), network);
        // An inbound connection has to authenticate within the (shorter) pre-auth deadline.
        let handshake_timeout = if outbound {
            self.shared.handshake_timeout
        } else {
            self.shared
                .handshake_timeout
                .min(self.settings.admission.preauth_timeout)
        };
        let machine = PeerSession {
            connect_timeout: self.shared.connect_timeout,
            handshake_timeout,
            keepalive: self.settings.keepalive,
            dead_after: self.settings.dead_after,
            ..PeerSession::default()
        };
        let addr = Shell::new(machine, format!("s{id}"), driver, self.registry.clone()).start();
        // A fresh mailbox: this first event always fits.
        let _ = addr.try_send(Deliver(if outbound {
            SessionEvent::Dial
        } else {
            SessionEvent::Accept
        }));
        self.sessions.insert(
            id,
            SessionEntry {
                addr,
                peer: None,
                dialed,
                link: None,
                remote: None,
                noise_key: None,
            },
        );
    }

    fn close_session(&self, session: u64) {
        if let Some(entry) = self.sessions.get(&session) {
            let addr = entry.addr.clone();
            actix::spawn(async move {
                let _ = addr.send(Deliver(SessionEvent::Superseded)).await;
            });
        }
    }

    fn shut_session(entry: &SessionEntry) {
        let addr = entry.addr.clone();
        actix::spawn(async move {
            let _ = addr.send(Shutdown).await;
        });
    }

    fn link_of(&self, machine: &NetworkConnector, peer: &NodeId) -> Option<LinkHandle> {
        machine
            .sessions
            .active
            .get(peer)
            .and_then(|s| self.sessions.get(s))
            .and_then(|s| s.link.clone())
    }

    fn tell_presence(&mut self, notice: Presence) {
        if self.presence.try_send(notice).is_err() {
            self.count("DroppedPresence");
            tracing::error!(peer = %notice.peer, up = notice.up, "presence notice dropped: the customer side is not keeping up");
        }
    }

    fn push_identity(link: LinkHandle, identity: &Identity) {
        let body = Body::Identity(IdentityExchange {
            identity: Some(identity.signed().clone()),
            features: crate::net::link::FEATURES,
        });
        actix::spawn(async move {
            let _ = link.send(body).await;
        });
    }

    fn status(&self, machine: &NetworkConnector) -> NetworkStatus {
        let peers = self
            .book
            .iter()
            .map(|(id, entry)| {
                let session = machine
                    .sessions
                    .active
                    .get(id)
                    .map(|s| (*s, self.sessions.get(s)))
                    .or_else(|| {
                        self.sessions
                            .iter()
                            .find(|(_, s)| s.dialed == Some(*id) || s.peer == Some(*id))
                            .map(|(sid, s)| (*sid, Some(s)))
                    });
                let state = session
                    .and_then(|(sid, _)| self.registry.state_of("peer_session", &format!("s{sid}")))
                    .unwrap_or("Disconnected");
                let traffic = match self.link_of(machine, id) {
                    Some(link) => entry.traffic.plus(Traffic::of(&link)),
                    None => entry.traffic,
                };
                PeerStatus {
                    node_id: id.to_string(),
                    name: entry
                        .label
                        .clone()
                        .unwrap_or_else(|| entry.identity.name().to_string()),
                    address: entry.identity.contacts().first().cloned(),
                    remote: session
                        .and_then(|(_, s)| s.and_then(|s| s.remote))
                        .map(|r| r.to_string()),
                    revision: entry.identity.revision(),
                    session: state.to_string(),
                    last_seen: (traffic.last_seen > 0).then_some(traffic.last_seen),
                    bytes_in: traffic.bytes_in,
                    bytes_out: traffic.bytes_out,
                    messages_in: traffic.messages_in,
                    messages_out: traffic.messages_out,
                    control_dropped: traffic.control_dropped,
                    budget_held: self.shared.budgets.held(id) as u64,
                }
            })
            .collect();
        let mut counters = self.counters.clone();
        let dropped = self.shared.dropped_notices.load(Ordering::Relaxed);
        if dropped > 0 {
            counters.insert("DroppedNotices".into(), dropped);
        }
        NetworkStatus {
            listen: self.bound.map(|a| a.to_string()),
            sessions: self.sessions.len(),
            peers,
            counters,
        }
    }

    fn bind(&mut self, io: &mut Io<'_, Self>) {
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
                                // Waits for room: a full mailbox slows accepting, not memory.
                                if me
                                    .send(super::shell::Input(NetInput::Accepted(stream, remote)))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
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
                io.send(Event::Bound);
            }
            Err(e) => io.send(Event::BindFailed(format!("{}: {e}", self.settings.listen))),
        }
    }
}

/// Starts the network actor: every friend in its book is added, then it binds and dials.
pub async fn start(
    driver: NetworkConnectorDriver,
    machine: NetworkConnector,
    registry: &Registry,
) -> Addr<Shell<NetworkConnectorDriver>> {
    let known = driver.known_peers();
    let addr = Shell::new(machine, "self", driver, registry.clone()).start();
    for peer in known {
        let _ = addr.send(Deliver(Event::PeerAdded(peer))).await;
    }
    let _ = addr.send(Deliver(Event::Start)).await;
    addr
}

impl Driver for NetworkConnectorDriver {
    type M = NetworkConnector;
    type Input = NetInput;
    type Query = NetQuery;
    type Answer = NetAnswer;

    fn perform(&mut self, output: Output, _machine: &NetworkConnector, io: &mut Io<'_, Self>) {
        match output {
            Output::Bind => self.bind(io),
            Output::BindFailed(reason) => {
                tracing::error!(reason = %reason, "cannot listen; retrying");
            }
            Output::Dial(peer) => {
                let contacts = self
                    .book
                    .get(&peer)
                    .map(|e| e.identity.contacts().to_vec())
                    .unwrap_or_default();
                if contacts.is_empty() {
                    io.send(Event::DialFailed(peer));
                } else {
                    self.start_session(Some(Target { peer, contacts }), None, io);
                }
            }
            Output::Close(session) => self.close_session(session),
            Output::CloseSessionsOf(peer) => {
                for session in self
                    .sessions
                    .values()
                    .filter(|s| s.peer == Some(peer) || s.dialed == Some(peer))
                {
                    Self::shut_session(session);
                }
            }
            Output::PeerUp(peer) => self.tell_presence(Presence { peer, up: true }),
            Output::PeerDown(peer) => self.tell_presence(Presence { peer, up: false }),
            Output::CloseAll => {
                if let Some(handle) = self.listener.take() {
                    io.cancel(handle);
                }
                for session in self.sessions.values() {
                    Self::shut_session(session);
                }
            }
        }
    }

    fn input(
        &mut self,
        input: NetInput,
        machine: &NetworkConnector,
        io: &mut Io<'_, Self>,
    ) -> Vec<Event> {
        match input {
            NetInput::Accepted(stream, remote) => {
                // The id start_session is about to give this connection.
                if let Err(refused) = self.admission.admit(self.next_session, remote.ip()) {
                    self.count(refused.name());
                    tracing::debug!(remote = %remote, reason = refused.name(), "connection refused before the handshake");
                    return vec![];
                }
                self.start_session(None, Some(stream), io);
                vec![]
            }
            NetInput::SessionUp {
                session,
                identity,
                outbound,
                link,
                remote,
                sent_revision,
            } => {
                let peer = identity.node_id();
                self.admission.release(session);
                if let Some(ip) = remote
                    .map(|r| r.ip())
                    .filter(|_| self.book.contains_key(&peer))
                {
                    self.admission.friend_seen_at(ip);
                }
                // Re-signed while this session was handshaking: the peer has an older card.
                let current = self.shared.identity.borrow().clone();
                if let Some(current) = current.filter(|c| c.revision() > sent_revision) {
                    Self::push_identity(link.clone(), &current);
                }
                if let Some(entry) = self.sessions.get_mut(&session) {
                    entry.peer = Some(peer);
                    entry.link = Some(link);
                    entry.remote = remote;
                    entry.noise_key = Some(*identity.noise_key());
                }
                // A newer revision learned in the handshake is kept, and saved.
                self.adopt_newer(&identity, io.unix_secs());
                vec![Event::SessionUp {
                    session,
                    peer,
                    outbound,
                }]
            }
            NetInput::SessionDown {
                session,
                peer,
                dialed,
                reason,
            } => {
                self.count(reason.name());
                self.admission.release(session);
                let entry = self.sessions.remove(&session);
                if let (Some(entry), Some(p)) = (&entry, peer)
                    && let (Some(book), Some(link)) = (self.book.get_mut(&p), &entry.link)
                {
                    book.traffic = book.traffic.plus(Traffic::of(link));
                }
                vec![Event::SessionDown {
                    session,
                    peer,
                    dialed,
                }]
            }
            NetInput::PeerIdentity(identity) => {
                let peer = identity.node_id();
                if self.adopt_newer(&identity, io.unix_secs()) {
                    return vec![];
                }
                // The same revision again is normal (a handshake and a push crossing); older is stale.
                if self
                    .book
                    .get(&peer)
                    .is_some_and(|e| identity.revision() < e.identity.revision())
                {
                    self.count("StaleIdentity");
                }
                vec![]
            }
            NetInput::ForgedIdentity(peer) => {
                self.count("ForgedIdentity");
                let now = io.ctx().now;
                let quiet = self
                    .last_forged_warning
                    .is_some_and(|t| now.saturating_sub(t) < WARN_INTERVAL);
                if !quiet {
                    self.last_forged_warning = Some(now);
                    let total = self.counters.get("ForgedIdentity").copied().unwrap_or(0);
                    tracing::warn!(peer = %peer, total, "ignoring identity pushes that do not verify");
                }
                vec![]
            }
            NetInput::Request {
                peer,
                envelope,
                link,
                permit,
            } => {
                let known = self.book.get(&peer);
                let trusted = known.is_some();
                let signing_key = known.map(|e| *e.identity.signing_key());
                self.wiring.router.route(Routed {
                    from: peer,
                    trusted,
                    signing_key,
                    envelope,
                    link,
                    permit,
                });
                vec![]
            }
            NetInput::OwnIdentity(identity) => {
                for link in machine
                    .sessions
                    .active
                    .values()
                    .filter_map(|s| self.sessions.get(s))
                    .filter_map(|s| s.link.clone())
                {
                    Self::push_identity(link, &identity);
                }
                vec![]
            }
            NetInput::SetOpen(open) => {
                self.policy.send_modify(|p| p.open = open);
                if !open {
                    // Strangers let in by the open policy are not welcome any more.
                    for session in self.sessions.values() {
                        if session.peer.is_some_and(|p| !self.book.contains_key(&p)) {
                            Self::shut_session(session);
                        }
                    }
                }
                vec![]
            }
        }
    }

    fn query(
        &mut self,
        query: NetQuery,
        machine: &NetworkConnector,
        io: &mut Io<'_, Self>,
    ) -> NetAnswer {
        match query {
            NetQuery::Status => NetAnswer::Status(self.status(machine)),
            NetQuery::Link(peer) => NetAnswer::Link(self.link_of(machine, &peer)),
            NetQuery::AddPeer { identity, label } => {
                let peer = identity.node_id();
                if peer == machine.me {
                    return NetAnswer::Added(Err(PeerBookError::OwnCard));
                }
                let batch = peers::save_batch(&identity, label.as_deref(), io.unix_secs());
                let pending = match self.writer.submit(batch) {
                    Ok(pending) => pending,
                    Err(e) => return NetAnswer::Added(Err(e.into())),
                };
                let new = self.learn(*identity, label);
                self.publish_policy();
                tracing::info!(peer = %peer, new, "peer added");
                io.send(Event::PeerAdded(peer));
                NetAnswer::Added(Ok((new, pending)))
            }
            NetQuery::RemovePeer(peer) => {
                if !self.book.contains_key(&peer) {
                    return NetAnswer::Removed(Err(PeerBookError::NotAPeer(peer)));
                }
                let pending = match self.writer.submit(peers::remove_batch(&peer)) {
                    Ok(pending) => pending,
                    Err(e) => return NetAnswer::Removed(Err(e.into())),
                };
                self.book.remove(&peer);
                self.publish_policy();
                tracing::info!(peer = %peer, "peer removed");
                io.send(Event::PeerRemoved(peer));
                NetAnswer::Removed(Ok(pending))
            }
        }
    }
}

/// The session with `peer`, if there is one now (`None` too when the network actor is gone).
pub async fn link_to(
    network: &Addr<Shell<NetworkConnectorDriver>>,
    peer: NodeId,
) -> Option<crate::net::link::LinkHandle> {
    match network
        .send(super::shell::Query::new(NetQuery::Link(peer)))
        .await
    {
        Ok(NetAnswer::Link(link)) => link,
        _ => None,
    }
}
