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

use super::{ApiError, ApiJson, ApiState, constant_time_eq};

/// The session cookie's name.
pub(crate) const SESSION_COOKIE: &str = "hearth_session";
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

/// The browser sessions of this node: random ids and when each ends.
#[derive(Default)]
pub(crate) struct Sessions {
    open: Mutex<Vec<(String, Instant)>>,
}

impl Sessions {
    /// Starts a session and returns its id (32 random bytes, hex).
    fn start(&self) -> Result<String, crate::Error> {
        let id = hex::encode(crate::home::random::<32>()?);
        let now = Instant::now();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(_, ends)| *ends > now);
        if open.len() >= MAX_SESSIONS {
            // Oldest first: they were pushed in order of login.
            let excess = open.len() + 1 - MAX_SESSIONS;
            open.drain(..excess);
        }
        open.push((id.clone(), now + SESSION_TTL));
        Ok(id)
    }

    /// Whether `id` is a live session. Every held id is compared in full, so the answer
    /// takes as long whichever (or whether any) matches.
    pub(crate) fn valid(&self, id: &str) -> bool {
        let now = Instant::now();
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.iter().fold(false, |found, (held, ends)| {
            constant_time_eq(held.as_bytes(), id.as_bytes()) & (*ends > now) | found
        })
    }

    fn end(&self, id: &str) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(held, _)| !constant_time_eq(held.as_bytes(), id.as_bytes()));
    }
}

/// The session id the request's cookies carry, if any.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

/// Whether the request carries a live session cookie.
fn logged_in(state: &ApiState, headers: &HeaderMap) -> bool {
    session_cookie(headers).is_some_and(|id| state.sessions.valid(id))
}

/// The check for a request that authenticates with the cookie: a live session, and for
/// anything but a read, the [`CSRF_HEADER`] and no foreign `Origin`.
pub(crate) fn check_cookie(
    state: &ApiState,
    method: &Method,
    headers: &HeaderMap,
    id: &str,
) -> Result<(), ApiError> {
    if !state.sessions.valid(id) {
        return Err(ApiError::unauthorized(
            "the dashboard session has expired or the node restarted; log in again at /",
        ));
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    check_same_origin(state, headers)?;
    if headers.get(CSRF_HEADER).is_none() {
        return Err(forbidden(format!(
            "a change made with the session cookie must carry the {CSRF_HEADER} header \
             (the dashboard sends it); cross-site requests cannot"
        )));
    }
    Ok(())
}

/// Refuses a request whose `Origin` is not one of the node's own (or those given with
/// `--allowed-origin`). Browsers send `Origin` on every state-changing request.
fn check_same_origin(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    for origin in headers.get_all(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("<not text>");
        if !state.guard.origin_allowed(origin) {
            return Err(forbidden(format!(
                "request from origin {origin:?} refused: only this node's own pages may \
                 change things with its session cookie"
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
    check_same_origin(&state, &headers)?;
    if !constant_time_eq(body.token.trim().as_bytes(), state.token.as_bytes()) {
        return Err(ApiError::unauthorized(
            "wrong token; paste the one `hearth token` prints on the node's machine",
        ));
    }
    let id = state.sessions.start()?;
    let cookie = format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
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
/// the cookie's CSRF checks apply) and clears the cookie.
pub(super) async fn logout(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        state.sessions.end(id);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("hearth_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
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

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; hearth_session=abc"),
        );
        assert_eq!(session_cookie(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("x_hearth_session=abc"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("other=2"));
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn sessions_are_capped_and_end_on_logout() {
        let s = Sessions::default();
        let first = s.start().unwrap();
        assert!(s.valid(&first));
        assert!(!s.valid("nope"));
        assert!(!s.valid(""));
        let mut last = String::new();
        for _ in 0..MAX_SESSIONS {
            last = s.start().unwrap();
        }
        // The oldest went to make room.
        assert!(!s.valid(&first));
        assert!(s.valid(&last));
        assert_eq!(s.open.lock().unwrap().len(), MAX_SESSIONS);
        s.end(&last);
        assert!(!s.valid(&last));
    }
}
