//! Synchronised playback (seed 000) with three devices of one home in process, two of
//! them with clocks set wrong (the test hook moves a node's playback clock): every device
//! finds the others' offsets by probing, `GET /api/peers` shows them, and a playback
//! started on a skewed device starts on every device at the same real instant, within
//! 5 ms plus the reported uncertainty, each by its own clock.

use std::time::Duration;

use hearth::{Event, EventItem, Node};
use serde_json::{Value, json};
use tokio::time::timeout;

use crate::util::{WAIT, hearth, http_get, http_send};
use crate::ws::{config, join_and_start, start, token, wait_admitted};

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

fn real_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The clock estimate `node` shows in `GET /api/peers` for `peer`, once it has at least
/// `samples` samples.
async fn clock_of(node: &Node, peer: &str, samples: u64) -> Value {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (status, body) = get(node, "/api/peers");
        assert_eq!(status, 200, "{body}");
        let clock = body["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["peer_id"] == peer)
            .map(|p| p["clock"].clone())
            .unwrap_or(Value::Null);
        if clock["total_samples"].as_u64().unwrap_or(0) >= samples {
            return clock;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no clock estimate of {peer}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next `coordination.sync_playback` on `events`.
async fn next_sync_playback(events: &mut hearth::Events) -> (String, Value) {
    timeout(T, async {
        loop {
            match events.next().await {
                Some(EventItem::Event(Event::Coordination {
                    name: "coordination.sync_playback",
                    subject,
                    data,
                    ..
                })) => return (subject, data),
                Some(_) => continue,
                None => panic!("the node stopped"),
            }
        }
    })
    .await
    .expect("no coordination.sync_playback in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playback_starts_at_one_real_instant_on_devices_with_skewed_clocks() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(dirs[0].path(), "a").await;
    let b = join_and_start(&a, dirs[1].path(), "b").await;
    let invite = timeout(T, a.invite(Duration::from_secs(600)))
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
    // B's clock is 2.5 s fast and C's 1.7 s slow; A's is right.
    let skews = [0i64, 2500, -1700];
    let nodes = [&a, &b, &c];
    for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
        wait_admitted(x, y.peer_id()).await;
        wait_admitted(y, x.peer_id()).await;
    }
    // Twice: setting a skew forgets that node's samples, and the second round forgets
    // those taken while the first was being set, so every sample from here on is of the
    // skewed clocks.
    for _ in 0..2 {
        for (node, skew) in nodes.iter().zip(skews) {
            node.debug_clock_skew(skew).await.unwrap();
        }
    }

    // Each device's estimate of each other's clock comes from probes: the first with a
    // heartbeat, then a warm-up of a few at once.
    for (i, x) in nodes.iter().enumerate() {
        for (j, y) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let clock = clock_of(x, y.peer_id(), 4).await;
            let offset = clock["offset_ms"].as_f64().unwrap();
            let uncertainty = clock["uncertainty_ms"].as_f64().unwrap();
            let truth = (skews[j] - skews[i]) as f64;
            assert!(
                (offset - truth).abs() <= 5.0 + uncertainty,
                "{} sees {}'s clock at {offset} ms ± {uncertainty}, not {truth}: {clock}",
                i,
                j
            );
            assert!(clock["rtt_ms"].as_f64().unwrap() >= 0.0, "{clock}");
            assert!(clock["samples"].as_u64().unwrap() <= 8, "{clock}");
        }
    }

    // B starts a playback 2 s from now by its own (fast) clock, on every device.
    let mut streams: Vec<_> = nodes.iter().map(|n| n.events()).collect();
    let start_at = real_now_ms() + skews[1] + 2000;
    let (status, started) = post(
        &b,
        "/api/playback",
        &json!({"media": "http://nas.local/lullaby.flac", "start_at": start_at,
                "device_ids": []}),
    );
    assert_eq!(status, 200, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    assert_eq!(started["initiator"], b.peer_id().as_str());
    assert_eq!(started["initiated_here"], true);
    assert_eq!(started["start_at"], start_at);
    assert_eq!(started["devices"].as_array().unwrap().len(), 3, "{started}");

    // Every device raises coordination.sync_playback with its local start; the real
    // instant each one stands for is the same.
    let ideal_real = start_at - skews[1];
    for (i, node) in nodes.iter().enumerate() {
        let (subject, data) = next_sync_playback(&mut streams[i]).await;
        assert_eq!(subject, id);
        assert_eq!(data["device_id"], node.peer_id().as_str(), "{data}");
        assert_eq!(data["media"], "http://nas.local/lullaby.flac");
        assert_eq!(data["start_at"], start_at);
        let local = data["local_start_at"].as_i64().unwrap();
        let uncertainty = data["uncertainty_ms"].as_f64().unwrap();
        let ideal_local = ideal_real + skews[i];
        assert!(
            ((local - ideal_local) as f64).abs() <= 5.0 + uncertainty,
            "device {i} starts at {local}, ideal {ideal_local} (± {uncertainty}): {data}"
        );
    }

    // The initiator shows each device's local start, offset and uncertainty once all
    // reported; each target shows its own.
    let deadline = tokio::time::Instant::now() + T;
    let shown = loop {
        let (status, shown) = get(&b, &format!("/api/playback/{id}"));
        assert_eq!(status, 200, "{shown}");
        let devices = shown["devices"].as_array().unwrap();
        if devices.iter().all(|d| d["state"] == "scheduled") {
            break shown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all reported: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (i, node) in nodes.iter().enumerate() {
        let d = shown["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == node.peer_id().as_str())
            .unwrap_or_else(|| panic!("device {i} missing: {shown}"));
        let local = d["local_start_at"].as_i64().unwrap();
        let uncertainty = d["uncertainty_ms"].as_f64().unwrap();
        let offset = d["offset_ms"].as_f64().unwrap();
        assert!(
            ((local - (ideal_real + skews[i])) as f64).abs() <= 5.0 + uncertainty,
            "{shown}"
        );
        assert!(
            (offset - (skews[1] - skews[i]) as f64).abs() <= 5.0 + uncertainty,
            "{shown}"
        );
        if i != 1 {
            let (status, own) = get(node, &format!("/api/playback/{id}"));
            assert_eq!(status, 200, "{own}");
            assert_eq!(own["initiated_here"], false);
            assert_eq!(own["devices"].as_array().unwrap().len(), 1);
            assert_eq!(own["devices"][0]["local_start_at"], d["local_start_at"]);
            let (_, list) = get(node, "/api/playback");
            assert_eq!(list["playbacks"][0]["id"], id.as_str(), "{list}");
        }
    }

    // One target by name, an RFC 3339 start, over the CLI too; bad input is refused.
    let soon = real_now_ms() as u64 + 60_000;
    let (status, one) = post(
        &a,
        "/api/playback",
        &json!({"media": "radio", "start_at": hearth::Timestamp::from_unix_ms(soon).to_string(),
                "device_ids": ["c"]}),
    );
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["start_at"], soon);
    assert_eq!(one["devices"].as_array().unwrap().len(), 1);
    assert_eq!(one["devices"][0]["device_id"], c.peer_id().as_str());
    assert_eq!(one["devices"][0]["state"], "pending");
    let (_, data) = next_sync_playback(&mut streams[2]).await;
    assert_eq!(data["media"], "radio");
    for (body, want) in [
        (json!({"media": " ", "start_at": soon}), 400),
        // More than a day from now, either way.
        (json!({"media": "m", "start_at": 1}), 400),
        (
            json!({"media": "m", "start_at": soon + 2 * 86_400_000}),
            400,
        ),
        (
            json!({"media": "m", "start_at": "2099-01-02T03:04:05Z"}),
            400,
        ),
        (json!({"media": "m", "start_at": -1}), 400),
        (json!({"media": "m", "start_at": "soon"}), 400),
        (json!({"media": "m"}), 400),
        (json!({"media": "m", "start_at": soon, "volume": 3}), 400),
        (
            json!({"media": "m", "start_at": soon, "device_ids": ["nobody"]}),
            404,
        ),
    ] {
        let (status, error) = post(&a, "/api/playback", &body);
        assert_eq!(status, want, "{body} -> {error}");
        assert!(error["detail"].is_string(), "{error}");
    }
    let (status, _) = get(&a, "/api/playback/5Kq9wXyzAbCdEfGhJk");
    assert_eq!(status, 404);

    let mut cmd = hearth();
    cmd.args(["playback", "show", &id, "--json", "--data"])
        .arg(b.data_dir());
    let out = timeout(
        WAIT,
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["id"], id.as_str());
    let mut cmd = hearth();
    cmd.args([
        "playback", "start", "podcast", "--in", "1s", "--to", "a", "--data",
    ])
    .arg(a.data_dir());
    let out = timeout(
        WAIT,
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, data) = next_sync_playback(&mut streams[0]).await;
    assert_eq!(data["media"], "podcast");
    assert_eq!(data["offset_ms"], 0.0);

    for node in [a, b, c] {
        node.shutdown().await.unwrap();
    }
}
