//! The dashboard's HTTP side: `/` is the login page without a session, the login sets a
//! strict, HttpOnly cookie that reads the API and opens `/api/ws`, and a change carried
//! by the cookie alone needs the node's own origin and the CSRF header. The page itself
//! runs in headless Chromium in `tests/dashboard/` (driven by `.ci/run`).

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use crate::api::TestNode;
use crate::util::WAIT;

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

#[test]
fn root_serves_the_login_page_without_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let n = TestNode::start(dir.path(), "den");
    let peer_id = n.node().peer_id().to_string();
    let bearer = format!("Bearer {}", n.token);
    for headers in [
        vec![],
        vec![("Cookie", "hearth_session=0000")],
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
    assert!(cookie.starts_with("hearth_session="));
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
    let forged = request(
        &n.api,
        "GET",
        "/api/status",
        &[("Cookie", "hearth_session=00112233")],
        "",
    );
    assert_eq!(forged.status, 401);

    // The WebSocket takes the cookie from the node's own page, not from another origin.
    let connect = |origin: &str, cookie: &str| {
        let mut request = format!("ws://{}/api/ws", n.api)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
        request
            .headers_mut()
            .insert("Cookie", cookie.parse().unwrap());
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
    connect(&origin, &cookie).expect("the page's own socket");
    for (origin, cookie, want) in [
        ("http://evil.example", cookie.as_str(), 403),
        (origin.as_str(), "hearth_session=00112233", 401),
    ] {
        match connect(origin, cookie) {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), want, "{origin} {cookie}")
            }
            other => panic!("{origin} {cookie}: {other:?}"),
        }
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
    assert!(out.set_cookie.unwrap().contains("Max-Age=0"));
    assert_eq!(
        request(&n.api, "GET", "/api/status", &[("Cookie", &cookie)], "").status,
        401
    );
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
