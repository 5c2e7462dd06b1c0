//! Notifications for a user (seed 001): kept in the home's users document until their
//! TTL, so a client of the user on any device of the home gets them, live on every
//! socket or when it next connects.

use std::time::Duration;

use hearth_crdt::schema::users::{Parts, StoredNotification};
use hearth_storage::Batch;
use serde::Serialize;
use serde_json::{Map, Value};

use super::service::{UserRequest, users_doc_id};
use crate::core::{Core, CoreHandle, now_ms, rfc3339_ms};
use crate::{Error, Timestamp};

/// Seed 001's notification types.
pub const NOTIFICATION_TYPES: [&str; 5] = [
    "milestone_achieved",
    "review_reminder",
    "peer_message",
    "achievement_unlocked",
    "intervention_alert",
];
/// Priorities, lowest first.
pub const PRIORITIES: [&str; 4] = ["low", "normal", "high", "urgent"];
/// Longest TTL: 30 days.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A notification to send.
#[derive(Clone, Debug, PartialEq)]
pub struct NewNotification {
    /// The user it is for.
    pub user_id: String,
    /// Its type: one of [`NOTIFICATION_TYPES`].
    pub kind: String,
    /// One of [`PRIORITIES`].
    pub priority: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Data for the client.
    pub data: Map<String, Value>,
    /// How long it is kept for clients that are not connected.
    pub ttl: Duration,
}

/// A notification, as clients get it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Notification {
    /// Its id.
    pub id: String,
    /// The user it is for.
    pub user_id: String,
    /// Its type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its priority.
    pub priority: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Data for the client.
    pub data: Map<String, Value>,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it is dropped.
    pub expires_at: Timestamp,
}

pub(crate) fn view(user: &str, id: &str, n: &StoredNotification) -> Notification {
    Notification {
        id: id.to_string(),
        user_id: user.to_string(),
        kind: n.kind.clone(),
        priority: n.priority.clone(),
        title: n.title.clone(),
        body: n.body.clone(),
        data: serde_json::from_str(&n.data).unwrap_or_default(),
        created_at: rfc3339_ms(n.created_ms),
        expires_at: rfc3339_ms(n.expires_ms),
    }
}

/// Notifications; see [`crate::Node::notifications`].
#[derive(Clone)]
pub struct Notifications {
    pub(crate) core: CoreHandle,
}

impl std::fmt::Debug for Notifications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifications").finish_non_exhaustive()
    }
}

impl Notifications {
    /// Sends a notification: every socket of the user on every device of the home gets
    /// it, and clients that are not connected get it when they connect, within its TTL.
    pub async fn send(&self, n: NewNotification) -> Result<Notification, Error> {
        self.core
            .call(|reply| UserRequest::Notify { n, reply })
            .await?
    }

    /// Registers a client's Web Push subscription (`PushSubscription.toJSON()`) for
    /// `user`; answers its id. Notifications for the user are then pushed to it too.
    pub async fn subscribe(
        &self,
        user: &str,
        subscription: serde_json::Value,
    ) -> Result<String, Error> {
        let user = user.to_string();
        self.core
            .call(|reply| UserRequest::Subscribe {
                user,
                subscription,
                reply,
            })
            .await?
    }

    /// Removes a Web Push subscription of `user`.
    pub async fn unsubscribe(&self, user: &str, id: &str) -> Result<(), Error> {
        let (user, id) = (user.to_string(), id.to_string());
        self.core
            .call(|reply| UserRequest::Unsubscribe { user, id, reply })
            .await?
            .map(|_| ())
    }

    /// The home's VAPID public key (base64url), the `applicationServerKey` clients
    /// subscribe with.
    pub async fn vapid_public_key(&self) -> Result<String, Error> {
        self.core
            .call(|reply| UserRequest::VapidPublicKey { reply })
            .await?
    }

    /// The unexpired notifications of `user` that client `device_id` has not had: those
    /// made since its session last closed, or all of them for a client new to the home.
    pub async fn pending(&self, user: &str, device_id: &str) -> Result<Vec<Notification>, Error> {
        let (user, client) = (user.to_string(), device_id.to_string());
        self.core
            .call(|reply| UserRequest::Pending {
                user,
                client,
                reply,
            })
            .await?
    }
}

impl Core {
    pub(crate) fn notify_user(
        &mut self,
        n: NewNotification,
    ) -> Result<(Notification, Batch), Error> {
        let types = &self.users.config.notification_types;
        if !types.contains(&n.kind) {
            return Err(Error::Invalid(format!(
                "unknown notification type {:?}; use one of {}",
                n.kind.chars().take(64).collect::<String>(),
                types.join(", ")
            )));
        }
        if !PRIORITIES.contains(&n.priority.as_str()) {
            return Err(Error::Invalid(format!(
                "unknown priority {:?}; use low, normal, high or urgent",
                n.priority.chars().take(32).collect::<String>()
            )));
        }
        if n.ttl.is_zero() || n.ttl > MAX_TTL {
            return Err(Error::Invalid(format!(
                "ttl must be 1 s to {} s",
                MAX_TTL.as_secs()
            )));
        }
        let doc = users_doc_id(&self.home.home_id);
        if !self.has_content(doc) {
            return Err(Error::Conflict(
                "notifications are not available on this device yet: the home's users \
                 document arrives from the admin device"
                    .into(),
            ));
        }
        let now = now_ms();
        let id = hex::encode(crate::home::random::<8>()?);
        let stored = StoredNotification {
            kind: n.kind,
            priority: n.priority,
            title: n.title,
            body: n.body,
            data: serde_json::to_string(&n.data)
                .map_err(|e| Error::Invalid(format!("data: {e}")))?,
            created_ms: now,
            expires_ms: now.saturating_add(n.ttl.as_millis() as u64),
        };
        let out = self
            .engine
            .notify_user(doc, &n.user_id, &id, &stored, now)
            .map_err(|e| match e {
                hearth_crdt::Error::Schema { .. } => Error::Invalid(e.to_string()),
                other => crate::core::doc_err(other),
            })?;
        let batch = self.handle_outputs(out);
        let made = view(&n.user_id, &id, &stored);
        // The user's Web Push subscriptions, and the home's key to sign for them.
        let push = Parts {
            push: true,
            ..Parts::NONE
        };
        let entry = self.engine.user_entry(doc, &n.user_id, push).ok().flatten();
        let subscriptions: Vec<super::PushTarget> = entry
            .map(|e| e.push.into_values().collect::<Vec<_>>())
            .unwrap_or_default()
            .iter()
            .filter_map(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .filter_map(|v| super::push::WebPushSubscription::parse(&v).ok())
            .map(super::PushTarget::WebPush)
            .collect();
        let vapid = self.engine.users_vapid_key(doc).ok().flatten();
        // Only the device that made it pushes it, so each target gets it once.
        super::push::spawn_pushes(
            made.clone(),
            self.users.config.push.clone(),
            subscriptions,
            vapid,
            self.node_events.clone(),
        );
        Ok((made, batch))
    }

    /// Registers a client's Web Push subscription for `user`; answers its id.
    pub(crate) fn subscribe_push(
        &mut self,
        user: &str,
        subscription: &serde_json::Value,
    ) -> Result<(String, Batch), Error> {
        let sub = super::push::WebPushSubscription::parse(subscription)?;
        let doc = users_doc_id(&self.home.home_id);
        if !self.has_content(doc) {
            return Err(Error::Conflict(
                "push subscriptions are not available on this device yet: the home's users \
                 document arrives from the admin device"
                    .into(),
            ));
        }
        let id = sub.id();
        let text = serde_json::to_string(&sub).map_err(|e| Error::Internal(e.to_string()))?;
        let (_, out) = self
            .engine
            .write_users(doc, now_ms(), |d| {
                hearth_crdt::schema::users::put_push_subscription(d, user, &id, &text)
            })
            .map_err(|e| match e {
                hearth_crdt::Error::Schema { .. } => Error::Invalid(e.to_string()),
                other => crate::core::doc_err(other),
            })?;
        Ok((id, self.handle_outputs(out)))
    }

    /// Removes a Web Push subscription of `user`.
    pub(crate) fn unsubscribe_push(
        &mut self,
        user: &str,
        id: &str,
    ) -> Result<(bool, Batch), Error> {
        let doc = users_doc_id(&self.home.home_id);
        let (removed, out) = self
            .engine
            .write_users(doc, now_ms(), |d| {
                hearth_crdt::schema::users::remove_push_subscription(d, user, id)
            })
            .map_err(crate::core::doc_err)?;
        if !removed {
            return Err(Error::NotFound(format!(
                "{user} has no push subscription {id}"
            )));
        }
        Ok((true, self.handle_outputs(out)))
    }

    /// The home's VAPID public key, for clients to subscribe with.
    pub(crate) fn vapid_public_key(&mut self) -> Result<String, Error> {
        let doc = users_doc_id(&self.home.home_id);
        let key = self
            .engine
            .users_vapid_key(doc)
            .ok()
            .flatten()
            .ok_or_else(|| {
                Error::Conflict(
                    "the home has no Web Push key yet: the admin device makes it".into(),
                )
            })?;
        #[cfg(feature = "push")]
        return super::push::vapid_public(&key);
        #[cfg(not(feature = "push"))]
        {
            let _ = key;
            Err(Error::Conflict(
                "this build has no Web Push (feature `push`)".into(),
            ))
        }
    }

    /// On the admin device: makes the home's VAPID key once.
    pub(crate) async fn ensure_vapid_key(&mut self) {
        #[cfg(feature = "push")]
        {
            let doc = users_doc_id(&self.home.home_id);
            if self.home.root_secret.is_none()
                || !self.has_content(doc)
                || self.engine.users_vapid_key(doc).ok().flatten().is_some()
            {
                return;
            }
            let key = super::push::new_vapid_key();
            match self.engine.write_users(doc, now_ms(), |d| {
                hearth_crdt::schema::users::put_vapid_key(d, &key)
            }) {
                Ok((_, out)) => {
                    let batch = self.handle_outputs(out);
                    if let Err(error) = self.store_in_order(batch).await {
                        tracing::warn!(%error, "cannot store the home's Web Push key");
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot make the home's Web Push key"),
            }
        }
    }

    pub(crate) fn pending_notifications(
        &mut self,
        user: &str,
        client: &str,
    ) -> Result<Vec<Notification>, Error> {
        let doc = users_doc_id(&self.home.home_id);
        if !self.has_content(doc) {
            return Ok(Vec::new());
        }
        // The client's session from the sessions cache, which the session open that
        // follows uses too.
        self.fill_sessions(doc, user)?;
        let since = match self
            .cached_sessions(user)
            .and_then(|c| c.sessions.get(client))
        {
            // Another socket of the client is open: it had them live.
            Some(s) if s.closed_ms == 0 => return Ok(Vec::new()),
            Some(s) => s.closed_ms,
            None => 0,
        };
        let parts = Parts {
            notifications: true,
            ..Parts::NONE
        };
        let Some(entry) = self
            .engine
            .user_entry(doc, user, parts)
            .map_err(crate::core::doc_err)?
        else {
            return Ok(Vec::new());
        };
        let now = now_ms();
        let mut list: Vec<Notification> = entry
            .notifications
            .iter()
            .filter(|(_, n)| n.created_ms >= since && n.expires_ms > now)
            .map(|(id, n)| view(user, id, n))
            .collect();
        list.sort_by_key(|n| n.created_at);
        Ok(list)
    }
}
