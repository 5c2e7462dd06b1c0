//! Device locks through seed 004's protocol, as its client speaks it: the REST routes
//! with the seed's bodies and `/ws` with the seed's messages; requests from devices that
//! are not the arbiter, forwarded to it; and `arbiter_unreachable` when it is away.

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

/// Waits until `f` holds, at most `T`.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + T;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three devices: requests from the two that are not the arbiter go to it; racing for
/// one lock, exactly one wins every time; every device reads the table and hears every
/// change; with the arbiter gone a request fails at once with `arbiter_unreachable`,
/// and the restarted arbiter still holds its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_lock_through_the_arbiter_and_exactly_one_wins_each_race() {
    use hearth::{Event, EventItem, LockAction, LockAsk, LockOutcome, LockType};

    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let admin = start(dirs[0].path(), "admin").await;
    let b = join_and_start(&admin, dirs[1].path(), "b").await;
    let c = join_and_start(&admin, dirs[2].path(), "c").await;
    for node in [&b, &c] {
        crate::ws::wait_admitted(node, admin.peer_id().as_str()).await;
        crate::ws::wait_admitted(&admin, node.peer_id().as_str()).await;
    }
    let mut c_events = c.events();

    // One device locks; the others read it and hear of it.
    let LockOutcome::Granted { key, lock } = b
        .locks()
        .request(LockAsk::new("pump", LockType::ManualOperator, "bob"))
        .await
        .unwrap()
    else {
        panic!("not granted");
    };
    assert_eq!(lock.fencing_token, 1);
    assert_eq!(
        admin.locks().device("pump").await.unwrap().unwrap().user_id,
        "bob"
    );
    eventually("c reads b's lock", || async {
        c.locks().device("pump").await.unwrap().is_some()
    })
    .await;
    let heard = timeout(T, async {
        loop {
            if let Some(EventItem::Event(Event::Lock { action, lock })) = c_events.next().await {
                return (action, lock);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(heard.0, LockAction::Acquired);
    assert_eq!(heard.1.device_name, "pump");
    // A refusal carries the holder, whoever asks.
    assert!(matches!(
        c.locks()
            .request(LockAsk::new("pump", LockType::QueueQueued, "carol"))
            .await
            .unwrap(),
        LockOutcome::Refused { .. }
    ));
    b.locks().release("pump", &key, "bob").await.unwrap();

    // The race: both ask at once; exactly one wins; the winner releases.
    let rounds = 1000;
    let mut wins = [0u32; 2];
    for round in 0..rounds {
        let ask = |who: &str| LockAsk::new("valve", LockType::QueueExecuting, who);
        let (lb, lc) = (b.locks(), c.locks());
        let (rb, rc) = tokio::join!(lb.request(ask("b")), lc.request(ask("c")));
        let outcomes = [rb.unwrap(), rc.unwrap()];
        let granted: Vec<(usize, String)> = outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                LockOutcome::Granted { key, .. } => Some((i, key.clone())),
                LockOutcome::Refused { .. } => None,
            })
            .collect();
        assert_eq!(granted.len(), 1, "round {round}: {outcomes:?}");
        let (winner, key) = &granted[0];
        wins[*winner] += 1;
        let node = if *winner == 0 { &b } else { &c };
        let user = if *winner == 0 { "b" } else { "c" };
        node.locks().release("valve", key, user).await.unwrap();
    }
    assert_eq!(wins[0] + wins[1], rounds);

    // A lease held when the arbiter goes.
    let LockOutcome::Granted { .. } = b
        .locks()
        .request(LockAsk::new("door", LockType::Maintenance, "tech"))
        .await
        .unwrap()
    else {
        panic!("not granted");
    };
    let admin_peer = admin.peer_id().to_string();
    timeout(T, admin.shutdown()).await.unwrap().unwrap();
    eventually("b sees the arbiter go", || async {
        !b.admitted_peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.as_str() == admin_peer)
    })
    .await;
    let started = std::time::Instant::now();
    let refused = c
        .locks()
        .request(LockAsk::new("door", LockType::Maintenance, "other"))
        .await;
    assert!(
        matches!(refused, Err(hearth::Error::ArbiterUnreachable(_))),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "it failed at once"
    );
    let admin = start(dirs[0].path(), "admin").await;
    let held = admin
        .locks()
        .device("door")
        .await
        .unwrap()
        .expect("the lease survived");
    assert_eq!(held.user_id, "tech");
    for node in [c, b, admin] {
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_arbiter_away_a_device_grants_nothing() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let admin = start(dirs[0].path(), "admin").await;
    let other = join_and_start(&admin, dirs[1].path(), "other").await;
    timeout(T, admin.shutdown()).await.unwrap().unwrap();
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
    timeout(T, other.shutdown()).await.unwrap().unwrap();
}

/// A home that may write a shared entity locks it through the owner's arbiter; a
/// read-only share may not lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_home_locks_a_shared_entity_through_its_owner_and_a_reader_may_not() {
    use hearth::{LockAsk, LockOutcome, LockType, Rights};

    use crate::pairing::{wait_state, write};
    use crate::sharing::{pair, start as start_home};

    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let owner = start_home(dirs[0].path(), "owner").await;
    let guest = start_home(dirs[1].path(), "guest").await;
    owner
        .entities()
        .set("light.porch", write("off"))
        .await
        .unwrap();
    owner
        .entities()
        .set("sensor.temp", write("20"))
        .await
        .unwrap();
    pair(&owner, &guest).await;
    owner
        .shares()
        .share("light.porch", guest.home_id(), Rights::Write, None)
        .await
        .unwrap();
    owner
        .shares()
        .share("sensor.temp", guest.home_id(), Rights::Read, None)
        .await
        .unwrap();
    wait_state(&guest, "light.porch", "off").await;
    wait_state(&guest, "sensor.temp", "20").await;

    let LockOutcome::Granted { key, lock } = guest
        .locks()
        .request(LockAsk::new(
            "light.porch",
            LockType::ManualOperator,
            "guest-op",
        ))
        .await
        .unwrap()
    else {
        panic!("not granted");
    };
    assert_eq!(lock.user_id, "guest-op");
    let held = owner.locks().device("light.porch").await.unwrap().unwrap();
    assert_eq!(held.fencing_token, lock.fencing_token);
    // The guest reads the owner's table for the shared entity, not a copy of its own.
    let read = guest.locks().device("light.porch").await.unwrap().unwrap();
    assert_eq!(read.fencing_token, lock.fencing_token);
    // The owner's own request of the same priority is refused: one arbiter.
    assert!(matches!(
        owner
            .locks()
            .request(LockAsk::new(
                "light.porch",
                LockType::ManualOperator,
                "owner-op"
            ))
            .await
            .unwrap(),
        LockOutcome::Refused { .. }
    ));
    guest
        .locks()
        .release("light.porch", &key, "guest-op")
        .await
        .unwrap();
    assert!(owner.locks().device("light.porch").await.unwrap().is_none());

    let refused = guest
        .locks()
        .request(LockAsk::new(
            "sensor.temp",
            LockType::Maintenance,
            "guest-op",
        ))
        .await;
    assert!(
        matches!(refused, Err(hearth::Error::Forbidden(_))),
        "{refused:?}"
    );
    assert!(owner.locks().device("sensor.temp").await.unwrap().is_none());

    // With another device of the owner home named its arbiter, the owner's admin device
    // passes the guest's request on to it and the answer back.
    let dir2 = tempfile::tempdir().unwrap();
    let owner2 = join_and_start(&owner, dir2.path(), "owner2").await;
    crate::ws::wait_admitted(&owner, owner2.peer_id().as_str()).await;
    owner.locks().name_arbiter("owner2", false).await.unwrap();
    let LockOutcome::Granted { key, .. } = guest
        .locks()
        .request(LockAsk::new(
            "light.porch",
            LockType::QueueExecuting,
            "guest-op",
        ))
        .await
        .unwrap()
    else {
        panic!("not granted");
    };
    assert_eq!(
        owner2
            .locks()
            .device("light.porch")
            .await
            .unwrap()
            .unwrap()
            .user_id,
        "guest-op"
    );
    assert_eq!(
        guest
            .locks()
            .device("light.porch")
            .await
            .unwrap()
            .unwrap()
            .user_id,
        "guest-op"
    );
    // A read-only share may be read, not locked.
    assert!(guest.locks().device("sensor.temp").await.unwrap().is_none());
    guest
        .locks()
        .release("light.porch", &key, "guest-op")
        .await
        .unwrap();
    assert!(
        owner2
            .locks()
            .device("light.porch")
            .await
            .unwrap()
            .is_none()
    );
    let refused = guest
        .locks()
        .request(LockAsk::new(
            "sensor.temp",
            LockType::Maintenance,
            "guest-op",
        ))
        .await;
    assert!(
        matches!(refused, Err(hearth::Error::Forbidden(_))),
        "{refused:?}"
    );
    timeout(T, owner2.shutdown()).await.unwrap().unwrap();
    timeout(T, guest.shutdown()).await.unwrap().unwrap();
    timeout(T, owner.shutdown()).await.unwrap().unwrap();
}

/// The admin names another device the arbiter: the lease, its key and the fencing counter
/// move with the table; every device sends its requests there; the new arbiter keeps it
/// across a restart; a handoff to a device that is down is given up and the arbiter
/// stays; the admin takes it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_hands_the_lock_table_to_another_device_and_back() {
    use hearth::{LockAsk, LockOutcome, LockType, ReleaseOutcome};

    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let admin = start(dirs[0].path(), "admin").await;
    let b = join_and_start(&admin, dirs[1].path(), "b").await;
    let c = join_and_start(&admin, dirs[2].path(), "c").await;
    // c also keeps b dialled (on a LAN, mDNS does this).
    let b_addr = format!(
        "{}/p2p/{}",
        b.listen_addrs().await.unwrap().remove(0),
        b.peer_id()
    );
    timeout(T, c.shutdown()).await.unwrap().unwrap();
    let mut c_config = crate::ws::config(dirs[2].path(), "c");
    c_config.static_peers.push(b_addr);
    let c = timeout(T, hearth::Node::start(c_config))
        .await
        .unwrap()
        .unwrap();
    for (x, y) in [(&b, &admin), (&c, &admin), (&c, &b)] {
        crate::ws::wait_admitted(x, y.peer_id().as_str()).await;
        crate::ws::wait_admitted(y, x.peer_id().as_str()).await;
    }

    let LockOutcome::Granted { key, lock } = c
        .locks()
        .request(LockAsk::new("pump", LockType::ManualOperator, "carol"))
        .await
        .unwrap()
    else {
        panic!("not granted");
    };
    assert_eq!(lock.fencing_token, 1);

    // Only the admin device may name the arbiter.
    let refused = b.locks().name_arbiter("b", false).await;
    assert!(
        matches!(refused, Err(hearth::Error::Forbidden(_))),
        "{refused:?}"
    );
    let missing = admin.locks().name_arbiter("no-such-device", false).await;
    assert!(
        matches!(missing, Err(hearth::Error::NotFound(_))),
        "{missing:?}"
    );

    let named = admin.locks().name_arbiter("b", false).await.unwrap();
    assert_eq!(named.peer_id, b.peer_id().to_string());
    assert_eq!(named.device_name.as_deref(), Some("b"));
    assert!(!named.granting, "the admin no longer grants");
    eventually("b grants", || async {
        let info = b.locks().arbiter().await.unwrap();
        info.this_device && info.granting
    })
    .await;
    // The lease moved with its key: a lower priority is refused with carol's lock (c's
    // request goes to b now), and carol releases with the key she had.
    eventually("c knows b decides", || async {
        c.locks().arbiter().await.unwrap().peer_id == b.peer_id().as_str()
    })
    .await;
    match c
        .locks()
        .request(LockAsk::new("pump", LockType::QueueQueued, "quinn"))
        .await
        .unwrap()
    {
        LockOutcome::Refused { holder, .. } => assert_eq!(holder.user_id, "carol"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.locks().release("pump", &key, "carol").await.unwrap(),
        ReleaseOutcome::Released(_)
    ));
    // The counter moved too, and the admin's requests go to b.
    let LockOutcome::Granted { lock, .. } = admin
        .locks()
        .request(LockAsk::new("door", LockType::Maintenance, "tech"))
        .await
        .unwrap()
    else {
        panic!("not granted");
    };
    assert_eq!(lock.fencing_token, 2);
    assert_eq!(
        b.locks().device("door").await.unwrap().unwrap().user_id,
        "tech"
    );
    eventually("the admin reads the table from b", || async {
        admin.locks().device("door").await.unwrap().is_some()
    })
    .await;

    // A handoff to a device that is down is given up; b still decides.
    let c_peer = c.peer_id().to_string();
    timeout(T, c.shutdown()).await.unwrap().unwrap();
    eventually("the admin sees c go", || async {
        !admin
            .admitted_peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.as_str() == c_peer)
    })
    .await;
    let failed = admin.locks().name_arbiter("c", false).await;
    assert!(
        matches!(failed, Err(hearth::Error::ArbiterUnreachable(_))),
        "{failed:?}"
    );
    eventually("b grants again after the given-up handoff", || async {
        b.locks().arbiter().await.unwrap().granting
    })
    .await;
    assert!(matches!(
        admin
            .locks()
            .request(LockAsk::new("valve", LockType::QueueQueued, "q"))
            .await
            .unwrap(),
        LockOutcome::Granted { .. }
    ));

    // The new arbiter keeps its table and its part across a restart.
    timeout(T, b.shutdown()).await.unwrap().unwrap();
    let b = start(dirs[1].path(), "b").await;
    crate::ws::wait_admitted(&admin, b.peer_id().as_str()).await;
    let info = b.locks().arbiter().await.unwrap();
    assert!(info.this_device && info.granting, "{info:?}");
    assert_eq!(
        b.locks().device("door").await.unwrap().unwrap().user_id,
        "tech"
    );

    // And the admin takes it back, table and all.
    let back = admin.locks().name_arbiter("admin", false).await.unwrap();
    assert!(back.this_device && back.granting, "{back:?}");
    assert_eq!(
        admin
            .locks()
            .device("door")
            .await
            .unwrap()
            .unwrap()
            .fencing_token,
        2
    );
    eventually("b learns the admin decides again", || async {
        let info = b.locks().arbiter().await.unwrap();
        !info.granting && info.peer_id == admin.peer_id().as_str()
    })
    .await;
    let LockOutcome::Granted { lock, .. } = b
        .locks()
        .request(LockAsk::new("fan", LockType::QueueQueued, "f"))
        .await
        .unwrap()
    else {
        panic!("not granted");
    };
    assert_eq!(lock.fencing_token, 4);
    for node in [b, admin] {
        timeout(T, node.shutdown()).await.unwrap().unwrap();
    }
}
