//! The crate's single error type.

use crate::ids::DocId;

/// Everything that can go wrong in `hearth-crdt`.
///
/// Input from outside the process (peers, disk) only ever produces one of these
/// values; no variant carries key material or document plaintext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A document failed schema validation; `path` names the offending field,
    /// e.g. `entity.attributes.brightness`.
    #[error("schema violation at `{path}`: {reason}")]
    Schema {
        /// Dotted path of the field, starting with the document kind.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A message or stored blob was larger than the configured cap.
    #[error("{what} is {len} bytes, over the cap of {cap} bytes")]
    TooLarge {
        /// Which kind of input was refused.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap in force.
        cap: usize,
    },
    /// A wire envelope could not be decoded.
    #[error("malformed wire envelope: {0}")]
    Wire(String),
    /// The envelope's version is not one this build understands.
    #[error("unsupported wire version {found} (this build speaks {supported})")]
    WireVersion {
        /// Version in the envelope.
        found: u8,
        /// Version this build writes.
        supported: u8,
    },
    /// A push payload did not contain well-formed Automerge changes.
    #[error("malformed change data for document {doc}: {reason}")]
    Changes {
        /// Document the push was for.
        doc: DocId,
        /// Parser's explanation.
        reason: String,
    },
    /// A sync message could not be decoded or applied; the session was reset.
    #[error("sync with document {doc} failed and the session was reset: {reason}")]
    Sync {
        /// Document whose session was reset.
        doc: DocId,
        /// Underlying cause.
        reason: String,
    },
    /// A push or sync message carried a compressed change chunk (type 2) or
    /// a bundle (type 3), which Automerge would inflate with no output limit.
    /// Refused on the chunk header, before anything was inflated; for a sync
    /// message the session was reset.
    #[error(
        "{what} for document {doc} carries a compressed chunk (type {chunk_type}); refused before inflating it"
    )]
    Compressed {
        /// Document the frame was for.
        doc: DocId,
        /// `push` or `sync message`.
        what: &'static str,
        /// The chunk type byte.
        chunk_type: u8,
    },
    /// A persisted sync state could not be decoded.
    #[error("stored sync state for document {doc} is unreadable: {reason}")]
    SyncState {
        /// Document the state belonged to.
        doc: DocId,
        /// Underlying cause.
        reason: String,
    },
    /// Automerge panicked inside a guarded call. The session was reset and the
    /// document rebuilt from its last good chunks.
    #[error("automerge panicked while handling document {doc} ({during}); session reset")]
    Panicked {
        /// Document being handled.
        doc: DocId,
        /// Which operation panicked.
        during: &'static str,
    },
    /// The document is not loaded in this engine.
    #[error("unknown document {0}")]
    UnknownDocument(DocId),
    /// The document is held but not loaded: its owner must read it from storage
    /// and hand it over ([`crate::Engine::finish_load`]) before using it.
    #[error("document {0} is not loaded")]
    NotLoaded(DocId),
    /// A document with this id is already loaded.
    #[error("document {0} already exists")]
    DocumentExists(DocId),
    /// Stored document bytes could not be loaded.
    #[error("cannot load document {doc}: {reason}")]
    Load {
        /// Document being loaded.
        doc: DocId,
        /// Underlying cause.
        reason: String,
    },
    /// A local write was rejected by Automerge.
    #[error("write to document {doc} failed: {reason}")]
    Write {
        /// Document written.
        doc: DocId,
        /// Underlying cause.
        reason: String,
    },
    /// Automerge refused a local operation.
    #[error("document operation failed: {0}")]
    Automerge(String),
    /// A remote timestamp was further ahead of the local clock than allowed.
    #[error("remote clock is {ahead_ms} ms ahead of ours, over the allowed drift of {max_ms} ms")]
    ClockDrift {
        /// How far ahead the remote timestamp was.
        ahead_ms: u64,
        /// Configured maximum.
        max_ms: u64,
    },
    /// A room join was refused because the room already has `max_size`
    /// members.
    #[error("room is full: it holds at most {max_size} members")]
    RoomFull {
        /// The room's member cap.
        max_size: u64,
    },
    /// The user is not a member of the room.
    #[error("`{user}` is not a member of this room")]
    NotMember {
        /// User named by the request.
        user: String,
    },
    /// A version id did not name exactly one version of the document.
    #[error("version `{version}`: {reason}")]
    Version {
        /// The id or prefix as given.
        version: String,
        /// Why it did not resolve.
        reason: &'static str,
    },
    /// A conflict resolution named a field without a pending conflict, or a
    /// candidate that does not exist.
    #[error("cannot resolve `{field}`: {reason}")]
    Conflict {
        /// Field named by the request, e.g. `attributes.brightness`.
        field: String,
        /// Why the resolution was refused.
        reason: String,
    },
    /// A local operation was refused because the document's current state
    /// does not allow it (e.g. a second handoff while one is pending).
    #[error("{what} refused: {reason}")]
    Refused {
        /// The operation.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A textual value (HLC, epoch) did not parse.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
}

impl Error {
    pub(crate) fn schema(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Schema {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
