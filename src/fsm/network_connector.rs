//! network_connector: the node's presence on the network — bind the listening socket (retrying
//! while it cannot), then keep a session with every known peer, redialing lost ones with capped
//! exponential backoff and jitter.

use std::collections::BTreeMap;
use std::time::Duration;

use super::machine::{Machine, Row, TimerRow};
use crate::crypto::identity::NodeId;
use crate::labels;

labels! {
    pub enum State { AtStartup, Binding, Listening, Online, Reconnecting, Offline, Closed }
}

labels! {
    pub enum EventKind { Start, Bound, BindFailed, RebindTick, DialTick, PeerAdded, PeerRemoved, PeerUp, PeerDown, Shutdown }
}

labels! {
    pub enum Guard {
        /// Some known peer is neither connected nor being dialed, and its backoff has passed.
        DialDue,
        /// The peer going down (or removed) is the last one connected.
        LastPeerDown,
    }
}

labels! {
    pub enum Action {
        /// Bind the listening socket (IO).
        Bind,
        /// Log why binding failed.
        ReportBindFailure,
        /// Add a peer to dial.
        NotePeer,
        /// Pick the peers that are due and dial each (IO).
        DialDue,
        /// A session with a peer is up: reset its backoff.
        NotePeerUp,
        /// A session ended (or never came up): schedule the next dial with backoff and jitter.
        NotePeerDown,
        /// Stop dialing a peer that is no longer a friend.
        ForgetPeer,
        /// Close every session and the listener (IO).
        CloseAll,
    }
}

labels! {
    pub enum Timer { Rebind, Dial }
}

#[derive(Debug, Clone)]
pub enum Event {
    Start,
    Bound {
        now: Duration,
    },
    BindFailed(String),
    RebindTick,
    DialTick {
        now: Duration,
    },
    /// A peer to keep a session with (from config, `peer add`, or an inbound customer).
    PeerAdded {
        peer: NodeId,
        now: Duration,
    },
    /// A friend removed (`peer remove`): no more dialing.
    PeerRemoved {
        peer: NodeId,
    },
    PeerUp {
        peer: NodeId,
    },
    /// `jitter` in 0..=1000 spreads redials: the delay is scaled by 0.5 + jitter/2000.
    PeerDown {
        peer: NodeId,
        now: Duration,
        jitter: u16,
    },
    Shutdown,
}

/// Dial bookkeeping for one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slot {
    pub up: bool,
    pub dialing: bool,
    /// Failed attempts since the last success.
    pub attempts: u32,
    pub next_dial: Duration,
}

#[derive(Debug, Clone)]
pub struct NetworkConnector {
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub peers: BTreeMap<NodeId, Slot>,
    /// Filled by `DialDue`: the peers the shell must dial now.
    pub to_dial: Vec<NodeId>,
    pub bind_failure: Option<String>,
}

impl Default for NetworkConnector {
    fn default() -> Self {
        NetworkConnector {
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(300),
            peers: BTreeMap::new(),
            to_dial: Vec::new(),
            bind_failure: None,
        }
    }
}

impl NetworkConnector {
    fn event_now(event: &Event) -> Option<Duration> {
        match event {
            Event::Bound { now } | Event::DialTick { now } | Event::PeerAdded { now, .. } => {
                Some(*now)
            }
            _ => None,
        }
    }

    fn due(&self, now: Duration) -> impl Iterator<Item = NodeId> + '_ {
        self.peers
            .iter()
            .filter(move |(_, s)| !s.up && !s.dialing && s.next_dial <= now)
            .map(|(id, _)| *id)
    }

    /// Backoff after `attempts` failures: min × 2^(attempts-1), capped at max, then jittered.
    pub fn backoff(&self, attempts: u32, jitter: u16) -> Duration {
        let exp = attempts.saturating_sub(1).min(20);
        let base = self
            .reconnect_min
            .saturating_mul(1u32 << exp)
            .min(self.reconnect_max);
        let factor = 500 + u64::from(jitter.min(1000)) / 2; // permille, 500..=1000
        Duration::from_millis((base.as_millis() as u64).saturating_mul(factor) / 1000)
    }

    pub fn connected(&self) -> usize {
        self.peers.values().filter(|s| s.up).count()
    }
}

use State::*;

const LIVE: &[State] = &[AtStartup, Binding, Listening, Online, Reconnecting, Offline];

static ROWS: &[Row<NetworkConnector>] = &[
    Row {
        from: &[AtStartup],
        event: EventKind::Start,
        guard: None,
        to: Binding,
        actions: &[Action::Bind],
    },
    Row {
        from: &[Binding],
        event: EventKind::Bound,
        guard: None,
        to: Listening,
        actions: &[Action::DialDue],
    },
    Row {
        from: &[Binding],
        event: EventKind::BindFailed,
        guard: None,
        to: Offline,
        actions: &[Action::ReportBindFailure],
    },
    Row {
        from: &[Offline],
        event: EventKind::RebindTick,
        guard: None,
        to: Binding,
        actions: &[Action::Bind],
    },
    Row {
        from: &[AtStartup],
        event: EventKind::PeerAdded,
        guard: None,
        to: AtStartup,
        actions: &[Action::NotePeer],
    },
    Row {
        from: &[Binding],
        event: EventKind::PeerAdded,
        guard: None,
        to: Binding,
        actions: &[Action::NotePeer],
    },
    Row {
        from: &[Offline],
        event: EventKind::PeerAdded,
        guard: None,
        to: Offline,
        actions: &[Action::NotePeer],
    },
    Row {
        from: &[Listening],
        event: EventKind::PeerAdded,
        guard: None,
        to: Listening,
        actions: &[Action::NotePeer, Action::DialDue],
    },
    Row {
        from: &[Online],
        event: EventKind::PeerAdded,
        guard: None,
        to: Online,
        actions: &[Action::NotePeer, Action::DialDue],
    },
    Row {
        from: &[Reconnecting],
        event: EventKind::PeerAdded,
        guard: None,
        to: Reconnecting,
        actions: &[Action::NotePeer, Action::DialDue],
    },
    Row {
        from: &[Listening],
        event: EventKind::DialTick,
        guard: Some(Guard::DialDue),
        to: Listening,
        actions: &[Action::DialDue],
    },
    Row {
        from: &[Online],
        event: EventKind::DialTick,
        guard: Some(Guard::DialDue),
        to: Online,
        actions: &[Action::DialDue],
    },
    Row {
        from: &[Reconnecting],
        event: EventKind::DialTick,
        guard: Some(Guard::DialDue),
        to: Reconnecting,
        actions: &[Action::DialDue],
    },
    Row {
        from: &[Listening, Online, Reconnecting],
        event: EventKind::PeerUp,
        guard: None,
        to: Online,
        actions: &[Action::NotePeerUp],
    },
    Row {
        from: &[Online],
        event: EventKind::PeerDown,
        guard: Some(Guard::LastPeerDown),
        to: Reconnecting,
        actions: &[Action::NotePeerDown],
    },
    Row {
        from: &[Online],
        event: EventKind::PeerDown,
        guard: None,
        to: Online,
        actions: &[Action::NotePeerDown],
    },
    Row {
        from: &[Listening],
        event: EventKind::PeerDown,
        guard: None,
        to: Listening,
        actions: &[Action::NotePeerDown],
    },
    Row {
        from: &[Reconnecting],
        event: EventKind::PeerDown,
        guard: None,
        to: Reconnecting,
        actions: &[Action::NotePeerDown],
    },
    Row {
        from: &[Online],
        event: EventKind::PeerRemoved,
        guard: Some(Guard::LastPeerDown),
        to: Reconnecting,
        actions: &[Action::ForgetPeer],
    },
    Row {
        from: &[Online],
        event: EventKind::PeerRemoved,
        guard: None,
        to: Online,
        actions: &[Action::ForgetPeer],
    },
    Row {
        from: &[AtStartup],
        event: EventKind::PeerRemoved,
        guard: None,
        to: AtStartup,
        actions: &[Action::ForgetPeer],
    },
    Row {
        from: &[Binding],
        event: EventKind::PeerRemoved,
        guard: None,
        to: Binding,
        actions: &[Action::ForgetPeer],
    },
    Row {
        from: &[Listening],
        event: EventKind::PeerRemoved,
        guard: None,
        to: Listening,
        actions: &[Action::ForgetPeer],
    },
    Row {
        from: &[Reconnecting],
        event: EventKind::PeerRemoved,
        guard: None,
        to: Reconnecting,
        actions: &[Action::ForgetPeer],
    },
    Row {
        from: &[Offline],
        event: EventKind::PeerRemoved,
        guard: None,
        to: Offline,
        actions: &[Action::ForgetPeer],
    },
    Row {
        from: LIVE,
        event: EventKind::Shutdown,
        guard: None,
        to: Closed,
        actions: &[Action::CloseAll],
    },
];

static TIMERS: &[TimerRow<NetworkConnector>] = &[
    TimerRow {
        timer: Timer::Rebind,
        period: Duration::from_secs(5),
        states: &[Offline],
    },
    TimerRow {
        timer: Timer::Dial,
        period: Duration::from_secs(1),
        states: &[Listening, Online, Reconnecting],
    },
];

impl Machine for NetworkConnector {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;

    const NAME: &'static str = "network_connector";
    const ABOUT: &'static str = "The node's presence on the network: binds the listening socket (retrying while it cannot), keeps a session with every known peer, and redials lost ones with capped exponential backoff and jitter.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timers() -> &'static [TimerRow<Self>] {
        TIMERS
    }

    fn kind(event: &Event) -> EventKind {
        match event {
            Event::Start => EventKind::Start,
            Event::Bound { .. } => EventKind::Bound,
            Event::BindFailed(_) => EventKind::BindFailed,
            Event::RebindTick => EventKind::RebindTick,
            Event::DialTick { .. } => EventKind::DialTick,
            Event::PeerAdded { .. } => EventKind::PeerAdded,
            Event::PeerRemoved { .. } => EventKind::PeerRemoved,
            Event::PeerUp { .. } => EventKind::PeerUp,
            Event::PeerDown { .. } => EventKind::PeerDown,
            Event::Shutdown => EventKind::Shutdown,
        }
    }

    fn timer_event(timer: Timer, now: Duration) -> Event {
        match timer {
            Timer::Rebind => Event::RebindTick,
            Timer::Dial => Event::DialTick { now },
        }
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn guard(&self, guard: Guard, event: &Event) -> bool {
        match (guard, event) {
            (Guard::DialDue, e) => {
                Self::event_now(e).is_some_and(|now| self.due(now).next().is_some())
            }
            (Guard::LastPeerDown, Event::PeerDown { peer, .. } | Event::PeerRemoved { peer }) => {
                self.connected() == 1 && self.peers.get(peer).is_some_and(|s| s.up)
            }
            _ => false,
        }
    }

    fn apply(&mut self, action: Action, event: &Event) {
        match (action, event) {
            (Action::ForgetPeer, Event::PeerRemoved { peer }) => {
                self.peers.remove(peer);
            }
            (Action::NotePeer, Event::PeerAdded { peer, now }) => {
                self.peers.entry(*peer).or_insert(Slot {
                    next_dial: *now,
                    ..Slot::default()
                });
            }
            (Action::DialDue, e) => {
                self.to_dial.clear();
                if let Some(now) = Self::event_now(e) {
                    self.to_dial = self.due(now).collect();
                    for id in &self.to_dial {
                        if let Some(slot) = self.peers.get_mut(id) {
                            slot.dialing = true;
                        }
                    }
                }
            }
            (Action::NotePeerUp, Event::PeerUp { peer }) => {
                let slot = self.peers.entry(*peer).or_default();
                slot.up = true;
                slot.dialing = false;
                slot.attempts = 0;
            }
            (Action::NotePeerDown, Event::PeerDown { peer, now, jitter }) => {
                let next = {
                    let attempts = self.peers.get(peer).map_or(0, |s| s.attempts) + 1;
                    (attempts, *now + self.backoff(attempts, *jitter))
                };
                if let Some(slot) = self.peers.get_mut(peer) {
                    slot.up = false;
                    slot.dialing = false;
                    slot.attempts = next.0;
                    slot.next_dial = next.1;
                }
            }
            (Action::ReportBindFailure, Event::BindFailed(why)) => {
                self.bind_failure = Some(why.clone())
            }
            _ => {}
        }
    }

    fn sample_events() -> Vec<Event> {
        let a = NodeId::from_signing_key(&[1; 32]);
        let b = NodeId::from_signing_key(&[2; 32]);
        let s = Duration::from_secs;
        vec![
            Event::Start,
            Event::Bound { now: s(0) },
            Event::BindFailed("address in use".into()),
            Event::RebindTick,
            Event::DialTick { now: s(2) },
            Event::DialTick { now: s(600) },
            Event::PeerAdded { peer: a, now: s(1) },
            Event::PeerRemoved { peer: a },
            Event::PeerAdded { peer: b, now: s(1) },
            Event::PeerUp { peer: a },
            Event::PeerUp { peer: b },
            Event::PeerDown {
                peer: a,
                now: s(3),
                jitter: 0,
            },
            Event::PeerDown {
                peer: b,
                now: s(4),
                jitter: 1000,
            },
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

    #[test]
    fn binds_dials_and_goes_online() {
        let mut m = Instance::new(NetworkConnector::default(), "0");
        m.step(&Event::Start);
        m.step(&Event::PeerAdded {
            peer: peer(1),
            now: Duration::ZERO,
        });
        let s = m
            .step(&Event::Bound {
                now: Duration::ZERO,
            })
            .expect("bound");
        assert_eq!(s.to, Listening);
        assert_eq!(m.machine.to_dial, vec![peer(1)]);
        // Already dialing: the next tick has nothing due.
        assert!(
            m.step(&Event::DialTick {
                now: Duration::from_secs(1)
            })
            .is_none()
        );
        assert_eq!(
            m.step(&Event::PeerUp { peer: peer(1) }).map(|s| s.to),
            Some(Online)
        );
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
        m.step(&Event::Start);
        m.step(&Event::Bound {
            now: Duration::ZERO,
        });
        m.step(&Event::PeerAdded {
            peer: peer(1),
            now: Duration::ZERO,
        });
        m.step(&Event::PeerUp { peer: peer(1) });
        let now = Duration::from_secs(10);
        let s = m
            .step(&Event::PeerDown {
                peer: peer(1),
                now,
                jitter: 1000,
            })
            .expect("down");
        assert_eq!(s.to, Reconnecting);
        // Not due before the backoff has passed.
        assert!(
            m.step(&Event::DialTick {
                now: now + Duration::from_millis(500)
            })
            .is_none()
        );
        m.step(&Event::DialTick {
            now: now + Duration::from_secs(1),
        })
        .expect("dial");
        assert_eq!(m.machine.to_dial, vec![peer(1)]);
        // A failed dial doubles the wait.
        m.step(&Event::PeerDown {
            peer: peer(1),
            now: now + Duration::from_secs(2),
            jitter: 1000,
        });
        assert_eq!(
            m.machine.peers[&peer(1)].next_dial,
            now + Duration::from_secs(4)
        );
        assert_eq!(
            m.step(&Event::PeerUp { peer: peer(1) }).map(|s| s.to),
            Some(Online)
        );
        assert_eq!(m.machine.peers[&peer(1)].attempts, 0);
    }
}
