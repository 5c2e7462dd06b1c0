//! Rooms and presence in the core.
//!
//! A room is a document of the home, created through the same path as an entity (a fresh
//! key wrapped for every device in the home document, pushed whole to admitted devices),
//! so every device of the home holds it. Rooms are found by scanning the loaded documents
//! for the `room` kind; there are few, and a scan keeps no index to go stale.
//!
//! Presence lives in one document per home whose id is derived from the HomeId, so every
//! device knows where to look without a schema change. Only the admin device (the holder
//! of the home's root key) creates it, once, so two devices never create it concurrently
//! (two concurrent creations would each write the root map, and one side's entries would
//! be hidden); other devices receive its key like any other document's.

use std::collections::BTreeSet;
use std::collections::HashMap;

use hearth_crdt::schema::room::{MAX_CHAT_READ, NewMessage, NewRoom};
use hearth_crdt::{DocId, DocKind, Error as CrdtError, PresenceStatus, PresenceUpdate};
use hearth_storage::Batch;
use sha2::{Digest, Sha256};

use crate::Error;
use crate::core::Reply;
use crate::core::{Core, now_ms, rfc3339_ms};
use crate::events::Event;
use crate::presence::{PresenceInfo, Status};
use crate::rooms::{ChatMessage, Room, RoomMember};

/// Requests of the rooms and presence service.
pub(crate) enum RoomRequest {
    // Rooms and presence (rooms.rs).
    CreateRoom {
        name: String,
        max_size: u64,
        user: Option<String>,
        reply: Reply<crate::rooms::Room>,
    },
    GetRoom {
        room: String,
        reply: Reply<crate::rooms::Room>,
    },
    ListRooms {
        reply: Reply<Vec<crate::rooms::Room>>,
    },
    JoinRoom {
        room: String,
        user: Option<String>,
        reply: Reply<crate::rooms::Room>,
    },
    LeaveRoom {
        room: String,
        user: Option<String>,
        reply: Reply<crate::rooms::Room>,
    },
    Say {
        room: String,
        user: Option<String>,
        text: String,
        reply: Reply<crate::rooms::ChatMessage>,
    },
    Chat {
        room: String,
        limit: usize,
        reply: Reply<Vec<crate::rooms::ChatMessage>>,
    },
    /// Prunes every room's chat to the retention limits; answers how many went.
    PruneChat { reply: Reply<usize> },
    SetPresence {
        user: Option<String>,
        status: crate::presence::Status,
        note: Option<String>,
        reply: Reply<crate::presence::PresenceInfo>,
    },
    GetPresence {
        user: Option<String>,
        reply: Reply<crate::presence::PresenceInfo>,
    },
    ListPresence {
        room: Option<String>,
        reply: Reply<Vec<crate::presence::PresenceInfo>>,
    },
}

/// What a room looked like when last announced.
pub(crate) struct RoomSeen {
    members: BTreeSet<String>,
    /// The newest message announced. New messages are the ones after it, not a count
    /// past the old length: pruning takes messages off the front while others arrive.
    last_chat: Option<String>,
}

/// What changed in a room since it was last announced.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct RoomDiff {
    /// Not announced before: the whole room is new here.
    pub(crate) created: bool,
    pub(crate) joined: Vec<String>,
    pub(crate) left: Vec<String>,
    /// Messages after the last one announced, oldest first.
    pub(crate) messages: Vec<hearth_crdt::ChatMessage>,
}

impl RoomSeen {
    /// What the room (`now`, its members and newest message) holds that `before` did
    /// not announce. New messages are read by `after`, given the last one announced: the
    /// messages after it (all of the newest up to a full chat read when it is gone, since
    /// pruning took it and everything before it).
    pub(crate) fn diff(
        before: Option<&RoomSeen>,
        now: &RoomSeen,
        after: impl FnOnce(Option<&str>) -> Option<Vec<hearth_crdt::ChatMessage>>,
    ) -> RoomDiff {
        let Some(before) = before else {
            return RoomDiff {
                created: true,
                ..RoomDiff::default()
            };
        };
        let mut diff = RoomDiff {
            joined: now.members.difference(&before.members).cloned().collect(),
            left: before.members.difference(&now.members).cloned().collect(),
            ..RoomDiff::default()
        };
        if now.last_chat != before.last_chat {
            diff.messages = after(before.last_chat.as_deref()).unwrap_or_default();
        }
        diff
    }

    pub(crate) fn of(room: &hearth_crdt::Room) -> Self {
        Self {
            members: room
                .members
                .iter()
                .chain(&room.overflow)
                .map(|m| m.user.clone())
                .collect(),
            last_chat: room.recent_chat.last().map(|m| m.id.clone()),
        }
    }

    pub(crate) fn of_head(head: &hearth_crdt::RoomHead) -> Self {
        Self {
            members: head
                .members
                .iter()
                .chain(&head.overflow)
                .map(|m| m.user.clone())
                .collect(),
            last_chat: head.last_chat.clone(),
        }
    }
}

/// How much chat each room keeps (`Config::chat_max_messages`, `Config::chat_max_age`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChatRetention {
    pub(crate) max_messages: usize,
    pub(crate) max_age: std::time::Duration,
}

/// Messages sent before this may go (with more than the limit held, the oldest go).
fn cutoff_ms(keep: ChatRetention, now: u64) -> u64 {
    let max_age_ms = u64::try_from(keep.max_age.as_millis()).unwrap_or(u64::MAX);
    now.saturating_sub(max_age_ms)
}

/// Deletes the oldest messages of a room document's chat beyond `max` or older than
/// `cutoff_ms`; returns how many went. Messages are appended in time order, so the
/// leading ones are the oldest; a message whose time cannot be read stops the age scan.
fn prune_chat_list(
    d: &mut automerge::AutoCommit,
    max: usize,
    cutoff_ms: u64,
) -> Result<usize, CrdtError> {
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ROOT, ReadDoc, ScalarValue, Value};
    let am = |e: automerge::AutomergeError| CrdtError::Automerge(e.to_string());
    let Some((Value::Object(ObjType::Map), room)) = d.get(ROOT, "room").map_err(am)? else {
        return Ok(0);
    };
    let Some((Value::Object(ObjType::List), chat)) = d.get(&room, "chat").map_err(am)? else {
        return Ok(0);
    };
    let len = d.length(&chat);
    let mut doomed = len.saturating_sub(max);
    while doomed < len {
        let time = match d.get(&chat, doomed).map_err(am)? {
            Some((Value::Object(ObjType::Map), msg)) => match d.get(&msg, "time").map_err(am)? {
                Some((Value::Scalar(v), _)) => match v.as_ref() {
                    ScalarValue::Uint(t) => Some(*t),
                    ScalarValue::Int(t) => u64::try_from(*t).ok(),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        match time {
            Some(t) if t < cutoff_ms => doomed += 1,
            _ => break,
        }
    }
    for _ in 0..doomed {
        d.delete(&chat, 0).map_err(am)?;
    }
    Ok(doomed)
}

/// The id of a home's presence document: derived from the HomeId.
pub(crate) fn presence_doc_id(home_id: &str) -> DocId {
    let digest = Sha256::new()
        .chain_update(b"hearth/presence/v1\0")
        .chain_update(home_id.as_bytes())
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    DocId::from_bytes(id)
}

/// Maps document errors of room and presence writes onto API kinds.
fn room_err(e: CrdtError) -> Error {
    match e {
        CrdtError::RoomFull { .. } => Error::Conflict(e.to_string()),
        CrdtError::NotMember { .. } => {
            Error::Forbidden(format!("{e}; join it first (`hearth room join ROOM`)"))
        }
        CrdtError::Schema { .. } => Error::Invalid(e.to_string()),
        other => Error::Document(other.to_string()),
    }
}

fn chat_view(room_id: &str, m: hearth_crdt::ChatMessage) -> ChatMessage {
    ChatMessage {
        id: m.id,
        room_id: room_id.to_string(),
        sender: m.sender,
        message: m.text,
        timestamp: rfc3339_ms(m.time_ms),
    }
}

fn member_view(m: &hearth_crdt::Member) -> RoomMember {
    RoomMember {
        user: m.user.clone(),
        device: m.device.clone().into(),
        joined_at: rfc3339_ms(m.joined_at.wall_ms),
    }
}

fn to_status(s: PresenceStatus) -> Status {
    match s {
        PresenceStatus::Online => Status::Online,
        PresenceStatus::Away => Status::Away,
        PresenceStatus::Busy => Status::Busy,
    }
}

impl Core {
    /// Answers a request of the rooms and presence service.
    pub(crate) fn handle_rooms(&mut self, request: RoomRequest) {
        match request {
            RoomRequest::CreateRoom {
                name,
                max_size,
                user,
                reply,
            } => {
                let result = self.create_room(&name, max_size, user);
                self.reply_after_flush(result, reply);
            }
            RoomRequest::GetRoom { room, reply } => {
                let _ = reply.send(self.resolve_room(&room).and_then(|d| self.room_view(d)));
            }
            RoomRequest::ListRooms { reply } => {
                let _ = reply.send(self.list_rooms());
            }
            RoomRequest::JoinRoom { room, user, reply } => {
                let result = self.join_or_leave(&room, user, true);
                self.reply_after_flush(result, reply);
            }
            RoomRequest::LeaveRoom { room, user, reply } => {
                let result = self.join_or_leave(&room, user, false);
                self.reply_after_flush(result, reply);
            }
            RoomRequest::Say {
                room,
                user,
                text,
                reply,
            } => {
                let result = self.say(&room, user, text);
                self.reply_after_flush(result, reply);
            }
            RoomRequest::Chat { room, limit, reply } => {
                let _ = reply.send(self.chat(&room, limit));
            }
            RoomRequest::PruneChat { reply } => {
                let result = self.prune_all_chats();
                self.reply_after_flush(result, reply);
            }
            RoomRequest::SetPresence {
                user,
                status,
                note,
                reply,
            } => {
                let result = self.set_presence(user, status, note);
                self.reply_after_flush(result, reply);
            }
            RoomRequest::GetPresence { user, reply } => {
                let _ = reply.send(self.get_presence(user));
            }
            RoomRequest::ListPresence { room, reply } => {
                let _ = reply.send(self.list_presence(room.as_deref()));
            }
        }
    }

    pub(crate) fn user_or_device(&self, user: Option<String>) -> String {
        user.unwrap_or_else(|| self.device_name.clone())
    }

    /// Room documents of this home whose content has arrived, read without their chat.
    pub(crate) fn room_docs(&self) -> Vec<(DocId, hearth_crdt::Room)> {
        self.engine
            .documents()
            .filter(|d| {
                self.engine
                    .header(*d)
                    .is_ok_and(|h| h.kind == DocKind::Room && h.owner_home == self.home.home_id)
            })
            .filter_map(|d| self.engine.room_meta(d).ok().map(|r| (d, r)))
            .collect()
    }

    /// A room by id (base58) or by a name only one room has.
    pub(crate) fn resolve_room(&self, text: &str) -> Result<DocId, Error> {
        if let Some(id) = DocId::parse(text)
            && self.engine.is_room(id)
        {
            return Ok(id);
        }
        let named: Vec<DocId> = self
            .room_docs()
            .into_iter()
            .filter(|(_, r)| r.name == text)
            .map(|(d, _)| d)
            .collect();
        match named.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::NotFound(format!(
                "no room {:?}; `hearth room create NAME` makes one",
                text.chars().take(64).collect::<String>()
            ))),
            many => Err(Error::Invalid(format!(
                "{} rooms are named {text:?}; name the room by its id",
                many.len()
            ))),
        }
    }

    pub(crate) fn room_view(&self, doc: DocId) -> Result<Room, Error> {
        let r = self.engine.room_meta(doc).map_err(room_err)?;
        Ok(Room {
            room_id: doc.to_string(),
            name: r.name,
            creator: r.creator,
            max_size: r.max_size,
            members: r.members.iter().map(member_view).collect(),
            overflow: r.overflow.iter().map(member_view).collect(),
            created_at: rfc3339_ms(r.created_at_ms),
        })
    }

    pub(crate) fn list_rooms(&self) -> Result<Vec<Room>, Error> {
        let mut rooms = self
            .room_docs()
            .into_iter()
            .map(|(d, _)| self.room_view(d))
            .collect::<Result<Vec<_>, _>>()?;
        rooms.sort_by(|a, b| (&a.name, &a.room_id).cmp(&(&b.name, &b.room_id)));
        Ok(rooms)
    }

    pub(crate) fn create_room(
        &mut self,
        name: &str,
        max_size: u64,
        user: Option<String>,
    ) -> Result<(Room, Batch), Error> {
        if self.room_docs().iter().any(|(_, r)| r.name == name) {
            return Err(Error::Conflict(format!(
                "a room named {name:?} exists already; pick another name"
            )));
        }
        let spec = NewRoom {
            name: name.to_string(),
            creator: self.user_or_device(user),
            device: self.peer_id.clone(),
            max_size,
        };
        let now = now_ms();
        let (doc, batch) = self.create_shared_doc(
            DocId::from_bytes(crate::home::random()?),
            now,
            None,
            |engine, doc, epoch, home| {
                engine
                    .create_room(doc, &home.home_id, epoch, &spec, now)
                    .map_err(room_err)
            },
        )?;
        let room = self.room_view(doc)?;
        if let Ok(r) = self.engine.room(doc) {
            self.rooms.seen.insert(doc, RoomSeen::of(&r));
        }
        self.emit_event(Event::RoomCreated {
            room: Box::new(room.clone()),
            from_peer: None,
        });
        Ok((room, batch))
    }

    pub(crate) fn join_or_leave(
        &mut self,
        room: &str,
        user: Option<String>,
        join: bool,
    ) -> Result<(Room, Batch), Error> {
        let doc = self.resolve_room(room)?;
        let user = self.user_or_device(user);
        let out = if join {
            let device = self.peer_id.clone();
            self.engine.join_room(doc, &user, &device, now_ms(), None)
        } else {
            self.engine.leave_room(doc, &user, now_ms(), None)
        }
        .map_err(room_err)?;
        let batch = self.handle_outputs(out);
        Ok((self.room_view(doc)?, batch))
    }

    pub(crate) fn say(
        &mut self,
        room: &str,
        user: Option<String>,
        text: String,
    ) -> Result<(ChatMessage, Batch), Error> {
        let doc = self.resolve_room(room)?;
        let msg = NewMessage {
            id: hex::encode(crate::home::random::<8>()?),
            sender: self.user_or_device(user),
            text,
        };
        let now = now_ms();
        let keep = self.rooms.chat_keep;
        // Over the limit now: the oldest go in the same change. The message just posted
        // always stays in it (so it is announced, even with a limit of 0; the periodic
        // prune applies that).
        let max = keep.max_messages.max(1);
        let (sent, out) = self
            .engine
            .say_then(doc, &msg, now, None, |d| {
                if hearth_crdt::schema::room::chat_len(d)? > max {
                    prune_chat_list(d, max, cutoff_ms(keep, now))?;
                }
                Ok(())
            })
            .map_err(room_err)?;
        let batch = self.handle_outputs(out);
        Ok((chat_view(&doc.to_string(), sent), batch))
    }

    /// Prunes one room's chat to the retention limits.
    pub(crate) fn prune_chat(&mut self, doc: DocId, now: u64) -> Result<(usize, Batch), Error> {
        let keep = self.rooms.chat_keep;
        let cutoff = cutoff_ms(keep, now);
        let (pruned, out) = self
            .engine
            .transact(doc, now, None, |d, _, _| {
                prune_chat_list(d, keep.max_messages, cutoff)
            })
            .map_err(room_err)?;
        Ok((pruned, self.handle_outputs(out)))
    }

    /// Prunes every room's chat; the periodic retention tick asks for it.
    pub(crate) fn prune_all_chats(&mut self) -> Result<(usize, Batch), Error> {
        let now = now_ms();
        let mut total = 0;
        let mut batch = Batch::new();
        for (doc, _) in self.room_docs() {
            match self.prune_chat(doc, now) {
                Ok((n, more)) => {
                    total += n;
                    crate::core::append(&mut batch, more);
                }
                Err(error) => tracing::warn!(%doc, %error, "cannot prune a room's chat"),
            }
        }
        Ok((total, batch))
    }

    pub(crate) fn chat(&self, room: &str, limit: usize) -> Result<Vec<ChatMessage>, Error> {
        let doc = self.resolve_room(room)?;
        let id = doc.to_string();
        Ok(self
            .engine
            .room_chat(doc, limit)
            .map_err(room_err)?
            .into_iter()
            .map(|m| chat_view(&id, m))
            .collect())
    }

    /// Creates the home's presence document on the admin device, once.
    pub(crate) async fn ensure_presence_doc(&mut self) -> Result<(), Error> {
        let doc = presence_doc_id(&self.home.home_id);
        if self.home.root_secret.is_none() || self.keyring.ids().any(|(d, _)| d == doc) {
            return Ok(());
        }
        let now = now_ms();
        // The frames the creation queued leave only once it is stored, and never if it
        // is not: a peer must not hold changes this device could lose.
        let earlier = std::mem::take(&mut self.outbox);
        let created = self.create_shared_doc(doc, now, None, |engine, doc, epoch, home| {
            engine
                .create_presence(doc, &home.home_id, epoch, now)
                .map_err(room_err)
        });
        let made = std::mem::replace(&mut self.outbox, earlier);
        let (_, batch) = created?;
        self.store_in_order(batch).await?;
        self.outbox.extend(made);
        tracing::info!(%doc, "created the home's presence document");
        Ok(())
    }

    /// Records the current rooms and presence, so only later changes are announced.
    pub(crate) fn remember_rooms_and_presence(&mut self) {
        for (doc, _) in self.room_docs() {
            if let Ok(head) = self.engine.room_head(doc) {
                self.rooms.seen.insert(doc, RoomSeen::of_head(&head));
            }
        }
        if let Ok(p) = self.engine.presence(presence_doc_id(&self.home.home_id)) {
            self.rooms.presence_seen = p.users;
        }
    }

    pub(crate) fn presence_info(
        &self,
        user: &str,
        entry: &hearth_crdt::PresenceEntry,
    ) -> PresenceInfo {
        let live = entry.device == self.peer_id || self.is_alive(&entry.device);
        PresenceInfo {
            user: user.to_string(),
            status: if live {
                to_status(entry.status)
            } else {
                Status::Offline
            },
            since: rfc3339_ms(entry.since_ms),
            device: entry.device.clone().into(),
            note: entry.note.clone(),
        }
    }

    pub(crate) fn presence_doc(&mut self) -> Result<DocId, Error> {
        let doc = presence_doc_id(&self.home.home_id);
        if self.has_content(doc) {
            Ok(doc)
        } else {
            Err(Error::Conflict(
                "presence is not available on this device yet: the home's presence document \
                 arrives from the admin device; connect to it and retry"
                    .into(),
            ))
        }
    }

    pub(crate) fn set_presence(
        &mut self,
        user: Option<String>,
        status: Status,
        note: Option<String>,
    ) -> Result<(PresenceInfo, Batch), Error> {
        let status = match status {
            Status::Online => PresenceStatus::Online,
            Status::Away => PresenceStatus::Away,
            Status::Busy => PresenceStatus::Busy,
            Status::Offline => {
                return Err(Error::Invalid(
                    "offline cannot be set: it is derived; use online, away or busy".into(),
                ));
            }
        };
        let doc = self.presence_doc()?;
        let user = self.user_or_device(user);
        let update = PresenceUpdate {
            status,
            device: self.peer_id.clone(),
            note,
        };
        let (entry, out) = self
            .engine
            .set_presence(doc, &user, &update, now_ms(), None)
            .map_err(room_err)?;
        let batch = self.handle_outputs(out);
        Ok((self.presence_info(&user, &entry), batch))
    }

    pub(crate) fn get_presence(&mut self, user: Option<String>) -> Result<PresenceInfo, Error> {
        let doc = self.presence_doc()?;
        let user = self.user_or_device(user);
        let presence = self.engine.presence(doc).map_err(room_err)?;
        match presence.users.get(&user) {
            Some(entry) => Ok(self.presence_info(&user, entry)),
            None => Err(Error::NotFound(format!(
                "{:?} has never set a presence; `hearth presence set online --user NAME` sets one",
                user.chars().take(64).collect::<String>()
            ))),
        }
    }

    pub(crate) fn list_presence(&mut self, room: Option<&str>) -> Result<Vec<PresenceInfo>, Error> {
        let members: Option<BTreeSet<String>> = match room {
            Some(r) => {
                let doc = self.resolve_room(r)?;
                let room = self.engine.room_meta(doc).map_err(room_err)?;
                Some(room.members.into_iter().map(|m| m.user).collect())
            }
            None => None,
        };
        let doc = self.presence_doc()?;
        let presence = self.engine.presence(doc).map_err(room_err)?;
        Ok(presence
            .users
            .iter()
            .filter(|(u, _)| members.as_ref().is_none_or(|m| m.contains(*u)))
            .map(|(u, e)| self.presence_info(u, e))
            .filter(|p| p.status != Status::Offline)
            .collect())
    }

    /// Turns a change of a room or the presence document into events: a room seen for
    /// the first time, members who joined or left, new chat messages, changed presence.
    pub(crate) fn on_doc_changed(&mut self, doc: DocId, from_peer: Option<String>) {
        let Ok(header) = self.engine.header(doc) else {
            return;
        };
        match header.kind {
            DocKind::Room => self.on_room_changed(doc, from_peer),
            DocKind::Presence if doc == presence_doc_id(&self.home.home_id) => {
                let Ok(presence) = self.engine.presence(doc) else {
                    return;
                };
                for (user, entry) in &presence.users {
                    if self.rooms.presence_seen.get(user) != Some(entry) {
                        let info = self.presence_info(user, entry);
                        self.emit_event(Event::Presence {
                            presence: Box::new(info),
                            from_peer: from_peer.clone().map(Into::into),
                        });
                    }
                }
                self.rooms.presence_seen = presence.users;
            }
            _ => {}
        }
    }

    pub(crate) fn on_room_changed(&mut self, doc: DocId, from_peer: Option<String>) {
        let from_peer: Option<crate::DeviceId> = from_peer.map(Into::into);
        let Ok(head) = self.engine.room_head(doc) else {
            return;
        };
        let room_id = doc.to_string();
        let now = RoomSeen::of_head(&head);
        let engine = &self.engine;
        let diff = RoomSeen::diff(self.rooms.seen.get(&doc), &now, |after| {
            engine.room_chat_after(doc, after, MAX_CHAT_READ).ok()
        });
        self.rooms.seen.insert(doc, now);
        if diff.created {
            if let Ok(view) = self.room_view(doc) {
                self.emit_event(Event::RoomCreated {
                    room: Box::new(view),
                    from_peer,
                });
            }
            return;
        }
        for user in diff.joined {
            self.emit_event(Event::MemberJoined {
                room_id: room_id.clone(),
                user,
                from_peer: from_peer.clone(),
            });
        }
        for user in diff.left {
            self.emit_event(Event::MemberLeft {
                room_id: room_id.clone(),
                user,
                from_peer: from_peer.clone(),
            });
        }
        for m in diff.messages {
            self.emit_event(Event::Chat {
                message: Box::new(chat_view(&room_id, m)),
                from_peer: from_peer.clone(),
            });
        }
    }
}

impl RoomRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        matches!(
            self,
            Self::CreateRoom { .. }
                | Self::JoinRoom { .. }
                | Self::LeaveRoom { .. }
                | Self::Say { .. }
                | Self::SetPresence { .. }
        )
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::CreateRoom { reply, .. }
            | Self::GetRoom { reply, .. }
            | Self::JoinRoom { reply, .. }
            | Self::LeaveRoom { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::ListRooms { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::Say { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Chat { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::PruneChat { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::SetPresence { reply, .. } | Self::GetPresence { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::ListPresence { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// The rooms and presence service's state: what was last announced.
pub(crate) struct RoomState {
    /// What each room looked like when last announced, to turn document changes into
    /// member and chat events.
    pub(crate) seen: HashMap<DocId, RoomSeen>,
    /// How much chat each room keeps.
    pub(crate) chat_keep: ChatRetention,
    /// Presence entries as last announced.
    pub(crate) presence_seen: std::collections::BTreeMap<String, hearth_crdt::PresenceEntry>,
}

#[cfg(test)]
mod tests {
    /// Room and presence requests on a core with no sockets.
    #[tokio::test]
    async fn room_requests_create_join_chat_leave_and_presence() {
        use super::RoomRequest;
        use crate::core::testing::TestCore;

        let t = TestCore::start("hall").await;
        let mut events = t.events();
        let room = t
            .core
            .call(|reply| RoomRequest::CreateRoom {
                name: "kitchen".into(),
                max_size: 4,
                user: Some("ann".into()),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(room.members.len(), 1, "the creator is a member");
        let id = room.room_id.clone();
        let again = t
            .core
            .call(|reply| RoomRequest::CreateRoom {
                name: "kitchen".into(),
                max_size: 4,
                user: None,
                reply,
            })
            .await
            .unwrap();
        assert!(again.is_err(), "room names are unique");
        let joined = t
            .core
            .call(|reply| RoomRequest::JoinRoom {
                room: "kitchen".into(),
                user: Some("bob".into()),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(joined.members.len(), 2);
        let said = t
            .core
            .call(|reply| RoomRequest::Say {
                room: id.clone(),
                user: Some("bob".into()),
                text: "hi".into(),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(said.sender, "bob");
        let stranger = t
            .core
            .call(|reply| RoomRequest::Say {
                room: id.clone(),
                user: Some("eve".into()),
                text: "let me in".into(),
                reply,
            })
            .await
            .unwrap();
        assert!(stranger.is_err(), "only members speak");
        let chat = t
            .core
            .call(|reply| RoomRequest::Chat {
                room: id.clone(),
                limit: 10,
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(chat.len(), 1);
        let left = t
            .core
            .call(|reply| RoomRequest::LeaveRoom {
                room: id.clone(),
                user: Some("bob".into()),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(left.members.len(), 1);

        let me = t
            .core
            .call(|reply| RoomRequest::SetPresence {
                user: None,
                status: crate::presence::Status::Busy,
                note: Some("cooking".into()),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(me.user, "hall", "the device name is the default user");
        assert_eq!(me.status, crate::presence::Status::Busy);

        let mut names = Vec::new();
        while let Ok(event) = events.try_recv() {
            names.push(event.name().to_string());
        }
        for name in [
            "room.created",
            "room.member_joined",
            "room.chat",
            "room.member_left",
        ] {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
        t.stop().await;
    }

    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ROOT, ReadDoc, ScalarValue};

    use super::prune_chat_list;

    /// A room document's chat with one message per time, oldest first.
    pub(crate) fn chat(times: &[u64]) -> AutoCommit {
        let mut d = AutoCommit::new();
        let room = d.put_object(ROOT, "room", ObjType::Map).unwrap();
        let chat = d.put_object(&room, "chat", ObjType::List).unwrap();
        for (i, t) in times.iter().enumerate() {
            let m = d.insert_object(&chat, i, ObjType::Map).unwrap();
            d.put(&m, "id", format!("m{i}")).unwrap();
            d.put(&m, "time", ScalarValue::Uint(*t)).unwrap();
        }
        d
    }

    pub(crate) fn ids(d: &AutoCommit) -> Vec<String> {
        let (_, room) = d.get(ROOT, "room").unwrap().unwrap();
        let (_, chat) = d.get(&room, "chat").unwrap().unwrap();
        (0..d.length(&chat))
            .map(|i| {
                let (_, m) = d.get(&chat, i).unwrap().unwrap();
                d.get(&m, "id")
                    .unwrap()
                    .unwrap()
                    .0
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    pub(crate) fn chat_keeps_the_newest_by_count() {
        let mut d = chat(&[10, 20, 30, 40, 50]);
        assert_eq!(prune_chat_list(&mut d, 2, 0).unwrap(), 3);
        assert_eq!(ids(&d), ["m3", "m4"]);
        assert_eq!(prune_chat_list(&mut d, 2, 0).unwrap(), 0);
    }

    #[test]
    pub(crate) fn chat_drops_messages_older_than_the_cutoff() {
        let day = 86_400_000;
        let now = 100 * day;
        let mut d = chat(&[now - 40 * day, now - 31 * day, now - 29 * day, now]);
        // Thirty days kept.
        assert_eq!(prune_chat_list(&mut d, 1_000, now - 30 * day).unwrap(), 2);
        assert_eq!(ids(&d), ["m2", "m3"]);
    }

    /// Three devices on the seeded harness network: concurrent joins, a leave and chat
    /// while frames are lost, repeated and reordered. Once the network heals, every
    /// device announces the same room changes from what it had announced before.
    #[test]
    pub(crate) fn every_device_announces_the_same_room_changes_after_loss_and_reordering() {
        use hearth_crdt::harness::{Faults, Net};
        use hearth_crdt::schema::room::{MAX_CHAT_READ, NewMessage, NewRoom};
        use hearth_crdt::{DocId, DocKind, EngineConfig, KeyEpoch};

        use super::{RoomDiff, RoomSeen};

        for seed in [1, 7, 42] {
            let doc = DocId::from_bytes([5; 16]);
            let epoch = KeyEpoch::first([0; 16]);
            let mut net = Net::new(3, seed, EngineConfig::default());
            let room = NewRoom {
                name: "kitchen".into(),
                creator: "ann".into(),
                device: "peer-0".into(),
                max_size: 8,
            };
            let out = net.nodes[0]
                .create_room(doc, "home-1", epoch, &room, net.now_ms)
                .unwrap();
            net.absorb(0, out);
            for i in 1..3 {
                net.nodes[i].expect_document(doc, DocKind::Room, "home-1", epoch);
            }
            for a in 0..3 {
                for b in 0..3 {
                    if a != b {
                        let out = net.nodes[a].attach(b, doc, None, net.now_ms).unwrap();
                        net.absorb(a, out);
                    }
                }
            }
            net.run_until_quiet(100_000);
            let before: Vec<RoomSeen> = (0..3)
                .map(|i| RoomSeen::of(&net.nodes[i].room(doc).unwrap()))
                .collect();

            net.faults = Faults {
                drop_pct: 20,
                dup_pct: 10,
                reorder: true,
            };
            let now = net.now_ms;
            let out = net.nodes[1]
                .join_room(doc, "bob", "peer-1", now, None)
                .unwrap();
            net.absorb(1, out);
            let out = net.nodes[2]
                .join_room(doc, "cara", "peer-2", now, None)
                .unwrap();
            net.absorb(2, out);
            for _ in 0..5 {
                net.step();
            }
            for (node, id, sender, text) in [(0, "m1", "ann", "hello"), (1, "m2", "bob", "hi")] {
                let message = NewMessage {
                    id: id.into(),
                    sender: sender.into(),
                    text: text.into(),
                };
                let now = net.now_ms;
                let (_, out) = net.nodes[node].say(doc, &message, now, None).unwrap();
                net.absorb(node, out);
                net.step();
            }
            let now = net.now_ms;
            let out = net.nodes[2].leave_room(doc, "cara", now, None).unwrap();
            net.absorb(2, out);
            net.faults = Faults::RELIABLE;
            net.run_until_quiet(100_000);

            let diffs: Vec<RoomDiff> = (0..3)
                .map(|i| {
                    let engine = &net.nodes[i];
                    let now = RoomSeen::of_head(&engine.room_head(doc).unwrap());
                    RoomSeen::diff(Some(&before[i]), &now, |after| {
                        engine.room_chat_after(doc, after, MAX_CHAT_READ).ok()
                    })
                })
                .collect();
            assert_eq!(diffs[0], diffs[1], "seed {seed}");
            assert_eq!(diffs[0], diffs[2], "seed {seed}");
            assert!(!diffs[0].created);
            assert_eq!(diffs[0].joined, vec!["bob".to_string()], "seed {seed}");
            assert!(diffs[0].left.is_empty(), "cara joined and left: {diffs:?}");
            let mut ids: Vec<&str> = diffs[0].messages.iter().map(|m| m.id.as_str()).collect();
            ids.sort_unstable();
            assert_eq!(ids, ["m1", "m2"], "seed {seed}");
            // Announced once: from what is seen now, nothing more is new.
            let seen = RoomSeen::of(&net.nodes[0].room(doc).unwrap());
            let again = RoomSeen::diff(Some(&seen), &seen, |_| None);
            assert_eq!(again, RoomDiff::default());
        }
    }
}
