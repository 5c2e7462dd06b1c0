//! The users service on the core: writes into the home's users document (created once
//! by the admin device, like the presence document), reads a user's state and sessions,
//! and turns changes of the document (local or from a device of the home) into
//! `user.state_changed` events, one per writing client.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hearth_crdt::hlc::Hlc;
use hearth_crdt::schema::touched::Touched;
use hearth_crdt::schema::users::{
    ClientSession as StoredSession, Only, Parts, StateKey, UserEntry, Users as UsersDoc,
};
use hearth_crdt::{DocId, DocKind};
use hearth_storage::Batch;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{ClientSession, ConcurrentValue, ConflictResolution, UserState, UsersConfig};
use crate::Error;
use crate::core::{Core, Reply, now_ms, rfc3339_ms};
use crate::events::Event;

/// Requests of the users service.
pub(crate) enum UserRequest {
    SyncState {
        user: String,
        client: String,
        state: Map<String, Value>,
        /// Whether to answer the state after the write.
        read_back: bool,
        reply: Reply<Option<UserState>>,
    },
    State {
        user: String,
        reply: Reply<UserState>,
    },
    OpenSession {
        user: String,
        client: String,
        reply: Reply<()>,
    },
    CloseSession {
        user: String,
        client: String,
        reply: Reply<()>,
    },
    Notify {
        n: super::NewNotification,
        reply: Reply<super::Notification>,
    },
    Pending {
        user: String,
        client: String,
        reply: Reply<Vec<super::Notification>>,
    },
    Subscribe {
        user: String,
        subscription: Value,
        reply: Reply<String>,
    },
    Unsubscribe {
        user: String,
        id: String,
        reply: Reply<bool>,
    },
    VapidPublicKey {
        reply: Reply<String>,
    },
}

impl UserRequest {
    /// Whether the request writes (and so is refused while the store is failed).
    pub(crate) fn is_write(&self) -> bool {
        !matches!(
            self,
            Self::State { .. } | Self::Pending { .. } | Self::VapidPublicKey { .. }
        )
    }

    /// Answers the request with `error` without running it.
    pub(crate) fn refuse(self, error: Error) {
        match self {
            Self::SyncState { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::State { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::OpenSession { reply, .. } | Self::CloseSession { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Notify { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Pending { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Self::Subscribe { reply, .. } | Self::VapidPublicKey { reply } => {
                let _ = reply.send(Err(error));
            }
            Self::Unsubscribe { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// The users service's state.
#[derive(Default)]
pub(crate) struct UserStates {
    pub(crate) config: UsersConfig,
    /// The clock of each key's current value, per user, as last announced.
    seen: HashMap<String, BTreeMap<String, Hlc>>,
    /// Notification ids already announced, per user.
    notified: HashMap<String, std::collections::BTreeSet<String>>,
    /// The users document's heads when last read, to read only the users changed since.
    heads: Vec<hearth_crdt::ChangeHash>,
    /// Each user's client sessions as last read, kept up to date by this device's opens
    /// and closes, so a connect or a close does not read the user's every session again.
    /// Valid while the users document's heads are [`UserStates::sessions_at`]: any other
    /// change to it (a peer's, a state write, a notification) empties the cache, as does
    /// passing [`MAX_CACHED_USERS`].
    sessions: HashMap<String, CachedSessions>,
    /// The users document's heads the cached sessions agree with.
    sessions_at: Vec<hearth_crdt::ChangeHash>,
}

/// One user's client sessions in [`UserStates::sessions`].
#[derive(Default)]
pub(crate) struct CachedSessions {
    pub(crate) sessions: BTreeMap<String, StoredSession>,
    /// Whether the read left sessions out (ones that do not validate, or past the cap),
    /// which only a prune clears.
    pub(crate) left_out: bool,
}

impl CachedSessions {
    /// Whether `client` has a session open on `node`.
    pub(crate) fn is_open_on(&self, client: &str, node: &str) -> bool {
        self.sessions
            .get(client)
            .is_some_and(|s| s.node == node && s.closed_ms == 0)
    }

    /// Whether a prune would drop a session: one closed before `forget_before_ms`, more
    /// than half the cap held, or sessions the read left out. Pruning walks every
    /// session of the user, so a close prunes only then.
    fn prune_due(&self, forget_before_ms: u64) -> bool {
        self.left_out
            || self.sessions.len() > hearth_crdt::schema::users::MAX_SESSIONS / 2
            || self
                .sessions
                .values()
                .any(|s| s.closed_ms != 0 && s.closed_ms < forget_before_ms)
    }
}

/// Most users whose sessions [`UserStates`] keeps.
const MAX_CACHED_USERS: usize = 4096;

impl UserStates {
    pub(crate) fn new(config: UsersConfig) -> Self {
        Self {
            config,
            seen: HashMap::new(),
            notified: HashMap::new(),
            heads: Vec::new(),
            sessions: HashMap::new(),
            sessions_at: Vec::new(),
        }
    }
}

/// The home's users document: one per home, its id derived from the HomeId.
pub(crate) fn users_doc_id(home_id: &str) -> DocId {
    let digest = Sha256::new()
        .chain_update(b"hearth/users/v1\0")
        .chain_update(home_id.as_bytes())
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    DocId::from_bytes(id)
}

fn users_err(e: hearth_crdt::Error) -> Error {
    match e {
        hearth_crdt::Error::Schema { .. } => Error::Invalid(e.to_string()),
        other => crate::core::doc_err(other),
    }
}

/// A session TTL in milliseconds, saturating (the settings bound it, but a library user
/// may set any `Duration`).
fn ttl_ms(ttl: std::time::Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// A stored value back as JSON (stored values are checked JSON text).
fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

impl Core {
    pub(crate) fn handle_users(&mut self, request: UserRequest) {
        match request {
            UserRequest::SyncState {
                user,
                client,
                state,
                read_back,
                reply,
            } => {
                let result = self.sync_user_state(&user, &client, state, read_back);
                self.reply_after_flush(result, reply);
            }
            UserRequest::State { user, reply } => {
                let _ = reply.send(self.user_state(&user));
            }
            UserRequest::OpenSession {
                user,
                client,
                reply,
            } => {
                let result = self.open_user_session(&user, &client);
                self.reply_after_flush(result, reply);
            }
            UserRequest::CloseSession {
                user,
                client,
                reply,
            } => {
                let result = self.close_user_session(&user, &client);
                self.reply_after_flush(result, reply);
            }
            UserRequest::Notify { n, reply } => {
                let result = self.notify_user(n);
                self.reply_after_flush(result, reply);
            }
            UserRequest::Pending {
                user,
                client,
                reply,
            } => {
                let _ = reply.send(self.pending_notifications(&user, &client));
            }
            UserRequest::Subscribe {
                user,
                subscription,
                reply,
            } => {
                let result = self.subscribe_push(&user, &subscription);
                self.reply_after_flush(result, reply);
            }
            UserRequest::Unsubscribe { user, id, reply } => {
                let result = self.unsubscribe_push(&user, &id);
                self.reply_after_flush(result, reply);
            }
            UserRequest::VapidPublicKey { reply } => {
                let _ = reply.send(self.vapid_public_key());
            }
        }
    }

    /// The users document, once its content is here.
    fn users_doc(&mut self) -> Result<DocId, Error> {
        let doc = users_doc_id(&self.home.home_id);
        if self.has_content(doc) {
            Ok(doc)
        } else {
            Err(Error::Conflict(
                "user state is not available on this device yet: the home's users document \
                 arrives from the admin device; connect to it and retry"
                    .into(),
            ))
        }
    }

    /// Creates the home's users document on the admin device, once.
    pub(crate) async fn ensure_users_doc(&mut self) -> Result<(), Error> {
        let doc = users_doc_id(&self.home.home_id);
        if self.home.root_secret.is_none() || self.keyring.ids().any(|(d, _)| d == doc) {
            // A users document made before Web Push came gets its key now.
            self.ensure_vapid_key().await;
            return Ok(());
        }
        let now = now_ms();
        // The frames the creation queued leave only once it is stored, and never if it
        // is not: a peer must not hold changes this device could lose.
        let earlier = std::mem::take(&mut self.outbox);
        let created = self.create_shared_doc(doc, now, None, |engine, doc, epoch, home| {
            engine
                .create_users(doc, &home.home_id, epoch, now)
                .map_err(users_err)
        });
        let made = std::mem::replace(&mut self.outbox, earlier);
        let (_, batch) = created?;
        self.store_in_order(batch).await?;
        self.outbox.extend(made);
        tracing::info!(%doc, "created the home's users document");
        self.ensure_vapid_key().await;
        Ok(())
    }

    fn sync_user_state(
        &mut self,
        user: &str,
        client: &str,
        state: Map<String, Value>,
        read_back: bool,
    ) -> Result<(Option<UserState>, Batch), Error> {
        let doc = self.users_doc()?;
        let mut entries = BTreeMap::new();
        for (key, value) in state {
            let text = serde_json::to_string(&value)
                .map_err(|e| Error::Invalid(format!("state key {key}: {e}")))?;
            entries.insert(key, text);
        }
        let batch = if entries.is_empty() {
            Batch::new()
        } else {
            let (_, out) = self
                .engine
                .write_user_state(doc, user, &entries, client, now_ms())
                .map_err(users_err)?;
            self.handle_outputs(out)
        };
        // The write stands, and its batch is stored, even when reading it back fails.
        let state = if read_back {
            match self.user_state(user) {
                Ok(state) => Some(state),
                Err(error) => {
                    tracing::warn!(%user, %error, "the user's state cannot be read after a write");
                    None
                }
            }
        } else {
            None
        };
        Ok((state, batch))
    }

    /// Whether a session counts against the cap now.
    fn session_live(&self, s: &hearth_crdt::schema::users::ClientSession, now: u64) -> bool {
        if s.closed_ms == 0 {
            s.node == self.peer_id || self.is_alive(&s.node)
        } else {
            s.closed_ms
                .saturating_add(ttl_ms(self.users.config.session_ttl))
                > now
        }
    }

    pub(crate) fn user_state(&mut self, user: &str) -> Result<UserState, Error> {
        let doc = self.users_doc()?;
        let parts = Parts {
            state: true,
            sessions: true,
            ..Parts::NONE
        };
        let entry = self
            .engine
            .user_entry(doc, user, parts)
            .map_err(users_err)?
            .unwrap_or_default();
        Ok(self.user_view(user, &entry))
    }

    fn user_view(&self, user: &str, entry: &UserEntry) -> UserState {
        let now = now_ms();
        let vector = self.users.config.conflict_resolution == ConflictResolution::VectorClock;
        let mut state = Map::new();
        let mut conflicts = BTreeMap::new();
        for (key, StateKey { winner, concurrent }) in &entry.state {
            state.insert(key.clone(), json(&winner.value));
            if vector && !concurrent.is_empty() {
                conflicts.insert(
                    key.clone(),
                    concurrent
                        .iter()
                        .map(|v| ConcurrentValue {
                            value: json(&v.value),
                            source_device: v.client.clone(),
                            written_at: rfc3339_ms(v.at.wall_ms),
                        })
                        .collect(),
                );
            }
        }
        let sessions = entry
            .sessions
            .iter()
            .map(|(client, s)| ClientSession {
                device_id: client.clone(),
                node: s.node.clone().into(),
                opened_at: rfc3339_ms(s.opened_ms),
                closed_at: (s.closed_ms != 0).then(|| rfc3339_ms(s.closed_ms)),
                live: self.session_live(s, now),
            })
            .collect();
        UserState {
            user: user.to_string(),
            state,
            conflicts,
            sessions,
        }
    }

    /// Makes sure the cache holds `user`'s client sessions: kept while the users
    /// document's heads are the ones it agrees with, else read once. Then
    /// [`Core::cached_sessions`] answers them.
    pub(crate) fn fill_sessions(&mut self, doc: DocId, user: &str) -> Result<(), Error> {
        let heads = self.engine.heads(doc).map_err(users_err)?;
        if heads != self.users.sessions_at {
            self.users.sessions.clear();
            self.users.sessions_at = heads;
        }
        if !self.users.sessions.contains_key(user) {
            let sessions = Parts {
                sessions: true,
                ..Parts::NONE
            };
            let entry = self
                .engine
                .user_entry(doc, user, sessions)
                .map_err(users_err)?
                .unwrap_or_default();
            if self.users.sessions.len() >= MAX_CACHED_USERS {
                self.users.sessions.clear();
            }
            self.users.sessions.insert(
                user.to_string(),
                CachedSessions {
                    left_out: !entry.skipped.is_empty(),
                    sessions: entry.sessions,
                },
            );
        }
        Ok(())
    }

    /// `user`'s cached client sessions; [`Core::fill_sessions`] first.
    pub(crate) fn cached_sessions(&self, user: &str) -> Option<&CachedSessions> {
        self.users.sessions.get(user)
    }

    /// After this device's own write of `user`'s sessions: the cache agrees with the
    /// document at the heads the write made once `update` has changed the user's entry
    /// as the write did (`None`: the write did more than the cache can follow, so the
    /// user is read again next time). Only that user's part was written, so the other
    /// users' entries stay valid.
    fn after_session_write(
        &mut self,
        doc: DocId,
        user: &str,
        update: Option<impl FnOnce(&mut BTreeMap<String, StoredSession>)>,
    ) {
        let Ok(heads) = self.engine.heads(doc) else {
            self.users.sessions.clear();
            return;
        };
        self.users.sessions_at = heads;
        match (update, self.users.sessions.get_mut(user)) {
            (Some(update), Some(cached)) => update(&mut cached.sessions),
            _ => {
                self.users.sessions.remove(user);
            }
        }
    }

    fn open_user_session(&mut self, user: &str, client: &str) -> Result<((), Batch), Error> {
        let doc = self.users_doc()?;
        let now = now_ms();
        self.fill_sessions(doc, user)?;
        let others = self
            .cached_sessions(user)
            .into_iter()
            .flat_map(|c| &c.sessions)
            .filter(|(c, s)| c.as_str() != client && self.session_live(s, now))
            .count();
        let max = self.users.config.max_devices_per_user;
        if others >= max {
            return Err(Error::Conflict(format!(
                "user {user} has {others} devices with a live session already (at most {max}); \
                 close one, or wait for its session to expire"
            )));
        }
        let node = self.peer_id.clone();
        let out = self
            .engine
            .user_session(doc, user, client, Some(&node), now, None)
            .map_err(users_err)?;
        let opened = StoredSession {
            node,
            opened_ms: now,
            closed_ms: 0,
        };
        self.after_session_write(
            doc,
            user,
            Some(|sessions: &mut BTreeMap<String, StoredSession>| {
                sessions.insert(client.to_string(), opened);
            }),
        );
        Ok(((), self.handle_outputs(out)))
    }

    fn close_user_session(&mut self, user: &str, client: &str) -> Result<((), Batch), Error> {
        let doc = self.users_doc()?;
        let now = now_ms();
        let forget = now.saturating_sub(ttl_ms(self.users.config.session_ttl));
        self.fill_sessions(doc, user)?;
        let (mut here, prune, left_out) =
            self.cached_sessions(user)
                .map_or((false, false, false), |c| {
                    (
                        c.is_open_on(client, &self.peer_id),
                        c.prune_due(forget),
                        c.left_out,
                    )
                });
        // A read that left sessions out (past the cap of names it reads) may have left
        // this one out: it is looked up on its own.
        if !here && left_out {
            here = self
                .engine
                .user_client_session(doc, user, client)
                .ok()
                .flatten()
                .is_some_and(|s| s.node == self.peer_id && s.closed_ms == 0);
        }
        // The client may have reconnected to another device since: only its session here
        // is this device's to close.
        if !here {
            return Ok(((), Batch::new()));
        }
        let out = self
            .engine
            .user_session(doc, user, client, None, now, prune.then_some(forget))
            .map_err(users_err)?;
        let closed = (!prune).then_some(|sessions: &mut BTreeMap<String, StoredSession>| {
            if let Some(s) = sessions.get_mut(client) {
                s.closed_ms = now.max(1);
            }
        });
        self.after_session_write(doc, user, closed);
        Ok(((), self.handle_outputs(out)))
    }

    /// At start: sessions this device left open (it stopped without closing them) are
    /// closed now, so they stop counting against the user's cap after their TTL; users
    /// left with nothing are dropped.
    pub(crate) async fn close_stale_sessions(&mut self) {
        let doc = users_doc_id(&self.home.home_id);
        if !self.has_content(doc) {
            return;
        }
        let Ok(users) = self
            .engine
            .doc(doc)
            .map_err(|e| e.to_string())
            .and_then(|d| UsersDoc::read(d).map_err(|e| e.to_string()))
        else {
            return;
        };
        let now = now_ms();
        let forget = now.saturating_sub(ttl_ms(self.users.config.session_ttl));
        let mut batch = Batch::new();
        for (user, entry) in users.users {
            for (client, s) in entry.sessions {
                if s.node == self.peer_id && s.closed_ms == 0 {
                    // The prune of every user below covers these users' sessions too.
                    match self
                        .engine
                        .user_session(doc, &user, &client, None, now, None)
                    {
                        Ok(out) => crate::core::append(&mut batch, self.handle_outputs(out)),
                        Err(error) => {
                            tracing::warn!(%user, %client, %error, "cannot close a stale session")
                        }
                    }
                }
            }
        }
        // Users left with nothing are dropped here, once per start (it reads every user).
        match self.engine.write_users(doc, now, |d| {
            hearth_crdt::schema::users::prune_idle_users(d, forget)
        }) {
            Ok((_, out)) => crate::core::append(&mut batch, self.handle_outputs(out)),
            Err(error) => tracing::warn!(%error, "cannot prune idle users"),
        }
        if !batch.is_empty()
            && let Err(error) = self.store_in_order(batch).await
        {
            tracing::warn!(%error, "cannot store the closed sessions");
        }
    }

    /// Records the current state, so only later changes are announced.
    pub(crate) fn remember_user_states(&mut self) {
        let doc = users_doc_id(&self.home.home_id);
        if let Ok((_, heads)) = self.engine.touched_since(doc, &[], &[]) {
            self.users.heads = heads;
        }
        if let Ok(users) = self
            .engine
            .doc(doc)
            .map_err(|e| e.to_string())
            .and_then(|d| UsersDoc::read(d).map_err(|e| e.to_string()))
        {
            for (user, entry) in users.users {
                let keys = entry
                    .state
                    .iter()
                    .map(|(k, v)| (k.clone(), v.winner.at))
                    .collect();
                self.users.seen.insert(user.clone(), keys);
                self.users
                    .notified
                    .insert(user, entry.notifications.keys().cloned().collect());
            }
        }
    }

    /// A change of the users document: every key whose current value changed is
    /// announced, grouped by the client that wrote it.
    pub(crate) fn on_users_changed(&mut self, doc: DocId, from_peer: Option<String>) {
        if doc != users_doc_id(&self.home.home_id)
            || self
                .engine
                .header(doc)
                .map_or(true, |h| h.kind != DocKind::Users)
        {
            return;
        }
        // Only the users the changes since the last read wrote are read again.
        let since = std::mem::take(&mut self.users.heads);
        let touched = match self.engine.touched_since(doc, &since, &["users"]) {
            Ok((touched, heads)) => {
                self.users.heads = heads;
                touched
            }
            Err(error) => {
                tracing::warn!(%error, "the users document cannot be read");
                return;
            }
        };
        // Users whose notifications were read only in part: the ids the changes wrote.
        let mut partial: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let read = match touched {
            Touched::Everything => self
                .engine
                .doc(doc)
                .map_err(|e| e.to_string())
                .and_then(|d| UsersDoc::read(d).map_err(|e| e.to_string())),
            Touched::Entries(names) => {
                let mut users = UsersDoc::default();
                // Announcements need the state and the notifications only, and of
                // those only the keys and notifications the changes wrote.
                let parts = Parts {
                    state: true,
                    notifications: true,
                    ..Parts::NONE
                };
                for name in names {
                    let paths: [&[&str]; 2] = [
                        &["users", name.as_str(), "state"],
                        &["users", name.as_str(), "notifications"],
                    ];
                    let items = self.engine.touched_paths(doc, &since, &paths).ok();
                    let entries = |i: usize| match items.as_ref().map(|t| &t[i]) {
                        Some(Touched::Entries(names)) => Some(names.clone()),
                        _ => None,
                    };
                    let (state_keys, notification_ids) = (entries(0), entries(1));
                    // A write of sessions or push subscriptions only: nothing to announce.
                    if state_keys.as_ref().is_some_and(BTreeSet::is_empty)
                        && notification_ids.as_ref().is_some_and(BTreeSet::is_empty)
                    {
                        continue;
                    }
                    let only = Only {
                        state: state_keys.as_ref(),
                        notifications: notification_ids.as_ref(),
                    };
                    match self.engine.user_entry_only(doc, &name, parts, only) {
                        Ok(Some(mut entry)) => {
                            users.skipped.append(&mut entry.skipped);
                            if let Some(ids) = notification_ids {
                                partial.insert(name.clone(), ids);
                            }
                            users.users.insert(name, entry);
                        }
                        Ok(None) => {
                            self.users.seen.remove(&name);
                            self.users.notified.remove(&name);
                        }
                        Err(error) => users.skipped.push(error.to_string()),
                    }
                }
                Ok(users)
            }
        };
        let users = match read {
            Ok(users) => users,
            Err(error) => {
                tracing::warn!(%error, "the users document does not validate");
                return;
            }
        };
        if !users.skipped.is_empty() {
            tracing::debug!(
                count = users.skipped.len(),
                first = %users.skipped[0],
                "items of the users document left out"
            );
        }
        for (user, entry) in users.users {
            let seen = self.users.seen.entry(user.clone()).or_default();
            let mut by_client: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
            for (key, value) in &entry.state {
                if seen.get(key) != Some(&value.winner.at) {
                    seen.insert(key.clone(), value.winner.at);
                    by_client
                        .entry(value.winner.client.clone())
                        .or_default()
                        .insert(key.clone(), json(&value.winner.value));
                }
            }
            let known = self.users.notified.entry(user.clone()).or_default();
            let mut fresh = Vec::new();
            // Expired notifications stay in the document until the user's part fills (they
            // arrive whole on a device that joins or catches up late): they are known, not
            // announced, as `pending_notifications` does not answer them either.
            let now = now_ms();
            for (id, n) in &entry.notifications {
                if known.insert(id.clone()) && n.expires_ms > now {
                    fresh.push(super::notify::view(&user, id, n));
                }
            }
            match partial.get(&user) {
                // Of a part read, only the ids written can have gone.
                Some(written) => {
                    for id in written {
                        if !entry.notifications.contains_key(id) {
                            known.remove(id);
                        }
                    }
                }
                None => known.retain(|id| entry.notifications.contains_key(id)),
            }
            for notification in fresh {
                self.emit_event(Event::Notification {
                    notification: Box::new(notification),
                    from_peer: from_peer.clone().map(Into::into),
                });
            }
            for (client, state) in by_client {
                self.emit_event(Event::UserState {
                    user: user.clone(),
                    state,
                    source_device: client,
                    from_peer: from_peer.clone().map(Into::into),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::UserRequest;
    use crate::Error;
    use crate::core::testing::TestCore;
    use crate::events::Event;
    use crate::users::UserState;

    async fn sync(t: &TestCore, user: &str, client: &str, state: serde_json::Value) -> UserState {
        let serde_json::Value::Object(state) = state else {
            panic!("an object")
        };
        let (user, client) = (user.to_string(), client.to_string());
        t.core
            .call(|reply| UserRequest::SyncState {
                user,
                client,
                state,
                read_back: true,
                reply,
            })
            .await
            .unwrap()
            .unwrap()
            .expect("read back")
    }

    async fn open(t: &TestCore, user: &str, client: &str) -> Result<(), Error> {
        let (user, client) = (user.to_string(), client.to_string());
        t.core
            .call(|reply| UserRequest::OpenSession {
                user,
                client,
                reply,
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn state_merges_per_key_and_each_write_is_announced_with_its_client() {
        let t = TestCore::start("admin").await;
        let mut events = t.events();
        let after = sync(&t, "ann", "web1", json!({"progress": 0.5, "lesson": "l4"})).await;
        assert_eq!(after.state["progress"], json!(0.5));
        let after = sync(&t, "ann", "phone", json!({"lesson": "l5"})).await;
        assert_eq!(after.state["progress"], json!(0.5), "untouched keys stay");
        assert_eq!(after.state["lesson"], json!("l5"));
        let mut seen = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let Event::UserState {
                user,
                state,
                source_device,
                ..
            } = event
            {
                seen.push((user, source_device, state.len()));
            }
        }
        assert_eq!(
            seen,
            vec![
                ("ann".to_string(), "web1".to_string(), 2),
                ("ann".to_string(), "phone".to_string(), 1)
            ]
        );
        t.stop().await;
    }

    #[tokio::test]
    async fn the_sixth_client_of_a_user_is_refused_and_a_closed_one_still_counts_until_its_ttl() {
        let t = TestCore::start("admin").await;
        for i in 0..5 {
            open(&t, "ann", &format!("c{i}")).await.unwrap();
        }
        let refused = open(&t, "ann", "c5").await;
        assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
        // Reopening one it has is fine; another user is not affected.
        open(&t, "ann", "c0").await.unwrap();
        open(&t, "bob", "c5").await.unwrap();
        close(&t, "ann", "c1").await;
        // Closed, but within its TTL: it still counts.
        assert!(matches!(
            open(&t, "ann", "c5").await,
            Err(Error::Conflict(_))
        ));
        t.stop().await;
    }

    async fn close(t: &TestCore, user: &str, client: &str) {
        let (user, client) = (user.to_string(), client.to_string());
        t.core
            .call(|reply| UserRequest::CloseSession {
                user,
                client,
                reply,
            })
            .await
            .unwrap()
            .unwrap();
    }

    /// Which of `clients` the users document holds a session of, for ann.
    async fn held(t: &TestCore, clients: &[&'static str]) -> Vec<&'static str> {
        let clients = clients.to_vec();
        let (tx, rx) = tokio::sync::oneshot::channel();
        t.on_core(move |core| {
            Box::pin(async move {
                let doc = core.users_doc().unwrap();
                let held = clients
                    .into_iter()
                    .filter(|c| {
                        core.engine
                            .user_client_session(doc, "ann", c)
                            .unwrap()
                            .is_some()
                    })
                    .collect();
                let _ = tx.send(held);
            })
        })
        .await;
        rx.await.unwrap()
    }

    /// A close walks the user's sessions to prune them only when one is due: closed
    /// sessions stay through their TTL, and the first close after it drops them.
    #[tokio::test]
    async fn a_close_prunes_sessions_only_once_their_ttl_has_passed() {
        let t = TestCore::start("admin").await;
        for c in ["c0", "c1", "c2"] {
            open(&t, "ann", c).await.unwrap();
        }
        close(&t, "ann", "c0").await;
        close(&t, "ann", "c1").await;
        assert_eq!(held(&t, &["c0", "c1", "c2"]).await, ["c0", "c1", "c2"]);
        t.on_core(|core| {
            Box::pin(async move {
                core.users.config.session_ttl = std::time::Duration::from_millis(1);
            })
        })
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        close(&t, "ann", "c2").await;
        assert_eq!(held(&t, &["c0", "c1", "c2"]).await, ["c2"]);
        // The cache followed: c0 and c1 no longer count, c2 is closed and past its TTL.
        for i in 0..5 {
            open(&t, "ann", &format!("n{i}")).await.unwrap();
        }
        t.stop().await;
    }

    /// The sessions a connect counts are this device's cached reads, but a session another
    /// device wrote counts at the next connect, even when no change report reached the
    /// users service (a peer's frame that failed after part of it applied).
    #[tokio::test]
    async fn a_session_written_on_another_device_counts_at_the_next_connect() {
        let t = TestCore::start("admin").await;
        for i in 0..4 {
            open(&t, "ann", &format!("c{i}")).await.unwrap();
        }
        t.on_core(|core| {
            Box::pin(async move {
                let doc = core.users_doc().unwrap();
                let now = crate::core::now_ms();
                // Another device's client, opened and closed there just now (within its
                // TTL, so it counts); its outputs are dropped, as a failed frame's are.
                let other = "12D3KooWAnotherDeviceOfTheHome".to_string();
                core.engine
                    .user_session(doc, "ann", "tablet", Some(&other), now, None)
                    .unwrap();
                core.engine
                    .user_session(doc, "ann", "tablet", None, now, Some(0))
                    .unwrap();
            })
        })
        .await;
        let refused = open(&t, "ann", "c4").await;
        assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
        t.stop().await;
    }

    /// A device that reads the users document late (it joined, or caught up after a
    /// long time away) announces the notifications it holds that are still live, and not
    /// those that expired in the document.
    #[tokio::test]
    async fn a_late_reader_announces_live_notifications_only() {
        let t = TestCore::start("admin").await;
        for (title, ttl) in [("soon gone", 1), ("still live", 60_000)] {
            let n = crate::users::NewNotification {
                user_id: "ann".into(),
                kind: "peer_message".into(),
                priority: "normal".into(),
                title: title.into(),
                body: String::new(),
                data: serde_json::Map::new(),
                ttl: std::time::Duration::from_millis(ttl),
            };
            t.core
                .call(|reply| UserRequest::Notify { n, reply })
                .await
                .unwrap()
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut events = t.events();
        t.on_core(|core| {
            Box::pin(async move {
                // As on a device that has not read the document yet.
                core.users.notified.clear();
                core.users.heads.clear();
                let doc = super::users_doc_id(&core.home.home_id);
                core.on_users_changed(doc, Some("12D3KooWpeer".into()));
            })
        })
        .await;
        let mut announced = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let Event::Notification { notification, .. } = event {
                announced.push(notification.title);
            }
        }
        assert_eq!(announced, ["still live"]);
        t.stop().await;
    }
}
