//! Loading stored documents at start, and creating a new home on first start.

use super::*;
use crate::Error;
use crate::records::CERT_KEY;
use crate::records::DocChunk;
use crate::records::HOME_KEY;
use crate::trust::cert::DeviceCert;
use hearth_crdt::schema::home as home_schema;
use hearth_crdt::{DocId, Engine, KeyEpoch};
use hearth_storage::{Keyspace, Scan};

/// Rebuilds documents on `threads` threads, keeping their order.
fn prepare_all(
    actor: &automerge::ActorId,
    docs: Vec<StoredDoc>,
    threads: usize,
) -> Vec<(hearth_crdt::PreparedLoad, u64)> {
    let per = docs.len().div_ceil(threads).max(1);
    let mut parts: Vec<Vec<StoredDoc>> = Vec::new();
    let mut docs = docs.into_iter().peekable();
    while docs.peek().is_some() {
        parts.push(docs.by_ref().take(per).collect());
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    part.into_iter()
                        .map(|(doc, chunks, next)| {
                            (Engine::<String>::prepare_load(actor, doc, chunks), next)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        // A rebuild that panics is caught inside prepare_load; a join error would be a
        // bug here, and losing that part's documents beats taking the node down.
        handles
            .into_iter()
            .flat_map(|h| {
                h.join().unwrap_or_else(|_| {
                    tracing::error!("a loader thread failed; its documents stay on disk, unloaded");
                    Vec::new()
                })
            })
            .collect()
    })
}

impl Core {
    /// Reads every document's chunks in key order (snapshot first, then increments) and
    /// loads them. A document with a record that fails its integrity check, or that fails
    /// to load, is quarantined (quarantine.rs): logged, listed, and left on disk untouched,
    /// so nothing stored is lost and the rest of the node still starts.
    pub(crate) async fn load_documents(&mut self) -> Result<(), Error> {
        if self.load_index().await? {
            return Ok(());
        }
        self.load_every_document().await?;
        self.write_doc_index().await
    }

    /// Loads every stored document whole: a store written before meta records.
    async fn load_every_document(&mut self) -> Result<(), Error> {
        let mut current: Option<StoredDoc> = None;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let mut scan = Scan::all().limit(LOAD_PAGE);
            if let Some(key) = after.clone() {
                scan = scan.after(key);
            }
            let page: Vec<quarantine::LoadedRecord> =
                match self.store.scan(Keyspace::DocChunks, scan).await {
                    Ok(page) => page.into_iter().map(|(k, v)| (k, Ok(v))).collect(),
                    // One damaged record fails the whole page: read this page again record
                    // by record, to tell the damaged ones from the rest.
                    Err(hearth_storage::Error::Integrity { .. }) => {
                        quarantine::scan_chunks_one_by_one(&self.store, after.clone(), LOAD_PAGE)
                            .await?
                    }
                    Err(error) => return Err(error.into()),
                };
            let full = page.len() == LOAD_PAGE;
            let mut complete = Vec::new();
            for (key, value) in page {
                after = Some(key.clone());
                let Some((doc, chunk)) = DocChunk::parse(&key) else {
                    tracing::warn!(key = %hex::encode(&key), "skipping unrecognised chunk key");
                    continue;
                };
                let doc = DocId::from_bytes(doc);
                if current.as_ref().is_some_and(|(d, _, _)| *d != doc)
                    && let Some(done) = current.take()
                {
                    self.finish_stored(done, &mut complete);
                }
                let (_, chunks, next) = current.get_or_insert_with(|| (doc, Vec::new(), 0));
                if let DocChunk::Incremental(seq) = chunk {
                    *next = (*next).max(seq.saturating_add(1));
                }
                match value {
                    Ok(value) => chunks.push(value),
                    Err(reason) => {
                        chunks.clear();
                        self.quarantine.add(doc, reason);
                    }
                }
            }
            if !full && let Some(done) = current.take() {
                self.finish_stored(done, &mut complete);
            }
            self.load_many(complete).await;
            if !full {
                break;
            }
        }
        Ok(())
    }

    /// A document whose records are all read: to load, or, when quarantined, only its
    /// chunk numbers noted.
    pub(crate) fn finish_stored(&mut self, done: StoredDoc, complete: &mut Vec<StoredDoc>) {
        let (doc, _, next) = &done;
        if self.quarantine.contains(*doc) {
            self.quarantine.saw_chunks(*doc, *next);
        } else {
            complete.push(done);
        }
    }

    /// Rebuilds documents from their chunks on every core, then adds them to the engine.
    pub(crate) async fn load_many(&mut self, docs: Vec<StoredDoc>) {
        if docs.is_empty() {
            return;
        }
        let sizes: Vec<usize> = docs
            .iter()
            .map(|(_, chunks, _)| chunks.iter().map(Vec::len).sum())
            .collect();
        let actor = self.engine.actor().clone();
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let prepared =
            tokio::task::spawn_blocking(move || prepare_all(&actor, docs, threads)).await;
        let prepared = match prepared {
            Ok(p) => p,
            Err(error) => {
                tracing::error!(%error, "loading documents failed; their chunks are kept on disk");
                return;
            }
        };
        for ((prepared, next_seq), stored) in prepared.into_iter().zip(sizes) {
            let doc = prepared.id();
            match self.engine.finish_load(prepared) {
                Ok(()) => {
                    self.chunk_seq.insert(doc, (next_seq, 0));
                    self.note_written(doc, stored, true);
                }
                Err(error) => {
                    self.quarantine
                        .add(doc, format!("its stored chunks do not load: {error}"));
                    self.quarantine.saw_chunks(doc, next_seq);
                }
            }
        }
    }

    /// Writes a new home's documents and record, and this device's admin certificate; this
    /// device is the home's first member.
    pub(crate) async fn create_home(&mut self, device_name: &str) -> Result<(), Error> {
        let record = self.home.clone();
        let name = record.name.clone();
        let epoch = KeyEpoch::first(*self.engine_actor_bytes());
        let now = now_ms();
        let mut out = self
            .engine
            .create_home(record.home_doc, &record.home_id, epoch, &name, now)
            .map_err(doc_err)?;
        out.extend(
            self.engine
                .create_registry(record.registry_doc, &record.home_id, epoch, now)
                .map_err(doc_err)?,
        );
        let mut batch = self.handle_outputs(out);
        for doc in [record.home_doc, record.registry_doc] {
            self.keyring.insert(doc, epoch, new_key()?, &mut batch);
        }
        let root = record
            .root_secret
            .map(|s| ed25519_dalek::SigningKey::from_bytes(&s))
            .ok_or_else(|| Error::Internal("a new home has no root key".into()))?;
        let device_name = clean_device_name(device_name);
        let cert = DeviceCert::issue(
            &root,
            &self.peer_id,
            self.device.public(),
            &device_name,
            now,
            true,
        )
        .and_then(|c| c.encode())
        .map_err(|e| Error::Internal(format!("cannot issue this device's certificate: {e}")))?;
        let record_for_doc = home_schema::DeviceRecord {
            name: device_name.clone(),
            certificate: cert.clone(),
            revoked_at: None,
        };
        let peer_id = self.peer_id.clone();
        let (_, out) = self
            .engine
            .transact(record.home_doc, now, None, |d, _, _| {
                home_schema::put_device(d, &peer_id, &record_for_doc)
            })
            .map_err(doc_err)?;
        let more = self.handle_outputs(out);
        append(&mut batch, more);
        batch.put(Keyspace::Meta, CERT_KEY.to_vec(), cert);
        // The record goes in the same atomic batch as the documents it names.
        batch.put(Keyspace::Meta, HOME_KEY.to_vec(), record.encode()?);
        self.store.batch(batch).await?;
        tracing::info!(home_id = %record.home_id, "created a new home with this device as its admin");
        Ok(())
    }

    /// This device's certificate, as stored at home creation or at pairing.
    pub(crate) async fn load_certificate(&self) -> Result<Vec<u8>, Error> {
        let bytes = self
            .store
            .get(Keyspace::Meta, CERT_KEY.to_vec())
            .await?
            .ok_or(Error::CorruptRecord {
                what: "device certificate",
                detail: "missing".into(),
            })?;
        match DeviceCert::verify_bytes(&bytes, &self.home.root_public) {
            crate::trust::cert::Verdict::Valid(_) => Ok(bytes),
            other => Err(Error::CorruptRecord {
                what: "device certificate",
                detail: format!("{other:?}"),
            }),
        }
    }
}
