//! The identity actor's IO: reading and writing the identity file, signing, publishing.

use std::sync::Arc;

use tokio::sync::watch;

use super::shell::{Driver, Io};
use crate::crypto::identity::Identity;
use crate::crypto::keys::NodeKeys;
use crate::fsm::identity::{Action, Event, IdentityMachine};
use crate::node::home::Home;

pub struct IdentityDriver {
    home: Home,
    keys: Arc<NodeKeys>,
    published: watch::Sender<Option<Identity>>,
}

impl IdentityDriver {
    /// `published` receives every identity revision this node adopts, for propagation.
    pub fn new(
        home: Home,
        keys: Arc<NodeKeys>,
        published: watch::Sender<Option<Identity>>,
    ) -> Self {
        IdentityDriver {
            home,
            keys,
            published,
        }
    }
}

pub use crate::unix_now;

/// The identity actor takes no inputs besides its events.
pub enum NoInput {}

impl Driver for IdentityDriver {
    type M = IdentityMachine;
    type Input = NoInput;

    fn input(&mut self, input: NoInput, _: &IdentityMachine, _: &mut Io<'_, Self>) -> Vec<Event> {
        match input {}
    }

    fn perform(
        &mut self,
        action: Action,
        _event: &Event,
        machine: &IdentityMachine,
        io: &mut Io<'_, Self>,
    ) {
        match action {
            Action::LoadIdentity => {
                let home = self.home.clone();
                let keys = self.keys.clone();
                io.spawn_blocking(move || match home.load_identity(&keys) {
                    Ok(identity) => Event::Loaded(identity),
                    Err(e) => Event::LoadFailed(e.to_string()),
                });
            }
            Action::Resign => {
                let (Some(current), Some(wanted)) =
                    (machine.current.clone(), machine.wanted.clone())
                else {
                    io.send(Event::SaveFailed("nothing to re-sign".into()));
                    return;
                };
                let home = self.home.clone();
                let keys = self.keys.clone();
                io.spawn_blocking(move || {
                    let next = match current.with_contacts(&keys, wanted, unix_now()) {
                        Ok(next) => next,
                        Err(e) => return Event::SaveFailed(e.to_string()),
                    };
                    match home.save_identity(&next) {
                        Ok(()) => Event::Saved(next),
                        Err(e) => Event::SaveFailed(e.to_string()),
                    }
                });
            }
            Action::Publish => {
                if let Some(identity) = &machine.current {
                    tracing::info!(actor = "identity", node_id = %identity.node_id(),
                        revision = identity.revision(), contacts = ?identity.contacts(), "identity published");
                }
                self.published.send_replace(machine.current.clone());
            }
            Action::ReportFailure => {
                tracing::error!(
                    actor = "identity",
                    reason = machine.last_failure.as_deref().unwrap_or("unknown"),
                    "identity operation failed"
                );
            }
            Action::Adopt | Action::Defer => {}
        }
    }
}
