//! identity: loads this node's keys and signed identity, and re-signs it with a higher revision
//! when its contact addresses change, then hands the new revision on for propagation.

use super::machine::{Machine, Row, TimerRow};
use crate::crypto::identity::Identity;
use crate::labels;

labels! {
    pub enum State { AtStartup, Loading, Ready, Resigning, Failed, Closed }
}

labels! {
    pub enum EventKind { Start, Loaded, LoadFailed, ContactsChanged, Saved, SaveFailed, Shutdown }
}

labels! {
    pub enum Guard {
        /// The requested contacts differ from the signed ones.
        ContactsDiffer,
        /// Contacts requested while re-signing differ from what was just saved.
        PendingDiffers,
    }
}

labels! {
    pub enum Action {
        /// Read keys and identity from the home (IO).
        LoadIdentity,
        /// Remember the loaded or saved identity as current.
        Adopt,
        /// Remember contacts requested while busy.
        Defer,
        /// Sign a new revision with the requested contacts and save it (IO).
        Resign,
        /// Hand the current identity to whoever propagates it (IO).
        Publish,
        /// Log why loading or saving failed.
        ReportFailure,
    }
}

labels! {
    pub enum Timer { }
}

#[derive(Debug, Clone)]
pub enum Event {
    Start,
    Loaded(Identity),
    LoadFailed(String),
    /// The contact addresses the identity should carry (from config, on start and SIGHUP).
    ContactsChanged(Vec<String>),
    Saved(Identity),
    SaveFailed(String),
    Shutdown,
}

/// The identity machine's own data.
#[derive(Debug, Default)]
pub struct IdentityMachine {
    /// The identity as last loaded or saved.
    pub current: Option<Identity>,
    /// Contacts to sign next.
    pub wanted: Option<Vec<String>>,
    pub last_failure: Option<String>,
}

use State::*;

const LIVE: &[State] = &[AtStartup, Loading, Ready, Resigning, Failed];

static ROWS: &[Row<IdentityMachine>] = &[
    Row {
        from: &[AtStartup],
        event: EventKind::Start,
        guard: None,
        to: Loading,
        actions: &[Action::LoadIdentity],
    },
    Row {
        from: &[Loading],
        event: EventKind::ContactsChanged,
        guard: None,
        to: Loading,
        actions: &[Action::Defer],
    },
    Row {
        from: &[Loading],
        event: EventKind::Loaded,
        guard: Some(Guard::PendingDiffers),
        to: Resigning,
        actions: &[Action::Adopt, Action::Resign],
    },
    Row {
        from: &[Loading],
        event: EventKind::Loaded,
        guard: None,
        to: Ready,
        actions: &[Action::Adopt, Action::Publish],
    },
    Row {
        from: &[Loading],
        event: EventKind::LoadFailed,
        guard: None,
        to: Failed,
        actions: &[Action::ReportFailure],
    },
    Row {
        from: &[Ready],
        event: EventKind::ContactsChanged,
        guard: Some(Guard::ContactsDiffer),
        to: Resigning,
        actions: &[Action::Defer, Action::Resign],
    },
    Row {
        from: &[Resigning],
        event: EventKind::ContactsChanged,
        guard: None,
        to: Resigning,
        actions: &[Action::Defer],
    },
    Row {
        from: &[Resigning],
        event: EventKind::Saved,
        guard: Some(Guard::PendingDiffers),
        to: Resigning,
        actions: &[Action::Adopt, Action::Publish, Action::Resign],
    },
    Row {
        from: &[Resigning],
        event: EventKind::Saved,
        guard: None,
        to: Ready,
        actions: &[Action::Adopt, Action::Publish],
    },
    Row {
        from: &[Resigning],
        event: EventKind::SaveFailed,
        guard: None,
        to: Ready,
        actions: &[Action::ReportFailure],
    },
    Row {
        from: LIVE,
        event: EventKind::Shutdown,
        guard: None,
        to: Closed,
        actions: &[],
    },
];

impl Machine for IdentityMachine {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;

    const NAME: &'static str = "identity";
    const ABOUT: &'static str = "Loads this node's keys and signed identity; re-signs it with a higher revision when its contact addresses change and publishes each new revision.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timers() -> &'static [TimerRow<Self>] {
        &[]
    }

    fn kind(event: &Event) -> EventKind {
        match event {
            Event::Start => EventKind::Start,
            Event::Loaded(_) => EventKind::Loaded,
            Event::LoadFailed(_) => EventKind::LoadFailed,
            Event::ContactsChanged(_) => EventKind::ContactsChanged,
            Event::Saved(_) => EventKind::Saved,
            Event::SaveFailed(_) => EventKind::SaveFailed,
            Event::Shutdown => EventKind::Shutdown,
        }
    }

    fn timer_event(timer: Timer, _now: std::time::Duration) -> Event {
        match timer {}
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn guard(&self, guard: Guard, event: &Event) -> bool {
        match (guard, event) {
            (Guard::ContactsDiffer, Event::ContactsChanged(c)) => self
                .current
                .as_ref()
                .is_none_or(|id| id.contacts() != c.as_slice()),
            (Guard::PendingDiffers, Event::Loaded(id) | Event::Saved(id)) => self
                .wanted
                .as_ref()
                .is_some_and(|w| w.as_slice() != id.contacts()),
            _ => false,
        }
    }

    fn apply(&mut self, action: Action, event: &Event) {
        match (action, event) {
            (Action::Adopt, Event::Loaded(id) | Event::Saved(id)) => {
                self.current = Some(id.clone())
            }
            (Action::Defer, Event::ContactsChanged(c)) => self.wanted = Some(c.clone()),
            (Action::ReportFailure, Event::LoadFailed(why) | Event::SaveFailed(why)) => {
                self.last_failure = Some(why.clone());
            }
            _ => {}
        }
    }

    fn sample_events() -> Vec<Event> {
        let keys = crate::crypto::keys::NodeKeys::from_secret_bytes(&[7; 32], &[9; 32]);
        let mut events = vec![
            Event::Start,
            Event::LoadFailed("no such file".into()),
            Event::ContactsChanged(vec!["tcp://127.0.0.1:1".into()]),
            Event::ContactsChanged(vec!["tcp://127.0.0.1:2".into()]),
            Event::SaveFailed("disk full".into()),
            Event::Shutdown,
        ];
        if let Ok(keys) = keys {
            for (rev, port) in [(1, 1), (2, 2), (3, 1)] {
                if let Ok(id) = Identity::create(
                    &keys,
                    "sample",
                    vec![format!("tcp://127.0.0.1:{port}")],
                    rev,
                    0,
                ) {
                    events.push(Event::Loaded(id.clone()));
                    events.push(Event::Saved(id));
                }
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::machine::Instance;

    fn identity(port: u16, rev: u64) -> Identity {
        let keys =
            crate::crypto::keys::NodeKeys::from_secret_bytes(&[7; 32], &[9; 32]).expect("keys");
        Identity::create(&keys, "t", vec![format!("tcp://127.0.0.1:{port}")], rev, 0).expect("id")
    }

    #[test]
    fn loads_then_resigns_on_contact_change() {
        let mut m = Instance::new(IdentityMachine::default(), "0");
        let s = m.step(&Event::Start).expect("start");
        assert_eq!((s.to, s.actions), (Loading, &[Action::LoadIdentity][..]));
        let s = m.step(&Event::Loaded(identity(1, 1))).expect("loaded");
        assert_eq!(
            (s.to, s.actions),
            (Ready, &[Action::Adopt, Action::Publish][..])
        );
        // Same contacts: nothing to do.
        assert!(
            m.step(&Event::ContactsChanged(vec!["tcp://127.0.0.1:1".into()]))
                .is_none()
        );
        let s = m
            .step(&Event::ContactsChanged(vec!["tcp://127.0.0.1:2".into()]))
            .expect("changed");
        assert_eq!(s.to, Resigning);
        assert!(s.actions.contains(&Action::Resign));
        let s = m.step(&Event::Saved(identity(2, 2))).expect("saved");
        assert_eq!(
            (s.to, s.actions),
            (Ready, &[Action::Adopt, Action::Publish][..])
        );
        assert_eq!(m.machine.current.as_ref().map(Identity::revision), Some(2));
        assert_eq!(m.step(&Event::Shutdown).map(|s| s.to), Some(Closed));
        assert!(m.is_terminal());
    }

    #[test]
    fn change_while_resigning_is_not_lost() {
        let mut m = Instance::new(IdentityMachine::default(), "0");
        m.step(&Event::Start);
        m.step(&Event::Loaded(identity(1, 1)));
        m.step(&Event::ContactsChanged(vec!["tcp://127.0.0.1:2".into()]));
        m.step(&Event::ContactsChanged(vec!["tcp://127.0.0.1:3".into()]));
        let s = m.step(&Event::Saved(identity(2, 2))).expect("saved");
        assert_eq!(s.to, Resigning, "the newer request must be signed too");
        assert!(s.actions.contains(&Action::Resign));
        let s = m.step(&Event::Saved(identity(3, 3))).expect("saved");
        assert_eq!(s.to, Ready);
    }

    #[test]
    fn contacts_requested_during_load_are_applied() {
        let mut m = Instance::new(IdentityMachine::default(), "0");
        m.step(&Event::Start);
        m.step(&Event::ContactsChanged(vec!["tcp://127.0.0.1:5".into()]));
        let s = m.step(&Event::Loaded(identity(1, 1))).expect("loaded");
        assert_eq!(s.to, Resigning);
    }
}
