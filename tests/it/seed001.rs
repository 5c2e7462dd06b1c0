//! Seed 001's protocol, as its clients speak it, across two devices of one home: the
//! WebSocket `/ws/{user_id}?device_id=` with the seed's messages, its REST routes, a
//! user's state following them across devices, chat to every member's sockets,
//! notifications (live and kept for a client that is away), the cap on a user's
//! devices and the session TTL, and the seed's metrics.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::util::http_send;
use crate::ws::token;

const T: Duration = Duration::from_secs(30);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn post(api: &str, token: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = http_send(api, "POST", path, Some(token), &body.to_string());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get(api: &str, token: Option<&str>, path: &str) -> (u16, String) {
    crate::util::http_get(api, path, token)
}

fn get_json(api: &str, token: &str, path: &str) -> Value {
    let (status, text) = get(api, Some(token), path);
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

async fn connect(api: &str, token: &str, user: &str, client: &str) -> Socket {
    let url = format!("ws://{api}/ws/{user}?device_id={client}&token={token}");
    let (ws, _) = timeout(
        T,
        tokio_tungstenite::connect_async(url.into_client_request().unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    ws
}

/// The next text frame.
async fn next(ws: &mut Socket) -> Value {
    loop {
        match timeout(T, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The next frame of `kind`, skipping others.
async fn next_of(ws: &mut Socket, kind: &str) -> Value {
    loop {
        let frame = next(ws).await;
        if frame["type"] == kind {
            return frame;
        }
    }
}

async fn send(ws: &mut Socket, kind: &str, data: Value) {
    ws.send(Message::Text(
        json!({ "type": kind, "data": data }).to_string().into(),
    ))
    .await
    .unwrap();
}

/// Starts a node whose client sessions expire after `ttl`.
async fn start_with_ttl(dir: &std::path::Path, name: &str, ttl: Duration) -> hearth::Node {
    let mut config = crate::ws::config(dir, name);
    config.users.session_ttl = ttl;
    timeout(T, hearth::Node::start(config))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_001_client_works_across_two_devices_of_a_home() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ttl = Duration::from_secs(2);
    let a = start_with_ttl(dirs[0].path(), "a", ttl).await;
    let invite = timeout(T, a.invite(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    let mut b_config = crate::ws::config(dirs[1].path(), "b");
    b_config.users.session_ttl = ttl;
    timeout(T, hearth::Node::join(&invite.code, &b_config))
        .await
        .unwrap()
        .unwrap();
    let b = start_with_ttl(dirs[1].path(), "b", ttl).await;
    crate::ws::wait_admitted(&a, b.peer_id().as_str()).await;
    let (api_a, tok_a) = (a.api_addr().unwrap().to_string(), token(&a));
    let (api_b, tok_b) = (b.api_addr().unwrap().to_string(), token(&b));
    // The users document comes from the admin device.
    let deadline = tokio::time::Instant::now() + T;
    while b.users().state("ann").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "users document never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Health without the token; everything else needs it.
    let (status, body) = get(&api_a, None, "/health");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "healthy"
    );
    assert_eq!(get(&api_a, None, "/presence/ann").0, 401);

    let mut web = connect(&api_a, &tok_a, "ann", "web1").await;
    let connected = next(&mut web).await;
    assert_eq!(connected["type"], "connected", "{connected}");
    assert_eq!(connected["data"]["device_id"], "web1");
    assert!(connected["data"]["session_id"].is_string());
    assert!(
        connected["timestamp"].is_f64(),
        "top-level float seconds: {connected}"
    );
    let mut phone = connect(&api_b, &tok_b, "ann", "phone1").await;
    assert_eq!(next(&mut phone).await["type"], "connected");
    let mut bob = connect(&api_b, &tok_b, "bob", "tab").await;
    assert_eq!(next(&mut bob).await["type"], "connected");

    // State follows the user to their other device; the writer gets nothing back.
    send(
        &mut web,
        "sync_state",
        json!({"state": {"progress": 0.75, "current_lesson": "lesson_5"}}),
    )
    .await;
    let update = next_of(&mut phone, "state_update").await;
    assert_eq!(update["data"]["state"]["progress"], 0.75, "{update}");
    assert_eq!(update["data"]["source_device"], "web1");
    assert!(update["data"]["timestamp"].is_f64());
    send(&mut web, "heartbeat", json!({})).await;
    let after = next(&mut web).await;
    assert_eq!(
        after["type"], "heartbeat_ack",
        "no state_update for the writer: {after}"
    );
    let (status, body) = post(
        &api_b,
        &tok_b,
        "/sync-state",
        json!({"user_id": "ann", "device_id": "phone1", "state": {"progress": 0.8}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"success": true, "user_id": "ann", "device_id": "phone1"})
    );
    let update = next_of(&mut web, "state_update").await;
    assert_eq!(update["data"]["state"], json!({"progress": 0.8}));
    assert_eq!(update["data"]["source_device"], "phone1");
    let state = get_json(&api_a, &tok_a, "/api/users/ann/state");
    assert_eq!(state["state"]["progress"], 0.8);
    assert_eq!(state["state"]["current_lesson"], "lesson_5");

    // Rooms: the creator is a member; chat reaches every member's sockets on both devices.
    let (status, created) = post(
        &api_a,
        &tok_a,
        "/create-room",
        json!({"room_name": "Math Study Group", "creator_id": "ann", "max_size": 20}),
    );
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["success"], true);
    assert_eq!(created["room_name"], "Math Study Group");
    let room_id = created["room_id"].as_str().unwrap().to_string();
    let (status, joined) = post(
        &api_a,
        &tok_a,
        "/join-room",
        json!({"room_id": room_id, "user_id": "bob"}),
    );
    assert_eq!(status, 200, "{joined}");
    assert_eq!(joined["user_id"], "bob");
    let room = get_json(&api_a, &tok_a, &format!("/room/{room_id}"));
    assert_eq!(room["member_count"], 2, "{room}");
    assert_eq!(room["creator_id"], "ann");
    assert_eq!(room["max_size"], 20);
    assert_eq!(room["is_active"], true);
    assert!(room["created_at"].is_f64());
    // Wait until b has the room's membership, then bob speaks from b.
    let deadline = tokio::time::Instant::now() + T;
    while b
        .rooms()
        .get(&room_id)
        .await
        .map_or(true, |r| r.members.len() < 2)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "room never reached b"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send(
        &mut bob,
        "send_message",
        json!({"room_id": room_id, "message": "Great question!"}),
    )
    .await;
    for ws in [&mut web, &mut phone, &mut bob] {
        let chat = next_of(ws, "chat_message").await;
        assert_eq!(chat["sender_id"], "bob", "{chat}");
        assert_eq!(chat["message"], "Great question!");
        assert!(chat["timestamp"].is_f64());
    }
    let (status, sent) = post(
        &api_a,
        &tok_a,
        &format!("/broadcast/{room_id}"),
        json!({"message": {"text": "Study session starting!", "type": "announcement"},
               "sender_id": "ann"}),
    );
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["sent_count"], 2);
    assert_eq!(
        next_of(&mut bob, "chat_message").await["message"],
        "Study session starting!"
    );

    // Presence in the seed's shape.
    send(&mut web, "presence", json!({"status": "away"})).await;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let p = get_json(&api_a, &tok_a, "/presence/ann");
        if p["status"] == "away" {
            assert_eq!(p["is_online"], true);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let nobody = get_json(&api_a, &tok_a, "/presence/nobody");
    assert_eq!(
        nobody,
        json!({"user_id": "nobody", "status": "offline", "is_online": false})
    );
    send(&mut web, "presence", json!({"status": "sleeping"})).await;
    assert_eq!(
        next_of(&mut web, "error").await["data"]["error"],
        "bad_request"
    );

    // Notifications: to every socket of the user, on both devices; not to others.
    let (status, sent) = post(
        &api_b,
        &tok_b,
        "/notify",
        json!({"user_id": "ann", "type": "milestone_achieved", "priority": "high",
               "title": "Congratulations!", "body": "You completed Chapter 1",
               "data": {"chapter": 1}, "ttl": 86400}),
    );
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["success"], true);
    assert_eq!(sent["type"], "milestone_achieved");
    for ws in [&mut web, &mut phone] {
        let n = next_of(ws, "notification").await;
        assert_eq!(n["data"]["title"], "Congratulations!", "{n}");
        assert_eq!(n["data"]["priority"], "high");
        assert!(n["data"]["notification_id"].is_string());
    }
    // bob got none: his next frame is the answer to his heartbeat.
    send(&mut bob, "heartbeat", json!({})).await;
    let next_bob = next(&mut bob).await;
    assert_eq!(next_bob["type"], "heartbeat_ack", "{next_bob}");
    let (status, bad) = post(
        &api_a,
        &tok_a,
        "/notify",
        json!({"user_id": "ann", "type": "nonsense", "title": "x"}),
    );
    assert_eq!(status, 400, "{bad}");

    // A client that is away gets what it missed when it returns.
    web.close(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = post(
        &api_b,
        &tok_b,
        "/api/notify",
        json!({"user_id": "ann", "type": "review_reminder", "title": "Review time"}),
    );
    assert_eq!(status, 200);
    let _ = next_of(&mut phone, "notification").await;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        // Until the notification has reached a.
        let pending = a.notifications().pending("ann", "web1").await.unwrap();
        if pending.iter().any(|n| n.title == "Review time") {
            assert!(
                !pending.iter().any(|n| n.title == "Congratulations!"),
                "only what it missed"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never reached a");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut web = connect(&api_a, &tok_a, "ann", "web1").await;
    assert_eq!(next(&mut web).await["type"], "connected");
    let missed = next(&mut web).await;
    assert_eq!(missed["type"], "notification", "{missed}");
    assert_eq!(missed["data"]["title"], "Review time");
    // Once only: the next frame is the answer to a heartbeat.
    send(&mut web, "heartbeat", json!({})).await;
    assert_eq!(next(&mut web).await["type"], "heartbeat_ack");

    // At most five clients per user across the home; a closed one counts until its TTL.
    let mut carl = Vec::new();
    for i in 0..5 {
        let (api, tok) = if i % 2 == 0 {
            (&api_a, &tok_a)
        } else {
            (&api_b, &tok_b)
        };
        let mut ws = connect(api, tok, "carl", &format!("c{i}")).await;
        assert_eq!(next(&mut ws).await["type"], "connected");
        carl.push(ws);
    }
    let deadline = tokio::time::Instant::now() + T;
    loop {
        // Sessions opened on b reach a through the users document.
        let state = a.users().state("carl").await.unwrap();
        if state.sessions.iter().filter(|s| s.live).count() == 5 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sixth = connect(&api_a, &tok_a, "carl", "c5").await;
    match timeout(T, sixth.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1008);
            assert!(frame.reason.contains("at most 5"), "{}", frame.reason);
        }
        other => panic!("the sixth client was not refused: {other:?}"),
    }
    let mut first = carl.remove(0);
    first.close(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seventh = connect(&api_a, &tok_a, "carl", "c6").await;
    assert!(
        matches!(
            timeout(T, seventh.next()).await.unwrap(),
            Some(Ok(Message::Close(_)))
        ),
        "a closed session counts until its TTL"
    );
    tokio::time::sleep(ttl + Duration::from_millis(500)).await;
    let mut eighth = connect(&api_a, &tok_a, "carl", "c7").await;
    assert_eq!(
        next(&mut eighth).await["type"],
        "connected",
        "after the TTL it is gone"
    );

    // The seed's metrics, under its names.
    let (status, metrics) = get(&api_a, Some(&tok_a), "/metrics");
    assert_eq!(status, 200);
    for name in [
        "connections_total",
        "active_users_total",
        "messages_sent_total",
        "notifications_sent_total",
        "rooms_active_total",
        "hearth_ws_clients",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }

    drop((web, phone, bob, carl, eighth));
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}

/// A tiny HTTP receiver on loopback: records each request (head and body) and answers
/// 500 to the first `fail_first` requests, then 200.
/// Requests a receiver keeps before the test reads them.
const RECEIVED: usize = 64;

async fn receiver(fail_first: usize) -> (String, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(RECEIVED);
    tokio::spawn(async move {
        let mut served = 0usize;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then as much body as Content-Length says.
            loop {
                let n = stream.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            served += 1;
            let status = if served <= fail_first {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = tx.try_send(buf);
            let _ = stream
                .write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    (format!("http://{addr}"), rx)
}

/// Push targets: a webhook gets the notification as JSON after two refusals (retried),
/// an ntfy topic gets the body with its headers, and a target that never answers ends
/// in `notification.failed` after every try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_pushed_to_a_webhook_and_ntfy_with_retries() {
    use hearth::{Event, EventItem, PushTarget};

    let (webhook, mut hooks) = receiver(2).await;
    let (ntfy, mut topics) = receiver(0).await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::ws::config(dir.path(), "hub");
    config.users.push.targets = vec![
        PushTarget::Webhook(format!("{webhook}/hook")),
        PushTarget::Ntfy(format!("{ntfy}/family")),
        PushTarget::Webhook(format!("{closed}/gone")),
    ];
    config.users.push.retry_delay = Duration::from_millis(100);
    let node = timeout(T, hearth::Node::start(config))
        .await
        .unwrap()
        .unwrap();
    let mut events = node.events();
    let sent = node
        .notifications()
        .send(hearth::NewNotification {
            user_id: "ann".into(),
            kind: "achievement_unlocked".into(),
            priority: "urgent".into(),
            title: "Badge".into(),
            body: "You earned a badge".into(),
            data: serde_json::Map::from_iter([("badge".to_string(), json!("gold"))]),
            ttl: Duration::from_secs(60),
        })
        .await
        .unwrap();

    let mut outcomes = Vec::new();
    timeout(T, async {
        while outcomes.len() < 3 {
            if let Some(EventItem::Event(e @ Event::NotificationPush { .. })) = events.next().await
            {
                outcomes.push(e);
            }
        }
    })
    .await
    .unwrap();
    let by_url = |part: &str| {
        outcomes
            .iter()
            .find_map(|e| match e {
                Event::NotificationPush { outcome, .. } if outcome.url.contains(part) => {
                    Some((e.name().to_string(), outcome.clone()))
                }
                _ => None,
            })
            .unwrap()
    };
    let (name, hook) = by_url("/hook");
    assert_eq!(
        (name.as_str(), hook.attempts, hook.error.is_none()),
        ("notification.sent", 3, true)
    );
    let (name, topic) = by_url("/family");
    assert_eq!((name.as_str(), topic.attempts), ("notification.sent", 1));
    let (name, gone) = by_url("/gone");
    assert_eq!((name.as_str(), gone.attempts), ("notification.failed", 3));
    assert!(gone.error.is_some());

    // What the receivers got: the webhook the JSON notification (three times: two
    // refused), ntfy the body with its headers.
    let mut last = String::new();
    for _ in 0..3 {
        last = String::from_utf8(timeout(T, hooks.recv()).await.unwrap().unwrap()).unwrap();
    }
    let body: Value = serde_json::from_str(last.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["id"], sent.id.as_str());
    assert_eq!(body["title"], "Badge");
    assert_eq!(body["data"]["badge"], "gold");
    assert!(
        last.to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    let topic = String::from_utf8(timeout(T, topics.recv()).await.unwrap().unwrap()).unwrap();
    assert!(topic.starts_with("POST /family"), "{topic}");
    let lower = topic.to_ascii_lowercase();
    assert!(lower.contains("title: badge"), "{topic}");
    assert!(lower.contains("priority: 5"), "{topic}");
    assert!(topic.ends_with("You earned a badge"), "{topic}");
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

/// Web Push: a client subscribes with the home's VAPID key; a notification for its user is
/// posted to the push endpoint encrypted for the subscription (RFC 8291) and signed with
/// the home's key (RFC 8292). The local endpoint here decrypts it and checks the
/// signature, as a push service and the browser would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_push_subscriber_gets_the_notification_encrypted_and_signed() {
    use base64ct::{Base64UrlUnpadded, Encoding};
    use web_push_native::jwt_simple::prelude::{ECDSAP256PublicKeyLike, ES256PublicKey};
    use web_push_native::p256::elliptic_curve::rand_core::{OsRng, RngCore};
    use web_push_native::p256::elliptic_curve::sec1::ToEncodedPoint;

    let (endpoint, mut received) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    let node = crate::ws::start(dir.path(), "hub").await;
    let (api, tok) = (node.api_addr().unwrap().to_string(), token(&node));

    // The browser side: its key pair and auth secret, and the home's key to subscribe with.
    let secret = web_push_native::p256::SecretKey::random(&mut OsRng);
    let mut auth = [0u8; 16];
    OsRng.fill_bytes(&mut auth);
    let vapid = get_json(&api, &tok, "/api/push/vapid-public-key");
    let vapid_public = vapid["public_key"].as_str().unwrap().to_string();
    let (status, subscribed) = post(
        &api,
        &tok,
        "/api/users/ann/push-subscriptions",
        json!({
            "endpoint": format!("{endpoint}/push/ann-phone"),
            "expirationTime": null,
            "keys": {
                "p256dh": Base64UrlUnpadded::encode_string(
                    secret.public_key().to_encoded_point(false).as_bytes()),
                "auth": Base64UrlUnpadded::encode_string(&auth),
            }
        }),
    );
    assert_eq!(status, 201, "{subscribed}");
    let (status, bad) = post(
        &api,
        &tok,
        "/api/users/ann/push-subscriptions",
        json!({"endpoint": "ftp://x", "keys": {"p256dh": "AA", "auth": "AA"}}),
    );
    assert_eq!(status, 400, "{bad}");

    let (status, sent) = post(
        &api,
        &tok,
        "/api/notify",
        json!({"user_id": "ann", "type": "review_reminder", "priority": "high",
               "title": "Review time", "body": "Chapter 2 is due", "ttl": 600}),
    );
    assert_eq!(status, 200, "{sent}");

    let raw = timeout(T, received.recv()).await.unwrap().unwrap();
    let start = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8(raw[..start].to_vec()).unwrap();
    assert!(head.starts_with("POST /push/ann-phone"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("content-encoding: aes128gcm"), "{head}");
    let body = raw[start..].to_vec();
    let plain = web_push_native::decrypt(
        body,
        &secret,
        &web_push_native::Auth::clone_from_slice(&auth),
    )
    .expect("the payload decrypts with the subscription's keys");
    let n: Value = serde_json::from_slice(&plain).unwrap();
    assert_eq!(n["title"], "Review time");
    assert_eq!(n["user_id"], "ann");
    assert_eq!(n["id"], sent["notification_id"]);

    // The VAPID header: `vapid t=<JWT>, k=<the home's public key>`, the JWT signed by it.
    let authorization = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("authorization:")
                .then(|| l["authorization:".len()..].trim().to_string())
        })
        .expect("an Authorization header");
    let (t, k) = authorization
        .strip_prefix("vapid ")
        .and_then(|rest| rest.split_once(", k="))
        .map(|(t, k)| (t.trim_start_matches("t=").to_string(), k.to_string()))
        .expect("vapid t=..., k=...");
    assert_eq!(k, vapid_public);
    let key = ES256PublicKey::from_bytes(&Base64UrlUnpadded::decode_vec(&k).unwrap()).unwrap();
    key.verify_token::<web_push_native::jwt_simple::prelude::NoCustomClaims>(&t, None)
        .expect("the JWT verifies under the home's key");

    // A subscription can be removed.
    let id = subscribed["id"].as_str().unwrap();
    let (status, _) = http_send(
        &api,
        "DELETE",
        &format!("/api/users/ann/push-subscriptions/{id}"),
        Some(&tok),
        "",
    );
    assert_eq!(status, 204);
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

/// A library user sets `Config` directly: the node refuses, at start, times its timers and
/// clocks cannot hold (before it touches the data dir).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_times_too_long_for_its_timers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let huge = Duration::from_secs(10_000_000_000_000_000_000);
    let mut configs = Vec::new();
    for field in 0..4 {
        let mut config = crate::pairing::config(&data, "a");
        let api = config.api.as_mut().unwrap();
        match field {
            0 => api.seed.heartbeat_interval = huge,
            1 => api.seed.timeout = huge,
            2 => config.users.session_ttl = huge,
            _ => config.users.push.retry_delay = huge,
        }
        configs.push(config);
    }
    for config in configs {
        let error = match timeout(T, hearth::Node::start(config)).await.unwrap() {
            Ok(_) => panic!("a node started with a time too long"),
            Err(e) => e,
        };
        assert!(matches!(error, hearth::Error::Invalid(_)), "{error}");
    }
    assert!(!data.exists(), "the data dir was made before the check");
}
