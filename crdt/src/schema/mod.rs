//! Document schemas: the header every document carries, and typed views over
//! every kind ([`entity`], [`registry`], [`home`], [`room`], [`presence`],
//! [`locks`], [`session`], [`users`], [`activity`]).
//!
//! Reads validate. Content that came from a peer may have any shape, so every
//! accessor checks types and presence and reports the dotted path of the first
//! field that is wrong (`entity.attributes.brightness`). Nothing here panics on
//! a malformed document.

pub mod activity;
pub mod entity;
mod fields;
pub mod home;
pub mod locks;
pub mod presence;
pub mod registry;
pub mod room;
pub mod session;
pub mod touched;
pub mod users;

pub use fields::{MAX_NAME_BYTES, MAX_NOTE_BYTES};

use std::borrow::Cow;

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};

use crate::error::{Error, Result};
use crate::ids::KeyEpoch;

/// Schema version written by this build. Documents with a higher version are
/// refused on read, so an old node never misreads a newer layout.
pub const SCHEMA_VERSION: u64 = 1;

/// Root key holding the [`Header`].
pub(crate) const HEADER_KEY: &str = "header";

/// What a document is. The kinds after `Home` are reserved for rooms, presence,
/// locks and sessions: a document may already be created with them, and their
/// typed views come later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DocKind {
    /// One shared entity.
    Entity,
    /// A home's entity registry.
    Registry,
    /// A home's own document (devices, paired homes, keyring).
    Home,
    /// A room: members, chat, activity, playback.
    Room,
    /// Presence of a home or room.
    Presence,
    /// A home's device locks.
    Locks,
    /// A user session.
    Session,
    /// A home's users: each user's state and client sessions.
    Users,
    /// A group activity across devices of a home.
    Activity,
}

impl DocKind {
    /// Stable text stored in the header and used as the first path segment.
    pub const fn as_str(self) -> &'static str {
        match self {
            DocKind::Entity => "entity",
            DocKind::Registry => "registry",
            DocKind::Home => "home",
            DocKind::Room => "room",
            DocKind::Presence => "presence",
            DocKind::Locks => "locks",
            DocKind::Session => "session",
            DocKind::Users => "users",
            DocKind::Activity => "activity",
        }
    }

    /// Inverse of [`DocKind::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "entity" => DocKind::Entity,
            "registry" => DocKind::Registry,
            "home" => DocKind::Home,
            "room" => DocKind::Room,
            "presence" => DocKind::Presence,
            "locks" => DocKind::Locks,
            "session" => DocKind::Session,
            "users" => DocKind::Users,
            "activity" => DocKind::Activity,
            _ => return None,
        })
    }
}

/// The header every document carries under the root key `header`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Kind of document.
    pub kind: DocKind,
    /// HomeId (text form) of the home that owns it.
    pub owner_home: String,
    /// Key epoch that new writes are sealed under.
    pub key_epoch: KeyEpoch,
    /// Layout version, [`SCHEMA_VERSION`] when written by this build.
    pub schema_version: u64,
}

impl Header {
    /// A header for a new document of `kind` at this build's schema version.
    pub fn new(kind: DocKind, owner_home: impl Into<String>, key_epoch: KeyEpoch) -> Self {
        Self {
            kind,
            owner_home: owner_home.into(),
            key_epoch,
            schema_version: SCHEMA_VERSION,
        }
    }

    /// Reads and validates the header.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        let h = req_map(doc, &ROOT, HEADER_KEY, "header")?;
        let kind_text = req_str(doc, &h, "kind", "header.kind")?;
        let kind = DocKind::parse(&kind_text)
            .ok_or_else(|| Error::schema("header.kind", format!("unknown kind {kind_text:?}")))?;
        let owner_home = req_str(doc, &h, "owner", "header.owner")?;
        let schema_version = req_u64(doc, &h, "schema", "header.schema")?;
        if schema_version > SCHEMA_VERSION {
            return Err(Error::schema(
                "header.schema",
                format!("version {schema_version} is newer than this build's {SCHEMA_VERSION}"),
            ));
        }
        let e = req_map(doc, &h, "epoch", "header.epoch")?;
        let counter = req_u64(doc, &e, "counter", "header.epoch.counter")?;
        let device_bytes = req_bytes(doc, &e, "device", "header.epoch.device")?;
        let device = <[u8; 16]>::try_from(device_bytes.as_slice())
            .map_err(|_| Error::schema("header.epoch.device", "expected 16 bytes"))?;
        Ok(Self {
            kind,
            owner_home,
            key_epoch: KeyEpoch { counter, device },
            schema_version,
        })
    }

    /// Writes the header (used at creation and on key rotation).
    pub fn write<T: Transactable>(&self, doc: &mut T) -> Result<()> {
        let h = doc.put_object(ROOT, HEADER_KEY, ObjType::Map).map_err(am)?;
        doc.put(&h, "kind", self.kind.as_str()).map_err(am)?;
        doc.put(&h, "owner", self.owner_home.as_str()).map_err(am)?;
        doc.put(&h, "schema", ScalarValue::Uint(self.schema_version))
            .map_err(am)?;
        let e = doc.put_object(&h, "epoch", ObjType::Map).map_err(am)?;
        doc.put(&e, "counter", ScalarValue::Uint(self.key_epoch.counter))
            .map_err(am)?;
        doc.put(
            &e,
            "device",
            ScalarValue::Bytes(self.key_epoch.device.to_vec()),
        )
        .map_err(am)?;
        Ok(())
    }
}

/// Maps an Automerge error from a local operation into the crate error.
pub(crate) fn am(e: automerge::AutomergeError) -> Error {
    Error::Automerge(e.to_string())
}

/// Human name of a value's type, for error messages.
pub(crate) fn type_name(v: &Value<'_>) -> &'static str {
    match v {
        Value::Object(ObjType::Map) => "map",
        Value::Object(ObjType::Table) => "table",
        Value::Object(ObjType::List) => "list",
        Value::Object(ObjType::Text) => "text",
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Bytes(_) => "bytes",
            ScalarValue::Str(_) => "string",
            ScalarValue::Int(_) => "int",
            ScalarValue::Uint(_) => "uint",
            ScalarValue::F64(_) => "float",
            ScalarValue::Counter(_) => "counter",
            ScalarValue::Timestamp(_) => "timestamp",
            ScalarValue::Boolean(_) => "bool",
            ScalarValue::Unknown { .. } => "unknown",
            ScalarValue::Null => "null",
        },
    }
}

fn get<'a, D: ReadDoc>(
    doc: &'a D,
    obj: &ObjId,
    key: &str,
    path: &str,
) -> Result<Option<(Value<'a>, ObjId)>> {
    doc.get(obj, key)
        .map_err(|e| Error::schema(path, format!("unreadable: {e}")))
}

pub(crate) fn required<'a, D: ReadDoc>(
    doc: &'a D,
    obj: &ObjId,
    key: &str,
    path: &str,
) -> Result<(Value<'a>, ObjId)> {
    get(doc, obj, key, path)?.ok_or_else(|| Error::schema(path, "missing"))
}

fn wrong(path: &str, expected: &str, found: &Value<'_>) -> Error {
    Error::schema(
        path,
        format!("expected {expected}, found {}", type_name(found)),
    )
}

/// A required nested map.
pub(crate) fn req_map<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, path: &str) -> Result<ObjId> {
    match required(doc, obj, key, path)? {
        (Value::Object(ObjType::Map | ObjType::Table), id) => Ok(id),
        (v, _) => Err(wrong(path, "map", &v)),
    }
}

/// A required string. Text objects are accepted too, since other Automerge
/// clients may store strings that way.
pub(crate) fn req_str<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, path: &str) -> Result<String> {
    let (v, id) = required(doc, obj, key, path)?;
    value_to_string(doc, v, &id, path)
}

/// An optional string: absent or null gives `None`.
pub(crate) fn opt_str<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    key: &str,
    path: &str,
) -> Result<Option<String>> {
    match get(doc, obj, key, path)? {
        None => Ok(None),
        Some((Value::Scalar(s), _)) if s.is_null() => Ok(None),
        Some((v, id)) => value_to_string(doc, v, &id, path).map(Some),
    }
}

fn value_to_string<D: ReadDoc>(doc: &D, v: Value<'_>, id: &ObjId, path: &str) -> Result<String> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(text) => Ok(text.to_string()),
            _ => Err(wrong(path, "string", &Value::Scalar(s))),
        },
        Value::Object(ObjType::Text) => doc
            .text(id)
            .map_err(|e| Error::schema(path, format!("unreadable text: {e}"))),
        other => Err(wrong(path, "string", &other)),
    }
}

/// A required unsigned integer; non-negative `Int` is accepted as well, since
/// JavaScript clients write integers as `Int`.
pub(crate) fn req_u64<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, path: &str) -> Result<u64> {
    let (v, _) = required(doc, obj, key, path)?;
    scalar_u64(&v).ok_or_else(|| wrong(path, "unsigned integer", &v))
}

/// An optional unsigned integer.
pub(crate) fn opt_u64<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    key: &str,
    path: &str,
) -> Result<Option<u64>> {
    match get(doc, obj, key, path)? {
        None => Ok(None),
        Some((Value::Scalar(s), _)) if s.is_null() => Ok(None),
        Some((v, _)) => scalar_u64(&v)
            .map(Some)
            .ok_or_else(|| wrong(path, "unsigned integer", &v)),
    }
}

fn scalar_u64(v: &Value<'_>) -> Option<u64> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Uint(n) => Some(*n),
            ScalarValue::Int(n) => u64::try_from(*n).ok(),
            _ => None,
        },
        Value::Object(_) => None,
    }
}

/// Required bytes.
pub(crate) fn req_bytes<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    key: &str,
    path: &str,
) -> Result<Vec<u8>> {
    match required(doc, obj, key, path)? {
        (Value::Scalar(Cow::Borrowed(ScalarValue::Bytes(b))), _) => Ok(b.clone()),
        (Value::Scalar(Cow::Owned(ScalarValue::Bytes(b))), _) => Ok(b),
        (v, _) => Err(wrong(path, "bytes", &v)),
    }
}

/// Keys of a map object, in Automerge's (sorted) order.
pub(crate) fn keys<D: ReadDoc>(doc: &D, obj: &ObjId) -> Vec<String> {
    doc.keys(obj).collect()
}

/// Joins a parent path and a map key.
pub(crate) fn join(path: &str, key: &str) -> String {
    let mut out = String::with_capacity(path.len() + 1 + key.len());
    out.push_str(path);
    out.push('.');
    out.push_str(key);
    out
}

/// Ensures `key` under `obj` holds a map and returns it, creating it when
/// absent. An existing value of another type is replaced, which is how a local
/// write repairs a field a peer broke.
pub(crate) fn ensure_map<T: Transactable>(doc: &mut T, obj: &ObjId, key: &str) -> Result<ObjId> {
    match doc.get(obj, key).map_err(am)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        _ => doc.put_object(obj, key, ObjType::Map).map_err(am),
    }
}

/// Puts a string only when it differs, so repeated writes of the same value
/// do not grow history or manufacture conflicts.
pub(crate) fn put_str_if_changed<T: Transactable>(
    doc: &mut T,
    obj: &ObjId,
    key: &str,
    value: &str,
) -> Result<()> {
    let same = matches!(
        doc.get(obj, key).map_err(am)?,
        Some((Value::Scalar(s), _)) if s.as_str() == Some(value)
    );
    if !same {
        doc.put(obj, key, value).map_err(am)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;

    fn epoch() -> KeyEpoch {
        KeyEpoch {
            counter: 3,
            device: [9; 16],
        }
    }

    #[test]
    fn header_round_trips() {
        let mut doc = AutoCommit::new();
        let h = Header::new(DocKind::Registry, "home-1", epoch());
        h.write(&mut doc).unwrap();
        assert_eq!(Header::read(&doc).unwrap(), h);
    }

    #[test]
    fn every_kind_round_trips_through_text() {
        for k in [
            DocKind::Entity,
            DocKind::Registry,
            DocKind::Home,
            DocKind::Room,
            DocKind::Presence,
            DocKind::Locks,
            DocKind::Session,
            DocKind::Users,
            DocKind::Activity,
        ] {
            assert_eq!(DocKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(DocKind::parse("nope"), None);
    }

    #[test]
    fn header_errors_name_the_field() {
        let mut doc = AutoCommit::new();
        assert!(matches!(Header::read(&doc), Err(Error::Schema { path, .. }) if path == "header"));

        Header::new(DocKind::Entity, "h", epoch())
            .write(&mut doc)
            .unwrap();
        let (_, h) = doc.get(ROOT, HEADER_KEY).unwrap().unwrap();
        doc.put(&h, "kind", 7_i64).unwrap();
        let err = Header::read(&doc).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { path, .. } if path == "header.kind"),
            "{err}"
        );

        doc.put(&h, "kind", "entity").unwrap();
        doc.put(&h, "schema", ScalarValue::Uint(SCHEMA_VERSION + 1))
            .unwrap();
        let err = Header::read(&doc).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { path, .. } if path == "header.schema"),
            "{err}"
        );

        doc.put(&h, "schema", ScalarValue::Uint(1)).unwrap();
        let (_, e) = doc.get(&h, "epoch").unwrap().unwrap();
        doc.put(&e, "device", ScalarValue::Bytes(vec![1, 2]))
            .unwrap();
        let err = Header::read(&doc).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { path, .. } if path == "header.epoch.device"),
            "{err}"
        );
    }
}
