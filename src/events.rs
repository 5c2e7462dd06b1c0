//! The node's one event stream: entity changes, rooms, chat, presence, shares, conflicts
//! and peers coming and going, local or from a peer ([`crate::Node::events`]). The event
//! bus and the WebSocket API are built on it: the bus bridge maps each event onto a named
//! bus event.

use tokio::sync::broadcast;

use crate::entities::EntityChange;
use crate::presence::PresenceInfo;
use crate::rooms::{ChatMessage, Room};
use crate::{DeviceId, EntityId, HomeId, Policy, Rights};

/// Something that changed on this node or reached it from a peer.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// An entity was written or deleted (see [`EntityChange::deleted`]).
    Entity(Box<EntityChange>),
    /// A room was created, here or on another device of the home.
    RoomCreated {
        /// The room as first seen.
        room: Box<Room>,
        /// The PeerId the change came from, `None` for this node.
        from_peer: Option<DeviceId>,
    },
    /// A user joined a room.
    MemberJoined {
        /// The room's id.
        room_id: String,
        /// The user who joined.
        user: String,
        /// The PeerId the change came from, `None` for this node.
        from_peer: Option<DeviceId>,
    },
    /// A user left a room.
    MemberLeft {
        /// The room's id.
        room_id: String,
        /// The user who left.
        user: String,
        /// The PeerId the change came from, `None` for this node.
        from_peer: Option<DeviceId>,
    },
    /// A chat message was posted in a room.
    Chat {
        /// The message.
        message: Box<ChatMessage>,
        /// The PeerId the change came from, `None` for this node.
        from_peer: Option<DeviceId>,
    },
    /// A user's presence changed.
    Presence {
        /// The user's presence after the change.
        presence: Box<PresenceInfo>,
        /// The PeerId the change came from, `None` for this node.
        from_peer: Option<DeviceId>,
    },
    /// An entity was shared between homes (`share.granted`) or stopped being shared
    /// (`share.revoked`): by this home with another, or by another with this one.
    Share {
        /// The entity id.
        entity_id: EntityId,
        /// The owner home.
        owner: HomeId,
        /// The grantee home.
        home: HomeId,
        /// `read` or `write`; `none` once revoked.
        rights: Rights,
        /// Whether it was granted (else revoked).
        granted: bool,
        /// The PeerId the grant came from, `None` for this node.
        from_peer: Option<DeviceId>,
    },
    /// Concurrent values of an entity field met (`conflict.detected`), or someone chose
    /// one (`conflict.resolved`).
    Conflict {
        /// The entity id.
        entity_id: EntityId,
        /// `state` or `attributes.<name>`.
        field: String,
        /// The entity's policy.
        policy: Policy,
        /// How many values met.
        candidates: usize,
        /// The value the policy or the resolution chose; `None` while a user choice waits.
        chosen: Option<serde_json::Value>,
        /// Whether this is a resolution.
        resolved: bool,
    },
    /// A device of this home was admitted (its certificate verified), not merely connected.
    PeerConnected {
        /// Its PeerId.
        peer: DeviceId,
        /// Its device name, from the home document.
        device_name: Option<String>,
    },
    /// An admitted device's connection ended.
    PeerDisconnected {
        /// Its PeerId.
        peer: DeviceId,
        /// Its device name, from the home document.
        device_name: Option<String>,
    },
    /// A device lock changed: granted, released, forced, preempted or expired.
    Lock {
        /// What happened.
        action: crate::locks::LockAction,
        /// The lock concerned (for a preemption, the one that ended).
        lock: Box<crate::locks::LockInfo>,
    },
    /// An event a device of the home published for this device (or for every device):
    /// see [`Events::publish`]. Its name is its type.
    Device {
        /// The event, as its source published it.
        event: Box<crate::propagation::DeviceEvent>,
        /// The PeerId it came from, `None` when this node published it.
        from_peer: Option<DeviceId>,
    },
    /// A notification for a user reached this node (`notification.sent`): made here or
    /// on another device of the home. The user's clients connected here get it.
    Notification {
        /// The notification.
        notification: Box<crate::users::Notification>,
        /// The PeerId it came from, `None` for this node.
        from_peer: Option<DeviceId>,
    },
    /// A notification was pushed to a target (`notification.sent`), or could not be after
    /// every try (`notification.failed`), by the device that made it.
    NotificationPush {
        /// The notification.
        notification: Box<crate::users::Notification>,
        /// How it went.
        outcome: Box<crate::users::PushOutcome>,
    },
    /// An emergency alert raised here or received from a device of this home or of a
    /// paired home this one opted in to (`emergency.alert`; subject: the alert's id).
    Alert {
        /// The alert.
        alert: Box<crate::alerts::Alert>,
        /// The PeerId it came from, `None` when raised here.
        from_peer: Option<DeviceId>,
    },
    /// Keys of a user's state changed (seed 001's `sync_state`), as one client wrote them.
    UserState {
        /// The user.
        user: String,
        /// The keys written, with their values now.
        state: serde_json::Map<String, serde_json::Value>,
        /// The client (device id) that wrote them.
        source_device: String,
        /// The PeerId the change came from, `None` for this node.
        from_peer: Option<DeviceId>,
    },
    /// A step of a session handoff (`session.handoff`, with `phase` started, completed or
    /// rolled_back in its data) or a change of a group activity (`activity.*`, and seed
    /// 000's `coordination.group_start` and `coordination.group_end`).
    Coordination {
        /// The event's name.
        name: &'static str,
        /// The session's or the activity's id.
        subject: String,
        /// What happened: the fields the event carries on the bus and `/api/ws`.
        data: serde_json::Value,
        /// The PeerId it came from, `None` for this node.
        from_peer: Option<DeviceId>,
    },
}

impl Event {
    /// The event's name, `<area>.<action>` as INTERFACES.md lists them; a device event's
    /// is its type.
    pub fn name(&self) -> &str {
        match self {
            Event::Device { event, .. } => &event.event_type,
            other => other.metric_name(),
        }
    }

    /// The name as counted in `hearth_events_total`: device events, whose types any
    /// device chooses, share one label so the metric stays bounded.
    pub(crate) fn metric_name(&self) -> &'static str {
        match self {
            Event::Device { .. } => "device.event",
            Event::Entity(c) if c.deleted => "entity.deleted",
            Event::Entity(_) => "entity.changed",
            Event::RoomCreated { .. } => "room.created",
            Event::MemberJoined { .. } => "room.member_joined",
            Event::MemberLeft { .. } => "room.member_left",
            Event::Chat { .. } => "room.chat",
            Event::Presence { .. } => "presence.changed",
            Event::Share { granted: true, .. } => "share.granted",
            Event::Share { .. } => "share.revoked",
            Event::Conflict { resolved: true, .. } => "conflict.resolved",
            Event::Conflict { .. } => "conflict.detected",
            Event::PeerConnected { .. } => "peer.connected",
            Event::PeerDisconnected { .. } => "peer.disconnected",
            Event::Lock { action, .. } => action.event_name(),
            Event::UserState { .. } => "user.state_changed",
            Event::Notification { .. } => "notification.sent",
            Event::NotificationPush { outcome, .. } if outcome.error.is_none() => {
                "notification.sent"
            }
            Event::NotificationPush { .. } => "notification.failed",
            Event::Alert { .. } => "emergency.alert",
            Event::Coordination { name, .. } => name,
        }
    }

    /// What the event concerns: the entity id, room id, user or device.
    pub fn subject(&self) -> &str {
        match self {
            Event::Entity(c) => &c.entity.id,
            Event::RoomCreated { room, .. } => &room.room_id,
            Event::MemberJoined { room_id, .. } | Event::MemberLeft { room_id, .. } => room_id,
            Event::Chat { message, .. } => &message.room_id,
            Event::Presence { presence, .. } => &presence.user,
            Event::Share { entity_id, .. } | Event::Conflict { entity_id, .. } => entity_id,
            Event::PeerConnected { peer, .. } | Event::PeerDisconnected { peer, .. } => peer,
            Event::Lock { lock, .. } => &lock.device_name,
            Event::Device { event, .. } => &event.source_device_id,
            Event::UserState { user, .. } => user,
            Event::Notification { notification, .. }
            | Event::NotificationPush { notification, .. } => &notification.user_id,
            Event::Alert { alert, .. } => &alert.id,
            Event::Coordination { subject, .. } => subject,
        }
    }

    /// The PeerId the change came from, `None` for a change made on this node and for
    /// what this node saw itself (a peer coming or going, a conflict).
    pub fn from_peer(&self) -> Option<&DeviceId> {
        match self {
            Event::Entity(c) => c.from_peer.as_ref(),
            Event::RoomCreated { from_peer, .. }
            | Event::MemberJoined { from_peer, .. }
            | Event::MemberLeft { from_peer, .. }
            | Event::Chat { from_peer, .. }
            | Event::Presence { from_peer, .. }
            | Event::Share { from_peer, .. }
            | Event::Device { from_peer, .. }
            | Event::UserState { from_peer, .. }
            | Event::Notification { from_peer, .. }
            | Event::Alert { from_peer, .. }
            | Event::Coordination { from_peer, .. } => from_peer.as_ref(),
            Event::Conflict { .. }
            | Event::PeerConnected { .. }
            | Event::PeerDisconnected { .. }
            | Event::Lock { .. }
            | Event::NotificationPush { .. } => None,
        }
    }
}

/// A stream of [`Event`]s; see [`Node::events`](crate::Node::events).
pub struct Events {
    pub(crate) rx: broadcast::Receiver<Event>,
    /// For [`Events::publish`].
    pub(crate) core: crate::core::CoreHandle,
}

/// What [`Events::next`] yields.
#[derive(Clone, Debug, PartialEq)]
pub enum EventItem {
    /// An event.
    Event(Event),
    /// The subscriber fell more than [`CHANGE_BUFFER`](crate::CHANGE_BUFFER) events behind,
    /// and this many were dropped for it; state built from events should be read afresh.
    Missed(u64),
}

impl Events {
    /// The next event, or `None` once the node has stopped.
    ///
    /// Cancel-safe.
    pub async fn next(&mut self) -> Option<EventItem> {
        use broadcast::error::RecvError;
        match self.rx.recv().await {
            Ok(event) => Some(EventItem::Event(event)),
            Err(RecvError::Lagged(n)) => Some(EventItem::Missed(n)),
            Err(RecvError::Closed) => None,
        }
    }
}
