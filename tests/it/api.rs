//! The REST API through a real HTTP client: every route, auth failures and bad input, and
//! the metrics endpoint.

use std::path::Path;

use hearth::{ApiConfig, Config, Node};
use serde_json::{Value, json};

use crate::util::{WAIT, http_get, http_send};

/// An in-process node on its own runtime, driven from the test thread with blocking
/// HTTP calls.
pub(crate) struct TestNode {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) node: Option<Node>,
    pub(crate) api: String,
    pub(crate) token: String,
}

pub(crate) fn config(dir: &Path, name: &str) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        api: Some(ApiConfig::on("127.0.0.1:0".parse().unwrap())),
        device_name: Some(name.into()),
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        mdns: false,
        ..Config::default()
    }
}

impl TestNode {
    pub(crate) fn start(dir: &Path, name: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Self::start_on(rt, dir, name)
    }

    pub(crate) fn start_on(rt: tokio::runtime::Runtime, dir: &Path, name: &str) -> Self {
        Self::start_config(rt, config(dir, name))
    }

    /// Starts a node with `config` on `rt`.
    pub(crate) fn start_config(rt: tokio::runtime::Runtime, config: Config) -> Self {
        let dir = config.data_dir.clone();
        let node = rt
            .block_on(async { tokio::time::timeout(WAIT, Node::start(config)).await })
            .expect("node start timed out")
            .expect("node start");
        let token = std::fs::read_to_string(dir.join(hearth::TOKEN_FILE))
            .unwrap()
            .trim()
            .to_string();
        let api = node.api_addr().unwrap().to_string();
        Self {
            rt,
            node: Some(node),
            api,
            token,
        }
    }

    pub(crate) fn node(&self) -> &Node {
        self.node.as_ref().unwrap()
    }

    /// A request with the node's token; returns the status and the JSON body.
    pub(crate) fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let text = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, reply) = if method == "GET" {
            http_get(&self.api, path, Some(&self.token))
        } else {
            http_send(&self.api, method, path, Some(&self.token), &text)
        };
        let value = serde_json::from_str(&reply)
            .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {reply:?}"));
        (status, value)
    }

    /// A request that must succeed with `want`; returns the body.
    pub(crate) fn ok(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let (status, value) = self.call(method, path, body);
        assert_eq!(status, want, "{method} {path}: {value}");
        value
    }

    /// A request that must fail with `want` and a JSON error of `kind`.
    pub(crate) fn refused(&self, method: &str, path: &str, body: &str, want: u16, kind: &str) {
        let (status, reply) = if method == "GET" {
            http_get(&self.api, path, Some(&self.token))
        } else {
            http_send(&self.api, method, path, Some(&self.token), body)
        };
        assert_eq!(status, want, "{method} {path} {body:?}: {reply}");
        let value: Value = serde_json::from_str(&reply).unwrap_or_else(|_| panic!("{reply}"));
        assert_eq!(value["error"], kind, "{method} {path}: {value}");
        assert!(
            value["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{value}"
        );
        // The node keeps serving after every refusal.
        assert_eq!(http_get(&self.api, "/health/live", None).0, 200);
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(WAIT, node.shutdown()).await });
        }
    }
}

#[test]
fn peers_lists_known_but_unconnected_peers() {
    // A static peer on a loopback port nobody listens on: known, redialled, never connected.
    let port = crate::util::free_port();
    let absent = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = config(dir.path(), "den");
    cfg.static_peers = vec![format!("/ip4/127.0.0.1/tcp/{port}/p2p/{absent}")];
    let node = rt
        .block_on(async { tokio::time::timeout(WAIT, Node::start(cfg)).await })
        .unwrap()
        .unwrap();
    let token = std::fs::read_to_string(dir.path().join(hearth::TOKEN_FILE)).unwrap();
    let api = node.api_addr().unwrap().to_string();
    let n = TestNode {
        rt,
        node: Some(node),
        api,
        token: token.trim().to_string(),
    };
    let peers = n.ok("GET", "/api/peers", None, 200);
    let list = peers["peers"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{peers}");
    assert_eq!(list[0]["peer_id"], absent);
    assert_eq!(list[0]["connected"], false);
    assert_eq!(list[0]["admitted"], false);
    assert_eq!(list[0]["is_static"], true);
    assert_eq!(
        list[0]["addrs"],
        json!([format!("/ip4/127.0.0.1/tcp/{port}")])
    );
}

#[test]
fn status_peers_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let status = n.ok("GET", "/api/status", None, 200);
    assert_eq!(status["home"]["home_id"], n.node().home_id().as_str());
    assert_eq!(status["device"], "den");
    assert_eq!(status["peer_id"], n.node().peer_id().as_str());
    assert!(!status["listen"].as_array().unwrap().is_empty(), "{status}");
    assert_eq!(status["peers"], json!([]));
    assert_eq!(n.ok("GET", "/api/peers", None, 200), json!({"peers": []}));

    for (method, path) in [
        ("GET", "/api/status"),
        ("GET", "/api/peers"),
        ("DELETE", "/api/entities/light.x"),
        ("GET", "/api/entities/light.x/history"),
        ("POST", "/api/rooms"),
        ("GET", "/api/rooms/den/messages"),
        ("PUT", "/api/presence/alice"),
        ("GET", "/api/presence"),
    ] {
        for token in [None, Some("wrong")] {
            let (status, body) = if method == "GET" {
                http_get(&n.api, path, token)
            } else {
                http_send(&n.api, method, path, token, "{}")
            };
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"], "unauthorized");
        }
    }
    assert_eq!(n.ok("GET", "/api/status", None, 200)["device"], "den");
}

#[test]
fn entity_delete_history_restore_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let on = n.ok(
        "PUT",
        "/api/entities/light.porch",
        Some(json!({"state": "on", "attributes": {"brightness": 80}})),
        200,
    );
    let off = n.ok(
        "PUT",
        "/api/entities/light.porch",
        Some(json!({"state": "off", "attributes": {"brightness": 0}})),
        200,
    );
    let history = n.ok("GET", "/api/entities/light.porch/history", None, 200);
    let versions: Vec<&str> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert!(
        versions.contains(&on["version"].as_str().unwrap()),
        "{history}"
    );
    assert_eq!(*versions.last().unwrap(), off["version"].as_str().unwrap());
    for v in history["versions"].as_array().unwrap() {
        assert_eq!(v["device"], n.node().peer_id().as_str(), "{v}");
        assert_eq!(v["home"], n.node().home_id().as_str());
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
    let limited = n.ok(
        "GET",
        "/api/entities/light.porch/history?limit=1",
        None,
        200,
    );
    assert_eq!(limited["versions"].as_array().unwrap().len(), 1);

    // Two writes, no cut yet: generation 0, one generation held with both changes.
    let storage = n.ok("GET", "/api/entities/light.porch/storage", None, 200);
    assert_eq!(storage["generation"], 0, "{storage}");
    assert_eq!(storage["generations_held"], 1, "{storage}");
    assert_eq!(storage["changes"], 2, "{storage}");
    assert!(storage["bytes"].as_u64().unwrap() > 0, "{storage}");
    n.refused(
        "GET",
        "/api/entities/light.nothing/storage",
        "",
        404,
        "not_found",
    );

    // Restore by an 8-digit prefix brings back the first write as a new version.
    let prefix = &on["version"].as_str().unwrap()[..8];
    let restored = n.ok(
        "POST",
        "/api/entities/light.porch/restore",
        Some(json!({"version": prefix})),
        200,
    );
    assert_eq!(restored["state"], "on");
    assert_eq!(restored["attributes"]["brightness"], 80);
    assert_ne!(restored["version"], on["version"]);
    let body = r#"{"version": "0000000000"}"#;
    n.refused(
        "POST",
        "/api/entities/light.porch/restore",
        body,
        404,
        "not_found",
    );
    let body = r#"{"version": "abc"}"#;
    n.refused(
        "POST",
        "/api/entities/light.porch/restore",
        body,
        400,
        "bad_request",
    );
    let body = r#"{"version": "zzzzzzzzzz"}"#;
    n.refused(
        "POST",
        "/api/entities/light.porch/restore",
        body,
        400,
        "bad_request",
    );
    let body = r#"{"version": "abcdef12", "extra": 1}"#;
    n.refused(
        "POST",
        "/api/entities/light.porch/restore",
        body,
        400,
        "bad_request",
    );
    let body = r#"{"version": 12345678}"#;
    n.refused(
        "POST",
        "/api/entities/light.porch/restore",
        body,
        400,
        "bad_request",
    );

    // Bad bodies on the entity write.
    let path = "/api/entities/light.porch";
    n.refused("PUT", path, "{not json", 400, "bad_request");
    n.refused(
        "PUT",
        path,
        r#"{"state": "on", "colour": 1}"#,
        400,
        "bad_request",
    );
    n.refused("PUT", path, r#"{"state": 5}"#, 400, "bad_request");
    n.refused(
        "PUT",
        path,
        r#"{"state": "on", "attributes": []}"#,
        400,
        "bad_request",
    );
    let big = format!(
        r#"{{"state": "on", "attributes": {{"x": "{}"}}}}"#,
        "a".repeat(300_000)
    );
    n.refused("PUT", path, &big, 413, "too_large");
    // No content type: axum's 415, mapped onto 400.
    let (status, body) = {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let req = ureq::http::Request::builder()
            .method("PUT")
            .uri(format!("http://{}{path}", n.api))
            .header("Authorization", format!("Bearer {}", n.token))
            .body(r#"{"state": "on"}"#.to_string())
            .unwrap();
        let mut resp = agent.run(req).unwrap();
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap(),
        )
    };
    assert_eq!(status, 400, "{body}");

    // Delete: 404 afterwards everywhere, and gone from the list.
    let deleted = n.ok("DELETE", path, None, 200);
    assert_eq!(deleted["id"], "light.porch");
    n.refused("GET", path, "", 404, "not_found");
    n.refused("DELETE", path, "", 404, "not_found");
    n.refused(
        "GET",
        "/api/entities/light.porch/history",
        "",
        404,
        "not_found",
    );
    let body = r#"{"version": "abcdef12"}"#;
    n.refused(
        "POST",
        "/api/entities/light.porch/restore",
        body,
        404,
        "not_found",
    );
    n.refused(
        "GET",
        "/api/entities/light.nothing/history",
        "",
        404,
        "not_found",
    );
    let list = n.ok("GET", "/api/entities", None, 200);
    assert_eq!(list["entities"], json!([]));
    // The id can be used again, as a new entity.
    let again = n.ok("PUT", path, Some(json!({"state": "dim"})), 200);
    assert_eq!(again["state"], "dim");
    assert_eq!(again["attributes"], json!({}));
}

#[test]
fn rooms_and_presence_round_trip_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let room = n.ok(
        "POST",
        "/api/rooms",
        Some(json!({"name": "kitchen", "max_size": 2})),
        201,
    );
    let id = room["room_id"].as_str().unwrap().to_string();
    assert_eq!(room["name"], "kitchen");
    assert_eq!(room["creator"], "den");
    assert_eq!(room["max_size"], 2);
    assert_eq!(room["members"][0]["user"], "den");
    assert_eq!(room["members"][0]["device"], n.node().peer_id().as_str());
    assert!(room["created_at"].as_str().unwrap().ends_with('Z'));
    // By id and by name.
    assert_eq!(
        n.ok("GET", &format!("/api/rooms/{id}"), None, 200)["name"],
        "kitchen"
    );
    assert_eq!(n.ok("GET", "/api/rooms/kitchen", None, 200)["room_id"], id);
    assert_eq!(
        n.ok("GET", "/api/rooms", None, 200)["rooms"][0]["room_id"],
        id
    );

    let joined = n.ok(
        "POST",
        "/api/rooms/kitchen/join",
        Some(json!({"user": "alice"})),
        200,
    );
    assert_eq!(joined["members"].as_array().unwrap().len(), 2);
    // Joining twice changes nothing; an empty body is the device's own user.
    n.ok("POST", "/api/rooms/kitchen/join", None, 200);
    n.refused(
        "POST",
        "/api/rooms/kitchen/join",
        r#"{"user": "bob"}"#,
        409,
        "conflict",
    );
    n.refused(
        "POST",
        "/api/rooms/kitchen/join",
        r#"{"usr": "bob"}"#,
        400,
        "bad_request",
    );
    n.refused("POST", "/api/rooms/nowhere/join", "", 404, "not_found");
    n.refused("GET", "/api/rooms/nowhere", "", 404, "not_found");
    n.refused("GET", "/api/rooms/nowhere/messages", "", 404, "not_found");
    n.refused(
        "POST",
        "/api/rooms",
        r#"{"name": "kitchen"}"#,
        409,
        "conflict",
    );
    n.refused(
        "POST",
        "/api/rooms",
        r#"{"name": "x", "max_size": 0}"#,
        400,
        "bad_request",
    );
    n.refused(
        "POST",
        "/api/rooms",
        r#"{"name": "x", "max_size": "big"}"#,
        400,
        "bad_request",
    );
    n.refused(
        "POST",
        "/api/rooms",
        r#"{"name": "x", "size": 3}"#,
        400,
        "bad_request",
    );
    n.refused("POST", "/api/rooms", r#"{"name": ""}"#, 400, "bad_request");
    n.refused("POST", "/api/rooms", "[1, 2", 400, "bad_request");

    let sent = n.ok(
        "POST",
        "/api/rooms/kitchen/messages",
        Some(json!({"message": "hello"})),
        201,
    );
    assert_eq!(sent["sender"], "den");
    assert_eq!(sent["room_id"], id);
    assert!(sent["timestamp"].as_str().unwrap().ends_with('Z'));
    n.ok(
        "POST",
        &format!("/api/rooms/{id}/messages"),
        Some(json!({"message": "hi den", "user": "alice"})),
        201,
    );
    let chat = n.ok("GET", "/api/rooms/kitchen/messages?limit=10", None, 200);
    let texts: Vec<&str> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["hello", "hi den"]);
    let last = n.ok("GET", "/api/rooms/kitchen/messages?limit=1", None, 200);
    assert_eq!(last["messages"][0]["message"], "hi den");
    let path = "/api/rooms/kitchen/messages";
    n.refused(
        "POST",
        path,
        r#"{"message": "x", "user": "mallory"}"#,
        403,
        "forbidden",
    );
    n.refused("POST", path, r#"{"message": 7}"#, 400, "bad_request");
    n.refused("POST", path, r#"{"text": "x"}"#, 400, "bad_request");
    let long = format!(r#"{{"message": "{}"}}"#, "a".repeat(5000));
    n.refused("POST", path, &long, 400, "bad_request");
    n.refused(
        "GET",
        "/api/rooms/kitchen/messages?limit=many",
        "",
        400,
        "bad_request",
    );

    let left = n.ok(
        "POST",
        "/api/rooms/kitchen/leave",
        Some(json!({"user": "alice"})),
        200,
    );
    assert_eq!(left["members"].as_array().unwrap().len(), 1);
    // Now there is room for bob.
    n.ok(
        "POST",
        "/api/rooms/kitchen/join",
        Some(json!({"user": "bob"})),
        200,
    );

    // Presence.
    let set = n.ok(
        "PUT",
        "/api/presence/alice",
        Some(json!({"status": "away", "note": "out"})),
        200,
    );
    assert_eq!(set["status"], "away");
    assert_eq!(set["user"], "alice");
    assert_eq!(set["note"], "out");
    assert_eq!(set["device"], n.node().peer_id().as_str());
    n.ok(
        "PUT",
        "/api/presence/bob",
        Some(json!({"status": "busy"})),
        200,
    );
    assert_eq!(
        n.ok("GET", "/api/presence/alice", None, 200)["status"],
        "away"
    );
    n.refused(
        "PUT",
        "/api/presence/alice",
        r#"{"status": "offline"}"#,
        400,
        "bad_request",
    );
    n.refused(
        "PUT",
        "/api/presence/alice",
        r#"{"status": "asleep"}"#,
        400,
        "bad_request",
    );
    n.refused(
        "PUT",
        "/api/presence/alice",
        r#"{"status": 1}"#,
        400,
        "bad_request",
    );
    n.refused(
        "PUT",
        "/api/presence/alice",
        r#"{"status": "away", "mood": "ok"}"#,
        400,
        "bad_request",
    );
    n.refused("GET", "/api/presence/nobody", "", 404, "not_found");
    let everyone = n.ok("GET", "/api/presence", None, 200);
    let users: Vec<&str> = everyone["presence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice", "bob"]);
    // alice left the kitchen; bob is in it.
    let kitchen = n.ok("GET", "/api/presence?room=kitchen", None, 200);
    assert_eq!(
        kitchen["presence"].as_array().unwrap().len(),
        1,
        "{kitchen}"
    );
    assert_eq!(kitchen["presence"][0]["user"], "bob");
    n.refused("GET", "/api/presence?room=nowhere", "", 404, "not_found");
    n.refused("GET", "/api/presence?rooms=x", "", 400, "bad_request");
    assert_eq!(n.ok("GET", "/api/status", None, 200)["device"], "den");
}

#[test]
fn metrics_parse_and_move_with_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let scrape = || {
        let (status, text) = http_get(&n.api, "/metrics", Some(&n.token));
        assert_eq!(status, 200, "{text}");
        let lines = text.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).expect("prometheus text")
    };
    let value = |scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            // OpenMetrics counters carry `_total` on the sample, not on the family name.
            .filter(|s| s.metric == name || format!("{}_total", s.metric) == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum::<f64>()
    };
    let before = scrape();
    for name in [
        "hearth_documents",
        "hearth_entities_shared",
        "hearth_connected_peers",
        "hearth_sync_messages_total",
        "hearth_sync_bytes_total",
    ] {
        assert!(
            before.samples.iter().any(|s| s.metric == name),
            "{name} missing"
        );
    }
    let docs_before = value(&before, "hearth_documents", &[]);
    assert!(
        docs_before >= 3.0,
        "home, registry and presence: {docs_before}"
    );
    n.ok(
        "PUT",
        "/api/entities/light.a",
        Some(json!({"state": "on"})),
        200,
    );
    n.ok(
        "PUT",
        "/api/entities/light.a",
        Some(json!({"state": "off"})),
        200,
    );
    n.refused("GET", "/api/entities/light.none", "", 404, "not_found");
    let after = scrape();
    assert_eq!(value(&after, "hearth_documents", &[]), docs_before + 1.0);
    assert_eq!(
        value(&after, "hearth_events_total", &[("name", "entity.changed")])
            - value(
                &before,
                "hearth_events_total",
                &[("name", "entity.changed")]
            ),
        2.0
    );
    let route = [
        ("route", "/api/entities/:id"),
        ("method", "PUT"),
        ("status", "200"),
    ];
    assert_eq!(value(&after, "hearth_api_requests_total", &route), 2.0);
    let route = [
        ("route", "/api/entities/:id"),
        ("method", "GET"),
        ("status", "404"),
    ];
    assert_eq!(value(&after, "hearth_api_requests_total", &route), 1.0);
    assert!(
        after
            .samples
            .iter()
            .any(|s| s.metric.starts_with("libp2p_")),
        "libp2p metrics missing"
    );

    // A second device pairs and syncs: every protocol's counters move on A.
    let invite = n.ok("POST", "/api/invites", Some(json!({"kind": "device"})), 200);
    let b_dir = tempfile::tempdir().unwrap();
    let code = invite["code"].as_str().unwrap().to_string();
    let b_cfg = config(b_dir.path(), "hall");
    n.rt.block_on(async { tokio::time::timeout(WAIT, Node::join(&code, &b_cfg)).await })
        .unwrap()
        .unwrap();
    let b = TestNode::start(b_dir.path(), "hall");
    n.ok(
        "PUT",
        "/api/entities/light.b",
        Some(json!({"state": "on"})),
        200,
    );
    let deadline = std::time::Instant::now() + WAIT;
    while b
        .rt
        .block_on(b.node().entities().get("light.b"))
        .unwrap()
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "light.b never reached B"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Presence heartbeats go every 2 s; wait for at least one each way.
    let flows = |s: &prometheus_parse::Scrape, metric: &str, protocol: &str, dir: &str| {
        value(s, metric, &[("protocol", protocol), ("direction", dir)])
    };
    let deadline = std::time::Instant::now() + WAIT;
    let synced = loop {
        let now = scrape();
        if flows(
            &now,
            "hearth_sync_messages_total",
            "/hearth/ephemeral/1",
            "in",
        ) > 0.0
        {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "no heartbeat arrived");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for protocol in ["/hearth/sync/1", "/hearth/ephemeral/1", "/hearth/pair/1"] {
        for dir in ["in", "out"] {
            for metric in ["hearth_sync_messages_total", "hearth_sync_bytes_total"] {
                assert!(
                    flows(&synced, metric, protocol, dir) > flows(&after, metric, protocol, dir),
                    "{metric} {protocol} {dir} did not move"
                );
            }
        }
    }
    assert_eq!(
        value(&synced, "hearth_connected_peers", &[("admitted", "true")]),
        1.0
    );
    assert!(
        synced
            .samples
            .iter()
            .any(|s| s.metric == "hearth_sync_lag_ms"
                && s.labels.get("peer") == Some(b.node().peer_id())),
        "no sync lag for B"
    );
}

/// One request written by hand, so the method and path can be anything a stranger sends;
/// returns the status line.
fn raw_request(api: &str, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(api).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn stray_methods_and_paths_add_no_metric_series() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let series = || {
        let (status, text) = http_get(&n.api, "/metrics", Some(&n.token));
        assert_eq!(status, 200, "{text}");
        let count = text
            .lines()
            .filter(|l| l.starts_with("hearth_api_requests_total{"))
            .count();
        (count, text)
    };
    // Methods and paths nobody routes, each one different, some long; without the token,
    // as a stranger would send them.
    let round = |from: usize, to: usize| {
        for i in from..to {
            let method = if i % 10 == 0 {
                format!("M{i}{}", "X".repeat(4096))
            } else {
                format!("M{i}Q{}", i * 7919 % 1000)
            };
            for path in [
                format!("/junk/{i}"),
                format!("/api/nothing-{i}/deeper"),
                "/api/status".to_string(),
            ] {
                let line = raw_request(&n.api, &method, &path);
                assert!(
                    line.starts_with("HTTP/1.1 4"),
                    "{method:.32} {path}: {line}"
                );
            }
            assert!(raw_request(&n.api, "GET", &format!("/nowhere/{i}")).contains(" 404 "));
        }
    };
    let _ = series();
    round(0, 20);
    let (first, _) = series();
    round(20, 120);
    let (second, text) = series();
    assert_eq!(first, second, "new series appeared:\n{text}");
    assert!(!text.contains("XXXX"), "a raw method reached the metrics");
    assert!(
        !text.contains("junk") && !text.contains("nothing-"),
        "a raw path reached the metrics"
    );
    assert!(
        text.contains("method=\"OTHER\"") && text.contains("route=\"unmatched\""),
        "{text}"
    );
}

#[test]
fn the_audit_log_pages_back_from_the_newest_entry() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    // Each invite is audited.
    for _ in 0..7 {
        n.ok("POST", "/api/invites", Some(json!({"kind": "home"})), 200);
    }
    let all = n.ok("GET", "/api/audit", None, 200);
    let all = all["entries"].as_array().unwrap().clone();
    assert!(all.len() >= 7, "{all:?}");
    let mut walked: Vec<Value> = Vec::new();
    let mut path = "/api/audit?limit=3".to_string();
    let mut pages = 0;
    loop {
        let page = n.ok("GET", &path, None, 200);
        pages += 1;
        let entries = page["entries"].as_array().unwrap();
        assert!(!entries.is_empty() && entries.len() <= 3, "{page}");
        let mut older = entries.clone();
        older.extend(walked);
        walked = older;
        match page["next_before"].as_str() {
            Some(cursor) => path = format!("/api/audit?limit=3&before={cursor}"),
            None => break,
        }
    }
    assert_eq!(walked, all, "pages joined differ from the whole log");
    assert_eq!(pages, all.len().div_ceil(3));
    n.refused("GET", "/api/audit?limit=0", "", 400, "bad_request");
    n.refused("GET", "/api/audit?before=nope", "", 400, "bad_request");

    // `hearth audit` follows the pages to the start.
    let out = crate::util::run(
        crate::util::hearth().args(["audit", "--json", "--api", &n.api, "--token", &n.token]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["entries"].as_array().unwrap(), &all);
}
