//! `bitdust run`: starts every actor, serves the control socket, handles signals.
//!
//! SIGHUP re-reads the config (a bad file is logged and the running config stays).
//! SIGTERM/SIGINT: every machine is sent `Shutdown` and awaited (bounded by
//! `node.shutdown_timeout`), the store is flushed and closed last, exit status 0. A second signal
//! during that exits at once.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{oneshot, watch};

use super::config::{AcceptPolicy, Config, LogFormat};
use super::control::{self, Request, Response};
use super::home::Home;
use super::logging;
use crate::actors::customer::{self, CustomerInput, CustomerSettings, FireHireDriver};
use crate::actors::identity::IdentityDriver;
use crate::actors::network::Sinks;
use crate::actors::network::{self, NetInput, NetworkDriver, NetworkSettings};
use crate::actors::session::SessionShared;
use crate::actors::supplier::{SupplierDriver, SupplierInput, SupplierSettings};
use crate::actors::{Fire, Input, Registry, Shell, Shutdown};
use crate::crypto::identity::{Identity, NodeId};
use crate::crypto::keys::NodeKeys;
use crate::fsm::fire_hire::{Event as HireEvent, FireHire};
use crate::fsm::identity::{Event as IdentityEvent, IdentityMachine};
use crate::fsm::network_connector::{Event as NetEvent, NetworkConnector};
use crate::fsm::supplier_service::{Event as ServiceEvent, SupplierService};
use crate::net::link::TrustPolicy;
use crate::store::{KvStore, RocksStore};

type NetworkAddr = Addr<Shell<NetworkDriver>>;
type SupplierAddr = Addr<Shell<SupplierDriver>>;
type CustomerAddr = Addr<Shell<FireHireDriver>>;
type IdentityAddr = Addr<Shell<IdentityDriver>>;

/// Runs the node in the foreground until SIGTERM/SIGINT.
pub fn run(home: Home, log_format: Option<LogFormat>) -> anyhow::Result<()> {
    let config = Config::load(home.root())?;
    logging::init(log_format.unwrap_or(config.log.format), &config.log.level);
    let _lock = home.lock()?;
    let keys = Arc::new(home.load_keys()?);
    let identity = home.load_identity(&keys)?;
    let store: Arc<dyn KvStore> = Arc::new(
        RocksStore::open(&home.db_dir())
            .with_context(|| format!("opening {}", home.db_dir().display()))?,
    );
    let system = System::new();
    let result = system.block_on(node_main(
        home.clone(),
        config,
        keys,
        identity,
        store.clone(),
    ));
    // The store closes last, after every actor is gone.
    store.flush().context("flushing the database")?;
    drop(store);
    let _ = std::fs::remove_file(home.control_socket());
    if result.is_ok() {
        tracing::info!("node stopped");
    }
    result
}

async fn node_main(
    home: Home,
    mut config: Config,
    keys: Arc<NodeKeys>,
    identity: Identity,
    store: Arc<dyn KvStore>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let registry = Registry::default();
    let node_id = identity.node_id();

    let (published_tx, published_rx) = watch::channel(Some(identity.clone()));
    let identity_actor = Shell::new(
        IdentityMachine::default(),
        "self",
        IdentityDriver::new(home.clone(), keys.clone(), published_tx),
        registry.clone(),
    )
    .start();
    identity_actor.do_send(Fire(IdentityEvent::Start));
    identity_actor.do_send(Fire(IdentityEvent::ContactsChanged(config.contacts())));

    let network_actor = start_network(
        &config,
        &keys,
        node_id,
        published_rx.clone(),
        store.clone(),
        &registry,
    );
    let (supplier_actor, customer_actor) =
        start_storage(&home, &config, store, &registry, &network_actor);
    // Every new identity revision goes to every connected peer.
    let mut revisions = published_rx.clone();
    let propagate_to = network_actor.clone();
    let mut pushed = identity.revision();
    actix::spawn(async move {
        while revisions.changed().await.is_ok() {
            let current = revisions.borrow_and_update().clone();
            // Peers got the current revision in their handshake: push only newer ones.
            if let Some(identity) = current.filter(|i| i.revision() > pushed) {
                pushed = identity.revision();
                propagate_to.do_send(Input(NetInput::OwnIdentity(Box::new(identity))));
            }
        }
    });

    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let listener = control::bind(&home.control_socket())?;
    let control_state = Rc::new(ControlState {
        node_id,
        started,
        registry: registry.clone(),
        identity: published_rx,
        network: network_actor.clone(),
        supplier: supplier_actor.clone(),
        customer: customer_actor.clone(),
    });
    let handler: control::Handler = Rc::new(move |request| {
        let state = control_state.clone();
        Box::pin(async move { state.handle(request).await })
    });
    let control_task = actix::spawn(control::serve(listener, handler));

    tracing::info!(node_id = %node_id, name = identity.name(), listen = %config.node.listen,
        home = %home.root().display(), "node running");

    let stop_signal = loop {
        tokio::select! {
            _ = hup.recv() => reload(&home, &mut config, &identity_actor, &network_actor, &supplier_actor),
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    tracing::info!(signal = stop_signal, "shutting down");
    actix::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        eprintln!("bitdust: second signal, exiting without waiting");
        std::process::exit(1);
    });
    control_task.abort();

    let closing = async {
        let _ = customer_actor.send(Shutdown).await;
        let _ = supplier_actor.send(Shutdown).await;
        let _ = network_actor.send(Shutdown).await;
        let _ = identity_actor.send(Shutdown).await;
    };
    if tokio::time::timeout(config.node.shutdown_timeout.get(), closing)
        .await
        .is_err()
    {
        tracing::warn!(timeout = %config.node.shutdown_timeout, "some machines did not close in time");
    }
    System::current().stop();
    Ok(())
}

/// What the control socket needs to answer.
struct ControlState {
    node_id: NodeId,
    started: Instant,
    registry: Registry,
    identity: watch::Receiver<Option<Identity>>,
    network: NetworkAddr,
    supplier: SupplierAddr,
    customer: CustomerAddr,
}

impl ControlState {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => {
                let current = self.identity.borrow().clone();
                let (tx, rx) = oneshot::channel();
                self.network.do_send(Input(NetInput::Status(tx)));
                let network = rx.await.unwrap_or_default();
                let (tx, rx) = oneshot::channel();
                self.customer.do_send(Input(CustomerInput::Status(tx)));
                let customer = rx.await.unwrap_or_default();
                let (tx, rx) = oneshot::channel();
                self.supplier.do_send(Input(SupplierInput::Status(tx)));
                let supplier = rx.await.unwrap_or_default();
                Response::ok(json!({
                    "node_id": self.node_id.to_string(),
                    "name": current.as_ref().map(|i| i.name().to_string()),
                    "revision": current.as_ref().map(Identity::revision),
                    "contacts": current.as_ref().map(|i| i.contacts().to_vec()),
                    "pid": std::process::id(),
                    "uptime_secs": self.started.elapsed().as_secs(),
                    "machines": self.registry.snapshot(),
                    "network": network,
                    "customer": customer,
                    "supplier": supplier,
                }))
            }
            Request::PeerAdd { card, name } => {
                let identity = match Identity::from_card(&card) {
                    Ok(identity) => identity,
                    Err(e) => return Response::error(format!("invalid card: {e}")),
                };
                let node = identity.node_id();
                let (tx, rx) = oneshot::channel();
                self.network.do_send(Input(NetInput::AddPeer {
                    identity: Box::new(identity),
                    label: name,
                    reply: tx,
                }));
                answer(rx, |new| json!({ "node_id": node.to_string(), "new": new })).await
            }
            Request::PeerRemove { node_id } => {
                let peer = match node_id.parse::<NodeId>() {
                    Ok(peer) => peer,
                    Err(e) => return Response::error(e.to_string()),
                };
                let (tx, rx) = oneshot::channel();
                self.network
                    .do_send(Input(NetInput::RemovePeer { peer, reply: tx }));
                answer(rx, |()| json!({ "node_id": node_id })).await
            }
            Request::CustomerDrop { node_id } => {
                let customer = match node_id.parse::<NodeId>() {
                    Ok(customer) => customer,
                    Err(e) => return Response::error(e.to_string()),
                };
                let (tx, rx) = oneshot::channel();
                self.network.do_send(Input(NetInput::Link {
                    peer: customer,
                    reply: tx,
                }));
                let link = rx.await.ok().flatten();
                let (tx, rx) = oneshot::channel();
                self.supplier.do_send(Input(SupplierInput::Drop {
                    customer,
                    link,
                    reply: tx,
                }));
                answer(rx, |()| json!({ "node_id": node_id })).await
            }
            Request::PeerPing { node_id } => {
                let peer = match node_id.parse::<NodeId>() {
                    Ok(peer) => peer,
                    Err(e) => return Response::error(e.to_string()),
                };
                let (tx, rx) = oneshot::channel();
                self.network
                    .do_send(Input(NetInput::Ping { peer, reply: tx }));
                answer(
                    rx,
                    |rtt| json!({ "node_id": node_id, "rtt_ms": rtt.as_secs_f64() * 1000.0 }),
                )
                .await
            }
        }
    }
}

/// The control reply for an actor's answer: `ok` of its value, its error, or that it is gone.
async fn answer<T>(
    reply: oneshot::Receiver<Result<T, String>>,
    ok: impl FnOnce(T) -> serde_json::Value,
) -> Response {
    match reply.await {
        Ok(Ok(value)) => Response::ok(ok(value)),
        Ok(Err(e)) => Response::error(e),
        Err(_) => Response::error("the node is shutting down"),
    }
}

/// Starts the network actor with the persisted and configured peers.
fn start_network(
    config: &Config,
    keys: &NodeKeys,
    node_id: NodeId,
    identity: watch::Receiver<Option<Identity>>,
    store: Arc<dyn KvStore>,
    registry: &Registry,
) -> NetworkAddr {
    let mut peers = network::load_peers(store.as_ref());
    for entry in &config.peers {
        // Validated with the config: a card that does not verify never gets here.
        if let Ok(identity) = Identity::from_card(&entry.card) {
            peers.push((identity, entry.name.clone()));
        }
    }
    let policy = TrustPolicy {
        trusted: Default::default(),
        open: config.supplier.accept == AcceptPolicy::Open,
    };
    let (policy_tx, policy_rx) = watch::channel(policy);
    let n = &config.network;
    let shared = Arc::new(SessionShared {
        noise_secret: keys.noise_secret_bytes(),
        identity,
        policy: policy_rx,
        connect_timeout: n.connect_timeout.get(),
        handshake_timeout: n.handshake_timeout.get(),
        max_message: n.max_message.0 as usize,
        queue: n.outbound_queue,
    });
    let settings = NetworkSettings {
        listen: config.node.listen,
        request_timeout: n.request_timeout.get(),
        keepalive: n.keepalive.get(),
        admission: n.admission_limits(),
    };
    let driver = NetworkDriver::new(
        settings,
        node_id,
        shared,
        store,
        registry.clone(),
        policy_tx,
        peers,
    );
    let known = driver.known_peers();
    let machine = NetworkConnector {
        reconnect_min: n.reconnect_min.get(),
        reconnect_max: n.reconnect_max.get(),
        ..NetworkConnector::default()
    };
    let addr = Shell::new(machine, "self", driver, registry.clone()).start();
    for peer in known {
        addr.do_send(Fire(NetEvent::PeerAdded {
            peer,
            now: Duration::ZERO,
        }));
    }
    addr.do_send(Fire(NetEvent::Start));
    addr
}

/// SIGHUP: validate the new file; apply what can change live, keep the old config otherwise.
fn reload(
    home: &Home,
    config: &mut Config,
    identity: &IdentityAddr,
    network: &NetworkAddr,
    supplier: &SupplierAddr,
) {
    match Config::load(home.root()) {
        Ok(newer) => {
            let needs_restart = config.restart_needed(&newer);
            if !needs_restart.is_empty() {
                tracing::warn!(keys = ?needs_restart, "config changes that take effect after a restart");
            }
            if newer.contacts() != config.contacts() {
                identity.do_send(Fire(IdentityEvent::ContactsChanged(newer.contacts())));
            }
            for peer in newer.peers.iter().filter(|p| !config.peers.contains(p)) {
                if let Ok(identity) = Identity::from_card(&peer.card) {
                    let (reply, _) = oneshot::channel();
                    network.do_send(Input(NetInput::AddPeer {
                        identity: Box::new(identity),
                        label: peer.name.clone(),
                        reply,
                    }));
                }
            }
            if newer.supplier != config.supplier {
                let open = newer.supplier.accept == AcceptPolicy::Open;
                network.do_send(Input(NetInput::SetOpen(open)));
                supplier.do_send(Input(SupplierInput::Reconfigure {
                    donated: newer.supplier.donated.0,
                    open,
                    grace: newer.supplier.grace_period.get(),
                }));
            }
            *config = newer;
            tracing::info!(file = %home.config_file().display(), "config reloaded");
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; keeping the running config");
        }
    }
}

/// Starts the supplier side (fragment store, service) and the customer side (fire_hire and its
/// connectors, resuming saved contracts), and connects them to the network.
fn start_storage(
    home: &Home,
    config: &Config,
    store: Arc<dyn KvStore>,
    registry: &Registry,
    network: &NetworkAddr,
) -> (SupplierAddr, CustomerAddr) {
    let supplier_settings = SupplierSettings {
        root: home.store_dir(),
        donated: config.supplier.donated.0,
        open: config.supplier.accept == AcceptPolicy::Open,
        grace: config.supplier.grace_period.get(),
    };
    let supplier = Shell::new(
        SupplierService::default(),
        "self",
        SupplierDriver::new(supplier_settings, store.clone()),
        registry.clone(),
    )
    .start();
    supplier.do_send(Fire(ServiceEvent::Start));

    let b = &config.backup;
    let settings = CustomerSettings {
        data_shards: u32::from(b.data_shards),
        parity_shards: u32::from(b.parity_shards),
        space_per_supplier: b.space_per_supplier.0,
        request_timeout: config.network.request_timeout.get(),
    };
    let positions = usize::from(b.data_shards) + usize::from(b.parity_shards);
    let resumed = customer::load_contracts(store.as_ref());
    let machine = FireHire::new(positions);
    let driver = FireHireDriver::new(settings, store, network.clone(), registry.clone());
    let customer = Shell::new(machine, "self", driver, registry.clone()).start();
    customer.do_send(Fire(HireEvent::Start {
        now: Duration::ZERO,
        resumed,
    }));

    let (to_customer, to_supplier, left) = (customer.clone(), supplier.clone(), customer.clone());
    network.do_send(Input(NetInput::SetSinks(Sinks {
        presence: Box::new(move |peer, up| {
            to_customer.do_send(Input(CustomerInput::Presence { peer, up }))
        }),
        supplier: Box::new(move |call| {
            to_supplier.do_send(Input(SupplierInput::Request {
                customer: call.customer,
                trusted: call.trusted,
                envelope: call.envelope,
                link: call.link,
                permit: call.permit,
            }))
        }),
        supplier_left: Box::new(move |peer| left.do_send(Input(CustomerInput::SupplierLeft(peer)))),
    })));
    (supplier, customer)
}
