//! Typed view of an `entity` document.
//!
//! Layout under the root key `entity`:
//!
//! | key | type |
//! | --- | --- |
//! | `id` | string, e.g. `light.living_room` |
//! | `state` | string |
//! | `attributes` | map of JSON-like values |
//! | `updated_at` | unsigned integer, an [`Hlc`] in its compact form (see [`stamp_value`]); the text form is read too |
//! | `updated_by` | string, hex actor id of the writing device |
//! | `owner` | string, HomeId of the owner home |
//! | `correlation_id` | optional string, the id the last write carried |
//!
//! Every field is a separate map key, so concurrent writes to different
//! attributes merge, and concurrent writes to one field leave both values for
//! the conflict policies (read with `get_all`) to decide between.

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use serde_json::{Map, Number, Value as Json};

use super::{am, ensure_map, join, keys, put_str_if_changed, req_map, req_str, type_name};
use crate::error::{Error, Result};
use crate::hlc::Hlc;

/// Root key of the entity map; also the first segment of error paths.
pub const ENTITY_KEY: &str = "entity";

/// Deepest nesting of attribute values accepted on read or write. Bounds the
/// recursion a hostile document can cause.
pub const MAX_ATTRIBUTE_DEPTH: usize = 16;

/// Most attribute entries (counted over all nesting levels) accepted on a
/// read or a write.
pub const MAX_ATTRIBUTE_ENTRIES: usize = 4096;

/// Attribute map of an entity: JSON-like values by name.
pub type AttributeMap = Map<String, Json>;

/// An entity as stored, after validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Entity {
    /// Entity id chosen by the user, e.g. `light.living_room`.
    pub id: String,
    /// Current state, a string as in Home Assistant.
    pub state: String,
    /// JSON-like attribute map.
    pub attributes: AttributeMap,
    /// When it was last written.
    pub updated_at: Hlc,
    /// Actor (device) that wrote it last.
    pub updated_by: ActorId,
    /// HomeId of the owner home.
    pub owner: String,
}

/// A write to an entity.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct EntityUpdate {
    /// New state.
    pub state: String,
    /// New attributes. `None` keeps the current ones; `Some` replaces them,
    /// touching only the keys whose value actually changed.
    pub attributes: Option<AttributeMap>,
}

impl Entity {
    /// Reads and validates the entity view of `doc`.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        let e = req_map(doc, &ROOT, ENTITY_KEY, ENTITY_KEY)?;
        let id = req_str(doc, &e, "id", "entity.id")?;
        let state = req_str(doc, &e, "state", "entity.state")?;
        let a = req_map(doc, &e, "attributes", "entity.attributes")?;
        let mut budget = MAX_ATTRIBUTE_ENTRIES;
        let attributes = read_map(doc, &a, "entity.attributes", 1, &mut budget)?;
        let updated_at = read_stamp(doc, &e)?;
        let by = req_str(doc, &e, "updated_by", "entity.updated_by")?;
        let updated_by = parse_actor(&by)
            .ok_or_else(|| Error::schema("entity.updated_by", "expected 32 hex digits"))?;
        let owner = req_str(doc, &e, "owner", "entity.owner")?;
        Ok(Self {
            id,
            state,
            attributes,
            updated_at,
            updated_by,
            owner,
        })
    }
}

/// Bits of the compact stamp that hold the clock's counter, when it is not 0.
const STAMP_COUNTER_BITS: u32 = 8;

/// How `updated_at` holds `at`, written by the operation of actor `writer`. When the
/// clock is the writer's own (as every write's is) and its counter fits 8 bits, an
/// unsigned integer with the actor taken back from the operation: `wall_ms << 1` for
/// counter 0 (the usual case, 6 bytes in a change until 2039), else
/// `wall_ms << 9 | counter << 1 | 1`; the text form takes 58. Otherwise the text form,
/// which names the actor itself and which every reader accepts too (and older versions
/// wrote).
pub fn stamp_value(at: &Hlc, writer: &ActorId) -> ScalarValue {
    let own = writer.to_bytes() == at.actor.as_slice();
    let counter = u64::from(at.counter);
    match own {
        true if counter == 0 && at.wall_ms < 1 << 63 => ScalarValue::Uint(at.wall_ms << 1),
        true if counter < 1 << STAMP_COUNTER_BITS
            && at.wall_ms < 1 << (63 - STAMP_COUNTER_BITS) =>
        {
            ScalarValue::Uint(at.wall_ms << (STAMP_COUNTER_BITS + 1) | counter << 1 | 1)
        }
        _ => ScalarValue::Str(at.to_string().into()),
    }
}

/// The clock an `updated_at` value holds, written by an operation of `writer`: the
/// compact form takes its actor from `writer`, the text form names its own. `None`
/// for any other value (a signed or negative integer, a malformed text, an actor
/// that is not 16 bytes).
pub fn stamp_from_scalar(value: &ScalarValue, writer: &ActorId) -> Option<Hlc> {
    match value {
        ScalarValue::Uint(packed) => {
            let (wall_ms, counter) = if packed & 1 == 0 {
                (packed >> 1, 0)
            } else {
                let counter = (packed >> 1) & ((1 << STAMP_COUNTER_BITS) - 1);
                // Counter 0 has the short form only: one clock, one encoding.
                if counter == 0 {
                    return None;
                }
                (packed >> (STAMP_COUNTER_BITS + 1), counter)
            };
            Some(Hlc {
                wall_ms,
                counter: u32::try_from(counter).ok()?,
                actor: writer.to_bytes().try_into().ok()?,
            })
        }
        ScalarValue::Str(text) => text.parse().ok(),
        _ => None,
    }
}

/// The clock an `updated_at` value read from a document holds; `id` is the value's
/// operation, which names the writer.
pub fn stamp_from_value(value: &Value<'_>, id: &ObjId) -> Option<Hlc> {
    match (value, id) {
        (Value::Scalar(s), ObjId::Id(_, actor, _)) => stamp_from_scalar(s, actor),
        // A value's operation is never the root.
        _ => None,
    }
}

/// The entity's `updated_at`, required.
fn read_stamp<D: ReadDoc>(doc: &D, e: &ObjId) -> Result<Hlc> {
    let (value, id) = super::required(doc, e, "updated_at", "entity.updated_at")?;
    stamp_from_value(&value, &id).ok_or_else(|| {
        Error::schema(
            "entity.updated_at",
            "expected a clock: an unsigned integer or 58 characters of text",
        )
    })
}

fn parse_actor(text: &str) -> Option<ActorId> {
    if text.len() != 32 {
        return None;
    }
    text.parse::<ActorId>().ok()
}

/// Writes the immutable fields and a first state. Used once, at creation.
pub(crate) fn init(
    doc: &mut AutoCommit,
    id: &str,
    owner: &str,
    update: &EntityUpdate,
    at: Hlc,
    by: &ActorId,
) -> Result<()> {
    validate_id(id)?;
    let e = doc.put_object(ROOT, ENTITY_KEY, ObjType::Map).map_err(am)?;
    doc.put(&e, "id", id).map_err(am)?;
    doc.put(&e, "owner", owner).map_err(am)?;
    doc.put_object(&e, "attributes", ObjType::Map).map_err(am)?;
    write(doc, update, at, by)
}

/// Entity ids are short printable names; refusing the rest up front keeps
/// them safe to show in logs and URLs.
fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::schema(
            "entity.id",
            "expected 1-255 characters of ASCII letters, digits, '.', '_' or '-'",
        ))
    }
}

/// Applies `update` with timestamp `at` written by `by`.
pub fn write(doc: &mut AutoCommit, update: &EntityUpdate, at: Hlc, by: &ActorId) -> Result<()> {
    if let Some(attrs) = &update.attributes {
        let mut budget = MAX_ATTRIBUTE_ENTRIES;
        check_json_map(attrs, "entity.attributes", 1, &mut budget)?;
    }
    let e = ensure_map(doc, &ROOT, ENTITY_KEY)?;
    put_str_if_changed(doc, &e, "state", &update.state)?;
    if let Some(attrs) = &update.attributes {
        let a = ensure_map(doc, &e, "attributes")?;
        let existing = keys(doc, &a);
        for k in existing.iter().filter(|k| !attrs.contains_key(k.as_str())) {
            doc.delete(&a, k.as_str()).map_err(am)?;
        }
        for (k, v) in attrs {
            let current = match doc.get(&a, k.as_str()).map_err(am)? {
                Some((val, id)) => {
                    let mut budget = MAX_ATTRIBUTE_ENTRIES;
                    read_value(doc, val, &id, "", 2, &mut budget).ok()
                }
                None => None,
            };
            if current.as_ref() != Some(v) {
                put_json(doc, &a, k, v)?;
            }
        }
    }
    // The compact stamp names no actor: the reader takes the operation's, which is the
    // document's actor, so that is what decides whether `at` can be written compactly.
    let writer = doc.get_actor().clone();
    doc.put(&e, "updated_at", stamp_value(&at, &writer))
        .map_err(am)?;
    put_str_if_changed(doc, &e, "updated_by", &by.to_hex_string())?;
    Ok(())
}

/// Key of the last write's correlation id in the entity map. It is written in the same
/// change as the state it accompanies, so it reaches other devices whether the change
/// travels by push or by the sync protocol.
pub const CORRELATION_KEY: &str = "correlation_id";

/// Sets the correlation id of the write in progress, or removes the previous write's id
/// when this one has none (so a later write is never credited with an earlier id).
/// Refuses ids longer than [`MAX_CORRELATION_ID_LEN`](crate::wire::MAX_CORRELATION_ID_LEN).
pub fn put_correlation_id<T: Transactable>(doc: &mut T, id: Option<&str>) -> Result<()> {
    let e = ensure_map(doc, &ROOT, ENTITY_KEY)?;
    match id {
        Some(id) if id.len() > crate::wire::MAX_CORRELATION_ID_LEN => Err(Error::schema(
            "entity.correlation_id",
            format!(
                "{} bytes; at most {} are allowed",
                id.len(),
                crate::wire::MAX_CORRELATION_ID_LEN
            ),
        )),
        Some(id) => put_str_if_changed(doc, &e, CORRELATION_KEY, id),
        None => {
            if doc.get(&e, CORRELATION_KEY).map_err(am)?.is_some() {
                doc.delete(&e, CORRELATION_KEY).map_err(am)?;
            }
            Ok(())
        }
    }
}

/// The correlation id of the last write, if it carried a well-formed one. Anything else a
/// peer put there (wrong type, too long) reads as none.
pub fn correlation_id<D: ReadDoc>(doc: &D) -> Option<String> {
    let (Value::Object(ObjType::Map), e) = doc.get(ROOT, ENTITY_KEY).ok()?? else {
        return None;
    };
    match doc.get(&e, CORRELATION_KEY).ok()?? {
        (Value::Scalar(s), _) => s
            .as_str()
            .filter(|c| c.len() <= crate::wire::MAX_CORRELATION_ID_LEN)
            .map(str::to_string),
        _ => None,
    }
}

fn check_json_map(
    map: &Map<String, Json>,
    path: &str,
    depth: usize,
    budget: &mut usize,
) -> Result<()> {
    for (k, v) in map {
        check_json(v, &join(path, k), depth + 1, budget)?;
    }
    Ok(())
}

fn check_json(v: &Json, path: &str, depth: usize, budget: &mut usize) -> Result<()> {
    if depth > MAX_ATTRIBUTE_DEPTH {
        return Err(Error::schema(path, "attributes nested too deeply"));
    }
    *budget = budget
        .checked_sub(1)
        .ok_or_else(|| Error::schema(path, "too many attribute entries"))?;
    match v {
        Json::Object(m) => check_json_map(m, path, depth, budget),
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_json(item, &join(path, &i.to_string()), depth + 1, budget)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn scalar_for(v: &Json) -> Option<ScalarValue> {
    Some(match v {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => ScalarValue::Int(i),
            (None, Some(u), _) => ScalarValue::Uint(u),
            (None, None, Some(f)) => ScalarValue::F64(f),
            // serde_json numbers are always one of the three.
            (None, None, None) => ScalarValue::Null,
        },
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Array(_) | Json::Object(_) => return None,
    })
}

pub(crate) fn put_json<T: Transactable>(
    doc: &mut T,
    obj: &ObjId,
    key: &str,
    v: &Json,
) -> Result<()> {
    match (scalar_for(v), v) {
        (Some(s), _) => {
            doc.put(obj, key, s).map_err(am)?;
        }
        (None, Json::Object(m)) => {
            let child = doc.put_object(obj, key, ObjType::Map).map_err(am)?;
            for (k, v) in m {
                put_json(doc, &child, k, v)?;
            }
        }
        (None, Json::Array(items)) => {
            let child = doc.put_object(obj, key, ObjType::List).map_err(am)?;
            fill_list(doc, &child, items)?;
        }
        (None, _) => {}
    }
    Ok(())
}

fn fill_list<T: Transactable>(doc: &mut T, list: &ObjId, items: &[Json]) -> Result<()> {
    for (i, v) in items.iter().enumerate() {
        match (scalar_for(v), v) {
            (Some(s), _) => {
                doc.insert(list, i, s).map_err(am)?;
            }
            (None, Json::Object(m)) => {
                let child = doc.insert_object(list, i, ObjType::Map).map_err(am)?;
                for (k, v) in m {
                    put_json(doc, &child, k, v)?;
                }
            }
            (None, Json::Array(inner)) => {
                let child = doc.insert_object(list, i, ObjType::List).map_err(am)?;
                fill_list(doc, &child, inner)?;
            }
            (None, _) => {}
        }
    }
    Ok(())
}

fn read_map<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    path: &str,
    depth: usize,
    budget: &mut usize,
) -> Result<Map<String, Json>> {
    let mut out = Map::new();
    for k in keys(doc, obj) {
        let p = join(path, &k);
        if let Some((v, id)) = doc
            .get(obj, k.as_str())
            .map_err(|e| Error::schema(&p, format!("unreadable: {e}")))?
        {
            let json = read_value(doc, v, &id, &p, depth + 1, budget)?;
            out.insert(k, json);
        }
    }
    Ok(out)
}

fn read_value<D: ReadDoc>(
    doc: &D,
    v: Value<'_>,
    id: &ObjId,
    path: &str,
    depth: usize,
    budget: &mut usize,
) -> Result<Json> {
    if depth > MAX_ATTRIBUTE_DEPTH {
        return Err(Error::schema(path, "attributes nested too deeply"));
    }
    *budget = budget
        .checked_sub(1)
        .ok_or_else(|| Error::schema(path, "too many attribute entries"))?;
    match v {
        Value::Object(ObjType::Map | ObjType::Table) => {
            read_map(doc, id, path, depth, budget).map(Json::Object)
        }
        Value::Object(ObjType::List) => {
            let mut items = Vec::new();
            let listed: Vec<(Value<'static>, ObjId)> = doc
                .list_range(id, ..)
                .map(|item| {
                    let item_id = item.id();
                    (item.value.into_value(), item_id)
                })
                .collect();
            for (i, (value, item_id)) in listed.into_iter().enumerate() {
                let p = join(path, &i.to_string());
                items.push(read_value(doc, value, &item_id, &p, depth + 1, budget)?);
            }
            Ok(Json::Array(items))
        }
        Value::Object(ObjType::Text) => doc
            .text(id)
            .map(Json::String)
            .map_err(|e| Error::schema(path, format!("unreadable text: {e}"))),
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Null => Ok(Json::Null),
            ScalarValue::Boolean(b) => Ok(Json::Bool(*b)),
            ScalarValue::Int(i) => Ok(Json::Number((*i).into())),
            ScalarValue::Uint(u) => Ok(Json::Number((*u).into())),
            ScalarValue::Counter(_) => Ok(Json::Number(s.as_i64().unwrap_or_default().into())),
            ScalarValue::F64(f) => Number::from_f64(*f)
                .map(Json::Number)
                .ok_or_else(|| Error::schema(path, "non-finite number")),
            ScalarValue::Str(text) => Ok(Json::String(text.to_string())),
            _ => Err(Error::schema(
                path,
                format!(
                    "unsupported attribute type {}",
                    type_name(&Value::Scalar(s.clone()))
                ),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;
    use serde_json::json;

    fn actor() -> ActorId {
        ActorId::from([5u8; 16])
    }

    fn at(ms: u64) -> Hlc {
        Hlc {
            wall_ms: ms,
            counter: 0,
            actor: [5; 16],
        }
    }

    fn attrs(v: Json) -> Option<Map<String, Json>> {
        match v {
            Json::Object(m) => Some(m),
            _ => None,
        }
    }

    fn new_doc() -> AutoCommit {
        let mut doc = AutoCommit::new();
        let update = EntityUpdate {
            state: "on".into(),
            attributes: attrs(
                json!({"brightness": 80, "color": {"r": 1, "g": 2.5}, "tags": ["a", null, true]}),
            ),
        };
        init(
            &mut doc,
            "light.living_room",
            "home-1",
            &update,
            at(1),
            &actor(),
        )
        .unwrap();
        doc
    }

    #[test]
    fn a_correlation_id_is_kept_until_a_write_without_one() {
        let mut doc = new_doc();
        assert_eq!(correlation_id(&doc), None);
        put_correlation_id(&mut doc, Some("req-1")).unwrap();
        assert_eq!(correlation_id(&doc).as_deref(), Some("req-1"));
        // A second device merging the change reads the same id.
        let mut other = doc.fork();
        assert_eq!(correlation_id(&other).as_deref(), Some("req-1"));
        put_correlation_id(&mut doc, None).unwrap();
        assert_eq!(correlation_id(&doc), None);
        other.merge(&mut doc).unwrap();
        assert_eq!(correlation_id(&other), None);
        let long = "x".repeat(crate::wire::MAX_CORRELATION_ID_LEN + 1);
        assert!(put_correlation_id(&mut doc, Some(&long)).is_err());
        // A peer that stored an overlong or non-string id gets none read back.
        let e = ensure_map(&mut doc, &ROOT, ENTITY_KEY).unwrap();
        doc.put(&e, CORRELATION_KEY, long.as_str()).unwrap();
        assert_eq!(correlation_id(&doc), None);
        doc.put(&e, CORRELATION_KEY, 7).unwrap();
        assert_eq!(correlation_id(&doc), None);
        // And the entity itself still reads.
        assert_eq!(Entity::read(&doc).unwrap().state, "on");
    }

    #[test]
    fn a_stamp_is_written_compactly_by_its_own_clock_and_as_text_otherwise() {
        let mut doc = AutoCommit::new().with_actor(actor());
        let update = EntityUpdate {
            state: "on".into(),
            attributes: None,
        };
        init(&mut doc, "light.a", "home-1", &update, at(1), &actor()).unwrap();
        let e = doc.get(ROOT, ENTITY_KEY).unwrap().unwrap().1;
        let stored = |doc: &AutoCommit| match doc.get(&e, "updated_at").unwrap().unwrap().0 {
            Value::Scalar(s) => s.into_owned(),
            Value::Object(_) => ScalarValue::Null,
        };
        // The writer's own clock: an integer, read back with the writer's actor.
        assert!(matches!(stored(&doc), ScalarValue::Uint(_)));
        assert_eq!(Entity::read(&doc).unwrap().updated_at, at(1));
        let busy = Hlc {
            counter: 255,
            ..at(1_780_000_000_000)
        };
        write(&mut doc, &update, busy, &actor()).unwrap();
        assert_eq!(Entity::read(&doc).unwrap().updated_at, busy);
        // A counter past 8 bits, or a clock that is not the document's actor's: text.
        for other in [
            Hlc {
                counter: 256,
                ..at(2)
            },
            Hlc {
                actor: [9; 16],
                ..at(3)
            },
        ] {
            write(&mut doc, &update, other, &actor()).unwrap();
            assert!(stored(&doc).is_str());
            assert_eq!(Entity::read(&doc).unwrap().updated_at, other);
        }
        // The compact form takes whichever actor wrote it; anything but an unsigned
        // integer or a clock's text is refused.
        let mut peer = doc.fork().with_actor(ActorId::from([8u8; 16]));
        peer.put(&e, "updated_at", 4u64 << 9 | 2 << 1 | 1).unwrap();
        let read = Entity::read(&peer).unwrap().updated_at;
        assert_eq!((read.wall_ms, read.counter, read.actor), (4, 2, [8; 16]));
        peer.put(&e, "updated_at", 4u64 << 1).unwrap();
        let read = Entity::read(&peer).unwrap().updated_at;
        assert_eq!((read.wall_ms, read.counter), (4, 0));
        for bad in [
            ScalarValue::Int(5),
            ScalarValue::Str("soon".into()),
            ScalarValue::F64(1.0),
            ScalarValue::Uint(4 << 9 | 1),
        ] {
            peer.put(&e, "updated_at", bad).unwrap();
            let err = Entity::read(&peer).unwrap_err();
            assert!(matches!(&err, Error::Schema { path, .. } if path == "entity.updated_at"));
        }
    }

    #[test]
    fn written_entity_reads_back() {
        let doc = new_doc();
        let e = Entity::read(&doc).unwrap();
        assert_eq!(e.id, "light.living_room");
        assert_eq!(e.state, "on");
        assert_eq!(
            Json::Object(e.attributes),
            json!({"brightness": 80, "color": {"r": 1, "g": 2.5}, "tags": ["a", null, true]})
        );
        assert_eq!(e.updated_at, at(1));
        assert_eq!(e.updated_by, actor());
        assert_eq!(e.owner, "home-1");
    }

    #[test]
    fn update_replaces_attributes_and_none_keeps_them() {
        let mut doc = new_doc();
        let update = EntityUpdate {
            state: "off".into(),
            attributes: attrs(json!({"brightness": 10})),
        };
        write(&mut doc, &update, at(2), &actor()).unwrap();
        let e = Entity::read(&doc).unwrap();
        assert_eq!(
            Json::Object(e.attributes.clone()),
            json!({"brightness": 10})
        );
        write(
            &mut doc,
            &EntityUpdate {
                state: "on".into(),
                attributes: None,
            },
            at(3),
            &actor(),
        )
        .unwrap();
        let e2 = Entity::read(&doc).unwrap();
        assert_eq!(e2.attributes, e.attributes);
        assert_eq!(e2.state, "on");
        assert_eq!(e2.updated_at, at(3));
    }

    #[test]
    fn wrong_types_and_missing_fields_name_the_path() {
        let mut doc = new_doc();
        let (_, e) = doc.get(ROOT, ENTITY_KEY).unwrap().unwrap();
        let (_, a) = doc.get(&e, "attributes").unwrap().unwrap();
        doc.put(&a, "brightness", ScalarValue::Bytes(vec![1]))
            .unwrap();
        let err = Entity::read(&doc).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { path, .. } if path == "entity.attributes.brightness"),
            "{err}"
        );

        doc.delete(&a, "brightness").unwrap();
        doc.put(&e, "state", 3_i64).unwrap();
        let err = Entity::read(&doc).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { path, .. } if path == "entity.state"),
            "{err}"
        );

        doc.put(&e, "state", "on").unwrap();
        doc.delete(&e, "owner").unwrap();
        let err = Entity::read(&doc).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { path, reason } if path == "entity.owner" && reason == "missing")
        );

        doc.put(&e, "owner", "h").unwrap();
        doc.put(&e, "updated_at", "yesterday").unwrap();
        let err = Entity::read(&doc).unwrap_err();
        assert!(matches!(&err, Error::Schema { path, .. } if path == "entity.updated_at"));

        doc.put(&e, "updated_at", at(1).to_string()).unwrap();
        doc.put(&e, "updated_by", "not-hex").unwrap();
        let err = Entity::read(&doc).unwrap_err();
        assert!(matches!(&err, Error::Schema { path, .. } if path == "entity.updated_by"));

        doc.put(&e, "updated_by", actor().to_hex_string()).unwrap();
        let (_, c) = doc.get(&a, "color").unwrap().unwrap();
        doc.put(&c, "g", f64::NAN).unwrap();
        let err = Entity::read(&doc).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { path, .. } if path == "entity.attributes.color.g"),
            "{err}"
        );
    }

    #[test]
    fn deep_nesting_is_refused_on_write_and_read() {
        let mut deep = json!(1);
        for _ in 0..MAX_ATTRIBUTE_DEPTH + 2 {
            deep = json!({ "x": deep });
        }
        let mut doc = new_doc();
        let update = EntityUpdate {
            state: "on".into(),
            attributes: attrs(json!({ "deep": deep.clone() })),
        };
        let err = write(&mut doc, &update, at(2), &actor()).unwrap_err();
        assert!(matches!(err, Error::Schema { .. }));

        // A peer that ignores the limit still cannot make reads recurse unboundedly.
        let (_, e) = doc.get(ROOT, ENTITY_KEY).unwrap().unwrap();
        let (_, a) = doc.get(&e, "attributes").unwrap().unwrap();
        put_json(&mut doc, &a, "deep", &deep).unwrap();
        let err = Entity::read(&doc).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { reason, .. } if reason.contains("deeply")),
            "{err}"
        );
    }

    #[test]
    fn invalid_ids_are_refused() {
        let mut doc = AutoCommit::new();
        for id in ["", "light porch", "a/b", &"x".repeat(256)] {
            let err =
                init(&mut doc, id, "h", &EntityUpdate::default(), at(1), &actor()).unwrap_err();
            assert!(matches!(&err, Error::Schema { path, .. } if path == "entity.id"));
        }
    }

    #[test]
    fn unchanged_values_write_nothing_new() {
        let mut doc = new_doc();
        doc.commit();
        let e = Entity::read(&doc).unwrap();
        let update = EntityUpdate {
            state: e.state.clone(),
            attributes: Some(e.attributes.clone()),
        };
        write(&mut doc, &update, at(2), &actor()).unwrap();
        // Only updated_at changes: same writer, same values.
        assert_eq!(doc.pending_ops(), 1);
    }
}
