//! Entity deletion, history and restore.
//!
//! A delete tombstones the entity in the home's registry document (`deleted_at`), which
//! syncs to every device like any registry change; each device drops the entity from its
//! index when the registry arrives and announces `entity.deleted`. The entity's own
//! document stays, so its history survives and a later `set` of the same id starts a new
//! document (the registry entry then points at it and the tombstone is cleared).

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
        let mut batch = self.handle_outputs(out);
        super::append(&mut batch, self.drop_sync_states_of_doc(doc));
        self.emit_change(entity.clone(), None, None, true);
        Ok((entity, batch))
    }

    pub(super) fn entity_history(
        &mut self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<EntityVersion>, Error> {
        let doc = self.existing_entity(id)?;
        let versions = self.engine.entity_history(doc, limit).map_err(doc_err)?;
        let home_id = self.home.home_id.clone();
        let mut out = Vec::with_capacity(versions.len());
        for v in versions {
            out.push(EntityVersion {
                device: self.device_of_actor(&v.actor),
                version: v.id,
                time: rfc3339_ms(v.at.wall_ms),
                home: v.home.or_else(|| Some(home_id.clone())),
            });
        }
        Ok(out)
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
}
