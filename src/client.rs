//! A small blocking HTTP client for the local API, used by every client verb.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;

/// Per-request limit: the API is local, so anything slower means the node is stuck.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A located node: its base URL and token.
pub(crate) struct Client {
    base: String,
    /// Where the address came from, for error messages.
    origin: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// Finds the node: `--api`/`HEARTH_API`, else `<data>/api.addr`; the token from
    /// `--token`/`HEARTH_TOKEN`, else `<data>/token`.
    pub(crate) fn find(data: &Path, api: Option<String>, token: Option<String>) -> Result<Self> {
        let (addr, origin) = match api {
            Some(a) => (a, "--api/HEARTH_API".to_string()),
            None => {
                let path = data.join(hearth::API_ADDR_FILE);
                match std::fs::read_to_string(&path) {
                    Ok(text) => (text.trim().to_string(), path.display().to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                        "no Hearth node is running for data dir {} (no {} there); \
                         start one with `hearth up --data {}`, or pass --api",
                        data.display(),
                        hearth::API_ADDR_FILE,
                        data.display()
                    ),
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot read {}", path.display()));
                    }
                }
            }
        };
        let addr = addr.trim_end_matches('/');
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let token = match token {
            Some(t) => t,
            None => {
                let path = data.join(hearth::TOKEN_FILE);
                let context = || {
                    format!(
                        "cannot use the API token at {}; pass --token or set HEARTH_TOKEN",
                        path.display()
                    )
                };
                // Checked as the node checks it: a token others can read is refused.
                hearth::read_token(data)
                    .with_context(context)?
                    .ok_or_else(|| anyhow!("there is no such file"))
                    .with_context(context)?
            }
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        Ok(Self {
            base,
            origin,
            token,
            agent,
        })
    }

    /// GETs a JSON body, turning API errors into their `detail` sentence.
    pub(crate) fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let response = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .call();
        self.reply(&url, response)
    }

    /// POSTs a JSON body and reads the JSON reply.
    pub(crate) fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T> {
        self.send_json("POST", path, body)
    }

    /// PUTs a JSON body and reads the JSON reply.
    pub(crate) fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T> {
        self.send_json("PUT", path, body)
    }

    /// DELETEs and reads the JSON reply.
    pub(crate) fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let response = self
            .agent
            .delete(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .call();
        self.reply(&url, response)
    }

    fn send_json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(body)?)
            .with_context(|| format!("cannot build a request to {url}"))?;
        let response = self.agent.run(request);
        self.reply(&url, response)
    }

    fn reply<T: DeserializeOwned>(
        &self,
        url: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut response = response.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let body: serde_json::Value = response
            .body_mut()
            .read_json()
            .with_context(|| format!("{url} answered {status} with a body that is not JSON"))?;
        if !status.is_success() {
            // The API's errors say `detail`; the lock routes, in seed 004's shape, `message`.
            let detail = body
                .get("detail")
                .or_else(|| body.get("message"))
                .and_then(|d| d.as_str())
                .unwrap_or("");
            let kind = body
                .get("error")
                .and_then(|d| d.as_str())
                .unwrap_or("error");
            // The detail may quote names from other homes.
            bail!(
                "the node refused the request ({status} {}): {}",
                crate::verbs::printable(kind),
                crate::verbs::printable(detail)
            );
        }
        serde_json::from_value(body).with_context(|| format!("unexpected reply shape from {url}"))
    }

    /// Opens the node's WebSocket (`/api/ws`) with the bearer token. Blocking; reads then
    /// wait for as long as the node sends nothing.
    pub(crate) fn websocket(&self) -> Result<tungstenite::WebSocket<std::net::TcpStream>> {
        self.websocket_at("/api/ws")
    }

    /// Opens the WebSocket at `path` with the bearer token.
    pub(crate) fn websocket_at(
        &self,
        path: &str,
    ) -> Result<tungstenite::WebSocket<std::net::TcpStream>> {
        let Some(host) = self.base.strip_prefix("http://") else {
            bail!(
                "the live stream needs a plain http:// node address, not {}",
                self.base
            );
        };
        let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(host)
            .with_context(|| format!("cannot resolve the node address {host}"))?
            .collect();
        let not_running = || {
            anyhow!(
                "no Hearth node is running at {} (address from {}); start one with `hearth up`",
                self.base,
                self.origin
            )
        };
        let stream = addrs
            .iter()
            .find_map(|a| std::net::TcpStream::connect_timeout(a, REQUEST_TIMEOUT).ok())
            .ok_or_else(not_running)?;
        let url = format!("ws://{host}{path}");
        let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
            .with_context(|| format!("cannot build a WebSocket request to {url}"))?;
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", self.token)
                .parse()
                .context("the token holds characters a header cannot carry")?,
        );
        // The handshake must not hang on a node that accepts but never answers.
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        let (socket, _) = tungstenite::client(request, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response)) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                anyhow!(
                    "the node refused the live stream ({}): {}",
                    response.status(),
                    body.trim()
                )
            }
            other => anyhow!("cannot open the live stream at {url}: {other}"),
        })?;
        socket.get_ref().set_read_timeout(None)?;
        Ok(socket)
    }

    fn transport_error(&self, e: ureq::Error) -> anyhow::Error {
        let refused = match &e {
            ureq::Error::Io(io) => matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
            ),
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => true,
            _ => false,
        };
        if refused {
            anyhow!(
                "no Hearth node is running at {} (address from {}); start one with `hearth up`",
                self.base,
                self.origin
            )
        } else {
            anyhow!("request to the node at {} failed: {e}", self.base)
        }
    }
}
