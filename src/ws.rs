//! `GET /api/ws`: the WebSocket API. Every frame is JSON `{"type": ..., "data": {...}}`.
//!
//! Each session has one bus stream whose filter the client sets with `subscribe`. A
//! writer sends what the stream yields (and the replies the reader queues); a reader
//! handles the client's messages. The stream's queue is the client's buffer: a client
//! that does not read falls behind, the bus closes its stream when the queue is full, and
//! the writer closes the socket with 1008. Nothing else queues for a client, so memory
//! per session stays bounded however slow it is. The bus is fed from the node's one event
//! stream ([`crate::Node::events`]); when its bridge falls behind that stream and loses
//! events, every session gets a `missed` frame where the gap is.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::api::{ApiError, ApiState, MAX_BODY_BYTES, constant_time_eq};
use crate::bus::{Event, EventStream, Filter, MISSED_EVENT, Pattern};
use crate::entities::{Entities, EntityWrite};

/// Events queued for one client before it counts as too slow and is closed with 1008.
pub const WS_CLIENT_BUFFER: usize = 256;
/// Replies (acks, errors) queued from a session's reader to its writer. The reader waits
/// when it is full, which stops it reading: a client flooding requests without reading the
/// answers is slowed down by TCP, not buffered.
const WS_REPLY_BUFFER: usize = 32;
/// How long closing a too-slow client may wait for its socket to take the close frame.
const WS_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest client message accepted, as for request bodies.
const MAX_WS_MESSAGE_BYTES: usize = MAX_BODY_BYTES;
/// Patterns and subjects one `subscribe` may name.
const MAX_PATTERNS: usize = 64;
const MAX_SUBJECTS: usize = 1024;

/// Authenticates (bearer header or `?token=`), then upgrades. Authentication comes first,
/// so a wrong token is a plain 401 whether or not the request is a valid upgrade.
pub(crate) async fn upgrade(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let login = match check_credentials(&state, &headers, query) {
        Ok(login) => login,
        Err(refused) => return refused.into_response(),
    };
    match ws {
        Ok(ws) => ws
            .max_message_size(MAX_WS_MESSAGE_BYTES)
            // A single frame is read whole before the message cap is checked; cap it too.
            .max_frame_size(MAX_WS_MESSAGE_BYTES)
            .on_upgrade(move |socket| session(socket, state, login)),
        Err(rejection) => ApiError::bad_request(format!(
            "/api/ws takes WebSocket upgrades only: {}",
            rejection.body_text()
        ))
        .into_response(),
    }
}

/// `/api/ws`'s credentials: the token as [`check_token`] takes it, or, without one, the
/// dashboard's session cookie from one of the node's own pages (not an origin given with
/// `--allowed-origin`: those are for pages that hold the token). A socket opened with the
/// cookie gets its session, to close when that ends.
fn check_credentials(
    state: &ApiState,
    headers: &HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Option<crate::api::dashboard::Live>, ApiError> {
    let has_token = headers.contains_key(header::AUTHORIZATION)
        || query.as_ref().is_ok_and(|Query(q)| q.contains_key("token"));
    if !has_token && state.sessions.carried(headers) {
        let live = crate::api::dashboard::live_session(state, headers)?;
        crate::api::dashboard::check_own_origin(state, headers)?;
        return Ok(Some(live));
    }
    check_token(state, headers, query).map(|()| None)
}

/// The token of a WebSocket upgrade: the `Authorization: Bearer` header, or `?token=`
/// (browsers cannot set headers on an upgrade).
pub(crate) fn check_token(
    state: &ApiState,
    headers: &HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<(), ApiError> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")));
    let from_query = query.ok().and_then(|Query(q)| q.get("token").cloned());
    let presented = match (from_header, from_query.as_deref()) {
        (Some(header), _) => header.unwrap_or(""),
        (None, Some(token)) => token,
        (None, None) => {
            return Err(ApiError::unauthorized(
                "missing token; send `Authorization: Bearer <token>` or `?token=<token>` \
                 (see `hearth token`)",
            ));
        }
    };
    if !constant_time_eq(presented.as_bytes(), state.token.as_bytes()) {
        return Err(ApiError::unauthorized(
            "wrong bearer token; use the one in the node's data dir (`hearth token`)",
        ));
    }
    Ok(())
}

/// A frame for the client.
fn frame(kind: &str, data: Value) -> Message {
    Message::Text(json!({ "type": kind, "data": data }).to_string().into())
}

fn error_frame(kind: &str, detail: impl Into<String>) -> Message {
    frame("error", json!({ "error": kind, "detail": detail.into() }))
}

/// How an event looks to a client: entity changes, chat and presence in their own
/// shapes, everything else as the event itself.
fn event_frame(event: Event) -> Message {
    let field = |k: &str| event.data.get(k).cloned().unwrap_or(Value::Null);
    match event.name.as_str() {
        "entity.changed" => {
            let mut data = json!({
                "entity_id": event.subject,
                "state": field("state"),
                "attributes": event.data.get("attributes").cloned().unwrap_or_else(|| json!({})),
                "source_device": event.source.device,
                "timestamp": event.time,
            });
            if let (Some(c), Some(obj)) = (&event.correlation_id, data.as_object_mut()) {
                obj.insert("correlation_id".into(), json!(c));
            }
            frame("state_update", data)
        }
        "room.chat" => frame(
            "chat_message",
            json!({
                "room_id": event.subject,
                "sender": field("sender"),
                "message": field("message"),
                "timestamp": unix_seconds(&event.data["timestamp"]).unwrap_or(event.time),
            }),
        ),
        "presence.changed" => frame(
            "presence",
            json!({
                "user": event.subject,
                "status": field("status"),
                "since": unix_seconds(&event.data["since"]).unwrap_or(event.time),
            }),
        ),
        MISSED_EVENT => frame("missed", json!({ "count": field("count") })),
        _ => frame("event", event_data(&event)),
    }
}

/// An `event` frame's data: the event's own fields, and for an event a device published
/// (it names its targets) seed 000's fields too: `type`, `source_device_id`,
/// `target_device_ids`, `payload` and `timestamp` (Unix seconds).
fn event_data(event: &Event) -> Value {
    let mut data = serde_json::to_value(event).unwrap_or(Value::Null);
    if let (Some(targets), Some(obj)) = (
        event.metadata.get("target_device_ids"),
        data.as_object_mut(),
    ) {
        obj.insert("type".into(), json!(event.name));
        obj.insert("source_device_id".into(), json!(event.subject));
        obj.insert("target_device_ids".into(), targets.clone());
        obj.insert("payload".into(), event.data.clone());
        obj.insert("timestamp".into(), json!(event.time));
    }
    data
}

/// An RFC 3339 time (as bodies carry it) in Unix seconds (as frames carry it).
fn unix_seconds(value: &Value) -> Option<f64> {
    let t = time::OffsetDateTime::parse(
        value.as_str()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// Resolves when the dashboard session a socket was opened with ends (logout, pushed
/// out, or expired); never for a socket opened with the token.
async fn session_end(login: Option<crate::api::dashboard::Live>) {
    match login {
        Some(live) => {
            tokio::select! {
                _ = live.ended.cancelled() => {}
                _ = tokio::time::sleep_until(live.ends.into()) => {}
            }
        }
        None => std::future::pending().await,
    }
}

async fn session(
    socket: WebSocket,
    state: Arc<ApiState>,
    login: Option<crate::api::dashboard::Live>,
) {
    let session_id = match crate::home::random::<8>() {
        Ok(bytes) => hex::encode(bytes),
        Err(error) => {
            tracing::warn!(%error, "no session id; refusing the WebSocket");
            return;
        }
    };
    // Nothing is sent until the client subscribes; the filter is swapped in place, so
    // events are never lost between an old subscription and a new one.
    let wanted = Arc::new(RwLock::new(Filter::nothing()));
    let shared = wanted.clone();
    // A gap in the node's events reaches every session, whatever it subscribed to: the
    // client cannot tell whether the lost events were ones it wanted.
    let stream = state.bus.stream(
        Filter::all().predicate(move |e| {
            e.name == MISSED_EVENT || shared.read().map(|f| f.matches(e)).unwrap_or(false)
        }),
        WS_CLIENT_BUFFER,
    );
    let (mut sink, source) = socket.split();
    let (replies, replies_rx) = mpsc::channel(WS_REPLY_BUFFER);
    let reader = tokio::spawn(read_loop(source, replies, wanted, state.clone()));
    let hello = frame(
        "connected",
        json!({ "session_id": session_id, "device": state.peer_id, "home": state.home_id }),
    );
    let close = tokio::select! {
        _ = write_loop(&mut sink, stream, replies_rx, hello) => None,
        _ = state.shutdown.cancelled() => Some((close_code::AWAY, "the node is shutting down")),
        _ = session_end(login) => Some((
            close_code::POLICY,
            "the dashboard session ended (logged out or expired); log in again at /",
        )),
    };
    if let Some((code, reason)) = close {
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(WS_CLOSE_TIMEOUT, sink.send(close)).await;
    }
    reader.abort();
    tracing::debug!(session = %session_id, "WebSocket session ended");
}

type Sink = futures::stream::SplitSink<WebSocket, Message>;
type Source = futures::stream::SplitStream<WebSocket>;

async fn write_loop(
    sink: &mut Sink,
    mut stream: EventStream,
    mut replies: mpsc::Receiver<Message>,
    hello: Message,
) {
    if sink.send(hello).await.is_err() {
        return;
    }
    let overflow = stream.overflow_watch();
    loop {
        let message = tokio::select! {
            biased;
            _ = overflow.wait() => return close_too_slow(sink).await,
            reply = replies.recv() => match reply {
                Some(m) => m,
                // The reader ended: the client closed or broke the connection.
                None => return,
            },
            event = stream.recv() => match event {
                Some(e) => event_frame(e),
                None => {
                    if stream.overflowed() {
                        return close_too_slow(sink).await;
                    }
                    return;
                }
            },
        };
        // A client that stops reading blocks this send; the overflow still closes it
        // rather than waiting on it for ever.
        tokio::select! {
            biased;
            sent = sink.send(message) => if sent.is_err() { return },
            _ = overflow.wait() => return close_too_slow(sink).await,
        }
    }
}

async fn close_too_slow(sink: &mut Sink) {
    tracing::info!(
        buffer = WS_CLIENT_BUFFER,
        "closing a WebSocket client that fell behind"
    );
    let close = Message::Close(Some(CloseFrame {
        code: close_code::POLICY,
        reason: format!(
            "too slow: more than {WS_CLIENT_BUFFER} events were waiting to be read; reconnect \
             and read faster, or subscribe to fewer events"
        )
        .into(),
    }));
    let _ = tokio::time::timeout(WS_CLOSE_TIMEOUT, sink.send(close)).await;
}

async fn read_loop(
    mut source: Source,
    replies: mpsc::Sender<Message>,
    wanted: Arc<RwLock<Filter>>,
    state: Arc<ApiState>,
) {
    while let Some(message) = source.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Binary(_)) => {
                let reply = error_frame(
                    "bad_request",
                    "binary frames are not accepted; send JSON text frames",
                );
                if replies.send(reply).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Message::Close(_)) | Err(_) => return,
            Ok(_) => continue,
        };
        if let Some(reply) = handle(text.as_str(), &wanted, &state).await
            && replies.send(reply).await.is_err()
        {
            return;
        }
    }
}

/// A client frame; `data` may be left out for messages without fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "empty_object")]
    data: Value,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Subscribe {
    patterns: Vec<String>,
    #[serde(default)]
    subjects: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Heartbeat {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncState {
    entity_id: String,
    state: String,
    #[serde(default)]
    attributes: Option<Map<String, Value>>,
    #[serde(default)]
    correlation_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMessage {
    room_id: String,
    message: String,
    /// The sender; the device name when absent, as for `POST /api/rooms/{id}/messages`.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPresence {
    user: String,
    status: String,
    #[serde(default)]
    note: Option<String>,
}

fn fields<T: serde::de::DeserializeOwned>(kind: &str, data: Value) -> Result<T, Message> {
    serde_json::from_value(data)
        .map_err(|e| error_frame("bad_request", format!("bad fields for {kind:?}: {e}")))
}

/// Handles one client message; returns the reply to send, if any.
async fn handle(text: &str, wanted: &RwLock<Filter>, state: &ApiState) -> Option<Message> {
    let frame_in: ClientFrame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            return Some(error_frame(
                "bad_request",
                format!("malformed message ({e}); send {{\"type\": ..., \"data\": {{...}}}}"),
            ));
        }
    };
    let kind = frame_in.kind.as_str();
    match kind {
        "subscribe" => match fields::<Subscribe>(kind, frame_in.data) {
            Ok(s) => subscribe(s, wanted).err(),
            Err(reply) => Some(reply),
        },
        "heartbeat" => match fields::<Heartbeat>(kind, frame_in.data) {
            Ok(Heartbeat {}) => Some(frame("heartbeat_ack", json!({}))),
            Err(reply) => Some(reply),
        },
        "sync_state" => match fields::<SyncState>(kind, frame_in.data) {
            Ok(s) => sync_state(s, state).await.err(),
            Err(reply) => Some(reply),
        },
        "send_message" => match fields::<SendMessage>(kind, frame_in.data) {
            Ok(m) => {
                let rooms = crate::Rooms {
                    core: state.core.clone(),
                };
                let said = rooms.say(&m.room_id, m.user.as_deref(), &m.message).await;
                said.err().map(refused)
            }
            Err(reply) => Some(reply),
        },
        "presence" => match fields::<SetPresence>(kind, frame_in.data) {
            Ok(p) => {
                let presence = crate::Presence {
                    core: state.core.clone(),
                };
                let set = match p.status.parse::<crate::Status>() {
                    Ok(status) => presence.set(Some(&p.user), status, p.note).await.err(),
                    Err(e) => Some(e),
                };
                set.map(refused)
            }
            Err(reply) => Some(reply),
        },
        "publish" => match fields::<crate::api::events::PublishBody>(kind, frame_in.data) {
            Ok(body) => crate::api::events::publish_body(state, body)
                .await
                .err()
                .map(|e| {
                    let (kind, detail) = e.kind_and_detail();
                    error_frame(kind, detail)
                }),
            Err(reply) => Some(reply),
        },
        other => Some(error_frame(
            "bad_request",
            format!(
                "unknown message type {:?}; expected subscribe, heartbeat, sync_state, \
                 send_message, presence or publish",
                other.chars().take(64).collect::<String>()
            ),
        )),
    }
}

/// Replaces the session's filter. An empty pattern list unsubscribes; an empty or absent
/// subject list means every subject.
fn subscribe(s: Subscribe, wanted: &RwLock<Filter>) -> Result<(), Message> {
    if s.patterns.len() > MAX_PATTERNS {
        return Err(error_frame(
            "bad_request",
            format!("at most {MAX_PATTERNS} patterns per subscribe"),
        ));
    }
    let subjects = s.subjects.unwrap_or_default();
    if subjects.len() > MAX_SUBJECTS {
        return Err(error_frame(
            "bad_request",
            format!("at most {MAX_SUBJECTS} subjects per subscribe"),
        ));
    }
    let mut filter = Filter::nothing();
    for p in &s.patterns {
        let pattern = Pattern::parse(p).map_err(|e| error_frame("bad_request", e.to_string()))?;
        filter = filter.or_pattern(pattern);
    }
    if !subjects.is_empty() {
        filter = filter.subjects(subjects);
    }
    match wanted.write() {
        Ok(mut w) => *w = filter,
        Err(poisoned) => *poisoned.into_inner() = filter,
    }
    Ok(())
}

/// Writes an entity through the same path as `PUT /api/entities/{id}`.
async fn sync_state(s: SyncState, state: &ApiState) -> Result<(), Message> {
    let entities = Entities {
        core: state.core.clone(),
    };
    let write = EntityWrite {
        state: s.state,
        attributes: s.attributes,
        correlation_id: s.correlation_id,
    };
    match entities.set(&s.entity_id, write).await {
        Ok(_) => Ok(()),
        Err(e) => Err(refused(e)),
    }
}

/// A refused request as an `error` frame, with the kind the REST API would give it.
fn refused(e: crate::Error) -> Message {
    let e = ApiError::from(e);
    let (kind, detail) = e.kind_and_detail();
    error_frame(kind, detail)
}

/// Reads a client frame as [`handle`] does, up to where a handler would act on it, for
/// the fuzz targets: the frame, its fields for the kind it names, a subscription's
/// patterns and a presence's status.
#[cfg(feature = "fuzzing")]
pub(crate) fn decode_for_fuzzing(text: &str) {
    let Ok(frame_in) = serde_json::from_str::<ClientFrame>(text) else {
        return;
    };
    let kind = frame_in.kind.as_str();
    match kind {
        "subscribe" => {
            if let Ok(s) = fields::<Subscribe>(kind, frame_in.data) {
                let _ = subscribe(s, &RwLock::new(Filter::nothing()));
            }
        }
        "heartbeat" => drop(fields::<Heartbeat>(kind, frame_in.data)),
        "sync_state" => drop(fields::<SyncState>(kind, frame_in.data)),
        "send_message" => drop(fields::<SendMessage>(kind, frame_in.data)),
        "presence" => {
            if let Ok(p) = fields::<SetPresence>(kind, frame_in.data) {
                let _ = p.status.parse::<crate::Status>();
            }
        }
        "publish" => drop(fields::<crate::api::events::PublishBody>(
            kind,
            frame_in.data,
        )),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Source;

    fn text(m: Message) -> Value {
        match m {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("not text: {other:?}"),
        }
    }

    /// A cookie socket's session ends on logout or on expiry; a token socket's never.
    #[tokio::test]
    async fn a_socket_session_ends_on_logout_or_expiry_only_with_a_cookie() {
        use crate::api::dashboard::Live;
        use futures::FutureExt;
        use std::time::Instant;
        use tokio_util::sync::CancellationToken;
        let wait = Duration::from_secs(30);
        let far = Instant::now() + Duration::from_secs(3600);
        let logged_out = Live {
            ends: far,
            ended: CancellationToken::new(),
        };
        logged_out.ended.cancel();
        tokio::time::timeout(wait, session_end(Some(logged_out)))
            .await
            .expect("a logged-out session ends");
        let expired = Live {
            ends: Instant::now(),
            ended: CancellationToken::new(),
        };
        tokio::time::timeout(wait, session_end(Some(expired)))
            .await
            .expect("an expired session ends");
        let live = Live {
            ends: far,
            ended: CancellationToken::new(),
        };
        assert!(session_end(Some(live)).now_or_never().is_none());
        assert!(session_end(None).now_or_never().is_none());
    }

    #[test]
    fn entity_changes_become_state_updates_and_others_events() {
        let source = Source {
            home: "h".into(),
            device: "d".into(),
        };
        let changed = Event::new(
            "entity.changed",
            "light.porch",
            json!({"id": "light.porch", "state": "on", "attributes": {"b": 1}}),
            source.clone(),
        )
        .with_correlation_id(Some("c1".into()));
        let f = text(event_frame(changed));
        assert_eq!(f["type"], "state_update");
        assert_eq!(f["data"]["entity_id"], "light.porch");
        assert_eq!(f["data"]["state"], "on");
        assert_eq!(f["data"]["attributes"]["b"], 1);
        assert_eq!(f["data"]["source_device"], "d");
        assert_eq!(f["data"]["correlation_id"], "c1");
        assert!(f["data"]["timestamp"].as_f64().unwrap() > 0.0);

        let peer = Event::new("peer.connected", "p", json!({"peer_id": "p"}), source);
        let f = text(event_frame(peer));
        assert_eq!(f["type"], "event");
        assert_eq!(f["data"]["name"], "peer.connected");
        assert_eq!(f["data"]["source"]["home"], "h");
        assert!(f["data"]["correlation_id"].is_null());
    }

    #[test]
    fn a_device_event_frame_holds_hearth_and_seed_fields() {
        let source = Source {
            home: "h".into(),
            device: "src".into(),
        };
        let mut event = Event::new(
            "coordination.broadcast",
            "src",
            json!({"song": "lullaby"}),
            source,
        )
        .with_correlation_id(Some("req-9".into()))
        .with_metadata("target_device_ids", json!(["t1"]));
        event.time = 1_767_323_045.5;
        let f = text(event_frame(event));
        assert_eq!(f["type"], "event");
        let d = &f["data"];
        assert_eq!(d["name"], "coordination.broadcast");
        assert_eq!(d["subject"], "src");
        assert_eq!(d["correlation_id"], "req-9");
        assert_eq!(d["type"], "coordination.broadcast");
        assert_eq!(d["source_device_id"], "src");
        assert_eq!(d["target_device_ids"], json!(["t1"]));
        assert_eq!(d["payload"]["song"], "lullaby");
        assert_eq!(d["timestamp"], 1_767_323_045.5);
    }

    #[test]
    fn chat_and_presence_frames_carry_unix_seconds() {
        let chat = Event::new(
            "room.chat",
            "r1",
            json!({"id": "m", "room_id": "r1", "sender": "alice", "message": "hi",
                   "timestamp": "2026-01-02T03:04:05.5Z"}),
            Source::default(),
        );
        let f = text(event_frame(chat));
        assert_eq!(f["type"], "chat_message");
        assert_eq!(f["data"]["sender"], "alice");
        assert_eq!(f["data"]["message"], "hi");
        assert_eq!(f["data"]["timestamp"], 1_767_323_045.5);
        let presence = Event::new(
            "presence.changed",
            "alice",
            json!({"user": "alice", "status": "busy", "since": "2026-01-02T03:04:05Z"}),
            Source::default(),
        );
        let f = text(event_frame(presence));
        assert_eq!(f["type"], "presence");
        assert_eq!(f["data"]["status"], "busy");
        assert_eq!(f["data"]["since"], 1_767_323_045.0);
    }

    #[test]
    fn subscribe_replaces_the_filter_and_refuses_bad_patterns() {
        let wanted = RwLock::new(Filter::nothing());
        let ev =
            |name: &str, subject: &str| Event::new(name, subject, json!({}), Source::default());
        subscribe(
            Subscribe {
                patterns: vec!["entity.*".into()],
                subjects: Some(vec!["light.porch".into()]),
            },
            &wanted,
        )
        .unwrap();
        let f = wanted.read().unwrap().clone();
        assert!(f.matches(&ev("entity.changed", "light.porch")));
        assert!(!f.matches(&ev("entity.changed", "light.hall")));
        assert!(!f.matches(&ev("room.chat", "light.porch")));
        let bad = Subscribe {
            patterns: vec!["entity..x".into()],
            subjects: None,
        };
        assert!(subscribe(bad, &wanted).is_err());
        // The old filter stays after a refused subscribe.
        assert!(
            wanted
                .read()
                .unwrap()
                .matches(&ev("entity.changed", "light.porch"))
        );
    }
}
