//! What a home that was granted an entity may change in it.
//!
//! A paired home with write rights writes an entity's value: its state, attributes and
//! the fields every write stamps. It never writes the entity's identity (`id`, `owner`),
//! its conflict policy, or the document header (kind, owner home, key epoch): moving the
//! epoch or the owner is for the owner home's own devices only. The owner checks every
//! change such a home sends before the engine applies it, and refuses the whole frame if
//! one operation writes anywhere else.

use automerge::sync::Message;
use automerge::{AutoCommit, Change, ReadDoc};

use crate::chunks::Scanner;
use crate::engine::{Engine, EngineConfig, frame_limits};
use crate::error::{Error, Result};
use crate::schema::entity::ENTITY_KEY;
use crate::schema::touched::{MAX_OBJECT_DEPTH, Path, check_nesting, written_paths};
use crate::wire::Frame;

/// Fields under `entity` that a granted home's write may touch (attributes with
/// everything beneath them).
const GRANTEE_FIELDS: [&str; 5] = [
    "state",
    "attributes",
    "updated_at",
    "updated_by",
    "correlation_id",
];

/// Whether a granted home may write at `path`.
pub fn grantee_may_write(path: &Path) -> bool {
    match path.as_slice() {
        [Some(root), Some(field), ..] => {
            root == ENTITY_KEY && GRANTEE_FIELDS.contains(&field.as_str())
        }
        _ => false,
    }
}

impl<P: Clone + Ord + std::fmt::Debug> Engine<P> {
    /// Checks the changes a push or sync frame from a granted home carries: each must
    /// write only an entity's value fields ([`grantee_may_write`]). A sync message may
    /// carry a whole document instead of changes (Automerge sends one when more than a
    /// third of the document is to go, as after the owner missed a stretch of the granted
    /// home's writes); the changes of it the owner lacks are checked the same way. A push
    /// carrying a whole document is refused. A frame without changes passes.
    pub fn check_grantee_changes(&self, frame: &Frame) -> Result<()> {
        let (doc, mut changes, documents) = frame_changes(frame, self.config())?;
        let current = self.doc(doc)?;
        if !documents.is_empty() {
            for chunk in &documents {
                changes.extend(missing_changes(doc, current, chunk)?);
            }
            // A document's run-length columns can declare far more operations than its
            // bytes suggest: what it would add is held to the cap a frame of changes has.
            let ops: usize = changes.iter().map(Change::len).sum();
            if ops > self.config().max_ops_per_frame {
                return Err(Error::Changes {
                    doc,
                    reason: format!(
                        "a granted home's document adds {ops} operations, over the cap of {}",
                        self.config().max_ops_per_frame
                    ),
                });
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        // Before the paths, whose cost grows with the square of the nesting.
        check_nesting(current, &changes, MAX_OBJECT_DEPTH)
            .map_err(|reason| Error::Changes { doc, reason })?;
        let paths = written_paths(current, &changes).ok_or_else(|| Error::Changes {
            doc,
            reason: "writes to an object this document cannot place".into(),
        })?;
        match paths.iter().find(|p| !grantee_may_write(p)) {
            None => Ok(()),
            Some(path) => Err(Error::Changes {
                doc,
                reason: format!(
                    "writes {}, which only the owner home may change",
                    show(path)
                ),
            }),
        }
    }
}

/// The changes and whole documents of a push or sync frame, walked under the engine's
/// caps (a document's inflated size counts against them): compressed chunks are refused
/// on their header, and so is a whole document in a push.
#[allow(clippy::type_complexity)]
fn frame_changes(
    frame: &Frame,
    config: &EngineConfig,
) -> Result<(crate::DocId, Vec<Change>, Vec<Vec<u8>>)> {
    let (doc, entries, cap) = match frame {
        Frame::Push(p) => (p.doc, vec![p.bytes.clone()], config.max_push_bytes),
        Frame::Sync(s) => {
            let msg = std::panic::catch_unwind(|| Message::decode(&s.bytes))
                .map_err(|_| panicked(s.doc))?
                .map_err(|e| Error::Sync {
                    doc: s.doc,
                    reason: format!("undecodable message: {e}"),
                })?;
            (
                s.doc,
                msg.changes.iter().map(<[u8]>::to_vec).collect(),
                config.max_sync_message_bytes,
            )
        }
        Frame::Digest(_) | Frame::Grant(_) => {
            return Err(Error::Wire(
                "only pushes and sync messages carry changes".into(),
            ));
        }
    };
    let len: usize = entries.iter().map(Vec::len).sum();
    if len > cap {
        return Err(Error::TooLarge {
            what: "changes of a granted home",
            len,
            cap,
        });
    }
    let documents = matches!(frame, Frame::Sync(_));
    let mut scanner = Scanner::new(frame_limits(config, documents));
    for entry in &entries {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scanner.scan(entry)))
            .map_err(|_| panicked(doc))?
            .map_err(|refusal| Error::Changes {
                doc,
                reason: refusal.to_string(),
            })?;
    }
    let documents = scanner.documents.iter().map(|d| d.to_vec()).collect();
    Ok((doc, scanner.changes, documents))
}

/// The changes of whole document `chunk` that `current` does not hold, oldest first.
fn missing_changes(doc: crate::DocId, current: &AutoCommit, chunk: &[u8]) -> Result<Vec<Change>> {
    let mut whole = std::panic::catch_unwind(|| AutoCommit::load(chunk))
        .map_err(|_| panicked(doc))?
        .map_err(|e| Error::Sync {
            doc,
            reason: format!("undecodable document chunk: {e}"),
        })?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        whole
            .get_changes(&[])
            .into_iter()
            .filter(|c| ReadDoc::get_change_by_hash(current, &c.hash()).is_none())
            .collect()
    }))
    .map_err(|_| panicked(doc))
}

fn panicked(doc: crate::DocId) -> Error {
    Error::Panicked {
        doc,
        during: "reading a granted home's changes",
    }
}

fn show(path: &Path) -> String {
    let parts: Vec<&str> = path.iter().map(|p| p.as_deref().unwrap_or("[]")).collect();
    parts.join(".")
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{ActorId, AutoCommit, ObjType, ROOT, ReadDoc};

    use super::*;
    use crate::schema::entity::EntityUpdate;
    use crate::wire::Push;
    use crate::{DocId, KeyEpoch};

    const DOC: DocId = DocId::from_bytes([9; 16]);

    fn owner() -> Engine<u8> {
        owner_with(EngineConfig::default())
    }

    fn owner_with(config: EngineConfig) -> Engine<u8> {
        let mut engine = Engine::new(b"owner", config);
        let first = EntityUpdate {
            state: "off".into(),
            attributes: None,
        };
        engine
            .create_entity(
                DOC,
                "home-1",
                KeyEpoch::first([0; 16]),
                "light.x",
                &first,
                1_000,
            )
            .unwrap();
        engine
    }

    /// A push of what `edit` does to a granted home's copy of the owner's document.
    fn grantee_push(engine: &Engine<u8>, edit: impl FnOnce(&mut AutoCommit)) -> Frame {
        let mut copy = engine.doc(DOC).unwrap().clone();
        copy.set_actor(ActorId::from(&[7u8; 16][..]));
        let before = copy.get_heads();
        edit(&mut copy);
        copy.commit();
        let bytes = copy
            .get_changes(&before)
            .iter()
            .flat_map(|c| c.raw_bytes().to_vec())
            .collect();
        Frame::Push(Push {
            doc: DOC,
            epoch: KeyEpoch::first([0; 16]),
            correlation_id: None,
            bytes,
        })
    }

    type Edit = Box<dyn FnOnce(&mut AutoCommit)>;

    fn entity_map(doc: &AutoCommit) -> automerge::ObjId {
        doc.get(ROOT, ENTITY_KEY).unwrap().unwrap().1
    }

    #[test]
    fn value_writes_pass_and_nested_attributes_are_placed() {
        let engine = owner();
        let frame = grantee_push(&engine, |d| {
            let e = entity_map(d);
            d.put(&e, "state", "on").unwrap();
            let a = d.get(&e, "attributes").unwrap().unwrap().1;
            let nested = d.put_object(&a, "colour", ObjType::Map).unwrap();
            d.put(&nested, "r", 255).unwrap();
            let list = d.put_object(&nested, "steps", ObjType::List).unwrap();
            d.insert(&list, 0, 1).unwrap();
        });
        engine.check_grantee_changes(&frame).unwrap();
    }

    #[test]
    fn header_policy_and_identity_writes_are_refused() {
        let engine = owner();
        let edits: Vec<(&str, Edit)> = vec![
            (
                "header.epoch.counter",
                Box::new(|d| {
                    let h = d.get(ROOT, "header").unwrap().unwrap().1;
                    let e = d.get(&h, "epoch").unwrap().unwrap().1;
                    d.put(&e, "counter", u64::MAX).unwrap();
                }),
            ),
            (
                "header",
                Box::new(|d| {
                    let h = d.put_object(ROOT, "header", ObjType::Map).unwrap();
                    d.put(&h, "owner", "home-evil").unwrap();
                }),
            ),
            (
                "entity.policy",
                Box::new(|d| {
                    let e = entity_map(d);
                    d.put(&e, "policy", "sharer-wins").unwrap();
                }),
            ),
            (
                "entity.owner",
                Box::new(|d| {
                    let e = entity_map(d);
                    d.put(&e, "owner", "home-evil").unwrap();
                }),
            ),
            (
                "entity",
                Box::new(|d| {
                    d.put_object(ROOT, ENTITY_KEY, ObjType::Map).unwrap();
                }),
            ),
        ];
        for (what, edit) in edits {
            let frame = grantee_push(&engine, edit);
            let err = engine.check_grantee_changes(&frame).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn a_value_write_riding_with_a_header_write_is_refused_whole() {
        let engine = owner();
        let frame = grantee_push(&engine, |d| {
            let e = entity_map(d);
            d.put(&e, "state", "on").unwrap();
            let h = d.get(ROOT, "header").unwrap().unwrap().1;
            d.put(&h, "kind", "home").unwrap();
        });
        assert!(engine.check_grantee_changes(&frame).is_err());
    }

    /// A sync message carrying the granted home's whole copy of the document, as
    /// Automerge sends once more than a third of it is to go.
    fn grantee_whole(engine: &Engine<u8>, edit: impl FnOnce(&mut AutoCommit)) -> Frame {
        let mut copy = engine.doc(DOC).unwrap().clone();
        copy.set_actor(ActorId::from(&[7u8; 16][..]));
        edit(&mut copy);
        copy.commit();
        let bytes = Message {
            heads: copy.get_heads(),
            need: Vec::new(),
            have: Vec::new(),
            changes: automerge::sync::ChunkList::from(vec![copy.save()]),
            flags: None,
            version: automerge::sync::MessageVersion::V2,
        }
        .encode();
        Frame::Sync(crate::wire::SyncMessage {
            doc: DOC,
            epoch: KeyEpoch::first([0; 16]),
            expects_reply: true,
            bytes,
        })
    }

    /// The operations a whole document adds are held to the frame's operation cap, however
    /// few bytes its run-length columns take.
    #[test]
    fn a_whole_document_adding_more_operations_than_a_frame_may_is_refused() {
        let engine = owner_with(EngineConfig {
            max_ops_per_frame: 200,
            ..EngineConfig::default()
        });
        let cap = engine.config().max_ops_per_frame;
        let frame = grantee_whole(&engine, |d| {
            let e = entity_map(d);
            let (_, attrs) = d.get(&e, "attributes").unwrap().unwrap();
            let list = d.put_object(&attrs, "x", automerge::ObjType::List).unwrap();
            for i in 0..=cap {
                d.insert(&list, i, automerge::ScalarValue::Null).unwrap();
            }
        });
        let err = engine.check_grantee_changes(&frame).unwrap_err();
        assert!(err.to_string().contains("document adds"), "{err}");
    }

    #[test]
    fn a_whole_document_in_a_sync_message_is_checked_by_the_changes_the_owner_lacks() {
        let engine = owner();
        // Many value writes (more than a third of the document): they pass, and the
        // owner's own changes inside the document are not held against the sender.
        let frame = grantee_whole(&engine, |d| {
            let e = entity_map(d);
            for i in 0..10 {
                d.put(&e, "state", format!("{i}")).unwrap();
                d.commit();
            }
        });
        engine.check_grantee_changes(&frame).unwrap();
        // One of them writing the policy refuses the whole message.
        let frame = grantee_whole(&engine, |d| {
            let e = entity_map(d);
            d.put(&e, "state", "on").unwrap();
            d.commit();
            d.put(&e, "policy", "owner-wins").unwrap();
        });
        assert!(engine.check_grantee_changes(&frame).is_err());
        // In a push, a whole document is still refused.
        let mut copy = engine.doc(DOC).unwrap().clone();
        let push = Frame::Push(Push {
            doc: DOC,
            epoch: KeyEpoch::first([0; 16]),
            correlation_id: None,
            bytes: copy.save(),
        });
        assert!(engine.check_grantee_changes(&push).is_err());
    }
}
