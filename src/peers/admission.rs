//! The core's side of the network: admission by device certificate, sealing frames under
//! document keys, routing received frames into the engine, and learning document keys
//! that other devices wrapped for this one.

use hearth_crdt::digest::{Differences, DigestMessage, Reconciler};
use hearth_crdt::wire::{self, DigestFrame, Frame};
use hearth_crdt::{DocId, DocKind, EngineConfig, KeyEpoch, Output};
use hearth_net::{Bytes, PeerClass, PeerId};

use crate::core::{Core, now_ms};
use crate::records::sync_state_key;
use crate::trust::cert::{DeviceCert, Verdict};
use crate::trust::keys::{self, RecordKind, WrappedKey};

/// Largest frame the core decodes; the network layer already caps frames at this size.
pub(crate) const MAX_FRAME_BYTES: usize = hearth_net::MAX_FRAME_SIZE;

/// Largest push or sync payload the engine may produce or accept: what still fits the
/// network's frame cap once sealed (version, 24-byte nonce, 16-byte tag) and wrapped in
/// the worst-case envelope, with a margin. 4 177 623 bytes for a 4 MiB frame. Every node
/// configures its engine with it, so both ends of a session hold the same cap, and a
/// catch-up larger than this goes over several sync messages.
///
/// Only a single Automerge change larger than this could not travel. One write is one
/// change, and the API caps a request body at 256 KiB (the library caps an entity's
/// attributes at `MAX_ATTRIBUTES_BYTES`), so a change stays far below it.
pub(crate) const MAX_SYNC_PAYLOAD: usize =
    wire::max_payload(hearth_net::MAX_FRAME_SIZE, keys::SEAL_OVERHEAD);

/// The engine's limits on this node: the defaults, with sync messages and pushes capped
/// to what a frame can carry.
pub(crate) fn engine_config() -> EngineConfig {
    let defaults = EngineConfig::default();
    EngineConfig {
        max_sync_message_bytes: MAX_SYNC_PAYLOAD,
        max_push_bytes: defaults.max_push_bytes.min(MAX_SYNC_PAYLOAD),
        ..defaults
    }
}

impl Core {
    /// Checks a peer's certificate against this home's root key. Only devices of this home
    /// whose certificate verifies, names the connecting PeerId and is not revoked get in.
    pub(crate) async fn on_hello(&mut self, peer: PeerId, certificate: Vec<u8>) {
        let peer_text = peer.to_base58();
        if certificate.is_empty() {
            // A device that is joining has no certificate yet; it may only pair, and the
            // network layer drops it when its hello deadline passes without pairing.
            tracing::debug!(peer = %peer_text, "peer without a certificate; it may only pair");
            return;
        }
        let verdict = match DeviceCert::verify_bytes(&certificate, &self.home.root_public) {
            Verdict::Valid(cert) if cert.peer_id() != peer_text => {
                Err("presented a certificate issued to another device".to_string())
            }
            Verdict::Valid(cert) if self.is_revoked(&peer_text) => {
                let _ = cert;
                Err("is a revoked device of this home".to_string())
            }
            Verdict::Valid(cert) => Ok(cert),
            Verdict::WrongHome { found, .. } => {
                if let Err(reason) = self.on_foreign_hello(peer, certificate, &found).await {
                    self.counters.hellos_refused += 1;
                    tracing::info!(peer = %peer_text, %reason, "refusing peer");
                    if let Err(error) = self.net.reject(peer, format!("peer {reason}")).await {
                        tracing::warn!(peer = %peer_text, %error, "could not refuse peer");
                    }
                }
                return;
            }
            Verdict::BadSignature => {
                Err("presented a certificate with a bad signature".to_string())
            }
            Verdict::Malformed(detail) => {
                Err(format!("presented a malformed certificate ({detail})"))
            }
        };
        match verdict {
            Ok(cert) => {
                tracing::info!(peer = %peer_text, device = cert.device_name(), "admitting device of this home");
                match self.net.admit(peer, PeerClass::Own).await {
                    Ok(true) => {
                        self.peers.admitted.insert(peer_text.clone(), peer);
                        if cert.is_admin() {
                            self.peers.admin = Some(peer_text.clone());
                        }
                        self.send_current_home_keys(&peer_text);
                        self.send_lock_table(&peer_text);
                        self.resume_stale_arbiter(&peer_text);
                        self.begin_reconcile(&peer_text).await;
                    }
                    Ok(false) => tracing::debug!(peer = %peer_text, "peer left before admission"),
                    Err(error) => tracing::warn!(peer = %peer_text, %error, "could not admit"),
                }
            }
            Err(reason) => {
                self.counters.hellos_refused += 1;
                tracing::info!(peer = %peer_text, %reason, "refusing peer");
                if let Err(error) = self.net.reject(peer, format!("peer {reason}")).await {
                    tracing::warn!(peer = %peer_text, %error, "could not refuse peer");
                }
            }
        }
    }

    /// Whether `peer` is still admitted as `class`, the class the network stamped on a
    /// frame when it arrived. Lifecycle events overtake queued frames, so a frame may be
    /// read after its sender disconnected, was revoked, or lost its home's pairing; such a
    /// frame is dropped and counted, never applied under whatever the peer is now. A
    /// device of this home that was cut off sends what it holds again through sync once
    /// it is admitted again, so nothing it wrote is lost.
    /// `text` is the peer's id in base58, as the caller already holds it.
    pub(crate) fn still_admitted_as(
        &mut self,
        text: &str,
        class: &PeerClass,
        stream: &str,
    ) -> bool {
        let ok = match class {
            PeerClass::Own => self.peers.admitted.contains_key(text) && !self.is_revoked(text),
            // Forgetting a home removes its devices from `foreign` at once.
            PeerClass::Paired(home) => self
                .sharing
                .foreign
                .get(text)
                .is_some_and(|f| f.home.as_str() == &**home),
            _ => false,
        };
        if !ok {
            self.counters.frames_unadmitted += 1;
            tracing::debug!(peer = %text, ?class, stream, "dropping a frame from a peer no longer admitted as its sender");
        }
        ok
    }

    /// Whether a device of this home is shut out. The signed, add-only set decides; an
    /// unsigned `revoked_at` in the home document can add to it (fail closed) but never
    /// take a revocation away. A home document that cannot be read admits no one.
    pub(crate) fn is_revoked(&self, peer: &str) -> bool {
        if self.sharing.revoking.contains(peer) || self.revocations.contains(peer) {
            return true;
        }
        // Only the device records: the whole home view holds one keyring entry per document.
        match self.engine.home_device(self.home.home_doc, peer) {
            Ok(device) => {
                self.home_doc_read.set(true);
                device.is_some_and(|d| d.revoked_at.is_some())
            }
            // A device that just joined holds the home document's key but not all of its
            // content until the first sync completes (a large catch-up arrives over several
            // messages): there is nothing whole to read yet, and the peer's certificate
            // has verified under the home root. Once the document has read whole, it
            // only grows, so failing to read it later means it was damaged.
            Err(_) if !self.home_doc_read.get() => false,
            Err(error) => {
                tracing::warn!(%peer, %error, "home document unreadable; refusing the device");
                true
            }
        }
    }

    /// Starts digest reconciliation with a newly admitted device. The smaller PeerId opens
    /// the exchange; the other side answers. When it ends, only documents whose heads
    /// differ get a sync exchange, and the rest are attached as already in sync.
    pub(crate) async fn begin_reconcile(&mut self, peer: &str) {
        if self.peer_id.as_str() > peer {
            return;
        }
        let session = u64::from_be_bytes(crate::home::random().unwrap_or([0; 8]));
        let mut reconciler = Reconciler::new();
        match reconciler.start(session, &self.digest) {
            Ok(message) => {
                self.peers.reconciling(peer, reconciler);
                self.queue_digest(peer, &message);
                self.send_pending().await;
            }
            Err(error) => {
                tracing::warn!(%peer, %error, "cannot start a digest exchange; syncing every document");
                self.attach_all(peer).await;
            }
        }
    }

    pub(crate) fn queue_digest(&mut self, peer: &str, message: &DigestMessage) {
        let bytes = message.encode();
        tracing::debug!(%peer, len = bytes.len(), "digest message queued");
        self.counters.digest_messages += 1;
        self.counters.digest_bytes += bytes.len() as u64;
        self.outbox
            .push((peer.to_string(), Frame::Digest(DigestFrame { bytes })));
    }

    pub(crate) async fn on_digest(&mut self, peer: &str, bytes: &[u8]) {
        tracing::debug!(%peer, len = bytes.len(), "digest message received");
        self.counters.digest_messages += 1;
        self.counters.digest_bytes += bytes.len() as u64;
        let message = match DigestMessage::decode(bytes) {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(%peer, %error, "malformed digest message; syncing every document");
                self.peers.end_reconciling(peer);
                self.attach_all(peer).await;
                return;
            }
        };
        if message.is_start() {
            self.peers.reconciling(peer, Reconciler::new());
        }
        let Some(reconciler) = self.peers.reconcilers.get_mut(peer) else {
            tracing::warn!(%peer, "digest message outside a session");
            return;
        };
        match reconciler.handle(&self.digest, message) {
            Ok(progress) => {
                for m in &progress.send {
                    self.queue_digest(peer, m);
                }
                if let Some(differences) = progress.finished {
                    // What moved meanwhile is taken before the session's state goes.
                    let moved = self.peers.take_moved(peer);
                    self.peers.end_reconciling(peer);
                    self.counters.reconciliations += 1;
                    self.attach_after_digest(peer, &differences, &moved).await;
                }
                self.send_pending().await;
            }
            Err(error) => {
                tracing::warn!(%peer, %error, "digest exchange failed; syncing every document");
                self.peers.end_reconciling(peer);
                self.attach_all(peer).await;
            }
        }
    }

    /// Attaches every document this device holds a key for: those the digest found
    /// different get a sync exchange, the rest start in sync without a message.
    pub(crate) async fn attach_after_digest(
        &mut self,
        peer: &str,
        differences: &Differences,
        moved: &std::collections::HashSet<DocId>,
    ) {
        tracing::debug!(
            %peer,
            changed = differences.changed.len(),
            local_only = differences.local_only.len(),
            remote_only = differences.remote_only.len(),
            moved = moved.len(),
            "digest exchange finished"
        );
        // A document whose heads moved here during the exchange may have been compared
        // before it moved: attached in sync, its new changes would never reach the peer
        // (they were not pushed: there was no session yet), and every later push would
        // wait there for them.
        let ids = self.home_key_ids();
        for (doc, epoch) in ids {
            let differs = differences.changed.contains(&doc)
                || differences.local_only.contains(&doc)
                || differences.remote_only.contains(&doc)
                || moved.contains(&doc);
            if differs {
                self.counters.docs_synced += 1;
                self.queue_attach(peer, doc, epoch);
                continue;
            }
            self.ensure_expected(doc, epoch);
            // No saved sync state is read: attaching in sync replaces its shared heads
            // with the current ones, so reading it (one store round trip per document)
            // only cost time that grew with the home.
            let attached = self.engine.attach_in_sync(peer.to_string(), doc, None);
            match attached {
                Ok(()) => self.counters.docs_already_in_sync += 1,
                Err(error) => tracing::warn!(%doc, %error, "cannot attach an in-sync document"),
            }
        }
        self.drain_attaches().await;
    }

    /// Opens a sync session with an admitted device for every document this node holds a
    /// key for; saved sync states make a reconnect resume where it left off.
    pub(crate) async fn attach_all(&mut self, peer: &str) {
        let ids = self.home_key_ids();
        for (doc, epoch) in ids {
            self.queue_attach(peer, doc, epoch);
        }
        self.drain_attaches().await;
    }

    /// The documents this home's devices sync with each other, each once at its newest
    /// epoch: every held key except other homes' entities, which are never relayed.
    pub(crate) fn home_key_ids(&self) -> Vec<(DocId, KeyEpoch)> {
        let mut newest: std::collections::BTreeMap<DocId, KeyEpoch> = Default::default();
        for (doc, epoch) in self.keyring.ids() {
            if self.is_foreign_doc(doc) {
                continue;
            }
            let slot = newest.entry(doc).or_insert(epoch);
            if epoch > *slot {
                *slot = epoch;
            }
        }
        newest.into_iter().collect()
    }

    pub(crate) async fn attach(&mut self, peer: &str, doc: DocId, epoch: KeyEpoch) {
        self.ensure_loaded(doc).await;
        self.ensure_expected(doc, epoch);
        let saved = match self
            .store
            .get(
                hearth_storage::Keyspace::SyncStates,
                sync_state_key(peer, doc),
            )
            .await
        {
            Ok(saved) => saved,
            Err(error) => {
                tracing::warn!(%doc, %error, "cannot read the saved sync state; starting afresh");
                None
            }
        };
        let out = match self
            .engine
            .attach(peer.to_string(), doc, saved.as_deref(), now_ms())
        {
            Ok(out) => out,
            // An unreadable saved state only costs a full exchange.
            Err(_) => match self.engine.attach(peer.to_string(), doc, None, now_ms()) {
                Ok(out) => out,
                Err(error) => {
                    tracing::warn!(%doc, %error, "cannot open a sync session");
                    return;
                }
            },
        };
        self.persist_in_background(out);
    }

    /// Makes sure the engine tracks a document this node holds a key for, so a peer's
    /// frames for it have somewhere to land. The kind is a placeholder until the
    /// document's header arrives.
    pub(crate) fn ensure_expected(&mut self, doc: DocId, epoch: KeyEpoch) {
        if self.engine.header(doc).is_ok() {
            return;
        }
        if let Some(owner) = self.sharing.shared_in.get(&doc).map(|s| s.owner.clone()) {
            self.engine
                .expect_document(doc, DocKind::Entity, &owner, epoch);
            return;
        }
        let kind = if doc == self.home.home_doc {
            DocKind::Home
        } else if doc == self.home.registry_doc {
            DocKind::Registry
        } else {
            DocKind::Entity
        };
        self.engine
            .expect_document(doc, kind, &self.home.home_id, epoch);
    }

    /// Seals and sends every frame the engine produced whose store batches have finished
    /// (core/send_gate.rs: no peer gets a change before it is durable here); the rest wait
    /// in order. A frame for a document whose key is missing is dropped with a warning;
    /// the session's retry resends it later.
    pub(crate) async fn send_pending(&mut self) {
        let queued = std::mem::take(&mut self.outbox);
        if !queued.is_empty() {
            self.gate.hold(self.tickets.last_issued(), queued);
        }
        let outbox = self.gate.release(self.tickets.finished_through());
        if outbox.is_empty() {
            return;
        }
        let max_push = self.engine.config().max_push_bytes;
        for (peer, frame) in crate::entities::batching::coalesce_pushes(outbox, max_push) {
            let Some(net_peer) = self
                .peers
                .admitted
                .get(&peer)
                .copied()
                .or_else(|| self.sharing.foreign.get(&peer).map(|f| f.net))
            else {
                continue;
            };
            let bytes = match self.seal_frame(frame) {
                Ok(bytes) => bytes,
                Err(reason) => {
                    tracing::warn!(%peer, %reason, "not sending a frame");
                    continue;
                }
            };
            let len = bytes.len();
            if len > MAX_FRAME_BYTES {
                // The engine caps what it generates below this, so only a frame the
                // caps do not cover gets here; the transport would refuse it anyway.
                self.counters.frames_oversized += 1;
                tracing::warn!(%peer, len, cap = MAX_FRAME_BYTES, "not sending a frame over the frame cap");
                continue;
            }
            match self.net.send(net_peer, Bytes::from(bytes)).await {
                Ok(hearth_net::SendOutcome::Queued) => {
                    self.metrics.frame_out(len);
                    self.counters.frames_sent += 1;
                    self.counters.frame_bytes_sent += len as u64;
                }
                Ok(outcome) => tracing::debug!(%peer, ?outcome, "frame not queued"),
                Err(error @ hearth_net::Error::FrameTooLarge { .. }) => {
                    self.counters.frames_oversized += 1;
                    tracing::warn!(%peer, %error, "send refused");
                }
                Err(error) => tracing::warn!(%peer, %error, "send failed"),
            }
        }
    }

    /// Seals a frame's payload under its document's key: the newest epoch held, which
    /// may be newer than the one the engine named (`Keyring::seal_epoch`).
    pub(crate) fn seal_frame(&self, mut frame: Frame) -> Result<Vec<u8>, String> {
        match &mut frame {
            Frame::Push(p) => {
                p.epoch = self.keyring.seal_epoch(p.doc, p.epoch);
                let key = self
                    .keyring
                    .get(p.doc, p.epoch)
                    .ok_or("no key for the document")?;
                p.bytes = keys::seal(key, p.doc, p.epoch, RecordKind::Push, &p.bytes)
                    .map_err(|e| e.to_string())?;
            }
            Frame::Sync(s) => {
                s.epoch = self.keyring.seal_epoch(s.doc, s.epoch);
                let key = self
                    .keyring
                    .get(s.doc, s.epoch)
                    .ok_or("no key for the document")?;
                s.bytes = keys::seal(key, s.doc, s.epoch, RecordKind::SyncMessage, &s.bytes)
                    .map_err(|e| e.to_string())?;
            }
            // Digest frames hold only ids and heads hashes, which Noise protects; the key
            // in a grant frame is wrapped for the receiving device.
            Frame::Digest(_) | Frame::Grant(_) => {}
            _ => return Err("unknown frame kind".into()),
        }
        Ok(wire::encode(&frame))
    }

    /// A frame from an admitted device: open it under the document key and hand it to the
    /// engine. Anything malformed or unopenable is dropped with a logged reason; it never
    /// reaches a document.
    /// `peer_text` is the sender's id in base58: encoding it costs more than anything
    /// else a small push takes before it reaches the engine, so it is done once a frame.
    pub(crate) async fn on_frame(&mut self, peer_text: String, class: PeerClass, bytes: Bytes) {
        #[cfg(feature = "test-hooks")]
        self.capture_raw(&peer_text, "sync", &bytes);
        let mut frame = match wire::decode(&bytes, MAX_FRAME_BYTES) {
            Ok(frame) => frame,
            Err(error @ hearth_crdt::Error::TooLarge { .. }) => {
                self.counters.frames_oversized += 1;
                tracing::warn!(peer = %peer_text, %error, "dropping an oversized frame");
                return;
            }
            Err(error) => {
                tracing::warn!(peer = %peer_text, %error, "dropping a malformed frame");
                return;
            }
        };
        let opened = match &mut frame {
            Frame::Push(p) => {
                self.open_payload(p.doc, &mut p.epoch, RecordKind::Push, &mut p.bytes)
            }
            Frame::Sync(s) => {
                self.open_payload(s.doc, &mut s.epoch, RecordKind::SyncMessage, &mut s.bytes)
            }
            Frame::Digest(d) => {
                if class != PeerClass::Own {
                    tracing::warn!(peer = %peer_text, "digest frame from a paired home's device dropped");
                    return;
                }
                let bytes = std::mem::take(&mut d.bytes);
                self.on_digest(&peer_text, &bytes).await;
                return;
            }
            Frame::Grant(g) => {
                let bytes = std::mem::take(&mut g.bytes);
                self.on_grant_frame(&peer_text, &bytes).await;
                return;
            }
            _ => Err("unknown frame kind".into()),
        };
        if let Err(reason) = opened {
            tracing::warn!(peer = %peer_text, %reason, "dropping a frame");
            return;
        }
        // A frame for a document that is not loaded loads it (core/resident.rs).
        if let Frame::Push(hearth_crdt::wire::Push { doc, .. })
        | Frame::Sync(hearth_crdt::wire::SyncMessage { doc, .. }) = &frame
        {
            self.ensure_loaded(*doc).await;
        }
        #[cfg(feature = "test-hooks")]
        self.capture_opened(&peer_text, &frame);
        if let Some(reason) = self.stale_epoch_changes(&frame) {
            self.counters.frames_old_epoch += 1;
            tracing::warn!(peer = %peer_text, %reason, "dropping a frame");
            return;
        }
        if let Some(reason) = self.carries_revoked_changes(&class, &frame) {
            self.counters.frames_refused += 1;
            match &class {
                PeerClass::Own => {
                    tracing::warn!(peer = %peer_text, %reason, "refusing a frame from a device of this home")
                }
                _ => self.refuse_foreign(&peer_text, &frame, &reason).await,
            }
            return;
        }
        if let PeerClass::Paired(home) = &class
            && let Err(reason) = self.authorize_foreign(home, &frame)
        {
            self.refuse_foreign(&peer_text, &frame, &reason).await;
            return;
        }
        let frame_doc = match &frame {
            Frame::Push(p) => Some(p.doc),
            Frame::Sync(m) => Some(m.doc),
            _ => None,
        };
        match self.engine.receive(peer_text.clone(), frame, now_ms()) {
            Ok(out) => self.after_remote(out).await,
            Err(error) => {
                tracing::warn!(peer = %peer_text, %error, "frame refused");
                // A refusal may come after part of the frame applied, with the outputs
                // that said which registry entries it wrote lost: the index is rebuilt
                // whole, as it was after every registry change before it followed them
                // entry by entry.
                if frame_doc == Some(self.home.registry_doc) {
                    self.follow_registry_changes(&[]).await;
                }
            }
        }
    }

    /// Whether a frame carries changes written by a revoked device: checked on every push,
    /// and on every frame from a paired home. Sync messages between this home's own
    /// devices are left alone: they may carry history the revoked device wrote before
    /// its revocation, and it can no longer seal anything new under the rotated keys.
    /// Whether a frame carries changes sealed under an older key epoch than its
    /// document's current one. A rotation shut someone out (a revoked device, an unshared
    /// home) who may still hold the old key, so no change sealed under it is accepted any
    /// more. A sync message without changes passes: a device that has not yet seen the
    /// rotation still has to say what it holds, and the answer comes under the new key.
    pub(crate) fn stale_epoch_changes(&self, frame: &Frame) -> Option<String> {
        let (doc, epoch) = match frame {
            Frame::Push(p) => (p.doc, p.epoch),
            Frame::Sync(s) => (s.doc, s.epoch),
            _ => return None,
        };
        let current = self.engine.header(doc).ok()?.key_epoch;
        if epoch >= current {
            return None;
        }
        let carries = match frame {
            Frame::Push(_) => true,
            _ => hearth_crdt::payload_actors(frame, self.engine.config())
                .map_or(true, |actors| !actors.is_empty()),
        };
        carries.then(|| {
            format!(
                "carries changes sealed under epoch {} of document {doc}, older than its current {}",
                epoch.counter, current.counter
            )
        })
    }

    pub(crate) fn carries_revoked_changes(
        &self,
        class: &PeerClass,
        frame: &Frame,
    ) -> Option<String> {
        if self.revocations.is_empty()
            || (*class == PeerClass::Own && !matches!(frame, Frame::Push(_)))
        {
            return None;
        }
        match hearth_crdt::payload_actors(frame, self.engine.config()) {
            Ok(actors) => actors
                .iter()
                .find(|a| self.revocations.has_actor(a))
                .map(|a| format!("carries a change by {a}, a revoked device")),
            Err(error) => Some(format!("unreadable changes: {error}")),
        }
    }

    /// Opens a decoded frame's payload. The frame names its epoch by counter and device
    /// prefix; the key that opens it tells which whole epoch it was, and `epoch` becomes
    /// that one.
    pub(crate) fn open_payload(
        &mut self,
        doc: DocId,
        epoch: &mut KeyEpoch,
        kind: RecordKind,
        bytes: &mut Vec<u8>,
    ) -> Result<(), String> {
        let (whole, opened) = open_sealed(&self.keyring, doc, *epoch, kind, bytes)?;
        *bytes = opened;
        *epoch = whole;
        self.ensure_expected(doc, whole);
        Ok(())
    }

    /// Applies what a remote change caused: persistence, replies, and, when the home or
    /// registry document moved, new keys and entities.
    pub(crate) async fn after_remote(&mut self, out: Vec<Output<String>>) {
        let changed = |doc: DocId| {
            out.iter()
                .any(|o| matches!(o, Output::Changed { doc: d, .. } if *d == doc))
        };
        let home_moved = changed(self.home.home_doc);
        let registry_moved = changed(self.home.registry_doc);
        // The new changes of the home document (to find the keys they wrapped for this
        // device) and of the registry (to find the entries they wrote).
        let chunks_of = |doc: DocId| -> Vec<Vec<u8>> {
            out.iter()
                .filter_map(|o| match o {
                    Output::PersistChunk {
                        doc: d,
                        kind: hearth_crdt::ChunkKind::Incremental,
                        bytes,
                    } if *d == doc => Some(bytes.clone()),
                    _ => None,
                })
                .collect()
        };
        let home_chunks = if home_moved {
            chunks_of(self.home.home_doc)
        } else {
            Vec::new()
        };
        let registry_chunks = if registry_moved {
            chunks_of(self.home.registry_doc)
        } else {
            Vec::new()
        };
        self.persist_in_background(out);
        if registry_moved {
            self.follow_registry_changes(&registry_chunks).await;
        }
        if home_moved {
            self.refresh_actor_homes();
            match self
                .step(|core, fx| {
                    core.absorb_lock_naming(fx);
                    let rotate = core.absorb_revocations(fx);
                    core.disconnect_revoked(fx);
                    Ok(rotate)
                })
                .await
            {
                Ok(rotate) => self.rotate_each(rotate).await,
                Err(error) => {
                    tracing::warn!(%error, "acting on the home document's revocations failed part way")
                }
            }
            for chunk in &home_chunks {
                self.learn_keys(chunk).await;
            }
        }
        self.send_pending().await;
    }

    /// Brings the entity index up to the registry after remote changes `chunks` of it.
    /// Only the entries they wrote are read again; changes outside the entries (or a
    /// registry that moved with no incremental chunk to tell what) rebuild it whole. Each
    /// entry read costs as much as a whole rebuild costs per entity, so a device receiving
    /// a home's N entities one change at a time spends O(N), not O(N^2).
    async fn follow_registry_changes(&mut self, chunks: &[Vec<u8>]) {
        let registry = self.home.registry_doc;
        let mut written = hearth_crdt::schema::touched::Touched::default();
        let mut whole = chunks.is_empty();
        for chunk in chunks {
            match self.engine.registry_entries_written(registry, chunk) {
                Ok(touched) => written.merge(touched),
                Err(_) => whole = true,
            }
        }
        let entries = match written {
            hearth_crdt::schema::touched::Touched::Entries(ids) if !whole => {
                self.registry_entries(&ids)
            }
            _ => None,
        };
        match entries {
            Some(entries) => {
                // An entity deleted here is announced with its last state, which needs
                // its document loaded.
                for (id, doc) in &entries {
                    if doc.is_none()
                        && let Some(old) = self.doc_of_entity(id)
                        && self.engine.is_unloaded(old)
                    {
                        self.ensure_loaded(old).await;
                    }
                }
                self.update_entity_index(entries);
            }
            None => {
                self.load_deleted_entities().await;
                self.rebuild_entity_index_lenient();
            }
        }
    }

    /// Unwraps keys that other devices wrapped for this one in the home document's
    /// changes `chunk`, stores them, and opens sessions for the new documents with every
    /// admitted device. Only the keyring entries the chunk wrote are read: the whole
    /// keyring holds one entry per document of the home.
    pub(crate) async fn learn_keys(&mut self, chunk: &[u8]) {
        let keyring = match self.engine.home_keys_written(self.home.home_doc, chunk) {
            Ok(keyring) => keyring,
            Err(error) => {
                tracing::debug!(%error, "home keyring not readable");
                return;
            }
        };
        let mut batch = hearth_storage::Batch::new();
        let mut learned = Vec::new();
        for ((doc, epoch), per_device) in keyring {
            if self.keyring.contains(doc, epoch) {
                continue;
            }
            let Some(wrapped) = per_device.get(&self.peer_id) else {
                continue;
            };
            let key = WrappedKey::from_bytes(wrapped)
                .and_then(|w| keys::unwrap_key(&w, doc, epoch, &self.device));
            match key {
                Ok(key) => {
                    self.keyring.insert(doc, epoch, key, &mut batch);
                    learned.push((doc, epoch));
                }
                Err(error) => {
                    tracing::warn!(%doc, %error, "cannot unwrap a key wrapped for this device")
                }
            }
        }
        if learned.is_empty() {
            return;
        }
        if let Err(error) = self.store.batch(batch).await {
            tracing::error!(%error, "could not store learned document keys");
            return;
        }
        let peers: Vec<String> = self.peers.admitted.keys().cloned().collect();
        for (doc, epoch) in learned {
            self.ensure_expected(doc, epoch);
            for peer in &peers {
                self.queue_attach(peer, doc, epoch);
            }
        }
        self.drain_attaches().await;
    }
}

/// Opens `sealed`, a payload of `doc` whose frame named the epoch `wire` (its counter and
/// device prefix), with whichever held key of a matching epoch opens it: that epoch and
/// the plaintext.
pub(crate) fn open_sealed(
    keyring: &crate::core::keyring::Keyring,
    doc: DocId,
    wire: KeyEpoch,
    kind: RecordKind,
    sealed: &[u8],
) -> Result<(KeyEpoch, Vec<u8>), String> {
    let mut failed = None;
    for (epoch, key) in keyring.matching(doc, wire) {
        match keys::open(key, doc, epoch, kind, sealed) {
            Ok(plain) => return Ok((epoch, plain)),
            Err(e) => failed = Some(e.to_string()),
        }
    }
    Err(failed.unwrap_or_else(|| format!("no key for document {doc} at epoch {}", wire.counter)))
}

#[cfg(test)]
mod tests {
    /// A stranger whose certificate does not verify is refused at hello and counted;
    /// nothing is admitted.
    #[tokio::test]
    async fn a_hello_with_a_bad_certificate_is_refused() {
        use crate::core::NodeRequest;
        use crate::core::testing::TestCore;

        let t = TestCore::start("door").await;
        let peer = hearth_net::PeerId::random();
        t.net_events
            .send(hearth_net::Event::Hello {
                peer,
                certificate: vec![0xde, 0xad, 0xbe, 0xef],
            })
            .await
            .unwrap();
        let counters = loop {
            let counters = t
                .core
                .call(|reply| NodeRequest::Counters { reply })
                .await
                .unwrap()
                .unwrap();
            if counters.hellos_refused > 0 {
                break counters;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(counters.hellos_refused, 1);
        let report = t
            .core
            .call(|reply| NodeRequest::SyncReport { reply })
            .await
            .unwrap()
            .unwrap();
        assert!(report.peers.is_empty(), "nobody admitted");
        t.stop().await;
    }

    use hearth_crdt::wire::{Push, SyncMessage};

    use super::*;
    use crate::trust::keys::DocKey;

    /// A device that learned a rotated key before the change that moves its copy of the
    /// document to the new epoch seals its frames under the new key, so the device that
    /// rotated does not refuse what it sends as sealed under a stale epoch (the two copies
    /// would otherwise never meet again: found by tests/reliability/rotation.py).
    #[tokio::test]
    async fn frames_go_out_under_a_learned_newer_key_and_are_not_stale() {
        use crate::core::testing::TestCore;
        let t = TestCore::start("hall").await;
        let outcome = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = outcome.clone();
        t.on_core(move |core| {
            Box::pin(async move {
                let doc = core.home.registry_doc;
                let old = core.engine.header(doc).unwrap().key_epoch;
                let new = KeyEpoch {
                    counter: old.counter + 1,
                    device: old.device,
                };
                let key = DocKey::generate().unwrap();
                let mut batch = hearth_storage::Batch::new();
                core.keyring.insert(doc, new, key.clone(), &mut batch);
                let frame = Frame::Sync(SyncMessage {
                    doc,
                    epoch: old,
                    expects_reply: true,
                    bytes: b"changes".to_vec(),
                });
                let sealed = core.seal_frame(frame).unwrap();
                let Ok(Frame::Sync(s)) = wire::decode(&sealed, MAX_FRAME_BYTES) else {
                    panic!("not a sync frame");
                };
                let opened = keys::open(&key, doc, new, RecordKind::SyncMessage, &s.bytes);
                // The wire names the epoch by counter and device prefix.
                *seen.lock().unwrap() = Some((s.epoch.counter == new.counter, opened.ok()));
            })
        })
        .await;
        let got = outcome.lock().unwrap().clone();
        assert_eq!(got, Some((true, Some(b"changes".to_vec()))));
        t.stop().await;
    }

    #[test]
    pub(crate) fn the_largest_payload_sealed_in_the_worst_envelope_fits_a_frame() {
        let key = DocKey::generate().unwrap();
        let doc = DocId::from_bytes([0xff; 16]);
        let epoch = KeyEpoch {
            counter: u64::MAX,
            device: [0xff; 16],
        };
        let payload = vec![0x5a; MAX_SYNC_PAYLOAD];
        let sealed = |kind| keys::seal(&key, doc, epoch, kind, &payload).unwrap();
        let push = Frame::Push(Push {
            doc,
            epoch,
            correlation_id: Some("c".repeat(wire::MAX_CORRELATION_ID_LEN)),
            bytes: sealed(RecordKind::Push),
        });
        let sync = Frame::Sync(SyncMessage {
            doc,
            epoch,
            expects_reply: true,
            bytes: sealed(RecordKind::SyncMessage),
        });
        for frame in [push, sync] {
            let len = wire::encode(&frame).len();
            assert!(len <= MAX_FRAME_BYTES, "{len} bytes");
            // The margin is there, not eaten by the envelope.
            assert!(
                MAX_FRAME_BYTES - len >= wire::FRAME_SAFETY_MARGIN,
                "{len} bytes"
            );
        }
        assert_eq!(MAX_SYNC_PAYLOAD, 4_177_623);
        let config = engine_config();
        assert_eq!(config.max_sync_message_bytes, MAX_SYNC_PAYLOAD);
        assert!(config.max_push_bytes <= MAX_SYNC_PAYLOAD);
    }
}
