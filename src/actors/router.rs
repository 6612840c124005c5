//! Where requests from peers go: a table from the kind of request to the actor that serves it,
//! filled by each actor as it starts. A new service (audits, recovery records) registers its
//! kinds here instead of editing the network driver.

use std::collections::HashMap;

use actix::prelude::*;
use tokio::sync::mpsc;

use crate::crypto::identity::NodeId;
use crate::labels;
use crate::net::link::{InFlight, LinkHandle};
use crate::proto::envelope::Body;
use crate::proto::{Envelope, Fail, FailReason};

labels! {
    /// The kinds of request a node serves.
    pub enum RequestKind {
        ServiceRequest, ServiceCancel, SupplierCancel, StoreFragment, RetrieveFragment,
        ListFragments, DeleteFragment, AuditChallenge, SliceChallenge,
    }
}

/// The kind of a request body; `None` for bodies that are not requests to route.
pub fn kind_of(body: &Body) -> Option<RequestKind> {
    Some(match body {
        Body::ServiceRequest(_) => RequestKind::ServiceRequest,
        Body::ServiceCancel(c) if c.from_supplier => RequestKind::SupplierCancel,
        Body::ServiceCancel(_) => RequestKind::ServiceCancel,
        Body::StoreFragment(_) => RequestKind::StoreFragment,
        Body::RetrieveFragment(_) => RequestKind::RetrieveFragment,
        Body::ListFragments(_) => RequestKind::ListFragments,
        Body::DeleteFragment(_) => RequestKind::DeleteFragment,
        Body::AuditChallenge(_) => RequestKind::AuditChallenge,
        Body::SliceChallenge(_) => RequestKind::SliceChallenge,
        _ => return None,
    })
}

/// A request from a peer, with the link to answer on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Routed {
    pub from: NodeId,
    /// The peer is a friend (not only let in by the open policy).
    pub trusted: bool,
    /// The peer's Ed25519 signing key when the node knows its identity (a friend): what a
    /// supplier checks the customer's recovery record against.
    pub signing_key: Option<[u8; 32]>,
    pub envelope: Box<Envelope>,
    pub link: LinkHandle,
    /// The link's in-flight slot and the request's bytes on the peer's budget, given back once
    /// the reply is queued (or carried by the reply, see `LinkHandle::reply_within`).
    pub permit: InFlight,
}

impl Routed {
    /// Answers with `body` off the caller's event loop, then gives the slot back.
    pub fn reply(self, body: Body) {
        let Routed {
            envelope,
            link,
            permit,
            ..
        } = self;
        actix::spawn(async move {
            let _ = link.reply(envelope.request_id, body).await;
            drop(permit);
        });
    }

    pub fn fail(self, reason: FailReason, detail: impl Into<String>) {
        self.reply(Body::Fail(Fail {
            reason: reason as i32,
            detail: detail.into(),
        }));
    }
}

/// Requests waiting to be handed to one actor; more than this (every link's in-flight requests
/// at once) are answered "busy" rather than queued.
const ROUTE_QUEUE: usize = 4096;

#[derive(Default)]
pub struct Router {
    routes: HashMap<RequestKind, mpsc::Sender<Routed>>,
}

impl Router {
    /// Sends requests of `kinds` to `to`. One task per registration forwards them in arrival
    /// order (the supplier answers one customer's requests in that order), waiting for room in
    /// the actor's mailbox. Call from within the actor system.
    pub fn register(&mut self, kinds: &[RequestKind], to: Recipient<Routed>) {
        let (tx, mut rx) = mpsc::channel::<Routed>(ROUTE_QUEUE);
        actix::spawn(async move {
            while let Some(call) = rx.recv().await {
                if to.send(call).await.is_err() {
                    return;
                }
            }
        });
        for kind in kinds {
            self.routes.insert(*kind, tx.clone());
        }
    }

    /// Hands the request to its actor. A request no actor serves is answered `NoService`.
    pub fn route(&self, call: Routed) {
        let kind = call.envelope.body.as_ref().and_then(kind_of);
        let Some(to) = kind.and_then(|k| self.routes.get(&k)) else {
            call.fail(FailReason::NoService, "no such service on this node");
            return;
        };
        match to.try_send(call) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(call)) => {
                call.fail(FailReason::ShuttingDown, "busy; try again")
            }
            Err(mpsc::error::TrySendError::Closed(call)) => {
                call.fail(FailReason::ShuttingDown, "the node is shutting down")
            }
        }
    }
}
