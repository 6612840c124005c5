//! The rebuilder's driver: the IO edge of `fsm::rebuilder`. Fetches source fragments (checked
//! against the owner-signed manifest), reconstructs the missing ones on a blocking thread
//! (`data::rebuild_fragments`: Reed-Solomon, each result checked against the manifest), places
//! each on its position's supplier, records the new holder in the catalog with fresh audit pairs
//! and a present cell, and tells the monitor. When a work list is done and anything was placed,
//! a fresh catalog and recovery record are stored, so they name the new holders.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;

use super::backup_job::{CatalogRefresh, FragmentSource, store_fragment};
use super::fragments::{FragmentError, Fragments, NetworkFragments};
use super::monitor::{MonitorDriver, MonitorInput, health_of};
use super::services::Services;
use super::shell::{Deliver, Driver, Input, Io, Shell};
use crate::crypto::identity::NodeId;
use crate::data::manifest::BlockManifest;
use crate::data::{self, BlockId, DataError};
use crate::fsm::monitor::{Cell, RebuildTask};
use crate::fsm::rebuilder::{self as rb, Rebuilder};
use crate::proto::FragmentId;
use crate::store::catalog::{self, FragmentPlace};
use crate::store::health;
use crate::store::writer::WriterError;
use crate::store::{Batch, StoreError};

/// Blocks rebuilt at once (each holds up to `k + m` fragments in memory).
pub const REBUILD_WINDOW: usize = 2;

#[derive(Clone)]
pub struct RebuilderWiring {
    pub services: Services,
    pub request_timeout: Duration,
    pub refresh: CatalogRefresh,
}

/// Why a source was not fetched or a block not rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("cannot read the catalog: {0}")]
    Store(#[from] StoreError),
    #[error("cannot read the block's health: {0}")]
    Health(#[from] health::HealthError),
    #[error("the block is no longer in the catalog")]
    Gone,
    #[error("the block left the catalog while it was rebuilt")]
    LeftCatalog,
    #[error("the block's manifest: {0}")]
    Manifest(DataError),
    #[error(transparent)]
    Fetch(#[from] FragmentError),
    #[error("cannot rebuild: {0}")]
    Rebuild(DataError),
    #[error("a worker thread failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
    #[error("cannot record the rebuilt fragments: {0}")]
    Record(#[from] WriterError),
}

pub enum RebuilderInput {
    Work(Vec<RebuildTask>),
}

/// What is known and fetched of a block being rebuilt.
struct Source {
    manifest: BlockManifest,
    signed_manifest: Vec<u8>,
    fragments: Vec<Option<Vec<u8>>>,
}

pub struct RebuilderDriver {
    wiring: RebuilderWiring,
    monitor: Addr<Shell<MonitorDriver>>,
    blocks: HashMap<[u8; 32], Source>,
    refreshing: bool,
    /// A fragment moved to another supplier since the last refresh.
    holders_moved: bool,
    bytes_fetched: u64,
    bytes_placed: u64,
}

impl RebuilderDriver {
    fn fetch(&mut self, block: [u8; 32], position: u32, supplier: NodeId, io: &mut Io<'_, Self>) {
        let kv = self.wiring.services.kv.clone();
        let owner = self.wiring.services.owner();
        let client = NetworkFragments::network(
            self.wiring.services.network.clone(),
            self.wiring.request_timeout,
        );
        let known = self.blocks.contains_key(&block);
        let work = async move {
            // The manifest, once per block: the reference every fragment is checked against.
            let source = if known {
                None
            } else {
                let entry =
                    tokio::task::spawn_blocking(move || catalog::block(&*kv, &BlockId(block)))
                        .await??
                        .ok_or(RebuildError::Gone)?;
                let manifest = BlockManifest::verify(&entry.signed_manifest, &owner)
                    .map_err(RebuildError::Manifest)?;
                let total = entry.fragments.len();
                Some(Source {
                    manifest,
                    signed_manifest: entry.signed_manifest,
                    fragments: vec![None; total],
                })
            };
            let stored = client.retrieve(supplier, block, position).await?;
            Ok::<_, RebuildError>((source, stored))
        };
        io.spawn_then(work, move |driver, result| {
            let failed = rb::Event::FragmentFailed { block, position };
            let (source, stored) = match result {
                Ok(r) => r,
                Err(why) => {
                    tracing::debug!(block = %BlockId(block), position, supplier = %supplier,
                        error = %why, "source fragment not fetched");
                    return failed;
                }
            };
            driver.bytes_fetched += stored.len() as u64;
            if let Some(source) = source {
                driver.blocks.entry(block).or_insert(source);
            }
            let Some(source) = driver.blocks.get_mut(&block) else {
                return failed;
            };
            let checked = data::stored::unwrap(&stored)
                .ok()
                .and_then(|(_, fragment)| {
                    source
                        .manifest
                        .check_fragment(position as usize, fragment)
                        .ok()
                        .map(|()| fragment.to_vec())
                });
            match checked {
                Some(fragment) if (position as usize) < source.fragments.len() => {
                    source.fragments[position as usize] = Some(fragment);
                    rb::Event::FragmentOk { block, position }
                }
                _ => {
                    tracing::warn!(block = %BlockId(block), position, supplier = %supplier,
                        "a source fragment does not match the owner's manifest");
                    failed
                }
            }
        });
    }

    fn rebuild(
        &mut self,
        block: [u8; 32],
        sources: Vec<u32>,
        targets: Vec<(u32, NodeId)>,
        io: &mut Io<'_, Self>,
    ) {
        let all_failed = rb::Event::Done {
            block,
            placed: Vec::new(),
            failed: targets.iter().map(|(p, _)| *p).collect(),
        };
        let Some(source) = self.blocks.get(&block) else {
            io.send(all_failed);
            return;
        };
        let manifest = source.manifest.clone();
        let signed = source.signed_manifest.clone();
        let fragments: Vec<Option<Vec<u8>>> = source
            .fragments
            .iter()
            .enumerate()
            .map(|(p, f)| f.clone().filter(|_| sources.contains(&(p as u32))))
            .collect();
        let wiring = self.wiring.clone();
        let work = async move {
            let positions: Vec<usize> = targets.iter().map(|(p, _)| *p as usize).collect();
            let rebuilt = tokio::task::spawn_blocking(move || {
                let refs: Vec<Option<&[u8]>> = fragments.iter().map(|f| f.as_deref()).collect();
                data::rebuild_fragments(&manifest, &signed, &refs, &positions)
            })
            .await?
            .map_err(RebuildError::Rebuild)?;
            let mut placed = Vec::new();
            let mut failed = Vec::new();
            let mut places = Vec::new();
            for (position, stored) in rebuilt {
                let Some((_, supplier)) = targets.iter().find(|(p, _)| *p as usize == position)
                else {
                    continue;
                };
                let place = FragmentPlace {
                    supplier: Some(*supplier),
                    size: stored.len() as u64,
                    blake3: *blake3::hash(&stored).as_bytes(),
                };
                let id = FragmentId {
                    block: block.to_vec(),
                    position: position as u32,
                };
                let sent = store_fragment(
                    wiring.services.network.clone(),
                    *supplier,
                    id,
                    FragmentSource::Bytes(stored),
                    wiring.request_timeout,
                )
                .await;
                match sent {
                    Ok(pairs) => {
                        places.push((position, place, pairs));
                        placed.push((position as u32, *supplier));
                    }
                    Err(why) => {
                        tracing::warn!(block = %BlockId(block), position, supplier = %supplier,
                            error = %why, "rebuilt fragment not placed");
                        failed.push(position as u32);
                    }
                }
            }
            let bytes: u64 = places.iter().map(|(_, p, _)| p.size).sum();
            let moved = record(&wiring, block, places).await?;
            Ok::<_, RebuildError>((placed, failed, moved, bytes))
        };
        io.spawn_then(work, move |driver, result| match result {
            Ok((placed, failed, moved, bytes)) => {
                driver.holders_moved |= moved;
                driver.bytes_placed += bytes;
                rb::Event::Done {
                    block,
                    placed,
                    failed,
                }
            }
            Err(why) => {
                tracing::warn!(block = %BlockId(block), error = %why, "block not rebuilt");
                all_failed
            }
        });
    }
}

/// The new holders in the catalog, their audit pairs and present cells, in one batch. Returns
/// whether a fragment moved to another supplier (then the stored catalog must be refreshed).
async fn record(
    wiring: &RebuilderWiring,
    block: [u8; 32],
    places: Vec<(usize, FragmentPlace, Vec<crate::data::audit::AuditPair>)>,
) -> Result<bool, RebuildError> {
    if places.is_empty() {
        return Ok(false);
    }
    let kv = wiring.services.kv.clone();
    let batch = tokio::task::spawn_blocking(move || {
        let id = BlockId(block);
        let mut entry = catalog::block(&*kv, &id)?.ok_or(RebuildError::LeftCatalog)?;
        let total = entry.fragments.len();
        let mut cells = health::health(&*kv, &id)?.unwrap_or_default();
        cells.resize(total, health_of(Cell::Unknown));
        let mut batch = Batch::new();
        let mut moved = false;
        for (position, place, pairs) in places {
            if position < total {
                moved |= entry.fragments[position].supplier != place.supplier;
                entry.fragments[position] = place;
                // Placed and acknowledged, not yet proven: only an audit marks it present.
                cells[position] = health_of(Cell::Unknown);
                health::put_pairs(&mut batch, &id, position as u32, &pairs);
            }
        }
        catalog::put_block(&mut batch, &entry);
        health::put_health(&mut batch, &id, &cells);
        Ok::<_, RebuildError>((batch, moved))
    })
    .await??;
    wiring.services.writer.write(batch.0).await?;
    Ok(batch.1)
}

impl Driver for RebuilderDriver {
    type M = Rebuilder;
    type Input = RebuilderInput;
    type Query = std::convert::Infallible;
    type Answer = ();

    fn perform(&mut self, output: rb::Output, _machine: &Rebuilder, io: &mut Io<'_, Self>) {
        match output {
            rb::Output::Fetch {
                block,
                position,
                supplier,
            } => self.fetch(block, position, supplier, io),
            rb::Output::Rebuild {
                block,
                sources,
                targets,
            } => self.rebuild(block, sources, targets, io),
            rb::Output::Forget { block } => {
                self.blocks.remove(&block);
            }
            rb::Output::Placed {
                block,
                position,
                supplier,
            } => {
                tracing::info!(block = %BlockId(block), position, supplier = %supplier,
                    "fragment rebuilt and placed");
                let monitor = self.monitor.clone();
                io.spawn_opt(async move {
                    let _ = monitor
                        .send(Input(MonitorInput::Placed {
                            block,
                            position,
                            supplier,
                        }))
                        .await;
                    None
                });
            }
            rb::Output::Finished { placed } => {
                let monitor = self.monitor.clone();
                // Only a fragment that moved to another supplier makes the stored catalog stale.
                let stale = placed && std::mem::take(&mut self.holders_moved);
                let refresh = (stale && !self.refreshing).then(|| self.wiring.refresh.clone());
                self.refreshing |= refresh.is_some();
                let now_unix = io.ctx().wall.as_secs();
                io.spawn_then_opt(
                    async move {
                        if let Some(refresh) = refresh {
                            match refresh.run(now_unix).await {
                                Ok(()) => tracing::info!(
                                    "catalog and recovery record stored again with the new holders"
                                ),
                                Err(e) => tracing::warn!(error = %e,
                                    "cannot store the catalog after the rebuild; the next one tries again"),
                            }
                        }
                        let _ = monitor.send(Input(MonitorInput::RebuildIdle)).await;
                    },
                    |driver, ()| {
                        driver.refreshing = false;
                        None
                    },
                );
            }
            rb::Output::Progress(mut progress) => {
                progress.bytes_fetched = self.bytes_fetched;
                progress.bytes_placed = self.bytes_placed;
                let monitor = self.monitor.clone();
                io.spawn_opt(async move {
                    let _ = monitor
                        .send(Input(MonitorInput::RebuildProgress(progress)))
                        .await;
                    None
                });
            }
        }
    }

    fn input(
        &mut self,
        input: RebuilderInput,
        _machine: &Rebuilder,
        _io: &mut Io<'_, Self>,
    ) -> Vec<rb::Event> {
        match input {
            RebuilderInput::Work(work) => vec![rb::Event::Work(work)],
        }
    }

    fn query(&mut self, query: Self::Query, _: &Rebuilder, _: &mut Io<'_, Self>) {
        match query {}
    }
}

pub async fn start(
    wiring: RebuilderWiring,
    monitor: Addr<Shell<MonitorDriver>>,
) -> Addr<Shell<RebuilderDriver>> {
    let registry = wiring.services.registry.clone();
    let mut machine = Rebuilder::new(REBUILD_WINDOW);
    machine.hedge_after = super::restore_worker::hedge_bound(wiring.request_timeout);
    let driver = RebuilderDriver {
        wiring,
        monitor,
        blocks: HashMap::new(),
        refreshing: false,
        holders_moved: false,
        bytes_fetched: 0,
        bytes_placed: 0,
    };
    let addr = Shell::new(machine, "0", driver, registry).start();
    let _ = addr.send(Deliver(rb::Event::Start)).await;
    addr
}
