//! An entity's history: its versions, reads as of any version, and restores.
//!
//! History is Automerge's own change graph. Every change is a version: the
//! document as its author had it right after writing, i.e. at heads
//! `[change]`. A version's id is the lowercase hex of the heads hash of those
//! heads ([`heads_hash`], the same hash digests and the API's `version` field
//! use), so the `version` an API write returns is the id of the change it
//! made. A document whose current state merges concurrent changes has
//! several heads; its current version id (from [`Engine::entity_version`])
//! is accepted by [`Engine::entity_at`] too, although it names no single
//! change and is not listed.
//!
//! Reads at a version go through [`AtHeads`], a [`ReadDoc`] whose every read
//! is Automerge's `*_at` form. The typed views and the conflict policies run
//! on it unchanged, so a version reads with the same validation, and the
//! same conflict resolution, as the live document.
//!
//! A restore writes the version's state and attributes as one new change,
//! which pushes and persists like any other write; history only grows.
//!
//! Listing versions does not walk the history. The engine keeps a
//! [`VersionLog`] per entity document: one entry per change, in the order the
//! document took them in, appended as changes land. A change's clock is read
//! from its own operations when it lands (the `updated_at` it wrote), or
//! inherited from its single parent; only the rest (changes loaded from disk,
//! merges) need a read of the document as of that change, which costs as much
//! as the key's whole history, and each such read is done once, on demand, and
//! kept. So the newest `limit` versions cost O(limit), and a
//! [`HistorySnapshot`] lets a caller do any remaining reads away from the
//! engine's owner.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, OnceLock};

use automerge::iter::{DocIter, Keys, ListRange, MapRange, Spans, Values};
use automerge::marks::{Mark, MarkSet};
use automerge::{
    ActorId, AutoCommit, AutomergeError, Change, ChangeHash, Cursor, CursorPosition, MoveCursor,
    ObjId, Parents, Prop, ROOT, ReadDoc, Stats, TextEncoding, Value,
};

use crate::digest::heads_hash;
use crate::engine::{Engine, Output};
use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::ids::DocId;
use crate::policy::{self, HomeLookup, ResolvedEntity};
use crate::schema::DocKind;
use crate::schema::entity::{self, ENTITY_KEY, Entity, EntityUpdate};
use crate::schema::room::expect_kind;

/// Shortest version prefix accepted (INTERFACES.md: 8 or more hex digits).
pub const MIN_VERSION_PREFIX: usize = 8;

/// Length of a full version id: 32 bytes in hex.
pub const VERSION_ID_LEN: usize = 64;

/// A [`ReadDoc`] fixed at some heads: every read is the `*_at` read of the
/// wrapped document. Explicit `*_at` calls keep the heads they are given.
#[derive(Clone, Copy, Debug)]
pub struct AtHeads<'a, D> {
    doc: &'a D,
    heads: &'a [ChangeHash],
}

impl<'a, D: ReadDoc> AtHeads<'a, D> {
    /// Views `doc` as it was at `heads`.
    pub fn new(doc: &'a D, heads: &'a [ChangeHash]) -> Self {
        Self { doc, heads }
    }

    /// The heads this view reads at.
    pub fn heads(&self) -> &[ChangeHash] {
        self.heads
    }
}

impl<D: ReadDoc> ReadDoc for AtHeads<'_, D> {
    fn parents<O: AsRef<ObjId>>(&self, obj: O) -> Result<Parents<'_>, AutomergeError> {
        self.doc.parents_at(obj, self.heads)
    }

    fn parents_at<O: AsRef<ObjId>>(
        &self,
        obj: O,
        heads: &[ChangeHash],
    ) -> Result<Parents<'_>, AutomergeError> {
        self.doc.parents_at(obj, heads)
    }

    fn keys<O: AsRef<ObjId>>(&self, obj: O) -> Keys<'_> {
        self.doc.keys_at(obj, self.heads)
    }

    fn keys_at<O: AsRef<ObjId>>(&self, obj: O, heads: &[ChangeHash]) -> Keys<'_> {
        self.doc.keys_at(obj, heads)
    }

    fn iter_at<O: AsRef<ObjId>>(&self, obj: O, heads: Option<&[ChangeHash]>) -> DocIter<'_> {
        self.doc.iter_at(obj, Some(heads.unwrap_or(self.heads)))
    }

    fn map_range<'b, O: AsRef<ObjId>, R: RangeBounds<String> + 'b>(
        &'b self,
        obj: O,
        range: R,
    ) -> MapRange<'b> {
        self.doc.map_range_at(obj, range, self.heads)
    }

    fn map_range_at<'b, O: AsRef<ObjId>, R: RangeBounds<String> + 'b>(
        &'b self,
        obj: O,
        range: R,
        heads: &[ChangeHash],
    ) -> MapRange<'b> {
        self.doc.map_range_at(obj, range, heads)
    }

    fn list_range<O: AsRef<ObjId>, R: RangeBounds<usize>>(
        &self,
        obj: O,
        range: R,
    ) -> ListRange<'_> {
        self.doc.list_range_at(obj, range, self.heads)
    }

    fn list_range_at<O: AsRef<ObjId>, R: RangeBounds<usize>>(
        &self,
        obj: O,
        range: R,
        heads: &[ChangeHash],
    ) -> ListRange<'_> {
        self.doc.list_range_at(obj, range, heads)
    }

    fn values<O: AsRef<ObjId>>(&self, obj: O) -> Values<'_> {
        self.doc.values_at(obj, self.heads)
    }

    fn values_at<O: AsRef<ObjId>>(&self, obj: O, heads: &[ChangeHash]) -> Values<'_> {
        self.doc.values_at(obj, heads)
    }

    fn length<O: AsRef<ObjId>>(&self, obj: O) -> usize {
        self.doc.length_at(obj, self.heads)
    }

    fn length_at<O: AsRef<ObjId>>(&self, obj: O, heads: &[ChangeHash]) -> usize {
        self.doc.length_at(obj, heads)
    }

    fn object_type<O: AsRef<ObjId>>(&self, obj: O) -> Result<automerge::ObjType, AutomergeError> {
        self.doc.object_type(obj)
    }

    fn marks<O: AsRef<ObjId>>(&self, obj: O) -> Result<Vec<Mark>, AutomergeError> {
        self.doc.marks_at(obj, self.heads)
    }

    fn marks_at<O: AsRef<ObjId>>(
        &self,
        obj: O,
        heads: &[ChangeHash],
    ) -> Result<Vec<Mark>, AutomergeError> {
        self.doc.marks_at(obj, heads)
    }

    fn get_marks<O: AsRef<ObjId>>(
        &self,
        obj: O,
        index: usize,
        heads: Option<&[ChangeHash]>,
    ) -> Result<MarkSet, AutomergeError> {
        self.doc
            .get_marks(obj, index, Some(heads.unwrap_or(self.heads)))
    }

    fn text<O: AsRef<ObjId>>(&self, obj: O) -> Result<String, AutomergeError> {
        self.doc.text_at(obj, self.heads)
    }

    fn text_at<O: AsRef<ObjId>>(
        &self,
        obj: O,
        heads: &[ChangeHash],
    ) -> Result<String, AutomergeError> {
        self.doc.text_at(obj, heads)
    }

    fn spans<O: AsRef<ObjId>>(&self, obj: O) -> Result<Spans<'_>, AutomergeError> {
        self.doc.spans_at(obj, self.heads)
    }

    fn spans_at<O: AsRef<ObjId>>(
        &self,
        obj: O,
        heads: &[ChangeHash],
    ) -> Result<Spans<'_>, AutomergeError> {
        self.doc.spans_at(obj, heads)
    }

    fn get_cursor<O: AsRef<ObjId>, I: Into<CursorPosition>>(
        &self,
        obj: O,
        position: I,
        at: Option<&[ChangeHash]>,
    ) -> Result<Cursor, AutomergeError> {
        self.doc
            .get_cursor(obj, position, Some(at.unwrap_or(self.heads)))
    }

    fn get_cursor_moving<O: AsRef<ObjId>, I: Into<CursorPosition>>(
        &self,
        obj: O,
        position: I,
        at: Option<&[ChangeHash]>,
        move_cursor: MoveCursor,
    ) -> Result<Cursor, AutomergeError> {
        self.doc
            .get_cursor_moving(obj, position, Some(at.unwrap_or(self.heads)), move_cursor)
    }

    fn get_cursor_position<O: AsRef<ObjId>>(
        &self,
        obj: O,
        cursor: &Cursor,
        at: Option<&[ChangeHash]>,
    ) -> Result<usize, AutomergeError> {
        self.doc
            .get_cursor_position(obj, cursor, Some(at.unwrap_or(self.heads)))
    }

    fn get<O: AsRef<ObjId>, P: Into<Prop>>(
        &self,
        obj: O,
        prop: P,
    ) -> Result<Option<(Value<'_>, ObjId)>, AutomergeError> {
        self.doc.get_at(obj, prop, self.heads)
    }

    fn get_at<O: AsRef<ObjId>, P: Into<Prop>>(
        &self,
        obj: O,
        prop: P,
        heads: &[ChangeHash],
    ) -> Result<Option<(Value<'_>, ObjId)>, AutomergeError> {
        self.doc.get_at(obj, prop, heads)
    }

    fn hydrate<O: AsRef<ObjId>>(
        &self,
        obj: O,
        heads: Option<&[ChangeHash]>,
    ) -> Result<automerge::hydrate::Value, AutomergeError> {
        self.doc.hydrate(obj, Some(heads.unwrap_or(self.heads)))
    }

    fn get_all<O: AsRef<ObjId>, P: Into<Prop>>(
        &self,
        obj: O,
        prop: P,
    ) -> Result<Vec<(Value<'_>, ObjId)>, AutomergeError> {
        self.doc.get_all_at(obj, prop, self.heads)
    }

    fn get_all_at<O: AsRef<ObjId>, P: Into<Prop>>(
        &self,
        obj: O,
        prop: P,
        heads: &[ChangeHash],
    ) -> Result<Vec<(Value<'_>, ObjId)>, AutomergeError> {
        self.doc.get_all_at(obj, prop, heads)
    }

    fn get_missing_deps(&self, heads: &[ChangeHash]) -> Vec<ChangeHash> {
        self.doc.get_missing_deps(heads)
    }

    fn get_change_by_hash(&self, hash: &ChangeHash) -> Option<Change> {
        self.doc.get_change_by_hash(hash)
    }

    fn stats(&self) -> Stats {
        self.doc.stats()
    }

    fn text_encoding(&self) -> TextEncoding {
        self.doc.text_encoding()
    }
}

/// One version of an entity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Version id: hex of the heads hash of `heads`.
    pub id: String,
    /// Heads of this version: the one change that made it.
    pub heads: Vec<ChangeHash>,
    /// The entity's `updated_at` as of this version (for a change that wrote
    /// no `updated_at`, the change's own second-resolution time).
    pub at: Hlc,
    /// Actor (device) that wrote the change.
    pub actor: ActorId,
    /// Home of that device, when the caller's mapping knows it.
    pub home: Option<String>,
}

/// Hex of the heads hash of `heads`: a version id.
pub fn version_id(heads: &[ChangeHash]) -> String {
    hex(&heads_hash(heads))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Checks a version id or prefix and returns it in lowercase.
fn normalise_prefix(version: &str) -> Result<String> {
    let bad = |reason| Error::Version {
        version: version.chars().take(VERSION_ID_LEN + 1).collect(),
        reason,
    };
    if version.len() < MIN_VERSION_PREFIX {
        return Err(bad("a version id needs at least 8 hex digits"));
    }
    if version.len() > VERSION_ID_LEN {
        return Err(bad("a version id has at most 64 hex digits"));
    }
    if !version.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("a version id is hex digits only"));
    }
    Ok(version.to_ascii_lowercase())
}

/// The entity's `updated_at` as of `heads`: the clock a change stamped on
/// the entity when `heads` is that one change. `None` when no valid clock is
/// recorded there.
pub(crate) fn hlc_at<D: ReadDoc>(doc: &D, heads: &[ChangeHash]) -> Option<Hlc> {
    #[cfg(test)]
    VERSION_READS.with(|n| n.set(n.get() + 1));
    doc.get_at(ROOT, ENTITY_KEY, heads)
        .ok()
        .flatten()
        .and_then(|(_, e)| doc.get_all_at(&e, "updated_at", heads).ok())
        .into_iter()
        .flatten()
        .filter_map(|(v, id)| entity::stamp_from_value(&v, &id))
        .max()
}

/// What the log keeps about one change.
#[derive(Debug)]
pub(crate) struct VersionEntry {
    hash: ChangeHash,
    actor: ActorId,
    /// The change's own second-resolution time, the clock's fallback.
    timestamp: i64,
    /// The entity's `updated_at` as of this change, once known. Written at
    /// most once, possibly by a reader on another thread; the value as of a
    /// change never changes.
    at: OnceLock<Hlc>,
}

impl VersionEntry {
    fn fallback(&self) -> Hlc {
        Hlc {
            wall_ms: u64::try_from(self.timestamp)
                .unwrap_or(0)
                .saturating_mul(1000),
            counter: 0,
            actor: policy::actor_array(&self.actor),
        }
    }
}

/// Every change of an entity document, oldest first, with what a version
/// listing needs; kept by the engine beside the document (see the module
/// overview).
#[derive(Debug, Default)]
pub(crate) struct VersionLog {
    entries: Vec<Arc<VersionEntry>>,
    /// Each change by its version id, so a version is found by prefix
    /// without going over the history.
    by_id: BTreeMap<[u8; 32], ChangeHash>,
    /// The document's heads when the log last caught up.
    covered: Vec<ChangeHash>,
}

#[cfg(test)]
thread_local! {
    /// Reads of a document as of one change, counted for tests.
    static VERSION_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl VersionLog {
    /// Number of changes logged.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The log of every change in `doc`, with the clocks the changes wrote.
    /// One pass over the document's operations: done where a document loads,
    /// off the engine's owner.
    pub(crate) fn build(doc: &mut AutoCommit) -> Self {
        let mut log = Self::default();
        let changes = doc.get_changes(&[]);
        log.catch_up(doc, &changes);
        log
    }

    /// Appends the changes `doc` took in since the log last caught up.
    /// `fresh` are changes just applied, if the caller has them parsed: their
    /// clocks are read from their own operations.
    pub(crate) fn catch_up(&mut self, doc: &mut AutoCommit, fresh: &[Change]) {
        let heads = doc.get_heads();
        if heads == self.covered {
            return;
        }
        let metas: Vec<(ChangeHash, ActorId, i64, Vec<ChangeHash>)> = doc
            .get_changes_meta(&self.covered)
            .into_iter()
            .map(|m| (m.hash, m.actor.into_owned(), m.timestamp, m.deps))
            .collect();
        let entity = doc.get(ROOT, ENTITY_KEY).ok().flatten().map(|(_, id)| id);
        let fresh: HashMap<ChangeHash, &Change> = fresh.iter().map(|c| (c.hash(), c)).collect();
        // Clocks of this batch and of the newest entry, for inheriting.
        let mut known: HashMap<ChangeHash, Hlc> = HashMap::new();
        if let Some(last) = self.entries.last()
            && let Some(at) = last.at.get()
        {
            known.insert(last.hash, *at);
        }
        for (hash, actor, timestamp, deps) in metas {
            let written = match (fresh.get(&hash), &entity) {
                (Some(change), Some(entity)) => written_at(change, entity),
                _ => None,
            };
            // A change that wrote no clock reads as its one parent did; a
            // merge's clock is left to be read from the document.
            let at = written.or_else(|| match (fresh.contains_key(&hash), &deps[..]) {
                (true, [dep]) => known.get(dep).copied(),
                _ => None,
            });
            let cell = OnceLock::new();
            if let Some(at) = at {
                known.insert(hash, at);
                let _ = cell.set(at);
            }
            self.by_id.insert(heads_hash(&[hash]), hash);
            self.entries.push(Arc::new(VersionEntry {
                hash,
                actor,
                timestamp,
                at: cell,
            }));
        }
        self.covered = heads;
    }
}

/// The `updated_at` clocks a change wrote into the entity map, the newest.
/// Map puts replace every value they saw, so this is the entity's clock as of
/// that change.
fn written_at(change: &Change, entity: &ObjId) -> Option<Hlc> {
    use automerge::legacy::{Key, ObjectId, OpId, OpType};
    let ObjId::Id(counter, actor, _) = entity else {
        return None;
    };
    change
        .decode()
        .operations
        .iter()
        .filter(|op| {
            matches!(&op.obj, ObjectId::Id(OpId(c, a)) if c == counter && a == actor)
                && matches!(&op.key, Key::Map(k) if k == "updated_at")
        })
        .filter_map(|op| match &op.action {
            OpType::Put(value) => entity::stamp_from_scalar(value, change.actor_id()),
            _ => None,
        })
        .max()
}

/// The newest versions of an entity, as taken from the engine: what a listing
/// needs, detached from the engine so it can be finished on another thread.
#[derive(Debug)]
pub struct HistorySnapshot {
    entries: Vec<Arc<VersionEntry>>,
    /// A copy of the document, only when some entry's clock is still unread.
    doc: Option<AutoCommit>,
    homes: policy::ActorHomes,
}

impl HistorySnapshot {
    /// Whether finishing reads the document (some clocks are not known yet).
    pub fn reads_document(&self) -> bool {
        self.doc.is_some()
    }

    /// The actors that wrote the versions it holds.
    pub fn actors(&self) -> impl Iterator<Item = &ActorId> {
        self.entries.iter().map(|e| &e.actor)
    }

    /// The versions, oldest first. Clocks read from the document here are
    /// kept in the engine's log too, so each is read once.
    pub fn versions(self) -> Vec<Version> {
        let Self {
            entries,
            doc,
            homes,
        } = self;
        entries
            .into_iter()
            .map(|e| {
                let heads = vec![e.hash];
                let at = *e.at.get_or_init(|| {
                    doc.as_ref()
                        .and_then(|d| hlc_at(d, &heads))
                        .unwrap_or_else(|| e.fallback())
                });
                Version {
                    id: version_id(&heads),
                    at,
                    home: homes.home_of(&e.actor),
                    actor: e.actor.clone(),
                    heads,
                }
            })
            .collect()
    }
}

/// Every change of `doc` as a version, oldest first, each clock read from the
/// document: the listing the log replaces, kept to check it against.
#[cfg(test)]
fn all_versions(doc: &mut AutoCommit, homes: &impl HomeLookup) -> Vec<Version> {
    let metas: Vec<(ChangeHash, ActorId, i64)> = doc
        .get_changes_meta(&[])
        .into_iter()
        .map(|m| (m.hash, m.actor.into_owned(), m.timestamp))
        .collect();
    metas
        .into_iter()
        .map(|(hash, actor, timestamp)| {
            let heads = vec![hash];
            let fallback = u64::try_from(timestamp).unwrap_or(0).saturating_mul(1000);
            Version {
                id: version_id(&heads),
                at: hlc_at(&*doc, &heads).unwrap_or(Hlc {
                    wall_ms: fallback,
                    counter: 0,
                    actor: policy::actor_array(&actor),
                }),
                home: homes.home_of(&actor),
                actor,
                heads,
            }
        })
        .collect()
}

impl VersionLog {
    /// The heads named by a version id or unique prefix: one change of the
    /// log, or `current` (the document's heads, which the log must cover).
    /// A range of the id index, not a pass over the history.
    fn find(&self, current: &[ChangeHash], version: &str) -> Result<Vec<ChangeHash>> {
        let prefix = normalise_prefix(version)?;
        // The smallest id the prefix allows: the prefix with zeros after it.
        let mut low = [0u8; 32];
        for (i, digit) in prefix.bytes().enumerate() {
            let nibble = match digit {
                b'0'..=b'9' => digit - b'0',
                _ => digit - b'a' + 10,
            };
            low[i / 2] |= if i % 2 == 0 { nibble << 4 } else { nibble };
        }
        let mut candidates: Vec<Vec<ChangeHash>> = self
            .by_id
            .range(low..)
            .take_while(|(id, _)| hex(&id[..]).starts_with(&prefix))
            // Two are enough to know the prefix is ambiguous.
            .take(2)
            .map(|(_, hash)| vec![*hash])
            .collect();
        if version_id(current).starts_with(&prefix) {
            candidates.push(current.to_vec());
        }
        // The current heads of a linear history are its last change: the
        // same version, found twice.
        candidates.dedup();
        match &candidates[..] {
            [heads] => Ok(heads.clone()),
            [] => Err(Error::Version {
                version: version.to_string(),
                reason: "no such version of this document",
            }),
            _ => Err(Error::Version {
                version: version.to_string(),
                reason: "prefix matches more than one version",
            }),
        }
    }
}

/// An entity's document as of one version, detached from the engine so the
/// read (which walks the history of every key it reads) can run on another
/// thread; see [`Engine::version_read`].
#[derive(Debug)]
pub struct VersionRead {
    doc: AutoCommit,
    heads: Vec<ChangeHash>,
    homes: policy::ActorHomes,
}

impl VersionRead {
    /// The heads of the version.
    pub fn heads(&self) -> &[ChangeHash] {
        &self.heads
    }

    /// The entity as of the version, with conflicts resolved as they stood then.
    pub fn resolve(&self) -> Result<ResolvedEntity> {
        policy::resolve_at(&self.doc, Some(&self.heads), &self.homes)
    }
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// The id of the entity's current version.
    pub fn entity_version(&mut self, id: DocId) -> Result<String> {
        Ok(version_id(&self.heads(id)?))
    }

    /// The newest `limit` versions of an entity, oldest first.
    pub fn entity_history(&mut self, id: DocId, limit: usize) -> Result<Vec<Version>> {
        Ok(self.history_snapshot(id, limit)?.versions())
    }

    /// What [`Engine::entity_history`] needs, taken in O(`limit`) (plus a
    /// copy of the document when a clock in range is still unread), to be
    /// finished with [`HistorySnapshot::versions`] on any thread.
    pub fn history_snapshot(&mut self, id: DocId, limit: usize) -> Result<HistorySnapshot> {
        expect_kind(self, id, DocKind::Entity)?;
        let homes = self.homes.clone();
        let (log, doc) = self.version_log(id)?;
        let skip = log.entries.len().saturating_sub(limit);
        let entries = log.entries[skip..].to_vec();
        let doc = entries
            .iter()
            .any(|e| e.at.get().is_none())
            .then(|| doc.fork());
        Ok(HistorySnapshot {
            entries,
            doc,
            homes,
        })
    }

    /// Finds `version` (an id or a unique prefix of 8 or more hex digits) in
    /// the entity's version log and takes a copy of the document to read it
    /// at, with [`VersionRead::resolve`], on any thread.
    pub fn version_read(&mut self, id: DocId, version: &str) -> Result<VersionRead> {
        expect_kind(self, id, DocKind::Entity)?;
        let homes = self.homes.clone();
        let (log, doc) = self.version_log(id)?;
        let heads = log.find(&doc.get_heads(), version)?;
        Ok(VersionRead {
            doc: doc.fork(),
            heads,
            homes,
        })
    }

    /// The entity as of `version` (an id or a unique prefix of 8 or more hex
    /// digits), with conflicts resolved as they stood then.
    pub fn entity_at(&mut self, id: DocId, version: &str) -> Result<ResolvedEntity> {
        self.version_read(id, version)?.resolve()
    }

    /// Writes the entity's state and attributes as of `version` as a new
    /// change, and returns the entity as it now reads.
    pub fn restore_entity(
        &mut self,
        id: DocId,
        version: &str,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<(ResolvedEntity, Vec<Output<P>>)> {
        let target = self.entity_at(id, version)?.entity;
        self.write_restored(id, target, now_ms, correlation_id)
    }

    /// Writes `target` (the entity as an older version had it, e.g. from
    /// [`VersionRead::resolve`]) as a new change: its state and attributes,
    /// every conflicted field settled. Returns the entity as it now reads.
    pub fn write_restored(
        &mut self,
        id: DocId,
        target: Entity,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<(ResolvedEntity, Vec<Output<P>>)> {
        expect_kind(self, id, DocKind::Entity)?;
        let update = EntityUpdate {
            state: target.state,
            attributes: Some(target.attributes),
        };
        let (_, out) = self.transact(id, now_ms, correlation_id, |doc, at, by| {
            policy::write_settled(doc, &update, None, at, by)
        })?;
        Ok((self.resolved_entity(id)?, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness_docs::Cluster;
    use crate::policy::Policy;
    use serde_json::json;

    const DOC: DocId = DocId::from_bytes([31; 16]);

    fn update(state: &str, level: i64) -> EntityUpdate {
        EntityUpdate {
            state: state.into(),
            attributes: json!({ "level": level }).as_object().cloned(),
        }
    }

    fn cluster() -> Cluster {
        let mut c = Cluster::new(&["home-1", "home-2"]);
        c.share_entity(DOC, Policy::LatestWins);
        c
    }

    #[test]
    fn versions_read_back_and_restore_as_a_new_change() {
        let mut c = cluster();
        c.write(0, DOC, &update("on", 10), 100);
        c.settle();
        let dim_ms = c.now_ms + 200;
        c.write(1, DOC, &update("dim", 20), 200);
        c.settle();
        let versions = c.nodes[0].entity_history(DOC, usize::MAX).unwrap();
        // Creation, the policy, and the two writes.
        assert_eq!(versions.len(), 4);
        assert_eq!(
            versions,
            c.nodes[1].entity_history(DOC, usize::MAX).unwrap()
        );
        for v in &versions {
            assert_eq!(v.id.len(), VERSION_ID_LEN);
            assert_eq!(v.id, version_id(&v.heads));
        }
        let on = &versions[2];
        let dim = &versions[3];
        assert_eq!(on.actor, crate::ids::actor_for_peer(b"peer-0"));
        assert_eq!(on.home.as_deref(), Some("home-1"));
        assert_eq!(dim.home.as_deref(), Some("home-2"));
        assert!(on.at < dim.at);
        assert_eq!(dim.at.wall_ms, dim_ms, "the clock the write stamped");
        assert_eq!(
            c.nodes[0].entity_version(DOC).unwrap(),
            dim.id,
            "current = newest"
        );
        assert_eq!(c.nodes[0].entity_history(DOC, 2).unwrap(), versions[2..]);

        // Read as of a version, by an 8-digit prefix (any case).
        let past = c.nodes[1]
            .entity_at(DOC, &on.id[..8].to_uppercase())
            .unwrap();
        assert_eq!(past.entity.state, "on");
        assert_eq!(past.entity.attributes["level"], json!(10));
        assert_eq!(past.entity.updated_at, on.at);
        let first = c.nodes[1].entity_at(DOC, &versions[0].id).unwrap();
        assert_eq!(first.entity.state, "off");

        // Restore: a new change that pushes like any write.
        let before = c.nodes[1].heads(DOC).unwrap();
        let (restored, out) = c.nodes[1]
            .restore_entity(DOC, &on.id, c.now_ms + 300, Some("undo".into()))
            .unwrap();
        assert_eq!(restored.entity.state, "on");
        assert_eq!(restored.entity.attributes["level"], json!(10));
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Send { peer: 0, .. }))
        );
        assert_ne!(c.nodes[1].heads(DOC).unwrap(), before);
        c.absorb(1, out);
        c.settle();
        let e0 = c.nodes[0].entity(DOC).unwrap();
        assert_eq!(
            (e0.state.as_str(), &e0.attributes["level"]),
            ("on", &json!(10))
        );
        assert_eq!(e0.updated_by, crate::ids::actor_for_peer(b"peer-1"));
        let after = c.nodes[0].entity_history(DOC, usize::MAX).unwrap();
        assert_eq!(after.len(), 5, "history only grows");
        assert_eq!(after[..4], versions[..]);
        // The restored-over version is still there to go back to.
        let again = c.nodes[0].entity_at(DOC, &dim.id).unwrap();
        assert_eq!(again.entity.state, "dim");
    }

    #[test]
    fn restoring_settles_conflicts_and_merged_versions_are_readable() {
        let mut c = cluster();
        c.write(0, DOC, &update("a", 1), 10);
        c.write(1, DOC, &update("b", 2), 20);
        c.settle();
        // Two heads: the current version is a merge of both writes.
        assert_eq!(c.nodes[0].heads(DOC).unwrap().len(), 2);
        let merged = c.nodes[0].entity_version(DOC).unwrap();
        let listed = c.nodes[0].entity_history(DOC, usize::MAX).unwrap();
        assert!(listed.iter().all(|v| v.id != merged));
        let now = c.nodes[0].entity_at(DOC, &merged).unwrap();
        assert_eq!(now.entity.state, "b");
        assert_eq!(now.conflicts.len(), 2);
        // Back to node 0's own write: every conflicted field is rewritten.
        let a = listed
            .iter()
            .rev()
            .find(|v| v.actor == crate::ids::actor_for_peer(b"peer-0"))
            .unwrap();
        assert_eq!(c.nodes[0].entity_at(DOC, &a.id).unwrap().entity.state, "a");
        let (restored, out) = c.nodes[1]
            .restore_entity(DOC, &a.id, c.now_ms + 50, None)
            .unwrap();
        c.absorb(1, out);
        c.settle();
        assert_eq!(restored.entity.state, "a");
        assert!(restored.conflicts.is_empty());
        assert_eq!(c.nodes[0].resolved_entity(DOC).unwrap(), restored);
    }

    fn version_reads() -> u64 {
        VERSION_READS.with(|n| n.get())
    }

    /// What the listing was before the log: every clock read from the document.
    fn reference(c: &mut Cluster, node: usize) -> Vec<Version> {
        let homes = c.nodes[node].homes.clone();
        all_versions(c.nodes[node].doc_for_read_mut(DOC).unwrap(), &homes)
    }

    #[test]
    fn the_newest_versions_cost_what_they_return_not_the_history() {
        let mut c = cluster();
        // Writes from both nodes, some concurrent (merges), most in turn.
        for i in 0..200i64 {
            let node = usize::try_from(i % 2).unwrap();
            c.write(
                node,
                DOC,
                &update(if i % 3 == 0 { "on" } else { "off" }, i),
                1,
            );
            if i % 10 != 0 {
                c.settle();
            }
            c.now_ms += 5;
        }
        c.settle();
        for node in 0..2 {
            let before = version_reads();
            let newest = c.nodes[node].entity_history(DOC, 1).unwrap();
            assert_eq!(
                version_reads() - before,
                0,
                "the newest change's clock is known from its own operations"
            );
            let all = reference(&mut c, node);
            assert!(all.len() > 200);
            assert_eq!(newest[..], all[all.len() - 1..]);
            assert_eq!(c.nodes[node].entity_history(DOC, usize::MAX).unwrap(), all);
        }

        // A document loaded from disk has its clocks from its changes' own
        // operations too.
        let saved = c.nodes[0].doc_for_read_mut(DOC).unwrap().save();
        c.nodes[0].load_document(DOC, &[saved]).unwrap();
        let all = reference(&mut c, 0);
        let before = version_reads();
        assert_eq!(c.nodes[0].entity_history(DOC, usize::MAX).unwrap(), all);
        assert_eq!(version_reads() - before, 0);

        // A clock not known that way is read from the document as of that
        // change, only for the versions listed, and once.
        let homes = c.nodes[0].homes.clone();
        let doc = c.nodes[0].doc_for_read_mut(DOC).unwrap();
        let mut log = VersionLog::default();
        log.catch_up(doc, &[]);
        let snapshot = |log: &VersionLog, doc: &mut AutoCommit| HistorySnapshot {
            entries: log.entries[log.entries.len() - 2..].to_vec(),
            doc: Some(doc.fork()),
            homes: homes.clone(),
        };
        let before = version_reads();
        assert_eq!(snapshot(&log, doc).versions()[..], all[all.len() - 2..]);
        assert_eq!(version_reads() - before, 2);
        assert_eq!(snapshot(&log, doc).versions()[..], all[all.len() - 2..]);
        assert_eq!(version_reads() - before, 2, "each clock is read once");

        // Changes after the load are listed as they land.
        c.write(0, DOC, &update("dim", 7), 10);
        let before = version_reads();
        let newest = c.nodes[0].entity_history(DOC, 1).unwrap();
        assert_eq!(version_reads() - before, 0);
        assert_eq!(newest[0].at.wall_ms, c.now_ms + 10);
        assert_eq!(newest, reference(&mut c, 0)[all.len()..]);
    }

    #[test]
    fn versions_are_found_by_any_prefix_from_the_log() {
        let mut c = cluster();
        for i in 0..40 {
            c.write(0, DOC, &update("on", i), 10);
        }
        let homes = c.nodes[0].homes.clone();
        let doc = c.nodes[0].doc_for_read_mut(DOC).unwrap();
        let all = all_versions(doc, &homes);
        let mut log = VersionLog::default();
        log.catch_up(doc, &[]);
        let current = doc.get_heads();
        for v in &all {
            for len in [8, 9, 13, VERSION_ID_LEN] {
                assert_eq!(log.find(&current, &v.id[..len]).unwrap(), v.heads);
            }
        }
        // A prefix two ids share names neither; one digit more tells them apart.
        let mut twins = VersionLog::default();
        let (x, y) = ([0xab; 32], {
            let mut y = [0xab; 32];
            y[5] = 0xac;
            y
        });
        twins.by_id.insert(x, ChangeHash([1; 32]));
        twins.by_id.insert(y, ChangeHash([2; 32]));
        assert!(matches!(
            twins.find(&current, &hex(&x)[..10]),
            Err(Error::Version { reason, .. }) if reason.contains("more than one")
        ));
        assert_eq!(
            twins.find(&current, &hex(&y)[..12]).unwrap(),
            [ChangeHash([2; 32])]
        );
        assert!(matches!(
            log.find(&current, &"f".repeat(VERSION_ID_LEN)),
            Err(Error::Version { reason, .. }) if reason.contains("no such")
        ));
    }

    #[test]
    fn bad_version_ids_are_error_values() {
        let mut c = cluster();
        for (bad, reason) in [
            ("abc", "at least 8"),
            ("zzzzzzzz", "hex digits only"),
            (&"a".repeat(65)[..], "at most 64"),
            ("00000000", "no such version"),
        ] {
            match c.nodes[0].entity_at(DOC, bad) {
                Err(Error::Version { reason: r, .. }) => assert!(r.contains(reason), "{bad}: {r}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let now = c.now_ms;
        assert!(matches!(
            c.nodes[0].restore_entity(DOC, "00000000", now, None),
            Err(Error::Version { .. })
        ));
        assert!(matches!(
            c.nodes[0].entity_history(DocId::from_bytes([1; 16]), 5),
            Err(Error::UnknownDocument(_))
        ));
    }

    #[test]
    fn typed_views_read_through_at_heads() {
        let mut c = cluster();
        let heads = c.nodes[0].heads(DOC).unwrap();
        c.write(0, DOC, &update("on", 3), 10);
        let doc = c.nodes[0].doc(DOC).unwrap();
        let then = Entity::read(&AtHeads::new(doc, &heads)).unwrap();
        assert_eq!(then.state, "off");
        assert!(then.attributes.is_empty());
        assert_eq!(Entity::read(doc).unwrap().state, "on");
        assert_eq!(AtHeads::new(doc, &heads).heads(), &heads[..]);
    }
}
