//! Emergency alerts over HTTP: `POST /api/alerts` raises one, `GET /api/alerts` lists
//! what this device sent or received (newest first), `GET /api/alerts/{id}` shows one
//! with each target's receipt, and `PUT /api/homes/{home}/alerts` opts this home in to
//! (or out of) a paired home's alerts.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiJson, ApiState};
use crate::alerts::{AlertAcceptance, AlertRecord, Alerts, DEFAULT_ALERT_TTL_S, NewAlert};

/// `POST /api/alerts`: `{message, severity?, ttl_s?}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AlertBody {
    message: String,
    /// `info`, `warning` (the default) or `critical`; read as text so a wrong name gets
    /// a sentence naming the right ones.
    #[serde(default)]
    severity: Option<String>,
    #[serde(default)]
    ttl_s: Option<u64>,
}

/// `PUT /api/homes/{home}/alerts`: `{accept}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AcceptBody {
    accept: bool,
}

/// `GET /api/alerts`.
#[derive(Serialize)]
pub(super) struct AlertList {
    alerts: Vec<AlertRecord>,
}

fn alerts(state: &ApiState) -> Alerts {
    Alerts {
        core: state.core.clone(),
    }
}

/// `POST /api/alerts`.
pub(super) async fn send(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<AlertBody>,
) -> Result<Json<AlertRecord>, ApiError> {
    let severity = match body.severity.as_deref() {
        Some(s) => s.parse()?,
        None => Default::default(),
    };
    let alert = NewAlert {
        message: body.message,
        severity,
        ttl_s: body.ttl_s.unwrap_or(DEFAULT_ALERT_TTL_S),
    };
    Ok(Json(alerts(&state).send(alert).await?))
}

/// `GET /api/alerts`.
pub(super) async fn list(State(state): State<Arc<ApiState>>) -> Result<Json<AlertList>, ApiError> {
    Ok(Json(AlertList {
        alerts: alerts(&state).list().await?,
    }))
}

/// `GET /api/alerts/{id}`.
pub(super) async fn get(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<AlertRecord>, ApiError> {
    Ok(Json(alerts(&state).get(&id).await?))
}

/// `PUT /api/homes/{home}/alerts`.
pub(super) async fn accept(
    State(state): State<Arc<ApiState>>,
    Path(home): Path<String>,
    ApiJson(body): ApiJson<AcceptBody>,
) -> Result<Json<AlertAcceptance>, ApiError> {
    Ok(Json(alerts(&state).accept_from(&home, body.accept).await?))
}
