//! Documents whose stored records cannot be loaded at start.
//!
//! One damaged record (it fails its integrity check, or its chunks do not rebuild a
//! document) must not keep the node from starting. Its document is quarantined instead:
//! it is not loaded, its records stay on disk untouched (so nothing is lost to a bug in
//! the check), and it is listed in the meta record [`QUARANTINE_KEY`], in `/api/status`
//! and by `hearth repair`. Devices of the home still sync the document to this one, under
//! chunk numbers past the damaged ones. `hearth repair --drop` deletes the damaged
//! records (keeping a fresh snapshot of whatever content has arrived since), and the next
//! start is clean.

use crate::records::QUARANTINE_KEY;
use std::collections::BTreeMap;

use crate::records::DocChunk;
use hearth_crdt::DocId;
use hearth_storage::{Batch, Keyspace, Scan, StoreHandle};
use serde::Serialize;

use super::{Core, append};
use crate::Error;

/// A quarantined document, as listed.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub(crate) struct Quarantined {
    /// The document id, in base58.
    pub(crate) doc: String,
    /// Why it could not be loaded.
    pub(crate) reason: String,
    /// The entity it holds, when the registry names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) entity: Option<String>,
}

/// What `hearth repair` shows: the documents still quarantined, and those just dropped.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RepairReport {
    pub(crate) quarantined: Vec<Quarantined>,
    pub(crate) dropped: Vec<Quarantined>,
}

/// Quarantined documents by id, with the reason and the next free chunk number.
#[derive(Default)]
pub(crate) struct Quarantine {
    docs: BTreeMap<DocId, (String, u64)>,
}

impl Quarantine {
    /// Quarantines `doc`; the first reason found is kept.
    pub(crate) fn add(&mut self, doc: DocId, reason: String) {
        self.docs.entry(doc).or_insert((reason, 0));
    }

    pub(crate) fn contains(&self, doc: DocId) -> bool {
        self.docs.contains_key(&doc)
    }

    /// Notes the chunk numbers seen for a quarantined document, so new chunks never reuse one.
    pub(crate) fn saw_chunks(&mut self, doc: DocId, next: u64) {
        if let Some((_, at)) = self.docs.get_mut(&doc) {
            *at = (*at).max(next);
        }
    }
}

/// One record as read at start: its value, or why it could not be opened.
pub(crate) type LoadedRecord = (Vec<u8>, Result<Vec<u8>, String>);

/// Reads up to `limit` chunk records after `after` one at a time, so a record that fails
/// its integrity check is reported on its own instead of failing the whole page.
pub(crate) async fn scan_chunks_one_by_one(
    store: &StoreHandle,
    mut after: Option<Vec<u8>>,
    limit: usize,
) -> Result<Vec<LoadedRecord>, Error> {
    let mut out = Vec::new();
    while out.len() < limit {
        let mut scan = Scan::all().limit(1);
        if let Some(key) = &after {
            scan = scan.after(key.clone());
        }
        match store.scan(Keyspace::DocChunks, scan).await {
            Ok(mut one) => match one.pop() {
                Some((key, value)) => {
                    after = Some(key.clone());
                    out.push((key, Ok(value)));
                }
                None => break,
            },
            Err(hearth_storage::Error::Integrity { key, .. }) => {
                let key = key.as_bytes().to_vec();
                after = Some(key.clone());
                out.push((
                    key,
                    Err("a stored record failed its integrity check".into()),
                ));
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(out)
}

/// Every stored chunk key of `doc`, damaged records included.
/// The first chunk number past every stored chunk of `doc`.
pub(crate) async fn next_chunk(store: &StoreHandle, doc: DocId) -> Result<u64, Error> {
    Ok(chunk_keys(store, doc)
        .await?
        .iter()
        .filter_map(|k| match DocChunk::parse(k) {
            Some((_, DocChunk::Incremental(seq))) => Some(seq.saturating_add(1)),
            _ => None,
        })
        .max()
        .unwrap_or(0))
}

pub(crate) async fn chunk_keys(store: &StoreHandle, doc: DocId) -> Result<Vec<Vec<u8>>, Error> {
    let prefix = DocChunk::prefix(doc.as_bytes());
    let mut keys = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let mut scan = Scan::prefix(prefix.clone()).limit(1);
        if let Some(key) = &after {
            scan = scan.after(key.clone());
        }
        let key = match store.scan(Keyspace::DocChunks, scan).await {
            Ok(mut one) => match one.pop() {
                Some((key, _)) => key,
                None => break,
            },
            Err(hearth_storage::Error::Integrity { key, .. }) => key.as_bytes().to_vec(),
            Err(error) => return Err(error.into()),
        };
        if !key.starts_with(&prefix) {
            break;
        }
        after = Some(key.clone());
        keys.push(key);
    }
    Ok(keys)
}

impl Core {
    /// After loading: logs and lists the quarantined documents in the meta record, and
    /// keeps their chunk numbers clear of the damaged ones.
    pub(crate) async fn record_quarantine(&mut self) -> Result<(), Error> {
        let listed = self
            .store
            .get(Keyspace::Meta, QUARANTINE_KEY.to_vec())
            .await?;
        if self.quarantine.docs.is_empty() {
            if listed.is_some() {
                self.store
                    .delete(Keyspace::Meta, QUARANTINE_KEY.to_vec())
                    .await?;
            }
            return Ok(());
        }
        for (doc, (reason, next)) in &self.quarantine.docs {
            tracing::error!(%doc, %reason, "a stored document is damaged and was not loaded; its records are kept (see `hearth repair`)");
            self.chunk_seq.insert(*doc, (*next, 0));
        }
        let list = crate::records::to_json("quarantine list", &self.quarantine_list())?;
        self.store
            .put(Keyspace::Meta, QUARANTINE_KEY.to_vec(), list)
            .await?;
        Ok(())
    }

    pub(crate) fn quarantine_list(&self) -> Vec<Quarantined> {
        self.quarantine
            .docs
            .iter()
            .map(|(doc, (reason, _))| Quarantined {
                doc: doc.to_string(),
                reason: reason.clone(),
                entity: self.entities.of_doc.get(doc).cloned(),
            })
            .collect()
    }

    /// Lists the quarantined documents; with `drop`, deletes their stored records (and
    /// stores a fresh snapshot of any content that has arrived since), so the next start
    /// is clean.
    pub(crate) async fn repair(&mut self, drop: bool) -> Result<RepairReport, Error> {
        let listed = self.quarantine_list();
        if !drop || listed.is_empty() {
            return Ok(RepairReport {
                quarantined: listed,
                dropped: Vec::new(),
            });
        }
        let mut batch = Batch::new();
        let docs: Vec<DocId> = self.quarantine.docs.keys().copied().collect();
        let store = self.store.clone();
        for doc in &docs {
            for key in chunk_keys(&store, *doc).await? {
                batch.delete(Keyspace::DocChunks, key);
            }
            // Content synced since start is kept: its snapshot (and meta record) lands
            // after the deletes; without content, no record may name the document.
            batch.delete(Keyspace::Meta, crate::records::doc_meta_key(*doc));
            if self.has_content(*doc) {
                self.chunk_seq.insert(*doc, (0, 0));
                match self.engine.snapshot(*doc) {
                    Ok(out) => {
                        let more = self.handle_outputs(out);
                        append(&mut batch, more);
                    }
                    Err(error) => {
                        tracing::warn!(%doc, %error, "cannot snapshot a repaired document")
                    }
                }
            }
        }
        batch.delete(Keyspace::Meta, QUARANTINE_KEY.to_vec());
        self.store_in_order(batch).await?;
        self.quarantine.docs.clear();
        tracing::info!(
            documents = docs.len(),
            "dropped the damaged records of quarantined documents"
        );
        Ok(RepairReport {
            quarantined: Vec::new(),
            dropped: listed,
        })
    }
}
