//! The fire_hire actor's IO: the customer side's positions (persisted in the `contracts` column
//! family through the writer) and one supplier_connector actor per hire. Which supplier to hire
//! and which connector holds a position are the machine's decisions; this driver starts
//! connectors, passes news to them and saves positions.
//!
//! Subscribers hear the machine's position changes ([`PositionNews`]) in the order it made
//! them: each has one bounded channel drained by one forwarding task, which starts with where
//! every position stands at the moment of subscribing. [`FireHireQuery::Positions`] is the same
//! snapshot as a typed answer, for who needs it before it can listen.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::network_connector::{NetworkConnectorDriver, Presence};
use super::registry::Registry;
use super::router::Routed;
use super::shell::{Deliver, Driver, Io, Query, Shell};
use super::status::{Contract, CustomerStatus, PositionStatus};
use super::supplier_connector::SupplierConnectorDriver;
use crate::crypto::identity::NodeId;
use crate::fsm::fire_hire::{self, FireHire, Position};
use crate::fsm::supplier_connector::{self as sc, Report, SupplierConnector};
use crate::proto::Ack;
use crate::proto::envelope::Body;
use crate::store::{KvStore, Writer, contracts};

#[derive(Clone)]
pub struct CustomerSettings {
    pub data_shards: u32,
    pub parity_shards: u32,
    pub space_per_supplier: u64,
    pub request_timeout: Duration,
}

/// Reads the positions a previous run saved: (position, supplier), confirmed ones only.
pub fn load_contracts(kv: &dyn KvStore) -> Vec<(u32, NodeId)> {
    contracts::confirmed(kv).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read the saved supplier positions");
        Vec::new()
    })
}

/// A position's supplier came up (its contract is confirmed and its connector connected) or
/// went down: fire_hire's [`Position`] output, as a message to its subscribers.
#[derive(Message, Clone, Copy, Debug, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct PositionNews {
    pub position: u32,
    pub supplier: NodeId,
    pub up: bool,
}

impl From<Position> for PositionNews {
    fn from(p: Position) -> Self {
        PositionNews {
            position: p.position,
            supplier: p.supplier,
            up: p.up,
        }
    }
}

/// News a subscriber may fall behind by before it is dropped (a live actor drains its channel
/// within moments; positions change a few times a minute at most).
const NEWS_QUEUE: usize = 1024;

pub enum FireHireInput {
    /// A connector's news.
    Report { instance: u64, report: Report },
    /// Hear where every held position stands now, then every change, in order.
    Subscribe(Recipient<PositionNews>),
    /// Replace the supplier at a position (monitor or operator).
    Fire { position: u32 },
}

pub enum FireHireQuery {
    /// Everything, for `status`.
    Status,
    /// The held positions and the spares, now.
    Positions,
}

/// Where the positions stand at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Positions {
    /// Every held position with its supplier and whether it is up.
    pub held: Vec<PositionNews>,
    /// Friends that could be hired now in a fired supplier's place.
    pub spares: usize,
}

impl Positions {
    /// The positions whose suppliers are up.
    pub fn up(&self) -> impl Iterator<Item = &PositionNews> {
        self.held.iter().filter(|p| p.up)
    }

    /// The positions (of `total`) whose suppliers are not up, held or not.
    pub fn down(&self, total: u32) -> Vec<u32> {
        (0..total)
            .filter(|p| !self.up().any(|u| u.position == *p))
            .collect()
    }
}

pub enum FireHireAnswer {
    Status(CustomerStatus),
    Positions(Positions),
}

/// Asks fire_hire where the positions stand; `None` when it is gone (the node stops).
pub async fn positions(fire_hire: &Addr<Shell<FireHireDriver>>) -> Option<Positions> {
    match fire_hire
        .send(Query::new(FireHireQuery::Positions))
        .await
        .ok()?
    {
        FireHireAnswer::Positions(p) => Some(p),
        FireHireAnswer::Status(_) => None,
    }
}

type NetworkAddr = Addr<Shell<NetworkConnectorDriver>>;

pub struct FireHireDriver {
    settings: CustomerSettings,
    /// Position saves go through the writer thread, in order.
    writer: Writer,
    network: NetworkAddr,
    registry: Registry,
    /// Running connectors by instance id (a position may have a leaving one and its successor).
    connectors: BTreeMap<u64, Addr<Shell<SupplierConnectorDriver>>>,
    /// One ordered channel per subscriber, each drained by its own forwarding task.
    subscribers: Vec<mpsc::Sender<PositionNews>>,
}

impl FireHireDriver {
    pub fn new(
        settings: CustomerSettings,
        writer: Writer,
        network: NetworkAddr,
        registry: Registry,
    ) -> Self {
        FireHireDriver {
            settings,
            writer,
            network,
            registry,
            connectors: BTreeMap::new(),
            subscribers: Vec::new(),
        }
    }

    /// Passes `news` to every subscriber, in order; one whose actor is gone, or that fell
    /// [`NEWS_QUEUE`] changes behind, hears no more.
    fn publish(&mut self, news: PositionNews) {
        self.subscribers.retain(|to| match to.try_send(news) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::error!(
                    queued = NEWS_QUEUE,
                    "a subscriber fell behind on position news; it hears no more"
                );
                false
            }
        });
    }

    /// A new subscriber: where every held position stands now, then (through `publish`) every
    /// change, all through one channel and one forwarding task, so in the machine's order.
    fn subscribe(&mut self, to: Recipient<PositionNews>, machine: &FireHire) {
        let (tx, mut rx) = mpsc::channel::<PositionNews>(NEWS_QUEUE);
        for position in machine.positions() {
            // A fresh channel with room for more than every position.
            let _ = tx.try_send(position.into());
        }
        actix::spawn(async move {
            while let Some(news) = rx.recv().await {
                if to.send(news).await.is_err() {
                    return;
                }
            }
        });
        self.subscribers.push(tx);
    }

    fn tell(&self, instance: u64, event: sc::Event) {
        if let Some(addr) = self.connectors.get(&instance) {
            let addr = addr.clone();
            actix::spawn(async move {
                let _ = addr.send(Deliver(event)).await;
            });
        }
    }
}

/// Starts fire_hire in `ctx` (made beforehand, so the network could be given its address),
/// resuming the contracts an earlier run saved in `kv`.
pub async fn start(
    ctx: Context<Shell<FireHireDriver>>,
    driver: FireHireDriver,
    positions: usize,
    kv: &dyn KvStore,
    registry: &Registry,
) -> Addr<Shell<FireHireDriver>> {
    let resumed = load_contracts(kv);
    let addr = ctx.address();
    ctx.run(Shell::new(
        FireHire::new(positions),
        "self",
        driver,
        registry.clone(),
    ));
    let _ = addr
        .send(Deliver(fire_hire::Event::Start { resumed }))
        .await;
    addr
}

impl Driver for FireHireDriver {
    type M = FireHire;
    type Input = FireHireInput;
    type Query = FireHireQuery;
    type Answer = FireHireAnswer;

    fn perform(&mut self, output: fire_hire::Output, _machine: &FireHire, io: &mut Io<'_, Self>) {
        match output {
            fire_hire::Output::StartConnector {
                instance,
                position,
                supplier,
                resumed,
                peer_up,
            } => {
                let mut machine = if resumed {
                    SupplierConnector::resumed()
                } else {
                    SupplierConnector::default()
                };
                machine.request_timeout = self.settings.request_timeout;
                machine.peer_up = peer_up;
                let driver = SupplierConnectorDriver {
                    instance,
                    position,
                    supplier,
                    settings: self.settings.clone(),
                    network: self.network.clone(),
                    fire_hire: io.address().recipient(),
                };
                let addr = Shell::new(
                    machine,
                    format!("p{position}-{instance}"),
                    driver,
                    self.registry.clone(),
                )
                .start();
                // A fresh mailbox: the first event always fits.
                let _ = addr.try_send(Deliver(sc::Event::Connect));
                self.connectors.insert(instance, addr);
            }
            fire_hire::Output::Tell { instance, event } => self.tell(instance, event),
            fire_hire::Output::Save(slots) => {
                // Queued in order on the writer thread, never a synced write on this loop.
                let batch = contracts::save_batch(slots.into_iter().map(|slot| {
                    slot.map(|(supplier, confirmed)| contracts::Contract {
                        supplier,
                        confirmed,
                    })
                }));
                super::persist(&self.writer, batch, "cannot save supplier positions");
            }
            fire_hire::Output::Position(position) => self.publish(position.into()),
            fire_hire::Output::StopConnectors => {
                // The node stops: every connector closes too, keeping its contract.
                for addr in self.connectors.values() {
                    let addr = addr.clone();
                    actix::spawn(async move {
                        let _ = addr.send(super::shell::Shutdown).await;
                    });
                }
            }
        }
    }

    fn input(
        &mut self,
        input: FireHireInput,
        machine: &FireHire,
        _io: &mut Io<'_, Self>,
    ) -> Vec<fire_hire::Event> {
        match input {
            FireHireInput::Subscribe(to) => {
                self.subscribe(to, machine);
                Vec::new()
            }
            FireHireInput::Report { instance, report } => {
                if report == Report::Closed {
                    self.connectors.remove(&instance);
                }
                vec![fire_hire::Event::Report { instance, report }]
            }
            FireHireInput::Fire { position } => vec![fire_hire::Event::Fire { position }],
        }
    }

    fn query(
        &mut self,
        query: FireHireQuery,
        machine: &FireHire,
        io: &mut Io<'_, Self>,
    ) -> FireHireAnswer {
        let spares = machine.spares(io.ctx().now);
        if let FireHireQuery::Positions = query {
            return FireHireAnswer::Positions(Positions {
                held: machine.positions().into_iter().map(Into::into).collect(),
                spares,
            });
        }
        // The connectors' states are shown as they are, never used to decide.
        let positions = machine
            .slots
            .iter()
            .enumerate()
            .map(|(p, slot)| {
                let state = slot.and_then(|h| {
                    self.registry
                        .state_of("supplier_connector", &format!("p{p}-{}", h.instance))
                });
                PositionStatus {
                    position: p as u32,
                    supplier: slot.map(|h| h.supplier.to_string()),
                    confirmed: slot.is_some_and(|h| h.confirmed),
                    contract: Contract::of_state(state),
                }
            })
            .collect();
        FireHireAnswer::Status(CustomerStatus {
            data_shards: self.settings.data_shards,
            parity_shards: self.settings.parity_shards,
            positions,
            spares: spares as u32,
        })
    }
}

/// A friend's presence reaches fire_hire as a candidate going up or down.
impl Handler<Presence> for Shell<FireHireDriver> {
    type Result = ();

    fn handle(&mut self, msg: Presence, ctx: &mut Context<Self>) {
        let event = if msg.up {
            fire_hire::Event::CandidateUp(msg.peer)
        } else {
            fire_hire::Event::CandidateDown(msg.peer)
        };
        <Self as Handler<Deliver<fire_hire::Event>>>::handle(self, Deliver(event), ctx);
    }
}

/// A supplier ending our contract: acknowledged, and fire_hire replaces it.
impl Handler<Routed> for Shell<FireHireDriver> {
    type Result = ();

    fn handle(&mut self, msg: Routed, ctx: &mut Context<Self>) {
        let supplier = msg.from;
        msg.reply(Body::Ack(Ack {
            size: 0,
            hash: vec![],
        }));
        <Self as Handler<Deliver<fire_hire::Event>>>::handle(
            self,
            Deliver(fire_hire::Event::SupplierLeft(supplier)),
            ctx,
        );
    }
}
