//! Entities through the library, the REST API and the CLI, and their persistence.

use std::time::Duration;

use hearth::{Config, EntityWrite, Event, EventItem, Node};
use serde_json::json;
use tokio::time::timeout;

use crate::util::{UpProcess, hearth, http_send, run};

const T: Duration = Duration::from_secs(30);

fn config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        mdns: false,
        ..Config::default()
    }
}

fn write(state: &str, attrs: serde_json::Value) -> EntityWrite {
    EntityWrite {
        state: state.into(),
        attributes: attrs.as_object().cloned(),
        correlation_id: None,
    }
}

/// A node from the builder serves no API and leaves nothing in its data dir besides the
/// store, its key and the lock; one asked for the API writes its token and address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_built_node_is_headless_unless_asked_for_the_api() {
    let files = |dir: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let dir = tempfile::tempdir().unwrap();
    let builder = Node::builder()
        .data_dir(dir.path())
        .listen(["/ip4/127.0.0.1/tcp/0"])
        .mdns(false);
    let node = timeout(T, builder.clone().start()).await.unwrap().unwrap();
    assert_eq!(node.api_addr(), None);
    timeout(
        T,
        node.entities().set("light.porch", write("on", json!({}))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(files(dir.path()), ["node.lock", "store", "store.key"]);
    // Without an API the metrics are still there for the embedding program.
    let metrics = timeout(T, node.metrics()).await.unwrap().unwrap();
    assert!(
        metrics.contains("hearth_events_total{name=\"entity.changed\"} 1"),
        "{metrics}"
    );
    timeout(T, node.shutdown()).await.unwrap().unwrap();
    assert_eq!(files(dir.path()), ["node.lock", "store", "store.key"]);

    let node = timeout(T, builder.api("127.0.0.1:0".parse().unwrap()).start())
        .await
        .unwrap()
        .unwrap();
    let api = node.api_addr().expect("the API was asked for");
    assert_eq!(
        std::fs::read_to_string(dir.path().join(hearth::API_ADDR_FILE))
            .unwrap()
            .trim(),
        api.to_string()
    );
    assert!(dir.path().join(hearth::TOKEN_FILE).exists());
    // The entity written headless is there: one store, whichever way the node runs.
    let e = timeout(T, node.entities().get("light.porch"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.map(|e| e.state).as_deref(), Some("on"));
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_are_written_read_announced_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = timeout(T, Node::start(config(dir.path())))
        .await
        .unwrap()
        .unwrap();
    let home_id = node.home_id().clone();
    let entities = node.entities();
    let mut changes = node.events();

    let first = timeout(
        T,
        entities.set("light.porch", write("on", json!({"brightness": 80}))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(first.state, "on");
    assert_eq!(first.attributes["brightness"], 80);
    assert_eq!(first.owner, home_id);
    assert_eq!(first.updated_by, node.peer_id());

    let second = timeout(
        T,
        entities.set(
            "light.porch",
            EntityWrite {
                state: "off".into(),
                attributes: None,
                correlation_id: Some("req-7".into()),
            },
        ),
    )
    .await
    .unwrap()
    .unwrap();
    // No attributes in the write keeps the old ones; the version moves.
    assert_eq!(second.attributes["brightness"], 80);
    assert_ne!(second.version, first.version);

    // Both writes were announced, in order, the second with its correlation id.
    let Some(EventItem::Event(Event::Entity(c1))) = timeout(T, changes.next()).await.unwrap()
    else {
        panic!("expected a change")
    };
    assert_eq!(
        (c1.entity.state.as_str(), c1.from_peer.as_deref()),
        ("on", None)
    );
    let Some(EventItem::Event(Event::Entity(c2))) = timeout(T, changes.next()).await.unwrap()
    else {
        panic!("expected a change")
    };
    assert_eq!(c2.entity.state, "off");
    assert_eq!(c2.correlation_id.as_deref(), Some("req-7"));

    timeout(T, entities.set("sensor.door", write("closed", json!({}))))
        .await
        .unwrap()
        .unwrap();
    let listed: Vec<String> = timeout(T, entities.list())
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|e| e.id.into_string())
        .collect();
    assert_eq!(listed, ["light.porch", "sensor.door"]);
    assert_eq!(
        timeout(T, entities.get("light.none"))
            .await
            .unwrap()
            .unwrap(),
        None
    );

    // Bad input is refused with a clear error and changes nothing.
    let err = timeout(T, entities.set("Not An Id", write("x", json!({}))))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("invalid entity id"), "{err}");

    timeout(T, node.shutdown()).await.unwrap().unwrap();

    // After a restart the same home holds the same entities.
    let node = timeout(T, Node::start(config(dir.path())))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(node.home_id(), home_id);
    let porch = timeout(T, node.entities().get("light.porch"))
        .await
        .unwrap()
        .unwrap()
        .expect("entity survives restart");
    assert_eq!(porch, second);
    assert_eq!(
        timeout(T, node.entities().list())
            .await
            .unwrap()
            .unwrap()
            .len(),
        2
    );
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_writes_are_all_acknowledged_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let node = timeout(T, Node::start(config(dir.path())))
        .await
        .unwrap()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let entities = node.entities();
        tasks.push(tokio::spawn(async move {
            entities
                .set(
                    &format!("sensor.s{}", i % 20),
                    write(&i.to_string(), json!({ "i": i })),
                )
                .await
        }));
    }
    for t in tasks {
        timeout(T, t).await.unwrap().unwrap().unwrap();
    }
    timeout(T, node.shutdown()).await.unwrap().unwrap();
    let node = timeout(T, Node::start(config(dir.path())))
        .await
        .unwrap()
        .unwrap();
    let all = timeout(T, node.entities().list()).await.unwrap().unwrap();
    assert_eq!(all.len(), 20);
    for e in all {
        // Each entity's final state is one of the writes aimed at it.
        let n: usize = e.state.parse().unwrap();
        assert_eq!(format!("sensor.s{}", n % 20), e.id);
        assert_eq!(e.attributes["i"], n);
    }
    timeout(T, node.shutdown()).await.unwrap().unwrap();
}

#[test]
fn rest_and_cli_round_trip_and_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("home");
    let mut node = UpProcess::start(&data);
    let token = std::fs::read_to_string(data.join("token")).unwrap();
    let token = token.trim();

    let out = run(hearth()
        .args([
            "entity",
            "set",
            "light.porch",
            "on",
            "--attr",
            "brightness=80",
            "--attr",
            "color=warm",
            "--data",
        ])
        .arg(&data));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run(hearth()
        .args(["entity", "get", "light.porch", "--json", "--data"])
        .arg(&data));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["state"], "on");
    assert_eq!(e["attributes"], json!({"brightness": 80, "color": "warm"}));
    for field in ["id", "updated_at", "updated_by", "owner", "version"] {
        assert!(e[field].is_string(), "missing {field}: {e}");
    }

    let out = run(hearth()
        .args(["entity", "list", "--json", "--data"])
        .arg(&data));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["entities"][0]["id"], "light.porch");

    let out = run(hearth()
        .args(["entity", "get", "light.none", "--data"])
        .arg(&data));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no entity"));

    // REST: every bad input gets its 4xx and a JSON error; the node keeps serving.
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        (
            "PUT",
            "/api/entities/light.porch",
            "{not json",
            400,
            "bad_request",
        ),
        (
            "PUT",
            "/api/entities/light.porch",
            r#"{"state": 5}"#,
            400,
            "bad_request",
        ),
        (
            "PUT",
            "/api/entities/light.porch",
            r#"{"state": "on", "extra": 1}"#,
            400,
            "bad_request",
        ),
        (
            "PUT",
            "/api/entities/light.porch",
            r#"{"attributes": {}}"#,
            400,
            "bad_request",
        ),
        (
            "PUT",
            "/api/entities/BAD",
            r#"{"state": "on"}"#,
            400,
            "bad_request",
        ),
        (
            "PUT",
            "/api/entities/light.porch",
            r#"{"state": "on", "attributes": [1]}"#,
            400,
            "bad_request",
        ),
        ("GET", "/api/entities/light.nothing", "", 404, "not_found"),
        ("GET", "/api/nothing", "", 404, "not_found"),
    ];
    for (method, path, body, status, kind) in cases {
        let (code, text) = http_send(&node.api, method, path, Some(token), body);
        assert_eq!(code, *status, "{method} {path} {body}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"], *kind, "{text}");
        assert!(
            v["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{text}"
        );
    }
    let huge = format!(
        r#"{{"state": "on", "attributes": {{"x": "{}"}}}}"#,
        "a".repeat(400_000)
    );
    let (code, text) = http_send(
        &node.api,
        "PUT",
        "/api/entities/light.porch",
        Some(token),
        &huge,
    );
    assert_eq!(code, 413, "{text}");
    let (code, _) = http_send(
        &node.api,
        "PUT",
        "/api/entities/light.porch",
        None,
        r#"{"state":"x"}"#,
    );
    assert_eq!(code, 401);

    // Still serving, and the refused writes changed nothing.
    let out = run(hearth()
        .args(["entity", "get", "light.porch", "--json", "--data"])
        .arg(&data));
    let after: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after, e);
    assert_eq!(node.terminate().code(), Some(0));
}
