//! Device locks over HTTP and WebSocket, in seed 004's routes and bodies (behind the
//! node's token): `POST /api/lock/request`, `POST /api/lock/release`,
//! `GET /api/locks/status`, `GET /api/locks/device/{name}`, and `WS /ws`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, ApiJson, ApiState};
use crate::Error;
use crate::events::Event;
use crate::locks::{LockAsk, LockInfo, LockOutcome, LockType, Locks, ReleaseOutcome};

/// Largest message a `/ws` client may send; its messages are a few dozen bytes.
const MAX_LOCK_WS_MESSAGE: usize = 4096;

fn locks(state: &ApiState) -> Locks {
    Locks {
        core: state.core.clone(),
    }
}

/// Seed 004's timestamp: RFC 3339, now.
fn now_text() -> String {
    crate::core::rfc3339_ms(crate::core::now_ms()).to_string()
}

/// An error in seed 004's shape: `{success: false, error, message}`.
fn lock_error(e: Error) -> Response {
    let api = ApiError::from(e);
    (
        api.status,
        Json(json!({ "success": false, "error": api.kind, "message": api.detail })),
    )
        .into_response()
}

/// A lock type by name (`MANUAL_OPERATOR`) or by its number (2).
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum LockTypeField {
    Name(String),
    Number(u64),
}

impl LockTypeField {
    fn parse(&self) -> Result<LockType, Error> {
        let found = match self {
            LockTypeField::Name(name) => LockType::parse(&name.to_ascii_uppercase()),
            LockTypeField::Number(n) => LockType::ALL
                .into_iter()
                .find(|t| u64::from(t.priority()) == *n),
        };
        found.ok_or_else(|| {
            Error::Invalid(
                "unknown lock_type; use MAINTENANCE (0), QUEUE_EXECUTING (1), MANUAL_OPERATOR (2) \
                 or QUEUE_QUEUED (3)"
                    .into(),
            )
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestBody {
    device_name: String,
    lock_type: LockTypeField,
    user_id: String,
    /// Seconds; 300 when absent.
    timeout: Option<f64>,
    reason: Option<String>,
    plan_uid: Option<String>,
}

/// `POST /api/lock/request`.
pub(crate) async fn request(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<RequestBody>,
) -> Response {
    let lock_type = match body.lock_type.parse() {
        Ok(t) => t,
        Err(e) => return lock_error(e),
    };
    let timeout = match body.timeout {
        None => crate::locks::DEFAULT_LOCK_TIMEOUT,
        Some(t) if (1.0..=86_400.0).contains(&t) => Duration::from_secs_f64(t),
        Some(t) => {
            return lock_error(Error::Invalid(format!(
                "timeout {t} is out of range; use 1 to 86400 seconds"
            )));
        }
    };
    let ask = LockAsk {
        device_name: body.device_name,
        lock_type,
        user_id: body.user_id,
        timeout,
        reason: body.reason,
        plan_uid: body.plan_uid,
    };
    match locks(&state).request(ask).await {
        Ok(LockOutcome::Granted { lock, key }) => Json(json!({
            "success": true,
            "lock_key": key,
            "lock": lock,
            "message": format!("{} locked", lock.device_name),
        }))
        .into_response(),
        Ok(LockOutcome::Refused { holder, message }) => Json(json!({
            "success": false,
            "lock": holder,
            "message": message,
        }))
        .into_response(),
        Err(e) => lock_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseBody {
    device_name: String,
    lock_key: String,
    user_id: String,
}

/// `POST /api/lock/release`.
pub(crate) async fn release(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<ReleaseBody>,
) -> Response {
    match locks(&state)
        .release(&body.device_name, &body.lock_key, &body.user_id)
        .await
    {
        Ok(ReleaseOutcome::Released(lock)) => Json(json!({
            "success": true,
            "lock": lock,
            "message": format!("{} released", lock.device_name),
        }))
        .into_response(),
        Ok(ReleaseOutcome::ForceReleased(lock)) => Json(json!({
            "success": true,
            "lock": lock,
            "message": format!("{} force-released", lock.device_name),
        }))
        .into_response(),
        Err(e) => lock_error(e),
    }
}

fn status_body(list: Vec<LockInfo>) -> Value {
    json!({ "locks": list.clone(), "total_count": list.len(), "timestamp": now_text() })
}

/// `GET /api/locks/status`.
pub(crate) async fn status(State(state): State<Arc<ApiState>>) -> Response {
    match locks(&state).status().await {
        Ok(list) => Json(status_body(list)).into_response(),
        Err(e) => lock_error(e),
    }
}

/// `GET /api/locks/device/{device_name}`.
pub(crate) async fn device(
    State(state): State<Arc<ApiState>>,
    Path(device_name): Path<String>,
) -> Response {
    match locks(&state).device(&device_name).await {
        Ok(lock) => Json(json!({
            "device_name": device_name,
            "locked": lock.is_some(),
            "lock": lock,
        }))
        .into_response(),
        Err(e) => lock_error(e),
    }
}

/// `GET /api/locks/arbiter`: which device decides locks.
pub(crate) async fn arbiter(State(state): State<Arc<ApiState>>) -> Response {
    match locks(&state).arbiter().await {
        Ok(info) => Json(info).into_response(),
        Err(e) => lock_error(e),
    }
}

/// The body of `PUT /api/locks/arbiter`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NameArbiterBody {
    device: String,
    #[serde(default)]
    force: bool,
}

/// `PUT /api/locks/arbiter {device, force?}`: names another arbiter (admin device only);
/// answers once the handoff is done or given up.
pub(crate) async fn name_arbiter(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<NameArbiterBody>,
) -> Response {
    match locks(&state).name_arbiter(&body.device, body.force).await {
        Ok(info) => Json(info).into_response(),
        Err(e) => lock_error(e),
    }
}

/// `WS /ws`: seed 004's lock updates.
pub(crate) async fn upgrade(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Err(refused) = crate::ws::check_token(&state, &headers, query) {
        return refused.into_response();
    }
    match ws {
        Ok(ws) => ws
            .max_message_size(MAX_LOCK_WS_MESSAGE)
            .max_frame_size(MAX_LOCK_WS_MESSAGE)
            .on_upgrade(move |socket| session(socket, state)),
        Err(rejection) => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "success": false, "error": "bad_request",
                         "message": format!("/ws takes WebSocket upgrades only: {}", rejection.body_text()) })),
        )
            .into_response(),
    }
}

async fn initial_status(state: &ApiState) -> Message {
    let data = match locks(state).status().await {
        Ok(list) => status_body(list),
        Err(e) => json!({ "locks": [], "total_count": 0, "timestamp": now_text(),
                          "error": e.to_string() }),
    };
    text(json!({ "type": "initial_status", "data": data }))
}

fn text(value: Value) -> Message {
    Message::Text(value.to_string().into())
}

/// Sends `initial_status` at once, answers `ping` and `get_status`, and sends a
/// `lock_update` for every lock change until the client or the node goes.
async fn session(socket: WebSocket, state: Arc<ApiState>) {
    let mut events = state.core.node_events.subscribe();
    let (mut sink, mut source) = socket.split();
    if sink.send(initial_status(&state).await).await.is_err() {
        return;
    }
    loop {
        let out = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            incoming = source.next() => match incoming {
                Some(Ok(Message::Text(t))) => {
                    let kind = serde_json::from_str::<Value>(&t)
                        .ok()
                        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned));
                    match kind.as_deref() {
                        Some("ping") => text(json!({ "type": "pong", "timestamp": now_text() })),
                        Some("get_status") => initial_status(&state).await,
                        _ => text(json!({ "type": "error",
                                          "message": "unknown message; send {\"type\": \"ping\"} or {\"type\": \"get_status\"}" })),
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            },
            event = events.recv() => match event {
                Ok(Event::Lock { action, lock }) => text(json!({
                    "type": "lock_update",
                    "action": action.as_str(),
                    "device_name": lock.device_name,
                    "lock": lock,
                    "timestamp": now_text(),
                })),
                Ok(_) => continue,
                // Fell behind: the whole table again, so the client is current.
                Err(RecvError::Lagged(_)) => initial_status(&state).await,
                Err(RecvError::Closed) => break,
            },
        };
        if sink.send(out).await.is_err() {
            break;
        }
    }
}
