//! Devices of this home on the network: admission by certificate, sealing and routing
//! frames (`admission`), liveness (`heartbeat`), paced session openings (`pacing`), and
//! saved sync states (`sync_states`).

pub(crate) mod admission;
pub(crate) mod heartbeat;
pub(crate) mod pacing;
pub(crate) mod sync_states;

use std::collections::HashMap;

/// This home's devices on the network: who is admitted, and what is known of each.
pub(crate) struct PeerState {
    /// Admitted devices, by PeerId text.
    pub(crate) admitted: HashMap<String, hearth_net::PeerId>,
    /// Digest sessions in progress, by peer.
    pub(crate) reconcilers: HashMap<String, hearth_crdt::digest::Reconciler>,
    /// Until when each admitted device counts as live (ms since the epoch), from its
    /// heartbeats; see `heartbeat`.
    pub(crate) alive_until: HashMap<String, u64>,
    /// When a frame last came from each admitted peer (ms since the epoch).
    pub(crate) last_heard: HashMap<String, u64>,
    /// Bulk session openings, paced per peer.
    pub(crate) pacing: pacing::Pacing,
}
