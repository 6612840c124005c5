//! Deterministic simulation of several nodes' machines (STYLE.md, test tier 4): every node runs
//! network_connector and one peer_session per connection (dial, handshake, keep-alive pings,
//! backoff, the duplicate tie-break), fire_hire and supplier_connector as a customer, and the
//! supplier_service decision as a supplier. They are wired through an in-memory network with a
//! virtual clock and a seeded RNG that drops, delays and partitions messages. Same seed, same
//! run: a failing test prints its seed.
//!
//! What is abstracted: bytes and crypto (a handshake is one `Hello` each way, a session is
//! authenticated when it receives its peer's), and TCP (a close reaches the other end unless the
//! link is cut, when the other end finds out by missing pings). Later issues (backup, restore,
//! monitor, rebuild) add their machines and messages here.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::crypto::identity::NodeId;
use crate::fsm::fire_hire::{self, FireHire};
use crate::fsm::network_connector::{self as nc, NetworkConnector};
use crate::fsm::peer_session::{self as ps, PeerSession};
use crate::fsm::supplier_connector::{self as sc, RefuseReason, SupplierConnector};
use crate::fsm::supplier_service::{Refusal, decide};
use crate::fsm::timers::TimerTable;
use crate::fsm::{Instance, Machine, Stepped};

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Probability that a message is lost.
    pub loss: f64,
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub data_shards: usize,
    pub parity_shards: usize,
    pub space_per_supplier: u64,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            loss: 0.0,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(200),
            data_shards: 4,
            parity_shards: 2,
            space_per_supplier: 1 << 30,
        }
    }
}

#[derive(Clone, Debug)]
enum Msg {
    /// A TCP connection from session `dialer` of the sender.
    TcpOpen {
        dialer: u64,
    },
    /// The connection was accepted by session `accepted`.
    TcpAccepted {
        dialer: u64,
        accepted: u64,
    },
    Hello {
        to: u64,
    },
    Ping {
        to: u64,
    },
    Pong {
        to: u64,
    },
    Close {
        to: u64,
    },
    Request {
        position: u32,
        space: u64,
    },
    Accept {
        position: u32,
    },
    Refuse {
        position: u32,
        reason: Refusal,
    },
    Cancel {
        position: u32,
    },
    CancelAck {
        position: u32,
    },
}

#[derive(Clone, Debug)]
enum Pending {
    Msg { from: usize, to: usize, msg: Msg },
}

/// Which machine on a node a timer belongs to.
#[derive(Clone, Copy, Debug)]
enum Target {
    Hire,
    Net,
    Connector(u32),
    Session(u64),
}

/// A machine with its timers.
struct Run<M: Machine> {
    instance: Instance<M>,
    timers: TimerTable<M>,
}

impl<M: Machine> Run<M> {
    fn new(machine: M, id: String, now: Duration) -> Self {
        let instance = Instance::new(machine, id);
        let mut timers = TimerTable::default();
        timers.enter(&instance.machine, instance.state(), now);
        Run { instance, timers }
    }

    fn step(&mut self, event: &M::Event, now: Duration) -> Option<Stepped<M>> {
        let stepped = self.instance.step(event)?;
        self.timers
            .after_step(&self.instance.machine, &stepped, now);
        if self.instance.is_terminal() {
            self.timers.clear();
        }
        Some(stepped)
    }
}

struct Session {
    peer: usize,
    outbound: bool,
    remote: Option<u64>,
    established: bool,
    run: Run<PeerSession>,
}

struct Connector {
    supplier: usize,
    run: Run<SupplierConnector>,
}

/// The supplier side of one node: who it trusts and what it granted.
#[derive(Default)]
pub struct ServiceModel {
    pub donated: u64,
    pub trusted: BTreeSet<usize>,
    pub open: bool,
    /// customer -> quota
    pub granted: BTreeMap<usize, u64>,
}

pub struct SimNode {
    pub id: NodeId,
    hire: Option<Run<FireHire>>,
    connectors: BTreeMap<u32, Connector>,
    pub service: ServiceModel,
    /// Peers this node currently sees up (an established session).
    pub sees_up: BTreeSet<usize>,
    net: Option<Run<NetworkConnector>>,
    sessions: BTreeMap<u64, Session>,
    active: BTreeMap<usize, u64>,
    /// Positions persisted by fire_hire's `Save` (what a restart resumes).
    pub saved: Vec<(u32, usize)>,
}

pub struct Sim {
    pub now: Duration,
    pub cfg: SimConfig,
    rng: StdRng,
    pub nodes: Vec<SimNode>,
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    pending: BTreeMap<usize, Pending>,
    seq: u64,
    cut: BTreeSet<(usize, usize)>,
    /// Messages delivered and dropped, for assertions on the run itself.
    pub delivered: u64,
    pub dropped: u64,
    next_session: u64,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    /// `n` nodes; each trusts every other, donates `donated[i]`.
    pub fn new(cfg: SimConfig, donated: &[u64]) -> Sim {
        let nodes = donated
            .iter()
            .enumerate()
            .map(|(i, &d)| SimNode {
                id: NodeId::from_signing_key(&[(i as u8).wrapping_add(1); 32]),
                hire: None,
                connectors: BTreeMap::new(),
                service: ServiceModel {
                    donated: d,
                    trusted: (0..donated.len()).filter(|&j| j != i).collect(),
                    open: false,
                    granted: BTreeMap::new(),
                },
                sees_up: BTreeSet::new(),
                net: None,
                sessions: BTreeMap::new(),
                active: BTreeMap::new(),
                saved: Vec::new(),
            })
            .collect();
        let mut sim = Sim {
            now: Duration::ZERO,
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            nodes,
            queue: BinaryHeap::new(),
            pending: BTreeMap::new(),
            seq: 0,
            cut: BTreeSet::new(),
            delivered: 0,
            dropped: 0,
            next_session: 1,
        };
        for i in 0..sim.nodes.len() {
            sim.start_network(i);
        }
        sim
    }

    /// Starts network_connector on `node`, knowing every other node as a peer.
    fn start_network(&mut self, node: usize) {
        let mut run = Run::new(NetworkConnector::default(), format!("n{node}"), self.now);
        for peer in 0..self.nodes.len() {
            if peer != node {
                let id = self.nodes[peer].id;
                run.step(
                    &nc::Event::PeerAdded {
                        peer: id,
                        now: self.now,
                    },
                    self.now,
                );
            }
        }
        self.nodes[node].net = Some(run);
        self.network(node, nc::Event::Start);
    }

    fn network(&mut self, node: usize, event: nc::Event) {
        let now = self.now;
        let Some(run) = self.nodes[node].net.as_mut() else {
            return;
        };
        let Some(stepped) = run.step(&event, now) else {
            return;
        };
        let machine = run.instance.machine.clone();
        for &action in stepped.actions {
            match action {
                nc::Action::Bind => self.network(node, nc::Event::Bound { now }),
                nc::Action::DialDue => {
                    for id in machine.to_dial.clone() {
                        if let Some(peer) = self.index_of(id) {
                            self.open_session(node, peer, None);
                        }
                    }
                }
                nc::Action::CloseAll => {
                    let sids: Vec<u64> = self.nodes[node].sessions.keys().copied().collect();
                    for sid in sids {
                        self.session(node, sid, ps::Event::Shutdown);
                    }
                }
                nc::Action::ReportBindFailure
                | nc::Action::ForgetPeer
                | nc::Action::NotePeer
                | nc::Action::NotePeerUp
                | nc::Action::NotePeerDown => {}
            }
        }
    }

    /// A new session on `node` with `peer`: outbound (dial) when `remote` is None.
    fn open_session(&mut self, node: usize, peer: usize, remote: Option<u64>) -> u64 {
        let sid = self.next_session;
        self.next_session += 1;
        let outbound = remote.is_none();
        let run = Run::new(PeerSession::default(), format!("n{node}s{sid}"), self.now);
        self.nodes[node].sessions.insert(
            sid,
            Session {
                peer,
                outbound,
                remote,
                established: false,
                run,
            },
        );
        self.session(
            node,
            sid,
            if outbound {
                ps::Event::Dial
            } else {
                ps::Event::Accept
            },
        );
        sid
    }

    fn session(&mut self, node: usize, sid: u64, event: ps::Event) {
        let now = self.now;
        let Some(session) = self.nodes[node].sessions.get_mut(&sid) else {
            return;
        };
        let (peer, remote) = (session.peer, session.remote);
        let Some(stepped) = session.run.step(&event, now) else {
            return;
        };
        for &action in stepped.actions {
            match action {
                ps::Action::OpenTcp => self.send(node, peer, Msg::TcpOpen { dialer: sid }),
                ps::Action::RunHandshake => {
                    if let Some(to) = remote
                        .or_else(|| self.nodes[node].sessions.get(&sid).and_then(|s| s.remote))
                    {
                        self.send(node, peer, Msg::Hello { to });
                    }
                }
                ps::Action::StartLink => self.session_up(node, sid),
                ps::Action::SendPing => {
                    if let Some(to) = remote {
                        self.send(node, peer, Msg::Ping { to });
                    }
                }
                ps::Action::ClearMissed => {}
                ps::Action::ReportClosed => {
                    if let Some(to) = remote {
                        self.send(node, peer, Msg::Close { to });
                    }
                    self.session_down(node, sid);
                }
            }
        }
    }

    /// An established session: keep it unless one with the same peer already is; then both
    /// ends keep the connection dialed by the node with the smaller index.
    fn session_up(&mut self, node: usize, sid: u64) {
        let Some(session) = self.nodes[node].sessions.get_mut(&sid) else {
            return;
        };
        session.established = true;
        let (peer, outbound) = (session.peer, session.outbound);
        match self.nodes[node].active.get(&peer).copied() {
            Some(old) => {
                let keep_new = outbound == (node < peer);
                let loser = if keep_new { old } else { sid };
                if keep_new {
                    self.nodes[node].active.insert(peer, sid);
                }
                self.session(node, loser, ps::Event::Superseded);
            }
            None => {
                self.nodes[node].active.insert(peer, sid);
                let id = self.nodes[peer].id;
                self.network(node, nc::Event::PeerUp { peer: id });
                self.presence(node, peer, true);
            }
        }
    }

    fn session_down(&mut self, node: usize, sid: u64) {
        let Some(session) = self.nodes[node].sessions.remove(&sid) else {
            return;
        };
        let peer = session.peer;
        let id = self.nodes[peer].id;
        let now = self.now;
        if self.nodes[node].active.get(&peer) == Some(&sid) {
            self.nodes[node].active.remove(&peer);
            self.presence(node, peer, false);
            let jitter = self.rng.gen_range(0..=1000);
            self.network(
                node,
                nc::Event::PeerDown {
                    peer: id,
                    now,
                    jitter,
                },
            );
        } else if session.outbound
            && !session.established
            && !self.nodes[node].active.contains_key(&peer)
        {
            let jitter = self.rng.gen_range(0..=1000);
            self.network(
                node,
                nc::Event::PeerDown {
                    peer: id,
                    now,
                    jitter,
                },
            );
        }
    }

    fn index_of(&self, id: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    fn schedule(&mut self, at: Duration, p: Pending) {
        self.seq += 1;
        let key = self.seq as usize;
        self.pending.insert(key, p);
        self.queue.push(Reverse((at, self.seq, key)));
    }

    /// Sends `msg` with a random delay. A cut link loses everything. Random loss hits connection
    /// attempts and protocol requests and replies (as a connection reset would lose what was in
    /// flight), not a live session's own framing: TCP does not drop single messages silently.
    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        let lossy = !matches!(
            msg,
            Msg::TcpAccepted { .. }
                | Msg::Hello { .. }
                | Msg::Ping { .. }
                | Msg::Pong { .. }
                | Msg::Close { .. }
        );
        if self.cut.contains(&pair(from, to))
            || (lossy && self.rng.gen_bool(self.cfg.loss.clamp(0.0, 1.0)))
        {
            self.dropped += 1;
            return;
        }
        let spread = self
            .cfg
            .max_delay
            .saturating_sub(self.cfg.min_delay)
            .as_millis() as u64;
        let delay = self.cfg.min_delay + Duration::from_millis(self.rng.gen_range(0..=spread));
        self.schedule(self.now + delay, Pending::Msg { from, to, msg });
    }

    /// Starts fire_hire on `customer` (with the contracts it saved, as after a restart).
    pub fn start_customer(&mut self, customer: usize) {
        let positions = self.cfg.data_shards + self.cfg.parity_shards;
        let mut run = Run::new(FireHire::new(positions), format!("n{customer}"), self.now);
        let up: Vec<usize> = self.nodes[customer].sees_up.iter().copied().collect();
        for peer in up {
            let id = self.nodes[peer].id;
            let s = run.step(&fire_hire::Event::CandidateUp(id), self.now);
            debug_assert!(s.is_some());
        }
        self.nodes[customer].hire = Some(run);
        let resumed = self.nodes[customer]
            .saved
            .iter()
            .map(|&(p, s)| (p, self.nodes[s].id))
            .collect();
        self.fire_hire(
            customer,
            fire_hire::Event::Start {
                now: self.now,
                resumed,
            },
        );
    }

    /// Stops a customer's machines (as a process stop) keeping what they persisted.
    pub fn stop_customer(&mut self, customer: usize) {
        if let Some(run) = self.nodes[customer].hire.as_mut() {
            run.step(&fire_hire::Event::Shutdown, self.now);
        }
        self.nodes[customer].hire = None;
        self.nodes[customer].connectors.clear();
    }

    fn fire_hire(&mut self, node: usize, event: fire_hire::Event) {
        let now = self.now;
        let Some(run) = self.nodes[node].hire.as_mut() else {
            return;
        };
        let Some(stepped) = run.step(&event, now) else {
            return;
        };
        let machine = run.instance.machine.clone();
        for &action in stepped.actions {
            match action {
                fire_hire::Action::Note => {}
                fire_hire::Action::Resume => {
                    for (position, supplier) in machine.resumed.clone() {
                        if let Some(s) = self.index_of(supplier) {
                            self.start_connector(node, position, s, true);
                        }
                    }
                }
                fire_hire::Action::HireOne => {
                    if let Some((position, supplier)) = machine.pending
                        && let Some(s) = self.index_of(supplier)
                    {
                        self.start_connector(node, position, s, false);
                    }
                }
                fire_hire::Action::Dismiss => {
                    if let Some((position, supplier)) = machine.dismiss
                        && self.nodes[node]
                            .connectors
                            .get(&position)
                            .is_some_and(|c| self.nodes[c.supplier].id == supplier)
                    {
                        self.connector(node, position, sc::Event::Dismiss);
                    }
                }
                fire_hire::Action::Save => {
                    let saved = machine
                        .slots
                        .iter()
                        .enumerate()
                        .filter_map(|(p, h)| {
                            h.and_then(|h| Some((p as u32, self.index_of(h.supplier)?)))
                        })
                        .collect();
                    self.nodes[node].saved = saved;
                }
            }
        }
    }

    fn start_connector(&mut self, node: usize, position: u32, supplier: usize, resumed: bool) {
        // A dismissed connector still cancelling at this position is replaced: its cancel goes on
        // being answered by the supplier, but the position belongs to the new one.
        let mut machine = if resumed {
            SupplierConnector::resumed()
        } else {
            SupplierConnector::default()
        };
        machine.peer_up = self.nodes[node].sees_up.contains(&supplier);
        let run = Run::new(machine, format!("n{node}p{position}"), self.now);
        self.nodes[node]
            .connectors
            .insert(position, Connector { supplier, run });
        self.connector(node, position, sc::Event::Connect);
    }

    fn connector(&mut self, node: usize, position: u32, event: sc::Event) {
        let now = self.now;
        let Some(conn) = self.nodes[node].connectors.get_mut(&position) else {
            return;
        };
        let supplier = conn.supplier;
        let Some(stepped) = conn.run.step(&event, now) else {
            return;
        };
        let machine = conn.run.instance.machine.clone();
        let supplier_id = self.nodes[supplier].id;
        for &action in stepped.actions {
            match action {
                sc::Action::SendRequest => {
                    let space = self.cfg.space_per_supplier;
                    self.send(node, supplier, Msg::Request { position, space });
                }
                sc::Action::ReportConnected => {
                    self.fire_hire(
                        node,
                        fire_hire::Event::Hired {
                            position,
                            supplier: supplier_id,
                        },
                    );
                }
                sc::Action::ReportDisconnected | sc::Action::NotePresence => {}
                sc::Action::ReportRefused => {
                    let _ = machine.refuse_reason;
                    self.fire_hire(
                        node,
                        fire_hire::Event::Refused {
                            position,
                            supplier: supplier_id,
                            now,
                        },
                    );
                }
                sc::Action::SendCancel => self.send(node, supplier, Msg::Cancel { position }),
                sc::Action::ReportClosed => {
                    if self.nodes[node]
                        .connectors
                        .get(&position)
                        .is_some_and(|c| c.supplier == supplier)
                    {
                        self.nodes[node].connectors.remove(&position);
                    }
                }
            }
        }
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Msg) {
        self.delivered += 1;
        match msg {
            Msg::TcpOpen { dialer } => {
                let accepted = self.open_session(to, from, Some(dialer));
                self.send(to, from, Msg::TcpAccepted { dialer, accepted });
            }
            Msg::TcpAccepted { dialer, accepted } => {
                if let Some(s) = self.nodes[to].sessions.get_mut(&dialer) {
                    s.remote = Some(accepted);
                    self.session(to, dialer, ps::Event::TcpConnected);
                } else {
                    // The dialer gave up meanwhile: the connection it no longer wants closes.
                    self.send(to, from, Msg::Close { to: accepted });
                }
            }
            Msg::Hello { to: sid } => {
                let id = self.nodes[from].id;
                self.session(to, sid, ps::Event::Authenticated(id));
            }
            Msg::Ping { to: sid } => {
                if let Some(remote) = self.nodes[to]
                    .sessions
                    .get(&sid)
                    .filter(|s| s.established)
                    .and_then(|s| s.remote)
                {
                    self.send(to, from, Msg::Pong { to: remote });
                }
            }
            Msg::Pong { to: sid } => self.session(to, sid, ps::Event::Pong),
            Msg::Close { to: sid } => {
                self.session(to, sid, ps::Event::LinkFailed(ps::CloseReason::PeerClosed))
            }
            Msg::Request { position, space } => {
                let service = &self.nodes[to].service;
                let current = service.granted.get(&from).copied().unwrap_or(0);
                let total: u64 = service.granted.values().sum();
                let answer = match decide(
                    service.trusted.contains(&from),
                    service.open,
                    space,
                    current,
                    total,
                    service.donated,
                ) {
                    Ok(quota) => {
                        self.nodes[to].service.granted.insert(from, quota);
                        Msg::Accept { position }
                    }
                    Err(reason) => Msg::Refuse { position, reason },
                };
                self.send(to, from, answer);
            }
            Msg::Cancel { position } => {
                self.nodes[to].service.granted.remove(&from);
                self.send(to, from, Msg::CancelAck { position });
            }
            Msg::Accept { position }
            | Msg::Refuse { position, .. }
            | Msg::CancelAck { position } => {
                // Only the connector that talks to this supplier hears its answer.
                if self.nodes[to]
                    .connectors
                    .get(&position)
                    .is_none_or(|c| c.supplier != from)
                {
                    return;
                }
                let event = match msg {
                    Msg::Accept { .. } => sc::Event::Accepted,
                    Msg::Refuse {
                        reason: Refusal::NoSpace,
                        ..
                    } => sc::Event::Refused(RefuseReason::NoSpace),
                    Msg::Refuse {
                        reason: Refusal::NotTrusted,
                        ..
                    } => sc::Event::Refused(RefuseReason::NotTrusted),
                    _ => sc::Event::CancelDone,
                };
                self.connector(to, position, event);
            }
        }
    }

    fn presence(&mut self, at: usize, peer: usize, up: bool) {
        let changed = if up {
            self.nodes[at].sees_up.insert(peer)
        } else {
            self.nodes[at].sees_up.remove(&peer)
        };
        if !changed {
            return;
        }
        let id = self.nodes[peer].id;
        self.fire_hire(
            at,
            if up {
                fire_hire::Event::CandidateUp(id)
            } else {
                fire_hire::Event::CandidateDown(id)
            },
        );
        let positions: Vec<u32> = self.nodes[at]
            .connectors
            .iter()
            .filter(|(_, c)| c.supplier == peer)
            .map(|(p, _)| *p)
            .collect();
        for position in positions {
            self.connector(
                at,
                position,
                if up {
                    sc::Event::PeerUp
                } else {
                    sc::Event::PeerDown
                },
            );
        }
    }

    /// Cuts the link between `a` and `b`: every message between them is lost until `heal`.
    /// Each end notices through its sessions' missed pings.
    pub fn partition(&mut self, a: usize, b: usize) {
        self.cut.insert(pair(a, b));
    }

    pub fn heal(&mut self, a: usize, b: usize) {
        self.cut.remove(&pair(a, b));
    }

    /// The monitor's entry point: fire the supplier at `position`.
    pub fn fire(&mut self, customer: usize, position: u32) {
        let now = self.now;
        self.fire_hire(customer, fire_hire::Event::Fire { position, now });
    }

    /// The earliest timer of any machine on any node.
    fn next_timer(&self) -> Option<(Duration, usize, Target)> {
        let mut best: Option<(Duration, usize, Target)> = None;
        let mut consider = |deadline: Option<Duration>, node: usize, target: Target| {
            if let Some(d) = deadline
                && best.is_none_or(|b| d < b.0)
            {
                best = Some((d, node, target));
            }
        };
        for (i, node) in self.nodes.iter().enumerate() {
            consider(
                node.hire.as_ref().and_then(|r| r.timers.next_deadline()),
                i,
                Target::Hire,
            );
            consider(
                node.net.as_ref().and_then(|r| r.timers.next_deadline()),
                i,
                Target::Net,
            );
            for (p, c) in &node.connectors {
                consider(c.run.timers.next_deadline(), i, Target::Connector(*p));
            }
            for (sid, session) in &node.sessions {
                consider(session.run.timers.next_deadline(), i, Target::Session(*sid));
            }
        }
        best
    }

    fn fire_timer(&mut self, node: usize, target: Target) {
        let now = self.now;
        fn pop<M: Machine + Clone>(run: &mut Run<M>, now: Duration) -> Option<M::Timer> {
            let machine = run.instance.machine.clone();
            run.timers.pop_expired(&machine, now)
        }
        let n = &mut self.nodes[node];
        match target {
            Target::Hire => {
                if let Some(t) = n.hire.as_mut().and_then(|r| pop(r, now)) {
                    self.fire_hire(node, FireHire::timer_event(t, now));
                }
            }
            Target::Net => {
                if let Some(t) = n.net.as_mut().and_then(|r| pop(r, now)) {
                    self.network(node, NetworkConnector::timer_event(t, now));
                }
            }
            Target::Connector(p) => {
                if let Some(t) = n.connectors.get_mut(&p).and_then(|c| pop(&mut c.run, now)) {
                    self.connector(node, p, SupplierConnector::timer_event(t, now));
                }
            }
            Target::Session(sid) => {
                if let Some(t) = n.sessions.get_mut(&sid).and_then(|c| pop(&mut c.run, now)) {
                    self.session(node, sid, PeerSession::timer_event(t, now));
                }
            }
        }
    }

    /// Runs until `until` (virtual time), checking `invariant` after every step.
    pub fn run_until(
        &mut self,
        until: Duration,
        invariant: &dyn Fn(&Sim) -> Result<(), String>,
    ) -> Result<(), String> {
        loop {
            let next_msg = self.queue.peek().map(|Reverse((at, _, _))| *at);
            let next_timer = self.next_timer();
            let at = match (next_msg, next_timer.map(|t| t.0)) {
                (Some(m), Some(t)) => m.min(t),
                (Some(m), None) => m,
                (None, Some(t)) => t,
                (None, None) => break,
            };
            if at > until {
                break;
            }
            self.now = at;
            if next_msg == Some(at) {
                let Some(Reverse((_, _, key))) = self.queue.pop() else {
                    break;
                };
                if let Some(Pending::Msg { from, to, msg }) = self.pending.remove(&key) {
                    if self.cut.contains(&pair(from, to)) {
                        self.dropped += 1;
                    } else {
                        self.deliver(from, to, msg);
                    }
                }
            } else if let Some((_, node, target)) = next_timer {
                self.fire_timer(node, target);
            }
            invariant(self)
                .map_err(|e| format!("seed {}: at {:?}: {e}", self.cfg.seed, self.now))?;
        }
        self.now = self.now.max(until);
        Ok(())
    }

    /// A one-line account of `node`'s sessions and dial slots, for failure messages.
    pub fn describe_network(&self, node: usize) -> String {
        let n = &self.nodes[node];
        let sessions: Vec<String> = n
            .sessions
            .iter()
            .map(|(sid, s)| {
                format!(
                    "s{sid}->{}{} {:?}",
                    s.peer,
                    if s.outbound { "out" } else { "in" },
                    s.run.instance.state()
                )
            })
            .collect();
        let net = n
            .net
            .as_ref()
            .map(|r| format!("{:?} {:?}", r.instance.state(), r.instance.machine.peers));
        format!("sessions {sessions:?} active {:?} net {net:?}", n.active)
    }

    /// The state of `node`'s session with `peer`, if it has an established one.
    pub fn sees(&self, node: usize, peer: usize) -> bool {
        self.nodes[node].sees_up.contains(&peer)
    }

    /// fire_hire's positions on `customer`: supplier index and whether confirmed.
    pub fn slots(&self, customer: usize) -> Vec<Option<(usize, bool)>> {
        let Some(run) = &self.nodes[customer].hire else {
            return Vec::new();
        };
        run.instance
            .machine
            .slots
            .iter()
            .map(|h| h.and_then(|h| Some((self.index_of(h.supplier)?, h.confirmed))))
            .collect()
    }

    pub fn fire_hire_state(&self, customer: usize) -> Option<fire_hire::State> {
        self.nodes[customer]
            .hire
            .as_ref()
            .map(|r| r.instance.state())
    }

    pub fn connector_state(&self, customer: usize, position: u32) -> Option<(usize, sc::State)> {
        self.nodes[customer]
            .connectors
            .get(&position)
            .map(|c| (c.supplier, c.run.instance.state()))
    }

    /// Every peer a node counts as up has exactly the one established session it names.
    pub fn check_sessions(&self) -> Result<(), String> {
        for (i, node) in self.nodes.iter().enumerate() {
            for (peer, sid) in &node.active {
                let ok = node.sessions.get(sid).is_some_and(|s| {
                    s.peer == *peer && s.run.instance.state() == ps::State::Established
                });
                if !ok || !node.sees_up.contains(peer) {
                    return Err(format!(
                        "node {i}: active session {sid} with {peer} is not established"
                    ));
                }
            }
            if node.sees_up.len() != node.active.len() {
                return Err(format!("node {i}: presence and sessions disagree"));
            }
        }
        Ok(())
    }

    /// The invariants every run must keep: no supplier holds two positions of one customer,
    /// and every live connector talks to the supplier its position names.
    pub fn check_positions(&self) -> Result<(), String> {
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(run) = &node.hire else { continue };
            let machine = &run.instance.machine;
            if !machine.positions_are_distinct() {
                return Err(format!(
                    "node {i}: a supplier holds two positions: {:?}",
                    self.slots(i)
                ));
            }
            for (p, c) in &node.connectors {
                let state = c.run.instance.state();
                if state == sc::State::Cancelling || state == sc::State::Refused {
                    continue;
                }
                let slot = machine.slots.get(*p as usize).copied().flatten();
                if slot.map(|h| h.supplier) != Some(self.nodes[c.supplier].id) {
                    return Err(format!(
                        "node {i}: connector at {p} ({state:?}) disagrees with its slot"
                    ));
                }
            }
        }
        Ok(())
    }
}
