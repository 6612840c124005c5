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
use tokio::sync::watch;

use super::config::{AcceptPolicy, Config, LogFormat};
use super::control::{self, Request, Response};
use super::home::Home;
use super::logging;
use crate::actors::customer::{self, CustomerQuery, CustomerSettings, FireHireDriver};
use crate::actors::identity::IdentityDriver;
use crate::actors::network::{
    self, NetAnswer, NetInput, NetQuery, NetworkDriver, NetworkSettings, NetworkWiring, Presence,
};
use crate::actors::router::{RequestKind, Router};
use crate::actors::session::SessionShared;
use crate::actors::status::NodeStatus;
use crate::actors::supplier::{
    SupplierAnswer, SupplierDriver, SupplierInput, SupplierQuery, SupplierSettings,
};
use crate::actors::{Deliver, Input, Query, Registry, Shell, Shutdown};
use crate::crypto::identity::{Identity, NodeId};
use crate::crypto::keys::NodeKeys;
use crate::fsm::fire_hire::{Event as HireEvent, FireHire};
use crate::fsm::identity::{Event as IdentityEvent, IdentityMachine};
use crate::fsm::network_connector::{Event as NetEvent, NetworkConnector};
use crate::fsm::supplier_service::{Event as ServiceEvent, SupplierService};
use crate::net::link::TrustPolicy;
use crate::proto::Ping;
use crate::proto::envelope::Body;
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
    // Before anything else: a signal during start-up must not kill the node.
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let started = Instant::now();
    let registry = Registry::default();
    let node_id = identity.node_id();

    let (published_tx, published_rx) = watch::channel(Some(identity.clone()));
    let identity_actor = Shell::new(
        IdentityMachine::default(),
        "self",
        IdentityDriver::new(Arc::new(home.clone()), keys.clone(), published_tx),
        registry.clone(),
    )
    .start();
    let _ = identity_actor.send(Deliver(IdentityEvent::Start)).await;
    let _ = identity_actor
        .send(Deliver(IdentityEvent::ContactsChanged(config.contacts())))
        .await;

    let (network_actor, supplier_actor, customer_actor) = start_peers(
        &home,
        &config,
        &keys,
        node_id,
        published_rx.clone(),
        store,
        &registry,
    )
    .await;
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
                let _ = propagate_to
                    .send(Input(NetInput::OwnIdentity(Box::new(identity))))
                    .await;
            }
        }
    });

    let listener = control::bind(&home.control_socket())?;
    let control_state = Rc::new(ControlState {
        node_id,
        started,
        registry: registry.clone(),
        identity: published_rx,
        network: network_actor.clone(),
        supplier: supplier_actor.clone(),
        customer: customer_actor.clone(),
        request_timeout: config.network.request_timeout.get(),
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
    request_timeout: Duration,
}

impl ControlState {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => {
                let current = self.identity.borrow().clone();
                let network = match self.network.send(Query::new(NetQuery::Status)).await {
                    Ok(NetAnswer::Status(status)) => status,
                    _ => Default::default(),
                };
                let customer = self
                    .customer
                    .send(Query::new(CustomerQuery::Status))
                    .await
                    .unwrap_or_default();
                let supplier = match self.supplier.send(Query::new(SupplierQuery::Status)).await {
                    Ok(SupplierAnswer::Status(status)) => status,
                    _ => Default::default(),
                };
                let status = NodeStatus {
                    node_id: self.node_id.to_string(),
                    name: current.as_ref().map(|i| i.name().to_string()),
                    revision: current.as_ref().map(Identity::revision),
                    contacts: current.as_ref().map(|i| i.contacts().to_vec()),
                    pid: std::process::id(),
                    uptime_secs: self.started.elapsed().as_secs(),
                    machines: self.registry.snapshot(),
                    network,
                    customer,
                    supplier,
                    health: Vec::new(),
                };
                match serde_json::to_value(status) {
                    Ok(value) => Response::ok(value),
                    Err(e) => Response::error(e.to_string()),
                }
            }
            Request::PeerAdd { card, name } => {
                let identity = match Identity::from_card(&card) {
                    Ok(identity) => identity,
                    Err(e) => return Response::error(format!("invalid card: {e}")),
                };
                let node = identity.node_id();
                let query = NetQuery::AddPeer {
                    identity: Box::new(identity),
                    label: name,
                };
                match self.network.send(Query::new(query)).await {
                    Ok(NetAnswer::Added(Ok(new))) => {
                        Response::ok(json!({ "node_id": node.to_string(), "new": new }))
                    }
                    Ok(NetAnswer::Added(Err(e))) => Response::error(e.to_string()),
                    _ => shutting_down(),
                }
            }
            Request::PeerRemove { node_id } => {
                let peer = match node_id.parse::<NodeId>() {
                    Ok(peer) => peer,
                    Err(e) => return Response::error(e.to_string()),
                };
                match self
                    .network
                    .send(Query::new(NetQuery::RemovePeer(peer)))
                    .await
                {
                    Ok(NetAnswer::Removed(Ok(()))) => Response::ok(json!({ "node_id": node_id })),
                    Ok(NetAnswer::Removed(Err(e))) => Response::error(e.to_string()),
                    _ => shutting_down(),
                }
            }
            Request::CustomerDrop { node_id } => {
                let customer = match node_id.parse::<NodeId>() {
                    Ok(customer) => customer,
                    Err(e) => return Response::error(e.to_string()),
                };
                let link = match self
                    .network
                    .send(Query::new(NetQuery::Link(customer)))
                    .await
                {
                    Ok(NetAnswer::Link(link)) => link,
                    _ => None,
                };
                let query = SupplierQuery::Drop { customer, link };
                let Ok(SupplierAnswer::Dropping(done)) =
                    self.supplier.send(Query::new(query)).await
                else {
                    return shutting_down();
                };
                match done.await {
                    Ok(Ok(())) => Response::ok(json!({ "node_id": node_id })),
                    Ok(Err(e)) => Response::error(e),
                    Err(_) => shutting_down(),
                }
            }
            Request::PeerPing { node_id } => {
                let peer = match node_id.parse::<NodeId>() {
                    Ok(peer) => peer,
                    Err(e) => return Response::error(e.to_string()),
                };
                let Ok(NetAnswer::Link(link)) =
                    self.network.send(Query::new(NetQuery::Link(peer))).await
                else {
                    return shutting_down();
                };
                let Some(link) = link else {
                    return Response::error(format!("no session with {peer}"));
                };
                let started = Instant::now();
                let ping = Body::Ping(Ping {
                    nonce: rand::random(),
                });
                match link.request(ping, self.request_timeout).await {
                    Ok(_) => {
                        let rtt = started.elapsed();
                        Response::ok(
                            json!({ "node_id": node_id, "rtt_ms": rtt.as_secs_f64() * 1000.0 }),
                        )
                    }
                    Err(e) => Response::error(e.to_string()),
                }
            }
        }
    }
}

fn shutting_down() -> Response {
    Response::error("the node is shutting down")
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
                let identity = identity.clone();
                let contacts = newer.contacts();
                actix::spawn(async move {
                    let _ = identity
                        .send(Deliver(IdentityEvent::ContactsChanged(contacts)))
                        .await;
                });
            }
            for peer in newer.peers.iter().filter(|p| !config.peers.contains(p)) {
                if let Ok(identity) = Identity::from_card(&peer.card) {
                    let query = NetQuery::AddPeer {
                        identity: Box::new(identity),
                        label: peer.name.clone(),
                    };
                    let network = network.clone();
                    actix::spawn(async move {
                        if let Ok(NetAnswer::Added(Err(e))) = network.send(Query::new(query)).await
                        {
                            tracing::error!(error = %e, "cannot add a peer from the config");
                        }
                    });
                }
            }
            if newer.supplier != config.supplier {
                let open = newer.supplier.accept == AcceptPolicy::Open;
                let reconfigure = SupplierInput::Reconfigure {
                    donated: newer.supplier.donated.0,
                    open,
                    grace: newer.supplier.grace_period.get(),
                };
                let (network, supplier) = (network.clone(), supplier.clone());
                actix::spawn(async move {
                    let _ = network.send(Input(NetInput::SetOpen(open))).await;
                    let _ = supplier.send(Input(reconfigure)).await;
                });
            }
            *config = newer;
            tracing::info!(file = %home.config_file().display(), "config reloaded");
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; keeping the running config");
        }
    }
}

/// Starts the network, supplier and customer actors, wired to each other: the customer's and
/// supplier's addresses exist before they start, so the network is given them at construction.
async fn start_peers(
    home: &Home,
    config: &Config,
    keys: &NodeKeys,
    node_id: NodeId,
    identity: watch::Receiver<Option<Identity>>,
    store: Arc<dyn KvStore>,
    registry: &Registry,
) -> (NetworkAddr, SupplierAddr, CustomerAddr) {
    let supplier_ctx = actix::Context::<Shell<SupplierDriver>>::new();
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
        ],
        supplier.clone().recipient(),
    );
    router.register(&[RequestKind::SupplierCancel], customer.clone().recipient());
    let wiring = NetworkWiring {
        router,
        presence: vec![customer.clone().recipient::<Presence>()],
    };
    let network = start_network(
        config,
        keys,
        node_id,
        identity,
        store.clone(),
        registry,
        wiring,
    )
    .await;

    let supplier_settings = SupplierSettings {
        root: home.store_dir(),
        donated: config.supplier.donated.0,
        open: config.supplier.accept == AcceptPolicy::Open,
        grace: config.supplier.grace_period.get(),
    };
    supplier_ctx.run(Shell::new(
        SupplierService::default(),
        "self",
        SupplierDriver::new(supplier_settings, store.clone()),
        registry.clone(),
    ));
    let _ = supplier.send(Deliver(ServiceEvent::Start)).await;

    let b = &config.backup;
    let settings = CustomerSettings {
        data_shards: u32::from(b.data_shards),
        parity_shards: u32::from(b.parity_shards),
        space_per_supplier: b.space_per_supplier.0,
        request_timeout: config.network.request_timeout.get(),
    };
    let positions = usize::from(b.data_shards) + usize::from(b.parity_shards);
    let resumed = customer::load_contracts(store.as_ref());
    let driver = FireHireDriver::new(settings, store, network.clone(), registry.clone());
    customer_ctx.run(Shell::new(
        FireHire::new(positions),
        "self",
        driver,
        registry.clone(),
    ));
    let _ = customer.send(Deliver(HireEvent::Start { resumed })).await;
    (network, supplier, customer)
}

/// Starts the network actor with the persisted and configured peers.
async fn start_network(
    config: &Config,
    keys: &NodeKeys,
    node_id: NodeId,
    identity: watch::Receiver<Option<Identity>>,
    store: Arc<dyn KvStore>,
    registry: &Registry,
    wiring: NetworkWiring,
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
        dropped_notices: Default::default(),
    });
    let settings = NetworkSettings {
        listen: config.node.listen,
        keepalive: n.keepalive.get(),
        dead_after: n.dead_after.get(),
        admission: n.admission_limits(),
    };
    let driver = NetworkDriver::new(
        settings,
        shared,
        store,
        registry.clone(),
        policy_tx,
        wiring,
        peers,
    );
    let known = driver.known_peers();
    let machine = NetworkConnector {
        reconnect_min: n.reconnect_min.get(),
        reconnect_max: n.reconnect_max.get(),
        ..NetworkConnector::new(node_id)
    };
    let addr = Shell::new(machine, "self", driver, registry.clone()).start();
    for peer in known {
        let _ = addr.send(Deliver(NetEvent::PeerAdded(peer))).await;
    }
    let _ = addr.send(Deliver(NetEvent::Start)).await;
    addr
}
