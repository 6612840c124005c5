//! The fire_hire actor's IO: the customer side's positions (persisted in the `contracts` column
//! family through the writer) and one supplier_connector actor per hire. Which supplier to hire
//! and which connector holds a position are the machine's decisions; this driver starts
//! connectors, passes news to them and saves positions.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;

use super::network_connector::{NetworkConnectorDriver, Presence};
use super::registry::Registry;
use super::router::Routed;
use super::shell::{Deliver, Driver, Io, Shell};
use super::status::{Contract, CustomerStatus, PositionStatus};
use super::supplier_connector::SupplierConnectorDriver;
use crate::crypto::identity::NodeId;
use crate::fsm::fire_hire::{self, FireHire};
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

/// A position's supplier came up (its contract is confirmed and its session open) or went down.
/// Sent to every subscriber (the backup job) as connectors report.
#[derive(Message, Clone, Copy, Debug, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct PositionNews {
    pub position: u32,
    pub supplier: NodeId,
    pub up: bool,
}

pub enum FireHireInput {
    /// A connector's news.
    Report { instance: u64, report: Report },
    /// Hear of positions going up and down from now on.
    Subscribe(Recipient<PositionNews>),
    /// Replace the supplier at a position (monitor or operator).
    Fire { position: u32 },
}

pub enum FireHireQuery {
    Status,
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
    subscribers: Vec<Recipient<PositionNews>>,
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
    type Answer = CustomerStatus;

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
                // Where things stand now, then every change.
                for (p, slot) in machine.slots.iter().enumerate() {
                    let Some(hire) = slot else { continue };
                    let state = self
                        .registry
                        .state_of("supplier_connector", &format!("p{p}-{}", hire.instance));
                    let news = PositionNews {
                        position: p as u32,
                        supplier: hire.supplier,
                        up: state == Some("Connected"),
                    };
                    let to = to.clone();
                    actix::spawn(async move {
                        let _ = to.send(news).await;
                    });
                }
                self.subscribers.push(to);
                Vec::new()
            }
            FireHireInput::Report { instance, report } => {
                if report == Report::Closed {
                    self.connectors.remove(&instance);
                }
                // Only the connector holding a position speaks for it (not one leaving).
                let holder = machine.slots.iter().enumerate().find_map(|(p, slot)| {
                    slot.filter(|h| h.instance == instance)
                        .map(|h| (p as u32, h.supplier))
                });
                if let Some((position, supplier)) = holder {
                    self.subscribers.retain(|s| s.connected());
                    let news = PositionNews {
                        position,
                        supplier,
                        up: report == Report::Connected,
                    };
                    for to in &self.subscribers {
                        let to = to.clone();
                        actix::spawn(async move {
                            let _ = to.send(news).await;
                        });
                    }
                }
                vec![fire_hire::Event::Report { instance, report }]
            }
            FireHireInput::Fire { position } => vec![fire_hire::Event::Fire { position }],
        }
    }

    fn query(
        &mut self,
        FireHireQuery::Status: FireHireQuery,
        machine: &FireHire,
        _io: &mut Io<'_, Self>,
    ) -> CustomerStatus {
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
        CustomerStatus {
            data_shards: self.settings.data_shards,
            parity_shards: self.settings.parity_shards,
            positions,
            spares: machine.spares(_io.ctx().now) as u32,
        }
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
