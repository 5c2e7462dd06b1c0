//! Synchronised playback over HTTP: `POST /api/playback` starts one (`{media, start_at,
//! device_ids}`, `start_at` in ms since the Unix epoch by this device's clock, or RFC
//! 3339), `GET /api/playback` lists the ones started or received here, and `GET
//! /api/playback/{id}` shows one with each device's local start, the offset it used and
//! its uncertainty. The clock estimates themselves are in `GET /api/peers`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ApiError, ApiJson, ApiState};
use crate::playback::{NewPlayback, Playback, PlaybackSchedule};

/// `POST /api/playback`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StartBody {
    media: String,
    /// Ms since the Unix epoch (a whole number), or an RFC 3339 string.
    start_at: Value,
    #[serde(default)]
    device_ids: Vec<String>,
}

/// `GET /api/playback`.
#[derive(Serialize)]
pub(super) struct PlaybackList {
    playbacks: Vec<PlaybackSchedule>,
}

fn playback(state: &ApiState) -> Playback {
    Playback {
        core: state.core.clone(),
    }
}

/// `start_at` as ms since the Unix epoch.
fn start_at(value: &Value) -> Result<u64, ApiError> {
    match value {
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            ApiError::bad_request(format!(
                "start_at {n} is not a whole number of ms since the Unix epoch"
            ))
        }),
        Value::String(text) => Ok(text.parse::<crate::Timestamp>()?.unix_ms()),
        _ => Err(ApiError::bad_request(
            "start_at is ms since the Unix epoch (a number) or an RFC 3339 string",
        )),
    }
}

/// `POST /api/playback`.
pub(super) async fn start(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<StartBody>,
) -> Result<Json<PlaybackSchedule>, ApiError> {
    let new = NewPlayback {
        media: body.media,
        start_at: start_at(&body.start_at)?,
        device_ids: body.device_ids,
    };
    Ok(Json(playback(&state).start(new).await?))
}

/// `GET /api/playback`.
pub(super) async fn list(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<PlaybackList>, ApiError> {
    Ok(Json(PlaybackList {
        playbacks: playback(&state).list().await?,
    }))
}

/// `GET /api/playback/{id}`.
pub(super) async fn get(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<PlaybackSchedule>, ApiError> {
    Ok(Json(playback(&state).get(&id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_at_is_ms_or_rfc_3339() {
        assert_eq!(
            start_at(&serde_json::json!(1_767_323_045_123u64)).unwrap(),
            1_767_323_045_123
        );
        assert_eq!(
            start_at(&serde_json::json!("2026-01-02T03:04:05.123Z")).unwrap(),
            1_767_323_045_123
        );
        for bad in [
            serde_json::json!(-5),
            serde_json::json!(1.5),
            serde_json::json!("tomorrow"),
            serde_json::json!(null),
            serde_json::json!([1]),
        ] {
            assert!(start_at(&bad).is_err(), "{bad}");
        }
    }
}
