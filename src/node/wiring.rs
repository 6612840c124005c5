//! The actors of a running node, started in order and wired to each other (identity, network,
//! supplier and customer sides, backups, the monitor and rebuilder, restores, drills), and
//! stopped in the reverse order.

use std::sync::{Arc, Mutex};

use actix::prelude::*;
use tokio::sync::watch;

use super::backups::Backups;
use super::config::Config;
use super::drills::Drills;
use super::health::DiskHealth;
use super::home::Home;
use super::restores::Restores;
use super::settings;
use super::signals::Shutdown as Progress;
use crate::actors::backup_job::{BackupWiring, CatalogRefresh};
use crate::actors::drill::DrillWiring;
use crate::actors::fire_hire::{self, FireHireDriver};
use crate::actors::identity::{self, IdentityDriver};
use crate::actors::monitor::{self, MonitorStatus, MonitorWiring};
use crate::actors::network_connector::{
    self, NetInput, NetworkConnectorDriver, NetworkWiring, Presence,
};
use crate::actors::rebuilder::RebuilderWiring;
use crate::actors::restore_worker::RestoreWiring;
use crate::actors::router::{RequestKind, Router};
use crate::actors::services::Services;
use crate::actors::status::{BackupStatus, RestoreStatus};
use crate::actors::supplier_service::{self, SupplierServiceDriver};
use crate::actors::{Input, Registry, Shell, Shutdown};
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::{Identity, NodeId};
use crate::crypto::keys::NodeKeys;
use crate::store::jobs;
use crate::store::{KvStore, Writer};

pub type NetworkAddr = Addr<Shell<NetworkConnectorDriver>>;
pub type SupplierAddr = Addr<Shell<SupplierServiceDriver>>;
pub type CustomerAddr = Addr<Shell<FireHireDriver>>;
pub type IdentityAddr = Addr<Shell<IdentityDriver>>;

/// The node's disk: the bounded writer every synced write goes through, and its health.
pub struct Disk {
    pub writer: Writer,
    pub health: Arc<DiskHealth>,
}

/// What the actors are started from.
pub struct Base {
    pub home: Home,
    pub keys: Arc<NodeKeys>,
    pub data_keys: Arc<DataKeys>,
    pub identity: Identity,
    pub store: Arc<dyn KvStore>,
    pub disk: Disk,
    pub registry: Registry,
}

/// The running actors and the status each one publishes.
pub struct Actors {
    pub identity: IdentityAddr,
    pub network: NetworkAddr,
    pub supplier: SupplierAddr,
    pub customer: CustomerAddr,
    pub backups: std::rc::Rc<Backups>,
    pub restores: std::rc::Rc<Restores>,
    pub drills: std::rc::Rc<Drills>,
    /// The identity as published (each new revision), for `status`.
    pub published: watch::Receiver<Option<Identity>>,
    pub backup_status: Arc<Mutex<BackupStatus>>,
    pub restore_status: Arc<Mutex<RestoreStatus>>,
    pub monitor_status: Arc<Mutex<MonitorStatus>>,
    pub disk: Disk,
    pub store: Arc<dyn KvStore>,
    pub registry: Registry,
    /// The bandwidth limits every session is under (reloaded on SIGHUP).
    pub shaper: Arc<crate::net::bandwidth::Shaper>,
}

/// Starts every actor, in order: identity, the peer-facing actors, backups, the monitor and
/// rebuilder, restores.
pub async fn start(base: Base, config: &Config) -> Actors {
    let Base {
        home,
        keys,
        data_keys,
        identity,
        store,
        disk,
        registry,
    } = base;
    let (published_tx, published) = watch::channel(Some(identity.clone()));
    let identity_driver = IdentityDriver::new(Arc::new(home.clone()), keys.clone(), published_tx);
    let identity_actor = identity::start(identity_driver, config.contacts(), &registry).await;
    let shaper = super::bandwidth::shaper(config);
    super::bandwidth::tick_every_second(shaper.clone());
    let peers = start_peers(Start {
        home: &home,
        config,
        keys: &keys,
        node_id: identity.node_id(),
        identity: published.clone(),
        store: store.clone(),
        writer: disk.writer.clone(),
        disk: disk.health.clone(),
        registry: &registry,
        shaper: shaper.clone(),
    })
    .await;
    propagate_identity(
        published.clone(),
        identity.revision(),
        peers.network.clone(),
    );

    let services = Services {
        kv: store.clone(),
        writer: disk.writer.clone(),
        network: peers.network.clone(),
        fire_hire: peers.customer.clone(),
        keys: data_keys,
        signer: keys.signing_key().clone(),
        registry: registry.clone(),
        reading: Default::default(),
    };
    let backup_status = Arc::new(Mutex::new(BackupStatus::default()));
    let settings = settings::backup(config, &home);
    let unfinished = jobs::jobs(store.as_ref()).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read unfinished backups");
        Vec::new()
    });
    let refresh = CatalogRefresh {
        services: services.clone(),
        settings: settings.clone(),
    };
    let backups = Backups::start(
        BackupWiring {
            services: services.clone(),
            settings,
            status: backup_status.clone(),
        },
        unfinished,
    );
    let monitor_status = Arc::new(Mutex::new(MonitorStatus::default()));
    let monitor_wiring = MonitorWiring {
        services: services.clone(),
        status: monitor_status.clone(),
        settings: settings::monitor(config),
    };
    let rebuilder_wiring = RebuilderWiring {
        services: services.clone(),
        request_timeout: settings::request_timeout(config),
        refresh,
    };
    let monitor_started = match config.backup.layout() {
        Ok(layout) => monitor::start(monitor_wiring, rebuilder_wiring, layout).await,
        Err(e) => Err(e.into()),
    };
    let monitor_inbox = match monitor_started {
        Ok(addr) => Some(addr.recipient()),
        Err(e) => {
            tracing::error!(error = %e, "the monitor did not start: suppliers are not audited");
            None
        }
    };
    let restore_status = Arc::new(Mutex::new(RestoreStatus::default()));
    let restores = Restores::start(RestoreWiring {
        services: services.clone(),
        request_timeout: settings::request_timeout(config),
        status: restore_status.clone(),
        monitor: monitor_inbox.clone(),
    });
    let drill = DrillWiring {
        services,
        settings: settings::drill(config),
        monitor: monitor_inbox,
    };
    Actors {
        identity: identity_actor,
        network: peers.network,
        supplier: peers.supplier,
        customer: peers.customer,
        backups,
        restores,
        drills: std::rc::Rc::new(Drills::new(drill, store.clone())),
        published,
        backup_status,
        restore_status,
        monitor_status,
        disk,
        store,
        registry,
        shaper,
    }
}

impl Actors {
    /// Stops every actor, each awaited. Bounded by the watchdog (node.shutdown_timeout from the
    /// first signal), not by a timer on this loop: a write stuck on a frozen disk could hold the
    /// loop itself.
    pub async fn stop(&self, progress: &Progress) {
        // A running backup stops first: it is resumed from its job record at the next start.
        progress.begin("backup job");
        self.backups.shutdown().await;
        progress.end("backup job");
        progress.begin("restore");
        self.restores.shutdown().await;
        progress.end("restore");
        progress.begin("customer actor");
        let _ = self.customer.send(Shutdown).await;
        progress.end("customer actor");
        progress.begin("supplier actor");
        let _ = self.supplier.send(Shutdown).await;
        progress.end("supplier actor");
        progress.begin("network actor");
        let _ = self.network.send(Shutdown).await;
        progress.end("network actor");
        progress.begin("identity actor");
        let _ = self.identity.send(Shutdown).await;
        progress.end("identity actor");
    }
}

/// Every new identity revision goes to every connected peer.
fn propagate_identity(
    mut revisions: watch::Receiver<Option<Identity>>,
    mut pushed: u64,
    network: NetworkAddr,
) {
    actix::spawn(async move {
        while revisions.changed().await.is_ok() {
            let current = revisions.borrow_and_update().clone();
            // Peers got the current revision in their handshake: push only newer ones.
            if let Some(identity) = current.filter(|i| i.revision() > pushed) {
                pushed = identity.revision();
                let _ = network
                    .send(Input(NetInput::OwnIdentity(Box::new(identity))))
                    .await;
            }
        }
    });
}

/// What the peer-facing actors are started with.
struct Start<'a> {
    home: &'a Home,
    config: &'a Config,
    keys: &'a NodeKeys,
    node_id: NodeId,
    identity: watch::Receiver<Option<Identity>>,
    store: Arc<dyn KvStore>,
    writer: Writer,
    disk: Arc<DiskHealth>,
    registry: &'a Registry,
    shaper: Arc<crate::net::bandwidth::Shaper>,
}

struct Peers {
    network: NetworkAddr,
    supplier: SupplierAddr,
    customer: CustomerAddr,
}

/// Starts the network, supplier and customer actors, wired to each other: the customer's and
/// supplier's addresses exist before they start, so the network is given them at construction.
async fn start_peers(start: Start<'_>) -> Peers {
    let Start {
        home,
        config,
        registry,
        ..
    } = start;
    let supplier_ctx = actix::Context::<Shell<SupplierServiceDriver>>::new();
    let customer_ctx = actix::Context::<Shell<FireHireDriver>>::new();
    let (supplier, customer) = (supplier_ctx.address(), customer_ctx.address());

    let mut router = Router::default();
    router.register(
        &[
            RequestKind::ServiceRequest,
            RequestKind::ServiceCancel,
            RequestKind::StoreFragment,
            RequestKind::RetrieveFragment,
            RequestKind::ListFragments,
            RequestKind::DeleteFragment,
            RequestKind::AuditChallenge,
            RequestKind::SliceChallenge,
        ],
        supplier.clone().recipient(),
    );
    router.register(&[RequestKind::SupplierCancel], customer.clone().recipient());
    let wiring = NetworkWiring {
        router,
        presence: vec![customer.clone().recipient::<Presence>()],
    };
    let network = start_network(&start, wiring).await;
    let Start { store, writer, .. } = start;

    let supplier_settings = settings::supplier(config, home.store_dir(), start.disk.clone());
    let supplier =
        supplier_service::start(supplier_ctx, supplier_settings, store.clone(), registry).await;

    let positions = settings::positions(config) as usize;
    let driver = FireHireDriver::new(
        settings::customer(config),
        writer,
        network.clone(),
        registry.clone(),
    );
    let customer =
        fire_hire::start(customer_ctx, driver, positions, store.as_ref(), registry).await;
    Peers {
        network,
        supplier,
        customer,
    }
}

/// Starts the network actor with the persisted and configured peers.
async fn start_network(start: &Start<'_>, wiring: NetworkWiring) -> NetworkAddr {
    let Start {
        config,
        keys,
        node_id,
        registry,
        ..
    } = *start;
    let mut peers = network_connector::load_peers(start.store.as_ref());
    for entry in &config.peers {
        // Validated with the config: a card that does not verify never gets here.
        if let Ok(identity) = Identity::from_card(&entry.card) {
            peers.push((identity, entry.name.clone()));
        }
    }
    let (policy_tx, policy_rx) = watch::channel(settings::trust(config));
    let shared = Arc::new(settings::session(
        config,
        keys,
        start.identity.clone(),
        policy_rx,
        start.shaper.clone(),
    ));
    let driver = NetworkConnectorDriver::new(
        settings::network(config),
        shared,
        start.writer.clone(),
        registry.clone(),
        policy_tx,
        wiring,
        peers,
    );
    let machine = settings::connector(config, node_id);
    network_connector::start(driver, machine, registry).await
}
