//! The entities service: the core's handling of entity requests.

use hearth_crdt::DocId;
use std::collections::HashMap;

use crate::Error;
use crate::core::*;
use crate::entities::EntityChange;
use crate::entities::{Entity, EntityWrite};
use hearth_crdt::EntityUpdate;
use hearth_crdt::schema::registry;
use hearth_storage::Batch;
use std::sync::Arc;

/// Requests of the entities service: writes, reads, policies, conflicts, history.
pub(crate) enum EntityRequest {
    SetEntity {
        id: String,
        write: EntityWrite,
        reply: Reply<Entity>,
    },
    SetPolicy {
        id: String,
        policy: String,
        reply: Reply<Entity>,
    },
    Conflicts {
        reply: Reply<Vec<crate::entities::ConflictInfo>>,
    },
    ResolveConflict {
        id: String,
        field: String,
        choice: usize,
        reply: Reply<Entity>,
    },
    /// Many writes in order, acknowledged together (batching.rs).
    SetMany {
        writes: Vec<(String, EntityWrite)>,
        reply: Reply<Vec<Entity>>,
    },
    GetEntity {
        id: String,
        reply: Reply<Option<Entity>>,
    },
    ListEntities {
        reply: Reply<Vec<Entity>>,
    },
    // Entity history and deletion (ops.rs).
    DeleteEntity {
        id: String,
        reply: Reply<Entity>,
    },
    EntityHistory {
        id: String,
        limit: usize,
        reply: Reply<Vec<crate::entities::EntityVersion>>,
    },
    RestoreEntity {
        id: String,
        version: String,
        reply: Reply<Entity>,
    },
    /// What an entity's document generations hold on this device (generations.rs).
    Storage {
        id: String,
        reply: Reply<crate::entities::EntityStorage>,
    },
    /// Internal: a restore's read job resolved the old version; write it as a new one.
    WriteRestored {
        id: String,
        doc: DocId,
        target: hearth_crdt::Entity,
        reply: Reply<Entity>,
    },
}

impl EntityRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        !matches!(
            self,
            Self::Conflicts { .. }
                | Self::GetEntity { .. }
                | Self::ListEntities { .. }
                | Self::EntityHistory { .. }
                | Self::Storage { .. }
        )
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::SetEntity { reply, .. }
            | Self::SetPolicy { reply, .. }
            | Self::ResolveConflict { reply, .. }
            | Self::DeleteEntity { reply, .. }
            | Self::RestoreEntity { reply, .. }
            | Self::WriteRestored { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::SetMany { reply, .. } | Self::ListEntities { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::Conflicts { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::GetEntity { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::EntityHistory { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Storage { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

impl Core {
    /// Answers a request of the entities service.
    pub(crate) fn handle_entities(&mut self, request: EntityRequest) {
        match request {
            EntityRequest::SetPolicy { id, policy, reply } => {
                let result = self.set_policy(&id, &policy);
                self.reply_after_flush(result, reply);
            }
            EntityRequest::Conflicts { reply } => {
                let _ = reply.send(self.list_conflicts());
            }
            EntityRequest::ResolveConflict {
                id,
                field,
                choice,
                reply,
            } => {
                let result = self.resolve(&id, &field, choice);
                self.reply_after_flush(result, reply);
            }
            EntityRequest::SetEntity { id, write, reply } => {
                let result = self.set_entity(&id, write);
                self.reply_after_flush(result, reply);
            }
            EntityRequest::SetMany { writes, reply } => {
                let result = self.set_many(writes);
                self.reply_after_flush(result, reply);
            }
            EntityRequest::GetEntity { id, reply } => {
                let _ = reply.send(self.get_entity(&id));
            }
            EntityRequest::ListEntities { reply } => self.list_entities(reply),
            EntityRequest::DeleteEntity { id, reply } => {
                let result = self.delete_entity(&id);
                self.reply_after_flush(result, reply);
            }
            EntityRequest::EntityHistory { id, limit, reply } => {
                self.entity_history(&id, limit, reply);
            }
            EntityRequest::RestoreEntity { id, version, reply } => {
                self.restore_entity(&id, &version, reply);
            }
            EntityRequest::Storage { id, reply } => {
                let _ = reply.send(self.entity_storage(&id));
            }
            EntityRequest::WriteRestored {
                id,
                doc,
                target,
                reply,
            } => {
                let result = self.write_restored(&id, doc, target);
                self.reply_after_flush(result, reply);
            }
        }
    }
}

impl Core {
    /// Builds the entity index from the registry at start, announcing nothing. On a device
    /// that has not received the registry yet the index stays empty until it arrives.
    pub(crate) fn build_entity_index_at_start(&mut self) {
        if let Err(error) = self.rebuild_entity_index() {
            tracing::debug!(%error, "registry not readable yet");
        }
    }

    /// Rebuilds the entity index from the registry after it changed, announcing the
    /// entities it gained whose documents are here. When the registry cannot be read the
    /// index stays as it was.
    pub(crate) fn rebuild_entity_index_lenient(&mut self) {
        let before = std::mem::take(&mut self.entities.by_id);
        let old_docs = std::mem::take(&mut self.entities.of_doc);
        if let Err(error) = self.rebuild_entity_index() {
            tracing::debug!(%error, "registry not readable yet");
            self.entities.by_id = before;
            self.entities.of_doc = old_docs;
            return;
        }
        let added = self
            .entities
            .by_id
            .keys()
            .filter(|id| !before.contains_key(*id))
            .cloned()
            .collect();
        self.after_index_change(before, added);
    }

    /// The live document of each of the registry entries `ids` (`None` for one deleted
    /// or absent), or `None` when an entry cannot be read.
    pub(crate) fn registry_entries(
        &self,
        ids: &std::collections::BTreeSet<String>,
    ) -> Option<Vec<(String, Option<DocId>)>> {
        let mut entries = Vec::with_capacity(ids.len());
        for id in ids {
            match self.engine.registry_entry(self.home.registry_doc, id) {
                Ok(entry) => entries.push((
                    id.clone(),
                    entry.filter(|e| e.deleted_at.is_none()).map(|e| e.doc),
                )),
                Err(error) => {
                    tracing::debug!(%id, %error, "registry entry not readable");
                    return None;
                }
            }
        }
        Some(entries)
    }

    /// Updates the index for the registry entries read by [`Core::registry_entries`], as
    /// a whole rebuild would leave them: the entities of paired homes keep their ids, an
    /// entry naming a new generation is followed once it is valid, and an entity that
    /// left is announced.
    pub(crate) fn update_entity_index(&mut self, entries: Vec<(String, Option<DocId>)>) {
        let mut before = HashMap::new();
        let mut added = Vec::new();
        for (id, doc) in entries {
            if let Some(old) = self.entities.by_id.remove(&id) {
                if self.entities.of_doc.get(&old) == Some(&id) {
                    self.entities.of_doc.remove(&old);
                }
                before.insert(id.clone(), old);
            } else if doc.is_some() {
                added.push(id.clone());
            }
            if let Some(doc) = doc {
                // One id per document, as a rebuild leaves it (only a malformed registry
                // names one document twice).
                if let Some(other) = self.entities.of_doc.insert(doc, id.clone())
                    && other != id
                    && self.entities.by_id.get(&other) == Some(&doc)
                {
                    self.entities.by_id.remove(&other);
                    before.entry(other).or_insert(doc);
                }
                self.entities.by_id.insert(id, doc);
            }
        }
        self.index_shared_in();
        self.after_index_change(before, added);
    }

    /// What follows a change of the index from `before` (the entries it held for the ids
    /// that changed, or all of them); `added` are the ids the index did not hold.
    fn after_index_change(&mut self, before: HashMap<String, DocId>, added: Vec<String>) {
        // An entry that names a new generation is followed only once it is valid and here.
        self.follow_registry(&before);
        // A new entity whose document arrived before its registry entry was not announced
        // then (its document was in no entry): it is now, or subscribers never see it.
        for id in added {
            let Some(doc) = self.entities.by_id.get(&id).copied() else {
                continue;
            };
            if !self.has_content(doc) {
                // Announced when its content arrives (core/outputs.rs).
                continue;
            }
            match self.entity_view(doc) {
                Ok(entity) => {
                    // It came by sync: from the device that wrote it, as a change that
                    // arrived the other way round would say.
                    let writer = entity.updated_by.as_str();
                    let from_peer = (writer != self.peer_id).then(|| writer.to_string());
                    self.emit_change(entity, from_peer, None, false)
                }
                Err(error) => tracing::debug!(%id, %error, "new entity unreadable"),
            }
        }
        // An entity that left the index was deleted (tombstoned in the registry) on
        // another device: announce it with its last state.
        for (id, doc) in before {
            if !self.entities.by_id.contains_key(&id) && self.has_content(doc) {
                match self.entity_view(doc) {
                    Ok(entity) => self.emit_change(entity, None, None, true),
                    Err(error) => tracing::debug!(%id, %error, "deleted entity unreadable"),
                }
                let batch = self.drop_sync_states_of_doc(doc);
                let store = self.store.clone();
                tokio::spawn(async move {
                    if let Err(error) = store.batch(batch).await {
                        tracing::warn!(%error, "could not delete a deleted entity's sync states");
                    }
                });
            }
        }
    }

    pub(crate) fn rebuild_entity_index(&mut self) -> Result<(), Error> {
        let index = self
            .engine
            .registry_index(self.home.registry_doc)
            .map_err(doc_err)?;
        self.entities.of_doc = index.into_iter().map(|(id, doc)| (doc, id)).collect();
        self.entities.by_id = self
            .entities
            .of_doc
            .iter()
            .map(|(doc, id)| (id.clone(), *doc))
            .collect();
        self.index_shared_in();
        Ok(())
    }

    pub(crate) fn set_entity(
        &mut self,
        id: &str,
        write: EntityWrite,
    ) -> Result<(Entity, Batch), Error> {
        let update = EntityUpdate {
            state: write.state,
            attributes: write.attributes,
        };
        let now = now_ms();
        let doc = match self.doc_of_entity(id) {
            Some(doc) => {
                self.check_write_rights(doc, id)?;
                if !self.has_content(doc) {
                    return Err(Error::Unavailable(format!(
                        "{id}: its document has not arrived on this device yet; write \
                         again once it has synced"
                    )));
                }
                doc
            }
            None => {
                let entity_id = id.to_string();
                let (doc, batch) = self.create_shared_doc(
                    DocId::from_bytes(crate::home::random()?),
                    now,
                    write.correlation_id.clone(),
                    |engine, doc, epoch, home| {
                        let mut out = engine
                            .create_entity(doc, &home.home_id, epoch, &entity_id, &update, now)
                            .map_err(doc_err)?;
                        let (_, reg_out) = engine
                            .transact(home.registry_doc, now, None, |d, _, _| {
                                registry::put_entity(d, &entity_id, doc)
                            })
                            .map_err(doc_err)?;
                        out.extend(reg_out);
                        Ok(out)
                    },
                )?;
                self.entities.of_doc.insert(doc, id.to_string());
                self.entities.by_id.insert(id.to_string(), doc);
                // Creating a document reports no change of its own, so announce it here.
                let entity = self.entity_view(doc)?;
                self.emit(entity.clone(), None, write.correlation_id);
                return Ok((entity, batch));
            }
        };
        // The correlation id goes into the same change as the state, so devices that get
        // the change by sync rather than by push still see it.
        let correlation = write.correlation_id.clone();
        let (_, out) = self
            .engine
            .transact(doc, now, write.correlation_id, |d, at, by| {
                hearth_crdt::schema::entity::write(d, &update, at, by)?;
                hearth_crdt::schema::entity::put_correlation_id(d, correlation.as_deref())
            })
            .map_err(doc_err)?;
        self.entities.last_view = None;
        let batch = self.handle_outputs(out);
        let entity = match self.entities.last_view.take() {
            Some((d, entity)) if d == doc => entity,
            _ => self.entity_view(doc)?,
        };
        Ok((entity, batch))
    }

    pub(crate) fn doc_of_entity(&self, id: &str) -> Option<DocId> {
        self.entities.by_id.get(id).copied()
    }

    pub(crate) fn get_entity(&mut self, id: &str) -> Result<Option<Entity>, Error> {
        match self.doc_of_entity(id) {
            // Listed in the registry but not synced here yet: not readable on this device.
            Some(doc) if !self.has_content(doc) => Ok(None),
            Some(doc) => self.entity_view(doc).map(Some),
            None => Ok(None),
        }
    }

    /// Whether the document's content (at least its header) has arrived.
    pub(crate) fn has_content(&mut self, doc: DocId) -> bool {
        self.engine.heads(doc).is_ok_and(|h| !h.is_empty())
    }

    /// Answers with every readable entity, sorted by id. The core reads again only the
    /// entities whose heads moved since their view was cached (a write or a remote
    /// change refreshes it as it lands), and a read job sorts and copies the views.
    pub(crate) fn list_entities(&mut self, reply: Reply<Vec<Entity>>) {
        let docs: Vec<DocId> = self.entities.of_doc.keys().copied().collect();
        let mut views = Vec::with_capacity(docs.len());
        for doc in docs {
            // Listed in the registry but not synced here yet: not readable on this device.
            let heads = match self.engine.heads(doc) {
                Ok(h) if !h.is_empty() => h,
                _ => continue,
            };
            match self.entities.views.get(&doc) {
                Some((seen, view)) if *seen == heads => views.push(view.clone()),
                _ => match self.entity_view(doc) {
                    Ok(view) => {
                        let view = Arc::new(view);
                        self.entities.views.insert(doc, (heads, view.clone()));
                        views.push(view);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                },
            }
        }
        self.spawn_read(reply, move || {
            views.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(views.iter().map(|v| Entity::clone(v)).collect())
        });
    }

    /// The PeerId of the device that writes as `actor`: this device, a member of the home,
    /// or a device of a paired home. An actor no known device maps to is shown in hex.
    pub(crate) fn device_of_actor(&mut self, actor: &automerge::ActorId) -> String {
        if actor == self.engine.actor() {
            return self.peer_id.clone();
        }
        if let Some(name) = self.entities.actor_names.get(actor) {
            return name.clone();
        }
        // A miss means a device this core has not mapped yet: rebuild from the home
        // document, which lists every member and paired device.
        // Devices and paired homes only: the whole home view holds one keyring entry per
        // document.
        let devices = self.engine.home_devices(self.home.home_doc);
        let paired = self.engine.home_paired(self.home.home_doc);
        let known = self.entities.actor_names.len();
        if let (Ok(devices), Ok(paired)) = (devices, paired) {
            let peers = devices
                .keys()
                .chain(paired.values().flat_map(|h| h.devices.keys()));
            for peer in peers {
                if let Ok(id) = peer.parse::<hearth_net::PeerId>() {
                    let actor = hearth_crdt::ids::actor_for_peer(&id.to_bytes());
                    self.entities.actor_names.insert(actor, peer.clone());
                }
            }
        }
        if self.entities.actor_names.len() != known {
            // Cached views may name a writer that now has a name.
            self.entities.views.clear();
        }
        self.entities
            .actor_names
            .get(actor)
            .cloned()
            .unwrap_or_else(|| actor.to_hex_string())
    }

    pub(crate) fn entity_view(&mut self, doc: DocId) -> Result<Entity, Error> {
        // As the entity's policy shows it: the same on every replica.
        let e = match self.engine.resolved_entity(doc) {
            Ok(resolved) => resolved.entity,
            Err(_) => self.engine.entity(doc).map_err(doc_err)?,
        };
        let heads = self.engine.heads(doc).map_err(doc_err)?;
        let updated_by = self.device_of_actor(&e.updated_by);
        Ok(Entity {
            id: e.id.into(),
            state: e.state,
            attributes: e.attributes,
            updated_at: rfc3339_ms(e.updated_at.wall_ms),
            updated_by: updated_by.into(),
            owner: e.owner.into(),
            version: hex::encode(hearth_crdt::digest::heads_hash(&heads)),
        })
    }

    pub(crate) fn emit(
        &self,
        entity: Entity,
        from_peer: Option<String>,
        correlation_id: Option<String>,
    ) {
        self.emit_change(entity, from_peer, correlation_id, false);
    }

    pub(crate) fn emit_change(
        &self,
        entity: Entity,
        from_peer: Option<String>,
        correlation_id: Option<String>,
        deleted: bool,
    ) {
        let change = EntityChange {
            entity,
            from_peer: from_peer.map(Into::into),
            correlation_id,
            deleted,
        };
        self.emit_event(crate::events::Event::Entity(Box::new(change)));
    }
}

/// The entities service's state: the index of entity documents, cached views, the write window.
pub(crate) struct EntityState {
    /// Entity document -> entity id, from the registry.
    pub(crate) of_doc: HashMap<DocId, String>,
    /// The reverse: entity id -> document, so a write finds its document in O(1).
    pub(crate) by_id: HashMap<String, DocId>,
    /// PeerIds of known devices by their Automerge actor, so views name writers by device.
    pub(crate) actor_names: HashMap<automerge::ActorId, String>,
    /// Local writes waiting for their batch window's flush.
    pub(crate) writes: super::batching::WriteWindow,
    /// The entity view the last change event was built from, so a local write answers with
    /// it instead of reading the document a second time.
    pub(crate) last_view: Option<(DocId, Entity)>,
    /// Each entity's view as last read, with the heads it was read at, so listing every
    /// entity reads only the documents that changed since.
    pub(crate) views: HashMap<DocId, (Vec<automerge::ChangeHash>, Arc<Entity>)>,
    /// Generations of entity documents (generations.rs).
    pub(crate) generations: super::generations::Generations,
}

#[cfg(test)]
mod tests {
    use super::EntityRequest;
    use crate::core::testing::TestCore;
    use crate::entities::EntityWrite;
    use crate::events::Event;

    fn write(state: &str) -> EntityWrite {
        EntityWrite {
            state: state.into(),
            attributes: None,
            correlation_id: Some("c-1".into()),
        }
    }

    /// The index brought up to date entry by entry (as remote registry changes do) ends as
    /// a whole rebuild leaves it, and announces an entity that left it and one that joined
    /// it with its document already here (its content arrived before its registry entry).
    #[tokio::test]
    async fn an_index_updated_by_entry_matches_a_rebuild() {
        let t = TestCore::start("kitchen").await;
        for id in ["light.a", "light.b", "light.c"] {
            t.set_entity(id, "on").await;
        }
        t.core
            .call(|reply| EntityRequest::DeleteEntity {
                id: "light.b".into(),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        let mut events = t.events();
        t.on_core(|core| {
            Box::pin(async move {
                core.rebuild_entity_index().unwrap();
                let rebuilt = core.entities.by_id.clone();
                assert_eq!(rebuilt.len(), 2);
                // A stale index: light.a missing, light.b still there as before its delete.
                let gone = core.entities.by_id.remove("light.a").unwrap();
                core.entities.of_doc.remove(&gone);
                let b = core
                    .engine
                    .registry_entry(core.home.registry_doc, "light.b")
                    .unwrap()
                    .unwrap()
                    .doc;
                core.entities.by_id.insert("light.b".into(), b);
                core.entities.of_doc.insert(b, "light.b".into());
                // Only the entries a change wrote are read; light.c stays as it was.
                let ids = ["light.a", "light.b"].map(String::from).into();
                let entries = core.registry_entries(&ids).unwrap();
                core.update_entity_index(entries);
                assert_eq!(core.entities.by_id, rebuilt);
                let of_doc: std::collections::HashMap<_, _> =
                    rebuilt.iter().map(|(id, doc)| (*doc, id.clone())).collect();
                assert_eq!(core.entities.of_doc, of_doc);
            })
        })
        .await;
        let mut announced = Vec::new();
        for _ in 0..2 {
            let next = tokio::time::timeout(std::time::Duration::from_secs(10), events.recv());
            match next.await.expect("two entities announced").unwrap() {
                Event::Entity(change) => announced.push((
                    change.entity.id.to_string(),
                    change.entity.state.clone(),
                    change.deleted,
                )),
                other => panic!("unexpected {other:?}"),
            }
        }
        announced.sort();
        assert_eq!(
            announced,
            [
                ("light.a".to_string(), "on".to_string(), false),
                ("light.b".to_string(), "on".to_string(), true),
            ]
        );
        assert!(events.try_recv().is_err(), "nothing else is announced");
        t.stop().await;
    }

    /// Entity requests on a core with no sockets: create, update, read, list, delete,
    /// and the events they announce.
    #[tokio::test]
    async fn entity_requests_write_read_and_announce() {
        let t = TestCore::start("kitchen").await;
        let mut events = t.events();
        let set = |id: &str, state: &str| {
            let (id, w) = (id.to_string(), write(state));
            t.core.call(move |reply| EntityRequest::SetEntity {
                id,
                write: w,
                reply,
            })
        };
        let created = set("light.a", "on").await.unwrap().unwrap();
        assert_eq!(created.owner.as_str(), t.facts.home_id);
        assert_eq!(created.updated_by.as_str(), t.peer_id);
        match events.recv().await.unwrap() {
            Event::Entity(change) => {
                assert_eq!(change.entity.id.as_str(), "light.a");
                assert_eq!(change.correlation_id.as_deref(), Some("c-1"));
                assert!(change.from_peer.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        let updated = set("light.a", "off").await.unwrap().unwrap();
        assert_ne!(updated.version, created.version);
        // Answered after its chunks were stored.
        let stored = t
            .store
            .scan(
                hearth_storage::Keyspace::DocChunks,
                hearth_storage::Scan::all().limit(1000),
            )
            .await
            .unwrap();
        assert!(stored.len() >= 2, "the entity's and the registry's chunks");
        set("light.b", "on").await.unwrap().unwrap();

        let got = t
            .core
            .call(|reply| EntityRequest::GetEntity {
                id: "light.a".into(),
                reply,
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.state, "off");
        let listed = t
            .core
            .call(|reply| EntityRequest::ListEntities { reply })
            .await
            .unwrap()
            .unwrap();
        let ids: Vec<&str> = listed.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["light.a", "light.b"]);

        t.core
            .call(|reply| EntityRequest::DeleteEntity {
                id: "light.a".into(),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        let gone = t
            .core
            .call(|reply| EntityRequest::GetEntity {
                id: "light.a".into(),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        assert!(gone.is_none());
        let unknown = t
            .core
            .call(|reply| EntityRequest::SetPolicy {
                id: "light.b".into(),
                policy: "coin-toss".into(),
                reply,
            })
            .await
            .unwrap();
        assert!(unknown.is_err(), "an unknown policy is refused");
        t.stop().await;
    }
}
