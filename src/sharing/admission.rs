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
                admin: cert.is_admin(),
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
            self.ensure_loaded(doc).await;
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
        self.ensure_loaded(doc).await;
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
        authorize(
            &ForeignView {
                engine: &self.engine,
                my_home: &self.home.home_id,
                registry_doc: self.home.registry_doc,
                shared_in: &self.sharing.shared_in,
                entity_of_doc: &self.entities.of_doc,
            },
            home,
            frame,
        )
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
        if self.sharing.refusals_audited.due(peer, doc, now_ms()) {
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

/// What the check on a paired home's frame reads: nothing it can change.
pub(crate) struct ForeignView<'a> {
    pub(crate) engine: &'a hearth_crdt::Engine<String>,
    /// This home's id.
    pub(crate) my_home: &'a str,
    /// This home's registry, where its grants are.
    pub(crate) registry_doc: DocId,
    /// Entities other homes share with this one.
    pub(crate) shared_in: &'a std::collections::BTreeMap<DocId, SharedIn>,
    /// This home's entity documents, by document.
    pub(crate) entity_of_doc: &'a std::collections::HashMap<DocId, String>,
}

/// Whether a frame from a device of paired home `home` may be applied: its document is
/// shared between the two homes (either way, and not revoked), and any change it carries
/// is by a device of `home` (or of this home), on an entity `home` may write, touching the
/// entity's value only. Fails closed: anything it cannot read is refused.
pub(crate) fn authorize(view: &ForeignView<'_>, home: &str, frame: &Frame) -> Result<(), String> {
    let doc = match frame {
        Frame::Push(p) => p.doc,
        Frame::Sync(s) => s.doc,
        _ => return Err("not a push or sync frame".into()),
    };
    if let Some(s) = view.shared_in.get(&doc) {
        if s.owner != home {
            return Err("the document is not its home's".into());
        }
        if s.revoked {
            return Err("the document is no longer shared with this home".into());
        }
        return Ok(());
    }
    let entity = view.entity_of_doc.get(&doc).cloned().unwrap_or_default();
    let share = view
        .engine
        .registry_entry(view.registry_doc, &entity)
        .ok()
        .flatten()
        .filter(|e| e.doc == doc && e.deleted_at.is_none())
        .and_then(|e| e.shares.get(home).cloned());
    let Some(share) = share else {
        return Err("the document is not shared with its home".into());
    };
    let actors = hearth_crdt::payload_actors(frame, view.engine.config())
        .map_err(|e| format!("unreadable changes: {e}"))?;
    if actors.is_empty() {
        return Ok(());
    }
    if share.rights != Rights::Write {
        return Err("its home holds read rights only, and the frame carries changes".into());
    }
    // The engine's actor-to-home table, fed from both homes' device lists.
    let homes = view.engine.actor_homes();
    if let Some(bad) = actors.iter().find(|a| {
        let of = homes.home_of(a);
        of.as_deref() != Some(home) && of.as_deref() != Some(view.my_home)
    }) {
        return Err(format!(
            "carries a change by {bad}, not a device of its home"
        ));
    }
    // A writer home changes the entity's value only, never its header (kind, owner, key
    // epoch), identity or policy: only this home's devices move those.
    view.engine
        .check_grantee_changes(frame)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use hearth_crdt::schema::registry::{self, Share};
    use hearth_crdt::wire::{Push, SyncMessage};
    use hearth_crdt::{Engine, EngineConfig, EntityUpdate, KeyEpoch};

    use super::*;

    const MINE: &str = "home-mine";
    const THEIRS: &str = "home-theirs";

    /// An engine holding this home's registry and one entity, shared with `THEIRS` at
    /// `rights` (or not at all).
    fn setup(rights: Option<Rights>) -> (Engine<String>, DocId, DocId, HashMap<DocId, String>) {
        let mut engine = Engine::new(&[1; 16], EngineConfig::default());
        let epoch = KeyEpoch::first([1; 16]);
        let registry_doc = DocId::from_bytes([10; 16]);
        let entity_doc = DocId::from_bytes([11; 16]);
        engine
            .create_registry(registry_doc, MINE, epoch, 1)
            .unwrap();
        let first = EntityUpdate {
            state: "on".into(),
            attributes: None,
        };
        engine
            .create_entity(entity_doc, MINE, epoch, "light.a", &first, 1)
            .unwrap();
        engine
            .transact(registry_doc, 2, None, |d, _, _| {
                registry::put_entity(d, "light.a", entity_doc)?;
                if let Some(rights) = rights {
                    registry::share(
                        d,
                        "light.a",
                        THEIRS,
                        &Share {
                            rights,
                            policy: None,
                            by: None,
                        },
                    )?;
                }
                Ok(())
            })
            .unwrap();
        let of_doc = HashMap::from([(entity_doc, "light.a".to_string())]);
        (engine, registry_doc, entity_doc, of_doc)
    }

    /// A push of one change to `doc` written by a device outside both homes.
    fn stranger_push(engine: &mut Engine<String>, doc: DocId) -> Frame {
        let mut copy = engine.doc_copy(doc).unwrap();
        copy.set_actor(hearth_crdt::ActorId::from(&[9u8; 16][..]));
        let heads = copy.get_heads();
        automerge::transaction::Transactable::put(&mut copy, automerge::ROOT, "state", "off")
            .unwrap();
        copy.commit();
        Frame::Push(Push {
            doc,
            epoch: KeyEpoch::first([1; 16]),
            correlation_id: None,
            bytes: copy.save_after(&heads),
        })
    }

    /// A sync message that carries no change: a peer's opening "these are my heads".
    fn empty_sync(doc: DocId) -> Frame {
        use automerge::sync::SyncDoc;
        let message = automerge::Automerge::new()
            .generate_sync_message(&mut automerge::sync::State::new())
            .unwrap();
        Frame::Sync(SyncMessage {
            doc,
            epoch: KeyEpoch::first([1; 16]),
            expects_reply: false,
            bytes: message.encode(),
        })
    }

    fn check(
        engine: &Engine<String>,
        registry_doc: DocId,
        shared_in: &BTreeMap<DocId, SharedIn>,
        of_doc: &HashMap<DocId, String>,
        frame: &Frame,
    ) -> Result<(), String> {
        let view = ForeignView {
            engine,
            my_home: MINE,
            registry_doc,
            shared_in,
            entity_of_doc: of_doc,
        };
        authorize(&view, THEIRS, frame)
    }

    #[test]
    fn a_document_not_shared_with_the_home_is_refused() {
        let (engine, registry_doc, entity_doc, of_doc) = setup(None);
        let err = check(
            &engine,
            registry_doc,
            &BTreeMap::new(),
            &of_doc,
            &empty_sync(entity_doc),
        )
        .unwrap_err();
        assert!(err.contains("not shared"), "{err}");
        // A document this home does not even know.
        let unknown = empty_sync(DocId::from_bytes([99; 16]));
        assert!(check(&engine, registry_doc, &BTreeMap::new(), &of_doc, &unknown).is_err());
    }

    #[test]
    fn a_shared_document_syncs_and_a_read_only_home_may_not_write() {
        let (mut engine, registry_doc, entity_doc, of_doc) = setup(Some(Rights::Read));
        let shared_in = BTreeMap::new();
        assert_eq!(
            check(
                &engine,
                registry_doc,
                &shared_in,
                &of_doc,
                &empty_sync(entity_doc)
            ),
            Ok(())
        );
        let push = stranger_push(&mut engine, entity_doc);
        let err = check(&engine, registry_doc, &shared_in, &of_doc, &push).unwrap_err();
        assert!(err.contains("read rights only"), "{err}");
    }

    #[test]
    fn a_writer_home_may_not_carry_changes_by_strangers() {
        let (mut engine, registry_doc, entity_doc, of_doc) = setup(Some(Rights::Write));
        let push = stranger_push(&mut engine, entity_doc);
        let err = check(&engine, registry_doc, &BTreeMap::new(), &of_doc, &push).unwrap_err();
        assert!(err.contains("not a device of its home"), "{err}");
    }

    #[test]
    fn an_entity_shared_in_is_only_its_owners_and_not_once_revoked() {
        let (engine, registry_doc, _, of_doc) = setup(None);
        let theirs = DocId::from_bytes([20; 16]);
        let entry = |owner: &str, revoked| SharedIn {
            entity_id: "sensor.b".into(),
            owner: owner.into(),
            rights: "read".into(),
            revoked,
            superseded: false,
        };
        let frame = empty_sync(theirs);
        let shared = BTreeMap::from([(theirs, entry(THEIRS, false))]);
        assert_eq!(
            check(&engine, registry_doc, &shared, &of_doc, &frame),
            Ok(())
        );
        let other_owner = BTreeMap::from([(theirs, entry("home-else", false))]);
        assert!(check(&engine, registry_doc, &other_owner, &of_doc, &frame).is_err());
        let revoked = BTreeMap::from([(theirs, entry(THEIRS, true))]);
        assert!(check(&engine, registry_doc, &revoked, &of_doc, &frame).is_err());
    }

    #[test]
    fn frames_other_than_push_and_sync_are_refused() {
        let (engine, registry_doc, _, of_doc) = setup(None);
        let frame = Frame::Digest(hearth_crdt::wire::DigestFrame { bytes: Vec::new() });
        assert!(check(&engine, registry_doc, &BTreeMap::new(), &of_doc, &frame).is_err());
    }
}
