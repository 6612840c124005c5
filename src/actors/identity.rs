//! The identity actor's IO: reading and writing the identity file, signing, publishing.

use std::sync::Arc;

use tokio::sync::watch;

use actix::prelude::*;

use super::registry::Registry;
use super::shell::{Deliver, Driver, Io, Shell};
use crate::crypto::identity::Identity;
use crate::crypto::keys::NodeKeys;
use crate::fsm::identity::{Event, IdentityMachine, Output};

/// Where the signed identity document lives (the node's home directory).
pub trait IdentityFile: Send + Sync + 'static {
    fn load(&self, keys: &NodeKeys) -> Result<Identity, IdentityFileError>;
    fn save(&self, identity: &Identity) -> Result<(), IdentityFileError>;
}

/// Why the identity document could not be read or written (the home's own error).
pub type IdentityFileError = Box<dyn std::error::Error + Send + Sync>;

pub struct IdentityDriver {
    home: Arc<dyn IdentityFile>,
    keys: Arc<NodeKeys>,
    published: watch::Sender<Option<Identity>>,
}

impl IdentityDriver {
    /// `published` receives every identity revision this node adopts, for propagation.
    pub fn new(
        home: Arc<dyn IdentityFile>,
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

/// The identity actor takes no inputs besides its events.
pub enum NoInput {}

/// Starts the identity actor: it loads the identity, then re-signs it if `contacts` differ.
pub async fn start(
    driver: IdentityDriver,
    contacts: Vec<String>,
    registry: &Registry,
) -> Addr<Shell<IdentityDriver>> {
    let addr = Shell::new(IdentityMachine::default(), "self", driver, registry.clone()).start();
    let _ = addr.send(Deliver(Event::Start)).await;
    let _ = addr.send(Deliver(Event::ContactsChanged(contacts))).await;
    addr
}

impl Driver for IdentityDriver {
    type M = IdentityMachine;
    type Input = NoInput;
    type Query = NoInput;
    type Answer = ();

    fn input(&mut self, input: NoInput, _: &IdentityMachine, _: &mut Io<'_, Self>) -> Vec<Event> {
        match input {}
    }

    fn query(&mut self, query: NoInput, _: &IdentityMachine, _: &mut Io<'_, Self>) {
        match query {}
    }

    fn perform(&mut self, output: Output, machine: &IdentityMachine, io: &mut Io<'_, Self>) {
        match output {
            Output::Load => {
                let home = self.home.clone();
                let keys = self.keys.clone();
                io.spawn_blocking(move || match home.load(&keys) {
                    Ok(identity) => Event::Loaded(identity),
                    Err(e) => Event::LoadFailed(e.to_string()),
                });
            }
            Output::Resign(wanted) => {
                let Some(current) = machine.current.clone() else {
                    io.send(Event::SaveFailed("nothing to re-sign".into()));
                    return;
                };
                let home = self.home.clone();
                let keys = self.keys.clone();
                let now = io.unix_secs();
                io.spawn_blocking(move || {
                    let next = match current.with_contacts(&keys, wanted, now) {
                        Ok(next) => next,
                        Err(e) => return Event::SaveFailed(e.to_string()),
                    };
                    match home.save(&next) {
                        Ok(()) => Event::Saved(next),
                        Err(e) => Event::SaveFailed(e.to_string()),
                    }
                });
            }
            Output::Publish(identity) => {
                tracing::info!(actor = "identity", node_id = %identity.node_id(),
                    revision = identity.revision(), contacts = ?identity.contacts(), "identity published");
                self.published.send_replace(Some(*identity));
            }
            Output::Failed(reason) => {
                tracing::error!(actor = "identity", reason = %reason, "identity operation failed");
            }
        }
    }
}
