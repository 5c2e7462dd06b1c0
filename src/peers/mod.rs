//! Devices of this home on the network: admission by certificate, sealing and routing
//! frames (`admission`), liveness (`heartbeat`), paced session openings (`pacing`), and
//! saved sync states (`sync_states`).

pub(crate) mod admission;
pub(crate) mod heartbeat;
pub(crate) mod pacing;
pub(crate) mod sync_states;

use std::collections::{HashMap, HashSet};

use hearth_crdt::DocId;

/// This home's devices on the network: who is admitted, and what is known of each.
#[derive(Default)]
pub(crate) struct PeerState {
    /// Admitted devices, by PeerId text.
    pub(crate) admitted: HashMap<String, hearth_net::PeerId>,
    /// Digest sessions in progress, by peer.
    pub(crate) reconcilers: HashMap<String, hearth_crdt::digest::Reconciler>,
    /// Documents whose heads moved here while a digest session with the peer ran: the
    /// exchange may have compared them before they moved, so they never count as in sync
    /// when it ends (see `admission::attach_after_digest`).
    pub(crate) moved_while_reconciling: HashMap<String, HashSet<DocId>>,
    /// Until when each admitted device counts as live (ms since the epoch), from its
    /// heartbeats; see `heartbeat`.
    pub(crate) alive_until: HashMap<String, u64>,
    /// When a frame last came from each admitted peer (ms since the epoch).
    pub(crate) last_heard: HashMap<String, u64>,
    /// Bulk session openings, paced per peer.
    pub(crate) pacing: pacing::Pacing,
    /// The home's admin device, once admitted with its certificate (it arbitrates locks).
    pub(crate) admin: Option<String>,
}

impl PeerState {
    /// `peer` left: everything known of it goes, but the sync states the engine keeps.
    /// Answers whether it was admitted.
    pub(crate) fn forget(&mut self, peer: &str) -> bool {
        self.pacing.forget_peer(peer);
        self.end_reconciling(peer);
        self.last_heard.remove(peer);
        self.alive_until.remove(peer);
        self.admitted.remove(peer).is_some()
    }

    /// A digest session with `peer` begins: nothing has moved during it yet.
    pub(crate) fn reconciling(&mut self, peer: &str, reconciler: hearth_crdt::digest::Reconciler) {
        self.reconcilers.insert(peer.to_string(), reconciler);
        self.moved_while_reconciling
            .insert(peer.to_string(), HashSet::new());
    }

    /// The digest session with `peer` ended, finished or failed.
    pub(crate) fn end_reconciling(&mut self, peer: &str) {
        self.reconcilers.remove(peer);
        self.moved_while_reconciling.remove(peer);
    }

    /// `doc`'s heads moved here: every digest session in progress must sync it.
    pub(crate) fn heads_moved(&mut self, doc: DocId) {
        for peer in self.reconcilers.keys() {
            if let Some(moved) = self.moved_while_reconciling.get_mut(peer) {
                moved.insert(doc);
            }
        }
    }

    /// The documents that moved during the digest session with `peer` that just ended.
    pub(crate) fn take_moved(&mut self, peer: &str) -> HashSet<DocId> {
        self.moved_while_reconciling
            .remove(peer)
            .unwrap_or_default()
    }

    /// A frame came from `peer` at `now`.
    pub(crate) fn heard_from(&mut self, peer: &str, now: u64) {
        self.last_heard.insert(peer.to_string(), now);
    }

    /// `peer` counts as live until `ttl_ms` after `now`, at most [`heartbeat::MAX_TTL_MS`].
    pub(crate) fn alive_for(&mut self, peer: &str, ttl_ms: u64, now: u64) {
        let until = now.saturating_add(ttl_ms.min(heartbeat::MAX_TTL_MS));
        self.alive_until.insert(peer.to_string(), until);
    }

    /// Whether `peer` is admitted and was heard within its last TTL, at `now`.
    pub(crate) fn is_alive(&self, peer: &str, now: u64) -> bool {
        self.admitted.contains_key(peer)
            && self.alive_until.get(peer).is_some_and(|until| *until > now)
    }

    /// How long ago `peer` was last heard, at `now`; `None` before its first frame.
    pub(crate) fn heard_ago(&self, peer: &str, now: u64) -> Option<u64> {
        self.last_heard.get(peer).map(|t| now.saturating_sub(*t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(peer: &str) -> PeerState {
        let mut state = PeerState::default();
        state
            .admitted
            .insert(peer.to_string(), hearth_net::PeerId::random());
        state
    }

    #[test]
    fn a_device_is_alive_while_admitted_and_within_its_ttl() {
        let mut state = admitted("a");
        assert!(!state.is_alive("a", 0), "not heard yet");
        state.alive_for("a", 6_000, 1_000);
        assert!(state.is_alive("a", 6_999));
        assert!(!state.is_alive("a", 7_000));
        // Heard but not admitted (a paired home's device, or one that left): not live.
        state.alive_for("b", 6_000, 1_000);
        assert!(!state.is_alive("b", 2_000));
    }

    #[test]
    fn a_claimed_ttl_is_capped() {
        let mut state = admitted("a");
        state.alive_for("a", u64::MAX, 0);
        assert!(state.is_alive("a", heartbeat::MAX_TTL_MS - 1));
        assert!(!state.is_alive("a", heartbeat::MAX_TTL_MS));
    }

    #[test]
    fn documents_that_move_during_a_digest_session_are_kept_for_its_end() {
        let mut state = admitted("a");
        let (x, y) = (DocId::from_bytes([1; 16]), DocId::from_bytes([2; 16]));
        state.heads_moved(x);
        state.reconciling("a", hearth_crdt::digest::Reconciler::new());
        state.heads_moved(y);
        assert_eq!(
            state.take_moved("a"),
            HashSet::from([y]),
            "only what moved during the session"
        );
        assert!(state.take_moved("a").is_empty(), "taken once");
        // A new session starts clean; forgetting the peer drops what it gathered.
        state.reconciling("a", hearth_crdt::digest::Reconciler::new());
        state.heads_moved(x);
        state.forget("a");
        assert!(state.moved_while_reconciling.is_empty());
    }

    #[test]
    fn forgetting_a_peer_drops_all_it_left_behind() {
        let mut state = admitted("a");
        state.heard_from("a", 5);
        state.alive_for("a", 100, 5);
        state.pacing.queue(
            "a",
            hearth_crdt::DocId::from_bytes([1; 16]),
            hearth_crdt::KeyEpoch::first([0; 16]),
        );
        assert_eq!(state.heard_ago("a", 15), Some(10));
        assert!(state.forget("a"));
        assert!(!state.forget("a"), "forgotten once");
        assert_eq!(state.heard_ago("a", 15), None);
        assert!(!state.is_alive("a", 6));
        assert!(state.pacing.is_idle());
    }
}
