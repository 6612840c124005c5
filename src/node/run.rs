//! `bitdust run`: starts every actor, serves the control socket, handles signals.
//!
//! Signals are caught from the first line of `main` (see `signals`): SIGHUP re-reads the config
//! (a bad file is logged and the running config stays); SIGTERM/SIGINT stop the node: every
//! machine is sent `Shutdown` and awaited, the disk writer drains, the store is flushed and
//! closed last, exit status 0. The whole stop is bounded by `node.shutdown_timeout` (a watchdog
//! thread, independent of the event loop and of the disk, exits with status 2 naming what did
//! not finish); a second signal exits at once with status 1.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use serde_json::json;
use tokio::sync::watch;

use super::backups::{self, Backups};
use super::config::{AcceptPolicy, BackupSection, Config, LogFormat};
use super::control::{self, Request, Response};
use super::durability;
use super::health::{self, DiskHealth};
use super::home::Home;
use super::logging;
use super::restores::Restores;
use super::signals::{self, Signal, Signals};
use crate::actors::backup_job::CatalogRefresh;
use crate::actors::backup_job::{BackupSettings, BackupWiring, JobSpec};
use crate::actors::drill::DrillReport;
use crate::actors::fire_hire::{self, CustomerSettings, FireHireDriver, FireHireQuery};
use crate::actors::identity::{self, IdentityDriver};
use crate::actors::monitor::{self, MonitorSettings, MonitorStatus, MonitorWiring};
use crate::actors::network_connector::{
    self, NetAnswer, NetInput, NetQuery, NetworkConnectorDriver, NetworkSettings, NetworkWiring,
    Presence,
};
use crate::actors::peer_session::SessionShared;
use crate::actors::rebuilder::RebuilderWiring;
use crate::actors::restore_worker::{RestoreSpec, RestoreWiring};
use crate::actors::router::{RequestKind, Router};
use crate::actors::status::NodeStatus;
use crate::actors::status::{BackupStatus, RestoreStatus};
use crate::actors::supplier_service::{
    self, SupplierAnswer, SupplierInput, SupplierQuery, SupplierServiceDriver, SupplierSettings,
};
use crate::actors::{Deliver, Input, Query, Registry, Shell, Shutdown};
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::{Identity, NodeId};
use crate::crypto::keys::NodeKeys;
use crate::fsm::identity::Event as IdentityEvent;
use crate::fsm::network_connector::NetworkConnector;
use crate::net::link::TrustPolicy;
use crate::proto::Ping;
use crate::proto::envelope::Body;
use crate::store::catalog::{self, Snapshot};
use crate::store::jobs;
use crate::store::{KvStore, RocksStore, StoreOptions, Writer, WriterSettings};

type NetworkAddr = Addr<Shell<NetworkConnectorDriver>>;
type SupplierAddr = Addr<Shell<SupplierServiceDriver>>;
type CustomerAddr = Addr<Shell<FireHireDriver>>;
type IdentityAddr = Addr<Shell<IdentityDriver>>;

/// The node's disk: the bounded writer every synced write goes through, and its health.
pub struct Disk {
    pub writer: Writer,
    pub health: Arc<DiskHealth>,
}

/// Runs the node in the foreground until SIGTERM/SIGINT.
pub fn run(home: Home, log_format: Option<LogFormat>) -> anyhow::Result<()> {
    // First: signals caught since main's first line are delivered from here on, and a stop
    // signal from now on is bounded by the shutdown watchdog even if start-up hangs on the disk.
    let signals = Signals::start()?;
    let progress = signals.shutdown();
    let config = Config::load(home.root())?;
    signals::set_shutdown_timeout(config.node.shutdown_timeout.get());
    logging::init(log_format.unwrap_or(config.log.format), &config.log.level);
    match control::raise_fd_limit() {
        Ok((old, new)) if new > old => tracing::debug!(old, new, "raised the open-file limit"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let _lock = home.lock()?;
    let keys = Arc::new(home.load_keys()?);
    let identity = home.load_identity(&keys)?;
    let rocks = Arc::new(
        RocksStore::open_with(
            &home.db_dir(),
            StoreOptions {
                min_free: config.node.keep_free.0,
            },
        )
        .with_context(|| format!("opening {}", home.db_dir().display()))?,
    );
    let space = rocks.space();
    // Weak: the sampler must not keep the database open past its close at the end of `run`.
    let resumable = Arc::downgrade(&rocks);
    let store: Arc<dyn KvStore> = rocks;
    let (writer, writer_thread) = Writer::spawn(
        store.clone(),
        WriterSettings {
            stall_after: config.node.disk_stall.get(),
            ..WriterSettings::default()
        },
    )
    .context("starting the disk writer")?;
    let disk_health = Arc::new(
        DiskHealth::new(
            home.root(),
            writer.stats(),
            Some(space),
            config.node.keep_free.0,
        )
        .with_recovery(move || {
            if let Some(store) = resumable.upgrade()
                && let Err(e) = store.resume_if_space()
            {
                tracing::warn!(error = %e, "cannot reopen the database after a disk error");
            }
        }),
    );
    disk_health
        .start_sampler(Duration::from_secs(1))
        .context("starting the disk health sampler")?;
    health::check_donation(&config, &home.store_dir());
    let disk = Disk {
        writer,
        health: disk_health,
    };
    let system = System::new();
    let result = system.block_on(node_main(
        home.clone(),
        config,
        keys,
        identity,
        store.clone(),
        disk,
        signals,
    ));
    // Every actor goes with the system; then the writer drains, the store flushes and closes.
    // All of it runs under the watchdog's deadline, which started with the stop signal.
    progress.begin("actors");
    drop(system);
    progress.end("actors");
    progress.begin("pending writes");
    writer_thread.join();
    progress.end("pending writes");
    progress.begin("final flush");
    let flushed = store.flush().context("flushing the database");
    progress.end("final flush");
    progress.begin("database close");
    drop(store);
    progress.end("database close");
    let _ = std::fs::remove_file(home.control_socket());
    flushed?;
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
    disk: Disk,
    mut signals: Signals,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let registry = Registry::default();
    let data_keys: Arc<DataKeys> = Arc::new(home.load_master()?.data_keys());
    let node_id = identity.node_id();

    // A home made by `bitdust recover`: fetch the catalog before anything is hired.
    match super::recover::run_pending(
        &home,
        &keys,
        &identity,
        store.clone(),
        &data_keys,
        config.network.max_message.0 as usize,
    )
    .await
    {
        Ok(true) | Ok(false) => {}
        Err(e) => tracing::error!(error = %format!("{e:#}"),
            "recovery did not complete; it is tried again at the next start"),
    }

    let (published_tx, published_rx) = watch::channel(Some(identity.clone()));
    let identity_driver = IdentityDriver::new(Arc::new(home.clone()), keys.clone(), published_tx);
    let identity_actor = identity::start(identity_driver, config.contacts(), &registry).await;

    let (network_actor, supplier_actor, customer_actor) = start_peers(Start {
        home: &home,
        config: &config,
        keys: &keys,
        node_id,
        identity: published_rx.clone(),
        store: store.clone(),
        writer: disk.writer.clone(),
        disk: disk.health.clone(),
        registry: &registry,
    })
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

    let backup_status = Arc::new(Mutex::new(BackupStatus::default()));
    let b = &config.backup;
    let wiring = BackupWiring {
        kv: store.clone(),
        writer: disk.writer.clone(),
        network: network_actor.clone(),
        fire_hire: customer_actor.clone(),
        keys: data_keys.clone(),
        owner: keys.signing_key().clone(),
        settings: BackupSettings {
            data_shards: u32::from(b.data_shards),
            parity_shards: u32::from(b.parity_shards),
            block_size: b.block_size.0 as usize,
            zstd_level: crate::data::DEFAULT_ZSTD_LEVEL,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            request_timeout: config.network.request_timeout.get(),
            outbox: home.outbox_dir(),
            keep_versions: b.keep_versions as usize,
        },
        registry: registry.clone(),
        status: backup_status.clone(),
    };
    let unfinished = jobs::jobs(store.as_ref()).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read unfinished backups");
        Vec::new()
    });
    let refresh = CatalogRefresh {
        kv: store.clone(),
        network: network_actor.clone(),
        fire_hire: customer_actor.clone(),
        keys: data_keys.clone(),
        owner: keys.signing_key().clone(),
        settings: wiring.settings.clone(),
    };
    let backups = Backups::start(wiring, unfinished);
    let monitor_status = Arc::new(Mutex::new(MonitorStatus::default()));
    let mo = &config.monitor;
    let monitor_wiring = MonitorWiring {
        kv: store.clone(),
        writer: disk.writer.clone(),
        network: network_actor.clone(),
        fire_hire: customer_actor.clone(),
        registry: registry.clone(),
        status: monitor_status.clone(),
        settings: MonitorSettings {
            interval: mo.interval.get(),
            fire_after: mo.fire_after.get(),
            fire_after_failed_audits: mo.fire_after_failed_audits,
            audits_per_round: mo.audits_per_round as usize,
            request_timeout: config.network.request_timeout.get(),
        },
    };
    let rebuilder_wiring = RebuilderWiring {
        kv: store.clone(),
        writer: disk.writer.clone(),
        network: network_actor.clone(),
        owner: keys.signing_key().verifying_key(),
        request_timeout: config.network.request_timeout.get(),
        registry: registry.clone(),
        refresh,
    };
    if let Err(e) = monitor::start(
        monitor_wiring,
        rebuilder_wiring,
        u32::from(b.data_shards),
        u32::from(b.data_shards) + u32::from(b.parity_shards),
    )
    .await
    {
        tracing::error!(error = %e, "the monitor did not start: suppliers are not audited");
    }
    let restore_status = Arc::new(Mutex::new(RestoreStatus::default()));
    let restores = Restores::start(RestoreWiring {
        kv: store.clone(),
        network: network_actor.clone(),
        fire_hire: customer_actor.clone(),
        keys: data_keys.clone(),
        owner: keys.signing_key().verifying_key(),
        request_timeout: config.network.request_timeout.get(),
        registry: registry.clone(),
        status: restore_status.clone(),
    });
    let sources = Rc::new(RefCell::new(config.backup.clone()));

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
        backups: backups.clone(),
        backup_status,
        restores: restores.clone(),
        restore_status,
        monitor_status,
        sources: sources.clone(),
        store: store.clone(),
        drill: crate::actors::drill::DrillWiring {
            kv: store.clone(),
            network: network_actor.clone(),
            keys: data_keys.clone(),
            owner: keys.signing_key().verifying_key(),
            settings: crate::actors::drill::DrillSettings {
                request_timeout: config.network.request_timeout.get(),
                files: config.monitor.drill_files as usize,
                ..Default::default()
            },
        },
        last_drill: Rc::new(RefCell::new(load_last_drill(store.as_ref()))),
        drill_running: Rc::new(Cell::new(false)),
        // Firing waits `fire_after`; the rebuild itself is assumed to take at most an hour.
        repair_window: config.monitor.fire_after.get() + Duration::from_secs(3600),
    });
    let drill_state = control_state.clone();
    let drill_interval = config.monitor.drill_interval.get();
    let disk_health = disk.health.clone();
    let handler: control::Handler = Rc::new(move |request| {
        let state = control_state.clone();
        let disk_health = disk_health.clone();
        Box::pin(async move {
            let is_status = request == Request::Status;
            let mut response = state.handle(request).await;
            // Read from atomics: answers even while the disk is frozen.
            if let Some(data) = response.data.as_mut().filter(|_| is_status) {
                data["disk"] = disk_health.report();
            }
            response
        })
    });
    let limits = control::Limits {
        read_timeout: config.node.control_timeout.get(),
        max_clients: config.node.control_clients,
    };
    let control_task = actix::spawn(control::serve(listener, handler, limits));
    let progress = signals.shutdown();
    progress.end("start-up");

    tracing::info!(node_id = %node_id, name = identity.name(), listen = %config.node.listen,
        home = %home.root().display(), "node running");

    // Scheduled backups: checked every 5 s against each source's last snapshot (a read per source).
    let mut schedule = tokio::time::interval(Duration::from_secs(5));
    // Restore drills: checked every minute.
    let mut drills = tokio::time::interval(Duration::from_secs(60));
    drills.tick().await;
    let stop_signal = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Some(Signal::Reload) => {
                    reload(
                        &home,
                        &mut config,
                        &identity_actor,
                        &network_actor,
                        &supplier_actor,
                        &disk,
                    );
                    *sources.borrow_mut() = config.backup.clone();
                }
                Some(Signal::Stop(name)) => break name,
                None => break "signal thread gone",
            },
            _ = schedule.tick() => backups.schedule_due(&sources.borrow()),
            _ = drills.tick() => {
                if drill_state.drill_due(drill_interval, crate::unix_now()) {
                    let state = drill_state.clone();
                    actix::spawn(async move {
                        if let Err(e) = state.run_drill().await {
                            tracing::warn!(error = %e, "restore drill could not run");
                        }
                    });
                }
            }
        }
    };
    tracing::info!(signal = stop_signal, "shutting down");
    control_task.abort();

    // A running backup stops first: it is resumed from its job record at the next start.
    progress.begin("backup job");
    backups.shutdown().await;
    progress.end("backup job");
    progress.begin("restore");
    restores.shutdown().await;
    progress.end("restore");

    // Bounded by the watchdog (node.shutdown_timeout from the first signal), not by a timer on
    // this loop: a write stuck on a frozen disk could hold the loop itself.
    progress.begin("customer actor");
    let _ = customer_actor.send(Shutdown).await;
    progress.end("customer actor");
    progress.begin("supplier actor");
    let _ = supplier_actor.send(Shutdown).await;
    progress.end("supplier actor");
    progress.begin("network actor");
    let _ = network_actor.send(Shutdown).await;
    progress.end("network actor");
    progress.begin("identity actor");
    let _ = identity_actor.send(Shutdown).await;
    progress.end("identity actor");
    drop(disk);
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
    backups: Rc<Backups>,
    backup_status: Arc<Mutex<BackupStatus>>,
    restores: Rc<Restores>,
    restore_status: Arc<Mutex<RestoreStatus>>,
    monitor_status: Arc<Mutex<MonitorStatus>>,
    sources: Rc<RefCell<BackupSection>>,
    store: Arc<dyn KvStore>,
    drill: crate::actors::drill::DrillWiring,
    /// The latest restore drill (also kept in the database, so it outlives a restart).
    last_drill: Rc<RefCell<Option<DrillReport>>>,
    drill_running: Rc<Cell<bool>>,
    /// How long a lost fragment stays lost before it is rebuilt (for the durability estimate).
    repair_window: Duration,
}

/// The last drill's report, as saved (none, or unreadable: none).
fn load_last_drill(kv: &dyn KvStore) -> Option<DrillReport> {
    let bytes = crate::store::health::meta(kv, LAST_DRILL).ok()??;
    serde_json::from_slice(&bytes).ok()
}

const LAST_DRILL: &str = "last-drill";

impl ControlState {
    /// The monitor's view for `status`: the health matrix summary, per source, with each
    /// source's durability estimate and the last restore drill.
    fn health_report(&self) -> serde_json::Value {
        let monitor = self
            .monitor_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let positions: Vec<durability::Observed> = monitor
            .positions
            .iter()
            .map(|p| durability::Observed {
                availability: p.availability,
                observed: Duration::from_secs(p.observed_secs),
            })
            .collect();
        let mut value = serde_json::to_value(&monitor).unwrap_or_default();
        if let Some(sources) = value["sources"].as_array_mut() {
            for (source, health) in sources.iter_mut().zip(&monitor.sources) {
                let p = durability::loss_probability(
                    monitor.k as usize,
                    monitor.m as usize,
                    &positions,
                    self.repair_window,
                    Duration::from_secs(365 * 86_400),
                    health.blocks,
                );
                source["loss_within_a_year"] = json!(p);
                source["loss_within_a_year_text"] = json!(durability::describe(p));
            }
        }
        value["last_drill"] = self
            .last_drill
            .borrow()
            .as_ref()
            .map_or(serde_json::Value::Null, DrillReport::to_json);
        value
    }

    /// One restore drill now (none while another runs); its report is kept and saved.
    async fn run_drill(&self) -> Result<DrillReport, String> {
        if self.drill_running.replace(true) {
            return Err("a restore drill is already running".into());
        }
        let result = self.drill.run_now().await.map_err(|e| e.to_string());
        self.drill_running.set(false);
        let report = result?;
        if report.passed() {
            tracing::info!(source = %report.source, files = report.files, bytes = report.bytes,
                "restore drill passed");
        } else {
            tracing::warn!(source = %report.source, failures = report.failures.len(),
                "restore drill FAILED: files could not be restored byte for byte");
        }
        *self.last_drill.borrow_mut() = Some(report.clone());
        if let Ok(bytes) = serde_json::to_vec(&report) {
            let mut batch = crate::store::Batch::new();
            crate::store::health::put_meta(&mut batch, LAST_DRILL, &bytes);
            let kv = self.store.clone();
            // Off the event loop: the disk may be slow.
            tokio::task::spawn_blocking(move || kv.write(batch));
        }
        Ok(report)
    }

    /// A drill is due: none yet and a version exists, or the last is `interval` old.
    fn drill_due(&self, interval: Duration, now_unix: u64) -> bool {
        if self.drill_running.get() {
            return false;
        }
        match self.last_drill.borrow().as_ref() {
            Some(last) => now_unix.saturating_sub(last.at) >= interval.as_secs(),
            None => catalog::snapshots(self.store.as_ref()).is_ok_and(|s| !s.is_empty()),
        }
    }

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
                    .send(Query::new(FireHireQuery::Status))
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
                    disk: None,
                    backup: self
                        .backup_status
                        .lock()
                        .map(|s| s.clone())
                        .unwrap_or_default(),
                    restore: self
                        .restore_status
                        .lock()
                        .map(|s| s.clone())
                        .unwrap_or_default(),
                };
                match serde_json::to_value(status) {
                    Ok(mut value) => {
                        value["health"] = self.health_report();
                        Response::ok(value)
                    }
                    Err(e) => Response::error(e.to_string()),
                }
            }
            Request::Backup { paths } => {
                let section = self.sources.borrow().clone();
                let specs: Vec<JobSpec> = if paths.is_empty() {
                    section.sources.iter().map(backups::spec_of).collect()
                } else {
                    paths
                        .iter()
                        .map(|p| {
                            let root = std::path::PathBuf::from(p);
                            // A configured source keeps its excludes when named on the line.
                            match section.sources.iter().find(|s| s.path == root) {
                                Some(source) => backups::spec_of(source),
                                None => JobSpec {
                                    source: root.display().to_string(),
                                    root,
                                    excludes: Vec::new(),
                                },
                            }
                        })
                        .collect()
                };
                if specs.is_empty() {
                    return Response::error(
                        "nothing to back up: give a PATH or add [[backup.sources]] to config.toml",
                    );
                }
                match self.backups.request(specs) {
                    Ok(runs) => Response::ok(json!({ "runs": runs })),
                    Err(e) => Response::error(e),
                }
            }
            Request::List => {
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || catalog::snapshots(store.as_ref())).await
                {
                    Ok(Ok(snapshots)) => Response::ok(list_json(&snapshots)),
                    Ok(Err(e)) => Response::error(format!("cannot read the catalog: {e}")),
                    Err(e) => Response::error(e.to_string()),
                }
            }
            Request::Restore {
                source,
                version,
                to,
                path,
                overwrite,
            } => {
                let store = self.store.clone();
                let snapshots =
                    match tokio::task::spawn_blocking(move || catalog::snapshots(store.as_ref()))
                        .await
                    {
                        Ok(Ok(snapshots)) => snapshots,
                        Ok(Err(e)) => {
                            return Response::error(format!("cannot read the catalog: {e}"));
                        }
                        Err(e) => return Response::error(e.to_string()),
                    };
                let specs = match restore_specs(&snapshots, source, version, &to, path, overwrite) {
                    Ok(specs) => specs,
                    Err(e) => return Response::error(e),
                };
                match self.restores.request(specs) {
                    Ok(runs) => Response::ok(json!({ "runs": runs })),
                    Err(e) => Response::error(e),
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
                    Ok(NetAnswer::Added(Ok((new, saved)))) => match saved.await {
                        Ok(()) => Response::ok(json!({ "node_id": node.to_string(), "new": new })),
                        Err(e) => Response::error(format!("cannot save the peer book: {e}")),
                    },
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
                    Ok(NetAnswer::Removed(Ok(saved))) => match saved.await {
                        Ok(()) => Response::ok(json!({ "node_id": node_id })),
                        Err(e) => Response::error(format!("cannot save the peer book: {e}")),
                    },
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
            Request::Drill => match self.run_drill().await {
                Ok(report) => Response::ok(report.to_json()),
                Err(e) => Response::error(e),
            },
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

/// Which versions a restore request means: `version` exactly; else the latest of `source`; else
/// the latest of every source (each under `to/<its directory name>` when there are several).
fn restore_specs(
    snapshots: &[Snapshot],
    source: Option<String>,
    version: Option<u64>,
    to: &str,
    path: Option<String>,
    overwrite: bool,
) -> Result<Vec<RestoreSpec>, String> {
    if snapshots.is_empty() {
        return Err("no backups yet".into());
    }
    let to = std::path::PathBuf::from(to);
    if !to.is_absolute() {
        return Err("the restore target must be an absolute path".into());
    }
    let sub_path = path.map(|p| p.trim_start_matches('/').as_bytes().to_vec());
    let spec = |s: &Snapshot, to: std::path::PathBuf| RestoreSpec {
        snapshot: s.id,
        source: s.source.clone(),
        to,
        sub_path: sub_path.clone(),
        overwrite,
    };
    let matches = |s: &&Snapshot| source.as_deref().is_none_or(|src| s.source == src);
    if let Some(v) = version {
        let s = snapshots
            .iter()
            .filter(matches)
            .find(|s| s.id.0 == v)
            .ok_or_else(|| {
                format!(
                    "no version {v}{}",
                    source
                        .as_deref()
                        .map(|s| format!(" of {s}"))
                        .unwrap_or_default()
                )
            })?;
        return Ok(vec![spec(s, to)]);
    }
    // The latest version of each matching source, in the order sources first appeared.
    let mut latest: Vec<&Snapshot> = Vec::new();
    for s in snapshots.iter().filter(matches) {
        match latest.iter_mut().find(|l| l.source == s.source) {
            Some(l) => {
                if s.id > l.id {
                    *l = s;
                }
            }
            None => latest.push(s),
        }
    }
    match latest.len() {
        0 => Err(format!("no backup of {}", source.unwrap_or_default())),
        1 => Ok(vec![spec(latest[0], to)]),
        _ => {
            let mut used = std::collections::BTreeSet::new();
            Ok(latest
                .into_iter()
                .map(|s| {
                    let base = std::path::Path::new(&s.source)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| "root".into());
                    let mut name = base.clone();
                    let mut n = 2;
                    while !used.insert(name.clone()) {
                        name = format!("{base}-{n}");
                        n += 1;
                    }
                    spec(s, to.join(name))
                })
                .collect())
        }
    }
}

/// The catalog's versions as `bitdust list --json` shows them (also used when no node runs).
pub fn list_json(snapshots: &[Snapshot]) -> serde_json::Value {
    let versions: Vec<serde_json::Value> = snapshots
        .iter()
        .map(|s| {
            json!({
                "snapshot": s.id.0,
                "source": s.source,
                "started_at": s.started_at,
                "finished_at": s.finished_at,
                "files": s.files,
                "dirs": s.dirs,
                "symlinks": s.symlinks,
                "bytes": s.bytes,
                "new_bytes": s.new_bytes,
                "new_blocks": s.new_blocks,
                "skipped": s.skipped.len(),
            })
        })
        .collect();
    json!({ "versions": versions })
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
    disk: &Disk,
) {
    match Config::load(home.root()) {
        Ok(newer) => {
            signals::set_shutdown_timeout(newer.node.shutdown_timeout.get());
            disk.health.set_keep_free(newer.node.keep_free.0);
            health::check_donation(&newer, &home.store_dir());
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
}

/// Starts the network, supplier and customer actors, wired to each other: the customer's and
/// supplier's addresses exist before they start, so the network is given them at construction.
async fn start_peers(start: Start<'_>) -> (NetworkAddr, SupplierAddr, CustomerAddr) {
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

    let supplier_settings = SupplierSettings {
        root: home.store_dir(),
        donated: config.supplier.donated.0,
        disk: start.disk.clone(),
        open: config.supplier.accept == AcceptPolicy::Open,
        grace: config.supplier.grace_period.get(),
    };
    let supplier =
        supplier_service::start(supplier_ctx, supplier_settings, store.clone(), registry).await;

    let b = &config.backup;
    let settings = CustomerSettings {
        data_shards: u32::from(b.data_shards),
        parity_shards: u32::from(b.parity_shards),
        space_per_supplier: b.space_per_supplier.0,
        request_timeout: config.network.request_timeout.get(),
    };
    let positions = usize::from(b.data_shards) + usize::from(b.parity_shards);
    let driver = FireHireDriver::new(settings, writer, network.clone(), registry.clone());
    let customer =
        fire_hire::start(customer_ctx, driver, positions, store.as_ref(), registry).await;
    (network, supplier, customer)
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
    let policy = TrustPolicy {
        trusted: Default::default(),
        open: config.supplier.accept == AcceptPolicy::Open,
    };
    let (policy_tx, policy_rx) = watch::channel(policy);
    let n = &config.network;
    let shared = Arc::new(SessionShared {
        noise_secret: keys.noise_secret_bytes(),
        identity: start.identity.clone(),
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
    let driver = NetworkConnectorDriver::new(
        settings,
        shared,
        start.writer.clone(),
        registry.clone(),
        policy_tx,
        wiring,
        peers,
    );
    let machine = NetworkConnector {
        reconnect_min: n.reconnect_min.get(),
        reconnect_max: n.reconnect_max.get(),
        ..NetworkConnector::new(node_id)
    };
    network_connector::start(driver, machine, registry).await
}
