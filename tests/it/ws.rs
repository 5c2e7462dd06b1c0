//! The WebSocket API through real clients: events cross devices of one home, correlation
//! ids travel with writes, a client that stops reading is closed with 1008 while others
//! keep receiving, and bad tokens and bad messages are refused.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hearth::bus::Filter;
use hearth::{ApiConfig, Config, EntityWrite, Node};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const T: Duration = Duration::from_secs(30);

pub(crate) fn config(dir: &std::path::Path, name: &str) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        api: Some(ApiConfig::on("127.0.0.1:0".parse().unwrap())),
        device_name: Some(name.into()),
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        mdns: false,
        ..Config::default()
    }
}

pub(crate) async fn start(dir: &std::path::Path, name: &str) -> Node {
    timeout(T, Node::start(config(dir, name)))
        .await
        .unwrap()
        .unwrap()
}

/// Pairs a second device into `admin`'s home and starts it.
pub(crate) async fn join_and_start(admin: &Node, dir: &std::path::Path, name: &str) -> Node {
    let invite = timeout(T, admin.invite(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    timeout(T, Node::join(&invite.code, &config(dir, name)))
        .await
        .unwrap()
        .unwrap();
    start(dir, name).await
}

/// Waits until `node` has admitted `peer`.
pub(crate) async fn wait_admitted(node: &Node, peer: &str) {
    let deadline = tokio::time::Instant::now() + T;
    while !node
        .admitted_peers()
        .await
        .unwrap()
        .iter()
        .any(|p| p == peer)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{peer} never admitted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn token(node: &Node) -> String {
    std::fs::read_to_string(node.data_dir().join(hearth::TOKEN_FILE))
        .unwrap()
        .trim()
        .to_string()
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client of the test.
pub(crate) struct Client {
    ws: Socket,
}

impl Client {
    /// Connects with the bearer header and reads the `connected` frame.
    pub(crate) async fn connect(node: &Node) -> (Self, Value) {
        let mut request = format!("ws://{}/api/ws", node.api_addr().unwrap())
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", token(node)).parse().unwrap(),
        );
        let (ws, _) = timeout(T, tokio_tungstenite::connect_async(request))
            .await
            .unwrap()
            .unwrap();
        let mut client = Self { ws };
        let hello = client.next().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        (client, hello["data"].clone())
    }

    pub(crate) async fn send(&mut self, frame: Value) {
        timeout(T, self.ws.send(Message::Text(frame.to_string().into())))
            .await
            .unwrap()
            .unwrap();
    }

    /// The next JSON frame.
    pub(crate) async fn next(&mut self) -> Value {
        loop {
            let message = timeout(T, self.ws.next())
                .await
                .expect("no frame in time")
                .expect("socket ended")
                .expect("socket error");
            match message {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next frame of type `kind`, skipping others.
    pub(crate) async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next().await;
            if frame["type"] == kind {
                return frame["data"].clone();
            }
        }
    }

    /// Subscribes, and returns once the server has applied it (the heartbeat after it is
    /// answered only after the subscribe was handled).
    pub(crate) async fn subscribe(&mut self, patterns: &[&str]) {
        self.send(json!({"type": "subscribe", "data": {"patterns": patterns}}))
            .await;
        self.send(json!({"type": "heartbeat", "data": {}})).await;
        self.next_of("heartbeat_ack").await;
    }
}

fn write(state: &str) -> EntityWrite {
    EntityWrite {
        state: state.into(),
        ..EntityWrite::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_written_on_one_device_reaches_the_other_devices_clients_with_its_correlation_id() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let (mut peers_a, hello) = Client::connect(&a).await;
    assert_eq!(hello["device"], a.peer_id().as_str());
    assert_eq!(hello["home"], a.home_id().as_str());
    assert!(!hello["session_id"].as_str().unwrap().is_empty());
    peers_a.subscribe(&["peer.*"]).await;

    let b = join_and_start(&a, dirs[1].path(), "b").await;
    wait_admitted(&b, a.peer_id()).await;
    // The admission on A reaches A's client as a generic event.
    let connected = peers_a.next_of("event").await;
    assert_eq!(connected["name"], "peer.connected");
    assert_eq!(connected["subject"], b.peer_id().as_str());
    assert_eq!(connected["data"]["device_name"], "b");

    let (mut on_b, _) = Client::connect(&b).await;
    on_b.subscribe(&["entity.*"]).await;
    let mut bus_b = b.bus().stream(Filter::new("entity.changed").unwrap(), 64);

    let (mut on_a, _) = Client::connect(&a).await;
    on_a.send(json!({"type": "sync_state", "data": {
        "entity_id": "light.porch", "state": "on", "attributes": {"brightness": 80}
    }}))
    .await;
    let update = on_b.next_of("state_update").await;
    assert_eq!(update["entity_id"], "light.porch");
    assert_eq!(update["state"], "on");
    assert_eq!(update["attributes"]["brightness"], 80);
    assert_eq!(update["source_device"], a.peer_id().as_str());
    assert!(update["timestamp"].as_f64().unwrap() > 1.0e9);

    // Now a write with a correlation id: B's bus and B's client see the id.
    on_a.send(json!({"type": "sync_state", "data": {
        "entity_id": "light.porch", "state": "off", "correlation_id": "req-42"
    }}))
    .await;
    let update = loop {
        let u = on_b.next_of("state_update").await;
        if u["state"] == "off" {
            break u;
        }
    };
    assert_eq!(update["correlation_id"], "req-42");
    let event = loop {
        let e = timeout(T, bus_b.recv()).await.unwrap().unwrap();
        if e.data["state"] == "off" {
            break e;
        }
    };
    assert_eq!(event.name, "entity.changed");
    assert_eq!(event.subject, "light.porch");
    assert_eq!(event.correlation_id.as_deref(), Some("req-42"));
    assert_eq!(event.source.device, a.peer_id().as_str());
    assert_eq!(event.source.home, a.home_id().as_str());
    assert_eq!(event.metadata["origin"], "remote");

    // A local write on B is an event on B too, without a correlation id.
    timeout(T, b.entities().set("light.porch", write("dim")))
        .await
        .unwrap()
        .unwrap();
    let update = on_b.next_of("state_update").await;
    assert_eq!(update["state"], "dim");
    assert_eq!(update["source_device"], b.peer_id().as_str());
    assert!(update.get("correlation_id").is_none());

    drop((peers_a, on_a, on_b, bus_b));
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    // B's departure is an event on A's bus.
    let left = a
        .bus()
        .history(&hearth::bus::Pattern::parse("peer.*").unwrap(), 10);
    assert!(left.iter().any(|e| e.name == "peer.connected"));
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_1008_while_another_gets_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), "a").await;
    let (mut fast, _) = Client::connect(&node).await;
    fast.subscribe(&["entity.*"]).await;

    // The slow client has a small receive buffer, so the kernel absorbs little for it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(node.api_addr().unwrap()).await.unwrap();
    let mut request = format!("ws://{}/api/ws", node.api_addr().unwrap())
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token(&node)).parse().unwrap(),
    );
    let (ws, _) = timeout(
        T,
        tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp)),
    )
    .await
    .unwrap()
    .unwrap();
    let mut slow = Client { ws };
    assert_eq!(slow.next().await["type"], "connected");
    slow.subscribe(&["entity.*"]).await;
    let subscriptions_before = node.bus().stats().subscriptions;

    // The fast client reads in its own task, counting what it gets.
    let received = Arc::new(AtomicUsize::new(0));
    let seen = received.clone();
    let reader = tokio::spawn(async move {
        let mut states = HashSet::new();
        loop {
            let frame = fast.next().await;
            if frame["type"] == "state_update" {
                let state = frame["data"]["state"].as_str().unwrap().to_string();
                let last = state == "last";
                assert!(states.insert(state), "an event arrived twice");
                seen.fetch_add(1, Ordering::SeqCst);
                if last {
                    return states;
                }
            }
        }
    });

    // Write in rounds the fast client keeps up with, until the slow one overflows.
    const ROUND: usize = 32;
    const MAX_WRITES: usize = 20_000;
    let pad = "x".repeat(4000);
    let mut written = 0;
    while node.bus().stats().streams_overflowed == 0 {
        assert!(written < MAX_WRITES, "the slow client never overflowed");
        let mut round = Vec::new();
        for _ in 0..ROUND {
            let entities = node.entities();
            let w = EntityWrite {
                state: format!("s{written}"),
                attributes: Some(json!({ "pad": pad }).as_object().unwrap().clone()),
                correlation_id: None,
            };
            written += 1;
            round.push(tokio::spawn(async move {
                entities.set("sensor.burst", w).await
            }));
        }
        for w in round {
            timeout(T, w).await.unwrap().unwrap().unwrap();
        }
        let deadline = tokio::time::Instant::now() + T;
        while received.load(Ordering::SeqCst) < written {
            assert!(
                tokio::time::Instant::now() < deadline,
                "fast client fell behind"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(written > hearth::WS_CLIENT_BUFFER);
    // The slow session's stream is gone: nothing queues for it any more.
    assert_eq!(node.bus().stats().subscriptions, subscriptions_before - 1);

    // The slow client now reads: what the kernel held, then the close with 1008.
    let close = loop {
        let message = timeout(T, slow.ws.next())
            .await
            .expect("no close in time")
            .expect("socket ended without a close frame")
            .expect("socket error");
        match message {
            Message::Close(frame) => break frame.expect("close without a code"),
            Message::Text(_) | Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::Policy);
    assert!(
        close.reason.as_str().contains("too slow"),
        "{}",
        close.reason
    );

    // The fast client got every event, and is still served.
    timeout(T, node.entities().set("sensor.burst", write("last")))
        .await
        .unwrap()
        .unwrap();
    let states = timeout(T, reader).await.unwrap().unwrap();
    assert_eq!(states.len(), written + 1);
    assert!(states.contains("s0") && states.contains(&format!("s{}", written - 1)));
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_refuses_missing_and_wrong_tokens_and_takes_a_query_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), "a").await;
    let url = format!("ws://{}/api/ws", node.api_addr().unwrap());
    let status = |r: Result<_, tungstenite::Error>| match r {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => 101,
    };
    let none = tokio_tungstenite::connect_async(url.clone()).await;
    assert_eq!(status(none.map(|_| ())), 401);
    let mut wrong = url.clone().into_client_request().unwrap();
    wrong
        .headers_mut()
        .insert("Authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        status(tokio_tungstenite::connect_async(wrong).await.map(|_| ())),
        401
    );
    let wrong_query = tokio_tungstenite::connect_async(format!("{url}?token=nope")).await;
    assert_eq!(status(wrong_query.map(|_| ())), 401);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?token={}", token(&node)))
        .await
        .unwrap();
    let hello = timeout(T, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("\"connected\""));

    // A stopping node closes its sessions with 1001 rather than leaving them hanging.
    timeout(T, node.shutdown()).await.unwrap().unwrap();
    let close = loop {
        match timeout(T, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame.expect("close without a code"),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::Away);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_errors_and_the_socket_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), "a").await;
    let (mut c, _) = Client::connect(&node).await;
    c.ws.send(Message::Text("{not json".into())).await.unwrap();
    let e = c.next_of("error").await;
    assert_eq!(e["error"], "bad_request");
    assert!(e["detail"].as_str().unwrap().contains("malformed"), "{e}");

    c.send(json!({"type": "dance", "data": {}})).await;
    let e = c.next_of("error").await;
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("unknown message type"),
        "{e}"
    );

    c.send(json!({"type": "sync_state", "data": {"entity_id": "light.porch"}}))
        .await;
    let e = c.next_of("error").await;
    assert!(e["detail"].as_str().unwrap().contains("state"), "{e}");

    c.send(json!({"type": "sync_state", "data": {"entity_id": "Not An Id", "state": "on"}}))
        .await;
    let e = c.next_of("error").await;
    assert_eq!(e["error"], "bad_request");
    assert!(
        e["detail"].as_str().unwrap().contains("invalid entity id"),
        "{e}"
    );

    c.send(json!({"type": "subscribe", "data": {"patterns": ["entity..x"]}}))
        .await;
    assert_eq!(c.next_of("error").await["error"], "bad_request");

    c.send(json!({"type": "sync_state", "data": {
        "entity_id": "light.porch", "state": "on", "correlation_id": "x".repeat(500)
    }}))
    .await;
    assert!(
        c.next_of("error").await["detail"]
            .as_str()
            .unwrap()
            .contains("correlation id")
    );

    // Still open and answering; and a valid subscribe then a write is delivered.
    c.subscribe(&["entity.changed"]).await;
    c.send(json!({"type": "sync_state", "data": {"entity_id": "light.porch", "state": "on"}}))
        .await;
    let update = c.next_of("state_update").await;
    assert_eq!(update["state"], "on");
    assert_eq!(update["source_device"], node.peer_id().as_str());
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_presence_sent_on_one_device_reach_the_other_devices_clients() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    wait_admitted(&b, a.peer_id()).await;
    let (mut on_b, _) = Client::connect(&b).await;
    on_b.subscribe(&["room.*", "presence.*"]).await;

    let room = timeout(T, a.rooms().create("lounge", None, None))
        .await
        .unwrap()
        .unwrap();
    // Room creation is not one of the three typed frames, so it arrives as an event.
    let created = loop {
        let e = on_b.next_of("event").await;
        if e["name"] == "room.created" {
            break e;
        }
    };
    assert_eq!(created["subject"], room.room_id);
    assert_eq!(created["data"]["name"], "lounge");
    assert_eq!(created["source"]["device"], a.peer_id().as_str());

    let (mut on_a, _) = Client::connect(&a).await;
    on_a.send(json!({"type": "send_message", "data": {
        "room_id": room.room_id, "message": "hello"
    }}))
    .await;
    let chat = on_b.next_of("chat_message").await;
    assert_eq!(chat["room_id"], room.room_id);
    assert_eq!(chat["sender"], "a");
    assert_eq!(chat["message"], "hello");
    assert!(chat["timestamp"].as_f64().unwrap() > 1.0e9);

    on_a.send(json!({"type": "presence", "data": {"user": "alice", "status": "away"}}))
        .await;
    let presence = on_b.next_of("presence").await;
    assert_eq!(presence["user"], "alice");
    assert_eq!(presence["status"], "away");
    assert!(presence["since"].as_f64().unwrap() > 1.0e9);

    // Refusals come back as errors with the REST kinds, and the socket stays open.
    on_a.send(json!({"type": "send_message", "data": {"room_id": "nowhere", "message": "x"}}))
        .await;
    assert_eq!(on_a.next_of("error").await["error"], "not_found");
    on_a.send(json!({"type": "presence", "data": {"user": "alice", "status": "offline"}}))
        .await;
    assert_eq!(on_a.next_of("error").await["error"], "bad_request");
    on_a.send(json!({"type": "heartbeat"})).await;
    on_a.next_of("heartbeat_ack").await;

    drop((on_a, on_b));
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    timeout(T, a.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_closes_only_that_socket() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), "a").await;
    let (mut big, _) = Client::connect(&node).await;
    let (mut other, _) = Client::connect(&node).await;
    let huge = format!(
        "{{\"type\": \"heartbeat\", \"data\": {{}}, \"pad\": \"{}\"}}",
        "x".repeat(1024 * 1024)
    );
    // The server may close before the whole frame is written; either way the socket ends.
    let _ = big.ws.send(Message::Text(huge.into())).await;
    let ended = loop {
        match timeout(T, big.ws.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break None,
        }
    };
    if let Some(code) = ended {
        assert_eq!(code, CloseCode::Size);
    }
    other.send(json!({"type": "heartbeat", "data": {}})).await;
    other.next_of("heartbeat_ack").await;
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_learns_how_many_events_the_node_lost() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), "a").await;
    let (mut client, _) = Client::connect(&node).await;
    client
        .send(json!({"type": "subscribe", "data": {
            "patterns": ["entity.*"], "subjects": ["light.last"]
        }}))
        .await;
    client.send(json!({"type": "heartbeat", "data": {}})).await;
    client.next_of("heartbeat_ack").await;

    // A handler that holds up the bus (and so the bridge from the core) until released,
    // while the core announces more events than it keeps for a slow bridge.
    let (release, gate) = std::sync::mpsc::sync_channel::<()>(1);
    let gate = std::sync::Mutex::new(Some(gate));
    node.bus()
        .subscribe(Filter::new("entity.changed").unwrap(), move |_| {
            if let Some(gate) = gate.lock().unwrap().take() {
                let _ = gate.recv_timeout(T);
            }
            Ok(())
        });
    let total = hearth::CHANGE_BUFFER + 300;
    let ids: Vec<String> = (0..100).map(|i| format!("sensor.s{i}")).collect();
    let mut written = 0;
    while written < total {
        let batch = ids
            .iter()
            .map(|id| (id.into(), write(&written.to_string())));
        timeout(T, node.entities().set_many(batch.collect()))
            .await
            .unwrap()
            .unwrap();
        written += ids.len();
    }
    release.send(()).unwrap();
    // The client did not read meanwhile. Now a write it subscribed to: the gap must be
    // announced before it.
    timeout(T, node.entities().set("light.last", write("on")))
        .await
        .unwrap()
        .unwrap();
    let first = client.next().await;
    assert_eq!(first["type"], "missed", "{first}");
    let count = first["data"]["count"].as_u64().unwrap();
    assert!(count > 0 && count as usize <= written, "{first}");
    let update = client.next_of("state_update").await;
    assert_eq!(update["entity_id"], "light.last");
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}
