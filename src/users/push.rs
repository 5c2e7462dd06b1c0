//! Push targets of notifications (seed 001's `push_services`): after a notification is
//! stored and has gone to the user's sockets, the device that made it posts it to each
//! configured target, retrying `retry_attempts` times `retry_delay` apart, and announces
//! each outcome as `notification.sent` or `notification.failed`.
//!
//! - A webhook gets the notification as JSON (`POST`, `Content-Type: application/json`).
//!   FCM and APNS need the internet and their credentials: reach them through a webhook
//!   that relays to them (the node never calls them itself).
//! - An ntfy topic URL gets the body as text, with `Title`, `Priority` (low 2, normal 3,
//!   high 4, urgent 5) and `Tags` (the type) headers, as ntfy reads them.
//!
//! - A Web Push subscription (RFC 8030) a client registered for the user gets the
//!   notification as JSON, encrypted for the subscription (RFC 8291, `aes128gcm`) and
//!   signed with the home's VAPID key (RFC 8292), which the admin device makes once and
//!   keeps in the users document so every device signs with the same key.
//!
//! Posting needs an HTTP client, which comes with the `push` feature (on by default).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Notification;

/// Where notifications are pushed, besides the user's sockets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "url", rename_all = "snake_case")]
pub enum PushTarget {
    /// A URL that takes the notification as JSON.
    Webhook(String),
    /// An ntfy-compatible topic URL.
    Ntfy(String),
    /// A Web Push subscription of one client (registered through the API, not configured).
    WebPush(WebPushSubscription),
}

/// A browser's push subscription (`PushSubscription.toJSON()`), as clients register it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebPushSubscription {
    /// The push service's URL for this client.
    pub endpoint: String,
    /// The client's keys.
    pub keys: WebPushKeys,
}

/// A subscription's keys, base64url as browsers give them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebPushKeys {
    /// The client's P-256 public key (65 bytes, uncompressed).
    pub p256dh: String,
    /// The shared authentication secret (16 bytes).
    pub auth: String,
}

impl WebPushSubscription {
    /// Reads and checks a subscription a client sent (extra fields such as
    /// `expirationTime` are ignored).
    pub fn parse(value: &serde_json::Value) -> Result<Self, crate::Error> {
        let sub: Self = serde_json::from_value(value.clone()).map_err(|e| {
            crate::Error::Invalid(format!(
                "a push subscription is {{endpoint, keys: {{p256dh, auth}}}}: {e}"
            ))
        })?;
        let url = &sub.endpoint;
        if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() > 1024 {
            return Err(crate::Error::Invalid(
                "the subscription's endpoint must be an http(s) URL of at most 1024 bytes".into(),
            ));
        }
        let b64 = |s: &str| {
            s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        };
        if !b64(&sub.keys.p256dh) || !b64(&sub.keys.auth) {
            return Err(crate::Error::Invalid(
                "the subscription's keys must be base64url text".into(),
            ));
        }
        #[cfg(feature = "push")]
        web_keys(&sub).map_err(crate::Error::Invalid)?;
        Ok(sub)
    }

    /// A short stable id: the first 16 hex digits of the endpoint's SHA-256.
    pub fn id(&self) -> String {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(self.endpoint.as_bytes())[..8])
    }
}

/// A subscription's keys, decoded.
#[cfg(feature = "push")]
fn web_keys(
    sub: &WebPushSubscription,
) -> Result<(web_push_native::p256::PublicKey, web_push_native::Auth), String> {
    use base64ct::{Base64UrlUnpadded, Encoding};
    let strip = |s: &str| s.trim_end_matches('=').to_string();
    let p256dh = Base64UrlUnpadded::decode_vec(&strip(&sub.keys.p256dh))
        .map_err(|_| "p256dh is not base64url".to_string())?;
    let auth = Base64UrlUnpadded::decode_vec(&strip(&sub.keys.auth))
        .map_err(|_| "auth is not base64url".to_string())?;
    let public = web_push_native::p256::PublicKey::from_sec1_bytes(&p256dh)
        .map_err(|_| "p256dh is not a P-256 public key".to_string())?;
    if auth.len() != 16 {
        return Err(format!("auth is {} bytes; it must be 16", auth.len()));
    }
    Ok((public, web_push_native::Auth::clone_from_slice(&auth)))
}

/// A new VAPID private key, base64url.
#[cfg(feature = "push")]
pub(crate) fn new_vapid_key() -> String {
    use base64ct::{Base64UrlUnpadded, Encoding};
    let pair = web_push_native::jwt_simple::algorithms::ES256KeyPair::generate();
    Base64UrlUnpadded::encode_string(&pair.to_bytes())
}

/// The public half of a VAPID key (uncompressed point, base64url), as browsers take it as
/// `applicationServerKey`.
#[cfg(feature = "push")]
pub(crate) fn vapid_public(private: &str) -> Result<String, crate::Error> {
    use base64ct::{Base64UrlUnpadded, Encoding};
    use web_push_native::jwt_simple::algorithms::ECDSAP256PublicKeyLike;
    let bytes = Base64UrlUnpadded::decode_vec(private)
        .map_err(|_| crate::Error::Internal("the stored VAPID key is not base64url".into()))?;
    let pair = web_push_native::jwt_simple::algorithms::ES256KeyPair::from_bytes(&bytes)
        .map_err(|e| crate::Error::Internal(format!("the stored VAPID key is unusable: {e}")))?;
    Ok(Base64UrlUnpadded::encode_string(
        &pair.public_key().public_key().to_bytes_uncompressed(),
    ))
}

impl PushTarget {
    /// The target's URL.
    pub fn url(&self) -> &str {
        match self {
            PushTarget::Webhook(u) | PushTarget::Ntfy(u) => u,
            PushTarget::WebPush(s) => &s.endpoint,
        }
    }

    /// `webhook`, `ntfy` or `web_push`.
    pub fn kind(&self) -> &'static str {
        match self {
            PushTarget::Webhook(_) => "webhook",
            PushTarget::Ntfy(_) => "ntfy",
            PushTarget::WebPush(_) => "web_push",
        }
    }
}

/// Push settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushConfig {
    /// The targets, each posted every notification this device makes.
    pub targets: Vec<PushTarget>,
    /// Tries per target (seed 001's `retry_attempts`, default 3).
    pub retry_attempts: u32,
    /// Wait between tries (seed 001's `retry_delay`, default 5 s).
    pub retry_delay: Duration,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            retry_attempts: 3,
            retry_delay: Duration::from_secs(5),
        }
    }
}

/// How one push went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PushOutcome {
    /// `webhook` or `ntfy`.
    pub target: &'static str,
    /// The target's URL.
    pub url: String,
    /// Tries made.
    pub attempts: u32,
    /// Why the last try failed; `None` when it was delivered.
    pub error: Option<String>,
}

/// ntfy's priority for ours.
#[cfg_attr(not(feature = "push"), allow(dead_code))]
fn ntfy_priority(priority: &str) -> &'static str {
    match priority {
        "low" => "2",
        "high" => "4",
        "urgent" => "5",
        _ => "3",
    }
}

/// Header values must be visible ASCII; anything else is replaced.
#[cfg_attr(not(feature = "push"), allow(dead_code))]
fn header_text(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .take(256)
        .collect()
}

/// One try; `Err` says why it failed.
#[cfg(feature = "push")]
fn post_once(
    agent: &ureq::Agent,
    target: &PushTarget,
    n: &Notification,
    vapid: Option<&str>,
) -> Result<(), String> {
    let response = match target {
        PushTarget::WebPush(sub) => {
            use base64ct::{Base64UrlUnpadded, Encoding};
            let vapid = vapid.ok_or("the home has no VAPID key yet")?;
            let pair = Base64UrlUnpadded::decode_vec(vapid)
                .ok()
                .and_then(|b| {
                    web_push_native::jwt_simple::algorithms::ES256KeyPair::from_bytes(&b).ok()
                })
                .ok_or("the home's VAPID key is unusable")?;
            let (public, auth) = web_keys(sub)?;
            let endpoint = sub
                .endpoint
                .parse()
                .map_err(|e| format!("the endpoint does not parse: {e}"))?;
            let body = serde_json::to_vec(n).map_err(|e| e.to_string())?;
            let request = web_push_native::WebPushBuilder::new(endpoint, public, auth)
                .with_valid_duration(Duration::from_secs(
                    n.expires_at
                        .unix_ms()
                        .saturating_sub(n.created_at.unix_ms())
                        .div_ceil(1000)
                        .max(1),
                ))
                .with_vapid(&pair, "mailto:hearth@localhost")
                .build(body)
                .map_err(|e| e.to_string())?;
            agent.run(request)
        }
        PushTarget::Webhook(url) => {
            let body = serde_json::to_string(n).map_err(|e| e.to_string())?;
            agent
                .post(url)
                .header("Content-Type", "application/json")
                .send(body)
        }
        PushTarget::Ntfy(url) => agent
            .post(url)
            .header("Title", header_text(&n.title))
            .header("Priority", ntfy_priority(&n.priority))
            .header("Tags", header_text(&n.kind))
            .send(if n.body.is_empty() {
                n.title.clone()
            } else {
                n.body.clone()
            }),
    };
    match response {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("the target answered {}", r.status())),
        Err(e) => Err(e.to_string()),
    }
}

/// Posts `n` to `target`, retrying; blocking (run it off the async threads).
#[cfg(feature = "push")]
pub(crate) fn push(
    target: &PushTarget,
    n: &Notification,
    config: &PushConfig,
    vapid: Option<&str>,
) -> PushOutcome {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let tries = config.retry_attempts.max(1);
    let mut error = None;
    let mut attempts = 0;
    for attempt in 1..=tries {
        attempts = attempt;
        match post_once(&agent, target, n, vapid) {
            Ok(()) => {
                error = None;
                break;
            }
            Err(e) => {
                tracing::debug!(url = %target.url(), attempt, error = %e, "push failed");
                error = Some(e);
                if attempt < tries {
                    std::thread::sleep(config.retry_delay.min(super::MAX_RETRY_DELAY));
                }
            }
        }
    }
    PushOutcome {
        target: target.kind(),
        url: target.url().to_string(),
        attempts,
        error,
    }
}

/// Without an HTTP client nothing can be posted: every target fails at once.
#[cfg(not(feature = "push"))]
pub(crate) fn push(
    target: &PushTarget,
    _n: &Notification,
    _config: &PushConfig,
    _vapid: Option<&str>,
) -> PushOutcome {
    PushOutcome {
        target: target.kind(),
        url: target.url().to_string(),
        attempts: 0,
        error: Some("this build has no HTTP client (feature `push`)".into()),
    }
}

/// Pushes in flight on this node at once; more fail at once with `notification.failed`.
const MAX_IN_FLIGHT: usize = 32;
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Pushes `n` to every configured target and to `subscriptions` (signed with `vapid`)
/// in the background, announcing each outcome.
pub(crate) fn spawn_pushes(
    n: Notification,
    config: PushConfig,
    subscriptions: Vec<PushTarget>,
    vapid: Option<String>,
    events: tokio::sync::broadcast::Sender<crate::events::Event>,
) {
    if config.targets.is_empty() && subscriptions.is_empty() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    for target in config.targets.iter().cloned().chain(subscriptions) {
        let (n, config, events, vapid) = (n.clone(), config.clone(), events.clone(), vapid.clone());
        // Pushes run on blocking threads, which the store's reads use too: a flood of
        // notifications to a slow target must not take them all.
        if IN_FLIGHT.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            let outcome = PushOutcome {
                target: target.kind(),
                url: target.url().to_string(),
                attempts: 0,
                error: Some(format!("{MAX_IN_FLIGHT} pushes are in flight already")),
            };
            tracing::warn!(url = %outcome.url, "a notification was not pushed: too many in flight");
            let _ = events.send(crate::events::Event::NotificationPush {
                notification: Box::new(n),
                outcome: Box::new(outcome),
            });
            continue;
        }
        runtime.spawn_blocking(move || {
            let outcome = push(&target, &n, &config, vapid.as_deref());
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            if let Some(error) = &outcome.error {
                tracing::warn!(url = %outcome.url, attempts = outcome.attempts, %error,
                    "a notification could not be pushed");
            }
            let _ = events.send(crate::events::Event::NotificationPush {
                notification: Box::new(n),
                outcome: Box::new(outcome),
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntfy_headers_are_safe_and_priorities_map() {
        assert_eq!(header_text("Hé\nllo"), "H??llo");
        assert_eq!(ntfy_priority("urgent"), "5");
        assert_eq!(ntfy_priority("normal"), "3");
        let t: PushTarget =
            serde_json::from_str(r#"{"kind": "ntfy", "url": "http://127.0.0.1:1/t"}"#).unwrap();
        assert_eq!(t.kind(), "ntfy");
    }
}
