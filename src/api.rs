//! The local HTTP API: health probes without a token, everything under `/api` behind the
//! bearer token. Error bodies are `{"error": kind, "detail": sentence}` throughout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use time::OffsetDateTime;

/// What the handlers can see of the node.
pub(crate) struct ApiState {
    pub(crate) token: String,
    pub(crate) peer_id: String,
    pub(crate) device_name: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) api_addr: SocketAddr,
    pub(crate) started: Instant,
    pub(crate) started_at: OffsetDateTime,
    pub(crate) store: hearth_storage::StoreHandle,
}

/// An API error: a kind from INTERFACES.md's table and a human sentence.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            detail: detail.into(),
        }
    }

    fn unauthorized(detail: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    fn not_found(detail: String) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.kind, "detail": self.detail });
        (self.status, Json(body)).into_response()
    }
}

/// Builds the router. The `/api` routes sit behind the token check; health probes do not,
/// so supervisors can poll them without credentials.
pub(crate) fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route("/api/status", get(status))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .merge(api)
        .fallback(not_found)
        .with_state(state)
}

async fn require_token(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
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
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

async fn live() -> Json<Health> {
    Json(Health { status: "live" })
}

/// Ready means the store answers. Until networking exists there is nothing else to wait
/// for; the network's listening state joins this check when it lands.
async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    match state
        .store
        .get(
            hearth_storage::Keyspace::Meta,
            crate::node::IDENTITY_KEY.to_vec(),
        )
        .await
    {
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
struct Status {
    version: &'static str,
    peer_id: String,
    device: String,
    data_dir: PathBuf,
    api: String,
    started_at: String,
    uptime_s: f64,
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
    Ok(Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        peer_id: state.peer_id.clone(),
        device: state.device_name.clone(),
        data_dir: state.data_dir.clone(),
        api: state.api_addr.to_string(),
        started_at,
        uptime_s: state.started.elapsed().as_secs_f64(),
    }))
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
    fn token_comparison_needs_every_byte() {
        assert!(constant_time_eq(b"abcd", b"abcd"));
        assert!(!constant_time_eq(b"abcd", b"abce"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
