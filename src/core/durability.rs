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
use hearth_storage::{Batch, BatchOp, Keyspace, StoreHandle};
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
        let mut docs = BTreeSet::new();
        let mut records = Vec::new();
        for op in batch.ops() {
            match op {
                BatchOp::Put { keyspace, key, .. } | BatchOp::Delete { keyspace, key }
                    if *keyspace == Keyspace::DocChunks =>
                {
                    if let Some((doc, _)) = DocChunk::parse(key) {
                        docs.insert(DocId::from_bytes(doc));
                    }
                }
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

/// Stores one batch and answers its writers; a failure is remembered for the recovery.
async fn persist(
    store: StoreHandle,
    Pending {
        batch,
        acks,
        ticket,
        held,
    }: Pending,
    unpersisted: Arc<Mutex<Unpersisted>>,
    finish: super::send_gate::Finish,
    unstored: Arc<Mutex<HashMap<DocId, u32>>>,
) {
    // Finished however this ends, a panic included, so frames never wait for it forever.
    let finished = finish.on_drop(ticket);
    let salvage = Salvage::of(&batch);
    let ops = batch.len();
    let begun = std::time::Instant::now();
    let result = store.batch(batch).await;
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
    pub(crate) async fn start_persists(&mut self) {
        for pending in std::mem::take(&mut self.persist_queue) {
            let Ok(permit) = self.persists.clone().acquire_owned().await else {
                // Closed only when the node is gone.
                return;
            };
            let store = self.store.clone();
            let unpersisted = self.unpersisted.clone();
            let finish = self.tickets.finish();
            let unstored = self.resident.unstored.clone();
            tokio::spawn(async move {
                persist(store, pending, unpersisted, finish, unstored).await;
                drop(permit);
            });
        }
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
