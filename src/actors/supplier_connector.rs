//! The supplier_connector actor's IO: one per hire, asking its supplier for service over the
//! network's current link and reporting to fire_hire. How an answer is read is the machine's
//! decision (`FailCode::ends_contract`); this driver maps wire reasons to it one to one.

use actix::prelude::*;

use super::fire_hire::{CustomerSettings, FireHireInput};
use super::network_connector::{NetAnswer, NetQuery, NetworkConnectorDriver};
use super::shell::{Driver, Input, Io, Query, Shell};
use crate::crypto::identity::NodeId;
use crate::fsm::supplier_connector::{self as sc, FailCode, Report, SupplierConnector};
use crate::net::link::RequestError;
use crate::proto::envelope::Body;
use crate::proto::{Envelope, FailReason, ServiceCancel, ServiceRequest};

type NetworkAddr = Addr<Shell<NetworkConnectorDriver>>;

pub struct SupplierConnectorDriver {
    pub(super) instance: u64,
    pub(super) position: u32,
    pub(super) supplier: NodeId,
    pub(super) settings: CustomerSettings,
    pub(super) network: NetworkAddr,
    pub(super) fire_hire: Recipient<Input<FireHireInput>>,
}

/// A wire fail reason, as the connector machine reads it (mapped one to one).
fn fail_code(code: i32) -> FailCode {
    match FailReason::try_from(code) {
        Ok(FailReason::NotTrusted) => FailCode::NotTrusted,
        Ok(FailReason::NoSpace) => FailCode::NoSpace,
        Ok(FailReason::OverQuota) => FailCode::OverQuota,
        Ok(FailReason::NoService) => FailCode::NoService,
        Ok(
            FailReason::StorageError
            | FailReason::TryLater
            | FailReason::ShuttingDown
            | FailReason::Timeout,
        ) => FailCode::NotReady,
        _ => FailCode::Other,
    }
}

impl SupplierConnectorDriver {
    fn report(&self, report: Report) {
        let to = self.fire_hire.clone();
        let instance = self.instance;
        actix::spawn(async move {
            let _ = to
                .send(Input(FireHireInput::Report { instance, report }))
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
                Err(RequestError::Timeout(_) | RequestError::Silent(_)) => Ok(None),
                Err(RequestError::Closed | RequestError::QueueFull) => Err(FailCode::Unavailable),
            }
        }
    }
}

impl Driver for SupplierConnectorDriver {
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
