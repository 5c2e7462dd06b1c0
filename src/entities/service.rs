//! The entities service: the core's handling of entity requests.

use hearth_crdt::DocId;

use crate::Error;
use crate::core::{Core, Reply};
use crate::entities::{Entity, EntityWrite};

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
    // Entity history and deletion (entity_ops.rs).
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
