//! Which machines are alive and in which state, for `bitdust status`. Shells write it on every
//! transition; the control socket reads it. Observation only: an actor reads another's entry
//! only to show it (the state of its sessions or connectors in its status section), never to
//! decide anything. What an actor needs to know of another comes as typed news or a typed
//! `Query` (a position's supplier up or down: fire_hire's `PositionNews` and `Positions`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::status::MachineStatus;

/// (actor, instance id) -> (state, entered at)
type Entries = BTreeMap<(&'static str, String), (&'static str, Instant)>;

#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Entries>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, actor: &'static str, id: &str, state: &'static str) {
        self.lock()
            .insert((actor, id.to_string()), (state, Instant::now()));
    }

    pub fn remove(&self, actor: &'static str, id: &str) {
        self.lock().remove(&(actor, id.to_string()));
    }

    pub fn snapshot(&self) -> Vec<MachineStatus> {
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|((actor, id), (state, since))| MachineStatus {
                actor: actor.to_string(),
                id: id.clone(),
                state: state.to_string(),
                for_secs: now.duration_since(*since).as_secs(),
            })
            .collect()
    }

    /// The state `actor`'s instance `id` is in, to show in a status section (never to decide).
    pub fn state_of(&self, actor: &str, id: &str) -> Option<&'static str> {
        self.lock()
            .iter()
            .find(|((a, i), _)| *a == actor && i == id)
            .map(|(_, (state, _))| *state)
    }
}
