//! The crate's single error type.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::keyspace::Keyspace;

/// Everything that can go wrong in `hearth-storage`.
///
/// Messages name the path, keyspace or record involved and say what to do. They never carry a store key, a
/// passphrase or a stored value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A sealed record failed authentication: it was modified on disk, or moved from another key or keyspace.
    #[error(
        "record {keyspace}/{key} failed its integrity check (it was modified or moved on disk); \
         delete it, or restore the data dir from a backup"
    )]
    Integrity {
        /// Keyspace of the damaged record.
        keyspace: Keyspace,
        /// Key of the damaged record.
        key: RecordKey,
    },

    /// The key file or passphrase does not open this store.
    #[error("wrong passphrase or key file for store at {}", path.display())]
    WrongKey {
        /// The store directory.
        path: PathBuf,
    },

    /// The store was created with another kind of key source than the one given.
    #[error("store at {} was created with {created_with}, but was opened with {given}; {hint}", path.display())]
    KeySourceMismatch {
        /// The store directory.
        path: PathBuf,
        /// How the store was created, e.g. "a key file".
        created_with: &'static str,
        /// What was given at open.
        given: &'static str,
        /// What to do about it.
        hint: &'static str,
    },

    /// The key file is missing, malformed or too widely readable.
    #[error("key file {}: {problem}", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },

    /// The store's unsealed meta record is missing or damaged.
    #[error(
        "the meta record of the store at {} is corrupt: {reason}; restore the data dir from a backup \
         (without a readable meta record the store cannot be opened)",
        path.display()
    )]
    MetaCorrupt {
        /// The store directory.
        path: PathBuf,
        /// What is wrong with the record.
        reason: String,
    },

    /// Another process (or another open in this process) holds the store.
    #[error(
        "store at {} is in use by another process; stop the other hearth node using this data dir, \
         or choose another one with --data",
        path.display()
    )]
    Locked {
        /// The store directory.
        path: PathBuf,
    },

    /// A file system operation failed.
    #[error("cannot {action} {}: {error}; {hint}", path.display())]
    Io {
        /// What was being done, e.g. "open" or "write".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error (shown in the message, so it is not also a `source`).
        error: io::Error,
        /// What to do about it.
        hint: &'static str,
    },

    /// The storage engine found damaged data files.
    #[error(
        "store at {} is corrupt: {detail}; restore the data dir from a backup, or move {} aside to \
         start with an empty store",
        path.display(),
        path.display()
    )]
    Corrupt {
        /// The store directory.
        path: PathBuf,
        /// What the engine reported.
        detail: String,
    },

    /// The storage engine failed in a way that is neither I/O nor corruption.
    #[error("storage engine error at {}: {detail}", path.display())]
    Backend {
        /// The store directory.
        path: PathBuf,
        /// What the engine reported.
        detail: String,
    },

    /// A key, value, batch or scan exceeds a size cap.
    #[error("{what} is {len} bytes or entries, above the limit of {max}")]
    TooLarge {
        /// Which thing is too large.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The cap.
        max: usize,
    },

    /// The key is reserved for the store's own meta record.
    #[error("key {key} in keyspace meta is reserved for the store itself; use another key")]
    ReservedKey {
        /// The reserved key.
        key: RecordKey,
    },

    /// An option or argument is invalid.
    #[error("invalid storage configuration: {reason}")]
    InvalidConfig {
        /// What is invalid and why.
        reason: String,
    },

    /// The operating system's random number generator failed.
    #[error("the system random number generator failed: {detail}")]
    Random {
        /// The generator's error.
        detail: String,
    },

    /// The storage thread could not be started.
    #[error("cannot start the storage thread: {error}")]
    Thread {
        /// The spawn error.
        error: io::Error,
    },

    /// The store has been closed, or its thread stopped.
    #[error(
        "the store is closed; reopen it (if it was not closed on purpose, its thread stopped after an internal error)"
    )]
    Closed,

    /// The storage thread panicked.
    #[error("the storage thread stopped after an internal error; restart the node")]
    Crashed,

    /// The store met an I/O failure and refuses writes until it has recovered (see
    /// [`StoreHandle::health`](crate::StoreHandle::health)); it retries by itself.
    #[error(
        "the store at {} failed ({reason}) and refuses writes until it recovers; it retries by itself, \
         so free disk space or fix the disk",
        path.display()
    )]
    Failed {
        /// The store directory.
        path: PathBuf,
        /// The failure that made the store refuse writes.
        reason: String,
    },

    /// The storage thread did not answer in time.
    #[error(
        "the storage thread did not answer a {what} within {} s; the disk may be hung (a write may still \
         complete later)",
        limit.as_secs()
    )]
    Timeout {
        /// What was asked, e.g. "write".
        what: &'static str,
        /// How long the caller waited.
        limit: std::time::Duration,
    },
}

impl Error {
    /// Builds an [`Error::Io`] whose hint follows from the error kind.
    pub(crate) fn io(action: &'static str, path: &Path, error: io::Error) -> Self {
        let hint = io_hint(error.kind());
        Error::Io {
            action,
            path: path.to_path_buf(),
            error,
            hint,
        }
    }

    /// Makes an equal copy, so one flush failure can be reported to every writer of a group commit.
    ///
    /// `io::Error` is not `Clone`; the copy keeps its kind and message.
    pub fn duplicate(&self) -> Self {
        match self {
            Error::Integrity { keyspace, key } => Error::Integrity {
                keyspace: *keyspace,
                key: key.clone(),
            },
            Error::WrongKey { path } => Error::WrongKey { path: path.clone() },
            Error::KeySourceMismatch {
                path,
                created_with,
                given,
                hint,
            } => Error::KeySourceMismatch {
                path: path.clone(),
                created_with,
                given,
                hint,
            },
            Error::KeyFile { path, problem } => Error::KeyFile {
                path: path.clone(),
                problem: problem.clone(),
            },
            Error::MetaCorrupt { path, reason } => Error::MetaCorrupt {
                path: path.clone(),
                reason: reason.clone(),
            },
            Error::Locked { path } => Error::Locked { path: path.clone() },
            Error::Io {
                action,
                path,
                error,
                hint,
            } => Error::Io {
                action,
                path: path.clone(),
                error: copy_io(error),
                hint,
            },
            Error::Corrupt { path, detail } => Error::Corrupt {
                path: path.clone(),
                detail: detail.clone(),
            },
            Error::Backend { path, detail } => Error::Backend {
                path: path.clone(),
                detail: detail.clone(),
            },
            Error::TooLarge { what, len, max } => Error::TooLarge {
                what,
                len: *len,
                max: *max,
            },
            Error::ReservedKey { key } => Error::ReservedKey { key: key.clone() },
            Error::InvalidConfig { reason } => Error::InvalidConfig {
                reason: reason.clone(),
            },
            Error::Random { detail } => Error::Random {
                detail: detail.clone(),
            },
            Error::Thread { error } => Error::Thread {
                error: copy_io(error),
            },
            Error::Closed => Error::Closed,
            Error::Crashed => Error::Crashed,
            Error::Failed { path, reason } => Error::Failed {
                path: path.clone(),
                reason: reason.clone(),
            },
            Error::Timeout { what, limit } => Error::Timeout {
                what,
                limit: *limit,
            },
        }
    }

    /// Whether this is a failure of the store itself (the disk, the engine), as opposed to a refused request
    /// (too large, reserved key) or a damaged record. Such a failure latches the store's health to failed.
    pub fn is_store_failure(&self) -> bool {
        matches!(
            self,
            Error::Io { .. }
                | Error::Corrupt { .. }
                | Error::Backend { .. }
                | Error::Failed { .. }
                | Error::Timeout { .. }
        )
    }
}

fn copy_io(error: &io::Error) -> io::Error {
    io::Error::new(error.kind(), error.to_string())
}

/// What a user can do about an I/O failure of a given kind.
pub(crate) fn io_hint(kind: io::ErrorKind) -> &'static str {
    use io::ErrorKind as K;
    match kind {
        K::PermissionDenied => {
            "check that the user running hearth owns this path and may read and write it"
        }
        K::StorageFull | K::QuotaExceeded => "the disk is full; free some space and try again",
        K::ReadOnlyFilesystem => {
            "the file system is read-only; choose a writable data dir with --data"
        }
        K::NotADirectory => {
            "part of the path is a file; move it away or choose another data dir with --data"
        }
        K::NotFound => "check that the path exists",
        _ => "check the path and the disk, then try again",
    }
}

/// A record key as shown in messages: quoted text when it is printable ASCII, hex otherwise.
///
/// Long keys are shortened. Keys are not secret in this store (only values are sealed), so naming them is safe.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordKey(Vec<u8>);

/// How many key bytes a message shows before it shortens the key.
const SHOWN_KEY_BYTES: usize = 64;

impl RecordKey {
    /// Wraps the raw key bytes.
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        RecordKey(key.into())
    }

    /// The raw key, e.g. to skip a damaged record with [`Scan::after`](crate::Scan::after).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(SHOWN_KEY_BYTES)];
        let more = if self.0.len() > SHOWN_KEY_BYTES {
            "..."
        } else {
            ""
        };
        let printable = !shown.is_empty() && shown.iter().all(|b| (0x20..0x7f).contains(b));
        if printable {
            write!(f, "\"{}{more}\"", String::from_utf8_lossy(shown))
        } else {
            write!(f, "0x{}{more}", hex::encode(shown))
        }
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_key_shows_text_or_hex() {
        assert_eq!(
            RecordKey::new(b"doc/abc".to_vec()).to_string(),
            "\"doc/abc\""
        );
        assert_eq!(RecordKey::new(vec![0u8, 0xff, 7]).to_string(), "0x00ff07");
        assert_eq!(RecordKey::new(Vec::new()).to_string(), "0x");
        let long = RecordKey::new(vec![b'a'; 100]).to_string();
        assert!(long.ends_with("...\""), "{long}");
        assert!(long.len() < 80, "{long}");
    }

    #[test]
    fn io_errors_say_what_to_do() {
        let full = Error::io(
            "write",
            Path::new("/data/store"),
            io::Error::from(io::ErrorKind::StorageFull),
        );
        let text = full.to_string();
        assert!(text.contains("/data/store"), "{text}");
        assert!(text.contains("free some space"), "{text}");

        let denied = Error::io(
            "open",
            Path::new("/data/store"),
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert!(
            denied.to_string().contains("may read and write"),
            "{denied}"
        );
        // The copy made for group-commit replies keeps kind and message.
        let copy = denied.duplicate();
        assert_eq!(copy.to_string(), denied.to_string());
        assert!(
            matches!(copy, Error::Io { error, .. } if error.kind() == io::ErrorKind::PermissionDenied)
        );
    }
}
