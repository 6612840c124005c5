//! The state-machine framework: a machine is declared once, as data (states, events, guards,
//! actions, a transition table and per-state timers), and one pure `step` applies an event.
//!
//! Invariants:
//! - `step` is synchronous and does no IO: no clock, no RNG, no sockets. Time, config and
//!   randomness reach a machine through its events and its own fields.
//! - The first row whose `from` contains the current state, whose event kind matches and whose
//!   guard (if any) holds, wins; an event that matches no row is ignored and changes nothing.
//! - Timers are periodic while their state lasts: armed when a state listing them is entered,
//!   disarmed when it is left. A self-transition keeps them running (as the original's automat).
//! - The same rows render the Graphviz and mermaid diagrams (see `diagram`).

use std::fmt::Debug;
use std::time::Duration;

/// A closed, field-less enum whose variants are listed and named: states, event kinds, guards,
/// actions and timers all implement it (through [`crate::labels!`]).
pub trait Label: Copy + Eq + Ord + std::hash::Hash + Debug + Send + Sync + Unpin + 'static {
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
}

/// Declares a field-less enum that implements [`Label`].
#[macro_export]
macro_rules! labels {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
        $vis enum $name { $($(#[$vmeta])* $variant),* }
        impl $crate::fsm::Label for $name {
            const ALL: &'static [Self] = &[$($name::$variant),*];
            fn name(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),* }
            }
        }
    };
}

/// One row of a transition table.
pub struct Row<M: Machine> {
    /// States this row applies in.
    pub from: &'static [M::State],
    pub event: M::EventKind,
    /// Checked against the machine's fields and the event; `None` always holds.
    pub guard: Option<M::Guard>,
    pub to: M::State,
    /// Performed in order by the shell after the machine's own bookkeeping (`Machine::apply`).
    pub actions: &'static [M::Action],
}

impl<M: Machine> Row<M> {
    pub fn copy(&self) -> Self {
        Row {
            from: self.from,
            event: self.event,
            guard: self.guard,
            to: self.to,
            actions: self.actions,
        }
    }
}

/// A periodic timer, running while the machine is in one of `states`.
pub struct TimerRow<M: Machine> {
    pub timer: M::Timer,
    /// Default period; a machine may take it from config through `Machine::timer_period`.
    pub period: Duration,
    pub states: &'static [M::State],
}

/// A state machine: its table is static data, its fields (`self`) are the extended state that
/// guards read and `apply` updates.
pub trait Machine: Sized + Send + 'static {
    type State: Label;
    type EventKind: Label;
    /// An event with its data.
    type Event: Debug + Clone + Send + 'static;
    type Guard: Label;
    type Action: Label;
    type Timer: Label;

    /// Actor name used in logs, the registry and diagram file names.
    const NAME: &'static str;
    /// One line on what the machine is for; repeated on the diagram page.
    const ABOUT: &'static str;
    const INITIAL: Self::State;
    /// States with no way out: the machine is finished.
    const TERMINAL: &'static [Self::State];

    fn rows() -> &'static [Row<Self>];
    fn timers() -> &'static [TimerRow<Self>];

    fn kind(event: &Self::Event) -> Self::EventKind;
    /// The event a timer delivers; `now` is the shell's clock (real or virtual) when it fired.
    fn timer_event(timer: Self::Timer, now: Duration) -> Self::Event;
    /// The event that takes any state to a terminal one; sent to every machine on node shutdown.
    fn shutdown_event() -> Self::Event;

    fn guard(&self, guard: Self::Guard, event: &Self::Event) -> bool;
    /// Pure bookkeeping for one action (counters, remembered data) before the shell does its IO.
    fn apply(&mut self, _action: Self::Action, _event: &Self::Event) {}
    fn timer_period(&self, timer: Self::Timer) -> Duration {
        Self::timers()
            .iter()
            .find(|t| t.timer == timer)
            .map(|t| t.period)
            .unwrap_or(Duration::from_secs(1))
    }

    /// At least one event of every kind, with representative data, for table and property tests.
    fn sample_events() -> Vec<Self::Event>;
}

/// Finds the row that `event` fires in `state`, if any. Pure.
pub fn find_row<M: Machine>(
    machine: &M,
    state: M::State,
    event: &M::Event,
) -> Option<&'static Row<M>> {
    let kind = M::kind(event);
    M::rows().iter().find(|row| {
        row.event == kind
            && row.from.contains(&state)
            && row.guard.is_none_or(|g| machine.guard(g, event))
    })
}

/// The timers that run in `state`.
pub fn timers_in<M: Machine>(state: M::State) -> impl Iterator<Item = &'static TimerRow<M>> {
    M::timers()
        .iter()
        .filter(move |t| t.states.contains(&state))
}

/// What one event did.
#[derive(Debug)]
pub struct Stepped<M: Machine> {
    pub from: M::State,
    pub event: M::EventKind,
    pub to: M::State,
    pub actions: &'static [M::Action],
}

impl<M: Machine> Stepped<M> {
    /// Whether timers must be re-armed: the state changed.
    pub fn state_changed(&self) -> bool {
        self.from != self.to
    }
}

/// One running instance: the machine, its current state and its instance id. Emits exactly one
/// tracing event per transition. Everything else (IO, timers) belongs to the shell.
pub struct Instance<M: Machine> {
    pub machine: M,
    state: M::State,
    id: String,
}

impl<M: Machine> Instance<M> {
    pub fn new(machine: M, id: impl Into<String>) -> Self {
        Instance {
            machine,
            state: M::INITIAL,
            id: id.into(),
        }
    }

    pub fn state(&self) -> M::State {
        self.state
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_terminal(&self) -> bool {
        M::TERMINAL.contains(&self.state)
    }

    /// Applies one event: finds its row, runs the machine's bookkeeping for each action, moves to
    /// the new state and logs the transition. `None` when the event is ignored in this state.
    pub fn step(&mut self, event: &M::Event) -> Option<Stepped<M>> {
        let from = self.state;
        let Some(row) = find_row(&self.machine, from, event) else {
            tracing::debug!(actor = M::NAME, id = %self.id, state = from.name(),
                event = M::kind(event).name(), "event ignored");
            return None;
        };
        for &action in row.actions {
            self.machine.apply(action, event);
        }
        self.state = row.to;
        tracing::info!(actor = M::NAME, id = %self.id, from = from.name(),
            event = row.event.name(), to = row.to.name(), "transition");
        Some(Stepped {
            from,
            event: row.event,
            to: row.to,
            actions: row.actions,
        })
    }
}
