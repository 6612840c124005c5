//! supplier_service: the supplier side — open the fragment store (recovering from a crash),
//! serve customers' requests, and purge the data of customers whose grace period has run out.
//! Requests do not pass through the table: they are per-item work, decided by the pure
//! functions beside the machine (`decide`).

use std::time::Duration;

use super::machine::{Ctx, Machine, NoChoice, Out, Row, TimerRow, To, row};
use crate::{events, labels};

labels! {
    pub enum State { AtStartup, Opening, Serving, Failed, Closed }
}

events! {
    pub enum Event / EventKind {
        Start,
        Opened,
        OpenFailed(String),
        PurgeTick,
        Shutdown,
    }
}
labels! {
    pub enum Guard { }
}

labels! {
    pub enum Action {
        /// Open the fragment store and recover from an interrupted write (IO).
        OpenStore,
        /// Start answering customers' requests.
        Serve,
        /// Remove the data of customers cancelled longer than the grace period (IO).
        Purge,
        /// Log why the store could not be opened.
        ReportFailure,
    }
}

labels! {
    pub enum Timer { Purge }
}

labels! {
    /// Why a service request is refused.
    pub enum Refusal { NotTrusted, NoSpace, TooSmall }
}

/// The smallest contract granted: one fragment's minimum charge (`store::fragments::charge`
/// of a 1-byte fragment, 4 KiB + 512). A contract for 0 bytes (or for less than any fragment
/// costs) holds nothing, and would only make the customer an account (security review H5).
pub const MIN_CONTRACT: u64 = 4096 + 512;

/// What the supplier driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    OpenStore,
    /// The store is open: answer customers' requests.
    Serve,
    Purge,
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct SupplierService {
    pub purge_every: Duration,
}

impl Default for SupplierService {
    fn default() -> Self {
        SupplierService {
            purge_every: Duration::from_secs(3600),
        }
    }
}

/// What a supplier answers to a service request: the one space rule, used by the supplier
/// actor (inside the fragment store's grant, under its lock) and by the simulation.
///
/// `trusted`: the customer is a peer; `open`: any authenticated node may store here.
/// `others`: the space other customers hold claim to (active ones their quota, departed ones the
/// bytes they still hold); the customer's own current quota is not counted, so re-asking for it
/// is not counted twice. `capacity`: the donated space, capped by what the disk can really give.
pub fn decide(
    trusted: bool,
    open: bool,
    requested: u64,
    others: u64,
    capacity: u64,
) -> Result<u64, Refusal> {
    if !trusted && !open {
        return Err(Refusal::NotTrusted);
    }
    if requested < MIN_CONTRACT {
        return Err(Refusal::TooSmall);
    }
    if others.saturating_add(requested) > capacity {
        return Err(Refusal::NoSpace);
    }
    Ok(requested)
}

use State::*;

use To::State as Go;

static ROWS: &[Row<SupplierService>] = &[
    row(
        &[AtStartup],
        EventKind::Start,
        Go(Opening),
        &[Action::OpenStore],
    ),
    row(
        &[Opening],
        EventKind::Opened,
        Go(Serving),
        &[Action::Serve, Action::Purge],
    ),
    row(
        &[Opening],
        EventKind::OpenFailed,
        Go(Failed),
        &[Action::ReportFailure],
    ),
    row(&[Serving], EventKind::PurgeTick, To::Stay, &[Action::Purge]),
    row(
        &[AtStartup, Opening, Serving, Failed],
        EventKind::Shutdown,
        Go(Closed),
        &[],
    ),
];

static TIMERS: &[TimerRow<SupplierService>] = &[TimerRow {
    timer: Timer::Purge,
    period: Duration::from_secs(3600),
    config: None,
    states: &[Serving],
}];

impl Machine for SupplierService {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;
    type Choice = NoChoice;
    type Output = Output;

    const NAME: &'static str = "supplier_service";
    const ABOUT: &'static str = "The supplier side: opens the fragment store (recovering from an interrupted write), serves customers' requests within their quotas, and purges the data of customers whose grace period has run out.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timers() -> &'static [TimerRow<Self>] {
        TIMERS
    }

    fn timer_event(_timer: Timer) -> Event {
        Event::PurgeTick
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn timer_period(&self, _timer: Timer) -> Duration {
        self.purge_every
    }

    fn guard(&self, guard: Guard, _: &Event, _: &Ctx) -> bool {
        match guard {}
    }

    fn choose(&self, choice: NoChoice, _: &Ctx) -> State {
        match choice {}
    }

    fn apply(&mut self, action: Action, event: &Event, _: &Ctx, out: &mut Out<Self>) {
        out.push(match (action, event) {
            (Action::OpenStore, _) => Output::OpenStore,
            (Action::Serve, _) => Output::Serve,
            (Action::Purge, _) => Output::Purge,
            (Action::ReportFailure, Event::OpenFailed(why)) => Output::Failed(why.clone()),
            (Action::ReportFailure, _) => Output::Failed(String::new()),
        });
    }

    fn sample_events() -> Vec<Event> {
        vec![
            Event::Start,
            Event::Opened,
            Event::OpenFailed("disk".into()),
            Event::PurgeTick,
            Event::Shutdown,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        const K: u64 = MIN_CONTRACT;
        assert_eq!(
            decide(false, false, K, 0, 100 * K),
            Err(Refusal::NotTrusted)
        );
        assert_eq!(decide(false, true, K, 0, 100 * K), Ok(K));
        assert_eq!(
            decide(true, false, 60 * K, 50 * K, 100 * K),
            Err(Refusal::NoSpace)
        );
        // Exactly full is allowed; one byte more is not.
        assert_eq!(decide(true, false, 50 * K, 50 * K, 100 * K), Ok(50 * K));
        assert_eq!(
            decide(true, false, 50 * K + 1, 50 * K, 100 * K),
            Err(Refusal::NoSpace)
        );
    }

    /// Security review H5: a zero-space contract (or one that cannot hold a single fragment)
    /// is refused; it used to be granted.
    #[test]
    fn a_contract_for_nothing_is_refused() {
        assert_eq!(decide(true, true, 0, 0, 1 << 30), Err(Refusal::TooSmall));
        assert_eq!(
            decide(true, true, MIN_CONTRACT - 1, 0, 1 << 30),
            Err(Refusal::TooSmall)
        );
        assert_eq!(
            decide(true, true, MIN_CONTRACT, 0, 1 << 30),
            Ok(MIN_CONTRACT)
        );
    }
}
