//! Who may talk to the local API from a browser: the Host and Origin checks.
//!
//! The token keeps other programs out, but a browser is a program that runs anybody's
//! code. Two attacks reach a loopback API through one:
//!
//! - **DNS rebinding.** A page on `evil.example` re-points its own name at 127.0.0.1 and
//!   then talks to the node as a same-origin site. Its requests still carry
//!   `Host: evil.example`, so a node that answers only its own host names is out of reach.
//! - **Cross-site WebSockets.** Browsers apply no same-origin rule to WebSocket upgrades,
//!   and a page that learned or guessed the token could pass it as `?token=`. The upgrade
//!   carries the page's `Origin`, so a node that admits only its own origins (and those
//!   the owner lists) refuses it.
//!
//! A request without a Host header (HTTP/1.0 tools) or an upgrade without an Origin
//! (every non-browser client) is accepted: browsers always send both, so their absence
//! means the request did not come from a web page.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use super::{ApiError, ApiState};

/// The host names and origins the API answers, fixed when it binds.
#[derive(Debug)]
pub(crate) struct Guard {
    /// Accepted `Host` values, lower case.
    hosts: Vec<String>,
    /// When the API is bound to every interface, any IP literal with the bound port is
    /// accepted too: clients may use any of the machine's addresses, and a rebinding attack
    /// always carries a DNS name, never an IP literal.
    any_ip_port: Option<u16>,
    /// The node's own origins (`http://` and an accepted host), lower case without a
    /// trailing `/`.
    origins: Vec<String>,
    /// Origins given with `--allowed-origin`: admitted on WebSocket upgrades that carry
    /// the token, never for the dashboard's cookie.
    extra_origins: Vec<String>,
}

impl Guard {
    /// The node's own hosts and origins for an API bound to `bound`, plus `extra_origins`
    /// (already checked by [`normalise_origin`]).
    pub(crate) fn new(bound: SocketAddr, extra_origins: &[String]) -> Self {
        let port = bound.port();
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            // `SocketAddr`'s text puts IPv6 in brackets, as a Host header does.
            bound.ip().to_string(),
        ];
        if let IpAddr::V6(ip) = bound.ip() {
            names[2] = format!("[{ip}]");
            names.push("[::1]".to_string());
        }
        let mut hosts = Vec::new();
        let mut origins = Vec::new();
        for name in names {
            // The port may be left out only where it is the scheme's default.
            if port == 80 {
                hosts.push(name.clone());
                origins.push(format!("http://{name}"));
            }
            hosts.push(format!("{name}:{port}"));
            origins.push(format!("http://{name}:{port}"));
        }
        // A bare `localhost` or `127.0.0.1` names this machine whatever the port; only the
        // port-80 form of the bound address itself would be ambiguous.
        hosts.push("localhost".to_string());
        hosts.push("127.0.0.1".to_string());
        if bound.is_ipv6() {
            hosts.push("[::1]".to_string());
        }
        hosts.sort();
        hosts.dedup();
        origins.sort();
        origins.dedup();
        Self {
            hosts,
            any_ip_port: bound.ip().is_unspecified().then_some(port),
            origins,
            extra_origins: extra_origins.to_vec(),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        if self.hosts.contains(&host) {
            return true;
        }
        match self.any_ip_port {
            Some(port) => host
                .parse::<SocketAddr>()
                .is_ok_and(|addr| addr.port() == port),
            None => false,
        }
    }

    /// Whether `origin` is one of the node's own: a fixed one, or `http://` plus the
    /// request's own `Host` (which passed [`Guard::check`], so it names this node; this is
    /// how a page reached at a LAN address of a node bound to every interface is its own).
    pub(crate) fn own_origin(&self, origin: &str, headers: &HeaderMap) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        self.origins.contains(&origin)
            || headers.get_all(header::HOST).iter().any(|host| {
                host.to_str().is_ok_and(|host| {
                    origin
                        .strip_prefix("http://")
                        .is_some_and(|rest| rest == host.to_ascii_lowercase())
                })
            })
    }

    /// Whether an upgrade carrying the token may come from `origin`: the node's own or one
    /// given with `--allowed-origin`.
    fn origin_allowed(&self, origin: &str, headers: &HeaderMap) -> bool {
        self.own_origin(origin, headers)
            || self
                .extra_origins
                .contains(&origin.trim_end_matches('/').to_ascii_lowercase())
    }

    /// Checks one request's headers: `Err` with the reason when it must be refused.
    fn check(&self, headers: &HeaderMap, authority: Option<&str>) -> Result<(), ApiError> {
        // Every Host header must pass: a second, different one must not slip by.
        let mut hosts = headers.get_all(header::HOST).iter().peekable();
        let hosts: Vec<Option<&str>> = if hosts.peek().is_some() {
            hosts.map(|v| v.to_str().ok()).collect()
        } else {
            // HTTP/2 puts the host in the request's authority instead.
            authority.map(Some).into_iter().collect()
        };
        for host in hosts {
            match host {
                Some(h) if self.host_allowed(h) => {}
                other => {
                    return Err(forbidden(format!(
                        "Host {:?} is not this node's address; the API answers only {} \
                         (a request for another name may be a DNS-rebinding attack)",
                        other.unwrap_or("<not text>"),
                        self.hosts.join(", ")
                    )));
                }
            }
        }
        if is_upgrade(headers) {
            for origin in headers.get_all(header::ORIGIN) {
                let origin = origin.to_str().unwrap_or("<not text>");
                if !self.origin_allowed(origin, headers) {
                    return Err(forbidden(format!(
                        "WebSocket from origin {origin:?} refused: only this node's own \
                         origins and those given with --allowed-origin may connect"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn forbidden(detail: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
}

/// Whether the request asks for a WebSocket (an HTTP/1.1 `Upgrade: websocket`).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.eq_ignore_ascii_case("websocket"))
    })
}

/// Middleware: refuses a request for a host name that is not the node's, and a WebSocket
/// upgrade from a web origin that is not admitted, with 403 and a body that says why.
pub(crate) async fn check(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    state.guard.check(
        request.headers(),
        request.uri().authority().map(|a| a.as_str()),
    )?;
    Ok(next.run(request).await)
}

/// Checks and normalises an allowed origin as configured: `http` or `https`, a host, an
/// optional port, nothing else. Returned in lower case without a trailing `/`, as
/// browsers send it.
pub(crate) fn normalise_origin(origin: &str) -> Result<String, String> {
    let trimmed = origin.trim().trim_end_matches('/');
    let lower = trimmed.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"));
    let bad = |why: &str| {
        Err(format!(
            "allowed origin {origin:?} {why}; write it as a browser sends it, e.g. \
             http://dashboard.lan:3000"
        ))
    };
    let Some(rest) = rest else {
        return bad("does not start with http:// or https://");
    };
    if rest.is_empty() {
        return bad("has no host");
    }
    if rest
        .chars()
        .any(|c| matches!(c, '/' | '?' | '#' | '@' | '*') || c.is_whitespace() || c.is_control())
    {
        return bad("holds a path, query, credentials or wildcard, which origins never have");
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn loopback() -> Guard {
        Guard::new("127.0.0.1:8012".parse().unwrap(), &[])
    }

    #[test]
    fn own_hosts_pass_and_others_are_refused() {
        let g = loopback();
        for ok in [
            "127.0.0.1:8012",
            "localhost:8012",
            "LOCALHOST:8012",
            "localhost",
            "127.0.0.1",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8012",
            "localhost:8013",
            "127.0.0.2:8012",
            "[::1]:8012",
            "localhost.:8012",
            "",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn ipv6_loopback_admits_its_bracketed_form() {
        let g = Guard::new("[::1]:9000".parse().unwrap(), &[]);
        assert!(g.host_allowed("[::1]:9000"));
        assert!(g.host_allowed("[::1]"));
        assert!(g.host_allowed("localhost:9000"));
        assert!(g.own_origin("http://[::1]:9000", &HeaderMap::new()));
        assert!(!g.host_allowed("::1:9000"));
    }

    #[test]
    fn a_wildcard_bind_admits_ip_literals_on_its_port_only() {
        let g = Guard::new("0.0.0.0:8012".parse().unwrap(), &[]);
        assert!(g.host_allowed("192.168.1.20:8012"));
        assert!(g.host_allowed("[fe80::1]:8012"));
        assert!(!g.host_allowed("192.168.1.20:8013"));
        assert!(!g.host_allowed("hearth.lan:8012"));
    }

    #[test]
    fn a_missing_host_passes_and_a_second_wrong_one_does_not() {
        let g = loopback();
        assert!(g.check(&HeaderMap::new(), None).is_ok());
        let two = headers(&[
            (header::HOST, "127.0.0.1:8012"),
            (header::HOST, "evil.example"),
        ]);
        assert!(g.check(&two, None).is_err());
        assert!(g.check(&HeaderMap::new(), Some("evil.example")).is_err());
    }

    #[test]
    fn origins_matter_on_upgrades_only() {
        let g = Guard::new(
            "127.0.0.1:8012".parse().unwrap(),
            &[normalise_origin("https://Dash.lan/").unwrap()],
        );
        let upgrade = |origin: Option<&str>| {
            let mut h = headers(&[(header::UPGRADE, "websocket")]);
            if let Some(o) = origin {
                h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
            }
            g.check(&h, None)
        };
        assert!(upgrade(None).is_ok());
        assert!(upgrade(Some("http://127.0.0.1:8012")).is_ok());
        assert!(upgrade(Some("http://localhost:8012")).is_ok());
        assert!(upgrade(Some("https://dash.lan")).is_ok());
        for bad in [
            "http://evil.example",
            "null",
            "https://127.0.0.1:8012",
            "http://localhost:8013",
        ] {
            let err = upgrade(Some(bad)).unwrap_err();
            assert_eq!(err.kind_and_detail().0, "forbidden");
        }
        // A plain request's Origin is the browser's CORS business, not this check's.
        let plain = headers(&[(header::ORIGIN, "http://evil.example")]);
        assert!(g.check(&plain, None).is_ok());
    }

    #[test]
    fn the_request_host_is_an_own_origin_and_extras_are_not() {
        let g = Guard::new(
            "0.0.0.0:8012".parse().unwrap(),
            &[normalise_origin("http://dash.lan:3000").unwrap()],
        );
        let lan = headers(&[(header::HOST, "192.168.1.20:8012")]);
        assert!(g.own_origin("http://192.168.1.20:8012", &lan));
        assert!(g.own_origin("http://127.0.0.1:8012", &lan));
        assert!(!g.own_origin("https://192.168.1.20:8012", &lan));
        assert!(!g.own_origin("http://192.168.1.20:8013", &lan));
        assert!(!g.own_origin("http://192.168.1.20:8012", &HeaderMap::new()));
        // An extra origin opens token-carrying sockets, but is not the node's own.
        assert!(!g.own_origin("http://dash.lan:3000", &lan));
        assert!(g.origin_allowed("http://dash.lan:3000", &lan));
        // An upgrade from the page at the LAN address passes the guard.
        let mut upgrade = lan.clone();
        upgrade.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        upgrade.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://192.168.1.20:8012"),
        );
        assert!(g.check(&upgrade, None).is_ok());
    }

    #[test]
    fn configured_origins_are_checked_and_normalised() {
        assert_eq!(
            normalise_origin(" HTTP://Dash.LAN:3000/ ").unwrap(),
            "http://dash.lan:3000"
        );
        for bad in [
            "dash.lan",
            "ftp://dash.lan",
            "http://",
            "http://dash.lan/app",
            "http://*.lan",
            "http://user@dash.lan",
        ] {
            let err = normalise_origin(bad).unwrap_err();
            assert!(err.contains("e.g. http://"), "{bad}: {err}");
        }
    }
}
