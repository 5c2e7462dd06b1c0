//! The storage actor: one thread owns the store; [`StoreHandle`]s talk to it over a bounded channel.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::keyspace::Keyspace;
use crate::store::{Batch, Entry, Scan, Store};

/// Commands that may wait in the actor's queue; senders wait (asynchronously) when it is full.
pub const COMMAND_CHANNEL_CAPACITY: usize = 1024;

/// Most writes committed under one flush. Bounds how long the first writer of a group can wait for the
/// others, and how much one group holds in memory.
pub const MAX_GROUP_COMMIT: usize = 256;

type Reply<T> = oneshot::Sender<Result<T, Error>>;

enum Write {
    Put {
        keyspace: Keyspace,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        keyspace: Keyspace,
        key: Vec<u8>,
    },
    Batch(Batch),
}

enum Command {
    Get {
        keyspace: Keyspace,
        key: Vec<u8>,
        reply: Reply<Option<Vec<u8>>>,
    },
    Scan {
        keyspace: Keyspace,
        scan: Scan,
        reply: Reply<Vec<Entry>>,
    },
    Write {
        write: Write,
        reply: Reply<()>,
    },
    Flush {
        reply: Reply<()>,
    },
    Close {
        reply: Reply<()>,
    },
}

/// A cheap, cloneable handle to a store running on its own thread.
///
/// Writes are group-committed: the storage thread applies every write waiting in its queue (up to
/// [`MAX_GROUP_COMMIT`]), flushes once, and only then answers them, so **a write acknowledged with `Ok` has
/// been flushed** (see the crate docs for what a sled flush guarantees). Reads are answered in queue order, after
/// the writes queued before them have been flushed, so a read never returns data that is not yet durable.
///
/// When every handle is dropped, the thread flushes and exits on its own; [`close`](Self::close) does the same
/// and waits for it.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Command>,
    /// Shared by every clone, so whichever clone closes the store can join the thread.
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl StoreHandle {
    /// Moves `store` onto a new thread named `hearth-storage` and returns a handle to it.
    pub fn spawn<S: Store + Send + 'static>(store: S) -> Result<StoreHandle, Error> {
        let (tx, rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
        let thread = thread::Builder::new()
            .name("hearth-storage".to_owned())
            .spawn(move || {
                let _span = tracing::error_span!("storage").entered();
                run(store, rx);
            })
            .map_err(|error| Error::Thread { error })?;
        Ok(StoreHandle {
            tx,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, response) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| Error::Closed)?;
        response.await.map_err(|_| Error::Closed)?
    }

    /// Reads one value.
    ///
    /// Cancel-safe: it has no effect, so dropping the future loses nothing.
    pub async fn get(
        &self,
        keyspace: Keyspace,
        key: impl Into<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>, Error> {
        let key = key.into();
        self.request(|reply| Command::Get {
            keyspace,
            key,
            reply,
        })
        .await
    }

    /// Lists entries in key order; see [`Scan`].
    ///
    /// Cancel-safe: it has no effect, so dropping the future loses nothing.
    pub async fn scan(&self, keyspace: Keyspace, scan: Scan) -> Result<Vec<Entry>, Error> {
        self.request(|reply| Command::Scan {
            keyspace,
            scan,
            reply,
        })
        .await
    }

    /// Writes one value; returns once it is flushed.
    ///
    /// Not cancel-safe: once queued, the write goes ahead even if the future is dropped, and the caller no
    /// longer learns whether it was flushed. Dropped before it was queued, nothing happens.
    pub async fn put(
        &self,
        keyspace: Keyspace,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<(), Error> {
        let write = Write::Put {
            keyspace,
            key: key.into(),
            value: value.into(),
        };
        self.request(|reply| Command::Write { write, reply }).await
    }

    /// Removes one key; returns once the removal is flushed.
    ///
    /// Not cancel-safe, in the same way as [`put`](Self::put).
    pub async fn delete(&self, keyspace: Keyspace, key: impl Into<Vec<u8>>) -> Result<(), Error> {
        let write = Write::Delete {
            keyspace,
            key: key.into(),
        };
        self.request(|reply| Command::Write { write, reply }).await
    }

    /// Applies a batch atomically; returns once it is flushed.
    ///
    /// Not cancel-safe, in the same way as [`put`](Self::put); the batch stays atomic either way.
    pub async fn batch(&self, batch: Batch) -> Result<(), Error> {
        let write = Write::Batch(batch);
        self.request(|reply| Command::Write { write, reply }).await
    }

    /// Flushes explicitly. Acknowledged writes are already flushed, so this is rarely needed.
    ///
    /// Cancel-safe: a flush that goes ahead after the future is dropped does no harm.
    pub async fn flush(&self) -> Result<(), Error> {
        self.request(|reply| Command::Flush { reply }).await
    }

    /// Flushes, stops the storage thread and waits for it, which releases the database (and its lock).
    ///
    /// Commands from other clones that were queued after the close fail with [`Error::Closed`]. Closing an
    /// already closed store returns `Ok`.
    ///
    /// Not cancel-safe: once the close is queued the store closes even if the future is dropped, and the thread
    /// is then left to finish on its own.
    pub async fn close(&self) -> Result<(), Error> {
        let flushed = match self.request(|reply| Command::Close { reply }).await {
            // The thread already stopped: either an earlier close, or a crash that `join` reveals below.
            Err(Error::Closed) => Ok(()),
            other => other,
        };
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // The thread replies as its last act, so this join returns at once rather than blocking the runtime.
            thread.join().map_err(|_| Error::Crashed)?;
        }
        flushed
    }
}

impl fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreHandle")
            .field("closed", &self.tx.is_closed())
            .finish()
    }
}

/// The storage thread's loop.
fn run<S: Store>(mut store: S, mut rx: mpsc::Receiver<Command>) {
    let mut group: Vec<(Write, Reply<()>)> = Vec::with_capacity(MAX_GROUP_COMMIT);
    // A non-write command met while gathering a group; it runs right after that group commits.
    let mut pending: Option<Command> = None;
    loop {
        let command = match pending.take() {
            Some(command) => command,
            None => match rx.blocking_recv() {
                Some(command) => command,
                None => {
                    // Every handle is gone. Writes were flushed before being acknowledged; this flush only
                    // covers writes whose callers gave up waiting, so a failure is worth a log line, not more.
                    if let Err(error) = store.flush() {
                        tracing::warn!(%error, "final flush after the last handle was dropped failed");
                    }
                    return;
                }
            },
        };
        match command {
            Command::Write { write, reply } => {
                group.push((write, reply));
                while group.len() < MAX_GROUP_COMMIT {
                    match rx.try_recv() {
                        Ok(Command::Write { write, reply }) => group.push((write, reply)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit(&mut store, &mut group);
            }
            Command::Get {
                keyspace,
                key,
                reply,
            } => {
                let _ = reply.send(store.get(keyspace, &key));
            }
            Command::Scan {
                keyspace,
                scan,
                reply,
            } => {
                let _ = reply.send(store.scan(keyspace, &scan));
            }
            Command::Flush { reply } => {
                let _ = reply.send(store.flush());
            }
            Command::Close { reply } => {
                let result = store.flush();
                // Drop before replying, so the database lock is released by the time `close` returns.
                drop(store);
                let _ = reply.send(result);
                return;
            }
        }
    }
}

/// Applies a group of writes, flushes once, then answers each writer.
fn commit<S: Store>(store: &mut S, group: &mut Vec<(Write, Reply<()>)>) {
    let mut results = Vec::with_capacity(group.len());
    let mut applied_any = false;
    for (write, _) in group.iter_mut() {
        // Take the payload out so it is freed as soon as it is applied.
        let write = std::mem::replace(write, Write::Batch(Batch::new()));
        let result = match write {
            Write::Put {
                keyspace,
                key,
                value,
            } => store.put(keyspace, &key, &value),
            Write::Delete { keyspace, key } => store.delete(keyspace, &key),
            Write::Batch(batch) => store.apply_batch(batch),
        };
        applied_any |= result.is_ok();
        results.push(result);
    }
    let flushed = if applied_any { store.flush() } else { Ok(()) };
    if let Err(error) = &flushed {
        tracing::error!(%error, writes = group.len(), "group commit flush failed; its writes are not durable");
    }
    for ((_, reply), result) in group.drain(..).zip(results) {
        // A write that applied but was not flushed is not durable: its writer gets the flush error.
        let result = match (result, &flushed) {
            (Ok(()), Err(e)) => Err(e.duplicate()),
            (result, _) => result,
        };
        let _ = reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    /// Releases a test queues for a gated flush; two are enough for any test here.
    const GATE_CAPACITY: usize = 4;

    /// Wraps a store to count flushes, and optionally to hold each flush until the test releases it.
    struct Probe {
        inner: MemStore,
        flushes: Arc<AtomicUsize>,
        gate: Option<std_mpsc::Receiver<()>>,
        dropped: Arc<AtomicBool>,
        fail_flush: bool,
    }

    impl Probe {
        fn new() -> (Probe, Arc<AtomicUsize>, Arc<AtomicBool>) {
            let flushes = Arc::new(AtomicUsize::new(0));
            let dropped = Arc::new(AtomicBool::new(false));
            let probe = Probe {
                inner: MemStore::new(),
                flushes: flushes.clone(),
                gate: None,
                dropped: dropped.clone(),
                fail_flush: false,
            };
            (probe, flushes, dropped)
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    impl Store for Probe {
        fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
            self.inner.get(keyspace, key)
        }
        fn put(&mut self, keyspace: Keyspace, key: &[u8], value: &[u8]) -> Result<(), Error> {
            self.inner.put(keyspace, key, value)
        }
        fn delete(&mut self, keyspace: Keyspace, key: &[u8]) -> Result<(), Error> {
            self.inner.delete(keyspace, key)
        }
        fn scan(&self, keyspace: Keyspace, scan: &Scan) -> Result<Vec<Entry>, Error> {
            self.inner.scan(keyspace, scan)
        }
        fn apply_batch(&mut self, batch: Batch) -> Result<(), Error> {
            self.inner.apply_batch(batch)
        }
        fn flush(&mut self) -> Result<(), Error> {
            if let Some(gate) = &self.gate {
                let _ = gate.recv();
            }
            self.flushes.fetch_add(1, Ordering::SeqCst);
            if self.fail_flush {
                return Err(Error::io(
                    "flush",
                    std::path::Path::new("/probe"),
                    std::io::Error::from(std::io::ErrorKind::StorageFull),
                ));
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn write_is_acknowledged_only_after_its_flush() {
        let (mut probe, flushes, _) = Probe::new();
        let (release, gate) = std_mpsc::sync_channel(GATE_CAPACITY);
        probe.gate = Some(gate);
        let handle = StoreHandle::spawn(probe).unwrap();
        let writer = {
            let handle = handle.clone();
            tokio::spawn(async move {
                handle
                    .put(Keyspace::Outbox, b"k".to_vec(), b"v".to_vec())
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !writer.is_finished(),
            "the write was acknowledged before its flush finished"
        );
        assert_eq!(flushes.load(Ordering::SeqCst), 0);
        release.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
        drop(release);
        handle.close().await.unwrap();
    }

    #[tokio::test]
    async fn queued_writes_share_one_flush() {
        let (mut probe, flushes, _) = Probe::new();
        let (release, gate) = std_mpsc::sync_channel(GATE_CAPACITY);
        probe.gate = Some(gate);
        let handle = StoreHandle::spawn(probe).unwrap();
        // The first write holds the thread in its flush while the others queue up behind it.
        let first = {
            let handle = handle.clone();
            tokio::spawn(async move {
                handle
                    .put(Keyspace::Audit, b"first".to_vec(), b"1".to_vec())
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut writers = Vec::new();
        for i in 0..50u32 {
            let handle = handle.clone();
            writers.push(tokio::spawn(async move {
                handle
                    .put(Keyspace::Audit, i.to_be_bytes().to_vec(), b"v".to_vec())
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.send(()).unwrap();
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        for writer in writers {
            writer.await.unwrap().unwrap();
        }
        assert_eq!(
            flushes.load(Ordering::SeqCst),
            2,
            "50 queued writes should commit under one flush"
        );
        assert_eq!(
            handle
                .scan(Keyspace::Audit, Scan::all())
                .await
                .unwrap()
                .len(),
            51
        );
        drop(release);
        handle.close().await.unwrap();
    }

    #[tokio::test]
    async fn failed_flush_fails_every_write_of_the_group() {
        let (mut probe, _, _) = Probe::new();
        probe.fail_flush = true;
        let handle = StoreHandle::spawn(probe).unwrap();
        let err = handle
            .put(Keyspace::Outbox, b"k".to_vec(), b"v".to_vec())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("free some space"), "{err}");
        let mut batch = Batch::new();
        batch.put(Keyspace::Outbox, b"a".to_vec(), b"1".to_vec());
        assert!(handle.batch(batch).await.is_err());
    }

    #[tokio::test]
    async fn close_flushes_joins_and_is_idempotent() {
        let (probe, flushes, dropped) = Probe::new();
        let handle = StoreHandle::spawn(probe).unwrap();
        let other = handle.clone();
        handle.close().await.unwrap();
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
        assert!(
            dropped.load(Ordering::SeqCst),
            "close returned before the store was released"
        );
        assert!(matches!(
            other.get(Keyspace::Meta, b"x".to_vec()).await,
            Err(Error::Closed)
        ));
        assert!(matches!(
            other
                .put(Keyspace::Meta, b"x".to_vec(), b"y".to_vec())
                .await,
            Err(Error::Closed)
        ));
        other.close().await.unwrap();
    }

    #[tokio::test]
    async fn dropping_every_handle_flushes_and_releases() {
        let (probe, flushes, dropped) = Probe::new();
        let handle = StoreHandle::spawn(probe).unwrap();
        drop(handle);
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(dropped.load(Ordering::SeqCst));
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn errors_reach_only_their_writer() {
        let handle = StoreHandle::spawn(MemStore::new()).unwrap();
        let too_long = vec![0u8; crate::MAX_KEY_LEN + 1];
        let (bad, good) = tokio::join!(
            handle.put(Keyspace::Keyring, too_long, b"v".to_vec()),
            handle.put(Keyspace::Keyring, b"ok".to_vec(), b"v".to_vec()),
        );
        assert!(matches!(bad, Err(Error::TooLarge { .. })));
        good.unwrap();
        assert_eq!(
            handle
                .get(Keyspace::Keyring, b"ok".to_vec())
                .await
                .unwrap()
                .as_deref(),
            Some(&b"v"[..])
        );
        handle
            .delete(Keyspace::Keyring, b"ok".to_vec())
            .await
            .unwrap();
        assert_eq!(
            handle.get(Keyspace::Keyring, b"ok".to_vec()).await.unwrap(),
            None
        );
        handle.flush().await.unwrap();
        assert!(format!("{handle:?}").contains("closed: false"));
    }
}
