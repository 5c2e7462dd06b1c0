//! Rooms: documents of the home with members (capped at `max_size`) and a chat, synced to
//! every device of the home like entities are.

pub(crate) mod service;

use serde::Serialize;

use crate::core::CoreHandle;
use crate::{DeviceId, Error, Timestamp};

/// `max_size` of a room created without one.
pub const DEFAULT_ROOM_SIZE: u64 = 50;
/// Most chat messages one read returns.
pub const MAX_CHAT_LIMIT: usize = hearth_crdt::schema::room::MAX_CHAT_READ;
/// Longest chat message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = hearth_crdt::schema::room::MAX_CHAT_TEXT_BYTES;

/// A room as the node presents it (the API's room body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Room {
    /// The room document's id, base58.
    pub room_id: String,
    /// Its name.
    pub name: String,
    /// The user who created it.
    pub creator: String,
    /// Most members it admits.
    pub max_size: u64,
    /// Members, in the order they joined (the first `max_size`).
    pub members: Vec<RoomMember>,
    /// Members past `max_size`: two devices admitted the last place at once, and these
    /// joined later by the room's clock. Empty in the usual case.
    pub overflow: Vec<RoomMember>,
    /// When it was created.
    pub created_at: Timestamp,
}

/// One member of a room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RoomMember {
    /// User name.
    pub user: String,
    /// PeerId of the device the user joined from.
    pub device: DeviceId,
    /// When they joined.
    pub joined_at: Timestamp,
}

/// One chat message (the API's message body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// Message id (random).
    pub id: String,
    /// The room it was posted in.
    pub room_id: String,
    /// The user who sent it.
    pub sender: String,
    /// Its text.
    pub message: String,
    /// When it was sent.
    pub timestamp: Timestamp,
}

/// Handle to the home's rooms. Cheap to clone.
///
/// A ROOM argument is the room id (base58) or a name that only one room has. A `user` of
/// `None` is the device name.
#[derive(Clone)]
pub struct Rooms {
    pub(crate) core: CoreHandle,
}

impl Rooms {
    /// Creates a room; its creator joins it at once. `max_size` defaults to
    /// [`DEFAULT_ROOM_SIZE`] and must be 1 to 1000.
    ///
    /// Not cancel-safe: once queued, the room is created even if the future is dropped.
    pub async fn create(
        &self,
        name: &str,
        max_size: Option<u64>,
        user: Option<&str>,
    ) -> Result<Room, Error> {
        let name = name.to_string();
        let user = user.map(str::to_string);
        self.core
            .call(|reply| crate::rooms::service::RoomRequest::CreateRoom {
                name,
                max_size: max_size.unwrap_or(DEFAULT_ROOM_SIZE),
                user,
                reply,
            })
            .await?
    }

    /// Reads a room; [`Error::NotFound`] when there is none by that id or name.
    ///
    /// Cancel-safe.
    pub async fn get(&self, room: &str) -> Result<Room, Error> {
        let room = room.to_string();
        self.core
            .call(|reply| crate::rooms::service::RoomRequest::GetRoom { room, reply })
            .await?
    }

    /// Every room of the home this device holds, ordered by name.
    ///
    /// Cancel-safe.
    pub async fn list(&self) -> Result<Vec<Room>, Error> {
        self.core
            .call(|reply| crate::rooms::service::RoomRequest::ListRooms { reply })
            .await?
    }

    /// Joins a room; [`Error::Conflict`] when it is full. Joining twice is not an error.
    ///
    /// Not cancel-safe.
    pub async fn join(&self, room: &str, user: Option<&str>) -> Result<Room, Error> {
        let (room, user) = (room.to_string(), user.map(str::to_string));
        self.core
            .call(|reply| crate::rooms::service::RoomRequest::JoinRoom { room, user, reply })
            .await?
    }

    /// Leaves a room. Leaving a room one is not in is not an error.
    ///
    /// Not cancel-safe.
    pub async fn leave(&self, room: &str, user: Option<&str>) -> Result<Room, Error> {
        let (room, user) = (room.to_string(), user.map(str::to_string));
        self.core
            .call(|reply| crate::rooms::service::RoomRequest::LeaveRoom { room, user, reply })
            .await?
    }

    /// Posts a chat message; [`Error::Forbidden`] unless the user is a member.
    ///
    /// Not cancel-safe.
    pub async fn say(
        &self,
        room: &str,
        user: Option<&str>,
        message: &str,
    ) -> Result<ChatMessage, Error> {
        if message.len() > MAX_MESSAGE_BYTES {
            return Err(Error::Invalid(format!(
                "message is {} bytes; at most {MAX_MESSAGE_BYTES} are allowed",
                message.len()
            )));
        }
        let (room, user, text) = (
            room.to_string(),
            user.map(str::to_string),
            message.to_string(),
        );
        self.core
            .call(|reply| crate::rooms::service::RoomRequest::Say {
                room,
                user,
                text,
                reply,
            })
            .await?
    }

    /// The newest `limit` chat messages (at most [`MAX_CHAT_LIMIT`]), oldest first.
    ///
    /// Cancel-safe.
    pub async fn messages(&self, room: &str, limit: usize) -> Result<Vec<ChatMessage>, Error> {
        let room = room.to_string();
        self.core
            .call(|reply| crate::rooms::service::RoomRequest::Chat {
                room,
                limit: limit.min(MAX_CHAT_LIMIT),
                reply,
            })
            .await?
    }
}
