//! Typed view of a `room` document: who is in it, its chat, a group activity
//! and a synchronised playback schedule.
//!
//! Layout under the root key `room`:
//!
//! | key | type |
//! | --- | --- |
//! | `name`, `creator` | string |
//! | `created_at` | uint, ms since the Unix epoch |
//! | `max_size` | uint, 1 to [`MAX_ROOM_SIZE`] |
//! | `members.<user>` | map { `device`: string, `joined_at`: HLC text } |
//! | `chat` | list of map { `id`, `sender`, `text`: string, `time`: uint ms } |
//! | `activity` | absent, or map { `kind`, `state`: string, `step`: uint, `started_at`: uint ms, `scores`: map user -> counter } |
//! | `playback` | absent, or map { `media`: string, `start_at`: uint ms in the shared time base, `position_ms`: uint, `rate`: float, `paused`: bool } |
//!
//! Members are a map keyed by user, so a concurrent join and leave of
//! different users merge, and two joins of one user collapse into one entry.
//! `max_size` is checked on every local join, but two replicas may each admit
//! the last free place at the same time. The view settles that the same way
//! everywhere: members are ordered by their `joined_at` clock (then by name),
//! the first `max_size` are [`Room::members`], the rest [`Room::overflow`].
//!
//! Scores are Automerge counters: concurrent increments from several devices
//! add up instead of one overwriting the other.

use std::collections::BTreeMap;
use std::fmt::Debug;

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};

use super::fields::{
    check_name, check_text, list_map, opt_map, req_bool, req_counter, req_f64, req_hlc, req_list,
    req_name,
};
use super::{DocKind, Header, am, ensure_map, join, keys, req_map, req_str, req_u64};
use crate::engine::{Engine, Output};
use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::ids::{DocId, KeyEpoch};

/// Root key of the room map; also the first segment of error paths.
pub const ROOM_KEY: &str = "room";

/// Largest `max_size` a room may have.
pub const MAX_ROOM_SIZE: u64 = 1_000;

/// Longest chat message accepted, in bytes.
pub const MAX_CHAT_TEXT_BYTES: usize = 4_096;

/// Most chat messages one read returns, whatever limit the caller asks for.
pub const MAX_CHAT_READ: usize = 1_000;

/// Newest messages included in the [`Room`] view itself.
pub const ROOM_VIEW_CHAT: usize = 50;

/// Fastest playback rate accepted (and slowest is its inverse).
pub const MAX_PLAYBACK_RATE: f64 = 16.0;

/// Parameters of a new room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRoom {
    /// Room name.
    pub name: String,
    /// User who creates it; joins it at once.
    pub creator: String,
    /// Device the creator is on.
    pub device: String,
    /// Member cap, 1 to [`MAX_ROOM_SIZE`].
    pub max_size: u64,
}

/// One member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// User name.
    pub user: String,
    /// Device the user joined from.
    pub device: String,
    /// When they joined; orders members for the size cap.
    pub joined_at: Hlc,
}

/// One chat message. The API presents `text` as `message` and `time_ms` as
/// `timestamp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// Message id, chosen by the sender (random, so concurrent messages
    /// never collide).
    pub id: String,
    /// User who sent it.
    pub sender: String,
    /// Its text.
    pub text: String,
    /// When it was sent, ms since the Unix epoch.
    pub time_ms: u64,
}

/// A chat message to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    /// Message id: random, supplied by the caller (this crate draws no
    /// randomness).
    pub id: String,
    /// Sending user; must be a member.
    pub sender: String,
    /// Text, at most [`MAX_CHAT_TEXT_BYTES`].
    pub text: String,
}

/// Where a group activity stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ActivityState {
    /// Started; waiting for the target devices to acknowledge.
    Starting,
    /// Under way.
    Running,
    /// Paused.
    Paused,
    /// Over; the scores are final.
    Ended,
}

impl ActivityState {
    /// Stored text.
    pub const fn as_str(self) -> &'static str {
        match self {
            ActivityState::Starting => "starting",
            ActivityState::Running => "running",
            ActivityState::Paused => "paused",
            ActivityState::Ended => "ended",
        }
    }

    /// Inverse of [`ActivityState::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "starting" => ActivityState::Starting,
            "running" => ActivityState::Running,
            "paused" => ActivityState::Paused,
            "ended" => ActivityState::Ended,
            _ => return None,
        })
    }
}

/// A group activity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activity {
    /// What is being played, e.g. `quiz`.
    pub kind: String,
    /// Where it stands.
    pub state: ActivityState,
    /// Current step.
    pub step: u64,
    /// When it started, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// Scores by user.
    pub scores: BTreeMap<String, i64>,
}

/// A playback schedule shared by the room's devices.
#[derive(Clone, Debug, PartialEq)]
pub struct Playback {
    /// What to play (a URL or a media id).
    pub media: String,
    /// When `position_ms` is reached, in the shared time base (ms).
    pub start_at_ms: u64,
    /// Position within the media at `start_at_ms`.
    pub position_ms: u64,
    /// Playback rate; 1.0 is normal speed.
    pub rate: f64,
    /// Whether playback is paused at `position_ms`.
    pub paused: bool,
}

/// The room, after validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Room {
    /// Room name.
    pub name: String,
    /// User who created it.
    pub creator: String,
    /// When it was created, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Member cap.
    pub max_size: u64,
    /// Admitted members, in join order.
    pub members: Vec<Member>,
    /// Members who joined concurrently past `max_size`: not admitted.
    pub overflow: Vec<Member>,
    /// Number of chat messages.
    pub chat_len: usize,
    /// The newest [`ROOM_VIEW_CHAT`] messages, oldest first.
    pub recent_chat: Vec<ChatMessage>,
    /// The group activity, if one was started.
    pub activity: Option<Activity>,
    /// The playback schedule, if one is set.
    pub playback: Option<Playback>,
}

impl Room {
    /// Reads and validates the room view of `doc`.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        Self::read_with_chat(doc, ROOM_VIEW_CHAT)
    }

    /// Reads and validates the room view of `doc` with its newest `chat` messages in
    /// `recent_chat` (none: a view for what only needs the room's fields and members).
    pub fn read_with_chat<D: ReadDoc>(doc: &D, chat: usize) -> Result<Self> {
        let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
        let name = req_name(doc, &r, "name", "room.name")?;
        let creator = req_name(doc, &r, "creator", "room.creator")?;
        let created_at_ms = req_u64(doc, &r, "created_at", "room.created_at")?;
        let max_size = req_u64(doc, &r, "max_size", "room.max_size")?;
        check_max_size(max_size)?;
        let (members, overflow) = read_members(doc, &r, max_size)?;
        let list = req_list(doc, &r, "chat", "room.chat")?;
        let chat_len = doc.length(&list);
        let recent_chat = read_messages(doc, &list, chat_len, chat.min(MAX_CHAT_READ))?;
        let activity = match opt_map(doc, &r, "activity", "room.activity")? {
            Some(a) => Some(read_activity(doc, &a)?),
            None => None,
        };
        let playback = match opt_map(doc, &r, "playback", "room.playback")? {
            Some(p) => Some(read_playback(doc, &p)?),
            None => None,
        };
        Ok(Self {
            name,
            creator,
            created_at_ms,
            max_size,
            members,
            overflow,
            chat_len,
            recent_chat,
            activity,
            playback,
        })
    }

    /// Reads the newest `limit` chat messages (at most [`MAX_CHAT_READ`]),
    /// oldest first.
    pub fn read_chat<D: ReadDoc>(doc: &D, limit: usize) -> Result<Vec<ChatMessage>> {
        let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
        let list = req_list(doc, &r, "chat", "room.chat")?;
        let len = doc.length(&list);
        read_messages(doc, &list, len, limit.min(MAX_CHAT_READ))
    }

    /// Whether `user` is an admitted member.
    pub fn is_member(&self, user: &str) -> bool {
        self.members.iter().any(|m| m.user == user)
    }
}

/// A room's members, its chat length and the id of its newest message, read without
/// decoding the chat: what a change announcement needs before it reads new messages.
#[derive(Clone, Debug, PartialEq)]
pub struct RoomHead {
    /// Admitted members, in join order.
    pub members: Vec<Member>,
    /// Members past `max_size`: not admitted.
    pub overflow: Vec<Member>,
    /// Number of chat messages.
    pub chat_len: usize,
    /// The newest message's id, if there is one.
    pub last_chat: Option<String>,
}

impl RoomHead {
    /// Reads and validates the members and the newest message's id of `doc`.
    pub fn read<D: ReadDoc>(doc: &D) -> Result<Self> {
        let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
        let max_size = req_u64(doc, &r, "max_size", "room.max_size")?;
        check_max_size(max_size)?;
        let (members, overflow) = read_members(doc, &r, max_size)?;
        let list = req_list(doc, &r, "chat", "room.chat")?;
        let chat_len = doc.length(&list);
        let last_chat = match chat_len.checked_sub(1) {
            Some(i) => Some(message_id(doc, &list, i)?),
            None => None,
        };
        Ok(Self {
            members,
            overflow,
            chat_len,
            last_chat,
        })
    }
}

impl Room {
    /// The messages after the one whose id is `after`, oldest first, found by reading
    /// ids back from the newest. With no `after`, or one not among the newest `max`
    /// (it was pruned), the newest `max` (at most [`MAX_CHAT_READ`]) are read.
    pub fn read_chat_after<D: ReadDoc>(
        doc: &D,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ChatMessage>> {
        let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
        let list = req_list(doc, &r, "chat", "room.chat")?;
        let len = doc.length(&list);
        let max = max.min(MAX_CHAT_READ);
        let mut take = max.min(len);
        if let Some(after) = after {
            for back in 0..max.min(len) {
                if message_id(doc, &list, len - 1 - back)? == after {
                    take = back;
                    break;
                }
            }
        }
        read_messages(doc, &list, len, take)
    }
}

/// The id of message `i` of the chat list.
fn message_id<D: ReadDoc>(doc: &D, list: &ObjId, i: usize) -> Result<String> {
    let path = join("room.chat", &i.to_string());
    let m = list_map(doc, list, i, &path)?;
    req_name(doc, &m, "id", &join(&path, "id"))
}

fn check_max_size(max_size: u64) -> Result<()> {
    if (1..=MAX_ROOM_SIZE).contains(&max_size) {
        Ok(())
    } else {
        Err(Error::schema(
            "room.max_size",
            format!("must be 1 to {MAX_ROOM_SIZE}, found {max_size}"),
        ))
    }
}

/// Members split into admitted and overflow, both in join order.
fn read_members<D: ReadDoc>(
    doc: &D,
    room: &ObjId,
    max_size: u64,
) -> Result<(Vec<Member>, Vec<Member>)> {
    let m = req_map(doc, room, "members", "room.members")?;
    let mut all = Vec::new();
    for user in keys(doc, &m) {
        let path = join("room.members", &user);
        check_name(&path, &user)?;
        let rec = req_map(doc, &m, &user, &path)?;
        let device = req_name(doc, &rec, "device", &join(&path, "device"))?;
        let joined_at = req_hlc(doc, &rec, "joined_at", &join(&path, "joined_at"))?;
        all.push(Member {
            user,
            device,
            joined_at,
        });
    }
    all.sort_by(|a, b| (a.joined_at, &a.user).cmp(&(b.joined_at, &b.user)));
    let admitted = usize::try_from(max_size)
        .unwrap_or(usize::MAX)
        .min(all.len());
    let overflow = all.split_off(admitted);
    Ok((all, overflow))
}

/// The last `limit` of the list's `len` messages, oldest first.
fn read_messages<D: ReadDoc>(
    doc: &D,
    list: &ObjId,
    len: usize,
    limit: usize,
) -> Result<Vec<ChatMessage>> {
    let start = len.saturating_sub(limit);
    let mut out = Vec::with_capacity(len - start);
    for i in start..len {
        let path = join("room.chat", &i.to_string());
        let m = list_map(doc, list, i, &path)?;
        out.push(read_message(doc, &m, &path)?);
    }
    Ok(out)
}

/// One chat message's map, validated.
fn read_message<D: ReadDoc>(doc: &D, m: &ObjId, path: &str) -> Result<ChatMessage> {
    let id = req_name(doc, m, "id", &join(path, "id"))?;
    let sender = req_name(doc, m, "sender", &join(path, "sender"))?;
    let text_path = join(path, "text");
    let text = req_str(doc, m, "text", &text_path)?;
    check_text(&text_path, &text, MAX_CHAT_TEXT_BYTES)?;
    let time_ms = req_u64(doc, m, "time", &join(path, "time"))?;
    Ok(ChatMessage {
        id,
        sender,
        text,
        time_ms,
    })
}

/// Validates a room after `changes` were applied to it: its fields and members, and
/// the chat messages the changes wrote (not the whole recent chat, which earlier checks
/// covered). When the changes' writes cannot all be placed, the room view with its
/// newest messages is read, as a read of the room would.
pub(crate) fn check_after(
    doc: &automerge::AutoCommit,
    changes: &[automerge::Change],
) -> Result<()> {
    Room::read_with_chat(doc, 0)?;
    match crate::schema::touched::written_list_maps(doc, changes, &[ROOM_KEY, "chat"]) {
        Some(messages) => {
            for m in messages {
                read_message(doc, &m, "room.chat")?;
            }
            Ok(())
        }
        None => Room::read(doc).map(|_| ()),
    }
}

fn read_activity<D: ReadDoc>(doc: &D, a: &ObjId) -> Result<Activity> {
    let kind = req_name(doc, a, "kind", "room.activity.kind")?;
    let state_text = req_str(doc, a, "state", "room.activity.state")?;
    let state = ActivityState::parse(&state_text).ok_or_else(|| {
        Error::schema(
            "room.activity.state",
            format!("unknown state {state_text:?}"),
        )
    })?;
    let step = req_u64(doc, a, "step", "room.activity.step")?;
    let started_at_ms = req_u64(doc, a, "started_at", "room.activity.started_at")?;
    let s = req_map(doc, a, "scores", "room.activity.scores")?;
    let mut scores = BTreeMap::new();
    for user in keys(doc, &s) {
        let path = join("room.activity.scores", &user);
        check_name(&path, &user)?;
        scores.insert(user.clone(), req_counter(doc, &s, &user, &path)?);
    }
    Ok(Activity {
        kind,
        state,
        step,
        started_at_ms,
        scores,
    })
}

fn read_playback<D: ReadDoc>(doc: &D, p: &ObjId) -> Result<Playback> {
    let playback = Playback {
        media: req_name(doc, p, "media", "room.playback.media")?,
        start_at_ms: req_u64(doc, p, "start_at", "room.playback.start_at")?,
        position_ms: req_u64(doc, p, "position_ms", "room.playback.position_ms")?,
        rate: req_f64(doc, p, "rate", "room.playback.rate")?,
        paused: req_bool(doc, p, "paused", "room.playback.paused")?,
    };
    check_rate(playback.rate)?;
    Ok(playback)
}

fn check_rate(rate: f64) -> Result<()> {
    if rate.is_finite() && (1.0 / MAX_PLAYBACK_RATE..=MAX_PLAYBACK_RATE).contains(&rate) {
        Ok(())
    } else {
        Err(Error::schema(
            "room.playback.rate",
            format!("must be between 1/{MAX_PLAYBACK_RATE} and {MAX_PLAYBACK_RATE}"),
        ))
    }
}

// ----- writes ---------------------------------------------------------------

/// Writes a new room; its creator is its first member.
pub(crate) fn init<T: Transactable>(
    doc: &mut T,
    room: &NewRoom,
    at: Hlc,
    now_ms: u64,
) -> Result<()> {
    check_name("room.name", &room.name)?;
    check_name("room.creator", &room.creator)?;
    check_max_size(room.max_size)?;
    let r = doc.put_object(ROOT, ROOM_KEY, ObjType::Map).map_err(am)?;
    doc.put(&r, "name", room.name.as_str()).map_err(am)?;
    doc.put(&r, "creator", room.creator.as_str()).map_err(am)?;
    doc.put(&r, "created_at", ScalarValue::Uint(now_ms))
        .map_err(am)?;
    doc.put(&r, "max_size", ScalarValue::Uint(room.max_size))
        .map_err(am)?;
    doc.put_object(&r, "members", ObjType::Map).map_err(am)?;
    doc.put_object(&r, "chat", ObjType::List).map_err(am)?;
    join_room(doc, &room.creator, &room.device, at)?;
    Ok(())
}

/// Adds `user` (on `device`). Returns false when they were already a member
/// (their device is updated). Refused with [`Error::RoomFull`] when the room
/// already holds `max_size` members.
pub fn join_room<T: Transactable>(doc: &mut T, user: &str, device: &str, at: Hlc) -> Result<bool> {
    let path = join("room.members", user);
    check_name(&path, user)?;
    check_name(&join(&path, "device"), device)?;
    let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
    let max_size = req_u64(doc, &r, "max_size", "room.max_size")?;
    let m = ensure_map(doc, &r, "members")?;
    if let Some((Value::Object(ObjType::Map), rec)) = doc.get(&m, user).map_err(am)? {
        super::put_str_if_changed(doc, &rec, "device", device)?;
        return Ok(false);
    }
    // Overflow members count too: admitting anyone else now would push a
    // member who is already waiting further out.
    let present = u64::try_from(doc.length(&m)).unwrap_or(u64::MAX);
    if present >= max_size {
        return Err(Error::RoomFull { max_size });
    }
    let rec = doc.put_object(&m, user, ObjType::Map).map_err(am)?;
    doc.put(&rec, "device", device).map_err(am)?;
    doc.put(&rec, "joined_at", at.to_string()).map_err(am)?;
    // Give a newcomer a score counter now, while no one else is creating it:
    // two replicas creating the same counter concurrently would conflict and
    // one side's increments would be lost.
    if let Some(a) = opt_map(doc, &r, "activity", "room.activity")? {
        let s = ensure_map(doc, &a, "scores")?;
        if doc.get(&s, user).map_err(am)?.is_none() {
            doc.put(&s, user, ScalarValue::counter(0)).map_err(am)?;
        }
    }
    Ok(true)
}

/// Removes `user`. Returns false when they were not a member.
pub fn leave_room<T: Transactable>(doc: &mut T, user: &str) -> Result<bool> {
    let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
    let m = ensure_map(doc, &r, "members")?;
    if doc.get(&m, user).map_err(am)?.is_none() {
        return Ok(false);
    }
    doc.delete(&m, user).map_err(am)?;
    Ok(true)
}

/// The number of chat messages of a room document, without reading them.
pub fn chat_len<D: ReadDoc>(doc: &D) -> Result<usize> {
    let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
    let list = req_list(doc, &r, "chat", "room.chat")?;
    Ok(doc.length(&list))
}

/// Appends a chat message from an admitted member.
pub fn say<T: Transactable>(doc: &mut T, msg: &NewMessage, now_ms: u64) -> Result<ChatMessage> {
    check_name("room.chat.id", &msg.id)?;
    check_name("room.chat.sender", &msg.sender)?;
    check_text("room.chat.text", &msg.text, MAX_CHAT_TEXT_BYTES)?;
    let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
    let max_size = req_u64(doc, &r, "max_size", "room.max_size")?;
    let (members, _) = read_members(doc, &r, max_size)?;
    if !members.iter().any(|m| m.user == msg.sender) {
        return Err(Error::NotMember {
            user: msg.sender.clone(),
        });
    }
    let list = req_list(doc, &r, "chat", "room.chat")?;
    let at = doc.length(&list);
    let m = doc.insert_object(&list, at, ObjType::Map).map_err(am)?;
    doc.put(&m, "id", msg.id.as_str()).map_err(am)?;
    doc.put(&m, "sender", msg.sender.as_str()).map_err(am)?;
    doc.put(&m, "text", msg.text.as_str()).map_err(am)?;
    doc.put(&m, "time", ScalarValue::Uint(now_ms)).map_err(am)?;
    Ok(ChatMessage {
        id: msg.id.clone(),
        sender: msg.sender.clone(),
        text: msg.text.clone(),
        time_ms: now_ms,
    })
}

/// Starts a new activity of `kind` (replacing any previous one), in the
/// `starting` state, with a zero score counter for every admitted member.
pub fn start_activity<T: Transactable>(doc: &mut T, kind: &str, now_ms: u64) -> Result<()> {
    check_name("room.activity.kind", kind)?;
    let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
    let max_size = req_u64(doc, &r, "max_size", "room.max_size")?;
    let (members, _) = read_members(doc, &r, max_size)?;
    let a = doc.put_object(&r, "activity", ObjType::Map).map_err(am)?;
    doc.put(&a, "kind", kind).map_err(am)?;
    doc.put(&a, "state", ActivityState::Starting.as_str())
        .map_err(am)?;
    doc.put(&a, "step", ScalarValue::Uint(0)).map_err(am)?;
    doc.put(&a, "started_at", ScalarValue::Uint(now_ms))
        .map_err(am)?;
    let s = doc.put_object(&a, "scores", ObjType::Map).map_err(am)?;
    for m in members {
        doc.put(&s, m.user.as_str(), ScalarValue::counter(0))
            .map_err(am)?;
    }
    Ok(())
}

fn activity<T: Transactable>(doc: &mut T) -> Result<ObjId> {
    let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
    opt_map(doc, &r, "activity", "room.activity")?.ok_or_else(|| Error::Refused {
        what: "activity update",
        reason: "the room has no activity".into(),
    })
}

/// Moves the activity to `state`.
pub fn set_activity_state<T: Transactable>(doc: &mut T, state: ActivityState) -> Result<()> {
    let a = activity(doc)?;
    super::put_str_if_changed(doc, &a, "state", state.as_str())
}

/// Sets the activity's step.
pub fn set_activity_step<T: Transactable>(doc: &mut T, step: u64) -> Result<()> {
    let a = activity(doc)?;
    doc.put(&a, "step", ScalarValue::Uint(step)).map_err(am)?;
    Ok(())
}

/// Adds `delta` to `user`'s score. Concurrent additions from several
/// replicas all count.
pub fn add_score<T: Transactable>(doc: &mut T, user: &str, delta: i64) -> Result<()> {
    let path = join("room.activity.scores", user);
    check_name(&path, user)?;
    let a = activity(doc)?;
    let s = ensure_map(doc, &a, "scores")?;
    match doc.get(&s, user).map_err(am)? {
        Some((Value::Scalar(v), _)) if matches!(v.as_ref(), ScalarValue::Counter(_)) => {
            doc.increment(&s, user, delta).map_err(am)?;
        }
        // Absent, or a plain number a peer wrote: start a counter from it.
        other => {
            let base = match other {
                Some((Value::Scalar(v), _)) => v.as_i64().unwrap_or(0),
                _ => 0,
            };
            doc.put(&s, user, ScalarValue::counter(base.saturating_add(delta)))
                .map_err(am)?;
        }
    }
    Ok(())
}

/// Sets or clears the playback schedule.
pub fn set_playback<T: Transactable>(doc: &mut T, playback: Option<&Playback>) -> Result<()> {
    let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY)?;
    let Some(p) = playback else {
        if doc.get(&r, "playback").map_err(am)?.is_some() {
            doc.delete(&r, "playback").map_err(am)?;
        }
        return Ok(());
    };
    check_name("room.playback.media", &p.media)?;
    check_rate(p.rate)?;
    let o = doc.put_object(&r, "playback", ObjType::Map).map_err(am)?;
    doc.put(&o, "media", p.media.as_str()).map_err(am)?;
    doc.put(&o, "start_at", ScalarValue::Uint(p.start_at_ms))
        .map_err(am)?;
    doc.put(&o, "position_ms", ScalarValue::Uint(p.position_ms))
        .map_err(am)?;
    doc.put(&o, "rate", p.rate).map_err(am)?;
    doc.put(&o, "paused", p.paused).map_err(am)?;
    Ok(())
}

// ----- engine entry points ---------------------------------------------------

/// Refuses to write one kind of view into a document of another kind.
pub(crate) fn expect_kind<P: Clone + Ord + Debug>(
    engine: &Engine<P>,
    id: DocId,
    kind: DocKind,
) -> Result<()> {
    let found = engine.header(id)?.kind;
    if found == kind {
        Ok(())
    } else {
        Err(Error::Refused {
            what: "write",
            reason: format!(
                "document {id} is a {} document, not a {} document",
                found.as_str(),
                kind.as_str()
            ),
        })
    }
}

impl<P: Clone + Ord + Debug> Engine<P> {
    /// Creates a room document owned by `owner_home`; the creator joins it.
    pub fn create_room(
        &mut self,
        id: DocId,
        owner_home: &str,
        epoch: KeyEpoch,
        room: &NewRoom,
        now_ms: u64,
    ) -> Result<Vec<Output<P>>> {
        let header = Header::new(DocKind::Room, owner_home, epoch);
        self.create_document(id, header, now_ms, |doc, at, _| init(doc, room, at, now_ms))
    }

    /// The validated room view.
    pub fn room(&self, id: DocId) -> Result<Room> {
        Room::read(self.doc(id)?)
    }

    /// The newest `limit` chat messages, oldest first.
    pub fn room_chat(&self, id: DocId, limit: usize) -> Result<Vec<ChatMessage>> {
        Room::read_chat(self.doc(id)?, limit)
    }

    /// The validated room view without its chat (`recent_chat` is empty).
    pub fn room_meta(&self, id: DocId) -> Result<Room> {
        Room::read_with_chat(self.doc(id)?, 0)
    }

    /// The room's members and newest message id, without reading its chat.
    pub fn room_head(&self, id: DocId) -> Result<RoomHead> {
        RoomHead::read(self.doc(id)?)
    }

    /// The messages after the one with id `after` (see [`Room::read_chat_after`]).
    pub fn room_chat_after(
        &self,
        id: DocId,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ChatMessage>> {
        Room::read_chat_after(self.doc(id)?, after, max)
    }

    /// Whether `id` is a room document whose content is here (reads no member or message).
    pub fn is_room(&self, id: DocId) -> bool {
        self.header(id).is_ok_and(|h| h.kind == DocKind::Room)
            && self
                .doc(id)
                .is_ok_and(|d| req_map(d, &ROOT, ROOM_KEY, ROOM_KEY).is_ok())
    }

    /// Joins `user` on `device`; [`Error::RoomFull`] past `max_size`.
    pub fn join_room(
        &mut self,
        id: DocId,
        user: &str,
        device: &str,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Room)?;
        self.transact(id, now_ms, correlation_id, |doc, at, _| {
            join_room(doc, user, device, at)
        })
        .map(|(_, out)| out)
    }

    /// Removes `user` from the room (nothing is written if they were not in
    /// it).
    pub fn leave_room(
        &mut self,
        id: DocId,
        user: &str,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Room)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            leave_room(doc, user)
        })
        .map(|(_, out)| out)
    }

    /// Appends a chat message; [`Error::NotMember`] unless the sender is an
    /// admitted member.
    pub fn say(
        &mut self,
        id: DocId,
        msg: &NewMessage,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<(ChatMessage, Vec<Output<P>>)> {
        self.say_then(id, msg, now_ms, correlation_id, |_| Ok(()))
    }

    /// [`Self::say`], then `then` on the document in the same change (to trim the
    /// chat to its retention limits, say).
    pub fn say_then(
        &mut self,
        id: DocId,
        msg: &NewMessage,
        now_ms: u64,
        correlation_id: Option<String>,
        then: impl FnOnce(&mut automerge::AutoCommit) -> Result<()>,
    ) -> Result<(ChatMessage, Vec<Output<P>>)> {
        expect_kind(self, id, DocKind::Room)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            let sent = say(doc, msg, now_ms)?;
            then(doc)?;
            Ok(sent)
        })
    }

    /// Starts an activity of `kind`, replacing any previous one.
    pub fn start_activity(
        &mut self,
        id: DocId,
        kind: &str,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Room)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            start_activity(doc, kind, now_ms)
        })
        .map(|(_, out)| out)
    }

    /// Moves the activity to `state`.
    pub fn set_activity_state(
        &mut self,
        id: DocId,
        state: ActivityState,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Room)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            set_activity_state(doc, state)
        })
        .map(|(_, out)| out)
    }

    /// Sets the activity's step.
    pub fn set_activity_step(
        &mut self,
        id: DocId,
        step: u64,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Room)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            set_activity_step(doc, step)
        })
        .map(|(_, out)| out)
    }

    /// Adds `delta` to `user`'s score counter.
    pub fn add_score(
        &mut self,
        id: DocId,
        user: &str,
        delta: i64,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Room)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            add_score(doc, user, delta)
        })
        .map(|(_, out)| out)
    }

    /// Sets (or with `None` clears) the playback schedule.
    pub fn set_playback(
        &mut self,
        id: DocId,
        playback: Option<&Playback>,
        now_ms: u64,
        correlation_id: Option<String>,
    ) -> Result<Vec<Output<P>>> {
        expect_kind(self, id, DocKind::Room)?;
        self.transact(id, now_ms, correlation_id, |doc, _, _| {
            set_playback(doc, playback)
        })
        .map(|(_, out)| out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;

    fn at(ms: u64, actor: u8) -> Hlc {
        Hlc {
            wall_ms: ms,
            counter: 0,
            actor: [actor; 16],
        }
    }

    fn new_room(max_size: u64) -> AutoCommit {
        let mut doc = AutoCommit::new();
        let room = NewRoom {
            name: "den".into(),
            creator: "ann".into(),
            device: "tv".into(),
            max_size,
        };
        init(&mut doc, &room, at(1, 1), 1_000).unwrap();
        doc
    }

    fn msg(id: &str, sender: &str, text: &str) -> NewMessage {
        NewMessage {
            id: id.into(),
            sender: sender.into(),
            text: text.into(),
        }
    }

    fn path_of(err: Error) -> String {
        match err {
            Error::Schema { path, .. } => path,
            other => panic!("expected a schema error, got {other}"),
        }
    }

    #[test]
    fn a_room_reads_back_what_was_written() {
        let mut doc = new_room(4);
        assert!(join_room(&mut doc, "bob", "phone", at(2, 2)).unwrap());
        assert!(!join_room(&mut doc, "bob", "laptop", at(3, 2)).unwrap());
        say(&mut doc, &msg("m1", "ann", "hi"), 2_000).unwrap();
        say(&mut doc, &msg("m2", "bob", "hello\nthere"), 3_000).unwrap();
        start_activity(&mut doc, "quiz", 4_000).unwrap();
        add_score(&mut doc, "bob", 3).unwrap();
        add_score(&mut doc, "bob", -1).unwrap();
        add_score(&mut doc, "cat", 2).unwrap();
        set_activity_state(&mut doc, ActivityState::Running).unwrap();
        set_activity_step(&mut doc, 2).unwrap();
        let play = Playback {
            media: "film.mkv".into(),
            start_at_ms: 9_000,
            position_ms: 120,
            rate: 1.5,
            paused: false,
        };
        set_playback(&mut doc, Some(&play)).unwrap();

        let room = Room::read(&doc).unwrap();
        assert_eq!((room.name.as_str(), room.creator.as_str()), ("den", "ann"));
        assert_eq!((room.created_at_ms, room.max_size), (1_000, 4));
        let members: Vec<_> = room
            .members
            .iter()
            .map(|m| (m.user.as_str(), m.device.as_str()))
            .collect();
        assert_eq!(members, [("ann", "tv"), ("bob", "laptop")]);
        assert!(room.overflow.is_empty());
        assert!(room.is_member("bob") && !room.is_member("cat"));
        assert_eq!(room.chat_len, 2);
        assert_eq!(room.recent_chat[1].text, "hello\nthere");
        assert_eq!(room.recent_chat[1].time_ms, 3_000);
        let a = room.activity.unwrap();
        assert_eq!(
            (a.kind.as_str(), a.state, a.step),
            ("quiz", ActivityState::Running, 2)
        );
        assert_eq!(a.scores["bob"], 2);
        assert_eq!(a.scores["ann"], 0);
        assert_eq!(a.scores["cat"], 2);
        assert_eq!(room.playback, Some(play));

        set_playback(&mut doc, None).unwrap();
        assert!(leave_room(&mut doc, "bob").unwrap());
        assert!(!leave_room(&mut doc, "bob").unwrap());
        let room = Room::read(&doc).unwrap();
        assert_eq!(room.playback, None);
        assert_eq!(room.members.len(), 1);
    }

    #[test]
    fn chat_reads_return_the_newest_oldest_first() {
        let mut doc = new_room(2);
        for i in 0..(ROOM_VIEW_CHAT + 5) {
            say(
                &mut doc,
                &msg(&format!("m{i}"), "ann", &i.to_string()),
                i as u64,
            )
            .unwrap();
        }
        let room = Room::read(&doc).unwrap();
        assert_eq!(room.chat_len, ROOM_VIEW_CHAT + 5);
        assert_eq!(room.recent_chat.len(), ROOM_VIEW_CHAT);
        assert_eq!(room.recent_chat[0].text, "5");
        let last3 = Room::read_chat(&doc, 3).unwrap();
        let texts: Vec<_> = last3.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["52", "53", "54"]);
        assert_eq!(Room::read_chat(&doc, 0).unwrap(), vec![]);

        let head = RoomHead::read(&doc).unwrap();
        assert_eq!(head.chat_len, ROOM_VIEW_CHAT + 5);
        assert_eq!(head.last_chat.as_deref(), Some("m54"));
        assert_eq!(head.members, room.members);
        let texts = |ms: Vec<ChatMessage>| ms.into_iter().map(|m| m.text).collect::<Vec<_>>();
        // After a known message: only the newer ones.
        let after = Room::read_chat_after(&doc, Some("m51"), MAX_CHAT_READ).unwrap();
        assert_eq!(texts(after), ["52", "53", "54"]);
        assert!(
            Room::read_chat_after(&doc, Some("m54"), MAX_CHAT_READ)
                .unwrap()
                .is_empty()
        );
        // Unknown (pruned) or none: the newest `max`.
        let gone = Room::read_chat_after(&doc, Some("gone"), 2).unwrap();
        assert_eq!(texts(gone), ["53", "54"]);
        let all = Room::read_chat_after(&doc, None, MAX_CHAT_READ).unwrap();
        assert_eq!(all.len(), ROOM_VIEW_CHAT + 5);
        // A known message further back than `max` counts as gone.
        let far = Room::read_chat_after(&doc, Some("m0"), 4).unwrap();
        assert_eq!(texts(far), ["51", "52", "53", "54"]);
    }

    #[test]
    fn a_check_after_changes_reads_only_the_messages_they_wrote() {
        use automerge::transaction::Transactable;
        let mut doc = new_room(4);
        for i in 0..3 {
            say(&mut doc, &msg(&format!("m{i}"), "ann", "hi"), i).unwrap();
        }
        let heads = doc.get_heads();
        let changes_since = |d: &mut AutoCommit| -> Vec<automerge::Change> {
            d.get_changes(&heads).into_iter().collect()
        };
        // A good message, and pruning the oldest: fine.
        let mut good = doc.fork();
        say(&mut good, &msg("m3", "ann", "ok"), 9).unwrap();
        prune_oldest(&mut good);
        let changes = changes_since(&mut good);
        let written = crate::schema::touched::written_list_maps(&good, &changes, &["room", "chat"])
            .expect("placed");
        assert_eq!(written.len(), 1, "only the new message is read");
        check_after(&good, &changes).unwrap();

        // A message without its time: refused.
        let mut bad = doc.fork();
        let r = req_map(&bad, &ROOT, ROOM_KEY, ROOM_KEY).unwrap();
        let list = req_list(&bad, &r, "chat", "room.chat").unwrap();
        let at = bad.length(&list);
        let m = bad.insert_object(&list, at, ObjType::Map).unwrap();
        bad.put(&m, "id", "x").unwrap();
        bad.put(&m, "sender", "ann").unwrap();
        bad.put(&m, "text", "no time").unwrap();
        let changes = changes_since(&mut bad);
        assert!(check_after(&bad, &changes).is_err());

        // A later change that breaks an older message's field: refused too.
        let mut edit = doc.fork();
        let r = req_map(&edit, &ROOT, ROOM_KEY, ROOM_KEY).unwrap();
        let list = req_list(&edit, &r, "chat", "room.chat").unwrap();
        let (_, first) = edit.get(&list, 0).unwrap().unwrap();
        edit.put(&first, "time", "not a number").unwrap();
        let changes = changes_since(&mut edit);
        assert!(check_after(&edit, &changes).is_err());

        // A value that is not a map, put into the chat: the whole view is read, refused.
        let mut scalar = doc.fork();
        let r = req_map(&scalar, &ROOT, ROOM_KEY, ROOM_KEY).unwrap();
        let list = req_list(&scalar, &r, "chat", "room.chat").unwrap();
        scalar.insert(&list, 1, "loose").unwrap();
        let changes = changes_since(&mut scalar);
        assert!(
            crate::schema::touched::written_list_maps(&scalar, &changes, &["room", "chat"])
                .is_none()
        );
        assert!(check_after(&scalar, &changes).is_err());
    }

    fn prune_oldest(doc: &mut AutoCommit) {
        use automerge::transaction::Transactable;
        let r = req_map(doc, &ROOT, ROOM_KEY, ROOM_KEY).unwrap();
        let list = req_list(doc, &r, "chat", "room.chat").unwrap();
        doc.delete(&list, 0).unwrap();
    }

    #[test]
    fn local_refusals_are_error_values() {
        let mut doc = new_room(2);
        join_room(&mut doc, "bob", "phone", at(2, 2)).unwrap();
        let err = join_room(&mut doc, "cat", "phone", at(3, 3)).unwrap_err();
        assert!(matches!(err, Error::RoomFull { max_size: 2 }), "{err}");
        let err = say(&mut doc, &msg("m1", "cat", "hi"), 1).unwrap_err();
        assert!(
            matches!(&err, Error::NotMember { user } if user == "cat"),
            "{err}"
        );
        let long = "x".repeat(MAX_CHAT_TEXT_BYTES + 1);
        assert_eq!(
            path_of(say(&mut doc, &msg("m1", "ann", &long), 1).unwrap_err()),
            "room.chat.text"
        );
        assert_eq!(
            path_of(say(&mut doc, &msg("", "ann", "hi"), 1).unwrap_err()),
            "room.chat.id"
        );
        assert!(matches!(
            add_score(&mut doc, "ann", 1),
            Err(Error::Refused { .. })
        ));
        let bad = Playback {
            media: "m".into(),
            start_at_ms: 0,
            position_ms: 0,
            rate: 0.0,
            paused: true,
        };
        assert_eq!(
            path_of(set_playback(&mut doc, Some(&bad)).unwrap_err()),
            "room.playback.rate"
        );
        let mut fresh = AutoCommit::new();
        let huge = NewRoom {
            name: "x".into(),
            creator: "ann".into(),
            device: "tv".into(),
            max_size: MAX_ROOM_SIZE + 1,
        };
        assert_eq!(
            path_of(init(&mut fresh, &huge, at(1, 1), 0).unwrap_err()),
            "room.max_size"
        );
    }

    #[test]
    fn concurrent_joins_past_the_cap_overflow_in_clock_order() {
        let mut a = new_room(2);
        let mut b = a.fork().with_actor(automerge::ActorId::from([2u8; 16]));
        join_room(&mut a, "late", "tv", at(50, 1)).unwrap();
        join_room(&mut b, "early", "tv", at(40, 2)).unwrap();
        a.merge(&mut b).unwrap();
        b.merge(&mut a).unwrap();
        let (ra, rb) = (Room::read(&a).unwrap(), Room::read(&b).unwrap());
        assert_eq!(ra, rb);
        let admitted: Vec<_> = ra.members.iter().map(|m| m.user.as_str()).collect();
        assert_eq!(admitted, ["ann", "early"]);
        assert_eq!(ra.overflow[0].user, "late");
        // With the room over its cap, no one else gets in.
        assert!(matches!(
            join_room(&mut a, "cat", "tv", at(60, 1)),
            Err(Error::RoomFull { .. })
        ));
    }

    #[test]
    fn malformed_rooms_name_the_field() {
        let base = {
            let mut doc = new_room(3);
            say(&mut doc, &msg("m1", "ann", "hi"), 5).unwrap();
            start_activity(&mut doc, "quiz", 6).unwrap();
            let play = Playback {
                media: "m".into(),
                start_at_ms: 1,
                position_ms: 0,
                rate: 1.0,
                paused: false,
            };
            set_playback(&mut doc, Some(&play)).unwrap();
            doc
        };
        let obj = |doc: &AutoCommit, path: &[&str]| {
            let mut o = ROOT;
            for p in path {
                o = match p.parse::<usize>() {
                    Ok(i) => doc.get(&o, i).unwrap().unwrap().1,
                    Err(_) => doc.get(&o, *p).unwrap().unwrap().1,
                };
            }
            o
        };
        type Breaker = fn(&mut AutoCommit, ObjId);
        let cases: [(&[&str], Breaker, &str); 10] = [
            (
                &["room"],
                |d, o| d.put(&o, "max_size", "big").unwrap(),
                "room.max_size",
            ),
            (
                &["room"],
                |d, o| d.put(&o, "max_size", 0_u64).unwrap(),
                "room.max_size",
            ),
            (&["room"], |d, o| d.delete(&o, "name").unwrap(), "room.name"),
            (
                &["room"],
                |d, o| d.put(&o, "chat", "none").unwrap(),
                "room.chat",
            ),
            (
                &["room", "members", "ann"],
                |d, o| d.put(&o, "joined_at", "soon").unwrap(),
                "room.members.ann.joined_at",
            ),
            (
                &["room", "chat", "0"],
                |d, o| d.put(&o, "text", 7_i64).unwrap(),
                "room.chat.0.text",
            ),
            (
                &["room", "chat", "0"],
                |d, o| d.put(&o, "sender", "a\u{1b}[2J").unwrap(),
                "room.chat.0.sender",
            ),
            (
                &["room", "activity"],
                |d, o| d.put(&o, "state", "won").unwrap(),
                "room.activity.state",
            ),
            (
                &["room", "activity", "scores"],
                |d, o| d.put(&o, "ann", "ten").unwrap(),
                "room.activity.scores.ann",
            ),
            (
                &["room", "playback"],
                |d, o| d.put(&o, "rate", f64::NAN).unwrap(),
                "room.playback.rate",
            ),
        ];
        for (at_path, breaker, expected) in cases {
            let mut doc = base.clone();
            let o = obj(&doc, at_path);
            breaker(&mut doc, o);
            assert_eq!(path_of(Room::read(&doc).unwrap_err()), expected);
        }
    }
}
