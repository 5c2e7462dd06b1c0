//! Typed view of the home's `users` document (one per home): each user's state, which
//! follows them across their clients and devices, and their client sessions.
//!
//! Layout under the root key `users`: `<user>` = map {
//! `state`: map { `<key>`: map { `value`: string (JSON text), `at`: string (HLC),
//!   `client`: string (the client's device id) } },
//! `sessions`: map { `<client>`: map { `node`: string (PeerId), `opened`: uint ms,
//!   `closed`: uint ms, 0 while a socket is open } },
//! `notifications`: map { `<id>`: map { `kind`, `priority`, `title`, `body`: string,
//!   `data`: string (JSON object text), `created`, `expires`: uint ms } },
//! `push`: map { `<id>`: string (a Web Push subscription as JSON text) } },
//! and at the root `vapid`: string, the home's Web Push (VAPID) private key in base64url,
//! written once by the admin device.
//!
//! Every write of a state key puts a fresh map, so writes made concurrently on two devices
//! stay side by side as Automerge conflicts. The reader keeps them all: the winner is the
//! one with the highest HLC (last writer wins per top-level key), and the losers are the
//! concurrent candidates a vector-clock reading surfaces.
//!
//! Two devices that first write a user (or one part of a user) at the same moment each
//! make a map at that key, and Automerge keeps both side by side. Readers merge every map
//! at the key, and a write of an item deletes it from the maps beside the one it writes,
//! so no device's write is hidden behind the other's map.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};

use super::fields::{check_name, check_text, req_hlc, req_name};
use super::room::expect_kind;
use super::{DocKind, Header, am, ensure_map, join, keys, req_map, req_str, req_u64};
use crate::engine::{Engine, Output};
use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::ids::{DocId, KeyEpoch};

/// Root key of the users map.
pub const USERS_KEY: &str = "users";
/// Longest value of one state key, in bytes of JSON text.
pub const MAX_STATE_VALUE_BYTES: usize = 16 * 1024;
/// Most keys in one user's state.
pub const MAX_STATE_KEYS: usize = 256;
/// Most users in one home's document.
pub const MAX_USERS: usize = 4096;
/// Most client sessions kept per user (open or recently closed).
pub const MAX_SESSIONS: usize = 64;
/// Most notifications kept per user; the oldest go first.
pub const MAX_NOTIFICATIONS: usize = 256;
/// Longest notification title, in bytes.
pub const MAX_TITLE_BYTES: usize = 256;
/// Longest notification body, in bytes.
pub const MAX_BODY_BYTES: usize = 4096;
/// Longest notification data, in bytes of JSON text.
pub const MAX_DATA_BYTES: usize = 16 * 1024;

/// Most Web Push subscriptions kept per user.
pub const MAX_PUSH_SUBSCRIPTIONS: usize = 16;
/// Longest Web Push subscription, in bytes of JSON text.
pub const MAX_SUBSCRIPTION_BYTES: usize = 2048;
/// Root key of the home's VAPID key.
pub const VAPID_KEY: &str = "vapid";

/// A notification for a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredNotification {
    /// Its kind (seed 001's type, e.g. `milestone_achieved`).
    pub kind: String,
    /// `low`, `normal`, `high` or `urgent`.
    pub priority: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Data, as JSON object text.
    pub data: String,
    /// When it was made, ms since the Unix epoch.
    pub created_ms: u64,
    /// When it expires, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// One written value of a state key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateValue {
    /// The value, as JSON text.
    pub value: String,
    /// When it was written.
    pub at: Hlc,
    /// The client (device id) that wrote it.
    pub client: String,
}

/// One state key: the winner and any concurrent writes beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateKey {
    /// The value with the highest HLC.
    pub winner: StateValue,
    /// Concurrent writes that lost, highest first.
    pub concurrent: Vec<StateValue>,
}

/// A client session of a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSession {
    /// The node (PeerId) the client is connected to.
    pub node: String,
    /// When it opened, ms since the Unix epoch.
    pub opened_ms: u64,
    /// When its last socket closed; 0 while one is open.
    pub closed_ms: u64,
}

/// One user's entry.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UserEntry {
    /// State by top-level key.
    pub state: BTreeMap<String, StateKey>,
    /// Sessions by client device id.
    pub sessions: BTreeMap<String, ClientSession>,
    /// Notifications by id.
    pub notifications: BTreeMap<String, StoredNotification>,
    /// Web Push subscriptions (JSON text) by id.
    pub push: BTreeMap<String, String>,
    /// Items that did not validate and were left out, with why.
    pub skipped: Vec<String>,
}

/// The users document, after validation.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Users {
    /// Entries by user.
    pub users: BTreeMap<String, UserEntry>,
    /// Items that did not validate and were left out, with why.
    pub skipped: Vec<String>,
}

fn read_value<D: ReadDoc>(doc: &D, obj: &automerge::ObjId, path: &str) -> Result<StateValue> {
    let value = req_str(doc, obj, "value", &join(path, "value"))?;
    check_text(&join(path, "value"), &value, MAX_STATE_VALUE_BYTES)?;
    if serde_json::from_str::<serde_json::Value>(&value).is_err() {
        return Err(Error::schema(join(path, "value"), "is not JSON text"));
    }
    Ok(StateValue {
        value,
        at: req_hlc(doc, obj, "at", &join(path, "at"))?,
        client: req_name(doc, obj, "client", &join(path, "client"))?,
    })
}

fn read_session<D: ReadDoc>(
    doc: &D,
    s: &automerge::ObjId,
    client: &str,
    cpath: &str,
) -> Result<ClientSession> {
    check_name(cpath, client)?;
    let c = req_map(doc, s, client, cpath)?;
    Ok(ClientSession {
        node: req_name(doc, &c, "node", &join(cpath, "node"))?,
        opened_ms: req_u64(doc, &c, "opened", &join(cpath, "opened"))?,
        closed_ms: req_u64(doc, &c, "closed", &join(cpath, "closed"))?,
    })
}

fn read_notification<D: ReadDoc>(
    doc: &D,
    s: &automerge::ObjId,
    id: &str,
    npath: &str,
) -> Result<StoredNotification> {
    check_name(npath, id)?;
    let n = req_map(doc, s, id, npath)?;
    let text = |key: &str, max: usize| -> Result<String> {
        let v = req_str(doc, &n, key, &join(npath, key))?;
        check_text(&join(npath, key), &v, max)?;
        Ok(v)
    };
    let data = text("data", MAX_DATA_BYTES)?;
    if !matches!(
        serde_json::from_str::<serde_json::Value>(&data),
        Ok(serde_json::Value::Object(_))
    ) {
        return Err(Error::schema(join(npath, "data"), "is not a JSON object"));
    }
    Ok(StoredNotification {
        kind: req_name(doc, &n, "kind", &join(npath, "kind"))?,
        priority: req_name(doc, &n, "priority", &join(npath, "priority"))?,
        title: text("title", MAX_TITLE_BYTES)?,
        body: text("body", MAX_BODY_BYTES)?,
        data,
        created_ms: req_u64(doc, &n, "created", &join(npath, "created"))?,
        expires_ms: req_u64(doc, &n, "expires", &join(npath, "expires"))?,
    })
}

/// Most maps read at one key. Two devices that first write a user (or one part of a
/// user) at the same moment each make a map at that key, and Automerge keeps both side by
/// side; there are at most as many as devices that wrote at once.
const MAX_CONFLICTING_MAPS: usize = 16;

/// Every map at `key` under `obj`, the winner first and then the maps written
/// concurrently beside it, at most [`MAX_CONFLICTING_MAPS`]. Values that are not maps
/// are left out.
fn maps_at<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str) -> Result<Vec<ObjId>> {
    let winner = match doc.get(obj, key).map_err(am)? {
        Some((Value::Object(ObjType::Map), id)) => Some(id),
        _ => None,
    };
    let mut maps: Vec<ObjId> = winner.iter().cloned().collect();
    for (value, id) in doc.get_all(obj, key).map_err(am)? {
        if maps.len() >= MAX_CONFLICTING_MAPS {
            break;
        }
        if matches!(value, Value::Object(ObjType::Map)) && Some(&id) != winner.as_ref() {
            maps.push(id);
        }
    }
    Ok(maps)
}

/// The maps of part `part` (`state`, `sessions`, ...) under every map of a user, the
/// winner's winner first, at most [`MAX_CONFLICTING_MAPS`].
fn part_maps<D: ReadDoc>(doc: &D, user_maps: &[ObjId], part: &str) -> Result<Vec<ObjId>> {
    let mut out = Vec::new();
    for e in user_maps {
        for m in maps_at(doc, e, part)? {
            if out.len() < MAX_CONFLICTING_MAPS {
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// The names to read in `maps` (one part of a user): every key of any of them, or those
/// of `only` that one of them holds, at most `cap` (the rest are reported).
fn part_names<D: ReadDoc>(
    doc: &D,
    maps: &[ObjId],
    cap: usize,
    path: &str,
    skipped: &mut Vec<String>,
    only: Option<&BTreeSet<String>>,
) -> Vec<String> {
    let mut names = BTreeSet::new();
    match only {
        Some(only) => {
            for name in only {
                if names.len() >= cap {
                    break;
                }
                if maps
                    .iter()
                    .any(|m| matches!(doc.get(m, name.as_str()), Ok(Some(_))))
                {
                    names.insert(name.clone());
                }
            }
        }
        None => {
            let mut over = false;
            for m in maps {
                for name in doc.keys(m) {
                    if names.len() < cap {
                        names.insert(name);
                    } else if !names.contains(&name) {
                        over = true;
                    }
                }
            }
            if over {
                skipped.push(format!(
                    "{path}: over the cap of {cap} entries; the rest are not read"
                ));
            }
        }
    }
    names.into_iter().collect()
}

/// The map holding part `part` of `user` for a write, created when absent, and the other
/// maps of that part written concurrently beside it (under the user's winning map or
/// beside it). A write of an item puts it in the first and deletes it from the others,
/// so that the write supersedes every copy it saw.
fn part_for_write<T: Transactable>(
    doc: &mut T,
    user: &str,
    part: &str,
) -> Result<(ObjId, Vec<ObjId>)> {
    let e = user_map(doc, user)?;
    let target = map_for_write(doc, &e, part)?;
    let users = ensure_map(doc, &ROOT, USERS_KEY)?;
    let user_maps = maps_at(doc, &users, user)?;
    let others = part_maps(doc, &user_maps, part)?
        .into_iter()
        .filter(|m| *m != target)
        .collect();
    Ok((target, others))
}

/// The map at `key` under `obj` a write goes to: the winner when it is a map, else the
/// first map beside it, and a new one only when there is none. A value of another kind
/// (a peer's bad write) that wins is replaced only then, so a write never drops maps
/// that readers show.
fn map_for_write<T: Transactable>(doc: &mut T, obj: &ObjId, key: &str) -> Result<ObjId> {
    match maps_at(doc, obj, key)?.into_iter().next() {
        Some(m) => Ok(m),
        None => ensure_map(doc, obj, key),
    }
}

/// The distinct keys of `maps`.
fn union_keys<D: ReadDoc>(doc: &D, maps: &[ObjId]) -> BTreeSet<String> {
    maps.iter().flat_map(|m| doc.keys(m)).collect()
}

/// The first of `maps` (the winner first) that holds `key`.
fn holder<'m, D: ReadDoc>(doc: &D, maps: &'m [ObjId], key: &str) -> Option<&'m ObjId> {
    maps.iter().find(|m| matches!(doc.get(m, key), Ok(Some(_))))
}

/// Deletes `key` from each of `maps` that holds it.
fn delete_from<T: Transactable>(doc: &mut T, maps: &[ObjId], key: &str) -> Result<()> {
    for m in maps {
        if doc.get(m, key).map_err(am)?.is_some() {
            doc.delete(m, key).map_err(am)?;
        }
    }
    Ok(())
}

/// Which parts of a user's entry a read decodes; the others are left empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parts {
    /// The state keys.
    pub state: bool,
    /// The client sessions.
    pub sessions: bool,
    /// The stored notifications.
    pub notifications: bool,
    /// The Web Push subscriptions.
    pub push: bool,
}

impl Parts {
    /// Every part.
    pub const ALL: Parts = Parts {
        state: true,
        sessions: true,
        notifications: true,
        push: true,
    };
    /// None: set the fields wanted.
    pub const NONE: Parts = Parts {
        state: false,
        sessions: false,
        notifications: false,
        push: false,
    };
}

/// Which state keys and notifications a read decodes, when not all of them: the ones
/// some changes wrote (see `touched`). Names not in the document are left out.
#[derive(Clone, Copy, Debug, Default)]
pub struct Only<'a> {
    /// These state keys only.
    pub state: Option<&'a BTreeSet<String>>,
    /// These notifications only.
    pub notifications: Option<&'a BTreeSet<String>>,
}

/// Reads one user's entry from every map at its key (two devices that first wrote the
/// user at once made one each), merging them: each state key keeps every value written
/// concurrently, and a session, notification or subscription held in more than one map
/// is read from the winning one. An item that does not validate (a peer's bad write, or
/// two devices crossing a cap at once) is left out and reported in `skipped`, so one bad
/// item never hides the rest of the user, nor the other users.
fn read_entry<D: ReadDoc>(
    doc: &D,
    user_maps: &[ObjId],
    path: &str,
    parts: Parts,
    only: Only<'_>,
) -> Result<UserEntry> {
    let mut entry = UserEntry::default();
    let mut skipped = Vec::new();
    if parts.state {
        let maps = part_maps(doc, user_maps, "state")?;
        let spath = join(path, "state");
        for key in part_names(doc, &maps, MAX_STATE_KEYS, &spath, &mut skipped, only.state) {
            let kpath = join(&spath, &key);
            let read = check_name(&kpath, &key).and_then(|()| {
                let mut values: Vec<StateValue> = Vec::new();
                for m in &maps {
                    for (v, id) in doc.get_all(m, key.as_str()).map_err(am)? {
                        match v {
                            Value::Object(ObjType::Map) => {
                                values.push(read_value(doc, &id, &kpath)?);
                            }
                            other => {
                                return Err(Error::schema(
                                    &kpath,
                                    format!("must be a map, found {other:?}"),
                                ));
                            }
                        }
                    }
                }
                Ok(values)
            });
            match read {
                Ok(mut values) => {
                    values.sort_by_key(|v| std::cmp::Reverse(v.at));
                    let mut values = values.into_iter();
                    if let Some(winner) = values.next() {
                        entry.state.insert(
                            key,
                            StateKey {
                                winner,
                                concurrent: values.collect(),
                            },
                        );
                    }
                }
                Err(error) => skipped.push(error.to_string()),
            }
        }
    }
    if parts.sessions {
        let maps = part_maps(doc, user_maps, "sessions")?;
        let spath = join(path, "sessions");
        for client in part_names(doc, &maps, MAX_SESSIONS * 2, &spath, &mut skipped, None) {
            let cpath = join(&spath, &client);
            // The first map (the winner) that holds it.
            let Some(m) = holder(doc, &maps, &client) else {
                continue;
            };
            match read_session(doc, m, &client, &cpath) {
                Ok(session) => {
                    entry.sessions.insert(client, session);
                }
                Err(error) => skipped.push(error.to_string()),
            }
        }
    }
    if parts.notifications {
        let maps = part_maps(doc, user_maps, "notifications")?;
        let npath = join(path, "notifications");
        let names = part_names(
            doc,
            &maps,
            MAX_NOTIFICATIONS * 2,
            &npath,
            &mut skipped,
            only.notifications,
        );
        for id in names {
            let ipath = join(&npath, &id);
            let Some(m) = holder(doc, &maps, &id) else {
                continue;
            };
            match read_notification(doc, m, &id, &ipath) {
                Ok(n) => {
                    entry.notifications.insert(id, n);
                }
                Err(error) => skipped.push(error.to_string()),
            }
        }
    }
    if parts.push {
        let maps = part_maps(doc, user_maps, "push")?;
        let ppath = join(path, "push");
        for id in part_names(
            doc,
            &maps,
            MAX_PUSH_SUBSCRIPTIONS,
            &ppath,
            &mut skipped,
            None,
        ) {
            let spath = join(&ppath, &id);
            let Some(m) = holder(doc, &maps, &id) else {
                continue;
            };
            let read = check_name(&spath, &id)
                .and_then(|()| req_str(doc, m, &id, &spath))
                .and_then(|text| check_text(&spath, &text, MAX_SUBSCRIPTION_BYTES).map(|()| text));
            match read {
                Ok(text) => {
                    entry.push.insert(id, text);
                }
                Err(error) => skipped.push(error.to_string()),
            }
        }
    }
    entry.skipped = skipped;
    Ok(entry)
}

/// Adds (or replaces) Web Push subscription `id` of `user`.
pub fn put_push_subscription<T: Transactable>(
    doc: &mut T,
    user: &str,
    id: &str,
    subscription: &str,
) -> Result<()> {
    let spath = join(&join(&join(USERS_KEY, user), "push"), id);
    check_name(&spath, id)?;
    check_text(&spath, subscription, MAX_SUBSCRIPTION_BYTES)?;
    let (s, others) = part_for_write(doc, user, "push")?;
    let held = union_keys(doc, &[std::slice::from_ref(&s), others.as_slice()].concat());
    if !held.contains(id) && held.len() >= MAX_PUSH_SUBSCRIPTIONS {
        return Err(Error::schema(
            join(&join(USERS_KEY, user), "push"),
            format!("already holds {MAX_PUSH_SUBSCRIPTIONS} subscriptions"),
        ));
    }
    delete_from(doc, &others, id)?;
    doc.put(&s, id, subscription).map_err(am)?;
    Ok(())
}

/// Removes Web Push subscription `id` of `user`; false when there was none.
pub fn remove_push_subscription<T: Transactable>(
    doc: &mut T,
    user: &str,
    id: &str,
) -> Result<bool> {
    let (s, mut maps) = part_for_write(doc, user, "push")?;
    maps.push(s);
    let mut held = false;
    for m in &maps {
        held |= doc.get(m, id).map_err(am)?.is_some();
    }
    delete_from(doc, &maps, id)?;
    Ok(held)
}

/// The home's VAPID private key (base64url), if written.
pub fn vapid_key<D: ReadDoc>(doc: &D) -> Result<Option<String>> {
    match doc.get(&ROOT, VAPID_KEY).map_err(am)? {
        None => Ok(None),
        Some(_) => {
            let key = req_str(doc, &ROOT, VAPID_KEY, VAPID_KEY)?;
            check_text(VAPID_KEY, &key, 128)?;
            Ok(Some(key))
        }
    }
}

/// Writes the home's VAPID private key (base64url).
pub fn put_vapid_key<T: Transactable>(doc: &mut T, key: &str) -> Result<()> {
    check_text(VAPID_KEY, key, 128)?;
    doc.put(&ROOT, VAPID_KEY, key).map_err(am)?;
    Ok(())
}

/// Adds notification `id` for `user`. When the user holds [`MAX_NOTIFICATIONS`]
/// already, expired ones go first and then the oldest; below that, expired ones stay
/// (readers skip them).
pub fn put_notification<T: Transactable>(
    doc: &mut T,
    user: &str,
    id: &str,
    n: &StoredNotification,
    now_ms: u64,
) -> Result<()> {
    let path = join(&join(USERS_KEY, user), "notifications");
    let npath = join(&path, id);
    check_name(&npath, id)?;
    check_name(&join(&npath, "kind"), &n.kind)?;
    check_name(&join(&npath, "priority"), &n.priority)?;
    check_text(&join(&npath, "title"), &n.title, MAX_TITLE_BYTES)?;
    check_text(&join(&npath, "body"), &n.body, MAX_BODY_BYTES)?;
    check_text(&join(&npath, "data"), &n.data, MAX_DATA_BYTES)?;
    let (s, others) = part_for_write(doc, user, "notifications")?;
    delete_from(doc, &others, id)?;
    // Only a full part is pruned: readers skip expired notifications, so below the cap
    // they may stay, and a write does not read every notification the user holds.
    let held: BTreeSet<String> = union_keys(doc, &others)
        .into_iter()
        .chain(doc.keys(&s))
        .filter(|k| k != id)
        .collect();
    if held.len() < MAX_NOTIFICATIONS {
        return write_notification(doc, &s, id, n);
    }
    // Expired and then the oldest notifications go from every map of the part.
    let mut kept: Vec<(ObjId, ObjId, String)> = Vec::new();
    for m in std::iter::once(&s).chain(&others) {
        for other in keys(doc, m) {
            if let Some((Value::Object(ObjType::Map), o)) =
                doc.get(m, other.as_str()).map_err(am)?
            {
                let expires = req_u64(doc, &o, "expires", "expires").unwrap_or(0);
                if expires <= now_ms || other == id {
                    doc.delete(m, other.as_str()).map_err(am)?;
                } else {
                    kept.push((m.clone(), o, other));
                }
            }
        }
    }
    let over = (kept.len() + 1).saturating_sub(MAX_NOTIFICATIONS);
    if over > 0 {
        // The oldest go: their creation times are read only when some must.
        let mut by_age: Vec<(u64, ObjId, String)> = kept
            .into_iter()
            .map(|(m, o, id)| (req_u64(doc, &o, "created", "created").unwrap_or(0), m, id))
            .collect();
        by_age.sort_by(|a, b| (a.0, &a.2).cmp(&(b.0, &b.2)));
        for (_, m, old) in by_age.into_iter().take(over) {
            doc.delete(&m, old.as_str()).map_err(am)?;
        }
    }
    write_notification(doc, &s, id, n)
}

/// Writes notification `id` into map `s` of the notifications part.
fn write_notification<T: Transactable>(
    doc: &mut T,
    s: &ObjId,
    id: &str,
    n: &StoredNotification,
) -> Result<()> {
    let o = doc.put_object(s, id, ObjType::Map).map_err(am)?;
    doc.put(&o, "kind", n.kind.as_str()).map_err(am)?;
    doc.put(&o, "priority", n.priority.as_str()).map_err(am)?;
    doc.put(&o, "title", n.title.as_str()).map_err(am)?;
    doc.put(&o, "body", n.body.as_str()).map_err(am)?;
    doc.put(&o, "data", n.data.as_str()).map_err(am)?;
    doc.put(&o, "created", ScalarValue::Uint(n.created_ms))
        .map_err(am)?;
    doc.put(&o, "expires", ScalarValue::Uint(n.expires_ms))
        .map_err(am)?;
    Ok(())
}

impl Users {
    /// Reads the whole document. Only a document without its `users` map fails; a user
    /// entry that is not a map, users past [`MAX_USERS`] and items that do not validate
    /// are left out and reported in `skipped`.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        let u = req_map(doc, &ROOT, USERS_KEY, USERS_KEY)?;
        let mut names = keys(doc, &u);
        let mut skipped = Vec::new();
        if names.len() > MAX_USERS {
            skipped.push(format!(
                "{USERS_KEY}: {} users, over the cap of {MAX_USERS}; the rest are not read",
                names.len()
            ));
            names.truncate(MAX_USERS);
        }
        let mut users = BTreeMap::new();
        for user in names {
            let path = join(USERS_KEY, &user);
            let read = check_name(&path, &user)
                .and_then(|()| user_maps(doc, &u, &user, &path))
                .and_then(|maps| read_entry(doc, &maps, &path, Parts::ALL, Only::default()));
            match read {
                Ok(mut entry) => {
                    skipped.append(&mut entry.skipped);
                    users.insert(user, entry);
                }
                Err(error) => skipped.push(error.to_string()),
            }
        }
        Ok(Self { users, skipped })
    }

    /// Reads one user's entry, if there is one.
    pub fn read_user<D: ReadDoc>(doc: &D, user: &str, parts: Parts) -> Result<Option<UserEntry>> {
        Self::read_user_only(doc, user, parts, Only::default())
    }

    /// Reads one user's entry, if there is one, with only the items `only` names.
    pub fn read_user_only<D: ReadDoc>(
        doc: &D,
        user: &str,
        parts: Parts,
        only: Only<'_>,
    ) -> Result<Option<UserEntry>> {
        let u = req_map(doc, &ROOT, USERS_KEY, USERS_KEY)?;
        let maps = maps_at(doc, &u, user)?;
        if maps.is_empty() {
            return Ok(None);
        }
        read_entry(doc, &maps, &join(USERS_KEY, user), parts, only).map(Some)
    }
}

impl Users {
    /// Reads one client session of `user`, if there is one (from the winning map that
    /// holds it).
    pub fn read_session_of<D: ReadDoc>(
        doc: &D,
        user: &str,
        client: &str,
    ) -> Result<Option<ClientSession>> {
        let u = req_map(doc, &ROOT, USERS_KEY, USERS_KEY)?;
        let maps = part_maps(doc, &maps_at(doc, &u, user)?, "sessions")?;
        let Some(m) = holder(doc, &maps, client) else {
            return Ok(None);
        };
        let cpath = join(&join(&join(USERS_KEY, user), "sessions"), client);
        read_session(doc, m, client, &cpath).map(Some)
    }
}

/// Every map of `user` under the users map `u`; an error when there is none (a value of
/// another kind).
fn user_maps<D: ReadDoc>(doc: &D, u: &ObjId, user: &str, path: &str) -> Result<Vec<ObjId>> {
    let maps = maps_at(doc, u, user)?;
    if maps.is_empty() {
        // Names the value found.
        req_map(doc, u, user, path)?;
    }
    Ok(maps)
}

/// Checks that the document has its `users` map (the only thing a read needs).
pub fn check_root<D: ReadDoc>(doc: &D) -> Result<()> {
    req_map(doc, &ROOT, USERS_KEY, USERS_KEY).map(|_| ())
}

/// Creates the empty layout.
pub(crate) fn init<T: Transactable>(doc: &mut T) -> Result<()> {
    ensure_map(doc, &ROOT, USERS_KEY)?;
    Ok(())
}

fn user_map<T: Transactable>(doc: &mut T, user: &str) -> Result<automerge::ObjId> {
    check_name(&join(USERS_KEY, user), user)?;
    let u = ensure_map(doc, &ROOT, USERS_KEY)?;
    if doc.get(&u, user).map_err(am)?.is_none() && doc.length(&u) >= MAX_USERS {
        return Err(Error::schema(
            USERS_KEY,
            format!("already holds {MAX_USERS} users"),
        ));
    }
    map_for_write(doc, &u, user)
}

/// Writes state keys of `user` from `client` at `at`; each value is JSON text.
pub fn write_state<T: Transactable>(
    doc: &mut T,
    user: &str,
    entries: &BTreeMap<String, String>,
    client: &str,
    at: Hlc,
) -> Result<()> {
    let path = join(USERS_KEY, user);
    check_name(&join(&path, "client"), client)?;
    for (key, value) in entries {
        check_name(&join(&join(&path, "state"), key), key)?;
        check_text(
            &join(&join(&path, "state"), key),
            value,
            MAX_STATE_VALUE_BYTES,
        )?;
    }
    let (s, others) = part_for_write(doc, user, "state")?;
    let held = union_keys(doc, &[std::slice::from_ref(&s), others.as_slice()].concat());
    let new_keys = entries.keys().filter(|k| !held.contains(*k)).count();
    if held.len() + new_keys > MAX_STATE_KEYS {
        return Err(Error::schema(
            join(&path, "state"),
            format!("would hold more than {MAX_STATE_KEYS} keys"),
        ));
    }
    for (key, value) in entries {
        delete_from(doc, &others, key)?;
        let v = doc.put_object(&s, key.as_str(), ObjType::Map).map_err(am)?;
        doc.put(&v, "value", value.as_str()).map_err(am)?;
        doc.put(&v, "at", at.to_string()).map_err(am)?;
        doc.put(&v, "client", client).map_err(am)?;
    }
    Ok(())
}

/// Opens (or reopens) `client`'s session of `user` on `node`.
pub fn open_session<T: Transactable>(
    doc: &mut T,
    user: &str,
    client: &str,
    node: &str,
    now_ms: u64,
) -> Result<()> {
    let path = join(&join(USERS_KEY, user), "sessions");
    check_name(&join(&path, client), client)?;
    let (s, others) = part_for_write(doc, user, "sessions")?;
    delete_from(doc, &others, client)?;
    let c = ensure_map(doc, &s, client)?;
    doc.put(&c, "node", node).map_err(am)?;
    doc.put(&c, "opened", ScalarValue::Uint(now_ms))
        .map_err(am)?;
    doc.put(&c, "closed", ScalarValue::Uint(0)).map_err(am)?;
    Ok(())
}

/// Marks `client`'s session of `user` closed at `now_ms`. With `prune`, also drops
/// sessions of the user that closed before it (and the oldest past [`MAX_SESSIONS`]):
/// that walks every session of the user, so a caller that knows nothing would go passes
/// `None`.
pub fn close_session<T: Transactable>(
    doc: &mut T,
    user: &str,
    client: &str,
    now_ms: u64,
    prune: Option<u64>,
) -> Result<()> {
    let (s, mut maps) = part_for_write(doc, user, "sessions")?;
    maps.insert(0, s);
    for m in &maps {
        if let Some((Value::Object(ObjType::Map), c)) = doc.get(m, client).map_err(am)? {
            doc.put(&c, "closed", ScalarValue::Uint(now_ms.max(1)))
                .map_err(am)?;
        }
    }
    if let Some(forget_before_ms) = prune {
        for m in &maps {
            prune_sessions(doc, m, forget_before_ms)?;
        }
    }
    Ok(())
}

/// Drops, for every user, sessions closed before `forget_before_ms`, and then users left
/// with nothing (no state, sessions, notifications or subscriptions), so ids that were
/// used once do not hold places under [`MAX_USERS`] for ever. It reads every user, so
/// the node runs it at start, not on every close.
pub fn prune_idle_users<T: Transactable>(doc: &mut T, forget_before_ms: u64) -> Result<()> {
    let u = ensure_map(doc, &ROOT, USERS_KEY)?;
    for user in keys(doc, &u) {
        let maps = maps_at(doc, &u, user.as_str())?;
        if maps.is_empty() {
            continue;
        }
        for s in part_maps(doc, &maps, "sessions")? {
            prune_sessions(doc, &s, forget_before_ms)?;
        }
        let mut empty = true;
        for part in ["state", "sessions", "notifications", "push"] {
            for m in part_maps(doc, &maps, part)? {
                if doc.length(&m) > 0 {
                    empty = false;
                }
            }
        }
        if empty {
            doc.delete(&u, user.as_str()).map_err(am)?;
        }
    }
    Ok(())
}

fn prune_sessions<T: Transactable>(
    doc: &mut T,
    s: &automerge::ObjId,
    forget_before_ms: u64,
) -> Result<()> {
    let mut closed: Vec<(u64, String)> = Vec::new();
    for client in keys(doc, s) {
        if let Some((Value::Object(ObjType::Map), c)) = doc.get(s, client.as_str()).map_err(am)? {
            let at = req_u64(doc, &c, "closed", "closed").unwrap_or(1);
            if at != 0 {
                closed.push((at, client));
            }
        }
    }
    closed.sort();
    let over = keys(doc, s).len().saturating_sub(MAX_SESSIONS);
    for (i, (at, client)) in closed.into_iter().enumerate() {
        if at < forget_before_ms || i < over {
            doc.delete(s, client.as_str()).map_err(am)?;
        }
    }
    Ok(())
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// Creates an empty users document owned by `owner_home`.
    pub fn create_users(
        &mut self,
        id: DocId,
        owner_home: &str,
        epoch: KeyEpoch,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let header = Header::new(DocKind::Users, owner_home, epoch);
        self.create_document(id, header, now_ms, |doc, _, _| init(doc))
    }

    /// One user's validated entry, with only `parts` read.
    pub fn user_entry(&self, id: DocId, user: &str, parts: Parts) -> Result<Option<UserEntry>> {
        expect_kind(self, id, DocKind::Users)?;
        Users::read_user(self.doc(id)?, user, parts)
    }

    /// One user's validated entry, with only `parts` and in them the items of `only`.
    pub fn user_entry_only(
        &self,
        id: DocId,
        user: &str,
        parts: Parts,
        only: Only<'_>,
    ) -> Result<Option<UserEntry>> {
        expect_kind(self, id, DocKind::Users)?;
        Users::read_user_only(self.doc(id)?, user, parts, only)
    }

    /// Writes state keys of `user` from `client`; answers the HLC they were written at.
    pub fn write_user_state(
        &mut self,
        id: DocId,
        user: &str,
        entries: &BTreeMap<String, String>,
        client: &str,
        now_ms: u64,
    ) -> Result<(Hlc, Vec<Output<P>>)> {
        expect_kind(self, id, DocKind::Users)?;
        self.transact(id, now_ms, None, |doc, at, _| {
            write_state(doc, user, entries, client, at).map(|()| at)
        })
    }

    /// Adds a notification for `user` (see [`put_notification`]).
    pub fn notify_user(
        &mut self,
        id: DocId,
        user: &str,
        notification_id: &str,
        n: &StoredNotification,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Users)?;
        self.transact(id, now_ms, None, |doc, _, _| {
            put_notification(doc, user, notification_id, n, now_ms)
        })
        .map(|(_, out)| out)
    }

    /// Runs `f` on the users document as one change (for the small writes that need no
    /// engine method of their own: subscriptions, the VAPID key).
    pub fn write_users<R>(
        &mut self,
        id: DocId,
        now_ms: u64,
        f: impl FnOnce(&mut automerge::AutoCommit) -> Result<R>,
    ) -> Result<(R, Vec<Output<P>>)> {
        expect_kind(self, id, DocKind::Users)?;
        self.transact(id, now_ms, None, |doc, _, _| f(doc))
    }

    /// The home's VAPID private key, if written.
    pub fn users_vapid_key(&self, id: DocId) -> Result<Option<String>> {
        expect_kind(self, id, DocKind::Users)?;
        vapid_key(self.doc(id)?)
    }

    /// One client session of `user`, if there is one.
    pub fn user_client_session(
        &self,
        id: DocId,
        user: &str,
        client: &str,
    ) -> Result<Option<ClientSession>> {
        expect_kind(self, id, DocKind::Users)?;
        Users::read_session_of(self.doc(id)?, user, client)
    }

    /// Opens or closes a client session (see [`open_session`], [`close_session`]);
    /// `prune` applies to a close only.
    pub fn user_session(
        &mut self,
        id: DocId,
        user: &str,
        client: &str,
        open: Option<&str>,
        now_ms: u64,
        prune: Option<u64>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Users)?;
        self.transact(id, now_ms, None, |doc, _, _| match open {
            Some(node) => open_session(doc, user, client, node, now_ms),
            None => close_session(doc, user, client, now_ms, prune),
        })
        .map(|(_, out)| out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;

    fn hlc(wall_ms: u64, actor: u8) -> Hlc {
        Hlc {
            wall_ms,
            counter: 0,
            actor: [actor; 16],
        }
    }

    fn one(key: &str, value: &str) -> BTreeMap<String, String> {
        [(key.to_string(), value.to_string())].into()
    }

    #[test]
    fn concurrent_writes_are_kept_and_the_latest_wins() {
        let mut a = AutoCommit::new();
        init(&mut a).unwrap();
        write_state(&mut a, "ann", &one("progress", "0.5"), "web1", hlc(10, 1)).unwrap();
        let mut b = a.fork();
        write_state(&mut a, "ann", &one("progress", "0.7"), "web1", hlc(30, 1)).unwrap();
        write_state(&mut b, "ann", &one("progress", "0.6"), "phone", hlc(20, 2)).unwrap();
        write_state(&mut b, "ann", &one("lesson", "\"l5\""), "phone", hlc(20, 2)).unwrap();
        a.merge(&mut b).unwrap();
        let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
        let progress = &ann.state["progress"];
        assert_eq!(progress.winner.value, "0.7");
        assert_eq!(progress.concurrent.len(), 1);
        assert_eq!(progress.concurrent[0].client, "phone");
        assert_eq!(ann.state["lesson"].winner.value, "\"l5\"");
        assert!(ann.state["lesson"].concurrent.is_empty());
        // A later write on top of both ends the conflict.
        write_state(&mut a, "ann", &one("progress", "1.0"), "web1", hlc(40, 1)).unwrap();
        let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
        assert!(ann.state["progress"].concurrent.is_empty());
        assert_eq!(Users::read(&a).unwrap().users.len(), 1);
    }

    #[test]
    fn bad_values_and_too_many_keys_are_refused() {
        let mut a = AutoCommit::new();
        init(&mut a).unwrap();
        assert!(write_state(&mut a, "", &one("k", "1"), "c", hlc(1, 1)).is_err());
        assert!(write_state(&mut a, "u", &one("k", "1"), "", hlc(1, 1)).is_err());
        let big = "1".repeat(MAX_STATE_VALUE_BYTES + 1);
        assert!(write_state(&mut a, "u", &one("k", &big), "c", hlc(1, 1)).is_err());
        let many: BTreeMap<String, String> = (0..=MAX_STATE_KEYS)
            .map(|i| (format!("k{i}"), "1".to_string()))
            .collect();
        assert!(write_state(&mut a, "u", &many, "c", hlc(1, 1)).is_err());
        // A peer's value that is not JSON is refused on read.
        let u = ensure_map(&mut a, &ROOT, USERS_KEY).unwrap();
        let e = ensure_map(&mut a, &u, "eve").unwrap();
        let s = ensure_map(&mut a, &e, "state").unwrap();
        let v = a.put_object(&s, "k", ObjType::Map).unwrap();
        a.put(&v, "value", "{not json").unwrap();
        a.put(&v, "at", hlc(1, 1).to_string()).unwrap();
        a.put(&v, "client", "c").unwrap();
        // Left out and reported, not fatal: the rest of the document still reads.
        write_state(&mut a, "ann", &one("k", "1"), "c", hlc(1, 1)).unwrap();
        let read = Users::read(&a).unwrap();
        assert!(read.users["eve"].state.is_empty());
        assert_eq!(read.users["ann"].state["k"].winner.value, "1");
        assert_eq!(read.skipped.len(), 1, "{:?}", read.skipped);
    }

    #[test]
    fn notifications_are_kept_until_they_expire_and_capped() {
        let mut a = AutoCommit::new();
        init(&mut a).unwrap();
        let n = |created_ms, expires_ms| StoredNotification {
            kind: "milestone_achieved".into(),
            priority: "high".into(),
            title: "Well done".into(),
            body: String::new(),
            data: "{\"chapter\":1}".into(),
            created_ms,
            expires_ms,
        };
        // n1 is newer than n2 and n3, so a full part drops it first for having expired,
        // not for its age.
        put_notification(&mut a, "ann", "n1", &n(250, 260), 10).unwrap();
        put_notification(&mut a, "ann", "n2", &n(20, 1000), 20).unwrap();
        let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
        assert_eq!(ann.notifications.len(), 2);
        assert_eq!(ann.notifications["n1"], n(250, 260));
        put_notification(&mut a, "ann", "n3", &n(200, 1000), 200).unwrap();
        // n1 expires at 260: the writes at 300 below find it expired, but it stays until
        // the part fills (readers skip it).
        put_notification(&mut a, "ann", "m0", &n(300, 9999), 300).unwrap();
        let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
        assert!(ann.notifications.contains_key("n1"));
        for i in 0..MAX_NOTIFICATIONS + 3 {
            put_notification(
                &mut a,
                "ann",
                &format!("m{i}"),
                &n(300 + i as u64, 9999),
                300,
            )
            .unwrap();
            if i == MAX_NOTIFICATIONS - 3 {
                // The first write to a full part: the expired n1 went, the oldest stayed.
                let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
                assert!(!ann.notifications.contains_key("n1"));
                assert!(ann.notifications.contains_key("n2"));
                assert_eq!(ann.notifications.len(), MAX_NOTIFICATIONS);
            }
        }
        let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
        assert_eq!(ann.notifications.len(), MAX_NOTIFICATIONS);
        assert!(
            ann.notifications
                .contains_key(&format!("m{}", MAX_NOTIFICATIONS + 2))
        );
        // The expired n1 went first, then the oldest past the cap: m0, m1, m2 and n2,
        // n3 (created before them).
        assert!(!ann.notifications.contains_key("n1"));
        assert!(!ann.notifications.contains_key("m0"));
        assert!(!ann.notifications.contains_key("n2"));
        assert!(ann.notifications.contains_key("m3"));
        let mut bad = n(1, 2);
        bad.title = "t".repeat(MAX_TITLE_BYTES + 1);
        assert!(put_notification(&mut a, "ann", "x", &bad, 1).is_err());

        // A read of named items only: those that are there.
        let wanted: BTreeSet<String> = ["m5".to_string(), "gone".to_string()].into();
        let only = Only {
            notifications: Some(&wanted),
            ..Only::default()
        };
        let part = Users::read_user_only(&a, "ann", Parts::ALL, only)
            .unwrap()
            .unwrap();
        assert_eq!(part.notifications.keys().collect::<Vec<_>>(), ["m5"]);
        assert_eq!(part.notifications["m5"], ann.notifications["m5"]);
    }

    #[test]
    fn push_subscriptions_and_the_vapid_key_round_trip_with_caps() {
        let mut a = AutoCommit::new();
        init(&mut a).unwrap();
        assert_eq!(vapid_key(&a).unwrap(), None);
        put_vapid_key(&mut a, "abc").unwrap();
        assert_eq!(vapid_key(&a).unwrap().as_deref(), Some("abc"));
        put_push_subscription(&mut a, "ann", "s1", "{}").unwrap();
        let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
        assert_eq!(ann.push["s1"], "{}");
        for i in 1..MAX_PUSH_SUBSCRIPTIONS {
            put_push_subscription(&mut a, "ann", &format!("x{i}"), "{}").unwrap();
        }
        assert!(put_push_subscription(&mut a, "ann", "over", "{}").is_err());
        assert!(remove_push_subscription(&mut a, "ann", "s1").unwrap());
        assert!(!remove_push_subscription(&mut a, "ann", "s1").unwrap());
        let long = "x".repeat(MAX_SUBSCRIPTION_BYTES + 1);
        assert!(put_push_subscription(&mut a, "ann", "big", &long).is_err());
    }

    /// Two devices that first write a user at the same moment each make the user's map;
    /// Automerge keeps one as the winner. Nothing written into the other is lost: the
    /// reader merges both, and later writes supersede what they saw in either.
    #[test]
    fn a_user_first_written_on_two_devices_at_once_keeps_both_devices_writes() {
        let mut a = AutoCommit::new();
        init(&mut a).unwrap();
        let mut b = a.fork();
        open_session(&mut a, "carl", "c0", "node-a", 100).unwrap();
        write_state(&mut a, "carl", &one("theme", "\"dark\""), "c0", hlc(10, 1)).unwrap();
        open_session(&mut b, "carl", "c1", "node-b", 101).unwrap();
        write_state(&mut b, "carl", &one("lesson", "3"), "c1", hlc(11, 2)).unwrap();
        write_state(&mut b, "carl", &one("theme", "\"light\""), "c1", hlc(12, 2)).unwrap();
        let sub = StoredNotification {
            kind: "system".into(),
            priority: "normal".into(),
            title: "t".into(),
            body: String::new(),
            data: "{}".into(),
            created_ms: 1,
            expires_ms: 10_000,
        };
        put_notification(&mut b, "carl", "n1", &sub, 100).unwrap();
        put_push_subscription(&mut b, "carl", "p1", "{}").unwrap();
        a.merge(&mut b).unwrap();
        b.merge(&mut a).unwrap();
        for doc in [&a, &b] {
            let u = doc.get(&ROOT, USERS_KEY).unwrap().unwrap().1;
            assert_eq!(
                doc.get_all(&u, "carl").unwrap().len(),
                2,
                "two maps side by side"
            );
            let carl = Users::read_user(doc, "carl", Parts::ALL).unwrap().unwrap();
            assert!(carl.skipped.is_empty(), "{:?}", carl.skipped);
            let sessions: Vec<&str> = carl.sessions.keys().map(String::as_str).collect();
            assert_eq!(sessions, ["c0", "c1"]);
            assert_eq!(carl.state["lesson"].winner.value, "3");
            // Written concurrently: the later HLC wins, the other is surfaced.
            assert_eq!(carl.state["theme"].winner.value, "\"light\"");
            assert_eq!(carl.state["theme"].concurrent.len(), 1);
            assert!(carl.notifications.contains_key("n1"));
            assert!(carl.push.contains_key("p1"));
            assert_eq!(Users::read(doc).unwrap().users["carl"], carl);
        }
        // Later writes, on either device, supersede what they saw in either map.
        write_state(&mut a, "carl", &one("theme", "\"blue\""), "c0", hlc(20, 1)).unwrap();
        write_state(&mut b, "carl", &one("lesson", "4"), "c1", hlc(21, 2)).unwrap();
        close_session(&mut b, "carl", "c0", 300, Some(0)).unwrap();
        open_session(&mut a, "carl", "c2", "node-a", 301).unwrap();
        assert!(remove_push_subscription(&mut a, "carl", "p1").unwrap());
        a.merge(&mut b).unwrap();
        b.merge(&mut a).unwrap();
        for doc in [&a, &b] {
            let carl = Users::read_user(doc, "carl", Parts::ALL).unwrap().unwrap();
            assert_eq!(carl.state["theme"].winner.value, "\"blue\"");
            assert!(carl.state["theme"].concurrent.is_empty());
            assert_eq!(carl.state["lesson"].winner.value, "4");
            assert!(carl.state["lesson"].concurrent.is_empty());
            assert_eq!(carl.sessions["c0"].closed_ms, 300);
            assert_eq!(carl.sessions["c1"].closed_ms, 0);
            assert_eq!(carl.sessions["c2"].closed_ms, 0);
            assert!(carl.push.is_empty());
        }
        // Closed sessions and the rest go from both maps, and then the user.
        for c in ["c1", "c2"] {
            close_session(&mut a, "carl", c, 400, Some(0)).unwrap();
        }
        write_state(&mut a, "dan", &one("k", "1"), "d", hlc(30, 1)).unwrap();
        let u = a.get(&ROOT, USERS_KEY).unwrap().unwrap().1;
        let maps = maps_at(&a, &u, "carl").unwrap();
        for part in ["state", "notifications"] {
            for m in part_maps(&a, &maps, part).unwrap() {
                for k in keys(&a, &m) {
                    a.delete(&m, k.as_str()).unwrap();
                }
            }
        }
        prune_idle_users(&mut a, 1_000).unwrap();
        assert!(Users::read_user(&a, "carl", Parts::ALL).unwrap().is_none());
        assert!(Users::read_user(&a, "dan", Parts::ALL).unwrap().is_some());
    }

    /// A value of another kind beside a user's map (a peer's bad write) never makes a
    /// write drop the map: whichever wins, what the map holds stays readable.
    #[test]
    fn a_bad_value_beside_a_users_map_does_not_make_a_write_drop_it() {
        for first in [0u8, 1] {
            let mut a = AutoCommit::new().with_actor(automerge::ActorId::from([first; 16]));
            init(&mut a).unwrap();
            let mut b = a
                .fork()
                .with_actor(automerge::ActorId::from([1 - first; 16]));
            open_session(&mut a, "carl", "c0", "node-a", 100).unwrap();
            let u = b.get(&ROOT, USERS_KEY).unwrap().unwrap().1;
            b.put(&u, "carl", "not a map").unwrap();
            a.merge(&mut b).unwrap();
            write_state(&mut a, "carl", &one("k", "1"), "c0", hlc(10, 1)).unwrap();
            let carl = Users::read_user(&a, "carl", Parts::ALL).unwrap().unwrap();
            assert!(carl.sessions.contains_key("c0"), "actor {first}");
            assert_eq!(carl.state["k"].winner.value, "1");
        }
    }

    #[test]
    fn sessions_open_close_and_old_ones_are_forgotten() {
        let mut a = AutoCommit::new();
        init(&mut a).unwrap();
        open_session(&mut a, "ann", "web1", "node-a", 100).unwrap();
        open_session(&mut a, "ann", "phone", "node-b", 110).unwrap();
        close_session(&mut a, "ann", "web1", 200, Some(0)).unwrap();
        let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
        assert_eq!(ann.sessions["web1"].closed_ms, 200);
        assert_eq!(ann.sessions["phone"].closed_ms, 0);
        // A read of some parts leaves the others empty.
        write_state(&mut a, "ann", &one("k", "0"), "phone", hlc(4, 1)).unwrap();
        let only = Parts {
            sessions: true,
            ..Parts::NONE
        };
        let part = Users::read_user(&a, "ann", only).unwrap().unwrap();
        assert_eq!(part.sessions, ann.sessions);
        assert!(part.state.is_empty());
        let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
        assert_eq!(ann.state["k"].winner.value, "0");
        // A close without a prune leaves every other session as it was.
        close_session(&mut a, "ann", "phone", 250, None).unwrap();
        let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
        assert!(ann.sessions.contains_key("web1"), "not pruned");
        close_session(&mut a, "ann", "phone", 300, Some(250)).unwrap();
        let ann = Users::read_user(&a, "ann", Parts::ALL).unwrap().unwrap();
        assert!(!ann.sessions.contains_key("web1"), "closed before the cut");
        assert!(ann.sessions.contains_key("phone"));
        // A user with nothing left is dropped at the next close past the cut.
        open_session(&mut a, "bob", "tab", "node-a", 400).unwrap();
        close_session(&mut a, "bob", "tab", 500, Some(0)).unwrap();
        write_state(&mut a, "ann", &one("k", "1"), "phone", hlc(5, 1)).unwrap();
        close_session(&mut a, "ann", "phone", 900, Some(600)).unwrap();
        prune_idle_users(&mut a, 600).unwrap();
        assert!(Users::read_user(&a, "bob", Parts::ALL).unwrap().is_none());
        assert!(
            Users::read_user(&a, "ann", Parts::ALL).unwrap().is_some(),
            "ann has state"
        );
    }
}
