//! Per-state periodic timers, kept as deadlines on a caller-supplied clock (quinn's
//! `TimerTable`): the actor shell feeds it real time, the simulation virtual time.

use std::time::Duration;

use super::machine::{Machine, Stepped, timers_in};

/// The timers armed for a machine's current state, each with its next deadline.
pub struct TimerTable<M: Machine> {
    armed: Vec<(M::Timer, Duration)>,
}

impl<M: Machine> Default for TimerTable<M> {
    fn default() -> Self {
        TimerTable { armed: Vec::new() }
    }
}

impl<M: Machine> TimerTable<M> {
    /// Arms exactly the timers of `state`, starting now.
    pub fn enter(&mut self, machine: &M, state: M::State, now: Duration) {
        self.armed.clear();
        for t in timers_in::<M>(state) {
            self.armed
                .push((t.timer, now + machine.timer_period(t.timer)));
        }
    }

    /// Re-arms after a step when the state changed; a self-transition keeps timers running.
    pub fn after_step(&mut self, machine: &M, stepped: &Stepped<M>, now: Duration) {
        if stepped.state_changed() {
            self.enter(machine, stepped.to, now);
        }
    }

    pub fn clear(&mut self) {
        self.armed.clear();
    }

    pub fn next_deadline(&self) -> Option<Duration> {
        self.armed.iter().map(|&(_, d)| d).min()
    }

    /// The earliest timer due at `now`, re-armed for its next period.
    pub fn pop_expired(&mut self, machine: &M, now: Duration) -> Option<M::Timer> {
        let (index, &(timer, deadline)) = self
            .armed
            .iter()
            .enumerate()
            .filter(|(_, (_, d))| *d <= now)
            .min_by_key(|(_, (_, d))| *d)?;
        let period = machine.timer_period(timer).max(Duration::from_millis(1));
        // Skip missed periods rather than firing a burst after a stall.
        let mut next = deadline + period;
        if next <= now {
            next = now + period;
        }
        self.armed[index].1 = next;
        Some(timer)
    }

    pub fn armed(&self) -> impl Iterator<Item = M::Timer> + '_ {
        self.armed.iter().map(|&(t, _)| t)
    }
}
