//! Pacing of catch-up: sync sessions that open in bulk (after a digest exchange, when a
//! device learns many document keys at once, or when every document is attached) open at
//! most [`MAX_OPENING_PER_PEER`] at a time per peer. Each opening message draws a reply
//! that may carry a whole document; opening thousands at once filled the peer's outbound
//! queue, which drops the peer as too slow, and the catch-up after the reconnect did the
//! same again. Live pushes are not paced.

use std::collections::{HashMap, VecDeque};

use hearth_crdt::{DocId, KeyEpoch};

use crate::core::{Core, now_ms};

/// Sync sessions a peer may have opening (not yet in sync) at once.
pub(crate) const MAX_OPENING_PER_PEER: usize = 64;
/// After this long an opening session no longer holds its slot, whether or not it
/// finished: a peer that stays silent must not stall the rest.
const OPENING_SLOT_MS: u64 = 5_000;

#[derive(Default)]
pub(crate) struct Pacing {
    /// Sessions waiting to open, per peer, in order.
    waiting: HashMap<String, VecDeque<(DocId, KeyEpoch)>>,
    /// Sessions opened and not yet seen in sync, per peer, with when they opened.
    opening: HashMap<String, HashMap<DocId, u64>>,
}

impl Pacing {
    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty()
    }

    pub(crate) fn forget_peer(&mut self, peer: &str) {
        self.waiting.remove(peer);
        self.opening.remove(peer);
    }
}

impl Core {
    /// Queues a session to open with `peer`; [`Core::drain_attaches`] opens it.
    pub(crate) fn queue_attach(&mut self, peer: &str, doc: DocId, epoch: KeyEpoch) {
        self.peers
            .pacing
            .waiting
            .entry(peer.to_string())
            .or_default()
            .push_back((doc, epoch));
    }

    /// Opens waiting sessions while each peer has free opening slots.
    pub(crate) async fn drain_attaches(&mut self) {
        if self.peers.pacing.is_idle() {
            return;
        }
        let now = now_ms();
        let peers: Vec<String> = self.peers.pacing.waiting.keys().cloned().collect();
        for peer in peers {
            if !self.peers.admitted.contains_key(&peer) && !self.sharing.foreign.contains_key(&peer)
            {
                self.peers.pacing.forget_peer(&peer);
                continue;
            }
            let mut opening = self.peers.pacing.opening.remove(&peer).unwrap_or_default();
            opening.retain(|doc, since| {
                now.saturating_sub(*since) < OPENING_SLOT_MS && !self.engine.is_in_sync(&peer, *doc)
            });
            while opening.len() < MAX_OPENING_PER_PEER {
                let Some((doc, epoch)) = self
                    .peers
                    .pacing
                    .waiting
                    .get_mut(&peer)
                    .and_then(VecDeque::pop_front)
                else {
                    break;
                };
                self.attach(&peer, doc, epoch).await;
                opening.insert(doc, now);
            }
            if self
                .peers
                .pacing
                .waiting
                .get(&peer)
                .is_some_and(VecDeque::is_empty)
            {
                self.peers.pacing.waiting.remove(&peer);
            }
            self.peers.pacing.opening.insert(peer, opening);
        }
        self.send_pending().await;
    }
}
