//! fire_hire: keeps one supplier hired per fragment position (k + m of them), choosing among
//! trusted peers that are online and not already used, never two positions on one node; backs
//! off from suppliers that refused; replaces suppliers that refuse, leave or are fired (the
//! monitor fires through the `Fire` event).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::machine::{Machine, Row, TimerRow};
use crate::crypto::identity::NodeId;
use crate::labels;

labels! {
    pub enum State { AtStartup, Hiring, Waiting, Ready, Closed }
}

labels! {
    pub enum EventKind { Start, CandidateUp, CandidateDown, Hired, Refused, Fire, Tick, Shutdown }
}

labels! {
    pub enum Guard {
        /// After this event, a position is empty, no hire is in flight and a candidate is free.
        CanHire,
        /// After this event, a hire is still in flight.
        StillHiring,
        /// After this event, some position is empty.
        NeedHire,
    }
}

labels! {
    pub enum Action {
        /// Record what the event says (candidates, hires, refusals, firings).
        Note,
        /// Start the connectors of the contracts loaded at start (IO).
        Resume,
        /// Pick a free candidate for the first empty position and start its connector (IO).
        HireOne,
        /// Let the refused or fired supplier go: dismiss its connector (IO).
        Dismiss,
        /// Persist the positions (IO).
        Save,
    }
}

labels! {
    pub enum Timer { Retry }
}

/// One position's supplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hire {
    pub supplier: NodeId,
    /// The supplier accepted the contract (at least once).
    pub confirmed: bool,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// Contracts persisted by an earlier run, by position.
    Start {
        now: Duration,
        resumed: Vec<(u32, NodeId)>,
    },
    CandidateUp(NodeId),
    CandidateDown(NodeId),
    Hired {
        position: u32,
        supplier: NodeId,
    },
    /// The supplier refused, never answered, or left the contract.
    Refused {
        position: u32,
        supplier: NodeId,
        now: Duration,
    },
    /// Replace the supplier at `position` (the monitor's decision, or the operator's).
    Fire {
        position: u32,
        now: Duration,
    },
    Tick {
        now: Duration,
    },
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct FireHire {
    pub slots: Vec<Option<Hire>>,
    pub candidates: BTreeSet<NodeId>,
    /// Suppliers not to ask again before a time: (failures, until).
    pub cooldown: BTreeMap<NodeId, (u32, Duration)>,
    /// The hire in flight: (position, supplier).
    pub pending: Option<(u32, NodeId)>,
    /// Filled by `Note` for `Dismiss`: the supplier to let go, by position.
    pub dismiss: Option<(u32, NodeId)>,
    /// Filled by `Resume`: contracts to reconnect.
    pub resumed: Vec<(u32, NodeId)>,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub now: Duration,
}

impl Default for FireHire {
    /// The default layout: 4 data + 2 parity positions.
    fn default() -> Self {
        FireHire::new(6)
    }
}

impl FireHire {
    pub fn new(positions: usize) -> Self {
        FireHire {
            slots: vec![None; positions],
            candidates: BTreeSet::new(),
            cooldown: BTreeMap::new(),
            pending: None,
            dismiss: None,
            resumed: Vec::new(),
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(600),
            now: Duration::ZERO,
        }
    }

    fn used(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.slots.iter().flatten().map(|h| h.supplier)
    }

    /// The candidate to hire next: online, trusted, unused, not cooling down. Deterministic.
    pub fn free_candidate(&self) -> Option<NodeId> {
        let used: BTreeSet<NodeId> = self.used().collect();
        self.candidates
            .iter()
            .find(|c| {
                !used.contains(c)
                    && self
                        .cooldown
                        .get(c)
                        .is_none_or(|(_, until)| *until <= self.now)
            })
            .copied()
    }

    pub fn empty_position(&self) -> Option<u32> {
        self.slots
            .iter()
            .position(Option::is_none)
            .map(|p| p as u32)
    }

    fn can_hire(&self) -> bool {
        self.pending.is_none() && self.empty_position().is_some() && self.free_candidate().is_some()
    }

    fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        self.retry_min.saturating_mul(1 << exp).min(self.retry_max)
    }

    fn cool(&mut self, supplier: NodeId, now: Duration) {
        let failures = self.cooldown.get(&supplier).map_or(0, |(f, _)| *f) + 1;
        let until = now + self.backoff(failures);
        self.cooldown.insert(supplier, (failures, until));
    }

    /// The bookkeeping of `Note`.
    fn note(&mut self, event: &Event) {
        self.dismiss = None;
        match event {
            Event::Start { now, resumed } => {
                self.now = *now;
                for (position, supplier) in resumed {
                    let taken = self.used().any(|s| s == *supplier);
                    if let Some(slot) = self
                        .slots
                        .get_mut(*position as usize)
                        .filter(|s| s.is_none())
                        && !taken
                    {
                        *slot = Some(Hire {
                            supplier: *supplier,
                            confirmed: true,
                        });
                    }
                }
            }
            Event::CandidateUp(id) => {
                self.candidates.insert(*id);
            }
            Event::CandidateDown(id) => {
                self.candidates.remove(id);
            }
            Event::Hired { position, supplier } => {
                if self.pending == Some((*position, *supplier)) {
                    self.pending = None;
                }
                if let Some(Some(hire)) = self.slots.get_mut(*position as usize)
                    && hire.supplier == *supplier
                {
                    hire.confirmed = true;
                    self.cooldown.remove(supplier);
                }
            }
            Event::Refused {
                position,
                supplier,
                now,
            } => {
                self.now = *now;
                if self.pending == Some((*position, *supplier)) {
                    self.pending = None;
                }
                if let Some(slot) = self.slots.get_mut(*position as usize)
                    && slot.is_some_and(|h| h.supplier == *supplier)
                {
                    *slot = None;
                    self.dismiss = Some((*position, *supplier));
                }
                self.cool(*supplier, *now);
            }
            Event::Fire { position, now } => {
                self.now = *now;
                if let Some(slot) = self.slots.get_mut(*position as usize)
                    && let Some(hire) = slot.take()
                {
                    if self.pending == Some((*position, hire.supplier)) {
                        self.pending = None;
                    }
                    self.dismiss = Some((*position, hire.supplier));
                    self.cool(hire.supplier, *now);
                }
            }
            Event::Tick { now } => self.now = *now,
            Event::Shutdown => {}
        }
    }

    fn after(&self, event: &Event) -> FireHire {
        let mut next = self.clone();
        next.note(event);
        next
    }

    /// No supplier holds two positions (checked by the simulation after every step).
    pub fn positions_are_distinct(&self) -> bool {
        let used: Vec<NodeId> = self.used().collect();
        let set: BTreeSet<NodeId> = used.iter().copied().collect();
        used.len() == set.len()
    }
}

use State::*;

const LIVE: &[State] = &[AtStartup, Hiring, Waiting, Ready];

macro_rules! decide {
    ($from:expr, $event:expr, $($act:expr),*) => {
        [
            Row { from: $from, event: $event, guard: Some(Guard::CanHire), to: Hiring, actions: &[$($act,)* Action::HireOne, Action::Save] },
            Row { from: $from, event: $event, guard: Some(Guard::StillHiring), to: Hiring, actions: &[$($act,)* Action::Save] },
            Row { from: $from, event: $event, guard: Some(Guard::NeedHire), to: Waiting, actions: &[$($act,)* Action::Save] },
            Row { from: $from, event: $event, guard: None, to: Ready, actions: &[$($act,)* Action::Save] },
        ]
    };
}

static START: [Row<FireHire>; 4] =
    decide!(&[AtStartup], EventKind::Start, Action::Note, Action::Resume);
static HIRED: [Row<FireHire>; 4] =
    decide!(&[Hiring, Waiting, Ready], EventKind::Hired, Action::Note);
static REFUSED: [Row<FireHire>; 4] = decide!(
    &[Hiring, Waiting, Ready],
    EventKind::Refused,
    Action::Note,
    Action::Dismiss
);
static FIRE: [Row<FireHire>; 4] = decide!(
    &[Hiring, Waiting, Ready],
    EventKind::Fire,
    Action::Note,
    Action::Dismiss
);

static OTHER: &[Row<FireHire>] = &[
    Row {
        from: &[Waiting],
        event: EventKind::CandidateUp,
        guard: Some(Guard::CanHire),
        to: Hiring,
        actions: &[Action::Note, Action::HireOne, Action::Save],
    },
    Row {
        from: &[Waiting],
        event: EventKind::Tick,
        guard: Some(Guard::CanHire),
        to: Hiring,
        actions: &[Action::Note, Action::HireOne, Action::Save],
    },
    Row {
        from: &[AtStartup],
        event: EventKind::CandidateUp,
        guard: None,
        to: AtStartup,
        actions: &[Action::Note],
    },
    Row {
        from: &[AtStartup],
        event: EventKind::CandidateDown,
        guard: None,
        to: AtStartup,
        actions: &[Action::Note],
    },
    Row {
        from: &[Waiting],
        event: EventKind::CandidateUp,
        guard: None,
        to: Waiting,
        actions: &[Action::Note],
    },
    Row {
        from: &[Hiring],
        event: EventKind::CandidateUp,
        guard: None,
        to: Hiring,
        actions: &[Action::Note],
    },
    Row {
        from: &[Ready],
        event: EventKind::CandidateUp,
        guard: None,
        to: Ready,
        actions: &[Action::Note],
    },
    Row {
        from: &[Waiting],
        event: EventKind::CandidateDown,
        guard: None,
        to: Waiting,
        actions: &[Action::Note],
    },
    Row {
        from: &[Hiring],
        event: EventKind::CandidateDown,
        guard: None,
        to: Hiring,
        actions: &[Action::Note],
    },
    Row {
        from: &[Ready],
        event: EventKind::CandidateDown,
        guard: None,
        to: Ready,
        actions: &[Action::Note],
    },
    Row {
        from: LIVE,
        event: EventKind::Shutdown,
        guard: None,
        to: Closed,
        actions: &[],
    },
];

static TIMERS: &[TimerRow<FireHire>] = &[TimerRow {
    timer: Timer::Retry,
    period: Duration::from_secs(5),
    states: &[Waiting],
}];

fn all_rows() -> &'static [Row<FireHire>] {
    static ROWS: std::sync::OnceLock<Vec<Row<FireHire>>> = std::sync::OnceLock::new();
    ROWS.get_or_init(|| {
        let mut rows = Vec::new();
        for group in [&START, &HIRED, &REFUSED, &FIRE] {
            rows.extend(group.iter().map(Row::copy));
        }
        rows.extend(OTHER.iter().map(Row::copy));
        rows
    })
}

impl Machine for FireHire {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;

    const NAME: &'static str = "fire_hire";
    const ABOUT: &'static str = "Keeps one supplier hired per fragment position, choosing among trusted online peers not already used (never two positions on one node); backs off from suppliers that refused; replaces suppliers that refuse, leave or are fired.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        all_rows()
    }

    fn timers() -> &'static [TimerRow<Self>] {
        TIMERS
    }

    fn kind(event: &Event) -> EventKind {
        match event {
            Event::Start { .. } => EventKind::Start,
            Event::CandidateUp(_) => EventKind::CandidateUp,
            Event::CandidateDown(_) => EventKind::CandidateDown,
            Event::Hired { .. } => EventKind::Hired,
            Event::Refused { .. } => EventKind::Refused,
            Event::Fire { .. } => EventKind::Fire,
            Event::Tick { .. } => EventKind::Tick,
            Event::Shutdown => EventKind::Shutdown,
        }
    }

    fn timer_event(_timer: Timer, now: Duration) -> Event {
        Event::Tick { now }
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn timer_period(&self, _timer: Timer) -> Duration {
        self.retry_min
    }

    fn guard(&self, guard: Guard, event: &Event) -> bool {
        let next = self.after(event);
        match guard {
            Guard::CanHire => next.can_hire(),
            Guard::StillHiring => next.pending.is_some(),
            Guard::NeedHire => next.empty_position().is_some(),
        }
    }

    fn apply(&mut self, action: Action, event: &Event) {
        match action {
            Action::Note => self.note(event),
            Action::Resume => {
                self.resumed = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter_map(|(p, h)| h.map(|h| (p as u32, h.supplier)))
                    .collect();
            }
            Action::HireOne => {
                if let (Some(position), Some(supplier)) =
                    (self.empty_position(), self.free_candidate())
                {
                    self.slots[position as usize] = Some(Hire {
                        supplier,
                        confirmed: false,
                    });
                    self.pending = Some((position, supplier));
                }
            }
            Action::Dismiss | Action::Save => {}
        }
    }

    fn sample_events() -> Vec<Event> {
        let ids: Vec<NodeId> = (1..=4u8)
            .map(|i| NodeId::from_signing_key(&[i; 32]))
            .collect();
        let s = Duration::from_secs;
        vec![
            Event::Start {
                now: s(0),
                resumed: vec![],
            },
            Event::Start {
                now: s(0),
                resumed: vec![(0, ids[0])],
            },
            Event::CandidateUp(ids[0]),
            Event::CandidateUp(ids[1]),
            Event::CandidateUp(ids[2]),
            Event::CandidateDown(ids[1]),
            Event::Hired {
                position: 0,
                supplier: ids[0],
            },
            Event::Hired {
                position: 1,
                supplier: ids[1],
            },
            Event::Refused {
                position: 0,
                supplier: ids[0],
                now: s(10),
            },
            Event::Refused {
                position: 1,
                supplier: ids[2],
                now: s(20),
            },
            Event::Fire {
                position: 1,
                now: s(30),
            },
            Event::Tick { now: s(1000) },
            Event::Shutdown,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::Instance;

    fn id(n: u8) -> NodeId {
        NodeId::from_signing_key(&[n; 32])
    }

    fn started(positions: usize, candidates: &[u8]) -> Instance<FireHire> {
        let mut m = Instance::new(FireHire::new(positions), "0");
        for &c in candidates {
            m.step(&Event::CandidateUp(id(c)));
        }
        m.step(&Event::Start {
            now: Duration::ZERO,
            resumed: vec![],
        });
        m
    }

    #[test]
    fn hires_one_distinct_supplier_per_position() {
        let mut m = started(3, &[1, 2, 3, 4]);
        for _ in 0..3 {
            let (position, supplier) = m.machine.pending.expect("hiring");
            m.step(&Event::Hired { position, supplier });
            assert!(m.machine.positions_are_distinct());
        }
        assert_eq!(m.state(), Ready);
        assert!(
            m.machine
                .slots
                .iter()
                .all(|s| s.is_some_and(|h| h.confirmed))
        );
    }

    #[test]
    fn refusal_moves_on_and_backs_off() {
        let mut m = started(1, &[1, 2]);
        let (position, first) = m.machine.pending.expect("hiring");
        m.step(&Event::Refused {
            position,
            supplier: first,
            now: Duration::from_secs(1),
        });
        assert_eq!(m.machine.dismiss, Some((position, first)));
        let (_, second) = m.machine.pending.expect("hires the other");
        assert_ne!(first, second);
        m.step(&Event::Refused {
            position,
            supplier: second,
            now: Duration::from_secs(2),
        });
        assert_eq!(m.state(), Waiting, "both cooling down");
        assert!(
            m.step(&Event::Tick {
                now: Duration::from_secs(3)
            })
            .is_none()
        );
        assert_eq!(
            m.step(&Event::Tick {
                now: Duration::from_secs(10)
            })
            .map(|s| s.to),
            Some(Hiring)
        );
    }

    #[test]
    fn no_candidate_waits_and_a_new_peer_is_hired() {
        let mut m = started(2, &[1]);
        let (p, s) = m.machine.pending.expect("hiring");
        m.step(&Event::Hired {
            position: p,
            supplier: s,
        });
        assert_eq!(m.state(), Waiting);
        assert_eq!(
            m.step(&Event::CandidateUp(id(2))).map(|s| s.to),
            Some(Hiring)
        );
    }

    #[test]
    fn fire_replaces_and_resumed_contracts_are_kept() {
        let mut m = Instance::new(FireHire::new(2), "0");
        m.step(&Event::CandidateUp(id(3)));
        let s = m
            .step(&Event::Start {
                now: Duration::ZERO,
                resumed: vec![(0, id(1)), (1, id(2))],
            })
            .expect("start");
        assert_eq!(s.to, Ready, "resumed contracts need no hiring");
        assert_eq!(m.machine.resumed.len(), 2);
        let s = m
            .step(&Event::Fire {
                position: 1,
                now: Duration::from_secs(5),
            })
            .expect("fire");
        assert_eq!(s.to, Hiring);
        assert_eq!(m.machine.dismiss, Some((1, id(2))));
        assert_eq!(m.machine.pending, Some((1, id(3))));
    }
}
