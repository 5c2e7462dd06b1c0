//! A user's state across their clients and devices (seed 001): `sync_state` from one
//! client merges into the user's state in the home's users document, which every device
//! of the home keeps; every other client of the user hears of it. Also the user's client
//! sessions (`device_id`s), which expire `session_ttl` after their last socket closed and
//! are capped at `max_devices_per_user` across the home.

pub(crate) mod notify;
pub(crate) mod push;
pub(crate) mod service;

pub use notify::{
    MAX_TTL as MAX_NOTIFICATION_TTL, NOTIFICATION_TYPES, NewNotification, Notification,
    Notifications, PRIORITIES,
};
pub use push::{PushConfig, PushOutcome, PushTarget, WebPushKeys, WebPushSubscription};

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::core::CoreHandle;
use crate::{DeviceId, Error, Timestamp};
use service::UserRequest;

/// How concurrent writes of one key of a user's state are resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictResolution {
    /// The write with the latest hybrid logical clock wins, per top-level key; the losers
    /// are not shown.
    #[default]
    LastWriteWins,
    /// Writes that were concurrent (neither saw the other) are all kept and shown beside
    /// the one read as current (the latest).
    VectorClock,
}

/// The longest a client session may live after its last socket closed (a year).
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(365 * 86_400);

/// The longest wait between tries of a push target (an hour).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);

/// Settings of the users service (seed 001's `session_management` and
/// `synchronization` keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsersConfig {
    /// How long a client session lives after its last socket closed.
    pub session_ttl: Duration,
    /// Distinct client device ids with a live session a user may have across the home.
    pub max_devices_per_user: usize,
    /// How concurrent writes are shown.
    pub conflict_resolution: ConflictResolution,
    /// Where notifications are pushed besides the user's sockets.
    pub push: PushConfig,
    /// Notification types accepted (seed 001's `notifications.types`).
    pub notification_types: Vec<String>,
}

impl UsersConfig {
    /// Checks the settings: at least one device per user, a TTL above 0 and at most
    /// [`MAX_SESSION_TTL`], push targets that are http(s) URLs, at least one try, a retry
    /// delay of at most [`MAX_RETRY_DELAY`].
    pub fn check(&self) -> Result<(), Error> {
        if self.max_devices_per_user == 0 {
            return Err(Error::Invalid(
                "max_devices_per_user must be at least 1".into(),
            ));
        }
        if self.session_ttl.is_zero() || self.session_ttl > MAX_SESSION_TTL {
            return Err(Error::Invalid(
                "session_ttl must be more than 0 and at most a year (365 days)".into(),
            ));
        }
        if self.push.retry_delay > MAX_RETRY_DELAY {
            return Err(Error::Invalid("retry_delay must be at most 1h".into()));
        }
        if self.notification_types.is_empty()
            || self.notification_types.len() > 64
            || self
                .notification_types
                .iter()
                .any(|t| t.is_empty() || t.len() > 128 || t.chars().any(char::is_control))
        {
            return Err(Error::Invalid(
                "notification types: 1 to 64 names of 1 to 128 printable bytes".into(),
            ));
        }
        if self.push.retry_attempts == 0 || self.push.retry_attempts > 20 {
            return Err(Error::Invalid("retry_attempts must be 1 to 20".into()));
        }
        for target in &self.push.targets {
            if let PushTarget::WebPush(_) = target {
                return Err(Error::Invalid(
                    "Web Push subscriptions come from clients (POST \
                     /api/users/{user}/push-subscriptions), not from the settings"
                        .into(),
                ));
            }
            let url = target.url();
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 {
                return Err(Error::Invalid(format!(
                    "push target {:?} is not an http:// or https:// URL",
                    url.chars().take(64).collect::<String>()
                )));
            }
        }
        Ok(())
    }
}

impl Default for UsersConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(3600),
            max_devices_per_user: 5,
            conflict_resolution: ConflictResolution::LastWriteWins,
            push: PushConfig::default(),
            notification_types: NOTIFICATION_TYPES.iter().map(|t| t.to_string()).collect(),
        }
    }
}

/// A value written concurrently with the current one (shown with
/// [`ConflictResolution::VectorClock`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConcurrentValue {
    /// The value.
    pub value: Value,
    /// The client that wrote it.
    pub source_device: String,
    /// When it was written (the writer's clock).
    pub written_at: Timestamp,
}

/// A client session of a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientSession {
    /// The client's device id.
    pub device_id: String,
    /// The node it is connected to.
    pub node: DeviceId,
    /// When it opened.
    pub opened_at: Timestamp,
    /// When its last socket closed; `None` while one is open.
    pub closed_at: Option<Timestamp>,
    /// Whether it counts against `max_devices_per_user` now.
    pub live: bool,
}

/// A user's state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UserState {
    /// The user.
    pub user: String,
    /// The current value of each top-level key.
    pub state: Map<String, Value>,
    /// Concurrent writes per key, when the config asks for them (else empty).
    pub conflicts: BTreeMap<String, Vec<ConcurrentValue>>,
    /// The user's client sessions.
    pub sessions: Vec<ClientSession>,
}

/// Users' state; see [`crate::Node::users`].
#[derive(Clone)]
pub struct Users {
    pub(crate) core: CoreHandle,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users").finish_non_exhaustive()
    }
}

impl Users {
    /// Merges `state` (top-level keys) into `user`'s state, as written by client
    /// `device_id`. Answers the state after the write.
    pub async fn sync_state(
        &self,
        user: &str,
        device_id: &str,
        state: Map<String, Value>,
    ) -> Result<UserState, Error> {
        self.merge_state(user, device_id, state, true)
            .await?
            .ok_or_else(|| {
                Error::Internal(
                    "the state was written, but could not be read back; read it again".into(),
                )
            })
    }

    /// [`Users::sync_state`], answering the state after the write only when `read_back`
    /// (reading it costs as much as the write; the seed's routes answer without it).
    pub(crate) async fn merge_state(
        &self,
        user: &str,
        device_id: &str,
        state: Map<String, Value>,
        read_back: bool,
    ) -> Result<Option<UserState>, Error> {
        let (user, client) = (user.to_string(), device_id.to_string());
        self.core
            .call(|reply| UserRequest::SyncState {
                user,
                client,
                state,
                read_back,
                reply,
            })
            .await?
    }

    /// `user`'s state (empty when they never wrote any).
    pub async fn state(&self, user: &str) -> Result<UserState, Error> {
        let user = user.to_string();
        self.core
            .call(|reply| UserRequest::State { user, reply })
            .await?
    }

    /// Opens a session of client `device_id` of `user` on this node; refused with
    /// [`Error::Conflict`] past `max_devices_per_user`.
    pub async fn open_session(&self, user: &str, device_id: &str) -> Result<(), Error> {
        let (user, client) = (user.to_string(), device_id.to_string());
        self.core
            .call(|reply| UserRequest::OpenSession {
                user,
                client,
                reply,
            })
            .await?
    }

    /// Marks the session closed (its last socket went); it expires `session_ttl` later.
    pub async fn close_session(&self, user: &str, device_id: &str) -> Result<(), Error> {
        let (user, client) = (user.to_string(), device_id.to_string());
        self.core
            .call(|reply| UserRequest::CloseSession {
                user,
                client,
                reply,
            })
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert!(UsersConfig::default().check().is_ok());
        let mut c = UsersConfig {
            max_devices_per_user: 0,
            ..UsersConfig::default()
        };
        assert!(c.check().is_err());
        c.max_devices_per_user = 1;
        c.push.targets = vec![PushTarget::Ntfy("ftp://example/topic".into())];
        assert!(c.check().is_err());
        c.push.targets = vec![PushTarget::Webhook("https://hooks.local/x".into())];
        assert!(c.check().is_ok());
        c.push.retry_attempts = 0;
        assert!(c.check().is_err());
    }
}
