//! Generations of an entity document: how a document's history stays bounded.
//!
//! Automerge keeps every operation ever written to a map key, and reads, writes and
//! applies on that key walk them all. So past a threshold the owner home's cutting
//! device starts a new *generation*: a fresh document (a new [`DocId`]) that holds the
//! entity as its policy shows it, and a record of the generation it replaces. That
//! record, under the root key `generation`, is written once, in the new document's
//! first change, by the device that cuts:
//!
//! | key | type |
//! | --- | --- |
//! | `number` | uint, 1 for the first cut |
//! | `prev` | string, the replaced document's id |
//! | `prev_heads` | string, its heads at the cut (hex, comma separated) |
//! | `prev_clock` | map actor hex -> uint: per writer, the last change the cut covers |
//! | `field_clocks` | map field -> HLC text: when each field's value was written |
//! | `cut_at` | uint, wall-clock ms |
//! | `moved` | map actor hex -> uint ms: devices that moved here (each writes its own) |
//! | `carried` | map change hash hex -> true: changes of `prev` carried over |
//!
//! The writer of a record is the actor of the operations that wrote it, which a
//! device cannot claim falsely (actors derive from PeerIds); every fixed field must
//! have one value by that one actor, or the record is refused. Its sizes are capped
//! before anything is read in full.
//!
//! Every writer's changes are numbered in sequence, so the changes a cut covers (the
//! ancestors of its heads) are exactly those whose sequence number is at most the
//! writer's entry in `prev_clock`. A device that moves finds the changes of the old
//! generation the cut did not cover (written concurrently with it, or by a device that
//! had not seen it yet) and carries them over as a fresh write ([`Engine::move_to_generation`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, Change, ChangeHash, ObjId, ObjType, ROOT, ReadDoc};
use serde_json::Value as Json;

use super::{Engine, Output, secs};
use crate::error::{Error, Result};
use crate::history::{AtHeads, hlc_at};
use crate::hlc::Hlc;
use crate::ids::{DocId, KeyEpoch};
use crate::policy::{self, Policy, ResolvedEntity};
use crate::schema::entity::{ENTITY_KEY, Entity, put_json};
use crate::schema::touched::{Touched, touched_entries};
use crate::schema::{DocKind, Header, am, ensure_map};

/// Root key of the generation record.
pub const GENERATION_KEY: &str = "generation";

/// Most heads a cut records. A document with more concurrent heads is cut later,
/// once a write has merged them.
pub const MAX_PREV_HEADS: usize = 64;

/// Most writers a cut's clock names (this home's devices and its grantees' are far
/// fewer); a record naming more is refused.
pub const MAX_CLOCK_ACTORS: usize = 256;

/// Most field clocks a record holds (one per top-level attribute, and the state).
pub const MAX_FIELD_CLOCKS: usize = 4097;

/// Most `moved` entries read.
pub const MAX_MOVED: usize = 1024;

/// Most changes one move carries over; the rest wait for the next one.
pub const MAX_CARRY: usize = 4096;

/// The generation record of a document, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// 1 for the first cut, then one more per cut.
    pub number: u64,
    /// The generation this one replaces.
    pub prev: DocId,
    /// Its heads when it was cut.
    pub prev_heads: Vec<ChangeHash>,
    /// Per writer, the sequence number of its last change the cut covers.
    pub prev_clock: BTreeMap<ActorId, u64>,
    /// When each field's value (`state`, `attributes.<key>`) was written.
    pub field_clocks: BTreeMap<String, Hlc>,
    /// Wall-clock time of the cut, ms.
    pub cut_at_ms: u64,
    /// The device that cut, as the actor of the record's operations.
    pub cut_by: ActorId,
    /// Devices that moved here, each entry written by that device itself.
    pub moved: BTreeSet<ActorId>,
}

/// How big a generation has grown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenerationStats {
    /// Changes (versions) in the document.
    pub changes: usize,
    /// Bytes of its stored chunks.
    pub bytes: usize,
}

/// What moving to a generation did.
#[derive(Debug)]
pub struct MoveReport<P> {
    /// Changes of the old generation carried over.
    pub carried: usize,
    /// Fields written by the carry.
    pub fields: usize,
    /// Outputs to carry out (persist, push, changed).
    pub outputs: Vec<Output<P>>,
}

fn refuse(reason: impl Into<String>) -> Error {
    Error::schema(GENERATION_KEY, reason.into())
}

/// The actor of a value's operation.
fn op_actor(id: &ObjId) -> Option<&ActorId> {
    match id {
        ObjId::Id(_, actor, _) => Some(actor),
        ObjId::Root => None,
    }
}

/// The one value at `key` of `obj`, written by `by`; anything else refuses the record.
fn fixed<'a, D: ReadDoc>(
    doc: &'a D,
    obj: &ObjId,
    key: &str,
    by: &ActorId,
) -> Result<(automerge::Value<'a>, ObjId)> {
    let all = doc
        .get_all(obj, key)
        .map_err(|e| refuse(format!("{key} unreadable: {e}")))?;
    let [(v, id)] = <[_; 1]>::try_from(all)
        .map_err(|_| refuse(format!("{key} must have exactly one value")))?;
    if op_actor(&id) != Some(by) {
        return Err(refuse(format!(
            "{key} was not written by the cutting device"
        )));
    }
    Ok((v, id))
}

fn fixed_str<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, by: &ActorId) -> Result<String> {
    match fixed(doc, obj, key, by)?.0 {
        automerge::Value::Scalar(s) => s
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| refuse(format!("{key} must be a string"))),
        _ => Err(refuse(format!("{key} must be a string"))),
    }
}

fn fixed_u64<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str, by: &ActorId) -> Result<u64> {
    match fixed(doc, obj, key, by)?.0 {
        automerge::Value::Scalar(s) => match s.as_ref() {
            automerge::ScalarValue::Uint(u) => Ok(*u),
            automerge::ScalarValue::Int(i) if *i >= 0 => Ok(*i as u64),
            _ => Err(refuse(format!("{key} must be a number"))),
        },
        _ => Err(refuse(format!("{key} must be a number"))),
    }
}

/// A map written (created) by `by`, with at most `cap` keys.
fn fixed_map<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    key: &str,
    by: &ActorId,
    cap: usize,
) -> Result<ObjId> {
    let (v, id) = fixed(doc, obj, key, by)?;
    if !matches!(v, automerge::Value::Object(ObjType::Map)) {
        return Err(refuse(format!("{key} must be a map")));
    }
    if doc.length(&id) > cap {
        return Err(refuse(format!("{key} has more than {cap} entries")));
    }
    Ok(id)
}

impl Generation {
    /// Reads and validates the record of `doc`: `Ok(None)` for a document with none
    /// (a first generation), an error for a record that is malformed, oversized or
    /// written in part by another device than the one that cut.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Option<Self>> {
        let Some((_, g)) = doc
            .get(ROOT, GENERATION_KEY)
            .map_err(|e| refuse(e.to_string()))?
        else {
            return Ok(None);
        };
        let all = doc
            .get_all(ROOT, GENERATION_KEY)
            .map_err(|e| refuse(e.to_string()))?;
        if all.len() != 1 {
            return Err(refuse("the record must have exactly one value"));
        }
        let cut_by = op_actor(&g)
            .cloned()
            .ok_or_else(|| refuse("the record has no writer"))?;
        let number = fixed_u64(doc, &g, "number", &cut_by)?;
        if number == 0 || number > u64::from(u32::MAX) {
            return Err(refuse("number out of range"));
        }
        let prev = DocId::parse(&fixed_str(doc, &g, "prev", &cut_by)?)
            .ok_or_else(|| refuse("prev is not a document id"))?;
        let heads_text = fixed_str(doc, &g, "prev_heads", &cut_by)?;
        if heads_text.len() > MAX_PREV_HEADS * 65 {
            return Err(refuse("too many heads"));
        }
        let mut prev_heads = Vec::new();
        for h in heads_text.split(',').filter(|h| !h.is_empty()) {
            prev_heads.push(
                h.parse::<ChangeHash>()
                    .map_err(|_| refuse("prev_heads holds a malformed hash"))?,
            );
        }
        let clock = fixed_map(doc, &g, "prev_clock", &cut_by, MAX_CLOCK_ACTORS)?;
        let mut prev_clock = BTreeMap::new();
        for key in doc.keys(&clock) {
            let actor = key
                .parse::<ActorId>()
                .map_err(|_| refuse("prev_clock names a malformed actor"))?;
            let seq = fixed_u64(doc, &clock, &key, &cut_by)?;
            prev_clock.insert(actor, seq);
        }
        let fields = fixed_map(doc, &g, "field_clocks", &cut_by, MAX_FIELD_CLOCKS)?;
        let mut field_clocks = BTreeMap::new();
        for key in doc.keys(&fields) {
            let at = fixed_str(doc, &fields, &key, &cut_by)?
                .parse::<Hlc>()
                .map_err(|_| refuse("field_clocks entries are clocks"))?;
            field_clocks.insert(key, at);
        }
        let cut_at_ms = fixed_u64(doc, &g, "cut_at", &cut_by)?;
        // Devices write their own `moved` entry; an entry naming another device is
        // ignored, not fatal, so one bad write cannot stall the rest.
        let mut moved = BTreeSet::new();
        if let Ok(Some((automerge::Value::Object(ObjType::Map), m))) = doc.get(&g, "moved") {
            for key in doc.keys(&m).take(MAX_MOVED) {
                if let (Ok(actor), Ok(Some((_, id)))) = (key.parse::<ActorId>(), doc.get(&m, &key))
                    && op_actor(&id) == Some(&actor)
                {
                    moved.insert(actor);
                }
            }
        }
        Ok(Some(Self {
            number,
            prev,
            prev_heads,
            prev_clock,
            field_clocks,
            cut_at_ms,
            cut_by,
            moved,
        }))
    }

    /// Whether the cut covers `change` (an ancestor of its heads).
    pub fn covers(&self, change: &Change) -> bool {
        self.prev_clock
            .get(change.actor_id())
            .is_some_and(|seq| change.seq() <= *seq)
    }
}

/// Whether `doc`'s record lists `hash` as carried.
fn is_carried(doc: &AutoCommit, hash: &ChangeHash) -> bool {
    let Ok(Some((_, g))) = doc.get(ROOT, GENERATION_KEY) else {
        return false;
    };
    let Ok(Some((_, c))) = doc.get(&g, "carried") else {
        return false;
    };
    matches!(doc.get(&c, hash.to_string()), Ok(Some(_)))
}

/// The changes that wrote the visible values of `key` in map `obj`, as `view` shows it.
fn value_writers<D: ReadDoc>(
    view: &D,
    doc: &AutoCommit,
    obj: &ObjId,
    key: &str,
) -> Vec<ChangeHash> {
    view.get_all(obj, key)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|(_, id)| doc.hash_for_opid(&id))
        .collect()
}

/// The clock of the visible value of `key` in map `obj`: the newest clock of the
/// changes that wrote its values.
fn value_clock(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<Hlc> {
    value_writers(doc, doc, obj, key)
        .into_iter()
        .filter_map(|h| hlc_at(doc, &[h]))
        .max()
}

/// Writes `record`'s fixed fields into a fresh document.
fn write_record<T: Transactable>(
    doc: &mut T,
    g: &Generation,
    me: &ActorId,
    now: u64,
) -> Result<()> {
    let m = doc
        .put_object(ROOT, GENERATION_KEY, ObjType::Map)
        .map_err(am)?;
    doc.put(&m, "number", g.number).map_err(am)?;
    doc.put(&m, "prev", g.prev.to_string()).map_err(am)?;
    let heads: Vec<String> = g.prev_heads.iter().map(ToString::to_string).collect();
    doc.put(&m, "prev_heads", heads.join(",")).map_err(am)?;
    let c = doc.put_object(&m, "prev_clock", ObjType::Map).map_err(am)?;
    for (actor, seq) in &g.prev_clock {
        doc.put(&c, actor.to_hex_string(), *seq).map_err(am)?;
    }
    let f = doc
        .put_object(&m, "field_clocks", ObjType::Map)
        .map_err(am)?;
    for (field, at) in &g.field_clocks {
        doc.put(&f, field.as_str(), at.to_string()).map_err(am)?;
    }
    doc.put(&m, "cut_at", g.cut_at_ms).map_err(am)?;
    let moved = doc.put_object(&m, "moved", ObjType::Map).map_err(am)?;
    doc.put(&moved, me.to_hex_string(), now).map_err(am)?;
    doc.put_object(&m, "carried", ObjType::Map).map_err(am)?;
    Ok(())
}

/// One field's value to carry, with the clock of the change that wrote it.
struct Carry {
    value: Option<Json>,
    at: Hlc,
    by: ActorId,
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// The generation record of `doc`, validated (see [`Generation::read`]).
    pub fn generation(&self, doc: DocId) -> Result<Option<Generation>> {
        Generation::read(self.doc(doc)?)
    }

    /// The document a generation replaces, as its record names it, unvalidated: a cheap
    /// hint (one map read) for indexes that are checked with [`Engine::generation`]
    /// before anything acts on them. `None` for a document without a record or with a
    /// record that does not name one.
    pub fn generation_prev(&self, doc: DocId) -> Result<Option<DocId>> {
        let d = self.doc(doc)?;
        let Ok(Some((automerge::Value::Object(ObjType::Map), g))) = d.get(ROOT, GENERATION_KEY)
        else {
            return Ok(None);
        };
        Ok(match d.get(&g, "prev") {
            Ok(Some((automerge::Value::Scalar(s), _))) => match s.as_ref() {
                automerge::ScalarValue::Str(text) => DocId::parse(text),
                _ => None,
            },
            _ => None,
        })
    }

    /// How many changes and stored bytes `doc` holds. The count comes from the
    /// entity's version log, kept as changes land.
    pub fn generation_stats(&mut self, doc: DocId) -> Result<GenerationStats> {
        let bytes = self
            .doc_state(doc)?
            .journal
            .iter()
            .map(Vec::len)
            .sum::<usize>();
        let changes = self.version_log(doc)?.0.len();
        Ok(GenerationStats { changes, bytes })
    }

    /// Cuts entity `old` into a new generation `new` under key epoch `epoch`: a fresh
    /// document holding the entity as its policy shows it (with each field's clock),
    /// the policy, and the record of `old` (its heads and per-writer clock). This
    /// device is the first to have moved. Returns the new document's snapshot to
    /// persist.
    pub fn cut_generation(
        &mut self,
        old: DocId,
        new: DocId,
        epoch: KeyEpoch,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let header = self.header(old)?.clone();
        if header.kind != DocKind::Entity {
            return Err(Error::Refused {
                what: "cut",
                reason: "only entity documents have generations".into(),
            });
        }
        let number = self.generation(old)?.map_or(0, |g| g.number) + 1;
        let homes = self.homes.clone();
        let ds = self.doc_state_mut(old)?;
        let doc = &mut ds.doc;
        let prev_heads = doc.get_heads();
        if prev_heads.len() > MAX_PREV_HEADS {
            return Err(Error::Refused {
                what: "cut",
                reason: format!("{} concurrent heads; waiting for a merge", prev_heads.len()),
            });
        }
        let mut prev_clock: BTreeMap<ActorId, u64> = BTreeMap::new();
        for meta in doc.get_changes_meta(&[]) {
            let seq = prev_clock.entry(meta.actor.into_owned()).or_default();
            *seq = (*seq).max(meta.seq);
        }
        if prev_clock.len() > MAX_CLOCK_ACTORS {
            return Err(Error::Refused {
                what: "cut",
                reason: format!("{} writers; at most {MAX_CLOCK_ACTORS}", prev_clock.len()),
            });
        }
        let resolved = policy::resolve_at(doc, None, &homes)?;
        let field_clocks = field_clocks(doc, &resolved)?;
        let record = Generation {
            number,
            prev: old,
            prev_heads,
            prev_clock,
            field_clocks,
            cut_at_ms: now_ms,
            cut_by: self.actor.clone(),
            moved: BTreeSet::new(),
        };
        let entity = resolved.entity;
        let policy = resolved.policy;
        let me = self.actor.clone();
        let header = Header::new(DocKind::Entity, header.owner_home, epoch);
        // Conflicts still waiting for a person keep their candidates: each is written
        // again by its own writer, concurrently, after the cut's first change.
        let pending: Vec<policy::Conflict> = resolved
            .conflicts
            .into_iter()
            .filter(|c| c.is_pending())
            .collect();
        let skip: BTreeSet<policy::Field> = pending.iter().map(|c| c.field.clone()).collect();
        let out = self.create_document(new, header, now_ms, |d, _at, _by| {
            write_entity(d, &entity, policy, &skip)?;
            write_record(d, &record, &me, now_ms)
        })?;
        if pending.is_empty() {
            return Ok(out);
        }
        let mut by_actor: BTreeMap<ActorId, Vec<(policy::Field, Json, Hlc)>> = BTreeMap::new();
        for c in pending {
            for cand in c.candidates {
                by_actor.entry(cand.actor).or_default().push((
                    c.field.clone(),
                    cand.value,
                    cand.at,
                ));
            }
        }
        let ds = self.doc_state_mut(new)?;
        let base = ds.doc.get_heads();
        let mut changes = Vec::new();
        for (actor, values) in by_actor {
            let mut fork = ds.doc.fork_at(&base).map_err(am)?;
            fork.set_actor(actor.clone());
            let e = match fork.get(ROOT, ENTITY_KEY).map_err(am)? {
                Some((_, e)) => e,
                None => return Err(refuse("the new generation has no entity")),
            };
            let a = ensure_map(&mut fork, &e, "attributes")?;
            let mut newest = None;
            for (field, value, at) in values {
                match (&field, &value) {
                    (policy::Field::State, Json::String(v)) => {
                        fork.put(&e, "state", v.as_str()).map_err(am)?;
                    }
                    (policy::Field::State, _) => continue,
                    (policy::Field::Attribute(k), v) => put_json(&mut fork, &a, k, v)?,
                }
                newest = newest.max(Some(at));
            }
            if let Some(at) = newest {
                fork.put(&e, "updated_at", at.to_string()).map_err(am)?;
                fork.put(&e, "updated_by", actor.to_hex_string())
                    .map_err(am)?;
            }
            fork.commit_with(CommitOptions::default().with_time(secs(now_ms)));
            if let Some(change) = fork.get_last_local_change() {
                changes.push(change);
            }
            ds.actors.insert(actor);
        }
        ds.doc.apply_changes(changes).map_err(am)?;
        let snapshot = ds.doc.save();
        ds.journal = vec![snapshot.clone()];
        Ok(vec![Output::PersistChunk {
            doc: new,
            kind: super::ChunkKind::Snapshot,
            bytes: snapshot,
        }])
    }

    /// Moves this device to generation `new`: carries over the changes of the
    /// generation it replaces (when held here) that its cut did not cover and no
    /// device has carried yet, and records that this device moved. Each field those
    /// changes wrote is carried when its clock is newer than the value it would
    /// replace (the value at the cut, or a later one this device wrote on top);
    /// later writes by other devices stay concurrent with the carry, so the entity's
    /// policy decides between them as it would have in the old generation. Does
    /// nothing when there is nothing to carry and this device already moved.
    pub fn move_to_generation(&mut self, new: DocId, now_ms: u64) -> Result<MoveReport<P>> {
        let record = self
            .generation(new)?
            .ok_or_else(|| refuse("the document is no generation"))?;
        // An old generation held but not loaded would pass for one not held, and its
        // uncarried writes would be skipped for good.
        if self.unloaded.contains_key(&record.prev) {
            return Err(Error::NotLoaded(record.prev));
        }
        let me = self.actor.clone();
        // The usual case is an old generation nobody wrote to since the cut: its heads
        // are still the cut's, and nothing needs a pass over its changes.
        let all = match self.docs.get_mut(&record.prev) {
            Some(old) => {
                let mut heads = old.doc.get_heads();
                let mut cut = record.prev_heads.clone();
                heads.sort();
                cut.sort();
                if heads == cut {
                    Vec::new()
                } else {
                    old.doc.get_changes(&[])
                }
            }
            None => Vec::new(),
        };
        let new_doc = &self.doc_state(new)?.doc;
        let uncovered: Vec<Change> = all
            .into_iter()
            .filter(|c| !record.covers(c) && !is_carried(new_doc, &c.hash()))
            .take(MAX_CARRY)
            .collect();
        let mut carries = match self.docs.get(&record.prev) {
            Some(old) if !uncovered.is_empty() => carried_fields(&old.doc, &uncovered)?,
            _ => BTreeMap::new(),
        };
        if uncovered.is_empty() && record.moved.contains(&me) {
            return Ok(MoveReport {
                carried: 0,
                fields: 0,
                outputs: Vec::new(),
            });
        }
        let ds = self.doc_state_mut(new)?;
        // Fork at the first change (the cut) and this device's own last change, so the
        // carry follows everything this device wrote here (its sequence numbers stay
        // in order) and is concurrent with what other devices wrote since the cut.
        let mut roots: Vec<ChangeHash> = Vec::new();
        let mut mine: Option<(u64, ChangeHash)> = None;
        for meta in ds.doc.get_changes_meta(&[]) {
            if meta.deps.is_empty() {
                roots.push(meta.hash);
            }
            if *meta.actor == me && mine.is_none_or(|(s, _)| meta.seq > s) {
                mine = Some((meta.seq, meta.hash));
            }
        }
        let mut deps = roots.clone();
        if let Some((_, h)) = mine
            && !deps.contains(&h)
        {
            deps.push(h);
        }
        let mut fork = ds.doc.fork_at(&deps).map_err(am)?;
        fork.set_actor(me.clone());
        let base = fork.get_heads();
        let e = match fork.get(ROOT, ENTITY_KEY).map_err(am)? {
            Some((_, e)) => e,
            None => return Err(refuse("the new generation has no entity")),
        };
        // Drop what is not newer than the value it would replace. A value the cut
        // copied carries the clock the record kept for it (the cut's own change
        // stamped the entity's newest clock, not each field's).
        carries.retain(|field, carry| {
            let view = AtHeads::new(&fork, &base);
            let writers = if field == "state" {
                value_writers(&view, &fork, &e, "state")
            } else {
                let key = &field["attributes.".len()..];
                match fork.get(&e, "attributes") {
                    Ok(Some((_, a))) => value_writers(&view, &fork, &a, key),
                    _ => Vec::new(),
                }
            };
            let replaced = writers
                .iter()
                .filter_map(|h| {
                    if roots.contains(h) {
                        record.field_clocks.get(field).copied()
                    } else {
                        hlc_at(&fork, &[*h])
                    }
                })
                .max();
            replaced.is_none_or(|r| carry.at > r)
        });
        let fields = carries.len();
        let newest = carries
            .values()
            .max_by_key(|c| c.at)
            .map(|c| (c.at, c.by.clone()));
        if let Some((at, by)) = &newest {
            let a = ensure_map(&mut fork, &e, "attributes")?;
            for (field, carry) in &carries {
                if field == "state" {
                    if let Some(Json::String(s)) = &carry.value {
                        fork.put(&e, "state", s.as_str()).map_err(am)?;
                    }
                } else {
                    let key = &field["attributes.".len()..];
                    match &carry.value {
                        Some(v) => put_json(&mut fork, &a, key, v)?,
                        None => {
                            if fork.get(&a, key).map_err(am)?.is_some() {
                                fork.delete(&a, key).map_err(am)?;
                            }
                        }
                    }
                }
            }
            fork.put(&e, "updated_at", at.to_string()).map_err(am)?;
            fork.put(&e, "updated_by", by.to_hex_string()).map_err(am)?;
        }
        let g = match fork.get(ROOT, GENERATION_KEY).map_err(am)? {
            Some((_, g)) => g,
            None => return Err(refuse("the new generation has no record")),
        };
        let carried_map = ensure_map(&mut fork, &g, "carried")?;
        for change in &uncovered {
            fork.put(&carried_map, change.hash().to_string(), true)
                .map_err(am)?;
        }
        let moved = ensure_map(&mut fork, &g, "moved")?;
        if fork.get(&moved, me.to_hex_string()).map_err(am)?.is_none() {
            fork.put(&moved, me.to_hex_string(), now_ms).map_err(am)?;
        }
        if fork
            .commit_with(CommitOptions::default().with_time(secs(now_ms)))
            .is_none()
        {
            return Ok(MoveReport {
                carried: 0,
                fields: 0,
                outputs: Vec::new(),
            });
        }
        let change = fork
            .get_last_local_change()
            .ok_or_else(|| refuse("the carry wrote no change"))?;
        let ds = self.doc_state_mut(new)?;
        ds.doc.apply_changes([change]).map_err(am)?;
        let outputs = self.finish_local(new, me, None, now_ms)?;
        Ok(MoveReport {
            carried: uncovered.len(),
            fields,
            outputs,
        })
    }
}

/// Each field's clock as the entity shows it: for a value in conflict, the shown
/// candidate's; otherwise the clock of the change that wrote it.
fn field_clocks(doc: &AutoCommit, resolved: &ResolvedEntity) -> Result<BTreeMap<String, Hlc>> {
    let mut out = BTreeMap::new();
    let e = match doc.get(ROOT, ENTITY_KEY).map_err(am)? {
        Some((_, e)) => e,
        None => return Ok(out),
    };
    let shown = |field: &policy::Field| -> Option<Hlc> {
        let c = resolved.conflicts.iter().find(|c| &c.field == field)?;
        let value = c
            .chosen
            .as_ref()
            .or(c.candidates.first().map(|x| &x.value))?;
        c.candidates
            .iter()
            .find(|x| &x.value == value)
            .map(|x| x.at)
    };
    let state = shown(&policy::Field::State).or_else(|| value_clock(doc, &e, "state"));
    if let Some(at) = state {
        out.insert("state".to_string(), at);
    }
    if let Ok(Some((_, a))) = doc.get(&e, "attributes") {
        for key in resolved.entity.attributes.keys() {
            let at =
                shown(&policy::Field::Attribute(key.clone())).or_else(|| value_clock(doc, &a, key));
            if let Some(at) = at {
                out.insert(format!("attributes.{key}"), at);
            }
        }
    }
    Ok(out)
}

/// Writes the entity as shown (its fields, clock, writer, policy) into a fresh document.
/// Fields in `skip` (pending conflicts) are left to their candidates' own changes.
fn write_entity<T: Transactable>(
    doc: &mut T,
    entity: &Entity,
    policy: Policy,
    skip: &BTreeSet<policy::Field>,
) -> Result<()> {
    let e = doc.put_object(ROOT, ENTITY_KEY, ObjType::Map).map_err(am)?;
    doc.put(&e, "id", entity.id.as_str()).map_err(am)?;
    doc.put(&e, "owner", entity.owner.as_str()).map_err(am)?;
    if !skip.contains(&policy::Field::State) {
        doc.put(&e, "state", entity.state.as_str()).map_err(am)?;
    }
    let a = doc.put_object(&e, "attributes", ObjType::Map).map_err(am)?;
    for (k, v) in &entity.attributes {
        if !skip.contains(&policy::Field::Attribute(k.clone())) {
            put_json(doc, &a, k, v)?;
        }
    }
    doc.put(&e, "updated_at", entity.updated_at.to_string())
        .map_err(am)?;
    doc.put(&e, "updated_by", entity.updated_by.to_hex_string())
        .map_err(am)?;
    if policy != Policy::default() {
        doc.put(&e, policy::POLICY_KEY, policy.as_str())
            .map_err(am)?;
    }
    Ok(())
}

/// The fields the `uncovered` changes wrote, each with the value and clock of the
/// newest of them that wrote it (read as of that change).
fn carried_fields(doc: &AutoCommit, uncovered: &[Change]) -> Result<BTreeMap<String, Carry>> {
    let mut out: BTreeMap<String, Carry> = BTreeMap::new();
    for change in uncovered {
        let heads = [change.hash()];
        let view = AtHeads::new(doc, &heads);
        let Ok(entity) = Entity::read(&view) else {
            continue;
        };
        let at = hlc_at(doc, &heads).unwrap_or(entity.updated_at);
        let mut offer = |field: String, value: Option<Json>| {
            let newer = out.get(&field).is_none_or(|c| at > c.at);
            if newer {
                out.insert(
                    field,
                    Carry {
                        value,
                        at,
                        by: change.actor_id().clone(),
                    },
                );
            }
        };
        let one = std::slice::from_ref(change);
        if let Touched::Entries(keys) = touched_entries(doc, one, &[ENTITY_KEY])
            && keys.contains("state")
        {
            offer("state".into(), Some(Json::String(entity.state.clone())));
        }
        match touched_entries(doc, one, &[ENTITY_KEY, "attributes"]) {
            Touched::Entries(keys) => {
                for key in keys {
                    let value = entity.attributes.get(&key).cloned();
                    offer(format!("attributes.{key}"), value);
                }
            }
            // A change whose writes cannot be placed carries its whole view.
            Touched::Everything => {
                for (key, value) in &entity.attributes {
                    offer(format!("attributes.{key}"), Some(value.clone()));
                }
            }
        }
    }
    Ok(out)
}
