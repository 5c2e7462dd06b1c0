//! Field readers and input checks shared by the room, presence, locks and
//! session views, on top of the readers in the parent module.
//!
//! The same check runs on a local write (so this node never stores a value it
//! would refuse) and on a read (so a peer that skipped it is caught, with the
//! field's path).

use automerge::{ObjId, ObjType, ReadDoc, ScalarValue, Value};

use super::{req_str, type_name};
use crate::error::{Error, Result};
use crate::hlc::Hlc;

/// Longest name (user, device, room, media, activity kind) accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// Longest free-text note or reason accepted, in bytes.
pub const MAX_NOTE_BYTES: usize = 512;

/// Checks a short human-readable name: 1 to [`MAX_NAME_BYTES`] bytes, no
/// control characters, so it is safe to print in logs, terminals and URLs.
pub(crate) fn check_name(path: &str, value: &str) -> Result<()> {
    check_text(path, value, MAX_NAME_BYTES)?;
    if value.is_empty() {
        return Err(Error::schema(path, "must not be empty"));
    }
    Ok(())
}

/// Checks free text: at most `max` bytes and no control characters other
/// than newline and tab.
pub(crate) fn check_text(path: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Error::schema(
            path,
            format!("is {} bytes, over the cap of {max}", value.len()),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(Error::schema(path, "contains control characters"));
    }
    Ok(())
}

/// A required name, checked with [`check_name`].
pub(crate) fn req_name<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, path: &str) -> Result<String> {
    let v = req_str(doc, obj, key, path)?;
    check_name(path, &v)?;
    Ok(v)
}

/// A required HLC in its text form.
pub(crate) fn req_hlc<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, path: &str) -> Result<Hlc> {
    req_str(doc, obj, key, path)?
        .parse::<Hlc>()
        .map_err(|e| Error::schema(path, e.to_string()))
}

fn lookup<'a, D: ReadDoc>(
    doc: &'a D,
    obj: &ObjId,
    key: &str,
    path: &str,
) -> Result<Option<Value<'a>>> {
    doc.get(obj, key)
        .map(|v| v.map(|(v, _)| v))
        .map_err(|e| Error::schema(path, format!("unreadable: {e}")))
}

fn wrong(path: &str, expected: &str, found: &Value<'_>) -> Error {
    Error::schema(
        path,
        format!("expected {expected}, found {}", type_name(found)),
    )
}

/// A required finite float. Integers are accepted, since JavaScript clients
/// write whole numbers as integers.
pub(crate) fn req_f64<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, path: &str) -> Result<f64> {
    let v = lookup(doc, obj, key, path)?.ok_or_else(|| Error::schema(path, "missing"))?;
    let n = match &v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::F64(f) => Some(*f),
            ScalarValue::Int(i) => Some(*i as f64),
            ScalarValue::Uint(u) => Some(*u as f64),
            _ => None,
        },
        Value::Object(_) => None,
    };
    match n {
        Some(f) if f.is_finite() => Ok(f),
        Some(_) => Err(Error::schema(path, "non-finite number")),
        None => Err(wrong(path, "number", &v)),
    }
}

/// A required boolean.
pub(crate) fn req_bool<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, path: &str) -> Result<bool> {
    let v = lookup(doc, obj, key, path)?.ok_or_else(|| Error::schema(path, "missing"))?;
    match &v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Boolean(b) => Ok(*b),
            _ => Err(wrong(path, "bool", &v)),
        },
        Value::Object(_) => Err(wrong(path, "bool", &v)),
    }
}

/// A required Automerge counter. Plain integers are accepted too: a counter
/// that a peer reset with `put` is still a number the view can show.
pub(crate) fn req_counter<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, path: &str) -> Result<i64> {
    let v = lookup(doc, obj, key, path)?.ok_or_else(|| Error::schema(path, "missing"))?;
    match &v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Counter(_) | ScalarValue::Int(_) => {
                s.as_i64().ok_or_else(|| wrong(path, "counter", &v))
            }
            ScalarValue::Uint(u) => i64::try_from(*u).map_err(|_| wrong(path, "counter", &v)),
            _ => Err(wrong(path, "counter", &v)),
        },
        Value::Object(_) => Err(wrong(path, "counter", &v)),
    }
}

/// An optional nested map: absent or null gives `None`.
pub(crate) fn opt_map<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    key: &str,
    path: &str,
) -> Result<Option<ObjId>> {
    match doc
        .get(obj, key)
        .map_err(|e| Error::schema(path, format!("unreadable: {e}")))?
    {
        None => Ok(None),
        Some((Value::Scalar(s), _)) if s.is_null() => Ok(None),
        Some((Value::Object(ObjType::Map | ObjType::Table), id)) => Ok(Some(id)),
        Some((v, _)) => Err(wrong(path, "map", &v)),
    }
}

/// A required list.
pub(crate) fn req_list<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, path: &str) -> Result<ObjId> {
    match doc
        .get(obj, key)
        .map_err(|e| Error::schema(path, format!("unreadable: {e}")))?
    {
        None => Err(Error::schema(path, "missing")),
        Some((Value::Object(ObjType::List), id)) => Ok(id),
        Some((v, _)) => Err(wrong(path, "list", &v)),
    }
}

/// The element at `index` of a list, which must be a map.
pub(crate) fn list_map<D: ReadDoc>(
    doc: &D,
    list: &ObjId,
    index: usize,
    path: &str,
) -> Result<ObjId> {
    match doc
        .get(list, index)
        .map_err(|e| Error::schema(path, format!("unreadable: {e}")))?
    {
        None => Err(Error::schema(path, "missing")),
        Some((Value::Object(ObjType::Map | ObjType::Table), id)) => Ok(id),
        Some((v, _)) => Err(wrong(path, "map", &v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    #[test]
    fn names_and_text_are_checked() {
        assert!(check_name("p", "alice").is_ok());
        assert!(matches!(check_name("p", ""), Err(Error::Schema { path, .. }) if path == "p"));
        assert!(check_name("p", &"x".repeat(MAX_NAME_BYTES + 1)).is_err());
        assert!(check_name("p", "a\u{7}b").is_err());
        assert!(check_text("p", "two\nlines\tok", 64).is_ok());
    }

    #[test]
    fn typed_readers_report_the_path() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "f", f64::INFINITY).unwrap();
        doc.put(ROOT, "i", 3_i64).unwrap();
        doc.put(ROOT, "b", "yes").unwrap();
        doc.put(ROOT, "c", ScalarValue::counter(4)).unwrap();
        assert!(
            matches!(req_f64(&doc, &ROOT, "f", "x.f"), Err(Error::Schema { path, .. }) if path == "x.f")
        );
        assert_eq!(req_f64(&doc, &ROOT, "i", "x.i").unwrap(), 3.0);
        assert!(
            matches!(req_bool(&doc, &ROOT, "b", "x.b"), Err(Error::Schema { path, .. }) if path == "x.b")
        );
        assert_eq!(req_counter(&doc, &ROOT, "c", "x.c").unwrap(), 4);
        assert!(matches!(
            req_list(&doc, &ROOT, "i", "x.i"),
            Err(Error::Schema { .. })
        ));
        assert!(matches!(opt_map(&doc, &ROOT, "nope", "x"), Ok(None)));
    }
}
