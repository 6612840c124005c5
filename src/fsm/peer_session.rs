//! peer_session: one TCP connection with one peer — connect (outbound), Noise handshake and
//! identity check, then an established link kept alive by pings until it fails or is closed.

use std::time::Duration;

use super::machine::{Machine, Row, TimerRow};
use crate::crypto::identity::NodeId;
use crate::labels;

labels! {
    pub enum State { New, Connecting, Handshaking, Established, Closed }
}

labels! {
    pub enum EventKind {
        Dial, Accept, TcpConnected, ConnectFailed, Authenticated, HandshakeFailed, Timer, Pong,
        LinkFailed, Superseded, Shutdown,
    }
}

labels! {
    pub enum Guard {
        /// The peer left `max_missed_pings` pings unanswered.
        PeerSilent,
    }
}

labels! {
    pub enum Action {
        /// Open the TCP connection (IO).
        OpenTcp,
        /// Run the Noise handshake and the identity exchange (IO).
        RunHandshake,
        /// Start reading and writing messages; tell the connector the peer is up (IO).
        StartLink,
        /// Send a ping (IO); counts as missed until its pong arrives.
        SendPing,
        /// A pong arrived: nothing is missed.
        ClearMissed,
        /// Record why the session ended and tell the connector (IO).
        ReportClosed,
    }
}

labels! {
    pub enum Timer { Connect, Handshake, Keepalive }
}

labels! {
    /// Why a session ended: one reason per kind of failure, used as a counter key in `status`.
    pub enum CloseReason {
        ConnectFailed, ConnectTimeout, HandshakeTimeout, BadHandshake, FrameTooLarge, DecryptFailed,
        MessageTooLarge, Malformed, UnsupportedVersion, UnexpectedMessage, IdentityMismatch,
        BadIdentity, UnknownPeer, WrongPeer, PeerSilent, PeerClosed, IoError, Duplicate, Shutdown,
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    Dial,
    Accept,
    TcpConnected,
    ConnectFailed,
    /// Handshake done and the peer proved the identity it presented.
    Authenticated(NodeId),
    HandshakeFailed(CloseReason),
    Timer(Timer),
    Pong,
    LinkFailed(CloseReason),
    /// Another session with the same peer won the tie-break.
    Superseded,
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct PeerSession {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub keepalive: Duration,
    pub max_missed_pings: u32,
    pub missed_pings: u32,
    pub peer: Option<NodeId>,
    pub close_reason: Option<CloseReason>,
}

impl Default for PeerSession {
    fn default() -> Self {
        PeerSession {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(30),
            max_missed_pings: 3,
            missed_pings: 0,
            peer: None,
            close_reason: None,
        }
    }
}

use State::*;

const LIVE: &[State] = &[New, Connecting, Handshaking, Established];

static ROWS: &[Row<PeerSession>] = &[
    Row {
        from: &[New],
        event: EventKind::Dial,
        guard: None,
        to: Connecting,
        actions: &[Action::OpenTcp],
    },
    Row {
        from: &[New],
        event: EventKind::Accept,
        guard: None,
        to: Handshaking,
        actions: &[Action::RunHandshake],
    },
    Row {
        from: &[Connecting],
        event: EventKind::TcpConnected,
        guard: None,
        to: Handshaking,
        actions: &[Action::RunHandshake],
    },
    Row {
        from: &[Connecting],
        event: EventKind::ConnectFailed,
        guard: None,
        to: Closed,
        actions: &[Action::ReportClosed],
    },
    Row {
        from: &[Connecting, Handshaking],
        event: EventKind::Timer,
        guard: None,
        to: Closed,
        actions: &[Action::ReportClosed],
    },
    Row {
        from: &[Handshaking],
        event: EventKind::Authenticated,
        guard: None,
        to: Established,
        actions: &[Action::StartLink],
    },
    Row {
        from: &[Handshaking],
        event: EventKind::HandshakeFailed,
        guard: None,
        to: Closed,
        actions: &[Action::ReportClosed],
    },
    Row {
        from: &[Established],
        event: EventKind::Timer,
        guard: Some(Guard::PeerSilent),
        to: Closed,
        actions: &[Action::ReportClosed],
    },
    Row {
        from: &[Established],
        event: EventKind::Timer,
        guard: None,
        to: Established,
        actions: &[Action::SendPing],
    },
    Row {
        from: &[Established],
        event: EventKind::Pong,
        guard: None,
        to: Established,
        actions: &[Action::ClearMissed],
    },
    Row {
        from: &[Handshaking, Established],
        event: EventKind::LinkFailed,
        guard: None,
        to: Closed,
        actions: &[Action::ReportClosed],
    },
    Row {
        from: &[Established],
        event: EventKind::Superseded,
        guard: None,
        to: Closed,
        actions: &[Action::ReportClosed],
    },
    Row {
        from: LIVE,
        event: EventKind::Shutdown,
        guard: None,
        to: Closed,
        actions: &[Action::ReportClosed],
    },
];

static TIMERS: &[TimerRow<PeerSession>] = &[
    TimerRow {
        timer: Timer::Connect,
        period: Duration::from_secs(10),
        states: &[Connecting],
    },
    TimerRow {
        timer: Timer::Handshake,
        period: Duration::from_secs(10),
        states: &[Handshaking],
    },
    TimerRow {
        timer: Timer::Keepalive,
        period: Duration::from_secs(30),
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

    const NAME: &'static str = "peer_session";
    const ABOUT: &'static str = "One connection with one peer: TCP connect, Noise handshake and identity check, then an established link kept alive by pings until it fails or is closed.";
    const INITIAL: State = New;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timers() -> &'static [TimerRow<Self>] {
        TIMERS
    }

    fn kind(event: &Event) -> EventKind {
        match event {
            Event::Dial => EventKind::Dial,
            Event::Accept => EventKind::Accept,
            Event::TcpConnected => EventKind::TcpConnected,
            Event::ConnectFailed => EventKind::ConnectFailed,
            Event::Authenticated(_) => EventKind::Authenticated,
            Event::HandshakeFailed(_) => EventKind::HandshakeFailed,
            Event::Timer(_) => EventKind::Timer,
            Event::Pong => EventKind::Pong,
            Event::LinkFailed(_) => EventKind::LinkFailed,
            Event::Superseded => EventKind::Superseded,
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
            Timer::Connect => self.connect_timeout,
            Timer::Handshake => self.handshake_timeout,
            Timer::Keepalive => self.keepalive,
        }
    }

    fn guard(&self, guard: Guard, _event: &Event) -> bool {
        match guard {
            Guard::PeerSilent => self.missed_pings >= self.max_missed_pings,
        }
    }

    fn apply(&mut self, action: Action, event: &Event) {
        match action {
            Action::SendPing => self.missed_pings += 1,
            Action::ClearMissed => self.missed_pings = 0,
            Action::StartLink => {
                if let Event::Authenticated(peer) = event {
                    self.peer = Some(*peer);
                }
            }
            Action::ReportClosed => {
                self.close_reason = Some(match event {
                    Event::ConnectFailed => CloseReason::ConnectFailed,
                    Event::HandshakeFailed(r) | Event::LinkFailed(r) => *r,
                    Event::Timer(Timer::Connect) => CloseReason::ConnectTimeout,
                    Event::Timer(Timer::Handshake) => CloseReason::HandshakeTimeout,
                    Event::Timer(Timer::Keepalive) => CloseReason::PeerSilent,
                    Event::Superseded => CloseReason::Duplicate,
                    _ => CloseReason::Shutdown,
                });
            }
            Action::OpenTcp | Action::RunHandshake => {}
        }
    }

    fn sample_events() -> Vec<Event> {
        vec![
            Event::Dial,
            Event::Accept,
            Event::TcpConnected,
            Event::ConnectFailed,
            Event::Authenticated(NodeId::from_signing_key(&[1; 32])),
            Event::HandshakeFailed(CloseReason::BadHandshake),
            Event::Timer(Timer::Connect),
            Event::Timer(Timer::Handshake),
            Event::Timer(Timer::Keepalive),
            Event::Pong,
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

    fn established() -> Instance<PeerSession> {
        let mut s = Instance::new(PeerSession::default(), "t");
        s.step(&Event::Dial);
        s.step(&Event::TcpConnected);
        let peer = NodeId::from_signing_key(&[3; 32]);
        let st = s.step(&Event::Authenticated(peer)).expect("authenticated");
        assert_eq!(st.to, Established);
        assert_eq!(s.machine.peer, Some(peer));
        s
    }

    #[test]
    fn silent_peer_is_dropped_after_missed_pings() {
        let mut s = established();
        for _ in 0..3 {
            let st = s.step(&Event::Timer(Timer::Keepalive)).expect("ping");
            assert_eq!((st.to, st.actions), (Established, &[Action::SendPing][..]));
        }
        let st = s.step(&Event::Timer(Timer::Keepalive)).expect("silent");
        assert_eq!(st.to, Closed);
        assert_eq!(s.machine.close_reason, Some(CloseReason::PeerSilent));
    }

    #[test]
    fn pong_resets_missed_pings() {
        let mut s = established();
        s.step(&Event::Timer(Timer::Keepalive));
        s.step(&Event::Timer(Timer::Keepalive));
        s.step(&Event::Pong);
        assert_eq!(s.machine.missed_pings, 0);
        for _ in 0..3 {
            s.step(&Event::Timer(Timer::Keepalive));
        }
        assert_eq!(s.state(), Established);
    }

    #[test]
    fn handshake_timeout_and_failures_close_with_reason() {
        let mut s = Instance::new(PeerSession::default(), "t");
        s.step(&Event::Accept);
        s.step(&Event::Timer(Timer::Handshake));
        assert_eq!(
            (s.state(), s.machine.close_reason),
            (Closed, Some(CloseReason::HandshakeTimeout))
        );
        let mut s = Instance::new(PeerSession::default(), "t");
        s.step(&Event::Accept);
        s.step(&Event::HandshakeFailed(CloseReason::IdentityMismatch));
        assert_eq!(s.machine.close_reason, Some(CloseReason::IdentityMismatch));
        // A pong before the link is up means nothing.
        let mut s = Instance::new(PeerSession::default(), "t");
        s.step(&Event::Accept);
        assert!(s.step(&Event::Pong).is_none());
    }
}
