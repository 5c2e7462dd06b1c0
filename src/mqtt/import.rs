//! HA -> Hearth: entities Home Assistant publishes under a prefix, in the layout of its
//! `mqtt_statestream` integration (`<prefix>/<domain>/<object>/state`, and one topic per
//! attribute with a JSON value), become entities of this home. A plain state machine: the
//! bridge feeds it messages and takes the writes it has gathered.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::{EntityId, EntityWrite};

/// The attribute that marks an entity as imported from MQTT; the bridge never exports such
/// an entity back, so Home Assistant does not see its own entities twice.
pub const IMPORT_MARKER: &str = "imported_from";
/// The marker's value.
const IMPORT_SOURCE: &str = "mqtt";

/// Most attributes kept per imported entity; more are refused.
pub const MAX_IMPORT_ATTRIBUTES: usize = 64;
/// Most bytes of one imported entity's attributes, as JSON.
pub const MAX_IMPORT_ATTRIBUTES_BYTES: usize = 64 * 1024;

/// Topics statestream writes that are not attributes worth a write each.
const SKIPPED: [&str; 2] = ["last_changed", "last_updated"];

#[derive(Default)]
struct Imported {
    state: Option<String>,
    attributes: Map<String, Value>,
}

/// The imported entities and the writes waiting to be made.
pub(crate) struct Importer {
    prefix: String,
    max_entities: usize,
    entities: BTreeMap<String, Imported>,
    dirty: BTreeSet<String>,
}

/// Whether an entity is one the bridge imported (it carries the marker).
pub(crate) fn is_imported(attributes: &Map<String, Value>) -> bool {
    attributes.get(IMPORT_MARKER).and_then(Value::as_str) == Some(IMPORT_SOURCE)
}

impl Importer {
    pub(crate) fn new(prefix: &str, max_entities: usize) -> Self {
        Self {
            prefix: prefix.to_string(),
            max_entities,
            entities: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// The subscription that catches every import topic.
    pub(crate) fn filter(&self) -> String {
        format!("{}/+/+/+", self.prefix)
    }

    /// How many entities have been imported.
    pub(crate) fn len(&self) -> usize {
        self.entities.len()
    }

    /// Takes one message. `native` says whether an entity id belongs to this home and was
    /// not imported (statestream echoing the bridge's own exports): such ids are left
    /// alone. Returns whether the message was under the prefix at all; `Err` says why a
    /// message under it was refused.
    pub(crate) fn on_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        native: impl Fn(&str) -> bool,
    ) -> Result<bool, String> {
        let Some(rest) = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Ok(false);
        };
        let mut parts = rest.split('/');
        let (Some(domain), Some(object), Some(field), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Ok(false);
        };
        if SKIPPED.contains(&field) {
            return Ok(true);
        }
        let id = format!("{domain}.{object}");
        crate::entities::validate_entity_id(&id).map_err(|e| e.to_string())?;
        if native(&id) {
            return Err(format!(
                "{id} is an entity of this home; not importing it over itself"
            ));
        }
        let text = std::str::from_utf8(payload).map_err(|_| "the payload is not UTF-8")?;
        if !self.entities.contains_key(&id) && self.entities.len() >= self.max_entities {
            return Err(format!(
                "{} entities are imported already, the most allowed; not importing {id}",
                self.max_entities
            ));
        }
        let entry = self.entities.entry(id.clone()).or_default();
        if field == "state" {
            if text.len() > crate::MAX_STATE_LEN {
                return Err(format!(
                    "state of {id} is {} bytes; at most {} are allowed",
                    text.len(),
                    crate::MAX_STATE_LEN
                ));
            }
            // statestream JSON-encodes nothing for the state: it is the text as it is.
            if entry.state.as_deref() != Some(text) {
                entry.state = Some(text.to_string());
                self.dirty.insert(id);
            }
            return Ok(true);
        }
        if field == IMPORT_MARKER {
            return Err(format!(
                "{id}: the attribute {IMPORT_MARKER} is the bridge's own"
            ));
        }
        // Attribute values are JSON; a value that is not is kept as text.
        let value = serde_json::from_str::<Value>(text).unwrap_or_else(|_| text.into());
        if entry.attributes.get(field) == Some(&value) {
            return Ok(true);
        }
        if !entry.attributes.contains_key(field) && entry.attributes.len() >= MAX_IMPORT_ATTRIBUTES
        {
            return Err(format!(
                "{id} has {MAX_IMPORT_ATTRIBUTES} attributes already, the most allowed"
            ));
        }
        let old = entry.attributes.insert(field.to_string(), value);
        let bytes = serde_json::to_vec(&entry.attributes).map_or(usize::MAX, |b| b.len());
        if bytes > MAX_IMPORT_ATTRIBUTES_BYTES {
            match old {
                Some(old) => entry.attributes.insert(field.to_string(), old),
                None => entry.attributes.remove(field),
            };
            return Err(format!(
                "attributes of {id} would be {bytes} bytes; at most \
                 {MAX_IMPORT_ATTRIBUTES_BYTES} are allowed"
            ));
        }
        self.dirty.insert(id);
        Ok(true)
    }

    /// The writes gathered since the last call, at most `limit`: each changed entity that
    /// has a state, with all its attributes and the import marker. Entities still waiting
    /// for a state, and those past the limit, stay pending (their later messages fold into
    /// the same write).
    pub(crate) fn take_writes(&mut self, limit: usize) -> Vec<(EntityId, EntityWrite)> {
        let mut writes = Vec::new();
        let dirty = std::mem::take(&mut self.dirty);
        for id in dirty {
            if writes.len() >= limit {
                self.dirty.insert(id);
                continue;
            }
            let Some(entry) = self.entities.get(&id) else {
                continue;
            };
            let Some(state) = &entry.state else {
                self.dirty.insert(id);
                continue;
            };
            let mut attributes = entry.attributes.clone();
            attributes.insert(IMPORT_MARKER.into(), IMPORT_SOURCE.into());
            writes.push((
                EntityId::from(id.as_str()),
                EntityWrite {
                    state: state.clone(),
                    attributes: Some(attributes),
                    correlation_id: Some("mqtt-import".into()),
                },
            ));
        }
        writes
    }

    /// Whether writes are waiting for [`Importer::take_writes`].
    pub(crate) fn has_writes(&self) -> bool {
        self.dirty
            .iter()
            .any(|id| self.entities.get(id).is_some_and(|e| e.state.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statestream_topics_become_one_write_per_entity_with_the_marker() {
        let mut imp = Importer::new("ha", 10);
        let native = |_: &str| false;
        assert_eq!(
            imp.on_message("ha/light/desk/brightness", b"128", native),
            Ok(true)
        );
        // No state yet: nothing to write.
        assert!(!imp.has_writes());
        assert!(imp.take_writes(10).is_empty());
        imp.on_message("ha/light/desk/state", b"on", native)
            .unwrap();
        imp.on_message("ha/light/desk/friendly_name", b"\"Desk\"", native)
            .unwrap();
        imp.on_message("ha/light/desk/last_changed", b"\"2026\"", native)
            .unwrap();
        assert!(imp.has_writes());
        let writes = imp.take_writes(10);
        assert_eq!(writes.len(), 1);
        let (id, write) = &writes[0];
        assert_eq!(id.as_str(), "light.desk");
        assert_eq!(write.state, "on");
        let attributes = write.attributes.as_ref().unwrap();
        assert_eq!(attributes["brightness"], 128);
        assert_eq!(attributes["friendly_name"], "Desk");
        assert!(attributes.get("last_changed").is_none());
        assert!(is_imported(attributes));
        // The same state again writes nothing.
        imp.on_message("ha/light/desk/state", b"on", native)
            .unwrap();
        assert!(imp.take_writes(10).is_empty());
        assert_eq!(
            imp.on_message("other/light/desk/state", b"on", native),
            Ok(false)
        );
    }

    #[test]
    fn the_caps_hold_and_this_homes_own_entities_are_not_imported_over() {
        let mut imp = Importer::new("ha", 2);
        let native = |id: &str| id == "light.porch";
        assert!(
            imp.on_message("ha/light/porch/state", b"on", native)
                .is_err()
        );
        imp.on_message("ha/switch/a/state", b"on", native).unwrap();
        imp.on_message("ha/switch/b/state", b"on", native).unwrap();
        let third = imp.on_message("ha/switch/c/state", b"on", native);
        assert!(third.unwrap_err().contains("most allowed"));
        assert_eq!(imp.len(), 2);
        assert!(
            imp.on_message("ha/switch/Bad/state", b"on", native)
                .is_err()
        );
        let long = vec![b'x'; crate::MAX_STATE_LEN + 1];
        assert!(imp.on_message("ha/switch/a/state", &long, native).is_err());
        for i in 0..MAX_IMPORT_ATTRIBUTES {
            imp.on_message(&format!("ha/switch/a/attr{i}"), b"1", native)
                .unwrap();
        }
        assert!(
            imp.on_message("ha/switch/a/one_more", b"1", native)
                .is_err()
        );
        let big = format!("\"{}\"", "y".repeat(MAX_IMPORT_ATTRIBUTES_BYTES));
        assert!(
            imp.on_message("ha/switch/b/big", big.as_bytes(), native)
                .is_err()
        );
        assert!(
            imp.on_message("ha/switch/b/imported_from", b"\"x\"", native)
                .is_err()
        );
    }
}
