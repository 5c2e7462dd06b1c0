//! The per-node engine: documents, sync sessions, and the push hot path.
//!
//! The engine is sans-IO. Each call takes the current wall-clock time and any
//! incoming frame, and returns [`Output`]s: frames to send, chunks and sync
//! states to persist, change notifications, and timers. The node owns one
//! engine, persists what it is told to, seals and routes frames, and calls
//! [`Engine::tick`] when a timer fires.
//!
//! # Hot path and catch-up
//!
//! A local commit produces the new changes (`save_incremental`), pushed to
//! every attached peer whose session is in sync. A receiver applies a push
//! directly when the changes' dependencies are present. When they are not, the
//! push is parked (bounded, see [`EngineConfig::max_pending_pushes`]) and a
//! sync round with the sender starts; once the missing changes arrive the
//! parked push is applied, or found already applied. A push is never dropped
//! without a sync round covering it: even when the parking lot overflows, the
//! sender still holds the evicted changes and the sync session fetches them.
//!
//! Pushes are not acknowledged. Instead, some time after pushing (or after
//! applying a peer's changes, which may need relaying to other peers) a
//! session runs one sync exchange to confirm the peer has everything. That
//! costs one Automerge sync round per quiet period instead of one per change.
//!
//! # Cost with history
//!
//! A push skips the sync protocol's walk over the whole change history, but
//! applying a change in Automerge 0.12 still walks every earlier op on the
//! keys it writes: overwritten values are kept. So an entity rewritten 20 000
//! times applies a push in milliseconds (see `benches/push.rs`), while a key
//! that was rarely written applies in tens of microseconds however large the
//! rest of the document is.
//!
//! # Panics inside Automerge
//!
//! Every Automerge call on peer input runs under `catch_unwind`. A panic part
//! way through applying changes can leave the in-memory document inconsistent
//! (automerge#1187), so the engine rebuilds that document from its journal:
//! the last snapshot plus the incremental chunks recorded after each
//! successful change, the same bytes the node was told to persist. This costs
//! memory of roughly one saved copy per document, in exchange for never
//! applying a change to a clone on the hot path (a clone is O(document)). The
//! offending session is reset; other documents and sessions are untouched.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Debug;
use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::transaction::CommitOptions;
use automerge::{ActorId, AutoCommit, Change, ChangeHash};

use crate::chunks::parse_changes;
use crate::error::{Error, Result};
use crate::history::VersionLog;
use crate::hlc::{DEFAULT_MAX_DRIFT_MS, Hlc, HlcClock};
use crate::ids::{DocId, KeyEpoch, actor_bytes_for_peer};
use crate::schema::home;
use crate::schema::registry;
use crate::schema::touched::{Touched, touched_entries};
use crate::schema::{DocKind, Header};
use crate::session::SyncSession;
use crate::wire::{Frame, Push};

pub mod generation;
mod guard;
mod load;
mod receive;
mod resident;
mod schema_ops;

pub use self::generation::{Generation, GenerationStats, MoveReport};
#[cfg(test)]
pub(crate) use self::guard::check_actors;
pub(crate) use self::guard::frame_limits;
pub use self::guard::payload_actors;
pub use self::load::PreparedLoad;
use self::receive::generate_into;
use self::resident::Unloaded;

/// Default cap on one encoded sync message: 16 MiB (automerge#896: unbounded
/// catch-up messages exhaust memory).
pub const DEFAULT_MAX_SYNC_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Default cap on one push payload: 1 MiB. Pushes carry a few fresh changes;
/// anything bigger belongs in a sync session.
pub const DEFAULT_MAX_PUSH_BYTES: usize = 1024 * 1024;
/// Default cap on the number of changes in one push.
pub const DEFAULT_MAX_CHANGES_PER_PUSH: usize = 4096;
/// Default number of pushes parked per document while their dependencies are
/// fetched.
pub const DEFAULT_MAX_PENDING_PUSHES: usize = 64;
/// Default delay before a confirmation sync round follows a push.
pub const DEFAULT_CONFIRM_AFTER_MS: u64 = 1_000;
/// Default time to wait for an answer to a sync message before restarting the
/// exchange. Each restart in a row without an answer doubles it, up to 16 times this.
pub const DEFAULT_RETRY_AFTER_MS: u64 = 3_000;
/// Default number of incremental chunks after which a document is compacted
/// into one snapshot. Every load reads, decrypts and applies each stored chunk on its
/// own: with 512, a document that had seen a few hundred writes took about 50 ms to
/// load in a debug build, and a restart that needed every document loaded held its
/// peers' catch-up for seconds.
pub const DEFAULT_COMPACT_AFTER_CHUNKS: usize = 64;
/// Default cap on what one push or sync message decodes to: 64 MiB, four
/// times [`DEFAULT_MAX_SYNC_MESSAGE_BYTES`]. Change chunks count as they are;
/// a whole document (catch-up) counts with its deflated columns inflated,
/// which is the part a small frame can blow up.
pub const DEFAULT_MAX_DECODED_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// Default cap on the ops in the changes of one push or sync message: about
/// four million. A few bytes of run-length encoding declare millions of ops,
/// and applying each one costs memory.
pub const DEFAULT_MAX_OPS_PER_FRAME: usize = 1 << 22;
/// Default cap on how much one document may grow in one call to
/// [`Engine::receive`]: 64 MiB of new changes, counting the frame's own and
/// those of parked pushes it unblocks.
pub const DEFAULT_MAX_GROWTH_PER_STEP_BYTES: usize = 64 * 1024 * 1024;

/// Engine limits and timings. Every field has a documented default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Largest sync message accepted or sent ([`DEFAULT_MAX_SYNC_MESSAGE_BYTES`]).
    /// Both sides should agree. A catch-up larger than this is sent over several
    /// rounds, each message carrying a causal prefix of the changes the peer lacks,
    /// so only a single change larger than the cap (less the message's own hashes
    /// and bloom filter) cannot travel; writers must keep one change well below it.
    /// A node derives it from its transport's frame cap with
    /// [`crate::wire::max_payload`].
    pub max_sync_message_bytes: usize,
    /// Largest push payload accepted ([`DEFAULT_MAX_PUSH_BYTES`]). A local
    /// commit bigger than this is sent through the sync session instead.
    pub max_push_bytes: usize,
    /// Most changes in one push ([`DEFAULT_MAX_CHANGES_PER_PUSH`]).
    pub max_changes_per_push: usize,
    /// Parked pushes per document ([`DEFAULT_MAX_PENDING_PUSHES`]).
    pub max_pending_pushes: usize,
    /// Delay before a confirmation round ([`DEFAULT_CONFIRM_AFTER_MS`]).
    pub confirm_after_ms: u64,
    /// Wait for an answer before restarting ([`DEFAULT_RETRY_AFTER_MS`]), doubled for
    /// each restart in a row of the same session.
    pub retry_after_ms: u64,
    /// Journal length that triggers compaction ([`DEFAULT_COMPACT_AFTER_CHUNKS`]).
    pub compact_after_chunks: usize,
    /// Allowed clock drift of remote HLC readings ([`DEFAULT_MAX_DRIFT_MS`]).
    pub max_clock_drift_ms: u64,
    /// Most bytes one push or sync message may decode to
    /// ([`DEFAULT_MAX_DECODED_FRAME_BYTES`]). Checked before Automerge sees
    /// the frame; compressed change chunks are refused whatever their size.
    pub max_decoded_frame_bytes: usize,
    /// Most ops in the changes of one push or sync message
    /// ([`DEFAULT_MAX_OPS_PER_FRAME`]).
    pub max_ops_per_frame: usize,
    /// Most bytes of new changes one call to [`Engine::receive`] may add to a
    /// document ([`DEFAULT_MAX_GROWTH_PER_STEP_BYTES`]). A whole document from
    /// a peer counts in full, as Automerge cannot say how much of it is new
    /// before loading it, so keep this no lower than `max_decoded_frame_bytes`
    /// or a catch-up that fits the frame caps can never apply. Parked pushes
    /// over what is left wait for a later call.
    pub max_growth_per_step_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_sync_message_bytes: DEFAULT_MAX_SYNC_MESSAGE_BYTES,
            max_push_bytes: DEFAULT_MAX_PUSH_BYTES,
            max_changes_per_push: DEFAULT_MAX_CHANGES_PER_PUSH,
            max_pending_pushes: DEFAULT_MAX_PENDING_PUSHES,
            confirm_after_ms: DEFAULT_CONFIRM_AFTER_MS,
            retry_after_ms: DEFAULT_RETRY_AFTER_MS,
            compact_after_chunks: DEFAULT_COMPACT_AFTER_CHUNKS,
            max_clock_drift_ms: DEFAULT_MAX_DRIFT_MS,
            max_decoded_frame_bytes: DEFAULT_MAX_DECODED_FRAME_BYTES,
            max_ops_per_frame: DEFAULT_MAX_OPS_PER_FRAME,
            max_growth_per_step_bytes: DEFAULT_MAX_GROWTH_PER_STEP_BYTES,
        }
    }
}

/// Where a change came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin<P> {
    /// Written on this node.
    Local,
    /// Received from this peer (pushed or synced).
    Peer(P),
}

/// How a persisted chunk relates to the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkKind {
    /// A full save: replaces every earlier chunk of the document.
    Snapshot,
    /// Changes to append after the existing chunks.
    Incremental,
}

/// Something the node must do after a call into the engine.
#[derive(Debug)]
#[non_exhaustive]
pub enum Output<P> {
    /// Send `frame` to `peer`. Push and sync payloads are plaintext: seal them
    /// under the document key for the frame's epoch first.
    Send {
        /// Recipient.
        peer: P,
        /// Frame to send.
        frame: Frame,
    },
    /// Persist a chunk of a document. Loading the snapshot and then every
    /// later incremental chunk in order, through [`Engine::load_document`],
    /// restores the document.
    PersistChunk {
        /// Document.
        doc: DocId,
        /// Snapshot or incremental.
        kind: ChunkKind,
        /// Bytes to store.
        bytes: Vec<u8>,
    },
    /// Persist a session's sync state, to pass to [`Engine::attach`] on the
    /// next connection.
    PersistSyncState {
        /// Peer of the session.
        peer: P,
        /// Document of the session.
        doc: DocId,
        /// Encoded state.
        state: Vec<u8>,
    },
    /// A document changed.
    Changed {
        /// Document.
        doc: DocId,
        /// Who wrote the changes.
        origin: Origin<P>,
        /// The write's correlation id, when the push carried one.
        correlation_id: Option<String>,
        /// Heads after the change.
        heads: Vec<ChangeHash>,
        /// Set when the document no longer validates against its schema. The
        /// changes are kept (so replicas converge), reads return this error
        /// until a valid write repairs the field.
        schema_error: Option<Error>,
    },
    /// Call [`Engine::tick`] at (or after) this time.
    Timer {
        /// Wall-clock milliseconds.
        at_ms: u64,
    },
    /// A conflict formed on an entity when remote changes merged, or was
    /// resolved here: an audit record to persist, and to raise as
    /// `conflict.detected` or `conflict.resolved`.
    Conflict(crate::policy::ConflictRecord),
}

/// Counters, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Pushes sent.
    pub pushes_sent: u64,
    /// Pushes applied directly on arrival.
    pub pushes_applied: u64,
    /// Pushes whose changes were all known already.
    pub pushes_duplicate: u64,
    /// Pushes parked for missing dependencies.
    pub pushes_deferred: u64,
    /// Parked pushes applied after their dependencies arrived.
    pub pushes_unparked: u64,
    /// Parked pushes evicted because the lot was full (their changes still
    /// arrive through the sync session).
    pub pushes_evicted: u64,
    /// Sync messages sent.
    pub sync_sent: u64,
    /// Sync messages cut down to the changes that fit
    /// [`EngineConfig::max_sync_message_bytes`]; the rest follow in later rounds.
    pub sync_partial: u64,
    /// Sync messages received and applied.
    pub sync_received: u64,
    /// Sessions reset after malformed or failing input.
    pub session_resets: u64,
    /// Exchanges restarted because an answer was overdue.
    pub session_restarts: u64,
    /// Panics caught inside Automerge.
    pub panics_caught: u64,
    /// Documents rebuilt from their journal after a panic.
    pub documents_recovered: u64,
    /// Inputs refused for size: on the wire, once decoded, or for what they
    /// would add to a document in one step.
    pub oversized: u64,
    /// Pushes and sync messages refused, before inflating anything, for
    /// carrying a compressed change chunk or a bundle.
    pub compressed_refused: u64,
    /// Remote changes after which the document failed validation.
    pub schema_violations: u64,
    /// Snapshots written by compaction.
    pub compactions: u64,
}

/// A push waiting for its dependencies.
#[derive(Debug)]
struct Parked<P> {
    from: P,
    changes: Vec<Change>,
    correlation_id: Option<String>,
}

#[derive(Debug)]
struct DocState<P> {
    doc: AutoCommit,
    header: Header,
    /// Snapshot followed by incremental chunks: the recovery source after a
    /// panic, identical to what the node was told to persist.
    journal: Vec<Vec<u8>>,
    parked: VecDeque<Parked<P>>,
    sessions: BTreeMap<P, SyncSession>,
    /// Actors with changes in the document. Automerge registers an actor only
    /// from its first change (`seq == 1`) and unwraps the lookup for every
    /// other actor a change mentions, so a crafted change naming an unseen
    /// actor panics inside `apply_changes`; checking against this set first
    /// turns that into an error value (found by the `receive` fuzz target).
    actors: BTreeSet<ActorId>,
    /// For a home or registry document that validated: its kind then, and the entries
    /// of its collection map written since (locally). `None` until a first full
    /// validation passes, and again after one fails, so that a document is only ever
    /// checked in part when the rest is known good (see [`crate::schema::touched`]).
    unchecked: Option<(DocKind, Touched)>,
    /// An entity document's versions, appended as changes land, so a history
    /// listing need not walk the document. `None` until first needed for
    /// documents that were not loaded or created as entities.
    versions: Option<VersionLog>,
    /// Paths of this document's objects found while telling which entries changes
    /// wrote ([`crate::schema::touched::PathCache`]).
    paths: crate::schema::touched::PathCache,
    /// A home document's device records as last read ([`Engine::home_devices`]).
    devices: DevicesCache,
}

/// A home document's device records and the number of changes the document held when
/// they were read. Automerge only ever adds changes, so while the count is the same the
/// records are; a document rebuilt in place (after a panic) starts with an empty cache.
#[derive(Debug, Default)]
struct DevicesCache(
    std::cell::RefCell<Option<(u64, BTreeMap<String, crate::schema::home::DeviceRecord>)>>,
);

/// The sans-IO core of a node. `P` identifies peers (the node uses libp2p's
/// `PeerId`; tests use integers).
#[derive(Debug)]
pub struct Engine<P> {
    config: EngineConfig,
    actor: ActorId,
    clock: HlcClock,
    docs: BTreeMap<DocId, DocState<P>>,
    /// Documents held but not loaded (resident.rs): their header, heads and idle sessions.
    unloaded: BTreeMap<DocId, Unloaded<P>>,
    /// Every session's next deadline, earliest first. Kept in step by
    /// [`Engine::reschedule`] after each call that may move one, so finding the next
    /// deadline and the due sessions does not scan every session of every document.
    timers: BTreeSet<(u64, DocId, P)>,
    stats: EngineStats,
    /// Bytes of new changes the current [`Engine::receive`] call may still
    /// add (see [`EngineConfig::max_growth_per_step_bytes`]).
    step_left: usize,
    /// Actor-to-home mapping for the side conflict policies.
    pub(crate) homes: crate::policy::ActorHomes,
    /// Test hook: make the next direct apply panic inside the guard.
    #[cfg(test)]
    pub(crate) fail_next_apply: bool,
}

/// Runs `f`, turning a panic into `Err(())`.
fn catch<R>(f: impl FnOnce() -> R) -> std::result::Result<R, ()> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| ())
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// An engine for the device with these PeerId bytes; its actor id is
    /// derived with [`actor_bytes_for_peer`].
    pub fn new(peer_id_bytes: &[u8], config: EngineConfig) -> Self {
        let actor = actor_bytes_for_peer(peer_id_bytes);
        Self {
            clock: HlcClock::new(actor).with_max_drift(config.max_clock_drift_ms),
            actor: ActorId::from(actor),
            config,
            docs: BTreeMap::new(),
            unloaded: BTreeMap::new(),
            timers: BTreeSet::new(),
            stats: EngineStats::default(),
            step_left: 0,
            homes: crate::policy::ActorHomes::new(),
            #[cfg(test)]
            fail_next_apply: false,
        }
    }

    /// This device's actor id.
    pub fn actor(&self) -> &ActorId {
        &self.actor
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Counters since start.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// A new HLC reading, e.g. for registry tombstones.
    pub fn now_hlc(&mut self, now_ms: u64) -> Hlc {
        self.clock.now(now_ms)
    }

    /// Ids of the documents held, loaded or not.
    pub fn documents(&self) -> impl Iterator<Item = DocId> + '_ {
        self.docs.keys().chain(self.unloaded.keys()).copied()
    }

    /// The cached header of a document, loaded or not.
    pub fn header(&self, doc: DocId) -> Result<&Header> {
        if let Some(u) = self.unloaded.get(&doc) {
            return Ok(&u.header);
        }
        Ok(&self.doc_state(doc)?.header)
    }

    /// Current heads of a document, loaded or not.
    pub fn heads(&mut self, doc: DocId) -> Result<Vec<ChangeHash>> {
        if let Some(u) = self.unloaded.get(&doc) {
            return Ok(u.heads.clone());
        }
        Ok(self.doc_state_mut(doc)?.doc.get_heads())
    }

    /// A full snapshot of `doc`, as a persist output that replaces every chunk stored so far; for a caller
    /// whose earlier chunks may not have reached its storage (a failed write). The journal restarts from it.
    pub fn snapshot(&mut self, doc: DocId) -> Result<Vec<Output<P>>> {
        let ds = self.doc_state_mut(doc)?;
        let d = &mut ds.doc;
        let bytes = catch(|| d.save()).map_err(|()| Error::Panicked {
            doc,
            during: "snapshot",
        })?;
        ds.journal = vec![bytes.clone()];
        Ok(vec![Output::PersistChunk {
            doc,
            kind: ChunkKind::Snapshot,
            bytes,
        }])
    }

    /// Read access to a document for views not covered here.
    pub fn doc(&self, doc: DocId) -> Result<&AutoCommit> {
        Ok(&self.doc_state(doc)?.doc)
    }

    /// A copy of document `doc`, for reads that run away from the engine's
    /// owner. It costs a copy of the document, not a read of it.
    pub fn doc_copy(&mut self, doc: DocId) -> Result<AutoCommit> {
        Ok(self.doc_state_mut(doc)?.doc.fork())
    }

    fn doc_state(&self, doc: DocId) -> Result<&DocState<P>> {
        self.docs.get(&doc).ok_or_else(|| self.missing(doc))
    }

    fn doc_state_mut(&mut self, doc: DocId) -> Result<&mut DocState<P>> {
        let missing = self.missing(doc);
        self.docs.get_mut(&doc).ok_or(missing)
    }

    /// The error for a document that is not in `docs`: unknown, or held but not loaded.
    fn missing(&self, doc: DocId) -> Error {
        if self.unloaded.contains_key(&doc) {
            Error::NotLoaded(doc)
        } else {
            Error::UnknownDocument(doc)
        }
    }

    /// An entity document's version log, caught up with the document (built
    /// first if need be), and the document.
    pub(crate) fn version_log(&mut self, doc: DocId) -> Result<(&VersionLog, &mut AutoCommit)> {
        let ds = self.doc_state_mut(doc)?;
        let log = ds.versions.get_or_insert_with(VersionLog::default);
        log.catch_up(&mut ds.doc, &[]);
        Ok((log, &mut ds.doc))
    }

    /// Mutable access for the reads Automerge offers only on `&mut` (heads,
    /// change metadata). Writes go through [`Engine::transact`], or the
    /// journal and the peers would miss them.
    #[cfg(test)]
    pub(crate) fn doc_for_read_mut(&mut self, doc: DocId) -> Result<&mut AutoCommit> {
        Ok(&mut self.doc_state_mut(doc)?.doc)
    }

    // ----- documents ---------------------------------------------------------

    /// Creates a document: writes `header`, then runs `init` in the same
    /// change. Returns the snapshot to persist.
    pub fn create_document(
        &mut self,
        id: DocId,
        header: Header,
        now_ms: u64,
        init: impl FnOnce(&mut AutoCommit, Hlc, &ActorId) -> Result<()>,
    ) -> Result<Vec<Output<P>>> {
        if self.docs.contains_key(&id) || self.unloaded.contains_key(&id) {
            return Err(Error::DocumentExists(id));
        }
        let mut doc = AutoCommit::new().with_actor(self.actor.clone());
        let at = self.clock.now(now_ms);
        header.write(&mut doc)?;
        init(&mut doc, at, &self.actor)?;
        doc.commit_with(CommitOptions::default().with_time(secs(now_ms)));
        let snapshot = doc.save();
        self.docs.insert(
            id,
            DocState {
                doc,
                header,
                journal: vec![snapshot.clone()],
                parked: VecDeque::new(),
                sessions: BTreeMap::new(),
                actors: [self.actor.clone()].into(),
                unchecked: None,
                versions: None,
                paths: Default::default(),
                devices: Default::default(),
            },
        );
        Ok(vec![Output::PersistChunk {
            doc: id,
            kind: ChunkKind::Snapshot,
            bytes: snapshot,
        }])
    }

    /// Unloads a document, dropping its sessions.
    pub fn remove_document(&mut self, id: DocId) -> bool {
        if self.unloaded.remove(&id).is_some() {
            return true;
        }
        let Some(ds) = self.docs.remove(&id) else {
            return false;
        };
        for (peer, session) in ds.sessions {
            if let Some(at) = session.scheduled {
                self.timers.remove(&(at, id, peer));
            }
        }
        true
    }

    /// Takes a session out of its document, with its timer entry.
    fn take_session(&mut self, doc: DocId, peer: &P) -> Option<SyncSession> {
        let mut session = self.docs.get_mut(&doc)?.sessions.remove(peer)?;
        if let Some(at) = session.scheduled.take() {
            self.timers.remove(&(at, doc, peer.clone()));
        }
        Some(session)
    }

    /// Moves the timer entries of `doc`'s sessions to their current deadlines. Called
    /// at the end of every call that may have changed one.
    fn reschedule(&mut self, doc: DocId) {
        let Some(ds) = self.docs.get_mut(&doc) else {
            return;
        };
        let retry = self.config.retry_after_ms;
        for (peer, session) in ds.sessions.iter_mut() {
            let want = session.deadline(retry);
            if session.scheduled == want {
                continue;
            }
            if let Some(at) = session.scheduled {
                self.timers.remove(&(at, doc, peer.clone()));
            }
            if let Some(at) = want {
                self.timers.insert((at, doc, peer.clone()));
            }
            session.scheduled = want;
        }
    }

    /// Starts tracking a document known only by id, before any of its content
    /// has arrived (e.g. one shared with this home): it is filled by the first
    /// sync session. Until the header arrives, frames carry `epoch`.
    pub fn expect_document(&mut self, id: DocId, kind: DocKind, owner_home: &str, epoch: KeyEpoch) {
        if self.unloaded.contains_key(&id) {
            return;
        }
        self.docs.entry(id).or_insert_with(|| DocState {
            doc: AutoCommit::new().with_actor(self.actor.clone()),
            header: Header::new(kind, owner_home, epoch),
            journal: Vec::new(),
            parked: VecDeque::new(),
            sessions: BTreeMap::new(),
            actors: BTreeSet::new(),
            unchecked: None,
            versions: None,
            paths: Default::default(),
            devices: Default::default(),
        });
    }

    // ----- local writes ------------------------------------------------------

    /// Runs `f` as one local change (rolled back if it fails), then persists
    /// and pushes the result. This is the extension point for document kinds
    /// whose views live elsewhere.
    pub fn transact<R>(
        &mut self,
        id: DocId,
        now_ms: u64,
        correlation_id: Option<String>,
        f: impl FnOnce(&mut AutoCommit, Hlc, &ActorId) -> Result<R>,
    ) -> Result<(R, Vec<Output<P>>)> {
        let at = self.clock.now(now_ms);
        let actor = self.actor.clone();
        let ds = self.docs.get_mut(&id).ok_or(Error::UnknownDocument(id))?;
        let result = match f(&mut ds.doc, at, &actor) {
            Ok(r) => r,
            Err(e) => {
                ds.doc.rollback();
                return Err(e);
            }
        };
        let committed = ds
            .doc
            .commit_with(CommitOptions::default().with_time(secs(now_ms)));
        if committed.is_none() {
            return Ok((result, Vec::new()));
        }
        ds.actors.insert(actor.clone());
        let out = self.finish_local(id, actor, correlation_id, now_ms)?;
        Ok((result, out))
    }

    /// Persists and pushes what a local change (committed or applied to `id` just now
    /// by `actor`) added since the last save, and reports the change.
    fn finish_local(
        &mut self,
        id: DocId,
        actor: ActorId,
        correlation_id: Option<String>,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let mut out = Vec::new();
        let ds = self.docs.get_mut(&id).ok_or(Error::UnknownDocument(id))?;
        ds.actors.insert(actor);
        let bytes = ds.doc.save_incremental();
        note_local_write(ds, &bytes);
        note_versions(ds, &bytes);
        let heads = ds.doc.get_heads();
        let epoch = ds.header.key_epoch;
        // Fan out before recording, so the journal's copy can take the bytes.
        let peers: Vec<P> = ds.sessions.keys().cloned().collect();
        let mut pushed: Option<Vec<ChangeHash>> = None;
        for peer in peers {
            let Some(session) = ds.sessions.get_mut(&peer) else {
                continue;
            };
            if session.in_sync && bytes.len() <= self.config.max_push_bytes {
                // The session's next message does not offer these changes again: the
                // confirmation round after a push would otherwise carry the push a second
                // time. A peer that dropped the push asks for a change by hash (`need`),
                // which empties this set again (receive.rs).
                let hashes = pushed.get_or_insert_with(|| {
                    parse_changes(&bytes, usize::MAX)
                        .map(|changes| changes.iter().map(Change::hash).collect())
                        .unwrap_or_default()
                });
                session.state.sent_hashes.extend(hashes.iter().copied());
                out.push(Output::Send {
                    peer: peer.clone(),
                    frame: Frame::Push(Push {
                        doc: id,
                        epoch,
                        correlation_id: correlation_id.clone(),
                        bytes: bytes.clone(),
                    }),
                });
                self.stats.pushes_sent += 1;
                schedule_confirm(session, now_ms, &self.config, &mut out);
            } else {
                session.in_sync = false;
                generate_into(
                    id,
                    epoch,
                    &peer,
                    &mut ds.doc,
                    session,
                    now_ms,
                    &self.config,
                    &mut self.stats,
                    &mut out,
                    false,
                );
            }
        }
        out.push(Output::Changed {
            doc: id,
            origin: Origin::Local,
            correlation_id,
            heads,
            schema_error: None,
        });
        record_chunk(id, ds, bytes, &self.config, &mut self.stats, &mut out);
        self.reschedule(id);
        Ok(out)
    }

    /// Starts a new key epoch for `doc`: records it in the header, in a change that (like
    /// every push and sync message of the document from then on) carries `epoch`, so a
    /// peer without the new key opens nothing written from here. The caller detaches the
    /// peers that lose access first, and hands the new key to the ones that keep it
    /// before this change reaches them.
    pub fn set_key_epoch(
        &mut self,
        doc: DocId,
        epoch: KeyEpoch,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let mut header = self.header(doc)?.clone();
        let old = header.key_epoch;
        header.key_epoch = epoch;
        if let Some(ds) = self.docs.get_mut(&doc) {
            ds.header.key_epoch = epoch;
        }
        let written = self.transact(doc, now_ms, None, |d, _, _| header.write(d));
        if written.is_err()
            && let Some(ds) = self.docs.get_mut(&doc)
        {
            ds.header.key_epoch = old;
        }
        Ok(written?.1)
    }

    // ----- sessions ----------------------------------------------------------

    /// Connects `peer` to `doc`: opens (or reopens, as after a reconnect) the
    /// session and returns its opening message. `saved` is a state from
    /// [`Output::PersistSyncState`]; unreadable bytes are an error and attach
    /// nothing, so the caller can retry with `None`.
    pub fn attach(
        &mut self,
        peer: P,
        doc: DocId,
        saved: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        if !self.docs.contains_key(&doc) {
            return Err(self.missing(doc));
        }
        let mut session = match saved {
            Some(bytes) => {
                let resumed = SyncSession::resume(bytes)
                    .map_err(|reason| Error::SyncState { doc, reason })?;
                self.take_session(doc, &peer);
                resumed
            }
            None => match self.take_session(doc, &peer) {
                // A reconnect: keep what the old connection learnt.
                Some(mut old) => {
                    old.restart();
                    old.in_sync = false;
                    old
                }
                None => SyncSession::new(),
            },
        };
        let ds = self.docs.get_mut(&doc).ok_or(Error::UnknownDocument(doc))?;
        let mut out = Vec::new();
        let epoch = ds.header.key_epoch;
        generate_into(
            doc,
            epoch,
            &peer,
            &mut ds.doc,
            &mut session,
            now_ms,
            &self.config,
            &mut self.stats,
            &mut out,
            false,
        );
        ds.sessions.insert(peer, session);
        self.reschedule(doc);
        Ok(out)
    }

    /// Connects `peer` to `doc` when a digest exchange has shown that both hold the same
    /// heads: the session starts in sync, so live pushes flow at once, and no sync message
    /// is sent. This is what keeps a reconnect where nothing changed at one round trip.
    pub fn attach_in_sync(&mut self, peer: P, doc: DocId, saved: Option<&[u8]>) -> Result<()> {
        if self.unloaded.contains_key(&doc) {
            return self.attach_unloaded_in_sync(peer, doc);
        }
        if !self.docs.contains_key(&doc) {
            return Err(Error::UnknownDocument(doc));
        }
        let mut session = match saved {
            Some(bytes) => {
                let resumed = SyncSession::resume(bytes)
                    .map_err(|reason| Error::SyncState { doc, reason })?;
                self.take_session(doc, &peer);
                resumed
            }
            None => self
                .take_session(doc, &peer)
                .unwrap_or_else(SyncSession::new),
        };
        let ds = self.docs.get_mut(&doc).ok_or(Error::UnknownDocument(doc))?;
        let heads = ds.doc.get_heads();
        session.state.shared_heads = heads.clone();
        session.state.last_sent_heads = heads;
        session.in_sync = true;
        session.awaiting_since = None;
        session.kick_at = None;
        // Confirmation rounds already due stay due, as they were before.
        ds.sessions.insert(peer, session);
        self.reschedule(doc);
        Ok(())
    }

    /// Disconnects `peer` from `doc`, returning the state to persist.
    pub fn detach(&mut self, peer: &P, doc: DocId) -> Option<Vec<u8>> {
        if let Some(u) = self.unloaded.get_mut(&doc) {
            return u.sessions.remove(peer).map(|s| s.state);
        }
        let ds = self.docs.get_mut(&doc)?;
        ds.parked.retain(|p| &p.from != peer);
        self.take_session(doc, peer).map(|s| s.encode())
    }

    /// Disconnects `peer` from every document, returning the states to persist.
    pub fn detach_peer(&mut self, peer: &P) -> Vec<(DocId, Vec<u8>)> {
        let ids: Vec<DocId> = self.documents().collect();
        ids.into_iter()
            .filter_map(|d| self.detach(peer, d).map(|s| (d, s)))
            .collect()
    }

    /// Whether `peer`'s session for `doc` is in sync (pushes go straight to it).
    pub fn is_in_sync(&self, peer: &P, doc: DocId) -> bool {
        if let Some(u) = self.unloaded.get(&doc) {
            return u.sessions.get(peer).is_some_and(|s| s.in_sync);
        }
        self.docs
            .get(&doc)
            .and_then(|d| d.sessions.get(peer))
            .is_some_and(|s| s.in_sync)
    }

    /// One document's sessions, its parked pushes and whether it is loaded, for test
    /// diagnostics.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn debug_sessions_of(&mut self, id: DocId) -> String {
        if let Some(ds) = self.docs.get_mut(&id) {
            return describe_sessions(id, ds);
        }
        match self.unloaded.get(&id) {
            Some(u) => format!(
                "{id}: unloaded, dormant sessions {:?}",
                u.sessions
                    .iter()
                    .map(|(p, d)| (p, d.in_sync))
                    .collect::<Vec<_>>()
            ),
            None => format!("{id}: unknown"),
        }
    }

    /// Session bookkeeping, for harness diagnostics.
    #[cfg(any(test, feature = "harness"))]
    pub(crate) fn debug_sessions(&mut self) -> String {
        let mut text = format!(
            "docs={} deadline={:?}\n",
            self.docs.len(),
            self.next_deadline()
        );
        for (id, ds) in self.docs.iter_mut() {
            text.push_str(&describe_sessions(*id, ds));
        }
        text
    }

    /// Earliest time at which [`Engine::tick`] has work, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.first().map(|(at, _, _)| *at)
    }

    /// Runs due timers: confirmation rounds, restarts of stalled exchanges,
    /// and opening messages of sessions that were reset.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Output<P>> {
        let mut out = Vec::new();
        let mut due = Vec::new();
        while self.timers.first().is_some_and(|(at, _, _)| *at <= now_ms) {
            if let Some((_, doc, peer)) = self.timers.pop_first() {
                due.push((doc, peer));
            }
        }
        // Document order, then peer order, as a scan over every session would run.
        due.sort();
        for (id, peer) in &due {
            let Some(ds) = self.docs.get_mut(id) else {
                continue;
            };
            let epoch = ds.header.key_epoch;
            let Some(session) = ds.sessions.get_mut(peer) else {
                continue;
            };
            session.scheduled = None;
            let retry = session.retry_delay(self.config.retry_after_ms);
            let overdue = session
                .awaiting_since
                .is_some_and(|t| now_ms >= t.saturating_add(retry));
            let confirm = session.confirm_at.is_some_and(|t| now_ms >= t);
            let kick = session.kick_at.is_some_and(|t| now_ms >= t);
            if !(overdue || confirm || kick) {
                continue;
            }
            if overdue {
                self.stats.session_restarts += 1;
                session.unanswered = session.unanswered.saturating_add(1);
                session.restart();
            }
            if confirm {
                session.confirm_at = None;
            }
            if kick {
                session.kick_at = None;
            }
            generate_into(
                *id,
                epoch,
                peer,
                &mut ds.doc,
                session,
                now_ms,
                &self.config,
                &mut self.stats,
                &mut out,
                false,
            );
        }
        let mut docs: Vec<DocId> = due.into_iter().map(|(doc, _)| doc).collect();
        docs.dedup();
        for doc in docs {
            self.reschedule(doc);
        }
        out
    }
}

/// Automerge commit times are seconds.
fn secs(now_ms: u64) -> i64 {
    i64::try_from(now_ms / 1000).unwrap_or(i64::MAX)
}

/// The collection map of a kind whose entries grow with the home's documents, and which
/// is therefore validated by the entries written rather than whole.
fn collection_of(kind: DocKind) -> Option<&'static [&'static str]> {
    match kind {
        DocKind::Home => Some(&home::KEYRING_PATH),
        DocKind::Registry => Some(&registry::ENTITIES_PATH),
        _ => None,
    }
}

/// What `changes` (encoded changes back to back, as `save_incremental` writes them)
/// wrote under the collection map at `path`.
fn touched_by(doc: &AutoCommit, changes: &[u8], path: &[&str]) -> Touched {
    match crate::chunks::parse_changes(changes, usize::MAX) {
        Ok(changes) => touched_entries(doc, &changes, path),
        Err(_) => Touched::Everything,
    }
}

/// Appends the changes in `bytes` (the chunk just saved) to an entity
/// document's version log.
fn note_versions<P>(ds: &mut DocState<P>, bytes: &[u8]) {
    if ds.header.kind != DocKind::Entity {
        return;
    }
    let fresh = parse_changes(bytes, usize::MAX).unwrap_or_default();
    let log = ds.versions.get_or_insert_with(VersionLog::default);
    let doc = &mut ds.doc;
    // A panic here would leave only the log behind; it is rebuilt on demand.
    if catch(|| log.catch_up(doc, &fresh)).is_err() {
        ds.versions = None;
    }
}

/// Remembers which collection entries a local change wrote, so the next validation of a
/// home or registry document checks them too.
fn note_local_write<P>(ds: &mut DocState<P>, bytes: &[u8]) {
    let Some((kind, touched)) = &mut ds.unchecked else {
        return;
    };
    let Some(path) = collection_of(*kind) else {
        return;
    };
    if !matches!(touched, Touched::Everything) {
        touched.merge(touched_by(&ds.doc, bytes, path));
    }
}

/// Appends a chunk to the journal and the persist outputs, compacting the
/// journal into a snapshot once it grows long.
fn record_chunk<P>(
    id: DocId,
    ds: &mut DocState<P>,
    bytes: Vec<u8>,
    config: &EngineConfig,
    stats: &mut EngineStats,
    out: &mut Vec<Output<P>>,
) {
    if bytes.is_empty() {
        return;
    }
    ds.journal.push(bytes.clone());
    out.push(Output::PersistChunk {
        doc: id,
        kind: ChunkKind::Incremental,
        bytes,
    });
    if ds.journal.len() > config.compact_after_chunks {
        let doc = &mut ds.doc;
        if let Ok(snapshot) = catch(|| doc.save()) {
            stats.compactions += 1;
            ds.journal = vec![snapshot.clone()];
            out.push(Output::PersistChunk {
                doc: id,
                kind: ChunkKind::Snapshot,
                bytes: snapshot,
            });
        }
    }
}

/// A document's heads, parked pushes and every session's bookkeeping, one line each.
#[cfg(any(test, feature = "harness", feature = "test-hooks"))]
fn describe_sessions<P: std::fmt::Debug>(id: DocId, ds: &mut DocState<P>) -> String {
    let short = |h: &[ChangeHash]| {
        h.iter()
            .map(|x| x.to_string()[..6].to_string())
            .collect::<Vec<_>>()
    };
    let heads = ds.doc.get_heads();
    let mut text = format!(
        "{id}: heads {:?}, parked {}\n",
        short(&heads),
        ds.parked.len()
    );
    for (peer, s) in &ds.sessions {
        text.push_str(&format!(
            "  {peer:?}: in_sync={} awaiting={:?} confirm={:?} kick={:?} scheduled={:?} unanswered={} their={:?} shared={:?} in_flight={} last_sent={:?} sent_hashes={}\n",
            s.in_sync,
            s.awaiting_since,
            s.confirm_at,
            s.kick_at,
            s.scheduled,
            s.unanswered,
            s.state.their_heads.as_deref().map(short),
            short(&s.state.shared_heads),
            s.state.in_flight,
            short(&s.state.last_sent_heads),
            s.state.sent_hashes.len(),
        ));
    }
    text
}

fn schedule_confirm<P>(
    session: &mut SyncSession,
    now_ms: u64,
    config: &EngineConfig,
    out: &mut Vec<Output<P>>,
) {
    if session.confirm_at.is_none() {
        let at = now_ms.saturating_add(config.confirm_after_ms);
        session.confirm_at = Some(at);
        out.push(Output::Timer { at_ms: at });
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use automerge::sync::{ChunkList, Message, MessageVersion};
    use serde_json::json;

    use super::*;
    use crate::harness::Net;
    use crate::schema::entity::EntityUpdate;
    use crate::wire::SyncMessage;

    const DOC: DocId = DocId::from_bytes([43; 16]);
    const EPOCH: KeyEpoch = KeyEpoch::first([0; 16]);

    fn update(state: &str, attrs: serde_json::Value) -> EntityUpdate {
        EntityUpdate {
            state: state.into(),
            attributes: match attrs {
                serde_json::Value::Object(m) => Some(m),
                _ => None,
            },
        }
    }

    fn synced(n: usize, config: EngineConfig) -> Net {
        let mut net = Net::new(n, 11, config);
        net.share_entity(DOC);
        net.run_until_quiet(10_000);
        net
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn uleb(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    /// An Automerge chunk of `chunk_type` around `body` (the checksum is never
    /// reached: the chunk is refused on its header).
    fn chunk(chunk_type: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, chunk_type];
        uleb(body.len() as u64, &mut out);
        out.extend_from_slice(body);
        out
    }

    /// A document chunk with one deflated change column holding `deflated`.
    fn document_with_column(deflated: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 0, 1];
        // Column 0, of type 0, with the deflate bit.
        uleb(0b1000, &mut body);
        uleb(deflated.len() as u64, &mut body);
        body.push(0);
        body.extend_from_slice(deflated);
        chunk(0, &body)
    }

    fn sync_carrying(heads: Vec<ChangeHash>, chunks: Vec<Vec<u8>>) -> Frame {
        let bytes = Message {
            heads,
            need: Vec::new(),
            have: Vec::new(),
            changes: ChunkList::from(chunks),
            flags: None,
            version: MessageVersion::V1,
        }
        .encode();
        Frame::Sync(SyncMessage {
            doc: DOC,
            epoch: EPOCH,
            expects_reply: true,
            bytes,
        })
    }

    fn push_of(bytes: Vec<u8>) -> Frame {
        Frame::Push(Push {
            doc: DOC,
            epoch: EPOCH,
            correlation_id: None,
            bytes,
        })
    }

    /// The bytes of node `i`'s push after writing `u`.
    fn write_push(net: &mut Net, i: usize, u: &EntityUpdate) -> Vec<u8> {
        let now = net.now_ms;
        net.nodes[i]
            .update_entity(DOC, u, now, None)
            .unwrap()
            .into_iter()
            .find_map(|o| match o {
                Output::Send {
                    frame: Frame::Push(p),
                    ..
                } => Some(p.bytes),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn a_real_compressed_change_in_a_sync_message_is_refused() {
        let mut net = synced(2, EngineConfig::default());
        // A change big enough that Automerge compresses it when asked for
        // `Change::bytes`: the form another implementation could send.
        let big = update("on", json!({ "note": "la ".repeat(400) }));
        write_push(&mut net, 1, &big);
        let mut change = net.nodes[1]
            .doc_for_read_mut(DOC)
            .unwrap()
            .get_last_local_change()
            .unwrap();
        let compressed = change.bytes().into_owned();
        assert_eq!(compressed[8], 2, "automerge compressed the change");
        let heads = net.nodes[1].heads(DOC).unwrap();
        let before = net.nodes[0].heads(DOC).unwrap();

        let frame = sync_carrying(heads, vec![compressed.clone()]);
        let err = payload_actors(&frame, &EngineConfig::default()).unwrap_err();
        assert!(
            matches!(err, Error::Compressed { chunk_type: 2, .. }),
            "{err}"
        );
        let err = net.nodes[0].receive(1, frame, net.now_ms).unwrap_err();
        assert!(
            matches!(err, Error::Compressed { chunk_type: 2, .. }),
            "{err}"
        );
        let stats = net.nodes[0].stats();
        assert_eq!(stats.compressed_refused, 1);
        assert_eq!(stats.session_resets, 1);
        assert_eq!(stats.panics_caught, 0);
        assert_eq!(net.nodes[0].heads(DOC).unwrap(), before);

        // The same chunk in a push is refused the same way.
        let err = net.nodes[0]
            .receive(1, push_of(compressed), net.now_ms)
            .unwrap_err();
        assert!(matches!(err, Error::Compressed { .. }), "{err}");
        assert_eq!(net.nodes[0].stats().compressed_refused, 2);

        // The uncompressed change still arrives through the reset session.
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        assert_eq!(net.nodes[0].entity(DOC).unwrap().state, "on");
    }

    #[test]
    fn a_deflate_bomb_in_a_small_frame_is_refused_without_inflating() {
        let mut net = synced(2, EngineConfig::default());
        let bomb = deflate(&vec![0; 4 << 20]);
        let frame = sync_carrying(Vec::new(), vec![chunk(2, &bomb)]);
        let Frame::Sync(s) = &frame else {
            unreachable!()
        };
        assert!(s.bytes.len() <= 64 * 1024, "{} bytes", s.bytes.len());
        let err = net.nodes[0].receive(1, frame, net.now_ms).unwrap_err();
        assert!(
            matches!(err, Error::Compressed { chunk_type: 2, .. }),
            "{err}"
        );
        // A bundle is refused on its header as well, and so is a compressed
        // chunk behind an ordinary change in the same entry.
        let own = write_push(&mut net, 1, &update("x", json!({})));
        let mut behind = own.clone();
        behind.extend(chunk(2, &bomb));
        for chunks in [vec![chunk(3, &bomb)], vec![behind]] {
            let frame = sync_carrying(Vec::new(), chunks);
            let err = net.nodes[0].receive(1, frame, net.now_ms).unwrap_err();
            assert!(matches!(err, Error::Compressed { .. }), "{err}");
        }
        let stats = net.nodes[0].stats();
        assert_eq!(stats.compressed_refused, 3);
        assert_eq!(stats.session_resets, 3);
        assert_eq!(stats.panics_caught, 0);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
    }

    #[test]
    fn a_document_whose_columns_inflate_past_the_cap_is_refused() {
        let config = EngineConfig {
            max_decoded_frame_bytes: 1 << 20,
            ..EngineConfig::default()
        };
        let mut net = synced(2, config.clone());
        let bomb = document_with_column(&deflate(&vec![0; 4 << 20]));
        let frame = sync_carrying(Vec::new(), vec![bomb]);
        let err = payload_actors(&frame, &config).unwrap_err();
        assert!(
            matches!(err, Error::TooLarge { cap, .. } if cap == 1 << 20),
            "{err}"
        );
        let err = net.nodes[0].receive(1, frame, net.now_ms).unwrap_err();
        assert!(
            matches!(
                err,
                Error::TooLarge {
                    what: "sync message once decoded",
                    ..
                }
            ),
            "{err}"
        );
        let stats = net.nodes[0].stats();
        assert_eq!((stats.oversized, stats.session_resets), (1, 1));
        assert_eq!(stats.panics_caught, 0);
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
    }

    /// Automerge's own `save()` deflates columns over 256 bytes, and a peer
    /// far behind is sent exactly that: it must still catch up.
    #[test]
    fn a_catch_up_with_deflated_columns_still_converges() {
        let mut net = Net::new(2, 12, EngineConfig::default());
        let first = update("off", json!({ "note": "la ".repeat(2000) }));
        let out = net.nodes[0]
            .create_entity(DOC, "home-1", EPOCH, "light.big", &first, 1)
            .unwrap();
        net.absorb(0, out);
        for i in 0..20 {
            net.edit(0, DOC, &update(&format!("s{i}"), json!({})), None);
        }
        let saved = net.nodes[0].doc_for_read_mut(DOC).unwrap().save();
        let body_start = 9 + crate::chunks::read_uleb(&saved[9..]).unwrap().1;
        assert!(
            crate::chunks::document_decoded_len(&saved[body_start..], usize::MAX).unwrap()
                > saved.len(),
            "the saved document has deflated columns"
        );
        net.nodes[1].expect_document(DOC, DocKind::Entity, "home-1", EPOCH);
        for (a, b) in [(0, 1), (1, 0)] {
            let out = net.nodes[a].attach(b, DOC, None, net.now_ms).unwrap();
            net.absorb(a, out);
        }
        net.run_until_quiet(10_000);
        net.assert_converged(DOC);
        let stats = net.nodes[1].stats();
        assert_eq!((stats.compressed_refused, stats.oversized), (0, 0));
        assert_eq!(net.nodes[1].entity(DOC).unwrap().state, "s19");
    }

    #[test]
    fn growth_in_one_step_is_capped() {
        let config = EngineConfig {
            max_growth_per_step_bytes: 2048,
            ..EngineConfig::default()
        };
        let mut net = synced(2, config);
        // A normal write fits.
        let small = write_push(&mut net, 1, &update("on", json!({})));
        let applied = net.nodes[0].stats().pushes_applied;
        net.nodes[0].receive(1, push_of(small), net.now_ms).unwrap();
        assert_eq!(net.nodes[0].stats().pushes_applied, applied + 1);
        assert_eq!(net.nodes[0].entity(DOC).unwrap().state, "on");

        // One that would add more than the cap in one step does not, pushed
        // or synced.
        let before = net.nodes[0].heads(DOC).unwrap();
        let big = write_push(
            &mut net,
            1,
            &update("big", json!({ "note": "x".repeat(4096) })),
        );
        assert!(big.len() > 2048);
        let err = net.nodes[0]
            .receive(1, push_of(big.clone()), net.now_ms)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::TooLarge {
                    what: "growth of a document in one step",
                    cap: 2048,
                    ..
                }
            ),
            "{err}"
        );
        let heads = net.nodes[1].heads(DOC).unwrap();
        let err = net.nodes[0]
            .receive(1, sync_carrying(heads, vec![big]), net.now_ms)
            .unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
        assert_eq!(net.nodes[0].stats().oversized, 2);
        assert_eq!(net.nodes[0].heads(DOC).unwrap(), before);
        assert_eq!(net.nodes[0].stats().panics_caught, 0);
    }

    #[test]
    fn ops_per_frame_are_capped() {
        let config = EngineConfig {
            max_ops_per_frame: 8,
            ..EngineConfig::default()
        };
        let mut net = synced(2, config);
        let attrs: serde_json::Map<String, serde_json::Value> =
            (0..20).map(|i| (format!("a{i}"), json!(i))).collect();
        let many = write_push(
            &mut net,
            1,
            &update("many", serde_json::Value::Object(attrs)),
        );
        let err = net.nodes[0]
            .receive(1, push_of(many), net.now_ms)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::TooLarge {
                    what: "ops in a push",
                    cap: 8,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(net.nodes[0].stats().oversized, 1);
    }
}
