//! The customer side's IO: fire_hire (positions persisted in the `contracts` column family) and
//! one supplier_connector per hire, talking to suppliers over the network's links. Which
//! supplier to hire, which connector holds a position and how a supplier's answer is read are
//! the machines' decisions; these drivers start connectors, send requests and save positions.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;

use super::network::{NetAnswer, NetQuery, NetworkDriver, Presence};
use super::registry::Registry;
use super::router::Routed;
use super::shell::{Deliver, Driver, Input, Io, Query, Shell};
use super::status::{CustomerStatus, PositionStatus};
use crate::crypto::identity::NodeId;
use crate::fsm::fire_hire::{self, FireHire};
use crate::fsm::supplier_connector::{self as sc, FailCode, Report, SupplierConnector};
use crate::net::link::RequestError;
use crate::proto::envelope::Body;
use crate::proto::{Ack, Envelope, FailReason, ServiceCancel, ServiceRequest};
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

pub enum CustomerInput {
    /// A connector's news.
    Report { instance: u64, report: Report },
    /// Replace the supplier at a position (monitor or operator).
    Fire { position: u32 },
}

pub enum CustomerQuery {
    Status,
}

type NetworkAddr = Addr<Shell<NetworkDriver>>;

pub struct FireHireDriver {
    settings: CustomerSettings,
    /// Position saves go through the writer thread, in order.
    writer: Writer,
    network: NetworkAddr,
    registry: Registry,
    /// Running connectors by instance id (a position may have a leaving one and its successor).
    connectors: BTreeMap<u64, Addr<Shell<ConnectorDriver>>>,
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

impl Driver for FireHireDriver {
    type M = FireHire;
    type Input = CustomerInput;
    type Query = CustomerQuery;
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
                let driver = ConnectorDriver {
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
                match self.writer.submit(batch) {
                    Ok(pending) => {
                        actix::spawn(async move {
                            if let Err(e) = pending.await {
                                tracing::error!(error = %e, "cannot save supplier positions");
                            }
                        });
                    }
                    Err(e) => tracing::error!(error = %e, "cannot save supplier positions"),
                }
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
        input: CustomerInput,
        _machine: &FireHire,
        _io: &mut Io<'_, Self>,
    ) -> Vec<fire_hire::Event> {
        match input {
            CustomerInput::Report { instance, report } => {
                if report == Report::Closed {
                    self.connectors.remove(&instance);
                }
                vec![fire_hire::Event::Report { instance, report }]
            }
            CustomerInput::Fire { position } => vec![fire_hire::Event::Fire { position }],
        }
    }

    fn query(
        &mut self,
        CustomerQuery::Status: CustomerQuery,
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
                    contract: state.unwrap_or("NoService").to_string(),
                }
            })
            .collect();
        CustomerStatus {
            data_shards: self.settings.data_shards,
            parity_shards: self.settings.parity_shards,
            positions,
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

pub struct ConnectorDriver {
    instance: u64,
    position: u32,
    supplier: NodeId,
    settings: CustomerSettings,
    network: NetworkAddr,
    fire_hire: Recipient<Input<CustomerInput>>,
}

/// A wire fail reason, as the connector machine reads it (mapped one to one).
fn fail_code(code: i32) -> FailCode {
    match FailReason::try_from(code) {
        Ok(FailReason::NotTrusted) => FailCode::NotTrusted,
        Ok(FailReason::NoSpace) => FailCode::NoSpace,
        Ok(FailReason::OverQuota) => FailCode::OverQuota,
        Ok(FailReason::StorageError | FailReason::ShuttingDown | FailReason::Timeout) => {
            FailCode::NotReady
        }
        _ => FailCode::Other,
    }
}

impl ConnectorDriver {
    fn report(&self, report: Report) {
        let to = self.fire_hire.clone();
        let instance = self.instance;
        actix::spawn(async move {
            let _ = to
                .send(Input(CustomerInput::Report { instance, report }))
                .await;
        });
    }

    /// Sends `body` to the supplier on its current link and returns the reply: `Err` with a
    /// passing failure when there is no link or it closed (the machine retries soon), `Ok(None)`
    /// when the request timed out (the machine's request timer decides).
    fn ask(
        &self,
        body: Body,
    ) -> impl std::future::Future<Output = Result<Option<Envelope>, FailCode>> + 'static {
        let network = self.network.clone();
        let peer = self.supplier;
        let timeout = self.settings.request_timeout;
        async move {
            let link = match network.send(Query::new(NetQuery::Link(peer))).await {
                Ok(NetAnswer::Link(Some(link))) => link,
                _ => return Err(FailCode::Unavailable),
            };
            match link.request(body, timeout).await {
                Ok(reply) => Ok(Some(reply)),
                Err(RequestError::Timeout(_)) => Ok(None),
                Err(RequestError::Closed | RequestError::QueueFull) => Err(FailCode::Unavailable),
            }
        }
    }
}

impl Driver for ConnectorDriver {
    type M = SupplierConnector;
    type Input = std::convert::Infallible;
    type Query = std::convert::Infallible;
    type Answer = ();

    fn input(
        &mut self,
        input: Self::Input,
        _: &SupplierConnector,
        _: &mut Io<'_, Self>,
    ) -> Vec<sc::Event> {
        match input {}
    }

    fn query(&mut self, query: Self::Query, _: &SupplierConnector, _: &mut Io<'_, Self>) {
        match query {}
    }

    fn perform(&mut self, output: sc::Output, _machine: &SupplierConnector, io: &mut Io<'_, Self>) {
        match output {
            sc::Output::SendRequest => {
                let request = ServiceRequest {
                    space: self.settings.space_per_supplier,
                    position: self.position,
                    data_shards: self.settings.data_shards,
                    parity_shards: self.settings.parity_shards,
                };
                let ask = self.ask(Body::ServiceRequest(request));
                io.spawn_opt(async move {
                    match ask.await {
                        Err(code) => Some(sc::Event::Refused(code)),
                        Ok(None) => None,
                        Ok(Some(reply)) => match reply.body? {
                            Body::ServiceAccept(_) => Some(sc::Event::Accepted),
                            Body::ServiceRefuse(r) => Some(sc::Event::Refused(fail_code(r.reason))),
                            Body::Fail(f) => Some(sc::Event::Refused(fail_code(f.reason))),
                            _ => None,
                        },
                    }
                });
            }
            sc::Output::Report(report) => {
                if let Report::Refused(reason) = report {
                    tracing::info!(position = self.position, supplier = %self.supplier,
                        reason = ?reason, "supplier refused or left");
                }
                self.report(report);
            }
            sc::Output::SendCancel => {
                let ask = self.ask(Body::ServiceCancel(ServiceCancel {
                    from_supplier: false,
                }));
                io.spawn_opt(async move {
                    // Any answer ends it; silence waits for the cancel timer.
                    ask.await.ok()??;
                    Some(sc::Event::CancelDone)
                });
            }
        }
    }
}
