//! Documents held but not loaded. The node keeps every document's header and heads in
//! memory and loads the document itself only when it is used; the rest wait here as
//! [`Unloaded`] entries. The engine never reads storage: its owner reads a document's
//! chunks and hands them over with [`Engine::prepare_load`] and [`Engine::finish_load`],
//! which wakes the sessions the document had when it was evicted.
//!
//! A document is evicted only when nothing about it lives solely in memory: no parked
//! push, and no session with work pending (an exchange waiting for an answer, a
//! confirmation round or an opening message due). Such a session is idle, and its
//! encoded state (shared heads) plus whether it was in sync is all it needs to resume.
//! Whether the document's chunks are stored is the owner's to know; it must only evict
//! documents whose persisted chunks are durable.

use std::collections::BTreeMap;
use std::fmt::Debug;

use automerge::ChangeHash;

use crate::error::{Error, Result};
use crate::ids::DocId;
use crate::schema::Header;
use crate::session::SyncSession;

use super::Engine;

/// A document held but not loaded.
#[derive(Debug)]
pub(super) struct Unloaded<P> {
    pub(super) header: Header,
    pub(super) heads: Vec<ChangeHash>,
    /// Idle sessions, by peer, to wake when the document loads.
    pub(super) sessions: BTreeMap<P, Dormant>,
}

/// An idle session of an unloaded document.
#[derive(Debug)]
pub(super) struct Dormant {
    /// [`SyncSession::encode`] output.
    pub(super) state: Vec<u8>,
    pub(super) in_sync: bool,
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// Registers a document that is stored but not loaded, from what its owner kept of
    /// it: its header and heads. Reads of those work at once; anything else answers
    /// [`Error::NotLoaded`] until the document is loaded.
    pub fn insert_unloaded(
        &mut self,
        id: DocId,
        header: Header,
        heads: Vec<ChangeHash>,
    ) -> Result<()> {
        if self.docs.contains_key(&id) {
            return Err(Error::DocumentExists(id));
        }
        self.unloaded.insert(
            id,
            Unloaded {
                header,
                heads,
                sessions: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Whether `id` is loaded.
    pub fn is_loaded(&self, id: DocId) -> bool {
        self.docs.contains_key(&id)
    }

    /// Whether `id` is held but not loaded.
    pub fn is_unloaded(&self, id: DocId) -> bool {
        self.unloaded.contains_key(&id)
    }

    /// How many documents are loaded.
    pub fn loaded_count(&self) -> usize {
        self.docs.len()
    }

    /// Whether `id` is loaded and could be evicted now: it has content, no parked push,
    /// and every session is idle (see the module notes).
    pub fn evictable(&mut self, id: DocId) -> bool {
        let retry = self.config.retry_after_ms;
        let Some(ds) = self.docs.get_mut(&id) else {
            return false;
        };
        ds.parked.is_empty()
            && ds.sessions.values().all(|s| s.deadline(retry).is_none())
            && !ds.doc.get_heads().is_empty()
    }

    /// Unloads `id` if [`Engine::evictable`], keeping its header, heads and idle
    /// sessions. Returns whether it did.
    pub fn evict(&mut self, id: DocId) -> bool {
        if !self.evictable(id) {
            return false;
        }
        let Some(mut ds) = self.docs.remove(&id) else {
            return false;
        };
        let heads = ds.doc.get_heads();
        let sessions = std::mem::take(&mut ds.sessions)
            .into_iter()
            .map(|(peer, s)| {
                let dormant = Dormant {
                    state: s.encode(),
                    in_sync: s.in_sync,
                };
                (peer, dormant)
            })
            .collect();
        self.unloaded.insert(
            id,
            Unloaded {
                header: ds.header,
                heads,
                sessions,
            },
        );
        true
    }

    /// [`Engine::attach_in_sync`] for a document that is not loaded: the session waits,
    /// in sync at the document's heads, until it loads.
    pub(super) fn attach_unloaded_in_sync(&mut self, peer: P, doc: DocId) -> Result<()> {
        let u = self
            .unloaded
            .get_mut(&doc)
            .ok_or(Error::UnknownDocument(doc))?;
        let mut session = SyncSession::new();
        session.state.shared_heads = u.heads.clone();
        u.sessions.insert(
            peer,
            Dormant {
                state: session.encode(),
                in_sync: true,
            },
        );
        Ok(())
    }

    /// Takes `id` out of the unloaded documents, waking its sessions for the loaded
    /// document that replaces it. A state that does not decode (it was encoded here, so
    /// never in practice) is dropped: the next exchange with that peer starts afresh.
    pub(super) fn wake_sessions(&mut self, id: DocId) -> BTreeMap<P, SyncSession> {
        let Some(u) = self.unloaded.remove(&id) else {
            return BTreeMap::new();
        };
        u.sessions
            .into_iter()
            .filter_map(|(peer, d)| {
                let mut session = SyncSession::resume(&d.state).ok()?;
                session.in_sync = d.in_sync;
                if d.in_sync {
                    // As `attach_in_sync` leaves it: nothing to send until a change.
                    session.state.last_sent_heads = session.state.shared_heads.clone();
                }
                Some((peer, session))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::{ChunkKind, EngineConfig, Output};
    use crate::harness::Net;
    use crate::ids::DocId;
    use crate::schema::entity::EntityUpdate;

    const DOC: DocId = DocId::from_bytes([44; 16]);

    fn snapshot(net: &mut Net, node: usize) -> Vec<u8> {
        let out = net.nodes[node].snapshot(DOC).unwrap();
        out.into_iter()
            .find_map(|o| match o {
                Output::PersistChunk {
                    kind: ChunkKind::Snapshot,
                    bytes,
                    ..
                } => Some(bytes),
                _ => None,
            })
            .unwrap()
    }

    /// An idle document is evicted with its session, answers header and heads while
    /// unloaded, refuses anything else, and once loaded again takes a push directly: the
    /// session woke in sync.
    #[test]
    fn an_evicted_document_keeps_its_idle_session_and_takes_a_push_after_loading() {
        let mut net = Net::new(2, 5, EngineConfig::default());
        net.share_entity(DOC);
        net.run_until_quiet(10_000);
        let stored = snapshot(&mut net, 1);
        let heads = net.nodes[1].heads(DOC).unwrap();
        assert!(net.nodes[1].evict(DOC));
        assert!(net.nodes[1].is_unloaded(DOC) && !net.nodes[1].is_loaded(DOC));
        assert_eq!(net.nodes[1].heads(DOC).unwrap(), heads);
        assert!(net.nodes[1].header(DOC).is_ok());
        assert!(net.nodes[1].is_in_sync(&0, DOC));
        assert!(matches!(
            net.nodes[1].entity(DOC),
            Err(crate::Error::NotLoaded(_))
        ));
        assert_eq!(net.nodes[1].documents().count(), 1);

        // A write on node 0 leaves a confirmation round due there: not evictable.
        let update = EntityUpdate {
            state: "on".into(),
            attributes: None,
        };
        let out = net.nodes[0]
            .update_entity(DOC, &update, net.now_ms, None)
            .unwrap();
        net.absorb(0, out);
        assert!(!net.nodes[0].evict(DOC));

        let actor = net.nodes[1].actor().clone();
        let prepared = crate::Engine::<usize>::prepare_load(&actor, DOC, vec![stored]);
        net.nodes[1].finish_load(prepared).unwrap();
        assert!(net.nodes[1].is_loaded(DOC) && !net.nodes[1].is_unloaded(DOC));
        assert!(net.nodes[1].is_in_sync(&0, DOC));
        let applied = net.nodes[1].stats().pushes_applied;
        net.step();
        assert_eq!(net.nodes[1].stats().pushes_applied, applied + 1);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        assert_eq!(net.nodes[1].entity(DOC).unwrap().state, "on");
    }

    /// After a crash the stored index can name heads older than the chunks hold. A
    /// session attached in sync at the index's heads must not stay in push mode once the
    /// document loads with more: the peer never got what came between.
    #[test]
    fn a_document_that_loads_ahead_of_its_index_confirms_its_in_sync_sessions() {
        let mut net = Net::new(2, 8, EngineConfig::default());
        net.share_entity(DOC);
        net.run_until_quiet(10_000);
        let indexed = net.nodes[0].heads(DOC).unwrap();
        let header = net.nodes[0].header(DOC).unwrap().clone();
        net.nodes[0].detach(&1, DOC);
        net.nodes[1].detach(&0, DOC);
        for state in ["on", "dim"] {
            let update = EntityUpdate {
                state: state.into(),
                attributes: None,
            };
            let out = net.nodes[0]
                .update_entity(DOC, &update, net.now_ms, None)
                .unwrap();
            net.absorb(0, out);
        }
        assert_eq!(net.pending(), 0, "no session: nothing pushed");
        let stored = snapshot(&mut net, 0);
        // Node 0 comes back with an index that lags its chunks.
        assert!(net.nodes[0].remove_document(DOC));
        net.nodes[0]
            .insert_unloaded(DOC, header, indexed.clone())
            .unwrap();
        net.nodes[0].attach_in_sync(1, DOC, None).unwrap();
        net.nodes[1].attach_in_sync(0, DOC, None).unwrap();
        let actor = net.nodes[0].actor().clone();
        let prepared = crate::Engine::<usize>::prepare_load(&actor, DOC, vec![stored]);
        net.nodes[0].finish_load(prepared).unwrap();
        assert_ne!(net.nodes[0].heads(DOC).unwrap(), indexed);
        assert!(
            !net.nodes[0].is_in_sync(&1, DOC),
            "ahead of what the session was attached at"
        );
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        assert_eq!(net.nodes[1].entity(DOC).unwrap().state, "dim");
    }

    /// A session attached in sync to an unloaded document waits with it, and detaching
    /// returns its state.
    #[test]
    fn sessions_attach_and_detach_while_unloaded() {
        let mut net = Net::new(2, 6, EngineConfig::default());
        net.share_entity(DOC);
        net.run_until_quiet(10_000);
        assert!(net.nodes[1].evict(DOC));
        assert!(net.nodes[1].detach(&0, DOC).is_some());
        assert!(!net.nodes[1].is_in_sync(&0, DOC));
        net.nodes[1].attach_in_sync(0, DOC, None).unwrap();
        assert!(net.nodes[1].is_in_sync(&0, DOC));
        assert_eq!(net.nodes[1].detach_peer(&0).len(), 1);
        assert!(net.nodes[1].remove_document(DOC));
        assert_eq!(net.nodes[1].documents().count(), 0);
    }
}
