//! identity: loads this node's keys and signed identity, and re-signs it with a higher revision
//! when its contact addresses change, then hands the new revision on for propagation.

use super::machine::{Ctx, Machine, NoChoice, Out, Row, To, row};
use crate::crypto::identity::Identity;
use crate::{events, labels};

labels! {
    pub enum State { AtStartup, Loading, Ready, Resigning, Failed, Closed }
}

events! {
    pub enum Event / EventKind {
        Start,
        Loaded(Identity),
        LoadFailed(String),
        /// The contact addresses the identity should carry (from config, on start and SIGHUP).
        ContactsChanged(Vec<String>),
        Saved(Identity),
        SaveFailed(String),
        Shutdown,
    }
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

/// What the identity driver must do.
#[derive(Debug, Clone)]
pub enum Output {
    Load,
    /// Sign and save a new revision carrying these contacts.
    Resign(Vec<String>),
    Publish(Box<Identity>),
    Failed(String),
}

/// The identity machine's own data.
#[derive(Debug, Default)]
pub struct IdentityMachine {
    /// The identity as last loaded or saved.
    pub current: Option<Identity>,
    /// Contacts to sign next.
    pub wanted: Option<Vec<String>>,
}

use State::*;
use To::State as Go;

const LIVE: &[State] = &[AtStartup, Loading, Ready, Resigning, Failed];

static ROWS: &[Row<IdentityMachine>] = &[
    row(
        &[AtStartup],
        EventKind::Start,
        Go(Loading),
        &[Action::LoadIdentity],
    ),
    row(
        &[Loading, Resigning],
        EventKind::ContactsChanged,
        To::Stay,
        &[Action::Defer],
    ),
    row(
        &[Loading],
        EventKind::Loaded,
        Go(Resigning),
        &[Action::Adopt, Action::Resign],
    )
    .when(Guard::PendingDiffers),
    row(
        &[Loading],
        EventKind::Loaded,
        Go(Ready),
        &[Action::Adopt, Action::Publish],
    ),
    row(
        &[Loading],
        EventKind::LoadFailed,
        Go(Failed),
        &[Action::ReportFailure],
    ),
    row(
        &[Ready],
        EventKind::ContactsChanged,
        Go(Resigning),
        &[Action::Defer, Action::Resign],
    )
    .when(Guard::ContactsDiffer),
    row(
        &[Resigning],
        EventKind::Saved,
        To::Stay,
        &[Action::Adopt, Action::Publish, Action::Resign],
    )
    .when(Guard::PendingDiffers),
    row(
        &[Resigning],
        EventKind::Saved,
        Go(Ready),
        &[Action::Adopt, Action::Publish],
    ),
    row(
        &[Resigning],
        EventKind::SaveFailed,
        Go(Ready),
        &[Action::ReportFailure],
    ),
    row(LIVE, EventKind::Shutdown, Go(Closed), &[]),
];

impl Machine for IdentityMachine {
    type State = State;
    type EventKind = EventKind;
    type Event = Event;
    type Guard = Guard;
    type Action = Action;
    type Timer = Timer;
    type Choice = NoChoice;
    type Output = Output;

    const NAME: &'static str = "identity";
    const ABOUT: &'static str = "Loads this node's keys and signed identity; re-signs it with a higher revision when its contact addresses change and publishes each new revision.";
    const INITIAL: State = AtStartup;
    const TERMINAL: &'static [State] = &[Closed];

    fn rows() -> &'static [Row<Self>] {
        ROWS
    }

    fn timer_event(timer: Timer) -> Event {
        match timer {}
    }

    fn shutdown_event() -> Event {
        Event::Shutdown
    }

    fn choose(&self, choice: NoChoice, _: &Ctx) -> State {
        match choice {}
    }

    fn guard(&self, guard: Guard, event: &Event, _: &Ctx) -> bool {
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

    fn apply(&mut self, action: Action, event: &Event, _: &Ctx, out: &mut Out<Self>) {
        match (action, event) {
            (Action::LoadIdentity, _) => out.push(Output::Load),
            (Action::Adopt, Event::Loaded(id) | Event::Saved(id)) => {
                self.current = Some(id.clone())
            }
            (Action::Defer, Event::ContactsChanged(c)) => self.wanted = Some(c.clone()),
            (Action::Resign, _) => {
                if let Some(wanted) = &self.wanted {
                    out.push(Output::Resign(wanted.clone()));
                }
            }
            (Action::Publish, _) => {
                if let Some(current) = &self.current {
                    out.push(Output::Publish(Box::new(current.clone())));
                }
            }
            (Action::ReportFailure, Event::LoadFailed(why) | Event::SaveFailed(why)) => {
                out.push(Output::Failed(why.clone()));
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

    const C: Ctx = Ctx::at(std::time::Duration::ZERO);

    fn identity(port: u16, rev: u64) -> Identity {
        let keys =
            crate::crypto::keys::NodeKeys::from_secret_bytes(&[7; 32], &[9; 32]).expect("keys");
        Identity::create(&keys, "t", vec![format!("tcp://127.0.0.1:{port}")], rev, 0).expect("id")
    }

    #[test]
    fn loads_then_resigns_on_contact_change() {
        let mut m = Instance::new(IdentityMachine::default(), "0");
        let s = m.step(&Event::Start, &C).expect("start");
        assert_eq!((s.to, s.actions), (Loading, vec![Action::LoadIdentity]));
        let s = m.step(&Event::Loaded(identity(1, 1)), &C).expect("loaded");
        assert_eq!(
            (s.to, s.actions),
            (Ready, vec![Action::Adopt, Action::Publish])
        );
        // Same contacts: nothing to do.
        assert!(
            m.step(
                &Event::ContactsChanged(vec!["tcp://127.0.0.1:1".into()]),
                &C
            )
            .is_none()
        );
        let s = m
            .step(
                &Event::ContactsChanged(vec!["tcp://127.0.0.1:2".into()]),
                &C,
            )
            .expect("changed");
        assert_eq!(s.to, Resigning);
        assert!(s.actions.contains(&Action::Resign));
        let s = m.step(&Event::Saved(identity(2, 2)), &C).expect("saved");
        assert_eq!(
            (s.to, s.actions),
            (Ready, vec![Action::Adopt, Action::Publish])
        );
        assert_eq!(m.machine.current.as_ref().map(Identity::revision), Some(2));
        assert_eq!(m.step(&Event::Shutdown, &C).map(|s| s.to), Some(Closed));
        assert!(m.is_terminal());
    }

    #[test]
    fn change_while_resigning_is_not_lost() {
        let mut m = Instance::new(IdentityMachine::default(), "0");
        m.step(&Event::Start, &C);
        m.step(&Event::Loaded(identity(1, 1)), &C);
        m.step(
            &Event::ContactsChanged(vec!["tcp://127.0.0.1:2".into()]),
            &C,
        );
        m.step(
            &Event::ContactsChanged(vec!["tcp://127.0.0.1:3".into()]),
            &C,
        );
        let s = m.step(&Event::Saved(identity(2, 2)), &C).expect("saved");
        assert_eq!(s.to, Resigning, "the newer request must be signed too");
        assert!(s.actions.contains(&Action::Resign));
        let s = m.step(&Event::Saved(identity(3, 3)), &C).expect("saved");
        assert_eq!(s.to, Ready);
    }

    #[test]
    fn contacts_requested_during_load_are_applied() {
        let mut m = Instance::new(IdentityMachine::default(), "0");
        m.step(&Event::Start, &C);
        m.step(
            &Event::ContactsChanged(vec!["tcp://127.0.0.1:5".into()]),
            &C,
        );
        let s = m.step(&Event::Loaded(identity(1, 1)), &C).expect("loaded");
        assert_eq!(s.to, Resigning);
    }
}
