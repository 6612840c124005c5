//! Timer deadlines on a caller-supplied clock (quinn's `TimerTable`): the actor shell feeds it
//! real time, the simulation virtual time. Two kinds: periodic timers declared per state in the
//! table, and one-shot deadlines the machine's logic sets (`TimerCommand`).

use std::time::Duration;

use super::machine::{Machine, TimerCommand, timers_in};

/// How long a one-shot deadline lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// Until it fires, is set again or cancelled.
    Named,
    /// Also cancelled when the state changes.
    State,
}

/// The timers armed for a machine, each with its next deadline.
pub struct TimerTable<M: Machine> {
    periodic: Vec<(M::Timer, Duration)>,
    oneshot: Vec<(M::Timer, Duration, Scope)>,
}

impl<M: Machine> Default for TimerTable<M> {
    fn default() -> Self {
        TimerTable {
            periodic: Vec::new(),
            oneshot: Vec::new(),
        }
    }
}

impl<M: Machine> TimerTable<M> {
    /// Arms exactly the periodic timers of `state`, starting now, and drops the state timeouts
    /// of the state left.
    pub fn enter(&mut self, machine: &M, state: M::State, now: Duration) {
        self.periodic.clear();
        for t in timers_in::<M>(state) {
            let period = machine.timer_period(t.timer);
            self.periodic.push((t.timer, now.saturating_add(period)));
        }
        self.oneshot.retain(|&(_, _, scope)| scope == Scope::Named);
    }

    /// Applies a one-shot command from the machine's logic; setting a timer replaces an earlier
    /// deadline of the same timer.
    pub fn command(&mut self, command: TimerCommand<M::Timer>) {
        let (timer, set) = match command {
            TimerCommand::Set(t, at) => (t, Some((at, Scope::Named))),
            TimerCommand::StateTimeout(t, at) => (t, Some((at, Scope::State))),
            TimerCommand::Cancel(t) => (t, None),
        };
        self.oneshot.retain(|&(t, _, _)| t != timer);
        if let Some((at, scope)) = set {
            self.oneshot.push((timer, at, scope));
        }
    }

    pub fn clear(&mut self) {
        self.periodic.clear();
        self.oneshot.clear();
    }

    pub fn next_deadline(&self) -> Option<Duration> {
        let periodic = self.periodic.iter().map(|&(_, d)| d);
        let oneshot = self.oneshot.iter().map(|&(_, d, _)| d);
        periodic.chain(oneshot).min()
    }

    /// The earliest timer due at `now`: a periodic one is re-armed for its next period, a
    /// one-shot one is removed.
    pub fn pop_expired(&mut self, machine: &M, now: Duration) -> Option<M::Timer> {
        let periodic = self
            .periodic
            .iter()
            .enumerate()
            .filter(|(_, (_, d))| *d <= now)
            .min_by_key(|(_, (_, d))| *d)
            .map(|(i, &(t, d))| (i, t, d));
        let oneshot = self
            .oneshot
            .iter()
            .enumerate()
            .filter(|(_, (_, d, _))| *d <= now)
            .min_by_key(|(_, (_, d, _))| *d)
            .map(|(i, &(t, d, _))| (i, t, d));
        match (periodic, oneshot) {
            (Some((_, _, p)), Some((i, t, o))) if o <= p => {
                self.oneshot.remove(i);
                Some(t)
            }
            (None, Some((i, t, _))) => {
                self.oneshot.remove(i);
                Some(t)
            }
            (Some((index, timer, deadline)), _) => {
                let period = machine.timer_period(timer).max(Duration::from_millis(1));
                // Skip missed periods rather than firing a burst after a stall.
                let mut next = deadline.saturating_add(period);
                if next <= now {
                    next = now.saturating_add(period);
                }
                self.periodic[index].1 = next;
                Some(timer)
            }
            (None, None) => None,
        }
    }

    /// The periodic timers armed now.
    pub fn armed(&self) -> impl Iterator<Item = M::Timer> + '_ {
        self.periodic.iter().map(|&(t, _)| t)
    }

    /// The one-shot deadlines armed now.
    pub fn deadlines(&self) -> impl Iterator<Item = (M::Timer, Duration)> + '_ {
        self.oneshot.iter().map(|&(t, d, _)| (t, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::network_connector::{NetworkConnector, State, Timer};

    #[test]
    fn a_change_of_state_drops_state_timeouts_and_keeps_named_deadlines() {
        let m = NetworkConnector::default();
        let mut t = TimerTable::<NetworkConnector>::default();
        t.command(TimerCommand::Set(Timer::Dial, Duration::from_secs(10)));
        t.command(TimerCommand::StateTimeout(
            Timer::Rebind,
            Duration::from_secs(20),
        ));
        t.enter(&m, State::Online, Duration::from_secs(1));
        let left: Vec<_> = t.deadlines().collect();
        assert_eq!(left, vec![(Timer::Dial, Duration::from_secs(10))]);
    }

    #[test]
    fn the_earliest_deadline_fires_first_and_one_shots_fire_once() {
        let m = NetworkConnector::default();
        let mut t = TimerTable::<NetworkConnector>::default();
        t.enter(&m, State::Offline, Duration::ZERO); // Rebind every 5 s
        t.command(TimerCommand::Set(Timer::Dial, Duration::from_secs(3)));
        assert_eq!(t.next_deadline(), Some(Duration::from_secs(3)));
        assert_eq!(t.pop_expired(&m, Duration::from_secs(2)), None);
        assert_eq!(t.pop_expired(&m, Duration::from_secs(6)), Some(Timer::Dial));
        assert_eq!(
            t.pop_expired(&m, Duration::from_secs(6)),
            Some(Timer::Rebind)
        );
        // The periodic one is re-armed, the one-shot is gone.
        assert_eq!(t.pop_expired(&m, Duration::from_secs(6)), None);
        assert_eq!(t.next_deadline(), Some(Duration::from_secs(10)));
        t.command(TimerCommand::Set(Timer::Dial, Duration::from_secs(8)));
        t.command(TimerCommand::Cancel(Timer::Dial));
        assert_eq!(t.next_deadline(), Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_periodic_timer_due_before_a_one_shot_fires_first_and_clear_empties_all() {
        let m = NetworkConnector::default();
        let mut t = TimerTable::<NetworkConnector>::default();
        t.enter(&m, State::Offline, Duration::ZERO); // Rebind at 5 s
        t.command(TimerCommand::Set(Timer::Dial, Duration::from_secs(7)));
        assert_eq!(
            t.pop_expired(&m, Duration::from_secs(8)),
            Some(Timer::Rebind)
        );
        assert_eq!(t.pop_expired(&m, Duration::from_secs(8)), Some(Timer::Dial));
        t.command(TimerCommand::Set(Timer::Dial, Duration::from_secs(20)));
        t.clear();
        assert_eq!(t.next_deadline(), None);
        assert_eq!(t.armed().count(), 0);
    }
}
