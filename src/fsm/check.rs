//! Structural checks of a machine's table, shared by the unit tests of every machine and by the
//! property tests: reachability, a way out of every non-terminal state, timers where declared.

use std::collections::BTreeSet;

use std::time::Duration;

use super::machine::{Instance, Label, Machine, find_row, timers_in};
use super::timers::TimerTable;

/// Problems with a machine's table; empty when it is sound.
pub fn table_problems<M: Machine>() -> Vec<String> {
    let mut problems = Vec::new();
    // Reachability over the table (guards assumed satisfiable).
    let mut reached = BTreeSet::from([M::INITIAL]);
    let mut frontier = vec![M::INITIAL];
    while let Some(state) = frontier.pop() {
        for row in M::rows().iter().filter(|r| r.from.contains(&state)) {
            if reached.insert(row.to) {
                frontier.push(row.to);
            }
        }
    }
    for &state in M::State::ALL {
        if !reached.contains(&state) {
            problems.push(format!(
                "{}: state {} is unreachable",
                M::NAME,
                state.name()
            ));
        }
        let terminal = M::TERMINAL.contains(&state);
        let leaves = M::rows()
            .iter()
            .any(|r| r.from.contains(&state) && r.to != state);
        if !terminal && !leaves {
            problems.push(format!(
                "{}: state {} has no way out",
                M::NAME,
                state.name()
            ));
        }
        if terminal && M::rows().iter().any(|r| r.from.contains(&state)) {
            problems.push(format!(
                "{}: terminal state {} has transitions",
                M::NAME,
                state.name()
            ));
        }
        if terminal && timers_in::<M>(state).next().is_some() {
            problems.push(format!(
                "{}: terminal state {} has a timer",
                M::NAME,
                state.name()
            ));
        }
    }
    // Every timer fires an event that some row in one of its states handles.
    for t in M::timers() {
        let event = M::timer_event(t.timer, Duration::ZERO);
        let kind = M::kind(&event);
        for state in t.states {
            if !M::rows()
                .iter()
                .any(|r| r.event == kind && r.from.contains(state))
            {
                problems.push(format!(
                    "{}: timer {} runs in {} but no row there handles {}",
                    M::NAME,
                    t.timer.name(),
                    state.name(),
                    kind.name()
                ));
            }
        }
    }
    // Shutdown reaches a terminal state from every non-terminal state.
    let shutdown = M::shutdown_event();
    let kind = M::kind(&shutdown);
    for &state in M::State::ALL {
        if M::TERMINAL.contains(&state) {
            continue;
        }
        let ok = M::rows()
            .iter()
            .any(|r| r.from.contains(&state) && r.event == kind && M::TERMINAL.contains(&r.to));
        if !ok {
            problems.push(format!(
                "{}: {} does not close state {}",
                M::NAME,
                kind.name(),
                state.name()
            ));
        }
    }
    // Every event kind has a sample, so property tests cover it.
    let sampled: BTreeSet<_> = M::sample_events().iter().map(M::kind).collect();
    for &kind in M::EventKind::ALL {
        if !sampled.contains(&kind) {
            problems.push(format!(
                "{}: no sample event of kind {}",
                M::NAME,
                kind.name()
            ));
        }
    }
    problems
}

/// Drives `events` through a fresh instance (with its timer table on a virtual clock that
/// advances one second per event) and checks after every step that what happened is a row of the
/// table, that terminal states are never left, and that exactly the timers the current state
/// declares are armed. Returns the instance, or the first violation.
pub fn drive<M: Machine>(machine: M, events: &[M::Event]) -> Result<Instance<M>, String> {
    let mut instance = Instance::new(machine, "check");
    let mut timers = TimerTable::<M>::default();
    let mut now = Duration::ZERO;
    timers.enter(&instance.machine, instance.state(), now);
    for event in events {
        now += Duration::from_secs(1);
        while let Some(timer) = timers.pop_expired(&instance.machine, now) {
            if !timers_in::<M>(instance.state()).any(|t| t.timer == timer) {
                return Err(format!(
                    "timer {} fired in {}",
                    timer.name(),
                    instance.state().name()
                ));
            }
            let timer_event = M::timer_event(timer, now);
            if let Some(s) = instance.step(&timer_event) {
                timers.after_step(&instance.machine, &s, now);
            }
        }
        let before = instance.state();
        let expected = find_row(&instance.machine, before, event).map(|r| r.to);
        let stepped = instance.step(event);
        match (stepped, expected) {
            (None, None) => {
                if instance.state() != before {
                    return Err(format!(
                        "ignored event changed state from {}",
                        before.name()
                    ));
                }
            }
            (Some(s), Some(to)) => {
                if s.from != before || s.to != to || instance.state() != to {
                    return Err(format!("step disagrees with table at {}", before.name()));
                }
                if M::TERMINAL.contains(&before) {
                    return Err(format!("left terminal state {}", before.name()));
                }
                timers.after_step(&instance.machine, &s, now);
            }
            _ => return Err(format!("step and table disagree at {}", before.name())),
        }
        let state = instance.state();
        let armed: BTreeSet<_> = timers.armed().collect();
        let declared: BTreeSet<_> = timers_in::<M>(state).map(|t| t.timer).collect();
        if armed != declared {
            return Err(format!(
                "timers armed in {} differ from those declared",
                state.name()
            ));
        }
    }
    Ok(instance)
}
