//! Recovery on a new machine. `bitdust recover` makes a home from the key file (same keys, same
//! identity), trusts one friend and leaves `recover.pending` naming it. At the next start, before
//! any actor runs (so nothing is hired meanwhile), the node fetches its recovery record from that
//! friend, checks the owner's signature and decrypts it, trusts the suppliers it names, fetches
//! the catalog's blocks from them (any `k` fragments each, checked against the owner-signed
//! manifests), imports the catalog and resumes the suppliers' contracts. `list` and `restore`
//! then work as on the old machine. Until that succeeds the marker stays, and the next start
//! tries again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::net::TcpStream;

use super::home::Home;
use crate::actors::backup_job::{RECOVERY_BLOCK, RECOVERY_POSITION};
use crate::actors::restore_worker::retrieve;
use crate::crypto::derive::DataKeys;
use crate::crypto::identity::{Identity, NodeId};
use crate::crypto::keys::NodeKeys;
use crate::data::{self, BlockManifest};
use crate::net::link::{self, LinkHandle, LinkTasks, NewestKey, TrustPolicy};
use crate::store::catalog::{self, RecoveryRecord};
use crate::store::contracts::{self, Contract};
use crate::store::{KvStore, peers};

const TIMEOUT: Duration = Duration::from_secs(15);

/// Open sessions to the peers recovery talks to.
struct Links<'a> {
    keys: &'a NodeKeys,
    mine: &'a Identity,
    max_message: usize,
    open: HashMap<NodeId, (LinkHandle, LinkTasks)>,
}

impl Links<'_> {
    /// A session with `peer`, dialing its contact addresses in turn.
    async fn get(&mut self, peer: &Identity) -> anyhow::Result<LinkHandle> {
        let id = peer.node_id();
        if let Some((handle, _)) = self.open.get(&id)
            && !handle.is_closed()
        {
            return Ok(handle.clone());
        }
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
                    self.open.insert(id, (handle.clone(), tasks));
                    return Ok(handle);
                }
                Err(e) => last = anyhow!("no session with {id} at {addr}: {e:?}"),
            }
        }
        Err(last)
    }

    async fn fetch(
        &mut self,
        peer: &Identity,
        block: [u8; 32],
        position: u32,
    ) -> anyhow::Result<Vec<u8>> {
        let link = self.get(peer).await?;
        retrieve(&link, block, position, TIMEOUT)
            .await
            .map_err(|e| anyhow!("{}: {e}", peer.node_id()))
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
    let mut links = Links {
        keys,
        mine,
        max_message,
        open: HashMap::new(),
    };
    let sealed = links
        .fetch(&friend, RECOVERY_BLOCK, RECOVERY_POSITION)
        .await
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

    let export = fetch_catalog(&record, &identities, &mut links, data_keys, &owner).await?;
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

/// The catalog export: each of its blocks from any `k` good fragments.
async fn fetch_catalog(
    record: &RecoveryRecord,
    identities: &HashMap<NodeId, Identity>,
    links: &mut Links<'_>,
    data_keys: &DataKeys,
    owner: &ed25519_dalek::VerifyingKey,
) -> anyhow::Result<Vec<u8>> {
    let mut export = Vec::with_capacity(record.catalog_len as usize);
    for block in &record.catalog {
        let manifest = BlockManifest::verify(&block.signed_manifest, owner)
            .context("a catalog block's manifest")?;
        let k = manifest.layout().k();
        let mut fragments: Vec<Option<Vec<u8>>> = vec![None; block.suppliers.len()];
        let mut good = 0;
        for (position, holder) in block.suppliers.iter().enumerate() {
            if good == k {
                break;
            }
            let Some(identity) = holder.and_then(|h| identities.get(&h)) else {
                continue;
            };
            match links.fetch(identity, block.id.0, position as u32).await {
                Ok(stored) => match data::stored::unwrap(&stored) {
                    Ok((_, fragment)) if manifest.check_fragment(position, fragment).is_ok() => {
                        fragments[position] = Some(fragment.to_vec());
                        good += 1;
                    }
                    _ => tracing::warn!(position, "a catalog fragment does not match its manifest"),
                },
                Err(e) => {
                    tracing::warn!(position, error = %e, "a catalog fragment could not be fetched")
                }
            }
        }
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
