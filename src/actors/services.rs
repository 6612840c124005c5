//! The handles the owner's actors are started with: one value, cloned into each actor's wiring
//! beside what is that actor's own (settings, status), instead of the same handles copied field
//! by field into every wiring.

use std::sync::Arc;

use actix::Addr;
use ed25519_dalek::{SigningKey, VerifyingKey};

use super::fire_hire::FireHireDriver;
use super::network_connector::NetworkConnectorDriver;
use super::registry::Registry;
use super::shell::Shell;
use crate::crypto::derive::DataKeys;
use crate::store::catalog::ReadPins;
use crate::store::{KvStore, Writer};

#[derive(Clone)]
pub struct Services {
    /// The node's database, read directly; synced writes go through `writer`.
    pub kv: Arc<dyn KvStore>,
    /// The bounded writer thread every synced write goes through.
    pub writer: Writer,
    /// Requests to peers go through the network connector's links.
    pub network: Addr<Shell<NetworkConnectorDriver>>,
    /// The customer side: positions, their suppliers and their up/down news.
    pub fire_hire: Addr<Shell<FireHireDriver>>,
    /// The owner's data keys (blocks, catalog, chunk ids).
    pub keys: Arc<DataKeys>,
    /// The owner's signing key: manifests and recovery records are signed with it.
    pub signer: SigningKey,
    /// Where actors publish their state for `status` (display only: nothing decides from it).
    pub registry: Registry,
    /// The versions restores are reading: retention keeps them meanwhile.
    pub reading: ReadPins,
}

impl Services {
    /// The owner's public key: what manifests and records are verified against.
    pub fn owner(&self) -> VerifyingKey {
        self.signer.verifying_key()
    }
}
