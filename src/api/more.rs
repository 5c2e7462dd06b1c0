//! Routes for entity deletion and history, peers, rooms, presence and metrics.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiJson, ApiState, MAX_BODY_BYTES, entities};
use crate::entities::{Entity, EntityStorage, EntityVersion, MAX_HISTORY};
use crate::presence::{Presence, PresenceInfo, Status};
use crate::rooms::{ChatMessage, Room, Rooms};

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("request body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// A JSON body that may be absent: an empty body is `T::default()`. Used where every
/// field is optional (`POST /api/rooms/{id}/join` with or without `{user}`).
pub(crate) struct OptionalJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    Bytes: FromRequest<S, Rejection = BytesRejection>,
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError::bad_request(r.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(Self)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// A query string with the API's error body on rejection.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    Query<T>: FromRequestParts<S, Rejection = QueryRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Self(v))
            .map_err(|r| ApiError::bad_request(r.body_text()))
    }
}

// ----- entities ----------------------------------------------------------------------

pub(crate) async fn delete_entity(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<Entity>, ApiError> {
    Ok(Json(entities(&state).delete(&id).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitQuery {
    limit: Option<usize>,
}

#[derive(Serialize)]
pub(crate) struct VersionList {
    versions: Vec<EntityVersion>,
}

pub(crate) async fn entity_history(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LimitQuery>,
) -> Result<Json<VersionList>, ApiError> {
    let limit = q.limit.unwrap_or(MAX_HISTORY);
    Ok(Json(VersionList {
        versions: entities(&state).history(&id, limit).await?,
    }))
}

/// `GET /api/entities/{id}/storage`: the entity's current generation number and what the
/// generations held on this device take (count, changes, stored bytes).
pub(crate) async fn entity_storage(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<EntityStorage>, ApiError> {
    Ok(Json(entities(&state).storage(id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RestoreBody {
    version: String,
}

pub(crate) async fn restore_entity(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RestoreBody>,
) -> Result<Json<Entity>, ApiError> {
    Ok(Json(entities(&state).restore(&id, &body.version).await?))
}

// ----- peers -------------------------------------------------------------------------

#[derive(Serialize)]
pub(crate) struct PeerEntry {
    peer_id: String,
    addrs: Vec<String>,
    connected: bool,
    admitted: bool,
    is_static: bool,
    /// Reported by mDNS and not connected (yet).
    discovered: bool,
    connections: usize,
    connected_for_s: f64,
    /// Ms since a frame last came from the peer; only for admitted peers that sent one.
    last_heard_ms: Option<u64>,
    /// Documents not in sync with the peer; only for admitted peers.
    docs_behind: Option<u64>,
    /// The peer's clock against this device's, from clock probes; only for admitted
    /// devices of the home that answered one.
    clock: Option<crate::playback::ClockEstimate>,
}

#[derive(Serialize)]
pub(crate) struct PeerList {
    peers: Vec<PeerEntry>,
}

/// Connected peers (admitted or not) with the sync lag of admitted ones, then the peers
/// known but not connected: static peers being redialled and peers mDNS reported.
pub(crate) async fn peer_entries(state: &ApiState) -> Result<Vec<PeerEntry>, ApiError> {
    let peers = state.net.connected_peers().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("network is not answering: {e}"),
        )
    })?;
    let report = state
        .core
        .call(|reply| crate::core::NodeRequest::SyncReport { reply })
        .await??;
    let clocks = crate::playback::Playback {
        core: state.core.clone(),
    }
    .clocks()
    .await?;
    let mut out: Vec<PeerEntry> = peers
        .into_iter()
        .map(|p| {
            let id = p.peer.to_base58();
            let lag = report.peers.iter().find(|l| l.peer == id);
            PeerEntry {
                addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                connected: p.connections > 0,
                admitted: p.admitted,
                is_static: p.is_static,
                discovered: false,
                connections: p.connections,
                connected_for_s: p.connected_for.as_secs_f64(),
                last_heard_ms: lag.and_then(|l| l.last_heard_ms),
                docs_behind: lag.map(|l| l.docs_behind),
                clock: clocks
                    .iter()
                    .find(|(p, _)| p.as_str() == id)
                    .map(|(_, e)| e.clone()),
                peer_id: id,
            }
        })
        .collect();
    // Best effort: a network that cannot list them still has the connected peers shown.
    if let Ok(known) = state.net.known_peers().await {
        out.extend(known.into_iter().map(|k| PeerEntry {
            peer_id: k.peer.to_base58(),
            addrs: k.addrs.iter().map(|a| a.to_string()).collect(),
            connected: false,
            admitted: false,
            is_static: k.is_static,
            discovered: k.discovered,
            connections: 0,
            connected_for_s: 0.0,
            last_heard_ms: None,
            docs_behind: None,
            clock: None,
        }));
    }
    out.sort_by(|a, b| (!a.connected, &a.peer_id).cmp(&(!b.connected, &b.peer_id)));
    Ok(out)
}

pub(crate) async fn peers(State(state): State<Arc<ApiState>>) -> Result<Json<PeerList>, ApiError> {
    Ok(Json(PeerList {
        peers: peer_entries(&state).await?,
    }))
}

// ----- rooms -------------------------------------------------------------------------

fn rooms(state: &ApiState) -> Rooms {
    Rooms {
        core: state.core.clone(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRoomBody {
    name: String,
    #[serde(default)]
    max_size: Option<u64>,
    #[serde(default)]
    user: Option<String>,
}

pub(crate) async fn create_room(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<CreateRoomBody>,
) -> Result<(StatusCode, Json<Room>), ApiError> {
    let room = rooms(&state)
        .create(&body.name, body.max_size, body.user.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(room)))
}

#[derive(Serialize)]
pub(crate) struct RoomList {
    rooms: Vec<Room>,
}

pub(crate) async fn list_rooms(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<RoomList>, ApiError> {
    Ok(Json(RoomList {
        rooms: rooms(&state).list().await?,
    }))
}

pub(crate) async fn get_room(
    State(state): State<Arc<ApiState>>,
    Path(room): Path<String>,
) -> Result<Json<Room>, ApiError> {
    Ok(Json(rooms(&state).get(&room).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserBody {
    #[serde(default)]
    user: Option<String>,
}

pub(crate) async fn join_room(
    State(state): State<Arc<ApiState>>,
    Path(room): Path<String>,
    OptionalJson(body): OptionalJson<UserBody>,
) -> Result<Json<Room>, ApiError> {
    Ok(Json(rooms(&state).join(&room, body.user.as_deref()).await?))
}

pub(crate) async fn leave_room(
    State(state): State<Arc<ApiState>>,
    Path(room): Path<String>,
    OptionalJson(body): OptionalJson<UserBody>,
) -> Result<Json<Room>, ApiError> {
    Ok(Json(
        rooms(&state).leave(&room, body.user.as_deref()).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MessageBody {
    message: String,
    #[serde(default)]
    user: Option<String>,
}

pub(crate) async fn post_message(
    State(state): State<Arc<ApiState>>,
    Path(room): Path<String>,
    ApiJson(body): ApiJson<MessageBody>,
) -> Result<(StatusCode, Json<ChatMessage>), ApiError> {
    let message = rooms(&state)
        .say(&room, body.user.as_deref(), &body.message)
        .await?;
    Ok((StatusCode::CREATED, Json(message)))
}

#[derive(Serialize)]
pub(crate) struct MessageList {
    messages: Vec<ChatMessage>,
}

/// Messages a chat read returns without `?limit=`.
const DEFAULT_CHAT_LIMIT: usize = 50;

pub(crate) async fn get_messages(
    State(state): State<Arc<ApiState>>,
    Path(room): Path<String>,
    ApiQuery(q): ApiQuery<LimitQuery>,
) -> Result<Json<MessageList>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_CHAT_LIMIT);
    Ok(Json(MessageList {
        messages: rooms(&state).messages(&room, limit).await?,
    }))
}

// ----- presence ----------------------------------------------------------------------

fn presence(state: &ApiState) -> Presence {
    Presence {
        core: state.core.clone(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PresenceBody {
    status: String,
    #[serde(default)]
    note: Option<String>,
}

pub(crate) async fn set_presence(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
    ApiJson(body): ApiJson<PresenceBody>,
) -> Result<Json<PresenceInfo>, ApiError> {
    let status: Status = body.status.parse()?;
    Ok(Json(
        presence(&state).set(Some(&user), status, body.note).await?,
    ))
}

pub(crate) async fn get_presence(
    State(state): State<Arc<ApiState>>,
    Path(user): Path<String>,
) -> Result<Json<PresenceInfo>, ApiError> {
    Ok(Json(presence(&state).get(Some(&user)).await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoomQuery {
    room: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct PresenceList {
    presence: Vec<PresenceInfo>,
}

pub(crate) async fn list_presence(
    State(state): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<RoomQuery>,
) -> Result<Json<PresenceList>, ApiError> {
    Ok(Json(PresenceList {
        presence: presence(&state).online(q.room.as_deref()).await?,
    }))
}

// ----- metrics -----------------------------------------------------------------------

/// `GET /metrics`: refreshes the metrics read from the core and the network, then
/// encodes the registry.
pub(crate) async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let (sockets, users) = state.clients.counts();
    state.metrics.seed.ws_clients.set(sockets as i64);
    state.metrics.seed.active_users.set(users as i64);
    if let Ok(rooms) = (crate::Rooms {
        core: state.core.clone(),
    })
    .list()
    .await
    {
        let active = rooms.iter().filter(|r| !r.members.is_empty()).count();
        state.metrics.seed.rooms_active.set(active as i64);
    }
    match state.metrics.scrape(&state.core, &state.net).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "metrics could not be encoded",
        )
        .into_response(),
    }
}
