//! `bitdust run`: starts every actor, serves the control socket, handles signals.
//!
//! Signals are caught from the first line of `main` (see `signals`): SIGHUP re-reads the config
//! (a bad file is logged and the running config stays); SIGTERM/SIGINT stop the node: every
//! machine is sent `Shutdown` and awaited, the disk writer drains, the store is flushed and
//! closed last, exit status 0. The whole stop is bounded by `node.shutdown_timeout` (a watchdog
//! thread, independent of the event loop and of the disk, exits with status 2 naming what did
//! not finish); a second signal exits at once with status 1.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;

use super::config::{Config, LogFormat};
use super::control;
use super::drills::Drills;
use super::handlers::Control;
use super::health::{self, DiskHealth};
use super::home::Home;
use super::logging;
use super::reload;
use super::settings;
use super::signals::{self, Signal, Signals};
use super::wiring::{self, Disk};
use crate::actors::Registry;
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::Identity;
use crate::crypto::keys::NodeKeys;
use crate::store::{KvStore, RocksStore, StoreOptions, Writer, WriterSettings};

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
    if let Err(e) = control::disable_core_dumps() {
        tracing::warn!(error = %e, "cannot turn core dumps off; a crash may write keys to disk");
    }
    home.keep_private()?;
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
    // An older catalog is upgraded in place; a newer one stops the start before anything is
    // written with a format this code does not fully know.
    crate::store::catalog::upgrade(rocks.as_ref()).context("opening the catalog")?;
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
    // A missing master key beside a catalog stops the node: a new one would orphan every block.
    let has_backups = crate::store::catalog::blocks(store.as_ref())
        .next()
        .is_some();
    let data_keys: Arc<DataKeys> = Arc::new(home.load_master(has_backups)?.data_keys());
    let node_id = identity.node_id();

    // A home made by `bitdust recover`: fetch the catalog before anything is hired.
    let max_message = settings::max_message(&config);
    match super::recover::run_pending(
        &home,
        &keys,
        &identity,
        store.clone(),
        &data_keys,
        max_message,
    )
    .await
    {
        Ok(true) | Ok(false) => {}
        Err(e) => tracing::error!(error = %format!("{e:#}"),
            "recovery did not complete; it is tried again at the next start"),
    }

    let name = identity.name().to_string();
    let base = wiring::Base {
        home: home.clone(),
        keys,
        data_keys,
        identity,
        store,
        disk,
        registry: Registry::default(),
    };
    let actors = Rc::new(wiring::start(base, &config).await);
    let sources = Rc::new(RefCell::new(config.backup.clone()));
    let listener = control::bind(&home.control_socket())?;
    let control = Rc::new(Control {
        node_id,
        started,
        actors: actors.clone(),
        sources: sources.clone(),
        request_timeout: settings::request_timeout(&config),
        repair_window: settings::repair_window(&config),
    });
    let handler: control::Handler = Rc::new(move |request| {
        let control = control.clone();
        Box::pin(async move { control.handle(request).await })
    });
    let control_task = actix::spawn(control::serve(
        listener,
        handler,
        settings::control_limits(&config),
    ));
    let progress = signals.shutdown();
    progress.end("start-up");

    tracing::info!(node_id = %node_id, name = %name, listen = %config.node.listen,
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
                    reload::reload(&home, &mut config, &actors);
                    *sources.borrow_mut() = config.backup.clone();
                }
                Some(Signal::Stop(name)) => break name,
                None => break "signal thread gone",
            },
            _ = schedule.tick() => actors.backups.schedule_due(&sources.borrow()),
            _ = drills.tick() => drill_if_due(&actors.drills, settings::drill_interval(&config)),
        }
    };
    tracing::info!(signal = stop_signal, "shutting down");
    control_task.abort();
    actors.stop(&progress).await;
    System::current().stop();
    Ok(())
}

/// Starts a scheduled restore drill when one is due.
fn drill_if_due(drills: &Rc<Drills>, interval: Duration) {
    if drills.due(interval, crate::unix_now()) {
        let drills = drills.clone();
        actix::spawn(async move {
            if let Err(e) = drills.run().await {
                tracing::warn!(error = %e, "restore drill could not run");
            }
        });
    }
}
