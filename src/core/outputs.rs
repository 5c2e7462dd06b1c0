//! What a step of the engine produced, carried out: store batches, frames for peers, events; and new documents of this home, whose keys every device gets.

use super::*;
use crate::Error;
use crate::home::HomeRecord;
use crate::records::DocChunk;
use crate::trust::cert::DeviceCert;
use crate::trust::keys::{self as doc_keys, DocKey};
use hearth_crdt::schema::home as home_schema;
use hearth_crdt::wire::Frame;
use hearth_crdt::{ChunkKind, DocId, Engine, KeyEpoch, Origin, Output};
use hearth_storage::{Batch, Keyspace};
use std::sync::Arc;

impl Core {
    /// Turns engine outputs into one store batch, and change events.
    pub(crate) fn handle_outputs(&mut self, outputs: Vec<Output<String>>) -> Batch {
        let mut batch = Batch::new();
        let mut written = std::collections::BTreeSet::new();
        for output in outputs {
            match output {
                Output::PersistChunk { doc, kind, bytes } => {
                    self.refresh_digest(doc);
                    self.note_written(doc, bytes.len(), kind == ChunkKind::Snapshot);
                    written.insert(doc);
                    let (next, live_from) = self.chunk_seq.entry(doc).or_insert((0, 0));
                    match kind {
                        ChunkKind::Snapshot => {
                            batch.put(
                                Keyspace::DocChunks,
                                DocChunk::Snapshot.key(doc.as_bytes()),
                                bytes,
                            );
                            // The snapshot covers every chunk so far; drop them in the
                            // same atomic batch.
                            for seq in *live_from..*next {
                                batch.delete(
                                    Keyspace::DocChunks,
                                    DocChunk::Incremental(seq).key(doc.as_bytes()),
                                );
                            }
                            *live_from = *next;
                        }
                        ChunkKind::Incremental => {
                            batch.put(
                                Keyspace::DocChunks,
                                DocChunk::Incremental(*next).key(doc.as_bytes()),
                                bytes,
                            );
                            *next += 1;
                        }
                    }
                }
                Output::PersistSyncState { peer, doc, state } => {
                    batch.put(
                        Keyspace::SyncStates,
                        crate::records::sync_state_key(&peer, doc),
                        state,
                    );
                }
                Output::Changed {
                    doc,
                    origin,
                    correlation_id,
                    heads,
                    ..
                } if self.entities.of_doc.contains_key(&doc) => {
                    self.note_generation_change(doc, !matches!(origin, Origin::Local));
                    let from_peer = match origin {
                        Origin::Peer(peer) => Some(peer),
                        _ => None,
                    };
                    // A change that came by sync carries no id on the frame; the document
                    // holds the one its writer gave.
                    let correlation_id = match (&from_peer, correlation_id) {
                        (Some(_), None) => self
                            .engine
                            .doc(doc)
                            .ok()
                            .and_then(hearth_crdt::schema::entity::correlation_id),
                        (_, id) => id,
                    };
                    match self.entity_view(doc) {
                        Ok(entity) => {
                            // The writer answers with this same view, read once, and
                            // listings reuse it.
                            self.entities
                                .views
                                .insert(doc, (heads, Arc::new(entity.clone())));
                            self.entities.last_view = Some((doc, entity.clone()));
                            self.emit(entity, from_peer, correlation_id)
                        }
                        Err(error) => {
                            tracing::warn!(%doc, %error, "change left an entity that does not validate")
                        }
                    }
                }
                Output::Changed { doc, origin, .. } => {
                    let from_peer = match origin {
                        Origin::Peer(peer) => Some(peer),
                        _ => None,
                    };
                    if doc == self.home.home_doc {
                        self.home_devices_changed();
                        self.on_home_doc_changed();
                    }
                    self.note_generation_change(doc, from_peer.is_some());
                    self.on_users_changed(doc, from_peer.clone());
                    self.on_activity_changed(doc, from_peer.clone());
                    self.on_doc_changed(doc, from_peer);
                }
                Output::Send { peer, frame } => self.outbox.push((peer, frame)),
                Output::Conflict(record) => self.on_conflict_record(record),
                Output::Timer { .. } => {
                    // The run loop asks the engine for its next deadline each turn.
                }
                _ => {}
            }
        }
        // Each written document's header and heads, in the same atomic batch as its chunks.
        for doc in written {
            self.put_doc_meta(doc, &mut batch);
        }
        batch
    }

    /// Persists outputs that no caller waits for (timers, remote changes). The batch
    /// starts once a slot is free (durability.rs).
    pub(crate) fn persist_in_background(&mut self, outputs: Vec<Output<String>>) {
        let batch = self.handle_outputs(outputs);
        if batch.is_empty() {
            return;
        }
        self.queue_persist(batch, Vec::new());
    }

    /// Creates a new document of this home through `create`, with a fresh key wrapped in
    /// the home document for every other device, and pushes it whole to every admitted
    /// device with a sync session opened for each. Entities and rooms are created this
    /// way, so every device of the home can open them when the home document syncs.
    pub(crate) fn create_shared_doc(
        &mut self,
        doc: DocId,
        now: u64,
        correlation_id: Option<String>,
        create: impl FnOnce(
            &mut Engine<String>,
            DocId,
            KeyEpoch,
            &HomeRecord,
        ) -> Result<Vec<Output<String>>, Error>,
    ) -> Result<(DocId, Batch), Error> {
        let epoch = KeyEpoch::first(*self.engine_actor_bytes());
        let key = new_key()?;
        let wraps = self.wrap_for_devices(&key, doc, epoch);
        // The key, wrapped for every other device, rides in the home document so each
        // device can open the new document when it syncs.
        let (_, home_out) = self
            .engine
            .transact(self.home.home_doc, now, None, |d, _, _| {
                for (peer, wrapped) in &wraps {
                    home_schema::put_wrapped_key(d, doc, &epoch, peer, wrapped)?;
                }
                Ok(())
            })
            .map_err(doc_err)?;
        let mut out = create(&mut self.engine, doc, epoch, &self.home)?;
        out.extend(home_out);
        // The whole new document, to push to every device right away: a new document
        // then needs no sync round trip, so it reaches peers as fast as an update does
        // (and before this node could die after acknowledging).
        let snapshot = out
            .iter()
            .find_map(|o| match o {
                Output::PersistChunk {
                    doc: d,
                    kind: ChunkKind::Snapshot,
                    bytes,
                } if *d == doc => Some(bytes),
                _ => None,
            })
            // A push carries change chunks, not a saved document; the new document is
            // one small change, so converting it costs little.
            .and_then(|bytes| automerge::Automerge::load(bytes).ok())
            .map(|d| d.save_after(&[]));
        let mut batch = self.handle_outputs(out);
        self.keyring.insert(doc, epoch, key, &mut batch);
        let peers: Vec<String> = self.peers.admitted.keys().cloned().collect();
        for peer in peers {
            if let Some(bytes) = &snapshot {
                self.outbox.push((
                    peer.clone(),
                    Frame::Push(hearth_crdt::wire::Push {
                        doc,
                        epoch,
                        correlation_id: correlation_id.clone(),
                        bytes: bytes.clone(),
                    }),
                ));
            }
            // With the whole document pushed, the session starts in sync and sends no
            // opening message: the peer opens its own exchange once it learns the key
            // (`learn_keys`), which also covers a push it could not open yet. An opening
            // message from here too doubled the frames of a burst of new documents, and
            // such bursts overflowed a slow peer's queue.
            let attached = if snapshot.is_some() {
                self.engine
                    .attach_in_sync(peer.clone(), doc, None)
                    .map(|()| Vec::new())
            } else {
                self.engine.attach(peer.clone(), doc, None, now)
            };
            match attached {
                Ok(out) => {
                    let more = self.handle_outputs(out);
                    append(&mut batch, more);
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "cannot open a session for a new document")
                }
            }
        }
        Ok((doc, batch))
    }

    pub(crate) fn wrap_for_devices(
        &self,
        key: &DocKey,
        doc: DocId,
        epoch: KeyEpoch,
    ) -> Vec<(String, Vec<u8>)> {
        // Only the device records: the whole home view holds every document's wrapped
        // keys, and reading it for each new document made creating D documents O(D^2).
        let Ok(devices) = self.engine.home_devices(self.home.home_doc) else {
            return Vec::new();
        };
        devices
            .iter()
            .filter(|(peer, record)| {
                **peer != self.peer_id
                    && record.revoked_at.is_none()
                    && !self.sharing.revoking.contains(*peer)
                    && !self.revocations.contains(peer)
            })
            .filter_map(|(peer, record)| {
                let cert = DeviceCert::decode(&record.certificate).ok()?;
                match doc_keys::wrap_key(key, doc, epoch, cert.x25519_public()) {
                    Ok(w) => Some((peer.clone(), w.to_bytes().to_vec())),
                    Err(error) => {
                        tracing::warn!(%peer, %error, "cannot wrap a key for device");
                        None
                    }
                }
            })
            .collect()
    }

    /// Takes a document out of the digest tree; a digest session in progress syncs it
    /// rather than trusting a comparison made before.
    pub(crate) fn forget_digest(&mut self, doc: DocId) {
        if self.digest.remove(&doc).is_some() {
            self.peers.heads_moved(doc);
        }
    }

    /// Records a document's current heads in the digest tree.
    pub(crate) fn refresh_digest(&mut self, doc: DocId) {
        // Another home's entity is never reconciled with this home's devices.
        if self.is_foreign_doc(doc) {
            return;
        }
        if let Ok(heads) = self.engine.heads(doc) {
            let hash = hearth_crdt::digest::heads_hash(&heads);
            if self.digest.insert(doc, hash) != Some(hash) {
                self.peers.heads_moved(doc);
            }
        }
    }

    /// Wraps `key` for every unrevoked device in the home document except this one.
    /// Tells the network which peers are this home's devices, so a flood of strangers
    /// never takes the connection slots they need (even before they connect this run).
    pub(crate) async fn reserve_own_devices(&mut self) {
        let Ok(devices) = self.engine.home_devices(self.home.home_doc) else {
            return;
        };
        for peer in devices.keys() {
            if *peer == self.peer_id || self.is_revoked(peer) {
                continue;
            }
            if let Ok(id) = peer.parse::<hearth_net::PeerId>()
                && let Err(error) = self.net.reserve_peer(id).await
            {
                tracing::warn!(%peer, %error, "cannot reserve a slot for a device of this home");
            }
        }
    }

    /// Runs `job` on the blocking pool, at most `READ_JOBS` at once, and sends its
    /// answer. For reads whose cost grows with history or with the number of
    /// documents: `job` works on a snapshot the core took, so the core goes on serving.
    pub(crate) fn spawn_read<T: Send + 'static>(
        &self,
        reply: Reply<T>,
        job: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) {
        let permits = self.read_jobs.clone();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                // The semaphore is never closed.
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                let result = tokio::task::spawn_blocking(job)
                    .await
                    .unwrap_or_else(|e| Err(Error::Internal(format!("read job failed: {e}"))));
                let _ = reply.send(result);
            },
            tracing::error_span!("read_job"),
        ));
    }

    /// Announces an event to library subscribers and counts it by name.
    pub(crate) fn emit_event(&self, event: crate::events::Event) {
        self.metrics.event(event.metric_name());
        let _ = self.node_events.send(event);
    }

    /// Announces that an admitted device came or went.
    pub(crate) fn notice_peer(&self, peer: String, connected: bool) {
        let device_name = self
            .engine
            .home_devices(self.home.home_doc)
            .ok()
            .and_then(|devices| devices.get(&peer).map(|d| d.name.clone()));
        let peer = peer.into();
        let event = if connected {
            crate::events::Event::PeerConnected { peer, device_name }
        } else {
            crate::events::Event::PeerDisconnected { peer, device_name }
        };
        // Left out of `hearth_events_total`: the connected-peers gauge covers arrivals.
        let _ = self.node_events.send(event);
    }
}
