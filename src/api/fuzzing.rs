//! The API's decoders on arbitrary bytes, for the fuzz targets (feature `fuzzing`):
//! every request body through the extractor its handler uses, every query through
//! [`ApiQuery`], the WebSocket client frames and seed 001's frames.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use super::more::{ApiQuery, OptionalJson};
use super::{ApiJson, activities, alerts, dashboard, events, locks, more, playback, seed001};
use super::{InviteBody, SetEntityBody, sessions, share};

fn request(uri: &str, bytes: &[u8]) -> Option<Request> {
    Request::builder()
        .method("POST")
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes.to_vec()))
        .ok()
}

/// A body through [`ApiJson`], as a handler receives it.
fn body<T: DeserializeOwned + Send + 'static>(bytes: &[u8]) -> Option<T> {
    let req = request("/", bytes)?;
    futures::executor::block_on(ApiJson::<T>::from_request(req, &()))
        .ok()
        .map(|ApiJson(v)| v)
}

/// A body through [`OptionalJson`] (an empty body is the default).
fn optional<T: DeserializeOwned + Default + Send + 'static>(bytes: &[u8]) {
    if let Some(req) = request("/", bytes) {
        let _ = futures::executor::block_on(OptionalJson::<T>::from_request(req, &()));
    }
}

/// A query string through [`ApiQuery`].
fn query<T: DeserializeOwned + Send + 'static>(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Some(req) = request(&format!("/?{text}"), &[]) else {
        return;
    };
    let (mut parts, _) = req.into_parts();
    let _ = futures::executor::block_on(ApiQuery::<T>::from_request_parts(&mut parts, &()));
}

/// Runs the decoder `kind` picks on `bytes`.
pub(crate) fn decode(kind: u8, bytes: &[u8]) {
    match kind % 32 {
        0 => drop(body::<SetEntityBody>(bytes)),
        1 => drop(body::<InviteBody>(bytes)),
        2 => drop(body::<sessions::StartBody>(bytes)),
        3 => drop(body::<sessions::ContextBody>(bytes)),
        4 => drop(body::<sessions::HandoffBody>(bytes)),
        5 => drop(body::<more::RestoreBody>(bytes)),
        6 => drop(body::<more::CreateRoomBody>(bytes)),
        7 => optional::<more::UserBody>(bytes),
        8 => drop(body::<more::MessageBody>(bytes)),
        9 => drop(body::<more::PresenceBody>(bytes)),
        10 => drop(body::<events::PublishBody>(bytes)),
        11 => drop(body::<alerts::AlertBody>(bytes)),
        12 => drop(body::<alerts::AcceptBody>(bytes)),
        13 => drop(body::<locks::RequestBody>(bytes)),
        14 => drop(body::<locks::ReleaseBody>(bytes)),
        15 => drop(body::<locks::NameArbiterBody>(bytes)),
        16 => drop(body::<dashboard::LoginBody>(bytes)),
        17 => drop(body::<playback::StartBody>(bytes)),
        18 => drop(body::<activities::StartBody>(bytes)),
        19 => drop(body::<activities::ScoreBody>(bytes)),
        20 => drop(body::<share::PairBody>(bytes)),
        21 => drop(body::<share::ShareBody>(bytes)),
        22 => drop(body::<share::PolicyBody>(bytes)),
        23 => drop(body::<share::ResolveBody>(bytes)),
        24 => drop(body::<seed001::NotifyBody>(bytes)),
        25 => drop(body::<seed001::BroadcastBody>(bytes)),
        26 => drop(body::<seed001::SyncStateBody>(bytes)),
        27 => drop(body::<seed001::CreateRoomBody>(bytes)),
        28 => drop(body::<seed001::JoinRoomBody>(bytes)),
        29 => {
            query::<more::LimitQuery>(bytes);
            query::<more::RoomQuery>(bytes);
            query::<events::HistoryQuery>(bytes);
            query::<events::DeadQuery>(bytes);
            query::<share::AuditQuery>(bytes);
        }
        30 => crate::ws::decode_for_fuzzing(&String::from_utf8_lossy(bytes)),
        _ => seed001::decode_for_fuzzing(&String::from_utf8_lossy(bytes)),
    }
}

/// Valid inputs for some kinds, and an empty object for every body, for the seed corpus.
pub(crate) fn seeds() -> Vec<(u8, String, String)> {
    let mut out: Vec<(u8, String, String)> = (0..29)
        .map(|kind| (kind, format!("empty-{kind:02}"), "{}".to_string()))
        .collect();
    let valid = [
        (
            0,
            "set-entity",
            r#"{"state":"on","attributes":{"brightness":80},"correlation_id":"c1"}"#,
        ),
        (1, "invite", r#"{"kind":"device","ttl_s":600}"#),
        (
            6,
            "create-room",
            r#"{"name":"kitchen","max_size":8,"user":"ana"}"#,
        ),
        (8, "message", r#"{"message":"dinner","user":"ana"}"#),
        (9, "presence", r#"{"status":"away","note":"out"}"#),
        (
            10,
            "publish",
            r#"{"event_type":"doorbell.pressed","target_device_ids":["*"],"payload":{"door":"front"}}"#,
        ),
        (
            11,
            "alert",
            r#"{"message":"smoke","severity":"critical","ttl_s":60}"#,
        ),
        (12, "accept", r#"{"accept":true}"#),
        (
            13,
            "lock-request",
            r#"{"device_name":"hall","lock_type":"exclusive","user_id":"ana","timeout":5.0}"#,
        ),
        (
            14,
            "lock-release",
            r#"{"device_name":"hall","lock_key":"k","user_id":"ana"}"#,
        ),
        (15, "name-arbiter", r#"{"device":"hall","force":false}"#),
        (16, "login", r#"{"token":"abc"}"#),
        (19, "score", r#"{"device":"hall","delta":3}"#),
        (29, "query", "limit=10&pattern=light.*&room=r1"),
        (
            30,
            "ws-subscribe",
            r#"{"type":"subscribe","data":{"patterns":["light.*"]}}"#,
        ),
        (
            30,
            "ws-sync-state",
            r#"{"type":"sync_state","data":{"entity_id":"light.hall","state":"on","attributes":{"b":1}}}"#,
        ),
        (
            30,
            "ws-presence",
            r#"{"type":"presence","data":{"user":"ana","status":"home"}}"#,
        ),
        (
            31,
            "seed-sync-state",
            r#"{"type":"sync_state","data":{"state":{"light":"on"}}}"#,
        ),
        (31, "seed-heartbeat", r#"{"type":"heartbeat"}"#),
    ];
    out.extend(
        valid
            .into_iter()
            .map(|(kind, name, json)| (kind, name.to_string(), json.to_string())),
    );
    out
}
