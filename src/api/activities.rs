//! Group activities over HTTP: `POST /api/activities` starts one run by this device,
//! `GET /api/activities[/{id}]` reads them, `POST /api/activities/{id}/pause|resume|step|end`
//! moves one this device runs, and `POST /api/activities/{id}/score` adds to a device's
//! score from any device of the home.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ApiError, ApiJson, ApiState};
use crate::activities::{Activities, Activity, ActivityAction, NewActivity};

/// `POST /api/activities`: `{type, device_ids, config?, room_id?}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StartBody {
    #[serde(rename = "type")]
    kind: String,
    device_ids: Vec<String>,
    #[serde(default)]
    config: Map<String, Value>,
    #[serde(default)]
    room_id: Option<String>,
}

/// `POST /api/activities/{id}/score`: `{device, delta}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScoreBody {
    device: String,
    delta: i64,
}

/// `GET /api/activities`.
#[derive(Serialize)]
pub(super) struct ActivityList {
    activities: Vec<Activity>,
}

fn activities(state: &ApiState) -> Activities {
    Activities {
        core: state.core.clone(),
    }
}

/// `POST /api/activities`.
pub(super) async fn start(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<StartBody>,
) -> Result<Json<Activity>, ApiError> {
    let new = NewActivity {
        kind: body.kind,
        device_ids: body.device_ids,
        config: body.config,
        room_id: body.room_id,
    };
    Ok(Json(activities(&state).start(new).await?))
}

/// `GET /api/activities`.
pub(super) async fn list(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<ActivityList>, ApiError> {
    Ok(Json(ActivityList {
        activities: activities(&state).list().await?,
    }))
}

/// `GET /api/activities/{id}`.
pub(super) async fn get(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<Activity>, ApiError> {
    Ok(Json(activities(&state).get(&id).await?))
}

/// `POST /api/activities/{id}/{action}`: pause, resume, step or end (no body).
pub(super) async fn act(
    State(state): State<Arc<ApiState>>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Activity>, ApiError> {
    let action = match action.as_str() {
        "pause" => ActivityAction::Pause,
        "resume" => ActivityAction::Resume,
        "step" => ActivityAction::Step,
        "end" => ActivityAction::End,
        other => {
            return Err(ApiError::from(crate::Error::NotFound(format!(
                "no activity action {:?}: use pause, resume, step, end or score",
                other.chars().take(32).collect::<String>()
            ))));
        }
    };
    Ok(Json(activities(&state).act(&id, action).await?))
}

/// `POST /api/activities/{id}/score`.
pub(super) async fn score(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ScoreBody>,
) -> Result<Json<Activity>, ApiError> {
    Ok(Json(
        activities(&state)
            .score(&id, &body.device, body.delta)
            .await?,
    ))
}
