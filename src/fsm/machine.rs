//! The state-machine framework: a machine is declared once, as data (states, events, guards,
//! actions, a transition table, entry actions, choice points and per-state timers), and one pure
//! `step` applies an event.
//!
//! Invariants:
//! - `step` is synchronous and does no IO: no clock, no RNG, no sockets. Time and randomness
//!   reach a machine through the [`Ctx`] its shell builds for every step (real time in the actor shell,
//!   virtual time and a seeded RNG in the simulation).
//! - The first row whose `from` contains the current state, whose event kind matches and whose
//!   guard (if any) holds, wins; an event that matches no row is ignored and changes nothing.
//! - A step produces owned [`Stepped::outputs`] with their data, consumed once by the driver: the
//!   table names actions (the diagrams stay readable), `Machine::apply` turns each into outputs.
//! - A change of state is one INFO `transition` event; a step that stays in its state (a `Stay`
//!   row, or a choice that picks the current state) is an internal transition, logged at DEBUG.
//! - Periodic timers run while their state lasts: armed when a state listing them is entered,
//!   disarmed when it is left; a step that stays keeps them running. One-shot deadlines are set
//!   by the logic (`Out::set_timer`, `Out::state_timeout`); a state timeout is cancelled when the
//!   state is left.
//! - The same rows render the Graphviz and mermaid diagrams (see `diagram`).

use std::fmt::Debug;
use std::time::Duration;

use super::timers::TimerTable;

/// A closed, field-less enum whose variants are listed and named: states, event kinds, guards,
/// actions, choices and timers all implement it (through [`crate::labels!`]).
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

/// An event whose kind (the label rows match on) is derived from its variant.
pub trait Kinded {
    type Kind: Label;
    fn kind(&self) -> Self::Kind;
}

/// Declares a machine's event enum together with its kind labels, so the projection from an
/// event to its kind is generated rather than written (and possibly mistyped) by hand:
/// `events! { pub enum Event / EventKind { Start, Up(NodeId), Down { peer: NodeId } } }`.
#[macro_export]
macro_rules! events {
    ($(#[$meta:meta])* $vis:vis enum $name:ident / $kind:ident {
        $( $(#[$vmeta:meta])* $variant:ident
            $( ( $($tty:ty),* $(,)? ) )?
            $( { $($(#[$fmeta:meta])* $fname:ident : $fty:ty),* $(,)? } )?
        ),* $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant $( ( $($tty),* ) )? $( { $($(#[$fmeta])* $fname : $fty),* } )? ),*
        }
        $crate::labels! { $vis enum $kind { $($variant),* } }
        impl $crate::fsm::Kinded for $name {
            type Kind = $kind;
            fn kind(&self) -> $kind {
                match self { $( $name::$variant { .. } => $kind::$variant ),* }
            }
        }
    };
}

labels! {
    /// The choice type of a machine without choice points.
    pub enum NoChoice {}
}

/// Everything a step may know of the world, made by the shell (virtual in the simulation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ctx {
    /// Monotonic time since the process's clock origin; every timer deadline is on this clock.
    pub now: Duration,
    /// Wall-clock time since the Unix epoch (for what is persisted or shown to people).
    pub wall: Duration,
    /// A fresh random number for this step (jitter, sampling); seeded in the simulation.
    pub random: u64,
}

impl Ctx {
    /// A context at monotonic time `now`, wall clock at the epoch, no randomness (tests).
    pub const fn at(now: Duration) -> Ctx {
        Ctx {
            now,
            wall: Duration::ZERO,
            random: 0,
        }
    }
}

/// Where a row leads.
pub enum To<M: Machine> {
    State(M::State),
    /// An internal transition: the state (and its timers) stay, logged at DEBUG.
    Stay,
    /// A choice point: apply the row's actions, then `Machine::choose` picks the state among the
    /// choice's declared targets.
    Choose(M::Choice),
}

impl<M: Machine> Clone for To<M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M: Machine> Copy for To<M> {}

/// One row of a transition table.
pub struct Row<M: Machine> {
    /// States this row applies in.
    pub from: &'static [M::State],
    pub event: M::EventKind,
    /// Checked against the machine's fields and the event; `None` always holds.
    pub guard: Option<M::Guard>,
    pub to: To<M>,
    /// Applied in order by `Machine::apply`, which turns them into outputs.
    pub actions: &'static [M::Action],
}

impl<M: Machine> Clone for Row<M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M: Machine> Copy for Row<M> {}

/// A row on one line: `row(&[New], EventKind::Dial, To::State(Connecting), &[Action::OpenTcp])`.
pub const fn row<M: Machine>(
    from: &'static [M::State],
    event: M::EventKind,
    to: To<M>,
    actions: &'static [M::Action],
) -> Row<M> {
    Row {
        from,
        event,
        guard: None,
        to,
        actions,
    }
}

impl<M: Machine> Row<M> {
    /// The same row, taken only when `guard` holds.
    pub const fn when(self, guard: M::Guard) -> Self {
        Row {
            guard: Some(guard),
            ..self
        }
    }
}

/// Actions run whenever `state` is entered from another state (after the row's own actions).
pub struct Entry<M: Machine> {
    pub state: M::State,
    pub actions: &'static [M::Action],
}

/// A choice point and the states it may pick, each with a few words on when.
pub struct ChoiceRow<M: Machine> {
    pub choice: M::Choice,
    pub targets: &'static [(M::State, &'static str)],
}

/// A periodic timer, running while the machine is in one of `states`.
pub struct TimerRow<M: Machine> {
    pub timer: M::Timer,
    /// Default period; a machine may take it from config through `Machine::timer_period`.
    pub period: Duration,
    /// The config key the period comes from, shown in the diagrams instead of the default.
    pub config: Option<&'static str>,
    pub states: &'static [M::State],
}

/// What applying one row's actions produced: outputs for the driver and timer commands.
pub struct Out<M: Machine> {
    outputs: Vec<M::Output>,
    timers: Vec<TimerCommand<M::Timer>>,
}

/// A one-shot deadline the logic sets or cancels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerCommand<T> {
    /// Fires once at the deadline, whatever the state, unless set again or cancelled.
    Set(T, Duration),
    /// Fires once at the deadline unless the state changes first.
    StateTimeout(T, Duration),
    Cancel(T),
}

impl<M: Machine> Default for Out<M> {
    fn default() -> Self {
        Out {
            outputs: Vec::new(),
            timers: Vec::new(),
        }
    }
}

impl<M: Machine> Out<M> {
    pub fn push(&mut self, output: M::Output) {
        self.outputs.push(output);
    }

    /// A one-shot deadline that survives changes of state (a backoff, a retry).
    pub fn set_timer(&mut self, timer: M::Timer, at: Duration) {
        self.timers.push(TimerCommand::Set(timer, at));
    }

    /// A one-shot deadline cancelled when the state is left (gen_statem's state timeout).
    pub fn state_timeout(&mut self, timer: M::Timer, at: Duration) {
        self.timers.push(TimerCommand::StateTimeout(timer, at));
    }

    pub fn cancel_timer(&mut self, timer: M::Timer) {
        self.timers.push(TimerCommand::Cancel(timer));
    }
}

/// A broken invariant: what a machine's (or one of its ledgers') self-check found wrong, said in
/// words for the test or simulation that reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Violation(pub String);

impl From<String> for Violation {
    fn from(what: String) -> Self {
        Violation(what)
    }
}

impl From<&str> for Violation {
    fn from(what: &str) -> Self {
        Violation(what.to_owned())
    }
}

/// A state machine: its table is static data, its fields (`self`) are the extended state that
/// guards read and `apply` updates.
pub trait Machine: Sized + Send + 'static {
    type State: Label;
    type EventKind: Label;
    /// An event with its data.
    type Event: Kinded<Kind = Self::EventKind> + Debug + Clone + Send + 'static;
    type Guard: Label;
    type Action: Label;
    type Timer: Label;
    /// Choice points ([`NoChoice`] when there are none).
    type Choice: Label;
    /// What the driver must do, with its data.
    type Output: Debug + Send + 'static;

    /// Actor name used in logs, the registry and diagram file names.
    const NAME: &'static str;
    /// One line on what the machine is for; repeated on the diagram page.
    const ABOUT: &'static str;
    const INITIAL: Self::State;
    /// States with no way out: the machine is finished.
    const TERMINAL: &'static [Self::State];

    fn rows() -> &'static [Row<Self>];
    fn timers() -> &'static [TimerRow<Self>] {
        &[]
    }
    fn entry() -> &'static [Entry<Self>] {
        &[]
    }
    fn choices() -> &'static [ChoiceRow<Self>] {
        &[]
    }

    /// The event a timer delivers (the time is in the step's context).
    fn timer_event(timer: Self::Timer) -> Self::Event;
    /// The event that takes any state to a terminal one; sent to every machine on node shutdown.
    fn shutdown_event() -> Self::Event;

    fn guard(&self, guard: Self::Guard, event: &Self::Event, ctx: &Ctx) -> bool;
    /// Bookkeeping that belongs to the event itself: runs once per event that matched a row,
    /// before the row's actions, whatever their number.
    fn observe(&mut self, _event: &Self::Event, _ctx: &Ctx) {}
    /// Performs one action's pure part: updates the machine and pushes outputs for the driver.
    fn apply(&mut self, action: Self::Action, event: &Self::Event, ctx: &Ctx, out: &mut Out<Self>);
    /// Picks the state at a choice point, after the row's actions were applied.
    fn choose(&self, choice: Self::Choice, ctx: &Ctx) -> Self::State;
    fn timer_period(&self, timer: Self::Timer) -> Duration {
        Self::timers()
            .iter()
            .find(|t| t.timer == timer)
            .map_or(Duration::MAX, |t| t.period)
    }
    /// What must hold of the machine's data in `state` after every step (checked by the
    /// property tests and the simulation).
    fn invariant(&self, _state: Self::State) -> Result<(), Violation> {
        Ok(())
    }

    /// At least one event of every kind, with representative data, for table and property tests.
    fn sample_events() -> Vec<Self::Event>;
}

/// Finds the row that `event` fires in `state`, if any. Pure.
pub fn find_row<M: Machine>(
    machine: &M,
    state: M::State,
    event: &M::Event,
    ctx: &Ctx,
) -> Option<&'static Row<M>> {
    let kind = event.kind();
    M::rows().iter().find(|row| {
        row.event == kind
            && row.from.contains(&state)
            && row.guard.is_none_or(|g| machine.guard(g, event, ctx))
    })
}

/// The timers that run in `state`.
pub fn timers_in<M: Machine>(state: M::State) -> impl Iterator<Item = &'static TimerRow<M>> {
    M::timers()
        .iter()
        .filter(move |t| t.states.contains(&state))
}

/// The entry actions of `state`.
pub fn entry_of<M: Machine>(state: M::State) -> &'static [M::Action] {
    M::entry()
        .iter()
        .find(|e| e.state == state)
        .map_or(&[], |e| e.actions)
}

/// The states a choice may pick.
pub fn targets_of<M: Machine>(choice: M::Choice) -> impl Iterator<Item = M::State> {
    M::choices()
        .iter()
        .filter(move |c| c.choice == choice)
        .flat_map(|c| c.targets.iter().map(|(s, _)| *s))
}

/// The states a row may lead to from `from`.
pub fn row_targets<M: Machine>(row: &Row<M>, from: M::State) -> Vec<M::State> {
    match row.to {
        To::State(s) => vec![s],
        To::Stay => vec![from],
        To::Choose(c) => targets_of::<M>(c).collect(),
    }
}

/// What one event did.
pub struct Stepped<M: Machine> {
    pub from: M::State,
    pub event: M::EventKind,
    pub to: M::State,
    /// The row's actions, then the entry actions of the new state (if it changed).
    pub actions: Vec<M::Action>,
    /// What the driver must do, in order.
    pub outputs: Vec<M::Output>,
}

impl<M: Machine> Debug for Stepped<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stepped")
            .field("from", &self.from)
            .field("event", &self.event)
            .field("to", &self.to)
            .field("actions", &self.actions)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl<M: Machine> Stepped<M> {
    pub fn state_changed(&self) -> bool {
        self.from != self.to
    }
}

/// One running instance: the machine, its current state, its timers and its instance id. Emits
/// exactly one tracing event per step. Everything else (IO) belongs to the driver.
pub struct Instance<M: Machine> {
    pub machine: M,
    state: M::State,
    id: String,
    timers: TimerTable<M>,
}

impl<M: Machine> Instance<M> {
    pub fn new(machine: M, id: impl Into<String>) -> Self {
        Instance {
            machine,
            state: M::INITIAL,
            id: id.into(),
            timers: TimerTable::default(),
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

    /// Arms the timers of the initial state; the shell calls it once, when the machine starts.
    pub fn start(&mut self, now: Duration) {
        self.timers.enter(&self.machine, self.state, now);
    }

    /// The earliest timer deadline, if any timer is armed.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.timers.next_deadline()
    }

    /// The earliest timer due at `now` (periodic ones re-armed for their next period).
    pub fn due_timer(&mut self, now: Duration) -> Option<M::Timer> {
        self.timers.pop_expired(&self.machine, now)
    }

    pub fn timers(&self) -> &TimerTable<M> {
        &self.timers
    }

    /// Applies one event: finds its row, runs the event's bookkeeping once and the row's actions
    /// in order, settles a choice, moves to the new state (running its entry actions), re-arms
    /// timers and logs the step. `None` when the event is ignored in this state.
    pub fn step(&mut self, event: &M::Event, ctx: &Ctx) -> Option<Stepped<M>> {
        let from = self.state;
        let Some(row) = find_row(&self.machine, from, event, ctx) else {
            tracing::debug!(actor = M::NAME, id = %self.id, state = from.name(),
                event = event.kind().name(), "event ignored");
            return None;
        };
        self.machine.observe(event, ctx);
        let mut out = Out::default();
        let mut actions = row.actions.to_vec();
        for &action in row.actions {
            self.machine.apply(action, event, ctx, &mut out);
        }
        let to = match row.to {
            To::State(s) => s,
            To::Stay => from,
            To::Choose(choice) => {
                let chosen = self.machine.choose(choice, ctx);
                debug_assert!(
                    targets_of::<M>(choice).any(|s| s == chosen),
                    "{}: choice {} picked undeclared {}",
                    M::NAME,
                    choice.name(),
                    chosen.name()
                );
                chosen
            }
        };
        self.state = to;
        if to != from {
            for &action in entry_of::<M>(to) {
                self.machine.apply(action, event, ctx, &mut out);
                actions.push(action);
            }
            tracing::info!(actor = M::NAME, id = %self.id, from = from.name(),
                event = row.event.name(), to = to.name(), "transition");
            self.timers.enter(&self.machine, to, ctx.now);
        } else {
            tracing::debug!(actor = M::NAME, id = %self.id, from = from.name(),
                event = row.event.name(), to = to.name(), "transition");
        }
        for command in out.timers {
            self.timers.command(command);
        }
        if self.is_terminal() {
            self.timers.clear();
        }
        Some(Stepped {
            from,
            event: row.event,
            to,
            actions,
            outputs: out.outputs,
        })
    }
}
