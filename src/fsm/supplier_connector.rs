//! supplier_connector: the customer's contract with the supplier at one fragment position —
//! request service, hold it while the supplier is reachable, re-confirm after it comes back,
//! cancel it when fired. Adapted from the original's NO_SERVICE/REQUEST/CONNECTED/DISCONNECTED/
//! REFUSE/CLOSED machine; its QUEUE? state (event subscriptions) has no counterpart here.
//!
//! How a supplier's answer is read is decided here too ([`FailCode::ends_contract`]): a refusal
//! that says "not trusted", "no space" or "no service" (a friend that stores nothing) ends a
//! contract, and fire_hire backs off from that friend; a passing failure (its store still
//! opening, no session at this instant) is retried after `retry_soon`, doubling with each
//! failure in a row up to the request timeout ([`SupplierConnector::soon_delay`]), so no answer
//! makes the customer ask every 2 s forever.

use std::time::Duration;

use super::machine::{Ctx, Machine, NoChoice, Out, Row, TimerRow, To, Violation, row};
use crate::{events, labels};

labels! {
    pub enum State { NoService, Requesting, Connected, Disconnected, Refused, Cancelling, Closed }
}

labels! {
    /// What a supplier's refusal or failure says, mirrored one to one from the wire's reasons by
    /// the driver (`Unavailable`: the request could not be sent or its session closed).
    pub enum FailCode { NotTrusted, NoSpace, OverQuota, NoService, NotReady, Unavailable, Other }
}

impl FailCode {
    /// Whether this answer ends the contract (the supplier will not serve us); any other
    /// failure is passing and is retried.
    pub fn ends_contract(self) -> bool {
        matches!(
            self,
            FailCode::NotTrusted | FailCode::NoSpace | FailCode::OverQuota | FailCode::NoService
        )
    }
}

events! {
    #[derive(PartialEq, Eq)]
    pub enum Event / EventKind {
        Connect,
        Accepted,
        /// The supplier refused or failed the request.
        Refused(FailCode),
        Timeout(Timer),
        /// Time to ask again after a passing failure.
        RetryDue,
        PeerUp,
        PeerDown,
        /// The supplier ended the service on its side.
        SupplierCancelled,
        /// fire_hire (or the monitor through it) lets this supplier go.
        Dismiss,
        CancelDone,
        Shutdown,
    }
}

labels! {
    pub enum Guard {
        /// Fewer than `max_attempts` requests went unanswered.
        RetriesLeft,
        /// The supplier accepted this contract before (so silence means unreachable, not refused).
        HadContract,
        /// The network reports the supplier's node up.
        PeerReachable,
        /// The refusal ends the contract.
        Final,
    }
}

labels! {
    pub enum Action {
        /// Send a service request (IO); counts an attempt.
        SendRequest,
        /// A passing failure: ask again soon.
        RetrySoon,
        /// Send the request again after a passing failure (IO); not counted as an attempt.
        Resend,
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
    }
}

labels! {
    pub enum Timer { Request, Retry, Cancel, Soon }
}

labels! {
    /// Why a contract ended from the supplier's side, or never started.
    pub enum RefuseReason { NotTrusted, NoSpace, NoService, Unreachable, Left }
}

/// News for fire_hire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Connected,
    Disconnected,
    Refused(RefuseReason),
    Closed,
}

/// What the connector's driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    SendRequest,
    SendCancel,
    Report(Report),
}

#[derive(Debug, Clone)]
pub struct SupplierConnector {
    pub request_timeout: Duration,
    pub retry_every: Duration,
    /// Delay before asking again after a passing failure.
    pub retry_soon: Duration,
    pub max_attempts: u32,
    pub attempts: u32,
    pub accepted_before: bool,
    pub peer_up: bool,
    /// Passing failures in a row since the last answer that was not one (backoff).
    pub soon_failures: u32,
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
            retry_soon: Duration::from_secs(2),
            max_attempts: 3,
            attempts: 0,
            accepted_before: false,
            peer_up: true,
            soon_failures: 0,
        }
    }
}

impl SupplierConnector {
    /// How long to wait before asking again after the `soon_failures`-th passing failure in a
    /// row: `retry_soon`, doubled each time, never more than the request timeout.
    pub fn soon_delay(&self) -> Duration {
        let doubled = self
            .retry_soon
            .saturating_mul(1u32 << self.soon_failures.min(16));
        doubled.min(self.request_timeout.max(self.retry_soon))
    }
}

fn refuse_reason(event: &Event) -> RefuseReason {
    match event {
        Event::Refused(FailCode::NotTrusted) => RefuseReason::NotTrusted,
        Event::Refused(FailCode::NoSpace | FailCode::OverQuota) => RefuseReason::NoSpace,
        Event::Refused(FailCode::NoService) => RefuseReason::NoService,
        Event::SupplierCancelled => RefuseReason::Left,
        _ => RefuseReason::Unreachable,
    }
}

use State::*;
use To::State as Go;

const LIVE: &[State] = &[
    NoService,
    Requesting,
    Connected,
    Disconnected,
    Refused,
    Cancelling,
];

static ROWS: &[Row<SupplierConnector>] = &[
    row(
        &[NoService],
        EventKind::Connect,
        Go(Requesting),
        &[Action::SendRequest],
    ),
    row(
        &[Requesting],
        EventKind::Accepted,
        Go(Connected),
        &[Action::ReportConnected],
    ),
    row(
        &[Requesting],
        EventKind::Refused,
        Go(Refused),
        &[Action::ReportRefused],
    )
    .when(Guard::Final),
    row(
        &[Requesting],
        EventKind::Refused,
        To::Stay,
        &[Action::RetrySoon],
    ),
    row(
        &[Requesting],
        EventKind::RetryDue,
        To::Stay,
        &[Action::Resend],
    ),
    row(
        &[Requesting],
        EventKind::Timeout,
        To::Stay,
        &[Action::SendRequest],
    )
    .when(Guard::RetriesLeft),
    row(
        &[Requesting],
        EventKind::Timeout,
        Go(Disconnected),
        &[Action::ReportDisconnected],
    )
    .when(Guard::HadContract),
    row(
        &[Requesting],
        EventKind::Timeout,
        Go(Refused),
        &[Action::ReportRefused],
    ),
    row(
        &[Requesting],
        EventKind::PeerDown,
        Go(Disconnected),
        &[Action::ReportDisconnected],
    )
    .when(Guard::HadContract),
    row(
        &[Connected],
        EventKind::PeerDown,
        Go(Disconnected),
        &[Action::ReportDisconnected],
    ),
    row(
        &[Connected, Requesting],
        EventKind::SupplierCancelled,
        Go(Refused),
        &[Action::ReportRefused],
    ),
    // The supplier's node just came up: ask now rather than wait for the request timer.
    row(
        &[Requesting],
        EventKind::PeerUp,
        To::Stay,
        &[Action::Resend],
    ),
    row(
        &[Disconnected],
        EventKind::PeerUp,
        Go(Requesting),
        &[Action::SendRequest],
    ),
    row(
        &[Disconnected],
        EventKind::Timeout,
        Go(Requesting),
        &[Action::SendRequest],
    )
    .when(Guard::PeerReachable),
    row(&[Disconnected], EventKind::PeerDown, To::Stay, &[]),
    row(
        &[NoService, Requesting, Connected, Disconnected],
        EventKind::Dismiss,
        Go(Cancelling),
        &[Action::SendCancel],
    ),
    row(
        &[Refused],
        EventKind::Dismiss,
        Go(Closed),
        &[Action::ReportClosed],
    ),
    row(
        &[Cancelling],
        EventKind::CancelDone,
        Go(Closed),
        &[Action::ReportClosed],
    ),
    row(
        &[Cancelling],
        EventKind::Timeout,
        Go(Closed),
        &[Action::ReportClosed],
    ),
    // A stop keeps the contract: a restart resumes it without re-hiring.
    row(LIVE, EventKind::Shutdown, Go(Closed), &[]),
];

static TIMERS: &[TimerRow<SupplierConnector>] = &[
    TimerRow {
        timer: Timer::Request,
        period: Duration::from_secs(60),
        config: Some("network.request_timeout"),
        states: &[Requesting],
    },
    TimerRow {
        timer: Timer::Retry,
        period: Duration::from_secs(60),
        config: None,
        states: &[Disconnected],
    },
    TimerRow {
        timer: Timer::Cancel,
        period: Duration::from_secs(60),
        config: Some("network.request_timeout"),
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
    type Choice = NoChoice;
    type Output = Output;

    const NAME: &'static str = "supplier_connector";
    const ABOUT: &'static str = "The customer's contract with the supplier at one fragment position: request service, hold it while the supplier is reachable, re-confirm it when the supplier returns, cancel it when fired; a passing failure is retried soon.";
    const INITIAL: State = NoService;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timers() -> &'static [TimerRow<Self>] {
        TIMERS
    }

    fn timer_event(timer: Timer) -> Event {
        match timer {
            Timer::Soon => Event::RetryDue,
            t => Event::Timeout(t),
        }
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn timer_period(&self, timer: Timer) -> Duration {
        match timer {
            Timer::Request | Timer::Cancel => self.request_timeout,
            Timer::Retry => self.retry_every,
            Timer::Soon => self.retry_soon,
        }
    }

    fn guard(&self, guard: Guard, event: &Event, _: &Ctx) -> bool {
        match guard {
            Guard::RetriesLeft => self.attempts < self.max_attempts,
            Guard::HadContract => self.accepted_before,
            Guard::PeerReachable => self.peer_up,
            Guard::Final => matches!(event, Event::Refused(code) if code.ends_contract()),
        }
    }

    fn choose(&self, choice: NoChoice, _: &Ctx) -> State {
        match choice {}
    }

    /// Presence is remembered whatever the row does with it.
    fn observe(&mut self, event: &Event, _: &Ctx) {
        match event {
            Event::PeerUp => self.peer_up = true,
            Event::PeerDown => self.peer_up = false,
            _ => {}
        }
    }

    fn apply(&mut self, action: Action, event: &Event, ctx: &Ctx, out: &mut Out<Self>) {
        match action {
            Action::SendRequest => {
                self.attempts += 1;
                out.cancel_timer(Timer::Soon);
                out.push(Output::SendRequest);
            }
            Action::RetrySoon => {
                out.state_timeout(Timer::Soon, ctx.now + self.soon_delay());
                self.soon_failures = self.soon_failures.saturating_add(1);
            }
            Action::Resend => out.push(Output::SendRequest),
            Action::ReportConnected => {
                self.attempts = 0;
                self.soon_failures = 0;
                self.accepted_before = true;
                out.push(Output::Report(Report::Connected));
            }
            Action::ReportDisconnected => {
                self.attempts = 0;
                out.push(Output::Report(Report::Disconnected));
            }
            Action::ReportRefused => {
                out.push(Output::Report(Report::Refused(refuse_reason(event))))
            }
            Action::SendCancel => out.push(Output::SendCancel),
            Action::ReportClosed => out.push(Output::Report(Report::Closed)),
        }
    }

    fn invariant(&self, _state: State) -> Result<(), Violation> {
        if self.attempts > self.max_attempts {
            return Err(format!("{} attempts of {}", self.attempts, self.max_attempts).into());
        }
        Ok(())
    }

    fn sample_events() -> Vec<Event> {
        vec![
            Event::Connect,
            Event::Accepted,
            Event::Refused(FailCode::NoSpace),
            Event::Refused(FailCode::NotReady),
            Event::Refused(FailCode::NoService),
            Event::Timeout(Timer::Request),
            Event::Timeout(Timer::Retry),
            Event::Timeout(Timer::Cancel),
            Event::RetryDue,
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

    const C: Ctx = Ctx::at(Duration::ZERO);

    fn at(secs: u64) -> Ctx {
        Ctx::at(Duration::from_secs(secs))
    }

    #[test]
    fn new_supplier_that_never_answers_counts_as_refused() {
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.step(&Event::Connect, &C);
        for _ in 0..2 {
            assert_eq!(
                c.step(&Event::Timeout(Timer::Request), &C).map(|s| s.to),
                Some(Requesting)
            );
        }
        let s = c
            .step(&Event::Timeout(Timer::Request), &C)
            .expect("gives up");
        assert_eq!(s.to, Refused);
        assert_eq!(
            s.outputs,
            vec![Output::Report(Report::Refused(RefuseReason::Unreachable))]
        );
    }

    #[test]
    fn known_supplier_that_goes_silent_is_disconnected_then_reconfirmed() {
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.step(&Event::Connect, &C);
        c.step(&Event::Accepted, &C);
        assert_eq!(
            c.step(&Event::PeerDown, &C).map(|s| s.to),
            Some(Disconnected)
        );
        let s = c.step(&Event::PeerUp, &C).expect("back");
        assert_eq!((s.to, s.actions), (Requesting, vec![Action::SendRequest]));
        for _ in 0..3 {
            c.step(&Event::Timeout(Timer::Request), &C);
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
        c.step(&Event::Connect, &C);
        c.step(&Event::Accepted, &C);
        let s = c.step(&Event::Shutdown, &C).expect("stop");
        assert!(s.outputs.is_empty(), "no cancel on shutdown");
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.step(&Event::Connect, &C);
        c.step(&Event::Accepted, &C);
        assert_eq!(c.step(&Event::Dismiss, &C).map(|s| s.to), Some(Cancelling));
        assert_eq!(c.step(&Event::CancelDone, &C).map(|s| s.to), Some(Closed));
    }

    #[test]
    fn only_final_refusals_end_a_contract() {
        use FailCode::*;
        for (code, ends) in [
            (NotTrusted, true),
            (NoSpace, true),
            (OverQuota, true),
            (NoService, true),
            (NotReady, false),
            (Unavailable, false),
            (Other, false),
        ] {
            let mut c = Instance::new(SupplierConnector::default(), "0");
            c.step(&Event::Connect, &C);
            let s = c.step(&Event::Refused(code), &C).expect("handled");
            let expected = if ends { Refused } else { Requesting };
            assert_eq!(s.to, expected, "{code:?}");
        }
    }

    /// G1: a friend that stores nothing answers NO_SERVICE. That ends the request (fire_hire
    /// then backs off from it) instead of asking again every 2 s.
    #[test]
    fn a_friend_that_serves_nothing_is_refused_not_asked_again() {
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.step(&Event::Connect, &C);
        let s = c
            .step(&Event::Refused(FailCode::NoService), &at(1))
            .expect("handled");
        assert_eq!(s.to, Refused);
        assert_eq!(
            s.outputs,
            vec![Output::Report(Report::Refused(RefuseReason::NoService))]
        );
        assert_eq!(
            c.timers().deadlines().count(),
            0,
            "nothing scheduled to ask again"
        );
    }

    /// Passing failures in a row are retried after 2, 4, 8, 16 s..., capped at the request
    /// timeout; an acceptance resets the backoff.
    #[test]
    fn passing_failures_back_off_exponentially_up_to_the_request_timeout() {
        // The one-shot retry deadline (the request timer is periodic, not a one-shot).
        fn soon(c: &Instance<SupplierConnector>) -> Duration {
            c.timers()
                .deadlines()
                .find(|(t, _)| *t == Timer::Soon)
                .map(|(_, at)| at)
                .expect("a retry is scheduled")
        }
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.step(&Event::Connect, &C);
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            c.step(&Event::Refused(FailCode::NotReady), &at(now));
            let due = soon(&c);
            waits.push((due - Duration::from_secs(now)).as_secs());
            now = due.as_secs();
            c.step(&Event::RetryDue, &at(now));
        }
        assert_eq!(waits, vec![2, 4, 8, 16, 30, 30]);
        c.step(&Event::Accepted, &at(now));
        c.step(&Event::PeerDown, &at(now));
        c.step(&Event::PeerUp, &at(now));
        c.step(&Event::Refused(FailCode::Other), &at(now));
        let due = soon(&c);
        assert_eq!(
            due - Duration::from_secs(now),
            Duration::from_secs(2),
            "reset"
        );
    }

    #[test]
    fn presence_is_remembered_whatever_the_row() {
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.step(&Event::Connect, &C);
        c.step(&Event::Accepted, &C);
        c.step(&Event::PeerDown, &C);
        assert_eq!(c.state(), Disconnected);
        // The supplier is down: the retry timer does not ask.
        assert!(c.step(&Event::Timeout(Timer::Retry), &C).is_none());
        // Down again while disconnected (a stay row with no action): still remembered.
        c.step(&Event::PeerDown, &C);
        assert!(!c.machine.peer_up);
        // Up: it asks at once; silent through its request timeouts, it is disconnected again,
        // and the retry timer asks again because the supplier is known to be up.
        c.step(&Event::PeerUp, &C);
        for _ in 0..3 {
            c.step(&Event::Timeout(Timer::Request), &C);
        }
        assert_eq!(c.state(), Disconnected);
        let s = c.step(&Event::Timeout(Timer::Retry), &C).expect("asks");
        assert_eq!(s.outputs, vec![Output::SendRequest]);
    }

    #[test]
    fn the_invariant_reports_too_many_attempts() {
        let m = SupplierConnector {
            attempts: 4,
            ..SupplierConnector::default()
        };
        assert!(m.invariant(Requesting).is_err());
        assert!(SupplierConnector::default().invariant(Requesting).is_ok());
    }

    #[test]
    fn a_supplier_not_ready_yet_is_asked_again_within_seconds() {
        let mut c = Instance::new(SupplierConnector::default(), "0");
        c.start(Duration::ZERO);
        c.step(&Event::Connect, &at(0));
        let s = c
            .step(&Event::Refused(FailCode::NotReady), &at(0))
            .expect("passing");
        assert_eq!(s.to, Requesting);
        let due = c.due_timer(Duration::from_secs(2));
        assert_eq!(
            due,
            Some(Timer::Soon),
            "retried after retry_soon, not request_timeout"
        );
        let s = c
            .step(&SupplierConnector::timer_event(Timer::Soon), &at(2))
            .expect("again");
        assert_eq!(s.outputs, vec![Output::SendRequest]);
        assert_eq!(
            c.step(&Event::Accepted, &at(3)).map(|s| s.to),
            Some(Connected)
        );
    }

    #[test]
    fn a_resumed_contract_that_goes_silent_is_disconnected_not_refused() {
        let mut c = Instance::new(SupplierConnector::resumed(), "0");
        c.step(&Event::Connect, &C);
        for _ in 0..3 {
            c.step(&Event::Timeout(Timer::Request), &C);
        }
        assert_eq!(
            c.state(),
            Disconnected,
            "an earlier run's contract is kept on silence"
        );
    }

    #[test]
    fn refusals_are_reported_with_their_reason() {
        let reported = |event: Event| {
            let mut c = Instance::new(SupplierConnector::default(), "0");
            c.step(&Event::Connect, &C);
            let s = c.step(&event, &C).expect("handled");
            s.outputs
        };
        let refused = |r| vec![Output::Report(Report::Refused(r))];
        assert_eq!(
            reported(Event::Refused(FailCode::NotTrusted)),
            refused(RefuseReason::NotTrusted)
        );
        assert_eq!(
            reported(Event::Refused(FailCode::NoSpace)),
            refused(RefuseReason::NoSpace)
        );
        assert_eq!(
            reported(Event::Refused(FailCode::OverQuota)),
            refused(RefuseReason::NoSpace)
        );
        assert_eq!(
            reported(Event::SupplierCancelled),
            refused(RefuseReason::Left)
        );
    }
}
