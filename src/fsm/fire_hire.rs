//! fire_hire: keeps one supplier hired per fragment position (k + m of them), choosing among
//! trusted peers that are online and not already used, never two positions on one node; backs
//! off from suppliers that refused; replaces suppliers that refuse, leave or are fired (the
//! monitor fires through the `Fire` event).
//!
//! It also owns the bookkeeping of its supplier_connector instances: which instance holds which
//! position, which were dismissed and are still cancelling (not hireable until they close: the
//! cancel and a new request could reach the supplier in either order), and which reports are
//! stale (from an instance that no longer holds its position).
//!
//! From its connectors' reports it knows which positions' suppliers are up (their contract
//! confirmed and their connector connected) and says so: every change is an
//! [`Output::Position`], and [`FireHire::positions`] is the same knowledge at one instant (the
//! snapshot a subscriber starts from). Nobody needs to read a connector's state to know it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::machine::{ChoiceRow, Ctx, Machine, Out, Row, To, Violation, row};
use super::supplier_connector::{self as sc, Report};
use crate::crypto::identity::NodeId;
use crate::{events, labels};

labels! {
    pub enum State { AtStartup, Hiring, Waiting, Ready, Closed }
}

events! {
    pub enum Event / EventKind {
        /// Contracts persisted by an earlier run, by position.
        Start { resumed: Vec<(u32, NodeId)> },
        /// A trusted peer is online (a candidate for hiring).
        CandidateUp(NodeId),
        CandidateDown(NodeId),
        /// News from the connector `instance`.
        Report { instance: u64, report: Report },
        /// Replace the supplier at `position` (the monitor's decision, or the operator's).
        Fire { position: u32 },
        /// A supplier ended our contract with it.
        SupplierLeft(NodeId),
        Timeout(Timer),
        Shutdown,
    }
}

labels! {
    pub enum Guard {}
}

labels! {
    pub enum Action {
        /// Record what the event says (candidates, hires, refusals, firings); pass presence and
        /// dismissals on to the connectors concerned; say which positions came up or went down.
        Note,
        /// Start the connectors of the contracts loaded at start (IO).
        Resume,
        /// Pick a free candidate for the first empty position and start its connector (IO); with
        /// none free, wake up when the first one cools down.
        HireOne,
        /// Persist the positions if they changed (IO).
        Save,
        /// The node stops: every connector closes, keeping its contract.
        StopConnectors,
    }
}

labels! {
    pub enum Timer { Retry }
}

labels! {
    pub enum Choice {
        Staffing,
    }
}

/// One position's supplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hire {
    pub supplier: NodeId,
    /// The supplier accepted the contract (at least once).
    pub confirmed: bool,
    /// The connector instance that holds the contract.
    pub instance: u64,
    /// Its connector reported `Connected` and nothing since: the supplier serves us now.
    pub up: bool,
}

/// A position's supplier and whether it serves us now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub position: u32,
    pub supplier: NodeId,
    pub up: bool,
}

/// What fire_hire's driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Start a connector for `supplier` at `position`.
    StartConnector {
        instance: u64,
        position: u32,
        supplier: NodeId,
        /// The supplier accepted this contract in an earlier run.
        resumed: bool,
        peer_up: bool,
    },
    /// Deliver `event` to the connector `instance`.
    Tell {
        instance: u64,
        event: sc::Event,
    },
    /// Persist these positions: (supplier, confirmed) by position.
    Save(Vec<Option<(NodeId, bool)>>),
    /// A position's supplier came up or went down (for the subscribers, in order).
    Position(Position),
    StopConnectors,
}

#[derive(Debug, Clone)]
pub struct FireHire {
    pub slots: Vec<Option<Hire>>,
    pub candidates: BTreeSet<NodeId>,
    /// Suppliers not to ask again before a time: (failures, until).
    pub cooldown: BTreeMap<NodeId, (u32, Duration)>,
    /// Dismissed connectors still cancelling: instance -> (position, supplier).
    pub leaving: BTreeMap<u64, (u32, NodeId)>,
    pub next_instance: u64,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// The positions as last saved.
    saved: Option<Vec<Option<(NodeId, bool)>>>,
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
            leaving: BTreeMap::new(),
            next_instance: 1,
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(600),
            saved: None,
        }
    }

    fn used(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.slots.iter().flatten().map(|h| h.supplier)
    }

    /// The hire in flight (at most one at a time): (position, supplier).
    pub fn pending(&self) -> Option<(u32, NodeId)> {
        self.slots
            .iter()
            .enumerate()
            .find_map(|(p, h)| h.filter(|h| !h.confirmed).map(|h| (p as u32, h.supplier)))
    }

    /// Whether `supplier` may be hired at `now`: online, not holding a position, not still
    /// cancelling an earlier contract, not cooling down.
    pub fn eligible(&self, supplier: &NodeId, now: Duration) -> bool {
        self.candidates.contains(supplier)
            && !self.used().any(|s| s == *supplier)
            && !self.leaving.values().any(|(_, s)| s == supplier)
            && self
                .cooldown
                .get(supplier)
                .is_none_or(|(_, until)| *until <= now)
    }

    /// The candidate to hire next. Deterministic.
    pub fn free_candidate(&self, now: Duration) -> Option<NodeId> {
        self.candidates
            .iter()
            .find(|c| self.eligible(c, now))
            .copied()
    }

    /// Every held position and whether its supplier is up now, by position.
    pub fn positions(&self) -> Vec<Position> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(p, h)| {
                h.map(|h| Position {
                    position: p as u32,
                    supplier: h.supplier,
                    up: h.up,
                })
            })
            .collect()
    }

    /// Marks `position`'s supplier up or down; says so if that changed.
    fn set_up(&mut self, position: u32, up: bool, out: &mut Out<Self>) {
        if let Some(hire) = self
            .slots
            .get_mut(position as usize)
            .and_then(Option::as_mut)
            && hire.up != up
        {
            hire.up = up;
            out.push(Output::Position(Position {
                position,
                supplier: hire.supplier,
                up,
            }));
        }
    }

    /// Candidates that could be hired now (online, not used, not cooling down).
    pub fn spares(&self, now: Duration) -> usize {
        self.candidates
            .iter()
            .filter(|c| self.eligible(c, now))
            .count()
    }

    pub fn empty_position(&self) -> Option<u32> {
        self.slots
            .iter()
            .position(Option::is_none)
            .map(|p| p as u32)
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

    fn position_of(&self, instance: u64) -> Option<u32> {
        self.slots
            .iter()
            .position(|h| h.is_some_and(|h| h.instance == instance))
            .map(|p| p as u32)
    }

    /// Every connector that deals with `supplier`: the holder of a position and those leaving.
    fn connectors_of(&self, supplier: NodeId) -> Vec<u64> {
        let holders = self
            .slots
            .iter()
            .flatten()
            .filter(|h| h.supplier == supplier);
        let leaving = self.leaving.iter().filter(|(_, (_, s))| *s == supplier);
        holders
            .map(|h| h.instance)
            .chain(leaving.map(|(i, _)| *i))
            .collect()
    }

    fn start_connector(&mut self, position: u32, supplier: NodeId, confirmed: bool) -> Output {
        let instance = self.next_instance;
        self.next_instance += 1;
        self.slots[position as usize] = Some(Hire {
            supplier,
            confirmed,
            instance,
            up: false,
        });
        Output::StartConnector {
            instance,
            position,
            supplier,
            resumed: confirmed,
            peer_up: self.candidates.contains(&supplier),
        }
    }

    /// Frees `position` and lets its connector go.
    fn dismiss(&mut self, position: u32, now: Duration, out: &mut Out<Self>) {
        self.set_up(position, false, out);
        let Some(hire) = self.slots.get_mut(position as usize).and_then(Option::take) else {
            return;
        };
        self.leaving
            .insert(hire.instance, (position, hire.supplier));
        self.cool(hire.supplier, now);
        out.push(Output::Tell {
            instance: hire.instance,
            event: sc::Event::Dismiss,
        });
    }

    /// The bookkeeping of `Note`.
    fn note(&mut self, event: &Event, ctx: &Ctx, out: &mut Out<Self>) {
        match event {
            Event::Start { resumed } => {
                for (position, supplier) in resumed {
                    let taken = self.used().any(|s| s == *supplier);
                    let free = self
                        .slots
                        .get(*position as usize)
                        .is_some_and(Option::is_none);
                    if free && !taken {
                        self.slots[*position as usize] = Some(Hire {
                            supplier: *supplier,
                            confirmed: true,
                            instance: 0,
                            up: false,
                        });
                    }
                }
            }
            Event::CandidateUp(id) | Event::CandidateDown(id) => {
                let up = matches!(event, Event::CandidateUp(_));
                if up {
                    self.candidates.insert(*id);
                } else {
                    self.candidates.remove(id);
                }
                for instance in self.connectors_of(*id) {
                    let event = if up {
                        sc::Event::PeerUp
                    } else {
                        sc::Event::PeerDown
                    };
                    out.push(Output::Tell { instance, event });
                }
            }
            Event::Report { instance, report } => match self.position_of(*instance) {
                Some(position) => match report {
                    Report::Connected => {
                        if let Some(hire) = &mut self.slots[position as usize] {
                            hire.confirmed = true;
                            self.cooldown.remove(&hire.supplier);
                        }
                        self.set_up(position, true, out);
                    }
                    Report::Refused(_) | Report::Closed => self.dismiss(position, ctx.now, out),
                    Report::Disconnected => self.set_up(position, false, out),
                },
                // A dismissed connector finished cancelling: its supplier may be hired again.
                None if *report == Report::Closed => {
                    self.leaving.remove(instance);
                }
                // News from a connector that no longer holds its position is stale.
                None => {}
            },
            Event::Fire { position } => self.dismiss(*position, ctx.now, out),
            Event::SupplierLeft(supplier) => {
                for hire in self
                    .slots
                    .iter()
                    .flatten()
                    .filter(|h| h.supplier == *supplier)
                {
                    out.push(Output::Tell {
                        instance: hire.instance,
                        event: sc::Event::SupplierCancelled,
                    });
                }
            }
            Event::Timeout(_) | Event::Shutdown => {}
        }
    }

    fn hire_one(&mut self, ctx: &Ctx, out: &mut Out<Self>) {
        if self.pending().is_some() {
            return;
        }
        let Some(position) = self.empty_position() else {
            return;
        };
        match self.free_candidate(ctx.now) {
            Some(supplier) => {
                tracing::info!(position, supplier = %supplier, "asking a friend to be a supplier");
                let start = self.start_connector(position, supplier, false);
                out.push(start);
            }
            None => {
                // Wake up when the first online candidate has cooled down.
                let wake = self
                    .candidates
                    .iter()
                    .filter_map(|c| self.cooldown.get(c).map(|(_, until)| *until))
                    .filter(|until| *until > ctx.now)
                    .min();
                if let Some(at) = wake {
                    out.set_timer(Timer::Retry, at);
                }
            }
        }
    }

    /// No supplier holds two positions.
    pub fn positions_are_distinct(&self) -> bool {
        let used: Vec<NodeId> = self.used().collect();
        let set: BTreeSet<NodeId> = used.iter().copied().collect();
        used.len() == set.len()
    }
}

use State::*;
use To::State as Go;

const LIVE: &[State] = &[AtStartup, Hiring, Waiting, Ready];
const STAFFED: &[State] = &[Hiring, Waiting, Ready];
const STAFFING: To<FireHire> = To::Choose(Choice::Staffing);
const DECIDE: &[Action] = &[Action::Note, Action::HireOne, Action::Save];

static ROWS: &[Row<FireHire>] = &[
    row(
        &[AtStartup],
        EventKind::Start,
        STAFFING,
        &[Action::Note, Action::Resume, Action::HireOne, Action::Save],
    ),
    row(
        &[AtStartup],
        EventKind::CandidateUp,
        To::Stay,
        &[Action::Note],
    ),
    row(
        &[AtStartup],
        EventKind::CandidateDown,
        To::Stay,
        &[Action::Note],
    ),
    row(STAFFED, EventKind::Report, STAFFING, DECIDE),
    row(STAFFED, EventKind::Fire, STAFFING, DECIDE),
    row(STAFFED, EventKind::CandidateUp, STAFFING, DECIDE),
    row(STAFFED, EventKind::CandidateDown, STAFFING, DECIDE),
    row(STAFFED, EventKind::Timeout, STAFFING, DECIDE),
    row(STAFFED, EventKind::SupplierLeft, To::Stay, &[Action::Note]),
    row(
        LIVE,
        EventKind::Shutdown,
        Go(Closed),
        &[Action::StopConnectors],
    ),
];

static CHOICES: &[ChoiceRow<FireHire>] = &[ChoiceRow {
    choice: Choice::Staffing,
    targets: &[
        (Hiring, "a hire in flight"),
        (Waiting, "a position empty, no one free"),
        (Ready, "every position held"),
    ],
}];

impl Machine for FireHire {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;
    type Choice = Choice;
    type Output = Output;

    const NAME: &'static str = "fire_hire";
    const ABOUT: &'static str = "Keeps one supplier hired per fragment position, choosing among trusted online peers not already used (never two positions on one node, never one still cancelling); backs off from suppliers that refused; replaces suppliers that refuse, leave or are fired.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
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

    fn choose(&self, _choice: Choice, _: &Ctx) -> State {
        if self.pending().is_some() {
            Hiring
        } else if self.empty_position().is_some() {
            Waiting
        } else {
            Ready
        }
    }

    fn apply(&mut self, action: Action, event: &Event, ctx: &Ctx, out: &mut Out<Self>) {
        match action {
            Action::Note => self.note(event, ctx, out),
            Action::Resume => {
                for position in 0..self.slots.len() {
                    if let Some(hire) = self.slots[position] {
                        let start = self.start_connector(position as u32, hire.supplier, true);
                        out.push(start);
                    }
                }
            }
            Action::HireOne => self.hire_one(ctx, out),
            Action::Save => {
                let now: Vec<_> = self
                    .slots
                    .iter()
                    .map(|h| h.map(|h| (h.supplier, h.confirmed)))
                    .collect();
                if self.saved.as_ref() != Some(&now) {
                    self.saved = Some(now.clone());
                    out.push(Output::Save(now));
                }
            }
            Action::StopConnectors => out.push(Output::StopConnectors),
        }
    }

    fn invariant(&self, _state: State) -> Result<(), Violation> {
        if !self.positions_are_distinct() {
            return Err("a supplier holds two positions".into());
        }
        if self.slots.iter().flatten().any(|h| h.up && !h.confirmed) {
            return Err("a supplier up without a confirmed contract".into());
        }
        let unconfirmed = self.slots.iter().flatten().filter(|h| !h.confirmed).count();
        if unconfirmed > 1 {
            return Err(format!("{unconfirmed} hires in flight").into());
        }
        for (instance, (_, supplier)) in &self.leaving {
            if self.slots.iter().flatten().any(|h| h.instance == *instance) {
                return Err(
                    format!("connector {instance} ({supplier}) both holds and leaves").into(),
                );
            }
        }
        Ok(())
    }

    fn sample_events() -> Vec<Event> {
        let ids: Vec<NodeId> = (1..=4u8)
            .map(|i| NodeId::from_signing_key(&[i; 32]))
            .collect();
        vec![
            Event::Start { resumed: vec![] },
            Event::Start {
                resumed: vec![(0, ids[0])],
            },
            Event::CandidateUp(ids[0]),
            Event::CandidateUp(ids[1]),
            Event::CandidateUp(ids[2]),
            Event::CandidateDown(ids[1]),
            Event::Report {
                instance: 1,
                report: Report::Connected,
            },
            Event::Report {
                instance: 2,
                report: Report::Connected,
            },
            Event::Report {
                instance: 1,
                report: Report::Refused(sc::RefuseReason::NoSpace),
            },
            Event::Report {
                instance: 3,
                report: Report::Disconnected,
            },
            Event::Report {
                instance: 2,
                report: Report::Closed,
            },
            Event::Fire { position: 1 },
            Event::SupplierLeft(ids[0]),
            Event::Timeout(Timer::Retry),
            Event::Shutdown,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::{Instance, Stepped};

    fn id(n: u8) -> NodeId {
        NodeId::from_signing_key(&[n; 32])
    }

    fn at(secs: u64) -> Ctx {
        Ctx::at(Duration::from_secs(secs))
    }

    fn started(positions: usize, candidates: &[u8]) -> Instance<FireHire> {
        let mut m = Instance::new(FireHire::new(positions), "0");
        for &c in candidates {
            m.step(&Event::CandidateUp(id(c)), &at(0));
        }
        m.step(&Event::Start { resumed: vec![] }, &at(0));
        m
    }

    fn holder(m: &Instance<FireHire>, position: u32) -> u64 {
        m.machine.slots[position as usize].expect("held").instance
    }

    fn report(
        m: &mut Instance<FireHire>,
        instance: u64,
        report: Report,
        c: &Ctx,
    ) -> Stepped<FireHire> {
        m.step(&Event::Report { instance, report }, c)
            .expect("handled")
    }

    fn dismissed(s: &Stepped<FireHire>) -> Vec<u64> {
        s.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Tell {
                    instance,
                    event: sc::Event::Dismiss,
                } => Some(*instance),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn hires_one_distinct_supplier_per_position() {
        let mut m = started(3, &[1, 2, 3, 4]);
        for _ in 0..3 {
            let (position, _) = m.machine.pending().expect("hiring");
            let instance = holder(&m, position);
            report(&mut m, instance, Report::Connected, &at(1));
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
    fn refusal_moves_on_and_backs_off_with_a_deadline() {
        let mut m = started(1, &[1, 2]);
        let (position, first) = m.machine.pending().expect("hiring");
        let instance = holder(&m, position);
        let s = report(
            &mut m,
            instance,
            Report::Refused(sc::RefuseReason::NoSpace),
            &at(1),
        );
        assert_eq!(dismissed(&s), vec![instance]);
        let (_, second) = m.machine.pending().expect("hires the other");
        assert_ne!(first, second);
        let instance = holder(&m, position);
        report(
            &mut m,
            instance,
            Report::Refused(sc::RefuseReason::NoSpace),
            &at(2),
        );
        assert_eq!(m.state(), Waiting, "both refused");
        // Both leave: their cancels complete.
        for leaving in m.machine.leaving.keys().copied().collect::<Vec<_>>() {
            report(&mut m, leaving, Report::Closed, &at(3));
        }
        assert_eq!(m.state(), Waiting, "both cooling down");
        // The wake-up is the first cooldown's end, not a poll.
        let wake: Vec<_> = m.timers().deadlines().collect();
        assert_eq!(wake, vec![(Timer::Retry, Duration::from_secs(6))]);
        let s = m
            .step(&Event::Timeout(Timer::Retry), &at(6))
            .expect("retry");
        assert_eq!(s.to, Hiring);
    }

    #[test]
    fn a_supplier_still_cancelling_is_not_hired_again() {
        let mut m = started(2, &[1, 2]);
        let (p0, s0) = m.machine.pending().expect("hiring");
        let i0 = holder(&m, p0);
        report(&mut m, i0, Report::Connected, &at(1));
        let (p1, _) = m.machine.pending().expect("hiring");
        let i1 = holder(&m, p1);
        report(&mut m, i1, Report::Connected, &at(1));
        // Fire position 0; its supplier cools down past that, then a third friend appears.
        m.step(&Event::Fire { position: p0 }, &at(2));
        assert!(
            !m.machine.eligible(&s0, Duration::from_secs(10_000)),
            "still cancelling"
        );
        report(&mut m, i0, Report::Closed, &at(3));
        assert!(m.machine.eligible(&s0, Duration::from_secs(10_000)));
    }

    #[test]
    fn stale_reports_from_a_replaced_connector_are_ignored() {
        let mut m = started(1, &[1, 2]);
        let old = holder(&m, 0);
        report(
            &mut m,
            old,
            Report::Refused(sc::RefuseReason::NoSpace),
            &at(1),
        );
        let new = holder(&m, 0);
        assert_ne!(old, new);
        // The old connector, though dismissed, claims to be connected.
        report(&mut m, old, Report::Connected, &at(2));
        assert!(!m.machine.slots[0].expect("held").confirmed);
        assert_eq!(m.state(), Hiring);
    }

    #[test]
    fn fire_replaces_and_resumed_contracts_are_kept() {
        let mut m = Instance::new(FireHire::new(2), "0");
        m.step(&Event::CandidateUp(id(3)), &at(0));
        let s = m
            .step(
                &Event::Start {
                    resumed: vec![(0, id(1)), (1, id(2))],
                },
                &at(0),
            )
            .expect("start");
        assert_eq!(s.to, Ready, "resumed contracts need no hiring");
        let resumed = s
            .outputs
            .iter()
            .filter(|o| matches!(o, Output::StartConnector { resumed: true, .. }))
            .count();
        assert_eq!(resumed, 2);
        let fired = holder(&m, 1);
        let s = m.step(&Event::Fire { position: 1 }, &at(5)).expect("fire");
        assert_eq!(s.to, Hiring);
        assert_eq!(dismissed(&s), vec![fired]);
        assert_eq!(m.machine.pending(), Some((1, id(3))));
    }

    fn news(s: &Stepped<FireHire>) -> Vec<(u32, bool)> {
        s.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Position(p) => Some((p.position, p.up)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_position_is_up_from_its_holders_reports_and_says_so_once_per_change() {
        let mut m = started(2, &[1, 2, 3]);
        let i0 = holder(&m, 0);
        let s = report(&mut m, i0, Report::Connected, &at(1));
        assert_eq!(news(&s), vec![(0, true)]);
        assert_eq!(
            m.machine.positions(),
            vec![
                Position {
                    position: 0,
                    supplier: m.machine.slots[0].expect("held").supplier,
                    up: true
                },
                Position {
                    position: 1,
                    supplier: m.machine.slots[1].expect("held").supplier,
                    up: false
                }
            ]
        );
        // Connected again (a reconnect re-confirms): no change, no news.
        let s = report(&mut m, i0, Report::Connected, &at(2));
        assert!(news(&s).is_empty());
        let s = report(&mut m, i0, Report::Disconnected, &at(3));
        assert_eq!(news(&s), vec![(0, false)]);
        let s = report(&mut m, i0, Report::Disconnected, &at(4));
        assert!(news(&s).is_empty());
        let s = report(&mut m, i0, Report::Connected, &at(5));
        assert_eq!(news(&s), vec![(0, true)]);
        // Fired while up: down at once, before its connector even finished cancelling.
        let s = m.step(&Event::Fire { position: 0 }, &at(6)).expect("fire");
        assert_eq!(news(&s), vec![(0, false)]);
        // The dismissed connector's late news speaks for nobody.
        let s = report(&mut m, i0, Report::Connected, &at(7));
        assert!(news(&s).is_empty());
        assert!(m.machine.positions().iter().all(|p| !p.up));
    }

    #[test]
    fn a_refusal_from_an_up_supplier_takes_its_position_down() {
        let mut m = started(1, &[1, 2]);
        let i0 = holder(&m, 0);
        report(&mut m, i0, Report::Connected, &at(1));
        let s = report(&mut m, i0, Report::Refused(sc::RefuseReason::Left), &at(2));
        assert_eq!(news(&s), vec![(0, false)]);
        // Its successor is up only once it reports so.
        let successor = holder(&m, 0);
        assert_ne!(successor, i0);
        assert!(!m.machine.positions()[0].up);
        let s = report(&mut m, successor, Report::Connected, &at(3));
        assert_eq!(news(&s), vec![(0, true)]);
    }

    #[test]
    fn positions_are_saved_only_when_they_change() {
        let mut m = started(1, &[1]);
        let instance = holder(&m, 0);
        let s = report(&mut m, instance, Report::Connected, &at(1));
        assert!(s.outputs.iter().any(|o| matches!(o, Output::Save(_))));
        let s = report(&mut m, instance, Report::Disconnected, &at(2));
        assert!(!s.outputs.iter().any(|o| matches!(o, Output::Save(_))));
    }
}
