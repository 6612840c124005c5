//! Deterministic simulation of several nodes' machines (STYLE.md, test tier 4): every node runs
//! network_connector and one peer_session per connection, fire_hire and one supplier_connector
//! per hire as a customer, and the supplier_service decision as a supplier. They are wired through
//! an in-memory network with a virtual clock and a seeded RNG that drops, delays and partitions
//! messages. Same seed, same run: a failing test prints its seed.
//!
//! The simulated nodes hold no rule of their own: every decision (the tie-break, presence,
//! redials, which supplier to hire, which connector holds a position, how an answer is read) is
//! the production machines' (`src/fsm`). This module only turns their outputs into simulated
//! messages and delivers the events that come back, as the actor drivers do with real IO.
//!
//! What is abstracted: bytes and crypto (a handshake is one `Hello` each way, a session is
//! authenticated when it receives its peer's), and TCP (a close reaches the other end unless the
//! link is cut, when the other end finds out by its pong deadline). Faults it can inject: loss,
//! delay, partitions, node restarts (sessions lost, the store reopening), a supplier dropping its
//! customer, passing failure replies, and peers that do not trust each other.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::crypto::identity::NodeId;
use crate::fsm::backup_job::{self as bj, BackupJob, BlockId};
use crate::fsm::fire_hire::{self, FireHire};
use crate::fsm::network_connector::{self as nc, NetworkConnector};
use crate::fsm::peer_session::{self as ps, PeerSession};
use crate::fsm::supplier_connector::{self as sc, FailCode, SupplierConnector};
use crate::fsm::supplier_service::{Refusal, decide};
use crate::fsm::{Ctx, Instance, Label, Machine};

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
    /// A service request from connector `instance`.
    Request {
        instance: u64,
        space: u64,
    },
    Accept {
        instance: u64,
    },
    Refuse {
        instance: u64,
        code: FailCode,
    },
    Cancel {
        instance: u64,
    },
    CancelAck {
        instance: u64,
    },
    /// The supplier ends the customer's contract.
    SupplierCancel,
    /// A fragment for the supplier at `position`, and its answers.
    Store {
        block: BlockId,
        position: u32,
    },
    StoreAck {
        block: BlockId,
        position: u32,
    },
    StoreFail {
        block: BlockId,
        position: u32,
    },
    /// Local events of a node (the pipeline's output, a request's timeout, a catalog saved).
    BlockReady {
        block: BlockId,
    },
    InputDone,
    StoreTimeout {
        block: BlockId,
        position: u32,
    },
    /// One of the backup job's own events (the catalog upload's steps).
    Backup(bj::Event),
}

/// A simulated session: the node index of the other end (known from the TCP connection in the
/// simulation; production learns it in the handshake) and the machine.
struct Session {
    peer: usize,
    outbound: bool,
    remote: Option<u64>,
    run: Instance<PeerSession>,
}

struct Connector {
    supplier: usize,
    run: Instance<SupplierConnector>,
}

/// The supplier side of one node: who it trusts and what it granted.
#[derive(Default)]
pub struct ServiceModel {
    pub donated: u64,
    pub trusted: BTreeSet<usize>,
    pub open: bool,
    /// customer -> quota
    pub granted: BTreeMap<usize, u64>,
    /// Fragments held: (customer, block, position).
    pub stored: BTreeSet<(usize, BlockId, u32)>,
    /// Before this time the store is still opening: requests get a passing failure.
    pub ready_at: Duration,
}

pub struct SimNode {
    pub id: NodeId,
    hire: Option<Instance<FireHire>>,
    /// By connector instance.
    connectors: BTreeMap<u64, Connector>,
    pub service: ServiceModel,
    /// Friends this node's network reports up.
    pub sees_up: BTreeSet<usize>,
    net: Option<Instance<NetworkConnector>>,
    sessions: BTreeMap<u64, Session>,
    /// Positions persisted by fire_hire's `Save` (what a restart resumes): confirmed only.
    pub saved: Vec<(u32, usize)>,
    backup: Option<BackupRun>,
}

/// A backup job on a customer node: the machine, and the simulated pipeline's input.
struct BackupRun {
    run: Instance<BackupJob>,
    /// Blocks the pipeline has yet to produce.
    left: u64,
    next: u64,
    /// Fragments sent and not yet answered: (block, position) -> the supplier it went to.
    awaiting: BTreeMap<(BlockId, u32), usize>,
    outcome: Option<bj::Outcome>,
}

/// Which machine on a node a timer belongs to.
#[derive(Clone, Copy, Debug)]
enum Target {
    Backup,
    Hire,
    Net,
    Connector(u64),
    Session(u64),
}

pub struct Sim {
    pub now: Duration,
    pub cfg: SimConfig,
    rng: StdRng,
    pub nodes: Vec<SimNode>,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    pending: BTreeMap<u64, (usize, usize, Msg)>,
    seq: u64,
    cut: BTreeSet<(usize, usize)>,
    /// When the last message from one node to another arrives: later ones arrive after it, as on
    /// a TCP stream.
    last_arrival: BTreeMap<(usize, usize), Duration>,
    /// Messages delivered and dropped, for assertions on the run itself.
    pub delivered: u64,
    pub dropped: u64,
    /// Times a node's network reported a friend down (a session lost without a replacement).
    pub peer_downs: u64,
    next_session: u64,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// A broken invariant the simulation found, in words: seed, time, node, machine and rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Broken(pub String);

/// What an invariant check returns.
pub type Checked = Result<(), Broken>;

/// Checks a machine's own invariant in its current state.
fn check<M: Machine>(what: &str, run: &Instance<M>) -> Checked {
    run.machine.invariant(run.state()).map_err(|e| {
        Broken(format!(
            "{what} ({} in {}): {e}",
            M::NAME,
            run.state().name()
        ))
    })
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
                    ..ServiceModel::default()
                },
                sees_up: BTreeSet::new(),
                net: None,
                sessions: BTreeMap::new(),
                saved: Vec::new(),
                backup: None,
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
            last_arrival: BTreeMap::new(),
            delivered: 0,
            dropped: 0,
            peer_downs: 0,
            next_session: 1,
        };
        for i in 0..sim.nodes.len() {
            sim.start_network(i);
        }
        sim
    }

    fn ctx(&mut self) -> Ctx {
        Ctx {
            now: self.now,
            // A fixed wall-clock epoch keeps runs reproducible.
            wall: Duration::from_secs(1_700_000_000) + self.now,
            random: self.rng.r#gen(),
        }
    }

    fn index_of(&self, id: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    // ---- network_connector and peer_session ----

    /// Starts network_connector on `node`, knowing every other node as a friend.
    fn start_network(&mut self, node: usize) {
        let mut run = Instance::new(
            NetworkConnector::new(self.nodes[node].id),
            format!("n{node}"),
        );
        run.start(self.now);
        self.nodes[node].net = Some(run);
        for peer in 0..self.nodes.len() {
            if peer != node {
                let id = self.nodes[peer].id;
                self.network(node, nc::Event::PeerAdded(id));
            }
        }
        self.network(node, nc::Event::Start);
    }

    fn network(&mut self, node: usize, event: nc::Event) {
        let ctx = self.ctx();
        let Some(stepped) = self.nodes[node]
            .net
            .as_mut()
            .and_then(|r| r.step(&event, &ctx))
        else {
            return;
        };
        for output in stepped.outputs {
            match output {
                nc::Output::Bind => self.network(node, nc::Event::Bound),
                nc::Output::BindFailed(_) => {}
                nc::Output::Dial(peer) => match self.index_of(peer) {
                    Some(p) => {
                        self.open_session(node, p, None);
                    }
                    None => self.network(node, nc::Event::DialFailed(peer)),
                },
                nc::Output::Close(sid) => self.session(node, sid, ps::Event::Superseded),
                nc::Output::CloseSessionsOf(peer) => {
                    let sids: Vec<u64> = self.nodes[node]
                        .sessions
                        .iter()
                        .filter(|(_, s)| Some(s.peer) == self.index_of(peer))
                        .map(|(sid, _)| *sid)
                        .collect();
                    for sid in sids {
                        self.session(node, sid, ps::Event::Shutdown);
                    }
                }
                nc::Output::PeerUp(peer) | nc::Output::PeerDown(peer) => {
                    let up = matches!(output, nc::Output::PeerUp(_));
                    self.peer_downs += u64::from(!up);
                    if let Some(p) = self.index_of(peer) {
                        self.presence(node, p, up);
                    }
                }
                nc::Output::CloseAll => {
                    let sids: Vec<u64> = self.nodes[node].sessions.keys().copied().collect();
                    for sid in sids {
                        self.session(node, sid, ps::Event::Shutdown);
                    }
                }
            }
        }
    }

    /// A new session on `node` with `peer`: outbound (dial) when `remote` is None.
    fn open_session(&mut self, node: usize, peer: usize, remote: Option<u64>) -> u64 {
        let sid = self.next_session;
        self.next_session += 1;
        let outbound = remote.is_none();
        let mut run = Instance::new(PeerSession::default(), format!("n{node}s{sid}"));
        run.start(self.now);
        self.nodes[node].sessions.insert(
            sid,
            Session {
                peer,
                outbound,
                remote,
                run,
            },
        );
        let first = if outbound {
            ps::Event::Dial
        } else {
            ps::Event::Accept
        };
        self.session(node, sid, first);
        sid
    }

    fn session(&mut self, node: usize, sid: u64, event: ps::Event) {
        let ctx = self.ctx();
        let Some(session) = self.nodes[node].sessions.get_mut(&sid) else {
            return;
        };
        let (peer, outbound) = (session.peer, session.outbound);
        let Some(stepped) = session.run.step(&event, &ctx) else {
            return;
        };
        let remote = session.remote;
        for output in stepped.outputs {
            match output {
                ps::Output::OpenTcp => self.send(node, peer, Msg::TcpOpen { dialer: sid }),
                ps::Output::RunHandshake => {
                    if let Some(to) = remote {
                        self.send(node, peer, Msg::Hello { to });
                    }
                }
                ps::Output::StartLink { peer: id } => self.network(
                    node,
                    nc::Event::SessionUp {
                        session: sid,
                        peer: id,
                        outbound,
                    },
                ),
                ps::Output::SendPing => {
                    if let Some(to) = remote {
                        self.send(node, peer, Msg::Ping { to });
                    }
                }
                ps::Output::Closed {
                    peer: established, ..
                } => {
                    if let Some(to) = remote {
                        self.send(node, peer, Msg::Close { to });
                    }
                    self.nodes[node].sessions.remove(&sid);
                    let dialed = outbound.then(|| self.nodes[peer].id);
                    self.network(
                        node,
                        nc::Event::SessionDown {
                            session: sid,
                            peer: established,
                            dialed,
                        },
                    );
                }
            }
        }
    }

    fn presence(&mut self, at: usize, peer: usize, up: bool) {
        if up {
            self.nodes[at].sees_up.insert(peer);
        } else {
            self.nodes[at].sees_up.remove(&peer);
        }
        let id = self.nodes[peer].id;
        let event = if up {
            fire_hire::Event::CandidateUp(id)
        } else {
            fire_hire::Event::CandidateDown(id)
        };
        // The backup hears of positions from fire_hire's `Position` outputs, as in the node.
        self.fire_hire(at, event);
    }

    // ---- backup_job ----

    /// Starts a backup of `blocks` blocks on `customer`, whose positions are hired.
    pub fn start_backup(&mut self, customer: usize, blocks: u64) {
        let (k, m) = (self.cfg.data_shards as u32, self.cfg.parity_shards as u32);
        let mut run = Instance::new(
            BackupJob {
                ledger: bj::Ledger::new(k, m),
                ..BackupJob::default()
            },
            format!("n{customer}b"),
        );
        run.start(self.now);
        // Where the positions stand (fire_hire's snapshot); changes follow as its outputs.
        let up = self.nodes[customer]
            .hire
            .as_ref()
            .map(|h| {
                h.machine
                    .positions()
                    .into_iter()
                    .filter(|p| p.up)
                    .map(|p| p.position)
                    .collect()
            })
            .unwrap_or_default();
        self.nodes[customer].backup = Some(BackupRun {
            run,
            left: blocks,
            next: 0,
            awaiting: BTreeMap::new(),
            outcome: None,
        });
        self.backup(customer, bj::Event::Start { up });
    }

    /// How the backup on `customer` ended, if it did.
    pub fn backup_outcome(&self, customer: usize) -> Option<bj::Outcome> {
        self.nodes[customer].backup.as_ref()?.outcome.clone()
    }

    pub fn backup_state(&self, customer: usize) -> Option<bj::State> {
        Some(self.nodes[customer].backup.as_ref()?.run.state())
    }

    /// The blocks the backup on `customer` produced.
    pub fn backup_blocks(&self, customer: usize) -> Vec<BlockId> {
        let Some(b) = &self.nodes[customer].backup else {
            return Vec::new();
        };
        (0..b.next).map(block_id).collect()
    }

    fn backup(&mut self, node: usize, event: bj::Event) {
        let ctx = self.ctx();
        let Some(stepped) = self.nodes[node]
            .backup
            .as_mut()
            .and_then(|b| b.run.step(&event, &ctx))
        else {
            return;
        };
        for output in stepped.outputs {
            match output {
                bj::Output::Produce => {
                    let Some(b) = self.nodes[node].backup.as_mut() else {
                        return;
                    };
                    let msg = if b.left > 0 {
                        b.left -= 1;
                        let block = block_id(b.next);
                        b.next += 1;
                        Msg::BlockReady { block }
                    } else {
                        Msg::InputDone
                    };
                    // The pipeline's CPU time.
                    self.local(node, Duration::from_millis(20), msg);
                }
                bj::Output::Place { block, position } => {
                    let supplier = self
                        .slots(node)
                        .get(position as usize)
                        .copied()
                        .flatten()
                        .map(|(s, _)| s);
                    match supplier {
                        Some(s) => {
                            if let Some(b) = self.nodes[node].backup.as_mut() {
                                b.awaiting.insert((block, position), s);
                            }
                            self.send(node, s, Msg::Store { block, position });
                            // The request's timeout.
                            self.local(
                                node,
                                Duration::from_secs(30),
                                Msg::StoreTimeout { block, position },
                            );
                        }
                        None => self.backup(node, bj::Event::SupplierDown(position)),
                    }
                }
                // The catalog upload: the sim models data placement; the catalog's own
                // fragments and the record reach every supplier the job sees up.
                bj::Output::ExportCatalog => self.local(
                    node,
                    Duration::from_millis(20),
                    Msg::Backup(bj::Event::CatalogEncoded {
                        blocks: vec![[0xca; 32]],
                        last_revision: 0,
                    }),
                ),
                bj::Output::PlaceCatalog { block, position } => self.local(
                    node,
                    Duration::from_millis(10),
                    Msg::Backup(bj::Event::CatalogStored {
                        block,
                        position,
                        stored: true,
                    }),
                ),
                bj::Output::SendRecord { to, .. } => self.local(
                    node,
                    Duration::from_millis(10),
                    Msg::Backup(bj::Event::RecordSent { copies: to.len() }),
                ),
                bj::Output::SaveCatalog { .. } => self.local(
                    node,
                    Duration::from_millis(20),
                    Msg::Backup(bj::Event::CatalogSaved),
                ),
                // The snapshot stands; the job drains its outboxes before `Finished`.
                bj::Output::Committed(_) | bj::Output::BlockComplete { .. } => {}
                bj::Output::Finished(outcome) => {
                    if let Some(b) = self.nodes[node].backup.as_mut() {
                        b.outcome = Some(outcome);
                    }
                }
                bj::Output::Cancel | bj::Output::Progress(_) => {}
            }
        }
    }

    /// A message from a node to itself after `delay` (never lost).
    fn local(&mut self, node: usize, delay: Duration, msg: Msg) {
        self.schedule(self.now + delay, node, node, msg);
    }

    // ---- fire_hire and supplier_connector ----

    /// Starts fire_hire on `customer` (with the contracts it saved, as after a restart).
    pub fn start_customer(&mut self, customer: usize) {
        let positions = self.cfg.data_shards + self.cfg.parity_shards;
        let mut run = Instance::new(FireHire::new(positions), format!("n{customer}"));
        run.start(self.now);
        self.nodes[customer].hire = Some(run);
        let up: Vec<usize> = self.nodes[customer].sees_up.iter().copied().collect();
        for peer in up {
            let id = self.nodes[peer].id;
            self.fire_hire(customer, fire_hire::Event::CandidateUp(id));
        }
        let resumed = self.nodes[customer]
            .saved
            .iter()
            .map(|&(p, s)| (p, self.nodes[s].id))
            .collect();
        self.fire_hire(customer, fire_hire::Event::Start { resumed });
    }

    /// Stops a customer's machines (as a process stop) keeping what they persisted.
    pub fn stop_customer(&mut self, customer: usize) {
        self.fire_hire(customer, fire_hire::Event::Shutdown);
        self.nodes[customer].hire = None;
        self.nodes[customer].connectors.clear();
    }

    fn fire_hire(&mut self, node: usize, event: fire_hire::Event) {
        let ctx = self.ctx();
        let Some(stepped) = self.nodes[node]
            .hire
            .as_mut()
            .and_then(|r| r.step(&event, &ctx))
        else {
            return;
        };
        for output in stepped.outputs {
            match output {
                fire_hire::Output::StartConnector {
                    instance,
                    supplier,
                    resumed,
                    peer_up,
                    ..
                } => {
                    let Some(s) = self.index_of(supplier) else {
                        continue;
                    };
                    let mut machine = if resumed {
                        SupplierConnector::resumed()
                    } else {
                        SupplierConnector::default()
                    };
                    machine.peer_up = peer_up;
                    let mut run = Instance::new(machine, format!("n{node}c{instance}"));
                    run.start(self.now);
                    self.nodes[node]
                        .connectors
                        .insert(instance, Connector { supplier: s, run });
                    self.connector(node, instance, sc::Event::Connect);
                }
                fire_hire::Output::Tell { instance, event } => {
                    self.connector(node, instance, event)
                }
                fire_hire::Output::Save(slots) => {
                    let saved = slots
                        .iter()
                        .enumerate()
                        .filter_map(|(p, h)| {
                            let (supplier, confirmed) = (*h)?;
                            confirmed.then_some((p as u32, self.index_of(supplier)?))
                        })
                        .collect();
                    self.nodes[node].saved = saved;
                }
                fire_hire::Output::Position(p) => {
                    let event = if p.up {
                        bj::Event::SupplierUp(p.position)
                    } else {
                        bj::Event::SupplierDown(p.position)
                    };
                    self.backup(node, event);
                }
                fire_hire::Output::StopConnectors => {
                    let instances: Vec<u64> = self.nodes[node].connectors.keys().copied().collect();
                    for instance in instances {
                        self.connector(node, instance, sc::Event::Shutdown);
                    }
                }
            }
        }
    }

    fn connector(&mut self, node: usize, instance: u64, event: sc::Event) {
        let ctx = self.ctx();
        let Some(conn) = self.nodes[node].connectors.get_mut(&instance) else {
            return;
        };
        let supplier = conn.supplier;
        let Some(stepped) = conn.run.step(&event, &ctx) else {
            return;
        };
        if conn.run.is_terminal() {
            self.nodes[node].connectors.remove(&instance);
        }
        for output in stepped.outputs {
            match output {
                sc::Output::SendRequest => {
                    let space = self.cfg.space_per_supplier;
                    self.send(node, supplier, Msg::Request { instance, space });
                }
                sc::Output::SendCancel => self.send(node, supplier, Msg::Cancel { instance }),
                sc::Output::Report(report) => {
                    self.fire_hire(node, fire_hire::Event::Report { instance, report })
                }
            }
        }
    }

    // ---- the simulated wire ----

    fn schedule(&mut self, at: Duration, from: usize, to: usize, msg: Msg) {
        self.seq += 1;
        self.pending.insert(self.seq, (from, to, msg));
        self.queue.push(Reverse((at, self.seq)));
    }

    /// Sends `msg` with a random delay. A cut link loses everything. Random loss hits connection
    /// attempts and protocol requests and replies (as a connection reset would lose what was in
    /// flight), not a live session's own framing: TCP does not drop single messages silently.
    /// A supplier's notice that it dropped its customer is not lost here: production sends it
    /// once, and a lost one is left for the monitor's audits to find (the simulation has none).
    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        let lossy = !matches!(
            msg,
            Msg::TcpAccepted { .. }
                | Msg::Hello { .. }
                | Msg::Ping { .. }
                | Msg::Pong { .. }
                | Msg::Close { .. }
                | Msg::SupplierCancel
                | Msg::BlockReady { .. }
                | Msg::InputDone
                | Msg::StoreTimeout { .. }
                | Msg::Backup(_)
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
        let last = self.last_arrival.entry((from, to)).or_default();
        let at = (self.now + delay).max(*last);
        *last = at;
        self.schedule(at, from, to, msg);
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Msg) {
        self.delivered += 1;
        match msg {
            Msg::TcpOpen { dialer } => {
                // The dialer learns of the connection before any handshake bytes reach it.
                let accepted = self.next_session;
                self.send(to, from, Msg::TcpAccepted { dialer, accepted });
                self.open_session(to, from, Some(dialer));
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
                let established = self.nodes[to]
                    .sessions
                    .get(&sid)
                    .filter(|s| s.run.state() == ps::State::Established)
                    .and_then(|s| s.remote);
                if let Some(remote) = established {
                    self.send(to, from, Msg::Pong { to: remote });
                }
            }
            Msg::Pong { to: sid } => self.session(to, sid, ps::Event::Pong),
            Msg::Close { to: sid } => {
                self.session(to, sid, ps::Event::LinkFailed(ps::CloseReason::PeerClosed))
            }
            Msg::Request { instance, space } => {
                let answer = self.serve(to, from, instance, space);
                self.send(to, from, answer);
            }
            Msg::Cancel { instance } => {
                self.nodes[to].service.granted.remove(&from);
                self.send(to, from, Msg::CancelAck { instance });
            }
            Msg::Accept { instance } => self.connector(to, instance, sc::Event::Accepted),
            Msg::Refuse { instance, code } => {
                self.connector(to, instance, sc::Event::Refused(code))
            }
            Msg::CancelAck { instance } => self.connector(to, instance, sc::Event::CancelDone),
            Msg::SupplierCancel => {
                let id = self.nodes[from].id;
                self.fire_hire(to, fire_hire::Event::SupplierLeft(id));
            }
            Msg::Store { block, position } => {
                let answer = if self.nodes[to].service.granted.contains_key(&from) {
                    self.nodes[to]
                        .service
                        .stored
                        .insert((from, block, position));
                    Msg::StoreAck { block, position }
                } else {
                    Msg::StoreFail { block, position }
                };
                self.send(to, from, answer);
            }
            Msg::StoreAck { block, position } | Msg::StoreFail { block, position } => {
                let ok = matches!(msg, Msg::StoreAck { .. });
                let Some(b) = self.nodes[to].backup.as_mut() else {
                    return;
                };
                // Only the answer from the supplier the fragment went to, once.
                if b.awaiting.get(&(block, position)) != Some(&from) {
                    return;
                }
                b.awaiting.remove(&(block, position));
                let event = if ok {
                    bj::Event::Placed { block, position }
                } else {
                    bj::Event::PlaceFailed { block, position }
                };
                self.backup(to, event);
            }
            Msg::StoreTimeout { block, position } => {
                let Some(b) = self.nodes[to].backup.as_mut() else {
                    return;
                };
                if b.awaiting.remove(&(block, position)).is_some() {
                    self.backup(to, bj::Event::PlaceFailed { block, position });
                }
            }
            Msg::BlockReady { block } => self.backup(
                to,
                bj::Event::BlockReady {
                    block,
                    bytes: 4 << 20,
                    placed: vec![],
                },
            ),
            Msg::InputDone => self.backup(to, bj::Event::InputDone),
            Msg::Backup(event) => self.backup(to, event),
        }
    }

    /// The supplier's answer to a service request: the production space rule.
    fn serve(&mut self, supplier: usize, customer: usize, instance: u64, space: u64) -> Msg {
        let now = self.now;
        let service = &mut self.nodes[supplier].service;
        if now < service.ready_at {
            return Msg::Refuse {
                instance,
                code: FailCode::NotReady,
            };
        }
        let others: u64 = service
            .granted
            .iter()
            .filter(|(c, _)| **c != customer)
            .map(|(_, q)| q)
            .sum();
        let trusted = service.trusted.contains(&customer);
        match decide(trusted, service.open, space, others, service.donated) {
            Ok(quota) => {
                service.granted.insert(customer, quota);
                Msg::Accept { instance }
            }
            Err(Refusal::NoSpace) => Msg::Refuse {
                instance,
                code: FailCode::NoSpace,
            },
            Err(Refusal::NotTrusted) => Msg::Refuse {
                instance,
                code: FailCode::NotTrusted,
            },
            Err(Refusal::TooSmall) => Msg::Refuse {
                instance,
                code: FailCode::Other,
            },
        }
    }

    // ---- faults and operations ----

    /// Cuts the link between `a` and `b`: every message between them is lost until `heal`.
    /// Each end notices through its sessions' pong deadlines.
    pub fn partition(&mut self, a: usize, b: usize) {
        self.cut.insert(pair(a, b));
    }

    pub fn heal(&mut self, a: usize, b: usize) {
        self.cut.remove(&pair(a, b));
    }

    /// The monitor's entry point: fire the supplier at `position`.
    pub fn fire(&mut self, customer: usize, position: u32) {
        self.fire_hire(customer, fire_hire::Event::Fire { position });
    }

    /// `supplier` stops serving `customer` (`bitdust customer drop`): its grant goes, and the
    /// customer is told.
    pub fn drop_customer(&mut self, supplier: usize, customer: usize) {
        self.nodes[supplier].service.granted.remove(&customer);
        self.send(supplier, customer, Msg::SupplierCancel);
    }

    /// `node` stops trusting `peer` as a supplier would: its requests are refused from now on.
    pub fn distrust(&mut self, node: usize, peer: usize) {
        self.nodes[node].service.trusted.remove(&peer);
    }

    /// Restarts `node`'s process: its sessions drop without a word (the peers notice by their
    /// pong deadlines or a new session), its network starts anew, its store takes `opening` to
    /// open (requests meanwhile get a passing failure) and, as a customer, it resumes what it
    /// saved. Grants persist (they are on disk).
    pub fn restart_node(&mut self, node: usize, opening: Duration) {
        let customer = self.nodes[node].hire.is_some();
        self.nodes[node].hire = None;
        self.nodes[node].connectors.clear();
        self.nodes[node].sessions.clear();
        self.nodes[node].net = None;
        self.nodes[node].sees_up.clear();
        self.nodes[node].service.ready_at = self.now + opening;
        self.start_network(node);
        if customer {
            self.start_customer(node);
        }
    }

    // ---- running ----

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
                node.backup.as_ref().and_then(|b| b.run.next_deadline()),
                i,
                Target::Backup,
            );
            consider(
                node.hire.as_ref().and_then(|r| r.next_deadline()),
                i,
                Target::Hire,
            );
            consider(
                node.net.as_ref().and_then(|r| r.next_deadline()),
                i,
                Target::Net,
            );
            for (instance, c) in &node.connectors {
                consider(c.run.next_deadline(), i, Target::Connector(*instance));
            }
            for (sid, session) in &node.sessions {
                consider(session.run.next_deadline(), i, Target::Session(*sid));
            }
        }
        best
    }

    fn fire_timer(&mut self, node: usize, target: Target) {
        let now = self.now;
        let n = &mut self.nodes[node];
        match target {
            Target::Backup => {
                if let Some(t) = n.backup.as_mut().and_then(|b| b.run.due_timer(now)) {
                    self.backup(node, BackupJob::timer_event(t));
                }
            }
            Target::Hire => {
                if let Some(t) = n.hire.as_mut().and_then(|r| r.due_timer(now)) {
                    self.fire_hire(node, FireHire::timer_event(t));
                }
            }
            Target::Net => {
                if let Some(t) = n.net.as_mut().and_then(|r| r.due_timer(now)) {
                    self.network(node, NetworkConnector::timer_event(t));
                }
            }
            Target::Connector(i) => {
                if let Some(t) = n.connectors.get_mut(&i).and_then(|c| c.run.due_timer(now)) {
                    self.connector(node, i, SupplierConnector::timer_event(t));
                }
            }
            Target::Session(sid) => {
                if let Some(t) = n.sessions.get_mut(&sid).and_then(|c| c.run.due_timer(now)) {
                    self.session(node, sid, PeerSession::timer_event(t));
                }
            }
        }
    }

    /// Runs until `until` (virtual time), checking every machine's own invariant and
    /// `invariant` after every step.
    pub fn run_until(&mut self, until: Duration, invariant: &dyn Fn(&Sim) -> Checked) -> Checked {
        loop {
            let next_msg = self.queue.peek().map(|Reverse((at, _))| *at);
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
                let Some(Reverse((_, key))) = self.queue.pop() else {
                    break;
                };
                if let Some((from, to, msg)) = self.pending.remove(&key) {
                    if self.cut.contains(&pair(from, to)) {
                        self.dropped += 1;
                    } else {
                        self.deliver(from, to, msg);
                    }
                }
            } else if let Some((_, node, target)) = next_timer {
                self.fire_timer(node, target);
            }
            self.check_machines()
                .and_then(|()| invariant(self))
                .map_err(|e| Broken(format!("seed {}: at {:?}: {e}", self.cfg.seed, self.now)))?;
        }
        self.now = self.now.max(until);
        Ok(())
    }

    /// Every machine's own invariant (`Machine::invariant`).
    pub fn check_machines(&self) -> Checked {
        for (i, node) in self.nodes.iter().enumerate() {
            let at = format!("node {i}");
            if let Some(run) = &node.net {
                check(&at, run)?;
            }
            if let Some(run) = &node.hire {
                check(&at, run)?;
            }
            if let Some(b) = &node.backup {
                check(&at, &b.run)?;
            }
            for c in node.connectors.values() {
                check(&at, &c.run)?;
            }
            for s in node.sessions.values() {
                check(&at, &s.run)?;
            }
        }
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
                    s.run.state()
                )
            })
            .collect();
        let net = n.net.as_ref().map(|r| {
            format!(
                "{:?} active {:?} {:?}",
                r.state(),
                r.machine.sessions.active,
                r.machine.peers
            )
        });
        format!("sessions {sessions:?} net {net:?}")
    }

    /// Whether `node`'s network reports `peer` up.
    pub fn sees(&self, node: usize, peer: usize) -> bool {
        self.nodes[node].sees_up.contains(&peer)
    }

    /// fire_hire's positions on `customer`: supplier index and whether confirmed.
    pub fn slots(&self, customer: usize) -> Vec<Option<(usize, bool)>> {
        let Some(run) = &self.nodes[customer].hire else {
            return Vec::new();
        };
        run.machine
            .slots
            .iter()
            .map(|h| h.and_then(|h| Some((self.index_of(h.supplier)?, h.confirmed))))
            .collect()
    }

    pub fn fire_hire_state(&self, customer: usize) -> Option<fire_hire::State> {
        self.nodes[customer].hire.as_ref().map(|r| r.state())
    }

    /// The supplier and state of the connector holding `position` on `customer`.
    pub fn connector_state(&self, customer: usize, position: u32) -> Option<(usize, sc::State)> {
        let node = &self.nodes[customer];
        let hire = node
            .hire
            .as_ref()?
            .machine
            .slots
            .get(position as usize)?
            .as_ref()?;
        let c = node.connectors.get(&hire.instance)?;
        Some((c.supplier, c.run.state()))
    }

    /// Every friend a node's network counts as up has one established session, named as active,
    /// and the node's presence view says the same.
    pub fn check_sessions(&self) -> Checked {
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(net) = &node.net else { continue };
            for (peer, sid) in &net.machine.sessions.active {
                let ok = node.sessions.get(sid).is_some_and(|s| {
                    self.nodes[s.peer].id == *peer && s.run.state() == ps::State::Established
                });
                if !ok {
                    return Err(Broken(format!(
                        "node {i}: active session {sid} with {peer} is not established"
                    )));
                }
            }
            let up: BTreeSet<usize> = net
                .machine
                .peers
                .iter()
                .filter(|(_, slot)| slot.up)
                .filter_map(|(id, _)| self.index_of(*id))
                .collect();
            if up != node.sees_up {
                return Err(Broken(format!("node {i}: presence and sessions disagree")));
            }
        }
        Ok(())
    }

    /// Once the network is quiet, both ends of every pair use the same connection: node a's
    /// active session with b is connected to b's active session with a.
    pub fn check_sessions_agree(&self) -> Checked {
        for (a, node) in self.nodes.iter().enumerate() {
            let Some(net) = &node.net else { continue };
            for (peer, sid) in &net.machine.sessions.active {
                let Some(b) = self.index_of(*peer) else {
                    continue;
                };
                let Some(theirs) = self.nodes[b]
                    .net
                    .as_ref()
                    .and_then(|n| n.machine.sessions.active.get(&node.id))
                else {
                    continue;
                };
                let mine = node.sessions.get(sid).and_then(|s| s.remote);
                if mine != Some(*theirs) {
                    return Err(Broken(format!(
                        "nodes {a} and {b} use different connections: {sid}->{mine:?} vs {theirs}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every live connector either holds the position its slot names or is leaving it.
    pub fn check_positions(&self) -> Checked {
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(run) = &node.hire else { continue };
            let machine = &run.machine;
            for (instance, c) in &node.connectors {
                let holds =
                    machine.slots.iter().flatten().any(|h| {
                        h.instance == *instance && h.supplier == self.nodes[c.supplier].id
                    });
                if !holds && !machine.leaving.contains_key(instance) {
                    return Err(Broken(format!(
                        "node {i}: connector {instance} ({:?}) neither holds nor leaves",
                        c.run.state()
                    )));
                }
            }
            for hire in machine.slots.iter().flatten() {
                if !node.connectors.contains_key(&hire.instance) {
                    return Err(Broken(format!(
                        "node {i}: connector {} is gone",
                        hire.instance
                    )));
                }
            }
        }
        Ok(())
    }

    /// Loses the connector holding `position` on `customer` without telling fire_hire: a
    /// hand-made violation, for the test that proves the checks catch one.
    pub fn lose_connector(&mut self, customer: usize, position: u32) {
        let instance = self.nodes[customer]
            .hire
            .as_ref()
            .and_then(|r| r.machine.slots.get(position as usize).copied().flatten())
            .map(|h| h.instance);
        if let Some(instance) = instance {
            self.nodes[customer].connectors.remove(&instance);
        }
    }
}

/// The id of the `n`th simulated block.
fn block_id(n: u64) -> BlockId {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id
}
