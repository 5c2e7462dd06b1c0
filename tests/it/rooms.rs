//! Rooms, chat, presence and deletion between two devices of one home, through the REST
//! API, with the library's events on the receiving side.

use std::time::{Duration, Instant};

use hearth::{Event, EventItem, Node};
use serde_json::json;

use crate::api::{TestNode, config};
use crate::util::WAIT;

/// Polls `f` until it holds, panicking after [`WAIT`].
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two devices of one home: `a` created it and invited `b`.
pub(crate) fn pair() -> (TestNode, TestNode, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let a = TestNode::start(&dir.path().join("a"), "kitchen");
    let invite =
        a.rt.block_on(a.node().invite(Duration::from_secs(60)))
            .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let b_dir = dir.path().join("b");
    rt.block_on(async {
        tokio::time::timeout(WAIT, Node::join(&invite.code, &config(&b_dir, "hallway"))).await
    })
    .expect("join timed out")
    .expect("join");
    let b = TestNode::start_on(rt, &b_dir, "hallway");
    let peer = a.node().peer_id().clone();
    eventually("b admits a", || {
        b.rt.block_on(b.node().admitted_peers())
            .unwrap()
            .contains(&peer)
    });
    (a, b, dir)
}

#[test]
fn rooms_chat_presence_and_deletes_reach_the_other_device() {
    let (a, b, _dir) = pair();
    let mut events = b.node().events();

    // A room made on one device appears on the other, by name.
    let room = a.ok(
        "POST",
        "/api/rooms",
        Some(json!({"name": "den", "max_size": 3})),
        201,
    );
    let id = room["room_id"].as_str().unwrap().to_string();
    eventually("room reaches b", || {
        b.call("GET", "/api/rooms/den", None).0 == 200
    });
    let on_b = b.ok("GET", &format!("/api/rooms/{id}"), None, 200);
    assert_eq!(on_b["creator"], "kitchen");

    // b joins and speaks; a reads it, and a's reply reaches b.
    b.ok("POST", "/api/rooms/den/join", None, 200);
    b.ok(
        "POST",
        "/api/rooms/den/messages",
        Some(json!({"message": "hi from the hallway"})),
        201,
    );
    eventually("join and chat reach a", || {
        let chat = a.ok("GET", "/api/rooms/den/messages", None, 200);
        let room = a.ok("GET", "/api/rooms/den", None, 200);
        chat["messages"].as_array().unwrap().len() == 1
            && room["members"].as_array().unwrap().len() == 2
    });
    let chat = a.ok("GET", "/api/rooms/den/messages", None, 200);
    assert_eq!(chat["messages"][0]["sender"], "hallway");
    a.ok(
        "POST",
        "/api/rooms/den/messages",
        Some(json!({"message": "hello hallway"})),
        201,
    );
    eventually("reply reaches b", || {
        let chat = b.ok("GET", "/api/rooms/den/messages?limit=5", None, 200);
        chat["messages"].as_array().unwrap().len() == 2
    });

    // Presence set on a shows on b with a as the device, not offline (a is connected).
    a.ok(
        "PUT",
        "/api/presence/alice",
        Some(json!({"status": "busy"})),
        200,
    );
    eventually("presence reaches b", || {
        let (status, p) = b.call("GET", "/api/presence/alice", None);
        status == 200 && p["status"] == "busy"
    });
    let p = b.ok("GET", "/api/presence/alice", None, 200);
    assert_eq!(p["device"], a.node().peer_id().as_str());

    // A delete on a removes the entity on b.
    a.ok(
        "PUT",
        "/api/entities/light.porch",
        Some(json!({"state": "on"})),
        200,
    );
    eventually("entity reaches b", || {
        b.call("GET", "/api/entities/light.porch", None).0 == 200
    });
    a.ok("DELETE", "/api/entities/light.porch", None, 200);
    eventually("delete reaches b", || {
        b.call("GET", "/api/entities/light.porch", None).0 == 404
    });

    // b's library subscriber saw all of it, tagged with the sending device.
    let mut names = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !names.iter().any(|n| n == "entity.deleted") {
        assert!(Instant::now() < deadline, "events so far: {names:?}");
        let item =
            b.rt.block_on(async { tokio::time::timeout(WAIT, events.next()).await })
                .expect("event within the wait")
                .expect("node running");
        let EventItem::Event(event) = item else {
            panic!("missed events")
        };
        match &event {
            Event::RoomCreated { room, from_peer } => {
                assert_eq!(room.room_id, id);
                assert_eq!(from_peer.as_ref(), Some(a.node().peer_id()));
            }
            Event::Chat { message, .. } if message.sender == "kitchen" => {
                assert_eq!(message.message, "hello hallway");
                assert_eq!(event.from_peer(), Some(a.node().peer_id()));
            }
            Event::Presence { presence, .. } => assert_eq!(presence.user, "alice"),
            Event::Entity(change) if change.deleted => {
                assert_eq!(change.entity.id, "light.porch");
            }
            _ => {}
        }
        names.push(event.name().to_string());
    }
    for name in [
        "room.created",
        "room.member_joined",
        "room.chat",
        "presence.changed",
        "entity.changed",
        "entity.deleted",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} not seen in {names:?}"
        );
    }
}
