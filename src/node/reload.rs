//! SIGHUP: re-read and validate `config.toml`; apply what can change live (shutdown timeout,
//! disk reserve, contacts, new peers, the supplier's offer), warn about what needs a restart, and
//! keep the running config when the new file is bad.

use super::config::Config;
use super::home::Home;
use super::settings;
use super::signals;
use super::wiring::Actors;
use crate::actors::network_connector::{NetAnswer, NetInput, NetQuery};
use crate::actors::{Deliver, Input, Query};
use crate::crypto::identity::Identity;
use crate::fsm::identity::Event as IdentityEvent;

/// Reloads the config into `config`, or logs why it stays.
pub fn reload(home: &Home, config: &mut Config, actors: &Actors) {
    let newer = match Config::load(home.root()) {
        Ok(newer) => newer,
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; keeping the running config");
            return;
        }
    };
    signals::set_shutdown_timeout(newer.node.shutdown_timeout.get());
    actors.disk.health.set_keep_free(newer.node.keep_free.0);
    super::health::check_donation(&newer, &home.store_dir());
    let needs_restart = config.restart_needed(&newer);
    if !needs_restart.is_empty() {
        tracing::warn!(keys = ?needs_restart, "config changes that take effect after a restart");
    }
    if newer.contacts() != config.contacts() {
        let identity = actors.identity.clone();
        let contacts = newer.contacts();
        actix::spawn(async move {
            let _ = identity
                .send(Deliver(IdentityEvent::ContactsChanged(contacts)))
                .await;
        });
    }
    for peer in newer.peers.iter().filter(|p| !config.peers.contains(p)) {
        if let Ok(identity) = Identity::from_card(&peer.card) {
            add_peer(actors, identity, peer.name.clone());
        }
    }
    if newer.bandwidth != config.bandwidth {
        super::bandwidth::reload(&actors.shaper, &newer);
    }
    if newer.supplier != config.supplier {
        let open = settings::open(&newer);
        let reconfigure = settings::supplier_reconfigure(&newer);
        let (network, supplier) = (actors.network.clone(), actors.supplier.clone());
        actix::spawn(async move {
            let _ = network.send(Input(NetInput::SetOpen(open))).await;
            let _ = supplier.send(Input(reconfigure)).await;
        });
    }
    *config = newer;
    tracing::info!(file = %home.config_file().display(), "config reloaded");
}

/// A peer new in the config joins the peer book.
fn add_peer(actors: &Actors, identity: Identity, label: Option<String>) {
    let query = NetQuery::AddPeer {
        identity: Box::new(identity),
        label,
    };
    let network = actors.network.clone();
    actix::spawn(async move {
        match network.send(Query::new(query)).await {
            Ok(NetAnswer::Added(Err(e))) => {
                tracing::error!(error = %e, "cannot add a peer from the config")
            }
            Ok(NetAnswer::Added(Ok((_, saved)))) => {
                if let Err(e) = saved.await {
                    tracing::error!(error = %e, "cannot save a peer from the config");
                }
            }
            _ => {}
        }
    });
}
