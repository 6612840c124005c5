//! Structural checks of a machine's table, shared by the unit tests of every machine and by the
//! property tests: reachability, a way out of every non-terminal state, timers where declared,
//! choices with declared targets; and a driver for random walks that checks what the table
//! cannot say (terminal states are never left, the timers armed are those declared, a choice
//! picks one of its targets, the machine's own invariant holds).

use std::collections::BTreeSet;
use std::time::Duration;

use super::machine::{
    Ctx, Instance, Kinded, Label, Machine, To, Violation, row_targets, targets_of, timers_in,
};

/// Problems with a machine's table; empty when it is sound.
pub fn table_problems<M: Machine>() -> Vec<String> {
    let mut problems = Vec::new();
    // Reachability over the table (guards and choices assumed satisfiable).
    let mut reached = BTreeSet::from([M::INITIAL]);
    let mut frontier = vec![M::INITIAL];
    while let Some(state) = frontier.pop() {
        for row in M::rows().iter().filter(|r| r.from.contains(&state)) {
            for to in row_targets(row, state) {
                if reached.insert(to) {
                    frontier.push(to);
                }
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
            .filter(|r| r.from.contains(&state))
            .any(|r| row_targets(r, state).iter().any(|&to| to != state));
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
    // Every choice a row names declares its targets.
    for row in M::rows() {
        if let To::Choose(c) = row.to
            && targets_of::<M>(c).next().is_none()
        {
            problems.push(format!("{}: choice {} has no targets", M::NAME, c.name()));
        }
    }
    // Every periodic timer fires an event that some row in each of its states handles.
    for t in M::timers() {
        let kind = M::timer_event(t.timer).kind();
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
    let kind = M::shutdown_event().kind();
    for &state in M::State::ALL {
        if M::TERMINAL.contains(&state) {
            continue;
        }
        let ok = M::rows().iter().any(|r| {
            r.from.contains(&state)
                && r.event == kind
                && row_targets(r, state)
                    .iter()
                    .all(|to| M::TERMINAL.contains(to))
        });
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
    let sampled: BTreeSet<_> = M::sample_events().iter().map(Kinded::kind).collect();
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

/// Drives `events` through a fresh instance on a virtual clock that advances one second per
/// event (firing the timers that fall due), and checks after every step that terminal states are
/// never left, that a choice picked one of its declared targets, that exactly the periodic timers
/// the current state declares are armed, and that the machine's invariant holds. Returns the
/// instance, or the first violation.
pub fn drive<M: Machine>(machine: M, events: &[M::Event]) -> Result<Instance<M>, Violation> {
    let mut instance = Instance::new(machine, "check");
    let mut now = Duration::ZERO;
    instance.start(now);
    let check_step = |instance: &mut Instance<M>, event: &M::Event, ctx: &Ctx| {
        let before = instance.state();
        let Some(stepped) = instance.step(event, ctx) else {
            return if instance.state() == before {
                Ok(())
            } else {
                Err(format!(
                    "ignored event changed state from {}",
                    before.name()
                ))
            };
        };
        if M::TERMINAL.contains(&before) {
            return Err(format!("left terminal state {}", before.name()));
        }
        // Some row for this event in that state must lead where the machine went.
        let mut rows = M::rows()
            .iter()
            .filter(|r| r.event == stepped.event && r.from.contains(&before))
            .peekable();
        if rows.peek().is_none() {
            return Err(format!(
                "no row for {} in {}",
                stepped.event.name(),
                before.name()
            ));
        }
        let allowed = rows.any(|r| row_targets(r, before).contains(&stepped.to));
        if !allowed {
            return Err(format!(
                "{} led from {} to {}, which no row allows",
                stepped.event.name(),
                before.name(),
                stepped.to.name()
            ));
        }
        let state = instance.state();
        let armed: BTreeSet<_> = instance.timers().armed().collect();
        let declared: BTreeSet<_> = timers_in::<M>(state).map(|t| t.timer).collect();
        if armed != declared {
            return Err(format!(
                "timers armed in {} differ from those declared",
                state.name()
            ));
        }
        instance
            .machine
            .invariant(state)
            .map_err(|e| format!("invariant broken in {}: {e}", state.name()))
    };
    for (i, event) in events.iter().enumerate() {
        now += Duration::from_secs(1);
        let ctx = Ctx {
            now,
            wall: now,
            random: i as u64 * 7919,
        };
        while let Some(timer) = instance.due_timer(now) {
            check_step(&mut instance, &M::timer_event(timer), &ctx)?;
        }
        check_step(&mut instance, event, &ctx)?;
    }
    Ok(instance)
}
