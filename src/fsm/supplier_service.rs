//! supplier_service: the supplier side — open the fragment store (recovering from a crash),
//! serve customers' requests, and purge the data of customers whose grace period has run out.
//! Requests do not pass through the table (one per fragment would flood the log); the pure
//! decision on service requests is `decide`.

use std::time::Duration;

use super::machine::{Machine, Row, TimerRow};
use crate::labels;

labels! {
    pub enum State { AtStartup, Opening, Serving, Failed, Closed }
}

labels! {
    pub enum EventKind { Start, Opened, OpenFailed, PurgeTick, Shutdown }
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
    pub enum Refusal { NotTrusted, NoSpace }
}

#[derive(Debug, Clone)]
pub enum Event {
    Start,
    Opened,
    OpenFailed(String),
    PurgeTick,
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct SupplierService {
    pub purge_every: Duration,
    pub failure: Option<String>,
}

impl Default for SupplierService {
    fn default() -> Self {
        SupplierService {
            purge_every: Duration::from_secs(3600),
            failure: None,
        }
    }
}

/// What a supplier answers to a service request.
///
/// `trusted`: the customer is a peer; `open`: any authenticated node may store here.
/// `current_quota`: what this customer holds already (its own quota is not counted twice).
/// `granted_total`: the sum of every customer's quota, this one's included.
pub fn decide(
    trusted: bool,
    open: bool,
    requested: u64,
    current_quota: u64,
    granted_total: u64,
    donated: u64,
) -> Result<u64, Refusal> {
    if !trusted && !open {
        return Err(Refusal::NotTrusted);
    }
    let others = granted_total.saturating_sub(current_quota);
    if others.saturating_add(requested) > donated {
        return Err(Refusal::NoSpace);
    }
    Ok(requested)
}

use State::*;

static ROWS: &[Row<SupplierService>] = &[
    Row {
        from: &[AtStartup],
        event: EventKind::Start,
        guard: None,
        to: Opening,
        actions: &[Action::OpenStore],
    },
    Row {
        from: &[Opening],
        event: EventKind::Opened,
        guard: None,
        to: Serving,
        actions: &[Action::Serve, Action::Purge],
    },
    Row {
        from: &[Opening],
        event: EventKind::OpenFailed,
        guard: None,
        to: Failed,
        actions: &[Action::ReportFailure],
    },
    Row {
        from: &[Serving],
        event: EventKind::PurgeTick,
        guard: None,
        to: Serving,
        actions: &[Action::Purge],
    },
    Row {
        from: &[AtStartup, Opening, Serving, Failed],
        event: EventKind::Shutdown,
        guard: None,
        to: Closed,
        actions: &[],
    },
];

static TIMERS: &[TimerRow<SupplierService>] = &[TimerRow {
    timer: Timer::Purge,
    period: Duration::from_secs(3600),
    states: &[Serving],
}];

impl Machine for SupplierService {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;

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

    fn kind(event: &Event) -> EventKind {
        match event {
            Event::Start => EventKind::Start,
            Event::Opened => EventKind::Opened,
            Event::OpenFailed(_) => EventKind::OpenFailed,
            Event::PurgeTick => EventKind::PurgeTick,
            Event::Shutdown => EventKind::Shutdown,
        }
    }

    fn timer_event(_timer: Timer, _now: Duration) -> Event {
        Event::PurgeTick
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn timer_period(&self, _timer: Timer) -> Duration {
        self.purge_every
    }

    fn guard(&self, guard: Guard, _event: &Event) -> bool {
        match guard {}
    }

    fn apply(&mut self, action: Action, event: &Event) {
        if let (Action::ReportFailure, Event::OpenFailed(why)) = (action, event) {
            self.failure = Some(why.clone());
        }
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
        assert_eq!(
            decide(false, false, 10, 0, 0, 100),
            Err(Refusal::NotTrusted)
        );
        assert_eq!(decide(false, true, 10, 0, 0, 100), Ok(10));
        assert_eq!(decide(true, false, 60, 0, 50, 100), Err(Refusal::NoSpace));
        // A customer re-requesting its own quota is not counted twice.
        assert_eq!(decide(true, false, 60, 60, 100, 100), Ok(60));
        assert_eq!(decide(true, false, 70, 60, 100, 100), Err(Refusal::NoSpace));
    }
}
