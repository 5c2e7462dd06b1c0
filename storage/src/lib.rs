//! `hearth-storage`: Hearth's local store, encrypted at rest.
//!
//! # Shape
//!
//! - [`Store`] is a narrow key-value trait over typed [`Keyspace`]s: get, put, delete, prefix [`Scan`], atomic
//!   [`Batch`] and flush. Two backends implement it: [`SledStore`] (sled 0.34.7, one tree, keys prefixed with a
//!   keyspace tag byte) and [`MemStore`] (a `BTreeMap`, for tests). The trait is kept small so that redb could
//!   replace sled.
//! - [`Sealed`] wraps any store and seals every value with XChaCha20-Poly1305 under the store key.
//! - [`StoreHandle`] runs a store on one dedicated thread (sled blocks) and gives async callers a cheap,
//!   cloneable handle over a bounded channel.
//! - [`open`] assembles all three for a node's data dir.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hearth_storage::Error> {
//! use hearth_storage::{Keyspace, KeySource};
//!
//! let store = hearth_storage::open(std::path::Path::new("/var/lib/hearth"), KeySource::KeyFile)?;
//! store.put(Keyspace::Meta, "device.name", "kitchen").await?; // returns once flushed
//! assert_eq!(store.get(Keyspace::Meta, "device.name").await?.as_deref(), Some(&b"kitchen"[..]));
//! store.close().await?;
//! # Ok(()) }
//! ```
//!
//! # Durability contract
//!
//! **A write acknowledged to its caller has been flushed.** Writes (`put`, `delete`, `batch`) are
//! group-committed: the storage thread applies every write waiting in its queue (up to [`MAX_GROUP_COMMIT`]),
//! flushes once, and only then answers all of them. Under load many writers share one flush; alone, a writer
//! pays for one flush. A batch is atomic: after a crash all of it or none of it is present. If the flush fails,
//! every write of that group gets the error: those writes may already be visible to reads, but are not known to
//! be durable. Reads are answered after the writes queued before them were
//! flushed, so they never return data that is not yet durable. Writes are applied in the order they entered the
//! queue, and a write is answered no earlier than every write queued before it: a caller whose batches depend on
//! one another queues them in order with [`StoreHandle::queue_batch`] (tasks that each call `batch` reach the
//! queue in whatever order they run).
//!
//! **A failing store latches, refuses writes, and recovers by itself.** The first I/O failure (a full disk,
//! say) sets the handle's [`Health`] to failed and logs one error line. From then on writes are refused with
//! [`Error::Failed`] before they are applied; reads still go to the store. sled itself latches its first I/O
//! error and fails every later call until the database is reopened, so the storage thread drops the database
//! and reopens it, with backoff from [`FIRST_RETRY`] up to [`MAX_RETRY_INTERVAL`], until a probe write flushes;
//! then the health goes back to ok. Every request a handle makes is bounded by [`REQUEST_TIMEOUT`]
//! ([`Error::Timeout`]), so a hung disk cannot hang its callers.
//!
//! What "flushed" buys depends on sled 0.34.7, which calls itself beta:
//!
//! - **Process crash** (SIGKILL, panic, OOM kill): acknowledged writes survive. Flushed data is in the
//!   operating system, and the crash test in `tests/crash.rs` kills a writer 50 times and checks every
//!   acknowledged record and every batch's atomicity after each kill.
//! - **Power loss or kernel crash**: sled's flush writes its log with `sync_file_range` on Linux (sled #1452),
//!   which neither flushes the drive's write cache nor persists a grown file size. [`SledStore`] therefore also
//!   calls `fdatasync` on sled's log file after every flush (on by default, see [`Options::sync_data`]). sled
//!   still never syncs the separate blob files it writes for values larger than about 128 KiB (missing fsyncs,
//!   sled #1077), so large values written shortly before a power cut may be lost or damaged; a damaged value then
//!   reads as an integrity error rather than as wrong data.
//! - **Damage on open**: sled 0.34.7 has reports of corruption on open after an abrupt stop (sled #1527, #1533).
//!   Such an open fails with [`Error::Corrupt`] naming the path (a panic inside sled is caught and reported the
//!   same way) instead of taking the node down.
//!
//! sled's own timed flush (`flush_every_ms`) is turned off, so nothing is durable before it is acknowledged, and
//! its page cache is bounded ([`Options::cache_capacity`], 64 MiB by default, instead of sled's 1 GiB).
//!
//! # On-disk format
//!
//! A data dir holds:
//!
//! - `store/`: the sled database. Every sled key is `keyspace tag (1 byte) ‖ key` (tags in [`Keyspace::tag`]);
//!   keys are **not** encrypted, so they must not carry secrets. Every value is sealed:
//!   `version 0x01 ‖ nonce (24 random bytes) ‖ XChaCha20-Poly1305 ciphertext ‖ tag (16)`, with associated data
//!   `"hearth-store/v1/record\0" ‖ keyspace tag ‖ key`. Swapping or moving values between keys or keyspaces, or
//!   flipping any bit, makes that one record fail with [`Error::Integrity`].
//! - One record is not sealed: key [`META_KEY`] in [`Keyspace::Meta`]. It is a JSON object, a newline, and the
//!   object's SHA-256 in hex. The object records the format version, the cipher, which key source created the
//!   store (`key_file`, `passphrase` or `ephemeral`), for a passphrase the Argon2id version, costs and 16-byte
//!   salt, and a key check value: the nonce and tag of an empty message sealed under the store key with
//!   associated data that covers the key source and KDF parameters. None of it is secret. A wrong key is caught
//!   at open by the check value ([`Error::WrongKey`]); bit rot in the record is caught by the checksum
//!   ([`Error::MetaCorrupt`]).
//! - `store.key`: the 32-byte store key as one line, `hearth-store-key-v1 <64 hex digits>`, created with mode
//!   0600 at first open, and refused if it becomes readable by others. Absent when a passphrase is used; then
//!   the key is Argon2id(passphrase, salt) with the costs recorded in the meta record.
//!
//! Keys and passphrases are wiped from memory on drop, and no error or `Debug` output contains a key, a
//! passphrase or a stored value.
//!
//! Not detected: a deleted record, or a record rolled back to an older sealed value of the same key.

#![deny(missing_docs)]

mod error;
mod handle;
mod keyfile;
mod keyspace;
mod mem;
mod sealed;
mod sled_store;
mod store;

use std::fmt;
use std::path::Path;

use zeroize::Zeroize;

pub use error::{Error, RecordKey};
pub use handle::{
    COMMAND_CHANNEL_CAPACITY, FIRST_RETRY, Health, MAX_GROUP_COMMIT, MAX_RETRY_INTERVAL, Queued,
    REQUEST_TIMEOUT, StoreHandle,
};
pub use keyspace::{DOC_ID_LEN, DocChunk, Keyspace};
pub use mem::MemStore;
pub use sealed::{KdfParams, META_KEY, SEAL_OVERHEAD, Sealed, Unlock};
pub use sled_store::{DEFAULT_CACHE_CAPACITY, SledStore};
pub use store::{
    Batch, BatchOp, DEFAULT_SCAN_LIMIT, Entry, MAX_BATCH_OPS, MAX_KEY_LEN, MAX_SCAN_LIMIT,
    MAX_VALUE_LEN, Scan, Store,
};

/// Name of the sled directory inside the data dir.
pub const STORE_DIR: &str = "store";
/// Name of the key file inside the data dir.
pub const KEY_FILE: &str = "store.key";

/// Where the store key comes from.
pub enum KeySource {
    /// `<data dir>/store.key`, created (mode 0600) when the store is new.
    KeyFile,
    /// A passphrase (the node reads it from `HEARTH_PASSPHRASE`); the key is derived with Argon2id.
    Passphrase(String),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::KeyFile => f.write_str("KeyFile"),
            KeySource::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
        }
    }
}

impl Drop for KeySource {
    fn drop(&mut self) {
        if let KeySource::Passphrase(passphrase) = self {
            passphrase.zeroize();
        }
    }
}

/// Tuning for [`open_with`]. The defaults suit a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Argon2id costs used when a passphrase store is created (existing stores use their recorded costs).
    pub kdf: KdfParams,
    /// sled's page cache, in bytes.
    pub cache_capacity: u64,
    /// `fdatasync` sled's log after each flush, so acknowledged writes also survive power loss (see the crate
    /// docs). Turning it off leaves only sled's own `sync_file_range`.
    pub sync_data: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            kdf: KdfParams::RECOMMENDED,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            sync_data: true,
        }
    }
}

/// Opens (or creates) the sealed store of data dir `dir`, with default [`Options`], on its own thread.
///
/// The database lives in `<dir>/store/`, the key file (when `key` is [`KeySource::KeyFile`]) in
/// `<dir>/store.key`. Fails with a message naming the path when the dir is unusable, held by another process
/// ([`Error::Locked`]), or opened with the wrong key ([`Error::WrongKey`]) or key source
/// ([`Error::KeySourceMismatch`]).
pub fn open(dir: &Path, key: KeySource) -> Result<StoreHandle, Error> {
    open_with(dir, key, &Options::default())
}

/// [`open`] with explicit [`Options`].
pub fn open_with(dir: &Path, key: KeySource, options: &Options) -> Result<StoreHandle, Error> {
    let store_dir = dir.join(STORE_DIR);
    let key_file = dir.join(KEY_FILE);
    let backend = SledStore::open(&store_dir, options.cache_capacity, options.sync_data)?;
    let unlock = match &key {
        KeySource::KeyFile => Unlock::KeyFile(&key_file),
        KeySource::Passphrase(passphrase) => Unlock::Passphrase {
            passphrase,
            kdf: options.kdf,
        },
    };
    let sealed = Sealed::open(backend, unlock, &store_dir)?;
    StoreHandle::spawn_at(sealed, &store_dir)
}

/// A sealed in-memory store under a random key, on its own thread: for tests of code that uses a store.
pub fn open_in_memory() -> Result<StoreHandle, Error> {
    let sealed = Sealed::open(MemStore::new(), Unlock::Ephemeral, Path::new("<memory>"))?;
    StoreHandle::spawn(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_OPTIONS: Options = Options {
        kdf: KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        },
        cache_capacity: 4 * 1024 * 1024,
        sync_data: true,
    };

    #[test]
    fn key_source_debug_redacts_the_passphrase() {
        let shown = format!("{:?}", KeySource::Passphrase("open sesame".to_owned()));
        assert_eq!(shown, "Passphrase(<redacted>)");
    }

    #[tokio::test]
    async fn open_lays_out_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with(dir.path(), KeySource::KeyFile, &TEST_OPTIONS).unwrap();
        store.put(Keyspace::Meta, "k", "v").await.unwrap();
        store.close().await.unwrap();
        assert!(dir.path().join(STORE_DIR).join("db").is_file());
        assert!(dir.path().join(KEY_FILE).is_file());

        let pass_dir = tempfile::tempdir().unwrap();
        let store = open_with(
            pass_dir.path(),
            KeySource::Passphrase("pw".to_owned()),
            &TEST_OPTIONS,
        )
        .unwrap();
        store.close().await.unwrap();
        assert!(!pass_dir.path().join(KEY_FILE).exists());
    }

    #[tokio::test]
    async fn a_held_store_is_refused_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let first = open_with(dir.path(), KeySource::KeyFile, &TEST_OPTIONS).unwrap();
        let err = open_with(dir.path(), KeySource::KeyFile, &TEST_OPTIONS).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err:?}");
        // close() joins the thread, so the lock is free the moment it returns.
        first.close().await.unwrap();
        let second = open_with(dir.path(), KeySource::KeyFile, &TEST_OPTIONS).unwrap();
        second.close().await.unwrap();
    }

    #[tokio::test]
    async fn in_memory_store_works_and_is_sealed() {
        let store = open_in_memory().unwrap();
        store.put(Keyspace::Outbox, vec![1u8], "m").await.unwrap();
        assert_eq!(
            store.scan(Keyspace::Outbox, Scan::all()).await.unwrap(),
            vec![(vec![1u8], b"m".to_vec())]
        );
        store.close().await.unwrap();
    }
}
