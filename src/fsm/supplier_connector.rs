//! supplier_connector: the customer's contract with the supplier at one fragment position —
//! request service, hold it while the supplier is reachable, re-confirm after it comes back,
//! cancel it when fired. Adapted from the original's NO_SERVICE/REQUEST/CONNECTED/DISCONNECTED/
//! REFUSE/CLOSED machine; its QUEUE? state (event subscriptions) has no counterpart here.

use std::time::Duration;

use super::machine::{Machine, Row, TimerRow};
use crate::labels;

labels! {
    pub enum State { NoService, Requesting, Connected, Disconnected, Refused, Cancelling, Closed }
}

labels! {
    pub enum EventKind { Connect, Accepted, Refused, Timer, PeerUp, PeerDown, SupplierCancelled, Dismiss, CancelDone, Shutdown }
}

labels! {
    pub enum Guard {
        /// Fewer than `max_attempts` requests went unanswered.
        RetriesLeft,
        /// The supplier accepted this contract before (so silence means unreachable, not refused).
        HadContract,
        /// The network reports the supplier's node up.
        PeerReachable,
    }
}

labels! {
    pub enum Action {
        /// Send a service request (IO); counts an attempt.
        SendRequest,
        /// The supplier accepted: tell fire_hire, reset attempts (IO).
        ReportConnected,
        /// The supplier is unreachable for now (IO: tell fire_hire).
        ReportDisconnected,
        /// The supplier refused or left: tell fire_hire so it hires another (IO).
        ReportRefused,
        /// Send a service cancel (IO).
        SendCancel,
        /// The contract is over: tell fire_hire (IO).
        ReportClosed,
        /// Remember whether the supplier's node is up.
        NotePresence,
    }
}

labels! {
    pub enum Timer { Request, Retry, Cancel }
}

labels! {
    /// Why a supplier said no (from its typed fail reason), or went silent.
    pub enum RefuseReason { NotTrusted, NoSpace, Unreachable, Left, Other }
}

#[derive(Debug, Clone)]
pub enum Event {
    Connect,
    Accepted,
    Refused(RefuseReason),
    Timer(Timer),
    PeerUp,
    PeerDown,
    /// The supplier ended the service on its side.
    SupplierCancelled,
    /// fire_hire (or the monitor through it) lets this supplier go.
    Dismiss,
    CancelDone,
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct SupplierConnector {
    pub request_timeout: Duration,
    pub retry_every: Duration,
    pub max_attempts: u32,
    pub attempts: u32,
    pub accepted_before: bool,
    pub peer_up: bool,
    pub refuse_reason: Option<RefuseReason>,
}

impl SupplierConnector {
    /// A connector for a contract the supplier accepted in an earlier run.
    pub fn resumed() -> Self {
        SupplierConnector {
            accepted_before: true,
            ..Self::default()
        }
    }
}

impl Default for SupplierConnector {
    fn default() -> Self {
        SupplierConnector {
            request_timeout: Duration::from_secs(30),
            retry_every: Duration::from_secs(60),
            max_attempts: 3,
            attempts: 0,
            accepted_before: false,
            peer_up: true,
            refuse_reason: None,
        }
    }
}

use State::*;

const LIVE: &[State] = &[
    NoService,
    Requesting,
    Connected,
    Disconnected,
    Refused,
    Cancelling,
];

static ROWS: &[Row<SupplierConnector>] = &[
    Row {
        from: &[NoService],
        event: EventKind::Connect,
        guard: None,
        to: Requesting,
        actions: &[Action::SendRequest],
    },
    Row {
        from: &[Requesting],
        event: EventKind::Accepted,
        guard: None,
        to: Connected,
        actions: &[Action::ReportConnected],
    },
    Row {
        from: &[Requesting],
        event: EventKind::Refused,
        guard: None,
        to: Refused,
        actions: &[Action::ReportRefused],
    },
    Row {
        from: &[Requesting],
        event: EventKind::Timer,
        guard: Some(Guard::RetriesLeft),
        to: Requesting,
        actions: &[Action::SendRequest],
    },
    Row {
        from: &[Requesting],
        event: EventKind::Timer,
        guard: Some(Guard::HadContract),
        to: Disconnected,
        actions: &[Action::ReportDisconnected],
    },
    Row {
        from: &[Requesting],
        event: EventKind::Timer,
        guard: None,
        to: Refused,
        actions: &[Action::ReportRefused],
    },
    Row {
        from: &[Requesting],
        event: EventKind::PeerDown,
        guard: Some(Guard::HadContract),
        to: Disconnected,
        actions: &[Action::ReportDisconnected],
    },
    Row {
        from: &[Connected],
        event: EventKind::PeerDown,
        guard: None,
        to: Disconnected,
        actions: &[Action::ReportDisconnected],
    },
    Row {
        from: &[Connected, Requesting],
        event: EventKind::SupplierCancelled,
        guard: None,
        to: Refused,
        actions: &[Action::ReportRefused],
    },
    // The supplier's node just came up: ask now rather than wait for the request timer.
    Row {
        from: &[Requesting],
        event: EventKind::PeerUp,
        guard: None,
        to: Requesting,
        actions: &[Action::SendRequest],
    },
    Row {
        from: &[Disconnected],
        event: EventKind::PeerUp,
        guard: None,
        to: Requesting,
        actions: &[Action::SendRequest],
    },
    Row {
        from: &[Disconnected],
        event: EventKind::Timer,
        guard: Some(Guard::PeerReachable),
        to: Requesting,
        actions: &[Action::SendRequest],
    },
    Row {
        from: &[Disconnected],
        event: EventKind::PeerDown,
        guard: None,
        to: Disconnected,
        actions: &[Action::NotePresence],
    },
    Row {
        from: &[NoService, Requesting, Connected, Disconnected],
        event: EventKind::Dismiss,
        guard: None,
        to: Cancelling,
        actions: &[Action::SendCancel],
    },
    Row {
        from: &[Refused],
        event: EventKind::Dismiss,
        guard: None,
        to: Closed,
        actions: &[Action::ReportClosed],
    },
    Row {
        from: &[Cancelling],
        event: EventKind::CancelDone,
        guard: None,
        to: Closed,
        actions: &[Action::ReportClosed],
    },
    Row {
        from: &[Cancelling],
        event: EventKind::Timer,
        guard: None,
        to: Closed,
        actions: &[Action::ReportClosed],
    },
    // A stop keeps the contract: a restart resumes it without re-hiring.
    Row {
        from: LIVE,
        event: EventKind::Shutdown,
        guard: None,
        to: Closed,
        actions: &[],
    },
];

static TIMERS: &[TimerRow<SupplierConnector>] = &[
    TimerRow {
        timer: Timer::Request,
        period: Duration::from_secs(30),
        states: &[Requesting],
    },
    TimerRow {
        timer: Timer::Retry,
        period: Duration::from_secs(60),
        states: &[Disconnected],
    },
    TimerRow {
        timer: Timer::Cancel,
        period: Duration::from_secs(30),
        states: &[Cancelling],
    },
];

impl Machine for SupplierConnector {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;

    const NAME: &'static str = "supplier_connector";
    const ABOUT: &'static str = "The customer's contract with the supplier at one fragment position: request service, hold it while the supplier is reachable, re-confirm it when the supplier returns, cancel it when fired.";
    const INITIAL: State = NoService;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timers() -> &'static [TimerRow<Self>] {
        TIMERS
    }

    fn kind(event: &Event) -> EventKind {
        match event {
            Event::Connect => EventKind::Connect,
            Event::Accepted => EventKind::Accepted,
            Event::Refused(_) => EventKind::Refused,
            Event::Timer(_) => EventKind::Timer,
            Event::PeerUp => EventKind::PeerUp,
            Event::PeerDown => EventKind::PeerDown,
            Event::SupplierCancelled => EventKind::SupplierCancelled,
            Event::Dismiss => EventKind::Dismiss,
            Event::CancelDone => EventKind::CancelDone,
            Event::Shutdown => EventKind::Shutdown,
        }
    }

    fn timer_event(timer: Timer, _now: Duration) -> Event {
        Event::Timer(timer)
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn timer_period(&self, timer: Timer) -> Duration {
        match timer {
            Timer::Request | Timer::Cancel => self.request_timeout,
            Timer::Retry => self.retry_every,
        }
    }

    fn guard(&self, guard: Guard, _event: &Event) -> bool {
        match guard {
            Guard::RetriesLeft => self.attempts < self.max_attempts,
            Guard::HadContract => self.accepted_before,
            Guard::PeerReachable => self.peer_up,
        }
    }

    fn apply(&mut self, action: Action, event: &Event) {
        match event {
            Event::PeerUp => self.peer_up = true,
            Event::PeerDown => self.peer_up = false,
            _ => {}
        }
        match action {
            Action::SendRequest => self.attempts += 1,
            Action::ReportConnected => {
                self.attempts = 0;
                self.accepted_before = true;
            }
            Action::ReportDisconnected => self.attempts = 0,
            Action::ReportRefused => {
                self.refuse_reason = Some(match event {
                    Event::Refused(r) => *r,
                    Event::SupplierCancelled => RefuseReason::Left,
                    _ => RefuseReason::Unreachable,
                });
            }
            Action::SendCancel | Action::ReportClosed | Action::NotePresence => {}
        }
    }

    fn sample_events() -> Vec<Event> {
        vec![
            Event::Connect,
            Event::Accepted,
            Event::Refused(RefuseReason::NoSpace),
            Event::Timer(Timer::Request),
            Event::Timer(Timer::Retry),
            Event::Timer(Timer::Cancel),
            Event::PeerUp,
            Event::PeerDown,
            Event::SupplierCancelled,
            Event::Dismiss,
            Event::CancelDone,
            Event::Shutdown,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::Instance;

    #[test]
    fn new_supplier_that_never_answers_counts_as_refused() {
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.step(&Event::Connect);
        for _ in 0..2 {
            assert_eq!(
                c.step(&Event::Timer(Timer::Request)).map(|s| s.to),
                Some(Requesting)
            );
        }
        let s = c.step(&Event::Timer(Timer::Request)).expect("gives up");
        assert_eq!(s.to, Refused);
        assert_eq!(c.machine.refuse_reason, Some(RefuseReason::Unreachable));
    }

    #[test]
    fn known_supplier_that_goes_silent_is_disconnected_then_reconfirmed() {
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.step(&Event::Connect);
        c.step(&Event::Accepted);
        assert_eq!(c.step(&Event::PeerDown).map(|s| s.to), Some(Disconnected));
        let s = c.step(&Event::PeerUp).expect("back");
        assert_eq!((s.to, s.actions), (Requesting, &[Action::SendRequest][..]));
        for _ in 0..3 {
            c.step(&Event::Timer(Timer::Request));
        }
        assert_eq!(
            c.state(),
            Disconnected,
            "a known supplier is not given up on silence"
        );
    }

    #[test]
    fn dismiss_cancels_and_shutdown_keeps_the_contract() {
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.step(&Event::Connect);
        c.step(&Event::Accepted);
        let s = c.step(&Event::Shutdown).expect("stop");
        assert!(s.actions.is_empty(), "no cancel on shutdown");
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.step(&Event::Connect);
        c.step(&Event::Accepted);
        assert_eq!(c.step(&Event::Dismiss).map(|s| s.to), Some(Cancelling));
        assert_eq!(c.step(&Event::CancelDone).map(|s| s.to), Some(Closed));
    }
}
