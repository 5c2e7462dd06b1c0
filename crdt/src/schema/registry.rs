//! Typed view of a home's `registry` document: entity id -> DocId, who each
//! entity is shared with and how, and tombstones for deleted entities.
//!
//! Layout under the root key `registry`:
//! `entities.<entity id>` = map { `doc`: base58 DocId, `shares`: map { `<HomeId>`:
//! map { `rights`: "read" | "write", `policy`: optional string } }, `deleted_at`:
//! optional HLC text }.

use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{ROOT, ReadDoc};

use super::touched::Touched;
use super::{am, ensure_map, join, keys, opt_str, req_map, req_str};
use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::ids::DocId;

/// Root key of the registry map.
pub const REGISTRY_KEY: &str = "registry";

/// What a grantee home may do with a shared entity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rights {
    /// Read only.
    Read,
    /// Read and write.
    Write,
}

impl Rights {
    /// Stored text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rights::Read => "read",
            Rights::Write => "write",
        }
    }
}

/// One grant of an entity to a home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// Granted rights.
    pub rights: Rights,
    /// Conflict policy name, `None` for the default (latest-wins).
    pub policy: Option<String>,
    /// PeerId of the device that granted it, so the grants of a device revoked later
    /// can be found and undone; `None` in grants written before this was recorded.
    pub by: Option<String>,
}

/// One registry entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryEntry {
    /// The entity's document.
    pub doc: DocId,
    /// Grants by HomeId.
    pub shares: BTreeMap<String, Share>,
    /// Set when the entity was deleted; the entry stays as a tombstone so a
    /// replica that missed the delete cannot resurrect it.
    pub deleted_at: Option<Hlc>,
}

/// The whole registry.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Registry {
    /// Entries by entity id.
    pub entities: BTreeMap<String, RegistryEntry>,
}

/// Path of the entity map, whose entries (one per entity) [`Touched`] names.
pub const ENTITIES_PATH: [&str; 2] = [REGISTRY_KEY, "entities"];

impl Registry {
    /// Reads and validates the registry view.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        Self::read_entries(doc, &Touched::Everything)
    }

    /// The live entries' documents (id, document), skipping tombstones: what an entity
    /// index needs, read in one pass over the entries instead of a lookup per field.
    /// Each entry's `doc` is checked as [`Registry::read`] checks it; its grants are not
    /// read (changes to them were checked as they arrived).
    pub fn read_index<D: ReadDoc>(doc: &D) -> Result<Vec<(String, DocId)>> {
        use automerge::{ObjType, ScalarValueRef, ValueRef};
        let r = req_map(doc, &ROOT, REGISTRY_KEY, REGISTRY_KEY)?;
        let ents = req_map(doc, &r, "entities", "registry.entities")?;
        let mut out = Vec::new();
        for item in doc.map_range(&ents, ..) {
            let path = || join("registry.entities", &item.key);
            if !matches!(item.value, ValueRef::Object(ObjType::Map)) {
                return Err(Error::schema(path(), "expected a map"));
            }
            let entry = item.id();
            let (mut id, mut deleted) = (None, false);
            for field in doc.map_range(&entry, ..) {
                match (field.key.as_ref(), &field.value) {
                    ("doc", ValueRef::Scalar(ScalarValueRef::Str(text))) => {
                        id = Some(DocId::parse(text).ok_or_else(|| {
                            Error::schema(join(&path(), "doc"), "expected a base58 document id")
                        })?);
                    }
                    ("doc", _) => {
                        return Err(Error::schema(join(&path(), "doc"), "expected a string"));
                    }
                    ("deleted_at", ValueRef::Scalar(ScalarValueRef::Str(_))) => deleted = true,
                    ("deleted_at", _) => {
                        return Err(Error::schema(
                            join(&path(), "deleted_at"),
                            "expected a string",
                        ));
                    }
                    _ => {}
                }
            }
            let id = id.ok_or_else(|| Error::schema(join(&path(), "doc"), "missing"))?;
            if !deleted {
                out.push((item.key.into_owned(), id));
            }
        }
        Ok(out)
    }

    /// Reads only the entries `touched` names (every entry for [`Touched::Everything`]);
    /// an entry that is no longer there is skipped. Validating a registry that validated
    /// before and has since been written only in these entries is the same check as
    /// [`Registry::read`], at the cost of the entries written.
    pub fn read_entries<D: ReadDoc>(doc: &D, touched: &Touched) -> Result<Self> {
        let r = req_map(doc, &ROOT, REGISTRY_KEY, REGISTRY_KEY)?;
        let ents = req_map(doc, &r, "entities", "registry.entities")?;
        let mut entities = BTreeMap::new();
        let ids = match touched {
            Touched::Everything => keys(doc, &ents),
            Touched::Entries(ids) => {
                let mut present = Vec::new();
                for id in ids {
                    let found = doc
                        .get(&ents, id.as_str())
                        .map_err(|e| Error::schema(join("registry.entities", id), e.to_string()))?;
                    if found.is_some() {
                        present.push(id.clone());
                    }
                }
                present
            }
        };
        for id in ids {
            let (id, entry) = read_entry(doc, &ents, id)?;
            entities.insert(id, entry);
        }
        Ok(Self { entities })
    }
}

fn read_entry<D: ReadDoc>(
    doc: &D,
    ents: &automerge::ObjId,
    id: String,
) -> Result<(String, RegistryEntry)> {
    let path = join("registry.entities", &id);
    let e = req_map(doc, ents, &id, &path)?;
    let doc_path = join(&path, "doc");
    let doc_text = req_str(doc, &e, "doc", &doc_path)?;
    let doc_id = DocId::parse(&doc_text)
        .ok_or_else(|| Error::schema(&doc_path, "expected a base58 document id"))?;
    let shares_path = join(&path, "shares");
    let s = req_map(doc, &e, "shares", &shares_path)?;
    let mut shares = BTreeMap::new();
    for home in keys(doc, &s) {
        let sp = join(&shares_path, &home);
        let g = req_map(doc, &s, &home, &sp)?;
        let rp = join(&sp, "rights");
        let rights = match req_str(doc, &g, "rights", &rp)?.as_str() {
            "read" => Rights::Read,
            "write" => Rights::Write,
            other => return Err(Error::schema(rp, format!("unknown rights {other:?}"))),
        };
        let policy = opt_str(doc, &g, "policy", &join(&sp, "policy"))?;
        let by = opt_str(doc, &g, "by", &join(&sp, "by"))?;
        shares.insert(home, Share { rights, policy, by });
    }
    let dp = join(&path, "deleted_at");
    let deleted_at = opt_str(doc, &e, "deleted_at", &dp)?
        .map(|t| {
            t.parse::<Hlc>()
                .map_err(|err| Error::schema(&dp, err.to_string()))
        })
        .transpose()?;
    Ok((
        id,
        RegistryEntry {
            doc: doc_id,
            shares,
            deleted_at,
        },
    ))
}

/// Creates the empty registry layout.
pub(crate) fn init<T: Transactable>(doc: &mut T) -> Result<()> {
    let r = ensure_map(doc, &ROOT, REGISTRY_KEY)?;
    ensure_map(doc, &r, "entities")?;
    Ok(())
}

/// Records `entity_id` -> `entity_doc`, clearing any tombstone.
pub fn put_entity<T: Transactable>(doc: &mut T, entity_id: &str, entity_doc: DocId) -> Result<()> {
    let r = ensure_map(doc, &ROOT, REGISTRY_KEY)?;
    let ents = ensure_map(doc, &r, "entities")?;
    let e = ensure_map(doc, &ents, entity_id)?;
    doc.put(&e, "doc", entity_doc.to_string()).map_err(am)?;
    ensure_map(doc, &e, "shares")?;
    if doc.get(&e, "deleted_at").map_err(am)?.is_some() {
        doc.delete(&e, "deleted_at").map_err(am)?;
    }
    Ok(())
}

/// Grants `entity_id` to `home`. Fails if the entity is not registered.
pub fn share<T: Transactable>(
    doc: &mut T,
    entity_id: &str,
    home: &str,
    share: &Share,
) -> Result<()> {
    let e = entry(doc, entity_id)?;
    let s = ensure_map(doc, &e, "shares")?;
    let g = ensure_map(doc, &s, home)?;
    doc.put(&g, "rights", share.rights.as_str()).map_err(am)?;
    match &share.policy {
        Some(p) => doc.put(&g, "policy", p.as_str()).map_err(am)?,
        None => {
            if doc.get(&g, "policy").map_err(am)?.is_some() {
                doc.delete(&g, "policy").map_err(am)?;
            }
        }
    }
    if let Some(by) = &share.by {
        doc.put(&g, "by", by.as_str()).map_err(am)?;
    }
    Ok(())
}

/// Revokes the grant of `entity_id` to `home`.
pub fn unshare<T: Transactable>(doc: &mut T, entity_id: &str, home: &str) -> Result<()> {
    let e = entry(doc, entity_id)?;
    let s = ensure_map(doc, &e, "shares")?;
    doc.delete(&s, home).map_err(am)?;
    Ok(())
}

/// Marks `entity_id` deleted at `at`, keeping the entry as a tombstone.
pub fn tombstone<T: Transactable>(doc: &mut T, entity_id: &str, at: Hlc) -> Result<()> {
    let e = entry(doc, entity_id)?;
    doc.put(&e, "deleted_at", at.to_string()).map_err(am)?;
    Ok(())
}

fn entry<T: Transactable>(doc: &mut T, entity_id: &str) -> Result<automerge::ObjId> {
    let path = join("registry.entities", entity_id);
    let r = req_map(doc, &ROOT, REGISTRY_KEY, REGISTRY_KEY)?;
    let ents = req_map(doc, &r, "entities", "registry.entities")?;
    req_map(doc, &ents, entity_id, &path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{AutoCommit, ScalarValue};

    fn at(ms: u64) -> Hlc {
        Hlc {
            wall_ms: ms,
            counter: 0,
            actor: [1; 16],
        }
    }

    #[test]
    fn register_share_unshare_and_tombstone() {
        let mut doc = AutoCommit::new();
        init(&mut doc).unwrap();
        let d = DocId::from_bytes([4; 16]);
        put_entity(&mut doc, "light.porch", d).unwrap();
        let grant = Share {
            rights: Rights::Read,
            policy: Some("owner-wins".into()),
            by: None,
        };
        share(&mut doc, "light.porch", "homeB", &grant).unwrap();
        let reg = Registry::read(&doc).unwrap();
        let e = &reg.entities["light.porch"];
        assert_eq!(e.doc, d);
        assert_eq!(e.shares["homeB"], grant);
        assert_eq!(e.deleted_at, None);

        unshare(&mut doc, "light.porch", "homeB").unwrap();
        tombstone(&mut doc, "light.porch", at(9)).unwrap();
        let e = Registry::read(&doc).unwrap().entities["light.porch"].clone();
        assert!(e.shares.is_empty());
        assert_eq!(e.deleted_at, Some(at(9)));

        put_entity(&mut doc, "light.porch", d).unwrap();
        assert_eq!(
            Registry::read(&doc).unwrap().entities["light.porch"].deleted_at,
            None
        );
    }

    #[test]
    fn sharing_an_unknown_entity_is_an_error() {
        let mut doc = AutoCommit::new();
        init(&mut doc).unwrap();
        let grant = Share {
            rights: Rights::Write,
            policy: None,
            by: None,
        };
        let err = share(&mut doc, "nope", "h", &grant).unwrap_err();
        assert!(matches!(&err, Error::Schema { path, .. } if path == "registry.entities.nope"));
    }

    #[test]
    fn bad_fields_name_their_path() {
        let mut doc = AutoCommit::new();
        init(&mut doc).unwrap();
        put_entity(&mut doc, "fan", DocId::from_bytes([1; 16])).unwrap();
        share(
            &mut doc,
            "fan",
            "h2",
            &Share {
                rights: Rights::Read,
                policy: None,
                by: None,
            },
        )
        .unwrap();
        let e = entry(&mut doc, "fan").unwrap();
        let (_, s) = doc.get(&e, "shares").unwrap().unwrap();
        let (_, g) = doc.get(&s, "h2").unwrap().unwrap();
        doc.put(&g, "rights", "admin").unwrap();
        let err = Registry::read(&doc).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { path, .. } if path == "registry.entities.fan.shares.h2.rights")
        );
        doc.put(&g, "rights", "read").unwrap();
        doc.put(&e, "doc", ScalarValue::Int(1)).unwrap();
        let err = Registry::read(&doc).unwrap_err();
        assert!(matches!(&err, Error::Schema { path, .. } if path == "registry.entities.fan.doc"));
        let err = Registry::read_index(&doc).unwrap_err();
        assert!(matches!(&err, Error::Schema { path, .. } if path == "registry.entities.fan.doc"));
    }

    /// The index reader sees exactly the live entries the full reader sees.
    #[test]
    fn the_index_lists_the_live_entries_and_their_documents() {
        let mut doc = AutoCommit::new();
        init(&mut doc).unwrap();
        for i in 0..20u8 {
            put_entity(&mut doc, &format!("sensor.{i}"), DocId::from_bytes([i; 16])).unwrap();
        }
        let grant = Share {
            rights: Rights::Write,
            policy: None,
            by: Some("p".into()),
        };
        share(&mut doc, "sensor.3", "homeB", &grant).unwrap();
        tombstone(&mut doc, "sensor.5", at(3)).unwrap();
        tombstone(&mut doc, "sensor.6", at(4)).unwrap();
        put_entity(&mut doc, "sensor.6", DocId::from_bytes([66; 16])).unwrap();
        let full: Vec<(String, DocId)> = Registry::read(&doc)
            .unwrap()
            .entities
            .into_iter()
            .filter(|(_, e)| e.deleted_at.is_none())
            .map(|(id, e)| (id, e.doc))
            .collect();
        let index = Registry::read_index(&doc).unwrap();
        assert_eq!(index, full);
        assert_eq!(index.len(), 19);
        assert!(index.contains(&("sensor.6".to_string(), DocId::from_bytes([66; 16]))));
    }
}
