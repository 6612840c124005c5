//! `bitdust run`: starts every actor, serves the control socket, handles signals.
//!
//! SIGHUP re-reads the config (a bad file is logged and the running config stays).
//! SIGTERM/SIGINT: every machine is sent `Shutdown` and awaited (bounded by
//! `node.shutdown_timeout`), the store is flushed and closed last, exit status 0. A second signal
//! during that exits at once.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use anyhow::Context as _;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use super::config::{Config, LogFormat};
use super::control::{self, Request, Response};
use super::home::Home;
use super::logging;
use crate::actors::identity::IdentityDriver;
use crate::actors::{Fire, Registry, Shell, Shutdown};
use crate::crypto::identity::Identity;
use crate::fsm::identity::{Event as IdentityEvent, IdentityMachine};
use crate::store::{KvStore, RocksStore};

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
    keys: Arc<crate::crypto::keys::NodeKeys>,
    identity: Identity,
    _store: Arc<dyn KvStore>,
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

    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let listener = control::bind(&home.control_socket())?;
    let status_registry = registry.clone();
    let handler: control::Handler = Rc::new(move |request| {
        let registry = status_registry.clone();
        let published = published_rx.clone();
        Box::pin(async move {
            match request {
                Request::Status => {
                    let current = published.borrow().clone();
                    Response::ok(json!({
                        "node_id": node_id.to_string(),
                        "name": current.as_ref().map(|i| i.name().to_string()),
                        "revision": current.as_ref().map(Identity::revision),
                        "contacts": current.as_ref().map(|i| i.contacts().to_vec()),
                        "pid": std::process::id(),
                        "uptime_secs": started.elapsed().as_secs(),
                        "machines": registry.snapshot(),
                    }))
                }
                Request::PeerAdd { .. } => {
                    Response::error("peers are not supported by this node yet")
                }
            }
        })
    });
    let control_task = actix::spawn(control::serve(listener, handler));

    tracing::info!(node_id = %node_id, name = identity.name(), listen = %config.node.listen,
        home = %home.root().display(), "node running");

    let stop_signal = loop {
        tokio::select! {
            _ = hup.recv() => reload(&home, &mut config, &identity_actor),
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

/// SIGHUP: validate the new file; apply what can change live, keep the old config otherwise.
fn reload(home: &Home, config: &mut Config, identity: &Addr<Shell<IdentityDriver>>) {
    match Config::load(home.root()) {
        Ok(newer) => {
            let needs_restart = config.restart_needed(&newer);
            if !needs_restart.is_empty() {
                tracing::warn!(keys = ?needs_restart, "config changes that take effect after a restart");
            }
            if newer.contacts() != config.contacts() {
                identity.do_send(Fire(IdentityEvent::ContactsChanged(newer.contacts())));
            }
            *config = newer;
            tracing::info!(file = %home.config_file().display(), "config reloaded");
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; keeping the running config");
        }
    }
}
