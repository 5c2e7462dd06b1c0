//! What keeps the local API to its owner: `/metrics` behind the token, the Host check
//! against DNS rebinding, the Origin check on WebSocket upgrades, the token file's
//! permissions, and names from elsewhere made harmless before they reach a terminal.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use futures::StreamExt;
use hearth::{ApiConfig, Config};
use serde_json::Value;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use crate::api::{TestNode, config};
use crate::util::{UpProcess, WAIT, hearth, http_get, http_send, run};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Sends `request` as written over a plain socket (so the Host header is exactly the
/// test's) and returns the status and the body. Reads the head, then as many body bytes as
/// it announces, so a 101 (after which the socket stays open) is read too.
fn raw(api: &str, request: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(api).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream.write_all(request.as_bytes()).expect("send");
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("read the reply head");
        assert!(n == 1, "reply ended in its head: {reply:?}");
        reply.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&reply).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.trim().parse().expect("content-length"));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("read the reply body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn get_with_host(api: &str, path: &str, host: &str, token: &str) -> (u16, String) {
    raw(
        api,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        ),
    )
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

#[test]
fn metrics_need_the_token_unless_opened() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let (status, body) = http_get(&n.api, "/metrics", None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(json(&body)["error"], "unauthorized");
    let (status, _) = http_get(&n.api, "/metrics", Some("0123"));
    assert_eq!(status, 401);
    let (status, body) = http_get(&n.api, "/metrics", Some(&n.token));
    assert_eq!(status, 200);
    assert!(body.contains("hearth_documents"), "{body}");
    for probe in ["/health/live", "/health/ready"] {
        assert_eq!(http_get(&n.api, probe, None).0, 200, "{probe}");
    }

    let open_dir = tempfile::tempdir().unwrap();
    let open = TestNode::start_config(
        runtime(),
        Config {
            api: Some(ApiConfig {
                metrics_open: true,
                ..ApiConfig::on("127.0.0.1:0".parse().unwrap())
            }),
            ..config(open_dir.path(), "hall")
        },
    );
    let (status, body) = http_get(&open.api, "/metrics", None);
    assert_eq!(status, 200, "{body}");
    // Opening the metrics opens nothing else.
    assert_eq!(http_get(&open.api, "/api/status", None).0, 401);
}

#[test]
fn the_metrics_open_flag_reaches_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = UpProcess::start_with(dir.path(), &["--metrics-open"]);
    let (status, body) = http_get(&node.api, "/metrics", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hearth_documents"));
}

#[test]
fn a_foreign_host_is_refused_on_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let port = n.api.rsplit(':').next().unwrap().to_string();
    for path in [
        "/health/live",
        "/health/ready",
        "/metrics",
        "/api/status",
        "/api/ws",
        "/no/such/route",
    ] {
        for host in [
            "evil.example".to_string(),
            format!("evil.example:{port}"),
            format!("127.0.0.1.nip.io:{port}"),
        ] {
            let (status, body) = get_with_host(&n.api, path, &host, &n.token);
            assert_eq!(status, 403, "{path} for {host}: {body}");
            let body = json(&body);
            assert_eq!(body["error"], "forbidden");
            let detail = body["detail"].as_str().unwrap();
            assert!(
                detail.contains("not this node's address") && detail.contains("DNS-rebinding"),
                "{detail}"
            );
        }
    }
    // A WebSocket upgrade for a foreign host is refused before it is upgraded.
    let (status, _) = raw(
        &n.api,
        &format!(
            "GET /api/ws?token={} HTTP/1.1\r\nHost: evil.example\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            n.token
        ),
    );
    assert_eq!(status, 403);
    // The node's own names pass, in any case, with or without the port.
    for host in [
        n.api.clone(),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ] {
        let (status, body) = get_with_host(&n.api, "/api/status", &host, &n.token);
        assert_eq!(status, 200, "{host}: {body}");
    }
    // HTTP/1.0 tools may send no Host at all; browsers always send one.
    let (status, body) = raw(
        &n.api,
        &format!(
            "GET /api/status HTTP/1.0\r\nAuthorization: Bearer {}\r\n\r\n",
            n.token
        ),
    );
    assert_eq!(status, 200, "{body}");
    // The usual client (which sends Host: 127.0.0.1:PORT) is unaffected.
    assert_eq!(
        http_send(&n.api, "GET", "/api/status", Some(&n.token), "").0,
        200
    );
}

#[test]
fn websockets_from_foreign_origins_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let n = TestNode::start_config(
        rt,
        Config {
            api: Some(ApiConfig {
                allowed_origins: vec!["https://Dash.example/".into()],
                ..ApiConfig::on("127.0.0.1:0".parse().unwrap())
            }),
            ..config(dir.path(), "den")
        },
    );
    let port = n.api.rsplit(':').next().unwrap().to_string();
    let connect = |origin: Option<String>| {
        let mut request = format!("ws://{}/api/ws?token={}", n.api, n.token)
            .into_client_request()
            .unwrap();
        if let Some(o) = origin {
            request.headers_mut().insert("Origin", o.parse().unwrap());
        }
        n.rt.block_on(async {
            let (mut ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(request))
                .await
                .expect("handshake timed out")?;
            let hello = timeout(WAIT, ws.next())
                .await
                .expect("no hello in time")
                .expect("socket ended")?;
            assert!(hello.to_text().unwrap().contains("\"connected\""));
            Ok::<_, tungstenite::Error>(())
        })
    };
    for ok in [
        None,
        Some(format!("http://{}", n.api)),
        Some(format!("http://localhost:{port}")),
        Some("https://dash.example".to_string()),
    ] {
        connect(ok.clone()).unwrap_or_else(|e| panic!("{ok:?} refused: {e}"));
    }
    for bad in [
        "http://evil.example".to_string(),
        "null".to_string(),
        format!("https://localhost:{port}"),
        "https://dash.example.evil".to_string(),
    ] {
        match connect(Some(bad.clone())) {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 403, "{bad}");
                let body = json(&String::from_utf8_lossy(
                    response.body().as_deref().unwrap(),
                ));
                assert_eq!(body["error"], "forbidden");
                let detail = body["detail"].as_str().unwrap();
                assert!(
                    detail.contains(&bad) && detail.contains("--allowed-origin"),
                    "{detail}"
                );
            }
            other => panic!("{bad} was not refused: {other:?}"),
        }
    }
}

#[test]
fn the_allowed_origin_flag_is_checked_and_applied() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(crate::util::up_cmd(dir.path()).args(["--allowed-origin", "dash.example"]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("http://") && stderr.contains("dash.example"),
        "{stderr}"
    );

    let node = UpProcess::start_with(
        dir.path(),
        &["--allowed-origin", "http://dash.example:3000"],
    );
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let handshake = |origin: &str| {
        raw(
            &node.api,
            &format!(
                "GET /api/ws?token={} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\n\
                 Upgrade: websocket\r\nOrigin: {origin}\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                token.trim(),
                node.api
            ),
        )
        .0
    };
    assert_eq!(handshake("http://dash.example:3000"), 101);
    assert_eq!(handshake("http://elsewhere.example"), 403);
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_token_file_others_can_read_is_refused_by_node_and_verbs() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join(hearth::TOKEN_FILE);
    let mut node = UpProcess::start(dir.path());
    let verb = |args: &[&str]| run(hearth().args(args).arg("--data").arg(dir.path()));
    assert!(verb(&["status"]).status.success());
    set_mode(&token, 0o644);
    for args in [&["status"][..], &["token"], &["entity", "list"]] {
        let out = verb(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("open to other users")
                && stderr.contains(&format!("chmod 600 {}", token.display())),
            "{args:?}: {stderr}"
        );
    }
    // A token passed explicitly does not touch the file.
    let text = std::fs::read_to_string(&token).unwrap();
    assert!(verb(&["status", "--token", text.trim()]).status.success());
    node.terminate();

    set_mode(&token, 0o640);
    let out = run(&mut crate::util::up_cmd(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");

    set_mode(&token, 0o600);
    let _node = UpProcess::start(dir.path());
    assert!(verb(&["status"]).status.success());
}

#[test]
fn names_from_elsewhere_reach_tables_without_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let node = UpProcess::start(dir.path());
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let token = token.trim();
    // An entity state and attribute (which a shared entity brings from another home) that
    // would clear the screen and retitle the window. Names (rooms, devices, notes, chat)
    // with control characters are refused where they are written, but another home's node
    // need not be this one; the CLI does not rely on it.
    let evil = "den\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m!";
    let send = |method: &str, path: &str, body: Value| {
        let (status, reply) = http_send(&node.api, method, path, Some(token), &body.to_string());
        assert!(status < 300, "{method} {path}: {status} {reply}");
    };
    send(
        "PUT",
        "/api/entities/light.x",
        serde_json::json!({ "state": evil, "attributes": { "label": evil } }),
    );
    let verb = |args: &[&str]| {
        let out = run(hearth().args(args).arg("--data").arg(dir.path()));
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    for args in [&["entity", "list"][..], &["entity", "get", "light.x"]] {
        let out = verb(args);
        assert!(out.contains("den!"), "{args:?}: {out:?}");
        assert!(
            !out.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?}: {out:?}"
        );
    }
    // JSON stays exact: the escapes are escaped, not dropped.
    let out = verb(&["entity", "get", "light.x", "--json"]);
    let entity: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(entity["state"], evil);
}
