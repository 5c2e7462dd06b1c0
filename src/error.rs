//! The crate's error type.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The data dir could not be created or used.
    #[error(
        "cannot use data dir {path}: {source}; check that it exists and is writable, or pass --data"
    )]
    DataDir {
        /// The data dir.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Another node already runs on this data dir.
    #[error(
        "another Hearth node is already running with data dir {path} (it holds {path}/node.lock); \
         stop it first, or pass a different --data"
    )]
    AlreadyRunning {
        /// The data dir.
        path: PathBuf,
    },
    /// A file in the data dir could not be read or written.
    #[error("{what} {path}: {source}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file in the data dir holds something unexpected.
    #[error("{path} is corrupt: {detail}; remove it and restart the node to recreate it")]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A secret file in the data dir (the API token) can be read by other users.
    #[error(
        "{path} is open to other users (mode {mode:03o}); run `chmod 600 {path}` and try again"
    )]
    OpenToOthers {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The encrypted store failed.
    #[error(transparent)]
    Store(#[from] hearth_storage::Error),
    /// The stored device identity could not be decoded.
    #[error("device identity in the store is unreadable")]
    Identity(#[from] hearth_net::IdentityError),
    /// The network could not start.
    #[error("network: {0}")]
    Network(String),
    /// The local API could not bind its address.
    #[error(
        "cannot serve the local API on {addr}: {source}; is another program using it? pass --api 127.0.0.1:0 to pick a free port"
    )]
    ApiBind {
        /// The requested address.
        addr: SocketAddr,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A record in the store is not what this version of Hearth wrote.
    #[error("the stored {what} is unreadable: {detail}; restore the data dir from a backup")]
    CorruptRecord {
        /// Which record.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A request named something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A request was malformed or asked for something invalid.
    #[error("{0}")]
    Invalid(String),
    /// The caller may not do this (not the admin, read-only, not the owner).
    #[error("{0}")]
    Forbidden(String),
    /// The request conflicts with the current state (code used or expired, duplicate).
    #[error("{0}")]
    Conflict(String),
    /// Pairing with another device failed; the message says why and what to do.
    #[error("pairing failed: {0}")]
    Pairing(String),
    /// A document operation failed.
    #[error("document error: {0}")]
    Document(String),
    /// The node is shutting down or its core stopped.
    #[error("the node is not running")]
    Stopped,

    /// The lock's arbiter cannot be reached; nothing was granted.
    #[error("{0}")]
    ArbiterUnreachable(String),
    /// The store is failing (a full disk, say). With `applied`, the write is in memory and
    /// on peers but not durable on this device; without, it was refused before it applied.
    #[error("{detail}")]
    InsufficientStorage {
        /// Whether the write was applied (in memory, and sent to peers) despite the failure.
        applied: bool,
        /// What happened and what to do.
        detail: String,
    },
    /// The node cannot answer this yet (it is still loading what the answer needs); the
    /// message says what and to try again shortly.
    #[error("{0}")]
    Unavailable(String),
    /// The node did not answer a request within this many seconds.
    #[error("the node did not answer within {0} s; it may be overloaded or its disk hung")]
    Timeout(u64),
    /// An invariant of the node broke; the message says which.
    #[error("internal error: {0}")]
    Internal(String),
    /// A background task failed while the node shut down.
    #[error("node task failed during shutdown: {0}")]
    Task(String),
}
