//! What the core does about its store: background persists under a cap, refusing writes
//! while the store is failed, and storing again what a failed store missed once it is back.
//!
//! A local write is applied before its batch reaches the store (and sent to peers once the
//! batch finished, send_gate.rs), so the write that discovers a failure cannot be undone: its answer says it is applied but not
//! durable here (507, `applied: true`). From then on the store's health latch is set, and
//! writes are refused before they apply (507, `applied: false`) until the storage thread
//! has reopened the database. Changes from peers still apply in memory meanwhile. Every
//! batch that failed is remembered (its documents, and its records other than chunks), and
//! on recovery the core writes a full snapshot of each such document, which covers any
//! chunk that never landed, together with those records.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use crate::records::DocChunk;
use hearth_crdt::DocId;
use hearth_storage::{Batch, BatchOp, Keyspace, Queued, StoreHandle};
use tokio::sync::Semaphore;

use super::batching::Ack;
use super::resident::Resident;
use super::{Core, append};
use crate::Error;

/// Most store batches the core has in flight at once. A burst of remote changes beyond it
/// makes the core wait for a slot before it reads more, instead of spawning without bound;
/// at shutdown the node waits for every slot before it closes the store.
pub(crate) const MAX_PERSISTS_IN_FLIGHT: usize = 64;

/// Most operations in one re-persist batch; the store refuses larger ones.
const MAX_REPERSIST_OPS: usize = 10_000;

/// A store batch waiting for a slot, with the writers it answers.
pub(crate) struct Pending {
    pub(crate) batch: Batch,
    pub(crate) acks: Vec<Ack>,
    /// Frames queued after this batch wait for it (send_gate.rs).
    pub(crate) ticket: u64,
    /// Documents whose chunks it holds, not evicted until it is stored (resident.rs).
    pub(crate) held: Vec<DocId>,
}

/// What a batch's flush answers, once the batch is in the store's queue.
struct Flight {
    salvage: Salvage,
    ops: usize,
    acks: Vec<Ack>,
    ticket: u64,
    held: Vec<DocId>,
}

/// A record by keyspace and key.
type RecordId = (Keyspace, Vec<u8>);

/// What failed batches left unstored: their documents, and their other records by key
/// (the last write of a key wins; `None` deletes it).
#[derive(Default)]
pub(crate) struct Unpersisted {
    docs: BTreeSet<DocId>,
    records: BTreeMap<RecordId, Option<Vec<u8>>>,
}

impl Unpersisted {
    pub(crate) fn is_empty(&self) -> bool {
        self.docs.is_empty() && self.records.is_empty()
    }

    /// Whether a failed batch left chunks of `doc` to store again.
    pub(crate) fn holds(&self, doc: DocId) -> bool {
        self.docs.contains(&doc)
    }

    pub(crate) fn add(&mut self, salvage: Salvage) {
        self.docs.extend(salvage.docs);
        for (key, value) in salvage.records {
            self.records.insert(key, value);
        }
    }
}

/// What a batch would leave to store again if it failed. Chunks are not copied: a
/// snapshot of their document replaces them, so only the document ids are kept.
pub(crate) struct Salvage {
    docs: BTreeSet<DocId>,
    records: Vec<(RecordId, Option<Vec<u8>>)>,
}

impl Salvage {
    pub(crate) fn of(batch: &Batch) -> Self {
        let docs = chunk_docs(batch).collect();
        let mut records = Vec::new();
        for op in batch.ops() {
            match op {
                BatchOp::Put { keyspace, .. } | BatchOp::Delete { keyspace, .. }
                    if *keyspace == Keyspace::DocChunks => {}
                BatchOp::Put {
                    keyspace,
                    key,
                    value,
                } => records.push(((*keyspace, key.clone()), Some(value.clone()))),
                BatchOp::Delete { keyspace, key } => records.push(((*keyspace, key.clone()), None)),
            }
        }
        Salvage { docs, records }
    }
}

/// The documents whose chunks `batch` writes or deletes.
pub(crate) fn chunk_docs(batch: &Batch) -> impl Iterator<Item = DocId> + '_ {
    batch.ops().iter().filter_map(|op| match op {
        BatchOp::Put { keyspace, key, .. } | BatchOp::Delete { keyspace, key }
            if *keyspace == Keyspace::DocChunks =>
        {
            DocChunk::parse(key).map(|(doc, _)| DocId::from_bytes(doc))
        }
        _ => None,
    })
}

/// The error a writer gets when its batch was not stored.
pub(crate) fn write_error(error: &hearth_storage::Error) -> Error {
    if error.is_store_failure() {
        Error::InsufficientStorage {
            applied: true,
            detail: format!(
                "the write is applied in memory and sent to peers, but it is not durable on \
                 this device; it is stored once the store recovers: {error}"
            ),
        }
    } else {
        Error::from(error.duplicate())
    }
}

/// The error a write gets when it is refused because the store is failed.
pub(crate) fn refusal(store: &StoreHandle) -> Error {
    let reason = match store.health() {
        hearth_storage::Health::Failed { reason } => reason,
        hearth_storage::Health::Ok => "it failed a moment ago".to_string(),
    };
    Error::InsufficientStorage {
        applied: false,
        detail: format!(
            "the write was refused and not applied: the store is failing ({reason}); it \
             retries by itself, so free disk space and try again"
        ),
    }
}

/// A store batch slower than this is logged at debug level.
const SLOW_BATCH: std::time::Duration = std::time::Duration::from_millis(200);

/// Waits for one queued batch's flush and answers its writers; a failure is remembered for
/// the recovery.
async fn persist(
    queued: Result<Queued, hearth_storage::Error>,
    Flight {
        salvage,
        ops,
        acks,
        ticket,
        held,
    }: Flight,
    unpersisted: Arc<Mutex<Unpersisted>>,
    finish: super::send_gate::Finish,
    unstored: Arc<Mutex<HashMap<DocId, u32>>>,
) {
    // Finished however this ends, a panic included, so frames never wait for it forever.
    let finished = finish.on_drop(ticket);
    let begun = std::time::Instant::now();
    let result = match queued {
        Ok(queued) => queued.flushed().await,
        Err(error) => Err(error),
    };
    let took = begun.elapsed();
    if took >= SLOW_BATCH {
        // Frames queued after this batch waited for it (send_gate.rs).
        tracing::debug!(
            ticket,
            ops,
            ms = took.as_millis() as u64,
            "slow store batch"
        );
    }
    if let Err(error) = &result {
        if error.is_store_failure() {
            unpersisted
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .add(salvage);
        }
        // The store logged the failure that latched it; this is one of its consequences.
        tracing::warn!(%error, "could not persist document changes");
    }
    // Released after a failure is noted, so the document is never evictable between.
    Resident::release(&unstored, &held);
    drop(finished);
    for ack in acks {
        ack(result.as_ref().map(|_| ()).map_err(write_error));
    }
}

impl Core {
    /// Queues a batch (and the writers it answers) for the store; the run loop starts it
    /// once a slot is free.
    pub(crate) fn queue_persist(&mut self, batch: Batch, acks: Vec<Ack>) {
        if batch.is_empty() && acks.is_empty() {
            return;
        }
        // The open window's batch has the older ticket and may hold earlier changes of a
        // document this batch also writes: it goes to the store first.
        if self.entities.writes.shares_a_document(&batch) {
            self.commit_window();
        }
        let ticket = self.tickets.issue();
        self.queue_ticketed(batch, acks, ticket);
    }

    /// Queues a batch whose ticket was reserved earlier (the write window's).
    pub(crate) fn queue_ticketed(&mut self, batch: Batch, acks: Vec<Ack>, ticket: u64) {
        let held = Resident::hold(&self.resident.unstored, &batch);
        self.persist_queue.push(Pending {
            batch,
            acks,
            ticket,
            held,
        });
    }

    /// Starts every queued batch, waiting for a slot when [`MAX_PERSISTS_IN_FLIGHT`] are
    /// already in flight.
    ///
    /// Each batch enters the store's queue here, in order, and only the wait for its flush
    /// runs in the background. The store applies its queue in order and answers a batch
    /// after flushing it and everything before it, so a batch holding a document's later
    /// change never lands (or is acknowledged) before the one holding its earlier change.
    /// Had each batch reached the store from a task of its own, they could land in any
    /// order, and a kill could leave a later change on disk without the one it depends on:
    /// Automerge then keeps the later one aside for good, and an acknowledged write (say
    /// the registry entry of a new entity) is gone after the restart.
    pub(crate) async fn start_persists(&mut self) {
        for Pending {
            batch,
            acks,
            ticket,
            held,
        } in std::mem::take(&mut self.persist_queue)
        {
            let Ok(permit) = self.persists.clone().acquire_owned().await else {
                // Closed only when the node is gone.
                return;
            };
            let flight = Flight {
                salvage: Salvage::of(&batch),
                ops: batch.len(),
                acks,
                ticket,
                held,
            };
            let queued = self.store.queue_batch(batch).await;
            let unpersisted = self.unpersisted.clone();
            let finish = self.tickets.finish();
            let unstored = self.resident.unstored.clone();
            tokio::spawn(async move {
                persist(queued, flight, unpersisted, finish, unstored).await;
                drop(permit);
            });
        }
    }

    /// Stores `batch` now and waits for its flush, after every batch queued before it: the
    /// open write window's and the background ones are handed to the store first, so this
    /// one never lands ahead of an earlier change of the same document.
    pub(crate) async fn store_in_order(
        &mut self,
        batch: Batch,
    ) -> Result<(), hearth_storage::Error> {
        self.commit_window();
        self.start_persists().await;
        self.store.batch(batch).await
    }

    /// Once the store is back: writes a snapshot of every document a failed batch held,
    /// and the other records those batches lost.
    pub(crate) fn repersist(&mut self) {
        let lost = std::mem::take(
            &mut *self
                .unpersisted
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if lost.is_empty() {
            return;
        }
        tracing::info!(
            documents = lost.docs.len(),
            records = lost.records.len(),
            "the store is back; storing what it missed"
        );
        let mut batch = Batch::new();
        for ((keyspace, key), value) in lost.records {
            match value {
                Some(value) => batch.put(keyspace, key, value),
                None => batch.delete(keyspace, key),
            };
            if batch.len() >= MAX_REPERSIST_OPS {
                self.queue_persist(std::mem::take(&mut batch), Vec::new());
            }
        }
        for doc in lost.docs {
            // A document known only by its key has no content to store yet.
            if !self.has_content(doc) {
                continue;
            }
            match self.engine.snapshot(doc) {
                Ok(out) => {
                    let more = self.handle_outputs(out);
                    append(&mut batch, more);
                }
                Err(error) => {
                    tracing::warn!(%doc, %error, "cannot snapshot a document to store it again")
                }
            }
            if batch.len() >= MAX_REPERSIST_OPS {
                self.queue_persist(std::mem::take(&mut batch), Vec::new());
            }
        }
        self.queue_persist(batch, Vec::new());
    }
}

/// A fresh cap on in-flight persists.
pub(crate) fn persist_slots() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_PERSISTS_IN_FLIGHT))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use hearth_storage::{Batch, BatchOp, DocChunk, Entry, Error as StoreError, Keyspace, Scan};

    use crate::core::testing::TestCore;
    use crate::entities::batching::WriteWindow;

    const PROBE: &[u8] = b"test/order-probe";

    fn probe_batch(i: u32) -> Batch {
        let mut batch = Batch::new();
        batch.put(Keyspace::Meta, PROBE.to_vec(), i.to_be_bytes().to_vec());
        batch
    }

    /// An in-memory store that notes the probe value of each batch it applies, in order.
    struct Recording {
        inner: hearth_storage::MemStore,
        seen: Arc<Mutex<Vec<u32>>>,
    }

    impl hearth_storage::Store for Recording {
        fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(keyspace, key)
        }
        fn put(&mut self, keyspace: Keyspace, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
            self.inner.put(keyspace, key, value)
        }
        fn delete(&mut self, keyspace: Keyspace, key: &[u8]) -> Result<(), StoreError> {
            self.inner.delete(keyspace, key)
        }
        fn scan(&self, keyspace: Keyspace, scan: &Scan) -> Result<Vec<Entry>, StoreError> {
            self.inner.scan(keyspace, scan)
        }
        fn apply_batch(&mut self, batch: Batch) -> Result<(), StoreError> {
            for op in batch.ops() {
                if let BatchOp::Put { key, value, .. } = op
                    && key == PROBE
                {
                    let n = u32::from_be_bytes(value.as_slice().try_into().unwrap());
                    self.seen.lock().unwrap().push(n);
                }
            }
            self.inner.apply_batch(batch)
        }
        fn flush(&mut self) -> Result<(), StoreError> {
            self.inner.flush()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_batches_land_in_the_order_they_were_queued() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let store = hearth_storage::StoreHandle::spawn(Recording {
            inner: hearth_storage::MemStore::new(),
            seen: seen.clone(),
        })
        .unwrap();
        let t = TestCore::start_with("order", store, 32 * 1024 * 1024).await;
        t.on_core(|core| {
            Box::pin(async move {
                for round in 0..10u32 {
                    for i in 0..50u32 {
                        core.queue_persist(probe_batch(round * 50 + i), Vec::new());
                    }
                    core.start_persists().await;
                }
                // Stored after every batch queued before it.
                core.store_in_order(Batch::new()).await.unwrap();
            })
        })
        .await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, (0..500).collect::<Vec<u32>>());
        t.stop().await;
    }

    #[tokio::test]
    async fn batches_the_store_does_not_take_answer_their_writers() {
        let t = TestCore::start("refused").await;
        let answers = Arc::new(Mutex::new(Vec::new()));
        let seen = answers.clone();
        t.on_core(move |core| {
            Box::pin(async move {
                for i in 0..3u32 {
                    let seen = seen.clone();
                    let ack: super::Ack = Box::new(move |result| {
                        seen.lock().unwrap().push((i, result.is_err()));
                    });
                    core.queue_persist(probe_batch(i), vec![ack]);
                }
                // A store that is gone takes nothing: the first batch is refused at the
                // queue, the two after it fail with it, and every writer is answered.
                core.store.close().await.unwrap();
                core.start_persists().await;
            })
        })
        .await;
        assert_eq!(
            *answers.lock().unwrap(),
            vec![(0, true), (1, true), (2, true)]
        );
        t.stop().await;
    }

    #[tokio::test]
    async fn a_batch_that_writes_a_document_of_the_open_window_goes_after_it() {
        let t = TestCore::start("window").await;
        t.on_core(|core| {
            Box::pin(async move {
                core.entities.writes = WriteWindow::new(Duration::from_secs(60));
                let doc = [7u8; hearth_storage::DOC_ID_LEN];
                let mut first = Batch::new();
                first.put(
                    Keyspace::DocChunks,
                    DocChunk::Incremental(0).key(&doc),
                    vec![1],
                );
                core.reply_after_flush(Ok(((), first)), tokio::sync::oneshot::channel().0);
                // Another document's batch leaves the window open.
                let other = [8u8; hearth_storage::DOC_ID_LEN];
                let mut unrelated = Batch::new();
                unrelated.put(
                    Keyspace::DocChunks,
                    DocChunk::Incremental(0).key(&other),
                    vec![2],
                );
                core.queue_persist(unrelated, Vec::new());
                assert!(core.entities.writes.deadline().is_some());
                assert_eq!(core.persist_queue.len(), 1);
                // A later chunk of the window's document closes it first.
                let mut second = Batch::new();
                second.put(
                    Keyspace::DocChunks,
                    DocChunk::Incremental(1).key(&doc),
                    vec![3],
                );
                core.queue_persist(second, Vec::new());
                assert!(core.entities.writes.deadline().is_none());
                let seqs: Vec<Option<u64>> = core
                    .persist_queue
                    .iter()
                    .map(|p| {
                        p.batch.ops().iter().find_map(|op| match op {
                            hearth_storage::BatchOp::Put { key, .. } => DocChunk::parse(key)
                                .and_then(|(d, c)| {
                                    (d == doc).then_some(match c {
                                        DocChunk::Incremental(n) => n,
                                        DocChunk::Snapshot => u64::MAX,
                                    })
                                }),
                            _ => None,
                        })
                    })
                    .collect();
                assert_eq!(seqs, vec![None, Some(0), Some(1)]);
                core.start_persists().await;
            })
        })
        .await;
        t.stop().await;
    }
}
