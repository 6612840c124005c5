//! Recovery on a new machine. `bitdust recover` makes a home from the key file (same keys, same
//! identity), trusts one friend and leaves `recover.pending` naming it. At the next start, before
//! any actor runs (so nothing is hired meanwhile), the node asks that friend, every other friend
//! in its book and every supplier any valid record names for its recovery record, and takes the
//! newest (`fsm::recovery::Search`: highest revision that verifies and opens, repeated until no
//! new peer is named), so one stale copy cannot roll it back. It gives that record to every peer
//! that was behind, trusts the suppliers it names, fetches the catalog's blocks from them (any
//! `k` fragments each, checked against the owner-signed manifests), imports the catalog, resumes
//! the suppliers' contracts and raises (never lowers) its own revision to the record's. `list`
//! and `restore` then work as on the old machine. Until that succeeds the marker stays, and the
//! next start tries again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::net::TcpStream;

use super::home::Home;
use crate::actors::backup_job::{RECOVERY_BLOCK, RECOVERY_POSITION};
use crate::actors::catalog_upload::fetch_catalog;
use crate::actors::fragments::{Client, Fragments, Links};
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::{Identity, NodeId};
use crate::crypto::keys::NodeKeys;
use crate::fsm::catalog_commit::raise_revision;
use crate::fsm::recovery::{Answer, Search};
use crate::net::budget::PeerBudget;
use crate::net::link::{self, LinkHandle, LinkTasks, NewestKey, TrustPolicy};
use crate::store::catalog::{self, RecoveryRecord};
use crate::store::contracts::{self, Contract};
use crate::store::{KvStore, peers};

const TIMEOUT: Duration = Duration::from_secs(15);

/// Sessions to the peers recovery talks to, dialed here (no network actor runs yet): the
/// fragment client's links during recovery.
pub struct Dialer<'a> {
    keys: &'a NodeKeys,
    mine: &'a Identity,
    max_message: usize,
    /// Peers recovery may dial: the friend, then the suppliers the record names.
    known: Mutex<HashMap<NodeId, Identity>>,
    open: Mutex<HashMap<NodeId, (LinkHandle, LinkTasks)>>,
}

impl Dialer<'_> {
    fn know(&self, identity: Identity) {
        if let Ok(mut known) = self.known.lock() {
            known.insert(identity.node_id(), identity);
        }
    }

    /// A session with `peer`, dialing its contact addresses in turn.
    async fn dial(&self, peer: &Identity) -> anyhow::Result<LinkHandle> {
        let id = peer.node_id();
        let mut trusted = HashMap::new();
        trusted.insert(id, NewestKey::of(peer));
        let policy = TrustPolicy {
            trusted,
            open: false,
        };
        let mut last = anyhow!("{id} has no contact address");
        for contact in peer.contacts() {
            let addr = contact.strip_prefix("tcp://").unwrap_or(contact);
            let stream = match tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    last = anyhow!("cannot reach {id} at {addr}: {e}");
                    continue;
                }
                Err(_) => {
                    last = anyhow!("cannot reach {id} at {addr}: timed out");
                    continue;
                }
            };
            let secret = self.keys.noise_secret_bytes();
            match link::establish(
                stream,
                true,
                &secret,
                self.mine,
                Some(id),
                &policy,
                TIMEOUT,
                self.max_message,
            )
            .await
            {
                Ok((session, identity)) => {
                    let (reader, writer) = session.split();
                    let sink: link::LinkSink = Arc::new(|_| {});
                    // Only replies come back here: a budget of two messages never holds them up.
                    let budget =
                        PeerBudget::new(self.max_message.saturating_mul(2), self.max_message);
                    let (handle, tasks) = link::start(
                        reader,
                        writer,
                        identity,
                        16,
                        budget,
                        sink,
                        crate::net::paced::ControlWrites::default(),
                    );
                    if let Ok(mut open) = self.open.lock() {
                        open.insert(id, (handle.clone(), tasks));
                    }
                    return Ok(handle);
                }
                Err(e) => last = anyhow!("no session with {id} at {addr}: {e:?}"),
            }
        }
        Err(last)
    }
}

impl Links for Dialer<'_> {
    async fn link(&self, supplier: NodeId) -> Option<LinkHandle> {
        let open = self
            .open
            .lock()
            .ok()
            .and_then(|open| open.get(&supplier).map(|(handle, _)| handle.clone()));
        if let Some(handle) = open
            && !handle.is_closed()
        {
            return Some(handle);
        }
        let peer = self.known.lock().ok()?.get(&supplier).cloned()?;
        match self.dial(&peer).await {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!(peer = %supplier, error = %e, "recovery: no session");
                None
            }
        }
    }
}

/// The newest recovery record found, and the peers to give it to.
pub struct Newest {
    pub record: RecoveryRecord,
    /// The record as stored (signed and sealed by the owner).
    pub sealed: Vec<u8>,
    pub from: NodeId,
    /// Peers that answered with an older record or none.
    pub behind: Vec<NodeId>,
    pub asked: usize,
    pub found: usize,
}

/// The peers a record names: its suppliers and every holder of a catalog fragment.
fn named(record: &RecoveryRecord) -> BTreeSet<NodeId> {
    let mut peers: BTreeSet<NodeId> = record.suppliers.iter().map(|(_, s)| *s).collect();
    for block in &record.catalog {
        peers.extend(block.suppliers.iter().flatten().copied());
    }
    peers
}

/// Asks every peer in `start`, then every peer a valid record names, for the recovery record,
/// until nobody new is named (`fsm::recovery::Search`); the highest revision that verifies under
/// the owner's key and opens wins.
pub async fn search_newest(
    client: &Client<Dialer<'_>>,
    start: impl IntoIterator<Item = NodeId>,
    data_keys: &DataKeys,
    owner: &ed25519_dalek::VerifyingKey,
) -> anyhow::Result<Newest> {
    let mut search = Search::new(start);
    let mut newest: Option<(RecoveryRecord, Vec<u8>)> = None;
    while !search.stable() {
        for peer in search.to_ask() {
            let answer = match client
                .retrieve(peer, RECOVERY_BLOCK, RECOVERY_POSITION)
                .await
            {
                Ok(sealed) => match catalog::open_recovery(&sealed, &data_keys.recovery, owner) {
                    Ok(record) => Some((record, sealed)),
                    Err(e) => {
                        tracing::warn!(peer = %peer, error = %e, "recovery: a record that does not open");
                        None
                    }
                },
                Err(e) => {
                    tracing::info!(peer = %peer, error = %e, "recovery: no record from this peer");
                    None
                }
            };
            let Some((record, sealed)) = answer else {
                search.answered(peer, Answer::Nothing);
                continue;
            };
            tracing::info!(peer = %peer, revision = record.revision, created_at = record.created_at,
                "recovery: a record found");
            // Its suppliers become reachable (their identities are in it) and are asked too.
            for bytes in &record.identities {
                if let Ok(identity) = Identity::from_bytes(bytes) {
                    client.links().know(identity);
                }
            }
            search.named(named(&record));
            if search.answered(peer, Answer::Record(record.revision)) {
                newest = Some((record, sealed));
            }
        }
    }
    let (Some((from, _)), Some((record, sealed))) = (search.best(), newest) else {
        bail!("no peer asked holds a recovery record that opens with this key file");
    };
    Ok(Newest {
        record,
        sealed,
        from,
        behind: search.behind(),
        asked: search.asked_count(),
        found: search.records_found(),
    })
}

/// Gives the newest record to every peer that holds an older one or none: no supplier is left
/// with a record that would lead a later recovery back in time. A peer that does not serve this
/// node (no contract) refuses; that is fine.
async fn hand_out(client: &Client<Dialer<'_>>, newest: &Newest) {
    for peer in &newest.behind {
        match client
            .store(
                *peer,
                RECOVERY_BLOCK,
                RECOVERY_POSITION,
                newest.sealed.clone(),
            )
            .await
        {
            Ok(()) => tracing::info!(peer = %peer, revision = newest.record.revision,
                "recovery: gave the newest record to a peer that was behind"),
            Err(e) => tracing::info!(peer = %peer, error = %e,
                "recovery: a peer behind did not take the newest record"),
        }
    }
}

/// What `bitdust recover` shows right after making the home: the newest record the friend and
/// the suppliers its records name hold (the same search the first run repeats before it
/// imports anything). Nothing is written.
pub fn preview(home: &Home) -> anyhow::Result<Newest> {
    let _lock = home.lock()?;
    let keys = home.load_keys()?;
    let mine = home.load_identity(&keys)?;
    // A recovered home holds the master secret from the key file: never make a new one.
    let data_keys = home.load_master(true)?.data_keys();
    let config = super::config::Config::load(home.root())?;
    let max_message = super::settings::max_message(&config);
    let book = {
        let kv = crate::store::RocksStore::open(&home.db_dir())
            .with_context(|| format!("opening {}", home.db_dir().display()))?;
        peers::load(&kv).context("reading the peer book")?
    };
    let owner = keys.signing_key().verifying_key();
    actix::System::new().block_on(async {
        let client = Client::new(
            Dialer {
                keys: &keys,
                mine: &mine,
                max_message,
                known: Mutex::new(HashMap::new()),
                open: Mutex::new(HashMap::new()),
            },
            TIMEOUT,
        );
        for (identity, _) in &book {
            client.links().know(identity.clone());
        }
        let start = book.iter().map(|(i, _)| i.node_id());
        search_newest(&client, start, &data_keys, &owner).await
    })
}

/// Runs a pending recovery, if there is one. `Ok(true)`: recovered now.
pub async fn run_pending(
    home: &Home,
    keys: &NodeKeys,
    mine: &Identity,
    kv: Arc<dyn KvStore>,
    data_keys: &DataKeys,
    max_message: usize,
) -> anyhow::Result<bool> {
    let marker = home.path(super::home::RECOVER_PENDING_FILE);
    let Ok(text) = std::fs::read_to_string(&marker) else {
        return Ok(false);
    };
    let friend_id: NodeId = text
        .trim()
        .parse()
        .with_context(|| format!("{} does not name a node", marker.display()))?;
    let book = peers::load(kv.as_ref()).context("reading the peer book")?;
    if !book.iter().any(|(i, _)| i.node_id() == friend_id) {
        bail!("the friend {friend_id} is not in the peer book");
    }
    tracing::info!(friend = %friend_id, friends = book.len(),
        "recovering: asking every friend and every supplier named for the recovery record");
    let client = Client::new(
        Dialer {
            keys,
            mine,
            max_message,
            known: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
        },
        TIMEOUT,
    );
    for (identity, _) in &book {
        client.links().know(identity.clone());
    }
    let owner = keys.signing_key().verifying_key();
    // The friend first, then the rest of the book.
    let start = std::iter::once(friend_id).chain(book.iter().map(|(i, _)| i.node_id()));
    let newest = search_newest(&client, start, data_keys, &owner)
        .await
        .context("fetching the recovery record (is this the right key file?)")?;
    let record = &newest.record;
    tracing::info!(
        revision = record.revision,
        created_at = record.created_at,
        from = %newest.from,
        asked = newest.asked,
        records = newest.found,
        suppliers = record.suppliers.len(),
        catalog_bytes = record.catalog_len,
        "recovery record chosen: the newest found"
    );
    hand_out(&client, &newest).await;

    // Trust the suppliers it names, from the identities the owner signed into it.
    let in_book: BTreeSet<NodeId> = book.iter().map(|(i, _)| i.node_id()).collect();
    let now = crate::unix_now();
    for bytes in &record.identities {
        match Identity::from_bytes(bytes) {
            Ok(identity) if !in_book.contains(&identity.node_id()) => {
                kv.write(peers::save_batch(&identity, None, now))
                    .context("saving a supplier in the peer book")?;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "a supplier identity in the record does not verify")
            }
        }
    }

    let spill = home.outbox_dir();
    std::fs::create_dir_all(&spill).with_context(|| format!("making {}", spill.display()))?;
    let fetched = fetch_catalog(record, &client, data_keys, &owner, &spill)
        .await
        .context("fetching the catalog")?;
    let entries = fetched
        .import(kv.as_ref())
        .context("importing the catalog")?;
    let total = record.data_shards + record.parity_shards;
    let mut slots: Vec<Option<Contract>> = vec![None; total as usize];
    for (position, supplier) in &record.suppliers {
        if let Some(slot) = slots.get_mut(*position as usize) {
            *slot = Some(Contract {
                supplier: *supplier,
                confirmed: true,
            });
        }
    }
    kv.write(contracts::save_batch(slots))
        .context("saving the suppliers' positions")?;
    // The next record this node stores must be newer than the one it recovered from; a
    // revision this home already holds is never lowered.
    let stored = crate::store::health::recovery_revision(kv.as_ref())
        .context("reading the recovery revision")?;
    if let Some(revision) = raise_revision(stored, record.revision) {
        let mut batch = crate::store::Batch::new();
        crate::store::health::put_recovery_revision(&mut batch, revision);
        kv.write(batch).context("saving the recovery revision")?;
    }
    kv.flush().context("flushing the recovered catalog")?;
    std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    tracing::info!(
        entries,
        revision = record.revision,
        created_at = record.created_at,
        "recovered the catalog; resuming the suppliers"
    );
    Ok(true)
}
