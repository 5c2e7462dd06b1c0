//! Emergency alerts, in process on loopback with mDNS off: an alert reaches every device
//! of the home and of a paired home that opted in, and a paired home that did not opt in
//! declines it; receipts say who has it; a device that is down when the alert is sent
//! gets it when it returns within the TTL, and an expired alert is never delivered; the
//! outbox survives a restart of the sender. The API refuses bad input with a 4xx, and the
//! CLI raises, shows and opts in.

use std::time::Duration;

use hearth::{AlertRecord, Event, EventItem, Node, ReceiptState};
use serde_json::{Value, json};
use tokio::time::timeout;

use crate::sharing::{pair, until};
use crate::util::{WAIT, hearth, http_get, http_send};
use crate::ws::{config, join_and_start, start, token, wait_admitted};

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

/// The next alert on `events`, skipping everything else.
async fn next_alert(events: &mut hearth::Events) -> (hearth::Alert, Option<String>) {
    timeout(T, async {
        loop {
            match events.next().await {
                Some(EventItem::Event(Event::Alert { alert, from_peer })) => {
                    return (*alert, from_peer.map(|p| p.to_string()));
                }
                Some(_) => continue,
                None => panic!("the node stopped"),
            }
        }
    })
    .await
    .expect("no alert in time")
}

/// The receipt state of `device` for alert `id` sent by `node`.
async fn receipt(node: &Node, id: &str, device: &str) -> Option<ReceiptState> {
    let record: AlertRecord = node.alerts().get(id).await.unwrap();
    record
        .receipts
        .iter()
        .find(|r| r.device.as_str() == device)
        .map(|r| r.state)
}

async fn wait_receipt(node: &Node, id: &str, device: &str, state: ReceiptState) {
    until(&format!("{device} {state:?} for {id}"), || async {
        receipt(node, id, device).await == Some(state)
    })
    .await;
}

async fn has_alert(node: &Node, id: &str) -> bool {
    node.alerts()
        .list()
        .await
        .unwrap()
        .iter()
        .any(|a| a.alert.id == id)
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
async fn an_alert_reaches_the_home_and_the_paired_homes_that_opted_in_only() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a1 = start(dirs[0].path(), "a1").await;
    let a2 = join_and_start(&a1, dirs[1].path(), "a2").await;
    let p1 = start(dirs[2].path(), "p1").await;
    let q1 = start(dirs[3].path(), "q1").await;
    wait_admitted(&a1, a2.peer_id()).await;
    wait_admitted(&a2, a1.peer_id()).await;
    pair(&a1, &p1).await;
    pair(&a1, &q1).await;
    // P takes A's alerts (over the API); Q never opted in.
    let (status, body) = call(
        &p1,
        "PUT",
        &format!("/api/homes/{}/alerts", a1.home_id()),
        &json!({"accept": true}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accept"], true);
    assert_eq!(body["home_id"], a1.home_id().as_str());

    let mut streams: Vec<_> = [&a1, &a2, &p1].iter().map(|n| n.events()).collect();
    let (status, sent) = call(
        &a1,
        "POST",
        "/api/alerts",
        &json!({"message": "smoke in the kitchen", "severity": "critical", "ttl_s": 600}),
    );
    assert_eq!(status, 200, "{sent}");
    let id = sent["id"].as_str().unwrap().to_string();
    assert_eq!(sent["severity"], "critical");
    assert_eq!(sent["ttl_s"], 600);
    assert_eq!(sent["direction"], "sent");
    assert_eq!(sent["source"]["device"], a1.peer_id().as_str());
    // One receipt per other device of the home and per device of each paired home.
    let targets: Vec<&str> = sent["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["device"].as_str().unwrap())
        .collect();
    assert_eq!(targets.len(), 3, "{sent}");
    for n in [&a2, &p1, &q1] {
        assert!(targets.contains(&n.peer_id().as_str()), "{sent}");
    }

    // `emergency.alert` on the sender, on the other device of its home, and on the
    // paired home that opted in, with its source.
    for (i, node) in [&a1, &a2, &p1].iter().enumerate() {
        let (alert, from) = next_alert(&mut streams[i]).await;
        assert_eq!(alert.id, id);
        assert_eq!(alert.message, "smoke in the kitchen");
        assert_eq!(alert.severity, hearth::Severity::Critical);
        assert_eq!(alert.source.home, *a1.home_id());
        assert_eq!(alert.source.device, *a1.peer_id());
        let expected_from = (node.peer_id() != a1.peer_id()).then(|| a1.peer_id().to_string());
        assert_eq!(from, expected_from);
    }
    // Receipts: acknowledged by the home's device and the opted-in home, declined by the
    // home that did not opt in, which never raised it.
    wait_receipt(&a1, &id, a2.peer_id().as_str(), ReceiptState::Acknowledged).await;
    wait_receipt(&a1, &id, p1.peer_id().as_str(), ReceiptState::Acknowledged).await;
    wait_receipt(&a1, &id, q1.peer_id().as_str(), ReceiptState::Declined).await;
    assert!(!has_alert(&q1, &id).await);
    let q_counters = q1.alerts().counters().await.unwrap();
    assert_eq!(q_counters.received, 0);
    assert!(q_counters.declined >= 1);

    // GET /api/alerts/{id} on the sender shows each receipt; GET /api/alerts on the
    // receiver lists it as received from A.
    let (status, shown) = call(&a1, "GET", &format!("/api/alerts/{id}"), &Value::Null);
    assert_eq!(status, 200);
    for r in shown["receipts"].as_array().unwrap() {
        let expected = if r["device"] == q1.peer_id().as_str() {
            "declined"
        } else {
            "acknowledged"
        };
        assert_eq!(r["state"], expected, "{shown}");
        assert!(r["attempts"].as_u64().unwrap() >= 1, "{shown}");
        assert!(r["delivered_at"].is_string() && r["acknowledged_at"].is_string());
        assert_eq!(
            r["home"],
            if r["device"] == a2.peer_id().as_str() {
                a1.home_id().as_str()
            } else if r["device"] == p1.peer_id().as_str() {
                p1.home_id().as_str()
            } else {
                q1.home_id().as_str()
            }
        );
    }
    let (status, listed) = call(&p1, "GET", "/api/alerts", &Value::Null);
    assert_eq!(status, 200);
    let got = &listed["alerts"][0];
    assert_eq!(got["id"], id.as_str(), "{listed}");
    assert_eq!(got["direction"], "received");
    assert_eq!(got["source"]["home"], a1.home_id().as_str());
    assert_eq!(got["receipts"], json!([]));

    // Bad input gets a clear 4xx.
    for (body, what) in [
        (json!({"message": "x", "severity": "loud"}), "severity"),
        (json!({"message": "x", "ttl_s": 0}), "ttl_s"),
        (json!({"message": "  "}), "blank"),
        (json!({"message": "x", "colour": "red"}), "colour"),
        (json!({"severity": "info"}), "message"),
        (json!({"message": "x".repeat(2000)}), "bytes"),
    ] {
        let (status, error) = call(&a1, "POST", "/api/alerts", &body);
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"], "bad_request");
        assert!(error["detail"].as_str().unwrap().contains(what), "{error}");
    }
    let (status, _) = call(&a1, "GET", "/api/alerts/5Kq9wXyzAbCdEfGhJk", &Value::Null);
    assert_eq!(status, 404);
    let (status, _) = call(
        &a1,
        "PUT",
        "/api/homes/nowhere/alerts",
        &json!({"accept": true}),
    );
    assert_eq!(status, 404);
    let (status, _) = call(
        &p1,
        "PUT",
        &format!("/api/homes/{}/alerts", a1.home_id()),
        &json!({"accept": "yes"}),
    );
    assert_eq!(status, 400);

    // The CLI: P opts out again, then A raises a second alert, which P now declines.
    let out = cli(&p1, &["homes", "alerts", a1.home_id().as_str(), "off"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("refuses"));
    let out = cli(
        &a1,
        &["alert", "all clear", "--severity", "info", "--ttl", "10m"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let second = String::from_utf8(out.stdout).unwrap().trim().to_string();
    wait_receipt(&a1, &second, p1.peer_id().as_str(), ReceiptState::Declined).await;
    wait_receipt(
        &a1,
        &second,
        a2.peer_id().as_str(),
        ReceiptState::Acknowledged,
    )
    .await;
    let out = cli(&a1, &["alerts", &second, "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["severity"], "info");
    assert_eq!(shown["ttl_s"], 600);
    // Newest first.
    let all = a1.alerts().list().await.unwrap();
    assert_eq!(all[0].alert.id, second);
    assert_eq!(all[1].alert.id, id);
    let out = cli(&a1, &["alert", "x", "--severity", "loud"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    for node in [a1, a2, p1, q1] {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_is_down_gets_the_alert_when_it_returns_even_after_the_sender_restarts() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a1 = start(dirs[0].path(), "a1").await;
    let a1_addr = a1.listen_addrs().await.unwrap().remove(0);
    let a2 = join_and_start(&a1, dirs[1].path(), "a2").await;
    let a2_id = a2.peer_id().clone();
    wait_admitted(&a1, a2_id.as_str()).await;
    a2.shutdown().await.unwrap();
    until("a2 gone", || async {
        !a1.admitted_peers().await.unwrap().contains(&a2_id)
    })
    .await;

    // Raised while A2 is down: one that outlives the wait, one that does not.
    let kept = a1
        .alerts()
        .send(hearth::NewAlert::new("burst pipe").ttl(Duration::from_secs(600)))
        .await
        .unwrap();
    let brief = a1
        .alerts()
        .send(hearth::NewAlert::new("doorbell").ttl(Duration::from_secs(1)))
        .await
        .unwrap();
    // Not acknowledged: A2 is down. `delivered` (sent) is possible too: a redial that A2
    // started while it was stopping can reach A1 after A1 saw A2 leave, and A1 sends on
    // that connection until it learns it closed.
    let state = receipt(&a1, &kept.alert.id, a2_id.as_str()).await;
    assert!(
        matches!(state, Some(ReceiptState::Pending | ReceiptState::Delivered)),
        "{state:?}"
    );
    wait_receipt(&a1, &brief.alert.id, a2_id.as_str(), ReceiptState::Expired).await;

    // The sender restarts, on the address A2 keeps dialling; its outbox is still there.
    a1.shutdown().await.unwrap();
    let mut again = config(dirs[0].path(), "a1");
    again.listen = vec![a1_addr];
    let a1 = timeout(T, Node::start(again)).await.unwrap().unwrap();
    let state = receipt(&a1, &kept.alert.id, a2_id.as_str()).await;
    assert!(
        matches!(state, Some(ReceiptState::Pending | ReceiptState::Delivered)),
        "{state:?}"
    );
    assert_eq!(
        receipt(&a1, &brief.alert.id, a2_id.as_str()).await,
        Some(ReceiptState::Expired)
    );

    // A2 returns: the pending alert goes to it at once and is acknowledged; the expired
    // one never reaches it.
    let a2 = start(dirs[1].path(), "a2").await;
    until("a2 has the alert", || has_alert(&a2, &kept.alert.id)).await;
    wait_receipt(
        &a1,
        &kept.alert.id,
        a2_id.as_str(),
        ReceiptState::Acknowledged,
    )
    .await;
    let got = a2.alerts().get(&kept.alert.id).await.unwrap();
    assert_eq!(got.direction, hearth::Direction::Received);
    assert_eq!(got.alert.message, "burst pipe");
    assert!(!has_alert(&a2, &brief.alert.id).await);
    assert_eq!(
        receipt(&a1, &brief.alert.id, a2_id.as_str()).await,
        Some(ReceiptState::Expired)
    );
    // The received alert survives A2's own restart, and is not raised again.
    a2.shutdown().await.unwrap();
    let a2 = start(dirs[1].path(), "a2").await;
    assert!(has_alert(&a2, &kept.alert.id).await);
    wait_admitted(&a2, a1.peer_id().as_str()).await;
    assert_eq!(a2.alerts().counters().await.unwrap().received, 0);

    a1.shutdown().await.unwrap();
    a2.shutdown().await.unwrap();
}
