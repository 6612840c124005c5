//! Recovery on a new machine. `bitdust recover` makes a home from the key file (same keys, same
//! identity), trusts one friend and leaves `recover.pending` naming it. At the next start, before
//! any actor runs (so nothing is hired meanwhile), the node fetches its recovery record from that
//! friend, checks the owner's signature and decrypts it, trusts the suppliers it names, fetches
//! the catalog's blocks from them (any `k` fragments each, checked against the owner-signed
//! manifests), imports the catalog and resumes the suppliers' contracts. `list` and `restore`
//! then work as on the old machine. Until that succeeds the marker stays, and the next start
//! tries again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::net::TcpStream;

use super::home::Home;
use crate::actors::backup_job::{RECOVERY_BLOCK, RECOVERY_POSITION};
use crate::actors::fragments::{Client, Fragments, Links};
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::{Identity, NodeId};
use crate::crypto::keys::NodeKeys;
use crate::data::{self, BlockManifest};
use crate::fsm::fetch::Plan;
use crate::net::link::{self, LinkHandle, LinkTasks, NewestKey, TrustPolicy};
use crate::store::catalog::{self, RecoveryRecord};
use crate::store::contracts::{self, Contract};
use crate::store::{KvStore, peers};

const TIMEOUT: Duration = Duration::from_secs(15);

/// Sessions to the peers recovery talks to, dialed here (no network actor runs yet): the
/// fragment client's links during recovery.
struct Dialer<'a> {
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
                    let (handle, tasks) = link::start(reader, writer, identity, 16, sink);
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
    let friend = book
        .iter()
        .map(|(identity, _)| identity)
        .find(|i| i.node_id() == friend_id)
        .cloned()
        .ok_or_else(|| anyhow!("the friend {friend_id} is not in the peer book"))?;
    tracing::info!(friend = %friend_id, "recovering: asking the friend for the recovery record");
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
    client.links().know(friend.clone());
    let sealed = client
        .retrieve(friend_id, RECOVERY_BLOCK, RECOVERY_POSITION)
        .await
        .map_err(|e| anyhow!("{friend_id}: {e}"))
        .context("fetching the recovery record")?;
    let owner = keys.signing_key().verifying_key();
    let record = catalog::open_recovery(&sealed, &data_keys.recovery, &owner)
        .context("opening the recovery record (is this the right key file?)")?;
    tracing::info!(
        revision = record.revision,
        suppliers = record.suppliers.len(),
        catalog_bytes = record.catalog_len,
        "recovery record opened"
    );

    // Trust the suppliers it names, from the identities the owner signed into it.
    let mut identities: HashMap<NodeId, Identity> = HashMap::new();
    identities.insert(friend_id, friend.clone());
    for bytes in &record.identities {
        match Identity::from_bytes(bytes) {
            Ok(identity) => {
                identities.insert(identity.node_id(), identity);
            }
            Err(e) => {
                tracing::warn!(error = %e, "a supplier identity in the record does not verify")
            }
        }
    }
    let now = crate::unix_now();
    for identity in identities.values() {
        if identity.node_id() != friend_id {
            kv.write(peers::save_batch(identity, None, now))
                .context("saving a supplier in the peer book")?;
        }
    }

    for identity in identities.values() {
        client.links().know(identity.clone());
    }
    let export = fetch_catalog(&record, &client, data_keys, &owner).await?;
    let entries = catalog::import(kv.as_ref(), &export).context("importing the catalog")?;
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
    // The next record this node stores must be newer than the one it recovered from.
    let mut batch = crate::store::Batch::new();
    crate::store::health::put_recovery_revision(&mut batch, record.revision);
    kv.write(batch).context("saving the recovery revision")?;
    kv.flush().context("flushing the recovered catalog")?;
    std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    tracing::info!(
        entries,
        revision = record.revision,
        "recovered the catalog; resuming the suppliers"
    );
    Ok(true)
}

/// The catalog export: each of its blocks from any `k` good fragments, asked one at a time in
/// the fetch plan's order (data positions first, another position for each one that fails).
async fn fetch_catalog(
    record: &RecoveryRecord,
    client: &impl Fragments,
    data_keys: &DataKeys,
    owner: &ed25519_dalek::VerifyingKey,
) -> anyhow::Result<Vec<u8>> {
    let mut export = Vec::with_capacity(record.catalog_len as usize);
    for block in &record.catalog {
        let manifest = BlockManifest::verify(&block.signed_manifest, owner)
            .context("a catalog block's manifest")?;
        let k = manifest.layout().k();
        let mut fragments: Vec<Option<Vec<u8>>> = vec![None; block.suppliers.len()];
        let holders: HashMap<u32, NodeId> = block
            .suppliers
            .iter()
            .enumerate()
            .filter_map(|(p, h)| h.map(|h| (p as u32, h)))
            .collect();
        // No clock and nothing known down before any session: the plan only orders and counts.
        let mut plan = Plan::new(k as u32, holders.keys().copied());
        let nobody_down = BTreeSet::new();
        loop {
            let batch = plan.next(&nobody_down, Duration::ZERO);
            if batch.is_empty() {
                break;
            }
            for position in batch {
                let Some(holder) = holders.get(&position).copied() else {
                    plan.failed(position);
                    continue;
                };
                let slot = position as usize;
                match client.retrieve(holder, block.id.0, position).await {
                    Ok(stored) => match data::stored::unwrap(&stored) {
                        Ok((_, fragment)) if manifest.check_fragment(slot, fragment).is_ok() => {
                            if let Some(f) = fragments.get_mut(slot) {
                                *f = Some(fragment.to_vec());
                                plan.ok(position);
                            } else {
                                plan.failed(position);
                            }
                        }
                        _ => {
                            plan.failed(position);
                            tracing::warn!(
                                position,
                                "a catalog fragment does not match its manifest"
                            )
                        }
                    },
                    Err(e) => {
                        plan.failed(position);
                        tracing::warn!(position, supplier = %holder, error = %e,
                            "a catalog fragment could not be fetched")
                    }
                }
            }
        }
        let good = plan.good_count();
        if good < k {
            bail!("only {good} of the {k} fragments needed for a catalog block could be fetched");
        }
        let refs: Vec<Option<&[u8]>> = fragments.iter().map(|f| f.as_deref()).collect();
        let decoded = data::decode_block(&refs, &manifest, &data_keys.catalog)
            .context("decoding a catalog block")?;
        export.extend_from_slice(&decoded.plain);
    }
    export.truncate(record.catalog_len as usize);
    Ok(export)
}
