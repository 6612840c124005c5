//! peer_session: one TCP connection with one peer — connect (outbound), Noise handshake and
//! identity check, then an established link kept alive by pings until it fails or is closed.
//! A ping that gets no pong within `dead_after` marks the peer silent and closes the session.

use std::time::Duration;

use super::machine::{Ctx, Entry, Machine, NoChoice, Out, Row, TimerRow, To, Violation, row};
use crate::crypto::identity::NodeId;
use crate::{events, labels};

labels! {
    pub enum State { New, Connecting, Handshaking, Established, Closed }
}

events! {
    pub enum Event / EventKind {
        Dial,
        Accept,
        TcpConnected,
        ConnectFailed,
        /// Handshake done and the peer proved the identity it presented.
        Authenticated(NodeId),
        HandshakeFailed(CloseReason),
        /// Time to probe the peer.
        Keepalive,
        /// A deadline passed: connecting, handshaking, or waiting for a pong.
        Timeout(Timer),
        Pong,
        /// Bytes of a message arrived from the peer (at most once a second): it is alive, even
        /// when its pong waits behind a long message on a slow, bandwidth-limited link.
        Heard,
        LinkFailed(CloseReason),
        /// Another session with the same peer won the tie-break.
        Superseded,
        Shutdown,
    }
}

labels! {
    pub enum Guard {}
}

labels! {
    pub enum Action {
        /// Open the TCP connection (IO).
        OpenTcp,
        /// Run the Noise handshake and the identity exchange (IO).
        RunHandshake,
        /// Start reading and writing messages; tell the connector the peer is up (IO).
        StartLink,
        /// Send a ping (IO) and expect its pong within `dead_after`.
        SendPing,
        /// A pong (or bytes) arrived: the peer is alive.
        ClearPing,
        /// Record why the session ended and tell the connector (IO).
        ReportClosed,
    }
}

labels! {
    pub enum Timer { Connect, Handshake, Keepalive, PongDue }
}

labels! {
    /// Why a session ended: one reason per kind of failure, used as a counter key in `status`.
    pub enum CloseReason {
        ConnectFailed, ConnectTimeout, HandshakeTimeout, BadHandshake, FrameTooLarge, DecryptFailed,
        MessageTooLarge, Malformed, UnsupportedVersion, UnexpectedMessage, IdentityMismatch,
        BadIdentity, UnknownPeer, WrongPeer, PeerSilent, PeerClosed, IoError, Duplicate, Shutdown,
        /// The peer logged in with the key of an identity it has since replaced.
        RetiredKey,
    }
}

/// What the session's driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    OpenTcp,
    RunHandshake,
    StartLink {
        peer: NodeId,
    },
    SendPing,
    Closed {
        reason: CloseReason,
        peer: Option<NodeId>,
    },
}

#[derive(Debug, Clone)]
pub struct PeerSession {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub keepalive: Duration,
    /// How long a ping may go unanswered before the peer counts as gone.
    pub dead_after: Duration,
    /// A ping is out and its pong not back.
    pub awaiting_pong: bool,
    pub peer: Option<NodeId>,
}

impl Default for PeerSession {
    fn default() -> Self {
        PeerSession {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(10),
            dead_after: Duration::from_secs(20),
            awaiting_pong: false,
            peer: None,
        }
    }
}

/// Why the event that closed a session closed it.
fn close_reason(event: &Event) -> CloseReason {
    match event {
        Event::ConnectFailed => CloseReason::ConnectFailed,
        Event::HandshakeFailed(r) | Event::LinkFailed(r) => *r,
        Event::Timeout(Timer::Connect) => CloseReason::ConnectTimeout,
        Event::Timeout(Timer::Handshake) => CloseReason::HandshakeTimeout,
        Event::Timeout(Timer::Keepalive | Timer::PongDue) => CloseReason::PeerSilent,
        Event::Superseded => CloseReason::Duplicate,
        _ => CloseReason::Shutdown,
    }
}

use State::*;
use To::State as Go;

static ROWS: &[Row<PeerSession>] = &[
    row(&[New], EventKind::Dial, Go(Connecting), &[Action::OpenTcp]),
    row(
        &[New],
        EventKind::Accept,
        Go(Handshaking),
        &[Action::RunHandshake],
    ),
    row(
        &[Connecting],
        EventKind::TcpConnected,
        Go(Handshaking),
        &[Action::RunHandshake],
    ),
    row(&[Connecting], EventKind::ConnectFailed, Go(Closed), &[]),
    row(
        &[Handshaking],
        EventKind::Authenticated,
        Go(Established),
        &[Action::StartLink],
    ),
    row(&[Handshaking], EventKind::HandshakeFailed, Go(Closed), &[]),
    row(
        &[Established],
        EventKind::Keepalive,
        To::Stay,
        &[Action::SendPing],
    ),
    row(
        &[Connecting, Handshaking, Established],
        EventKind::Timeout,
        Go(Closed),
        &[],
    ),
    row(
        &[Established],
        EventKind::Pong,
        To::Stay,
        &[Action::ClearPing],
    ),
    row(
        &[Established],
        EventKind::Heard,
        To::Stay,
        &[Action::ClearPing],
    ),
    row(
        &[Handshaking, Established],
        EventKind::LinkFailed,
        Go(Closed),
        &[],
    ),
    row(&[Established], EventKind::Superseded, Go(Closed), &[]),
    row(
        &[New, Connecting, Handshaking, Established],
        EventKind::Shutdown,
        Go(Closed),
        &[],
    ),
];

static ENTRY: &[Entry<PeerSession>] = &[Entry {
    state: Closed,
    actions: &[Action::ReportClosed],
}];

static TIMERS: &[TimerRow<PeerSession>] = &[
    TimerRow {
        timer: Timer::Connect,
        period: Duration::from_secs(10),
        config: Some("network.connect_timeout"),
        states: &[Connecting],
    },
    TimerRow {
        timer: Timer::Handshake,
        period: Duration::from_secs(10),
        config: Some("network.handshake_timeout"),
        states: &[Handshaking],
    },
    TimerRow {
        timer: Timer::Keepalive,
        period: Duration::from_secs(10),
        config: Some("network.keepalive"),
        states: &[Established],
    },
];

impl Machine for PeerSession {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;
    type Choice = NoChoice;
    type Output = Output;

    const NAME: &'static str = "peer_session";
    const ABOUT: &'static str = "One connection with one peer: TCP connect, Noise handshake and identity check, then an established link probed by pings (a pong overdue by network.dead_after closes it) until it fails or is closed.";
    const INITIAL: State = New;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timers() -> &'static [TimerRow<Self>] {
        TIMERS
    }

    fn entry() -> &'static [Entry<Self>] {
        ENTRY
    }

    fn timer_event(timer: Timer) -> Event {
        match timer {
            Timer::Keepalive => Event::Keepalive,
            t => Event::Timeout(t),
        }
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn timer_period(&self, timer: Timer) -> Duration {
        match timer {
            Timer::Connect => self.connect_timeout,
            Timer::Handshake => self.handshake_timeout,
            // At most half the pong deadline: the peer hears from us (our pings slip ahead of
            // our data) within its own deadline, even while our pongs wait behind data in
            // flight on a slow, download-limited link.
            Timer::Keepalive => self.keepalive.min(self.dead_after / 2),
            Timer::PongDue => self.dead_after,
        }
    }

    fn guard(&self, guard: Guard, _: &Event, _: &Ctx) -> bool {
        match guard {}
    }

    fn choose(&self, choice: NoChoice, _: &Ctx) -> State {
        match choice {}
    }

    fn apply(&mut self, action: Action, event: &Event, ctx: &Ctx, out: &mut Out<Self>) {
        match action {
            Action::OpenTcp => out.push(Output::OpenTcp),
            Action::RunHandshake => out.push(Output::RunHandshake),
            Action::StartLink => {
                if let Event::Authenticated(peer) = event {
                    self.peer = Some(*peer);
                    out.push(Output::StartLink { peer: *peer });
                }
            }
            Action::SendPing => {
                out.push(Output::SendPing);
                // The first unanswered ping sets the deadline; later ones do not move it.
                if !self.awaiting_pong {
                    self.awaiting_pong = true;
                    out.state_timeout(Timer::PongDue, ctx.now + self.dead_after);
                }
            }
            Action::ClearPing => {
                self.awaiting_pong = false;
                out.cancel_timer(Timer::PongDue);
            }
            Action::ReportClosed => out.push(Output::Closed {
                reason: close_reason(event),
                peer: self.peer,
            }),
        }
    }

    fn invariant(&self, state: State) -> Result<(), Violation> {
        if state == Established && self.peer.is_none() {
            return Err("established without a peer".into());
        }
        Ok(())
    }

    fn sample_events() -> Vec<Event> {
        vec![
            Event::Dial,
            Event::Accept,
            Event::TcpConnected,
            Event::ConnectFailed,
            Event::Authenticated(NodeId::from_signing_key(&[1; 32])),
            Event::HandshakeFailed(CloseReason::BadHandshake),
            Event::Keepalive,
            Event::Timeout(Timer::Connect),
            Event::Timeout(Timer::Handshake),
            Event::Timeout(Timer::PongDue),
            Event::Pong,
            Event::Heard,
            Event::LinkFailed(CloseReason::DecryptFailed),
            Event::Superseded,
            Event::Shutdown,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::Instance;

    fn at(secs: u64) -> Ctx {
        Ctx::at(Duration::from_secs(secs))
    }

    fn established() -> Instance<PeerSession> {
        let mut s = Instance::new(PeerSession::default(), "t");
        s.step(&Event::Dial, &at(0));
        s.step(&Event::TcpConnected, &at(0));
        let peer = NodeId::from_signing_key(&[3; 32]);
        let st = s
            .step(&Event::Authenticated(peer), &at(0))
            .expect("authenticated");
        assert_eq!(st.to, Established);
        assert_eq!(st.outputs, vec![Output::StartLink { peer }]);
        s
    }

    fn closed_with(s: &crate::fsm::Stepped<PeerSession>) -> Option<CloseReason> {
        s.outputs.iter().find_map(|o| match o {
            Output::Closed { reason, .. } => Some(*reason),
            _ => None,
        })
    }

    #[test]
    fn silent_peer_is_dropped_once_its_pong_is_overdue() {
        let mut s = established();
        let st = s.step(&Event::Keepalive, &at(30)).expect("ping");
        assert_eq!((st.to, st.outputs), (Established, vec![Output::SendPing]));
        // Pinging again does not push the deadline back.
        s.step(&Event::Keepalive, &at(45));
        let deadline: Vec<_> = s.timers().deadlines().collect();
        assert_eq!(deadline, vec![(Timer::PongDue, Duration::from_secs(50))]);
        let mut due = |at: u64| {
            let mut timers = Vec::new();
            while let Some(t) = s.due_timer(Duration::from_secs(at)) {
                timers.push(t);
            }
            timers
        };
        assert!(!due(49).contains(&Timer::PongDue));
        assert_eq!(due(50), vec![Timer::PongDue]);
        let st = s
            .step(&PeerSession::timer_event(Timer::PongDue), &at(50))
            .expect("silent");
        assert_eq!(st.to, Closed);
        assert_eq!(closed_with(&st), Some(CloseReason::PeerSilent));
    }

    #[test]
    fn pong_clears_the_deadline() {
        let mut s = established();
        s.step(&Event::Keepalive, &at(30));
        s.step(&Event::Pong, &at(31));
        assert!(!s.machine.awaiting_pong);
        assert_eq!(s.timers().deadlines().count(), 0);
        for t in [60, 90, 120] {
            s.step(&Event::Keepalive, &at(t));
            s.step(&Event::Pong, &at(t + 1));
        }
        assert_eq!(s.state(), Established);
    }

    #[test]
    fn pings_go_at_least_twice_per_pong_deadline() {
        let mut s = PeerSession::default();
        assert_eq!(s.timer_period(Timer::Keepalive), Duration::from_secs(10));
        s.keepalive = Duration::from_secs(60);
        assert_eq!(s.timer_period(Timer::Keepalive), s.dead_after / 2);
        s.keepalive = Duration::from_secs(3);
        assert_eq!(s.timer_period(Timer::Keepalive), Duration::from_secs(3));
    }

    /// A peer whose pong is stuck behind a long message on a slow link, but whose bytes keep
    /// arriving, stays; one that sends nothing is dropped when the pong is overdue.
    #[test]
    fn bytes_arriving_count_as_a_pong() {
        let mut s = established();
        s.step(&Event::Keepalive, &at(30));
        s.step(&Event::Heard, &at(45));
        assert!(!s.machine.awaiting_pong);
        assert_eq!(
            s.timers().deadlines().count(),
            0,
            "the pong deadline is gone"
        );
        s.step(&Event::Keepalive, &at(60));
        let st = s
            .step(&PeerSession::timer_event(Timer::PongDue), &at(80))
            .expect("a silent peer's deadline fires");
        assert_eq!(st.to, Closed);
    }

    #[test]
    fn handshake_timeout_and_failures_close_with_reason() {
        let mut s = Instance::new(PeerSession::default(), "t");
        s.step(&Event::Accept, &at(0));
        let st = s
            .step(&Event::Timeout(Timer::Handshake), &at(10))
            .expect("timeout");
        assert_eq!(
            (st.to, closed_with(&st)),
            (Closed, Some(CloseReason::HandshakeTimeout))
        );
        let mut s = Instance::new(PeerSession::default(), "t");
        s.step(&Event::Accept, &at(0));
        let st = s
            .step(
                &Event::HandshakeFailed(CloseReason::IdentityMismatch),
                &at(1),
            )
            .expect("failed");
        assert_eq!(closed_with(&st), Some(CloseReason::IdentityMismatch));
        // A pong before the link is up means nothing.
        let mut s = Instance::new(PeerSession::default(), "t");
        s.step(&Event::Accept, &at(0));
        assert!(s.step(&Event::Pong, &at(1)).is_none());
    }

    #[test]
    fn every_way_into_closed_reports_once() {
        let mut s = established();
        let st = s.step(&Event::Superseded, &at(5)).expect("closed");
        let reports = st
            .outputs
            .iter()
            .filter(|o| matches!(o, Output::Closed { .. }))
            .count();
        assert_eq!(reports, 1);
        assert_eq!(closed_with(&st), Some(CloseReason::Duplicate));
    }
}
