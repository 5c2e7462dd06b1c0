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

/// Which sessions open next: a plain state machine. [`Pacing::queue`] takes sessions to
/// open; [`Pacing::next`] says which to open now, given who is still connected and which
/// sessions are in sync; the core opens them.
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

    /// Queues a session to open with `peer`.
    pub(crate) fn queue(&mut self, peer: &str, doc: DocId, epoch: KeyEpoch) {
        self.waiting
            .entry(peer.to_string())
            .or_default()
            .push_back((doc, epoch));
    }

    /// The sessions to open now, in order, at most [`MAX_OPENING_PER_PEER`] opening per
    /// peer. A slot frees when its session is in sync or after [`OPENING_SLOT_MS`]; a peer
    /// that is no longer `connected` is forgotten with everything it had waiting.
    pub(crate) fn next(
        &mut self,
        now: u64,
        connected: impl Fn(&str) -> bool,
        in_sync: impl Fn(&str, DocId) -> bool,
    ) -> Vec<(String, DocId, KeyEpoch)> {
        let mut open = Vec::new();
        let peers: Vec<String> = self.waiting.keys().cloned().collect();
        for peer in peers {
            if !connected(&peer) {
                self.forget_peer(&peer);
                continue;
            }
            let mut opening = self.opening.remove(&peer).unwrap_or_default();
            opening.retain(|doc, since| {
                now.saturating_sub(*since) < OPENING_SLOT_MS && !in_sync(&peer, *doc)
            });
            let waiting = self.waiting.entry(peer.clone()).or_default();
            while opening.len() < MAX_OPENING_PER_PEER {
                let Some((doc, epoch)) = waiting.pop_front() else {
                    break;
                };
                opening.insert(doc, now);
                open.push((peer.clone(), doc, epoch));
            }
            if waiting.is_empty() {
                self.waiting.remove(&peer);
            }
            self.opening.insert(peer, opening);
        }
        open
    }
}

impl Core {
    /// Queues a session to open with `peer`; [`Core::drain_attaches`] opens it.
    pub(crate) fn queue_attach(&mut self, peer: &str, doc: DocId, epoch: KeyEpoch) {
        self.peers.pacing.queue(peer, doc, epoch);
    }

    /// Opens waiting sessions while each peer has free opening slots.
    pub(crate) async fn drain_attaches(&mut self) {
        if self.peers.pacing.is_idle() {
            return;
        }
        let admitted = &self.peers.admitted;
        let foreign = &self.sharing.foreign;
        let engine = &self.engine;
        let open = self.peers.pacing.next(
            now_ms(),
            |peer| admitted.contains_key(peer) || foreign.contains_key(peer),
            |peer, doc| engine.is_in_sync(&peer.to_string(), doc),
        );
        let docs: Vec<DocId> = open.iter().map(|(_, doc, _)| *doc).collect();
        self.ensure_loaded_many(&docs).await;
        for (peer, doc, epoch) in open {
            self.attach(&peer, doc, epoch).await;
        }
        self.send_pending().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: u8) -> DocId {
        DocId::from_bytes([n; 16])
    }

    fn epoch() -> KeyEpoch {
        KeyEpoch::first([1; 16])
    }

    #[test]
    fn at_most_the_cap_opens_per_peer_and_the_rest_wait_in_order() {
        let mut pacing = Pacing::default();
        for n in 0..100 {
            pacing.queue("a", doc(n), epoch());
        }
        pacing.queue("b", doc(200), epoch());
        let open = pacing.next(0, |_| true, |_, _| false);
        let to_a: Vec<DocId> = open
            .iter()
            .filter(|(p, _, _)| p == "a")
            .map(|(_, d, _)| *d)
            .collect();
        assert_eq!(to_a.len(), MAX_OPENING_PER_PEER);
        assert_eq!(to_a[0], doc(0));
        assert_eq!(to_a[MAX_OPENING_PER_PEER - 1], doc(63));
        assert!(open.iter().any(|(p, d, _)| p == "b" && *d == doc(200)));
        // Nothing in sync, no time passed: no slot frees.
        assert!(pacing.next(1, |_| true, |_, _| false).is_empty());
        assert!(!pacing.is_idle());
    }

    #[test]
    fn a_slot_frees_when_its_session_is_in_sync_or_after_its_time() {
        let mut pacing = Pacing::default();
        for n in 0..(MAX_OPENING_PER_PEER as u8 + 2) {
            pacing.queue("a", doc(n), epoch());
        }
        assert_eq!(
            pacing.next(0, |_| true, |_, _| false).len(),
            MAX_OPENING_PER_PEER
        );
        // One session reached sync: exactly one more opens.
        let open = pacing.next(10, |_| true, |_, d| d == doc(0));
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].1, doc(MAX_OPENING_PER_PEER as u8));
        // A silent peer does not stall the rest: slots free after their time.
        let open = pacing.next(OPENING_SLOT_MS + 10, |_| true, |_, _| false);
        assert_eq!(open.len(), 1);
        assert!(pacing.is_idle());
    }

    #[test]
    fn a_peer_that_left_is_forgotten_with_its_queue() {
        let mut pacing = Pacing::default();
        pacing.queue("gone", doc(1), epoch());
        pacing.queue("here", doc(2), epoch());
        let open = pacing.next(0, |p| p == "here", |_, _| false);
        assert_eq!(open, vec![("here".to_string(), doc(2), epoch())]);
        assert!(pacing.is_idle());
        // It comes back: nothing of its old queue opens.
        assert!(pacing.next(1, |_| true, |_, _| false).is_empty());
    }
}
