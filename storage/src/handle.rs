//! The storage actor: one thread owns the store; [`StoreHandle`]s talk to it over a bounded channel.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::Error;
use crate::keyspace::Keyspace;
use crate::store::{Batch, Entry, Scan, Store};

/// Commands that may wait in the actor's queue; senders wait (asynchronously) when it is full.
pub const COMMAND_CHANNEL_CAPACITY: usize = 1024;

/// Most writes committed under one flush. Bounds how long the first writer of a group can wait for the
/// others, and how much one group holds in memory.
pub const MAX_GROUP_COMMIT: usize = 256;

/// How long a caller waits for the storage thread to answer one request. A healthy store answers in
/// milliseconds; this bounds what a hung disk can do to callers (and to a node's shutdown).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The first wait before a failed store tries to reopen; each failed attempt doubles it.
pub const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The longest wait between two attempts to reopen a failed store.
pub const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// While failed, how often the storage thread looks at its queue between retries.
const FAILED_POLL: Duration = Duration::from_millis(10);

/// A record written (and flushed) to prove that a reopened store takes writes again. The leading NUL keeps it
/// apart from readable names.
const PROBE_KEY: &[u8] = b"\0hearth-store-probe";

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// Whether a store accepts writes; see [`StoreHandle::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Writes are applied and flushed.
    Ok,
    /// An I/O failure (a full disk, say) latched the store: writes are refused with [`Error::Failed`] until
    /// the storage thread has reopened the database and a probe write has been flushed. It retries by itself
    /// with backoff, at most [`MAX_RETRY_INTERVAL`] apart.
    Failed {
        /// The failure that latched the store.
        reason: String,
    },
}

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

/// A batch in the storage thread's queue (see [`StoreHandle::queue_batch`]).
#[must_use = "a queued batch goes ahead anyway; wait for `flushed` to learn whether it is durable"]
pub struct Queued {
    response: oneshot::Receiver<Result<(), Error>>,
}

impl Queued {
    /// Waits until the batch is flushed (or failed), at most [`REQUEST_TIMEOUT`].
    pub async fn flushed(self) -> Result<(), Error> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.response).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout {
                what: "write",
                limit: REQUEST_TIMEOUT,
            }),
        }
    }
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
    health: watch::Receiver<Health>,
    /// Shared by every clone, so whichever clone closes the store can join the thread.
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl StoreHandle {
    /// Moves `store` onto a new thread named `hearth-storage` and returns a handle to it.
    pub fn spawn<S: Store + Send + 'static>(store: S) -> Result<StoreHandle, Error> {
        StoreHandle::spawn_at(store, Path::new("<store>"))
    }

    /// [`spawn`](Self::spawn), naming the store's `location` in errors.
    pub fn spawn_at<S: Store + Send + 'static>(
        store: S,
        location: &Path,
    ) -> Result<StoreHandle, Error> {
        let (tx, rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
        let (health_tx, health) = watch::channel(Health::Ok);
        let actor = Actor {
            store,
            location: location.to_path_buf(),
            health: health_tx,
            retry: None,
        };
        let thread = thread::Builder::new()
            .name("hearth-storage".to_owned())
            .spawn(move || {
                let _span = tracing::error_span!("storage").entered();
                run(actor, rx);
            })
            .map_err(|error| Error::Thread { error })?;
        Ok(StoreHandle {
            tx,
            health,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Whether the store takes writes, or failed and refuses them until it recovers.
    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }

    /// Whether the store is failed (see [`Health::Failed`]). Cheap: it reads a shared latch.
    pub fn is_failed(&self) -> bool {
        matches!(*self.health.borrow(), Health::Failed { .. })
    }

    /// A receiver that sees every change of [`health`](Self::health), e.g. to act once the store recovers.
    pub fn watch_health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    /// Sends one command and waits for its answer, at most [`REQUEST_TIMEOUT`].
    async fn request<T>(
        &self,
        what: &'static str,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, Error> {
        let (reply, response) = oneshot::channel();
        let asked = async {
            self.tx.send(make(reply)).await.map_err(|_| Error::Closed)?;
            response.await.map_err(|_| Error::Closed)?
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, asked).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                what,
                limit: REQUEST_TIMEOUT,
            }),
        }
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
        self.request("read", |reply| Command::Get {
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
        self.request("scan", |reply| Command::Scan {
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
        self.request("write", |reply| Command::Write { write, reply })
            .await
    }

    /// Removes one key; returns once the removal is flushed.
    ///
    /// Not cancel-safe, in the same way as [`put`](Self::put).
    pub async fn delete(&self, keyspace: Keyspace, key: impl Into<Vec<u8>>) -> Result<(), Error> {
        let write = Write::Delete {
            keyspace,
            key: key.into(),
        };
        self.request("write", |reply| Command::Write { write, reply })
            .await
    }

    /// Applies a batch atomically; returns once it is flushed.
    ///
    /// Not cancel-safe, in the same way as [`put`](Self::put); the batch stays atomic either way. The wait for
    /// room in the queue and the wait for the flush are each bounded by [`REQUEST_TIMEOUT`].
    pub async fn batch(&self, batch: Batch) -> Result<(), Error> {
        self.queue_batch(batch).await?.flushed().await
    }

    /// Queues a batch and returns once it is in the storage thread's queue, with the wait for its flush.
    ///
    /// Batches queued one after another (each call awaited before the next) are applied in that order, and a
    /// batch is flushed no earlier than every batch queued before it. Callers that spawn a task per
    /// [`batch`](Self::batch) get no such order: tasks reach the queue in whatever order they run. A caller
    /// whose batches depend on one another (later records that need earlier ones) queues them here, in order,
    /// and waits for their flushes wherever it likes.
    ///
    /// Waiting for room in the queue is bounded by [`REQUEST_TIMEOUT`], and so is the wait for the flush.
    /// Once this returns `Ok` the batch goes ahead even if the [`Queued`] is dropped.
    pub async fn queue_batch(&self, batch: Batch) -> Result<Queued, Error> {
        let (reply, response) = oneshot::channel();
        let command = Command::Write {
            write: Write::Batch(batch),
            reply,
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, self.tx.send(command)).await {
            Ok(Ok(())) => Ok(Queued { response }),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout {
                what: "write",
                limit: REQUEST_TIMEOUT,
            }),
        }
    }

    /// Flushes explicitly. Acknowledged writes are already flushed, so this is rarely needed.
    ///
    /// Cancel-safe: a flush that goes ahead after the future is dropped does no harm.
    pub async fn flush(&self) -> Result<(), Error> {
        self.request("flush", |reply| Command::Flush { reply })
            .await
    }

    /// Flushes, stops the storage thread and waits for it, which releases the database (and its lock).
    ///
    /// Commands from other clones that were queued after the close fail with [`Error::Closed`]. Closing an
    /// already closed store returns `Ok`.
    ///
    /// Not cancel-safe: once the close is queued the store closes even if the future is dropped, and the thread
    /// is then left to finish on its own.
    pub async fn close(&self) -> Result<(), Error> {
        let flushed = match self
            .request("close", |reply| Command::Close { reply })
            .await
        {
            // The thread already stopped: either an earlier close, or a crash that `join` reveals below.
            Err(Error::Closed) => Ok(()),
            // The thread is stuck (a hung disk): joining it would block the caller for as long.
            Err(timeout @ Error::Timeout { .. }) => return Err(timeout),
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
            .field("failed", &self.is_failed())
            .finish()
    }
}

/// The storage thread's state: the store, and whether it is failed.
struct Actor<S> {
    store: S,
    location: PathBuf,
    health: watch::Sender<Health>,
    /// While failed: when to try reopening next, and how long the wait before that attempt was.
    retry: Option<(Instant, Duration)>,
}

impl<S: Store> Actor<S> {
    fn failed_error(&self) -> Error {
        let reason = match &*self.health.borrow() {
            Health::Failed { reason } => reason.clone(),
            Health::Ok => "an earlier failure".to_owned(),
        };
        Error::Failed {
            path: self.location.clone(),
            reason,
        }
    }

    /// Latches the store failed when `result` is a failure of the store itself.
    fn note<T>(&mut self, result: &Result<T, Error>) {
        if let Err(error) = result
            && error.is_store_failure()
        {
            self.latch(error);
        }
    }

    fn latch(&mut self, error: &Error) {
        if self.retry.is_some() {
            return;
        }
        // The one error line of an outage; the retries below log at debug, and the recovery at info.
        tracing::error!(%error, "the store failed; writes are refused until it recovers, retrying in the background");
        self.health.send_replace(Health::Failed {
            reason: error.to_string(),
        });
        self.retry = Some((Instant::now() + FIRST_RETRY, FIRST_RETRY));
    }

    /// Reopens the database and proves it takes a flushed write; sled fails every call after its first I/O
    /// error until it is reopened, so nothing less can tell that the disk has room again.
    fn try_recover(&mut self) {
        let Some((_, waited)) = self.retry else {
            return;
        };
        let outcome = self
            .store
            .reopen()
            .and_then(|()| self.store.put(Keyspace::Meta, PROBE_KEY, b"ok"))
            .and_then(|()| self.store.flush());
        match outcome {
            Ok(()) => {
                tracing::info!("the store recovered; writes are accepted again");
                self.retry = None;
                self.health.send_replace(Health::Ok);
            }
            Err(error) => {
                let wait = (waited * 2).min(MAX_RETRY_INTERVAL);
                tracing::debug!(%error, retry_in_ms = wait.as_millis() as u64, "the store is still failing");
                self.retry = Some((Instant::now() + wait, wait));
            }
        }
    }

    /// The next command; `None` once every handle is gone. While failed, it also retries on schedule.
    fn next_command(&mut self, rx: &mut mpsc::Receiver<Command>) -> Option<Command> {
        loop {
            let Some((at, _)) = self.retry else {
                return rx.blocking_recv();
            };
            // Checked before the queue, so a steady stream of commands cannot starve the retries.
            let now = Instant::now();
            if now >= at {
                self.try_recover();
                continue;
            }
            match rx.try_recv() {
                Ok(command) => return Some(command),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => thread::sleep((at - now).min(FAILED_POLL)),
            }
        }
    }

    /// Applies a group of writes, flushes once, then answers each writer.
    fn commit(&mut self, group: &mut Vec<(Write, Reply<()>)>) {
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
                } => self.store.put(keyspace, &key, &value),
                Write::Delete { keyspace, key } => self.store.delete(keyspace, &key),
                Write::Batch(batch) => self.store.apply_batch(batch),
            };
            self.note(&result);
            applied_any |= result.is_ok();
            results.push(result);
        }
        let flushed = if applied_any {
            self.store.flush()
        } else {
            Ok(())
        };
        if let Err(error) = &flushed {
            tracing::warn!(%error, writes = group.len(), "group commit flush failed; its writes are not durable");
        }
        self.note(&flushed);
        for ((_, reply), result) in group.drain(..).zip(results) {
            // A write that applied but was not flushed is not durable: its writer gets the flush error.
            let result = match (result, &flushed) {
                (Ok(()), Err(e)) => Err(e.duplicate()),
                (result, _) => result,
            };
            let _ = reply.send(result);
        }
    }
}

/// The storage thread's loop.
fn run<S: Store>(mut actor: Actor<S>, mut rx: mpsc::Receiver<Command>) {
    let mut group: Vec<(Write, Reply<()>)> = Vec::with_capacity(MAX_GROUP_COMMIT);
    // A non-write command met while gathering a group; it runs right after that group commits.
    let mut pending: Option<Command> = None;
    loop {
        let command = match pending.take() {
            Some(command) => command,
            None => match actor.next_command(&mut rx) {
                Some(command) => command,
                None => {
                    // Every handle is gone. Writes were flushed before being acknowledged; this flush only
                    // covers writes whose callers gave up waiting, so a failure is worth a log line, not more.
                    if actor.retry.is_none()
                        && let Err(error) = actor.store.flush()
                    {
                        tracing::warn!(%error, "final flush after the last handle was dropped failed");
                    }
                    return;
                }
            },
        };
        match command {
            Command::Write { reply, .. } if actor.retry.is_some() => {
                // Refused before it is applied: the caller learns at once that nothing was stored.
                let _ = reply.send(Err(actor.failed_error()));
            }
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
                actor.commit(&mut group);
            }
            Command::Get {
                keyspace,
                key,
                reply,
            } => {
                let result = actor.store.get(keyspace, &key);
                actor.note(&result);
                let _ = reply.send(result);
            }
            Command::Scan {
                keyspace,
                scan,
                reply,
            } => {
                let result = actor.store.scan(keyspace, &scan);
                actor.note(&result);
                let _ = reply.send(result);
            }
            Command::Flush { reply } => {
                let result = if actor.retry.is_some() {
                    Err(actor.failed_error())
                } else {
                    actor.store.flush()
                };
                actor.note(&result);
                let _ = reply.send(result);
            }
            Command::Close { reply } => {
                // A failed store is not flushed again: it would only fail, and the close must be quick.
                let result = if actor.retry.is_some() {
                    Err(actor.failed_error())
                } else {
                    actor.store.flush()
                };
                // Drop before replying, so the database lock is released by the time `close` returns.
                drop(actor);
                let _ = reply.send(result);
                return;
            }
        }
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
        /// While set, flushes and reopens fail as on a full disk.
        full: Arc<AtomicBool>,
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
                full: Arc::new(AtomicBool::new(false)),
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
            if self.fail_flush || self.full.load(Ordering::SeqCst) {
                return Err(disk_full());
            }
            Ok(())
        }
        fn reopen(&mut self) -> Result<(), Error> {
            if self.full.load(Ordering::SeqCst) {
                return Err(disk_full());
            }
            Ok(())
        }
    }

    fn disk_full() -> Error {
        Error::io(
            "flush",
            std::path::Path::new("/probe"),
            std::io::Error::from(std::io::ErrorKind::StorageFull),
        )
    }

    #[tokio::test]
    async fn a_failed_store_refuses_writes_then_recovers_by_itself() {
        let (probe, _, _) = Probe::new();
        let full = probe.full.clone();
        let handle = StoreHandle::spawn(probe).unwrap();
        assert_eq!(handle.health(), Health::Ok);
        full.store(true, Ordering::SeqCst);
        let err = handle
            .put(Keyspace::Outbox, b"first".to_vec(), b"1".to_vec())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(handle.is_failed(), "the failure did not latch");
        // Refused before it is applied: it never reaches the store, not even in memory.
        let err = handle
            .put(Keyspace::Outbox, b"second".to_vec(), b"2".to_vec())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Failed { .. }), "{err:?}");
        assert!(err.to_string().contains("retries by itself"), "{err}");
        assert_eq!(
            handle
                .get(Keyspace::Outbox, b"second".to_vec())
                .await
                .unwrap(),
            None
        );
        let mut health = handle.watch_health();
        full.store(false, Ordering::SeqCst);
        tokio::time::timeout(
            Duration::from_secs(30),
            health.wait_for(|h| *h == Health::Ok),
        )
        .await
        .expect("the store did not recover once the disk had room")
        .unwrap();
        handle
            .put(Keyspace::Outbox, b"third".to_vec(), b"3".to_vec())
            .await
            .unwrap();
        handle.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_store_closes_at_once() {
        let (probe, _, dropped) = Probe::new();
        probe.full.store(true, Ordering::SeqCst);
        let handle = StoreHandle::spawn(probe).unwrap();
        assert!(
            handle
                .put(Keyspace::Outbox, b"k".to_vec(), b"v".to_vec())
                .await
                .is_err()
        );
        assert!(handle.is_failed());
        let err = handle.close().await.unwrap_err();
        assert!(matches!(err, Error::Failed { .. }), "{err:?}");
        assert!(dropped.load(Ordering::SeqCst));
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

    /// An in-memory store that notes the first key of each batch it applies, in order.
    struct Ordered {
        inner: MemStore,
        applied: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Store for Ordered {
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
            if let Some(crate::BatchOp::Put { key, .. }) = batch.ops().first() {
                self.applied.lock().unwrap().push(key.clone());
            }
            self.inner.apply_batch(batch)
        }
        fn flush(&mut self) -> Result<(), Error> {
            self.inner.flush()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_batches_land_in_the_order_they_were_queued() {
        let applied = Arc::new(Mutex::new(Vec::new()));
        let handle = StoreHandle::spawn(Ordered {
            inner: MemStore::new(),
            applied: applied.clone(),
        })
        .unwrap();
        let key = |i: u32| format!("batch-{i:04}").into_bytes();
        let mut waits = Vec::new();
        for i in 0..300u32 {
            let mut batch = Batch::new();
            batch.put(Keyspace::Meta, key(i), b"v".to_vec());
            let queued = handle.queue_batch(batch).await.unwrap();
            if i % 7 == 0 {
                // Nobody waits for this one: it lands all the same.
                drop(queued);
            } else {
                // Waited for on other tasks, in no particular order: the order is the queue's.
                waits.push(tokio::spawn(queued.flushed()));
            }
        }
        for wait in waits {
            wait.await.unwrap().unwrap();
        }
        assert_eq!(
            *applied.lock().unwrap(),
            (0..300).map(key).collect::<Vec<_>>()
        );
        assert!(
            handle
                .get(Keyspace::Meta, key(294))
                .await
                .unwrap()
                .is_some()
        );
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
