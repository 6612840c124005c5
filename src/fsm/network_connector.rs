//! network_connector: the node's presence on the network — bind the listening socket (retrying
//! while it cannot), keep a session with every known peer, redial lost ones with capped
//! exponential backoff and jitter, settle duplicate sessions (the tie-break), and say when a
//! friend counts as up or down.
//!
//! The per-session and per-peer policy lives in two pure sub-structures beside the machine
//! ([`Slot`] per friend, [`SessionTable`] for established sessions), so the production driver
//! and the simulation run exactly the same rules.

use std::collections::BTreeMap;
use std::time::Duration;

use super::machine::{ChoiceRow, Ctx, Machine, Out, Row, TimerRow, To, Violation, row};
use crate::crypto::identity::NodeId;
use crate::{events, labels};

/// Sessions with one peer established within this window of each other are a simultaneous
/// dial, settled by node id; a session older than that is replaced by a new one (the peer
/// restarted or moved, and the old connection may be dead).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(5);

labels! {
    pub enum State { AtStartup, Binding, Listening, Online, Reconnecting, Offline, Closed }
}

events! {
    pub enum Event / EventKind {
        Start,
        Bound,
        BindFailed(String),
        /// A timer: `Rebind` while offline, `Dial` when the earliest redial is due.
        Timeout(Timer),
        /// A friend to keep a session with (from the peer book, or `peer add`).
        PeerAdded(NodeId),
        /// A friend removed (`peer remove`): no more dialing, its sessions close.
        PeerRemoved(NodeId),
        /// A session finished its handshake with `peer`.
        SessionUp { session: u64, peer: NodeId, outbound: bool },
        /// A session ended; `peer` is set if it had been established, `dialed` if we dialed.
        SessionDown { session: u64, peer: Option<NodeId>, dialed: Option<NodeId> },
        /// A dial could not even start (the peer's card has no address we can use).
        DialFailed(NodeId),
        Shutdown,
    }
}

labels! {
    pub enum Guard {}
}

labels! {
    pub enum Action {
        /// Bind the listening socket (IO).
        Bind,
        /// Log why binding failed.
        ReportBindFailure,
        /// Add a friend to dial.
        NotePeer,
        /// Dial every friend that is neither connected nor being dialed and whose backoff passed.
        DialDue,
        /// Record an established session; settle a duplicate; report the friend up.
        NoteSessionUp,
        /// Record a session's end; report the friend down or back off its redial.
        NoteSessionDown,
        /// Stop dialing a friend that is no longer one; close its sessions.
        ForgetPeer,
        /// Close every session and the listener (IO).
        CloseAll,
    }
}

labels! {
    pub enum Timer { Rebind, Dial }
}

labels! {
    pub enum Choice {
        /// Online with a friend connected, Reconnecting after losing the last one, else Listening.
        Connectivity,
    }
}

/// What the network driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Bind,
    BindFailed(String),
    /// Open a session to `peer`.
    Dial(NodeId),
    /// Close one session (it lost the tie-break, or it is with ourselves).
    Close(u64),
    /// Close every session with `peer` (it is no longer a friend).
    CloseSessionsOf(NodeId),
    /// A friend is reachable now (tell the customer side).
    PeerUp(NodeId),
    /// A friend is not reachable any more.
    PeerDown(NodeId),
    CloseAll,
}

/// Dial bookkeeping for one friend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slot {
    pub up: bool,
    pub dialing: bool,
    /// Failed attempts since the last success.
    pub attempts: u32,
    pub next_dial: Duration,
}

/// An established session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub peer: NodeId,
    pub outbound: bool,
    pub up_since: Duration,
}

/// Established sessions and, per peer, the one in use.
#[derive(Debug, Clone, Default)]
pub struct SessionTable {
    pub sessions: BTreeMap<u64, SessionInfo>,
    pub active: BTreeMap<NodeId, u64>,
}

/// Which of two sessions with the same peer survives: true keeps the new one.
///
/// Two sessions established at about the same time from both ends (a simultaneous dial) are
/// settled so that both ends keep the same one: the connection opened by the node with the
/// smaller id. A session older than [`DUPLICATE_WINDOW`] gives way to the new one.
pub fn keep_new_session(
    me: NodeId,
    peer: NodeId,
    new_outbound: bool,
    old_up_since: Duration,
    now: Duration,
) -> bool {
    let simultaneous = now.saturating_sub(old_up_since) < DUPLICATE_WINDOW;
    !simultaneous || new_outbound == (me < peer)
}

impl SessionTable {
    /// Records an established session; returns the session to close, if any (a loser of the
    /// tie-break, or a session with ourselves), and whether `peer` just became reachable.
    pub fn up(
        &mut self,
        me: NodeId,
        session: u64,
        peer: NodeId,
        outbound: bool,
        now: Duration,
    ) -> (Option<u64>, bool) {
        if peer == me {
            return (Some(session), false);
        }
        self.sessions.insert(
            session,
            SessionInfo {
                peer,
                outbound,
                up_since: now,
            },
        );
        match self.active.get(&peer).copied() {
            Some(old) if old != session => {
                let old_up = self.sessions.get(&old).map_or(now, |s| s.up_since);
                let keep_new = keep_new_session(me, peer, outbound, old_up, now);
                if keep_new {
                    self.active.insert(peer, session);
                    (Some(old), false)
                } else {
                    (Some(session), false)
                }
            }
            Some(_) => (None, false),
            None => {
                self.active.insert(peer, session);
                (None, true)
            }
        }
    }

    /// Forgets an ended session; true when it was the one in use with its peer.
    pub fn down(&mut self, session: u64) -> bool {
        let Some(info) = self.sessions.remove(&session) else {
            return false;
        };
        if self.active.get(&info.peer) == Some(&session) {
            self.active.remove(&info.peer);
            return true;
        }
        false
    }

    pub fn is_active(&self, peer: &NodeId) -> bool {
        self.active.contains_key(peer)
    }
}

#[derive(Debug, Clone)]
pub struct NetworkConnector {
    /// This node's id (the tie-break compares it with the peer's).
    pub me: NodeId,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Friends, with their dial bookkeeping.
    pub peers: BTreeMap<NodeId, Slot>,
    pub sessions: SessionTable,
    /// A friend was connected since the socket was bound (Reconnecting rather than Listening).
    pub was_online: bool,
}

impl Default for NetworkConnector {
    fn default() -> Self {
        NetworkConnector::new(NodeId::from_signing_key(&[0; 32]))
    }
}

impl NetworkConnector {
    pub fn new(me: NodeId) -> Self {
        NetworkConnector {
            me,
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(300),
            peers: BTreeMap::new(),
            sessions: SessionTable::default(),
            was_online: false,
        }
    }

    fn due(&self, now: Duration) -> impl Iterator<Item = NodeId> + '_ {
        self.peers
            .iter()
            .filter(move |(_, s)| !s.up && !s.dialing && s.next_dial <= now)
            .map(|(id, _)| *id)
    }

    /// Backoff after `attempts` failures: min × 2^(attempts-1), capped at max, then jittered by
    /// a factor in 0.5..=1.0 drawn from `random`.
    pub fn backoff(&self, attempts: u32, random: u64) -> Duration {
        let exp = attempts.saturating_sub(1).min(20);
        let base = self
            .reconnect_min
            .saturating_mul(1u32 << exp)
            .min(self.reconnect_max);
        let factor = 500 + (random % 1001) / 2; // permille, 500..=1000
        Duration::from_millis((base.as_millis() as u64).saturating_mul(factor) / 1000)
    }

    pub fn connected(&self) -> usize {
        self.peers.values().filter(|s| s.up).count()
    }

    /// Arms the one-shot dial timer at the earliest redial still to come.
    fn schedule_dial(&self, out: &mut Out<Self>) {
        let next = self
            .peers
            .values()
            .filter(|s| !s.up && !s.dialing)
            .map(|s| s.next_dial)
            .min();
        match next {
            Some(at) => out.set_timer(Timer::Dial, at),
            None => out.cancel_timer(Timer::Dial),
        }
    }

    fn peer_down(&mut self, peer: NodeId, ctx: &Ctx) {
        let attempts = self.peers.get(&peer).map_or(0, |s| s.attempts) + 1;
        let next_dial = ctx.now + self.backoff(attempts, ctx.random);
        if let Some(slot) = self.peers.get_mut(&peer) {
            *slot = Slot {
                up: false,
                dialing: false,
                attempts,
                next_dial,
            };
        }
    }

    fn session_up(
        &mut self,
        session: u64,
        peer: NodeId,
        outbound: bool,
        ctx: &Ctx,
        out: &mut Out<Self>,
    ) {
        let (close, became_up) = self.sessions.up(self.me, session, peer, outbound, ctx.now);
        if let Some(loser) = close {
            out.push(Output::Close(loser));
        }
        if became_up && let Some(slot) = self.peers.get_mut(&peer) {
            *slot = Slot {
                up: true,
                ..Slot::default()
            };
            self.was_online = true;
            out.push(Output::PeerUp(peer));
        }
    }

    fn session_down(
        &mut self,
        session: u64,
        peer: Option<NodeId>,
        dialed: Option<NodeId>,
        ctx: &Ctx,
        out: &mut Out<Self>,
    ) {
        let was_active = self.sessions.down(session);
        match (peer.or(dialed), was_active) {
            (Some(p), true) if self.peers.contains_key(&p) => {
                out.push(Output::PeerDown(p));
                self.peer_down(p, ctx);
            }
            // A dial that never came up, while no other session serves the peer: back off.
            (Some(p), false)
                if peer.is_none() && dialed == Some(p) && !self.sessions.is_active(&p) =>
            {
                self.peer_down(p, ctx);
            }
            _ => {}
        }
        self.schedule_dial(out);
    }
}

use State::*;
use To::State as Go;

const LIVE: &[State] = &[AtStartup, Binding, Listening, Online, Reconnecting, Offline];
/// Before the socket is bound (nothing is dialed yet).
const UNBOUND: &[State] = &[AtStartup, Binding, Offline];
const BOUND: &[State] = &[Listening, Online, Reconnecting];
const CONNECTIVITY: To<NetworkConnector> = To::Choose(Choice::Connectivity);

static ROWS: &[Row<NetworkConnector>] = &[
    row(&[AtStartup], EventKind::Start, Go(Binding), &[Action::Bind]),
    row(
        &[Binding],
        EventKind::Bound,
        CONNECTIVITY,
        &[Action::DialDue],
    ),
    row(
        &[Binding],
        EventKind::BindFailed,
        Go(Offline),
        &[Action::ReportBindFailure],
    ),
    row(&[Offline], EventKind::Timeout, Go(Binding), &[Action::Bind]),
    row(UNBOUND, EventKind::PeerAdded, To::Stay, &[Action::NotePeer]),
    row(
        BOUND,
        EventKind::PeerAdded,
        To::Stay,
        &[Action::NotePeer, Action::DialDue],
    ),
    row(BOUND, EventKind::Timeout, To::Stay, &[Action::DialDue]),
    row(
        BOUND,
        EventKind::SessionUp,
        CONNECTIVITY,
        &[Action::NoteSessionUp],
    ),
    row(
        BOUND,
        EventKind::SessionDown,
        CONNECTIVITY,
        &[Action::NoteSessionDown],
    ),
    row(
        BOUND,
        EventKind::DialFailed,
        To::Stay,
        &[Action::NoteSessionDown],
    ),
    row(
        BOUND,
        EventKind::PeerRemoved,
        CONNECTIVITY,
        &[Action::ForgetPeer],
    ),
    row(
        UNBOUND,
        EventKind::PeerRemoved,
        To::Stay,
        &[Action::ForgetPeer],
    ),
    row(
        UNBOUND,
        EventKind::SessionDown,
        To::Stay,
        &[Action::NoteSessionDown],
    ),
    row(LIVE, EventKind::Shutdown, Go(Closed), &[Action::CloseAll]),
];

static CHOICES: &[ChoiceRow<NetworkConnector>] = &[ChoiceRow {
    choice: Choice::Connectivity,
    targets: &[
        (Online, "a friend connected"),
        (Reconnecting, "none now, some before"),
        (Listening, "none yet"),
    ],
}];

static TIMERS: &[TimerRow<NetworkConnector>] = &[TimerRow {
    timer: Timer::Rebind,
    period: Duration::from_secs(5),
    config: None,
    states: &[Offline],
}];

impl Machine for NetworkConnector {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;
    type Choice = Choice;
    type Output = Output;

    const NAME: &'static str = "network_connector";
    const ABOUT: &'static str = "The node's presence on the network: binds the listening socket (retrying while it cannot), keeps a session with every friend, redials lost ones with capped exponential backoff and jitter (a one-shot Dial deadline), settles duplicate sessions and reports friends up and down.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timers() -> &'static [TimerRow<Self>] {
        TIMERS
    }

    fn choices() -> &'static [ChoiceRow<Self>] {
        CHOICES
    }

    fn timer_event(timer: Timer) -> Event {
        Event::Timeout(timer)
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn guard(&self, guard: Guard, _: &Event, _: &Ctx) -> bool {
        match guard {}
    }

    fn choose(&self, choice: Choice, _: &Ctx) -> State {
        match choice {
            Choice::Connectivity if self.connected() > 0 => Online,
            Choice::Connectivity if self.was_online => Reconnecting,
            Choice::Connectivity => Listening,
        }
    }

    fn apply(&mut self, action: Action, event: &Event, ctx: &Ctx, out: &mut Out<Self>) {
        match (action, event) {
            (Action::Bind, _) => out.push(Output::Bind),
            (Action::ReportBindFailure, Event::BindFailed(why)) => {
                out.push(Output::BindFailed(why.clone()))
            }
            (Action::NotePeer, Event::PeerAdded(peer)) => {
                // A stranger let in by the open policy may be connected already.
                let up = self.sessions.is_active(peer);
                if !self.peers.contains_key(peer) {
                    self.peers.insert(
                        *peer,
                        Slot {
                            up,
                            next_dial: ctx.now,
                            ..Slot::default()
                        },
                    );
                    if up {
                        self.was_online = true;
                        out.push(Output::PeerUp(*peer));
                    }
                }
                self.schedule_dial(out);
            }
            (Action::DialDue, _) => {
                let due: Vec<NodeId> = self.due(ctx.now).collect();
                for peer in due {
                    if let Some(slot) = self.peers.get_mut(&peer) {
                        slot.dialing = true;
                    }
                    out.push(Output::Dial(peer));
                }
                self.schedule_dial(out);
            }
            (
                Action::NoteSessionUp,
                Event::SessionUp {
                    session,
                    peer,
                    outbound,
                },
            ) => self.session_up(*session, *peer, *outbound, ctx, out),
            (
                Action::NoteSessionDown,
                Event::SessionDown {
                    session,
                    peer,
                    dialed,
                },
            ) => self.session_down(*session, *peer, *dialed, ctx, out),
            (Action::NoteSessionDown, Event::DialFailed(peer)) => {
                if !self.sessions.is_active(peer) {
                    self.peer_down(*peer, ctx);
                }
                self.schedule_dial(out);
            }
            (Action::ForgetPeer, Event::PeerRemoved(peer)) => {
                if self.peers.remove(peer).is_some_and(|s| s.up) {
                    out.push(Output::PeerDown(*peer));
                }
                out.push(Output::CloseSessionsOf(*peer));
                self.schedule_dial(out);
            }
            (Action::CloseAll, _) => out.push(Output::CloseAll),
            _ => {}
        }
    }

    fn invariant(&self, state: State) -> Result<(), Violation> {
        for (peer, slot) in &self.peers {
            if slot.up != self.sessions.is_active(peer) {
                return Err(format!("{peer}: up is {} but active is not", slot.up).into());
            }
            if slot.up && slot.dialing {
                return Err(format!("{peer}: up and dialing").into());
            }
        }
        for (peer, session) in &self.sessions.active {
            if self.sessions.sessions.get(session).map(|s| s.peer) != Some(*peer) {
                return Err(format!("{peer}: active session {session} is not its own").into());
            }
        }
        if state == Online && self.connected() == 0 {
            return Err("online with no friend connected".into());
        }
        Ok(())
    }

    fn sample_events() -> Vec<Event> {
        let a = NodeId::from_signing_key(&[1; 32]);
        let b = NodeId::from_signing_key(&[2; 32]);
        vec![
            Event::Start,
            Event::Bound,
            Event::BindFailed("address in use".into()),
            Event::Timeout(Timer::Rebind),
            Event::Timeout(Timer::Dial),
            Event::PeerAdded(a),
            Event::PeerRemoved(a),
            Event::PeerAdded(b),
            Event::SessionUp {
                session: 1,
                peer: a,
                outbound: true,
            },
            Event::SessionUp {
                session: 2,
                peer: a,
                outbound: false,
            },
            Event::SessionUp {
                session: 3,
                peer: b,
                outbound: true,
            },
            Event::SessionDown {
                session: 1,
                peer: Some(a),
                dialed: Some(a),
            },
            Event::SessionDown {
                session: 4,
                peer: None,
                dialed: Some(b),
            },
            Event::SessionDown {
                session: 3,
                peer: Some(b),
                dialed: Some(b),
            },
            Event::DialFailed(b),
            Event::Shutdown,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::Instance;

    fn peer(n: u8) -> NodeId {
        NodeId::from_signing_key(&[n; 32])
    }

    fn at(secs: u64) -> Ctx {
        Ctx::at(Duration::from_secs(secs))
    }

    fn ms(ms: u64) -> Ctx {
        Ctx::at(Duration::from_millis(ms))
    }

    /// Jitter drawn at its maximum: the delay is the full backoff.
    fn full_jitter(secs: u64) -> Ctx {
        Ctx {
            random: 1000,
            ..at(secs)
        }
    }

    fn dials(s: &crate::fsm::Stepped<NetworkConnector>) -> Vec<NodeId> {
        s.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Dial(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    fn up(m: &mut Instance<NetworkConnector>, session: u64, p: NodeId, outbound: bool, c: &Ctx) {
        m.step(
            &Event::SessionUp {
                session,
                peer: p,
                outbound,
            },
            c,
        );
    }

    #[test]
    fn binds_dials_and_goes_online() {
        let mut m = Instance::new(NetworkConnector::default(), "0");
        m.step(&Event::Start, &at(0));
        m.step(&Event::PeerAdded(peer(1)), &at(0));
        let s = m.step(&Event::Bound, &at(0)).expect("bound");
        assert_eq!(s.to, Listening);
        assert_eq!(dials(&s), vec![peer(1)]);
        // Already dialing: the dial deadline has nothing due.
        let s = m.step(&Event::Timeout(Timer::Dial), &at(1)).expect("tick");
        assert!(dials(&s).is_empty());
        m.step(
            &Event::SessionUp {
                session: 1,
                peer: peer(1),
                outbound: true,
            },
            &at(1),
        );
        assert_eq!(m.state(), Online);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let m = NetworkConnector::default();
        assert_eq!(m.backoff(1, 1000), Duration::from_secs(1));
        assert_eq!(m.backoff(2, 1000), Duration::from_secs(2));
        assert_eq!(m.backoff(4, 1000), Duration::from_secs(8));
        assert_eq!(m.backoff(4, 0), Duration::from_secs(4));
        assert_eq!(m.backoff(40, 1000), Duration::from_secs(300));
        assert!(m.backoff(40, 0) >= Duration::from_secs(150));
    }

    #[test]
    fn losing_the_last_peer_reconnects_after_backoff() {
        let mut m = Instance::new(NetworkConnector::default(), "0");
        m.start(Duration::ZERO);
        m.step(&Event::Start, &at(0));
        m.step(&Event::Bound, &at(0));
        m.step(&Event::PeerAdded(peer(1)), &at(0));
        up(&mut m, 1, peer(1), true, &at(0));
        let down = Event::SessionDown {
            session: 1,
            peer: Some(peer(1)),
            dialed: Some(peer(1)),
        };
        let s = m.step(&down, &full_jitter(10)).expect("down");
        assert_eq!(s.to, Reconnecting);
        assert_eq!(s.outputs, vec![Output::PeerDown(peer(1))]);
        // The redial is a one-shot deadline at the backoff, not a poll.
        let deadlines: Vec<_> = m.timers().deadlines().collect();
        assert_eq!(deadlines, vec![(Timer::Dial, Duration::from_secs(11))]);
        assert_eq!(m.due_timer(Duration::from_millis(10_500)), None);
        assert_eq!(m.due_timer(Duration::from_secs(11)), Some(Timer::Dial));
        let s = m.step(&Event::Timeout(Timer::Dial), &at(11)).expect("dial");
        assert_eq!(dials(&s), vec![peer(1)]);
        // A failed dial doubles the wait.
        m.step(
            &Event::SessionDown {
                session: 2,
                peer: None,
                dialed: Some(peer(1)),
            },
            &full_jitter(12),
        );
        assert_eq!(m.machine.peers[&peer(1)].next_dial, Duration::from_secs(14));
        up(&mut m, 3, peer(1), true, &at(14));
        assert_eq!(m.state(), Online);
        assert_eq!(m.machine.peers[&peer(1)].attempts, 0);
    }

    #[test]
    fn simultaneous_dials_keep_the_smaller_ids_connection_on_both_ends() {
        let (a, b) = (peer(1), peer(2));
        let (small, large) = if a < b { (a, b) } else { (b, a) };
        // On the smaller node, its own outbound session wins over the inbound one.
        let mut on_small = Instance::new(NetworkConnector::new(small), "s");
        on_small.step(&Event::Start, &at(0));
        on_small.step(&Event::Bound, &at(0));
        on_small.step(&Event::PeerAdded(large), &at(0));
        up(&mut on_small, 1, large, false, &ms(100));
        let s = on_small
            .step(
                &Event::SessionUp {
                    session: 2,
                    peer: large,
                    outbound: true,
                },
                &ms(200),
            )
            .expect("second");
        assert_eq!(s.outputs, vec![Output::Close(1)], "inbound one loses");
        assert_eq!(on_small.machine.sessions.active[&large], 2);
        // On the larger node, the inbound session (dialed by the smaller) wins.
        let mut on_large = Instance::new(NetworkConnector::new(large), "l");
        on_large.step(&Event::Start, &at(0));
        on_large.step(&Event::Bound, &at(0));
        on_large.step(&Event::PeerAdded(small), &at(0));
        up(&mut on_large, 1, small, true, &ms(100));
        let s = on_large
            .step(
                &Event::SessionUp {
                    session: 2,
                    peer: small,
                    outbound: false,
                },
                &ms(200),
            )
            .expect("second");
        assert_eq!(s.outputs, vec![Output::Close(1)], "its own dial loses");
        // And the other order: the loser is the newcomer.
        let s = on_large
            .step(
                &Event::SessionUp {
                    session: 3,
                    peer: small,
                    outbound: true,
                },
                &ms(300),
            )
            .expect("third");
        assert_eq!(s.outputs, vec![Output::Close(3)]);
        assert_eq!(on_large.machine.sessions.active[&small], 2);
    }

    #[test]
    fn an_old_session_gives_way_to_a_new_one_whatever_the_ids() {
        let (a, b) = (peer(1), peer(2));
        let (small, large) = if a < b { (a, b) } else { (b, a) };
        let mut m = Instance::new(NetworkConnector::new(small), "s");
        m.step(&Event::Start, &at(0));
        m.step(&Event::Bound, &at(0));
        m.step(&Event::PeerAdded(large), &at(0));
        up(&mut m, 1, large, true, &at(1));
        // Within the window an inbound newcomer loses on the smaller node ...
        assert!(!keep_new_session(
            small,
            large,
            false,
            Duration::from_secs(1),
            Duration::from_millis(5_999)
        ));
        // ... past it, the old session is presumed dead and the newcomer wins.
        let s = m
            .step(
                &Event::SessionUp {
                    session: 2,
                    peer: large,
                    outbound: false,
                },
                &at(7),
            )
            .expect("new");
        assert_eq!(s.outputs, vec![Output::Close(1)]);
        assert_eq!(m.machine.sessions.active[&large], 2);
        assert_eq!(m.state(), Online, "the peer never went down");
    }

    #[test]
    fn a_session_with_ourselves_is_closed_and_a_stranger_is_not_reported() {
        let me = peer(1);
        let mut m = Instance::new(NetworkConnector::new(me), "0");
        m.step(&Event::Start, &at(0));
        m.step(&Event::Bound, &at(0));
        let s = m
            .step(
                &Event::SessionUp {
                    session: 1,
                    peer: me,
                    outbound: true,
                },
                &at(1),
            )
            .expect("self");
        assert_eq!(s.outputs, vec![Output::Close(1)]);
        let s = m
            .step(
                &Event::SessionUp {
                    session: 2,
                    peer: peer(9),
                    outbound: false,
                },
                &at(1),
            )
            .expect("stranger");
        assert!(s.outputs.is_empty(), "no presence for a non-friend");
        assert_eq!(m.state(), Listening);
    }

    #[test]
    fn removing_a_connected_friend_reports_it_down_and_closes_its_sessions() {
        let mut m = Instance::new(NetworkConnector::default(), "0");
        m.step(&Event::Start, &at(0));
        m.step(&Event::Bound, &at(0));
        m.step(&Event::PeerAdded(peer(1)), &at(0));
        up(&mut m, 1, peer(1), true, &at(0));
        let s = m
            .step(&Event::PeerRemoved(peer(1)), &at(1))
            .expect("removed");
        assert_eq!(
            s.outputs,
            vec![Output::PeerDown(peer(1)), Output::CloseSessionsOf(peer(1))]
        );
        assert_eq!(s.to, Reconnecting);
    }
}
