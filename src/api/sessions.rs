//! Sessions over HTTP: `POST /api/sessions` starts one on this device, `GET
//! /api/sessions[/{id}]` reads them, `PUT /api/sessions/{id}/context` saves a context
//! snapshot, and `POST /api/sessions/{id}/handoff` hands one to another device, answering
//! once it completed or rolled back.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ApiError, ApiJson, ApiState};
use crate::sessions::{HandoffReport, NewSession, Session, Sessions};

/// `POST /api/sessions`: `{user, persona?, context?}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StartBody {
    user: String,
    #[serde(default)]
    persona: Option<String>,
    #[serde(default)]
    context: Map<String, Value>,
}

/// `PUT /api/sessions/{id}/context`: `{context}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ContextBody {
    context: Map<String, Value>,
}

/// `POST /api/sessions/{id}/handoff`: `{to_device}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HandoffBody {
    to_device: String,
}

/// `GET /api/sessions`.
#[derive(Serialize)]
pub(super) struct SessionList {
    sessions: Vec<Session>,
}

fn sessions(state: &ApiState) -> Sessions {
    Sessions {
        core: state.core.clone(),
    }
}

/// `POST /api/sessions`.
pub(super) async fn start(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<StartBody>,
) -> Result<Json<Session>, ApiError> {
    let new = NewSession {
        user: body.user,
        persona: body.persona,
        context: body.context,
    };
    Ok(Json(sessions(&state).start(new).await?))
}

/// `GET /api/sessions`.
pub(super) async fn list(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<SessionList>, ApiError> {
    Ok(Json(SessionList {
        sessions: sessions(&state).list().await?,
    }))
}

/// `GET /api/sessions/{id}`.
pub(super) async fn get(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(sessions(&state).get(&id).await?))
}

/// `PUT /api/sessions/{id}/context`.
pub(super) async fn context(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ContextBody>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(sessions(&state).set_context(&id, body.context).await?))
}

/// `POST /api/sessions/{id}/handoff`.
pub(super) async fn handoff(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<HandoffBody>,
) -> Result<Json<HandoffReport>, ApiError> {
    Ok(Json(sessions(&state).handoff(&id, &body.to_device).await?))
}
