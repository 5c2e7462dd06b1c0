//! Events across devices and the bus of seed 003 over HTTP: `POST /api/events` publishes
//! an event for the home's devices; `GET /api/events/history`, `/dead-letters` and
//! `/stats` read the node's bus.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::more::ApiQuery;
use super::{ApiError, ApiJson, ApiState};
use crate::bus::{DEAD_LETTER_CAPACITY, HISTORY_CAPACITY, Pattern};
use crate::propagation::service::PropagationRequest;
use crate::propagation::{Publish, PublishReport};

/// Entries a history or dead-letter listing returns unless `limit` says otherwise.
const DEFAULT_LISTING: usize = 100;

/// `POST /api/events` and the WebSocket's `publish`: seed 000's event, less what the
/// node fills in (its source and time).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishBody {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    target_device_ids: Option<Vec<String>>,
    payload: Value,
    #[serde(default)]
    correlation_id: Option<String>,
}

impl PublishBody {
    fn into_publish(self) -> Result<Publish, ApiError> {
        Ok(Publish {
            event_type: self.event_type,
            target_device_ids: self.target_device_ids.unwrap_or_default(),
            payload: payload_object(self.payload)?,
            correlation_id: self.correlation_id,
        })
    }
}

/// A payload must be a JSON object, as the seed's `dict`.
fn payload_object(value: Value) -> Result<Map<String, Value>, ApiError> {
    let kind = match value {
        Value::Object(map) => return Ok(map),
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
    };
    Err(ApiError::bad_request(format!(
        "payload must be a JSON object, not {kind}"
    )))
}

/// Publishes through the core, as `Events::publish` does.
pub(crate) async fn publish_body(
    state: &ApiState,
    body: PublishBody,
) -> Result<PublishReport, ApiError> {
    let event = body.into_publish()?;
    Ok(state
        .core
        .call(|reply| PropagationRequest::Publish { event, reply })
        .await??)
}

pub(super) async fn publish(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<PublishBody>,
) -> Result<Json<PublishReport>, ApiError> {
    Ok(Json(publish_body(&state, body).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

fn limit(asked: Option<usize>, max: usize) -> Result<usize, ApiError> {
    let limit = asked.unwrap_or(DEFAULT_LISTING.min(max));
    if !(1..=max).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit {limit} is out of range; use 1 to {max}"
        )));
    }
    Ok(limit)
}

/// `GET /api/events/history?pattern=&limit=`: the bus's recent events whose names match
/// (every event without a pattern), oldest first.
pub(super) async fn history(
    State(state): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    let pattern = match q.pattern.as_deref() {
        None | Some("") => Pattern::all(),
        Some(p) => Pattern::parse(p)?,
    };
    let events = state
        .bus
        .history(&pattern, limit(q.limit, HISTORY_CAPACITY)?);
    Ok(Json(
        json!({ "events": events, "count": events.len(), "capacity": HISTORY_CAPACITY }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeadQuery {
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /api/events/dead-letters?limit=`: failed deliveries, oldest first (the most recent
/// `limit`).
pub(super) async fn dead_letters(
    State(state): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<DeadQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = limit(q.limit, DEAD_LETTER_CAPACITY)?;
    let mut dead = state.bus.dead_letters();
    let skip = dead.len().saturating_sub(limit);
    dead.drain(..skip);
    Ok(Json(json!({
        "dead_letters": dead,
        "count": dead.len(),
        "capacity": DEAD_LETTER_CAPACITY,
    })))
}

/// `GET /api/events/stats`: the bus's counters, per event name and per handler (times in
/// seconds), and the counters of events between devices.
pub(super) async fn stats(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let stats = state.bus.stats();
    let devices = state
        .core
        .call(|reply| PropagationRequest::Counters { reply })
        .await??;
    let by_name: Map<String, Value> = stats
        .by_name
        .iter()
        .map(|(name, s)| {
            let value = json!({
                "published": s.published,
                "delivered": s.delivered,
                "handler_errors": s.handler_errors,
                "handler_panics": s.handler_panics,
                "handler_time_s": s.handler_time.as_secs_f64(),
                "handler_time_max_s": s.handler_time_max.as_secs_f64(),
            });
            (name.clone(), value)
        })
        .collect();
    let handlers: Vec<Value> = stats
        .handlers
        .iter()
        .map(|h| {
            json!({
                "subscription": h.subscription.0,
                "handler": h.label.clone().unwrap_or_else(|| h.subscription.to_string()),
                "priority": h.priority,
                "calls": h.calls,
                "errors": h.errors,
                "panics": h.panics,
                "total_time_s": h.total_time.as_secs_f64(),
                "average_time_s": h.average_time().as_secs_f64(),
                "max_time_s": h.max_time.as_secs_f64(),
            })
        })
        .collect();
    Ok(Json(json!({
        "published": stats.published,
        "dropped_by_middleware": stats.dropped_by_middleware,
        "refused": stats.refused,
        "streams_overflowed": stats.streams_overflowed,
        "subscriptions": stats.subscriptions,
        "dead_letters": state.bus.dead_letters().len(),
        "by_name": by_name,
        "handlers": handlers,
        "devices": devices,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_must_be_an_object() {
        assert!(payload_object(json!({"a": 1})).is_ok());
        for bad in [json!([1]), json!("s"), json!(null), json!(3)] {
            let e = payload_object(bad).unwrap_err();
            assert_eq!(e.kind, "bad_request");
            assert!(e.detail.contains("JSON object"), "{}", e.detail);
        }
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(limit(None, 1024).unwrap(), DEFAULT_LISTING);
        assert_eq!(limit(Some(5), 1024).unwrap(), 5);
        assert!(limit(Some(0), 1024).is_err());
        assert!(limit(Some(1025), 1024).is_err());
    }
}
