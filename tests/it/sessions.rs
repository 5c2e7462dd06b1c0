//! Sessions and their handoff, across three devices of one home in process (loopback,
//! mDNS off): a session started on one device is readable on every device; a handoff
//! to a connected device completes with the context moved and `session.handoff` events
//! on both devices; a handoff to a device that is down rolls back on timeout and the
//! source keeps the session. The API refuses bad input with a 4xx, and the CLI shows a
//! session and reports a rollback with exit code 1.

use std::time::Duration;

use hearth::{Event, EventItem, NewSession, Node};
use serde_json::{Value, json};
use tokio::time::timeout;

use crate::sharing::until;
use crate::util::{WAIT, hearth, http_get, http_send};
use crate::ws::{join_and_start, start, token, wait_admitted};

const T: Duration = Duration::from_secs(30);

fn call(node: &Node, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let api = node.api_addr().unwrap().to_string();
    let (status, text) = if method == "GET" {
        http_get(&api, path, Some(&token(node)))
    } else {
        http_send(&api, method, path, Some(&token(node)), &body.to_string())
    };
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The data of the next `session.handoff` event on `events` with `phase`, skipping
/// everything else; with where it came from.
async fn next_handoff(events: &mut hearth::Events, phase: &str) -> (Value, Option<String>) {
    timeout(T, async {
        loop {
            match events.next().await {
                Some(EventItem::Event(Event::Coordination {
                    name: "session.handoff",
                    data,
                    from_peer,
                    ..
                })) if data["phase"] == phase => {
                    return (data, from_peer.map(|p| p.to_string()));
                }
                Some(_) => continue,
                None => panic!("the node stopped"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no session.handoff {phase} in time"))
}

/// `hearth ARGS...` against `node`, off the runtime's threads.
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
async fn a_session_moves_with_its_context_and_a_handoff_to_a_device_that_is_down_rolls_back() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let hall = start(dirs[0].path(), "hall").await;
    let kitchen = join_and_start(&hall, dirs[1].path(), "kitchen").await;
    let attic = join_and_start(&hall, dirs[2].path(), "attic").await;
    for x in [&kitchen, &attic] {
        wait_admitted(&hall, x.peer_id()).await;
        wait_admitted(x, hall.peer_id()).await;
    }

    // Started on the hall device, over the API; readable on every device of the home.
    let (status, started) = call(
        &hall,
        "POST",
        "/api/sessions",
        &json!({"user": "ann", "persona": "chef", "context": {"recipe": "soup", "step": 3}}),
    );
    assert_eq!(status, 200, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    assert_eq!(started["device"], "hall");
    assert_eq!(started["device_id"], hall.peer_id().as_str());
    for node in [&kitchen, &attic] {
        until("the session reaches every device", || async {
            node.sessions()
                .get(&id)
                .await
                .is_ok_and(|s| s.user == "ann")
        })
        .await;
    }

    // Bad input gets a 4xx that says what is wrong, and changes nothing.
    for (method, path, body, want) in [
        (
            "POST",
            "/api/sessions".to_string(),
            json!({"user": "ann", "mood": 1}),
            400,
        ),
        (
            "POST",
            "/api/sessions".to_string(),
            json!({"user": ""}),
            400,
        ),
        (
            "POST",
            "/api/sessions".to_string(),
            json!({"user": "ann", "context": [1]}),
            400,
        ),
        ("GET", "/api/sessions/nope".to_string(), json!({}), 404),
        (
            "POST",
            format!("/api/sessions/{id}/handoff"),
            json!({"to_device": "garage"}),
            404,
        ),
        (
            "POST",
            format!("/api/sessions/{id}/handoff"),
            json!({"to_device": "hall"}),
            409,
        ),
        (
            "POST",
            format!("/api/sessions/{id}/handoff"),
            json!({}),
            400,
        ),
    ] {
        let (status, body) = call(&hall, method, &path, &body);
        assert_eq!(status, want, "{method} {path}: {body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{body}"
        );
    }
    // Only the device the session is active on hands it over.
    let (status, body) = call(
        &kitchen,
        "POST",
        &format!("/api/sessions/{id}/handoff"),
        &json!({"to_device": "attic"}),
    );
    assert_eq!(status, 409, "{body}");

    // A handoff that completes: prepare on the hall, accept on the kitchen, acknowledge.
    let mut hall_events = hall.events();
    let mut kitchen_events = kitchen.events();
    let report = hall.sessions().handoff(&id, "kitchen").await.unwrap();
    assert!(report.completed(), "{report:?}");
    assert_eq!(report.session.device_id, kitchen.peer_id().as_str());
    assert_eq!(report.session.device.as_deref(), Some("kitchen"));
    let (started_here, _) = next_handoff(&mut hall_events, "started").await;
    assert_eq!(started_here["role"], "source");
    let (done_here, _) = next_handoff(&mut hall_events, "completed").await;
    assert_eq!(done_here["to"], kitchen.peer_id().as_str());
    // The target saw it start with the context in hand, then complete.
    let (offered, from) = next_handoff(&mut kitchen_events, "started").await;
    assert_eq!(from.as_deref(), Some(hall.peer_id().as_str()));
    assert_eq!(offered["role"], "target");
    assert_eq!(offered["context"], json!({"recipe": "soup", "step": 3}));
    assert_eq!(offered["persona"], "chef");
    let (taken, _) = next_handoff(&mut kitchen_events, "completed").await;
    assert_eq!(taken["device"], "kitchen");
    assert_eq!(taken["handoff_id"], offered["handoff_id"]);
    // Every device reads it on the kitchen now, with the context, and the history.
    for node in [&hall, &kitchen, &attic] {
        until("every device sees the session on the kitchen", || async {
            node.sessions()
                .get(&id)
                .await
                .is_ok_and(|s| s.device_id == kitchen.peer_id().as_str())
        })
        .await;
        let s = node.sessions().get(&id).await.unwrap();
        assert_eq!(s.context["recipe"], "soup");
        assert_eq!(s.handoffs.len(), 1);
        assert_eq!(s.handoffs[0].outcome, "completed");
    }
    // The kitchen owns it now: it saves the context; the hall may not.
    let mut ctx = serde_json::Map::new();
    ctx.insert("recipe".into(), json!("bread"));
    kitchen
        .sessions()
        .set_context(&id, ctx.clone())
        .await
        .unwrap();
    assert!(matches!(
        hall.sessions().set_context(&id, ctx).await,
        Err(hearth::Error::Conflict(_))
    ));

    // A handoff to a device that is down: the kitchen prepares, nobody accepts, and it
    // rolls back on timeout; the kitchen keeps the session. Through the CLI, which says
    // so and exits 1.
    timeout(T, attic.shutdown()).await.unwrap().unwrap();
    let mut kitchen_events = kitchen.events();
    let out = cli(&kitchen, &["session", "handoff", &id, "--to", "attic"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rolled back (timeout)"), "{stderr}");
    let (rolled, _) = next_handoff(&mut kitchen_events, "rolled_back").await;
    assert_eq!(rolled["reason"], "timeout");
    for node in [&kitchen, &hall] {
        until("the rollback is on every live device", || async {
            node.sessions().get(&id).await.is_ok_and(|s| {
                s.handoffs
                    .last()
                    .is_some_and(|h| h.outcome == "rolled_back")
            })
        })
        .await;
        let s = node.sessions().get(&id).await.unwrap();
        assert_eq!(
            s.device_id,
            kitchen.peer_id().as_str(),
            "the source keeps it"
        );
        assert_eq!(s.context["recipe"], "bread");
    }
    // The CLI shows it, in JSON too.
    let out = cli(&hall, &["session", "show", &id, "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["device"], "kitchen");
    assert_eq!(shown["handoffs"][1]["outcome"], "rolled_back");

    // Library: a new session starts on the device that asks.
    let s = hall
        .sessions()
        .start(NewSession {
            user: "bob".into(),
            ..NewSession::default()
        })
        .await
        .unwrap();
    assert_eq!(s.device.as_deref(), Some("hall"));
    for node in [hall, kitchen] {
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }
}
