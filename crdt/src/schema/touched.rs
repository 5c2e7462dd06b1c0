//! Which entries of a document's big collection map a set of changes wrote.
//!
//! The home document's keyring and the registry's entity map hold one entry per document
//! of the home, so reading either whole costs O(documents). Validating the whole view
//! after every remote change, or re-reading the keyring to find new keys, made syncing D
//! documents O(D^2). Validity of one entry depends only on that entry's subtree, so once a
//! document has validated, checking the rest of the view plus the entries that later
//! changes wrote is the same check as reading it all.
//!
//! The entries are found from the changes' operations: each operation names the object it
//! writes to, and Automerge knows that object's path from the root.

use std::collections::{BTreeSet, HashMap};

use automerge::legacy::{Key, ObjectId, OpId, OpType};
use automerge::{AutoCommit, Change, Prop, ReadDoc};

/// What some changes wrote under a collection map such as `home.keyring`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Touched {
    /// Only these entries (keys of the collection map); empty when nothing under it.
    Entries(BTreeSet<String>),
    /// The collection map itself or one of its ancestors, or something whose path could
    /// not be told: treat the whole collection as written.
    Everything,
}

impl Default for Touched {
    fn default() -> Self {
        Touched::Entries(BTreeSet::new())
    }
}

impl Touched {
    /// Adds what `other` names.
    pub fn merge(&mut self, other: Touched) {
        match (&mut *self, other) {
            (Touched::Everything, _) => {}
            (_, Touched::Everything) => *self = Touched::Everything,
            (Touched::Entries(mine), Touched::Entries(theirs)) => mine.extend(theirs),
        }
    }
}

/// Finds which entries of the map at `collection` (a path of map keys from the root)
/// the operations of `changes` wrote. The changes must already be applied to `doc`.
/// Never panics: anything Automerge cannot place makes the answer [`Touched::Everything`].
pub fn touched_entries(doc: &AutoCommit, changes: &[Change], collection: &[&str]) -> Touched {
    touched_entries_cached(doc, changes, collection, &mut PathCache::default())
}

/// Most object paths a [`PathCache`] keeps; past it, it starts again empty.
const PATH_CACHE_CAP: usize = 2048;

/// The paths of objects of one document, from earlier walks. An Automerge object never
/// moves (its parent and key are fixed when it is made), so a path once found stays
/// true; placing an object through the document costs a walk of its op set.
#[derive(Debug, Default)]
pub struct PathCache(HashMap<String, Option<Path>>);

/// [`touched_entries`], placing objects through `cache` first. `cache` must only ever be
/// used with the one document `doc`.
pub fn touched_entries_cached(
    doc: &AutoCommit,
    changes: &[Change],
    collection: &[&str],
    cache: &mut PathCache,
) -> Touched {
    if cache.0.len() > PATH_CACHE_CAP {
        cache.0.clear();
    }
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        walk(doc, changes, collection, &mut cache.0)
    }));
    found.unwrap_or(Touched::Everything)
}

fn walk(
    doc: &AutoCommit,
    changes: &[Change],
    collection: &[&str],
    paths: &mut HashMap<String, Option<Path>>,
) -> Touched {
    // Path (map keys, or None for a list index) from the root to each object written.
    let mut entries = BTreeSet::new();
    for change in changes {
        for op in change.decode().operations {
            let obj_path = match &op.obj {
                ObjectId::Root => Some(Vec::new()),
                ObjectId::Id(_) => {
                    let text = op.obj.to_string();
                    match paths.get(&text) {
                        Some(known) => known.clone(),
                        None => {
                            let found = path_of(doc, &text);
                            if found.is_some() {
                                paths.insert(text, found.clone());
                            }
                            found
                        }
                    }
                }
            };
            let Some(mut path) = obj_path else {
                return Touched::Everything;
            };
            path.push(match &op.key {
                Key::Map(k) => Some(k.to_string()),
                Key::Seq(_) => None,
            });
            let n = collection.len();
            let common = path.len().min(n);
            let on_the_way = path[..common]
                .iter()
                .zip(collection)
                .all(|(p, c)| p.as_deref() == Some(*c));
            if !on_the_way {
                continue;
            }
            if path.len() <= n {
                // Writes the collection map itself or an ancestor of it.
                return Touched::Everything;
            }
            match &path[n] {
                Some(entry) => {
                    entries.insert(entry.clone());
                }
                None => return Touched::Everything,
            }
        }
    }
    Touched::Entries(entries)
}

/// A path from the root: map keys, or `None` for a list position.
pub type Path = Vec<Option<String>>;

/// The path of every key or list position the operations of `changes` write, in order.
/// Objects are placed through `doc` (which need not hold `changes` yet) or, when made
/// by an earlier operation of `changes`, through that operation. `None` when some object
/// cannot be placed, so a caller that allows only some paths can refuse: an operation on
/// an object nobody can place could write anywhere. Never panics.
pub fn written_paths(doc: &AutoCommit, changes: &[Change]) -> Option<Vec<Path>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| paths(doc, changes)))
        .ok()
        .flatten()
}

fn paths(doc: &AutoCommit, changes: &[Change]) -> Option<Vec<Path>> {
    let mut placed: HashMap<String, Path> = HashMap::new();
    let mut out = Vec::new();
    for change in changes {
        let expanded = change.decode();
        let start = expanded.start_op.get();
        for (i, op) in expanded.operations.iter().enumerate() {
            let mut path = match &op.obj {
                ObjectId::Root => Vec::new(),
                ObjectId::Id(id) => {
                    let text = id.to_string();
                    match placed.get(&text) {
                        Some(p) => p.clone(),
                        None => {
                            let p = path_of(doc, &text)?;
                            placed.insert(text, p.clone());
                            p
                        }
                    }
                }
            };
            path.push(match &op.key {
                Key::Map(k) => Some(k.to_string()),
                Key::Seq(_) => None,
            });
            if matches!(op.action, OpType::Make(_)) {
                // Each operation of a change takes the next counter from its start.
                let counter = start.checked_add(u64::try_from(i).ok()?)?;
                let id = OpId::new(counter, &expanded.actor_id).to_string();
                placed.insert(id, path.clone());
            }
            out.push(path);
        }
    }
    Some(out)
}

/// The elements of the list at `list` (a path of map keys) that `changes` made or wrote
/// into, each a map still in the list, for checking only those. The changes must be
/// applied to `doc`. `None` when some write cannot be told to be one of those (an
/// object that cannot be placed, a value other than a map put into the list, a write
/// below an element's map): check the whole list then. Deleting elements is not a write
/// here. Never panics.
pub fn written_list_maps(
    doc: &AutoCommit,
    changes: &[Change],
    list: &[&str],
) -> Option<Vec<automerge::ObjId>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        list_maps(doc, changes, list)
    }))
    .ok()
    .flatten()
}

fn list_maps(doc: &AutoCommit, changes: &[Change], list: &[&str]) -> Option<Vec<automerge::ObjId>> {
    let is = |path: &[Option<String>], extra: usize| {
        path.len() == list.len() + extra
            && path.iter().zip(list).all(|(p, l)| p.as_deref() == Some(*l))
    };
    let mut paths: HashMap<String, Option<Vec<Option<String>>>> = HashMap::new();
    let mut elements: BTreeSet<String> = BTreeSet::new();
    for change in changes {
        let expanded = change.decode();
        let start = expanded.start_op.get();
        for (i, op) in expanded.operations.iter().enumerate() {
            let ObjectId::Id(_) = &op.obj else {
                continue;
            };
            let text = op.obj.to_string();
            let path = paths
                .entry(text.clone())
                .or_insert_with_key(|t| path_of(doc, t))
                .clone();
            let Some(path) = path else {
                // Not in the document now (deleted since), or not placeable.
                if elements.contains(&text) {
                    continue;
                }
                return None;
            };
            if is(&path, 0) {
                // The list itself: a new map element, or a deletion.
                match (&op.action, op.insert) {
                    (OpType::Make(automerge::ObjType::Map), true) => {
                        let counter = start.checked_add(u64::try_from(i).ok()?)?;
                        elements.insert(OpId::new(counter, &expanded.actor_id).to_string());
                    }
                    (OpType::Delete, false) => {}
                    _ => return None,
                }
            } else if is(&path, 1) && path[list.len()].is_none() {
                // A key of one element's map.
                if !matches!(op.action, OpType::Put(_) | OpType::Delete) {
                    return None;
                }
                elements.insert(text);
            } else if path.len() > list.len()
                && path.iter().zip(list).all(|(p, l)| p.as_deref() == Some(*l))
            {
                return None;
            }
        }
    }
    let mut out = Vec::with_capacity(elements.len());
    for text in elements {
        let Ok(obj) = doc.import_obj(&text) else {
            return None;
        };
        // A map made and deleted again is not in the list any more: nothing to check.
        match doc.parents(&obj).ok().map(|p| p.path()) {
            Some(p) if p.len() == list.len() + 1 => out.push(obj),
            Some(_) => return None,
            None => {}
        }
    }
    Some(out)
}

/// Deepest nesting of objects (maps, lists, texts) a document may reach from its root.
/// Every schema stays far below it (an entity's attributes, the deepest, are capped at 16
/// levels below two more); deeper objects only come from a hostile writer, and walking
/// them costs time and memory in the depth squared.
pub const MAX_OBJECT_DEPTH: usize = 32;

/// Refuses `changes` when an object they make would sit deeper than `max_depth` below the
/// root of `doc` (the changes not yet applied), or is made inside an object neither they
/// nor the document hold: one pass over their operations, whatever their order, and one
/// walk up from each object outside them that they make objects in, cut off at the cap.
/// Never panics.
pub fn check_nesting(doc: &AutoCommit, changes: &[Change], max_depth: usize) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        nesting(doc, changes, max_depth)
    }))
    .unwrap_or_else(|_| Err("changes whose objects cannot be placed".into()))
}

fn nesting(doc: &AutoCommit, changes: &[Change], max_depth: usize) -> Result<(), String> {
    // Every object the changes make, with the object it is made in, whatever order the
    // changes come in: a chain sent child first is measured like one sent parent first.
    let mut parent_of: HashMap<String, Option<String>> = HashMap::new();
    for change in changes {
        let expanded = change.decode();
        let start = expanded.start_op.get();
        for (i, op) in expanded.operations.iter().enumerate() {
            if !matches!(op.action, OpType::Make(_)) {
                continue;
            }
            let counter = u64::try_from(i)
                .ok()
                .and_then(|i| start.checked_add(i))
                .ok_or("an operation counter out of range")?;
            let parent = match &op.obj {
                ObjectId::Root => None,
                ObjectId::Id(id) => Some(id.to_string()),
            };
            parent_of.insert(OpId::new(counter, &expanded.actor_id).to_string(), parent);
        }
    }
    let too_deep = || format!("an object nested deeper than {max_depth} levels");
    let mut depth: HashMap<String, usize> = HashMap::new();
    for made in parent_of.keys() {
        // Walk up through the objects the changes make until one whose depth is known, the
        // root, or an object outside them; at most `max_depth + 1` steps.
        let mut chain: Vec<&String> = vec![made];
        let base = loop {
            let Some(current) = chain.last().copied() else {
                break 0;
            };
            if let Some(d) = depth.get(current) {
                chain.pop();
                break *d;
            }
            if chain.len() > max_depth + 1 {
                return Err(too_deep());
            }
            match parent_of.get(current) {
                Some(None) => break 0,
                Some(Some(parent)) => chain.push(parent),
                // Outside the changes: the document's own object, or none it holds (the
                // change that makes it is missing), which is refused for objects made in it.
                None => {
                    chain.pop();
                    break depth_in(doc, current, max_depth).unwrap_or(max_depth);
                }
            }
        };
        for (levels, obj) in chain.iter().rev().enumerate() {
            let d = base.saturating_add(levels + 1);
            if d > max_depth {
                return Err(too_deep());
            }
            depth.insert((*obj).clone(), d);
        }
    }
    Ok(())
}

/// How deep `obj_text` sits in `doc`, counting at most `cap + 1` levels; `None` when the
/// document holds no such object.
fn depth_in(doc: &AutoCommit, obj_text: &str, cap: usize) -> Option<usize> {
    let obj = doc.import_obj(obj_text).ok()?;
    let parents = doc.parents(&obj).ok()?;
    Some(parents.take(cap.saturating_add(1)).count())
}

fn path_of(doc: &AutoCommit, obj_text: &str) -> Option<Vec<Option<String>>> {
    let obj = doc.import_obj(obj_text).ok()?;
    let parents = doc.parents(&obj).ok()?;
    Some(
        parents
            .path()
            .into_iter()
            .map(|(_, prop)| match prop {
                Prop::Map(k) => Some(k),
                Prop::Seq(_) => None,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ROOT};

    fn new_changes(doc: &mut AutoCommit, since: &[automerge::ChangeHash]) -> Vec<Change> {
        doc.get_changes(since).into_iter().collect()
    }

    /// A cache of object paths answers as a fresh walk does, call after call.
    #[test]
    fn a_path_cache_answers_as_a_fresh_walk() {
        let mut doc = AutoCommit::new();
        let users = doc.put_object(ROOT, "users", ObjType::Map).unwrap();
        let ann = doc.put_object(&users, "ann", ObjType::Map).unwrap();
        let state = doc.put_object(&ann, "state", ObjType::Map).unwrap();
        let bob = doc.put_object(&users, "bob", ObjType::Map).unwrap();
        doc.commit();
        let mut cache = PathCache::default();
        for round in 0..3 {
            let before = doc.get_heads();
            doc.put(&state, format!("k{round}"), "v").unwrap();
            if round == 1 {
                doc.put(&bob, "x", 1).unwrap();
            }
            doc.commit();
            let changes = new_changes(&mut doc, &before);
            for path in [&["users"][..], &["users", "ann", "state"][..]] {
                let fresh = touched_entries(&doc, &changes, path);
                let cached = touched_entries_cached(&doc, &changes, path, &mut cache);
                assert_eq!(cached, fresh, "round {round}, {path:?}");
            }
        }
        assert!(!cache.0.is_empty());
        let before = doc.get_heads();
        doc.put(&state, "k9", "v").unwrap();
        doc.commit();
        let changes = new_changes(&mut doc, &before);
        assert_eq!(
            touched_entries_cached(&doc, &changes, &["users", "ann", "state"], &mut cache),
            Touched::Entries(["k9".to_string()].into())
        );
    }

    #[test]
    fn objects_nested_past_the_cap_are_refused_in_and_across_changes() {
        let nest = |doc: &mut AutoCommit, from: automerge::ObjId, levels: usize| {
            let mut obj = from;
            for _ in 0..levels {
                obj = doc.put_object(&obj, "m", ObjType::Map).unwrap();
            }
            obj
        };
        let mut doc = AutoCommit::new();
        let base = doc.get_heads();
        let deep = nest(&mut doc, ROOT, 20);
        let changes = new_changes(&mut doc, &base);
        let empty = AutoCommit::new();
        assert_eq!(check_nesting(&empty, &changes, 20), Ok(()));
        assert!(check_nesting(&empty, &changes, 19).is_err());
        // Applied, then deepened by a later change: the depth counts from the root.
        let mut holder = AutoCommit::new();
        holder.apply_changes(changes).unwrap();
        let seen = doc.get_heads();
        nest(&mut doc, deep, 5);
        let more = new_changes(&mut doc, &seen);
        assert_eq!(check_nesting(&holder, &more, 25), Ok(()));
        let err = check_nesting(&holder, &more, 24).unwrap_err();
        assert!(err.contains("deeper than 24"), "{err}");
        // One change per level, sent child first: measured the same.
        let mut chain = AutoCommit::new();
        let mut obj = ROOT;
        let mut each = Vec::new();
        for _ in 0..40 {
            let before = chain.get_heads();
            obj = chain.put_object(&obj, "m", ObjType::Map).unwrap();
            each.extend(new_changes(&mut chain, &before));
        }
        each.reverse();
        assert!(check_nesting(&empty, &each, 32).is_err());
        assert_eq!(check_nesting(&empty, &each, 40), Ok(()));
        // Objects made inside one that neither the changes nor the document hold.
        let orphans: Vec<Change> = each[..5].to_vec();
        assert!(check_nesting(&empty, &orphans, 40).is_err());
        // A text and a list count as levels too; scalars do not.
        let mut flat = AutoCommit::new();
        let before = flat.get_heads();
        let list = flat.put_object(ROOT, "l", ObjType::List).unwrap();
        flat.insert_object(&list, 0, ObjType::Text).unwrap();
        flat.put(ROOT, "x", 1).unwrap();
        let changes = new_changes(&mut flat, &before);
        assert_eq!(check_nesting(&empty, &changes, 2), Ok(()));
        assert!(check_nesting(&empty, &changes, 1).is_err());
    }

    #[test]
    fn finds_the_entries_written_and_flags_writes_above_them() {
        let mut doc = AutoCommit::new();
        let h = doc.put_object(ROOT, "home", ObjType::Map).unwrap();
        let k = doc.put_object(&h, "keyring", ObjType::Map).unwrap();
        doc.put(&h, "name", "x").unwrap();
        doc.commit();
        let start = doc.get_heads();
        let a = doc.put_object(&k, "docA", ObjType::Map).unwrap();
        let e = doc.put_object(&a, "epoch", ObjType::Map).unwrap();
        doc.put(&e, "peer", vec![1u8, 2]).unwrap();
        doc.commit();
        let mid = doc.get_heads();
        let b = doc.put_object(&k, "docB", ObjType::Map).unwrap();
        doc.put(&b, "x", 1).unwrap();
        doc.put(&h, "name", "y").unwrap();
        doc.commit();

        let changes = new_changes(&mut doc, &start);
        assert_eq!(
            touched_entries(&doc, &changes, &["home", "keyring"]),
            Touched::Entries(["docA".to_string(), "docB".to_string()].into())
        );
        // A nested write names its entry.
        doc.put(&e, "peer2", vec![3u8]).unwrap();
        doc.commit();
        let last = new_changes(&mut doc, &mid);
        assert_eq!(
            touched_entries(&doc, &last[1..], &["home", "keyring"]),
            Touched::Entries(["docA".to_string()].into())
        );
        // Replacing the collection itself touches everything.
        let before = doc.get_heads();
        doc.put_object(&h, "keyring", ObjType::Map).unwrap();
        doc.commit();
        let replaced = new_changes(&mut doc, &before);
        assert_eq!(
            touched_entries(&doc, &replaced, &["home", "keyring"]),
            Touched::Everything
        );
    }

    #[test]
    fn merge_widens() {
        let mut t = Touched::Entries(["a".to_string()].into());
        t.merge(Touched::Entries(["b".to_string()].into()));
        assert_eq!(t, Touched::Entries(["a".into(), "b".into()].into()));
        t.merge(Touched::Everything);
        assert_eq!(t, Touched::Everything);
    }
}
