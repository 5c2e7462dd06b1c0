//! What is shared with whom: grants, share and unshare, key rotation.

use super::service::*;
use crate::Error;
use crate::core::effects::Effects;
use crate::core::{Core, doc_err, new_key, now_ms};
use crate::shares::ShareOut;
use crate::sharing::service::share_event;
use crate::trust::keys::{self, WrappedKey};
use crate::trust::messages::{MAX_OWN_SHARE_MESSAGE, MAX_SHARE_MESSAGE, ShareMessage};
use crate::trust::wire::{from_cbor, to_cbor};
use hearth_crdt::schema::home as home_schema;
use hearth_crdt::schema::registry::{self, Rights};
use hearth_crdt::wire::{Frame, GrantFrame};
use hearth_crdt::{DocId, DocKind, KeyEpoch};
use hearth_storage::Batch;
use serde_bytes::ByteBuf;

impl Core {
    /// Wraps the entity's current key for a foreign device, queues the grant and opens the
    /// document's session with it.
    pub(crate) fn send_grant(
        &mut self,
        peer: &str,
        fp: &ForeignPeer,
        entity_id: &str,
        doc: DocId,
        rights: Rights,
        epoch: Option<KeyEpoch>,
    ) {
        // Checked again here, not only at hello: a revocation may arrive while the
        // device is still connected, and no key is ever wrapped for a revoked device.
        if self.revocations.contains(peer) {
            tracing::info!(%peer, %entity_id, "not granting a key to a revoked device");
            return;
        }
        let Some(epoch) = epoch.or_else(|| self.engine.header(doc).ok().map(|h| h.key_epoch))
        else {
            tracing::warn!(%doc, "cannot grant a document that is not loaded");
            return;
        };
        let Some(key) = self.keyring.get(doc, epoch) else {
            tracing::warn!(%doc, "cannot grant a document whose key this device lacks");
            return;
        };
        let wrapped = match keys::wrap_key(key, doc, epoch, &fp.x25519) {
            Ok(w) => w.to_bytes().to_vec(),
            Err(error) => {
                tracing::warn!(%peer, %doc, %error, "cannot wrap a key for a paired device");
                return;
            }
        };
        let message = ShareMessage::Grant {
            entity_id: entity_id.to_string(),
            doc: doc.to_string(),
            epoch,
            wrapped: ByteBuf::from(wrapped),
            rights: rights.as_str().to_string(),
        };
        self.queue_share_message(peer, &message);
        match self.engine.attach(peer.to_string(), doc, None, now_ms()) {
            Ok(out) => self.persist_in_background(out),
            Err(error) => tracing::warn!(%peer, %doc, %error, "cannot open a shared session"),
        }
    }

    pub(crate) fn queue_share_message(&mut self, peer: &str, message: &ShareMessage) {
        match to_cbor("grant message", message) {
            Ok(bytes) => self
                .outbox
                .push((peer.to_string(), Frame::Grant(GrantFrame { bytes }))),
            Err(error) => tracing::warn!(%error, "cannot encode a grant"),
        }
    }

    /// A grant frame from a foreign device: a key for an entity its home shares with this
    /// one, or the end of such a grant.
    pub(crate) async fn on_grant_frame(&mut self, peer: &str, bytes: &[u8]) {
        // Capped before decoding; trailing bytes are refused too. Only a device of this
        // home may send a larger message, and only an event.
        let own = self.peers.admitted.contains_key(peer);
        let cap = if own {
            MAX_OWN_SHARE_MESSAGE
        } else {
            MAX_SHARE_MESSAGE
        };
        let message: ShareMessage = match from_cbor("grant message", bytes, cap) {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(%peer, %error, len = bytes.len(), "malformed grant frame dropped");
                return;
            }
        };
        if let ShareMessage::Event { bytes } = &message {
            if own {
                self.on_event_message(peer, bytes);
            } else {
                tracing::warn!(%peer, "event from a device that is not of this home dropped");
            }
            return;
        }
        if let ShareMessage::Session { bytes } = &message {
            if own {
                self.on_session_message(peer, bytes).await;
            } else {
                tracing::warn!(%peer, "handoff message from a device that is not of this home dropped");
            }
            return;
        }
        if let ShareMessage::Activity { bytes } = &message {
            if own {
                self.on_activity_message(peer, bytes).await;
            } else {
                tracing::warn!(%peer, "activity message from a device that is not of this home dropped");
            }
            return;
        }
        if bytes.len() > MAX_SHARE_MESSAGE {
            tracing::warn!(%peer, len = bytes.len(), "oversized grant frame dropped");
            return;
        }
        if let ShareMessage::Lock { bytes } = &message {
            if self.peers.admitted.contains_key(peer) {
                self.on_lock_message(peer, bytes).await;
            } else if let Some(home) = self.sharing.foreign.get(peer).map(|f| f.home.clone()) {
                self.on_foreign_lock_message(peer, &home, bytes).await;
            } else {
                tracing::warn!(%peer, "lock message from a device of no known home dropped");
            }
            return;
        }
        if let ShareMessage::HomeKey(key) = message {
            if self.peers.admitted.contains_key(peer) {
                let _ = self
                    .step(|core, fx| {
                        core.accept_home_key(peer, key, fx);
                        Ok(())
                    })
                    .await;
            } else {
                tracing::warn!(%peer, "home key from a device that is not of this home dropped");
            }
            return;
        }
        let Some(fp) = self.sharing.foreign.get(peer).cloned() else {
            tracing::warn!(%peer, "grant frame from a device that is not of a paired home");
            return;
        };
        match message {
            ShareMessage::HomeKey(_)
            | ShareMessage::Lock { .. }
            | ShareMessage::Event { .. }
            | ShareMessage::Session { .. }
            | ShareMessage::Activity { .. } => {}
            ShareMessage::Revocation { record } => {
                match self
                    .step(|core, fx| Ok(core.on_paired_revocation(peer, &fp.home, &record, fx)))
                    .await
                {
                    Ok(rotate) => self.rotate_each(rotate).await,
                    Err(error) => {
                        tracing::warn!(%peer, %error, "acting on a paired home's revocation failed part way")
                    }
                }
            }
            ShareMessage::Grant {
                entity_id,
                doc,
                epoch,
                wrapped,
                rights,
            } => {
                let Some(doc) = DocId::parse(&doc) else {
                    tracing::warn!(%peer, "grant for a malformed document id dropped");
                    return;
                };
                let mut fx = Effects::default();
                let accepted =
                    self.accept_grant(&fp, &entity_id, doc, epoch, &wrapped, &rights, &mut fx);
                let stored = self.carry_out(fx).await;
                let refused = match (accepted, stored) {
                    (Err(reason), _) => Some(reason),
                    (Ok(()), Err(error)) => Some(error.to_string()),
                    (Ok(()), Ok(())) => None,
                };
                if let Some(reason) = refused {
                    tracing::warn!(%peer, %doc, %reason, "grant refused");
                    crate::audit::record_by(
                        &self.store,
                        peer,
                        "grant.refused",
                        &format!("{entity_id}: {reason}"),
                    )
                    .await;
                    return;
                }
                self.attach_foreign(peer, doc).await;
                self.send_pending().await;
            }
            ShareMessage::Revoke { entity_id, doc } => {
                let Some(doc) = DocId::parse(&doc) else {
                    return;
                };
                let Some(entry) = self.sharing.shared_in.get_mut(&doc) else {
                    return;
                };
                if entry.owner != fp.home || entry.revoked {
                    return;
                }
                entry.revoked = true;
                let mut fx = Effects::default();
                let mut batch = Batch::new();
                self.save_shared_in(&mut batch);
                fx.persist(batch);
                let peers: Vec<String> = self.sharing.foreign.keys().cloned().collect();
                for p in peers {
                    self.engine.detach(&p, doc);
                }
                fx.audit(peer, "grant.revoked", entity_id.clone());
                fx.emit(share_event(
                    &entity_id,
                    &fp.home,
                    &self.home.home_id,
                    "none",
                    Some(peer.to_string()),
                ));
                if let Err(error) = self.carry_out(fx).await {
                    tracing::error!(%error, "cannot record a revoked grant");
                }
                tracing::info!(%entity_id, owner = %fp.home, "a home stopped sharing an entity with this one");
            }
        }
    }

    // Each argument is a field of the grant message.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn accept_grant(
        &mut self,
        fp: &ForeignPeer,
        entity_id: &str,
        doc: DocId,
        epoch: KeyEpoch,
        wrapped: &[u8],
        rights: &str,
        fx: &mut Effects,
    ) -> Result<(), String> {
        if rights != "read" && rights != "write" {
            return Err(format!("unknown rights {rights:?}"));
        }
        if entity_id.is_empty() || entity_id.len() > 256 {
            return Err("bad entity id".into());
        }
        // A home cannot grant what it does not own: not a document of this home, and not
        // one another home already shares with this one.
        if self.keyring.ids().any(|(d, _)| d == doc) && !self.is_foreign_doc(doc) {
            return Err("names a document of this home".into());
        }
        if let Some(existing) = self.sharing.shared_in.get(&doc)
            && existing.owner != fp.home
        {
            return Err("names a document another home shares".into());
        }
        // Owners grant an entity under its newest document only; an older one granted
        // again comes from a device that has not seen the newer grant.
        if self
            .sharing
            .shared_in
            .get(&doc)
            .is_some_and(|s| s.superseded)
        {
            return Err("names a document a later grant of the entity replaced".into());
        }
        if !self.sharing.shared_in.contains_key(&doc)
            && self
                .sharing
                .shared_in
                .values()
                .filter(|s| s.owner == fp.home)
                .count()
                >= MAX_SHARED_IN_PER_HOME
        {
            return Err(format!(
                "its home already shares {MAX_SHARED_IN_PER_HOME} entities with this one"
            ));
        }
        let key = WrappedKey::from_bytes(wrapped)
            .and_then(|w| keys::unwrap_key(&w, doc, epoch, &self.device))
            .map_err(|e| format!("cannot unwrap the key: {e}"))?;
        let mut batch = Batch::new();
        let new_key = !self.keyring.contains(doc, epoch);
        self.keyring.insert(doc, epoch, key, &mut batch);
        let was = self.sharing.shared_in.insert(
            doc,
            SharedIn {
                entity_id: entity_id.to_string(),
                owner: fp.home.clone(),
                rights: rights.to_string(),
                revoked: false,
                superseded: false,
            },
        );
        // An owner grants an entity under its current document only. A grant of the
        // same entity under another document (cut into a new generation while it was not
        // shared, then shared again) supersedes the earlier ones, which this home reads
        // no more and may no longer write.
        for (other, s) in self.sharing.shared_in.iter_mut() {
            if *other != doc && s.entity_id == entity_id && s.owner == fp.home && !s.superseded {
                s.revoked = true;
                s.superseded = true;
            }
        }
        self.save_shared_in(&mut batch);
        fx.persist(batch);
        self.ensure_expected_owned(doc, epoch, &fp.home);
        self.index_shared_in();
        let changed = was.as_ref().map(|w| (w.rights.as_str(), w.revoked)) != Some((rights, false));
        if changed {
            fx.emit(share_event(
                entity_id,
                &fp.home,
                &self.home.home_id,
                rights,
                Some(fp.net.to_base58()),
            ));
        }
        if changed || new_key {
            fx.audit(
                &fp.net.to_base58(),
                "grant.received",
                format!(
                    "{entity_id} from {} ({rights}, epoch {})",
                    fp.home, epoch.counter
                ),
            );
        }
        Ok(())
    }

    pub(crate) fn ensure_expected_owned(&mut self, doc: DocId, epoch: KeyEpoch, owner: &str) {
        if self.engine.header(doc).is_ok() {
            return;
        }
        self.engine
            .expect_document(doc, DocKind::Entity, owner, epoch);
    }

    /// Grants `entity_id` to `home`: the registry records it (and the policy, if given),
    /// then the grant goes to the home's connected devices.
    pub(crate) fn share(
        &mut self,
        entity_id: &str,
        home: &str,
        read_only: bool,
        policy: Option<String>,
        fx: &mut Effects,
    ) -> Result<ShareOut, Error> {
        let (home_id, _) = self.resolve_home(home)?;
        let doc = self.own_entity_doc(entity_id)?;
        let policy = match &policy {
            Some(p) => Some(hearth_crdt::Policy::parse(p).ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown policy {p:?}; use latest-wins, merge, owner-wins, sharer-wins or user-choice"
                ))
            })?),
            None => None,
        };
        let rights = if read_only {
            Rights::Read
        } else {
            Rights::Write
        };
        let now = now_ms();
        let (_, out) = self
            .engine
            .transact(self.home.registry_doc, now, None, |d, _, _| {
                registry::share(
                    d,
                    entity_id,
                    &home_id,
                    &registry::Share {
                        rights,
                        policy: policy.map(|p| p.as_str().to_string()),
                        by: Some(self.peer_id.clone()),
                    },
                )
            })
            .map_err(doc_err)?;
        let mut batch = self.handle_outputs(out);
        if let Some(p) = policy {
            let out = self
                .engine
                .set_entity_policy(doc, p, now, None)
                .map_err(doc_err)?;
            let more = self.handle_outputs(out);
            crate::core::append(&mut batch, more);
        }
        fx.persist(batch);
        fx.audit(
            &self.peer_id,
            "share.granted",
            format!("{entity_id} with {home_id} ({})", rights.as_str()),
        );
        let peers: Vec<(String, ForeignPeer)> = self
            .sharing
            .foreign
            .iter()
            .filter(|(_, f)| f.home == home_id)
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect();
        for (peer, fp) in peers {
            self.send_grant(&peer, &fp, entity_id, doc, rights, None);
        }
        self.send_queued(fx);
        fx.emit(share_event(
            entity_id,
            &self.home.home_id,
            &home_id,
            rights.as_str(),
            None,
        ));
        self.share_out(entity_id, &home_id)
    }

    pub(crate) fn unshare(
        &mut self,
        entity_id: &str,
        home: &str,
        fx: &mut Effects,
    ) -> Result<ShareOut, Error> {
        let (home_id, _) = self.resolve_home(home)?;
        let doc = self.own_entity_doc(entity_id)?;
        let before = self.share_out(entity_id, &home_id)?;
        self.revoke_share(entity_id, doc, &home_id, fx)?;
        Ok(ShareOut {
            epoch: self
                .engine
                .header(doc)
                .map(|h| epoch_text(&h.key_epoch))
                .unwrap_or_default(),
            ..before
        })
    }

    /// Removes one grant, tells the home's connected devices, and rotates the entity's key
    /// for everyone who keeps access.
    pub(crate) fn revoke_share(
        &mut self,
        entity_id: &str,
        doc: DocId,
        home_id: &str,
        fx: &mut Effects,
    ) -> Result<(), Error> {
        let now = now_ms();
        // The unshare and the rotation are stored as one batch: a crash between them would
        // leave the home that lost access holding the key still in use.
        let mark = fx.mark();
        let (_, out) = self
            .engine
            .transact(self.home.registry_doc, now, None, |d, _, _| {
                registry::unshare(d, entity_id, home_id)
            })
            .map_err(doc_err)?;
        let batch = self.handle_outputs(out);
        fx.persist(batch);
        let peers: Vec<String> = self
            .sharing
            .foreign
            .iter()
            .filter(|(_, f)| f.home == home_id)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in &peers {
            self.engine.detach(peer, doc);
            self.queue_share_message(
                peer,
                &ShareMessage::Revoke {
                    entity_id: entity_id.to_string(),
                    doc: doc.to_string(),
                },
            );
        }
        fx.audit(
            &self.peer_id,
            "share.revoked",
            format!("{entity_id} from {home_id}"),
        );
        // Joined even when the rotation fails part way, so what it did record is stored
        // with the unshare or not at all.
        let rotated = self.rotate(entity_id, doc, fx);
        fx.join_persists_since(mark);
        rotated?;
        self.send_queued(fx);
        fx.emit(share_event(
            entity_id,
            &self.home.home_id,
            home_id,
            "none",
            None,
        ));
        Ok(())
    }

    /// Starts a new epoch for an entity's document with a fresh key, wrapped for this
    /// home's devices (in the home document) and granted to the devices of every home it
    /// is still shared with. The key is stored before any frame sealed under it goes out.
    pub(crate) fn rotate(
        &mut self,
        entity_id: &str,
        doc: DocId,
        fx: &mut Effects,
    ) -> Result<KeyEpoch, Error> {
        let now = now_ms();
        let mark = fx.mark();
        let old = self.engine.header(doc).map_err(doc_err)?.key_epoch;
        let epoch = KeyEpoch {
            counter: old.counter.checked_add(1).ok_or_else(|| {
                Error::Internal(format!("{entity_id}: the key epoch counter is exhausted"))
            })?,
            device: *self.engine_actor_bytes(),
        };
        let key = new_key()?;
        let wraps = self.wrap_for_devices(&key, doc, epoch);
        let (_, home_out) = self
            .engine
            .transact(self.home.home_doc, now, None, |d, _, _| {
                for (peer, wrapped) in &wraps {
                    home_schema::put_wrapped_key(d, doc, &epoch, peer, wrapped)?;
                }
                Ok(())
            })
            .map_err(doc_err)?;
        let mut batch = self.handle_outputs(home_out);
        self.keyring.insert(doc, epoch, key, &mut batch);
        fx.persist(batch);
        // The new key goes out before the first frame sealed under it.
        self.regrant(entity_id, doc, Some(epoch));
        let out = self
            .engine
            .set_key_epoch(doc, epoch, now)
            .map_err(doc_err)?;
        let batch = self.handle_outputs(out);
        fx.persist(batch);
        // The key and the epoch that uses it land together.
        fx.join_persists_since(mark);
        fx.audit(
            &self.peer_id,
            "key.rotated",
            format!("{entity_id} to epoch {}", epoch.counter),
        );
        Ok(epoch)
    }

    /// Sends the entity's current key to every connected device of the homes it is
    /// shared with.
    pub(crate) fn regrant(&mut self, entity_id: &str, doc: DocId, epoch: Option<KeyEpoch>) {
        let grants: Vec<(String, ForeignPeer, Rights)> = {
            let shares = self
                .engine
                .registry_entry(self.home.registry_doc, entity_id)
                .ok()
                .flatten()
                .map(|e| e.shares)
                .unwrap_or_default();
            self.sharing
                .foreign
                .iter()
                .filter_map(|(p, f)| {
                    shares
                        .get(&f.home)
                        .map(|s| (p.clone(), f.clone(), s.rights))
                })
                .collect()
        };
        for (peer, fp, rights) in grants {
            self.send_grant(&peer, &fp, entity_id, doc, rights, epoch);
        }
    }
}
