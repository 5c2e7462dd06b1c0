//! Group activities across three devices of one home in process (loopback, mDNS off):
//! an activity goes starting -> active (every device acknowledged) -> paused -> active ->
//! ended with final scores, increments made on two devices at once add up, and with one
//! device down the start ends `no_ack` naming it. The API refuses bad input with a 4xx,
//! and the CLI shows an activity.

use std::time::Duration;

use hearth::{ActivityAction, Event, EventItem, Node};
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

/// The data of the next coordination event named `name` on `events`.
async fn next_named(events: &mut hearth::Events, name: &str) -> Value {
    timeout(T, async {
        loop {
            match events.next().await {
                Some(EventItem::Event(Event::Coordination { name: n, data, .. })) if n == name => {
                    return data;
                }
                Some(_) => continue,
                None => panic!("the node stopped"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} in time"))
}

async fn wait_state(node: &Node, id: &str, state: &str) {
    until(&format!("{id} {state}"), || async {
        node.activities()
            .get(id)
            .await
            .is_ok_and(|a| a.state == state)
    })
    .await;
}

/// Three devices of one home, each connected to the other two.
async fn home(dirs: &[tempfile::TempDir]) -> (Node, Node, Node) {
    let hall = start(dirs[0].path(), "hall").await;
    let kitchen = join_and_start(&hall, dirs[1].path(), "kitchen").await;
    let attic = join_and_start(&hall, dirs[2].path(), "attic").await;
    // The attic also keeps the kitchen dialled (on a LAN, mDNS does this).
    let kitchen_addr = format!(
        "{}/p2p/{}",
        kitchen.listen_addrs().await.unwrap().remove(0),
        kitchen.peer_id()
    );
    timeout(T, attic.shutdown()).await.unwrap().unwrap();
    let mut config = crate::ws::config(dirs[2].path(), "attic");
    config.static_peers.push(kitchen_addr);
    let attic = timeout(T, Node::start(config)).await.unwrap().unwrap();
    for (x, y) in [(&kitchen, &hall), (&attic, &hall), (&attic, &kitchen)] {
        wait_admitted(x, y.peer_id()).await;
        wait_admitted(y, x.peer_id()).await;
    }
    (hall, kitchen, attic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activity_runs_from_start_to_final_scores_and_concurrent_increments_add_up() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (hall, kitchen, attic) = home(&dirs).await;

    // Bad input: a 4xx that says what is wrong, and no activity.
    for (path, body, want) in [
        (
            "/api/activities",
            json!({"type": "poker", "device_ids": ["hall"]}),
            400,
        ),
        (
            "/api/activities",
            json!({"type": "trivia", "device_ids": []}),
            400,
        ),
        (
            "/api/activities",
            json!({"type": "trivia", "device_ids": ["garage"]}),
            404,
        ),
        (
            "/api/activities",
            json!({"type": "trivia", "device_ids": ["hall"], "x": 1}),
            400,
        ),
        (
            "/api/activities",
            json!({"type": "trivia", "device_ids": ["hall"], "config": 3}),
            400,
        ),
        (
            "/api/activities",
            json!({"type": "trivia", "device_ids": ["hall"], "room_id": "den"}),
            404,
        ),
    ] {
        let (status, reply) = call(&hall, "POST", path, &body);
        assert_eq!(status, want, "{body}: {reply}");
        assert!(reply["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    assert!(hall.activities().list().await.unwrap().is_empty());

    let mut kitchen_events = kitchen.events();
    let mut attic_events = attic.events();
    let (status, started) = call(
        &hall,
        "POST",
        "/api/activities",
        &json!({"type": "trivia", "device_ids": ["hall", "kitchen", "attic"],
                "config": {"difficulty": "easy", "rounds": 10}}),
    );
    assert_eq!(status, 200, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    // Starting until the kitchen and the attic acknowledge: the hall did on the spot.
    assert_eq!(started["state"], "starting");
    assert!(!started["devices"][0]["acknowledged_at"].is_null());
    assert!(started["devices"][1]["acknowledged_at"].is_null());
    // Each named device raises seed 000's group start on receipt.
    for events in [&mut kitchen_events, &mut attic_events] {
        let got = next_named(events, "coordination.group_start").await;
        assert_eq!(got["activity_id"], id.as_str());
        assert_eq!(got["activity_type"], "trivia");
        assert_eq!(got["config"]["rounds"], 10);
    }
    for node in [&hall, &kitchen, &attic] {
        wait_state(node, &id, "active").await;
    }
    let a = kitchen.activities().get(&id).await.unwrap();
    assert!(a.devices.iter().all(|d| d.acknowledged_at.is_some()));
    assert!(a.started_at.is_some());

    // Increments on two devices at once, to the kitchen's score: all of them count.
    let (k, t) = (kitchen.activities(), attic.activities());
    let (id1, id2) = (id.clone(), id.clone());
    let from_kitchen = async move {
        for _ in 0..10 {
            k.score(&id1, "kitchen", 1).await.unwrap();
        }
    };
    let from_attic = async move {
        for _ in 0..10 {
            t.score(&id2, "kitchen", 2).await.unwrap();
        }
    };
    tokio::join!(from_kitchen, from_attic);
    let (status, reply) = call(
        &attic,
        "POST",
        &format!("/api/activities/{id}/score"),
        &json!({"device": "hall", "delta": 5}),
    );
    assert_eq!(status, 200, "{reply}");
    for node in [&hall, &kitchen, &attic] {
        until("every increment reaches every device", || async {
            node.activities().get(&id).await.is_ok_and(|a| {
                a.scores.get(kitchen.peer_id().as_str()) == Some(&30)
                    && a.scores.get(hall.peer_id().as_str()) == Some(&5)
            })
        })
        .await;
    }
    for (body, want) in [
        (json!({"device": "kitchen", "delta": 0}), 400),
        (json!({"device": "garage", "delta": 1}), 404),
        (json!({"device": "kitchen"}), 400),
    ] {
        let (status, reply) = call(&hall, "POST", &format!("/api/activities/{id}/score"), &body);
        assert_eq!(status, want, "{body}: {reply}");
    }

    // Only the initiator moves it; pause, resume, step.
    let (status, _) = call(
        &kitchen,
        "POST",
        &format!("/api/activities/{id}/pause"),
        &json!({}),
    );
    assert_eq!(status, 409);
    let (status, _) = call(
        &hall,
        "POST",
        &format!("/api/activities/{id}/dance"),
        &json!({}),
    );
    assert_eq!(status, 404);
    let (status, paused) = call(
        &hall,
        "POST",
        &format!("/api/activities/{id}/pause"),
        &json!({}),
    );
    assert_eq!((status, paused["state"].as_str()), (200, Some("paused")));
    wait_state(&attic, &id, "paused").await;
    let (status, _) = call(
        &attic,
        "POST",
        &format!("/api/activities/{id}/score"),
        &json!({"device": "attic", "delta": 1}),
    );
    assert_eq!(status, 409, "no scoring while paused");
    let (status, resumed) = call(
        &hall,
        "POST",
        &format!("/api/activities/{id}/resume"),
        &json!({}),
    );
    assert_eq!((status, resumed["state"].as_str()), (200, Some("active")));
    let stepped = hall
        .activities()
        .act(&id, ActivityAction::Step)
        .await
        .unwrap();
    assert_eq!(stepped.step, 1);

    // The end publishes the final scores, on every device.
    let ended = hall
        .activities()
        .act(&id, ActivityAction::End)
        .await
        .unwrap();
    assert_eq!(ended.state, "ended");
    assert_eq!(ended.reason.as_deref(), Some("ended"));
    let finals = ended.final_scores.clone().unwrap();
    assert_eq!(finals[kitchen.peer_id().as_str()], 30);
    assert_eq!(finals[hall.peer_id().as_str()], 5);
    assert_eq!(finals[attic.peer_id().as_str()], 0);
    for events in [&mut kitchen_events, &mut attic_events] {
        let end = next_named(events, "coordination.group_end").await;
        assert_eq!(end["final_scores"][kitchen.peer_id().as_str()], 30);
    }
    wait_state(&attic, &id, "ended").await;
    assert_eq!(
        attic.activities().get(&id).await.unwrap().final_scores,
        Some(finals)
    );

    // The CLI shows it.
    let mut cmd = hearth();
    cmd.args(["activity", "show", &id, "--json", "--data"])
        .arg(attic.data_dir());
    let out = timeout(
        WAIT,
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["state"], "ended");
    assert_eq!(shown["type"], "trivia");
    for node in [hall, kitchen, attic] {
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_device_down_the_start_ends_no_ack_naming_it() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let hall = start(dirs[0].path(), "hall").await;
    let kitchen = join_and_start(&hall, dirs[1].path(), "kitchen").await;
    let attic = join_and_start(&hall, dirs[2].path(), "attic").await;
    for x in [&kitchen, &attic] {
        wait_admitted(&hall, x.peer_id()).await;
    }
    let attic_id = attic.peer_id().to_string();
    timeout(T, attic.shutdown()).await.unwrap().unwrap();

    let mut hall_events = hall.events();
    let a = hall
        .activities()
        .start(hearth::NewActivity {
            kind: "sing_along".into(),
            device_ids: vec!["kitchen".into(), "attic".into()],
            ..hearth::NewActivity::default()
        })
        .await
        .unwrap();
    assert_eq!(a.state, "starting");
    // The kitchen acknowledges; the activity still waits for the attic, and no timer
    // makes it active.
    until("the kitchen acknowledges", || async {
        hall.activities().get(&a.id).await.is_ok_and(|a| {
            a.devices
                .iter()
                .any(|d| d.device.as_deref() == Some("kitchen") && d.acknowledged_at.is_some())
        })
    })
    .await;
    let ended = next_named(&mut hall_events, "activity.ended").await;
    assert_eq!(ended["reason"], "no_ack");
    assert_eq!(ended["missing"], json!([attic_id]));
    for node in [&hall, &kitchen] {
        wait_state(node, &a.id, "ended").await;
        let got = node.activities().get(&a.id).await.unwrap();
        assert_eq!(got.reason.as_deref(), Some("no_ack"));
        assert_eq!(got.missing, [attic_id.as_str()]);
        assert_eq!(got.started_at, None, "it never became active");
    }
    for node in [hall, kitchen] {
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }
}
