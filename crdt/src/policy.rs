//! Conflict policies for entities: which of a field's concurrent values an
//! entity shows, and the audit trail of conflicts.
//!
//! # What a conflict is
//!
//! Automerge keeps concurrent writes to *different* map keys apart on its
//! own, so two homes that change different attributes at the same time both
//! keep their change. Two concurrent writes to the *same* key leave both
//! values in the document; [`ReadDoc::get_all`] returns them. Such a field
//! (`state`, or one top-level attribute `attributes.<key>`) is a conflict,
//! and its values are the [`Candidate`]s. Each candidate is traced to the
//! change that wrote it, which gives its author (the change's actor, derived
//! from the device's PeerId, so it cannot be claimed falsely) and its clock
//! (the entity's `updated_at` written in that same change).
//!
//! # Policies
//!
//! A policy picks one candidate per conflict, at read time. It reads only the
//! document and the caller's actor-to-home mapping, so every replica with the
//! same changes shows the same value, whatever order the changes arrived in.
//! Nothing is written until someone resolves a conflict explicitly
//! ([`Engine::resolve_conflict`]), which writes the chosen candidate over all
//! of them.
//!
//! Candidates are ranked newest first by (HLC, ActorId): ties break by HLC,
//! then by ActorId, as DESIGN.md asks.
//!
//! - [`Policy::LatestWins`] (the default): the newest candidate.
//! - [`Policy::Merge`]: field by field. When the candidates are JSON objects
//!   (a map-valued attribute such as `color: {r, g, b}`), each key is taken
//!   from the side that changed it relative to what that side overwrote, and
//!   a key both sides changed goes to the newest. Any other value (the state,
//!   a number, a list) is decided as latest-wins. At the top level this is
//!   what Automerge already does across keys; merge carries it one level
//!   down, where a whole-value write would otherwise drop the other side's
//!   keys.
//! - [`Policy::OwnerWins`]: the newest candidate written by a device of the
//!   entity's owner home.
//! - [`Policy::SharerWins`]: the newest candidate written by a device of a
//!   home the entity is shared with (a known home other than the owner).
//! - Both side policies fall back to latest-wins when every candidate comes
//!   from one side (or none from the preferred side). A device whose home the
//!   mapping does not know is on neither side.
//! - [`Policy::UserChoice`]: nothing is chosen. The entity shows the newest
//!   candidate provisionally and [`Conflict::chosen`] is `None` until someone
//!   resolves it.
//!
//! # Where the policy lives
//!
//! In the entity document itself, under `entity.policy` (absent means
//! latest-wins). Every replica of the entity holds it, so every replica
//! applies the same policy; the registry's per-share `policy` is where the
//! owner records what it set, not what readers consult. Concurrent policy
//! changes settle like any field, by Automerge's deterministic winner.
//!
//! # Audit
//!
//! The engine looks for conflicts after applying remote changes, and reports
//! a conflict with [`Output::Conflict`] only when one of its candidates was
//! written by a change that just arrived. A conflict is therefore reported
//! once per replica, when it forms: not on reads, not on restarts, and not
//! again when unrelated changes follow. An explicit resolution is reported
//! by the node that resolves it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Debug};

use automerge::transaction::Transactable;
use automerge::{
    ActorId, AutoCommit, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value,
};
use serde_json::{Map, Number, Value as Json};

use crate::engine::{Engine, Output};
use crate::error::{Error, Result};
use crate::history::{AtHeads, hlc_at};
use crate::hlc::{HLC_ACTOR_LEN, Hlc};
use crate::ids::DocId;
use crate::schema::entity::{
    self, ENTITY_KEY, Entity, EntityUpdate, MAX_ATTRIBUTE_DEPTH, MAX_ATTRIBUTE_ENTRIES,
    stamp_from_value,
};
use crate::schema::room::expect_kind;
use crate::schema::{DocKind, am, join, keys, opt_str, req_map};

/// Key of the policy inside the entity map.
pub const POLICY_KEY: &str = "policy";

/// How an entity's concurrent values are decided. See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    /// The newest value by HLC, then ActorId.
    #[default]
    LatestWins,
    /// Field by field: keys of map values merge; the rest is latest-wins.
    Merge,
    /// The value written by the owner home.
    OwnerWins,
    /// The value written by a granted home.
    SharerWins,
    /// Kept undecided until someone resolves it.
    UserChoice,
}

impl Policy {
    /// Every policy.
    pub const ALL: [Policy; 5] = [
        Policy::LatestWins,
        Policy::Merge,
        Policy::OwnerWins,
        Policy::SharerWins,
        Policy::UserChoice,
    ];

    /// Stored (and CLI/API) name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Policy::LatestWins => "latest-wins",
            Policy::Merge => "merge",
            Policy::OwnerWins => "owner-wins",
            Policy::SharerWins => "sharer-wins",
            Policy::UserChoice => "user-choice",
        }
    }

    /// Inverse of [`Policy::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == text)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A field of an entity that can be in conflict.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// The `state` string.
    State,
    /// One top-level attribute, by key.
    Attribute(String),
}

impl Field {
    /// Parses `state` or `attributes.<key>` (the key may contain dots).
    pub fn parse(text: &str) -> Option<Self> {
        if text == "state" {
            return Some(Field::State);
        }
        text.strip_prefix("attributes.")
            .filter(|k| !k.is_empty())
            .map(|k| Field::Attribute(k.to_string()))
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::State => f.write_str("state"),
            Field::Attribute(k) => write!(f, "attributes.{k}"),
        }
    }
}

/// One concurrent value of a field.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The value (a JSON string for `state`).
    pub value: Json,
    /// Actor (device) that wrote it.
    pub actor: ActorId,
    /// Home of that device, when the mapping knows it.
    pub home: Option<String>,
    /// Clock of the write.
    pub at: Hlc,
    /// Change that wrote it.
    pub change: ChangeHash,
}

/// A field with concurrent values.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// The field.
    pub field: Field,
    /// Its values, newest first. A resolution names one by its index here.
    pub candidates: Vec<Candidate>,
    /// The value the policy shows; `None` while a user-choice conflict waits
    /// for someone to resolve it.
    pub chosen: Option<Json>,
}

impl Conflict {
    /// Whether it waits for an explicit resolution.
    pub fn is_pending(&self) -> bool {
        self.chosen.is_none()
    }
}

/// An entity as its policy shows it, with the conflicts behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedEntity {
    /// The entity, every conflicted field decided (a pending user-choice
    /// field shows its newest candidate).
    pub entity: Entity,
    /// The policy in force.
    pub policy: Policy,
    /// Every conflicted field, in field order.
    pub conflicts: Vec<Conflict>,
}

impl ResolvedEntity {
    /// Conflicts waiting for an explicit resolution.
    pub fn pending(&self) -> impl Iterator<Item = &Conflict> + '_ {
        self.conflicts.iter().filter(|c| c.is_pending())
    }
}

/// Maps a change's actor to the home of its device. Every replica must use
/// the same mapping (it comes from the replicated home documents) for the
/// side policies to agree.
pub trait HomeLookup {
    /// The HomeId of the device behind `actor`, if known.
    fn home_of(&self, actor: &ActorId) -> Option<String>;
}

impl<F: Fn(&ActorId) -> Option<String>> HomeLookup for F {
    fn home_of(&self, actor: &ActorId) -> Option<String> {
        self(actor)
    }
}

/// An actor-to-home table, the mapping the [`Engine`] holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActorHomes {
    homes: BTreeMap<ActorId, String>,
}

impl ActorHomes {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `actor`'s device belongs to `home`.
    pub fn insert(&mut self, actor: ActorId, home: impl Into<String>) -> Option<String> {
        self.homes.insert(actor, home.into())
    }

    /// Forgets `actor`.
    pub fn remove(&mut self, actor: &ActorId) -> Option<String> {
        self.homes.remove(actor)
    }

    /// Number of known actors.
    pub fn len(&self) -> usize {
        self.homes.len()
    }

    /// Whether no actor is known.
    pub fn is_empty(&self) -> bool {
        self.homes.is_empty()
    }
}

impl HomeLookup for ActorHomes {
    fn home_of(&self, actor: &ActorId) -> Option<String> {
        self.homes.get(actor).cloned()
    }
}

/// Whether an audit record reports a new conflict or its resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictAction {
    /// Concurrent values met on this replica (event `conflict.detected`).
    Detected,
    /// Someone wrote one of them over the others (event
    /// `conflict.resolved`).
    Resolved,
}

/// An audit record for the node to persist in the audit keyspace.
#[derive(Clone, Debug, PartialEq)]
pub struct ConflictRecord {
    /// Entity document.
    pub doc: DocId,
    /// Entity id, e.g. `light.porch`.
    pub entity: String,
    /// Field in conflict.
    pub field: Field,
    /// Its values, newest first.
    pub candidates: Vec<Candidate>,
    /// The value chosen: by the policy on detection (`None` for a pending
    /// user choice), or by the person resolving it.
    pub chosen: Option<Json>,
    /// Policy in force.
    pub policy: Policy,
    /// Detected or resolved.
    pub action: ConflictAction,
    /// Wall-clock time of the detection or resolution, ms.
    pub at_ms: u64,
    /// The resolving device, for a resolution.
    pub by: Option<ActorId>,
}

/// The actor's bytes as an HLC actor field (actors derived from PeerIds are
/// 16 bytes; anything else is cut or padded, which only affects tie-breaks).
pub(crate) fn actor_array(actor: &ActorId) -> [u8; HLC_ACTOR_LEN] {
    let mut out = [0u8; HLC_ACTOR_LEN];
    for (slot, b) in out.iter_mut().zip(actor.to_bytes()) {
        *slot = *b;
    }
    out
}

/// Reads the policy of an entity document.
pub fn read_policy<D: ReadDoc>(doc: &D) -> Result<Policy> {
    let e = req_map(doc, &ROOT, ENTITY_KEY, ENTITY_KEY)?;
    match opt_str(doc, &e, POLICY_KEY, "entity.policy")? {
        None => Ok(Policy::default()),
        Some(text) => Policy::parse(&text)
            .ok_or_else(|| Error::schema("entity.policy", format!("unknown policy {text:?}"))),
    }
}

/// Sets the policy of an entity document.
pub fn set_policy<T: Transactable>(doc: &mut T, policy: Policy) -> Result<()> {
    let e = req_map(doc, &ROOT, ENTITY_KEY, ENTITY_KEY)?;
    crate::schema::put_str_if_changed(doc, &e, POLICY_KEY, policy.as_str())
}

/// The entity of `doc` as its policy shows it: at its current state, or at
/// `heads` for a past version.
pub fn resolve_at(
    doc: &AutoCommit,
    heads: Option<&[ChangeHash]>,
    homes: &impl HomeLookup,
) -> Result<ResolvedEntity> {
    match heads {
        Some(h) => resolve_view(&AtHeads::new(doc, h), doc, homes),
        None => resolve_view(doc, doc, homes),
    }
}

/// Resolves the entity as `view` shows it; `doc` is the whole document, for
/// tracing values to their changes.
fn resolve_view<D: ReadDoc>(
    view: &D,
    doc: &AutoCommit,
    homes: &impl HomeLookup,
) -> Result<ResolvedEntity> {
    let mut entity = Entity::read(view)?;
    let policy = read_policy(view)?;
    let e = req_map(view, &ROOT, ENTITY_KEY, ENTITY_KEY)?;
    let mut conflicts = Vec::new();
    let top = conflicted_keys(view, &e);
    let stamps = if top.is_empty() && !has_conflicts_in(view, &e) {
        BTreeMap::new()
    } else {
        visible_stamps(view, doc, &e)?
    };

    let states = if top.iter().any(|k| k == "state") {
        get_all(view, &e, "state", "entity.state")?
    } else {
        Vec::new()
    };
    if states.len() > 1 {
        let mut candidates = Vec::with_capacity(states.len());
        for (v, id) in states {
            let value = match string_value(view, &v, &id) {
                Some(s) => Json::String(s),
                None => {
                    return Err(Error::schema(
                        "entity.state",
                        format!(
                            "a concurrent value is a {}, not a string",
                            crate::schema::type_name(&v)
                        ),
                    ));
                }
            };
            candidates.push(candidate(doc, &stamps, value, &id, "entity.state", homes)?);
        }
        let c = decide(
            doc,
            policy,
            &entity.owner,
            Field::State,
            candidates,
            &e,
            "state",
        );
        if let Some(Json::String(s)) = shown(&c) {
            entity.state = s.clone();
        }
        conflicts.push(c);
    }

    let a = req_map(view, &e, "attributes", "entity.attributes")?;
    for key in conflicted_keys(view, &a) {
        let path = join("entity.attributes", &key);
        let values = get_all(view, &a, &key, &path)?;
        if values.len() < 2 {
            continue;
        }
        let mut candidates = Vec::with_capacity(values.len());
        for (v, id) in values {
            let mut budget = MAX_ATTRIBUTE_ENTRIES;
            let value = read_json(view, v, &id, &path, 1, &mut budget)?;
            candidates.push(candidate(doc, &stamps, value, &id, &path, homes)?);
        }
        let c = decide(
            doc,
            policy,
            &entity.owner,
            Field::Attribute(key.clone()),
            candidates,
            &a,
            &key,
        );
        if let Some(v) = shown(&c) {
            entity.attributes.insert(key, v.clone());
        }
        conflicts.push(c);
    }

    if top.iter().any(|k| k == "updated_at") {
        settle_stamp(view, doc, &e, &mut entity)?;
    }
    Ok(ResolvedEntity {
        entity,
        policy,
        conflicts,
    })
}

/// The value an entity shows for a conflict: the chosen one, or the newest
/// while a choice is pending.
fn shown(c: &Conflict) -> Option<&Json> {
    c.chosen
        .as_ref()
        .or_else(|| c.candidates.first().map(|x| &x.value))
}

/// Concurrent writes leave several `updated_at` values too: the entity
/// reports the newest one, and the `updated_by` written with it.
fn settle_stamp<D: ReadDoc>(
    view: &D,
    doc: &AutoCommit,
    e: &ObjId,
    entity: &mut Entity,
) -> Result<()> {
    let stamps = get_all(view, e, "updated_at", "entity.updated_at")?;
    if stamps.len() < 2 {
        return Ok(());
    }
    let newest = stamps
        .iter()
        .filter_map(|(v, id)| Some((stamp_from_value(v, id)?, id.clone())))
        .max_by_key(|(h, _)| *h);
    let Some((at, id)) = newest else {
        return Ok(());
    };
    entity.updated_at = at;
    let Some(change) = doc.hash_for_opid(&id) else {
        return Ok(());
    };
    for (v, by_id) in get_all(view, e, "updated_by", "entity.updated_by")? {
        if doc.hash_for_opid(&by_id) == Some(change)
            && let Some(actor) = v.as_str().and_then(parse_actor)
        {
            entity.updated_by = actor;
        }
    }
    Ok(())
}

fn parse_actor(text: &str) -> Option<ActorId> {
    if text.len() != 2 * HLC_ACTOR_LEN {
        return None;
    }
    text.parse::<ActorId>().ok()
}

fn get_all<'a, D: ReadDoc>(
    view: &'a D,
    obj: &ObjId,
    key: &str,
    path: &str,
) -> Result<Vec<(Value<'a>, ObjId)>> {
    view.get_all(obj, key)
        .map_err(|e| Error::schema(path, format!("unreadable: {e}")))
}

fn string_value<D: ReadDoc>(view: &D, v: &Value<'_>, id: &ObjId) -> Option<String> {
    match v {
        Value::Scalar(s) => s.as_str().map(str::to_string),
        Value::Object(ObjType::Text) => view.text(id).ok(),
        Value::Object(_) => None,
    }
}

/// The clocks of the `updated_at` values visible in `view`, by the change
/// that wrote each. A candidate's clock is usually among them (it was
/// written in the same change as the candidate), which saves reading the
/// document as of that change.
fn visible_stamps<D: ReadDoc>(
    view: &D,
    doc: &AutoCommit,
    e: &ObjId,
) -> Result<BTreeMap<ChangeHash, Hlc>> {
    let mut out = BTreeMap::new();
    for (v, id) in get_all(view, e, "updated_at", "entity.updated_at")? {
        if let (Some(hlc), Some(change)) = (stamp_from_value(&v, &id), doc.hash_for_opid(&id)) {
            out.insert(change, hlc);
        }
    }
    Ok(out)
}

/// Whether the entity's attributes hold concurrent values.
fn has_conflicts_in<D: ReadDoc>(view: &D, e: &ObjId) -> bool {
    match view.get(e, "attributes") {
        Ok(Some((_, a))) => !conflicted_keys(view, &a).is_empty(),
        _ => false,
    }
}

/// Traces a value to the change that wrote it.
fn candidate(
    doc: &AutoCommit,
    stamps: &BTreeMap<ChangeHash, Hlc>,
    value: Json,
    id: &ObjId,
    path: &str,
    homes: &impl HomeLookup,
) -> Result<Candidate> {
    let ObjId::Id(_, actor, _) = id else {
        return Err(Error::schema(path, "value has no operation id"));
    };
    let change = doc
        .hash_for_opid(id)
        .ok_or_else(|| Error::schema(path, "value belongs to no known change"))?;
    let recorded = stamps
        .get(&change)
        .copied()
        .or_else(|| hlc_at(doc, &[change]));
    let at = recorded.unwrap_or_else(|| {
        // A change that wrote no clock (another Automerge client) still
        // ranks, by its own timestamp, so every replica ranks it alike.
        let secs = doc.get_change_by_hash(&change).map_or(0, |c| c.timestamp());
        Hlc {
            wall_ms: u64::try_from(secs).unwrap_or(0).saturating_mul(1000),
            counter: 0,
            actor: actor_array(actor),
        }
    });
    Ok(Candidate {
        value,
        home: homes.home_of(actor),
        actor: actor.clone(),
        at,
        change,
    })
}

/// Ranks candidates newest first and applies the policy.
fn decide(
    doc: &AutoCommit,
    policy: Policy,
    owner: &str,
    field: Field,
    mut candidates: Vec<Candidate>,
    obj: &ObjId,
    key: &str,
) -> Conflict {
    candidates.sort_by(|a, b| (b.at, b.actor.to_bytes()).cmp(&(a.at, a.actor.to_bytes())));
    let chosen = match candidates.first() {
        None => None,
        Some(newest) => match policy {
            Policy::LatestWins => Some(newest.value.clone()),
            Policy::Merge => Some(merge(doc, &candidates, obj, key)),
            Policy::OwnerWins => {
                Some(by_side(&candidates, |c| c.home.as_deref() == Some(owner)).clone())
            }
            Policy::SharerWins => Some(
                by_side(&candidates, |c| {
                    c.home.as_deref().is_some_and(|h| h != owner)
                })
                .clone(),
            ),
            Policy::UserChoice => None,
        },
    };
    Conflict {
        field,
        candidates,
        chosen,
    }
}

/// The newest candidate from the preferred side, when the candidates come
/// from both sides; otherwise the newest of all (latest-wins).
fn by_side(candidates: &[Candidate], preferred: impl Fn(&Candidate) -> bool) -> &Json {
    let newest = &candidates[0].value;
    let on_side = candidates.iter().filter(|c| preferred(c)).count();
    if on_side == 0 || on_side == candidates.len() {
        return newest;
    }
    candidates
        .iter()
        .find(|c| preferred(c))
        .map_or(newest, |c| &c.value)
}

/// Merges map-valued candidates key by key against what each overwrote.
/// `candidates` is non-empty and ranked newest first.
fn merge(doc: &AutoCommit, candidates: &[Candidate], obj: &ObjId, key: &str) -> Json {
    let newest = &candidates[0].value;
    let maps: Vec<&Map<String, Json>> = candidates
        .iter()
        .filter_map(|c| c.value.as_object())
        .collect();
    if maps.len() != candidates.len() {
        return newest.clone();
    }
    let bases: Vec<Map<String, Json>> = candidates
        .iter()
        .map(|c| base_of(doc, c, obj, key))
        .collect();
    let all_keys: BTreeSet<&String> = maps
        .iter()
        .flat_map(|m| m.keys())
        .chain(bases.iter().flat_map(|b| b.keys()))
        .collect();
    let mut out = Map::new();
    for k in all_keys {
        // The newest side that changed the key decides it; a key nobody
        // changed keeps its common value.
        let changed = maps
            .iter()
            .zip(&bases)
            .find(|(m, b)| m.get(k) != b.get(k))
            .map(|(m, _)| *m);
        let source = changed.unwrap_or(maps[0]);
        if let Some(v) = source.get(k) {
            out.insert(k.clone(), v.clone());
        }
    }
    Json::Object(out)
}

/// The map a candidate's change overwrote: the field as its author saw it
/// just before. Empty when the field was absent, not a map, or itself in
/// conflict then (every key then counts as changed by this side).
fn base_of(doc: &AutoCommit, c: &Candidate, obj: &ObjId, key: &str) -> Map<String, Json> {
    let Some(change) = doc.get_change_by_hash(&c.change) else {
        return Map::new();
    };
    let deps = change.deps().to_vec();
    let before = AtHeads::new(doc, &deps);
    let Ok(values) = before.get_all(obj, key) else {
        return Map::new();
    };
    match <[_; 1]>::try_from(values) {
        Ok([(v, id)]) => {
            let mut budget = MAX_ATTRIBUTE_ENTRIES;
            match read_json(&before, v, &id, "", 1, &mut budget) {
                Ok(Json::Object(m)) => m,
                _ => Map::new(),
            }
        }
        Err(_) => Map::new(),
    }
}

/// Reads any value as JSON, with the entity view's depth and size caps.
fn read_json<D: ReadDoc>(
    view: &D,
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
            let mut out = Map::new();
            for k in keys(view, id) {
                let p = join(path, &k);
                if let Some((cv, cid)) = view
                    .get(id, k.as_str())
                    .map_err(|e| Error::schema(&p, format!("unreadable: {e}")))?
                {
                    out.insert(k, read_json(view, cv, &cid, &p, depth + 1, budget)?);
                }
            }
            Ok(Json::Object(out))
        }
        Value::Object(ObjType::List) => {
            let items: Vec<(Value<'static>, ObjId)> = view
                .list_range(id, ..)
                .map(|item| {
                    let item_id = item.id();
                    (item.value.into_value(), item_id)
                })
                .collect();
            let mut out = Vec::with_capacity(items.len());
            for (i, (iv, iid)) in items.into_iter().enumerate() {
                let p = join(path, &i.to_string());
                out.push(read_json(view, iv, &iid, &p, depth + 1, budget)?);
            }
            Ok(Json::Array(out))
        }
        Value::Object(ObjType::Text) => view
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
            other => Err(Error::schema(
                path,
                format!(
                    "unsupported attribute type {}",
                    crate::schema::type_name(&Value::Scalar(std::borrow::Cow::Borrowed(other)))
                ),
            )),
        },
    }
}

/// Writes `update` so that it settles every conflict it touches (only the
/// field `only`, when given): a field with concurrent values is deleted
/// first, so the write that follows supersedes every candidate rather than
/// only the one Automerge shows by default.
pub(crate) fn write_settled(
    doc: &mut AutoCommit,
    update: &EntityUpdate,
    only: Option<&Field>,
    at: Hlc,
    by: &ActorId,
) -> Result<()> {
    let e = req_map(doc, &ROOT, ENTITY_KEY, ENTITY_KEY)?;
    let state_too = matches!(only, None | Some(Field::State));
    if state_too && doc.get_all(&e, "state").map_err(am)?.len() > 1 {
        doc.delete(&e, "state").map_err(am)?;
    }
    let a = req_map(doc, &e, "attributes", "entity.attributes")?;
    for key in keys(doc, &a) {
        let wanted = match only {
            None => true,
            Some(Field::Attribute(k)) => *k == key,
            Some(Field::State) => false,
        };
        if wanted && doc.get_all(&a, key.as_str()).map_err(am)?.len() > 1 {
            doc.delete(&a, key.as_str()).map_err(am)?;
        }
    }
    entity::write(doc, update, at, by)
}

/// Finds the conflicts that changes `fresh` (just applied) took part in,
/// as audit records. Cheap when the entity has no conflict at all, which is
/// the common case on the push path.
pub(crate) fn detect(
    id: DocId,
    doc: &AutoCommit,
    fresh: &BTreeSet<ChangeHash>,
    homes: &impl HomeLookup,
    now_ms: u64,
) -> Result<Vec<ConflictRecord>> {
    if fresh.is_empty() || !has_conflicts(doc) {
        return Ok(Vec::new());
    }
    let resolved = resolve_at(doc, None, homes)?;
    let entity = resolved.entity.id.clone();
    Ok(resolved
        .conflicts
        .into_iter()
        .filter(|c| c.candidates.iter().any(|x| fresh.contains(&x.change)))
        .map(|c| ConflictRecord {
            doc: id,
            entity: entity.clone(),
            field: c.field,
            candidates: c.candidates,
            chosen: c.chosen,
            policy: resolved.policy,
            action: ConflictAction::Detected,
            at_ms: now_ms,
            by: None,
        })
        .collect())
}

fn has_conflicts(doc: &AutoCommit) -> bool {
    let Ok(Some((_, e))) = doc.get(ROOT, ENTITY_KEY) else {
        return false;
    };
    conflicted_keys(doc, &e).iter().any(|k| k == "state") || has_conflicts_in(doc, &e)
}

/// Keys of a map that hold concurrent values. One pass over the map, where
/// a `get_all` per key would cost a lookup each: this runs on every read and
/// after every remote change.
fn conflicted_keys<D: ReadDoc>(view: &D, obj: &ObjId) -> Vec<String> {
    view.map_range(obj, ..)
        .filter(|item| item.conflict)
        .map(|item| item.key.into_owned())
        .collect()
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// The entity with its policy applied, and its conflicts.
    pub fn resolved_entity(&self, id: DocId) -> Result<ResolvedEntity> {
        resolve_at(self.doc(id)?, None, &self.homes)
    }

    /// The entity's conflict policy.
    pub fn entity_policy(&self, id: DocId) -> Result<Policy> {
        read_policy(self.doc(id)?)
    }

    /// Sets the entity's conflict policy. Existing conflicts are decided by
    /// the new policy from the next read on.
    pub fn set_entity_policy(
        &mut self,
        id: DocId,
        policy: Policy,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Entity)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            set_policy(doc, policy)
        })
        .map(|(_, out)| out)
    }

    /// The actor-to-home mapping used by the side policies.
    pub fn actor_homes(&self) -> &ActorHomes {
        &self.homes
    }

    /// Edits the actor-to-home mapping (fed from the home documents' device
    /// lists). Every replica needs the same mapping to show the same values.
    pub fn actor_homes_mut(&mut self) -> &mut ActorHomes {
        &mut self.homes
    }

    /// Settles the conflict on `field` by writing its candidate number
    /// `choice` (an index into [`Conflict::candidates`]) over all of them.
    /// Works under any policy; it is how a user-choice conflict ends.
    /// Returns the entity as it now reads, and the outputs of the write plus
    /// an [`Output::Conflict`] audit record.
    pub fn resolve_conflict(
        &mut self,
        id: DocId,
        field: &Field,
        choice: usize,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<(ResolvedEntity, Vec<Output<P>>)> {
        expect_kind(self, id, DocKind::Entity)?;
        let before = self.resolved_entity(id)?;
        let Some(conflict) = before.conflicts.iter().find(|c| &c.field == field) else {
            return Err(Error::Conflict {
                field: field.to_string(),
                reason: "the field has no conflict".into(),
            });
        };
        let Some(picked) = conflict.candidates.get(choice) else {
            return Err(Error::Conflict {
                field: field.to_string(),
                reason: format!(
                    "choice {choice} is out of range: there are {} candidates",
                    conflict.candidates.len()
                ),
            });
        };
        let value = picked.value.clone();
        let current = Entity::read(self.doc(id)?)?;
        let update = match field {
            Field::State => match &value {
                Json::String(s) => EntityUpdate {
                    state: s.clone(),
                    attributes: None,
                },
                _ => {
                    return Err(Error::Conflict {
                        field: field.to_string(),
                        reason: "the state must be a string".into(),
                    });
                }
            },
            Field::Attribute(k) => {
                // Every other field is written back as the document already
                // has it, so only this one changes.
                let mut attributes = current.attributes.clone();
                attributes.insert(k.clone(), value.clone());
                EntityUpdate {
                    state: current.state.clone(),
                    attributes: Some(attributes),
                }
            }
        };
        let (_, mut out) = self.transact(id, now_ms, correlation_id, |doc, at, by| {
            write_settled(doc, &update, Some(field), at, by)
        })?;
        out.push(Output::Conflict(ConflictRecord {
            doc: id,
            entity: current.id,
            field: field.clone(),
            candidates: conflict.candidates.clone(),
            chosen: Some(value),
            policy: before.policy,
            action: ConflictAction::Resolved,
            at_ms: now_ms,
            by: Some(self.actor().clone()),
        }));
        Ok((self.resolved_entity(id)?, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness_docs::Cluster;
    use serde_json::json;

    const DOC: DocId = DocId::from_bytes([21; 16]);

    fn state(s: &str) -> EntityUpdate {
        EntityUpdate {
            state: s.into(),
            attributes: None,
        }
    }

    fn with_attrs(s: &str, attrs: Json) -> EntityUpdate {
        EntityUpdate {
            state: s.into(),
            attributes: attrs.as_object().cloned(),
        }
    }

    /// Nodes 0 and 2 are devices of the owner home, node 1 of a sharer.
    fn cluster(policy: Policy) -> Cluster {
        let mut c = Cluster::new(&["home-1", "home-2", "home-1"]);
        c.share_entity(DOC, policy);
        c
    }

    /// Node `a` writes `first` and node `b` writes `second` 5 ms later,
    /// concurrently; then the network settles.
    fn concurrent(
        c: &mut Cluster,
        a: usize,
        first: &EntityUpdate,
        b: usize,
        second: &EntityUpdate,
    ) {
        c.write(a, DOC, first, 0);
        c.write(b, DOC, second, 5);
        c.settle();
    }

    fn actor(i: usize) -> ActorId {
        crate::ids::actor_for_peer(format!("peer-{i}").as_bytes())
    }

    /// Every node shows `expected` as the state and holds exactly one
    /// detection record for it, naming both writers.
    fn assert_state_everywhere(
        c: &mut Cluster,
        policy: Policy,
        expected: &str,
        writers: [usize; 2],
    ) {
        let first = c.nodes[0].resolved_entity(DOC).unwrap();
        for (i, node) in c.nodes.iter().enumerate() {
            let r = node.resolved_entity(DOC).unwrap();
            assert_eq!(r, first, "node {i} resolves alike");
            assert_eq!(r.entity.state, expected, "node {i}");
            assert_eq!(
                node.entity(DOC).unwrap().state,
                expected,
                "entity() applies the policy"
            );
        }
        let conflict = &first.conflicts[0];
        assert_eq!(conflict.field, Field::State);
        let mut authors: Vec<_> = conflict
            .candidates
            .iter()
            .map(|x| x.actor.clone())
            .collect();
        authors.sort();
        let mut want = vec![actor(writers[0]), actor(writers[1])];
        want.sort();
        assert_eq!(authors, want);
        // Each writer detects the conflict once, when the other's change
        // arrives; a bystander detects it once too.
        for (i, records) in c.records.iter().enumerate() {
            assert_eq!(records.len(), 1, "node {i}: {records:?}");
            let r = &records[0];
            assert_eq!((r.doc, r.entity.as_str()), (DOC, "light.test"));
            assert_eq!(r.field, Field::State);
            assert_eq!(r.policy, policy);
            assert_eq!(r.action, ConflictAction::Detected);
            assert_eq!(r.candidates, conflict.candidates);
            assert_eq!(r.chosen, conflict.chosen);
            assert_eq!(r.by, None);
        }
    }

    #[test]
    fn latest_wins_picks_the_newer_write_on_every_replica() {
        let mut c = cluster(Policy::LatestWins);
        concurrent(&mut c, 0, &state("on"), 1, &state("dim"));
        assert_state_everywhere(&mut c, Policy::LatestWins, "dim", [0, 1]);
        let r = &c.records[0][0];
        assert_eq!(r.chosen, Some(json!("dim")));
        assert_eq!(r.candidates[0].value, json!("dim"), "newest first");
        assert!(r.candidates[0].at > r.candidates[1].at);
        // Later, unrelated writes and reads do not report it again.
        for _ in 0..3 {
            c.nodes[1].resolved_entity(DOC).unwrap();
        }
        c.write(2, DOC, &with_attrs("dim", json!({"x": 1})), 50);
        c.settle();
        assert!(c.records.iter().all(|r| r.len() == 1), "{:?}", c.records);
        // The stamp follows the newest write too.
        let e = c.nodes[0].entity(DOC).unwrap();
        assert_eq!(e.updated_by, actor(2));
    }

    #[test]
    fn latest_wins_ties_break_by_actor() {
        let mut c = cluster(Policy::LatestWins);
        // Same wall time on both: the counter is equal too, so the actor in
        // the clock decides, the same way everywhere.
        c.write(0, DOC, &state("a"), 7);
        c.write(1, DOC, &state("b"), 7);
        c.settle();
        let r = c.nodes[0].resolved_entity(DOC).unwrap();
        let winner = if actor(0).to_bytes() > actor(1).to_bytes() {
            "a"
        } else {
            "b"
        };
        assert_eq!(r.entity.state, winner);
        assert_eq!(c.nodes[1].resolved_entity(DOC).unwrap(), r);
    }

    #[test]
    fn merge_takes_each_sides_keys_and_latest_wins_does_not() {
        let start = json!({"color": {"r": 0, "g": 0, "b": 0}});
        let red = json!({"color": {"r": 255, "g": 0, "b": 0}});
        let green = json!({"color": {"r": 0, "g": 128, "b": 0}});
        for (policy, expected) in [
            (Policy::Merge, json!({"r": 255, "g": 128, "b": 0})),
            (Policy::LatestWins, json!({"r": 0, "g": 128, "b": 0})),
        ] {
            let mut c = cluster(policy);
            c.write(0, DOC, &with_attrs("on", start.clone()), 1);
            c.settle();
            concurrent(
                &mut c,
                0,
                &with_attrs("on", red.clone()),
                1,
                &with_attrs("dim", green.clone()),
            );
            for node in &c.nodes {
                let r = node.resolved_entity(DOC).unwrap();
                assert_eq!(r.entity.attributes["color"], expected, "{policy}");
                // Only one side changed the state: no conflict, its value.
                assert_eq!(r.entity.state, "dim", "{policy}");
            }
            for records in &c.records {
                let color = records
                    .iter()
                    .find(|r| r.field == Field::Attribute("color".into()))
                    .unwrap();
                assert_eq!(color.chosen.as_ref(), Some(&expected));
                assert_eq!(color.policy, policy);
                assert_eq!(color.candidates.len(), 2);
                assert_eq!(records.len(), 1, "color, once");
            }
        }
    }

    #[test]
    fn merge_keeps_a_key_only_one_side_removed_as_removed() {
        let mut c = cluster(Policy::Merge);
        c.write(0, DOC, &with_attrs("on", json!({"m": {"a": 1, "b": 2}})), 1);
        c.settle();
        // One side drops `b`, the other changes `a`.
        concurrent(
            &mut c,
            0,
            &with_attrs("on", json!({"m": {"a": 1}})),
            1,
            &with_attrs("on", json!({"m": {"a": 9, "b": 2}})),
        );
        let r = c.nodes[2].resolved_entity(DOC).unwrap();
        assert_eq!(r.entity.attributes["m"], json!({"a": 9}));
    }

    #[test]
    fn owner_wins_prefers_the_owner_even_when_older() {
        let mut c = cluster(Policy::OwnerWins);
        concurrent(&mut c, 0, &state("owner"), 1, &state("sharer"));
        assert_state_everywhere(&mut c, Policy::OwnerWins, "owner", [0, 1]);
        let r = &c.records[1][0];
        assert_eq!(r.chosen, Some(json!("owner")));
        let homes: Vec<_> = r.candidates.iter().map(|x| x.home.as_deref()).collect();
        assert_eq!(homes, [Some("home-2"), Some("home-1")]);
    }

    #[test]
    fn owner_wins_falls_back_to_latest_within_one_side() {
        let mut c = cluster(Policy::OwnerWins);
        // Nodes 0 and 2 are both the owner's devices.
        concurrent(&mut c, 0, &state("first"), 2, &state("second"));
        assert_state_everywhere(&mut c, Policy::OwnerWins, "second", [0, 2]);
    }

    #[test]
    fn sharer_wins_prefers_the_granted_home_even_when_older() {
        let mut c = cluster(Policy::SharerWins);
        concurrent(&mut c, 1, &state("sharer"), 0, &state("owner"));
        assert_state_everywhere(&mut c, Policy::SharerWins, "sharer", [0, 1]);
        assert_eq!(c.records[2][0].chosen, Some(json!("sharer")));
    }

    #[test]
    fn sharer_wins_falls_back_to_latest_within_one_side() {
        let mut c = cluster(Policy::SharerWins);
        concurrent(&mut c, 2, &state("first"), 0, &state("second"));
        assert_state_everywhere(&mut c, Policy::SharerWins, "second", [0, 2]);
    }

    #[test]
    fn an_unknown_device_is_on_neither_side() {
        let mut c = Cluster::new(&["home-1", "home-2", "home-1"]);
        for node in &mut c.nodes {
            node.actor_homes_mut().remove(&actor(1));
        }
        c.share_entity(DOC, Policy::SharerWins);
        concurrent(&mut c, 1, &state("stranger"), 0, &state("owner"));
        // No candidate from a granted home: latest-wins.
        assert_eq!(c.nodes[2].entity(DOC).unwrap().state, "owner");
        let r = c.nodes[2].resolved_entity(DOC).unwrap();
        assert!(r.conflicts[0].candidates.iter().any(|x| x.home.is_none()));
    }

    #[test]
    fn user_choice_keeps_both_until_resolved() {
        let mut c = cluster(Policy::UserChoice);
        concurrent(&mut c, 0, &state("mine"), 1, &state("theirs"));
        for node in &c.nodes {
            let r = node.resolved_entity(DOC).unwrap();
            let pending: Vec<_> = r.pending().collect();
            assert_eq!(pending.len(), 1);
            let values: Vec<_> = pending[0]
                .candidates
                .iter()
                .map(|x| x.value.clone())
                .collect();
            assert_eq!(values, [json!("theirs"), json!("mine")]);
            // Shown provisionally: the newest.
            assert_eq!(r.entity.state, "theirs");
        }
        for records in &c.records {
            assert_eq!(records.len(), 1);
            assert_eq!(records[0].chosen, None);
            assert_eq!(records[0].policy, Policy::UserChoice);
        }
        // Reading never writes: heads are unchanged by all the reads above.
        let heads = c.nodes[0].heads(DOC).unwrap();
        c.settle();
        assert_eq!(c.nodes[0].heads(DOC).unwrap(), heads);

        // Someone on node 2 picks the older value.
        let now = c.now_ms;
        let (after, out) = c.nodes[2]
            .resolve_conflict(DOC, &Field::State, 1, now, Some("pick".into()))
            .unwrap();
        assert_eq!(after.entity.state, "mine");
        assert!(after.conflicts.is_empty());
        c.absorb(2, out);
        c.settle();
        for node in &c.nodes {
            let r = node.resolved_entity(DOC).unwrap();
            assert_eq!(r.entity.state, "mine");
            assert_eq!(r.pending().count(), 0);
        }
        let resolved = &c.records[2][1];
        assert_eq!(resolved.action, ConflictAction::Resolved);
        assert_eq!(resolved.chosen, Some(json!("mine")));
        assert_eq!(resolved.by, Some(actor(2)));
        assert_eq!(resolved.candidates.len(), 2);
        // The resolution settles it: no node detects anything new.
        assert_eq!(c.records[0].len(), 1);
        assert_eq!(c.records[1].len(), 1);
    }

    #[test]
    fn resolving_an_attribute_touches_only_that_attribute() {
        let mut c = cluster(Policy::UserChoice);
        concurrent(
            &mut c,
            0,
            &with_attrs("a", json!({"level": 1, "mode": "x"})),
            1,
            &with_attrs("b", json!({"level": 2, "mode": "y"})),
        );
        let r = c.nodes[0].resolved_entity(DOC).unwrap();
        assert_eq!(r.conflicts.len(), 3);
        let field = Field::Attribute("level".into());
        let (after, out) = c.nodes[0]
            .resolve_conflict(DOC, &field, 1, c.now_ms, None)
            .unwrap();
        c.absorb(0, out);
        c.settle();
        assert_eq!(after.entity.attributes["level"], json!(1));
        let fields: Vec<_> = after
            .conflicts
            .iter()
            .map(|x| x.field.to_string())
            .collect();
        assert_eq!(fields, ["state", "attributes.mode"]);
        assert_eq!(c.nodes[1].resolved_entity(DOC).unwrap(), after);
    }

    #[test]
    fn bad_resolutions_are_error_values() {
        let mut c = cluster(Policy::UserChoice);
        let now = c.now_ms;
        let err = c.nodes[0]
            .resolve_conflict(DOC, &Field::State, 0, now, None)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Conflict { field, .. } if field == "state"),
            "{err}"
        );
        concurrent(&mut c, 0, &state("x"), 1, &state("y"));
        let err = c.nodes[0]
            .resolve_conflict(DOC, &Field::State, 2, now, None)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Conflict { reason, .. } if reason.contains("out of range")),
            "{err}"
        );
    }

    #[test]
    fn a_policy_change_applies_to_existing_conflicts_on_every_replica() {
        let mut c = cluster(Policy::LatestWins);
        concurrent(&mut c, 0, &state("owner"), 1, &state("sharer"));
        assert_eq!(c.nodes[2].entity(DOC).unwrap().state, "sharer");
        let out = c.nodes[1]
            .set_entity_policy(DOC, Policy::OwnerWins, c.now_ms, None)
            .unwrap();
        c.absorb(1, out);
        c.settle();
        for node in &c.nodes {
            assert_eq!(node.entity_policy(DOC).unwrap(), Policy::OwnerWins);
            assert_eq!(node.entity(DOC).unwrap().state, "owner");
        }
    }

    #[test]
    fn malformed_policies_and_candidates_are_schema_errors() {
        let mut c = cluster(Policy::LatestWins);
        let (_, out) = c.nodes[0]
            .transact(DOC, c.now_ms, None, |doc, _, _| {
                let (_, e) = doc.get(ROOT, ENTITY_KEY).unwrap().unwrap();
                doc.put(&e, POLICY_KEY, "coin-toss").unwrap();
                Ok(())
            })
            .unwrap();
        c.absorb(0, out);
        c.settle();
        let err = c.nodes[1].entity(DOC).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { path, .. } if path == "entity.policy"),
            "{err}"
        );
        let out = c.nodes[1]
            .set_entity_policy(DOC, Policy::Merge, c.now_ms, None)
            .unwrap();
        c.absorb(1, out);
        c.settle();
        assert_eq!(c.nodes[0].entity_policy(DOC).unwrap(), Policy::Merge);

        // A peer writes a number as a concurrent state.
        c.write(0, DOC, &state("ok"), 1);
        let (_, out) = c.nodes[1]
            .transact(DOC, c.now_ms, None, |doc, _, _| {
                let (_, e) = doc.get(ROOT, ENTITY_KEY).unwrap().unwrap();
                doc.put(&e, "state", 4_i64).unwrap();
                Ok(())
            })
            .unwrap();
        c.absorb(1, out);
        c.settle();
        for node in &c.nodes {
            let err = node.resolved_entity(DOC).unwrap_err();
            assert!(
                matches!(&err, Error::Schema { path, .. } if path == "entity.state"),
                "{err}"
            );
        }
    }

    #[test]
    fn names_parse_and_print() {
        for p in Policy::ALL {
            assert_eq!(Policy::parse(p.as_str()), Some(p));
        }
        assert_eq!(Policy::parse("local-wins"), None);
        assert_eq!(Field::parse("state"), Some(Field::State));
        assert_eq!(
            Field::parse("attributes.a.b"),
            Some(Field::Attribute("a.b".into()))
        );
        assert_eq!(Field::parse("attributes."), None);
        assert_eq!(Field::Attribute("x".into()).to_string(), "attributes.x");
    }
}
