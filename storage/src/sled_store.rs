//! The sled backend.

use std::fmt;
use std::fs::{self, File};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::keyspace::Keyspace;
use crate::store::{
    Batch, BatchOp, Entry, MAX_STORED_VALUE_LEN, Scan, Store, check_batch, check_sizes, full_key,
};

/// sled's page cache size unless told otherwise. sled's own default is 1 GiB, far too much for a home device.
pub const DEFAULT_CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// Text in sled's error when another open file description holds its lock.
const SLED_LOCK_MESSAGE: &str = "could not acquire lock";

/// How long a dropped store waits for sled to let go of its lock.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// A [`Store`] over one sled tree. Each key is prefixed with its keyspace's tag byte, so a single
/// `apply_batch` covers every keyspace atomically.
pub struct SledStore {
    /// `None` only between dropping the database and reopening it in [`Store::reopen`], when the reopen failed.
    db: Option<sled::Db>,
    path: PathBuf,
    cache_capacity: u64,
    sync_data: bool,
    /// sled's log file, kept open to `fdatasync` it after sled's own flush (see `flush`).
    sync_file: Option<File>,
    /// Declared last, so it is dropped after `db`.
    _release: ReleaseOnDrop,
}

/// Waits, when dropped, until sled's lock on its log file is free.
///
/// sled's background writer threads hold the log file for a moment after the last `Db` handle is dropped, so
/// without this wait a close followed at once by an open of the same directory can fail with "in use".
struct ReleaseOnDrop {
    db_file: PathBuf,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        wait_released(&self.db_file);
    }
}

/// Waits (at most [`RELEASE_WAIT`]) until nothing holds the lock on sled's log file.
fn wait_released(db_file: &Path) {
    let deadline = Instant::now() + RELEASE_WAIT;
    while Instant::now() < deadline {
        match File::open(db_file).map(|f| f.try_lock()) {
            // Got it (released again as `f` drops), or the file is gone: either way sled let go.
            Ok(Ok(())) | Err(_) => return,
            Ok(Err(_)) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

impl SledStore {
    /// Opens (or creates) the database in directory `path`.
    ///
    /// `cache_capacity` bounds sled's page cache in bytes. With `sync_data`, every [`Store::flush`] also calls
    /// `fdatasync` on sled's log file, which sled on Linux does not do (see the crate docs).
    pub fn open(path: &Path, cache_capacity: u64, sync_data: bool) -> Result<Self, Error> {
        let (db, sync_file) = open_db(path, cache_capacity, sync_data)?;
        Ok(SledStore {
            db: Some(db),
            path: path.to_path_buf(),
            cache_capacity,
            sync_data,
            sync_file,
            _release: ReleaseOnDrop {
                db_file: path.join("db"),
            },
        })
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, action: &'static str, e: sled::Error) -> Error {
        map_sled(&self.path, action, e)
    }

    /// The open database, or the error of a reopen that failed.
    fn db(&self) -> Result<&sled::Db, Error> {
        self.db.as_ref().ok_or_else(|| Error::Failed {
            path: self.path.clone(),
            reason: "the database is closed after a failed reopen".to_owned(),
        })
    }
}

/// Opens sled in `path`, and sled's log file for `fdatasync` when asked.
fn open_db(
    path: &Path,
    cache_capacity: u64,
    sync_data: bool,
) -> Result<(sled::Db, Option<File>), Error> {
    fs::create_dir_all(path).map_err(|e| Error::io("create", path, e))?;
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(cache_capacity)
        // Durability comes from our own group-committed flushes, not from a timer thread.
        .flush_every_ms(None);
    // sled 0.34 can panic instead of erroring on damaged files; that is input from disk, so it must become
    // an error value rather than take the process down.
    let opened = panic::catch_unwind(AssertUnwindSafe(|| config.open()));
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(map_sled(path, "open", e)),
        Err(panic) => {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                detail: format!(
                    "the storage engine failed while opening it ({})",
                    panic_text(&panic)
                ),
            });
        }
    };
    let sync_file = if sync_data {
        let db_file = path.join("db");
        Some(File::open(&db_file).map_err(|e| Error::io("open", &db_file, e))?)
    } else {
        None
    };
    Ok((db, sync_file))
}

impl Store for SledStore {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        check_sizes(key, None, MAX_STORED_VALUE_LEN)?;
        let value = self
            .db()?
            .get(full_key(keyspace, key))
            .map_err(|e| self.err("read", e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn put(&mut self, keyspace: Keyspace, key: &[u8], value: &[u8]) -> Result<(), Error> {
        check_sizes(key, Some(value), MAX_STORED_VALUE_LEN)?;
        self.db()?
            .insert(full_key(keyspace, key), value)
            .map_err(|e| self.err("write", e))?;
        Ok(())
    }

    fn delete(&mut self, keyspace: Keyspace, key: &[u8]) -> Result<(), Error> {
        check_sizes(key, None, MAX_STORED_VALUE_LEN)?;
        self.db()?
            .remove(full_key(keyspace, key))
            .map_err(|e| self.err("write", e))?;
        Ok(())
    }

    fn scan(&self, keyspace: Keyspace, scan: &Scan) -> Result<Vec<Entry>, Error> {
        let full_prefix = full_key(keyspace, scan.prefix_bytes());
        let iter = match scan.start_after() {
            Some(after) if after >= scan.prefix_bytes() => {
                use std::ops::Bound;
                self.db()?.range::<Vec<u8>, _>((
                    Bound::Excluded(full_key(keyspace, after)),
                    Bound::Unbounded,
                ))
            }
            _ => self.db()?.range(full_prefix.clone()..),
        };
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= scan.max_entries() {
                break;
            }
            let (k, v) = item.map_err(|e| self.err("read", e))?;
            if !k.starts_with(&full_prefix) {
                break;
            }
            out.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn apply_batch(&mut self, batch: Batch) -> Result<(), Error> {
        check_batch(&batch, MAX_STORED_VALUE_LEN)?;
        let mut sled_batch = sled::Batch::default();
        for op in batch.into_ops() {
            match op {
                BatchOp::Put {
                    keyspace,
                    key,
                    value,
                } => sled_batch.insert(full_key(keyspace, &key), value),
                BatchOp::Delete { keyspace, key } => sled_batch.remove(full_key(keyspace, &key)),
            }
        }
        self.db()?
            .apply_batch(sled_batch)
            .map_err(|e| self.err("write", e))
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.db()?.flush().map_err(|e| self.err("flush", e))?;
        // sled writes its log with sync_file_range on Linux, which neither flushes the drive's cache nor records
        // a grown file size; fdatasync does both.
        if let Some(file) = &self.sync_file {
            file.sync_data()
                .map_err(|e| Error::io("flush", &self.path.join("db"), e))?;
        }
        Ok(())
    }

    /// Drops the database and opens it again. sled latches the first I/O error it meets and fails every later
    /// call until it is reopened, so this is how the store recovers once the cause (a full disk) is gone.
    fn reopen(&mut self) -> Result<(), Error> {
        self.sync_file = None;
        if let Some(db) = self.db.take() {
            // Whatever sled still holds in memory cannot be written anyway; what was flushed is on disk.
            drop(db);
            wait_released(&self.path.join("db"));
        }
        let (db, sync_file) = open_db(&self.path, self.cache_capacity, self.sync_data)?;
        self.db = Some(db);
        self.sync_file = sync_file;
        Ok(())
    }
}

// sled's own Debug walks the tree and prints every key and value.
impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .field("sync_data", &self.sync_file.is_some())
            .finish()
    }
}

/// Turns a sled error into one that names the path and says what to do.
fn map_sled(path: &Path, action: &'static str, e: sled::Error) -> Error {
    match e {
        sled::Error::Io(io) if io.to_string().contains(SLED_LOCK_MESSAGE) => Error::Locked {
            path: path.to_path_buf(),
        },
        sled::Error::Io(io) => Error::io(action, path, io),
        sled::Error::Corruption { at, .. } => Error::Corrupt {
            path: path.to_path_buf(),
            detail: match at {
                Some(at) => format!("the storage engine found damaged data at {at:?}"),
                None => "the storage engine found damaged data".to_owned(),
            },
        },
        sled::Error::Unsupported(detail) | sled::Error::ReportableBug(detail) => Error::Backend {
            path: path.to_path_buf(),
            detail,
        },
        sled::Error::CollectionNotFound(_) => Error::Backend {
            path: path.to_path_buf(),
            detail: "the storage engine lost its default tree".to_owned(),
        },
    }
}

/// The message of a caught panic, when it is a string.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// The error sled 0.34.7 builds when its `flock` fails.
    fn lock_error() -> sled::Error {
        sled::Error::Io(io::Error::other(format!(
            "{SLED_LOCK_MESSAGE} on \"db\": WouldBlock"
        )))
    }

    #[test]
    fn second_open_of_same_dir_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let _first = SledStore::open(&path, DEFAULT_CACHE_CAPACITY, true).unwrap();
        let err = SledStore::open(&path, DEFAULT_CACHE_CAPACITY, true).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("in use by another process"), "{text}");
    }

    #[test]
    fn lock_message_maps_to_locked() {
        let err = map_sled(Path::new("/x/store"), "open", lock_error());
        assert!(matches!(err, Error::Locked { .. }));
    }

    #[test]
    fn path_through_a_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = SledStore::open(&file.join("store"), DEFAULT_CACHE_CAPACITY, true).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(text.contains("not-a-dir"), "{text}");
        assert!(text.contains("choose another data dir"), "{text}");
    }

    #[test]
    fn reopen_keeps_flushed_data_and_takes_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            SledStore::open(&dir.path().join("s"), DEFAULT_CACHE_CAPACITY, true).unwrap();
        store.put(Keyspace::Audit, b"before", b"1").unwrap();
        store.flush().unwrap();
        store.reopen().unwrap();
        assert_eq!(
            store.get(Keyspace::Audit, b"before").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        store.put(Keyspace::Audit, b"after", b"2").unwrap();
        store.flush().unwrap();
    }

    #[test]
    fn scan_pages_and_stays_in_keyspace() {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            SledStore::open(&dir.path().join("s"), DEFAULT_CACHE_CAPACITY, false).unwrap();
        for i in 0u8..10 {
            store.put(Keyspace::Audit, &[b'a', i], &[i]).unwrap();
        }
        store.put(Keyspace::Outbox, b"a", b"other").unwrap();
        let first = store
            .scan(Keyspace::Audit, &Scan::prefix(b"a".to_vec()).limit(4))
            .unwrap();
        assert_eq!(first.len(), 4);
        let last_key = first.last().unwrap().0.clone();
        let rest = store
            .scan(
                Keyspace::Audit,
                &Scan::prefix(b"a".to_vec()).after(last_key).limit(100),
            )
            .unwrap();
        assert_eq!(rest.len(), 6);
        assert_eq!(rest[0].1, vec![4]);
        assert!(
            store
                .scan(Keyspace::Keyring, &Scan::all())
                .unwrap()
                .is_empty()
        );
    }
}
