//! Saved sync states go when what they describe goes: a deleted entity's document, a
//! forgotten home's devices, a revoked device. They are keyed `peer ‖ doc`, so without
//! this they would stay on disk for ever, one per peer and document.

use hearth_crdt::DocId;
use hearth_storage::{Batch, Keyspace, Scan, StoreHandle};

use crate::core::Core;

/// Deletes per batch, so one large clean-up is not one huge write.
const DELETE_BATCH: usize = 1024;

impl Core {
    /// A deleted entity's document: its sessions with connected peers close (the
    /// tombstone travels in the registry, not in this document), and the returned batch
    /// deletes its saved sync state with every device this node knows, of this home and
    /// of paired homes, so it goes in the same write as the deletion.
    pub(crate) fn drop_sync_states_of_doc(&mut self, doc: DocId) -> Batch {
        let connected: Vec<String> = self
            .peers
            .admitted
            .keys()
            .chain(self.sharing.foreign.keys())
            .cloned()
            .collect();
        for peer in &connected {
            let _ = self.engine.detach(peer, doc);
        }
        let mut known: std::collections::BTreeSet<String> = connected.into_iter().collect();
        if let Ok(devices) = self.engine.home_devices(self.home.home_doc) {
            known.extend(devices.into_keys());
        }
        if let Ok(paired) = self.engine.home_paired(self.home.home_doc) {
            known.extend(paired.into_values().flat_map(|h| h.devices.into_keys()));
        }
        let mut batch = Batch::new();
        for peer in known {
            batch.delete(
                Keyspace::SyncStates,
                crate::records::sync_state_key(&peer, doc),
            );
        }
        batch
    }

    /// Deletes every saved sync state with each of `peers` (base58 PeerIds).
    pub(crate) fn drop_sync_states_of_peers(&self, peers: Vec<String>) {
        let store = self.store.clone();
        tokio::spawn(async move {
            for peer in peers {
                let prefix = crate::records::sync_state_prefix(&peer);
                if let Err(error) = delete_matching(&store, prefix, |_| true).await {
                    tracing::warn!(%peer, %error, "could not delete a gone peer's sync states");
                }
            }
        });
    }
}

/// Deletes the SyncStates keys under `prefix` that `doomed` picks.
pub(crate) async fn delete_matching(
    store: &StoreHandle,
    prefix: Vec<u8>,
    doomed: impl Fn(&[u8]) -> bool,
) -> Result<usize, hearth_storage::Error> {
    let mut keys = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut scan = Scan::prefix(prefix.clone()).limit(hearth_storage::MAX_SCAN_LIMIT);
        if let Some(key) = after.take() {
            scan = scan.after(key);
        }
        let page = store.scan(Keyspace::SyncStates, scan).await?;
        let full = page.len() >= hearth_storage::MAX_SCAN_LIMIT;
        after = page.last().map(|(k, _)| k.clone());
        keys.extend(page.into_iter().map(|(k, _)| k).filter(|k| doomed(k)));
        if !full {
            break;
        }
    }
    for chunk in keys.chunks(DELETE_BATCH) {
        let mut batch = Batch::new();
        for key in chunk {
            batch.delete(Keyspace::SyncStates, key.clone());
        }
        store.batch(batch).await?;
    }
    Ok(keys.len())
}
