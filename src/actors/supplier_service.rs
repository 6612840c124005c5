//! The supplier_service actor's IO: the fragment store, and answers to customers' requests
//! (service, store, retrieve, list, delete). Disk work runs on blocking worker threads.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::catalog_upload::{RECOVERY_BLOCK, RECOVERY_POSITION};
use super::registry::Registry;
use super::router::Routed;
use super::shell::{Deliver, Driver, Input, Io, Shell};
use super::status::{AccountStatus, SupplierStatus};
use crate::crypto::identity::NodeId;
/// Kept at this path for callers that found the audit here; the owner's side shares it.
pub use crate::data::audit::{MAX_AUDIT_RANGE, audit_proof, range_proof};
use crate::fsm::supplier_service::{Event, Output, Refusal, SupplierService, decide};
use crate::net::link::LinkHandle;
use crate::proto::envelope::Body;
use crate::proto::{
    Ack, AuditProof, Fail, FailReason, FragmentData, FragmentId, FragmentInfo as WireInfo,
    FragmentList, FragmentSlice, ServiceAccept, ServiceRefuse,
};
use crate::store::KvStore;
use crate::store::catalog;
use crate::store::fragments::{
    AccountState, FragmentError, FragmentInfo, FragmentKey, FragmentStore,
};

/// Why a supplier whose disk is full, failing or stalled takes no new contract or fragment.
const DISK_REFUSES: &str = "this node's disk cannot take writes now (full, failing or stalled)";

/// What the supplier needs to know of the disk under its store: whether it can take writes now,
/// and how much it can really grant.
pub trait DiskGate: Send + Sync + 'static {
    fn can_write(&self) -> bool;
    /// `donated`, capped by what the disk can give (`held`: bytes customers already store).
    fn grantable(&self, donated: u64, held: u64) -> u64;
}

/// Most fragments listed in one reply.
const LIST_PAGE: usize = 1000;

#[derive(Clone)]
pub struct SupplierSettings {
    pub root: std::path::PathBuf,
    pub donated: u64,
    pub disk: Arc<dyn DiskGate>,
    pub open: bool,
    pub grace: Duration,
}

pub enum SupplierInput {
    /// A customer's request, with the link to answer on and whether the customer is a peer.
    Request(Routed),
    /// New donated space, policy and grace period (SIGHUP).
    Reconfigure {
        donated: u64,
        open: bool,
        grace: Duration,
    },
}

pub enum SupplierQuery {
    Status,
    /// Stop serving a customer: its data is kept for the grace period, and it is told.
    Drop {
        customer: NodeId,
        link: Option<LinkHandle>,
    },
}

pub enum SupplierAnswer {
    Status(SupplierStatus),
    /// Resolves once the customer's account is cancelled (and the customer told).
    Dropping(oneshot::Receiver<Result<(), DropError>>),
}

/// Why a customer could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    #[error("storage is not available")]
    NoStorage,
    #[error(transparent)]
    Store(#[from] FragmentError),
    #[error("the drop did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Requests from peers reach the supplier through the network's router.
impl Handler<Routed> for Shell<SupplierServiceDriver> {
    type Result = ();

    fn handle(&mut self, msg: Routed, ctx: &mut Context<Self>) {
        <Self as Handler<Input<SupplierInput>>>::handle(
            self,
            Input(SupplierInput::Request(msg)),
            ctx,
        );
    }
}

pub struct SupplierServiceDriver {
    settings: SupplierSettings,
    kv: Arc<dyn KvStore>,
    store: Option<Arc<FragmentStore>>,
    /// One queue per customer: its requests are answered in the order they came (a cancel and
    /// a new service request, a store and a delete of one fragment, must not swap).
    turns: std::collections::HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>,
}

impl SupplierServiceDriver {
    pub fn new(settings: SupplierSettings, kv: Arc<dyn KvStore>) -> Self {
        SupplierServiceDriver {
            settings,
            kv,
            store: None,
            turns: Default::default(),
        }
    }
}

fn fail(reason: FailReason, detail: impl Into<String>) -> Body {
    Body::Fail(Fail {
        reason: reason as i32,
        detail: detail.into(),
    })
}

fn fail_reason(e: &FragmentError) -> FailReason {
    match e {
        FragmentError::NoService => FailReason::NoService,
        FragmentError::NoSpace { .. } => FailReason::NoSpace,
        FragmentError::OverQuota { .. } | FragmentError::TooManyFragments { .. } => {
            FailReason::OverQuota
        }
        FragmentError::Empty => FailReason::Malformed,
        FragmentError::NotFound => FailReason::NotFound,
        FragmentError::HashMismatch => FailReason::HashMismatch,
        FragmentError::StaleRevision { .. } => FailReason::StaleRevision,
        // It read the bytes back and they are not what it stored: the fragment is bad.
        FragmentError::Corrupt => FailReason::StorageError,
        // The disk or the database failed this time: passing trouble, ask again later (M6).
        FragmentError::Io { .. } | FragmentError::Db(_) => FailReason::TryLater,
    }
}

/// What a customer is told of a failed request: the error's own words where they are about
/// the request (quota, space, hash), a fixed sentence where they are about this node's disk.
/// An IO error's context names files under the supplier's home (its user name, its layout),
/// which are nobody else's business (security review L4); the log keeps them.
fn fail_detail(e: &FragmentError) -> String {
    match e {
        FragmentError::Io { .. } => "the supplier's storage failed to read or write".into(),
        FragmentError::Db(_) => "the supplier's index failed".into(),
        FragmentError::Corrupt => "the stored fragment is damaged".into(),
        other => other.to_string(),
    }
}

fn key_of(id: Option<&FragmentId>) -> Option<FragmentKey> {
    let id = id?;
    Some(FragmentKey {
        block: id.block.as_slice().try_into().ok()?,
        position: id.position,
    })
}

/// The answer to a fragment id that is missing or whose block is not 32 bytes.
fn malformed_id() -> Body {
    fail(
        FailReason::Malformed,
        "fragment id missing or its block is not 32 bytes",
    )
}

fn wire_id(key: &FragmentKey) -> FragmentId {
    FragmentId {
        block: key.block.to_vec(),
        position: key.position,
    }
}

/// The customer's recovery record, for the supplier (PROTOCOL.md 8.5): its revision from the
/// clear header, checked against the customer's signature when its signing key is known (a
/// friend; a stranger under the open policy can only ever write its own record).
fn record_revision(data: &[u8], signing_key: Option<&[u8; 32]>) -> Result<u64, &'static str> {
    let Some(key) = signing_key else {
        return catalog::record_header(data)
            .map(|h| h.revision)
            .map_err(|_| "not a recovery record");
    };
    let owner = ed25519_dalek::VerifyingKey::from_bytes(key)
        .map_err(|_| "the customer's signing key is not usable")?;
    catalog::verify_recovery(data, &owner)
        .map(|(header, _)| header.revision)
        .map_err(|_| "not a recovery record signed by this customer")
}

/// Who asks and what the node knows of them.
struct Customer {
    id: NodeId,
    trusted: bool,
    signing_key: Option<[u8; 32]>,
}

/// Whether `customer` has a live contract here (granted, not cancelled).
fn has_contract(store: &FragmentStore, customer: &NodeId) -> Result<bool, FragmentError> {
    Ok(store
        .account(customer)?
        .is_some_and(|a| a.state == AccountState::Active))
}

/// Stores the customer's recovery record: the contract first (the order of checks), then the
/// record itself (MALFORMED when it is not one), then its revision against the highest stored.
fn store_record(
    store: &FragmentStore,
    who: &Customer,
    key: FragmentKey,
    data: &[u8],
    expected: &[u8; 32],
) -> Result<Result<FragmentInfo, Body>, FragmentError> {
    if !has_contract(store, &who.id)? {
        return Err(FragmentError::NoService);
    }
    let revision = match record_revision(data, who.signing_key.as_ref()) {
        Ok(revision) => revision,
        Err(why) => return Ok(Err(fail(FailReason::Malformed, why))),
    };
    store
        .put_record(&who.id, key, data, expected, revision)
        .map(Ok)
}

/// A service request: a dropped customer stays dropped until its data is purged; then the disk
/// and the space rule (`decide`).
fn service_request(
    store: &FragmentStore,
    settings: &SupplierSettings,
    who: &Customer,
    req: crate::proto::ServiceRequest,
) -> Result<Body, FragmentError> {
    let (customer, trusted) = (who.id, who.trusted);
    let refuse = |reason: FailReason, detail: &str| {
        tracing::info!(customer = %customer, space = req.space, reason = detail, "service refused");
        Ok(Body::ServiceRefuse(ServiceRefuse {
            reason: reason as i32,
            detail: detail.into(),
        }))
    };
    // A customer this supplier dropped stays dropped until its data is purged.
    if store.dropped(&customer)? {
        return refuse(
            FailReason::NotTrusted,
            "this supplier dropped this customer; hire elsewhere",
        );
    }
    if !settings.disk.can_write() {
        return refuse(FailReason::NoSpace, DISK_REFUSES);
    }
    let held: u64 = store.accounts()?.iter().map(|a| a.used).sum();
    let capacity = settings.disk.grantable(settings.donated, held);
    let decided = store.grant_with(customer, |others| {
        decide(trusted, settings.open, req.space, others, capacity)
    })?;
    match decided {
        Ok(space) => {
            tracing::info!(customer = %customer, space, position = req.position, "service granted");
            Ok(Body::ServiceAccept(ServiceAccept { space }))
        }
        Err(Refusal::NotTrusted) => refuse(FailReason::NotTrusted, "not a friend of this node"),
        Err(Refusal::NoSpace) => refuse(FailReason::NoSpace, "not enough donated space left"),
        Err(Refusal::TooSmall) => refuse(
            FailReason::Malformed,
            "a contract smaller than one fragment's minimum charge is not granted",
        ),
    }
}

/// Answers one request. Runs on a blocking thread: it touches the disk.
/// `now`: wall-clock Unix seconds of the request (a cancel starts the grace period then).
fn answer(
    store: &FragmentStore,
    settings: &SupplierSettings,
    who: &Customer,
    body: Body,
    now: u64,
) -> Body {
    let customer = who.id;
    let result: Result<Body, FragmentError> = (|| match body {
        Body::ServiceRequest(req) => service_request(store, settings, who, req),
        Body::ServiceCancel(_) => {
            store.cancel(&customer, now)?;
            tracing::info!(customer = %customer, "customer left; data kept for the grace period");
            Ok(Body::Ack(Ack {
                size: 0,
                hash: vec![],
            }))
        }
        Body::StoreFragment(_) if !settings.disk.can_write() => {
            Ok(fail(FailReason::NoSpace, DISK_REFUSES))
        }
        Body::StoreFragment(req) => {
            let Some(key) = key_of(req.id.as_ref()) else {
                return Ok(malformed_id());
            };
            let expected: [u8; 32] = req
                .hash
                .as_slice()
                .try_into()
                .map_err(|_| FragmentError::HashMismatch)?;
            let info = if key.block == RECOVERY_BLOCK && key.position == RECOVERY_POSITION {
                match store_record(store, who, key, &req.data, &expected)? {
                    Ok(info) => info,
                    Err(refused) => return Ok(refused),
                }
            } else {
                store.put(&customer, key, &req.data, &expected)?
            };
            Ok(Body::Ack(Ack {
                size: info.size,
                hash: info.hash.to_vec(),
            }))
        }
        Body::RetrieveFragment(req) => {
            let Some(key) = key_of(req.id.as_ref()) else {
                return Ok(malformed_id());
            };
            let data = store.get(&customer, key)?;
            Ok(Body::FragmentData(FragmentData { id: req.id, data }))
        }
        Body::ListFragments(req) => {
            let after = key_of(req.after.as_ref());
            // No limit given: a full page.
            let limit = match req.limit as usize {
                0 => LIST_PAGE,
                n => n.min(LIST_PAGE),
            };
            let (items, more) = store.list(&customer, after, limit)?;
            let fragments = items
                .iter()
                .map(|i| WireInfo {
                    id: Some(wire_id(&i.key)),
                    size: i.size,
                    hash: i.hash.to_vec(),
                })
                .collect();
            Ok(Body::FragmentList(FragmentList { fragments, more }))
        }
        Body::AuditChallenge(req) => {
            let Some(key) = key_of(req.id.as_ref()) else {
                return Ok(malformed_id());
            };
            let Ok(nonce) = <[u8; 32]>::try_from(req.nonce.as_slice()) else {
                return Ok(fail(
                    FailReason::Malformed,
                    "the audit nonce is not 32 bytes",
                ));
            };
            // Order of checks (PROTOCOL.md 8): the id, the nonce, the contract, the fragment,
            // the range. An audit needs a live contract: a customer that never hired, left or
            // was dropped is told NO_SERVICE, never NOT_FOUND (which would read as lost data).
            if !has_contract(store, &customer)? {
                return Ok(fail(
                    FailReason::NoService,
                    "no contract with this customer",
                ));
            }
            // Only the range is read (L7): an audit costs a read of at most 1 MiB.
            match store.read_range(&customer, key, req.offset, req.length)? {
                Some(range) => Ok(Body::AuditProof(AuditProof {
                    id: req.id,
                    proof: range_proof(&nonce, &range).to_vec(),
                })),
                None => Ok(fail(
                    FailReason::Malformed,
                    "the audited range is empty, too long or outside the fragment",
                )),
            }
        }
        Body::SliceChallenge(req) => {
            let Some(key) = key_of(req.id.as_ref()) else {
                return Ok(malformed_id());
            };
            // Order of checks as for an audit: the id, the contract, the fragment, the range.
            if !has_contract(store, &customer)? {
                return Ok(fail(
                    FailReason::NoService,
                    "no contract with this customer",
                ));
            }
            // The whole fragment is read and hashed (its tree is not kept): at most one
            // fragment, like a retrieve, for a reply of a few KiB.
            let stored = store.get(&customer, key)?;
            match crate::data::audit::slice_of(&stored, req.offset, req.length) {
                Some(slice) => Ok(Body::FragmentSlice(FragmentSlice { id: req.id, slice })),
                None => Ok(fail(
                    FailReason::Malformed,
                    "the slice is empty, too long or outside the fragment",
                )),
            }
        }
        Body::DeleteFragment(req) => {
            let Some(key) = key_of(req.id.as_ref()) else {
                return Ok(malformed_id());
            };
            let freed = store.delete(&customer, key)?;
            Ok(Body::Ack(Ack {
                size: freed,
                hash: vec![],
            }))
        }
        other => Ok(fail(
            FailReason::Unexpected,
            format!(
                "{} is not a supplier request",
                crate::net::envelope::body_name(&other)
            ),
        )),
    })();
    result.unwrap_or_else(|e| {
        if matches!(
            e,
            FragmentError::Io { .. } | FragmentError::Db(_) | FragmentError::Corrupt
        ) {
            tracing::error!(customer = %customer, error = %e, "storage request failed");
        }
        fail(fail_reason(&e), fail_detail(&e))
    })
}

/// Starts the supplier side in `ctx` (made beforehand, so the router could be given its
/// address): it opens the fragment store and then serves.
pub async fn start(
    ctx: Context<Shell<SupplierServiceDriver>>,
    settings: SupplierSettings,
    kv: Arc<dyn KvStore>,
    registry: &Registry,
) -> Addr<Shell<SupplierServiceDriver>> {
    let addr = ctx.address();
    ctx.run(Shell::new(
        SupplierService::default(),
        "self",
        SupplierServiceDriver::new(settings, kv),
        registry.clone(),
    ));
    let _ = addr.send(Deliver(Event::Start)).await;
    addr
}

impl Driver for SupplierServiceDriver {
    type M = SupplierService;
    type Input = SupplierInput;
    type Query = SupplierQuery;
    type Answer = SupplierAnswer;

    fn perform(&mut self, output: Output, _machine: &SupplierService, io: &mut Io<'_, Self>) {
        match output {
            Output::OpenStore => {
                let root = self.settings.root.clone();
                let kv = self.kv.clone();
                let work = async move {
                    tokio::task::spawn_blocking(move || FragmentStore::open(root, kv)).await
                };
                io.spawn_then(work, |driver, result| match result {
                    Ok(Ok(store)) => {
                        let r = store.recovery_report();
                        tracing::info!(
                            temp_removed = r.temp_files_removed,
                            orphans_removed = r.orphan_files_removed,
                            entries_dropped = r.entries_dropped,
                            "fragment store open"
                        );
                        driver.store = Some(Arc::new(store));
                        Event::Opened
                    }
                    Ok(Err(e)) => Event::OpenFailed(e.to_string()),
                    Err(e) => Event::OpenFailed(e.to_string()),
                });
            }
            Output::Serve => {}
            Output::Purge => {
                if let Some(store) = self.store.clone() {
                    let grace = self.settings.grace;
                    let now = io.unix_secs();
                    io.spawn_task(async move {
                        let purged =
                            tokio::task::spawn_blocking(move || store.purge_expired(now, grace))
                                .await;
                        if let Ok(Ok(customers)) = purged
                            && !customers.is_empty()
                        {
                            tracing::info!(
                                count = customers.len(),
                                "purged departed customers past their grace period"
                            );
                        }
                    });
                }
            }
            Output::Failed(reason) => {
                tracing::error!(reason = %reason, "cannot open the fragment store; not serving");
            }
        }
    }

    fn input(
        &mut self,
        input: SupplierInput,
        _machine: &SupplierService,
        io: &mut Io<'_, Self>,
    ) -> Vec<Event> {
        match input {
            SupplierInput::Request(call) => {
                let Some(store) = self.store.clone() else {
                    // Not open yet: a passing failure the customer retries later (M6).
                    call.fail(FailReason::TryLater, "storage is not ready yet");
                    return vec![];
                };
                let Routed {
                    from: customer,
                    trusted,
                    signing_key,
                    envelope,
                    link,
                    permit,
                } = call;
                let id = envelope.request_id;
                let Some(body) = envelope.body else {
                    return vec![];
                };
                let settings = self.settings.clone();
                let now = io.unix_secs();
                let turn = self.turns.entry(customer).or_default().clone();
                io.spawn_task(async move {
                    // Taken now, in arrival order (tokio's mutex is fair), held until replied.
                    // A request whose link is gone while it waits is dropped with its body: a
                    // customer that reconnects does not leave its old requests queued
                    // (security review M2).
                    let _turn = tokio::select! {
                        turn = turn.lock() => turn,
                        () = link.closed() => return,
                    };
                    if link.is_closed() {
                        return;
                    }
                    let who = Customer {
                        id: customer,
                        trusted,
                        signing_key,
                    };
                    let reply = tokio::task::spawn_blocking(move || {
                        answer(&store, &settings, &who, body, now)
                    })
                    .await
                    .unwrap_or_else(|_| {
                        fail(FailReason::TryLater, "the request failed on the supplier")
                    });
                    // A reply that does not fit in the customer's byte budget (it has too
                    // much queued already, say fragments it does not read) is TRY_LATER.
                    let _ = link.reply_within(id, reply, permit).await;
                });
                vec![]
            }
            SupplierInput::Reconfigure {
                donated,
                open,
                grace,
            } => {
                self.settings.donated = donated;
                self.settings.open = open;
                self.settings.grace = grace;
                vec![]
            }
        }
    }

    fn query(
        &mut self,
        query: SupplierQuery,
        _machine: &SupplierService,
        io: &mut Io<'_, Self>,
    ) -> SupplierAnswer {
        match query {
            SupplierQuery::Drop { customer, link } => {
                let (reply, answer) = oneshot::channel();
                let Some(store) = self.store.clone() else {
                    let _ = reply.send(Err(DropError::NoStorage));
                    return SupplierAnswer::Dropping(answer);
                };
                let now = io.unix_secs();
                io.spawn_task(async move {
                    let cancelled = match tokio::task::spawn_blocking(move || store.drop_customer(&customer, now)).await {
                        Ok(result) => result.map_err(DropError::from),
                        Err(e) => Err(DropError::from(e)),
                    };
                    if cancelled.is_ok() {
                        tracing::info!(customer = %customer, "customer dropped; data kept for the grace period");
                        if let Some(link) = link {
                            let cancel = Body::ServiceCancel(crate::proto::ServiceCancel { from_supplier: true });
                            let _ = link.request(cancel, Duration::from_secs(30)).await;
                        }
                    }
                    let _ = reply.send(cancelled);
                });
                SupplierAnswer::Dropping(answer)
            }
            SupplierQuery::Status => {
                let customers = self
                    .store
                    .as_ref()
                    .and_then(|s| s.accounts().ok())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| AccountStatus {
                        node_id: a.customer.to_string(),
                        quota: a.quota,
                        used: a.used,
                        state: match a.state {
                            AccountState::Active => "active",
                            AccountState::Cancelled { .. } => "cancelled",
                        }
                        .to_string(),
                    })
                    .collect();
                SupplierAnswer::Status(SupplierStatus {
                    donated: self.settings.donated,
                    customers,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::supplier_service::MIN_CONTRACT;
    use crate::store::fragments::charge;

    /// The machine's smallest contract is one fragment's minimum charge in the store (the two
    /// layers cannot see each other's constants).
    #[test]
    fn the_smallest_contract_holds_one_fragment() {
        assert_eq!(MIN_CONTRACT, charge(1));
    }

    /// Security review L4: a customer is not told where this node keeps its files.
    #[test]
    fn a_storage_failure_names_no_local_path() {
        let e = FragmentError::Io {
            context: "writing /home/alice/.bitdust/store/ab/cd.0".into(),
            source: std::io::Error::other("disk on fire"),
        };
        assert!(e.to_string().contains("/home/alice"), "the log keeps it");
        let Body::Fail(said) = fail(fail_reason(&e), fail_detail(&e)) else {
            panic!("a Fail");
        };
        assert_eq!(said.reason, FailReason::TryLater as i32);
        assert!(!said.detail.contains('/'), "{}", said.detail);
    }

    use crate::proto::AuditChallenge;
    use crate::store::MemStore;

    struct Roomy;

    impl DiskGate for Roomy {
        fn can_write(&self) -> bool {
            true
        }
        fn grantable(&self, donated: u64, _held: u64) -> u64 {
            donated
        }
    }

    fn supplier() -> (tempfile::TempDir, FragmentStore, SupplierSettings) {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv: Arc<dyn KvStore> = Arc::new(MemStore::new());
        let store = FragmentStore::open(dir.path().join("store"), kv).expect("open");
        let settings = SupplierSettings {
            root: dir.path().join("store"),
            donated: 1 << 30,
            disk: Arc::new(Roomy),
            open: false,
            grace: Duration::from_secs(60),
        };
        (dir, store, settings)
    }

    /// A slice challenge: NO_SERVICE without a contract, NOT_FOUND for a fragment not held,
    /// MALFORMED past the end or over 64 KiB; else a slice that checks against the BLAKE3.
    #[test]
    fn a_slice_challenge_is_answered_with_a_slice_that_checks() {
        use crate::data::audit::{SLICE_LEN, slice_checks};
        let (_dir, store, settings) = supplier();
        let who = Customer {
            id: NodeId::from_signing_key(&[9; 32]),
            trusted: true,
            signing_key: None,
        };
        let ask = |body| answer(&store, &settings, &who, body, 0);
        let reason = |b: &Body| match b {
            Body::Fail(f) => Some(f.reason),
            _ => None,
        };
        let id = FragmentId {
            block: vec![7; 32],
            position: 0,
        };
        let slice = |offset: u64, length: u64| {
            ask(Body::SliceChallenge(crate::proto::SliceChallenge {
                id: Some(id.clone()),
                offset,
                length,
            }))
        };
        assert_eq!(
            reason(&slice(0, SLICE_LEN)),
            Some(FailReason::NoService as i32)
        );
        let granted = ask(Body::ServiceRequest(crate::proto::ServiceRequest {
            space: 1 << 24,
            position: 0,
            data_shards: 4,
            parity_shards: 2,
        }));
        assert!(matches!(granted, Body::ServiceAccept(_)), "{granted:?}");
        assert_eq!(
            reason(&slice(0, SLICE_LEN)),
            Some(FailReason::NotFound as i32)
        );
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let stored = ask(Body::StoreFragment(crate::proto::StoreFragment {
            id: Some(id.clone()),
            data: data.clone(),
            hash: blake3::hash(&data).as_bytes().to_vec(),
        }));
        assert!(matches!(stored, Body::Ack(_)), "{stored:?}");
        let hash = *blake3::hash(&data).as_bytes();
        match slice(150 * 1024, SLICE_LEN) {
            Body::FragmentSlice(s) => {
                assert!(slice_checks(
                    &s.slice,
                    &hash,
                    300_000,
                    150 * 1024,
                    SLICE_LEN
                ));
                assert!(s.slice.len() < 2048, "{}", s.slice.len());
            }
            other => panic!("{other:?}"),
        }
        for (offset, length) in [(300_000, 1), (0, 0), (0, (64 << 10) + 1)] {
            assert_eq!(
                reason(&slice(offset, length)),
                Some(FailReason::Malformed as i32),
                "{offset} {length}"
            );
        }
    }

    /// L7: an audit reads only its range: bytes outside it are never read (a change there does
    /// not touch the proof; reading the whole fragment checked its hash and refused).
    #[test]
    fn an_audit_reads_only_its_range() {
        let (_dir, store, settings) = supplier();
        let customer = NodeId::from_signing_key(&[9; 32]);
        let who = Customer {
            id: customer,
            trusted: true,
            signing_key: None,
        };
        let ask = |body| answer(&store, &settings, &who, body, 0);
        let granted = ask(Body::ServiceRequest(crate::proto::ServiceRequest {
            space: 1 << 24,
            position: 0,
            data_shards: 4,
            parity_shards: 2,
        }));
        assert!(matches!(granted, Body::ServiceAccept(_)), "{granted:?}");
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        let id = FragmentId {
            block: vec![7; 32],
            position: 0,
        };
        let stored = ask(Body::StoreFragment(crate::proto::StoreFragment {
            id: Some(id.clone()),
            data: data.clone(),
            hash: blake3::hash(&data).as_bytes().to_vec(),
        }));
        assert!(matches!(stored, Body::Ack(_)), "{stored:?}");
        // A byte far outside the audited range changes on disk.
        let path = settings
            .root
            .join(customer.to_string())
            .join("07")
            .join(format!("{}.0", "07".repeat(32)));
        let mut on_disk = std::fs::read(&path).expect("read");
        on_disk[3 << 19] ^= 1;
        std::fs::write(&path, &on_disk).expect("write");
        let nonce = [5u8; 32];
        let proof = ask(Body::AuditChallenge(AuditChallenge {
            id: Some(id.clone()),
            nonce: nonce.to_vec(),
            offset: 4096,
            length: 65536,
        }));
        let expected = audit_proof(&nonce, &data, 4096, 65536).expect("in range");
        assert!(
            matches!(&proof, Body::AuditProof(p) if p.proof == expected),
            "{proof:?}"
        );
        // A range past the end is malformed, as before.
        let outside = ask(Body::AuditChallenge(AuditChallenge {
            id: Some(id),
            nonce: nonce.to_vec(),
            offset: (3 << 20) - 10,
            length: 11,
        }));
        assert!(
            matches!(&outside, Body::Fail(f) if f.reason == FailReason::Malformed as i32),
            "{outside:?}"
        );
    }

    /// M6: a passing disk or database failure is "try later"; bytes that do not match what was
    /// stored are a storage error.
    #[test]
    fn passing_storage_trouble_is_try_later() {
        let io = FragmentError::Io {
            context: "reading".into(),
            source: std::io::Error::other("EIO"),
        };
        assert_eq!(fail_reason(&io), FailReason::TryLater);
        assert_eq!(
            fail_reason(&FragmentError::Corrupt),
            FailReason::StorageError
        );
    }
}
