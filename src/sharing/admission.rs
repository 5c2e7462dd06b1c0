//! Devices of paired homes: admission at hello, their sessions, and the checks on every frame they send.

use super::service::*;
use crate::core::{Core, now_ms};
use crate::trust::cert::{DeviceCert, Verdict};
use crate::trust::messages::ShareMessage;
use hearth_crdt::schema::home as home_schema;
use hearth_crdt::schema::registry::Rights;
use hearth_crdt::wire::Frame;
use hearth_crdt::{DocId, HomeLookup};
use hearth_net::{PeerClass, PeerId};
use serde_bytes::ByteBuf;

impl Core {
    /// The home a device already belongs to, other than `except`: this home (first), or a
    /// paired home.
    pub(crate) fn home_of_device(&self, peer: &str, except: Option<&str>) -> Option<String> {
        if self
            .engine
            .home_devices(self.home.home_doc)
            .is_ok_and(|d| d.contains_key(peer))
        {
            return Some(self.home.home_id.clone());
        }
        self.paired()
            .into_iter()
            .find(|(id, h)| Some(id.as_str()) != except && h.devices.contains_key(peer))
            .map(|(id, _)| id)
    }

    /// Runs admission again for a connected peer whose hello waited on a pairing.
    pub(crate) async fn readmit(&mut self, peer: PeerId) {
        if let Some(cert) = self.sharing.pending_hellos.remove(&peer) {
            self.on_hello(peer, cert).await;
        }
    }

    /// A hello whose certificate names another home. A device of a paired home is
    /// admitted as a foreign peer; any other stays unadmitted while a pairing may still
    /// make it known (it can only pair, and the network drops it at its hello deadline),
    /// and is refused otherwise.
    pub(crate) async fn on_foreign_hello(
        &mut self,
        peer: PeerId,
        certificate: Vec<u8>,
        claimed_home: &str,
    ) -> Result<(), String> {
        let peer_text = peer.to_base58();
        let paired = self.paired();
        let Some(home) = paired.get(claimed_home) else {
            let pairing = self.sharing.pairing_with.contains(&peer)
                || self.pairing.book.open_count(now_ms() / 1000) > 0;
            if pairing {
                if self.sharing.pending_hellos.len() >= MAX_PENDING_HELLOS
                    && !self.sharing.pending_hellos.contains_key(&peer)
                {
                    return Err("is of an unknown home, and too many such devices wait".into());
                }
                tracing::debug!(peer = %peer_text, "device of an unknown home; it may only pair");
                self.sharing.pending_hellos.insert(peer, certificate);
                return Ok(());
            }
            return Err("belongs to another home".into());
        };
        let Ok(root) = <[u8; 32]>::try_from(home.root_key.as_slice()) else {
            return Err("belongs to a paired home whose root key is malformed".into());
        };
        if self.revocations.contains(&peer_text) {
            return Err("is a revoked device of its home".into());
        }
        if !home.devices.contains_key(&peer_text) {
            if let Some(owner) = self.home_of_device(&peer_text, Some(claimed_home)) {
                return Err(format!("claims a PeerId that belongs to home {owner}"));
            }
            if home.devices.len() >= MAX_DEVICES_PER_PAIRED_HOME {
                return Err(format!(
                    "belongs to a paired home that already has {MAX_DEVICES_PER_PAIRED_HOME} devices"
                ));
            }
        }
        let cert = match DeviceCert::verify_bytes(&certificate, &root) {
            Verdict::Valid(c) if c.peer_id() == peer_text => c,
            Verdict::Valid(_) => {
                return Err("presented a certificate issued to another device".into());
            }
            _ => return Err("presented a certificate that does not verify".into()),
        };
        match self
            .net
            .admit(peer, PeerClass::Paired(claimed_home.into()))
            .await
        {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(error) => return Err(format!("could not be admitted: {error}")),
        }
        tracing::info!(peer = %peer_text, home = claimed_home, device = cert.device_name(), "admitting a device of a paired home");
        self.sharing.foreign.insert(
            peer_text.clone(),
            ForeignPeer {
                net: peer,
                home: claimed_home.to_string(),
                x25519: *cert.x25519_public(),
            },
        );
        if !home.devices.contains_key(&peer_text) {
            // A device that home added after pairing: its certificate verified, so it
            // joins the known device list, and grants reach it from now on.
            let home_id = claimed_home.to_string();
            if let Ok((_, out)) =
                self.engine
                    .transact(self.home.home_doc, now_ms(), None, |d, _, _| {
                        home_schema::put_paired_device(d, &home_id, &peer_text, &certificate)
                    })
            {
                self.persist_in_background(out);
                self.entities.actor_names.clear();
                self.refresh_actor_homes();
            }
        }
        // Its home learns of this home's revoked devices first, so it refuses them too.
        let mine = self.home.home_id.clone();
        for record in self.revocations.records_of(&mine) {
            self.queue_share_message(
                &peer_text,
                &ShareMessage::Revocation {
                    record: ByteBuf::from(record),
                },
            );
        }
        self.open_shared_sessions(&peer_text).await;
        Ok(())
    }

    /// Grants and sessions for a newly admitted foreign device: every entity of this home
    /// shared with its home, and every entity its home shares with this one.
    pub(crate) async fn open_shared_sessions(&mut self, peer: &str) {
        let Some(fp) = self.sharing.foreign.get(peer).cloned() else {
            return;
        };
        for (entity_id, doc, share) in self.shares_to(&fp.home) {
            self.send_grant(peer, &fp, &entity_id, doc, share.rights, None);
        }
        let incoming: Vec<DocId> = self
            .sharing
            .shared_in
            .iter()
            .filter(|(_, s)| s.owner == fp.home && !s.revoked)
            .map(|(d, _)| *d)
            .collect();
        for doc in incoming {
            self.attach_foreign(peer, doc).await;
        }
        self.send_pending().await;
    }

    pub(crate) async fn attach_foreign(&mut self, peer: &str, doc: DocId) {
        let Some(epoch) = self.latest_epoch(doc) else {
            return;
        };
        self.ensure_expected(doc, epoch);
        match self.engine.attach(peer.to_string(), doc, None, now_ms()) {
            Ok(out) => self.persist_in_background(out),
            Err(error) => tracing::warn!(%peer, %doc, %error, "cannot open a shared session"),
        }
    }

    /// Whether a push or sync frame from a device of paired home `home` may touch its
    /// document, and, for the owner's side, whether the changes it carries are ones that
    /// home may make. Called on the opened frame, before the engine sees it, with the home
    /// the network stamped on the frame when it arrived (never a lookup of the peer now:
    /// by the time a queued frame is read its sender may be gone). Fails closed: anything
    /// not shown to be allowed is refused.
    pub(crate) fn authorize_foreign(&self, home: &str, frame: &Frame) -> Result<(), String> {
        let doc = match frame {
            Frame::Push(p) => p.doc,
            Frame::Sync(s) => s.doc,
            _ => return Err("not a push or sync frame".into()),
        };
        if let Some(s) = self.sharing.shared_in.get(&doc) {
            if s.owner != home {
                return Err("the document is not its home's".into());
            }
            if s.revoked {
                return Err("the document is no longer shared with this home".into());
            }
            return Ok(());
        }
        let entity = self.entities.of_doc.get(&doc).cloned().unwrap_or_default();
        let share = self
            .engine
            .registry_entry(self.home.registry_doc, &entity)
            .ok()
            .flatten()
            .filter(|e| e.doc == doc && e.deleted_at.is_none())
            .and_then(|e| e.shares.get(home).cloned());
        let Some(share) = share else {
            return Err("the document is not shared with its home".into());
        };
        let actors = hearth_crdt::payload_actors(frame, self.engine.config())
            .map_err(|e| format!("unreadable changes: {e}"))?;
        if actors.is_empty() {
            return Ok(());
        }
        if share.rights != Rights::Write {
            return Err("its home holds read rights only, and the frame carries changes".into());
        }
        // The engine's actor-to-home table, fed from both homes' device lists.
        let homes = self.engine.actor_homes();
        if let Some(bad) = actors.iter().find(|a| {
            let of = homes.home_of(a);
            of.as_deref() != Some(home) && of.as_deref() != Some(self.home.home_id.as_str())
        }) {
            return Err(format!(
                "carries a change by {bad}, not a device of its home"
            ));
        }
        // A writer home changes the entity's value only, never its header (kind, owner,
        // key epoch), identity or policy: only this home's devices move those.
        self.engine
            .check_grantee_changes(frame)
            .map_err(|e| e.to_string())
    }

    /// Logs and audits a refused frame (at most once a minute per peer and document).
    pub(crate) async fn refuse_foreign(&mut self, peer: &str, frame: &Frame, reason: &str) {
        let doc = match frame {
            Frame::Push(p) => p.doc,
            Frame::Sync(s) => s.doc,
            _ => return,
        };
        tracing::warn!(%peer, %doc, %reason, "refusing a frame from a paired home's device");
        self.metrics_refused();
        let now = now_ms();
        let key = (peer.to_string(), doc);
        let due = self
            .sharing
            .refusals_audited
            .get(&key)
            .is_none_or(|t| now.saturating_sub(*t) >= REFUSAL_AUDIT_INTERVAL_MS);
        if due {
            let tracked = &mut self.sharing.refusals_audited;
            if tracked.len() >= MAX_REFUSALS_TRACKED {
                tracked.retain(|_, t| now.saturating_sub(*t) < REFUSAL_AUDIT_INTERVAL_MS);
            }
            if tracked.len() >= MAX_REFUSALS_TRACKED
                && let Some(oldest) = tracked
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| k.clone())
            {
                tracked.remove(&oldest);
            }
            tracked.insert(key, now);
            let what = if matches!(frame, Frame::Push(_)) {
                "write.refused"
            } else {
                "sync.refused"
            };
            let entity = self
                .entities
                .of_doc
                .get(&doc)
                .cloned()
                .unwrap_or_else(|| doc.to_string());
            crate::audit::record_by(&self.store, peer, what, &format!("{entity}: {reason}")).await;
        }
    }

    pub(crate) fn metrics_refused(&mut self) {
        self.counters.frames_refused += 1;
    }
}
