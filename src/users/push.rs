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
//! Posting needs an HTTP client, which comes with the `push` feature (on by default).

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
}

impl PushTarget {
    /// The target's URL.
    pub fn url(&self) -> &str {
        match self {
            PushTarget::Webhook(u) | PushTarget::Ntfy(u) => u,
        }
    }

    /// `webhook` or `ntfy`.
    pub fn kind(&self) -> &'static str {
        match self {
            PushTarget::Webhook(_) => "webhook",
            PushTarget::Ntfy(_) => "ntfy",
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
fn post_once(agent: &ureq::Agent, target: &PushTarget, n: &Notification) -> Result<(), String> {
    let response = match target {
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
pub(crate) fn push(target: &PushTarget, n: &Notification, config: &PushConfig) -> PushOutcome {
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
        match post_once(&agent, target, n) {
            Ok(()) => {
                error = None;
                break;
            }
            Err(e) => {
                tracing::debug!(url = %target.url(), attempt, error = %e, "push failed");
                error = Some(e);
                if attempt < tries {
                    std::thread::sleep(config.retry_delay);
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
pub(crate) fn push(target: &PushTarget, _n: &Notification, _config: &PushConfig) -> PushOutcome {
    PushOutcome {
        target: target.kind(),
        url: target.url().to_string(),
        attempts: 0,
        error: Some("this build has no HTTP client (feature `push`)".into()),
    }
}

/// Pushes `n` to every target in the background, announcing each outcome.
pub(crate) fn spawn_pushes(
    n: Notification,
    config: PushConfig,
    events: tokio::sync::broadcast::Sender<crate::events::Event>,
) {
    if config.targets.is_empty() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    for target in config.targets.clone() {
        let (n, config, events) = (n.clone(), config.clone(), events.clone());
        runtime.spawn_blocking(move || {
            let outcome = push(&target, &n, &config);
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
