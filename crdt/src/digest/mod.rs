//! Many-document reconciliation: which documents differ between two peers?
//!
//! When two peers reconnect they must find the documents whose heads differ before the per-document
//! sync sessions can run. Comparing every (doc id, heads) pair costs O(D) for D shared documents,
//! even when nothing changed. Instead each side keeps a [`DigestTree`]: a Merkle trie over
//! `(doc id, heads hash)` keyed by the doc id's hex nibbles, with a fan-out of 16 (one nibble per
//! level, at most 32 levels for a 16-byte id). A subtree holding at most [`LEAF_MAX`] documents is
//! a leaf and lists its entries; a bigger one is an internal node whose hash covers its 16
//! children. The shape is a pure function of the set of entries, so two peers holding the same
//! set compute the same hash at every path, however they built or updated their trees.
//!
//! # What the tree covers
//!
//! A tree must cover exactly the documents this peer may hold: digests carry doc ids and heads
//! hashes, and both leak which documents exist. Filtering is the node's job, not this module's:
//! keep one tree per sharing scope (for instance per peer home) and feed it only the documents
//! shared with that scope, then hand the right tree to each peer's [`Reconciler`].
//!
//! # Protocol
//!
//! One [`Reconciler`] per peer session; exactly one side initiates (the node picks, for instance
//! the side with the smaller PeerId, as it does for dialling). The caller draws a random session
//! id, so late messages from an earlier session on the same stream are recognised and refused.
//!
//! 1. The initiator's [`Reconciler::start`] returns `Start`, carrying its root hash.
//! 2. The responder compares it with its own root. Equal roots end the session at once with an
//!    empty reply: a reconnect where nothing changed costs one round trip and one hash in all.
//! 3. Otherwise the sides take turns. Each turn answers every item of the previous one:
//!    - `Children(path)`: "my node at `path` is internal; here are its child hashes". The receiver
//!      compares them with its own children at `path` (computed the same way, even where its own
//!      subtree is a leaf) and expands only the children that differ.
//!    - `Entries(path)`: "I hold at most [`LEAF_MAX`] documents under `path`; here they are". A
//!      receiver that holds at most [`LEAF_MAX`] there too compares both lists and answers with
//!      `Settle`. One that holds more answers with its own `Children(path)` instead, so no answer
//!      ever has to list a large subtree in one item.
//!    - `Settle(path)`: the differences under `path`: ids the receiver listed that the sender
//!      lacks, ids the sender holds that the receiver lacks, and ids whose heads differ.
//! 4. A turn with no question in it (only settles, or nothing) ends the session on both sides;
//!    each then reports the same [`Differences`], seen from its own side.
//!
//! A turn may span several messages (the last one marks the end of the turn), so every message
//! stays within [`MAX_ITEMS_PER_MESSAGE`], [`MAX_VALUES_PER_MESSAGE`] and [`MAX_MESSAGE_BYTES`]
//! even when a fresh device learns of ten thousand documents at once.
//!
//! # Cost
//!
//! Only subtrees whose hashes differ are opened, and a subtree differs only if it holds a changed
//! document. Each changed document therefore opens at most one node per level on its own path:
//! 16 hashes per level over about `log16(D / LEAF_MAX) + 1` levels, plus one leaf of at most
//! [`LEAF_MAX`] entries and its settle. With `d` changed documents out of `D` that is
//! `O(d log D)` hashes, shared prefixes making it less; a single level of 256 buckets would cost
//! `O(D)` entries instead (about 3200 at `D = 10000` with 1% changed). Every path grows by at
//! least one nibble every two turns, so a session lasts at most about 66 turns even against a
//! hostile peer.
//!
//! # Hostile input
//!
//! Every message is checked before it is used: sizes against the caps, paths at most 32 nibbles,
//! entries sorted and under their path, every item an answer to a question this side actually
//! asked, each at most once. A violation is an [`Error`] and fails the session; nothing panics.
//! The ids a peer says it holds are claims: the node must check that the peer may share a
//! document before it opens a sync session for it.
//!
//! [`Error`]: crate::Error
//!
//! # Example
//!
//! ```
//! use hearth_crdt::DocId;
//! use hearth_crdt::digest::{DigestTree, Reconciler, heads_hash_bytes};
//!
//! let doc = |n: u8| DocId::from_bytes([n; 16]);
//! let mut ours: DigestTree = (0..100).map(|n| (doc(n), heads_hash_bytes(&[[n; 32]]))).collect();
//! let theirs = ours.clone();
//! ours.insert(doc(7), heads_hash_bytes(&[[200; 32]])); // a local edit
//!
//! let (mut a, mut b) = (Reconciler::new(), Reconciler::new());
//! let mut to_b = vec![a.start(0x5eed, &ours).unwrap()];
//! let mut result = None;
//! while !to_b.is_empty() {
//!     let mut to_a = Vec::new();
//!     for m in to_b.drain(..) {
//!         to_a.extend(b.handle(&theirs, m).unwrap().send);
//!     }
//!     for m in to_a {
//!         let progress = a.handle(&ours, m).unwrap();
//!         to_b.extend(progress.send);
//!         result = result.or(progress.finished);
//!     }
//! }
//! let differences = result.expect("the initiator finishes");
//! assert_eq!(differences.changed.into_iter().collect::<Vec<_>>(), vec![doc(7)]);
//! ```

mod reconciler;
mod tree;
mod wire;

pub use self::reconciler::{Differences, DigestStats, Progress, Reconciler};
pub use self::tree::{
    DigestTree, FANOUT, LEAF_MAX, MAX_DEPTH, NibblePath, heads_hash, heads_hash_bytes,
};
pub use self::wire::{
    DigestMessage, MAX_ITEMS_PER_MESSAGE, MAX_MESSAGE_BYTES, MAX_VALUES_PER_MESSAGE,
    PROTOCOL_VERSION,
};

/// Helpers shared by the tests of the tree, the messages and the reconciler.
#[cfg(test)]
mod testing {
    use std::collections::BTreeMap;

    use sha2::{Digest, Sha256};

    use super::tree::Hash;
    use super::*;
    use crate::ids::{DOC_ID_LEN, DocId};

    /// A deterministic, well-spread doc id.
    pub(super) fn id(n: u64) -> DocId {
        let digest = Sha256::digest(n.to_be_bytes());
        let mut bytes = [0u8; DOC_ID_LEN];
        bytes.copy_from_slice(&digest[..DOC_ID_LEN]);
        DocId::from_bytes(bytes)
    }

    pub(super) fn heads(n: u64) -> Hash {
        heads_hash_bytes(&[Sha256::digest(n.to_le_bytes()).into()])
    }

    pub(super) fn tree_of(entries: &BTreeMap<DocId, Hash>) -> DigestTree {
        entries.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Both sides of one finished session.
    pub(super) struct Run {
        pub(super) a: Differences,
        pub(super) b: Differences,
        pub(super) a_stats: DigestStats,
        pub(super) b_stats: DigestStats,
    }

    impl Run {
        pub(super) fn hashes(&self) -> u64 {
            self.a_stats.hashes_sent + self.b_stats.hashes_sent
        }
    }

    /// Runs a session between `a` (initiator) and `b`, every message going through CBOR.
    pub(super) fn reconcile(a_tree: &DigestTree, b_tree: &DigestTree) -> Run {
        let (mut a, mut b) = (Reconciler::new(), Reconciler::new());
        let mut to_b = vec![a.start(0xfeed_f00d, a_tree).unwrap()];
        let (mut a_done, mut b_done) = (None, None);
        for _ in 0..200 {
            let mut to_a = Vec::new();
            for m in to_b.drain(..) {
                let m = DigestMessage::decode(&m.encode()).unwrap();
                let p = b.handle(b_tree, m).unwrap();
                assert!(b_done.is_none() || p.finished.is_none(), "finished twice");
                b_done = b_done.or(p.finished);
                to_a.extend(p.send);
            }
            for m in to_a {
                assert!(m.encoded_len() <= MAX_MESSAGE_BYTES);
                let m = DigestMessage::decode(&m.encode()).unwrap();
                let p = a.handle(a_tree, m).unwrap();
                assert!(a_done.is_none() || p.finished.is_none(), "finished twice");
                a_done = a_done.or(p.finished);
                to_b.extend(p.send);
            }
            if to_b.is_empty() {
                break;
            }
        }
        assert!(
            a.is_finished() && b.is_finished(),
            "the session went quiet unfinished"
        );
        Run {
            a: a_done.unwrap(),
            b: b_done.unwrap(),
            a_stats: a.stats(),
            b_stats: b.stats(),
        }
    }
}
