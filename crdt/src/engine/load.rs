//! Loading documents: rebuilding one from its persisted chunks, on any thread, then
//! adding it to the engine.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Debug;

use automerge::{ActorId, AutoCommit};

use crate::error::{Error, Result};
use crate::history::VersionLog;
use crate::ids::DocId;
use crate::schema::{DocKind, Header};

use super::{DocState, Engine, catch};

/// A document rebuilt from its chunks by [`Engine::prepare_load`], ready for
/// [`Engine::finish_load`].
pub struct PreparedLoad {
    id: DocId,
    chunks: Vec<Vec<u8>>,
    result: Result<(AutoCommit, Header, BTreeSet<ActorId>, Option<VersionLog>)>,
}

impl PreparedLoad {
    /// The document it is.
    pub fn id(&self) -> DocId {
        self.id
    }
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// Loads a document from its persisted chunks: a snapshot followed by
    /// incremental chunks, or an empty document's chunks as received from a
    /// peer. A document that is already loaded is replaced.
    pub fn load_document(&mut self, id: DocId, chunks: &[Vec<u8>]) -> Result<()> {
        let prepared = Self::prepare_load(&self.actor, id, chunks.to_vec());
        self.finish_load(prepared)
    }

    /// The part of [`Engine::load_document`] that needs no engine: rebuilding the
    /// document from its chunks, reading its header and listing its actors. It can run on
    /// any thread (start-up loads documents on every core); [`Engine::finish_load`] then
    /// adds the result. `actor` is [`Engine::actor`].
    pub fn prepare_load(actor: &ActorId, id: DocId, chunks: Vec<Vec<u8>>) -> PreparedLoad {
        let result = (|| {
            let built = catch(|| rebuild(actor, &chunks)).map_err(|()| Error::Load {
                doc: id,
                reason: "automerge panicked while loading".into(),
            })?;
            let mut doc = built.map_err(|reason| Error::Load { doc: id, reason })?;
            let header = Header::read(&doc)?;
            let actors = catch(|| doc_actors(&mut doc)).map_err(|()| Error::Load {
                doc: id,
                reason: "automerge panicked while listing actors".into(),
            })?;
            // Start the save cursor at the loaded state, so the next incremental
            // chunk holds only new changes.
            let _ = doc.save_incremental();
            // Listing an entity's changes costs O(history); done here, on the
            // loader's thread, a history read later costs only what it returns.
            let versions = (header.kind == DocKind::Entity)
                .then(|| catch(|| VersionLog::build(&mut doc)).ok())
                .flatten();
            Ok((doc, header, actors, versions))
        })();
        PreparedLoad { id, chunks, result }
    }

    /// Adds a document that [`Engine::prepare_load`] rebuilt, or returns why it could not
    /// be.
    pub fn finish_load(&mut self, prepared: PreparedLoad) -> Result<()> {
        let PreparedLoad { id, chunks, result } = prepared;
        let (mut doc, header, actors, versions) = result.inspect_err(|e| {
            if matches!(e, Error::Load { reason, .. } if reason.contains("panicked")) {
                self.stats.panics_caught += 1;
            }
        })?;
        let mut sessions = self
            .docs
            .remove(&id)
            .map(|old| old.sessions)
            .unwrap_or_default();
        // A document that was evicted wakes the sessions it had.
        sessions.extend(self.wake_sessions(id));
        // A session attached in sync while the document was unloaded took its heads from
        // the stored index, which can lag the chunks after a crash. If the document holds
        // more than that, the peer may lack it: one exchange finds out, where push mode
        // would leave every later push waiting at the peer for what came between.
        let heads = doc.get_heads();
        let mut confirm = false;
        for session in sessions.values_mut() {
            if session.in_sync && session.state.shared_heads != heads {
                session.in_sync = false;
                session.confirm_at = Some(0);
                confirm = true;
            }
        }
        self.docs.insert(
            id,
            DocState {
                doc,
                header,
                journal: chunks,
                parked: VecDeque::new(),
                sessions,
                actors,
                unchecked: None,
                versions,
                paths: Default::default(),
                devices: Default::default(),
            },
        );
        if confirm {
            self.reschedule(id);
        }
        Ok(())
    }
}

/// Every actor with a change in `doc`.
pub(super) fn doc_actors(doc: &mut AutoCommit) -> BTreeSet<ActorId> {
    doc.get_changes_meta(&[])
        .into_iter()
        .map(|m| m.actor.into_owned())
        .collect()
}

/// Loads a document from a snapshot and incremental chunks.
///
/// These are the engine's own chunks, from its journal or from the node's
/// store (sealed under the store key), never a peer's: their snapshots are
/// `save()` output, whose deflated columns Automerge inflates here without a
/// cap, and that is the one place it may. Peer bytes reach a document only
/// through [`Engine::receive`], which walks and caps them first.
///
/// The chunks are loaded in one call, so Automerge applies every change after the
/// snapshot in one batch: one by one, each change walked the map it writes, which for the
/// registry (one key per entity) made loading it grow with the square of its changes.
pub(super) fn rebuild(
    actor: &ActorId,
    chunks: &[Vec<u8>],
) -> std::result::Result<AutoCommit, String> {
    if chunks.is_empty() {
        return Ok(AutoCommit::new().with_actor(actor.clone()));
    }
    let doc = AutoCommit::load(&chunks.concat()).map_err(|e| e.to_string())?;
    Ok(doc.with_actor(actor.clone()))
}
