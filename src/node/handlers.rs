//! The control socket's requests, one function each: what `bitdust status`, `backup`, `list`,
//! `restore`, `peer …`, `customer drop` and `drill` ask of the running node.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::backups;
use super::config::BackupSection;
use super::control::{Done, PeerAdded, Pong, Request, Response, Runs, Versions};
use super::drills::DrillRunError;
use super::durability;
use super::wiring::Actors;
use crate::actors::Query;
use crate::actors::backup_job::JobSpec;
use crate::actors::fire_hire::{FireHireAnswer, FireHireQuery};
use crate::actors::network_connector::{NetAnswer, NetQuery, PeerBookError};
use crate::actors::restore_worker::RestoreSpec;
use crate::actors::status::{DrillStatus, MonitorStatus, NodeStatus};
use crate::actors::supplier_service::{SupplierAnswer, SupplierQuery};
use crate::crypto::identity::{BadNodeId, Identity, IdentityError, NodeId};
use crate::net::link::RequestError;
use crate::proto::Ping;
use crate::proto::envelope::Body;
use crate::store::StoreError;
use crate::store::catalog::{self, Snapshot};
use crate::store::writer::WriterError;

/// Why the node refused a request (the message the CLI prints).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("nothing to back up: give a PATH or add [[backup.sources]] to config.toml")]
    NothingToBackUp,
    /// The backup or restore queue refused (its own message).
    #[error("{0}")]
    Queue(super::jobs::Refused),
    #[error("cannot read the catalog: {0}")]
    Catalog(#[from] StoreError),
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Restore(#[from] RestoreRequestError),
    #[error("invalid card: {0}")]
    Card(#[from] IdentityError),
    #[error(transparent)]
    NodeId(#[from] BadNodeId),
    #[error("cannot save the peer book: {0}")]
    Save(#[from] WriterError),
    #[error(transparent)]
    PeerBook(#[from] PeerBookError),
    /// The supplier could not drop the customer.
    #[error(transparent)]
    Drop(#[from] crate::actors::supplier_service::DropError),
    #[error(transparent)]
    Drill(#[from] DrillRunError),
    #[error("no session with {0}")]
    NoSession(NodeId),
    #[error(transparent)]
    Ping(#[from] RequestError),
}

/// A restore request that names no version to restore.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreRequestError {
    #[error("no backups yet")]
    NoBackups,
    #[error("the restore target must be an absolute path")]
    RelativeTarget,
    #[error("no version {version}{}", of.as_deref().map(|s| format!(" of {s}")).unwrap_or_default())]
    NoVersion { version: u64, of: Option<String> },
    #[error("no backup of {0}")]
    NoSource(String),
}

/// What the control socket needs to answer.
pub struct Control {
    pub node_id: NodeId,
    pub started: Instant,
    pub actors: Rc<Actors>,
    /// The configured backup sources (replaced on reload).
    pub sources: Rc<RefCell<BackupSection>>,
    pub request_timeout: Duration,
    /// How long a lost fragment stays lost before it is rebuilt (for the durability estimate).
    pub repair_window: Duration,
}

impl Control {
    pub async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::of(Ok::<_, Refused>(self.status().await)),
            Request::Backup { paths } => Response::of(self.backup(paths)),
            Request::List => Response::of(self.list().await),
            Request::Restore {
                source,
                version,
                to,
                path,
                overwrite,
            } => {
                let asked = Asked {
                    source,
                    version,
                    to,
                    path,
                    overwrite,
                };
                Response::of(self.restore(asked).await)
            }
            Request::PeerAdd { card, name } => Response::of(self.peer_add(&card, name).await),
            Request::PeerRemove { node_id } => Response::of(self.peer_remove(&node_id).await),
            Request::CustomerDrop { node_id } => Response::of(self.customer_drop(&node_id).await),
            Request::Drill => Response::of(self.actors.drills.run().await.map(DrillStatus::from)),
            Request::PeerPing { node_id } => Response::of(self.peer_ping(&node_id).await),
        }
    }

    async fn status(&self) -> NodeStatus {
        let a = &self.actors;
        let current = a.published.borrow().clone();
        let network = match a.network.send(Query::new(NetQuery::Status)).await {
            Ok(NetAnswer::Status(status)) => status,
            _ => Default::default(),
        };
        let customer = match a.customer.send(Query::new(FireHireQuery::Status)).await {
            Ok(FireHireAnswer::Status(status)) => status,
            _ => Default::default(),
        };
        let supplier = match a.supplier.send(Query::new(SupplierQuery::Status)).await {
            Ok(SupplierAnswer::Status(status)) => status,
            _ => Default::default(),
        };
        NodeStatus {
            node_id: self.node_id.to_string(),
            name: current.as_ref().map(|i| i.name().to_string()),
            revision: current.as_ref().map(Identity::revision),
            contacts: current.as_ref().map(|i| i.contacts().to_vec()),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            machines: a.registry.snapshot(),
            network,
            customer,
            supplier,
            // Read from atomics: answers even while the disk is frozen.
            disk: Some(a.disk.health.report()),
            backup: a
                .backup_status
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
            restore: a
                .restore_status
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
            health: Some(self.health()),
            bandwidth: Some(a.shaper.snapshot().into()),
        }
    }

    /// The monitor's view for `status`: the health matrix summary, per source, with each
    /// source's durability estimate and the last restore drill.
    fn health(&self) -> MonitorStatus {
        let mut health = self
            .actors
            .monitor_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let positions: Vec<durability::Observed> = health
            .positions
            .iter()
            .map(|p| durability::Observed {
                availability: p.availability,
                observed: Duration::from_secs(p.observed_secs),
            })
            .collect();
        let (k, m) = (health.k as usize, health.m as usize);
        for source in &mut health.sources {
            let p = durability::loss_probability(
                k,
                m,
                &positions,
                self.repair_window,
                Duration::from_secs(365 * 86_400),
                source.blocks,
            );
            source.loss_within_a_year = Some(p);
            source.loss_within_a_year_text = Some(durability::describe(p));
        }
        health.last_drill = self.actors.drills.last().map(DrillStatus::from);
        health
    }

    fn backup(&self, paths: Vec<String>) -> Result<Runs, Refused> {
        let section = self.sources.borrow().clone();
        let specs: Vec<JobSpec> = if paths.is_empty() {
            section.sources.iter().map(backups::spec_of).collect()
        } else {
            paths
                .iter()
                .map(|p| {
                    let root = PathBuf::from(p);
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
            return Err(Refused::NothingToBackUp);
        }
        let runs = self.actors.backups.request(specs).map_err(Refused::Queue)?;
        Ok(Runs { runs })
    }

    /// The catalog's versions, read off the event loop.
    async fn snapshots(&self) -> Result<Vec<Snapshot>, Refused> {
        let store = self.actors.store.clone();
        Ok(tokio::task::spawn_blocking(move || catalog::snapshots(store.as_ref())).await??)
    }

    async fn list(&self) -> Result<Versions, Refused> {
        Ok(Versions::of(&self.snapshots().await?))
    }

    async fn restore(&self, asked: Asked) -> Result<Runs, Refused> {
        let snapshots = self.snapshots().await?;
        let specs = restore_specs(&snapshots, asked)?;
        let runs = self
            .actors
            .restores
            .request(specs)
            .map_err(Refused::Queue)?;
        Ok(Runs { runs })
    }

    async fn peer_add(&self, card: &str, name: Option<String>) -> Result<PeerAdded, Refused> {
        let identity = Identity::from_card(card)?;
        let node = identity.node_id();
        let query = NetQuery::AddPeer {
            identity: Box::new(identity),
            label: name,
        };
        match self.actors.network.send(Query::new(query)).await {
            Ok(NetAnswer::Added(Ok((new, saved)))) => {
                saved.await?;
                Ok(PeerAdded {
                    node_id: node.to_string(),
                    new,
                })
            }
            Ok(NetAnswer::Added(Err(e))) => Err(e.into()),
            _ => Err(Refused::ShuttingDown),
        }
    }

    async fn peer_remove(&self, node_id: &str) -> Result<Done, Refused> {
        let peer = node_id.parse::<NodeId>()?;
        let query = Query::new(NetQuery::RemovePeer(peer));
        match self.actors.network.send(query).await {
            Ok(NetAnswer::Removed(Ok(saved))) => {
                saved.await?;
                Ok(Done {
                    node_id: node_id.to_string(),
                })
            }
            Ok(NetAnswer::Removed(Err(e))) => Err(e.into()),
            _ => Err(Refused::ShuttingDown),
        }
    }

    /// The session with `peer`, if one is open.
    async fn link(&self, peer: NodeId) -> Result<Option<crate::net::link::LinkHandle>, Refused> {
        match self
            .actors
            .network
            .send(Query::new(NetQuery::Link(peer)))
            .await
        {
            Ok(NetAnswer::Link(link)) => Ok(link),
            _ => Err(Refused::ShuttingDown),
        }
    }

    async fn customer_drop(&self, node_id: &str) -> Result<Done, Refused> {
        let customer = node_id.parse::<NodeId>()?;
        let link = self.link(customer).await.unwrap_or(None);
        let query = SupplierQuery::Drop { customer, link };
        let Ok(SupplierAnswer::Dropping(done)) = self.actors.supplier.send(Query::new(query)).await
        else {
            return Err(Refused::ShuttingDown);
        };
        match done.await {
            Ok(Ok(())) => Ok(Done {
                node_id: node_id.to_string(),
            }),
            Ok(Err(e)) => Err(Refused::Drop(e)),
            Err(_) => Err(Refused::ShuttingDown),
        }
    }

    async fn peer_ping(&self, node_id: &str) -> Result<Pong, Refused> {
        let peer = node_id.parse::<NodeId>()?;
        let link = self.link(peer).await?.ok_or(Refused::NoSession(peer))?;
        let started = Instant::now();
        let ping = Body::Ping(Ping {
            nonce: rand::random(),
        });
        link.request(ping, self.request_timeout).await?;
        Ok(Pong {
            node_id: node_id.to_string(),
            rtt_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }
}

/// A restore request as the CLI sent it.
pub struct Asked {
    pub source: Option<String>,
    pub version: Option<u64>,
    pub to: String,
    pub path: Option<String>,
    pub overwrite: bool,
}

/// Which versions a restore request means: `version` exactly; else the latest of `source`; else
/// the latest of every source (each under `to/<its directory name>` when there are several).
pub fn restore_specs(
    snapshots: &[Snapshot],
    asked: Asked,
) -> Result<Vec<RestoreSpec>, RestoreRequestError> {
    let Asked {
        source,
        version,
        to,
        path,
        overwrite,
    } = asked;
    if snapshots.is_empty() {
        return Err(RestoreRequestError::NoBackups);
    }
    let to = PathBuf::from(to);
    if !to.is_absolute() {
        return Err(RestoreRequestError::RelativeTarget);
    }
    let sub_path = path.map(|p| p.trim_start_matches('/').as_bytes().to_vec());
    let spec = |s: &Snapshot, to: PathBuf| RestoreSpec {
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
            .ok_or_else(|| RestoreRequestError::NoVersion {
                version: v,
                of: source.clone(),
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
        0 => Err(RestoreRequestError::NoSource(source.unwrap_or_default())),
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
