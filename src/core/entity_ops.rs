//! Entity deletion, history and restore.
//!
//! A delete tombstones the entity in the home's registry document (`deleted_at`), which
//! syncs to every device like any registry change; each device drops the entity from its
//! index when the registry arrives and announces `entity.deleted`. The entity's own
//! document stays, so its history survives and a later `set` of the same id starts a new
//! document (the registry entry then points at it and the tombstone is cleared).

use std::collections::HashMap;

use hearth_crdt::schema::registry;
use hearth_crdt::{DocId, Error as CrdtError};
use hearth_storage::Batch;

use super::{Core, doc_err, now_ms, rfc3339_ms};
use crate::Error;
use crate::entities::{Entity, EntityVersion};

impl Core {
    fn existing_entity(&mut self, id: &str) -> Result<DocId, Error> {
        match self.doc_of_entity(id) {
            Some(doc) if self.has_content(doc) => Ok(doc),
            _ => Err(Error::NotFound(format!("no entity {id:?}"))),
        }
    }

    pub(super) fn delete_entity(&mut self, id: &str) -> Result<(Entity, Batch), Error> {
        let doc = self.existing_entity(id)?;
        let entity = self.entity_view(doc)?;
        let (_, out) = self
            .engine
            .transact(self.home.registry_doc, now_ms(), None, |d, at, _| {
                registry::tombstone(d, id, at)
            })
            .map_err(doc_err)?;
        self.entity_of_doc.remove(&doc);
        self.doc_of_entity_id.remove(id);
        let batch = self.handle_outputs(out);
        self.emit_change(entity.clone(), None, None, true);
        Ok((entity, batch))
    }

    pub(super) fn entity_history(
        &mut self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<EntityVersion>, Error> {
        let doc = self.existing_entity(id)?;
        let devices = self.devices_by_actor();
        let versions = self.engine.entity_history(doc, limit).map_err(doc_err)?;
        Ok(versions
            .into_iter()
            .map(|v| {
                let actor = v.actor.to_hex_string();
                EntityVersion {
                    version: v.id,
                    time: rfc3339_ms(v.at.wall_ms),
                    device: devices.get(&actor).cloned().unwrap_or(actor),
                    home: v.home.or_else(|| Some(self.home.home_id.clone())),
                }
            })
            .collect())
    }

    pub(super) fn restore_entity(
        &mut self,
        id: &str,
        version: &str,
    ) -> Result<(Entity, Batch), Error> {
        let doc = self.existing_entity(id)?;
        let (_, out) = self
            .engine
            .restore_entity(doc, version, now_ms(), None)
            .map_err(|e| match e {
                CrdtError::Version { reason, .. } if reason.starts_with("no such") => {
                    Error::NotFound(format!("entity {id:?} has no version {version:?}"))
                }
                CrdtError::Version { .. } => Error::Invalid(e.to_string()),
                other => doc_err(other),
            })?;
        let batch = self.handle_outputs(out);
        Ok((self.entity_view(doc)?, batch))
    }

    /// Actor id (hex) -> PeerId, for the devices of this home.
    fn devices_by_actor(&self) -> HashMap<String, String> {
        let Ok(home) = self.engine.home(self.home.home_doc) else {
            return HashMap::new();
        };
        home.devices
            .keys()
            .filter_map(|peer| {
                let id: hearth_net::PeerId = peer.parse().ok()?;
                let actor = hearth_crdt::actor_for_peer(&id.to_bytes());
                Some((actor.to_hex_string(), peer.clone()))
            })
            .collect()
    }
}
