//! The dashboard at `/`: a page served from the binary (HTML, CSS and plain JavaScript
//! compiled in with `include_str!`, nothing fetched from elsewhere), and the browser
//! session it runs on.
//!
//! A browser gets the token once, pasted into the login page, which posts it to
//! `POST /api/login` in the body (never in a URL, so it lands in no access log or
//! history). The node answers with a session cookie (`HttpOnly`, so the page's scripts
//! never see it; `SameSite=Strict`, so no other site's page makes the browser send it).
//! Every `/api` route and the WebSockets then take that cookie as they take the bearer
//! header. A request that changes something on the cookie alone must also carry the
//! [`CSRF_HEADER`] (a header no cross-site form can set, and which a cross-site script can
//! set only after a CORS preflight that this API never answers) and, when it names an
//! `Origin`, one of the node's own. Sessions live in memory: at most [`MAX_SESSIONS`],
//! each for [`SESSION_TTL`], all gone when the node stops.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{ApiError, ApiJson, ApiState, constant_time_eq};

/// The session cookie's name before the port: the cookie is `hearth_session_<port>`, as
/// browsers share one host's cookies across all its ports.
pub(crate) const SESSION_COOKIE_PREFIX: &str = "hearth_session_";
/// Cookie values of the session's name looked at in one request.
const MAX_COOKIE_VALUES: usize = 16;
/// The header a cookie-authenticated request that changes state must carry (any value).
pub(crate) const CSRF_HEADER: &str = "x-hearth-csrf";
/// Browser sessions held at once; a new login past this drops the oldest.
pub(crate) const MAX_SESSIONS: usize = 64;
/// How long a browser session lasts after login.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

const LOGIN_HTML: &str = include_str!("dashboard/login.html");
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const LOGIN_JS: &str = include_str!("dashboard/login.js");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// The pages allow only their own scripts, styles and connections (the WebSocket
/// included: CSP's `'self'` covers `ws:` to the same host), and no framing.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

/// The browser sessions of this node: random ids, when each ends, and a token cancelled
/// when it ends early (logout, or pushed out by newer logins), which closes its sockets.
pub(crate) struct Sessions {
    cookie: String,
    open: Mutex<Vec<Session>>,
}

struct Session {
    id: String,
    ends: Instant,
    ended: CancellationToken,
}

/// A live session a request presented: what a WebSocket opened with it watches.
#[derive(Clone, Debug)]
pub(crate) struct Live {
    /// When it expires.
    pub(crate) ends: Instant,
    /// Cancelled when it is ended before then.
    pub(crate) ended: CancellationToken,
}

impl Sessions {
    /// The sessions of an API on `port`, whose cookie is named after it.
    pub(crate) fn new(port: u16) -> Self {
        Self {
            cookie: format!("{SESSION_COOKIE_PREFIX}{port}"),
            open: Mutex::new(Vec::new()),
        }
    }

    /// The session cookie's name.
    pub(crate) fn cookie_name(&self) -> &str {
        &self.cookie
    }

    /// Starts a session and returns its id (32 random bytes, hex).
    fn start(&self) -> Result<String, crate::Error> {
        let id = hex::encode(crate::home::random::<32>()?);
        let now = Instant::now();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|s| {
            let live = s.ends > now;
            if !live {
                s.ended.cancel();
            }
            live
        });
        if open.len() >= MAX_SESSIONS {
            // Oldest first: they were pushed in order of login.
            let excess = open.len() + 1 - MAX_SESSIONS;
            for gone in open.drain(..excess) {
                gone.ended.cancel();
            }
        }
        open.push(Session {
            id: id.clone(),
            ends: now + SESSION_TTL,
            ended: CancellationToken::new(),
        });
        Ok(id)
    }

    /// The live session `id` names. Every held id is compared in full, so the answer
    /// takes as long whichever (or whether any) matches.
    fn live(&self, id: &str) -> Option<Live> {
        let now = Instant::now();
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.iter().fold(None, |found, s| {
            let hit = constant_time_eq(s.id.as_bytes(), id.as_bytes()) & (s.ends > now);
            if hit {
                Some(Live {
                    ends: s.ends,
                    ended: s.ended.clone(),
                })
            } else {
                found
            }
        })
    }

    /// The values of the request's cookies with this node's session name (a browser may
    /// hold more than one: a stale one under another path, say).
    fn presented<'h>(&self, headers: &'h HeaderMap) -> impl Iterator<Item = &'h str> {
        let name = self.cookie.clone();
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(move |(n, _)| *n == name)
            .map(|(_, value)| value)
            .take(MAX_COOKIE_VALUES)
    }

    /// Whether the request carries any cookie of this node's session name.
    pub(crate) fn carried(&self, headers: &HeaderMap) -> bool {
        self.presented(headers).next().is_some()
    }

    /// The live session among the request's cookies: any of them that is one counts.
    pub(crate) fn find(&self, headers: &HeaderMap) -> Option<Live> {
        self.presented(headers).find_map(|id| self.live(id))
    }

    /// Ends every live session the request's cookies name, closing their sockets.
    fn end_presented(&self, headers: &HeaderMap) {
        let ids: Vec<&str> = self.presented(headers).collect();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|s| {
            let named = ids.iter().fold(false, |hit, id| {
                constant_time_eq(s.id.as_bytes(), id.as_bytes()) | hit
            });
            if named {
                s.ended.cancel();
            }
            !named
        });
    }
}

/// Whether the request carries a live session cookie.
fn logged_in(state: &ApiState, headers: &HeaderMap) -> bool {
    state.sessions.find(headers).is_some()
}

/// The check for a request that authenticates with the cookie: a live session, and for
/// anything but a read, the [`CSRF_HEADER`] and no foreign `Origin`.
pub(crate) fn check_cookie(
    state: &ApiState,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    live_session(state, headers)?;
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    check_own_origin(state, headers)?;
    if headers.get(CSRF_HEADER).is_none() {
        return Err(forbidden(format!(
            "a change made with the session cookie must carry the {CSRF_HEADER} header \
             (the dashboard sends it); cross-site requests cannot"
        )));
    }
    Ok(())
}

/// The live session the request's cookie names, or 401.
pub(crate) fn live_session(state: &ApiState, headers: &HeaderMap) -> Result<Live, ApiError> {
    state.sessions.find(headers).ok_or_else(|| {
        ApiError::unauthorized(
            "the dashboard session has expired or the node restarted; log in again at /",
        )
    })
}

/// Refuses a request from a page that is not the node's own: unless the browser says
/// `Sec-Fetch-Site: same-origin` (a header no page can set), every `Origin` it names must
/// be one of the node's own origins ([`super::guard::Guard::own_origin`]; those given with
/// `--allowed-origin` do not count). Browsers send `Origin` on every state-changing
/// request and every WebSocket upgrade; a request without one is not from a page.
pub(crate) fn check_own_origin(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"same-origin"))
    {
        return Ok(());
    }
    for origin in headers.get_all(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("<not text>");
        if !state.guard.own_origin(origin, headers) {
            return Err(forbidden(format!(
                "request from origin {origin:?} refused: only this node's own pages may \
                 log in or use its session cookie"
            )));
        }
    }
    Ok(())
}

fn forbidden(detail: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
}

/// A page or asset with the headers every dashboard response carries.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /`: the dashboard for a logged-in browser, the login page for anyone else.
pub(super) async fn page(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if logged_in(&state, &headers) {
        asset("text/html; charset=utf-8", DASHBOARD_HTML)
    } else {
        asset("text/html; charset=utf-8", LOGIN_HTML)
    }
}

/// `GET /dashboard/login.js`.
pub(super) async fn login_js() -> Response {
    asset("text/javascript; charset=utf-8", LOGIN_JS)
}

/// `GET /dashboard/dashboard.js`.
pub(super) async fn dashboard_js() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

/// `GET /dashboard/style.css`.
pub(super) async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// `POST /api/login` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginBody {
    token: String,
}

/// `POST /api/login {token}`: checks the token and sets the session cookie. Open to
/// requests without a token (it is how a browser gets one), but only from this node's
/// own origins, so another site cannot log a browser into it.
pub(super) async fn login(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<LoginBody>,
) -> Result<Response, ApiError> {
    check_own_origin(&state, &headers)?;
    if !constant_time_eq(body.token.trim().as_bytes(), state.token.as_bytes()) {
        return Err(ApiError::unauthorized(
            "wrong token; paste the one `hearth token` prints on the node's machine",
        ));
    }
    let id = state.sessions.start()?;
    let cookie = format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        state.sessions.cookie_name(),
        SESSION_TTL.as_secs()
    );
    let mut response = (
        StatusCode::OK,
        Json(serde_json::json!({ "expires_in_s": SESSION_TTL.as_secs() })),
    )
        .into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie)
            .map_err(|e| ApiError::bad_request(format!("cannot set the cookie: {e}")))?,
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `POST /api/logout`: ends the cookie's session (behind the usual authentication, so
/// the cookie's CSRF checks apply), which closes the WebSockets opened with it, and
/// clears the cookie.
pub(super) async fn logout(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.sessions.end_presented(&headers);
    let clear = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        state.sessions.cookie_name()
    );
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&clear)
            .map_err(|e| ApiError::bad_request(format!("cannot clear the cookie: {e}")))?,
    );
    Ok(response)
}

/// `GET /api/devices` reply.
#[derive(serde::Serialize)]
pub(super) struct DeviceList {
    devices: Vec<crate::core::status::DeviceInfo>,
}

/// `GET /api/devices`: this home's devices, with names and roles from their certificates.
pub(super) async fn devices(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<DeviceList>, ApiError> {
    let devices = state
        .core
        .call(|reply| crate::core::NodeRequest::Devices { reply })
        .await??;
    Ok(Json(DeviceList { devices }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookies(values: &[String]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::COOKIE, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_cookie_is_named_after_the_port_and_any_live_value_counts() {
        let s = Sessions::new(8012);
        assert_eq!(s.cookie_name(), "hearth_session_8012");
        let id = s.start().unwrap();
        let own = format!("hearth_session_8012={id}");
        // Found among others, in any Cookie header, after a stale value of the same name.
        for h in [
            cookies(&[format!("a=1; {own}")]),
            cookies(&[format!("hearth_session_8012=stale; {own}; b=2")]),
            cookies(&["hearth_session_8012=stale".into(), own.clone()]),
        ] {
            assert!(s.carried(&h));
            assert!(s.find(&h).is_some(), "{h:?}");
        }
        // Another port's cookie, or a name that merely contains this one, is not it.
        for h in [
            cookies(&[format!("hearth_session_8013={id}")]),
            cookies(&[format!("x_hearth_session_8012={id}")]),
            cookies(&[format!("hearth_session={id}")]),
        ] {
            assert!(!s.carried(&h), "{h:?}");
            assert!(s.find(&h).is_none(), "{h:?}");
        }
    }

    #[test]
    fn sessions_are_capped_and_end_on_logout() {
        let s = Sessions::new(8012);
        let first = s.start().unwrap();
        let first_live = s.live(&first).unwrap();
        assert!(s.live("nope").is_none());
        assert!(s.live("").is_none());
        let mut last = String::new();
        for _ in 0..MAX_SESSIONS {
            last = s.start().unwrap();
        }
        // The oldest went to make room, and its sockets are told.
        assert!(s.live(&first).is_none());
        assert!(first_live.ended.is_cancelled());
        let last_live = s.live(&last).unwrap();
        assert!(!last_live.ended.is_cancelled());
        assert_eq!(s.open.lock().unwrap().len(), MAX_SESSIONS);
        s.end_presented(&cookies(&[format!("hearth_session_8012={last}")]));
        assert!(s.live(&last).is_none());
        assert!(last_live.ended.is_cancelled());
        assert_eq!(s.open.lock().unwrap().len(), MAX_SESSIONS - 1);
    }
}
