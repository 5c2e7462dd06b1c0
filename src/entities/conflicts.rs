//! Conflict policies at the node: the engine's policy view behind every entity read, the
//! actor-to-home mapping the side policies need, and listing and settling conflicts.

use hearth_crdt::policy::{ConflictAction, ConflictRecord};
use hearth_crdt::{DocId, Field, Policy};

use crate::Error;
use crate::core::{Core, doc_err, now_ms};
use crate::entities::{ConflictCandidate, ConflictInfo, Entity};

impl Core {
    /// Feeds the engine the home of every known device: this home's members and every
    /// paired home's devices, so owner-wins and sharer-wins decide the same on every
    /// replica. Reads only the device lists, never the keyring.
    pub(crate) fn refresh_actor_homes(&mut self) {
        let mut pairs = Vec::new();
        if let Ok(devices) = self.engine.home_devices(self.home.home_doc) {
            for peer in devices.keys() {
                pairs.push((peer.clone(), self.home.home_id.clone()));
            }
        }
        // A PeerId belongs to one home: this home's own devices first, then the first
        // paired home (in HomeId order, the same on every replica) that lists it. A paired
        // home's list naming another home's device changes nothing.
        let mut claimed: std::collections::HashSet<String> =
            pairs.iter().map(|(p, _)| p.clone()).collect();
        if let Ok(paired) = self.engine.home_paired(self.home.home_doc) {
            for (home, record) in paired {
                for peer in record.devices.keys() {
                    if claimed.insert(peer.clone()) {
                        pairs.push((peer.clone(), home.clone()));
                    }
                }
            }
        }
        let table = self.engine.actor_homes_mut();
        let before = table.clone();
        for (peer, home) in pairs {
            if let Ok(id) = peer.parse::<hearth_net::PeerId>() {
                table.insert(hearth_crdt::ids::actor_for_peer(&id.to_bytes()), home);
            }
        }
        if *table != before {
            // Side policies resolve by home: cached entity views may read differently.
            self.entities.views.clear();
        }
    }

    /// Audits a conflict the engine detected or someone resolved, and tells subscribers.
    pub(crate) fn on_conflict_record(&mut self, record: ConflictRecord) {
        let resolved = record.action == ConflictAction::Resolved;
        let chosen = record
            .chosen
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_else(|| "pending".into());
        let subject = format!(
            "{} {}: {} candidates, {} ({})",
            record.entity,
            record.field,
            record.candidates.len(),
            chosen,
            record.policy
        );
        let actor = record
            .by
            .as_ref()
            .map(|a| self.device_of_actor(a))
            .unwrap_or_default();
        let store = self.store.clone();
        let action = if resolved {
            "conflict.resolved"
        } else {
            "conflict.detected"
        };
        tokio::spawn(
            async move { crate::audit::record_by(&store, &actor, action, &subject).await },
        );
        self.emit_event(crate::events::Event::Conflict {
            entity_id: record.entity.clone().into(),
            field: record.field.to_string(),
            policy: crate::Policy::from_engine(record.policy),
            candidates: record.candidates.len(),
            chosen: record.chosen.clone(),
            resolved,
        });
    }

    pub(crate) fn set_policy(
        &mut self,
        id: &str,
        policy: &str,
    ) -> Result<(Entity, hearth_storage::Batch), Error> {
        let policy = Policy::parse(policy).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown policy {policy:?}; use latest-wins, merge, owner-wins, sharer-wins or user-choice"
            ))
        })?;
        let doc = self.readable_entity_doc(id)?;
        self.check_write_rights(doc, id)?;
        let out = self
            .engine
            .set_entity_policy(doc, policy, now_ms(), None)
            .map_err(doc_err)?;
        let batch = self.handle_outputs(out);
        Ok((self.entity_view(doc)?, batch))
    }

    pub(crate) fn list_conflicts(&mut self) -> Result<Vec<ConflictInfo>, Error> {
        let mut ids: Vec<(String, DocId)> = self
            .entities
            .of_doc
            .iter()
            .map(|(d, id)| (id.clone(), *d))
            .collect();
        ids.sort();
        let mut out = Vec::new();
        for (id, doc) in ids {
            if !self.has_content(doc) {
                continue;
            }
            let Ok(resolved) = self.engine.resolved_entity(doc) else {
                continue;
            };
            for conflict in resolved.pending() {
                let candidates = conflict
                    .candidates
                    .iter()
                    .map(|c| ConflictCandidate {
                        value: c.value.clone(),
                        device: self.device_of_actor(&c.actor).into(),
                        home: c.home.clone().map(Into::into),
                        time: crate::core::rfc3339_ms(c.at.wall_ms),
                    })
                    .collect();
                out.push(ConflictInfo {
                    entity_id: id.clone().into(),
                    field: conflict.field.to_string(),
                    policy: crate::Policy::from_engine(resolved.policy),
                    candidates,
                });
            }
        }
        Ok(out)
    }

    pub(crate) fn resolve(
        &mut self,
        id: &str,
        field: &str,
        choice: usize,
    ) -> Result<(Entity, hearth_storage::Batch), Error> {
        let field = Field::parse(field).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown field {field:?}; use state or attributes.<name>"
            ))
        })?;
        let doc = self.readable_entity_doc(id)?;
        self.check_write_rights(doc, id)?;
        let (_, out) = self
            .engine
            .resolve_conflict(doc, &field, choice, now_ms(), None)
            .map_err(|e| match e {
                hearth_crdt::Error::Conflict { field, reason } => {
                    Error::Invalid(format!("cannot resolve {id} {field}: {reason}"))
                }
                other => doc_err(other),
            })?;
        let batch = self.handle_outputs(out);
        Ok((self.entity_view(doc)?, batch))
    }

    pub(crate) fn readable_entity_doc(&mut self, id: &str) -> Result<DocId, Error> {
        match self.doc_of_entity(id) {
            Some(doc) if self.has_content(doc) => Ok(doc),
            _ => Err(Error::NotFound(format!("no entity {id}"))),
        }
    }
}
