//! The customer side's IO: fire_hire (positions persisted in the `contracts` column family) and
//! one supplier_connector per position, talking to suppliers over the network's links.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde_json::json;
use tokio::sync::oneshot;

use super::network::{NetInput, NetworkDriver};
use super::registry::Registry;
use super::shell::{Driver, Fire, Input, Io, Shell};
use crate::crypto::identity::NodeId;
use crate::fsm::Label;
use crate::fsm::fire_hire::{self, FireHire};
use crate::fsm::supplier_connector::{self as sc, RefuseReason, SupplierConnector};
use crate::net::link::RequestError;
use crate::proto::envelope::Body;
use crate::proto::{Envelope, FailReason, ServiceCancel, ServiceRequest};
use crate::store::{KvStore, StoreError, contracts};

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

fn save_contracts(kv: &dyn KvStore, slots: &[Option<fire_hire::Hire>]) -> Result<(), StoreError> {
    let slots = slots.iter().map(|slot| {
        slot.as_ref().map(|hire| contracts::Contract {
            supplier: hire.supplier,
            confirmed: hire.confirmed,
        })
    });
    contracts::save(kv, slots)
}

pub enum CustomerInput {
    /// A trusted peer's session came up or went down.
    Presence {
        peer: NodeId,
        up: bool,
    },
    /// A connector's news.
    Report {
        instance: u64,
        position: u32,
        supplier: NodeId,
        report: Report,
    },
    /// Replace the supplier at a position (monitor or operator).
    Fire {
        position: u32,
    },
    /// A supplier ended our contract with it.
    SupplierLeft(NodeId),
    Status(oneshot::Sender<serde_json::Value>),
}

#[derive(Clone, Copy, Debug)]
pub enum Report {
    Connected,
    Refused,
    Closed,
}

/// One running connector. A dismissed one keeps running (`leaving`) until its cancel is done.
struct Conn {
    position: u32,
    supplier: NodeId,
    addr: Addr<Shell<ConnectorDriver>>,
    leaving: bool,
}

pub struct FireHireDriver {
    settings: CustomerSettings,
    kv: Arc<dyn KvStore>,
    network: Addr<Shell<NetworkDriver>>,
    registry: Registry,
    /// By instance id: a position may have a leaving connector and its successor at once.
    connectors: BTreeMap<u64, Conn>,
    next_instance: u64,
    online: std::collections::BTreeSet<NodeId>,
    /// Serialises position saves.
    saving: Arc<tokio::sync::Mutex<()>>,
}

impl FireHireDriver {
    pub fn new(
        settings: CustomerSettings,
        kv: Arc<dyn KvStore>,
        network: Addr<Shell<NetworkDriver>>,
        registry: Registry,
    ) -> Self {
        FireHireDriver {
            settings,
            kv,
            network,
            registry,
            connectors: BTreeMap::new(),
            next_instance: 1,
            online: Default::default(),
            saving: Default::default(),
        }
    }

    /// The connector that holds `position` now (not one that is leaving it).
    fn current(&self, position: u32) -> Option<(u64, &Conn)> {
        self.connectors
            .iter()
            .find(|(_, c)| c.position == position && !c.leaving)
            .map(|(i, c)| (*i, c))
    }

    /// A supplier whose cancel is still in flight is not offered for hiring: its cancel and a
    /// new request could reach it in either order.
    fn is_leaving(&self, supplier: NodeId) -> bool {
        self.connectors
            .values()
            .any(|c| c.supplier == supplier && c.leaving)
    }

    fn start_connector(
        &mut self,
        position: u32,
        supplier: NodeId,
        resumed: bool,
        io: &mut Io<'_, Self>,
    ) {
        let mut machine = if resumed {
            SupplierConnector::resumed()
        } else {
            SupplierConnector::default()
        };
        machine.request_timeout = self.settings.request_timeout;
        machine.peer_up = self.online.contains(&supplier);
        let instance = self.next_instance;
        self.next_instance += 1;
        let driver = ConnectorDriver {
            instance,
            position,
            supplier,
            settings: self.settings.clone(),
            network: self.network.clone(),
            fire_hire: io.address(),
        };
        let addr = Shell::new(
            machine,
            format!("p{position}-{instance}"),
            driver,
            self.registry.clone(),
        )
        .start();
        addr.do_send(Fire(sc::Event::Connect));
        self.connectors.insert(
            instance,
            Conn {
                position,
                supplier,
                addr,
                leaving: false,
            },
        );
    }
}

impl Driver for FireHireDriver {
    type M = FireHire;
    type Input = CustomerInput;

    /// The node stops: every connector closes too, keeping its contract for the next run.
    fn closed(&mut self, _machine: &FireHire) {
        for conn in self.connectors.values() {
            conn.addr.do_send(super::shell::Shutdown);
        }
    }

    fn perform(
        &mut self,
        action: fire_hire::Action,
        _event: &fire_hire::Event,
        machine: &FireHire,
        io: &mut Io<'_, Self>,
    ) {
        match action {
            fire_hire::Action::Note => {}
            fire_hire::Action::Resume => {
                for (position, supplier) in machine.resumed.clone() {
                    self.start_connector(position, supplier, true, io);
                }
            }
            fire_hire::Action::HireOne => {
                if let Some((position, supplier)) = machine.pending {
                    tracing::info!(position, supplier = %supplier, "asking a friend to be a supplier");
                    self.start_connector(position, supplier, false, io);
                }
            }
            fire_hire::Action::Dismiss => {
                if let Some((position, supplier)) = machine.dismiss
                    && let Some((instance, conn)) = self.current(position)
                    && conn.supplier == supplier
                {
                    conn.addr.do_send(Fire(sc::Event::Dismiss));
                    if let Some(conn) = self.connectors.get_mut(&instance) {
                        conn.leaving = true;
                    }
                    if self.online.contains(&supplier) {
                        io.send(fire_hire::Event::CandidateDown(supplier));
                    }
                }
            }
            fire_hire::Action::Save => {
                // A synced write: off the event loop, one at a time, in order; detached from
                // this actor so a save still runs if the actor stops meanwhile.
                let (kv, slots, gate) =
                    (self.kv.clone(), machine.slots.clone(), self.saving.clone());
                actix::spawn(async move {
                    let _turn = gate.lock().await;
                    let saved =
                        tokio::task::spawn_blocking(move || save_contracts(kv.as_ref(), &slots))
                            .await;
                    if let Ok(Err(e)) = saved {
                        tracing::error!(error = %e, "cannot save supplier positions");
                    }
                });
            }
        }
    }

    fn input(
        &mut self,
        input: CustomerInput,
        machine: &FireHire,
        io: &mut Io<'_, Self>,
    ) -> Vec<fire_hire::Event> {
        match input {
            CustomerInput::Presence { peer, up } => {
                if up {
                    self.online.insert(peer);
                } else {
                    self.online.remove(&peer);
                }
                for conn in self.connectors.values().filter(|c| c.supplier == peer) {
                    conn.addr.do_send(Fire(if up {
                        sc::Event::PeerUp
                    } else {
                        sc::Event::PeerDown
                    }));
                }
                if up && self.is_leaving(peer) {
                    return vec![];
                }
                vec![if up {
                    fire_hire::Event::CandidateUp(peer)
                } else {
                    fire_hire::Event::CandidateDown(peer)
                }]
            }
            CustomerInput::Report {
                instance,
                position,
                supplier,
                report,
            } => match report {
                // News from a connector that no longer holds its position is stale.
                Report::Connected | Report::Refused
                    if self.current(position).map(|(i, _)| i) != Some(instance) =>
                {
                    vec![]
                }
                Report::Connected => vec![fire_hire::Event::Hired { position, supplier }],
                Report::Refused => vec![fire_hire::Event::Refused {
                    position,
                    supplier,
                    now: io.now(),
                }],
                Report::Closed => {
                    let was_leaving = self.connectors.remove(&instance).is_some_and(|c| c.leaving);
                    if was_leaving && self.online.contains(&supplier) && !self.is_leaving(supplier)
                    {
                        return vec![fire_hire::Event::CandidateUp(supplier)];
                    }
                    vec![]
                }
            },
            CustomerInput::Fire { position } => vec![fire_hire::Event::Fire {
                position,
                now: io.now(),
            }],
            CustomerInput::SupplierLeft(peer) => {
                for conn in self
                    .connectors
                    .values()
                    .filter(|c| c.supplier == peer && !c.leaving)
                {
                    conn.addr.do_send(Fire(sc::Event::SupplierCancelled));
                }
                vec![]
            }
            CustomerInput::Status(reply) => {
                let positions: Vec<_> = machine
                    .slots
                    .iter()
                    .enumerate()
                    .map(|(p, slot)| {
                        let state = self.current(p as u32).and_then(|(instance, _)| {
                            self.registry
                                .state_of("supplier_connector", &format!("p{p}-{instance}"))
                        });
                        json!({
                            "position": p,
                            "supplier": slot.map(|h| h.supplier.to_string()),
                            "confirmed": slot.is_some_and(|h| h.confirmed),
                            "contract": slot.and(state).unwrap_or("NoService"),
                        })
                    })
                    .collect();
                let _ = reply.send(json!({
                    "data_shards": self.settings.data_shards,
                    "parity_shards": self.settings.parity_shards,
                    "positions": positions,
                }));
                vec![]
            }
        }
    }
}

pub struct ConnectorDriver {
    instance: u64,
    position: u32,
    supplier: NodeId,
    settings: CustomerSettings,
    network: Addr<Shell<NetworkDriver>>,
    fire_hire: Addr<Shell<FireHireDriver>>,
}

impl ConnectorDriver {
    fn report(&self, report: Report) {
        self.fire_hire.do_send(Input(CustomerInput::Report {
            instance: self.instance,
            position: self.position,
            supplier: self.supplier,
            report,
        }));
    }

    /// Sends `body` to the supplier and returns its reply. A session that is replaced or
    /// drops meanwhile (reconnects, the duplicate tie-break) is survived: the request is sent
    /// again on the next link, until most of `timeout` is spent; then the machine's own request
    /// timer decides.
    fn ask(&self, body: Body) -> impl std::future::Future<Output = Option<Envelope>> + 'static {
        let network = self.network.clone();
        let peer = self.supplier;
        let budget = self.settings.request_timeout.mul_f32(0.9);
        async move {
            let deadline = tokio::time::Instant::now() + budget;
            loop {
                let left = deadline.checked_duration_since(tokio::time::Instant::now())?;
                let (tx, rx) = oneshot::channel();
                network
                    .send(Input(NetInput::Link { peer, reply: tx }))
                    .await
                    .ok()?;
                if let Some(link) = rx.await.ok().flatten() {
                    match link.request(body.clone(), left).await {
                        Ok(reply) => return Some(reply),
                        Err(RequestError::Timeout(_)) => return None,
                        Err(RequestError::Closed | RequestError::QueueFull) => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(200).min(left)).await;
            }
        }
    }
}

/// Why a supplier's fail reason ends the contract. `Other` (storage still opening, shutting
/// down, ...) does not: a `Fail` with it counts as no answer, so the request timer retries and a
/// working contract is not dropped over a passing error.
fn refuse_reason(code: i32) -> RefuseReason {
    match FailReason::try_from(code) {
        Ok(FailReason::NotTrusted) => RefuseReason::NotTrusted,
        Ok(FailReason::NoSpace | FailReason::OverQuota) => RefuseReason::NoSpace,
        _ => RefuseReason::Other,
    }
}

impl Driver for ConnectorDriver {
    type M = SupplierConnector;
    type Input = std::convert::Infallible;

    fn input(
        &mut self,
        input: Self::Input,
        _: &SupplierConnector,
        _: &mut Io<'_, Self>,
    ) -> Vec<sc::Event> {
        match input {}
    }

    fn perform(
        &mut self,
        action: sc::Action,
        _event: &sc::Event,
        machine: &SupplierConnector,
        io: &mut Io<'_, Self>,
    ) {
        match action {
            sc::Action::SendRequest => {
                let request = ServiceRequest {
                    space: self.settings.space_per_supplier,
                    position: self.position,
                    data_shards: self.settings.data_shards,
                    parity_shards: self.settings.parity_shards,
                };
                let ask = self.ask(Body::ServiceRequest(request));
                io.spawn_opt(async move {
                    // No session or no answer: the machine's request timer decides.
                    match ask.await?.body? {
                        Body::ServiceAccept(_) => Some(sc::Event::Accepted),
                        Body::ServiceRefuse(r) => Some(sc::Event::Refused(refuse_reason(r.reason))),
                        Body::Fail(f) => match refuse_reason(f.reason) {
                            RefuseReason::Other => None,
                            reason => Some(sc::Event::Refused(reason)),
                        },
                        _ => None,
                    }
                });
            }
            sc::Action::ReportConnected => self.report(Report::Connected),
            sc::Action::ReportDisconnected | sc::Action::NotePresence => {}
            sc::Action::ReportRefused => {
                tracing::info!(position = self.position, supplier = %self.supplier,
                    reason = machine.refuse_reason.map(|r| r.name()).unwrap_or(""), "supplier refused or left");
                self.report(Report::Refused);
            }
            sc::Action::SendCancel => {
                let ask = self.ask(Body::ServiceCancel(ServiceCancel {
                    from_supplier: false,
                }));
                io.spawn_opt(async move {
                    ask.await?;
                    Some(sc::Event::CancelDone)
                });
            }
            sc::Action::ReportClosed => self.report(Report::Closed),
        }
    }
}
