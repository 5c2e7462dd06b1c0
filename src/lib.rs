//! Hearth: a peer-to-peer sync node for homes.
//!
//! Every home, and every device in it, runs a node. This crate assembles one: it opens the
//! node's encrypted store, loads (or on first start creates) the device identity, and syncs
//! the home's entities, rooms and presence with its peers. A node is headless unless asked
//! for the local HTTP API that the `hearth` command and other programs use.
//!
//! ```no_run
//! # async fn run() -> Result<(), hearth::Error> {
//! let node = hearth::Node::builder()
//!     .data_dir("/tmp/hearth-example")
//!     .listen(["/ip4/127.0.0.1/tcp/0"])
//!     .mdns(false)
//!     .start()
//!     .await?;
//! println!("PeerId {}", node.peer_id());
//! node.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! The public types mention neither libp2p nor sled, so integrations do not depend on the
//! transport or the storage engine.

mod activities;
mod alerts;
#[cfg(feature = "api")]
mod api;
mod audit;
mod builder;
pub mod bus;
mod config;
mod core;
mod datadir;
mod entities;
mod error;
mod events;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod home;
mod locks;
mod metrics;
#[cfg(feature = "mqtt")]
mod mqtt;
mod node;
mod pairing;
mod peers;
mod playback;
mod presence;
mod propagation;
mod records;
mod revocation;
mod rooms;
mod sessions;
mod shares;
mod sharing;
#[cfg(feature = "api")]
mod store_view;
mod trust;
mod types;
mod users;
#[cfg(feature = "api")]
mod ws;

pub use activities::{
    ACK_TIMEOUT, ACTIVITY_TYPES, Activities, Activity, ActivityAction, ActivityDevice,
    MAX_ACTIVITY_CONFIG, MAX_ACTIVITY_DEVICES, MAX_LIVE_ACTIVITIES, MAX_SCORE_DELTA, NewActivity,
};
pub use alerts::{
    Alert, AlertAcceptance, AlertCounters, AlertRecord, AlertSource, Alerts, DEFAULT_ALERT_TTL_S,
    Direction, MAX_ALERT_MESSAGE, MAX_ALERT_TARGETS, MAX_ALERT_TTL_S, MAX_OUTBOX_ALERTS,
    MAX_RECEIVED_KEPT, MAX_SENT_KEPT, NewAlert, Receipt, ReceiptState, Severity,
};
pub use builder::NodeBuilder;
#[cfg(feature = "api")]
pub use config::{
    ApiConfig, DEFAULT_API_ADDR, MAX_HEARTBEAT_INTERVAL, MAX_WS_TIMEOUT, SeedApiConfig,
};
pub use config::{
    Config, DEFAULT_AUDIT_MAX_AGE, DEFAULT_AUDIT_MAX_ENTRIES, DEFAULT_BATCH_WINDOW,
    DEFAULT_CHAT_MAX_AGE, DEFAULT_CHAT_MAX_MESSAGES, DEFAULT_CUT_BYTES, DEFAULT_CUT_CHANGES,
    DEFAULT_DOCUMENTS_CACHE_MIB, DEFAULT_KEEP_DAYS, DEFAULT_KEEP_VERSIONS, DEFAULT_LISTEN,
    DEFAULT_MAX_CONNECTIONS_PER_IP, HistoryConfig, MAX_BATCH_WINDOW, MIN_CUT_CHANGES, Passphrase,
    default_data_dir,
};
pub use core::{CHANGE_BUFFER, SyncCounters, SyncLag};
pub use datadir::LOCK_FILE;
#[cfg(feature = "api")]
pub use datadir::{API_ADDR_FILE, TOKEN_FILE, read_token};
pub use entities::batching::MAX_BATCH_WRITES;
pub use entities::{
    ConflictCandidate, ConflictInfo, Entities, Entity, EntityChange, EntityStorage, EntityVersion,
    EntityWrite, MAX_ATTRIBUTES_BYTES, MAX_ENTITY_ID_LEN, MAX_HISTORY, MAX_STATE_LEN,
};
pub use error::Error;
pub use events::{Event, EventItem, Events};
pub use locks::{
    ArbiterInfo, DEFAULT_LOCK_TIMEOUT, LockAction, LockAsk, LockGuard, LockInfo, LockOutcome,
    LockType, Locks, ReleaseOutcome,
};
#[cfg(feature = "mqtt")]
pub use mqtt::{
    COMPONENTS as MQTT_COMPONENTS, DEFAULT_DISCOVERY_PREFIX, DEFAULT_MAX_IMPORTED, IMPORT_MARKER,
    MAX_COMMAND_PAYLOAD, MAX_IMPORT_ATTRIBUTES, MAX_IMPORT_ATTRIBUTES_BYTES, MAX_IMPORT_PAYLOAD,
    MAX_MQTT_PACKET, MqttConfig, MqttStatus, TOPIC_ROOT as MQTT_TOPIC_ROOT,
};
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub use node::Captured;
pub use pairing::join::Joined;
pub use playback::{
    ClockEstimate, DeviceSchedule, MAX_MEDIA, MAX_PLAYBACK_DEVICES, MAX_PLAYBACKS,
    MAX_START_DISTANCE_MS, NewPlayback, Playback, PlaybackDevice, PlaybackSchedule,
};
pub use presence::{Presence, PresenceInfo, Status};
pub use propagation::{
    DeviceEvent, MAX_EVENT_PAYLOAD, MAX_EVENT_TARGETS, MAX_EVENT_TYPE_LEN, PropagationCounters,
    Publish, PublishReport,
};
pub use revocation::service::RevokedDevice;
pub use rooms::{
    ChatMessage, DEFAULT_ROOM_SIZE, MAX_CHAT_LIMIT, MAX_MESSAGE_BYTES, Room, RoomMember, Rooms,
};
pub use sessions::{
    HANDOFF_TIMEOUT, Handoff, HandoffReport, MAX_PENDING_HANDOFFS, MAX_SESSION_CONTEXT,
    MAX_SESSIONS, NewSession, Session, Sessions,
};
pub use shares::{AuditEntry, KnownHome, PairedWith, ShareIn, ShareOut, SharedList, Shares};
pub use types::{DeviceId, EntityId, HomeId, Policy, Rights, Timestamp};
pub use users::{
    ClientSession, ConcurrentValue, ConflictResolution, MAX_NOTIFICATION_TTL, MAX_RETRY_DELAY,
    MAX_SESSION_TTL, NOTIFICATION_TYPES, NewNotification, Notification, Notifications, PRIORITIES,
    PushConfig, PushOutcome, PushTarget, UserState, Users, UsersConfig, WebPushKeys,
    WebPushSubscription,
};

/// Frames that may wait in the outbound sync queue to one peer before it counts as slow
/// and is dropped.
pub const PEER_QUEUE_FRAMES: usize = hearth_net::SYNC_QUEUE_FRAMES;
/// Bytes that may wait in the outbound sync queue to one peer before it counts as slow
/// and is dropped.
pub const PEER_QUEUE_BYTES: usize = hearth_net::SYNC_QUEUE_BYTES;

/// How long an invite code lives unless told otherwise: 10 minutes.
pub const DEFAULT_INVITE_TTL_S: u64 = 600;
pub use node::{Invite, Node};
#[cfg(feature = "api")]
pub use ws::WS_CLIENT_BUFFER;

/// The kind of an invite code, `device` or `home`, read without checking its expiry, so a
/// client knows where to send it. A code that does not decode is an error that says why.
pub fn invite_code_kind(code: &str) -> Result<&'static str, Error> {
    let code = trust::invite::InviteCode::decode(code.trim())
        .map_err(|e| Error::Pairing(e.to_string()))?;
    Ok(match code.kind() {
        trust::invite::InviteKind::Device => "device",
        trust::invite::InviteKind::Home => "home",
    })
}
