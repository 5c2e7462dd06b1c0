//! Device locks through seed 004's protocol, as its client speaks it: the REST routes
//! with the seed's bodies and `/ws` with the seed's messages; and a device that is not
//! the arbiter refuses with `arbiter_unreachable`, granting nothing.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::util::http_send;
use crate::ws::{join_and_start, start, token};

const T: Duration = Duration::from_secs(30);

fn post(api: &str, token: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = http_send(api, "POST", path, Some(token), &body.to_string());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get(api: &str, token: &str, path: &str) -> (u16, Value) {
    let (status, text) = crate::util::http_get(api, path, Some(token));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Socket) -> Value {
    loop {
        match timeout(T, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_004_client_locks_releases_and_watches() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), "arbiter").await;
    let api = node.api_addr().unwrap().to_string();
    let tok = token(&node);

    // The seed's WebSocket first: initial_status on connect.
    let mut request = format!("ws://{api}/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {tok}").parse().unwrap());
    let (mut ws, _) = timeout(T, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .unwrap();
    let first = next_json(&mut ws).await;
    assert_eq!(first["type"], "initial_status", "{first}");
    assert_eq!(first["data"]["total_count"], 0);
    ws.send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .unwrap();
    let pong = next_json(&mut ws).await;
    assert_eq!(pong["type"], "pong");
    assert!(pong["timestamp"].is_string());

    // A lock by type name; the key goes to the requester only.
    let (status, granted) = post(
        &api,
        &tok,
        "/api/lock/request",
        json!({"device_name": "detector1", "lock_type": "MANUAL_OPERATOR",
               "user_id": "operator123", "timeout": 300, "reason": "Calibration"}),
    );
    assert_eq!(status, 200, "{granted}");
    assert_eq!(granted["success"], true);
    let key = granted["lock_key"].as_str().unwrap().to_string();
    let lock = &granted["lock"];
    for field in [
        "device_name",
        "lock_type",
        "priority",
        "user_id",
        "reason",
        "plan_uid",
        "fencing_token",
        "acquired_at",
        "expires_at",
    ] {
        assert!(lock.get(field).is_some(), "{field} missing from {lock}");
    }
    assert_eq!(lock["lock_type"], "MANUAL_OPERATOR");
    assert_eq!(lock["priority"], 2);
    assert!(lock.get("lock_key").is_none());
    let update = next_json(&mut ws).await;
    assert_eq!(update["type"], "lock_update", "{update}");
    assert_eq!(update["action"], "acquired");
    assert_eq!(update["device_name"], "detector1");
    assert!(update["lock"].get("lock_key").is_none());

    // A lower priority (by number) is refused with the holder's lock, as 200.
    let (status, refused) = post(
        &api,
        &tok,
        "/api/lock/request",
        json!({"device_name": "detector1", "lock_type": 3, "user_id": "queue"}),
    );
    assert_eq!(status, 200);
    assert_eq!(refused["success"], false);
    assert_eq!(refused["lock"]["user_id"], "operator123");
    assert!(refused["message"].is_string());

    // Reads: the table and one device, never with the key.
    let (_, table) = get(&api, &tok, "/api/locks/status");
    assert_eq!(table["total_count"], 1);
    assert!(!table.to_string().contains(&key));
    let (_, device) = get(&api, &tok, "/api/locks/device/detector1");
    assert_eq!(device["locked"], true);
    let (_, free) = get(&api, &tok, "/api/locks/device/motor1");
    assert_eq!(
        free,
        json!({"device_name": "motor1", "locked": false, "lock": null})
    );

    // A wrong key is refused; the right one releases.
    let (status, wrong) = post(
        &api,
        &tok,
        "/api/lock/release",
        json!({"device_name": "detector1", "lock_key": "nope", "user_id": "operator123"}),
    );
    assert_eq!(status, 403, "{wrong}");
    assert_eq!(wrong["success"], false);
    let (status, released) = post(
        &api,
        &tok,
        "/api/lock/release",
        json!({"device_name": "detector1", "lock_key": key, "user_id": "operator123"}),
    );
    assert_eq!(status, 200, "{released}");
    assert_eq!(released["success"], true);
    let update = next_json(&mut ws).await;
    assert_eq!(update["action"], "released");

    ws.send(Message::Text(
        json!({"type": "get_status"}).to_string().into(),
    ))
    .await
    .unwrap();
    let again = next_json(&mut ws).await;
    assert_eq!(again["type"], "initial_status");
    assert_eq!(again["data"]["total_count"], 0);

    // Bad input is a clear 400 in the seed's error shape.
    let (status, bad) = post(
        &api,
        &tok,
        "/api/lock/request",
        json!({"device_name": "x", "lock_type": "SUPREME", "user_id": "u"}),
    );
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["success"], false);
    // The seed's health routes, behind the token.
    let (status, _) = get(&api, &tok, "/api/health/live");
    assert_eq!(status, 200);
    let (status, _) = crate::util::http_get(&api, "/api/health/ready", None);
    assert_eq!(status, 401);
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_is_not_the_arbiter_grants_nothing() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let admin = start(dirs[0].path(), "admin").await;
    let other = join_and_start(&admin, dirs[1].path(), "other").await;
    let api = other.api_addr().unwrap().to_string();
    let (status, body) = post(
        &api,
        &token(&other),
        "/api/lock/request",
        json!({"device_name": "detector1", "lock_type": "MAINTENANCE", "user_id": "tech"}),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["success"], false);
    assert_eq!(body["error"], "arbiter_unreachable");
    assert!(body["message"].is_string());
    // The library says the same.
    let refused = other
        .locks()
        .request(hearth::LockAsk::new(
            "detector1",
            hearth::LockType::Maintenance,
            "tech",
        ))
        .await;
    assert!(matches!(refused, Err(hearth::Error::ArbiterUnreachable(_))));
    assert!(admin.locks().status().await.unwrap().is_empty());
    timeout(T, other.shutdown()).await.unwrap().unwrap();
    timeout(T, admin.shutdown()).await.unwrap().unwrap();
}
