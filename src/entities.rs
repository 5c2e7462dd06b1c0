//! The library's view of entities: what integrations read and write.

pub(crate) mod batching;
mod conflicts;
pub(crate) mod generations;
pub(crate) mod ops;
pub(crate) mod service;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::core::CoreHandle;
use crate::{DeviceId, EntityId, Error, HomeId, Policy, Timestamp};

/// An entity as the node presents it (the API's entity body).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entity {
    /// The entity id chosen by its owner, e.g. `light.porch`.
    pub id: EntityId,
    /// The state string, as in Home Assistant.
    pub state: String,
    /// Attributes: any JSON values by name.
    pub attributes: Map<String, Value>,
    /// When it was last written (from the writer's hybrid logical clock).
    pub updated_at: Timestamp,
    /// The device that last wrote it: a PeerId when known, else its actor id in hex.
    pub updated_by: DeviceId,
    /// The owner home.
    pub owner: HomeId,
    /// The document version (hex of the heads hash); names a version in history.
    pub version: String,
}

/// A field with concurrent values waiting for someone to choose (user-choice policy).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConflictInfo {
    /// The entity id.
    pub entity_id: EntityId,
    /// `state` or `attributes.<name>`.
    pub field: String,
    /// The entity's policy.
    pub policy: Policy,
    /// The values, newest first; a resolution names one by its index here.
    pub candidates: Vec<ConflictCandidate>,
}

/// One concurrent value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConflictCandidate {
    /// The value.
    pub value: Value,
    /// The device that wrote it.
    pub device: DeviceId,
    /// That device's home, when known.
    pub home: Option<HomeId>,
    /// When it was written.
    pub time: Timestamp,
}

/// A write to an entity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EntityWrite {
    /// New state.
    pub state: String,
    /// New attributes; `None` keeps the current ones.
    pub attributes: Option<Map<String, Value>>,
    /// Carried to the change events on every node that sees the write.
    pub correlation_id: Option<String>,
}

/// A change to an entity, local or from a peer.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityChange {
    /// The entity after the change.
    pub entity: Entity,
    /// The PeerId that sent the change, or `None` for a write on this node.
    pub from_peer: Option<DeviceId>,
    /// The writer's correlation id, when it gave one.
    pub correlation_id: Option<String>,
    /// True when the entity was deleted; `entity` is then its last state.
    pub deleted: bool,
}

/// What an entity's document takes on this device ([`Entities::storage`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntityStorage {
    /// The current generation's number: 0 until the document is first cut.
    pub generation: u64,
    /// Generations held here (the current one and older ones not yet deleted).
    pub generations_held: usize,
    /// Changes (versions) in the held generations.
    pub changes: usize,
    /// Stored bytes of the held generations' documents.
    pub bytes: usize,
}

/// One version of an entity, as history lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntityVersion {
    /// Version id: hex of the heads hash; a prefix of 8 or more digits names it too.
    pub version: String,
    /// When it was written.
    pub time: Timestamp,
    /// The device that wrote it: a PeerId when it is a device of this home, else its
    /// actor id in hex.
    pub device: DeviceId,
    /// The writing device's home, when known.
    pub home: Option<HomeId>,
}

/// Most versions one history read returns (the newest ones).
pub const MAX_HISTORY: usize = 1000;

/// Longest entity id accepted.
pub const MAX_ENTITY_ID_LEN: usize = 255;
/// Longest state string accepted.
pub const MAX_STATE_LEN: usize = 255;
/// Most bytes of attributes (as JSON) one write may carry: 1 MiB. One write is one
/// Automerge change, and a change is the one thing a sync message cannot split, so this
/// keeps every change well under the largest sync message a frame carries (about
/// 4 MiB). The API's body cap (256 KiB) is lower still.
pub const MAX_ATTRIBUTES_BYTES: usize = 1024 * 1024;

/// Checks an entity id: `domain.object`, lowercase ASCII letters, digits and `_`, as
/// Home Assistant uses, so ids stay portable across the MQTT bridge and URLs.
pub(crate) fn validate_entity_id(id: &str) -> Result<(), Error> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let valid = id.len() <= MAX_ENTITY_ID_LEN
        && id.split_once('.').is_some_and(|(domain, object)| {
            !domain.is_empty()
                && !object.is_empty()
                && domain.chars().all(ok_char)
                && object.chars().all(ok_char)
        });
    if valid {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid entity id {:?}: use `domain.object` with lowercase letters, digits and `_` \
             (e.g. `light.living_room`), at most {MAX_ENTITY_ID_LEN} characters",
            truncate(id)
        )))
    }
}

/// Checks one write before it reaches the core.
fn validate_write(id: &str, write: &EntityWrite) -> Result<(), Error> {
    validate_entity_id(id)?;
    if write.state.len() > MAX_STATE_LEN {
        return Err(Error::Invalid(format!(
            "state is {} bytes; at most {MAX_STATE_LEN} are allowed",
            write.state.len()
        )));
    }
    if let Some(attributes) = &write.attributes {
        let len = serde_json::to_vec(attributes).map_or(usize::MAX, |b| b.len());
        if len > MAX_ATTRIBUTES_BYTES {
            return Err(Error::Invalid(format!(
                "attributes are {len} bytes as JSON; at most {MAX_ATTRIBUTES_BYTES} are allowed"
            )));
        }
    }
    if let Some(c) = &write.correlation_id
        && c.len() > crate::bus::MAX_CORRELATION_ID_LEN
    {
        return Err(Error::Invalid(format!(
            "correlation id is {} bytes; at most {} are allowed",
            c.len(),
            crate::bus::MAX_CORRELATION_ID_LEN
        )));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Handle to the node's entities. Cheap to clone.
#[derive(Clone)]
pub struct Entities {
    pub(crate) core: CoreHandle,
}

impl Entities {
    /// Creates or updates an entity and returns it. Resolves once the change is flushed
    /// to disk; peers receive it without waiting for that flush.
    ///
    /// Not cancel-safe: once queued, the write happens even if the future is dropped.
    pub async fn set(&self, id: impl Into<EntityId>, write: EntityWrite) -> Result<Entity, Error> {
        let id = id.into();
        validate_write(&id, &write)?;
        self.core
            .call(|reply| crate::entities::service::EntityRequest::SetEntity {
                id: id.into_string(),
                write,
                reply,
            })
            .await?
    }

    /// Creates or updates many entities in order, as one step of the node: they are
    /// committed and pushed together (updates of one entity travel to each peer as one
    /// frame) and acknowledged together after one flush. Returns each entity after its
    /// write, in order. At most [`MAX_BATCH_WRITES`](crate::MAX_BATCH_WRITES) writes.
    ///
    /// Every write is checked before any is applied. Should one still fail in the core,
    /// the writes before it stay applied and the error names it.
    ///
    /// Not cancel-safe: once queued, the writes happen even if the future is dropped.
    pub async fn set_many(
        &self,
        writes: Vec<(EntityId, EntityWrite)>,
    ) -> Result<Vec<Entity>, Error> {
        if writes.len() > crate::MAX_BATCH_WRITES {
            return Err(Error::Invalid(format!(
                "{} writes in one batch; at most {} are allowed",
                writes.len(),
                crate::MAX_BATCH_WRITES
            )));
        }
        for (id, write) in &writes {
            validate_write(id, write)?;
        }
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let writes = writes
            .into_iter()
            .map(|(id, write)| (id.into_string(), write))
            .collect();
        self.core
            .call(|reply| crate::entities::service::EntityRequest::SetMany { writes, reply })
            .await?
    }

    /// Reads one entity; `Ok(None)` when no such entity exists.
    ///
    /// Cancel-safe.
    pub async fn get(&self, id: impl Into<EntityId>) -> Result<Option<Entity>, Error> {
        let id = id.into().into_string();
        self.core
            .call(|reply| crate::entities::service::EntityRequest::GetEntity { id, reply })
            .await?
    }

    /// Lists every entity, ordered by id.
    ///
    /// Cancel-safe.
    pub async fn list(&self) -> Result<Vec<Entity>, Error> {
        self.core
            .call(|reply| crate::entities::service::EntityRequest::ListEntities { reply })
            .await?
    }

    /// Deletes an entity and returns its last state. The registry keeps a tombstone, so
    /// the delete reaches every device of the home and a device that missed it cannot
    /// bring the entity back; the entity's document (and history) stays on disk.
    /// [`Error::NotFound`] when there is no such entity.
    ///
    /// Not cancel-safe.
    pub async fn delete(&self, id: impl Into<EntityId>) -> Result<Entity, Error> {
        let id = id.into().into_string();
        self.core
            .call(|reply| crate::entities::service::EntityRequest::DeleteEntity { id, reply })
            .await?
    }

    /// The newest `limit` versions of an entity (at most [`MAX_HISTORY`]), oldest first.
    ///
    /// Cancel-safe.
    pub async fn history(
        &self,
        id: impl Into<EntityId>,
        limit: usize,
    ) -> Result<Vec<EntityVersion>, Error> {
        let id = id.into().into_string();
        self.core
            .call(
                |reply| crate::entities::service::EntityRequest::EntityHistory {
                    id,
                    limit: limit.min(MAX_HISTORY),
                    reply,
                },
            )
            .await?
    }

    /// What the entity's document takes on this device: its generation, how many
    /// generations are held, their changes and stored bytes. History past a threshold
    /// is cut into a new generation ([`crate::HistoryConfig`]).
    ///
    /// Cancel-safe.
    pub async fn storage(&self, id: impl Into<EntityId>) -> Result<EntityStorage, Error> {
        let id = id.into().into_string();
        self.core
            .call(|reply| crate::entities::service::EntityRequest::Storage { id, reply })
            .await?
    }

    /// Writes the state and attributes the entity had at `version` (an id or a unique
    /// prefix of 8 or more hex digits) as a new change, and returns the entity.
    ///
    /// Not cancel-safe.
    pub async fn restore(&self, id: impl Into<EntityId>, version: &str) -> Result<Entity, Error> {
        let (id, version) = (id.into().into_string(), version.to_string());
        self.core
            .call(
                |reply| crate::entities::service::EntityRequest::RestoreEntity {
                    id,
                    version,
                    reply,
                },
            )
            .await?
    }

    /// Sets an entity's conflict policy ([`Policy::LatestWins`] is the default).
    /// Answered after the flush.
    pub async fn set_policy(
        &self,
        id: impl Into<EntityId>,
        policy: Policy,
    ) -> Result<Entity, Error> {
        let (id, policy) = (id.into().into_string(), policy.as_str().to_string());
        self.core
            .call(|reply| crate::entities::service::EntityRequest::SetPolicy { id, policy, reply })
            .await?
    }

    /// Conflicts waiting for a choice (entities under the user-choice policy).
    pub async fn conflicts(&self) -> Result<Vec<ConflictInfo>, Error> {
        self.core
            .call(|reply| crate::entities::service::EntityRequest::Conflicts { reply })
            .await?
    }

    /// Settles a conflict on `field` (`state` or `attributes.<name>`) with candidate
    /// number `choice` of [`Entities::conflicts`]; the choice is written as a new change.
    pub async fn resolve(
        &self,
        id: impl Into<EntityId>,
        field: &str,
        choice: usize,
    ) -> Result<Entity, Error> {
        let (id, field) = (id.into().into_string(), field.to_string());
        self.core
            .call(
                |reply| crate::entities::service::EntityRequest::ResolveConflict {
                    id,
                    field,
                    choice,
                    reply,
                },
            )
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_ids_follow_the_domain_object_form() {
        for ok in ["light.porch", "sensor.door_2", "a.b"] {
            validate_entity_id(ok).unwrap();
        }
        for bad in [
            "",
            "light",
            ".porch",
            "light.",
            "Light.porch",
            "light.po rch",
            "a.b/c",
        ] {
            assert!(validate_entity_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_entity_id(&format!("a.{}", "x".repeat(300))).is_err());
    }

    #[test]
    fn attributes_past_the_cap_are_refused() {
        let write = |len: usize| {
            let mut attributes = Map::new();
            // `{"a":"..."}` is eight bytes around the string.
            attributes.insert("a".into(), Value::String("x".repeat(len - 8)));
            EntityWrite {
                state: "on".into(),
                attributes: Some(attributes),
                correlation_id: None,
            }
        };
        validate_write("camera.big", &write(MAX_ATTRIBUTES_BYTES)).unwrap();
        assert!(matches!(
            validate_write("camera.big", &write(MAX_ATTRIBUTES_BYTES + 1)),
            Err(Error::Invalid(_))
        ));
    }
}
