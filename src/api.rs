//! The local HTTP API: health probes without a token, everything under `/api` and
//! `/metrics` behind the bearer token (or the dashboard's session cookie, see
//! [`dashboard`]), the dashboard at `/`, and every route behind the Host and Origin
//! checks of [`guard`]. Error bodies are `{"error": kind, "detail": sentence}` throughout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::entities::{Entities, Entity, EntityWrite};
use time::OffsetDateTime;

mod activities;
mod alerts;
pub(crate) mod dashboard;
pub(crate) mod events;
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing;
pub(crate) mod guard;
mod locks;
mod more;
mod playback;
mod seed001;
mod sessions;
mod share;

/// What the handlers can see of the node.
pub(crate) struct ApiState {
    pub(crate) token: String,
    pub(crate) peer_id: String,
    pub(crate) device_name: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) api_addr: SocketAddr,
    pub(crate) started: Instant,
    pub(crate) started_at: OffsetDateTime,
    pub(crate) store: crate::store_view::StoreView,
    pub(crate) core: crate::core::CoreHandle,
    pub(crate) net: hearth_net::Handle,
    pub(crate) home_id: String,
    pub(crate) home_name: String,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) bus: crate::bus::Bus,
    /// Fires when the node stops; WebSocket sessions, which outlive the HTTP server's
    /// graceful shutdown, close on it.
    pub(crate) shutdown: tokio_util::sync::CancellationToken,
    /// Serve `/metrics` without the token (`--metrics-open`).
    pub(crate) metrics_open: bool,
    /// The host names and WebSocket origins the API answers.
    pub(crate) guard: guard::Guard,
    /// Seed 001's clients connected here.
    pub(crate) clients: seed001::Clients,
    /// Seed 001's WebSocket and room settings.
    pub(crate) seed: crate::SeedApiConfig,
    /// The dashboard's browser sessions (the cookie).
    pub(crate) sessions: dashboard::Sessions,
}

/// What the API needs of the node it serves.
pub(crate) struct NodeView {
    pub(crate) peer_id: String,
    pub(crate) device_name: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) store: crate::store_view::StoreView,
    pub(crate) core: crate::core::CoreHandle,
    pub(crate) net: hearth_net::Handle,
    pub(crate) home_id: String,
    pub(crate) home_name: String,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) bus: crate::bus::Bus,
}

/// The API of a running node: where it listens, and the task that serves it.
pub(crate) struct Served {
    pub(crate) addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    addr_file: PathBuf,
}

/// How long a stopping node waits for the API to finish in-flight requests.
const API_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Binds the API's address, creates the token on first use, starts serving until `stop`
/// fires, and publishes the bound address in `<data>/api.addr`. `allowed_origins` are
/// already normalised.
pub(crate) async fn serve(
    config: &crate::ApiConfig,
    allowed_origins: &[String],
    node: NodeView,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Served, crate::Error> {
    let token = crate::datadir::load_or_create_token(&node.data_dir)?;
    let bind_error = |source| crate::Error::ApiBind {
        addr: config.addr,
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let data_dir = node.data_dir.clone();
    let state = Arc::new(ApiState {
        token,
        peer_id: node.peer_id,
        device_name: node.device_name,
        data_dir: node.data_dir,
        api_addr: addr,
        started: Instant::now(),
        started_at: OffsetDateTime::now_utc(),
        store: node.store,
        core: node.core,
        net: node.net,
        home_id: node.home_id,
        home_name: node.home_name,
        metrics: node.metrics,
        bus: node.bus,
        shutdown: stop.clone(),
        metrics_open: config.metrics_open,
        guard: guard::Guard::new(addr, allowed_origins),
        clients: seed001::Clients::default(),
        seed: config.seed.clone(),
        sessions: dashboard::Sessions::new(addr.port()),
    });
    let app = router(state);
    let task = tokio::spawn(tracing::Instrument::instrument(
        async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "local API stopped");
            }
        },
        tracing::error_span!("api", addr = %addr),
    ));
    // Published last, so a client that finds the address finds a node ready to answer.
    let addr_file = crate::datadir::write_api_addr(&data_dir, addr)?;
    Ok(Served {
        addr,
        task,
        addr_file,
    })
}

impl Served {
    /// Waits (bounded) for the server to stop after the node's cancellation, and removes
    /// `api.addr`.
    pub(crate) async fn stop(mut self) -> Result<(), crate::Error> {
        // Connections that stay open (a watching client) must not hold the exit hostage.
        if tokio::time::timeout(API_DRAIN_TIMEOUT, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!("local API did not drain in time; closing remaining connections");
            self.task.abort();
        }
        crate::datadir::remove_api_addr(&self.addr_file)
    }
}

/// Largest request body accepted; larger ones get 413.
pub(crate) const MAX_BODY_BYTES: usize = 256 * 1024;

/// An API error: a kind from INTERFACES.md's table and a human sentence.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) detail: String,
    /// For a write the store could not keep: whether it was applied anyway.
    applied: Option<bool>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            detail: detail.into(),
            applied: None,
        }
    }

    pub(crate) fn unauthorized(detail: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    fn not_found(detail: String) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }
}

impl ApiError {
    /// The error body's two fields, for transports that frame errors themselves (the
    /// WebSocket).
    pub(crate) fn kind_and_detail(&self) -> (&'static str, &str) {
        (self.kind, &self.detail)
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        use crate::Error;
        match e {
            Error::NotFound(d) => Self::not_found(d),
            Error::Invalid(d) => Self::bad_request(d),
            Error::Forbidden(d) => Self::new(StatusCode::FORBIDDEN, "forbidden", d),
            Error::Conflict(d) => Self::new(StatusCode::CONFLICT, "conflict", d),
            Error::ArbiterUnreachable(d) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "arbiter_unreachable", d)
            }
            Error::Stopped => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the node is shutting down",
            ),
            Error::InsufficientStorage { applied, detail } => Self {
                applied: Some(applied),
                ..Self::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    detail,
                )
            },
            Error::Unavailable(d) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", d),
            e @ Error::Timeout(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            other => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                other.to_string(),
            ),
        }
    }
}

/// `Json` whose rejections use the API's error body: malformed JSON, wrong types, unknown
/// fields and a wrong content type are all `bad_request` (400), an oversized body is
/// `too_large` (413).
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        format!("request body is larger than {MAX_BODY_BYTES} bytes"),
                    ))
                } else {
                    Err(ApiError::bad_request(rejection.body_text()))
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.kind, "detail": self.detail });
        if let Some(applied) = self.applied {
            body["applied"] = applied.into();
        }
        (self.status, Json(body)).into_response()
    }
}

/// Builds the router. The `/api` routes and `/metrics` sit behind the token check; health
/// probes do not, so supervisors can poll them without credentials. Every route, health
/// and WebSocket included, sits behind the Host and Origin checks.
pub(crate) fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route("/api/status", get(status))
        .route("/api/devices", get(dashboard::devices))
        .route("/api/logout", post(dashboard::logout))
        .route("/api/entities", get(list_entities))
        .route("/api/invites", post(create_invite))
        .route(
            "/api/entities/{id}",
            put(set_entity).get(get_entity).delete(more::delete_entity),
        )
        .route("/api/entities/{id}/history", get(more::entity_history))
        .route("/api/entities/{id}/storage", get(more::entity_storage))
        .route("/api/entities/{id}/restore", post(more::restore_entity))
        .route("/api/peers", get(more::peers))
        .route("/api/pair", post(share::pair))
        .route("/api/homes", get(share::homes))
        .route("/api/homes/{home}", axum::routing::delete(share::forget))
        .route("/api/shares", post(share::share).get(share::list))
        .route(
            "/api/shares/{id}/{home}",
            axum::routing::delete(share::unshare),
        )
        .route("/api/audit", get(share::audit))
        .route(
            "/api/entities/{id}/policy",
            axum::routing::put(share::set_policy),
        )
        .route("/api/conflicts", get(share::conflicts))
        .route("/api/devices/{id}/revoke", post(share::revoke_device))
        .route("/api/conflicts/resolve", post(share::resolve))
        .route("/api/rooms", post(more::create_room).get(more::list_rooms))
        .route("/api/rooms/{id}", get(more::get_room))
        .route("/api/rooms/{id}/join", post(more::join_room))
        .route("/api/rooms/{id}/leave", post(more::leave_room))
        .route(
            "/api/rooms/{id}/messages",
            post(more::post_message).get(more::get_messages),
        )
        .route("/api/users/{user}/state", get(seed001::user_state))
        .route("/api/notify", post(seed001::notify))
        .route("/api/push/vapid-public-key", get(seed001::vapid_public_key))
        .route(
            "/api/users/{user}/push-subscriptions",
            post(seed001::subscribe),
        )
        .route(
            "/api/users/{user}/push-subscriptions/{id}",
            axum::routing::delete(seed001::unsubscribe),
        )
        // Seed 001's routes, with its bodies.
        .route("/notify", post(seed001::notify))
        .route("/broadcast/{room_id}", post(seed001::broadcast))
        .route("/sync-state", post(seed001::sync_state))
        .route("/create-room", post(seed001::create_room))
        .route("/join-room", post(seed001::join_room))
        .route("/presence/{user_id}", get(seed001::presence))
        .route("/room/{room_id}", get(seed001::room))
        .route("/api/alerts", post(alerts::send).get(alerts::list))
        .route("/api/alerts/{id}", get(alerts::get))
        .route("/api/homes/{home}/alerts", put(alerts::accept))
        .route(
            "/api/activities",
            post(activities::start).get(activities::list),
        )
        .route("/api/activities/{id}", get(activities::get))
        .route("/api/activities/{id}/score", post(activities::score))
        .route("/api/activities/{id}/{action}", post(activities::act))
        .route("/api/playback", post(playback::start).get(playback::list))
        .route("/api/playback/{id}", get(playback::get))
        .route("/api/sessions", post(sessions::start).get(sessions::list))
        .route("/api/sessions/{id}", get(sessions::get))
        .route("/api/sessions/{id}/context", put(sessions::context))
        .route("/api/sessions/{id}/handoff", post(sessions::handoff))
        .route("/api/events", post(events::publish))
        .route("/api/events/history", get(events::history))
        .route("/api/events/dead-letters", get(events::dead_letters))
        .route("/api/events/stats", get(events::stats))
        .route("/api/lock/request", post(locks::request))
        .route("/api/lock/release", post(locks::release))
        .route("/api/locks/status", get(locks::status))
        .route("/api/locks/device/{device_name}", get(locks::device))
        .route(
            "/api/locks/arbiter",
            get(locks::arbiter).put(locks::name_arbiter),
        )
        .route("/api/health/live", get(live))
        .route("/api/health/ready", get(ready))
        .route("/api/repair", get(repair_list))
        .route("/api/repair/drop", post(repair_drop))
        .route("/api/presence", get(more::list_presence))
        .route(
            "/api/presence/{user}",
            put(more::set_presence).get(more::get_presence),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let mut metrics = Router::new().route("/metrics", get(more::metrics));
    if !state.metrics_open {
        // Metrics name peers and count traffic; a scraper sends the token like any client.
        metrics = metrics.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    }
    Router::new()
        // The dashboard: the login page without a session, its assets, and the login.
        .route("/", get(dashboard::page))
        .route("/dashboard/login.js", get(dashboard::login_js))
        .route("/dashboard/dashboard.js", get(dashboard::dashboard_js))
        .route("/dashboard/style.css", get(dashboard::style_css))
        .route("/api/login", post(dashboard::login))
        .route("/health", get(seed001::health))
        // Seed 001's WebSocket; it checks the token itself, like /api/ws.
        .route("/ws/{user_id}", get(seed001::upgrade))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        // The WebSocket checks its own token: browsers cannot set headers on an upgrade,
        // so it also takes `?token=`.
        .route("/api/ws", get(crate::ws::upgrade))
        // Seed 004's lock updates; the same token check as /api/ws.
        .route("/ws", get(locks::upgrade))
        .merge(api)
        .merge(metrics)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Inside the counter, so refused requests are counted too.
        .layer(middleware::from_fn_with_state(state.clone(), guard::check))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Counts every request by method, matched route and status. Requests are counted before
/// the token check, so every label comes from a fixed set: a method outside the API's
/// four is `OTHER`, and a path no route matched is `unmatched` (never the raw path, whose
/// ids or a stranger's junk would each make a series).
async fn count_requests(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let method = method_label(request.method());
    let route = route_label(
        request
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map(|p| p.as_str()),
    );
    let response = next.run(request).await;
    state
        .metrics
        .api_request(method, &route, response.status().as_u16());
    response
}

/// The metric label of a request method.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

/// The metric label of a matched route: one of the router's own paths, with `:id` rather
/// than axum's `{id}` (braces inside label values trip up some Prometheus text parsers).
/// No route, or a catch-all axum adds itself (its path holds a `*`), is `unmatched`.
fn route_label(matched: Option<&str>) -> String {
    match matched {
        Some(path) if !path.contains('*') => path.replace('{', ":").replace('}', ""),
        _ => "unmatched".to_string(),
    }
}

/// The bearer token, or the dashboard's session cookie (with its CSRF checks on
/// anything but a read). A request with both is judged by the header.
async fn require_token(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        if state.sessions.carried(&headers) {
            dashboard::check_cookie(&state, request.method(), &headers)?;
            return Ok(next.run(request).await);
        }
        return Err(ApiError::unauthorized(
            "missing Authorization header; send `Authorization: Bearer <token>` (see `hearth token`)",
        ));
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), state.token.as_bytes()) {
        return Err(ApiError::unauthorized(
            "wrong bearer token; use the one in the node's data dir (`hearth token`)",
        ));
    }
    Ok(next.run(request).await)
}

/// Compares without an early exit, so response timing does not leak how much of a
/// guessed token was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

async fn live() -> Json<Health> {
    Json(Health { status: "live" })
}

/// How long readiness waits for the network to answer; a probe must answer promptly.
const READY_NET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Ready means the store is not failed and answers, and the network listens on at least
/// one address.
async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    // The latch first: it is a memory read, so a failed store answers at once.
    if let hearth_storage::Health::Failed { reason } = state.store.health() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the store is failing and refuses writes until it recovers: {reason}"),
        )
        .into_response();
    }
    // The core answers a ping only if it runs and reads its queue: a dead or wedged core
    // makes the node useless even with a healthy store and network.
    let ping = tokio::time::timeout(
        READY_NET_TIMEOUT,
        state
            .core
            .call(|reply| crate::core::NodeRequest::Ping { reply }),
    )
    .await;
    match ping {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e)) | Err(e)) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the core is not answering: {e}"),
            )
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the core did not answer within {READY_NET_TIMEOUT:?}"),
            )
            .into_response();
        }
    }
    let listening = match tokio::time::timeout(READY_NET_TIMEOUT, state.net.listen_addrs()).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {READY_NET_TIMEOUT:?}")),
    };
    match listening {
        Ok(addrs) if !addrs.is_empty() => {}
        Ok(_) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the network is not listening yet",
            )
            .into_response();
        }
        Err(e) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("network is not answering: {e}"),
            )
            .into_response();
        }
    }
    match state.store.probe().await {
        Ok(_) => Json(Health { status: "ready" }).into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("store is not answering: {e}"),
        )
        .into_response(),
    }
}

/// `GET /api/status`: who this node is and how long it has run.

#[derive(Serialize)]
struct HomeInfo {
    home_id: String,
    name: String,
}

#[derive(Serialize)]
struct Status {
    version: &'static str,
    peer_id: String,
    device: String,
    home: HomeInfo,
    data_dir: PathBuf,
    api: String,
    listen: Vec<String>,
    peers: Vec<more::PeerEntry>,
    started_at: String,
    uptime_s: f64,
    store: StoreStatus,
}

/// The store's part of the status: whether it takes writes, and what was quarantined.
#[derive(Serialize)]
struct StoreStatus {
    /// `ok`, or `failed` while writes are refused.
    health: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Documents whose stored records were damaged at start (see `hearth repair`).
    quarantined: Vec<crate::core::quarantine::Quarantined>,
}

async fn status(State(state): State<Arc<ApiState>>) -> Result<Json<Status>, ApiError> {
    let started_at = state
        .started_at
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot format start time: {e}"),
            )
        })?;
    let unavailable = |e: hearth_net::Error| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("network is not answering: {e}"),
        )
    };
    let listen = state.net.listen_addrs().await.map_err(unavailable)?;
    let peers = more::peer_entries(&state).await?;
    let repair = repair_report(&state, false).await?;
    let (health, reason) = match state.store.health() {
        hearth_storage::Health::Ok => ("ok", None),
        hearth_storage::Health::Failed { reason } => ("failed", Some(reason)),
    };
    Ok(Json(Status {
        store: StoreStatus {
            health,
            reason,
            quarantined: repair.quarantined,
        },
        listen: listen.iter().map(|a| a.to_string()).collect(),
        peers,
        version: env!("CARGO_PKG_VERSION"),
        peer_id: state.peer_id.clone(),
        device: state.device_name.clone(),
        home: HomeInfo {
            home_id: state.home_id.clone(),
            name: state.home_name.clone(),
        },
        data_dir: state.data_dir.clone(),
        api: state.api_addr.to_string(),
        started_at,
        uptime_s: state.started.elapsed().as_secs_f64(),
    }))
}

/// `PUT /api/entities/{id}` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetEntityBody {
    state: String,
    #[serde(default)]
    attributes: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    correlation_id: Option<String>,
}

fn entities(state: &ApiState) -> Entities {
    Entities {
        core: state.core.clone(),
    }
}

async fn set_entity(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SetEntityBody>,
) -> Result<Json<Entity>, ApiError> {
    let write = EntityWrite {
        state: body.state,
        attributes: body.attributes,
        correlation_id: body.correlation_id,
    };
    Ok(Json(entities(&state).set(&id, write).await?))
}

async fn get_entity(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<Entity>, ApiError> {
    match entities(&state).get(&id).await? {
        Some(e) => Ok(Json(e)),
        None => Err(ApiError::not_found(format!("no entity {id:?}"))),
    }
}

#[derive(Serialize)]
struct EntityList {
    entities: Vec<Entity>,
}

async fn list_entities(State(state): State<Arc<ApiState>>) -> Result<Json<EntityList>, ApiError> {
    Ok(Json(EntityList {
        entities: entities(&state).list().await?,
    }))
}

/// `POST /api/invites` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteBody {
    kind: InviteKindBody,
    #[serde(default)]
    ttl_s: Option<u64>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum InviteKindBody {
    Device,
    Home,
}

#[derive(Serialize)]
struct InviteReply {
    code: String,
    expires_at: String,
}

async fn create_invite(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<InviteBody>,
) -> Result<Json<InviteReply>, ApiError> {
    let ttl_s = body.ttl_s.unwrap_or(crate::DEFAULT_INVITE_TTL_S);
    let invite = state
        .core
        .call(
            |reply| crate::pairing::service::PairingRequest::CreateInvite {
                home: body.kind == InviteKindBody::Home,
                ttl_s,
                reply,
            },
        )
        .await??;
    Ok(Json(InviteReply {
        code: invite.code,
        expires_at: crate::core::rfc3339_ms(invite.expires_at_s.saturating_mul(1000)).to_string(),
    }))
}

async fn repair_report(
    state: &ApiState,
    drop: bool,
) -> Result<crate::core::quarantine::RepairReport, ApiError> {
    Ok(state
        .core
        .call(|reply| crate::core::NodeRequest::Repair { drop, reply })
        .await??)
}

/// `GET /api/repair`: documents quarantined at start because a stored record was damaged.
async fn repair_list(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<crate::core::quarantine::RepairReport>, ApiError> {
    Ok(Json(repair_report(&state, false).await?))
}

/// `POST /api/repair/drop`: deletes the damaged records of every quarantined document.
async fn repair_drop(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<crate::core::quarantine::RepairReport>, ApiError> {
    Ok(Json(repair_report(&state, true).await?))
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_fixed_sets() {
        use axum::http::Method;
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::DELETE), "DELETE");
        assert_eq!(method_label(&Method::HEAD), "OTHER");
        let junk = Method::from_bytes(&[b'X'; 6000]).unwrap();
        assert_eq!(method_label(&junk), "OTHER");
        assert_eq!(route_label(Some("/api/entities/{id}")), "/api/entities/:id");
        assert_eq!(route_label(None), "unmatched");
        assert_eq!(
            route_label(Some("/{*__private__axum_fallback}")),
            "unmatched"
        );
    }

    #[test]
    fn not_ready_is_unavailable_not_internal() {
        let e = ApiError::from(crate::Error::Unavailable(
            "the home document cannot be read yet".into(),
        ));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            e.kind_and_detail(),
            ("unavailable", "the home document cannot be read yet")
        );
    }

    #[test]
    fn token_comparison_needs_every_byte() {
        assert!(constant_time_eq(b"abcd", b"abcd"));
        assert!(!constant_time_eq(b"abcd", b"abce"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
