//! Seed 001's protocol, as its clients speak it: `WS /ws/{user_id}?device_id=D` and the
//! REST routes `/notify`, `/broadcast/{room_id}`, `/sync-state`, `/create-room`,
//! `/join-room`, `/presence/{user_id}`, `/room/{room_id}` and `/health`. A thin layer over
//! the same services the `/api/...` routes use (users, rooms, presence, notifications):
//! it translates shapes and nothing else.
//!
//! A "device" here is the client's `device_id` (a browser tab or an app), not a Hearth
//! device; `source_device` carries it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, ApiJson, ApiState};
use crate::Error;
use crate::events::Event;
use crate::presence::Status;

/// Largest message a seed client may send.
const MAX_SEED_WS_MESSAGE: usize = 64 * 1024;
/// Close code for a refused session (policy violation).
const CLOSE_POLICY: u16 = 1008;

/// The seed's clients connected to this node: sockets per (user, device id).
#[derive(Default)]
pub(crate) struct Clients {
    sockets: Mutex<HashMap<(String, String), usize>>,
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), usize>> {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a socket in; answers how many the client has now.
    fn add(&self, user: &str, client: &str) -> usize {
        let mut map = self.lock();
        let n = map.entry((user.into(), client.into())).or_default();
        *n += 1;
        *n
    }

    /// Counts a socket out; answers how many the client has left.
    fn remove(&self, user: &str, client: &str) -> usize {
        let mut map = self.lock();
        let key = (user.to_string(), client.to_string());
        let left = match map.get_mut(&key) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            map.remove(&key);
        }
        left
    }

    /// Open sockets and distinct users.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let map = self.lock();
        let users: HashSet<&String> = map.keys().map(|(u, _)| u).collect();
        (map.values().sum(), users.len())
    }
}

/// Seconds since the Unix epoch, as the seed writes timestamps.
fn now_s() -> f64 {
    crate::core::now_ms() as f64 / 1000.0
}

fn seconds(t: crate::Timestamp) -> f64 {
    t.unix_ms() as f64 / 1000.0
}

/// A frame in the seed's shape: `{type, data, timestamp}`.
fn frame(kind: &str, data: Value) -> Message {
    Message::Text(
        json!({ "type": kind, "data": data, "timestamp": now_s() })
            .to_string()
            .into(),
    )
}

fn error_frame(e: Error) -> Message {
    let api = ApiError::from(e);
    frame("error", json!({ "error": api.kind, "message": api.detail }))
}

/// An error in the seed's shape: `{success: false, error, message}` with the status.
fn seed_error(e: Error) -> Response {
    let api = ApiError::from(e);
    (
        api.status,
        Json(json!({ "success": false, "error": api.kind, "message": api.detail })),
    )
        .into_response()
}

/// `WS /ws/{user_id}?device_id=D`.
pub(crate) async fn upgrade(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let client = query
        .as_ref()
        .ok()
        .and_then(|Query(q)| q.get("device_id").cloned());
    if let Err(refused) = crate::ws::check_token(&state, &headers, query) {
        return refused.into_response();
    }
    let Some(client) = client.filter(|c| !c.is_empty() && c.len() <= 128) else {
        return ApiError::bad_request(
            "give the client's device id: /ws/{user_id}?device_id=D (1 to 128 bytes)",
        )
        .into_response();
    };
    if state.clients.counts().0 >= state.seed.max_connections {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "{} clients are connected to this node already (websocket.max_connections)",
                state.seed.max_connections
            ),
        )
        .into_response();
    }
    if user.is_empty() || user.len() > 128 || user.chars().any(char::is_control) {
        return ApiError::bad_request("user_id must be 1 to 128 bytes of printable text")
            .into_response();
    }
    match ws {
        Ok(ws) => ws
            .max_message_size(MAX_SEED_WS_MESSAGE)
            .max_frame_size(MAX_SEED_WS_MESSAGE)
            .on_upgrade(move |socket| session(socket, state, user, client)),
        Err(rejection) => ApiError::bad_request(format!(
            "/ws/{{user_id}} takes WebSocket upgrades only: {}",
            rejection.body_text()
        ))
        .into_response(),
    }
}

/// One client's socket: opens its session (refused past `max_devices_per_user`), then
/// relays its messages to the services and the services' events to it.
/// A client's messages being handled at once; past this its socket is not read until
/// some are done.
const MAX_IN_FLIGHT: usize = 64;

/// How long one frame may take to reach a client before it counts as gone.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A close reason of at most `max` bytes, cut on a character boundary.
fn close_reason(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// Sends one frame; false when the client is gone or took longer than [`SEND_TIMEOUT`].
async fn send_to(sink: &mut futures::stream::SplitSink<WebSocket, Message>, m: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, sink.send(m)).await,
        Ok(Ok(()))
    )
}

/// Counts the client's socket out and closes its session when it was the last one, even
/// if the session task ends early (a panic, a cancelled task).
struct Registered {
    state: Arc<ApiState>,
    user: String,
    client: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if self.state.clients.remove(&self.user, &self.client) == 0 {
            let users = crate::Users {
                core: self.state.core.clone(),
            };
            let (user, client) = (self.user.clone(), self.client.clone());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = users.close_session(&user, &client).await {
                        tracing::warn!(%user, %client, error = %e, "cannot close a client session");
                    }
                });
            }
        }
    }
}

/// One client's socket: opens its session (refused past `max_devices_per_user`), then
/// relays its messages to the services and the services' events to it.
async fn session(socket: WebSocket, state: Arc<ApiState>, user: String, client: String) {
    let (mut sink, mut source) = socket.split();
    let users = crate::Users {
        core: state.core.clone(),
    };
    // Subscribed first, so nothing made from here on is missed; a notification both read
    // as pending and heard as an event is sent once.
    let mut events = state.core.node_events.subscribe();
    // Read before the session opens: what this client missed since its session closed.
    let pending = pending_notifications(&state, &user, &client).await;
    if let Err(e) = users.open_session(&user, &client).await {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CLOSE_POLICY,
                reason: close_reason(&e.to_string(), 120).into(),
            })))
            .await;
        return;
    }
    state.clients.add(&user, &client);
    let _registered = Registered {
        state: state.clone(),
        user: user.clone(),
        client: client.clone(),
    };
    state.metrics.seed.connections.inc();
    let session_id = hex::encode(crate::home::random::<8>().unwrap_or_default());
    let connected = frame(
        "connected",
        json!({ "session_id": session_id, "device_id": client, "user_id": user,
                "timestamp": now_s() }),
    );
    let mut ok = send_to(&mut sink, connected).await;
    let mut sent_ids: HashSet<String> = HashSet::new();
    for (id, pending) in pending {
        if !ok {
            break;
        }
        sent_ids.insert(id);
        ok = send_to(&mut sink, pending).await;
    }
    let mut rooms: HashMap<String, bool> = HashMap::new();
    let mut ping = tokio::time::interval(state.seed.heartbeat_interval);
    ping.reset();
    let mut heard = tokio::time::Instant::now();
    // A client's messages are handled in order but without waiting for each one's write
    // to be stored before reading the next: the core takes them in order, and one flush
    // covers many. Answers (errors, heartbeat acks) go back in the order asked.
    let mut inflight = futures::stream::FuturesOrdered::new();
    while ok {
        let idle = tokio::time::sleep_until(
            heard
                .checked_add(state.seed.timeout)
                .unwrap_or_else(|| heard + std::time::Duration::from_secs(86_400)),
        );
        let out = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = ping.tick() => Some(Message::Ping(Vec::new().into())),
            _ = idle => {
                let _ = send_to(&mut sink, Message::Close(Some(CloseFrame {
                    code: 1001,
                    reason: "no message within websocket.timeout".into(),
                }))).await;
                break;
            }
            Some(answer) = inflight.next(), if !inflight.is_empty() => answer,
            incoming = source.next(), if inflight.len() < MAX_IN_FLIGHT => {
                heard = tokio::time::Instant::now();
                match incoming {
                    Some(Ok(Message::Text(t))) => {
                        inflight.push_back(handle(&state, &user, &client, t.to_string()));
                        None
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => None,
                }
            },
            event = events.recv() => match event {
                Ok(Event::Notification { notification, .. })
                    if notification.user_id == user && !sent_ids.insert(notification.id.clone()) =>
                {
                    None
                }
                Ok(event) => outgoing(&state, &user, &client, event, &mut rooms).await,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(%user, %client, missed = n, "a seed client fell behind");
                    // Joins and leaves may be among what was missed.
                    rooms.clear();
                    Some(frame("error", json!({ "error": "lagged",
                        "message": format!("{n} updates were missed; read the state again") })))
                }
                Err(RecvError::Closed) => break,
            },
        };
        if let Some(out) = out {
            ok = send_to(&mut sink, out).await;
        }
    }
}

#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

/// A client's message: handled by the service it names; answers a frame to send back,
/// if any (the writing socket gets no `state_update` for its own write).
async fn handle(state: &ApiState, user: &str, client: &str, text: String) -> Option<Message> {
    let message: Incoming = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => {
            return Some(frame(
                "error",
                json!({ "error": "bad_request", "message": format!("not a seed message: {e}") }),
            ));
        }
    };
    let field = |name: &str| message.data.get(name).cloned();
    let result: Result<Option<Message>, Error> = match message.kind.as_str() {
        "heartbeat" => Ok(Some(frame("heartbeat_ack", json!({})))),
        "sync_state" => match field("state") {
            Some(Value::Object(map)) => crate::Users {
                core: state.core.clone(),
            }
            .merge_state(user, client, map, false)
            .await
            .map(|_| None),
            _ => Err(Error::Invalid(
                "sync_state takes {\"data\": {\"state\": {...}}}".into(),
            )),
        },
        "send_message" => match (field("room_id"), field("message")) {
            (Some(Value::String(room)), Some(Value::String(text))) => {
                state.metrics.seed.messages_sent.inc();
                crate::Rooms {
                    core: state.core.clone(),
                }
                .say(&room, Some(user), &text)
                .await
                .map(|_| None)
            }
            _ => Err(Error::Invalid(
                "send_message takes {\"data\": {\"room_id\": ..., \"message\": \"...\"}}".into(),
            )),
        },
        "presence" => match field("status").as_ref().and_then(Value::as_str) {
            Some(status) => match status.parse::<Status>() {
                Ok(status) => crate::Presence {
                    core: state.core.clone(),
                }
                .set(Some(user), status, None)
                .await
                .map(|_| None),
                Err(e) => Err(e),
            },
            None => Err(Error::Invalid(
                "presence takes {\"data\": {\"status\": \"online|away|busy\"}}".into(),
            )),
        },
        other => Err(Error::Invalid(format!(
            "unknown message type {:?}; send heartbeat, sync_state, send_message or presence",
            other.chars().take(32).collect::<String>()
        ))),
    };
    match result {
        Ok(out) => out,
        Err(e) => Some(error_frame(e)),
    }
}

/// What an event means for this client, if anything.
async fn outgoing(
    state: &ApiState,
    user: &str,
    client: &str,
    event: Event,
    rooms: &mut HashMap<String, bool>,
) -> Option<Message> {
    match event {
        Event::UserState {
            user: u,
            state: written,
            source_device,
            ..
        } if u == user && source_device != client => Some(frame(
            "state_update",
            json!({ "state": written, "source_device": source_device, "timestamp": now_s() }),
        )),
        Event::Chat { message, .. } => {
            let member = match rooms.get(&message.room_id) {
                Some(m) => *m,
                None => {
                    let m = crate::Rooms {
                        core: state.core.clone(),
                    }
                    .get(&message.room_id)
                    .await
                    .is_ok_and(|r| r.members.iter().any(|m| m.user == user));
                    rooms.insert(message.room_id.clone(), m);
                    m
                }
            };
            member.then(|| chat_frame(&message))
        }
        Event::MemberJoined { room_id, .. } | Event::MemberLeft { room_id, .. } => {
            // Membership is read again at the room's next message.
            rooms.remove(&room_id);
            None
        }
        Event::Notification { notification, .. } if notification.user_id == user => {
            Some(notification_frame(&notification))
        }
        _ => None,
    }
}

/// The seed's `chat_message`: its fields at the top, as the seed sends them, and in
/// `data` as well.
fn chat_frame(m: &crate::rooms::ChatMessage) -> Message {
    let body = json!({
        "sender_id": m.sender,
        "message": m.message,
        "room_id": m.room_id,
        "message_id": m.id,
        "timestamp": seconds(m.timestamp),
    });
    let mut top = body.as_object().cloned().unwrap_or_default();
    top.insert("type".into(), json!("chat_message"));
    top.insert("data".into(), body);
    Message::Text(Value::Object(top).to_string().into())
}

fn notification_frame(n: &crate::users::Notification) -> Message {
    frame(
        "notification",
        json!({
            "notification_id": n.id,
            "user_id": n.user_id,
            "type": n.kind,
            "title": n.title,
            "body": n.body,
            "priority": n.priority,
            "data": n.data,
            "created_at": seconds(n.created_at),
        }),
    )
}

/// Notifications of `user` this client has not seen: those made since its session last
/// closed (or every unexpired one, for a client new to the home).
async fn pending_notifications(
    state: &ApiState,
    user: &str,
    client: &str,
) -> Vec<(String, Message)> {
    let notify = crate::Notifications {
        core: state.core.clone(),
    };
    match notify.pending(user, client).await {
        Ok(list) => list
            .iter()
            .map(|n| (n.id.clone(), notification_frame(n)))
            .collect(),
        Err(e) => {
            tracing::warn!(%user, %client, error = %e, "cannot read pending notifications");
            Vec::new()
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct NotifyBody {
    user_id: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    priority: Option<String>,
    title: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    data: Option<Map<String, Value>>,
    #[serde(default)]
    ttl: Option<u64>,
}

/// `POST /notify` and `POST /api/notify`.
pub(crate) async fn notify(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<NotifyBody>,
) -> Response {
    let request = crate::users::NewNotification {
        user_id: body.user_id.clone(),
        kind: body.kind.unwrap_or_else(|| "peer_message".into()),
        priority: body.priority.unwrap_or_else(|| "normal".into()),
        title: body.title,
        body: body.body.unwrap_or_default(),
        data: body.data.unwrap_or_default(),
        ttl: std::time::Duration::from_secs(body.ttl.unwrap_or(86_400)),
    };
    let kind = request.kind.clone();
    match (crate::Notifications {
        core: state.core.clone(),
    })
    .send(request)
    .await
    {
        Ok(n) => {
            state.metrics.seed.notifications_sent.inc();
            Json(
                json!({ "success": true, "user_id": body.user_id, "type": kind,
                         "notification_id": n.id }),
            )
            .into_response()
        }
        Err(e) => seed_error(e),
    }
}

#[derive(Deserialize)]
pub(crate) struct BroadcastBody {
    message: Value,
    #[serde(default)]
    sender_id: Option<String>,
}

/// `POST /broadcast/{room_id}`: the message goes to the room's chat (as text; an object
/// is sent as its `text` field, or as JSON), so every member's sockets get it.
pub(crate) async fn broadcast(
    State(state): State<Arc<ApiState>>,
    Path(room): Path<String>,
    ApiJson(body): ApiJson<BroadcastBody>,
) -> Response {
    let text = match &body.message {
        Value::String(s) => s.clone(),
        Value::Object(o) => match o.get("text").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => body.message.to_string(),
        },
        other => other.to_string(),
    };
    let rooms = crate::Rooms {
        core: state.core.clone(),
    };
    let sender = body.sender_id.as_deref();
    let result = async {
        let r = rooms.get(&room).await?;
        // A sender who is not a member (an announcement from outside) joins first, as the
        // seed lets anyone with the token broadcast.
        if let Some(s) = sender
            && !r.members.iter().any(|m| m.user == s)
        {
            rooms.join(&r.room_id, Some(s)).await?;
        }
        rooms.say(&r.room_id, sender, &text).await?;
        rooms.get(&r.room_id).await
    }
    .await;
    match result {
        Ok(r) => {
            state.metrics.seed.messages_sent.inc();
            Json(json!({ "success": true, "room_id": r.room_id, "sent_count": r.members.len() }))
                .into_response()
        }
        Err(e) => seed_error(e),
    }
}

#[derive(Deserialize)]
pub(crate) struct SyncStateBody {
    user_id: String,
    device_id: String,
    state: Map<String, Value>,
}

/// `POST /sync-state`.
pub(crate) async fn sync_state(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<SyncStateBody>,
) -> Response {
    match (crate::Users {
        core: state.core.clone(),
    })
    .merge_state(&body.user_id, &body.device_id, body.state, false)
    .await
    {
        Ok(_) => Json(json!({ "success": true, "user_id": body.user_id,
                              "device_id": body.device_id }))
        .into_response(),
        Err(e) => seed_error(e),
    }
}

#[derive(Deserialize)]
pub(crate) struct CreateRoomBody {
    room_name: String,
    creator_id: String,
    #[serde(default)]
    max_size: Option<u64>,
}

/// `POST /create-room`: the creator is the first member.
pub(crate) async fn create_room(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<CreateRoomBody>,
) -> Response {
    let rooms = crate::Rooms {
        core: state.core.clone(),
    };
    let most = state.seed.max_room_size;
    let result = async {
        let size = body.max_size.unwrap_or(most);
        if size > most {
            return Err(Error::Invalid(format!(
                "max_size {size} is over this node's max_room_size of {most}"
            )));
        }
        let room = rooms
            .create(&body.room_name, Some(size), Some(&body.creator_id))
            .await?;
        rooms.join(&room.room_id, Some(&body.creator_id)).await
    }
    .await;
    match result {
        Ok(room) => Json(json!({ "success": true, "room_id": room.room_id,
                                 "room_name": room.name }))
        .into_response(),
        Err(e) => seed_error(e),
    }
}

#[derive(Deserialize)]
pub(crate) struct JoinRoomBody {
    room_id: String,
    user_id: String,
}

/// `POST /join-room`.
pub(crate) async fn join_room(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<JoinRoomBody>,
) -> Response {
    match (crate::Rooms {
        core: state.core.clone(),
    })
    .join(&body.room_id, Some(&body.user_id))
    .await
    {
        Ok(room) => Json(json!({ "success": true, "room_id": room.room_id,
                                 "user_id": body.user_id }))
        .into_response(),
        Err(e) => seed_error(e),
    }
}

/// `GET /presence/{user_id}`: a user never seen is offline.
pub(crate) async fn presence(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
) -> Response {
    match (crate::Presence {
        core: state.core.clone(),
    })
    .get(Some(&user))
    .await
    {
        Ok(p) => Json(json!({ "user_id": user, "status": p.status.as_str(),
                              "is_online": p.status != Status::Offline }))
        .into_response(),
        Err(Error::NotFound(_)) => {
            Json(json!({ "user_id": user, "status": "offline", "is_online": false }))
                .into_response()
        }
        Err(e) => seed_error(e),
    }
}

/// `GET /room/{room_id}`.
pub(crate) async fn room(State(state): State<Arc<ApiState>>, Path(room): Path<String>) -> Response {
    match (crate::Rooms {
        core: state.core.clone(),
    })
    .get(&room)
    .await
    {
        Ok(r) => Json(json!({
            "room_id": r.room_id,
            "room_name": r.name,
            "creator_id": r.creator,
            "created_at": seconds(r.created_at),
            "member_count": r.members.len(),
            "max_size": r.max_size,
            "is_active": !r.members.is_empty(),
        }))
        .into_response(),
        Err(e) => seed_error(e),
    }
}

/// `GET /health`, without the token.
pub(crate) async fn health() -> Response {
    (
        StatusCode::OK,
        Json(json!({ "status": "healthy", "agent": "hearth", "timestamp": now_s() })),
    )
        .into_response()
}

/// `GET /api/users/{user}/state`.
pub(crate) async fn user_state(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
) -> Response {
    match (crate::Users {
        core: state.core.clone(),
    })
    .state(&user)
    .await
    {
        Ok(s) => Json(s).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn notifications(state: &ApiState) -> crate::Notifications {
    crate::Notifications {
        core: state.core.clone(),
    }
}

/// `GET /api/push/vapid-public-key`: the `applicationServerKey` for Web Push clients.
pub(crate) async fn vapid_public_key(State(state): State<Arc<ApiState>>) -> Response {
    match notifications(&state).vapid_public_key().await {
        Ok(key) => Json(json!({ "public_key": key })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `POST /api/users/{user}/push-subscriptions` with a browser's `PushSubscription` JSON.
pub(crate) async fn subscribe(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
    ApiJson(subscription): ApiJson<Value>,
) -> Response {
    match notifications(&state).subscribe(&user, subscription).await {
        Ok(id) => (StatusCode::CREATED, Json(json!({ "id": id, "user": user }))).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `DELETE /api/users/{user}/push-subscriptions/{id}`.
pub(crate) async fn unsubscribe(
    State(state): State<Arc<ApiState>>,
    Path((user, id)): Path<(String, String)>,
) -> Response {
    match notifications(&state).unsubscribe(&user, &id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Reads a client's message as [`handle`] does, up to where a service would act on it,
/// for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn decode_for_fuzzing(text: &str) {
    let Ok(message) = serde_json::from_str::<Incoming>(text) else {
        return;
    };
    if let Some(status) = message.data.get("status").and_then(Value::as_str) {
        let _ = status.parse::<Status>();
    }
}
