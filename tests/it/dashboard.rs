//! The dashboard's HTTP side: `/` is the login page without a session, the login sets a
//! strict, HttpOnly cookie that reads the API and opens `/api/ws`, and a change carried
//! by the cookie alone needs the node's own origin and the CSRF header. The page itself
//! runs in headless Chromium in `tests/dashboard/` (driven by `.ci/run`).

use futures::StreamExt;
use hearth::{ApiConfig, Config};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::api::{TestNode, config};
use crate::util::WAIT;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a request got back: status, its `Set-Cookie` and `Content-Type`, and the body.
struct Reply {
    status: u16,
    set_cookie: Option<String>,
    content_type: String,
    csp: Option<String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A request with exactly the headers given (no token unless one is among them).
fn request(api: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(WAIT))
        .build()
        .into();
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("http://{api}{path}"));
    if !body.is_empty() {
        req = req.header("Content-Type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = agent
        .run(req.body(body.to_string()).unwrap())
        .expect("http request");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Reply {
        status: resp.status().as_u16(),
        set_cookie: header("set-cookie"),
        content_type: header("content-type").unwrap_or_default(),
        csp: header("content-security-policy"),
        body: resp.body_mut().read_to_string().expect("body"),
    }
}

/// Logs in with the token and returns the `Cookie` header value it set.
fn login(n: &TestNode) -> String {
    let body = json!({ "token": n.token }).to_string();
    let origin = format!("http://{}", n.api);
    let reply = request(&n.api, "POST", "/api/login", &[("Origin", &origin)], &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let set = reply.set_cookie.expect("login sets a cookie");
    set.split(';').next().unwrap().trim().to_string()
}

/// The session cookie's name for a node whose API is at `api`.
fn cookie_name(api: &str) -> String {
    format!("hearth_session_{}", api.rsplit(':').next().unwrap())
}

/// Opens `/api/ws` at `api` with exactly these headers and reads its `connected` hello.
fn open_ws(
    n: &TestNode,
    api: &str,
    headers: &[(&'static str, &str)],
) -> Result<Socket, tungstenite::Error> {
    let mut request = format!("ws://{api}/api/ws").into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(*k, v.parse().unwrap());
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
        Ok(ws)
    })
}

/// The HTTP status a refused upgrade got.
fn refused_status(result: Result<Socket, tungstenite::Error>) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        other => panic!("the upgrade was not refused: {other:?}"),
    }
}

#[test]
fn root_serves_the_login_page_without_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let peer_id = n.node().peer_id().to_string();
    let bearer = format!("Bearer {}", n.token);
    for headers in [
        vec![],
        vec![("Cookie", "hearth_session=0000")],
        vec![("Cookie", &format!("{}=0000", cookie_name(&n.api)))],
        // The bearer token is for programs; the browser's page needs the session.
        vec![("Authorization", bearer.as_str())],
    ] {
        let page = request(&n.api, "GET", "/", &headers, "");
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(
            page.content_type.starts_with("text/html"),
            "{}",
            page.content_type
        );
        assert!(page.body.contains(r#"id="login""#), "{}", page.body);
        assert!(page.body.contains("/dashboard/login.js"));
        // Nothing of the node is on it.
        assert!(!page.body.contains(&peer_id));
        let csp = page.csp.expect("a content security policy");
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    }
    // The assets are served from the binary, whatever the session.
    for (path, kind) in [
        ("/dashboard/login.js", "text/javascript"),
        ("/dashboard/dashboard.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
    ] {
        let asset = request(&n.api, "GET", path, &[], "");
        assert_eq!(asset.status, 200, "{path}");
        assert!(
            asset.content_type.starts_with(kind),
            "{path}: {}",
            asset.content_type
        );
        assert!(!asset.body.is_empty());
    }
    // And the API still needs credentials.
    assert_eq!(request(&n.api, "GET", "/api/status", &[], "").status, 401);
}

#[test]
fn the_login_cookie_reads_the_api_and_opens_the_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let peer_id = n.node().peer_id().to_string();
    let origin = format!("http://{}", n.api);

    let wrong = request(
        &n.api,
        "POST",
        "/api/login",
        &[("Origin", &origin)],
        r#"{"token":"not-it"}"#,
    );
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert_eq!(wrong.json()["error"], "unauthorized");
    assert!(wrong.set_cookie.is_none());

    let reply = request(
        &n.api,
        "POST",
        "/api/login",
        &[("Origin", &origin)],
        &json!({ "token": n.token }).to_string(),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let set = reply.set_cookie.unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    let cookie = set.split(';').next().unwrap().trim().to_string();
    // Named after the port: browsers send one host's cookies to all its ports.
    assert!(
        cookie.starts_with(&format!("{}=", cookie_name(&n.api))),
        "{cookie}"
    );
    assert!(!cookie.contains(&n.token), "the cookie holds the token");

    // Reads with the cookie alone.
    let status = request(&n.api, "GET", "/api/status", &[("Cookie", &cookie)], "");
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(status.json()["peer_id"], peer_id);
    let devices = request(&n.api, "GET", "/api/devices", &[("Cookie", &cookie)], "");
    assert_eq!(devices.status, 200, "{}", devices.body);
    let devices = devices.json()["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0]["peer_id"], peer_id);
    assert_eq!(devices[0]["name"], "den");
    assert_eq!(devices[0]["admin"], true);
    assert_eq!(devices[0]["verified"], true);
    assert_eq!(devices[0]["this_device"], true);
    assert_eq!(devices[0]["revoked"], false);
    // With the session, / is the dashboard.
    let page = request(&n.api, "GET", "/", &[("Cookie", &cookie)], "");
    assert!(
        page.body.contains("/dashboard/dashboard.js"),
        "{}",
        page.body
    );

    // A made-up session is refused.
    let forged_cookie = format!("{}=00112233", cookie_name(&n.api));
    let forged = request(
        &n.api,
        "GET",
        "/api/status",
        &[("Cookie", &forged_cookie)],
        "",
    );
    assert_eq!(forged.status, 401);

    // The WebSocket takes the cookie from the node's own page, not from another origin.
    let socket = open_ws(&n, &n.api, &[("Origin", &origin), ("Cookie", &cookie)])
        .expect("the page's own socket");
    for (origin, cookie, want) in [
        ("http://evil.example", cookie.as_str(), 403),
        (origin.as_str(), forged_cookie.as_str(), 401),
    ] {
        let got = refused_status(open_ws(
            &n,
            &n.api,
            &[("Origin", origin), ("Cookie", cookie)],
        ));
        assert_eq!(got, want, "{origin} {cookie}");
    }

    // Logging out ends the session.
    let out = request(
        &n.api,
        "POST",
        "/api/logout",
        &[
            ("Cookie", &cookie),
            ("X-Hearth-Csrf", "1"),
            ("Origin", &origin),
        ],
        "",
    );
    assert_eq!(out.status, 204, "{}", out.body);
    let cleared = out.set_cookie.unwrap();
    assert!(
        cleared.starts_with(&format!("{}=;", cookie_name(&n.api))) && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    assert_eq!(
        request(&n.api, "GET", "/api/status", &[("Cookie", &cookie)], "").status,
        401
    );
    // The socket opened with the cookie closes with a policy violation.
    assert_closed_by_policy(&n, socket);
}

/// The socket gets a close frame with code 1008 (policy violation).
fn assert_closed_by_policy(n: &TestNode, mut socket: Socket) {
    let close = n.rt.block_on(async {
        loop {
            match timeout(WAIT, socket.next())
                .await
                .expect("the socket stayed open after its session ended")
            {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("the socket ended without a close frame: {other:?}"),
            }
        }
    });
    let close = close.expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Policy, "{close:?}");
    assert!(close.reason.contains("log in again"), "{close:?}");
}

#[test]
fn the_cookie_needs_the_nodes_own_origin_not_an_allowed_extra() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let extra = "http://dash.example:3000";
    let n = TestNode::start_config(
        rt,
        Config {
            api: Some(ApiConfig {
                allowed_origins: vec![extra.into()],
                ..ApiConfig::on("127.0.0.1:0".parse().unwrap())
            }),
            ..config(dir.path(), "den")
        },
    );
    let cookie = login(&n);
    // The extra origin opens sockets with the token, as --allowed-origin promises.
    let token_url = format!("{}/api/ws?token={}", n.api, n.token);
    let mut with_token = format!("ws://{token_url}").into_client_request().unwrap();
    with_token
        .headers_mut()
        .insert("Origin", extra.parse().unwrap());
    n.rt.block_on(async {
        timeout(WAIT, tokio_tungstenite::connect_async(with_token))
            .await
            .expect("handshake timed out")
            .expect("the extra origin's socket with the token")
    });
    // With the cookie alone it is refused, on the socket and on a change.
    let got = refused_status(open_ws(
        &n,
        &n.api,
        &[("Origin", extra), ("Cookie", &cookie)],
    ));
    assert_eq!(got, 403);
    let put = request(
        &n.api,
        "PUT",
        "/api/entities/switch.fan",
        &[
            ("Cookie", &cookie),
            ("Origin", extra),
            ("X-Hearth-Csrf", "1"),
        ],
        r#"{"state":"on"}"#,
    );
    assert_eq!(put.status, 403, "{}", put.body);
    // A browser that says the upgrade is same-origin is believed (pages cannot set it).
    open_ws(
        &n,
        &n.api,
        &[("Sec-Fetch-Site", "same-origin"), ("Cookie", &cookie)],
    )
    .expect("a same-origin socket");
    // Another site that says so of itself is not: only the browser sets that header.
    let got = refused_status(open_ws(
        &n,
        &n.api,
        &[
            ("Sec-Fetch-Site", "cross-site"),
            ("Origin", extra),
            ("Cookie", &cookie),
        ],
    ));
    assert_eq!(got, 403);
}

#[test]
fn two_nodes_on_one_host_keep_their_own_logins() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = TestNode::start(dir_a.path(), "den");
    let b = TestNode::start(dir_b.path(), "hall");
    let cookie_a = login(&a);
    let cookie_b = login(&b);
    assert_ne!(cookie_name(&a.api), cookie_name(&b.api));
    // The browser sends both nodes' cookies to each (cookies ignore ports): each node
    // finds its own, whatever the order.
    let both = format!("{cookie_b}; {cookie_a}");
    for n in [&a, &b] {
        let status = request(&n.api, "GET", "/api/status", &[("Cookie", &both)], "");
        assert_eq!(status.status, 200, "{}", status.body);
        assert_eq!(status.json()["peer_id"], n.node().peer_id().to_string());
    }
    // One node's cookie alone is nothing to the other.
    let other = request(&b.api, "GET", "/api/status", &[("Cookie", &cookie_a)], "");
    assert_eq!(other.status, 401, "{}", other.body);
    // A stale value of the same name ahead of the live one does not hide it.
    let stale = format!("{}=00112233; {cookie_a}", cookie_name(&a.api));
    let status = request(&a.api, "GET", "/api/status", &[("Cookie", &stale)], "");
    assert_eq!(status.status, 200, "{}", status.body);
    let page = request(&a.api, "GET", "/", &[("Cookie", &stale)], "");
    assert!(
        page.body.contains("/dashboard/dashboard.js"),
        "{}",
        page.body
    );
    // Logging out of one leaves the other logged in.
    let own_a = format!("http://{}", a.api);
    let out = request(
        &a.api,
        "POST",
        "/api/logout",
        &[
            ("Cookie", &both),
            ("X-Hearth-Csrf", "1"),
            ("Origin", &own_a),
        ],
        "",
    );
    assert_eq!(out.status, 204, "{}", out.body);
    assert_eq!(
        request(&a.api, "GET", "/api/status", &[("Cookie", &both)], "").status,
        401
    );
    assert_eq!(
        request(&b.api, "GET", "/api/status", &[("Cookie", &both)], "").status,
        200
    );
}

/// A node bound to every interface, reached at a LAN address: its page's origin is that
/// address, which the node takes as its own. The requests carry the LAN address in Host
/// and Origin but go to 127.0.0.1.
#[test]
fn a_page_at_a_lan_address_logs_in_and_opens_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let n = TestNode::start_config(
        rt,
        Config {
            api: Some(ApiConfig::on("0.0.0.0:0".parse().unwrap())),
            ..config(dir.path(), "den")
        },
    );
    let port = n.api.rsplit(':').next().unwrap().to_string();
    let local = format!("127.0.0.1:{port}");
    let lan = format!("192.0.2.20:{port}");
    let lan_origin = format!("http://{lan}");
    let reply = request(
        &local,
        "POST",
        "/api/login",
        &[("Host", &lan), ("Origin", &lan_origin)],
        &json!({ "token": n.token }).to_string(),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let cookie = reply
        .set_cookie
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let put = request(
        &local,
        "PUT",
        "/api/entities/switch.fan",
        &[
            ("Host", &lan),
            ("Origin", &lan_origin),
            ("Cookie", &cookie),
            ("X-Hearth-Csrf", "1"),
        ],
        r#"{"state":"on"}"#,
    );
    assert_eq!(put.status, 200, "{}", put.body);
    open_ws(
        &n,
        &local,
        &[("Host", &lan), ("Origin", &lan_origin), ("Cookie", &cookie)],
    )
    .expect("the LAN page's socket");
    // Another address's page is still another origin.
    let other = format!("http://192.0.2.21:{port}");
    let refused = request(
        &local,
        "POST",
        "/api/login",
        &[("Host", &lan), ("Origin", &other)],
        &json!({ "token": n.token }).to_string(),
    );
    assert_eq!(refused.status, 403, "{}", refused.body);
    let got = refused_status(open_ws(
        &n,
        &local,
        &[("Host", &lan), ("Origin", &other), ("Cookie", &cookie)],
    ));
    assert_eq!(got, 403);
}

#[test]
fn a_cross_origin_change_with_the_cookie_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let cookie = login(&n);
    let own = format!("http://{}", n.api);
    let body = r#"{"state":"on"}"#;
    let put = |headers: &[(&str, &str)]| {
        request(&n.api, "PUT", "/api/entities/switch.fan", headers, body)
    };

    // Another site's page: its Origin, with or without the custom header.
    for headers in [
        vec![
            ("Cookie", cookie.as_str()),
            ("Origin", "http://evil.example"),
        ],
        vec![
            ("Cookie", cookie.as_str()),
            ("Origin", "http://evil.example"),
            ("X-Hearth-Csrf", "1"),
        ],
        // A plain form post from anywhere cannot set the header.
        vec![("Cookie", cookie.as_str()), ("Origin", own.as_str())],
        vec![("Cookie", cookie.as_str())],
    ] {
        let refused = put(&headers);
        assert_eq!(refused.status, 403, "{headers:?}: {}", refused.body);
        assert_eq!(refused.json()["error"], "forbidden");
    }
    let posted = request(
        &n.api,
        "POST",
        "/api/rooms",
        &[
            ("Cookie", &cookie),
            ("Origin", "http://evil.example"),
            ("X-Hearth-Csrf", "1"),
        ],
        r#"{"name":"den"}"#,
    );
    assert_eq!(posted.status, 403, "{}", posted.body);
    // Nothing was written.
    assert_eq!(
        request(
            &n.api,
            "GET",
            "/api/entities",
            &[("Cookie", cookie.as_str())],
            ""
        )
        .json()["entities"],
        json!([])
    );
    assert_eq!(
        request(
            &n.api,
            "GET",
            "/api/rooms",
            &[("Cookie", cookie.as_str())],
            ""
        )
        .json()["rooms"],
        json!([])
    );

    // Another site cannot log a browser in either.
    let foreign_login = request(
        &n.api,
        "POST",
        "/api/login",
        &[("Origin", "http://evil.example")],
        &json!({ "token": n.token }).to_string(),
    );
    assert_eq!(foreign_login.status, 403, "{}", foreign_login.body);
    assert!(foreign_login.set_cookie.is_none());

    // The node's own page, with the header, writes.
    let ok = put(&[
        ("Cookie", cookie.as_str()),
        ("Origin", own.as_str()),
        ("X-Hearth-Csrf", "1"),
    ]);
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["state"], "on");
    // Programs with the bearer token are not asked for either.
    let token = format!("Bearer {}", n.token);
    let bearer = request(
        &n.api,
        "PUT",
        "/api/entities/switch.fan",
        &[("Authorization", &token), ("Origin", "http://evil.example")],
        r#"{"state":"off"}"#,
    );
    assert_eq!(bearer.status, 200, "{}", bearer.body);
}
