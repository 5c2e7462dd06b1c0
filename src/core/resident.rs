//! Documents on demand. Every document's header and heads stay in memory (the engine's
//! unloaded entries, the digest tree), and so do the keys and the entity index; an entity
//! document itself is read from the store and handed to the engine when it is first used,
//! and a bounded LRU of loaded entity documents is kept under `Config::documents_cache_mib`.
//! The home's other documents (home, registry, rooms, users, ...) are few and always loaded.
//!
//! What keeps a document loaded, so that evicting it never loses anything:
//! - its chunks are not all durable: a batch holding one is queued or in flight
//!   ([`Resident::unstored`]), a write window is open, a failed batch left it to store
//!   again (durability.rs), or the store is failing;
//! - the engine holds something about it only in memory: a parked push, or a session with
//!   an exchange under way or a round due (`Engine::evictable`). Idle sessions are kept,
//!   encoded, with the unloaded entry and resume when the document loads again;
//! - it has no content yet (a document known only by its key).
//!
//! Each document's header and heads are stored next to its chunks, in the same batch, as
//! a meta record ([`crate::records::doc_meta_key`]); start-up reads those records instead
//! of rebuilding every document. A store written before them (no
//! [`crate::records::DOC_INDEX_KEY`]) is loaded whole once, and its records written.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use hearth_crdt::{ChangeHash, DocId, DocKind, Engine, Header, KeyEpoch};
use hearth_storage::{Batch, BatchOp, Keyspace, Scan};
use serde::{Deserialize, Serialize};

use super::{Core, LOAD_PAGE, StoredDoc};
use crate::Error;
use crate::records::{DOC_INDEX_KEY, DOC_META_PREFIX, DocChunk, doc_meta_key};

/// What a loaded document is counted as beyond its stored size: Automerge's indexes and
/// the engine's own state for a small document.
const DOC_OVERHEAD: usize = 16 * 1024;
/// Memory per stored byte of a loaded document (the saved form is compressed).
const BYTES_PER_STORED: usize = 4;
/// Documents looked at per trim, so a cache full of busy documents costs a bounded scan.
const TRIM_SCAN: usize = 512;
/// Documents loaded at once while a listing fills its views.
const VIEW_PAGE: usize = 256;
/// Documents read and decoded at once by [`Core::ensure_loaded_many`].
const LOAD_PARALLEL: usize = 4;

/// The LRU of loaded entity documents.
pub(crate) struct Resident {
    budget: usize,
    clock: u64,
    /// Loaded entity documents: last use and estimated size.
    used: HashMap<DocId, (u64, usize)>,
    order: BTreeSet<(u64, DocId)>,
    total: usize,
    /// Store batches queued or in flight per document whose chunks they hold.
    pub(crate) unstored: Arc<Mutex<HashMap<DocId, u32>>>,
    /// Documents loaded and evicted since start.
    pub(crate) loads: u64,
    pub(crate) evictions: u64,
}

impl Resident {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            budget,
            clock: 0,
            used: HashMap::new(),
            order: BTreeSet::new(),
            total: 0,
            unstored: Arc::default(),
            loads: 0,
            evictions: 0,
        }
    }

    /// Marks `doc` used now; `stored` adds to its size (bytes as stored).
    fn touch(&mut self, doc: DocId, stored: usize) {
        self.clock += 1;
        let grow = stored * BYTES_PER_STORED;
        let (at, size) = match self.used.entry(doc) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                self.total += DOC_OVERHEAD;
                v.insert((0, DOC_OVERHEAD))
            }
        };
        self.order.remove(&(*at, doc));
        *at = self.clock;
        *size += grow;
        self.total += grow;
        self.order.insert((self.clock, doc));
    }

    /// Counts `doc` anew from a snapshot of `stored` bytes, which replaces every chunk
    /// before it.
    fn resize(&mut self, doc: DocId, stored: usize) {
        self.forget(doc);
        self.touch(doc, stored);
    }

    pub(crate) fn forget(&mut self, doc: DocId) {
        if let Some((at, size)) = self.used.remove(&doc) {
            self.order.remove(&(at, doc));
            self.total = self.total.saturating_sub(size);
        }
    }

    /// Bytes the loaded entity documents are counted as.
    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Notes the documents whose chunks `batch` holds as not yet stored.
    pub(crate) fn hold(unstored: &Mutex<HashMap<DocId, u32>>, batch: &Batch) -> Vec<DocId> {
        let docs: BTreeSet<DocId> = batch
            .ops()
            .iter()
            .filter_map(|op| match op {
                BatchOp::Put { keyspace, key, .. } if *keyspace == Keyspace::DocChunks => {
                    DocChunk::parse(key).map(|(d, _)| DocId::from_bytes(d))
                }
                _ => None,
            })
            .collect();
        let mut map = unstored.lock().unwrap_or_else(PoisonError::into_inner);
        for doc in &docs {
            *map.entry(*doc).or_insert(0) += 1;
        }
        docs.into_iter().collect()
    }

    /// Undoes [`Resident::hold`] once the batch is stored (or failed, and was noted to
    /// store again).
    pub(crate) fn release(unstored: &Mutex<HashMap<DocId, u32>>, docs: &[DocId]) {
        let mut map = unstored.lock().unwrap_or_else(PoisonError::into_inner);
        for doc in docs {
            if let Some(n) = map.get_mut(doc) {
                *n -= 1;
                if *n == 0 {
                    map.remove(doc);
                }
            }
        }
    }
}

/// A document's meta record: what start-up keeps of it without loading it.
#[derive(Serialize, Deserialize)]
struct DocMeta {
    kind: String,
    owner: String,
    epoch: KeyEpoch,
    schema: u64,
    /// Heads, in hex.
    heads: Vec<String>,
    /// The generation this document replaces, as its record names it (unvalidated), so
    /// that start-up finds the generations held behind each entity without loading any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prev: Option<String>,
}

impl DocMeta {
    fn of(header: &Header, heads: &[ChangeHash], prev: Option<DocId>) -> Self {
        Self {
            kind: header.kind.as_str().to_string(),
            owner: header.owner_home.clone(),
            epoch: header.key_epoch,
            schema: header.schema_version,
            heads: heads.iter().map(|h| h.to_string()).collect(),
            prev: prev.map(|p| p.to_string()),
        }
    }

    fn parts(&self) -> Option<(Header, Vec<ChangeHash>)> {
        let header = Header {
            kind: DocKind::parse(&self.kind)?,
            owner_home: self.owner.clone(),
            key_epoch: self.epoch,
            schema_version: self.schema,
        };
        let heads = self
            .heads
            .iter()
            .map(|h| h.parse().ok())
            .collect::<Option<Vec<ChangeHash>>>()?;
        Some((header, heads))
    }
}

/// What a request needs loaded before it runs ([`Core::needs`]).
pub(crate) enum Needs {
    Docs(BTreeSet<DocId>),
    /// An entity's document and the generations held behind it (history, restore,
    /// storage figures read them all).
    Chain(DocId),
    Views,
    AllEntities,
}

/// Whether documents of `kind` are loaded on demand (the rest stay loaded).
fn on_demand(kind: DocKind) -> bool {
    kind == DocKind::Entity
}

impl Core {
    /// Adds `doc`'s meta record to `batch`, from the engine's current header and heads.
    pub(crate) fn put_doc_meta(&mut self, doc: DocId, batch: &mut Batch) {
        let Ok(heads) = self.engine.heads(doc) else {
            return;
        };
        let prev = self.engine.generation_prev(doc).ok().flatten();
        let Ok(header) = self.engine.header(doc) else {
            return;
        };
        match crate::records::to_json("document meta", &DocMeta::of(header, &heads, prev)) {
            Ok(bytes) => {
                batch.put(Keyspace::Meta, doc_meta_key(doc), bytes);
            }
            Err(error) => tracing::warn!(%doc, %error, "cannot encode a document's meta record"),
        }
    }

    /// Start-up from the meta records: entity documents are registered unloaded, the
    /// others loaded. Returns false when the store predates the records.
    pub(crate) async fn load_index(&mut self) -> Result<bool, Error> {
        if self
            .store
            .get(Keyspace::Meta, DOC_INDEX_KEY.to_vec())
            .await?
            .is_none()
        {
            return Ok(false);
        }
        self.load_stored_quarantine().await?;
        let mut after: Option<Vec<u8>> = None;
        let mut eager = Vec::new();
        loop {
            let mut scan = Scan::prefix(DOC_META_PREFIX.to_vec()).limit(LOAD_PAGE);
            if let Some(key) = after.clone() {
                scan = scan.after(key);
            }
            let page = self.store.scan(Keyspace::Meta, scan).await?;
            let full = page.len() == LOAD_PAGE;
            for (key, value) in page {
                after = Some(key.clone());
                let Some(doc) = key
                    .strip_prefix(DOC_META_PREFIX)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .map(DocId::from_bytes)
                else {
                    continue;
                };
                if self.quarantine.contains(doc) {
                    continue;
                }
                let meta = crate::records::from_json::<DocMeta>("document meta", &value).ok();
                if let Some(prev) = meta
                    .as_ref()
                    .and_then(|m| m.prev.as_deref())
                    .and_then(DocId::parse)
                {
                    self.note_generation_link(doc, prev);
                }
                let parts = meta.and_then(|m| m.parts());
                match parts {
                    Some((header, heads)) if on_demand(header.kind) && !heads.is_empty() => {
                        let _ = self.engine.insert_unloaded(doc, header, heads);
                    }
                    // Always loaded, or a record this build cannot read: load it now.
                    _ => eager.push(doc),
                }
            }
            if !full {
                break;
            }
        }
        for doc in eager {
            if let Some(stored) = self.read_doc(doc).await {
                self.load_many(vec![stored]).await;
            }
        }
        Ok(true)
    }

    /// The documents quarantined by an earlier run, as its stored list names them: they
    /// stay quarantined (not loaded) until `hearth repair --drop`.
    async fn load_stored_quarantine(&mut self) -> Result<(), Error> {
        let Some(bytes) = self
            .store
            .get(Keyspace::Meta, crate::records::QUARANTINE_KEY.to_vec())
            .await?
        else {
            return Ok(());
        };
        let listed: Vec<super::quarantine::Quarantined> =
            crate::records::from_json("quarantine list", &bytes).unwrap_or_default();
        for q in listed {
            let Some(doc) = DocId::parse(&q.doc) else {
                continue;
            };
            self.quarantine.add(doc, q.reason);
            let next = super::quarantine::next_chunk(&self.store, doc).await?;
            self.quarantine.saw_chunks(doc, next);
        }
        Ok(())
    }

    /// After a whole load of a store that predates meta records: writes one for every
    /// document, then the mark that says they are complete.
    pub(crate) async fn write_doc_index(&mut self) -> Result<(), Error> {
        let docs: Vec<DocId> = self.engine.documents().collect();
        let mut batch = Batch::new();
        for doc in docs {
            if self.engine.heads(doc).is_ok_and(|h| !h.is_empty()) {
                self.put_doc_meta(doc, &mut batch);
            }
            if batch.len() >= LOAD_PAGE {
                self.store.batch(std::mem::take(&mut batch)).await?;
            }
        }
        batch.put(Keyspace::Meta, DOC_INDEX_KEY.to_vec(), b"1".to_vec());
        self.store.batch(batch).await?;
        Ok(())
    }

    /// Reads one document's chunks, or `None` (logged, and the document quarantined)
    /// when one fails its integrity check.
    async fn read_doc(&mut self, doc: DocId) -> Option<StoredDoc> {
        match read_chunks(&self.store, doc).await {
            Ok((chunks, next)) => Some((doc, chunks, next)),
            Err((error, next)) => {
                self.quarantine_now(doc, format!("its records do not read: {error}"), next);
                None
            }
        }
    }

    /// Loads `doc` if it is held but not loaded, and marks it used. A document that does
    /// not load is quarantined (and tracked empty, so sync can refill it).
    pub(crate) async fn ensure_loaded(&mut self, doc: DocId) {
        if self.engine.is_loaded(doc) {
            if self.resident.used.contains_key(&doc) {
                self.resident.touch(doc, 0);
            }
            return;
        }
        if !self.engine.is_unloaded(doc) {
            return;
        }
        let begun = std::time::Instant::now();
        let load = read_and_decode(self.store.clone(), self.engine.actor().clone(), doc).await;
        self.install(doc, load);
        tracing::debug!(%doc, ms = begun.elapsed().as_millis() as u64, "loaded a document");
    }

    /// Loads every document of `docs` that is not loaded, reading and decoding up to
    /// [`LOAD_PARALLEL`] at once off the core: a catch-up after a restart, or a listing,
    /// needs many at once, and one after another they held the core (and every frame
    /// behind it) for the sum of their loads.
    pub(crate) async fn ensure_loaded_many(&mut self, docs: &[DocId]) {
        let mut wanted = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for doc in docs {
            if !seen.insert(*doc) {
                continue;
            }
            if self.engine.is_unloaded(*doc) {
                wanted.push(*doc);
            } else {
                // Loaded already (marked used), or not held at all.
                self.ensure_loaded(*doc).await;
            }
        }
        if wanted.is_empty() {
            return;
        }
        use futures::StreamExt;
        let begun = std::time::Instant::now();
        let count = wanted.len();
        let store = self.store.clone();
        let actor = self.engine.actor().clone();
        let loads = futures::stream::iter(wanted)
            .map(|doc| {
                let (store, actor) = (store.clone(), actor.clone());
                async move { (doc, read_and_decode(store, actor, doc).await) }
            })
            .buffered(LOAD_PARALLEL)
            .collect::<Vec<_>>()
            .await;
        for (doc, load) in loads {
            self.install(doc, load);
        }
        tracing::debug!(
            count,
            ms = begun.elapsed().as_millis() as u64,
            "loaded documents"
        );
    }

    /// Installs a document read and decoded off the core, or quarantines it.
    fn install(&mut self, doc: DocId, load: Load) {
        let (result, next) = match load {
            Ok((prepared, next, stored)) => match self.engine.finish_load(prepared) {
                Ok(()) => (Ok(stored), next),
                Err(error) => (Err(format!("its stored chunks do not load: {error}")), next),
            },
            Err((reason, next)) => (Err(reason), next),
        };
        match result {
            Ok(stored) => {
                self.chunk_seq.insert(doc, (next, 0));
                self.resident.loads += 1;
                self.resident.touch(doc, stored);
                // Batches stored out of order can leave a meta record behind its chunks;
                // the loaded document says where it really is.
                self.refresh_digest(doc);
            }
            Err(reason) => self.quarantine_now(doc, reason, next),
        }
    }

    /// Loads every entity document held (rare requests that may touch any of them). The
    /// cache trims back after the request.
    pub(crate) async fn load_all_entities(&mut self) {
        let docs: Vec<DocId> = self
            .engine
            .documents()
            .filter(|d| self.engine.is_unloaded(*d))
            .collect();
        self.ensure_loaded_many(&docs).await;
    }

    /// Fills the view cache of every readable entity whose view is not current, loading
    /// them a page at a time and trimming between pages, so a listing never needs every
    /// document loaded at once. A document whose view does not read stays loaded, for the
    /// listing to report.
    pub(crate) async fn fill_views(&mut self) {
        let docs: Vec<DocId> = self.entities.of_doc.keys().copied().collect();
        let mut stale = Vec::new();
        for doc in docs {
            let Ok(heads) = self.engine.heads(doc) else {
                continue;
            };
            if heads.is_empty() {
                continue;
            }
            if !matches!(self.entities.views.get(&doc), Some((seen, _)) if *seen == heads) {
                stale.push((doc, heads));
            }
        }
        let mut failed = Vec::new();
        for page in stale.chunks(VIEW_PAGE) {
            let docs: Vec<DocId> = page.iter().map(|(doc, _)| *doc).collect();
            self.ensure_loaded_many(&docs).await;
            for (doc, _) in page {
                // The loaded document's heads: a meta record can lag its chunks.
                let heads = self.engine.heads(*doc).unwrap_or_default();
                match self.entity_view(*doc) {
                    Ok(view) => {
                        self.entities.views.insert(*doc, (heads, Arc::new(view)));
                    }
                    Err(_) => failed.push(*doc),
                }
            }
            self.trim();
        }
        for doc in failed {
            self.ensure_loaded(doc).await;
        }
    }

    /// Quarantines a document that failed to load while running: it is listed (and the
    /// list stored), its records stay on disk, and an empty document takes its place so
    /// that devices of the home sync its content here again.
    fn quarantine_now(&mut self, doc: DocId, reason: String, next: u64) {
        tracing::error!(%doc, %reason, "a stored document is damaged and was not loaded; its records are kept (see `hearth repair`)");
        self.quarantine.add(doc, reason);
        self.quarantine.saw_chunks(doc, next);
        self.chunk_seq.insert(doc, (next, 0));
        let epoch = self.engine.header(doc).ok().map(|h| h.key_epoch);
        self.engine.remove_document(doc);
        self.forget_digest(doc);
        if let Some(epoch) = epoch {
            self.ensure_expected(doc, epoch);
        }
        match crate::records::to_json("quarantine list", &self.quarantine_list()) {
            Ok(list) => {
                let mut batch = Batch::new();
                batch.put(
                    Keyspace::Meta,
                    crate::records::QUARANTINE_KEY.to_vec(),
                    list,
                );
                self.queue_persist(batch, Vec::new());
            }
            Err(error) => tracing::warn!(%error, "cannot store the quarantine list"),
        }
    }

    /// Unloads the least recently used entity documents that may go (see the module
    /// notes) until the loaded ones fit the budget.
    pub(crate) fn trim(&mut self) {
        if self.resident.total <= self.resident.budget
            || self.store.is_failed()
            || self.entities.writes.deadline().is_some()
        {
            return;
        }
        let candidates: Vec<DocId> = self
            .resident
            .order
            .iter()
            .take(TRIM_SCAN)
            .map(|(_, d)| *d)
            .collect();
        let unstored = self.resident.unstored.clone();
        let unstored = unstored.lock().unwrap_or_else(PoisonError::into_inner);
        let lost = self.unpersisted.clone();
        let lost = lost.lock().unwrap_or_else(PoisonError::into_inner);
        for doc in candidates {
            if self.resident.total <= self.resident.budget {
                break;
            }
            // A quarantined document's stored records do not load: what sync refilled
            // lives only in memory until `hearth repair --drop` stores it anew.
            if unstored.contains_key(&doc) || lost.holds(doc) || self.quarantine.contains(doc) {
                continue;
            }
            if self.engine.evict(doc) {
                self.resident.forget(doc);
                self.resident.evictions += 1;
                self.chunk_seq.remove(&doc);
                if matches!(&self.entities.last_view, Some((d, _)) if *d == doc) {
                    self.entities.last_view = None;
                }
            }
        }
    }

    /// Marks a document that was just written to (locally or by a peer) as used, adding
    /// the chunk's size (a snapshot replaces what was counted); documents that are always
    /// loaded are not counted.
    pub(crate) fn note_written(&mut self, doc: DocId, stored: usize, snapshot: bool) {
        if !self.engine.header(doc).is_ok_and(|h| on_demand(h.kind)) {
            return;
        }
        if snapshot {
            self.resident.resize(doc, stored);
        } else {
            self.resident.touch(doc, stored);
        }
    }
}

impl Core {
    /// What a request is about to use: the entity documents it names; a listing's
    /// views; every entity document for the rare requests that may touch any of them
    /// (conflicts, sharing, revocation, test hooks).
    pub(crate) fn needs(&self, request: &super::Request) -> Needs {
        use super::Request;
        use crate::entities::service::EntityRequest as E;
        let ids: Vec<&str> = match request {
            Request::Entities(r) => match r {
                E::ListEntities { .. } => return Needs::Views,
                E::Conflicts { .. } => return Needs::AllEntities,
                E::Storage { id, .. }
                | E::EntityHistory { id, .. }
                | E::RestoreEntity { id, .. } => {
                    return self
                        .doc_of_entity(id)
                        .map_or_else(|| Needs::Docs(BTreeSet::new()), Needs::Chain);
                }
                E::SetMany { writes, .. } => writes.iter().map(|(id, _)| id.as_str()).collect(),
                E::SetEntity { id, .. }
                | E::SetPolicy { id, .. }
                | E::ResolveConflict { id, .. }
                | E::GetEntity { id, .. }
                | E::DeleteEntity { id, .. }
                | E::WriteRestored { id, .. } => vec![id.as_str()],
            },
            // Pairing and listing homes read the home document only.
            Request::Sharing(
                crate::sharing::service::SharingRequest::PairHome { .. }
                | crate::sharing::service::SharingRequest::HomePairDone { .. }
                | crate::sharing::service::SharingRequest::ListHomes { .. },
            ) => return Needs::Docs(BTreeSet::new()),
            Request::Sharing(_) | Request::Revocation(_) => return Needs::AllEntities,
            #[cfg(feature = "test-hooks")]
            Request::Hooks(
                crate::core::hooks::HookRequest::DocumentLoaded { .. }
                | crate::core::hooks::HookRequest::Sessions { .. },
            ) => {
                return Needs::Docs(BTreeSet::new());
            }
            #[cfg(feature = "test-hooks")]
            Request::Hooks(_) => return Needs::AllEntities,
            _ => return Needs::Docs(BTreeSet::new()),
        };
        Needs::Docs(
            ids.into_iter()
                .filter_map(|id| self.doc_of_entity(id))
                .collect(),
        )
    }

    /// Loads what [`Core::needs`] said.
    pub(crate) async fn load_needs(&mut self, needs: Needs) {
        match needs {
            Needs::Views => self.fill_views().await,
            Needs::AllEntities => self.load_all_entities().await,
            Needs::Chain(doc) => self.load_chain(doc).await,
            Needs::Docs(docs) => {
                for doc in docs {
                    self.ensure_loaded(doc).await;
                }
            }
        }
    }

    /// Loads the entity documents the registry now marks deleted, so that the index
    /// rebuild can announce each with its last state.
    pub(crate) async fn load_deleted_entities(&mut self) {
        let Ok(registry) = self.engine.registry(self.home.registry_doc) else {
            return;
        };
        let gone: Vec<DocId> = registry
            .entities
            .values()
            .filter(|e| e.deleted_at.is_some())
            .map(|e| e.doc)
            .filter(|d| self.entities.of_doc.contains_key(d) && self.engine.is_unloaded(*d))
            .collect();
        for doc in gone {
            self.ensure_loaded(doc).await;
        }
    }
}

/// Reads a document's meta record as start-up does, for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn decode_meta(bytes: &[u8]) {
    let meta = crate::records::from_json::<DocMeta>("document meta", bytes).ok();
    let _ = meta
        .as_ref()
        .and_then(|m| m.prev.as_deref())
        .and_then(DocId::parse);
}

/// A valid meta record, for the fuzz targets' seed corpus.
#[cfg(feature = "fuzzing")]
pub(crate) fn seed_for_fuzzing() -> Vec<u8> {
    let meta = DocMeta {
        kind: "entity".into(),
        owner: "home".into(),
        epoch: KeyEpoch::first([3; 16]),
        schema: 1,
        heads: vec!["ab".repeat(32)],
        prev: Some(DocId::from_bytes([1; 16]).to_string()),
    };
    crate::records::to_json("document meta", &meta).expect("a meta record encodes")
}

/// A document read from the store and rebuilt off the core: the prepared load, the
/// sequence number its next chunk takes and its stored bytes; or why it could not be,
/// with how far its chunks went.
type Load = Result<(hearth_crdt::PreparedLoad, u64, usize), (String, u64)>;

/// Reads `doc`'s chunks and rebuilds it on the blocking pool.
async fn read_and_decode(
    store: hearth_storage::StoreHandle,
    actor: hearth_crdt::ActorId,
    doc: DocId,
) -> Load {
    let (chunks, next) = read_chunks(&store, doc)
        .await
        .map_err(|(error, next)| (format!("its records do not read: {error}"), next))?;
    let stored: usize = chunks.iter().map(Vec::len).sum();
    let prepared =
        tokio::task::spawn_blocking(move || Engine::<String>::prepare_load(&actor, doc, chunks))
            .await
            .map_err(|error| (format!("its stored chunks do not load: {error}"), next))?;
    Ok((prepared, next, stored))
}

/// One document's chunks, in order, and the sequence number its next chunk takes; on a
/// failed read, the error and how far the chunks read so far went.
async fn read_chunks(
    store: &hearth_storage::StoreHandle,
    doc: DocId,
) -> Result<(Vec<Vec<u8>>, u64), (hearth_storage::Error, u64)> {
    let mut chunks = Vec::new();
    let mut next = 0u64;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut scan = Scan::prefix(DocChunk::prefix(doc.as_bytes())).limit(LOAD_PAGE);
        if let Some(key) = after.clone() {
            scan = scan.after(key);
        }
        let page = store
            .scan(Keyspace::DocChunks, scan)
            .await
            .map_err(|error| (error, next))?;
        let full = page.len() == LOAD_PAGE;
        for (key, value) in page {
            if let Some((_, DocChunk::Incremental(seq))) = DocChunk::parse(&key) {
                next = next.max(seq.saturating_add(1));
            }
            after = Some(key);
            chunks.push(value);
        }
        if !full {
            return Ok((chunks, next));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::TestCore;
    use crate::entities::service::EntityRequest;

    async fn get(t: &TestCore, id: &str) -> Option<String> {
        let id = id.to_string();
        t.core
            .call(move |reply| EntityRequest::GetEntity { id, reply })
            .await
            .unwrap()
            .unwrap()
            .map(|e| e.state)
    }

    async fn history(t: &TestCore, id: &str) -> Vec<String> {
        let id = id.to_string();
        t.core
            .call(move |reply| EntityRequest::EntityHistory {
                id,
                limit: 100,
                reply,
            })
            .await
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|v| v.version)
            .collect()
    }

    /// Waits for every batch to be stored, trims, and says whether `id`'s document is
    /// loaded afterwards.
    async fn trim_and_check(t: &TestCore, id: &str) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = id.to_string();
        t.on_core(move |core| {
            Box::pin(async move {
                for _ in 0..500 {
                    let idle = core
                        .resident
                        .unstored
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_empty();
                    if idle && core.persist_queue.is_empty() {
                        break;
                    }
                    core.start_persists().await;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                core.trim();
                let doc = core.doc_of_entity(&id).unwrap();
                let _ = tx.send(core.engine.is_loaded(doc));
            })
        })
        .await;
        rx.await.unwrap()
    }

    /// Under a budget too small for one document, every entity is unloaded once its
    /// chunks are stored, and a read, a write and a history listing each load it again;
    /// after a restart (from the meta records, nothing rebuilt up front) all of it is there.
    #[tokio::test]
    async fn an_evicted_entity_reloads_for_reads_writes_and_history_and_survives_restart() {
        let store = hearth_storage::open_in_memory().unwrap();
        let t = TestCore::start_with("hall", store.clone(), 1).await;
        t.set_entity("light.a", "on").await;
        t.set_entity("light.b", "on").await;
        assert!(
            !trim_and_check(&t, "light.a").await,
            "evicted under a tiny budget"
        );
        assert_eq!(get(&t, "light.a").await.as_deref(), Some("on"));
        assert!(!trim_and_check(&t, "light.a").await);
        t.set_entity("light.a", "off").await;
        assert!(!trim_and_check(&t, "light.a").await);
        let versions = history(&t, "light.a").await;
        assert_eq!(versions.len(), 2, "{versions:?}");
        assert!(!trim_and_check(&t, "light.a").await);
        let (tx, rx) = tokio::sync::oneshot::channel();
        t.on_core(move |core| {
            Box::pin(async move {
                let _ = tx.send((core.resident.loads, core.resident.evictions));
            })
        })
        .await;
        let (loads, evictions) = rx.await.unwrap();
        assert!(loads >= 3, "read, write and history loaded it: {loads}");
        assert!(evictions >= 4, "{evictions}");
        t.stop().await;

        let t = TestCore::start_with("hall", store.clone(), 1).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        t.on_core(move |core| {
            Box::pin(async move {
                let doc = core.doc_of_entity("light.a").unwrap();
                let _ = tx.send((core.engine.is_unloaded(doc), core.resident.loads));
            })
        })
        .await;
        assert_eq!(rx.await.unwrap(), (true, 0), "start-up loaded no entity");
        assert_eq!(get(&t, "light.a").await.as_deref(), Some("off"));
        assert_eq!(get(&t, "light.b").await.as_deref(), Some("on"));
        assert_eq!(history(&t, "light.a").await, versions);
        t.stop().await;
    }

    /// A store written before meta records (none, and no index mark) is loaded whole
    /// once; the records are written then, and the next start reads only them.
    #[tokio::test]
    async fn a_store_without_meta_records_is_loaded_whole_once_and_gets_them() {
        let store = hearth_storage::open_in_memory().unwrap();
        let t = TestCore::start_with("hall", store.clone(), 1).await;
        t.set_entity("light.a", "on").await;
        t.set_entity("light.b", "off").await;
        t.stop().await;
        let metas = store
            .scan(Keyspace::Meta, Scan::prefix(DOC_META_PREFIX.to_vec()))
            .await
            .unwrap();
        assert!(
            metas.len() >= 4,
            "home, registry and two entities: {}",
            metas.len()
        );
        let mut batch = Batch::new();
        for (key, _) in metas {
            batch.delete(Keyspace::Meta, key);
        }
        batch.delete(Keyspace::Meta, DOC_INDEX_KEY.to_vec());
        store.batch(batch).await.unwrap();

        let t = TestCore::start_with("hall", store.clone(), 1).await;
        assert_eq!(get(&t, "light.a").await.as_deref(), Some("on"));
        assert_eq!(get(&t, "light.b").await.as_deref(), Some("off"));
        t.stop().await;
        assert!(
            store
                .get(Keyspace::Meta, DOC_INDEX_KEY.to_vec())
                .await
                .unwrap()
                .is_some()
        );
        let metas = store
            .scan(Keyspace::Meta, Scan::prefix(DOC_META_PREFIX.to_vec()))
            .await
            .unwrap();
        assert!(metas.len() >= 4);

        let t = TestCore::start_with("hall", store, 1).await;
        assert!(!trim_and_check(&t, "light.b").await, "registered unloaded");
        assert_eq!(get(&t, "light.b").await.as_deref(), Some("off"));
        t.stop().await;
    }

    #[test]
    fn the_lru_counts_sizes_and_forgets() {
        let mut r = Resident::new(1);
        let (a, b) = (DocId::from_bytes([1; 16]), DocId::from_bytes([2; 16]));
        r.touch(a, 100);
        r.touch(b, 0);
        r.touch(a, 10);
        assert_eq!(r.total(), 2 * DOC_OVERHEAD + 110 * BYTES_PER_STORED);
        assert_eq!(r.order.iter().next().map(|(_, d)| *d), Some(b));
        r.resize(a, 50);
        assert_eq!(r.total(), 2 * DOC_OVERHEAD + 50 * BYTES_PER_STORED);
        r.forget(b);
        r.forget(a);
        assert_eq!(r.total(), 0);
        assert!(r.order.is_empty());
    }
}
