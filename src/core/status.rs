//! What the node reports about itself: per-peer lag, counts of documents and shares.

use super::*;
use hearth_crdt::DocId;

impl Core {
    pub(crate) fn sync_report(&mut self) -> SyncReport {
        let now = now_ms();
        let held: Vec<DocId> = self.keyring.ids().map(|(d, _)| d).collect();
        let mut peers: Vec<PeerLag> = self
            .peers
            .admitted
            .keys()
            .map(|peer| PeerLag {
                peer: peer.clone(),
                last_heard_ms: self.peers.heard_ago(peer, now),
                docs_behind: held
                    .iter()
                    .filter(|d| !self.engine.is_in_sync(peer, **d))
                    .count() as u64,
            })
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        let (shared_out, shared_in) = self.shared_counts();
        SyncReport {
            peers,
            documents: self.engine.documents().count() as u64,
            entities_shared_out: shared_out,
            entities_shared_in: shared_in,
            engine: self.engine.stats(),
            frames_oversized: self.counters.frames_oversized,
        }
    }

    /// Entities shared out (this home's registry entries with a grant to another home)
    /// and in (entity documents held here that another home owns).
    pub(crate) fn shared_counts(&self) -> (u64, u64) {
        let out = self
            .engine
            .registry(self.home.registry_doc)
            .map(|r| {
                r.entities
                    .values()
                    .filter(|e| e.deleted_at.is_none() && !e.shares.is_empty())
                    .count() as u64
            })
            .unwrap_or(0);
        let shared_in = self
            .engine
            .documents()
            .filter(|d| {
                self.engine.header(*d).is_ok_and(|h| {
                    h.kind == hearth_crdt::DocKind::Entity && h.owner_home != self.home.home_id
                })
            })
            .count() as u64;
        (out, shared_in)
    }
}
