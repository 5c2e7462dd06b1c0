//! Events across devices (seed 000) and the bus of seed 003 on the API, with three devices
//! of one home in process: a broadcast reaches every device through `Node::events()` and
//! `/api/ws` with its correlation id; a targeted event reaches its target and no other
//! device; `POST /api/events`, the WebSocket's `publish` and `hearth emit` publish; the
//! bus's history, dead letters and stats answer with what happened, `error.occurred`
//! included.

use std::time::Duration;

use hearth::{Event, EventItem, Node, Publish};
use serde_json::{Value, json};
use tokio::time::timeout;

use crate::util::{WAIT, hearth, http_get, http_send};
use crate::ws::{Client, config, join_and_start, start, token, wait_admitted};

const T: Duration = Duration::from_secs(30);

fn post(node: &Node, path: &str, body: &Value) -> (u16, Value) {
    let api = node.api_addr().unwrap().to_string();
    let (status, text) = http_send(&api, "POST", path, Some(&token(node)), &body.to_string());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get(node: &Node, path: &str) -> (u16, Value) {
    let api = node.api_addr().unwrap().to_string();
    let (status, text) = http_get(&api, path, Some(&token(node)));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The next device event on `events`, skipping everything else.
async fn next_device_event(events: &mut hearth::Events) -> (hearth::DeviceEvent, Option<String>) {
    timeout(T, async {
        loop {
            match events.next().await {
                Some(EventItem::Event(Event::Device { event, from_peer })) => {
                    return (*event, from_peer.map(|p| p.to_string()));
                }
                Some(_) => continue,
                None => panic!("the node stopped"),
            }
        }
    })
    .await
    .expect("no device event in time")
}

/// `hearth ARGS...` against `node` (found through its data dir), off the runtime's threads.
async fn cli(node: &Node, args: &[&str]) -> std::process::Output {
    let mut cmd = hearth();
    cmd.args(args).arg("--data").arg(node.data_dir());
    timeout(
        WAIT,
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_cross_devices_to_their_targets_only_and_the_bus_answers_on_the_api() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let admin = start(dirs[0].path(), "admin").await;
    let b = join_and_start(&admin, dirs[1].path(), "b").await;
    // C also keeps B dialled, so every pair of devices is connected.
    let invite = timeout(T, admin.invite(Duration::from_secs(600)))
        .await
        .unwrap()
        .unwrap();
    let mut c_config = config(dirs[2].path(), "c");
    timeout(T, Node::join(&invite.code, &c_config))
        .await
        .unwrap()
        .unwrap();
    let b_addr = b.listen_addrs().await.unwrap().remove(0);
    c_config.static_peers = vec![format!("{b_addr}/p2p/{}", b.peer_id())];
    let c = timeout(T, Node::start(c_config)).await.unwrap().unwrap();
    for (x, y) in [(&admin, &b), (&admin, &c), (&b, &c)] {
        wait_admitted(x, y.peer_id()).await;
        wait_admitted(y, x.peer_id()).await;
    }
    let nodes = [&admin, &b, &c];
    let mut streams = Vec::new();
    let mut sockets = Vec::new();
    for node in nodes {
        streams.push(node.events());
        let (mut ws, _) = Client::connect(node).await;
        ws.subscribe(&["coordination.*", "session.*"]).await;
        sockets.push(ws);
    }

    // A broadcast from B over REST reaches all three devices, with its correlation id, on
    // the library stream and on the WebSocket.
    let (status, report) = post(
        &b,
        "/api/events",
        &json!({"type": "coordination.broadcast", "payload": {"song": "lullaby"},
                "correlation_id": "corr-1"}),
    );
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["delivered_here"], true);
    assert_eq!(report["source_device_id"], b.peer_id().as_str());
    assert_eq!(report["target_device_ids"], json!([]));
    assert_eq!(report["sent_to"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(report["not_connected"], json!([]));
    for (i, node) in nodes.iter().enumerate() {
        let (event, from) = next_device_event(&mut streams[i]).await;
        assert_eq!(event.event_type, "coordination.broadcast");
        assert_eq!(event.source_device_id, b.peer_id().as_str());
        assert_eq!(event.correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(event.payload["song"], "lullaby");
        let expected_from = (node.peer_id() != b.peer_id()).then(|| b.peer_id().to_string());
        assert_eq!(from, expected_from);
        let frame = sockets[i].next_of("event").await;
        assert_eq!(frame["name"], "coordination.broadcast", "{frame}");
        assert_eq!(frame["type"], "coordination.broadcast");
        assert_eq!(frame["subject"], b.peer_id().as_str());
        assert_eq!(frame["source_device_id"], b.peer_id().as_str());
        assert_eq!(frame["correlation_id"], "corr-1");
        assert_eq!(frame["payload"]["song"], "lullaby");
        assert_eq!(frame["data"]["song"], "lullaby");
        assert!(frame["timestamp"].as_f64().unwrap() > 0.0);
    }

    // A targeted event from the library reaches C (named by device name) and not B.
    let report = admin
        .events()
        .publish(
            Publish::new("session.handoff")
                .to(["c"])
                .correlation_id("corr-2")
                .payload(json!({"secret": "for c"}).as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    assert!(!report.delivered_here);
    assert_eq!(report.sent_to, [c.peer_id().clone()]);
    let (event, _) = next_device_event(&mut streams[2]).await;
    assert_eq!(event.event_type, "session.handoff");
    assert_eq!(event.correlation_id.as_deref(), Some("corr-2"));
    assert_eq!(event.target_device_ids, [c.peer_id().clone()]);
    let frame = sockets[2].next_of("event").await;
    assert_eq!(frame["correlation_id"], "corr-2");
    assert_eq!(frame["target_device_ids"], json!([c.peer_id().as_str()]));
    // A broadcast after it, on the same stream from the admin to B: B's next device event
    // is that one, so the targeted event never reached B. Nor did the admin deliver it.
    admin
        .events()
        .publish(Publish::new("coordination.marker"))
        .await
        .unwrap();
    for i in [0, 1] {
        let (event, _) = next_device_event(&mut streams[i]).await;
        assert_eq!(event.event_type, "coordination.marker", "device {i}");
        let frame = sockets[i].next_of("event").await;
        assert_eq!(frame["name"], "coordination.marker", "device {i}: {frame}");
    }
    // Nor was it sent to B at all: B's receiver would have dropped it as not for B, and
    // counted it.
    let (_, stats) = get(&b, "/api/events/stats");
    assert_eq!(stats["devices"]["dropped_malformed"], 0, "{stats}");
    assert_eq!(stats["devices"]["received"], 1, "{stats}");
    let (_, history) = get(&b, "/api/events/history?pattern=session.*");
    assert_eq!(history["events"], json!([]), "{history}");
    assert!(!history.to_string().contains("for c"));

    // The WebSocket's publish, targeted at the admin by PeerId.
    sockets[2]
        .send(json!({"type": "publish", "data": {
            "type": "coordination.group_start",
            "target_device_ids": [admin.peer_id().as_str()],
            "payload": {"activity": "trivia"}, "correlation_id": "corr-3"}}))
        .await;
    let (event, from) = next_device_event(&mut streams[0]).await;
    assert_eq!(event.event_type, "coordination.group_start");
    assert_eq!(event.correlation_id.as_deref(), Some("corr-3"));
    assert_eq!(from.as_deref(), Some(c.peer_id().as_str()));
    // A bad publish over the WebSocket gets an error frame.
    sockets[2]
        .send(json!({"type": "publish", "data": {"type": "entity.changed", "payload": {}}}))
        .await;
    let error = sockets[2].next_of("error").await;
    assert_eq!(error["error"], "bad_request", "{error}");

    // Bad input over REST: a clear 4xx each, and nothing published.
    let big = "x".repeat(hearth::MAX_EVENT_PAYLOAD + 1);
    for (body, want) in [
        (json!({"type": "entity.changed", "payload": {}}), 400),
        (json!({"type": "no_dots", "payload": {}}), 400),
        (json!({"type": "a.b", "payload": [1, 2]}), 400),
        (json!({"type": "a.b"}), 400),
        (json!({"type": "a.b", "payload": {}, "extra": 1}), 400),
        (json!({"type": "a.b", "payload": {"x": big}}), 400),
        (
            json!({"type": "a.b", "payload": {}, "target_device_ids": ["nobody"]}),
            404,
        ),
    ] {
        let (status, reply) = post(&b, "/api/events", &body);
        assert_eq!(status, want, "{body}: {reply}");
        assert!(reply["detail"].is_string(), "{reply}");
    }

    // `hearth emit` on B, targeted at the admin by name.
    let out = cli(
        &b,
        &[
            "emit",
            "emergency.drill",
            "--to",
            "admin",
            "--payload",
            r#"{"room": "kitchen"}"#,
            "--correlation-id",
            "corr-4",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["sent_to"], json!([admin.peer_id().as_str()]));
    let (event, _) = next_device_event(&mut streams[0]).await;
    assert_eq!(event.event_type, "emergency.drill");
    assert_eq!(event.payload["room"], "kitchen");
    assert_eq!(event.correlation_id.as_deref(), Some("corr-4"));
    let out = cli(&b, &["emit", "entity.changed"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("announces itself"),
        "{out:?}"
    );

    // A handler that fails raises `error.occurred` (with the event's correlation id) and
    // leaves a dead letter; stats count it per handler.
    let bus = c.bus();
    bus.subscribe_with(
        hearth::bus::Filter::new("coordination.*").unwrap(),
        hearth::bus::SubscribeOptions {
            label: Some("speaker".into()),
            ..Default::default()
        },
        |e| Err(format!("cannot play {}", e.name)),
    );
    let errors = bus.wait_for("error.occurred", T).unwrap();
    let (status, _) = post(
        &admin,
        "/api/events",
        &json!({"type": "coordination.broadcast", "payload": {}, "correlation_id": "corr-5"}),
    );
    assert_eq!(status, 200);
    let error = errors.await.expect("no error.occurred");
    assert_eq!(error.subject, "speaker");
    assert_eq!(error.correlation_id.as_deref(), Some("corr-5"));
    assert_eq!(error.data["error"], "cannot play coordination.broadcast");

    let (status, dead) = get(&c, "/api/events/dead-letters");
    assert_eq!(status, 200);
    let letters = dead["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{dead}");
    assert_eq!(letters[0]["label"], "speaker");
    assert_eq!(letters[0]["event"]["correlation_id"], "corr-5");

    let (status, stats) = get(&c, "/api/events/stats");
    assert_eq!(status, 200);
    let speaker = stats["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["handler"] == "speaker")
        .unwrap_or_else(|| panic!("no speaker handler in {stats}"));
    assert_eq!(
        (speaker["calls"].as_u64(), speaker["errors"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(speaker["average_time_s"].as_f64().is_some());
    assert!(stats["by_name"]["coordination.broadcast"]["published"].as_u64() >= Some(2));
    assert_eq!(stats["by_name"]["error.occurred"]["published"], 1);
    assert!(stats["devices"]["received"].as_u64() >= Some(3), "{stats}");
    assert_eq!(stats["devices"]["dropped_malformed"], 0);

    // History: by pattern, with correlation ids, and the seed's aliases of the node's
    // own events (B's admission on C, `device.connect`).
    let (status, history) = get(&c, "/api/events/history?pattern=coordination.*&limit=50");
    assert_eq!(status, 200);
    let correlations: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["correlation_id"].as_str())
        .collect();
    assert_eq!(correlations, ["corr-1", "corr-5"], "{history}");
    let (_, aliases) = get(&c, "/api/events/history?pattern=device.*");
    let connects: Vec<&Value> = aliases["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "device.connect")
        .collect();
    assert!(!connects.is_empty(), "{aliases}");
    assert_eq!(connects[0]["metadata"]["alias_of"], "peer.connected");
    for bad in [
        "/api/events/history?pattern=a..b",
        "/api/events/history?limit=0",
        "/api/events/history?limit=999999",
        "/api/events/dead-letters?limit=0",
        "/api/events/history?colour=red",
    ] {
        let (status, reply) = get(&c, bad);
        assert_eq!(status, 400, "{bad}: {reply}");
    }

    // The CLI reads the same: `bus history|dead|stats`, and `events history` alike.
    let out = cli(&c, &["bus", "history", "coordination.*", "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["events"], history["events"]);
    let out = cli(&c, &["events", "history", "coordination.*"]).await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[corr-1]") && text.contains("[corr-5]"),
        "{text}"
    );
    let out = cli(&c, &["bus", "dead"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("speaker") && text.contains("cannot play"),
        "{text}"
    );
    let out = cli(&c, &["bus", "stats"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("handler speaker"), "{text}");

    for node in [admin, b, c] {
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }
}
