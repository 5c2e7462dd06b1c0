//! Device revocation within a home: the device is marked revoked in the home document,
//! disconnected everywhere, and every document of the home moves to a new key epoch whose
//! keys reach only the remaining devices (and the homes each entity is shared with).
//!
//! The new keys of most documents travel wrapped in the home document, as at creation.
//! The home and registry documents cannot carry their own new keys, so those go to each
//! remaining device of the home in a home-key grant frame, sent at once to connected
//! devices and again by any device on admitting one of its home.

use crate::core::effects::Effects;
use crate::trust::messages::HomeKey;
use hearth_crdt::schema::home as home_schema;
use hearth_crdt::{DocId, KeyEpoch};
use hearth_storage::{Batch, Keyspace};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::Error;
use crate::core::Reply;
use crate::core::{Core, doc_err, new_key, now_ms};
use crate::revocation::set::{Learnt, Revocations};
use crate::trust::cert::{DeviceCert, Revocation};
use crate::trust::keys::{self, WrappedKey};

/// Requests of the revocation service.
pub(crate) enum RevocationRequest {
    RevokeDevice {
        device: String,
        reply: Reply<RevokedDevice>,
    },
}

/// What a revocation did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedDevice {
    /// The device's PeerId.
    pub peer_id: crate::DeviceId,
    /// Its name.
    pub name: String,
    /// Documents whose key rotated.
    pub rotated: usize,
}

impl Core {
    pub(crate) fn revoke_device(
        &mut self,
        device: &str,
        fx: &mut Effects,
    ) -> Result<RevokedDevice, Error> {
        if self.home.root_secret.is_none() {
            return Err(Error::Forbidden(
                "only the home's admin device (the one that created it) can revoke devices".into(),
            ));
        }
        let devices = self
            .engine
            .home_devices(self.home.home_doc)
            .map_err(doc_err)?;
        let matches: Vec<(String, home_schema::DeviceRecord)> = devices
            .into_iter()
            .filter(|(p, d)| p == device || d.name == device)
            .collect();
        let (peer, record) = match matches.as_slice() {
            [one] => one.clone(),
            [] => return Err(Error::NotFound(format!("no device {device} in this home"))),
            _ => {
                return Err(Error::Conflict(format!(
                    "more than one device is named {device:?}; use its PeerId"
                )));
            }
        };
        if peer == self.peer_id {
            return Err(Error::Invalid("a device cannot revoke itself".into()));
        }
        if record.revoked_at.is_some() {
            return Err(Error::Conflict(format!("{device} is already revoked")));
        }
        // The signed record first: kept in this device's own add-only set (and the
        // store) before anything else, so no later step can admit the device again.
        let now = now_ms();
        let root = self
            .home
            .root_secret
            .map(|s| ed25519_dalek::SigningKey::from_bytes(&s))
            .ok_or_else(|| Error::Internal("the home root key is missing".into()))?;
        let signed = Revocation::issue(&root, &peer, now)
            .and_then(|r| r.encode())
            .map_err(|e| Error::Internal(format!("cannot sign the revocation: {e}")))?;
        let mine = (self.home.home_id.clone(), self.home.root_public);
        if let Err(reason) = self
            .revocations
            .learn(&signed, |h| (h == mine.0).then_some(mine.1))
        {
            return Err(Error::Internal(format!(
                "the new revocation does not verify: {reason}"
            )));
        }
        let mut batch = Batch::new();
        self.revocations.save(&mut batch);
        fx.persist(batch);
        // Out first, and kept out while the keys rotate; the revocation itself is then
        // recorded under the home document's new key, like everything after it.
        self.sharing.revoking.insert(peer.clone());
        self.disconnect_revoked(fx);
        let rotated = self.rotate_home_keys(fx);
        let marked = self
            .engine
            .transact(self.home.home_doc, now, None, |d, _, _| {
                home_schema::put_revocation(d, &peer, &signed)?;
                home_schema::revoke_device(d, &peer, now)
            })
            .map_err(doc_err);
        self.sharing.revoking.remove(&peer);
        let rotated = rotated?;
        let (_, out) = marked?;
        let batch = self.handle_outputs(out);
        fx.persist(batch);
        fx.audit(
            &self.peer_id,
            "device.revoked",
            format!("{peer} ({}); {rotated} document keys rotated", record.name),
        );
        tracing::info!(%peer, name = %record.name, rotated, "revoked a device");
        // Paired homes learn it now; those not connected learn it when they next are.
        let foreign: Vec<String> = self.sharing.foreign.keys().cloned().collect();
        for other in foreign {
            self.queue_share_message(
                &other,
                &crate::trust::messages::ShareMessage::Revocation {
                    record: ByteBuf::from(signed.clone()),
                },
            );
        }
        self.drop_sync_states_of_peers(vec![peer.clone()]);
        self.send_queued(fx);
        Ok(RevokedDevice {
            peer_id: peer.into(),
            name: record.name,
            rotated,
        })
    }

    /// Disconnects admitted devices the home document now marks revoked.
    pub(crate) fn disconnect_revoked(&mut self, fx: &mut Effects) {
        let Ok(devices) = self.engine.home_devices(self.home.home_doc) else {
            return;
        };
        let revoked: Vec<(String, hearth_net::PeerId)> = self
            .peers
            .admitted
            .iter()
            .filter(|(p, _)| {
                self.sharing.revoking.contains(*p)
                    || self.revocations.contains(p)
                    || devices.get(*p).is_some_and(|d| d.revoked_at.is_some())
            })
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        let gone: Vec<String> = revoked.iter().map(|(p, _)| p.clone()).collect();
        self.drop_sync_states_of_peers(gone);
        for (text, peer) in revoked {
            self.peers.admitted.remove(&text);
            self.engine.detach_peer(&text);
            self.notice_peer(text.clone(), false);
            fx.reject(peer, "peer is a revoked device of this home");
        }
    }

    /// Moves every document of the home to a new epoch. Returns how many rotated.
    ///
    /// Every key reaches those who keep access before the first frame sealed under it:
    /// the home and registry keys in home-key grants, then the home document's own
    /// rotation (under its new key), then the other documents' keys wrapped in the home
    /// document, the new keys of shared entities to the homes they are shared with, and
    /// last the other documents' rotations.
    pub(crate) fn rotate_home_keys(&mut self, fx: &mut Effects) -> Result<usize, Error> {
        let now = now_ms();
        let me = *self.engine_actor_bytes();
        let mut fresh: Vec<(DocId, KeyEpoch, crate::trust::keys::DocKey)> = Vec::new();
        for (doc, _) in self.home_key_ids() {
            let Ok(old) = self.engine.header(doc).map(|h| h.key_epoch) else {
                continue;
            };
            // An epoch counter at its maximum (only a hostile header could put it there,
            // and header writes from outside the home are refused) cannot rotate.
            let Some(counter) = old.counter.checked_add(1) else {
                return Err(Error::Internal(format!(
                    "document {doc}: the key epoch counter is exhausted"
                )));
            };
            fresh.push((
                doc,
                KeyEpoch {
                    counter,
                    device: me,
                },
                new_key()?,
            ));
        }
        let mut batch = Batch::new();
        for (doc, epoch, key) in &fresh {
            self.keyring.insert(*doc, *epoch, key.clone(), &mut batch);
        }
        fx.persist(batch);

        let home_keys: Vec<_> = fresh
            .iter()
            .filter(|(d, _, _)| self.is_home_or_registry(*d))
            .cloned()
            .collect();
        let peers: Vec<String> = self.peers.admitted.keys().cloned().collect();
        for peer in &peers {
            self.send_home_keys(peer, &home_keys);
        }
        let mut rotated = 0;
        let home_doc = self.home.home_doc;
        if let Some((_, epoch, _)) = fresh.iter().find(|(d, _, _)| *d == home_doc) {
            let out = self
                .engine
                .set_key_epoch(home_doc, *epoch, now)
                .map_err(doc_err)?;
            let batch = self.handle_outputs(out);
            fx.persist(batch);
            rotated += 1;
        }

        let mut wraps = Vec::new();
        for (doc, epoch, key) in &fresh {
            if self.is_home_or_registry(*doc) {
                continue;
            }
            for (peer, wrapped) in self.wrap_for_devices(key, *doc, *epoch) {
                wraps.push((*doc, *epoch, peer, wrapped));
            }
        }
        let (_, out) = self
            .engine
            .transact(home_doc, now, None, |d, _, _| {
                for (doc, epoch, peer, wrapped) in &wraps {
                    home_schema::put_wrapped_key(d, *doc, epoch, peer, wrapped)?;
                }
                Ok(())
            })
            .map_err(doc_err)?;
        let batch = self.handle_outputs(out);
        fx.persist(batch);

        // Homes that share in this home's entities get the new keys too.
        let shared: Vec<(String, DocId)> = self
            .engine
            .registry(self.home.registry_doc)
            .map(|r| {
                r.entities
                    .into_iter()
                    .filter(|(_, e)| e.deleted_at.is_none() && !e.shares.is_empty())
                    .map(|(id, e)| (id, e.doc))
                    .collect()
            })
            .unwrap_or_default();
        for (entity_id, doc) in shared {
            if let Some((_, epoch, _)) = fresh.iter().find(|(d, _, _)| *d == doc) {
                self.regrant(&entity_id, doc, Some(*epoch));
            }
        }

        let mut batch = Batch::new();
        for (doc, epoch, _) in &fresh {
            if *doc == home_doc {
                continue;
            }
            match self.engine.set_key_epoch(*doc, *epoch, now) {
                Ok(out) => {
                    rotated += 1;
                    let more = self.handle_outputs(out);
                    crate::core::append(&mut batch, more);
                }
                Err(error) => tracing::warn!(%doc, %error, "cannot rotate a document's key"),
            }
        }
        fx.persist(batch);
        fx.audit(
            &self.peer_id,
            "key.rotated",
            format!("{rotated} documents of the home"),
        );
        Ok(rotated)
    }

    pub(crate) fn is_home_or_registry(&self, doc: DocId) -> bool {
        doc == self.home.home_doc || doc == self.home.registry_doc
    }

    pub(crate) fn latest_key_epoch(&self, doc: DocId) -> Option<KeyEpoch> {
        self.keyring
            .ids()
            .filter(|(d, _)| *d == doc)
            .map(|(_, e)| e)
            .max()
    }

    /// Sends a device of this home the current keys of the home and registry documents,
    /// once they moved past their first epoch (a revocation happened).
    pub(crate) fn send_current_home_keys(&mut self, peer: &str) {
        let mut keys = Vec::new();
        for doc in [self.home.home_doc, self.home.registry_doc] {
            if let Some(epoch) = self.latest_key_epoch(doc)
                && epoch.counter > 0
                && let Some(key) = self.keyring.get(doc, epoch)
            {
                keys.push((doc, epoch, key.clone()));
            }
        }
        if !keys.is_empty() {
            self.send_home_keys(peer, &keys);
        }
    }

    pub(crate) fn send_home_keys(
        &mut self,
        peer: &str,
        keys_: &[(DocId, KeyEpoch, crate::trust::keys::DocKey)],
    ) {
        let Some(x25519) = self
            .engine
            .home_devices(self.home.home_doc)
            .ok()
            .and_then(|d| d.get(peer).cloned())
            .filter(|d| {
                d.revoked_at.is_none()
                    && !self.sharing.revoking.contains(peer)
                    && !self.revocations.contains(peer)
            })
            .and_then(|d| DeviceCert::decode(&d.certificate).ok())
            .map(|c| *c.x25519_public())
        else {
            return;
        };
        for (doc, epoch, key) in keys_ {
            let wrapped = match keys::wrap_key(key, *doc, *epoch, &x25519) {
                Ok(w) => w.to_bytes().to_vec(),
                Err(error) => {
                    tracing::warn!(%peer, %error, "cannot wrap a home key");
                    continue;
                }
            };
            let message = crate::trust::messages::ShareMessage::HomeKey(HomeKey {
                doc: doc.to_string(),
                epoch: *epoch,
                wrapped: ByteBuf::from(wrapped),
            });
            self.queue_share_message(peer, &message);
        }
    }

    /// A home-key grant from a device of this home: stores the new key of the home or
    /// registry document.
    pub(crate) fn accept_home_key(&mut self, peer: &str, key: HomeKey, fx: &mut Effects) {
        let Some(doc) = DocId::parse(&key.doc).filter(|d| self.is_home_or_registry(*d)) else {
            tracing::warn!(%peer, "home-key grant for a document that is not the home's own");
            return;
        };
        if self.keyring.contains(doc, key.epoch) {
            return;
        }
        let opened = WrappedKey::from_bytes(&key.wrapped)
            .and_then(|w| keys::unwrap_key(&w, doc, key.epoch, &self.device));
        match opened {
            Ok(k) => {
                let mut batch = Batch::new();
                self.keyring.insert(doc, key.epoch, k, &mut batch);
                fx.persist_or_log(batch, "a home key");
                tracing::info!(%doc, epoch = key.epoch.counter, "learned a rotated home key");
            }
            Err(error) => tracing::warn!(%peer, %error, "cannot unwrap a home key"),
        }
    }
}

impl Core {
    /// Reads this device's copy of the revocation set.
    pub(crate) async fn load_revocations(&mut self) {
        match self
            .store
            .get(Keyspace::Meta, Revocations::store_key())
            .await
        {
            Ok(Some(bytes)) => self.revocations = Revocations::decode(&bytes),
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "cannot read the stored revocations"),
        }
    }

    /// Root public keys of the homes this one trusts revocations from: itself and every
    /// paired home. A record of any other home is ignored.
    pub(crate) fn trusted_roots(&self) -> std::collections::HashMap<String, [u8; 32]> {
        let mut roots = std::collections::HashMap::new();
        roots.insert(self.home.home_id.clone(), self.home.root_public);
        if let Ok(paired) = self.engine.home_paired(self.home.home_doc) {
            for (home, p) in paired {
                if let Ok(root) = <[u8; 32]>::try_from(p.root_key.as_slice()) {
                    roots.insert(home, root);
                }
            }
        }
        roots
    }

    /// Learns the revocations the home document carries (after it changed, and at
    /// start). Records that do not verify are ignored; new ones are kept and acted on.
    /// Answers the entities whose keys must rotate now (see
    /// [`Core::after_revocations_learnt`]).
    pub(crate) fn absorb_revocations(&mut self, fx: &mut Effects) -> Vec<(String, DocId)> {
        let records = match self
            .engine
            .doc(self.home.home_doc)
            .map_err(|e| e.to_string())
            .and_then(|d| home_schema::revocations(d).map_err(|e| e.to_string()))
        {
            Ok(records) => records,
            Err(error) => {
                tracing::debug!(%error, "home document revocations not readable");
                return Vec::new();
            }
        };
        let roots = self.trusted_roots();
        let mut new = Vec::new();
        for (peer, bytes) in records {
            match self.revocations.learn(&bytes, |h| roots.get(h).copied()) {
                Ok(Learnt::New { peer, home }) => new.push((peer, home)),
                Ok(Learnt::Known) => {}
                Err(reason) => {
                    tracing::warn!(%peer, %reason, "ignoring a revocation in the home document")
                }
            }
        }
        if new.is_empty() {
            return Vec::new();
        }
        self.after_revocations_learnt(new, fx)
    }

    /// A revocation a paired home's device sent: it must be signed by that home's root
    /// key and name one of that home's devices. A new one goes into this home's document
    /// (so every device of the home learns it) and is acted on.
    /// Answers the entities whose keys must rotate now (see
    /// [`Core::after_revocations_learnt`]).
    pub(crate) fn on_paired_revocation(
        &mut self,
        peer: &str,
        home: &str,
        record: &[u8],
        fx: &mut Effects,
    ) -> Vec<(String, DocId)> {
        let roots = self.trusted_roots();
        let learnt = self.revocations.learn(record, |h| {
            (h == home).then(|| roots.get(h).copied()).flatten()
        });
        let (revoked, of) = match learnt {
            Ok(Learnt::New { peer, home }) => (peer, home),
            Ok(Learnt::Known) => return Vec::new(),
            Err(reason) => {
                tracing::warn!(%peer, %home, %reason, "refusing a revocation from a paired home");
                return Vec::new();
            }
        };
        match self
            .engine
            .transact(self.home.home_doc, now_ms(), None, |d, _, _| {
                home_schema::put_revocation(d, &revoked, record)
            }) {
            Ok((_, out)) => {
                let batch = self.handle_outputs(out);
                fx.persist_or_log(batch, "a paired home's revocation");
            }
            Err(error) => tracing::warn!(%error, "cannot record a paired home's revocation"),
        }
        self.after_revocations_learnt(vec![(revoked, of)], fx)
    }

    /// Acts on newly learnt revocations: keeps the set, shuts the devices out, and moves
    /// every entity shared with a paired home that lost a device to a new key, wrapped
    /// only for its remaining devices.
    /// Answers the entities shared with a home that lost a device: each rotates in its
    /// own step ([`Core::rotate_each`]), so one that cannot be stored does not hold up
    /// the others.
    pub(crate) fn after_revocations_learnt(
        &mut self,
        new: Vec<(String, String)>,
        fx: &mut Effects,
    ) -> Vec<(String, DocId)> {
        let mut batch = Batch::new();
        self.revocations.save(&mut batch);
        fx.persist_or_log(batch, "the revocations");
        self.disconnect_revoked(fx);
        self.send_queued(fx);
        let mine = self.home.home_id.clone();
        let mut homes = std::collections::BTreeSet::new();
        for (peer, home) in new {
            fx.audit(
                &self.peer_id,
                "device.revocation_learnt",
                format!("{peer} of {home}"),
            );
            if home == mine {
                continue;
            }
            homes.insert(home);
            if let Some(fp) = self.sharing.foreign.remove(&peer) {
                self.engine.detach_peer(&peer);
                fx.reject(fp.net, "peer is a revoked device of its home");
            }
        }
        let mut rotate = Vec::new();
        for home in homes {
            let shared: Vec<(String, DocId)> = self
                .engine
                .registry(self.home.registry_doc)
                .map(|r| {
                    r.entities
                        .into_iter()
                        .filter(|(_, e)| e.deleted_at.is_none() && e.shares.contains_key(&home))
                        .map(|(id, e)| (id, e.doc))
                        .collect()
                })
                .unwrap_or_default();
            rotate.extend(shared);
        }
        rotate
    }

    /// Rotates each entity's key in a step of its own; one that fails is logged.
    pub(crate) async fn rotate_each(&mut self, entities: Vec<(String, DocId)>) {
        for (entity_id, doc) in entities {
            self.ensure_loaded(doc).await;
            if let Err(error) = self.step(|core, fx| core.rotate(&entity_id, doc, fx)).await {
                tracing::warn!(%entity_id, %error, "cannot rotate an entity after a revocation");
            }
        }
    }
}

impl RevocationRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        true
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::RevokeDevice { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

impl Core {
    /// Answers a request of the revocation service.
    pub(crate) async fn handle_revocation(&mut self, request: RevocationRequest) {
        match request {
            RevocationRequest::RevokeDevice { device, reply } => {
                let result = self.step(|core, fx| core.revoke_device(&device, fx)).await;
                let _ = reply.send(result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RevocationRequest;
    use crate::core::testing::TestCore;

    #[tokio::test]
    async fn an_unknown_device_or_this_one_cannot_be_revoked() {
        let t = TestCore::start("admin").await;
        for device in ["no-such-device".to_string(), t.peer_id.clone()] {
            let result = t
                .core
                .call(|reply| RevocationRequest::RevokeDevice { device, reply })
                .await
                .unwrap();
            assert!(result.is_err());
        }
        t.stop().await;
    }
}
